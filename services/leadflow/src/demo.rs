//! `leadflow demo`: the whole pipeline on a laptop. Migrates, applies the demo campaign and templates, runs every
//! service in this process, posts sample abandoned checkouts (and, after the first email, one purchase), waits
//! until every demo follow-up is final, and shows where the emails are.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use leadflow_shared::config::{Config, SmtpTarget};
use leadflow_shared::{db, service, telemetry};

use crate::Component;

pub async fn run(config: Config, dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    telemetry::init_logging(&config.log);
    let pool = db::pool(&config.database)?;
    db::migrate(&pool).await.context("failed to migrate the database")?;
    crate::defaults::install(&pool).await?;
    let report = crate::apply::apply_path(&pool, dir).await?;
    print!("{report}");

    let events = read_events(&dir.join("events.json"))?;
    let conversion = read_events(&dir.join("conversion.json"))?;

    // Each run gets fresh ids, so running the demo again sends again instead of being ignored as a repeat.
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let events = with_run_id(events, &run_id);
    let conversion = with_run_id(conversion, &run_id);

    let listener = match TcpListener::bind(config.http.addr).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("cannot listen on any local port")?,
    };
    let shutdown = CancellationToken::new();
    service::shutdown_on_signals(shutdown.clone());
    let outbox = config.smtp.target.clone();
    let running = crate::start(config, &[Component::All], listener, shutdown.clone()).await?;
    let base = format!("http://{}", running.addr);
    println!("leadflow is running at {base} (metrics at {base}/metrics)");

    let result = drive(&pool, &base, &events, &conversion, timeout).await;
    running.stop().await?;
    result?;

    match outbox {
        SmtpTarget::Outbox(dir) => {
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            println!("\nThe emails are in {}:", dir.display());
            let mut files: Vec<_> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                .collect();
            files.sort();
            for f in files.iter().rev().take(20).rev() {
                println!("  {}", f.display());
            }
        }
        SmtpTarget::Relay { host, port, .. } => println!("\nThe emails went to the SMTP server at {host}:{port}."),
    }
    println!("\nResults per campaign step: `leadflow stats`.");
    Ok(())
}

async fn drive(
    pool: &deadpool_postgres::Pool,
    base: &str,
    events: &[Value],
    conversion: &[Value],
    timeout: Duration,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    post(&http, base, events).await?;
    println!("posted {} sample events", events.len());
    let ids: Vec<String> = events
        .iter()
        .chain(conversion)
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect();
    let buyer = conversion
        .first()
        .and_then(|e| e["data"]["email"].as_str())
        .map(str::to_lowercase);
    let deadline = Instant::now() + timeout;
    let client = pool.get().await?;
    let mut converted = buyer.is_none();
    loop {
        let rows = client
            .query(
                "SELECT l.email, c.name, d.step, d.state, coalesce(d.reason, '')
                 FROM deliveries d
                 JOIN enrollments en ON en.id = d.enrollment_id
                 JOIN events ev ON ev.id = en.event_id
                 JOIN leads l ON l.id = d.lead_id
                 JOIN campaigns c ON c.id = d.campaign_id
                 WHERE ev.event_id = ANY($1)
                 ORDER BY l.email, c.name, d.step",
                &[&ids],
            )
            .await?;
        let states: Vec<(String, String, i16, String, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect();
        if !converted {
            let first_sent = states
                .iter()
                .any(|s| Some(&s.0) == buyer.as_ref() && s.2 == 1 && s.3 == "sent");
            if first_sent {
                post(&http, base, conversion).await?;
                println!("posted a purchase after the first follow-up: the rest of that sequence stops");
                converted = true;
            }
        }
        let open = states
            .iter()
            .filter(|s| !matches!(s.3.as_str(), "sent" | "failed" | "cancelled" | "uncertain"))
            .count();
        if converted && open == 0 && !states.is_empty() {
            println!("\n{:<28} {:<20} {:>4}  outcome", "lead", "campaign", "step");
            for (email, campaign, step, state, reason) in &states {
                let masked = leadflow_shared::domain::mask_email(email);
                let reason = if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({reason})")
                };
                println!("{masked:<28} {campaign:<20} {step:>4}  {state}{reason}");
            }
            let sent = states.iter().filter(|s| s.3 == "sent").count();
            println!("\n{sent} follow-up emails sent.");
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the demo did not finish within {timeout:?}: {open} follow-ups still open ({} known); is the SMTP target reachable?",
                states.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn post(http: &reqwest::Client, base: &str, events: &[Value]) -> anyhow::Result<()> {
    let resp = http
        .post(format!("{base}/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_vec(events)?)
        .send()
        .await
        .context("failed to post the sample events")?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("posting the sample events failed: {status} {body}");
    }
    Ok(())
}

fn read_events(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    match value {
        Value::Array(items) => Ok(items),
        one => Ok(vec![one]),
    }
}

fn with_run_id(events: Vec<Value>, run_id: &str) -> Vec<Value> {
    events
        .into_iter()
        .map(|mut e| {
            // Fresh event, checkout and order ids: a checkout already followed up is not enrolled again.
            if let Some(id) = e["id"].as_str() {
                e["id"] = Value::String(format!("{id}-{run_id}"));
            }
            for key in ["checkout_id", "order_id"] {
                if let Some(id) = e["data"][key].as_str() {
                    e["data"][key] = Value::String(format!("{id}-{run_id}"));
                }
            }
            e
        })
        .collect()
}
