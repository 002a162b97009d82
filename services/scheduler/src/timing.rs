//! When a due follow-up may go out: send windows read in the lead's time zone, the frequency cap per lead across
//! campaigns, and the claim gate that defers the rest to their next allowed moment (never dropping them).

use std::collections::HashMap;

use chrono::{DateTime, Datelike, LocalResult, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use deadpool_postgres::GenericClient;
use serde_json::Value;

use leadflow_shared::settings::{self, FrequencyCap};

use crate::campaigns::{parse_clock, SendWindow, WEEKDAYS};

/// Why a follow-up that came due waits longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Why {
    /// Its campaign's send window is closed in the lead's time zone.
    SendWindow,
    /// The lead had as many follow-ups within the period as the frequency cap allows.
    FrequencyCap,
}

impl Why {
    /// The `reason` the delivery row carries while it waits.
    pub fn reason(self) -> &'static str {
        match self {
            Why::SendWindow => "deferred: send window",
            Why::FrequencyCap => "deferred: frequency cap",
        }
    }

    /// The `why` label of `leadflow_scheduler_deferred_total`.
    pub fn label(self) -> &'static str {
        match self {
            Why::SendWindow => "send_window",
            Why::FrequencyCap => "frequency_cap",
        }
    }
}

/// The zone a window is read in: the lead's when it names a known IANA zone, else the window's own, else UTC.
pub fn zone(window_tz: Option<&str>, lead_tz: Option<&str>) -> Tz {
    [lead_tz, window_tz]
        .into_iter()
        .flatten()
        .find_map(|name| name.trim().parse::<Tz>().ok())
        .unwrap_or(Tz::UTC)
}

/// A window in minutes after the local midnight of the day it opens on, and the days it opens on (Monday first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hours {
    open: u32,
    /// After `open`; beyond 1440 when the window spans midnight.
    close: u32,
    days: [bool; 7],
}

impl Hours {
    /// `None` for a window that cannot be read (validation keeps those out of the database).
    fn of(window: &SendWindow) -> Option<Self> {
        let open = parse_clock(&window.start).ok()?;
        let end = parse_clock(&window.end).ok()?;
        let close = match end {
            e if e > open => e,
            e if e < open => e + 1440,
            _ => return None,
        };
        let mut days = [window.days.is_empty(); 7];
        for day in &window.days {
            let day = day.trim().to_ascii_lowercase();
            if let Some(i) = WEEKDAYS.iter().position(|d| *d == day) {
                days[i] = true;
            }
        }
        if !days.contains(&true) {
            // Only unknown day names: better every day than never.
            days = [true; 7];
        }
        Some(Self { open, close, days })
    }
}

/// The first instant the clocks of `tz` show `local` or later: when clocks go forward over it, the moment of the
/// jump; when they go back and show it twice, the first time.
fn first_instant(tz: &Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut t = local;
    // No zone has ever skipped more than a day (Samoa, December 2011).
    for _ in 0..=2 * 1440 {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(at) => return at.with_timezone(&Utc),
            LocalResult::Ambiguous(first, second) => return first.min(second).with_timezone(&Utc),
            LocalResult::None => t += TimeDelta::minutes(1),
        }
    }
    Utc.from_utc_datetime(&local)
}

