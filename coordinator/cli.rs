//! The CLI commands: each talks to a coordinator over gRPC (or plans offline) and prints
//! tables for people or one JSON object for scripts.

use crate::backend::{self, BackendRedis, Sampler};
use crate::planning::{self, Host};
use crate::server::{AgentApi, ControlApi, Coordinator, Settings};
use crate::{
    AgentsArgs, CapacityArgs, CoordArg, LoadArgs, PlanArgs, RunArgs, ServeArgs, StatusArgs,
};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};
use vtox::backlog;
use vtox::capacity;
use vtox::fleet::vehicle_id;
use vtox::metrics::Latency;
use vtox::wire::pb::control_service_server::ControlServiceServer;
use vtox::wire::pb::{
    self, agent_service_server::AgentServiceServer, control_service_client::ControlServiceClient,
};

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

fn token() -> Option<&'static str> {
    TOKEN.get().and_then(|t| t.as_deref())
}

pub type ControlClient = ControlServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, vtox::auth::Bearer>,
>;

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
    let coord = Coordinator::new(Settings {
        lease: a.lease,
        heartbeat: a.heartbeat,
        grace: a.grace,
        state_dir: a.state_dir.clone(),
        max_agents: a.max_agents,
        max_join_rate: a.max_join_rate,
    })
    .map_err(|e| anyhow!(e))?;
    if let Some(addr) = a.metrics_listen {
        serve_metrics(addr, {
            let coord = coord.clone();
            move || coord.prometheus()
        })
        .await?;
    }
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

/// Serves `render()` as Prometheus text at `/metrics` on `addr`, in the background.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    render(),
                )
            }
        }),
    );
    tracing::info!("metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the metrics server stopped: {e}");
        }
    });
    Ok(())
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
    Ok(ControlServiceClient::with_interceptor(channel, bearer))
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

