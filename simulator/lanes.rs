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
use crate::engine::Counters;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::rustls::pki_types::ServerName;
use vtox::delivery::Outcome;
use vtox::http1::{find_head_end, head_too_large, parse_head, BodyReader, HttpError, ResponseHead};

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

/// Why an exchange failed.
pub enum ExchangeError {
    Io(io::Error),
    Protocol(HttpError),
    /// The TLS handshake failed (an untrusted certificate, a name that does not match).
    Tls(io::Error),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Io(e) => write!(f, "{e}"),
            ExchangeError::Protocol(e) => write!(f, "{e}"),
            ExchangeError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

impl From<io::Error> for ExchangeError {
    fn from(e: io::Error) -> Self {
        ExchangeError::Io(e)
    }
}

impl From<HttpError> for ExchangeError {
    fn from(e: HttpError) -> Self {
        ExchangeError::Protocol(e)
    }
}

/// A connection to the target, plain or over TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS towards an `https://` target: the shared configuration and the URL's host as the
/// server name (SNI).
#[derive(Clone)]
pub struct TlsTarget {
    pub connector: tokio_rustls::TlsConnector,
    pub name: ServerName<'static>,
    /// The target as given, for the one line that says why its handshakes fail.
    pub base: String,
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
            Ok(Ok(status)) => Ok(status),
            Ok(Err(ExchangeError::Io(e))) => {
                tracing::debug!("connection error: {e}");
                Err(Failure::Connect)
            }
            Ok(Err(ExchangeError::Tls(e))) => {
                // Every handshake fails alike (the certificate does not change), so the
                // reason is worth one line, not one per message.
                if !shared.tls_logged.swap(true, Relaxed) {
                    let target = shared.tls.as_ref().map_or("", |t| t.base.as_str());
                    tracing::error!("TLS handshake with {target} failed: {e} (counted as `tls` failures; --target-ca adds a CA)");
                }
                Err(Failure::Tls)
            }
            Ok(Err(ExchangeError::Protocol(e))) => {
                tracing::debug!("protocol error from the target: {e}");
                Err(Failure::Protocol)
            }
            Err(_) => Err(Failure::Timeout),
        };
        let c = &shared.counters;
        let outcome = match result {
            Ok(status) => {
                c.record_answer(&job, status);
                if status == 200 {
                    c.accepted.fetch_add(1, Relaxed);
                    c.tally(crate::tally::TALLY_ACCEPTED, 1);
                    Outcome::Accepted
                } else {
                    if status == 401 {
                        if let Some(login) = &shared.login {
                            login.unauthorized(job.auth_gen);
                        }
                    }
                    c.record_status(status);
                    c.tally(crate::tally::TALLY_FAILED, 1);
                    Outcome::Status(status)
                }
            }
            Err(f) => {
                // Whatever state the connection is in, it cannot carry another request.
                let stale = conn.take();
                let outcome = match f {
                    Failure::Timeout => {
                        let outcome = match stale {
                            Some(conn) if written => {
                                watch_late(conn.stream, std::mem::take(&mut reader), &job, &shared);
                                Outcome::Timeout { written: true }
                            }
                            _ => {
                                c.tally(crate::tally::TALLY_UNSENT, 1);
                                c.timeout_unsent.fetch_add(1, Relaxed);
                                Outcome::Timeout { written: false }
                            }
                        };
                        c.tally(crate::tally::TALLY_TIMEOUT, 1);
                        c.timeout.fetch_add(1, Relaxed);
                        outcome
                    }
                    Failure::Connect => {
                        c.tally(crate::tally::TALLY_CONNECT, 1);
                        c.connect.fetch_add(1, Relaxed);
                        Outcome::Broken
                    }
                    Failure::Protocol => {
                        c.tally(crate::tally::TALLY_PROTOCOL, 1);
                        c.protocol.fetch_add(1, Relaxed);
                        Outcome::Broken
                    }
                    Failure::Tls => {
                        c.tally(crate::tally::TALLY_TLS, 1);
                        c.tls.fetch_add(1, Relaxed);
                        Outcome::Broken
                    }
                };
                c.tally(crate::tally::TALLY_FAILED, 1);
                outcome
            }
        };
        c.in_flight.fetch_sub(1, Relaxed);
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
                counters.late_accepted.fetch_add(1, Relaxed);
                counters.tally(crate::tally::TALLY_LATE, 1);
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

/// Opens a connection, over TLS when `tls` is given.
pub async fn open(host: &str, port: u16, tls: Option<&TlsTarget>) -> Result<Stream, ExchangeError> {
    let s = TcpStream::connect((host, port)).await?;
    s.set_nodelay(true)?;
    match tls {
        None => Ok(Stream::Plain(s)),
        Some(tls) => match tls.connector.connect(tls.name.clone(), s).await {
            Ok(t) => Ok(Stream::Tls(Box::new(t))),
            // rustls reports a refused certificate or handshake as InvalidData; anything else
            // is the network's.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(ExchangeError::Tls(e)),
            Err(e) => Err(ExchangeError::Io(e)),
        },
    }
}

/// Reads responses: the head is buffered (up to 64 KiB), the body is only followed to its end
/// and thrown away as it arrives, so a huge answer costs no memory. Its state survives a
/// timeout, so that the late watcher continues exactly where the lane stopped.
#[derive(Default)]
struct Reader {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the end of the head.
    scanned: usize,
    /// The final head and its body's progress, once the head is in.
    head: Option<(ResponseHead, BodyReader)>,
}

/// A buffer grown by an unusually large head is given back rather than kept for the lane's life.
const KEEP_CAPACITY: usize = 16 * 1024;

impl Reader {
    fn reset(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(4096);
        }
        self.scanned = 0;
        self.head = None;
    }

    /// Reads until one whole final response has passed, continuing from whatever state the
    /// reader is in.
    async fn read<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<ResponseHead, ExchangeError> {
        loop {
            if self.head.is_none() {
                self.take_head()?;
            }
            if let Some((head, body)) = &mut self.head {
                let used = body.feed(&self.buf)?;
                let extra = self.buf.len() - used;
                self.buf.clear();
                if body.is_done() {
                    let mut head = *head;
                    // Bytes beyond the answer belong to no request of ours: the connection is
                    // out of step and must not carry another one.
                    if extra > 0 {
                        head.keep_alive = false;
                    }
                    self.head = None;
                    return Ok(head);
                }
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return match self.head {
                    Some((head, BodyReader::UntilClose)) => Ok(ResponseHead {
                        keep_alive: false,
                        ..head
                    }),
                    _ => Err(ExchangeError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed mid-response",
                    ))),
                };
            }
        }
    }

    /// Parses the final head out of the buffer if it is complete, skipping interim 1xx
    /// answers (e.g. 100 Continue); leaves the body's first bytes in the buffer.
    fn take_head(&mut self) -> Result<(), HttpError> {
        loop {
            let Some(end) = find_head_end(&self.buf, self.scanned) else {
                self.scanned = self.buf.len();
                return head_too_large(self.buf.len());
            };
            let head = parse_head(&self.buf[..end])?
                .ok_or_else(|| HttpError::Malformed("incomplete head".into()))?;
            self.buf.drain(..head.head_len.min(end));
            self.scanned = 0;
            if !(100..200).contains(&head.status) {
                self.head = Some((head, BodyReader::new(head.framing)));
                return Ok(());
            }
        }
    }
}
