//! The web dashboard in a real browser (headless Chromium): a coordinator with two agents
//! driving a fleet into the sink, shown live and stopped from the page; the run form's
//! checks; and a coordinator with a token, whose page and controls refuse anyone without it.
//! With VTOX_SCREENSHOT=path, the live view is saved there as a PNG (the README's picture).

mod common;

use common::browser::Browser;
use common::*;
use std::process::Command;
use std::time::Duration;

/// A coordinator serving the dashboard, with `agents` agents joined, and a sink.
struct Lab {
    coord_url: String,
    web: String,
    sink: String,
    _procs: Vec<Proc>,
    _logs: TempDir,
}

fn lab(agents: &[&str], token_file: Option<&str>) -> Lab {
    let sink = format!("127.0.0.1:{}", free_port());
    let coord = format!("127.0.0.1:{}", free_port());
    let web = format!("127.0.0.1:{}", free_port());
    let mut procs = vec![Proc::spawn("vtox-sink", &["--listen", &sink])];
    let mut serve = vec!["serve", "--listen", &coord, "--web-listen", &web];
    let mut auth = Vec::new();
    if let Some(f) = token_file {
        auth = vec!["--token-file", f];
        serve.splice(0..0, auth.iter().copied());
    }
    procs.push(Proc::spawn("vtox-coord", &serve));
    wait_listening(&sink, Duration::from_secs(10));
    wait_listening(&coord, Duration::from_secs(10));
    wait_listening(&web, Duration::from_secs(10));
    let logs = TempDir::new("web");
    for name in agents {
        let mut args = auth.clone();
        args.extend(["--join", &coord, "--name", name, "--log-dir", logs.path()]);
        procs.push(Proc::spawn("vtox-agent", &args));
    }
    Lab {
        coord_url: format!("http://{coord}"),
        web,
        sink,
        _procs: procs,
        _logs: logs,
    }
}

/// The dashboard of `lab` in `b`, on its Control tab.
fn open_controls(b: &mut Browser, lab: &Lab) {
    b.goto(&format!("http://{}/", lab.web));
    b.wait_for(
        "the page",
        Duration::from_secs(20),
        "!document.querySelector('#app').hidden",
    );
    b.click("#tabs button[data-tab=control]");
}

