//! The tally files of the agent's simulators: one per incarnation, named by everything a
//! restarted agent needs to report it, holding the exact totals even of a killed process.
//! Names and arithmetic only; the agent reads the files.

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

pub use crate::counters::apply_tally;

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
}
