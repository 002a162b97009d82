//! The emails the SMTP server received, from `smtp-sink -c`'s own counters (`sess=N quit=N mesg=N`, each record
//! ended by a carriage return, written as messages arrive). `mesg` counts every message whose data ended, answered
//! 250 or not: the bench pairs it with the deliveries recorded `sent`, which the sender writes only after a 250.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use anyhow::Context as _;

/// Reads the sink's counter file.
#[derive(Debug, Clone)]
pub struct Sink {
    path: PathBuf,
}

impl Sink {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Messages the sink has received since it started (0 before the first one).
    pub fn count(&self) -> anyhow::Result<u64> {
        let mut file =
            std::fs::File::open(&self.path).with_context(|| format!("cannot open {}", self.path.display()))?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(512)))?;
        let mut tail = Vec::with_capacity(512);
        file.read_to_end(&mut tail)?;
        Ok(last_message_count(&String::from_utf8_lossy(&tail)).unwrap_or(0))
    }
}

/// The `mesg=` value of the last complete record (one followed by `\r`) in `text`.
pub fn last_message_count(text: &str) -> Option<u64> {
    let complete = &text[..text.rfind('\r')?];
    let record = complete.rsplit('\r').next()?;
    record
        .split_whitespace()
        .find_map(|field| field.strip_prefix("mesg="))
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_complete_record_counts() {
        assert_eq!(
            last_message_count("sess=1 quit=0 mesg=1\rsess=1 quit=0 mesg=2\r"),
            Some(2)
        );
        // A record still being written is ignored.
        assert_eq!(
            last_message_count("sess=8 quit=0 mesg=41\rsess=8 quit=0 mesg=4"),
            Some(41)
        );
        // The tail of a file can start in the middle of a record.
        assert_eq!(last_message_count("=3 mesg=19\rsess=3 quit=1 mesg=20\r"), Some(20));
        assert_eq!(last_message_count(""), None);
        assert_eq!(last_message_count("sess=1 quit=0 mesg=1"), None);
    }
}
