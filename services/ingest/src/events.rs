//! Validation of incoming CloudEvents 1.0 (structured JSON) into lead events the pipeline can trust.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use leadflow_shared::config::IdentityKey;
use leadflow_shared::domain::{EmailAddress, EventType};

/// A field that failed validation: a JSON pointer into the event and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Profile fields an event may carry; `None` leaves the lead's stored value alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub country: Option<String>,
    pub language: Option<String>,
    pub timezone: Option<String>,
    pub attributes: Map<String, Value>,
}

/// An event that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct LeadEvent {
    pub source: String,
    pub id: String,
    pub event_type: EventType,
    pub time: DateTime<Utc>,
    pub email: EmailAddress,
    /// `data.customer_id`, trimmed; required when leads are keyed on it.
    pub customer_id: Option<String>,
    /// What finds the event's lead (`LEADFLOW_IDENTITY_KEY`): its email, or its customer id.
    pub identity: IdentityKey,
    pub profile: Profile,
    /// The event's `data`, normalised (email lower-cased, country upper-cased), kept on the timeline.
    pub data: Value,
}

pub const MAX_ID_LEN: usize = 256;
pub const MAX_SOURCE_LEN: usize = 512;
const MAX_NAME_LEN: usize = 200;
const MAX_TEXT_LEN: usize = 2000;

/// Validates one structured CloudEvent; the error names the first offending field as a JSON pointer. With
/// `identity` [`IdentityKey::CustomerId`] the event must carry `data.customer_id`.
pub fn parse_event(value: &Value, identity: IdentityKey) -> Result<LeadEvent, FieldError> {
    let obj = value
        .as_object()
        .ok_or_else(|| bad("/", "an event must be a JSON object"))?;

    match obj.get("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        Some(_) => return Err(bad("/specversion", "must be \"1.0\"")),
        None => return Err(bad("/specversion", "is required")),
    }
    let id = required_string(obj, "id", "/id", MAX_ID_LEN)?;
    let source = required_string(obj, "source", "/source", MAX_SOURCE_LEN)?;
    let type_raw = required_string(obj, "type", "/type", 128)?;
    let event_type = EventType::parse(&type_raw).map_err(|e| bad("/type", e.0))?;
    let time = match obj.get("time") {
        None | Some(Value::Null) => Utc::now(),
        Some(Value::String(t)) => DateTime::parse_from_rfc3339(t)
            .map_err(|e| bad("/time", format!("not an RFC 3339 timestamp: {e}")))?
            .with_timezone(&Utc),
        Some(_) => return Err(bad("/time", "must be an RFC 3339 timestamp string")),
    };
    if let Some(ct) = obj.get("datacontenttype") {
        match ct.as_str() {
            Some(ct) if ct.starts_with("application/json") => {}
            _ => return Err(bad("/datacontenttype", "only application/json data is accepted")),
        }
    }
    let data = match obj.get("data") {
        Some(Value::Object(d)) => d,
        Some(_) => return Err(bad("/data", "must be a JSON object")),
        None => return Err(bad("/data", "is required (it carries at least the email)")),
    };
    let mut data = data.clone();

    let email_raw = match data.get("email") {
        Some(Value::String(e)) => e.clone(),
        Some(_) => return Err(bad("/data/email", "must be a string")),
        None => return Err(bad("/data/email", "is required")),
    };
    let email = EmailAddress::parse(&email_raw).map_err(|e| bad("/data/email", e.0))?;
    data.insert("email".into(), Value::String(email.as_str().to_string()));

    let mut profile = Profile {
        first_name: optional_string(&data, "first_name", MAX_NAME_LEN)?,
        last_name: optional_string(&data, "last_name", MAX_NAME_LEN)?,
        phone: optional_string(&data, "phone", 40)?,
        ..Default::default()
    };
    if let Some(country) = optional_string(&data, "country", 2)? {
        if country.len() != 2 || !country.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(bad("/data/country", "must be an ISO 3166-1 alpha-2 code such as DE"));
        }
        let country = country.to_ascii_uppercase();
        data.insert("country".into(), Value::String(country.clone()));
        profile.country = Some(country);
    }
    if let Some(language) = optional_string(&data, "language", 35)? {
        if !is_language_tag(&language) {
            return Err(bad(
                "/data/language",
                "must be a BCP 47 language tag such as en or de-AT",
            ));
        }
        profile.language = Some(language);
    }
    if let Some(tz) = optional_string(&data, "timezone", 64)? {
        if !(tz == "UTC" || tz.contains('/')) || tz.chars().any(|c| c.is_whitespace()) {
            return Err(bad("/data/timezone", "must be an IANA time zone such as Europe/Berlin"));
        }
        profile.timezone = Some(tz);
    }
    if let Some(product) = data.get("product") {
        validate_product(product)?;
    }
    for field in ["amount"] {
        if let Some(v) = data.get(field) {
            let ok = match v {
                Value::Number(n) => n.as_f64().is_some_and(|f| f.is_finite() && f >= 0.0),
                Value::String(s) => s.parse::<f64>().is_ok_and(|f| f.is_finite() && f >= 0.0),
                Value::Null => true,
                _ => false,
            };
            if !ok {
                return Err(bad(&format!("/data/{field}"), "must be a non-negative number"));
            }
        }
    }
    if let Some(currency) = optional_string(&data, "currency", 3)? {
        if !is_currency(&currency) {
            return Err(bad("/data/currency", "must be an ISO 4217 code such as EUR"));
        }
    }
    for field in ["order_id", "checkout_id", "source"] {
        optional_string(&data, field, MAX_ID_LEN)?;
    }
    let customer_id = optional_string(&data, "customer_id", MAX_ID_LEN)?;
    if identity == IdentityKey::CustomerId && customer_id.is_none() {
        return Err(bad(
            "/data/customer_id",
            "is required: leads are identified by customer id here (LEADFLOW_IDENTITY_KEY=customer_id)",
        ));
    }
    match data.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tags)) if tags.iter().all(|t| t.as_str().is_some_and(|s| s.len() <= 64)) => {}
        Some(_) => return Err(bad("/data/tags", "must be a list of strings of at most 64 characters")),
    }
    match data.get("attributes") {
        None | Some(Value::Null) => {}
        Some(Value::Object(attrs)) => profile.attributes = attrs.clone(),
        Some(_) => return Err(bad("/data/attributes", "must be a JSON object")),
    }

    Ok(LeadEvent {
        source,
        id,
        event_type,
        time,
        email,
        customer_id,
        identity,
        profile,
        data: Value::Object(data),
    })
}

