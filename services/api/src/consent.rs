//! Consent as a library: the suppression list (list, add, remove with a reason, import), a lead's data as JSON
//! (export) and erasure. The admin API ([`crate::suppressions`]) and the `leadflow` command line both call these.
//!
//! Every change runs in one transaction; suppressing ends the address's open sequences at once and queues the
//! instant lead notifications of the campaigns whose sequences ended.

use std::fmt;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use leadflow_scheduler::notify;
use leadflow_shared::domain::EmailAddress;
use leadflow_shared::http::Problem;
use leadflow_shared::suppression::{self, Reason};

use crate::problem;

/// Entries listed per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most entries one page holds.
pub const MAX_LIMIT: i64 = 1000;
/// The longest note kept with an entry.
pub const MAX_NOTE_CHARS: usize = 500;

/// Why a consent operation did not happen.
#[derive(Debug)]
pub enum ConsentError {
    /// A value the caller gave is not acceptable; `field` names it.
    Invalid { field: String, detail: String },
    /// Nothing matches (no such lead, no such suppression).
    NotFound(String),
    /// The database failed.
    Database(anyhow::Error),
}

impl ConsentError {
    pub fn invalid(field: &str, detail: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_string(),
            detail: detail.into(),
        }
    }

    /// The problem+json answer: 400 naming the field, 404, or 500 without internals.
    pub fn into_problem(self, what: &str) -> Problem {
        match self {
            Self::Invalid { field, detail } => Problem::invalid_field(field, detail),
            Self::NotFound(detail) => problem::not_found(detail),
            Self::Database(e) => problem::internal(what, e),
        }
    }
}

impl fmt::Display for ConsentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid { field, detail } => write!(f, "{field}: {detail}"),
            Self::NotFound(detail) => f.write_str(detail),
            Self::Database(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ConsentError {}

impl From<anyhow::Error> for ConsentError {
    fn from(e: anyhow::Error) -> Self {
        Self::Database(e)
    }
}

impl From<tokio_postgres::Error> for ConsentError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Database(e.into())
    }
}

/// Parses an address given in `field`.
pub fn parse_email(field: &str, raw: &str) -> Result<EmailAddress, ConsentError> {
    EmailAddress::parse(raw).map_err(|e| ConsentError::invalid(field, e.0))
}

/// The reasons an administrator may give a suppression (`erased` is set by erasure only).
pub fn parse_reason(field: &str, raw: &str) -> Result<Reason, ConsentError> {
    match Reason::parse(raw.trim()) {
        Some(Reason::Erased) | None => Err(ConsentError::invalid(
            field,
            format!("unknown reason {raw:?}: expected manual, bounced, complained, unsubscribed or suspended"),
        )),
        Some(reason) => Ok(reason),
    }
}

fn check_note(field: &str, note: Option<&str>) -> Result<Option<String>, ConsentError> {
    let Some(note) = note.map(str::trim).filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    if note.chars().count() > MAX_NOTE_CHARS {
        return Err(ConsentError::invalid(
            field,
            format!("at most {MAX_NOTE_CHARS} characters"),
        ));
    }
    if note.chars().any(char::is_control) {
        return Err(ConsentError::invalid(
            field,
            "must be one line without control characters",
        ));
    }
    Ok(Some(note.to_string()))
}

/// The id of the campaign named `name` (given in `field`).
async fn campaign_id(client: &impl GenericClient, field: &str, name: &str) -> Result<i64, ConsentError> {
    let row = client
        .query_opt("SELECT id FROM campaigns WHERE name = $1", &[&name.trim()])
        .await?;
    row.map(|r| r.get(0))
        .ok_or_else(|| ConsentError::invalid(field, format!("no campaign named {:?}", name.trim())))
}

async fn optional_campaign_id(
    client: &impl GenericClient,
    field: &str,
    name: Option<&str>,
) -> Result<Option<i64>, ConsentError> {
    match name.map(str::trim).filter(|n| !n.is_empty()) {
        Some(name) => Ok(Some(campaign_id(client, field, name).await?)),
        None => Ok(None),
    }
}

