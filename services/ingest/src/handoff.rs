//! Handing stored events to the scheduler.

use leadflow_shared::messages::WorkMessage;
use leadflow_shared::service::Context;

/// Publishes the ids to the scheduler. The events are already durable: when the broker is unreachable the
/// scheduler's sweep picks them up later, so a failure here is logged, not returned.
pub async fn hand_off(ctx: &Context, event_ids: &[i64]) {
    if event_ids.is_empty() {
        return;
    }
    let message = WorkMessage::EventAcceptedV1 {
        event_ids: event_ids.to_vec(),
    };
    if let Err(e) = ctx.publisher.publish(&message).await {
        tracing::warn!(
            error = format!("{e:#}"),
            count = event_ids.len(),
            "hand-off to the scheduler failed; the sweep will retry"
        );
        metrics::counter!("leadflow_ingest_handoff_failures_total").increment(1);
    }
}
