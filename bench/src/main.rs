//! `leadflow-bench`: drives the real `leadflow` services (one process each) against PostgreSQL, RabbitMQ and
//! postfix's `smtp-sink`, fully durable, and reports throughput, due-to-250 latency, CPU per 1,000 emails and peak
//! memory per process, next to the components' own ceilings measured in the same run. `deploy/bench.sh` prepares
//! the scratch database, the sink and the build, and cleans up; see docs/benchmarks.md.

mod campaign;
mod ceilings;
mod db;
mod load;
mod procs;
mod report;
mod services;
mod sink;
mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use tokio::time::Instant;

use leadflow_shared::config::{AmqpConfig, Config, Source};
use leadflow_shared::domain::parse_delay;
use leadflow_shared::topology::{Topology, WorkQueue};

use crate::db::Activity;
use crate::procs::{Members, Meter};
use crate::report::{Phase, Report};
use crate::services::{Launcher, ServiceProcess};
use crate::sink::Sink;

#[derive(Parser)]
#[command(
    name = "leadflow-bench",
    about = "Benchmark of the leadflow pipeline against its components' ceilings"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmark (deploy/bench.sh prepares everything it needs and cleans up afterwards).
    Run(Box<RunArgs>),
    /// Delete every queue and exchange of a namespace (the script calls this when the run ends, however it ends).
    Cleanup {
        #[arg(
            long,
            env = "BENCH_AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp_url: String,
        #[arg(long)]
        namespace: String,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// The `leadflow` binary under test.
    #[arg(long, default_value = "target/release/leadflow")]
    leadflow: PathBuf,
    /// The scratch database (created empty by the script; migrated here).
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// The scratch AMQP namespace (prefix of every exchange and queue).
    #[arg(long)]
    namespace: String,
    /// Where smtp-sink listens (host:port).
    #[arg(long)]
    smtp: String,
    /// smtp-sink's pid (for its CPU time).
    #[arg(long)]
    sink_pid: Option<u32>,
    /// The file smtp-sink's `-c` counters are written to: the emails the SMTP server accepted.
    #[arg(long)]
    sink_counter: PathBuf,
    /// Service logs, generated campaign files.
    #[arg(long)]
    work_dir: PathBuf,
    /// Small counts and short phases (under a minute); never fails on speed.
    #[arg(long)]
    quick: bool,
    /// Length of the sustained end-to-end run at `--rate` (or at the highest sustainable rate of the ladder).
    /// Default: 10m; with --quick, no separate sustained run (the ladder steps are reported).
    #[arg(long)]
    duration: Option<String>,
    /// Offered rate (events/s, one email each) of the sustained run; default: the highest sustainable ladder rate.
    #[arg(long)]
    rate: Option<f64>,
    /// The offered rates (events/s) of the latency ladder, ascending; it stops at the first one not sustained
    /// (when that is the first, it halves the rate until one is sustained, down to 50/s), then tries once the
    /// rate halfway between the highest sustained and the lowest not sustained.
    /// Default 1000,2000,3000,4000,6000,8000 (quick: 250, and no halfway step).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<f64>>,
    /// Length of each ladder step. Default 60s (quick: 3s).
    #[arg(long)]
    step_duration: Option<String>,
    /// Events posted in the HTTP ingest phase (default 200000; quick 10000); the AMQP phase publishes 20000
    /// (quick 1000).
    #[arg(long)]
    ingest_events: Option<u64>,
    /// Concurrent HTTP clients in the ingest phase (batches of 500).
    #[arg(long, default_value_t = 8)]
    ingest_clients: usize,
    /// Emails pre-queued for the renderer-alone and sender-alone phases (default 50000; quick 2000).
    #[arg(long)]
    isolated_emails: Option<u64>,
}

/// The lowest offered rate the ladder tries when its first rate is not sustained.
const MIN_RATE: f64 = 50.0;

/// Counts and lengths of one run.
#[derive(Debug, Clone)]
struct Plan {
    amqp_messages: u64,
    smtp_messages: u64,
    claim_rows: u64,
    ingest_http: u64,
    ingest_amqp: u64,
    rates: Vec<f64>,
    step: Duration,
    sustained: Option<Duration>,
    isolated: u64,
    /// The sustained run's offered rate (`--rate`).
    rate: Option<f64>,
    /// Quick mode: no refining step on the ladder.
    quick: bool,
    /// Longest wait without progress before work counts as stuck.
    stall: Duration,
}