/// One entry of the suppression list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SuppressionEntry {
    pub id: i64,
    /// The address; `null` once the lead was erased (only the hash is kept).
    pub email: Option<String>,
    /// Hex SHA-256 of the normalised address.
    pub email_hash: String,
    /// The campaign the entry is limited to; `null`: every campaign.
    pub campaign: Option<String>,
    pub reason: String,
    pub source: String,
    pub note: Option<String>,
    pub created_at: DateTime<Utc>,
}

const ENTRY_COLUMNS: &str = "s.id, s.email, s.email_hash, c.name, s.reason, s.source, s.note, s.created_at";

fn entry_of(row: &tokio_postgres::Row) -> Result<SuppressionEntry, tokio_postgres::Error> {
    Ok(SuppressionEntry {
        id: row.try_get(0)?,
        email: row.try_get(1)?,
        email_hash: row.try_get(2)?,
        campaign: row.try_get(3)?,
        reason: row.try_get(4)?,
        source: row.try_get(5)?,
        note: row.try_get(6)?,
        created_at: row.try_get(7)?,
    })
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct SuppressionFilter {
    /// An address (or the 64-digit hex hash of one, to find an erased entry).
    pub email: Option<String>,
    pub reason: Option<String>,
    pub limit: Option<i64>,
    /// The `id` of the last entry of the previous page.
    pub after: Option<i64>,
}

/// One page of the list, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct SuppressionPage {
    pub items: Vec<SuppressionEntry>,
    /// Pass as `after` for the next page; `null` on the last one.
    pub next_after: Option<i64>,
}

fn is_hash(raw: &str) -> bool {
    raw.len() == 64 && raw.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Lists suppressions, newest first, `limit` per page.
pub async fn list(client: &impl GenericClient, filter: &SuppressionFilter) -> Result<SuppressionPage, ConsentError> {
    let hash = match filter.email.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
        Some(raw) if is_hash(raw) => Some(raw.to_ascii_lowercase()),
        Some(raw) => Some(suppression::email_hash(&parse_email("email", raw)?)),
        None => None,
    };
    let reason = match filter.reason.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
        Some(raw) => Some(
            Reason::parse(raw)
                .ok_or_else(|| {
                    ConsentError::invalid(
                        "reason",
                        format!(
                            "unknown reason {raw:?}: expected manual, bounced, complained, unsubscribed, suspended or \
                             erased"
                        ),
                    )
                })?
                .as_str(),
        ),
        None => None,
    };
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ConsentError::invalid("limit", format!("must be 1 to {MAX_LIMIT}")));
    }
    if filter.after.is_some_and(|a| a < 1) {
        return Err(ConsentError::invalid("after", "must be the id of an entry"));
    }
    let rows = client
        .query(
            &format!(
                "SELECT {ENTRY_COLUMNS} FROM suppressions s LEFT JOIN campaigns c ON c.id = s.campaign_id
                 WHERE ($1::text IS NULL OR s.email_hash = $1)
                   AND ($2::text IS NULL OR s.reason = $2)
                   AND ($3::bigint IS NULL OR s.id < $3)
                 ORDER BY s.id DESC LIMIT $4"
            ),
            &[&hash, &reason, &filter.after, &(limit + 1)],
        )
        .await?;
    let mut items = rows.iter().map(entry_of).collect::<Result<Vec<_>, _>>()?;
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_after = if more { items.last().map(|e| e.id) } else { None };
    Ok(SuppressionPage { items, next_after })
}

/// A suppression to add, as the admin API takes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSuppression {
    pub email: Option<String>,
    /// manual | bounced | complained | unsubscribed | suspended
    pub reason: Option<String>,
    /// A campaign name: suppressed for that campaign only.
    pub campaign: Option<String>,
    pub note: Option<String>,
}

