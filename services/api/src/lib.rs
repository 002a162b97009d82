//! The admin REST API under `/v1/admin`: campaigns, templates (with preview), stats and settings, authenticated
//! with API keys (`Authorization: Bearer lf_...`). Every error is `application/problem+json`.
//!
//! Reading needs a key with the `read` scope, changing campaigns and templates `write`, changing settings `admin`
//! (see [`keys::Scope`]). Keys are created with `leadflow keys create` ([`keys::create`]).

pub mod auth;
pub mod campaigns;
pub mod consent;
pub mod keys;
pub mod leads;
mod metrics;
pub mod openapi;
pub mod problem;
pub mod public;
pub mod results;
pub mod suppressions;
pub mod templates;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post, put};
use axum::Router;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use leadflow_shared::config::IdentityKey;
use leadflow_shared::http::Problem;
use leadflow_shared::service::{Context, Service};

/// The largest suppression file accepted by `POST /v1/admin/suppressions/import` (about a million addresses).
pub const SUPPRESSION_FILE_BYTES: usize = 64 * 1024 * 1024;

/// What every admin handler shares.
#[derive(Clone)]
pub struct ApiState {
    pub pool: Pool,
    /// `LEADFLOW_IDENTITY_KEY`: what finds a lead that exists already (creating leads, importing them).
    pub identity: IdentityKey,
}

/// The admin API and the public unsubscribe page (`/u/{token}`, [`public`]), and the lead import worker
/// ([`leads::transfer::worker`]).
pub fn service(ctx: &Context, shutdown: CancellationToken) -> Service {
    let routes = routes(ctx.pool.clone(), ctx.config.leads.identity_key)
        // LEADFLOW_MAX_BODY_BYTES bounds every JSON body; routes that take files set their own, larger limit.
        .layer(DefaultBodyLimit::max(ctx.config.http.max_body_bytes))
        .layer(axum::middleware::map_response(too_large_as_problem));
    Service::new("api")
        .routes(routes)
        .routes(public::routes(ctx.pool.clone(), ctx.config.mail.keyring.clone()))
        .task(
            "imports",
            leads::transfer::worker::run(ctx.pool.clone(), ctx.config.leads.identity_key, shutdown),
        )
}

/// Every `/v1/admin` route.
pub fn routes(pool: Pool, identity: IdentityKey) -> Router {
    Router::new()
        .route("/v1/admin/campaigns", get(campaigns::list).post(campaigns::create))
        .route("/v1/admin/campaigns/{name}", get(campaigns::get).put(campaigns::put))
        .route("/v1/admin/campaigns/{name}/activate", post(campaigns::activate))
        .route("/v1/admin/campaigns/{name}/deactivate", post(campaigns::deactivate))
        .route("/v1/admin/templates", get(templates::list))
        .route(
            "/v1/admin/templates/{name}/{language}",
            get(templates::get).put(templates::put),
        )
        .route(
            "/v1/admin/templates/{name}/{language}/preview",
            post(templates::preview),
        )
        .route("/v1/admin/stats", get(results::stats))
        .route("/v1/admin/settings", get(results::get_settings))
        .route("/v1/admin/settings/{key}", put(results::put_setting))
        .route(
            "/v1/admin/suppressions",
            get(suppressions::list).post(suppressions::add),
        )
        .route(
            "/v1/admin/suppressions/import",
            post(suppressions::import).layer(DefaultBodyLimit::max(SUPPRESSION_FILE_BYTES)),
        )
        .route("/v1/admin/suppressions/{email}", delete(suppressions::remove))
        .route(
            "/v1/admin/leads/{email}",
            get(suppressions::export).delete(suppressions::erase),
        )
        .merge(leads::routes())
        .merge(openapi::routes())
        .route("/v1/admin", any(not_found))
        .route("/v1/admin/{*rest}", any(not_found))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(metrics::track))
        .with_state(ApiState { pool, identity })
}

/// axum answers an oversized body with a plain-text 413; every error of this API is problem+json.
async fn too_large_as_problem(response: Response) -> Response {
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE || is_problem {
        return response;
    }
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        "the request body is larger than this endpoint accepts (LEADFLOW_MAX_BODY_BYTES for JSON bodies)",
    )
    .into_response()
}

async fn not_found() -> Problem {
    problem::not_found("no such admin endpoint; see docs/admin-api.md")
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this endpoint does not take that method; see docs/admin-api.md",
    )
}
