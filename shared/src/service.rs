//! Running services: the shared connections, the HTTP listener, background tasks and graceful shutdown.
//!
//! A service is a set of routes plus background tasks (consumers, timers). One process runs one service or all
//! of them (monolithic mode); either way they share one pool, one broker connection and one listener.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use deadpool_postgres::Pool;
use lapin::Connection;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, Publisher};
use crate::config::Config;
use crate::http::{ops_router, Readiness};
use crate::topology::Topology;

/// Connections and configuration every service of the process shares.
#[derive(Clone)]
pub struct Context {
    pub config: Config,
    pub pool: Pool,
    pub amqp: Arc<Connection>,
    pub publisher: Publisher,
    pub topology: Topology,
}

impl Context {
    /// Connects to PostgreSQL (checking the schema is migrated) and RabbitMQ (declaring the topology).
    pub async fn connect(config: Config, name: &str) -> anyhow::Result<Self> {
        if !config.mail.keyring_configured {
            tracing::warn!(
                "LEADFLOW_TOKEN_KEYS is not set: unsubscribe links are signed with a throwaway key and stop working \
                 when this process restarts"
            );
        }
        let pool = crate::db::pool(&config.database)?;
        crate::db::check_schema(&pool).await?;
        let connection = amqp::connect(&config.amqp, name).await?;
        let topology = Topology::new(&config.amqp);
        let channel = connection.create_channel().await.context("failed to open a channel")?;
        topology
            .declare(&channel)
            .await
            .context("failed to declare the AMQP topology")?;
        let _ = channel.close(200, "declared".into()).await;
        let publisher = Publisher::new(&connection, topology.clone()).await?;
        Ok(Self {
            config,
            pool,
            amqp: Arc::new(connection),
            publisher,
            topology,
        })
    }
}

pub type Task = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// One service: its HTTP routes and its background tasks, each of which ends when shutdown is signalled.
pub struct Service {
    pub name: &'static str,
    pub routes: Router,
    pub tasks: Vec<(String, Task)>,
}

impl Service {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            routes: Router::new(),
            tasks: Vec::new(),
        }
    }

    pub fn routes(mut self, routes: Router) -> Self {
        self.routes = self.routes.merge(routes);
        self
    }

    pub fn task(mut self, name: &str, task: impl Future<Output = anyhow::Result<()>> + Send + 'static) -> Self {
        self.tasks.push((format!("{}.{name}", self.name), Box::pin(task)));
        self
    }
}

/// A started process: where it listens, and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until every task and the HTTP server have finished; the first failure is the result.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await.context("the service runner panicked")?
    }

    /// Signals shutdown and waits for in-flight work to drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Starts the services on `listener`. A task that fails stops the whole process (its orchestrator restarts it).
pub fn start(ctx: &Context, services: Vec<Service>, listener: TcpListener, shutdown: CancellationToken) -> Running {
    // Install the recorder before any work runs, so nothing counted before the first scrape is lost.
    crate::telemetry::metrics_handle();
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut router = ops_router(Readiness {
        pool: ctx.pool.clone(),
        amqp: ctx.amqp.clone(),
    });
    let mut tasks: JoinSet<(String, anyhow::Result<()>)> = JoinSet::new();
    for service in services {
        tracing::info!(service = service.name, "starting");
        router = router.merge(service.routes);
        for (name, task) in service.tasks {
            tasks.spawn(async move { (name, task.await) });
        }
    }
    let http_shutdown = shutdown.clone();
    tasks.spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await
            .context("the HTTP server failed");
        ("http".to_string(), served)
    });
    let token = shutdown.clone();
    let done = tokio::spawn(async move {
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let (name, result) = match joined {
                Ok(r) => r,
                Err(e) => ("a task".to_string(), Err(anyhow::anyhow!("panicked: {e}"))),
            };
            match result {
                Ok(()) if token.is_cancelled() => {}
                Ok(()) => {
                    tracing::error!(task = %name, "stopped unexpectedly; shutting down");
                    first_error.get_or_insert(anyhow::anyhow!("{name} stopped unexpectedly"));
                    token.cancel();
                }
                Err(e) => {
                    tracing::error!(task = %name, error = format!("{e:#}"), "failed; shutting down");
                    first_error.get_or_insert(e.context(format!("{name} failed")));
                    token.cancel();
                }
            }
        }
        tracing::info!("stopped");
        first_error.map_or(Ok(()), Err)
    });
    Running { addr, shutdown, done }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn shutdown_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received; draining");
        token.cancel();
    });
}
