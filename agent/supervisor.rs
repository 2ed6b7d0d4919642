//! The agent's local reconcile loop: it owns the simulator processes, starts what the newest
//! assignment wants, stops what it no longer wants, restarts crashed instances with backoff,
//! and keeps each incarnation's cumulative counters for the heartbeats.

use clap::Parser;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use vtox::metrics::SimReport;
use vtox::sim_args::SimArgs;
use vtox::wire::pb::{self, Phase};

/// Restart backoff: 1 s doubling to 30 s; a crash after five restarts within a minute marks
/// the instance failed.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Five restarts within this window and a sixth crash mark an instance failed.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
const RESTART_LIMIT: usize = 5;
/// Crashes older than this no longer lengthen the backoff: an instance that ran quietly for
/// ten minutes is restarted after 1 s again, as Kubernetes resets its crash backoff.
const BACKOFF_MEMORY: Duration = Duration::from_secs(600);

pub struct Config {
    pub sim_bin: PathBuf,
    pub log_dir: PathBuf,
    pub agent: String,
    pub lease: Duration,
}

/// What the supervisor reports for a heartbeat.
pub struct Snapshot {
    pub epoch: u64,
    pub instances: Vec<pb::InstanceStatus>,
    /// Resident memory of the simulators together.
    pub rss_bytes: u64,
    /// CPU of the simulators together, percent of the whole host (None until measured).
    pub simulators_cpu_percent: Option<f64>,
}

/// The simulators' own CPU use, measured from `/proc` of each child between snapshots, so
/// that a verdict about the generator rests on the generator and not on whatever else the
/// host runs (the backend itself, say).
struct CpuMeter {
    cores: u32,
    ticks_per_s: f64,
    last: Option<(Instant, BTreeMap<u32, u64>)>,
    percent: Option<f64>,
}

impl CpuMeter {
    fn new() -> CpuMeter {
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        CpuMeter {
            cores: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            ticks_per_s: if hz > 0 { hz as f64 } else { 100.0 },
            last: None,
            percent: None,
        }
    }

    /// Measures the pids' CPU since the last measurement (at most twice a second: several
    /// callers ask, and a short interval would be all noise).
    fn measure(&mut self, pids: impl Iterator<Item = u32>, now: Instant) -> Option<f64> {
        if self
            .last
            .as_ref()
            .is_some_and(|(at, _)| now.duration_since(*at) < Duration::from_millis(500))
        {
            return self.percent;
        }
        let ticks: BTreeMap<u32, u64> = pids
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                Some((pid, vtox::process::proc_stat_cpu_ticks(&stat)?))
            })
            .collect();
        if let Some((at, before)) = &self.last {
            // A process new since the last look started after it: all of its time counts.
            let used: u64 = ticks
                .iter()
                .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
                .sum();
            self.percent = Some(vtox::process::cpu_share_percent(
                used,
                self.ticks_per_s,
                now.duration_since(*at).as_secs_f64(),
                self.cores,
            ));
        }
        self.last = Some((now, ticks));
        self.percent
    }
}