/// What adding a suppression did.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    /// False when the address was suppressed in that scope already (the entry is unchanged).
    pub new: bool,
    /// Sequences ended at once (their open follow-ups cancelled with the reason).
    pub ended_enrollments: usize,
    pub cancelled_deliveries: u64,
    pub entry: SuppressionEntry,
}

/// Suppresses an address in the caller's transaction, queueing notifications for the sequences it ends.
pub async fn suppress_in(
    tx: &impl GenericClient,
    email: &EmailAddress,
    reason: Reason,
    source: &str,
    campaign_id: Option<i64>,
    note: Option<&str>,
) -> anyhow::Result<suppression::Suppressed> {
    let done = suppression::suppress(tx, email, reason, source, campaign_id, note).await?;
    for id in &done.ended_enrollments {
        notify_ended(tx, reason, source, *id).await?;
    }
    Ok(done)
}

/// Queues the notification of a sequence a suppression ended (for campaigns that notify on it).
pub async fn notify_ended(
    tx: &impl GenericClient,
    reason: Reason,
    source: &str,
    enrollment: i64,
) -> anyhow::Result<()> {
    if let Some(kind) = notify::Kind::for_reason(reason.as_str()) {
        notify::enqueue(
            tx,
            notify::About::Enrollment(enrollment),
            kind,
            json!({ "reason": reason.as_str(), "source": source }),
        )
        .await?;
    }
    Ok(())
}

async fn entry(
    client: &impl GenericClient,
    email: &EmailAddress,
    campaign_id: Option<i64>,
) -> Result<SuppressionEntry, ConsentError> {
    let row = client
        .query_one(
            &format!(
                "SELECT {ENTRY_COLUMNS} FROM suppressions s LEFT JOIN campaigns c ON c.id = s.campaign_id
                 WHERE s.email_hash = $1 AND coalesce(s.campaign_id, 0) = coalesce($2::bigint, 0)"
            ),
            &[&suppression::email_hash(email), &campaign_id],
        )
        .await?;
    Ok(entry_of(&row)?)
}

/// Adds a suppression (`source`: `api`, `cli`, ...); works for addresses that are not leads.
pub async fn add(
    client: &mut deadpool_postgres::Client,
    request: &NewSuppression,
    source: &str,
) -> Result<Added, ConsentError> {
    let email = match request.email.as_deref() {
        Some(raw) => parse_email("email", raw)?,
        None => return Err(ConsentError::invalid("email", "required")),
    };
    let reason = match request.reason.as_deref() {
        Some(raw) => parse_reason("reason", raw)?,
        None => {
            return Err(ConsentError::invalid(
                "reason",
                "required: manual, bounced, complained, unsubscribed or suspended",
            ))
        }
    };
    let note = check_note("note", request.note.as_deref())?;
    let tx = client.transaction().await?;
    let campaign_id = optional_campaign_id(&tx, "campaign", request.campaign.as_deref()).await?;
    let done = suppress_in(&tx, &email, reason, source, campaign_id, note.as_deref()).await?;
    let entry = entry(&tx, &email, campaign_id).await?;
    tx.commit().await?;
    tracing::info!(
        email = %email.masked(),
        reason = reason.as_str(),
        source,
        campaign = ?request.campaign,
        new = done.new,
        "address suppressed"
    );
    Ok(Added {
        new: done.new,
        ended_enrollments: done.ended_enrollments.len(),
        cancelled_deliveries: done.cancelled_deliveries,
        entry,
    })
}

