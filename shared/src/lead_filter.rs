//! The lead search filter: parsed and validated from query-string pairs or a saved segment's JSON, turned into a
//! SQL condition over `leads l` whose values are always bound parameters, never spliced into the text. Also the
//! sort orders and the opaque keyset cursor the search, list and export endpoints page with.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Duration, NaiveDate, SecondsFormat, Utc};
use serde_json::{Map, Value};
use tokio_postgres::types::ToSql;

/// A bound parameter of a generated condition.
pub type Param = Box<dyn ToSql + Sync + Send>;

/// The lower-cased free text `q` searches; [`SEARCH_TEXT_INDEX`] in migration 0014 is built on the same expression
/// so the trigram index serves `q`, `name`, `company` and email substrings.
pub const SEARCH_TEXT: &str = "lower(coalesce(l.first_name, '') || ' ' || coalesce(l.last_name, '') || ' ' || \
     l.email || ' ' || coalesce(l.company_name, '') || ' ' || coalesce(l.city, ''))";

/// The name of that index (for plans and docs).
pub const SEARCH_TEXT_INDEX: &str = "leads_search_text_trgm";

/// The longest filter value accepted.
const MAX_VALUE_LEN: usize = 500;

/// How deep segments may refer to other lists through `list=`.
const MAX_LIST_DEPTH: usize = 4;

/// A filter or sort value that cannot be used: the key it came in and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct FilterError {
    pub field: String,
    pub detail: String,
}

impl FilterError {
    pub fn new(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            detail: detail.into(),
        }
    }
}

