//! Storing accepted events: upsert the lead by email, record the event on its timeline, skip repeats.

use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;

use crate::events::LeadEvent;

/// What storing a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Row ids of events stored now, to hand to the scheduler.
    pub new_event_ids: Vec<i64>,
    /// Events already stored earlier (same `source` + `id`): accepted and ignored.
    pub duplicates: usize,
}

/// Stores every event in one transaction: all or nothing, durable when this returns.
pub async fn store_events(pool: &Pool, events: &[LeadEvent]) -> anyhow::Result<Stored> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut stored = Stored::default();
    for event in events {
        match store_one(&tx, event).await? {
            Some(id) => stored.new_event_ids.push(id),
            None => stored.duplicates += 1,
        }
    }
    tx.commit().await?;
    Ok(stored)
}

async fn store_one(tx: &impl GenericClient, event: &LeadEvent) -> anyhow::Result<Option<i64>> {
    // Cheap repeat check first, so a replayed event does not touch the lead.
    let seen = tx
        .query_opt(
            "SELECT 1 FROM events WHERE source = $1 AND event_id = $2",
            &[&event.source, &event.id],
        )
        .await?;
    if seen.is_some() {
        return Ok(None);
    }
    let p = &event.profile;
    let attributes = Value::Object(p.attributes.clone());
    // New non-empty values win; absent ones leave the stored profile alone.
    let lead_id: i64 = tx
        .query_one(
            "INSERT INTO leads (email, first_name, last_name, phones, country, language, timezone, attributes)
             VALUES ($1, $2, $3, coalesce(array_remove(ARRAY[$4::text], NULL), '{}'), $5, $6, $7, $8)
             ON CONFLICT (email) DO UPDATE SET
                 first_name = coalesce(EXCLUDED.first_name, leads.first_name),
                 last_name  = coalesce(EXCLUDED.last_name, leads.last_name),
                 phones     = CASE WHEN $4::text IS NULL OR $4::text = ANY (leads.phones) THEN leads.phones
                                   ELSE leads.phones || $4::text END,
                 country    = coalesce(EXCLUDED.country, leads.country),
                 language   = coalesce(EXCLUDED.language, leads.language),
                 timezone   = coalesce(EXCLUDED.timezone, leads.timezone),
                 attributes = leads.attributes || EXCLUDED.attributes,
                 updated_at = now()
             RETURNING id",
            &[
                &event.email.as_str(),
                &p.first_name,
                &p.last_name,
                &p.phone,
                &p.country,
                &p.language,
                &p.timezone,
                &attributes,
            ],
        )
        .await?
        .get(0);
    let inserted = tx
        .query_opt(
            "INSERT INTO events (source, event_id, type, lead_id, data, occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (source, event_id) DO NOTHING
             RETURNING id",
            &[
                &event.source,
                &event.id,
                &event.event_type.as_str(),
                &lead_id,
                &event.data,
                &event.time,
            ],
        )
        .await?;
    Ok(inserted.map(|row| row.get(0)))
}
