//! Integration tests of `vtox-sim`: the real binary against the real `vtox-sink` on loopback.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use vtox::counters::SimReport;
use vtox::fleet::vehicle_id;

/// Forwards the simulator's metric lines to a channel as they arrive.
fn lines(p: &mut Proc) -> mpsc::Receiver<SimReport> {
    let out = p.child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let report = SimReport::parse_line(&line)
                .unwrap_or_else(|e| panic!("bad metric line {line:?}: {e}"));
            if tx.send(report).is_err() {
                break;
            }
        }
    });
    rx
}

fn final_report(rx: &mpsc::Receiver<SimReport>, deadline: Duration) -> SimReport {
    let end = std::time::Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) if r.is_final => return r,
            Ok(_) => continue,
            Err(e) => panic!("no final metric line: {e}"),
        }
    }
}

#[test]
fn a_slice_reaches_the_sink_exactly() {
    let (_sink, addr) = sink(&[]);
    let target = format!("http://{addr}");
    let mut sim = Proc::spawn_piped(
        "vtox-sim",
        &[
            "--vehicles",
            "30",
            "--first-vehicle",
            "100",
            "--target",
            &target,
            "--interval",
            "0.5s",
            "--duration",
            "3s",
            "--agent",
            "test-host",
            "--instance",
            "4",
            "--faults",
            "bearing=20,insulation=20",
        ],
    );
    let rx = lines(&mut sim);
    let report = final_report(&rx, Duration::from_secs(20));
    let status = sim
        .wait_timeout(Duration::from_secs(10))
        .expect("the simulator exits after --duration");
    assert!(status.success());
    assert!(
        report.sent >= 30 * 5,
        "every vehicle sent several messages: {report:?}"
    );
    assert_eq!(report.accepted, report.sent);
    assert_eq!((report.failed, report.dropped, report.in_flight), (0, 0, 0));
    assert_eq!(
        (report.agent.as_str(), report.instance, report.first_vehicle),
        ("test-host", 4, 100)
    );
    assert_eq!(report.latency().unwrap().count(), report.accepted);

    let stats = get_json(&addr, "/stats").expect("sink stats");
    assert_eq!(stats["accepted"], report.accepted);
    assert_eq!(stats["rejected"], 0);
    assert_eq!(stats["duplicates"], 0);
    assert_eq!(stats["conflicts"], 0);
    assert_eq!(stats["bytes"], report.bytes);
    let per_vehicle = get_json(&addr, "/stats/vehicles").expect("per-vehicle stats");
    let seen: BTreeSet<String> = vehicle_ids(&per_vehicle);
    let want: BTreeSet<String> = (100..130).map(vehicle_id).collect();
    assert_eq!(seen, want);
}

