//! Lead scoring: rules give points for events and attribute conditions, every change is written to the ledger,
//! scores decay with a half-life, and thresholds make a lead hot, warm or cold.
//!
//! - An event rule (`event_type`: `trial.started`, or a prefix such as `engagement.*`) gives its points once per
//!   event, when the scheduler handles the event ([`EventScoring::apply_event`], in the event's transaction). A
//!   unique index on the ledger's (event, rule) makes a redelivered event count once.
//! - An attribute rule (`condition`: `{"field": "company_size", "op": "eq", "value": "51-200"}`) is level-based:
//!   the lead holds its points while the condition holds and loses them when it stops holding. `lead_rule_state`
//!   records what each lead holds; [`rescore_lead`] re-evaluates one lead after a profile change and
//!   [`recompute_all`] every lead after the rules changed.
//! - A rule with both only counts the event when the lead matches the condition.
//! - The score is stored as of `score_at`; every change first decays it to now (a `decay` ledger row when the
//!   change is material) and [`decay_once`] sweeps all scores periodically. Time is a parameter so tests need not
//!   wait.
//! - Crossing the hot threshold from below stores a `lead.hot` event on the lead's timeline, queues `lead.hot` for
//!   the `<ns>.lead-events` exchange ([`crate::lead_events`], an outbox published after the commit) and the instant
//!   lead notification (`lead_hot`) for every campaign with a `notify_url` the lead is enrolled in.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use leadflow_shared::domain::EventType;
use leadflow_shared::service::Context;
use leadflow_shared::settings::{self, Scoring};

use crate::{lead_events, notify};

/// Points a rule may give (or take).
pub const MAX_POINTS: f64 = 100.0;
/// A decay smaller than this is not written down (the score keeps decaying from its `score_at`).
pub const MATERIAL: f64 = 0.01;
/// How often the scheduler decays scores.
pub const DECAY_EVERY: Duration = Duration::from_secs(60);
/// Leads decayed or recomputed per transaction.
pub const BATCH: i64 = 500;

/// How an attribute condition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Eq,
    Ne,
    In,
    Contains,
    Gt,
    Lt,
    Exists,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eq => "eq",
            Self::Ne => "ne",
            Self::In => "in",
            Self::Contains => "contains",
            Self::Gt => "gt",
            Self::Lt => "lt",
            Self::Exists => "exists",
        }
    }
}

/// A condition on one profile field: a column of `leads` (`country`, `company_size`, `tags`, ...), a custom field
/// (`custom.plan`) or an attribute sent with events (`attributes.plan`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub field: String,
    pub op: Op,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub value: Value,
}

/// A rule as written by a user (API body or `leadflow apply -f`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<Condition>,
    pub points: f64,
    #[serde(default = "active_by_default")]
    pub active: bool,
}

fn active_by_default() -> bool {
    true
}

/// What is wrong with a rule, naming the field (`points`, `condition.op`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct RuleError {
    pub field: String,
    pub detail: String,
}

impl RuleError {
    fn new(field: &str, detail: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            detail: detail.into(),
        }
    }
}

/// Columns a condition may not use: the score itself (a rule on it would feed on itself) and internals.
const NOT_CONDITIONS: &[&str] = &[
    "score",
    "score_at",
    "temperature",
    "custom",
    "attributes",
    "suppressed_at",
];

impl RuleSpec {
    /// Checks what can be checked without the database (see [`check_field_exists`] for the rest).
    pub fn validate(&self) -> Result<(), RuleError> {
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 100 || name != self.name {
            return Err(RuleError::new(
                "name",
                "must be 1 to 100 characters without leading or trailing spaces",
            ));
        }
        if name.contains('/') || name.chars().any(char::is_control) {
            return Err(RuleError::new("name", "must not contain '/' or control characters"));
        }
        if !self.points.is_finite() || self.points.abs() > MAX_POINTS {
            return Err(RuleError::new(
                "points",
                format!(
                    "must be from -{MAX_POINTS} to {MAX_POINTS} (most important 10-15, very important 5-9, valid 1-4, \
                     negative criteria below 0); got {}",
                    self.points
                ),
            ));
        }
        if self.event_type.is_none() && self.condition.is_none() {
            return Err(RuleError::new(
                "event_type",
                "a rule needs an event_type (e.g. trial.started, engagement.*) or a condition, or both",
            ));
        }
        if let Some(event_type) = &self.event_type {
            check_event_type(event_type)?;
        }
        if let Some(condition) = &self.condition {
            condition.validate()?;
        }
        Ok(())
    }
}

/// An event type the pipeline knows, or a prefix ending in `.*` (`engagement.*`, `order.*`).
fn check_event_type(raw: &str) -> Result<(), RuleError> {
    if let Some(prefix) = raw.strip_suffix(".*") {
        let valid = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .split('.')
                .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        if valid {
            return Ok(());
        }
    } else if EventType::parse(raw).is_ok() {
        return Ok(());
    }
    Err(RuleError::new(
        "event_type",
        format!(
            "{raw:?} is neither an event type (lead.captured, checkout.abandoned, order.unfinished, trial.started, \
             renewal.due, order.completed, engagement.<what>, ...) nor a prefix such as engagement.*"
        ),
    ))
}

