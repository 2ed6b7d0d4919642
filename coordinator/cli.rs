//! The CLI commands: each talks to a coordinator over gRPC (or plans offline) and prints
//! tables for people or one JSON object for scripts.

use crate::args::{AgentsArgs, CapacityArgs, CoordArg, PlanArgs, StatusArgs};
use crate::backend::{BackendRedis, Sampler};
use crate::client::{status_error, Access, Coord};
use crate::drive;
use crate::render::LiveView;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;
use vtox::backlog;
use vtox::capacity;
use vtox::planning::{self, Host};
use vtox::render::{gib, link, plan_json, plan_table, status_json, summary};
use vtox::wire::pb;

/// Seconds of samples behind the live views' backlog trend.
pub const LIVE_WINDOW: usize = 10;
/// Samples a one-shot `status --redis` takes, a second apart.
const STATUS_SAMPLES: usize = 3;

/// The hosts to plan over: hypothetical ones, a coordinator's agents, or this machine.
async fn hosts_from(
    coord: Option<&str>,
    hosts: Option<&str>,
    cap: Option<u64>,
    access: &Access,
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
        let mut client = Coord::new(url, access).connect().await?;
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

pub async fn plan(a: PlanArgs, access: &Access) -> Result<ExitCode> {
    let hosts = hosts_from(
        a.coord.as_deref(),
        a.hosts.as_deref(),
        a.max_vehicles,
        access,
    )
    .await?;
    let params = pb::PlanParams {
        first_vehicle: a.first_vehicle,
        ..a.load.params(a.vehicles, a.local)
    };
    let (_, reply) = planning::plan_hosts(&hosts, &params).map_err(|e| anyhow!(e))?;
    if a.json {
        println!("{}", plan_json(&reply));
    } else {
        print!("{}", plan_table(&reply));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn capacity(a: CapacityArgs, access: &Access) -> Result<ExitCode> {
    let hosts = hosts_from(a.coord.as_deref(), a.hosts.as_deref(), None, access).await?;
    let load = planning::load_params(&a.load.params(1, a.local));
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

pub async fn status(a: StatusArgs, access: &Access) -> Result<ExitCode> {
    a.redis.check()?;
    let mut client = Coord::new(&a.coord.coord, access).connect().await?;
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

pub async fn stop(a: CoordArg, access: &Access) -> Result<ExitCode> {
    let mut client = Coord::new(&a.coord, access).connect().await?;
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

pub async fn rebalance(a: CoordArg, access: &Access) -> Result<ExitCode> {
    let mut client = Coord::new(&a.coord, access).connect().await?;
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

pub async fn agents(a: AgentsArgs, access: &Access) -> Result<ExitCode> {
    let mut client = Coord::new(&a.coord.coord, access).connect().await?;
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
