//! Failure scenarios with real processes: a lost agent, orphaned simulators.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

fn vehicle_counts(sink: &str) -> BTreeMap<String, u64> {
    get_json(sink, "/stats/vehicles")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| Some((v["vehicle_id"].as_str()?.to_string(), v["count"].as_u64()?)))
        .collect()
}

#[test]
fn a_killed_agent_stops_its_simulators_and_its_vehicles_move() {
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink]);
    let coord = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn(
        "vtox-coord",
        &[
            "serve",
            "--listen",
            &coord,
            "--lease",
            "2s",
            "--grace",
            "1s",
            "--heartbeat",
            "500ms",
        ],
    );
    wait_listening(&sink, Duration::from_secs(10));
    wait_listening(&coord, Duration::from_secs(10));
    let logs = TempDir::new("faults");
    let a = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "a",
            "--max-vehicles",
            "100",
            "--log-dir",
            logs.path(),
        ],
    );
    let _b = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "b",
            "--max-vehicles",
            "300",
            "--log-dir",
            logs.path(),
        ],
    );
    let coord_url = format!("http://{coord}");
    let _run = Proc::spawn_env(
        "vtox-coord",
        &[
            "run",
            "234",
            "--coord",
            &coord_url,
            "--target",
            &format!("http://{sink}"),
            "--duration",
            "60s",
            "--interval",
            "0.5s",
            "--expect-agents",
            "2",
            "--stagger",
            "0.1s",
            "--min-success",
            "0",
        ],
        &[],
    );
    wait_for("all 234 vehicles sending", Duration::from_secs(30), || {
        (vehicle_counts(&sink).len() == 234).then_some(())
    });
    let sims: Vec<u32> = children_of(a.pid());
    assert!(!sims.is_empty(), "agent a runs simulators");

    // kill -9 the agent alone: its simulators see their stdin close and stop by themselves.
    a.signal(9);
    wait_for(
        "the orphaned simulators to stop",
        Duration::from_secs(10),
        || sims.iter().all(|p| !alive(*p)).then_some(()),
    );

    // After lease + grace the coordinator moves a's ranges to b: every vehicle sends again.
    let before = vehicle_counts(&sink);
    wait_for(
        "every vehicle sending again",
        Duration::from_secs(20),
        || {
            let now = vehicle_counts(&sink);
            before
                .iter()
                .all(|(id, n)| now.get(id).is_some_and(|m| m > n))
                .then_some(())
        },
    );
    let stats = get_json(&sink, "/stats").expect("stats");
    assert_eq!(
        stats["conflicts"], 0,
        "no vehicle was driven by two hosts at once"
    );
    assert_eq!(stats["duplicates"], 0);
    assert_eq!(stats["vehicles"], 234);

    let out = Command::new(bin("vtox-coord"))
        .args(["status", "--coord", &coord_url, "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(status["unassigned_vehicles"], 0, "{status}");
    let b = status["agents"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["name"] == "b").cloned())
        .expect("b");
    assert_eq!(b["vehicles"], 234, "b carries the whole fleet now");
}

/// A sink, a coordinator with a short lease and two agents, driving 234 vehicles.
struct Cluster {
    sink: String,
    coord_url: String,
    agents: Vec<Proc>,
    _procs: Vec<Proc>,
    _logs: TempDir,
}

impl Cluster {
    fn start(tag: &str, caps: [&str; 2]) -> Cluster {
        let sink = format!("127.0.0.1:{}", free_port());
        let sink_p = Proc::spawn("vtox-sink", &["--listen", &sink]);
        let coord = format!("127.0.0.1:{}", free_port());
        let coord_p = Proc::spawn(
            "vtox-coord",
            // Grace over the sink's 2 s conflict window: a handed-over vehicle's last message
            // from its old host and first from its new one are never within 2 s.
            &[
                "serve",
                "--listen",
                &coord,
                "--lease",
                "2s",
                "--grace",
                "2s",
                "--heartbeat",
                "500ms",
            ],
        );
        wait_listening(&sink, Duration::from_secs(10));
        wait_listening(&coord, Duration::from_secs(10));
        let logs = TempDir::new(tag);
        let agents = ["a", "b"]
            .iter()
            .zip(caps)
            .map(|(name, cap)| {
                Proc::spawn(
                    "vtox-agent",
                    &[
                        "--join",
                        &coord,
                        "--name",
                        name,
                        "--max-vehicles",
                        cap,
                        "--log-dir",
                        logs.path(),
                    ],
                )
            })
            .collect();
        let coord_url = format!("http://{coord}");
        let run = Proc::spawn_env(
            "vtox-coord",
            &[
                "run",
                "234",
                "--coord",
                &coord_url,
                "--target",
                &format!("http://{sink}"),
                "--duration",
                "90s",
                "--interval",
                "0.5s",
                "--expect-agents",
                "2",
                "--stagger",
                "0.1s",
                "--min-success",
                "0",
            ],
            &[],
        );
        wait_for("all 234 vehicles sending", Duration::from_secs(30), || {
            (vehicle_counts(&sink).len() == 234).then_some(())
        });
        Cluster {
            sink,
            coord_url,
            agents,
            _procs: vec![sink_p, coord_p, run],
            _logs: logs,
        }
    }

