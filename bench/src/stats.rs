//! The arithmetic of the report: percentiles, rates, ratios and their formatting.

use std::time::Duration;

/// The value below which `p` percent of `sorted` lies (nearest rank: the smallest sample with at least `p`% of the
/// samples at or below it). `sorted` must be ascending; `None` when it is empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    // The epsilon keeps a rank that is whole on paper (99.9% of 1000) from rounding up through float error.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-7).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Sorts samples ascending (NaN last), ready for [`percentile`].
pub fn sort_samples(samples: &mut [f64]) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Greater));
}

/// p50, p99, p99.9 and the maximum of a latency sample, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// The summary of `samples` (milliseconds, any order); `None` when there are none.
    pub fn of(mut samples: Vec<f64>) -> Option<Self> {
        sort_samples(&mut samples);
        Some(Self {
            count: samples.len(),
            p50: percentile(&samples, 50.0)?,
            p99: percentile(&samples, 99.0)?,
            p999: percentile(&samples, 99.9)?,
            max: *samples.last()?,
        })
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms ({} emails)",
            round_ms(self.p50),
            round_ms(self.p99),
            round_ms(self.p999),
            round_ms(self.max),
            self.count
        )
    }
}

fn round_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// Items per second; zero when no time passed.
pub fn rate(items: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        items as f64 / secs
    }
}

/// `part / whole`; `None` when the whole is zero or not a number (a ceiling that was not measured).
pub fn ratio(part: f64, whole: f64) -> Option<f64> {
    if whole > 0.0 && part.is_finite() && whole.is_finite() {
        Some(part / whole)
    } else {
        None
    }
}

/// A ratio as a percentage, or `n/a`.
pub fn percent(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{:.0}%", r * 100.0),
        None => "n/a".into(),
    }
}

/// CPU seconds per 1,000 items; `None` without items.
pub fn cpu_per_thousand(cpu_seconds: f64, items: u64) -> Option<f64> {
    (items > 0).then(|| cpu_seconds * 1000.0 / items as f64)
}

/// A rate with thousands separators: `12,345/s`.
pub fn per_second(r: f64) -> String {
    format!("{}/s", thousands(r.round() as u64))
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let groups: Vec<String> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| String::from_utf8_lossy(g).into_owned())
        .collect();
    groups.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&samples, 50.0), Some(500.0));
        assert_eq!(percentile(&samples, 99.0), Some(990.0));
        assert_eq!(percentile(&samples, 99.9), Some(999.0));
        assert_eq!(percentile(&samples, 100.0), Some(1000.0));
        assert_eq!(percentile(&samples, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.9), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        // Few samples: p99 of ten is the largest, never past the end.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
        assert_eq!(percentile(&ten, 50.0), Some(5.0));
    }

    #[test]
    fn a_latency_summary_sorts_its_samples() {
        let mut samples: Vec<f64> = (1..=2000).rev().map(f64::from).collect();
        samples.push(f64::NAN);
        let l = Latency::of(samples).unwrap();
        assert_eq!(l.count, 2001);
        assert_eq!(l.p50, 1001.0);
        assert!(l.max.is_nan(), "NaN sorts last and shows up as the maximum");
        assert_eq!(Latency::of(Vec::new()), None);
        let l = Latency::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((l.p50, l.p99, l.max), (2.0, 3.0, 3.0));
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(rate(5000, Duration::from_millis(2500)), 2000.0);
        assert_eq!(rate(5, Duration::ZERO), 0.0);
        assert_eq!(ratio(1500.0, 6000.0), Some(0.25));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(percent(ratio(1500.0, 6000.0)), "25%");
        assert_eq!(percent(None), "n/a");
        assert_eq!(cpu_per_thousand(2.5, 5000), Some(0.5));
        assert_eq!(cpu_per_thousand(2.5, 0), None);
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(per_second(16_499.6), "16,500/s");
    }
}
