//! Storing accepted events: upsert the lead by email (a new lead gets its origin from the event; keyed on customer
//! ids, [`identity`] first makes the email lead to the customer's lead), record the event on its timeline, open or
//! touch the inquiry it is about, skip repeats.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;

use leadflow_shared::config::IdentityKey;

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
///
/// Keyed on emails, the batch is stored set-wise ([`store_batch`]): a few multi-row statements for the whole
/// batch instead of four per event. Keyed on customer ids, each event is stored in turn, since finding its lead
/// can change another lead of the same batch.
pub async fn store_events(pool: &Pool, events: &[LeadEvent]) -> anyhow::Result<Stored> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let keyed_on_customers = events
        .iter()
        .any(|e| e.identity == IdentityKey::CustomerId && e.customer_id.is_some());
    let stored = if keyed_on_customers {
        let mut stored = Stored::default();
        for (i, event) in events.iter().enumerate() {
            match store_one(&tx, event).await.map_err(|e| Refused::locate(e, i))? {
                Some(id) => stored.new_event_ids.push(id),
                None => stored.duplicates += 1,
            }
        }
        stored
    } else {
        store_batch(&tx, events).await?
    };
    tx.commit().await?;
    Ok(stored)
}

/// Stores a batch keyed on emails with one statement per table: the repeat check, the lead upserts, the events,
/// the inquiries. The result is what storing the events one by one, in order, gives: the first of two events
/// with the same `source` + `id` is stored and the second is a repeat; a lead or inquiry that several events of
/// the batch touch is upserted once per event, in their order (in rounds, since one statement may not update
/// the same row twice); event rows get their ids in the batch's order.
async fn store_batch(tx: &impl GenericClient, events: &[LeadEvent]) -> anyhow::Result<Stored> {
    let mut stored = Stored::default();
    let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(events.len());
    let mut fresh: Vec<&LeadEvent> = Vec::with_capacity(events.len());
    for event in events {
        if seen.insert((event.source.as_str(), event.id.as_str())) {
            fresh.push(event);
        } else {
            stored.duplicates += 1;
        }
    }
    // Cheap repeat check first, so a replayed event does not touch the lead.
    let sources: Vec<&str> = fresh.iter().map(|e| e.source.as_str()).collect();
    let ids: Vec<&str> = fresh.iter().map(|e| e.id.as_str()).collect();
    let repeats: HashSet<(String, String)> = tx
        .query(
            &tx.prepare_cached(
                "SELECT e.source, e.event_id FROM events e
                 JOIN unnest($1::text[], $2::text[]) AS x (source, event_id)
                   ON e.source = x.source AND e.event_id = x.event_id",
            )
            .await?,
            &[&sources, &ids],
        )
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<anyhow::Result<_>>()?;
    let before = fresh.len();
    fresh.retain(|e| !repeats.contains(&(e.source.clone(), e.id.clone())));
    stored.duplicates += before - fresh.len();
    if fresh.is_empty() {
        return Ok(stored);
    }

    let lead_of = upsert_leads(tx, &fresh).await?;
    let lead_ids: Vec<i64> = fresh
        .iter()
        .map(|e| {
            lead_of
                .get(e.email.as_str())
                .copied()
                .ok_or_else(|| anyhow::anyhow!("the upsert returned no lead for an event of the batch"))
        })
        .collect::<anyhow::Result<_>>()?;

    let types: Vec<String> = fresh.iter().map(|e| e.event_type.as_str()).collect();
    let data: Vec<&Value> = fresh.iter().map(|e| &e.data).collect();
    let times: Vec<DateTime<Utc>> = fresh.iter().map(|e| e.time).collect();
    let sources: Vec<&str> = fresh.iter().map(|e| e.source.as_str()).collect();
    let ids: Vec<&str> = fresh.iter().map(|e| e.id.as_str()).collect();
    let inserted: HashMap<(String, String), i64> = tx
        .query(
            &tx.prepare_cached(
                "INSERT INTO events (source, event_id, type, lead_id, data, occurred_at)
                 SELECT x.source, x.event_id, x.type, x.lead_id, x.data, x.occurred_at
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::jsonb[], $6::timestamptz[])
                      WITH ORDINALITY AS x (source, event_id, type, lead_id, data, occurred_at, n)
                 ORDER BY x.n
                 ON CONFLICT (source, event_id) DO NOTHING
                 RETURNING id, source, event_id",
            )
            .await?,
            &[&sources, &ids, &types, &lead_ids, &data, &times],
        )
        .await?
        .iter()
        .map(|row| Ok(((row.try_get(1)?, row.try_get(2)?), row.try_get(0)?)))
        .collect::<anyhow::Result<_>>()?;

    let mut inquiries = Vec::new();
    for (event, lead_id) in fresh.iter().zip(&lead_ids) {
        // Stored meanwhile by a concurrent batch: a repeat, as the one-by-one path would find it.
        let Some(event_id) = inserted.get(&(event.source.clone(), event.id.clone())).copied() else {
            stored.duplicates += 1;
            continue;
        };
        stored.new_event_ids.push(event_id);
        if let Some(inquiry) = Inquiry::of(*lead_id, event_id, event) {
            inquiries.push(inquiry);
        }
    }
    upsert_inquiries(tx, &inquiries).await?;
    Ok(stored)
}

