//! The coordinator's control plane. It keeps the desired state (the run and its plan: which
//! agent drives which instance over which vehicles) and the observed state (what each agent
//! reports), and one reconcile loop sends every connected agent its desired assignment,
//! stamped with an epoch. The same message, resent every heartbeat, renews the agent's lease.

use crate::planning;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use vtox::metrics::Latency;
use vtox::plan::Plan;
use vtox::wire::pb::{self, agent_message, coordinator_message};
use vtox::wire::PROTOCOL_MAJOR;

const STATE_FILE: &str = "state.pb";

/// Outbound messages queued per agent before the coordinator stops waiting for a slow one.
const SESSION_QUEUE: usize = 16;

pub struct Settings {
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Added to the lease before a silent agent's ranges move: by then the agent has surely
    /// stopped its simulators, and they theirs, so no vehicle is driven twice.
    pub grace: Duration,
    /// Where the run is kept across restarts (None: in memory only).
    pub state_dir: Option<std::path::PathBuf>,
    /// Most agents that may join.
    pub max_agents: usize,
    /// Most joins accepted per second, whoever sends them.
    pub max_join_rate: u32,
}

struct AgentEntry {
    name: String,
    hardware: pb::Hardware,
    max_vehicles: u64,
    address: String,
    session: Option<(u64, mpsc::Sender<Result<pb::CoordinatorMessage, Status>>)>,
    last_seen: Instant,
    usage: pb::HostUsage,
    /// Epoch of the assignment the agent says it runs.
    epoch_seen: u64,
}

