//! Signed tokens for unsubscribe links and VERP return paths: `<key id>.<payload>.<mac>`, base64url, HMAC-SHA256.
//!
//! Keys rotate: `LEADFLOW_TOKEN_KEYS` lists `id:secret` pairs, the first signs, every one verifies, so links in
//! emails already sent keep working while a new key takes over. The MAC covers the purpose as well as the payload,
//! so an unsubscribe token cannot be replayed as a bounce token. Verification is constant-time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::Invalid;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC kept in a token: 128 bits, short enough for an address local part.
const MAC_LEN: usize = 16;

/// What a token is for; part of what is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An unsubscribe link or the mailto unsubscribe address.
    Unsubscribe,
    /// The VERP return path of one delivery.
    Bounce,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Self::Unsubscribe => b"unsubscribe",
            Self::Bounce => b"bounce",
        }
    }
}

/// The signing and verifying keys.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

impl Keyring {
    /// Parses `id:secret[,id:secret...]`; ids are 1-8 letters or digits, secrets at least 32 characters.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let mut keys = Vec::new();
        for (i, entry) in raw.split(',').map(str::trim).filter(|e| !e.is_empty()).enumerate() {
            let (id, secret) = entry
                .split_once(':')
                .ok_or_else(|| Invalid(format!("key {}: expected id:secret", i + 1)))?;
            if id.is_empty() || id.len() > 8 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(Invalid(format!(
                    "key {}: the id must be 1 to 8 letters or digits",
                    i + 1
                )));
            }
            if secret.len() < 32 {
                return Err(Invalid(format!("key {id}: the secret must be at least 32 characters")));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(Invalid(format!("key {id} is listed twice")));
            }
            keys.push((id.to_string(), secret.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            return Err(Invalid("no keys given".into()));
        }
        Ok(Self { keys })
    }

    /// A random key for this process only (development): links stop verifying after a restart.
    pub fn ephemeral() -> Self {
        let secret: [u8; 32] = rand::random();
        Self {
            keys: vec![("tmp".to_string(), secret.to_vec())],
        }
    }

    /// The id of the signing key.
    pub fn signing_key_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Signs `payload` (kept readable in the token, so it must not be secret) for `purpose`.
    pub fn sign(&self, purpose: Purpose, payload: &str) -> String {
        let (id, secret) = &self.keys[0];
        let body = URL_SAFE_NO_PAD.encode(payload.as_bytes());
        let mac = mac(secret, purpose, id, &body);
        format!("{id}.{body}.{}", URL_SAFE_NO_PAD.encode(&mac[..MAC_LEN]))
    }

    /// The payload of a token this keyring signed for `purpose`, or `None` for anything forged, altered, signed
    /// for another purpose or with an unknown key.
    pub fn verify(&self, purpose: Purpose, token: &str) -> Option<String> {
        let mut parts = token.split('.');
        let (id, body, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let (_, secret) = self.keys.iter().find(|(k, _)| k == id)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        if tag.len() != MAC_LEN {
            return None;
        }
        let mut check = HmacSha256::new_from_slice(secret).ok()?;
        feed(&mut check, purpose, id, body);
        // Constant-time comparison of the truncated MAC.
        check.verify_truncated_left(&tag).ok()?;
        let payload = URL_SAFE_NO_PAD.decode(body).ok()?;
        String::from_utf8(payload).ok()
    }
}

fn feed(mac: &mut HmacSha256, purpose: Purpose, id: &str, body: &str) {
    mac.update(purpose.tag());
    mac.update(b"\0");
    mac.update(id.as_bytes());
    mac.update(b"\0");
    mac.update(body.as_bytes());
}

fn mac(secret: &[u8], purpose: Purpose, id: &str, body: &str) -> Vec<u8> {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut m = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    feed(&mut m, purpose, id, body);
    m.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1:0123456789abcdef0123456789abcdef";
    const K2: &str = "k2:fedcba9876543210fedcba9876543210";

    #[test]
    fn a_token_verifies_and_carries_its_payload() {
        let ring = Keyring::parse(K1).unwrap();
        let token = ring.sign(Purpose::Unsubscribe, "d:42");
        assert_eq!(ring.verify(Purpose::Unsubscribe, &token).as_deref(), Some("d:42"));
        assert!(
            token.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{token}"
        );
    }

    #[test]
    fn forged_altered_and_misused_tokens_are_refused() {
        let ring = Keyring::parse(K1).unwrap();
        let token = ring.sign(Purpose::Unsubscribe, "d:42");
        // Another purpose.
        assert_eq!(ring.verify(Purpose::Bounce, &token), None);
        // The payload changed, the MAC kept.
        let parts: Vec<&str> = token.split('.').collect();
        let altered = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode("d:43"), parts[2]);
        assert_eq!(ring.verify(Purpose::Unsubscribe, &altered), None);
        // A flipped MAC character.
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            ring.verify(Purpose::Unsubscribe, &String::from_utf8(flipped).unwrap()),
            None
        );
        // Signed with a key this ring does not have.
        let other = Keyring::parse(K2).unwrap().sign(Purpose::Unsubscribe, "d:42");
        assert_eq!(ring.verify(Purpose::Unsubscribe, &other), None);
        for junk in ["", "k1", "k1..", "k1.x.y.z", "k1.!!.!!"] {
            assert_eq!(ring.verify(Purpose::Unsubscribe, junk), None, "{junk:?}");
        }
    }

    #[test]
    fn rotation_signs_with_the_first_key_and_verifies_with_all() {
        let old = Keyring::parse(K1).unwrap();
        let old_token = old.sign(Purpose::Unsubscribe, "d:7");
        let rotated = Keyring::parse(&format!("{K2},{K1}")).unwrap();
        assert_eq!(rotated.signing_key_id(), "k2");
        assert_eq!(rotated.verify(Purpose::Unsubscribe, &old_token).as_deref(), Some("d:7"));
        let new_token = rotated.sign(Purpose::Unsubscribe, "d:8");
        assert!(new_token.starts_with("k2."));
        assert_eq!(old.verify(Purpose::Unsubscribe, &new_token), None);
    }

    #[test]
    fn bad_key_lists_are_refused() {
        assert!(Keyring::parse("").is_err());
        assert!(Keyring::parse("k1:short").unwrap_err().0.contains("32"));
        assert!(Keyring::parse("nocolon").is_err());
        assert!(Keyring::parse(&format!("{K1},{K1}")).unwrap_err().0.contains("twice"));
        assert!(format!("{:?}", Keyring::parse(K1).unwrap()).contains("k1"));
        assert!(!format!("{:?}", Keyring::parse(K1).unwrap()).contains("0123456789"));
    }
}
