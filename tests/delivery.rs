//! Integration tests of how vehicles deliver: store-and-forward against a sink that is down for
//! a while, full buffers, coverage dropouts, and the delay histogram that shows the wait; the
//! same through a coordinator and an agent.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::time::Duration;
use vtox::counters::SimReport;
use vtox::metrics::Latency;

/// Runs the simulator to its end and returns every metric line, the final one last.
fn run_sim(args: &[&str], deadline: Duration) -> Vec<SimReport> {
    let mut sim = Proc::spawn_piped("vtox-sim", args);
    let out = sim.child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let r = SimReport::parse_line(&line).expect("metric line parses");
            let last = r.is_final;
            if tx.send(r).is_err() || last {
                return;
            }
        }
    });
    let end = std::time::Instant::now() + deadline;
    let mut lines = Vec::new();
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => {
                let last = r.is_final;
                lines.push(r);
                if last {
                    break;
                }
            }
            Err(e) => panic!("no final metric line: {e}"),
        }
    }
    let status = sim.wait_timeout(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "vtox-sim exit: {status:?}");
    lines
}

fn stat(stats: &serde_json::Value, field: &str) -> u64 {
    stats[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {stats}"))
}

/// Each vehicle's seqs at the sink run from 0 without a gap.
fn assert_gap_free_from_zero(addr: &str) {
    let list = get_json(addr, "/stats/vehicles").expect("per-vehicle stats");
    for v in list.as_array().expect("a list") {
        let (count, max) = (stat(v, "count"), stat(v, "max_seq"));
        assert_eq!(count, max + 1, "seqs 0..={max} once each: {v}");
    }
}

/// A sink down for the first 6 s, 40 vehicles every 0.5 s for 18 s, store-and-forward.
fn through_an_outage(buffer: &str) -> (SimReport, serde_json::Value, String, Proc) {
    let (sink, addr) = sink(&["--outage", "6s"]);
    let target = format!("http://{addr}");
    let lines = run_sim(
        &[
            "--vehicles",
            "40",
            "--target",
            &target,
            "--interval",
            "0.5s",
            "--duration",
            "18s",
            "--delivery",
            "store-and-forward",
            "--buffer",
            buffer,
            "--report-every",
            "1s",
        ],
        Duration::from_secs(60),
    );
    let last = lines.last().cloned().expect("a final line");
    let stats = get_json(&addr, "/stats").expect("sink stats");
    (last, stats, addr, sink)
}

#[test]
fn store_and_forward_delivers_everything_in_order_after_an_outage() {
    let (r, stats, addr, _sink) = through_an_outage("600");
    // The outage was real: every vehicle's first tries were refused and retried.
    assert!(stat(&stats, "unavailable") >= 40, "{stats}");
    assert!(r.retried >= 40, "{r:?}");
    // Nothing lost, nothing doubled, nothing out of order.
    assert_eq!(stat(&stats, "gaps"), 0, "{stats}");
    assert_eq!(stat(&stats, "out_of_order"), 0, "{stats}");
    assert_eq!(stat(&stats, "duplicates"), 0, "{stats}");
    assert_gap_free_from_zero(&addr);
    assert_eq!(stat(&stats, "accepted"), r.accepted);
    // Every message made was accepted but those made in the last moments.
    assert_eq!(r.buffer_dropped, 0);
    assert_eq!(r.discarded, 0);
    assert_eq!(r.produced, r.accepted + r.buffered, "{r:?}");
    assert!(r.buffered <= 40, "at most the last interval is left: {r:?}");
    // The outage shows in what waited, not in the service time.
    assert!(r.delivered_late >= 40 * 6, "{r:?}");
    let age = Latency::decode(&r.late_age).expect("late_age");
    assert_eq!(age.count(), r.delivered_late);
    assert!(
        age.max_ms() > 5_000.0,
        "oldest delivered {} ms",
        age.max_ms()
    );
    let delay = Latency::decode(&r.delay).expect("delay");
    let latency = Latency::decode(&r.latency).expect("latency");
    assert!(
        delay.quantile_ms(0.95) > 1_000.0 && latency.quantile_ms(0.95) < 500.0,
        "delay p95 {} ms, service time p95 {} ms",
        delay.quantile_ms(0.95),
        latency.quantile_ms(0.95)
    );
    assert_eq!((r.in_flight, r.offline), (0, 0));
}

#[test]
fn a_small_buffer_drops_its_oldest_and_says_exactly_how_many() {
    let (r, stats, _addr, _sink) = through_an_outage("3");
    assert!(r.buffer_dropped > 0, "{r:?}");
    // What the buffers dropped are exactly the sink's gaps: no message lost unaccounted.
    assert_eq!(stat(&stats, "gaps"), r.buffer_dropped, "{stats} {r:?}");
    assert_eq!(stat(&stats, "out_of_order"), 0, "{stats}");
    assert_eq!(stat(&stats, "accepted"), r.accepted);
    assert_eq!(
        r.produced,
        r.accepted + r.buffer_dropped + r.buffered,
        "{r:?}"
    );
}

#[test]
fn dropouts_keep_their_share_offline_and_deliver_in_order() {
    let (_sink, addr) = sink(&[]);
    let target = format!("http://{addr}");
    let lines = run_sim(
        &[
            "--vehicles",
            "1000",
            "--target",
            &target,
            "--interval",
            "1s",
            "--duration",
            "12s",
            "--dropouts",
            "10%/2s",
            "--report-every",
            "1s",
        ],
        Duration::from_secs(60),
    );
    let r = lines.last().cloned().expect("a final line");
    // The share of messages made out of coverage is the share of time vehicles were offline.
    let share = r.offline_ticks as f64 / r.produced as f64;
    assert!((share - 0.10).abs() < 0.01, "offline share {share}: {r:?}");
    // And at any moment about that many vehicles are offline.
    let periodic: Vec<&SimReport> = lines.iter().filter(|l| !l.is_final).collect();
    let mean = periodic.iter().map(|l| l.offline as f64).sum::<f64>() / periodic.len() as f64;
    assert!(
        (mean - 100.0).abs() < 20.0,
        "vehicles offline on average {mean}"
    );
    // Returning vehicles burst what they kept, in order.
    assert!(r.delivered_late > 0, "{r:?}");
    let stats = get_json(&addr, "/stats").expect("sink stats");
    assert_eq!(stat(&stats, "out_of_order"), 0, "{stats}");
    assert_eq!(stat(&stats, "gaps"), 0, "{stats}");
    assert_eq!(stat(&stats, "accepted"), r.accepted);
    assert_eq!(r.produced, r.accepted + r.buffered, "{r:?}");
}

#[test]
fn dropouts_need_store_and_forward_and_a_valid_spec() {
    for (args, says) in [
        (
            &["--dropouts", "5%/90s", "--delivery", "at-most-once"][..],
            "needs --delivery store-and-forward",
        ),
        (&["--dropouts", "5/90s"][..], "--dropouts"),
        (&["--dropouts", "80%/90s"][..], "at most 50 %"),
        (&["--buffer", "0"][..], "--buffer must be at least 1"),
    ] {
        let mut all = vec!["--vehicles", "1", "--target", "http://127.0.0.1:9"];
        all.extend_from_slice(args);
        let out = std::process::Command::new(bin("vtox-sim"))
            .args(&all)
            .output()
            .expect("run vtox-sim");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Through a coordinator and an agent: the run's flags reach the simulators, and the status
/// and the summary show buffers, outages and the delay.
#[test]
fn a_run_passes_delivery_through_and_its_status_shows_it() {
    let coord_addr = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn("vtox-coord", &["serve", "--listen", &coord_addr]);
    wait_listening(&coord_addr, Duration::from_secs(10));
    let logs = TempDir::new("delivery");
    let _agent = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord_addr,
            "--name",
            "agent-d",
            "--log-dir",
            logs.path(),
        ],
    );
    let coord_url = format!("http://{coord_addr}");
    // The sink's outage covers its first 3 s: it starts once the agent has joined (after
    // measuring its host), so that the run begins inside the outage.
    wait_for("the agent joined", Duration::from_secs(20), || {
        let out = std::process::Command::new(bin("vtox-coord"))
            .args(["agents", "--coord", &coord_url, "--json"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["agents"]
            .as_array()?
            .iter()
            .any(|a| a["connected"] == true))
        .then_some(())
    });
    let (_sink, sink_addr) = sink(&["--outage", "3s"]);
    let target = format!("http://{sink_addr}");
    let mut run = Proc::spawn_piped(
        "vtox-coord",
        &[
            "run",
            "300",
            "--coord",
            &coord_url,
            "--target",
            &target,
            "--duration",
            "10s",
            "--interval",
            "0.5s",
            "--dropouts",
            "20%/2s",
            "--buffer",
            "100",
            // The outage fails requests on purpose; this test judges the accounting.
            "--min-success",
            "0",
        ],
    );
    // While it runs, the status tells vehicles offline and messages buffered.
    let seen = wait_for(
        "offline vehicles in the status",
        Duration::from_secs(40),
        || {
            let out = std::process::Command::new(bin("vtox-coord"))
                .args(["status", "--coord", &coord_url, "--json"])
                .output()
                .ok()?;
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let t = &s["totals"];
            (t["offline_vehicles"].as_u64()? > 0 && t["produced"].as_u64()? > 300)
                .then(|| s.clone())
        },
    );
    assert!(
        seen["totals"]["delay"]["p99_ms"].as_f64().is_some(),
        "{seen}"
    );
    let status = run
        .wait_timeout(Duration::from_secs(90))
        .expect("the run ends after its duration");
    let mut out = String::new();
    if let Some(mut o) = run.child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    assert!(status.success(), "run failed: {status:?}\n{out}");
    assert!(out.contains("delay ms:"), "{out}");
    assert!(out.contains("delivered late"), "{out}");
    assert!(out.contains("made out of coverage"), "{out}");
    let stats = get_json(&sink_addr, "/stats").expect("sink stats");
    assert_eq!(stat(&stats, "out_of_order"), 0, "{stats}");
    assert_eq!(stat(&stats, "gaps"), 0, "{stats}");
    assert!(stat(&stats, "unavailable") > 0, "{stats}");
}
