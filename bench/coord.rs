//! Coordinator benchmark: a real `vtox-coord serve --state-dir` process carries light agents
//! (gRPC clients sharing this process's runtime) that join at the coordinator's join rate,
//! take their assignments and heartbeat every second with growing counters and latency
//! histograms, while a watcher asks for the status every second; the coordinator's CPU and
//! memory are read from /proc, and every agent checks that its lease is renewed in time. Then
//! the planner spreads 1,000,000 vehicles over 1,000 and 10,000 agents.
//! Run: `cargo build --release --bin vtox-coord && AGENTS=10000 SECONDS=60 cargo bench --bench coord`
//! (AGENTS, default 1000; SECONDS, default 20; JOIN_RATE, default AGENTS / 10 per second).
//! Then the coordinator's CPU with none, one and ten dashboard pages following its live view
//! (DASH_SECONDS each, default 20; 0 skips it). The last line sums it up: `agents= instances=
//! coord_cpu_cores= coord_rss_mib= status_p99_ms= late_leases=`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vtox::metrics::Latency;
use vtox::plan::{plan, PlanAgent};
use vtox::wire::pb::agent_service_client::AgentServiceClient;
use vtox::wire::pb::control_service_client::ControlServiceClient;
use vtox::wire::pb::{self, agent_message, coordinator_message};

/// The coordinator's default lease: an assignment later than this after the previous one
/// means the agent would have stopped its simulators.
const LEASE: Duration = Duration::from_secs(5);

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

/// Two sockets per agent (its end and the coordinator's) need more descriptors than the
/// usual 1,024; the coordinator inherits the limit.
fn raise_open_files(need: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < need {
            lim.rlim_cur = need.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[derive(Default)]
struct Leases {
    /// Assignments that came later than a lease after the previous one.
    late: AtomicU64,
    /// The longest gap between two assignments of one agent, in ms.
    max_gap_ms: AtomicU64,
    /// Agents whose session is open.
    connected: AtomicU64,
}

async fn light_agent(
    url: String,
    i: u64,
    stop: tokio::sync::watch::Receiver<bool>,
    leases: Arc<Leases>,
    histograms: Arc<Vec<(Vec<u8>, Vec<u8>)>>,
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
    // As a real agent does: a join refused for the rate is retried a little later.
    let mut wait = Duration::from_millis(200);
    let reply = loop {
        let join = client
            .join(pb::JoinRequest {
                name: format!("bench-{i:05}"),
                hardware: Some(hw.clone()),
                max_vehicles: 0,
                protocol_major: 1,
            })
            .await;
        match join {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                let jitter = Duration::from_millis((i * 7919) % 500);
                tokio::time::sleep(wait + jitter).await;
                wait = (wait * 2).min(Duration::from_secs(4));
            }
            Err(e) => return Err(e.message().to_string()),
        }
    };
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
    leases.connected.fetch_add(1, Ordering::Relaxed);
    let mut last_assignment: Option<Instant> = None;
    let mut assignment = pb::Assignment::default();
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    let mut sent = 0u64;
    let mut ticks = 0usize;
    let started = Instant::now();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(pb::CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(a)) })) => {
                    let now = Instant::now();
                    if let Some(prev) = last_assignment {
                        let gap = now - prev;
                        leases.max_gap_ms.fetch_max(gap.as_millis() as u64, Ordering::Relaxed);
                        if gap > LEASE {
                            leases.late.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    last_assignment = Some(now);
                    assignment = a;
                }
                Ok(_) => return Ok(()),
                Err(e) => return Err(e.message().to_string()),
            },
            _ = tick.tick() => {
                // Each of the agent's instances reports cumulative counters and its histogram.
                let per = assignment.instances.iter().map(|x| x.vehicles).sum::<u64>().max(1);
                sent += per;
                // Histograms grow like those of simulators; encoding them is the agents' work,
                // not the coordinator's, so they are made once for the whole bench.
                ticks += 1;
                let (hdr, delay) = &histograms[(ticks + i as usize % 8).min(histograms.len() - 1)];
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
                        latency_hdr: hdr.clone(), delay_hdr: delay.clone(), produced: sent,
                        active_vehicles: x.vehicles, ..Default::default()
                    }),
                    last_error: String::new(),
                    end: pb::End::None as i32,
                }).collect();
                let hb = pb::Heartbeat { epoch: assignment.epoch, instances, usage: Some(pb::HostUsage { cpu_percent: 20.0, rss_bytes: 50 << 20, ..Default::default() }), lapsed: false };
                if tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Heartbeat(hb)) }).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// A dashboard page following the live view: `GET /api/events`, read until told to stop;
/// returns the bytes read.
fn follow_dashboard(web: &str, stop: &std::sync::atomic::AtomicBool) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(web) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let req =
        format!("GET /api/events HTTP/1.1\r\nHost: {web}\r\nAccept: text/event-stream\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => {}
        }
    }
    total
}

