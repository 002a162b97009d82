//! Typed configuration from `LEADFLOW_*` environment variables, validated at start-up.
//!
//! Every field has a default in code; an invalid value is an error naming the variable. Secrets (database and
//! broker URLs carry passwords) are wrapped in [`SecretString`] so they never reach a log line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::domain::{parse_delay, EmailAddress};
use crate::tokens::Keyring;

/// A configuration value that could not be used, naming the variable that holds it.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    pub var: String,
    pub reason: String,
}

/// Where configuration values come from: the process environment, or a map in tests.
#[derive(Debug, Clone, Default)]
pub struct Source {
    values: HashMap<String, String>,
}

impl Source {
    /// Every `LEADFLOW_*` variable of the current process.
    pub fn from_env() -> Self {
        Self {
            values: std::env::vars().filter(|(k, _)| k.starts_with("LEADFLOW_")).collect(),
        }
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self {
            values: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        }
    }

    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.values.insert(key.into(), value.into());
    }

    fn get(&self, var: &str) -> Option<&str> {
        self.values.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.get(var).unwrap_or(default).to_string()
    }

    fn parse<T: std::str::FromStr>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(var) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|e: T::Err| ConfigError {
                var: var.to_string(),
                reason: format!("cannot parse {raw:?}: {e}"),
            }),
        }
    }

    fn duration(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(raw) => parse_delay(raw).map_err(|e| ConfigError {
                var: var.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    fn positive(&self, var: &str, default: usize) -> Result<usize, ConfigError> {
        let value: usize = self.parse(var, default)?;
        if value == 0 {
            return Err(ConfigError {
                var: var.to_string(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(value)
    }
}

/// The whole configuration of a leadflow process; each service reads the parts it needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub amqp: AmqpConfig,
    pub smtp: SmtpConfig,
    pub http: HttpConfig,
    pub scheduler: SchedulerConfig,
    pub sender: SenderConfig,
    pub notify: NotifyConfig,
    pub mail: MailConfig,
    pub leads: LeadsConfig,
    /// `LEADFLOW_DKIM_*`: DKIM signing of every email; `None` when none of the variables is set.
    pub dkim: Option<DkimConfig>,
    pub log: LogConfig,
}

/// DKIM signing (RFC 6376): the domain, the selector and the private key, all three or none.
#[derive(Debug, Clone)]
pub struct DkimConfig {
    /// `LEADFLOW_DKIM_DOMAIN`: the signing domain (`d=`), the From address's domain or a parent of it (DMARC).
    pub domain: String,
    /// `LEADFLOW_DKIM_SELECTOR`: the selector (`s=`); the public key is published at
    /// `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// `LEADFLOW_DKIM_PRIVATE_KEY` (PEM text) or `LEADFLOW_DKIM_PRIVATE_KEY_FILE` (a PEM file): RSA (PKCS#1 or
    /// PKCS#8) or Ed25519 (PKCS#8), unencrypted.
    pub key: DkimKey,
    /// The variable the key came from, for errors about it.
    pub key_var: &'static str,
}

/// A DKIM private key, decoded from PEM at start-up.
#[derive(Clone, PartialEq, Eq)]
pub enum DkimKey {
    /// An RSA key: its PKCS#1 `RSAPrivateKey` DER.
    Rsa(Vec<u8>),
    /// An Ed25519 key (RFC 8463): its 32-byte seed.
    Ed25519([u8; 32]),
}

impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        write!(f, "DkimKey::{}(..)", self.algorithm())
    }
}

/// DER object identifiers of the key algorithms (contents of the OID, without tag and length).
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

impl DkimKey {
    /// `rsa` or `ed25519`, as in the DKIM `a=` and `k=` tags.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Self::Rsa(_) => "rsa",
            Self::Ed25519(_) => "ed25519",
        }
    }

    /// Decodes a PEM private key: `RSA PRIVATE KEY` (PKCS#1) or `PRIVATE KEY` (PKCS#8, RSA or Ed25519). A value
    /// written with literal `\n` for line breaks (common in `.env` files) is accepted too.
    pub fn from_pem(text: &str) -> Result<Self, String> {
        let text = text.replace("\\n", "\n");
        let begin = text
            .find("-----BEGIN ")
            .ok_or("expected a PEM private key (-----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)")?;
        let rest = &text[begin + "-----BEGIN ".len()..];
        let label_end = rest.find("-----").ok_or("a PEM header without its closing dashes")?;
        let label = &rest[..label_end];
        let body = &rest[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let body = &body[..body.find(&end_marker).ok_or_else(|| format!("no {end_marker} line"))?];
        let clean: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD
            .decode(clean.as_bytes())
            .map_err(|e| format!("the PEM body is not base64: {e}"))?;
        match label {
            "RSA PRIVATE KEY" => rsa_pkcs1(&der).map(|()| Self::Rsa(der)),
            "PRIVATE KEY" => Self::from_pkcs8(&der),
            "ENCRYPTED PRIVATE KEY" => Err("an encrypted key; export it unencrypted (openssl pkey -in key.pem)".into()),
            "PUBLIC KEY" | "RSA PUBLIC KEY" => Err("a public key; the private key is needed".into()),
            other => Err(format!(
                "a {other:?} PEM block; expected PRIVATE KEY (PKCS#8) or RSA PRIVATE KEY (PKCS#1)"
            )),
        }
    }

    /// PKCS#8 `PrivateKeyInfo`: version, algorithm identifier, the key in an OCTET STRING.
    fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let malformed = || "a malformed PKCS#8 key".to_string();
        let (info, _) = der_expect(der, 0x30).ok_or_else(malformed)?;
        let (_version, rest) = der_expect(info, 0x02).ok_or_else(malformed)?;
        let (algorithm, rest) = der_expect(rest, 0x30).ok_or_else(malformed)?;
        let (oid, _) = der_expect(algorithm, 0x06).ok_or_else(malformed)?;
        let (key, _) = der_expect(rest, 0x04).ok_or_else(malformed)?;
        if oid == OID_RSA_ENCRYPTION {
            rsa_pkcs1(key)?;
            Ok(Self::Rsa(key.to_vec()))
        } else if oid == OID_ED25519 {
            // CurvePrivateKey ::= OCTET STRING (the 32-byte seed).
            let (seed, _) = der_expect(key, 0x04).ok_or_else(malformed)?;
            let seed: [u8; 32] = seed
                .try_into()
                .map_err(|_| "an Ed25519 key must hold 32 bytes".to_string())?;
            Ok(Self::Ed25519(seed))
        } else {
            Err("an unsupported key algorithm; use RSA (2048 bits or more) or Ed25519".into())
        }
    }
}

/// Checks a PKCS#1 `RSAPrivateKey`: two-prime version 0 with nine integers and a modulus of at least 1024 bits.
fn rsa_pkcs1(der: &[u8]) -> Result<(), String> {
    let malformed = || "a malformed RSA key".to_string();
    let (mut fields, _) = der_expect(der, 0x30).ok_or_else(malformed)?;
    let mut integers = Vec::with_capacity(9);
    while !fields.is_empty() {
        let (value, rest) = der_expect(fields, 0x02).ok_or_else(malformed)?;
        integers.push(value);
        fields = rest;
    }
    if integers.len() != 9 || integers[0] != [0] {
        return Err("an RSA key must be a two-prime PKCS#1 key".into());
    }
    let modulus = integers[1];
    let bits = modulus.iter().skip_while(|b| **b == 0).count() * 8;
    if bits < 1024 {
        return Err(format!(
            "an RSA key of about {bits} bits; DKIM needs at least 1024 (2048 recommended)"
        ));
    }
    Ok(())
}

/// One DER element with tag `tag` at the start of `input`: its contents and what follows it.
fn der_expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |len, b| (len << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Consent and deliverability: unsubscribe links, signed tokens, the bounce domain.
#[derive(Debug, Clone)]
pub struct MailConfig {
    /// `LEADFLOW_PUBLIC_URL`: where people reach the unsubscribe page (`<url>/u/<token>`), e.g. https://mail.shop.example.
    pub public_url: String,
    /// `LEADFLOW_TOKEN_KEYS`: `id:secret[,id:secret]` signing unsubscribe and bounce tokens; the first signs, all
    /// verify (rotation). Unset: a random key per process (development only: links break on restart).
    pub keyring: Keyring,
    /// Whether the keyring came from `LEADFLOW_TOKEN_KEYS` (false: a throwaway development key).
    pub keyring_configured: bool,
    /// `LEADFLOW_BOUNCE_DOMAIN`: the domain of VERP return paths (`bounces+<token>@<domain>`) and of the mailto
    /// unsubscribe address (`unsubscribe@<domain>`). Unset: the From address's domain.
    pub bounce_domain: String,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `LEADFLOW_DATABASE_URL`: the PostgreSQL system of record.
    pub url: SecretString,
    /// `LEADFLOW_DATABASE_POOL_SIZE`: connections per process.
    pub pool_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Classic queues (version 2): a single RabbitMQ node, a laptop, CI.
    Classic,
    /// Quorum queues: a replicated RabbitMQ cluster in production.
    Quorum,
}

#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `LEADFLOW_AMQP_URL`: the RabbitMQ broker carrying work between services.
    pub url: SecretString,
    /// `LEADFLOW_NAMESPACE`: prefix of every exchange and queue, so several installations share one vhost.
    pub namespace: String,
    /// `LEADFLOW_AMQP_PREFETCH`: unacknowledged deliveries a consumer holds at once.
    pub prefetch: u16,
    /// `LEADFLOW_AMQP_EVENTS_PREFETCH`: the same for ingest's consumer of `<ns>.events`, whose messages are single
    /// events stored many per transaction: it bounds that batch (half of it, so the next batch arrives while one
    /// is stored).
    pub events_prefetch: u16,
    /// `LEADFLOW_AMQP_EVENTS_CONSUMERS`: consumers of `<ns>.events` per ingest process, each on its own channel
    /// and storing its own batches. More than one (like more than one ingest replica) stores events of separate
    /// messages side by side, so their order across messages is not kept.
    pub events_consumers: usize,
    /// `LEADFLOW_AMQP_QUEUE_TYPE`: `classic` or `quorum`.
    pub queue_type: QueueType,
    /// `LEADFLOW_AMQP_QUEUE_EXPIRES`: delete queues unused for this long (test installations only).
    pub queue_expires: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmtpTarget {
    /// `smtp://host:port` (plain, or STARTTLS when offered) or `smtps://host:port` (implicit TLS).
    Relay {
        host: String,
        port: u16,
        implicit_tls: bool,
        user: Option<String>,
        password: Option<String>,
    },
    /// `file:///dir`: each message written to the folder as an `.eml` file (a local outbox).
    Outbox(PathBuf),
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// `LEADFLOW_SMTP_URL`: where email goes.
    pub target: SmtpTarget,
    /// `LEADFLOW_FROM`: the From address of every follow-up.
    pub from: EmailAddress,
    /// `LEADFLOW_FROM_NAME`: the display name beside it.
    pub from_name: String,
    /// `LEADFLOW_SMTP_TIMEOUT`: a reply slower than this is a transient failure.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `LEADFLOW_HTTP_ADDR`: where the HTTP API (ingest) and `/metrics`, `/healthz`, `/readyz` listen.
    pub addr: SocketAddr,
    /// `LEADFLOW_MAX_BODY_BYTES`: the largest request body accepted.
    pub max_body_bytes: usize,
    /// `LEADFLOW_MAX_BATCH`: the most events in one batch request.
    pub max_batch: usize,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// `LEADFLOW_SCHEDULER_TICK`: how often due deliveries are claimed.
    pub tick: Duration,
    /// `LEADFLOW_SCHEDULER_BATCH`: deliveries claimed per transaction.
    pub batch: usize,
    /// `LEADFLOW_LEASE`: a delivery queued or rendered this long without progress is handed out again.
    pub lease: Duration,
    /// `LEADFLOW_SWEEP_AFTER`: an accepted event not handed to the scheduler after this long is handed again.
    pub sweep_after: Duration,
}

#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// `LEADFLOW_SENDER_CONCURRENCY`: SMTP transactions in flight per process.
    pub concurrency: usize,
    /// `LEADFLOW_SENDER_MAX_ATTEMPTS`: attempts before a transient failure becomes final.
    pub max_attempts: i32,
    /// `LEADFLOW_RETRY_BASE`: first retry delay; each further attempt doubles it.
    pub retry_base: Duration,
    /// `LEADFLOW_SEND_RATE`: emails per process, e.g. `50` (per second) or `3000/m`; unset: unlimited.
    pub send_rate: Option<Rate>,
    /// `LEADFLOW_DOMAIN_RATES`: per recipient domain, e.g. `gmail.com=5/s,yahoo.com=100/m` (lower-cased domains).
    pub domain_rates: Vec<(String, Rate)>,
}

/// A sending rate: `count` emails per `per`, with bursts of up to `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// `N` (per second) or `N/s`, `N/m`, `N/h`, `N/d`; N at least 1.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let (count, unit) = raw.split_once('/').unwrap_or((raw, "s"));
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("expected a whole number of emails, such as 5/s or 100/m, got {raw:?}"))?;
        if count == 0 {
            return Err(format!("a rate must allow at least one email, got {raw:?}"));
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => return Err(format!("unknown rate unit {other:?} (use s, m, h or d)")),
        };
        Ok(Self { count, per })
    }

    /// `gmail.com=5/s,yahoo.com=100/m`: each domain once, lower-cased.
    pub fn parse_domains(raw: &str) -> Result<Vec<(String, Self)>, String> {
        let mut out: Vec<(String, Self)> = Vec::new();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (domain, rate) = entry
                .split_once('=')
                .ok_or_else(|| format!("expected domain=rate, got {entry:?}"))?;
            let domain = domain.trim().trim_start_matches('@').to_ascii_lowercase();
            if domain.is_empty() || domain.contains(['@', ' ', '/']) {
                return Err(format!("not a domain: {domain:?}"));
            }
            if out.iter().any(|(d, _)| *d == domain) {
                return Err(format!("{domain} is listed twice"));
            }
            out.push((domain, Self::parse(rate)?));
        }
        Ok(out)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            60 => "m",
            3600 => "h",
            86_400 => "d",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Instant lead notifications: signed JSON POSTs to a campaign's `notify_url`.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// `LEADFLOW_NOTIFY_SECRET`: the HMAC-SHA256 key of `X-Leadflow-Signature`. Unset: notifications fail
    /// (they are never sent unsigned).
    pub secret: Option<SecretString>,
    /// `LEADFLOW_NOTIFY_RETRY_BASE`: wait after the first failed attempt; each further failure doubles it.
    pub retry_base: Duration,
    /// `LEADFLOW_NOTIFY_MAX_ATTEMPTS`: attempts before a notification is given up as failed.
    pub max_attempts: i32,
    /// `LEADFLOW_NOTIFY_TIMEOUT`: an endpoint slower than this to answer counts as a failed attempt.
    pub timeout: Duration,
}

