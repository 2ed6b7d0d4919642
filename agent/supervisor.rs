//! The agent's processes: it starts what the newest trusted assignment wants, stops what it no
//! longer wants (or everything, on a lease expiry), restarts crashed instances with backoff,
//! and keeps each incarnation's cumulative counters, with why it ended, for the heartbeats.
//! The control thread decides what to trust; this runs on the main runtime and publishes its
//! statuses for the heartbeats to take, never waited for.

use crate::control::{Desired, KeepAlive};
use crate::launch::{restart_after, rss_of, sim_args, CpuMeter, RESTART_LIMIT};
use crate::tally::{apply_tally, read_tally_file, TallyKey};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use vtox::agent::{Health, Loop};
use vtox::metrics::SimReport;
use vtox::wire::pb::{self, End, Phase};

/// The supervisor's own period: spawns that are due, overstaying processes, its statuses.
const TICK: Duration = Duration::from_millis(200);
/// Statuses are published at least this often (CPU meters move), and when something changed
/// no more often than `PUBLISH_SPACING`: a heartbeat takes one a second, and hundreds of
/// instances' statuses are not copied for nothing.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
const PUBLISH_SPACING: Duration = Duration::from_millis(400);
/// A simulator that stopped itself on its own lease is started again after this, if the
/// agent's lease holds: its agent was late, not gone.
const AFTER_SIM_LEASE: Duration = Duration::from_secs(1);
/// The exit code of a simulator that stopped because its agent went quiet (see vtox-sim).
const EXIT_LEASE_LOST: i32 = 3;

pub struct Config {
    pub sim_bin: PathBuf,
    pub log_dir: PathBuf,
    pub agent: String,
    /// Niceness of the simulators; 0 leaves them at the agent's priority.
    pub nice: i32,
}

/// What the supervisor publishes for the heartbeats and `/metrics`.
#[derive(Default)]
pub struct Snapshot {
    pub instances: Vec<pb::InstanceStatus>,
    /// Resident memory of the simulators together.
    pub rss_bytes: u64,
    /// CPU of the simulators together, percent of the whole host (None until measured).
    pub simulators_cpu_percent: Option<f64>,
    /// CPU of the agent process itself, percent of the whole host.
    pub agent_cpu_percent: Option<f64>,
    /// Instances due to start that wait because the agent is starved.
    pub starts_deferred: u32,
}

/// What the supervisor shares with the control thread.
pub struct Links {
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    pub health: Arc<Mutex<Health>>,
    pub keep_alive: KeepAlive,
}

/// What the rest of the agent asks of the supervisor besides the desired state.
pub enum Command {
    /// Stop everything and answer when all simulators have exited.
    Shutdown(oneshot::Sender<()>),
}

enum Event {
    Line {
        index: u32,
        incarnation: u64,
        report: Box<SimReport>,
    },
    BadLine {
        index: u32,
        incarnation: u64,
    },
    Exited {
        index: u32,
        incarnation: u64,
        pid: Option<u32>,
        code: Option<i32>,
        detail: String,
    },
}

struct Instance {
    spec: pb::InstanceSpec,
    phase: Phase,
    restarts: u32,
    crashes: VecDeque<Instant>,
    incarnation: u64,
    counters: pb::Counters,
    pid: Option<u32>,
    next_start: Instant,
    last_error: String,
    /// Why its current incarnation ended (None while it runs or before it started).
    end: End,
}

/// A process told to stop: it finishes its requests in flight and exits by itself, or is
/// killed when it overstays (its tally still has its counts).
struct Stopping {
    index: u32,
    incarnation: u64,
    /// None once it was killed.
    kill_at: Option<Instant>,
}

