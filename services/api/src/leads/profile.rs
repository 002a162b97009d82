//! The lead profile as the API shows and takes it: the catalogue of standard fields (what each is, whether it can be
//! edited or is set once), custom field definitions, checking an input object field by field, writing checked values
//! to a lead, and a lead row as JSON. Creating, importing and editing leads all go through here, so a value is
//! accepted or refused the same way whichever door it comes in by.

use chrono::NaiveDate;
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::{json, Map, Value};

use leadflow_shared::domain::EmailAddress;

/// How a standard field may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Any write may change it.
    Editable,
    /// Written once (by the event, import or request that created the lead), refused afterwards.
    Origin,
    /// Kept by leadflow itself (ids, times, score); never taken from input.
    ReadOnly,
}

/// The type of a standard field's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A string of at most `max` characters, no control characters.
    Text {
        max: usize,
    },
    /// A list of strings, each at most `max` characters; `items` at most.
    TextList {
        max: usize,
        items: usize,
    },
    Boolean,
    /// ISO 3166-1 alpha-2, stored upper-case.
    Country,
    /// BCP 47, stored as given with a lower-case primary subtag.
    Language,
    /// An http(s) URL.
    Url,
}

/// One standard profile field: its JSON name is also its column in `leads`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub access: Access,
    /// A fixed set of values kept in a table (`lead_statuses`, `lead_sources`, `contact_methods`, `agents`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_of: Option<&'static str>,
}

const fn text(name: &'static str, max: usize) -> Field {
    Field {
        name,
        kind: Kind::Text { max },
        access: Access::Editable,
        one_of: None,
    }
}

const fn origin(name: &'static str) -> Field {
    Field {
        name,
        kind: Kind::Text { max: 200 },
        access: Access::Origin,
        one_of: None,
    }
}

const fn listed(name: &'static str, table: &'static str) -> Field {
    Field {
        name,
        kind: Kind::Text { max: 100 },
        access: Access::Editable,
        one_of: Some(table),
    }
}

const fn kind(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        access: Access::Editable,
        one_of: None,
    }
}

/// Every standard field a request or an import row may carry (besides `email`, the identity key, and `custom`).
pub const FIELDS: &[Field] = &[
    text("first_name", 200),
    text("last_name", 200),
    text("gender", 40),
    text("title", 100),
    kind("phones", Kind::TextList { max: 40, items: 10 }),
    text("address", 500),
    text("city", 200),
    text("region", 200),
    text("district", 200),
    text("division", 200),
    text("postal_code", 20),
    kind("country", Kind::Country),
    kind("language", Kind::Language),
    text("timezone", 64),
    text("profession", 200),
    text("company_name", 200),
    text("company_size", 40),
    kind("company_website", Kind::Url),
    text("company_sector", 200),
    text("customer_id", 200),
    text("external_id", 200),
    listed("status", "lead_statuses"),
    listed("source", "lead_sources"),
    listed("contact_method", "contact_methods"),
    listed("agent", "agents"),
    kind("is_customer", Kind::Boolean),
    kind("tags", Kind::TextList { max: 100, items: 50 }),
    kind("do_not_call", Kind::Boolean),
    origin("original_source"),
    origin("original_source_category"),
    origin("search_keyword"),
];

/// Fields shown but never taken from input.
pub const READ_ONLY: &[&str] = &["id", "created_at", "updated_at", "score", "score_at", "temperature"];

pub fn field(name: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.name == name)
}

/// The type of a custom field's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomKind {
    Text,
    Number,
    Date,
    Boolean,
    Choice,
}

impl CustomKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Number => "number",
            Self::Date => "date",
            Self::Boolean => "boolean",
            Self::Choice => "choice",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Text, Self::Number, Self::Date, Self::Boolean, Self::Choice]
            .into_iter()
            .find(|k| k.as_str() == raw)
    }
}

/// A custom field as defined in `lead_fields`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CustomField {
    pub name: String,
    pub label: String,
    pub kind: CustomKind,
    pub choices: Vec<String>,
}

/// The most custom fields a deployment may define (also enforced by the database).
pub const MAX_CUSTOM_FIELDS: usize = 30;

/// Every custom field definition, by name.
pub async fn custom_fields(client: &impl GenericClient) -> Result<Vec<CustomField>, tokio_postgres::Error> {
    let rows = client
        .query("SELECT name, label, kind, choices FROM lead_fields ORDER BY name", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| CustomField {
            name: r.get(0),
            label: r.get(1),
            kind: CustomKind::parse(r.get::<_, &str>(2)).unwrap_or(CustomKind::Text),
            choices: r.get(3),
        })
        .collect())
}

