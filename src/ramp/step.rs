//! One step of a ramp: what it measured over its window (rates, percentiles, delivery, the
//! generator's own evidence, the backend's streams), how it is judged against the SLOs, and how
//! it reads. Pure: the ramp hands in the statuses at the window's two ends and what it saw in
//! between.

use super::{GeneratorEvidence, GeneratorVerdict, HostUse};
use crate::backlog;
use crate::metrics::Latency;
use crate::wire::pb;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// A step also fails when the backend accepted less than this share of the expected rate.
pub const MIN_THROUGHPUT_SHARE: f64 = 0.95;

/// One step's measurements over its window.
pub struct Step {
    pub vehicles: u64,
    /// A step of the search for the knee, not one of --steps.
    pub search: bool,
    pub measured_s: f64,
    pub expected_rate: f64,
    pub achieved_rate: f64,
    pub accepted_rate: f64,
    pub success: f64,
    /// Percentiles of the window's answers; None when nothing succeeded (a latency of
    /// failures only would read as a recovery).
    pub latency: Option<[f64; 4]>,
    /// Percentiles of the window's delays (scheduled time to answer), on the same terms.
    pub delay: Option<[f64; 4]>,
    /// Store-and-forward over the window: resent, dropped from full buffers, buffered at its
    /// end.
    pub retried: u64,
    pub buffer_dropped: u64,
    pub buffered: u64,
    pub dropped: u64,
    pub dropped_busy: u64,
    pub max_lag_ms: f64,
    /// Failed requests by cause: `timeout`, `connect`, `http_503`...
    pub causes: BTreeMap<String, u64>,
    /// Of the timeouts: answered 200 later after all.
    pub late_accepted: u64,
    pub peak_connections: u64,
    pub hosts: Vec<HostUse>,
    pub generator: GeneratorVerdict,
    pub failures: Vec<String>,
    /// What failed, as words a script can match: success, p95, delay, throughput, backlog, lost.
    pub failed_as: Vec<&'static str>,
    /// The backend's Redis over the measured window (with --redis).
    pub pipeline: Option<backlog::Window>,
}

impl Step {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn limiting_side(&self) -> &'static str {
        super::limiting_side(self.passed(), self.generator.healthy, &self.failed_as)
    }

    pub fn outcome(&self) -> super::StepOutcome {
        super::StepOutcome {
            vehicles: self.vehicles,
            passed: self.passed(),
            generator_healthy: self.generator.healthy,
            failed_as: self.failed_as.clone(),
            accepted_msgs_per_s: self.accepted_rate,
            slowest_group_msgs_per_s: self.pipeline.as_ref().and_then(|w| w.slowest_msgs_per_s),
        }
    }

    pub fn p95(&self) -> Option<f64> {
        self.latency.map(|l| l[1])
    }

    pub fn delay_p95(&self) -> Option<f64> {
        self.delay.map(|l| l[1])
    }

    pub fn json(&self, interval: f64) -> Value {
        let o = self.outcome();
        json!({
            "vehicles": self.vehicles,
            "search": self.search,
            "measured_s": self.measured_s,
            "expected_msgs_per_s": self.expected_rate,
            "achieved_msgs_per_s": self.achieved_rate,
            "accepted_msgs_per_s": self.accepted_rate,
            "success_percent": self.success,
            "latency_ms": self.latency.map(|[p50, p95, p99, max]| json!({"p50": p50, "p95": p95, "p99": p99, "max": max})),
            "delay_ms": self.delay.map(|[p50, p95, p99, max]| json!({"p50": p50, "p95": p95, "p99": p99, "max": max})),
            "retried": self.retried,
            "buffer_dropped": self.buffer_dropped,
            "buffered_at_end": self.buffered,
            "failures_by_cause": self.causes,
            "late_accepted": self.late_accepted,
            "dropped_ticks": self.dropped,
            "dropped_ticks_busy": self.dropped_busy,
            "max_lag_ms": self.max_lag_ms,
            "peak_connections": self.peak_connections,
            "agents": self.hosts,
            "verdict": if self.passed() { "pass" } else { "fail" },
            "failed_on": self.failures,
            "failed_as": self.failed_as,
            "generator_healthy": self.generator.healthy,
            "generator": self.generator,
            "host_shared": self.generator.host_shared,
            "limiting_side": self.limiting_side(),
            "ingest_limit_vehicles": o.ingest_limit_vehicles(interval),
            "diagnosis_limit_vehicles": o.diagnosis_limit_vehicles(interval),
            "backend_pipeline": self.pipeline,
        })
    }

    /// One line for the terminal.
    pub fn line(&self) -> String {
        format!(
            "{}: {:.0}/{:.0} msg/s accepted, {:.2}% ok, p95 {}{}{}{}",
            if self.passed() { "pass" } else { "FAIL" },
            self.accepted_rate,
            self.expected_rate,
            self.success,
            self.p95()
                .map_or_else(|| "-".to_string(), |p| format!("{p:.1} ms")),
            self.delay_p95()
                .map_or_else(String::new, |p| format!(", delay p95 {p:.1} ms")),
            if self.failures.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.failures.join("; "))
            },
            if self.generator.healthy {
                String::new()
            } else {
                format!(" [generator: {}]", self.generator.reasons.join("; "))
            }
        )
    }
}

