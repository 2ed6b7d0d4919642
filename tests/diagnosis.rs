//! The whole pipeline judged through Redis: a real redis-server, vtox-sink writing the raw
//! stream, and a diagnosis consumer written for these tests standing in for the backend's
//! analyzers (one consumer group per fault class, a chosen error rate, delay and speed).
//! `vtox-coord score` must report exactly what the consumer did, and a ramp whose consumer is
//! too slow must fail its step as "backlog" while the HTTP side stays healthy.

mod common;

use common::*;
use redis::Value;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vtox::score::ANALYZERS;

const RAW: &str = "motor_raw_data";
const RESULTS: &str = "fault_diagnosis_results";

/// What one analyzer answered, by the class of message: [seen, flagged] for messages carrying
/// its own fault, normal ones and ones carrying another fault.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Answered {
    faulty: [u64; 2],
    normal: [u64; 2],
    other: [u64; 2],
}

struct Behaviour {
    /// Every this-many-th message of each class gets the wrong answer (0: never).
    wrong_every: u64,
    /// A result is written no earlier than this after the message's send time.
    delay: Duration,
    /// Messages per second each group gets through at most.
    max_rate: Option<f64>,
}

/// The stand-in for the backend's diagnosis workers: one thread per analyzer.
struct Consumer {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<Answered>)>,
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => panic!("expected a string, got {other:?}"),
    }
}

/// Entries of an XREADGROUP reply: (ID, fields).
fn read_entries(reply: &Value) -> Vec<(String, BTreeMap<String, String>)> {
    let Value::Array(streams) = reply else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(parts) = s else { continue };
        let Some(Value::Array(entries)) = parts.get(1) else {
            continue;
        };
        for e in entries {
            let Value::Array(e) = e else { continue };
            let id = text(&e[0]);
            let mut fields = BTreeMap::new();
            if let Value::Array(kv) = &e[1] {
                for c in kv.chunks_exact(2) {
                    fields.insert(text(&c[0]), text(&c[1]));
                }
            }
            out.push((id, fields));
        }
    }
    out
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
        * 1e3
}

fn connect(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .expect("redis url")
        .get_connection()
        .expect("connect to redis")
}

/// Creates the five groups before any message arrives, as the backend does at start.
fn create_groups(url: &str) {
    let mut con = connect(url);
    for a in ANALYZERS {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(RAW)
            .arg(format!("{a}_diagnosis"))
            .arg("0")
            .arg("MKSTREAM")
            .query(&mut con)
            .expect("XGROUP CREATE");
    }
}

impl Consumer {
    fn start(url: &str, b: Behaviour) -> Consumer {
        let stop = Arc::new(AtomicBool::new(false));
        let b = Arc::new(b);
        let threads = ANALYZERS
            .iter()
            .map(|analyzer| {
                let (stop, b, url) = (stop.clone(), b.clone(), url.to_string());
                let analyzer = analyzer.to_string();
                let h = std::thread::spawn({
                    let analyzer = analyzer.clone();
                    move || work(&url, &analyzer, &b, &stop)
                });
                (analyzer, h)
            })
            .collect();
        Consumer { stop, threads }
    }

    fn finish(self) -> BTreeMap<String, Answered> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|(a, h)| (a, h.join().expect("consumer thread")))
            .collect()
    }
}

