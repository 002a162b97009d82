//! Per-lead discount codes: one code per lead and step, generated at render time or drawn from a pool uploaded
//! with `leadflow codes import`, and recognised again when an order names it (the conversion is then credited to
//! the step whose email carried the code).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use anyhow::Context as _;
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;

/// Every generated code starts with this.
pub const GENERATED_PREFIX: &str = "LF-";
/// Characters after the prefix of a generated code.
pub const GENERATED_LENGTH: usize = 10;
/// Upper-case letters and digits without the look-alikes 0/O and 1/I: a code read aloud or typed is typed right.
const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
/// The longest code accepted (in a pool, or named by an order).
pub const MAX_CODE_LENGTH: usize = 64;
/// Tries at a fresh generated code before giving up (a clash is a one-in-10^15 event).
const GENERATE_TRIES: usize = 8;

/// Where a step's codes come from (`campaign_steps.code_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Generated,
    Pool,
}

impl Source {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "generated" => Some(Self::Generated),
            "pool" => Some(Self::Pool),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generated => "generated",
            Self::Pool => "pool",
        }
    }
}

/// A fresh random code: `LF-` and ten characters of an unambiguous alphabet (50 bits).
pub fn generate() -> String {
    let mut code = String::with_capacity(GENERATED_PREFIX.len() + GENERATED_LENGTH);
    code.push_str(GENERATED_PREFIX);
    for _ in 0..GENERATED_LENGTH {
        code.push(char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]));
    }
    code
}

/// The delivery a code is being assigned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub delivery_id: i64,
    pub lead_id: i64,
    pub campaign_id: i64,
    pub variant: &'a str,
    pub step: i16,
    pub source: Source,
}

/// What [`assign`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assigned {
    /// The delivery's code: already assigned (a render again), freshly generated, or drawn from the pool.
    Code(String),
    /// The step draws from a pool with no free code left.
    PoolEmpty,
}

/// Gives the delivery its code, in the caller's (render) transaction: the code it already has, else a new
/// generated one, else the next free pool code of its campaign, variant and step (`FOR UPDATE SKIP LOCKED`, so
/// renderers drawing at once never get the same code).
pub async fn assign(tx: &impl GenericClient, request: &Request<'_>) -> anyhow::Result<Assigned> {
    if let Some(code) = code_of_delivery(tx, request.delivery_id).await? {
        return Ok(Assigned::Code(code));
    }
    match request.source {
        Source::Generated => {
            for _ in 0..GENERATE_TRIES {
                let code = generate();
                // DO NOTHING instead of an error: an error would abort the caller's transaction.
                let inserted = tx
                    .query_opt(
                        "INSERT INTO discount_codes (campaign_id, variant, step, code, source, lead_id, delivery_id,
                                                     assigned_at)
                         VALUES ($1, $2, $3, $4, 'generated', $5, $6, now())
                         ON CONFLICT DO NOTHING
                         RETURNING code",
                        &[
                            &request.campaign_id,
                            &request.variant,
                            &request.step,
                            &code,
                            &request.lead_id,
                            &request.delivery_id,
                        ],
                    )
                    .await
                    .context("failed to store a generated discount code")?;
                if let Some(row) = inserted {
                    assigned(Source::Generated);
                    return Ok(Assigned::Code(row.try_get(0)?));
                }
                // The code was taken, or (the conflict being on delivery_id) the delivery got one meanwhile.
                if let Some(code) = code_of_delivery(tx, request.delivery_id).await? {
                    return Ok(Assigned::Code(code));
                }
            }
            anyhow::bail!("no unused discount code after {GENERATE_TRIES} tries")
        }
        Source::Pool => {
            let drawn = tx
                .query_opt(
                    "UPDATE discount_codes SET delivery_id = $4, lead_id = $5, assigned_at = now()
                      WHERE id = (SELECT id FROM discount_codes
                                   WHERE campaign_id = $1 AND variant = $2 AND step = $3 AND source = 'pool'
                                     AND delivery_id IS NULL AND assigned_at IS NULL
                                   ORDER BY id LIMIT 1
                                   FOR UPDATE SKIP LOCKED)
                     RETURNING code",
                    &[
                        &request.campaign_id,
                        &request.variant,
                        &request.step,
                        &request.delivery_id,
                        &request.lead_id,
                    ],
                )
                .await
                .context("failed to draw a discount code from the pool")?;
            match drawn {
                Some(row) => {
                    assigned(Source::Pool);
                    Ok(Assigned::Code(row.try_get(0)?))
                }
                None => Ok(Assigned::PoolEmpty),
            }
        }
    }
}

