//! Installation-wide settings kept in PostgreSQL, changed at run time with `leadflow settings set`.

use std::fmt;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use serde_json::Value;

use crate::domain::{format_delay, parse_delay, Invalid, LeadSource};

/// `sending_enabled`: the global switch. Off: nothing is sent; due follow-ups wait.
pub const SENDING_ENABLED: &str = "sending_enabled";
/// `stale_after`: a follow-up due longer ago than this is not sent late; it ends as cancelled (`expired`).
pub const STALE_AFTER: &str = "stale_after";
/// `attribution_window`: a purchase is credited to the last follow-up sent at most this long before it.
pub const ATTRIBUTION_WINDOW: &str = "attribution_window";
/// `min_delay.<lead source>`: the least time between the event and the first follow-up for that source.
pub const MIN_DELAY_PREFIX: &str = "min_delay.";
/// `frequency_cap`: at most N follow-ups per lead within a period, across every campaign (`2/1d`); `off`: no cap.
pub const FREQUENCY_CAP: &str = "frequency_cap";

/// `scoring.half_life`: a lead's score halves over this period without new points; `off` keeps scores as they are.
pub const SCORING_HALF_LIFE: &str = "scoring.half_life";
/// `scoring.hot`: a score at or above this makes a lead hot.
pub const SCORING_HOT: &str = "scoring.hot";
/// `scoring.warm`: a score at or above this (and below `scoring.hot`) makes a lead warm; below it, cold.
pub const SCORING_WARM: &str = "scoring.warm";
pub const DEFAULT_SCORING_HALF_LIFE: Duration = Duration::from_secs(30 * 86_400);
pub const DEFAULT_SCORING_HOT: f64 = 50.0;
pub const DEFAULT_SCORING_WARM: f64 = 20.0;
/// The largest threshold a user may set (scores of 100 points per rule add up, but not without bound).
pub const MAX_SCORING_THRESHOLD: f64 = 100_000.0;

pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(7 * 86_400);
pub const DEFAULT_ATTRIBUTION_WINDOW: Duration = Duration::from_secs(5 * 86_400);

/// Every key a user may set, with what it takes.
pub fn known_keys() -> Vec<(String, &'static str)> {
    let mut keys = vec![
        (SENDING_ENABLED.to_string(), "true | false"),
        (STALE_AFTER.to_string(), "a duration, e.g. 3d"),
        (ATTRIBUTION_WINDOW.to_string(), "a duration, e.g. 5d"),
        (FREQUENCY_CAP.to_string(), "N/duration, e.g. 2/1d, or off"),
        (SOFT_BOUNCE_LIMIT.to_string(), "a count, e.g. 5 (0: never)"),
        (SOFT_BOUNCE_WINDOW.to_string(), "a duration, e.g. 7d"),
        (SCORING_HALF_LIFE.to_string(), "a duration, e.g. 30d, or off"),
        (SCORING_HOT.to_string(), "a score, e.g. 50"),
        (SCORING_WARM.to_string(), "a score, e.g. 20"),
    ];
    for source in LeadSource::ALL {
        keys.push((format!("{MIN_DELAY_PREFIX}{}", source.as_str()), "a duration, e.g. 1h"));
    }
    keys
}

/// `soft_bounce_limit`: this many transient failures for one address within `soft_bounce_window` suppress it.
pub const SOFT_BOUNCE_LIMIT: &str = "soft_bounce_limit";
/// `soft_bounce_window`: the period soft bounces are counted over.
pub const SOFT_BOUNCE_WINDOW: &str = "soft_bounce_window";
pub const DEFAULT_SOFT_BOUNCE_LIMIT: u32 = 5;
pub const DEFAULT_SOFT_BOUNCE_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// The soft-bounce rule: (limit, window).
pub async fn soft_bounce_rule(client: &impl GenericClient) -> anyhow::Result<(u32, Duration)> {
    let limit = stored(client, SOFT_BOUNCE_LIMIT)
        .await?
        .and_then(|v| v.as_u64())
        .map(|n| n.min(u64::from(u32::MAX)) as u32)
        .unwrap_or(DEFAULT_SOFT_BOUNCE_LIMIT);
    let window = duration(stored(client, SOFT_BOUNCE_WINDOW).await?).unwrap_or(DEFAULT_SOFT_BOUNCE_WINDOW);
    Ok((limit, window))
}

