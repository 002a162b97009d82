//! Instant lead notifications: a signed JSON POST to a campaign's `notify_url` when a lead is enrolled, sent an
//! email, bounces, converts or unsubscribes.
//!
//! Notifications are an outbox: [`enqueue`] writes a row in the transaction that records what happened (nothing
//! when the campaign has no `notify_url`), and [`run`] delivers due rows in the background, retrying with
//! exponential backoff. A slow or failing endpoint therefore never holds up enrolling, rendering or sending.
//! Every request carries `X-Leadflow-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, keyed
//! with `LEADFLOW_NOTIFY_SECRET`; receivers check it with [`verify`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use deadpool_postgres::GenericClient;
use futures_util::stream::{self, StreamExt};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use leadflow_shared::service::Context;

type HmacSha256 = Hmac<Sha256>;

/// Notifications claimed per pass.
pub const BATCH: usize = 50;
/// Requests in flight at once.
const CONCURRENCY: usize = 8;
/// The longest wait between two attempts, whatever the attempt count.
pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);
/// How much of an endpoint's answer is kept in `last_error`.
const ERROR_BODY_CHARS: usize = 200;

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Enrolled,
    EmailSent,
    Bounced,
    Converted,
    Unsubscribed,
    /// The lead's score crossed the hot threshold (see [`crate::scoring`]).
    BecameHot,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enrolled => "enrolled",
            Self::EmailSent => "email_sent",
            Self::Bounced => "bounced",
            Self::Converted => "converted",
            Self::Unsubscribed => "unsubscribed",
            Self::BecameHot => "lead_hot",
        }
    }

    /// The notification for a sequence ended with `reason`: `bounced` for a bounce, `unsubscribed` for an
    /// unsubscribe or a complaint; none for other reasons (a conversion has its own, with the order).
    pub fn for_reason(reason: &str) -> Option<Self> {
        match reason {
            "bounced" => Some(Self::Bounced),
            "unsubscribed" | "complained" => Some(Self::Unsubscribed),
            _ => None,
        }
    }
}

/// What a notification is about: a delivery (campaign, lead, step and variant) or an enrollment (campaign, lead
/// and variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum About {
    Delivery(i64),
    Enrollment(i64),
}

/// Queues a notification in the caller's transaction when the campaign has a `notify_url`; returns its row id.
///
/// The payload holds a unique `id`, `kind`, `occurred_at`, the `campaign` name, the `variant` and `step` when
/// known, the `lead` (its full email: the endpoint is the customer's own system), and the keys of `details` (an
/// object: the order of a conversion, the reason of an unsubscribe, ...).
pub async fn enqueue(
    client: &impl GenericClient,
    about: About,
    kind: Kind,
    details: Value,
) -> anyhow::Result<Option<i64>> {
    let row = match about {
        About::Delivery(id) => {
            client
                .query_opt(
                    "SELECT c.id, c.name, l.id, l.email, d.variant, d.step
                       FROM deliveries d
                       JOIN campaigns c ON c.id = d.campaign_id
                       JOIN leads l ON l.id = d.lead_id
                      WHERE d.id = $1 AND c.notify_url IS NOT NULL",
                    &[&id],
                )
                .await
        }
        About::Enrollment(id) => {
            client
                .query_opt(
                    "SELECT c.id, c.name, l.id, l.email, e.variant, NULL::smallint
                       FROM enrollments e
                       JOIN campaigns c ON c.id = e.campaign_id
                       JOIN leads l ON l.id = e.lead_id
                      WHERE e.id = $1 AND c.notify_url IS NOT NULL",
                    &[&id],
                )
                .await
        }
    }
    .context("failed to look up what a notification is about")?;
    let Some(row) = row else {
        return Ok(None);
    };
    let campaign_id: i64 = row.try_get(0)?;
    let lead_id: i64 = row.try_get(2)?;
    let payload = payload(
        kind,
        row.try_get(1)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        details,
    );
    let inserted = client
        .query_one(
            "INSERT INTO notifications (campaign_id, lead_id, kind, payload) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&campaign_id, &lead_id, &kind.as_str(), &payload],
        )
        .await
        .context("failed to queue a notification")?;
    metrics::counter!("leadflow_scheduler_notifications_total", "kind" => kind.as_str(), "outcome" => "queued")
        .increment(1);
    Ok(Some(inserted.try_get(0)?))
}

