//! CPU time and resident memory per process, read from `/proc/<pid>/stat` and `/proc/<pid>/status`.
//!
//! A background sampler reads every tracked process twice a second and keeps the latest CPU time and the highest
//! peak RSS (`VmHWM`) it saw per process, so a process that exits between two phase marks still counts up to its
//! last sample. A phase's cost is the difference between two [`Snapshot`]s.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux unless told otherwise).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process in clock ticks; `None` when it is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&stat)
}

/// utime + stime from the text of `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15 (1-based over the whole line).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Peak resident set size (`VmHWM`) in kB; `None` when the process is gone.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kb(&status, "VmHWM:")
}

fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Busy clock ticks of all cores since boot: the first line of `/proc/stat` less idle and iowait.
pub fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy(stat.lines().next()?)
}

fn parse_machine_busy(line: &str) -> Option<u64> {
    let fields: Vec<u64> = line
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    if fields.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal
    Some(fields.iter().sum::<u64>() - fields[3] - fields[4])
}

/// Every pid whose command name (`/proc/<pid>/comm`) is `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == name)
                .unwrap_or(false)
        })
        .collect()
}

/// The latest reading of every process the sampler has seen, by group (`sender`, `postgres`, ...) and pid.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    ticks: HashMap<(String, u32), u64>,
    peak_kb: HashMap<(String, u32), u64>,
    /// Busy time of the whole machine (every process, every core), in clock ticks.
    machine_busy: u64,
}

impl Snapshot {
    /// CPU seconds each group used between `earlier` and `self`. A pid first seen after `earlier` counts from zero
    /// (it was started during the phase).
    pub fn cpu_since(&self, earlier: &Snapshot, ticks_per_second: f64) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = BTreeMap::new();
        for (key, now) in &self.ticks {
            let before = earlier.ticks.get(key).copied().unwrap_or(0);
            *out.entry(key.0.clone()).or_default() += now.saturating_sub(before) as f64 / ticks_per_second;
        }
        out
    }

    /// CPU seconds the whole machine was busy between `earlier` and `self` (all cores together).
    pub fn machine_busy_since(&self, earlier: &Snapshot, ticks_per_second: f64) -> f64 {
        self.machine_busy.saturating_sub(earlier.machine_busy) as f64 / ticks_per_second
    }

    /// The highest peak RSS (kB) of any process of each group seen so far.
    pub fn peak_rss_kb(&self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for ((group, _), kb) in &self.peak_kb {
            let e = out.entry(group.clone()).or_default();
            *e = (*e).max(*kb);
        }
        out
    }
}

/// Which processes a group is made of, resolved at every sample.
#[derive(Debug, Clone)]
pub enum Members {
    /// Fixed pids (a service process we started; replaced when it is restarted).
    Pids(Vec<u32>),
    /// Every process with this command name (`beam.smp`).
    Named(String),
    /// PostgreSQL processes serving the benchmark's database, plus the server's background processes; the pids come
    /// from the bench's own query of `pg_stat_activity`.
    External(Vec<u32>),
}

#[derive(Default)]
struct State {
    groups: BTreeMap<String, Members>,
    latest: Snapshot,
}

/// Samples the tracked processes twice a second until dropped.
#[derive(Clone)]
pub struct Meter {
    state: Arc<Mutex<State>>,
    pub ticks_per_second: f64,
}

impl Meter {
    pub fn start() -> Self {
        let meter = Self {
            state: Arc::new(Mutex::new(State::default())),
            ticks_per_second: clock_ticks(),
        };
        let weak = Arc::downgrade(&meter.state);
        tokio::spawn(async move {
            loop {
                let Some(state) = weak.upgrade() else { return };
                Meter::sample_into(&state);
                drop(state);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        meter
    }

    /// Sets (or replaces) the members of a group.
    pub fn track(&self, group: &str, members: Members) {
        if let Ok(mut state) = self.state.lock() {
            state.groups.insert(group.to_string(), members);
        }
        Meter::sample_into(&self.state);
    }

    /// Samples now and returns every reading so far.
    pub fn snapshot(&self) -> Snapshot {
        Meter::sample_into(&self.state);
        let mut snapshot = self.state.lock().map(|s| s.latest.clone()).unwrap_or_default();
        snapshot.machine_busy = machine_busy_ticks().unwrap_or(0);
        snapshot
    }

    fn sample_into(state: &Mutex<State>) {
        let Ok(mut state) = state.lock() else { return };
        let groups: Vec<(String, Members)> = state.groups.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (group, members) in groups {
            let pids = match members {
                Members::Pids(p) | Members::External(p) => p,
                Members::Named(name) => pids_named(&name),
            };
            for pid in pids {
                let key = (group.clone(), pid);
                if let Some(t) = cpu_ticks(pid) {
                    let e = state.latest.ticks.entry(key.clone()).or_default();
                    *e = (*e).max(t);
                }
                if let Some(kb) = peak_rss_kb(pid) {
                    let e = state.latest.peak_kb.entry(key).or_default();
                    *e = (*e).max(kb);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "1234 (tokio (rt) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 8 0 5000 1000 200";
        assert_eq!(parse_stat_ticks(line), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
        let status = "Name:\tleadflow\nVmHWM:\t   40960 kB\nVmRSS:\t   30000 kB\n";
        assert_eq!(parse_status_kb(status, "VmHWM:"), Some(40960));
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        assert_eq!(parse_machine_busy("cpu  100 5 50 1000 20 3 2 0 0 0"), Some(160));
        assert_eq!(parse_machine_busy("cpu0 1 2 3 4 5"), None);
        assert!(machine_busy_ticks().is_some());
    }

    #[test]
    fn cpu_is_the_difference_per_group() {
        let mut a = Snapshot::default();
        a.ticks.insert(("pg".into(), 1), 100);
        let mut b = a.clone();
        b.ticks.insert(("pg".into(), 1), 150);
        b.ticks.insert(("pg".into(), 2), 30);
        b.ticks.insert(("sender".into(), 9), 200);
        let cpu = b.cpu_since(&a, 100.0);
        assert_eq!(cpu.get("pg"), Some(&0.8));
        assert_eq!(cpu.get("sender"), Some(&2.0));
    }

    #[test]
    fn this_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        assert!(peak_rss_kb(pid).unwrap_or(0) > 0);
    }
}