/// The SLOs a step is judged by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slo {
    /// Percent of answers that must be 200.
    pub min_success: f64,
    /// The latency (service time) p95 bound, ms.
    pub max_p95_ms: f64,
    /// The delay (scheduled time to answer) p95 bound, ms; None: not judged.
    pub max_delay_p95_ms: Option<f64>,
}

/// What a ramp saw while a step's window ran: the highest use of each agent's host, the peak
/// of connections and the worst schedule lag.
#[derive(Debug, Clone, Default)]
pub struct Tracked {
    hosts: BTreeMap<String, HostUse>,
    pub peak_connections: u64,
    pub max_lag_ms: f64,
}

impl Tracked {
    /// A status inside the window, while the run ran.
    pub fn see(&mut self, s: &pb::RunStatus) {
        track_hosts(&mut self.hosts, s);
        self.peak_connections = self.peak_connections.max(connections(s));
        let lag = s.totals.as_ref().map_or(0.0, |t| t.max_lag_ms);
        self.max_lag_ms = self.max_lag_ms.max(lag);
    }
}

/// Where a step is measured and for what: its fleet, whether it is a search step, the interval
/// and the planned length of its window.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub vehicles: u64,
    pub search: bool,
    pub interval_s: f64,
    pub measured_s: f64,
}

/// The step measured between the statuses `start` and `end`, not judged yet.
pub fn measure(
    plan: Plan,
    start: &pb::RunStatus,
    end: &pb::RunStatus,
    tracked: Tracked,
) -> Result<Step, String> {
    let (t0, t1) = (
        start.totals.clone().unwrap_or_default(),
        end.totals.clone().unwrap_or_default(),
    );
    let window = window_s(&t0, &t1, start, end, plan.measured_s);
    let done = (t1.accepted + t1.failed).saturating_sub(t0.accepted + t0.failed);
    let accepted = t1.accepted.saturating_sub(t0.accepted);
    let window_of = |later: &[u8], earlier: &[u8]| {
        Latency::from_bytes(later).and_then(|l| l.since(&Latency::from_bytes(earlier)?))
    };
    let lat =
        window_of(&t1.latency_hdr, &t0.latency_hdr).map_err(|e| format!("latency window: {e}"))?;
    let delay =
        window_of(&t1.delay_hdr, &t0.delay_hdr).map_err(|e| format!("delay window: {e}"))?;
    let quantiles = |l: &Latency| {
        (accepted > 0 && l.count() > 0).then(|| {
            [
                l.quantile_ms(0.5),
                l.quantile_ms(0.95),
                l.quantile_ms(0.99),
                l.max_ms(),
            ]
        })
    };
    let dropped = t1.dropped.saturating_sub(t0.dropped);
    let dropped_busy = t1.dropped_busy.saturating_sub(t0.dropped_busy);
    let hosts: Vec<HostUse> = tracked.hosts.into_values().collect();
    let generator = super::judge_generator(&GeneratorEvidence {
        interval_s: plan.interval_s,
        late_ticks: dropped.saturating_sub(dropped_busy),
        max_lag_s: tracked.max_lag_ms / 1e3,
        hosts: hosts.clone(),
    });
    Ok(Step {
        vehicles: plan.vehicles,
        search: plan.search,
        measured_s: window,
        expected_rate: plan.vehicles as f64 / plan.interval_s,
        achieved_rate: done as f64 / window,
        accepted_rate: accepted as f64 / window,
        success: if done == 0 {
            0.0
        } else {
            accepted as f64 * 100.0 / done as f64
        },
        latency: quantiles(&lat),
        delay: quantiles(&delay),
        retried: t1.retried.saturating_sub(t0.retried),
        buffer_dropped: t1.buffer_dropped.saturating_sub(t0.buffer_dropped),
        buffered: t1.buffered,
        dropped,
        dropped_busy,
        max_lag_ms: tracked.max_lag_ms,
        causes: causes(&t0, &t1),
        late_accepted: t1.late_accepted.saturating_sub(t0.late_accepted),
        peak_connections: tracked.peak_connections,
        hosts,
        generator,
        failures: Vec::new(),
        failed_as: Vec::new(),
        pipeline: None,
    })
}

/// The window's length by the counters' own clock (the simulators' elapsed time when they
/// were sampled): statuses come every half second but counters move once a heartbeat, so two
/// statuses a second apart can hold zero or two heartbeats' worth of messages, and a final
/// status that comes late (a busy host) would add time in which nothing was sent. Without that
/// clock, the statuses' own times, bounded by the planned window.
fn window_s(
    t0: &pb::Counters,
    t1: &pb::Counters,
    start: &pb::RunStatus,
    end: &pb::RunStatus,
    measured_s: f64,
) -> f64 {
    let sampled = t1.elapsed_s - t0.elapsed_s;
    if sampled >= 0.5 {
        return sampled;
    }
    (end.elapsed_s - start.elapsed_s)
        .max(0.001)
        .min(measured_s + 1.0)
        .max(1.0)
}