/// The JSON a notification carries.
fn payload(
    kind: Kind,
    campaign: String,
    email: String,
    variant: Option<String>,
    step: Option<i16>,
    details: Value,
) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), Value::from(uuid::Uuid::new_v4().to_string()));
    out.insert("kind".into(), Value::from(kind.as_str()));
    out.insert(
        "occurred_at".into(),
        Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    out.insert("campaign".into(), Value::from(campaign));
    if let Some(variant) = variant {
        out.insert("variant".into(), Value::from(variant));
    }
    if let Some(step) = step {
        out.insert("step".into(), Value::from(step));
    }
    let mut lead = Map::new();
    lead.insert("email".into(), Value::from(email));
    out.insert("lead".into(), Value::Object(lead));
    if let Value::Object(details) = details {
        for (key, value) in details {
            out.entry(key).or_insert(value);
        }
    }
    Value::Object(out)
}

/// Whether a permanent SMTP failure says the address does not exist: an enhanced status 5.1.x (except 5.1.7 and
/// 5.1.8, which are about the sender's address) or 5.2.1, or a 550/551/553 reply whose text says so. Policy
/// rejections (5.7.x) are the sender's problem, never a bounce of the lead.
pub fn is_hard_bounce(smtp_text: &str) -> bool {
    let lower = smtp_text.to_ascii_lowercase();
    let enhanced = lower
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|token| token.trim_matches('.'))
        .any(|token| {
            let parts: Vec<&str> = token.split('.').collect();
            let number = |p: &str| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit());
            if parts.len() != 3 || !parts.iter().all(|p| number(p)) || parts[0] != "5" {
                return false;
            }
            matches!((parts[1], parts[2]), ("1", detail) if detail != "7" && detail != "8")
                || (parts[1] == "2" && parts[2] == "1")
        });
    if enhanced {
        return true;
    }
    const BASIC: [&str; 3] = ["550", "551", "553"];
    const NO_SUCH_USER: [&str; 13] = [
        "no such user",
        "user unknown",
        "unknown user",
        "no such mailbox",
        "mailbox not found",
        "mailbox unavailable",
        "does not exist",
        "invalid recipient",
        "unknown recipient",
        "recipient not found",
        "no such recipient",
        "address unknown",
        "not a valid mailbox",
    ];
    let basic = lower
        .split(|c: char| !c.is_ascii_digit())
        .any(|token| BASIC.contains(&token));
    basic && NO_SUCH_USER.iter().any(|phrase| lower.contains(phrase))
}

/// The value of `X-Leadflow-Signature` for `body` sent at `timestamp` (unix seconds).
pub fn signature_header(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length: this never fails.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Checks an `X-Leadflow-Signature` header against the raw request body: a `v1` signature made with `secret`,
/// and a timestamp `t` within `tolerance` of now (so a captured request cannot be replayed later).
///
/// Receivers can copy this function; it needs the `hmac`, `sha2` and `hex` crates.
pub fn verify(secret: &str, header: &str, body: &[u8], tolerance: Duration) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    verify_at(secret, header, body, tolerance, now)
}

/// [`verify`] at a given time (unix seconds).
pub fn verify_at(secret: &str, header: &str, body: &[u8], tolerance: Duration, now: i64) -> bool {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.trim().parse::<i64>().ok(),
            Some(("v1", value)) => signatures.push(value.trim()),
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return false;
    };
    if now.abs_diff(timestamp) > tolerance.as_secs() {
        return false;
    }
    signatures.iter().any(|signature| match hex::decode(signature) {
        // `verify_slice` compares in constant time.
        Ok(bytes) => mac(secret, timestamp, body).verify_slice(&bytes).is_ok(),
        Err(_) => false,
    })
}

/// The wait after the `attempts`-th failed attempt: `base * 2^(attempts - 1)`, at most [`MAX_BACKOFF`].
pub fn backoff(base: Duration, attempts: i32) -> Duration {
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    base.checked_mul(1u32 << exponent)
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF)
}

