//! Results per campaign, overall and per step: leads targeted, follow-ups sent, bounced, conversions,
//! conversion rate (converted / targeted) and value (attributed revenue, per currency).

use deadpool_postgres::GenericClient;
use serde::Serialize;

/// One line of results: a campaign overall (`step` is `None`) or one of its steps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepStats {
    pub campaign: String,
    pub step: Option<i16>,
    /// Leads enrolled (overall) or leads the step was scheduled for.
    pub targeted: i64,
    pub sent: i64,
    /// Follow-ups still on their way (pending, queued, rendered, sending, retrying).
    pub open: i64,
    pub cancelled: i64,
    pub bounced: i64,
    pub failed: i64,
    pub uncertain: i64,
    /// Purchases attributed to this campaign (overall) or step.
    pub conversions: i64,
    /// conversions / targeted.
    pub conversion_rate: f64,
    /// Attributed revenue per currency, e.g. `EUR 120.50`.
    pub value: Vec<String>,
}

pub async fn campaign_stats(client: &impl GenericClient) -> anyhow::Result<Vec<StepStats>> {
    let rows = client
        .query(
            "WITH d AS (
                 SELECT campaign_id, step,
                        count(*) AS targeted,
                        count(*) FILTER (WHERE state = 'sent') AS sent,
                        count(*) FILTER (WHERE state IN ('pending', 'queued', 'rendered', 'sending', 'retrying')) AS open,
                        count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
                        count(*) FILTER (WHERE state IN ('failed', 'cancelled') AND reason LIKE 'bounced%') AS bounced,
                        count(*) FILTER (WHERE state = 'failed') AS failed,
                        count(*) FILTER (WHERE state = 'uncertain') AS uncertain
                 FROM deliveries GROUP BY GROUPING SETS ((campaign_id, step), (campaign_id))),
             e AS (SELECT campaign_id, count(*) AS enrolled FROM enrollments GROUP BY campaign_id),
             c AS (
                 SELECT campaign_id, step, count(*) AS conversions
                 FROM conversions WHERE delivery_id IS NOT NULL
                 GROUP BY GROUPING SETS ((campaign_id, step), (campaign_id))),
             v AS (
                 SELECT campaign_id, step, currency, sum(amount) AS amount, GROUPING(step) AS overall
                 FROM conversions WHERE delivery_id IS NOT NULL AND amount IS NOT NULL
                 GROUP BY GROUPING SETS ((campaign_id, step, currency), (campaign_id, currency)))
             SELECT cp.name, d.step,
                    CASE WHEN d.step IS NULL THEN coalesce(e.enrolled, 0) ELSE d.targeted END,
                    d.sent, d.open, d.cancelled, d.bounced, d.failed, d.uncertain,
                    coalesce(c.conversions, 0),
                    coalesce((SELECT array_agg(trim(coalesce(v.currency, '') || ' ' || v.amount::numeric(18, 2)::text)
                                               ORDER BY v.currency)
                              FROM v WHERE v.campaign_id = d.campaign_id
                                       AND v.step IS NOT DISTINCT FROM d.step
                                       AND (v.overall = 1) = (d.step IS NULL)), '{}')
             FROM d JOIN campaigns cp ON cp.id = d.campaign_id
             LEFT JOIN e ON e.campaign_id = d.campaign_id
             LEFT JOIN c ON c.campaign_id = d.campaign_id AND c.step IS NOT DISTINCT FROM d.step
             ORDER BY cp.name, d.step NULLS FIRST",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let targeted: i64 = r.get(2);
            let conversions: i64 = r.get(9);
            StepStats {
                campaign: r.get(0),
                step: r.get(1),
                targeted,
                sent: r.get(3),
                open: r.get(4),
                cancelled: r.get(5),
                bounced: r.get(6),
                failed: r.get(7),
                uncertain: r.get(8),
                conversions,
                conversion_rate: if targeted > 0 {
                    conversions as f64 / targeted as f64
                } else {
                    0.0
                },
                value: r.get(10),
            }
        })
        .collect())
}

/// A plain-text table of the stats.
pub fn table(rows: &[StepStats]) -> String {
    let mut out = format!(
        "{:<28} {:>7} {:>8} {:>6} {:>5} {:>9} {:>7} {:>6} {:>9} {:>9} {:>7}  value\n",
        "campaign",
        "step",
        "targeted",
        "sent",
        "open",
        "cancelled",
        "bounced",
        "failed",
        "uncertain",
        "converted",
        "rate"
    );
    for r in rows {
        let step = r.step.map_or("overall".to_string(), |s| s.to_string());
        out.push_str(&format!(
            "{:<28} {:>7} {:>8} {:>6} {:>5} {:>9} {:>7} {:>6} {:>9} {:>9} {:>6.1}%  {}\n",
            r.campaign,
            step,
            r.targeted,
            r.sent,
            r.open,
            r.cancelled,
            r.bounced,
            r.failed,
            r.uncertain,
            r.conversions,
            r.conversion_rate * 100.0,
            r.value.join(", ")
        ));
    }
    out
}
