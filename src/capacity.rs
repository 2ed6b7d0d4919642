//! How many vehicles a host can carry: the smallest of what its CPU, memory and network allow
//! at the run's interval and batch size, counting what each simulator process costs beyond its
//! messages, with the old tool's reference table for comparison.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A host as the estimate sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSpec {
    pub name: String,
    pub logical_cores: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// Link speed in Mbit/s; 0 = unknown (the network is then not a limit).
    pub link_mbps: u32,
    /// Calibrated messages/s one core sends at batch 10; 0 = unknown.
    pub msgs_per_core: f64,
    /// What a process and a co-located sink cost on this host (zeros: unknown).
    pub costs: HostCosts,
    /// Operator cap.
    pub max_vehicles: Option<u64>,
}

/// Costs beyond the per-message one, as the agent measured them (see `hardware::detect`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HostCosts {
    /// CPU one simulator process spends per second beyond its messages, in cores; 0 = unknown.
    pub process_cores: f64,
    /// Resident memory of one simulator process before its vehicles; 0 = unknown.
    pub process_bytes: u64,
    /// CPU vtox-sink spends per message received, microseconds at batch 10; 0 = unknown.
    pub sink_us_per_msg: f64,
}

/// The load every vehicle puts on its host.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoadParams {
    pub interval_s: f64,
    pub batch_size: u32,
    /// Most vehicles per simulator process (`--per-instance`); None = sized by the host.
    pub per_instance: Option<u32>,
    /// The target is a vtox-sink on this same host (`run --local`): it shares the cores.
    pub sink_on_host: bool,
}