fn status(coord_url: &str) -> serde_json::Value {
    let out = Command::new(bin("vtox-coord"))
        .args(["status", "--coord", coord_url, "--json"])
        .output()
        .expect("vtox-coord status");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn the_live_view_shows_the_fleet_and_stops_it() {
    let Some(mut b) = Browser::launch() else {
        return;
    };
    let lab = lab(&["agent-a", "agent-b"], None);
    let target = format!("http://{}", lab.sink);
    let _run = Proc::spawn(
        "vtox-coord",
        &[
            "run",
            "400",
            "--coord",
            &lab.coord_url,
            "--target",
            &target,
            "--interval",
            "0.5s",
            "--expect-agents",
            "2",
            "--duration",
            "120s",
            "--faults",
            "bearing=5",
        ],
    );
    b.goto(&format!("http://{}/", lab.web));
    // Both agents in the table, messages flowing, a p95 measured.
    b.wait_for(
        "both agents in the table",
        Duration::from_secs(60),
        "document.querySelectorAll('#agent-table tbody tr').length === 2 && document.querySelector('#agent-table tbody').innerText.includes('agent-a') && document.querySelector('#agent-table tbody').innerText.includes('agent-b')",
    );
    b.wait_for(
        "accepted msg/s above 0",
        Duration::from_secs(30),
        "parseFloat(document.querySelector('#h-rate').innerText.replace(/,/g, '')) > 0",
    );
    let p95 = b.wait_for(
        "a p95",
        Duration::from_secs(30),
        "document.querySelector('#h-p95').innerText.endsWith(' ms') && document.querySelector('#h-p95').innerText",
    );
    assert!(p95.as_str().is_some_and(|t| t.ends_with(" ms")), "{p95}");
    assert_eq!(
        b.eval("document.querySelector('#h-state').innerText"),
        "running"
    );
    // The charts drew lines, and events say who joined.
    b.wait_for(
        "the charts",
        Duration::from_secs(10),
        "document.querySelectorAll('.charts canvas').length >= 4",
    );
    b.wait_for(
        "the join events",
        Duration::from_secs(10),
        "document.querySelector('#event-list').innerText.includes('agent-b joined') || document.querySelector('#event-list').innerText.includes('run run-')",
    );
    // A row opens its instances.
    b.click("#agent-table tbody tr");
    b.wait_for(
        "the instances of an agent",
        Duration::from_secs(10),
        "!document.querySelector('#drill').hidden && document.querySelectorAll('#drill-table tbody tr').length > 0",
    );
    // A reload gets the history at once, before the next frame: the charts keep their past.
    std::thread::sleep(Duration::from_secs(4));
    b.goto(&format!("http://{}/", lab.web));
    b.wait_for(
        "the history after a reload",
        Duration::from_secs(5),
        "!document.querySelector('#app').hidden && state.points.length >= 5",
    );
    b.wait_for(
        "both agents again",
        Duration::from_secs(10),
        "document.querySelectorAll('#agent-table tbody tr').length === 2",
    );
    if let Ok(path) = std::env::var("VTOX_SCREENSHOT") {
        // A few more seconds of history for the picture.
        std::thread::sleep(Duration::from_secs(8));
        b.screenshot(std::path::Path::new(&path));
    }
    // Stop, from the page: the coordinator says the run stopped.
    b.click("#stop");
    wait_for("the run to stop", Duration::from_secs(20), || {
        let s = status(&lab.coord_url);
        (s["state"] == "stopped").then_some(())
    });
    b.wait_for(
        "the page to say stopped",
        Duration::from_secs(10),
        "document.querySelector('#h-state').innerText === 'stopped'",
    );
}

#[test]
fn a_run_form_with_a_bad_vehicle_count_shows_the_error_and_starts_nothing() {
    let Some(mut b) = Browser::launch() else {
        return;
    };
    let lab = lab(&["agent-f"], None);
    open_controls(&mut b, &lab);
    b.type_into("#run-form input[name=vehicles]", "0");
    b.type_into("#run-form input[name=interval]", "1s");
    b.click("#run-form button[type=submit]");
    let msg = b.wait_for(
        "the vehicles field's error",
        Duration::from_secs(10),
        "document.querySelector('#run-form [data-for=vehicles]').innerText",
    );
    // The command line's own words.
    let cli = Command::new(bin("vtox-coord"))
        .args(["run", "0", "--coord", &lab.coord_url])
        .output()
        .expect("vtox-coord run 0");
    let cli_err = String::from_utf8_lossy(&cli.stderr);
    let shown = msg.as_str().unwrap_or("");
    assert!(
        !shown.is_empty() && cli_err.contains(shown),
        "page: {shown:?}, cli: {cli_err}"
    );
    // A bad interval goes next to the interval, not elsewhere.
    b.type_into("#run-form input[name=vehicles]", "10");
    b.type_into("#run-form input[name=interval]", "soon");
    b.click("#run-form button[type=submit]");
    b.wait_for(
        "the interval field's error",
        Duration::from_secs(10),
        "document.querySelector('#run-form [data-for=interval]').innerText.length > 0 && document.querySelector('#run-form [data-for=vehicles]').innerText === ''",
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status(&lab.coord_url)["run_id"], "", "nothing started");
    // A good one starts.
    b.type_into("#run-form input[name=interval]", "1s");
    b.type_into("#run-form input[name=duration]", "3s");
    b.click("#run-form button[type=submit]");
    wait_for("the run from the form", Duration::from_secs(20), || {
        let s = status(&lab.coord_url);
        (s["run_id"] != "" && s["vehicles"] == 10).then_some(())
    });
}

#[test]
fn without_the_token_the_page_asks_for_it_and_controls_are_refused() {
    let dir = TempDir::new("web-token");
    let token_file = format!("{}/token", dir.path());
    std::fs::write(&token_file, "s3cret-web-token\n").expect("token file");
    let lab = lab(&["agent-t"], Some(&token_file));
    // A plain HTTP client without the token: refused, every call.
    for (method, path) in [
        ("POST", "/api/stop"),
        ("POST", "/api/run"),
        ("POST", "/api/rebalance"),
        ("POST", "/api/ramp"),
        ("GET", "/api/events"),
        ("GET", "/api/history"),
        ("GET", "/api/agents/agent-t"),
    ] {
        let (code, body) = http(
            method,
            &lab.web,
            path,
            &[("Content-Type", "application/json")],
            b"{\"vehicles\":\"10\"}",
        )
        .expect("an answer");
        assert_eq!(code, 401, "{method} {path}: {body}");
    }
    // A wrong token is refused; the right one gets a session cookie fit for a browser only.
    let (code, _) = http(
        "POST",
        &lab.web,
        "/api/login",
        &[("Content-Type", "application/json")],
        b"{\"token\":\"guess\"}",
    )
    .expect("an answer");
    assert_eq!(code, 401);
    // The session holds, but a cross-site POST with it is refused.
    let bearer = "Bearer s3cret-web-token";
    let (code, body) = http(
        "POST",
        &lab.web,
        "/api/stop",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", bearer),
            ("Origin", "http://evil.example"),
        ],
        b"{}",
    )
    .expect("an answer");
    assert_eq!(code, 403, "{body}");
    let (code, _) = http(
        "POST",
        &lab.web,
        "/api/stop",
        &[("Content-Type", "text/plain"), ("Authorization", bearer)],
        b"{}",
    )
    .expect("an answer");
    assert_eq!(code, 415, "a form post cannot be JSON");
    let (code, body) = http(
        "POST",
        &lab.web,
        "/api/stop",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", bearer),
        ],
        b"{}",
    )
    .expect("an answer");
    assert_eq!(code, 200, "{body}");

    let Some(mut b) = Browser::launch() else {
        return;
    };
    b.goto(&format!("http://{}/", lab.web));
    b.wait_for(
        "the sign-in form",
        Duration::from_secs(20),
        "!document.querySelector('#login').hidden && document.querySelector('#app').hidden",
    );
    // The page itself cannot drive anything before signing in.
    let refused = b.eval(
        "fetch('/api/stop', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}'}).then(r => r.status)",
    );
    assert_eq!(refused, 401);
    b.type_into("#token", "wrong");
    b.click("#login-form button[type=submit]");
    b.wait_for(
        "the refusal",
        Duration::from_secs(10),
        "document.querySelector('#login-error').innerText.includes('wrong token')",
    );
    b.type_into("#token", "s3cret-web-token");
    b.click("#login-form button[type=submit]");
    b.wait_for(
        "the dashboard",
        Duration::from_secs(20),
        "!document.querySelector('#app').hidden && document.querySelector('#agent-table tbody').innerText.includes('agent-t')",
    );
    // The cookie is not readable by the page's scripts.
    assert_eq!(b.eval("document.cookie"), "");
    let allowed = b.eval(
        "fetch('/api/rebalance', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}'}).then(r => r.status)",
    );
    assert_ne!(allowed, 401, "signed in, the page may drive the fleet");
    assert!(!b.text().contains("s3cret"), "the token is never shown");
}

