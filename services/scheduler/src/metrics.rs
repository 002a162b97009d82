//! The scheduler's metrics: enrollments, cancellations, conversions, deliveries published, leases expired.

use std::time::Duration;

use leadflow_shared::domain::EventType;

pub fn event_handled(event_type: &EventType) {
    let kind = match event_type {
        EventType::Engagement(_) => "engagement".to_string(),
        other => other.as_str(),
    };
    metrics::counter!("leadflow_scheduler_events_total", "type" => kind).increment(1);
}

pub fn enrolled() {
    metrics::counter!("leadflow_scheduler_enrollments_total").increment(1);
}

pub fn cancelled(reason: &str, count: u64) {
    metrics::counter!("leadflow_scheduler_cancelled_total", "reason" => reason.to_string()).increment(count);
}

pub fn converted() {
    metrics::counter!("leadflow_scheduler_conversions_total").increment(1);
}

pub fn published(state: &str, count: usize) {
    metrics::counter!("leadflow_scheduler_published_total", "state" => state.to_string()).increment(count as u64);
}

pub fn lease_expired(requeued: usize, uncertain: usize) {
    metrics::counter!("leadflow_scheduler_requeued_total").increment(requeued as u64);
    metrics::counter!("leadflow_scheduler_uncertain_total").increment(uncertain as u64);
    if uncertain > 0 {
        tracing::error!(
            count = uncertain,
            "deliveries left uncertain: the SMTP outcome is unknown; check them by hand"
        );
    }
}

pub fn message_time(elapsed: Duration) {
    metrics::histogram!("leadflow_scheduler_message_seconds").record(elapsed.as_secs_f64());
}
