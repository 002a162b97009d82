//! `leadflow apply -f`: campaigns (YAML), scoring rules (a YAML file with a top-level `scoring_rules:` list) and
//! template folders from files, validated as a whole and applied in one transaction, so a mistake anywhere leaves
//! the database as it was. Attribute scoring rules created or changed are then recomputed for every lead.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use deadpool_postgres::Pool;

use leadflow_renderer::templates::{self, TemplateSpec};
use leadflow_scheduler::campaigns::{self, Applied, Campaign};
use leadflow_scheduler::scoring::{self, RuleSpec, Saved};

/// What an apply did, for printing.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub campaigns: Vec<(String, Applied)>,
    pub templates: Vec<String>,
    pub scoring_rules: Vec<(String, Saved)>,
    /// Attribute rules changed: every lead was recomputed.
    pub recomputed: Option<scoring::Recomputed>,
}

impl std::fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for t in &self.templates {
            writeln!(f, "template {t}")?;
        }
        for (name, applied) in &self.campaigns {
            let what = match applied {
                Applied::Created => "created",
                Applied::Updated => "updated",
                Applied::Unchanged => "unchanged",
            };
            writeln!(f, "campaign {name} {what}")?;
        }
        for (name, saved) in &self.scoring_rules {
            writeln!(f, "scoring rule {name} {}", saved.as_str())?;
        }
        if let Some(done) = &self.recomputed {
            writeln!(
                f,
                "attribute rules recomputed: {} leads, {} changed",
                done.leads, done.changed
            )?;
        }
        Ok(())
    }
}

/// Applies every campaign file (`*.yaml`, `*.yml`; a `.json` file when named directly) and every template folder
/// found under `path`.
pub async fn apply_path(pool: &Pool, path: &Path) -> anyhow::Result<ApplyReport> {
    let (campaigns, templates, rules) = read(path)?;
    if campaigns.is_empty() && templates.is_empty() && rules.is_empty() {
        anyhow::bail!(
            "{}: no campaign files (*.yaml), scoring rules (scoring_rules:) or template folders (subject.hbs) found",
            path.display()
        );
    }
    let mut client = pool.get().await.context("failed to connect to PostgreSQL")?;
    let tx = client.transaction().await?;
    let applied_templates = templates::apply(&tx, &templates).await?;
    for campaign in &campaigns {
        check_templates_exist(&tx, campaign).await?;
    }
    let mut report = ApplyReport {
        templates: applied_templates
            .iter()
            .map(|t| {
                format!(
                    "{}/{} {} (version {})",
                    t.name,
                    t.language,
                    t.change.as_str(),
                    t.version
                )
            })
            .collect(),
        ..Default::default()
    };
    for campaign in &campaigns {
        let applied = campaigns::apply(&tx, campaign)
            .await
            .with_context(|| format!("failed to apply campaign {:?}", campaign.name))?;
        report.campaigns.push((campaign.name.clone(), applied));
    }
    let mut attribute_rules_changed = false;
    for rule in &rules {
        scoring::check_field_exists(&tx, rule)
            .await?
            .with_context(|| format!("scoring rule {:?}", rule.name))?;
        let saved = scoring::upsert_rule(&tx, rule).await?;
        attribute_rules_changed |= saved != Saved::Unchanged && rule.condition.is_some();
        report.scoring_rules.push((rule.name.clone(), saved));
    }
    tx.commit().await?;
    if attribute_rules_changed {
        report.recomputed = Some(scoring::recompute_all(pool, "leadflow apply").await?);
    }
    Ok(report)
}

type Files = (Vec<Campaign>, Vec<TemplateSpec>, Vec<RuleSpec>);

fn read(path: &Path) -> anyhow::Result<Files> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        return Ok(match read_scoring_rules(path)? {
            Some(rules) => (Vec::new(), Vec::new(), rules),
            None => (campaigns::read_file(path)?, Vec::new(), Vec::new()),
        });
    }
    let mut files = Vec::new();
    collect_yaml(path, &mut files)?;
    files.sort();
    let mut campaigns = Vec::new();
    let mut rules = Vec::new();
    for file in files {
        match read_scoring_rules(&file)? {
            Some(found) => rules.extend(found),
            None => campaigns.extend(campaigns::read_file(&file)?),
        }
    }
    let mut rule_names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    rule_names.sort_unstable();
    if let Some(w) = rule_names.windows(2).find(|w| w[0] == w[1]) {
        anyhow::bail!("scoring rule {:?} is defined twice under {}", w[0], path.display());
    }
    let mut names: Vec<&str> = campaigns.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        anyhow::bail!("campaign {:?} is defined twice under {}", w[0], path.display());
    }
    Ok((campaigns, templates::find_templates(path)?, rules))
}

/// The scoring rules of a file whose top level is `scoring_rules: [...]`, validated; `None` for any other file.
fn read_scoring_rules(path: &Path) -> anyhow::Result<Option<Vec<RuleSpec>>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ScoringFile {
        scoring_rules: Vec<RuleSpec>,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    let value: serde_yaml_ng::Value = match serde_yaml_ng::from_str(&text) {
        Ok(value) => value,
        Err(_) => return Ok(None), // not YAML at all: the campaign reader reports it
    };
    if value.get("scoring_rules").is_none() {
        return Ok(None);
    }
    let file: ScoringFile = serde_yaml_ng::from_value(value)
        .map_err(|e| anyhow::anyhow!("not valid scoring rules: {e}"))
        .with_context(|| format!("in {}", path.display()))?;
    for (i, rule) in file.scoring_rules.iter().enumerate() {
        rule.validate()
            .with_context(|| format!("in {}: scoring_rules[{i}] ({:?})", path.display(), rule.name))?;
    }
    Ok(Some(file.scoring_rules))
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
    Ok(())
}

async fn check_templates_exist(tx: &impl deadpool_postgres::GenericClient, campaign: &Campaign) -> anyhow::Result<()> {
    for (i, step) in campaign.variants.iter().flat_map(|v| v.steps.iter().enumerate()) {
        let exists = tx
            .query_opt("SELECT 1 FROM templates WHERE name = $1 LIMIT 1", &[&step.template])
            .await?
            .is_some();
        if !exists {
            anyhow::bail!(
                "campaign {:?} step {} uses template {:?}, which exists neither in the database nor in what is applied",
                campaign.name,
                i + 1,
                step.template
            );
        }
    }
    Ok(())
}