#[test]
fn a_ramp_started_from_the_page_shows_its_steps_and_its_report() {
    let Some(mut b) = Browser::launch() else {
        return;
    };
    let lab = lab(&["agent-r"], None);
    open_controls(&mut b, &lab);
    b.type_into("#ramp-form input[name=steps]", "20,40");
    b.type_into("#ramp-form input[name=step_duration]", "2s");
    b.type_into("#ramp-form input[name=warmup]", "1s");
    b.type_into("#ramp-form input[name=interval]", "0.5s");
    b.type_into(
        "#ramp-form input[name=target]",
        &format!("http://{}", lab.sink),
    );
    b.click("#ramp-form button[type=submit]");
    b.wait_for(
        "the ramp view",
        Duration::from_secs(10),
        "!document.querySelector('#ramp').hidden",
    );
    b.wait_for(
        "both steps, judged, and the report",
        Duration::from_secs(60),
        "document.querySelectorAll('#ramp-table tbody tr').length === 2 && document.querySelector('#ramp-state').innerText.includes('done') && !document.querySelector('#ramp-files').hidden",
    );
    let verdicts = b.eval(
        "Array.from(document.querySelectorAll('#ramp-table tbody tr')).map(r => r.children[0].innerText + ' ' + r.children[7].innerText).join('; ')",
    );
    assert_eq!(verdicts, "20 pass; 40 pass");
    if let Ok(path) = std::env::var("VTOX_RAMP_SCREENSHOT") {
        b.screenshot(std::path::Path::new(&path));
    }
    let best = b.eval(
        "fetch('/api/ramp/performance_test_report.json').then(r => r.json()).then(j => j.test_summary.max_successful_vehicles)",
    );
    assert_eq!(best, 40);
    let html =
        b.eval("fetch('/api/ramp/report.html').then(r => r.text()).then(t => t.includes('<svg'))");
    assert_eq!(html, true);
}