/// Splits items into rounds in which no key appears twice, each item in the round after the one holding the
/// previous item with its key, so applying the rounds in order applies each key's items in order.
fn rounds<T, K: std::hash::Hash + Eq>(items: &[T], key: impl Fn(&T) -> K) -> Vec<Vec<&T>> {
    let mut rounds: Vec<Vec<&T>> = Vec::new();
    let mut next_round: HashMap<K, usize> = HashMap::with_capacity(items.len());
    for item in items {
        let round = next_round.entry(key(item)).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(item);
        *round += 1;
    }
    rounds
}

/// Upserts the leads of `events` by email, as the one-event statement of [`store_one`] does, one statement per
/// round; returns each email's lead id.
async fn upsert_leads(tx: &impl GenericClient, events: &[&LeadEvent]) -> anyhow::Result<HashMap<String, i64>> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO leads (email, first_name, last_name, phones, country, language, timezone, attributes,
                                source, original_source, original_source_category, search_keyword)
             SELECT x.email, x.first_name, x.last_name, coalesce(array_remove(ARRAY[x.phone], NULL), '{}'),
                    x.country, x.language, x.timezone, x.attributes, o.name, o.name, o.category, x.keyword
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::jsonb[], $9::text[], $10::text[], $11::text[])
                  WITH ORDINALITY AS x (email, first_name, last_name, phone, country, language, timezone,
                                        attributes, origin, fallback_origin, keyword, n)
             -- The first defined lead source among the event's own and the fallback.
             LEFT JOIN LATERAL (SELECT name, category FROM lead_sources
                                WHERE name = ANY (ARRAY[x.origin, x.fallback_origin])
                                ORDER BY array_position(ARRAY[x.origin, x.fallback_origin], name) LIMIT 1) o ON true
             ORDER BY x.n
             ON CONFLICT (email) DO UPDATE SET
                 first_name = coalesce(EXCLUDED.first_name, leads.first_name),
                 last_name  = coalesce(EXCLUDED.last_name, leads.last_name),
                 phones     = CASE WHEN cardinality(EXCLUDED.phones) = 0 OR EXCLUDED.phones[1] = ANY (leads.phones)
                                   THEN leads.phones ELSE leads.phones || EXCLUDED.phones END,
                 country    = coalesce(EXCLUDED.country, leads.country),
                 language   = coalesce(EXCLUDED.language, leads.language),
                 timezone   = coalesce(EXCLUDED.timezone, leads.timezone),
                 attributes = leads.attributes || EXCLUDED.attributes,
                 updated_at = now()
             RETURNING id, email",
        )
        .await?;
    let mut lead_of = HashMap::with_capacity(events.len());
    for round in rounds(events, |e| e.email.as_str()) {
        let mut c = LeadColumns::default();
        for event in round {
            let p = &event.profile;
            let mut origin = origin_candidates(event).into_iter();
            c.emails.push(event.email.as_str());
            c.first_names.push(p.first_name.as_deref());
            c.last_names.push(p.last_name.as_deref());
            c.phones.push(p.phone.as_deref());
            c.countries.push(p.country.as_deref());
            c.languages.push(p.language.as_deref());
            c.timezones.push(p.timezone.as_deref());
            c.attributes.push(Value::Object(p.attributes.clone()));
            c.origins.push(origin.next());
            c.fallback_origins.push(origin.next());
            c.keywords.push(keyword_of(event));
        }
        let rows = tx
            .query(
                &statement,
                &[
                    &c.emails,
                    &c.first_names,
                    &c.last_names,
                    &c.phones,
                    &c.countries,
                    &c.languages,
                    &c.timezones,
                    &c.attributes,
                    &c.origins,
                    &c.fallback_origins,
                    &c.keywords,
                ],
            )
            .await?;
        for row in rows {
            lead_of.insert(row.try_get(1)?, row.try_get(0)?);
        }
    }
    Ok(lead_of)
}