/// Lifts a suppression (a resubscription): `reason` is required and kept in `suppression_log` with `actor`.
/// Without `campaign` the global entry is removed (and a lead's own opt-out mark cleared); with it, that
/// campaign's entry.
pub async fn remove(
    client: &mut deadpool_postgres::Client,
    email: &str,
    campaign: Option<&str>,
    reason: Option<&str>,
    actor: &str,
) -> Result<(), ConsentError> {
    let email = parse_email("email", email)?;
    let reason = reason.map(str::trim).filter(|r| !r.is_empty()).ok_or_else(|| {
        ConsentError::invalid(
            "reason",
            "required: why the address may be mailed again (e.g. \"asked to resubscribe by email on 2024-05-02\")",
        )
    })?;
    let reason = check_note("reason", Some(reason))?.unwrap_or_default();
    let tx = client.transaction().await?;
    let campaign_id = optional_campaign_id(&tx, "campaign", campaign).await?;
    let mut removed = suppression::resubscribe(&tx, &email, campaign_id, &reason, actor).await?;
    if !removed && campaign_id.is_none() {
        // Opted out through an event only (lead.unsubscribed, ...): the mark is on the lead, not on the list.
        let cleared = tx
            .execute(
                "UPDATE leads SET suppressed_reason = NULL, suppressed_at = NULL
                 WHERE email = $1 AND suppressed_reason IS NOT NULL",
                &[&email.as_str()],
            )
            .await?;
        if cleared > 0 {
            tx.execute(
                "INSERT INTO suppression_log (email_hash, campaign_id, action, reason, actor)
                 VALUES ($1, NULL, 'resubscribed', $2, $3)",
                &[&suppression::email_hash(&email), &reason, &actor],
            )
            .await?;
            removed = true;
        }
    }
    if !removed {
        return Err(ConsentError::NotFound(match campaign {
            Some(c) => format!("the address is not suppressed for campaign {:?}", c.trim()),
            None => "the address is not suppressed".to_string(),
        }));
    }
    tx.commit().await?;
    tracing::info!(email = %email.masked(), actor, campaign = ?campaign, "address resubscribed");
    Ok(())
}

/// A line of an import that was not applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedLine {
    /// 1-based.
    pub line: usize,
    pub error: String,
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    /// New entries.
    pub added: usize,
    /// Addresses suppressed in that scope already.
    pub already: usize,
    pub ended_enrollments: usize,
    pub cancelled_deliveries: u64,
    pub rejected: Vec<RejectedLine>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} added, {} already suppressed, {} sequences ended ({} follow-ups cancelled), {} rejected",
            self.added,
            self.already,
            self.ended_enrollments,
            self.cancelled_deliveries,
            self.rejected.len()
        )?;
        for r in &self.rejected {
            writeln!(f, "line {}: {}", r.line, r.error)?;
        }
        Ok(())
    }
}

/// One field of a CSV line: trimmed, surrounding double quotes removed (`""` inside is a quote).
fn unquote(field: &str) -> String {
    let field = field.trim();
    match field.strip_prefix('"').and_then(|f| f.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => field.to_string(),
    }
}

/// A line of an import: `email[,reason[,note]]` (the note may contain commas).
fn parse_line(line: &str) -> Result<(EmailAddress, Reason, Option<String>), String> {
    let mut fields = line.splitn(3, ',');
    let email = unquote(fields.next().unwrap_or_default());
    let email = EmailAddress::parse(&email).map_err(|e| e.0)?;
    let reason = match fields.next().map(unquote).filter(|r| !r.is_empty()) {
        Some(raw) => parse_reason("reason", &raw).map_err(|e| e.to_string())?,
        None => Reason::Manual,
    };
    let note = fields.next().map(unquote);
    let note = check_note("note", note.as_deref()).map_err(|e| e.to_string())?;
    Ok((email, reason, note))
}

/// Imports `text` (`email[,reason[,note]]` per line; reason defaults to `manual`; blank lines, `#` comments and
/// a header line starting with `email` are skipped). Bad lines are reported by number; the good ones are applied
/// all the same, in one transaction.
pub async fn import(
    client: &mut deadpool_postgres::Client,
    text: &str,
    campaign: Option<&str>,
    source: &str,
) -> Result<ImportReport, ConsentError> {
    let mut report = ImportReport::default();
    let tx = client.transaction().await?;
    let campaign_id = optional_campaign_id(&tx, "campaign", campaign).await?;
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if number == 1 && unquote(line.split(',').next().unwrap_or_default()).eq_ignore_ascii_case("email") {
            continue;
        }
        match parse_line(line) {
            Ok((email, reason, note)) => {
                let done = suppress_in(&tx, &email, reason, source, campaign_id, note.as_deref()).await?;
                if done.new {
                    report.added += 1;
                } else {
                    report.already += 1;
                }
                report.ended_enrollments += done.ended_enrollments.len();
                report.cancelled_deliveries += done.cancelled_deliveries;
            }
            Err(error) => report.rejected.push(RejectedLine { line: number, error }),
        }
    }
    tx.commit().await?;
    tracing::info!(
        added = report.added,
        already = report.already,
        rejected = report.rejected.len(),
        source,
        "suppressions imported"
    );
    Ok(report)
}

