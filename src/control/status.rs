//! What a status shows: the reports recorded per incarnation, the run's own fields, and the
//! merge of counters and histograms per agent and fleet-wide, done off the lock.

use super::{driven, AgentEntry, Control, Now};
use crate::metrics::{BucketSum, Buckets};
use crate::wire::pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

impl Control {
    pub(super) fn record(&mut self, agent: &str, instances: Vec<pb::InstanceStatus>, now: Now) {
        let Some(run_id) = self.run.as_ref().map(|r| r.id.as_str()) else {
            return;
        };
        let mut changed = false;
        for status in instances {
            if status.run_id != run_id {
                continue;
            }
            if status.phase == pb::Phase::Running as i32 {
                self.driven.insert(status.index, now.mono);
            }
            let key = (agent.to_string(), status.index, status.incarnation);
            // A report like the last one (an exited instance, heartbeat after heartbeat)
            // changes nothing, so statuses merged since stay exact.
            if self
                .incarnations
                .get(&key)
                .is_some_and(|old| **old == status)
            {
                continue;
            }
            changed = true;
            match self.incarnations.entry(key) {
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    let old = e
                        .get()
                        .counters
                        .as_ref()
                        .map(|c| (c.sent, c.accepted + c.failed))
                        .unwrap_or((0, 0));
                    let new = status
                        .counters
                        .as_ref()
                        .map(|c| (c.sent, c.accepted + c.failed))
                        .unwrap_or((0, 0));
                    // Counters only grow within an incarnation; an older report arriving late
                    // must not take counts back.
                    if new >= old {
                        let mut status = status;
                        // Counts recovered from a tally carry no histogram: keep the last one.
                        let keep_old_hdr = new.1 == old.1
                            || status
                                .counters
                                .as_ref()
                                .is_some_and(|c| c.latency_hdr.is_empty());
                        if keep_old_hdr {
                            if let (Some(c), Some(o)) =
                                (status.counters.as_mut(), &e.get().counters)
                            {
                                c.latency_hdr = o.latency_hdr.clone();
                                c.delay_hdr = o.delay_hdr.clone();
                                c.late_age_hdr = o.late_age_hdr.clone();
                            }
                        }
                        e.insert(Arc::new(status));
                    }
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Arc::new(status));
                }
            }
        }
        if changed {
            self.metrics_dirty = true;
            self.version += 1;
            self.reported.insert(agent.to_string(), self.version);
        }
    }

    /// What a status needs, taken under the lock in one cheap pass (the reports are shared,
    /// not copied); `StatusSnapshot::render` does the merging afterwards, off the lock.
    pub fn status_snapshot(&self, now: Now) -> StatusSnapshot {
        let Some(run) = &self.run else {
            return StatusSnapshot::default();
        };
        let mut agents = Vec::with_capacity(run.plan.agents.len());
        for planned in &run.plan.agents {
            let entry = self.agents.get(&planned.name);
            let reports = self
                .incarnations
                .range((planned.name.clone(), 0, 0)..)
                .take_while(|((a, _, _), _)| a == &planned.name)
                .map(|(_, s)| s.clone())
                .collect();
            agents.push(AgentSnapshot {
                name: planned.name.clone(),
                connected: entry.is_some_and(AgentEntry::connected),
                vehicles: planned.vehicles,
                instances_planned: planned.instances.len() as u32,
                usage: entry.map(|e| e.usage),
                reported: self.reported.get(&planned.name).copied().unwrap_or(0),
                reports,
            });
        }
        StatusSnapshot {
            run: self.run_head(now),
            agents,
        }
    }

    /// The run's own fields of a status (no counters): cheap enough to be exact in every
    /// answer, even where the merged counters are a second or two old (`Rendered::answer`).
    pub fn run_head(&self, now: Now) -> Option<RunHead> {
        let run = self.run.as_ref()?;
        // Vehicles that no connected agent drives: those of lost agents and those in handoff.
        let mut unassigned: u64 = run.parked.iter().map(|p| p.instance.vehicles).sum();
        for planned in &run.plan.agents {
            if !self
                .agents
                .get(&planned.name)
                .is_some_and(AgentEntry::connected)
            {
                unassigned += planned.vehicles;
            }
        }
        let end = run.ended.unwrap_or(now.unix_s());
        let undriven = self.undriven(now);
        let per_agent = driven::per_agent(&undriven, now.mono);
        Some(RunHead {
            run_id: run.id.clone(),
            state: run.state,
            vehicles: run.plan.vehicles,
            elapsed_s: (end - run.started).max(0.0),
            spec: run.spec.clone(),
            unassigned,
            failure: run.failure.clone(),
            vehicles_not_driven: undriven.iter().map(|u| u.vehicles).sum(),
            not_driven_s: per_agent.values().map(|a| a.longest_s).fold(0.0, f64::max),
            undriven: per_agent,
        })
    }

    /// The status, merged at once (for callers that hold the state anyway, e.g. tests).
    #[cfg(test)]
    pub fn status(&self, now: Now) -> pb::RunStatus {
        self.status_snapshot(now)
            .render(&mut MergedCache::default())
            .with_agent_histograms()
    }
}

