//! The renderer's metrics, each a small function that logs and counts together.

use std::time::Duration;

/// What happened to one delivery the renderer was handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Rendered and handed to the sender.
    Rendered,
    /// A permanent template problem: the delivery is failed with the reason.
    Failed,
    /// The enrollment ended before the step was rendered: the delivery is cancelled.
    Cancelled,
    /// Not in state `queued` (already rendered, sent or cancelled): nothing to do.
    Skipped,
}

impl DeliveryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rendered => "rendered",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }
}

/// Counts `n` deliveries with `outcome` in `leadflow_renderer_deliveries_total`.
pub fn deliveries(outcome: DeliveryOutcome, n: usize) {
    if n > 0 {
        metrics::counter!("leadflow_renderer_deliveries_total", "outcome" => outcome.as_str()).increment(n as u64);
    }
}

/// Records the time one message took to render in `leadflow_renderer_message_seconds`.
pub fn message_rendered(elapsed: Duration) {
    metrics::histogram!("leadflow_renderer_message_seconds").record(elapsed.as_secs_f64());
}

/// Logs and counts a delivery that failed to render.
pub fn render_failed(delivery_id: i64, reason: &str) {
    tracing::warn!(delivery.id = delivery_id, reason, "delivery failed to render");
}

/// Logs a delivery cancelled because its enrollment ended.
pub fn cancelled(delivery_id: i64, reason: &str) {
    tracing::info!(
        delivery.id = delivery_id,
        reason,
        "delivery cancelled: enrollment ended"
    );
}
