//! Building the email of one delivery with lettre's `Message::builder`: headers, a text + HTML alternative (each
//! part UTF-8 and quoted-printable), the VERP envelope and, when configured, a DKIM signature.
//!
//! Headers: `From` (LEADFLOW_FROM), `To`, `Subject`, `Date`, `Message-ID` (deterministic per delivery, so a
//! retry carries the same one), `MIME-Version`, `Content-Type`, `X-Leadflow-Delivery`, `List-Unsubscribe` (an
//! https link and a mailto address, RFC 2369) and `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058),
//! then `DKIM-Signature`. The envelope sender (MAIL FROM, which the receiving MTA turns into `Return-Path`) is
//! `bounces+<token>@<bounce domain>`: a bounce names its delivery and a forged one does not verify.
//!
//! Lead data never adds a header or a recipient: the recipient and BCC addresses are refused when they hold a
//! control character or a Unicode line separator and must parse as one address; names and subjects have those
//! characters (and bidirectional overrides) replaced by spaces, are capped in length, and lettre quotes or
//! RFC 2047-encodes them. The envelope is built here from parsed addresses, never from headers.
//!
//! Bodies are normalised to CRLF and always quoted-printable encoded, so the message never carries a bare CR or
//! LF (RUSTSEC-2026-0561 on lettre 0.11.23 is SMTP injection through them). The encoder also writes a `.` that
//! starts a line as `=2E`, so no line of the formatted message is a lone `.` (the end-of-data marker) even
//! before SMTP dot-stuffing, and an outbox file is safe to hand to any tool.

use std::sync::Arc;

use lettre::address::Envelope;
use lettre::message::header::{
    ContentTransferEncoding, ContentType, Header, HeaderName, HeaderValue, MIME_VERSION_1_0,
};
use lettre::message::{Body, Mailbox, MultiPart, SinglePart};
use lettre::{Address, Message};
use sha2::{Digest, Sha256};

use leadflow_shared::config::{Config, ConfigError, MailConfig};
use leadflow_shared::tokens::{Keyring, Purpose};

use crate::dkim::Signer;

/// The header carrying the delivery id, for tracing a message back to its delivery row.
pub const DELIVERY_HEADER: &str = "X-Leadflow-Delivery";

/// RFC 2369: where to unsubscribe (`<https://...>, <mailto:...>`).
pub const LIST_UNSUBSCRIBE: &str = "List-Unsubscribe";

/// RFC 8058: the https link takes a one-click POST.
pub const LIST_UNSUBSCRIBE_POST: &str = "List-Unsubscribe-Post";

/// The only value of `List-Unsubscribe-Post` (RFC 8058).
pub const ONE_CLICK: &str = "List-Unsubscribe=One-Click";

/// The longest display name kept, in characters.
const MAX_NAME_CHARS: usize = 200;

/// The longest subject kept, in characters: with `Subject: ` an unbreakable ASCII subject stays within RFC 5322's
/// 998-octet line limit.
const MAX_SUBJECT_CHARS: usize = 900;

/// `X-Leadflow-Delivery: <delivery id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryHeader(pub i64);

impl Header for DeliveryHeader {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str(DELIVERY_HEADER)
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self(s.trim().parse()?))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.to_string())
    }
}

/// A rendered message as the renderer stored it (`rendered_messages`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMessage {
    pub delivery_id: i64,
    pub to_address: String,
    pub to_name: Option<String>,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
    /// The campaign's BCC address: a copy goes there through the SMTP envelope, never as a visible header.
    pub bcc: Option<String>,
}

/// Who follow-ups come from, where their unsubscribe links and bounces go, and how they are signed.
#[derive(Debug, Clone)]
pub struct Sender {
    pub address: Address,
    pub name: Option<String>,
    /// The public URL of unsubscribe links, the token keys and the bounce domain.
    pub mail: MailConfig,
    /// Signs every message when DKIM is configured.
    pub dkim: Option<Arc<Signer>>,
}

impl Sender {
    /// From an address (already validated) and a display name (empty: none), with development mail settings: links
    /// to `http://127.0.0.1:8080`, a throwaway token key, bounces to the From domain, no DKIM. The service uses
    /// [`Sender::from_config`].
    pub fn new(address: &str, name: &str) -> Result<Self, BuildError> {
        let address = address
            .parse::<Address>()
            .map_err(|e| BuildError(format!("the From address is not valid: {e}")))?;
        let name = header_text(name, MAX_NAME_CHARS);
        let mail = MailConfig {
            public_url: "http://127.0.0.1:8080".into(),
            keyring: Keyring::ephemeral(),
            keyring_configured: false,
            bounce_domain: address.domain().to_ascii_lowercase(),
        };
        Ok(Self {
            address,
            name: (!name.is_empty()).then_some(name),
            mail,
            dkim: None,
        })
    }