/// Parses a value typed by a user for `key` into what is stored.
pub fn parse_value(key: &str, raw: &str) -> Result<Value, Invalid> {
    if key == SOFT_BOUNCE_LIMIT {
        let n: u32 = raw
            .trim()
            .parse()
            .map_err(|_| Invalid(format!("{key}: expected a whole number, got {raw:?}")))?;
        return Ok(Value::from(n));
    }
    if key == FREQUENCY_CAP {
        let cap = FrequencyCap::parse(raw).map_err(|e| Invalid(format!("{key}: {}", e.0)))?;
        return Ok(Value::String(cap.map_or_else(|| "off".to_string(), |c| c.to_string())));
    }
    if key == SCORING_HALF_LIFE {
        let raw = raw.trim();
        if raw.eq_ignore_ascii_case("off") || raw == "0" {
            return Ok(Value::String("off".into()));
        }
        let d = parse_delay(raw).map_err(|e| Invalid(format!("{key}: {e}")))?;
        if d.as_secs() == 0 {
            return Ok(Value::String("off".into()));
        }
        return Ok(Value::String(format_delay(d)));
    }
    if key == SCORING_HOT || key == SCORING_WARM {
        return raw
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && n.abs() <= MAX_SCORING_THRESHOLD)
            .map(Value::from)
            .ok_or_else(|| {
                Invalid(format!(
                    "{key}: expected a number from -{MAX_SCORING_THRESHOLD} to {MAX_SCORING_THRESHOLD}, got {raw:?}"
                ))
            });
    }
    if key == SENDING_ENABLED {
        return match raw.trim() {
            "true" | "on" | "1" => Ok(Value::Bool(true)),
            "false" | "off" | "0" => Ok(Value::Bool(false)),
            other => Err(Invalid(format!("{key}: expected true or false, got {other:?}"))),
        };
    }
    let is_duration = key == STALE_AFTER
        || key == SOFT_BOUNCE_WINDOW
        || key == ATTRIBUTION_WINDOW
        || key
            .strip_prefix(MIN_DELAY_PREFIX)
            .is_some_and(|s| LeadSource::parse(s).is_ok());
    if is_duration {
        let d = parse_delay(raw).map_err(|e| Invalid(format!("{key}: {e}")))?;
        return Ok(Value::String(format_delay(d)));
    }
    let known: Vec<String> = known_keys().into_iter().map(|k| k.0).collect();
    Err(Invalid(format!("unknown setting {key:?}; known: {}", known.join(", "))))
}

pub async fn set(client: &impl GenericClient, key: &str, raw: &str) -> anyhow::Result<Value> {
    let value = parse_value(key, raw)?;
    client
        .execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
            &[&key, &value],
        )
        .await?;
    Ok(value)
}

/// Every setting with its effective value (stored, or the default).
pub async fn all(client: &impl GenericClient) -> anyhow::Result<Vec<(String, Value)>> {
    let rows = client.query("SELECT key, value FROM settings", &[]).await?;
    let stored: Vec<(String, Value)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(known_keys()
        .into_iter()
        .map(|(key, _)| {
            let value = stored
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| default_of(&key));
            (key, value)
        })
        .collect())
}

fn default_of(key: &str) -> Value {
    match key {
        SENDING_ENABLED => Value::Bool(true),
        STALE_AFTER => Value::String(format_delay(DEFAULT_STALE_AFTER)),
        ATTRIBUTION_WINDOW => Value::String(format_delay(DEFAULT_ATTRIBUTION_WINDOW)),
        FREQUENCY_CAP => Value::String("off".into()),
        SOFT_BOUNCE_LIMIT => Value::from(DEFAULT_SOFT_BOUNCE_LIMIT),
        SOFT_BOUNCE_WINDOW => Value::String(format_delay(DEFAULT_SOFT_BOUNCE_WINDOW)),
        SCORING_HALF_LIFE => Value::String(format_delay(DEFAULT_SCORING_HALF_LIFE)),
        SCORING_HOT => Value::from(DEFAULT_SCORING_HOT),
        SCORING_WARM => Value::from(DEFAULT_SCORING_WARM),
        _ => Value::String("0s".into()),
    }
}

