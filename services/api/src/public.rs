//! The public unsubscribe page, `/u/{token}`: no API key, no cookies, reached from the link in every email and
//! from mail clients' one-click unsubscribe (RFC 8058).
//!
//! `GET` only shows a confirmation page with two buttons (mail scanners follow links, so a GET never changes
//! anything); `POST` unsubscribes at once: `List-Unsubscribe=One-Click` (what mail clients send) or `scope=all`
//! from every email, `scope=campaign` from the campaign of the email only. The token signs `d:<delivery id>`
//! (see `leadflow_shared::tokens`); a forged, altered or unknown token gets the same 404 page as a delivery
//! that no longer exists, so the page reveals nothing.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use deadpool_postgres::{GenericClient, Pool};
use serde_json::json;

use leadflow_scheduler::notify;
use leadflow_shared::domain::EmailAddress;
use leadflow_shared::suppression::{self, Reason};
use leadflow_shared::tokens::{Keyring, Purpose};

/// Tokens longer than this are not looked at.
const MAX_TOKEN_LEN: usize = 512;

/// What the public routes share.
#[derive(Clone)]
pub struct PublicState {
    pub pool: Pool,
    pub keyring: Keyring,
}

/// `GET` and `POST /u/{token}`.
pub fn routes(pool: Pool, keyring: Keyring) -> Router {
    Router::new()
        .route("/u/{token}", get(page).post(unsubscribe))
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .with_state(PublicState { pool, keyring })
}

/// From what an unsubscribe applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The campaign of the email only.
    Campaign,
    /// Every email.
    All,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Campaign => "campaign",
            Self::All => "all",
        }
    }
}

/// What a POST asked for, and how (`one-click` or `unsubscribe-page`, recorded as the suppression's source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub scope: Scope,
    pub source: &'static str,
}

/// Reads a POST body: `application/x-www-form-urlencoded` (`scope=campaign|all`, or RFC 8058's
/// `List-Unsubscribe=One-Click`) or `multipart/form-data` carrying `List-Unsubscribe=One-Click`. A body naming
/// no scope is the one-click unsubscribe from everything (the URL is only ever in the email's own headers and
/// page); an unknown scope is refused.
pub fn parse_request(body: &[u8]) -> Result<Request, String> {
    let text = String::from_utf8_lossy(body);
    let mut scope = None;
    for pair in text.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key.trim() == "scope" {
            scope = Some(match value.trim() {
                "campaign" => Scope::Campaign,
                "all" => Scope::All,
                other => {
                    let shown: String = other.chars().take(40).collect();
                    return Err(format!("unknown scope {shown:?}: expected campaign or all"));
                }
            });
        }
    }
    Ok(match scope {
        Some(scope) => Request {
            scope,
            source: "unsubscribe-page",
        },
        None => Request {
            scope: Scope::All,
            source: "one-click",
        },
    })
}

/// The delivery a token names, if it verifies.
pub fn delivery_of(keyring: &Keyring, token: &str) -> Option<i64> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let payload = keyring.verify(Purpose::Unsubscribe, token)?;
    payload.strip_prefix("d:")?.parse::<i64>().ok().filter(|id| *id > 0)
}

/// The email a token was in: who it went to and for which campaign.
#[derive(Debug, Clone)]
pub struct Target {
    pub delivery_id: i64,
    pub email: EmailAddress,
    pub campaign_id: i64,
    pub campaign: String,
    /// Whether the address is unsubscribed from everything already.
    pub suppressed_everywhere: bool,
    /// Whether the address is unsubscribed from this campaign already (or from everything).
    pub suppressed_here: bool,
}