#[test]
fn run_local_prints_its_dashboard_and_serves_it() {
    use std::io::{BufRead, BufReader};
    let mut run = std::process::Command::new(bin("vtox-coord"))
        .args([
            "run",
            "60",
            "--local",
            "--duration",
            "6s",
            "--interval",
            "0.5s",
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vtox-coord run --local");
    let err = run.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("dashboard on http://") {
                let _ = tx.send(url.trim_end_matches('/').to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("run --local prints its dashboard's address");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let (code, page) = http("GET", &addr, "/", &[], b"").expect("the page");
    assert_eq!(code, 200);
    assert!(page.contains("vtox dashboard"));
    let session = get_json(&addr, "/api/session").expect("the session");
    assert_eq!(session["auth_required"], false);
    assert!(session["default_target"]
        .as_str()
        .is_some_and(|t| t.starts_with("http://127.0.0.1:")));
    let status = run.wait().expect("the run ends");
    assert!(status.success(), "{status:?}");
    // --no-web: no dashboard.
    let out = std::process::Command::new(bin("vtox-coord"))
        .args(["run", "10", "--local", "--duration", "2s", "--no-web"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("vtox-coord run --local --no-web");
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("dashboard on"));
}

/// The newest frame of the live view that satisfies `want`, read from the event stream as a
/// plain HTTP client does, within `deadline`.
fn frame_where(
    web: &str,
    deadline: Duration,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    use std::io::{Read, Write};
    let end = std::time::Instant::now() + deadline;
    let mut s = std::net::TcpStream::connect(web).expect("connect to the dashboard");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    write!(
        s,
        "GET /api/events HTTP/1.1\r\nHost: {web}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("request");
    let mut text = String::new();
    let mut buf = [0u8; 65536];
    while std::time::Instant::now() < end {
        if let Ok(n) = s.read(&mut buf) {
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let found = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter(|f| want(f))
            .last();
        if let Some(f) = found {
            return f;
        }
    }
    panic!(
        "no such frame within {deadline:?}; the stream said:\n{}",
        &text[text.len().saturating_sub(3000)..]
    );
}

#[test]
fn with_redis_the_pipeline_and_its_idle_groups_show() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let url = redis.url();
    {
        let mut con = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("connect to redis");
        for group in ["current_diagnosis", "nobody_reads_this"] {
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg("motor_raw_data")
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query(&mut con)
                .expect("XGROUP CREATE");
        }
        // A group with a consumer is live; one without is idle, listed and never judged.
        let _: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg("motor_raw_data")
            .arg("current_diagnosis")
            .arg("worker-1")
            .query(&mut con)
            .expect("XGROUP CREATECONSUMER");
    }
    let sink = format!("127.0.0.1:{}", free_port());
    let coord = format!("127.0.0.1:{}", free_port());
    let web = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn("vtox-sink", &["--listen", &sink, "--redis", &url]);
    let _coord = Proc::spawn(
        "vtox-coord",
        &[
            "serve",
            "--listen",
            &coord,
            "--web-listen",
            &web,
            "--redis",
            &url,
        ],
    );
    wait_listening(&sink, Duration::from_secs(10));
    wait_listening(&coord, Duration::from_secs(10));
    wait_listening(&web, Duration::from_secs(10));
    let logs = TempDir::new("web-redis");
    let _agent = Proc::spawn(
        "vtox-agent",
        &[
            "--join",
            &coord,
            "--name",
            "agent-p",
            "--log-dir",
            logs.path(),
        ],
    );
    let coord_url = format!("http://{coord}");
    let target = format!("http://{sink}");
    let _run = Proc::spawn(
        "vtox-coord",
        &[
            "run",
            "100",
            "--coord",
            &coord_url,
            "--target",
            &target,
            "--interval",
            "0.5s",
            "--duration",
            "60s",
        ],
    );
    let f = frame_where(&web, Duration::from_secs(60), |f| {
        f["pipeline"]["ingest_msgs_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    });
    let p = &f["pipeline"];
    let live: Vec<&str> = p["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    let idle: Vec<&str> = p["idle_groups"]
        .as_array()
        .expect("idle groups")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(live, ["current_diagnosis"], "{p}");
    assert_eq!(idle, ["nobody_reads_this"], "{p}");
    // Nobody processes the live group's messages: its backlog grows, and it is told.
    let f = frame_where(&web, Duration::from_secs(30), |f| {
        f["pipeline"]["falling_behind"]
            .as_array()
            .is_some_and(|l| !l.is_empty())
    });
    assert_eq!(f["pipeline"]["falling_behind"][0], "current_diagnosis");

    let Some(mut b) = Browser::launch() else {
        return;
    };
    b.goto(&format!("http://{web}/"));
    b.wait_for(
        "the pipeline panel",
        Duration::from_secs(20),
        "!document.querySelector('#pipeline').hidden && document.querySelector('#pipe-table').innerText.includes('current_diagnosis') && document.querySelector('#pipe-idle').innerText.includes('nobody_reads_this')",
    );
}

#[test]
fn vehicles_not_driven_and_a_failed_run_are_said_at_the_top_of_the_page() {
    let Some(mut b) = Browser::launch() else {
        return;
    };
    // An agent whose "simulator" crashes at once, every time: nothing is driven.
    let sink = format!("127.0.0.1:{}", free_port());
    let coord = format!("127.0.0.1:{}", free_port());
    let web = format!("127.0.0.1:{}", free_port());
    let _coord = Proc::spawn(
        "vtox-coord",
        &[
            "serve",
            "--listen",
            &coord,
            "--web-listen",
            &web,
            "--heartbeat",
            "500ms",
        ],
    );
    wait_listening(&coord, Duration::from_secs(10));
    wait_listening(&web, Duration::from_secs(10));
    let logs = TempDir::new("web-undriven");
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
    let _run = Proc::spawn(
        "vtox-coord",
        &[
            "run",
            "30",
            "--coord",
            &coord_url,
            "--target",
            &format!("http://{sink}"),
            "--duration",
            "120s",
            "--max-not-driven",
            "12s",
        ],
    );
    b.goto(&format!("http://{web}/"));
    let alarm = b.wait_for(
        "the undriven vehicles",
        Duration::from_secs(40),
        "!document.querySelector('#h-alarm').hidden && document.querySelector('#h-alarm').innerText",
    );
    assert!(
        alarm
            .as_str()
            .is_some_and(|t| t.starts_with("30 vehicles not driven for")),
        "{alarm}"
    );
    let row = b.eval("document.querySelector('#agent-table tbody').innerText");
    assert!(
        row.as_str().is_some_and(|t| t.contains("30 not driven")),
        "{row}"
    );
    let failed = b.wait_for(
        "the run's failure",
        Duration::from_secs(40),
        "document.querySelector('#h-alarm').innerText.startsWith('Run failed') && document.querySelector('#h-alarm').innerText",
    );
    assert!(
        failed
            .as_str()
            .is_some_and(|t| t.contains("agent crashy") && t.contains("crashed")),
        "{failed}"
    );
    assert_eq!(
        b.eval("document.querySelector('#h-state').innerText"),
        "failed"
    );
    b.wait_for(
        "the failure among the events",
        Duration::from_secs(10),
        "document.querySelector('#event-list').innerText.includes('failed: 30 vehicles of agent crashy')",
    );
}
