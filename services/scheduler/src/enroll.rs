//! Acting on accepted events: enroll in matching campaigns, end sequences on conversion or opt-out, attribute
//! revenue. Each event is handled once (its `handled_at`), in one transaction.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;

use leadflow_shared::domain::{EmailAddress, EventType, LeadSource};
use leadflow_shared::lead_filter::{self, LeadFilter};
use leadflow_shared::settings;
use leadflow_shared::suppression;

use crate::metrics;
use crate::{codes, notify, scoring};

/// What handling a batch of events did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Handled {
    pub enrollments: usize,
    pub cancelled_deliveries: usize,
    pub conversions: usize,
    /// Events already handled before (a redelivered message).
    pub skipped: usize,
}

/// Handles the events of one message in one transaction (one commit for the batch, not one per event), in id
/// order so two schedulers handling overlapping batches lock in the same order; an event already handled is
/// skipped. A failure rolls the whole batch back: the message is tried again and nothing is half-applied.
///
/// The events are claimed (locked and marked handled) in one statement. Runs of events about distinct leads are
/// enrolled together, a few statements for the whole run ([`enroll_run`]), then scored in order; an event that
/// ends sequences (a purchase, an opt-out) first finishes the run before it, then is handled alone, so each event
/// still sees what the events before it did.
pub async fn handle_events(pool: &Pool, event_ids: &[i64]) -> anyhow::Result<Handled> {
    let mut total = Handled::default();
    let mut client = pool.get().await?;
    let scoring = scoring::EventScoring::load(&client).await?;
    let mut ids = event_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let tx = client.transaction().await?;
    let events = claim_events(&tx, &ids).await?;
    total.skipped = ids.len() - events.len();
    let mut lookups = Lookups::default();
    let mut run: Vec<Claimed> = Vec::new();
    for event in events {
        let ends = ends_sequences(&event.event_type);
        if ends || run.iter().any(|e| e.lead_id == event.lead_id) {
            total.add(&finish_run(&tx, &scoring, &mut run, &mut lookups).await?);
        }
        if !ends {
            // Enrolling events, and events that only count for scoring (engagement, lead.captured, ...).
            run.push(event);
            continue;
        }
        total.add(&handle_event(&tx, &event).await?);
        scoring.apply_event(&tx, event.id, chrono::Utc::now()).await?;
        metrics::event_handled(&event.event_type);
    }
    total.add(&finish_run(&tx, &scoring, &mut run, &mut lookups).await?);
    tx.commit().await?;
    Ok(total)
}

impl Handled {
    fn add(&mut self, other: &Handled) {
        self.enrollments += other.enrollments;
        self.cancelled_deliveries += other.cancelled_deliveries;
        self.conversions += other.conversions;
        self.skipped += other.skipped;
    }
}

/// Whether the event ends sequences (a purchase, an opt-out): it is handled alone, after the events before it.
fn ends_sequences(event_type: &EventType) -> bool {
    matches!(
        event_type,
        EventType::OrderCompleted
            | EventType::LeadUnsubscribed
            | EventType::LeadSuspended
            | EventType::EmailBounced
            | EventType::EmailComplained
    )
}

/// An event claimed for handling.
struct Claimed {
    id: i64,
    event_type: EventType,
    lead_id: i64,
    data: Value,
}

