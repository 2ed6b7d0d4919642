//! Integration tests for vtox-sink: the real binary on loopback, driven over HTTP, and a real redis-server for the XADD contract.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, get_json, http, wait_for, wait_listening, Proc, RedisServer};
use serde_json::Value;

const VALID: &str = r#"{"sensor_data": {"data": [{"时间": 1764320000.02, "Ia": 9.81, "Ib": -4.12, "Ic": -5.69, "振动_X": 0.12, "振动_Y": 0.10, "振动_Z": 0.08, "温度": 45.2, "转速": 1450}], "sampling_rate": 50, "batch_size": 10, "fault_type": "normal", "fault_severity": 0.0, "timestamp": "2026-11-28T09:00:00.123456"}, "metadata": {"vehicle_id": "粤B·SEAL·202400000", "model": "SEAL", "agent": "host-a", "instance": 0, "seq": 17, "fault_type": "normal", "fault_severity": 0.0, "sent_at": "2026-11-28T09:00:00.124001Z"}}"#;
const VID: &str = "粤B·SEAL·202400000";
const VID_ENC: &str = "%E7%B2%A4B%C2%B7SEAL%C2%B7202400000";
const JSON: (&str, &str) = ("Content-Type", "application/json");
const START: Duration = Duration::from_secs(15);

fn sim_path(vid_enc: &str) -> String {
    format!("/api/v1/diagnosis-stream/simulator/vehicles/{vid_enc}/data?location=%E6%B7%B1%E5%9C%B3%E7%A6%8F%E7%94%B0%E5%8C%BA")
}

fn auth_path(vid_enc: &str) -> String {
    format!("/api/v1/diagnosis-stream/vehicles/{vid_enc}/data")
}

/// Starts vtox-sink on a free loopback port with extra args; returns it and its address.
fn start_sink(extra: &[&str]) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--listen", addr.as_str()];
    args.extend_from_slice(extra);
    let p = Proc::spawn("vtox-sink", &args);
    wait_listening(&addr, START);
    (p, addr)
}

fn post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let (status, text) = http("POST", addr, path, headers, body.as_bytes())
        .unwrap_or_else(|| panic!("POST {path} to {addr} failed"));
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

fn stats(addr: &str) -> Value {
    get_json(addr, "/stats").expect("GET /stats")
}

fn message(agent: &str, instance: u32, seq: u64) -> String {
    format!(
        r#"{{"sensor_data": {{"data": [{{"Ia": 1.0}}], "fault_type": "bearing"}}, "metadata": {{"vehicle_id": "{VID}", "agent": "{agent}", "instance": {instance}, "seq": {seq}, "fault_type": "bearing"}}}}"#
    )
}

#[test]
fn valid_body_is_accepted_and_counted() {
    let (_sink, addr) = start_sink(&[]);
    assert_eq!(
        http("GET", &addr, "/healthz", &[], b"").map(|r| r.0),
        Some(200)
    );

    let (status, body) = post(&addr, &sim_path(VID_ENC), &[JSON], VALID);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "success");
    assert_eq!(body["message"], "data received");
    assert_eq!(body["vehicle_id"], VID);
    assert_eq!(body["stream_id"], Value::Null);
    let ts = body["timestamp"].as_str().expect("timestamp");
    assert!(ts.len() >= 20 && ts.as_bytes()[10] == b'T', "{ts}");

    // No Content-Type at all is parsed as JSON too, as FastAPI does.
    let (status, _) = post(
        &addr,
        &sim_path("v-2"),
        &[],
        r#"{"sensor_data": {"data": []}}"#,
    );
    assert_eq!(status, 200);

    let s = stats(&addr);
    assert_eq!(s["accepted"], 2);
    assert_eq!(s["rejected"], 0);
    assert_eq!(s["vehicles"], 2);
    assert_eq!(s["bytes"], (VALID.len() + 29) as u64);
    assert_eq!(s["points"], 1);
    assert_eq!(s["faults"], serde_json::json!({"normal": 1}));
    assert_eq!(s["without_metadata"], 1);
    assert_eq!(s["vehicle_id_mismatches"], 0);
    assert_eq!(s["redis_errors"], 0);
    assert!(s["uptime_s"].as_f64().is_some());

    let vehicles = get_json(&addr, "/stats/vehicles").expect("GET /stats/vehicles");
    let list = vehicles.as_array().expect("a list");
    assert_eq!(list.len(), 2);
    let v = list
        .iter()
        .find(|v| v["vehicle_id"] == VID)
        .expect("the vehicle");
    assert_eq!(v["count"], 1);
    assert_eq!(v["max_seq"], 17);
    assert_eq!(v["agent"], "host-a");
    assert_eq!(v["instance"], 0);

    let (status, _) = post(&addr, "/stats/reset", &[], "");
    assert_eq!(status, 200);
    assert_eq!(stats(&addr)["accepted"], 0);

    let (status, body) = post(&addr, "/api/v1/nope", &[JSON], VALID);
    assert_eq!(
        (status, body),
        (404, serde_json::json!({"detail": "Not Found"}))
    );
}

