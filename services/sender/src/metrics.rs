//! The sender's metrics, each a small function that logs and counts together. Addresses are logged masked only.

use std::time::Duration;

/// What happened to one delivery the sender was handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailOutcome {
    /// Accepted by the relay (or written to the outbox).
    Sent,
    /// Failed for good: a permanent reply, a bad message, or too many attempts.
    Failed,
    /// A transient failure: tried again after a backoff.
    Retrying,
    /// The enrollment ended or the lead is suppressed: not sent.
    Cancelled,
    /// Not `rendered` any more (already claimed, sent or cancelled): nothing to do.
    Skipped,
}

impl EmailOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Failed => "failed",
            Self::Retrying => "retrying",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }
}

/// Counts one delivery with `outcome` in `leadflow_sender_emails_total`.
pub fn email(outcome: EmailOutcome) {
    metrics::counter!("leadflow_sender_emails_total", "outcome" => outcome.as_str()).increment(1);
}

/// Records how long one SMTP transaction (or outbox write) took in `leadflow_sender_send_seconds`.
pub fn send_time(elapsed: Duration) {
    metrics::histogram!("leadflow_sender_send_seconds").record(elapsed.as_secs_f64());
}

pub fn sent(delivery_id: i64, masked_to: &str, attempt: i32) {
    tracing::debug!(delivery.id = delivery_id, to = masked_to, attempt, "sent");
    email(EmailOutcome::Sent);
}

pub fn failed(delivery_id: i64, masked_to: &str, reason: &str) {
    tracing::warn!(delivery.id = delivery_id, to = masked_to, reason, "delivery failed");
    email(EmailOutcome::Failed);
}

pub fn retrying(delivery_id: i64, masked_to: &str, attempt: i32, wait: Duration, reason: &str) {
    tracing::info!(
        delivery.id = delivery_id,
        to = masked_to,
        attempt,
        retry_in_secs = wait.as_secs(),
        reason,
        "transient failure; will retry"
    );
    email(EmailOutcome::Retrying);
}

pub fn cancelled(delivery_id: i64, reason: &str) {
    tracing::info!(delivery.id = delivery_id, reason, "delivery cancelled before sending");
    email(EmailOutcome::Cancelled);
}
