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
    let agent_a = || {
        Proc::spawn(
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
        )
    };
    let a = agent_a();
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

    // Restarted as systemd would, agent a reports what its orphaned simulators counted after
    // its last heartbeat (they finished their requests in flight before stopping): the
    // coordinator's totals then match the sink's exactly.
    let _a_again = agent_a();
    let out = Command::new(bin("vtox-coord"))
        .args(["stop", "--coord", &coord_url])
        .output()
        .expect("stop");
    assert!(out.status.success());
    let mut last = (0, 0);
    wait_for(
        "the coordinator's total to equal the sink's",
        Duration::from_secs(20),
        || {
            let out = Command::new(bin("vtox-coord"))
                .args(["status", "--coord", &coord_url, "--json"])
                .stdin(Stdio::null())
                .output()
                .ok()?;
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let coord = s["totals"]["accepted"].as_u64()?;
            let sink = get_json(&sink, "/stats")?["accepted"].as_u64()?;
            last = (coord, sink);
            let a_back = s["agents"]
                .as_array()?
                .iter()
                .any(|x| x["name"] == "a" && x["connected"] == true);
            (a_back && coord == sink).then_some(())
        },
    );
    assert_eq!(last.0, last.1);
}

#[derive(Debug, Clone, Copy)]
struct Accounting {
    coord: u64,
    sink: u64,
    /// Timed out, then answered 200 after all: the sink took them.
    late: u64,
    /// Sent, but neither accepted nor failed: in flight when their simulator was killed.
    unanswered: u64,
    timeouts: u64,
    /// Of `timeouts`: never went out whole, so not taken.
    unsent: u64,
}

impl Accounting {
    /// What the sink took that no simulator saw: only requests whose outcome is unknown
    /// (in flight at a kill, or timed out and never answered) can be in it.
    fn unseen(&self) -> Option<u64> {
        let known = self.coord + self.late;
        let unknown = self.unanswered + self.timeouts - self.late - self.unsent;
        (known <= self.sink && self.sink - known <= unknown).then_some(self.sink - known)
    }
}

/// A sink, a coordinator with a short lease and two agents, driving 234 vehicles.
struct Cluster {
    sink: String,
    coord_url: String,
    agents: Vec<Proc>,
    vehicles: usize,
    _procs: Vec<Proc>,
    _logs: TempDir,
}

