//! The import worker, a background task of the api service: claims a waiting job (`FOR UPDATE SKIP LOCKED`),
//! reads its file and imports the rows in batches, each batch one transaction that also moves the job's counts
//! and extends its lease. A job whose worker died stays `running` until its lease runs out; then any worker claims
//! it again and goes on after `rows_done`, so no row is counted twice (and importing a row again only upserts).
//!
//! Every row goes through the profile's checks ([`profile::check_email`], [`profile::check_input`],
//! [`profile::write`]), in a savepoint: a refused row is recorded in `import_errors` with its line and field, and
//! the rows around it go in.

use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{GenericClient, Pool};
use serde_json::{json, Value};

use leadflow_shared::config::IdentityKey;
use leadflow_shared::domain::EmailAddress;
use tokio_util::sync::CancellationToken;

use super::columns::{self, Columns};
use super::sheet::{self, Fed, Format, Row};
use crate::leads::identity::{self, KeyError};
use crate::leads::profile::{self, CustomField, FieldError, WriteError};

/// Rows imported per transaction (and per progress update).
pub const BATCH_ROWS: usize = 500;
/// How long a claimed job belongs to its worker without a committed batch.
const LEASE: &str = "2 minutes";
/// How often an idle worker looks for a job.
const POLL: Duration = Duration::from_millis(500);

/// Runs jobs until shutdown; a job in progress stops after its current batch and is resumed later. `identity`
/// (`LEADFLOW_IDENTITY_KEY`) says what finds a row's lead: its email, or its customer id.
pub async fn run(pool: Pool, identity: IdentityKey, shutdown: CancellationToken) -> anyhow::Result<()> {
    while !shutdown.is_cancelled() {
        let worked = match run_once(&pool, identity, &shutdown).await {
            Ok(worked) => worked,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "import worker: will retry");
                false
            }
        };
        if !worked {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
    Ok(())
}

/// A claimed job.
struct Job {
    id: i64,
    format: String,
    source: Option<String>,
    list_id: Option<i64>,
    mapping: Value,
    content: Vec<u8>,
    /// The lease this worker holds: every batch checks it still does.
    lease: Lease,
    counts: Counts,
}

/// The end of a lease, which also tells its holder: each batch checks it is unchanged and moves it on.
type Lease = chrono::DateTime<chrono::Utc>;

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    done: i32,
    created: i32,
    updated: i32,
    rejected: i32,
}

/// How a job's run ended.
enum Ended {
    Done,
    /// Shutdown between batches, or the lease was lost: another run goes on.
    Interrupted,
    /// The file cannot be imported at all.
    Failed(String),
}

/// Claims one waiting (or abandoned) job and runs it; `false` when there was none.
pub async fn run_once(pool: &Pool, identity: IdentityKey, shutdown: &CancellationToken) -> anyhow::Result<bool> {
    let mut client = pool.get().await.context("failed to get a database connection")?;
    let Some(mut job) = claim(&client).await? else {
        return Ok(false);
    };
    let content = std::mem::take(&mut job.content);
    let mut lease = job.lease;
    let ended = match import(&mut client, &job, identity, content, &mut lease, shutdown).await {
        Ok(ended) => ended,
        Err(e) => {
            tracing::error!(job.id = job.id, error = format!("{e:#}"), "import failed");
            Ended::Failed("an internal error stopped the import; the service log has the cause".into())
        }
    };
    match ended {
        Ended::Done => {
            client
                .execute(
                    "UPDATE import_jobs SET state = 'done', content = NULL, lease_until = NULL,
                            finished_at = now()
                      WHERE id = $1 AND lease_until = $2",
                    &[&job.id, &lease],
                )
                .await
                .context("failed to mark the import done")?;
            tracing::info!(job.id = job.id, "import done");
        }
        Ended::Failed(reason) => {
            client
                .execute(
                    "UPDATE import_jobs SET state = 'failed', error = $3, content = NULL, lease_until = NULL,
                            finished_at = now()
                      WHERE id = $1 AND lease_until = $2",
                    &[&job.id, &lease, &reason],
                )
                .await
                .context("failed to mark the import failed")?;
            tracing::info!(job.id = job.id, "import failed: {reason}");
        }
        Ended::Interrupted => {
            // Let the next worker resume at once rather than when the lease runs out.
            client
                .execute(
                    "UPDATE import_jobs SET lease_until = now() WHERE id = $1 AND lease_until = $2",
                    &[&job.id, &lease],
                )
                .await
                .context("failed to release the import")?;
        }
    }
    Ok(true)
}

