//! Where email goes, chosen at start-up from `LEADFLOW_SMTP_URL`: an SMTP relay over connections this process
//! owns and keeps open, or a folder of `.eml` files (a local outbox).
//!
//! The SMTP transaction is driven step by step with lettre's `AsyncSmtpConnection` (MAIL, RCPT, DATA, then the
//! message), so the caller learns the phase a failure happened in: before the server answered DATA with 354
//! nothing was handed over and a retry is safe; once the message data is on its way and the final reply does
//! not arrive, the server may have accepted it and the attempt is [`Attempt::Uncertain`]. The caller's `start`
//! hook runs while MAIL, RCPT and DATA go out, and the first byte of data waits for both the 354 and the hook (the
//! sender commits `smtp_started_at` there: its WAL flush overlaps the round trips instead of adding to them).
//!
//! Connections: TCP_NODELAY set, up to `LEADFLOW_SENDER_CONCURRENCY` in use at once, idle ones kept for the next
//! message. A connection that failed in any way (I/O, timeout, protocol, 421) is closed and never reused; a kept
//! connection the server closed while idle is noticed at MAIL and replaced before anything was sent.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lettre::address::Envelope;
use lettre::message::header::Header as _;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use leadflow_shared::config::{Config, SmtpTarget};

use crate::message::{DeliveryHeader, DELIVERY_HEADER};
use crate::metrics;

/// An idle connection older than this is closed rather than reused (servers drop idle sessions after minutes).
const MAX_IDLE: Duration = Duration::from_secs(60);

/// An SMTP reply: the basic code and the text (lines joined by spaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{} {}", self.code, self.text)
        }
    }
}

/// An RFC 3463 enhanced status code `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced {
    pub class: u16,
    pub subject: u16,
    pub detail: u16,
}

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl Enhanced {
    /// Parses `x.y.z` (class 2, 4 or 5; subject and detail up to three digits).
    pub fn parse(token: &str) -> Option<Self> {
        let mut parts = token.split('.');
        let number = |p: Option<&str>| -> Option<u16> {
            let p = p?;
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let class = number(parts.next())?;
        let subject = number(parts.next())?;
        let detail = number(parts.next())?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Self { class, subject, detail })
    }
}

/// What a reply means for the delivery and for the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyClass {
    /// 2xx: accepted.
    Accepted,
    /// The address is bad (5.1.x, 5.2.1): suppress it, end its sequences.
    HardBounce,
    /// A transient problem of the recipient's mailbox (4.x.x, 5.2.2 mailbox full): retry with backoff; a run of
    /// them suppresses the address.
    SoftBounce,
    /// The server or a policy holds the sender back for now (421, 4.7.x): retry; the address is not blamed.
    TryLater,
    /// Policy, reputation or authentication (5.7.x): the sender's problem. Failed, the address not suppressed.
    Policy,
    /// Any other permanent refusal: failed, the address not suppressed.
    Failed,
}

impl Reply {
    /// The enhanced status at the start of the text (a leading `#` and trailing punctuation tolerated); its class
    /// follows the basic code when the two disagree.
    pub fn enhanced(&self) -> Option<Enhanced> {
        let found = self.text.split_whitespace().take(3).find_map(|token| {
            let token = token
                .trim_start_matches('#')
                .trim_end_matches([',', ';', ':', ')', ']']);
            Enhanced::parse(token)
        })?;
        let class = self.code / 100;
        Some(Enhanced {
            class: if matches!(class, 2 | 4 | 5) { class } else { found.class },
            ..found
        })
    }