pub struct Supervisor {
    cfg: Config,
    epoch: u64,
    run_id: String,
    spec: Option<pb::RunSpec>,
    /// The agent's lease, for the simulators' own (half of it).
    lease: Duration,
    instances: BTreeMap<u32, Instance>,
    /// Ended incarnations of the current run; reported so that no count is ever lost.
    history: Vec<pb::InstanceStatus>,
    /// Processes told to stop that have not exited yet, by pid.
    stopping: BTreeMap<u32, Stopping>,
    /// Lease expiries acted on (each stops everything once).
    expiries_seen: u64,
    /// Instances stopped to shed load in this run: not started again by later assignments.
    shed: BTreeSet<u32>,
    /// Due starts held back by starvation, and whether that was said.
    deferred: u32,
    said_deferred: bool,
    /// Tallies of the current run left by an earlier process of this agent (killed with
    /// `-9`, then restarted): their simulators' final counts, reported so that none is lost.
    recovered: Vec<(PathBuf, TallyKey)>,
    events_tx: mpsc::UnboundedSender<Event>,
    links: Links,
    changed: bool,
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid at worst signals nothing.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Runs the supervisor until it is shut down: `desired` is what the control thread trusts.
pub async fn run(
    cfg: Config,
    mut desired: watch::Receiver<Desired>,
    mut commands: mpsc::Receiver<Command>,
    links: Links,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        cfg,
        epoch: 0,
        run_id: String::new(),
        spec: None,
        lease: crate::LEASE_BEFORE_JOIN,
        instances: BTreeMap::new(),
        history: Vec::new(),
        stopping: BTreeMap::new(),
        expiries_seen: 0,
        shed: BTreeSet::new(),
        deferred: 0,
        said_deferred: false,
        recovered: Vec::new(),
        events_tx,
        links,
        changed: true,
    };
    // Whatever an earlier process of this agent left (killed with -9, its simulators counting
    // on after its last heartbeat) is reported: the coordinator takes the counts of its
    // current run and ignores the rest.
    sup.recovered = sup.tallies();
    for (_, k) in &sup.recovered {
        tracing::info!(run = %k.run_id, instance = k.index, incarnation = k.incarnation, "reporting the counts an earlier agent process left");
    }
    let mut meters = (CpuMeter::new(), CpuMeter::new());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_tick, mut last_publish) = (Instant::now(), Instant::now());
    loop {
        tokio::select! {
            changed = desired.changed() => {
                if changed.is_err() {
                    sup.shutdown(&mut events).await;
                    return;
                }
                let d = desired.borrow_and_update().clone();
                sup.desired(d);
            }
            cmd = commands.recv() => {
                sup.shutdown(&mut events).await;
                if let Some(Command::Shutdown(done)) = cmd {
                    let _ = done.send(());
                }
                return;
            }
            Some(ev) = events.recv() => sup.handle(ev),
            _ = tick.tick() => {
                let now = Instant::now();
                let lag = vtox::agent::lag(TICK, now.saturating_duration_since(last_tick));
                last_tick = now;
                let starved = {
                    let mut h = lock(&sup.links.health);
                    h.record(Loop::Supervisor, now, lag);
                    h.starved(now)
                };
                sup.tick(now, starved);
                let since = now.saturating_duration_since(last_publish);
                if (sup.changed && since >= PUBLISH_SPACING) || since >= PUBLISH_EVERY {
                    sup.publish(&mut meters, now);
                    last_publish = now;
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Supervisor {
    /// The control thread's desired state changed: a lease expiry stops everything, a newer
    /// assignment is applied.
    fn desired(&mut self, d: Desired) {
        self.lease = d.lease;
        if d.expiries > self.expiries_seen {
            self.expiries_seen = d.expiries;
            self.stop_all(End::Lease, "lease expired");
        }
        if let Some(a) = d.assignment {
            if a.epoch != self.epoch || a.run_id != self.run_id {
                self.apply(&a);
            }
        }
    }

    fn apply(&mut self, a: &pb::Assignment) {
        self.changed = true;
        self.epoch = a.epoch;
        if a.run_id.is_empty() {
            // The run ended or was stopped: the simulators go, but the run's id and history
            // stay, so that their last metric lines still reach the coordinator.
            self.stop_all(End::Unassigned, "run ended");
        } else if a.run_id != self.run_id {
            self.stop_all(End::Unassigned, "new run");
            self.history.clear();
            self.shed.clear();
            self.run_id = a.run_id.clone();
            self.recover_tallies();
        }
        self.spec = a.spec.clone();
        let desired: BTreeMap<u32, pb::InstanceSpec> = a
            .instances
            .iter()
            .filter(|i| !self.shed.contains(&i.index))
            .map(|i| (i.index, *i))
            .collect();
        let unwanted: Vec<u32> = self
            .instances
            .iter()
            .filter(|(idx, inst)| desired.get(idx) != Some(&inst.spec))
            .map(|(idx, _)| *idx)
            .collect();
        for idx in unwanted {
            self.stop(idx, End::Unassigned, "no longer assigned");
        }
        let stagger = Duration::from_secs_f64(
            self.spec
                .as_ref()
                .map(|s| s.stagger_s)
                .unwrap_or(0.0)
                .max(0.0),
        );
        let now = Instant::now();
        let mut position = 0u32;
        for (idx, spec) in desired {
            if self.instances.contains_key(&idx) {
                continue;
            }
            tracing::info!(
                instance = idx,
                first = spec.first_vehicle,
                vehicles = spec.vehicles,
                "assigned"
            );
            self.instances.insert(
                idx,
                Instance {
                    spec,
                    phase: Phase::Starting,
                    restarts: 0,
                    crashes: VecDeque::new(),
                    incarnation: 0,
                    counters: pb::Counters::default(),
                    pid: None,
                    next_start: now + stagger * position,
                    last_error: String::new(),
                    end: End::None,
                },
            );
            position += 1;
        }
    }

    /// Stops instance `idx` (its process, if any, is told to finish) for `end`.
    fn stop(&mut self, idx: u32, end: End, why: &str) {
        let Some(mut inst) = self.instances.remove(&idx) else {
            return;
        };
        self.changed = true;
        tracing::info!(instance = idx, why, "stopping");
        // An instance without a process (waiting to start, in backoff, failed, finished) has
        // its last incarnation in the history already, with why that one ended.
        let Some(pid) = inst.pid else { return };
        signal(pid, libc::SIGTERM);
        self.stopping.insert(
            pid,
            Stopping {
                index: idx,
                incarnation: inst.incarnation,
                kill_at: Some(Instant::now() + self.stop_grace()),
            },
        );
        // Stopped on purpose: its counts are final only once the process has exited (see
        // `stopped`).
        inst.phase = Phase::Stopping;
        inst.end = end;
        self.history.push(status_of(&self.run_id, idx, &inst));
    }

    fn stop_grace(&self) -> Duration {
        vtox::process::stop_grace(self.spec.as_ref().map_or(5.0, |s| s.timeout_s))
    }

    fn stop_all(&mut self, end: End, why: &str) {
        let all: Vec<u32> = self.instances.keys().copied().collect();
        for idx in all {
            self.stop(idx, end, why);
        }
    }

    fn tick(&mut self, now: Instant, starved: bool) {
        for (pid, st) in self.stopping.iter_mut() {
            if st.kill_at.is_some_and(|t| t <= now) {
                tracing::warn!(
                    instance = st.index,
                    pid,
                    "simulator did not stop in time; killing it"
                );
                signal(*pid, libc::SIGKILL);
                // Its exit arrives as an event like any other.
                st.kill_at = None;
            }
        }
        let due: Vec<u32> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                i.pid.is_none()
                    && matches!(i.phase, Phase::Starting | Phase::Backoff)
                    && i.next_start <= now
            })
            .map(|(idx, _)| *idx)
            .collect();
        if starved {
            // Starting processes on a host that cannot run the ones it has would only feed
            // the starvation: they wait, and the heartbeats say so.
            if !due.is_empty() && !self.said_deferred {
                tracing::warn!(
                    instances = due.len(),
                    "this agent is starved of CPU (its own timers are late); holding back simulator starts"
                );
                self.said_deferred = true;
            }
            self.deferred = due.len() as u32;
        } else {
            self.deferred = 0;
            self.said_deferred = false;
            for idx in due {
                self.spawn(idx);
            }
        }
        self.shed_if_starved(now);
    }

    /// After long unbroken starvation, stops the newest running instance: its vehicles are
    /// not driven (and shown as such) rather than every vehicle of the host driven late.
    fn shed_if_starved(&mut self, now: Instant) {
        let running: Vec<u32> = self
            .instances
            .iter()
            .filter(|(_, i)| i.phase == Phase::Running)
            .map(|(idx, _)| *idx)
            .collect();
        if !lock(&self.links.health).shed(now, running.len()) {
            return;
        }
        if let Some(&idx) = running.last() {
            let vehicles = self.instances.get(&idx).map_or(0, |i| i.spec.vehicles);
            tracing::error!(
                instance = idx,
                vehicles,
                "this agent has been starved of CPU for {:?}: shedding one simulator; its vehicles are not driven for the rest of the run",
                vtox::agent::SHED_AFTER
            );
            self.shed.insert(idx);
            self.stop(idx, End::Shed, "shedding load");
        }
    }

    fn spawn(&mut self, idx: u32) {
        let Some(spec) = self.spec.clone() else {
            return;
        };
        let agent = self.cfg.agent.clone();
        let lease = self.lease;
        let Some(inst) = self.instances.get_mut(&idx) else {
            return;
        };
        self.changed = true;
        let now = vtox::ingest::unix_secs(SystemTime::now());
        let Some(mut sim) = sim_args(&spec, &inst.spec, &agent, now, lease) else {
            inst.phase = Phase::Exited;
            inst.end = End::Finished;
            return;
        };
        let incarnation = vtox::ingest::unix_ms(SystemTime::now()).max(inst.incarnation + 1);
        let key = TallyKey {
            run_id: self.run_id.clone(),
            index: idx,
            incarnation,
            first_vehicle: inst.spec.first_vehicle,
            vehicles: inst.spec.vehicles,
        };
        let tally = key.path(&self.cfg.log_dir, &self.cfg.agent);
        if let Some(dir) = tally.parent() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::warn!(path = %dir.display(), "cannot create the tally directory ({e}); counts of a killed simulator may be short");
            }
        }
        sim.tally = Some(tally);
        let mut cmd = command(&self.cfg, idx, &sim);
        match cmd.spawn() {
            Ok(child) => {
                inst.incarnation = incarnation;
                inst.counters = pb::Counters::default();
                inst.pid = child.id();
                inst.phase = Phase::Running;
                inst.end = End::None;
                tracing::info!(instance = idx, pid = ?inst.pid, incarnation, "simulator started");
                watch_child(
                    child,
                    idx,
                    incarnation,
                    self.events_tx.clone(),
                    &self.links.keep_alive,
                );
            }
            Err(e) => {
                tracing::error!(instance = idx, bin = %self.cfg.sim_bin.display(), "cannot start the simulator: {e}");
                inst.last_error = format!("cannot start {}: {e}", self.cfg.sim_bin.display());
                crashed(inst, Instant::now());
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        self.changed = true;
        match ev {
            Event::Line {
                index,
                incarnation,
                report,
            } => self.line(index, incarnation, &report),
            Event::BadLine { index, incarnation } => {
                if let Some(inst) = self
                    .instances
                    .get_mut(&index)
                    .filter(|i| i.incarnation == incarnation)
                {
                    inst.counters.bad_lines += 1;
                }
            }
            Event::Exited {
                index,
                incarnation,
                pid,
                code,
                detail,
            } => {
                if let Some(pid) = pid {
                    self.links.keep_alive.remove(pid);
                }
                self.exited(index, incarnation, code, detail);
            }
        }
    }

    fn line(&mut self, index: u32, incarnation: u64, report: &SimReport) {
        if let Some(inst) = self
            .instances
            .get_mut(&index)
            .filter(|i| i.incarnation == incarnation)
        {
            let bad = inst.counters.bad_lines;
            inst.counters = pb::Counters::from_report(report);
            inst.counters.bad_lines = bad;
        } else if let Some(h) = self
            .history
            .iter_mut()
            .find(|h| h.index == index && h.incarnation == incarnation)
        {
            // The final line of a stopped instance arrives after it left the desired set.
            let bad = h.counters.as_ref().map(|c| c.bad_lines).unwrap_or(0);
            let mut c = pb::Counters::from_report(report);
            c.bad_lines = bad;
            h.counters = Some(c);
        }
    }

    fn exited(&mut self, index: u32, incarnation: u64, code: Option<i32>, detail: String) {
        let run_id = self.run_id.clone();
        let Some(inst) = self
            .instances
            .get_mut(&index)
            .filter(|i| i.incarnation == incarnation)
        else {
            self.stopping
                .retain(|_, st| (st.index, st.incarnation) != (index, incarnation));
            self.stopped(index, incarnation, code == Some(0));
            return;
        };
        inst.pid = None;
        if code == Some(0) {
            tracing::info!(instance = index, "simulator finished");
            inst.phase = Phase::Exited;
            inst.end = End::Finished;
            self.history.push(status_of(&run_id, index, inst));
            return;
        }
        // A killed simulator's last metric line is up to a report interval old; its tally
        // file has the exact totals.
        let key = TallyKey {
            run_id: run_id.clone(),
            index,
            incarnation,
            first_vehicle: inst.spec.first_vehicle,
            vehicles: inst.spec.vehicles,
        };
        if let Some(t) = read_tally_file(&key.path(&self.cfg.log_dir, &self.cfg.agent)) {
            apply_tally(&mut inst.counters, &t);
        }
        if code == Some(EXIT_LEASE_LOST) {
            // Its keep-alive from this agent ran late (the agent starved or frozen): not a
            // crash. It comes back once the agent's lease holds; if that lapsed too, the
            // lease expiry stops the instance and the next assignment restarts it.
            tracing::warn!(
                instance = index,
                "simulator stopped itself: its keep-alive from this agent ran out; starting it again"
            );
            inst.end = End::Lease;
            inst.phase = Phase::Exited;
            inst.last_error = "stopped itself: no keep-alive from its agent in time".into();
            self.history.push(status_of(&run_id, index, inst));
            inst.phase = Phase::Starting;
            inst.next_start = Instant::now() + AFTER_SIM_LEASE;
            return;
        }
        tracing::warn!(instance = index, %detail, "simulator exited abnormally");
        inst.last_error = format!("exited: {detail}");
        inst.end = End::Crashed;
        crashed(inst, Instant::now());
        let mut ended = status_of(&run_id, index, inst);
        if inst.phase != Phase::Failed {
            ended.phase = Phase::Exited as i32;
        }
        self.history.push(ended);
    }

    /// A process told to stop has exited: its counts are final. One that did not end
    /// cleanly (killed at agent shutdown, say) may have written no last line; its tally has
    /// the exact totals.
    fn stopped(&mut self, index: u32, incarnation: u64, success: bool) {
        let Some(h) = self.history.iter_mut().find(|h| {
            h.index == index && h.incarnation == incarnation && h.phase == Phase::Stopping as i32
        }) else {
            return;
        };
        h.phase = Phase::Exited as i32;
        if !success {
            let key = TallyKey {
                run_id: h.run_id.clone(),
                index,
                incarnation,
                first_vehicle: h.first_vehicle,
                vehicles: h.vehicles,
            };
            if let Some(t) = read_tally_file(&key.path(&self.cfg.log_dir, &self.cfg.agent)) {
                apply_tally(h.counters.get_or_insert_with(Default::default), &t);
            }
        }
    }

    /// Publishes the statuses, the processes' CPU and memory, for heartbeats and `/metrics`.
    fn publish(&mut self, meters: &mut (CpuMeter, CpuMeter), now: Instant) {
        self.changed = false;
        let pids = self.pids();
        let snapshot = Snapshot {
            instances: self.statuses(),
            rss_bytes: pids.iter().map(|p| rss_of(*p)).sum(),
            simulators_cpu_percent: meters.0.measure(pids.into_iter(), now),
            agent_cpu_percent: meters.1.measure(std::iter::once(std::process::id()), now),
            starts_deferred: self.deferred,
        };
        self.links.snapshot.send_replace(Arc::new(snapshot));
    }

    fn statuses(&self) -> Vec<pb::InstanceStatus> {
        let mut out: Vec<pb::InstanceStatus> = self
            .history
            .iter()
            .filter(|h| {
                self.instances
                    .get(&h.index)
                    .is_none_or(|i| i.incarnation != h.incarnation)
            })
            .cloned()
            .collect();
        out.extend(
            self.instances
                .iter()
                .map(|(idx, inst)| status_of(&self.run_id, *idx, inst)),
        );
        // Read afresh each time: a simulator orphaned by the earlier process may still have
        // been finishing its requests in flight when this one started.
        for (path, key) in &self.recovered {
            if let Some(t) = read_tally_file(path) {
                let mut counters = pb::Counters::default();
                apply_tally(&mut counters, &t);
                out.push(pb::InstanceStatus {
                    run_id: key.run_id.clone(),
                    index: key.index,
                    first_vehicle: key.first_vehicle,
                    vehicles: key.vehicles,
                    phase: Phase::Exited as i32,
                    restarts: 0,
                    incarnation: key.incarnation,
                    counters: Some(counters),
                    last_error: "counts recovered after the agent restarted".into(),
                    end: End::None as i32,
                });
            }
        }
        out
    }

    /// The tallies in this agent's directory, with their keys.
    fn tallies(&self) -> Vec<(PathBuf, TallyKey)> {
        let dir = TallyKey::dir(&self.cfg.log_dir, &self.cfg.agent);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                let key = TallyKey::parse(path.file_name()?.to_str()?)?;
                Some((path, key))
            })
            .collect()
    }

    /// On a new run: keeps only the tallies of this run that an earlier process of this agent
    /// left behind, and removes the rest.
    fn recover_tallies(&mut self) {
        self.recovered.clear();
        for (path, key) in self.tallies() {
            if key.run_id == self.run_id {
                self.recovered.push((path, key));
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Every simulator process of this agent, running or stopping.
    fn pids(&self) -> Vec<u32> {
        self.instances
            .values()
            .filter_map(|i| i.pid)
            .chain(self.stopping.keys().copied())
            .collect()
    }

    async fn shutdown(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        let pids = self.pids();
        self.stop_all(End::Shutdown, "agent shutting down");
        let deadline = Instant::now() + self.stop_grace();
        let mut left = pids.len();
        while left > 0 && Instant::now() < deadline {
            match tokio::time::timeout_at(deadline.into(), events.recv()).await {
                Ok(Some(Event::Exited { .. })) => left -= 1,
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        for pid in pids {
            signal(pid, libc::SIGKILL);
        }
    }
}

/// The simulator's process: its flags, its log, and a lower CPU priority than the agent.
fn command(cfg: &Config, idx: u32, sim: &vtox::sim_args::SimArgs) -> tokio::process::Command {
    let log_path = cfg.log_dir.join(format!("instance-{idx}.log"));
    let stderr = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
    {
        Ok(f) => Stdio::from(f),
        Err(e) => {
            tracing::warn!(path = %log_path.display(), "cannot open the instance log ({e}); its stderr is discarded");
            Stdio::null()
        }
    };
    let mut cmd = tokio::process::Command::new(&cfg.sim_bin);
    cmd.args(sim.to_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    let nice = cfg.nice;
    if nice > 0 {
        // SAFETY: setpriority is async-signal-safe and touches no memory of the parent; it
        // runs in the child between fork and exec, before any of its threads exist, so
        // every thread of the simulator inherits it.
        unsafe {
            cmd.pre_exec(move || {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                Ok(())
            });
        }
    }
    cmd
}

/// Follows a started simulator: its metric lines and its exit become events; its stdin goes
/// to the control thread's keep-alive.
fn watch_child(
    mut child: tokio::process::Child,
    index: u32,
    incarnation: u64,
    tx: mpsc::UnboundedSender<Event>,
    keep_alive: &KeepAlive,
) {
    let pid = child.id();
    match (child.stdin.take().map(|s| s.into_owned_fd()), pid) {
        (Some(Ok(fd)), Some(pid)) => keep_alive.add(pid, std::fs::File::from(fd)),
        (Some(Err(e)), _) => {
            tracing::warn!(
                instance = index,
                "cannot keep the simulator alive ({e}); it will stop itself within its lease"
            )
        }
        _ => {}
    }
    let stdout = child.stdout.take();
    tokio::spawn(async move {
        if let Some(out) = stdout {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let ev = match SimReport::parse_line(&line) {
                    Ok(report) => Event::Line {
                        index,
                        incarnation,
                        report: Box::new(report),
                    },
                    Err(_) => Event::BadLine { index, incarnation },
                };
                let _ = tx.send(ev);
            }
        }
        let (code, detail) = match child.wait().await {
            Ok(st) => (st.code(), st.to_string()),
            Err(e) => (None, e.to_string()),
        };
        let _ = tx.send(Event::Exited {
            index,
            incarnation,
            pid,
            code,
            detail,
        });
    });
}

/// Schedules a restart with backoff, or marks the instance failed when it crash-loops.
fn crashed(inst: &mut Instance, now: Instant) {
    inst.crashes.push_back(now);
    match restart_after(&mut inst.crashes, now) {
        None => {
            tracing::error!(
                instance = inst.spec.index,
                "crash loop: {RESTART_LIMIT} restarts within a minute and it crashed again; giving up"
            );
            inst.phase = Phase::Failed;
        }
        Some(backoff) => {
            inst.restarts += 1;
            inst.phase = Phase::Backoff;
            inst.next_start = now + backoff;
        }
    }
}

fn status_of(run_id: &str, idx: u32, inst: &Instance) -> pb::InstanceStatus {
    pb::InstanceStatus {
        run_id: run_id.to_string(),
        index: idx,
        first_vehicle: inst.spec.first_vehicle,
        vehicles: inst.spec.vehicles,
        phase: inst.phase as i32,
        restarts: inst.restarts,
        incarnation: inst.incarnation,
        counters: Some(inst.counters.clone()),
        last_error: inst.last_error.clone(),
        end: inst.end as i32,
    }
}