    /// The sender of a configuration: `LEADFLOW_FROM`, `LEADFLOW_FROM_NAME`, the mail settings and the DKIM key
    /// (turned into a signer here; an error names the variable).
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let sender = Self::new(config.smtp.from.as_str(), &config.smtp.from_name).map_err(|e| ConfigError {
            var: "LEADFLOW_FROM".into(),
            reason: e.0,
        })?;
        let sender = sender.with_mail(config.mail.clone());
        Ok(match &config.dkim {
            Some(dkim) => sender.with_dkim(Signer::new(dkim)?),
            None => sender,
        })
    }

    /// The same sender with other mail settings.
    pub fn with_mail(mut self, mail: MailConfig) -> Self {
        self.mail = mail;
        self
    }

    /// The same sender, signing with `signer`.
    pub fn with_dkim(mut self, signer: Signer) -> Self {
        self.dkim = Some(Arc::new(signer));
        self
    }
}

/// Why a message could not be built; permanent for its delivery (the stored data is wrong).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

/// A built message, its Message-ID (recorded on the delivery when sent) and its SMTP envelope.
#[derive(Debug, Clone)]
pub struct Built {
    pub message: Message,
    pub message_id: String,
    /// MAIL FROM: the VERP return path; RCPT TO: the recipient, then the campaign BCC if any. The same envelope
    /// as `message.envelope()`: send with this one.
    pub envelope: Envelope,
}

/// The unsubscribe token of a delivery: `d:<delivery id>` signed for [`Purpose::Unsubscribe`].
pub fn unsubscribe_token(mail: &MailConfig, delivery_id: i64) -> String {
    mail.keyring.sign(Purpose::Unsubscribe, &format!("d:{delivery_id}"))
}

/// The `List-Unsubscribe` value of a delivery: `<{public_url}/u/{token}>, <mailto:unsubscribe@{bounce
/// domain}?subject=unsubscribe-{token}>`.
pub fn list_unsubscribe(mail: &MailConfig, delivery_id: i64) -> String {
    let token = unsubscribe_token(mail, delivery_id);
    format!(
        "<{}/u/{token}>, <mailto:unsubscribe@{}?subject=unsubscribe-{token}>",
        mail.public_url.trim_end_matches('/'),
        mail.bounce_domain
    )
}

/// The VERP return path of a delivery: `bounces+{token}@{bounce domain}`, the token signing the delivery id for
/// [`Purpose::Bounce`].
pub fn return_path(mail: &MailConfig, delivery_id: i64) -> Result<Address, BuildError> {
    let token = mail.keyring.sign(Purpose::Bounce, &delivery_id.to_string());
    Address::new(format!("bounces+{token}"), &mail.bounce_domain)
        .map_err(|e| BuildError(format!("the return path cannot use LEADFLOW_BOUNCE_DOMAIN: {e}")))
}

/// The Message-ID of a delivery: `<{delivery id}.{16 hex of SHA-256(public_url + delivery id)}@{domain}>`. The
/// same on every attempt and after restarts; another installation (another public URL) gets other ids.
pub fn message_id(public_url: &str, delivery_id: i64, domain: &str) -> String {
    let digest = Sha256::digest(format!("{public_url}{delivery_id}").as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("<{delivery_id}.{hash}@{domain}>")
}

/// Builds the email of a rendered delivery.
pub fn build(sender: &Sender, rendered: &RenderedMessage) -> Result<Built, BuildError> {
    let id = rendered.delivery_id;
    let to_address = address(&rendered.to_address, "the recipient address")?;
    let to_name = rendered
        .to_name
        .as_deref()
        .map(|n| header_text(n, MAX_NAME_CHARS))
        .filter(|n| !n.is_empty());
    let bcc = match rendered.bcc.as_deref().map(str::trim).filter(|b| !b.is_empty()) {
        Some(bcc) => Some(address(bcc, "the campaign's BCC address")?),
        None => None,
    };

    let unsubscribe = list_unsubscribe(&sender.mail, id);
    if !unsubscribe.bytes().all(|b| (0x21..0x7f).contains(&b) || b == b' ') {
        return Err(BuildError(
            "the List-Unsubscribe header would not be plain ASCII: check LEADFLOW_PUBLIC_URL".into(),
        ));
    }
    let mut recipients = vec![to_address.clone()];
    recipients.extend(bcc);
    let envelope = Envelope::new(Some(return_path(&sender.mail, id)?), recipients)
        .map_err(|e| BuildError(format!("the envelope cannot be built: {e}")))?;
    let message_id = message_id(&sender.mail.public_url, id, sender.address.domain());

    // The alternative's Content-Type goes into the message's own headers (rather than lettre writing it with the
    // part), so a DKIM signature covers it.
    let alternative = MultiPart::alternative()
        .singlepart(part(ContentType::TEXT_PLAIN, &rendered.body_text))
        .singlepart(part(ContentType::TEXT_HTML, &rendered.body_html));
    let content_type = alternative
        .headers()
        .get::<ContentType>()
        .ok_or_else(|| BuildError("the multipart has no Content-Type".into()))?;
    let body = multipart_body(&alternative)?;

    let mut message = Message::builder()
        .from(Mailbox::new(sender.name.clone(), sender.address.clone()))
        .to(Mailbox::new(to_name, to_address))
        .subject(header_text(&rendered.subject, MAX_SUBJECT_CHARS))
        .date_now()
        .message_id(Some(message_id.clone()))
        .header(DeliveryHeader(id))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str(LIST_UNSUBSCRIBE),
            unsubscribe,
        ))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str(LIST_UNSUBSCRIBE_POST),
            ONE_CLICK.to_string(),
        ))
        .header(MIME_VERSION_1_0)
        .header(content_type)
        .envelope(envelope.clone())
        .body(Body::dangerous_pre_encoded(body, ContentTransferEncoding::SevenBit))
        .map_err(|e| BuildError(format!("the message could not be built: {e}")))?;
    // `body` adds a top-level Content-Transfer-Encoding; a multipart needs none (its parts carry theirs).
    message.headers_mut().remove::<ContentTransferEncoding>();
    if let Some(signer) = &sender.dkim {
        signer.sign(&mut message);
    }
    Ok(Built {
        message,
        message_id,
        envelope,
    })
}

