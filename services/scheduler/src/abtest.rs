//! A/B tests: deciding the winner when a campaign's end criterion is met, and the per-variant report with 95%
//! confidence intervals, significance against the best other variant, and the holdout group's incremental lift.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;

use leadflow_shared::settings;

use crate::campaigns::AbEnd;

/// Leads a variant needs before its conversion rate counts for a `conversion_rate` end criterion.
pub const DEFAULT_MIN_LEADS: u32 = 30;

/// The z value of a two-sided 95% interval.
const Z_95: f64 = 1.959_963_984_540_054;

/// A difference with a p-value below this is reported as significant.
pub const SIGNIFICANCE: f64 = 0.05;

/// What one variant of a running test has achieved so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    pub variant: String,
    /// Leads assigned this variant (the holdout group not counted).
    pub targeted: i64,
    /// Leads whose purchase was attributed to this variant.
    pub converted: i64,
    /// Attributed revenue in the test's currency (criterion `revenue`).
    pub revenue: f64,
    /// When the variant's N-th lead converted (criterion `conversions: N`).
    pub nth_conversion_at: Option<DateTime<Utc>>,
    /// When the variant's revenue reached the target (criterion `revenue`).
    pub revenue_reached_at: Option<DateTime<Utc>>,
}

impl Tally {
    /// The rate as a fraction (numerator, denominator) for exact comparisons; no leads: 0.
    fn fraction(&self) -> (i128, i128) {
        if self.targeted <= 0 {
            (0, 1)
        } else {
            (i128::from(self.converted), i128::from(self.targeted))
        }
    }

    pub fn rate(&self) -> f64 {
        rate(self.converted, self.targeted)
    }
}

/// Converted / targeted; 0 without leads.
pub fn rate(converted: i64, targeted: i64) -> f64 {
    if targeted > 0 {
        converted as f64 / targeted as f64
    } else {
        0.0
    }
}

/// Compares conversion rates exactly (no floating-point ties).
fn cmp_rate(a: &Tally, b: &Tally) -> Ordering {
    let (an, ad) = a.fraction();
    let (bn, bd) = b.fraction();
    (an * bd).cmp(&(bn * ad))
}

/// Best first: higher rate, then more conversions, then more leads; the earlier variant on a full tie.
fn cmp_performance(a: &Tally, b: &Tally) -> Ordering {
    cmp_rate(b, a)
        .then(b.converted.cmp(&a.converted))
        .then(b.targeted.cmp(&a.targeted))
}

/// The variant with the best conversion rate (ties: more conversions, more leads, then the first listed).
pub fn best_rate(tallies: &[Tally]) -> Option<&Tally> {
    let mut best: Option<&Tally> = None;
    for t in tallies {
        if best.is_none_or(|b| cmp_performance(t, b) == Ordering::Less) {
            best = Some(t);
        }
    }
    best
}

/// Why a test ended and who won.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub winner: String,
    /// `conversions`, `conversion_rate`, `revenue`, `leads` or `until`.
    pub criterion: &'static str,
}

/// The winner, once the end criterion is met; `leads` is the number of unique leads assigned a variant so far,
/// `now` the current time. Pure: the data comes from [`decide`].
pub fn pick_winner(end: &AbEnd, tallies: &[Tally], leads: i64, now: DateTime<Utc>) -> Option<Decision> {
    let decision = |t: &Tally, criterion| Decision {
        winner: t.variant.clone(),
        criterion,
    };
    if end.conversions.is_some() {
        // The first to reach N; reached at the same moment: the higher rate.
        return first_reached(tallies, |t| t.nth_conversion_at).map(|t| decision(t, "conversions"));
    }
    if let Some(target) = end.conversion_rate {
        let min_leads = i64::from(end.min_leads.unwrap_or(DEFAULT_MIN_LEADS));
        let qualified: Vec<Tally> = tallies
            .iter()
            .filter(|t| t.targeted > 0 && t.targeted >= min_leads && t.rate() >= target)
            .cloned()
            .collect();
        return best_rate(&qualified).map(|t| decision(t, "conversion_rate"));
    }
    if end.revenue.is_some() {
        return first_reached(tallies, |t| t.revenue_reached_at).map(|t| decision(t, "revenue"));
    }
    if let Some(n) = end.leads {
        if leads >= i64::from(n) {
            return best_rate(tallies).map(|t| decision(t, "leads"));
        }
        return None;
    }
    if let Some(until) = end.until {
        if now >= until {
            return best_rate(tallies).map(|t| decision(t, "until"));
        }
    }
    None
}