/// The first moment at or after `now` inside `window`, read in the lead's zone (falling back to the window's,
/// then UTC): `now` itself when the window is open.
///
/// Each listed day (every day when none are) the window opens at the first moment the local clock shows `start`
/// and closes at the first moment it shows `end`; an `end` before `start` closes it the next day, so such a
/// window belongs to the day it opens on. On the night clocks go forward, a time they skip counts as the moment
/// of the jump; on the night they go back, a time shown twice counts at its first showing. A window that cannot
/// be read holds nothing back.
pub fn next_allowed(now: DateTime<Utc>, window: &SendWindow, lead_tz: Option<&str>) -> DateTime<Utc> {
    let Some(hours) = Hours::of(window) else {
        return now;
    };
    let tz = zone(window.timezone.as_deref(), lead_tz);
    let today = now.with_timezone(&tz).date_naive();
    let mut next: Option<DateTime<Utc>> = None;
    // Two days back: a window that opened the day before yesterday (local) can be open yet only on DST nights;
    // eight ahead: the same weekday next week, plus a margin.
    for offset in -2..=8 {
        let Some(day) = today.checked_add_signed(TimeDelta::days(offset)) else {
            continue;
        };
        if !hours.days[day.weekday().num_days_from_monday() as usize] {
            continue;
        }
        let midnight = day.and_time(NaiveTime::MIN);
        let open = first_instant(&tz, midnight + TimeDelta::minutes(i64::from(hours.open)));
        let close = first_instant(&tz, midnight + TimeDelta::minutes(i64::from(hours.close)));
        if open >= close {
            continue; // the clocks skipped the whole window that day
        }
        if open <= now && now < close {
            return now;
        }
        if open > now && next.is_none_or(|n| open < n) {
            next = Some(open);
        }
    }
    next.unwrap_or(now)
}

/// Reads a campaign's stored `send_window`. Days may also be ISO weekday numbers (1 = Monday .. 7 = Sunday).
pub fn window_of(value: &Value) -> Option<SendWindow> {
    if value.is_null() {
        return None;
    }
    let mut value = value.clone();
    if let Some(days) = value.get_mut("days").and_then(Value::as_array_mut) {
        for day in days.iter_mut() {
            if let Some(n) = day.as_u64().filter(|n| (1..=7).contains(n)) {
                *day = Value::String(WEEKDAYS[n as usize - 1].to_string());
            }
        }
    }
    serde_json::from_value(value).ok()
}

fn period(cap: &FrequencyCap) -> TimeDelta {
    TimeDelta::from_std(cap.per).unwrap_or(TimeDelta::MAX)
}

/// The first moment at or after `at` when the cap lets one more follow-up go to a lead whose counted follow-ups
/// went (or started going) at `recent`: `at` itself when fewer than `cap.max` of them fall within the period
/// ending at `at`, else the moment enough of them are older than the period.
pub fn cap_allows_at(cap: &FrequencyCap, recent: &[DateTime<Utc>], at: DateTime<Utc>) -> DateTime<Utc> {
    let per = period(cap);
    let since = at.checked_sub_signed(per).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut within: Vec<DateTime<Utc>> = recent.iter().copied().filter(|t| *t > since).collect();
    let max = cap.max.max(1) as usize;
    if within.len() < max {
        return at;
    }
    within.sort_unstable();
    // Once the entry `max` places from the newest leaves the period, `max - 1` remain in it.
    let freed = within[within.len() - max]
        .checked_add_signed(per)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    freed.max(at)
}

/// When a follow-up due at `now` may go out, and why it waits when that is later: the first moment both the
/// window (if any) and the cap (if any) allow.
pub fn earliest_send(
    now: DateTime<Utc>,
    window: Option<&SendWindow>,
    lead_tz: Option<&str>,
    cap: Option<&FrequencyCap>,
    recent: &[DateTime<Utc>],
) -> (DateTime<Utc>, Option<Why>) {
    let in_window = |t| window.map_or(t, |w| next_allowed(t, w, lead_tz));
    let capped = |t| cap.map_or(t, |c| cap_allows_at(c, recent, t));
    let why = if in_window(now) > now {
        Some(Why::SendWindow)
    } else if capped(now) > now {
        Some(Why::FrequencyCap)
    } else {
        return (now, None);
    };
    // Waiting only ages the counted follow-ups, so once the cap allows a moment it allows every later one: this
    // settles after a window and a cap step; the bound guards against a window that cannot be met.
    let mut t = now;
    for _ in 0..8 {
        let next = capped(in_window(t));
        if next == t {
            break;
        }
        t = next;
    }
    (t, why)
}

/// A claimed row that came due, with what decides whether it may go now.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    pub id: i64,
    pub lead_id: i64,
    pub window: Option<SendWindow>,
    pub lead_tz: Option<String>,
}

/// A row that waits until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferral {
    pub id: i64,
    pub until: DateTime<Utc>,
    pub why: Why,
}