    /// Classifies the reply by its enhanced status, falling back on the basic code (and, for an ambiguous 550 or
    /// 554 without one, on well-known wording).
    pub fn class(&self) -> ReplyClass {
        let basic = self.code / 100;
        if basic == 2 || basic == 3 {
            return ReplyClass::Accepted;
        }
        if self.code == 421 {
            return ReplyClass::TryLater;
        }
        if let Some(status) = self.enhanced() {
            return match (basic, status.subject, status.detail) {
                (4, 7, _) => ReplyClass::TryLater,
                (4, _, _) => ReplyClass::SoftBounce,
                // 5.1.7 and 5.1.8 are about the sender's address, not the recipient's.
                (5, 1, 7) | (5, 1, 8) => ReplyClass::Failed,
                (5, 1, _) | (5, 2, 1) => ReplyClass::HardBounce,
                (5, 2, 2) => ReplyClass::SoftBounce,
                (5, 7, _) => ReplyClass::Policy,
                _ => ReplyClass::Failed,
            };
        }
        let lower = self.text.to_ascii_lowercase();
        let says = |words: &[&str]| words.iter().any(|w| lower.contains(w));
        let policy = says(&[
            "spam",
            "blocked",
            "blacklist",
            "blocklist",
            "policy",
            "reputation",
            "rejected for policy",
            "authentication",
            "dmarc",
            "spf",
            "dkim",
        ]);
        let no_user = says(&[
            "user unknown",
            "unknown user",
            "no such user",
            "no such mailbox",
            "does not exist",
            "mailbox unavailable",
            "mailbox not found",
            "invalid recipient",
            "recipient not found",
            "address rejected",
            "disabled",
        ]);
        match self.code {
            400..=499 => ReplyClass::SoftBounce,
            530 | 535 | 538 => ReplyClass::Policy,
            521 | 551 | 553 | 556 => ReplyClass::HardBounce,
            552 => ReplyClass::SoftBounce,
            550 | 554 if policy => ReplyClass::Policy,
            550 if no_user => ReplyClass::HardBounce,
            _ => ReplyClass::Failed,
        }
    }

    /// The status recorded for a soft bounce: the enhanced status, or the basic code.
    pub fn status(&self) -> String {
        self.enhanced()
            .map(|e| e.to_string())
            .unwrap_or_else(|| self.code.to_string())
    }

    fn from_error(error: &lettre::transport::smtp::Error) -> Option<Self> {
        let code = error.status()?;
        let text = std::error::Error::source(error)
            .map(|s| one_line(&s.to_string()))
            .unwrap_or_default();
        Some(Self {
            code: u16::from(code),
            text,
        })
    }

    fn from_response(response: &lettre::transport::smtp::response::Response) -> Self {
        Self {
            code: u16::from(response.code()),
            text: one_line(&response.message().collect::<Vec<_>>().join(" ")),
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The server answered the data with 2xx (or the file is in place).
    Accepted(Reply),
    /// A negative reply at MAIL, RCPT, DATA or after the data: the server does not have the message.
    Refused(Reply),
    /// Nothing was handed over (connection, TLS, authentication, a timeout or I/O error before the data): try
    /// again later.
    NotSent(String),
    /// The data went out, in part or whole, and no final reply came (the connection failed or timed out): the
    /// server may have accepted the message.
    Uncertain(String),
    /// The `start` hook declined: the connection was closed before any data went out.
    Abandoned,
}

/// The configured destination of every email.
pub enum Transport {
    /// An SMTP relay over kept-open connections.
    Smtp(Box<SmtpRelay>),
    /// A folder: each message is written as `<utc yyyymmddThhmmss>-<delivery id>.eml`.
    Outbox(PathBuf),
}

impl Transport {
    /// Builds the transport of `config.smtp`; the outbox folder is created if missing.
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        match &config.smtp.target {
            SmtpTarget::Relay {
                host,
                port,
                implicit_tls,
                user,
                password,
            } => {
                let tls = if *implicit_tls {
                    // smtps://: TLS from the first byte; a relay we cannot verify is a configuration error.
                    TlsMode::Implicit(
                        TlsParameters::new(host.clone()).context("LEADFLOW_SMTP_URL: failed to set up TLS")?,
                    )
                } else {
                    match TlsParameters::new(host.clone()) {
                        // smtp://: STARTTLS when the relay offers it, plain otherwise.
                        Ok(params) => TlsMode::Opportunistic(params),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot set up TLS for the SMTP relay; sending without it");
                            TlsMode::Plain
                        }
                    }
                };
                let credentials = user
                    .as_ref()
                    .map(|u| Credentials::new(u.clone(), password.clone().unwrap_or_default()));
                tracing::info!(host = %host, port, implicit_tls, "sending through an SMTP relay");
                Ok(Self::Smtp(Box::new(SmtpRelay {
                    host: host.clone(),
                    port: *port,
                    tls,
                    credentials,
                    hello: ClientId::default(),
                    timeout: config.smtp.timeout,
                    idle: Mutex::new(Vec::new()),
                    slots: tokio::sync::Semaphore::new(config.sender.concurrency.max(1)),
                })))
            }
            SmtpTarget::Outbox(dir) => {
                tokio::fs::create_dir_all(dir)
                    .await
                    .with_context(|| format!("LEADFLOW_SMTP_URL: failed to create the outbox {}", dir.display()))?;
                tracing::info!(outbox = %dir.display(), "writing email to an outbox folder");
                Ok(Self::Outbox(dir.clone()))
            }
        }
    }