#[test]
fn invalid_bodies_are_422_with_detail() {
    let (_sink, addr) = start_sink(&[]);
    let cases: &[(&str, Value, &str)] = &[
        (
            r#"{"metadata": {}}"#,
            serde_json::json!(["body", "sensor_data"]),
            "missing",
        ),
        (
            r#"{"sensor_data": {"data": {"Ia": 1}}}"#,
            serde_json::json!(["body", "sensor_data", "data"]),
            "list_type",
        ),
        (
            r#"{"sensor_data": {"samples": []}}"#,
            serde_json::json!(["body", "sensor_data", "data"]),
            "missing",
        ),
        (
            r#"{"sensor_data": "x"}"#,
            serde_json::json!(["body", "sensor_data"]),
            "dict_type",
        ),
        (
            r#"[{"sensor_data": {"data": []}}]"#,
            serde_json::json!(["body"]),
            "model_attributes_type",
        ),
        (
            r#"{"sensor_data": {"data": [1,]}}"#,
            serde_json::json!(["body", 28]),
            "json_invalid",
        ),
        ("", serde_json::json!(["body", 0]), "json_invalid"),
    ];
    for (body, loc, kind) in cases {
        let (status, resp) = post(&addr, &sim_path(VID_ENC), &[JSON], body);
        assert_eq!(status, 422, "{body}: {resp}");
        let first = &resp["detail"][0];
        assert_eq!(&first["loc"], loc, "{body}: {resp}");
        assert_eq!(first["type"], *kind, "{body}: {resp}");
        assert!(first["msg"].is_string(), "{body}: {resp}");
    }
    // A form-encoded body is not JSON to FastAPI, whatever it contains.
    let (status, resp) = post(
        &addr,
        &sim_path(VID_ENC),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        VALID,
    );
    assert_eq!(status, 422, "{resp}");
    assert_eq!(resp["detail"][0]["type"], "model_attributes_type");

    let s = stats(&addr);
    assert_eq!(s["rejected"], cases.len() as u64 + 1);
    assert_eq!(s["accepted"], 0);
    assert_eq!(s["vehicles"], 0);
}

#[test]
fn authenticated_route_checks_the_bearer() {
    let (_sink, addr) = start_sink(&["--token", "s3cret"]);
    let path = auth_path(VID_ENC);

    let (status, body) = post(&addr, &path, &[JSON], VALID);
    assert_eq!(status, 401);
    assert!(body["detail"].is_string(), "{body}");
    let (status, body) = post(
        &addr,
        &path,
        &[JSON, ("Authorization", "Bearer s3cres")],
        VALID,
    );
    assert_eq!(status, 401);
    assert!(body["detail"].is_string(), "{body}");
    let (status, _) = post(
        &addr,
        &path,
        &[JSON, ("Authorization", "Basic s3cret")],
        VALID,
    );
    assert_eq!(status, 401);
    let (status, body) = post(
        &addr,
        &path,
        &[JSON, ("Authorization", "Bearer s3cret")],
        VALID,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["vehicle_id"], VID);
    // The simulator route stays open.
    assert_eq!(post(&addr, &sim_path(VID_ENC), &[JSON], VALID).0, 200);

    let s = stats(&addr);
    assert_eq!(
        (s["accepted"].as_u64(), s["unauthorized"].as_u64()),
        (Some(2), Some(3))
    );
    // The second message repeats seq 17 of the same vehicle.
    assert_eq!(s["duplicates"], 1);
}

