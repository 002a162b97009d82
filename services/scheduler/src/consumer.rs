//! The scheduler's queue: events ingest accepted.

use std::time::Instant;

use tokio_util::sync::CancellationToken;

use leadflow_shared::amqp::{self, Outcome};
use leadflow_shared::messages::WorkMessage;
use leadflow_shared::service::Context;
use leadflow_shared::topology::WorkQueue;

use crate::{enroll, metrics};

pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handler_ctx = ctx.clone();
    amqp::consume(
        &ctx.amqp,
        &ctx.publisher,
        WorkQueue::Scheduler,
        ctx.config.amqp.prefetch,
        shutdown,
        move |delivery| {
            let ctx = handler_ctx.clone();
            async move {
                let started = Instant::now();
                let outcome = match WorkMessage::decode(&delivery.data) {
                    Ok(WorkMessage::EventAcceptedV1 { event_ids }) => {
                        match enroll::handle_events(&ctx.pool, &event_ids).await {
                            Ok(_) => Outcome::Ack,
                            Err(e) => Outcome::Retry(e),
                        }
                    }
                    Ok(other) => Outcome::DeadLetter(format!("unexpected message type {}", other.kind())),
                    Err(e) => Outcome::DeadLetter(format!("not a work message: {e}")),
                };
                metrics::message_time(started.elapsed());
                (delivery, outcome)
            }
        },
    )
    .await
}
