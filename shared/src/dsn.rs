//! Inbound bounce and complaint reports: RFC 3464 delivery status notifications, RFC 5965 abuse reports (ARF) and
//! mailto unsubscribe requests (RFC 2369), parsed from raw messages into what they say about which recipient.
//!
//! Parsing is tolerant: real MTAs (Postfix, Exim, Exchange, Gmail) bend the standards, so fields are read case-
//! insensitively, continuation lines are unfolded, missing blank lines between recipient blocks are recovered,
//! a generic status (`5.0.0`) is refined from the `Diagnostic-Code`, and a plain-text bounce without a
//! `message/delivery-status` part is read heuristically (and marked so). Parsing never panics: the MIME parser
//! runs under `catch_unwind`, so a defect in it turns into a [`ParseError`], not a crashed service.
//!
//! What a report is *about* is decided by the caller from the signed tokens it carries ([`Report::bounce_tokens`],
//! [`Report::unsubscribe_tokens`]): nothing here is trusted until a token verifies.

use std::borrow::Cow;

use mail_parser::{HeaderName, Message, MessageParser, MessagePart, PartType};

/// How much of a free-text field (a diagnostic, a subject) is kept.
const MAX_TEXT: usize = 1000;
/// Recipient blocks read from one report; the rest are ignored (a report is about one delivery).
const MAX_RECIPIENTS: usize = 100;

/// Why a raw message is not a report leadflow can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the report is empty")]
    Empty,
    #[error("the report is not a MIME message: no header could be read")]
    NotMime,
    #[error("the message is neither a delivery status notification, a feedback report nor an unsubscribe request")]
    NotAReport,
    #[error("the report is malformed: {0}")]
    Malformed(String),
    #[error("the MIME parser failed on this report")]
    ParserFailed,
}

/// What kind of report a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// An RFC 3464 delivery status notification (or a plain-text bounce read heuristically).
    Dsn,
    /// An RFC 5965 feedback report (a complaint).
    Arf,
    /// A mailto unsubscribe request: `Subject: unsubscribe-<token>` sent to `unsubscribe@<bounce domain>`.
    Unsubscribe,
}

impl ReportKind {
    /// The name stored in `inbound_reports.kind` and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dsn => "dsn",
            Self::Arf => "arf",
            Self::Unsubscribe => "mailto",
        }
    }
}

/// The `Action` of one recipient block (RFC 3464 2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
    /// No action given and none could be inferred from the status.
    Unknown,
}

impl Action {
    fn parse(raw: &str) -> Self {
        let word = raw
            .split(|c: char| c.is_whitespace() || c == '(' || c == ';')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match word.as_str() {
            "failed" | "failure" => Self::Failed,
            "delayed" => Self::Delayed,
            "delivered" => Self::Delivered,
            "relayed" => Self::Relayed,
            "expanded" => Self::Expanded,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Delayed => "delayed",
            Self::Delivered => "delivered",
            Self::Relayed => "relayed",
            Self::Expanded => "expanded",
            Self::Unknown => "unknown",
        }
    }
}

/// What a recipient block means for the address it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Nothing to do: delayed, delivered, relayed, expanded, or a success status.
    Ignore,
    /// The sender's problem (policy, reputation, authentication, content): the recipient is never blamed.
    Policy,
    /// Transient (4.x.x, mailbox full, or a permanent failure that does not say the address is bad): counts
    /// toward the soft-bounce rule.
    Soft,
    /// The address is bad (5.1.x, 5.2.1): suppress at once.
    Hard,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ignore => "ignore",
            Self::Policy => "policy",
            Self::Soft => "soft",
            Self::Hard => "hard",
        }
    }
}

/// One per-recipient block of a delivery status notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientStatus {
    /// `Final-Recipient`, without its address type.
    pub final_recipient: Option<String>,
    /// `Original-Recipient`, without its address type.
    pub original_recipient: Option<String>,
    pub action: Action,
    /// The RFC 3463 code (`5.1.1`), from `Status` or, when that is missing or generic, from the diagnostic.
    pub status: Option<String>,
    /// `Diagnostic-Code`, without its type (`smtp;`).
    pub diagnostic: Option<String>,
    /// `Remote-MTA`, without its type.
    pub remote_mta: Option<String>,
}

