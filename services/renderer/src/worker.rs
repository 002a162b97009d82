//! The renderer's consumer: deliveries that came due are rendered, stored for the sender and announced to it.
//!
//! Per batch: one query loads every delivery with its lead, enrollment, campaign and step; templates are rendered
//! in memory; one transaction records the results (guarded by `state = 'queued'`, so a redelivered message or a
//! delivery cancelled meanwhile is left alone); then one `email.ready.v1` names the rendered deliveries.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use anyhow::Context as _;
use deadpool_postgres::GenericClient;
use lapin::message::Delivery;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use leadflow_scheduler::codes;
use leadflow_shared::amqp::{self, Outcome};
use leadflow_shared::domain::mask_email;
use leadflow_shared::messages::WorkMessage;
use leadflow_shared::service::Context;
use leadflow_shared::topology::WorkQueue;

use crate::metrics::{self, DeliveryOutcome};
use crate::render::{
    choose_language, language_candidates, template_context, DeliveryFacts, LeadFields, RenderError, RenderedParts,
    StoredTemplate, TemplateCache,
};

/// What one batch did, by delivery id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderReport {
    /// Rendered now and announced to the sender.
    pub rendered: Vec<i64>,
    /// Failed permanently, with the reason recorded on the delivery.
    pub failed: Vec<(i64, String)>,
    /// Cancelled because the enrollment ended, with the reason recorded on the delivery.
    pub cancelled: Vec<(i64, String)>,
    /// Not queued (already rendered, sent, cancelled) or gone: nothing done.
    pub skipped: Vec<i64>,
    /// Found already rendered (a message seen again): announced to the sender again, whose claim makes that safe.
    pub reannounced: Vec<i64>,
}

/// Messages (batches of deliveries) rendered at once: one batch's queries and commit overlap the next one's
/// rendering.
const MESSAGES_AT_ONCE: usize = 2;

/// Consumes the renderer queue until `shutdown`.
pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    amqp::consume_concurrently(
        &ctx.amqp,
        &ctx.publisher,
        WorkQueue::Renderer,
        ctx.config.amqp.prefetch,
        MESSAGES_AT_ONCE,
        shutdown,
        |delivery| handle(&ctx, delivery),
    )
    .await
}

async fn handle(ctx: &Context, delivery: Delivery) -> (Delivery, Outcome) {
    let ids = match WorkMessage::decode(&delivery.data) {
        Ok(WorkMessage::DeliveriesDueV1 { delivery_ids }) => delivery_ids,
        Ok(other) => {
            let reason = format!("the renderer takes deliveries.due.v1, not {}", other.kind());
            return (delivery, Outcome::DeadLetter(reason));
        }
        Err(e) => {
            return (
                delivery,
                Outcome::DeadLetter(format!("not a deliveries.due.v1 message: {e}")),
            )
        }
    };
    let outcome = match render_batch(ctx, &ids).await {
        Ok(_) => Outcome::Ack,
        Err(e) => Outcome::Retry(e),
    };
    (delivery, outcome)
}

/// One delivery as loaded for rendering.
struct Loaded {
    id: i64,
    state: String,
    enrollment_status: String,
    enrollment_reason: Option<String>,
    template: Option<String>,
    /// Set when the lead unsubscribed, bounced or complained: never mailed again.
    suppressed_reason: Option<String>,
    campaign_language: String,
    facts: DeliveryFacts,
    lead_id: i64,
    campaign_id: i64,
    variant: String,
    /// `generated` or `pool` when the step gives the lead a discount code.
    code_source: Option<String>,
}

impl Loaded {
    /// Whether the delivery is going to be rendered (not cancelled first): only then does it get a code.
    fn renders(&self) -> bool {
        self.enrollment_status == "active" && self.suppressed_reason.as_deref().is_none_or(|r| r.trim().is_empty())
    }

    /// The code request of a step that gives codes.
    fn code_request(&self) -> Option<codes::Request<'_>> {
        let source = codes::Source::parse(self.code_source.as_deref()?)?;
        self.renders().then_some(codes::Request {
            delivery_id: self.id,
            lead_id: self.lead_id,
            campaign_id: self.campaign_id,
            variant: &self.variant,
            step: self.facts.step,
            source,
        })
    }

    /// Why the delivery fails when its step's pool has run dry.
    fn pool_empty_reason(&self) -> String {
        let variant = if self.variant == "A" {
            String::new()
        } else {
            format!(" variant {}", self.variant)
        };
        format!(
            "no discount code left in the pool for {}{variant} step {}",
            self.facts.campaign_name, self.facts.step
        )
    }
}