impl RunHead {
    /// Puts these fields, made now, over a status's (its counters may be a render old).
    fn overlay(self, s: &mut pb::RunStatus) {
        s.state = self.state.into();
        s.vehicles = self.vehicles;
        s.elapsed_s = self.elapsed_s;
        s.spec = Some(self.spec);
        s.unassigned_vehicles = self.unassigned;
        s.failure = self.failure;
        s.vehicles_not_driven = self.vehicles_not_driven;
        s.not_driven_s = self.not_driven_s;
        for a in &mut s.agents {
            let u = self.undriven.get(&a.agent).cloned().unwrap_or_default();
            a.vehicles_not_driven = u.vehicles;
            a.not_driven_s = u.longest_s;
            a.not_driven_cause = u.cause;
        }
    }
}

pub struct RunHead {
    run_id: String,
    state: pb::RunState,
    vehicles: u64,
    elapsed_s: f64,
    spec: pb::RunSpec,
    unassigned: u64,
    failure: String,
    vehicles_not_driven: u64,
    not_driven_s: f64,
    undriven: HashMap<String, driven::AgentUndriven>,
}

struct AgentSnapshot {
    name: String,
    connected: bool,
    vehicles: u64,
    instances_planned: u32,
    usage: Option<pb::HostUsage>,
    /// When its reports last changed: its merged histogram is reused if nothing did.
    reported: u64,
    /// Every incarnation of every instance of this agent, in (instance, incarnation) order.
    reports: Vec<Arc<pb::InstanceStatus>>,
}

/// A status in the making: see `Control::status_snapshot`.
#[derive(Default)]
pub struct StatusSnapshot {
    run: Option<RunHead>,
    agents: Vec<AgentSnapshot>,
}

/// Each agent's merged histogram as of its `reported` mark, kept between statuses (as its
/// uncompressed V2 bytes, a few KB, rather than decoded buckets, which are ten times that),
/// with the percentiles read from it.
#[derive(Default)]
pub struct MergedCache {
    merged: HashMap<String, (u64, Arc<Vec<u8>>, pb::LatencySummary)>,
}

/// A rendered status and, beside it, each agent's merged histogram in the status's agent
/// order, for the callers that ask for them (`StatusRequest.agent_histograms`).
pub struct Rendered {
    pub status: pb::RunStatus,
    pub agent_histograms: Vec<Arc<Vec<u8>>>,
}

impl Rendered {
    /// The status with each agent's histogram in its totals, as it would be with a fleet
    /// small enough for statuses to carry them all.
    pub fn with_agent_histograms(&self) -> pb::RunStatus {
        let mut s = self.status.clone();
        self.fill_histograms(&mut s);
        s
    }

    fn fill_histograms(&self, s: &mut pb::RunStatus) {
        for (a, h) in s.agents.iter_mut().zip(&self.agent_histograms) {
            if let Some(t) = a.totals.as_mut() {
                t.latency_hdr = Vec::clone(h);
            }
        }
    }

    /// This render as an answer, with the run's fields of `head` (made now) over those of
    /// the render: the counters may be a render old, the state never is. None when the render
    /// is of another run than `head` (or of none), which must not be passed off as this one.
    pub fn answer(&self, head: Option<RunHead>, agent_histograms: bool) -> Option<pb::RunStatus> {
        let same = match &head {
            Some(h) => h.run_id == self.status.run_id,
            None => self.status.run_id.is_empty(),
        };
        if !same {
            return None;
        }
        let mut s = self.status.clone();
        if agent_histograms {
            self.fill_histograms(&mut s);
        }
        if let Some(h) = head {
            h.overlay(&mut s);
        }
        Some(s)
    }
}

fn summary(b: &Buckets) -> pb::LatencySummary {
    let ([p50_us, p95_us, p99_us], max_us) = b.quantiles_us([0.5, 0.95, 0.99]);
    pb::LatencySummary {
        count: b.count(),
        p50_us,
        p95_us,
        p99_us,
        max_us,
    }
}