/// Lead records: what recognises a person as a lead that exists already.
#[derive(Debug, Clone)]
pub struct LeadsConfig {
    /// `LEADFLOW_IDENTITY_KEY`: `email` (default) or `customer_id`. With `customer_id`, events, `POST /v1/leads`
    /// and imports must carry the customer id and find the lead by it; the email travels with the lead and
    /// follows the customer's latest address. Read once at start-up; every process of a deployment must agree.
    pub identity_key: IdentityKey,
}

/// The field that identifies a lead (see [`LeadsConfig::identity_key`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IdentityKey {
    /// The normalised email address: a new address is a new lead.
    #[default]
    Email,
    /// The shop's customer id: the same customer with a new address is the same lead, with its email updated.
    CustomerId,
}

impl IdentityKey {
    /// The field's name, as requests and errors spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::CustomerId => "customer_id",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `LEADFLOW_LOG_FORMAT`: `json` (production) or `pretty` (a terminal).
    pub format: LogFormat,
    /// `LEADFLOW_LOG`: a tracing filter, e.g. `info` or `leadflow_sender=debug`.
    pub filter: String,
}

impl Config {
    /// Reads and validates every variable; the first invalid one is the error.
    pub fn load(src: &Source) -> Result<Self, ConfigError> {
        let database = DatabaseConfig {
            url: SecretString::from(src.string("LEADFLOW_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/leadflow")),
            pool_size: src.positive("LEADFLOW_DATABASE_POOL_SIZE", 16)?,
        };
        validate_url(
            "LEADFLOW_DATABASE_URL",
            database.url.expose_secret(),
            &["postgres", "postgresql"],
        )?;

        let amqp = AmqpConfig {
            url: SecretString::from(src.string("LEADFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")),
            namespace: src.string("LEADFLOW_NAMESPACE", "leadflow"),
            prefetch: src.parse("LEADFLOW_AMQP_PREFETCH", 64u16)?,
            events_prefetch: src.parse("LEADFLOW_AMQP_EVENTS_PREFETCH", 1024u16)?,
            events_consumers: src.positive("LEADFLOW_AMQP_EVENTS_CONSUMERS", 1)?,
            queue_type: match src.string("LEADFLOW_AMQP_QUEUE_TYPE", "classic").as_str() {
                "classic" => QueueType::Classic,
                "quorum" => QueueType::Quorum,
                other => {
                    return Err(ConfigError {
                        var: "LEADFLOW_AMQP_QUEUE_TYPE".into(),
                        reason: format!("expected classic or quorum, got {other:?}"),
                    })
                }
            },
            queue_expires: match src.get("LEADFLOW_AMQP_QUEUE_EXPIRES") {
                None => None,
                Some(_) => Some(src.duration("LEADFLOW_AMQP_QUEUE_EXPIRES", Duration::ZERO)?),
            },
        };
        validate_url("LEADFLOW_AMQP_URL", amqp.url.expose_secret(), &["amqp", "amqps"])?;
        if amqp.prefetch == 0 {
            return Err(ConfigError {
                var: "LEADFLOW_AMQP_PREFETCH".into(),
                reason: "must be at least 1".into(),
            });
        }
        if amqp.events_prefetch == 0 {
            return Err(ConfigError {
                var: "LEADFLOW_AMQP_EVENTS_PREFETCH".into(),
                reason: "must be at least 1".into(),
            });
        }
        if amqp.namespace.is_empty()
            || !amqp
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(ConfigError {
                var: "LEADFLOW_NAMESPACE".into(),
                reason: "use letters, digits, '-', '_' and '.' only".into(),
            });
        }