/// Looks up the delivery, its lead's address and its campaign; `None` when it no longer exists.
pub async fn target(client: &impl GenericClient, delivery_id: i64) -> anyhow::Result<Option<Target>> {
    let Some(row) = client
        .query_opt(
            "SELECT l.email, c.id, c.name FROM deliveries d
               JOIN leads l ON l.id = d.lead_id
               JOIN campaigns c ON c.id = d.campaign_id
              WHERE d.id = $1",
            &[&delivery_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let raw: String = row.try_get(0)?;
    let Ok(email) = EmailAddress::parse(&raw) else {
        return Ok(None);
    };
    let campaign_id: i64 = row.try_get(1)?;
    let flags = client
        .query_one(
            "SELECT coalesce(bool_or(campaign_id IS NULL), false),
                    coalesce(bool_or(campaign_id IS NULL OR campaign_id = $2), false)
               FROM suppressions WHERE email_hash = $1",
            &[&suppression::email_hash(&email), &campaign_id],
        )
        .await?;
    Ok(Some(Target {
        delivery_id,
        email,
        campaign_id,
        campaign: row.try_get(2)?,
        suppressed_everywhere: flags.try_get(0)?,
        suppressed_here: flags.try_get(1)?,
    }))
}

/// What an unsubscribe did.
#[derive(Debug, Clone)]
pub struct Unsubscribed {
    pub target: Target,
    /// False when the address was unsubscribed in that scope already.
    pub new: bool,
    pub ended_enrollments: usize,
    pub cancelled_deliveries: u64,
}

/// Unsubscribes the address of `delivery_id` in one transaction: suppressed (reason `unsubscribed`), its open
/// follow-ups in scope cancelled with reason `unsubscribed`, an `unsubscribed` notification queued per ended
/// sequence. Idempotent. `None` when the delivery no longer exists.
pub async fn unsubscribe_delivery(
    client: &mut deadpool_postgres::Client,
    delivery_id: i64,
    request: Request,
) -> anyhow::Result<Option<Unsubscribed>> {
    let tx = client.transaction().await?;
    let Some(target) = target(&tx, delivery_id).await? else {
        return Ok(None);
    };
    let campaign_id = match request.scope {
        Scope::Campaign => Some(target.campaign_id),
        Scope::All => None,
    };
    let done = suppression::suppress(
        &tx,
        &target.email,
        Reason::Unsubscribed,
        request.source,
        campaign_id,
        None,
    )
    .await?;
    for id in &done.ended_enrollments {
        notify::enqueue(
            &tx,
            notify::About::Enrollment(*id),
            notify::Kind::Unsubscribed,
            json!({ "reason": "unsubscribed", "scope": request.scope.as_str(), "source": request.source }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Some(Unsubscribed {
        target,
        new: done.new,
        ended_enrollments: done.ended_enrollments.len(),
        cancelled_deliveries: done.cancelled_deliveries,
    }))
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A complete page around `body` (already escaped HTML).
fn html(status: StatusCode, title: &str, body: &str) -> Response {
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;line-height:1.5}}\
         button{{font-size:1rem;padding:.5rem 1rem;margin:.25rem 0;width:100%;cursor:pointer}}\
         form{{margin:0}}</style></head>\n<body>\n<h1>{title}</h1>\n{body}\n</body></html>\n",
        title = escape(title),
    );
    let mut response = (status, page).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"),
    );
    headers.insert("x-robots-tag", HeaderValue::from_static("noindex"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn not_found() -> Response {
    html(
        StatusCode::NOT_FOUND,
        "Link not valid",
        "<p>This unsubscribe link is not valid. Please use the link in the most recent email you received.</p>",
    )
}

fn unavailable() -> Response {
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        "Please try again",
        "<p>We could not process your request right now. Please try again in a few minutes.</p>",
    )
}

fn failed(what: &str, e: anyhow::Error) -> Response {
    tracing::error!(error = format!("{e:#}"), "{what}");
    unavailable()
}

fn counted(scope: Scope) {
    metrics::counter!("leadflow_api_unsubscribes_total", "scope" => scope.as_str()).increment(1);
}

/// `GET /u/{token}`: the confirmation page. Changes nothing.
async fn page(State(state): State<PublicState>, Path(token): Path<String>) -> Response {
    let Some(delivery_id) = delivery_of(&state.keyring, &token) else {
        return not_found();
    };
    let client = match state.pool.get().await {
        Ok(c) => c,
        Err(e) => return failed("PostgreSQL unreachable", e.into()),
    };
    let target = match target(&client, delivery_id).await {
        Ok(Some(t)) => t,
        Ok(None) => return not_found(),
        Err(e) => return failed("failed to look up an unsubscribe link", e),
    };
    let who = escape(&target.email.masked());
    let campaign = escape(&target.campaign);
    let body = if target.suppressed_everywhere {
        format!("<p>{who} is unsubscribed from all our emails. You will not hear from us again.</p>")
    } else {
        let here = if target.suppressed_here {
            format!("<p>{who} is unsubscribed from {campaign} already.</p>\n")
        } else {
            format!(
                "<p>Do you want to stop receiving these emails at {who}?</p>\n\
                 <form method=\"post\"><input type=\"hidden\" name=\"scope\" value=\"campaign\">\
                 <button type=\"submit\">Unsubscribe from {campaign}</button></form>\n"
            )
        };
        format!(
            "{here}<form method=\"post\"><input type=\"hidden\" name=\"scope\" value=\"all\">\
             <button type=\"submit\">Unsubscribe from all emails</button></form>"
        )
    };
    html(StatusCode::OK, "Unsubscribe", &body)
}

/// `POST /u/{token}`: unsubscribes at once.
async fn unsubscribe(State(state): State<PublicState>, Path(token): Path<String>, body: Bytes) -> Response {
    let Some(delivery_id) = delivery_of(&state.keyring, &token) else {
        return not_found();
    };
    let request = match parse_request(&body) {
        Ok(r) => r,
        Err(reason) => {
            return html(
                StatusCode::BAD_REQUEST,
                "Unsubscribe",
                &format!("<p>{}</p>", escape(&reason)),
            )
        }
    };
    let mut client = match state.pool.get().await {
        Ok(c) => c,
        Err(e) => return failed("PostgreSQL unreachable", e.into()),
    };
    let done = match unsubscribe_delivery(&mut client, delivery_id, request).await {
        Ok(Some(done)) => done,
        Ok(None) => return not_found(),
        Err(e) => return failed("failed to unsubscribe", e),
    };
    if done.new {
        counted(request.scope);
    }
    tracing::info!(
        email = %done.target.email.masked(),
        delivery.id = delivery_id,
        scope = request.scope.as_str(),
        source = request.source,
        new = done.new,
        ended_enrollments = done.ended_enrollments,
        cancelled = done.cancelled_deliveries,
        "unsubscribed"
    );
    let who = escape(&done.target.email.masked());
    let body = match request.scope {
        Scope::All => format!("<p>{who} is unsubscribed from all our emails. You will not hear from us again.</p>"),
        Scope::Campaign => format!("<p>{who} is unsubscribed from {}.</p>", escape(&done.target.campaign)),
    };
    html(StatusCode::OK, "You are unsubscribed", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_click_and_the_page_buttons_are_understood() {
        let one_click = parse_request(b"List-Unsubscribe=One-Click").unwrap();
        assert_eq!(one_click.scope, Scope::All);
        assert_eq!(one_click.source, "one-click");
        let multipart = parse_request(
            b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--x--\r\n",
        )
        .unwrap();
        assert_eq!(multipart.scope, Scope::All);
        assert_eq!(parse_request(b"scope=campaign").unwrap().scope, Scope::Campaign);
        let all = parse_request(b"scope=all").unwrap();
        assert_eq!((all.scope, all.source), (Scope::All, "unsubscribe-page"));
        assert!(parse_request(b"scope=<script>").unwrap_err().contains("unknown scope"));
    }

    #[test]
    fn only_a_signed_delivery_token_names_a_delivery() {
        let ring = Keyring::parse("k1:0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(delivery_of(&ring, &ring.sign(Purpose::Unsubscribe, "d:42")), Some(42));
        assert_eq!(delivery_of(&ring, &ring.sign(Purpose::Bounce, "d:42")), None);
        assert_eq!(delivery_of(&ring, &ring.sign(Purpose::Unsubscribe, "42")), None);
        assert_eq!(delivery_of(&ring, &ring.sign(Purpose::Unsubscribe, "d:-1")), None);
        assert_eq!(delivery_of(&ring, &"a".repeat(600)), None);
        assert_eq!(delivery_of(&ring, "k1.ZDo0Mg.AAAAAAAAAAAAAAAAAAAAAA"), None);
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape("<b>\"Tom\" & 'Jerry'</b>"),
            "&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;"
        );
    }
}
