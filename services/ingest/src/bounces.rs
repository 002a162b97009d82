//! Inbound bounces, complaints and mailto unsubscribes: `POST /v1/bounces` (a raw `message/rfc822` report) and the
//! `<ns>.ingest.bounces` queue an MTA pipe publishes raw reports to.
//!
//! A report only acts once a signed token it carries verifies: the VERP return path `bounces+<token>@<domain>`
//! (where the report was sent, the envelope sender the MTA names, an abuse report's `Original-Mail-From`, the
//! included original's `Return-Path`), the unsubscribe token of a mailto request, or the unsubscribe token in the
//! included original's `List-Unsubscribe` when its `X-Leadflow-Delivery` names the same delivery. A forged or
//! altered report is rejected and suppresses no one. Every report, whatever its outcome, is kept in
//! `inbound_reports` with its raw bytes.
//!
//! What a verified report does: a hard bounce (5.1.x, 5.2.1) suppresses the address (`bounced`, source `dsn`),
//! ends its sequences and marks the bounced delivery `failed`; a soft one counts toward the soft-bounce rule;
//! a policy rejection (5.7.x) is recorded and counted, never held against the recipient; `delayed` and
//! `delivered` change nothing; an abuse report suppresses as `complained`; a mailto request as `unsubscribed`.

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use deadpool_postgres::GenericClient;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use leadflow_scheduler::notify::{self, About, Kind};
use leadflow_shared::amqp::{self, Outcome};
use leadflow_shared::domain::{mask_email, EmailAddress};
use leadflow_shared::dsn::{self, Class, Report, ReportKind};
use leadflow_shared::http::Problem;
use leadflow_shared::service::Context;
use leadflow_shared::settings;
use leadflow_shared::suppression::{self, Reason, Suppressed};
use leadflow_shared::tokens::Purpose;
use leadflow_shared::topology::WorkQueue;

/// The content types `POST /v1/bounces` takes: one raw message.
pub const CONTENT_TYPES: [&str; 2] = ["message/rfc822", "message/global"];
/// The header (HTTP) or message header (AMQP) an MTA pipe may set to the report's envelope recipient, when the
/// message itself does not carry it in `Delivered-To` / `X-Original-To`.
pub const ENVELOPE_TO_HEADER: &str = "x-leadflow-envelope-to";
/// The largest report accepted over HTTP (a DSN may include the whole original message).
pub const MAX_REPORT_BYTES: usize = 4 * 1024 * 1024;

/// Where a report came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Http,
    Amqp,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Amqp => "amqp",
        }
    }
}

/// What handling a report did (it was stored in `inbound_reports` either way).
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    /// The `inbound_reports` row.
    pub report_id: i64,
    pub kind: &'static str,
    /// `applied` (something was recorded or changed) or `ignored` (nothing to do).
    pub outcome: &'static str,
    /// hard, soft, policy, delay, complaint, feedback, unsubscribe.
    pub class: &'static str,
    pub delivery_id: Option<i64>,
    pub status: Option<String>,
    /// Whether the address was newly suppressed.
    pub suppressed: bool,
    pub cancelled_deliveries: u64,
    pub detail: String,
}

impl Handled {
    fn to_json(&self) -> Value {
        json!({
            "report": self.report_id,
            "kind": self.kind,
            "outcome": self.outcome,
            "class": self.class,
            "delivery": self.delivery_id,
            "status": self.status,
            "suppressed": self.suppressed,
            "cancelled_deliveries": self.cancelled_deliveries,
            "detail": self.detail,
        })
    }
}

/// Why a report was not handled.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Unparseable or unverifiable: kept in `inbound_reports` as `rejected` (row id), answered 400 / dead-lettered.
    #[error("{reason}")]
    Rejected { report_id: i64, reason: String },
    /// The database failed: nothing was stored; the sender retries.
    #[error("the report could not be stored: {0:#}")]
    Unavailable(anyhow::Error),
}

pub fn routes(ctx: &Context) -> Router {
    Router::new()
        .route("/v1/bounces", post(post_bounce))
        .layer(DefaultBodyLimit::max(
            ctx.config.http.max_body_bytes.max(MAX_REPORT_BYTES),
        ))
        .with_state(ctx.clone())
}