/// Accepts either an object keyed by vehicle ID or a list of objects with `vehicle_id`.
fn vehicle_ids(v: &serde_json::Value) -> BTreeSet<String> {
    if let Some(obj) = v.as_object() {
        if let Some(list) = obj.get("vehicles").and_then(|l| l.as_array()) {
            return list
                .iter()
                .filter_map(|e| e["vehicle_id"].as_str().map(String::from))
                .collect();
        }
        return obj.keys().cloned().collect();
    }
    v.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|e| e["vehicle_id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_slow_target_bounds_memory_and_counts_dropped_ticks() {
    // The sink holds every answer for 2 s; 2000 vehicles at 0.2 s offer 10,000 msg/s against
    // a cap of 50 requests in flight, so almost every tick must be dropped, not queued.
    let (_sink, addr) = sink(&["--delay", "2s"]);
    let target = format!("http://{addr}");
    let mut sim = Proc::spawn_piped(
        "vtox-sim",
        &[
            "--vehicles",
            "2000",
            "--target",
            &target,
            "--interval",
            "0.2s",
            // The open model: a tick that finds every connection busy is dropped.
            "--delivery",
            "at-most-once",
            "--max-in-flight",
            "50",
            "--timeout",
            "10s",
            "--duration",
            "8s",
            "--report-every",
            "0.5s",
        ],
    );
    let pid = sim.pid();
    let rx = lines(&mut sim);
    let mut samples = Vec::new();
    while let Ok(r) = rx.recv_timeout(Duration::from_secs(20)) {
        if r.is_final {
            samples.push((r, 0));
            break;
        }
        samples.push((r, rss_kib(pid)));
    }
    let (last, _) = samples.last().expect("metric lines").clone();
    assert!(last.is_final, "the run ends with a final line");
    let periodic: Vec<_> = samples.iter().filter(|(r, _)| !r.is_final).collect();
    assert!(
        periodic.len() >= 10,
        "lines every 0.5 s: {}",
        periodic.len()
    );
    // Dropped ticks rise steadily while in-flight stays at the cap.
    let early = &periodic[3].0;
    let late = &periodic[periodic.len() - 2].0;
    assert!(
        late.dropped > early.dropped + 10_000,
        "dropped {} -> {}",
        early.dropped,
        late.dropped
    );
    assert!(periodic.iter().all(|(r, _)| r.in_flight <= 50));
    // Memory stays flat: what is held is bounded by the in-flight cap, not by the backlog.
    let rss_early = periodic[3].1;
    let rss_late = periodic[periodic.len() - 2].1;
    assert!(rss_late < 100 * 1024, "RSS {rss_late} KiB");
    assert!(
        rss_late < rss_early + 16 * 1024,
        "RSS grew from {rss_early} to {rss_late} KiB"
    );
    assert_eq!(
        last.sent,
        last.accepted + last.failed,
        "in-flight requests were waited for"
    );
}

#[test]
fn sigterm_stops_gracefully_with_a_final_line() {
    let (_sink, addr) = sink(&[]);
    let target = format!("http://{addr}");
    let mut sim = Proc::spawn_piped(
        "vtox-sim",
        &[
            "--vehicles",
            "20",
            "--target",
            &target,
            "--interval",
            "0.2s",
        ],
    );
    let rx = lines(&mut sim);
    wait_for("messages accepted", Duration::from_secs(10), || {
        rx.recv_timeout(Duration::from_secs(1))
            .ok()
            .filter(|r| r.accepted > 20)
    });
    sim.signal(15);
    let report = final_report(&rx, Duration::from_secs(10));
    let status = sim
        .wait_timeout(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert_eq!(report.sent, report.accepted);
    assert_eq!(report.active_vehicles, 0);
}

/// Runs 10 vehicles for 2 s against a sink that answers every request after 1.5 s, with a
/// 1 s timeout; returns the simulator's final line and the sink's accepted count.
fn against_a_stalled_sink(late_window: &str) -> (SimReport, u64) {
    let (_sink, addr) = sink(&["--delay", "1.5s"]);
    let target = format!("http://{addr}");
    let mut sim = Proc::spawn_piped(
        "vtox-sim",
        &[
            "--vehicles",
            "10",
            "--target",
            &target,
            "--interval",
            "0.25s",
            "--timeout",
            "1s",
            "--late-window",
            late_window,
            // Each message is sent once: what the sink took is known from late answers alone.
            "--delivery",
            "at-most-once",
            "--duration",
            "2s",
        ],
    );
    let rx = lines(&mut sim);
    let report = final_report(&rx, Duration::from_secs(20));
    let accepted = get_json(&addr, "/stats").expect("sink stats")["accepted"]
        .as_u64()
        .expect("accepted");
    (report, accepted)
}

#[test]
fn late_answers_are_counted_so_the_sink_total_is_known() {
    // Every request times out, yet the sink takes each one half a second later: the
    // simulator watches the connection and learns exactly which it took.
    let (r, sink_accepted) = against_a_stalled_sink("30s");
    assert!(r.sent >= 40, "{r:?}");
    assert_eq!(r.accepted, 0);
    assert_eq!(r.failures.timeout, r.sent, "each request timed out: {r:?}");
    assert_eq!(r.late_accepted, r.sent, "each was answered late: {r:?}");
    assert_eq!(sink_accepted, r.late_accepted);

    // Without the watch the connection closes at the timeout and the sink drops the request
    // it was still holding: nothing is taken, nothing is counted as taken.
    let (r, sink_accepted) = against_a_stalled_sink("0s");
    assert_eq!(r.failures.timeout, r.sent);
    assert_eq!((r.late_accepted, sink_accepted), (0, 0), "{r:?}");
}

#[test]
fn timeouts_that_never_went_out_are_told_apart() {
    // A listener that never accepts: the kernel completes handshakes until its accept queue
    // is full and takes the requests written to those; later connections hang in SYN_SENT.
    // Both time out, but only the first kind can ever have been taken.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = format!("http://{}", listener.local_addr().expect("addr"));
    let mut sim = Proc::spawn_piped(
        "vtox-sim",
        &[
            "--vehicles",
            "400",
            "--target",
            &target,
            "--interval",
            "0.5s",
            "--timeout",
            "1s",
            "--late-window",
            "0s",
            "--duration",
            "1.5s",
        ],
    );
    let rx = lines(&mut sim);
    let r = final_report(&rx, Duration::from_secs(20));
    drop(listener);
    assert_eq!(r.failures.timeout, r.sent, "{r:?}");
    let unsent = r.failures.timeout_unsent;
    assert!(unsent > 0 && unsent < r.failures.timeout, "{r:?}");
}

#[test]
fn an_unreachable_target_counts_connection_failures() {
    let target = format!("http://127.0.0.1:{}", free_port());
    let mut sim = Proc::spawn_piped(
        "vtox-sim",
        &[
            "--vehicles",
            "5",
            "--target",
            &target,
            "--interval",
            "0.2s",
            "--duration",
            "1.5s",
        ],
    );
    let rx = lines(&mut sim);
    let report = final_report(&rx, Duration::from_secs(15));
    assert!(report.sent > 0);
    assert_eq!(report.accepted, 0);
    assert_eq!(report.failures.connect, report.sent);
    assert_eq!(report.failed, report.sent);
}

#[test]
fn bad_input_gets_one_line_and_exit_code_2() {
    let cases: &[&[&str]] = &[
        &["--vehicles", "0", "--target", "http://127.0.0.1:9"],
        &["--vehicles", "5", "--target", "not a url"],
        &["--vehicles", "5", "--target", "ftp://127.0.0.1:9"],
        &[
            "--vehicles",
            "5",
            "--target",
            "http://127.0.0.1:9",
            "--interval",
            "0s",
        ],
        &[
            "--vehicles",
            "5",
            "--target",
            "http://127.0.0.1:9",
            "--interval=-1s",
        ],
        &[
            "--vehicles",
            "5",
            "--target",
            "http://127.0.0.1:9",
            "--faults",
            "rust=5",
        ],
        &[
            "--vehicles",
            "5",
            "--target",
            "http://127.0.0.1:9",
            "--faults",
            "bearing=60,insulation=50",
        ],
        &["--vehicles", "abc", "--target", "http://127.0.0.1:9"],
    ];
    for args in cases {
        let out = Command::new(bin("vtox-sim"))
            .args(*args)
            .stdin(Stdio::null())
            .output()
            .expect("run vtox-sim");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed metrics");
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with("error:"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
