//! `vtox-sim`'s HTTP/1.1 client against misbehaving servers written here: each case must end
//! with exact counts (accepted only for a real 200), bounded memory and no hang.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vtox::counters::SimReport;

/// What a test server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    /// Requests read whole (head and body).
    requests: AtomicU64,
}

/// One accepted connection's handler; it returns when it is done with the connection.
type Handler = dyn Fn(TcpStream, &Seen) + Send + Sync;

/// A server on a free loopback port running `handler` on a thread per connection.
fn serve(handler: impl Fn(TcpStream, &Seen) + Send + Sync + 'static) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(Seen::default());
    let handler: Arc<Handler> = Arc::new(handler);
    let s = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            s.connections.fetch_add(1, SeqCst);
            let (h, s) = (handler.clone(), s.clone());
            std::thread::spawn(move || h(stream, &s));
        }
    });
    (addr, seen)
}

/// Reads a request head; None at end of file (or a broken connection).
fn read_head(r: &mut BufReader<TcpStream>) -> Option<usize> {
    let mut length = 0;
    let mut first = true;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if first {
            assert!(line.starts_with("POST /api/v1/"), "request line {line:?}");
            first = false;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().expect("content-length");
        }
        if line == "\r\n" {
            return Some(length);
        }
    }
}

fn read_body(r: &mut BufReader<TcpStream>, len: usize, seen: &Seen) -> Option<()> {
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    assert!(body.starts_with(b"{\"sensor_data\""));
    seen.requests.fetch_add(1, SeqCst);
    Some(())
}

/// Reads one whole request; None at end of file.
fn read_request(r: &mut BufReader<TcpStream>, seen: &Seen) -> Option<()> {
    let len = read_head(r)?;
    read_body(r, len, seen)
}

/// Serves every request on a connection with `answer(request number)` until the client closes.
fn keep_alive(answer: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static) -> (String, Arc<Seen>) {
    serve(move |stream, seen| {
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        while read_request(&mut r, seen).is_some() {
            let n = seen.requests.load(SeqCst);
            if w.write_all(&answer(n)).is_err() {
                return;
            }
        }
    })
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// Runs the simulator against `addr` and returns its final metric line.
fn run_sim(addr: &str, extra: &[&str]) -> SimReport {
    let target = format!("http://{addr}");
    let mut args: Vec<&str> = vec!["--target", &target];
    let defaults = [
        ("--vehicles", "4"),
        ("--interval", "0.25s"),
        ("--duration", "1.5s"),
        ("--timeout", "2s"),
        ("--late-window", "0s"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let mut sim = Proc::spawn_piped("vtox-sim", &args);
    let report = final_line(&mut sim, Duration::from_secs(30));
    let status = sim.wait_timeout(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "vtox-sim exit: {status:?}");
    report
}

fn final_line(sim: &mut Proc, deadline: Duration) -> SimReport {
    let out = sim.child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let r = SimReport::parse_line(&line).expect("metric line parses");
            if r.is_final {
                let _ = tx.send(r);
                return;
            }
        }
    });
    rx.recv_timeout(deadline)
        .expect("a final metric line in time")
}

/// Every message sent was taken by the server exactly once and counted accepted.
fn assert_all_accepted(r: &SimReport, seen: &Seen) {
    assert!(r.sent >= 8, "a few messages went out: {r:?}");
    assert_eq!((r.accepted, r.failed, r.dropped), (r.sent, 0, 0), "{r:?}");
    assert_eq!(seen.requests.load(SeqCst), r.sent, "each sent once: {r:?}");
}

#[test]
fn chunked_answers_are_framed_and_the_connection_reused() {
    let (addr, seen) = keep_alive(|_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          4;x=y\r\n{\"ok\r\n5\r\n\":1}\n\r\n0\r\nX-Trailer: 1\r\n\r\n"
            .to_vec()
    });
    let r = run_sim(&addr, &["--vehicles", "1", "--interval", "0.1s"]);
    assert_all_accepted(&r, &seen);
    assert_eq!(
        seen.connections.load(SeqCst),
        1,
        "one kept-alive connection"
    );
}

