//! The coordinator's control core: desired state (the run, its plan, the epoch) and observed state (agents and their reports), with every decision a function of (state, event, now).
//!
//! Nothing here reads a clock, touches a socket or a file: `server.rs` passes `now` in, sends
//! the assignments a decision returns and writes the bytes it hands out. So each rule of
//! leases, handoffs and epochs is a unit test on a fake clock (see the tests below).

mod driven;
mod persistence;
mod placement;
mod status;
#[cfg(test)]
mod tests;

pub use persistence::StateToWrite;
pub use status::{MergedCache, Rendered, RunHead, StatusSnapshot};

use crate::plan::{AgentAssignment, InstanceRange, Plan};
use crate::planning;
use crate::wire::pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The moment of an event, read once at the edge: a monotonic instant for leases and
/// handoffs, and the wall clock for what must survive a restart (epochs, run times).
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Instant,
    pub unix_ms: u64,
}

impl Now {
    pub fn unix_s(self) -> f64 {
        self.unix_ms as f64 / 1000.0
    }
}

/// The operator's settings the decisions depend on.
#[derive(Clone, Debug)]
pub struct Limits {
    pub lease: Duration,
    /// Added to the lease before a silent agent's ranges move: by then the agent has surely
    /// stopped its simulators, and they theirs, so no vehicle is driven twice.
    pub grace: Duration,
    pub max_agents: usize,
    pub max_join_rate: u32,
}

/// How long a moved instance rests between its old and its new agent: the old one stops it
/// within a heartbeat, and a vehicle's last message from one host and its first from the
/// next are never closer than the 2 s in which a sink would call them a conflict.
pub const HANDOFF: Duration = Duration::from_millis(2500);

/// Metrics alone are written at most this often: they only save counts across a restart.
const METRICS_WRITE_EVERY: Duration = Duration::from_secs(2);

/// What an event asks the adapter to do besides answering.
#[must_use]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Commands {
    /// The desired state changed: run a reconcile tick now rather than at the next heartbeat.
    pub reconcile: bool,
}

const RECONCILE: Commands = Commands { reconcile: true };
const NOTHING: Commands = Commands { reconcile: false };

/// One assignment to send: to `agent` over its session `session`.
#[derive(Debug)]
pub struct Send {
    pub agent: String,
    pub session: u64,
    pub assignment: pb::Assignment,
}

pub struct AgentEntry {
    pub name: String,
    pub hardware: pb::Hardware,
    pub max_vehicles: u64,
    pub address: String,
    /// The id of its open session, if any.
    pub session: Option<u64>,
    pub last_seen: Instant,
    pub usage: pb::HostUsage,
    /// Epoch of the assignment the agent says it runs.
    pub epoch_seen: u64,
    /// The agent said it stopped everything on a lease expiry and waits for a newer epoch.
    pub lapsed: bool,
}

impl AgentEntry {
    pub fn connected(&self) -> bool {
        self.session.is_some()
    }
}

pub struct Run {
    pub id: String,
    pub spec: pb::RunSpec,
    pub params: pb::PlanParams,
    pub plan: Plan,
    /// Unix seconds: wall clock, so that it survives a restart.
    pub started: f64,
    pub state: pb::RunState,
    pub ended: Option<f64>,
    /// Instances between two agents: taken from the old one, given to the new one once the
    /// old one has had time to stop them (see `HANDOFF`).
    pub parked: Vec<Parked>,
    /// Why the run failed (state Failed).
    pub failure: String,
}

pub struct Parked {
    pub instance: InstanceRange,
    pub from: String,
    pub to: String,
    /// The epoch that took it from `from`.
    pub epoch: u64,
    /// When `from` first reported running that epoch (or a newer one): it moves on a handoff
    /// after that, or once `from` has been silent for lease + grace. Counting from the order
    /// instead would let a frozen agent, which reads the order only when it thaws, overlap.
    pub let_go: Option<Instant>,
}

/// Why a join is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinRefused {
    Rate(u32),
    Full(usize),
    Taken { address: String },
}

/// Why a session is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionRefused {
    NotJoined,
    AlreadyOpen,
}

/// An agent asking to join, as its request said.
pub struct Joining {
    pub name: String,
    pub hardware: pb::Hardware,
    pub max_vehicles: u64,
    pub address: String,
}