impl AgentEntry {
    fn connected(&self) -> bool {
        self.session.is_some()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RunState {
    Running,
    Finished,
    Stopped,
}

impl RunState {
    fn parse(s: &str) -> RunState {
        match s {
            "running" => RunState::Running,
            "finished" => RunState::Finished,
            _ => RunState::Stopped,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Finished => "finished",
            RunState::Stopped => "stopped",
        }
    }
}

struct Run {
    id: String,
    spec: pb::RunSpec,
    params: pb::PlanParams,
    plan: Plan,
    /// Unix seconds: wall clock, so that it survives a restart.
    started: f64,
    state: RunState,
    ended: Option<f64>,
    /// Instances between two agents: taken from the old one, given to the new one once the
    /// old one has had time to stop them (see `HANDOFF`).
    parked: Vec<Parked>,
}

struct Parked {
    instance: vtox::plan::InstanceRange,
    to: String,
    release: Instant,
}

/// How long a moved instance rests between its old and its new agent: the old one stops it
/// within a heartbeat, and a vehicle's last message from one host and its first from the
/// next are never closer than the 2 s in which a sink would call them a conflict.
const HANDOFF: Duration = Duration::from_millis(2500);

/// What is known of one incarnation of one instance: its cumulative counters.
struct Incarnation {
    status: pb::InstanceStatus,
    latency: Latency,
}

#[derive(Default)]
struct State {
    agents: BTreeMap<String, AgentEntry>,
    run: Option<Run>,
    epoch: u64,
    /// (agent, instance, incarnation) of the current run.
    incarnations: BTreeMap<(String, u32, u64), Incarnation>,
    next_session: u64,
    /// The desired state changed since it was last written to the state dir.
    dirty: bool,
    /// Metrics arrived since the state was last written (written at most every 2 s).
    metrics_dirty: bool,
    last_write: Option<Instant>,
    /// When this coordinator started: an agent it has not heard from yet only counts as lost
    /// once it had a whole lease and grace to reconnect.
    born: Option<Instant>,
    /// Joins in the current second: (second since `born`, count).
    joins: (u64, u32),
}

pub struct Coordinator {
    state: Mutex<State>,
    changed: Notify,
    settings: Settings,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Coordinator {
    /// A coordinator, resuming the run kept in `settings.state_dir` if there is one.
    pub fn new(settings: Settings) -> Result<Arc<Self>, String> {
        // Epochs start at the wall clock in milliseconds, so a restarted coordinator's commands
        // are never older than the ones its agents already applied.
        let mut state = State {
            epoch: unix_ms(),
            ..Default::default()
        };
        if let Some(dir) = &settings.state_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create --state-dir {}: {e}", dir.display()))?;
            let path = dir.join(STATE_FILE);
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let stored = <pb::StoredState as prost::Message>::decode(bytes.as_slice())
                        .map_err(|e| {
                            format!(
                                "{} is damaged ({e}); move it away to start afresh",
                                path.display()
                            )
                        })?;
                    state = State::restore(stored);
                    if let Some(run) = &state.run {
                        tracing::info!(
                            run = run.id,
                            state = run.state.as_str(),
                            "resumed from {}",
                            path.display()
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        state.born = Some(Instant::now());
        Ok(Arc::new(Coordinator {
            state: Mutex::new(state),
            changed: Notify::new(),
            settings,
        }))
    }

    /// Writes the desired state if it changed: to a temporary file, synced, then renamed over
    /// the old one, so that a crash at any moment leaves either the old or the new state.
    fn persist(&self, st: &mut State) {
        let Some(dir) = &self.settings.state_dir else {
            return;
        };
        let metrics_due = st.metrics_dirty
            && st
                .last_write
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
        if !st.dirty && !metrics_due {
            return;
        }
        let bytes = prost::Message::encode_to_vec(&st.stored());
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let result = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(STATE_FILE))?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                st.dirty = false;
                st.metrics_dirty = false;
                st.last_write = Some(Instant::now());
            }
            Err(e) => tracing::error!("cannot write the state to {}: {e}", dir.display()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Prometheus text for `--metrics-listen`.
    pub fn prometheus(&self) -> String {
        let st = self.lock();
        let connected = st.agents.values().filter(|a| a.connected()).count();
        vtox::prometheus::coordinator(&st.status(), connected)
    }

    /// The reconcile loop: each agent gets its desired assignment now when something changed,
    /// and again every heartbeat as its lease renewal.
    pub async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.changed.notified() => {}
            }
            let mut st = self.lock();
            st.update_run_state();
            let moved = st.move_orphans(self.settings.lease + self.settings.grace);
            if moved | st.release_parked() {
                st.bump_epoch();
            }
            self.persist(&mut st);
            let epoch = st.epoch;
            let mut lost = Vec::new();
            for (name, agent) in &st.agents {
                let Some((_, tx)) = &agent.session else {
                    continue;
                };
                let msg = pb::CoordinatorMessage {
                    msg: Some(coordinator_message::Msg::Assignment(
                        st.assignment_for(name, epoch),
                    )),
                };
                match tx.try_send(Ok(msg)) {
                    Ok(()) => {}
                    // A full queue means the agent is slow; the next tick tries again.
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => lost.push(name.clone()),
                }
            }
            for name in lost {
                if let Some(a) = st.agents.get_mut(&name) {
                    a.session = None;
                }
            }
        }
    }
}

impl State {
    /// Puts agents that joined after the plan was made into it (with nothing yet), so that
    /// moves and rebalancing can give them work.
    fn include_late_joiners(&mut self) {
        let Some(run) = self.run.as_mut() else { return };
        let load = planning::load_params(&run.params);
        for (name, entry) in &self.agents {
            if entry.connected() && !run.plan.agents.iter().any(|a| &a.name == name) {
                let host = planning::Host {
                    name: name.clone(),
                    hardware: entry.hardware.clone(),
                    max_vehicles: entry.max_vehicles,
                };
                let max = vtox::capacity::estimate(&planning::host_spec(&host), &load).max_vehicles;
                run.plan.agents.push(vtox::plan::AgentAssignment {
                    name: name.clone(),
                    max_vehicles: max,
                    vehicles: 0,
                    instances: Vec::new(),
                });
            }
        }
    }

    /// Moves the instances of agents silent for longer than `limit` to connected agents with
    /// room, whole and with the same vehicle numbers; late joiners take part. Instances that
    /// fit nowhere stay where they are and show as unassigned until an agent with room joins.
    /// Returns whether anything moved.
    fn move_orphans(&mut self, limit: Duration) -> bool {
        let born = self.born;
        let dead_in = |agents: &BTreeMap<String, AgentEntry>, name: &str| match agents.get(name) {
            Some(a) => a.last_seen.elapsed() > limit,
            None => born.is_none_or(|b| b.elapsed() > limit),
        };
        let Some(run) = self.run.as_ref().filter(|r| r.state == RunState::Running) else {
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
                .is_some_and(|a| a.connected() && a.last_seen.elapsed() < limit)
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

    /// Moves instances, largest index first, from agents above their recommended load (75% of
    /// their capacity) to live agents below it, through the parking lot. Returns what moved.
    fn rebalance(&mut self, lease: Duration) -> (u32, u64) {
        self.include_late_joiners();
        let agents = &self.agents;
        let Some(run) = self.run.as_mut().filter(|r| r.state == RunState::Running) else {
            return (0, 0);
        };
        let live = |name: &str| {
            agents
                .get(name)
                .is_some_and(|a| a.connected() && a.last_seen.elapsed() < lease)
        };
        let recommended =
            |max: u64| (max as f64 * vtox::capacity::RECOMMENDED_SHARE).floor() as u64;
        let mut incoming: BTreeMap<String, u64> = BTreeMap::new();
        for p in &run.parked {
            *incoming.entry(p.to.clone()).or_default() += p.instance.vehicles;
        }
        let (mut moved, mut vehicles) = (0u32, 0u64);
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
                    to: dest,
                    release: Instant::now() + HANDOFF,
                });
                moved += 1;
                vehicles += inst.vehicles;
            }
        }
        (moved, vehicles)
    }