impl Condition {
    fn validate(&self) -> Result<(), RuleError> {
        let field = self.field.as_str();
        let (head, rest) = match field.split_once('.') {
            Some((head, rest)) => (head, Some(rest)),
            None => (field, None),
        };
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.starts_with(|c: char| c.is_ascii_lowercase())
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        let valid = match rest {
            Some(name) => matches!(head, "custom" | "attributes") && word(name),
            None => word(head) && !NOT_CONDITIONS.contains(&head),
        };
        if !valid {
            return Err(RuleError::new(
                "condition.field",
                format!("{field:?} is not a profile field (e.g. country, company_size, tags, custom.plan)"),
            ));
        }
        let scalar = |v: &Value| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_));
        let ok = match self.op {
            Op::Eq | Op::Ne | Op::Contains => scalar(&self.value),
            Op::In => self
                .value
                .as_array()
                .is_some_and(|items| !items.is_empty() && items.iter().all(scalar)),
            Op::Gt | Op::Lt => self.value.is_number() || self.value.is_string(),
            Op::Exists => self.value.is_null() || self.value.is_boolean(),
        };
        if !ok {
            let expected = match self.op {
                Op::Eq | Op::Ne | Op::Contains => "a string, number or boolean",
                Op::In => "a non-empty list of strings, numbers or booleans",
                Op::Gt | Op::Lt => "a number (or a date as text)",
                Op::Exists => "nothing, or true / false",
            };
            return Err(RuleError::new(
                "condition.value",
                format!("op {} takes {expected}", self.op.as_str()),
            ));
        }
        Ok(())
    }

    /// Whether `lead` (the row as JSON: `to_jsonb(leads)`) meets the condition. Text compares without regard to
    /// case; a list field (tags, phones) matches when one of its items does.
    pub fn holds(&self, lead: &Value) -> bool {
        let actual = match self.field.split_once('.') {
            Some((head, name)) => lead.get(head).and_then(|v| v.get(name)),
            None => lead.get(&self.field),
        }
        .unwrap_or(&Value::Null);
        let present = match actual {
            Value::Null => false,
            Value::String(s) => !s.is_empty(),
            Value::Array(items) => !items.is_empty(),
            _ => true,
        };
        let items: Vec<&Value> = match actual {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        let any = |f: &dyn Fn(&Value) -> bool| items.iter().any(|v| f(v));
        match self.op {
            Op::Exists => present == self.value.as_bool().unwrap_or(true),
            Op::Eq => any(&|v| same(v, &self.value)),
            Op::Ne => !any(&|v| same(v, &self.value)),
            Op::In => self
                .value
                .as_array()
                .is_some_and(|wanted| wanted.iter().any(|w| any(&|v| same(v, w)))),
            Op::Contains => any(&|v| match (v, &self.value) {
                (Value::String(have), wanted) => text(wanted).is_some_and(|w| have.to_lowercase().contains(&w)),
                (have, wanted) => same(have, wanted),
            }),
            Op::Gt => any(&|v| compare(v, &self.value) == Some(std::cmp::Ordering::Greater)),
            Op::Lt => any(&|v| compare(v, &self.value) == Some(std::cmp::Ordering::Less)),
        }
    }

    /// `company_size eq "51-200"`, for ledger reasons.
    pub fn describe(&self) -> String {
        if self.value.is_null() {
            format!("{} {}", self.field, self.op.as_str())
        } else {
            format!("{} {} {}", self.field, self.op.as_str(), self.value)
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_lowercase()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (number(a), number(b)) {
        (Some(x), Some(y)) if a.is_number() || b.is_number() => x == y,
        _ => matches!((text(a), text(b)), (Some(x), Some(y)) if x == y),
    }
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (number(a), number(b)) {
        (Some(x), Some(y)) => x.partial_cmp(&y),
        _ => match (a, b) {
            (Value::String(x), Value::String(y)) => Some(x.as_str().cmp(y.as_str())),
            _ => None,
        },
    }
}

/// A stored rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub event_type: Option<String>,
    pub condition: Option<Condition>,
    pub points: f64,
    pub active: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Rule {
    fn from_row(row: &tokio_postgres::Row) -> anyhow::Result<Self> {
        let condition: Option<Value> = row.try_get("condition")?;
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            event_type: row.try_get("event_type")?,
            condition: condition
                .map(serde_json::from_value)
                .transpose()
                .context("a stored scoring condition no longer reads")?,
            points: row.try_get("points")?,
            active: row.try_get("active")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }

    /// Whether an event of `event_type` counts for this rule (its condition aside).
    pub fn matches_event(&self, event_type: &str) -> bool {
        match self.event_type.as_deref() {
            Some(wanted) => match wanted.strip_suffix(".*") {
                Some(prefix) => event_type
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.')),
                None => wanted == event_type,
            },
            None => false,
        }
    }

    /// An attribute rule: a condition and no event.
    pub fn is_attribute_rule(&self) -> bool {
        self.event_type.is_none() && self.condition.is_some()
    }
}

const RULE_COLUMNS: &str = "id, name, event_type, condition, points, active, created_at, updated_at";

/// Every rule, by name.
pub async fn list_rules(client: &impl GenericClient) -> anyhow::Result<Vec<Rule>> {
    let rows = client
        .query(&format!("SELECT {RULE_COLUMNS} FROM scoring_rules ORDER BY name"), &[])
        .await
        .context("failed to read the scoring rules")?;
    rows.iter().map(Rule::from_row).collect()
}

pub async fn get_rule(client: &impl GenericClient, name: &str) -> anyhow::Result<Option<Rule>> {
    let row = client
        .query_opt(
            &format!("SELECT {RULE_COLUMNS} FROM scoring_rules WHERE name = $1"),
            &[&name],
        )
        .await
        .context("failed to read a scoring rule")?;
    row.as_ref().map(Rule::from_row).transpose()
}

async fn active_attribute_rules(client: &impl GenericClient) -> anyhow::Result<Vec<Rule>> {
    let rows = client
        .query(
            &format!(
                "SELECT {RULE_COLUMNS} FROM scoring_rules
                  WHERE active AND event_type IS NULL AND condition IS NOT NULL ORDER BY id"
            ),
            &[],
        )
        .await
        .context("failed to read the attribute rules")?;
    rows.iter().map(Rule::from_row).collect()
}

/// Refuses a condition on a column `leads` does not have (custom fields and attributes may be added later and
/// are not checked).
pub async fn check_field_exists(client: &impl GenericClient, spec: &RuleSpec) -> anyhow::Result<Result<(), RuleError>> {
    let Some(condition) = &spec.condition else {
        return Ok(Ok(()));
    };
    if condition.field.contains('.') {
        return Ok(Ok(()));
    }
    let exists = client
        .query_opt(
            "SELECT 1 FROM information_schema.columns
              WHERE table_schema = current_schema() AND table_name = 'leads' AND column_name = $1",
            &[&condition.field],
        )
        .await
        .context("failed to look up the lead columns")?
        .is_some();
    Ok(if exists {
        Ok(())
    } else {
        Err(RuleError::new(
            "condition.field",
            format!(
                "{:?} is not a profile field (e.g. country, company_size, tags, custom.plan)",
                condition.field
            ),
        ))
    })
}

/// What saving a rule did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Created,
    Updated,
    Unchanged,
}

impl Saved {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
        }
    }
}

