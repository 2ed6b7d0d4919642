//! `vtox-sim` against an `https://` target: a TLS terminator written here (rustls, with a CA
//! and certificate made by the `openssl` CLI) in front of the real `vtox-sink`.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use vtox::counters::SimReport;

fn openssl(dir: &str, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("the openssl CLI is installed (.ci/run installs it)");
    assert!(st.success(), "openssl {args:?}");
}

/// A CA and a server certificate for localhost and 127.0.0.1 signed by it, in `dir`.
fn make_certs(dir: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=vtox test CA"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        format!("{dir}/ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );
}

/// What the terminator saw.
#[derive(Default)]
struct Seen {
    handshakes: AtomicU64,
    failed_handshakes: AtomicU64,
    names: Mutex<Vec<Option<String>>>,
}

/// A TLS terminator on a free port that forwards each connection to `backend`.
fn terminator(dir: &str, backend: String) -> (u16, Arc<Seen>) {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(format!("{dir}/server.pem"))
            .expect("server.pem")
            .collect::<Result<_, _>>()
            .expect("certs");
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/server.key")).expect("server.key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, backend, s) = (acceptor.clone(), backend.clone(), s.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(_) => {
                            s.failed_handshakes.fetch_add(1, SeqCst);
                            return;
                        }
                    };
                    s.handshakes.fetch_add(1, SeqCst);
                    let name = tls.get_ref().1.server_name().map(String::from);
                    s.names.lock().expect("names").push(name);
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                    }
                });
            }
        });
    });
    (port, seen)
}

fn sink() -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let p = Proc::spawn("vtox-sink", &["--listen", &addr]);
    wait_listening(&addr, Duration::from_secs(10));
    (p, addr)
}

/// Runs the simulator to its end; returns the final metric line and its stderr.
fn run_sim(target: &str, extra: &[&str]) -> (SimReport, String) {
    let mut args = vec![
        "--vehicles",
        "6",
        "--target",
        target,
        "--interval",
        "0.3s",
        "--duration",
        "2s",
        "--timeout",
        "3s",
    ];
    args.extend_from_slice(extra);
    let child = Command::new(bin("vtox-sim"))
        .args(&args)
        .env("RUST_LOG", "warn")
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
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let out = sim.child.stdout.take().expect("stdout");
    let last = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| SimReport::parse_line(&l).ok())
        .find(|r| r.is_final)
        .expect("a final metric line");
    let status = sim.wait_timeout(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status:?}");
    (last, err_reader.join().expect("stderr"))
}

#[test]
fn https_with_an_added_ca_reaches_the_sink_exactly() {
    let dir = TempDir::new("tls-ok");
    make_certs(dir.path());
    let (_sink, backend) = sink();
    let (port, seen) = terminator(dir.path(), backend.clone());
    let ca = format!("{}/ca.pem", dir.path());
    let (r, _) = run_sim(&format!("https://localhost:{port}"), &["--target-ca", &ca]);
    assert!(r.sent >= 6 * 5, "{r:?}");
    assert_eq!((r.accepted, r.failed, r.dropped), (r.sent, 0, 0), "{r:?}");
    let stats = get_json(&backend, "/stats").expect("sink stats");
    assert_eq!(stats["accepted"], r.accepted);
    assert_eq!(stats["rejected"], 0);
    assert_eq!(stats["duplicates"], 0);
    // Keep-alive over TLS: a handshake per lane, not per message.
    let handshakes = seen.handshakes.load(SeqCst);
    assert!(
        (1..=6).contains(&handshakes),
        "{handshakes} handshakes for {} messages",
        r.sent
    );
    // SNI names the URL's host.
    let names = seen.names.lock().expect("names").clone();
    assert!(
        names.iter().all(|n| n.as_deref() == Some("localhost")),
        "{names:?}"
    );
    // An IP literal is verified against the certificate's IP address.
    let (r, _) = run_sim(&format!("https://127.0.0.1:{port}"), &["--target-ca", &ca]);
    assert_eq!((r.accepted, r.failed), (r.sent, 0), "{r:?}");
}

