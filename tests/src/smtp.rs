//! A capturing SMTP server for end-to-end tests: real TCP, the commands a client needs, scripted failures.
//!
//! It speaks EHLO/HELO, MAIL FROM, RCPT TO, DATA (with dot-unstuffing), RSET, NOOP, VRFY and QUIT, records every
//! accepted message as it arrived on the wire, and refuses recipients as told by [`Rule`]s (`451` for the first
//! attempts, or `550` always). Like many production MTAs it also ends DATA on a bare-LF `.` line, so a client that
//! lets a lone-dot line through unencoded is caught: the message is cut short and the rest arrives as commands,
//! which [`SmtpServer::unexpected_commands`] reports.
//!
//! For delivery guarantees it can also drop the connection after receiving a message's data without replying
//! ([`Stage::DropAfterData`]), delay the reply to the data ([`SmtpServer::delay_data_replies`],
//! [`SmtpServer::delay_data_reply_to`]), close the sessions that sit idle between messages
//! ([`SmtpServer::close_idle_sessions`]), and keeps a log of every DATA transaction
//! ([`SmtpServer::transactions`]): how much data arrived, whether it was complete, and whether the final reply was
//! written.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The largest message accepted; a larger one is answered with 552 and not recorded.
const MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// The name the server greets with.
const HOSTNAME: &str = "smtp.leadflow.test";

/// One message the server accepted (250 after DATA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The reverse path of `MAIL FROM:<...>`.
    pub mail_from: String,
    /// Every accepted `RCPT TO:<...>` path.
    pub rcpt_to: Vec<String>,
    /// The message as received after dot-unstuffing, line endings as sent (CRLF).
    pub data: String,
}

/// When a rule answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The reply to `RCPT TO` (greylisting, unknown user).
    Rcpt,
    /// The reply after the message data (content refused, queue full).
    Data,
    /// No reply at all: after reading the whole message the server closes the connection (code and text unused).
    DropAfterData,
}

/// A scripted failure for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The reply code, e.g. 451 or 550.
    pub code: u16,
    /// The reply text, e.g. `4.7.1 greylisted, try again later`.
    pub text: String,
    /// How many attempts fail before the recipient is accepted; `None`: every attempt fails.
    pub times: Option<u32>,
    /// Which reply carries the failure.
    pub stage: Stage,
}

impl Rule {
    /// The first `times` attempts fail with `code text`, later ones are accepted (at `RCPT TO`).
    pub fn fail_first(times: u32, code: u16, text: &str) -> Self {
        Self {
            code,
            text: text.to_string(),
            times: Some(times),
            stage: Stage::Rcpt,
        }
    }

    /// Every attempt fails with `code text` (at `RCPT TO`).
    pub fn always(code: u16, text: &str) -> Self {
        Self {
            code,
            text: text.to_string(),
            times: None,
            stage: Stage::Rcpt,
        }
    }

    /// Every attempt's data is read in full, then the connection is closed without a reply.
    pub fn drop_after_data() -> Self {
        Self::always(0, "").at(Stage::DropAfterData)
    }

    /// Answers with the failure at `stage` instead.
    pub fn at(mut self, stage: Stage) -> Self {
        self.stage = stage;
        self
    }
}

/// One DATA transaction as the server saw it (from its `354` on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// The connection it ran on (1 for the first connection accepted).
    pub connection: usize,
    /// The accepted recipients.
    pub rcpt_to: Vec<String>,
    /// The `X-Leadflow-Delivery` header of the data received, complete or not.
    pub delivery_id: Option<i64>,
    /// Bytes of message data received after the `354` (before the terminating dot).
    pub data_bytes: usize,
    /// The terminating `.` line arrived: the whole message was received.
    pub data_complete: bool,
    /// The final reply the server chose (`None`: the data was cut short, or the connection was dropped).
    pub reply: Option<String>,
    /// The final reply was written to the socket without an error (the client may still never have read it).
    pub reply_written: bool,
    /// When the data was complete.
    pub completed_at: Option<Instant>,
}

impl Transaction {
    /// Some data of the message reached the server: the client had started sending it.
    pub fn data_started(&self) -> bool {
        self.data_bytes > 0 || self.data_complete
    }

    /// The server accepted the message (its 2xx reply was written).
    pub fn accepted(&self) -> bool {
        self.reply_written && self.reply.as_deref().is_some_and(|r| r.starts_with('2'))
    }
}