/// What the rest of the agent asks of the supervisor.
pub enum Command {
    /// A new desired state from the coordinator (also renews the lease).
    Apply(Box<pb::Assignment>),
    /// The statuses to put in the next heartbeat.
    Snapshot(oneshot::Sender<Snapshot>),
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
        success: bool,
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
    instances: BTreeMap<u32, Instance>,
    /// Ended incarnations of the current run; reported so that no count is ever lost.
    history: Vec<pb::InstanceStatus>,
    /// Processes told to stop that have not exited yet, by pid.
    stopping: BTreeMap<u32, Stopping>,
    last_heard: Instant,
    /// Set when the lease expired: the next assignment is applied even if its epoch is known.
    lapsed: bool,
    /// Tallies of the current run left by an earlier process of this agent (killed with
    /// `-9`, then restarted): their simulators' final counts, reported so that none is lost.
    recovered: Vec<(PathBuf, TallyKey)>,
    events_tx: mpsc::UnboundedSender<Event>,
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid at worst signals nothing.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Runs the supervisor until it is shut down.
pub async fn run(cfg: Config, mut commands: mpsc::Receiver<Command>) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        cfg,
        epoch: 0,
        run_id: String::new(),
        spec: None,
        instances: BTreeMap::new(),
        history: Vec::new(),
        stopping: BTreeMap::new(),
        last_heard: Instant::now(),
        lapsed: false,
        recovered: Vec::new(),
        events_tx,
    };
    // Whatever an earlier process of this agent left (killed with -9, its simulators counting
    // on after its last heartbeat) is reported: the coordinator takes the counts of its
    // current run and ignores the rest.
    sup.recovered = sup.tallies();
    for (_, k) in &sup.recovered {
        tracing::info!(run = %k.run_id, instance = k.index, incarnation = k.incarnation, "reporting the counts an earlier agent process left");
    }
    let mut meter = CpuMeter::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::Apply(a)) => sup.apply(*a),
                Some(Command::Snapshot(reply)) => {
                    let pids: Vec<u32> = sup.pids();
                    let cpu = meter.measure(pids.into_iter(), Instant::now());
                    let _ = reply.send(Snapshot {
                        epoch: sup.epoch,
                        instances: sup.statuses(),
                        rss_bytes: sup.rss_bytes(),
                        simulators_cpu_percent: cpu,
                    });
                }
                Some(Command::Shutdown(done)) => {
                    sup.shutdown(&mut events).await;
                    let _ = done.send(());
                    return;
                }
                None => {
                    sup.shutdown(&mut events).await;
                    return;
                }
            },
            Some(ev) = events.recv() => sup.handle(ev),
            _ = tick.tick() => sup.tick(),
        }
    }
}