/// A value refused: `field` names it (`city`, `custom.birthday`, `phones[1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub detail: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            detail: detail.into(),
        }
    }

    pub fn into_problem(self) -> leadflow_shared::http::Problem {
        leadflow_shared::http::Problem::invalid_field(self.field, self.detail)
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.detail)
    }
}

/// Checked input: standard values (normalised JSON, `null` clears an editable field) and custom values (`null`
/// removes one). Keys are field names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileInput {
    pub standard: Map<String, Value>,
    pub custom: Map<String, Value>,
}

impl ProfileInput {
    pub fn is_empty(&self) -> bool {
        self.standard.is_empty() && self.custom.is_empty()
    }
}

/// Checks every key of `input` (not `email`: the caller handles the identity key). Unknown keys, read-only fields,
/// wrong types and bad values are refused naming the field; `custom` is checked against `defs`.
pub fn check_input(input: &Map<String, Value>, defs: &[CustomField]) -> Result<ProfileInput, FieldError> {
    let mut out = ProfileInput::default();
    for (key, value) in input {
        if key == "email" {
            continue;
        }
        if key == "custom" {
            let Value::Object(custom) = value else {
                return Err(FieldError::new("custom", "must be an object of custom field values"));
            };
            for (name, value) in custom {
                let def = defs.iter().find(|d| &d.name == name).ok_or_else(|| {
                    FieldError::new(
                        format!("custom.{name}"),
                        "no such custom field; define it first (POST /v1/lead-fields)",
                    )
                })?;
                out.custom.insert(name.clone(), check_custom(def, value)?);
            }
            continue;
        }
        if READ_ONLY.contains(&key.as_str()) {
            return Err(FieldError::new(key, "is kept by leadflow and cannot be set"));
        }
        let field = field(key).ok_or_else(|| FieldError::new(key, "unknown field"))?;
        out.standard.insert(key.clone(), check_standard(field, value)?);
    }
    Ok(out)
}

fn clean_text(name: &str, raw: &str, max: usize) -> Result<Option<String>, FieldError> {
    let trimmed = raw.trim();
    if trimmed.chars().any(char::is_control) {
        return Err(FieldError::new(name, "contains a control character"));
    }
    if trimmed.chars().count() > max {
        return Err(FieldError::new(name, format!("longer than {max} characters")));
    }
    Ok((!trimmed.is_empty()).then(|| trimmed.to_string()))
}

