//! The CLI commands: each talks to a coordinator over gRPC (or plans offline) and prints
//! tables for people or one JSON object for scripts.

use crate::backend::{self, BackendRedis, Sampler};
use crate::drive;
use crate::planning::{self, Host};
use crate::render::{gib, link, plan_json, plan_table, status_json, summary, LiveView};
use crate::server::{AgentApi, ControlApi, Coordinator, Settings};
use crate::{
    AgentsArgs, CapacityArgs, CoordArg, LoadArgs, PlanArgs, RunArgs, ServeArgs, StatusArgs,
};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};
use vtox::backlog;
use vtox::capacity;
use vtox::wire::pb::control_service_server::ControlServiceServer;
use vtox::wire::pb::{
    self, agent_service_server::AgentServiceServer, control_service_client::ControlServiceClient,
};

/// Largest reply the CLI accepts from the coordinator.
const STATUS_MAX_BYTES: usize = 256 << 20;

/// Backlog samples a run keeps (one a second): its summary judges the last minute.
const RUN_SAMPLES: usize = 60;
/// Seconds of samples behind the live views' backlog trend.
const LIVE_WINDOW: usize = 10;
/// Samples a one-shot `status --redis` takes, a second apart.
const STATUS_SAMPLES: usize = 3;

/// The shared token of this invocation (`--token-file` or `VTOX_TOKEN`), set once by main.
pub static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// TLS of this invocation: the server's for `serve`, the client's for the other commands.
pub static SERVER_TLS: std::sync::OnceLock<Option<tonic::transport::ServerTlsConfig>> =
    std::sync::OnceLock::new();
pub static CLIENT_TLS: std::sync::OnceLock<Option<tonic::transport::ClientTlsConfig>> =
    std::sync::OnceLock::new();

pub(crate) fn token() -> Option<&'static str> {
    TOKEN.get().and_then(|t| t.as_deref())
}

pub type ControlClient = ControlServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, vtox::auth::Bearer>,
>;

impl ServeArgs {
    /// `serve`'s defaults, for the coordinator that `--local` runs in-process.
    pub fn defaults() -> Result<ServeArgs> {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            serve: ServeArgs,
        }
        use clap::Parser as _;
        Ok(Only::try_parse_from(["vtox-coord"])
            .map_err(|e| anyhow!("serve's defaults: {e}"))?
            .serve)
    }

    pub fn settings(&self) -> Settings {
        Settings {
            lease: self.lease,
            heartbeat: self.heartbeat,
            grace: self.grace,
            state_dir: self.state_dir.clone(),
            max_agents: self.max_agents,
            max_join_rate: self.max_join_rate,
        }
    }
}

pub async fn serve(a: ServeArgs) -> Result<()> {
    if !a.listen.ip().is_loopback() && token().is_none() && !a.insecure {
        bail!(
            "refusing to listen on {} without a token: anyone who reaches it could join or drive the fleet; pass --token-file (or VTOX_TOKEN), or --insecure",
            a.listen
        );
    }
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let coord = Coordinator::new(a.settings()).map_err(|e| anyhow!(e))?;
    if let Some(addr) = a.metrics_listen {
        let c = coord.clone();
        vtox::process::serve_metrics(addr, move || {
            let text = c.prometheus();
            async move { text }
        })
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    }
    // Kept for the life of the server: dropping it stops the dashboard.
    let _web = match a.web_listen {
        Some(listen) => Some(
            crate::web::start(
                coord.clone(),
                crate::web::WebOptions {
                    listen,
                    insecure: a.insecure,
                    grpc_url: own_url(a.listen),
                    grpc_tls: SERVER_TLS.get().is_some_and(Option::is_some),
                    default_target: None,
                    local_sink: false,
                    redis: a.redis.clone(),
                },
            )
            .await?,
        ),
        None => None,
    };
    tracing::info!("coordinator listening on {}", a.listen);
    serve_on(
        listener,
        coord,
        vtox::auth::Check::new(token().map(String::from)),
        SERVER_TLS.get().cloned().flatten(),
        a.max_message_bytes,
        async {
            vtox::process::shutdown_signal().await;
            tracing::info!("stopping");
        },
    )
    .await
}

