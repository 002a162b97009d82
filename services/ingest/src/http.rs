//! `POST /v1/events`: CloudEvents over HTTP, answered 202 only once the events are durable.

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use leadflow_shared::http::Problem;
use leadflow_shared::service::Context;

use crate::events::{parse_event, LeadEvent};
use crate::identity::Refused;
use crate::{handoff, metrics, store};

pub const SINGLE: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";

pub fn routes(ctx: &Context) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .layer(DefaultBodyLimit::max(ctx.config.http.max_body_bytes))
        .with_state(ctx.clone())
}

async fn post_events(State(ctx): State<Context>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let started = Instant::now();
    let response = match accept(&ctx, &headers, &body).await {
        Ok(resp) => resp,
        Err(problem) => {
            metrics::rejected("http", problem.field.as_deref().unwrap_or("request"));
            problem.into_response()
        }
    };
    metrics::request_time(started.elapsed());
    response
}

async fn accept(ctx: &Context, headers: &HeaderMap, body: &[u8]) -> Result<Response, Problem> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let batch = match content_type.as_str() {
        SINGLE | "application/json" => false,
        BATCH => true,
        other => {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                format!("content type {other:?} is not accepted: use {SINGLE} for one event or {BATCH} for a batch"),
            ))
        }
    };
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Problem::bad_request(format!("the body is not valid JSON: {e}")))?;
    let events = if batch {
        let items = value
            .as_array()
            .ok_or_else(|| Problem::bad_request("a batch must be a JSON array of events"))?;
        if items.is_empty() {
            return Err(Problem::bad_request("the batch is empty"));
        }
        if items.len() > ctx.config.http.max_batch {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch-too-large",
                format!("a batch holds at most {} events", ctx.config.http.max_batch),
            ));
        }
        let mut events = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            // Nothing of a batch is stored when one event is bad: the caller fixes it and resends the whole.
            let event = parse_event(item, ctx.config.leads.identity_key)
                .map_err(|e| Problem::invalid_field(format!("/{i}{}", e.field), e.reason.clone()).with_index(i))?;
            events.push(event);
        }
        events
    } else {
        vec![parse_event(&value, ctx.config.leads.identity_key)
            .map_err(|e| Problem::invalid_field(e.field.clone(), e.reason.clone()))?]
    };
    let (accepted, duplicates) = store_and_hand_off(ctx, &events, "http").await.map_err(|e| {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return refused.problem(batch);
        }
        tracing::error!(error = format!("{e:#}"), "failed to store events");
        Problem::unavailable("events could not be stored; retry later")
    })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "accepted": accepted, "duplicates": duplicates })),
    )
        .into_response())
}

/// Stores events durably, then tells the scheduler. A failed hand-off is repaired by the scheduler's sweep.
pub async fn store_and_hand_off(
    ctx: &Context,
    events: &[LeadEvent],
    via: &'static str,
) -> anyhow::Result<(usize, usize)> {
    let stored = store::store_events(&ctx.pool, events).await?;
    for e in events {
        tracing::debug!(lead = %e.email, event.type = %e.event_type.as_str(), "event stored");
    }
    metrics::accepted(via, stored.new_event_ids.len(), stored.duplicates);
    handoff::hand_off(ctx, &stored.new_event_ids).await;
    Ok((stored.new_event_ids.len(), stored.duplicates))
}
