//! Send-rate limits: one rate for the whole process (`LEADFLOW_SEND_RATE`) and one per recipient domain
//! (`LEADFLOW_DOMAIN_RATES`), each a token bucket (GCRA: `count` emails per `per`, bursts of up to `count`).
//!
//! An email over a limit is never dropped. When its turn is less than [`MAX_WAIT`] away the sender waits for it;
//! otherwise the email is deferred: its slot is reserved now and the delivery goes back to `retrying`, due at
//! the slot. When it comes back it uses its reservation instead of taking a new token, so deferred emails keep
//! their order and their spacing. Limits hold per process: two sender processes may each send at the full rate.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use leadflow_shared::config::{Rate, SenderConfig};

/// A turn closer than this is waited for in process; a later one defers the delivery.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// Reservations older than this (a deferred delivery that never came back: cancelled meanwhile) are dropped.
const RESERVATION_TTL: Duration = Duration::from_secs(3600);

/// What to do with one email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send now.
    Now,
    /// Send after this short wait (less than [`MAX_WAIT`]).
    Wait(Duration),
    /// Defer the delivery: its turn is at `until`, `wait` from now.
    Defer { until: Instant, wait: Duration },
}

/// One token bucket as a theoretical arrival time: the email at `tat` is on time, earlier ones use the burst.
#[derive(Debug, Clone)]
struct Bucket {
    interval: Duration,
    tolerance: Duration,
    tat: Instant,
}

impl Bucket {
    fn new(rate: Rate, now: Instant) -> Self {
        let interval = rate.per / rate.count.max(1);
        Self {
            interval,
            tolerance: interval * rate.count.saturating_sub(1),
            tat: now,
        }
    }

    /// The earliest moment (not before `now`) an email may go.
    fn earliest(&self, now: Instant) -> Instant {
        match self.tat.checked_sub(self.tolerance) {
            Some(at) => at.max(now),
            None => now,
        }
    }

    /// Uses one token at `at` (not earlier than [`Bucket::earliest`]).
    fn take(&mut self, at: Instant) {
        self.tat = self.tat.max(at) + self.interval;
    }
}

#[derive(Debug, Default)]
struct State {
    global: Option<Bucket>,
    domains: HashMap<String, Bucket>,
    /// Slots already taken by deferred deliveries.
    reservations: HashMap<i64, Instant>,
}

/// The process's send-rate limits.
#[derive(Debug)]
pub struct Limits {
    global: Option<Rate>,
    domains: HashMap<String, Rate>,
    state: Mutex<State>,
}

impl Limits {
    /// `global`: emails per process; `domains`: per lower-cased recipient domain.
    pub fn new(global: Option<Rate>, domains: &[(String, Rate)]) -> Self {
        Self {
            global,
            domains: domains.iter().map(|(d, r)| (d.to_ascii_lowercase(), *r)).collect(),
            state: Mutex::new(State::default()),
        }
    }

    pub fn from_config(config: &SenderConfig) -> Self {
        Self::new(config.send_rate, &config.domain_rates)
    }

    /// No limit configured: every email goes at once.
    pub fn is_unlimited(&self) -> bool {
        self.global.is_none() && self.domains.is_empty()
    }

    /// The rate that applies to `domain`, if any.
    pub fn domain_rate(&self, domain: &str) -> Option<Rate> {
        self.domains.get(&domain.to_ascii_lowercase()).copied()
    }

    /// Decides when the email of `delivery_id` to `domain` may go, taking its token (or using its reservation).
    pub fn admit(&self, delivery_id: i64, domain: &str) -> Admission {
        self.admit_at(delivery_id, domain, Instant::now())
    }

    /// [`Limits::admit`] at a given moment.
    pub fn admit_at(&self, delivery_id: i64, domain: &str, now: Instant) -> Admission {
        if self.is_unlimited() {
            return Admission::Now;
        }
        let mut state = self.lock();
        if let Some(slot) = state.reservations.remove(&delivery_id) {
            return match slot.checked_duration_since(now) {
                None => Admission::Now,
                Some(wait) if wait.is_zero() => Admission::Now,
                Some(wait) if wait < MAX_WAIT => Admission::Wait(wait),
                Some(wait) => {
                    // Back before its turn: keep the reservation and the turn.
                    state.reservations.insert(delivery_id, slot);
                    Admission::Defer { until: slot, wait }
                }
            };
        }
        let domain = domain.to_ascii_lowercase();
        if let Some(rate) = self.global {
            state.global.get_or_insert_with(|| Bucket::new(rate, now));
        }
        if let Some(rate) = self.domains.get(&domain) {
            state
                .domains
                .entry(domain.clone())
                .or_insert_with(|| Bucket::new(*rate, now));
        }
        let global_at = state.global.as_ref().map_or(now, |b| b.earliest(now));
        let domain_at = state.domains.get(&domain).map_or(now, |b| b.earliest(now));
        let slot = global_at.max(domain_at);
        if let Some(bucket) = state.global.as_mut() {
            bucket.take(slot);
        }
        if let Some(bucket) = state.domains.get_mut(&domain) {
            bucket.take(slot);
        }
        let wait = slot.saturating_duration_since(now);
        if wait.is_zero() {
            Admission::Now
        } else if wait < MAX_WAIT {
            Admission::Wait(wait)
        } else {
            if state.reservations.len() >= 1024 {
                state
                    .reservations
                    .retain(|_, at| at.checked_add(RESERVATION_TTL).is_none_or(|end| end > now));
            }
            state.reservations.insert(delivery_id, slot);
            Admission::Defer { until: slot, wait }
        }
    }