/// Creates or updates a rule by name (the spec must have been validated). Points already given stay; the next
/// rescore (or [`recompute_all`]) brings attribute rules in line.
pub async fn upsert_rule(client: &impl GenericClient, spec: &RuleSpec) -> anyhow::Result<Saved> {
    let condition = spec.condition.as_ref().map(serde_json::to_value).transpose()?;
    let before = get_rule(client, &spec.name).await?;
    if let Some(rule) = &before {
        if rule.event_type == spec.event_type
            && rule.condition == spec.condition
            && rule.points == spec.points
            && rule.active == spec.active
        {
            return Ok(Saved::Unchanged);
        }
    }
    client
        .execute(
            "INSERT INTO scoring_rules (name, event_type, condition, points, active)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE SET event_type = EXCLUDED.event_type, condition = EXCLUDED.condition,
                 points = EXCLUDED.points, active = EXCLUDED.active, updated_at = now()",
            &[&spec.name, &spec.event_type, &condition, &spec.points, &spec.active],
        )
        .await
        .with_context(|| format!("failed to save scoring rule {:?}", spec.name))?;
    Ok(if before.is_some() {
        Saved::Updated
    } else {
        Saved::Created
    })
}

/// Deletes a rule; returns the leads holding its points (rescore them to withdraw the points), or `None` when
/// there was no such rule.
pub async fn delete_rule(client: &impl GenericClient, name: &str) -> anyhow::Result<Option<Vec<i64>>> {
    let Some(row) = client
        .query_opt("DELETE FROM scoring_rules WHERE name = $1 RETURNING id", &[&name])
        .await
        .context("failed to delete a scoring rule")?
    else {
        return Ok(None);
    };
    let id: i64 = row.try_get(0)?;
    let holders = client
        .query("SELECT lead_id FROM lead_rule_state WHERE rule_id = $1", &[&id])
        .await
        .context("failed to find the leads holding a rule")?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    Ok(Some(holders))
}

/// The leads holding the points of the rule named `name` (rescore them after the rule changed).
pub async fn holders(client: &impl GenericClient, name: &str) -> anyhow::Result<Vec<i64>> {
    client
        .query(
            "SELECT s.lead_id FROM lead_rule_state s JOIN scoring_rules r ON r.id = s.rule_id
              WHERE r.name = $1 ORDER BY s.lead_id",
            &[&name],
        )
        .await
        .context("failed to find the leads holding a rule")?
        .iter()
        .map(|r| r.try_get(0).map_err(Into::into))
        .collect()
}

/// The temperature of `score` under `scoring`.
pub fn temperature(score: f64, scoring: &Scoring) -> &'static str {
    if score >= scoring.hot {
        "hot"
    } else if score >= scoring.warm {
        "warm"
    } else {
        "cold"
    }
}

/// `score` stored at `since`, decayed to `now` with `half_life` (no decay without one, or backwards in time).
pub fn decayed(score: f64, since: Option<DateTime<Utc>>, now: DateTime<Utc>, half_life: Option<Duration>) -> f64 {
    let (Some(since), Some(half_life)) = (since, half_life) else {
        return score;
    };
    let elapsed = (now - since).num_milliseconds() as f64 / 1000.0;
    let half_life = half_life.as_secs_f64();
    if elapsed <= 0.0 || half_life <= 0.0 {
        return score;
    }
    let out = score * 0.5_f64.powf(elapsed / half_life);
    if out.abs() < MATERIAL {
        0.0
    } else {
        out
    }
}

/// One change of a lead's score.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub points: f64,
    pub reason: String,
    pub rule_id: Option<i64>,
    pub event_id: Option<i64>,
}