    /// Sends one message. `start` runs once before the message data goes out (once a connection is open,
    /// alongside MAIL, RCPT and DATA; or before the outbox file is written); `Ok(false)` or an error abandons the
    /// attempt with nothing sent. An error of `start` is the error, unless the server refused the envelope first
    /// (then the refusal is the outcome); every SMTP outcome is an [`Attempt`].
    pub async fn send<F>(&self, message: &Message, start: F) -> anyhow::Result<Attempt>
    where
        F: std::future::Future<Output = anyhow::Result<bool>>,
    {
        match self {
            Self::Smtp(relay) => relay.send(message, start).await,
            Self::Outbox(dir) => {
                if !start.await? {
                    return Ok(Attempt::Abandoned);
                }
                Ok(match write_to_outbox(dir, message).await {
                    Ok(path) => Attempt::Accepted(Reply {
                        code: 250,
                        text: format!(
                            "written to the outbox as {}",
                            path.file_name().unwrap_or_default().to_string_lossy()
                        ),
                    }),
                    Err(e) => Attempt::NotSent(format!("outbox: {e:#}")),
                })
            }
        }
    }
}

enum TlsMode {
    Plain,
    Opportunistic(TlsParameters),
    Implicit(TlsParameters),
}

/// An SMTP relay and the connections to it this process keeps open.
pub struct SmtpRelay {
    host: String,
    port: u16,
    tls: TlsMode,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeout: Duration,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    /// One permit per connection in use.
    slots: tokio::sync::Semaphore,
}

/// Why a connection is closed instead of being kept.
#[derive(Debug, Clone, Copy)]
enum Discard {
    Failed,
    Closing,
    Abandoned,
}

impl Discard {
    fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Closing => "server_closing",
            Self::Abandoned => "abandoned",
        }
    }
}

impl SmtpRelay {
    /// Idle connections kept open now.
    pub fn idle_connections(&self) -> usize {
        self.lock_idle().len()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<(AsyncSmtpConnection, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        let mut idle = self.lock_idle();
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < MAX_IDLE && !conn.has_broken() {
                return Some(conn);
            }
            metrics::connection_closed("idle");
        }
        None
    }

    fn keep(&self, conn: AsyncSmtpConnection) {
        if conn.has_broken() {
            return discard(conn, Discard::Failed);
        }
        self.lock_idle().push((conn, Instant::now()));
    }

