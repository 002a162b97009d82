//! Domain types: validated email addresses, event types, lead sources, delays, masking for logs.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a value could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// An email address that has been trimmed, lower-cased and checked; the identity key of a lead.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct EmailAddress(String);

impl EmailAddress {
    /// The longest address accepted (RFC 5321 path limit).
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let email = raw.trim().to_lowercase();
        if email.is_empty() {
            return Err(Invalid("email is empty".into()));
        }
        if email.len() > Self::MAX_LEN {
            return Err(Invalid(format!("email is longer than {} characters", Self::MAX_LEN)));
        }
        let (local, domain) = email
            .rsplit_once('@')
            .ok_or_else(|| Invalid("email has no '@'".into()))?;
        if local.is_empty() || local.len() > 64 {
            return Err(Invalid("email local part must be 1 to 64 characters".into()));
        }
        if email
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>()[],;:\\\"".contains(c))
        {
            return Err(Invalid("email contains a character that is not allowed".into()));
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(Invalid("email local part has a misplaced dot".into()));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2
            || labels
                .iter()
                .any(|l| l.is_empty() || l.len() > 63 || l.starts_with('-') || l.ends_with('-'))
            || !domain.chars().all(|c| c.is_alphanumeric() || c == '-' || c == '.')
        {
            return Err(Invalid("email domain is not a valid host name".into()));
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The address with the local part masked, for logs: `a***@example.com`.
    pub fn masked(&self) -> String {
        mask_email(&self.0)
    }
}

impl fmt::Display for EmailAddress {
    /// Displays masked: a full address never reaches a log line by accident.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl<'de> Deserialize<'de> for EmailAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Masks the local part of anything that looks like an address: `ann@example.com` -> `a***@example.com`.
pub fn mask_email(raw: &str) -> String {
    match raw.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".into(),
    }
}

/// The event types of the upstream contract (ARCHITECTURE.md, "Contract with upstream systems").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventType {
    LeadCaptured,
    CheckoutAbandoned,
    OrderUnfinished,
    TrialStarted,
    RenewalDue,
    OrderCompleted,
    LeadUpdated,
    /// `engagement.<what>`: page viewed, form submitted, email clicked.
    Engagement(String),
    LeadUnsubscribed,
    /// The lead's account was suspended upstream (fraud, chargeback, a blocked customer): never mail again.
    LeadSuspended,
    EmailBounced,
    EmailComplained,
}

impl EventType {
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        Ok(match raw {
            "lead.captured" => Self::LeadCaptured,
            "checkout.abandoned" => Self::CheckoutAbandoned,
            "order.unfinished" => Self::OrderUnfinished,
            "trial.started" => Self::TrialStarted,
            "renewal.due" => Self::RenewalDue,
            "order.completed" => Self::OrderCompleted,
            "lead.updated" => Self::LeadUpdated,
            "lead.unsubscribed" => Self::LeadUnsubscribed,
            "lead.suspended" => Self::LeadSuspended,
            "email.bounced" => Self::EmailBounced,
            "email.complained" => Self::EmailComplained,
            other => match other.strip_prefix("engagement.") {
                Some(what)
                    if !what.is_empty()
                        && what.len() <= 64
                        && what.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '.') =>
                {
                    Self::Engagement(what.to_string())
                }
                _ => return Err(Invalid(format!("unknown event type {other:?}"))),
            },
        })
    }

    pub fn as_str(&self) -> String {
        match self {
            Self::LeadCaptured => "lead.captured".into(),
            Self::CheckoutAbandoned => "checkout.abandoned".into(),
            Self::OrderUnfinished => "order.unfinished".into(),
            Self::TrialStarted => "trial.started".into(),
            Self::RenewalDue => "renewal.due".into(),
            Self::OrderCompleted => "order.completed".into(),
            Self::LeadUpdated => "lead.updated".into(),
            Self::Engagement(what) => format!("engagement.{what}"),
            Self::LeadUnsubscribed => "lead.unsubscribed".into(),
            Self::LeadSuspended => "lead.suspended".into(),
            Self::EmailBounced => "email.bounced".into(),
            Self::EmailComplained => "email.complained".into(),
        }
    }

    /// The lead source this event starts nurturing for, if it starts any.
    pub fn lead_source(&self) -> Option<LeadSource> {
        match self {
            Self::CheckoutAbandoned => Some(LeadSource::CheckoutAbandoned),
            Self::OrderUnfinished => Some(LeadSource::OrderUnfinished),
            Self::TrialStarted => Some(LeadSource::TrialStarted),
            Self::RenewalDue => Some(LeadSource::RenewalDue),
            _ => None,
        }
    }
}