pub(crate) fn params_of(n: u64, load: &LoadArgs) -> pb::PlanParams {
    pb::PlanParams {
        vehicles: n,
        first_vehicle: 0,
        per_instance: load.per_instance,
        interval_s: load.interval.as_secs_f64(),
        batch_size: load.batch_size,
        overcommit: load.overcommit,
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
        let hw = tokio::task::spawn_blocking(|| crate::hardware::detect("localhost", None)).await?;
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

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn link(mbps: u32) -> String {
    if mbps == 0 {
        "-".into()
    } else {
        format!("{mbps} Mb/s")
    }
}

pub async fn plan(a: PlanArgs) -> Result<ExitCode> {
    let hosts = hosts_from(a.coord.as_deref(), a.hosts.as_deref(), a.max_vehicles).await?;
    let params = pb::PlanParams {
        first_vehicle: a.first_vehicle,
        ..params_of(a.vehicles, &a.load)
    };
    let (_, reply) = planning::plan_hosts(&hosts, &params).map_err(|e| anyhow!(e))?;
    if a.json {
        println!("{}", plan_json(&reply));
    } else {
        print!("{}", plan_table(&reply));
    }
    Ok(ExitCode::SUCCESS)
}

fn plan_json(reply: &pb::PlanReply) -> Value {
    json!({
        "vehicles": reply.total_vehicles,
        "total_max_vehicles": reply.total_max,
        "total_recommended_vehicles": reply.total_recommended,
        "agents": reply.agents.iter().map(|a| {
            let hw = a.hardware.clone().unwrap_or_default();
            json!({
                "name": a.agent,
                "cores": hw.logical_cores,
                "memory_bytes": hw.memory_total_bytes,
                "link_mbps": hw.link_mbps,
                "max_vehicles": a.max_vehicles,
                "recommended_vehicles": a.recommended_vehicles,
                "limited_by": a.limited_by,
                "vehicles": a.instances.iter().map(|i| i.vehicles).sum::<u64>(),
                "instances": a.instances.iter().map(|i| json!({
                    "index": i.index,
                    "first_vehicle": i.first_vehicle,
                    "vehicles": i.vehicles,
                    "first_id": vehicle_id(i.first_vehicle),
                    "last_id": vehicle_id(i.first_vehicle + i.vehicles.saturating_sub(1)),
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
    })
}

fn plan_table(reply: &pb::PlanReply) -> String {
    let mut out = String::new();
    let instances: usize = reply.agents.iter().map(|a| a.instances.len()).sum();
    for a in &reply.agents {
        let hw = a.hardware.clone().unwrap_or_default();
        let vehicles: u64 = a.instances.iter().map(|i| i.vehicles).sum();
        let _ = writeln!(
            out,
            "{}: {} cores, {}, link {}; carries up to {} vehicles (recommended {}, limited by {}); planned {} vehicles in {} instances",
            a.agent,
            hw.logical_cores,
            gib(hw.memory_total_bytes),
            link(hw.link_mbps),
            a.max_vehicles,
            a.recommended_vehicles,
            a.limited_by,
            vehicles,
            a.instances.len()
        );
        for i in &a.instances {
            let last = i.first_vehicle + i.vehicles.saturating_sub(1);
            let _ = writeln!(
                out,
                "  instance {:>4}  vehicles {:>7}..{:<7} ({:>3})  {} .. {}",
                i.index,
                i.first_vehicle,
                last,
                i.vehicles,
                vehicle_id(i.first_vehicle),
                vehicle_id(last)
            );
        }
    }
    let _ = writeln!(
        out,
        "total: {} vehicles in {} instances on {} agents; capacity {} vehicles (recommended {})",
        reply.total_vehicles,
        instances,
        reply.agents.len(),
        reply.total_max,
        reply.total_recommended
    );
    out
}

pub async fn capacity(a: CapacityArgs) -> Result<ExitCode> {
    let hosts = hosts_from(a.coord.as_deref(), a.hosts.as_deref(), None).await?;
    let load = planning::load_params(&params_of(1, &a.load));
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
        "at one message every {:.1} s of {} samples; \"old tool\" is the Python tool's table for the same cores (max/recommended)",
        load.interval_s, load.batch_size
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn run(a: RunArgs) -> Result<ExitCode> {
    if !(0.0..=100.0).contains(&a.min_success) {
        bail!("--min-success must be a percentage from 0 to 100");
    }
    // Checked here, before any process starts or any plan is made.
    if let Some(t) = &a.target {
        vtox::ingest::Target::parse(t).context("--target")?;
    }
    a.faults
        .parse::<vtox::faults::FaultMix>()
        .context("--faults")?;
    a.redis.check()?;
    // Reached before any process starts, so that a wrong --redis costs nothing.
    let redis = BackendRedis::connect(&a.redis).await?;
    let mut cluster = None;
    let (coord_url, target) = if a.local {
        let c = crate::local::start(a.target.clone()).await?;
        let urls = (c.coord_url.clone(), c.target.clone());
        cluster = Some(c);
        urls
    } else {
        (
            a.coord.coord.clone(),
            a.target
                .clone()
                .unwrap_or_else(|| "http://127.0.0.1:8000".into()),
        )
    };
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
    let mut client = connect(coord_url).await?;
    // Wait for the agents.
    let deadline = Instant::now() + a.wait;
    loop {
        let agents = client
            .list_agents(pb::ListAgentsRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .agents;
        let connected = agents.iter().filter(|x| x.connected).count() as u32;
        if connected >= a.expect_agents.max(1) {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "{connected} of {} expected agents joined within {:?}",
                a.expect_agents.max(1),
                a.wait
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spec = pb::RunSpec {
        target: target.to_string(),
        interval_s: a.load.interval.as_secs_f64(),
        jitter: 0.1,
        batch_size: a.load.batch_size,
        sampling_rate: a.sampling_rate,
        faults: a.faults.clone(),
        seed: a.seed,
        run_start: 0.0,
        timeout_s: a.timeout.as_secs_f64(),
        max_in_flight: a.max_in_flight,
        stagger_s: a.stagger.as_secs_f64(),
        id_template: String::new(),
        duration_s: a.duration.map(|d| d.as_secs_f64()).unwrap_or(0.0),
        fault_onset_s: a.fault_onset.map(|d| d.as_secs_f64()),
    };
    if let Err(e) = spec.faults.parse::<vtox::faults::FaultMix>() {
        bail!("--faults: {e}");
    }
    let req = pb::StartRequest {
        params: Some(pb::PlanParams {
            first_vehicle: a.first_vehicle,
            ..params_of(a.vehicles, &a.load)
        }),
        spec: Some(spec),
        expect_agents: a.expect_agents,
    };
    let score_from = match &mut redis {
        Some(r) => Some(r.server_ms().await?),
        None => None,
    };
    let started = client.start(req).await.map_err(status_error)?.into_inner();
    let sampler = redis.clone().map(|r| Sampler::start(r, RUN_SAMPLES));
    // The summary judges the backend's streams while the fleet drove, not as it wound down.
    let mut driving_until = backend::unix_now();
    let backlog_view = || {
        sampler
            .as_ref()
            .map(|s| s.view(LIVE_WINDOW, a.redis.tolerance()))
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
    let mut last = None;
    let mut interrupted = false;
    // A coordinator that restarts (with --state-dir) resumes the run: keep watching through it.
    let mut lost_since: Option<Instant> = None;
    let shutdown = vtox::process::shutdown_signal();
    tokio::pin!(shutdown);
    'watching: loop {
        let stream = match client.watch(pb::WatchRequest { interval_ms: 1000 }).await {
            Ok(s) => Some(s.into_inner()),
            Err(s) => {
                tracing::warn!("cannot watch the run: {}", s.message());
                None
            }
        };
        if let Some(mut watch) = stream {
            loop {
                tokio::select! {
                    msg = watch.message() => match msg {
                        Ok(Some(status)) => {
                            lost_since = None;
                            if status.run_id != started.run_id {
                                bail!("the coordinator no longer has run {} (it was restarted without --state-dir?)", started.run_id);
                            }
                            view.show(&status, &backlog_view());
                            let done = status.state != "running";
                            if !done {
                                driving_until = backend::unix_now();
                            }
                            last = Some(status);
                            if done {
                                break 'watching;
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = &mut shutdown => {
                        interrupted = true;
                        break 'watching;
                    }
                }
            }
        }
        let since = *lost_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(60) {
            bail!("lost the coordinator at {coord_url} for a minute");
        }
        eprintln!("lost the coordinator; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = &mut shutdown => { interrupted = true; break 'watching; }
        }
        if let Ok(c) = connect(coord_url).await {
            client = c;
        }
    }
    if interrupted {
        eprintln!("stopping the run");
        client
            .stop(pb::StopRequest {})
            .await
            .map_err(status_error)?;
        last = Some(settled(&mut client, &started.run_id).await?);
    } else if last.as_ref().is_some_and(|s| s.state == "stopped") {
        // Stopped from elsewhere (`vtox-coord stop`): the last counts are still on their way.
        last = Some(settled(&mut client, &started.run_id).await?);
    }
    let status = last.ok_or_else(|| anyhow!("no status received"))?;
    let totals = status.totals.clone().unwrap_or_default();
    let success = totals.success_percent();
    let mut out = status_json(&status);
    let mut text = summary(&status);
    if let (Some(r), Some(sampler)) = (&mut redis, &sampler) {
        let window = backlog::window(&sampler.between(0.0, driving_until), a.redis.tolerance());
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
    if totals.sent == 0 {
        eprintln!("error: no message was sent");
        return Ok(ExitCode::FAILURE);
    }
    if success < a.min_success {
        eprintln!(
            "error: {success:.2}% of requests succeeded, below --min-success {}",
            a.min_success
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn percentiles(c: &pb::Counters) -> (f64, f64, f64, f64) {
    let l = Latency::from_bytes(&c.latency_hdr).unwrap_or_default();
    (
        l.quantile_ms(0.5),
        l.quantile_ms(0.95),
        l.quantile_ms(0.99),
        l.max_ms(),
    )
}

/// The live table: redrawn in place on a terminal, printed every few seconds otherwise.
struct LiveView {
    previous: HashMap<String, (u64, Instant)>,
    lines_drawn: usize,
    tty: bool,
    last_print: Option<Instant>,
}

impl LiveView {
    fn new() -> Self {
        LiveView {
            previous: HashMap::new(),
            lines_drawn: 0,
            tty: std::io::stderr().is_terminal(),
            last_print: None,
        }
    }

    /// Draws the run's status; `extra` (the backend's backlog) goes below it.
    fn show(&mut self, s: &pb::RunStatus, extra: &str) {
        let now = Instant::now();
        let mut text = String::new();
        let _ = writeln!(
            text,
            "{:<16} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>5} {:>5} {:>8}",
            "agent",
            "instances",
            "vehicles",
            "msg/s",
            "ok %",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "host%",
            "sim%",
            "rss MiB"
        );
        for agent in &s.agents {
            let c = agent.totals.clone().unwrap_or_default();
            let done = c.accepted + c.failed;
            let rate = match self.previous.insert(agent.agent.clone(), (done, now)) {
                Some((prev, t)) if now > t => {
                    (done.saturating_sub(prev)) as f64 / now.duration_since(t).as_secs_f64()
                }
                _ => 0.0,
            };
            let (p50, p95, p99, _) = percentiles(&c);
            let usage = agent.usage.unwrap_or_default();
            let _ = writeln!(
                text,
                "{:<16} {:>4}/{:<4} {:>9} {:>9.0} {:>8.2} {:>8.1} {:>8.1} {:>8.1} {:>5.0} {:>5} {:>8.0}{}",
                agent.agent,
                agent.instances_running,
                agent.instances_planned,
                agent.vehicles,
                rate,
                c.success_percent(),
                p50,
                p95,
                p99,
                usage.cpu_percent,
                usage
                    .simulators_cpu_percent
                    .map_or_else(|| "-".to_string(), |x| format!("{x:.0}")),
                usage.rss_bytes as f64 / (1u64 << 20) as f64,
                if agent.connected { "" } else { "  (disconnected)" }
            );
        }
        let t = s.totals.clone().unwrap_or_default();
        let _ = writeln!(
            text,
            "{} {:.0}s  sent {}  accepted {}  failed {}  dropped {}  unassigned vehicles {}",
            s.state, s.elapsed_s, t.sent, t.accepted, t.failed, t.dropped, s.unassigned_vehicles
        );
        text.push_str(extra);
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.lines_drawn > 0 {
                let _ = write!(err, "\x1b[{}A\x1b[J", self.lines_drawn);
            }
            let _ = write!(err, "{text}");
            self.lines_drawn = text.lines().count();
        } else if self
            .last_print
            .is_none_or(|p| now.duration_since(p) >= Duration::from_secs(5))
        {
            let _ = write!(err, "{text}");
            self.last_print = Some(now);
        }
    }
}

/// Whether an instance may still change its counts: its process has not exited yet.
fn unsettled(i: &pb::InstanceStatus) -> bool {
    matches!(
        pb::Phase::try_from(i.phase),
        Ok(pb::Phase::Starting | pb::Phase::Running | pb::Phase::Stopping)
    )
}

/// The status of a stopped run once every simulator has finished its requests in flight
/// (and the late answers it waits for) and sent its last line, so the totals printed are
/// final. Gives up, with what it has, a little after the agents' own patience (then they
/// kill the simulator and read its tally).
async fn settled(client: &mut ControlClient, run_id: &str) -> Result<pb::RunStatus> {
    let started = Instant::now();
    loop {
        let status = client
            .status(pb::StatusRequest {})
            .await
            .map_err(status_error)?
            .into_inner();
        let timeout_s = status.spec.as_ref().map_or(5.0, |s| s.timeout_s);
        let patience = vtox::process::stop_grace(timeout_s) + Duration::from_secs(5);
        let busy = status
            .agents
            .iter()
            .filter(|a| a.connected)
            .flat_map(|a| &a.instances)
            .filter(|i| i.run_id == run_id && unsettled(i))
            .count();
        if busy == 0 {
            return Ok(status);
        }
        if started.elapsed() > patience {
            eprintln!(
                "{busy} instances have not reported their last counts; the totals may be short"
            );
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// "1 agent", "3 agents".
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn summary(s: &pb::RunStatus) -> String {
    let t = s.totals.clone().unwrap_or_default();
    let (p50, p95, p99, max) = percentiles(&t);
    let instances: u32 = s.agents.iter().map(|a| a.instances_planned).sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {} {} after {:.1} s: {} vehicles on {} in {}",
        s.run_id,
        s.state,
        s.elapsed_s,
        s.vehicles,
        plural(s.agents.len() as u64, "agent"),
        plural(u64::from(instances), "instance"),
    );
    let _ = writeln!(
        out,
        "  sent {}  accepted {} ({:.2}%)  failed {}  dropped {}",
        t.sent,
        t.accepted,
        t.success_percent(),
        t.failed,
        t.dropped
    );
    if t.failed > 0 {
        let mut causes = Vec::new();
        if t.timeouts > 0 {
            causes.push(if t.late_accepted > 0 {
                format!(
                    "{} timed out ({} of them answered 200 later)",
                    t.timeouts, t.late_accepted
                )
            } else {
                format!("{} timed out", t.timeouts)
            });
        }
        if t.connect_errors > 0 {
            causes.push(format!("{} connection errors", t.connect_errors));
        }
        causes.extend(
            t.status
                .iter()
                .map(|(code, n)| format!("{n} × HTTP {code}")),
        );
        let _ = writeln!(out, "  failures: {}", causes.join(", "));
    }
    let _ = writeln!(
        out,
        "  latency ms: p50 {p50:.1}  p95 {p95:.1}  p99 {p99:.1}  max {max:.1}"
    );
    for a in &s.agents {
        let c = a.totals.clone().unwrap_or_default();
        let restarts: u32 = a.instances.iter().map(|i| i.restarts).sum();
        let _ = writeln!(
            out,
            "  {}: {} vehicles, {}/{} instances running, accepted {} of {} sent, {} restarts",
            a.agent,
            a.vehicles,
            a.instances_running,
            a.instances_planned,
            c.accepted,
            c.sent,
            restarts
        );
    }
    out
}

fn counters_json(c: &pb::Counters) -> Value {
    let (p50, p95, p99, max) = percentiles(c);
    json!({
        "sent": c.sent,
        "accepted": c.accepted,
        "failed": c.failed,
        "dropped": c.dropped,
        "bytes": c.bytes,
        "timeouts": c.timeouts,
        "late_accepted": c.late_accepted,
        "timeouts_unsent": c.timeouts_unsent,
        "connect_errors": c.connect_errors,
        "status": c.status.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "bad_lines": c.bad_lines,
        "success_percent": c.success_percent(),
        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max,
    })
}

fn phase_name(p: i32) -> &'static str {
    match pb::Phase::try_from(p).unwrap_or(pb::Phase::Unspecified) {
        pb::Phase::Unspecified => "unknown",
        pb::Phase::Starting => "starting",
        pb::Phase::Running => "running",
        pb::Phase::Backoff => "backoff",
        pb::Phase::Failed => "failed",
        pb::Phase::Exited => "exited",
        pb::Phase::Stopping => "stopping",
    }
}

fn status_json(s: &pb::RunStatus) -> Value {
    json!({
        "run_id": s.run_id,
        "state": s.state,
        "vehicles": s.vehicles,
        "elapsed_s": s.elapsed_s,
        "target": s.spec.as_ref().map(|x| x.target.clone()),
        "unassigned_vehicles": s.unassigned_vehicles,
        "totals": counters_json(&s.totals.clone().unwrap_or_default()),
        "agents": s.agents.iter().map(|a| json!({
            "name": a.agent,
            "connected": a.connected,
            "vehicles": a.vehicles,
            "instances_running": a.instances_running,
            "instances_planned": a.instances_planned,
            "cpu_percent": a.usage.map(|u| u.cpu_percent),
            "simulators_cpu_percent": a.usage.and_then(|u| u.simulators_cpu_percent),
            "rss_bytes": a.usage.map(|u| u.rss_bytes),
            "totals": counters_json(&a.totals.clone().unwrap_or_default()),
            "instances": a.instances.iter().map(|i| json!({
                "index": i.index,
                "first_vehicle": i.first_vehicle,
                "vehicles": i.vehicles,
                "phase": phase_name(i.phase),
                "restarts": i.restarts,
                "incarnation": i.incarnation,
                "last_error": i.last_error,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub async fn status(a: StatusArgs) -> Result<ExitCode> {
    a.redis.check()?;
    let mut client = connect(&a.coord.coord).await?;
    let redis = BackendRedis::connect(&a.redis).await?;
    if !a.watch {
        let s = client
            .status(pb::StatusRequest {})
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
        .status(pb::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .run_id;
    eprintln!("run stopped; waiting for the simulators' last counts");
    let status = settled(&mut client, &run_id).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_failures_by_cause_and_only_when_there_are_some() {
        let mut s = pb::RunStatus {
            run_id: "run-1".into(),
            state: "finished".into(),
            vehicles: 50,
            agents: vec![pb::AgentStatus {
                instances_planned: 1,
                ..Default::default()
            }],
            totals: Some(pb::Counters {
                sent: 10,
                accepted: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = summary(&s);
        assert!(
            text.contains("50 vehicles on 1 agent in 1 instance\n"),
            "{text}"
        );
        assert!(!text.contains("failures"), "{text}");

        s.totals = Some(pb::Counters {
            sent: 10,
            accepted: 4,
            failed: 6,
            timeouts: 3,
            late_accepted: 2,
            connect_errors: 1,
            status: [(503, 2)].into_iter().collect(),
            ..Default::default()
        });
        let text = summary(&s);
        assert!(
            text.contains(
                "failures: 3 timed out (2 of them answered 200 later), 1 connection errors, 2 × HTTP 503"
            ),
            "{text}"
        );
    }
}
