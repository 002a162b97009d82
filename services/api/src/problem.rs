//! Errors as `application/problem+json`: request bodies parsed with the offending field named, database
//! failures logged once and answered without internals.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use leadflow_shared::http::Problem;

use crate::ApiState;

pub fn not_found(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", detail)
}

pub fn conflict(field: &str, detail: impl Into<String>) -> Problem {
    Problem {
        field: Some(field.to_string()),
        ..Problem::new(StatusCode::CONFLICT, "conflict", detail)
    }
}

/// Logs a failure the caller cannot fix (with its cause chain) and answers 500 without internals.
pub fn internal(what: &str, e: anyhow::Error) -> Problem {
    tracing::error!(error = format!("{e:#}"), "{what}");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal-error",
        format!("{what}; the service log has the cause"),
    )
}

/// A pooled database connection, or 503.
pub async fn client(state: &ApiState) -> Result<deadpool_postgres::Object, Problem> {
    state.pool.get().await.map_err(|e| {
        tracing::warn!(error = %e, "PostgreSQL unreachable");
        Problem::unavailable("the database is unreachable; retry later")
    })
}

/// Parses a JSON request body; an empty body is `Value::Null`.
pub fn json_body(body: &[u8]) -> Result<Value, Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| Problem::bad_request(format!("the body is not valid JSON: {e}")))
}

/// Deserializes `value` into `T`; a wrong type or an unknown field is a 400 naming the field (`steps[0].delay`).
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.inner().to_string();
        let field = match unknown_field(&reason) {
            Some(unknown) if path == "." => unknown.to_string(),
            Some(unknown) if !path.ends_with(unknown) => format!("{path}.{unknown}"),
            _ => path,
        };
        if field == "." {
            Problem::bad_request(reason)
        } else {
            Problem::invalid_field(field, reason)
        }
    })
}

/// The field serde's "unknown field `x`, expected ..." message names.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// `Path`, with a malformed segment answered as problem+json.
pub struct PathParams<T>(pub T);

impl<T> FromRequestParts<ApiState> for PathParams<T>
where
    T: DeserializeOwned + Send,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(Problem::bad_request(format!("the URL is not valid: {rejection}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        steps: Vec<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        delay: String,
        #[serde(default)]
        discount: u8,
    }

    fn field_of(value: Value) -> Option<String> {
        from_value::<Outer>(value).unwrap_err().field
    }

    #[test]
    fn an_unknown_field_is_named_where_it_is() {
        assert_eq!(
            field_of(json!({"name": "a", "colour": "red"})).as_deref(),
            Some("colour")
        );
        assert_eq!(
            field_of(json!({"name": "a", "steps": [{"delay": "1s"}, {"delay": "1s", "wait": 1}]})).as_deref(),
            Some("steps[1].wait")
        );
    }

    #[test]
    fn a_wrong_type_is_named_by_its_path() {
        assert_eq!(
            field_of(json!({"name": "a", "steps": [{"delay": "1s", "discount": 300}]})).as_deref(),
            Some("steps[0].discount")
        );
        assert_eq!(field_of(json!({"name": 5})).as_deref(), Some("name"));
    }

    #[test]
    fn a_missing_field_is_reported() {
        let problem = from_value::<Outer>(json!({})).unwrap_err();
        assert!(problem.detail.contains("name"), "{problem:?}");
    }
}
