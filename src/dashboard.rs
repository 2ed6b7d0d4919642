//! What the coordinator's web dashboard shows, made from run statuses: one frame a second
//! (rates, window percentiles, a row per agent), the events between two statuses (agents
//! joined or lost, ranges moved, restarts, crash loops, stalls) and the last hour of history,
//! downsampled. Pure: statuses, agent lists and the time go in, values ready to be sent as
//! JSON come out, so every rule is a unit test.

use crate::metrics::Buckets;
use crate::wire::pb;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Points kept at one a second ...
const RECENT_POINTS: usize = 600;
/// ... then merged this many to one ...
const MERGE: usize = 10;
/// ... and kept up to this many, so the history covers 10 min at 1 s and 50 more at 10 s.
const OLDER_POINTS: usize = 300;
/// Events kept for a page that (re)loads.
const EVENTS_KEPT: usize = 500;
/// A running instance whose counters have not moved for this long has stalled.
const STALL_S: f64 = 5.0;
/// Vehicles undriven for less than this are starting or in a handoff, not an event.
const UNDRIVEN_TOLD_AFTER_S: f64 = 5.0;
/// Counters move once a heartbeat: a rate needs at least this much of the simulators' own
/// time between two looks, or the last rate stands.
const MIN_RATE_WINDOW_S: f64 = 0.5;

/// One moment of the run, for the charts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Unix seconds.
    pub t: f64,
    /// Messages a second the vehicles driving now should make.
    pub expected: f64,
    /// Answered 200, a second.
    pub accepted: f64,
    pub failed: f64,
    /// Percent of the window's answers that were 200 (100 with none).
    pub success: f64,
    /// Ticks dropped a second (generator lateness, or no free connection at most once).
    pub dropped: f64,
    /// Latency (service time) percentiles of the window's answers, ms.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    /// Delay (scheduled time to answer) percentiles of the window's answers, ms.
    pub delay_p50: Option<f64>,
    pub delay_p95: Option<f64>,
    pub delay_p99: Option<f64>,
    pub buffered: u64,
    pub offline: u64,
}

impl Point {
    /// Several points as one: rates averaged, percentiles at their worst (a spike must not
    /// vanish in the average), gauges as they were last.
    fn merge(points: &[Point]) -> Option<Point> {
        let last = *points.last()?;
        let n = points.len() as f64;
        let mean = |f: fn(&Point) -> f64| points.iter().map(f).sum::<f64>() / n;
        let worst = |f: fn(&Point) -> Option<f64>| {
            points
                .iter()
                .filter_map(f)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
        };
        Some(Point {
            t: last.t,
            expected: mean(|p| p.expected),
            accepted: mean(|p| p.accepted),
            failed: mean(|p| p.failed),
            success: mean(|p| p.success),
            dropped: mean(|p| p.dropped),
            p50: worst(|p| p.p50),
            p95: worst(|p| p.p95),
            p99: worst(|p| p.p99),
            delay_p50: worst(|p| p.delay_p50),
            delay_p95: worst(|p| p.delay_p95),
            delay_p99: worst(|p| p.delay_p99),
            buffered: last.buffered,
            offline: last.offline,
        })
    }
}

/// The run's own fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunHeader {
    pub id: String,
    pub state: &'static str,
    pub vehicles: u64,
    /// Vehicles the simulators drive now.
    pub driving: u64,
    pub unassigned: u64,
    pub elapsed_s: f64,
    pub epoch: u64,
    pub target: String,
    pub interval_s: f64,
    pub duration_s: f64,
    pub delivery: String,
    pub sent: u64,
    pub accepted: u64,
    pub failed: u64,
    pub dropped: u64,
    pub success: f64,
    /// Planned vehicles not driven now, and the longest any has waited.
    pub not_driven: u64,
    pub not_driven_s: f64,
    /// Why a failed run failed.
    pub failure: String,
    /// Simulator restarts and agents' lease expiries in the run.
    pub restarts: u64,
    pub lease_expiries: u64,
}