fn work(url: &str, analyzer: &str, b: &Behaviour, stop: &AtomicBool) -> Answered {
    let mut con = connect(url);
    let group = format!("{analyzer}_diagnosis");
    let mut answered = Answered::default();
    let mut next_slot = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&group)
            .arg("worker-1")
            .arg("COUNT")
            .arg(10)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(RAW)
            .arg(">")
            .query(&mut con)
            .expect("XREADGROUP");
        for (id, fields) in read_entries(&reply) {
            let meta: Json = serde_json::from_str(&fields["metadata"]).expect("metadata json");
            let truth = meta["fault_type"].as_str().expect("fault_type").to_string();
            let sent = humantime::parse_rfc3339_weak(meta["sent_at"].as_str().expect("sent_at"))
                .expect("sent_at time")
                .duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_secs_f64()
                * 1e3;
            let class = if truth == analyzer {
                &mut answered.faulty
            } else if truth == "normal" {
                &mut answered.normal
            } else {
                &mut answered.other
            };
            let right = truth == analyzer;
            let wrong = b.wrong_every > 0 && class[0] % b.wrong_every == b.wrong_every - 1;
            let flagged = right != wrong;
            class[0] += 1;
            class[1] += u64::from(flagged);
            if let Some(rate) = b.max_rate {
                next_slot = next_slot.max(Instant::now()) + Duration::from_secs_f64(1.0 / rate);
                std::thread::sleep(next_slot.saturating_duration_since(Instant::now()));
            }
            let due = sent + b.delay.as_secs_f64() * 1e3;
            let now = unix_ms();
            if due > now {
                std::thread::sleep(Duration::from_secs_f64((due - now) / 1e3));
            }
            let _: String = redis::cmd("XADD")
                .arg(RESULTS)
                .arg("*")
                .arg("vehicle_id")
                .arg(&fields["vehicle_id"])
                .arg("fault_type")
                .arg(analyzer)
                .arg("status")
                .arg(if flagged { "warning" } else { "normal" })
                .arg("score")
                .arg(if flagged { "0.8" } else { "0.1" })
                .arg("original_message_id")
                .arg(&id)
                .query(&mut con)
                .expect("XADD result");
            let _: u64 = redis::cmd("XACK")
                .arg(RAW)
                .arg(&group)
                .arg(&id)
                .query(&mut con)
                .expect("XACK");
        }
    }
    answered
}

/// True when every group has read and acknowledged every raw entry.
fn drained(url: &str) -> bool {
    let mut con = connect(url);
    let groups: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(RAW)
        .query(&mut con)
        .expect("XINFO GROUPS");
    let parsed = vtox::backlog::parse_groups(&groups);
    parsed.len() == 5 && parsed.iter().all(|g| g.pending == 0 && g.lag == Some(0))
}