/// Judges the step's HTTP side against `slo`: success, latency p95, delay p95, throughput.
pub fn judge(step: &mut Step, slo: &Slo) {
    if step.success < slo.min_success {
        step.failures.push(format!(
            "success {:.2}% < {}%",
            step.success, slo.min_success
        ));
        step.failed_as.push("success");
    }
    if let Some(p95) = step.p95().filter(|p| *p > slo.max_p95_ms) {
        step.failures
            .push(format!("p95 {p95:.1} ms > {} ms", slo.max_p95_ms));
        step.failed_as.push("p95");
    }
    if let Some(max) = slo.max_delay_p95_ms {
        if let Some(p95) = step.delay_p95().filter(|p| *p > max) {
            step.failures
                .push(format!("delay p95 {p95:.1} ms > {max} ms"));
            step.failed_as.push("delay");
        }
    }
    if step.accepted_rate < step.expected_rate * MIN_THROUGHPUT_SHARE {
        step.failures.push(format!(
            "accepted {:.0}/s < {:.0}% of {:.0}/s",
            step.accepted_rate,
            MIN_THROUGHPUT_SHARE * 100.0,
            step.expected_rate
        ));
        step.failed_as.push("throughput");
    }
}

/// Judges the diagnosis side on the backend's streams over the window: a live group whose
/// backlog grew is behind, one whose unread entries MAXLEN trimmed lost them.
pub fn judge_pipeline(step: &mut Step, pipeline: Option<backlog::Window>) {
    if let Some(w) = &pipeline {
        let rate = |r: Option<f64>| r.map_or_else(|| "?".into(), |r| format!("{r:.1}"));
        for g in w.behind() {
            step.failures.push(format!(
                "backlog: {} processed {}/s of {}/s ingested, its backlog growing {:.1}/s",
                g.name,
                rate(g.processed_msgs_per_s),
                rate(w.ingest_msgs_per_s),
                g.backlog_slope_per_s.unwrap_or(0.0),
            ));
        }
        if !w.falling_behind.is_empty() {
            step.failed_as.push("backlog");
        }
        for g in w.lost() {
            step.failures.push(format!(
                "lost: MAXLEN trimmed {} messages before {} read them (it processed {}/s)",
                g.trimmed_unread_in_window.unwrap_or(0),
                g.name,
                rate(g.processed_msgs_per_s),
            ));
        }
        if !w.losing.is_empty() {
            step.failed_as.push("lost");
        }
    }
    step.pipeline = pipeline;
}

/// The highest use each agent's host showed during the window.
fn track_hosts(hosts: &mut BTreeMap<String, HostUse>, s: &pb::RunStatus) {
    for ag in &s.agents {
        let u = ag.usage.unwrap_or_default();
        let e = hosts.entry(ag.agent.clone()).or_insert_with(|| HostUse {
            name: ag.agent.clone(),
            ..Default::default()
        });
        e.cores = e.cores.max(u.cores);
        e.host_cpu_percent = e.host_cpu_percent.max(u.cpu_percent);
        e.simulators_cpu_percent = match (e.simulators_cpu_percent, u.simulators_cpu_percent) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        e.rss_bytes = e.rss_bytes.max(u.rss_bytes);
    }
}

/// Connections the run's simulators hold now: the sum over running instances.
fn connections(s: &pb::RunStatus) -> u64 {
    s.agents
        .iter()
        .flat_map(|a| &a.instances)
        .filter(|i| i.phase == pb::Phase::Running as i32)
        .filter_map(|i| i.counters.as_ref())
        .map(|c| c.connections)
        .sum()
}

/// Failed requests by cause between two totals.
fn causes(t0: &pb::Counters, t1: &pb::Counters) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut put = |k: String, v: u64| {
        if v > 0 {
            out.insert(k, v);
        }
    };
    put("timeout".into(), t1.timeouts.saturating_sub(t0.timeouts));
    put(
        "connect".into(),
        t1.connect_errors.saturating_sub(t0.connect_errors),
    );
    put(
        "protocol".into(),
        t1.protocol_errors.saturating_sub(t0.protocol_errors),
    );
    put("tls".into(), t1.tls_errors.saturating_sub(t0.tls_errors));
    for (code, n) in &t1.status {
        let before = t0.status.get(code).copied().unwrap_or(0);
        put(format!("http_{code}"), n.saturating_sub(before));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_by_cause_are_differences_per_status() {
        let t0 = pb::Counters {
            timeouts: 2,
            status: [(503, 5)].into_iter().collect(),
            ..Default::default()
        };
        let t1 = pb::Counters {
            timeouts: 7,
            connect_errors: 1,
            status: [(503, 9), (500, 2)].into_iter().collect(),
            ..Default::default()
        };
        let c = causes(&t0, &t1);
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            [
                ("connect".to_string(), 1),
                ("http_500".to_string(), 2),
                ("http_503".to_string(), 4),
                ("timeout".to_string(), 5)
            ]
        );
    }
}