    /// Hands parked instances to their new agents once their handoff time has passed.
    fn release_parked(&mut self) -> bool {
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        let now = Instant::now();
        let (ready, waiting): (Vec<Parked>, Vec<Parked>) =
            run.parked.drain(..).partition(|p| p.release <= now);
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

    fn assignment_for(&self, agent: &str, epoch: u64) -> pb::Assignment {
        match &self.run {
            Some(run) if run.state == RunState::Running => pb::Assignment {
                epoch,
                run_id: run.id.clone(),
                spec: Some(run.spec.clone()),
                instances: run
                    .plan
                    .agents
                    .iter()
                    .filter(|a| a.name == agent)
                    .flat_map(|a| a.instances.iter())
                    .map(|i| pb::InstanceSpec {
                        index: i.index,
                        first_vehicle: i.first_vehicle,
                        vehicles: i.vehicles,
                    })
                    .collect(),
            },
            _ => pb::Assignment {
                epoch,
                run_id: String::new(),
                spec: None,
                instances: Vec::new(),
            },
        }
    }

    fn bump_epoch(&mut self) {
        self.epoch = (self.epoch + 1).max(unix_ms());
        self.dirty = true;
    }

    fn stored(&self) -> pb::StoredState {
        let incarnations = self
            .incarnations
            .iter()
            .map(|((agent, _, _), inc)| pb::StoredIncarnation {
                agent: agent.clone(),
                status: Some(inc.status.clone()),
            })
            .collect();
        pb::StoredState {
            epoch: self.epoch,
            incarnations,
            run: self.run.as_ref().map(|r| pb::StoredRun {
                id: r.id.clone(),
                state: r.state.as_str().into(),
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
                            .map(|i| pb::InstanceSpec {
                                index: i.index,
                                first_vehicle: i.first_vehicle,
                                vehicles: i.vehicles,
                            })
                            .collect(),
                    })
                    .collect(),
                started_unix: r.started,
                ended_unix: r.ended.unwrap_or(0.0),
                vehicles: r.plan.vehicles,
            }),
        }
    }

    fn restore(stored: pb::StoredState) -> State {
        let run = stored.run.map(|r| Run {
            id: r.id,
            state: RunState::parse(&r.state),
            spec: r.spec.unwrap_or_default(),
            params: r.params.unwrap_or_default(),
            plan: Plan {
                vehicles: r.vehicles,
                agents: r
                    .agents
                    .into_iter()
                    .map(|a| vtox::plan::AgentAssignment {
                        vehicles: a.instances.iter().map(|i| i.vehicles).sum(),
                        name: a.name,
                        max_vehicles: a.max_vehicles,
                        instances: a
                            .instances
                            .into_iter()
                            .map(|i| vtox::plan::InstanceRange {
                                index: i.index,
                                first_vehicle: i.first_vehicle,
                                vehicles: i.vehicles,
                            })
                            .collect(),
                    })
                    .collect(),
            },
            started: r.started_unix,
            ended: (r.ended_unix > 0.0).then_some(r.ended_unix),
            parked: Vec::new(),
        });
        // Newer than anything issued before the restart, whatever the clock did meanwhile.
        let incarnations = stored
            .incarnations
            .into_iter()
            .filter_map(|i| {
                let status = i.status?;
                let latency = status
                    .counters
                    .as_ref()
                    .and_then(|c| Latency::from_bytes(&c.latency_hdr).ok())
                    .unwrap_or_default();
                Some((
                    (i.agent, status.index, status.incarnation),
                    Incarnation { status, latency },
                ))
            })
            .collect();
        State {
            epoch: (stored.epoch + 1).max(unix_ms()),
            run,
            incarnations,
            ..Default::default()
        }
    }

    /// A run with a duration is finished once every planned instance reported that it exited,
    /// or well after its end (an agent that vanished cannot hold the run open).
    fn update_run_state(&mut self) {
        let Some(run) = &self.run else { return };
        if run.state != RunState::Running || run.spec.duration_s <= 0.0 {
            return;
        }
        let elapsed = unix_s() - run.spec.run_start;
        let all_exited = run.plan.agents.iter().all(|a| {
            a.instances.iter().all(|i| {
                self.incarnations
                    .iter()
                    .filter(|((agent, idx, _), _)| agent == &a.name && *idx == i.index)
                    .max_by_key(|((_, _, inc), _)| *inc)
                    .is_some_and(|(_, inc)| inc.status.phase == pb::Phase::Exited as i32)
            })
        });
        if (all_exited && elapsed >= run.spec.duration_s) || elapsed > run.spec.duration_s + 30.0 {
            if let Some(run) = &mut self.run {
                run.state = RunState::Finished;
                run.ended = Some(unix_s());
            }
            self.bump_epoch();
        }
    }

    fn record(&mut self, agent: &str, hb: pb::Heartbeat) {
        let Some(run_id) = self.run.as_ref().map(|r| r.id.clone()) else {
            return;
        };
        for status in hb.instances {
            if status.run_id != run_id {
                continue;
            }
            self.metrics_dirty = true;
            let key = (agent.to_string(), status.index, status.incarnation);
            let counters = status.counters.clone().unwrap_or_default();
            let entry = self.incarnations.entry(key);
            match entry {
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    let old = e
                        .get()
                        .status
                        .counters
                        .as_ref()
                        .map(|c| (c.sent, c.accepted + c.failed))
                        .unwrap_or((0, 0));
                    // Counters only grow within an incarnation; an older report arriving late
                    // must not take counts back.
                    if (counters.sent, counters.accepted + counters.failed) >= old {
                        // Counts recovered from a tally carry no histogram: keep the last one.
                        if (counters.accepted + counters.failed) != old.1
                            && !counters.latency_hdr.is_empty()
                        {
                            e.get_mut().latency =
                                Latency::from_bytes(&counters.latency_hdr).unwrap_or_default();
                        }
                        e.get_mut().status = status;
                    }
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    let latency = Latency::from_bytes(&counters.latency_hdr).unwrap_or_default();
                    v.insert(Incarnation { status, latency });
                }
            }
        }
    }

    fn status(&self) -> pb::RunStatus {
        let Some(run) = &self.run else {
            return pb::RunStatus {
                state: "idle".into(),
                ..Default::default()
            };
        };
        let mut totals = pb::Counters::default();
        let mut all_latency = Latency::new();
        let mut agents = Vec::new();
        // Vehicles that no connected agent drives: those of lost agents and those in handoff.
        let mut unassigned: u64 = run.parked.iter().map(|p| p.instance.vehicles).sum();
        for planned in &run.plan.agents {
            let entry = self.agents.get(&planned.name);
            let connected = entry.is_some_and(AgentEntry::connected);
            if !connected {
                unassigned += planned.vehicles;
            }
            let mut agent_totals = pb::Counters::default();
            let mut latency = Latency::new();
            let mut current: BTreeMap<u32, &pb::InstanceStatus> = BTreeMap::new();
            for ((a, idx, _), inc) in self.incarnations.range((planned.name.clone(), 0, 0)..) {
                if a != &planned.name {
                    break;
                }
                if let Some(c) = &inc.status.counters {
                    agent_totals.add(c);
                }
                let _ = latency.merge(&inc.latency);
                // Later incarnations sort last and replace earlier ones.
                current.insert(*idx, &inc.status);
            }
            let running = current
                .values()
                .filter(|s| s.phase == pb::Phase::Running as i32)
                .count() as u32;
            // The rate-like fields describe what runs now, not the sum of every incarnation.
            agent_totals.active_vehicles = current
                .values()
                .filter_map(|s| s.counters.as_ref())
                .map(|c| c.active_vehicles)
                .sum();
            agent_totals.latency_hdr = latency.to_bytes();
            totals.add(&agent_totals);
            let _ = all_latency.merge(&latency);
            agents.push(pb::AgentStatus {
                agent: planned.name.clone(),
                connected,
                vehicles: planned.vehicles,
                instances_running: running,
                instances_planned: planned.instances.len() as u32,
                totals: Some(agent_totals),
                usage: entry.map(|e| e.usage),
                instances: current
                    .into_values()
                    .cloned()
                    .map(strip_histogram)
                    .collect(),
            });
        }
        totals.latency_hdr = all_latency.to_bytes();
        let end = run.ended.unwrap_or_else(unix_s);
        pb::RunStatus {
            run_id: run.id.clone(),
            state: run.state.as_str().into(),
            vehicles: run.plan.vehicles,
            elapsed_s: (end - run.started).max(0.0),
            spec: Some(run.spec.clone()),
            agents,
            totals: Some(totals),
            unassigned_vehicles: unassigned,
        }
    }
}

