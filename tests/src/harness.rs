//! One isolated pipeline per test: its own database, AMQP namespace, SMTP server and running services.
//!
//! Databases are cloned from a migrated template database (`CREATE DATABASE .. TEMPLATE ..`), which costs tens of
//! milliseconds instead of a full migration. The template's name carries a hash of the migration texts, so a
//! changed migration gets a fresh template; it is built once per test process under an advisory lock, so several
//! test processes can start at once. A test's database is dropped when its [`TestApp`] is dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use leadflow::Component;
use leadflow_shared::amqp::{self, Publisher, ERROR_HEADER};
use leadflow_shared::config::{AmqpConfig, Config, DatabaseConfig, Source};
use leadflow_shared::db::{self, MIGRATIONS};
use leadflow_shared::service::Running;
use leadflow_shared::topology::{Topology, WorkQueue};

use crate::smtp::SmtpServer;

/// How long a test waits for background work before it fails.
pub const DEADLINE: Duration = Duration::from_secs(25);

/// The token keys every test app signs unsubscribe and bounce tokens with (tests sign their own to compare).
pub const TEST_TOKEN_KEYS: &str = "t1:test-token-key-0123456789abcdef0123456789";

/// The advisory lock key that serialises template creation across test processes ("lf-tmpl").
const TEMPLATE_LOCK: i64 = 0x006c_662d_746d_706c;

/// Where the test databases live: `LEADFLOW_TEST_DATABASE_URL` or the local server.
fn database_base_url() -> url::Url {
    let raw =
        std::env::var("LEADFLOW_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    url::Url::parse(&raw).unwrap_or_else(|e| panic!("LEADFLOW_TEST_DATABASE_URL is not a URL: {e}"))
}

/// The broker the tests use: `LEADFLOW_TEST_AMQP_URL` or the local one.
fn amqp_url() -> String {
    std::env::var("LEADFLOW_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The connection URL of database `name` on the test server.
fn database_url(name: &str) -> String {
    let mut url = database_base_url();
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// The folder holding the campaign and template files the tests apply.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// 12 random hex digits for database and namespace names.
fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Quotes an identifier for SQL.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// FNV-1a, 64 bits: stable across builds and processes, unlike `DefaultHasher`.
fn fnv1a<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A hash of every migration: a changed migration means a new template.
fn migrations_hash() -> u64 {
    let mut all = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        all.extend_from_slice(&version.to_le_bytes());
        all.extend_from_slice(name.as_bytes());
        all.push(0);
        all.extend_from_slice(sql.as_bytes());
        all.push(0);
    }
    fnv1a(&all)
}

/// The advisory lock a test process holds on a test database from before creating it until the test ends, so a
/// cleanup in another process never mistakes a database not yet connected to for a leftover.
fn owner_lock(database: &str) -> i64 {
    fnv1a(database.as_bytes()) as i64
}

/// The name of the migrated template database, created on first use in this process.
async fn template_database() -> String {
    static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            create_template()
                .await
                .unwrap_or_else(|e| panic!("failed to prepare the template database: {e:#}"))
        })
        .await
        .clone()
}

async fn create_template() -> anyhow::Result<String> {
    let name = format!("lf_template_{:016x}", migrations_hash());
    let admin = connect(&database_url("postgres")).await?;
    admin.execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK]).await?;
    let result = create_template_locked(&admin, &name).await;
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
        .await?;
    result.map(|()| name)
}