#[test]
fn connection_close_after_every_answer() {
    let (addr, seen) = serve(|stream, seen| {
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        if read_request(&mut r, seen).is_some() {
            let _ =
                w.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let r = run_sim(&addr, &[]);
    assert_all_accepted(&r, &seen);
    assert_eq!(
        seen.connections.load(SeqCst),
        r.sent,
        "a new connection each time"
    );
}

#[test]
fn http10_answers_end_at_close() {
    let (addr, seen) = serve(|stream, seen| {
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        if read_request(&mut r, seen).is_some() {
            let _ = w.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n");
            let _ = w.write_all(&[b'x'; 20_000]);
        }
    });
    let r = run_sim(&addr, &[]);
    assert_all_accepted(&r, &seen);
    assert_eq!(seen.connections.load(SeqCst), r.sent);
}

#[test]
fn interim_100_continue_is_skipped() {
    let (addr, seen) = serve(|stream, seen| {
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        while let Some(len) = read_head(&mut r) {
            if w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                return;
            }
            if read_body(&mut r, len, seen).is_none() || w.write_all(OK).is_err() {
                return;
            }
        }
    });
    let r = run_sim(&addr, &["--vehicles", "1", "--interval", "0.1s"]);
    assert_all_accepted(&r, &seen);
    assert_eq!(seen.connections.load(SeqCst), 1);
}

#[test]
fn no_content_and_not_modified_are_failures_without_a_body() {
    // 1 in 3 answers is a 200; the others have no body by definition, and a client waiting for
    // one would time out instead of counting them.
    let (addr, seen) = keep_alive(|n| match n % 3 {
        0 => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        1 => OK.to_vec(),
        _ => b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n".to_vec(),
    });
    let r = run_sim(&addr, &["--vehicles", "1", "--interval", "0.1s"]);
    let n = seen.requests.load(SeqCst);
    assert_eq!(n, r.sent);
    assert!(n >= 8, "{r:?}");
    let oks = (1..=n).filter(|i| i % 3 == 1).count() as u64;
    assert_eq!(r.accepted, oks, "{r:?}");
    assert_eq!(
        r.failures.status.get(&204).copied(),
        Some((1..=n).filter(|i| i % 3 == 0).count() as u64)
    );
    assert_eq!(
        r.failures.status.get(&304).copied(),
        Some((1..=n).filter(|i| i % 3 == 2).count() as u64)
    );
    assert_eq!((r.failures.timeout, r.failures.connect), (0, 0));
    assert_eq!(seen.connections.load(SeqCst), 1);
}

#[test]
fn redirects_are_failures_and_never_followed() {
    let (addr, seen) = keep_alive(|n| {
        let code = if n % 2 == 0 {
            "302 Found"
        } else {
            "307 Temporary Redirect"
        };
        format!("HTTP/1.1 {code}\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n").into_bytes()
    });
    let r = run_sim(&addr, &[]);
    let n = seen.requests.load(SeqCst);
    assert_eq!(
        n, r.sent,
        "no request beyond the messages: nothing followed"
    );
    assert_eq!(r.accepted, 0);
    assert_eq!(r.failed, r.sent);
    let redirects = r.failures.status.get(&302).copied().unwrap_or(0)
        + r.failures.status.get(&307).copied().unwrap_or(0);
    assert_eq!(redirects, r.sent, "{r:?}");
}

#[test]
fn an_answer_before_the_body_was_read() {
    // The server answers as soon as it has the head, then reads the body.
    let (addr, seen) = serve(|stream, seen| {
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        while let Some(len) = read_head(&mut r) {
            if w.write_all(OK).is_err() || read_body(&mut r, len, seen).is_none() {
                return;
            }
        }
    });
    let r = run_sim(&addr, &[]);
    assert_all_accepted(&r, &seen);
    // And one that refuses the body outright: answers 413, stops reading, closes.
    let (addr, seen) = serve(|stream, seen| {
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        if read_head(&mut r).is_some() {
            seen.requests.fetch_add(1, SeqCst);
            let _ = w.write_all(
                b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            );
            let _ = w.shutdown(std::net::Shutdown::Write);
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        }
    });
    let r = run_sim(&addr, &[]);
    assert_eq!(seen.requests.load(SeqCst), r.sent);
    assert_eq!(r.failures.status.get(&413).copied(), Some(r.sent), "{r:?}");
    assert_eq!(r.accepted, 0);
}

fn trickle(stream: TcpStream, seen: &Seen, pause: Duration) {
    let mut w = stream.try_clone().expect("clone");
    let mut r = BufReader::new(stream);
    while read_request(&mut r, seen).is_some() {
        for b in OK {
            std::thread::sleep(pause);
            if w.write_all(&[*b]).is_err() {
                return;
            }
        }
    }
}

#[test]
fn a_trickled_answer_within_the_timeout_is_accepted() {
    // 40 bytes at 10 ms each: 0.4 s of a 2 s timeout.
    let (addr, seen) = serve(|s, seen| trickle(s, seen, Duration::from_millis(10)));
    let r = run_sim(
        &addr,
        &["--interval", "1s", "--vehicles", "8", "--duration", "2s"],
    );
    assert_all_accepted(&r, &seen);
}

#[test]
fn a_trickled_answer_beyond_the_timeout_times_out() {
    let (addr, seen) = serve(|s, seen| trickle(s, seen, Duration::from_millis(20)));
    let r = run_sim(
        &addr,
        &[
            "--interval",
            "1s",
            "--vehicles",
            "4",
            "--duration",
            "1.5s",
            "--timeout",
            "300ms",
        ],
    );
    assert!(r.sent >= 4, "{r:?}");
    assert_eq!(r.accepted, 0, "{r:?}");
    assert_eq!((r.failed, r.failures.timeout), (r.sent, r.sent), "{r:?}");
    assert_eq!(r.failures.timeout_unsent, 0, "each went out whole");
    assert_eq!(seen.requests.load(SeqCst), r.sent);
}

/// Peak resident memory of a process in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn ten_megabyte_answers_are_discarded_in_bounded_memory() {
    const BODY: usize = 10 * 1024 * 1024;
    let (addr, seen) = serve(|stream, seen| {
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        let block = vec![b'z'; 64 * 1024];
        let mut i = 0u64;
        while read_request(&mut r, seen).is_some() {
            i += 1;
            // Two small answers first, for the simulator's own footprint; then 10 MB ones,
            // alternately framed by length and chunked.
            let ok = if i <= 2 {
                w.write_all(OK)
            } else if i % 2 == 1 {
                w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").as_bytes())
                    .and_then(|_| (0..BODY / block.len()).try_for_each(|_| w.write_all(&block)))
            } else {
                w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .and_then(|_| {
                        (0..BODY / block.len()).try_for_each(|_| {
                            w.write_all(format!("{:x}\r\n", block.len()).as_bytes())?;
                            w.write_all(&block)?;
                            w.write_all(b"\r\n")
                        })
                    })
                    .and_then(|_| w.write_all(b"0\r\n\r\n"))
            };
            if ok.is_err() {
                return;
            }
        }
    });
    let target = format!("http://{addr}");
    let mut sim = Proc::spawn_piped(
        "vtox-sim",
        &[
            "--vehicles",
            "1",
            "--target",
            &target,
            "--interval",
            "0.2s",
            "--timeout",
            "10s",
        ],
    );
    wait_for("two small answers", Duration::from_secs(30), || {
        (seen.requests.load(SeqCst) >= 3).then_some(())
    });
    let before = peak_rss_kib(sim.pid());
    wait_for("four 10 MB answers served", Duration::from_secs(30), || {
        (seen.requests.load(SeqCst) >= 7).then_some(())
    });
    let peak = peak_rss_kib(sim.pid());
    sim.signal(15);
    let r = final_line(&mut sim, Duration::from_secs(20));
    assert!(r.accepted >= 6, "{r:?}");
    assert_eq!(r.accepted + r.failed, r.sent, "{r:?}");
    assert_eq!(r.failed, 0, "{r:?}");
    // Holding one answer would take 10 MiB; discarding as it arrives takes a read buffer.
    assert!(
        peak < before + 3 * 1024,
        "peak RSS {peak} KiB (at start {before} KiB) after 10 MB answers"
    );
}

#[test]
fn a_head_over_64_kib_is_a_protocol_error() {
    let (addr, seen) = keep_alive(|_| {
        let mut a = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        a.extend(std::iter::repeat_n(b'a', 70 * 1024));
        a.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
        a
    });
    let r = run_sim(&addr, &[]);
    assert!(r.sent >= 8, "{r:?}");
    assert_eq!(r.accepted, 0, "an answer that breaks HTTP is no 200: {r:?}");
    assert_eq!((r.failed, r.failures.protocol), (r.sent, r.sent), "{r:?}");
    assert_eq!(seen.requests.load(SeqCst), r.sent);
}

#[test]
fn a_reset_right_after_the_request_is_a_connection_failure_not_replayed() {
    let (addr, seen) = serve(|stream, seen| {
        let mut r = BufReader::new(stream.try_clone().expect("clone"));
        if read_request(&mut r, seen).is_some() {
            reset(&stream);
        }
    });
    let r = run_sim(&addr, &[]);
    assert!(r.sent >= 8, "{r:?}");
    assert_eq!(r.accepted, 0);
    assert_eq!((r.failed, r.failures.connect), (r.sent, r.sent), "{r:?}");
    assert_eq!(seen.requests.load(SeqCst), r.sent, "never sent twice");
}

/// Closes with a TCP reset (linger 0) instead of a normal close.
fn reset(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Keeps connections alive but closes one idle for `idle` (as uvicorn does after 5 s).
fn closes_idle(idle: Duration) -> (String, Arc<Seen>) {
    serve(move |stream, seen| {
        let mut w = stream.try_clone().expect("clone");
        stream.set_read_timeout(Some(idle)).expect("read timeout");
        let mut r = BufReader::new(stream);
        while read_request(&mut r, seen).is_some() {
            if w.write_all(OK).is_err() {
                return;
            }
        }
        // Idle past the limit (or closed by the client): close our side.
    })
}

#[test]
fn a_connection_the_server_closed_while_idle_is_not_reused() {
    // Closed after 300 ms idle; the vehicle sends every 0.7 s, so every reuse would find it
    // closed. The client's own idle limit is set far beyond, so the peek must find the close.
    let (addr, seen) = closes_idle(Duration::from_millis(300));
    let started = Instant::now();
    let r = run_sim(
        &addr,
        &[
            "--vehicles",
            "1",
            "--interval",
            "0.7s",
            "--jitter",
            "0",
            "--duration",
            "3s",
            "--idle-timeout",
            "60s",
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(r.sent >= 4, "{r:?}");
    assert_eq!((r.accepted, r.failed), (r.sent, 0), "{r:?}");
    assert_eq!(seen.requests.load(SeqCst), r.sent, "nothing replayed");
    assert_eq!(
        seen.connections.load(SeqCst),
        r.sent,
        "a new connection each time"
    );
}

#[test]
fn a_connection_idle_past_the_client_limit_is_replaced() {
    let (addr, seen) = closes_idle(Duration::from_secs(60));
    let r = run_sim(
        &addr,
        &[
            "--vehicles",
            "1",
            "--interval",
            "0.5s",
            "--jitter",
            "0",
            "--duration",
            "2.2s",
            "--idle-timeout",
            "200ms",
        ],
    );
    assert!(r.sent >= 4, "{r:?}");
    assert_eq!((r.accepted, r.failed), (r.sent, 0), "{r:?}");
    assert_eq!(seen.connections.load(SeqCst), r.sent);
}