impl Default for LoadParams {
    fn default() -> Self {
        LoadParams {
            interval_s: 1.2,
            batch_size: 10,
            per_instance: None,
            sink_on_host: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    Cpu,
    Memory,
    Network,
    Cap,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Network => "network",
            Resource::Cap => "cap",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub max_vehicles: u64,
    pub recommended_vehicles: u64,
    pub limited_by: Resource,
    pub cpu_vehicles: u64,
    pub memory_vehicles: u64,
    pub network_vehicles: Option<u64>,
    /// Most vehicles one process drives: what one core sends at the interval, or the
    /// `--per-instance` bound where smaller. The planner cuts a host's share into processes
    /// of at most this many.
    pub per_process_vehicles: u64,
    /// Simulator processes at `max_vehicles`.
    pub processes: u64,
}

/// Used when a host has not measured itself (hypothetical `--hosts`): well below what one core
/// sends in `bench/sim.sh` (50,000+ msg/s), because real hosts share cores with other work.
pub const DEFAULT_MSGS_PER_CORE: f64 = 10_000.0;
/// Generators are planned to 80% CPU, so that a host at its estimate still keeps its schedule
/// and its agent, which must answer its coordinator in time, never waits for a core.
pub const CPU_TARGET: f64 = 0.8;
/// One sample point costs about 5% of a message's fixed cost (HTTP, TCP, head, metadata).
pub const POINT_COST: f64 = 0.05;
/// Memory kept free for the OS and the agent.
pub const MEMORY_RESERVE: u64 = 512 << 20;
/// Per vehicle: its state, URL and a share of in-flight buffers (measured ~500 B; 4x margin).
pub const VEHICLE_BYTES: u64 = 2 << 10;
/// Per process when unmeasured: above the ~7 MB a 50-vehicle vtox-sim holds.
pub const INSTANCE_BYTES: u64 = 16 << 20;
/// Per process when unmeasured, in cores: a 50-vehicle vtox-sim at 1.2 s spends ~5 ms a second
/// beyond its messages on the development machine (wake-ups that few messages share).
pub const DEFAULT_PROCESS_CORES: f64 = 0.006;
/// Links are planned to 70%: beyond that, queueing on the link itself distorts latencies.
pub const LINK_TARGET: f64 = 0.7;
/// Recommended load as a share of the maximum, as in the reference system.
pub const RECOMMENDED_SHARE: f64 = 0.75;
/// The old tool's layout: vehicles per process.
pub const OLD_TOOL_PER_INSTANCE: u32 = 50;

/// Bytes one message puts on the wire (body and head): 1,780 measured at batch 10.
pub fn message_bytes(batch_size: u32) -> f64 {
    330.0 + 145.0 * f64::from(batch_size)
}

/// A cost measured at batch 10, scaled to `batch` sample points.
fn at_batch(cost_at_10: f64, batch: u32) -> f64 {
    cost_at_10 * (1.0 + f64::from(batch.max(1)) * POINT_COST) / (1.0 + 10.0 * POINT_COST)
}

/// The most vehicles `v` with `v * per_vehicle + ceil(v / size) * per_process <= budget`:
/// a process's fixed cost is paid once per `size` vehicles, and once for a partial one.
fn fit(budget: f64, per_vehicle: f64, per_process: f64, size: u64) -> u64 {
    if !(per_vehicle > 0.0 && budget > 0.0) {
        return 0;
    }
    let size = size.max(1) as f64;
    // min(k * size, what k processes leave room for) rises, then falls, with k: its top is
    // where the two meet.
    let crossing = budget / (size * per_vehicle + per_process.max(0.0));
    let at = |k: f64| -> f64 {
        let room = budget - k * per_process;
        if k < 1.0 || room <= 0.0 {
            return 0.0;
        }
        (k * size).min((room / per_vehicle).floor())
    };
    let k = crossing.floor();
    at(k).max(at(k + 1.0)).min(u64::MAX as f64) as u64
}

pub fn estimate(host: &HostSpec, load: &LoadParams) -> Estimate {
    let interval = if load.interval_s > 0.0 {
        load.interval_s
    } else {
        1.2
    };
    let rate10 = if host.msgs_per_core > 0.0 {
        host.msgs_per_core
    } else {
        DEFAULT_MSGS_PER_CORE
    };
    // CPU seconds per message: the simulator's, and the sink's where it shares the host (an
    // unmeasured sink is taken to cost what a simulator does per message).
    let sim_cost = at_batch(1.0 / rate10, load.batch_size);
    let sink_cost = match (load.sink_on_host, host.costs.sink_us_per_msg) {
        (false, _) => 0.0,
        (true, us) if us > 0.0 => at_batch(us * 1e-6, load.batch_size),
        (true, _) => sim_cost,
    };
    // One core's worth of vehicles at the CPU target: the processes are cut to this size, so a
    // host runs about one process per core whatever the fleet.
    let per_core = (CPU_TARGET * interval / sim_cost).floor().max(1.0) as u64;
    let per_process = match load.per_instance {
        Some(p) => per_core.min(u64::from(p.max(1))),
        None => per_core,
    };
    let process_cores = if host.costs.process_cores > 0.0 {
        host.costs.process_cores
    } else {
        DEFAULT_PROCESS_CORES
    };
    let cpu_vehicles = fit(
        f64::from(host.logical_cores) * CPU_TARGET,
        (sim_cost + sink_cost) / interval,
        process_cores,
        per_process,
    );
    let process_bytes = if host.costs.process_bytes > 0 {
        host.costs.process_bytes
    } else {
        INSTANCE_BYTES
    };
    let memory_vehicles = fit(
        host.memory_available_bytes.saturating_sub(MEMORY_RESERVE) as f64,
        VEHICLE_BYTES as f64,
        process_bytes as f64,
        per_process,
    );
    let network_vehicles = (host.link_mbps > 0).then(|| {
        let per_vehicle_bits = message_bytes(load.batch_size) * 8.0 / interval;
        (f64::from(host.link_mbps) * 1e6 * LINK_TARGET / per_vehicle_bits).floor() as u64
    });
    let mut max = cpu_vehicles;
    let mut limited_by = Resource::Cpu;
    if memory_vehicles < max {
        max = memory_vehicles;
        limited_by = Resource::Memory;
    }
    if let Some(n) = network_vehicles.filter(|n| *n < max) {
        max = n;
        limited_by = Resource::Network;
    }
    if let Some(cap) = host.max_vehicles.filter(|c| *c < max) {
        max = cap;
        limited_by = Resource::Cap;
    }
    Estimate {
        max_vehicles: max,
        recommended_vehicles: (max as f64 * RECOMMENDED_SHARE).floor() as u64,
        limited_by,
        cpu_vehicles,
        memory_vehicles,
        network_vehicles,
        per_process_vehicles: per_process,
        processes: max.div_ceil(per_process),
    }
}

/// What the agent's calibration measured, as two simulator processes side by side: a large
/// one (`big`) and one of 50 vehicles at 1.2 s (`small`), each with the CPU time the kernel
/// accounted to it and the messages it sent, and the sink's CPU over the same time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationRun {
    pub seconds: f64,
    pub big_cpu_s: f64,
    pub big_sent: u64,
    pub small_cpu_s: f64,
    pub small_sent: u64,
    pub small_rss_bytes: u64,
    /// None when no vtox-sink was measured.
    pub sink_cpu_s: Option<f64>,
}

/// The costs a calibration run implies: each process costs `fixed + per_message * sent` over
/// the run, so two processes of very different rates give both terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fitted {
    pub sim_us_per_msg: f64,
    pub process_cores: f64,
    pub process_rss_bytes: u64,
    pub sink_us_per_msg: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CalibrationError {
    #[error("the calibration's processes sent too few messages to measure ({0} and {1})")]
    TooFew(u64, u64),
    #[error("the calibration took no measurable CPU time")]
    NoCpu,
}

impl CalibrationRun {
    pub fn fit(&self) -> Result<Fitted, CalibrationError> {
        // The large process must dominate its fixed cost, or the slope is all noise.
        if self.big_sent < 1000 || self.big_sent < 10 * self.small_sent.max(1) {
            return Err(CalibrationError::TooFew(self.big_sent, self.small_sent));
        }
        if !(self.big_cpu_s > 0.0 && self.seconds > 0.0) {
            return Err(CalibrationError::NoCpu);
        }
        let slope = (self.big_cpu_s - self.small_cpu_s) / (self.big_sent - self.small_sent) as f64;
        // A small process measured as cheaper than its messages (clock granularity, a quiet
        // moment) has no measurable fixed cost; the slope is then the large one's average.
        let (per_message, fixed) =
            if slope > 0.0 && self.small_cpu_s >= slope * self.small_sent as f64 {
                (slope, self.small_cpu_s - slope * self.small_sent as f64)
            } else {
                (self.big_cpu_s / self.big_sent as f64, 0.0)
            };
        let sink = self
            .sink_cpu_s
            .map(|cpu| cpu * 1e6 / (self.big_sent + self.small_sent) as f64)
            .unwrap_or(0.0);
        Ok(Fitted {
            sim_us_per_msg: per_message * 1e6,
            process_cores: fixed / self.seconds,
            process_rss_bytes: self.small_rss_bytes,
            sink_us_per_msg: sink,
        })
    }
}

/// The old tool's table: cores -> (max, recommended) vehicles.
const REFERENCE: [(u32, u64, u64); 4] = [
    (4, 200, 150),
    (6, 400, 300),
    (8, 800, 600),
    (12, 1500, 1000),
];

/// The reference row for these cores, or the largest row with fewer; None below 4 cores.
pub fn reference_for_cores(cores: u32) -> Option<(u64, u64)> {
    REFERENCE
        .iter()
        .rev()
        .find(|(c, _, _)| *c <= cores)
        .map(|(_, m, r)| (*m, *r))
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HostSpecError {
    #[error("empty host in --hosts (two commas in a row?)")]
    Empty,
    #[error("host {0:?} must look like 8c16g, 8c16g@1000mbps or 3x8c16g")]
    Syntax(String),
    #[error("host {0:?} has no cores")]
    NoCores(String),
    #[error("host {0:?} has no memory")]
    NoMemory(String),
    #[error("host {0:?}: link speed must end in mbps or gbps")]
    Link(String),
    #[error("host {0:?} asks for more than {MAX_HOSTS} hosts")]
    TooMany(String),
}

/// More hypothetical hosts than any fleet has: a typo (`4000000x`) must not allocate forever.
pub const MAX_HOSTS: usize = 100_000;

/// Parses `4c8g,8c32g@1000mbps,3x16c64g@10gbps` into hypothetical hosts.
pub fn parse_hosts(spec: &str) -> Result<Vec<HostSpec>, HostSpecError> {
    let mut out = Vec::new();
    for raw in spec.split(',') {
        let item = raw.trim().to_ascii_lowercase();
        if item.is_empty() {
            return Err(HostSpecError::Empty);
        }
        let syntax = || HostSpecError::Syntax(raw.trim().to_string());
        let (count, rest) = match item.split_once('x') {
            Some((n, rest)) => (n.parse::<u32>().map_err(|_| syntax())?, rest),
            None => (1, item.as_str()),
        };
        let (hw, link) = match rest.split_once('@') {
            Some((hw, l)) => (hw, Some(l)),
            None => (rest, None),
        };
        let (cores, mem) = hw
            .strip_suffix('g')
            .and_then(|s| s.split_once('c'))
            .ok_or_else(syntax)?;
        let cores: u32 = cores.parse().map_err(|_| syntax())?;
        let mem_gb: f64 = mem.parse().map_err(|_| syntax())?;
        if cores == 0 {
            return Err(HostSpecError::NoCores(raw.trim().to_string()));
        }
        if !(mem_gb > 0.0 && mem_gb.is_finite()) {
            return Err(HostSpecError::NoMemory(raw.trim().to_string()));
        }
        let link_mbps = match link {
            None => 0,
            Some(l) => {
                let bad = || HostSpecError::Link(raw.trim().to_string());
                let (num, scale) = if let Some(n) = l.strip_suffix("gbps") {
                    (n, 1000.0)
                } else if let Some(n) = l.strip_suffix("mbps") {
                    (n, 1.0)
                } else {
                    return Err(bad());
                };
                let v: f64 = num.parse().map_err(|_| bad())?;
                (v * scale).round().clamp(0.0, f64::from(u32::MAX)) as u32
            }
        };
        if count == 0 {
            return Err(syntax());
        }
        if out.len() + count as usize > MAX_HOSTS {
            return Err(HostSpecError::TooMany(raw.trim().to_string()));
        }
        let bytes = (mem_gb * (1u64 << 30) as f64) as u64;
        for _ in 0..count {
            out.push(HostSpec {
                name: format!("host-{}", out.len() + 1),
                logical_cores: cores,
                memory_total_bytes: bytes,
                memory_available_bytes: bytes,
                link_mbps,
                msgs_per_core: 0.0,
                costs: HostCosts::default(),
                max_vehicles: None,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cores: u32, gib: u64, mbps: u32) -> HostSpec {
        HostSpec {
            name: "h".into(),
            logical_cores: cores,
            memory_total_bytes: gib << 30,
            memory_available_bytes: gib << 30,
            link_mbps: mbps,
            msgs_per_core: 10_000.0,
            costs: HostCosts {
                process_cores: 0.005,
                process_bytes: 8 << 20,
                sink_us_per_msg: 50.0,
            },
            max_vehicles: None,
        }
    }

    /// The CPU limit by its definition: `v` vehicles at 1/interval messages each, plus one
    /// process cost per `size` vehicles (rounded up), fit in cores x 80 %.
    fn cpu_fits(v: u64, cores: u32, msg_s: f64, process: f64, size: u64, interval: f64) -> bool {
        v as f64 / interval * msg_s + v.div_ceil(size) as f64 * process
            <= f64::from(cores) * CPU_TARGET + 1e-9
    }

    #[test]
    fn each_limit_binds_in_turn() {
        let load = LoadParams::default();
        let e = estimate(&host(1, 64, 0), &load);
        assert_eq!(e.limited_by, Resource::Cpu);
        // One core at 10,000 msg/s carries 0.8 x 1.2 s x 10,000 = 9,600 vehicles, less one
        // process's 0.5 %.
        assert_eq!(e.per_process_vehicles, 9600);
        assert!(cpu_fits(e.max_vehicles, 1, 1e-4, 0.005, 9600, 1.2));
        assert!(!cpu_fits(e.max_vehicles + 1, 1, 1e-4, 0.005, 9600, 1.2));
        assert_eq!((e.max_vehicles, e.processes), (9540, 1));
        assert_eq!(e.network_vehicles, None);
        let e = estimate(&host(64, 1, 0), &load);
        assert_eq!(e.limited_by, Resource::Memory);
        // Every vehicle's 2 KiB and each process's 8 MiB fit in what the reserve leaves.
        let room = ((1u64 << 30) - MEMORY_RESERVE) as f64;
        let used = |v: u64| {
            v as f64 * 2048.0 + v.div_ceil(e.per_process_vehicles) as f64 * (8u64 << 20) as f64
        };
        assert!(used(e.memory_vehicles) <= room);
        assert!(used(e.memory_vehicles + 1) > room);
        let e = estimate(&host(64, 64, 10), &load);
        assert_eq!(e.limited_by, Resource::Network);
        assert_eq!(e.max_vehicles, (10e6 * 0.7 / (1780.0 * 8.0 / 1.2)) as u64);
        let mut capped = host(8, 16, 0);
        capped.max_vehicles = Some(100);
        let e = estimate(&capped, &load);
        assert_eq!(
            (e.limited_by, e.max_vehicles, e.recommended_vehicles),
            (Resource::Cap, 100, 75)
        );
    }

    #[test]
    fn small_processes_cost_what_they_measured() {
        // The old tool's 50 vehicles a process pay a process's cost per 50 vehicles: on two
        // cores that is most of the CPU (the 400 processes that starved a 2-core host).
        let h = host(2, 64, 0);
        let sized = estimate(&h, &LoadParams::default());
        let old = estimate(
            &h,
            &LoadParams {
                per_instance: Some(50),
                ..Default::default()
            },
        );
        assert_eq!((sized.processes, old.per_process_vehicles), (2, 50));
        assert!(cpu_fits(old.max_vehicles, 2, 1e-4, 0.005, 50, 1.2));
        assert!(!cpu_fits(old.max_vehicles + 1, 2, 1e-4, 0.005, 50, 1.2));
        assert!(
            old.max_vehicles * 2 < sized.max_vehicles,
            "{old:?} {sized:?}"
        );
        // A bound above one core's worth changes nothing.
        let big = estimate(
            &h,
            &LoadParams {
                per_instance: Some(1_000_000),
                ..Default::default()
            },
        );
        assert_eq!(big, sized);
    }

    #[test]
    fn a_sink_on_the_host_takes_its_share_of_the_cores() {
        let h = host(2, 64, 0);
        let remote = estimate(&h, &LoadParams::default());
        let local = estimate(
            &h,
            &LoadParams {
                sink_on_host: true,
                ..Default::default()
            },
        );
        // 100 µs a message for the simulator and 50 for the sink: two thirds of the vehicles.
        let ratio = local.max_vehicles as f64 / remote.max_vehicles as f64;
        assert!((ratio - 100.0 / 150.0).abs() < 0.01, "{ratio}");
        // The processes are still cut by the simulator's own cost: one core's worth each.
        assert_eq!(local.per_process_vehicles, remote.per_process_vehicles);
        assert_eq!(local.processes, 2);
        // Unmeasured, the sink is taken to cost what the simulator does.
        let mut unmeasured = h.clone();
        unmeasured.costs.sink_us_per_msg = 0.0;
        let e = estimate(
            &unmeasured,
            &LoadParams {
                sink_on_host: true,
                ..Default::default()
            },
        );
        let ratio = e.max_vehicles as f64 / remote.max_vehicles as f64;
        assert!((ratio - 0.5).abs() < 0.01, "{ratio}");
    }

    #[test]
    fn a_calibration_separates_the_cost_of_a_message_from_that_of_a_process() {
        // 40 µs a message and 6 ms a second per process, as two processes would show it.
        let run = CalibrationRun {
            seconds: 1.5,
            big_cpu_s: 0.009 + 9000.0 * 40e-6,
            big_sent: 9000,
            small_cpu_s: 0.009 + 62.0 * 40e-6,
            small_sent: 62,
            small_rss_bytes: 7 << 20,
            sink_cpu_s: Some(9062.0 * 50e-6),
        };
        let f = run.fit().unwrap();
        assert!((f.sim_us_per_msg - 40.0).abs() < 1e-6, "{f:?}");
        assert!((f.process_cores - 0.006).abs() < 1e-9, "{f:?}");
        assert!((f.sink_us_per_msg - 50.0).abs() < 1e-6, "{f:?}");
        assert_eq!(f.process_rss_bytes, 7 << 20);
        // Too few messages to tell the two apart is refused, not guessed.
        let thin = CalibrationRun {
            big_sent: 500,
            ..run
        };
        assert_eq!(thin.fit(), Err(CalibrationError::TooFew(500, 62)));
        // A small process that measured cheaper than its messages has no fixed cost.
        let noisy = CalibrationRun {
            small_cpu_s: 0.0,
            sink_cpu_s: None,
            ..run
        };
        let f = noisy.fit().unwrap();
        assert_eq!((f.process_cores, f.sink_us_per_msg), (0.0, 0.0));
        assert!((f.sim_us_per_msg - run.big_cpu_s / 9000.0 * 1e6).abs() < 1e-6);
    }

    #[test]
    fn batch_size_and_defaults() {
        let small = estimate(
            &host(1, 64, 0),
            &LoadParams {
                batch_size: 10,
                ..Default::default()
            },
        );
        let big = estimate(
            &host(1, 64, 0),
            &LoadParams {
                batch_size: 1000,
                ..Default::default()
            },
        );
        assert!(big.cpu_vehicles * 20 < small.cpu_vehicles);
        let mut unknown = host(8, 16, 0);
        unknown.msgs_per_core = 0.0;
        unknown.costs = HostCosts::default();
        assert!(estimate(&unknown, &LoadParams::default()).max_vehicles >= 234);
    }

    #[test]
    fn reference_table() {
        assert_eq!(reference_for_cores(8), Some((800, 600)));
        assert_eq!(reference_for_cores(10), Some((800, 600)));
        assert_eq!(reference_for_cores(64), Some((1500, 1000)));
        assert_eq!(reference_for_cores(2), None);
    }

    #[test]
    fn host_specs() {
        let h = parse_hosts("4c8g, 8c32g@1000mbps,2x16c64g@10gbps").unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(
            (h[0].logical_cores, h[0].memory_total_bytes, h[0].link_mbps),
            (4, 8 << 30, 0)
        );
        assert_eq!(h[1].link_mbps, 1000);
        assert_eq!((h[3].name.as_str(), h[3].link_mbps), ("host-4", 10_000));
        assert_eq!(
            parse_hosts("0c8g"),
            Err(HostSpecError::NoCores("0c8g".into()))
        );
        assert_eq!(
            parse_hosts("4c0g"),
            Err(HostSpecError::NoMemory("4c0g".into()))
        );
        assert_eq!(parse_hosts("4c8g,,2c2g"), Err(HostSpecError::Empty));
        assert!(matches!(
            parse_hosts("8c16g@fast"),
            Err(HostSpecError::Link(_))
        ));
        assert!(matches!(parse_hosts("big"), Err(HostSpecError::Syntax(_))));
        assert!(matches!(
            parse_hosts("4000000000x1c1g"),
            Err(HostSpecError::TooMany(_))
        ));
    }
}