        let smtp = SmtpConfig {
            target: parse_smtp_url(&src.string("LEADFLOW_SMTP_URL", "file://./outbox"))?,
            from: EmailAddress::parse(&src.string("LEADFLOW_FROM", "followup@leadflow.localhost")).map_err(|e| {
                ConfigError {
                    var: "LEADFLOW_FROM".into(),
                    reason: e.to_string(),
                }
            })?,
            from_name: src.string("LEADFLOW_FROM_NAME", "leadflow"),
            timeout: src.duration("LEADFLOW_SMTP_TIMEOUT", Duration::from_secs(30))?,
        };

        let http = HttpConfig {
            addr: src.parse("LEADFLOW_HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            max_body_bytes: src.positive("LEADFLOW_MAX_BODY_BYTES", 1024 * 1024)?,
            max_batch: src.positive("LEADFLOW_MAX_BATCH", 500)?,
        };

        let scheduler = SchedulerConfig {
            tick: src.duration("LEADFLOW_SCHEDULER_TICK", Duration::from_secs(1))?,
            batch: src.positive("LEADFLOW_SCHEDULER_BATCH", 200)?,
            lease: src.duration("LEADFLOW_LEASE", Duration::from_secs(600))?,
            sweep_after: src.duration("LEADFLOW_SWEEP_AFTER", Duration::from_secs(60))?,
        };
        if scheduler.tick.is_zero() {
            return Err(ConfigError {
                var: "LEADFLOW_SCHEDULER_TICK".into(),
                reason: "must be longer than zero".into(),
            });
        }

        let sender = SenderConfig {
            concurrency: src.positive("LEADFLOW_SENDER_CONCURRENCY", 16)?,
            max_attempts: src.parse("LEADFLOW_SENDER_MAX_ATTEMPTS", 5i32)?.max(1),
            retry_base: src.duration("LEADFLOW_RETRY_BASE", Duration::from_secs(30))?,
            send_rate: src
                .get("LEADFLOW_SEND_RATE")
                .map(Rate::parse)
                .transpose()
                .map_err(|reason| ConfigError {
                    var: "LEADFLOW_SEND_RATE".into(),
                    reason,
                })?,
            domain_rates: Rate::parse_domains(&src.string("LEADFLOW_DOMAIN_RATES", "")).map_err(|reason| {
                ConfigError {
                    var: "LEADFLOW_DOMAIN_RATES".into(),
                    reason,
                }
            })?,
        };

        let notify = NotifyConfig {
            secret: src
                .get("LEADFLOW_NOTIFY_SECRET")
                .map(|s| SecretString::from(s.to_string())),
            retry_base: src.duration("LEADFLOW_NOTIFY_RETRY_BASE", Duration::from_secs(30))?,
            max_attempts: src.positive("LEADFLOW_NOTIFY_MAX_ATTEMPTS", 8)?.min(i32::MAX as usize) as i32,
            timeout: src.duration("LEADFLOW_NOTIFY_TIMEOUT", Duration::from_secs(10))?,
        };
        if notify.timeout.is_zero() {
            return Err(ConfigError {
                var: "LEADFLOW_NOTIFY_TIMEOUT".into(),
                reason: "must be longer than zero".into(),
            });
        }

        let (keyring, keyring_configured) = match src.get("LEADFLOW_TOKEN_KEYS") {
            Some(raw) => (
                Keyring::parse(raw).map_err(|e| ConfigError {
                    var: "LEADFLOW_TOKEN_KEYS".into(),
                    reason: e.0,
                })?,
                true,
            ),
            None => (Keyring::ephemeral(), false),
        };
        let public_url = src
            .string("LEADFLOW_PUBLIC_URL", "http://127.0.0.1:8080")
            .trim_end_matches('/')
            .to_string();
        validate_url("LEADFLOW_PUBLIC_URL", &public_url, &["http", "https"])?;
        let bounce_domain = src.string(
            "LEADFLOW_BOUNCE_DOMAIN",
            smtp.from.as_str().rsplit('@').next().unwrap_or(""),
        );
        if bounce_domain.is_empty() || bounce_domain.contains(['@', ' ', '/']) {
            return Err(ConfigError {
                var: "LEADFLOW_BOUNCE_DOMAIN".into(),
                reason: "must be a domain name such as bounces.shop.example".into(),
            });
        }
        let mail = MailConfig {
            public_url,
            keyring,
            keyring_configured,
            bounce_domain: bounce_domain.to_ascii_lowercase(),
        };

        let leads = LeadsConfig {
            identity_key: match src.string("LEADFLOW_IDENTITY_KEY", "email").as_str() {
                "email" => IdentityKey::Email,
                "customer_id" => IdentityKey::CustomerId,
                other => {
                    return Err(ConfigError {
                        var: "LEADFLOW_IDENTITY_KEY".into(),
                        reason: format!("expected email or customer_id, got {other:?}"),
                    })
                }
            },
        };

        let dkim = dkim_config(src)?;

        let log = LogConfig {
            format: match src.string("LEADFLOW_LOG_FORMAT", "json").as_str() {
                "json" => LogFormat::Json,
                "pretty" => LogFormat::Pretty,
                other => {
                    return Err(ConfigError {
                        var: "LEADFLOW_LOG_FORMAT".into(),
                        reason: format!("expected json or pretty, got {other:?}"),
                    })
                }
            },
            filter: src.string("LEADFLOW_LOG", "info"),
        };

        Ok(Self {
            database,
            amqp,
            smtp,
            http,
            scheduler,
            sender,
            notify,
            mail,
            leads,
            dkim,
            log,
        })
    }
}