async fn post_bounce(State(ctx): State<Context>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !CONTENT_TYPES.contains(&content_type.as_str()) {
        return Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!("content type {content_type:?} is not accepted: post the raw report as message/rfc822"),
        )
        .into_response();
    }
    let envelope_to = headers.get(ENVELOPE_TO_HEADER).and_then(|v| v.to_str().ok());
    match handle_report(&ctx, &body, envelope_to, Via::Http).await {
        Ok(handled) => (StatusCode::ACCEPTED, Json(handled.to_json())).into_response(),
        Err(Refused::Rejected { report_id, reason }) => Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-report",
            format!("{reason} (kept as inbound report {report_id})"),
        )
        .into_response(),
        Err(Refused::Unavailable(e)) => {
            tracing::error!(error = format!("{e:#}"), "failed to store an inbound report");
            Problem::unavailable("the report could not be stored; retry later").into_response()
        }
    }
}

/// Consumes raw reports from `<ns>.ingest.bounces` until shutdown.
pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handler_ctx = ctx.clone();
    amqp::consume(
        &ctx.amqp,
        &ctx.publisher,
        WorkQueue::IngestBounces,
        ctx.config.amqp.prefetch,
        shutdown,
        move |delivery| {
            let ctx = handler_ctx.clone();
            async move {
                let outcome = consume_one(&ctx, &delivery).await;
                (delivery, outcome)
            }
        },
    )
    .await
}

/// One published report: acked once stored and applied, dead-lettered (with the reason) when rejected.
pub async fn consume_one(ctx: &Context, delivery: &Delivery) -> Outcome {
    let envelope_to = delivery.properties.headers().as_ref().and_then(|headers| {
        headers
            .inner()
            .iter()
            .find(|(k, _)| k.as_str().eq_ignore_ascii_case(ENVELOPE_TO_HEADER))
            .and_then(|(_, v)| match v {
                AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
                _ => None,
            })
    });
    match handle_report(ctx, &delivery.data, envelope_to.as_deref(), Via::Amqp).await {
        Ok(_) => Outcome::Ack,
        Err(Refused::Rejected { report_id, reason }) => {
            Outcome::DeadLetter(format!("{reason} (kept as inbound report {report_id})"))
        }
        Err(Refused::Unavailable(e)) => Outcome::Retry(e),
    }
}

/// Parses, verifies and applies one raw report, and keeps it in `inbound_reports`.
pub async fn handle_report(ctx: &Context, raw: &[u8], envelope_to: Option<&str>, via: Via) -> Result<Handled, Refused> {
    let started = Instant::now();
    let verified = dsn::parse_report(raw)
        .map_err(|e| ("unknown", e.to_string()))
        .and_then(|report| match verify(ctx, &report, envelope_to) {
            Ok(delivery_id) => Ok((report, delivery_id)),
            Err(reason) => Err((report.kind.as_str(), reason)),
        });
    match verified {
        Ok((report, delivery_id)) => {
            let handled = apply(ctx, &report, delivery_id, raw, via)
                .await
                .map_err(Refused::Unavailable)?;
            metrics::histogram!("leadflow_ingest_bounce_seconds").record(started.elapsed().as_secs_f64());
            counted(handled.class, handled.outcome);
            tracing::info!(
                report.id = handled.report_id,
                delivery.id = delivery_id,
                via = via.as_str(),
                kind = handled.kind,
                class = handled.class,
                outcome = handled.outcome,
                detail = %handled.detail,
                "inbound report handled"
            );
            Ok(handled)
        }
        Err((kind, reason)) => {
            let client = ctx
                .pool
                .get()
                .await
                .map_err(|e| Refused::Unavailable(anyhow::Error::new(e)))?;
            let report_id = store(&client, via, kind, "rejected", &reason, raw)
                .await
                .map_err(Refused::Unavailable)?;
            counted("unknown", "rejected");
            tracing::warn!(report.id = report_id, via = via.as_str(), kind, reason = %reason, "inbound report rejected");
            Err(Refused::Rejected { report_id, reason })
        }
    }
}