/// What to do with a claimed batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Goes out now, in claim order.
    pub release: Vec<i64>,
    pub defer: Vec<Deferral>,
}

/// Decides a claimed batch (in claim order: the earliest due first gets the lead's free cap slots). `recent` holds
/// each lead's counted follow-ups within the cap period; every row released here counts for the rows after it.
pub fn plan(
    now: DateTime<Utc>,
    due: &[Due],
    cap: Option<&FrequencyCap>,
    recent: &HashMap<i64, Vec<DateTime<Utc>>>,
) -> Plan {
    let mut counted = recent.clone();
    let mut plan = Plan::default();
    for row in due {
        let lead = counted.entry(row.lead_id).or_default();
        let (until, why) = earliest_send(now, row.window.as_ref(), row.lead_tz.as_deref(), cap, lead);
        match why {
            Some(why) if until > now => plan.defer.push(Deferral { id: row.id, until, why }),
            _ => {
                lead.push(now);
                plan.release.push(row.id);
            }
        }
    }
    plan
}

/// What the gate did with a claimed batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    /// Set to the target state, to be published.
    pub ids: Vec<i64>,
    /// Left pending with a later `due_at`, per reason.
    pub deferred: Vec<(Why, usize)>,
}

impl Claimed {
    pub fn deferred_count(&self) -> usize {
        self.deferred.iter().map(|(_, n)| n).sum()
    }

    /// Counts the deferrals; call once the transaction committed.
    pub fn record(&self) {
        for (why, count) in &self.deferred {
            ::metrics::counter!("leadflow_scheduler_deferred_total", "why" => why.label()).increment(*count as u64);
            tracing::debug!(count, why = why.label(), "follow-ups deferred");
        }
    }
}

/// Advisory lock class (`lf`) that makes scheduler replicas take turns on a lead while the cap is counted.
const CAP_LOCK_CLASS: i32 = 0x6c66;