/// What [`apply`] did to one lead.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub score: f64,
    /// Ledger rows written (decay included).
    pub ledger_rows: usize,
    pub became_hot: bool,
}

/// Decays the lead's score to `now`, adds `changes` (an (event, rule) already counted is skipped), writes each
/// to the ledger, and stores score, time and temperature; a lead that becomes hot gets a `lead.hot` event and
/// its notifications. Runs in the caller's transaction; locks the lead row.
pub async fn apply(
    tx: &impl GenericClient,
    lead_id: i64,
    changes: &[Change],
    now: DateTime<Utc>,
    scoring: &Scoring,
) -> anyhow::Result<Applied> {
    apply_holding(tx, lead_id, changes, now, scoring, None).await
}

/// [`apply`], with the attribute-rule points the lead held before `changes` when the caller knows them (the
/// caller may have changed `lead_rule_state` already).
async fn apply_holding(
    tx: &impl GenericClient,
    lead_id: i64,
    changes: &[Change],
    now: DateTime<Utc>,
    scoring: &Scoring,
    held_before: Option<f64>,
) -> anyhow::Result<Applied> {
    let Some(row) = tx
        .query_opt(
            "SELECT score, score_at, temperature FROM leads WHERE id = $1 FOR UPDATE",
            &[&lead_id],
        )
        .await
        .context("failed to lock the lead for scoring")?
    else {
        return Ok(Applied::default());
    };
    let stored: f64 = row.try_get(0)?;
    let score_at: Option<DateTime<Utc>> = row.try_get(1)?;
    let was: String = row.try_get(2)?;
    // Points held from attribute rules do not fade (they are withdrawn in full when the condition stops
    // holding); the rest of the score does.
    let held: f64 = match held_before {
        Some(held) => held,
        None => tx
            .query_one(
                "SELECT coalesce(sum(points), 0)::float8 FROM lead_rule_state WHERE lead_id = $1",
                &[&lead_id],
            )
            .await
            .context("failed to read the points a lead holds")?
            .try_get(0)?,
    };
    let mut applied = Applied {
        score: held + decayed(stored - held, score_at, now, scoring.half_life),
        ..Applied::default()
    };
    let mut last_ledger = None;
    let decay = applied.score - stored;
    if decay.abs() >= MATERIAL {
        let half_life = scoring.half_life.map_or_else(String::new, |d| {
            format!(" (half-life {})", leadflow_shared::domain::format_delay(d))
        });
        last_ledger = Some(
            ledger(
                tx,
                lead_id,
                &Change {
                    points: decay,
                    reason: format!("decay{half_life}"),
                    rule_id: None,
                    event_id: None,
                },
                applied.score,
                now,
            )
            .await?,
        );
        applied.ledger_rows += 1;
    } else {
        applied.score = stored; // an immaterial decay is left to accrue from score_at
    }
    for change in changes {
        let after = applied.score + change.points;
        let id = ledger(tx, lead_id, change, after, now).await?;
        if id.is_some() {
            applied.score = after;
            applied.ledger_rows += 1;
            last_ledger = Some(id);
        }
    }
    if applied.ledger_rows == 0 {
        return Ok(applied);
    }
    let now_temperature = temperature(applied.score, scoring);
    // Only a change moves score_at; a decay alone moves it too (the score is then stored as of now). A `now` in
    // the past never moves it back.
    tx.execute(
        "UPDATE leads SET score = $2, score_at = greatest(coalesce(score_at, $3), $3), temperature = $4
          WHERE id = $1",
        &[&lead_id, &applied.score, &now, &now_temperature],
    )
    .await
    .context("failed to store the lead's score")?;
    if now_temperature == "hot" && was != "hot" {
        applied.became_hot = true;
        became_hot(tx, lead_id, last_ledger.flatten(), applied.score, &was, now, scoring).await?;
    }
    Ok(applied)
}

