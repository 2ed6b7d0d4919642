//! The ramp's judgements, as pure functions of what a step measured: whether the generator
//! kept its schedule (on its own evidence, never the host's total), which side of the backend
//! gave out (the ingest API or the diagnosis behind it), the search for the knee between the
//! last passing and the first failing fleet, and the reference report's keys.

pub mod report;
pub mod step;

use serde::Serialize;

/// Ticks later than this share of the interval (and never more than [`MAX_LAG_S`]) mean the
/// generator could not keep its schedule.
pub const MAX_LAG_SHARE: f64 = 0.5;
/// The lag bound never exceeds this, whatever the interval.
pub const MAX_LAG_S: f64 = 0.25;
/// Simulators using this much of their host's CPU are short of it.
pub const SIM_CPU_LIMIT: f64 = 80.0;
/// A host whose CPU use exceeds its simulators' own by this many points runs other load too.
pub const SHARED_HOST_POINTS: f64 = 25.0;
/// Without the simulators' own CPU (an older agent), the host's total is all there is.
pub const HOST_CPU_LIMIT: f64 = 80.0;
/// Recommended load as a share of the measured limit, as in the reference tool.
pub const RECOMMENDED_SHARE: f64 = 0.75;

/// The schedule lag beyond which the generator counts as late, in seconds.
pub fn lag_bound_s(interval_s: f64) -> f64 {
    (interval_s * MAX_LAG_SHARE).min(MAX_LAG_S)
}

/// What one agent's host did during a step (the highest values seen in the window).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HostUse {
    pub name: String,
    pub cores: u32,
    /// The whole host, 0..100.
    pub host_cpu_percent: f64,
    /// The agent's simulator processes alone, 0..100 of the host (None: an older agent).
    pub simulators_cpu_percent: Option<f64>,
    pub rss_bytes: u64,
}

/// The generator's own evidence over a step's window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeneratorEvidence {
    pub interval_s: f64,
    /// Ticks dropped because the generator reached them more than an interval late (not those
    /// dropped because every connection waited on a slow target).
    pub late_ticks: u64,
    /// The worst lateness of a tick behind its schedule, seconds.
    pub max_lag_s: f64,
    pub hosts: Vec<HostUse>,
}

/// Whether the generator's numbers can be trusted, and why not.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GeneratorVerdict {
    pub healthy: bool,
    /// Why it was not, in words.
    pub reasons: Vec<String>,
    /// Some host ran other load besides vtox's simulators (the backend itself, say). Reported,
    /// never held against the generator.
    pub host_shared: bool,
    /// The hosts that did, with how much of their CPU went to other processes.
    pub shared_hosts: Vec<String>,
}

/// Judges the generator on its own evidence: late ticks, schedule lag beyond a bound, or its
/// simulators' CPU near all of their hosts' cores.
pub fn judge_generator(e: &GeneratorEvidence) -> GeneratorVerdict {
    let mut v = GeneratorVerdict {
        healthy: true,
        ..Default::default()
    };
    if e.late_ticks > 0 {
        v.reasons.push(format!(
            "{} ticks were reached more than an interval late",
            e.late_ticks
        ));
    }
    let bound = lag_bound_s(e.interval_s);
    if e.max_lag_s > bound {
        v.reasons.push(format!(
            "ticks ran up to {:.0} ms behind schedule (bound {:.0} ms)",
            e.max_lag_s * 1e3,
            bound * 1e3
        ));
    }
    for h in &e.hosts {
        match h.simulators_cpu_percent {
            Some(sim) => {
                if sim >= SIM_CPU_LIMIT {
                    v.reasons.push(format!(
                        "the simulators on {} used {sim:.0}% of its {} cores",
                        h.name, h.cores
                    ));
                }
                let other = h.host_cpu_percent - sim;
                if other >= SHARED_HOST_POINTS {
                    v.host_shared = true;
                    v.shared_hosts.push(format!(
                        "{}: host CPU {:.0}%, of which vtox's simulators {sim:.0}%",
                        h.name, h.host_cpu_percent
                    ));
                }
            }
            None if h.host_cpu_percent >= HOST_CPU_LIMIT => v.reasons.push(format!(
                "{} was at {:.0}% CPU (its agent does not report its simulators' own use)",
                h.name, h.host_cpu_percent
            )),
            None => {}
        }
    }
    v.healthy = v.reasons.is_empty();
    v
}

/// What a step failed on, as words a script can match.
pub const FAILED_AS_HTTP: [&str; 4] = ["success", "p95", "delay", "throughput"];
pub const FAILED_AS_DIAGNOSIS: [&str; 2] = ["backlog", "lost"];

