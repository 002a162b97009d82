//! The bench's own PostgreSQL queries: progress counts, latencies, the durability settings in force.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio_postgres::{Client, NoTls};

/// The `application_name` of the bench's own sessions, so they are left out of PostgreSQL's CPU.
pub const APPLICATION_NAME: &str = "leadflow-bench";

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let mut config = tokio_postgres::Config::from_str(url).context("not a PostgreSQL URL")?;
    config.application_name(APPLICATION_NAME);
    let (client, connection) = config.connect(NoTls).await.context("cannot connect to PostgreSQL")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The single bigint a query returns.
pub async fn count(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> anyhow::Result<i64> {
    let row = client
        .query_one(sql, params)
        .await
        .with_context(|| format!("query failed: {sql}"))?;
    Ok(row.get(0))
}

/// `synchronous_commit`, `fsync`, `autovacuum` and the server version.
pub async fn settings(client: &Client) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for name in [
        "server_version",
        "synchronous_commit",
        "fsync",
        "autovacuum",
        "shared_buffers",
        "max_connections",
    ] {
        let row = client.query_one(&format!("SHOW {name}"), &[]).await?;
        out.push((name.to_string(), row.get(0)));
    }
    Ok(out)
}

/// Pids of the PostgreSQL processes of this run: (the services' sessions on `database`, the server's background
/// processes: WAL writer, checkpointer, autovacuum, which also work for every other database of the server).
pub async fn postgres_pids(client: &Client, database: &str) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let rows = client
        .query(
            "SELECT pid, backend_type = 'client backend' FROM pg_stat_activity
              WHERE (datname = $1 AND coalesce(application_name, '') <> $2) OR backend_type <> 'client backend'",
            &[&database, &APPLICATION_NAME],
        )
        .await?;
    let (mut sessions, mut background) = (Vec::new(), Vec::new());
    for row in rows {
        let pid: i32 = row.get(0);
        if pid <= 0 {
            continue;
        }
        if row.get::<_, bool>(1) {
            sessions.push(pid as u32);
        } else {
            background.push(pid as u32);
        }
    }
    Ok((sessions, background))
}

/// The highest delivery id so far (0 without any): later phases count rows above it.
pub async fn max_delivery_id(client: &Client) -> anyhow::Result<i64> {
    count(client, "SELECT coalesce(max(id), 0) FROM deliveries", &[]).await
}

/// Deliveries above `after` (up to `upto`) in `state`.
pub async fn deliveries_in_state(client: &Client, after: i64, upto: i64, state: &str) -> anyhow::Result<i64> {
    count(
        client,
        "SELECT count(*) FROM deliveries WHERE id > $1 AND id <= $2 AND state = $3",
        &[&after, &upto, &state],
    )
    .await
}

/// Every delivery above `after`, by state.
pub async fn states(client: &Client, after: i64) -> anyhow::Result<Vec<(String, i64)>> {
    let rows = client
        .query(
            "SELECT state, count(*) FROM deliveries WHERE id > $1 GROUP BY state ORDER BY state",
            &[&after],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Milliseconds from the event's arrival (`events.received_at`, set in ingest's transaction) to the recorded
/// `sent_at` of every sent delivery in `(after, upto]`: with a step delay of 0s this is the due time as the lead's
/// event set it, before any queueing in front of the scheduler.
pub async fn event_latencies_ms(client: &Client, after: i64, upto: i64) -> anyhow::Result<Vec<f64>> {
    let rows = client
        .query(
            "SELECT (extract(epoch FROM d.sent_at - ev.received_at) * 1000)::float8
               FROM deliveries d
               JOIN enrollments e ON e.id = d.enrollment_id
               JOIN events ev ON ev.id = e.event_id
              WHERE d.id > $1 AND d.id <= $2 AND d.state = 'sent'",
            &[&after, &upto],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Milliseconds from due time to the recorded `sent_at` of every sent delivery in `(after, upto]`.
pub async fn latencies_ms(client: &Client, after: i64, upto: i64) -> anyhow::Result<Vec<f64>> {
    let rows = client
        .query(
            "SELECT (extract(epoch FROM sent_at - due_at) * 1000)::float8 FROM deliveries
              WHERE id > $1 AND id <= $2 AND state = 'sent'",
            &[&after, &upto],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// One sample of an active session of the services: (what it waits on, or `CPU`; the statement).
pub type Sample = (String, String);

/// The active sessions of the services on `database` right now.
pub async fn active_sessions(client: &Client, database: &str) -> anyhow::Result<Vec<Sample>> {
    let rows = client
        .query(
            "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), coalesce(query, '')
               FROM pg_stat_activity
              WHERE datname = $1 AND state = 'active' AND coalesce(application_name, '') <> $2",
            &[&database, &APPLICATION_NAME],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), statement_key(&r.get::<_, String>(1))))
        .collect())
}

/// A statement shortened to its first 90 characters, whitespace collapsed.
pub fn statement_key(query: &str) -> String {
    let collapsed = query.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.chars().take(90).collect()
}

/// Counts of sampled active sessions: a statistical profile of where PostgreSQL time goes (which statements,
/// waiting on what), sampled five times a second.
#[derive(Clone, Default)]
pub struct Activity {
    counts: Arc<Mutex<HashMap<Sample, u64>>>,
}

impl Activity {
    pub fn add(&self, samples: Vec<Sample>) {
        if let Ok(mut counts) = self.counts.lock() {
            for s in samples {
                *counts.entry(s).or_default() += 1;
            }
        }
    }

    pub fn snapshot(&self) -> HashMap<Sample, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Prints the statements and wait events seen most since `earlier`.
    pub fn print_since(&self, earlier: &HashMap<Sample, u64>) {
        let now = self.snapshot();
        let mut by_statement: HashMap<&str, u64> = HashMap::new();
        let mut by_wait: HashMap<&str, u64> = HashMap::new();
        let mut total = 0;
        for (key, n) in &now {
            let n = n - earlier.get(key).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            total += n;
            *by_wait.entry(key.0.as_str()).or_default() += n;
            *by_statement.entry(key.1.as_str()).or_default() += n;
        }
        if total == 0 {
            return;
        }
        let top = |map: HashMap<&str, u64>, k: usize| {
            let mut v: Vec<(&str, u64)> = map.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            v.into_iter()
                .take(k)
                .map(|(s, n)| format!("{:.0}% {s}", n as f64 * 100.0 / total as f64))
                .collect::<Vec<_>>()
        };
        println!(
            "   postgres sessions, {total} active samples; waiting on: {}",
            top(by_wait, 5).join(", ")
        );
        for line in top(by_statement, 5) {
            println!("      {line}");
        }
    }
}
