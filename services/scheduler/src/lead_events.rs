//! Outbound lead events: what leadflow tells other systems (a CRM, a sales dialer) on the `<ns>.lead-events` topic
//! exchange, as CloudEvents 1.0 (structured JSON), routing key = event type. Today: `lead.hot`.
//!
//! An outbox: [`enqueue`] writes the event to `lead_event_outbox` in the transaction that makes it happen (the
//! scoring transaction), and [`run`] publishes waiting rows in order with publisher confirms, deleting them in the
//! same transaction once the broker confirmed. A crash between the commit and the publish loses nothing (the row
//! waits); a crash between the confirm and the delete publishes the row again, so delivery is at least once and a
//! subscriber deduplicates on the message id (the CloudEvent `id`).

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use deadpool_postgres::{GenericClient, Pool};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use leadflow_shared::service::Context;

/// Outbox rows published per transaction.
pub const BATCH: i64 = 100;
/// The CloudEvents `source` of every outbound event.
pub const SOURCE: &str = "leadflow";
/// The routing key (and CloudEvents `type`) of a lead that became hot.
pub const LEAD_HOT: &str = "lead.hot";
/// The content type of a structured CloudEvent.
const CONTENT_TYPE: &str = "application/cloudevents+json";
/// AMQP delivery mode 2: the broker writes the message to disk (in a durable queue).
const PERSISTENT: u8 = 2;

/// The CloudEvent of an outbound lead event: `id` unique per event (the subscriber's deduplication key), `subject`
/// the lead's id, `data` what happened.
pub fn cloud_event(id: &str, event_type: &str, time: DateTime<Utc>, lead_id: i64, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": SOURCE,
        "type": event_type,
        "subject": lead_id.to_string(),
        "time": time.to_rfc3339_opts(SecondsFormat::Millis, true),
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// Queues `lead.hot` for lead `lead_id` in the caller's transaction: the CloudEvent `id` is `event_id` (the lead's
/// `lead.hot` timeline event), `data` holds `lead_id`, `email`, `score`, `temperature`, `previous_temperature` and
/// `hot_threshold`.
pub async fn enqueue_hot(
    tx: &impl GenericClient,
    lead_id: i64,
    event_id: &str,
    score: f64,
    previous_temperature: &str,
    hot_threshold: f64,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let email: String = tx
        .query_one("SELECT email FROM leads WHERE id = $1", &[&lead_id])
        .await
        .context("failed to read the hot lead's email")?
        .try_get(0)?;
    let data = json!({
        "lead_id": lead_id,
        "email": email,
        "score": score,
        "temperature": "hot",
        "previous_temperature": previous_temperature,
        "hot_threshold": hot_threshold,
    });
    enqueue(
        tx,
        lead_id,
        LEAD_HOT,
        &cloud_event(event_id, LEAD_HOT, at, lead_id, data),
    )
    .await
}

/// Writes an outbound event to the outbox in the caller's transaction; it is published after the commit.
pub async fn enqueue(tx: &impl GenericClient, lead_id: i64, routing_key: &str, message: &Value) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO lead_event_outbox (lead_id, routing_key, message) VALUES ($1, $2, $3)",
        &[&lead_id, &routing_key, message],
    )
    .await
    .context("failed to queue an outbound lead event")?;
    Ok(())
}

/// Publishes waiting lead events until `shutdown`; a full batch is followed at once by the next one. Runs in every
/// scheduler replica (rows are claimed with `SKIP LOCKED`).
pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let exchange = ctx.topology.lead_events_exchange();
    let tick = ctx.config.scheduler.tick;
    let mut channel: Option<Channel> = None;
    loop {
        let pass = async {
            let open = match channel.as_ref().filter(|c| c.status().connected()) {
                Some(open) => open.clone(),
                None => {
                    let opened = open_channel(&ctx.amqp).await?;
                    channel = Some(opened.clone());
                    opened
                }
            };
            publish_once(&ctx.pool, &open, &exchange).await
        };
        let pause = match pass.await {
            Ok(published) if published as i64 >= BATCH => Duration::ZERO,
            Ok(_) => tick,
            Err(e) => {
                // The database or the broker is away: the rows wait in the outbox.
                tracing::warn!(error = format!("{e:#}"), "publishing lead events failed; will retry");
                channel = None;
                tick.max(Duration::from_secs(1))
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// A channel in confirm mode, for [`publish_once`].
pub async fn open_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await.context("failed to open a channel")?;
    // Without confirm_select a publish is never confirmed: the row could be deleted before the broker has it.
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("failed to enable publisher confirms")?;
    Ok(channel)
}

/// Publishes up to [`BATCH`] waiting events in outbox order to `exchange` on `channel` (in confirm mode) and deletes
/// them once every publish is confirmed, all in one transaction; returns how many were published. When a publish
/// fails, nothing is deleted and the rows are tried again by the next pass.
pub async fn publish_once(pool: &Pool, channel: &Channel, exchange: &str) -> anyhow::Result<usize> {
    let mut client = pool.get().await.context("failed to get a database connection")?;
    let tx = client.transaction().await.context("failed to begin")?;
    let rows = tx
        .query(
            "SELECT id, routing_key, message FROM lead_event_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&BATCH],
        )
        .await
        .context("failed to claim waiting lead events")?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut confirms = Vec::with_capacity(rows.len());
    for row in &rows {
        let (id, routing_key, message): (i64, String, Value) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let body = serde_json::to_vec(&message).context("failed to encode a lead event")?;
        let message_id = message["id"].as_str().map_or_else(|| id.to_string(), str::to_string);
        let props = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type(ShortString::from(CONTENT_TYPE))
            .with_message_id(message_id.into())
            .with_type(routing_key.as_str().into())
            .with_timestamp(Utc::now().timestamp().max(0) as u64);
        // Not mandatory: a lead event nobody has bound a queue for is dropped by the broker, not an error that
        // would hold up the outbox (subscribers bind a durable queue before relying on the events).
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .with_context(|| format!("failed to publish to {exchange}"))?;
        confirms.push(confirm);
        ids.push(id);
    }
    // Every publish first, then every confirm: one round trip for the batch.
    for confirm in confirms {
        let confirmation = confirm.await.context("lost the publisher confirm")?;
        if !confirmation.is_ack() {
            anyhow::bail!("the broker refused a lead event (nack)");
        }
    }
    tx.execute("DELETE FROM lead_event_outbox WHERE id = ANY ($1)", &[&ids])
        .await
        .context("failed to remove published lead events")?;
    tx.commit().await.context("failed to commit published lead events")?;
    metrics::counter!("leadflow_scheduler_lead_events_published_total").increment(ids.len() as u64);
    tracing::debug!(count = ids.len(), "lead events published");
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lead_event_is_a_cloud_event_about_its_lead() {
        let at = DateTime::parse_from_rfc3339("2026-05-02T10:15:03.123456Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap();
        let event = cloud_event("hot-42-7", LEAD_HOT, at, 42, json!({"score": 31.5}));
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], "hot-42-7");
        assert_eq!(event["type"], "lead.hot");
        assert_eq!(event["source"], "leadflow");
        assert_eq!(event["subject"], "42");
        assert_eq!(event["time"], "2026-05-02T10:15:03.123Z");
        assert_eq!(event["data"]["score"], 31.5);
    }
}