#[test]
fn token_from_env_and_any_bearer_without_token() {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(common::bin("vtox-sink"))
        .args(["--listen", &addr])
        .env("VTOX_SINK_TOKEN", "from-env")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn vtox-sink");
    let env_sink = Proc {
        child,
        name: "vtox-sink".into(),
    };
    wait_listening(&addr, START);
    let path = auth_path("v1");
    assert_eq!(
        post(&addr, &path, &[("Authorization", "Bearer nope")], VALID).0,
        401
    );
    assert_eq!(
        post(&addr, &path, &[("Authorization", "Bearer from-env")], VALID).0,
        200
    );
    drop(env_sink);

    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(common::bin("vtox-sink"))
        .args(["--listen", &addr])
        .env_remove("VTOX_SINK_TOKEN")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn vtox-sink");
    let _open = Proc {
        child,
        name: "vtox-sink".into(),
    };
    wait_listening(&addr, START);
    assert_eq!(post(&addr, &path, &[], VALID).0, 401);
    assert_eq!(
        post(&addr, &path, &[("Authorization", "Bearer anything")], VALID).0,
        200
    );
}

#[test]
fn duplicates_and_conflicts_are_counted() {
    let (_sink, addr) = start_sink(&[]);
    let path = sim_path(VID_ENC);
    for (agent, instance, seq) in [
        ("a", 0, 0),
        ("a", 0, 1),
        ("a", 0, 1),
        ("b", 4, 2),
        ("b", 4, 3),
    ] {
        let (status, body) = post(&addr, &path, &[JSON], &message(agent, instance, seq));
        assert_eq!(status, 200, "{body}");
    }
    let s = stats(&addr);
    assert_eq!(s["accepted"], 5);
    assert_eq!(s["duplicates"], 1);
    // a/0 then b/4 within milliseconds: one vehicle driven from two places.
    assert_eq!(s["conflicts"], 1);
    assert_eq!(s["gaps"], 0);
    assert_eq!(s["faults"], serde_json::json!({"bearing": 5}));
    let v = get_json(&addr, "/stats/vehicles").expect("vehicles");
    assert_eq!(v[0]["duplicates"], 1);
    assert_eq!(v[0]["conflicts"], 1);
    assert_eq!(v[0]["agent"], "b");
    assert_eq!(v[0]["instance"], 4);
}

