//! Installation-wide settings kept in PostgreSQL, changed at run time with `leadflow settings set`.

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

pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(7 * 86_400);
pub const DEFAULT_ATTRIBUTION_WINDOW: Duration = Duration::from_secs(5 * 86_400);

/// Every key a user may set, with what it takes.
pub fn known_keys() -> Vec<(String, &'static str)> {
    let mut keys = vec![
        (SENDING_ENABLED.to_string(), "true | false"),
        (STALE_AFTER.to_string(), "a duration, e.g. 3d"),
        (ATTRIBUTION_WINDOW.to_string(), "a duration, e.g. 5d"),
    ];
    for source in LeadSource::ALL {
        keys.push((format!("{MIN_DELAY_PREFIX}{}", source.as_str()), "a duration, e.g. 1h"));
    }
    keys
}

/// Parses a value typed by a user for `key` into what is stored.
pub fn parse_value(key: &str, raw: &str) -> Result<Value, Invalid> {
    if key == SENDING_ENABLED {
        return match raw.trim() {
            "true" | "on" | "1" => Ok(Value::Bool(true)),
            "false" | "off" | "0" => Ok(Value::Bool(false)),
            other => Err(Invalid(format!("{key}: expected true or false, got {other:?}"))),
        };
    }
    let is_duration = key == STALE_AFTER
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
        _ => Value::String("0s".into()),
    }
}

async fn stored(client: &impl GenericClient, key: &str) -> anyhow::Result<Option<Value>> {
    Ok(client
        .query_opt("SELECT value FROM settings WHERE key = $1", &[&key])
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

fn duration(value: Option<Value>) -> Option<Duration> {
    value.and_then(|v| v.as_str().and_then(|s| parse_delay(s).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