fn plan_ms(agents: u64) -> f64 {
    let plan_agents: Vec<PlanAgent> = (0..agents)
        .map(|i| PlanAgent {
            name: format!("a{i}"),
            max_vehicles: 2000 + (i % 5) * 500,
            per_process: 0,
        })
        .collect();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(1_000_000, &plan_agents, Some(50), false);
        best = best.min(t.elapsed());
        assert!(p.is_ok());
    }
    best.as_secs_f64() * 1e3
}

fn main() {
    let agents = env_num("AGENTS", 1000);
    let seconds = env_num("SECONDS", 20);
    let join_rate = env_num("JOIN_RATE", (agents / 10).max(100));
    let coord_bin =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/vtox-coord");
    if !coord_bin.is_file() {
        eprintln!("build it first: cargo build --release --bin vtox-coord");
        std::process::exit(2);
    }

    for n in [1_000, 10_000] {
        println!(
            "plan: 1,000,000 vehicles over {n} agents in {:.1} ms (best of 5)",
            plan_ms(n)
        );
    }

    raise_open_files(2 * agents + 1024);
    let state_dir = std::env::temp_dir().join(format!("vtox-bench-coord-{}", std::process::id()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(50051);
    let addr = format!("127.0.0.1:{port}");
    let web_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(8089);
    let web = format!("127.0.0.1:{web_port}");
    let mut coord = Command::new(&coord_bin)
        .args(["serve", "--listen", &addr, "--web-listen", &web])
        .args(["--max-join-rate", &join_rate.to_string()])
        .args(["--max-agents", &agents.max(10_000).to_string()])
        .arg("--state-dir")
        .arg(&state_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start vtox-coord");
    let pid = coord.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let summary = rt.block_on(async {
        let url = format!("http://{addr}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leases = Arc::new(Leases::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        // Histograms as they grow second by second: 50 latencies more each time, and the
        // delays of the same messages (their latency plus the wait before they went out), as
        // a simulator's metric lines carry both.
        let seconds_in_all = 100 + 3 * agents / join_rate + seconds;
        let (mut latency, mut delay) = (Latency::new(), Latency::new());
        let histograms: Arc<Vec<(Vec<u8>, Vec<u8>)>> = Arc::new(
            (0..seconds_in_all)
                .map(|t| {
                    for k in 0..50 {
                        let us = 800 + (k * 101 + t * 37) % 5000;
                        latency.record_us(us);
                        delay.record_us(us + 50 + (k * 13 + t) % 400);
                    }
                    (latency.to_bytes(), delay.to_bytes())
                })
                .collect(),
        );
        let joining = Instant::now();
        // Agents arrive at about the join rate, as hosts of a fleet coming up would.
        let batch = (join_rate / 10).max(1);
        for i in 0..agents {
            tasks.push(tokio::spawn(light_agent(url.clone(), i, stop_rx.clone(), leases.clone(), histograms.clone())));
            if i % batch == batch - 1 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut control = ControlServiceClient::connect(url.clone())
            .await
            .expect("control client")
            .max_decoding_message_size(1 << 30);
        let deadline = Instant::now() + Duration::from_secs(60 + 3 * agents / join_rate);
        loop {
            let n = leases.connected.load(Ordering::Relaxed);
            if n >= agents || Instant::now() > deadline {
                println!("{n} agents connected in {:.1} s at --max-join-rate {join_rate}", joining.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let rss_no_run = rss_mib(pid);
        println!("coordinator RSS with {agents} agents connected and no run: {rss_no_run:.0} MiB");
        let vehicles = agents * 100;
        let start = control
            .start(pb::StartRequest {
                params: Some(pb::PlanParams { vehicles, per_instance: 50, interval_s: 1.2, batch_size: 10, overcommit: false, first_vehicle: 0, sink_on_host: false }),
                spec: Some(pb::RunSpec { target: "http://127.0.0.1:9".into(), interval_s: 1.2, ..Default::default() }),
                expect_agents: agents as u32,
            })
            .await
            .expect("start a run");
        let instances = vehicles / 50;
        println!("run {} of {vehicles} vehicles ({instances} instances)", start.get_ref().run_id);
        // Let the assignments settle and every histogram arrive, then measure.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let late_before = leases.late.load(Ordering::Relaxed);
        let rss_run = rss_mib(pid);
        println!("coordinator RSS with the run going, before anyone asked for a status: {rss_run:.0} MiB");
        let (t0, c0) = (Instant::now(), cpu_ticks(pid));
        // The watcher is another process in real life (`vtox-coord status --watch`): it gets a
        // runtime of its own, so that the light agents' work cannot delay its answers.
        let watcher = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("watcher runtime");
            rt.block_on(async move {
                let mut control = ControlServiceClient::connect(url)
                    .await
                    .expect("watcher client")
                    .max_decoding_message_size(1 << 30);
                let mut answers = Latency::new();
                let (mut last_sent, mut peak_rss, mut bytes) = (0, 0f64, 0usize);
                let mut watch = tokio::time::interval(Duration::from_secs(1));
                while t0.elapsed() < Duration::from_secs(seconds) {
                    watch.tick().await;
                    let asked = Instant::now();
                    match control.status(pb::StatusRequest::default()).await {
                        Ok(s) => {
                            answers.record_us(asked.elapsed().as_micros() as u64);
                            if answers.count() <= 3 || asked.elapsed() > Duration::from_millis(250) {
                                eprintln!("status answer {} took {} ms", answers.count(), asked.elapsed().as_millis());
                            }
                            let s = s.into_inner();
                            bytes = bytes.max(prost::Message::encoded_len(&s));
                            last_sent = s.totals.map(|t| t.sent).unwrap_or(0);
                        }
                        Err(e) => eprintln!("status: {}", e.message()),
                    }
                    peak_rss = peak_rss.max(rss_mib(pid));
                }
                (answers, last_sent, peak_rss, bytes)
            })
        });
        let (answers, last_sent, peak_rss, status_bytes) =
            tokio::task::spawn_blocking(move || watcher.join().expect("watcher"))
                .await
                .expect("watcher");
        let ticks = cpu_ticks(pid) - c0;
        let hz = 100.0;
        let cores = ticks as f64 / hz / t0.elapsed().as_secs_f64();
        let late = leases.late.load(Ordering::Relaxed);
        println!(
            "coordinator: {agents} agents heartbeating every 1 s, {} status answers (p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms): {cores:.2} cores busy, RSS {peak_rss:.0} MiB at most; totals at {last_sent} messages; status answers of {:.1} MB",
            answers.count(),
            answers.quantile_ms(0.5),
            answers.quantile_ms(0.99),
            answers.max_ms(),
            status_bytes as f64 / 1e6,
        );
        // What the run adds (its instances' reports, histograms, merged statuses), per instance:
        // it was 225 KB when each instance's histogram was kept dense.
        let per = |rss: f64| (rss - rss_no_run).max(0.0) * 1024.0 / instances.max(1) as f64;
        println!(
            "memory the run adds per instance: {:.1} KB held (its reports, histograms, the state written), {:.1} KB at the peak (with statuses of the whole fleet being merged and answered)",
            per(rss_run),
            per(peak_rss)
        );
        println!(
            "leases: longest gap between two assignments {} ms; {} later than the {} s lease ({} of them before the measurement)",
            leases.max_gap_ms.load(Ordering::Relaxed),
            late,
            LEASE.as_secs(),
            late_before
        );
        // What open dashboards cost: the coordinator's CPU over equal windows with none, one
        // and ten pages following the live view (each a server-sent-event stream read whole).
        let dash_s = env_num("DASH_SECONDS", 20);
        if dash_s > 0 {
            let mut base = None;
            for pages in [0usize, 1, 10] {
                let stop_pages = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let readers: Vec<_> = (0..pages)
                    .map(|_| {
                        let (web, stop) = (web.clone(), stop_pages.clone());
                        std::thread::spawn(move || follow_dashboard(&web, &stop))
                    })
                    .collect();
                // Let the pages connect and the frames settle before measuring.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (t, c) = (Instant::now(), cpu_ticks(pid));
                tokio::time::sleep(Duration::from_secs(dash_s)).await;
                let cores = (cpu_ticks(pid) - c) as f64 / 100.0 / t.elapsed().as_secs_f64();
                stop_pages.store(true, Ordering::Relaxed);
                let bytes: u64 = readers.into_iter().map(|r| r.join().unwrap_or(0)).sum();
                let extra = base.map_or(String::new(), |b: f64| format!(" ({:+.1} % of a core)", (cores - b) * 100.0));
                println!(
                    "dashboards: {pages} open: coordinator {cores:.3} cores{extra}; {:.1} KB/s of frames per page",
                    bytes as f64 / 1024.0 / (dash_s + 2) as f64 / pages.max(1) as f64
                );
                base.get_or_insert(cores);
            }
        }
        let _ = stop_tx.send(true);
        for t in tasks {
            t.abort();
        }
        format!(
            "agents={agents} instances={instances} coord_cpu_cores={cores:.2} coord_rss_mib={peak_rss:.0} status_p99_ms={:.0} late_leases={late}",
            answers.quantile_ms(0.99)
        )
    });
    let _ = coord.kill();
    let _ = coord.wait();
    let _ = std::fs::remove_dir_all(&state_dir);
    println!("{summary}");
}
