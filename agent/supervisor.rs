//! The agent's processes: the I/O around `vtox::agent::reconcile::Instances`, which decides.
//! This spawns what it says is due (at a lower CPU priority than the agent), signals what it
//! says to stop or kill, follows each simulator's metric lines and exit, reads the tally of
//! a killed one, and publishes the statuses for the heartbeats to take, never waited for.

use crate::links::{Desired, KeepAlive, Snapshot};
use crate::meter::{rss_of, CpuMeter};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use vtox::agent::launch::sim_args;
use vtox::agent::reconcile::{Exit, Instances, Signal};
use vtox::agent::tally::{apply_tally, TallyKey};
use vtox::agent::{Health, Loop};
use vtox::counters::SimReport;
use vtox::metrics::TALLY_SLOTS;
use vtox::wire::pb::{self, End, Phase};

/// The supervisor's own period: spawns that are due, overstaying processes, its statuses.
const TICK: Duration = Duration::from_millis(200);
/// Statuses are published at least this often (CPU meters move), and when something changed
/// no more often than `PUBLISH_SPACING`: a heartbeat takes one a second, and hundreds of
/// instances' statuses are not copied for nothing.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
const PUBLISH_SPACING: Duration = Duration::from_millis(400);

pub struct Config {
    pub sim_bin: PathBuf,
    pub log_dir: PathBuf,
    pub agent: String,
    /// Niceness of the simulators; 0 leaves them at the agent's priority.
    pub nice: i32,
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

struct Supervisor {
    cfg: Config,
    state: Instances,
    /// The agent's lease, for the simulators' own (half of it).
    lease: Duration,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_tally(path: &std::path::Path) -> Option<[u64; TALLY_SLOTS]> {
    std::fs::read(path)
        .ok()
        .and_then(|b| vtox::metrics::read_tally(&b))
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
        state: Instances::new(),
        lease: vtox::agent::LEASE_BEFORE_JOIN,
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
                sup.tick(now, lag);
                let since = now.saturating_duration_since(last_publish);
                if (sup.changed && since >= PUBLISH_SPACING) || since >= PUBLISH_EVERY {
                    sup.publish(&mut meters, now);
                    last_publish = now;
                }
            }
        }
    }
}

