//! `vtox-coord ramp` against a sink with a known limit: the search for the knee, the verdicts
//! of the generator on a busy host, and the HTML report's table and charts.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// Ramps share two cores: one at a time, so that no ramp judges another's load.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn ramp(
    sink: &str,
    steps: &str,
    out: &std::path::Path,
    extra: &[&str],
) -> (Option<i32>, serde_json::Value) {
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
        .args(extra)
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
fn the_search_finds_the_knee_when_the_first_step_already_fails() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // 150 answers a second: 75 vehicles at 0.5 s. The only planned step, 400, is far above.
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink, "--max-rps", "150"]);
    wait_listening(&sink, Duration::from_secs(10));
    let dir = TempDir::new("ramp");
    let out = dir.0.join("performance_test_report.json");
    let (code, r) = ramp(&sink, "400", &out, &["--search-step-duration", "2s"]);
    assert_eq!(code, Some(99), "{r}");
    let s = &r["test_summary"];
    let max_ok = s["max_successful_vehicles"]
        .as_u64()
        .expect("max_successful_vehicles");
    assert!((68..=82).contains(&max_ok), "within 10% of 75: {r}");
    let limit = s["estimated_system_limit"].as_u64().unwrap_or(0);
    assert!((68..=90).contains(&limit), "{r}");
    assert_eq!(
        r["performance_limits"]["recommended_max_vehicles"],
        (max_ok as f64 * 0.75).floor() as u64
    );
    assert_eq!(r["performance_limits"]["limited_by"], "ingest", "{r}");
    assert_eq!(r["performance_limits"]["ingest_limit_measured"], true);
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps[0]["vehicles"], 400);
    assert_eq!(steps[0]["search"], false);
    assert_eq!(steps[0]["verdict"], "fail");
    assert_eq!(steps[0]["limiting_side"], "ingest");
    assert!(
        steps[0]["failures_by_cause"]["http_503"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{}",
        steps[0]
    );
    assert!(steps[0]["peak_connections"].as_u64().is_some_and(|n| n > 0));
    assert!(steps[0]["ingest_limit_vehicles"].as_u64().is_some());
    let search: Vec<_> = steps.iter().filter(|x| x["search"] == true).collect();
    assert!((3..=9).contains(&search.len()), "{r}");
    assert!(search.iter().any(|x| x["verdict"] == "pass"));
    assert!(r["system_recommendations"].as_array().is_some_and(|l| l
        .iter()
        .all(|x| !x.as_str().unwrap_or("").contains(" 0 vehicles"))));
    for key in [
        "expected_msgs_per_s",
        "achieved_msgs_per_s",
        "success_percent",
        "latency_ms",
        "dropped_ticks",
        "agents",
        "generator_healthy",
        "host_shared",
    ] {
        assert!(steps[0].get(key).is_some(), "step field {key}");
    }
    let html = std::fs::read_to_string(dir.0.join("report.html")).expect("the HTML report");
    assert!(html.contains("<table id=\"verdicts\">") && html.contains("<td>search</td>"));
}

#[test]
fn a_ramp_within_the_limit_exits_0() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink]);
    wait_listening(&sink, Duration::from_secs(10));
    let dir = TempDir::new("ramp-ok");
    let out = dir.0.join("report.json");
    let (code, r) = ramp(&sink, "10,20", &out, &[]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["test_summary"]["max_successful_vehicles"], 20);
    assert_eq!(r["steps"].as_array().map(|l| l.len()), Some(2));
    assert_eq!(r["performance_limits"]["limited_by"], "none");
}

/// The `<figure>` whose chart has this title.
fn figure<'a>(html: &'a str, title: &str) -> &'a str {
    html.split("<figure>")
        .find(|f| f.contains(title))
        .unwrap_or_else(|| panic!("no chart {title:?}"))
}

#[test]
fn a_step_without_successes_has_no_latency_point_and_the_table_says_why() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A backend that refuses everything with 503 (and answers quickly: latencies exist).
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink, "--max-rps", "0"]);
    wait_listening(&sink, Duration::from_secs(10));
    let dir = TempDir::new("ramp-none");
    let out = dir.0.join("report.json");
    let (code, r) = ramp(&sink, "5,10", &out, &["--continue", "--no-search"]);
    assert_eq!(code, Some(99), "{r}");
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    for s in steps {
        assert_eq!(s["success_percent"], 0.0, "{s}");
        assert!(
            s["latency_ms"].is_null(),
            "no latency without a success: {s}"
        );
        assert!(s["failures_by_cause"]["http_503"]
            .as_u64()
            .is_some_and(|n| n > 0));
    }
    let summary = &r["test_summary"];
    assert_eq!(summary["max_successful_vehicles"], 0);
    // Nothing passed and nothing was accepted: the advice says to look, not "0 vehicles".
    let recs = r["system_recommendations"].to_string();
    assert!(recs.contains("check the target"), "{recs}");
    assert!(!recs.contains("at or below 0 vehicles"), "{recs}");

    let html = std::fs::read_to_string(dir.0.join("report.html")).expect("the HTML report");
    let table = &html[html
        .find("<table id=\"verdicts\">")
        .expect("the verdict table")..];
    let table = &table[..table.find("</table>").expect("end of table")];
    assert_eq!(table.matches("<tr class=\"fail\">").count(), 2, "{table}");
    assert!(table.contains("http_503"), "{table}");
    let latency = figure(&html, "Latency percentiles");
    assert!(latency.starts_with("<svg") || latency.contains("<svg"));
    assert_eq!(
        latency.matches("<circle").count(),
        0,
        "no latency point: {latency}"
    );
    let success = figure(&html, "Success rate");
    assert_eq!(success.matches("<circle").count(), 2, "a point per step");
    assert!(figure(&html, "accepted vs expected").contains("accepted"));
}

/// A process that keeps one core busy until dropped (killed with it).
fn hog() -> Proc {
    let child = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start a busy loop");
    Proc {
        child,
        name: "hog".into(),
    }
}

#[test]
fn a_busy_host_is_shared_and_the_generator_judged_on_its_own() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink]);
    wait_listening(&sink, Duration::from_secs(10));
    // Other load on the generator's host, as when the backend runs beside it.
    let _hog = hog();
    let dir = TempDir::new("ramp-hog");
    let out = dir.0.join("report.json");
    let (code, r) = ramp(&sink, "20", &out, &[]);
    assert_eq!(code, Some(0), "{r}");
    let step = &r["steps"][0];
    assert_eq!(step["generator_healthy"], true, "{step}");
    assert_eq!(step["host_shared"], true, "{step}");
    let agent = &step["agents"][0];
    let host = agent["host_cpu_percent"].as_f64().expect("host CPU");
    let sims = agent["simulators_cpu_percent"]
        .as_f64()
        .expect("the simulators' own CPU");
    assert!(host >= 40.0, "a core of two is busy: {agent}");
    assert!(sims < host - 25.0, "{agent}");
    assert_eq!(step["limiting_side"], "none");
}
