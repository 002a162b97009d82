//! Acting on accepted events: enroll in matching campaigns, end sequences on conversion or opt-out, attribute
//! revenue. Each event is handled once (its `handled_at`), in one transaction.

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
pub async fn handle_events(pool: &Pool, event_ids: &[i64]) -> anyhow::Result<Handled> {
    let mut total = Handled::default();
    let mut client = pool.get().await?;
    let scoring = scoring::EventScoring::load(&client).await?;
    let mut ids = event_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let tx = client.transaction().await?;
    for id in ids {
        let h = handle_event(&tx, id).await?;
        if h.skipped == 0 {
            scoring.apply_event(&tx, id, chrono::Utc::now()).await?;
        }
        total.enrollments += h.enrollments;
        total.cancelled_deliveries += h.cancelled_deliveries;
        total.conversions += h.conversions;
        total.skipped += h.skipped;
    }
    tx.commit().await?;
    Ok(total)
}

async fn handle_event(tx: &impl GenericClient, id: i64) -> anyhow::Result<Handled> {
    let mut h = Handled::default();
    // The row lock makes two schedulers handling the same event take turns; the second sees it handled.
    let Some(row) = tx
        .query_opt(
            &tx.prepare_cached(
                "SELECT e.type, e.lead_id, e.data, l.suppressed_reason, l.email
             FROM events e JOIN leads l ON l.id = e.lead_id
             WHERE e.id = $1 AND e.handled_at IS NULL
             FOR UPDATE OF e",
            )
            .await?,
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
    let email: String = row.get(4);
    let event_type = EventType::parse(&event_type)?;

    match &event_type {
        t if t.lead_source().is_some() => {
            if let (Some(source), None) = (t.lead_source(), &suppressed) {
                h.enrollments = enroll(tx, lead_id, id, source, &data).await?;
            }
        }
        EventType::OrderCompleted => {
            let purchase = Purchase::of(&data);
            h.cancelled_deliveries = end_purchased_sequences(tx, lead_id, &purchase).await?;
            h.conversions = record_conversion(tx, lead_id, id, &data).await?;
        }
        EventType::LeadUnsubscribed
        | EventType::LeadSuspended
        | EventType::EmailBounced
        | EventType::EmailComplained => {
            let reason = match event_type {
                EventType::LeadUnsubscribed => suppression::Reason::Unsubscribed,
                EventType::LeadSuspended => suppression::Reason::Suspended,
                EventType::EmailBounced => suppression::Reason::Bounced,
                _ => suppression::Reason::Complained,
            };
            // The same mechanism as the unsubscribe page and bounce reports: a suppression list entry, the lead
            // marked, its open follow-ups cancelled with the reason.
            let address = EmailAddress::parse(&email)?;
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
    tx.execute(
        &tx.prepare_cached("UPDATE events SET handled_at = now() WHERE id = $1")
            .await?,
        &[&id],
    )
    .await?;
    metrics::event_handled(&event_type);
    Ok(h)
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

/// Enrolls the lead in every active campaign whose targeting matches (lead source, products, languages, audience,
/// countries) and that the address is not suppressed for, once per lead x campaign x subject, creating one
/// delivery row per step. Step 1 is due after its delay (at least the lead source's minimum delay); each later
/// step after the previous one's due time.
async fn enroll(
    tx: &impl GenericClient,
    lead_id: i64,
    event_id: i64,
    source: LeadSource,
    data: &Value,
) -> anyhow::Result<usize> {
    let product = data.get("product").cloned().filter(|p| p.is_object());
    let subject = Subject::of(data);
    let min_delay = settings::min_delay(tx, source).await?.as_secs_f64();
    let campaigns = tx
        .query(
            &tx.prepare_cached(
                "SELECT c.id, c.holdout_percent, CASE WHEN c.ab_keep_best THEN c.ab_winner END, c.audience_list,
                        c.notify_url IS NOT NULL
             FROM campaigns c JOIN leads l ON l.id = $2
             WHERE c.status = 'active'
               AND (c.lead_source IS NULL OR c.lead_source = $1)
               AND (cardinality(c.products) = 0 OR $3::text = ANY (c.products))
               AND (cardinality(c.languages) = 0
                    OR lower(split_part(coalesce(l.language, ''), '-', 1)) = ANY (c.languages))
               AND (cardinality(c.countries) = 0 OR upper(coalesce(l.country, '')) = ANY (c.countries))
               -- The suppression list (by address hash, see leadflow_shared::suppression): everywhere or here.
               AND NOT EXISTS (SELECT 1 FROM suppressions s
                               WHERE s.email_hash = encode(sha256(convert_to(l.email, 'UTF8')), 'hex')
                                 AND (s.campaign_id IS NULL OR s.campaign_id = c.id))
             ORDER BY c.id",
            )
            .await?,
            &[&source.as_str(), &lead_id, &subject.product_sku],
        )
        .await?;
    let mut enrolled = 0;
    for campaign in campaigns {
        let campaign_id: i64 = campaign.get(0);
        let holdout_percent: i16 = campaign.get(1);
        let winner: Option<String> = campaign.get(2);
        let audience: Option<i64> = campaign.get(3);
        // Only a campaign with a notification URL hears of enrollments: no look-up per enrollment otherwise.
        let notifies: bool = campaign.get(4);
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
            pick_variant(lead_id, campaign_id, &variants)
        };
        let inserted = tx
            .query_opt(
                &tx.prepare_cached(
                    "INSERT INTO enrollments (lead_id, campaign_id, event_id, product, subject, checkout_id, order_id,
                                          product_sku, variant, holdout)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (lead_id, campaign_id, subject) DO NOTHING
                 RETURNING id",
                )
                .await?,
                &[
                    &lead_id,
                    &campaign_id,
                    &event_id,
                    &product,
                    &subject.key(),
                    &subject.checkout_id,
                    &subject.order_id,
                    &subject.product_sku,
                    &variant,
                    &holdout,
                ],
            )
            .await?;
        let Some(enrollment) = inserted else {
            continue; // already enrolled about this checkout / order / product
        };
        let enrollment_id: i64 = enrollment.get(0);
        enrolled += 1;
        metrics::enrolled();
        if notifies {
            notify::enqueue(
                tx,
                notify::About::Enrollment(enrollment_id),
                notify::Kind::Enrolled,
                serde_json::json!({ "holdout": holdout }),
            )
            .await?;
        }
        let Some(variant) = variant else {
            continue; // the holdout group receives nothing; its purchases measure the campaign's lift
        };
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO deliveries (enrollment_id, lead_id, campaign_id, step, due_at, variant)
             SELECT $1, $2, $3, s.step,
                    now() + make_interval(secs => (sum(CASE WHEN s.step = 1 THEN greatest(s.delay_seconds::float8, $4)
                                                            ELSE s.delay_seconds::float8 END)
                                                   OVER (ORDER BY s.step))),
                    s.variant
             FROM campaign_steps s WHERE s.campaign_id = $3 AND s.variant = $5",
            )
            .await?,
            &[&enrollment_id, &lead_id, &campaign_id, &min_delay, &variant],
        )
        .await?;
    }
    Ok(enrolled)
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