async fn stored(client: &impl GenericClient, key: &str) -> anyhow::Result<Option<Value>> {
    Ok(client
        .query_opt(
            &client
                .prepare_cached("SELECT value FROM settings WHERE key = $1")
                .await?,
            &[&key],
        )
        .await?
        .map(|r| r.get(0)))
}

pub async fn sending_enabled(client: &impl GenericClient) -> anyhow::Result<bool> {
    Ok(stored(client, SENDING_ENABLED)
        .await?
        .and_then(|v| v.as_bool())
        .unwrap_or(true))
}

pub async fn stale_after(client: &impl GenericClient) -> anyhow::Result<Duration> {
    Ok(duration(stored(client, STALE_AFTER).await?).unwrap_or(DEFAULT_STALE_AFTER))
}

pub async fn attribution_window(client: &impl GenericClient) -> anyhow::Result<Duration> {
    Ok(duration(stored(client, ATTRIBUTION_WINDOW).await?).unwrap_or(DEFAULT_ATTRIBUTION_WINDOW))
}

pub async fn min_delay(client: &impl GenericClient, source: LeadSource) -> anyhow::Result<Duration> {
    let key = format!("{MIN_DELAY_PREFIX}{}", source.as_str());
    Ok(duration(stored(client, &key).await?).unwrap_or(Duration::ZERO))
}

/// The frequency cap in force; `None` when it is off (the default). A stored value that no longer parses counts
/// as off rather than stopping every follow-up.
pub async fn frequency_cap(client: &impl GenericClient) -> anyhow::Result<Option<FrequencyCap>> {
    Ok(stored(client, FREQUENCY_CAP)
        .await?
        .and_then(|v| v.as_str().and_then(|s| FrequencyCap::parse(s).ok()))
        .flatten())
}

/// How scores decay and what makes a lead hot or warm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    /// `None`: scores do not decay.
    pub half_life: Option<Duration>,
    pub hot: f64,
    pub warm: f64,
}

impl Default for Scoring {
    fn default() -> Self {
        Self {
            half_life: Some(DEFAULT_SCORING_HALF_LIFE),
            hot: DEFAULT_SCORING_HOT,
            warm: DEFAULT_SCORING_WARM,
        }
    }
}

/// The scoring settings in force. A stored value that no longer parses counts as its default.
pub async fn scoring(client: &impl GenericClient) -> anyhow::Result<Scoring> {
    let rows = client
        .query(
            "SELECT key, value FROM settings WHERE key = ANY ($1)",
            &[&[SCORING_HALF_LIFE, SCORING_HOT, SCORING_WARM].as_slice()],
        )
        .await?;
    let mut out = Scoring::default();
    for row in rows {
        let key: String = row.get(0);
        let value: Value = row.get(1);
        match key.as_str() {
            SCORING_HALF_LIFE => match value.as_str() {
                Some("off") => out.half_life = None,
                Some(text) => {
                    if let Ok(d) = parse_delay(text) {
                        out.half_life = (!d.is_zero()).then_some(d);
                    }
                }
                None => {}
            },
            SCORING_HOT => out.hot = value.as_f64().unwrap_or(DEFAULT_SCORING_HOT),
            SCORING_WARM => out.warm = value.as_f64().unwrap_or(DEFAULT_SCORING_WARM),
            _ => {}
        }
    }
    Ok(out)
}

/// At most `max` follow-ups per lead within any period of length `per`, counted across every campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrequencyCap {
    pub max: u32,
    pub per: Duration,
}

impl FrequencyCap {
    /// The largest count a cap may allow per period.
    pub const MAX_COUNT: u32 = 10_000;

