//! A fleet across hosts: the test builds its own network namespaces (a coordinator host and
//! two agent hosts joined by veth pairs, with addresses of its own), runs a fleet across them,
//! cuts one agent's link and checks that its vehicles move. It needs root; where namespaces
//! cannot be made it says so and skips.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The test's own namespaces, removed (with their veths) on drop.
struct Net {
    names: Vec<String>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Coordinator host `c` (10.77.0.1 on its loopback) routes to agent hosts `a` (10.77.1.0/24)
/// and `b` (10.77.2.0/24).
fn build(tag: &str) -> Result<Net, String> {
    let c = format!("vtox-c-{tag}");
    let a = format!("vtox-a-{tag}");
    let b = format!("vtox-b-{tag}");
    let mut net = Net { names: Vec::new() };
    for n in [&c, &a, &b] {
        sh(&["ip", "netns", "add", n])?;
        net.names.push(n.clone());
        sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
    }
    sh(&["ip", "-n", &c, "addr", "add", "10.77.0.1/32", "dev", "lo"])?;
    for (host, subnet, veth) in [(&a, 1, "va"), (&b, 2, "vb")] {
        let (outer, inner) = (format!("{veth}c{tag}"), format!("{veth}h{tag}"));
        let (outer, inner) = (&outer[..outer.len().min(15)], &inner[..inner.len().min(15)]);
        sh(&[
            "ip", "link", "add", outer, "netns", &c, "type", "veth", "peer", "name", inner,
            "netns", host,
        ])?;
        sh(&[
            "ip",
            "-n",
            &c,
            "addr",
            "add",
            &format!("10.77.{subnet}.1/24"),
            "dev",
            outer,
        ])?;
        sh(&[
            "ip",
            "-n",
            host,
            "addr",
            "add",
            &format!("10.77.{subnet}.2/24"),
            "dev",
            inner,
        ])?;
        sh(&["ip", "-n", &c, "link", "set", outer, "up"])?;
        sh(&["ip", "-n", host, "link", "set", inner, "up"])?;
        sh(&[
            "ip",
            "-n",
            host,
            "route",
            "add",
            "10.77.0.1/32",
            "via",
            &format!("10.77.{subnet}.1"),
        ])?;
    }
    Ok(net)
}

fn in_ns(ns: &str, bin_name: &str, args: &[&str]) -> Proc {
    let mut all: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        ns.into(),
        bin(bin_name).to_string_lossy().into_owned(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    let child = Command::new("ip")
        .args(&all)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} {bin_name}: {e}"));
    Proc {
        child,
        name: bin_name.to_string(),
    }
}

/// GET over HTTP from inside a namespace.
fn get_in(ns: &str, url: &str) -> Option<serde_json::Value> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-fsS", "--max-time", "5", url])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn counts(ns: &str, sink: &str) -> BTreeMap<String, u64> {
    get_in(ns, &format!("http://{sink}/stats/vehicles"))
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| Some((v["vehicle_id"].as_str()?.to_string(), v["count"].as_u64()?)))
        .collect()
}

#[test]
fn a_fleet_across_namespaces_survives_a_cut_link() {
    let tag = format!("{}", std::process::id() % 100_000);
    let net = match build(&tag) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIPPED: cannot build network namespaces here ({e}); this test needs root and iproute2");
            return;
        }
    };
    if Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("SKIPPED: curl is missing");
        return;
    }
    let (c, a, b) = (&net.names[0], &net.names[1], &net.names[2]);
    let sink = "10.77.0.1:18000";
    let coord = "10.77.0.1:15051";
    // A coordinator beyond loopback refuses to start without a token, as on a real network.
    let secrets = TempDir::new("netns-token");
    let token = format!("{}/token", secrets.path());
    std::fs::write(&token, "netns-shared-token\n").expect("write the token file");
    let _sink = in_ns(c, "vtox-sink", &["--listen", sink]);
    let _coord = in_ns(
        c,
        "vtox-coord",
        &[
            "serve",
            "--token-file",
            &token,
            "--listen",
            coord,
            "--lease",
            "2s",
            "--grace",
            "2s",
            "--heartbeat",
            "500ms",
        ],
    );
    wait_for(
        "the sink inside its namespace",
        Duration::from_secs(15),
        || get_in(c, &format!("http://{sink}/healthz")),
    );
    let logs = TempDir::new("netns");
    let _agent_a = in_ns(
        a,
        "vtox-agent",
        &[
            "--join",
            coord,
            "--name",
            "host-a",
            "--token-file",
            &token,
            "--max-vehicles",
            "150",
            "--log-dir",
            logs.path(),
        ],
    );
    let _agent_b = in_ns(
        b,
        "vtox-agent",
        &[
            "--join",
            coord,
            "--name",
            "host-b",
            "--token-file",
            &token,
            "--max-vehicles",
            "300",
            "--log-dir",
            logs.path(),
        ],
    );
    let coord_url = format!("http://{coord}");
    let _run = in_ns(
        c,
        "vtox-coord",
        &[
            "run",
            "200",
            "--token-file",
            &token,
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
    );
    wait_for(
        "all 200 vehicles sending from both hosts",
        Duration::from_secs(40),
        || (counts(c, sink).len() == 200).then_some(()),
    );

    // Cut host-a's only link.
    let veth = format!("vah{tag}");
    sh(&[
        "ip",
        "-n",
        a,
        "link",
        "set",
        &veth[..veth.len().min(15)],
        "down",
    ])
    .expect("cut the link");
    let before = counts(c, sink);
    wait_for(
        "every vehicle sending again from host-b",
        Duration::from_secs(25),
        || {
            let now = counts(c, sink);
            before
                .iter()
                .all(|(id, n)| now.get(id).is_some_and(|m| m > n))
                .then_some(())
        },
    );
    let stats = get_in(c, &format!("http://{sink}/stats")).expect("stats");
    assert_eq!(stats["conflicts"], 0, "{stats}");
    assert_eq!(stats["vehicles"], 200);
    let out = Command::new("ip")
        .args(["netns", "exec", c])
        .arg(bin("vtox-coord"))
        .args([
            "status",
            "--coord",
            &coord_url,
            "--json",
            "--token-file",
            &token,
        ])
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let hb = status["agents"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["name"] == "host-b").cloned())
        .expect("host-b");
    assert_eq!(hb["vehicles"], 200, "{status}");
}