/// Locks the events of `ids` not handled yet, in id order, and marks them handled; returns them in id order.
/// The row locks make two schedulers handling the same event take turns; the second finds it handled.
async fn claim_events(tx: &impl GenericClient, ids: &[i64]) -> anyhow::Result<Vec<Claimed>> {
    let rows = tx
        .query(
            &tx.prepare_cached(
                // Found by id alone, then filtered: `handled_at IS NULL` next to the ids would let the planner
                // combine the primary key with the partial index of unhandled events, reading the whole backlog
                // for every batch whenever the table's statistics lag behind it.
                "WITH locked AS MATERIALIZED (SELECT id, handled_at FROM events WHERE id = ANY ($1)
                                              ORDER BY id FOR UPDATE)
                 UPDATE events e SET handled_at = now() FROM locked
                  WHERE e.id = locked.id AND locked.handled_at IS NULL
                 RETURNING e.id, e.type, e.lead_id, e.data",
            )
            .await?,
            &[&ids],
        )
        .await?;
    let mut events = rows
        .iter()
        .map(|row| {
            Ok(Claimed {
                id: row.try_get(0)?,
                event_type: EventType::parse(row.try_get::<_, &str>(1)?)?,
                lead_id: row.try_get(2)?,
                data: row.try_get(3)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    events.sort_unstable_by_key(|e| e.id);
    Ok(events)
}

/// Enrolls the leads of the run's enrolling events, then scores each event of the run, and empties the run.
async fn finish_run(
    tx: &impl GenericClient,
    scoring: &scoring::EventScoring,
    run: &mut Vec<Claimed>,
    lookups: &mut Lookups,
) -> anyhow::Result<Handled> {
    if run.is_empty() {
        return Ok(Handled::default());
    }
    let h = Handled {
        enrollments: enroll_run(tx, run, lookups).await?,
        ..Handled::default()
    };
    for event in run.drain(..) {
        scoring.apply_event(tx, event.id, chrono::Utc::now()).await?;
        metrics::event_handled(&event.event_type);
    }
    Ok(h)
}

/// Handles an event that ends sequences: a purchase ends them and is attributed, an opt-out suppresses.
async fn handle_event(tx: &impl GenericClient, event: &Claimed) -> anyhow::Result<Handled> {
    let mut h = Handled::default();
    let (lead_id, data) = (event.lead_id, &event.data);
    match &event.event_type {
        EventType::OrderCompleted => {
            let purchase = Purchase::of(data);
            h.cancelled_deliveries = end_purchased_sequences(tx, lead_id, &purchase).await?;
            h.conversions = record_conversion(tx, lead_id, event.id, data).await?;
        }
        EventType::LeadUnsubscribed
        | EventType::LeadSuspended
        | EventType::EmailBounced
        | EventType::EmailComplained => {
            let reason = match event.event_type {
                EventType::LeadUnsubscribed => suppression::Reason::Unsubscribed,
                EventType::LeadSuspended => suppression::Reason::Suspended,
                EventType::EmailBounced => suppression::Reason::Bounced,
                _ => suppression::Reason::Complained,
            };
            let Some(row) = tx
                .query_opt(
                    &tx.prepare_cached("SELECT email FROM leads WHERE id = $1").await?,
                    &[&lead_id],
                )
                .await?
            else {
                return Ok(h);
            };
            // The same mechanism as the unsubscribe page and bounce reports: a suppression list entry, the lead
            // marked, its open follow-ups cancelled with the reason.
            let address = EmailAddress::parse(row.try_get::<_, &str>(0)?)?;
            let done = suppression::suppress(tx, &address, reason, "event", None, None).await?;
            if let Some(kind) = notify::Kind::for_reason(reason.as_str()) {
                for enrollment in &done.ended_enrollments {
                    let details = serde_json::json!({ "reason": reason.as_str() });
                    notify::enqueue(tx, notify::About::Enrollment(*enrollment), kind, details).await?;
                }
            }
            metrics::cancelled(reason.as_str(), done.cancelled_deliveries);
            h.cancelled_deliveries = done.cancelled_deliveries as usize;
        }
        _ => {}
    }
    Ok(h)
}

/// What enrollment reads about the configuration, once per batch: the minimum delay of each lead source and the
/// A/B variants (name, weight) of each campaign.
#[derive(Default)]
struct Lookups {
    min_delays: HashMap<LeadSource, f64>,
    variants: HashMap<i64, Vec<(String, i32)>>,
}

impl Lookups {
    async fn min_delay(&mut self, tx: &impl GenericClient, source: LeadSource) -> anyhow::Result<f64> {
        if let Some(seconds) = self.min_delays.get(&source) {
            return Ok(*seconds);
        }
        let seconds = settings::min_delay(tx, source).await?.as_secs_f64();
        self.min_delays.insert(source, seconds);
        Ok(seconds)
    }

    async fn variants(&mut self, tx: &impl GenericClient, campaign_id: i64) -> anyhow::Result<&[(String, i32)]> {
        if let Entry::Vacant(slot) = self.variants.entry(campaign_id) {
            let variants: Vec<(String, i32)> = tx
                .query(
                    &tx.prepare_cached(
                        "SELECT name, weight FROM campaign_variants WHERE campaign_id = $1 ORDER BY name",
                    )
                    .await?,
                    &[&campaign_id],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            slot.insert(variants);
        }
        Ok(self.variants.get(&campaign_id).map(Vec::as_slice).unwrap_or_default())
    }
}

/// Whether the lead is in a campaign's audience: a member of the static list, or matching the segment's filter
/// as it reads now.
async fn in_audience(tx: &impl GenericClient, list_id: i64, lead_id: i64) -> anyhow::Result<bool> {
    let name: String = tx
        .query_one("SELECT name FROM lead_lists WHERE id = $1", &[&list_id])
        .await?
        .get(0);
    let mut filter = LeadFilter::from_pairs(&[("list".to_string(), name)])?;
    filter.resolve_lists(tx).await?;
    let (condition, mut params) = filter.to_sql(2);
    params.insert(0, Box::new(lead_id));
    let matched = tx
        .query_opt(
            &format!("SELECT 1 FROM leads l WHERE l.id = $1 AND {condition}"),
            &lead_filter::param_refs(&params),
        )
        .await?;
    Ok(matched.is_some())
}

/// What an event is about, for enrollment keys and for matching a purchase to the sequences it ends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Subject {
    pub checkout_id: Option<String>,
    pub order_id: Option<String>,
    pub product_sku: Option<String>,
}

impl Subject {
    pub fn of(data: &Value) -> Self {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string).filter(|s| !s.is_empty());
        Self {
            checkout_id: text(data.get("checkout_id")),
            order_id: text(data.get("order_id")),
            product_sku: text(data.get("product").and_then(|p| p.get("sku"))),
        }
    }

    /// One enrollment per lead x campaign x this key: the checkout, else the order, else the product.
    pub fn key(&self) -> String {
        match (&self.checkout_id, &self.order_id, &self.product_sku) {
            (Some(c), _, _) => format!("checkout:{c}"),
            (None, Some(o), _) => format!("order:{o}"),
            (None, None, Some(p)) => format!("product:{p}"),
            (None, None, None) => String::new(),
        }
    }
}

/// Enrolls the lead of each enrolling event of `run` (events about distinct leads, in id order) in every active
/// campaign whose targeting matches (lead source, products, languages, audience, countries) and that the address
/// is not suppressed for, once per lead x campaign x subject, creating one delivery row per step. Step 1 is due
/// after its delay (at least the lead source's minimum delay); each later step after the previous one's due time.
/// A lead suppressed (unsubscribed, bounced, complained, suspended) is not enrolled.
///
/// The whole run costs one statement to match campaigns, one to insert the enrollments and one for their
/// deliveries; only audiences, variants and notifications are looked up per enrollment or campaign.
async fn enroll_run(tx: &impl GenericClient, run: &[Claimed], lookups: &mut Lookups) -> anyhow::Result<usize> {
    let mut event_ids = Vec::with_capacity(run.len());
    let mut lead_ids = Vec::with_capacity(run.len());
    let mut sources = Vec::with_capacity(run.len());
    let mut skus = Vec::with_capacity(run.len());
    let mut subjects = HashMap::with_capacity(run.len());
    for event in run {
        let Some(source) = event.event_type.lead_source() else {
            continue;
        };
        let subject = Subject::of(&event.data);
        event_ids.push(event.id);
        lead_ids.push(event.lead_id);
        sources.push(source.as_str());
        skus.push(subject.product_sku.clone());
        subjects.insert(event.id, (event, source, subject));
    }
    if event_ids.is_empty() {
        return Ok(0);
    }
    let matches = tx
        .query(
            &tx.prepare_cached(
                "SELECT x.event_id, c.id, c.holdout_percent, CASE WHEN c.ab_keep_best THEN c.ab_winner END,
                        c.audience_list, c.notify_url IS NOT NULL
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[]) AS x (event_id, lead_id, source, sku)
             JOIN leads l ON l.id = x.lead_id AND l.suppressed_reason IS NULL
             JOIN campaigns c
               ON c.status = 'active'
              AND (c.lead_source IS NULL OR c.lead_source = x.source)
              AND (cardinality(c.products) = 0 OR x.sku = ANY (c.products))
              AND (cardinality(c.languages) = 0
                   OR lower(split_part(coalesce(l.language, ''), '-', 1)) = ANY (c.languages))
              AND (cardinality(c.countries) = 0 OR upper(coalesce(l.country, '')) = ANY (c.countries))
             -- The suppression list (by address hash, see leadflow_shared::suppression): everywhere or here.
             WHERE NOT EXISTS (SELECT 1 FROM suppressions s
                               WHERE s.email_hash = encode(sha256(convert_to(l.email, 'UTF8')), 'hex')
                                 AND (s.campaign_id IS NULL OR s.campaign_id = c.id))
             ORDER BY x.event_id, c.id",
            )
            .await?,
            &[&event_ids, &lead_ids, &sources, &skus],
        )
        .await?;

    /// One enrollment to insert.
    struct Planned {
        event_id: i64,
        lead_id: i64,
        campaign_id: i64,
        variant: Option<String>,
        holdout: bool,
        notifies: bool,
        min_delay: f64,
    }
    let mut planned: Vec<Planned> = Vec::with_capacity(matches.len());
    for row in &matches {
        let event_id: i64 = row.try_get(0)?;
        let campaign_id: i64 = row.try_get(1)?;
        let holdout_percent: i16 = row.try_get(2)?;
        let winner: Option<String> = row.try_get(3)?;
        let audience: Option<i64> = row.try_get(4)?;
        // Only a campaign with a notification URL hears of enrollments: no look-up per enrollment otherwise.
        let notifies: bool = row.try_get(5)?;
        let Some((event, source, _)) = subjects.get(&event_id) else {
            continue;
        };
        let lead_id = event.lead_id;
        if let Some(list_id) = audience {
            if !in_audience(tx, list_id, lead_id).await? {
                continue;
            }
        }
        let holdout = in_holdout(lead_id, campaign_id, holdout_percent);
        let variant = if holdout {
            None
        } else if let Some(w) = winner {
            Some(w)
        } else {
            pick_variant(lead_id, campaign_id, lookups.variants(tx, campaign_id).await?)
        };
        planned.push(Planned {
            event_id,
            lead_id,
            campaign_id,
            variant,
            holdout,
            notifies,
            min_delay: lookups.min_delay(tx, *source).await?,
        });
    }
    if planned.is_empty() {
        return Ok(0);
    }

    let mut columns = EnrollmentColumns::default();
    for p in &planned {
        let Some((event, _, subject)) = subjects.get(&p.event_id) else {
            continue;
        };
        columns.lead_ids.push(p.lead_id);
        columns.campaign_ids.push(p.campaign_id);
        columns.event_ids.push(p.event_id);
        columns
            .products
            .push(event.data.get("product").cloned().filter(|p| p.is_object()));
        columns.subjects.push(subject.key());
        columns.checkout_ids.push(subject.checkout_id.clone());
        columns.order_ids.push(subject.order_id.clone());
        columns.skus.push(subject.product_sku.clone());
        columns.variants.push(p.variant.clone());
        columns.holdouts.push(p.holdout);
    }
    // The leads of a run are distinct, so (lead, campaign) names one enrollment of this statement; one that
    // exists already about the same checkout / order / product is left alone.
    let inserted = tx
        .query(
            &tx.prepare_cached(
                // Linked to the inquiry about the same subject here (the row trigger of migration 0012 does it
                // for enrollments made elsewhere).
                "INSERT INTO enrollments (lead_id, campaign_id, event_id, product, subject, checkout_id, order_id,
                                          product_sku, variant, holdout, inquiry_id)
                 SELECT x.lead_id, x.campaign_id, x.event_id, x.product, x.subject, x.checkout_id, x.order_id,
                        x.product_sku, x.variant, x.holdout, i.id
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::jsonb[], $5::text[], $6::text[],
                             $7::text[], $8::text[], $9::text[], $10::bool[])
                      AS x (lead_id, campaign_id, event_id, product, subject, checkout_id, order_id, product_sku,
                            variant, holdout)
                 LEFT JOIN inquiries i ON i.lead_id = x.lead_id AND i.subject = x.subject
                 ON CONFLICT (lead_id, campaign_id, subject) DO NOTHING
                 RETURNING id, lead_id, campaign_id",
            )
            .await?,
            &[
                &columns.lead_ids,
                &columns.campaign_ids,
                &columns.event_ids,
                &columns.products,
                &columns.subjects,
                &columns.checkout_ids,
                &columns.order_ids,
                &columns.skus,
                &columns.variants,
                &columns.holdouts,
            ],
        )
        .await?;
    let mut enrollment_of: HashMap<(i64, i64), i64> = HashMap::with_capacity(inserted.len());
    for row in &inserted {
        enrollment_of.insert((row.try_get(1)?, row.try_get(2)?), row.try_get(0)?);
    }

    let mut steps = StepColumns::default();
    let mut enrolled = 0;
    for p in &planned {
        let Some(enrollment_id) = enrollment_of.get(&(p.lead_id, p.campaign_id)).copied() else {
            continue; // already enrolled about this checkout / order / product
        };
        enrolled += 1;
        metrics::enrolled();
        if p.notifies {
            notify::enqueue(
                tx,
                notify::About::Enrollment(enrollment_id),
                notify::Kind::Enrolled,
                serde_json::json!({ "holdout": p.holdout }),
            )
            .await?;
        }
        // The holdout group receives nothing; its purchases measure the campaign's lift.
        if let Some(variant) = &p.variant {
            steps.enrollment_ids.push(enrollment_id);
            steps.lead_ids.push(p.lead_id);
            steps.campaign_ids.push(p.campaign_id);
            steps.min_delays.push(p.min_delay);
            steps.variants.push(variant.clone());
        }
    }
    if !steps.enrollment_ids.is_empty() {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO deliveries (enrollment_id, lead_id, campaign_id, step, due_at, variant)
                 SELECT x.enrollment_id, x.lead_id, x.campaign_id, s.step,
                        now() + make_interval(secs => (sum(CASE WHEN s.step = 1
                                                                THEN greatest(s.delay_seconds::float8, x.min_delay)
                                                                ELSE s.delay_seconds::float8 END)
                                                       OVER (PARTITION BY x.enrollment_id ORDER BY s.step))),
                        s.variant
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::float8[], $5::text[])
                      AS x (enrollment_id, lead_id, campaign_id, min_delay, variant)
                 JOIN campaign_steps s ON s.campaign_id = x.campaign_id AND s.variant = x.variant",
            )
            .await?,
            &[
                &steps.enrollment_ids,
                &steps.lead_ids,
                &steps.campaign_ids,
                &steps.min_delays,
                &steps.variants,
            ],
        )
        .await?;
    }
    Ok(enrolled)
}