/// Delivers due notifications until `shutdown`; a full batch is followed at once by the next one. A batch in
/// flight when shutdown comes is finished (each request is bounded by `LEADFLOW_NOTIFY_TIMEOUT`).
pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http = client(&ctx)?;
    let tick = ctx.config.scheduler.tick;
    loop {
        let pause = match run_once(&ctx, &http).await {
            Ok(done) if done.claimed >= BATCH => Duration::ZERO,
            Ok(_) => tick,
            Err(e) => {
                // The database is away: nothing is lost, the rows stay due.
                tracing::warn!(error = format!("{e:#}"), "notification pass failed");
                tick.max(Duration::from_secs(1))
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The HTTP client notifications go out with.
pub fn client(ctx: &Context) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(ctx.config.notify.timeout)
        .user_agent(concat!("leadflow/", env!("CARGO_PKG_VERSION")))
        // A receiver answers; it does not send us elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("failed to build the notification HTTP client")
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub claimed: usize,
    pub delivered: usize,
    pub retrying: usize,
    pub failed: usize,
}

/// One claimed notification.
struct Claimed {
    id: i64,
    kind: String,
    payload: Value,
    attempts: i32,
    url: Option<String>,
}

/// What one attempt came to.
enum Attempt {
    Delivered,
    /// Worth trying again (until the attempts run out).
    Failed(String),
    /// Never worth trying again as things are configured.
    Fatal(String),
}

/// Claims due notifications (`FOR UPDATE SKIP LOCKED`, a batch), posts them, and records each outcome.
///
/// A claim pushes `next_attempt_at` past the time the batch can take, so another replica skips the rows
/// meanwhile, and a process that dies mid-batch leaves them due again later (a receiver may then see a
/// notification twice: it deduplicates on `X-Leadflow-Notification`).
pub async fn run_once(ctx: &Context, http: &reqwest::Client) -> anyhow::Result<Pass> {
    let config = &ctx.config.notify;
    let lease = config
        .timeout
        .saturating_mul((BATCH / CONCURRENCY) as u32 + 2)
        .saturating_add(Duration::from_secs(30))
        .min(MAX_BACKOFF);
    let claimed: Vec<Claimed> = {
        let client = ctx.pool.get().await.context("failed to get a database connection")?;
        client
            .query(
                "UPDATE notifications n SET next_attempt_at = now() + make_interval(secs => $2)
                   FROM campaigns c
                  WHERE c.id = n.campaign_id
                    AND n.id IN (SELECT id FROM notifications
                                  WHERE state = 'pending' AND next_attempt_at <= now()
                                  ORDER BY next_attempt_at LIMIT $1
                                  FOR UPDATE SKIP LOCKED)
                 RETURNING n.id, n.kind, n.payload, n.attempts, c.notify_url",
                &[&(BATCH as i64), &lease.as_secs_f64()],
            )
            .await
            .context("failed to claim due notifications")?
            .iter()
            .map(|r| {
                Ok(Claimed {
                    id: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    payload: r.try_get(2)?,
                    attempts: r.try_get(3)?,
                    url: r.try_get(4)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .context("failed to read a notification row")?
    };
    let mut pass = Pass {
        claimed: claimed.len(),
        ..Pass::default()
    };
    if claimed.is_empty() {
        return Ok(pass);
    }
    let secret = config.secret.as_ref();
    let outcomes: Vec<(Claimed, Attempt)> = stream::iter(claimed)
        .map(|n| async move {
            let attempt = attempt(http, secret, &n).await;
            (n, attempt)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;

    let client = ctx.pool.get().await.context("failed to get a database connection")?;
    for (n, attempt) in outcomes {
        let kind = n.kind.as_str();
        match attempt {
            Attempt::Delivered => {
                client
                    .execute(
                        "UPDATE notifications SET state = 'delivered', attempts = attempts + 1, delivered_at = now(),
                                last_error = NULL
                          WHERE id = $1 AND state = 'pending'",
                        &[&n.id],
                    )
                    .await
                    .with_context(|| format!("failed to record notification {} as delivered", n.id))?;
                pass.delivered += 1;
                outcome(kind, "delivered");
            }
            Attempt::Failed(error) => {
                let attempts = n.attempts.saturating_add(1);
                let give_up = attempts >= config.max_attempts;
                let wait = backoff(config.retry_base, attempts);
                client
                    .execute(
                        "UPDATE notifications
                            SET attempts = $2, last_error = $3, state = CASE WHEN $4 THEN 'failed' ELSE 'pending' END,
                                next_attempt_at = now() + make_interval(secs => $5)
                          WHERE id = $1 AND state = 'pending'",
                        &[&n.id, &attempts, &error, &give_up, &wait.as_secs_f64()],
                    )
                    .await
                    .with_context(|| format!("failed to record a failed attempt of notification {}", n.id))?;
                if give_up {
                    pass.failed += 1;
                    outcome(kind, "failed");
                    tracing::warn!(notification.id = n.id, attempts, error, "notification given up");
                } else {
                    pass.retrying += 1;
                    outcome(kind, "retrying");
                    tracing::debug!(
                        notification.id = n.id,
                        attempts,
                        ?wait,
                        error,
                        "notification to be retried"
                    );
                }
            }
            Attempt::Fatal(error) => {
                client
                    .execute(
                        "UPDATE notifications SET state = 'failed', last_error = $2 WHERE id = $1 AND state = 'pending'",
                        &[&n.id, &error],
                    )
                    .await
                    .with_context(|| format!("failed to record notification {} as failed", n.id))?;
                pass.failed += 1;
                outcome(kind, "failed");
                tracing::warn!(notification.id = n.id, error, "notification failed");
            }
        }
    }
    Ok(pass)
}

fn outcome(kind: &str, outcome: &'static str) {
    metrics::counter!("leadflow_scheduler_notifications_total", "kind" => kind.to_string(), "outcome" => outcome)
        .increment(1);
}

/// One POST of one notification.
async fn attempt(http: &reqwest::Client, secret: Option<&SecretString>, n: &Claimed) -> Attempt {
    let Some(secret) = secret else {
        return Attempt::Fatal("LEADFLOW_NOTIFY_SECRET is not set: notifications are never sent unsigned".into());
    };
    let Some(url) = n.url.as_deref() else {
        return Attempt::Fatal("the campaign has no notify_url any more".into());
    };
    let body = match serde_json::to_vec(&n.payload) {
        Ok(body) => body,
        Err(e) => return Attempt::Fatal(format!("the payload cannot be serialised: {e}")),
    };
    let id = n
        .payload
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| n.id.to_string());
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let signature = signature_header(secret.expose_secret(), timestamp, &body);
    let sent = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Leadflow-Event", n.kind.as_str())
        .header("X-Leadflow-Notification", id)
        .header("X-Leadflow-Signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        // The URL may carry a token of the receiver's: it stays out of the error text.
        Err(e) => Attempt::Failed(format!("request failed: {}", one_line(&e.without_url().to_string()))),
        Ok(response) if response.status().is_success() => Attempt::Delivered,
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            let text: String = one_line(&text).chars().take(ERROR_BODY_CHARS).collect();
            Attempt::Failed(if text.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {text}")
            })
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;
    const MINUTES_5: Duration = Duration::from_secs(300);

    #[test]
    fn a_signature_verifies_with_its_secret_only() {
        let body = br#"{"kind":"enrolled"}"#;
        let header = signature_header("s3cret", NOW, body);
        assert!(header.starts_with(&format!("t={NOW},v1=")), "{header}");
        assert!(verify_at("s3cret", &header, body, MINUTES_5, NOW + 10));
        assert!(!verify_at("other", &header, body, MINUTES_5, NOW + 10));
        assert!(!verify_at(
            "s3cret",
            &header,
            br#"{"kind":"converted"}"#,
            MINUTES_5,
            NOW
        ));
    }

    #[test]
    fn a_stale_or_malformed_signature_fails() {
        let body = b"{}";
        let header = signature_header("k", NOW, body);
        assert!(!verify_at("k", &header, body, MINUTES_5, NOW + 301));
        assert!(!verify_at("k", &header, body, MINUTES_5, NOW - 301));
        assert!(!verify_at("k", "", body, MINUTES_5, NOW));
        assert!(!verify_at("k", &format!("t={NOW},v1=zz"), body, MINUTES_5, NOW));
        assert!(!verify_at("k", &format!("t={NOW}"), body, MINUTES_5, NOW));
        // The signature of another timestamp does not verify with this one.
        let moved = header.replace(&NOW.to_string(), &(NOW + 1).to_string());
        assert!(!verify_at("k", &moved, body, MINUTES_5, NOW));
        // Several v1 values (a key being rotated): one that matches is enough.
        let v1 = header
            .split_once(",v1=")
            .map(|(_, s)| s.to_string())
            .unwrap_or_default();
        let rotated = format!("t={NOW}, v1={}, v1={v1}", "ab".repeat(32));
        assert!(verify_at("k", &rotated, body, MINUTES_5, NOW));
        assert!(verify("k", &signature_header("k", now(), body), body, MINUTES_5));
    }

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: Python's hmac.new(b"s3cret", b'1700000000.{"kind":"enrolled"}', sha256).
        assert_eq!(
            signature_header("s3cret", NOW, br#"{"kind":"enrolled"}"#),
            "t=1700000000,v1=54726e3d93761a9fe669e483299464cb76ab45079772c9e36b47e841b3803332"
        );
    }

    #[test]
    fn backoff_doubles_from_the_base_and_is_capped() {
        let base = Duration::from_secs(30);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 2), Duration::from_secs(60));
        assert_eq!(backoff(base, 4), Duration::from_secs(240));
        assert_eq!(backoff(base, 0), base);
        assert_eq!(backoff(base, 60), MAX_BACKOFF);
        assert_eq!(backoff(Duration::from_millis(200), 3), Duration::from_millis(800));
    }

    #[test]
    fn no_such_user_replies_are_hard_bounces() {
        for text in [
            "permanent error (550): 5.1.1 <ann@example.com>: Recipient address rejected: User unknown",
            "permanent error (550): 5.1.10 recipient address rejected",
            "permanent error (552): 5.2.1 mailbox disabled",
            "permanent error (550): no such user here",
            "smtp: permanent error (553): sorry, that mailbox does not exist",
        ] {
            assert!(is_hard_bounce(text), "{text}");
        }
        for text in [
            "permanent error (550): 5.7.1 message rejected as spam",
            "permanent error (554): transaction failed",
            "permanent error (552): 5.2.2 mailbox full",
            "permanent error (553): 5.1.8 bad sender address",
            "permanent error (550): 5.7.26 unauthenticated mail is prohibited",
            "transient error (450): mailbox unavailable",
            "message: invalid address 10.5.1.1",
        ] {
            assert!(!is_hard_bounce(text), "{text}");
        }
    }

    #[test]
    fn reasons_map_to_notification_kinds() {
        assert_eq!(Kind::for_reason("bounced"), Some(Kind::Bounced));
        assert_eq!(Kind::for_reason("complained"), Some(Kind::Unsubscribed));
        assert_eq!(Kind::for_reason("unsubscribed"), Some(Kind::Unsubscribed));
        assert_eq!(Kind::for_reason("converted"), None);
        assert_eq!(Kind::EmailSent.as_str(), "email_sent");
    }

    #[test]
    fn the_payload_names_campaign_lead_step_and_details() {
        let p = payload(
            Kind::Converted,
            "cart-recovery".into(),
            "ann@example.com".into(),
            Some("B".into()),
            Some(2),
            serde_json::json!({"order": {"amount": 89.9, "currency": "EUR"}, "kind": "ignored"}),
        );
        assert_eq!(p["kind"], "converted");
        assert_eq!(p["campaign"], "cart-recovery");
        assert_eq!(p["lead"]["email"], "ann@example.com");
        assert_eq!(p["variant"], "B");
        assert_eq!(p["step"], 2);
        assert_eq!(p["order"]["currency"], "EUR");
        assert_eq!(p["id"].as_str().map(str::len), Some(36));
        assert!(p["occurred_at"].as_str().is_some_and(|t| t.ends_with('Z')));
        let other = payload(Kind::Enrolled, "c".into(), "e".into(), None, None, Value::Null);
        assert_ne!(other["id"], p["id"]);
        assert!(other.get("step").is_none());
    }
}