/// The body of a multipart as lettre formats it (boundary-delimited parts), without its own header block.
fn multipart_body(multipart: &MultiPart) -> Result<Vec<u8>, BuildError> {
    let formatted = multipart.formatted();
    let header_len = multipart.headers().to_string().len() + 2;
    match formatted.get(..header_len) {
        Some(head) if head.ends_with(b"\r\n\r\n") => Ok(formatted[header_len..].to_vec()),
        _ => Err(BuildError("the multipart body could not be laid out".into())),
    }
}

/// An address from lead or campaign data: refused when it holds a control character or a Unicode line or paragraph
/// separator anywhere (even at the ends), then parsed as exactly one address.
fn address(raw: &str, what: &str) -> Result<Address, BuildError> {
    if raw.chars().any(|c| c.is_control() || is_line_separator(c)) {
        return Err(BuildError(format!(
            "{what} is not valid: it holds a line break or control character"
        )));
    }
    raw.trim()
        .parse::<Address>()
        .map_err(|e| BuildError(format!("{what} is not valid: {e}")))
}

fn part(content_type: ContentType, text: &str) -> SinglePart {
    SinglePart::builder()
        .header(content_type)
        .header(ContentTransferEncoding::QuotedPrintable)
        .body(quoted_printable_body(text))
}

/// U+2028 and U+2029, which some clients render as line breaks.
fn is_line_separator(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}')
}

/// Bidirectional embeddings, overrides and isolates, which can make a name display as something else.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A header value on one line: control characters (CR, LF, NUL, tab, ...), Unicode line and paragraph separators
/// and bidirectional controls become spaces, runs of spaces collapse, and at most `max_chars` characters stay.
fn header_text(raw: &str, max_chars: usize) -> String {
    let cleaned = raw
        .chars()
        .map(|c| {
            if c.is_control() || is_line_separator(c) || is_bidi_control(c) {
                ' '
            } else {
                c
            }
        })
        .collect::<String>();
    let joined = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    match joined.char_indices().nth(max_chars) {
        Some((cut, _)) => joined[..cut].trim_end().to_string(),
        None => joined,
    }
}

/// Every line ending (CRLF, lone LF, lone CR) as CRLF.
pub fn normalise_line_endings(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 32);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("\r\n");
            }
            '\n' => out.push_str("\r\n"),
            c => out.push(c),
        }
    }
    out
}

/// The longest encoded line the encoder writes; escaping a leading dot adds two, staying within RFC 2045's 76.
const ENCODED_LINE_LIMIT: usize = 74;

