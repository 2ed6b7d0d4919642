//! Helpers shared by the integration tests: free loopback ports, child processes that are
//! killed when the test ends (even on panic), and waiting on conditions with deadlines.
#![allow(dead_code)]

pub mod browser;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago. The kernel hands out ephemeral ports in
/// sequence, so the race with another process taking it first is negligible for tests.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on loopback");
    l.local_addr().expect("local addr").port()
}

/// Path of one of the package's binaries, built by cargo for the integration tests.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "vtox-sim" => PathBuf::from(env!("CARGO_BIN_EXE_vtox-sim")),
        "vtox-sink" => PathBuf::from(env!("CARGO_BIN_EXE_vtox-sink")),
        "vtox-coord" => PathBuf::from(env!("CARGO_BIN_EXE_vtox-coord")),
        "vtox-agent" => PathBuf::from(env!("CARGO_BIN_EXE_vtox-agent")),
        other => panic!("unknown binary {other}"),
    }
}

/// The binaries log warnings and errors during tests; `RUST_LOG` overrides it.
fn log_level() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// A child process that is killed and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str]) -> Proc {
        Self::spawn_with(name, args, Stdio::null())
    }

    /// Spawns with stdout captured (for the simulator's metric lines).
    pub fn spawn_piped(name: &str, args: &[&str]) -> Proc {
        Self::spawn_with(name, args, Stdio::piped())
    }

    fn spawn_with(name: &str, args: &[&str], stdout: Stdio) -> Proc {
        let child = Command::new(bin(name))
            .args(args)
            .env("RUST_LOG", log_level())
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    /// Spawns with extra environment variables and stdout captured.
    pub fn spawn_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let child = Command::new(bin(name))
            .args(args)
            .env("RUST_LOG", log_level())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by number (SIGTERM = 15, SIGKILL = 9, SIGSTOP = 19, SIGCONT = 18).
    pub fn signal(&self, sig: i32) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Waits for the process to exit, up to `deadline`; None if it did not.
    pub fn wait_timeout(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 50 ms until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A blocking HTTP/1.1 request over a fresh loopback connection; returns (status, body).
/// Hand-rolled on purpose: the tests must not share code paths with the HTTP stack under test.
pub fn http(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = match text.find("\r\n\r\n") {
        Some(i) => text[i + 4..].to_string(),
        None => String::new(),
    };
    // Chunked bodies are decoded crudely: the tests only read small JSON bodies.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    Some((status, body))
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("\r\n") {
        let Ok(n) = usize::from_str_radix(rest[..i].trim(), 16) else {
            break;
        };
        if n == 0 {
            break;
        }
        let start = i + 2;
        if rest.len() < start + n {
            out.push_str(&rest[start..]);
            break;
        }
        out.push_str(&rest[start..start + n]);
        rest = &rest[start + n..];
        rest = rest.strip_prefix("\r\n").unwrap_or(rest);
    }
    out
}

/// GET a JSON document.
pub fn get_json(addr: &str, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http("GET", addr, path, &[], b"")?;
    if status != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: &str, deadline: Duration) {
    wait_for(&format!("{addr} to listen"), deadline, || {
        std::net::TcpStream::connect(addr).ok().map(|_| ())
    });
}

/// A `vtox-sink` on a free loopback port with `extra` flags, listening; and its address.
pub fn sink(extra: &[&str]) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--listen", addr.as_str()];
    args.extend_from_slice(extra);
    let p = Proc::spawn("vtox-sink", &args);
    wait_listening(&addr, Duration::from_secs(10));
    (p, addr)
}

/// A fresh scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "vtox-test-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pids of the live processes whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // The command name may contain spaces: fields resume after the last ')'.
                    let rest = &s[s.rfind(')')? + 2..];
                    let mut f = rest.split_whitespace();
                    let state = f.next()?;
                    let parent: u32 = f.next()?.parse().ok()?;
                    Some(parent == ppid && state != "Z")
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s[s.rfind(')')? + 2..]
                .split_whitespace()
                .next()
                .map(|st| st != "Z")
        })
        .unwrap_or(false)
}

/// A throwaway redis-server on a free port, killed on drop.
pub struct RedisServer {
    port: u16,
    proc: Option<Proc>,
}

impl RedisServer {
    /// None (with a printed reason) when redis-server is not installed and VTOX_REQUIRE_REDIS
    /// is unset; CI sets it so a missing install fails instead of skipping.
    pub fn start_or_skip() -> Option<RedisServer> {
        let present = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            if std::env::var_os("VTOX_REQUIRE_REDIS").is_some() {
                panic!("redis-server is not installed but VTOX_REQUIRE_REDIS is set");
            }
            eprintln!("skipping: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        // A port from free_port() is only probably free: a parallel test can take it before
        // redis-server binds. A server that could not bind exits, so retry on a new port.
        for _ in 0..5 {
            let mut r = RedisServer {
                port: free_port(),
                proc: None,
            };
            if r.try_start() {
                return Some(r);
            }
        }
        panic!("redis-server did not start on any of five free ports");
    }

    /// Starts (or restarts) the server on its port; panics when it does not come up.
    pub fn start(&mut self) {
        assert!(
            self.try_start(),
            "redis-server did not start on {}",
            self.addr()
        );
    }

    /// True once this server answers PING. Checking the answer, not only that the port
    /// accepts connections, keeps another process that briefly listens there (or a TCP
    /// self-connect on an ephemeral port) from passing for redis.
    fn try_start(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut proc = Proc {
            child,
            name: "redis-server".into(),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if proc.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            let pong = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok_and(|p| p == "PONG") {
                self.proc = Some(proc);
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn stop(&mut self) {
        // Dropping the Proc kills and reaps it.
        self.proc = None;
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    pub fn xrange(&self, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut con = client.get_connection().expect("connect to redis");
        let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut con)
            .expect("XRANGE");
        raw.into_iter()
            .map(|(id, flat)| {
                let pairs = flat
                    .chunks(2)
                    .map(|c| (c[0].clone(), c[1].clone()))
                    .collect();
                (id, pairs)
            })
            .collect()
    }
}
