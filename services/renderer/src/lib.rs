//! The renderer service: turns deliveries that came due into rendered emails (subject, text, HTML) for the sender.
//!
//! Templates are Handlebars folders (`templates`), rendered strictly per language (`render`), by a consumer of the
//! renderer queue (`worker`) that reports through `metrics`.

pub mod metrics;
pub mod render;
pub mod templates;
pub mod worker;

use tokio_util::sync::CancellationToken;

use leadflow_shared::service::{Context, Service};

pub use templates::{apply, find_templates, AppliedTemplate, Change, TemplateSpec};
pub use worker::{render_batch, RenderReport};

/// The renderer: one consumer of the renderer queue.
pub fn service(ctx: &Context, shutdown: CancellationToken) -> Service {
    let ctx = ctx.clone();
    Service::new("renderer").task("consumer", worker::run(ctx, shutdown))
}
