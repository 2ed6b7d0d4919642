//! `vtox-agent`: joins a coordinator, reports this host's hardware, runs the simulator
//! instances it is assigned and streams their metrics back. One per host.

mod control;
mod links;
mod meter;
mod supervisor;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};

/// Join a vtox coordinator and run the simulator instances it assigns to this host.
///
/// The agent measures the host (cores, memory, link speed, and what a message and a simulator
/// process cost, by running the real simulator and sink for 1.5 s), joins, and keeps a session
/// open. It starts one `vtox-sim` per assigned instance at a lower CPU priority than itself,
/// restarts crashed ones with backoff, and stops them all when told, when the coordinator has
/// been silent longer than the lease, or when it exits itself. Its lease, heartbeats and the
/// simulators' keep-alive run on a thread of their own, so that the load it drives cannot
/// make it miss its coordinator.
#[derive(Debug, Parser)]
#[command(name = "vtox-agent", version)]
struct Args {
    /// Coordinator address, HOST:PORT (or a full http:// URL).
    #[arg(long, value_name = "HOST:PORT")]
    join: String,
    /// Name of this agent, unique within the coordinator [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Never carry more vehicles than this, whatever the hardware allows.
    #[arg(long)]
    max_vehicles: Option<u64>,
    /// The simulator binary [default: vtox-sim beside this binary].
    #[arg(long, value_name = "PATH")]
    sim_bin: Option<PathBuf>,
    /// Directory for each instance's stderr (instance-N.log).
    #[arg(long, value_name = "DIR", default_value = "vtox-logs")]
    log_dir: PathBuf,
    /// Link speed in Mbit/s when /sys/class/net does not tell (virtual NICs).
    #[arg(long, value_name = "MBPS")]
    network_mbps: Option<u32>,
    /// The CA that signed the coordinator's certificate: join over TLS (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This agent's certificate for mutual TLS (PEM; with --tls-key and --tls-ca).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// File holding the coordinator's shared token (or VTOX_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve Prometheus metrics of this host's instances at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Niceness of the simulators (0..19): they yield the CPU to the agent, so that a host
    /// driven past its capacity slows its generators (and says so) rather than the agent's
    /// lease. 0 runs them at the agent's own priority.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    sim_nice: i32,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = vtox::process::LogFormat::Text)]
    log_format: vtox::process::LogFormat,
}

fn coordinator_url(join: &str) -> Result<String> {
    let url = if join.contains("://") {
        join.to_string()
    } else {
        format!("http://{join}")
    };
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("--join {join:?} is not HOST:PORT"))?;
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        bail!("--join {join:?} must name a host and a port, e.g. coord:50051");
    }
    Ok(url)
}

fn main() -> ExitCode {
    let args = Args::parse();
    vtox::process::init_logs(args.log_format, "info");
    let url = match coordinator_url(&args.join) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let sim_bin = match args.sim_bin.clone().map(Ok).unwrap_or_else(default_sim_bin) {
        Ok(p) if p.is_file() => p,
        Ok(p) => {
            eprintln!(
                "error: simulator binary {} not found; pass --sim-bin",
                p.display()
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, url, sim_bin)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn default_sim_bin() -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this binary's path; pass --sim-bin")?;
    Ok(me.with_file_name("vtox-sim"))
}

async fn run(args: Args, url: String, sim_bin: PathBuf) -> Result<()> {
    let token = vtox::auth::load(args.token_file.as_deref(), std::env::var("VTOX_TOKEN").ok())?;
    let bearer = vtox::auth::Bearer::new(token.as_deref())?;
    let tls = vtox::auth::client_tls(
        args.tls_ca.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
    )?;
    let url = match (&tls, url.split_once("://")) {
        (Some(_), Some((_, rest))) => format!("https://{rest}"),
        _ => url,
    };
    std::fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("cannot create the log directory {}", args.log_dir.display()))?;
    let name = match args.name.clone() {
        Some(n) if n.trim().is_empty() => bail!("--name must not be empty"),
        Some(n) => n,
        None => sysinfo::System::host_name().unwrap_or_else(|| "agent".to_string()),
    };
    let hardware = tokio::task::spawn_blocking({
        let name = name.clone();
        let mbps = args.network_mbps;
        let bins = vtox::hardware::Binaries::beside(sim_bin.clone());
        move || vtox::hardware::detect(&name, mbps, Some(&bins))
    })
    .await?;
    let c = hardware.calibration.clone().unwrap_or_default();
    tracing::info!(
        name,
        cores = hardware.logical_cores,
        memory_gib = hardware.memory_total_bytes as f64 / (1u64 << 30) as f64,
        link_mbps = hardware.link_mbps,
        msgs_per_core = hardware.calibrated_msgs_per_core.round(),
        sim_us_per_msg = format!("{:.1}", c.sim_us_per_msg),
        process_cores = format!("{:.4}", c.process_cores),
        sink_us_per_msg = format!("{:.1}", c.sink_us_per_msg),
        method = c.method,
        "measured this host"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        vtox::process::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let health = Arc::new(Mutex::new(vtox::agent::Health::new(
        vtox::agent::LEASE_BEFORE_JOIN,
    )));
    let keep_alive = links::KeepAlive::default();
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(links::Snapshot::default()));
    let (desired_tx, desired_rx) = watch::channel(links::Desired::default());
    let (sup_tx, sup_rx) = mpsc::channel(4);
    let cfg = supervisor::Config {
        sim_bin,
        log_dir: args.log_dir.clone(),
        agent: name.clone(),
        nice: args.sim_nice,
    };
    let sup_task = tokio::spawn(supervisor::run(
        cfg,
        desired_rx,
        sup_rx,
        supervisor::Links {
            snapshot: snapshot_tx,
            health: health.clone(),
            keep_alive: keep_alive.clone(),
        },
    ));
    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr, name.clone(), snapshot_rx.clone()).await?;
    }
    let session = control::Session {
        url,
        name,
        hardware,
        max_vehicles: args.max_vehicles,
        bearer,
        tls,
    };
    let links = control::Links {
        desired: desired_tx,
        snapshot: snapshot_rx,
        health,
        keep_alive,
    };
    // The control thread returns when the agent stops (a signal) or is refused for good.
    let thread = control::spawn(session, links, stop_rx)?;
    let outcome = tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("the control thread")?
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the control thread panicked")));
    tracing::info!("stopping");
    shutdown(sup_tx, sup_task).await;
    outcome
}

async fn shutdown(tx: mpsc::Sender<supervisor::Command>, task: tokio::task::JoinHandle<()>) {
    let (done_tx, done_rx) = oneshot::channel();
    if tx
        .send(supervisor::Command::Shutdown(done_tx))
        .await
        .is_ok()
    {
        let _ = done_rx.await;
    }
    let _ = task.await;
}

/// `/metrics` for this host: the supervisor's statuses as Prometheus text.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    name: String,
    snapshot: watch::Receiver<Arc<links::Snapshot>>,
) -> Result<()> {
    vtox::process::serve_metrics(addr, move || {
        let (name, snapshot) = (name.clone(), snapshot.clone());
        async move {
            let snap = snapshot.borrow().clone();
            vtox::prometheus::agent(&name, &snap.instances)
        }
    })
    .await
    .with_context(|| format!("cannot listen on {addr} for metrics"))
}