#[derive(Debug, Default)]
struct State {
    messages: Vec<Captured>,
    transactions: Vec<Transaction>,
    /// Every final DATA reply waits between these two (a deterministic spread), unless the recipient has its own.
    data_delay: Option<(Duration, Duration)>,
    /// Keyed by the lower-cased recipient.
    rcpt_delays: HashMap<String, Duration>,
    delays_served: u64,
    /// Keyed by the lower-cased recipient.
    rules: HashMap<String, Rule>,
    /// Failures already served per recipient.
    failures: HashMap<String, u32>,
    /// Transactions naming each recipient (RCPT TO commands), accepted or not.
    attempts: HashMap<String, u32>,
    /// Lines the server did not understand as commands.
    unexpected: Vec<String>,
    connections: usize,
}

impl State {
    /// The failure to answer for `rcpt` at `stage`, counting it as served.
    fn verdict(&mut self, rcpt: &str, stage: Stage) -> Option<(u16, String)> {
        let key = rcpt.to_lowercase();
        let rule = self.rules.get(&key).filter(|r| r.stage == stage)?.clone();
        let served = self.failures.entry(key).or_default();
        match rule.times {
            Some(limit) if *served >= limit => None,
            _ => {
                *served += 1;
                Some((rule.code, rule.text))
            }
        }
    }
}

/// A running capturing SMTP server on 127.0.0.1; stops when dropped.
pub struct SmtpServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
    /// Bumped to close the sessions waiting for a command; each session watches it from its start.
    idle_close: Arc<tokio::sync::watch::Sender<u64>>,
}

impl SmtpServer {
    /// Binds 127.0.0.1 on a free port and starts accepting connections.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("the test SMTP server cannot bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the test SMTP server has no local address: {e}"));
        let state = Arc::new(Mutex::new(State::default()));
        let stop = CancellationToken::new();
        let idle_close = Arc::new(tokio::sync::watch::Sender::new(0u64));
        tokio::spawn(accept_loop(listener, state.clone(), stop.clone(), idle_close.clone()));
        Self {
            addr,
            state,
            stop,
            idle_close,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `smtp://127.0.0.1:PORT`, the value for `LEADFLOW_SMTP_URL`.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// Every message accepted so far, in arrival order.
    pub fn messages(&self) -> Vec<Captured> {
        self.lock().messages.clone()
    }

    /// The accepted messages that name `rcpt` as a recipient.
    pub fn messages_to(&self, rcpt: &str) -> Vec<Captured> {
        let rcpt = rcpt.to_lowercase();
        self.lock()
            .messages
            .iter()
            .filter(|m| m.rcpt_to.iter().any(|r| r.to_lowercase() == rcpt))
            .cloned()
            .collect()
    }

    /// Scripts the replies for `rcpt`; replaces an earlier rule for the same recipient.
    pub fn set_rule(&self, rcpt: &str, rule: Rule) {
        let key = rcpt.to_lowercase();
        let mut state = self.lock();
        state.failures.remove(&key);
        state.rules.insert(key, rule);
    }

    /// Removes the rule for `rcpt`: every later attempt is accepted.
    pub fn clear_rule(&self, rcpt: &str) {
        self.lock().rules.remove(&rcpt.to_lowercase());
    }

    /// How many transactions named `rcpt` (`RCPT TO` commands), accepted or refused.
    pub fn attempts(&self, rcpt: &str) -> u32 {
        self.lock().attempts.get(&rcpt.to_lowercase()).copied().unwrap_or(0)
    }

    /// Lines received where a command was expected that are not SMTP commands (a message cut short shows here).
    pub fn unexpected_commands(&self) -> Vec<String> {
        self.lock().unexpected.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.lock().connections
    }

    /// Every DATA transaction so far, in the order their `354` was sent.
    pub fn transactions(&self) -> Vec<Transaction> {
        self.lock().transactions.clone()
    }

    /// Delays every final reply to message data by between `min` and `max` (spread deterministically).
    pub fn delay_data_replies(&self, min: Duration, max: Duration) {
        self.lock().data_delay = Some((min, max.max(min)));
    }

    /// Delays the final reply to the data of messages to `rcpt` by `delay`.
    pub fn delay_data_reply_to(&self, rcpt: &str, delay: Duration) {
        self.lock().rcpt_delays.insert(rcpt.to_lowercase(), delay);
    }

    /// Closes every session that is waiting for its next command (kept-open client connections go stale).
    /// A session busy with a transaction closes when it next waits for a command.
    pub fn close_idle_sessions(&self) {
        self.idle_close.send_modify(|generation| *generation += 1);
    }

    /// Waits until at least `n` messages arrived and returns all of them; panics listing what arrived on timeout.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Captured> {
        self.wait_for_matching(n, timeout, "in total", |_| true).await
    }

