//! Built-in campaigns (inactive) and their templates in English and German, installed by `leadflow migrate`
//! when missing. Existing campaigns and templates of the same name are never overwritten.

use deadpool_postgres::Pool;

use leadflow_renderer::templates::{self, TemplateSpec};
use leadflow_scheduler::campaigns;

const CAMPAIGNS: &str = include_str!("../defaults/campaigns.yaml");

/// (name, language, subject, text body, HTML body)
const TEMPLATES: &[(&str, &str, &str, &str, &str)] = &[
    (
        "default-checkout-abandoned",
        "en",
        include_str!("../defaults/templates/default-checkout-abandoned/en/subject.hbs"),
        include_str!("../defaults/templates/default-checkout-abandoned/en/body.txt.hbs"),
        include_str!("../defaults/templates/default-checkout-abandoned/en/body.html.hbs"),
    ),
    (
        "default-checkout-abandoned",
        "de",
        include_str!("../defaults/templates/default-checkout-abandoned/de/subject.hbs"),
        include_str!("../defaults/templates/default-checkout-abandoned/de/body.txt.hbs"),
        include_str!("../defaults/templates/default-checkout-abandoned/de/body.html.hbs"),
    ),
    (
        "default-order-unfinished",
        "en",
        include_str!("../defaults/templates/default-order-unfinished/en/subject.hbs"),
        include_str!("../defaults/templates/default-order-unfinished/en/body.txt.hbs"),
        include_str!("../defaults/templates/default-order-unfinished/en/body.html.hbs"),
    ),
    (
        "default-order-unfinished",
        "de",
        include_str!("../defaults/templates/default-order-unfinished/de/subject.hbs"),
        include_str!("../defaults/templates/default-order-unfinished/de/body.txt.hbs"),
        include_str!("../defaults/templates/default-order-unfinished/de/body.html.hbs"),
    ),
    (
        "default-trial-started",
        "en",
        include_str!("../defaults/templates/default-trial-started/en/subject.hbs"),
        include_str!("../defaults/templates/default-trial-started/en/body.txt.hbs"),
        include_str!("../defaults/templates/default-trial-started/en/body.html.hbs"),
    ),
    (
        "default-trial-started",
        "de",
        include_str!("../defaults/templates/default-trial-started/de/subject.hbs"),
        include_str!("../defaults/templates/default-trial-started/de/body.txt.hbs"),
        include_str!("../defaults/templates/default-trial-started/de/body.html.hbs"),
    ),
];

/// What was installed: names of templates (`name/lang`) and campaigns that were missing.
#[derive(Debug, Default)]
pub struct Installed {
    pub templates: Vec<String>,
    pub campaigns: Vec<String>,
}

pub async fn install(pool: &Pool) -> anyhow::Result<Installed> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut installed = Installed::default();
    for (name, language, subject, body_text, body_html) in TEMPLATES {
        let exists = tx
            .query_opt(
                "SELECT 1 FROM templates WHERE name = $1 AND language = $2",
                &[name, language],
            )
            .await?
            .is_some();
        if exists {
            continue;
        }
        let spec = TemplateSpec {
            name: name.to_string(),
            language: language.to_string(),
            subject: subject.to_string(),
            body_text: body_text.to_string(),
            body_html: body_html.to_string(),
        };
        templates::apply(&tx, std::slice::from_ref(&spec)).await?;
        installed.templates.push(format!("{name}/{language}"));
    }
    for campaign in campaigns::parse(CAMPAIGNS)? {
        let exists = tx
            .query_opt("SELECT 1 FROM campaigns WHERE name = $1", &[&campaign.name])
            .await?
            .is_some();
        if !exists {
            campaigns::apply(&tx, &campaign).await?;
            installed.campaigns.push(campaign.name.clone());
        }
    }
    tx.commit().await?;
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_complete() {
        let all = campaigns::parse(CAMPAIGNS).unwrap();
        assert_eq!(all.len(), 3);
        for c in &all {
            assert!(!c.active, "{} must be installed inactive", c.name);
            for step in c.steps() {
                for lang in ["en", "de"] {
                    assert!(
                        TEMPLATES.iter().any(|t| t.0 == step.template && t.1 == lang),
                        "{} has no {lang} template {}",
                        c.name,
                        step.template
                    );
                }
            }
        }
    }
}