/// A row of the agent table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRow {
    pub name: String,
    pub host: String,
    pub cores: u32,
    pub memory_gib: f64,
    pub connected: bool,
    pub up: u32,
    pub restarting: u32,
    pub failed: u32,
    pub planned: u32,
    pub vehicles: u64,
    pub msg_s: f64,
    pub success: f64,
    pub p95_ms: Option<f64>,
    /// CPU of the simulators alone, and of the whole host, percent of the host.
    pub sim_cpu: Option<f64>,
    pub host_cpu: Option<f64>,
    pub rss_mib: f64,
    pub heartbeat_s_ago: Option<f64>,
    pub buffered: u64,
    pub offline: u64,
    pub restarts: u64,
    pub lease_expiries: u64,
    pub not_driven: u64,
    pub not_driven_cause: String,
    /// Its own timers ran more than a quarter of the lease late: starved of CPU.
    pub starved: bool,
}

impl AgentRow {
    /// An agent's row with its host's hardware and nothing driven.
    fn idle(name: &str, connected: bool, info: Option<&pb::AgentInfo>) -> AgentRow {
        let hw = info.and_then(|i| i.hardware.clone()).unwrap_or_default();
        AgentRow {
            name: name.to_string(),
            host: hw.hostname,
            cores: hw.logical_cores,
            memory_gib: hw.memory_total_bytes as f64 / (1u64 << 30) as f64,
            connected,
            up: 0,
            restarting: 0,
            failed: 0,
            planned: 0,
            vehicles: 0,
            msg_s: 0.0,
            success: 100.0,
            p95_ms: None,
            sim_cpu: None,
            host_cpu: None,
            rss_mib: 0.0,
            heartbeat_s_ago: info.map(|i| i.last_seen_s_ago),
            restarts: 0,
            lease_expiries: 0,
            not_driven: 0,
            not_driven_cause: String::new(),
            starved: false,
            buffered: 0,
            offline: 0,
        }
    }
}

/// Something that happened between two statuses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Unix seconds.
    pub t: f64,
    /// run, joined, lost, returned, moved, restarted, crash_loop, stalled.
    pub kind: &'static str,
    pub text: String,
}

/// One frame of the live view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Frame {
    pub t: f64,
    pub run: Option<RunHeader>,
    pub point: Option<Point>,
    pub agents: Vec<AgentRow>,
    /// Events since the previous frame.
    pub events: Vec<Event>,
}

/// What a page gets when it (re)loads: the history of the run so far and the recent events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct History {
    pub run_id: String,
    pub points: Vec<Point>,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Default)]
struct AgentPrev {
    done: u64,
    accepted: u64,
    lease_expiries: u64,
    elapsed_s: f64,
    /// Answers and 200s a second over the last window of its own clock.
    rate: f64,
    accepted_rate: f64,
}

#[derive(Debug, Clone)]
struct InstancePrev {
    agent: String,
    restarts: u32,
    phase: i32,
    progress: u64,
    /// When `progress` last changed (Unix s), and whether the stall was told.
    moved_at: f64,
    stall_told: bool,
}

/// What the previous look saw, to difference against.
#[derive(Debug, Clone, Default)]
struct Prev {
    run_id: String,
    state: i32,
    agents: HashMap<String, AgentPrev>,
    instances: BTreeMap<u32, InstancePrev>,
    /// Every agent name seen and whether it was connected.
    known: HashMap<String, bool>,
    latency: Buckets,
    delay: Buckets,
    accepted: u64,
    failed: u64,
    dropped: u64,
    elapsed_s: f64,
    point: Option<Point>,
    /// Whether the current stretch of undriven vehicles was told as an event.
    undriven_told: bool,
}

/// The dashboard's memory: the previous look, the history and the recent events.
#[derive(Debug, Default)]
pub struct Board {
    prev: Prev,
    recent: VecDeque<Point>,
    pending: Vec<Point>,
    older: VecDeque<Point>,
    events: VecDeque<Event>,
}

