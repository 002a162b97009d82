//! The sender's consumer: rendered deliveries are claimed, sent and their outcome recorded, exactly once.
//!
//! 1. Claim, every delivery of the message in one committed statement (`rendered` -> `sending`, attempts + 1,
//!    `smtp_started_at` cleared), after checking the enrollment and the suppression list (global, or for the
//!    delivery's campaign). A redelivered message finds the rows no longer `rendered` and does nothing.
//! 2. MAIL and RCPT; DATA. A failure up to here handed nothing over: it is retried, bounced or failed by its reply.
//! 3. While those commands go out, `smtp_started_at = now()` is committed (only while this attempt still owns the
//!    row); the data goes out once the server answered DATA with 354 and the mark is committed. From here a lost
//!    connection or a missing final reply makes the delivery `uncertain` at once: counted, never resent.
//! 4. The final reply is recorded: `sent` (with the Message-ID and the time of the 250) after 2xx, otherwise by
//!    its class.
//!
//! The start marks of step 3 and the `sent` records of step 4 go through group commits ([`GroupCommit`]): the
//! deliveries in flight at the same moment share one transaction, each still committed before its data goes out
//! (the mark) or before the message is acked (the record). A claim, mark or record costs one WAL flush per
//! batch instead of one per email.
//!
//! A sender that dies leaves the row `sending`; the scheduler's lease expiry reclaims it when `smtp_started_at` is
//! empty (nothing was handed over) and makes it `uncertain` otherwise. (A sender that dies between the mark and
//! the 354 leaves an `uncertain` row that was never handed over: at most one per connection, the price of not
//! adding the mark's WAL flush to the round trips of every email.) Every outcome is written only by the attempt
//! that claimed the row (`attempts` is the fence), so a reclaimed row is never recorded twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::stream::{self, StreamExt};
use lapin::message::Delivery;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use leadflow_scheduler::notify;
use leadflow_shared::amqp::{self, Outcome};
use leadflow_shared::config::Config;
use leadflow_shared::domain::{mask_email, EmailAddress};
use leadflow_shared::messages::WorkMessage;
use leadflow_shared::service::Context;
use leadflow_shared::settings;
use leadflow_shared::suppression::{self, Reason};
use leadflow_shared::topology::WorkQueue;

use crate::group_commit::GroupCommit;
use crate::limits::{Admission, Limits};
use crate::message::{self, RenderedMessage, Sender};
use crate::metrics::{self, EmailOutcome};
use crate::transport::{Attempt, Reply, ReplyClass, Transport};

/// The longest wait before a retry, whatever the attempt count.
pub const MAX_BACKOFF: Duration = Duration::from_secs(7 * 24 * 3600);

/// The states an attempt may record its outcome over: its own claim, or `uncertain` set by the lease expiry
/// while this attempt was still waiting for the reply (the reply settles it).
const OWNED: &str = "state IN ('sending', 'uncertain')";

/// What one batch did, by delivery id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Accepted by the relay (or written to the outbox).
    pub sent: Vec<i64>,
    /// Failed for good, with the reason recorded on the delivery.
    pub failed: Vec<(i64, String)>,
    /// A transient failure: due again after the backoff, with the reason recorded.
    pub retrying: Vec<(i64, String)>,
    /// Over a send-rate limit: due again when the limit allows.
    pub deferred: Vec<i64>,
    /// The data went out and no final reply came: `uncertain`, with the reason.
    pub uncertain: Vec<(i64, String)>,
    /// The enrollment ended or the lead is suppressed: cancelled without SMTP, with the reason.
    pub cancelled: Vec<(i64, String)>,
    /// Not `rendered` (already claimed, sent or cancelled), gone, or reclaimed meanwhile: nothing done.
    pub skipped: Vec<i64>,
}

/// The fate of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    Sent,
    Failed(String),
    Retrying(String),
    Deferred,
    Uncertain(String),
    Cancelled(String),
    Skipped,
}

/// Messages (batches of deliveries) sent at once: while one batch waits for its last replies, the next is
/// already being claimed and sent.
const MESSAGES_AT_ONCE: usize = 2;

/// The most start marks or `sent` records in one group commit.
const PER_COMMIT: usize = 500;

