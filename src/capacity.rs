//! How many vehicles a host can carry: the smallest of what its CPU, memory and network allow
//! at the run's interval and batch size, with the old tool's reference table for comparison.

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
    /// Operator cap.
    pub max_vehicles: Option<u64>,
}

/// The load every vehicle puts on its host.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoadParams {
    pub interval_s: f64,
    pub batch_size: u32,
    pub per_instance: u32,
}

impl Default for LoadParams {
    fn default() -> Self {
        LoadParams {
            interval_s: 1.2,
            batch_size: 10,
            per_instance: 50,
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
}

/// Used when a host has not measured itself (hypothetical `--hosts`): well below what one core
/// sends in `bench/sim.sh` (50,000+ msg/s), because real hosts share cores with other work.
pub const DEFAULT_MSGS_PER_CORE: f64 = 10_000.0;
/// Generators are planned to 80% CPU, so that a host at its estimate still keeps its schedule.
pub const CPU_TARGET: f64 = 0.8;
/// One sample point costs about 5% of a message's fixed cost (HTTP, TCP, head, metadata).
pub const POINT_COST: f64 = 0.05;
/// Memory kept free for the OS and the agent.
pub const MEMORY_RESERVE: u64 = 512 << 20;
/// Per vehicle: its state, URL and a share of in-flight buffers (measured ~500 B; 4x margin).
pub const VEHICLE_BYTES: u64 = 2 << 10;
/// Per instance: one simulator process's base footprint.
pub const INSTANCE_BYTES: u64 = 16 << 20;
/// Links are planned to 70%: beyond that, queueing on the link itself distorts latencies.
pub const LINK_TARGET: f64 = 0.7;
/// Recommended load as a share of the maximum, as in the reference system.
pub const RECOMMENDED_SHARE: f64 = 0.75;

/// Bytes one message puts on the wire (body and head): 1,780 measured at batch 10.
pub fn message_bytes(batch_size: u32) -> f64 {
    330.0 + 145.0 * f64::from(batch_size)
}

pub fn estimate(host: &HostSpec, load: &LoadParams) -> Estimate {
    let interval = if load.interval_s > 0.0 {
        load.interval_s
    } else {
        1.2
    };
    let batch = f64::from(load.batch_size.max(1));
    let per_instance = u64::from(load.per_instance.max(1));
    let rate10 = if host.msgs_per_core > 0.0 {
        host.msgs_per_core
    } else {
        DEFAULT_MSGS_PER_CORE
    };
    let rate = rate10 * (1.0 + 10.0 * POINT_COST) / (1.0 + batch * POINT_COST);
    let cpu_vehicles =
        (f64::from(host.logical_cores) * rate * CPU_TARGET * interval).floor() as u64;
    let per_vehicle = VEHICLE_BYTES as f64 + INSTANCE_BYTES as f64 / per_instance as f64;
    let memory_vehicles = (host.memory_available_bytes.saturating_sub(MEMORY_RESERVE) as f64
        / per_vehicle)
        .floor() as u64;
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
            max_vehicles: None,
        }
    }

    #[test]
    fn each_limit_binds_in_turn() {
        let load = LoadParams::default();
        let e = estimate(&host(1, 64, 0), &load);
        assert_eq!((e.limited_by, e.max_vehicles), (Resource::Cpu, 9600));
        assert_eq!(e.network_vehicles, None);
        let e = estimate(&host(64, 1, 0), &load);
        assert_eq!(e.limited_by, Resource::Memory);
        assert_eq!(
            e.memory_vehicles,
            (512u64 << 20) / (2048 + (16u64 << 20) / 50)
        );
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