impl RecipientStatus {
    /// The class of this block: only a `failed` action can bounce; the status and diagnostic say how.
    pub fn class(&self) -> Class {
        match self.action {
            Action::Failed => classify(self.status.as_deref(), self.diagnostic.as_deref()),
            _ => Class::Ignore,
        }
    }

    /// Whether the block is about `email` (compared case-insensitively with the final and original recipient).
    pub fn names(&self, email: &str) -> bool {
        [&self.final_recipient, &self.original_recipient]
            .into_iter()
            .flatten()
            .any(|r| r.eq_ignore_ascii_case(email.trim()))
    }
}

/// The machine-readable part of an RFC 5965 feedback report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Feedback {
    /// `Feedback-Type`, lower-cased: abuse, fraud, virus, other, not-spam, auth-failure.
    pub feedback_type: Option<String>,
    pub user_agent: Option<String>,
    /// `Original-Mail-From`: the return path of the reported message (a VERP address).
    pub original_mail_from: Option<String>,
    /// `Original-Rcpt-To` (may repeat).
    pub original_rcpt_to: Vec<String>,
    pub reported_domain: Option<String>,
}

impl Feedback {
    /// Whether the report is a complaint about unwanted mail (`abuse` or `fraud`).
    pub fn is_complaint(&self) -> bool {
        matches!(self.feedback_type.as_deref(), Some("abuse" | "fraud"))
    }
}

/// Headers of the original message a report includes (`message/rfc822` or `text/rfc822-headers`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Original {
    /// `X-Leadflow-Delivery`, trimmed (not trusted: a claim to be checked against a token).
    pub delivery: Option<String>,
    pub message_id: Option<String>,
    pub return_path: Option<String>,
    /// `List-Unsubscribe`, unfolded.
    pub list_unsubscribe: Option<String>,
    pub to: Option<String>,
}

/// A parsed report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: ReportKind,
    /// Where the report was addressed: `Delivered-To`, `X-Original-To`, `Envelope-To`, `X-Envelope-To`, `To`
    /// (for a bounce, the VERP return path of the original message).
    pub addressed_to: Vec<String>,
    pub from: Option<String>,
    pub subject: Option<String>,
    /// `Reporting-MTA`, without its type.
    pub reporting_mta: Option<String>,
    /// The envelope sender the reporting MTA names (Postfix's `X-Postfix-Sender`): the VERP return path.
    pub envelope_sender: Option<String>,
    /// The recipient blocks of a DSN (empty for other kinds).
    pub recipients: Vec<RecipientStatus>,
    pub feedback: Option<Feedback>,
    pub original: Option<Original>,
    /// The token of a mailto unsubscribe request (`unsubscribe-<token>` in the subject).
    pub unsubscribe_token: Option<String>,
    /// True when the report had no `message/delivery-status` part and its status was read from the text.
    pub heuristic: bool,
}

impl Report {
    fn new(kind: ReportKind) -> Self {
        Self {
            kind,
            addressed_to: Vec::new(),
            from: None,
            subject: None,
            reporting_mta: None,
            envelope_sender: None,
            recipients: Vec::new(),
            feedback: None,
            original: None,
            unsubscribe_token: None,
            heuristic: false,
        }
    }

    /// Every VERP token (`bounces+<token>@...`) the report carries, where a return path can appear: the
    /// addresses the report was sent to, the envelope sender the MTA names, the feedback report's
    /// `Original-Mail-From` and the included original's `Return-Path`. Unverified: check each with the keyring.
    pub fn bounce_tokens(&self) -> Vec<String> {
        let mut places: Vec<&str> = self.addressed_to.iter().map(String::as_str).collect();
        places.extend(self.envelope_sender.as_deref());
        if let Some(f) = &self.feedback {
            places.extend(f.original_mail_from.as_deref());
        }
        if let Some(o) = &self.original {
            places.extend(o.return_path.as_deref());
        }
        let mut out = Vec::new();
        for place in places {
            for address in addresses_in(place) {
                if let Some(token) = verp_token(&address) {
                    push_unique(&mut out, token.to_string());
                }
            }
        }
        out
    }

