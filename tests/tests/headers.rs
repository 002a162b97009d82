//! The headers and envelope of every email as the SMTP server receives them: one-click List-Unsubscribe with a
//! token that verifies, the VERP return path of the delivery, a deterministic Message-ID, a DKIM signature that
//! verifies when a key is configured, and lead data that cannot add a header or a recipient.
//!
//! DKIM signatures are checked independently of the sender: relaxed canonicalisation written here from RFC 6376
//! and the hashes and signature computed by the `openssl` command line against a key generated for the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use leadflow_shared::tokens::{Keyring, Purpose};
use leadflow_tests::{event, Captured, TestApp, DEADLINE, TEST_TOKEN_KEYS};

fn keyring() -> Keyring {
    Keyring::parse(TEST_TOKEN_KEYS).unwrap_or_else(|e| panic!("TEST_TOKEN_KEYS: {e}"))
}

/// Runs `openssl` and returns its standard output; panics (naming the command) when it fails.
fn openssl(args: &[&str]) -> Vec<u8> {
    openssl_status(args).unwrap_or_else(|e| panic!("{e}"))
}

fn openssl_status(args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("the openssl command is needed to verify DKIM signatures: {e}"));
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "openssl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("leadflow-headers-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Self(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn path(&self, name: &str) -> String {
        self.file(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SHA-256 of `data` in lower-case hex, by `openssl dgst`.
fn sha256_hex(dir: &TempDir, data: &[u8]) -> String {
    let input = dir.file(&format!("in-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&input, data).unwrap_or_else(|e| panic!("cannot write {}: {e}", input.display()));
    let out = openssl(&["dgst", "-sha256", "-r", &input.to_string_lossy()]);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn base64(dir: &TempDir, data: &[u8]) -> String {
    let input = dir.file(&format!("in-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&input, data).unwrap_or_else(|e| panic!("cannot write {}: {e}", input.display()));
    String::from_utf8_lossy(&openssl(&["base64", "-A", "-in", &input.to_string_lossy()]))
        .trim()
        .to_string()
}

fn hex_to_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or_else(|e| panic!("{hex}: {e}")))
        .collect()
}

/// The top-level header fields as received (name, value with folding kept), and the body.
fn split_message(raw: &str) -> (Vec<(String, String)>, String) {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header block in:\n{raw}"));
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            let last = fields
                .last_mut()
                .unwrap_or_else(|| panic!("a continuation line first in:\n{raw}"));
            last.1.push_str("\r\n");
            last.1.push_str(line);
        } else {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("not a header line: {line:?} in:\n{raw}"));
            fields.push((name.to_string(), value.to_string()));
        }
    }
    (fields, body.to_string())
}

/// Relaxed header canonicalisation (RFC 6376 3.4.2) of one field, with its CRLF.
fn relaxed_header(name: &str, value: &str) -> String {
    let unfolded = value.replace("\r\n", "");
    let words: Vec<&str> = unfolded.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
    format!("{}:{}\r\n", name.trim().to_ascii_lowercase(), words.join(" "))
}

/// Relaxed body canonicalisation (RFC 6376 3.4.4): runs of whitespace become one space, whitespace at line ends
/// and empty lines at the end go.
fn relaxed_body(body: &str) -> String {
    let mut lines: Vec<String> = body
        .split("\r\n")
        .map(|line| {
            let mut out = String::with_capacity(line.len());
            let mut space = false;
            for c in line.chars() {
                if c == ' ' || c == '\t' {
                    space = true;
                } else {
                    if space {
                        out.push(' ');
                    }
                    space = false;
                    out.push(c);
                }
            }
            out
        })
        .collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    if lines.is_empty() {
        return String::new();
    }
    lines.join("\r\n") + "\r\n"
}

/// The tags of a DKIM-Signature value, whitespace removed from each value.
fn dkim_tag(value: &str, name: &str) -> Option<String> {
    value.split(';').find_map(|tag| {
        let (n, v) = tag.split_once('=')?;
        (n.trim() == name).then(|| v.chars().filter(|c| !c.is_whitespace()).collect())
    })
}

/// Verifies the DKIM signature of `raw` with the public key at `public_pem`; returns the `h=` names.
fn verify_dkim(raw: &str, dir: &TempDir, public_pem: &Path, algorithm: &str) -> Result<Vec<String>, String> {
    let (fields, body) = split_message(raw);
    let (sig_name, sig_value) = fields
        .iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case("DKIM-Signature"))
        .cloned()
        .ok_or("no DKIM-Signature header")?;
    let tag = |name: &str| dkim_tag(&sig_value, name).ok_or(format!("no {name}= tag in {sig_value}"));
    if tag("v")? != "1" || tag("c")? != "relaxed/relaxed" || tag("a")? != format!("{algorithm}-sha256") {
        return Err(format!("unexpected v=, c= or a= in {sig_value}"));
    }
    let body_hash = base64(dir, &hex_to_bytes(&sha256_hex(dir, relaxed_body(&body).as_bytes())));
    if tag("bh")? != body_hash {
        return Err(format!("body hash mismatch: bh={} computed {body_hash}", tag("bh")?));
    }
    let names: Vec<String> = tag("h")?.split(':').map(str::to_string).collect();
    let mut used = vec![false; fields.len()];
    let mut data = String::new();
    for name in &names {
        let found = (0..fields.len())
            .rev()
            .find(|&i| !used[i] && fields[i].0.trim().eq_ignore_ascii_case(name));
        if let Some(i) = found {
            used[i] = true;
            data.push_str(&relaxed_header(&fields[i].0, &fields[i].1));
        }
    }
    let start = sig_value
        .match_indices("b=")
        .map(|(i, _)| i)
        .find(|&i| i == 0 || sig_value[..i].trim_end().ends_with(';'))
        .ok_or("no b= tag")?;
    let end = sig_value[start..].find(';').map_or(sig_value.len(), |e| start + e);
    let emptied = format!("{}b={}", &sig_value[..start], &sig_value[end..]);
    data.push_str(relaxed_header(&sig_name, &emptied).trim_end_matches("\r\n"));

    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let sig_b64 = dir.file(&format!("sig-{nonce}.b64"));
    let sig = dir.file(&format!("sig-{nonce}.bin"));
    std::fs::write(&sig_b64, tag("b")?).map_err(|e| e.to_string())?;
    openssl_status(&[
        "base64",
        "-d",
        "-A",
        "-in",
        &sig_b64.to_string_lossy(),
        "-out",
        &sig.to_string_lossy(),
    ])?;
    let signed = dir.file(&format!("data-{nonce}"));
    let public = public_pem.to_string_lossy();
    if algorithm == "rsa" {
        std::fs::write(&signed, data.as_bytes()).map_err(|e| e.to_string())?;
        openssl_status(&[
            "dgst",
            "-sha256",
            "-verify",
            &public,
            "-signature",
            &sig.to_string_lossy(),
            &signed.to_string_lossy(),
        ])?;
    } else {
        // RFC 8463: Ed25519 signs the SHA-256 hash of the canonicalised headers.
        std::fs::write(&signed, hex_to_bytes(&sha256_hex(dir, data.as_bytes()))).map_err(|e| e.to_string())?;
        openssl_status(&[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            &public,
            "-rawin",
            "-in",
            &signed.to_string_lossy(),
            "-sigfile",
            &sig.to_string_lossy(),
        ])?;
    }
    Ok(names)
}

/// The single value of a header; panics when it is missing or repeated.
fn only_header(m: &Captured, name: &str) -> String {
    let values: Vec<String> = m
        .headers()
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(values.len(), 1, "{name} appears {} times in:\n{}", values.len(), m.data);
    values[0].trim().to_string()
}

fn delivery_of(m: &Captured) -> i64 {
    m.delivery_id()
        .unwrap_or_else(|| panic!("a message without X-Leadflow-Delivery:\n{}", m.data))
}

#[tokio::test]
async fn every_email_carries_a_one_click_unsubscribe_and_a_verp_return_path_that_verify() {
    let app = TestApp::spawn().await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    let messages = app.smtp.wait_for_to("ann@example.com", 3, DEADLINE).await;
    let ring = keyring();
    let mail = &app.config.mail;
    let dir = TempDir::new();
    let from_domain = app
        .config
        .smtp
        .from
        .as_str()
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut ids = Vec::new();
    for m in &messages {
        let id = delivery_of(m);
        ids.push(id);

        let list_unsubscribe = only_header(m, "List-Unsubscribe");
        let (link, mailto) = list_unsubscribe
            .split_once(", ")
            .unwrap_or_else(|| panic!("not an https and a mailto URI: {list_unsubscribe}"));
        let token = link
            .strip_prefix(&format!("<{}/u/", mail.public_url))
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or_else(|| panic!("not a link to the unsubscribe page: {link}"));
        assert_eq!(ring.verify(Purpose::Unsubscribe, token), Some(format!("d:{id}")));
        assert_eq!(
            mailto,
            format!(
                "<mailto:unsubscribe@{}?subject=unsubscribe-{token}>",
                mail.bounce_domain
            )
        );
        assert_eq!(only_header(m, "List-Unsubscribe-Post"), "List-Unsubscribe=One-Click");

        let verp = m
            .mail_from
            .strip_prefix("bounces+")
            .and_then(|rest| rest.strip_suffix(&format!("@{}", mail.bounce_domain)))
            .unwrap_or_else(|| panic!("MAIL FROM is not a VERP address: {}", m.mail_from));
        assert_eq!(ring.verify(Purpose::Bounce, verp), Some(id.to_string()));
        assert_eq!(ring.verify(Purpose::Unsubscribe, verp), None);
        // The From header stays the configured sender.
        assert!(
            only_header(m, "From").contains(&format!("<{}>", app.config.smtp.from.as_str())),
            "{}",
            m.data
        );

        let hash = sha256_hex(&dir, format!("{}{id}", mail.public_url).as_bytes());
        assert_eq!(
            only_header(m, "Message-ID"),
            format!("<{id}.{}@{from_domain}>", &hash[..16])
        );
        assert_eq!(m.rcpt_to, vec!["ann@example.com".to_string()]);
        assert!(
            m.header("DKIM-Signature").is_none(),
            "signed without a key:\n{}",
            m.data
        );
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "{ids:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_configured_dkim_key_signs_every_email_over_its_unsubscribe_headers() {
    let dir = TempDir::new();
    // RSA from a PKCS#8 file, Ed25519 as PEM text in the variable itself.
    let rsa_key = dir.path("rsa.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &rsa_key,
    ]);
    openssl(&["pkey", "-in", &rsa_key, "-pubout", "-out", &dir.path("rsa.pub")]);
    let ed_key = dir.path("ed25519.pem");
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", &ed_key]);
    openssl(&["pkey", "-in", &ed_key, "-pubout", "-out", &dir.path("ed25519.pub")]);
    let ed_pem = std::fs::read_to_string(&ed_key).unwrap_or_else(|e| panic!("{ed_key}: {e}"));

    for (algorithm, key_var, key_value, public) in [
        (
            "rsa",
            "LEADFLOW_DKIM_PRIVATE_KEY_FILE",
            rsa_key.as_str(),
            dir.file("rsa.pub"),
        ),
        (
            "ed25519",
            "LEADFLOW_DKIM_PRIVATE_KEY",
            ed_pem.as_str(),
            dir.file("ed25519.pub"),
        ),
    ] {
        let app = TestApp::builder()
            .env("LEADFLOW_DKIM_DOMAIN", "leadflow.localhost")
            .env("LEADFLOW_DKIM_SELECTOR", "e2e")
            .env(key_var, key_value)
            .spawn()
            .await;
        let lead = format!("{algorithm}@example.com");
        app.post_event(&event("checkout.abandoned", &lead)).await;
        let messages = app.smtp.wait_for_to(&lead, 1, DEADLINE).await;
        let m = &messages[0];
        let signature = only_header(m, "DKIM-Signature");
        assert_eq!(dkim_tag(&signature, "d").as_deref(), Some("leadflow.localhost"));
        assert_eq!(dkim_tag(&signature, "s").as_deref(), Some("e2e"));
        let names = verify_dkim(&m.data, &dir, &public, algorithm)
            .unwrap_or_else(|e| panic!("{algorithm}: the signature does not verify: {e}\n{}", m.data));
        for wanted in ["from", "subject", "list-unsubscribe", "list-unsubscribe-post"] {
            assert!(
                names.iter().any(|n| n == wanted),
                "{algorithm}: h= lacks {wanted}: {names:?}"
            );
        }
        // The verifier is not a rubber stamp: another unsubscribe token in the same message fails.
        let id = delivery_of(m);
        let token = keyring().sign(Purpose::Unsubscribe, &format!("d:{id}"));
        let forged = keyring().sign(Purpose::Unsubscribe, &format!("d:{}", id + 1));
        assert!(m.data.contains(&token));
        assert!(
            verify_dkim(&m.data.replace(&token, &forged), &dir, &public, algorithm).is_err(),
            "{algorithm}: a forged List-Unsubscribe verified"
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn lead_data_cannot_add_a_header_or_a_recipient() {
    let app = TestApp::spawn().await;
    let lead = "mallory@example.com";
    let mut e = event("checkout.abandoned", lead);
    // Control characters in names are refused at ingest; Unicode line separators are not, and product names go
    // into subjects unchecked.
    e["data"]["first_name"] = json!("Mal\u{2028}Bcc: eve@evil.example");
    e["data"]["last_name"] = json!("\"Lee\" <eve@evil.example>, x");
    e["data"]["product"]["name"] = json!("Trail\r\nBcc: eve@evil.example\r\nX-Evil: 1\r\n\r\nforged body");
    app.post_event(&e).await;
    let messages = app.smtp.wait_for_to(lead, 1, DEADLINE).await;
    let m = &messages[0];
    assert_eq!(m.rcpt_to, vec![lead.to_string()]);
    let mut names: Vec<String> = m.headers().into_iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
    names.sort_unstable();
    let mut expected = vec![
        "content-type",
        "date",
        "from",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "message-id",
        "mime-version",
        "subject",
        "to",
        "x-leadflow-delivery",
    ];
    expected.sort_unstable();
    assert_eq!(names, expected, "{}", m.data);
    assert!(only_header(m, "To").ends_with(&format!("<{lead}>")), "{}", m.data);
    let subject = m.subject().unwrap_or_default();
    assert!(
        subject.contains("Trail Bcc: eve@evil.example X-Evil: 1 forged body"),
        "{subject}"
    );
    assert!(app.smtp.messages_to("eve@evil.example").is_empty());
    app.stop().await;
}
