//! What this host offers: cores and memory from sysinfo, the link speed from sysfs, and a
//! calibration of what a message and a simulator process cost here, measured by running the
//! real `vtox-sim` (and `vtox-sink`) for a moment on loopback. Edge code (it reads the OS and
//! starts processes), kept in the library so that the agent and `vtox-coord plan` share one
//! copy; the arithmetic is `capacity::CalibrationRun::fit`.

use crate::capacity::CalibrationRun;
use crate::counters::SimReport;
use crate::faults::FaultMix;
use crate::http1::RequestBuf;
use crate::ingest::{simulator_path, BodyTemplate, MessageFields};
use crate::telemetry::VehicleModel;
use crate::wire::pb;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Per-message cost of the HTTP and TCP work on top of building the payload, in microseconds,
/// as measured by `bench/sim.sh` on the reference machine: only used when no simulator binary
/// can be run (`method = "payload"`).
const SEND_COST_US: f64 = 13.0;

/// How long the calibration's simulators drive: long enough that start-up is a small part of
/// the large one's CPU, short enough that an agent joins within two seconds.
const CALIBRATION: Duration = Duration::from_millis(1500);

/// The binaries a calibration runs: the simulator, and vtox-sink where it lies beside it.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub sim: PathBuf,
    pub sink: Option<PathBuf>,
}

impl Binaries {
    /// The simulator at `sim`, and the sink of the same installation if there is one.
    pub fn beside(sim: PathBuf) -> Binaries {
        let sink = sim.with_file_name("vtox-sink");
        Binaries {
            sink: sink.is_file().then_some(sink),
            sim,
        }
    }
}

/// Measures this host. With `bins`, the costs come from real processes (see `calibrate`);
/// without, or when they cannot run, from timing the payload code in this process.
pub fn detect(name: &str, network_mbps: Option<u32>, bins: Option<&Binaries>) -> pb::Hardware {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let logical = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let physical = sysinfo::System::physical_core_count()
        .map(|n| n as u32)
        .unwrap_or(logical);
    let measured = bins.map(calibrate).and_then(|r| {
        r.map_err(|e| {
            tracing::warn!("cannot calibrate with real simulator processes ({e}); timing the payload code instead");
        })
        .ok()
    });
    let calibration = measured.unwrap_or_else(|| pb::Calibration {
        sim_us_per_msg: 1e6 / calibrate_payload(Duration::from_millis(300)),
        method: "payload".into(),
        ..Default::default()
    });
    pb::Hardware {
        hostname: sysinfo::System::host_name().unwrap_or_else(|| name.to_string()),
        logical_cores: logical,
        physical_cores: physical.min(logical).max(1),
        memory_total_bytes: sys.total_memory(),
        memory_available_bytes: sys.available_memory(),
        os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.to_string()),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        link_mbps: network_mbps.unwrap_or_else(link_speed_mbps),
        calibrated_msgs_per_core: 1e6 / calibration.sim_us_per_msg.max(1e-3),
        calibration: Some(calibration),
    }
}

/// Runs two simulators side by side against a sink on loopback for `CALIBRATION`: one large
/// (3,000 vehicles every 0.5 s, one thread: what one core sends) and one of the old tool's 50
/// vehicles at 1.2 s, whose cost is mostly that of being a process. The kernel's accounting
/// of each child (wait4) gives their CPU time exactly, however busy the host is; the sink's
/// comes from its threads' scheduler statistics.
pub fn calibrate(bins: &Binaries) -> Result<pb::Calibration, String> {
    let sink_bin = bins
        .sink
        .as_deref()
        .ok_or("no vtox-sink beside the simulator to answer it")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free loopback port: {e}"))?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut sink = Reaper(
        Command::new(sink_bin)
            .args(["--listen", &addr])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", sink_bin.display()))?,
    );
    let result = calibrate_against(&bins.sim, &addr, sink.0.id());
    sink.kill();
    result
}

/// A child that is killed and reaped when dropped, so that no error path leaves one behind.
struct Reaper(Child);

impl Reaper {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.kill();
    }
}

fn calibrate_against(sim: &Path, addr: &str, sink_pid: u32) -> Result<pb::Calibration, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err("the calibration's vtox-sink did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let target = format!("http://{addr}");
    let sink_before = task_cpu_s(sink_pid);
    let big = spawn_sim(sim, &target, 3000, "0.5s")?;
    let small = match spawn_sim(sim, &target, 50, "1.2s") {
        Ok(c) => c,
        Err(e) => {
            // Reaped, so that no zombie is left behind.
            let _ = finish(big);
            return Err(e);
        }
    };
    let (big_sent, big_usage) = finish(big)?;
    let (small_sent, small_usage) = finish(small)?;
    let sink_cpu_s = match (sink_before, task_cpu_s(sink_pid)) {
        (Some(a), Some(b)) if b >= a => Some(b - a),
        _ => None,
    };
    let fitted = CalibrationRun {
        seconds: CALIBRATION.as_secs_f64(),
        big_cpu_s: big_usage.cpu_s,
        big_sent,
        small_cpu_s: small_usage.cpu_s,
        small_sent,
        small_rss_bytes: small_usage.max_rss_bytes,
        sink_cpu_s,
    }
    .fit()
    .map_err(|e| e.to_string())?;
    Ok(pb::Calibration {
        sim_us_per_msg: fitted.sim_us_per_msg,
        process_cores: fitted.process_cores,
        process_rss_bytes: fitted.process_rss_bytes,
        sink_us_per_msg: fitted.sink_us_per_msg,
        method: "processes".into(),
    })
}