/// Everything stored about an address, as JSON: `lead` (the profile, `null` when the address is not a lead),
/// `events`, `enrollments`, `deliveries` (each with its rendered `message`), `conversions`, `discount_codes`,
/// `notifications`, `inquiries`, `notes` (with their revisions), `changes`, `score_ledger`, `lists`, `suppressions`
/// and `suppression_log`.
pub async fn export(client: &impl GenericClient, email: &str) -> Result<Value, ConsentError> {
    let email = parse_email("email", email)?;
    let hash = suppression::email_hash(&email);
    let lead: Option<Value> = client
        .query_opt("SELECT to_jsonb(l) FROM leads l WHERE l.email = $1", &[&email.as_str()])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    let lead_id: Option<i64> = lead.as_ref().and_then(|l| l.get("id")).and_then(Value::as_i64);
    let suppressions: Value = client
        .query_one(
            "SELECT coalesce(jsonb_agg(to_jsonb(s) - 'campaign_id' || jsonb_build_object('campaign', c.name)
                                       ORDER BY s.id), '[]'::jsonb)
             FROM suppressions s LEFT JOIN campaigns c ON c.id = s.campaign_id WHERE s.email_hash = $1",
            &[&hash],
        )
        .await?
        .try_get(0)?;
    let log: Value = client
        .query_one(
            "SELECT coalesce(jsonb_agg(to_jsonb(g) - 'email_hash' ORDER BY g.id), '[]'::jsonb)
             FROM suppression_log g WHERE g.email_hash = $1",
            &[&hash],
        )
        .await?
        .try_get(0)?;
    if lead.is_none() && suppressions.as_array().is_none_or(|a| a.is_empty()) {
        return Err(ConsentError::NotFound(
            "no lead and no suppression with that address".to_string(),
        ));
    }
    let mut out = json!({
        "email": email.as_str(),
        "email_hash": hash,
        "exported_at": Utc::now(),
        "lead": lead,
        "events": [],
        "enrollments": [],
        "deliveries": [],
        "conversions": [],
        "discount_codes": [],
        "notifications": [],
        "suppressions": suppressions,
        "suppression_log": log,
    });
    if let Some(lead_id) = lead_id {
        let parts: [(&str, &str); 11] = [
            (
                "events",
                "SELECT coalesce(jsonb_agg(to_jsonb(e) - 'lead_id' ORDER BY e.occurred_at, e.id), '[]'::jsonb)
                 FROM events e WHERE e.lead_id = $1",
            ),
            (
                "enrollments",
                "SELECT coalesce(jsonb_agg(to_jsonb(e) - 'lead_id' || jsonb_build_object('campaign', c.name)
                                           ORDER BY e.id), '[]'::jsonb)
                 FROM enrollments e JOIN campaigns c ON c.id = e.campaign_id WHERE e.lead_id = $1",
            ),
            (
                "deliveries",
                "SELECT coalesce(jsonb_agg(to_jsonb(d) - 'lead_id'
                                           || jsonb_build_object('campaign', c.name,
                                                                 'message', to_jsonb(m) - 'delivery_id')
                                           ORDER BY d.id), '[]'::jsonb)
                 FROM deliveries d JOIN campaigns c ON c.id = d.campaign_id
                 LEFT JOIN rendered_messages m ON m.delivery_id = d.id
                 WHERE d.lead_id = $1",
            ),
            (
                "conversions",
                "SELECT coalesce(jsonb_agg(to_jsonb(v) - 'lead_id' ORDER BY v.id), '[]'::jsonb)
                 FROM conversions v WHERE v.lead_id = $1",
            ),
            (
                "discount_codes",
                "SELECT coalesce(jsonb_agg(to_jsonb(k) - 'lead_id' ORDER BY k.id), '[]'::jsonb)
                 FROM discount_codes k WHERE k.lead_id = $1",
            ),
            (
                "notifications",
                "SELECT coalesce(jsonb_agg(to_jsonb(n) - 'lead_id' - 'last_error' ORDER BY n.id), '[]'::jsonb)
                 FROM notifications n WHERE n.lead_id = $1",
            ),
            (
                "inquiries",
                "SELECT coalesce(jsonb_agg(to_jsonb(i) - 'lead_id' ORDER BY i.id), '[]'::jsonb)
                 FROM inquiries i WHERE i.lead_id = $1",
            ),
            (
                "notes",
                "SELECT coalesce(jsonb_agg(to_jsonb(n) - 'lead_id'
                                           || jsonb_build_object('revisions',
                                                (SELECT coalesce(jsonb_agg(to_jsonb(r) - 'note_id' ORDER BY r.id),
                                                                 '[]'::jsonb)
                                                   FROM lead_note_revisions r WHERE r.note_id = n.id))
                                           ORDER BY n.id), '[]'::jsonb)
                 FROM lead_notes n WHERE n.lead_id = $1",
            ),
            (
                "changes",
                "SELECT coalesce(jsonb_agg(to_jsonb(c) - 'lead_id' ORDER BY c.id), '[]'::jsonb)
                 FROM lead_changes c WHERE c.lead_id = $1",
            ),
            (
                "score_ledger",
                "SELECT coalesce(jsonb_agg(to_jsonb(s) - 'lead_id' ORDER BY s.id), '[]'::jsonb)
                 FROM score_ledger s WHERE s.lead_id = $1",
            ),
            (
                "lists",
                "SELECT coalesce(jsonb_agg(jsonb_build_object('list', l.name, 'added_at', m.added_at)
                                           ORDER BY l.name), '[]'::jsonb)
                 FROM lead_list_members m JOIN lead_lists l ON l.id = m.list_id WHERE m.lead_id = $1",
            ),
        ];
        for (key, sql) in parts {
            let value: Value = client.query_one(sql, &[&lead_id]).await?.try_get(0)?;
            out[key] = value;
        }
    }
    Ok(out)
}

