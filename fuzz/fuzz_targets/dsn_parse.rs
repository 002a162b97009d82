//! Fuzz target: `parse_report` on arbitrary bytes must answer (a report or an error), never panic or hang; and
//! everything derived from a parsed report is computed too.
#![no_main]

use libfuzzer_sys::fuzz_target;

use leadflow_shared::dsn::{classify, parse_report};

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = parse_report(data) {
        let _ = report.bounce_tokens();
        let _ = report.unsubscribe_tokens();
        for block in &report.recipients {
            let _ = block.class();
            let _ = classify(block.status.as_deref(), block.diagnostic.as_deref());
            if let Some(r) = &block.final_recipient {
                let _ = report.recipients_for(r);
            }
        }
    }
    // The classifier reads free text from the network too.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = classify(Some(text), Some(text));
    }
});
