//! The agent's control thread: joining, the session with the coordinator, the lease and the
//! simulators' keep-alive, on a single-threaded runtime of its own. However busy the
//! supervisor's runtime gets (hundreds of processes to spawn, their metric lines to parse),
//! heartbeats leave on time, assignments are read as they arrive and the lease is judged by
//! when the coordinator spoke, not by when the supervisor got round to it. The supervisor is
//! told what to run through a `watch` (the newest desired state wins), so this thread never
//! waits on it.

use crate::links::{Desired, KeepAlive, Snapshot};
use anyhow::{bail, Result};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use vtox::agent::{Health, Lease, Loop, Verdict};
use vtox::wire::pb::agent_service_client::AgentServiceClient;
use vtox::wire::pb::{self, agent_message, coordinator_message};
use vtox::wire::PROTOCOL_MAJOR;

/// How often the control thread wakes: to judge the lease, keep the simulators alive and
/// measure its own lateness.
const GUARD_PERIOD: Duration = Duration::from_millis(100);

/// How to reach the coordinator and what to tell it.
pub struct Session {
    pub url: String,
    pub name: String,
    pub hardware: pb::Hardware,
    pub max_vehicles: Option<u64>,
    pub bearer: vtox::auth::Bearer,
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// What the control thread shares with the supervisor.
#[derive(Clone)]
pub struct Links {
    pub desired: watch::Sender<Desired>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub health: Arc<Mutex<Health>>,
    pub keep_alive: KeepAlive,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the control thread. It returns when `stop` fires, or with an error when the
/// coordinator refuses this agent for good.
pub fn spawn(
    session: Session,
    links: Links,
    stop: watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    Ok(std::thread::Builder::new()
        .name("vtox-control".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run(session, links, stop))
        })?)
}

async fn run(s: Session, links: Links, mut stop: watch::Receiver<bool>) -> Result<()> {
    let lease = Arc::new(Mutex::new(Lease::new(vtox::agent::LEASE_BEFORE_JOIN)));
    let guard = tokio::spawn(guard(lease.clone(), links.clone()));
    let outcome = join_loop(&s, &lease, &links, &mut stop).await;
    guard.abort();
    outcome
}

/// Every `GUARD_PERIOD`: how late this thread's own timer is (a starved host), whether the
/// lease expired, and the simulators' keep-alive.
async fn guard(lease: Arc<Mutex<Lease>>, links: Links) {
    let mut tick = tokio::time::interval(GUARD_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    let mut last_beat = last;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let lag = vtox::agent::lag(GUARD_PERIOD, now.saturating_duration_since(last));
        last = now;
        lock(&links.health).record(Loop::Control, now, lag);
        let (expired, valid, length) = {
            let mut l = lock(&lease);
            (l.check(now), l.valid(), l.length())
        };
        if let Some(e) = expired {
            expiry(e, &links, now);
        }
        if valid && now.saturating_duration_since(last_beat) >= length / 8 {
            links.keep_alive.beat();
            last_beat = now;
        }
    }
}

/// A lease expiry: every instance stops, and the log says whose silence it was.
fn expiry(e: vtox::agent::Expired, links: &Links, now: Instant) {
    let starved = lock(&links.health).starved_for(now);
    if starved * 2 >= e.silent {
        tracing::warn!(
            silent = ?e.silent,
            starved = ?starved,
            "lease expired while this agent was starved of CPU (its own timers were late), not because the coordinator went quiet; stopping all instances until the coordinator confirms them"
        );
    } else {
        tracing::warn!(silent = ?e.silent, "lease expired without word from the coordinator; stopping all instances");
    }
    links.desired.send_modify(|d| d.expiries += 1);
}