fn phase_is(s: &pb::InstanceStatus, p: pb::Phase) -> bool {
    s.phase == p as i32
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// p50, p95 and p99 in ms of `b`; None when it is empty.
fn quantiles(b: &Buckets) -> Option<[f64; 3]> {
    if b.is_empty() {
        return None;
    }
    let ([p50, p95, p99], _) = b.quantiles_us([0.5, 0.95, 0.99]);
    Some([ms(p50), ms(p95), ms(p99)])
}

impl Board {
    pub fn new() -> Board {
        Board::default()
    }

    /// The next frame, from the status and the agent list at `now` (Unix seconds).
    pub fn update(
        &mut self,
        status: &pb::RunStatus,
        agents: &[pb::AgentInfo],
        epoch: u64,
        now: f64,
    ) -> Frame {
        let mut events = Vec::new();
        let same_run = !status.run_id.is_empty() && status.run_id == self.prev.run_id;
        if !same_run {
            if !status.run_id.is_empty() {
                events.push(Event {
                    t: now,
                    kind: "run",
                    text: format!(
                        "run {} of {} vehicles {}",
                        status.run_id,
                        status.vehicles,
                        status.state().name()
                    ),
                });
            }
            // A new run starts a new history; what the agents did stays known.
            let known = std::mem::take(&mut self.prev.known);
            self.prev = Prev {
                known,
                ..Prev::default()
            };
            self.recent.clear();
            self.pending.clear();
            self.older.clear();
        } else if status.state != self.prev.state {
            let why = if status.failure.is_empty() {
                String::new()
            } else {
                format!(": {}", status.failure)
            };
            events.push(Event {
                t: now,
                kind: "run",
                text: format!("run {} {}{why}", status.run_id, status.state().name()),
            });
        }
        self.undriven_event(status, now, &mut events);
        self.agent_events(agents, now, &mut events);
        let totals = status.totals.clone().unwrap_or_default();
        self.lease_events(status, now, same_run, &mut events);
        let rows = self.agent_rows(status, agents, same_run);
        self.instance_events(status, now, same_run, &mut events);
        let point = (!status.run_id.is_empty()).then(|| self.point(status, &totals, now));
        let run = (!status.run_id.is_empty()).then(|| {
            let spec = status.spec.clone().unwrap_or_default();
            RunHeader {
                id: status.run_id.clone(),
                state: status.state().name(),
                vehicles: status.vehicles,
                driving: totals.active_vehicles,
                unassigned: status.unassigned_vehicles,
                elapsed_s: status.elapsed_s,
                epoch,
                target: spec.target,
                interval_s: spec.interval_s,
                duration_s: spec.duration_s,
                delivery: if spec.delivery.is_empty() {
                    "store-and-forward".to_string()
                } else {
                    spec.delivery
                },
                sent: totals.sent,
                accepted: totals.accepted,
                failed: totals.failed,
                dropped: totals.dropped,
                success: totals.success_percent(),
                not_driven: status.vehicles_not_driven,
                not_driven_s: status.not_driven_s,
                failure: status.failure.clone(),
                restarts: status.supervision.map_or(0, |x| x.restarts),
                lease_expiries: status.supervision.map_or(0, |x| x.lease_expiries),
            }
        });
        if let Some(p) = point {
            self.keep(p);
        }
        for e in &events {
            self.events.push_back(e.clone());
        }
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
        self.prev.run_id = status.run_id.clone();
        self.prev.state = status.state;
        Frame {
            t: now,
            run,
            point,
            agents: rows,
            events,
        }
    }

    /// The history of the run so far, oldest first, and the recent events.
    pub fn history(&self) -> History {
        History {
            run_id: self.prev.run_id.clone(),
            points: self
                .older
                .iter()
                .chain(self.recent.iter())
                .copied()
                .collect(),
            events: self.events.iter().cloned().collect(),
        }
    }

    fn keep(&mut self, p: Point) {
        self.recent.push_back(p);
        while self.recent.len() > RECENT_POINTS {
            if let Some(old) = self.recent.pop_front() {
                self.pending.push(old);
            }
            if self.pending.len() == MERGE {
                if let Some(m) = Point::merge(&self.pending) {
                    self.older.push_back(m);
                }
                self.pending.clear();
            }
            while self.older.len() > OLDER_POINTS {
                self.older.pop_front();
            }
        }
    }

    /// An agent's lease expired: it stopped every instance it ran.
    fn lease_events(
        &self,
        status: &pb::RunStatus,
        now: f64,
        same_run: bool,
        events: &mut Vec<Event>,
    ) {
        for a in &status.agents {
            let count = a.supervision.map_or(0, |x| x.lease_expiries);
            let before = if same_run {
                self.prev
                    .agents
                    .get(&a.agent)
                    .map_or(0, |p| p.lease_expiries)
            } else {
                0
            };
            if count > before {
                let u = a.usage.unwrap_or_default();
                events.push(Event {
                    t: now,
                    kind: "lease_expired",
                    text: format!(
                        "agent {}'s lease expired; it stopped its instances (its own timers ran up to {:.0} ms late{})",
                        a.agent,
                        u.control_lag_ms.max(u.supervisor_lag_ms),
                        if u.starved { ": starved of CPU" } else { "" }
                    ),
                });
            }
        }
    }

    /// Vehicles undriven for longer than a start or a handoff take, told once per stretch.
    fn undriven_event(&mut self, status: &pb::RunStatus, now: f64, events: &mut Vec<Event>) {
        if status.vehicles_not_driven == 0 {
            self.prev.undriven_told = false;
            return;
        }
        if self.prev.undriven_told || status.not_driven_s < UNDRIVEN_TOLD_AFTER_S {
            return;
        }
        self.prev.undriven_told = true;
        let causes: Vec<String> = status
            .agents
            .iter()
            .filter(|a| a.vehicles_not_driven > 0)
            .map(|a| format!("{}: {}", a.agent, a.not_driven_cause))
            .collect();
        events.push(Event {
            t: now,
            kind: "not_driven",
            text: format!(
                "{} vehicles not driven for {:.0} s ({})",
                status.vehicles_not_driven,
                status.not_driven_s,
                causes.join("; ")
            ),
        });
    }

    fn agent_events(&mut self, agents: &[pb::AgentInfo], now: f64, events: &mut Vec<Event>) {
        for a in agents {
            match self.prev.known.insert(a.name.clone(), a.connected) {
                None => {
                    let hw = a.hardware.clone().unwrap_or_default();
                    events.push(Event {
                        t: now,
                        kind: "joined",
                        text: format!(
                            "agent {} joined ({} cores, {:.0} GiB)",
                            a.name,
                            hw.logical_cores,
                            hw.memory_total_bytes as f64 / (1u64 << 30) as f64
                        ),
                    });
                }
                Some(true) if !a.connected => events.push(Event {
                    t: now,
                    kind: "lost",
                    text: format!(
                        "agent {} lost (silent for {:.0} s)",
                        a.name, a.last_seen_s_ago
                    ),
                }),
                Some(false) if a.connected => events.push(Event {
                    t: now,
                    kind: "returned",
                    text: format!("agent {} is back", a.name),
                }),
                _ => {}
            }
        }
    }

    fn agent_rows(
        &mut self,
        status: &pb::RunStatus,
        agents: &[pb::AgentInfo],
        same_run: bool,
    ) -> Vec<AgentRow> {
        let infos: HashMap<&str, &pb::AgentInfo> =
            agents.iter().map(|a| (a.name.as_str(), a)).collect();
        let mut rows = Vec::with_capacity(status.agents.len().max(agents.len()));
        let mut seen = HashMap::new();
        for a in &status.agents {
            let c = a.totals.clone().unwrap_or_default();
            let done = c.accepted + c.failed;
            let prev = if same_run {
                self.prev.agents.get(&a.agent).cloned()
            } else {
                None
            };
            let keep = match &prev {
                Some(p) if c.elapsed_s - p.elapsed_s >= MIN_RATE_WINDOW_S => {
                    let dt = c.elapsed_s - p.elapsed_s;
                    AgentPrev {
                        done,
                        accepted: c.accepted,
                        lease_expiries: a.supervision.map_or(0, |x| x.lease_expiries),
                        elapsed_s: c.elapsed_s,
                        rate: done.saturating_sub(p.done) as f64 / dt,
                        accepted_rate: c.accepted.saturating_sub(p.accepted) as f64 / dt,
                    }
                }
                Some(p) => p.clone(),
                None => AgentPrev {
                    done,
                    accepted: c.accepted,
                    lease_expiries: a.supervision.map_or(0, |x| x.lease_expiries),
                    elapsed_s: c.elapsed_s,
                    rate: 0.0,
                    accepted_rate: 0.0,
                },
            };
            let rate = keep.rate;
            seen.insert(a.agent.clone(), keep);
            let count = |p: pb::Phase| a.instances.iter().filter(|i| phase_is(i, p)).count() as u32;
            let info = infos.get(a.agent.as_str()).copied();
            let usage = a.usage.unwrap_or_default();
            rows.push(AgentRow {
                up: a.instances_running,
                restarting: count(pb::Phase::Backoff) + count(pb::Phase::Starting),
                failed: count(pb::Phase::Failed),
                planned: a.instances_planned,
                vehicles: a.vehicles,
                msg_s: rate,
                success: c.success_percent(),
                p95_ms: c
                    .latency_summary
                    .filter(|s| s.count > 0)
                    .map(|s| ms(s.p95_us)),
                sim_cpu: a.usage.and_then(|u| u.simulators_cpu_percent),
                host_cpu: a.usage.map(|u| u.cpu_percent),
                rss_mib: usage.rss_bytes as f64 / (1u64 << 20) as f64,
                buffered: c.buffered,
                offline: c.offline_vehicles,
                restarts: a.supervision.map_or(0, |x| x.restarts),
                lease_expiries: a.supervision.map_or(0, |x| x.lease_expiries),
                not_driven: a.vehicles_not_driven,
                not_driven_cause: a.not_driven_cause.clone(),
                starved: usage.starved,
                ..AgentRow::idle(&a.agent, a.connected, info)
            });
        }
        // Joined agents without a part in the run are listed too.
        for a in agents {
            if !seen.contains_key(&a.name) {
                rows.push(AgentRow::idle(&a.name, a.connected, Some(a)));
            }
        }
        self.prev.agents = seen;
        rows
    }

    fn instance_events(
        &mut self,
        status: &pb::RunStatus,
        now: f64,
        same_run: bool,
        events: &mut Vec<Event>,
    ) {
        let running = status.state() == pb::RunState::Running;
        let mut next = BTreeMap::new();
        for a in &status.agents {
            for i in &a.instances {
                let c = i.counters.clone().unwrap_or_default();
                let progress = c.produced.max(c.sent + c.dropped);
                let range = format!(
                    "instance {} (vehicles {}..{})",
                    i.index,
                    i.first_vehicle,
                    (i.first_vehicle + i.vehicles).saturating_sub(1)
                );
                let prev = if same_run {
                    self.prev.instances.get(&i.index)
                } else {
                    None
                };
                let mut now_entry = InstancePrev {
                    agent: a.agent.clone(),
                    restarts: i.restarts,
                    phase: i.phase,
                    progress,
                    moved_at: now,
                    stall_told: false,
                };
                if let Some(p) = prev {
                    if p.agent != a.agent {
                        events.push(Event {
                            t: now,
                            kind: "moved",
                            text: format!("{range} moved from {} to {}", p.agent, a.agent),
                        });
                    } else {
                        if i.restarts > p.restarts {
                            let why = if i.last_error.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", i.last_error)
                            };
                            events.push(Event {
                                t: now,
                                kind: "restarted",
                                text: format!("{range} on {} restarted{why}", a.agent),
                            });
                        }
                        if phase_is(i, pb::Phase::Failed) && p.phase != pb::Phase::Failed as i32 {
                            events.push(Event {
                                t: now,
                                kind: "crash_loop",
                                text: format!(
                                    "{range} on {} failed: crash loop, given up",
                                    a.agent
                                ),
                            });
                        }
                        if progress == p.progress {
                            now_entry.moved_at = p.moved_at;
                            now_entry.stall_told = p.stall_told;
                            let stalled = running
                                && phase_is(i, pb::Phase::Running)
                                && now - p.moved_at >= STALL_S;
                            if stalled && !p.stall_told {
                                events.push(Event {
                                    t: now,
                                    kind: "stalled",
                                    text: format!(
                                        "{range} on {} made no message for {:.0} s",
                                        a.agent,
                                        now - p.moved_at
                                    ),
                                });
                                now_entry.stall_told = true;
                            }
                        }
                    }
                }
                next.insert(i.index, now_entry);
            }
        }
        // Ranges the plan moved but no agent reports yet keep their last place, so that a
        // move is told once it shows.
        for (index, p) in std::mem::take(&mut self.prev.instances) {
            next.entry(index).or_insert(p);
        }
        self.prev.instances = next;
    }

    fn point(&mut self, status: &pb::RunStatus, t: &pb::Counters, now: f64) -> Point {
        let interval = status
            .spec
            .as_ref()
            .map(|s| s.interval_s)
            .filter(|i| *i > 0.0)
            .unwrap_or(1.0);
        let expected = t.active_vehicles as f64 / interval;
        let moved = t.elapsed_s - self.prev.elapsed_s >= MIN_RATE_WINDOW_S;
        let point = match self.prev.point {
            // No new counters since the last look: the last rates stand, the gauges move.
            Some(p) if !moved => Point {
                t: now,
                expected,
                buffered: t.buffered,
                offline: t.offline_vehicles,
                ..p
            },
            first => {
                let dt = (t.elapsed_s - self.prev.elapsed_s).max(MIN_RATE_WINDOW_S);
                let accepted = t.accepted.saturating_sub(self.prev.accepted);
                let failed = t.failed.saturating_sub(self.prev.failed);
                let latency = Buckets::from_bytes(&t.latency_hdr).unwrap_or_default();
                let delay = Buckets::from_bytes(&t.delay_hdr).unwrap_or_default();
                let lq = quantiles(&latency.since(&self.prev.latency));
                let dq = quantiles(&delay.since(&self.prev.delay));
                // The fleet's rates are the sums of the agents', each on its own clock:
                // counters arrive a heartbeat at a time, agent by agent.
                let agents = self.prev.agents.values();
                let accepted_rate: f64 = agents.clone().map(|a| a.accepted_rate).sum();
                let failed_rate: f64 = agents.map(|a| (a.rate - a.accepted_rate).max(0.0)).sum();
                let point = Point {
                    t: now,
                    expected,
                    accepted: accepted_rate,
                    failed: failed_rate,
                    success: if accepted + failed == 0 {
                        100.0
                    } else {
                        accepted as f64 * 100.0 / (accepted + failed) as f64
                    },
                    dropped: if first.is_none() {
                        0.0
                    } else {
                        t.dropped.saturating_sub(self.prev.dropped) as f64 / dt
                    },
                    p50: lq.map(|q| q[0]),
                    p95: lq.map(|q| q[1]),
                    p99: lq.map(|q| q[2]),
                    delay_p50: dq.map(|q| q[0]),
                    delay_p95: dq.map(|q| q[1]),
                    delay_p99: dq.map(|q| q[2]),
                    buffered: t.buffered,
                    offline: t.offline_vehicles,
                };
                self.prev.latency = latency;
                self.prev.delay = delay;
                self.prev.accepted = t.accepted;
                self.prev.failed = t.failed;
                self.prev.dropped = t.dropped;
                self.prev.elapsed_s = t.elapsed_s;
                point
            }
        };
        self.prev.point = Some(point);
        point
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Latency;

    fn hist(values: &[u64]) -> Vec<u8> {
        let mut l = Latency::new();
        for v in values {
            l.record_us(*v);
        }
        l.to_bytes()
    }

    fn agent_info(name: &str, connected: bool) -> pb::AgentInfo {
        pb::AgentInfo {
            name: name.into(),
            connected,
            hardware: Some(pb::Hardware {
                hostname: format!("{name}.lab"),
                logical_cores: 8,
                memory_total_bytes: 16 << 30,
                ..Default::default()
            }),
            last_seen_s_ago: 0.4,
            ..Default::default()
        }
    }

    struct Inst {
        index: u32,
        first: u64,
        restarts: u32,
        phase: pb::Phase,
        sent: u64,
    }

    fn status(
        elapsed: f64,
        agents: &[(&str, u64, u64, &[Inst])],
        latencies: &[u64],
    ) -> pb::RunStatus {
        let mut totals = pb::Counters::default();
        let mut list = Vec::new();
        for (name, accepted, failed, instances) in agents {
            let c = pb::Counters {
                sent: accepted + failed,
                accepted: *accepted,
                failed: *failed,
                elapsed_s: elapsed,
                active_vehicles: 50 * instances.len() as u64,
                latency_summary: Some(pb::LatencySummary {
                    count: 1,
                    p95_us: 2_000,
                    ..Default::default()
                }),
                ..Default::default()
            };
            totals.add(&c);
            list.push(pb::AgentStatus {
                agent: name.to_string(),
                connected: true,
                vehicles: 50 * instances.len() as u64,
                instances_running: instances.len() as u32,
                instances_planned: instances.len() as u32,
                totals: Some(c),
                usage: None,
                instances: instances
                    .iter()
                    .map(|i| pb::InstanceStatus {
                        run_id: "run-1".into(),
                        index: i.index,
                        first_vehicle: i.first,
                        vehicles: 50,
                        phase: i.phase as i32,
                        restarts: i.restarts,
                        counters: Some(pb::Counters {
                            sent: i.sent,
                            ..Default::default()
                        }),
                        last_error: if i.restarts > 0 {
                            "exit code 101".into()
                        } else {
                            String::new()
                        },
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
        }
        totals.latency_hdr = hist(latencies);
        pb::RunStatus {
            run_id: "run-1".into(),
            state: pb::RunState::Running.into(),
            vehicles: 100,
            elapsed_s: elapsed,
            spec: Some(pb::RunSpec {
                interval_s: 1.0,
                target: "http://sink".into(),
                ..Default::default()
            }),
            agents: list,
            totals: Some(totals),
            unassigned_vehicles: 0,
            ..Default::default()
        }
    }

    fn running(index: u32, sent: u64) -> Inst {
        Inst {
            index,
            first: 50 * u64::from(index),
            restarts: 0,
            phase: pb::Phase::Running,
            sent,
        }
    }

    #[test]
    fn rates_and_window_percentiles_come_from_the_counters_own_clock() {
        let mut b = Board::new();
        let infos = [agent_info("a", true), agent_info("b", true)];
        let f = b.update(
            &status(
                1.0,
                &[
                    ("a", 50, 0, &[running(0, 50)]),
                    ("b", 50, 0, &[running(1, 50)]),
                ],
                &[1_000; 100],
            ),
            &infos,
            3,
            100.0,
        );
        let run = f.run.unwrap();
        assert_eq!((run.state, run.epoch, run.driving), ("running", 3, 100));
        assert_eq!(f.agents.len(), 2);
        assert_eq!(f.point.unwrap().expected, 100.0);
        // A second later each agent accepted 50 more; the window's latencies are all 5 ms.
        let mut later: Vec<u64> = vec![1_000; 100];
        later.extend(std::iter::repeat_n(5_000, 100));
        let two_later = status(
            2.0,
            &[
                ("a", 100, 0, &[running(0, 100)]),
                ("b", 100, 0, &[running(1, 100)]),
            ],
            &later,
        );
        let f = b.update(&two_later, &infos, 3, 101.0);
        let p = f.point.unwrap();
        assert!((p.accepted - 100.0).abs() < 1e-9, "{p:?}");
        assert!((p.p95.unwrap() - 5.0).abs() < 0.01, "window only: {p:?}");
        assert_eq!(p.success, 100.0);
        assert!(f.agents.iter().all(|r| (r.msg_s - 50.0).abs() < 1e-9));
        // The same counters looked at again (no heartbeat between): the rate stands.
        let f = b.update(&two_later, &infos, 3, 101.5);
        assert!((f.point.unwrap().accepted - 100.0).abs() < 1e-9);
        assert!((f.agents[0].msg_s - 50.0).abs() < 1e-9);
        assert_eq!(b.history().points.len(), 3);
    }

    #[test]
    fn agents_joining_leaving_and_ranges_moving_are_told_once() {
        let mut b = Board::new();
        let f = b.update(
            &status(1.0, &[("a", 10, 0, &[running(0, 10), running(1, 10)])], &[]),
            &[agent_info("a", true)],
            1,
            10.0,
        );
        let kinds: Vec<&str> = f.events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["run", "joined"]);
        // b joins, a is lost and instance 1 moves to b; instance 0 restarts.
        let mut restarted = running(0, 20);
        restarted.restarts = 1;
        let f = b.update(
            &status(
                2.0,
                &[("a", 20, 0, &[restarted]), ("b", 0, 0, &[running(1, 0)])],
                &[],
            ),
            &[agent_info("a", false), agent_info("b", true)],
            2,
            11.0,
        );
        let texts: Vec<String> = f
            .events
            .iter()
            .map(|e| format!("{}: {}", e.kind, e.text))
            .collect();
        assert!(
            texts.iter().any(|t| t.starts_with("joined: agent b")),
            "{texts:?}"
        );
        assert!(
            texts.iter().any(|t| t.starts_with("lost: agent a")),
            "{texts:?}"
        );
        assert!(
            texts.contains(&"moved: instance 1 (vehicles 50..99) moved from a to b".to_string()),
            "{texts:?}"
        );
        assert!(
            texts.iter().any(|t| t.starts_with(
                "restarted: instance 0 (vehicles 0..49) on a restarted: exit code 101"
            )),
            "{texts:?}"
        );
        // Nothing new: nothing told.
        let mut restarted = running(0, 30);
        restarted.restarts = 1;
        let f = b.update(
            &status(
                3.0,
                &[("a", 30, 0, &[restarted]), ("b", 10, 0, &[running(1, 10)])],
                &[],
            ),
            &[agent_info("a", false), agent_info("b", true)],
            2,
            12.0,
        );
        assert_eq!(f.events, Vec::new());
        assert_eq!(b.history().events.len(), 6);
    }

    #[test]
    fn a_crash_loop_and_a_stall_are_told() {
        let mut b = Board::new();
        let infos = [agent_info("a", true)];
        // Instance 0 made `made` messages by `elapsed`; instance 1 crash-looped (or not yet).
        let look = |b: &mut Board, elapsed: f64, made: u64, crashed: bool, now: f64| {
            let mut one = running(1, 5);
            if crashed {
                one.phase = pb::Phase::Failed;
            }
            let s = status(elapsed, &[("a", 1, 0, &[running(0, made), one])], &[]);
            b.update(&s, &infos, 1, now)
        };
        look(&mut b, 1.0, 5, false, 0.0);
        let f = look(&mut b, 2.0, 5, true, 1.0);
        assert_eq!(f.events.len(), 1);
        assert_eq!(f.events[0].kind, "crash_loop");
        let stalls = |b: &mut Board, elapsed: f64, made: u64, from: u32, to: u32| {
            (from..to)
                .map(|s| look(b, elapsed, made, true, f64::from(s)))
                .map(|f| f.events.iter().filter(|e| e.kind == "stalled").count())
                .sum::<usize>()
        };
        // Instance 0 makes nothing for 5 s: told once.
        assert_eq!(stalls(&mut b, 2.0, 5, 2, 12), 1);
        // Moving again re-arms it.
        look(&mut b, 3.0, 9, true, 12.0);
        assert_eq!(stalls(&mut b, 3.0, 9, 13, 20), 1);
    }

    #[test]
    fn history_keeps_an_hour_downsampled_and_a_new_run_starts_afresh() {
        let mut b = Board::new();
        let infos = [agent_info("a", true)];
        for s in 0..3_700u64 {
            let lat: Vec<u64> = if s == 1_000 {
                vec![900_000]
            } else {
                vec![1_000]
            };
            b.update(
                &status(s as f64, &[("a", s * 50, 0, &[running(0, s * 50)])], &lat),
                &infos,
                1,
                s as f64,
            );
        }
        let h = b.history();
        assert_eq!(h.points.len(), RECENT_POINTS + OLDER_POINTS);
        assert!(h.points.windows(2).all(|w| w[0].t < w[1].t));
        let span = h.points[h.points.len() - 1].t - h.points[0].t;
        assert!((3_500.0..=3_600.0).contains(&span), "{span}");
        // The one slow second is still there after being merged into a 10 s point: windows
        // merge by their worst percentile.
        assert!(h.points.iter().any(|p| p.p99.is_some_and(|x| x > 800.0)));
        let mut other = status(1.0, &[("a", 1, 0, &[running(0, 1)])], &[]);
        other.run_id = "run-2".into();
        let f = b.update(&other, &infos, 2, 4_000.0);
        assert_eq!(f.events[0].kind, "run");
        assert_eq!(b.history().points.len(), 1);
        assert_eq!(b.history().run_id, "run-2");
    }

    #[test]
    fn no_run_gives_agents_only() {
        let mut b = Board::new();
        let f = b.update(
            &pb::RunStatus::default(),
            &[agent_info("idle", true)],
            0,
            5.0,
        );
        assert_eq!((f.run, f.point), (None, None));
        assert_eq!(f.agents.len(), 1);
        assert_eq!(f.agents[0].host, "idle.lab");
        assert_eq!(f.events[0].kind, "joined");
    }
}
