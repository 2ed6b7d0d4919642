//! The control plane against its own load: an agent stalled past its lease comes back without
//! a restart storm, every stop and restart is counted, simulators yield the CPU to their
//! agent, and a fleet that cannot be driven fails its run with the agent and the cause named.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn status(coord_url: &str) -> Option<serde_json::Value> {
    let out = Command::new(bin("vtox-coord"))
        .args(["status", "--coord", coord_url, "--json"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn sent_per_vehicle(sink: &str) -> std::collections::BTreeMap<String, u64> {
    get_json(sink, "/stats/vehicles")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| Some((v["vehicle_id"].as_str()?.to_string(), v["count"].as_u64()?)))
        .collect()
}

/// The niceness of a process, from field 19 of its stat.
fn nice_of(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(16)?
        .parse()
        .ok()
}

#[test]
fn a_stalled_agent_resumes_its_instances_without_a_restart_storm() {
    let (_sink, sink) = sink(&[]);
    let coord = format!("127.0.0.1:{}", free_port());
    // A grace long enough that a 3.5 s stall does not move the vehicles: the agent must come
    // back to its own instances.
    let _coord = Proc::spawn(
        "vtox-coord",
        &[
            "serve",
            "--listen",
            &coord,
            "--lease",
            "2s",
            "--grace",
            "8s",
            "--heartbeat",
            "500ms",
        ],
    );
    wait_listening(&coord, Duration::from_secs(10));
    let logs = TempDir::new("stall");
    let agent = Proc::spawn(
        "vtox-agent",
        &["--join", &coord, "--name", "a", "--log-dir", logs.path()],
    );
    let coord_url = format!("http://{coord}");
    let _run = Proc::spawn_env(
        "vtox-coord",
        &[
            "run",
            "200",
            "--coord",
            &coord_url,
            "--target",
            &format!("http://{sink}"),
            "--duration",
            "90s",
            "--interval",
            "0.5s",
            "--per-instance",
            "100",
            "--min-success",
            "0",
        ],
        &[],
    );
    wait_for("all 200 vehicles sending", Duration::from_secs(30), || {
        (sent_per_vehicle(&sink).len() == 200).then_some(())
    });
    let first: Vec<u32> = children_of(agent.pid());
    assert_eq!(first.len(), 2, "two instances of 100");
    // Every simulator process the agent runs from here on, seen independently of what vtox
    // reports (the calibration's processes at its start are gone by now).
    let mut seen: BTreeSet<u32> = first.iter().copied().collect();
    let look = |seen: &mut BTreeSet<u32>| seen.extend(children_of(agent.pid()));
    for pid in &first {
        assert_eq!(
            nice_of(*pid),
            Some(10),
            "simulators yield the CPU to their agent"
        );
    }
    assert_eq!(nice_of(agent.pid()), Some(0));

    agent.signal(19); // SIGSTOP: longer than the lease (2 s) and the simulators' own (1 s)
    std::thread::sleep(Duration::from_millis(3500));
    agent.signal(18); // SIGCONT
    let before = sent_per_vehicle(&sink);
    wait_for(
        "every vehicle sending again",
        Duration::from_secs(20),
        || {
            look(&mut seen);
            let now = sent_per_vehicle(&sink);
            before
                .iter()
                .all(|(id, n)| now.get(id).is_some_and(|m| m > n))
                .then_some(())
        },
    );
    // No storm: for five more seconds nothing else starts.
    let quiet_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < quiet_until {
        look(&mut seen);
        std::thread::sleep(Duration::from_millis(100));
    }
    let now: BTreeSet<u32> = children_of(agent.pid()).into_iter().collect();
    assert_eq!(now.len(), 2);
    assert!(
        first.iter().all(|p| !now.contains(p)),
        "both were restarted"
    );
    assert_eq!(seen.len(), 4, "two processes each, not a storm: {seen:?}");

    let s = wait_for("the supervision counts", Duration::from_secs(10), || {
        let s = status(&coord_url)?;
        (s["supervision"]["processes_started"] == 4).then_some(s)
    });
    let sup = &s["supervision"];
    assert_eq!(sup["lease_expiries"], 1, "{s}");
    assert_eq!(sup["lease_stops"], 2, "{s}");
    assert_eq!(sup["crashes"], 0, "a lease stop is no crash: {s}");
    assert_eq!(s["vehicles_not_driven"], 0, "{s}");
    assert_eq!(s["state"], "running");

    // The summary's restarts are the processes started minus the plan's instances.
    let out = Command::new(bin("vtox-coord"))
        .args(["stop", "--coord", &coord_url])
        .stdin(Stdio::null())
        .output()
        .expect("stop");
    let text = String::from_utf8_lossy(&out.stdout);
    let restarts = seen.len() - 2;
    assert!(
        text.contains(&format!(
            "4 processes started, {restarts} restarts (2 stopped on a lease expiry), 1 lease expiry"
        )),
        "{text}"
    );
    let stats = get_json(&sink, "/stats").expect("stats");
    assert_eq!(stats["conflicts"], 0, "{stats}");
}

#[test]
fn a_fleet_that_cannot_be_driven_fails_the_run_naming_the_agent_and_the_cause() {
    let coord = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn(
        "vtox-coord",
        &["serve", "--listen", &coord, "--heartbeat", "500ms"],
    );
    wait_listening(&coord, Duration::from_secs(10));
    let logs = TempDir::new("undriven");
    // A "simulator" that crashes at once, every time.
    let _agent = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "crashy",
            "--log-dir",
            logs.path(),
            "--sim-bin",
            "/bin/false",
        ],
    );
    let coord_url = format!("http://{coord}");
    let started = Instant::now();
    let out = Command::new(bin("vtox-coord"))
        .args([
            "run",
            "10",
            "--coord",
            &coord_url,
            "--target",
            "http://127.0.0.1:9",
            "--duration",
            "120s",
            "--max-not-driven",
            "4s",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "it did not run its 120 s"
    );
    assert!(
        stderr.contains("error: the run failed: 10 vehicles of agent crashy were not driven for"),
        "{stderr}"
    );
    assert!(stderr.contains("crashed"), "{stderr}");
    assert!(stdout.contains("FAILED:"), "{stdout}");
    let s = status(&coord_url).expect("status");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["supervision"]["crashes"].as_u64().unwrap_or(0) >= 2,
        "{s}"
    );
}