/// Claims up to `limit` due `pending` rows (SKIP LOCKED) inside `tx`. Rows their campaign's send window or the
/// lead's frequency cap holds back stay pending with `due_at` moved to their next allowed moment and a
/// `deferred: ...` reason; the others are set to `to` (their deferral reason cleared) and returned to be published.
/// A few statements per batch, none per row. Nothing is final until the caller commits.
pub async fn claim_pending(tx: &impl GenericClient, to: &str, limit: i64) -> anyhow::Result<Claimed> {
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT d.id, d.lead_id, c.send_window, l.timezone, now()
             FROM deliveries d
             JOIN campaigns c ON c.id = d.campaign_id
             JOIN leads l ON l.id = d.lead_id
             WHERE d.state = 'pending' AND d.due_at <= now()
             ORDER BY d.due_at, d.id LIMIT $1
             FOR UPDATE OF d SKIP LOCKED",
            )
            .await?,
            &[&limit],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(Claimed::default());
    };
    let now: DateTime<Utc> = first.get(4);
    let mut unreadable = 0;
    let mut due: Vec<Due> = rows
        .iter()
        .map(|r| {
            let stored: Option<Value> = r.get(2);
            let window = stored.as_ref().and_then(window_of);
            if window.is_none() && stored.is_some_and(|w| !w.is_null()) {
                unreadable += 1;
            }
            Due {
                id: r.get(0),
                lead_id: r.get(1),
                window,
                lead_tz: r.get(3),
            }
        })
        .collect();
    if unreadable > 0 {
        tracing::warn!(
            count = unreadable,
            "follow-ups whose campaign send window cannot be read: sent without a window"
        );
    }
    let cap = settings::frequency_cap(tx).await?;
    let mut recent: HashMap<i64, Vec<DateTime<Utc>>> = HashMap::new();
    if let Some(cap) = &cap {
        let mut leads: Vec<i64> = due.iter().map(|d| d.lead_id).collect();
        leads.sort_unstable();
        leads.dedup();
        // A lead another replica is counting right now is left alone: its rows stay due for the next tick.
        let busy: Vec<i64> = tx
            .query(
                "SELECT lead FROM unnest($1::bigint[]) AS lead
                 WHERE NOT pg_try_advisory_xact_lock($2, (lead % 2147483647)::int4)",
                &[&leads, &CAP_LOCK_CLASS],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        due.retain(|d| !busy.contains(&d.lead_id));
        let per = cap.per.as_secs_f64();
        for r in tx
            .query(
                "SELECT lead_id, CASE WHEN state = 'sent' THEN sent_at ELSE updated_at END
                 FROM deliveries
                 WHERE lead_id = ANY ($1)
                   AND ((state = 'sent' AND sent_at > now() - make_interval(secs => $2))
                        OR (state IN ('queued', 'rendered', 'sending', 'retrying', 'uncertain')
                            AND updated_at > now() - make_interval(secs => $2)))",
                &[&leads, &per],
            )
            .await?
        {
            recent.entry(r.get(0)).or_default().push(r.get(1));
        }
    }
    let plan = plan(now, &due, cap.as_ref(), &recent);
    if !plan.defer.is_empty() {
        let ids: Vec<i64> = plan.defer.iter().map(|d| d.id).collect();
        let until: Vec<DateTime<Utc>> = plan.defer.iter().map(|d| d.until).collect();
        let reasons: Vec<&str> = plan.defer.iter().map(|d| d.why.reason()).collect();
        tx.execute(
            &tx.prepare_cached(
                "UPDATE deliveries d SET due_at = u.until, reason = u.reason, updated_at = now()
             FROM unnest($1::bigint[], $2::timestamptz[], $3::text[]) AS u (id, until, reason)
             WHERE d.id = u.id",
            )
            .await?,
            &[&ids, &until, &reasons],
        )
        .await?;
    }
    if !plan.release.is_empty() {
        tx.execute(
            &tx.prepare_cached(
                "UPDATE deliveries SET state = $2, updated_at = now(),
                    reason = CASE WHEN reason LIKE 'deferred: %' THEN NULL ELSE reason END
             WHERE id = ANY ($1)",
            )
            .await?,
            &[&plan.release, &to],
        )
        .await?;
    }
    let mut deferred: Vec<(Why, usize)> = Vec::new();
    for why in [Why::SendWindow, Why::FrequencyCap] {
        let count = plan.defer.iter().filter(|d| d.why == why).count();
        if count > 0 {
            deferred.push((why, count));
        }
    }
    Ok(Claimed {
        ids: plan.release,
        deferred,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .with_timezone(&Utc)
    }

    fn window(start: &str, end: &str, days: &[&str], tz: Option<&str>) -> SendWindow {
        SendWindow {
            start: start.into(),
            end: end.into(),
            days: days.iter().map(|d| d.to_string()).collect(),
            timezone: tz.map(str::to_string),
        }
    }

    fn cap(max: u32, secs: u64) -> FrequencyCap {
        FrequencyCap {
            max,
            per: Duration::from_secs(secs),
        }
    }

    const DAY: u64 = 86_400;

    #[test]
    fn inside_the_window_is_now() {
        let w = window("09:00", "20:00", &[], Some("Europe/Berlin"));
        // 10:00 UTC is 12:00 in Berlin in summer.
        let now = utc("2025-07-02T10:00:00Z");
        assert_eq!(next_allowed(now, &w, None), now);
        // The start is inside, the end is not.
        assert_eq!(
            next_allowed(utc("2025-07-02T07:00:00Z"), &w, None),
            utc("2025-07-02T07:00:00Z")
        );
        assert_eq!(
            next_allowed(utc("2025-07-02T18:00:00Z"), &w, None),
            utc("2025-07-03T07:00:00Z")
        );
    }

    #[test]
    fn before_the_window_waits_for_todays_start_and_after_it_for_tomorrows() {
        let w = window("09:00", "20:00", &[], Some("Europe/Berlin"));
        // 05:00 UTC = 07:00 CEST: opens at 09:00 CEST = 07:00 UTC the same day.
        assert_eq!(
            next_allowed(utc("2025-07-02T05:00:00Z"), &w, None),
            utc("2025-07-02T07:00:00Z")
        );
        // 21:30 UTC = 23:30 CEST: tomorrow 09:00 CEST.
        assert_eq!(
            next_allowed(utc("2025-07-02T21:30:00Z"), &w, None),
            utc("2025-07-03T07:00:00Z")
        );
        // In winter Berlin is UTC+1.
        assert_eq!(
            next_allowed(utc("2025-01-15T20:00:00Z"), &w, None),
            utc("2025-01-16T08:00:00Z")
        );
    }

    #[test]
    fn a_window_spanning_midnight_belongs_to_the_day_it_opens() {
        // 22:00 to 06:00, opening Fridays only (UTC): Friday 22:00 to Saturday 06:00.
        let w = window("22:00", "06:00", &["fri"], None);
        // Wednesday 2025-07-02: the next opening is Friday 2025-07-04 22:00.
        assert_eq!(
            next_allowed(utc("2025-07-02T12:00:00Z"), &w, None),
            utc("2025-07-04T22:00:00Z")
        );
        // Saturday 03:00 is inside Friday's window.
        let sat = utc("2025-07-05T03:00:00Z");
        assert_eq!(next_allowed(sat, &w, None), sat);
        // Saturday 23:00 is not (Saturday opens no window): next Friday.
        assert_eq!(
            next_allowed(utc("2025-07-05T23:00:00Z"), &w, None),
            utc("2025-07-11T22:00:00Z")
        );
        // Friday 05:00 is not inside (Thursday opens no window).
        assert_eq!(
            next_allowed(utc("2025-07-04T05:00:00Z"), &w, None),
            utc("2025-07-04T22:00:00Z")
        );
        // Every day: early morning is inside yesterday's window.
        let every = window("22:00", "06:00", &[], None);
        let early = utc("2025-07-02T05:59:00Z");
        assert_eq!(next_allowed(early, &every, None), early);
        assert_eq!(
            next_allowed(utc("2025-07-02T06:00:00Z"), &every, None),
            utc("2025-07-02T22:00:00Z")
        );
    }

    #[test]
    fn day_lists_skip_to_the_next_listed_day() {
        let weekdays = window("09:00", "17:00", &["mon", "tue", "wed", "thu", "fri"], Some("UTC"));
        // Friday after hours -> Monday 09:00.
        assert_eq!(
            next_allowed(utc("2025-07-04T18:00:00Z"), &weekdays, None),
            utc("2025-07-07T09:00:00Z")
        );
        // Saturday noon -> Monday 09:00.
        assert_eq!(
            next_allowed(utc("2025-07-05T12:00:00Z"), &weekdays, None),
            utc("2025-07-07T09:00:00Z")
        );
        // Names are read case-insensitively; only unknown names mean every day.
        let sunday = window("09:00", "17:00", &["Sun"], None);
        assert_eq!(
            next_allowed(utc("2025-07-07T10:00:00Z"), &sunday, None),
            utc("2025-07-13T09:00:00Z")
        );
        let unknown = window("09:00", "17:00", &["someday"], None);
        assert_eq!(
            next_allowed(utc("2025-07-07T18:00:00Z"), &unknown, None),
            utc("2025-07-08T09:00:00Z")
        );
        // Monday only, just after this Monday's window: a week later.
        let monday = window("09:00", "10:00", &["mon"], None);
        assert_eq!(
            next_allowed(utc("2025-07-07T10:00:00Z"), &monday, None),
            utc("2025-07-14T09:00:00Z")
        );
    }

    #[test]
    fn the_whole_day_and_a_24_00_end_work() {
        let w = window("00:00", "24:00", &["sat", "sun"], None);
        let sunday_night = utc("2025-07-06T23:59:00Z");
        assert_eq!(next_allowed(sunday_night, &w, None), sunday_night);
        assert_eq!(
            next_allowed(utc("2025-07-07T00:00:00Z"), &w, None),
            utc("2025-07-12T00:00:00Z")
        );
    }

    #[test]
    fn the_lead_zone_wins_then_the_campaign_zone_then_utc() {
        let w = window("09:00", "20:00", &[], Some("Europe/Berlin"));
        let now = utc("2025-07-02T05:00:00Z"); // 07:00 in Berlin, 14:00 in Tokyo, 01:00 in New York
        assert_eq!(next_allowed(now, &w, Some("Asia/Tokyo")), now);
        assert_eq!(
            next_allowed(now, &w, Some("America/New_York")),
            utc("2025-07-02T13:00:00Z")
        );
        for invalid in [Some("Mars/Olympus"), Some(""), Some("not a zone"), None] {
            assert_eq!(
                next_allowed(now, &w, invalid),
                utc("2025-07-02T07:00:00Z"),
                "{invalid:?}"
            );
        }
        let no_zone = window("09:00", "20:00", &[], None);
        assert_eq!(
            next_allowed(now, &no_zone, Some("Mars/Olympus")),
            utc("2025-07-02T09:00:00Z")
        );
        let bad_zone = window("09:00", "20:00", &[], Some("Nowhere/Special"));
        assert_eq!(next_allowed(now, &bad_zone, None), utc("2025-07-02T09:00:00Z"));
        assert_eq!(zone(Some("Europe/Berlin"), Some(" Asia/Tokyo ")), Tz::Asia__Tokyo);
        assert_eq!(zone(Some("Nowhere"), Some("Mars/Olympus")), Tz::UTC);
    }

    #[test]
    fn a_start_the_clocks_skip_opens_at_the_jump() {
        // Berlin, 2025-03-30: 02:00 CET jumps to 03:00 CEST (01:00 UTC). A window from 02:30 opens at the jump.
        let w = window("02:30", "05:00", &[], Some("Europe/Berlin"));
        assert_eq!(
            next_allowed(utc("2025-03-30T00:00:00Z"), &w, None),
            utc("2025-03-30T01:00:00Z")
        );
        // The day after, 02:30 CEST = 00:30 UTC.
        assert_eq!(
            next_allowed(utc("2025-03-30T04:00:00Z"), &w, None),
            utc("2025-03-31T00:30:00Z")
        );
        // A window wholly inside the skipped hour does not exist that day.
        let skipped = window("02:10", "02:50", &[], Some("Europe/Berlin"));
        assert_eq!(
            next_allowed(utc("2025-03-29T23:00:00Z"), &skipped, None),
            utc("2025-03-31T00:10:00Z")
        );
        // 09:00 the day of the change is already summer time: 07:00 UTC, the day before 08:00 UTC.
        let day = window("09:00", "17:00", &[], Some("Europe/Berlin"));
        assert_eq!(
            next_allowed(utc("2025-03-29T18:00:00Z"), &day, None),
            utc("2025-03-30T07:00:00Z")
        );
        assert_eq!(
            next_allowed(utc("2025-03-29T06:00:00Z"), &day, None),
            utc("2025-03-29T08:00:00Z")
        );
    }

    #[test]
    fn a_time_shown_twice_when_clocks_go_back_counts_at_its_first_showing() {
        // Berlin, 2025-10-26: 03:00 CEST (01:00 UTC) goes back to 02:00 CET; 02:30 is shown at 00:30 and 01:30 UTC.
        let w = window("02:30", "05:00", &[], Some("Europe/Berlin"));
        assert_eq!(
            next_allowed(utc("2025-10-25T23:00:00Z"), &w, None),
            utc("2025-10-26T00:30:00Z")
        );
        // Between the two showings the window is open, and it closes at 05:00 CET = 04:00 UTC.
        let between = utc("2025-10-26T01:10:00Z");
        assert_eq!(next_allowed(between, &w, None), between);
        assert_eq!(
            next_allowed(utc("2025-10-26T04:00:00Z"), &w, None),
            utc("2025-10-27T01:30:00Z")
        );
        // A window closing at 02:30 closes at its first showing; the repeated half hour is outside.
        let early = window("01:00", "02:30", &[], Some("Europe/Berlin"));
        assert_eq!(
            next_allowed(utc("2025-10-26T01:10:00Z"), &early, None),
            utc("2025-10-27T00:00:00Z")
        );
        // New York, 2025-11-02: 02:00 EDT goes back to 01:00 EST; a 20:00-08:00 window lasts an hour longer.
        let night = window("20:00", "08:00", &[], Some("America/New_York"));
        let late = utc("2025-11-02T12:30:00Z"); // 07:30 EST
        assert_eq!(next_allowed(late, &night, None), late);
        assert_eq!(
            next_allowed(utc("2025-11-02T13:00:00Z"), &night, None),
            utc("2025-11-03T01:00:00Z")
        );
    }

    #[test]
    fn a_window_that_cannot_be_read_holds_nothing_back() {
        let now = utc("2025-07-02T03:00:00Z");
        assert_eq!(next_allowed(now, &window("9am", "20:00", &[], None), None), now);
        assert_eq!(next_allowed(now, &window("09:00", "09:00", &[], None), None), now);
    }

    #[test]
    fn stored_windows_are_read_with_names_or_iso_day_numbers() {
        let stored = serde_json::json!({"start": "09:00", "end": "20:00", "days": [1, 5, "sat"], "timezone": "UTC"});
        let w = window_of(&stored).unwrap();
        assert_eq!(w.days, vec!["mon", "fri", "sat"]);
        assert_eq!(w.timezone.as_deref(), Some("UTC"));
        assert_eq!(window_of(&Value::Null), None);
        assert_eq!(window_of(&serde_json::json!({"start": "09:00"})), None);
        let w = window("09:00", "20:00", &["mon"], Some("Europe/Berlin"));
        assert_eq!(window_of(&serde_json::to_value(&w).unwrap()), Some(w));
    }

    #[test]
    fn the_cap_allows_until_the_count_is_reached_then_waits_for_the_oldest_to_age_out() {
        let now = utc("2025-07-02T12:00:00Z");
        let c = cap(2, DAY);
        assert_eq!(cap_allows_at(&c, &[], now), now);
        let one = [utc("2025-07-02T08:00:00Z")];
        assert_eq!(cap_allows_at(&c, &one, now), now);
        let two = [utc("2025-07-02T08:00:00Z"), utc("2025-07-01T20:00:00Z")];
        assert_eq!(cap_allows_at(&c, &two, now), utc("2025-07-02T20:00:00Z"));
        // Older than the period: not counted.
        let old = [utc("2025-07-02T08:00:00Z"), utc("2025-07-01T11:00:00Z")];
        assert_eq!(cap_allows_at(&c, &old, now), now);
        // Exactly a period old: no longer counted.
        let edge = [utc("2025-07-02T08:00:00Z"), utc("2025-07-01T12:00:00Z")];
        assert_eq!(cap_allows_at(&c, &edge, now), now);
        // Three within the period under a cap of two: the second oldest must age out.
        let three = [
            utc("2025-07-02T09:00:00Z"),
            utc("2025-07-01T13:00:00Z"),
            utc("2025-07-02T10:00:00Z"),
        ];
        assert_eq!(cap_allows_at(&c, &three, now), utc("2025-07-03T09:00:00Z"));
        // One per hour, with one just now: an hour from now.
        assert_eq!(cap_allows_at(&cap(1, 3600), &[now], now), utc("2025-07-02T13:00:00Z"));
        // Asked about a later moment, the answer is never earlier than it.
        let later = utc("2025-07-05T00:00:00Z");
        assert_eq!(cap_allows_at(&c, &two, later), later);
    }

    #[test]
    fn a_capped_moment_outside_the_window_moves_on_to_the_next_window() {
        let now = utc("2025-07-02T12:00:00Z");
        let w = window("09:00", "17:00", &[], Some("UTC"));
        let sent = [utc("2025-07-02T10:00:00Z")];
        // The cap frees up at 10:00 tomorrow, inside the window.
        assert_eq!(
            earliest_send(now, Some(&w), None, Some(&cap(1, DAY)), &sent),
            (utc("2025-07-03T10:00:00Z"), Some(Why::FrequencyCap))
        );
        // A 40 h period frees up at 02:00 the day after tomorrow, before the window: then its 09:00.
        assert_eq!(
            earliest_send(now, Some(&w), None, Some(&cap(1, 40 * 3600)), &sent),
            (utc("2025-07-04T09:00:00Z"), Some(Why::FrequencyCap))
        );
        // Outside the window, the window is the reason, and the cap is still respected.
        let evening = utc("2025-07-02T18:00:00Z");
        assert_eq!(
            earliest_send(evening, Some(&w), None, Some(&cap(1, DAY)), &sent),
            (utc("2025-07-03T10:00:00Z"), Some(Why::SendWindow))
        );
        assert_eq!(
            earliest_send(evening, Some(&w), None, None, &sent),
            (utc("2025-07-03T09:00:00Z"), Some(Why::SendWindow))
        );
        // Nothing in the way: now.
        assert_eq!(
            earliest_send(now, Some(&w), None, Some(&cap(2, DAY)), &sent),
            (now, None)
        );
        assert_eq!(earliest_send(now, None, None, None, &sent), (now, None));
    }

    #[test]
    fn a_batch_gives_the_free_slots_to_the_earliest_rows_and_defers_the_rest() {
        let now = utc("2025-07-02T12:00:00Z");
        let row = |id, lead_id, window: Option<SendWindow>, tz: Option<&str>| Due {
            id,
            lead_id,
            window,
            lead_tz: tz.map(str::to_string),
        };
        let closed = window("20:00", "22:00", &[], None);
        let due = vec![
            row(1, 10, None, None),
            row(2, 10, None, None),
            row(3, 11, Some(closed.clone()), None),
            row(4, 12, None, None),
            row(5, 12, Some(closed), Some("Asia/Tokyo")),
            row(6, 10, None, None),
        ];
        let mut recent = HashMap::new();
        recent.insert(12, vec![utc("2025-07-02T06:00:00Z")]);
        let plan = plan(now, &due, Some(&cap(1, DAY)), &recent);
        // Lead 10: the first goes, the others wait a period. Lead 11: the window. Lead 12: its slot is taken
        // until 06:00 tomorrow; its windowed row is inside the window now (21:00 in Tokyo) but capped, and at
        // 06:00 UTC (15:00 in Tokyo) the window is closed: it waits for 20:00 in Tokyo, 11:00 UTC.
        assert_eq!(plan.release, vec![1]);
        let tomorrow_noon = utc("2025-07-03T12:00:00Z");
        assert_eq!(
            plan.defer,
            vec![
                Deferral {
                    id: 2,
                    until: tomorrow_noon,
                    why: Why::FrequencyCap
                },
                Deferral {
                    id: 3,
                    until: utc("2025-07-02T20:00:00Z"),
                    why: Why::SendWindow
                },
                Deferral {
                    id: 4,
                    until: utc("2025-07-03T06:00:00Z"),
                    why: Why::FrequencyCap
                },
                Deferral {
                    id: 5,
                    until: utc("2025-07-03T11:00:00Z"),
                    why: Why::FrequencyCap
                },
                Deferral {
                    id: 6,
                    until: tomorrow_noon,
                    why: Why::FrequencyCap
                },
            ]
        );
        // Without a cap, only the window holds anything back (row 5's window is open in Tokyo).
        let free = super::plan(now, &due, None, &recent);
        assert_eq!(free.release, vec![1, 2, 4, 5, 6]);
        assert_eq!(free.defer.iter().map(|d| d.id).collect::<Vec<_>>(), vec![3]);
        // A cap of two lets lead 10's first two go.
        let two = super::plan(now, &due, Some(&cap(2, DAY)), &recent);
        assert_eq!(two.release, vec![1, 2, 4]);
    }

    #[test]
    fn reasons_and_labels_are_fixed() {
        assert_eq!(Why::SendWindow.reason(), "deferred: send window");
        assert_eq!(Why::FrequencyCap.reason(), "deferred: frequency cap");
        assert_eq!(Why::SendWindow.label(), "send_window");
        assert_eq!(Why::FrequencyCap.label(), "frequency_cap");
    }
}
