//! The admin API's metrics: requests by route and status, request time, and refused authentications.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// `route` is the matched route template (`/v1/admin/campaigns/{name}`), never the raw path, so labels stay bounded.
pub fn request(method: &str, route: &str, status: u16, elapsed: Duration) {
    let method = match method {
        "GET" | "POST" | "PUT" | "DELETE" | "PATCH" => method,
        _ => "other",
    };
    metrics::counter!(
        "leadflow_api_requests_total",
        "method" => method.to_string(),
        "route" => route.to_string(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("leadflow_api_request_seconds", "route" => route.to_string()).record(elapsed.as_secs_f64());
}

/// `reason`: `unauthenticated` (no key, a wrong key or a revoked one) or `forbidden` (a scope is missing).
pub fn refused(reason: &'static str) {
    metrics::counter!("leadflow_api_refused_total", "reason" => reason).increment(1);
}

/// Middleware counting every request of the admin routes.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    self::request(&method, &route, response.status().as_u16(), started.elapsed());
    response
}
