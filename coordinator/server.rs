//! The coordinator's gRPC services and loops: thin adapters over the control core
//! (`control.rs`). Each handler reads the clock, locks, asks the core, unlocks and then sends
//! what the core decided; the state file is written by its own task, never under the lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use vtox::control::{
    Commands, Control, JoinRefused, Joining, Limits, MergedCache, Now, Rendered, SessionRefused,
    StateToWrite,
};
use vtox::planning;
use vtox::wire::pb::{self, agent_message, coordinator_message};
use vtox::wire::PROTOCOL_MAJOR;

const STATE_FILE: &str = "state.pb";

/// Outbound messages queued per agent before the coordinator stops waiting for a slow one.
const SESSION_QUEUE: usize = 16;

/// A status that took this long to make is made in the background, ahead of the watchers,
/// and answered from rather than made per request (unless `StatusRequest.fresh` asks).
const EXPENSIVE_STATUS: Duration = Duration::from_millis(20);

/// Expensive statuses are made ahead every heartbeat while someone asked for one this
/// recently ...
const WATCHED: Duration = Duration::from_secs(5);

/// ... and this often otherwise, so that the counters a first look gets are at most this old.
const UNWATCHED_REFRESH: Duration = Duration::from_secs(10);

/// Ticks asked for by events (joins, sessions, stops) come at most this often: a thousand
/// agents joining in a second cost a few ticks, not a thousand.
const MIN_TICK_SPACING: Duration = Duration::from_millis(100);

pub struct Settings {
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Added to the lease before a silent agent's ranges move: by then the agent has surely
    /// stopped its simulators, and they theirs, so no vehicle is driven twice.
    pub grace: Duration,
    /// Where the run is kept across restarts (None: in memory only).
    pub state_dir: Option<PathBuf>,
    /// Most agents that may join.
    pub max_agents: usize,
    /// Most joins accepted per second, whoever sends them.
    pub max_join_rate: u32,
}

impl Settings {
    /// `serve`'s flags as the server takes them.
    pub fn of(a: &crate::args::ServeArgs) -> Settings {
        Settings {
            lease: a.lease,
            heartbeat: a.heartbeat,
            grace: a.grace,
            state_dir: a.state_dir.clone(),
            max_agents: a.max_agents,
            max_join_rate: a.max_join_rate,
        }
    }
}

/// What an agent was last sent: its session, run and instances (index, first, vehicles).
type Sent = (u64, String, Vec<(u32, u64, u64)>);

/// An agent's outbound queue. Its items are boxed: a channel allocates its slots 32 at a
/// time, and an assignment with its run spec is hundreds of bytes, which for 10,000 agents
/// made the queues alone a quarter of a GB.
type Outbox = mpsc::Sender<Box<pb::CoordinatorMessage>>;

struct Shared {
    core: Control,
    /// Each connected agent's session: its id and its outbound queue.
    outbox: HashMap<String, (u64, Outbox)>,
}

pub struct Coordinator {
    shared: Mutex<Shared>,
    changed: Notify,
    settings: Settings,
    /// Merged histograms kept between statuses; also what makes concurrent statuses take
    /// turns instead of each merging everything.
    merged: Mutex<MergedCache>,
    last_status: Mutex<Option<LastStatus>>,
    refreshing: std::sync::atomic::AtomicBool,
    /// The latest encoded state to write; the writer task takes the newest, skipping any it
    /// had no time for.
    writes: watch::Sender<Option<Arc<StateToWrite>>>,
    /// The last ramp's progress, as its client reported it (for the dashboard).
    ramp: Mutex<Option<RampBoard>>,
}

/// A ramp as its client last reported it.
#[derive(Debug, Clone, Default)]
pub struct RampBoard {
    pub id: String,
    pub state: String,
    pub steps: serde_json::Value,
    pub current: serde_json::Value,
    pub report_json: String,
    pub report_html: String,
    pub history_csv: String,
    pub error: String,
}

