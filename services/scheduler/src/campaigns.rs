//! Campaigns: the declarative YAML/JSON format, its validation, and applying it to PostgreSQL.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};

use leadflow_shared::domain::{format_delay, parse_delay, EmailAddress, LeadSource};

/// The most follow-up steps a campaign may have.
pub const MAX_STEPS: usize = 3;

/// A campaign as written in a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_status")]
    pub status: String,
    /// `checkout.abandoned`, `order.unfinished`, `trial.started`, `renewal.due`, or `all`.
    pub lead_source: String,
    /// Template language used when the lead has none (or none of the lead's languages exists).
    #[serde(default = "default_language")]
    pub language: String,
    /// Product SKUs the event's product must be one of; empty: every product.
    #[serde(default)]
    pub products: Vec<String>,
    /// Lead languages (primary subtag, `de` matches `de-AT`); empty: every language.
    #[serde(default)]
    pub languages: Vec<String>,
    /// Lead countries (ISO 3166-1 alpha-2); empty: every country.
    #[serde(default)]
    pub countries: Vec<String>,
    /// Instant lead notification: a signed JSON POST per enrollment, email sent, bounce, conversion, unsubscribe.
    #[serde(default)]
    pub notify_url: Option<String>,
    /// A copy of every follow-up goes to this address.
    #[serde(default)]
    pub bcc: Option<String>,
    /// The lead discount replaces coupon discounts the lead had before.
    #[serde(default)]
    pub override_coupons: bool,
    /// Steps without a template use the built-in default template of the lead source.
    #[serde(default)]
    pub use_default_template: bool,
    /// The follow-ups (1 to 3) of a campaign without an A/B test: variant "A".
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    /// Several follow-up blocks, each lead assigned one deterministically by weight (instead of `steps`).
    #[serde(default)]
    pub variants: Vec<VariantSpec>,
    /// Percent of enrolled leads (0 to 50) that receive nothing: the control group for incremental lift.
    #[serde(default)]
    pub holdout_percent: u8,
    /// When the A/B test ends and what happens then.
    #[serde(default)]
    pub ab_test: Option<AbTestSpec>,
    /// When follow-ups may go out, in the lead's time zone (the window's own zone when the lead has none).
    #[serde(default)]
    pub send_window: Option<SendWindow>,
    /// A static list or segment (by name): only its leads are enrolled. Left out: every lead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub steps: Vec<StepSpec>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbTestSpec {
    pub end: AbEnd,
    /// When the test ends, later enrollments get only the winning variant.
    #[serde(default)]
    pub keep_best: bool,
}

/// The end criterion of an A/B test: exactly one of these is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AbEnd {
    /// The first variant to reach this many conversions wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversions: Option<u32>,
    /// The first variant whose conversion rate (converted / targeted) reaches this (0 to 1) wins,
    /// counted once it has `min_leads` leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversion_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_leads: Option<u32>,
    /// The first variant whose attributed revenue in `currency` reaches this wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revenue: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// The test ends when this many unique leads were enrolled; the best conversion rate wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leads: Option<u32>,
    /// The test ends at this time (RFC 3339); the best conversion rate wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

/// Allowed sending hours: `start` to `end` (`HH:MM`, 24 h; `end` before `start` spans midnight) on `days`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendWindow {
    pub start: String,
    pub end: String,
    /// `mon` .. `sun`; empty: every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// IANA zone used when the lead has none; default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Step 1: after enrollment; later steps: after the previous step's due time.
    pub delay: String,
    /// Percent off, 0 to 100.
    #[serde(default)]
    pub discount: u8,
    /// May be left out when the campaign sets `use_default_template`.
    #[serde(default)]
    pub template: Option<String>,
    /// A per-lead discount code: `generated` at render time, or drawn from an uploaded `pool`.
    #[serde(default)]
    pub code: Option<String>,
}

fn default_status() -> String {
    "active".into()
}

fn default_language() -> String {
    "en".into()
}

/// A campaign that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Campaign {
    pub name: String,
    pub description: String,
    pub active: bool,
    /// `None`: every lead source.
    pub lead_source: Option<LeadSource>,
    pub language: String,
    pub products: Vec<String>,
    pub languages: Vec<String>,
    pub countries: Vec<String>,
    pub notify_url: Option<String>,
    pub bcc: Option<String>,
    pub override_coupons: bool,
    pub use_default_template: bool,
    pub variants: Vec<Variant>,
    pub holdout_percent: u8,
    pub ab_test: Option<AbTestSpec>,
    pub send_window: Option<SendWindow>,
    /// The name of the list or segment whose leads alone are enrolled.
    pub audience: Option<String>,
}

