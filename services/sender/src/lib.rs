//! The sender service: claims rendered deliveries, sends them over SMTP (or to an outbox folder) exactly once and
//! records each outcome: sent, bounced, failed, retrying with backoff, deferred by a rate limit, uncertain, or
//! cancelled when the sequence ended or the address was suppressed meanwhile.
//!
//! `message` builds the email (`dkim` signs it), `transport` drives the SMTP transaction over connections it owns, `limits` holds
//! the send rates, `worker` consumes the sender queue and records outcomes, `metrics` reports.

pub mod dkim;
mod group_commit;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod transport;
pub mod worker;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use leadflow_shared::service::{Context, Service};

pub use limits::{Admission, Limits};
pub use transport::{Attempt, Reply, ReplyClass, Transport};
pub use worker::{send_batch, SendReport, Sending};

/// The sender: its transport is built from `LEADFLOW_SMTP_URL` now (an outbox folder is created), its rate limits
/// from `LEADFLOW_SEND_RATE` and `LEADFLOW_DOMAIN_RATES`, the From address and signing from the mail settings, then one consumer of the sender queue runs until
/// `shutdown`.
pub async fn service(ctx: &Context, shutdown: CancellationToken) -> anyhow::Result<Service> {
    let sending = Arc::new(Sending::from_config(&ctx.config).await?);
    if let Some(rate) = ctx.config.sender.send_rate {
        tracing::info!(rate = %rate, "send rate limited per process");
    }
    for (domain, rate) in &ctx.config.sender.domain_rates {
        tracing::info!(domain = %domain, rate = %rate, "send rate limited for a recipient domain");
    }
    let ctx = ctx.clone();
    Ok(Service::new("sender").task("consumer", worker::run(ctx, sending, shutdown)))
}