/// The enrollments of a run, column by column, for one `unnest` insert.
#[derive(Default)]
struct EnrollmentColumns {
    lead_ids: Vec<i64>,
    campaign_ids: Vec<i64>,
    event_ids: Vec<i64>,
    products: Vec<Option<Value>>,
    subjects: Vec<String>,
    checkout_ids: Vec<Option<String>>,
    order_ids: Vec<Option<String>>,
    skus: Vec<Option<String>>,
    variants: Vec<Option<String>>,
    holdouts: Vec<bool>,
}

/// The enrollments whose steps become deliveries, column by column.
#[derive(Default)]
struct StepColumns {
    enrollment_ids: Vec<i64>,
    lead_ids: Vec<i64>,
    campaign_ids: Vec<i64>,
    min_delays: Vec<f64>,
    variants: Vec<String>,
}

/// A stable 64-bit hash (FNV-1a), so a lead's variant and holdout membership never change between runs.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether the lead falls in the campaign's holdout group.
pub fn in_holdout(lead_id: i64, campaign_id: i64, percent: i16) -> bool {
    percent > 0 && (stable_hash(&format!("holdout:{campaign_id}:{lead_id}")) % 100) < percent as u64
}

/// The lead's variant, chosen deterministically in proportion to the weights.
pub fn pick_variant(lead_id: i64, campaign_id: i64, variants: &[(String, i32)]) -> Option<String> {
    let total: u64 = variants.iter().map(|(_, w)| (*w).max(0) as u64).sum();
    if total == 0 {
        return None;
    }
    let mut point = stable_hash(&format!("variant:{campaign_id}:{lead_id}")) % total;
    for (name, weight) in variants {
        let w = (*weight).max(0) as u64;
        if point < w {
            return Some(name.clone());
        }
        point -= w;
    }
    None
}

