//! The sender's consumer: rendered deliveries are claimed, sent and their outcome recorded.
//!
//! Each delivery is claimed in its own committed statement before any SMTP traffic (`rendered` -> `sending`), so a
//! redelivered message never sends twice: a delivery that is not `rendered` any more is skipped. The outcome is
//! written only over `sending`; a crash between the relay's acceptance and that write leaves the row `sending`,
//! which the scheduler turns into `uncertain` (counted, never resent).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::stream::{self, StreamExt};
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;

use leadflow_scheduler::notify;
use leadflow_shared::amqp::{self, Outcome};
use leadflow_shared::domain::mask_email;
use leadflow_shared::messages::WorkMessage;
use leadflow_shared::service::Context;
use leadflow_shared::topology::WorkQueue;

use crate::message::{self, RenderedMessage, Sender};
use crate::metrics::{self, EmailOutcome};
use crate::transport::{SendError, Transport};

/// The longest wait before a retry, whatever the attempt count.
pub const MAX_BACKOFF: Duration = Duration::from_secs(7 * 24 * 3600);

/// What one batch did, by delivery id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Accepted by the relay (or written to the outbox).
    pub sent: Vec<i64>,
    /// Failed for good, with the reason recorded on the delivery.
    pub failed: Vec<(i64, String)>,
    /// A transient failure: due again after the backoff, with the reason recorded.
    pub retrying: Vec<(i64, String)>,
    /// The enrollment ended or the lead is suppressed: cancelled without SMTP, with the reason.
    pub cancelled: Vec<(i64, String)>,
    /// Not `rendered` (already claimed, sent or cancelled) or gone: nothing done.
    pub skipped: Vec<i64>,
}

/// The fate of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    Sent,
    Failed(String),
    Retrying(String),
    Cancelled(String),
    Skipped,
}

/// Consumes the sender queue until `shutdown`.
pub async fn run(ctx: Context, transport: Arc<Transport>, shutdown: CancellationToken) -> anyhow::Result<()> {
    amqp::consume(
        &ctx.amqp,
        &ctx.publisher,
        WorkQueue::Sender,
        ctx.config.amqp.prefetch,
        shutdown,
        |delivery| handle(&ctx, &transport, delivery),
    )
    .await
}

async fn handle(ctx: &Context, transport: &Transport, delivery: Delivery) -> (Delivery, Outcome) {
    let ids = match WorkMessage::decode(&delivery.data) {
        Ok(WorkMessage::EmailReadyV1 { delivery_ids }) => delivery_ids,
        Ok(other) => {
            let reason = format!("the sender takes email.ready.v1, not {}", other.kind());
            return (delivery, Outcome::DeadLetter(reason));
        }
        Err(e) => {
            return (
                delivery,
                Outcome::DeadLetter(format!("not an email.ready.v1 message: {e}")),
            )
        }
    };
    let outcome = match send_batch(ctx, transport, &ids).await {
        Ok(_) => Outcome::Ack,
        Err(e) => Outcome::Retry(e),
    };
    (delivery, outcome)
}