/// Writes one ledger row; `None` when the (event, rule) was counted already.
async fn ledger(
    tx: &impl GenericClient,
    lead_id: i64,
    change: &Change,
    score: f64,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<i64>> {
    let row = tx
        .query_opt(
            "INSERT INTO score_ledger (lead_id, rule_id, event_id, points, score, reason, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (event_id, rule_id) WHERE event_id IS NOT NULL DO NOTHING
             RETURNING id",
            &[
                &lead_id,
                &change.rule_id,
                &change.event_id,
                &change.points,
                &score,
                &change.reason,
                &now,
            ],
        )
        .await
        .context("failed to write the score ledger")?;
    row.map(|r| r.try_get(0)).transpose().map_err(Into::into)
}

/// The hot transition: a `lead.hot` event on the timeline (already handled: nothing enrolls on it), the same
/// event queued for the lead-events exchange (once: only when the timeline event is new), and the `lead_hot`
/// instant notification for each campaign with a `notify_url` the lead is enrolled in.
async fn became_hot(
    tx: &impl GenericClient,
    lead_id: i64,
    ledger_id: Option<i64>,
    score: f64,
    was: &str,
    now: DateTime<Utc>,
    scoring: &Scoring,
) -> anyhow::Result<()> {
    let event_id = format!("hot-{lead_id}-{}", ledger_id.unwrap_or_default());
    let data = json!({ "score": score, "hot_threshold": scoring.hot, "previous_temperature": was });
    let recorded = tx
        .query_opt(
            "INSERT INTO events (source, event_id, type, lead_id, data, occurred_at, handled_at)
             VALUES ('leadflow', $1, 'lead.hot', $2, $3, $4, now())
             ON CONFLICT (source, event_id) DO NOTHING
             RETURNING id",
            &[&event_id, &lead_id, &data, &now],
        )
        .await
        .context("failed to record the lead.hot event")?;
    if recorded.is_some() {
        lead_events::enqueue_hot(tx, lead_id, &event_id, score, was, scoring.hot, now).await?;
    }
    let enrollments = tx
        .query(
            "SELECT DISTINCT ON (e.campaign_id) e.id
               FROM enrollments e JOIN campaigns c ON c.id = e.campaign_id
              WHERE e.lead_id = $1 AND c.notify_url IS NOT NULL
              ORDER BY e.campaign_id, e.id DESC",
            &[&lead_id],
        )
        .await
        .context("failed to find the campaigns to notify of a hot lead")?;
    for row in enrollments {
        let enrollment: i64 = row.try_get(0)?;
        let details = json!({ "score": score, "temperature": "hot", "previous_temperature": was });
        notify::enqueue(
            tx,
            notify::About::Enrollment(enrollment),
            notify::Kind::BecameHot,
            details,
        )
        .await?;
    }
    metrics::counter!("leadflow_scheduler_leads_hot_total").increment(1);
    tracing::info!(lead.id = lead_id, score, "lead became hot");
    Ok(())
}

/// The rules in force and the scoring settings, loaded once per batch of events.
#[derive(Debug, Clone, Default)]
pub struct EventScoring {
    event_rules: Vec<Rule>,
    attribute_rules: Vec<Rule>,
    scoring: Scoring,
}

impl EventScoring {
    /// Loads the active rules (and, when there are any, the settings): one query when there is no rule.
    pub async fn load(client: &impl GenericClient) -> anyhow::Result<Self> {
        let rows = client
            .query(
                &format!("SELECT {RULE_COLUMNS} FROM scoring_rules WHERE active ORDER BY id"),
                &[],
            )
            .await
            .context("failed to read the scoring rules")?;
        let rules = rows.iter().map(Rule::from_row).collect::<anyhow::Result<Vec<_>>>()?;
        let scoring = if rules.is_empty() {
            Scoring::default()
        } else {
            settings::scoring(client).await?
        };
        let (attribute_rules, event_rules) = rules.into_iter().partition(Rule::is_attribute_rule);
        Ok(Self {
            event_rules,
            attribute_rules,
            scoring,
        })
    }

    /// Gives the points of every event rule matching the event (row id `event_id`), once per (event, rule), and
    /// re-evaluates the attribute rules (the event may have brought profile values: country, language, ...), in
    /// the caller's transaction. Nothing is read when there is no rule.
    pub async fn apply_event(
        &self,
        tx: &impl GenericClient,
        event_id: i64,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Applied> {
        if self.event_rules.is_empty() && self.attribute_rules.is_empty() {
            return Ok(Applied::default());
        }
        let Some(row) = tx
            .query_opt("SELECT type, lead_id, event_id FROM events WHERE id = $1", &[&event_id])
            .await
            .context("failed to read the event to score")?
        else {
            return Ok(Applied::default());
        };
        let event_type: String = row.try_get(0)?;
        let lead_id: i64 = row.try_get(1)?;
        let source_id: String = row.try_get(2)?;
        let matching: Vec<&Rule> = self
            .event_rules
            .iter()
            .filter(|r| r.matches_event(&event_type))
            .collect();
        let lead = if matching.iter().any(|r| r.condition.is_some()) {
            lead_json(tx, lead_id).await?
        } else {
            Value::Null
        };
        let changes: Vec<Change> = matching
            .iter()
            .filter(|r| r.condition.as_ref().is_none_or(|c| c.holds(&lead)))
            .map(|r| Change {
                points: r.points,
                reason: format!("rule {:?} ({:+}): {event_type} event {source_id}", r.name, r.points),
                rule_id: Some(r.id),
                event_id: Some(event_id),
            })
            .collect();
        let mut applied = Applied::default();
        if !changes.is_empty() {
            applied = apply(tx, lead_id, &changes, now, &self.scoring).await?;
        }
        if !self.attribute_rules.is_empty() {
            let actor = format!("{event_type} event");
            rescore_with(tx, lead_id, &self.attribute_rules, &self.scoring, &actor, now).await?;
        }
        Ok(applied)
    }
}

async fn lead_json(client: &impl GenericClient, lead_id: i64) -> anyhow::Result<Value> {
    Ok(client
        .query_opt("SELECT to_jsonb(l) FROM leads l WHERE l.id = $1", &[&lead_id])
        .await
        .context("failed to read the lead to score")?
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or(Value::Null))
}

/// One attribute rule a lead holds (a `lead_rule_state` row).
#[derive(Debug, Clone, PartialEq)]
struct Held {
    rule_id: i64,
    rule_name: String,
    points: f64,
}

/// What to change in what a lead holds, given its profile and the active attribute rules.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Give(usize),
    Withdraw(Held, &'static str),
    Adjust(usize, Held),
}

fn plan(lead: &Value, held: &[Held], rules: &[Rule]) -> Vec<Step> {
    let mut steps = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let Some(condition) = &rule.condition else {
            continue;
        };
        let holds = condition.holds(lead);
        match held.iter().find(|h| h.rule_id == rule.id) {
            None if holds => steps.push(Step::Give(i)),
            Some(h) if !holds => steps.push(Step::Withdraw(h.clone(), "the condition no longer holds")),
            Some(h) if h.points != rule.points => steps.push(Step::Adjust(i, h.clone())),
            _ => {}
        }
    }
    for h in held {
        if !rules.iter().any(|r| r.id == h.rule_id) {
            steps.push(Step::Withdraw(h.clone(), "the rule was deleted or deactivated"));
        }
    }
    steps
}

/// Re-evaluates the attribute rules of one lead after its profile changed (an edit, an import, a merge), inside
/// the caller's transaction. `actor` is recorded as the reason's author.
pub async fn rescore_lead(tx: &impl GenericClient, lead_id: i64, actor: &str) -> anyhow::Result<()> {
    // One cheap look first: an import calls this for every row, usually with no attribute rule at all.
    let anything = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM scoring_rules WHERE active AND event_type IS NULL AND condition IS NOT NULL)
                 OR EXISTS (SELECT 1 FROM lead_rule_state WHERE lead_id = $1)",
            &[&lead_id],
        )
        .await
        .context("failed to look for attribute rules")?
        .try_get::<_, bool>(0)?;
    if !anything {
        return Ok(());
    }
    let rules = active_attribute_rules(tx).await?;
    let scoring = settings::scoring(tx).await?;
    rescore_with(tx, lead_id, &rules, &scoring, actor, Utc::now()).await?;
    Ok(())
}