/// What rendering decided for one queued delivery.
enum Decision {
    Rendered {
        to_address: String,
        to_name: Option<String>,
        parts: RenderedParts,
    },
    Failed(String),
    Cancelled(String),
}

/// Renders the queued deliveries among `ids`, records the results in one transaction and announces the rendered
/// ones to the sender. A database or broker failure is the error (the message is tried again); a template
/// problem fails only its delivery.
pub async fn render_batch(ctx: &Context, ids: &[i64]) -> anyhow::Result<RenderReport> {
    let mut report = RenderReport::default();
    if ids.is_empty() {
        return Ok(report);
    }
    let mut client = ctx.pool.get().await.context("failed to get a database connection")?;
    let tx = client.transaction().await.context("failed to begin a transaction")?;
    let mut loaded = load(&tx, ids).await?;
    for delivery in &mut loaded {
        delivery.facts.unsubscribe_url = Some(crate::render::unsubscribe_url(&ctx.config.mail, delivery.id));
    }

    let mut queued = Vec::new();
    let found: BTreeSet<i64> = loaded.iter().map(|l| l.id).collect();
    report
        .skipped
        .extend(ids.iter().copied().filter(|id| !found.contains(id)));
    for delivery in loaded {
        match delivery.state.as_str() {
            "queued" => queued.push(delivery),
            "rendered" => {
                report.skipped.push(delivery.id);
                report.reannounced.push(delivery.id);
            }
            _ => report.skipped.push(delivery.id),
        }
    }

    let names: Vec<String> = queued
        .iter()
        .filter(|d| d.enrollment_status == "active")
        .filter_map(|d| d.template.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let templates = load_templates(&tx, &names).await?;

    // Discount codes are assigned in this transaction: a code is only ever given with its rendered email.
    let mut assigned_codes: HashMap<i64, codes::Assigned> = HashMap::new();
    for delivery in &queued {
        if let Some(request) = delivery.code_request() {
            let assigned = codes::assign(&tx, &request)
                .await
                .with_context(|| format!("failed to assign a discount code to delivery {}", delivery.id))?;
            assigned_codes.insert(delivery.id, assigned);
        }
    }

    let mut decisions: Vec<(i64, Decision)> = Vec::with_capacity(queued.len());
    for delivery in &queued {
        let decision = match assigned_codes.get(&delivery.id) {
            Some(codes::Assigned::PoolEmpty) => {
                ::metrics::counter!(
                    "leadflow_renderer_codes_exhausted_total",
                    "campaign" => delivery.facts.campaign_name.clone()
                )
                .increment(1);
                Decision::Failed(delivery.pool_empty_reason())
            }
            Some(codes::Assigned::Code(code)) => decide(delivery, &templates, Some(code)),
            None => decide(delivery, &templates, None),
        };
        decisions.push((delivery.id, decision));
    }

    let mut rendered_ids = Vec::new();
    let (mut to_addresses, mut to_names, mut subjects, mut texts, mut htmls) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut failed_ids, mut failed_reasons) = (Vec::new(), Vec::new());
    let (mut cancelled_ids, mut cancelled_reasons) = (Vec::new(), Vec::new());
    for (id, decision) in &decisions {
        match decision {
            Decision::Rendered {
                to_address,
                to_name,
                parts,
            } => {
                rendered_ids.push(*id);
                to_addresses.push(to_address.as_str());
                to_names.push(to_name.as_deref());
                subjects.push(parts.subject.as_str());
                texts.push(parts.body_text.as_str());
                htmls.push(parts.body_html.as_str());
            }
            Decision::Failed(reason) => {
                failed_ids.push(*id);
                failed_reasons.push(reason.as_str());
            }
            Decision::Cancelled(reason) => {
                cancelled_ids.push(*id);
                cancelled_reasons.push(reason.as_str());
            }
        }
    }

    if !rendered_ids.is_empty() {
        // Rows are locked first (in id order), so a concurrent renderer of the same ids waits and then skips them.
        let marked: BTreeSet<i64> = tx
            .query(
                // Found by id alone, then filtered: `state = 'queued'` next to the ids would let the planner
                // combine the primary key with the partial index of deliveries in flight, reading all of them
                // for every batch whenever the table's statistics lag behind the backlog.
                &tx.prepare_cached(
                    "WITH locked AS MATERIALIZED (SELECT id, state FROM deliveries WHERE id = ANY($1)
                                              ORDER BY id FOR UPDATE)
                 UPDATE deliveries d SET state = 'rendered', updated_at = now() FROM locked
                  WHERE d.id = locked.id AND locked.state = 'queued'
                 RETURNING d.id",
                )
                .await?,
                &[&rendered_ids],
            )
            .await
            .context("failed to mark deliveries rendered")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO rendered_messages (delivery_id, to_address, to_name, subject, body_text, body_html)
             SELECT m.* FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                    AS m(delivery_id, to_address, to_name, subject, body_text, body_html)
              WHERE m.delivery_id = ANY($7)
             ON CONFLICT (delivery_id) DO UPDATE
                SET to_address = EXCLUDED.to_address,
                    to_name = EXCLUDED.to_name,
                    subject = EXCLUDED.subject,
                    body_text = EXCLUDED.body_text,
                    body_html = EXCLUDED.body_html,
                    rendered_at = now()",
            )
            .await?,
            &[
                &rendered_ids,
                &to_addresses,
                &to_names,
                &subjects,
                &texts,
                &htmls,
                &marked.iter().copied().collect::<Vec<i64>>(),
            ],
        )
        .await
        .context("failed to store rendered messages")?;
        for id in &rendered_ids {
            if marked.contains(id) {
                report.rendered.push(*id);
            } else {
                report.skipped.push(*id);
            }
        }
    }
    if !failed_ids.is_empty() {
        let marked = close(&tx, "failed", &failed_ids, &failed_reasons).await?;
        let marked_ids: Vec<i64> = marked.iter().copied().collect();
        codes::release(&tx, &marked_ids).await?;
        for (id, reason) in failed_ids.iter().zip(&failed_reasons) {
            if marked.contains(id) {
                metrics::render_failed(*id, reason);
                report.failed.push((*id, reason.to_string()));
            } else {
                report.skipped.push(*id);
            }
        }
    }
    if !cancelled_ids.is_empty() {
        let marked = close(&tx, "cancelled", &cancelled_ids, &cancelled_reasons).await?;
        for (id, reason) in cancelled_ids.iter().zip(&cancelled_reasons) {
            if marked.contains(id) {
                metrics::cancelled(*id, reason);
                report.cancelled.push((*id, reason.to_string()));
            } else {
                report.skipped.push(*id);
            }
        }
    }
    tx.commit().await.context("failed to commit rendered deliveries")?;
    drop(client);

    metrics::deliveries(DeliveryOutcome::Rendered, report.rendered.len());
    metrics::deliveries(DeliveryOutcome::Failed, report.failed.len());
    metrics::deliveries(DeliveryOutcome::Cancelled, report.cancelled.len());
    metrics::deliveries(DeliveryOutcome::Skipped, report.skipped.len());

    let announce: Vec<i64> = report.rendered.iter().chain(&report.reannounced).copied().collect();
    if !announce.is_empty() {
        ctx.publisher
            .publish(&WorkMessage::EmailReadyV1 { delivery_ids: announce })
            .await
            .context("failed to hand rendered deliveries to the sender")?;
    }
    tracing::debug!(
        rendered = report.rendered.len(),
        failed = report.failed.len(),
        cancelled = report.cancelled.len(),
        skipped = report.skipped.len(),
        "rendered a batch"
    );
    Ok(report)
}

