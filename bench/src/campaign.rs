//! The benchmark's campaign and template, written as files for `leadflow apply -f`.

use std::path::Path;

use anyhow::Context as _;

const CAMPAIGN: &str = "\
# Written by leadflow-bench: one follow-up as soon as a checkout is abandoned.
name: bench
description: Benchmark campaign, one follow-up due at once
status: active
lead_source: checkout.abandoned
language: en
steps:
  - { delay: 0s, discount: 0, template: bench }
";

/// A paragraph of product copy; the bodies repeat it so a rendered email is about 8 kB, like smtp-source's.
const COPY: &str = "Hand-raised from a single sheet of copper and lined with tin, the kettle heats evenly on gas, \
electric and induction hobs, whistles softly when the water boils and keeps its shine with a wipe of lemon and salt. \
Every kettle is tested for leaks before it leaves the workshop and comes with a ten-year guarantee.";

/// Writes `campaign.yaml` and `templates/bench/en/*.hbs` under `dir`.
pub fn write(dir: &Path) -> anyhow::Result<()> {
    let templates = dir.join("templates/bench/en");
    std::fs::create_dir_all(&templates).with_context(|| format!("cannot create {}", templates.display()))?;
    std::fs::write(dir.join("campaign.yaml"), CAMPAIGN)?;
    std::fs::write(
        templates.join("subject.hbs"),
        "{{lead.name}}, your {{product.name}} is still in your cart",
    )?;
    let mut text = String::from(
        "Hello {{lead.name}},\n\nyou were about to get {{product.name}} ({{product.price}} {{product.currency}}) \
         and stopped at checkout. It is still waiting for you: {{product.url}}\n\n",
    );
    let mut html = String::from(
        "<!doctype html>\n<html lang=\"en\"><body>\n<p>Hello {{lead.name}},</p>\n<p>you were about to get \
         <strong>{{product.name}}</strong> ({{product.price}} {{product.currency}}).</p>\n\
         <p><a href=\"{{product.url}}\">It is still waiting for you.</a></p>\n",
    );
    for _ in 0..6 {
        text.push_str(COPY);
        text.push_str("\n\n");
        html.push_str("<p>");
        html.push_str(COPY);
        html.push_str("</p>\n");
    }
    text.push_str("Reply to this email if something went wrong; we read every answer.\n");
    html.push_str("<p>Reply to this email if something went wrong; we read every answer.</p>\n</body></html>\n");
    std::fs::write(templates.join("body.txt.hbs"), text)?;
    std::fs::write(templates.join("body.html.hbs"), html)?;
    Ok(())
}
