//! Storing accepted events: upsert the lead by email (a new lead gets its origin from the event; keyed on customer
//! ids, [`identity`] first makes the email lead to the customer's lead), record the event on its timeline, open or
//! touch the inquiry it is about, skip repeats.

use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;

use leadflow_scheduler::enroll::Subject;

use crate::events::LeadEvent;
use crate::identity::{self, Refused};

/// What storing a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Row ids of events stored now, to hand to the scheduler.
    pub new_event_ids: Vec<i64>,
    /// Events already stored earlier (same `source` + `id`): accepted and ignored.
    pub duplicates: usize,
}

/// Stores every event in one transaction: all or nothing, durable when this returns. An event the stored leads
/// do not allow fails the batch with a [`Refused`] naming its index.
pub async fn store_events(pool: &Pool, events: &[LeadEvent]) -> anyhow::Result<Stored> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut stored = Stored::default();
    for (i, event) in events.iter().enumerate() {
        match store_one(&tx, event).await.map_err(|e| Refused::locate(e, i))? {
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
            &tx.prepare_cached("SELECT 1 FROM events WHERE source = $1 AND event_id = $2")
                .await?,
            &[&event.source, &event.id],
        )
        .await?;
    if seen.is_some() {
        return Ok(None);
    }
    // Keyed on customer ids, the lead with the event's email becomes the customer's lead first.
    let keyed = identity::prepare(tx, event).await?;
    let p = &event.profile;
    let attributes = Value::Object(p.attributes.clone());
    // New non-empty values win; absent ones leave the stored profile alone.
    let origin = origin_candidates(event);
    let keyword: Option<String> =
        text_at(&event.data, &["search_keyword", "utm_term"]).map(|k| k.chars().take(200).collect());
    // The origin (source, its category, search keyword) is written when the lead is created, never on a repeat.
    let lead_id: i64 = tx
        .query_one(
            &tx.prepare_cached(
                "WITH origin AS (SELECT name, category FROM lead_sources WHERE name = ANY ($9::text[])
                              ORDER BY array_position($9::text[], name) LIMIT 1)
             INSERT INTO leads (email, first_name, last_name, phones, country, language, timezone, attributes,
                                source, original_source, original_source_category, search_keyword)
             VALUES ($1, $2, $3, coalesce(array_remove(ARRAY[$4::text], NULL), '{}'), $5, $6, $7, $8,
                     (SELECT name FROM origin), (SELECT name FROM origin), (SELECT category FROM origin), $10)
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
            )
            .await?,
            &[
                &event.email.as_str(),
                &p.first_name,
                &p.last_name,
                &p.phone,
                &p.country,
                &p.language,
                &p.timezone,
                &attributes,
                &origin,
                &keyword,
            ],
        )
        .await?
        .get(0);
    identity::claim(tx, keyed, lead_id, event).await?;
    let inserted = tx
        .query_opt(
            &tx.prepare_cached(
                "INSERT INTO events (source, event_id, type, lead_id, data, occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (source, event_id) DO NOTHING
             RETURNING id",
            )
            .await?,
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
    let Some(row) = inserted else {
        return Ok(None);
    };
    let event_id: i64 = row.get(0);
    record_inquiry(tx, lead_id, event_id, event).await?;
    Ok(Some(event_id))
}

/// Opens the inquiry the event is about (its checkout, order or product, keyed like enrollments), or fills in what
/// the stored one lacks. An event about nothing in particular has no inquiry.
async fn record_inquiry(tx: &impl GenericClient, lead_id: i64, event_id: i64, event: &LeadEvent) -> anyhow::Result<()> {
    let subject = Subject::of(&event.data);
    let key = subject.key();
    if key.is_empty() {
        return Ok(());
    }
    let product_name = event
        .data
        .get("product")
        .and_then(|p| p.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO inquiries (lead_id, subject, product_sku, product_name, lead_source, event_id)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (lead_id, subject) DO UPDATE SET
             product_sku  = coalesce(inquiries.product_sku, EXCLUDED.product_sku),
             product_name = coalesce(inquiries.product_name, EXCLUDED.product_name),
             status       = CASE WHEN inquiries.status = 'New' THEN 'Started' ELSE inquiries.status END,
             updated_at   = now()",
        )
        .await?,
        &[
            &lead_id,
            &key,
            &subject.product_sku,
            &product_name,
            &event.event_type.as_str(),
            &event_id,
        ],
    )
    .await?;
    Ok(())
}

/// The lead sources a new lead may come from, best first: the event's own `data.source`, then the shop for
/// checkout and order events. Only a defined source (`lead_sources`) is used.
fn origin_candidates(event: &LeadEvent) -> Vec<String> {
    let mut candidates: Vec<String> = text_at(&event.data, &["source"]).into_iter().collect();
    let kind = event.event_type.as_str();
    if kind.starts_with("checkout.") || kind.starts_with("order.") {
        candidates.push("checkout".into());
    }
    candidates
}

/// The first non-empty string among `keys` of `data`.
fn text_at(data: &Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .filter_map(|k| data.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .find(|s| !s.is_empty())
        .map(str::to_string)
}
