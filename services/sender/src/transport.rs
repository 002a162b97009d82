//! Where email goes, chosen at start-up from `LEADFLOW_SMTP_URL`: an SMTP relay through lettre's pool, or a
//! folder of `.eml` files (a local outbox). Failures are classified as transient (try again later) or permanent.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use lettre::message::header::Header as _;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::io::AsyncWriteExt;

use leadflow_shared::config::{Config, SmtpTarget};

use crate::message::{DeliveryHeader, DELIVERY_HEADER};

/// Why a message was not sent, split by what the caller does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Try again later: a 4xx reply, a connection, TLS or I/O problem, a timeout.
    #[error("{0}")]
    Transient(String),
    /// Never try again: a 5xx reply (with its code and text), or a message that cannot be sent.
    #[error("{0}")]
    Permanent(String),
}

impl SendError {
    /// Classifies a lettre SMTP error: a 5xx reply is permanent, everything else transient.
    pub fn from_smtp(error: &lettre::transport::smtp::Error) -> Self {
        // Display gives "permanent error (550): <server text>" / "transient error (451): ..." / "network error: ...".
        let text = one_line(&error.to_string());
        if error.is_permanent() {
            Self::Permanent(text)
        } else if error.is_timeout() {
            Self::Transient(format!("timed out: {text}"))
        } else {
            Self::Transient(text)
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The configured destination of every email.
pub enum Transport {
    /// An SMTP relay, connections pooled.
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
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
                    Tls::Wrapper(TlsParameters::new(host.clone()).context("LEADFLOW_SMTP_URL: failed to set up TLS")?)
                } else {
                    match TlsParameters::new(host.clone()) {
                        // smtp://: STARTTLS when the relay offers it, plain otherwise.
                        Ok(params) => Tls::Opportunistic(params),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot set up TLS for the SMTP relay; sending without it");
                            Tls::None
                        }
                    }
                };
                let pool = PoolConfig::new().max_size(u32::try_from(config.sender.concurrency).unwrap_or(u32::MAX));
                let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.as_str())
                    .port(*port)
                    .tls(tls)
                    .timeout(Some(config.smtp.timeout))
                    .pool_config(pool);
                if let Some(user) = user {
                    builder = builder.credentials(Credentials::new(user.clone(), password.clone().unwrap_or_default()));
                }
                tracing::info!(host = %host, port, implicit_tls, "sending through an SMTP relay");
                Ok(Self::Smtp(builder.build()))
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

    /// Sends one message. `Ok` means the relay accepted it (or the file is in place).
    pub async fn send(&self, message: &Message) -> Result<(), SendError> {
        match self {
            Self::Smtp(smtp) => smtp
                .send(message.clone())
                .await
                .map(|_| ())
                .map_err(|e| SendError::from_smtp(&e)),
            Self::Outbox(dir) => write_to_outbox(dir, message)
                .await
                .map(|_| ())
                .map_err(|e| SendError::Transient(format!("outbox: {e:#}"))),
        }
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
        transport.send(&message(5)).await.unwrap();
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

    #[tokio::test]
    async fn an_unreachable_relay_is_a_transient_failure() {
        // A port nothing listens on: the connection is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut config = leadflow_shared::config::Config::load(&Default::default()).unwrap();
        config.smtp.target = leadflow_shared::config::parse_smtp_url(&format!("smtp://127.0.0.1:{port}")).unwrap();
        config.smtp.timeout = std::time::Duration::from_secs(5);
        let transport = Transport::from_config(&config).await.unwrap();
        match transport.send(&message(1)).await {
            Err(SendError::Transient(reason)) => assert!(!reason.is_empty()),
            other => panic!("expected a transient failure, got {other:?}"),
        }
    }

    /// A one-shot SMTP server answering each command from `replies` in turn (after its greeting).
    async fn scripted_server(replies: Vec<&'static str>) -> u16 {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (read, mut write) = socket.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"220 test ESMTP\r\n").await.unwrap();
            let mut replies = replies.into_iter();
            let mut in_data = false;
            while let Ok(Some(line)) = lines.next_line().await {
                if in_data {
                    if line == "." {
                        in_data = false;
                    } else {
                        continue;
                    }
                } else if line.eq_ignore_ascii_case("DATA") {
                    in_data = true;
                    write.write_all(b"354 go ahead\r\n").await.unwrap();
                    continue;
                }
                let reply = if line.to_ascii_uppercase().starts_with("EHLO") {
                    "250 test"
                } else if line.eq_ignore_ascii_case("QUIT") {
                    "221 bye"
                } else {
                    replies.next().unwrap_or("250 ok")
                };
                write.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
            }
        });
        port
    }

    async fn send_to(port: u16) -> Result<(), SendError> {
        let mut config = leadflow_shared::config::Config::load(&Default::default()).unwrap();
        config.smtp.target = leadflow_shared::config::parse_smtp_url(&format!("smtp://127.0.0.1:{port}")).unwrap();
        config.smtp.timeout = std::time::Duration::from_secs(5);
        Transport::from_config(&config).await.unwrap().send(&message(9)).await
    }

    #[tokio::test]
    async fn smtp_replies_are_classified_by_their_code() {
        // MAIL FROM, RCPT TO, end of data.
        let port = scripted_server(vec!["250 ok", "550 5.1.1 no such user", "250 ok"]).await;
        match send_to(port).await {
            Err(SendError::Permanent(reason)) => {
                assert!(reason.contains("550"), "{reason}");
                assert!(reason.contains("no such user"), "{reason}");
            }
            other => panic!("expected a permanent failure, got {other:?}"),
        }
        let port = scripted_server(vec!["250 ok", "451 4.3.0 try later", "250 ok"]).await;
        match send_to(port).await {
            Err(SendError::Transient(reason)) => assert!(reason.contains("451"), "{reason}"),
            other => panic!("expected a transient failure, got {other:?}"),
        }
        let port = scripted_server(vec!["250 ok", "250 ok", "250 2.0.0 queued"]).await;
        assert_eq!(send_to(port).await, Ok(()));
    }
}