impl Campaign {
    /// The steps of the first variant (the only one when the campaign runs no test).
    pub fn steps(&self) -> &[Step] {
        self.variants.first().map(|v| v.steps.as_slice()).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    pub weight: u32,
    pub steps: Vec<Step>,
}

/// The built-in template a step uses when its campaign sets `use_default_template` and the step names none.
pub fn default_template(source: Option<LeadSource>) -> String {
    match source {
        Some(s) => format!("default-{}", s.as_str().replace('.', "-")),
        None => "default-follow-up".to_string(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub delay: Duration,
    pub discount: u8,
    pub template: String,
    /// `generated` or `pool`.
    pub code: Option<String>,
}

impl CampaignSpec {
    /// Checks every rule; the error (a [`CampaignError`]) names the campaign and the field.
    pub fn validate(&self) -> anyhow::Result<Campaign> {
        Ok(self.check()?)
    }

    /// Checks every rule; the error names the offending field as data (`steps[0].delay`), for the admin API.
    pub fn check(&self) -> Result<Campaign, CampaignError> {
        let name = self.name.trim();
        let fail = |field: &str, reason: String| CampaignError::new(name, field, reason);
        if name.is_empty() || name.len() > 100 {
            return Err(fail("name", "must be 1 to 100 characters".into()));
        }
        let active = match self.status.as_str() {
            "active" => true,
            "inactive" => false,
            other => return Err(fail("status", format!("expected active or inactive, got {other:?}"))),
        };
        let lead_source = match self.lead_source.as_str() {
            "all" => None,
            other => Some(LeadSource::parse(other).map_err(|e| fail("lead_source", e.to_string()))?),
        };
        let blocks: Vec<(String, u32, &[StepSpec], String)> = match (self.steps.is_empty(), self.variants.is_empty()) {
            (false, true) => vec![("A".to_string(), 1, &self.steps[..], "steps".to_string())],
            (true, false) => self
                .variants
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    (
                        v.name.trim().to_string(),
                        v.weight,
                        &v.steps[..],
                        format!("variants[{i}].steps"),
                    )
                })
                .collect(),
            (false, false) => return Err(fail("steps", "give either steps or variants, not both".into())),
            (true, true) => return Err(fail("steps", format!("a campaign needs 1 to {MAX_STEPS} steps"))),
        };
        let mut variants = Vec::new();
        for (vi, (vname, weight, specs, path)) in blocks.iter().enumerate() {
            if vname.is_empty()
                || vname.len() > 32
                || !vname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(fail(
                    &format!("variants[{vi}].name"),
                    "a variant name of 1 to 32 letters, digits, '-' or '_'".into(),
                ));
            }
            if variants.iter().any(|v: &Variant| v.name == *vname) {
                return Err(fail(
                    &format!("variants[{vi}].name"),
                    format!("variant {vname:?} is defined twice"),
                ));
            }
            if *weight == 0 || *weight > 10_000 {
                return Err(fail(&format!("variants[{vi}].weight"), "must be 1 to 10000".into()));
            }
            if specs.is_empty() || specs.len() > MAX_STEPS {
                return Err(fail(
                    path,
                    format!("a campaign has 1 to {MAX_STEPS} steps, this one has {}", specs.len()),
                ));
            }
            let mut steps = Vec::new();
            for (i, s) in specs.iter().enumerate() {
                let at = |f: &str| format!("{path}[{i}].{f}");
                let delay = parse_delay(&s.delay).map_err(|e| fail(&at("delay"), e.to_string()))?;
                if delay.subsec_nanos() != 0 {
                    return Err(fail(&at("delay"), "whole seconds at least (e.g. 30s, 2h)".into()));
                }
                if s.discount > 100 {
                    return Err(fail(&at("discount"), "must be 0 to 100".into()));
                }
                let template = match (&s.template, self.use_default_template) {
                    (Some(t), _) => t.trim().to_string(),
                    (None, true) => default_template(lead_source),
                    (None, false) => {
                        return Err(fail(
                            &at("template"),
                            "is required (or set use_default_template: true on the campaign)".into(),
                        ))
                    }
                };
                if template.is_empty()
                    || !template
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
                {
                    return Err(fail(
                        &at("template"),
                        "use lower-case letters, digits, '-' and '_'".into(),
                    ));
                }
                let code = match s.code.as_deref() {
                    None => None,
                    Some(c @ ("generated" | "pool")) => Some(c.to_string()),
                    Some(other) => return Err(fail(&at("code"), format!("expected generated or pool, got {other:?}"))),
                };
                steps.push(Step {
                    delay,
                    discount: s.discount,
                    template,
                    code,
                });
            }
            variants.push(Variant {
                name: vname.clone(),
                weight: *weight,
                steps,
            });
        }
        if self.holdout_percent > 50 {
            return Err(fail("holdout_percent", "must be 0 to 50".into()));
        }
        if let Some(test) = &self.ab_test {
            if variants.len() < 2 {
                return Err(fail("ab_test", "an A/B test needs at least two variants".into()));
            }
            validate_end(&test.end).map_err(|e| fail("ab_test.end", e))?;
        }
        if let Some(w) = &self.send_window {
            validate_window(w).map_err(|e| fail("send_window", e))?;
        }
        if self.description.chars().count() > 2000 {
            return Err(fail("description", "at most 2000 characters".into()));
        }
        let mut products = Vec::new();
        for (i, p) in self.products.iter().enumerate() {
            let p = p.trim();
            if p.is_empty() || p.len() > 256 {
                return Err(fail(&format!("products[{i}]"), "a SKU of 1 to 256 characters".into()));
            }
            products.push(p.to_string());
        }
        let mut languages = Vec::new();
        for (i, l) in self.languages.iter().enumerate() {
            let l = l.trim().to_ascii_lowercase();
            if !(2..=3).contains(&l.len()) || !l.chars().all(|c| c.is_ascii_lowercase()) {
                return Err(fail(
                    &format!("languages[{i}]"),
                    "a language code such as en or de".into(),
                ));
            }
            languages.push(l);
        }
        let mut countries = Vec::new();
        for (i, c) in self.countries.iter().enumerate() {
            let c = c.trim().to_ascii_uppercase();
            if c.len() != 2 || !c.chars().all(|c| c.is_ascii_uppercase()) {
                return Err(fail(
                    &format!("countries[{i}]"),
                    "an ISO 3166-1 alpha-2 code such as DE".into(),
                ));
            }
            countries.push(c);
        }
        let notify_url = match self.notify_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            None => None,
            Some(u) => {
                let parsed = url::Url::parse(u).map_err(|e| fail("notify_url", e.to_string()))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(fail("notify_url", "must be an http(s) URL".into()));
                }
                Some(u.to_string())
            }
        };
        let bcc = match self.bcc.as_deref().map(str::trim).filter(|b| !b.is_empty()) {
            None => None,
            Some(b) => Some(
                EmailAddress::parse(b)
                    .map_err(|e| fail("bcc", e.to_string()))?
                    .as_str()
                    .to_string(),
            ),
        };
        let audience = match self.audience.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
            None => None,
            Some(a) if a.chars().count() > 100 => {
                return Err(fail("audience", "a list name is 1 to 100 characters".into()))
            }
            Some(a) => Some(a.to_string()),
        };
        Ok(Campaign {
            name: name.to_string(),
            description: self.description.trim().to_string(),
            active,
            lead_source,
            language: self.language.trim().to_ascii_lowercase(),
            products,
            languages,
            countries,
            notify_url,
            bcc,
            override_coupons: self.override_coupons,
            use_default_template: self.use_default_template,
            variants,
            holdout_percent: self.holdout_percent,
            ab_test: self.ab_test.clone(),
            send_window: self.send_window.clone(),
            audience,
        })
    }
}