impl Supervisor {
    fn apply(&mut self, a: pb::Assignment) {
        // A message that arrives after a silence longer than the lease may have waited in a
        // queue while this agent was frozen: the lease has run out all the same.
        self.check_lease(Instant::now());
        if a.epoch < self.epoch {
            tracing::warn!(
                epoch = a.epoch,
                current = self.epoch,
                "refusing a stale assignment"
            );
            return;
        }
        self.last_heard = Instant::now();
        if self.lapsed && a.epoch <= self.epoch {
            // Queued before the lease ran out: the coordinator may have moved these vehicles
            // since. Only a newer epoch, issued after it saw this agent again, is trusted.
            return;
        }
        if a.epoch == self.epoch && a.run_id == self.run_id && !self.lapsed {
            return;
        }
        self.lapsed = false;
        self.epoch = a.epoch;
        if a.run_id.is_empty() {
            // The run ended or was stopped: the simulators go, but the run's id and history
            // stay, so that their last metric lines still reach the coordinator.
            self.stop_all("run ended");
        } else if a.run_id != self.run_id {
            self.stop_all("new run");
            self.history.clear();
            self.run_id = a.run_id.clone();
            self.recover_tallies();
        }
        self.spec = a.spec;
        let desired: BTreeMap<u32, pb::InstanceSpec> =
            a.instances.into_iter().map(|i| (i.index, i)).collect();
        let unwanted: Vec<u32> = self
            .instances
            .iter()
            .filter(|(idx, inst)| desired.get(idx) != Some(&inst.spec))
            .map(|(idx, _)| *idx)
            .collect();
        for idx in unwanted {
            self.stop(idx, "no longer assigned");
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
                },
            );
            position += 1;
        }
    }

    fn stop(&mut self, idx: u32, why: &str) {
        if let Some(inst) = self.instances.remove(&idx) {
            tracing::info!(instance = idx, why, "stopping");
            if let Some(pid) = inst.pid {
                signal(pid, libc::SIGTERM);
                self.stopping.insert(
                    pid,
                    Stopping {
                        index: idx,
                        incarnation: inst.incarnation,
                        kill_at: Some(Instant::now() + self.stop_grace()),
                    },
                );
            }
            let mut ended = status_of(&self.run_id, idx, &inst);
            // Stopped on purpose: whatever it was doing, it is not running any more. Its
            // counts are final only once the process has exited (see `handle`).
            if inst.phase != Phase::Failed {
                ended.phase = if inst.pid.is_some() {
                    Phase::Stopping
                } else {
                    Phase::Exited
                } as i32;
            }
            self.history.push(ended);
        }
    }

    fn stop_grace(&self) -> Duration {
        vtox::process::stop_grace(self.spec.as_ref().map_or(5.0, |s| s.timeout_s))
    }

    fn stop_all(&mut self, why: &str) {
        let all: Vec<u32> = self.instances.keys().copied().collect();
        for idx in all {
            self.stop(idx, why);
        }
    }

    /// Stops everything when the coordinator has been silent longer than the lease: it may
    /// already have moved these vehicles elsewhere, and none may be driven twice.
    fn check_lease(&mut self, now: Instant) -> bool {
        if self.instances.is_empty() || now.duration_since(self.last_heard) <= self.cfg.lease {
            return false;
        }
        tracing::warn!(lease = ?self.cfg.lease, "lease expired without word from the coordinator; stopping all instances");
        self.stop_all("lease expired");
        self.lapsed = true;
        true
    }

    fn tick(&mut self) {
        let now = Instant::now();
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
        if self.check_lease(now) {
            return;
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
        for idx in due {
            self.spawn(idx);
        }
    }

    fn spawn(&mut self, idx: u32) {
        let Some(spec) = self.spec.clone() else {
            return;
        };
        let agent = self.cfg.agent.clone();
        let Some(inst) = self.instances.get_mut(&idx) else {
            return;
        };
        let now = vtox::ingest::unix_secs(SystemTime::now());
        let Some(mut sim) = sim_args(&spec, &inst.spec, &agent, now, self.cfg.lease) else {
            inst.phase = Phase::Exited;
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
        let log_path = self.cfg.log_dir.join(format!("instance-{idx}.log"));
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
        let mut cmd = tokio::process::Command::new(&self.cfg.sim_bin);
        cmd.args(sim.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        match cmd.spawn() {
            Ok(mut child) => {
                inst.incarnation = incarnation;
                inst.counters = pb::Counters::default();
                inst.pid = child.id();
                inst.phase = Phase::Running;
                tracing::info!(instance = idx, pid = ?inst.pid, incarnation, "simulator started");
                let tx = self.events_tx.clone();
                let stdout = child.stdout.take();
                if let Some(mut stdin) = child.stdin.take() {
                    // The simulator's lease: a byte every quarter lease while this agent lives.
                    // If the agent dies the pipe closes; if it freezes the bytes stop.
                    let every = (self.cfg.lease / 8).max(Duration::from_millis(100));
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let mut tick = tokio::time::interval(every);
                        loop {
                            tick.tick().await;
                            if stdin.write_all(b".").await.is_err() || stdin.flush().await.is_err()
                            {
                                break;
                            }
                        }
                    });
                }
                tokio::spawn(async move {
                    if let Some(out) = stdout {
                        let mut lines = BufReader::new(out).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            let ev = match SimReport::parse_line(&line) {
                                Ok(report) => Event::Line {
                                    index: idx,
                                    incarnation,
                                    report: Box::new(report),
                                },
                                Err(_) => Event::BadLine {
                                    index: idx,
                                    incarnation,
                                },
                            };
                            let _ = tx.send(ev);
                        }
                    }
                    let (success, detail) = match child.wait().await {
                        Ok(st) => (st.success(), st.to_string()),
                        Err(e) => (false, e.to_string()),
                    };
                    let _ = tx.send(Event::Exited {
                        index: idx,
                        incarnation,
                        success,
                        detail,
                    });
                });
            }
            Err(e) => {
                tracing::error!(instance = idx, bin = %self.cfg.sim_bin.display(), "cannot start the simulator: {e}");
                inst.last_error = format!("cannot start {}: {e}", self.cfg.sim_bin.display());
                crashed(inst, Instant::now());
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Line {
                index,
                incarnation,
                report,
            } => {
                if let Some(inst) = self
                    .instances
                    .get_mut(&index)
                    .filter(|i| i.incarnation == incarnation)
                {
                    let bad = inst.counters.bad_lines;
                    inst.counters = pb::Counters::from_report(&report);
                    inst.counters.bad_lines = bad;
                } else if let Some(h) = self
                    .history
                    .iter_mut()
                    .find(|h| h.index == index && h.incarnation == incarnation)
                {
                    // The final line of a stopped instance arrives after it left the desired set.
                    let bad = h.counters.as_ref().map(|c| c.bad_lines).unwrap_or(0);
                    let mut c = pb::Counters::from_report(&report);
                    c.bad_lines = bad;
                    h.counters = Some(c);
                }
            }
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
                success,
                detail,
            } => {
                let run_id = self.run_id.clone();
                let Some(inst) = self
                    .instances
                    .get_mut(&index)
                    .filter(|i| i.incarnation == incarnation)
                else {
                    self.stopping
                        .retain(|_, st| (st.index, st.incarnation) != (index, incarnation));
                    self.stopped(index, incarnation, success);
                    return;
                };
                inst.pid = None;
                if success {
                    tracing::info!(instance = index, "simulator finished");
                    inst.phase = Phase::Exited;
                    return;
                }
                tracing::warn!(instance = index, %detail, "simulator exited abnormally");
                inst.last_error = format!("exited: {detail}");
                // A killed simulator's last metric line is up to a report interval old; its
                // tally file has the exact totals.
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
                self.history.push(status_of(&run_id, index, inst));
                crashed(inst, Instant::now());
            }
        }
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

    fn rss_bytes(&self) -> u64 {
        self.instances
            .values()
            .filter_map(|i| i.pid)
            .map(rss_of)
            .sum()
    }

    async fn shutdown(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        let pids: Vec<u32> = self
            .instances
            .values()
            .filter_map(|i| i.pid)
            .chain(self.stopping.keys().copied())
            .collect();
        self.stop_all("agent shutting down");
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

/// The simulator's command line for one instance of a run, at Unix time `now`; None when the
/// run's duration is already over (a restart late in a run has nothing left to drive).
fn sim_args(
    spec: &pb::RunSpec,
    inst: &pb::InstanceSpec,
    agent: &str,
    now: f64,
    lease: Duration,
) -> Option<SimArgs> {
    let duration = if spec.duration_s > 0.0 {
        // A restarted instance ends with the run, not a full duration after its restart.
        let remaining = spec.run_start + spec.duration_s - now.max(spec.run_start);
        if remaining <= 0.05 {
            return None;
        }
        Some(Duration::from_secs_f64((remaining * 1e3).round() / 1e3))
    } else {
        None
    };
    let secs = |s: f64| Duration::from_secs_f64(s.clamp(0.0, 1e9));
    let defaults =
        SimArgs::try_parse_from(["vtox-sim", "--vehicles", "1", "--target", "-"]).ok()?;
    let access = spec.access.clone().unwrap_or_default();
    let file = |p: &str| (!p.is_empty()).then(|| std::path::PathBuf::from(p));
    let text = |t: &str| (!t.is_empty()).then(|| t.to_string());
    Some(SimArgs {
        target_ca: file(&access.target_ca_file),
        target_insecure: access.target_insecure,
        auth_token_file: file(&access.auth_token_file),
        vehicle_tokens: file(&access.vehicle_tokens_file),
        login: text(&access.login_url),
        login_user: text(&access.login_user),
        login_password_file: file(&access.login_password_file),
        idle_timeout: if access.idle_timeout_s > 0.0 {
            secs(access.idle_timeout_s)
        } else {
            defaults.idle_timeout
        },
        vehicles: inst.vehicles,
        first_vehicle: inst.first_vehicle,
        target: spec.target.clone(),
        instance: inst.index,
        agent: Some(agent.to_string()),
        interval: secs(spec.interval_s),
        jitter: spec.jitter,
        batch_size: spec.batch_size as usize,
        sampling_rate: spec.sampling_rate,
        faults: spec.faults.clone(),
        fault_onset: spec.fault_onset_s.map_or(defaults.fault_onset, secs),
        seed: spec.seed,
        duration,
        timeout: secs(spec.timeout_s),
        max_in_flight: spec.max_in_flight as usize,
        id_template: if spec.id_template.is_empty() {
            defaults.id_template.clone()
        } else {
            spec.id_template.clone()
        },
        run_start: Some(spec.run_start),
        delivery: vtox::delivery::Delivery::parse(&spec.delivery).unwrap_or(defaults.delivery),
        buffer: if spec.buffer > 0 {
            spec.buffer as usize
        } else {
            defaults.buffer
        },
        dropouts: text(&spec.dropouts),
        // Half the agent's lease: an orphaned simulator stops well before the coordinator may
        // hand its vehicles to another host (after the agent's lease plus a grace period).
        lease: Some(lease / 2),
        ..defaults
    })
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

/// When to restart after the crashes so far (the latest at `now`), or None when the instance
/// crash-loops. Forgets crashes older than `BACKOFF_MEMORY`.
fn restart_after(crashes: &mut VecDeque<Instant>, now: Instant) -> Option<Duration> {
    while crashes
        .front()
        .is_some_and(|t| now.duration_since(*t) > BACKOFF_MEMORY)
    {
        crashes.pop_front();
    }
    let recent = crashes
        .iter()
        .filter(|t| now.duration_since(**t) <= CRASH_WINDOW)
        .count();
    if recent > RESTART_LIMIT {
        return None;
    }
    let doublings = crashes.len().saturating_sub(1).min(5) as u32;
    Some(
        BACKOFF_FIRST
            .saturating_mul(1 << doublings)
            .min(BACKOFF_MAX),
    )
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
    }
}

/// Names the tally of one incarnation by everything a restarted agent needs to report it.
#[derive(Debug, Clone, PartialEq)]
struct TallyKey {
    run_id: String,
    index: u32,
    incarnation: u64,
    first_vehicle: u64,
    vehicles: u64,
}

impl TallyKey {
    /// One directory per agent: agents on one host may share a log directory.
    fn dir(log_dir: &std::path::Path, agent: &str) -> PathBuf {
        let safe: String = agent
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        log_dir.join("tallies").join(safe)
    }

    fn path(&self, log_dir: &std::path::Path, agent: &str) -> PathBuf {
        Self::dir(log_dir, agent).join(format!(
            "{}.{}.{}.{}.{}.tally",
            self.run_id, self.index, self.incarnation, self.first_vehicle, self.vehicles
        ))
    }

    fn parse(name: &str) -> Option<TallyKey> {
        let mut parts = name.strip_suffix(".tally")?.rsplitn(5, '.');
        let vehicles = parts.next()?.parse().ok()?;
        let first_vehicle = parts.next()?.parse().ok()?;
        let incarnation = parts.next()?.parse().ok()?;
        let index = parts.next()?.parse().ok()?;
        let run_id = parts.next().filter(|r| !r.is_empty())?.to_string();
        Some(TallyKey {
            run_id,
            index,
            incarnation,
            first_vehicle,
            vehicles,
        })
    }
}

fn read_tally_file(path: &std::path::Path) -> Option<[u64; vtox::metrics::TALLY_SLOTS]> {
    std::fs::read(path)
        .ok()
        .and_then(|b| vtox::metrics::read_tally(&b))
}

/// Raises the counters to a tally's totals (never lowers them: the tally may be from an
/// incarnation that never got going).
fn apply_tally(c: &mut pb::Counters, t: &[u64; vtox::metrics::TALLY_SLOTS]) {
    use vtox::metrics::*;
    if t[TALLY_SENT] < c.sent {
        return;
    }
    c.sent = t[TALLY_SENT];
    c.accepted = c.accepted.max(t[TALLY_ACCEPTED]);
    c.failed = c.failed.max(t[TALLY_FAILED]);
    c.dropped = c.dropped.max(t[TALLY_DROPPED]);
    c.bytes = c.bytes.max(t[TALLY_BYTES]);
    c.timeouts = c.timeouts.max(t[TALLY_TIMEOUT]);
    c.late_accepted = c.late_accepted.max(t[TALLY_LATE]);
    c.timeouts_unsent = c.timeouts_unsent.max(t[TALLY_UNSENT]);
    c.connect_errors = c.connect_errors.max(t[TALLY_CONNECT]);
    c.produced = c.produced.max(t[TALLY_PRODUCED]);
    c.retried = c.retried.max(t[TALLY_RETRIED]);
    c.buffer_dropped = c.buffer_dropped.max(t[TALLY_BUFFER_DROPPED]);
    c.delivered_late = c.delivered_late.max(t[TALLY_DELIVERED_LATE]);
    c.resent_after_timeout = c.resent_after_timeout.max(t[TALLY_RESENT]);
    c.discarded = c.discarded.max(t[TALLY_DISCARDED]);
    c.offline_ticks = c.offline_ticks.max(t[TALLY_OFFLINE_TICKS]);
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulator_gets_the_run_spec_and_the_rest_of_the_run() {
        let spec = pb::RunSpec {
            target: "https://vtox:8443/x".into(),
            interval_s: 1.2,
            jitter: 0.1,
            batch_size: 10,
            sampling_rate: 50,
            faults: "bearing=3".into(),
            seed: 9,
            run_start: 1000.0,
            timeout_s: 5.0,
            max_in_flight: 64,
            duration_s: 60.0,
            fault_onset_s: Some(0.0),
            access: Some(pb::TargetAccess {
                target_ca_file: "/etc/vtox/backend-ca.pem".into(),
                login_url: "https://vtox:8443".into(),
                login_user: "fleet".into(),
                login_password_file: "/etc/vtox/password".into(),
                ..Default::default()
            }),
            delivery: "at-most-once".into(),
            buffer: 20,
            dropouts: "5%/90s".into(),
            ..Default::default()
        };
        let inst = pb::InstanceSpec {
            index: 2,
            first_vehicle: 100,
            vehicles: 50,
        };
        let a = sim_args(&spec, &inst, "host-a", 1030.0, Duration::from_secs(5)).unwrap();
        assert_eq!((a.vehicles, a.first_vehicle, a.instance), (50, 100, 2));
        assert_eq!(
            a.duration,
            Some(Duration::from_secs(30)),
            "the rest of the run"
        );
        assert_eq!(a.fault_onset, Duration::ZERO);
        assert_eq!(a.lease, Some(Duration::from_millis(2500)));
        assert_eq!(a.run_start, Some(1000.0));
        assert_eq!(a.target_ca, Some("/etc/vtox/backend-ca.pem".into()));
        assert_eq!(a.login_user.as_deref(), Some("fleet"));
        assert_eq!(a.auth_token_file, None);
        assert_eq!(a.delivery, vtox::delivery::Delivery::AtMostOnce);
        assert_eq!((a.buffer, a.dropouts.as_deref()), (20, Some("5%/90s")));
        // What the agent passes is what the simulator parses.
        let back =
            SimArgs::try_parse_from(std::iter::once("vtox-sim".to_string()).chain(a.to_args()))
                .unwrap();
        assert_eq!(back, a);
        assert!(sim_args(&spec, &inst, "host-a", 1060.0, Duration::from_secs(5)).is_none());
        // Without a duration or an onset the simulator's own defaults hold.
        let open = pb::RunSpec {
            duration_s: 0.0,
            fault_onset_s: None,
            ..spec
        };
        let a = sim_args(&open, &inst, "host-a", 1030.0, Duration::from_secs(5)).unwrap();
        assert_eq!(a.duration, None);
        assert_eq!(a.fault_onset, Duration::from_secs(300));
        // Nor with an older coordinator that sends no delivery settings.
        let old = pb::RunSpec {
            delivery: String::new(),
            buffer: 0,
            dropouts: String::new(),
            ..open
        };
        let a = sim_args(&old, &inst, "host-a", 1030.0, Duration::from_secs(5)).unwrap();
        assert_eq!(a.delivery, vtox::delivery::Delivery::StoreAndForward);
        assert_eq!((a.buffer, a.dropouts), (600, None));
    }

    #[test]
    fn tally_names_round_trip() {
        let k = TallyKey {
            run_id: "run-1795888545320".into(),
            index: 3,
            incarnation: 1_795_888_545_999,
            first_vehicle: 150,
            vehicles: 50,
        };
        let p = k.path(std::path::Path::new("/logs"), "host a/1");
        assert_eq!(
            p,
            PathBuf::from("/logs/tallies/host_a_1/run-1795888545320.3.1795888545999.150.50.tally")
        );
        let name = p.file_name().and_then(|n| n.to_str()).unwrap();
        assert_eq!(TallyKey::parse(name), Some(k));
        assert_eq!(TallyKey::parse("instance-0.tally"), None);
        assert_eq!(TallyKey::parse(".1.2.3.4.tally"), None);
    }

    #[test]
    fn backoff_doubles_to_30_s_gives_up_on_a_crash_loop_and_forgets() {
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let mut crashes = VecDeque::new();
        // Crashing at once after each restart: 1, 2, 4, 8, 16 s, then the sixth crash within
        // a minute (at 31 s) is a crash loop.
        let mut at = 0;
        let mut waits = Vec::new();
        loop {
            crashes.push_back(secs(at));
            match restart_after(&mut crashes, secs(at)) {
                Some(d) => {
                    waits.push(d.as_secs());
                    at += d.as_secs();
                }
                None => break,
            }
        }
        assert_eq!(waits, [1, 2, 4, 8, 16]);
        assert_eq!(at, 31);

        // Crashing every 40 s never makes five restarts a minute: the wait grows to 30 s.
        let mut crashes = VecDeque::new();
        let waits: Vec<u64> = (0..8)
            .map(|i| {
                crashes.push_back(secs(i * 40));
                restart_after(&mut crashes, secs(i * 40)).map_or(0, |d| d.as_secs())
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);

        // Ten quiet minutes later the backoff starts over.
        crashes.push_back(secs(7 * 40 + 601));
        assert_eq!(
            restart_after(&mut crashes, secs(7 * 40 + 601)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_tally_raises_counters_but_never_lowers_them() {
        use vtox::metrics::*;
        let mut t = [0u64; TALLY_SLOTS];
        t[TALLY_SENT] = 10;
        t[TALLY_ACCEPTED] = 9;
        t[TALLY_FAILED] = 1;
        t[TALLY_TIMEOUT] = 1;
        t[TALLY_LATE] = 1;
        let mut c = pb::Counters {
            sent: 8,
            accepted: 8,
            ..Default::default()
        };
        apply_tally(&mut c, &t);
        assert_eq!((c.sent, c.accepted, c.failed), (10, 9, 1));
        assert_eq!((c.timeouts, c.late_accepted), (1, 1));
        let mut newer = pb::Counters {
            sent: 20,
            accepted: 20,
            ..Default::default()
        };
        apply_tally(&mut newer, &t);
        assert_eq!((newer.sent, newer.accepted), (20, 20));
    }
}
