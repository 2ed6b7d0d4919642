//! Integration tests of the control plane: a real coordinator, agents, simulators and sink on
//! loopback.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;
use vtox::fleet::vehicle_id;

fn coord_cmd(args: &[&str]) -> std::process::Output {
    Command::new(bin("vtox-coord"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vtox-coord")
}

#[test]
fn two_agents_drive_exactly_the_planned_vehicles() {
    let sink_addr = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink_addr]);
    let coord_addr = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn("vtox-coord", &["serve", "--listen", &coord_addr]);
    wait_listening(&sink_addr, Duration::from_secs(10));
    wait_listening(&coord_addr, Duration::from_secs(10));
    let logs = TempDir::new("cluster");
    // Both agents are capped, unevenly, so that the split is uneven and predictable.
    let _a = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord_addr,
            "--name",
            "agent-a",
            "--max-vehicles",
            "80",
            "--log-dir",
            logs.path(),
        ],
    );
    let _b = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord_addr,
            "--name",
            "agent-b",
            "--max-vehicles",
            "200",
            "--log-dir",
            logs.path(),
        ],
    );

    let coord_url = format!("http://{coord_addr}");
    let target = format!("http://{sink_addr}");
    let mut run = Proc::spawn_env(
        "vtox-coord",
        &[
            "run",
            "234",
            "--coord",
            &coord_url,
            "--target",
            &target,
            "--duration",
            "4s",
            "--interval",
            "0.5s",
            "--expect-agents",
            "2",
            "--stagger",
            "0.2s",
            "--json",
        ],
        &[],
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
    let summary: serde_json::Value =
        serde_json::from_str(out.trim()).expect("--json prints one object");
    assert_eq!(summary["state"], "finished");
    assert_eq!(summary["vehicles"], 234);

    // The plan follows the capacities (80 : 200) and respects them.
    let agents = summary["agents"].as_array().expect("agents");
    let by_name: BTreeMap<&str, u64> = agents
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or(""),
                a["vehicles"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!((50..=80).contains(&by_name["agent-a"]), "{by_name:?}");
    assert!(by_name["agent-b"] <= 200, "{by_name:?}");
    assert_eq!(by_name.values().sum::<u64>(), 234);

    // The sink saw exactly vehicles 0..233, each from one (agent, instance) only.
    let stats = get_json(&sink_addr, "/stats").expect("sink stats");
    assert_eq!(stats["conflicts"], 0);
    assert_eq!(stats["duplicates"], 0);
    assert_eq!(stats["rejected"], 0);
    let vehicles = get_json(&sink_addr, "/stats/vehicles").expect("per-vehicle stats");
    let list = vehicles.as_array().expect("a list of vehicles");
    let seen: BTreeSet<String> = list
        .iter()
        .filter_map(|v| v["vehicle_id"].as_str().map(String::from))
        .collect();
    let want: BTreeSet<String> = (0..234).map(vehicle_id).collect();
    assert_eq!(seen, want);
    for v in list {
        assert_eq!(v["conflicts"], 0, "{v}");
    }
    // Every message the sink accepted is in the coordinator's totals, and no more.
    assert_eq!(
        summary["totals"]["accepted"], stats["accepted"],
        "coordinator vs sink"
    );
    assert!(summary["totals"]["accepted"].as_u64().unwrap_or(0) > 234);
}

#[test]
fn plan_gives_the_reference_split() {
    // The old tool's layout, kept reproducible behind --per-instance 50.
    let out = coord_cmd(&[
        "plan",
        "234",
        "--hosts",
        "8c16g",
        "--per-instance",
        "50",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let instances = v["agents"][0]["instances"].as_array().expect("instances");
    let got: Vec<(u64, u64, u64)> = instances
        .iter()
        .map(|i| {
            (
                i["index"].as_u64().unwrap(),
                i["first_vehicle"].as_u64().unwrap(),
                i["vehicles"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 0, 50),
            (1, 50, 50),
            (2, 100, 50),
            (3, 150, 50),
            (4, 200, 34)
        ]
    );
    assert_eq!(v["vehicles"], 234);
}

#[test]
fn plan_beyond_capacity_says_by_how_much() {
    let out = coord_cmd(&["plan", "90000000", "--hosts", "4c8g,4c8g"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error:") && err.contains("more than"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    // --overcommit plans it anyway.
    let out = coord_cmd(&[
        "plan",
        "90000000",
        "--hosts",
        "4c8g,4c8g",
        "--overcommit",
        "--json",
        "--per-instance",
        "100000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_vehicle_counts_are_refused() {
    for bad in ["0", "-1", "abc", "1e12", "1000000000000"] {
        let out = coord_cmd(&["plan", bad, "--hosts", "8c16g"]);
        assert_eq!(out.status.code(), Some(2), "plan {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("error:") && !err.contains("panicked"),
            "plan {bad}: {err}"
        );
    }
}

#[test]
fn an_unreachable_coordinator_is_named() {
    let port = free_port();
    let out = coord_cmd(&["status", "--coord", &format!("127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot reach the coordinator at http://127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line, no stack: {err}");
}

#[test]
fn a_run_can_drive_a_slice_of_a_larger_fleet() {
    // One of two coordinators splitting a fleet: this one drives vehicles 500..519.
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink]);
    wait_listening(&sink, Duration::from_secs(10));
    let out = Command::new(bin("vtox-coord"))
        .args([
            "run",
            "20",
            "--local",
            "--first-vehicle",
            "500",
            "--duration",
            "2s",
        ])
        .args(["--interval", "0.5s", "--target", &format!("http://{sink}")])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = get_json(&sink, "/stats/vehicles").expect("vehicles");
    let mut serials: Vec<u64> = list
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|v| v["vehicle_id"].as_str()?.rsplit('·').next()?.parse().ok())
        .collect();
    serials.sort_unstable();
    let expected: Vec<u64> = (202_400_500..202_400_520).collect();
    assert_eq!(serials, expected);
}

#[test]
fn run_local_cleans_up_every_process() {
    let mut run = Proc::spawn_env(
        "vtox-coord",
        &[
            "run",
            "60",
            "--local",
            "--duration",
            "3s",
            "--interval",
            "0.5s",
            "--stagger",
            "0.1s",
            "--json",
        ],
        &[],
    );
    let coord_pid = run.pid();
    // Collect the processes it starts (agent, sink) and theirs (simulators) while it runs.
    let mut seen: BTreeSet<u32> = BTreeSet::new();
    let status = loop {
        for child in children_of(coord_pid) {
            seen.insert(child);
            seen.extend(children_of(child));
        }
        if let Ok(Some(st)) = run.child.try_wait() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(seen.len() < 1000);
    };
    let mut out = String::new();
    if let Some(mut o) = run.child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    assert!(status.success(), "run --local failed: {status:?} {out}");
    assert!(
        seen.len() >= 3,
        "agent, sink and at least one simulator ran: {seen:?}"
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json summary");
    assert!(v["totals"]["accepted"].as_u64().unwrap_or(0) > 60);
    wait_for(
        "every started process to exit",
        Duration::from_secs(10),
        || seen.iter().all(|p| !alive(*p)).then_some(()),
    );
}

#[tokio::test]
async fn the_health_service_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let addr = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn("vtox-coord", &["serve", "--listen", &addr]);
    wait_listening(&addr, Duration::from_secs(10));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = HealthClient::new(channel);
    for service in ["", "vtox.v1.AgentService", "vtox.v1.ControlService"] {
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"));
        assert_eq!(
            r.into_inner().status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

#[tokio::test]
async fn impossible_hardware_and_unknown_versions_are_refused() {
    use vtox::wire::pb;
    let addr = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn("vtox-coord", &["serve", "--listen", &addr]);
    wait_listening(&addr, Duration::from_secs(10));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let good = pb::Hardware {
        logical_cores: 4,
        memory_total_bytes: 8 << 30,
        ..Default::default()
    };
    let join = |hw: pb::Hardware, major: u32| pb::JoinRequest {
        name: "x".into(),
        hardware: Some(hw),
        max_vehicles: 0,
        protocol_major: major,
    };
    let e = client
        .join(join(
            pb::Hardware {
                logical_cores: 0,
                ..good.clone()
            },
            1,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("0 cores"), "{}", e.message());
    let e = client
        .join(join(
            pb::Hardware {
                memory_total_bytes: 0,
                ..good.clone()
            },
            1,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = client.join(join(good.clone(), 2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("protocol 2"), "{}", e.message());
    assert!(client.join(join(good, 1)).await.is_ok());
}

fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{')
                    || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn prometheus_counters_match_status() {
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink]);
    let coord = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn(
        "vtox-coord",
        &["serve", "--listen", &coord, "--metrics-listen", &metrics],
    );
    wait_listening(&coord, Duration::from_secs(10));
    wait_listening(&sink, Duration::from_secs(10));
    let logs = TempDir::new("prom");
    let _agent = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "p",
            "--log-dir",
            logs.path(),
            "--metrics-listen",
            &agent_metrics,
        ],
    );
    let coord_url = format!("http://{coord}");
    let out = coord_cmd(&[
        "run",
        "30",
        "--coord",
        &coord_url,
        "--target",
        &format!("http://{sink}"),
        "--duration",
        "3s",
        "--interval",
        "0.5s",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let (status, text) = http("GET", &metrics, "/metrics", &[], b"").expect("metrics");
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE vtox_messages_accepted_total counter"));
    assert!(text.contains("# TYPE vtox_latency_seconds histogram"));
    assert_eq!(
        metric_sum(&text, "vtox_messages_accepted_total"),
        summary["totals"]["accepted"].as_u64().unwrap_or(0)
    );
    assert_eq!(
        metric_sum(&text, "vtox_messages_sent_total"),
        summary["totals"]["sent"].as_u64().unwrap_or(0)
    );
    assert_eq!(
        metric_sum(&text, "vtox_latency_seconds_count"),
        summary["totals"]["accepted"].as_u64().unwrap_or(0)
    );
    let (status, agent_text) =
        http("GET", &agent_metrics, "/metrics", &[], b"").expect("agent metrics");
    assert_eq!(status, 200);
    assert!(agent_text.contains("vtox_instances_up"), "{agent_text}");
    assert!(metric_sum(&agent_text, "vtox_messages_accepted_total") > 0);
}

#[test]
fn only_holders_of_the_token_join_or_drive() {
    let dir = TempDir::new("token");
    let token = dir.0.join("token");
    std::fs::write(&token, "s3cret-token\n").expect("token file");
    let wrong = dir.0.join("wrong");
    std::fs::write(&wrong, "guess\n").expect("wrong token file");
    let (token, wrong) = (
        token.to_str().unwrap_or_default(),
        wrong.to_str().unwrap_or_default(),
    );
    let coord = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn(
        "vtox-coord",
        &["serve", "--listen", &coord, "--token-file", token],
    );
    wait_listening(&coord, Duration::from_secs(10));
    let url = format!("http://{coord}");

    // Agents without the token, or with a wrong one, are refused and say why.
    for args in [
        vec!["--join", &coord, "--name", "x", "--log-dir", dir.path()],
        vec![
            "--join",
            &coord,
            "--name",
            "x",
            "--log-dir",
            dir.path(),
            "--token-file",
            wrong,
        ],
    ] {
        let out = Command::new(bin("vtox-agent"))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("agent");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("token") && !err.contains("s3cret"), "{err}");
    }
    // The CLI likewise; nothing joined.
    let out = coord_cmd(&["agents", "--coord", &url, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing or wrong token"));
    let out = coord_cmd(&["agents", "--coord", &url, "--json", "--token-file", token]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["agents"].as_array().map(|l| l.len()), Some(0));
    // With the token an agent joins.
    let _a = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "ok",
            "--log-dir",
            dir.path(),
            "--token-file",
            token,
        ],
    );
    wait_for("the agent with the token", Duration::from_secs(15), || {
        let out = coord_cmd(&["agents", "--coord", &url, "--json", "--token-file", token]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["agents"][0]["connected"] == true).then_some(())
    });

    // Listening beyond loopback without a token is refused unless --insecure.
    let out = coord_cmd(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"));
    // The token never shows in --help, even when it comes from the environment.
    let out = Command::new(bin("vtox-coord"))
        .args(["serve", "--help"])
        .env("VTOX_TOKEN", "s3cret-token")
        .output()
        .expect("help");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_certs(dir: &std::path::Path) -> Result<(), String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=vtox-test-ca",
    ])?;
    for (name, cn, usage) in [
        ("server", "127.0.0.1", "serverAuth"),
        ("client", "agent", "clientAuth"),
    ] {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"),
        )
        .map_err(|e| e.to_string())?;
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ])?;
    }
    Ok(())
}

#[test]
fn mutual_tls_admits_only_certified_agents() {
    let dir = TempDir::new("tls");
    if let Err(e) = make_certs(&dir.0) {
        eprintln!("SKIPPED: cannot make test certificates with openssl: {e}");
        return;
    }
    let f = |n: &str| dir.0.join(n).to_string_lossy().into_owned();
    let coord = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn(
        "vtox-coord",
        &[
            "serve",
            "--listen",
            &coord,
            "--tls-cert",
            &f("server.pem"),
            "--tls-key",
            &f("server.key"),
            "--tls-client-ca",
            &f("ca.pem"),
        ],
    );
    wait_listening(&coord, Duration::from_secs(10));
    // A certified agent joins over TLS.
    let _good = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "certified",
            "--log-dir",
            dir.path(),
            "--tls-ca",
            &f("ca.pem"),
            "--tls-cert",
            &f("client.pem"),
            "--tls-key",
            &f("client.key"),
        ],
    );
    // One without a client certificate does not get in.
    let _bad = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "uncertified",
            "--log-dir",
            dir.path(),
            "--tls-ca",
            &f("ca.pem"),
        ],
    );
    let tls_cli = [
        "--tls-ca",
        &f("ca.pem"),
        "--tls-cert",
        &f("client.pem"),
        "--tls-key",
        &f("client.key"),
    ];
    let list = || -> Option<serde_json::Value> {
        let mut args = vec!["agents", "--coord", coord.as_str(), "--json"];
        args.extend(tls_cli);
        let out = coord_cmd(&args);
        serde_json::from_slice(&out.stdout).ok()
    };
    wait_for("the certified agent", Duration::from_secs(20), || {
        (list()?["agents"][0]["name"] == "certified").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let names: Vec<String> = list()
        .and_then(|v| v["agents"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|a| a["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names, vec!["certified".to_string()]);
    // A plaintext client fails cleanly, with a hint.
    let out = coord_cmd(&["agents", "--coord", &coord]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-ca") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test]
async fn limits_hold_without_disturbing_joined_agents() {
    use vtox::wire::pb;
    let addr = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn(
        "vtox-coord",
        &[
            "serve",
            "--listen",
            &addr,
            "--max-agents",
            "3",
            "--max-join-rate",
            "20",
            "--max-message-bytes",
            "65536",
        ],
    );
    wait_listening(&addr, Duration::from_secs(10));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel.clone());
    let hw = pb::Hardware {
        logical_cores: 2,
        memory_total_bytes: 1 << 30,
        ..Default::default()
    };
    let join = |name: String, hw: pb::Hardware| pb::JoinRequest {
        name,
        hardware: Some(hw),
        max_vehicles: 0,
        protocol_major: 1,
    };
    // A flood of joins from one client: the rate limit answers "resource exhausted".
    let mut limited = 0;
    for i in 0..60 {
        if let Err(e) = client
            .join(join(format!("flood-{}", i % 2), hw.clone()))
            .await
        {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
            limited += 1;
        }
    }
    assert!(limited >= 30, "{limited} of 60 joins were limited");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // At most 3 agents: a third name fits, a fourth does not.
    assert!(client.join(join("third".into(), hw.clone())).await.is_ok());
    let e = client
        .join(join("fourth".into(), hw.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("--max-agents"));
    // An oversized message is refused with a clear status.
    let big = pb::Hardware {
        hostname: "x".repeat(100_000),
        ..hw.clone()
    };
    let e = client.join(join("third".into(), big)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    // And the coordinator still answers, with the agents it has.
    let mut control = pb::control_service_client::ControlServiceClient::new(channel);
    let agents = control
        .list_agents(pb::ListAgentsRequest {})
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 3);
}