/// Why [`LeadFilter::resolve_lists`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A `list` names no list, or segments nest too deep: a 400 naming the field.
    #[error(transparent)]
    Invalid(#[from] FilterError),
    #[error("failed to load a list: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// Every filter key, in the order the docs list them.
pub const KEYS: &[&str] = &[
    "created_from",
    "created_to",
    "updated_from",
    "updated_to",
    "name",
    "email",
    "phone",
    "tag",
    "agent",
    "source",
    "original_source",
    "contact_method",
    "customer_id",
    "status",
    "profession",
    "address",
    "city",
    "region",
    "district",
    "division",
    "country",
    "company",
    "score_min",
    "score_max",
    "temperature",
    "campaign",
    "follow_up_status",
    "email_status",
    "processed_order",
    "list",
    "q",
    "is_customer",
    "do_not_call",
    "language",
];

/// Follow-up states an inquiry can be in (the CHECK on `inquiries.follow_up_status`).
const FOLLOW_UP_STATUSES: &[&str] = &["none", "scheduled", "in progress", "completed", "stopped"];

/// One parsed condition.
#[derive(Debug, Clone, PartialEq)]
enum Condition {
    /// `column >= at`.
    From(&'static str, DateTime<Utc>),
    /// `column < at` (a date's next midnight) or `column <= at` (a timestamp).
    To(&'static str, DateTime<Utc>, bool),
    /// A case-insensitive substring of an expression, pre-filtered through the search-text trigram index.
    Contains(&'static str, String),
    /// Free text: every word a case-insensitive substring of the search text.
    Words(Vec<String>),
    /// A case-insensitive substring of a column without the index (address).
    ContainsPlain(&'static str, String),
    EmailExact(String),
    /// Digits of any phone number equal these digits.
    Phone(String),
    Tag(String),
    /// Exact equality with a column (agent, source, status: the names the lists define).
    Equals(&'static str, String),
    /// Case-insensitive equality.
    EqualsFolded(&'static str, String),
    /// A language tag or its primary subtag: `de` matches `de` and `de-AT`.
    Language(String),
    ScoreMin(f64),
    ScoreMax(f64),
    Boolean(&'static str, bool),
    Campaign(String),
    /// An inquiry whose column equals the value.
    Inquiry(&'static str, String),
    /// Whether any inquiry has a processed order.
    HasProcessedOrder(bool),
    /// Member of a static list, or matching a segment (once resolved).
    List(String, Option<Box<LeadFilter>>),
}

#[derive(Debug, Clone, PartialEq)]
struct Term {
    key: &'static str,
    raw: String,
    condition: Condition,
}

/// A parsed, validated lead filter: every condition must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeadFilter {
    terms: Vec<Term>,
}

impl LeadFilter {
    /// The filter of query-string pairs. Callers take their own parameters (`sort`, `limit`, `cursor`, ...) out
    /// first: any other unknown key, or a bad value, is an error naming the key. `tag` may repeat (every tag
    /// must be present); any other key given twice is an error.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Self, FilterError> {
        let mut filter = Self::default();
        for (key, value) in pairs {
            filter.add(key, value)?;
        }
        Ok(filter)
    }

    /// The filter a saved segment stores: `{"city": "Berlin", "score_min": 10, "tag": ["vip", "fair"]}`. Values are
    /// strings, numbers or booleans (`tag` also a list of strings).
    pub fn from_json(v: &Value) -> Result<Self, FilterError> {
        let object = v
            .as_object()
            .ok_or_else(|| FilterError::new("filter", "must be an object of filter keys to values"))?;
        let mut filter = Self::default();
        for (key, value) in object {
            match value {
                Value::Array(items) if key == "tag" => {
                    for item in items {
                        filter.add(key, &scalar(key, item)?)?;
                    }
                }
                other => filter.add(key, &scalar(key, other)?)?,
            }
        }
        Ok(filter)
    }

    /// The filter as a segment stores it; [`LeadFilter::from_json`] reads it back to an equal filter.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        for term in &self.terms {
            match object.get_mut(term.key) {
                Some(Value::Array(items)) => items.push(Value::String(term.raw.clone())),
                Some(existing) => {
                    let first = existing.take();
                    *existing = Value::Array(vec![first, Value::String(term.raw.clone())]);
                }
                None => {
                    object.insert(term.key.to_string(), Value::String(term.raw.clone()));
                }
            }
        }
        Value::Object(object)
    }

    /// Whether no condition was given (every lead matches).
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The list names `list=` refers to.
    pub fn list_names(&self) -> Vec<&str> {
        self.terms
            .iter()
            .filter_map(|t| match &t.condition {
                Condition::List(name, _) => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Loads the filter of every segment `list=` names (and of segments those name), so [`LeadFilter::to_sql`]
    /// can evaluate it. Without this a `list` condition is static-list membership only. An unknown list is an
    /// error naming `list`.
    pub async fn resolve_lists<C>(&mut self, client: &C) -> Result<(), ResolveError>
    where
        C: deadpool_postgres::GenericClient,
    {
        self.resolve_at(client, 0).await
    }

    fn resolve_at<'a, C>(
        &'a mut self,
        client: &'a C,
        depth: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ResolveError>> + Send + 'a>>
    where
        C: deadpool_postgres::GenericClient,
    {
        Box::pin(async move {
            for term in &mut self.terms {
                let Condition::List(name, resolved) = &mut term.condition else {
                    continue;
                };
                if depth >= MAX_LIST_DEPTH {
                    return Err(FilterError::new(
                        "list",
                        format!("segments refer to other lists more than {MAX_LIST_DEPTH} deep (a cycle?)"),
                    )
                    .into());
                }
                let row = client
                    .query_opt("SELECT kind, filter FROM lead_lists WHERE name = $1", &[&*name])
                    .await?;
                let Some(row) = row else {
                    return Err(FilterError::new("list", format!("there is no list named {name:?}")).into());
                };
                let kind: String = row.get("kind");
                if kind == "segment" {
                    let stored: Option<Value> = row.get("filter");
                    let mut inner = Self::from_json(&stored.unwrap_or(Value::Null)).map_err(|e| {
                        FilterError::new(
                            "list",
                            format!("segment {name:?} has a filter that no longer parses: {e}"),
                        )
                    })?;
                    inner.resolve_at(client, depth + 1).await?;
                    *resolved = Some(Box::new(inner));
                } else {
                    *resolved = None;
                }
            }
            Ok(())
        })
    }

    /// A SQL boolean condition over `leads l` plus its parameters, numbered from `$first`. `TRUE` when empty.
    pub fn to_sql(&self, first: usize) -> (String, Vec<Param>) {
        let mut out = SqlBuilder {
            next: first,
            params: Vec::new(),
        };
        let sql = out.conditions(self);
        (sql, out.params)
    }

    fn add(&mut self, key: &str, value: &str) -> Result<(), FilterError> {
        let Some(key) = KEYS.iter().copied().find(|k| *k == key) else {
            return Err(FilterError::new(
                key,
                format!("is not a filter; the filters are {}", KEYS.join(", ")),
            ));
        };
        if key != "tag" && self.terms.iter().any(|t| t.key == key) {
            return Err(FilterError::new(key, "is given more than once"));
        }
        let raw = value.trim();
        if raw.is_empty() {
            return Err(FilterError::new(key, "is empty"));
        }
        if raw.chars().count() > MAX_VALUE_LEN {
            return Err(FilterError::new(
                key,
                format!("is longer than {MAX_VALUE_LEN} characters"),
            ));
        }
        let condition = parse(key, raw)?;
        self.terms.push(Term {
            key,
            raw: raw.to_string(),
            condition,
        });
        Ok(())
    }
}

/// A JSON scalar as the string a query would carry.
fn scalar(key: &str, value: &Value) -> Result<String, FilterError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(FilterError::new(key, "must be a string, a number or a boolean")),
    }
}

fn parse(key: &'static str, raw: &str) -> Result<Condition, FilterError> {
    let condition = match key {
        "created_from" => Condition::From("l.created_at", instant(key, raw)?.0),
        "updated_from" => Condition::From("l.updated_at", instant(key, raw)?.0),
        "created_to" | "updated_to" => {
            let column = if key == "created_to" {
                "l.created_at"
            } else {
                "l.updated_at"
            };
            match instant(key, raw)? {
                (at, true) => Condition::To(column, at + Duration::days(1), false),
                (at, false) => Condition::To(column, at, true),
            }
        }
        "name" => Condition::Contains(
            "lower(coalesce(l.first_name, '') || ' ' || coalesce(l.last_name, ''))",
            raw.to_string(),
        ),
        "company" => Condition::Contains("lower(coalesce(l.company_name, ''))", raw.to_string()),
        "q" => {
            let words: Vec<String> = raw.split_whitespace().map(str::to_string).collect();
            if words.len() > 10 {
                return Err(FilterError::new(key, "has more than 10 words"));
            }
            Condition::Words(words)
        }
        "email" if raw.contains('@') => Condition::EmailExact(raw.to_lowercase()),
        "email" => Condition::Contains("l.email", raw.to_lowercase()),
        "address" => Condition::ContainsPlain("l.address", raw.to_string()),
        "phone" => {
            let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
            if digits.is_empty() {
                return Err(FilterError::new(key, "has no digits"));
            }
            Condition::Phone(digits)
        }
        "tag" => Condition::Tag(raw.to_string()),
        "agent" => Condition::Equals("l.agent", raw.to_string()),
        "source" => Condition::Equals("l.source", raw.to_string()),
        "original_source" => Condition::Equals("l.original_source", raw.to_string()),
        "contact_method" => Condition::Equals("l.contact_method", raw.to_string()),
        "customer_id" => Condition::Equals("l.customer_id", raw.to_string()),
        "status" => Condition::Equals("l.status", raw.to_string()),
        "profession" => Condition::EqualsFolded("l.profession", raw.to_string()),
        "city" => Condition::EqualsFolded("l.city", raw.to_string()),
        "region" => Condition::EqualsFolded("l.region", raw.to_string()),
        "district" => Condition::EqualsFolded("l.district", raw.to_string()),
        "division" => Condition::EqualsFolded("l.division", raw.to_string()),
        "country" => {
            if raw.len() != 2 || !raw.chars().all(|c| c.is_ascii_alphabetic()) {
                return Err(FilterError::new(key, "must be an ISO 3166-1 alpha-2 code such as DE"));
            }
            Condition::Equals("l.country", raw.to_ascii_uppercase())
        }
        "language" => {
            if !raw.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(FilterError::new(key, "must be a language tag such as de or de-AT"));
            }
            Condition::Language(raw.to_string())
        }
        "score_min" => Condition::ScoreMin(number(key, raw)?),
        "score_max" => Condition::ScoreMax(number(key, raw)?),
        "temperature" => {
            let t = raw.to_ascii_lowercase();
            if !matches!(t.as_str(), "cold" | "warm" | "hot") {
                return Err(FilterError::new(key, "must be cold, warm or hot"));
            }
            Condition::Equals("l.temperature", t)
        }
        "is_customer" => Condition::Boolean("l.is_customer", boolean(key, raw)?),
        "do_not_call" => Condition::Boolean("l.do_not_call", boolean(key, raw)?),
        "campaign" => Condition::Campaign(raw.to_string()),
        "follow_up_status" => {
            let s = raw.to_ascii_lowercase();
            if !FOLLOW_UP_STATUSES.contains(&s.as_str()) {
                return Err(FilterError::new(
                    key,
                    format!("must be one of {}", FOLLOW_UP_STATUSES.join(", ")),
                ));
            }
            Condition::Inquiry("follow_up_status", s)
        }
        "email_status" => Condition::Inquiry("email_status", raw.to_ascii_lowercase()),
        "processed_order" => match raw.to_ascii_lowercase().as_str() {
            "true" | "yes" => Condition::HasProcessedOrder(true),
            "false" | "no" => Condition::HasProcessedOrder(false),
            _ => Condition::Inquiry("processed_order", raw.to_string()),
        },
        "list" => Condition::List(raw.to_string(), None),
        other => return Err(FilterError::new(other, "is not a filter")),
    };
    Ok(condition)
}

/// An RFC 3339 time or a `YYYY-MM-DD` date (midnight UTC); the flag says it was a date.
fn instant(key: &str, raw: &str) -> Result<(DateTime<Utc>, bool), FilterError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(raw) {
        return Ok((at.with_timezone(&Utc), false));
    }
    if let Ok(day) = NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        if let Some(midnight) = day.and_hms_opt(0, 0, 0) {
            return Ok((midnight.and_utc(), true));
        }
    }
    Err(FilterError::new(
        key,
        "must be an RFC 3339 time (2026-01-31T09:00:00Z) or a date (2026-01-31)",
    ))
}

fn number(key: &str, raw: &str) -> Result<f64, FilterError> {
    raw.parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .ok_or_else(|| FilterError::new(key, "must be a number"))
}

fn boolean(key: &str, raw: &str) -> Result<bool, FilterError> {
    match raw.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(FilterError::new(key, "must be true or false")),
    }
}

/// `%text%` for LIKE, with LIKE's own characters escaped.
fn like_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

struct SqlBuilder {
    next: usize,
    params: Vec<Param>,
}

impl SqlBuilder {
    fn bind(&mut self, value: Param) -> String {
        let placeholder = format!("${}", self.next);
        self.next += 1;
        self.params.push(value);
        placeholder
    }

    fn conditions(&mut self, filter: &LeadFilter) -> String {
        if filter.terms.is_empty() {
            return "TRUE".into();
        }
        let parts: Vec<String> = filter.terms.iter().map(|t| self.condition(&t.condition)).collect();
        format!("({})", parts.join(" AND "))
    }

    fn condition(&mut self, condition: &Condition) -> String {
        match condition {
            Condition::From(column, at) => format!("{column} >= {}", self.bind(Box::new(*at))),
            Condition::To(column, at, inclusive) => {
                let op = if *inclusive { "<=" } else { "<" };
                format!("{column} {op} {}", self.bind(Box::new(*at)))
            }
            Condition::Contains(expr, text) => {
                let p = self.bind(Box::new(like_pattern(text)));
                // The search text contains every such expression, so its trigram index narrows the rows first.
                format!("({SEARCH_TEXT} LIKE lower({p}) AND {expr} LIKE lower({p}))")
            }
            Condition::Words(words) => {
                let parts: Vec<String> = words
                    .iter()
                    .map(|w| format!("{SEARCH_TEXT} LIKE lower({})", self.bind(Box::new(like_pattern(w)))))
                    .collect();
                format!("({})", parts.join(" AND "))
            }
            Condition::ContainsPlain(column, text) => {
                format!(
                    "lower({column}) LIKE lower({})",
                    self.bind(Box::new(like_pattern(text)))
                )
            }
            Condition::EmailExact(email) => format!("l.email = {}", self.bind(Box::new(email.clone()))),
            // The few leads with the number first, through the GIN index (as an init plan): PostgreSQL has no
            // statistics for single numbers and would otherwise walk a sort index testing every lead.
            Condition::Phone(digits) => format!(
                "l.id = ANY (ARRAY(SELECT p.id FROM leads p WHERE lead_phone_digits(p.phones) @> ARRAY[{}::text]))",
                self.bind(Box::new(digits.clone()))
            ),
            Condition::Tag(tag) => format!("l.tags @> ARRAY[{}::text]", self.bind(Box::new(tag.clone()))),
            Condition::Equals(column, value) => format!("{column} = {}", self.bind(Box::new(value.clone()))),
            Condition::EqualsFolded(column, value) => {
                format!("lower({column}) = lower({})", self.bind(Box::new(value.clone())))
            }
            Condition::Language(tag) => {
                let exact = self.bind(Box::new(tag.to_ascii_lowercase()));
                // Validated as letters, digits and '-': nothing for LIKE to interpret.
                let prefix = self.bind(Box::new(format!("{}-%", tag.to_ascii_lowercase())));
                format!("(lower(l.language) = {exact} OR lower(l.language) LIKE {prefix})")
            }
            Condition::ScoreMin(n) => format!("l.score >= {}", self.bind(Box::new(*n))),
            Condition::ScoreMax(n) => format!("l.score <= {}", self.bind(Box::new(*n))),
            Condition::Boolean(column, b) => format!("{column} = {}", self.bind(Box::new(*b))),
            Condition::Campaign(name) => format!(
                "EXISTS (SELECT 1 FROM enrollments e JOIN campaigns c ON c.id = e.campaign_id \
                 WHERE e.lead_id = l.id AND c.name = {})",
                self.bind(Box::new(name.clone()))
            ),
            Condition::Inquiry(column, value) => {
                let p = self.bind(Box::new(value.clone()));
                let compared = if *column == "processed_order" {
                    format!("i.{column} = {p}")
                } else {
                    format!("lower(i.{column}) = {p}")
                };
                format!("EXISTS (SELECT 1 FROM inquiries i WHERE i.lead_id = l.id AND {compared})")
            }
            Condition::HasProcessedOrder(has) => format!(
                "{}EXISTS (SELECT 1 FROM inquiries i WHERE i.lead_id = l.id AND i.processed_order IS NOT NULL)",
                if *has { "" } else { "NOT " }
            ),
            Condition::List(name, resolved) => {
                let p = self.bind(Box::new(name.clone()));
                let member = format!(
                    "EXISTS (SELECT 1 FROM lead_list_members m JOIN lead_lists ll ON ll.id = m.list_id \
                     WHERE ll.name = {p} AND m.lead_id = l.id)"
                );
                match resolved {
                    Some(segment) => format!("({member} OR {})", self.conditions(segment)),
                    None => member,
                }
            }
        }
    }
}

/// The keys a search can be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    CreatedAt,
    UpdatedAt,
    Score,
    LastName,
    Email,
}

impl SortKey {
    pub const ALL: &[SortKey] = &[
        Self::CreatedAt,
        Self::UpdatedAt,
        Self::Score,
        Self::LastName,
        Self::Email,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreatedAt => "created_at",
            Self::UpdatedAt => "updated_at",
            Self::Score => "score",
            Self::LastName => "last_name",
            Self::Email => "email",
        }
    }

    /// The expression ordered by (over `leads l`); migration 0014 indexes each together with `id`.
    pub fn expr(self) -> &'static str {
        match self {
            Self::CreatedAt => "l.created_at",
            Self::UpdatedAt => "l.updated_at",
            Self::Score => "l.score",
            Self::LastName => "lower(coalesce(l.last_name, ''))",
            Self::Email => "l.email",
        }
    }
}

