//! HTTP plumbing shared by services: RFC 9457 problem responses and the operational endpoints.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde::Serialize;

/// A JSON problem body (`application/problem+json`) naming what was wrong.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(skip)]
    pub status: StatusCode,
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status_code: u16,
    pub detail: String,
    /// The offending field as a JSON pointer (`/data/email`) or a dotted path, when one field is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For batches: the index of the offending item.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

impl Problem {
    pub fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind: format!("https://leadflow.dev/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status_code: status.as_u16(),
            detail: detail.into(),
            field: None,
            index: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid-request", detail)
    }

    pub fn invalid_field(field: impl Into<String>, detail: impl Into<String>) -> Self {
        let field = field.into();
        let detail = detail.into();
        Self {
            field: Some(field.clone()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid-field", format!("{field}: {detail}"))
        }
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    pub fn with_index(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, Json(self)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub pool: Pool,
    pub amqp: std::sync::Arc<lapin::Connection>,
}

/// `/healthz` (the process is alive), `/readyz` (database and broker reachable), `/metrics` (Prometheus).
pub fn ops_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

async fn ready(State(r): State<Readiness>) -> Response {
    if !r.amqp.status().connected() {
        return Problem::unavailable("RabbitMQ connection is down").into_response();
    }
    match r.pool.get().await {
        Ok(client) => match client.query_one("SELECT 1", &[]).await {
            Ok(_) => "ready".into_response(),
            Err(e) => Problem::unavailable(format!("PostgreSQL query failed: {e}")).into_response(),
        },
        Err(e) => Problem::unavailable(format!("PostgreSQL unreachable: {e}")).into_response(),
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics_handle().render(),
    )
        .into_response()
}