/// The variant that reached its threshold earliest; at the same moment, the better performer.
fn first_reached(tallies: &[Tally], at: impl Fn(&Tally) -> Option<DateTime<Utc>>) -> Option<&Tally> {
    let mut first: Option<(&Tally, DateTime<Utc>)> = None;
    for t in tallies {
        let Some(when) = at(t) else { continue };
        let better = match first {
            None => true,
            Some((f, f_when)) => when.cmp(&f_when).then(cmp_performance(t, f)) == Ordering::Less,
        };
        if better {
            first = Some((t, when));
        }
    }
    first.map(|(t, _)| t)
}

/// Ends every running test whose criterion is met: sets the campaign's winner once (a second scheduler, or a
/// changed criterion, leaves it alone). Returns (campaign, winner) for each test decided now. Without a running
/// test this is one query on the campaigns table.
pub async fn decide(client: &impl GenericClient) -> anyhow::Result<Vec<(String, String)>> {
    let running = client
        .query(
            "SELECT id, name, ab_end, now() FROM campaigns
             WHERE ab_end IS NOT NULL AND ab_winner IS NULL ORDER BY id",
            &[],
        )
        .await?;
    let mut decided = Vec::new();
    for row in running {
        let id: i64 = row.get(0);
        let name: String = row.get(1);
        let raw: Value = row.get(2);
        let now: DateTime<Utc> = row.get(3);
        let end: AbEnd = match serde_json::from_value(raw.clone()) {
            Ok(end) => end,
            Err(e) => {
                tracing::warn!(campaign = %name, error = %e, "the A/B test's end criterion is unreadable");
                continue;
            }
        };
        let tallies = tallies(client, id, &end).await?;
        let leads = if end.leads.is_some() {
            client
                .query_one(
                    "SELECT count(DISTINCT lead_id) FROM enrollments WHERE campaign_id = $1 AND NOT holdout",
                    &[&id],
                )
                .await?
                .get(0)
        } else {
            0
        };
        let Some(decision) = pick_winner(&end, &tallies, leads, now) else {
            continue;
        };
        let updated = client
            .execute(
                "UPDATE campaigns SET ab_winner = $2, ab_ended_at = now()
                 WHERE id = $1 AND ab_winner IS NULL AND ab_end = $3",
                &[&id, &decision.winner, &raw],
            )
            .await?;
        if updated == 1 {
            test_decided(&name, &decision, &tallies);
            decided.push((name, decision.winner));
        }
    }
    Ok(decided)
}

/// Logs and counts a decided test.
fn test_decided(campaign: &str, decision: &Decision, tallies: &[Tally]) {
    let results: Vec<String> = tallies
        .iter()
        .map(|t| format!("{} {}/{}", t.variant, t.converted, t.targeted))
        .collect();
    tracing::info!(
        campaign,
        winner = %decision.winner,
        criterion = decision.criterion,
        results = %results.join(", "),
        "A/B test decided"
    );
    metrics::counter!("leadflow_scheduler_ab_tests_decided_total", "criterion" => decision.criterion).increment(1);
}

