//! What each phase measured, and the summary: the pipeline's figures as ratios of the ceilings, CPU seconds per
//! 1,000 emails per process and peak memory per service.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::ceilings::AmqpCeiling;
use crate::procs::{Meter, Snapshot};
use crate::stats::{self, Latency};

/// The order processes are listed in.
const GROUPS: [&str; 9] = [
    "ingest",
    "scheduler",
    "renderer",
    "sender",
    "rabbitmq",
    "postgres",
    "postgres (server)",
    "smtp-sink",
    "bench (load)",
];

/// The leadflow services (whose memory is reported).
const SERVICES: [&str; 4] = ["ingest", "scheduler", "renderer", "sender"];

/// One measured stretch of time: how many items went through and what every process spent on them.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub items: u64,
    pub elapsed: Duration,
    /// CPU seconds per process group.
    pub cpu: BTreeMap<String, f64>,
    /// CPU seconds of the whole machine (every process, both cores).
    pub machine: f64,
    /// Peak RSS (kB) per service so far.
    pub peak_rss_kb: BTreeMap<String, u64>,
}

impl Phase {
    pub fn new(name: &str, items: u64, elapsed: Duration, before: &Snapshot, after: &Snapshot, meter: &Meter) -> Self {
        Self {
            name: name.to_string(),
            items,
            elapsed,
            cpu: after.cpu_since(before, meter.ticks_per_second),
            machine: after.machine_busy_since(before, meter.ticks_per_second),
            peak_rss_kb: after.peak_rss_kb(),
        }
    }

    /// Items per second.
    pub fn rate(&self) -> f64 {
        stats::rate(self.items, self.elapsed)
    }

    /// CPU seconds per 1,000 items of a group.
    pub fn per_thousand(&self, group: &str) -> Option<f64> {
        stats::cpu_per_thousand(self.cpu.get(group).copied().unwrap_or(0.0), self.items)
    }

    /// Prints the CPU split (and the services' peak memory) of the phase; `unit` names the items.
    pub fn print_cpu(&self, unit: &str) {
        let ours: f64 = self.cpu.values().sum();
        let mut parts = Vec::new();
        for group in GROUPS {
            let Some(cpu) = self.cpu.get(group).copied() else {
                continue;
            };
            if cpu <= 0.0 {
                continue;
            }
            match self.per_thousand(group) {
                Some(k) => parts.push(format!("{group} {cpu:.2} s ({k:.3} s/1k)")),
                None => parts.push(format!("{group} {cpu:.2} s")),
            }
        }
        let available = self.elapsed.as_secs_f64() * cores();
        if self.items > 0 {
            println!(
                "   cpu over {:.1} s ({} {unit}): {}",
                self.elapsed.as_secs_f64(),
                stats::thousands(self.items),
                parts.join(", ")
            );
        } else {
            println!("   cpu over {:.1} s: {}", self.elapsed.as_secs_f64(), parts.join(", "));
        }
        println!(
            "   whole machine busy {:.1} of {:.1} cpu-s ({}); processes of other work {:.1} cpu-s",
            self.machine,
            available,
            stats::percent(stats::ratio(self.machine, available)),
            (self.machine - ours).max(0.0)
        );
        let rss: Vec<String> = SERVICES
            .iter()
            .filter_map(|s| {
                self.peak_rss_kb
                    .get(*s)
                    .map(|kb| format!("{s} {:.1} MB", *kb as f64 / 1024.0))
            })
            .collect();
        if !rss.is_empty() {
            println!("   peak RSS so far: {}", rss.join(", "));
        }
    }
}

/// Cores of this machine.
pub fn cores() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0)
}

/// One end-to-end step at a fixed offered rate.
#[derive(Debug, Clone)]
pub struct Step {
    pub rate: f64,
    pub duration: Duration,
    pub emails: u64,
    /// Emails per second the sink accepted after the warm-up, while load was offered.
    pub steady: f64,
    /// Time from the end of offering until the last email was accepted.
    pub drain: Duration,
    pub sustained: bool,
    /// From `sent_at - due_at`.
    pub latency: Option<Latency>,
    /// From `sent_at - events.received_at`.
    pub from_event: Option<Latency>,
    pub phase: Phase,
}

/// Everything the run measured.
#[derive(Debug, Default)]
pub struct Report {
    pub amqp: Option<AmqpCeiling>,
    pub smtp: Option<f64>,
    pub claims: Option<f64>,
    pub ingest_http: Option<f64>,
    pub ingest_amqp: Option<f64>,
    pub steps: Vec<Step>,
    pub highest_sustained: Option<f64>,
    pub sustained: Option<Step>,
    pub renderer_alone: Option<f64>,
    pub sender_alone: Option<f64>,
    pub phases: Vec<Phase>,
}

