//! The `leadflow` command as a library: start any set of services in one process; migrate; apply; demo.

pub mod apply;
pub mod cli;
pub mod client;
pub mod defaults;
mod demo;
pub mod leads_cli;

/// The admin REST API and its keys (`leadflow_api`), for callers that depend on this crate only.
pub use leadflow_api as api;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use leadflow_shared::config::Config;
use leadflow_shared::service::{self, Context, Running, Service};

/// A service a process can run; `All` is monolithic mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Component {
    All,
    Ingest,
    Scheduler,
    Renderer,
    Sender,
    /// The authenticated admin REST API under `/v1/admin`.
    Api,
}

impl Component {
    fn expand(list: &[Component]) -> Vec<Component> {
        if list.is_empty() || list.contains(&Component::All) {
            return vec![Self::Ingest, Self::Scheduler, Self::Renderer, Self::Sender, Self::Api];
        }
        let mut out = list.to_vec();
        out.dedup();
        out
    }
}

/// Connects and starts `components` on `listener`; returns once they are running.
pub async fn start(
    config: Config,
    components: &[Component],
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let ctx = Context::connect(config, "leadflow").await?;
    let mut services: Vec<Service> = Vec::new();
    for component in Component::expand(components) {
        services.push(match component {
            Component::Ingest => leadflow_ingest::service(&ctx, shutdown.clone()),
            Component::Scheduler => leadflow_scheduler::service(&ctx, shutdown.clone()),
            Component::Renderer => leadflow_renderer::service(&ctx, shutdown.clone()),
            Component::Sender => leadflow_sender::service(&ctx, shutdown.clone()).await?,
            Component::Api => leadflow_api::service(&ctx, shutdown.clone()),
            Component::All => unreachable!("expanded above"),
        });
    }
    Ok(service::start(&ctx, services, listener, shutdown))
}