/// Ends queued deliveries in a terminal `state` with a reason each; returns the ids that were still queued.
async fn close(
    tx: &deadpool_postgres::Transaction<'_>,
    state: &str,
    ids: &[i64],
    reasons: &[&str],
) -> anyhow::Result<BTreeSet<i64>> {
    let rows = tx
        .query(
            "UPDATE deliveries AS d SET state = $1, reason = c.reason, updated_at = now()
               FROM unnest($2::bigint[], $3::text[]) AS c(id, reason)
              WHERE d.id = c.id AND d.state = 'queued'
             RETURNING d.id",
            &[&state, &ids, &reasons],
        )
        .await
        .with_context(|| format!("failed to mark deliveries {state}"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

fn decide(delivery: &Loaded, templates: &HashMap<String, Vec<StoredTemplate>>, code: Option<&str>) -> Decision {
    if let Some(reason) = delivery.suppressed_reason.as_deref().filter(|r| !r.trim().is_empty()) {
        return Decision::Cancelled(reason.to_string());
    }
    if delivery.enrollment_status != "active" {
        let reason = delivery
            .enrollment_reason
            .clone()
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| format!("enrollment {}", delivery.enrollment_status));
        return Decision::Cancelled(reason);
    }
    let started = Instant::now();
    let result = render_one(delivery, templates, code);
    metrics::message_rendered(started.elapsed());
    match result {
        Ok(parts) => Decision::Rendered {
            to_address: delivery.facts.lead.email.clone(),
            to_name: delivery.facts.lead.display_name(),
            parts,
        },
        Err(e) => {
            tracing::debug!(
                delivery.id = delivery.id,
                lead.email = %mask_email(&delivery.facts.lead.email),
                error = %e,
                "render error"
            );
            Decision::Failed(e.reason())
        }
    }
}

fn render_one(
    delivery: &Loaded,
    templates: &HashMap<String, Vec<StoredTemplate>>,
    code: Option<&str>,
) -> Result<RenderedParts, RenderError> {
    let name = delivery.template.as_deref().ok_or(RenderError::NoStep {
        step: delivery.facts.step,
    })?;
    let candidates = language_candidates(delivery.facts.lead.language.as_deref(), &delivery.campaign_language);
    let versions = templates.get(name).map(Vec::as_slice).unwrap_or_default();
    let language = choose_language(name, &candidates, versions.iter().map(|t| t.language.as_str()))?;
    let stored = versions
        .iter()
        .find(|t| t.language == language)
        .ok_or_else(|| RenderError::NoLanguage {
            template: name.to_string(),
            tried: candidates.clone(),
        })?;
    let compiled = TemplateCache::global().get_or_compile(stored)?;
    let mut facts = delivery.facts.clone();
    facts.discount_code = code.map(str::to_string);
    compiled.render(&template_context(&facts))
}

/// Loads and locks the deliveries. The lock matters: the scheduler publishes before it commits, so a delivery may
/// still be changing to `queued`; `FOR UPDATE` waits for that commit and reads the row as it then is.
async fn load(client: &impl GenericClient, ids: &[i64]) -> anyhow::Result<Vec<Loaded>> {
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "SELECT d.id, d.state, d.step,
                    l.email, l.first_name, l.last_name, l.country, l.language, l.attributes,
                    e.status, e.reason, e.product,
                    c.name, c.language,
                    (SELECT count(*) FROM deliveries n WHERE n.enrollment_id = d.enrollment_id) AS steps,
                    s.discount_percent, s.template, l.suppressed_reason,
                    d.lead_id, d.campaign_id, d.variant, s.code_source, c.override_coupons
               FROM deliveries d
               JOIN leads l ON l.id = d.lead_id
               JOIN enrollments e ON e.id = d.enrollment_id
               JOIN campaigns c ON c.id = d.campaign_id
               LEFT JOIN campaign_steps s ON s.campaign_id = d.campaign_id AND s.variant = d.variant AND s.step = d.step
              WHERE d.id = ANY($1)
              ORDER BY d.id
                FOR UPDATE OF d",
                )
                .await?,
            &[&ids],
        )
        .await
        .context("failed to load deliveries")?;
    rows.iter()
        .map(|row| {
            Ok(Loaded {
                id: row.try_get("id")?,
                state: row.try_get("state")?,
                enrollment_status: row.try_get(9)?,
                enrollment_reason: row.try_get(10)?,
                template: row.try_get("template")?,
                suppressed_reason: row.try_get("suppressed_reason")?,
                campaign_language: row.try_get(13)?,
                lead_id: row.try_get("lead_id")?,
                campaign_id: row.try_get("campaign_id")?,
                variant: row.try_get("variant")?,
                code_source: row.try_get("code_source")?,
                facts: DeliveryFacts {
                    lead: LeadFields {
                        email: row.try_get("email")?,
                        first_name: row.try_get("first_name")?,
                        last_name: row.try_get("last_name")?,
                        country: row.try_get("country")?,
                        language: row.try_get(7)?,
                        attributes: row.try_get::<_, Option<Value>>("attributes")?.unwrap_or(Value::Null),
                    },
                    product: row.try_get(11)?,
                    discount_percent: row.try_get::<_, Option<i16>>("discount_percent")?.unwrap_or(0),
                    step: row.try_get("step")?,
                    steps: row.try_get("steps")?,
                    campaign_name: row.try_get(12)?,
                    discount_code: None,
                    override_coupons: row.try_get("override_coupons")?,
                    unsubscribe_url: None,
                },
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .context("failed to read a delivery row")
}

/// Every language version of the named templates, by name.
async fn load_templates(
    client: &impl GenericClient,
    names: &[String],
) -> anyhow::Result<HashMap<String, Vec<StoredTemplate>>> {
    let mut out: HashMap<String, Vec<StoredTemplate>> = HashMap::new();
    if names.is_empty() {
        return Ok(out);
    }
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "SELECT name, language, version, subject, body_text, body_html
               FROM templates WHERE name = ANY($1)",
                )
                .await?,
            &[&names],
        )
        .await
        .context("failed to load templates")?;
    for row in rows {
        let stored = StoredTemplate {
            name: row.try_get(0)?,
            language: row.try_get(1)?,
            version: row.try_get(2)?,
            subject: row.try_get(3)?,
            body_text: row.try_get(4)?,
            body_html: row.try_get(5)?,
        };
        out.entry(stored.name.clone()).or_default().push(stored);
    }
    Ok(out)
}