/// Why a campaign was refused: the field to blame, as a path into the spec (`variants[1].steps[0].template`), and
/// the reason. Displayed as `campaign "name": field: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignError {
    /// The campaign's name as given.
    pub campaign: String,
    pub field: String,
    pub reason: String,
}

impl CampaignError {
    pub fn new(campaign: &str, field: &str, reason: String) -> Self {
        Self {
            campaign: campaign.to_string(),
            field: field.to_string(),
            reason,
        }
    }
}

impl std::fmt::Display for CampaignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field == "name" {
            return write!(f, "campaign name {}", self.reason);
        }
        write!(f, "campaign {:?}: {}: {}", self.campaign, self.field, self.reason)
    }
}

impl std::error::Error for CampaignError {}

fn validate_end(end: &AbEnd) -> Result<(), String> {
    let set = [
        end.conversions.is_some(),
        end.conversion_rate.is_some(),
        end.revenue.is_some(),
        end.leads.is_some(),
        end.until.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        return Err("give exactly one of conversions, conversion_rate, revenue, leads, until".into());
    }
    if end.conversions == Some(0) || end.leads == Some(0) {
        return Err("a count must be at least 1".into());
    }
    if let Some(rate) = end.conversion_rate {
        if !(rate > 0.0 && rate <= 1.0) {
            return Err("conversion_rate is a fraction above 0 and at most 1 (0.05 = 5%)".into());
        }
    }
    if let Some(revenue) = end.revenue {
        if !(revenue > 0.0 && revenue.is_finite()) {
            return Err("revenue must be above 0".into());
        }
        match end.currency.as_deref() {
            Some(c) if c.len() == 3 && c.chars().all(|c| c.is_ascii_uppercase()) => {}
            _ => return Err("revenue needs its currency (ISO 4217, e.g. EUR)".into()),
        }
    }
    Ok(())
}

