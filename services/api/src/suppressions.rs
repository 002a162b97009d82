//! `/v1/admin/suppressions` (list, add, remove with a reason, import) and `/v1/admin/leads/{email}` (export and
//! erasure). The work is done by [`crate::consent`]; this module reads requests and answers them.
//!
//! Listing needs `read`, adding and importing `write`; resubscribing, exporting a lead's data and erasing it
//! need `admin`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use leadflow_shared::http::Problem;

use crate::auth::{Administrator, Reader, Writer};
use crate::consent::{self, NewSuppression, SuppressionFilter};
use crate::problem::{self, PathParams};
use crate::ApiState;

type Params = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

/// The query parameters, refusing any not in `known`.
fn params(raw: Params, known: &[&str]) -> Result<HashMap<String, String>, Problem> {
    let Query(params) = raw.map_err(|e| Problem::bad_request(format!("the query string is not valid: {e}")))?;
    if let Some(unknown) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(Problem::invalid_field(
            unknown.clone(),
            format!("unknown parameter; expected {}", known.join(", ")),
        ));
    }
    Ok(params)
}

fn number(params: &HashMap<String, String>, name: &str) -> Result<Option<i64>, Problem> {
    params
        .get(name)
        .map(|raw| raw.trim())
        .filter(|raw| !raw.is_empty())
        .map(|raw| {
            raw.parse::<i64>()
                .map_err(|_| Problem::invalid_field(name, "must be a whole number"))
        })
        .transpose()
}

/// `GET /v1/admin/suppressions?email=&reason=&limit=&after=`: newest first; `next_after` continues.
pub async fn list(_: Reader, State(state): State<ApiState>, query: Params) -> Result<Response, Problem> {
    let params = params(query, &["email", "reason", "limit", "after"])?;
    let filter = SuppressionFilter {
        email: params.get("email").cloned(),
        reason: params.get("reason").cloned(),
        limit: number(&params, "limit")?,
        after: number(&params, "after")?,
    };
    let client = problem::client(&state).await?;
    let page = consent::list(&client, &filter)
        .await
        .map_err(|e| e.into_problem("failed to list suppressions"))?;
    Ok(Json(page).into_response())
}

/// `POST /v1/admin/suppressions` with `{email, reason, campaign?, note?}`: 201 when new, 200 when the address was
/// suppressed in that scope already.
pub async fn add(_: Writer, State(state): State<ApiState>, body: Bytes) -> Result<Response, Problem> {
    let request: NewSuppression = match problem::json_body(&body)? {
        Value::Null => return Err(Problem::invalid_field("email", "required (the body is empty)")),
        value => problem::from_value(value)?,
    };
    let mut client = problem::client(&state).await?;
    let added = consent::add(&mut client, &request, "api")
        .await
        .map_err(|e| e.into_problem("failed to add the suppression"))?;
    let status = if added.new { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(added)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveBody {
    reason: Option<String>,
    campaign: Option<String>,
}

/// `DELETE /v1/admin/suppressions/{email}?campaign=&reason=` (or the body `{"reason": "...", "campaign": "..."}`):
/// a resubscription, logged with the key's name. The reason is required.
pub async fn remove(
    Administrator(key): Administrator,
    State(state): State<ApiState>,
    PathParams(email): PathParams<String>,
    query: Params,
    body: Bytes,
) -> Result<Response, Problem> {
    let params = params(query, &["campaign", "reason"])?;
    let body: RemoveBody = match problem::json_body(&body)? {
        Value::Null => RemoveBody::default(),
        value => problem::from_value(value)?,
    };
    let reason = body.reason.or_else(|| params.get("reason").cloned());
    let campaign = body.campaign.or_else(|| params.get("campaign").cloned());
    let mut client = problem::client(&state).await?;
    consent::remove(&mut client, &email, campaign.as_deref(), reason.as_deref(), &key.name)
        .await
        .map_err(|e| e.into_problem("failed to remove the suppression"))?;
    Ok(Json(json!({ "resubscribed": true, "campaign": campaign, "actor": key.name })).into_response())
}

/// `POST /v1/admin/suppressions/import[?campaign=]` with `text/csv` (or `text/plain`): `email[,reason[,note]]`
/// per line. Bad lines are reported by number in `rejected`; the good ones are applied.
pub async fn import(
    _: Writer,
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Params,
    body: Bytes,
) -> Result<Response, Problem> {
    let params = params(query, &["campaign"])?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if content_type != "text/csv" && content_type != "text/plain" {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "send the list as text/csv: one email[,reason[,note]] per line",
        ));
    }
    let text = std::str::from_utf8(&body).map_err(|e| Problem::bad_request(format!("the body is not UTF-8: {e}")))?;
    let mut client = problem::client(&state).await?;
    let report = consent::import(&mut client, text, params.get("campaign").map(String::as_str), "import")
        .await
        .map_err(|e| e.into_problem("failed to import suppressions"))?;
    Ok(Json(report).into_response())
}

/// `GET /v1/admin/leads/{email}`: everything stored about the address, as JSON.
pub async fn export(
    _: Administrator,
    State(state): State<ApiState>,
    PathParams(email): PathParams<String>,
) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let data = consent::export(&client, &email)
        .await
        .map_err(|e| e.into_problem("failed to export the lead"))?;
    Ok(Json(data).into_response())
}

/// `DELETE /v1/admin/leads/{email}`: erasure; a hashed suppression entry is kept.
pub async fn erase(
    Administrator(key): Administrator,
    State(state): State<ApiState>,
    PathParams(email): PathParams<String>,
) -> Result<Response, Problem> {
    let mut client = problem::client(&state).await?;
    let erased = consent::erase(&mut client, &email, &key.name)
        .await
        .map_err(|e| e.into_problem("failed to erase the lead"))?;
    Ok(Json(erased).into_response())
}
