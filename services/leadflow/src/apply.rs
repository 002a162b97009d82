//! `leadflow apply -f`: campaigns (YAML) and template folders from files, validated as a whole and applied in one
//! transaction, so a mistake anywhere leaves the database as it was.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use deadpool_postgres::Pool;

use leadflow_renderer::templates::{self, TemplateSpec};
use leadflow_scheduler::campaigns::{self, Applied, Campaign};

/// What an apply did, for printing.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub campaigns: Vec<(String, Applied)>,
    pub templates: Vec<String>,
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
        Ok(())
    }
}

/// Applies every campaign file (`*.yaml`, `*.yml`; a `.json` file when named directly) and every template folder
/// found under `path`.
pub async fn apply_path(pool: &Pool, path: &Path) -> anyhow::Result<ApplyReport> {
    let (campaigns, templates) = read(path)?;
    if campaigns.is_empty() && templates.is_empty() {
        anyhow::bail!(
            "{}: no campaign files (*.yaml) or template folders (subject.hbs) found",
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
    tx.commit().await?;
    Ok(report)
}

fn read(path: &Path) -> anyhow::Result<(Vec<Campaign>, Vec<TemplateSpec>)> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        return Ok((campaigns::read_file(path)?, Vec::new()));
    }
    let mut files = Vec::new();
    collect_yaml(path, &mut files)?;
    files.sort();
    let mut campaigns = Vec::new();
    for file in files {
        campaigns.extend(campaigns::read_file(&file)?);
    }
    let mut names: Vec<&str> = campaigns.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        anyhow::bail!("campaign {:?} is defined twice under {}", w[0], path.display());
    }
    Ok((campaigns, templates::find_templates(path)?))
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