/// What the sender sends with: the transport, the rate limits and the From address (with its signing key).
pub struct Sending {
    pub transport: Transport,
    pub limits: Limits,
    pub sender: Sender,
    /// Start marks (delivery id, attempt) committed together.
    marks: GroupCommit<(i64, i32), bool>,
    /// `sent` records committed together.
    records: GroupCommit<SentRecord, Option<String>>,
}

impl Sending {
    /// From the configuration: `LEADFLOW_SMTP_URL` (an outbox folder is created), the rate limits, the sender.
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            transport: Transport::from_config(config).await?,
            limits: Limits::from_config(&config.sender),
            sender: Sender::from_config(config)?,
            marks: GroupCommit::new(PER_COMMIT),
            records: GroupCommit::new(PER_COMMIT),
        })
    }
}

/// Consumes the sender queue until `shutdown`.
pub async fn run(ctx: Context, sending: Arc<Sending>, shutdown: CancellationToken) -> anyhow::Result<()> {
    amqp::consume_concurrently(
        &ctx.amqp,
        &ctx.publisher,
        WorkQueue::Sender,
        ctx.config.amqp.prefetch,
        MESSAGES_AT_ONCE,
        shutdown,
        |delivery| handle(&ctx, &sending, delivery),
    )
    .await
}

async fn handle(ctx: &Context, sending: &Sending, delivery: Delivery) -> (Delivery, Outcome) {
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
    let outcome = match send_batch(ctx, sending, &ids).await {
        Ok(_) => Outcome::Ack,
        Err(e) => Outcome::Retry(e),
    };
    (delivery, outcome)
}