/// Parses `HH:MM` into minutes after midnight.
pub fn parse_clock(raw: &str) -> Result<u32, String> {
    let (h, m) = raw
        .trim()
        .split_once(':')
        .ok_or_else(|| format!("{raw:?} is not HH:MM"))?;
    let h: u32 = h.parse().map_err(|_| format!("{raw:?} is not HH:MM"))?;
    let m: u32 = m.parse().map_err(|_| format!("{raw:?} is not HH:MM"))?;
    if h > 24 || m > 59 || (h == 24 && m > 0) {
        return Err(format!("{raw:?} is not a time of day"));
    }
    Ok(h * 60 + m)
}

pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn validate_window(w: &SendWindow) -> Result<(), String> {
    let start = parse_clock(&w.start).map_err(|e| format!("start: {e}"))?;
    let end = parse_clock(&w.end).map_err(|e| format!("end: {e}"))?;
    if start == end {
        return Err("start and end are equal: the window would be empty".into());
    }
    for d in &w.days {
        if !WEEKDAYS.contains(&d.to_ascii_lowercase().as_str()) {
            return Err(format!("days: {d:?} is not one of mon, tue, wed, thu, fri, sat, sun"));
        }
    }
    if let Some(tz) = &w.timezone {
        if tz.parse::<chrono_tz::Tz>().is_err() {
            return Err(format!("timezone: {tz:?} is not an IANA time zone"));
        }
    }
    Ok(())
}

/// A file holds one campaign, or several under `campaigns:`.
#[derive(Deserialize)]
#[serde(untagged)]
enum CampaignFile {
    Many { campaigns: Vec<CampaignSpec> },
    One(Box<CampaignSpec>),
}

/// Reads and validates the campaigns of one YAML or JSON file.
pub fn read_file(path: &Path) -> anyhow::Result<Vec<Campaign>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

pub fn parse(text: &str) -> anyhow::Result<Vec<Campaign>> {
    let file: CampaignFile = serde_yaml_ng::from_str(text).map_err(|e| anyhow::anyhow!("not a valid campaign: {e}"))?;
    let specs = match file {
        CampaignFile::Many { campaigns } => campaigns,
        CampaignFile::One(spec) => vec![*spec],
    };
    specs.iter().map(CampaignSpec::validate).collect()
}

/// What applying a campaign did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
    Unchanged,
}

/// The id of the list a campaign's `audience` names (`None` without an audience); an unknown name is a
/// [`CampaignError`] naming `audience`.
pub async fn audience_list(
    client: &impl GenericClient,
    campaign: &Campaign,
) -> anyhow::Result<Result<Option<i64>, CampaignError>> {
    let Some(name) = &campaign.audience else {
        return Ok(Ok(None));
    };
    let row = client
        .query_opt("SELECT id FROM lead_lists WHERE name = $1", &[name])
        .await
        .context("failed to look up the campaign's audience")?;
    Ok(match row {
        Some(row) => Ok(Some(row.get(0))),
        None => Err(CampaignError::new(
            &campaign.name,
            "audience",
            format!("there is no list or segment named {name:?}: create it first (leadflow lists create)"),
        )),
    })
}

