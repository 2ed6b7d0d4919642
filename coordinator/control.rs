//! The coordinator's control core: desired state (the run, its plan, the epoch) and observed state (agents and their reports), with every decision a function of (state, event, now).
//!
//! Nothing here reads a clock, touches a socket or a file: `server.rs` passes `now` in, sends
//! the assignments a decision returns and writes the bytes it hands out. So each rule of
//! leases, handoffs and epochs is a unit test on a fake clock (see the tests below).

mod driven;

use crate::planning;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vtox::metrics::{BucketSum, Buckets};
use vtox::plan::{AgentAssignment, InstanceRange, Plan};
use vtox::wire::pb;

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

/// A stored run's state; files from before the enum hold it as text. A run is never idle:
/// a stored run without a state is taken as stopped.
fn restored_state(r: &pb::StoredRun) -> pb::RunState {
    match r.run_state() {
        pb::RunState::Idle => match pb::RunState::from_legacy(&r.legacy_state) {
            pb::RunState::Idle => pb::RunState::Stopped,
            s => s,
        },
        s => s,
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

    /// Starts a run over the connected agents.
    pub fn start(
        &mut self,
        req: pb::StartRequest,
        now: Now,
    ) -> Result<(pb::StartReply, Commands), String> {
        let params = req.params.unwrap_or_default();
        let mut spec = req.spec.unwrap_or_default();
        if let Some(run) = self
            .run
            .as_ref()
            .filter(|r| r.state == pb::RunState::Running)
        {
            return Err(format!(
                "run {} is in progress; stop it first (vtox-coord stop)",
                run.id
            ));
        }
        let hosts = self.connected_hosts();
        if (hosts.len() as u32) < req.expect_agents {
            return Err(format!(
                "{} agents are connected, {} expected",
                hosts.len(),
                req.expect_agents
            ));
        }
        let (plan, reply) = planning::plan_hosts(&hosts, &params)?;
        if spec.run_start <= 0.0 {
            // A moment ahead, so that every host starts its schedule from the same instant.
            spec.run_start = now.unix_s() + 1.0;
        }
        let id = format!("run-{}", now.unix_ms);
        tracing::info!(
            run = id,
            vehicles = plan.vehicles,
            agents = plan.agents.len(),
            "run started"
        );
        self.run = Some(Run {
            id: id.clone(),
            spec,
            params,
            plan,
            started: now.unix_s(),
            state: pb::RunState::Running,
            ended: None,
            parked: Vec::new(),
            failure: String::new(),
        });
        self.incarnations.clear();
        self.reported.clear();
        self.reset_driven(now);
        self.bump_epoch(now);
        Ok((
            pb::StartReply {
                run_id: id,
                plan: Some(reply),
            },
            RECONCILE,
        ))
    }

    /// Stops the run; says whether one was running.
    pub fn stop(&mut self, now: Now) -> (bool, Commands) {
        let was_running = match &mut self.run {
            Some(run) if run.state == pb::RunState::Running => {
                run.state = pb::RunState::Stopped;
                run.ended = Some(now.unix_s());
                tracing::info!(run = run.id, "run stopped");
                true
            }
            _ => false,
        };
        self.bump_epoch(now);
        (was_running, RECONCILE)
    }

    /// Moves instances, largest index first, from agents above their recommended load (75% of
    /// their capacity) to live agents below it, through the parking lot. Returns what moved.
    pub fn rebalance(&mut self, now: Now) -> Result<((u32, u64), Commands), String> {
        if !self.running() {
            return Err("no run is in progress".into());
        }
        self.include_late_joiners();
        let lease = self.limits.lease;
        let agents = &self.agents;
        let Some(run) = self.run.as_mut() else {
            return Err("no run is in progress".into());
        };
        let live = |name: &str| {
            agents.get(name).is_some_and(|a| {
                a.connected() && now.mono.saturating_duration_since(a.last_seen) < lease
            })
        };
        let recommended =
            |max: u64| (max as f64 * vtox::capacity::RECOMMENDED_SHARE).floor() as u64;
        let mut incoming: BTreeMap<String, u64> = BTreeMap::new();
        for p in &run.parked {
            *incoming.entry(p.to.clone()).or_default() += p.instance.vehicles;
        }
        let (mut moved, mut vehicles) = (0u32, 0u64);
        // What `bump_epoch` below makes of it.
        let next_epoch = (self.epoch + 1).max(now.unix_ms);
        let plan = &mut run.plan.agents;
        for from in 0..plan.len() {
            while plan[from].vehicles > recommended(plan[from].max_vehicles) {
                let Some(inst) = plan[from].instances.last().copied() else {
                    break;
                };
                let to = (0..plan.len())
                    .filter(|&j| j != from && live(&plan[j].name))
                    .map(|j| {
                        let load =
                            plan[j].vehicles + incoming.get(&plan[j].name).copied().unwrap_or(0);
                        (j, recommended(plan[j].max_vehicles).saturating_sub(load))
                    })
                    .filter(|(_, room)| *room >= inst.vehicles)
                    .max_by_key(|(j, room)| (*room, std::cmp::Reverse(*j)));
                let Some((to, _)) = to else { break };
                plan[from].instances.pop();
                plan[from].vehicles -= inst.vehicles;
                let dest = plan[to].name.clone();
                *incoming.entry(dest.clone()).or_default() += inst.vehicles;
                tracing::info!(
                    instance = inst.index,
                    from = plan[from].name,
                    to = dest,
                    "rebalancing"
                );
                run.parked.push(Parked {
                    instance: inst,
                    from: plan[from].name.clone(),
                    to: dest,
                    epoch: next_epoch,
                    let_go: None,
                });
                moved += 1;
                vehicles += inst.vehicles;
            }
        }
        let commands = if moved > 0 {
            self.bump_epoch(now);
            RECONCILE
        } else {
            NOTHING
        };
        Ok(((moved, vehicles), commands))
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

    /// Puts agents that joined after the plan was made into it (with nothing yet), so that
    /// moves and rebalancing can give them work.
    fn include_late_joiners(&mut self) {
        let Some(run) = self.run.as_mut() else { return };
        let load = planning::load_params(&run.params);
        let planned: std::collections::HashSet<&str> =
            run.plan.agents.iter().map(|a| a.name.as_str()).collect();
        let mut late = Vec::new();
        for (name, entry) in &self.agents {
            if entry.connected() && !planned.contains(name.as_str()) {
                let host = planning::Host {
                    name: name.clone(),
                    hardware: entry.hardware.clone(),
                    max_vehicles: entry.max_vehicles,
                };
                let max = vtox::capacity::estimate(&planning::host_spec(&host), &load).max_vehicles;
                late.push(AgentAssignment {
                    name: name.clone(),
                    max_vehicles: max,
                    vehicles: 0,
                    instances: Vec::new(),
                });
            }
        }
        run.plan.agents.extend(late);
    }

    /// Moves the instances of agents silent for longer than lease + grace to connected agents
    /// with room, whole and with the same vehicle numbers; late joiners take part. Instances
    /// that fit nowhere stay where they are and show as unassigned until an agent with room
    /// joins. Returns whether anything moved.
    fn move_orphans(&mut self, now: Now) -> bool {
        let limit = self.limits.lease + self.limits.grace;
        let born = self.born;
        let silent = |a: &AgentEntry| now.mono.saturating_duration_since(a.last_seen);
        let dead_in = |agents: &BTreeMap<String, AgentEntry>, name: &str| match agents.get(name) {
            Some(a) => silent(a) > limit,
            None => now.mono.saturating_duration_since(born) > limit,
        };
        let Some(run) = self
            .run
            .as_ref()
            .filter(|r| r.state == pb::RunState::Running)
        else {
            return false;
        };
        if !run
            .plan
            .agents
            .iter()
            .any(|a| !a.instances.is_empty() && dead_in(&self.agents, &a.name))
        {
            return false;
        }
        self.include_late_joiners();
        let agents_map = &self.agents;
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        // Silence, not a closed stream, is what counts: a frozen agent keeps its TCP connection.
        let live = |name: &str| {
            agents_map
                .get(name)
                .is_some_and(|a| a.connected() && silent(a) < limit)
        };
        let dead = |name: &str| dead_in(agents_map, name);
        let mut moved = false;
        let agents = &mut run.plan.agents;
        for from in 0..agents.len() {
            if agents[from].instances.is_empty() || !dead(&agents[from].name) {
                continue;
            }
            let orphans = std::mem::take(&mut agents[from].instances);
            for inst in orphans {
                let to = (0..agents.len())
                    .filter(|&i| i != from && live(&agents[i].name))
                    .filter(|&i| {
                        agents[i].max_vehicles.saturating_sub(agents[i].vehicles) >= inst.vehicles
                    })
                    .max_by_key(|&i| {
                        (
                            agents[i].max_vehicles.saturating_sub(agents[i].vehicles),
                            std::cmp::Reverse(i),
                        )
                    });
                let dest = to.unwrap_or(from);
                if dest != from {
                    tracing::warn!(
                        instance = inst.index,
                        from = agents[from].name,
                        to = agents[dest].name,
                        "moving vehicles {}..{} of a lost agent",
                        inst.first_vehicle,
                        inst.first_vehicle + inst.vehicles
                    );
                    agents[from].vehicles -= inst.vehicles;
                    agents[dest].vehicles += inst.vehicles;
                    moved = true;
                }
                agents[dest].instances.push(inst);
            }
        }
        moved
    }

    /// Hands parked instances to their new agents once their handoff time has passed and
    /// their old agent is known to have let go.
    fn release_parked(&mut self, now: Now) -> bool {
        let limit = self.limits.lease + self.limits.grace;
        let agents = &self.agents;
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        let ready_now = |p: &Parked| {
            p.let_go.is_some_and(|t| t + HANDOFF <= now.mono)
                || agents
                    .get(&p.from)
                    .is_none_or(|a| now.mono.saturating_duration_since(a.last_seen) > limit)
        };
        let (ready, waiting): (Vec<Parked>, Vec<Parked>) =
            run.parked.drain(..).partition(ready_now);
        run.parked = waiting;
        let released = !ready.is_empty();
        for p in ready {
            match run.plan.agents.iter_mut().find(|a| a.name == p.to) {
                Some(a) => {
                    a.vehicles += p.instance.vehicles;
                    a.instances.push(p.instance);
                    a.instances.sort_by_key(|i| i.index);
                }
                None => tracing::error!(agent = p.to, "a parked instance's agent left the plan"),
            }
        }
        released
    }

    /// The assignment of an agent with `planned` in the running plan (None: nothing to run).
    fn assignment_of(&self, planned: Option<&AgentAssignment>) -> pb::Assignment {
        match &self.run {
            Some(run) if run.state == pb::RunState::Running => pb::Assignment {
                epoch: self.epoch,
                run_id: run.id.clone(),
                spec: Some(run.spec.clone()),
                instances: planned
                    .iter()
                    .flat_map(|a| a.instances.iter())
                    .map(pb::InstanceSpec::from)
                    .collect(),
            },
            _ => pb::Assignment {
                epoch: self.epoch,
                run_id: String::new(),
                spec: None,
                instances: Vec::new(),
            },
        }
    }

    /// The stored state but for its incarnations (see `StateToWrite`).
    fn stored_head(&self) -> pb::StoredState {
        pb::StoredState {
            epoch: self.epoch,
            incarnations: Vec::new(),
            run: self.run.as_ref().map(|r| pb::StoredRun {
                id: r.id.clone(),
                legacy_state: String::new(),
                run_state: r.state.into(),
                spec: Some(r.spec.clone()),
                params: Some(r.params),
                agents: r
                    .plan
                    .agents
                    .iter()
                    .map(|a| pb::StoredAgent {
                        name: a.name.clone(),
                        max_vehicles: a.max_vehicles,
                        // Instances in handoff are kept with their new agent: a restart takes
                        // longer than the handoff anyway.
                        instances: a
                            .instances
                            .iter()
                            .chain(
                                r.parked
                                    .iter()
                                    .filter(|p| p.to == a.name)
                                    .map(|p| &p.instance),
                            )
                            .map(pb::InstanceSpec::from)
                            .collect(),
                    })
                    .collect(),
                started_unix: r.started,
                ended_unix: r.ended.unwrap_or(0.0),
                vehicles: r.plan.vehicles,
                failure: r.failure.clone(),
            }),
        }
    }

    /// A coordinator resuming what `stored` kept.
    pub fn restore(limits: Limits, stored: pb::StoredState, now: Now) -> Control {
        let run = stored.run.map(|r| Run {
            state: restored_state(&r),
            id: r.id,
            spec: r.spec.unwrap_or_default(),
            params: r.params.unwrap_or_default(),
            plan: Plan {
                vehicles: r.vehicles,
                agents: r
                    .agents
                    .into_iter()
                    .map(|a| AgentAssignment {
                        vehicles: a.instances.iter().map(|i| i.vehicles).sum(),
                        name: a.name,
                        max_vehicles: a.max_vehicles,
                        instances: a.instances.iter().map(InstanceRange::from).collect(),
                    })
                    .collect(),
            },
            started: r.started_unix,
            ended: (r.ended_unix > 0.0).then_some(r.ended_unix),
            parked: Vec::new(),
            failure: r.failure,
        });
        let incarnations = stored
            .incarnations
            .into_iter()
            .filter_map(|i| {
                let status = i.status?;
                Some((
                    (i.agent, status.index, status.incarnation),
                    Arc::new(status),
                ))
            })
            .collect();
        let mut c = Control::new(limits, now);
        // Newer than anything issued before the restart, whatever the clock did meanwhile.
        c.epoch = (stored.epoch + 1).max(now.unix_ms);
        c.run = run;
        c.incarnations = incarnations;
        // A restarted coordinator gives every instance a fresh start on the undriven clock.
        c.reset_driven(now);
        c
    }

    fn reset_driven(&mut self, now: Now) {
        self.driven.clear();
        if let Some(run) = &self.run {
            for a in &run.plan.agents {
                for i in &a.instances {
                    self.driven.insert(i.index, now.mono);
                }
            }
        }
    }

    /// A run with a duration is finished once every planned instance reported that it exited,
    /// or well after its end (an agent that vanished cannot hold the run open).
    fn update_run_state(&mut self, now: Now) {
        if self.fail_if_undriven(now) {
            self.bump_epoch(now);
            return;
        }
        let Some(run) = &self.run else { return };
        if run.state != pb::RunState::Running || run.spec.duration_s <= 0.0 {
            return;
        }
        let elapsed = now.unix_s() - run.spec.run_start;
        if elapsed < run.spec.duration_s {
            return;
        }
        let all_exited = || {
            run.plan.agents.iter().all(|a| {
                a.instances.iter().all(|i| {
                    self.incarnations
                        .range((a.name.clone(), i.index, 0)..=(a.name.clone(), i.index, u64::MAX))
                        .next_back()
                        .is_some_and(|(_, s)| s.phase == pb::Phase::Exited as i32)
                })
            })
        };
        if elapsed > run.spec.duration_s + 30.0 || all_exited() {
            if let Some(run) = &mut self.run {
                run.state = pb::RunState::Finished;
                run.ended = Some(now.unix_s());
            }
            self.bump_epoch(now);
        }
    }

    fn record(&mut self, agent: &str, instances: Vec<pb::InstanceStatus>, now: Now) {
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

/// A state to write: `pb::StoredState` with its incarnations still shared with the core.
pub struct StateToWrite {
    head: pb::StoredState,
    incarnations: Vec<(String, Arc<pb::InstanceStatus>)>,
}

impl StateToWrite {
    /// The `pb::StoredState` encoding, written to `out` as it is made. The incarnations are
    /// appended as the repeated field they are (field 3 of StoredState; agent 1 and status 2
    /// of StoredIncarnation), one at a time from the shared reports: building the message, or
    /// the whole encoding in memory, would first copy tens of MB for 10,000 agents.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        use prost::encoding::{encode_key, encode_varint, message, string, WireType};
        const INCARNATIONS: u32 = 3;
        out.write_all(&prost::Message::encode_to_vec(&self.head))?;
        let mut buf = Vec::new();
        for (agent, status) in &self.incarnations {
            buf.clear();
            let len = string::encoded_len(1, agent) + message::encoded_len(2, &**status);
            encode_key(INCARNATIONS, WireType::LengthDelimited, &mut buf);
            encode_varint(len as u64, &mut buf);
            string::encode(1, agent, &mut buf);
            message::encode(2, &**status, &mut buf);
            out.write_all(&buf)?;
        }
        Ok(())
    }

    /// The whole encoding in memory (for tests).
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = self.write_to(&mut out);
        out
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
            for d in vtox::counters::DEFS
                .iter()
                .filter(|d| d.kind == vtox::counters::Kind::Gauge)
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
                    supervision: Some(vtox::supervision::sum(
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const LEASE: Duration = Duration::from_secs(5);
    const GRACE: Duration = Duration::from_secs(3);

    /// A fake clock: a fixed origin plus whatever the test advances it by.
    struct Clock {
        origin: Instant,
        at: Duration,
        unix0: u64,
    }

    impl Clock {
        fn new() -> Clock {
            Clock {
                origin: Instant::now(),
                at: Duration::ZERO,
                unix0: 1_800_000_000_000,
            }
        }
        fn now(&self) -> Now {
            Now {
                mono: self.origin + self.at,
                unix_ms: self.unix0 + self.at.as_millis() as u64,
            }
        }
        fn advance(&mut self, d: Duration) -> Now {
            self.at += d;
            self.now()
        }
    }

    fn limits() -> Limits {
        Limits {
            lease: LEASE,
            grace: GRACE,
            max_agents: 100,
            max_join_rate: 100,
        }
    }

    fn hardware() -> pb::Hardware {
        pb::Hardware {
            hostname: "h".into(),
            logical_cores: 8,
            physical_cores: 8,
            memory_total_bytes: 16 << 30,
            memory_available_bytes: 16 << 30,
            calibrated_msgs_per_core: 20_000.0,
            ..Default::default()
        }
    }

    fn connect(c: &mut Control, name: &str, max_vehicles: u64, now: Now) -> u64 {
        c.join(
            Joining {
                name: name.into(),
                hardware: hardware(),
                max_vehicles,
                address: String::new(),
            },
            now,
        )
        .unwrap();
        c.open_session(name, 0, now).unwrap().0
    }

    fn start(c: &mut Control, vehicles: u64, now: Now) {
        let req = pb::StartRequest {
            params: Some(pb::PlanParams {
                vehicles,
                per_instance: 50,
                interval_s: 1.2,
                batch_size: 10,
                overcommit: false,
                first_vehicle: 0,
                sink_on_host: false,
            }),
            spec: Some(pb::RunSpec::default()),
            expect_agents: 0,
        };
        let _ = c.start(req, now).unwrap();
    }

    /// A heartbeat of an agent that applied everything sent to it so far.
    fn beat(c: &mut Control, name: &str, now: Now) {
        let hb = pb::Heartbeat {
            epoch: c.epoch(),
            ..Default::default()
        };
        let _ = c.heartbeat(name, hb, now);
    }

    /// Instance indexes per agent, as the tick sends them.
    fn held(sends: &[Send]) -> BTreeMap<String, Vec<u32>> {
        sends
            .iter()
            .map(|s| {
                (
                    s.agent.clone(),
                    s.assignment.instances.iter().map(|i| i.index).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_lost_agents_instances_move_only_after_lease_and_grace() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 100, clock.now());
        connect(&mut c, "b", 300, clock.now());
        start(&mut c, 200, clock.now());
        let before = held(&c.tick(clock.now()));
        assert_eq!(before["a"].len() + before["b"].len(), 4);
        assert!(!before["a"].is_empty());
        // a falls silent; b goes on.
        let mut t = Duration::ZERO;
        while t < LEASE + GRACE - Duration::from_millis(100) {
            let now = clock.advance(Duration::from_millis(100));
            t += Duration::from_millis(100);
            beat(&mut c, "b", now);
            assert_eq!(held(&c.tick(now)), before, "moved after only {t:?}");
        }
        let now = clock.advance(Duration::from_millis(200));
        beat(&mut c, "b", now);
        let epoch = c.epoch();
        let after = held(&c.tick(now));
        assert!(after["a"].is_empty());
        assert_eq!(after["b"].len(), 4);
        assert!(c.epoch() > epoch, "a move is a newer epoch");
    }

    #[test]
    fn a_frozen_agent_gets_a_newer_epoch_only_once_heard_from_again() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        connect(&mut c, "b", 300, clock.now());
        start(&mut c, 200, clock.now());
        let mut sent_to_a = 0;
        // a freezes (its TCP session stays open: assignments queue up for it).
        for _ in 0..12 {
            let now = clock.advance(Duration::from_secs(1));
            beat(&mut c, "b", now);
            for s in c.tick(now) {
                if s.agent == "a" {
                    sent_to_a = sent_to_a.max(s.assignment.epoch);
                }
            }
        }
        // Its vehicles moved meanwhile; it thaws and reports.
        let now = clock.advance(Duration::from_millis(300));
        assert!(c.heartbeat("a", pb::Heartbeat::default(), now).reconcile);
        let next = c.tick(now);
        let to_a = next.iter().find(|s| s.agent == "a").unwrap();
        // Everything queued while it was frozen is older than what it gets now, so the agent
        // (which after a lapsed lease only takes a newer epoch) refuses the queue.
        assert!(to_a.assignment.epoch > sent_to_a);
        assert!(to_a.assignment.instances.is_empty());
    }

    #[test]
    fn epochs_never_go_back_across_a_restore() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        start(&mut c, 100, clock.now());
        for _ in 0..5 {
            let _ = c.stop(clock.advance(Duration::from_millis(1)));
        }
        let issued = c.epoch();
        let bytes = c.take_write(clock.now()).unwrap().encode();
        // The restarted coordinator's wall clock went back an hour.
        let mut back = Clock::new();
        back.unix0 = clock.unix0 - 3_600_000;
        let stored = <pb::StoredState as prost::Message>::decode(bytes.as_slice()).unwrap();
        let mut r = Control::restore(limits(), stored, back.now());
        assert!(r.epoch() > issued);
        let restored = r.epoch();
        let _ = r.stop(back.now());
        assert!(r.epoch() > restored);
        // And with a clock far ahead, epochs follow it, still upward.
        let mut ahead = Clock::new();
        ahead.unix0 = clock.unix0 + 3_600_000;
        let stored = <pb::StoredState as prost::Message>::decode(bytes.as_slice()).unwrap();
        assert!(Control::restore(limits(), stored, ahead.now()).epoch() > issued);
    }

    #[test]
    fn a_state_file_from_before_the_run_state_enum_still_resumes_its_run() {
        let clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        start(&mut c, 100, clock.now());
        let bytes = c.take_write(clock.now()).unwrap().encode();
        let mut stored = <pb::StoredState as prost::Message>::decode(bytes.as_slice()).unwrap();
        for (legacy, expect) in [
            ("running", pb::RunState::Running),
            ("stopped", pb::RunState::Stopped),
            ("finished", pb::RunState::Finished),
        ] {
            let run = stored.run.as_mut().unwrap();
            run.run_state = 0;
            run.legacy_state = legacy.into();
            let r = Control::restore(limits(), stored.clone(), clock.now());
            assert_eq!(r.status(clock.now()).state(), expect, "{legacy}");
        }
    }

    #[test]
    fn a_restore_keeps_the_run_and_its_counts() {
        let clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        start(&mut c, 100, clock.now());
        let run_id = c.run().unwrap().id.clone();
        let hb = pb::Heartbeat {
            epoch: c.epoch(),
            lapsed: false,
            instances: vec![pb::InstanceStatus {
                run_id: run_id.clone(),
                index: 0,
                incarnation: 1,
                phase: pb::Phase::Running as i32,
                counters: Some(pb::Counters {
                    sent: 10,
                    accepted: 9,
                    failed: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            usage: None,
        };
        let _ = c.heartbeat("a", hb, clock.now());
        let write = c.take_write(clock.now()).unwrap();
        let bytes = write.encode();
        let stored = <pb::StoredState as prost::Message>::decode(bytes.as_slice()).unwrap();
        // The incarnations appended by hand read back as the message prost would have built.
        let mut built = write.head.clone();
        built.incarnations = write
            .incarnations
            .iter()
            .map(|(agent, s)| pb::StoredIncarnation {
                agent: agent.clone(),
                status: Some(pb::InstanceStatus::clone(s)),
            })
            .collect();
        assert_eq!(built.incarnations.len(), 1);
        assert_eq!(stored, built);
        assert_eq!(bytes, prost::Message::encode_to_vec(&built));
        let r = Control::restore(limits(), stored, clock.now());
        let s = r.status(clock.now());
        assert_eq!(s.run_id, run_id);
        assert_eq!(s.state(), pb::RunState::Running);
        assert_eq!(s.totals.unwrap().accepted, 9);
        assert_eq!(s.agents[0].instances_planned, 2);
    }

    #[test]
    fn writes_come_at_once_for_intent_and_at_most_every_two_seconds_for_metrics() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        assert!(c.take_write(clock.now()).is_some());
        assert!(c.take_write(clock.now()).is_none());
        start(&mut c, 50, clock.now());
        assert!(c.take_write(clock.now()).is_some());
        let run_id = c.run().unwrap().id.clone();
        let report = |sent| pb::Heartbeat {
            instances: vec![pb::InstanceStatus {
                run_id: run_id.clone(),
                counters: Some(pb::Counters {
                    sent,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let _ = c.heartbeat("a", report(1), clock.advance(Duration::from_millis(500)));
        assert!(c.take_write(clock.now()).is_none());
        let _ = c.heartbeat("a", report(2), clock.advance(Duration::from_millis(1600)));
        assert!(c.take_write(clock.now()).is_some());
    }

    #[test]
    fn a_late_joiner_takes_the_shortfall() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 100, clock.now());
        connect(&mut c, "b", 100, clock.now());
        start(&mut c, 200, clock.now());
        let _ = c.tick(clock.now());
        // a is lost and b has no room: its vehicles wait, shown as unassigned.
        let _ = c.session_closed("a", 1);
        for _ in 0..10 {
            let now = clock.advance(Duration::from_secs(1));
            beat(&mut c, "b", now);
            let _ = c.tick(now);
        }
        assert_eq!(c.status(clock.now()).unassigned_vehicles, 100);
        let now = clock.advance(Duration::from_secs(1));
        beat(&mut c, "b", now);
        connect(&mut c, "late", 0, now);
        let sends = held(&c.tick(now));
        assert_eq!(sends["late"].len(), 2);
        assert_eq!(sends["b"].len(), 2);
        assert_eq!(c.status(now).unassigned_vehicles, 0);
    }

    #[test]
    fn rebalance_moves_whole_instances_after_the_handoff_gap() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 100, clock.now());
        connect(&mut c, "b", 100, clock.now());
        start(&mut c, 200, clock.now());
        let ranges: BTreeMap<u32, (u64, u64)> = c
            .tick(clock.now())
            .iter()
            .flat_map(|s| s.assignment.instances.clone())
            .map(|i| (i.index, (i.first_vehicle, i.vehicles)))
            .collect();
        let now = clock.advance(Duration::from_secs(1));
        for a in ["a", "b"] {
            beat(&mut c, a, now);
        }
        connect(&mut c, "new", 0, now);
        let ((moved, vehicles), cmd) = c.rebalance(now).unwrap();
        assert!(cmd.reconcile);
        assert_eq!((moved, vehicles), (2, 100));
        // Taken from the old agents at once; nobody drives them until a handoff after the old
        // agents said they let go (at their next heartbeat, 100 ms on here).
        let mut t = Duration::ZERO;
        while t < HANDOFF + Duration::from_millis(100) {
            let sends = held(&c.tick(clock.now()));
            assert!(sends["new"].is_empty(), "given after only {t:?}");
            assert_eq!(sends["a"].len() + sends["b"].len(), 2);
            assert_eq!(c.status(clock.now()).unassigned_vehicles, 100);
            t += Duration::from_millis(100);
            let now = clock.advance(Duration::from_millis(100));
            for a in ["a", "b", "new"] {
                beat(&mut c, a, now);
            }
        }
        let sends = c.tick(clock.now());
        let new = sends.iter().find(|s| s.agent == "new").unwrap();
        assert_eq!(new.assignment.instances.len(), 2);
        for i in &new.assignment.instances {
            assert_eq!(
                ranges[&i.index],
                (i.first_vehicle, i.vehicles),
                "moved whole"
            );
        }
        assert!(c.rebalance(clock.now()).unwrap().0 .0 == 0);
    }

    #[test]
    fn joins_beyond_the_rate_or_the_limit_or_on_a_live_name_are_refused() {
        let mut clock = Clock::new();
        let mut l = limits();
        l.max_join_rate = 2;
        l.max_agents = 3;
        let mut c = Control::new(l, clock.now());
        let j = |name: &str| Joining {
            name: name.into(),
            hardware: hardware(),
            max_vehicles: 0,
            address: "x".into(),
        };
        c.join(j("a"), clock.now()).unwrap();
        c.join(j("b"), clock.now()).unwrap();
        assert_eq!(c.join(j("c"), clock.now()), Err(JoinRefused::Rate(2)));
        let now = clock.advance(Duration::from_secs(1));
        c.join(j("c"), now).unwrap();
        assert_eq!(c.join(j("d"), now), Err(JoinRefused::Full(3)));
        let now = clock.advance(Duration::from_secs(1));
        let _ = c.open_session("a", 0, now).unwrap();
        assert_eq!(
            c.open_session("a", 0, now).unwrap_err(),
            SessionRefused::AlreadyOpen
        );
        assert_eq!(
            c.join(j("a"), now),
            Err(JoinRefused::Taken {
                address: "x".into()
            })
        );
        // A silent session's name is free again after the lease.
        let now = clock.advance(LEASE + Duration::from_millis(1));
        c.join(j("a"), now).unwrap();
    }

    #[test]
    fn a_run_with_a_duration_finishes_when_every_instance_exited() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        let req = pb::StartRequest {
            params: Some(pb::PlanParams {
                vehicles: 50,
                per_instance: 50,
                ..Default::default()
            }),
            spec: Some(pb::RunSpec {
                duration_s: 10.0,
                ..Default::default()
            }),
            expect_agents: 1,
        };
        let _ = c.start(req, clock.now()).unwrap();
        let run_id = c.run().unwrap().id.clone();
        let now = clock.advance(Duration::from_secs(12));
        let _ = c.tick(now);
        assert!(c.running(), "waits for the instance to say it exited");
        let hb = pb::Heartbeat {
            instances: vec![pb::InstanceStatus {
                run_id,
                phase: pb::Phase::Exited as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let _ = c.heartbeat("a", hb, now);
        let _ = c.tick(now);
        assert_eq!(c.status(now).state(), pb::RunState::Finished);
    }

    fn statuses(c: &Control, list: &[(u32, u64, pb::Phase, pb::End)]) -> Vec<pb::InstanceStatus> {
        let run_id = c.run().unwrap().id.clone();
        list.iter()
            .map(|&(index, incarnation, phase, end)| pb::InstanceStatus {
                run_id: run_id.clone(),
                index,
                incarnation,
                phase: phase as i32,
                end: end as i32,
                vehicles: 50,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn an_agent_that_stopped_on_its_own_lease_expiry_gets_a_newer_epoch_at_once() {
        let clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        start(&mut c, 100, clock.now());
        let _ = c.tick(clock.now());
        let held = c.epoch();
        // Its heartbeats never stopped (the coordinator saw no silence), but it lapsed.
        let hb = pb::Heartbeat {
            epoch: held,
            lapsed: true,
            ..Default::default()
        };
        assert_eq!(c.heartbeat("a", hb.clone(), clock.now()), RECONCILE);
        assert!(c.epoch() > held, "a newer epoch, or it waits for ever");
        let sends = c.tick(clock.now());
        assert!(sends.iter().all(|s| s.assignment.epoch > held));
        assert_eq!(sends[0].assignment.instances.len(), 2, "with its instances");
        // A lapsed heartbeat sent before it heard the newer epoch asks for nothing more.
        let newer = c.epoch();
        assert_eq!(c.heartbeat("a", hb, clock.now()), NOTHING);
        assert_eq!(c.epoch(), newer);
    }

    #[test]
    fn undriven_vehicles_are_shown_with_their_cause_and_fail_the_run_after_the_limit() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        let req = pb::StartRequest {
            params: Some(pb::PlanParams {
                vehicles: 100,
                per_instance: 50,
                ..Default::default()
            }),
            spec: Some(pb::RunSpec {
                max_not_driven_s: 30.0,
                ..Default::default()
            }),
            expect_agents: 1,
        };
        let _ = c.start(req, clock.now()).unwrap();
        let now = clock.advance(Duration::from_secs(1));
        let running = statuses(
            &c,
            &[
                (0, 1, pb::Phase::Running, pb::End::None),
                (1, 2, pb::Phase::Running, pb::End::None),
            ],
        );
        let _ = c.heartbeat(
            "a",
            pb::Heartbeat {
                epoch: c.epoch(),
                instances: running,
                ..Default::default()
            },
            now,
        );
        let s = c.status(now);
        assert_eq!(
            (s.vehicles_not_driven, s.state()),
            (0, pb::RunState::Running)
        );
        // Both stopped on a lease expiry of the agent, which waits for a newer epoch that
        // (in this test) never comes.
        let now = clock.advance(Duration::from_secs(1));
        let stopped = statuses(
            &c,
            &[
                (0, 1, pb::Phase::Exited, pb::End::Lease),
                (1, 2, pb::Phase::Exited, pb::End::Lease),
            ],
        );
        let hb = pb::Heartbeat {
            epoch: 0,
            instances: stopped,
            ..Default::default()
        };
        let _ = c.heartbeat("a", hb.clone(), now);
        let now = clock.advance(Duration::from_secs(20));
        let _ = c.heartbeat("a", hb.clone(), now);
        let _ = c.tick(now);
        let s = c.status(now);
        assert_eq!(s.vehicles_not_driven, 100);
        assert!(
            (s.not_driven_s - 21.0).abs() < 0.01,
            "since last seen running: {}",
            s.not_driven_s
        );
        assert_eq!(s.agents[0].vehicles_not_driven, 100);
        assert!(
            s.agents[0].not_driven_cause.contains("lease expiry"),
            "{:?}",
            s.agents[0]
        );
        assert_eq!(s.state(), pb::RunState::Running, "not yet past 30 s");
        let now = clock.advance(Duration::from_secs(11));
        let _ = c.heartbeat("a", hb, now);
        let _ = c.tick(now);
        let s = c.status(now);
        assert_eq!(s.state(), pb::RunState::Failed);
        assert!(
            s.failure.starts_with(
                "100 vehicles of agent a were not driven for 32 s (stopped on a lease expiry"
            ),
            "{}",
            s.failure
        );
        assert!(
            c.tick(now)
                .iter()
                .all(|x| x.assignment.instances.is_empty()),
            "a failed run drives nothing"
        );
    }

    #[test]
    fn a_lost_agent_and_an_unreported_instance_are_undriven_too() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        start(&mut c, 100, clock.now());
        let now = clock.advance(Duration::from_secs(2));
        let one = statuses(&c, &[(0, 1, pb::Phase::Running, pb::End::None)]);
        let _ = c.heartbeat(
            "a",
            pb::Heartbeat {
                epoch: c.epoch(),
                instances: one,
                ..Default::default()
            },
            now,
        );
        let u = c.undriven(now);
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].index, u[0].cause.as_str()), (1, "not reported yet"));
        let now = clock.advance(LEASE + Duration::from_secs(1));
        let causes: Vec<String> = c.undriven(now).into_iter().map(|u| u.cause).collect();
        assert_eq!(causes, ["agent a is lost", "agent a is lost"]);
    }

    #[test]
    fn supervision_counts_every_process_started_and_why_each_ended() {
        let clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 300, clock.now());
        start(&mut c, 150, clock.now());
        let list = statuses(
            &c,
            &[
                (0, 1, pb::Phase::Exited, pb::End::Lease),
                (0, 5, pb::Phase::Running, pb::End::None),
                (1, 2, pb::Phase::Exited, pb::End::Crashed),
                (1, 3, pb::Phase::Exited, pb::End::Shed),
                (2, 0, pb::Phase::Starting, pb::End::None),
            ],
        );
        let hb = pb::Heartbeat {
            epoch: c.epoch(),
            instances: list,
            usage: Some(pb::HostUsage {
                lease_expiries: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let _ = c.heartbeat("a", hb, clock.now());
        let s = c.status(clock.now());
        let want = pb::Supervision {
            processes_started: 4,
            restarts: 2,
            crashes: 1,
            lease_stops: 1,
            lease_expiries: 1,
            shed: 1,
        };
        assert_eq!(s.agents[0].supervision, Some(want));
        assert_eq!(s.supervision, Some(want), "the fleet's is the sum");
    }

    #[test]
    fn a_coordinator_late_by_its_own_stall_does_not_hold_it_against_its_agents() {
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        connect(&mut c, "a", 100, clock.now());
        connect(&mut c, "b", 300, clock.now());
        start(&mut c, 200, clock.now());
        let before = held(&c.tick(clock.now()));
        // The coordinator itself got no CPU for lease + grace + 1 s: nobody was heard.
        let stall = LEASE + GRACE + Duration::from_secs(1);
        let now = clock.advance(stall);
        c.stalled(stall, now);
        assert_eq!(held(&c.tick(now)), before, "nothing moved");
        // Silence after the stall counts again.
        let now = clock.advance(LEASE + GRACE + Duration::from_secs(1));
        beat(&mut c, "b", now);
        assert!(held(&c.tick(now))["a"].is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Wait(u64),
        Freeze(usize),
        Thaw(usize),
        Kill(usize),
        Rejoin(usize),
        Rebalance,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (100u64..3000).prop_map(Op::Wait),
            1 => (0usize..4).prop_map(Op::Freeze),
            1 => (0usize..4).prop_map(Op::Thaw),
            1 => (0usize..4).prop_map(Op::Kill),
            1 => (0usize..4).prop_map(Op::Rejoin),
            1 => Just(Op::Rebalance),
        ]
    }

    proptest! {
        /// Whatever agents do, a vehicle range goes to a new agent only when its old one was
        /// told to let go at least a handoff earlier, or has been silent for lease + grace:
        /// never two drivers at once.
        #[test]
        fn no_range_is_ever_held_by_two_agents(ops in proptest::collection::vec(op(), 1..80)) {
            let names = ["a", "b", "c", "d"];
            let mut clock = Clock::new();
            let mut c = Control::new(limits(), clock.now());
            let mut sessions: [Option<u64>; 4] = [None; 4];
            let mut frozen = [false; 4];
            for (i, n) in names.iter().enumerate().take(3) {
                sessions[i] = Some(connect(&mut c, n, 200, clock.now()));
            }
            start(&mut c, 300, clock.now());
            // Per instance: who was last given it, and per (agent, instance) when it was last
            // told to let go of it.
            let mut holder: BTreeMap<u32, usize> = BTreeMap::new();
            let mut released: BTreeMap<(usize, u32), Duration> = BTreeMap::new();
            let mut heard: [Duration; 4] = [Duration::ZERO; 4];
            // Each agent process (a rejoin at epoch 0 is a new one), and per instance the
            // process that was given it and when that process was last heard: a range is lost
            // with the process that held it, whatever a new process of the same agent does.
            let mut process = [0u32; 4];
            let mut held_by: BTreeMap<u32, (usize, u32, Duration)> = BTreeMap::new();
            // The epoch each agent last applied (and so reports).
            let mut applied = [0u64; 4];
            for op in ops {
                match op {
                    Op::Wait(ms) => { clock.advance(Duration::from_millis(ms)); }
                    Op::Freeze(i) => frozen[i] = true,
                    Op::Thaw(i) => frozen[i] = false,
                    Op::Kill(i) => {
                        if let Some(s) = sessions[i].take() {
                            let _ = c.session_closed(names[i], s);
                        }
                    }
                    Op::Rejoin(i) => {
                        if sessions[i].is_none() {
                            let now = clock.now();
                            let j = Joining { name: names[i].into(), hardware: hardware(), max_vehicles: 200, address: String::new() };
                            if c.join(j, now).is_ok() {
                                sessions[i] = c.open_session(names[i], 0, now).ok().map(|x| x.0);
                                heard[i] = clock.at;
                                process[i] += 1;
                            }
                        }
                    }
                    Op::Rebalance => { let _ = c.rebalance(clock.now()); }
                }
                let now = clock.now();
                for i in 0..4 {
                    if sessions[i].is_some() && !frozen[i] {
                        let hb = pb::Heartbeat { epoch: applied[i], ..Default::default() };
                        let _ = c.heartbeat(names[i], hb, now);
                        // An agent silent for longer than its lease has stopped its simulators:
                        // back, it holds nothing it held before until it is given it again.
                        let kept = clock.at <= heard[i] + LEASE;
                        heard[i] = clock.at;
                        for (inst, (agent, p, at)) in held_by.iter_mut() {
                            // What it was told to let go of, it no longer holds either.
                            let holds = !released.contains_key(&(i, *inst));
                            if kept && holds && *agent == i && *p == process[i] {
                                *at = clock.at;
                            }
                        }
                    }
                }
                let sends = c.tick(now);
                let mut seen = BTreeSet::new();
                for s in &sends {
                    let i = names.iter().position(|n| *n == s.agent).unwrap();
                    let mine: BTreeSet<u32> = s.assignment.instances.iter().map(|x| x.index).collect();
                    for inst in &mine {
                        prop_assert!(seen.insert(*inst), "instance {} sent to two agents in one tick", inst);
                        if let Some(&old) = holder.get(inst) {
                            if old != i {
                                let let_go = released.get(&(old, *inst)).is_some_and(|t| *t + HANDOFF <= clock.at);
                                let lost = held_by.get(inst).is_some_and(|(_, _, at)| *at + LEASE + GRACE < clock.at);
                                prop_assert!(let_go || lost, "instance {} moved from {} to {} too soon", inst, names[old], names[i]);
                            }
                        }
                        holder.insert(*inst, i);
                        let fresh = held_by.get(inst).is_none_or(|(a, p, at)| {
                            *a != i || *p != process[i] || clock.at > *at + LEASE
                        });
                        if fresh {
                            held_by.insert(*inst, (i, process[i], heard[i]));
                        }
                    }
                    // Frozen agents receive nothing: what is queued for them counts once they read it,
                    // and by then it is older than the epoch that lets them resume.
                    if !frozen[i] {
                        applied[i] = s.assignment.epoch;
                        for (inst, h) in &holder {
                            if *h == i && !mine.contains(inst) {
                                released.entry((i, *inst)).or_insert(clock.at);
                            }
                        }
                    }
                    for inst in &mine {
                        released.remove(&(i, *inst));
                    }
                }
            }
        }
    }
}