/// One standard value, normalised; `null` (or an empty string) clears it.
pub fn check_standard(field: &Field, value: &Value) -> Result<Value, FieldError> {
    let name = field.name;
    let empty = value.is_null() || value.as_str().is_some_and(|s| s.trim().is_empty());
    if empty && name == "status" {
        return Err(FieldError::new(name, "every lead has a status; give one (e.g. Active)"));
    }
    if value.is_null() {
        return Ok(match field.kind {
            Kind::TextList { .. } => json!([]),
            Kind::Boolean => json!(false),
            _ => Value::Null,
        });
    }
    match field.kind {
        Kind::Text { max } => {
            let Value::String(raw) = value else {
                return Err(FieldError::new(name, "must be a string"));
            };
            Ok(clean_text(name, raw, max)?.map_or(Value::Null, Value::String))
        }
        Kind::TextList { max, items } => {
            let list: Vec<Value> = match value {
                Value::Array(list) => list.clone(),
                // A single string is a list of one (handy for phones and tags in imports).
                Value::String(_) => vec![value.clone()],
                _ => return Err(FieldError::new(name, "must be a list of strings")),
            };
            let mut out: Vec<String> = Vec::new();
            for (i, item) in list.iter().enumerate() {
                let Value::String(raw) = item else {
                    return Err(FieldError::new(format!("{name}[{i}]"), "must be a string"));
                };
                if let Some(clean) = clean_text(&format!("{name}[{i}]"), raw, max)? {
                    if !out.contains(&clean) {
                        out.push(clean);
                    }
                }
            }
            if out.len() > items {
                return Err(FieldError::new(name, format!("at most {items} entries")));
            }
            Ok(json!(out))
        }
        Kind::Boolean => parse_bool(value)
            .map(Value::Bool)
            .ok_or_else(|| FieldError::new(name, "must be true or false")),
        Kind::Country => {
            let Value::String(raw) = value else {
                return Err(FieldError::new(name, "must be a string"));
            };
            let code = raw.trim().to_ascii_uppercase();
            if code.is_empty() {
                return Ok(Value::Null);
            }
            if code.len() != 2 || !code.chars().all(|c| c.is_ascii_uppercase()) {
                return Err(FieldError::new(name, "must be an ISO 3166-1 alpha-2 code such as DE"));
            }
            Ok(Value::String(code))
        }
        Kind::Language => {
            let Value::String(raw) = value else {
                return Err(FieldError::new(name, "must be a string"));
            };
            let tag = raw.trim();
            if tag.is_empty() {
                return Ok(Value::Null);
            }
            let mut parts = tag.split(['-', '_']);
            let primary = parts.next().unwrap_or_default();
            let valid = (2..=3).contains(&primary.len())
                && primary.chars().all(|c| c.is_ascii_alphabetic())
                && parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()));
            if !valid {
                return Err(FieldError::new(
                    name,
                    "must be a BCP 47 language tag such as en or de-AT",
                ));
            }
            let rest = &tag[primary.len()..].replace('_', "-");
            Ok(Value::String(format!("{}{rest}", primary.to_ascii_lowercase())))
        }
        Kind::Url => {
            let Value::String(raw) = value else {
                return Err(FieldError::new(name, "must be a string"));
            };
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                return Ok(Value::Null);
            }
            let with_scheme = if trimmed.contains("://") {
                trimmed.to_string()
            } else {
                format!("https://{trimmed}")
            };
            match url::Url::parse(&with_scheme) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() && with_scheme.len() <= 500 => {
                    Ok(Value::String(with_scheme))
                }
                _ => Err(FieldError::new(name, "must be an http or https address")),
            }
        }
    }
}

fn parse_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_i64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" | "x" => Some(true),
            "false" | "no" | "n" | "0" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// One custom value, typed by its definition; `null` (or an empty string) removes it.
pub fn check_custom(def: &CustomField, value: &Value) -> Result<Value, FieldError> {
    let name = format!("custom.{}", def.name);
    if value.is_null() || value.as_str().is_some_and(|s| s.trim().is_empty()) {
        return Ok(Value::Null);
    }
    match def.kind {
        CustomKind::Text => match value {
            Value::String(raw) => Ok(clean_text(&name, raw, 1000)?.map_or(Value::Null, Value::String)),
            Value::Number(n) => Ok(Value::String(n.to_string())),
            _ => Err(FieldError::new(name, "must be text")),
        },
        CustomKind::Number => {
            let number = match value {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().replace(',', ".").parse::<f64>().ok(),
                _ => None,
            };
            number
                .filter(|n| n.is_finite())
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| FieldError::new(name, "must be a number"))
        }
        CustomKind::Date => {
            let Value::String(raw) = value else {
                return Err(FieldError::new(name, "must be a date written YYYY-MM-DD"));
            };
            NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d")
                .map(|d| Value::String(d.format("%Y-%m-%d").to_string()))
                .map_err(|_| FieldError::new(name, "must be a date written YYYY-MM-DD"))
        }
        CustomKind::Boolean => parse_bool(value)
            .map(Value::Bool)
            .ok_or_else(|| FieldError::new(name, "must be true or false")),
        CustomKind::Choice => {
            let Value::String(raw) = value else {
                return Err(FieldError::new(
                    name,
                    format!("must be one of {}", def.choices.join(", ")),
                ));
            };
            def.choices
                .iter()
                .find(|c| c.eq_ignore_ascii_case(raw.trim()))
                .map(|c| Value::String(c.clone()))
                .ok_or_else(|| FieldError::new(name, format!("must be one of {}", def.choices.join(", "))))
        }
    }
}

/// The email of an input object, normalised.
pub fn check_email(input: &Map<String, Value>) -> Result<EmailAddress, FieldError> {
    match input.get("email") {
        Some(Value::String(raw)) => EmailAddress::parse(raw).map_err(|e| FieldError::new("email", e.0)),
        Some(_) => Err(FieldError::new("email", "must be a string")),
        None => Err(FieldError::new("email", "required")),
    }
}

