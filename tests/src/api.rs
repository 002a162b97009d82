//! A client of the HTTP API for end-to-end tests: one API key (or none), every answer kept whole so a test can
//! insist on its status, content type and body, and show all of it when it is something else.

use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use leadflow::api::keys::{self, ExposeSecret as _, Scope};

use crate::{TestApp, DEADLINE};

/// One answer of the API.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub location: Option<String>,
    pub challenge: Option<String>,
    pub headers: HeaderMap,
    /// The body as JSON, or as a JSON string when it is not JSON.
    pub body: Value,
    /// The raw body.
    pub bytes: Vec<u8>,
}

impl Answer {
    /// Reads a whole response.
    pub async fn read(response: reqwest::Response) -> Self {
        let headers = response.headers().clone();
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (status, content_type) = (response.status(), header(CONTENT_TYPE).unwrap_or_default());
        let (location, challenge) = (header(LOCATION), header(WWW_AUTHENTICATE));
        let url = response.url().to_string();
        let bytes = response
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{url}: failed to read the body: {e}"))
            .to_vec();
        let body =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Self {
            status,
            content_type,
            location,
            challenge,
            headers,
            body,
            bytes,
        }
    }

    /// Insists on `status`, showing the body when it is something else; returns the body.
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "unexpected answer: {self:#?}");
        self.body
    }

    /// Insists on a problem+json answer with `status` naming `field`; returns the problem.
    pub fn problem(self, status: u16, field: &str) -> Value {
        assert_eq!(self.status.as_u16(), status, "unexpected answer: {self:#?}");
        assert_eq!(self.content_type, "application/problem+json", "{self:#?}");
        assert_eq!(
            self.body["field"].as_str(),
            Some(field),
            "expected the problem to name {field}: {self:#?}"
        );
        assert!(
            !self.body["detail"].as_str().unwrap_or_default().trim().is_empty(),
            "the problem has no detail: {self:#?}"
        );
        self.body
    }

    /// Insists on a problem+json answer with `status` (whatever field it names); returns the problem.
    pub fn refused(self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "unexpected answer: {self:#?}");
        assert_eq!(self.content_type, "application/problem+json", "{self:#?}");
        self.body
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A client of the API holding one key (or none).
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl ApiClient {
    /// A client presenting `key` (or no key at all).
    pub fn new(app: &TestApp, key: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: app.url(""),
            key,
        }
    }

    /// A client with a fresh key of `scope`, named `tests-<scope>`.
    pub async fn with_scope(app: &TestApp, scope: Scope) -> Self {
        Self::named(app, &format!("tests-{scope}"), scope).await
    }

    /// A client with a fresh key of `scope` named `name` (changes are recorded as made by it).
    pub async fn named(app: &TestApp, name: &str, scope: Scope) -> Self {
        let created = keys::create(&app.db().await, name, &[scope])
            .await
            .unwrap_or_else(|e| panic!("failed to create a {scope} key: {e:#}"));
        Self::new(app, Some(created.key.expose_secret().to_string()))
    }

    /// The key this client presents.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Sends a request with a body of `content_type`.
    pub async fn send(&self, method: Method, path: &str, content_type: Option<&str>, body: Option<Vec<u8>>) -> Answer {
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} failed: {e}"));
        Answer::read(response).await
    }

    fn json(body: &Value) -> (Option<&'static str>, Option<Vec<u8>>) {
        (Some("application/json"), Some(body.to_string().into_bytes()))
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        let (content_type, body) = Self::json(body);
        self.send(Method::POST, path, content_type, body).await
    }

    pub async fn post_empty(&self, path: &str) -> Answer {
        self.send(Method::POST, path, None, None).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Answer {
        let (content_type, body) = Self::json(body);
        self.send(Method::PUT, path, content_type, body).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Answer {
        let (content_type, body) = Self::json(body);
        self.send(Method::PATCH, path, content_type, body).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.send(Method::DELETE, path, None, None).await
    }

    /// A DELETE with a JSON body (a reason, say).
    pub async fn delete_with(&self, path: &str, body: &Value) -> Answer {
        let (content_type, body) = Self::json(body);
        self.send(Method::DELETE, path, content_type, body).await
    }

    /// Polls import job `id` until it is `done` or `failed` (failing the test after [`DEADLINE`]); returns the job.
    pub async fn wait_for_import(&self, id: i64) -> Value {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let job = self.get(&format!("/v1/imports/{id}")).await.expect(200);
            if job["state"] == "done" || job["state"] == "failed" {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "import #{id} did not end within {DEADLINE:?}: {job:#}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Posts raw bytes of `content_type` (a CSV or XLSX file).
    pub async fn upload(&self, path: &str, content_type: &str, bytes: Vec<u8>) -> Answer {
        self.send(Method::POST, path, Some(content_type), Some(bytes)).await
    }
}

/// `path?query` with each value percent-encoded.
pub fn with_query(path: &str, params: &[(&str, &str)]) -> String {
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    format!("{path}?{query}")
}