/// A purchase ends the lead's sequences it concerns (completed, reason `converted`): those about its checkout or
/// products, plus any sequence about nothing in particular; a purchase naming neither ends them all.
async fn end_purchased_sequences(tx: &impl GenericClient, lead_id: i64, purchase: &Purchase) -> anyhow::Result<usize> {
    let (reason, status) = ("converted", "completed");
    let checkouts: Vec<String> = purchase.checkout_id.iter().cloned().collect();
    let skus = purchase.skus.clone();
    let everything = checkouts.is_empty() && skus.is_empty();
    let ended = tx
        .query(
            "UPDATE enrollments SET status = $3, reason = $2, ended_at = now()
             WHERE lead_id = $1 AND status = 'active'
               AND ($4 OR (checkout_id IS NULL AND product_sku IS NULL)
                    OR checkout_id = ANY ($5) OR product_sku = ANY ($6))
             RETURNING id",
            &[&lead_id, &reason, &status, &everything, &checkouts, &skus],
        )
        .await?;
    let ids: Vec<i64> = ended.iter().map(|r| r.get(0)).collect();
    if let Some(kind) = notify::Kind::for_reason(reason) {
        for id in &ids {
            notify::enqueue(
                tx,
                notify::About::Enrollment(*id),
                kind,
                serde_json::json!({ "reason": reason }),
            )
            .await?;
        }
    }
    let cancelled = tx
        .execute(
            "UPDATE deliveries SET state = 'cancelled', reason = $2, updated_at = now()
             WHERE enrollment_id = ANY ($1) AND state IN ('pending', 'queued', 'rendered', 'retrying')",
            &[&ids, &reason],
        )
        .await?;
    metrics::cancelled(reason, cancelled);
    Ok(cancelled as usize)
}