    /// Gives a deferred delivery's slot back unused (its deferral could not be recorded).
    pub fn forget(&self, delivery_id: i64) {
        self.lock().reservations.remove(&delivery_id);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, secs: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(secs),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn without_limits_every_email_goes_now() {
        let limits = Limits::new(None, &[]);
        assert!(limits.is_unlimited());
        let now = Instant::now();
        for id in 0..1000 {
            assert_eq!(limits.admit_at(id, "gmail.com", now), Admission::Now);
        }
    }

    #[test]
    fn a_domain_rate_allows_a_burst_then_spaces_emails_and_defers_far_turns() {
        let limits = Limits::new(None, &[("Gmail.com".into(), rate(5, 1))]);
        let now = Instant::now();
        for id in 0..5 {
            assert_eq!(limits.admit_at(id, "gmail.com", now), Admission::Now, "burst {id}");
        }
        // One token every 200 ms afterwards: waited for while under a second away.
        assert_eq!(limits.admit_at(5, "gmail.com", now), Admission::Wait(ms(200)));
        assert_eq!(limits.admit_at(6, "GMAIL.COM", now), Admission::Wait(ms(400)));
        assert_eq!(limits.admit_at(7, "gmail.com", now), Admission::Wait(ms(600)));
        assert_eq!(limits.admit_at(8, "gmail.com", now), Admission::Wait(ms(800)));
        assert_eq!(
            limits.admit_at(9, "gmail.com", now),
            Admission::Defer {
                until: now + ms(1000),
                wait: ms(1000)
            }
        );
        assert_eq!(
            limits.admit_at(10, "gmail.com", now),
            Admission::Defer {
                until: now + ms(1200),
                wait: ms(1200)
            }
        );
        // Other domains are not limited.
        assert_eq!(limits.admit_at(11, "yahoo.com", now), Admission::Now);
        // Later, the bucket refilled.
        let later = now + Duration::from_secs(10);
        assert_eq!(limits.admit_at(12, "gmail.com", later), Admission::Now);
    }

    #[test]
    fn a_deferred_email_keeps_its_slot_when_it_comes_back() {
        let limits = Limits::new(None, &[("slow.test".into(), rate(1, 1))]);
        let now = Instant::now();
        assert_eq!(limits.admit_at(1, "slow.test", now), Admission::Now);
        let second = limits.admit_at(2, "slow.test", now);
        assert_eq!(
            second,
            Admission::Defer {
                until: now + ms(1000),
                wait: ms(1000)
            }
        );
        let third = limits.admit_at(3, "slow.test", now);
        assert_eq!(
            third,
            Admission::Defer {
                until: now + ms(2000),
                wait: ms(2000)
            }
        );
        // Delivery 3 comes back early: deferred again to the same slot, no new token taken.
        assert_eq!(
            limits.admit_at(3, "slow.test", now + ms(500)),
            Admission::Defer {
                until: now + ms(2000),
                wait: ms(1500)
            }
        );
        // Delivery 2 comes back on time and goes; a new email queues behind delivery 3's slot.
        assert_eq!(limits.admit_at(2, "slow.test", now + ms(1000)), Admission::Now);
        assert_eq!(
            limits.admit_at(4, "slow.test", now + ms(1000)),
            Admission::Defer {
                until: now + ms(3000),
                wait: ms(2000)
            }
        );
        assert_eq!(
            limits.admit_at(3, "slow.test", now + ms(1900)),
            Admission::Wait(ms(100))
        );
        // A reservation given back is forgotten: the delivery queues again.
        limits.forget(4);
        assert_eq!(
            limits.admit_at(4, "slow.test", now + ms(1900)),
            Admission::Defer {
                until: now + ms(4000),
                wait: ms(2100)
            }
        );
    }

    #[test]
    fn the_process_rate_and_the_domain_rate_both_apply() {
        let limits = Limits::new(Some(rate(2, 1)), &[("slow.test".into(), rate(1, 2))]);
        let now = Instant::now();
        assert_eq!(limits.admit_at(1, "slow.test", now), Admission::Now);
        assert_eq!(limits.admit_at(2, "fast.test", now), Admission::Now);
        // The process bucket is empty: the next token comes in 500 ms whatever the domain.
        assert_eq!(limits.admit_at(3, "fast.test", now), Admission::Wait(ms(500)));
        // slow.test allows one per two seconds.
        assert_eq!(
            limits.admit_at(4, "slow.test", now),
            Admission::Defer {
                until: now + ms(2000),
                wait: ms(2000)
            }
        );
        assert_eq!(limits.domain_rate("SLOW.test"), Some(rate(1, 2)));
        assert_eq!(limits.domain_rate("fast.test"), None);
    }

    #[test]
    fn a_per_minute_rate_spaces_by_its_interval() {
        let limits = Limits::new(None, &[("yahoo.com".into(), rate(100, 60))]);
        let now = Instant::now();
        for id in 0..100 {
            assert_eq!(limits.admit_at(id, "yahoo.com", now), Admission::Now);
        }
        assert_eq!(limits.admit_at(100, "yahoo.com", now), Admission::Wait(ms(600)));
        assert!(matches!(
            limits.admit_at(101, "yahoo.com", now),
            Admission::Defer { wait, .. } if wait == ms(1200)
        ));
    }
}