impl Cluster {
    /// Stops the run and, once both sides settled, returns the accounting: every message the
    /// sink accepted is accepted at the coordinator too (on time, or late after a timeout),
    /// except requests whose answer no simulator saw: in flight when a simulator was killed
    /// (sent but neither accepted nor failed), or timed out and never answered.
    fn stop_and_account(&self) -> Accounting {
        let out = Command::new(bin("vtox-coord"))
            .args(["stop", "--coord", &self.coord_url])
            .output()
            .expect("stop");
        assert!(out.status.success());
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            printed.contains("accepted"),
            "stop prints the final totals: {printed}"
        );
        wait_for("the final counts", Duration::from_secs(15), || {
            let s = self.status();
            let running: u64 = s["agents"]
                .as_array()?
                .iter()
                .flat_map(|a| a["instances"].as_array().cloned().unwrap_or_default())
                .filter(|i| {
                    ["starting", "running", "stopping"].contains(&i["phase"].as_str().unwrap_or(""))
                })
                .count() as u64;
            let t = &s["totals"];
            let a = Accounting {
                coord: t["accepted"].as_u64()?,
                sink: get_json(&self.sink, "/stats")?["accepted"].as_u64()?,
                late: t["late_accepted"].as_u64()?,
                unanswered: t["sent"].as_u64()? - t["accepted"].as_u64()? - t["failed"].as_u64()?,
                timeouts: t["timeouts"].as_u64()?,
                unsent: t["timeouts_unsent"].as_u64()?,
            };
            (running == 0 && a.unseen().is_some()).then_some(a)
        })
    }

    fn start(tag: &str, caps: [&str; 2]) -> Cluster {
        Self::start_n(tag, caps, 234)
    }

    fn start_n(tag: &str, caps: [&str; 2], vehicles: usize) -> Cluster {
        let n = vehicles.to_string();
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
                &n,
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
                // Several instances per agent, so that one can be killed, moved or rebalanced
                // while the others drive on.
                "--per-instance",
                "50",
            ],
            &[],
        );
        wait_for("every vehicle sending", Duration::from_secs(30), || {
            (vehicle_counts(&sink).len() == vehicles).then_some(())
        });
        Cluster {
            sink,
            coord_url,
            agents,
            vehicles,
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
        assert_eq!(stats["vehicles"], self.vehicles);
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
    // The killed simulator's tally file gave its agent the exact totals (but for requests in
    // flight at the kill), where its last metric line would have been up to a second short.
    let a = c.stop_and_account();
    assert!(a.unanswered <= 10, "{a:?}");
    assert!(a.unseen().is_some_and(|n| n <= a.unanswered), "{a:?}");
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
    // The frozen agent's simulators stopped by themselves and their last lines waited in the
    // pipe until it thawed: nothing was lost.
    let a = c.stop_and_account();
    assert_eq!(a.sink, a.coord, "{a:?}");
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
    // Two agents with room for each other's vehicles: a restarted coordinator must wait for
    // both to come back rather than move the vehicles of the one that reconnects second.
    let _a = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "a",
            "--max-vehicles",
            "200",
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
            "200",
            "--log-dir",
            logs.path(),
        ],
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
            "--expect-agents",
            "2",
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

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    // A target URL that does not parse: refused before anything starts.
    let out = Command::new(bin("vtox-coord"))
        .args(["run", "10", "--local", "--target", "not a url"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--target") && err.contains("not a URL") && !err.contains("panicked"),
        "{err}"
    );

    let coord = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn("vtox-coord", &["serve", "--listen", &coord]);
    wait_listening(&coord, Duration::from_secs(10));
    let logs = TempDir::new("badinput");
    let _x = Proc::spawn(
        "vtox-agent",
        &["--join", &coord, "--name", "x", "--log-dir", logs.path()],
    );
    let coord_url = format!("http://{coord}");
    let agents = || -> serde_json::Value {
        let out = Command::new(bin("vtox-coord"))
            .args(["agents", "--coord", &coord_url, "--json"])
            .stdin(Stdio::null())
            .output()
            .expect("agents");
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    wait_for("agent x connected", Duration::from_secs(15), || {
        (agents()["agents"][0]["connected"] == true).then_some(())
    });

    // Two agents with one name: the second is refused and says why.
    let mut twin = Proc::spawn(
        "vtox-agent",
        &["--join", &coord, "--name", "x", "--log-dir", logs.path()],
    );
    let st = twin
        .wait_timeout(Duration::from_secs(20))
        .expect("the twin gives up");
    assert!(!st.success());

    // Garbage bytes on the gRPC port: the connection dies, the coordinator does not.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&coord).expect("connect");
        let garbage: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let _ = s.write_all(&garbage);
    }
    std::thread::sleep(Duration::from_millis(300));
    let a = agents();
    assert_eq!(a["agents"].as_array().map(|l| l.len()), Some(1), "{a}");
    assert_eq!(a["agents"][0]["connected"], true, "{a}");
}

/// A coordinator and one agent whose "simulator" is `script`, running a 10-vehicle run.
struct FakeSim {
    coord_url: String,
    logs: TempDir,
    _procs: Vec<Proc>,
}

impl FakeSim {
    fn start(tag: &str, script: &str) -> FakeSim {
        Self::start_with(tag, script, &[])
    }