fn assigned(source: Source) {
    metrics::counter!("leadflow_renderer_codes_assigned_total", "source" => source.as_str()).increment(1);
}

async fn code_of_delivery(tx: &impl GenericClient, delivery_id: i64) -> anyhow::Result<Option<String>> {
    let row = tx
        .query_opt(
            "SELECT code FROM discount_codes WHERE delivery_id = $1",
            &[&delivery_id],
        )
        .await
        .context("failed to look up the discount code of a delivery")?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Takes the codes back from deliveries that will never be sent (they failed to render): a generated code is
/// deleted, a pool code goes back to the pool. Redeemed codes stay as they are.
pub async fn release(tx: &impl GenericClient, delivery_ids: &[i64]) -> anyhow::Result<u64> {
    if delivery_ids.is_empty() {
        return Ok(0);
    }
    let deleted = tx
        .execute(
            "DELETE FROM discount_codes
              WHERE delivery_id = ANY($1) AND source = 'generated' AND redeemed_at IS NULL",
            &[&delivery_ids],
        )
        .await
        .context("failed to release generated discount codes")?;
    let returned = tx
        .execute(
            "UPDATE discount_codes SET delivery_id = NULL, lead_id = NULL, assigned_at = NULL
              WHERE delivery_id = ANY($1) AND source = 'pool' AND redeemed_at IS NULL",
            &[&delivery_ids],
        )
        .await
        .context("failed to return discount codes to the pool")?;
    Ok(deleted + returned)
}

/// The discount code an order names: `data.discount_code`, else `data.code`, else `data.coupon` (trimmed).
pub fn code_of_order(data: &Value) -> Option<String> {
    ["discount_code", "code", "coupon"]
        .iter()
        .filter_map(|key| data.get(*key).and_then(Value::as_str))
        .map(str::trim)
        .find(|code| !code.is_empty() && code.chars().count() <= MAX_CODE_LENGTH)
        .map(str::to_string)
}

/// A code assigned to a lead, with the delivery that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemable {
    pub id: i64,
    pub code: String,
    pub delivery_id: i64,
    pub campaign_id: i64,
    pub variant: String,
    pub step: i16,
    pub enrollment_id: i64,
}

/// The code `code` if it was assigned to this lead (as given, or upper-cased: generated codes are upper-case).
pub async fn find_for_lead(tx: &impl GenericClient, lead_id: i64, code: &str) -> anyhow::Result<Option<Redeemable>> {
    let row = tx
        .query_opt(
            "SELECT k.id, k.code, d.id, d.campaign_id, d.variant, d.step, d.enrollment_id
               FROM discount_codes k JOIN deliveries d ON d.id = k.delivery_id
              WHERE k.code IN ($1, upper($1)) AND k.lead_id = $2
              ORDER BY k.code = $1 DESC
              LIMIT 1",
            &[&code, &lead_id],
        )
        .await
        .context("failed to look up the order's discount code")?;
    row.map(|r| {
        Ok(Redeemable {
            id: r.try_get(0)?,
            code: r.try_get(1)?,
            delivery_id: r.try_get(2)?,
            campaign_id: r.try_get(3)?,
            variant: r.try_get(4)?,
            step: r.try_get(5)?,
            enrollment_id: r.try_get(6)?,
        })
    })
    .transpose()
}