fn validate_product(product: &Value) -> Result<(), FieldError> {
    let p = product
        .as_object()
        .ok_or_else(|| bad("/data/product", "must be a JSON object"))?;
    for field in ["sku", "name", "url"] {
        match p.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.chars().count() <= MAX_TEXT_LEN => {}
            Some(_) => {
                return Err(bad(
                    &format!("/data/product/{field}"),
                    format!("must be a string of at most {MAX_TEXT_LEN} characters"),
                ))
            }
        }
    }
    if let Some(url) = p.get("url").and_then(Value::as_str) {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(bad("/data/product/url", "must be an http(s) URL"));
        }
    }
    match p.get("price") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_f64().is_some_and(|f| f.is_finite() && f >= 0.0) => {}
        Some(_) => return Err(bad("/data/product/price", "must be a non-negative number")),
    }
    match p.get("currency").map(|c| c.as_str()) {
        None => {}
        Some(Some(c)) if is_currency(c) => {}
        Some(_) => return Err(bad("/data/product/currency", "must be an ISO 4217 code such as EUR")),
    }
    Ok(())
}

fn required_string(obj: &Map<String, Value>, key: &str, field: &str, max: usize) -> Result<String, FieldError> {
    match obj.get(key) {
        Some(Value::String(s)) if s.trim().is_empty() => Err(bad(field, "must not be empty")),
        Some(Value::String(s)) if s.len() > max => Err(bad(field, format!("must be at most {max} bytes"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(field, "must be a string")),
        None => Err(bad(field, "is required")),
    }
}

fn optional_string(data: &Map<String, Value>, key: &str, max: usize) -> Result<Option<String>, FieldError> {
    match data.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() > max => Err(bad(
            &format!("/data/{key}"),
            format!("must be at most {max} characters"),
        )),
        Some(Value::String(s)) if s.chars().any(|c| c.is_control()) => {
            Err(bad(&format!("/data/{key}"), "must not contain control characters"))
        }
        Some(Value::String(s)) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        Some(_) => Err(bad(&format!("/data/{key}"), "must be a string")),
    }
}

fn is_language_tag(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let primary = parts.next().unwrap_or_default();
    (2..=3).contains(&primary.len())
        && primary.chars().all(|c| c.is_ascii_alphabetic())
        && parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

fn is_currency(c: &str) -> bool {
    c.len() == 3 && c.chars().all(|c| c.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "specversion": "1.0",
            "id": "evt-1",
            "source": "shop/checkout",
            "type": "checkout.abandoned",
            "time": "2026-11-20T10:00:00Z",
            "data": {
                "email": " Ann@Example.com ",
                "first_name": "Ann",
                "country": "de",
                "language": "de-AT",
                "product": {"sku": "SKU-1", "name": "Kettle", "price": 49.5, "currency": "EUR", "url": "https://shop.example/k"}
            }
        })
    }

    fn field_of(mut event: Value, edit: impl FnOnce(&mut Value)) -> String {
        edit(&mut event);
        parse_event(&event, IdentityKey::Email).unwrap_err().field
    }

    #[test]
    fn a_valid_event_is_normalised() {
        let e = parse_event(&valid(), IdentityKey::Email).unwrap();
        assert_eq!(e.email.as_str(), "ann@example.com");
        assert_eq!(e.profile.country.as_deref(), Some("DE"));
        assert_eq!(e.profile.language.as_deref(), Some("de-AT"));
        assert_eq!(e.data["email"], "ann@example.com");
        assert_eq!(e.event_type, EventType::CheckoutAbandoned);
    }

    #[test]
    fn each_invalid_field_is_named() {
        assert_eq!(field_of(valid(), |e| e["specversion"] = json!("0.3")), "/specversion");
        assert_eq!(field_of(valid(), |e| e["id"] = json!("")), "/id");
        assert_eq!(
            field_of(valid(), |e| {
                e.as_object_mut().unwrap().remove("id");
            }),
            "/id"
        );
        assert_eq!(field_of(valid(), |e| e["type"] = json!("checkout.left")), "/type");
        assert_eq!(field_of(valid(), |e| e["time"] = json!("yesterday")), "/time");
        assert_eq!(field_of(valid(), |e| e["data"] = json!([1])), "/data");
        assert_eq!(
            field_of(valid(), |e| e["data"]["email"] = json!("not-an-email")),
            "/data/email"
        );
        assert_eq!(
            field_of(valid(), |e| e["data"]["country"] = json!("Germany")),
            "/data/country"
        );
        assert_eq!(
            field_of(valid(), |e| e["data"]["language"] = json!("deutsch!")),
            "/data/language"
        );
        assert_eq!(
            field_of(valid(), |e| e["data"]["product"]["price"] = json!(-1)),
            "/data/product/price"
        );
        assert_eq!(
            field_of(valid(), |e| e["data"]["product"]["url"] = json!("javascript:alert(1)")),
            "/data/product/url"
        );
        assert_eq!(
            field_of(valid(), |e| e["data"]["amount"] = json!("lots")),
            "/data/amount"
        );
        assert_eq!(
            field_of(valid(), |e| e["data"]["currency"] = json!("euro")),
            "/data/currency"
        );
        assert_eq!(
            field_of(valid(), |e| e["data"]["first_name"] = json!("x".repeat(201))),
            "/data/first_name"
        );
        assert_eq!(
            field_of(valid(), |e| e["data"]["first_name"] = json!("Ann\nBcc: x")),
            "/data/first_name"
        );
        assert_eq!(field_of(valid(), |e| e["id"] = json!("x".repeat(300))), "/id");
    }

    #[test]
    fn keyed_by_customer_id_an_event_must_carry_it() {
        let refused = parse_event(&valid(), IdentityKey::CustomerId).unwrap_err();
        assert_eq!(refused.field, "/data/customer_id");
        let mut event = valid();
        event["data"]["customer_id"] = json!("  C-17 ");
        let e = parse_event(&event, IdentityKey::CustomerId).unwrap();
        assert_eq!(e.customer_id.as_deref(), Some("C-17"));
        assert_eq!(e.identity, IdentityKey::CustomerId);
        assert_eq!(parse_event(&valid(), IdentityKey::Email).unwrap().customer_id, None);
    }
}
