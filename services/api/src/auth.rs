//! Authentication: `Authorization: Bearer <key>`, looked up by the key's hash. A handler states the scope it
//! needs by taking [`Reader`], [`Writer`] or [`Administrator`]: 401 without a valid key, 403 without the scope.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use leadflow_shared::http::Problem;

use crate::keys::{self, KeyInfo, Scope};
use crate::{metrics, problem, ApiState};

/// Why a request was not let through.
#[derive(Debug)]
pub struct Refused(Problem);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let challenge = self.0.status == StatusCode::UNAUTHORIZED;
        let mut response = self.0.into_response();
        if challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"leadflow\""),
            );
        }
        response
    }
}

fn unauthorized(detail: &str) -> Refused {
    metrics::refused("unauthenticated");
    Refused(Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail))
}

/// The bearer token of the request, if it has one.
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Checks the request's key and that it grants `needed`.
pub async fn authorize(parts: &Parts, state: &ApiState, needed: Scope) -> Result<KeyInfo, Refused> {
    let Some(presented) = bearer(parts) else {
        return Err(unauthorized(
            "an API key is required: send `Authorization: Bearer <key>` (create one with `leadflow keys create`)",
        ));
    };
    let client = problem::client(state).await.map_err(Refused)?;
    let key = keys::authenticate(&client, presented)
        .await
        .map_err(|e| Refused(problem::internal("failed to check the API key", e)))?
        .ok_or_else(|| unauthorized("the API key is not valid or was revoked"))?;
    if !key.grants(needed) {
        metrics::refused("forbidden");
        let held: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
        return Err(Refused(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this needs the {needed} scope; key {} has {}",
                key.prefix,
                held.join(", ")
            ),
        )));
    }
    Ok(key)
}

macro_rules! scope_extractor {
    ($(#[$doc:meta])* $name:ident, $scope:expr) => {
        $(#[$doc])*
        pub struct $name(pub KeyInfo);

        impl FromRequestParts<ApiState> for $name {
            type Rejection = Refused;

            async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
                authorize(parts, state, $scope).await.map(Self)
            }
        }
    };
}

scope_extractor!(
    /// A caller whose key grants `read`.
    Reader,
    Scope::Read
);
scope_extractor!(
    /// A caller whose key grants `write`.
    Writer,
    Scope::Write
);
scope_extractor!(
    /// A caller whose key grants `admin`.
    Administrator,
    Scope::Admin
);
