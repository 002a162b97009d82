//! Placeholder for the scoring routes of the lead API; filled in by the change that builds them.

use axum::Router;

use crate::ApiState;

pub fn routes() -> Router<ApiState> {
    Router::new()
}