async fn claim(client: &impl GenericClient) -> anyhow::Result<Option<Job>> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE import_jobs j
                    SET state = 'running', started_at = coalesce(j.started_at, now()),
                        lease_until = now() + interval '{LEASE}'
                  WHERE j.id = (SELECT id FROM import_jobs
                                 WHERE state = 'queued'
                                    OR (state = 'running' AND (lease_until IS NULL OR lease_until < now()))
                                 ORDER BY created_at, id
                                 LIMIT 1
                                 FOR UPDATE SKIP LOCKED)
              RETURNING j.id, j.format, j.source, j.list_id, j.mapping, coalesce(j.content, ''::bytea),
                        j.lease_until, j.rows_done, j.rows_created, j.rows_updated, j.rows_rejected"
            ),
            &[],
        )
        .await
        .context("failed to claim an import job")?;
    Ok(row.map(|r| Job {
        id: r.get(0),
        format: r.get(1),
        source: r.get(2),
        list_id: r.get(3),
        mapping: r.get(4),
        content: r.get(5),
        lease: r.get(6),
        counts: Counts {
            done: r.get(7),
            created: r.get(8),
            updated: r.get(9),
            rejected: r.get(10),
        },
    }))
}

/// What every row of a job shares.
struct Context<'a> {
    job: &'a Job,
    columns: Columns,
    defs: Vec<CustomField>,
    actor: String,
    identity: IdentityKey,
}