/// The leads of one upsert round, column by column.
#[derive(Default)]
struct LeadColumns<'a> {
    emails: Vec<&'a str>,
    first_names: Vec<Option<&'a str>>,
    last_names: Vec<Option<&'a str>>,
    phones: Vec<Option<&'a str>>,
    countries: Vec<Option<&'a str>>,
    languages: Vec<Option<&'a str>>,
    timezones: Vec<Option<&'a str>>,
    attributes: Vec<Value>,
    origins: Vec<Option<String>>,
    fallback_origins: Vec<Option<String>>,
    keywords: Vec<Option<String>>,
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
    let keyword = keyword_of(event);
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

/// The inquiry an event is about (its checkout, order or product, keyed like enrollments); an event about nothing
/// in particular has none.
struct Inquiry<'a> {
    lead_id: i64,
    event_id: i64,
    subject: String,
    product_sku: Option<String>,
    product_name: Option<&'a str>,
    lead_source: String,
}

impl<'a> Inquiry<'a> {
    fn of(lead_id: i64, event_id: i64, event: &'a LeadEvent) -> Option<Self> {
        let subject = Subject::of(&event.data);
        let key = subject.key();
        if key.is_empty() {
            return None;
        }
        let product_name = event
            .data
            .get("product")
            .and_then(|p| p.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        Some(Self {
            lead_id,
            event_id,
            subject: key,
            product_sku: subject.product_sku,
            product_name,
            lead_source: event.event_type.as_str(),
        })
    }
}

/// Opens the inquiry the event is about, or fills in what the stored one lacks.
async fn record_inquiry(tx: &impl GenericClient, lead_id: i64, event_id: i64, event: &LeadEvent) -> anyhow::Result<()> {
    match Inquiry::of(lead_id, event_id, event) {
        Some(inquiry) => upsert_inquiries(tx, &[inquiry]).await,
        None => Ok(()),
    }
}

/// Opens each inquiry, or fills in what the stored one lacks, one statement per round (an inquiry that several
/// events touch is upserted once per event, in order).
async fn upsert_inquiries(tx: &impl GenericClient, inquiries: &[Inquiry<'_>]) -> anyhow::Result<()> {
    if inquiries.is_empty() {
        return Ok(());
    }
    let statement = tx
        .prepare_cached(
            "INSERT INTO inquiries (lead_id, subject, product_sku, product_name, lead_source, event_id)
             SELECT x.lead_id, x.subject, x.product_sku, x.product_name, x.lead_source, x.event_id
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[])
                  WITH ORDINALITY AS x (lead_id, subject, product_sku, product_name, lead_source, event_id, n)
             ORDER BY x.n
             ON CONFLICT (lead_id, subject) DO UPDATE SET
                 product_sku  = coalesce(inquiries.product_sku, EXCLUDED.product_sku),
                 product_name = coalesce(inquiries.product_name, EXCLUDED.product_name),
                 status       = CASE WHEN inquiries.status = 'New' THEN 'Started' ELSE inquiries.status END,
                 updated_at   = now()",
        )
        .await?;
    for round in rounds(inquiries, |i| (i.lead_id, i.subject.clone())) {
        let lead_ids: Vec<i64> = round.iter().map(|i| i.lead_id).collect();
        let subjects: Vec<&str> = round.iter().map(|i| i.subject.as_str()).collect();
        let skus: Vec<Option<&str>> = round.iter().map(|i| i.product_sku.as_deref()).collect();
        let names: Vec<Option<&str>> = round.iter().map(|i| i.product_name).collect();
        let sources: Vec<&str> = round.iter().map(|i| i.lead_source.as_str()).collect();
        let event_ids: Vec<i64> = round.iter().map(|i| i.event_id).collect();
        tx.execute(&statement, &[&lead_ids, &subjects, &skus, &names, &sources, &event_ids])
            .await?;
    }
    Ok(())
}

/// The search keyword a new lead came with (`data.search_keyword` or `data.utm_term`), at most 200 characters.
fn keyword_of(event: &LeadEvent) -> Option<String> {
    text_at(&event.data, &["search_keyword", "utm_term"]).map(|k| k.chars().take(200).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_hold_each_key_once_and_keep_each_keys_order() {
        let items = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("a", 5), ("b", 6)];
        let split = rounds(&items, |(k, _)| *k);
        let values: Vec<Vec<i32>> = split.iter().map(|r| r.iter().map(|(_, v)| *v).collect()).collect();
        assert_eq!(values, vec![vec![1, 2, 4], vec![3, 6], vec![5]]);
        let none: [(&str, i32); 0] = [];
        assert!(rounds(&none, |(k, _)| *k).is_empty());
    }
}