impl Supervisor {
    fn send(&self, signals: impl IntoIterator<Item = Signal>) {
        for s in signals {
            match s {
                Signal::Stop(pid) => signal(pid, libc::SIGTERM),
                Signal::Kill(pid) => {
                    tracing::warn!(pid, "simulator did not stop in time; killing it");
                    signal(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// The control thread's desired state changed: a lease expiry stops everything, a newer
    /// assignment is applied.
    fn desired(&mut self, d: Desired) {
        self.lease = d.lease;
        self.changed = true;
        let applied = self
            .state
            .desired(d.assignment.as_deref(), d.expiries, Instant::now());
        self.send(applied.signals);
        if applied.new_run {
            self.recover_tallies();
        }
    }

    fn tick(&mut self, now: Instant, lag: Duration) {
        let starved = {
            let mut h = lock(&self.links.health);
            h.record(Loop::Supervisor, now, lag);
            h.starved(now)
        };
        let overdue = self.state.overdue(now);
        self.send(overdue);
        let due = self.state.due(now, starved);
        if self.state.deferred > 0 && !self.said_deferred {
            tracing::warn!(
                instances = self.state.deferred,
                "this agent is starved of CPU (its own timers are late); holding back simulator starts"
            );
        }
        self.said_deferred = self.state.deferred > 0;
        for idx in due {
            self.spawn(idx);
        }
        let shed = self.state.shed(now, &mut lock(&self.links.health));
        if let Some((idx, sig)) = shed {
            tracing::error!(
                instance = idx,
                "this agent has been starved of CPU for {:?}: shedding one simulator; its vehicles are not driven for the rest of the run",
                vtox::agent::SHED_AFTER
            );
            self.changed = true;
            self.send([sig]);
        }
    }

    fn spawn(&mut self, idx: u32) {
        let (Some(spec), Some(inst)) = (self.state.spec.clone(), self.state.get(idx)) else {
            return;
        };
        self.changed = true;
        let now = vtox::ingest::unix_secs(SystemTime::now());
        let Some(mut sim) = sim_args(&spec, &inst.spec, &self.cfg.agent, now, self.lease) else {
            self.state.nothing_left(idx);
            return;
        };
        let incarnation = self
            .state
            .next_incarnation(idx, vtox::ingest::unix_ms(SystemTime::now()));
        if let Some(key) = self.state.tally_key(idx, incarnation) {
            let tally = key.path(&self.cfg.log_dir, &self.cfg.agent);
            if let Some(dir) = tally.parent() {
                if let Err(e) = std::fs::create_dir_all(dir) {
                    tracing::warn!(path = %dir.display(), "cannot create the tally directory ({e}); counts of a killed simulator may be short");
                }
            }
            sim.tally = Some(tally);
        }
        match command(&self.cfg, idx, &sim).spawn() {
            Ok(child) => {
                let pid = child.id();
                self.state.started(idx, incarnation, pid);
                tracing::info!(instance = idx, pid = ?pid, incarnation, "simulator started");
                watch_child(
                    child,
                    idx,
                    incarnation,
                    self.events_tx.clone(),
                    &self.links.keep_alive,
                );
            }
            Err(e) => {
                let bin = self.cfg.sim_bin.display();
                tracing::error!(instance = idx, %bin, "cannot start the simulator: {e}");
                self.state
                    .start_failed(idx, format!("cannot start {bin}: {e}"), Instant::now());
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
            } => self
                .state
                .line(index, incarnation, pb::Counters::from_report(&report)),
            Event::BadLine { index, incarnation } => self.state.bad_line(index, incarnation),
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
                let (log_dir, agent) = (self.cfg.log_dir.clone(), self.cfg.agent.clone());
                let exit =
                    self.state
                        .exited(index, incarnation, code, &detail, Instant::now(), |key| {
                            read_tally(&key.path(&log_dir, &agent))
                        });
                match exit {
                    Exit::Finished => tracing::info!(instance = index, "simulator finished"),
                    Exit::LeaseLost => tracing::warn!(
                        instance = index,
                        "simulator stopped itself: its keep-alive from this agent ran out; starting it again"
                    ),
                    Exit::Crashed | Exit::CrashLoop => {
                        tracing::warn!(instance = index, %detail, "simulator exited abnormally")
                    }
                    Exit::Stopped | Exit::Unknown => {}
                }
            }
        }
    }

    /// Publishes the statuses, the processes' CPU and memory, for heartbeats and `/metrics`.
    fn publish(&mut self, meters: &mut (CpuMeter, CpuMeter), now: Instant) {
        self.changed = false;
        let pids = self.state.pids();
        let snapshot = Snapshot {
            instances: self.statuses(),
            rss_bytes: pids.iter().map(|p| rss_of(*p)).sum(),
            simulators_cpu_percent: meters.0.measure(pids.into_iter(), now),
            agent_cpu_percent: meters.1.measure(std::iter::once(std::process::id()), now),
            starts_deferred: self.state.deferred,
        };
        self.links.snapshot.send_replace(Arc::new(snapshot));
    }

    fn statuses(&self) -> Vec<pb::InstanceStatus> {
        let mut out = self.state.statuses();
        // Read afresh each time: a simulator orphaned by the earlier process may still have
        // been finishing its requests in flight when this one started.
        for (path, key) in &self.recovered {
            if let Some(t) = read_tally(path) {
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
            if key.run_id == self.state.run_id {
                self.recovered.push((path, key));
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    async fn shutdown(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        let pids = self.state.pids();
        let stops = self.state.stop_all(End::Shutdown, Instant::now());
        self.send(stops);
        let deadline = Instant::now() + self.state.stop_grace();
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