async fn import(
    client: &mut deadpool_postgres::Client,
    job: &Job,
    identity: IdentityKey,
    content: Vec<u8>,
    lease: &mut Lease,
    shutdown: &CancellationToken,
) -> anyhow::Result<Ended> {
    let Some(format) = Format::parse(&job.format) else {
        return Ok(Ended::Failed(format!("{} is not an import format", job.format)));
    };
    let skip = usize::try_from(job.counts.done).unwrap_or_default();
    let mut fed = sheet::read_in_background(format, content, skip, BATCH_ROWS);
    let (headers, total) = match fed.recv().await {
        Some(Fed::Opened { headers, total }) => (headers, total),
        Some(Fed::Unreadable(unreadable)) => return Ok(Ended::Failed(unreadable.0)),
        _ => anyhow::bail!("the sheet reader stopped before the header"),
    };
    let defs = profile::custom_fields(&*client)
        .await
        .context("failed to read the custom fields")?;
    let mapping = job.mapping.as_object().cloned().unwrap_or_default();
    let columns = match columns::resolve(&headers, &mapping, &defs) {
        Ok(columns) => columns,
        Err(reason) => return Ok(Ended::Failed(reason)),
    };
    if !columns.has_email() {
        return Ok(Ended::Failed(
            "no column holds the email address: name one Email, or map it (mapping {\"<header>\": \"email\"})".into(),
        ));
    }
    let has_customer_id = columns.targets.iter().flatten().any(|t| t.name() == "customer_id");
    if identity == IdentityKey::CustomerId && !has_customer_id {
        return Ok(Ended::Failed(
            "no column holds the customer id, which identifies leads here (LEADFLOW_IDENTITY_KEY=customer_id): \
             name one Customer ID, or map it (mapping {\"<header>\": \"customer_id\"})"
                .into(),
        ));
    }
    let total = i32::try_from(total).unwrap_or(i32::MAX);
    client
        .execute(
            "UPDATE import_jobs SET rows_total = $2, unmapped_columns = $3 WHERE id = $1",
            &[&job.id, &total, &columns.unmapped],
        )
        .await
        .context("failed to record the job's size")?;
    let context = Context {
        job,
        columns,
        defs,
        actor: format!("import #{}", job.id),
        identity,
    };
    let mut counts = job.counts;
    loop {
        if shutdown.is_cancelled() {
            return Ok(Ended::Interrupted);
        }
        let batch = match fed.recv().await {
            Some(Fed::Rows(batch)) => batch,
            Some(Fed::End) => return Ok(Ended::Done),
            _ => anyhow::bail!("the sheet reader stopped before the end of the file"),
        };
        let mut tx = client.transaction().await.context("failed to begin a batch")?;
        let mut next = counts;
        for item in batch {
            next.done += 1;
            let refused = match item {
                Err(bad) => Some((bad.line, FieldError::new("", bad.detail))),
                Ok(row) => match import_row(&mut tx, &context, &row).await? {
                    Outcome::Created => {
                        next.created += 1;
                        None
                    }
                    Outcome::Updated => {
                        next.updated += 1;
                        None
                    }
                    Outcome::Refused(error) => Some((row.line, error)),
                },
            };
            if let Some((line, error)) = refused {
                next.rejected += 1;
                let line = i32::try_from(line).unwrap_or(i32::MAX);
                let field = (!error.field.is_empty()).then_some(error.field.as_str());
                tx.execute(
                    "INSERT INTO import_errors (job_id, line, field, detail) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (job_id, line) DO NOTHING",
                    &[&job.id, &line, &field, &error.detail],
                )
                .await
                .context("failed to record a refused row")?;
            }
        }
        let still_ours = tx
            .query_opt(
                &format!(
                    "UPDATE import_jobs
                        SET rows_done = $3, rows_created = $4, rows_updated = $5, rows_rejected = $6,
                            lease_until = now() + interval '{LEASE}'
                      WHERE id = $1 AND lease_until = $2 AND state = 'running'
                  RETURNING lease_until"
                ),
                &[
                    &job.id,
                    &*lease,
                    &next.done,
                    &next.created,
                    &next.updated,
                    &next.rejected,
                ],
            )
            .await
            .context("failed to record the job's progress")?;
        let Some(extended) = still_ours else {
            // Another worker took the job over (this one stalled past its lease): its run counts, not this one.
            tx.rollback().await.context("failed to roll back a batch")?;
            return Ok(Ended::Interrupted);
        };
        tx.commit().await.context("failed to commit a batch")?;
        *lease = extended.get(0);
        counts = next;
    }
}

/// What became of one row.
enum Outcome {
    Created,
    Updated,
    Refused(FieldError),
}

/// Imports one row in a savepoint: a refused value rolls back that row only.
async fn import_row(
    tx: &mut deadpool_postgres::Transaction<'_>,
    context: &Context<'_>,
    row: &Row,
) -> anyhow::Result<Outcome> {
    let input = context.columns.input(&row.cells);
    let email = match profile::check_email(&input) {
        Ok(email) => email,
        Err(error) => return Ok(Outcome::Refused(error)),
    };
    let customer_id = match context.identity {
        IdentityKey::Email => None,
        IdentityKey::CustomerId => match identity::check_customer_id(&input) {
            Ok(customer_id) => Some(customer_id),
            Err(error) => return Ok(Outcome::Refused(error)),
        },
    };
    let checked = match profile::check_input(&input, &context.defs) {
        Ok(checked) => checked,
        Err(error) => return Ok(Outcome::Refused(error)),
    };
    let savepoint = tx.transaction().await.context("failed to open a savepoint")?;
    match upsert(&savepoint, context, &email, customer_id.as_deref(), &checked).await {
        Ok(outcome) => {
            savepoint.commit().await.context("failed to release a savepoint")?;
            Ok(outcome)
        }
        Err(Refusal::Field(error)) => {
            savepoint.rollback().await.context("failed to roll back a savepoint")?;
            Ok(Outcome::Refused(error))
        }
        Err(Refusal::Failed(e)) => Err(e),
    }
}