/// Marks a code redeemed by a conversion; the first redemption is the one kept.
pub async fn mark_redeemed(tx: &impl GenericClient, code_id: i64, conversion_id: i64) -> anyhow::Result<bool> {
    let updated = tx
        .execute(
            "UPDATE discount_codes SET redeemed_at = now(), conversion_id = $2 WHERE id = $1 AND redeemed_at IS NULL",
            &[&code_id, &conversion_id],
        )
        .await
        .context("failed to mark a discount code redeemed")?;
    if updated > 0 {
        metrics::counter!("leadflow_scheduler_codes_redeemed_total").increment(1);
    }
    Ok(updated > 0)
}

/// A pool file read line by line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PoolFile {
    /// (line number, code), in file order.
    pub codes: Vec<(usize, String)>,
    /// (line number, why), for lines that are not a usable code.
    pub rejected: Vec<(usize, String)>,
    /// Blank lines, `#` comments and a CSV header.
    pub skipped: usize,
}

/// Reads a pool file: one code per line, or the first column of a CSV (a header naming `code`, `coupon` or
/// `discount_code` is skipped). Blank lines and lines starting with `#` are skipped. A code with whitespace inside,
/// longer than 64 characters, or a repeat of an earlier line is rejected with its line number.
pub fn parse_pool(text: &str) -> PoolFile {
    let mut out = PoolFile::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            out.skipped += 1;
            continue;
        }
        let first = line.split([',', ';', '\t']).next().unwrap_or_default().trim();
        let code = first
            .strip_prefix('"')
            .and_then(|c| c.strip_suffix('"'))
            .unwrap_or(first)
            .trim();
        if out.codes.is_empty()
            && out.rejected.is_empty()
            && ["code", "coupon", "discount_code", "codes"].contains(&code.to_ascii_lowercase().as_str())
        {
            out.skipped += 1;
            continue;
        }
        let problem = if code.is_empty() {
            Some("no code in the first column".to_string())
        } else if code.chars().any(char::is_whitespace) {
            Some(format!("{code:?} has spaces inside"))
        } else if code.chars().any(char::is_control) {
            Some("control characters in the code".to_string())
        } else if code.chars().count() > MAX_CODE_LENGTH {
            Some(format!("longer than {MAX_CODE_LENGTH} characters"))
        } else {
            seen.get(code).map(|earlier| format!("{code:?} repeats line {earlier}"))
        };
        match problem {
            Some(why) => out.rejected.push((number, why)),
            None => {
                seen.insert(code.to_string(), number);
                out.codes.push((number, code.to_string()));
            }
        }
    }
    out
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub campaign: String,
    pub variant: String,
    pub step: i16,
    /// New codes in the pool.
    pub imported: usize,
    /// Codes already in this pool (an import run again): left as they are.
    pub already_there: usize,
    /// (line number, why) of every line not imported.
    pub rejected: Vec<(usize, String)>,
    /// Blank lines, comments and a CSV header.
    pub skipped: usize,
    /// A word of warning (the step does not draw from its pool yet).
    pub note: Option<String>,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (line, why) in &self.rejected {
            writeln!(f, "line {line}: {why}")?;
        }
        if let Some(note) = &self.note {
            writeln!(f, "note: {note}")?;
        }
        writeln!(
            f,
            "{} imported into {} variant {} step {}; {} already there, {} rejected, {} skipped",
            self.imported,
            self.campaign,
            self.variant,
            self.step,
            self.already_there,
            self.rejected.len(),
            self.skipped
        )
    }
}