async fn join_loop(
    s: &Session,
    lease: &Arc<Mutex<Lease>>,
    links: &Links,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = Duration::from_millis(250);
    loop {
        let joined = tokio::select! {
            r = join(s) => r,
            _ = stop.changed() => return Ok(()),
        };
        let (client, reply) = match joined {
            Ok(j) => j,
            Err(JoinError::Refused(status)) => {
                // A refusal (bad token, duplicate name, unsupported version) will not change by
                // retrying: say why and stop.
                bail!(
                    "the coordinator at {} refused this agent: {}",
                    s.url,
                    status.message()
                );
            }
            Err(JoinError::Unreachable(e)) => {
                tracing::warn!(
                    "cannot reach the coordinator at {}: {e}; retrying in {backoff:?}",
                    s.url
                );
                tokio::select! {
                    _ = tokio::time::sleep(jittered(backoff)) => {}
                    _ = stop.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(250);
        let length = Duration::from_millis(reply.lease_ms.max(500));
        lock(lease).set_length(length);
        lock(&links.health).set_lease(length);
        links.desired.send_modify(|d| d.lease = length);
        let heartbeat = Duration::from_millis(reply.heartbeat_ms.clamp(100, 60_000));
        tracing::info!(agent_id = reply.agent_id, "joined {}", s.url);
        match session(client, &reply.agent_id, heartbeat, lease, links, stop).await {
            Ok(SessionEnd::Stop) => return Ok(()),
            Ok(SessionEnd::Lost(why)) => {
                tracing::warn!("session with the coordinator ended: {why}; rejoining")
            }
            Err(e) => tracing::warn!("session with the coordinator failed: {e:#}; rejoining"),
        }
        tokio::select! {
            _ = tokio::time::sleep(jittered(backoff)) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Up to ±25% around `d`, so that agents cut off together do not reconnect in lockstep.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let f = 0.75 + 0.5 * (vtox::rng::unit(vtox::rng::mix64(u64::from(nanos))));
    d.mul_f64(f)
}

type Client = AgentServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, vtox::auth::Bearer>,
>;

enum JoinError {
    Refused(tonic::Status),
    Unreachable(String),
}

async fn join(s: &Session) -> Result<(Client, pb::JoinResponse), JoinError> {
    let endpoint = tonic::transport::Endpoint::from_shared(s.url.clone())
        .map_err(|e| JoinError::Unreachable(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    let endpoint = match s.tls.clone() {
        Some(t) => endpoint
            .tls_config(t)
            .map_err(|e| JoinError::Unreachable(e.to_string()))?,
        None => endpoint,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| JoinError::Unreachable(e.to_string()))?;
    let mut client = AgentServiceClient::with_interceptor(channel, s.bearer.clone());
    let req = pb::JoinRequest {
        name: s.name.clone(),
        hardware: Some(s.hardware.clone()),
        max_vehicles: s.max_vehicles.unwrap_or(0),
        protocol_major: PROTOCOL_MAJOR,
    };
    match client.join(req).await {
        Ok(r) => Ok((client, r.into_inner())),
        Err(st)
            if matches!(
                st.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::ResourceExhausted
            ) =>
        {
            Err(JoinError::Unreachable(st.message().to_string()))
        }
        Err(st) => Err(JoinError::Refused(st)),
    }
}

enum SessionEnd {
    Stop,
    Lost(String),
}

async fn session(
    mut client: Client,
    agent_id: &str,
    heartbeat: Duration,
    lease: &Arc<Mutex<Lease>>,
    links: &Links,
    stop: &mut watch::Receiver<bool>,
) -> Result<SessionEnd> {
    let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(16);
    let epoch = lock(lease).epoch();
    out_tx
        .send(pb::AgentMessage {
            msg: Some(agent_message::Msg::Hello(pb::Hello {
                agent_id: agent_id.to_string(),
                epoch,
            })),
        })
        .await?;
    let mut inbound = client
        .session(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    let mut sys = sysinfo::System::new();
    let mut tick = tokio::time::interval(heartbeat);
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(pb::CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(a)) })) => {
                    assigned(a, lease, links);
                }
                Ok(Some(_)) => {}
                Ok(None) => return Ok(SessionEnd::Lost("the coordinator closed the session".into())),
                Err(s) => return Ok(SessionEnd::Lost(s.message().to_string())),
            },
            _ = tick.tick() => {
                let hb = heartbeat_now(&mut sys, lease, links);
                if out_tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Heartbeat(hb)) }).await.is_err() {
                    return Ok(SessionEnd::Lost("the session's stream closed".into()));
                }
            }
            _ = stop.changed() => return Ok(SessionEnd::Stop),
        }
    }
}

/// An assignment arrived: the lease judges it, the supervisor gets it if it is to be applied.
fn assigned(a: pb::Assignment, lease: &Arc<Mutex<Lease>>, links: &Links) {
    let now = Instant::now();
    let (expired, verdict) = lock(lease).heard(a.epoch, &a.run_id, !a.instances.is_empty(), now);
    if let Some(e) = expired {
        expiry(e, links, now);
    }
    match verdict {
        Verdict::Apply => links
            .desired
            .send_modify(|d| d.assignment = Some(Arc::new(a))),
        Verdict::Renewed => {}
        Verdict::Stale => tracing::warn!(epoch = a.epoch, "refusing a stale assignment"),
        Verdict::AwaitNewer => tracing::debug!(
            epoch = a.epoch,
            "waiting for a newer epoch after the lease expired"
        ),
    }
}

/// The heartbeat: the supervisor's latest statuses as published (never waited for), this
/// host's CPU, the agent's own lateness and its lease.
fn heartbeat_now(
    sys: &mut sysinfo::System,
    lease: &Arc<Mutex<Lease>>,
    links: &Links,
) -> pb::Heartbeat {
    let snap = links.snapshot.borrow().clone();
    sys.refresh_cpu_usage();
    let (epoch, lapsed, expiries) = {
        let l = lock(lease);
        (l.epoch(), l.lapsed(), l.expiries())
    };
    let (control_lag, supervisor_lag, starved) = {
        let mut h = lock(&links.health);
        let (c, s) = h.take_worst();
        (c, s, h.starved(Instant::now()))
    };
    let usage = pb::HostUsage {
        cpu_percent: f64::from(sys.global_cpu_usage()),
        rss_bytes: snap.rss_bytes,
        simulators_cpu_percent: snap.simulators_cpu_percent,
        cores: sys.cpus().len() as u32,
        agent_cpu_percent: snap.agent_cpu_percent,
        control_lag_ms: control_lag.as_secs_f64() * 1e3,
        supervisor_lag_ms: supervisor_lag.as_secs_f64() * 1e3,
        lease_expiries: expiries,
        starved,
        starts_deferred: snap.starts_deferred,
    };
    pb::Heartbeat {
        epoch,
        instances: snap.instances.clone(),
        usage: Some(usage),
        lapsed,
    }
}