fn score(url: &str, extra: &[&str]) -> (Option<i32>, Json, String) {
    let out = Command::new(bin("vtox-coord"))
        .args(["score", "--redis", url, "--json"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run vtox-coord score");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (
        out.status.code(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Redis with the five groups, and a sink writing the raw stream into it.
struct Backend {
    redis: RedisServer,
    sink: String,
    /// The URL vtox gets: a user that may only read, so that any write would fail the test.
    read_only: String,
    _sink_proc: Proc,
}

impl Backend {
    fn start() -> Option<Backend> {
        let redis = RedisServer::start_or_skip()?;
        create_groups(&redis.url());
        let _: () = redis::cmd("ACL")
            .arg(&[
                "SETUSER",
                "vtox",
                "on",
                ">read-only",
                "~*",
                "+@read",
                "+@connection",
                "+time",
            ])
            .query(&mut connect(&redis.url()))
            .expect("ACL SETUSER");
        let read_only = format!("redis://vtox:read-only@{}", redis.addr());
        let sink = format!("127.0.0.1:{}", free_port());
        let proc = Proc::spawn("vtox-sink", &["--listen", &sink, "--redis", &redis.url()]);
        wait_listening(&sink, Duration::from_secs(10));
        Some(Backend {
            redis,
            sink,
            read_only,
            _sink_proc: proc,
        })
    }
}

#[test]
fn score_reports_exactly_what_the_diagnosis_did() {
    let Some(backend) = Backend::start() else {
        return;
    };
    let (url, sink) = (backend.redis.url(), backend.sink.clone());
    let read_only = backend.read_only.clone();
    // 10% wrong answers, results no earlier than 300 ms after sending.
    let consumer = Consumer::start(
        &url,
        Behaviour {
            wrong_every: 10,
            delay: Duration::from_millis(300),
            max_rate: None,
        },
    );
    // A run that started 400 s ago, so that every planned fault has its onset behind it.
    let run_start = format!("{:.3}", unix_ms() / 1e3 - 400.0);
    let mut sim = Proc::spawn(
        "vtox-sim",
        &[
            "--vehicles",
            "40",
            "--target",
            &format!("http://{sink}"),
            "--interval",
            "0.5s",
            "--faults",
            "turn_fault=15,insulation=15,bearing=15,eccentricity=15,broken_bar=15",
            "--run-start",
            &run_start,
            "--duration",
            "4s",
        ],
    );
    let status = sim
        .wait_timeout(Duration::from_secs(30))
        .expect("the simulator ends after its duration");
    assert!(status.success());
    wait_for(
        "the consumer to finish every message",
        Duration::from_secs(30),
        || drained(&url).then_some(()),
    );
    let answered = consumer.finish();

    let (code, s, err) = score(&read_only, &[]);
    assert_eq!(code, Some(0), "{err}");
    let total: u64 = answered
        .values()
        .map(|a| a.faulty[0] + a.normal[0] + a.other[0])
        .sum();
    assert!(total >= 5 * 250, "{total} results");
    assert_eq!(s["results"], total, "{s}");
    assert_eq!(s["joined"], total, "{s}");
    assert_eq!(s["raw_trimmed"], 0);
    assert_eq!(s["unreadable"], 0);
    let mut faults_seen = 0;
    for (analyzer, a) in &answered {
        let got = &s["analyzers"][analyzer];
        assert_eq!(got["faulty"]["seen"], a.faulty[0], "{analyzer}: {got}");
        assert_eq!(got["faulty"]["flagged"], a.faulty[1], "{analyzer}: {got}");
        assert_eq!(got["normal"]["seen"], a.normal[0], "{analyzer}: {got}");
        assert_eq!(got["normal"]["flagged"], a.normal[1], "{analyzer}: {got}");
        assert_eq!(got["other_faults"]["seen"], a.other[0], "{analyzer}: {got}");
        assert_eq!(
            got["other_faults"]["flagged"], a.other[1],
            "{analyzer}: {got}"
        );
        faults_seen += a.faulty[0];
        // The chosen accuracy: one answer in ten is wrong in each class.
        let fp = got["false_positive_percent"]
            .as_f64()
            .expect("normal messages");
        assert!((5.0..=10.5).contains(&fp), "{analyzer}: {got}");
        let lag = &got["lag_ms"];
        let p50 = lag["p50"].as_f64().expect("p50");
        assert!((300.0..=700.0).contains(&p50), "{analyzer}: lag {lag}");
        assert!(lag["max"].as_f64().is_some_and(|m| m >= 300.0), "{lag}");
    }
    assert!(faults_seen > 100, "the fleet carried faults: {faults_seen}");

    // Trim the raw stream exactly below its 51st entry: those results can no longer be
    // joined and are counted as trimmed, not guessed.
    let mut con = connect(&url);
    let ids: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(RAW)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(51)
        .query(&mut con)
        .expect("XRANGE");
    let cut = &ids[50].0;
    let _: u64 = redis::cmd("XTRIM")
        .arg(RAW)
        .arg("MINID")
        .arg(cut)
        .query(&mut con)
        .expect("XTRIM");
    let (_, s, _) = score(&read_only, &["--since", "1h"]);
    assert_eq!(s["results"], total);
    assert_eq!(s["raw_trimmed"], 5 * 50, "{s}");
    assert_eq!(s["joined"], total - 5 * 50);

    // `run --redis` ends with the backlog and a score of the diagnoses of this run only.
    let consumer = Consumer::start(
        &url,
        Behaviour {
            wrong_every: 0,
            delay: Duration::ZERO,
            max_rate: None,
        },
    );
    let o = Command::new(bin("vtox-coord"))
        .args([
            "run",
            "20",
            "--local",
            "--target",
            &format!("http://{sink}"),
            "--redis",
            &read_only,
            "--duration",
            "3s",
            "--interval",
            "0.5s",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run --redis");
    let _ = consumer.finish();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Json = serde_json::from_slice(&o.stdout).expect("run --json");
    let accepted = r["totals"]["accepted"].as_u64().expect("accepted");
    let results = r["diagnosis"]["results"].as_u64().expect("a score");
    assert!(
        results > 0 && results <= 5 * accepted,
        "{results} results for {accepted} messages: {}",
        r["diagnosis"]
    );
    assert_eq!(r["diagnosis"]["unreadable"], 0);
    assert_eq!(
        r["backend_pipeline"]["groups"].as_array().map(Vec::len),
        Some(5),
        "{}",
        r["backend_pipeline"]
    );

    // Without --redis there is nothing to score: a usage error.
    let o = Command::new(bin("vtox-coord"))
        .arg("score")
        .output()
        .expect("score");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--redis"));

    // A Redis nobody listens on is an error that names it.
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let (code, _, err) = score(&dead, &[]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("127.0.0.1") && err.starts_with("error:"),
        "{err}"
    );
}

#[test]
fn a_slow_diagnosis_fails_its_ramp_step_as_backlog() {
    let Some(backend) = Backend::start() else {
        return;
    };
    let (url, sink) = (backend.redis.url(), backend.sink.clone());
    // Each analyzer gets through 60 messages a second: 10 vehicles at 0.5 s (20 msg/s) fit,
    // 60 vehicles (120 msg/s) do not.
    let consumer = Consumer::start(
        &url,
        Behaviour {
            wrong_every: 0,
            delay: Duration::ZERO,
            max_rate: Some(60.0),
        },
    );
    let coord = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn("vtox-coord", &["serve", "--listen", &coord]);
    wait_listening(&coord, Duration::from_secs(10));
    let logs = TempDir::new("backlog");
    let _agent = Proc::spawn("vtox-agent", &["--join", &coord, "--log-dir", logs.path()]);
    let coord_url = format!("http://{coord}");
    let out = logs.0.join("report.json");
    let mut ramp = Command::new(bin("vtox-coord"));
    ramp.args([
        "ramp",
        "--coord",
        &coord_url,
        "--target",
        &format!("http://{sink}"),
        "--redis",
        &backend.read_only,
        "--steps",
        "10,60",
        "--no-search",
        "--step-duration",
        "6s",
        "--warmup",
        "2s",
        "--interval",
        "0.5s",
        "--out",
    ])
    .arg(&out)
    .arg("--html")
    .arg(logs.0.join("report.html"))
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let ramp = ramp.spawn().expect("start the ramp");

    // Meanwhile `status --redis` sees the backlog of the second step grow.
    let growing = wait_for(
        "status --redis to show a growing backlog",
        Duration::from_secs(60),
        || {
            let o = Command::new(bin("vtox-coord"))
                .args([
                    "status",
                    "--coord",
                    &coord_url,
                    "--redis",
                    &backend.read_only,
                    "--json",
                ])
                .stdin(Stdio::null())
                .output()
                .ok()?;
            let s: Json = serde_json::from_slice(&o.stdout).ok()?;
            let groups = s["backend_pipeline"]["groups"].as_array()?.clone();
            let all_growing = groups.len() == 5
                && groups
                    .iter()
                    .all(|g| g["backlog_slope_per_s"].as_f64().is_some_and(|x| x > 20.0));
            all_growing.then_some(s)
        },
    );
    assert_eq!(growing["state"], "running", "{growing}");
    let o = ramp.wait_with_output().expect("the ramp ends");
    let _ = consumer.finish();
    let r: Json = std::fs::read(&out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(99), "{err}\n{r}");
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{r}");
    assert_eq!(steps[0]["verdict"], "pass", "{}", steps[0]);
    let fail = &steps[1];
    assert_eq!(fail["verdict"], "fail");
    // Only the diagnosis fell behind: the ingest API answered everything, quickly.
    assert_eq!(fail["failed_as"], serde_json::json!(["backlog"]), "{fail}");
    assert_eq!(fail["success_percent"], 100.0, "{fail}");
    let p = &fail["backend_pipeline"];
    let ingest = p["ingest_msgs_per_s"].as_f64().expect("ingest rate");
    assert!((100.0..=140.0).contains(&ingest), "{p}");
    let behind = p["falling_behind"].as_array().expect("falling_behind");
    assert_eq!(behind.len(), 5, "{p}");
    for g in p["groups"].as_array().expect("groups") {
        let done = g["processed_msgs_per_s"].as_f64().expect("processed rate");
        assert!((45.0..=75.0).contains(&done), "{g}");
        let slope = g["backlog_slope_per_s"].as_f64().expect("slope");
        assert!(slope > 30.0, "{g}");
    }
    assert!(
        r["system_recommendations"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x
                .as_str()
                .is_some_and(|t| t.contains("diagnosis consumers fell behind")))),
        "{r}"
    );
    let html = std::fs::read_to_string(logs.0.join("report.html")).expect("the HTML report");
    assert_eq!(
        html.matches("<svg").count(),
        5,
        "throughput, latency, delay, success and a fifth chart for the diagnosis"
    );
    assert!(html.contains("slowest live consumer group"));
    let ok = &steps[0]["backend_pipeline"];
    assert_eq!(ok["falling_behind"], serde_json::json!([]), "{ok}");
    assert!(
        r["diagnosis"]["results"].as_u64().is_some_and(|n| n > 0),
        "the ramp ends with a score: {}",
        r["diagnosis"]
    );
}

/// One consumer group read by one consumer at most `rate` entries a second; counts what it
/// was delivered.
struct SlowGroup {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl SlowGroup {
    fn start(url: &str, group: &str, rate: f64) -> SlowGroup {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, group, flag) = (url.to_string(), group.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut con = connect(&url);
            let mut delivered = 0u64;
            let mut next_slot = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                let reply: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&group)
                    .arg("slow-worker")
                    .arg("COUNT")
                    .arg(5)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(RAW)
                    .arg(">")
                    .query(&mut con)
                    .expect("XREADGROUP");
                for (id, _) in read_entries(&reply) {
                    delivered += 1;
                    next_slot = next_slot.max(Instant::now()) + Duration::from_secs_f64(1.0 / rate);
                    std::thread::sleep(next_slot.saturating_duration_since(Instant::now()));
                    let _: u64 = redis::cmd("XACK")
                        .arg(RAW)
                        .arg(&group)
                        .arg(&id)
                        .query(&mut con)
                        .expect("XACK");
                }
            }
            delivered
        });
        SlowGroup { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("consumer thread")
    }
}

fn xinfo_stream(url: &str) -> (u64, u64) {
    let mut con = connect(url);
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(RAW)
        .query(&mut con)
        .expect("XINFO STREAM");
    let p = vtox::backlog::pairs(&info);
    let get = |k: &str| {
        p.iter()
            .find(|(key, _)| key == k)
            .and_then(|(_, v)| vtox::backlog::number(v))
            .expect("a counter")
    };
    (get("entries-added"), get("length"))
}

#[test]
fn idle_groups_are_never_judged_and_a_slow_group_sets_the_diagnosis_limit_and_loses_to_maxlen() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let url = redis.url();
    let mut con = connect(&url);
    // As the backend does: groups on the raw stream, one of which nothing ever reads.
    for g in ["performance_monitor_group", "bearing_diagnosis"] {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(RAW)
            .arg(g)
            .arg("0")
            .arg("MKSTREAM")
            .query(&mut con)
            .expect("XGROUP CREATE");
    }
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "vtox",
            "on",
            ">ro",
            "~*",
            "+@read",
            "+@connection",
            "+time",
        ])
        .query(&mut con)
        .expect("ACL SETUSER");
    let read_only = format!("redis://vtox:ro@{}", redis.addr());
    // A stream short enough that the slow group falls off it during the failing step.
    let sink = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn(
        "vtox-sink",
        &["--listen", &sink, "--redis", &url, "--maxlen", "300"],
    );
    wait_listening(&sink, Duration::from_secs(10));
    // R = 20 msg/s: 10 vehicles at 0.5 s.
    let slow = SlowGroup::start(&url, "bearing_diagnosis", 20.0);
    let coord = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn("vtox-coord", &["serve", "--listen", &coord]);
    wait_listening(&coord, Duration::from_secs(10));
    let logs = TempDir::new("lost");
    let _agent = Proc::spawn("vtox-agent", &["--join", &coord, "--log-dir", logs.path()]);
    let coord_url = format!("http://{coord}");
    let out = logs.0.join("report.json");
    let o = Command::new(bin("vtox-coord"))
        .args([
            "ramp",
            "--coord",
            &coord_url,
            "--target",
            &format!("http://{sink}"),
            "--redis",
            &read_only,
            "--steps",
            "4,30",
            "--no-search",
            "--step-duration",
            "8s",
            "--warmup",
            "2s",
            "--interval",
            "0.5s",
            "--out",
        ])
        .arg(&out)
        .arg("--html")
        .arg(logs.0.join("report.html"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run the ramp");
    let delivered = slow.finish();
    let r: Json = std::fs::read(&out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(99), "{err}\n{r}");
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{r}");
    // The idle group read nothing while MAXLEN trimmed past it: listed, never judged.
    let first = &steps[0];
    assert_eq!(first["verdict"], "pass", "{first}");
    let p = &first["backend_pipeline"];
    assert_eq!(
        p["idle_groups"][0]["name"], "performance_monitor_group",
        "{p}"
    );
    assert_eq!(p["groups"].as_array().map(Vec::len), Some(1), "{p}");
    assert_eq!(p["groups"][0]["name"], "bearing_diagnosis");
    assert_eq!(
        r["idle_groups"],
        serde_json::json!(["performance_monitor_group"])
    );
    // The first step whose ingest (60 msg/s) exceeds R fails on the diagnosis only.
    let fail = &steps[1];
    assert_eq!(fail["verdict"], "fail", "{fail}");
    assert_eq!(fail["success_percent"], 100.0, "{fail}");
    assert_eq!(fail["limiting_side"], "diagnosis", "{fail}");
    let failed_as = fail["failed_as"].as_array().expect("failed_as");
    assert!(failed_as.contains(&serde_json::json!("lost")), "{fail}");
    let g = &fail["backend_pipeline"]["groups"][0];
    let done = g["processed_msgs_per_s"].as_f64().expect("processed rate");
    assert!(
        (17.0..=23.0).contains(&done),
        "trimmed entries are not processing: {g}"
    );
    assert!(
        g["trimmed_unread_in_window"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{g}"
    );
    assert!(
        g["backlog_end"].as_u64().is_some_and(|b| b <= 400),
        "a backlog never exceeds the stream: {g}"
    );
    let limit = r["performance_limits"]["diagnosis_limit_vehicles"]
        .as_u64()
        .expect("a diagnosis limit");
    assert!((9..=11).contains(&limit), "R × interval = 10: {r}");
    assert_eq!(r["performance_limits"]["limited_by"], "diagnosis");
    assert_eq!(r["test_summary"]["estimated_system_limit"], limit.max(4));
    assert!(
        r["messages_never_diagnosed"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{r}"
    );
    let recs = r["system_recommendations"].to_string();
    assert!(
        recs.contains("bearing_diagnosis") && recs.contains("never") || recs.contains("trimmed"),
        "{recs}"
    );

    // The consumer has stopped; more messages push the stream's head past what it read, so
    // everything it did not get is gone. vtox must count exactly that, by its own arithmetic.
    for i in 0..400 {
        let _: String = redis::cmd("XADD")
            .arg(RAW)
            .arg("MAXLEN")
            .arg(50)
            .arg("*")
            .arg("n")
            .arg(i)
            .query(&mut con)
            .expect("XADD");
    }
    let (added, len) = xinfo_stream(&url);
    let accepted = get_json(&sink, "/stats").expect("sink stats")["accepted"]
        .as_u64()
        .expect("accepted");
    assert_eq!(added, accepted + 400, "every message reached the stream");
    let exact = added - len - delivered;
    let o = Command::new(bin("vtox-coord"))
        .args([
            "status", "--coord", &coord_url, "--redis", &read_only, "--json",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("status --redis");
    let s: Json = serde_json::from_slice(&o.stdout).expect("status --json");
    let g = &s["backend_pipeline"]["groups"][0];
    assert_eq!(g["name"], "bearing_diagnosis", "{s}");
    assert_eq!(g["trimmed_unread"], exact, "{g}");
    assert_eq!(g["processed_msgs_per_s"], 0.0, "{g}");
    assert_eq!(
        s["backend_pipeline"]["idle_groups"][0]["name"],
        "performance_monitor_group"
    );
}