/// Adds the codes of a pool file to the pool of a campaign's step, in file order (the order they are drawn in).
/// Bad lines are reported and the good ones imported all the same; a code that exists elsewhere (another pool,
/// or a generated code) is rejected, one already in this pool is left as it is.
pub async fn import(
    client: &impl GenericClient,
    campaign: &str,
    variant: &str,
    step: i16,
    text: &str,
) -> anyhow::Result<ImportReport> {
    let campaign_id: i64 = client
        .query_opt("SELECT id FROM campaigns WHERE name = $1", &[&campaign])
        .await
        .context("failed to look up the campaign")?
        .ok_or_else(|| anyhow::anyhow!("no campaign named {campaign:?}"))?
        .try_get(0)?;
    let source: Option<String> = client
        .query_opt(
            "SELECT code_source FROM campaign_steps WHERE campaign_id = $1 AND variant = $2 AND step = $3",
            &[&campaign_id, &variant, &step],
        )
        .await
        .context("failed to look up the campaign step")?
        .ok_or_else(|| anyhow::anyhow!("campaign {campaign:?} has no step {step} in variant {variant:?}"))?
        .try_get(0)?;
    let file = parse_pool(text);
    let mut report = ImportReport {
        campaign: campaign.to_string(),
        variant: variant.to_string(),
        step,
        rejected: file.rejected,
        skipped: file.skipped,
        note: (source.as_deref() != Some("pool"))
            .then(|| format!("step {step} does not draw from a pool yet: set `code: pool` on it")),
        ..ImportReport::default()
    };
    let codes: Vec<&str> = file.codes.iter().map(|(_, c)| c.as_str()).collect();
    let inserted: BTreeSet<String> = client
        .query(
            "INSERT INTO discount_codes (campaign_id, variant, step, code, source)
             SELECT $1, $2, $3, u.code, 'pool' FROM unnest($4::text[]) WITH ORDINALITY AS u(code, n) ORDER BY u.n
             ON CONFLICT (code) DO NOTHING
             RETURNING code",
            &[&campaign_id, &variant, &step, &codes],
        )
        .await
        .context("failed to store the codes")?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    report.imported = inserted.len();
    let clashes: Vec<&str> = codes.iter().copied().filter(|c| !inserted.contains(*c)).collect();
    if !clashes.is_empty() {
        let here: BTreeSet<String> = client
            .query(
                "SELECT code FROM discount_codes
                  WHERE code = ANY($1) AND campaign_id = $2 AND variant = $3 AND step = $4 AND source = 'pool'",
                &[&clashes, &campaign_id, &variant, &step],
            )
            .await
            .context("failed to look up codes already stored")?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        for (line, code) in &file.codes {
            if inserted.contains(code) {
                continue;
            }
            if here.contains(code) {
                report.already_there += 1;
            } else {
                report.rejected.push((
                    *line,
                    format!("{code:?} is already used by another campaign, step or lead"),
                ));
            }
        }
        report.rejected.sort();
    }
    Ok(report)
}

/// The codes of one step of a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepCodes {
    pub variant: String,
    pub step: i16,
    /// `generated`, `pool`, or none (the step gives no code; or it no longer exists).
    pub source: Option<String>,
    /// Pool codes not given to anyone yet.
    pub free: i64,
    /// Given to a lead, not redeemed.
    pub assigned: i64,
    pub redeemed: i64,
}

/// Free, assigned and redeemed codes per step of a campaign.
pub async fn list(client: &impl GenericClient, campaign: &str) -> anyhow::Result<Vec<StepCodes>> {
    let campaign_id: i64 = client
        .query_opt("SELECT id FROM campaigns WHERE name = $1", &[&campaign])
        .await
        .context("failed to look up the campaign")?
        .ok_or_else(|| anyhow::anyhow!("no campaign named {campaign:?}"))?
        .try_get(0)?;
    let rows = client
        .query(
            "SELECT k.variant, k.step, s.code_source,
                    count(c.id) FILTER (WHERE c.assigned_at IS NULL),
                    count(c.id) FILTER (WHERE c.assigned_at IS NOT NULL AND c.redeemed_at IS NULL),
                    count(c.id) FILTER (WHERE c.redeemed_at IS NOT NULL)
               FROM (SELECT variant, step FROM campaign_steps WHERE campaign_id = $1
                     UNION SELECT variant, step FROM discount_codes WHERE campaign_id = $1) AS k
               LEFT JOIN campaign_steps s ON s.campaign_id = $1 AND s.variant = k.variant AND s.step = k.step
               LEFT JOIN discount_codes c ON c.campaign_id = $1 AND c.variant = k.variant AND c.step = k.step
              GROUP BY k.variant, k.step, s.code_source
              ORDER BY k.variant, k.step",
            &[&campaign_id],
        )
        .await
        .context("failed to count discount codes")?;
    rows.iter()
        .map(|r| {
            Ok(StepCodes {
                variant: r.try_get(0)?,
                step: r.try_get(1)?,
                source: r.try_get(2)?,
                free: r.try_get(3)?,
                assigned: r.try_get(4)?,
                redeemed: r.try_get(5)?,
            })
        })
        .collect()
}