    fn status(&self) -> serde_json::Value {
        let out = Command::new(bin("vtox-coord"))
            .args(["status", "--coord", &self.coord_url, "--json"])
            .stdin(Stdio::null())
            .output()
            .expect("status");
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Waits until every vehicle has sent more than it had when this was called.
    fn all_sending_again(&self, within: Duration) {
        let before = vehicle_counts(&self.sink);
        wait_for("every vehicle sending again", within, || {
            let now = vehicle_counts(&self.sink);
            before
                .iter()
                .all(|(id, n)| now.get(id).is_some_and(|m| m > n))
                .then_some(())
        });
    }

    fn assert_no_conflicts(&self) {
        let stats = get_json(&self.sink, "/stats").expect("stats");
        assert_eq!(
            stats["conflicts"], 0,
            "no vehicle was driven by two hosts at once: {stats}"
        );
        assert_eq!(stats["vehicles"], 234);
    }
}

#[test]
fn a_killed_instance_is_restarted_and_its_restart_shows() {
    let c = Cluster::start("crash", ["300", "300"]);
    let sims = children_of(c.agents[0].pid());
    assert!(!sims.is_empty());
    let _ = Command::new("kill")
        .args(["-9", &sims[0].to_string()])
        .status();
    c.all_sending_again(Duration::from_secs(15));
    wait_for("the restart in status", Duration::from_secs(10), || {
        let s = c.status();
        let restarts: u64 = s["agents"]
            .as_array()?
            .iter()
            .flat_map(|a| a["instances"].as_array().cloned().unwrap_or_default())
            .map(|i| i["restarts"].as_u64().unwrap_or(0))
            .sum();
        (restarts == 1).then_some(())
    });
    c.assert_no_conflicts();
}

#[test]
fn a_frozen_agent_comes_back_without_driving_moved_vehicles() {
    let c = Cluster::start("freeze", ["150", "300"]);
    let a = &c.agents[0];
    a.signal(19); // SIGSTOP, past lease + grace
    std::thread::sleep(Duration::from_secs(5));
    c.all_sending_again(Duration::from_secs(15));
    a.signal(18); // SIGCONT
                  // Give the thawed agent time to act on whatever it had queued, then check the sink saw
                  // no vehicle from two hosts and the fleet keeps sending.
    std::thread::sleep(Duration::from_secs(3));
    c.all_sending_again(Duration::from_secs(15));
    c.assert_no_conflicts();
}

#[test]
fn a_restarted_coordinator_resumes_the_run_and_counts_on() {
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink]);
    let coord = format!("127.0.0.1:{}", free_port());
    let state = TempDir::new("state");
    let serve = |addr: &str| {
        Proc::spawn(
            "vtox-coord",
            &[
                "serve",
                "--listen",
                addr,
                "--lease",
                "3s",
                "--grace",
                "2s",
                "--heartbeat",
                "500ms",
                "--state-dir",
                state.path(),
            ],
        )
    };
    let first = serve(&coord);
    wait_listening(&sink, Duration::from_secs(10));
    wait_listening(&coord, Duration::from_secs(10));
    let logs = TempDir::new("restart");
    let _a = Proc::spawn(
        "vtox-agent",
        &["--join", &coord, "--name", "a", "--log-dir", logs.path()],
    );
    let coord_url = format!("http://{coord}");
    let mut run = Proc::spawn_env(
        "vtox-coord",
        &[
            "run",
            "120",
            "--coord",
            &coord_url,
            "--target",
            &format!("http://{sink}"),
            "--duration",
            "14s",
            "--interval",
            "0.5s",
            "--stagger",
            "0.1s",
            "--json",
        ],
        &[],
    );
    wait_for("all 120 vehicles sending", Duration::from_secs(30), || {
        (vehicle_counts(&sink).len() == 120).then_some(())
    });
    // kill -9 the coordinator and start it again on the same port with the same state.
    first.signal(9);
    drop(first);
    let _second = serve(&coord);
    wait_listening(&coord, Duration::from_secs(10));
    let before = vehicle_counts(&sink);
    wait_for(
        "every vehicle sending again",
        Duration::from_secs(15),
        || {
            let now = vehicle_counts(&sink);
            before
                .iter()
                .all(|(id, n)| now.get(id).is_some_and(|m| m > n))
                .then_some(())
        },
    );
    let status = run
        .wait_timeout(Duration::from_secs(60))
        .expect("the run ends after its duration");
    let mut out = String::new();
    if let Some(mut o) = run.child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    assert!(status.success(), "{status:?} {out}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("json summary");
    let stats = get_json(&sink, "/stats").expect("stats");
    assert_eq!(stats["conflicts"], 0);
    assert_eq!(stats["duplicates"], 0);
    // Nothing counted twice, nothing lost: the coordinator's total is the sink's.
    assert_eq!(
        summary["totals"]["accepted"], stats["accepted"],
        "{summary}"
    );
}
