//! Results per campaign and step: follow-ups sent, cancelled and failed, conversions and revenue.

use deadpool_postgres::GenericClient;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepStats {
    pub campaign: String,
    pub step: i16,
    pub sent: i64,
    pub open: i64,
    pub cancelled: i64,
    pub failed: i64,
    pub uncertain: i64,
    pub conversions: i64,
    /// Conversions per follow-up sent.
    pub conversion_rate: f64,
    /// Attributed revenue per currency, e.g. `EUR 120.50`.
    pub revenue: Vec<String>,
}

pub async fn campaign_stats(client: &impl GenericClient) -> anyhow::Result<Vec<StepStats>> {
    let rows = client
        .query(
            "WITH d AS (
                 SELECT campaign_id, step,
                        count(*) FILTER (WHERE state = 'sent') AS sent,
                        count(*) FILTER (WHERE state IN ('pending', 'queued', 'rendered', 'sending', 'retrying')) AS open,
                        count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
                        count(*) FILTER (WHERE state = 'failed') AS failed,
                        count(*) FILTER (WHERE state = 'uncertain') AS uncertain
                 FROM deliveries GROUP BY campaign_id, step),
             c AS (
                 SELECT campaign_id, step, count(*) AS conversions,
                        array_agg(DISTINCT currency) FILTER (WHERE currency IS NOT NULL) AS currencies
                 FROM conversions WHERE delivery_id IS NOT NULL GROUP BY campaign_id, step),
             r AS (
                 SELECT campaign_id, step, coalesce(currency, '') || ' ' || sum(amount)::numeric(18, 2)::text AS revenue
                 FROM conversions WHERE delivery_id IS NOT NULL AND amount IS NOT NULL
                 GROUP BY campaign_id, step, currency)
             SELECT cp.name, d.step, d.sent, d.open, d.cancelled, d.failed, d.uncertain,
                    coalesce(c.conversions, 0),
                    coalesce((SELECT array_agg(trim(r.revenue) ORDER BY r.revenue) FROM r
                              WHERE r.campaign_id = d.campaign_id AND r.step = d.step), '{}')
             FROM d JOIN campaigns cp ON cp.id = d.campaign_id
             LEFT JOIN c ON c.campaign_id = d.campaign_id AND c.step = d.step
             ORDER BY cp.name, d.step",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let sent: i64 = r.get(2);
            let conversions: i64 = r.get(7);
            StepStats {
                campaign: r.get(0),
                step: r.get(1),
                sent,
                open: r.get(3),
                cancelled: r.get(4),
                failed: r.get(5),
                uncertain: r.get(6),
                conversions,
                conversion_rate: if sent > 0 { conversions as f64 / sent as f64 } else { 0.0 },
                revenue: r.get(8),
            }
        })
        .collect())
}

/// A plain-text table of the stats.
pub fn table(rows: &[StepStats]) -> String {
    let mut out = format!(
        "{:<28} {:>4} {:>7} {:>6} {:>9} {:>6} {:>9} {:>11} {:>7}  {}\n",
        "campaign", "step", "sent", "open", "cancelled", "failed", "uncertain", "conversions", "rate", "revenue"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<28} {:>4} {:>7} {:>6} {:>9} {:>6} {:>9} {:>11} {:>6.1}%  {}\n",
            r.campaign,
            r.step,
            r.sent,
            r.open,
            r.cancelled,
            r.failed,
            r.uncertain,
            r.conversions,
            r.conversion_rate * 100.0,
            r.revenue.join(", ")
        ));
    }
    out
}
