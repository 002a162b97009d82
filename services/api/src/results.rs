//! `/v1/admin/stats` (results per campaign, overall and per step) and `/v1/admin/settings` (installation-wide
//! switches and limits).

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use leadflow_shared::http::Problem;
use leadflow_shared::settings;

use crate::auth::{Administrator, Reader};
use crate::problem::{self, PathParams};
use crate::ApiState;

#[derive(Debug, Default, Deserialize)]
pub struct StatsFilter {
    /// Only this campaign's rows.
    pub campaign: Option<String>,
}

/// `GET /v1/admin/stats[?campaign=NAME]`: the rows of `leadflow stats --json`.
pub async fn stats(
    _: Reader,
    State(state): State<ApiState>,
    filter: Result<Query<StatsFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(filter) = filter.map_err(|e| Problem::bad_request(format!("the query string is not valid: {e}")))?;
    let client = problem::client(&state).await?;
    let mut rows = leadflow_scheduler::stats::campaign_stats(&client)
        .await
        .map_err(|e| problem::internal("failed to compute stats", e))?;
    if let Some(campaign) = &filter.campaign {
        rows.retain(|r| &r.campaign == campaign);
    }
    Ok(Json(rows).into_response())
}

/// `GET /v1/admin/settings`: every setting with its effective value and what it accepts.
pub async fn get_settings(_: Reader, State(state): State<ApiState>) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let values = settings::all(&client)
        .await
        .map_err(|e| problem::internal("failed to load settings", e))?;
    let accepts = settings::known_keys();
    let out: Vec<Value> = values
        .into_iter()
        .map(|(key, value)| {
            let takes = accepts.iter().find(|(k, _)| *k == key).map_or("", |(_, t)| *t);
            json!({ "key": key, "value": value, "accepts": takes })
        })
        .collect();
    Ok(Json(out).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingBody {
    /// As typed on the command line (`"false"`, `"3d"`); JSON booleans and numbers are taken as their text.
    value: Value,
}

/// `PUT /v1/admin/settings/{key}` with `{"value": "..."}`.
pub async fn put_setting(
    _: Administrator,
    State(state): State<ApiState>,
    PathParams(key): PathParams<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let body: SettingBody = problem::from_value(problem::json_body(&body)?)?;
    let raw = match &body.value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => return Err(Problem::invalid_field("value", "a string such as \"false\" or \"3d\"")),
    };
    // Checked first, so a bad value is the caller's 400 and only a database failure is a 500.
    settings::parse_value(&key, &raw).map_err(|e| {
        let reason =
            e.0.strip_prefix(&format!("{key}: "))
                .map(str::to_string)
                .unwrap_or(e.0.clone());
        Problem::invalid_field(key.clone(), reason)
    })?;
    let client = problem::client(&state).await?;
    let stored = settings::set(&client, &key, &raw)
        .await
        .map_err(|e| problem::internal("failed to store the setting", e))?;
    tracing::info!(setting = %key, value = %stored, "setting changed over the admin API");
    Ok(Json(json!({ "key": key, "value": stored })).into_response())
}