    /// A new, ready connection: TCP with TCP_NODELAY, TLS as configured, EHLO, AUTH.
    async fn connect(&self) -> Result<AsyncSmtpConnection, String> {
        let connected = tokio::time::timeout(self.timeout, async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
            tcp.set_nodelay(true)
                .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
            let mut conn = match &self.tls {
                TlsMode::Implicit(params) => {
                    #[allow(deprecated)]
                    let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
                    stream
                        .upgrade_tls(params.clone())
                        .await
                        .map_err(|e| format!("TLS: {e}"))?;
                    AsyncSmtpConnection::connect_with_transport(Box::new(ImplicitTls(stream)), &self.hello).await
                }
                TlsMode::Plain | TlsMode::Opportunistic(_) => {
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await
                }
            }
            .map_err(|e| format!("greeting: {}", one_line(&e.to_string())))?;
            if let TlsMode::Opportunistic(params) = &self.tls {
                if conn.can_starttls() {
                    conn.starttls(params.clone(), &self.hello)
                        .await
                        .map_err(|e| format!("STARTTLS: {}", one_line(&e.to_string())))?;
                }
            }
            if let Some(credentials) = &self.credentials {
                conn.auth(DEFAULT_MECHANISMS, credentials)
                    .await
                    .map_err(|e| format!("authentication: {}", one_line(&e.to_string())))?;
            }
            Ok::<_, String>(conn)
        })
        .await
        .unwrap_or_else(|_| Err(format!("no connection within {:?}", self.timeout)))?;
        metrics::connection_opened();
        Ok(connected)
    }

    async fn send<F>(&self, message: &Message, start: F) -> anyhow::Result<Attempt>
    where
        F: std::future::Future<Output = anyhow::Result<bool>>,
    {
        let _slot = self
            .slots
            .acquire()
            .await
            .context("the SMTP connection slots were closed")?;
        let envelope = message.envelope().clone();
        let data = message.formatted();
        let first = match self.take_idle() {
            Some(conn) => (conn, true),
            None => match self.connect().await {
                Ok(conn) => (conn, false),
                Err(reason) => return Ok(Attempt::NotSent(reason)),
            },
        };
        // With a connection in hand, the start mark's commit runs while the envelope goes out: the data waits for
        // both the 354 and the mark, and the mark's flush is not added to the round trips of MAIL, RCPT and DATA.
        let (opened, go) = tokio::join!(self.open(first, &envelope, &data), start);
        let mut conn = match opened {
            Ok(conn) => conn,
            Err(attempt) => return Ok(attempt),
        };
        match go {
            Ok(true) => {}
            Ok(false) => {
                discard(conn, Discard::Abandoned);
                return Ok(Attempt::Abandoned);
            }
            Err(e) => {
                discard(conn, Discard::Abandoned);
                return Err(e);
            }
        }
        // The server said 354 and the mark is committed: from the first byte of data on, it may get the message.
        let sent = tokio::time::timeout(self.timeout, conn.message(&data)).await;
        Ok(match sent {
            Ok(Ok(response)) => {
                self.keep(conn);
                Attempt::Accepted(Reply::from_response(&response))
            }
            Ok(Err(e)) => match Reply::from_error(&e) {
                Some(reply) => {
                    if reply.code == 421 {
                        discard(conn, Discard::Closing);
                    } else {
                        self.keep(conn);
                    }
                    Attempt::Refused(reply)
                }
                None => {
                    discard(conn, Discard::Failed);
                    Attempt::Uncertain(format!(
                        "the connection failed after the message data went out: {}",
                        one_line(&e.to_string())
                    ))
                }
            },
            Err(_) => {
                discard(conn, Discard::Failed);
                Attempt::Uncertain(format!("no reply to the message data within {:?}", self.timeout))
            }
        })
    }

    /// `first` (a kept connection, or a new one) with MAIL, RCPT and DATA accepted, ready for the message data;
    /// or the outcome of an attempt that ended before anything was handed over.
    async fn open(
        &self,
        first: (AsyncSmtpConnection, bool),
        envelope: &Envelope,
        data: &[u8],
    ) -> Result<AsyncSmtpConnection, Attempt> {
        // A kept connection the server closed while idle fails at MAIL, before anything was handed over: that
        // one failure is retried once on a new connection.
        let mut next = Some(first);
        loop {
            let (mut conn, reused) = match next.take() {
                Some(first) => first,
                None => match self.connect().await {
                    Ok(conn) => (conn, false),
                    Err(reason) => return Err(Attempt::NotSent(reason)),
                },
            };
            let mail = match mail_command(&conn, envelope, data) {
                Ok(mail) => mail,
                Err(reason) => {
                    self.keep(conn);
                    return Err(Attempt::NotSent(reason));
                }
            };
            match self.step(&mut conn, mail).await {
                Ok(_) => {}
                Err(e) if reused && (e.reply.is_none() || e.reply.as_ref().is_some_and(|r| r.code == 421)) => {
                    discard(conn, Discard::Failed);
                    continue;
                }
                Err(e) => return Err(self.before_data(conn, e).await),
            }
            for (i, to) in envelope.to().iter().enumerate() {
                match self.step(&mut conn, Rcpt::new(to.clone(), vec![])).await {
                    Ok(_) => {}
                    // Further recipients are the campaign's BCC: one refused does not hold up the lead's email.
                    Err(e) if i > 0 && e.reply.as_ref().is_some_and(|r| r.code != 421) => {
                        tracing::warn!(
                            reply = %metrics::mask_addresses(&e.to_string()),
                            "the BCC recipient was refused; sending to the lead only"
                        );
                    }
                    Err(e) => return Err(self.before_data(conn, e).await),
                }
            }
            if let Err(e) = self.step(&mut conn, Data).await {
                return Err(self.before_data(conn, e).await);
            }
            return Ok(conn);
        }
    }

    /// One command and its reply, within the timeout.
    async fn step<C: fmt::Display>(&self, conn: &mut AsyncSmtpConnection, command: C) -> Result<(), StepError> {
        match tokio::time::timeout(self.timeout, conn.command(command)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StepError {
                reply: Reply::from_error(&e),
                text: one_line(&e.to_string()),
            }),
            Err(_) => Err(StepError {
                reply: None,
                text: format!("no reply within {:?}", self.timeout),
            }),
        }
    }

    /// A failure before any data went out: a refusal keeps the connection (after RSET) unless the server is
    /// closing it; anything else discards it.
    async fn before_data(&self, mut conn: AsyncSmtpConnection, error: StepError) -> Attempt {
        match error.reply {
            Some(reply) => {
                if reply.code == 421 {
                    discard(conn, Discard::Closing);
                } else if self.step(&mut conn, Rset).await.is_ok() {
                    self.keep(conn);
                } else {
                    discard(conn, Discard::Failed);
                }
                Attempt::Refused(reply)
            }
            None => {
                discard(conn, Discard::Failed);
                Attempt::NotSent(error.text)
            }
        }
    }
}

