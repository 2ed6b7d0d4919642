//! `run --local`: a coordinator (in this process), one agent and, without `--target`, a
//! `vtox-sink`, all on free loopback ports; every process is stopped when the run ends.

use crate::server::Coordinator;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

pub struct LocalCluster {
    pub coord_url: String,
    pub target: String,
    /// The dashboard, unless --no-web.
    pub web: Option<crate::web::WebServer>,
    children: Vec<(&'static str, Child)>,
    server_stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<()>>,
}

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this binary's path")?;
    let path = me.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found beside {}; build all binaries (cargo build --release)",
            name,
            me.display()
        );
    }
    Ok(path)
}

async fn wait_listening(addr: &str, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Where a local cluster's dashboard listens (None: no dashboard), and the Redis it watches.
pub struct LocalWeb {
    pub listen: std::net::SocketAddr,
    pub redis: crate::args::RedisArgs,
}

pub async fn start(target: Option<String>, web: Option<LocalWeb>) -> Result<LocalCluster> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on loopback")?;
    let addr = listener.local_addr()?;
    // `serve`'s own defaults, so that a local run behaves like a served one.
    let serve = crate::args::ServeArgs::defaults()?;
    let coord =
        Coordinator::new(crate::server::Settings::of(&serve)).map_err(|e| anyhow::anyhow!(e))?;
    let coord_for_web = coord.clone();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve::serve_on(
        listener,
        coord,
        vtox::auth::Check::default(),
        None,
        serve.max_message_bytes,
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut cluster = LocalCluster {
        coord_url: format!("http://{addr}"),
        target: String::new(),
        web: None,
        children: Vec::new(),
        server_stop: Some(stop_tx),
        server,
    };
    let logs = std::env::temp_dir().join(format!("vtox-local-{}", std::process::id()));
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;

    let sink_started = target.is_none();
    cluster.target = match target {
        Some(t) => t,
        None => {
            // Bind to learn a free port, then hand it to the sink.
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let sink_addr = format!("127.0.0.1:{port}");
            let child = Command::new(sibling("vtox-sink")?)
                .args(["--listen", &sink_addr])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start vtox-sink")?;
            cluster.children.push(("vtox-sink", child));
            if !wait_listening(&sink_addr, Duration::from_secs(10)).await {
                cluster.shutdown().await;
                bail!("vtox-sink did not come up on {sink_addr}");
            }
            eprintln!("local sink on http://{sink_addr}");
            format!("http://{sink_addr}")
        }
    };
    let agent = Command::new(sibling("vtox-agent")?)
        .args(["--join", &addr.to_string(), "--name", "local", "--log-dir"])
        .arg(&logs)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start vtox-agent")?;
    cluster.children.push(("vtox-agent", agent));
    eprintln!(
        "local coordinator on {}, agent logs in {}",
        cluster.coord_url,
        logs.display()
    );
    if let Some(w) = web {
        let opts = crate::web::WebOptions {
            listen: w.listen,
            insecure: false,
            grpc: crate::client::Coord::new(&cluster.coord_url, &crate::client::Access::default()),
            grpc_tls: false,
            default_target: Some(cluster.target.clone()),
            local_sink: sink_started,
            redis: w.redis,
        };
        match crate::web::start(coord_for_web, opts).await {
            Ok(server) => {
                eprintln!("dashboard on http://{}/", server.addr);
                cluster.web = Some(server);
            }
            Err(e) => {
                cluster.shutdown().await;
                return Err(e);
            }
        }
    }
    Ok(cluster)
}

impl LocalCluster {
    /// Stops the agent first (it stops its simulators), then the sink, then the server.
    pub async fn shutdown(mut self) {
        for (name, child) in self.children.iter_mut().rev() {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                tracing::warn!("{name} did not stop in time; killing it");
                let _ = child.kill().await;
            }
        }
        if let Some(tx) = self.server_stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.server).await;
    }
}