/// A sort order: a key and a direction, always followed by `id` in the same direction so pages are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sort {
    pub key: SortKey,
    pub descending: bool,
}

impl Default for Sort {
    /// Newest first.
    fn default() -> Self {
        Self {
            key: SortKey::CreatedAt,
            descending: true,
        }
    }
}

impl fmt::Display for Sort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.key.as_str(),
            if self.descending { "desc" } else { "asc" }
        )
    }
}

impl Sort {
    /// `score`, `score:desc`, `last_name:asc`, ...; a key alone sorts ascending. An error names `sort`.
    pub fn parse(raw: &str) -> Result<Self, FilterError> {
        let (key, direction) = raw.trim().split_once(':').unwrap_or((raw.trim(), "asc"));
        let key = SortKey::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == key)
            .ok_or_else(|| {
                FilterError::new(
                    "sort",
                    "must be created_at, updated_at, score, last_name or email, optionally with :asc or :desc",
                )
            })?;
        let descending = match direction {
            "asc" => false,
            "desc" => true,
            _ => return Err(FilterError::new("sort", "the direction must be :asc or :desc")),
        };
        Ok(Self { key, descending })
    }

    /// The select-list item that [`Sort::cursor_after`] reads back: `<key expression> AS sort_key`.
    pub fn select_key(&self) -> String {
        format!("{} AS sort_key", self.key.expr())
    }

    /// `ORDER BY` text (without the keywords).
    pub fn order_by(&self) -> String {
        let direction = if self.descending { "DESC" } else { "ASC" };
        format!("{} {direction}, l.id {direction}", self.key.expr())
    }

    /// The keyset condition for the rows after `cursor`, its parameters numbered from `$first`.
    pub fn after_sql(&self, cursor: &Cursor, first: usize) -> (String, Vec<Param>) {
        let op = if self.descending { "<" } else { ">" };
        let key: Param = match &cursor.key {
            CursorKey::Time(at) => Box::new(*at),
            CursorKey::Number(n) => Box::new(*n),
            CursorKey::Text(s) => Box::new(s.clone()),
        };
        if self.key == SortKey::Email {
            // Emails are unique: the key alone orders, and the plain unique index serves it.
            return (format!("l.email {op} ${first}"), vec![key]);
        }
        let sql = format!("({}, l.id) {op} (${first}, ${})", self.key.expr(), first + 1);
        (sql, vec![key, Box::new(cursor.id)])
    }

    /// The cursor that continues after `row` (selected with [`Sort::select_key`] and `l.id AS id`).
    pub fn cursor_after(&self, row: &tokio_postgres::Row) -> Result<String, tokio_postgres::Error> {
        let id: i64 = row.try_get("id")?;
        let key = match self.key {
            SortKey::CreatedAt | SortKey::UpdatedAt => CursorKey::Time(row.try_get("sort_key")?),
            SortKey::Score => CursorKey::Number(row.try_get("sort_key")?),
            SortKey::LastName | SortKey::Email => CursorKey::Text(row.try_get("sort_key")?),
        };
        Ok(Cursor { sort: *self, key, id }.encode())
    }

    /// Reads a cursor given back by a client; it must come from a page with the same sort. An error names
    /// `cursor`.
    pub fn decode_cursor(&self, raw: &str) -> Result<Cursor, FilterError> {
        let bad = || FilterError::new("cursor", "is not a cursor this search returned");
        let bytes = URL_SAFE_NO_PAD.decode(raw.trim()).map_err(|_| bad())?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        let sort = v["s"].as_str().ok_or_else(bad)?;
        if sort != self.to_string() {
            return Err(FilterError::new(
                "cursor",
                format!("belongs to a search sorted by {sort}, not {self}"),
            ));
        }
        let id = v["id"].as_i64().ok_or_else(bad)?;
        let k = v["k"].as_str().ok_or_else(bad)?;
        let key = match self.key {
            SortKey::CreatedAt | SortKey::UpdatedAt => {
                CursorKey::Time(DateTime::parse_from_rfc3339(k).map_err(|_| bad())?.with_timezone(&Utc))
            }
            SortKey::Score => CursorKey::Number(k.parse::<f64>().map_err(|_| bad())?),
            SortKey::LastName | SortKey::Email => CursorKey::Text(k.to_string()),
        };
        Ok(Cursor { sort: *self, key, id })
    }
}

