//! Lanes: one task per keep-alive connection, each carrying one request at a time, like wrk's
//! connections but fed by the open-model scheduler. An idle lane is handed the next message;
//! when none is idle a new lane (connection) opens, up to `--max-in-flight`; beyond that the
//! tick is dropped. Idle lanes are reused last-in first-out, so the number of open connections
//! follows the load instead of the cap.
//!
//! A request that times out is failed, as the contract says, but its connection is not simply
//! dropped: a backend that stalls still answers what it had already read once it thaws. The
//! connection goes to a watcher that keeps reading for `--late-window` and counts a 200 that
//! arrives late, so every message the backend accepted is known to the load generator too.

use crate::auth::Login;
use crate::counters::Counters;
use crate::reader::Reader;
use crate::stream::{open, ExchangeError, Stream, TlsTarget};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};
use vtox::counters::Counter;
use vtox::delivery::Outcome;

/// A request ready to go: `bytes[start..]` is the whole HTTP request.
pub struct Job {
    pub bytes: Vec<u8>,
    pub start: usize,
    /// When the request was handed to a lane: latency (service time) and the timeout count
    /// from here.
    pub created: Instant,
    /// When the message was due by its schedule: the delay histogram counts from here, so
    /// time spent behind the schedule or in a vehicle's buffer is never hidden.
    pub due: Instant,
    /// The vehicle (index in the slice), told the outcome with store-and-forward.
    pub vehicle: u32,
    /// The message waited in its vehicle's buffer before this send.
    pub waited: bool,
    /// Generation of the login token the request carries, so that a 401 renews only the
    /// token in use (see `auth::Login::unauthorized`).
    pub auth_gen: u64,
}

struct Shared {
    host: String,
    port: u16,
    timeout: Duration,
    counters: Arc<Counters>,
    idle: Mutex<Vec<usize>>,
    /// How many lanes `idle` holds, readable without its lock: the scheduler asks whether
    /// there is room several times per message.
    idle_count: AtomicUsize,
    late_window: Duration,
    /// A kept-alive connection idle this long is closed rather than reused: a server closes
    /// idle connections on its own clock (uvicorn after 5 s), and one closing just as a request
    /// goes out would leave that request's fate unknown.
    idle_limit: Duration,
    tls: Option<TlsTarget>,
    login: Option<Arc<Login>>,
    /// Whether the reason for failing handshakes was logged already.
    tls_logged: AtomicBool,
    /// Bounds the connections watched for late answers; beyond it a timed-out connection is
    /// closed as before and its outcome stays unknown.
    late_slots: Arc<Semaphore>,
    /// Where each outcome goes, with store-and-forward (the vehicle's modem waits for it).
    done: Option<mpsc::UnboundedSender<Done>>,
}

/// The outcome of one vehicle's request, for its modem.
pub struct Done {
    pub vehicle: u32,
    pub outcome: Outcome,
}

pub struct Lanes {
    senders: Vec<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    max: usize,
}

/// Where and how lanes connect.
pub struct LaneConfig {
    pub host: String,
    pub port: u16,
    pub timeout: Duration,
    pub late_window: Duration,
    pub idle_limit: Duration,
    pub tls: Option<TlsTarget>,
    /// The login session to renew on a 401, with `--login`.
    pub login: Option<Arc<Login>>,
    /// Most lanes (connections) at once.
    pub max: usize,
    /// Where outcomes go (store-and-forward); None: nobody waits for them.
    pub done: Option<mpsc::UnboundedSender<Done>>,
}

impl Lanes {
    pub fn new(cfg: LaneConfig, counters: Arc<Counters>) -> Self {
        let max = cfg.max;
        let shared = Arc::new(Shared {
            host: cfg.host,
            port: cfg.port,
            timeout: cfg.timeout,
            counters,
            idle: Mutex::new(Vec::new()),
            idle_count: AtomicUsize::new(0),
            late_window: cfg.late_window,
            idle_limit: cfg.idle_limit,
            tls: cfg.tls,
            login: cfg.login,
            tls_logged: AtomicBool::new(false),
            late_slots: Arc::new(Semaphore::new(max)),
            done: cfg.done,
        });
        Lanes {
            senders: Vec::new(),
            shared,
            max,
        }
    }

    fn pop_idle(&self) -> Option<usize> {
        if self.shared.idle_count.load(Relaxed) == 0 {
            return None;
        }
        let lane = match self.shared.idle.lock() {
            Ok(mut g) => g.pop(),
            Err(poisoned) => poisoned.into_inner().pop(),
        };
        if lane.is_some() {
            self.shared.idle_count.fetch_sub(1, Relaxed);
        }
        lane
    }