/// The delivery a report is about, from the first token that verifies; an error says why none does.
fn verify(ctx: &Context, report: &Report, envelope_to: Option<&str>) -> Result<i64, String> {
    let keyring = &ctx.config.mail.keyring;
    let claimed = report.original.as_ref().and_then(|o| o.delivery.as_deref());
    let claimed_id = claimed.and_then(|c| c.parse::<i64>().ok());
    if claimed.is_some() && claimed_id.is_none() {
        return Err("the included original message has an X-Leadflow-Delivery that is not a delivery id".into());
    }
    let unsubscribe_id = |token: &str| {
        keyring
            .verify(Purpose::Unsubscribe, token)
            .and_then(|payload| payload.strip_prefix("d:").and_then(|id| id.parse::<i64>().ok()))
    };

    let mut ids: Vec<i64> = Vec::new();
    let mut refused = 0usize;
    if report.kind == ReportKind::Unsubscribe {
        for token in report.unsubscribe_token.iter() {
            match unsubscribe_id(token) {
                Some(id) => ids.push(id),
                None => refused += 1,
            }
        }
        return match ids.first() {
            Some(id) => Ok(*id),
            None => Err(format!(
                "the unsubscribe request's token does not verify ({refused} refused): it was not signed by leadflow \
                 or was altered"
            )),
        };
    }

    let mut candidates: Vec<String> = envelope_to
        .and_then(dsn::verp_token)
        .map(str::to_string)
        .into_iter()
        .collect();
    for token in report.bounce_tokens() {
        if !candidates.contains(&token) {
            candidates.push(token);
        }
    }
    for token in &candidates {
        match keyring
            .verify(Purpose::Bounce, token)
            .and_then(|payload| payload.parse::<i64>().ok())
        {
            Some(id) => ids.push(id),
            None => refused += 1,
        }
    }
    // Without a return path, the original's List-Unsubscribe token counts when the original names the same
    // delivery in X-Leadflow-Delivery.
    if ids.is_empty() {
        for token in report.unsubscribe_tokens() {
            match unsubscribe_id(&token) {
                Some(id) if Some(id) == claimed_id => ids.push(id),
                _ => refused += 1,
            }
        }
    }
    ids.dedup();
    let Some(&id) = ids.first() else {
        return Err(if refused == 0 {
            "the report carries no VERP token (bounces+<token>@...): it cannot be tied to a delivery".into()
        } else {
            format!("no token in the report verifies ({refused} refused): it was not signed by leadflow or was altered")
        });
    };
    if ids.iter().any(|other| *other != id) {
        return Err("the report's tokens name different deliveries".into());
    }
    if let Some(claimed) = claimed_id {
        if claimed != id {
            return Err(format!(
                "the included original message is delivery {claimed}, the token names delivery {id}"
            ));
        }
    }
    Ok(id)
}

/// The delivery a verified report is about.
struct Target {
    delivery_id: i64,
    state: String,
    email: EmailAddress,
}