/// Creates or updates a campaign by name. Steps already scheduled for enrolled leads keep their times.
pub async fn apply(client: &impl GenericClient, campaign: &Campaign) -> anyhow::Result<Applied> {
    let status = if campaign.active { "active" } else { "inactive" };
    let source = campaign.lead_source.map(LeadSource::as_str);
    let c = campaign;
    let ab_end = c.ab_test.as_ref().map(|t| serde_json::to_value(&t.end)).transpose()?;
    let send_window = c.send_window.as_ref().map(serde_json::to_value).transpose()?;
    let audience_list = audience_list(client, c).await??;
    let row = client
        .query_one(
            "INSERT INTO campaigns (name, status, lead_source, language, description, products, languages, countries,
                                    notify_url, bcc, override_coupons, use_default_template,
                                    holdout_percent, ab_end, ab_keep_best, send_window, audience_list)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
             ON CONFLICT (name) DO UPDATE SET
                 status = EXCLUDED.status, lead_source = EXCLUDED.lead_source, language = EXCLUDED.language,
                 description = EXCLUDED.description, products = EXCLUDED.products, languages = EXCLUDED.languages,
                 countries = EXCLUDED.countries, notify_url = EXCLUDED.notify_url, bcc = EXCLUDED.bcc,
                 override_coupons = EXCLUDED.override_coupons, use_default_template = EXCLUDED.use_default_template,
                 holdout_percent = EXCLUDED.holdout_percent, ab_keep_best = EXCLUDED.ab_keep_best,
                 send_window = EXCLUDED.send_window, ab_end = EXCLUDED.ab_end,
                 audience_list = EXCLUDED.audience_list,
                 -- a new end criterion starts the test over
                 ab_winner = CASE WHEN campaigns.ab_end IS NOT DISTINCT FROM EXCLUDED.ab_end
                                  THEN campaigns.ab_winner END,
                 ab_ended_at = CASE WHEN campaigns.ab_end IS NOT DISTINCT FROM EXCLUDED.ab_end
                                    THEN campaigns.ab_ended_at END,
                 updated_at = CASE WHEN (campaigns.status, campaigns.lead_source, campaigns.language,
                                         campaigns.description, campaigns.products, campaigns.languages,
                                         campaigns.countries, campaigns.notify_url, campaigns.bcc,
                                         campaigns.override_coupons, campaigns.use_default_template,
                                         campaigns.holdout_percent, campaigns.ab_end, campaigns.ab_keep_best,
                                         campaigns.send_window, campaigns.audience_list)
                                        IS NOT DISTINCT FROM
                                        (EXCLUDED.status, EXCLUDED.lead_source, EXCLUDED.language,
                                         EXCLUDED.description, EXCLUDED.products, EXCLUDED.languages,
                                         EXCLUDED.countries, EXCLUDED.notify_url, EXCLUDED.bcc,
                                         EXCLUDED.override_coupons, EXCLUDED.use_default_template,
                                         EXCLUDED.holdout_percent, EXCLUDED.ab_end, EXCLUDED.ab_keep_best,
                                         EXCLUDED.send_window, EXCLUDED.audience_list)
                                   THEN campaigns.updated_at ELSE now() END
             RETURNING id, (xmax = 0) AS created, updated_at = now() AS changed",
            &[
                &c.name,
                &status,
                &source,
                &c.language,
                &c.description,
                &c.products,
                &c.languages,
                &c.countries,
                &c.notify_url,
                &c.bcc,
                &c.override_coupons,
                &c.use_default_template,
                &(c.holdout_percent as i16),
                &ab_end,
                &c.ab_test.as_ref().is_some_and(|t| t.keep_best),
                &send_window,
                &audience_list,
            ],
        )
        .await?;
    let id: i64 = row.get(0);
    let mut applied = if row.get::<_, bool>(1) {
        Applied::Created
    } else if row.get::<_, bool>(2) {
        Applied::Updated
    } else {
        Applied::Unchanged
    };
    type StepRow = (String, i16, i64, i16, String, Option<String>);
    let current: Vec<StepRow> = client
        .query(
            "SELECT variant, step, delay_seconds, discount_percent, template, code_source
             FROM campaign_steps WHERE campaign_id = $1 ORDER BY variant, step",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let mut wanted: Vec<StepRow> = Vec::new();
    for v in &campaign.variants {
        for (i, s) in v.steps.iter().enumerate() {
            wanted.push((
                v.name.clone(),
                i as i16 + 1,
                s.delay.as_secs() as i64,
                s.discount as i16,
                s.template.clone(),
                s.code.clone(),
            ));
        }
    }
    wanted.sort();
    let current_variants: Vec<(String, i32)> = client
        .query(
            "SELECT name, weight FROM campaign_variants WHERE campaign_id = $1 ORDER BY name",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut wanted_variants: Vec<(String, i32)> = campaign
        .variants
        .iter()
        .map(|v| (v.name.clone(), v.weight as i32))
        .collect();
    wanted_variants.sort();
    if current != wanted || current_variants != wanted_variants {
        client
            .execute("DELETE FROM campaign_steps WHERE campaign_id = $1", &[&id])
            .await?;
        client
            .execute("DELETE FROM campaign_variants WHERE campaign_id = $1", &[&id])
            .await?;
        for (name, weight) in &wanted_variants {
            client
                .execute(
                    "INSERT INTO campaign_variants (campaign_id, name, weight) VALUES ($1, $2, $3)",
                    &[&id, name, weight],
                )
                .await?;
        }
        for (variant, step, delay, discount, template, code) in &wanted {
            client
                .execute(
                    "INSERT INTO campaign_steps (campaign_id, variant, step, delay_seconds, discount_percent, template,
                                                 code_source)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[&id, variant, step, delay, discount, template, code],
                )
                .await?;
        }
        if applied == Applied::Unchanged {
            applied = Applied::Updated;
        }
    }
    if !campaign.active {
        // An inactive campaign sends nothing: its open sequences end, as `set_status` does.
        end_sequences_of(client, id).await?;
    }
    Ok(applied)
}

