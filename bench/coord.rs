//! Coordinator benchmark: a real `vtox-coord serve` process carries 1,000 light agents (gRPC
//! clients in this process) that join, take their assignments and heartbeat every second with
//! growing counters and latency histograms, while a watcher pulls the status every second; the
//! coordinator's CPU is read from /proc. Then the planner spreads 1,000,000 vehicles over
//! 1,000 agents. Run: `cargo bench --bench coord` (AGENTS=… and SECONDS=… to change the load).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vtox::metrics::Latency;
use vtox::plan::{plan, PlanAgent};
use vtox::wire::pb::agent_service_client::AgentServiceClient;
use vtox::wire::pb::control_service_client::ControlServiceClient;
use vtox::wire::pb::{self, agent_message, coordinator_message};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|p| p * 4096.0 / (1u64 << 20) as f64)
        .unwrap_or(0.0)
}

async fn light_agent(
    url: String,
    i: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = AgentServiceClient::new(channel);
    let hw = pb::Hardware {
        hostname: format!("bench-{i}"),
        logical_cores: 8,
        physical_cores: 8,
        memory_total_bytes: 16 << 30,
        memory_available_bytes: 16 << 30,
        calibrated_msgs_per_core: 20_000.0,
        ..Default::default()
    };
    let reply = client
        .join(pb::JoinRequest {
            name: format!("bench-{i:04}"),
            hardware: Some(hw),
            max_vehicles: 0,
            protocol_major: 1,
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::AgentMessage {
        msg: Some(agent_message::Msg::Hello(pb::Hello {
            agent_id: reply.agent_id,
            epoch: 0,
        })),
    };
    tx.send(hello).await.map_err(|e| e.to_string())?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut assignment = pb::Assignment::default();
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    let mut latency = Latency::new();
    let mut sent = 0u64;
    let started = Instant::now();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(pb::CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(a)) })) => assignment = a,
                Ok(_) => return Ok(()),
                Err(e) => return Err(e.message().to_string()),
            },
            _ = tick.tick() => {
                // Each of the agent's instances reports cumulative counters and its histogram.
                let per = assignment.instances.iter().map(|x| x.vehicles).sum::<u64>().max(1);
                sent += per;
                for k in 0..per.min(50) {
                    latency.record_us(800 + (i * 37 + k * 101 + sent) % 5000);
                }
                let hdr = latency.to_bytes();
                let instances = assignment.instances.iter().map(|x| pb::InstanceStatus {
                    run_id: assignment.run_id.clone(),
                    index: x.index,
                    first_vehicle: x.first_vehicle,
                    vehicles: x.vehicles,
                    phase: pb::Phase::Running as i32,
                    restarts: 0,
                    incarnation: 1,
                    counters: Some(pb::Counters {
                        sent, accepted: sent, bytes: sent * 1780, elapsed_s: started.elapsed().as_secs_f64(),
                        latency_hdr: hdr.clone(), active_vehicles: x.vehicles, ..Default::default()
                    }),
                    last_error: String::new(),
                }).collect();
                let hb = pb::Heartbeat { epoch: assignment.epoch, instances, usage: Some(pb::HostUsage { cpu_percent: 20.0, rss_bytes: 50 << 20, ..Default::default() }) };
                if tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Heartbeat(hb)) }).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

fn main() {
    let agents = env_num("AGENTS", 1000);
    let seconds = env_num("SECONDS", 20);
    let coord_bin =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/vtox-coord");
    if !coord_bin.is_file() {
        eprintln!("build it first: cargo build --release --bin vtox-coord");
        std::process::exit(2);
    }

    // The planner.
    let plan_agents: Vec<PlanAgent> = (0..1000)
        .map(|i| PlanAgent {
            name: format!("a{i}"),
            max_vehicles: 2000 + (i % 5) * 500,
        })
        .collect();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(1_000_000, &plan_agents, 50, false);
        best = best.min(t.elapsed());
        assert!(p.is_ok());
    }
    println!(
        "plan: 1,000,000 vehicles over 1,000 agents in {:.1} ms (best of 5)",
        best.as_secs_f64() * 1e3
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(50051);
    let addr = format!("127.0.0.1:{port}");
    let mut coord = Command::new(&coord_bin)
        .args(["serve", "--listen", &addr])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start vtox-coord");
    let pid = coord.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let url = format!("http://{addr}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for i in 0..agents {
            tasks.push(tokio::spawn(light_agent(url.clone(), i, stop_rx.clone())));
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut control = ControlServiceClient::connect(url.clone()).await.expect("control client");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = control.list_agents(pb::ListAgentsRequest {}).await.map(|r| r.into_inner().agents.iter().filter(|a| a.connected).count()).unwrap_or(0);
            if n as u64 >= agents || Instant::now() > deadline {
                println!("{n} agents connected");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let vehicles = agents * 100;
        let start = control
            .start(pb::StartRequest {
                params: Some(pb::PlanParams { vehicles, per_instance: 50, interval_s: 1.2, batch_size: 10, overcommit: false, first_vehicle: 0 }),
                spec: Some(pb::RunSpec { target: "http://127.0.0.1:9".into(), interval_s: 1.2, ..Default::default() }),
                expect_agents: agents as u32,
            })
            .await
            .expect("start a run");
        println!("run {} of {vehicles} vehicles ({} instances)", start.get_ref().run_id, vehicles / 50);
        let mut watch = control.watch(pb::WatchRequest { interval_ms: 1000 }).await.expect("watch").into_inner();
        // Let the assignments settle, then measure.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (t0, c0) = (Instant::now(), cpu_ticks(pid));
        let mut statuses = 0;
        let mut last_sent = 0;
        while t0.elapsed() < Duration::from_secs(seconds) {
            if let Ok(Some(s)) = watch.message().await {
                statuses += 1;
                last_sent = s.totals.map(|t| t.sent).unwrap_or(0);
            }
        }
        let ticks = cpu_ticks(pid) - c0;
        let hz = 100.0;
        let cores = ticks as f64 / hz / t0.elapsed().as_secs_f64();
        println!(
            "coordinator: {agents} agents heartbeating every 1 s, {statuses} status pulls: {:.2} cores busy, RSS {:.0} MiB; totals at {last_sent} messages",
            cores,
            rss_mib(pid)
        );
        let _ = stop_tx.send(true);
        for t in tasks {
            t.abort();
        }
    });
    let _ = coord.kill();
    let _ = coord.wait();
}