/// Per variant of the campaign: leads targeted, leads converted, revenue in the test's currency, and when the
/// conversion count or the revenue reached the end criterion's threshold.
async fn tallies(client: &impl GenericClient, campaign_id: i64, end: &AbEnd) -> anyhow::Result<Vec<Tally>> {
    let nth = end.conversions.map(i64::from);
    let rows = client
        .query(
            "WITH t AS (
                 SELECT variant, count(*) AS targeted FROM enrollments
                 WHERE campaign_id = $1 AND NOT holdout GROUP BY variant),
             firsts AS (
                 SELECT variant, min(created_at) AS at FROM conversions
                 WHERE campaign_id = $1 AND variant IS NOT NULL
                 GROUP BY variant, coalesce(enrollment_id, -id)),
             c AS (
                 SELECT variant, count(*) AS converted, min(at) FILTER (WHERE n = $2) AS nth_at
                 FROM (SELECT variant, at, row_number() OVER (PARTITION BY variant ORDER BY at) AS n FROM firsts) r
                 GROUP BY variant),
             r AS (
                 SELECT variant, sum(amount)::float8 AS revenue,
                        min(created_at) FILTER (WHERE running >= $3::float8) AS reached_at
                 FROM (SELECT variant, amount, created_at,
                              sum(amount) OVER (PARTITION BY variant ORDER BY created_at, id)::float8 AS running
                       FROM conversions
                       WHERE campaign_id = $1 AND variant IS NOT NULL AND amount IS NOT NULL
                         AND upper(currency) = upper($4::text)) x
                 GROUP BY variant)
             SELECT v.name, coalesce(t.targeted, 0), coalesce(c.converted, 0), c.nth_at,
                    coalesce(r.revenue, 0), r.reached_at
             FROM campaign_variants v
             LEFT JOIN t ON t.variant = v.name
             LEFT JOIN c ON c.variant = v.name
             LEFT JOIN r ON r.variant = v.name
             WHERE v.campaign_id = $1
             ORDER BY v.name",
            &[&campaign_id, &nth, &end.revenue, &end.currency],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Tally {
            variant: r.get(0),
            targeted: r.get(1),
            converted: r.get(2),
            nth_conversion_at: r.get(3),
            revenue: r.get(4),
            revenue_reached_at: r.get(5),
        })
        .collect())
}

/// The Wilson score interval (95%) of a conversion rate: `(low, high)`; without leads, `(0, 1)`.
pub fn wilson_interval(converted: i64, targeted: i64) -> (f64, f64) {
    if targeted <= 0 {
        return (0.0, 1.0);
    }
    let n = targeted as f64;
    let p = (converted as f64 / n).clamp(0.0, 1.0);
    let z2 = Z_95 * Z_95;
    let denominator = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denominator;
    let half = Z_95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// The two-sided p-value of a two-proportion z-test (pooled): how likely a difference at least this large is
/// when both rates are in truth the same. `None` when a side has no leads.
pub fn two_proportion_p_value(x1: i64, n1: i64, x2: i64, n2: i64) -> Option<f64> {
    if n1 <= 0 || n2 <= 0 {
        return None;
    }
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let pooled = (x1 + x2) as f64 / (n1f + n2f);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n2f)).sqrt();
    if se <= 0.0 || !se.is_finite() {
        // Both 0% or both 100%: no difference at all.
        return Some(1.0);
    }
    let z = (x1 as f64 / n1f - x2 as f64 / n2f) / se;
    Some(erfc(z.abs() / std::f64::consts::SQRT_2).clamp(0.0, 1.0))
}

/// The complementary error function (Chebyshev fit, fractional error below 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// The holdout group's comparison with the treated leads: `(absolute lift, relative lift)`. The absolute lift is
/// the treated rate minus the holdout rate (0.03 = 3 percentage points); the relative lift divides it by the
/// holdout rate (none when the holdout group never converted).
pub fn lift(treated_rate: f64, holdout_rate: f64) -> (f64, Option<f64>) {
    let absolute = treated_rate - holdout_rate;
    let relative = (holdout_rate > 0.0).then(|| absolute / holdout_rate);
    (absolute, relative)
}