/// Claims, sends and records every delivery of `ids`: all of them under way at once, the transport allowing
/// `sender.concurrency` SMTP transactions at a time (a delivery waiting for its `sent` record holds no connection).
///
/// Returns once every delivery is recorded. A database failure on any of them is the error (the message is tried
/// again: what was recorded stays recorded, and what was claimed is never claimed twice).
pub async fn send_batch(ctx: &Context, sending: &Sending, ids: &[i64]) -> anyhow::Result<SendReport> {
    let mut report = SendReport::default();
    if ids.is_empty() {
        return Ok(report);
    }
    let claims = claim_all(ctx, ids).await?;
    let results: Vec<(i64, anyhow::Result<Fate>)> = stream::iter(claims)
        .map(|(id, claim)| async move { (id, send_one(ctx, sending, id, claim).await) })
        .buffer_unordered(ids.len())
        .collect()
        .await;

    let mut first_error = None;
    for (id, result) in results {
        match result {
            Ok(Fate::Sent) => report.sent.push(id),
            Ok(Fate::Failed(reason)) => report.failed.push((id, reason)),
            Ok(Fate::Retrying(reason)) => report.retrying.push((id, reason)),
            Ok(Fate::Deferred) => report.deferred.push(id),
            Ok(Fate::Uncertain(reason)) => report.uncertain.push((id, reason)),
            Ok(Fate::Cancelled(reason)) => report.cancelled.push((id, reason)),
            Ok(Fate::Skipped) => report.skipped.push(id),
            Err(e) => {
                tracing::error!(
                    delivery.id = id,
                    error = metrics::mask_addresses(&format!("{e:#}")),
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
    report.deferred.sort_unstable();
    report.uncertain.sort();
    report.cancelled.sort();
    report.skipped.sort_unstable();
    Ok(report)
}

/// A delivery this attempt claimed.
struct Claimed {
    id: i64,
    /// The attempt number, also the fence every later write checks.
    attempts: i32,
    enrollment_id: i64,
    /// The rendered message (missing if it was deleted).
    rendered: Option<RenderedMessage>,
}

/// The result of claiming one delivery.
enum Claim {
    Claimed(Claimed),
    /// The enrollment ended or the address is suppressed: cancelled with this reason.
    Cancelled(String),
    /// Not `rendered`, or no such delivery.
    NotClaimable,
}

async fn send_one(ctx: &Context, sending: &Sending, id: i64, claim: Claim) -> anyhow::Result<Fate> {
    let Sending {
        transport,
        limits,
        sender,
        ..
    } = sending;
    let claimed = match claim {
        Claim::NotClaimable => {
            metrics::email(EmailOutcome::Skipped);
            return Ok(Fate::Skipped);
        }
        Claim::Cancelled(reason) => {
            metrics::cancelled(id, &reason);
            return Ok(Fate::Cancelled(reason));
        }
        Claim::Claimed(claimed) => claimed,
    };
    let Some(rendered) = claimed.rendered.clone() else {
        return record_failed(ctx, &claimed, "no rendered message for the delivery", "").await;
    };
    let to = mask_email(&rendered.to_address);
    let built = match message::build(sender, &rendered) {
        Ok(built) => built,
        Err(e) => return record_failed(ctx, &claimed, &format!("message: {e}"), &to).await,
    };

    if !limits.is_unlimited() {
        let domain = rendered.to_address.rsplit('@').next().unwrap_or("").trim();
        match limits.admit(id, domain) {
            Admission::Now => {}
            Admission::Wait(wait) => tokio::time::sleep(wait).await,
            Admission::Defer { wait, .. } => {
                let limit = if limits.domain_rate(domain).is_some() {
                    "domain"
                } else {
                    "process"
                };
                let deferred = record_deferred(ctx, &claimed, wait, limit).await;
                if deferred.is_err() {
                    limits.forget(id);
                }
                return deferred;
            }
        }
    }

    let started = Instant::now();
    let attempt = transport
        .send(&built.message, mark_started(ctx, sending, id, claimed.attempts))
        .await
        .with_context(|| format!("failed to mark delivery {id} as started; nothing was sent"))?;
    metrics::send_time(started.elapsed());

    match attempt {
        Attempt::Accepted(_) => record_sent(ctx, sending, &claimed, &built.message_id, &rendered.to_address, &to).await,
        Attempt::Refused(reply) => match reply.class() {
            ReplyClass::Accepted => {
                record_sent(ctx, sending, &claimed, &built.message_id, &rendered.to_address, &to).await
            }
            ReplyClass::HardBounce => record_hard_bounce(ctx, &claimed, &reply, &rendered.to_address, &to).await,
            ReplyClass::SoftBounce => {
                record_transient(
                    ctx,
                    &claimed,
                    &reply.to_string(),
                    Some(&reply),
                    &rendered.to_address,
                    &to,
                )
                .await
            }
            ReplyClass::TryLater => {
                record_transient(ctx, &claimed, &reply.to_string(), None, &rendered.to_address, &to).await
            }
            ReplyClass::Policy => {
                let reason = format!("policy: {reply}");
                metrics::policy_block(id, &to, &reason);
                record_failed(ctx, &claimed, &reason, &to).await
            }
            ReplyClass::Failed => record_failed(ctx, &claimed, &format!("smtp: {reply}"), &to).await,
        },
        Attempt::NotSent(text) => record_transient(ctx, &claimed, &text, None, &rendered.to_address, &to).await,
        Attempt::Uncertain(text) => record_uncertain(ctx, &claimed, &text, &to).await,
        Attempt::Abandoned => {
            metrics::abandoned(id);
            Ok(Fate::Skipped)
        }
    }
}

/// Commits `smtp_started_at` before the data goes out (with the other marks waiting at that moment); false
/// when this attempt no longer owns the row (the lease expired and the delivery was reclaimed): then nothing is
/// sent.
async fn mark_started(ctx: &Context, sending: &Sending, id: i64, attempts: i32) -> anyhow::Result<bool> {
    let pool = ctx.pool.clone();
    sending
        .marks
        .submit((id, attempts), move |marks| mark_started_all(pool.clone(), marks))
        .await
        .with_context(|| format!("failed to mark delivery {id} as started"))
}

/// One statement, one commit: marks every (delivery, attempt) still `sending` without a mark; true for each
/// marked. Only `smtp_started_at` changes (no indexed column, so PostgreSQL can update the row in place, without
/// new index entries); the lease keeps counting from the claim.
///
/// The rows are locked by id alone and filtered after: with `state = 'sending'` beside the ids, PostgreSQL may
/// read them through the partial index of deliveries in flight whenever its statistics say that index is small,
/// and then every mark reads the whole backlog (50,000 rendered deliveries: 37 ms a mark instead of 0.2).
async fn mark_started_all(pool: deadpool_postgres::Pool, marks: Vec<(i64, i32)>) -> anyhow::Result<Vec<bool>> {
    let client = pool.get().await.context("failed to get a database connection")?;
    let (ids, attempts): (Vec<i64>, Vec<i32>) = marks.iter().copied().unzip();
    let marked: HashSet<i64> = client
        .query(
            &client
                .prepare_cached(
                    "WITH locked AS MATERIALIZED (
                 SELECT id, attempts, state, smtp_started_at FROM deliveries
                  WHERE id = ANY ($1) ORDER BY id FOR UPDATE
             )
             UPDATE deliveries d SET smtp_started_at = now()
               FROM locked l JOIN unnest($1::bigint[], $2::int[]) AS m(id, attempts)
                    ON m.id = l.id AND m.attempts = l.attempts
              WHERE d.id = l.id AND l.state = 'sending' AND l.smtp_started_at IS NULL
             RETURNING d.id",
                )
                .await?,
            &[&ids, &attempts],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok(ids.iter().map(|id| marked.contains(id)).collect())
}

/// A 250 to record.
struct SentRecord {
    id: i64,
    attempts: i32,
    message_id: String,
    /// When the server's 250 arrived.
    sent_at: chrono::DateTime<chrono::Utc>,
    address: String,
}

async fn record_sent(
    ctx: &Context,
    sending: &Sending,
    claimed: &Claimed,
    message_id: &str,
    address: &str,
    masked_to: &str,
) -> anyhow::Result<Fate> {
    let id = claimed.id;
    let record = SentRecord {
        id,
        attempts: claimed.attempts,
        message_id: message_id.to_string(),
        sent_at: chrono::Utc::now(),
        address: address.to_string(),
    };
    let pool = ctx.pool.clone();
    let was = sending
        .records
        .submit(record, move |records| record_sent_all(pool.clone(), records))
        .await
        .with_context(|| format!("failed to record delivery {id} as sent (it stays 'sending', then 'uncertain')"))?;
    match was.as_deref() {
        None => tracing::warn!(delivery.id = id, "sent, but the delivery was no longer this attempt's"),
        Some("uncertain") => tracing::info!(delivery.id = id, "an uncertain delivery was settled: sent"),
        Some(_) => {}
    }
    metrics::sent(id, masked_to, claimed.attempts);
    Ok(Fate::Sent)
}

/// Records every 250 of `records` in one transaction: `sent` with its Message-ID and time, over rows this
/// attempt still owns; the address's soft-bounce run is cleared and the campaign hears of it. Returns, for each,
/// the state it was in (`sending`, or `uncertain` when the lease expired meanwhile), or `None` when the row was
/// no longer this attempt's.
async fn record_sent_all(
    pool: deadpool_postgres::Pool,
    records: Vec<SentRecord>,
) -> anyhow::Result<Vec<Option<String>>> {
    let mut client = pool.get().await.context("failed to get a database connection")?;
    let tx = client.transaction().await?;
    let ids: Vec<i64> = records.iter().map(|r| r.id).collect();
    let attempts: Vec<i32> = records.iter().map(|r| r.attempts).collect();
    let message_ids: Vec<&str> = records.iter().map(|r| r.message_id.as_str()).collect();
    let sent_at: Vec<chrono::DateTime<chrono::Utc>> = records.iter().map(|r| r.sent_at).collect();
    // Locked in id order (two commits never wait on each other in a cycle), read as they were.
    let was: HashMap<i64, String> = tx
        .query(
            &tx.prepare_cached("SELECT id, state FROM deliveries WHERE id = ANY ($1) ORDER BY id FOR UPDATE")
                .await?,
            &[&ids],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let updated: HashSet<i64> = tx
        .query(
            &tx.prepare_cached(&format!(
                "UPDATE deliveries d
                    SET state = 'sent', message_id = r.message_id, sent_at = r.sent_at, reason = NULL,
                        updated_at = now()
                   FROM unnest($1::bigint[], $2::int[], $3::text[], $4::timestamptz[])
                        AS r(id, attempts, message_id, sent_at)
                  WHERE d.id = r.id AND d.attempts = r.attempts AND d.{OWNED}
                 RETURNING d.id"
            ))
            .await?,
            &[&ids, &attempts, &message_ids, &sent_at],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !updated.is_empty() {
        let hashes: Vec<String> = records
            .iter()
            .filter(|r| updated.contains(&r.id))
            .filter_map(|r| EmailAddress::parse(&r.address).ok())
            .map(|email| suppression::email_hash(&email))
            .collect();
        tx.execute(
            &tx.prepare_cached("DELETE FROM soft_bounces WHERE email_hash = ANY ($1)")
                .await?,
            &[&hashes],
        )
        .await?;
        let updated_ids: Vec<i64> = updated.iter().copied().collect();
        // Only campaigns with a notification URL hear of each email: one look for the batch, not one per email.
        let notified: Vec<i64> = tx
            .query(
                &tx.prepare_cached(
                    "SELECT d.id FROM deliveries d JOIN campaigns c ON c.id = d.campaign_id
                      WHERE d.id = ANY ($1) AND c.notify_url IS NOT NULL ORDER BY d.id",
                )
                .await?,
                &[&updated_ids],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for id in notified {
            notify::enqueue(
                &tx,
                notify::About::Delivery(id),
                notify::Kind::EmailSent,
                serde_json::Value::Null,
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(records
        .iter()
        .map(|r| updated.contains(&r.id).then(|| was.get(&r.id).cloned()).flatten())
        .collect())
}

/// Writes `failed` with `reason` over this attempt's row; true when it did.
async fn set_failed(
    tx: &impl deadpool_postgres::GenericClient,
    claimed: &Claimed,
    reason: &str,
) -> anyhow::Result<bool> {
    let updated = tx
        .execute(
            &format!(
                "UPDATE deliveries SET state = 'failed', reason = $2, updated_at = now()
                  WHERE id = $1 AND attempts = $3 AND {OWNED}"
            ),
            &[&claimed.id, &reason, &claimed.attempts],
        )
        .await
        .with_context(|| format!("failed to record delivery {} as failed", claimed.id))?;
    Ok(updated > 0)
}

async fn record_failed(ctx: &Context, claimed: &Claimed, reason: &str, masked_to: &str) -> anyhow::Result<Fate> {
    let client = ctx.pool.get().await.context("failed to get a database connection")?;
    set_failed(&client, claimed, reason).await?;
    metrics::failed(claimed.id, masked_to, reason);
    Ok(Fate::Failed(reason.to_string()))
}

/// The address does not exist: the delivery fails as `bounced`, the address is suppressed (every other open step
/// of the lead ends `bounced`), and the campaign hears of it.
async fn record_hard_bounce(
    ctx: &Context,
    claimed: &Claimed,
    reply: &Reply,
    address: &str,
    masked_to: &str,
) -> anyhow::Result<Fate> {
    let reason = format!("bounced: {reply}");
    let mut client = ctx.pool.get().await.context("failed to get a database connection")?;
    let tx = client
        .transaction()
        .await
        .with_context(|| format!("failed to record delivery {} as bounced", claimed.id))?;
    if set_failed(&tx, claimed, &reason).await? {
        suppress_bounced(&tx, claimed, address, &reply.to_string(), "smtp").await?;
        metrics::bounced(claimed.id, masked_to, "hard");
    }
    tx.commit()
        .await
        .with_context(|| format!("failed to record delivery {} as bounced", claimed.id))?;
    metrics::failed(claimed.id, masked_to, &reason);
    Ok(Fate::Failed(reason))
}

/// Suppresses the address as bounced (unless `already` did) and notifies: the delivery, and every other
/// enrollment the suppression ended.
async fn suppress_bounced(
    tx: &deadpool_postgres::Transaction<'_>,
    claimed: &Claimed,
    address: &str,
    reply: &str,
    source: &str,
) -> anyhow::Result<()> {
    let ended = match EmailAddress::parse(address) {
        Ok(email) => {
            suppression::suppress(tx, &email, Reason::Bounced, source, None, Some(reply))
                .await?
                .ended_enrollments
        }
        Err(e) => {
            tracing::warn!(delivery.id = claimed.id, error = %e, "a bounced address that cannot be suppressed");
            Vec::new()
        }
    };
    notify_bounced(tx, claimed, &ended, reply).await
}

async fn notify_bounced(
    tx: &deadpool_postgres::Transaction<'_>,
    claimed: &Claimed,
    ended: &[i64],
    reply: &str,
) -> anyhow::Result<()> {
    notify::enqueue(
        tx,
        notify::About::Delivery(claimed.id),
        notify::Kind::Bounced,
        json!({ "reason": reply }),
    )
    .await?;
    for enrollment in ended.iter().filter(|e| **e != claimed.enrollment_id) {
        notify::enqueue(
            tx,
            notify::About::Enrollment(*enrollment),
            notify::Kind::Bounced,
            json!({ "reason": reply }),
        )
        .await?;
    }
    Ok(())
}

/// A failure that may pass: retried after the backoff up to `LEADFLOW_SENDER_MAX_ATTEMPTS`, then failed. A soft
/// bounce (`soft`: the recipient's mailbox, not the connection or a policy) also counts toward the address's
/// soft-bounce run, which suppresses it once the run reaches the configured limit.
async fn record_transient(
    ctx: &Context,
    claimed: &Claimed,
    text: &str,
    soft: Option<&Reply>,
    address: &str,
    masked_to: &str,
) -> anyhow::Result<Fate> {
    let id = claimed.id;
    let attempts = claimed.attempts;
    let failed = || format!("failed to record delivery {id} for a retry");
    let mut client = ctx.pool.get().await.context("failed to get a database connection")?;
    let tx = client.transaction().await.with_context(failed)?;
    let owned = tx
        .query_opt(
            &format!("SELECT 1 FROM deliveries WHERE id = $1 AND attempts = $2 AND {OWNED} FOR UPDATE"),
            &[&id, &attempts],
        )
        .await
        .with_context(failed)?
        .is_some();
    if !owned {
        tx.commit().await.with_context(failed)?;
        metrics::abandoned(id);
        return Ok(Fate::Skipped);
    }
    if let (Some(reply), Ok(email)) = (soft, EmailAddress::parse(address)) {
        let (limit, window) = settings::soft_bounce_rule(&tx).await?;
        // One entry per attempt: each refused attempt is one soft bounce of the run.
        let status = format!("smtp {} attempt {attempts}", reply.status());
        if let Some(suppressed) = suppression::record_soft_bounce(&tx, &email, Some(id), &status, limit, window).await?
        {
            let reason = format!("bounced: {limit} transient failures in a row, the last: {reply}");
            set_failed(&tx, claimed, &reason).await?;
            notify_bounced(&tx, claimed, &suppressed.ended_enrollments, &reply.to_string()).await?;
            tx.commit().await.with_context(failed)?;
            metrics::bounced(id, masked_to, "soft");
            metrics::failed(id, masked_to, &reason);
            return Ok(Fate::Failed(reason));
        }
    }
    let max = ctx.config.sender.max_attempts;
    if attempts >= max {
        let reason = format!("gave up after {attempts} attempts: {text}");
        set_failed(&tx, claimed, &reason).await?;
        tx.commit().await.with_context(failed)?;
        metrics::failed(id, masked_to, &reason);
        return Ok(Fate::Failed(reason));
    }
    let reason = format!("retrying: {text}");
    let wait = backoff(ctx.config.sender.retry_base, attempts);
    tx.execute(
        &format!(
            "UPDATE deliveries
                SET state = 'retrying', reason = $2, due_at = now() + make_interval(secs => $3),
                    updated_at = now()
              WHERE id = $1 AND attempts = $4 AND {OWNED}"
        ),
        &[&id, &reason, &wait.as_secs_f64(), &attempts],
    )
    .await
    .with_context(failed)?;
    tx.commit().await.with_context(failed)?;
    metrics::retrying(id, masked_to, attempts, wait, &reason);
    Ok(Fate::Retrying(reason))
}

/// The connection failed or timed out after the data went out: the server may have the message. Recorded as
/// `uncertain` at once, never retried.
async fn record_uncertain(ctx: &Context, claimed: &Claimed, text: &str, masked_to: &str) -> anyhow::Result<Fate> {
    let reason = format!("uncertain: {text}; not resent");
    let client = ctx.pool.get().await.context("failed to get a database connection")?;
    client
        .execute(
            "UPDATE deliveries SET state = 'uncertain', reason = $2, updated_at = now()
              WHERE id = $1 AND attempts = $3 AND state = 'sending'",
            &[&claimed.id, &reason, &claimed.attempts],
        )
        .await
        .with_context(|| format!("failed to record delivery {} as uncertain", claimed.id))?;
    metrics::uncertain(claimed.id, masked_to, &reason);
    Ok(Fate::Uncertain(reason))
}

/// Over a rate limit: back to `retrying`, due when the limit allows; the attempt is given back.
async fn record_deferred(
    ctx: &Context,
    claimed: &Claimed,
    wait: Duration,
    limit: &'static str,
) -> anyhow::Result<Fate> {
    let due_at = chrono::Utc::now() + chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::MAX / 2);
    let reason = format!("deferred: over the {limit} send-rate limit");
    let client = ctx.pool.get().await.context("failed to get a database connection")?;
    client
        .execute(
            "UPDATE deliveries
                SET state = 'retrying', attempts = attempts - 1, due_at = $2, reason = $3, updated_at = now()
              WHERE id = $1 AND attempts = $4 AND state = 'sending' AND smtp_started_at IS NULL",
            &[&claimed.id, &due_at, &reason, &claimed.attempts],
        )
        .await
        .with_context(|| format!("failed to defer delivery {}", claimed.id))?;
    metrics::deferred(claimed.id, wait, limit);
    Ok(Fate::Deferred)
}

/// Claims every delivery of `ids` in a single committed statement: `rendered` -> `sending` (attempts + 1, no
/// SMTP start mark) when its enrollment is active and the address not suppressed (the lead's mark, or a
/// suppression entry, global or for the delivery's campaign), `rendered` -> `cancelled` otherwise. Returns each
/// id (once, in the order given) with what became of it.
///
/// The rows are locked first without a state filter, in id order: the scheduler publishes a retry before it
/// commits the row back to `rendered`, and `FOR UPDATE` waits for that commit and then reads the row as it is.
async fn claim_all(ctx: &Context, ids: &[i64]) -> anyhow::Result<Vec<(i64, Claim)>> {
    let client = ctx.pool.get().await.context("failed to get a database connection")?;
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "WITH target AS (
                 SELECT d.id, d.state, d.enrollment_id, e.status AS enrollment_status,
                        e.reason AS enrollment_reason, cp.bcc,
                        coalesce(l.suppressed_reason,
                                 (SELECT s.reason FROM suppressions s
                                   WHERE s.email_hash = encode(sha256(convert_to(l.email, 'UTF8')), 'hex')
                                     AND (s.campaign_id IS NULL OR s.campaign_id = d.campaign_id)
                                   ORDER BY s.campaign_id NULLS FIRST LIMIT 1)) AS suppressed_reason
                   FROM deliveries d
                   JOIN enrollments e ON e.id = d.enrollment_id
                   JOIN leads l ON l.id = d.lead_id
                   JOIN campaigns cp ON cp.id = d.campaign_id
                  WHERE d.id = ANY ($1)
                  ORDER BY d.id
                    FOR UPDATE OF d
             ),
             claimed AS (
                 UPDATE deliveries d SET state = 'sending', attempts = d.attempts + 1, smtp_started_at = NULL,
                        updated_at = now()
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
                 RETURNING d.id, d.reason
             )
             SELECT t.id, c.attempts, x.reason AS cancelled_reason, t.enrollment_id, r.delivery_id,
                    r.to_address, r.to_name, r.subject, r.body_text, r.body_html, t.bcc
               FROM target t
               LEFT JOIN claimed c ON c.id = t.id
               LEFT JOIN cancelled x ON x.id = t.id
               LEFT JOIN rendered_messages r ON r.delivery_id = c.id",
                )
                .await?,
            &[&ids],
        )
        .await
        .context("failed to claim deliveries")?;
    let mut claims: HashMap<i64, Claim> = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get("id")?;
        claims.insert(id, claim_of(id, &row)?);
    }
    let mut seen = HashSet::with_capacity(ids.len());
    Ok(ids
        .iter()
        .filter(|id| seen.insert(**id))
        .map(|id| (*id, claims.remove(id).unwrap_or(Claim::NotClaimable)))
        .collect())
}

/// What the claim did to one delivery, from its row of [`claim_all`].
fn claim_of(id: i64, row: &tokio_postgres::Row) -> anyhow::Result<Claim> {
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
    Ok(Claim::Claimed(Claimed {
        id,
        attempts,
        enrollment_id: row.try_get("enrollment_id")?,
        rendered,
    }))
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
