//! ingest: accepts lead events over HTTP and AMQP, validates them, upserts the lead, stores the event, and hands
//! it to the scheduler.

pub mod bounces;
pub mod consumer;
pub mod events;
pub mod handoff;
pub mod http;
pub mod identity;
mod metrics;
pub mod store;

use tokio_util::sync::CancellationToken;

use leadflow_shared::service::{Context, Service};

pub fn service(ctx: &Context, shutdown: CancellationToken) -> Service {
    Service::new("ingest")
        .routes(http::routes(ctx).merge(bounces::routes(ctx)))
        .task("consumer", consumer::run(ctx.clone(), shutdown.clone()))
        .task("bounces", bounces::run(ctx.clone(), shutdown))
}