/// The side that limited a step.
pub fn limiting_side(passed: bool, generator_healthy: bool, failed_as: &[&str]) -> &'static str {
    if passed {
        "none"
    } else if !generator_healthy {
        "generator"
    } else if failed_as.iter().any(|f| FAILED_AS_HTTP.contains(f)) {
        "ingest"
    } else {
        "diagnosis"
    }
}

/// Bisection between the largest passing fleet and the smallest failing one.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    /// The largest fleet known to pass (0 when none did).
    pub passing: u64,
    /// The smallest fleet known to fail.
    pub failing: u64,
    /// The search ends when the gap is at most this share of the failing fleet.
    pub resolution: f64,
}

impl Search {
    /// A search below `failing`, above `passing`.
    pub fn new(passing: u64, failing: u64, resolution: f64) -> Search {
        Search {
            passing: passing.min(failing),
            failing,
            resolution: resolution.clamp(0.0, 1.0),
        }
    }

    /// The next fleet to try, or None when the knee is found within the resolution.
    pub fn next(&self) -> Option<u64> {
        let gap = self.failing.saturating_sub(self.passing);
        let enough = ((self.failing as f64 * self.resolution).floor() as u64).max(1);
        if gap <= enough {
            return None;
        }
        Some(self.passing + gap / 2)
    }

    /// Takes the verdict of a fleet tried.
    pub fn record(&mut self, vehicles: u64, passed: bool) {
        if passed {
            self.passing = self.passing.max(vehicles.min(self.failing));
        } else {
            self.failing = self.failing.min(vehicles.max(self.passing));
        }
    }
}

/// A step as the report's rules see it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutcome {
    pub vehicles: u64,
    pub passed: bool,
    pub generator_healthy: bool,
    pub failed_as: Vec<&'static str>,
    pub accepted_msgs_per_s: f64,
    /// The slowest live consumer group's processing rate (with --redis).
    pub slowest_group_msgs_per_s: Option<f64>,
}

impl StepOutcome {
    pub fn failed_on_http(&self) -> bool {
        self.failed_as.iter().any(|f| FAILED_AS_HTTP.contains(f))
    }

    pub fn failed_on_diagnosis(&self) -> bool {
        self.failed_as
            .iter()
            .any(|f| FAILED_AS_DIAGNOSIS.contains(f))
    }

    /// What this step's ingest served, in vehicles at `interval_s`, when it failed on HTTP.
    pub fn ingest_limit_vehicles(&self, interval_s: f64) -> Option<u64> {
        self.failed_on_http()
            .then(|| (self.accepted_msgs_per_s * interval_s).floor() as u64)
    }

    /// What the slowest live group processed, in vehicles at `interval_s`, when the step failed
    /// on backlog or loss.
    pub fn diagnosis_limit_vehicles(&self, interval_s: f64) -> Option<u64> {
        if !self.failed_on_diagnosis() {
            return None;
        }
        Some((self.slowest_group_msgs_per_s? * interval_s).floor() as u64)
    }
}

/// A limit of one side of the backend, in vehicles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SideLimit {
    pub vehicles: u64,
    /// True when a step failed on this side and the limit is what it served; false when no
    /// step failed there and the limit is only the largest fleet that side carried.
    pub measured: bool,
}

/// The report's reference keys and the limits they come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    pub max_successful_vehicles: u64,
    pub ingest: Option<SideLimit>,
    pub diagnosis: Option<SideLimit>,
    pub estimated_system_limit: u64,
    pub recommended_max_vehicles: u64,
    /// "ingest", "diagnosis", "generator" or "none": what gave out first.
    pub limited_by: &'static str,
}

/// A side's limit: what the smallest fleet failing on it served (read off by `served`), but
/// never less than the largest fleet that side carried; without a failure, that largest fleet.
fn side_limit(
    steps: &[StepOutcome],
    failed: impl Fn(&StepOutcome) -> bool,
    served: impl Fn(&StepOutcome) -> Option<u64>,
) -> Option<SideLimit> {
    let carried = steps
        .iter()
        .filter(|s| s.generator_healthy && !failed(s))
        .map(|s| s.vehicles)
        .max();
    let first_fail = steps
        .iter()
        .filter(|s| s.generator_healthy && failed(s))
        .min_by_key(|s| s.vehicles);
    match first_fail.and_then(served) {
        Some(v) => Some(SideLimit {
            vehicles: v.max(carried.unwrap_or(0)),
            measured: true,
        }),
        None => carried.map(|v| SideLimit {
            vehicles: v,
            measured: false,
        }),
    }
}