    fn start_with(tag: &str, script: &str, run_args: &[&str]) -> FakeSim {
        let logs = TempDir::new(tag);
        let fake = logs.0.join("fake-sim");
        std::fs::write(&fake, script).expect("write the fake simulator");
        let fake = fake.to_str().unwrap_or_default().to_string();
        let _ = Command::new("chmod").args(["+x", &fake]).status();
        let coord = format!("127.0.0.1:{}", free_port());
        let coord_p = Proc::spawn("vtox-coord", &["serve", "--listen", &coord]);
        wait_listening(&coord, Duration::from_secs(10));
        let agent = Proc::spawn(
            "vtox-agent",
            &[
                "--join",
                &coord,
                "--name",
                "f",
                "--log-dir",
                logs.path(),
                "--sim-bin",
                &fake,
            ],
        );
        let coord_url = format!("http://{coord}");
        let mut args = vec![
            "run",
            "10",
            "--coord",
            &coord_url,
            "--target",
            "http://127.0.0.1:9",
            "--duration",
            "60s",
        ];
        args.extend_from_slice(run_args);
        let run = Proc::spawn_env("vtox-coord", &args, &[]);
        FakeSim {
            coord_url,
            logs,
            _procs: vec![coord_p, agent, run],
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(bin("vtox-coord"))
            .args(["status", "--coord", &self.coord_url, "--json"])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }
}

#[test]
fn unparsable_metric_lines_are_counted_and_skipped() {
    let f = FakeSim::start(
        "badlines",
        "#!/bin/sh\necho 'not json'\necho '{\"sent\":5,\"accepted\":5,\"failed\":0,\"dropped\":0,\"bytes\":10}'\necho '{broken'\nexec sleep 60\n",
    );
    wait_for("the bad lines counted", Duration::from_secs(20), || {
        let t = f.status()?["totals"].clone();
        (t["bad_lines"] == 2 && t["accepted"] == 5).then_some(())
    });
}

#[test]
fn a_simulator_that_ignores_stop_is_killed_and_its_counts_kept() {
    // Ignores SIGTERM, reports once, then hangs: the agent kills it after twice the request
    // timeout plus 5 s, and `stop` returns only once it is gone, with its counts.
    let f = FakeSim::start_with(
        "nostop",
        "#!/bin/sh\ntrap '' TERM\necho '{\"sent\":4,\"accepted\":4,\"failed\":0,\"dropped\":0,\"bytes\":10}'\nwhile :; do sleep 1; done\n",
        &["--timeout", "1s"],
    );
    wait_for("the simulator reporting", Duration::from_secs(20), || {
        (f.status()?["totals"]["accepted"] == 4).then_some(())
    });
    let agent = f._procs[1].pid();
    assert_eq!(children_of(agent).len(), 1);
    let out = Command::new(bin("vtox-coord"))
        .args(["stop", "--coord", &f.coord_url])
        .stdin(Stdio::null())
        .output()
        .expect("stop");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("have not reported"), "{stderr}");
    assert!(stdout.contains("accepted 4"), "{stdout}");
    let s = f.status().expect("status");
    let phases: Vec<_> = s["agents"][0]["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["phase"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(phases, ["exited"], "{s}");
    assert_eq!(s["totals"]["accepted"], 4);
    assert!(children_of(agent).is_empty(), "the simulator is gone");
}

#[test]
fn a_target_that_stops_answering_is_survived() {
    let c = Cluster::start("deadsink", ["300", "300"]);
    let sink_pid = c._procs[0].pid();
    let _ = Command::new("kill")
        .args(["-STOP", &sink_pid.to_string()])
        .status();
    std::thread::sleep(Duration::from_secs(10));
    let _ = Command::new("kill")
        .args(["-CONT", &sink_pid.to_string()])
        .status();
    c.all_sending_again(Duration::from_secs(15));
    c.assert_no_conflicts();
    wait_for("timeouts counted", Duration::from_secs(10), || {
        let s = c.status();
        (s["totals"]["timeouts"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    // Memory stayed bounded: no simulator grew past a few tens of megabytes.
    for agent in &c.agents {
        for sim in children_of(agent.pid()) {
            let rss = std::fs::read_to_string(format!("/proc/{sim}/statm"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                .unwrap_or(0)
                * 4096;
            assert!(rss < 100 << 20, "simulator {sim} holds {rss} bytes");
        }
    }
    // The requests the frozen sink held timed out, and it answered them once it thawed: the
    // simulators kept those connections open, so they know exactly which it took.
    let a = c.stop_and_account();
    assert!(a.timeouts > 0 && a.late > 0, "{a:?}");
    assert_eq!(a.unanswered, 0, "{a:?}");
    assert_eq!(a.sink, a.coord + a.late, "{a:?}");
}

#[test]
fn a_crash_looping_instance_is_marked_failed() {
    let f = FakeSim::start(
        "crashloop",
        "#!/bin/sh\necho 'starting and dying' >&2\nexit 1\n",
    );
    // Restarts back off 1, 2, 4, 8, 16 s; a crash after five restarts within a minute ends it.
    let instance = wait_for(
        "the instance marked failed",
        Duration::from_secs(60),
        || {
            let i = f.status()?["agents"][0]["instances"][0].clone();
            (i["phase"] == "failed").then_some(i)
        },
    );
    assert_eq!(instance["restarts"], 5, "{instance}");
    assert!(
        instance["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("exit"),
        "{instance}"
    );
    let log = std::fs::read_to_string(f.logs.0.join("instance-0.log")).unwrap_or_default();
    assert!(
        log.contains("starting and dying"),
        "stderr goes to the instance log"
    );
}

#[test]
fn a_late_agent_takes_over_the_shortfall() {
    let c = Cluster::start("late", ["120", "120"]);
    // Without spare room, a lost agent's vehicles stay unassigned and status says so.
    c.agents[0].signal(9);
    wait_for("the shortfall shown", Duration::from_secs(15), || {
        (c.status()["unassigned_vehicles"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    let coord = c.coord_url.trim_start_matches("http://").to_string();
    let _late = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "late",
            "--log-dir",
            c._logs.path(),
        ],
    );
    wait_for("the late agent took over", Duration::from_secs(20), || {
        (c.status()["unassigned_vehicles"] == 0).then_some(())
    });
    c.all_sending_again(Duration::from_secs(15));
    c.assert_no_conflicts();
}

#[test]
fn rebalance_moves_instances_to_a_new_agent_without_conflicts() {
    // Two agents filled to their capacity: both above their recommended 75%.
    let c = Cluster::start_n("rebalance", ["100", "100"], 200);
    let coord = c.coord_url.trim_start_matches("http://").to_string();
    let _new = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "new",
            "--log-dir",
            c._logs.path(),
        ],
    );
    wait_for("the new agent connected", Duration::from_secs(15), || {
        let out = Command::new(bin("vtox-coord"))
            .args(["agents", "--coord", &c.coord_url, "--json"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["agents"]
            .as_array()?
            .iter()
            .filter(|a| a["connected"] == true)
            .count()
            == 3)
            .then_some(())
    });
    let out = Command::new(bin("vtox-coord"))
        .args(["rebalance", "--coord", &c.coord_url])
        .output()
        .expect("rebalance");
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("moving 2 instances (100 vehicles)"),
        "{out:?}"
    );
    wait_for(
        "the new agent carrying them",
        Duration::from_secs(15),
        || {
            let s = c.status();
            let new = s["agents"]
                .as_array()?
                .iter()
                .find(|a| a["name"] == "new")?
                .clone();
            (new["vehicles"] == 100 && new["instances_running"] == 2).then_some(())
        },
    );
    c.all_sending_again(Duration::from_secs(15));
    c.assert_no_conflicts();
}

#[test]
fn abuse_of_the_coordinator_does_not_disturb_a_run() {
    let c = Cluster::start_n("abuse", ["300", "300"], 100);
    let coord = c.coord_url.trim_start_matches("http://").to_string();
    // A flood of joins, impossible hardware and garbage bytes while the fleet drives.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use vtox::wire::pb;
        let channel = tonic::transport::Endpoint::from_shared(c.coord_url.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        for i in 0..300 {
            let hw = pb::Hardware {
                logical_cores: (i % 2) as u32,
                memory_total_bytes: 1 << 30,
                ..Default::default()
            };
            let _ = client
                .join(pb::JoinRequest {
                    name: format!("intruder-{i}"),
                    hardware: Some(hw),
                    max_vehicles: 0,
                    protocol_major: 1,
                })
                .await;
        }
    });
    for _ in 0..20 {
        use std::io::Write;
        if let Ok(mut s) = std::net::TcpStream::connect(&coord) {
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0x00, 0x42].repeat(100));
        }
    }
    c.all_sending_again(Duration::from_secs(15));
    c.assert_no_conflicts();
    let s = c.status();
    assert_eq!(s["unassigned_vehicles"], 0, "{s}");
    assert_eq!(s["state"], "running");
}
