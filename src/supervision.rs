//! How an agent's simulator processes fared, as one table: each field of `pb::Supervision`
//! with its name and meaning, from which the sums, the JSON, the Prometheus families and the
//! summary's words are all made. A test checks the table against the wire contract, so a field
//! added there and forgotten here fails.

use crate::wire::pb;

/// One field: its name (JSON key, and `vtox_<name>_total` in Prometheus), what it counts,
/// and how to read and add it.
pub struct Field {
    pub name: &'static str,
    pub help: &'static str,
    pub get: fn(&pb::Supervision) -> u64,
    pub get_mut: fn(&mut pb::Supervision) -> &mut u64,
}

pub const FIELDS: [Field; 6] = [
    Field {
        name: "processes_started",
        help: "Simulator processes started in the run.",
        get: |s| s.processes_started,
        get_mut: |s| &mut s.processes_started,
    },
    Field {
        name: "restarts",
        help: "Simulator starts beyond each instance's first (processes started minus instances started).",
        get: |s| s.restarts,
        get_mut: |s| &mut s.restarts,
    },
    Field {
        name: "crashes",
        help: "Simulator processes that exited abnormally.",
        get: |s| s.crashes,
        get_mut: |s| &mut s.crashes,
    },
    Field {
        name: "lease_stops",
        help: "Simulator processes stopped on a lease expiry.",
        get: |s| s.lease_stops,
        get_mut: |s| &mut s.lease_stops,
    },
    Field {
        name: "lease_expiries",
        help: "Lease expiries of agents (each stops every process of its agent).",
        get: |s| s.lease_expiries,
        get_mut: |s| &mut s.lease_expiries,
    },
    Field {
        name: "shed",
        help: "Simulator processes stopped to shed load from an agent starved of CPU.",
        get: |s| s.shed,
        get_mut: |s| &mut s.shed,
    },
];

/// Adds `other` into `into`, field by field.
pub fn add(into: &mut pb::Supervision, other: &pb::Supervision) {
    for f in &FIELDS {
        *(f.get_mut)(into) += (f.get)(other);
    }
}

/// The sum of several.
pub fn sum<'a>(all: impl IntoIterator<Item = &'a pb::Supervision>) -> pb::Supervision {
    let mut t = pb::Supervision::default();
    for s in all {
        add(&mut t, s);
    }
    t
}

/// Every field by its name.
pub fn json(s: &pb::Supervision) -> serde_json::Value {
    serde_json::Value::Object(
        FIELDS
            .iter()
            .map(|f| (f.name.to_string(), serde_json::json!((f.get)(s))))
            .collect(),
    )
}

/// The processes in words, for a summary: "3 processes started, 2 restarts (1 crashed, 1
/// stopped on a lease expiry), 1 lease expiry".
pub fn words(s: &pb::Supervision) -> String {
    let plural = |n: u64, one: &str, many: &str| {
        if n == 1 {
            format!("1 {one}")
        } else {
            format!("{n} {many}")
        }
    };
    let mut out = format!(
        "{} started, {}",
        plural(s.processes_started, "process", "processes"),
        plural(s.restarts, "restart", "restarts")
    );
    let why: Vec<String> = [
        (s.crashes, "crashed"),
        (s.lease_stops, "stopped on a lease expiry"),
        (s.shed, "shed from a starved agent"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    if !why.is_empty() {
        out.push_str(&format!(" ({})", why.join(", ")));
    }
    if s.lease_expiries > 0 {
        out.push_str(&format!(
            ", {}",
            plural(s.lease_expiries, "lease expiry", "lease expiries")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_field_of_the_wire_contract_once() {
        let mut wire = crate::wire::proto_fields("Supervision");
        wire.sort();
        let mut table: Vec<String> = FIELDS.iter().map(|f| f.name.to_string()).collect();
        table.sort();
        assert_eq!(table, wire);
        // Each row reads and writes its own field.
        for (i, f) in FIELDS.iter().enumerate() {
            let mut s = pb::Supervision::default();
            *(f.get_mut)(&mut s) = i as u64 + 1;
            assert_eq!((f.get)(&s), i as u64 + 1, "{}", f.name);
            let others: u64 = FIELDS.iter().map(|g| (g.get)(&s)).sum();
            assert_eq!(others, i as u64 + 1, "{} touches another field", f.name);
        }
    }

    #[test]
    fn words_say_every_stop_and_only_when_there_was_one() {
        let quiet = pb::Supervision {
            processes_started: 2,
            ..Default::default()
        };
        assert_eq!(words(&quiet), "2 processes started, 0 restarts");
        let busy = pb::Supervision {
            processes_started: 5,
            restarts: 3,
            crashes: 1,
            lease_stops: 2,
            lease_expiries: 1,
            shed: 0,
        };
        assert_eq!(
            words(&busy),
            "5 processes started, 3 restarts (1 crashed, 2 stopped on a lease expiry), 1 lease expiry"
        );
    }

    #[test]
    fn sums_and_json_follow_the_table() {
        let a = pb::Supervision {
            processes_started: 3,
            restarts: 1,
            lease_stops: 1,
            ..Default::default()
        };
        let b = pb::Supervision {
            processes_started: 2,
            crashes: 1,
            lease_expiries: 1,
            shed: 1,
            ..Default::default()
        };
        let t = sum([&a, &b]);
        assert_eq!(
            json(&t),
            serde_json::json!({"processes_started": 5, "restarts": 1, "crashes": 1,
                               "lease_stops": 1, "lease_expiries": 1, "shed": 1})
        );
    }
}
