//! The sender service: claims rendered deliveries, sends them over SMTP (or to an outbox folder) and records
//! each outcome: sent, failed, retrying with backoff, or cancelled when the sequence ended meanwhile.
//!
//! `message` builds the email, `transport` delivers it, `worker` consumes the sender queue, `metrics` reports.

pub mod message;
pub mod metrics;
pub mod transport;
pub mod worker;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use leadflow_shared::service::{Context, Service};

pub use transport::{SendError, Transport};
pub use worker::{send_batch, SendReport};

/// The sender: its transport is built from `LEADFLOW_SMTP_URL` now (an outbox folder is created), then one
/// consumer of the sender queue runs until `shutdown`.
pub async fn service(ctx: &Context, shutdown: CancellationToken) -> anyhow::Result<Service> {
    let transport = Arc::new(Transport::from_config(&ctx.config).await?);
    let ctx = ctx.clone();
    Ok(Service::new("sender").task("consumer", worker::run(ctx, transport, shutdown)))
}