    /// Parses `N/duration` (`2/1d`, `1/12h`, `3/1w`) into a cap, or `off` into `None`.
    pub fn parse(raw: &str) -> Result<Option<Self>, Invalid> {
        let raw = raw.trim();
        if raw.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let (count, period) = raw
            .split_once('/')
            .ok_or_else(|| Invalid(format!("expected N/duration such as 2/1d, or off; got {raw:?}")))?;
        let max: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=Self::MAX_COUNT).contains(n))
            .ok_or_else(|| {
                Invalid(format!(
                    "the count {:?} must be a whole number from 1 to {} (to stop sending, set sending_enabled false)",
                    count.trim(),
                    Self::MAX_COUNT
                ))
            })?;
        let per = parse_delay(period)?;
        if per.as_secs() == 0 || per.subsec_nanos() != 0 {
            return Err(Invalid(format!(
                "the period {:?} must be whole seconds, at least 1s (e.g. 12h, 1d)",
                period.trim()
            )));
        }
        Ok(Some(Self { max, per }))
    }
}

impl fmt::Display for FrequencyCap {
    /// The stored form: `2/1d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.max, format_delay(self.per))
    }
}

fn duration(value: Option<Value>) -> Option<Duration> {
    value.and_then(|v| v.as_str().and_then(|s| parse_delay(s).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_caps_parse_as_count_per_period() {
        assert_eq!(
            FrequencyCap::parse("2/1d").unwrap(),
            Some(FrequencyCap {
                max: 2,
                per: Duration::from_secs(86_400)
            })
        );
        assert_eq!(
            FrequencyCap::parse(" 1 / 12h ").unwrap().unwrap().per,
            Duration::from_secs(43_200)
        );
        assert_eq!(FrequencyCap::parse("OFF").unwrap(), None);
        assert_eq!(
            parse_value("frequency_cap", "3/24h").unwrap(),
            Value::String("3/1d".into())
        );
        assert_eq!(
            parse_value("frequency_cap", "off").unwrap(),
            Value::String("off".into())
        );
        for bad in [
            "2", "0/1d", "-1/1d", "two/1d", "2/", "2/soon", "2/0s", "2/500ms", "10001/1d", "on",
        ] {
            let err = parse_value("frequency_cap", bad).unwrap_err().0;
            assert!(err.starts_with("frequency_cap: "), "{bad:?}: {err}");
        }
        assert_eq!(default_of(FREQUENCY_CAP), Value::String("off".into()));
        assert!(known_keys().iter().any(|(k, _)| k == FREQUENCY_CAP));
        let cap = FrequencyCap::parse("5/1h30m").unwrap().unwrap();
        assert_eq!(FrequencyCap::parse(&cap.to_string()).unwrap(), Some(cap));
    }

    #[test]
    fn scoring_settings_take_a_half_life_or_off_and_numeric_thresholds() {
        assert_eq!(
            parse_value(SCORING_HALF_LIFE, "720h").unwrap(),
            Value::String("30d".into())
        );
        assert_eq!(
            parse_value(SCORING_HALF_LIFE, "off").unwrap(),
            Value::String("off".into())
        );
        assert_eq!(
            parse_value(SCORING_HALF_LIFE, "0").unwrap(),
            Value::String("off".into())
        );
        assert!(parse_value(SCORING_HALF_LIFE, "soon").is_err());
        assert_eq!(parse_value(SCORING_HOT, " 60 ").unwrap(), Value::from(60.0));
        assert_eq!(parse_value(SCORING_WARM, "12.5").unwrap(), Value::from(12.5));
        for bad in ["warm", "NaN", "inf", "1e9"] {
            assert!(parse_value(SCORING_WARM, bad).is_err(), "{bad}");
        }
        assert_eq!(default_of(SCORING_HOT), Value::from(DEFAULT_SCORING_HOT));
    }

    #[test]
    fn values_are_checked_per_key() {
        assert_eq!(parse_value("sending_enabled", "off").unwrap(), Value::Bool(false));
        assert_eq!(parse_value("stale_after", "72h").unwrap(), Value::String("3d".into()));
        assert_eq!(
            parse_value("min_delay.order.unfinished", "60m").unwrap(),
            Value::String("1h".into())
        );
        assert!(parse_value("sending_enabled", "maybe")
            .unwrap_err()
            .0
            .contains("true or false"));
        assert!(parse_value("min_delay.order.lost", "1h")
            .unwrap_err()
            .0
            .contains("unknown setting"));
        assert!(parse_value("stale_after", "soon").is_err());
    }
}