/// Quoted-printable encoding of `text` (normalised to CRLF first), with a line-leading `.` written as `=2E`.
pub fn encode_quoted_printable(text: &str) -> String {
    let options = quoted_printable::Options::default()
        .line_length_limit(ENCODED_LINE_LIMIT)
        .input_mode(quoted_printable::InputMode::Text);
    let encoded = quoted_printable::encode_with_options(normalise_line_endings(text), options);
    let mut out = String::with_capacity(encoded.len() + 16);
    for (i, line) in encoded.split("\r\n").enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        match line.strip_prefix('.') {
            Some(rest) => {
                out.push_str("=2E");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
    }
    out
}

/// The body of one part: quoted-printable as above. The encoded text is ASCII with CRLF lines of at most 76
/// characters, which is what `Body::dangerous_pre_encoded` requires.
fn quoted_printable_body(text: &str) -> Body {
    Body::dangerous_pre_encoded(
        encode_quoted_printable(text).into_bytes(),
        ContentTransferEncoding::QuotedPrintable,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dkim::verify::{self, TestKey};

    const KEYS: &str = "k1:0123456789abcdef0123456789abcdef";

    fn mail() -> MailConfig {
        MailConfig {
            public_url: "https://mail.shop.example".into(),
            keyring: Keyring::parse(KEYS).unwrap(),
            keyring_configured: true,
            bounce_domain: "bounces.shop.example".into(),
        }
    }

    fn sender() -> Sender {
        Sender::new("followup@shop.example", "Shop Team")
            .unwrap()
            .with_mail(mail())
    }

    fn rendered(text: &str, html: &str) -> RenderedMessage {
        RenderedMessage {
            bcc: None,
            delivery_id: 42,
            to_address: "ann@example.com".into(),
            to_name: Some("Ann Lee".into()),
            subject: "Your cart is waiting".into(),
            body_text: text.into(),
            body_html: html.into(),
        }
    }

    fn formatted(built: &Built) -> String {
        String::from_utf8(built.message.formatted()).unwrap()
    }

    fn decode(encoded: &str) -> String {
        String::from_utf8(quoted_printable::decode(encoded, quoted_printable::ParseMode::Strict).unwrap()).unwrap()
    }

    /// The top-level header fields (name, unfolded value) of a formatted message, in order.
    fn header_fields(raw: &str) -> Vec<(String, String)> {
        let (head, _) = raw.split_once("\r\n\r\n").expect("a header block");
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n") {
            assert!(line.len() <= 998, "a header line of {} octets", line.len());
            assert!(line.is_ascii(), "a non-ASCII header line: {line:?}");
            if line.starts_with([' ', '\t']) {
                fields
                    .last_mut()
                    .expect("a continuation after a field")
                    .1
                    .push_str(line);
            } else {
                let (name, value) = line
                    .split_once(':')
                    .unwrap_or_else(|| panic!("not a header line: {line:?}"));
                fields.push((name.to_string(), value.trim().to_string()));
            }
        }
        fields
    }

    fn header(raw: &str, name: &str) -> String {
        let found: Vec<String> = header_fields(raw)
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect();
        assert_eq!(found.len(), 1, "{name} appears {} times in:\n{raw}", found.len());
        found[0].clone()
    }

    /// The addresses of a mailbox-list header value: `<...>` outside quoted strings, or the bare value; commas
    /// outside quotes and angle brackets separate mailboxes.
    fn mailboxes(value: &str) -> Vec<String> {
        let (mut in_quote, mut escaped, mut angle) = (false, false, None::<String>);
        let (mut found, mut separators) = (Vec::new(), 0);
        for c in value.chars() {
            if in_quote {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_quote = false,
                    _ => {}
                }
                continue;
            }
            match (&mut angle, c) {
                (Some(addr), '>') => {
                    found.push(std::mem::take(addr));
                    angle = None;
                }
                (Some(addr), c) => addr.push(c),
                (None, '"') => in_quote = true,
                (None, '<') => angle = Some(String::new()),
                (None, ',') => separators += 1,
                _ => {}
            }
        }
        assert!(
            !in_quote && angle.is_none(),
            "an unterminated quote or address in {value:?}"
        );
        if found.is_empty() {
            found.push(value.trim().to_string());
        }
        assert_eq!(separators, 0, "a second mailbox in {value:?}");
        found
    }

    const EXPECTED_HEADERS: [&str; 10] = [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "x-leadflow-delivery",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "mime-version",
        "content-type",
    ];

    #[test]
    fn every_email_carries_one_click_list_unsubscribe_with_a_token_that_verifies() {
        let built = build(&sender(), &rendered("hi", "<p>hi</p>")).unwrap();
        let raw = formatted(&built);
        let token = mail().keyring.sign(Purpose::Unsubscribe, "d:42");
        assert_eq!(
            header(&raw, "List-Unsubscribe"),
            format!(
                "<https://mail.shop.example/u/{token}>, \
                 <mailto:unsubscribe@bounces.shop.example?subject=unsubscribe-{token}>"
            )
        );
        assert_eq!(header(&raw, "List-Unsubscribe-Post"), "List-Unsubscribe=One-Click");
        assert_eq!(
            mail().keyring.verify(Purpose::Unsubscribe, &token).as_deref(),
            Some("d:42")
        );
        // A token of another key ring does not verify: the keys are what make it unforgeable.
        let other = Keyring::parse("k1:fedcba9876543210fedcba9876543210").unwrap();
        assert_eq!(other.verify(Purpose::Unsubscribe, &token), None);
        // A trailing slash on the public URL does not double.
        let mut slash = mail();
        slash.public_url = "https://mail.shop.example/".into();
        assert!(list_unsubscribe(&slash, 42).starts_with("<https://mail.shop.example/u/k1."));
    }

    #[test]
    fn the_envelope_sender_is_the_verp_address_of_the_delivery_and_the_from_header_stays() {
        let mut message = rendered("hi", "<p>hi</p>");
        message.bcc = Some("sales@shop.example".into());
        let built = build(&sender(), &message).unwrap();
        let from = built.envelope.from().expect("an envelope sender").to_string();
        let token = from
            .strip_prefix("bounces+")
            .and_then(|rest| rest.strip_suffix("@bounces.shop.example"))
            .unwrap_or_else(|| panic!("not a VERP address: {from}"));
        assert_eq!(mail().keyring.verify(Purpose::Bounce, token).as_deref(), Some("42"));
        assert_eq!(mail().keyring.verify(Purpose::Unsubscribe, token), None);
        assert_eq!(built.message.envelope(), &built.envelope);
        let to: Vec<String> = built.envelope.to().iter().map(|a| a.to_string()).collect();
        assert_eq!(to, vec!["ann@example.com", "sales@shop.example"]);
        let raw = formatted(&built);
        assert_eq!(header(&raw, "From"), "\"Shop Team\" <followup@shop.example>");
        assert!(!raw.to_ascii_lowercase().contains("return-path:"), "{raw}");
        assert_eq!(return_path(&mail(), 42).unwrap().to_string(), from);
    }

    #[test]
    fn the_message_id_is_stable_per_delivery_and_differs_between_installations() {
        let first = build(&sender(), &rendered("hi", "<p>hi</p>")).unwrap();
        let again = build(&sender(), &rendered("other", "<p>other</p>")).unwrap();
        // SHA-256("https://mail.shop.example42"), first 8 bytes.
        assert_eq!(first.message_id, "<42.8d0577091ea43547@shop.example>");
        assert_eq!(again.message_id, first.message_id);
        assert_eq!(header(&formatted(&first), "Message-ID"), first.message_id);
        assert_eq!(
            message_id("https://other.example", 42, "shop.example"),
            "<42.2b0a61093fd50ee5@shop.example>"
        );
        assert_ne!(
            message_id("https://mail.shop.example", 43, "shop.example"),
            first.message_id
        );
    }

    #[test]
    fn a_campaign_bcc_goes_to_the_envelope_and_never_into_the_headers() {
        let mut message = rendered("hello", "<p>hello</p>");
        message.bcc = Some("sales@shop.example".into());
        let built = build(&sender(), &message).unwrap();
        let to: Vec<String> = built.message.envelope().to().iter().map(|a| a.to_string()).collect();
        assert_eq!(to, vec!["ann@example.com", "sales@shop.example"]);
        assert!(!formatted(&built).to_ascii_lowercase().contains("bcc:"));
        message.bcc = Some("not an address".into());
        assert!(build(&sender(), &message).unwrap_err().0.contains("BCC"));
    }

    /// Which field of the rendered message a hostile value goes into.
    #[derive(Debug, Clone, Copy)]
    enum Field {
        Name,
        Subject,
        To,
        Bcc,
    }

    #[test]
    fn an_injection_corpus_never_adds_a_header_or_a_recipient() {
        let long_name = "x".repeat(5000);
        let long_word = "a".repeat(3000);
        // (field, hostile value, whether the message is built)
        let corpus: Vec<(Field, &str, bool)> = vec![
            (Field::Name, "Ann\r\nBcc: eve@evil.example", true),
            (Field::Name, "Ann\nX-Evil: 1", true),
            (Field::Name, "Ann\rTo: eve@evil.example", true),
            (Field::Name, "Ann\0Lee", true),
            (Field::Name, "Ann\u{2028}Bcc: eve@evil.example", true),
            (Field::Name, "Ann\u{2029}Cc: eve@evil.example", true),
            (Field::Name, "Ann\u{85}Cc: eve@evil.example", true),
            (Field::Name, "\"Ann\" <eve@evil.example>, \"Bob", true),
            (Field::Name, "Lee, Ann", true),
            (Field::Name, "Ann \\\" Lee", true),
            (Field::Name, "eve@evil.example", true),
            (Field::Name, "=?utf-8?b?QmNjOiBldmVAZXZpbC5leGFtcGxl?=", true),
            (Field::Name, "Ann\u{202e}moc.elpmaxe", true),
            (Field::Name, "Jürgen \r\n Müller, <eve@evil.example>", true),
            (Field::Name, &long_name, true),
            (Field::Subject, "Hello\r\nBcc: eve@evil.example", true),
            (Field::Subject, "Hello\r\n\r\n<p>a forged body</p>", true),
            (Field::Subject, "Hello\n.\nMAIL FROM:<eve@evil.example>", true),
            (Field::Subject, "Grüße\r\nBcc: eve@evil.example", true),
            (Field::Subject, "=?utf-8?q?x?=\r\n Bcc: eve@evil.example", true),
            (Field::Subject, "Hi\u{2028}To: eve@evil.example", true),
            (Field::Subject, &long_word, true),
            (Field::Subject, "\t\r\n ", true),
            (Field::To, "ann@example.com\r\nBcc: eve@evil.example", false),
            (Field::To, "ann@example.com, eve@evil.example", false),
            (Field::To, "Ann <ann@example.com>", false),
            (Field::To, "ann@example.com\n", false),
            (Field::To, "ann@example.com\u{2028}", false),
            (Field::To, "\"eve@evil.example\r\n\"@example.com", false),
            (Field::To, "ann@example.com>\r\nRCPT TO:<eve@evil.example", false),
            (Field::To, "ann@example.com\0", false),
            (Field::To, "ann@example.com eve@evil.example", false),
            (Field::To, " ann@example.com ", true),
            (Field::Bcc, "sales@shop.example\r\nBcc: eve@evil.example", false),
            (Field::Bcc, "sales@shop.example, eve@evil.example", false),
            (Field::Bcc, "sales@shop.example", true),
        ];
        assert!(corpus.len() >= 20);
        let mut expected: Vec<&str> = EXPECTED_HEADERS.to_vec();
        expected.sort_unstable();
        for (field, value, builds) in corpus {
            let mut message = rendered("hi", "<p>hi</p>");
            match field {
                Field::Name => message.to_name = Some(value.to_string()),
                Field::Subject => message.subject = value.to_string(),
                Field::To => message.to_address = value.to_string(),
                Field::Bcc => message.bcc = Some(value.to_string()),
            }
            let result = build(&sender(), &message);
            let built = match (result, builds) {
                (Ok(built), true) => built,
                (Err(e), false) => {
                    let named = if matches!(field, Field::Bcc) {
                        "BCC"
                    } else {
                        "recipient"
                    };
                    assert!(e.0.contains(named), "{field:?} {value:?}: {e}");
                    continue;
                }
                (Ok(built), false) => panic!("{field:?} {value:?} was accepted:\n{}", formatted(&built)),
                (Err(e), true) => panic!("{field:?} {value:?} was refused: {e}"),
            };
            let raw = formatted(&built);
            let mut names: Vec<String> = header_fields(&raw)
                .into_iter()
                .map(|(n, _)| n.to_ascii_lowercase())
                .collect();
            names.sort_unstable();
            assert_eq!(names, expected, "{field:?} {value:?}:\n{raw}");
            assert_eq!(
                mailboxes(&header(&raw, "To")),
                vec!["ann@example.com"],
                "{field:?} {value:?}"
            );
            let to: Vec<String> = built.envelope.to().iter().map(|a| a.to_string()).collect();
            let mut wanted = vec!["ann@example.com".to_string()];
            if matches!(field, Field::Bcc) {
                wanted.push("sales@shop.example".into());
            }
            assert_eq!(to, wanted, "{field:?} {value:?}");
            assert_eq!(built.message.envelope(), &built.envelope);
        }
    }

    #[test]
    fn names_and_subjects_keep_their_text_on_one_line() {
        assert_eq!(header_text("Ann\r\nBcc: x", 100), "Ann Bcc: x");
        assert_eq!(
            header_text("a\u{2028}b\u{2029}c\u{202e}d\u{85}e\0f", 100),
            "a b c d e f"
        );
        assert_eq!(header_text("  \t ", 100), "");
        assert_eq!(header_text("Jürgen Müller", 3), "Jür");
        assert_eq!(header_text("ab cd", 3), "ab");
        // Emoji sequences (zero-width joiners) survive.
        assert_eq!(header_text("Hi 👩‍👩‍👧", 100), "Hi 👩‍👩‍👧");
    }

    #[test]
    fn a_signed_message_verifies_and_its_signature_covers_the_unsubscribe_headers() {
        for kind in ["rsa-pkcs1", "ed25519"] {
            let key = TestKey::generate(kind);
            let config = leadflow_shared::config::Config::load(&leadflow_shared::config::Source::from_pairs([
                ("LEADFLOW_FROM", "followup@shop.example"),
                ("LEADFLOW_FROM_NAME", "Shop Team"),
                ("LEADFLOW_PUBLIC_URL", "https://mail.shop.example"),
                ("LEADFLOW_TOKEN_KEYS", KEYS),
                ("LEADFLOW_BOUNCE_DOMAIN", "bounces.shop.example"),
                ("LEADFLOW_DKIM_DOMAIN", "shop.example"),
                ("LEADFLOW_DKIM_SELECTOR", "lf1"),
                ("LEADFLOW_DKIM_PRIVATE_KEY", key.pem.as_str()),
            ]))
            .unwrap();
            let sender = Sender::from_config(&config).unwrap();
            let mut message = rendered("Grüße\n.\nline  with  spaces  \n\n", "<p>Grüße</p>");
            message.to_name = Some("Jürgen \"JM\" Müller, Jr.".into());
            message.subject = "Ihr Warenkorb wartet, Jürgen\r\nBcc: eve@evil.example".into();
            let built = build(&sender, &message).unwrap();
            let raw = formatted(&built);
            let names = verify::verify(&raw, &key).unwrap_or_else(|e| panic!("{kind}: {e}\n{raw}"));
            for wanted in [
                "from",
                "to",
                "subject",
                "date",
                "message-id",
                "mime-version",
                "content-type",
                "list-unsubscribe",
                "list-unsubscribe-post",
            ] {
                assert!(
                    names.iter().any(|n| n == wanted),
                    "{kind}: h= lacks {wanted}: {names:?}"
                );
            }
            let signature = header(&raw, "DKIM-Signature");
            assert_eq!(verify::tag(&signature, "d").as_deref(), Some("shop.example"));
            assert_eq!(verify::tag(&signature, "s").as_deref(), Some("lf1"));
            // The signature is over what is sent: a swapped unsubscribe link or a changed body fails.
            let token = mail().keyring.sign(Purpose::Unsubscribe, "d:42");
            let forged_token = mail().keyring.sign(Purpose::Unsubscribe, "d:43");
            assert!(raw.contains(&token));
            assert!(verify::verify(&raw.replace(&token, &forged_token), &key).is_err());
            assert!(verify::verify(&raw.replace("multipart/alternative", "multipart/mixed"), &key).is_err());
            assert!(verify::verify(&raw.replacen("Gr=C3=BC=C3=9Fe", "Hallo", 1), &key).is_err());
        }
    }

    #[test]
    fn a_sender_from_the_configuration_uses_its_links_keys_and_bounce_domain() {
        let config = leadflow_shared::config::Config::load(&leadflow_shared::config::Source::from_pairs([
            ("LEADFLOW_FROM", "followup@shop.example"),
            ("LEADFLOW_PUBLIC_URL", "https://mail.shop.example/"),
            ("LEADFLOW_TOKEN_KEYS", KEYS),
        ]))
        .unwrap();
        let sender = Sender::from_config(&config).unwrap();
        assert!(sender.dkim.is_none());
        let built = build(&sender, &rendered("hi", "<p>hi</p>")).unwrap();
        let raw = formatted(&built);
        let token = mail().keyring.sign(Purpose::Unsubscribe, "d:42");
        assert!(
            header(&raw, "List-Unsubscribe").starts_with(&format!("<https://mail.shop.example/u/{token}>, ")),
            "{raw}"
        );
        // Without LEADFLOW_BOUNCE_DOMAIN bounces go to the From domain.
        assert!(built.envelope.from().unwrap().to_string().ends_with("@shop.example"));
        assert!(!raw.contains("DKIM-Signature"));
    }

    #[test]
    fn a_body_with_a_lone_dot_line_arrives_as_one_intact_message() {
        let text = "first\n.\nsecond\r\n.\r\nthird\r.\rfourth\n.";
        // Plain quoted-printable keeps a lone dot line: the reason for escaping it.
        assert!(String::from_utf8(quoted_printable::encode("a\r\n.\r\nb"))
            .unwrap()
            .contains("\r\n.\r\n"));
        let html = "<p>a</p>\n.\n<p>b</p>\r\n.\r\n<p>c</p>";
        let built = build(&sender(), &rendered(text, html)).unwrap();
        let raw = formatted(&built);
        for line in raw.split("\r\n") {
            assert_ne!(line, ".", "a lone dot line in:\n{raw}");
            assert!(
                !line.contains('\r') && !line.contains('\n'),
                "a bare CR or LF in {line:?}"
            );
        }
        assert!(!raw.contains("\n.\n") && !raw.contains("\r\n.\r\n"));
        // Every line ending is CRLF: no bare LF or CR anywhere.
        assert_eq!(raw.matches('\n').count(), raw.matches("\r\n").count());
        assert_eq!(raw.matches('\r').count(), raw.matches("\r\n").count());
        // The recipient still reads the dots (quoted-printable decodes =2E), with CRLF line endings.
        assert_eq!(
            decode(&encode_quoted_printable(text)),
            "first\r\n.\r\nsecond\r\n.\r\nthird\r\n.\r\nfourth\r\n."
        );
        assert!(raw.contains("\r\n=2E\r\nsecond"), "{raw}");
    }

    #[test]
    fn headers_name_the_sender_the_recipient_and_the_delivery() {
        let built = build(&sender(), &rendered("hi", "<p>hi</p>")).unwrap();
        let raw = formatted(&built);
        assert!(raw.contains("From: \"Shop Team\" <followup@shop.example>\r\n"), "{raw}");
        assert!(raw.contains("To: \"Ann Lee\" <ann@example.com>\r\n"), "{raw}");
        assert!(raw.contains("Subject: Your cart is waiting\r\n"), "{raw}");
        assert!(raw.contains("X-Leadflow-Delivery: 42\r\n"), "{raw}");
        assert!(raw.contains(&format!("Message-ID: {}\r\n", built.message_id)), "{raw}");
        assert_eq!(
            built.message.headers().get::<DeliveryHeader>(),
            Some(DeliveryHeader(42))
        );
        assert!(raw.contains("MIME-Version: 1.0\r\n"), "{raw}");
        assert_eq!(
            header(&raw, "Content-Type"),
            format!("multipart/alternative; boundary=\"{}\"", boundary(&raw))
        );
        assert!(raw.contains("Content-Type: text/plain; charset=utf-8\r\n"), "{raw}");
        assert!(raw.contains("Content-Type: text/html; charset=utf-8\r\n"), "{raw}");
        assert_eq!(
            raw.matches("Content-Transfer-Encoding: quoted-printable\r\n").count(),
            2,
            "{raw}"
        );
        assert_eq!(raw.matches("Content-Transfer-Encoding:").count(), 2, "{raw}");
        assert!(raw.contains("Date: "), "{raw}");
        // The parts follow the header block, delimited by the boundary, and the message ends with its close.
        let (_, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            body.starts_with(&format!("--{}\r\nContent-Type: text/plain", boundary(&raw))),
            "{raw}"
        );
        assert!(raw.ends_with(&format!("--{}--\r\n", boundary(&raw))), "{raw}");
        let to: Vec<String> = built.message.envelope().to().iter().map(|a| a.to_string()).collect();
        assert_eq!(to, vec!["ann@example.com".to_string()]);
    }

    fn boundary(raw: &str) -> String {
        let content_type = header(raw, "Content-Type");
        let start = content_type.find("boundary=\"").expect("a boundary") + "boundary=\"".len();
        content_type[start..].trim_end_matches('"').to_string()
    }

    #[test]
    fn utf8_text_and_long_lines_are_encoded_within_the_line_limit() {
        let text = format!("Grüße, {}\n.{}\n{}", "ä".repeat(60), ".".repeat(200), "x".repeat(300));
        let built = build(&sender(), &rendered(&text, "<p>Grüße</p>")).unwrap();
        let raw = formatted(&built);
        let (_, body) = raw.split_once("\r\n\r\n").unwrap();
        for line in body.split("\r\n") {
            assert!(line.len() <= 78, "line too long ({}): {line}", line.len());
            assert!(line.is_ascii(), "{line}");
            assert!(!line.starts_with('.'), "{line}");
        }
        // Header lines are ASCII within RFC 5322's limit (header_fields checks both).
        header_fields(&raw);
        let encoded = encode_quoted_printable(&text);
        for line in encoded.split("\r\n") {
            assert!(line.len() <= 76, "{line}");
        }
        assert_eq!(decode(&encoded), normalise_line_endings(&text));
        // A subject with non-ASCII text is RFC 2047 encoded, never raw.
        let mut message = rendered("x", "x");
        message.subject = "Ihr Warenkorb wartet, Jürgen".into();
        let raw = formatted(&build(&sender(), &message).unwrap());
        let subject = raw.split("\r\n").find(|l| l.starts_with("Subject: ")).unwrap();
        assert!(subject.contains("=?utf-8?") && !subject.contains("Jürgen"), "{subject}");
    }

    #[test]
    fn header_values_cannot_inject_headers() {
        let mut message = rendered("x", "x");
        message.subject = "Hello\r\nBcc: victim@example.com".into();
        message.to_name = Some("Ann\nX-Evil: 1".into());
        let raw = formatted(&build(&sender(), &message).unwrap());
        assert!(!raw.contains("\r\nBcc:"), "{raw}");
        assert!(!raw.contains("\r\nX-Evil:"), "{raw}");
        assert!(raw.contains("Subject: Hello Bcc: victim@example.com\r\n"), "{raw}");
    }

    #[test]
    fn a_bad_recipient_is_a_build_error() {
        let mut message = rendered("x", "x");
        message.to_address = "not an address".into();
        let err = build(&sender(), &message).unwrap_err();
        assert!(err.0.contains("recipient"), "{err}");
        message.to_address = "ann@example.com".into();
        message.to_name = Some("   ".into());
        let raw = formatted(&build(&sender(), &message).unwrap());
        assert!(raw.contains("To: ann@example.com\r\n"), "{raw}");
    }

    #[test]
    fn line_endings_are_normalised_to_crlf() {
        assert_eq!(normalise_line_endings("a\nb\r\nc\rd\r"), "a\r\nb\r\nc\r\nd\r\n");
        assert_eq!(normalise_line_endings("\n\r\n\r"), "\r\n\r\n\r\n");
        assert_eq!(normalise_line_endings("plain"), "plain");
    }
}
