//! Campaigns: the declarative YAML/JSON format, its validation, and applying it to PostgreSQL.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};

use leadflow_shared::domain::{format_delay, parse_delay, LeadSource};

/// The most follow-up steps a campaign may have.
pub const MAX_STEPS: usize = 3;

/// A campaign as written in a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSpec {
    pub name: String,
    #[serde(default = "default_status")]
    pub status: String,
    /// `checkout.abandoned`, `order.unfinished`, `trial.started`, `renewal.due`, or `all`.
    pub lead_source: String,
    /// Template language used when the lead has none (or none of the lead's languages exists).
    #[serde(default = "default_language")]
    pub language: String,
    pub steps: Vec<StepSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Step 1: after enrollment; later steps: after the previous step's due time.
    pub delay: String,
    /// Percent off, 0 to 100.
    #[serde(default)]
    pub discount: u8,
    pub template: String,
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
    pub active: bool,
    /// `None`: every lead source.
    pub lead_source: Option<LeadSource>,
    pub language: String,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub delay: Duration,
    pub discount: u8,
    pub template: String,
}

impl CampaignSpec {
    /// Checks every rule; the error names the campaign and the field.
    pub fn validate(&self) -> anyhow::Result<Campaign> {
        let name = self.name.trim();
        let ctx = |field: &str| format!("campaign {name:?}: {field}");
        if name.is_empty() || name.len() > 100 {
            anyhow::bail!("campaign name must be 1 to 100 characters");
        }
        let active = match self.status.as_str() {
            "active" => true,
            "inactive" => false,
            other => anyhow::bail!("{}: expected active or inactive, got {other:?}", ctx("status")),
        };
        let lead_source = match self.lead_source.as_str() {
            "all" => None,
            other => Some(LeadSource::parse(other).with_context(|| ctx("lead_source"))?),
        };
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            anyhow::bail!("{}: a campaign has 1 to {MAX_STEPS} steps, this one has {}", ctx("steps"), self.steps.len());
        }
        let mut steps = Vec::new();
        for (i, s) in self.steps.iter().enumerate() {
            let at = |f: &str| ctx(&format!("steps[{i}].{f}"));
            let delay = parse_delay(&s.delay).with_context(|| at("delay"))?;
            if s.discount > 100 {
                anyhow::bail!("{}: must be 0 to 100", at("discount"));
            }
            let template = s.template.trim();
            if template.is_empty()
                || !template
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                anyhow::bail!("{}: use lower-case letters, digits, '-' and '_'", at("template"));
            }
            steps.push(Step {
                delay,
                discount: s.discount,
                template: template.to_string(),
            });
        }
        Ok(Campaign {
            name: name.to_string(),
            active,
            lead_source,
            language: self.language.trim().to_ascii_lowercase(),
            steps,
        })
    }
}

/// A file holds one campaign, or several under `campaigns:`.
#[derive(Deserialize)]
#[serde(untagged)]
enum CampaignFile {
    Many { campaigns: Vec<CampaignSpec> },
    One(CampaignSpec),
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
        CampaignFile::One(spec) => vec![spec],
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

/// Creates or updates a campaign by name. Steps already scheduled for enrolled leads keep their times.
pub async fn apply(client: &impl GenericClient, campaign: &Campaign) -> anyhow::Result<Applied> {
    let status = if campaign.active { "active" } else { "inactive" };
    let source = campaign.lead_source.map(LeadSource::as_str);
    let existing = client
        .query_opt(
            "SELECT id, status, lead_source, language FROM campaigns WHERE name = $1 FOR UPDATE",
            &[&campaign.name],
        )
        .await?;
    let (id, mut applied) = match existing {
        None => {
            let row = client
                .query_one(
                    "INSERT INTO campaigns (name, status, lead_source, language) VALUES ($1, $2, $3, $4) RETURNING id",
                    &[&campaign.name, &status, &source, &campaign.language],
                )
                .await?;
            (row.get::<_, i64>(0), Applied::Created)
        }
        Some(row) => {
            let id: i64 = row.get(0);
            let same = row.get::<_, String>(1) == status
                && row.get::<_, Option<String>>(2).as_deref() == source
                && row.get::<_, String>(3) == campaign.language;
            if !same {
                client
                    .execute(
                        "UPDATE campaigns SET status = $2, lead_source = $3, language = $4, updated_at = now()
                         WHERE id = $1",
                        &[&id, &status, &source, &campaign.language],
                    )
                    .await?;
            }
            (id, if same { Applied::Unchanged } else { Applied::Updated })
        }
    };
    let current: Vec<(i16, i64, i16, String)> = client
        .query(
            "SELECT step, delay_seconds, discount_percent, template FROM campaign_steps WHERE campaign_id = $1 ORDER BY step",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let wanted: Vec<(i16, i64, i16, String)> = campaign
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (i as i16 + 1, s.delay.as_secs() as i64, s.discount as i16, s.template.clone()))
        .collect();
    if current != wanted {
        client
            .execute("DELETE FROM campaign_steps WHERE campaign_id = $1", &[&id])
            .await?;
        for (step, delay, discount, template) in &wanted {
            client
                .execute(
                    "INSERT INTO campaign_steps (campaign_id, step, delay_seconds, discount_percent, template)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&id, step, delay, discount, template],
                )
                .await?;
        }
        if applied == Applied::Unchanged {
            applied = Applied::Updated;
        }
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
                    coalesce(array_agg(s.delay_seconds || ':' || s.discount_percent || ':' || s.template ORDER BY s.step)
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
                        format!(
                            "{} {template} {discount}%",
                            format_delay(Duration::from_secs(delay))
                        )
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
    let id: i64 = row.get(0);
    let cancelled = client
        .execute(
            "UPDATE deliveries SET state = 'cancelled', reason = 'campaign stopped', updated_at = now()
             WHERE campaign_id = $1 AND state IN ('pending', 'queued', 'rendered', 'retrying')",
            &[&id],
        )
        .await?;
    client
        .execute(
            "UPDATE enrollments SET status = 'cancelled', reason = 'campaign stopped', ended_at = now()
             WHERE campaign_id = $1 AND status = 'active'",
            &[&id],
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
        assert_eq!(c.steps[1].delay, Duration::from_secs(86_400));
        assert_eq!(c.steps[1].discount, 10);
        assert_eq!(c.language, "en");
    }

    #[test]
    fn several_campaigns_per_file() {
        let text = format!(
            "campaigns:\n  - name: a\n    lead_source: all\n    steps: [{{delay: 1s, template: t}}]\n  - name: b\n    lead_source: trial.started\n    status: inactive\n    steps: [{{delay: 2m, template: t}}]\n"
        );
        let all = parse(&text).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].lead_source, None);
        assert!(!all[1].active);
    }

    #[test]
    fn rules_are_enforced_with_the_field_named() {
        let four = GOOD.to_string()
            + "  - { delay: 1d, template: a }\n  - { delay: 1d, template: b }\n";
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
}