fn spawn_sim(sim: &Path, target: &str, vehicles: u32, interval: &str) -> Result<Child, String> {
    let duration = format!("{}s", CALIBRATION.as_secs_f64());
    let vehicles = vehicles.to_string();
    Command::new(sim)
        .args([
            "--vehicles",
            &vehicles,
            "--target",
            target,
            "--interval",
            interval,
            "--duration",
            &duration,
            "--report-every",
            "60s",
            "--late-window",
            "0s",
            "--threads",
            "1",
            "--agent",
            "calibration",
            "--faults",
            "insulation=5,bearing=5",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", sim.display()))
}

/// What the kernel accounted to a child over its whole life.
struct Usage {
    cpu_s: f64,
    max_rss_bytes: u64,
}

/// Reads a simulator's metric lines to their end, reaps it, and returns the messages its last
/// line says it sent with its CPU time and peak memory.
fn finish(mut child: Child) -> Result<(u64, Usage), String> {
    let mut text = String::new();
    // A simulator's few lines are bounded by its report interval: one, and the final one.
    if let Some(out) = child.stdout.take() {
        let _ = out.take(1 << 20).read_to_string(&mut text);
    }
    let usage =
        wait4(child.id()).map_err(|e| format!("cannot reap a calibration simulator: {e}"))?;
    let sent = text
        .lines()
        .rev()
        .find_map(|l| SimReport::parse_line(l).ok())
        .map(|r| r.sent)
        .ok_or("a calibration simulator printed no metric line")?;
    Ok((sent, usage))
}

fn wait4(pid: u32) -> std::io::Result<Usage> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; zeroed is a valid value for it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 writes only to the two pointers given, both valid for the call.
        let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
        if r >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Usage {
        cpu_s: secs(usage.ru_utime) + secs(usage.ru_stime),
        // Linux reports kilobytes.
        max_rss_bytes: (usage.ru_maxrss.max(0) as u64) << 10,
    })
}

/// CPU time of every thread of a live process, seconds: the scheduler's nanosecond sums
/// (`/proc/PID/task/*/schedstat`), or clock ticks where the kernel keeps no such statistics.
fn task_cpu_s(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    let mut any = false;
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
        any = true;
    }
    if any {
        return Some(ns as f64 / 1e9);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(crate::process::proc_stat_cpu_ticks(&stat)? as f64 / hz)
}

/// The fastest up link among physical interfaces, from `/sys/class/net/*/speed`; 0 when
/// unknown (virtual NICs report -1 or nothing).
fn link_speed_mbps() -> u32 {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| std::fs::read_to_string(e.path().join("speed")).ok())
        .filter_map(|s| s.trim().parse::<i64>().ok())
        .filter(|&s| s > 0)
        .max()
        .map(|s| s.min(u32::MAX as i64) as u32)
        .unwrap_or(0)
}

/// Messages per second one core can send at the default batch size: the payload path is
/// timed for real (signal synthesis, body and request head), the network share is assumed.
pub fn calibrate_payload(budget: Duration) -> f64 {
    let mix: FaultMix = "insulation=5,bearing=5".parse().unwrap_or_default();
    let mut vehicles: Vec<(VehicleModel, BodyTemplate, String)> = (0..64u64)
        .map(|n| {
            let id = crate::fleet::vehicle_id(n);
            let m = crate::fleet::model_of(n);
            let path = simulator_path(&id, m.city);
            (
                VehicleModel::new(1, n, &mix),
                BodyTemplate::new(&id, m.name, "calibration", 0),
                path,
            )
        })
        .collect();
    let mut samples = Vec::with_capacity(10);
    let started = Instant::now();
    let mut count = 0u64;
    let mut t = 0.0;
    while started.elapsed() < budget {
        for (model, template, path) in vehicles.iter_mut() {
            let truth = model.message(count, t, 1.7e9 + t, 50.0, 10, &mut samples);
            let fields = MessageFields {
                seq: count,
                fault_type: truth.kind.as_str(),
                fault_severity: truth.severity,
                sent_at: "2026-11-28T09:00:00.123456Z",
                made_at: "2026-11-28T09:00:00.123456Z",
                sampling_rate: 50,
            };
            let mut req = RequestBuf::new(2048, path.len(), 16);
            template.write(req.body(), &samples, &fields);
            let (bytes, _) = req.finish(path, "127.0.0.1:8000");
            std::hint::black_box(bytes);
            count += 1;
        }
        t += 1.2;
    }
    let per_msg_us = started.elapsed().as_secs_f64() * 1e6 / count.max(1) as f64;
    1e6 / (per_msg_us + SEND_COST_US)
}
