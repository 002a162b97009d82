//! The OpenAPI 3.1 document of the HTTP API, served at `GET /v1/openapi.json` (and `.yaml`) without a key. It is
//! kept as YAML parts under `services/api/openapi/`, one per area, merged here: `paths` and `components` of every
//! part are joined into the base document. A path or schema defined twice is a build mistake that the tests catch.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value};

/// The parts, base first.
const PARTS: &[(&str, &str)] = &[
    ("base.yaml", include_str!("../openapi/base.yaml")),
    ("events.yaml", include_str!("../openapi/events.yaml")),
    ("admin.yaml", include_str!("../openapi/admin.yaml")),
    ("records.yaml", include_str!("../openapi/records.yaml")),
    ("search.yaml", include_str!("../openapi/search.yaml")),
    ("lists.yaml", include_str!("../openapi/lists.yaml")),
    ("transfer.yaml", include_str!("../openapi/transfer.yaml")),
    ("scoring.yaml", include_str!("../openapi/scoring.yaml")),
];

/// The merged document, or what is wrong with the parts.
pub fn document() -> Result<Value, String> {
    let mut doc = Value::Object(Map::new());
    for (name, text) in PARTS {
        let part: Value = serde_yaml_ng::from_str(text).map_err(|e| format!("openapi/{name}: {e}"))?;
        merge_part(&mut doc, part, name)?;
    }
    Ok(doc)
}

fn merge_part(doc: &mut Value, part: Value, name: &str) -> Result<(), String> {
    let Value::Object(part) = part else {
        return Err(format!("openapi/{name}: not a mapping"));
    };
    let Value::Object(doc) = doc else {
        return Err("the document is not a mapping".into());
    };
    for (key, value) in part {
        match key.as_str() {
            "paths" => {
                // Parts may share a path with different methods (GET /v1/leads searches, POST creates).
                let paths = match value {
                    Value::Object(paths) => paths,
                    Value::Null => continue,
                    _ => return Err(format!("openapi/{name}: paths is not a mapping")),
                };
                let slot = doc.entry("paths").or_insert_with(|| Value::Object(Map::new()));
                let Value::Object(slot) = slot else {
                    return Err("paths is not a mapping".into());
                };
                for (path, operations) in paths {
                    join(slot, &path, operations, name)?;
                }
            }
            "components" => {
                let Value::Object(kinds) = value else {
                    return Err(format!("openapi/{name}: components is not a mapping"));
                };
                let components = doc.entry("components").or_insert_with(|| Value::Object(Map::new()));
                let Value::Object(components) = components else {
                    return Err("components is not a mapping".into());
                };
                for (kind, entries) in kinds {
                    join(components, &kind, entries, name)?;
                }
            }
            _ if doc.contains_key(&key) => return Err(format!("openapi/{name}: `{key}` is set by another part")),
            _ => {
                doc.insert(key, value);
            }
        }
    }
    Ok(())
}

/// Adds the entries of `value` to `target[key]`, refusing an entry that is already there.
fn join(target: &mut Map<String, Value>, key: &str, value: Value, name: &str) -> Result<(), String> {
    let entries = match value {
        Value::Object(entries) => entries,
        Value::Null => return Ok(()),
        _ => return Err(format!("openapi/{name}: `{key}` is not a mapping")),
    };
    let slot = target.entry(key).or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(slot) = slot else {
        return Err(format!("`{key}` is not a mapping"));
    };
    for (entry, v) in entries {
        if slot.contains_key(&entry) {
            return Err(format!("openapi/{name}: `{key}.{entry}` is defined twice"));
        }
        slot.insert(entry, v);
    }
    Ok(())
}

/// `GET /v1/openapi.json` and `GET /v1/openapi.yaml`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/v1/openapi.json", get(json))
        .route("/v1/openapi.yaml", get(yaml))
}

async fn json() -> Response {
    match document() {
        Ok(doc) => Json(doc).into_response(),
        Err(e) => crate::problem::internal("the OpenAPI document is broken", anyhow::anyhow!(e)).into_response(),
    }
}

async fn yaml() -> Response {
    match document().and_then(|doc| serde_yaml_ng::to_string(&doc).map_err(|e| e.to_string())) {
        Ok(text) => ([(header::CONTENT_TYPE, "application/yaml")], text).into_response(),
        Err(e) => crate::problem::internal("the OpenAPI document is broken", anyhow::anyhow!(e)).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_merge_into_one_document() {
        let doc = document().unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        assert!(doc["paths"].as_object().is_some_and(|p| !p.is_empty()));
        assert!(doc["components"]["schemas"]["Problem"].is_object());
    }

    #[test]
    fn a_path_defined_twice_is_refused() {
        let mut doc = serde_json::json!({"paths": {"/a": {"get": {}}}});
        let part = serde_json::json!({"paths": {"/a": {"get": {}}}});
        assert!(merge_part(&mut doc, part, "x.yaml")
            .unwrap_err()
            .contains("defined twice"));
    }
}
