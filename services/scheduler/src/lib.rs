//! scheduler: enrolls leads in matching campaigns, keeps each follow-up as a durable timer row, and hands due
//! deliveries to the renderer. Several replicas run safely: claims use `FOR UPDATE SKIP LOCKED`.

pub mod abtest;
pub mod campaigns;
pub mod codes;
pub mod consumer;
pub mod enroll;
pub mod lead_events;
mod metrics;
pub mod notify;
pub mod results;
pub mod scoring;
pub mod stats;
pub mod timer;
pub mod timing;

use tokio_util::sync::CancellationToken;

use leadflow_shared::service::{Context, Service};

pub fn service(ctx: &Context, shutdown: CancellationToken) -> Service {
    Service::new("scheduler")
        .task("consumer", consumer::run(ctx.clone(), shutdown.clone()))
        .task("timer", timer::run(ctx.clone(), shutdown.clone()))
        .task("notify", notify::run(ctx.clone(), shutdown.clone()))
        .task("scoring", scoring::run(ctx.clone(), shutdown.clone()))
        .task("lead-events", lead_events::run(ctx.clone(), shutdown.clone()))
        .task("results", results::run(ctx.clone(), shutdown))
}