/// A campaign as stored, for listings.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignRow {
    pub id: i64,
    pub name: String,
    pub status: String,
    pub lead_source: String,
    pub steps: Vec<String>,
}

pub async fn list(client: &impl GenericClient) -> anyhow::Result<Vec<CampaignRow>> {
    let rows = client
        .query(
            "SELECT c.id, c.name, c.status, coalesce(c.lead_source, 'all'),
                    coalesce(array_agg(s.delay_seconds || ':' || s.discount_percent || ':' || s.variant || '/' || s.template
                                       ORDER BY s.variant, s.step)
                             FILTER (WHERE s.step IS NOT NULL), '{}')
             FROM campaigns c LEFT JOIN campaign_steps s ON s.campaign_id = c.id
             GROUP BY c.id ORDER BY c.name",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let steps: Vec<String> = r.get(4);
            CampaignRow {
                id: r.get(0),
                name: r.get(1),
                status: r.get(2),
                lead_source: r.get(3),
                steps: steps
                    .iter()
                    .map(|s| {
                        let mut parts = s.splitn(3, ':');
                        let delay = parts.next().and_then(|d| d.parse().ok()).unwrap_or(0);
                        let discount = parts.next().unwrap_or("0");
                        let template = parts.next().unwrap_or("");
                        format!("{} {template} {discount}%", format_delay(Duration::from_secs(delay)))
                    })
                    .collect(),
            }
        })
        .collect())
}

/// Activates or deactivates a campaign. Deactivating ends its sequences: open follow-ups are cancelled with
/// reason `campaign stopped`. Returns how many follow-ups were cancelled.
pub async fn set_status(client: &impl GenericClient, name: &str, active: bool) -> anyhow::Result<u64> {
    let status = if active { "active" } else { "inactive" };
    let row = client
        .query_opt(
            "UPDATE campaigns SET status = $2, updated_at = now() WHERE name = $1 RETURNING id",
            &[&name, &status],
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("no campaign named {name:?}"))?;
    if active {
        return Ok(0);
    }
    end_sequences_of(client, row.get(0)).await
}