#[test]
fn delay_holds_every_answer() {
    let (_sink, addr) = start_sink(&["--delay", "400ms"]);
    let t = Instant::now();
    assert_eq!(post(&addr, &sim_path("v"), &[JSON], VALID).0, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert_eq!(post(&addr, &sim_path("v"), &[JSON], "{").0, 422);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    // Stats are not an ingest answer and stay fast.
    let t = Instant::now();
    stats(&addr);
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn sigterm_and_sigint_exit_zero() {
    for sig in [15, 2] {
        let (mut sink, addr) = start_sink(&[]);
        assert_eq!(post(&addr, &sim_path("v"), &[JSON], VALID).0, 200);
        sink.signal(sig);
        let st = sink
            .wait_timeout(Duration::from_secs(10))
            .expect("sink exits on signal");
        assert_eq!(st.code(), Some(0), "signal {sig}");
    }
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["--listen", "not-an-address"][..],
        &["--redis", "http://127.0.0.1:6379"][..],
        &["--delay", "soon"][..],
    ] {
        let out = Command::new(common::bin("vtox-sink"))
            .args(args)
            .output()
            .expect("run vtox-sink");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}

#[test]
fn redis_entries_match_the_backend_contract() {
    let Some(mut redis) = RedisServer::start_or_skip() else {
        return;
    };
    let url = redis.url();
    let (_sink, addr) = start_sink(&["--redis", &url, "--stream", "test_raw", "--maxlen", "1000"]);

    let (status, body) = post(&addr, &sim_path(VID_ENC), &[JSON], VALID);
    assert_eq!(status, 200, "{body}");
    let stream_id = body["stream_id"].as_str().expect("stream_id").to_string();
    let bare = r#"{"sensor_data": {"data": [{"Ia": 1}],"fault_type":"normal"}}"#;
    let (status, body) = post(&addr, &sim_path("v-2"), &[JSON], bare);
    assert_eq!(status, 200, "{body}");

    let entries = redis.xrange("test_raw");
    assert_eq!(entries.len(), 2);
    let (id, fields) = &entries[0];
    assert_eq!(id, &stream_id);
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "vehicle_id",
            "timestamp",
            "sensor_data",
            "metadata",
            "data_type"
        ]
    );
    let field = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    assert_eq!(field("vehicle_id"), VID);
    assert_eq!(field("data_type"), "motor_sensor_data");
    assert_eq!(field("timestamp"), body_timestamp_shape(field("timestamp")));
    // The JSON texts are stored exactly as sent.
    let sent: Value = serde_json::from_str(VALID).expect("valid json");
    let sd_start = VALID.find(r#"{"data""#).expect("sensor_data text");
    let sd_end = VALID.find(r#", "metadata""#).expect("metadata key");
    assert_eq!(field("sensor_data"), &VALID[sd_start..sd_end]);
    assert_eq!(field("metadata"), &VALID[sd_end + 14..VALID.len() - 1]);
    assert_eq!(
        serde_json::from_str::<Value>(field("sensor_data"))
            .ok()
            .as_ref(),
        Some(&sent["sensor_data"])
    );
    assert_eq!(
        serde_json::from_str::<Value>(field("metadata"))
            .ok()
            .as_ref(),
        Some(&sent["metadata"])
    );

    let (_, fields) = &entries[1];
    let field = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    assert_eq!(field("vehicle_id"), "v-2");
    assert_eq!(
        field("sensor_data"),
        r#"{"data": [{"Ia": 1}],"fault_type":"normal"}"#
    );
    assert_eq!(field("metadata"), "{}");
    assert_eq!(stats(&addr)["accepted"], 2);

    // Redis gone: 500 with a detail, and nothing counted as accepted.
    redis.stop();
    for _ in 0..3 {
        let (status, body) = post(&addr, &sim_path(VID_ENC), &[JSON], VALID);
        assert_eq!(status, 500, "{body}");
        assert!(body["detail"].is_string(), "{body}");
    }
    let s = stats(&addr);
    assert_eq!(s["accepted"], 2);
    assert_eq!(s["redis_errors"], 3);

    // Redis back on the same port: the sink reconnects by itself.
    redis.start();
    wait_for(
        "the sink to write to redis again",
        Duration::from_secs(15),
        || (post(&addr, &sim_path(VID_ENC), &[JSON], VALID).0 == 200).then_some(()),
    );
    assert_eq!(stats(&addr)["accepted"], 3);
    assert_eq!(
        redis.xrange("test_raw").len(),
        1,
        "a fresh redis holds only the new entry"
    );
}

#[test]
fn sink_starts_while_redis_is_down() {
    // A port nothing listens on: the sink must still come up and answer 500.
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let (_sink, addr) = start_sink(&["--redis", &dead]);
    let (status, body) = post(&addr, &sim_path(VID_ENC), &[JSON], VALID);
    assert_eq!(status, 500, "{body}");
    assert!(body["detail"].is_string());
    let s = stats(&addr);
    assert_eq!(
        (s["accepted"].as_u64(), s["redis_errors"].as_u64()),
        (Some(0), Some(1))
    );
    // Invalid bodies are still refused before Redis is tried.
    assert_eq!(post(&addr, &sim_path(VID_ENC), &[JSON], "[]").0, 422);
}

/// Checks the receipt time is an RFC 3339 UTC timestamp and returns it unchanged.
fn body_timestamp_shape(ts: &str) -> &str {
    let ok = ts.len() == "2026-11-28T09:00:00.123456Z".len()
        && ts.ends_with('Z')
        && ts.as_bytes()[10] == b'T'
        && humantime::parse_rfc3339(ts).is_ok();
    assert!(ok, "timestamp {ts:?}");
    ts
}