/// `LEADFLOW_DKIM_DOMAIN`, `LEADFLOW_DKIM_SELECTOR` and `LEADFLOW_DKIM_PRIVATE_KEY` (or `_FILE`): all or none.
fn dkim_config(src: &Source) -> Result<Option<DkimConfig>, ConfigError> {
    let err = |var: &str, reason: String| ConfigError {
        var: var.into(),
        reason,
    };
    let domain = src.get("LEADFLOW_DKIM_DOMAIN");
    let selector = src.get("LEADFLOW_DKIM_SELECTOR");
    let key_text = src.get("LEADFLOW_DKIM_PRIVATE_KEY");
    let key_file = src.get("LEADFLOW_DKIM_PRIVATE_KEY_FILE");
    if domain.is_none() && selector.is_none() && key_text.is_none() && key_file.is_none() {
        return Ok(None);
    }
    let required = "required when DKIM is configured (LEADFLOW_DKIM_DOMAIN, LEADFLOW_DKIM_SELECTOR and \
                    LEADFLOW_DKIM_PRIVATE_KEY or LEADFLOW_DKIM_PRIVATE_KEY_FILE: all or none)";
    let domain = domain
        .ok_or_else(|| err("LEADFLOW_DKIM_DOMAIN", required.into()))?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let selector = selector.ok_or_else(|| err("LEADFLOW_DKIM_SELECTOR", required.into()))?;
    let dns_name = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
    };
    if !dns_name(&domain) || !domain.contains('.') {
        return Err(err(
            "LEADFLOW_DKIM_DOMAIN",
            "must be a domain name such as shop.example".into(),
        ));
    }
    if !dns_name(selector) {
        return Err(err(
            "LEADFLOW_DKIM_SELECTOR",
            "must be letters, digits, '-' and '_' (labels separated by '.'), e.g. leadflow2026".into(),
        ));
    }
    let (key_var, pem) = match (key_text, key_file) {
        (Some(_), Some(_)) => {
            return Err(err(
                "LEADFLOW_DKIM_PRIVATE_KEY_FILE",
                "set LEADFLOW_DKIM_PRIVATE_KEY or LEADFLOW_DKIM_PRIVATE_KEY_FILE, not both".into(),
            ))
        }
        (Some(text), None) => ("LEADFLOW_DKIM_PRIVATE_KEY", text.to_string()),
        (None, Some(path)) => (
            "LEADFLOW_DKIM_PRIVATE_KEY_FILE",
            std::fs::read_to_string(path)
                .map_err(|e| err("LEADFLOW_DKIM_PRIVATE_KEY_FILE", format!("cannot read {path}: {e}")))?,
        ),
        (None, None) => return Err(err("LEADFLOW_DKIM_PRIVATE_KEY", required.into())),
    };
    let key = DkimKey::from_pem(&pem).map_err(|reason| err(key_var, reason))?;
    Ok(Some(DkimConfig {
        domain,
        selector: selector.to_string(),
        key,
        key_var,
    }))
}

