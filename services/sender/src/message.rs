//! Building the email of one delivery with lettre's `Message::builder`: headers, and a text + HTML alternative,
//! each part UTF-8 and quoted-printable.
//!
//! Bodies are normalised to CRLF and always quoted-printable encoded, so the message never carries a bare CR or
//! LF (RUSTSEC-2026-0561 on lettre 0.11.23 is SMTP injection through them). The encoder also writes a `.` that
//! starts a line as `=2E`, so no line of the formatted message is a lone `.` (the end-of-data marker) even
//! before SMTP dot-stuffing, and an outbox file is safe to hand to any tool.

use lettre::message::header::{ContentTransferEncoding, ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Body, Mailbox, MultiPart, SinglePart};
use lettre::{Address, Message};

/// The header carrying the delivery id, for tracing a message back to its delivery row.
pub const DELIVERY_HEADER: &str = "X-Leadflow-Delivery";

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

/// Who follow-ups come from.
#[derive(Debug, Clone)]
pub struct Sender {
    pub address: Address,
    pub name: Option<String>,
}

impl Sender {
    /// From `LEADFLOW_FROM` (already validated) and `LEADFLOW_FROM_NAME` (empty: no display name).
    pub fn new(address: &str, name: &str) -> Result<Self, BuildError> {
        let address = address
            .parse::<Address>()
            .map_err(|e| BuildError(format!("the From address is not valid: {e}")))?;
        let name = header_text(name);
        Ok(Self {
            address,
            name: (!name.is_empty()).then_some(name),
        })
    }
}

/// Why a message could not be built; permanent for its delivery (the stored data is wrong).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

/// A built message and the Message-ID it carries (recorded on the delivery when sent).
#[derive(Debug, Clone)]
pub struct Built {
    pub message: Message,
    pub message_id: String,
}

/// Builds the email of a rendered delivery.
pub fn build(sender: &Sender, rendered: &RenderedMessage) -> Result<Built, BuildError> {
    let to_address = rendered
        .to_address
        .trim()
        .parse::<Address>()
        .map_err(|e| BuildError(format!("the recipient address is not valid: {e}")))?;
    let to_name = rendered.to_name.as_deref().map(header_text).filter(|n| !n.is_empty());
    let message_id = format!(
        "<{}.{}@{}>",
        rendered.delivery_id,
        uuid::Uuid::new_v4().simple(),
        sender.address.domain()
    );
    let mut builder = Message::builder()
        .from(Mailbox::new(sender.name.clone(), sender.address.clone()))
        .to(Mailbox::new(to_name, to_address));
    if let Some(bcc) = rendered.bcc.as_deref().map(str::trim).filter(|b| !b.is_empty()) {
        let bcc = bcc
            .parse::<Address>()
            .map_err(|e| BuildError(format!("the campaign's BCC address is not valid: {e}")))?;
        builder = builder.bcc(Mailbox::new(None, bcc));
    }
    let message = builder
        .subject(header_text(&rendered.subject))
        .message_id(Some(message_id.clone()))
        .header(DeliveryHeader(rendered.delivery_id))
        .multipart(
            MultiPart::alternative()
                .singlepart(part(ContentType::TEXT_PLAIN, &rendered.body_text))
                .singlepart(part(ContentType::TEXT_HTML, &rendered.body_html)),
        )
        .map_err(|e| BuildError(format!("the message could not be built: {e}")))?;
    Ok(Built { message, message_id })
}

fn part(content_type: ContentType, text: &str) -> SinglePart {
    SinglePart::builder()
        .header(content_type)
        .header(ContentTransferEncoding::QuotedPrintable)
        .body(quoted_printable_body(text))
}

/// A header value on one line: control characters (CR, LF, tab, ...) become spaces, runs of spaces collapse.
fn header_text(raw: &str) -> String {
    raw.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
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

    fn sender() -> Sender {
        Sender::new("followup@shop.example", "Shop Team").unwrap()
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
        assert!(built.message_id.starts_with("<42."), "{}", built.message_id);
        assert!(built.message_id.ends_with("@shop.example>"), "{}", built.message_id);
        assert_eq!(
            built.message.headers().get::<DeliveryHeader>(),
            Some(DeliveryHeader(42))
        );
        assert!(raw.contains("Content-Type: multipart/alternative;"), "{raw}");
        assert!(raw.contains("Content-Type: text/plain; charset=utf-8\r\n"), "{raw}");
        assert!(raw.contains("Content-Type: text/html; charset=utf-8\r\n"), "{raw}");
        assert_eq!(
            raw.matches("Content-Transfer-Encoding: quoted-printable\r\n").count(),
            2,
            "{raw}"
        );
        assert!(raw.contains("Date: "), "{raw}");
        let to: Vec<String> = built.message.envelope().to().iter().map(|a| a.to_string()).collect();
        assert_eq!(to, vec!["ann@example.com".to_string()]);
    }

    #[test]
    fn utf8_text_and_long_lines_are_encoded_within_the_line_limit() {
        let text = format!("Grüße, {}\n.{}\n{}", "ä".repeat(60), ".".repeat(200), "x".repeat(300));
        let built = build(&sender(), &rendered(&text, "<p>Grüße</p>")).unwrap();
        let raw = formatted(&built);
        for line in raw.split("\r\n") {
            assert!(line.len() <= 78, "line too long ({}): {line}", line.len());
            assert!(line.is_ascii(), "{line}");
            assert!(!line.starts_with('.'), "{line}");
        }
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