async fn create_template_locked(admin: &tokio_postgres::Client, name: &str) -> anyhow::Result<()> {
    // Databases of earlier runs nobody is connected to: test databases a killed process left behind, and
    // templates of older migrations (kept when LEADFLOW_TEST_KEEP_TEMPLATES is set, for checkouts of different
    // migrations testing side by side on one server).
    let keep_templates = std::env::var_os("LEADFLOW_TEST_KEEP_TEMPLATES").is_some();
    let leftovers = admin
        .query(
            "SELECT datname FROM pg_database d
              WHERE (datname LIKE 'lf\\_test\\_%' OR (datname LIKE 'lf\\_template\\_%' AND datname <> $1 AND NOT $2))
                AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)",
            &[&name, &keep_templates],
        )
        .await?;
    for row in leftovers {
        let leftover: String = row.get(0);
        let key = owner_lock(&leftover);
        let owned = leftover.starts_with("lf_test_");
        if owned {
            let free: bool = admin
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await?
                .get(0);
            if !free {
                // A running test owns it.
                continue;
            }
        }
        // Someone may have connected since: then it is not a leftover, and the drop fails harmlessly.
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {}", ident(&leftover)))
            .await;
        if owned {
            admin.execute("SELECT pg_advisory_unlock($1)", &[&key]).await?;
        }
    }
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if exists {
        return Ok(());
    }
    // Built under another name and renamed when complete: a half-migrated template is never used.
    let building = format!("{name}_new");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&building)))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {}", ident(&building)))
        .await?;
    {
        let pool = db::pool(&DatabaseConfig {
            url: database_url(&building).into(),
            pool_size: 1,
        })?;
        db::migrate(&pool).await?;
        pool.close();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let renamed = admin
            .batch_execute(&format!(
                "ALTER DATABASE {} RENAME TO {}",
                ident(&building),
                ident(name)
            ))
            .await;
        match renamed {
            Ok(()) => return Ok(()),
            // The migration connection is still closing.
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Drops a test's database (and deletes its AMQP queues and exchanges) when the test ends, pass or fail.
struct Cleanup {
    database: String,
    amqp: Option<AmqpConfig>,
    /// The session holding the owner lock (see [`owner_lock`]); released when this is dropped, after the database.
    _owner: tokio_postgres::Client,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let database = self.database.clone();
        let amqp = self.amqp.clone();
        // Drop may run inside the test's runtime (which cannot block on itself) or during a panic: a thread with
        // its own runtime does the work, and the test waits for it so nothing is left when the process exits.
        let worker = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(15), async {
                    if let Ok(admin) = connect(&database_url("postgres")).await {
                        let _ = admin
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&database)))
                            .await;
                    }
                    if let Some(amqp) = amqp {
                        delete_namespace(&amqp).await;
                    }
                })
                .await;
            });
        });
        let _ = worker.join();
    }
}

