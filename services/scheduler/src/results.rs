//! Campaign results as Prometheus gauges, refreshed from PostgreSQL: per campaign and step, leads targeted,
//! follow-ups sent, bounced and converted, and attributed value per currency. Labels are campaign names and
//! steps (a bounded set a marketer defines), never a lead.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use leadflow_shared::service::Context;

use crate::stats::{campaign_stats, StepStats};

/// How often the gauges are recomputed, at most.
const REFRESH: Duration = Duration::from_secs(15);

/// The pause after a refresh is at least this many times as long as the refresh took: the queries read every
/// enrollment, delivery and conversion, so on a large history the gauges are refreshed less often rather than
/// taking more than a twentieth of the database's time.
const PAUSE_PER_REFRESH_TIME: u32 = 20;

pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        let started = tokio::time::Instant::now();
        if let Err(e) = refresh(&ctx).await {
            tracing::warn!(error = format!("{e:#}"), "failed to refresh campaign result metrics");
        }
        let pause = REFRESH.max(started.elapsed() * PAUSE_PER_REFRESH_TIME);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

pub async fn refresh(ctx: &Context) -> anyhow::Result<usize> {
    let client = ctx.pool.get().await?;
    let rows = campaign_stats(&client).await?;
    for row in &rows {
        export(row);
    }
    let variants = crate::abtest::variant_stats(&client).await?;
    for v in &variants {
        export_variant(v);
    }
    Ok(rows.len() + variants.len())
}

/// Per A/B variant (and the holdout group, `variant="holdout"`), for campaigns that have more than one line.
fn export_variant(v: &crate::abtest::VariantStats) {
    let labels = [("campaign", v.campaign.clone()), ("variant", v.variant.clone())];
    metrics::gauge!("leadflow_variant_targeted", &labels).set(v.targeted as f64);
    metrics::gauge!("leadflow_variant_sent", &labels).set(v.sent as f64);
    metrics::gauge!("leadflow_variant_converted", &labels).set(v.converted as f64);
    metrics::gauge!("leadflow_variant_conversion_rate", &labels).set(v.conversion_rate);
}

fn export(row: &StepStats) {
    let campaign = row.campaign.clone();
    let step = row.step.map_or_else(|| "all".to_string(), |s| s.to_string());
    let labels = [("campaign", campaign.clone()), ("step", step.clone())];
    metrics::gauge!("leadflow_campaign_targeted", &labels).set(row.targeted as f64);
    metrics::gauge!("leadflow_campaign_sent", &labels).set(row.sent as f64);
    metrics::gauge!("leadflow_campaign_bounced", &labels).set(row.bounced as f64);
    metrics::gauge!("leadflow_campaign_converted", &labels).set(row.conversions as f64);
    metrics::gauge!("leadflow_campaign_conversion_rate", &labels).set(row.conversion_rate);
    for value in &row.value {
        if let Some((currency, amount)) = value.split_once(' ') {
            if let Ok(amount) = amount.parse::<f64>() {
                let labels = [
                    ("campaign", campaign.clone()),
                    ("step", step.clone()),
                    ("currency", currency.to_string()),
                ];
                metrics::gauge!("leadflow_campaign_value", &labels).set(amount);
            }
        }
    }
}