/// One line of the variant report: a variant of a campaign, or the campaign's holdout group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantStats {
    pub campaign: String,
    /// The variant's name; `holdout` for the holdout group (see `holdout`).
    pub variant: String,
    /// This line is the holdout group: leads that were enrolled but sent nothing.
    pub holdout: bool,
    /// Leads assigned this variant (or held out).
    pub targeted: i64,
    /// Follow-ups sent.
    pub sent: i64,
    pub bounced: i64,
    /// Leads who bought: attributed to the variant (the last follow-up sent within the attribution window), or,
    /// for the holdout group, a purchase within the attribution window after the enrollment.
    pub converted: i64,
    /// converted / targeted.
    pub conversion_rate: f64,
    /// The 95% confidence interval of the rate (Wilson score interval).
    pub ci_low: f64,
    pub ci_high: f64,
    /// What the rate is compared with: the best other variant, or for the holdout group `all variants`.
    pub compared_with: Option<String>,
    /// Two-sided p-value of the two-proportion z-test against `compared_with`.
    pub p_value: Option<f64>,
    /// p-value below 0.05.
    pub significant: bool,
    /// Revenue per currency, e.g. `EUR 120.50`.
    pub value: Vec<String>,
    /// The A/B test ended and this variant won.
    pub winner: bool,
    /// Holdout line only: the rate of all variants together minus the holdout rate.
    pub lift: Option<f64>,
    /// Holdout line only: the lift relative to the holdout rate (none when the holdout group never converted).
    pub relative_lift: Option<f64>,
}

/// A variant's raw counts, as read from the database.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VariantCounts {
    pub variant: String,
    pub targeted: i64,
    pub sent: i64,
    pub bounced: i64,
    pub converted: i64,
    pub value: Vec<String>,
}

/// The report lines of one campaign: each variant compared with its best rival, then the holdout group (if any)
/// compared with all variants together. Pure.
pub fn campaign_lines(
    campaign: &str,
    variants: &[VariantCounts],
    holdout: Option<&VariantCounts>,
    winner: Option<&str>,
) -> Vec<VariantStats> {
    let as_tally = |v: &VariantCounts| Tally {
        variant: v.variant.clone(),
        targeted: v.targeted,
        converted: v.converted,
        revenue: 0.0,
        nth_conversion_at: None,
        revenue_reached_at: None,
    };
    let tallies: Vec<Tally> = variants.iter().map(as_tally).collect();
    let mut lines = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        let others: Vec<Tally> = tallies
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, t)| t.clone())
            .collect();
        let rival = best_rate(&others);
        let p_value = rival.and_then(|r| two_proportion_p_value(v.converted, v.targeted, r.converted, r.targeted));
        let (ci_low, ci_high) = wilson_interval(v.converted, v.targeted);
        lines.push(VariantStats {
            campaign: campaign.to_string(),
            variant: v.variant.clone(),
            holdout: false,
            targeted: v.targeted,
            sent: v.sent,
            bounced: v.bounced,
            converted: v.converted,
            conversion_rate: rate(v.converted, v.targeted),
            ci_low,
            ci_high,
            compared_with: rival.map(|r| r.variant.clone()),
            p_value,
            significant: p_value.is_some_and(|p| p < SIGNIFICANCE),
            value: v.value.clone(),
            winner: winner == Some(v.variant.as_str()),
            lift: None,
            relative_lift: None,
        });
    }
    if let Some(h) = holdout {
        let treated: i64 = variants.iter().map(|v| v.targeted).sum();
        let treated_converted: i64 = variants.iter().map(|v| v.converted).sum();
        let holdout_rate = rate(h.converted, h.targeted);
        let p_value = two_proportion_p_value(treated_converted, treated, h.converted, h.targeted);
        let (ci_low, ci_high) = wilson_interval(h.converted, h.targeted);
        let (absolute, relative) = if treated > 0 && h.targeted > 0 {
            let (a, r) = lift(rate(treated_converted, treated), holdout_rate);
            (Some(a), r)
        } else {
            (None, None)
        };
        lines.push(VariantStats {
            campaign: campaign.to_string(),
            variant: "holdout".to_string(),
            holdout: true,
            targeted: h.targeted,
            sent: h.sent,
            bounced: h.bounced,
            converted: h.converted,
            conversion_rate: holdout_rate,
            ci_low,
            ci_high,
            compared_with: Some("all variants".to_string()),
            p_value,
            significant: p_value.is_some_and(|p| p < SIGNIFICANCE),
            value: h.value.clone(),
            winner: false,
            lift: absolute,
            relative_lift: relative,
        });
    }
    lines
}

