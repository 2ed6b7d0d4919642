//! What `/proc` tells of the agent's processes: their CPU share between two looks and their
//! resident memory.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The simulators' own CPU use, measured from `/proc` of each child between snapshots, so
/// that a verdict about the generator rests on the generator and not on whatever else the
/// host runs (the backend itself, say).
pub struct CpuMeter {
    cores: u32,
    ticks_per_s: f64,
    last: Option<(Instant, BTreeMap<u32, u64>)>,
    percent: Option<f64>,
}

impl CpuMeter {
    pub fn new() -> CpuMeter {
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        CpuMeter {
            cores: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            ticks_per_s: if hz > 0 { hz as f64 } else { 100.0 },
            last: None,
            percent: None,
        }
    }

    /// Measures the pids' CPU since the last measurement (at most twice a second: several
    /// callers ask, and a short interval would be all noise).
    pub fn measure(&mut self, pids: impl Iterator<Item = u32>, now: Instant) -> Option<f64> {
        if self
            .last
            .as_ref()
            .is_some_and(|(at, _)| now.duration_since(*at) < Duration::from_millis(500))
        {
            return self.percent;
        }
        let ticks: BTreeMap<u32, u64> = pids
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                Some((pid, vtox::process::proc_stat_cpu_ticks(&stat)?))
            })
            .collect();
        if let Some((at, before)) = &self.last {
            // A process new since the last look started after it: all of its time counts.
            let used: u64 = ticks
                .iter()
                .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
                .sum();
            self.percent = Some(vtox::process::cpu_share_percent(
                used,
                self.ticks_per_s,
                now.duration_since(*at).as_secs_f64(),
                self.cores,
            ));
        }
        self.last = Some((now, ticks));
        self.percent
    }
}

pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}