/// Cancels the open follow-ups of a campaign (reason `campaign stopped`) and ends its enrollments.
async fn end_sequences_of(client: &impl GenericClient, campaign_id: i64) -> anyhow::Result<u64> {
    let cancelled = client
        .execute(
            "UPDATE deliveries SET state = 'cancelled', reason = 'campaign stopped', updated_at = now()
             WHERE campaign_id = $1 AND state IN ('pending', 'queued', 'rendered', 'retrying')",
            &[&campaign_id],
        )
        .await?;
    client
        .execute(
            "UPDATE enrollments SET status = 'cancelled', reason = 'campaign stopped', ended_at = now()
             WHERE campaign_id = $1 AND status = 'active'",
            &[&campaign_id],
        )
        .await?;
    Ok(cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
name: cart-recovery
lead_source: checkout.abandoned
steps:
  - { delay: 1h, template: cart-reminder }
  - { delay: 1d, discount: 10, template: cart-discount }
";

    #[test]
    fn a_campaign_file_parses() {
        let c = &parse(GOOD).unwrap()[0];
        assert!(c.active);
        assert_eq!(c.lead_source, Some(LeadSource::CheckoutAbandoned));
        assert_eq!(c.steps()[1].delay, Duration::from_secs(86_400));
        assert_eq!(c.steps()[1].discount, 10);
        assert_eq!(c.language, "en");
    }

    #[test]
    fn several_campaigns_per_file() {
        let text = "campaigns:\n  - name: a\n    lead_source: all\n    steps: [{delay: 1s, template: t}]\n  - name: b\n    lead_source: trial.started\n    status: inactive\n    steps: [{delay: 2m, template: t}]\n";
        let all = parse(text).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].lead_source, None);
        assert!(!all[1].active);
    }

    #[test]
    fn rules_are_enforced_with_the_field_named() {
        let four = GOOD.to_string() + "  - { delay: 1d, template: a }\n  - { delay: 1d, template: b }\n";
        assert!(format!("{:#}", parse(&four).unwrap_err()).contains("1 to 3 steps"));
        let bad_delay = GOOD.replace("1h", "1 hour");
        assert!(format!("{:#}", parse(&bad_delay).unwrap_err()).contains("steps[0].delay"));
        let bad_source = GOOD.replace("checkout.abandoned", "checkout");
        assert!(format!("{:#}", parse(&bad_source).unwrap_err()).contains("lead_source"));
        let bad_discount = GOOD.replace("discount: 10", "discount: 120");
        assert!(format!("{:#}", parse(&bad_discount).unwrap_err()).contains("discount"));
        let unknown = GOOD.to_string() + "colour: red\n";
        assert!(parse(&unknown).is_err());
    }

    const AB: &str = "
name: ab
lead_source: all
holdout_percent: 10
ab_test: { end: { conversions: 20 }, keep_best: true }
send_window: { start: '09:00', end: '20:00', days: [mon, tue], timezone: Europe/Berlin }
variants:
  - name: A
    weight: 2
    steps: [{ delay: 1h, template: a, code: generated }]
  - name: B
    steps: [{ delay: 2h, discount: 10, template: b, code: pool }]
";

    #[test]
    fn variants_tests_and_windows_parse() {
        let c = &parse(AB).unwrap()[0];
        assert_eq!(c.variants.len(), 2);
        assert_eq!(c.variants[0].weight, 2);
        assert_eq!(c.variants[1].weight, 1);
        assert_eq!(c.variants[1].steps[0].code.as_deref(), Some("pool"));
        assert_eq!(c.holdout_percent, 10);
        assert!(c.ab_test.as_ref().unwrap().keep_best);
        assert_eq!(c.send_window.as_ref().unwrap().days, vec!["mon", "tue"]);
    }

    #[test]
    fn bad_tests_and_windows_are_named() {
        let err = |text: String| format!("{:#}", parse(&text).unwrap_err());
        assert!(err(AB.replace("conversions: 20", "conversions: 20, leads: 5")).contains("ab_test.end"));
        assert!(err(AB.replace("{ conversions: 20 }", "{ revenue: 100 }")).contains("currency"));
        assert!(err(AB.replace("'20:00'", "'25:00'")).contains("send_window"));
        assert!(err(AB.replace("Europe/Berlin", "Mars/Olympus")).contains("timezone"));
        assert!(err(AB.replace("[mon, tue]", "[monday]")).contains("days"));
        assert!(err(AB.replace("holdout_percent: 10", "holdout_percent: 60")).contains("holdout_percent"));
        assert!(err(AB.replace("code: pool", "code: free")).contains("code"));
        assert!(err(AB.replace("name: B", "name: A")).contains("twice"));
        let one_variant = AB.replace(
            "  - name: B\n    steps: [{ delay: 2h, discount: 10, template: b, code: pool }]\n",
            "",
        );
        assert!(err(one_variant).contains("two variants"));
        let both = AB.to_string() + "steps: [{ delay: 1h, template: a }]\n";
        assert!(err(both).contains("not both"));
    }
}