/// What a campaign targets: the event type that enrolls a lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LeadSource {
    #[serde(rename = "checkout.abandoned")]
    CheckoutAbandoned,
    #[serde(rename = "order.unfinished")]
    OrderUnfinished,
    #[serde(rename = "trial.started")]
    TrialStarted,
    #[serde(rename = "renewal.due")]
    RenewalDue,
}

impl LeadSource {
    pub const ALL: [LeadSource; 4] = [
        Self::CheckoutAbandoned,
        Self::OrderUnfinished,
        Self::TrialStarted,
        Self::RenewalDue,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::CheckoutAbandoned => "checkout.abandoned",
            Self::OrderUnfinished => "order.unfinished",
            Self::TrialStarted => "trial.started",
            Self::RenewalDue => "renewal.due",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw).ok_or_else(|| {
            Invalid(format!(
                "unknown lead source {raw:?} (expected one of checkout.abandoned, order.unfinished, \
                 trial.started, renewal.due, all)"
            ))
        })
    }
}

/// Parses a delay such as `30s`, `15m`, `2h`, `3d`, `1h30m` or `250ms`.
pub fn parse_delay(raw: &str) -> Result<Duration, Invalid> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(Invalid("delay is empty (use e.g. 30s, 15m, 2h, 3d)".into()));
    }
    let mut total = Duration::ZERO;
    let mut rest = raw;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(Invalid(format!("delay {raw:?} needs a number before {:?}", &rest[..1])));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| Invalid(format!("delay {raw:?} is too long")))?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => n.checked_mul(1).map(Duration::from_secs),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "d" => n.checked_mul(86_400).map(Duration::from_secs),
            "w" => n.checked_mul(7 * 86_400).map(Duration::from_secs),
            "" => return Err(Invalid(format!("delay {raw:?} needs a unit (ms, s, m, h, d, w)"))),
            other => {
                return Err(Invalid(format!(
                    "delay {raw:?} has an unknown unit {other:?} (use ms, s, m, h, d, w)"
                )))
            }
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .filter(|t| t.as_secs() < 100 * 365 * 86_400)
            .ok_or_else(|| Invalid(format!("delay {raw:?} is too long")))?;
    }
    Ok(total)
}

/// Formats seconds as the shortest delay string: 90 -> `1m30s`, 7200 -> `2h`.
pub fn format_delay(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        let e = EmailAddress::parse("  Ann.Lee+shop@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "ann.lee+shop@example.com");
        assert_eq!(e.to_string(), "a***@example.com");
    }

    #[test]
    fn bad_emails_are_refused_with_a_reason() {
        for bad in [
            "",
            "plain",
            "@example.com",
            "ann@",
            "ann@localhost",
            "a b@example.com",
            "ann@exa_mple.com",
            ".ann@example.com",
            "ann..lee@example.com",
            "ann@-example.com",
            "ann@example..com",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(EmailAddress::parse(&long).unwrap_err().0.contains("longer"));
    }

    #[test]
    fn event_types_round_trip() {
        for t in [
            "lead.captured",
            "checkout.abandoned",
            "order.unfinished",
            "trial.started",
            "renewal.due",
            "order.completed",
            "lead.updated",
            "engagement.page_viewed",
            "lead.unsubscribed",
            "lead.suspended",
            "email.bounced",
            "email.complained",
        ] {
            assert_eq!(EventType::parse(t).unwrap().as_str(), t);
        }
        assert!(EventType::parse("checkout.abandonned").is_err());
        assert!(EventType::parse("engagement.").is_err());
        assert_eq!(
            EventType::parse("checkout.abandoned").unwrap().lead_source(),
            Some(LeadSource::CheckoutAbandoned)
        );
        assert_eq!(EventType::parse("order.completed").unwrap().lead_source(), None);
    }

    #[test]
    fn delays_parse_and_format() {
        assert_eq!(parse_delay("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_delay("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_delay("3d").unwrap(), Duration::from_secs(259_200));
        assert_eq!(parse_delay("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_delay("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_delay("30").unwrap_err().0.contains("unit"));
        assert!(parse_delay("3x").is_err());
        assert!(parse_delay("h").is_err());
        assert!(parse_delay("99999999999999999999d").is_err());
        assert_eq!(format_delay(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_delay(Duration::from_secs(30)), "30s");
    }

    #[test]
    fn masking_hides_the_local_part() {
        assert_eq!(mask_email("bob@shop.example"), "b***@shop.example");
        assert_eq!(mask_email("nonsense"), "***");
    }
}
