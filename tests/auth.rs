//! `vtox-sim` on the authenticated route: a token file against `vtox-sink --token`, per-vehicle
//! tokens and a login server written here that counts logins and expires its tokens.

mod common;

use common::*;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vtox::counters::SimReport;
use vtox::fleet::vehicle_id;

/// Runs the simulator to its end; returns the final metric line and everything it logged.
fn run_sim(args: &[&str]) -> (SimReport, String, String) {
    let child = Command::new(bin("vtox-sim"))
        .args(args)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vtox-sim");
    let mut sim = Proc {
        child,
        name: "vtox-sim".into(),
    };
    let err = sim.child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(err).read_to_string(&mut text);
        text
    });
    let mut out = String::new();
    let _ = BufReader::new(sim.child.stdout.take().expect("stdout")).read_to_string(&mut out);
    let status = sim.wait_timeout(Duration::from_secs(15)).expect("exits");
    let stderr = err_reader.join().expect("stderr");
    assert!(status.success(), "{status:?}: {stderr}");
    let last = out
        .lines()
        .filter_map(|l| SimReport::parse_line(l).ok())
        .find(|r| r.is_final)
        .expect("a final metric line");
    (last, out, stderr)
}

const TOKEN: &str = "tok-9f8e7d6c5b4a";

#[test]
fn a_token_file_reaches_the_authenticated_route() {
    let (_sink, addr) = sink(&["--token", TOKEN]);
    let dir = TempDir::new("auth-file");
    let good = format!("{}/token", dir.path());
    std::fs::write(&good, format!("{TOKEN}\n")).expect("write");
    let target = format!("http://{addr}");
    let common = [
        "--vehicles",
        "5",
        "--target",
        &target,
        "--interval",
        "0.3s",
        "--duration",
        "1.5s",
    ];
    let mut args = common.to_vec();
    args.extend(["--auth-token-file", good.as_str()]);
    let (r, out, err) = run_sim(&args);
    assert!(r.sent >= 15, "{r:?}");
    assert_eq!((r.accepted, r.failed), (r.sent, 0), "{r:?}");
    let stats = get_json(&addr, "/stats").expect("stats");
    assert_eq!(stats["accepted"], r.accepted);
    assert!(
        !out.contains(TOKEN) && !err.contains(TOKEN),
        "the token is never shown"
    );

    // A wrong token: every message is a 401, counted by status.
    let bad = format!("{}/bad", dir.path());
    std::fs::write(&bad, "not-the-token").expect("write");
    let mut args = common.to_vec();
    args.extend(["--auth-token-file", bad.as_str()]);
    let (r, _, _) = run_sim(&args);
    assert_eq!(r.accepted, 0);
    assert_eq!(r.failures.status.get(&401).copied(), Some(r.sent), "{r:?}");
}

#[test]
fn help_never_shows_a_secret_and_bad_files_are_refused() {
    let out = Command::new(bin("vtox-sim"))
        .arg("--help")
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--auth-token-file",
        "--vehicle-tokens",
        "--login",
        "--login-user",
        "--login-password-file",
    ] {
        assert!(help.contains(flag), "{flag} in --help");
    }
    let dir = TempDir::new("auth-bad");
    let tokens = format!("{}/tokens", dir.path());
    std::fs::write(&tokens, format!("{}\tsecret-a\n", vehicle_id(0))).expect("write");
    let empty = format!("{}/empty", dir.path());
    std::fs::write(&empty, "\n").expect("write");
    for extra in [
        vec!["--vehicle-tokens", tokens.as_str(), "--vehicles", "2"],
        vec!["--auth-token-file", empty.as_str(), "--vehicles", "1"],
        vec![
            "--login",
            "http://127.0.0.1:1",
            "--login-user",
            "u",
            "--vehicles",
            "1",
        ],
        vec![
            "--auth-token-file",
            empty.as_str(),
            "--vehicle-tokens",
            tokens.as_str(),
            "--vehicles",
            "1",
        ],
    ] {
        let out = Command::new(bin("vtox-sim"))
            .args(["--target", "http://127.0.0.1:1"])
            .args(&extra)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.lines().any(|l| l.starts_with("error:")), "{err}");
        assert!(!err.contains("secret-a"), "{err}");
    }
}

/// A request as the test servers see it.
struct Request {
    path: String,
    bearer: Option<String>,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1)?.to_string();
    let (mut length, mut bearer) = (0, None);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if h == "\r\n" {
            break;
        }
        let (name, value) = h.split_once(':')?;
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().ok()?,
            "authorization" => bearer = value.strip_prefix("Bearer ").map(String::from),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).ok()?;
    Some(Request { path, bearer, body })
}