fn validate_url(var: &str, raw: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let url = url::Url::parse(raw).map_err(|e| ConfigError {
        var: var.into(),
        reason: format!("not a URL: {e}"),
    })?;
    if !schemes.contains(&url.scheme()) {
        return Err(ConfigError {
            var: var.into(),
            reason: format!("scheme must be one of {}", schemes.join(", ")),
        });
    }
    Ok(())
}

/// Parses `smtp://[user:pass@]host:port`, `smtps://host:port` or `file:///dir` (`file://./dir` is relative).
pub fn parse_smtp_url(raw: &str) -> Result<SmtpTarget, ConfigError> {
    let err = |reason: String| ConfigError {
        var: "LEADFLOW_SMTP_URL".into(),
        reason,
    };
    if let Some(path) = raw.strip_prefix("file://") {
        if path.is_empty() {
            return Err(err(
                "file:// needs a folder, e.g. file:///var/lib/leadflow/outbox".into()
            ));
        }
        return Ok(SmtpTarget::Outbox(PathBuf::from(path)));
    }
    let url = url::Url::parse(raw).map_err(|e| err(format!("not a URL: {e}")))?;
    let implicit_tls = match url.scheme() {
        "smtp" => false,
        "smtps" => true,
        other => return Err(err(format!("scheme must be smtp, smtps or file, got {other:?}"))),
    };
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| err("missing host".into()))?;
    let port = url.port().unwrap_or(if implicit_tls { 465 } else { 25 });
    let user = (!url.username().is_empty()).then(|| decode(url.username()));
    let password = url.password().map(decode);
    Ok(SmtpTarget::Relay {
        host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
        port,
        implicit_tls,
        user,
        password,
    })
}