async fn target(client: &impl GenericClient, delivery_id: i64) -> anyhow::Result<Option<Target>> {
    let row = client
        .query_opt(
            "SELECT d.state, l.email FROM deliveries d JOIN leads l ON l.id = d.lead_id WHERE d.id = $1",
            &[&delivery_id],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let email: String = row.try_get(1)?;
    let email = EmailAddress::parse(&email).map_err(|e| anyhow::anyhow!("delivery {delivery_id}: {e}"))?;
    Ok(Some(Target {
        delivery_id,
        state: row.try_get(0)?,
        email,
    }))
}

/// Applies a verified report and stores it, in one transaction.
async fn apply(ctx: &Context, report: &Report, delivery_id: i64, raw: &[u8], via: Via) -> anyhow::Result<Handled> {
    let mut client = ctx.pool.get().await?;
    let tx = client.transaction().await?;
    let mut handled = Handled {
        report_id: 0,
        kind: report.kind.as_str(),
        outcome: "ignored",
        class: "unknown",
        delivery_id: Some(delivery_id),
        status: None,
        suppressed: false,
        cancelled_deliveries: 0,
        detail: String::new(),
    };
    match target(&tx, delivery_id).await? {
        None => {
            handled.detail = format!("delivery {delivery_id} no longer exists (its lead may have been erased)");
        }
        Some(target) => match report.kind {
            ReportKind::Dsn => apply_dsn(&tx, report, &target, &mut handled).await?,
            ReportKind::Arf => apply_arf(&tx, report, &target, &mut handled).await?,
            ReportKind::Unsubscribe => {
                handled.class = "unsubscribe";
                let done = suppression::suppress(
                    &tx,
                    &target.email,
                    Reason::Unsubscribed,
                    "mailto",
                    None,
                    Some(&format!("mailto unsubscribe for delivery {delivery_id}")),
                )
                .await?;
                notify_ended(
                    &tx,
                    &done,
                    delivery_id,
                    Kind::Unsubscribed,
                    json!({ "reason": "unsubscribed", "scope": "all", "source": "mailto" }),
                )
                .await?;
                handled.outcome = "applied";
                handled.detail = format!("{} unsubscribed from every campaign", target.email.masked());
                record(&mut handled, &done);
            }
        },
    }
    handled.report_id = store(&tx, via, handled.kind, handled.outcome, &handled.detail, raw).await?;
    tx.commit().await?;
    Ok(handled)
}

async fn apply_dsn(
    tx: &impl GenericClient,
    report: &Report,
    target: &Target,
    handled: &mut Handled,
) -> anyhow::Result<()> {
    let email = target.email.as_str();
    let blocks = report.recipients_for(email);
    let Some(block) = blocks.iter().max_by_key(|b| b.class()) else {
        let named: Vec<String> = report
            .recipients
            .iter()
            .filter_map(|r| r.final_recipient.as_deref().or(r.original_recipient.as_deref()))
            .map(mask_email)
            .collect();
        handled.class = "other-recipient";
        handled.detail = format!(
            "the report is about {}, not the delivery's recipient {}",
            if named.is_empty() {
                "no named recipient".to_string()
            } else {
                named.join(", ")
            },
            target.email.masked()
        );
        return Ok(());
    };
    let class = block.class();
    let status = block.status.clone();
    let status_text = status.clone().unwrap_or_else(|| "no status".into());
    let diagnostic: String = block
        .diagnostic
        .as_deref()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    let heuristic = if report.heuristic {
        " (read from a plain-text bounce)"
    } else {
        ""
    };
    handled.status = status.clone();
    match class {
        Class::Ignore => {
            handled.class = "delay";
            handled.detail = format!(
                "action {} ({status_text}): not a bounce{heuristic}",
                block.action.as_str()
            );
        }
        Class::Policy => {
            handled.class = "policy";
            handled.outcome = "applied";
            handled.detail = format!(
                "policy rejection {status_text}: recorded, the recipient is not suppressed{heuristic}: {diagnostic}"
            );
            metrics::counter!("leadflow_ingest_policy_bounces_total").increment(1);
            tracing::warn!(
                delivery.id = target.delivery_id,
                status = %status_text,
                "a receiving server rejected a follow-up for policy reasons (reputation, authentication, content)"
            );
        }
        Class::Soft => {
            handled.class = "soft";
            handled.outcome = "applied";
            let (limit, window) = settings::soft_bounce_rule(tx).await?;
            let code = status.clone().unwrap_or_else(|| "dsn".into());
            let done =
                suppression::record_soft_bounce(tx, &target.email, Some(target.delivery_id), &code, limit, window)
                    .await?;
            handled.detail = format!("soft bounce {status_text} counted toward the soft-bounce rule{heuristic}");
            if let Some(done) = done {
                notify_ended(
                    tx,
                    &done,
                    target.delivery_id,
                    Kind::Bounced,
                    json!({ "reason": "bounced", "source": "soft-bounces", "status": status }),
                )
                .await?;
                handled.detail = format!(
                    "soft bounce {status_text}: {limit} soft bounces reached, {} suppressed as bounced{heuristic}",
                    target.email.masked()
                );
                record(handled, &done);
            }
        }
        Class::Hard => {
            handled.class = "hard";
            handled.outcome = "applied";
            let note = format!("dsn {status_text}: {diagnostic}");
            let done = suppression::suppress(tx, &target.email, Reason::Bounced, "dsn", None, Some(&note)).await?;
            // The follow-up that bounced counts as bounced, not sent.
            tx.execute(
                "UPDATE deliveries SET state = 'failed', reason = $2, updated_at = now()
                  WHERE id = $1 AND state IN ('sent', 'uncertain')",
                &[&target.delivery_id, &format!("bounced: {status_text} (dsn)")],
            )
            .await?;
            notify_ended(
                tx,
                &done,
                target.delivery_id,
                Kind::Bounced,
                json!({ "reason": "bounced", "source": "dsn", "status": status }),
            )
            .await?;
            handled.detail = format!(
                "hard bounce {status_text}: {} suppressed as bounced{heuristic}",
                target.email.masked()
            );
            if target.state != "sent" {
                handled
                    .detail
                    .push_str(&format!(" (the delivery was {})", target.state));
            }
            record(handled, &done);
        }
    }
    Ok(())
}

async fn apply_arf(
    tx: &impl GenericClient,
    report: &Report,
    target: &Target,
    handled: &mut Handled,
) -> anyhow::Result<()> {
    let feedback_type = report
        .feedback
        .as_ref()
        .and_then(|f| f.feedback_type.clone())
        .unwrap_or_else(|| "none".into());
    if !report.feedback.as_ref().is_some_and(|f| f.is_complaint()) {
        handled.class = "feedback";
        handled.detail = format!("feedback type {feedback_type:?} is not a complaint");
        return Ok(());
    }
    handled.class = "complaint";
    handled.outcome = "applied";
    let note = format!(
        "feedback report ({feedback_type}) about delivery {}",
        target.delivery_id
    );
    let done = suppression::suppress(tx, &target.email, Reason::Complained, "arf", None, Some(&note)).await?;
    notify_ended(
        tx,
        &done,
        target.delivery_id,
        Kind::for_reason("complained").unwrap_or(Kind::Unsubscribed),
        json!({ "reason": "complained", "source": "arf", "feedback_type": feedback_type }),
    )
    .await?;
    handled.detail = format!(
        "complaint ({feedback_type}): {} suppressed as complained",
        target.email.masked()
    );
    record(handled, &done);
    Ok(())
}

fn record(handled: &mut Handled, done: &Suppressed) {
    handled.suppressed = done.new;
    handled.cancelled_deliveries = done.cancelled_deliveries;
    if !done.new {
        handled.detail.push_str(" (already suppressed)");
    }
}

/// Tells the campaigns' notify URLs: one notification per ended sequence, or one about the delivery when the
/// address is newly suppressed and no sequence was still running.
async fn notify_ended(
    tx: &impl GenericClient,
    done: &Suppressed,
    delivery_id: i64,
    kind: Kind,
    details: Value,
) -> anyhow::Result<()> {
    for id in &done.ended_enrollments {
        notify::enqueue(tx, About::Enrollment(*id), kind, details.clone()).await?;
    }
    if done.ended_enrollments.is_empty() && done.new {
        notify::enqueue(tx, About::Delivery(delivery_id), kind, details).await?;
    }
    Ok(())
}

/// Keeps a report in `inbound_reports`; returns its id.
async fn store(
    client: &impl GenericClient,
    via: Via,
    kind: &str,
    outcome: &str,
    detail: &str,
    raw: &[u8],
) -> anyhow::Result<i64> {
    let detail: String = detail.chars().take(2000).collect();
    let row = client
        .query_one(
            "INSERT INTO inbound_reports (received_via, kind, outcome, detail, raw) VALUES ($1, $2, $3, $4, $5)
             RETURNING id",
            &[&via.as_str(), &kind, &outcome, &detail, &raw],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// `leadflow_ingest_bounces_total{kind, outcome}`: kind is hard, soft, policy, delay, complaint, feedback,
/// unsubscribe, other-recipient or unknown (rejected before it was classified).
fn counted(kind: &'static str, outcome: &'static str) {
    metrics::counter!("leadflow_ingest_bounces_total", "kind" => kind, "outcome" => outcome).increment(1);
}