/// The reference keys, by the rules the README states:
/// - `max_successful_vehicles`: the largest fleet (planned or search step) that met every SLO.
/// - the ingest limit: accepted msg/s × interval of the smallest fleet that failed on HTTP
///   (success, p95, throughput), at least the largest fleet whose HTTP side passed.
/// - the diagnosis limit: the slowest live group's processing msg/s × interval of the smallest
///   fleet that failed on backlog or loss, at least the largest fleet whose diagnosis kept up.
/// - `estimated_system_limit`: the smaller of the measured limits (at least
///   `max_successful_vehicles`); with none measured, `max_successful_vehicles` (a lower bound).
/// - `recommended_max_vehicles`: 75 % of `max_successful_vehicles`, or, when no fleet passed,
///   75 % of the estimated limit.
///
/// Steps with an unhealthy generator say nothing about the backend and are left out of the
/// limits.
pub fn limits(steps: &[StepOutcome], interval_s: f64) -> Limits {
    let max_ok = steps
        .iter()
        .filter(|s| s.passed)
        .map(|s| s.vehicles)
        .max()
        .unwrap_or(0);
    let ingest = side_limit(steps, StepOutcome::failed_on_http, |s| {
        s.ingest_limit_vehicles(interval_s)
    });
    let diagnosis = side_limit(steps, StepOutcome::failed_on_diagnosis, |s| {
        s.diagnosis_limit_vehicles(interval_s)
    });
    let measured: Vec<(u64, &'static str)> = [(ingest, "ingest"), (diagnosis, "diagnosis")]
        .into_iter()
        .filter_map(|(l, side)| l.filter(|l| l.measured).map(|l| (l.vehicles, side)))
        .collect();
    let smallest = measured.iter().min_by_key(|(v, _)| *v).copied();
    let generator_limited = steps.iter().any(|s| !s.passed && !s.generator_healthy);
    let limited_by = match smallest {
        Some((_, side)) => side,
        None if generator_limited => "generator",
        None => "none",
    };
    let estimated = smallest.map_or(max_ok, |(v, _)| v.max(max_ok));
    let base = if max_ok > 0 { max_ok } else { estimated };
    Limits {
        max_successful_vehicles: max_ok,
        ingest,
        diagnosis,
        estimated_system_limit: estimated,
        recommended_max_vehicles: (base as f64 * RECOMMENDED_SHARE).floor() as u64,
        limited_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(host_cpu: f64, sims: Option<f64>) -> HostUse {
        HostUse {
            name: "a".into(),
            cores: 2,
            host_cpu_percent: host_cpu,
            simulators_cpu_percent: sims,
            rss_bytes: 0,
        }
    }

    fn evidence(hosts: Vec<HostUse>) -> GeneratorEvidence {
        GeneratorEvidence {
            interval_s: 1.2,
            late_ticks: 0,
            max_lag_s: 0.006,
            hosts,
        }
    }

    #[test]
    fn a_busy_host_is_shared_not_a_generator_limit() {
        // The backend and its consumers keep the host at 97 %; the simulators use 6 %.
        let v = judge_generator(&evidence(vec![host(97.0, Some(6.0))]));
        assert!(v.healthy, "{v:?}");
        assert!(v.host_shared);
        assert!(v.shared_hosts[0].contains("97%"), "{v:?}");
        // A host doing nothing else is not shared.
        let v = judge_generator(&evidence(vec![host(20.0, Some(15.0))]));
        assert!(v.healthy && !v.host_shared);
    }

    #[test]
    fn the_generator_is_judged_on_its_own_evidence() {
        let mut e = evidence(vec![host(90.0, Some(85.0))]);
        let v = judge_generator(&e);
        assert!(!v.healthy);
        assert!(v.reasons[0].contains("simulators on a used 85%"), "{v:?}");
        e.hosts = vec![host(30.0, Some(20.0))];
        e.late_ticks = 3;
        assert!(!judge_generator(&e).healthy);
        e.late_ticks = 0;
        e.max_lag_s = 0.3;
        let v = judge_generator(&e);
        assert!(!v.healthy && v.reasons[0].contains("250 ms"), "{v:?}");
        // At a short interval the bound is half of it.
        assert_eq!(lag_bound_s(0.2), 0.1);
        // An older agent without the simulators' own CPU: the host's total decides.
        assert!(!judge_generator(&evidence(vec![host(85.0, None)])).healthy);
        assert!(judge_generator(&evidence(vec![host(50.0, None)])).healthy);
    }

    #[test]
    fn the_limiting_side_follows_what_failed() {
        assert_eq!(limiting_side(true, true, &[]), "none");
        assert_eq!(limiting_side(false, false, &["success"]), "generator");
        assert_eq!(
            limiting_side(false, true, &["success", "backlog"]),
            "ingest"
        );
        assert_eq!(limiting_side(false, true, &["lost"]), "diagnosis");
    }

    #[test]
    fn the_search_bisects_to_the_resolution() {
        // The true knee is 75 vehicles; the first planned step (400) already fails.
        let mut s = Search::new(0, 400, 0.05);
        let mut tried = Vec::new();
        while let Some(n) = s.next() {
            tried.push(n);
            s.record(n, n <= 75);
        }
        assert_eq!(tried[..3], [200, 100, 50]);
        assert!(s.passing <= 75 && s.failing > 75);
        assert!(s.failing - s.passing <= (s.failing as f64 * 0.05) as u64 + 1);
        assert!(s.passing as f64 >= 75.0 * 0.9, "{s:?}");
        assert!(tried.len() <= 8, "{tried:?}");
        // Nothing to search between neighbours.
        assert_eq!(Search::new(9, 10, 0.05).next(), None);
        assert_eq!(Search::new(0, 1, 0.05).next(), None);
        // A fleet that fails all the way down ends at the resolution's floor.
        let mut s = Search::new(0, 100, 0.05);
        while let Some(n) = s.next() {
            s.record(n, false);
        }
        assert_eq!((s.passing, s.failing), (0, 1));
    }

    fn step(vehicles: u64, failed_as: &[&'static str], accepted: f64, slowest: f64) -> StepOutcome {
        StepOutcome {
            vehicles,
            passed: failed_as.is_empty(),
            generator_healthy: true,
            failed_as: failed_as.to_vec(),
            accepted_msgs_per_s: accepted,
            slowest_group_msgs_per_s: Some(slowest),
        }
    }

    #[test]
    fn the_smaller_side_sets_the_reference_keys() {
        // What the VTOX backend showed: diagnosis at ~110 msg/s per group (~130 vehicles at
        // 1.2 s), the HTTP side good for ~600 vehicles.
        let steps = vec![
            step(100, &[], 83.0, 83.0),
            step(200, &["backlog"], 166.0, 110.0),
            step(150, &["lost"], 125.0, 108.4),
            step(125, &[], 104.0, 104.0),
            step(137, &["backlog"], 114.0, 110.9),
        ];
        let l = limits(&steps, 1.2);
        assert_eq!(l.max_successful_vehicles, 125);
        assert_eq!(
            l.diagnosis,
            Some(SideLimit {
                vehicles: 133,
                measured: true
            })
        );
        assert_eq!(
            l.ingest,
            Some(SideLimit {
                vehicles: 200,
                measured: false
            })
        );
        assert_eq!(
            l.estimated_system_limit, 133,
            "the smallest failing fleet's rate"
        );
        assert_eq!(l.limited_by, "diagnosis");
        assert_eq!(l.recommended_max_vehicles, 93);
        assert_eq!(steps[2].diagnosis_limit_vehicles(1.2), Some(130));
        assert_eq!(steps[2].ingest_limit_vehicles(1.2), None);
    }

    #[test]
    fn nothing_passing_still_gives_advice_above_zero() {
        // Even the search's smallest fleet failed on HTTP, but the backend served 40 msg/s.
        let steps = vec![
            step(1000, &["success"], 40.0, 40.0),
            step(50, &["p95"], 40.0, 40.0),
        ];
        let l = limits(&steps, 1.2);
        assert_eq!(l.max_successful_vehicles, 0);
        assert_eq!(l.estimated_system_limit, 48);
        assert_eq!(l.recommended_max_vehicles, 36);
        assert_eq!(l.limited_by, "ingest");
        // A generator that gave out says nothing of the backend.
        let mut g = step(500, &["success"], 10.0, 10.0);
        g.generator_healthy = false;
        let l = limits(&[step(100, &[], 83.0, 83.0), g], 1.2);
        assert_eq!((l.limited_by, l.estimated_system_limit), ("generator", 100));
        assert_eq!(l.ingest.map(|x| x.measured), Some(false));
        // Every step passed: the largest is a lower bound.
        let l = limits(&[step(100, &[], 83.0, 83.0)], 1.2);
        assert_eq!((l.limited_by, l.estimated_system_limit), ("none", 100));
    }
}
