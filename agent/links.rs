//! What the agent's control thread and its supervisor share: the desired state the one hands
//! the other, the statuses the other publishes back, and the simulators' keep-alive pipes. The
//! bottom of the agent: both sides import this, it imports neither.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vtox::wire::pb;

/// What the supervisor should run: the newest trusted assignment, how many lease expiries
/// there have been (each one stops everything, even if the assignment did not change), and
/// the lease (the simulators get half of it).
#[derive(Debug, Clone)]
pub struct Desired {
    pub assignment: Option<Arc<pb::Assignment>>,
    pub expiries: u64,
    pub lease: Duration,
}

impl Default for Desired {
    fn default() -> Self {
        Desired {
            assignment: None,
            expiries: 0,
            lease: vtox::agent::LEASE_BEFORE_JOIN,
        }
    }
}

/// The simulators' stdin pipes. A byte on each every eighth of the lease while the lease
/// holds: if this thread dies or freezes, or the lease lapses, the bytes stop and every
/// simulator stops itself within its own lease (half the agent's).
#[derive(Clone, Default)]
pub struct KeepAlive(Arc<Mutex<BTreeMap<u32, std::fs::File>>>);

impl KeepAlive {
    fn pipes(&self) -> MutexGuard<'_, BTreeMap<u32, std::fs::File>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, pid: u32, pipe: std::fs::File) {
        self.pipes().insert(pid, pipe);
    }

    pub fn remove(&self, pid: u32) {
        self.pipes().remove(&pid);
    }

    pub fn beat(&self) {
        for pipe in self.pipes().values_mut() {
            // A full pipe (a simulator too busy to read) or a closed one (it exited) is fine:
            // the next beat tries again, the supervisor removes the dead.
            let _ = pipe.write(b".");
        }
    }
}

/// What the supervisor publishes for the heartbeats and `/metrics`.
#[derive(Default)]
pub struct Snapshot {
    pub instances: Vec<pb::InstanceStatus>,
    /// Resident memory of the simulators together.
    pub rss_bytes: u64,
    /// CPU of the simulators together, percent of the whole host (None until measured).
    pub simulators_cpu_percent: Option<f64>,
    /// CPU of the agent process itself, percent of the whole host.
    pub agent_cpu_percent: Option<f64>,
    /// Instances due to start that wait because the agent is starved.
    pub starts_deferred: u32,
}