enum Refusal {
    Field(FieldError),
    Failed(anyhow::Error),
}

impl From<WriteError> for Refusal {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Field(error) => Self::Field(error),
            WriteError::Database(e) => Self::Failed(anyhow::Error::new(e).context("failed to write an imported row")),
        }
    }
}

impl From<KeyError> for Refusal {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Field(error) => Self::Field(error),
            KeyError::Failed(e) => Self::Failed(e.context("failed to find the customer's lead")),
        }
    }
}

impl From<tokio_postgres::Error> for Refusal {
    fn from(e: tokio_postgres::Error) -> Self {
        WriteError::from(e).into()
    }
}

/// Creates the lead or updates it (by email, or by `customer_id` when leads are keyed on it), records the change,
/// adds it to the job's list and rescores it.
async fn upsert(
    tx: &impl GenericClient,
    context: &Context<'_>,
    email: &EmailAddress,
    customer_id: Option<&str>,
    input: &profile::ProfileInput,
) -> Result<Outcome, Refusal> {
    let (lead_id, created) = match customer_id {
        Some(customer_id) => identity::find_or_create(tx, customer_id, email, &context.actor).await?,
        None => lead_by_email(tx, email.as_str()).await?,
    };
    let mut changes = profile::write(tx, lead_id, input).await?;
    if created {
        // A new lead comes from the import's source unless its row says otherwise; its origin is set here once.
        let source = context.job.source.as_deref().unwrap_or("import");
        let origin = tx
            .prepare_cached(
                "UPDATE leads l
                SET source = coalesce(l.source, $2),
                    original_source = coalesce(l.original_source, l.source, $2),
                    original_source_category = coalesce(
                        l.original_source_category,
                        (SELECT category FROM lead_sources WHERE name = coalesce(l.original_source, l.source, $2)))
              WHERE l.id = $1",
            )
            .await?;
        tx.execute(&origin, &[&lead_id, &source]).await?;
        changes.insert("email".into(), json!({"from": null, "to": email.as_str()}));
    }
    if created || !changes.is_empty() {
        let change = tx
            .prepare_cached("INSERT INTO lead_changes (lead_id, kind, changes, actor) VALUES ($1, 'imported', $2, $3)")
            .await?;
        tx.execute(&change, &[&lead_id, &Value::Object(changes), &context.actor])
            .await?;
        leadflow_scheduler::scoring::rescore_lead(tx, lead_id, &context.actor)
            .await
            .map_err(|e| Refusal::Failed(e.context("failed to rescore an imported lead")))?;
    }
    if let Some(list_id) = context.job.list_id {
        let member = tx
            .prepare_cached("INSERT INTO lead_list_members (list_id, lead_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .await?;
        tx.execute(&member, &[&list_id, &lead_id]).await?;
    }
    Ok(if created { Outcome::Created } else { Outcome::Updated })
}

/// The lead with `email`, created when there is none; and whether it was created.
async fn lead_by_email(tx: &impl GenericClient, email: &str) -> Result<(i64, bool), tokio_postgres::Error> {
    // Prepared once per connection: an import runs it for every row.
    let found = tx
        .prepare_cached(
            "WITH new AS (INSERT INTO leads (email) VALUES ($1) ON CONFLICT (email) DO NOTHING RETURNING id)
             SELECT id, true FROM new UNION ALL SELECT id, false FROM leads WHERE email = $1",
        )
        .await?;
    Ok(match tx.query_opt(&found, &[&email]).await? {
        Some(row) => (row.get(0), row.get(1)),
        // Created by another transaction after this statement's snapshot was taken.
        None => (
            tx.query_one("SELECT id FROM leads WHERE email = $1", &[&email])
                .await?
                .get(0),
            false,
        ),
    })
}