#[test]
fn an_unknown_ca_fails_every_message_with_one_clear_line() {
    let dir = TempDir::new("tls-unknown");
    make_certs(dir.path());
    let (_sink, backend) = sink();
    let (port, seen) = terminator(dir.path(), backend.clone());
    let target = format!("https://localhost:{port}");
    let (r, stderr) = run_sim(&target, &[]);
    assert!(r.sent >= 6, "{r:?}");
    assert_eq!(r.accepted, 0);
    assert_eq!((r.failed, r.failures.tls), (r.sent, r.sent), "{r:?}");
    assert_eq!(seen.handshakes.load(SeqCst), 0);
    assert!(seen.failed_handshakes.load(SeqCst) >= 1);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("TLS handshake"))
        .collect();
    assert_eq!(lines.len(), 1, "one line, not one per message: {stderr}");
    assert!(lines[0].contains(&target), "names the target: {}", lines[0]);
    assert!(
        lines[0].to_lowercase().contains("certificate"),
        "{}",
        lines[0]
    );
    let stats = get_json(&backend, "/stats").expect("sink stats");
    assert_eq!(stats["accepted"], 0);
}

#[test]
fn target_insecure_is_explicit_and_logged() {
    let dir = TempDir::new("tls-insecure");
    make_certs(dir.path());
    let (_sink, backend) = sink();
    let (port, _seen) = terminator(dir.path(), backend.clone());
    let (r, stderr) = run_sim(&format!("https://localhost:{port}"), &["--target-insecure"]);
    assert!(r.sent >= 6, "{r:?}");
    assert_eq!((r.accepted, r.failed), (r.sent, 0), "{r:?}");
    assert!(
        stderr.contains("NOT verified"),
        "a warning at start: {stderr}"
    );
    let stats = get_json(&backend, "/stats").expect("sink stats");
    assert_eq!(stats["accepted"], r.accepted);
}

#[test]
fn tls_flags_are_checked() {
    let dir = TempDir::new("tls-flags");
    let bad = format!("{}/nothing.pem", dir.path());
    std::fs::write(&bad, "no certificate here\n").expect("write");
    for (target, extra) in [
        ("http://127.0.0.1:1", vec!["--target-insecure"]),
        ("https://127.0.0.1:1", vec!["--target-ca", bad.as_str()]),
        (
            "https://127.0.0.1:1",
            vec!["--target-ca", "/nonexistent/ca.pem"],
        ),
    ] {
        let out = Command::new(bin("vtox-sim"))
            .args(["--vehicles", "1", "--target", target])
            .args(&extra)
            .output()
            .expect("run vtox-sim");
        assert_eq!(out.status.code(), Some(2), "{target} {extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{err}"
        );
    }
}

#[test]
fn run_passes_tls_trust_and_the_token_through_the_coordinator_and_agent() {
    let dir = TempDir::new("tls-run");
    make_certs(dir.path());
    // The sink wants this token on the authenticated route; the run's simulators read it from
    // a file on their (here: this) host.
    let backend = format!("127.0.0.1:{}", free_port());
    let _sink = Proc::spawn(
        "vtox-sink",
        &["--listen", &backend, "--token", "fleet-secret"],
    );
    wait_listening(&backend, Duration::from_secs(10));
    let token = format!("{}/token", dir.path());
    std::fs::write(&token, "fleet-secret\n").expect("write the token");
    let (port, _seen) = terminator(dir.path(), backend.clone());
    let ca = format!("{}/ca.pem", dir.path());
    let o = std::process::Command::new(bin("vtox-coord"))
        .args([
            "run",
            "10",
            "--local",
            "--target",
            &format!("https://localhost:{port}"),
            "--target-ca",
            &ca,
            "--auth-token-file",
            &token,
            "--duration",
            "3s",
            "--interval",
            "0.5s",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains("fleet-secret"),
        "the token never shows: {err}"
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("run --json");
    let accepted = r["totals"]["accepted"].as_u64().expect("accepted");
    assert!(accepted >= 40, "{r}");
    assert_eq!(r["totals"]["failed"], 0, "{r}");
    let stats = get_json(&backend, "/stats").expect("sink stats");
    assert_eq!(stats["accepted"], accepted, "{stats}");
    assert_eq!(stats["unauthorized"].as_u64().unwrap_or(0), 0, "{stats}");
}