    /// Every unsubscribe token the report carries: the mailto request's subject, and the links and mailto
    /// subject in the included original's `List-Unsubscribe`. Unverified: check each with the keyring.
    pub fn unsubscribe_tokens(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(t) = &self.unsubscribe_token {
            push_unique(&mut out, t.clone());
        }
        if let Some(header) = self.original.as_ref().and_then(|o| o.list_unsubscribe.as_deref()) {
            for (marker, stop) in [("/u/", ">"), ("unsubscribe-", ">&")] {
                let mut rest = header;
                while let Some(at) = rest.find(marker) {
                    rest = &rest[at + marker.len()..];
                    let token: String = rest
                        .chars()
                        .take_while(|c| !stop.contains(*c) && is_token_char(*c))
                        .collect();
                    if looks_like_token(&token) {
                        push_unique(&mut out, token);
                    }
                }
            }
        }
        out
    }

    /// The recipient blocks that name `email`; when none names any address (a heuristic read of a plain-text
    /// bounce that found no address), the only block.
    pub fn recipients_for(&self, email: &str) -> Vec<&RecipientStatus> {
        let named: Vec<&RecipientStatus> = self.recipients.iter().filter(|r| r.names(email)).collect();
        if !named.is_empty() {
            return named;
        }
        let anonymous = self
            .recipients
            .iter()
            .all(|r| r.final_recipient.is_none() && r.original_recipient.is_none());
        if anonymous && self.recipients.len() == 1 {
            return self.recipients.iter().collect();
        }
        Vec::new()
    }
}

fn push_unique(out: &mut Vec<String>, value: String) {
    if !out.contains(&value) {
        out.push(value);
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// `<key id>.<payload>.<mac>`: three non-empty base64url parts.
fn looks_like_token(s: &str) -> bool {
    s.len() <= 512 && s.chars().all(is_token_char) && s.split('.').count() == 3 && s.split('.').all(|p| !p.is_empty())
}

/// The token of a VERP address `bounces+<token>@<domain>` (angle brackets and an `rfc822;` type allowed).
pub fn verp_token(address: &str) -> Option<&str> {
    let address = strip_address_type(address);
    let address = address.trim().trim_start_matches('<').trim_end_matches('>').trim();
    let (local, _domain) = address.rsplit_once('@')?;
    let prefix = local.get(..8)?;
    if !prefix.eq_ignore_ascii_case("bounces+") {
        return None;
    }
    let token = &local[8..];
    looks_like_token(token).then_some(token)
}

/// Classifies an RFC 3463 status (and the diagnostic text, which refines a generic or missing status).
///
/// - 2.x.x: [`Class::Ignore`]; 4.x.x: [`Class::Soft`].
/// - 5.1.x (but 5.1.7 / 5.1.8, the sender's address) and 5.2.1: [`Class::Hard`]; 5.2.2 (mailbox full): soft.
/// - 5.7.x (policy, reputation, authentication), 5.6.x (content), 5.2.3 / 5.3.4 (message too big), 5.1.7 /
///   5.1.8: [`Class::Policy`].
/// - Other 5.x.x: soft, unless the diagnostic says more ("user unknown": hard; "blocked", "spam": policy;
///   "quota": soft). A permanent failure that does not say the address is bad is counted, not trusted.
pub fn classify(status: Option<&str>, diagnostic: Option<&str>) -> Class {
    let code = status
        .and_then(enhanced_code)
        .or_else(|| diagnostic.and_then(enhanced_code));
    let Some((class, subject, detail)) = code else {
        // No enhanced code: the basic reply code and the words of the diagnostic are all there is.
        let text = diagnostic.unwrap_or_default();
        return match basic_reply_class(text) {
            Some(2) => Class::Ignore,
            Some(4) => Class::Soft,
            _ => from_words(text).unwrap_or(Class::Soft),
        };
    };
    match (class, subject, detail) {
        (2, _, _) => Class::Ignore,
        (4, _, _) => Class::Soft,
        (5, 1, 7 | 8) => Class::Policy,
        (5, 1, _) => Class::Hard,
        (5, 2, 1) => Class::Hard,
        (5, 2, 2) => Class::Soft,
        (5, 2, 3) | (5, 3, 4) => Class::Policy,
        (5, 6, _) | (5, 7, _) => Class::Policy,
        (5, 0, _) | (5, _, 0) => from_words(diagnostic.unwrap_or_default()).unwrap_or(Class::Soft),
        _ => Class::Soft,
    }
}

/// What the words of a diagnostic say, when they say something clearly. Policy words win: a sender-side block
/// must never suppress a good address.
fn from_words(text: &str) -> Option<Class> {
    let text = text.to_ascii_lowercase();
    const POLICY: &[&str] = &[
        "spam",
        "blocked",
        "blacklist",
        "blocklist",
        "block list",
        "reputation",
        "policy",
        "dmarc",
        "spf",
        "dkim",
        "authenticat",
        "rate limit",
        "too many",
        "banned",
        "not authorized",
        "relay access denied",
        "relaying denied",
        "access denied",
    ];
    const SOFT: &[&str] = &[
        "quota",
        "mailbox full",
        "mailbox is full",
        "insufficient storage",
        "over limit",
    ];
    const HARD: &[&str] = &[
        "user unknown",
        "unknown user",
        "no such user",
        "no such mailbox",
        "no such recipient",
        "mailbox not found",
        "user not found",
        "recipient not found",
        "address not found",
        "unknown recipient",
        "recipient unknown",
        "invalid recipient",
        "does not exist",
        "doesn't exist",
        "not a valid mailbox",
        "account disabled",
        "account has been disabled",
        "mailbox disabled",
        "unrouteable address",
        "no mailbox here",
    ];
    if POLICY.iter().any(|w| text.contains(w)) {
        Some(Class::Policy)
    } else if SOFT.iter().any(|w| text.contains(w)) {
        Some(Class::Soft)
    } else if HARD.iter().any(|w| text.contains(w)) {
        Some(Class::Hard)
    } else {
        None
    }
}

/// The first RFC 3463 code in `text` (`class.subject.detail`, class 2, 4 or 5), as numbers.
pub fn enhanced_code(text: &str) -> Option<(u16, u16, u16)> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'.');
        if starts_word && matches!(bytes[i], b'2' | b'4' | b'5') && bytes.get(i + 1) == Some(&b'.') {
            if let Some(code) = read_code(&bytes[i..]) {
                return Some(code);
            }
        }
        i += 1;
    }
    None
}