    /// Whether a job could be dispatched now (checked before a message is built). Lanes only
    /// become idle behind the scheduler's back, never busy, so a yes stays true until the
    /// scheduler itself dispatches.
    pub fn has_room(&self) -> bool {
        self.senders.len() < self.max || self.shared.idle_count.load(Relaxed) > 0
    }

    /// Hands the job to a lane; gives it back when every lane is busy and no more may open.
    pub fn dispatch(&mut self, job: Job) -> Result<(), Job> {
        let lane = match self.pop_idle() {
            Some(l) => l,
            None if self.senders.len() < self.max => {
                let (tx, rx) = mpsc::channel(1);
                let id = self.senders.len();
                self.senders.push(tx);
                self.shared.counters.lanes.fetch_add(1, Relaxed);
                tokio::spawn(run_lane(id, rx, self.shared.clone()));
                id
            }
            None => return Err(job),
        };
        self.shared.counters.in_flight.fetch_add(1, Relaxed);
        // An idle lane's channel is empty, so this only fails if the lane task is gone.
        self.senders[lane].try_send(job).map_err(|e| {
            self.shared.counters.in_flight.fetch_sub(1, Relaxed);
            match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            }
        })
    }
}

enum Failure {
    Timeout,
    Connect,
    /// The answer broke HTTP (an oversized or malformed head, bad chunking): the server is
    /// wrong, not the network, so it is counted apart.
    Protocol,
    Tls,
}

/// A kept-alive connection and when it last finished an exchange.
struct Conn {
    stream: Stream,
    idle_since: Instant,
}

/// A connection idle for less than this is reused without a look at its socket: under load
/// lanes are reused within microseconds, and a server closing a connection that soon after an
/// answer without saying so is not worth a system call per message. Beyond it, one
/// non-blocking peek tells whether the server closed it meanwhile.
const PEEK_AFTER: Duration = Duration::from_millis(1);

