//! Which planned vehicles no process drives right now, since when and why, and the rule that
//! fails a run whose fleet went undriven too long: nothing stops silently.

use super::{AgentEntry, Control, Now};
use crate::wire::pb::{self, End, Phase};
use std::time::Instant;

/// One instance whose vehicles are not driven now.
#[derive(Debug, Clone, PartialEq)]
pub struct Undriven {
    pub agent: String,
    pub index: u32,
    pub vehicles: u64,
    /// When it was last seen running (or the run started).
    pub since: Instant,
    pub cause: String,
}

/// Undriven vehicles of one agent: how many, the longest wait and its cause.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentUndriven {
    pub vehicles: u64,
    pub longest_s: f64,
    pub cause: String,
}

/// Why an instance whose latest report is `s` does not run (None: it runs, or it is done).
fn cause_of(s: &pb::InstanceStatus, agent: &AgentEntry) -> Option<String> {
    let phase = pb::Phase::try_from(s.phase).unwrap_or(Phase::Unspecified);
    let end = pb::End::try_from(s.end).unwrap_or(End::None);
    if phase == Phase::Running || end == End::Finished {
        return None;
    }
    if agent.lapsed {
        return Some("its agent stopped it on a lease expiry and waits for a newer epoch".into());
    }
    Some(match (phase, end) {
        (Phase::Starting, End::None) if agent.usage.starved => {
            "held back: its agent is starved of CPU".into()
        }
        (Phase::Starting, End::None) => "starting".into(),
        (Phase::Starting, End::Lease) => "restarting: its keep-alive from the agent ran out".into(),
        (Phase::Backoff, _) => format!("crashed ({}); restarting with backoff", s.last_error),
        (Phase::Failed, _) => format!("crash loop: its agent gave up ({})", s.last_error),
        (_, End::Lease) => "stopped on a lease expiry of its agent".into(),
        (_, End::Shed) => "shed by its agent, which was starved of CPU".into(),
        (_, End::Crashed) => format!("crashed ({})", s.last_error),
        (_, End::Unassigned | End::Shutdown) => "stopped by its agent".into(),
        _ => "not running".into(),
    })
}

impl Control {
    /// Every planned instance that no process drives now. Nothing while no run goes on or
    /// after its duration (then every instance is meant to stop).
    pub fn undriven(&self, now: Now) -> Vec<Undriven> {
        let Some(run) = self
            .run
            .as_ref()
            .filter(|r| r.state == pb::RunState::Running)
        else {
            return Vec::new();
        };
        if run.spec.duration_s > 0.0 && now.unix_s() >= run.spec.run_start + run.spec.duration_s {
            return Vec::new();
        }
        let since = |index: u32| self.driven.get(&index).copied().unwrap_or(now.mono);
        let mut out: Vec<Undriven> = run
            .parked
            .iter()
            .map(|p| Undriven {
                agent: p.to.clone(),
                index: p.instance.index,
                vehicles: p.instance.vehicles,
                since: since(p.instance.index),
                cause: format!("in handoff from {} to {}", p.from, p.to),
            })
            .collect();
        for planned in &run.plan.agents {
            let entry = self.agents.get(&planned.name);
            let live = entry.filter(|a| {
                a.connected()
                    && now.mono.saturating_duration_since(a.last_seen) <= self.limits.lease
            });
            // The latest incarnation of each of its instances, in one pass over its reports.
            let mut latest: std::collections::HashMap<u32, &pb::InstanceStatus> =
                Default::default();
            for ((_, index, _), s) in self
                .incarnations
                .range((planned.name.clone(), 0, 0)..)
                .take_while(|((a, _, _), _)| a == &planned.name)
            {
                latest.insert(*index, s);
            }
            for i in &planned.instances {
                let cause = match (live, latest.get(&i.index)) {
                    (None, _) => Some(format!("agent {} is lost", planned.name)),
                    (Some(_), None) => Some("not reported yet".to_string()),
                    (Some(a), Some(s)) => cause_of(s, a),
                };
                if let Some(cause) = cause {
                    out.push(Undriven {
                        agent: planned.name.clone(),
                        index: i.index,
                        vehicles: i.vehicles,
                        since: since(i.index),
                        cause,
                    });
                }
            }
        }
        out
    }

    /// Fails the run when some planned vehicles have gone undriven longer than the run allows
    /// (`max_not_driven_s`), naming the agent and why. Returns whether it did.
    pub(super) fn fail_if_undriven(&mut self, now: Now) -> bool {
        let limit = match &self.run {
            Some(r) if r.state == pb::RunState::Running && r.spec.max_not_driven_s > 0.0 => {
                r.spec.max_not_driven_s
            }
            _ => return false,
        };
        let undriven = self.undriven(now);
        let Some(worst) = undriven
            .iter()
            .max_by_key(|u| now.mono.saturating_duration_since(u.since))
        else {
            return false;
        };
        let waited = now
            .mono
            .saturating_duration_since(worst.since)
            .as_secs_f64();
        if waited <= limit {
            return false;
        }
        let vehicles: u64 = undriven
            .iter()
            .filter(|u| u.agent == worst.agent)
            .map(|u| u.vehicles)
            .sum();
        let failure = format!(
            "{vehicles} vehicles of agent {} were not driven for {waited:.0} s ({}); --max-not-driven is {limit:.0} s",
            worst.agent, worst.cause
        );
        tracing::error!("run failed: {failure}");
        if let Some(run) = &mut self.run {
            run.state = pb::RunState::Failed;
            run.ended = Some(now.unix_s());
            run.failure = failure;
        }
        true
    }
}

/// Per agent: undriven vehicles, the longest wait and the cause of that one.
pub fn per_agent(
    undriven: &[Undriven],
    now: Instant,
) -> std::collections::HashMap<String, AgentUndriven> {
    let mut out: std::collections::HashMap<String, AgentUndriven> = Default::default();
    for u in undriven {
        let e = out.entry(u.agent.clone()).or_default();
        e.vehicles += u.vehicles;
        let waited = now.saturating_duration_since(u.since).as_secs_f64();
        if waited >= e.longest_s {
            e.longest_s = waited;
            e.cause = u.cause.clone();
        }
    }
    out
}