/// Carries a merged lead's score to the survivor, in the merge's transaction and before the merged lead is
/// deleted: its fading points (decayed to now) with a ledger row naming the merged lead; its attribute-rule points
/// are not carried (the survivor's rescore, done here, decides those from the merged profile, so a rule both held
/// counts once). The survivor's temperature follows, and so does a `lead.hot` event if the merge makes it hot.
pub async fn merge_scores(tx: &impl GenericClient, survivor: i64, merged: i64, actor: &str) -> anyhow::Result<()> {
    let scoring = settings::scoring(tx).await?;
    let now = Utc::now();
    let Some(row) = tx
        .query_opt(
            "SELECT l.score, l.score_at,
                    coalesce((SELECT sum(s.points) FROM lead_rule_state s WHERE s.lead_id = l.id), 0)::float8
               FROM leads l WHERE l.id = $1 FOR UPDATE",
            &[&merged],
        )
        .await
        .context("failed to read the merged lead's score")?
    else {
        return Ok(());
    };
    let score: f64 = row.try_get(0)?;
    let score_at: Option<DateTime<Utc>> = row.try_get(1)?;
    let held: f64 = row.try_get(2)?;
    let fading = score - held;
    let mut carried = decayed(fading, score_at, now, scoring.half_life);
    if (carried - fading).abs() < MATERIAL {
        carried = fading; // an immaterial decay is not applied, as in `apply`
    }
    if carried.abs() >= MATERIAL {
        let change = Change {
            points: carried,
            reason: format!("merged from lead {merged} (by {actor})"),
            rule_id: None,
            event_id: None,
        };
        apply(tx, survivor, &[change], now, &scoring).await?;
    }
    rescore_lead(tx, survivor, actor).await
}

/// [`rescore_lead`] with the rules and settings given; returns whether anything changed.
pub async fn rescore_with(
    tx: &impl GenericClient,
    lead_id: i64,
    rules: &[Rule],
    scoring: &Scoring,
    actor: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let Some(row) = tx
        .query_opt(
            "SELECT to_jsonb(l) FROM leads l WHERE l.id = $1 FOR UPDATE",
            &[&lead_id],
        )
        .await
        .context("failed to lock the lead for rescoring")?
    else {
        return Ok(false);
    };
    let lead: Value = row.try_get(0)?;
    let held = held_by(tx, lead_id).await?;
    let steps = plan(&lead, &held, rules);
    if steps.is_empty() {
        return Ok(false);
    }
    let mut changes = Vec::new();
    for step in steps {
        match step {
            Step::Give(i) => {
                let rule = &rules[i];
                let condition = rule.condition.as_ref().map(Condition::describe).unwrap_or_default();
                tx.execute(
                    "INSERT INTO lead_rule_state (lead_id, rule_id, rule_name, points, since)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&lead_id, &rule.id, &rule.name, &rule.points, &now],
                )
                .await
                .context("failed to record a rule the lead holds")?;
                changes.push(Change {
                    points: rule.points,
                    reason: format!(
                        "rule {:?} ({:+}): {condition} holds (by {actor})",
                        rule.name, rule.points
                    ),
                    rule_id: Some(rule.id),
                    event_id: None,
                });
            }
            Step::Withdraw(held, why) => {
                tx.execute(
                    "DELETE FROM lead_rule_state WHERE lead_id = $1 AND rule_id = $2",
                    &[&lead_id, &held.rule_id],
                )
                .await
                .context("failed to withdraw a rule the lead held")?;
                let still_exists = rules.iter().any(|r| r.id == held.rule_id)
                    || tx
                        .query_opt("SELECT 1 FROM scoring_rules WHERE id = $1", &[&held.rule_id])
                        .await?
                        .is_some();
                changes.push(Change {
                    points: -held.points,
                    reason: format!("rule {:?} withdrawn: {why} (by {actor})", held.rule_name),
                    rule_id: still_exists.then_some(held.rule_id),
                    event_id: None,
                });
            }
            Step::Adjust(i, held) => {
                let rule = &rules[i];
                tx.execute(
                    "UPDATE lead_rule_state SET points = $3, rule_name = $4 WHERE lead_id = $1 AND rule_id = $2",
                    &[&lead_id, &rule.id, &rule.points, &rule.name],
                )
                .await
                .context("failed to adjust a rule the lead holds")?;
                changes.push(Change {
                    points: rule.points - held.points,
                    reason: format!(
                        "rule {:?} changed from {:+} to {:+} points (by {actor})",
                        rule.name, held.points, rule.points
                    ),
                    rule_id: Some(rule.id),
                    event_id: None,
                });
            }
        }
    }
    let held_before = held.iter().map(|h| h.points).sum();
    apply_holding(tx, lead_id, &changes, now, scoring, Some(held_before)).await?;
    Ok(true)
}