/// A failed command: the server's negative reply, or no reply at all.
#[derive(Debug)]
struct StepError {
    reply: Option<Reply>,
    text: String,
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reply {
            Some(reply) => write!(f, "{reply}"),
            None => f.write_str(&self.text),
        }
    }
}

/// Closes a connection for good (the socket is dropped; no QUIT on a connection in an unknown state).
fn discard(conn: AsyncSmtpConnection, why: Discard) {
    drop(conn);
    metrics::connection_closed(why.as_str());
}

/// `MAIL FROM` with the parameters the message needs (as lettre's own transport sets them).
fn mail_command(conn: &AsyncSmtpConnection, envelope: &Envelope, data: &[u8]) -> Result<Mail, String> {
    let mut parameters = Vec::new();
    let non_ascii = envelope.from().is_some_and(|a| !a.to_string().is_ascii())
        || envelope.to().iter().any(|a| !a.to_string().is_ascii());
    if non_ascii {
        if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            return Err("the envelope has non-ASCII addresses and the server does not support SMTPUTF8".into());
        }
        parameters.push(MailParameter::SmtpUtfEight);
    }
    if !data.is_ascii() {
        if !conn.server_info().supports_feature(Extension::EightBitMime) {
            return Err("the message has non-ASCII bytes and the server does not support 8BITMIME".into());
        }
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    Ok(Mail::new(envelope.from().cloned(), parameters))
}

/// A TLS stream set up by lettre (implicit TLS, `smtps://`) over our own TCP stream, handed back to lettre as
/// the transport of a connection.
#[allow(deprecated)]
#[derive(Debug)]
struct ImplicitTls(AsyncNetworkStream);

impl AsyncRead for ImplicitTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let unfilled = buf.initialize_unfilled();
        match futures_util::io::AsyncRead::poll_read(Pin::new(&mut self.get_mut().0), cx, unfilled) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for ImplicitTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        futures_util::io::AsyncWrite::poll_write(Pin::new(&mut self.get_mut().0), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        futures_util::io::AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().0), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        futures_util::io::AsyncWrite::poll_close(Pin::new(&mut self.get_mut().0), cx)
    }
}

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.peer_addr()
    }
}

/// The outbox file name of a message: `<utc yyyymmddThhmmss>-<delivery id>.eml`.
pub fn outbox_file_name(now: chrono::DateTime<chrono::Utc>, message: &Message) -> String {
    let id = message
        .headers()
        .get_raw(DeliveryHeader::name().as_ref())
        .and_then(|raw| raw.trim().parse::<i64>().ok())
        .map(|id| id.to_string())
        .unwrap_or_else(|| format!("no-{DELIVERY_HEADER}-{}", uuid::Uuid::new_v4().simple()));
    format!("{}-{id}.eml", now.format("%Y%m%dT%H%M%S"))
}

