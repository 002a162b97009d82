//! Scoring under `/v1`: the rules (`/v1/scoring/rules`), the settings (half-life and thresholds), a recompute of
//! attribute rules for every lead, and one lead's score with its ledger (`/v1/leads/{id}/score`). The work is
//! done by [`leadflow_scheduler::scoring`]; this module reads requests and answers them.
//!
//! Reading needs `read`; creating, changing and deleting rules, changing settings and recomputing need `admin`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use leadflow_scheduler::scoring::{self, RuleError, RuleSpec, Saved};
use leadflow_shared::domain::format_delay;
use leadflow_shared::http::Problem;
use leadflow_shared::settings;

use crate::auth::{Administrator, Reader};
use crate::problem::{self, PathParams};
use crate::ApiState;

/// Ledger rows per page unless `limit` says otherwise, and the most a page holds.
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/scoring/rules", get(list_rules).post(create_rule))
        .route(
            "/v1/scoring/rules/{name}",
            get(get_rule).put(put_rule).delete(delete_rule),
        )
        .route("/v1/scoring/settings", get(get_settings).put(put_settings))
        .route("/v1/scoring/recompute", post(recompute))
        .route("/v1/leads/{id}/score", get(lead_score))
}

type Params = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

fn invalid(e: RuleError) -> Problem {
    Problem::invalid_field(e.field, e.detail)
}

/// The body as a rule; `name` comes from the path when given there.
fn rule_spec(body: &[u8], path_name: Option<&str>) -> Result<RuleSpec, Problem> {
    let mut value = match problem::json_body(body)? {
        Value::Null => return Err(Problem::bad_request("the body is empty; expected a scoring rule")),
        Value::Object(map) => map,
        _ => return Err(Problem::bad_request("the body must be a JSON object (a scoring rule)")),
    };
    if let Some(name) = path_name {
        match value.get("name") {
            Some(given) if given.as_str() != Some(name) => {
                return Err(Problem::invalid_field(
                    "name",
                    "differs from the name in the URL (rename by deleting and creating)",
                ))
            }
            _ => {
                value.insert("name".into(), Value::from(name));
            }
        }
    }
    let spec: RuleSpec = problem::from_value(Value::Object(value))?;
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

async fn check_and_save(client: &deadpool_postgres::Object, spec: &RuleSpec) -> Result<Saved, Problem> {
    scoring::check_field_exists(client, spec)
        .await
        .map_err(|e| problem::internal("failed to check a scoring rule", e))?
        .map_err(invalid)?;
    scoring::upsert_rule(client, spec)
        .await
        .map_err(|e| problem::internal("failed to save a scoring rule", e))
}

async fn rule_json(client: &deadpool_postgres::Object, name: &str) -> Result<Value, Problem> {
    let rule = scoring::get_rule(client, name)
        .await
        .map_err(|e| problem::internal("failed to read a scoring rule", e))?
        .ok_or_else(|| problem::not_found(format!("no scoring rule named {name:?}")))?;
    Ok(json!(rule))
}

/// `GET /v1/scoring/rules`: every rule, by name.
async fn list_rules(_: Reader, State(state): State<ApiState>) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let rules = scoring::list_rules(&client)
        .await
        .map_err(|e| problem::internal("failed to list the scoring rules", e))?;
    Ok(Json(json!({ "items": rules })).into_response())
}

/// `GET /v1/scoring/rules/{name}`.
async fn get_rule(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    Ok(Json(rule_json(&client, &name).await?).into_response())
}

/// `POST /v1/scoring/rules`: 201 with the rule; 409 when the name is taken (PUT replaces).
async fn create_rule(_: Administrator, State(state): State<ApiState>, body: Bytes) -> Result<Response, Problem> {
    let spec = rule_spec(&body, None)?;
    let client = problem::client(&state).await?;
    let exists = scoring::get_rule(&client, &spec.name)
        .await
        .map_err(|e| problem::internal("failed to read a scoring rule", e))?
        .is_some();
    if exists {
        return Err(problem::conflict(
            "name",
            format!(
                "a scoring rule named {:?} exists; PUT /v1/scoring/rules/{{name}} replaces it",
                spec.name
            ),
        ));
    }
    check_and_save(&client, &spec).await?;
    Ok((StatusCode::CREATED, Json(rule_json(&client, &spec.name).await?)).into_response())
}