/// Instance lists travel without their histograms: the agent totals carry the merged one.
fn strip_histogram(mut s: pb::InstanceStatus) -> pb::InstanceStatus {
    if let Some(c) = &mut s.counters {
        c.latency_hdr.clear();
    }
    s
}

pub struct AgentApi(pub Arc<Coordinator>);
pub struct ControlApi(pub Arc<Coordinator>);

type OutStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let address = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let req = req.into_inner();
        if req.protocol_major != PROTOCOL_MAJOR {
            return Err(Status::failed_precondition(format!(
                "the agent speaks protocol {}, this coordinator speaks {PROTOCOL_MAJOR}; run matching versions",
                req.protocol_major
            )));
        }
        let name = req.name.trim().to_string();
        if name.is_empty() || name.len() > 253 {
            return Err(Status::invalid_argument(
                "agent name must be 1 to 253 characters",
            ));
        }
        let Some(hw) = req.hardware else {
            return Err(Status::invalid_argument(
                "the join carries no hardware report",
            ));
        };
        if hw.logical_cores == 0 || hw.memory_total_bytes == 0 {
            return Err(Status::invalid_argument(format!(
                "hardware report cannot be true: {} cores, {} bytes of memory",
                hw.logical_cores, hw.memory_total_bytes
            )));
        }
        let c = &self.0;
        let mut st = c.lock();
        let second = st.born.map(|b| b.elapsed().as_secs()).unwrap_or(0);
        if st.joins.0 != second {
            st.joins = (second, 0);
        }
        st.joins.1 += 1;
        if st.joins.1 > c.settings.max_join_rate {
            return Err(Status::resource_exhausted(format!(
                "more than {} joins this second; retry shortly",
                c.settings.max_join_rate
            )));
        }
        if !st.agents.contains_key(&name) && st.agents.len() >= c.settings.max_agents {
            return Err(Status::resource_exhausted(format!(
                "this coordinator takes at most {} agents (--max-agents)",
                c.settings.max_agents
            )));
        }
        if let Some(existing) = st.agents.get(&name) {
            // A name held by a silent session (its process died without the connection
            // closing, or froze) may be taken over once that session outlived its lease.
            if existing.connected() && existing.last_seen.elapsed() < c.settings.lease {
                return Err(Status::already_exists(format!(
                    "an agent named {name:?} is already connected (from {}); give each agent its own --name",
                    existing.address
                )));
            }
        }
        tracing::info!(agent = name, %address, cores = hw.logical_cores, "agent joined");
        st.agents.insert(
            name.clone(),
            AgentEntry {
                name: name.clone(),
                hardware: hw,
                max_vehicles: req.max_vehicles,
                address,
                session: None,
                last_seen: Instant::now(),
                usage: pb::HostUsage::default(),
                epoch_seen: 0,
            },
        );
        Ok(Response::new(pb::JoinResponse {
            agent_id: name,
            lease_ms: c.settings.lease.as_millis() as u64,
            heartbeat_ms: c.settings.heartbeat.as_millis() as u64,
        }))
    }

    type SessionStream = OutStream<pb::CoordinatorMessage>;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound.message().await?;
        let Some(pb::AgentMessage {
            msg: Some(agent_message::Msg::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("a session must open with a Hello"));
        };
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let coord = self.0.clone();
        let name = hello.agent_id.clone();
        let session_id = {
            let mut st = coord.lock();
            st.next_session += 1;
            let id = st.next_session;
            let Some(agent) = st.agents.get_mut(&name) else {
                return Err(Status::not_found(format!(
                    "no agent {name:?} has joined; join first"
                )));
            };
            if agent.connected() {
                return Err(Status::already_exists(format!(
                    "agent {name:?} already has a session"
                )));
            }
            agent.session = Some((id, tx));
            agent.last_seen = Instant::now();
            agent.epoch_seen = hello.epoch;
            // An agent that lost its lease only resumes on a newer epoch than it had.
            st.bump_epoch();
            id
        };
        coord.changed.notify_one();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::AgentMessage {
                        msg: Some(agent_message::Msg::Heartbeat(hb)),
                    })) => {
                        let mut st = coord.lock();
                        let mut resumed = false;
                        if let Some(agent) = st.agents.get_mut(&name) {
                            // Back from a silence longer than its lease (e.g. it was frozen):
                            // it has stopped everything and waits for a newer epoch.
                            resumed = agent.last_seen.elapsed() > coord.settings.lease;
                            agent.last_seen = Instant::now();
                            agent.epoch_seen = hb.epoch;
                            agent.usage = hb.usage.unwrap_or_default();
                        }
                        st.record(&name, hb);
                        if resumed {
                            tracing::warn!(
                                agent = name,
                                "agent is back after a silence longer than its lease"
                            );
                            st.bump_epoch();
                            drop(st);
                            coord.changed.notify_one();
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let mut st = coord.lock();
            let running = st
                .run
                .as_ref()
                .is_some_and(|r| r.state == RunState::Running);
            if let Some(agent) = st.agents.get_mut(&name) {
                if agent
                    .session
                    .as_ref()
                    .is_some_and(|(id, _)| *id == session_id)
                {
                    // Only a loss during a run matters; agents leave idle coordinators freely.
                    if running {
                        tracing::warn!(agent = name, "agent disconnected during the run");
                    } else {
                        tracing::info!(agent = name, "agent disconnected");
                    }
                    agent.session = None;
                }
            }
            drop(st);
            coord.changed.notify_one();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl pb::control_service_server::ControlService for ControlApi {
    async fn plan(&self, req: Request<pb::PlanRequest>) -> Result<Response<pb::PlanReply>, Status> {
        let params = req.into_inner().params.unwrap_or_default();
        let st = self.0.lock();
        let hosts = connected_hosts(&st);
        let (_, reply) =
            planning::plan_hosts(&hosts, &params).map_err(Status::failed_precondition)?;
        Ok(Response::new(reply))
    }

    async fn capacity(
        &self,
        req: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanReply>, Status> {
        let params = req.into_inner().params.unwrap_or_default();
        let st = self.0.lock();
        Ok(Response::new(planning::capacity_reply(
            &connected_hosts(&st),
            &params,
        )))
    }

    async fn start(
        &self,
        req: Request<pb::StartRequest>,
    ) -> Result<Response<pb::StartReply>, Status> {
        let req = req.into_inner();
        let params = req.params.unwrap_or_default();
        let mut spec = req.spec.unwrap_or_default();
        let mut st = self.0.lock();
        if let Some(run) = st.run.as_ref().filter(|r| r.state == RunState::Running) {
            return Err(Status::failed_precondition(format!(
                "run {} is in progress; stop it first (vtox-coord stop)",
                run.id
            )));
        }
        let hosts = connected_hosts(&st);
        if (hosts.len() as u32) < req.expect_agents {
            return Err(Status::failed_precondition(format!(
                "{} agents are connected, {} expected",
                hosts.len(),
                req.expect_agents
            )));
        }
        let (plan, reply) =
            planning::plan_hosts(&hosts, &params).map_err(Status::failed_precondition)?;
        if spec.run_start <= 0.0 {
            // A moment ahead, so that every host starts its schedule from the same instant.
            spec.run_start = unix_s() + 1.0;
        }
        let id = format!("run-{}", unix_ms());
        tracing::info!(
            run = id,
            vehicles = plan.vehicles,
            agents = plan.agents.len(),
            "run started"
        );
        st.run = Some(Run {
            id: id.clone(),
            spec,
            params,
            plan,
            started: unix_s(),
            state: RunState::Running,
            ended: None,
            parked: Vec::new(),
        });
        st.incarnations.clear();
        st.bump_epoch();
        drop(st);
        self.0.changed.notify_one();
        Ok(Response::new(pb::StartReply {
            run_id: id,
            plan: Some(reply),
        }))
    }

    async fn stop(
        &self,
        _req: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopReply>, Status> {
        let mut st = self.0.lock();
        let was_running = match &mut st.run {
            Some(run) if run.state == RunState::Running => {
                run.state = RunState::Stopped;
                run.ended = Some(unix_s());
                tracing::info!(run = run.id, "run stopped");
                true
            }
            _ => false,
        };
        st.bump_epoch();
        drop(st);
        self.0.changed.notify_one();
        Ok(Response::new(pb::StopReply { was_running }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::RunStatus>, Status> {
        Ok(Response::new(self.0.lock().status()))
    }

    type WatchStream = OutStream<pb::RunStatus>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let every = Duration::from_millis(req.into_inner().interval_ms.clamp(100, 60_000));
        let coord = self.0.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let status = coord.lock().status();
                if tx.send(Ok(status)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn rebalance(
        &self,
        _req: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceReply>, Status> {
        let mut st = self.0.lock();
        if !st
            .run
            .as_ref()
            .is_some_and(|r| r.state == RunState::Running)
        {
            return Err(Status::failed_precondition("no run is in progress"));
        }
        let (moved_instances, moved_vehicles) = st.rebalance(self.0.settings.lease);
        if moved_instances > 0 {
            st.bump_epoch();
        }
        drop(st);
        self.0.changed.notify_one();
        Ok(Response::new(pb::RebalanceReply {
            moved_instances,
            moved_vehicles,
        }))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsReply>, Status> {
        let st = self.0.lock();
        let agents = st
            .agents
            .values()
            .map(|a| pb::AgentInfo {
                agent_id: a.name.clone(),
                name: a.name.clone(),
                hardware: Some(a.hardware.clone()),
                max_vehicles: a.max_vehicles,
                connected: a.connected(),
                last_seen_s_ago: a.last_seen.elapsed().as_secs_f64(),
                address: a.address.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListAgentsReply { agents }))
    }
}

fn connected_hosts(st: &State) -> Vec<planning::Host> {
    st.agents
        .values()
        .filter(|a| a.connected())
        .map(|a| planning::Host {
            name: a.name.clone(),
            hardware: a.hardware.clone(),
            max_vehicles: a.max_vehicles,
        })
        .collect()
}