pub struct Control {
    limits: Limits,
    agents: BTreeMap<String, AgentEntry>,
    run: Option<Run>,
    epoch: u64,
    /// The latest report of each (agent, instance, incarnation) of the current run, its
    /// histogram kept as the compressed bytes the agent sent (a few KB, not a dense 170 KB).
    incarnations: BTreeMap<(String, u32, u64), Arc<pb::InstanceStatus>>,
    /// When each agent's reports last changed (in `version` units), so a status only
    /// re-merges the histograms of agents that reported since.
    reported: HashMap<String, u64>,
    /// Counts changes; the marks in `reported` are taken from it.
    version: u64,
    next_session: u64,
    /// The desired state changed since it was last handed out to be written.
    dirty: bool,
    /// Metrics arrived since the state was last handed out to be written.
    metrics_dirty: bool,
    last_write: Option<Instant>,
    /// When this coordinator started: an agent it has not heard from yet only counts as lost
    /// once it had a whole lease and grace to reconnect.
    born: Instant,
    /// Joins in the current second: (second since `born`, count).
    joins: (u64, u32),
    /// When each instance of the run (by index) was last reported running, or the run
    /// started: how long its vehicles have gone undriven.
    driven: HashMap<u32, Instant>,
}

impl Control {
    pub fn new(limits: Limits, now: Now) -> Control {
        Control {
            limits,
            agents: BTreeMap::new(),
            run: None,
            // Epochs start at the wall clock in milliseconds, so a restarted coordinator's
            // commands are never older than the ones its agents already applied.
            epoch: now.unix_ms,
            incarnations: BTreeMap::new(),
            reported: HashMap::new(),
            version: 0,
            next_session: 0,
            dirty: false,
            metrics_dirty: false,
            last_write: None,
            born: now.mono,
            joins: (0, 0),
            driven: HashMap::new(),
        }
    }