    /// Waits until at least `n` messages to `rcpt` arrived and returns those; panics on timeout.
    pub async fn wait_for_to(&self, rcpt: &str, n: usize, timeout: Duration) -> Vec<Captured> {
        let wanted = rcpt.to_lowercase();
        let what = format!("to {rcpt}");
        self.wait_for_matching(n, timeout, &what, |m| {
            m.rcpt_to.iter().any(|r| r.to_lowercase() == wanted)
        })
        .await
    }

    async fn wait_for_matching(
        &self,
        n: usize,
        timeout: Duration,
        what: &str,
        filter: impl Fn(&Captured) -> bool,
    ) -> Vec<Captured> {
        let deadline = Instant::now() + timeout;
        loop {
            let matching: Vec<Captured> = self.messages().into_iter().filter(|m| filter(m)).collect();
            if matching.len() >= n {
                return matching;
            }
            if Instant::now() >= deadline {
                panic!(
                    "expected {n} message(s) {what} within {timeout:?}, {} arrived; everything the SMTP server \
                     accepted:\n{}\nunexpected command lines: {:?}",
                    matching.len(),
                    self.summary(),
                    self.unexpected_commands()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One line per accepted message: envelope, subject and delivery id.
    pub fn summary(&self) -> String {
        let messages = self.messages();
        if messages.is_empty() {
            return "  (nothing)".into();
        }
        messages
            .iter()
            .enumerate()
            .map(|(i, m)| format!("  #{i}: {m}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl fmt::Debug for SmtpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpServer").field("addr", &self.addr).finish()
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
    idle_close: Arc<tokio::sync::watch::Sender<u64>>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let connection = {
                    let mut s = lock(&state);
                    s.connections += 1;
                    s.connections
                };
                let _ = stream.set_nodelay(true);
                let idle = idle_close.subscribe();
                tokio::spawn(session(stream, connection, state.clone(), stop.clone(), idle));
            }
            // Out of file descriptors and the like: pause instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// One SMTP session; ends on QUIT, on disconnect or when the server stops.
async fn session(
    stream: TcpStream,
    connection: usize,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
    mut idle: tokio::sync::watch::Receiver<u64>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    if write
        .write_all(format!("220 {HOSTNAME} ESMTP ready\r\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut mail_from: Option<String> = None;
    let mut rcpt_to: Vec<String> = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            _ = idle.changed() => return,
            read = reader.read_until(b'\n', &mut buf) => read,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
        let verb = line.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        let reply = match verb.as_str() {
            "EHLO" => {
                format!(
                    "250-{HOSTNAME} greets {}\r\n250-8BITMIME\r\n250 SIZE {MAX_MESSAGE_BYTES}\r\n",
                    argument(&line)
                )
            }
            "HELO" => format!("250 {HOSTNAME}\r\n"),
            "MAIL" => match path_after(&line, "MAIL FROM:") {
                Some(path) => {
                    mail_from = Some(path);
                    rcpt_to.clear();
                    "250 2.1.0 sender ok\r\n".to_string()
                }
                None => "501 5.5.4 syntax: MAIL FROM:<address>\r\n".to_string(),
            },
            "RCPT" => match (&mail_from, path_after(&line, "RCPT TO:")) {
                (None, _) => "503 5.5.1 MAIL first\r\n".to_string(),
                (_, None) => "501 5.5.4 syntax: RCPT TO:<address>\r\n".to_string(),
                (Some(_), Some(path)) => {
                    let mut s = lock(&state);
                    *s.attempts.entry(path.to_lowercase()).or_default() += 1;
                    match s.verdict(&path, Stage::Rcpt) {
                        Some((code, text)) => format!("{code} {text}\r\n"),
                        None => {
                            rcpt_to.push(path);
                            "250 2.1.5 recipient ok\r\n".to_string()
                        }
                    }
                }
            },
            "DATA" => {
                if mail_from.is_none() || rcpt_to.is_empty() {
                    "503 5.5.1 RCPT first\r\n".to_string()
                } else {
                    if write
                        .write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let index = {
                        let mut s = lock(&state);
                        s.transactions.push(Transaction {
                            connection,
                            rcpt_to: rcpt_to.clone(),
                            delivery_id: None,
                            data_bytes: 0,
                            data_complete: false,
                            reply: None,
                            reply_written: false,
                            completed_at: None,
                        });
                        s.transactions.len() - 1
                    };
                    let data = tokio::select! {
                        _ = stop.cancelled() => return,
                        data = read_data(&mut reader) => data,
                    };
                    {
                        let mut s = lock(&state);
                        let t = &mut s.transactions[index];
                        t.data_bytes = data.raw_bytes;
                        t.data_complete = data.complete;
                        t.delivery_id = delivery_id_of(&data.data);
                        if data.complete {
                            t.completed_at = Some(Instant::now());
                        }
                    }
                    if !data.complete {
                        return;
                    }
                    let rcpts = std::mem::take(&mut rcpt_to);
                    let delay = {
                        let mut s = lock(&state);
                        let own = rcpts.iter().find_map(|r| s.rcpt_delays.get(&r.to_lowercase()).copied());
                        match (own, s.data_delay) {
                            (Some(delay), _) => Some(delay),
                            (None, Some((min, max))) => {
                                s.delays_served += 1;
                                let span = (max - min).as_millis() as u64;
                                let spread = if span == 0 {
                                    0
                                } else {
                                    s.delays_served * 7919 % (span + 1)
                                };
                                Some(min + Duration::from_millis(spread))
                            }
                            (None, None) => None,
                        }
                    };
                    if let Some(delay) = delay {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    let dropped = {
                        let mut s = lock(&state);
                        rcpts.iter().any(|r| s.verdict(r, Stage::DropAfterData).is_some())
                    };
                    if dropped {
                        // Read in full, never answered: the client cannot know whether it was accepted.
                        return;
                    }
                    let data = if data.oversize {
                        Err(data.raw_bytes)
                    } else {
                        Ok(data.data)
                    };
                    let reply = finish_transaction(&state, mail_from.take(), rcpts, data);
                    lock(&state).transactions[index].reply = Some(reply.trim_end().to_string());
                    let written = write.write_all(reply.as_bytes()).await.is_ok();
                    lock(&state).transactions[index].reply_written = written;
                    if !written {
                        return;
                    }
                    continue;
                }
            }
            "RSET" => {
                mail_from = None;
                rcpt_to.clear();
                "250 2.0.0 reset\r\n".to_string()
            }
            "NOOP" => "250 2.0.0 ok\r\n".to_string(),
            "VRFY" => "252 2.1.5 cannot verify, will accept\r\n".to_string(),
            "QUIT" => {
                let _ = write.write_all(b"221 2.0.0 bye\r\n").await;
                let _ = write.shutdown().await;
                return;
            }
            _ => {
                lock(&state).unexpected.push(line.clone());
                "500 5.5.2 command not recognised\r\n".to_string()
            }
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Records the message unless a rule refuses it at the DATA stage; returns the reply.
fn finish_transaction(
    state: &Mutex<State>,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    data: Result<Vec<u8>, usize>,
) -> String {
    let data = match data {
        Ok(data) => data,
        Err(size) => return format!("552 5.3.4 message of {size} bytes exceeds the limit\r\n"),
    };
    let mut s = lock(state);
    for rcpt in &rcpt_to {
        if let Some((code, text)) = s.verdict(rcpt, Stage::Data) {
            return format!("{code} {text}\r\n");
        }
    }
    s.messages.push(Captured {
        mail_from: mail_from.unwrap_or_default(),
        rcpt_to,
        data: String::from_utf8_lossy(&data).into_owned(),
    });
    format!("250 2.0.0 queued as {}\r\n", s.messages.len())
}

/// Message data as read: dot-unstuffed (up to the size limit), with the raw byte count.
struct DataRead {
    data: Vec<u8>,
    raw_bytes: usize,
    /// The terminating `.` line arrived.
    complete: bool,
    oversize: bool,
}

/// The `X-Leadflow-Delivery` header of (possibly partial) message data.
fn delivery_id_of(data: &[u8]) -> Option<i64> {
    let text = String::from_utf8_lossy(data);
    let (headers, _) = split_entity(&text);
    find_header(&headers, "X-Leadflow-Delivery")?.trim().parse().ok()
}

/// Reads message data up to the `.` line, dot-unstuffed; stops early (not complete) when the client goes away.
async fn read_data<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> DataRead {
    let mut data = Vec::new();
    let mut size = 0usize;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => {
                return DataRead {
                    data,
                    raw_bytes: size + line.len(),
                    complete: false,
                    oversize: false,
                }
            }
            Ok(_) => {}
        }
        // The end of data: a line holding one dot (CRLF, or a bare LF as lenient MTAs accept).
        if line == b".\r\n" || line == b".\n" {
            break;
        }
        size += line.len();
        if size > MAX_MESSAGE_BYTES {
            continue;
        }
        let content = match line.first() {
            Some(b'.') => &line[1..],
            _ => &line[..],
        };
        data.extend_from_slice(content);
    }
    // The CRLF before the final dot belongs to the terminator, not to the message.
    if data.ends_with(b"\r\n") {
        data.truncate(data.len() - 2);
    } else if data.ends_with(b"\n") {
        data.truncate(data.len() - 1);
    }
    DataRead {
        data,
        raw_bytes: size,
        complete: true,
        oversize: size > MAX_MESSAGE_BYTES,
    }
}

/// What follows the command verb (the EHLO domain).
fn argument(line: &str) -> &str {
    line.split_once(char::is_whitespace)
        .map(|(_, rest)| rest.trim())
        .unwrap_or("")
}

/// The `<path>` after `prefix` (case-insensitive), ignoring ESMTP parameters after it.
fn path_after(line: &str, prefix: &str) -> Option<String> {
    let head = line.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = line[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some(rest[..end].to_string())
}

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "from <{}> to {:?}, subject {:?}, X-Leadflow-Delivery {:?}, {} bytes",
            self.mail_from,
            self.rcpt_to,
            self.subject().unwrap_or_default(),
            self.header("X-Leadflow-Delivery").unwrap_or_default(),
            self.data.len()
        )
    }
}

/// One leaf part of a MIME message, its body decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The lower-cased media type, e.g. `text/plain`.
    pub media_type: String,
    /// The `charset` parameter, if any.
    pub charset: Option<String>,
    /// The lower-cased Content-Transfer-Encoding (`7bit` when absent).
    pub transfer_encoding: String,
    /// The body after transfer decoding, as UTF-8 with `\n` line endings.
    pub body: String,
}

impl Captured {
    /// The unfolded value of the first top-level header called `name` (case-insensitive), as on the wire.
    pub fn header(&self, name: &str) -> Option<String> {
        let (headers, _) = split_entity(&self.data);
        find_header(&headers, name).map(str::to_string)
    }

    /// Every top-level header, unfolded, in order.
    pub fn headers(&self) -> Vec<(String, String)> {
        split_entity(&self.data).0
    }

    /// The Subject with RFC 2047 encoded words decoded.
    pub fn subject(&self) -> Option<String> {
        self.header("Subject").map(|s| decode_encoded_words(&s))
    }

    /// The id in the `X-Leadflow-Delivery` header.
    pub fn delivery_id(&self) -> Option<i64> {
        self.header("X-Leadflow-Delivery")?.trim().parse().ok()
    }

    /// The top-level media type, lower-cased (`multipart/alternative`).
    pub fn media_type(&self) -> Option<String> {
        let (headers, _) = split_entity(&self.data);
        find_header(&headers, "Content-Type").map(|v| media_type(v).0)
    }

    /// Every leaf part (multiparts flattened, depth first), bodies decoded.
    pub fn parts(&self) -> Vec<Part> {
        let mut out = Vec::new();
        collect_parts(&self.data, &mut out, 0);
        out
    }

    /// The decoded text/plain part.
    pub fn text_body(&self) -> Option<String> {
        self.part("text/plain")
    }

    /// The decoded text/html part.
    pub fn html_body(&self) -> Option<String> {
        self.part("text/html")
    }

    fn part(&self, wanted: &str) -> Option<String> {
        self.parts()
            .into_iter()
            .find(|p| p.media_type == wanted)
            .map(|p| p.body)
    }
}

/// Splits an entity into unfolded headers and the body after the first empty line.
fn split_entity(raw: &str) -> (Vec<(String, String)>, &str) {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut offset = 0;
    let mut body_start = raw.len();
    for line in raw.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let content = line.trim_end_matches(['\r', '\n']);
        if content.is_empty() {
            body_start = offset;
            break;
        }
        if content.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                value.push(' ');
                value.push_str(content.trim());
            }
            continue;
        }
        match content.split_once(':') {
            Some((name, value)) => headers.push((name.trim().to_string(), value.trim().to_string())),
            // Not a header: the entity has no header block (a bare body).
            None if headers.is_empty() => {
                body_start = start;
                break;
            }
            None => {}
        }
    }
    (headers, &raw[body_start.min(raw.len())..])
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The lower-cased media type and the parameters of a Content-Type value.
fn media_type(value: &str) -> (String, Vec<(String, String)>) {
    let mut pieces = value.split(';');
    let kind = pieces.next().unwrap_or("").trim().to_ascii_lowercase();
    let params = pieces
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().trim_matches('"').to_string()))
        })
        .collect();
    (kind, params)
}

