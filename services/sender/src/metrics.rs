//! The sender's metrics, each a small function that logs and counts together. Addresses are logged masked only:
//! reasons carry SMTP reply text, which often names the recipient, so they pass through [`mask_addresses`].

use std::time::Duration;

use leadflow_shared::domain::mask_email;

/// What happened to one delivery the sender was handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailOutcome {
    /// Accepted by the relay (or written to the outbox).
    Sent,
    /// Failed for good: a permanent reply, a bad message, or too many attempts.
    Failed,
    /// A transient failure: tried again after a backoff.
    Retrying,
    /// Over a send-rate limit: due again when the limit allows (not an attempt).
    Deferred,
    /// The data went out and no final reply came: never resent automatically.
    Uncertain,
    /// The enrollment ended or the lead is suppressed: not sent.
    Cancelled,
    /// Not `rendered` any more (already claimed, sent or cancelled), or reclaimed meanwhile: nothing to do.
    Skipped,
}

impl EmailOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Failed => "failed",
            Self::Retrying => "retrying",
            Self::Deferred => "deferred",
            Self::Uncertain => "uncertain",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }
}

/// `text` with every email address in it masked (`a***@example.com`).
pub fn mask_addresses(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            if !word.contains('@') {
                return word.to_string();
            }
            let (Some(start), Some(last)) = (
                word.find(|c: char| c.is_alphanumeric()),
                word.rfind(|c: char| c.is_alphanumeric()),
            ) else {
                return word.to_string();
            };
            let end = last + word[last..].chars().next().map_or(1, char::len_utf8);
            if start >= end || !word[start..end].contains('@') {
                return word.to_string();
            }
            format!("{}{}{}", &word[..start], mask_email(&word[start..end]), &word[end..])
        })
        .collect::<Vec<_>>()
        .join(" ")
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
    tracing::warn!(
        delivery.id = delivery_id,
        to = masked_to,
        reason = %mask_addresses(reason),
        "delivery failed"
    );
    email(EmailOutcome::Failed);
}

/// A hard bounce (or a run of soft ones) suppressed the address: `leadflow_sender_bounces_total{kind}`.
pub fn bounced(delivery_id: i64, masked_to: &str, kind: &'static str) {
    tracing::info!(
        delivery.id = delivery_id,
        to = masked_to,
        kind,
        "address suppressed after a bounce"
    );
    metrics::counter!("leadflow_sender_bounces_total", "kind" => kind).increment(1);
}

/// A 5.7.x refusal (policy, reputation, authentication): `leadflow_sender_policy_blocks_total` (alerted on).
pub fn policy_block(delivery_id: i64, masked_to: &str, reason: &str) {
    tracing::error!(
        delivery.id = delivery_id,
        to = masked_to,
        reason = %mask_addresses(reason),
        "the relay refused an email for policy, reputation or authentication reasons; the address is not blamed"
    );
    metrics::counter!("leadflow_sender_policy_blocks_total").increment(1);
}

pub fn retrying(delivery_id: i64, masked_to: &str, attempt: i32, wait: Duration, reason: &str) {
    tracing::info!(
        delivery.id = delivery_id,
        to = masked_to,
        attempt,
        retry_in_secs = wait.as_secs(),
        reason = %mask_addresses(reason),
        "transient failure; will retry"
    );
    email(EmailOutcome::Retrying);
}

/// Over a rate limit: `leadflow_sender_deferred_total{limit}` (`process` or `domain`).
pub fn deferred(delivery_id: i64, wait: Duration, limit: &'static str) {
    tracing::debug!(
        delivery.id = delivery_id,
        wait_ms = wait.as_millis() as u64,
        limit,
        "deferred by a send-rate limit"
    );
    metrics::counter!("leadflow_sender_deferred_total", "limit" => limit).increment(1);
    email(EmailOutcome::Deferred);
}

/// The data went out and the final reply never arrived: `leadflow_sender_uncertain_total` (alerted on).
pub fn uncertain(delivery_id: i64, masked_to: &str, reason: &str) {
    tracing::error!(
        delivery.id = delivery_id,
        to = masked_to,
        reason = %mask_addresses(reason),
        "delivery uncertain: the server may have accepted it; not resent"
    );
    metrics::counter!("leadflow_sender_uncertain_total").increment(1);
    email(EmailOutcome::Uncertain);
}

pub fn cancelled(delivery_id: i64, reason: &str) {
    tracing::info!(delivery.id = delivery_id, reason, "delivery cancelled before sending");
    email(EmailOutcome::Cancelled);
}

/// The delivery was reclaimed (or is owned by another attempt) before its data went out: nothing sent.
pub fn abandoned(delivery_id: i64) {
    tracing::warn!(
        delivery.id = delivery_id,
        "the delivery was reclaimed before its data went out; not sent by this attempt"
    );
    email(EmailOutcome::Skipped);
}

/// A new SMTP connection: `leadflow_sender_connections_opened_total`.
pub fn connection_opened() {
    metrics::counter!("leadflow_sender_connections_opened_total").increment(1);
}

/// An SMTP connection closed and not reused: `leadflow_sender_connections_closed_total{reason}`.
pub fn connection_closed(reason: &'static str) {
    metrics::counter!("leadflow_sender_connections_closed_total", "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_reply_text_are_masked() {
        assert_eq!(
            mask_addresses("550 5.1.1 <ann@example.com>: Recipient address rejected, ann.lee@x.org."),
            "550 5.1.1 <a***@example.com>: Recipient address rejected, a***@x.org."
        );
        assert_eq!(mask_addresses("451 4.2.0 try again"), "451 4.2.0 try again");
        assert_eq!(mask_addresses("@ <@>"), "@ <@>");
    }
}