/// The variant report of every campaign with more than one variant, an A/B test or a holdout group.
pub async fn variant_stats(client: &impl GenericClient) -> anyhow::Result<Vec<VariantStats>> {
    let window = settings::attribution_window(client).await?.as_secs_f64();
    let campaigns = client
        .query(
            "SELECT c.id, c.name, c.ab_winner,
                    c.ab_end IS NOT NULL OR c.holdout_percent > 0
                    OR (SELECT count(*) FROM campaign_variants v WHERE v.campaign_id = c.id) > 1
             FROM campaigns c ORDER BY c.name",
            &[],
        )
        .await?;
    let variant_rows = client
        .query(
            "WITH names AS (
                 SELECT campaign_id, name AS variant FROM campaign_variants
                 UNION
                 SELECT DISTINCT campaign_id, variant FROM enrollments WHERE NOT holdout AND variant IS NOT NULL),
             t AS (
                 SELECT campaign_id, variant, count(*) AS targeted FROM enrollments
                 WHERE NOT holdout GROUP BY campaign_id, variant),
             d AS (
                 SELECT campaign_id, variant,
                        count(*) FILTER (WHERE state = 'sent') AS sent,
                        count(*) FILTER (WHERE state IN ('failed', 'cancelled') AND reason LIKE 'bounced%') AS bounced
                 FROM deliveries GROUP BY campaign_id, variant),
             c AS (
                 SELECT campaign_id, variant, count(DISTINCT coalesce(enrollment_id, -id)) AS converted
                 FROM conversions WHERE campaign_id IS NOT NULL AND variant IS NOT NULL
                 GROUP BY campaign_id, variant),
             val AS (
                 SELECT campaign_id, variant,
                        array_agg(trim(coalesce(currency, '') || ' ' || amount::numeric(18, 2)::text)
                                  ORDER BY currency) AS value
                 FROM (SELECT campaign_id, variant, currency, sum(amount) AS amount FROM conversions
                       WHERE campaign_id IS NOT NULL AND variant IS NOT NULL AND amount IS NOT NULL
                       GROUP BY campaign_id, variant, currency) s
                 GROUP BY campaign_id, variant)
             SELECT n.campaign_id, n.variant, coalesce(t.targeted, 0), coalesce(d.sent, 0), coalesce(d.bounced, 0),
                    coalesce(c.converted, 0), coalesce(val.value, '{}')
             FROM names n
             LEFT JOIN t ON t.campaign_id = n.campaign_id AND t.variant = n.variant
             LEFT JOIN d ON d.campaign_id = n.campaign_id AND d.variant = n.variant
             LEFT JOIN c ON c.campaign_id = n.campaign_id AND c.variant = n.variant
             LEFT JOIN val ON val.campaign_id = n.campaign_id AND val.variant = n.variant
             ORDER BY n.campaign_id, n.variant",
            &[],
        )
        .await?;
    let holdout_rows = client
        .query(
            "WITH held AS (
                 SELECT e.id, e.campaign_id, e.lead_id, e.created_at FROM enrollments e WHERE e.holdout),
             bought AS (
                 SELECT DISTINCT h.campaign_id, h.id AS enrollment_id, c.id AS conversion_id, c.currency, c.amount
                 FROM held h JOIN conversions c ON c.lead_id = h.lead_id
                  AND c.created_at >= h.created_at
                  AND c.created_at <= h.created_at + make_interval(secs => $1)),
             val AS (
                 SELECT campaign_id,
                        array_agg(trim(coalesce(currency, '') || ' ' || amount::numeric(18, 2)::text)
                                  ORDER BY currency) AS value
                 FROM (SELECT campaign_id, currency, sum(amount) AS amount
                       FROM (SELECT DISTINCT campaign_id, conversion_id, currency, amount FROM bought
                             WHERE amount IS NOT NULL) u
                       GROUP BY campaign_id, currency) s
                 GROUP BY campaign_id)
             SELECT h.campaign_id, count(*),
                    count(*) FILTER (WHERE EXISTS (SELECT 1 FROM bought b WHERE b.enrollment_id = h.id)),
                    coalesce((SELECT value FROM val WHERE val.campaign_id = h.campaign_id), '{}')
             FROM held h GROUP BY h.campaign_id",
            &[&window],
        )
        .await?;
    let mut lines = Vec::new();
    for campaign in campaigns {
        let id: i64 = campaign.get(0);
        let name: String = campaign.get(1);
        let winner: Option<String> = campaign.get(2);
        let tested: bool = campaign.get(3);
        let variants: Vec<VariantCounts> = variant_rows
            .iter()
            .filter(|r| r.get::<_, i64>(0) == id)
            .map(|r| VariantCounts {
                variant: r.get(1),
                targeted: r.get(2),
                sent: r.get(3),
                bounced: r.get(4),
                converted: r.get(5),
                value: r.get(6),
            })
            .collect();
        let holdout: Option<VariantCounts> =
            holdout_rows
                .iter()
                .find(|r| r.get::<_, i64>(0) == id)
                .map(|r| VariantCounts {
                    variant: "holdout".to_string(),
                    targeted: r.get(1),
                    sent: 0,
                    bounced: 0,
                    converted: r.get(2),
                    value: r.get(3),
                });
        if !tested && variants.len() < 2 && holdout.is_none() {
            continue;
        }
        lines.extend(campaign_lines(&name, &variants, holdout.as_ref(), winner.as_deref()));
    }
    Ok(lines)
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// A plain-text table of the variant report, with a legend.
pub fn table(rows: &[VariantStats]) -> String {
    if rows.is_empty() {
        return "no campaign has variants, an A/B test or a holdout group\n".to_string();
    }
    let mut out = format!(
        "{:<28} {:<16} {:>8} {:>6} {:>7} {:>9} {:>7}  {:<17} {:>8} {:<5} {:<20} lift\n",
        "campaign", "variant", "targeted", "sent", "bounced", "converted", "rate", "95% CI", "p-value", "sig.", "value"
    );
    for r in rows {
        let variant = if r.winner {
            format!("{} *", r.variant)
        } else if r.holdout {
            "(holdout)".to_string()
        } else {
            r.variant.clone()
        };
        let ci = format!("[{}, {}]", percent(r.ci_low), percent(r.ci_high));
        let p = match r.p_value {
            None => "-".to_string(),
            Some(p) if p < 0.001 => "<0.001".to_string(),
            Some(p) => format!("{p:.3}"),
        };
        let significant = match (r.p_value, r.significant) {
            (None, _) => "-",
            (Some(_), true) => "yes",
            (Some(_), false) => "no",
        };
        let lift = match (r.lift, r.relative_lift) {
            (Some(a), Some(rel)) => format!("{:+.1} pts ({:+.0}%)", a * 100.0, rel * 100.0),
            (Some(a), None) => format!("{:+.1} pts", a * 100.0),
            _ => String::new(),
        };
        let value = if r.value.is_empty() {
            "-".to_string()
        } else {
            r.value.join(", ")
        };
        out.push_str(
            format!(
                "{:<28} {:<16} {:>8} {:>6} {:>7} {:>9} {:>7}  {:<17} {:>8} {:<5} {:<20} {}",
                r.campaign,
                variant,
                r.targeted,
                r.sent,
                r.bounced,
                r.converted,
                percent(r.conversion_rate),
                ci,
                p,
                significant,
                value,
                lift
            )
            .trim_end(),
        );
        out.push('\n');
    }
    out.push_str(
        "\n* the A/B test ended and this variant won. rate: converted / targeted, with its 95% confidence interval \
         (Wilson).\np-value: two-proportion z-test against the best other variant (holdout: against all variants \
         together);\nsig.: p-value below 0.05. lift: all variants' rate minus the holdout rate (percentage points, \
         and relative).\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).single().unwrap()
    }

    fn tally(variant: &str, converted: i64, targeted: i64) -> Tally {
        Tally {
            variant: variant.to_string(),
            targeted,
            converted,
            revenue: 0.0,
            nth_conversion_at: None,
            revenue_reached_at: None,
        }
    }

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn wilson_intervals_match_known_values() {
        let (lo, hi) = wilson_interval(10, 100);
        assert!(close(lo, 0.0552, 0.0005) && close(hi, 0.1744, 0.0005), "{lo} {hi}");
        let (lo, hi) = wilson_interval(0, 10);
        assert!(close(lo, 0.0, 1e-12) && close(hi, 0.2775, 0.0005), "{lo} {hi}");
        let (lo, hi) = wilson_interval(10, 10);
        assert!(close(lo, 0.7225, 0.0005) && close(hi, 1.0, 1e-12), "{lo} {hi}");
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
        let (lo, hi) = wilson_interval(500, 1000);
        assert!(lo < 0.5 && hi > 0.5 && close(hi - lo, 0.062, 0.001), "{lo} {hi}");
    }

    #[test]
    fn the_z_test_finds_real_differences_and_not_noise() {
        // 50% vs 30% of 100 each: z = 2.887, p = 0.0039.
        let p = two_proportion_p_value(50, 100, 30, 100).unwrap();
        assert!(close(p, 0.0039, 0.0002), "{p}");
        assert_eq!(two_proportion_p_value(30, 100, 50, 100), Some(p));
        // 11% vs 10% of 100 each is noise.
        let p = two_proportion_p_value(11, 100, 10, 100).unwrap();
        assert!(p > 0.5, "{p}");
        assert_eq!(two_proportion_p_value(0, 10, 0, 20), Some(1.0));
        assert_eq!(two_proportion_p_value(1, 0, 0, 20), None);
        // 1.96 standard errors is p = 0.05.
        assert!(close(erfc(1.959_964 / std::f64::consts::SQRT_2), 0.05, 1e-6));
        assert!(close(erfc(0.0), 1.0, 1e-6) && close(erfc(-3.0), 2.0, 1e-4));
    }

    #[test]
    fn the_lift_is_absolute_and_relative() {
        let (a, r) = lift(0.12, 0.08);
        assert!(close(a, 0.04, 1e-12));
        assert!(close(r.unwrap(), 0.5, 1e-12));
        assert_eq!(lift(0.1, 0.0).1, None);
    }

    #[test]
    fn the_first_variant_to_reach_n_conversions_wins_and_ties_go_to_the_higher_rate() {
        let end = AbEnd {
            conversions: Some(5),
            ..Default::default()
        };
        let mut a = tally("A", 6, 100);
        let mut b = tally("B", 5, 20);
        assert_eq!(pick_winner(&end, &[a.clone(), b.clone()], 120, at(0)), None);
        a.nth_conversion_at = Some(at(10));
        b.nth_conversion_at = Some(at(20));
        let won = pick_winner(&end, &[a.clone(), b.clone()], 120, at(30)).unwrap();
        assert_eq!(
            won,
            Decision {
                winner: "A".into(),
                criterion: "conversions"
            }
        );
        b.nth_conversion_at = Some(at(10));
        assert_eq!(pick_winner(&end, &[a, b], 120, at(30)).unwrap().winner, "B");
    }

    #[test]
    fn a_target_rate_counts_only_with_enough_leads() {
        let end = AbEnd {
            conversion_rate: Some(0.2),
            min_leads: Some(10),
            ..Default::default()
        };
        // A has the rate but too few leads; B has the leads but not the rate.
        let a = tally("A", 3, 5);
        let b = tally("B", 1, 50);
        assert_eq!(pick_winner(&end, &[a, b.clone()], 55, at(0)), None);
        let a = tally("A", 3, 10);
        assert_eq!(pick_winner(&end, &[a, b], 60, at(0)).unwrap().winner, "A");
        let default_min = AbEnd {
            conversion_rate: Some(0.2),
            ..Default::default()
        };
        assert_eq!(pick_winner(&default_min, &[tally("A", 10, 29)], 29, at(0)), None);
        assert!(pick_winner(&default_min, &[tally("A", 10, 30)], 30, at(0)).is_some());
    }

    #[test]
    fn revenue_leads_and_time_end_a_test() {
        let revenue = AbEnd {
            revenue: Some(100.0),
            currency: Some("EUR".into()),
            ..Default::default()
        };
        let mut a = tally("A", 1, 10);
        let b = tally("B", 4, 10);
        assert_eq!(pick_winner(&revenue, &[a.clone(), b.clone()], 20, at(0)), None);
        a.revenue_reached_at = Some(at(5));
        assert_eq!(
            pick_winner(&revenue, &[a.clone(), b.clone()], 20, at(6))
                .unwrap()
                .winner,
            "A"
        );

        let leads = AbEnd {
            leads: Some(20),
            ..Default::default()
        };
        assert_eq!(pick_winner(&leads, &[a.clone(), b.clone()], 19, at(0)), None);
        let won = pick_winner(&leads, &[a.clone(), b.clone()], 20, at(0)).unwrap();
        assert_eq!((won.winner.as_str(), won.criterion), ("B", "leads"));

        let until = AbEnd {
            until: Some(at(100)),
            ..Default::default()
        };
        assert_eq!(pick_winner(&until, &[a.clone(), b.clone()], 20, at(99)), None);
        assert_eq!(pick_winner(&until, &[a, b], 20, at(100)).unwrap().winner, "B");
        // Nobody converted: the test still ends, and the first variant is kept.
        assert_eq!(
            pick_winner(&until, &[tally("A", 0, 0), tally("B", 0, 0)], 0, at(100))
                .unwrap()
                .winner,
            "A"
        );
    }

    #[test]
    fn equal_rates_go_to_more_conversions() {
        let a = tally("A", 1, 10);
        let b = tally("B", 2, 20);
        assert_eq!(best_rate(&[a, b]).unwrap().variant, "B");
        assert!(best_rate(&[]).is_none());
    }

    fn counts(variant: &str, converted: i64, targeted: i64) -> VariantCounts {
        VariantCounts {
            variant: variant.into(),
            targeted,
            sent: targeted,
            bounced: 0,
            converted,
            value: vec![],
        }
    }

    #[test]
    fn report_lines_compare_each_variant_with_the_best_other_and_the_holdout_with_all() {
        let variants = [counts("A", 10, 100), counts("B", 30, 100), counts("C", 12, 100)];
        let holdout = counts("holdout", 5, 100);
        let lines = campaign_lines("c", &variants, Some(&holdout), Some("B"));
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].compared_with.as_deref(), Some("B"));
        assert!(lines[0].significant, "{:?}", lines[0]);
        assert_eq!(lines[1].compared_with.as_deref(), Some("C"));
        assert!(lines[1].winner && !lines[0].winner);
        assert!(lines[1].ci_low < 0.3 && lines[1].ci_high > 0.3);
        let h = &lines[3];
        assert!(h.holdout && h.variant == "holdout");
        // All variants: 52 / 300 = 17.3%; holdout 5%.
        assert!(close(h.lift.unwrap(), 52.0 / 300.0 - 0.05, 1e-12), "{h:?}");
        assert!(close(h.relative_lift.unwrap(), (52.0 / 300.0 - 0.05) / 0.05, 1e-9));
        assert!(h.significant);
        let text = table(&lines);
        assert!(text.contains("B *") && text.contains("(holdout)"), "{text}");
        assert!(text.contains("pts"), "{text}");
        let single = campaign_lines("c", &[counts("A", 1, 2)], None, None);
        assert_eq!(single[0].p_value, None);
        assert!(!single[0].significant);
    }
}
