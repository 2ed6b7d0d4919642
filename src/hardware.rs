//! What this host offers: cores and memory from sysinfo, the link speed from sysfs, and a
//! calibration of how many messages one core generates, measured with the real payload code.
//! Edge code (it reads the OS), kept in the library so that the agent and `vtox-coord plan`
//! share one copy.

use crate::faults::FaultMix;
use crate::http1::RequestBuf;
use crate::ingest::{simulator_path, BodyTemplate, MessageFields};
use crate::telemetry::VehicleModel;
use crate::wire::pb;
use std::time::{Duration, Instant};

/// Per-message cost of the HTTP and TCP work on top of building the payload, in microseconds,
/// as measured by `bench/sim.sh` on the reference machine (one core sending ~60,000 msg/s,
/// of which payload building is ~3 µs): the calibration times the payload code on this host
/// and adds this to turn it into a sending rate.
const SEND_COST_US: f64 = 13.0;

pub fn detect(name: &str, network_mbps: Option<u32>) -> pb::Hardware {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let logical = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let physical = sysinfo::System::physical_core_count()
        .map(|n| n as u32)
        .unwrap_or(logical);
    pb::Hardware {
        hostname: sysinfo::System::host_name().unwrap_or_else(|| name.to_string()),
        logical_cores: logical,
        physical_cores: physical.min(logical).max(1),
        memory_total_bytes: sys.total_memory(),
        memory_available_bytes: sys.available_memory(),
        os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.to_string()),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        link_mbps: network_mbps.unwrap_or_else(link_speed_mbps),
        calibrated_msgs_per_core: calibrate(Duration::from_millis(300)),
    }
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
/// timed for real (signal synthesis, body and request head), the network share is added.
pub fn calibrate(budget: Duration) -> f64 {
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