/// Why writing checked values to a lead failed.
#[derive(Debug)]
pub enum WriteError {
    /// A value the database refused for a reason the caller can fix: an origin field already set, a status or
    /// source that is not defined, a customer id another lead has.
    Field(FieldError),
    Database(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        match field_error(&e) {
            Some(field) => Self::Field(field),
            None => Self::Database(e),
        }
    }
}

/// The field a database refusal is about, when it is one the caller can fix.
pub fn field_error(e: &tokio_postgres::Error) -> Option<FieldError> {
    use tokio_postgres::error::SqlState;
    let db = e.as_db_error()?;
    let code = db.code();
    if *code == SqlState::CHECK_VIOLATION && db.column().is_some() {
        return Some(FieldError::new(db.column().unwrap_or_default(), db.message()));
    }
    if *code == SqlState::FOREIGN_KEY_VIOLATION {
        let constraint = db.constraint().unwrap_or_default();
        let column = FIELDS
            .iter()
            .filter_map(|f| f.one_of.map(|table| (f.name, table)))
            .find(|(name, _)| constraint == format!("leads_{name}_fkey"));
        if let Some((name, table)) = column {
            return Some(FieldError::new(
                name,
                format!("not a defined value (see {table}; add it first)"),
            ));
        }
    }
    if *code == SqlState::UNIQUE_VIOLATION {
        match db.constraint() {
            Some("leads_customer_id") => {
                return Some(FieldError::new("customer_id", "another lead has this customer id"))
            }
            Some("leads_email_key") => return Some(FieldError::new("email", "another lead has this email")),
            _ => {}
        }
    }
    None
}

/// Writes checked values to lead `lead_id`: standard fields replaced (origin fields only while unset; a different
/// value is refused), custom values merged (a `null` removes one). Returns the fields whose value changed, as
/// `{"field": {"from": .., "to": ..}}`, for the change log. Runs in the caller's transaction.
pub async fn write(
    tx: &impl GenericClient,
    lead_id: i64,
    input: &ProfileInput,
) -> Result<Map<String, Value>, WriteError> {
    if input.is_empty() {
        return Ok(Map::new());
    }
    let before = lead_values(tx, lead_id).await?;
    let columns: Vec<&str> = input.standard.keys().map(String::as_str).collect();
    // Column names come from FIELDS (checked by check_input), never from the request.
    debug_assert!(columns.iter().all(|c| field(c).is_some()));
    let assignments: String = columns.iter().map(|c| format!("{c} = r.{c}, ")).collect::<String>();
    let sql = format!(
        "UPDATE leads l SET {assignments}
                custom = jsonb_strip_nulls(l.custom || $3::jsonb),
                updated_at = now()
         FROM jsonb_populate_record(NULL::leads, $2::jsonb) r
         WHERE l.id = $1"
    );
    tx.execute(
        &sql,
        &[
            &lead_id,
            &Value::Object(input.standard.clone()),
            &Value::Object(input.custom.clone()),
        ],
    )
    .await?;
    let after = lead_values(tx, lead_id).await?;
    let mut changes = Map::new();
    for name in columns {
        let (from, to) = (&before[name], &after[name]);
        if from != to {
            changes.insert(name.to_string(), json!({"from": from, "to": to}));
        }
    }
    for name in input.custom.keys() {
        let (from, to) = (&before["custom"][name], &after["custom"][name]);
        if from != to {
            changes.insert(format!("custom.{name}"), json!({"from": from, "to": to}));
        }
    }
    Ok(changes)
}

/// The lead's row as JSON (columns only).
async fn lead_values(tx: &impl GenericClient, lead_id: i64) -> Result<Value, tokio_postgres::Error> {
    let row = tx
        .query_one("SELECT to_jsonb(l) FROM leads l WHERE l.id = $1", &[&lead_id])
        .await?;
    Ok(row.get(0))
}

/// The select list (over `leads l`) that [`lead_json`] reads: the row plus the lead's consent state from the
/// suppression list.
pub const SELECT: &str = "to_jsonb(l) AS lead,
    (SELECT coalesce(jsonb_agg(jsonb_build_object('reason', s.reason, 'source', s.source, 'note', s.note,
                                                  'at', s.created_at) ORDER BY s.created_at), '[]')
       FROM suppressions s
      WHERE s.email_hash = encode(sha256(convert_to(l.email, 'UTF8')), 'hex') AND s.campaign_id IS NULL) AS consent";