fn answer(w: &mut TcpStream, status: &str, body: &str) -> bool {
    w.write_all(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .is_ok()
}

fn serve(handler: impl Fn(Request) -> (&'static str, String) + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let h = handler.clone();
            std::thread::spawn(move || {
                let mut w = stream.try_clone().expect("clone");
                let mut r = BufReader::new(stream);
                while let Some(req) = read_request(&mut r) {
                    let (status, body) = h(req);
                    if !answer(&mut w, status, &body) {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[test]
fn each_vehicle_sends_its_own_token() {
    let expected: HashMap<String, String> = (10..16)
        .map(|n| (vehicle_id(n), format!("vt-{n}")))
        .collect();
    let seen: Arc<Mutex<(u64, u64, BTreeSet<String>)>> = Arc::default();
    let (want, s) = (expected.clone(), seen.clone());
    let addr = serve(move |req| {
        let id = req
            .path
            .strip_prefix("/api/v1/diagnosis-stream/vehicles/")
            .and_then(|p| p.strip_suffix("/data"))
            .map(percent_decode)
            .unwrap_or_default();
        let mut s = s.lock().expect("seen");
        if want
            .get(&id)
            .is_some_and(|t| req.bearer.as_deref() == Some(t.as_str()))
        {
            s.0 += 1;
            s.2.insert(id);
            ("200 OK", "{}".into())
        } else {
            s.1 += 1;
            ("401 Unauthorized", "{\"detail\":\"bad token\"}".into())
        }
    });
    let dir = TempDir::new("auth-vehicles");
    let file = format!("{}/tokens", dir.path());
    let mut text = String::from("# vehicle_id<TAB>token\n");
    for (id, t) in &expected {
        text.push_str(&format!("{id}\t{t}\n"));
    }
    std::fs::write(&file, text).expect("write");
    let target = format!("http://{addr}");
    let (r, out, err) = run_sim(&[
        "--vehicles",
        "6",
        "--first-vehicle",
        "10",
        "--target",
        &target,
        "--interval",
        "0.3s",
        "--duration",
        "1.5s",
        "--vehicle-tokens",
        &file,
    ]);
    let s = seen.lock().expect("seen");
    assert!(r.sent >= 18, "{r:?}");
    assert_eq!((r.accepted, r.failed), (r.sent, 0), "{r:?}");
    assert_eq!((s.0, s.1), (r.sent, 0));
    assert_eq!(s.2.len(), 6, "every vehicle was seen");
    assert!(
        !out.contains("vt-1") && !err.contains("vt-1"),
        "no token shown"
    );
}

/// The login server's books.
#[derive(Default)]
struct Books {
    logins: u64,
    bad_logins: u64,
    /// Tokens issued, and for each whether a 401 was answered to it.
    issued: Vec<(Instant, bool)>,
    accepted: u64,
    unauthorized: u64,
}

#[test]
fn login_once_and_renew_once_per_expiry() {
    const USER: &str = "fleet-7";
    const PASSWORD: &str = "pw-Zq81!x";
    const LIFE: Duration = Duration::from_millis(700);
    let books: Arc<Mutex<Books>> = Arc::default();
    let b = books.clone();
    let addr = serve(move |req| {
        let mut b = b.lock().expect("books");
        if req.path == "/base/auth/token" {
            let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
            if v["username"] != USER || v["password"] != PASSWORD {
                b.bad_logins += 1;
                return (
                    "401 Unauthorized",
                    "{\"detail\":\"bad credentials\"}".into(),
                );
            }
            b.logins += 1;
            b.issued.push((Instant::now(), false));
            let token = format!("jwt-{}", b.issued.len());
            return (
                "200 OK",
                format!("{{\"access_token\":\"{token}\",\"token_type\":\"bearer\"}}"),
            );
        }
        assert!(
            req.path
                .starts_with("/base/api/v1/diagnosis-stream/vehicles/"),
            "{}",
            req.path
        );
        let which = req
            .bearer
            .as_deref()
            .and_then(|t| t.strip_prefix("jwt-"))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=b.issued.len()).contains(n));
        match which {
            // Only the newest token, and only within its life.
            Some(n) if n == b.issued.len() && b.issued[n - 1].0.elapsed() < LIFE => {
                b.accepted += 1;
                ("200 OK", "{}".into())
            }
            Some(n) => {
                b.issued[n - 1].1 = true;
                b.unauthorized += 1;
                ("401 Unauthorized", "{\"detail\":\"token expired\"}".into())
            }
            None => panic!("a request without a token it was given: {:?}", req.bearer),
        }
    });
    let dir = TempDir::new("auth-login");
    let pw = format!("{}/password", dir.path());
    std::fs::write(&pw, format!("{PASSWORD}\n")).expect("write");
    let base = format!("http://{addr}/base");
    let (r, out, err) = run_sim(&[
        "--vehicles",
        "8",
        "--target",
        &base,
        "--interval",
        "0.2s",
        "--duration",
        "3s",
        "--login",
        &base,
        "--login-user",
        USER,
        "--login-password-file",
        &pw,
    ]);
    let b = books.lock().expect("books");
    assert_eq!(b.bad_logins, 0);
    assert!(
        b.logins >= 3,
        "tokens expired and were renewed: {} logins",
        b.logins
    );
    assert_eq!(r.logins, b.logins, "{r:?}");
    // Never a storm: each renewal follows a 401 on the token before it, and at most one
    // login per token that was refused.
    let refused = b.issued.iter().filter(|(_, r)| *r).count() as u64;
    assert!(
        b.logins <= 1 + refused,
        "{} logins for {refused} refused tokens",
        b.logins
    );
    for (i, (_, refused)) in b.issued.iter().enumerate().take(b.issued.len() - 1) {
        assert!(refused, "token {} was replaced without a 401", i + 1);
    }
    // Exact counts on both sides.
    assert_eq!(r.accepted, b.accepted, "{r:?}");
    assert_eq!(
        r.failures.status.get(&401).copied().unwrap_or(0),
        b.unauthorized
    );
    assert_eq!(r.accepted + r.failed, r.sent);
    assert!(r.accepted > r.sent / 2, "most went through: {r:?}");
    for secret in [PASSWORD, "jwt-"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} shown in the logs"
        );
    }
}