/// Claims, sends and records every delivery of `ids`, up to `sender.concurrency` at once.
///
/// Returns once every delivery is recorded. A database failure on any of them is the error (the message is tried
/// again: what was recorded stays recorded, and what was claimed is never claimed twice).
pub async fn send_batch(ctx: &Context, transport: &Transport, ids: &[i64]) -> anyhow::Result<SendReport> {
    let mut report = SendReport::default();
    if ids.is_empty() {
        return Ok(report);
    }
    let sender = Sender::new(ctx.config.smtp.from.as_str(), &ctx.config.smtp.from_name)
        .context("LEADFLOW_FROM cannot be used as the From address")?;
    let results: Vec<(i64, anyhow::Result<Fate>)> = stream::iter(ids.iter().copied())
        .map(|id| {
            let sender = &sender;
            async move { (id, send_one(ctx, transport, sender, id).await) }
        })
        .buffer_unordered(ctx.config.sender.concurrency.max(1))
        .collect()
        .await;

    let mut first_error = None;
    for (id, result) in results {
        match result {
            Ok(Fate::Sent) => report.sent.push(id),
            Ok(Fate::Failed(reason)) => report.failed.push((id, reason)),
            Ok(Fate::Retrying(reason)) => report.retrying.push((id, reason)),
            Ok(Fate::Cancelled(reason)) => report.cancelled.push((id, reason)),
            Ok(Fate::Skipped) => report.skipped.push(id),
            Err(e) => {
                tracing::error!(
                    delivery.id = id,
                    error = format!("{e:#}"),
                    "failed to handle a delivery"
                );
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    report.sent.sort_unstable();
    report.failed.sort();
    report.retrying.sort();
    report.cancelled.sort();
    report.skipped.sort_unstable();
    Ok(report)
}

/// The result of claiming one delivery.
enum Claim {
    /// Claimed: now `sending`, with its attempt count and rendered message (missing if it was deleted).
    Claimed {
        attempts: i32,
        rendered: Option<RenderedMessage>,
    },
    /// The enrollment ended or the lead is suppressed: cancelled with this reason.
    Cancelled(String),
    /// Not `rendered`, or no such delivery.
    NotClaimable,
}

async fn send_one(ctx: &Context, transport: &Transport, sender: &Sender, id: i64) -> anyhow::Result<Fate> {
    let claim = claim(ctx, id).await?;
    let (attempts, rendered) = match claim {
        Claim::NotClaimable => {
            metrics::email(EmailOutcome::Skipped);
            return Ok(Fate::Skipped);
        }
        Claim::Cancelled(reason) => {
            metrics::cancelled(id, &reason);
            return Ok(Fate::Cancelled(reason));
        }
        Claim::Claimed { attempts, rendered } => (attempts, rendered),
    };
    let Some(rendered) = rendered else {
        return record_failed(ctx, id, "no rendered message for the delivery", "").await;
    };
    let to = mask_email(&rendered.to_address);
    let built = match message::build(sender, &rendered) {
        Ok(built) => built,
        Err(e) => return record_failed(ctx, id, &format!("message: {e}"), &to).await,
    };

    let started = Instant::now();
    let sent = transport.send(&built.message).await;
    metrics::send_time(started.elapsed());

    match sent {
        Ok(()) => {
            let mut client = ctx.pool.get().await.context("failed to get a database connection")?;
            let tx = client
                .transaction()
                .await
                .with_context(|| format!("failed to record delivery {id} as sent (it stays 'sending')"))?;
            let updated = tx
                .execute(
                    "UPDATE deliveries
                        SET state = 'sent', message_id = $2, sent_at = now(), reason = NULL, updated_at = now()
                      WHERE id = $1 AND state = 'sending'",
                    &[&id, &built.message_id],
                )
                .await
                .with_context(|| format!("failed to record delivery {id} as sent (it stays 'sending')"))?;
            if updated > 0 {
                notify::enqueue(
                    &tx,
                    notify::About::Delivery(id),
                    notify::Kind::EmailSent,
                    serde_json::Value::Null,
                )
                .await?;
            }
            tx.commit()
                .await
                .with_context(|| format!("failed to record delivery {id} as sent (it stays 'sending')"))?;
            if updated == 0 {
                tracing::warn!(delivery.id = id, "sent, but the delivery was no longer 'sending'");
            }
            metrics::sent(id, &to, attempts);
            Ok(Fate::Sent)
        }
        Err(SendError::Permanent(text)) => record_failed(ctx, id, &format!("smtp: {text}"), &to).await,
        Err(SendError::Transient(text)) => {
            let max = ctx.config.sender.max_attempts;
            if attempts >= max {
                let reason = format!("gave up after {attempts} attempts: {text}");
                return record_failed(ctx, id, &reason, &to).await;
            }
            let reason = format!("retrying: {text}");
            let wait = backoff(ctx.config.sender.retry_base, attempts);
            ctx.pool
                .get()
                .await
                .context("failed to get a database connection")?
                .execute(
                    "UPDATE deliveries
                        SET state = 'retrying', reason = $2, due_at = now() + make_interval(secs => $3),
                            updated_at = now()
                      WHERE id = $1 AND state = 'sending'",
                    &[&id, &reason, &wait.as_secs_f64()],
                )
                .await
                .with_context(|| format!("failed to record delivery {id} for a retry"))?;
            metrics::retrying(id, &to, attempts, wait, &reason);
            Ok(Fate::Retrying(reason))
        }
    }
}

async fn record_failed(ctx: &Context, id: i64, reason: &str, masked_to: &str) -> anyhow::Result<Fate> {
    let mut client = ctx.pool.get().await.context("failed to get a database connection")?;
    let tx = client
        .transaction()
        .await
        .with_context(|| format!("failed to record delivery {id} as failed"))?;
    let updated = tx
        .execute(
            "UPDATE deliveries SET state = 'failed', reason = $2, updated_at = now()
              WHERE id = $1 AND state = 'sending'",
            &[&id, &reason],
        )
        .await
        .with_context(|| format!("failed to record delivery {id} as failed"))?;
    // A permanent "no such user" reply is a bounce the campaign's notify_url hears of.
    if updated > 0 && reason.starts_with("smtp: ") && notify::is_hard_bounce(reason) {
        notify::enqueue(
            &tx,
            notify::About::Delivery(id),
            notify::Kind::Bounced,
            serde_json::json!({ "reason": reason.trim_start_matches("smtp: ") }),
        )
        .await?;
    }
    tx.commit()
        .await
        .with_context(|| format!("failed to record delivery {id} as failed"))?;
    metrics::failed(id, masked_to, reason);
    Ok(Fate::Failed(reason.to_string()))
}

/// Claims one delivery in a single committed statement: `rendered` -> `sending` (attempts + 1) when its
/// enrollment is active and the lead not suppressed, `rendered` -> `cancelled` otherwise.
///
/// The row is locked first without a state filter: the scheduler publishes a retry before it commits the row
/// back to `rendered`, and `FOR UPDATE` waits for that commit and then reads the row as it is.
async fn claim(ctx: &Context, id: i64) -> anyhow::Result<Claim> {
    let client = ctx.pool.get().await.context("failed to get a database connection")?;
    let row = client
        .query_opt(
            "WITH target AS (
                 SELECT d.id, d.state, e.status AS enrollment_status, e.reason AS enrollment_reason,
                        l.suppressed_reason, cp.bcc
                   FROM deliveries d
                   JOIN enrollments e ON e.id = d.enrollment_id
                   JOIN leads l ON l.id = d.lead_id
                   JOIN campaigns cp ON cp.id = d.campaign_id
                  WHERE d.id = $1
                    FOR UPDATE OF d
             ),
             claimed AS (
                 UPDATE deliveries d SET state = 'sending', attempts = d.attempts + 1, updated_at = now()
                   FROM target t
                  WHERE d.id = t.id AND t.state = 'rendered'
                    AND t.enrollment_status = 'active' AND t.suppressed_reason IS NULL
                 RETURNING d.id, d.attempts
             ),
             cancelled AS (
                 UPDATE deliveries d SET state = 'cancelled', updated_at = now(),
                        reason = coalesce(t.suppressed_reason, nullif(t.enrollment_reason, ''),
                                          'enrollment ' || t.enrollment_status)
                   FROM target t
                  WHERE d.id = t.id AND t.state = 'rendered'
                    AND (t.enrollment_status <> 'active' OR t.suppressed_reason IS NOT NULL)
                 RETURNING d.reason
             )
             SELECT c.attempts, x.reason AS cancelled_reason, r.delivery_id,
                    r.to_address, r.to_name, r.subject, r.body_text, r.body_html, t.bcc
               FROM target t
               LEFT JOIN claimed c ON true
               LEFT JOIN cancelled x ON true
               LEFT JOIN rendered_messages r ON r.delivery_id = c.id",
            &[&id],
        )
        .await
        .with_context(|| format!("failed to claim delivery {id}"))?;
    let Some(row) = row else {
        return Ok(Claim::NotClaimable);
    };
    if let Some(reason) = row.try_get::<_, Option<String>>("cancelled_reason")? {
        return Ok(Claim::Cancelled(reason));
    }
    let Some(attempts) = row.try_get::<_, Option<i32>>("attempts")? else {
        return Ok(Claim::NotClaimable);
    };
    let rendered = match row.try_get::<_, Option<i64>>("delivery_id")? {
        None => None,
        Some(delivery_id) => Some(RenderedMessage {
            delivery_id,
            to_address: row.try_get("to_address")?,
            to_name: row.try_get("to_name")?,
            subject: row.try_get("subject")?,
            body_text: row.try_get("body_text")?,
            body_html: row.try_get("body_html")?,
            bcc: row.try_get("bcc")?,
        }),
    };
    Ok(Claim::Claimed { attempts, rendered })
}

/// The wait before the next attempt: `base * 2^(attempts - 1)`, at most [`MAX_BACKOFF`].
pub fn backoff(base: Duration, attempts: i32) -> Duration {
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    base.checked_mul(1u32 << exponent)
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_and_is_capped() {
        let base = Duration::from_secs(30);
        assert_eq!(backoff(base, 1), Duration::from_secs(30));
        assert_eq!(backoff(base, 2), Duration::from_secs(60));
        assert_eq!(backoff(base, 3), Duration::from_secs(120));
        assert_eq!(backoff(base, 5), Duration::from_secs(480));
        assert_eq!(backoff(base, 0), base);
        assert_eq!(backoff(base, -3), base);
        assert_eq!(backoff(base, 40), MAX_BACKOFF);
        assert_eq!(backoff(Duration::from_secs(u64::MAX / 2), 3), MAX_BACKOFF);
        assert_eq!(backoff(Duration::ZERO, 4), Duration::ZERO);
    }
}