/// How this coordinator reaches its own gRPC (ramps started from the dashboard): a wildcard
/// address is reached on loopback.
fn own_url(listen: std::net::SocketAddr) -> String {
    let ip = if listen.ip().is_unspecified() {
        match listen {
            std::net::SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        listen.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(ip, listen.port()))
}

/// Serves the coordinator on a bound listener until `shutdown` resolves.
pub async fn serve_on(
    listener: TcpListener,
    coord: Arc<Coordinator>,
    check: vtox::auth::Check,
    tls: Option<tonic::transport::ServerTlsConfig>,
    max_message_bytes: usize,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<AgentServiceServer<AgentApi>>().await;
    reporter
        .set_serving::<ControlServiceServer<ControlApi>>()
        .await;
    let reconcile = tokio::spawn(coord.clone().reconcile_loop());
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("the TLS certificate or key is not usable")?;
    }
    let result = builder
        .add_service(health)
        .add_service(InterceptedService::new(
            AgentServiceServer::new(AgentApi(coord.clone()))
                .max_decoding_message_size(max_message_bytes),
            check.clone(),
        ))
        .add_service(InterceptedService::new(
            ControlServiceServer::new(ControlApi(coord))
                .max_decoding_message_size(max_message_bytes),
            check,
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    reconcile.abort();
    result.context("the gRPC server failed")
}

fn normalize(url: &str) -> String {
    let tls = CLIENT_TLS.get().is_some_and(Option::is_some);
    match url.split_once("://") {
        // With TLS configured, the scheme follows it, whatever was typed.
        Some((_, rest)) if tls => format!("https://{rest}"),
        Some(_) => url.to_string(),
        None if tls => format!("https://{url}"),
        None => format!("http://{url}"),
    }
}

pub async fn connect(url: &str) -> Result<ControlClient> {
    let url = normalize(url);
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|_| anyhow!("{url:?} is not a coordinator address (HOST:PORT)"))?
        .connect_timeout(Duration::from_secs(3));
    let endpoint = match CLIENT_TLS.get().cloned().flatten() {
        Some(tls) => endpoint.tls_config(tls).map_err(|e| anyhow!("TLS: {e}"))?,
        None => endpoint,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach the coordinator at {url}: {}", root_cause(&e)))?;
    let bearer = vtox::auth::Bearer::new(token()).map_err(|e| anyhow!("token: {e}"))?;
    // A status of 10,000 agents lists 20,000 instances: far beyond tonic's 4 MiB default.
    Ok(ControlServiceClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(STATUS_MAX_BYTES))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    match s.code() {
        // Transport failures surface as these codes with protocol jargon; say what to check.
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal => anyhow!(
            "the coordinator did not answer properly ({}): is it running, and if it uses TLS, did you pass --tls-ca?",
            s.message()
        ),
        _ => anyhow!("{}", s.message()),
    }
}

/// A plan request for `n` vehicles at `load`; `sink_on_host` when the target is a vtox-sink
/// on the agents' own host (`--local`), whose cost then counts against their cores.
pub(crate) fn params_of(n: u64, load: &LoadArgs, sink_on_host: bool) -> pb::PlanParams {
    pb::PlanParams {
        vehicles: n,
        first_vehicle: 0,
        per_instance: load.per_instance.unwrap_or(0),
        interval_s: load.interval.as_secs_f64(),
        batch_size: load.batch_size,
        overcommit: load.overcommit,
        sink_on_host,
    }
}

/// The hosts to plan over: hypothetical ones, a coordinator's agents, or this machine.
async fn hosts_from(
    coord: Option<&str>,
    hosts: Option<&str>,
    cap: Option<u64>,
) -> Result<Vec<Host>> {
    let mut list = if let Some(spec) = hosts {
        capacity::parse_hosts(spec)?
            .into_iter()
            .map(|h| Host {
                name: h.name.clone(),
                hardware: planning::hardware_of(&h),
                max_vehicles: h.max_vehicles.unwrap_or(0),
            })
            .collect()
    } else if let Some(url) = coord {
        let mut client = connect(url).await?;
        let agents = client
            .list_agents(pb::ListAgentsRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .agents;
        agents
            .into_iter()
            .filter(|a| a.connected)
            .map(|a| Host {
                name: a.name,
                hardware: a.hardware.unwrap_or_default(),
                max_vehicles: a.max_vehicles,
            })
            .collect()
    } else {
        eprintln!("measuring this machine (a simulator and a sink on loopback for 1.5 s)…");
        let bins = std::env::current_exe()
            .ok()
            .map(|me| vtox::hardware::Binaries::beside(me.with_file_name("vtox-sim")))
            .filter(|b| b.sim.is_file());
        let hw = tokio::task::spawn_blocking(move || {
            vtox::hardware::detect("localhost", None, bins.as_ref())
        })
        .await?;
        vec![Host {
            name: "localhost".into(),
            hardware: hw,
            max_vehicles: 0,
        }]
    };
    if let Some(cap) = cap {
        for h in &mut list {
            h.max_vehicles = if h.max_vehicles == 0 {
                cap
            } else {
                h.max_vehicles.min(cap)
            };
        }
    }
    Ok(list)
}

pub async fn plan(a: PlanArgs) -> Result<ExitCode> {
    let hosts = hosts_from(a.coord.as_deref(), a.hosts.as_deref(), a.max_vehicles).await?;
    let params = pb::PlanParams {
        first_vehicle: a.first_vehicle,
        ..params_of(a.vehicles, &a.load, a.local)
    };
    let (_, reply) = planning::plan_hosts(&hosts, &params).map_err(|e| anyhow!(e))?;
    if a.json {
        println!("{}", plan_json(&reply));
    } else {
        print!("{}", plan_table(&reply));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn capacity(a: CapacityArgs) -> Result<ExitCode> {
    let hosts = hosts_from(a.coord.as_deref(), a.hosts.as_deref(), None).await?;
    let load = planning::load_params(&params_of(1, &a.load, a.local));
    let rows: Vec<(Host, capacity::Estimate)> = hosts
        .into_iter()
        .map(|h| {
            let e = capacity::estimate(&planning::host_spec(&h), &load);
            (h, e)
        })
        .collect();
    if a.json {
        let v: Vec<Value> = rows
            .iter()
            .map(|(h, e)| {
                let reference = capacity::reference_for_cores(h.hardware.logical_cores);
                json!({
                    "name": h.name,
                    "cores": h.hardware.logical_cores,
                    "memory_bytes": h.hardware.memory_total_bytes,
                    "link_mbps": h.hardware.link_mbps,
                    "msgs_per_core": h.hardware.calibrated_msgs_per_core,
                    "cpu_vehicles": e.cpu_vehicles,
                    "memory_vehicles": e.memory_vehicles,
                    "network_vehicles": e.network_vehicles,
                    "max_vehicles": e.max_vehicles,
                    "recommended_vehicles": e.recommended_vehicles,
                    "limited_by": e.limited_by.to_string(),
                    "per_process_vehicles": e.per_process_vehicles,
                    "processes": e.processes,
                    "calibration": h.hardware.calibration.as_ref().map(|c| json!({
                        "method": c.method,
                        "sim_us_per_msg": c.sim_us_per_msg,
                        "process_cores": c.process_cores,
                        "process_rss_bytes": c.process_rss_bytes,
                        "sink_us_per_msg": c.sink_us_per_msg,
                    })),
                    "reference": reference.map(|(m, r)| json!({"max_vehicles": m, "recommended_vehicles": r})),
                })
            })
            .collect();
        println!("{}", json!({ "hosts": v }));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:>5} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}  {:<13}",
        "host",
        "cores",
        "memory",
        "link",
        "msg/core",
        "cpu",
        "memory",
        "network",
        "max",
        "rec",
        "old tool"
    );
    for (h, e) in &rows {
        let reference = capacity::reference_for_cores(h.hardware.logical_cores)
            .map(|(m, r)| format!("{m}/{r}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:>5} {:>10} {:>11} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>8}  {:<13} (limited by {})",
            h.name,
            h.hardware.logical_cores,
            gib(h.hardware.memory_total_bytes),
            link(h.hardware.link_mbps),
            h.hardware.calibrated_msgs_per_core,
            e.cpu_vehicles,
            e.memory_vehicles,
            e.network_vehicles.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            e.max_vehicles,
            e.recommended_vehicles,
            reference,
            e.limited_by
        );
    }
    println!(
        "at one message every {:.1} s of {} samples{}; \"old tool\" is the Python tool's table for the same cores (max/recommended)",
        load.interval_s,
        load.batch_size,
        if load.sink_on_host {
            ", with the built-in sink on the same cores (--local)"
        } else {
            ""
        }
    );
    for (h, e) in &rows {
        println!("{}: {}", h.name, calibration_words(&h.hardware, e));
    }
    Ok(ExitCode::SUCCESS)
}

/// What a host's estimate rests on, in words.
fn calibration_words(hw: &pb::Hardware, e: &capacity::Estimate) -> String {
    let per_process = format!(
        "{} process{} of up to {} vehicles",
        e.processes,
        if e.processes == 1 { "" } else { "es" },
        e.per_process_vehicles
    );
    match &hw.calibration {
        Some(c) if c.method == "processes" => format!(
            "measured with real processes: {:.1} µs of CPU a message, {:.2} % of a core per simulator process, {:.0} MiB each{}; at its maximum it runs {per_process}",
            c.sim_us_per_msg,
            c.process_cores * 100.0,
            c.process_rss_bytes as f64 / (1u64 << 20) as f64,
            if c.sink_us_per_msg > 0.0 {
                format!(", vtox-sink {:.1} µs a message", c.sink_us_per_msg)
            } else {
                String::new()
            }
        ),
        Some(c) => format!(
            "payload code timed in-process ({:.1} µs a message with an assumed network share; no simulator binary to run); {per_process}",
            c.sim_us_per_msg
        ),
        None => format!(
            "not measured: {:.0} messages a second per core assumed; {per_process}",
            capacity::DEFAULT_MSGS_PER_CORE
        ),
    }
}

pub async fn run(a: RunArgs) -> Result<ExitCode> {
    a.drive.check()?;
    // Reached before any process starts, so that a wrong --redis costs nothing.
    let redis = BackendRedis::connect(&a.drive.redis).await?;
    let (cluster, coord_url, target) = a.drive.endpoints().await?;
    let outcome = drive(&a, &coord_url, &target, redis).await;
    if let Some(c) = cluster {
        c.shutdown().await;
    }
    outcome
}

async fn drive(
    a: &RunArgs,
    coord_url: &str,
    target: &str,
    mut redis: Option<BackendRedis>,
) -> Result<ExitCode> {
    let d = &a.drive;
    let mut client = connect(coord_url).await?;
    drive::wait_for_agents(&mut client, d.expect_agents, d.wait).await?;
    let req = pb::StartRequest {
        params: Some(pb::PlanParams {
            first_vehicle: a.first_vehicle,
            ..d.params(a.vehicles)
        }),
        spec: Some(d.spec(target, a.duration)),
        expect_agents: d.expect_agents,
    };
    let score_from = match &mut redis {
        Some(r) => Some(r.server_ms().await?),
        None => None,
    };
    let started = client.start(req).await.map_err(status_error)?.into_inner();
    let sampler = redis.clone().map(|r| Sampler::start(r, RUN_SAMPLES));
    let tolerance = d.redis.tolerance();
    let backlog_view = || {
        sampler
            .as_ref()
            .map(|s| s.view(LIVE_WINDOW, tolerance))
            .unwrap_or_default()
    };
    if let Some(plan) = &started.plan {
        eprint!("{}", plan_table(plan));
    }
    eprintln!(
        "run {} started against {target}; Ctrl-C stops it",
        started.run_id
    );

    let mut view = LiveView::new();
    // The summary judges the backend's streams while the fleet drove, not as it wound down.
    let mut driving_until = backend::unix_now();
    let mut shutdown = drive::shutdown_signal();
    let watched = drive::watch_run(
        &mut client,
        coord_url,
        &started.run_id,
        Duration::from_secs(1),
        &mut shutdown,
        |status| {
            view.show(status, &backlog_view());
            if status.state() == pb::RunState::Running {
                driving_until = backend::unix_now();
            }
        },
    )
    .await?;
    let mut last = watched.last;
    if watched.interrupted {
        eprintln!("stopping the run");
        last = Some(drive::stop_and_settle(&mut client, &started.run_id).await?);
    } else if last
        .as_ref()
        .is_some_and(|s| matches!(s.state(), pb::RunState::Stopped | pb::RunState::Failed))
    {
        // Stopped from elsewhere (`vtox-coord stop`), or failed: the last counts are still on
        // their way.
        last = Some(drive::settled(&mut client, &started.run_id).await?);
    }
    let status = last.ok_or_else(|| anyhow!("no status received"))?;
    let totals = status.totals.clone().unwrap_or_default();
    let success = totals.success_percent();
    let mut out = status_json(&status);
    let mut text = summary(&status);
    if let (Some(r), Some(sampler)) = (&mut redis, &sampler) {
        let window = backlog::window(&sampler.between(0.0, driving_until), tolerance);
        if let Some(w) = &window {
            text.push_str(&w.table());
        }
        out["backend_pipeline"] = json!(window);
        match r.score(score_from).await {
            Ok(card) => {
                text.push_str(&card.table());
                out["diagnosis"] = card.json();
            }
            Err(e) => eprintln!("warning: cannot score the diagnoses: {e:#}"),
        }
    }
    if a.json {
        println!("{out}");
    } else {
        print!("{text}");
    }
    if status.state() == pb::RunState::Failed {
        eprintln!("error: the run failed: {}", status.failure);
        return Ok(ExitCode::FAILURE);
    }
    if totals.sent == 0 {
        eprintln!("error: no message was sent");
        return Ok(ExitCode::FAILURE);
    }
    let generator = crate::render::generator_verdict(&status);
    if !generator.healthy {
        eprintln!(
            "warning: the generator could not keep up ({}); the numbers above measure vtox's hosts, not the backend",
            generator.reasons.join("; ")
        );
    }
    if success < d.min_success {
        eprintln!(
            "error: {success:.2}% of requests succeeded, below --min-success {}",
            d.min_success
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(a: StatusArgs) -> Result<ExitCode> {
    a.redis.check()?;
    let mut client = connect(&a.coord.coord).await?;
    let redis = BackendRedis::connect(&a.redis).await?;
    if !a.watch {
        let s = client
            .status(pb::StatusRequest {
                fresh: true,
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        // Whether a backlog grows takes more than one look: three samples a second apart.
        let window = match redis {
            Some(mut r) => {
                let mut samples = Vec::new();
                for i in 0..STATUS_SAMPLES {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    let mut next = r.sample().await?;
                    if let Some(prev) = samples.last() {
                        backlog::carry(prev, &mut next);
                    }
                    samples.push(next);
                }
                backlog::window(&samples, a.redis.tolerance())
            }
            None => None,
        };
        if a.json {
            let mut out = status_json(&s);
            if a.redis.redis.is_some() {
                out["backend_pipeline"] = json!(window);
            }
            println!("{out}");
        } else {
            if s.run_id.is_empty() {
                println!("no run");
            } else {
                print!("{}", summary(&s));
            }
            if let Some(w) = &window {
                print!("{}", w.table());
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let sampler = redis.map(|r| Sampler::start(r, LIVE_WINDOW));
    let mut stream = client
        .watch(pb::WatchRequest { interval_ms: 1000 })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut view = LiveView::new();
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(s)) => {
                    let extra = sampler.as_ref().map(|x| x.view(LIVE_WINDOW, a.redis.tolerance()));
                    if a.json {
                        let mut out = status_json(&s);
                        if let Some(x) = &sampler {
                            out["backend_pipeline"] = json!(backlog::window(&x.newest(LIVE_WINDOW), a.redis.tolerance()));
                        }
                        println!("{out}");
                    } else {
                        view.show(&s, &extra.unwrap_or_default());
                    }
                }
                Ok(None) => return Ok(ExitCode::SUCCESS),
                Err(e) => bail!("lost the coordinator: {}", e.message()),
            },
            _ = vtox::process::shutdown_signal() => return Ok(ExitCode::SUCCESS),
        }
    }
}

pub async fn stop(a: CoordArg) -> Result<ExitCode> {
    let mut client = connect(&a.coord).await?;
    let r = client
        .stop(pb::StopRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if !r.was_running {
        println!("no run was in progress");
        return Ok(ExitCode::SUCCESS);
    }
    // Returns once the numbers are final, so that a script reading `status` next reads them.
    let run_id = client
        .status(pb::StatusRequest::default())
        .await
        .map_err(status_error)?
        .into_inner()
        .run_id;
    eprintln!("run stopped; waiting for the simulators' last counts");
    let status = drive::settled(&mut client, &run_id).await?;
    print!("{}", summary(&status));
    Ok(ExitCode::SUCCESS)
}

pub async fn rebalance(a: CoordArg) -> Result<ExitCode> {
    let mut client = connect(&a.coord).await?;
    let r = client
        .rebalance(pb::RebalanceRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if r.moved_instances == 0 {
        println!("nothing to move: no agent is above its recommended load, or none has room");
    } else {
        println!(
            "moving {} instances ({} vehicles); each rests {:.1} s between its agents",
            r.moved_instances, r.moved_vehicles, 2.5
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn agents(a: AgentsArgs) -> Result<ExitCode> {
    let mut client = connect(&a.coord.coord).await?;
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .agents;
    if a.json {
        let v: Vec<Value> = agents
            .iter()
            .map(|x| {
                let hw = x.hardware.clone().unwrap_or_default();
                json!({
                    "name": x.name,
                    "connected": x.connected,
                    "address": x.address,
                    "last_seen_s_ago": x.last_seen_s_ago,
                    "max_vehicles": x.max_vehicles,
                    "hostname": hw.hostname,
                    "cores": hw.logical_cores,
                    "memory_bytes": hw.memory_total_bytes,
                    "memory_available_bytes": hw.memory_available_bytes,
                    "link_mbps": hw.link_mbps,
                    "msgs_per_core": hw.calibrated_msgs_per_core,
                    "os": hw.os,
                    "version": hw.agent_version,
                })
            })
            .collect();
        println!("{}", json!({ "agents": v }));
        return Ok(ExitCode::SUCCESS);
    }
    if agents.is_empty() {
        println!("no agents have joined");
    }
    for x in &agents {
        let hw = x.hardware.clone().unwrap_or_default();
        println!(
            "{:<16} {:<13} {:>3} cores  {:>10}  link {:>9}  {:>7.0} msg/s/core  {}  v{}",
            x.name,
            if x.connected {
                "connected"
            } else {
                "disconnected"
            },
            hw.logical_cores,
            gib(hw.memory_total_bytes),
            link(hw.link_mbps),
            hw.calibrated_msgs_per_core,
            x.address,
            hw.agent_version
        );
    }
    Ok(ExitCode::SUCCESS)
}
