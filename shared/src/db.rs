//! PostgreSQL: the connection pool and the numbered SQL migrations.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use secrecy::ExposeSecret;
use tokio_postgres::NoTls;

use crate::config::DatabaseConfig;

/// Schema changes in order; a migration is never edited once released, a new one is added.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "pipeline", include_str!("../migrations/0001_pipeline.sql")),
    (2, "campaigns", include_str!("../migrations/0002_campaigns.sql")),
    (3, "marketing", include_str!("../migrations/0003_marketing.sql")),
    (4, "api_keys", include_str!("../migrations/0004_api_keys.sql")),
    (5, "consent", include_str!("../migrations/0005_consent.sql")),
    (6, "indexes", include_str!("../migrations/0006_indexes.sql")),
    (7, "lead_records", include_str!("../migrations/0007_lead_records.sql")),
    (8, "lead_profile", include_str!("../migrations/0008_lead_profile.sql")),
    (9, "scoring", include_str!("../migrations/0009_scoring.sql")),
    (10, "search", include_str!("../migrations/0010_search.sql")),
    (11, "imports", include_str!("../migrations/0011_imports.sql")),
    (
        12,
        "lead_behaviour",
        include_str!("../migrations/0012_lead_behaviour.sql"),
    ),
    (
        13,
        "scoring_rules",
        include_str!("../migrations/0013_scoring_rules.sql"),
    ),
    (
        14,
        "search_indexes",
        include_str!("../migrations/0014_search_indexes.sql"),
    ),
    (15, "import_jobs", include_str!("../migrations/0015_import_jobs.sql")),
    (
        16,
        "lead_events_outbox",
        include_str!("../migrations/0016_lead_events_outbox.sql"),
    ),
    (
        17,
        "statement_triggers",
        include_str!("../migrations/0017_statement_triggers.sql"),
    ),
    (
        18,
        "deliveries_fillfactor",
        include_str!("../migrations/0018_deliveries_fillfactor.sql"),
    ),
];

/// Key of the advisory lock that serialises concurrent `leadflow migrate` runs.
const MIGRATION_LOCK: i64 = 0x6c65_6164_666c_6f77; // "leadflow"

pub fn pool(config: &DatabaseConfig) -> anyhow::Result<Pool> {
    let pg = tokio_postgres::Config::from_str(config.url.expose_secret())
        .context("LEADFLOW_DATABASE_URL: not a valid PostgreSQL connection string")?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            // A cheap check is enough: a broken connection fails its next query and is dropped.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_size)
        .post_recycle(deadpool_postgres::Hook::sync_fn(|client, metrics| {
            let last_use = metrics.recycled.unwrap_or(metrics.created) - metrics.created;
            if replan_due(last_use, metrics.age()) {
                client.statement_cache.clear();
            }
            Ok(())
        }))
        .build()
        .context("failed to build the PostgreSQL pool")
}

/// How long a pooled connection keeps its prepared statements: the first use after that drops them (they are
/// prepared again when next used).
///
/// The hot statements are prepared once per connection (`prepare_cached`), and after five executions
/// PostgreSQL keeps one generic plan for each. A plan made while a table is nearly empty (a new installation, a
/// burst of work on a young database) scans it: a start mark planned on 20 deliveries still scanned all of them at
/// 100,000, 24 ms instead of 0.2, until autovacuum's next ANALYZE of the table (a minute or more later) made
/// PostgreSQL plan again, and the whole pipeline slowed down meanwhile. Preparing again every few seconds bounds
/// how long such a plan lasts, for the price of a parse and five plans per statement. Planning every execution
/// instead (`plan_cache_mode = force_custom_plan`) made ingest over HTTP about a quarter slower.
const REPLAN_AFTER: Duration = Duration::from_secs(10);

/// Whether a connection used last at age `last_use` and now at age `now` drops its prepared statements: once per
/// [`REPLAN_AFTER`] of its age, at the first use in a later window than the last use.
fn replan_due(last_use: Duration, now: Duration) -> bool {
    let window = |age: Duration| age.as_millis() / REPLAN_AFTER.as_millis();
    window(now) != window(last_use)
}

/// Applies every migration not yet applied, each in its own transaction; safe to run from several processes.
pub async fn migrate(pool: &Pool) -> anyhow::Result<Vec<i32>> {
    let mut client = pool.get().await.context("failed to connect to PostgreSQL")?;
    client
        .batch_execute(
            "SET client_min_messages TO warning;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                 version INTEGER PRIMARY KEY,
                 name TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .or_else(|e| {
            // Two first runs racing on CREATE TABLE IF NOT EXISTS: the loser sees a unique violation.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(e)
            }
        })
        .context("failed to create schema_migrations")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("failed to take the migration lock")?;
    let result = apply_pending(&mut client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .context("failed to release the migration lock")?;
    result
}

async fn apply_pending(client: &mut deadpool_postgres::Client) -> anyhow::Result<Vec<i32>> {
    let applied: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version:04}_{name} failed"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(migration = version, name, "applied migration");
        done.push(*version);
    }
    Ok(done)
}

/// Fails with a clear message when the database has not been migrated to this build's schema.
pub async fn check_schema(pool: &Pool) -> anyhow::Result<()> {
    let client = pool.get().await.context("failed to connect to PostgreSQL")?;
    let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
        .await;
    let current: i32 = match row {
        Ok(row) => row.get(0),
        Err(_) => 0,
    };
    if current < latest {
        anyhow::bail!("the database schema is at version {current}, this build needs {latest}: run `leadflow migrate`");
    }
    Ok(())
}

#[cfg(test)]
mod replan_tests {
    use super::*;

    #[test]
    fn prepared_statements_are_dropped_once_per_window_of_a_connections_age() {
        let s = Duration::from_secs;
        // Uses within the first window keep them; the first use in the next window drops them, once.
        assert!(!replan_due(s(0), s(3)));
        assert!(!replan_due(s(3), s(9)));
        assert!(replan_due(s(9), s(11)));
        assert!(!replan_due(s(11), s(12)));
        // An idle connection taken again much later drops them too.
        assert!(replan_due(s(12), s(95)));
    }
}