fn rate_or_none(r: Option<f64>) -> String {
    r.map(stats::per_second).unwrap_or_else(|| "not measured".into())
}

fn of(value: Option<f64>, ceiling: Option<f64>, name: &str) -> String {
    match (value, ceiling) {
        (Some(v), Some(c)) => format!("{} of {name}", stats::percent(stats::ratio(v, c))),
        _ => format!("n/a of {name}"),
    }
}

impl Report {
    pub fn print_summary(&self) {
        println!("\n== summary ==");
        let publish = self.amqp.map(|a| a.publish);
        let consume = self.amqp.map(|a| a.consume);
        let hop = self.amqp.map(|a| a.hop);
        println!(
            "ceilings: rabbitmq publish {}, consume {}, one hop {}; smtp-source {}; postgres batched claims {}",
            rate_or_none(publish),
            rate_or_none(consume),
            rate_or_none(hop),
            rate_or_none(self.smtp),
            rate_or_none(self.claims)
        );
        println!(
            "ingest HTTP (500-event batches): {} = {}",
            rate_or_none(self.ingest_http),
            of(self.ingest_http, self.claims, "the postgres claim ceiling (rows/s)")
        );
        println!(
            "ingest AMQP: {} = {}",
            rate_or_none(self.ingest_amqp),
            of(self.ingest_amqp, publish, "the rabbitmq publish ceiling")
        );
        for s in &self.steps {
            self.print_step("ladder", s);
        }
        match self.highest_sustained {
            Some(r) => println!("highest sustained offered rate of the ladder: {}", stats::per_second(r)),
            None => println!("highest sustained offered rate of the ladder: none of the rates tried"),
        }
        if let Some(s) = &self.sustained {
            self.print_step("sustained run", s);
        }
        println!(
            "renderer alone: {} = {}, {}",
            rate_or_none(self.renderer_alone),
            of(self.renderer_alone, consume, "the rabbitmq consume ceiling"),
            of(self.renderer_alone, self.claims, "the postgres claim ceiling")
        );
        println!(
            "sender alone: {} = {}",
            rate_or_none(self.sender_alone),
            of(self.sender_alone, self.smtp, "smtp-source")
        );
        let reference = self
            .sustained
            .as_ref()
            .or_else(|| self.steps.iter().rev().find(|s| s.sustained))
            .or(self.steps.first());
        if let Some(s) = reference {
            println!(
                "CPU seconds per 1,000 emails at {} offered ({} emails, whole pipeline):",
                stats::per_second(s.rate),
                stats::thousands(s.emails)
            );
            for group in GROUPS {
                if let Some(k) = s.phase.per_thousand(group).filter(|k| *k > 0.0) {
                    println!("   {group:<14} {k:.3}");
                }
            }
        }
        for p in &self.phases {
            let groups: Vec<String> = GROUPS
                .iter()
                .filter_map(|g| p.per_thousand(g).filter(|k| *k > 0.0).map(|k| format!("{g} {k:.3}")))
                .collect();
            println!("CPU s per 1,000 items, {}: {}", p.name, groups.join(", "));
        }
        let last = self
            .phases
            .iter()
            .map(|p| &p.peak_rss_kb)
            .chain(self.steps.iter().map(|s| &s.phase.peak_rss_kb))
            .chain(self.sustained.iter().map(|s| &s.phase.peak_rss_kb));
        let mut peak: BTreeMap<&str, u64> = BTreeMap::new();
        for map in last {
            for service in SERVICES {
                if let Some(kb) = map.get(service) {
                    let e = peak.entry(service).or_default();
                    *e = (*e).max(*kb);
                }
            }
        }
        let rss: Vec<String> = SERVICES
            .iter()
            .filter_map(|s| peak.get(s).map(|kb| format!("{s} {:.1} MB", *kb as f64 / 1024.0)))
            .collect();
        println!("peak RSS per service over the run: {}", rss.join(", "));
    }

    fn print_step(&self, what: &str, s: &Step) {
        let short = |l: Option<Latency>| {
            l.map(|l| format!("p50 {:.0} / p99 {:.0} / p99.9 {:.0} ms", l.p50, l.p99, l.p999))
                .unwrap_or_else(|| "none".into())
        };
        let latency = format!("due_at->250 {}, event->250 {}", short(s.latency), short(s.from_event));
        println!(
            "{what} {} offered for {:.0} s: steady {} ({}, {}), backlog cleared {:.1} s after, {latency}, {}",
            stats::per_second(s.rate),
            s.duration.as_secs_f64(),
            stats::per_second(s.steady),
            of(Some(s.steady), self.smtp, "smtp-source"),
            of(Some(s.steady), self.amqp.map(|a| a.hop), "one rabbitmq hop"),
            s.drain.as_secs_f64(),
            if s.sustained { "sustained" } else { "NOT sustained" }
        );
    }
}