/// The last status made, and what it cost.
struct LastStatus {
    status: Arc<Rendered>,
    version: u64,
    made: Instant,
    took: Duration,
    asked: Instant,
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Coordinator {
    /// A coordinator, resuming the run kept in `settings.state_dir` if there is one.
    pub fn new(settings: Settings) -> Result<Arc<Self>, String> {
        let limits = Limits {
            lease: settings.lease,
            grace: settings.grace,
            max_agents: settings.max_agents,
            max_join_rate: settings.max_join_rate,
        };
        let mut core = None;
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
                    let restored = Control::restore(limits.clone(), stored, now());
                    if let Some(run) = restored.run() {
                        tracing::info!(
                            run = run.id,
                            state = run.state.name(),
                            "resumed from {}",
                            path.display()
                        );
                    }
                    core = Some(restored);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        let core = core.unwrap_or_else(|| Control::new(limits, now()));
        Ok(Arc::new(Coordinator {
            shared: Mutex::new(Shared {
                core,
                outbox: HashMap::new(),
            }),
            changed: Notify::new(),
            settings,
            merged: Mutex::new(MergedCache::default()),
            last_status: Mutex::new(None),
            refreshing: std::sync::atomic::AtomicBool::new(false),
            writes: watch::Sender::new(None),
            ramp: Mutex::new(None),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    fn apply(&self, c: Commands) {
        if c.reconcile {
            self.changed.notify_one();
        }
    }

    /// Makes the run status afresh. The core is locked only to take a snapshot; the merging
    /// happens after, one status at a time.
    fn make_status(&self) -> Arc<Rendered> {
        let mut merged = lock(&self.merged);
        let started = Instant::now();
        let (snapshot, version) = {
            let sh = self.lock();
            (sh.core.status_snapshot(now()), sh.core.version())
        };
        let status = Arc::new(snapshot.render(&mut merged));
        let mut last = lock(&self.last_status);
        let asked = last.as_ref().map_or(started, |l| l.asked);
        *last = Some(LastStatus {
            status: status.clone(),
            version,
            made: started,
            took: started.elapsed(),
            asked,
        });
        status
    }

    /// The run status. Its run fields (state, elapsed, unassigned) are always current. Its
    /// counters are merged now when `fresh` is asked for, or when merging is cheap and
    /// something changed since the last merge; otherwise they are the last merge's: a fleet
    /// large enough for merging to cost (thousands of agents) is merged in the background,
    /// ahead of whoever watches (`refresh_status`), and a watcher never waits behind it.
    fn status(&self, agent_histograms: bool, fresh: bool) -> pb::RunStatus {
        self.status_if(agent_histograms, true, |l, version| {
            l.version == version || (!fresh && l.took >= EXPENSIVE_STATUS)
        })
    }

    /// The status from the last merge when `usable` says it may stand for now (it is never
    /// passed off as another run's), else merged now; `watched` marks someone as looking.
    fn status_if(
        &self,
        agent_histograms: bool,
        watched: bool,
        usable: impl FnOnce(&LastStatus, u64) -> bool,
    ) -> pb::RunStatus {
        let (version, head) = {
            let sh = self.lock();
            (sh.core.version(), sh.core.run_head(now()))
        };
        let cached = {
            let mut last = lock(&self.last_status);
            last.as_mut().and_then(|l| {
                if watched {
                    l.asked = Instant::now();
                }
                usable(l, version).then(|| l.status.clone())
            })
        };
        if let Some(answer) = cached.and_then(|r| r.answer(head, agent_histograms)) {
            return answer;
        }
        let r = self.make_status();
        if agent_histograms {
            r.with_agent_histograms()
        } else {
            r.status.clone()
        }
    }

    /// Makes the next status in the background when one is due: for a run with no merge yet,
    /// and after that whenever something changed, every heartbeat while merging is cheap or
    /// someone watches, every `UNWATCHED_REFRESH` while it is expensive and nobody does, and
    /// never more often than leaves the merging a quarter of a core. So even the first look
    /// at a large fleet is answered at once, from a merge at most that old.
    fn refresh_status(self: &Arc<Self>) {
        let (run_id, version) = {
            let sh = self.lock();
            (sh.core.run().map(|r| r.id.clone()), sh.core.version())
        };
        let Some(run_id) = run_id else {
            return;
        };
        let due = match lock(&self.last_status).as_ref() {
            Some(l) if l.status.status.run_id == run_id => {
                let every = if l.took < EXPENSIVE_STATUS || l.asked.elapsed() < WATCHED {
                    self.settings.heartbeat
                } else {
                    UNWATCHED_REFRESH
                };
                l.version != version
                    && l.made.elapsed() + Duration::from_millis(100) >= every.max(4 * l.took)
            }
            _ => true,
        };
        if !due
            || self
                .refreshing
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let c = self.clone();
        tokio::task::spawn_blocking(move || {
            c.make_status();
            c.refreshing
                .store(false, std::sync::atomic::Ordering::Release);
        });
    }

    async fn status_async(
        self: &Arc<Self>,
        agent_histograms: bool,
        fresh: bool,
    ) -> Result<pb::RunStatus, Status> {
        let c = self.clone();
        tokio::task::spawn_blocking(move || c.status(agent_histograms, fresh))
            .await
            .map_err(|e| Status::internal(format!("the status could not be made: {e}")))
    }

    /// Starts a run (the gRPC `Start`, for the dashboard too).
    pub fn start(&self, req: pb::StartRequest) -> Result<pb::StartReply, String> {
        let result = self.lock().core.start(req, now());
        let (reply, c) = result?;
        self.apply(c);
        Ok(reply)
    }

    /// Stops the run; whether one was running.
    pub fn stop(&self) -> bool {
        let (was_running, c) = self.lock().core.stop(now());
        self.apply(c);
        was_running
    }

    /// Moves whole instances to agents with room: (instances, vehicles) moved.
    pub fn rebalance(&self) -> Result<(u32, u64), String> {
        let result = self.lock().core.rebalance(now());
        let (moved, c) = result?;
        self.apply(c);
        Ok(moved)
    }

    pub fn list_agents(&self) -> Vec<pb::AgentInfo> {
        self.lock().core.list_agents(now())
    }

    pub fn epoch(&self) -> u64 {
        self.lock().core.epoch()
    }

    /// The status for the dashboard, off the async threads: from the last merge if it is of
    /// this run and at most `max_age` old, else merged now. It does not count as someone
    /// watching: the dashboard paces its own merges (`web::produce`).
    pub async fn dashboard_status(self: &Arc<Self>, max_age: Duration) -> pb::RunStatus {
        let c = self.clone();
        tokio::task::spawn_blocking(move || {
            c.status_if(false, false, |l, version| {
                l.version == version || l.made.elapsed() <= max_age
            })
        })
        .await
        .unwrap_or_default()
    }

    /// How long the last merge of the status took (zero before the first).
    pub fn status_cost(&self) -> Duration {
        lock(&self.last_status)
            .as_ref()
            .map_or(Duration::ZERO, |l| l.took)
    }

    /// Records a ramp's progress.
    pub fn ramp_progress(&self, p: pb::RampProgressRequest) {
        let parse = |text: &str| serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
        let board = RampBoard {
            steps: parse(&p.steps_json),
            current: parse(&p.current_json),
            id: p.ramp_id,
            state: p.state,
            report_json: p.report_json,
            report_html: p.report_html,
            history_csv: p.history_csv,
            error: p.error,
        };
        *lock(&self.ramp) = Some(board);
    }

    /// The last ramp's progress, if a ramp reported any.
    pub fn ramp(&self) -> Option<RampBoard> {
        lock(&self.ramp).clone()
    }

    /// Prometheus text for `--metrics-listen`.
    pub fn prometheus(&self) -> String {
        let connected = self.lock().outbox.len();
        vtox::prometheus::coordinator(&self.status(false, false), connected)
    }

    /// The reconcile loop: each agent gets its desired assignment now when something changed,
    /// and again every heartbeat as its lease renewal.
    pub async fn reconcile_loop(self: Arc<Self>) {
        if let Some(dir) = self.settings.state_dir.clone() {
            tokio::spawn(write_loop(dir, self.writes.subscribe()));
        }
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let mut last_renew = last;
        // What each agent was last sent (session, run, instances): a tick asked for by an event
        // sends only what changed, so ten thousand joins do not each resend every assignment.
        // The heartbeat tick sends everything: it renews the leases and carries new epochs.
        let mut sent: HashMap<String, Sent> = HashMap::new();
        loop {
            let mut renew = false;
            tokio::select! {
                _ = tick.tick() => renew = true,
                _ = self.changed.notified() => {
                    let wait = MIN_TICK_SPACING.saturating_sub(last.elapsed());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            last = Instant::now();
            let t = now();
            // This loop's own lateness: a coordinator starved of CPU heard nothing from its
            // agents meanwhile, through no fault of theirs.
            let lag = if renew {
                let lag = vtox::agent::lag(
                    self.settings.heartbeat,
                    last.saturating_duration_since(last_renew),
                );
                last_renew = last;
                lag
            } else {
                Duration::ZERO
            };
            let mut sends = Vec::new();
            {
                let mut sh = self.lock();
                if lag > self.settings.lease / 4 {
                    sh.core.stalled(lag, t);
                }
                let assignments = sh.core.tick(t);
                if self.settings.state_dir.is_some() {
                    if let Some(state) = sh.core.take_write(t) {
                        self.writes.send_replace(Some(Arc::new(state)));
                    }
                }
                for a in assignments {
                    if let Some((id, tx)) = sh.outbox.get(&a.agent) {
                        if *id == a.session {
                            let content = (
                                a.session,
                                a.assignment.run_id.clone(),
                                a.assignment
                                    .instances
                                    .iter()
                                    .map(|i| (i.index, i.first_vehicle, i.vehicles))
                                    .collect(),
                            );
                            if !renew && sent.get(&a.agent) == Some(&content) {
                                continue;
                            }
                            sent.insert(a.agent.clone(), content);
                            sends.push((a.agent, a.session, tx.clone(), a.assignment));
                        }
                    }
                }
            }
            let mut lost = Vec::new();
            for (name, session, tx, assignment) in sends {
                let msg = pb::CoordinatorMessage {
                    msg: Some(coordinator_message::Msg::Assignment(assignment)),
                };
                match tx.try_send(Box::new(msg)) {
                    Ok(()) => {}
                    // A full queue means the agent is slow; the next tick tries again.
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => lost.push((name, session)),
                }
            }
            self.refresh_status();
            if !lost.is_empty() {
                let mut sh = self.lock();
                for (name, session) in lost {
                    // The next tick is due anyway; nothing more to ask for.
                    let _ = close_session(&mut sh, &name, session);
                }
            }
        }
    }
}

/// Forgets a session in the core and the outbox alike (only if it is still the current one).
fn close_session(sh: &mut Shared, name: &str, session: u64) -> Commands {
    if sh.outbox.get(name).is_some_and(|(id, _)| *id == session) {
        sh.outbox.remove(name);
    }
    sh.core.session_closed(name, session)
}

/// Writes each state handed over: to a temporary file, synced, then renamed over the old one,
/// so that a crash at any moment leaves either the old or the new state. States that come
/// faster than the disk takes them are skipped for the newest.
async fn write_loop(dir: PathBuf, mut rx: watch::Receiver<Option<Arc<StateToWrite>>>) {
    while rx.changed().await.is_ok() {
        let Some(state) = rx.borrow_and_update().clone() else {
            continue;
        };
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || write_atomically(&d, &state)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("cannot write the state to {}: {e}", dir.display());
                // Try again with whatever is newest by then.
                tokio::time::sleep(Duration::from_secs(1)).await;
                rx.mark_changed();
            }
            Err(e) => tracing::error!("the state writer failed: {e}"),
        }
    }
}

fn write_atomically(dir: &Path, state: &StateToWrite) -> std::io::Result<()> {
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = std::io::BufWriter::with_capacity(64 << 10, std::fs::File::create(&tmp)?);
    state.write_to(&mut f)?;
    let f = f.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
        let cores = hw.logical_cores;
        let joining = Joining {
            name: name.clone(),
            hardware: hw,
            max_vehicles: req.max_vehicles,
            address: address.clone(),
        };
        let result = self.0.lock().core.join(joining, now());
        match result {
            Ok(()) => {}
            Err(JoinRefused::Rate(n)) => {
                return Err(Status::resource_exhausted(format!(
                    "more than {n} joins this second; retry shortly"
                )))
            }
            Err(JoinRefused::Full(n)) => {
                return Err(Status::resource_exhausted(format!(
                    "this coordinator takes at most {n} agents (--max-agents)"
                )))
            }
            Err(JoinRefused::Taken { address }) => {
                return Err(Status::already_exists(format!(
                    "an agent named {name:?} is already connected (from {address}); give each agent its own --name"
                )))
            }
        }
        tracing::info!(agent = name, %address, cores, "agent joined");
        Ok(Response::new(pb::JoinResponse {
            agent_id: name,
            lease_ms: self.0.settings.lease.as_millis() as u64,
            heartbeat_ms: self.0.settings.heartbeat.as_millis() as u64,
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
        let (session_id, commands) = {
            let mut sh = coord.lock();
            match sh.core.open_session(&name, hello.epoch, now()) {
                Ok((id, c)) => {
                    sh.outbox.insert(name.clone(), (id, tx));
                    (id, c)
                }
                Err(SessionRefused::NotJoined) => {
                    return Err(Status::not_found(format!(
                        "no agent {name:?} has joined; join first"
                    )))
                }
                Err(SessionRefused::AlreadyOpen) => {
                    return Err(Status::already_exists(format!(
                        "agent {name:?} already has a session"
                    )))
                }
            }
        };
        coord.apply(commands);
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::AgentMessage {
                        msg: Some(agent_message::Msg::Heartbeat(hb)),
                    })) => {
                        let c = coord.lock().core.heartbeat(&name, hb, now());
                        coord.apply(c);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let c = close_session(&mut coord.lock(), &name, session_id);
            coord.apply(c);
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|m: Box<pb::CoordinatorMessage>| Ok(*m)),
        )))
    }
}

#[tonic::async_trait]
impl pb::control_service_server::ControlService for ControlApi {
    async fn plan(&self, req: Request<pb::PlanRequest>) -> Result<Response<pb::PlanReply>, Status> {
        let params = req.into_inner().params.unwrap_or_default();
        let hosts = self.0.lock().core.connected_hosts();
        let (_, reply) =
            planning::plan_hosts(&hosts, &params).map_err(Status::failed_precondition)?;
        Ok(Response::new(reply))
    }

    async fn capacity(
        &self,
        req: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanReply>, Status> {
        let params = req.into_inner().params.unwrap_or_default();
        let hosts = self.0.lock().core.connected_hosts();
        Ok(Response::new(planning::capacity_reply(&hosts, &params)))
    }

    async fn start(
        &self,
        req: Request<pb::StartRequest>,
    ) -> Result<Response<pb::StartReply>, Status> {
        let reply = self
            .0
            .start(req.into_inner())
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(reply))
    }

    async fn stop(
        &self,
        _req: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopReply>, Status> {
        Ok(Response::new(pb::StopReply {
            was_running: self.0.stop(),
        }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::RunStatus>, Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.0.status_async(req.agent_histograms, req.fresh).await?,
        ))
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
                let status = coord.status_async(false, false).await;
                if tx.send(status).await.is_err() {
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
        let (moved_instances, moved_vehicles) =
            self.0.rebalance().map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::RebalanceReply {
            moved_instances,
            moved_vehicles,
        }))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsReply>, Status> {
        Ok(Response::new(pb::ListAgentsReply {
            agents: self.0.list_agents(),
        }))
    }

    async fn ramp_progress(
        &self,
        req: Request<pb::RampProgressRequest>,
    ) -> Result<Response<pb::RampProgressReply>, Status> {
        self.0.ramp_progress(req.into_inner());
        Ok(Response::new(pb::RampProgressReply {}))
    }
}