/// What erasing an address removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Erased {
    /// The hash the suppression entry keeps.
    pub email_hash: String,
    /// Whether the address was a lead.
    pub lead_deleted: bool,
    pub events: i64,
    pub enrollments: i64,
    pub deliveries: i64,
    pub conversions: i64,
    pub notifications: u64,
    pub inbound_reports: u64,
}

/// Erases an address: deletes the lead with its events, enrollments, deliveries, rendered messages and
/// conversions (discount codes and notifications lose their link to it; notifications, which carry the address,
/// are deleted), its soft-bounce records and the inbound reports that name it; then keeps a global suppression
/// with reason `erased`, source `erasure`, and the hash only, so the address is never enrolled or mailed again.
/// Suppression entries of the address keep their hash and lose the address and note.
pub async fn erase(client: &mut deadpool_postgres::Client, email: &str, actor: &str) -> Result<Erased, ConsentError> {
    let email = parse_email("email", email)?;
    let hash = suppression::email_hash(&email);
    let tx = client.transaction().await?;
    let mut erased = Erased {
        email_hash: hash.clone(),
        ..Erased::default()
    };
    let lead = tx
        .query_opt("SELECT id FROM leads WHERE email = $1 FOR UPDATE", &[&email.as_str()])
        .await?;
    if let Some(lead) = lead {
        let lead_id: i64 = lead.try_get(0)?;
        let counts = tx
            .query_one(
                "SELECT (SELECT count(*) FROM events WHERE lead_id = $1),
                        (SELECT count(*) FROM enrollments WHERE lead_id = $1),
                        (SELECT count(*) FROM deliveries WHERE lead_id = $1),
                        (SELECT count(*) FROM conversions WHERE lead_id = $1)",
                &[&lead_id],
            )
            .await?;
        erased.events = counts.try_get(0)?;
        erased.enrollments = counts.try_get(1)?;
        erased.deliveries = counts.try_get(2)?;
        erased.conversions = counts.try_get(3)?;
        erased.notifications = tx
            .execute("DELETE FROM notifications WHERE lead_id = $1", &[&lead_id])
            .await?;
        // Events, enrollments, deliveries (and their rendered messages) and conversions go with the lead.
        tx.execute("DELETE FROM leads WHERE id = $1", &[&lead_id]).await?;
        erased.lead_deleted = true;
    }
    tx.execute("DELETE FROM soft_bounces WHERE email_hash = $1", &[&hash])
        .await?;
    erased.inbound_reports = tx
        .execute(
            "DELETE FROM inbound_reports WHERE strpos(lower(encode(raw, 'escape')), $1) > 0",
            &[&email.as_str()],
        )
        .await?;
    tx.execute(
        "UPDATE suppressions SET email = NULL, note = NULL WHERE email_hash = $1",
        &[&hash],
    )
    .await?;
    tx.execute(
        "INSERT INTO suppressions (email_hash, email, campaign_id, reason, source, note)
         VALUES ($1, NULL, NULL, 'erased', 'erasure', NULL)
         ON CONFLICT (email_hash, coalesce(campaign_id, 0))
         DO UPDATE SET reason = 'erased', source = 'erasure', email = NULL, note = NULL",
        &[&hash],
    )
    .await?;
    tx.execute(
        "INSERT INTO suppression_log (email_hash, campaign_id, action, reason, actor)
         VALUES ($1, NULL, 'suppressed', 'erased', $2)",
        &[&hash, &actor],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(
        email = %email.masked(),
        actor,
        lead_deleted = erased.lead_deleted,
        events = erased.events,
        deliveries = erased.deliveries,
        "address erased"
    );
    Ok(erased)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_line_has_an_email_an_optional_reason_and_note() {
        let (email, reason, note) = parse_line("Ann@Example.com").unwrap();
        assert_eq!(email.as_str(), "ann@example.com");
        assert_eq!(reason, Reason::Manual);
        assert_eq!(note, None);
        let (_, reason, note) = parse_line("bob@example.com, bounced ,\"mailbox gone, says the MTA\"").unwrap();
        assert_eq!(reason, Reason::Bounced);
        assert_eq!(note.as_deref(), Some("mailbox gone, says the MTA"));
        let (_, reason, note) = parse_line("cy@example.com,,kept").unwrap();
        assert_eq!(reason, Reason::Manual);
        assert_eq!(note.as_deref(), Some("kept"));
    }

    #[test]
    fn a_bad_import_line_says_why() {
        assert!(parse_line("not-an-address").unwrap_err().contains("@"));
        assert!(parse_line("ann@example.com,whatever").unwrap_err().contains("reason"));
        assert!(parse_line("ann@example.com,erased").unwrap_err().contains("reason"));
    }

    #[test]
    fn only_administrator_reasons_are_accepted() {
        assert_eq!(parse_reason("reason", "unsubscribed").unwrap(), Reason::Unsubscribed);
        assert_eq!(parse_reason("reason", " manual ").unwrap(), Reason::Manual);
        let err = parse_reason("reason", "erased").unwrap_err();
        assert!(
            matches!(err, ConsentError::Invalid { ref field, .. } if field == "reason"),
            "{err:?}"
        );
    }

    #[test]
    fn a_hash_is_64_hex_digits() {
        assert!(is_hash(&"a".repeat(64)));
        assert!(!is_hash(&"g".repeat(64)));
        assert!(!is_hash("ann@example.com"));
    }
}
