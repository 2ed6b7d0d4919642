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

use crate::engine::Counters;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use vtox::http1::{chunked_end, parse_head, Framing, ResponseHead};

/// A request ready to go: `bytes[start..]` is the whole HTTP request.
pub struct Job {
    pub bytes: Vec<u8>,
    pub start: usize,
    /// When the tick fired: latency and the timeout count from here, so time spent waiting
    /// for a lane is never hidden from the numbers.
    pub created: Instant,
}

struct Shared {
    host: String,
    port: u16,
    timeout: Duration,
    counters: Arc<Counters>,
    idle: Mutex<Vec<usize>>,
    late_window: Duration,
    /// Bounds the connections watched for late answers; beyond it a timed-out connection is
    /// closed as before and its outcome stays unknown.
    late_slots: Arc<Semaphore>,
}

pub struct Lanes {
    senders: Vec<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    max: usize,
}

impl Lanes {
    pub fn new(
        host: String,
        port: u16,
        timeout: Duration,
        late_window: Duration,
        max: usize,
        counters: Arc<Counters>,
    ) -> Self {
        let shared = Arc::new(Shared {
            host,
            port,
            timeout,
            counters,
            idle: Mutex::new(Vec::new()),
            late_window,
            late_slots: Arc::new(Semaphore::new(max)),
        });
        Lanes {
            senders: Vec::new(),
            shared,
            max,
        }
    }

    fn pop_idle(&self) -> Option<usize> {
        match self.shared.idle.lock() {
            Ok(mut g) => g.pop(),
            Err(poisoned) => poisoned.into_inner().pop(),
        }
    }

    /// Whether a job could be dispatched now (checked before a message is built).
    pub fn has_room(&self) -> bool {
        self.senders.len() < self.max
            || match self.shared.idle.lock() {
                Ok(g) => !g.is_empty(),
                Err(poisoned) => !poisoned.into_inner().is_empty(),
            }
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
}

async fn run_lane(id: usize, mut rx: mpsc::Receiver<Job>, shared: Arc<Shared>) {
    let mut conn: Option<TcpStream> = None;
    let mut rbuf: Vec<u8> = Vec::with_capacity(4096);
    while let Some(job) = rx.recv().await {
        let deadline = tokio::time::Instant::from_std(job.created + shared.timeout);
        let mut written = false;
        let result = match tokio::time::timeout_at(
            deadline,
            exchange(&mut conn, &job, &mut rbuf, &mut written, &shared),
        )
        .await
        {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(_)) => Err(Failure::Connect),
            Err(_) => Err(Failure::Timeout),
        };
        let c = &shared.counters;
        match result {
            Ok(status) => {
                c.record_latency(job.created.elapsed().as_micros() as u64);
                if status == 200 {
                    c.accepted.fetch_add(1, Relaxed);
                    c.tally(crate::tally::TALLY_ACCEPTED, 1);
                } else {
                    c.record_status(status);
                    c.tally(crate::tally::TALLY_FAILED, 1);
                }
            }
            Err(f) => {
                // Whatever state the connection is in, it cannot carry another request.
                let stale = conn.take();
                match f {
                    Failure::Timeout => {
                        match stale {
                            Some(stream) if written => {
                                watch_late(stream, std::mem::take(&mut rbuf), &job, &shared)
                            }
                            _ => {
                                c.tally(crate::tally::TALLY_UNSENT, 1);
                                c.timeout_unsent.fetch_add(1, Relaxed);
                            }
                        }
                        c.tally(crate::tally::TALLY_TIMEOUT, 1);
                        c.timeout.fetch_add(1, Relaxed)
                    }
                    Failure::Connect => {
                        c.tally(crate::tally::TALLY_CONNECT, 1);
                        c.connect.fetch_add(1, Relaxed)
                    }
                };
                c.tally(crate::tally::TALLY_FAILED, 1);
            }
        }
        c.in_flight.fetch_sub(1, Relaxed);
        match shared.idle.lock() {
            Ok(mut g) => g.push(id),
            Err(poisoned) => poisoned.into_inner().push(id),
        }
    }
}

/// Watches a timed-out request's connection for the answer the backend may still give, up to
/// the late window, and counts a late 200. Only a request written whole is watched: a partial
/// one can never be accepted.
fn watch_late(mut stream: TcpStream, mut rbuf: Vec<u8>, job: &Job, shared: &Arc<Shared>) {
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
        let answer = tokio::time::timeout_at(until, read_response(&mut stream, &mut rbuf)).await;
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

/// Sends the job on the lane's connection (opening one if needed) and reads the answer.
/// `written` tells the caller, should this be cut short, whether the request went out whole.
async fn exchange(
    conn: &mut Option<TcpStream>,
    job: &Job,
    rbuf: &mut Vec<u8>,
    written: &mut bool,
    shared: &Shared,
) -> io::Result<u16> {
    for _ in 0..2 {
        let reused = conn.is_some();
        let stream = match conn {
            Some(s) => s,
            None => {
                let s = TcpStream::connect((shared.host.as_str(), shared.port)).await?;
                s.set_nodelay(true)?;
                conn.insert(s)
            }
        };
        rbuf.clear();
        *written = false;
        match roundtrip(stream, &job.bytes[job.start..], rbuf, written).await {
            Ok(head) => {
                if !head.keep_alive {
                    *conn = None;
                }
                return Ok(head.status);
            }
            // A kept-alive connection the server closed while it was idle fails before any
            // answer arrives; the request is sent again once on a new connection, as any HTTP
            // client does.
            Err(_) if reused && rbuf.is_empty() => *conn = None,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed twice",
    ))
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

async fn roundtrip(
    stream: &mut TcpStream,
    request: &[u8],
    rbuf: &mut Vec<u8>,
    written: &mut bool,
) -> io::Result<ResponseHead> {
    stream.write_all(request).await?;
    *written = true;
    read_response(stream, rbuf).await
}

/// Reads one whole response, continuing from whatever `rbuf` already holds.
async fn read_response(stream: &mut TcpStream, rbuf: &mut Vec<u8>) -> io::Result<ResponseHead> {
    let mut head: Option<ResponseHead> = None;
    loop {
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(4096);
        }
        let n = stream.read_buf(rbuf).await?;
        if head.is_none() {
            head = parse_head(rbuf).map_err(invalid)?;
            // Skip interim 1xx answers (e.g. 100 Continue) and wait for the final one.
            while let Some(h) = head.filter(|h| (100..200).contains(&h.status)) {
                rbuf.drain(..h.head_len);
                head = parse_head(rbuf).map_err(invalid)?;
            }
        }
        if let Some(h) = head {
            let body = &rbuf[h.head_len..];
            let complete = match h.framing {
                Framing::Length(len) => body.len() >= len,
                Framing::Chunked => chunked_end(body).map_err(invalid)?.is_some(),
                Framing::UntilClose => n == 0,
            };
            if complete {
                return Ok(h);
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
    }
}