/// Reads `d.ddd.ddd` at the start of `bytes`, followed by a non-digit non-dot (or the end).
fn read_code(bytes: &[u8]) -> Option<(u16, u16, u16)> {
    let class = u16::from(bytes[0] - b'0');
    let mut pos = 2;
    let mut parts = [0u16; 2];
    for (n, part) in parts.iter_mut().enumerate() {
        let start = pos;
        while pos < bytes.len() && bytes[pos].is_ascii_digit() && pos - start < 3 {
            *part = *part * 10 + u16::from(bytes[pos] - b'0');
            pos += 1;
        }
        if pos == start {
            return None;
        }
        if n == 0 {
            if bytes.get(pos) != Some(&b'.') {
                return None;
            }
            pos += 1;
        }
    }
    match bytes.get(pos) {
        Some(b) if b.is_ascii_digit() || (*b == b'.' && bytes.get(pos + 1).is_some_and(u8::is_ascii_digit)) => None,
        _ => Some((class, parts[0], parts[1])),
    }
}

fn format_code((class, subject, detail): (u16, u16, u16)) -> String {
    format!("{class}.{subject}.{detail}")
}

/// The class digit of an SMTP reply code at the start of a diagnostic (`550 ...`, `421-...`).
fn basic_reply_class(text: &str) -> Option<u8> {
    let t = text.trim_start().as_bytes();
    if t.len() >= 3 && t[..3].iter().all(u8::is_ascii_digit) && t.get(3).is_none_or(|b| !b.is_ascii_digit()) {
        Some(t[0] - b'0')
    } else {
        None
    }
}

/// Parses a raw report (a whole message, headers and body). Never panics.
pub fn parse_report(raw: &[u8]) -> Result<Report, ParseError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(ParseError::Empty);
    }
    // The MIME parser promises not to panic; if it ever does on some input, that input is refused, not fatal.
    std::panic::catch_unwind(|| parse_inner(raw)).unwrap_or(Err(ParseError::ParserFailed))
}