/// Writes the message next to its final name, syncs it, then renames: a reader never sees half a file.
async fn write_to_outbox(dir: &Path, message: &Message) -> anyhow::Result<PathBuf> {
    let name = outbox_file_name(chrono::Utc::now(), message);
    let path = dir.join(&name);
    let temp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = async {
        let mut file = tokio::fs::File::create(&temp)
            .await
            .with_context(|| format!("failed to create {}", temp.display()))?;
        file.write_all(&message.formatted()).await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&temp, &path)
            .await
            .with_context(|| format!("failed to move the message to {}", path.display()))
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    written.map(|()| path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{build, RenderedMessage, Sender};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncBufReadExt, BufReader};

    fn message(id: i64) -> Message {
        let rendered = RenderedMessage {
            bcc: None,
            delivery_id: id,
            to_address: "ann@example.com".into(),
            to_name: None,
            subject: "Hi".into(),
            body_text: "text".into(),
            body_html: "<p>html</p>".into(),
        };
        build(&Sender::new("followup@shop.example", "").unwrap(), &rendered)
            .unwrap()
            .message
    }

    fn reply(code: u16, text: &str) -> Reply {
        Reply {
            code,
            text: text.into(),
        }
    }

    async fn go() -> anyhow::Result<bool> {
        Ok(true)
    }

    #[test]
    fn replies_are_classified_by_their_enhanced_status() {
        use ReplyClass::*;
        let cases = [
            (250, "2.0.0 queued as 12", Accepted),
            (
                550,
                "5.1.1 <ann@example.com>: Recipient address rejected: User unknown",
                HardBounce,
            ),
            (550, "5.1.10 null MX", HardBounce),
            (553, "5.1.3 bad address syntax", HardBounce),
            (550, "5.2.1 mailbox disabled", HardBounce),
            (552, "5.2.2 mailbox full", SoftBounce),
            (452, "4.2.2 mailbox full", SoftBounce),
            (451, "4.2.0 try again", SoftBounce),
            (450, "4.1.1 mailbox busy", SoftBounce),
            (451, "4.7.1 greylisted, try again later", TryLater),
            (421, "4.7.0 too many connections", TryLater),
            (421, "service closing", TryLater),
            (554, "5.7.1 message rejected as spam", Policy),
            (550, "5.7.26 unauthenticated email is not accepted (DMARC)", Policy),
            (550, "#5.1.1 user unknown", HardBounce),
            (553, "5.1.8 sender address domain does not exist", Failed),
            (554, "5.3.4 message too big", Failed),
            (554, "5.6.0 bad content", Failed),
            // Only the basic code: well-known wording decides for 550 and 554.
            (550, "no such user here", HardBounce),
            (550, "message blocked for spam", Policy),
            (550, "requested action not taken", Failed),
            (554, "transaction failed", Failed),
            (551, "user not local", HardBounce),
            (552, "storage exceeded", SoftBounce),
            (535, "authentication failed", Policy),
            (450, "mailbox busy", SoftBounce),
        ];
        for (code, text, expected) in cases {
            assert_eq!(reply(code, text).class(), expected, "{code} {text}");
        }
        assert_eq!(reply(550, "5.1.1 gone").status(), "5.1.1");
        assert_eq!(reply(451, "try later").status(), "451");
        // The enhanced class follows the basic code.
        assert_eq!(reply(451, "5.2.0 odd").class(), SoftBounce);
        assert_eq!(
            reply(550, "user 1.2.3.4 unknown").enhanced(),
            None,
            "an IP address is not a status"
        );
        assert_eq!(reply(550, "5.1.1 x").to_string(), "550 5.1.1 x");
    }

    #[test]
    fn outbox_files_are_named_by_time_and_delivery() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-03-04T05:06:07Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(outbox_file_name(at, &message(17)), "20260304T050607-17.eml");
    }

    #[tokio::test]
    async fn the_outbox_gets_one_complete_file_per_message() {
        let dir = std::env::temp_dir().join(format!("leadflow-outbox-test-{}", uuid::Uuid::new_v4().simple()));
        let mut config = leadflow_shared::config::Config::load(&Default::default()).unwrap();
        config.smtp.target = SmtpTarget::Outbox(dir.clone());
        let transport = Transport::from_config(&config).await.unwrap();
        let attempt = transport.send(&message(5), go()).await.unwrap();
        assert!(matches!(attempt, Attempt::Accepted(_)), "{attempt:?}");
        // A declined start writes nothing.
        let declined = transport.send(&message(6), async { Ok(false) }).await.unwrap();
        assert_eq!(declined, Attempt::Abandoned);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].ends_with("-5.eml"), "{names:?}");
        let content = std::fs::read_to_string(dir.join(&names[0])).unwrap();
        assert!(content.contains("X-Leadflow-Delivery: 5\r\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    async fn relay_to(port: u16, timeout: Duration) -> Transport {
        let mut config = leadflow_shared::config::Config::load(&Default::default()).unwrap();
        config.smtp.target = leadflow_shared::config::parse_smtp_url(&format!("smtp://127.0.0.1:{port}")).unwrap();
        config.smtp.timeout = timeout;
        Transport::from_config(&config).await.unwrap()
    }

    #[tokio::test]
    async fn an_unreachable_relay_is_not_sent() {
        // A port nothing listens on: the connection is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let transport = relay_to(port, Duration::from_secs(5)).await;
        let started = Arc::new(AtomicUsize::new(0));
        let hook = {
            let started = started.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                Ok(true)
            }
        };
        match transport.send(&message(1), hook).await.unwrap() {
            Attempt::NotSent(reason) => assert!(!reason.is_empty()),
            other => panic!("expected NotSent, got {other:?}"),
        }
        assert_eq!(started.load(Ordering::SeqCst), 0, "the start hook must not run");
    }

    /// What the scripted server does with the end of the data.
    #[derive(Clone, Copy)]
    enum AfterData {
        Reply(&'static str),
        Close,
        Silence,
    }

    /// An SMTP server answering MAIL, RCPT and the data as scripted per connection; counts connections.
    async fn scripted_server(script: Vec<(Vec<&'static str>, AfterData)>) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            let script = Arc::new(Mutex::new(script.into_iter()));
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let _ = write.write_all(b"220 test ESMTP\r\n").await;
                    // Each transaction of the connection takes the next script entry.
                    let mut current: Option<(std::vec::IntoIter<&'static str>, AfterData)> = None;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let upper = line.to_ascii_uppercase();
                        let reply = if upper.starts_with("EHLO") {
                            "250-test\r\n250 8BITMIME".to_string()
                        } else if upper == "QUIT" {
                            "221 bye".into()
                        } else if upper == "RSET" || upper == "NOOP" {
                            "250 ok".into()
                        } else if upper.starts_with("MAIL") {
                            let next = script.lock().unwrap().next();
                            let Some((replies, after)) = next else { return };
                            let mut replies = replies.into_iter();
                            let first = replies.next().unwrap_or("250 ok").to_string();
                            current = Some((replies, after));
                            first
                        } else if upper == "DATA" {
                            let _ = write.write_all(b"354 go ahead\r\n").await;
                            while let Ok(Some(data)) = lines.next_line().await {
                                if data == "." {
                                    break;
                                }
                            }
                            match current.as_ref().map(|c| c.1) {
                                Some(AfterData::Close) => return,
                                Some(AfterData::Silence) => {
                                    tokio::time::sleep(Duration::from_secs(30)).await;
                                    return;
                                }
                                Some(AfterData::Reply(reply)) => reply.to_string(),
                                None => "250 ok".into(),
                            }
                        } else {
                            current
                                .as_mut()
                                .and_then(|c| c.0.next())
                                .unwrap_or("250 ok")
                                .to_string()
                        };
                        if write.write_all(format!("{reply}\r\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, connections)
    }

    #[tokio::test]
    async fn replies_before_and_after_the_data_are_refusals_and_the_connection_is_kept() {
        let (port, connections) = scripted_server(vec![
            (vec!["250 ok", "550 5.1.1 no such user"], AfterData::Reply("250 ok")),
            (vec!["250 ok", "250 ok"], AfterData::Reply("451 4.3.0 try later")),
            (vec!["250 ok", "250 ok"], AfterData::Reply("250 2.0.0 queued")),
        ])
        .await;
        let transport = relay_to(port, Duration::from_secs(5)).await;
        assert_eq!(
            transport.send(&message(1), go()).await.unwrap(),
            Attempt::Refused(reply(550, "5.1.1 no such user"))
        );
        assert_eq!(
            transport.send(&message(2), go()).await.unwrap(),
            Attempt::Refused(reply(451, "4.3.0 try later"))
        );
        assert_eq!(
            transport.send(&message(3), go()).await.unwrap(),
            Attempt::Accepted(reply(250, "2.0.0 queued"))
        );
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "one kept connection for all three"
        );
    }

    #[tokio::test]
    async fn a_connection_lost_after_the_data_is_uncertain_and_never_reused() {
        let (port, connections) = scripted_server(vec![
            (vec!["250 ok", "250 ok"], AfterData::Close),
            (vec!["250 ok", "250 ok"], AfterData::Reply("250 ok")),
        ])
        .await;
        let transport = relay_to(port, Duration::from_secs(5)).await;
        match transport.send(&message(1), go()).await.unwrap() {
            Attempt::Uncertain(reason) => assert!(reason.contains("after the message data"), "{reason}"),
            other => panic!("expected Uncertain, got {other:?}"),
        }
        assert!(matches!(
            transport.send(&message(2), go()).await.unwrap(),
            Attempt::Accepted(_)
        ));
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_reply_to_the_data_within_the_timeout_is_uncertain() {
        let (port, connections) = scripted_server(vec![
            (vec!["250 ok", "250 ok"], AfterData::Silence),
            (vec!["250 ok", "250 ok"], AfterData::Reply("250 ok")),
        ])
        .await;
        let transport = relay_to(port, Duration::from_millis(500)).await;
        match transport.send(&message(1), go()).await.unwrap() {
            Attempt::Uncertain(reason) => assert!(reason.contains("no reply"), "{reason}"),
            other => panic!("expected Uncertain, got {other:?}"),
        }
        // The timed-out connection is closed: a late reply can never be read as the next message's.
        assert!(matches!(
            transport.send(&message(2), go()).await.unwrap(),
            Attempt::Accepted(_)
        ));
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_start_hook_runs_beside_the_envelope_and_a_refusal_of_the_envelope_is_the_outcome() {
        let (port, _) = scripted_server(vec![
            (vec!["250 ok", "550 5.1.1 no such user"], AfterData::Reply("250 ok")),
            (vec!["250 ok", "250 ok"], AfterData::Reply("250 ok")),
        ])
        .await;
        let transport = relay_to(port, Duration::from_secs(5)).await;
        // The server refused RCPT while the hook was failing: nothing was handed over, the refusal is the outcome.
        assert_eq!(
            transport
                .send(&message(1), async { Err(anyhow::anyhow!("database away")) })
                .await
                .unwrap(),
            Attempt::Refused(reply(550, "5.1.1 no such user"))
        );
        // A hook slower than the envelope's round trips still comes first: the data waits for it.
        let done = Arc::new(AtomicUsize::new(0));
        let hook_done = done.clone();
        let hook = async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            hook_done.store(1, Ordering::SeqCst);
            Ok(true)
        };
        assert!(matches!(
            transport.send(&message(2), hook).await.unwrap(),
            Attempt::Accepted(_)
        ));
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_declined_start_sends_no_data_and_closes_the_connection() {
        let (port, connections) = scripted_server(vec![
            (vec!["250 ok", "250 ok"], AfterData::Reply("250 ok")),
            (vec!["250 ok", "250 ok"], AfterData::Reply("250 ok")),
        ])
        .await;
        let transport = relay_to(port, Duration::from_secs(5)).await;
        assert_eq!(
            transport.send(&message(1), async { Ok(false) }).await.unwrap(),
            Attempt::Abandoned
        );
        let failed = transport
            .send(&message(2), async { Err(anyhow::anyhow!("database away")) })
            .await;
        assert!(failed.is_err());
        assert_eq!(connections.load(Ordering::SeqCst), 2, "neither connection is kept");
        let Transport::Smtp(relay) = &transport else {
            panic!("an SMTP transport")
        };
        assert_eq!(relay.idle_connections(), 0);
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_is_replaced_before_anything_is_sent() {
        // The first connection serves one message and is closed by the server afterwards.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let n = counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let _ = write.write_all(b"220 test ESMTP\r\n").await;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let upper = line.to_ascii_uppercase();
                        if upper == "DATA" {
                            let _ = write.write_all(b"354 go ahead\r\n").await;
                            while let Ok(Some(data)) = lines.next_line().await {
                                if data == "." {
                                    break;
                                }
                            }
                            let _ = write.write_all(b"250 ok\r\n").await;
                            if n == 0 {
                                return;
                            }
                            continue;
                        }
                        let reply = if upper.starts_with("EHLO") {
                            "250 test"
                        } else {
                            "250 ok"
                        };
                        if write.write_all(format!("{reply}\r\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let transport = relay_to(port, Duration::from_secs(5)).await;
        assert!(matches!(
            transport.send(&message(1), go()).await.unwrap(),
            Attempt::Accepted(_)
        ));
        // The connection is kept; the server closes it right after its reply, so the next MAIL finds it gone.
        let Transport::Smtp(relay) = &transport else {
            panic!("an SMTP transport")
        };
        assert_eq!(relay.idle_connections(), 1);
        assert!(matches!(
            transport.send(&message(2), go()).await.unwrap(),
            Attempt::Accepted(_)
        ));
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }
}