fn collect_parts(raw: &str, out: &mut Vec<Part>, depth: usize) {
    let (headers, body) = split_entity(raw);
    let (kind, params) = media_type(find_header(&headers, "Content-Type").unwrap_or("text/plain"));
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if kind.starts_with("multipart/") && depth < 8 {
        if let Some(boundary) = param("boundary") {
            for part in split_multipart(body, &boundary) {
                collect_parts(&part, out, depth + 1);
            }
            return;
        }
    }
    let transfer_encoding = find_header(&headers, "Content-Transfer-Encoding")
        .unwrap_or("7bit")
        .trim()
        .to_ascii_lowercase();
    let bytes = match transfer_encoding.as_str() {
        "quoted-printable" => decode_quoted_printable(body),
        "base64" => decode_base64(body),
        _ => body.as_bytes().to_vec(),
    };
    out.push(Part {
        media_type: kind,
        charset: param("charset"),
        transfer_encoding,
        body: String::from_utf8_lossy(&bytes).replace("\r\n", "\n"),
    });
}

/// The body parts between `--boundary` lines, up to `--boundary--`.
fn split_multipart(body: &str, boundary: &str) -> Vec<String> {
    let open = format!("--{boundary}");
    let close = format!("--{boundary}--");
    let mut parts = Vec::new();
    let mut current: Option<String> = None;
    for line in body.split_inclusive('\n') {
        let content = line.trim_end();
        if content == close || content == open {
            if let Some(mut part) = current.take() {
                // The line break before a delimiter belongs to the delimiter.
                if part.ends_with("\r\n") {
                    part.truncate(part.len() - 2);
                } else if part.ends_with('\n') {
                    part.truncate(part.len() - 1);
                }
                parts.push(part);
            }
            if content == close {
                break;
            }
            current = Some(String::new());
            continue;
        }
        if let Some(part) = current.as_mut() {
            part.push_str(line);
        }
    }
    parts
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Decodes quoted-printable (RFC 2045 section 6.7): `=XX` escapes and `=` soft line breaks.
pub fn decode_quoted_printable(input: &str) -> Vec<u8> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'=' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let rest = &bytes[i + 1..];
        if rest.starts_with(b"\r\n") {
            i += 3;
        } else if rest.starts_with(b"\n") {
            i += 2;
        } else if let (Some(hi), Some(lo)) = (
            rest.first().copied().and_then(hex_value),
            rest.get(1).copied().and_then(hex_value),
        ) {
            out.push(hi * 16 + lo);
            i += 3;
        } else {
            // Not a valid escape: keep it as it is, as robust decoders do.
            out.push(b'=');
            i += 1;
        }
    }
    out
}