fn parse_inner(raw: &[u8]) -> Result<Report, ParseError> {
    let message = MessageParser::default().parse(raw).ok_or(ParseError::NotMime)?;
    if message.parts.is_empty() || message.headers().is_empty() {
        return Err(ParseError::NotMime);
    }
    let headers = raw_headers(&message);
    let root_type = content_type_of(&message.parts[0]);
    let report_type = root_type
        .as_ref()
        .and_then(|t| t.report_type.clone())
        .unwrap_or_default();

    let mut delivery_status: Option<String> = None;
    let mut feedback_report: Option<String> = None;
    let mut original: Option<Original> = None;
    for part in message.parts.iter().skip(1) {
        let Some(ct) = content_type_of(part) else { continue };
        match ct.full.as_str() {
            "message/delivery-status" | "message/global-delivery-status" if delivery_status.is_none() => {
                delivery_status = Some(part_text(part).into_owned());
            }
            "message/feedback-report" if feedback_report.is_none() => {
                feedback_report = Some(part_text(part).into_owned());
            }
            "message/rfc822" | "message/global" | "text/rfc822-headers" | "message/global-headers"
                if original.is_none() =>
            {
                original = Some(original_headers(&part_text(part)));
            }
            _ => {}
        }
    }

    let subject = header(&headers, "subject").map(|s| truncate(&unfold(s)));
    let kind = if feedback_report.is_some() || report_type == "feedback-report" {
        ReportKind::Arf
    } else if delivery_status.is_some() || report_type == "delivery-status" {
        ReportKind::Dsn
    } else if subject.as_deref().and_then(mailto_token).is_some() {
        ReportKind::Unsubscribe
    } else {
        ReportKind::Dsn
    };

    let mut report = Report::new(kind);
    for name in ["delivered-to", "x-original-to", "envelope-to", "x-envelope-to", "to"] {
        for value in headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v) {
            for address in addresses_in(value) {
                push_unique(&mut report.addressed_to, address);
            }
        }
    }
    report.from = header(&headers, "from").and_then(|f| addresses_in(f).into_iter().next());
    report.subject = subject;
    report.original = original;

    match kind {
        ReportKind::Unsubscribe => {
            report.unsubscribe_token = report.subject.as_deref().and_then(mailto_token).map(str::to_string);
        }
        ReportKind::Arf => {
            let text = feedback_report.ok_or_else(|| {
                ParseError::Malformed("a feedback report without its message/feedback-report part".into())
            })?;
            report.feedback = Some(parse_feedback(&text));
        }
        ReportKind::Dsn => match delivery_status {
            Some(text) => read_delivery_status(&text, &mut report)?,
            None if report_type == "delivery-status" => {
                return Err(ParseError::Malformed(
                    "a delivery status notification without its message/delivery-status part".into(),
                ))
            }
            None => read_plain_bounce(&message, &headers, &mut report)?,
        },
    }
    Ok(report)
}

/// The `Content-Type` of a part: `type/subtype` lower-cased and the `report-type` parameter.
struct PartContentType {
    full: String,
    report_type: Option<String>,
}

fn content_type_of(part: &MessagePart<'_>) -> Option<PartContentType> {
    let ct = part
        .headers
        .iter()
        .find(|h| h.name == HeaderName::ContentType)
        .and_then(|h| h.value.as_content_type())?;
    let full = match ct.subtype() {
        Some(sub) => format!("{}/{}", ct.ctype(), sub),
        None => ct.ctype().to_string(),
    }
    .to_ascii_lowercase();
    let report_type = ct.attribute("report-type").map(|r| r.trim().to_ascii_lowercase());
    Some(PartContentType { full, report_type })
}

/// A part's decoded body as text (lossy for stray bytes).
fn part_text<'a>(part: &'a MessagePart<'_>) -> Cow<'a, str> {
    match &part.body {
        PartType::Text(t) | PartType::Html(t) => Cow::Borrowed(t.as_ref()),
        PartType::Multipart(_) => Cow::Borrowed(""),
        _ => String::from_utf8_lossy(part.contents()),
    }
}

/// The top-level headers as (lower-cased name, raw value) pairs, in order.
fn raw_headers(message: &Message<'_>) -> Vec<(String, String)> {
    message
        .headers_raw()
        .map(|(name, value)| (name.to_ascii_lowercase(), value.to_string()))
        .collect()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Joins folded lines and trims.
fn unfold(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, line) in value.split('\n').enumerate() {
        let line = line.trim_end_matches('\r');
        if i > 0 {
            out.push(' ');
        }
        out.push_str(line.trim());
    }
    out.trim().to_string()
}

