//! A small client of leadflow's own HTTP API, for the `leadflow leads ...` commands: the command line goes through
//! the same API (and the same checks and API-key scopes) as any other client. A refusal is shown as the problem
//! the API answered, with the field it names.

use std::path::Path;

use anyhow::Context as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

/// Where the API is and the key to present.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: String,
}

/// An answer the API refused with: its status and problem body.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub body: Value,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let detail = self.body["detail"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| self.body.to_string());
        write!(f, "the API refused ({}): {detail}", self.status.as_u16())?;
        if let Some(field) = self.body["field"].as_str() {
            if !detail.starts_with(field) {
                write!(f, " [field {field}]")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Refusal {}

impl ApiClient {
    /// `base` like `http://127.0.0.1:8080`; `key` an API key (`lf_...`).
    pub fn new(base: &str, key: &str) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        url::Url::parse(&base).with_context(|| format!("LEADFLOW_API_URL: {base:?} is not a URL"))?;
        if key.trim().is_empty() {
            anyhow::bail!(
                "LEADFLOW_API_KEY is not set: create a key with `leadflow keys create --name cli --scope write` \
                 and export it (or pass --api-key)"
            );
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("leadflow-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("failed to build the HTTP client")?;
        Ok(Self {
            http,
            base,
            key: key.trim().to_string(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, method: Method, path: &str, body: Option<(&str, Vec<u8>)>) -> anyhow::Result<Response> {
        let mut request = self
            .http
            .request(method.clone(), self.url(path))
            .header(AUTHORIZATION, format!("Bearer {}", self.key));
        if let Some((content_type, bytes)) = body {
            request = request.header(CONTENT_TYPE, content_type).body(bytes);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the API at {} ({method} {path})", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Err(Refusal { status, body }.into())
    }

    async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let body = match body {
            Some(value) => Some(("application/json", serde_json::to_vec(value)?)),
            None => None,
        };
        let response = self.send(method, path, body).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let text = response.text().await.context("the API's answer was cut off")?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("the API answered something that is not JSON: {text}"))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.json(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.json(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.json(Method::PATCH, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.json(Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.json(Method::DELETE, path, None).await
    }

    /// Sends a file as the body (`content_type`), answering the JSON reply.
    pub async fn upload(&self, path: &str, content_type: &str, file: &Path) -> anyhow::Result<Value> {
        let bytes = tokio::fs::read(file)
            .await
            .with_context(|| format!("cannot read {}", file.display()))?;
        let response = self.send(Method::POST, path, Some((content_type, bytes))).await?;
        let text = response.text().await.context("the API's answer was cut off")?;
        serde_json::from_str(&text).with_context(|| format!("the API answered something that is not JSON: {text}"))
    }

    /// Streams a GET's body to `out` (or standard output), chunk by chunk; returns the bytes written.
    pub async fn download(&self, path: &str, out: Option<&Path>) -> anyhow::Result<u64> {
        let mut response = self.send(Method::GET, path, None).await?;
        let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match out {
            Some(file) => Box::new(
                tokio::fs::File::create(file)
                    .await
                    .with_context(|| format!("cannot create {}", file.display()))?,
            ),
            None => Box::new(tokio::io::stdout()),
        };
        let mut written = 0u64;
        while let Some(chunk) = response.chunk().await.context("the download was cut off")? {
            sink.write_all(&chunk).await.context("cannot write the download")?;
            written += chunk.len() as u64;
        }
        sink.flush().await.context("cannot write the download")?;
        Ok(written)
    }
}

/// Percent-encodes one query or path component.
pub fn encode(raw: &str) -> String {
    url::form_urlencoded::byte_serialize(raw.as_bytes()).collect()
}

/// `key=value` pairs as a query string (`?a=1&b=2`, or empty).
pub fn query(pairs: &[(String, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let joined: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    format!("?{}", joined.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        let q = query(&[("name".into(), "Ann & Bo".into()), ("tag".into(), "vip,b2b".into())]);
        assert_eq!(q, "?name=Ann+%26+Bo&tag=vip%2Cb2b");
        assert_eq!(query(&[]), "");
    }

    #[test]
    fn a_refusal_names_its_field() {
        let refusal = Refusal {
            status: StatusCode::BAD_REQUEST,
            body: serde_json::json!({"detail": "must be an ISO code", "field": "country"}),
        };
        assert_eq!(
            refusal.to_string(),
            "the API refused (400): must be an ISO code [field country]"
        );
    }

    #[test]
    fn a_missing_key_says_how_to_get_one() {
        let e = ApiClient::new("http://127.0.0.1:8080", "").unwrap_err();
        assert!(e.to_string().contains("leadflow keys create"), "{e}");
    }
}
