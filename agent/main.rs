//! `vtox-agent`: joins a coordinator, reports this host's hardware, runs the simulator
//! instances it is assigned and streams their metrics back. One per host.

mod supervisor;

use vtox::hardware;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use vtox::wire::pb::agent_service_client::AgentServiceClient;
use vtox::wire::pb::{self, agent_message, coordinator_message};
use vtox::wire::PROTOCOL_MAJOR;

/// Join a vtox coordinator and run the simulator instances it assigns to this host.
///
/// The agent measures the host (cores, memory, link speed, and how many messages one core
/// generates), joins, and keeps a session open. It starts one `vtox-sim` per assigned
/// instance, restarts crashed ones with backoff, and stops them all when told, when the
/// coordinator has been silent longer than the lease, or when it exits itself.
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
        move || hardware::detect(&name, mbps)
    })
    .await?;
    tracing::info!(
        name,
        cores = hardware.logical_cores,
        memory_gib = hardware.memory_total_bytes as f64 / (1u64 << 30) as f64,
        link_mbps = hardware.link_mbps,
        msgs_per_core = hardware.calibrated_msgs_per_core.round(),
        "measured this host"
    );

    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        vtox::process::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let mut sup_tx: Option<mpsc::Sender<supervisor::Command>> = None;
    let mut sup_task = None;
    let mut backoff = Duration::from_millis(250);
    loop {
        let joined = tokio::select! {
            r = join(&url, &name, &hardware, args.max_vehicles, &bearer, tls.clone()) => r,
            _ = stop_rx.changed() => break,
        };
        let (client, reply) = match joined {
            Ok(j) => j,
            Err(JoinError::Refused(status)) => {
                // A refusal (bad token, duplicate name, unsupported version) will not change by
                // retrying: say why and stop.
                shutdown(sup_tx.take(), sup_task.take()).await;
                bail!(
                    "the coordinator at {url} refused this agent: {}",
                    status.message()
                );
            }
            Err(JoinError::Unreachable(e)) => {
                tracing::warn!(
                    "cannot reach the coordinator at {url}: {e}; retrying in {backoff:?}"
                );
                tokio::select! {
                    _ = tokio::time::sleep(jittered(backoff)) => {}
                    _ = stop_rx.changed() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(250);
        let lease = Duration::from_millis(reply.lease_ms.max(500));
        let heartbeat = Duration::from_millis(reply.heartbeat_ms.clamp(100, 60_000));
        let tx = match &sup_tx {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel(64);
                let cfg = supervisor::Config {
                    sim_bin: sim_bin.clone(),
                    log_dir: args.log_dir.clone(),
                    agent: name.clone(),
                    lease,
                };
                sup_task = Some(tokio::spawn(supervisor::run(cfg, rx)));
                sup_tx = Some(tx.clone());
                if let Some(addr) = args.metrics_listen {
                    serve_metrics(addr, name.clone(), tx.clone()).await?;
                }
                tx
            }
        };
        tracing::info!(agent_id = reply.agent_id, "joined {url}");
        match session(client, &reply.agent_id, tx, heartbeat, &mut stop_rx).await {
            Ok(SessionEnd::Stop) => break,
            Ok(SessionEnd::Lost(why)) => {
                tracing::warn!("session with the coordinator ended: {why}; rejoining")
            }
            Err(e) => tracing::warn!("session with the coordinator failed: {e:#}; rejoining"),
        }
        tokio::select! {
            _ = tokio::time::sleep(jittered(backoff)) => {}
            _ = stop_rx.changed() => break,
        }
    }
    tracing::info!("stopping");
    shutdown(sup_tx, sup_task).await;
    Ok(())
}

async fn shutdown(
    tx: Option<mpsc::Sender<supervisor::Command>>,
    task: Option<tokio::task::JoinHandle<()>>,
) {
    if let Some(tx) = tx {
        let (done_tx, done_rx) = oneshot::channel();
        if tx
            .send(supervisor::Command::Shutdown(done_tx))
            .await
            .is_ok()
        {
            let _ = done_rx.await;
        }
    }
    if let Some(t) = task {
        let _ = t.await;
    }
}

/// Up to ±25% around `d`, so that agents cut off together do not reconnect in lockstep.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let f = 0.75 + 0.5 * (vtox::rng::unit(vtox::rng::mix64(u64::from(nanos))));
    d.mul_f64(f)
}