/// A lead as the API shows it, from a row selected with [`SELECT`]: every profile field, `custom`, `attributes`,
/// and `consent` (`unsubscribed`, `invalid_email`, `suspended`, each null or `{cause, reason, at}`).
pub fn lead_json(row: &tokio_postgres::Row) -> Value {
    let mut lead: Value = row.get("lead");
    let entries: Value = row.get("consent");
    let mut unsubscribed = Value::Null;
    let mut invalid_email = Value::Null;
    let mut suspended = Value::Null;
    for entry in entries.as_array().into_iter().flatten() {
        let shown = json!({
            "cause": entry["source"],
            "reason": entry["note"],
            "at": entry["at"],
        });
        match entry["reason"].as_str() {
            Some("bounced") => invalid_email = shown,
            Some("suspended") => suspended = shown,
            Some("unsubscribed" | "complained" | "manual") => {
                let mut shown = shown;
                if entry["reason"] == "complained" {
                    shown["cause"] = json!("complaint");
                }
                unsubscribed = shown;
            }
            _ => {}
        }
    }
    if let Value::Object(map) = &mut lead {
        map.remove("suppressed_reason");
        map.remove("suppressed_at");
        map.insert(
            "consent".into(),
            json!({
                "unsubscribed": unsubscribed,
                "invalid_email": invalid_email,
                "suspended": suspended,
                "do_not_call": map.get("do_not_call").cloned().unwrap_or(Value::Bool(false)),
                "mailable": unsubscribed.is_null() && invalid_email.is_null() && suspended.is_null(),
            }),
        );
    }
    lead
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn defs() -> Vec<CustomField> {
        vec![
            CustomField {
                name: "birthday".into(),
                label: "Birthday".into(),
                kind: CustomKind::Date,
                choices: vec![],
            },
            CustomField {
                name: "plan".into(),
                label: "Plan".into(),
                kind: CustomKind::Choice,
                choices: vec!["Basic".into(), "Pro".into()],
            },
            CustomField {
                name: "seats".into(),
                label: "Seats".into(),
                kind: CustomKind::Number,
                choices: vec![],
            },
        ]
    }

    #[test]
    fn values_are_normalised() {
        let input = check_input(
            &obj(
                json!({"country": "de", "language": "DE_at", "phones": ["+49 1", " +49 1 ", "+49 2"],
                        "is_customer": "yes", "company_website": "shop.example", "city": "  Köln "}),
            ),
            &[],
        )
        .unwrap();
        assert_eq!(input.standard["country"], "DE");
        assert_eq!(input.standard["language"], "de-at");
        assert_eq!(input.standard["phones"], json!(["+49 1", "+49 2"]));
        assert_eq!(input.standard["is_customer"], true);
        assert_eq!(input.standard["company_website"], "https://shop.example");
        assert_eq!(input.standard["city"], "Köln");
    }

    #[test]
    fn a_bad_value_is_refused_naming_its_field() {
        let refused = |v: Value| check_input(&obj(v), &defs()).unwrap_err().field;
        assert_eq!(refused(json!({"country": "Germany"})), "country");
        assert_eq!(refused(json!({"score": 5})), "score");
        assert_eq!(refused(json!({"colour": "red"})), "colour");
        assert_eq!(refused(json!({"phones": ["ok", 5]})), "phones[1]");
        assert_eq!(
            refused(json!({"custom": {"birthday": "12/01/1990"}})),
            "custom.birthday"
        );
        assert_eq!(refused(json!({"custom": {"plan": "Gold"}})), "custom.plan");
        assert_eq!(refused(json!({"custom": {"nope": 1}})), "custom.nope");
        assert_eq!(refused(json!({"first_name": "a\u{7}b"})), "first_name");
    }

    #[test]
    fn custom_values_are_typed_by_their_definition() {
        let input = check_input(
            &obj(json!({"custom": {"birthday": "1990-01-12", "plan": "pro", "seats": "12,5"}})),
            &defs(),
        )
        .unwrap();
        assert_eq!(input.custom["birthday"], "1990-01-12");
        assert_eq!(input.custom["plan"], "Pro");
        assert_eq!(input.custom["seats"], 12.5);
    }

    #[test]
    fn null_clears_a_value() {
        let input = check_input(
            &obj(json!({"city": null, "tags": null, "custom": {"plan": ""}})),
            &defs(),
        )
        .unwrap();
        assert_eq!(input.standard["city"], Value::Null);
        assert_eq!(input.standard["tags"], json!([]));
        assert_eq!(input.custom["plan"], Value::Null);
    }
}
