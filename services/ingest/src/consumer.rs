//! The AMQP entry point: events upstream systems publish to the `<ns>.events` topic exchange.
//!
//! Every message ready at once is taken together: the events of all of them are stored in one transaction and
//! handed to the scheduler in one message, then the messages are acked (one commit and one confirm for many
//! messages, not one each). A message that is not a valid event goes to the dead-letter queue on its own. When
//! the shared transaction fails, each message is stored alone, so only one that fails by itself is put back.
//!
//! One consumer stores its batches one after the other, in the order the broker delivered them. With
//! `LEADFLOW_AMQP_EVENTS_CONSUMERS` above 1 (or several ingest replicas) batches are stored side by side: more
//! events per second, but events of separate messages may be stored in either order.

use lapin::message::Delivery;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use leadflow_shared::amqp::{self, Outcome};
use leadflow_shared::config::IdentityKey;
use leadflow_shared::service::Context;
use leadflow_shared::topology::WorkQueue;

use crate::events::{parse_event, LeadEvent};
use crate::http::store_and_hand_off;
use crate::identity;
use crate::metrics;

/// Runs `LEADFLOW_AMQP_EVENTS_CONSUMERS` consumers of `<ns>.events` until `shutdown`; the first to fail stops
/// them all (the process exits and is restarted; unacked messages go back to the queue).
pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let stop = shutdown.child_token();
    let running = (0..ctx.config.amqp.events_consumers).map(|_| {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        async move {
            let result = consume(ctx, stop.clone()).await;
            stop.cancel();
            result
        }
    });
    futures_util::future::join_all(running)
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()
        .map(|_| ())
}

/// One consumer: batches of the messages ready at once, stored one after the other (their order is kept).
async fn consume(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handler_ctx = ctx.clone();
    // At most half the prefetch per transaction: the broker delivers the next batch while one is being stored.
    let prefetch = ctx.config.amqp.events_prefetch;
    let per_batch = usize::from(prefetch / 2).max(1);
    amqp::consume_batches(
        &ctx.amqp,
        &ctx.publisher,
        WorkQueue::IngestEvents,
        prefetch,
        per_batch,
        shutdown,
        move |deliveries| {
            let ctx = handler_ctx.clone();
            async move { handle_all(&ctx, deliveries).await }
        },
    )
    .await
}

/// Stores the events of every delivery (acked only after the commit) and returns each with its outcome.
async fn handle_all(ctx: &Context, deliveries: Vec<Delivery>) -> Vec<(Delivery, Outcome)> {
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(deliveries.len());
    let mut parsed: Vec<(usize, Vec<LeadEvent>)> = Vec::new();
    for (i, delivery) in deliveries.iter().enumerate() {
        match parse(delivery, ctx.config.leads.identity_key) {
            Ok(events) => {
                outcomes.push(None);
                parsed.push((i, events));
            }
            Err(reason) => outcomes.push(Some(Outcome::DeadLetter(reason))),
        }
    }
    let all: Vec<LeadEvent> = parsed.iter().flat_map(|(_, events)| events.iter().cloned()).collect();
    match store_and_hand_off(ctx, &all, "amqp").await {
        Ok(_) => {
            for (i, _) in &parsed {
                outcomes[*i] = Some(Outcome::Ack);
            }
        }
        Err(e) if parsed.len() == 1 => outcomes[parsed[0].0] = Some(identity::outcome_of_failure(e)),
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                messages = parsed.len(),
                "storing a batch of events failed; storing its messages one by one"
            );
            for (i, events) in &parsed {
                outcomes[*i] = Some(match store_and_hand_off(ctx, events, "amqp").await {
                    Ok(_) => Outcome::Ack,
                    Err(e) => identity::outcome_of_failure(e),
                });
            }
        }
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

/// The events of one message (one event, or a JSON array of events), or why the message is refused.
fn parse(delivery: &Delivery, identity: IdentityKey) -> Result<Vec<LeadEvent>, String> {
    let value: Value = match serde_json::from_slice(&delivery.data) {
        Ok(v) => v,
        Err(e) => {
            metrics::rejected("amqp", "body");
            return Err(format!("the body is not valid JSON: {e}"));
        }
    };
    let items = match value {
        Value::Array(items) => items,
        single => vec![single],
    };
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match parse_event(item, identity) {
            Ok(e) => events.push(e),
            Err(e) => {
                metrics::rejected("amqp", &e.field);
                let at = if items.len() > 1 {
                    format!("event {i}: ")
                } else {
                    String::new()
                };
                return Err(format!("{at}{}: {}", e.field, e.reason));
            }
        }
    }
    Ok(events)
}