async fn held_by(client: &impl GenericClient, lead_id: i64) -> anyhow::Result<Vec<Held>> {
    client
        .query(
            "SELECT rule_id, rule_name, points FROM lead_rule_state WHERE lead_id = $1 ORDER BY rule_id",
            &[&lead_id],
        )
        .await
        .context("failed to read the rules a lead holds")?
        .iter()
        .map(|r| {
            Ok(Held {
                rule_id: r.try_get(0)?,
                rule_name: r.try_get(1)?,
                points: r.try_get(2)?,
            })
        })
        .collect()
}

/// What [`recompute_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Recomputed {
    /// Leads looked at.
    pub leads: u64,
    /// Leads whose score changed.
    pub changed: u64,
}

/// Brings every lead's attribute-rule points in line with the rules (after rules were created, changed or
/// deleted), [`BATCH`] leads per transaction. Leads whose points are right are only read.
pub async fn recompute_all(pool: &Pool, actor: &str) -> anyhow::Result<Recomputed> {
    let now = Utc::now();
    let mut client = pool.get().await.context("failed to connect to PostgreSQL")?;
    let rules = active_attribute_rules(&client).await?;
    let scoring = settings::scoring(&client).await?;
    let mut done = Recomputed::default();
    let mut after = 0_i64;
    loop {
        let rows = client
            .query(
                "SELECT l.id, to_jsonb(l),
                        coalesce((SELECT jsonb_agg(jsonb_build_array(s.rule_id, s.rule_name, s.points))
                                    FROM lead_rule_state s WHERE s.lead_id = l.id), '[]')
                   FROM leads l WHERE l.id > $1 ORDER BY l.id LIMIT $2",
                &[&after, &BATCH],
            )
            .await
            .context("failed to read leads to recompute")?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.try_get(0)?;
        let mut stale = Vec::new();
        for row in &rows {
            let id: i64 = row.try_get(0)?;
            let lead: Value = row.try_get(1)?;
            let held: Value = row.try_get(2)?;
            let held: Vec<Held> = held
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| {
                    Some(Held {
                        rule_id: h.get(0)?.as_i64()?,
                        rule_name: h.get(1)?.as_str()?.to_string(),
                        points: h.get(2)?.as_f64()?,
                    })
                })
                .collect();
            if !plan(&lead, &held, &rules).is_empty() {
                stale.push(id);
            }
        }
        done.leads += rows.len() as u64;
        if !stale.is_empty() {
            let tx = client.transaction().await?;
            for id in stale {
                if rescore_with(&tx, id, &rules, &scoring, actor, now).await? {
                    done.changed += 1;
                }
            }
            tx.commit().await.context("failed to commit recomputed scores")?;
        }
        if (rows.len() as i64) < BATCH {
            break;
        }
    }
    Ok(done)
}

/// Rescores the given leads (e.g. the holders of a deleted rule), each batch in one transaction.
pub async fn rescore_leads(pool: &Pool, lead_ids: &[i64], actor: &str) -> anyhow::Result<u64> {
    let mut client = pool.get().await.context("failed to connect to PostgreSQL")?;
    let rules = active_attribute_rules(&client).await?;
    let scoring = settings::scoring(&client).await?;
    let mut changed = 0;
    for chunk in lead_ids.chunks(BATCH as usize) {
        let tx = client.transaction().await?;
        for id in chunk {
            if rescore_with(&tx, *id, &rules, &scoring, actor, Utc::now()).await? {
                changed += 1;
            }
        }
        tx.commit().await.context("failed to commit rescored leads")?;
    }
    Ok(changed)
}

/// Decays every score whose decay since its `score_at` is material, as of `now`: a `decay` ledger row each and
/// the temperature moved down. [`BATCH`] leads per transaction, claimed with `FOR UPDATE SKIP LOCKED` so
/// replicas share the work; returns how many leads were decayed.
pub async fn decay_once(pool: &Pool, now: DateTime<Utc>) -> anyhow::Result<u64> {
    let mut client = pool.get().await.context("failed to connect to PostgreSQL")?;
    let scoring = settings::scoring(&client).await?;
    let Some(half_life) = scoring.half_life else {
        return Ok(0);
    };
    let mut total = 0;
    loop {
        let tx = client.transaction().await?;
        let due = tx
            .query(
                "SELECT l.id FROM leads l
                  WHERE l.score <> 0 AND l.score_at < $1
                    AND abs(l.score - coalesce((SELECT sum(s.points) FROM lead_rule_state s WHERE s.lead_id = l.id), 0))
                        * (1 - power(0.5, extract(epoch FROM ($1 - l.score_at))::float8 / $2)) >= $3
                  ORDER BY l.score_at LIMIT $4
                  FOR UPDATE OF l SKIP LOCKED",
                &[&now, &half_life.as_secs_f64(), &MATERIAL, &BATCH],
            )
            .await
            .context("failed to claim scores to decay")?;
        for row in &due {
            let id: i64 = row.try_get(0)?;
            apply(&tx, id, &[], now, &scoring).await?;
        }
        tx.commit().await.context("failed to commit decayed scores")?;
        total += due.len() as u64;
        if (due.len() as i64) < BATCH {
            return Ok(total);
        }
    }
}

