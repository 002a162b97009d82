//! Lead records a team works from, under `/v1`: the profile ([`profile`]), creating, editing, notes, custom fields,
//! inquiries, merging and the timeline ([`records`]), search, static lists and saved filters ([`search`],
//! [`lists`]), import and export ([`transfer`]), and scoring ([`scoring`]).
//!
//! Reading needs a key with the `read` scope, changes `write`, defining fields, statuses, sources and scoring rules
//! `admin` (see [`crate::keys::Scope`]).

pub mod identity;
pub mod lists;
pub mod profile;
pub mod records;
pub mod scoring;
pub mod search;
pub mod transfer;

use axum::Router;

use crate::ApiState;

/// Every `/v1` lead route.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .merge(records::routes())
        .merge(search::routes())
        .merge(lists::routes())
        .merge(transfer::routes())
        .merge(scoring::routes())
}
