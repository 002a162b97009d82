//! Durable timers: claiming due deliveries (SKIP LOCKED), publishing them with confirms, and repairing work
//! that stalled (expired leases, events never handed over).

use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use leadflow_shared::messages::WorkMessage;
use leadflow_shared::service::Context;
use leadflow_shared::settings;

use crate::{metrics, timing};

/// Ids per published message: one message carries a batch, so a due step costs one broker hop per batch.
const IDS_PER_MESSAGE: usize = 100;

/// The shortest pause between two ticks, however often the timer is woken.
const MIN_PAUSE: Duration = Duration::from_millis(10);

/// Wakes the timer of this process before its tick is over.
static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Asks this process's timer for a tick now (after its short minimum pause) instead of at the end of its tick:
/// the consumer calls it when it created deliveries, so a step due at once does not wait up to a whole tick.
/// Only a shortcut: every due row is claimed by the next regular tick anyway (and by any replica).
pub fn wake() {
    WAKE.notify_one();
}

/// What one tick did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tick {
    pub expired: usize,
    pub due: usize,
    pub retries: usize,
    pub requeued: usize,
    pub uncertain: usize,
    pub swept_events: usize,
    /// A/B tests whose end criterion was met.
    pub ab_decided: usize,
}

impl Tick {
    fn busy(&self) -> bool {
        self.due > 0 || self.retries > 0
    }
}

/// Runs ticks until shutdown; a full batch is followed at once by the next one. A wake between ticks claims due
/// deliveries only ([`run_due`]); the rest of a tick (expiry, retries, A/B decisions, the sweep) runs at most
/// once per `LEADFLOW_SCHEDULER_TICK`, however often the timer is woken.
pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tick = ctx.config.scheduler.tick;
    let mut last_sweep = tokio::time::Instant::now();
    let mut last_full: Option<tokio::time::Instant> = None;
    loop {
        let full = last_full.is_none_or(|at| at.elapsed() >= tick);
        if full {
            last_full = Some(tokio::time::Instant::now());
        }
        let sweep = full && last_sweep.elapsed() >= sweep_interval(&ctx);
        if sweep {
            last_sweep = tokio::time::Instant::now();
        }
        let result = if full {
            run_tick(&ctx, sweep).await
        } else {
            run_due(&ctx).await
        };
        let pause = match result {
            Ok(done) if done.due >= ctx.config.scheduler.batch => Duration::ZERO,
            Ok(done) => {
                if done.busy() {
                    tracing::debug!(?done, "tick");
                }
                tick
            }
            Err(e) => {
                // The database or broker is away: keep trying; nothing is lost, the rows are still due.
                tracing::warn!(error = format!("{e:#}"), "scheduler tick failed");
                tick.max(Duration::from_secs(1))
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
            _ = WAKE.notified() => {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(MIN_PAUSE.min(pause)) => {}
                }
            }
        }
    }
}

/// The part of a tick a wake asks for: due pending deliveries claimed and published (when sending is on).
pub async fn run_due(ctx: &Context) -> anyhow::Result<Tick> {
    let mut done = Tick::default();
    if settings::sending_enabled(&ctx.pool.get().await?).await? {
        done.due = publish_due(ctx).await.context("failed to publish due deliveries")?;
    }
    Ok(done)
}

fn sweep_interval(ctx: &Context) -> Duration {
    (ctx.config.scheduler.sweep_after / 2).max(Duration::from_secs(1))
}

/// One pass: due deliveries, due retries, lease expiry, and (when `sweep`) stray events. With the global switch
/// off, nothing is handed out: due follow-ups wait, and resume (or expire) when it is switched on.
pub async fn run_tick(ctx: &Context, sweep: bool) -> anyhow::Result<Tick> {
    let mut done = Tick::default();
    let enabled = settings::sending_enabled(&ctx.pool.get().await?).await?;
    if enabled {
        done.expired = expire_stale(ctx).await.context("failed to expire stale follow-ups")? as usize;
        done.due = publish_due(ctx).await.context("failed to publish due deliveries")?;
        done.retries = publish_retries(ctx).await.context("failed to publish due retries")?;
    }
    if sweep {
        let (requeued, uncertain) = expire_leases(ctx).await.context("failed to expire leases")?;
        done.requeued = requeued;
        done.uncertain = uncertain;
        done.swept_events = sweep_events(ctx).await.context("failed to sweep events")?;
    }
    // Every tick (sweep ticks included), whatever the send switch: one query on the campaigns table when no test
    // runs. A failure is logged and does not hold up the follow-ups.
    match crate::abtest::decide(&ctx.pool.get().await?).await {
        Ok(decided) => done.ab_decided = decided.len(),
        Err(e) => tracing::warn!(error = format!("{e:#}"), "failed to check A/B tests for a winner"),
    }
    Ok(done)
}

/// Claims due pending deliveries, publishes them to the renderer, and commits only after the broker confirmed.
/// A crash before the commit leaves the rows pending (claimed again later); after it, they are queued and the
/// messages are in the broker. Either way no step is lost; a duplicate message finds the row no longer queued.
/// Rows the campaign's send window or the lead's frequency cap holds back stay pending, due at their next allowed
/// moment (`crate::timing`). Returns how many due rows were handled: published or deferred.
pub async fn publish_due(ctx: &Context) -> anyhow::Result<usize> {
    claim_and_publish(ctx, "pending", "queued", |ids| WorkMessage::DeliveriesDueV1 {
        delivery_ids: ids,
    })
    .await
}

