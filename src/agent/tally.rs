//! The tally files of the agent's simulators: one per incarnation, named by everything a
//! restarted agent needs to report it, holding the exact totals even of a killed process.
//! Names and arithmetic only; the agent reads the files.

use crate::wire::pb;
use std::path::PathBuf;

/// Names the tally of one incarnation by everything a restarted agent needs to report it.
#[derive(Debug, Clone, PartialEq)]
pub struct TallyKey {
    pub run_id: String,
    pub index: u32,
    pub incarnation: u64,
    pub first_vehicle: u64,
    pub vehicles: u64,
}

impl TallyKey {
    /// One directory per agent: agents on one host may share a log directory.
    pub fn dir(log_dir: &std::path::Path, agent: &str) -> PathBuf {
        let safe: String = agent
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        log_dir.join("tallies").join(safe)
    }

    pub fn path(&self, log_dir: &std::path::Path, agent: &str) -> PathBuf {
        Self::dir(log_dir, agent).join(format!(
            "{}.{}.{}.{}.{}.tally",
            self.run_id, self.index, self.incarnation, self.first_vehicle, self.vehicles
        ))
    }

    pub fn parse(name: &str) -> Option<TallyKey> {
        let mut parts = name.strip_suffix(".tally")?.rsplitn(5, '.');
        let vehicles = parts.next()?.parse().ok()?;
        let first_vehicle = parts.next()?.parse().ok()?;
        let incarnation = parts.next()?.parse().ok()?;
        let index = parts.next()?.parse().ok()?;
        let run_id = parts.next().filter(|r| !r.is_empty())?.to_string();
        Some(TallyKey {
            run_id,
            index,
            incarnation,
            first_vehicle,
            vehicles,
        })
    }
}

/// Raises the counters to a tally's totals (never lowers them: the tally may be from an
/// incarnation that never got going).
pub fn apply_tally(c: &mut pb::Counters, t: &[u64; crate::metrics::TALLY_SLOTS]) {
    use crate::metrics::*;
    if t[TALLY_SENT] < c.sent {
        return;
    }
    c.sent = t[TALLY_SENT];
    c.accepted = c.accepted.max(t[TALLY_ACCEPTED]);
    c.failed = c.failed.max(t[TALLY_FAILED]);
    c.dropped = c.dropped.max(t[TALLY_DROPPED]);
    c.bytes = c.bytes.max(t[TALLY_BYTES]);
    c.timeouts = c.timeouts.max(t[TALLY_TIMEOUT]);
    c.late_accepted = c.late_accepted.max(t[TALLY_LATE]);
    c.timeouts_unsent = c.timeouts_unsent.max(t[TALLY_UNSENT]);
    c.connect_errors = c.connect_errors.max(t[TALLY_CONNECT]);
    c.produced = c.produced.max(t[TALLY_PRODUCED]);
    c.retried = c.retried.max(t[TALLY_RETRIED]);
    c.buffer_dropped = c.buffer_dropped.max(t[TALLY_BUFFER_DROPPED]);
    c.delivered_late = c.delivered_late.max(t[TALLY_DELIVERED_LATE]);
    c.resent_after_timeout = c.resent_after_timeout.max(t[TALLY_RESENT]);
    c.discarded = c.discarded.max(t[TALLY_DISCARDED]);
    c.offline_ticks = c.offline_ticks.max(t[TALLY_OFFLINE_TICKS]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_names_round_trip() {
        let k = TallyKey {
            run_id: "run-1795888545320".into(),
            index: 3,
            incarnation: 1_795_888_545_999,
            first_vehicle: 150,
            vehicles: 50,
        };
        let p = k.path(std::path::Path::new("/logs"), "host a/1");
        assert_eq!(
            p,
            PathBuf::from("/logs/tallies/host_a_1/run-1795888545320.3.1795888545999.150.50.tally")
        );
        let name = p.file_name().and_then(|n| n.to_str()).unwrap();
        assert_eq!(TallyKey::parse(name), Some(k));
        assert_eq!(TallyKey::parse("instance-0.tally"), None);
        assert_eq!(TallyKey::parse(".1.2.3.4.tally"), None);
    }

    #[test]
    fn a_tally_raises_counters_but_never_lowers_them() {
        use crate::metrics::*;
        let mut t = [0u64; TALLY_SLOTS];
        t[TALLY_SENT] = 10;
        t[TALLY_ACCEPTED] = 9;
        t[TALLY_FAILED] = 1;
        t[TALLY_TIMEOUT] = 1;
        t[TALLY_LATE] = 1;
        let mut c = pb::Counters {
            sent: 8,
            accepted: 8,
            ..Default::default()
        };
        apply_tally(&mut c, &t);
        assert_eq!((c.sent, c.accepted, c.failed), (10, 9, 1));
        assert_eq!((c.timeouts, c.late_accepted), (1, 1));
        let mut newer = pb::Counters {
            sent: 20,
            accepted: 20,
            ..Default::default()
        };
        apply_tally(&mut newer, &t);
        assert_eq!((newer.sent, newer.accepted), (20, 20));
    }
}
