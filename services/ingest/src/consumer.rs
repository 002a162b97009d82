//! The AMQP entry point: events upstream systems publish to the `<ns>.events` topic exchange.

use lapin::message::Delivery;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use leadflow_shared::amqp::{self, Outcome};
use leadflow_shared::service::Context;
use leadflow_shared::topology::WorkQueue;

use crate::events::parse_event;
use crate::http::store_and_hand_off;
use crate::metrics;

pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handler_ctx = ctx.clone();
    amqp::consume(
        &ctx.amqp,
        &ctx.publisher,
        WorkQueue::IngestEvents,
        ctx.config.amqp.prefetch,
        shutdown,
        move |delivery| {
            let ctx = handler_ctx.clone();
            async move {
                let outcome = handle(&ctx, &delivery).await;
                (delivery, outcome)
            }
        },
    )
    .await
}

/// Stores one published event (or a JSON array of events); acked only after the commit.
pub async fn handle(ctx: &Context, delivery: &Delivery) -> Outcome {
    let value: Value = match serde_json::from_slice(&delivery.data) {
        Ok(v) => v,
        Err(e) => {
            metrics::rejected("amqp", "body");
            return Outcome::DeadLetter(format!("the body is not valid JSON: {e}"));
        }
    };
    let items = match value {
        Value::Array(items) => items,
        single => vec![single],
    };
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match parse_event(item) {
            Ok(e) => events.push(e),
            Err(e) => {
                metrics::rejected("amqp", &e.field);
                let at = if items.len() > 1 {
                    format!("event {i}: ")
                } else {
                    String::new()
                };
                return Outcome::DeadLetter(format!("{at}{}: {}", e.field, e.reason));
            }
        }
    }
    match store_and_hand_off(ctx, &events, "amqp").await {
        Ok(_) => Outcome::Ack,
        Err(e) => Outcome::Retry(e),
    }
}