/// Follow-ups due longer ago than the staleness limit are not sent late: they end as cancelled (`expired`).
pub async fn expire_stale(ctx: &Context) -> anyhow::Result<u64> {
    let client = ctx.pool.get().await?;
    let stale_after = settings::stale_after(&client).await?.as_secs_f64();
    let expired = client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE deliveries SET state = 'cancelled', reason = 'expired', updated_at = now()
             WHERE state IN ('pending', 'retrying') AND due_at < now() - make_interval(secs => $1)",
                )
                .await?,
            &[&stale_after],
        )
        .await?;
    if expired > 0 {
        tracing::warn!(count = expired, "follow-ups expired: due longer ago than stale_after");
        metrics::cancelled("expired", expired);
    }
    Ok(expired)
}

/// Deliveries whose transient SMTP failure has waited out its backoff go back to the sender.
pub async fn publish_retries(ctx: &Context) -> anyhow::Result<usize> {
    claim_and_publish(ctx, "retrying", "rendered", |ids| WorkMessage::EmailReadyV1 {
        delivery_ids: ids,
    })
    .await
}

async fn claim_and_publish(
    ctx: &Context,
    from: &str,
    to: &str,
    message: impl Fn(Vec<i64>) -> WorkMessage,
) -> anyhow::Result<usize> {
    let mut client = ctx.pool.get().await?;
    let tx = client.transaction().await?;
    let limit = ctx.config.scheduler.batch as i64;
    // Follow-ups coming due pass the send-window and frequency-cap gate; a retry is already on its way and does not.
    let claimed = if from == "pending" {
        timing::claim_pending(&tx, to, limit).await?
    } else {
        let rows = tx
            .query(
                "UPDATE deliveries SET state = $2, updated_at = now()
                 WHERE id IN (SELECT id FROM deliveries
                              WHERE state = $1 AND due_at <= now()
                              ORDER BY due_at LIMIT $3
                              FOR UPDATE SKIP LOCKED)
                 RETURNING id",
                &[&from, &to, &limit],
            )
            .await?;
        timing::Claimed {
            ids: rows.iter().map(|r| r.get(0)).collect(),
            deferred: Vec::new(),
        }
    };
    let ids = &claimed.ids;
    if !ids.is_empty() {
        let messages: Vec<WorkMessage> = ids.chunks(IDS_PER_MESSAGE).map(|c| message(c.to_vec())).collect();
        ctx.publisher.publish_all(&messages).await?;
    }
    if ids.is_empty() && claimed.deferred.is_empty() {
        return Ok(0);
    }
    tx.commit().await?;
    claimed.record();
    if !ids.is_empty() {
        metrics::published(to, ids.len());
    }
    Ok(ids.len() + claimed.deferred_count())
}

/// Work handed out but not progressing for a whole lease: queued or rendered rows go back to pending (the
/// message was lost or dead-lettered; rendering again is harmless). A row left `sending` without an SMTP start
/// mark never handed its data over: it is reclaimed (`retrying`, due now; the stalled attempt can no longer
/// record anything, its writes are fenced by the attempt count). One with the mark may have reached the SMTP
/// server: it becomes `uncertain`, counted and alerted, never resent blindly. Returns (requeued + reclaimed,
/// uncertain).
pub async fn expire_leases(ctx: &Context) -> anyhow::Result<(usize, usize)> {
    let client = ctx.pool.get().await?;
    let lease = ctx.config.scheduler.lease.as_secs_f64();
    let requeued = client
        .execute(
            "UPDATE deliveries SET state = 'pending', updated_at = now()
             WHERE state IN ('queued', 'rendered') AND updated_at < now() - make_interval(secs => $1)",
            &[&lease],
        )
        .await? as usize;
    let reclaimed = client
        .execute(
            "UPDATE deliveries SET state = 'retrying', due_at = now(), updated_at = now(),
                    reason = 'reclaimed: the sender stopped before SMTP'
             WHERE state = 'sending' AND smtp_started_at IS NULL
               AND updated_at < now() - make_interval(secs => $1)",
            &[&lease],
        )
        .await? as usize;
    let uncertain = client
        .execute(
            "UPDATE deliveries SET state = 'uncertain', updated_at = now(),
                    reason = 'the sender stopped during the SMTP transaction; not resent'
             WHERE state = 'sending' AND smtp_started_at IS NOT NULL
               AND updated_at < now() - make_interval(secs => $1)",
            &[&lease],
        )
        .await? as usize;
    if requeued > 0 {
        tracing::warn!(count = requeued, "requeued deliveries whose lease expired");
    }
    if reclaimed > 0 {
        tracing::warn!(
            count = reclaimed,
            "reclaimed deliveries whose sender stopped before handing their data over"
        );
    }
    let requeued = requeued + reclaimed;
    metrics::lease_expired(requeued, uncertain);
    Ok((requeued, uncertain))
}

/// Events stored but never handled (the hand-off publish failed) are handed to the scheduler again.
pub async fn sweep_events(ctx: &Context) -> anyhow::Result<usize> {
    let client = ctx.pool.get().await?;
    let after = ctx.config.scheduler.sweep_after.as_secs_f64();
    let rows = client
        .query(
            "SELECT id FROM events WHERE handled_at IS NULL AND received_at < now() - make_interval(secs => $1)
             ORDER BY received_at LIMIT 1000",
            &[&after],
        )
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let messages: Vec<WorkMessage> = ids
        .chunks(IDS_PER_MESSAGE)
        .map(|c| WorkMessage::EventAcceptedV1 { event_ids: c.to_vec() })
        .collect();
    ctx.publisher.publish_all(&messages).await?;
    tracing::info!(count = ids.len(), "handed unhandled events to the scheduler again");
    Ok(ids.len())
}