/// Decays scores every [`DECAY_EVERY`] until `shutdown`.
pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        match decay_once(&ctx.pool, Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(leads = n, "scores decayed"),
            // The database is away: the next pass decays from the same score_at.
            Err(e) => tracing::warn!(error = format!("{e:#}"), "score decay pass failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(DECAY_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(value: Value) -> Result<RuleSpec, String> {
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    fn condition(field: &str, op: Op, value: Value) -> Condition {
        Condition {
            field: field.into(),
            op,
            value,
        }
    }

    #[test]
    fn rules_are_refused_naming_the_field() {
        let field_of = |v: Value| spec(v).unwrap().validate().unwrap_err().field;
        assert_eq!(
            field_of(json!({"name": "a", "event_type": "trial.started", "points": 101})),
            "points"
        );
        assert_eq!(field_of(json!({"name": "a", "points": 5})), "event_type");
        assert_eq!(
            field_of(json!({"name": "a", "event_type": "trial.begun", "points": 5})),
            "event_type"
        );
        assert_eq!(
            field_of(json!({"name": "", "event_type": "trial.started", "points": 5})),
            "name"
        );
        assert_eq!(
            field_of(json!({"name": "a", "condition": {"field": "score", "op": "gt", "value": 5}, "points": 5})),
            "condition.field"
        );
        assert_eq!(
            field_of(json!({"name": "a", "condition": {"field": "country", "op": "in", "value": "DE"}, "points": 5})),
            "condition.value"
        );
        assert!(spec(
            json!({"name": "a", "condition": {"field": "country", "op": "like", "value": "DE"}, "points": 1})
        )
        .unwrap_err()
        .contains("unknown variant"));
        for ok in [
            json!({"name": "a", "event_type": "engagement.*", "points": -5}),
            json!({"name": "b", "event_type": "engagement.page_viewed", "points": 15}),
            json!({"name": "c", "condition": {"field": "custom.plan", "op": "eq", "value": "pro"}, "points": 8}),
            json!({"name": "d", "condition": {"field": "tags", "op": "exists"}, "points": 1}),
        ] {
            spec(ok.clone())
                .unwrap()
                .validate()
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn conditions_compare_text_without_case_and_lists_by_item() {
        let lead = json!({"country": "DE", "company_size": "51-200", "tags": ["vip", "Trade fair"],
                          "custom": {"seats": 40, "plan": "pro"}, "city": null});
        assert!(condition("country", Op::Eq, json!("de")).holds(&lead));
        assert!(condition("country", Op::In, json!(["FR", "DE"])).holds(&lead));
        assert!(condition("country", Op::Ne, json!("FR")).holds(&lead));
        assert!(condition("tags", Op::Contains, json!("trade")).holds(&lead));
        assert!(condition("tags", Op::Eq, json!("VIP")).holds(&lead));
        assert!(condition("custom.seats", Op::Gt, json!(25)).holds(&lead));
        assert!(!condition("custom.seats", Op::Lt, json!(25)).holds(&lead));
        assert!(condition("custom.plan", Op::Exists, Value::Null).holds(&lead));
        assert!(!condition("city", Op::Exists, Value::Null).holds(&lead));
        assert!(condition("city", Op::Exists, json!(false)).holds(&lead));
        assert!(!condition("company_size", Op::Gt, json!(10)).holds(&lead));
    }

    #[test]
    fn event_rules_match_a_type_or_a_prefix() {
        let rule = |event_type: &str| Rule {
            id: 1,
            name: "r".into(),
            event_type: Some(event_type.into()),
            condition: None,
            points: 1.0,
            active: true,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        assert!(rule("engagement.*").matches_event("engagement.page_viewed"));
        assert!(!rule("engagement.*").matches_event("engagementx.page_viewed"));
        assert!(rule("trial.started").matches_event("trial.started"));
        assert!(!rule("trial.started").matches_event("trial.started.x"));
    }

    #[test]
    fn a_score_halves_each_half_life_and_never_grows_backwards() {
        let day = Duration::from_secs(86_400);
        let t0 = Utc::now();
        let later = t0 + chrono::TimeDelta::days(30);
        assert!((decayed(40.0, Some(t0), later, Some(day * 30)) - 20.0).abs() < 1e-9);
        assert!((decayed(40.0, Some(t0), t0 + chrono::TimeDelta::days(60), Some(day * 30)) - 10.0).abs() < 1e-9);
        assert_eq!(decayed(40.0, Some(later), t0, Some(day * 30)), 40.0);
        assert_eq!(decayed(40.0, Some(t0), later, None), 40.0);
        assert_eq!(decayed(0.004, Some(t0), later, Some(day)), 0.0);
        let s = Scoring::default();
        assert_eq!(temperature(50.0, &s), "hot");
        assert_eq!(temperature(20.0, &s), "warm");
        assert_eq!(temperature(19.9, &s), "cold");
    }
}