type Client = AgentServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, vtox::auth::Bearer>,
>;

enum JoinError {
    Refused(tonic::Status),
    Unreachable(String),
}

async fn join(
    url: &str,
    name: &str,
    hardware: &pb::Hardware,
    max_vehicles: Option<u64>,
    bearer: &vtox::auth::Bearer,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<(Client, pb::JoinResponse), JoinError> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| JoinError::Unreachable(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    let endpoint = match tls {
        Some(t) => endpoint
            .tls_config(t)
            .map_err(|e| JoinError::Unreachable(e.to_string()))?,
        None => endpoint,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| JoinError::Unreachable(e.to_string()))?;
    let mut client = AgentServiceClient::with_interceptor(channel, bearer.clone());
    let req = pb::JoinRequest {
        name: name.to_string(),
        hardware: Some(hardware.clone()),
        max_vehicles: max_vehicles.unwrap_or(0),
        protocol_major: PROTOCOL_MAJOR,
    };
    match client.join(req).await {
        Ok(r) => Ok((client, r.into_inner())),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::ResourceExhausted
            ) =>
        {
            Err(JoinError::Unreachable(s.message().to_string()))
        }
        Err(s) => Err(JoinError::Refused(s)),
    }
}

enum SessionEnd {
    Stop,
    Lost(String),
}

async fn session(
    mut client: Client,
    agent_id: &str,
    sup: mpsc::Sender<supervisor::Command>,
    heartbeat: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Result<SessionEnd> {
    let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(16);
    let epoch = snapshot(&sup).await.map(|s| s.epoch).unwrap_or(0);
    out_tx
        .send(pb::AgentMessage {
            msg: Some(agent_message::Msg::Hello(pb::Hello {
                agent_id: agent_id.to_string(),
                epoch,
            })),
        })
        .await?;
    let mut inbound = client
        .session(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    let mut sys = sysinfo::System::new();
    let mut tick = tokio::time::interval(heartbeat);
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(pb::CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(a)) })) => {
                    if sup.send(supervisor::Command::Apply(Box::new(a))).await.is_err() {
                        bail!("the supervisor stopped");
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return Ok(SessionEnd::Lost("the coordinator closed the session".into())),
                Err(s) => return Ok(SessionEnd::Lost(s.message().to_string())),
            },
            _ = tick.tick() => {
                let Some(snap) = snapshot(&sup).await else { bail!("the supervisor stopped") };
                sys.refresh_cpu_usage();
                let usage = pb::HostUsage {
                    cpu_percent: f64::from(sys.global_cpu_usage()),
                    rss_bytes: snap.rss_bytes,
                    simulators_cpu_percent: snap.simulators_cpu_percent,
                    cores: sys.cpus().len() as u32,
                };
                let hb = pb::Heartbeat { epoch: snap.epoch, instances: snap.instances, usage: Some(usage) };
                if out_tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Heartbeat(hb)) }).await.is_err() {
                    return Ok(SessionEnd::Lost("the session's stream closed".into()));
                }
            }
            _ = stop.changed() => return Ok(SessionEnd::Stop),
        }
    }
}

/// `/metrics` for this host: the supervisor's statuses as Prometheus text.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    name: String,
    sup: mpsc::Sender<supervisor::Command>,
) -> Result<()> {
    vtox::process::serve_metrics(addr, move || {
        let (name, sup) = (name.clone(), sup.clone());
        async move {
            let instances = snapshot(&sup)
                .await
                .map(|s| s.instances)
                .unwrap_or_default();
            vtox::prometheus::agent(&name, &instances)
        }
    })
    .await
    .with_context(|| format!("cannot listen on {addr} for metrics"))
}

async fn snapshot(sup: &mpsc::Sender<supervisor::Command>) -> Option<supervisor::Snapshot> {
    let (tx, rx) = oneshot::channel();
    sup.send(supervisor::Command::Snapshot(tx)).await.ok()?;
    rx.await.ok()
}
