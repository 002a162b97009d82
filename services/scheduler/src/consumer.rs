//! The scheduler's queue: events ingest accepted.
//!
//! Every message ready at once is taken together and their events handled in few transactions (about
//! [`EVENTS_PER_TRANSACTION`] events each, in id order): one commit for many events instead of one per event.
//! A large group is split by lead into up to [`LANES`] lanes (at least [`MIN_PER_LANE`] events each) handled at
//! once, each lane in its own transaction on its own connection: one lead's events stay in one lane, in id order, and lanes share no lead,
//! so they never wait on each other's locks. When a group fails, each of its messages is tried alone, so only a
//! message that fails by itself is put back (lanes that committed are skipped when it comes back: their events
//! are marked handled).

use std::collections::HashMap;
use std::time::Instant;

use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;

use leadflow_shared::amqp::{self, Outcome};
use leadflow_shared::messages::WorkMessage;
use leadflow_shared::service::Context;
use leadflow_shared::topology::WorkQueue;

use crate::{enroll, metrics, timer};

/// The most messages taken together (each carries up to a request's batch of event ids).
const MESSAGES_PER_BATCH: usize = 64;

/// Events handled in one transaction when several messages are taken together.
pub const EVENTS_PER_TRANSACTION: usize = 500;

/// Transactions (connections) a group of events is spread over, by lead.
const LANES: usize = 4;

/// The fewest events a lane is given: a small group is handled in one transaction (each lane costs its own
/// statements and commit, which on a busy database outweighs the concurrency).
const MIN_PER_LANE: usize = 64;

pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handler_ctx = ctx.clone();
    amqp::consume_batches(
        &ctx.amqp,
        &ctx.publisher,
        WorkQueue::Scheduler,
        ctx.config.amqp.prefetch,
        MESSAGES_PER_BATCH,
        shutdown,
        move |deliveries| {
            let ctx = handler_ctx.clone();
            async move { handle(&ctx, deliveries).await }
        },
    )
    .await
}

/// Handles the events of `deliveries`, in groups of about [`EVENTS_PER_TRANSACTION`], and returns each delivery
/// with its outcome, in the order given.
async fn handle(ctx: &Context, deliveries: Vec<Delivery>) -> Vec<(Delivery, Outcome)> {
    let started = Instant::now();
    let count = deliveries.len();
    let mut outcomes: Vec<Option<Outcome>> = (0..count).map(|_| None).collect();
    // The decodable messages, grouped: (index into `deliveries`, event ids).
    let mut groups: Vec<Vec<(usize, Vec<i64>)>> = Vec::new();
    let mut in_group = 0;
    for (i, delivery) in deliveries.iter().enumerate() {
        match WorkMessage::decode(&delivery.data) {
            Ok(WorkMessage::EventAcceptedV1 { event_ids }) => {
                if groups.is_empty() || in_group + event_ids.len() > EVENTS_PER_TRANSACTION {
                    groups.push(Vec::new());
                    in_group = 0;
                }
                in_group += event_ids.len();
                if let Some(group) = groups.last_mut() {
                    group.push((i, event_ids));
                }
            }
            Ok(other) => outcomes[i] = Some(Outcome::DeadLetter(format!("unexpected message type {}", other.kind()))),
            Err(e) => outcomes[i] = Some(Outcome::DeadLetter(format!("not a work message: {e}"))),
        }
    }
    for group in groups {
        let ids: Vec<i64> = group.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
        match handle_in_lanes(ctx, &ids).await {
            Ok(handled) => {
                if handled.enrollments > 0 {
                    timer::wake();
                }
                for (i, _) in &group {
                    outcomes[*i] = Some(Outcome::Ack);
                }
            }
            Err(e) if group.len() == 1 => outcomes[group[0].0] = Some(Outcome::Retry(e)),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    messages = group.len(),
                    "a batch of events failed; handling its messages one by one"
                );
                for (i, ids) in &group {
                    outcomes[*i] = Some(match handle_in_lanes(ctx, ids).await {
                        Ok(handled) => {
                            if handled.enrollments > 0 {
                                timer::wake();
                            }
                            Outcome::Ack
                        }
                        Err(e) => Outcome::Retry(e),
                    });
                }
            }
        }
    }
    if count > 0 {
        metrics::message_time(started.elapsed() / count as u32);
    }
    deliveries
        .into_iter()
        .zip(outcomes)
        .map(|(delivery, outcome)| {
            let outcome = outcome.unwrap_or_else(|| Outcome::Retry(anyhow::anyhow!("the message was not handled")));
            (delivery, outcome)
        })
        .collect()
}

/// Handles `ids` in up to [`LANES`] transactions at once (at least [`MIN_PER_LANE`] events each), split by lead
/// (events in id order within a lane).
async fn handle_in_lanes(ctx: &Context, ids: &[i64]) -> anyhow::Result<enroll::Handled> {
    let lanes_used = (ids.len() / MIN_PER_LANE).clamp(1, LANES);
    if lanes_used == 1 {
        return enroll::handle_events(&ctx.pool, ids).await;
    }
    let leads: HashMap<i64, i64> = ctx
        .pool
        .get()
        .await?
        .query("SELECT id, lead_id FROM events WHERE id = ANY ($1)", &[&ids])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut lanes: Vec<Vec<i64>> = vec![Vec::new(); lanes_used];
    for id in ids {
        // An id with no event row goes to lane 0, which finds nothing to do.
        let lane = leads
            .get(id)
            .map_or(0, |lead| lead.rem_euclid(lanes_used as i64) as usize);
        lanes[lane].push(*id);
    }
    let results = futures_util::future::join_all(
        lanes
            .iter()
            .filter(|lane| !lane.is_empty())
            .map(|lane| enroll::handle_events(&ctx.pool, lane)),
    )
    .await;
    let mut total = enroll::Handled::default();
    for result in results {
        let h = result?;
        total.enrollments += h.enrollments;
        total.cancelled_deliveries += h.cancelled_deliveries;
        total.conversions += h.conversions;
        total.skipped += h.skipped;
    }
    Ok(total)
}