/// The listing as a table.
pub fn table(rows: &[StepCodes]) -> String {
    let mut out = format!(
        "{:<8} {:>4}  {:<10} {:>8} {:>8} {:>8}\n",
        "variant", "step", "source", "free", "assigned", "redeemed"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<8} {:>4}  {:<10} {:>8} {:>8} {:>8}",
            r.variant,
            r.step,
            r.source.as_deref().unwrap_or("-"),
            r.free,
            r.assigned,
            r.redeemed
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_codes_use_the_prefix_and_an_unambiguous_alphabet() {
        let codes: BTreeSet<String> = (0..2000).map(|_| generate()).collect();
        assert_eq!(codes.len(), 2000, "generated codes repeat");
        for code in &codes {
            assert_eq!(code.len(), 13, "{code}");
            let rest = code
                .strip_prefix("LF-")
                .unwrap_or_else(|| panic!("{code} lacks the prefix"));
            assert!(rest.bytes().all(|b| ALPHABET.contains(&b)), "{code}");
            assert!(!rest.contains(['0', 'O', '1', 'I']), "{code}");
        }
    }

    #[test]
    fn a_pool_file_is_read_line_by_line_with_bad_lines_named() {
        let text = "# spring pool\ncode,value\nSPRING-1,10\n\n\"SPRING-2\",10\nSPR ING\nSPRING-1\r\n  SPRING-3  \n"
            .to_string()
            + &"X".repeat(65)
            + "\nSPRING-4;x\n";
        let file = parse_pool(&text);
        assert_eq!(
            file.codes,
            vec![
                (3, "SPRING-1".to_string()),
                (5, "SPRING-2".to_string()),
                (8, "SPRING-3".to_string()),
                (10, "SPRING-4".to_string()),
            ]
        );
        let lines: Vec<usize> = file.rejected.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![6, 7, 9], "{:?}", file.rejected);
        assert!(file.rejected[0].1.contains("spaces"), "{:?}", file.rejected);
        assert!(file.rejected[1].1.contains("repeats line 3"), "{:?}", file.rejected);
        assert!(file.rejected[2].1.contains("64"), "{:?}", file.rejected);
        assert_eq!(file.skipped, 3, "comment, header and blank line");
    }

    #[test]
    fn a_header_is_only_skipped_on_top() {
        let file = parse_pool("A1\ncode\n");
        assert_eq!(file.codes.len(), 2);
        assert_eq!(file.skipped, 0);
    }

    #[test]
    fn an_order_names_its_code_under_any_of_three_keys() {
        use serde_json::json;
        assert_eq!(
            code_of_order(&json!({"discount_code": " LF-ABC "})).as_deref(),
            Some("LF-ABC")
        );
        assert_eq!(code_of_order(&json!({"code": "X1"})).as_deref(), Some("X1"));
        assert_eq!(
            code_of_order(&json!({"coupon": "C9", "code": ""})).as_deref(),
            Some("C9")
        );
        assert_eq!(code_of_order(&json!({"coupon": 5})), None);
        assert_eq!(code_of_order(&json!({"code": "Y".repeat(65)})), None);
        assert_eq!(code_of_order(&json!({})), None);
    }
}
