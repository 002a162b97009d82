//! API keys: `lf_` + 32 random URL-safe characters, stored as a SHA-256 hash with a short prefix for listings.
//!
//! A key carries scopes: `read` (GET requests), `write` (also campaign and template changes), `admin` (also
//! settings). The full key is shown once, when it is created; afterwards only its prefix identifies it.

use std::fmt;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use rand::Rng;
/// To read [`NewKey::key`] (the only time a key is available in full).
pub use secrecy::ExposeSecret;
use secrecy::SecretString;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What every key starts with.
pub const KEY_PREFIX: &str = "lf_";
/// Random characters after [`KEY_PREFIX`].
pub const KEY_RANDOM_CHARS: usize = 32;
/// How many leading characters of a key are stored in clear and shown in listings.
pub const PREFIX_LEN: usize = 8;

/// URL-safe characters (RFC 4648 base64url alphabet): exactly 64, so a random byte masked to 6 bits is uniform.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// What a key may do. Each scope includes the ones below it: `admin` > `write` > `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every GET request, and template previews (nothing is stored).
    Read,
    /// Also creating, changing, activating and deactivating campaigns, and storing templates.
    Write,
    /// Also changing settings.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Write, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == raw.trim())
            .ok_or_else(|| format!("unknown scope {raw:?}: expected read, write or admin"))
    }

    /// Whether a key holding this scope may do what `needed` guards.
    pub fn grants(self, needed: Scope) -> bool {
        self >= needed
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key as stored: everything but the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub id: i64,
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl KeyInfo {
    /// Whether any of the key's scopes grants `needed`.
    pub fn grants(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| s.grants(needed))
    }
}

/// A key just created: the only time the full key is available.
pub struct NewKey {
    pub info: KeyInfo,
    pub key: SecretString,
}

/// A new random key: `lf_` + 32 URL-safe characters.
pub fn generate() -> String {
    let mut rng = rand::rng();
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_CHARS);
    key.push_str(KEY_PREFIX);
    for _ in 0..KEY_RANDOM_CHARS {
        let i = usize::from(rng.random::<u8>() & 63);
        key.push(char::from(ALPHABET[i]));
    }
    key
}

/// The lower-case hex SHA-256 of a key: what is stored and looked up.
pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Whether `key` has the shape of a key (checked before any database lookup).
pub fn looks_like_key(key: &str) -> bool {
    key.len() == KEY_PREFIX.len() + KEY_RANDOM_CHARS
        && key.starts_with(KEY_PREFIX)
        && key[KEY_PREFIX.len()..].bytes().all(|b| ALPHABET.contains(&b))
}

fn scopes_of(raw: Vec<String>) -> Vec<Scope> {
    // The table's CHECK constraint allows only known scopes; anything else is ignored rather than trusted.
    let mut scopes: Vec<Scope> = raw.iter().filter_map(|s| Scope::parse(s).ok()).collect();
    scopes.sort();
    scopes.dedup();
    scopes
}

fn info_of(row: &tokio_postgres::Row) -> KeyInfo {
    KeyInfo {
        id: row.get("id"),
        name: row.get("name"),
        prefix: row.get("prefix"),
        scopes: scopes_of(row.get("scopes")),
        created_at: row.get("created_at"),
        last_used_at: row.get("last_used_at"),
        revoked_at: row.get("revoked_at"),
    }
}

const COLUMNS: &str = "id, name, prefix, scopes, created_at, last_used_at, revoked_at";

/// Creates a key named `name` with `scopes`; the returned key is not stored anywhere and cannot be shown again.
pub async fn create(client: &impl GenericClient, name: &str, scopes: &[Scope]) -> anyhow::Result<NewKey> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        anyhow::bail!("a key name must be 1 to 100 characters");
    }
    if scopes.is_empty() {
        anyhow::bail!("a key needs at least one scope (read, write or admin)");
    }
    let mut scope_names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    scope_names.sort_unstable();
    scope_names.dedup();
    // Two keys sharing a prefix (one chance in 64^5 per pair) would make `revoke <prefix>` ambiguous: draw again.
    for _ in 0..5 {
        let key = generate();
        let prefix = &key[..PREFIX_LEN];
        let row = client
            .query_opt(
                &format!(
                    "INSERT INTO api_keys (name, prefix, key_hash, scopes) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING RETURNING {COLUMNS}"
                ),
                &[&name, &prefix, &hash(&key), &scope_names],
            )
            .await?;
        if let Some(row) = row {
            return Ok(NewKey {
                info: info_of(&row),
                key: SecretString::from(key),
            });
        }
    }
    anyhow::bail!("failed to draw a key with an unused prefix")
}

/// Every key, newest first, revoked ones included.
pub async fn list(client: &impl GenericClient) -> anyhow::Result<Vec<KeyInfo>> {
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at DESC, id DESC"),
            &[],
        )
        .await?;
    Ok(rows.iter().map(info_of).collect())
}

/// Revokes the key whose prefix is `prefix` (its first 8 characters); a revoked key is refused from then on.
pub async fn revoke(client: &impl GenericClient, prefix: &str) -> anyhow::Result<KeyInfo> {
    let prefix = prefix.trim();
    let row = client
        .query_opt(
            &format!(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE prefix = $1 RETURNING {COLUMNS}"
            ),
            &[&prefix],
        )
        .await?;
    match row {
        Some(row) => Ok(info_of(&row)),
        None => anyhow::bail!("no API key with prefix {prefix:?} (see `leadflow keys list`)"),
    }
}

/// The key `presented` stands for, when it exists and is not revoked; notes when it was last used (at most once
/// a minute per key, so busy clients do not turn every request into a write).
pub async fn authenticate(client: &impl GenericClient, presented: &str) -> anyhow::Result<Option<KeyInfo>> {
    if !looks_like_key(presented) {
        return Ok(None);
    }
    let row = client
        .query_opt(
            &format!(
                "WITH k AS (SELECT {COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL),
                      touched AS (UPDATE api_keys SET last_used_at = now() FROM k
                                  WHERE api_keys.id = k.id
                                    AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute'))
                 SELECT {COLUMNS} FROM k"
            ),
            &[&hash(presented)],
        )
        .await?;
    Ok(row.as_ref().map(info_of))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_lf_and_32_url_safe_characters() {
        let key = generate();
        assert_eq!(key.len(), 35);
        assert!(key.starts_with("lf_"));
        assert!(looks_like_key(&key), "{key}");
        assert_ne!(generate(), key);
    }

    #[test]
    fn anything_else_is_not_a_key() {
        assert!(!looks_like_key(""));
        assert!(!looks_like_key("lf_short"));
        assert!(!looks_like_key(&format!("xx_{}", "a".repeat(32))));
        assert!(!looks_like_key(&format!("lf_{}", "a+".repeat(16))));
    }

    #[test]
    fn the_hash_is_hex_sha256() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn scopes_include_the_ones_below() {
        assert!(Scope::Admin.grants(Scope::Write));
        assert!(Scope::Admin.grants(Scope::Read));
        assert!(Scope::Write.grants(Scope::Read));
        assert!(!Scope::Write.grants(Scope::Admin));
        assert!(!Scope::Read.grants(Scope::Write));
        assert_eq!(Scope::parse("admin"), Ok(Scope::Admin));
        assert!(Scope::parse("root").is_err());
    }
}
