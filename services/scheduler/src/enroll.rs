//! Acting on accepted events: enroll in matching campaigns, end sequences on conversion or opt-out, attribute
//! revenue. Each event is handled once (its `handled_at`), in one transaction.

use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;

use leadflow_shared::domain::EventType;

use crate::metrics;

/// What handling a batch of events did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Handled {
    pub enrollments: usize,
    pub cancelled_deliveries: usize,
    pub conversions: usize,
    /// Events already handled before (a redelivered message).
    pub skipped: usize,
}

/// Handles each event in its own transaction; an event already handled is skipped.
pub async fn handle_events(pool: &Pool, event_ids: &[i64]) -> anyhow::Result<Handled> {
    let mut total = Handled::default();
    let mut client = pool.get().await?;
    for id in event_ids {
        let tx = client.transaction().await?;
        let h = handle_event(&tx, *id).await?;
        tx.commit().await?;
        total.enrollments += h.enrollments;
        total.cancelled_deliveries += h.cancelled_deliveries;
        total.conversions += h.conversions;
        total.skipped += h.skipped;
    }
    Ok(total)
}

async fn handle_event(tx: &impl GenericClient, id: i64) -> anyhow::Result<Handled> {
    let mut h = Handled::default();
    // The row lock makes two schedulers handling the same event take turns; the second sees it handled.
    let Some(row) = tx
        .query_opt(
            "SELECT e.type, e.lead_id, e.data, l.suppressed_reason
             FROM events e JOIN leads l ON l.id = e.lead_id
             WHERE e.id = $1 AND e.handled_at IS NULL
             FOR UPDATE OF e",
            &[&id],
        )
        .await?
    else {
        h.skipped = 1;
        return Ok(h);
    };
    let event_type: String = row.get(0);
    let lead_id: i64 = row.get(1);
    let data: Value = row.get(2);
    let suppressed: Option<String> = row.get(3);
    let event_type = EventType::parse(&event_type)?;

    match &event_type {
        t if t.lead_source().is_some() && suppressed.is_none() => {
            let source = t.lead_source().map(|s| s.as_str());
            h.enrollments = enroll(tx, lead_id, id, source, &data).await?;
        }
        EventType::OrderCompleted => {
            h.cancelled_deliveries = end_sequences(tx, lead_id, "converted", "completed").await?;
            h.conversions = record_conversion(tx, lead_id, id, &data).await?;
        }
        EventType::LeadUnsubscribed | EventType::EmailBounced | EventType::EmailComplained => {
            let reason = match event_type {
                EventType::LeadUnsubscribed => "unsubscribed",
                EventType::EmailBounced => "bounced",
                _ => "complained",
            };
            tx.execute(
                "UPDATE leads SET suppressed_reason = $2, suppressed_at = now() WHERE id = $1 AND suppressed_reason IS NULL",
                &[&lead_id, &reason],
            )
            .await?;
            h.cancelled_deliveries = end_sequences(tx, lead_id, reason, "cancelled").await?;
        }
        _ => {}
    }
    tx.execute("UPDATE events SET handled_at = now() WHERE id = $1", &[&id])
        .await?;
    metrics::event_handled(&event_type);
    Ok(h)
}

/// Enrolls the lead in every active campaign targeting `source` (or all sources) it is not already in, creating
/// one delivery row per step. Step 1 is due after its delay; each later step after the previous one's due time.
async fn enroll(
    tx: &impl GenericClient,
    lead_id: i64,
    event_id: i64,
    source: Option<&str>,
    data: &Value,
) -> anyhow::Result<usize> {
    let product = data.get("product").cloned().filter(|p| p.is_object());
    let campaigns = tx
        .query(
            "SELECT id FROM campaigns WHERE status = 'active' AND (lead_source IS NULL OR lead_source = $1) ORDER BY id",
            &[&source],
        )
        .await?;
    let mut enrolled = 0;
    for campaign in campaigns {
        let campaign_id: i64 = campaign.get(0);
        let inserted = tx
            .query_opt(
                "INSERT INTO enrollments (lead_id, campaign_id, event_id, product)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (lead_id, campaign_id) WHERE status = 'active' DO NOTHING
                 RETURNING id",
                &[&lead_id, &campaign_id, &event_id, &product],
            )
            .await?;
        let Some(enrollment) = inserted else {
            continue; // already in this campaign: one sequence at a time
        };
        let enrollment_id: i64 = enrollment.get(0);
        tx.execute(
            "INSERT INTO deliveries (enrollment_id, lead_id, campaign_id, step, due_at)
             SELECT $1, $2, $3, s.step,
                    now() + make_interval(secs => (sum(s.delay_seconds) OVER (ORDER BY s.step))::float8)
             FROM campaign_steps s WHERE s.campaign_id = $3",
            &[&enrollment_id, &lead_id, &campaign_id],
        )
        .await?;
        enrolled += 1;
        metrics::enrolled();
    }
    Ok(enrolled)
}

/// Cancels every open delivery of the lead with `reason` and ends its active enrollments.
async fn end_sequences(tx: &impl GenericClient, lead_id: i64, reason: &str, status: &str) -> anyhow::Result<usize> {
    let cancelled = tx
        .execute(
            "UPDATE deliveries SET state = 'cancelled', reason = $2, updated_at = now()
             WHERE lead_id = $1 AND state IN ('pending', 'queued', 'rendered', 'retrying')",
            &[&lead_id, &reason],
        )
        .await?;
    tx.execute(
        "UPDATE enrollments SET status = $3, reason = $2, ended_at = now() WHERE lead_id = $1 AND status = 'active'",
        &[&lead_id, &reason, &status],
    )
    .await?;
    metrics::cancelled(reason, cancelled);
    Ok(cancelled as usize)
}

/// Records the order and attributes it to the last follow-up the lead was sent, if any.
async fn record_conversion(tx: &impl GenericClient, lead_id: i64, event_id: i64, data: &Value) -> anyhow::Result<usize> {
    let amount: Option<String> = match data.get("amount") {
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let currency = data.get("currency").and_then(Value::as_str);
    let order_id = data.get("order_id").and_then(Value::as_str);
    let inserted = tx
        .execute(
            "INSERT INTO conversions (lead_id, event_id, order_id, amount, currency, delivery_id, campaign_id, step)
             SELECT $1, $2, $3, CAST($4::text AS numeric), $5, d.id, d.campaign_id, d.step
             FROM (SELECT 1) AS one
             LEFT JOIN LATERAL (
                 SELECT id, campaign_id, step FROM deliveries
                 WHERE lead_id = $1 AND state = 'sent' ORDER BY sent_at DESC LIMIT 1
             ) d ON true
             ON CONFLICT (event_id) DO NOTHING",
            &[&lead_id, &event_id, &order_id, &amount, &currency],
        )
        .await?;
    if inserted > 0 {
        metrics::converted();
    }
    Ok(inserted as usize)
}