/// A position in a sorted search: the last row's sort key and id.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    sort: Sort,
    key: CursorKey,
    id: i64,
}

#[derive(Debug, Clone, PartialEq)]
enum CursorKey {
    Time(DateTime<Utc>),
    Number(f64),
    Text(String),
}

impl Cursor {
    /// Opaque to clients: base64url of `{"s": sort, "k": key as text, "id": id}`. Numbers are written with Rust's
    /// shortest round-trip formatting and times to the nanosecond, so the keyset comparison is exact.
    pub fn encode(&self) -> String {
        let key = match &self.key {
            CursorKey::Time(at) => at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            CursorKey::Number(n) => format!("{n:?}"),
            CursorKey::Text(s) => s.clone(),
        };
        let v = serde_json::json!({ "s": self.sort.to_string(), "k": key, "id": self.id });
        URL_SAFE_NO_PAD.encode(v.to_string())
    }
}

/// Parameters as the slice tokio-postgres takes.
pub fn param_refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn an_unknown_key_or_a_bad_value_is_an_error_naming_the_key() {
        let e = LeadFilter::from_pairs(&pairs(&[("colour", "red")])).unwrap_err();
        assert_eq!(e.field, "colour");
        for (key, value) in [
            ("score_min", "lots"),
            ("created_from", "yesterday"),
            ("temperature", "tepid"),
            ("is_customer", "maybe"),
            ("follow_up_status", "later"),
            ("country", "Germany"),
            ("phone", "call me"),
            ("city", "  "),
        ] {
            let e = LeadFilter::from_pairs(&pairs(&[(key, value)])).unwrap_err();
            assert_eq!(e.field, key, "{key}={value}");
        }
        let e = LeadFilter::from_pairs(&pairs(&[("city", "Berlin"), ("city", "Paris")])).unwrap_err();
        assert_eq!(e.field, "city");
    }

    #[test]
    fn values_are_bound_as_parameters_never_spliced() {
        let f = LeadFilter::from_pairs(&pairs(&[("city", "x'; DROP TABLE leads; --"), ("name", "o'brien")])).unwrap();
        let (sql, params) = f.to_sql(3);
        assert!(!sql.contains("DROP"), "{sql}");
        assert!(!sql.contains("brien"), "{sql}");
        assert!(sql.contains("$3") && sql.contains("$4"), "{sql}");
        assert_eq!(params.len(), 2);
    }

    #[test]
    fn an_empty_filter_is_true() {
        let (sql, params) = LeadFilter::default().to_sql(1);
        assert_eq!(sql, "TRUE");
        assert!(params.is_empty());
    }

    #[test]
    fn json_round_trips_including_repeated_tags() {
        let v = json!({"city": "Berlin", "score_min": 10, "tag": ["vip", "fair"], "is_customer": true});
        let f = LeadFilter::from_json(&v).unwrap();
        let back = LeadFilter::from_json(&f.to_json()).unwrap();
        assert_eq!(f, back);
        assert_eq!(f.to_json()["tag"], json!(["vip", "fair"]));
        assert_eq!(LeadFilter::from_json(&json!(["city"])).unwrap_err().field, "filter");
        assert_eq!(
            LeadFilter::from_json(&json!({"city": {"a": 1}})).unwrap_err().field,
            "city"
        );
    }

    #[test]
    fn like_characters_in_values_are_escaped() {
        assert_eq!(like_pattern("50%_a\\b"), "%50\\%\\_a\\\\b%");
    }

    #[test]
    fn a_date_upper_bound_includes_the_whole_day() {
        let f = LeadFilter::from_pairs(&pairs(&[("created_to", "2026-01-31")])).unwrap();
        let (sql, _) = f.to_sql(1);
        assert!(sql.contains("l.created_at < $1"), "{sql}");
        let f = LeadFilter::from_pairs(&pairs(&[("created_to", "2026-01-31T10:00:00+01:00")])).unwrap();
        let (sql, _) = f.to_sql(1);
        assert!(sql.contains("l.created_at <= $1"), "{sql}");
    }

    #[test]
    fn a_cursor_round_trips_and_is_refused_under_another_sort() {
        let sort = Sort::parse("score:desc").unwrap();
        let cursor = Cursor {
            sort,
            key: CursorKey::Number(0.1 + 0.2),
            id: 42,
        };
        let decoded = sort.decode_cursor(&cursor.encode()).unwrap();
        assert_eq!(decoded, cursor);
        let other = Sort::parse("created_at").unwrap();
        assert_eq!(other.decode_cursor(&cursor.encode()).unwrap_err().field, "cursor");
        assert_eq!(sort.decode_cursor("garbage!").unwrap_err().field, "cursor");
        let at = Sort::default();
        let t = Cursor {
            sort: at,
            key: CursorKey::Time(DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap()),
            id: 7,
        };
        assert_eq!(at.decode_cursor(&t.encode()).unwrap(), t);
    }

    #[test]
    fn sorts_parse_with_an_optional_direction() {
        assert_eq!(Sort::parse("email").unwrap().to_string(), "email:asc");
        assert_eq!(Sort::parse("last_name:desc").unwrap().to_string(), "last_name:desc");
        assert_eq!(Sort::parse("size").unwrap_err().field, "sort");
        assert_eq!(Sort::parse("score:up").unwrap_err().field, "sort");
    }
}