impl Conn {
    /// Whether the connection can carry another request: not idle past the client's own
    /// limit, and not closed (or written to) by the server while it was idle. A closed one is
    /// found here, before a request is written to it, so a POST is never sent into a
    /// connection the server already gave up and then replayed.
    fn reusable(&self, idle_limit: Duration) -> bool {
        let idle = self.idle_since.elapsed();
        if idle >= idle_limit {
            return false;
        }
        if idle < PEEK_AFTER {
            return true;
        }
        let mut byte = [0u8; 1];
        // SAFETY: the descriptor is owned by `self.stream`, alive for this call, and the
        // buffer is valid for one byte; MSG_PEEK|MSG_DONTWAIT neither consumes nor blocks.
        let n = unsafe {
            libc::recv(
                self.stream.tcp().as_raw_fd(),
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        // Nothing to read is the only healthy state of an idle connection: 0 is the server's
        // close, and bytes nobody asked for mean it is out of step (or, over TLS, its
        // close_notify).
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }
}

async fn run_lane(id: usize, mut rx: mpsc::Receiver<Job>, shared: Arc<Shared>) {
    let mut conn: Option<Conn> = None;
    let mut reader = Reader::default();
    while let Some(job) = rx.recv().await {
        let deadline = tokio::time::Instant::from_std(job.created + shared.timeout);
        let mut written = false;
        let result = match tokio::time::timeout_at(
            deadline,
            exchange(&mut conn, &job, &mut reader, &mut written, &shared),
        )
        .await
        {
            Ok(r) => r.map_err(|e| failure_of(e, &shared)),
            Err(_) => Err(Failure::Timeout),
        };
        let outcome = match result {
            Ok(status) => answered(&job, status, &shared),
            Err(f) => {
                // Whatever state the connection is in, it cannot carry another request.
                let stale = conn.take();
                failed(f, &job, stale, written, &mut reader, &shared)
            }
        };
        shared.counters.in_flight.fetch_sub(1, Relaxed);
        match shared.idle.lock() {
            Ok(mut g) => g.push(id),
            Err(poisoned) => poisoned.into_inner().push(id),
        }
        shared.idle_count.fetch_add(1, Relaxed);
        // After the lane is idle again, so that the modem told finds room for its next one.
        if let Some(done) = &shared.done {
            let _ = done.send(Done {
                vehicle: job.vehicle,
                outcome,
            });
        }
    }
}

/// Why an exchange failed, as counted.
fn failure_of(e: ExchangeError, shared: &Shared) -> Failure {
    match e {
        ExchangeError::Io(e) => {
            tracing::debug!("connection error: {e}");
            Failure::Connect
        }
        ExchangeError::Tls(e) => {
            // Every handshake fails alike (the certificate does not change), so the reason
            // is worth one line, not one per message.
            if !shared.tls_logged.swap(true, Relaxed) {
                let target = shared.tls.as_ref().map_or("", |t| t.base.as_str());
                tracing::error!("TLS handshake with {target} failed: {e} (counted as `tls` failures; --target-ca adds a CA)");
            }
            Failure::Tls
        }
        ExchangeError::Protocol(e) => {
            tracing::debug!("protocol error from the target: {e}");
            Failure::Protocol
        }
    }
}

/// An answer came: a 200 is accepted, anything else failed by its status (a 401 renews the
/// login's token).
fn answered(job: &Job, status: u16, shared: &Shared) -> Outcome {
    let c = &shared.counters;
    c.record_answer(job.created, job.due, job.waited, status);
    if status == 200 {
        c.add(Counter::Accepted, 1);
        return Outcome::Accepted;
    }
    if status == 401 {
        if let Some(login) = &shared.login {
            login.unauthorized(job.auth_gen);
        }
    }
    c.record_status(status);
    c.add(Counter::Failed, 1);
    Outcome::Status(status)
}

/// No answer: counted by cause. A request that timed out after it went out whole is watched
/// for a late answer on its connection.
fn failed(
    f: Failure,
    job: &Job,
    stale: Option<Conn>,
    written: bool,
    reader: &mut Reader,
    shared: &Arc<Shared>,
) -> Outcome {
    let c = &shared.counters;
    c.add(Counter::Failed, 1);
    match f {
        Failure::Timeout => {
            c.add(Counter::Timeouts, 1);
            match stale {
                Some(conn) if written => {
                    watch_late(conn.stream, std::mem::take(reader), job, shared);
                    Outcome::Timeout { written: true }
                }
                _ => {
                    c.add(Counter::TimeoutsUnsent, 1);
                    Outcome::Timeout { written: false }
                }
            }
        }
        Failure::Connect => {
            c.add(Counter::ConnectErrors, 1);
            Outcome::Broken
        }
        Failure::Protocol => {
            c.add(Counter::ProtocolErrors, 1);
            Outcome::Broken
        }
        Failure::Tls => {
            c.add(Counter::TlsErrors, 1);
            Outcome::Broken
        }
    }
}

/// Watches a timed-out request's connection for the answer the backend may still give, up to
/// the late window, and counts a late 200. Only a request written whole is watched: a partial
/// one can never be accepted.
fn watch_late(mut stream: Stream, mut reader: Reader, job: &Job, shared: &Arc<Shared>) {
    if shared.late_window.is_zero() {
        return;
    }
    let Ok(permit) = shared.late_slots.clone().try_acquire_owned() else {
        return;
    };
    let counters = shared.counters.clone();
    let until = tokio::time::Instant::from_std(job.created + shared.timeout + shared.late_window);
    counters.late_pending.fetch_add(1, Relaxed);
    tokio::spawn(async move {
        let answer = tokio::time::timeout_at(until, reader.read(&mut stream)).await;
        if let Ok(Ok(head)) = answer {
            if head.status == 200 {
                counters.add(Counter::LateAccepted, 1);
            }
        }
        counters.late_pending.fetch_sub(1, Relaxed);
        drop(permit);
    });
}

/// Sends the job on the lane's connection (opening one if the old one is gone) and reads the
/// answer. `written` tells the caller, should this be cut short, whether the request went out
/// whole. A request is sent once: after a failure nobody can know whether the server took
/// it, and sending it again could double a message at a backend that does not deduplicate.
async fn exchange(
    conn: &mut Option<Conn>,
    job: &Job,
    reader: &mut Reader,
    written: &mut bool,
    shared: &Shared,
) -> Result<u16, ExchangeError> {
    if conn
        .as_ref()
        .is_some_and(|c| !c.reusable(shared.idle_limit))
    {
        *conn = None;
    }
    let c = match conn {
        Some(c) => c,
        None => conn.insert(Conn {
            stream: connect(shared).await?,
            idle_since: Instant::now(),
        }),
    };
    reader.reset();
    *written = false;
    let sent = match c.stream.write_all(&job.bytes[job.start..]).await {
        Ok(()) => c.stream.flush().await,
        Err(e) => Err(e),
    };
    let answer = match sent {
        Ok(()) => {
            *written = true;
            reader.read(&mut c.stream).await
        }
        // A server may answer and close before it read the whole request (a 413, say); that
        // answer is still in the receive buffer and says what became of the request.
        Err(e) => match reader.read(&mut c.stream).await {
            Ok(mut head) => {
                head.keep_alive = false;
                Ok(head)
            }
            Err(_) => Err(ExchangeError::Io(e)),
        },
    };
    match answer {
        Ok(head) => {
            if head.keep_alive {
                c.idle_since = Instant::now();
            } else {
                *conn = None;
            }
            Ok(head.status)
        }
        Err(e) => {
            *conn = None;
            Err(e)
        }
    }
}

async fn connect(shared: &Shared) -> Result<Stream, ExchangeError> {
    open(&shared.host, shared.port, shared.tls.as_ref()).await
}