impl Plan {
    fn from(args: &RunArgs) -> anyhow::Result<Self> {
        let q = args.quick;
        let dur = |raw: &Option<String>, default: Option<Duration>, what: &str| -> anyhow::Result<Option<Duration>> {
            match raw {
                None => Ok(default),
                Some(r) => Ok(Some(parse_delay(r).map_err(|e| anyhow::anyhow!("{what}: {e}"))?)),
            }
        };
        let mut rates = args.rates.clone().unwrap_or_else(|| {
            if q {
                vec![250.0]
            } else {
                vec![1000.0, 2000.0, 3000.0, 4000.0, 6000.0, 8000.0]
            }
        });
        rates.retain(|r| *r > 0.0);
        if rates.is_empty() {
            anyhow::bail!("--rates: give at least one rate above zero");
        }
        Ok(Self {
            amqp_messages: if q { 5_000 } else { 100_000 },
            smtp_messages: if q { 5_000 } else { 100_000 },
            claim_rows: if q { 20_000 } else { 200_000 },
            ingest_http: args.ingest_events.unwrap_or(if q { 10_000 } else { 200_000 }),
            ingest_amqp: if q { 1_000 } else { 20_000 },
            rates,
            step: dur(&args.step_duration, None, "--step-duration")?.unwrap_or(Duration::from_secs(if q {
                3
            } else {
                60
            })),
            // `--duration 0s`: no sustained run.
            sustained: dur(
                &args.duration,
                if q { None } else { Some(Duration::from_secs(600)) },
                "--duration",
            )?
            .filter(|d| !d.is_zero()),
            isolated: args.isolated_emails.unwrap_or(if q { 2_000 } else { 50_000 }),
            rate: args.rate.filter(|r| *r > 0.0),
            quick: q,
            stall: Duration::from_secs(if q { 10 } else { 30 }),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Cleanup { amqp_url, namespace } => cleanup(&amqp_url, &namespace).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn amqp_config(amqp_url: &str, namespace: &str) -> anyhow::Result<AmqpConfig> {
    let config = Config::load(&Source::from_pairs([
        ("LEADFLOW_AMQP_URL", amqp_url),
        ("LEADFLOW_NAMESPACE", namespace),
    ]))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(config.amqp)
}

/// The scratch queue of the RabbitMQ ceiling.
fn ceiling_queue(namespace: &str) -> String {
    format!("{namespace}.bench.ceiling")
}

async fn cleanup(amqp_url: &str, namespace: &str) -> anyhow::Result<()> {
    let config = amqp_config(amqp_url, namespace)?;
    let connection = leadflow_shared::amqp::connect(&config, "leadflow-bench-cleanup").await?;
    let channel = connection.create_channel().await?;
    let topology = Topology::new(&config);
    let mut queues = vec![ceiling_queue(namespace)];
    for q in WorkQueue::ALL {
        queues.push(topology.queue(q));
        queues.push(topology.dead_queue(q));
    }
    for name in queues {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for name in [
        topology.events_exchange(),
        topology.work_exchange(),
        topology.dead_exchange(),
        topology.bounces_exchange(),
    ] {
        let _ = channel
            .exchange_delete(name.as_str().into(), lapin::options::ExchangeDeleteOptions::default())
            .await;
    }
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    println!("bench: deleted the queues and exchanges of namespace {namespace}");
    Ok(())
}

/// Everything a run holds.
struct Bench {
    plan: Plan,
    launcher: Launcher,
    meter: Meter,
    sink: Sink,
    db: tokio_postgres::Client,
    amqp: lapin::Connection,
    topology: Topology,
    http: reqwest::Client,
    ingest_port: u16,
    procs: BTreeMap<String, ServiceProcess>,
    activity: Activity,
    report: Report,
    campaign_id: i64,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let plan = Plan::from(&args)?;
    std::fs::create_dir_all(&args.work_dir)?;
    let database = url::Url::parse(&args.database_url)
        .context("--database-url is not a URL")?
        .path()
        .trim_start_matches('/')
        .to_string();
    let db = db::connect(&args.database_url).await?;
    let amqp_conf = amqp_config(&args.amqp_url, &args.namespace)?;
    let amqp = leadflow_shared::amqp::connect(&amqp_conf, "leadflow-bench").await?;
    let meter = Meter::start();
    meter.track("bench (load)", Members::Pids(vec![std::process::id()]));
    meter.track("rabbitmq", Members::Named("beam.smp".into()));
    if let Some(pid) = args.sink_pid {
        meter.track("smtp-sink", Members::Pids(vec![pid]));
    }
    let activity = Activity::default();
    spawn_postgres_tracker(&args.database_url, &database, meter.clone(), activity.clone()).await?;

    let mut env: BTreeMap<String, String> = BTreeMap::new();
    // Tunables the caller exported win; the scratch resources do not.
    for (k, v) in std::env::vars() {
        if k.starts_with("LEADFLOW_") {
            env.insert(k, v);
        }
    }
    for (k, v) in [
        ("LEADFLOW_SCHEDULER_TICK", "100ms"),
        ("LEADFLOW_LOG", "warn"),
        ("LEADFLOW_LOG_FORMAT", "json"),
        ("LEADFLOW_TOKEN_KEYS", "bench:leadflow-bench-token-key-0123456789abcdef"),
        ("LEADFLOW_SMTP_TIMEOUT", "10s"),
    ] {
        env.entry(k.into()).or_insert_with(|| v.into());
    }
    for (k, v) in [
        ("LEADFLOW_DATABASE_URL", args.database_url.clone()),
        ("LEADFLOW_AMQP_URL", args.amqp_url.clone()),
        ("LEADFLOW_NAMESPACE", args.namespace.clone()),
        ("LEADFLOW_SMTP_URL", format!("smtp://{}", args.smtp)),
    ] {
        env.insert(k.into(), v);
    }
    let launcher = Launcher {
        exe: args.leadflow.clone(),
        env: env.clone(),
        log_dir: args.work_dir.clone(),
    };
    let mut bench = Bench {
        plan: plan.clone(),
        launcher,
        meter,
        sink: Sink::new(args.sink_counter.clone()),
        db,
        amqp,
        topology: Topology::new(&amqp_conf),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(128)
            .build()?,
        ingest_port: services::free_port()?,
        procs: BTreeMap::new(),
        activity,
        report: Report::default(),
        campaign_id: 0,
    };

    println!(
        "== leadflow benchmark ({}) ==",
        if args.quick { "quick" } else { "full" }
    );
    println!("plan: {plan:?}");
    for (k, v) in db::settings(&bench.db).await? {
        println!("postgres {k} = {v}");
    }
    let service_env: Vec<String> = env
        .iter()
        .filter(|(k, _)| !k.ends_with("_URL") && !k.contains("TOKEN_KEYS"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("service settings: {}", service_env.join(" "));
    println!("durability: persistent messages with publisher confirms, manual acks, synchronous_commit as above");

    let result = tokio::select! {
        result = bench.execute(&args) => result,
        () = interrupted() => Err(anyhow::anyhow!("interrupted (SIGINT or SIGTERM)")),
    };
    let stopped = bench.stop_all().await;
    bench.report.print_summary();
    if let Err(e) = &result {
        for p in ["ingest", "scheduler", "renderer", "sender"] {
            let log = args.work_dir.join(format!("{p}.log"));
            let tail = services::log_tail(&log, 5);
            if !tail.is_empty() {
                eprintln!("--- end of {p}.log ---\n{tail}");
            }
        }
        eprintln!("bench: {e:#}");
    }
    result.and(stopped)
}

/// Resolves on SIGINT or SIGTERM, so the services this run started are stopped before it exits.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Refreshes the PostgreSQL processes of the run, and samples what the services' sessions are doing, five times a
/// second.
async fn spawn_postgres_tracker(url: &str, database: &str, meter: Meter, activity: Activity) -> anyhow::Result<()> {
    let client = db::connect(url).await?;
    let database = database.to_string();
    let track = |meter: &Meter, (sessions, background): (Vec<u32>, Vec<u32>)| {
        meter.track("postgres", Members::External(sessions));
        meter.track("postgres (server)", Members::External(background));
    };
    track(&meter, db::postgres_pids(&client, &database).await?);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match db::postgres_pids(&client, &database).await {
                Ok(pids) => track(&meter, pids),
                Err(_) => return,
            }
            if let Ok(samples) = db::active_sessions(&client, &database).await {
                activity.add(samples);
            }
        }
    });
    Ok(())
}

impl Bench {
    async fn execute(&mut self, args: &RunArgs) -> anyhow::Result<()> {
        self.prepare().await?;
        self.ceilings(args).await?;
        self.ingest().await?;
        self.end_to_end().await?;
        self.isolated().await?;
        self.verify().await
    }

    async fn prepare(&mut self) -> anyhow::Result<()> {
        let out = self.launcher.run_command(&["migrate"]).await?;
        println!("migrate: {}", out.lines().next().unwrap_or("").trim());
        let dir = self.launcher.log_dir.join("campaign");
        campaign::write(&dir)?;
        let out = self
            .launcher
            .run_command(&["apply", "-f", &dir.display().to_string()])
            .await?;
        println!("apply: {}", out.split_whitespace().collect::<Vec<_>>().join(" "));
        self.campaign_id = db::count(&self.db, "SELECT id FROM campaigns WHERE name = 'bench'", &[]).await?;
        Ok(())
    }

    async fn ceilings(&mut self, args: &RunArgs) -> anyhow::Result<()> {
        println!("\n== ceilings (nothing of leadflow running) ==");
        let p = &self.plan;
        let before = self.meter.snapshot();
        let started = Instant::now();
        let amqp = ceilings::amqp(&self.amqp, &ceiling_queue(&args.namespace), p.amqp_messages, 300, 512).await?;
        println!(
            "rabbitmq, 300-byte persistent messages, classic queue v2, {} messages: publish with confirms (512 in \
             flight) {}; consume (prefetch 512, multi-ack every 128) {}; both at once (one hop) {}",
            stats::thousands(p.amqp_messages),
            stats::per_second(amqp.publish),
            stats::per_second(amqp.consume),
            stats::per_second(amqp.hop)
        );
        self.report.amqp = Some(amqp);
        let sink_before = self.sink.count()?;
        let smtp = ceilings::smtp_source(&args.smtp, 8, p.smtp_messages, 8000).await?;
        let sink_got = self.sink.count()? - sink_before;
        println!(
            "smtp-source -d -s 8 -l 8000 -m {} -> smtp-sink: {} (the sink counted {})",
            p.smtp_messages,
            stats::per_second(smtp),
            sink_got
        );
        if sink_got != p.smtp_messages {
            anyhow::bail!(
                "smtp-source sent {} messages, the sink counted {sink_got}",
                p.smtp_messages
            );
        }
        self.report.smtp = Some(smtp);
        let claims = ceilings::postgres_claims(&args.database_url, p.claim_rows, 4, 100).await?;
        println!(
            "postgres, 4 clients claiming 100 due rows per transaction (FOR UPDATE SKIP LOCKED), {} rows: {}",
            stats::thousands(p.claim_rows),
            stats::per_second(claims)
        );
        self.report.claims = Some(claims);
        let phase = Phase::new(
            "ceilings",
            0,
            started.elapsed(),
            &before,
            &self.meter.snapshot(),
            &self.meter,
        );
        phase.print_cpu("items");
        Ok(())
    }

    /// Starts `service` on a free port and waits until it is ready (and consuming, for a consumer).
    async fn start(&mut self, service: &str) -> anyhow::Result<()> {
        let port = if service == "ingest" {
            self.ingest_port
        } else {
            services::free_port()?
        };
        let mut proc = self.launcher.spawn(service, &format!("127.0.0.1:{port}"))?;
        let ready_url = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            proc.check_alive()?;
            let ok = self
                .http
                .get(&ready_url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() >= deadline {
                anyhow::bail!("{service} was not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let queue = match service {
            "ingest" => WorkQueue::IngestEvents,
            "scheduler" => WorkQueue::Scheduler,
            "renderer" => WorkQueue::Renderer,
            _ => WorkQueue::Sender,
        };
        self.wait_for_consumer(queue).await?;
        self.meter.track(service, Members::Pids(vec![proc.pid]));
        self.procs.insert(service.to_string(), proc);
        Ok(())
    }

    async fn stop(&mut self, service: &str) -> anyhow::Result<()> {
        if let Some(proc) = self.procs.remove(service) {
            proc.stop(Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    async fn stop_all(&mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        for service in ["ingest", "scheduler", "renderer", "sender"] {
            if let Err(e) = self.stop(service).await {
                result = Err(e);
            }
        }
        result
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for proc in self.procs.values_mut() {
            proc.check_alive()?;
        }
        Ok(())
    }

    /// (ready messages, consumers) of a work queue.
    async fn queue_state(&self, queue: WorkQueue) -> anyhow::Result<(u32, u32)> {
        let channel = self.amqp.create_channel().await?;
        let name = self.topology.queue(queue);
        let q = channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("queue {name} does not exist"))?;
        let _ = channel.close(200, "done".into()).await;
        Ok((q.message_count(), q.consumer_count()))
    }

    async fn wait_for_consumer(&self, queue: WorkQueue) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.queue_state(queue).await?.1 > 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!("nobody consumes {} after 30 s", self.topology.queue(queue));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn events_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/events", self.ingest_port)
    }

    async fn ingest(&mut self) -> anyhow::Result<()> {
        println!("\n== ingest (ingest alone; the scheduler is not running) ==");
        self.start("ingest").await?;
        let base = db::count(&self.db, "SELECT coalesce(max(id), 0) FROM events", &[]).await?;

        let n = self.plan.ingest_http;
        let before = self.meter.snapshot();
        let activity = self.activity.snapshot();
        let started = Instant::now();
        let accepted = load::http_flood(&self.http, &self.events_url(), "ingest-http", n, 500, 8).await?;
        let elapsed = started.elapsed();
        let phase = Phase::new(
            "ingest HTTP",
            accepted,
            elapsed,
            &before,
            &self.meter.snapshot(),
            &self.meter,
        );
        let stored = db::count(&self.db, "SELECT count(*) FROM events WHERE id > $1", &[&base]).await?;
        if accepted != n || stored as u64 != n {
            anyhow::bail!("HTTP ingest: posted {n} events, {accepted} accepted, {stored} stored");
        }
        println!(
            "HTTP: {} events in 500-event batches from 8 clients in {:.2} s: {} (all {stored} committed)",
            stats::thousands(n),
            elapsed.as_secs_f64(),
            stats::per_second(phase.rate())
        );
        phase.print_cpu("events");
        self.activity.print_since(&activity);
        self.report.ingest_http = Some(phase.rate());
        self.report.phases.push(phase);

        let n = self.plan.ingest_amqp;
        let base = db::count(&self.db, "SELECT coalesce(max(id), 0) FROM events", &[]).await?;
        let channel = ceilings::confirm_channel(&self.amqp).await?;
        let before = self.meter.snapshot();
        let started = Instant::now();
        let bodies = (0..n).map(|i| serde_json::to_vec(&load::event("ingest-amqp", i)).unwrap_or_default());
        let props = ceilings::persistent("application/cloudevents+json");
        ceilings::publish_window(
            &channel,
            &self.topology.events_exchange(),
            load::EVENT_TYPE,
            bodies,
            &props,
            512,
        )
        .await?;
        let published = started.elapsed();
        let mut last = (0i64, Instant::now());
        loop {
            let stored = db::count(&self.db, "SELECT count(*) FROM events WHERE id > $1", &[&base]).await?;
            if stored as u64 >= n {
                break;
            }
            if stored > last.0 {
                last = (stored, Instant::now());
            } else if last.1.elapsed() > self.plan.stall {
                anyhow::bail!("AMQP ingest stalled at {stored} of {n} events");
            }
            self.check_alive()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = started.elapsed();
        let _ = channel.close(200, "done".into()).await;
        let phase = Phase::new("ingest AMQP", n, elapsed, &before, &self.meter.snapshot(), &self.meter);
        println!(
            "AMQP: {} events published to {} (confirms, 512 in flight) in {:.2} s, all committed after {:.2} s: {}",
            stats::thousands(n),
            self.topology.events_exchange(),
            published.as_secs_f64(),
            elapsed.as_secs_f64(),
            stats::per_second(phase.rate())
        );
        phase.print_cpu("events");
        self.report.ingest_amqp = Some(phase.rate());
        self.report.phases.push(phase);

        // The ingest phase's events are not part of the email phases: the hand-offs are dropped (after ingest has
        // stopped, so none is still on its way) and the events marked handled, so the scheduler never sees them.
        self.stop("ingest").await?;
        let channel = self.amqp.create_channel().await?;
        channel
            .queue_purge(
                self.topology.queue(WorkQueue::Scheduler).as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await?;
        let _ = channel.close(200, "done".into()).await;
        self.db
            .execute("UPDATE events SET handled_at = now() WHERE handled_at IS NULL", &[])
            .await?;
        Ok(())
    }

    async fn end_to_end(&mut self) -> anyhow::Result<()> {
        println!(
            "\n== end to end: HTTP events at a fixed offered rate -> ingest -> scheduler -> renderer -> sender -> \
             smtp-sink =="
        );
        println!(
            "each event enrolls a new lead in campaign `bench` (one step, delay 0s); latency = sent_at (recorded \
             after the 250) - due_at; sustained = every event accepted on time, at most one second of offered \
             load waiting when offering stops, and that cleared within max(2 s, 10% of the step)"
        );
        for service in ["ingest", "scheduler", "renderer", "sender"] {
            self.start(service).await?;
        }
        let rates = self.plan.rates.clone();
        let mut highest: Option<f64> = None;
        let mut failed: Option<f64> = None;
        for rate in rates {
            if self.ladder_step(rate).await? {
                highest = Some(rate);
            } else {
                failed = Some(rate);
                break;
            }
        }
        // Not even the first rate held: halve it until one does, so the run still finds the highest sustainable
        // rate (and the sustained run has one to use).
        let mut rate = (self.plan.rates[0] / 2.0).round();
        while highest.is_none() && rate >= MIN_RATE {
            if self.ladder_step(rate).await? {
                highest = Some(rate);
            } else {
                failed = Some(rate);
            }
            rate = (rate / 2.0).round();
        }
        // One more step halfway between the highest rate that held and the lowest that did not.
        if let (Some(low), Some(high), false) = (highest, failed, self.plan.quick) {
            let middle = ((low + high) / 2.0).round();
            if middle > low && middle < high && self.ladder_step(middle).await? {
                highest = Some(middle);
            }
        }
        self.report.highest_sustained = highest;
        if let Some(duration) = self.plan.sustained {
            if self.plan.rate.is_none() && highest.is_none() {
                println!("\n-- no sustained run: no offered rate down to {MIN_RATE}/s was sustained --");
                return Ok(());
            }
            let rate = self.report_rate(highest);
            println!(
                "\n-- sustained run: {} offered for {:?} --",
                stats::per_second(rate),
                duration
            );
            let step = self.step(rate, duration, "e2e-sustained").await?;
            self.report.sustained = Some(step);
        }
        Ok(())
    }

    /// One ladder step at `rate`; whether it was sustained.
    async fn ladder_step(&mut self, rate: f64) -> anyhow::Result<bool> {
        let step = self.step(rate, self.plan.step, &format!("e2e-{rate}")).await?;
        let sustained = step.sustained;
        self.report.steps.push(step);
        Ok(sustained)
    }

    /// `--rate`, else the highest sustained ladder rate, else the lowest one.
    fn report_rate(&self, highest: Option<f64>) -> f64 {
        self.plan.rate.or(highest).unwrap_or(self.plan.rates[0])
    }

    /// One end-to-end step: offer `rate` events/s for `duration`, wait for the backlog to clear, measure.
    async fn step(&mut self, rate: f64, duration: Duration, tag: &str) -> anyhow::Result<report::Step> {
        let base = db::max_delivery_id(&self.db).await?;
        let sink0 = self.sink.count()?;
        let before = self.meter.snapshot();
        let activity = self.activity.snapshot();
        let started = Instant::now();
        let offer = {
            let (http, url, tag) = (self.http.clone(), self.events_url(), tag.to_string());
            tokio::spawn(async move { load::http_paced(&http, &url, &tag, rate, duration, 500).await })
        };
        // The first part of the step fills the pipeline; the steady rate is measured after it.
        let warmup = (duration / 5).clamp(Duration::from_millis(500), Duration::from_secs(10));
        tokio::time::sleep(warmup).await;
        let (sink_w, t_w) = (self.sink.count()?, Instant::now());
        let mut backlog_peak = 0u64;
        let offered = loop {
            if offer.is_finished() {
                break offer.await.context("the load generator panicked")??;
            }
            self.check_alive()?;
            let sent = self.sink.count()? - sink0;
            let due = (rate * started.elapsed().as_secs_f64().min(duration.as_secs_f64())) as u64;
            backlog_peak = backlog_peak.max(due.saturating_sub(sent));
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (sink1, t1) = (self.sink.count()?, Instant::now());
        let expected = offered.accepted;
        let backlog_at_end = expected.saturating_sub(sink1 - sink0);
        let drained = self.wait_for_sink(sink0 + expected).await?;
        let drain = t1.elapsed();
        let after = self.meter.snapshot();
        let elapsed = started.elapsed();
        // Anything more than expected is an email sent twice.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = self.sink.count()? - sink0;
        let upto = db::max_delivery_id(&self.db).await?;
        let sent = db::deliveries_in_state(&self.db, base, upto, "sent").await?;
        let created = upto - base;
        if !drained || got != expected || sent as u64 != expected || created as u64 != expected {
            let states = db::states(&self.db, base).await?;
            anyhow::bail!(
                "{tag}: {expected} events accepted, {created} deliveries created, {sent} recorded sent, the SMTP \
                 server received {got}; deliveries by state: {states:?}"
            );
        }
        let latency = stats::Latency::of(db::latencies_ms(&self.db, base, upto).await?);
        let from_event = stats::Latency::of(db::event_latencies_ms(&self.db, base, upto).await?);
        let steady = stats::rate(sink1 - sink_w, t1 - t_w);
        let drain_allowed = Duration::from_secs(2).max(duration / 10);
        let sustained = offered.offered == offered.accepted
            && offered.late_ticks == 0
            && (backlog_at_end as f64) <= rate.max(50.0)
            && drain <= drain_allowed;
        let phase = Phase::new(tag, expected, elapsed, &before, &after, &self.meter);
        println!(
            "\n-- {} offered for {:.0} s: {} events accepted; steady sink rate {} ({}), backlog at the end of \
             offering {} (peak {}), cleared {:.2} s later; slowest HTTP batch {} ms; {} --",
            stats::per_second(rate),
            duration.as_secs_f64(),
            stats::thousands(expected),
            stats::per_second(steady),
            stats::percent(stats::ratio(steady, rate)),
            backlog_at_end,
            backlog_peak,
            drain.as_secs_f64(),
            offered.slowest.as_millis(),
            if sustained { "SUSTAINED" } else { "NOT sustained" }
        );
        if offered.late_ticks > 0 {
            println!(
                "   the load generator was held back {} times (64 requests outstanding)",
                offered.late_ticks
            );
        }
        match &latency {
            Some(l) => println!("   due_at -> 250 latency: {l}"),
            None => println!("   due_at -> 250 latency: no emails"),
        }
        if let Some(l) = &from_event {
            println!("   event accepted -> 250 latency (due time as the event set it, delay 0s): {l}");
        }
        phase.print_cpu("emails");
        self.activity.print_since(&activity);
        Ok(report::Step {
            rate,
            duration,
            emails: expected,
            steady,
            drain,
            sustained,
            latency,
            from_event,
            phase,
        })
    }

    /// Waits until the sink has counted `target` emails, as long as the count keeps moving; false when it stalled.
    async fn wait_for_sink(&mut self, target: u64) -> anyhow::Result<bool> {
        let mut last = (self.sink.count()?, Instant::now());
        loop {
            let now = self.sink.count()?;
            if now >= target {
                return Ok(true);
            }
            if now > last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > self.plan.stall {
                return Ok(false);
            }
            self.check_alive()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` deliveries above `base` are in `state`, as long as the count keeps moving. Returns when the
    /// first one got there and when the last one did.
    async fn wait_for_state(&mut self, base: i64, n: u64, state: &str) -> anyhow::Result<(Instant, Instant)> {
        let upto = i64::MAX;
        let mut first: Option<Instant> = None;
        let mut last = (0i64, Instant::now());
        loop {
            let count = db::deliveries_in_state(&self.db, base, upto, state).await?;
            if count > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if count as u64 >= n {
                let now = Instant::now();
                return Ok((first.unwrap_or(now), now));
            }
            if count > last.0 {
                last = (count, Instant::now());
            } else if last.1.elapsed() > self.plan.stall {
                let states = db::states(&self.db, base).await?;
                anyhow::bail!("stuck at {count} of {n} deliveries {state}; by state: {states:?}");
            }
            self.check_alive()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn isolated(&mut self) -> anyhow::Result<()> {
        let n = self.plan.isolated;
        println!(
            "\n== each service alone from a pre-filled queue ({} emails) ==",
            stats::thousands(n)
        );
        self.stop("sender").await?;
        self.stop("renderer").await?;
        let base = db::max_delivery_id(&self.db).await?;
        let accepted = load::http_flood(&self.http, &self.events_url(), "isolated", n, 500, 4).await?;
        if accepted != n {
            anyhow::bail!("pre-fill: {accepted} of {n} events accepted");
        }
        self.wait_for_state(base, n, "queued").await?;
        let (ready, _) = self.queue_state(WorkQueue::Renderer).await?;
        println!("renderer queue pre-filled: {ready} messages carrying {n} delivery ids");

        let before = self.meter.snapshot();
        let activity = self.activity.snapshot();
        self.start("renderer").await?;
        let started = Instant::now();
        let (_, done) = self.wait_for_state(base, n, "rendered").await?;
        let elapsed = done - started;
        let phase = Phase::new(
            "renderer alone",
            n,
            elapsed,
            &before,
            &self.meter.snapshot(),
            &self.meter,
        );
        println!(
            "renderer alone: {} emails rendered in {:.2} s (from its consumer starting): {}",
            stats::thousands(n),
            elapsed.as_secs_f64(),
            stats::per_second(phase.rate())
        );
        phase.print_cpu("emails");
        self.activity.print_since(&activity);
        self.report.renderer_alone = Some(phase.rate());
        self.report.phases.push(phase);

        let (ready, _) = self.queue_state(WorkQueue::Sender).await?;
        println!("sender queue pre-filled: {ready} messages");
        let sink0 = self.sink.count()?;
        let before = self.meter.snapshot();
        let activity = self.activity.snapshot();
        self.start("sender").await?;
        let started = Instant::now();
        if !self.wait_for_sink(sink0 + n).await? {
            let states = db::states(&self.db, base).await?;
            anyhow::bail!("sender alone: stalled; deliveries by state: {states:?}");
        }
        let elapsed = started.elapsed();
        let after = self.meter.snapshot();
        self.wait_for_state(base, n, "sent").await?;
        let phase = Phase::new("sender alone", n, elapsed, &before, &after, &self.meter);
        println!(
            "sender alone: {} emails accepted by the sink in {:.2} s (from its consumer starting): {}",
            stats::thousands(n),
            elapsed.as_secs_f64(),
            stats::per_second(phase.rate())
        );
        phase.print_cpu("emails");
        self.activity.print_since(&activity);
        self.report.sender_alone = Some(phase.rate());
        self.report.phases.push(phase);
        Ok(())
    }

    /// Nothing lost, nothing doubled, nothing dead-lettered over the whole run.
    async fn verify(&mut self) -> anyhow::Result<()> {
        println!("\n== checks ==");
        let states = db::states(&self.db, 0).await?;
        let not_sent: i64 = states.iter().filter(|(s, _)| s != "sent").map(|(_, n)| n).sum();
        let sent: i64 = states.iter().filter(|(s, _)| s == "sent").map(|(_, n)| n).sum();
        let events = db::count(
            &self.db,
            "SELECT count(*) FROM events WHERE source = '/bench/shop' AND event_id NOT LIKE 'ingest-%'",
            &[],
        )
        .await?;
        let mut dead = 0;
        for q in WorkQueue::ALL {
            let channel = self.amqp.create_channel().await?;
            let name = self.topology.dead_queue(q);
            if let Ok(info) = channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
            {
                dead += info.message_count();
            }
            let _ = channel.close(200, "done".into()).await;
        }
        println!(
            "deliveries by state: {states:?}; email events: {events}; dead-lettered messages: {dead}; campaign id {}",
            self.campaign_id
        );
        if not_sent > 0 || sent != events || dead > 0 {
            anyhow::bail!(
                "{events} events should have produced {events} sent emails: {sent} sent, {not_sent} not sent, {dead} \
                 dead-lettered"
            );
        }
        println!("every accepted event produced exactly one email, accepted once by the SMTP server");
        Ok(())
    }
}