/// What a purchase names: its checkout and the SKUs bought.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub checkout_id: Option<String>,
    pub skus: Vec<String>,
}

impl Purchase {
    pub fn of(data: &Value) -> Self {
        let mut skus: Vec<String> = Vec::new();
        if let Some(sku) = data.get("product").and_then(|p| p.get("sku")).and_then(Value::as_str) {
            skus.push(sku.to_string());
        }
        if let Some(items) = data.get("products").and_then(Value::as_array) {
            skus.extend(
                items
                    .iter()
                    .filter_map(|p| p.get("sku").and_then(Value::as_str))
                    .map(str::to_string),
            );
        }
        Self {
            checkout_id: data.get("checkout_id").and_then(Value::as_str).map(str::to_string),
            skus,
        }
    }
}

/// Records the order and attributes it: to the follow-up whose discount code the order names (a code assigned to
/// this lead, which is then marked redeemed), else to the last follow-up the lead was sent within the
/// attribution window.
async fn record_conversion(
    tx: &impl GenericClient,
    lead_id: i64,
    event_id: i64,
    data: &Value,
) -> anyhow::Result<usize> {
    let amount: Option<String> = match data.get("amount") {
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let currency = data.get("currency").and_then(Value::as_str);
    let order_id = data.get("order_id").and_then(Value::as_str);
    let given_code = codes::code_of_order(data);
    let by_code = match &given_code {
        Some(code) => codes::find_for_lead(tx, lead_id, code).await?,
        None => None,
    };
    let code = by_code.as_ref().map(|c| c.code.clone()).or(given_code);
    let inserted = match &by_code {
        Some(c) => {
            tx.query_opt(
                "INSERT INTO conversions (lead_id, event_id, order_id, amount, currency, delivery_id, campaign_id, step,
                                          variant, enrollment_id, code)
                 VALUES ($1, $2, $3, CAST($4::text AS numeric), $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (event_id) DO NOTHING
                 RETURNING id, delivery_id",
                &[
                    &lead_id,
                    &event_id,
                    &order_id,
                    &amount,
                    &currency,
                    &c.delivery_id,
                    &c.campaign_id,
                    &c.step,
                    &c.variant,
                    &c.enrollment_id,
                    &code,
                ],
            )
            .await?
        }
        None => {
            let window = settings::attribution_window(tx).await?.as_secs_f64();
            tx.query_opt(
                "INSERT INTO conversions (lead_id, event_id, order_id, amount, currency, delivery_id, campaign_id, step,
                                          variant, enrollment_id, code)
                 SELECT $1, $2, $3, CAST($4::text AS numeric), $5, d.id, d.campaign_id, d.step, d.variant,
                        d.enrollment_id, $7
                 FROM (SELECT 1) AS one
                 LEFT JOIN LATERAL (
                     SELECT id, campaign_id, step, variant, enrollment_id FROM deliveries
                     WHERE lead_id = $1 AND state = 'sent' AND sent_at >= now() - make_interval(secs => $6)
                     ORDER BY sent_at DESC LIMIT 1
                 ) d ON true
                 ON CONFLICT (event_id) DO NOTHING
                 RETURNING id, delivery_id",
                &[&lead_id, &event_id, &order_id, &amount, &currency, &window, &code],
            )
            .await?
        }
    };
    let Some(row) = inserted else {
        return Ok(0);
    };
    metrics::converted();
    let conversion_id: i64 = row.try_get(0)?;
    if let Some(c) = &by_code {
        codes::mark_redeemed(tx, c.id, conversion_id).await?;
    }
    if let Some(delivery_id) = row.try_get::<_, Option<i64>>(1)? {
        let order = serde_json::json!({
            "id": order_id,
            "amount": data.get("amount").filter(|a| a.is_number() || a.is_string()),
            "currency": currency,
            "discount_code": code,
        });
        notify::enqueue(
            tx,
            notify::About::Delivery(delivery_id),
            notify::Kind::Converted,
            serde_json::json!({ "order": order }),
        )
        .await?;
    }
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_follow_the_weights_and_stay_put() {
        let variants = vec![("A".to_string(), 3), ("B".to_string(), 1)];
        let mut a = 0;
        for lead in 0..4000 {
            let v = pick_variant(lead, 7, &variants).unwrap();
            assert_eq!(
                pick_variant(lead, 7, &variants).unwrap(),
                v,
                "assignment must be deterministic"
            );
            if v == "A" {
                a += 1;
            }
        }
        assert!((2800..3200).contains(&a), "A got {a} of 4000 with weight 3:1");
        assert_eq!(pick_variant(1, 1, &[]), None);
    }

    #[test]
    fn the_holdout_is_about_its_percentage() {
        let held = (0..10_000).filter(|lead| in_holdout(*lead, 3, 10)).count();
        assert!((800..1200).contains(&held), "{held} of 10000 held out at 10%");
        assert!(!(0..100).any(|lead| in_holdout(lead, 3, 0)));
    }

    #[test]
    fn subjects_key_enrollments() {
        let s = Subject::of(&serde_json::json!({"checkout_id": "c1", "product": {"sku": "K"}}));
        assert_eq!(s.key(), "checkout:c1");
        let s = Subject::of(&serde_json::json!({"product": {"sku": "K"}}));
        assert_eq!(s.key(), "product:K");
        assert_eq!(Subject::of(&serde_json::json!({})).key(), "");
    }
}
