//! `vtox-coord ramp` against a sink with a known limit.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn ramp(sink: &str, steps: &str, out: &std::path::Path) -> (Option<i32>, serde_json::Value) {
    let dir = out.parent().expect("a directory");
    let o = Command::new(bin("vtox-coord"))
        .args([
            "ramp",
            "--local",
            "--target",
            &format!("http://{sink}"),
            "--steps",
            steps,
            "--step-duration",
            "3s",
            "--warmup",
            "1s",
            "--interval",
            "0.5s",
            "--out",
        ])
        .arg(out)
        .arg("--html")
        .arg(dir.join("report.html"))
        .arg("--csv")
        .arg(dir.join("ramp"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run ramp");
    let report = std::fs::read(out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    (o.status.code(), report)
}

#[test]
fn the_ramp_finds_the_limit_and_exits_99() {
    // 150 answers a second: 20 vehicles at 0.5 s (40 msg/s) fit, 100 (200 msg/s) do not.
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink, "--max-rps", "150"]);
    wait_listening(&sink, Duration::from_secs(10));
    let dir = TempDir::new("ramp");
    let out = dir.0.join("performance_test_report.json");
    let (code, r) = ramp(&sink, "20,100,200", &out);
    assert_eq!(code, Some(99), "{r}");
    let s = &r["test_summary"];
    assert_eq!(s["max_successful_vehicles"], 20, "{r}");
    // The backend served ~150 msg/s = ~75 vehicles at 0.5 s.
    let limit = s["estimated_system_limit"].as_u64().unwrap_or(0);
    assert!((60..=90).contains(&limit), "{r}");
    assert_eq!(r["performance_limits"]["recommended_max_vehicles"], 15);
    assert!(r["system_recommendations"]
        .as_array()
        .is_some_and(|l| !l.is_empty()));
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "the ramp stops at the first failing step");
    assert_eq!(steps[0]["verdict"], "pass");
    assert_eq!(steps[1]["verdict"], "fail");
    assert_eq!(steps[1]["limiting_side"], "backend");
    for key in [
        "expected_msgs_per_s",
        "achieved_msgs_per_s",
        "success_percent",
        "latency_ms",
        "dropped_ticks",
        "agents",
    ] {
        assert!(steps[1].get(key).is_some(), "step field {key}");
    }
}

#[test]
fn a_ramp_within_the_limit_exits_0() {
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink]);
    wait_listening(&sink, Duration::from_secs(10));
    let dir = TempDir::new("ramp-ok");
    let out = dir.0.join("report.json");
    let (code, r) = ramp(&sink, "10,20", &out);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["test_summary"]["max_successful_vehicles"], 20);
    assert_eq!(r["steps"].as_array().map(|l| l.len()), Some(2));
}