impl StatusSnapshot {
    /// The status: counters summed and histograms merged per agent and fleet-wide (an agent
    /// whose reports did not change since the last render reuses its merged histogram). Each
    /// agent's totals carry the percentiles of its histogram; the fleet totals the histogram.
    pub fn render(self, cache: &mut MergedCache) -> Rendered {
        let Some(head) = self.run else {
            return Rendered {
                status: pb::RunStatus::default(),
                agent_histograms: Vec::new(),
            };
        };
        let mut totals = pb::Counters::default();
        let mut fleet = BucketSum::default();
        let (mut delay, mut late_age) = (BucketSum::default(), BucketSum::default());
        // Each agent's instances are summed here, then taken out: one buffer for all agents.
        let mut scratch = BucketSum::default();
        let mut merged = Buckets::default();
        let mut agents = Vec::with_capacity(self.agents.len());
        let mut histograms = Vec::with_capacity(self.agents.len());
        for a in self.agents {
            let mut agent_totals = pb::Counters::default();
            let mut current: BTreeMap<u32, &pb::InstanceStatus> = BTreeMap::new();
            for s in &a.reports {
                if let Some(c) = &s.counters {
                    agent_totals.add(c);
                }
                // Later incarnations sort last and replace earlier ones.
                current.insert(s.index, s);
            }
            let running = current
                .values()
                .filter(|s| s.phase == pb::Phase::Running as i32)
                .count() as u32;
            // The gauges describe what runs now, not the sum of every incarnation.
            for d in crate::counters::DEFS
                .iter()
                .filter(|d| d.kind == crate::counters::Kind::Gauge)
            {
                *(d.get_mut)(&mut agent_totals) = current
                    .values()
                    .filter_map(|s| s.counters.as_ref())
                    .map(d.get)
                    .sum();
            }
            // Delays and ages at delivery are judged fleet-wide only: merged straight into the
            // fleet's sums, never kept per agent.
            for s in &a.reports {
                if let Some(c) = &s.counters {
                    // A histogram that does not decode adds nothing (as below).
                    let _ = delay.add_bytes(&c.delay_hdr);
                    let _ = late_age.add_bytes(&c.late_age_hdr);
                }
            }
            let (bytes, agent_summary) = match cache.merged.get(&a.name) {
                Some((mark, bytes, summary)) if *mark == a.reported => {
                    let _ = fleet.add_bytes(bytes);
                    (bytes.clone(), *summary)
                }
                _ => {
                    // A histogram that does not decode adds nothing.
                    for s in &a.reports {
                        if let Some(c) = &s.counters {
                            let _ = scratch.add_bytes(&c.latency_hdr);
                        }
                    }
                    scratch.take_into(&mut merged);
                    fleet.add(&merged);
                    let bytes = Arc::new(merged.to_bytes());
                    let agent_summary = summary(&merged);
                    cache
                        .merged
                        .insert(a.name.clone(), (a.reported, bytes.clone(), agent_summary));
                    (bytes, agent_summary)
                }
            };
            agent_totals.latency_summary = Some(agent_summary);
            histograms.push(bytes);
            totals.add(&agent_totals);
            agents.push(pb::AgentStatus {
                agent: a.name,
                connected: a.connected,
                vehicles: a.vehicles,
                instances_running: running,
                instances_planned: a.instances_planned,
                totals: Some(agent_totals),
                supervision: Some(supervision(&a.reports, a.usage.as_ref())),
                usage: a.usage,
                instances: current.into_values().map(strip_histogram).collect(),
                // The undriven fields are the run head's, made at answer time.
                ..Default::default()
            });
        }
        // The fleet totals carry whole histograms (their percentiles are read from them).
        totals.latency_hdr = fleet.finish().to_bytes();
        let delay = delay.finish();
        if !delay.is_empty() {
            totals.delay_hdr = delay.to_bytes();
        }
        let late_age = late_age.finish();
        if !late_age.is_empty() {
            totals.late_age_hdr = late_age.to_bytes();
        }
        Rendered {
            status: {
                let mut status = pb::RunStatus {
                    run_id: head.run_id.clone(),
                    supervision: Some(crate::supervision::sum(
                        agents.iter().filter_map(|a| a.supervision.as_ref()),
                    )),
                    agents,
                    totals: Some(totals),
                    ..Default::default()
                };
                head.overlay(&mut status);
                status
            },
            agent_histograms: histograms,
        }
    }
}

/// How an agent's processes fared, from its incarnations: each one is a process started, and
/// says why it ended. A restart is a start beyond an instance's first.
fn supervision(
    reports: &[Arc<pb::InstanceStatus>],
    usage: Option<&pb::HostUsage>,
) -> pb::Supervision {
    let mut s = pb::Supervision {
        lease_expiries: usage.map_or(0, |u| u.lease_expiries),
        ..Default::default()
    };
    let mut started = std::collections::BTreeSet::new();
    for r in reports.iter().filter(|r| r.incarnation != 0) {
        s.processes_started += 1;
        started.insert(r.index);
        match pb::End::try_from(r.end).unwrap_or(pb::End::None) {
            pb::End::Crashed => s.crashes += 1,
            pb::End::Lease => s.lease_stops += 1,
            pb::End::Shed => s.shed += 1,
            _ => {}
        }
    }
    s.restarts = s.processes_started - started.len() as u64;
    s
}

/// Instance lists travel without their histograms: the agent totals carry the merged one.
fn strip_histogram(s: &pb::InstanceStatus) -> pb::InstanceStatus {
    pb::InstanceStatus {
        counters: s.counters.as_ref().map(pb::Counters::without_histograms),
        run_id: s.run_id.clone(),
        last_error: s.last_error.clone(),
        ..*s
    }
}