/// Deletes every queue and exchange of a test's namespace (queues would expire on their own; exchanges not).
async fn delete_namespace(config: &AmqpConfig) {
    let Ok(connection) = amqp::connect(config, "leadflow-tests-cleanup").await else {
        return;
    };
    if let Ok(channel) = connection.create_channel().await {
        let topology = Topology::new(config);
        for q in WorkQueue::ALL {
            for name in [topology.queue(q), topology.dead_queue(q)] {
                let _ = channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for name in [
            topology.events_exchange(),
            topology.work_exchange(),
            topology.dead_exchange(),
            topology.bounces_exchange(),
            topology.lead_events_exchange(),
        ] {
            let _ = channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = channel.close(200, "done".into()).await;
    }
    let _ = connection.close(200, "test finished".into()).await;
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A valid CloudEvent of `event_type` for `email`, with a fresh id and a complete `data`; edit it as needed.
pub fn event(event_type: &str, email: &str) -> Value {
    let mut data = json!({
        "email": email,
        "first_name": "Ann",
        "last_name": "Lee",
        "country": "GB",
        "language": "en",
        "product": {
            "sku": "TR-2",
            "name": "Trail Runner 2",
            "price": 89.9,
            "currency": "EUR",
            "url": "https://shop.example/p/trail-runner-2"
        }
    });
    if event_type == "order.completed" {
        data["order_id"] = json!(format!("o-{}", short_id()));
        data["amount"] = json!(89.9);
        data["currency"] = json!("EUR");
    }
    json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": "/tests/shop",
        "type": event_type,
        "time": Utc::now().to_rfc3339(),
        "datacontenttype": "application/json",
        "data": data
    })
}

/// One delivery row, as the tests look at it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    pub id: i64,
    pub campaign: String,
    pub step: i16,
    pub state: String,
    pub reason: Option<String>,
    pub attempts: i32,
    pub due_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub enrolled_at: DateTime<Utc>,
}

/// Starts a [`TestApp`] with chosen components, variables and extra fixtures.
#[derive(Debug, Clone)]
pub struct TestAppBuilder {
    components: Vec<Component>,
    env: Vec<(String, String)>,
    variants: Vec<String>,
}

impl TestAppBuilder {
    /// The services to run in process (default: all).
    pub fn components(mut self, components: &[Component]) -> Self {
        self.components = components.to_vec();
        self
    }

    /// Sets (or overrides) a `LEADFLOW_*` variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Also applies `fixtures/variants/<name>` after the base fixtures, before the services start.
    pub fn variant(mut self, name: &str) -> Self {
        self.variants.push(name.to_string());
        self
    }

    pub async fn spawn(self) -> TestApp {
        TestApp::start(self).await
    }
}

/// A child process running some services (`leadflow run <components>`), killed when dropped.
pub struct ServiceProcess {
    child: tokio::process::Child,
}

impl ServiceProcess {
    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGKILL (no graceful shutdown: nothing is drained or acknowledged) and reaps the process.
    pub async fn kill(mut self) {
        self.child
            .kill()
            .await
            .unwrap_or_else(|e| panic!("failed to kill the service process: {e}"));
    }

    /// Whether the process has exited already (then with which status).
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// A running pipeline for one test.
pub struct TestApp {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    /// The SMTP server the sender delivers to.
    pub smtp: SmtpServer,
    /// The configuration the services run with.
    pub config: Config,
    /// The AMQP namespace (`t<12 hex>`).
    pub namespace: String,
    /// The database name (`lf_test_<12 hex>`).
    pub database: String,
    env: Vec<(String, String)>,
    pool: Pool,
    http: reqwest::Client,
    amqp: lapin::Connection,
    publisher: Publisher,
    topology: Topology,
    running: Option<Running>,
    // Last: dropped after everything that holds connections.
    _cleanup: Cleanup,
}

impl TestApp {
    /// Every service in process, base fixtures applied.
    pub async fn spawn() -> Self {
        Self::builder().spawn().await
    }

    /// The given services in process, with extra `LEADFLOW_*` variables.
    pub async fn spawn_with(components: &[Component], extra_env: &[(&str, &str)]) -> Self {
        let mut builder = Self::builder().components(components);
        for (k, v) in extra_env {
            builder = builder.env(k, v);
        }
        builder.spawn().await
    }

    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            components: vec![Component::All],
            env: Vec::new(),
            variants: Vec::new(),
        }
    }

    async fn start(builder: TestAppBuilder) -> Self {
        let template = template_database().await;
        let database = format!("lf_test_{}", short_id());
        let namespace = format!("t{}", short_id());
        let owner = connect(&database_url("postgres"))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL server: {e}"));
        owner
            .execute("SELECT pg_advisory_lock($1)", &[&owner_lock(&database)])
            .await
            .unwrap_or_else(|e| panic!("cannot take the test database's owner lock: {e}"));
        owner
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE {}",
                ident(&database),
                ident(&template)
            ))
            .await
            .unwrap_or_else(|e| panic!("failed to create the test database from {template}: {e}"));
        // From here on the database is dropped however the test ends.
        let mut cleanup = Cleanup {
            database: database.clone(),
            amqp: None,
            _owner: owner,
        };

        let smtp = SmtpServer::start().await;
        let mut env: Vec<(String, String)> = [
            ("LEADFLOW_DATABASE_URL", database_url(&database)),
            ("LEADFLOW_DATABASE_POOL_SIZE", "8".into()),
            ("LEADFLOW_AMQP_URL", amqp_url()),
            ("LEADFLOW_TOKEN_KEYS", TEST_TOKEN_KEYS.into()),
            ("LEADFLOW_NAMESPACE", namespace.clone()),
            ("LEADFLOW_AMQP_QUEUE_EXPIRES", "2m".into()),
            ("LEADFLOW_SMTP_URL", smtp.url()),
            ("LEADFLOW_SMTP_TIMEOUT", "10s".into()),
            ("LEADFLOW_HTTP_ADDR", "127.0.0.1:0".into()),
            ("LEADFLOW_SCHEDULER_TICK", "100ms".into()),
            ("LEADFLOW_RETRY_BASE", "1s".into()),
            ("LEADFLOW_SENDER_MAX_ATTEMPTS", "3".into()),
            ("LEADFLOW_LEASE", "10m".into()),
            ("LEADFLOW_LOG_FORMAT", "pretty".into()),
            (
                "LEADFLOW_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let builder_sets_tick = builder.env.iter().any(|(k, _)| k == "LEADFLOW_SCHEDULER_TICK");
        for (k, v) in builder.env {
            env.retain(|(key, _)| *key != k);
            env.push((k, v));
        }
        let config = match Config::load(&Source::from_pairs(env.clone())) {
            // A build whose delays have whole seconds only: tick every second instead.
            Err(e) if e.var == "LEADFLOW_SCHEDULER_TICK" && !builder_sets_tick => {
                env.retain(|(key, _)| key != "LEADFLOW_SCHEDULER_TICK");
                env.push(("LEADFLOW_SCHEDULER_TICK".into(), "1s".into()));
                Config::load(&Source::from_pairs(env.clone()))
            }
            loaded => loaded,
        }
        .unwrap_or_else(|e| panic!("the test configuration is invalid: {e}"));
        cleanup.amqp = Some(config.amqp.clone());
        leadflow_shared::telemetry::init_logging(&config.log);

        let pool = db::pool(&DatabaseConfig {
            pool_size: 4,
            ..config.database.clone()
        })
        .unwrap_or_else(|e| panic!("failed to build the test pool: {e:#}"));
        let mut fixtures = vec![fixtures_dir().join("base")];
        fixtures.extend(builder.variants.iter().map(|v| fixtures_dir().join("variants").join(v)));
        for dir in fixtures {
            leadflow::apply::apply_path(&pool, &dir)
                .await
                .unwrap_or_else(|e| panic!("failed to apply {}: {e:#}", dir.display()));
        }

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
        let running = leadflow::start(config.clone(), &builder.components, listener, CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("the services failed to start: {e:#}"));
        let addr = running.addr;

        let amqp = amqp::connect(&config.amqp, "leadflow-tests")
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test broker: {e:#}"));
        let topology = Topology::new(&config.amqp);
        let publisher = Publisher::new(&amqp, topology.clone())
            .await
            .unwrap_or_else(|e| panic!("cannot open a publisher: {e:#}"));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap_or_else(|e| panic!("cannot build an HTTP client: {e}"));
        Self {
            addr,
            smtp,
            config,
            namespace,
            database,
            env,
            pool,
            http,
            amqp,
            publisher,
            topology,
            running: Some(running),
            _cleanup: cleanup,
        }
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The `LEADFLOW_*` variables the services run with.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Posts one event (a JSON object) or a batch (a JSON array) with the matching CloudEvents content type.
    pub async fn post_events(&self, body: &Value) -> reqwest::Response {
        let content_type = if body.is_array() {
            "application/cloudevents-batch+json"
        } else {
            "application/cloudevents+json"
        };
        self.post_raw(content_type, body.to_string()).await
    }

    /// Posts one event or a batch and insists on 202 Accepted.
    pub async fn post_event(&self, body: &Value) {
        let response = self.post_events(body).await;
        let status = response.status();
        if status != reqwest::StatusCode::ACCEPTED {
            let text = response.text().await.unwrap_or_default();
            panic!("POST /v1/events answered {status}, expected 202 Accepted: {text}");
        }
    }

    /// Posts `body` to /v1/events with any content type.
    pub async fn post_raw(&self, content_type: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(self.url("/v1/events"))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /v1/events failed: {e}"))
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}"))
    }

    /// A valid CloudEvent for `email` (see [`event`]).
    pub fn event(&self, event_type: &str, email: &str) -> Value {
        event(event_type, email)
    }

    /// Publishes raw bytes to the events exchange with `event_type` as routing key, as an upstream system does.
    pub async fn publish_event(&self, event_type: &str, body: &[u8]) {
        self.publisher
            .publish_event(event_type, body)
            .await
            .unwrap_or_else(|e| panic!("failed to publish a {event_type} event: {e:#}"));
    }

    /// Takes every message from the dead-letter queue of `queue`: (body, reason header).
    pub async fn dead_letters(&self, queue: WorkQueue) -> Vec<(String, Option<String>)> {
        let channel = self
            .amqp
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("cannot open a channel: {e}"));
        let name = self.topology.dead_queue(queue);
        let mut out = Vec::new();
        loop {
            let got = channel
                .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap_or_else(|e| panic!("basic.get from {name} failed: {e}"));
            let Some(message) = got else { break };
            let delivery = message.delivery;
            let reason = delivery.properties.headers().as_ref().and_then(|headers| {
                headers
                    .inner()
                    .iter()
                    .find(|(k, _)| k.as_str() == ERROR_HEADER)
                    .map(|(_, v)| match v {
                        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                        AMQPValue::ShortString(s) => s.as_str().to_string(),
                        other => format!("{other:?}"),
                    })
            });
            out.push((String::from_utf8_lossy(&delivery.data).into_owned(), reason));
        }
        let _ = channel.close(200, "done".into()).await;
        out
    }

    /// Waits until `n` messages sit in the dead-letter queue of `queue` and takes them.
    pub async fn wait_for_dead_letters(&self, queue: WorkQueue, n: usize) -> Vec<(String, Option<String>)> {
        let deadline = Instant::now() + DEADLINE;
        let mut got = Vec::new();
        loop {
            got.extend(self.dead_letters(queue).await);
            if got.len() >= n {
                return got;
            }
            if Instant::now() >= deadline {
                panic!(
                    "expected {n} dead-lettered message(s) in {} within {DEADLINE:?}, got {got:?}",
                    self.topology.dead_queue(queue)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// (messages ready, consumers) of `queue`.
    pub async fn queue_state(&self, queue: WorkQueue) -> (u32, u32) {
        let channel = self
            .amqp
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("cannot open a channel: {e}"));
        let name = self.topology.queue(queue);
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("queue {name} does not exist: {e}"));
        let _ = channel.close(200, "done".into()).await;
        (q.message_count(), q.consumer_count())
    }

    /// Waits until `queue` has at least `n` consumers (a started process is consuming).
    pub async fn wait_for_consumers(&self, queue: WorkQueue, n: u32) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (_, consumers) = self.queue_state(queue).await;
            if consumers >= n {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} has {consumers} consumer(s) after {DEADLINE:?}, expected {n}",
                    self.topology.queue(queue)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A connection to the test's database.
    pub async fn db(&self) -> deadpool_postgres::Client {
        self.pool
            .get()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test database: {e}"))
    }

    /// The single bigint a query returns (`SELECT count(*) ...`).
    pub async fn count(&self, sql: &str) -> i64 {
        let row = self
            .db()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("query failed: {sql}: {e}"));
        row.get(0)
    }

    /// The deliveries of the lead with `email`, by enrollment and step.
    pub async fn deliveries(&self, email: &str) -> Vec<DeliveryRow> {
        let rows = self
            .db()
            .await
            .query(
                "SELECT d.id, c.name, d.step, d.state, d.reason, d.attempts, d.due_at, d.sent_at, e.created_at
                   FROM deliveries d
                   JOIN leads l ON l.id = d.lead_id
                   JOIN campaigns c ON c.id = d.campaign_id
                   JOIN enrollments e ON e.id = d.enrollment_id
                  WHERE l.email = $1
                  ORDER BY d.enrollment_id, d.step",
                &[&email.trim().to_lowercase()],
            )
            .await
            .unwrap_or_else(|e| panic!("failed to read deliveries: {e}"));
        rows.iter()
            .map(|r| DeliveryRow {
                id: r.get(0),
                campaign: r.get(1),
                step: r.get(2),
                state: r.get(3),
                reason: r.get(4),
                attempts: r.get(5),
                due_at: r.get(6),
                sent_at: r.get(7),
                enrolled_at: r.get(8),
            })
            .collect()
    }

    /// (step, state, reason) of every delivery of the lead with `email`.
    pub async fn deliveries_of(&self, email: &str) -> Vec<(i16, String, Option<String>)> {
        self.deliveries(email)
            .await
            .into_iter()
            .map(|d| (d.step, d.state, d.reason))
            .collect()
    }

    /// Waits until the deliveries of `email` satisfy `check`, and returns them; panics with what they were.
    pub async fn wait_for_deliveries(
        &self,
        email: &str,
        what: &str,
        check: impl Fn(&[DeliveryRow]) -> bool,
    ) -> Vec<DeliveryRow> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let rows = self.deliveries(email).await;
            if check(&rows) {
                return rows;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {DEADLINE:?} waiting until {what}; deliveries of {email}: {:#?}\nSMTP:\n{}",
                    rows,
                    self.smtp.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the `leadflow` command `args` to its end with this app's configuration, against this app's API
    /// presenting `key` (the `leads` and `lists` commands go through the API); returns whether it succeeded, its
    /// standard output and its standard error. `exe` is the test binary's `env!("CARGO_BIN_EXE_leadflow-under-test")`.
    pub async fn run_leadflow(&self, exe: &str, key: Option<&str>, args: &[&str]) -> (bool, String, String) {
        let mut command = tokio::process::Command::new(exe);
        command.args(args).stdin(Stdio::null()).kill_on_drop(true);
        for (name, _) in std::env::vars() {
            if name.starts_with("LEADFLOW_") {
                command.env_remove(name);
            }
        }
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command.env("LEADFLOW_API_URL", self.url(""));
        if let Some(key) = key {
            command.env("LEADFLOW_API_KEY", key);
        }
        let out = tokio::time::timeout(DEADLINE, command.output())
            .await
            .unwrap_or_else(|_| panic!("leadflow {args:?} did not finish in time"))
            .unwrap_or_else(|e| panic!("leadflow {args:?} failed to start: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `leadflow <args>` (e.g. `run sender`) as a separate process with this app's configuration.
    /// `exe` is the test binary's `env!("CARGO_BIN_EXE_leadflow-under-test")`.
    pub fn spawn_process(&self, exe: &str, args: &[&str]) -> ServiceProcess {
        let mut command = tokio::process::Command::new(exe);
        command.args(args).kill_on_drop(true).stdin(Stdio::null());
        for (key, _) in std::env::vars() {
            if key.starts_with("LEADFLOW_") {
                command.env_remove(key);
            }
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command.env("LEADFLOW_HTTP_ADDR", "127.0.0.1:0");
        if std::env::var_os("TEST_LOG").is_some() {
            command.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {exe} {args:?}: {e}"));
        ServiceProcess { child }
    }

    /// Stops the services gracefully; panics if they stopped with an error or do not stop in time.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            match tokio::time::timeout(DEADLINE, running.stop()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("the services stopped with an error: {e:#}"),
                Err(_) => panic!("the services did not stop within {DEADLINE:?}"),
            }
        }
        let _ = self.amqp.close(200, "test finished".into()).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Not stopped (a failed test): signal shutdown; the cleanup then removes the database under the services.
        if let Some(running) = &self.running {
            running.shutdown.cancel();
        }
    }
}