/// `PUT /v1/scoring/rules/{name}`: creates (201) or replaces (200) the rule. The leads holding a changed
/// attribute rule's points are rescored at once (new points, or withdrawn when deactivated or no longer met).
async fn put_rule(
    Administrator(key): Administrator,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let spec = rule_spec(&body, Some(&name))?;
    let client = problem::client(&state).await?;
    let saved = check_and_save(&client, &spec).await?;
    if saved == Saved::Updated {
        let holders = scoring::holders(&client, &spec.name)
            .await
            .map_err(|e| problem::internal("failed to find the leads holding a rule", e))?;
        if !holders.is_empty() {
            scoring::rescore_leads(&state.pool, &holders, &key.name)
                .await
                .map_err(|e| problem::internal("failed to rescore the leads holding a rule", e))?;
        }
    }
    let status = if saved == Saved::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(rule_json(&client, &spec.name).await?)).into_response())
}

/// `DELETE /v1/scoring/rules/{name}`: 204; the leads holding an attribute rule's points lose them now.
async fn delete_rule(
    Administrator(key): Administrator,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let holders = scoring::delete_rule(&client, &name)
        .await
        .map_err(|e| problem::internal("failed to delete a scoring rule", e))?
        .ok_or_else(|| problem::not_found(format!("no scoring rule named {name:?}")))?;
    drop(client);
    if !holders.is_empty() {
        scoring::rescore_leads(&state.pool, &holders, &key.name)
            .await
            .map_err(|e| problem::internal("failed to withdraw a deleted rule's points", e))?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/scoring/recompute`: brings every lead's attribute-rule points in line with the rules now (after
/// attribute rules were created or changed); answers `{leads, changed}` when done.
async fn recompute(Administrator(key): Administrator, State(state): State<ApiState>) -> Result<Response, Problem> {
    let done = scoring::recompute_all(&state.pool, &key.name)
        .await
        .map_err(|e| problem::internal("failed to recompute scores", e))?;
    Ok(Json(json!(done)).into_response())
}

fn settings_json(s: &settings::Scoring) -> Value {
    json!({
        "half_life": s.half_life.map_or_else(|| "off".to_string(), format_delay),
        "hot": s.hot,
        "warm": s.warm,
    })
}

/// `GET /v1/scoring/settings`: `{half_life, hot, warm}`.
async fn get_settings(_: Reader, State(state): State<ApiState>) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let s = settings::scoring(&client)
        .await
        .map_err(|e| problem::internal("failed to read the scoring settings", e))?;
    Ok(Json(settings_json(&s)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    half_life: Option<Value>,
    hot: Option<Value>,
    warm: Option<Value>,
}

/// `PUT /v1/scoring/settings` with any of `half_life` ("30d", "off"), `hot`, `warm`; `warm` must stay below
/// `hot`. New thresholds apply to each lead at its next score change or decay.
async fn put_settings(_: Administrator, State(state): State<ApiState>, body: Bytes) -> Result<Response, Problem> {
    let body: SettingsBody = match problem::json_body(&body)? {
        Value::Null => {
            return Err(Problem::bad_request(
                "the body is empty; expected {half_life, hot, warm}",
            ))
        }
        value => problem::from_value(value)?,
    };
    let mut changes = Vec::new();
    for (field, key, value) in [
        ("half_life", settings::SCORING_HALF_LIFE, body.half_life),
        ("hot", settings::SCORING_HOT, body.hot),
        ("warm", settings::SCORING_WARM, body.warm),
    ] {
        let Some(value) = value else { continue };
        let raw = match &value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(Problem::invalid_field(field, "expected a string or a number")),
        };
        settings::parse_value(key, &raw).map_err(|e| Problem::invalid_field(field, e.0))?;
        changes.push((field, key, raw));
    }
    let mut client = problem::client(&state).await?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| problem::internal("failed to start a transaction", e.into()))?;
    for (_, key, raw) in &changes {
        settings::set(&tx, key, raw)
            .await
            .map_err(|e| problem::internal("failed to store a scoring setting", e))?;
    }
    let s = settings::scoring(&tx)
        .await
        .map_err(|e| problem::internal("failed to read the scoring settings", e))?;
    if s.warm >= s.hot {
        let field = if changes.iter().any(|c| c.0 == "warm") {
            "warm"
        } else {
            "hot"
        };
        return Err(Problem::invalid_field(
            field,
            format!("warm ({}) must be below hot ({})", s.warm, s.hot),
        ));
    }
    tx.commit()
        .await
        .map_err(|e| problem::internal("failed to store the scoring settings", e.into()))?;
    Ok(Json(settings_json(&s)).into_response())
}

fn encode_cursor(id: i64) -> String {
    hex::encode(format!("ledger:{id}"))
}

fn decode_cursor(raw: &str) -> Option<i64> {
    let bytes = hex::decode(raw.trim()).ok()?;
    String::from_utf8(bytes).ok()?.strip_prefix("ledger:")?.parse().ok()
}

/// `GET /v1/leads/{id}/score?limit=&cursor=`: `{score, temperature, score_at, ledger: {items, next_cursor}}`,
/// the ledger newest first.
async fn lead_score(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
    query: Params,
) -> Result<Response, Problem> {
    let Query(params) = query.map_err(|e| Problem::bad_request(format!("the query string is not valid: {e}")))?;
    if let Some(unknown) = params.keys().find(|k| !matches!(k.as_str(), "limit" | "cursor")) {
        return Err(Problem::invalid_field(
            unknown.clone(),
            "unknown parameter; expected limit, cursor",
        ));
    }
    let limit = match params.get("limit").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => DEFAULT_LIMIT,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| Problem::invalid_field("limit", format!("must be a whole number from 1 to {MAX_LIMIT}")))?,
    };
    let before = match params.get("cursor").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => i64::MAX,
        Some(raw) => {
            decode_cursor(raw).ok_or_else(|| Problem::invalid_field("cursor", "not a cursor this API gave out"))?
        }
    };
    let client = problem::client(&state).await?;
    let lead = client
        .query_opt("SELECT score, temperature, score_at FROM leads WHERE id = $1", &[&id])
        .await
        .map_err(|e| problem::internal("failed to read the lead's score", e.into()))?
        .ok_or_else(|| problem::not_found(format!("no lead with id {id}")))?;
    let rows = client
        .query(
            "SELECT g.id, g.created_at, g.points, g.score, g.reason, r.name, g.event_id, e.type
               FROM score_ledger g
               LEFT JOIN scoring_rules r ON r.id = g.rule_id
               LEFT JOIN events e ON e.id = g.event_id
              WHERE g.lead_id = $1 AND g.id < $2
              ORDER BY g.id DESC LIMIT $3",
            &[&id, &before, &(limit + 1)],
        )
        .await
        .map_err(|e| problem::internal("failed to read the score ledger", e.into()))?;
    let more = rows.len() as i64 > limit;
    let mut items = Vec::new();
    let mut last = None;
    for row in rows.iter().take(limit as usize) {
        let ledger_id: i64 = row.get(0);
        last = Some(ledger_id);
        let created_at: DateTime<Utc> = row.get(1);
        let mut item = Map::new();
        item.insert("created_at".into(), json!(created_at));
        item.insert("points".into(), json!(row.get::<_, f64>(2)));
        item.insert("score".into(), json!(row.get::<_, f64>(3)));
        item.insert("reason".into(), json!(row.get::<_, String>(4)));
        item.insert("rule".into(), json!(row.get::<_, Option<String>>(5)));
        item.insert("event_id".into(), json!(row.get::<_, Option<i64>>(6)));
        item.insert("event_type".into(), json!(row.get::<_, Option<String>>(7)));
        items.push(Value::Object(item));
    }
    let next_cursor = if more { last.map(encode_cursor) } else { None };
    let score_at: Option<DateTime<Utc>> = lead.get(2);
    Ok(Json(json!({
        "score": lead.get::<_, f64>(0),
        "temperature": lead.get::<_, String>(1),
        "score_at": score_at,
        "ledger": { "items": items, "next_cursor": next_cursor },
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_and_others_are_refused() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor(&hex::encode("other:1")), None);
    }

    #[test]
    fn a_rule_in_the_url_keeps_its_name() {
        let spec = rule_spec(br#"{"event_type": "trial.started", "points": 10}"#, Some("trial")).unwrap();
        assert_eq!(spec.name, "trial");
        let problem = rule_spec(
            br#"{"name": "x", "event_type": "trial.started", "points": 10}"#,
            Some("trial"),
        )
        .unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("name"));
        let problem = rule_spec(br#"{"name": "x", "points": 10}"#, None).unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("event_type"));
        let problem = rule_spec(
            br#"{"name": "x", "condition": {"field": "country", "op": "like", "value": "DE"}, "points": 1}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("condition.op"));
    }
}