    /// The epoch the last command was stamped with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Changes whenever anything a status shows may have changed.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn run(&self) -> Option<&Run> {
        self.run.as_ref()
    }

    pub fn running(&self) -> bool {
        self.run
            .as_ref()
            .is_some_and(|r| r.state == pb::RunState::Running)
    }

    fn bump_epoch(&mut self, now: Now) {
        self.epoch = (self.epoch + 1).max(now.unix_ms);
        self.dirty = true;
        self.version += 1;
    }

    pub fn join(&mut self, j: Joining, now: Now) -> Result<(), JoinRefused> {
        let second = now.mono.saturating_duration_since(self.born).as_secs();
        if self.joins.0 != second {
            self.joins = (second, 0);
        }
        self.joins.1 += 1;
        if self.joins.1 > self.limits.max_join_rate {
            return Err(JoinRefused::Rate(self.limits.max_join_rate));
        }
        if !self.agents.contains_key(&j.name) && self.agents.len() >= self.limits.max_agents {
            return Err(JoinRefused::Full(self.limits.max_agents));
        }
        if let Some(existing) = self.agents.get(&j.name) {
            // A name held by a silent session (its process died without the connection
            // closing, or froze) may be taken over once that session outlived its lease.
            if existing.connected() && self.silent_for(existing, now) < self.limits.lease {
                return Err(JoinRefused::Taken {
                    address: existing.address.clone(),
                });
            }
        }
        self.agents.insert(
            j.name.clone(),
            AgentEntry {
                name: j.name,
                hardware: j.hardware,
                max_vehicles: j.max_vehicles,
                address: j.address,
                session: None,
                last_seen: now.mono,
                usage: pb::HostUsage::default(),
                epoch_seen: 0,
                lapsed: false,
            },
        );
        self.version += 1;
        Ok(())
    }

    fn silent_for(&self, a: &AgentEntry, now: Now) -> Duration {
        now.mono.saturating_duration_since(a.last_seen)
    }

    /// An agent opens its session (its Hello says which epoch it last applied). Returns the
    /// session's id.
    pub fn open_session(
        &mut self,
        name: &str,
        hello_epoch: u64,
        now: Now,
    ) -> Result<(u64, Commands), SessionRefused> {
        let Some(agent) = self.agents.get_mut(name) else {
            return Err(SessionRefused::NotJoined);
        };
        if agent.connected() {
            return Err(SessionRefused::AlreadyOpen);
        }
        self.next_session += 1;
        let id = self.next_session;
        agent.session = Some(id);
        agent.last_seen = now.mono;
        agent.epoch_seen = hello_epoch;
        // An agent that lost its lease only resumes on a newer epoch than it had.
        self.bump_epoch(now);
        Ok((id, RECONCILE))
    }

    /// A heartbeat: renews what is known of the agent and records its instances' reports.
    pub fn heartbeat(&mut self, name: &str, hb: pb::Heartbeat, now: Now) -> Commands {
        let lease = self.limits.lease;
        let mut resumed = false;
        let mut lapsed = false;
        if let Some(agent) = self.agents.get_mut(name) {
            // Back from a silence longer than its lease (e.g. it was frozen): it has stopped
            // everything and refuses its queued, older assignments; it waits for a newer epoch.
            resumed = now.mono.saturating_duration_since(agent.last_seen) > lease;
            agent.last_seen = now.mono;
            agent.epoch_seen = hb.epoch;
            agent.usage = hb.usage.unwrap_or_default();
            agent.lapsed = hb.lapsed;
            // It stopped everything on its own lease expiry (it was starved, or cut off one
            // way) and trusts only an epoch newer than the one it holds: issue one, or it
            // would wait for ever while every assignment it hears repeats the old one.
            lapsed = hb.lapsed && hb.epoch >= self.epoch;
        }
        if let Some(run) = self.run.as_mut() {
            for p in &mut run.parked {
                if p.from == name && p.let_go.is_none() && hb.epoch >= p.epoch {
                    p.let_go = Some(now.mono);
                }
            }
        }
        self.record(name, hb.instances, now);
        if resumed || lapsed {
            if lapsed {
                tracing::warn!(
                    agent = name,
                    "agent stopped its instances on a lease expiry; confirming its assignment with a newer epoch"
                );
            } else {
                tracing::warn!(
                    agent = name,
                    "agent is back after a silence longer than its lease"
                );
            }
            self.bump_epoch(now);
            return RECONCILE;
        }
        NOTHING
    }

    /// This coordinator's own loop ran `lag` late (it was starved of CPU): its agents' silence
    /// over that time is its own, and is not held against them when judging who is lost.
    pub fn stalled(&mut self, lag: Duration, now: Now) {
        tracing::warn!(
            ?lag,
            "the coordinator's own loop ran late; not counting that time against its agents' leases"
        );
        for a in self.agents.values_mut() {
            a.last_seen = (a.last_seen + lag).min(now.mono);
        }
    }

    /// The session `session` of `name` ended (its stream closed or its queue did).
    pub fn session_closed(&mut self, name: &str, session: u64) -> Commands {
        let running = self.running();
        let Some(agent) = self.agents.get_mut(name) else {
            return NOTHING;
        };
        if agent.session != Some(session) {
            return NOTHING;
        }
        // Only a loss during a run matters; agents leave idle coordinators freely.
        if running {
            tracing::warn!(agent = name, "agent disconnected during the run");
        } else {
            tracing::info!(agent = name, "agent disconnected");
        }
        agent.session = None;
        self.version += 1;
        RECONCILE
    }

    /// The reconcile tick: finishes a run that is over, moves the instances of agents lost
    /// for longer than lease + grace, releases handed-off instances, and returns every
    /// connected agent's desired assignment (which, resent each heartbeat, renews its lease).
    pub fn tick(&mut self, now: Now) -> Vec<Send> {
        self.update_run_state(now);
        let moved = self.move_orphans(now);
        if moved | self.release_parked(now) {
            self.bump_epoch(now);
        }
        let planned: HashMap<&str, &AgentAssignment> = match &self.run {
            Some(run) if run.state == pb::RunState::Running => run
                .plan
                .agents
                .iter()
                .map(|a| (a.name.as_str(), a))
                .collect(),
            _ => HashMap::new(),
        };
        self.agents
            .values()
            .filter_map(|a| {
                Some(Send {
                    agent: a.name.clone(),
                    session: a.session?,
                    assignment: self.assignment_of(planned.get(a.name.as_str()).copied()),
                })
            })
            .collect()
    }

    /// The state to write to the state dir, if it is due: at once when the desired state
    /// changed, every `METRICS_WRITE_EVERY` when only metrics did. Taken here, under the lock,
    /// so it is one consistent moment; the reports are shared, not copied, so that encoding
    /// them (tens of MB for 10,000 agents) happens off the lock, with the writing.
    pub fn take_write(&mut self, now: Now) -> Option<StateToWrite> {
        let metrics_due = self.metrics_dirty
            && self
                .last_write
                .is_none_or(|t| now.mono.saturating_duration_since(t) >= METRICS_WRITE_EVERY);
        if !self.dirty && !metrics_due {
            return None;
        }
        self.dirty = false;
        self.metrics_dirty = false;
        self.last_write = Some(now.mono);
        Some(StateToWrite {
            head: self.stored_head(),
            incarnations: self
                .incarnations
                .iter()
                .map(|((agent, _, _), status)| (agent.clone(), status.clone()))
                .collect(),
        })
    }

    /// The connected agents as the planner sees them.
    pub fn connected_hosts(&self) -> Vec<planning::Host> {
        self.agents
            .values()
            .filter(|a| a.connected())
            .map(|a| planning::Host {
                name: a.name.clone(),
                hardware: a.hardware.clone(),
                max_vehicles: a.max_vehicles,
            })
            .collect()
    }

    pub fn list_agents(&self, now: Now) -> Vec<pb::AgentInfo> {
        self.agents
            .values()
            .map(|a| pb::AgentInfo {
                agent_id: a.name.clone(),
                name: a.name.clone(),
                hardware: Some(a.hardware.clone()),
                max_vehicles: a.max_vehicles,
                connected: a.connected(),
                last_seen_s_ago: self.silent_for(a, now).as_secs_f64(),
                address: a.address.clone(),
            })
            .collect()
    }
}