fn decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = Config::load(&Source::default()).expect("defaults load");
        assert_eq!(config.amqp.namespace, "leadflow");
        assert_eq!(config.smtp.target, SmtpTarget::Outbox(PathBuf::from("./outbox")));
    }

    #[test]
    fn an_invalid_value_names_its_variable() {
        let src = Source::from_pairs([("LEADFLOW_SENDER_CONCURRENCY", "lots")]);
        let err = Config::load(&src).unwrap_err();
        assert_eq!(err.var, "LEADFLOW_SENDER_CONCURRENCY");

        let src = Source::from_pairs([("LEADFLOW_DATABASE_URL", "mysql://x")]);
        assert_eq!(Config::load(&src).unwrap_err().var, "LEADFLOW_DATABASE_URL");

        let src = Source::from_pairs([("LEADFLOW_SCHEDULER_TICK", "soon")]);
        assert_eq!(Config::load(&src).unwrap_err().var, "LEADFLOW_SCHEDULER_TICK");

        let src = Source::from_pairs([("LEADFLOW_NOTIFY_RETRY_BASE", "later")]);
        assert_eq!(Config::load(&src).unwrap_err().var, "LEADFLOW_NOTIFY_RETRY_BASE");
        let src = Source::from_pairs([("LEADFLOW_NOTIFY_MAX_ATTEMPTS", "0")]);
        assert_eq!(Config::load(&src).unwrap_err().var, "LEADFLOW_NOTIFY_MAX_ATTEMPTS");
    }

    #[test]
    fn the_identity_key_is_the_email_unless_customer_id_is_chosen() {
        let default = Config::load(&Source::default()).unwrap();
        assert_eq!(default.leads.identity_key, IdentityKey::Email);
        let src = Source::from_pairs([("LEADFLOW_IDENTITY_KEY", "customer_id")]);
        assert_eq!(Config::load(&src).unwrap().leads.identity_key, IdentityKey::CustomerId);
        let src = Source::from_pairs([("LEADFLOW_IDENTITY_KEY", "phone")]);
        assert_eq!(Config::load(&src).unwrap_err().var, "LEADFLOW_IDENTITY_KEY");
    }

    #[test]
    fn smtp_urls_parse() {
        assert_eq!(
            parse_smtp_url("smtp://mail.example.com:2525").unwrap(),
            SmtpTarget::Relay {
                host: "mail.example.com".into(),
                port: 2525,
                implicit_tls: false,
                user: None,
                password: None
            }
        );
        match parse_smtp_url("smtps://ann:p%40ss@relay.example.com").unwrap() {
            SmtpTarget::Relay {
                port,
                implicit_tls,
                user,
                password,
                ..
            } => {
                assert_eq!(port, 465);
                assert!(implicit_tls);
                assert_eq!(user.as_deref(), Some("ann"));
                assert_eq!(password.as_deref(), Some("p@ss"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            parse_smtp_url("file:///var/outbox").unwrap(),
            SmtpTarget::Outbox("/var/outbox".into())
        );
        assert!(parse_smtp_url("http://x").is_err());
        assert!(parse_smtp_url("file://").is_err());
    }

    #[test]
    fn send_rates_parse_per_process_and_per_domain() {
        let config = Config::load(&Source::from_pairs([
            ("LEADFLOW_SEND_RATE", "50"),
            ("LEADFLOW_DOMAIN_RATES", "Gmail.com=5/s, yahoo.com=100/m"),
        ]))
        .unwrap();
        let per_second = |count| Rate {
            count,
            per: Duration::from_secs(1),
        };
        assert_eq!(config.sender.send_rate, Some(per_second(50)));
        assert_eq!(
            config.sender.domain_rates,
            vec![
                ("gmail.com".to_string(), per_second(5)),
                (
                    "yahoo.com".to_string(),
                    Rate {
                        count: 100,
                        per: Duration::from_secs(60)
                    }
                )
            ]
        );
        assert_eq!(Config::load(&Source::default()).unwrap().sender.send_rate, None);
        for (var, bad) in [
            ("LEADFLOW_SEND_RATE", "0/s"),
            ("LEADFLOW_SEND_RATE", "5/week"),
            ("LEADFLOW_DOMAIN_RATES", "gmail.com"),
            ("LEADFLOW_DOMAIN_RATES", "a.com=1/s,a.com=2/s"),
        ] {
            let err = Config::load(&Source::from_pairs([(var, bad)])).unwrap_err();
            assert_eq!(err.var, var, "{bad}");
        }
        assert_eq!(Rate::parse("100/m").unwrap().to_string(), "100/m");
    }
}