fn truncate(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

/// Field groups of a `message/delivery-status` or `message/feedback-report` body, or a header block: groups are
/// separated by blank lines, fields are `Name: value` with folded continuation lines. Names are lower-cased.
fn field_groups(text: &str) -> Vec<Vec<(String, String)>> {
    let mut groups = Vec::new();
    let mut group: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !group.is_empty() {
                groups.push(std::mem::take(&mut group));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = group.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if !name.is_empty() && !name.contains(' ') {
                group.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
        }
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

fn field<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// `rfc822; ann@example.com` -> `ann@example.com` (the type before `;` dropped).
fn strip_address_type(value: &str) -> &str {
    match value.split_once(';') {
        Some((kind, rest)) if !kind.contains('@') && !kind.contains('<') => rest.trim(),
        _ => value.trim(),
    }
}

/// An address field's address: type dropped, angle brackets and comments removed.
fn address_value(value: &str) -> Option<String> {
    addresses_in(strip_address_type(value)).into_iter().next()
}

/// Every address-looking word of a header value (`Name <a@b>, c@d`), without brackets.
fn addresses_in(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in value.split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '<' | '>' | '"' | '(' | ')')) {
        let word = word.trim_matches(|c: char| matches!(c, '\'' | '.' | ':' | '[' | ']'));
        if let Some((local, domain)) = word.rsplit_once('@') {
            if !local.is_empty() && domain.contains('.') && word.len() <= 512 {
                let word = word.strip_prefix("mailto:").unwrap_or(word);
                push_unique(&mut out, word.to_string());
            }
        }
    }
    out
}

fn read_delivery_status(text: &str, report: &mut Report) -> Result<(), ParseError> {
    let groups = field_groups(text);
    for group in &groups {
        if report.reporting_mta.is_none() {
            report.reporting_mta = field(group, "reporting-mta").map(|v| strip_address_type(v).to_string());
        }
        if report.envelope_sender.is_none() {
            report.envelope_sender = field(group, "x-postfix-sender").and_then(address_value);
        }
        // A recipient block starts at each Final-Recipient (or Original-Recipient not directly before one): this
        // recovers blocks an MTA forgot to separate with a blank line.
        let mut current: Vec<(String, String)> = Vec::new();
        for (name, value) in group {
            let has_final = field(&current, "final-recipient").is_some();
            let has_outcome = current.iter().any(|(n, _)| n == "action" || n == "status");
            let starts =
                (name == "final-recipient" && has_final) || (name == "original-recipient" && has_final && has_outcome);
            if starts {
                push_recipient(&current, report);
                current.clear();
            }
            current.push((name.clone(), value.clone()));
        }
        push_recipient(&current, report);
    }
    if report.recipients.is_empty() {
        return Err(ParseError::Malformed(
            "the delivery-status part names no recipient with an action or status".into(),
        ));
    }
    Ok(())
}

fn push_recipient(group: &[(String, String)], report: &mut Report) {
    if report.recipients.len() >= MAX_RECIPIENTS {
        return;
    }
    let final_recipient = field(group, "final-recipient").and_then(address_value);
    let original_recipient = field(group, "original-recipient").and_then(address_value);
    let action = field(group, "action").map(Action::parse);
    let diagnostic = field(group, "diagnostic-code").map(|d| truncate(strip_address_type(d)));
    let mut status = field(group, "status").and_then(enhanced_code);
    // A generic status (5.0.0, 4.0.0) is refined by a more specific code of the same class in the diagnostic.
    if let (Some(s), Some(d)) = (status, diagnostic.as_deref().and_then(enhanced_code)) {
        if s.1 == 0 && s.2 == 0 && d.0 == s.0 && (d.1, d.2) != (0, 0) {
            status = Some(d);
        }
    }
    let status = status.or_else(|| diagnostic.as_deref().and_then(enhanced_code));
    if final_recipient.is_none() && original_recipient.is_none() {
        return;
    }
    if action.is_none() && status.is_none() {
        return;
    }
    let action = match action {
        Some(Action::Unknown) | None => match status.map(|s| s.0) {
            Some(5) => Action::Failed,
            Some(4) => Action::Delayed,
            Some(2) => Action::Delivered,
            _ => Action::Unknown,
        },
        Some(a) => a,
    };
    report.recipients.push(RecipientStatus {
        final_recipient,
        original_recipient,
        action,
        status: status.map(format_code),
        diagnostic,
        remote_mta: field(group, "remote-mta").map(|v| strip_address_type(v).to_string()),
    });
}

fn parse_feedback(text: &str) -> Feedback {
    let fields: Vec<(String, String)> = field_groups(text).into_iter().flatten().collect();
    Feedback {
        feedback_type: field(&fields, "feedback-type").map(|t| {
            t.split(|c: char| c.is_whitespace() || c == ';')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase()
        }),
        user_agent: field(&fields, "user-agent").map(truncate),
        original_mail_from: field(&fields, "original-mail-from").and_then(address_value),
        original_rcpt_to: fields
            .iter()
            .filter(|(n, _)| n == "original-rcpt-to")
            .filter_map(|(_, v)| address_value(v))
            .collect(),
        reported_domain: field(&fields, "reported-domain").map(truncate),
    }
}

/// The headers that matter of an included original message (only its header block is read).
fn original_headers(text: &str) -> Original {
    let fields = field_groups(text).into_iter().next().unwrap_or_default();
    Original {
        delivery: field(&fields, "x-leadflow-delivery").map(|v| truncate(v.trim())),
        message_id: field(&fields, "message-id").map(truncate),
        return_path: field(&fields, "return-path").and_then(address_value),
        list_unsubscribe: field(&fields, "list-unsubscribe").map(truncate),
        to: field(&fields, "to").map(truncate),
    }
}

/// The token of a mailto unsubscribe subject: `unsubscribe-<token>` (a `Re:` or other prefix tolerated).
fn mailto_token(subject: &str) -> Option<&str> {
    let lower = subject.to_ascii_lowercase();
    let at = lower.find("unsubscribe-")?;
    let rest = &subject[at + "unsubscribe-".len()..];
    let end = rest.find(|c: char| !is_token_char(c)).unwrap_or(rest.len());
    let token = &rest[..end];
    looks_like_token(token).then_some(token)
}

/// A bounce without a `message/delivery-status` part (older Exim, qmail, some gateways): when it comes from a
/// mailer daemon or says it is a delivery failure, and its text holds a status code, one recipient block is
/// read from the text.
fn read_plain_bounce(
    message: &Message<'_>,
    headers: &[(String, String)],
    report: &mut Report,
) -> Result<(), ParseError> {
    let from = report.from.clone().unwrap_or_default().to_ascii_lowercase();
    let subject = report.subject.clone().unwrap_or_default().to_ascii_lowercase();
    let from_daemon = ["mailer-daemon@", "postmaster@", "mail-daemon@"]
        .iter()
        .any(|p| from.starts_with(p));
    let says_bounce = [
        "undeliver",
        "delivery status",
        "delivery failure",
        "delivery failed",
        "failure notice",
        "returned mail",
        "could not be delivered",
        "delivery has failed",
        "delayed mail",
        "delivery delayed",
    ]
    .iter()
    .any(|w| subject.contains(w));
    let null_sender = header(headers, "return-path").is_some_and(|r| r.trim() == "<>");
    if !(from_daemon || says_bounce || null_sender) {
        return Err(ParseError::NotAReport);
    }
    let text: String = message
        .text_bodies()
        .map(|p| part_text(p).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    let status_line = text
        .lines()
        .find(|l| enhanced_code(l).is_some_and(|c| c.0 == 4 || c.0 == 5))
        .or_else(|| text.lines().find(|l| matches!(basic_reply_class(l), Some(4 | 5))));
    let Some(status_line) = status_line else {
        return Err(ParseError::Malformed(
            "a bounce without a delivery-status part and without a status code in its text".into(),
        ));
    };
    let code = enhanced_code(status_line).filter(|c| c.0 == 4 || c.0 == 5);
    let reply_class = basic_reply_class(status_line);
    let temporary = code.map(|c| c.0) == Some(4) || reply_class == Some(4) || subject.contains("delay");
    let skip = |a: &String| verp_token(a).is_some() || a.to_ascii_lowercase() == from;
    let recipient = addresses_in(status_line)
        .into_iter()
        .find(|a| !skip(a))
        .or_else(|| header(headers, "x-failed-recipients").and_then(|v| addresses_in(v).into_iter().find(|a| !skip(a))))
        .or_else(|| {
            text.lines()
                .take_while(|l| !l.starts_with("Received:") && !l.starts_with("Return-Path:"))
                .flat_map(addresses_in)
                .find(|a| !skip(a))
        });
    report.heuristic = true;
    report.recipients.push(RecipientStatus {
        final_recipient: recipient,
        original_recipient: None,
        action: if temporary { Action::Delayed } else { Action::Failed },
        status: code.map(format_code),
        diagnostic: Some(truncate(status_line.trim())),
        remote_mta: None,
    });
    if report.original.is_none() {
        report.original = embedded_original(&text);
    }
    Ok(())
}

/// The header block of an original message quoted in a plain-text bounce, from its first header line on.
fn embedded_original(text: &str) -> Option<Original> {
    let starts = [
        "return-path:",
        "received:",
        "x-leadflow-delivery:",
        "message-id:",
        "list-unsubscribe:",
    ];
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let lower = line.to_ascii_lowercase();
        if starts.iter().any(|s| lower.starts_with(s)) {
            let original = original_headers(&text[offset..]);
            return (original != Original::default()).then_some(original);
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_by_rfc_3463() {
        assert_eq!(classify(Some("5.1.1"), None), Class::Hard);
        assert_eq!(classify(Some("5.1.10"), None), Class::Hard);
        assert_eq!(classify(Some("5.2.1"), None), Class::Hard);
        assert_eq!(classify(Some("5.2.2"), None), Class::Soft);
        assert_eq!(classify(Some("4.2.2"), None), Class::Soft);
        assert_eq!(classify(Some("4.4.7"), None), Class::Soft);
        assert_eq!(classify(Some("5.7.1"), Some("550 5.7.1 user unknown")), Class::Policy);
        assert_eq!(classify(Some("5.7.26"), None), Class::Policy);
        assert_eq!(classify(Some("5.1.8"), None), Class::Policy);
        assert_eq!(classify(Some("2.0.0"), None), Class::Ignore);
        assert_eq!(classify(Some("5.0.0"), Some("unknown user: \"ann\"")), Class::Hard);
        assert_eq!(classify(Some("5.0.0"), Some("554 blocked by Spamhaus")), Class::Policy);
        assert_eq!(classify(Some("5.0.0"), Some("something odd")), Class::Soft);
        assert_eq!(classify(None, Some("smtp; 550 5.1.1 no such user")), Class::Hard);
        assert_eq!(classify(None, Some("421 try later")), Class::Soft);
        assert_eq!(classify(None, None), Class::Soft);
    }

    #[test]
    fn enhanced_codes_are_found_as_whole_words() {
        assert_eq!(enhanced_code("550 5.1.1 <a@b.c>"), Some((5, 1, 1)));
        assert_eq!(enhanced_code("5.1.10"), Some((5, 1, 10)));
        assert_eq!(enhanced_code("version 15.5.1.2"), None);
        assert_eq!(enhanced_code("ip 10.4.4.1 said 4.4.1"), Some((4, 4, 1)));
        assert_eq!(enhanced_code("5."), None);
        assert_eq!(enhanced_code("5.1"), None);
        assert_eq!(enhanced_code("5.1.1234"), None);
    }

    #[test]
    fn verp_tokens_are_read_from_addresses() {
        assert_eq!(verp_token("<bounces+k1.MTI.abc@b.example>"), Some("k1.MTI.abc"));
        assert_eq!(verp_token("rfc822; Bounces+k1.MTI.abc@b.example"), Some("k1.MTI.abc"));
        assert_eq!(verp_token("bounces+nope@b.example"), None);
        assert_eq!(verp_token("ann@b.example"), None);
        assert_eq!(verp_token("bounces@b.example"), None);
    }

    #[test]
    fn field_groups_unfold_and_split() {
        let groups = field_groups("A: 1\r\nB: 2\r\n  more\r\n\r\nC: 3\n");
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0][1], ("b".to_string(), "2 more".to_string()));
        assert_eq!(groups[1][0], ("c".to_string(), "3".to_string()));
    }
}