/// Decodes base64 (standard alphabet), skipping line breaks and stopping at padding.
pub fn decode_base64(input: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in input.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Decodes RFC 2047 encoded words (`=?utf-8?Q?...?=`, `=?utf-8?B?...?=`) in a header value.
pub fn decode_encoded_words(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    let mut last_was_word = false;
    while let Some(start) = rest.find("=?") {
        let (before, candidate) = rest.split_at(start);
        match parse_encoded_word(candidate) {
            Some((decoded, used)) => {
                // Whitespace between two encoded words is not part of the text.
                if !(last_was_word && before.trim().is_empty()) {
                    out.push_str(before);
                }
                out.push_str(&decoded);
                rest = &candidate[used..];
                last_was_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = &candidate[2..];
                last_was_word = false;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Parses one encoded word at the start of `s`; returns the text and the bytes consumed.
fn parse_encoded_word(s: &str) -> Option<(String, usize)> {
    let inner = s.strip_prefix("=?")?;
    let (_charset, inner) = inner.split_once('?')?;
    let (encoding, inner) = inner.split_once('?')?;
    let end = inner.find("?=")?;
    let text = &inner[..end];
    let used = s.len() - inner.len() + end + 2;
    let bytes = match encoding {
        "Q" | "q" => decode_quoted_printable(&text.replace('_', " ")),
        "B" | "b" => decode_base64(text),
        _ => return None,
    };
    Some((String::from_utf8_lossy(&bytes).into_owned(), used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn expect(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>, code: &str) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).await.expect("read a reply");
            assert!(n > 0, "connection closed while waiting for {code}");
            all.push_str(&line);
            // The last line of a multi-line reply has a space after the code.
            if line.len() >= 4 && &line[3..4] == " " {
                break;
            }
        }
        assert!(all.starts_with(code), "expected {code}, got {all:?}");
        all
    }

    async fn conversation(server: &SmtpServer, rcpt: &str, body: &str) -> String {
        let stream = TcpStream::connect(server.addr()).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        expect(&mut reader, "220").await;
        write.write_all(b"EHLO client.test\r\n").await.expect("write");
        expect(&mut reader, "250").await;
        write
            .write_all(b"MAIL FROM:<from@shop.test> BODY=8BITMIME\r\n")
            .await
            .expect("write");
        expect(&mut reader, "250").await;
        write
            .write_all(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
            .await
            .expect("write");
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("read");
        if !line.starts_with("250") {
            write.write_all(b"QUIT\r\n").await.expect("write");
            return line;
        }
        write.write_all(b"DATA\r\n").await.expect("write");
        expect(&mut reader, "354").await;
        write.write_all(body.as_bytes()).await.expect("write");
        write.write_all(b"\r\n.\r\n").await.expect("write");
        let mut reply = String::new();
        reader.read_line(&mut reply).await.expect("read");
        write.write_all(b"QUIT\r\n").await.expect("write");
        // Skip replies to whatever the server read as commands after the data.
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).await.expect("read");
            if n == 0 || line.starts_with("221") {
                break;
            }
        }
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest).await;
        reply
    }

    #[tokio::test]
    async fn a_message_is_captured_with_dots_unstuffed() {
        let server = SmtpServer::start().await;
        let reply = conversation(
            &server,
            "ann@example.com",
            "Subject: hi\r\n\r\nline\r\n..\r\n..x\r\nend",
        )
        .await;
        assert!(reply.starts_with("250"), "{reply}");
        let messages = server.wait_for(1, Duration::from_secs(5)).await;
        assert_eq!(messages[0].mail_from, "from@shop.test");
        assert_eq!(messages[0].rcpt_to, vec!["ann@example.com".to_string()]);
        assert_eq!(messages[0].data, "Subject: hi\r\n\r\nline\r\n.\r\n.x\r\nend");
        assert_eq!(messages[0].subject().as_deref(), Some("hi"));
        assert!(server.unexpected_commands().is_empty());
    }

    #[tokio::test]
    async fn rules_fail_the_first_attempts_or_every_attempt() {
        let server = SmtpServer::start().await;
        server.set_rule("grey@example.com", Rule::fail_first(1, 451, "4.7.1 try later"));
        server.set_rule("gone@example.com", Rule::always(550, "5.1.1 user unknown"));
        assert!(conversation(&server, "grey@example.com", "x")
            .await
            .starts_with("451 4.7.1"));
        assert!(conversation(&server, "grey@example.com", "x").await.starts_with("250"));
        assert!(conversation(&server, "gone@example.com", "x").await.starts_with("550"));
        assert!(conversation(&server, "gone@example.com", "x").await.starts_with("550"));
        server.set_rule(
            "late@example.com",
            Rule::fail_first(1, 452, "4.3.1 full").at(Stage::Data),
        );
        assert!(conversation(&server, "late@example.com", "x").await.starts_with("452"));
        assert!(conversation(&server, "late@example.com", "x").await.starts_with("250"));
        assert_eq!(server.attempts("grey@example.com"), 2);
        assert_eq!(server.messages_to("grey@example.com").len(), 1);
        assert_eq!(server.messages_to("gone@example.com").len(), 0);
        assert_eq!(server.messages_to("late@example.com").len(), 1);
    }

    #[tokio::test]
    async fn a_bare_lf_dot_line_ends_the_data_early() {
        let server = SmtpServer::start().await;
        let reply = conversation(&server, "ann@example.com", "Subject: x\r\n\r\nbefore\n.\ntail after").await;
        // The cut-short message was accepted; the tail arrived as commands.
        assert!(reply.starts_with("250"), "{reply}");
        let messages = server.wait_for(1, Duration::from_secs(5)).await;
        assert!(!messages[0].data.contains("after"));
        assert_eq!(
            server.unexpected_commands(),
            vec!["tail after".to_string(), ".".to_string()]
        );
    }

    #[tokio::test]
    async fn transactions_record_how_far_the_data_got_and_a_dropped_one_gets_no_reply() {
        let server = SmtpServer::start().await;
        server.set_rule("drop@example.com", Rule::drop_after_data());
        server.delay_data_reply_to("slow@example.com", Duration::from_millis(10));
        assert!(
            conversation(&server, "slow@example.com", "X-Leadflow-Delivery: 7\r\n\r\nhi")
                .await
                .starts_with("250")
        );
        // The dropped one: the data is read in full, then the connection closes without a reply.
        let stream = TcpStream::connect(server.addr()).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        expect(&mut reader, "220").await;
        for (command, code) in [
            ("EHLO c\r\n", "250"),
            ("MAIL FROM:<a@shop.test>\r\n", "250"),
            ("RCPT TO:<drop@example.com>\r\n", "250"),
            ("DATA\r\n", "354"),
        ] {
            write.write_all(command.as_bytes()).await.expect("write");
            expect(&mut reader, code).await;
        }
        write
            .write_all(b"X-Leadflow-Delivery: 8\r\n\r\nbody\r\n.\r\n")
            .await
            .expect("write");
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest).await;
        assert!(
            rest.is_empty(),
            "no reply expected: {:?}",
            String::from_utf8_lossy(&rest)
        );

        let transactions = server.transactions();
        assert_eq!(transactions.len(), 2, "{transactions:#?}");
        assert_eq!(transactions[0].delivery_id, Some(7));
        assert!(transactions[0].accepted() && transactions[0].data_complete);
        assert_eq!(transactions[1].delivery_id, Some(8));
        assert!(transactions[1].data_complete && transactions[1].data_started());
        assert_eq!(transactions[1].reply, None);
        assert!(!transactions[1].accepted());
        assert_eq!(server.messages().len(), 1);
    }

    #[tokio::test]
    async fn idle_sessions_can_be_closed() {
        let server = SmtpServer::start().await;
        let stream = TcpStream::connect(server.addr()).await.expect("connect");
        let (read, _write) = stream.into_split();
        let mut reader = BufReader::new(read);
        expect(&mut reader, "220").await;
        server.close_idle_sessions();
        let mut rest = Vec::new();
        let n = reader.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0, "the session closed without another word");
    }

    #[test]
    fn quoted_printable_decodes_escapes_and_soft_breaks() {
        let decoded = decode_quoted_printable("Sch=C3=B6ne Gr=C3=BC=\r\n=C3=9Fe =3D ok=\nyes\r\n.\r\n=zz");
        assert_eq!(String::from_utf8(decoded).unwrap(), "Schöne Grüße = okyes\r\n.\r\n=zz");
    }

    #[test]
    fn base64_and_encoded_words_decode() {
        assert_eq!(decode_base64("SGFs\r\nbG8="), b"Hallo");
        assert_eq!(
            decode_encoded_words("=?utf-8?b?ZsO8cg==?= =?utf-8?Q?_Sie?=, Ann"),
            "für Sie, Ann"
        );
        assert_eq!(decode_encoded_words("plain =? text"), "plain =? text");
    }

    #[test]
    fn multipart_alternative_parts_are_decoded() {
        let data = "From: a@shop.test\r\nSubject: =?utf-8?Q?Gr=C3=BC=C3=9Fe?=\r\nX-Leadflow-Delivery: 42\r\n\
                    Content-Type: multipart/alternative;\r\n boundary=\"b1\"\r\n\r\n--b1\r\n\
                    Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
                    Hallo=20Ann,\r\n.\r\nGr=C3=BC=C3=9Fe\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\n\
                    Content-Transfer-Encoding: base64\r\n\r\nPHA+SGk8L3A+\r\n--b1--\r\n";
        let message = Captured {
            mail_from: "a@shop.test".into(),
            rcpt_to: vec!["ann@example.com".into()],
            data: data.into(),
        };
        assert_eq!(message.media_type().as_deref(), Some("multipart/alternative"));
        assert_eq!(message.subject().as_deref(), Some("Grüße"));
        assert_eq!(message.delivery_id(), Some(42));
        assert_eq!(message.text_body().as_deref(), Some("Hallo Ann,\n.\nGrüße"));
        assert_eq!(message.html_body().as_deref(), Some("<p>Hi</p>"));
        assert_eq!(message.parts()[0].charset.as_deref(), Some("utf-8"));
    }
}
