//! Ingest's metrics: events accepted, repeated and rejected, and request time.

use std::time::Duration;

pub fn accepted(via: &'static str, new: usize, duplicates: usize) {
    metrics::counter!("leadflow_ingest_events_total", "via" => via, "outcome" => "accepted").increment(new as u64);
    metrics::counter!("leadflow_ingest_events_total", "via" => via, "outcome" => "duplicate")
        .increment(duplicates as u64);
}

/// `field` is a JSON pointer from a fixed vocabulary (plus batch indexes stripped), so labels stay bounded.
pub fn rejected(via: &'static str, field: &str) {
    let field = field.trim_start_matches(|c: char| c == '/' || c.is_ascii_digit());
    let field = if field.len() > 40 { "other" } else { field };
    metrics::counter!("leadflow_ingest_events_total", "via" => via, "outcome" => "rejected", "field" => field.to_string())
        .increment(1);
}

pub fn request_time(elapsed: Duration) {
    metrics::histogram!("leadflow_ingest_request_seconds").record(elapsed.as_secs_f64());
}
