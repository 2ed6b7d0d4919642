//! Prometheus text exposition of the coordinator's and an agent's view: message counters per
//! agent, a latency histogram, and the gauges an operator alerts on.

use crate::metrics::Latency;
use crate::wire::pb;
use std::fmt::Write as _;

/// Latency buckets in seconds, as Prometheus users expect them for HTTP APIs.
const BUCKETS_S: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn counter_family(out: &mut String, name: &str, help: &str, rows: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (agent, v) in rows {
        let _ = writeln!(out, "{name}{{agent=\"{}\"}} {v}", label(agent));
    }
}

fn gauge(out: &mut String, name: &str, help: &str, v: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

fn histogram(out: &mut String, name: &str, help: &str, latency: &Latency) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for b in BUCKETS_S {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{b}\"}} {}",
            latency.count_at_most_us((b * 1e6) as u64)
        );
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", latency.count());
    let _ = writeln!(
        out,
        "{name}_sum {}",
        latency.mean_ms() / 1e3 * latency.count() as f64
    );
    let _ = writeln!(out, "{name}_count {}", latency.count());
}

const LATENCY_HELP: &str =
    "Service time: request handed to a connection until its whole answer was read.";
const DELAY_HELP: &str =
    "Delay from each message's scheduled time until its answer, including every wait before it went out.";

/// The gauges of delivery: messages waiting in buffers and vehicles out of coverage.
fn delivery_gauges(out: &mut String, buffered: u64, offline: u64) {
    gauge(
        out,
        "vtox_buffered_messages",
        "Messages waiting in vehicles' buffers.",
        buffered as f64,
    );
    gauge(
        out,
        "vtox_offline_vehicles",
        "Vehicles out of coverage.",
        offline as f64,
    );
}

/// The per-agent counter families: the rows of the counter table that name one.
fn families(out: &mut String, rows: &[(String, pb::Counters)]) {
    for d in crate::counters::DEFS {
        let Some((name, help)) = d.prometheus else {
            continue;
        };
        let values: Vec<(String, u64)> =
            rows.iter().map(|(a, c)| (a.clone(), (d.get)(c))).collect();
        counter_family(out, name, help, &values);
    }
}

/// The coordinator's metrics, from its run status and its agent list.
pub fn coordinator(status: &pb::RunStatus, agents_connected: usize) -> String {
    let mut out = String::new();
    let rows: Vec<(String, pb::Counters)> = status
        .agents
        .iter()
        .map(|a| (a.agent.clone(), a.totals.clone().unwrap_or_default()))
        .collect();
    families(&mut out, &rows);
    let totals = status.totals.clone().unwrap_or_default();
    let latency = Latency::from_bytes(&totals.latency_hdr).unwrap_or_default();
    histogram(&mut out, "vtox_latency_seconds", LATENCY_HELP, &latency);
    let delay = Latency::from_bytes(&totals.delay_hdr).unwrap_or_default();
    histogram(&mut out, "vtox_delay_seconds", DELAY_HELP, &delay);
    delivery_gauges(&mut out, totals.buffered, totals.offline_vehicles);
    gauge(
        &mut out,
        "vtox_agents_up",
        "Agents connected.",
        agents_connected as f64,
    );
    let up: u32 = status.agents.iter().map(|a| a.instances_running).sum();
    gauge(
        &mut out,
        "vtox_instances_up",
        "Simulator instances running.",
        f64::from(up),
    );
    gauge(
        &mut out,
        "vtox_plan_vehicles",
        "Vehicles in the current plan.",
        status.vehicles as f64,
    );
    gauge(
        &mut out,
        "vtox_unassigned_vehicles",
        "Planned vehicles no connected agent drives.",
        status.unassigned_vehicles as f64,
    );
    supervision(&mut out, status);
    out
}

/// Every process started, restarted and stopped, per agent, from the supervision table; the
/// vehicles not driven and for how long; whether agents are starved and the run failed.
fn supervision(out: &mut String, status: &pb::RunStatus) {
    for f in &crate::supervision::FIELDS {
        let rows: Vec<(String, u64)> = status
            .agents
            .iter()
            .map(|a| (a.agent.clone(), a.supervision.as_ref().map_or(0, f.get)))
            .collect();
        counter_family(out, &format!("vtox_{}_total", f.name), f.help, &rows);
    }
    gauge(
        out,
        "vtox_vehicles_not_driven",
        "Planned vehicles whose simulator is not running now (lost agent, handoff, lease stop, backoff, shed).",
        status.vehicles_not_driven as f64,
    );
    gauge(
        out,
        "vtox_not_driven_seconds",
        "The longest any planned vehicle has gone undriven.",
        status.not_driven_s,
    );
    let starved = status
        .agents
        .iter()
        .filter(|a| a.usage.is_some_and(|u| u.starved))
        .count();
    gauge(
        out,
        "vtox_agents_starved",
        "Agents whose own timers ran more than a quarter of the lease late (starved of CPU).",
        starved as f64,
    );
    gauge(
        out,
        "vtox_run_failed",
        "1 when the run failed (see the status's failure).",
        if status.state() == pb::RunState::Failed {
            1.0
        } else {
            0.0
        },
    );
}

/// One agent's metrics, from its instances' statuses.
pub fn agent(name: &str, instances: &[pb::InstanceStatus]) -> String {
    let mut total = pb::Counters::default();
    let (mut latency, mut delay) = (Latency::new(), Latency::new());
    for i in instances {
        if let Some(c) = &i.counters {
            total.add(c);
            for (sum, bytes) in [(&mut latency, &c.latency_hdr), (&mut delay, &c.delay_hdr)] {
                if let Ok(l) = Latency::from_bytes(bytes) {
                    let _ = sum.merge(&l);
                }
            }
        }
    }
    let mut out = String::new();
    let (buffered, offline) = (total.buffered, total.offline_vehicles);
    families(&mut out, &[(name.to_string(), total)]);
    histogram(&mut out, "vtox_latency_seconds", LATENCY_HELP, &latency);
    histogram(&mut out, "vtox_delay_seconds", DELAY_HELP, &delay);
    delivery_gauges(&mut out, buffered, offline);
    let up = instances
        .iter()
        .filter(|i| i.phase == pb::Phase::Running as i32)
        .count();
    gauge(
        &mut out,
        "vtox_instances_up",
        "Simulator instances running.",
        up as f64,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let mut l = Latency::new();
        for us in [500, 2_000, 40_000] {
            l.record_us(us);
        }
        let c = pb::Counters {
            sent: 3,
            accepted: 3,
            timeouts: 2,
            late_accepted: 1,
            latency_hdr: l.to_bytes(),
            delay_hdr: {
                let mut d = Latency::new();
                d.record_us(3_000_000);
                d.to_bytes()
            },
            buffered: 7,
            offline_vehicles: 4,
            retried: 5,
            ..Default::default()
        };
        let s = pb::RunStatus {
            vehicles: 10,
            agents: vec![pb::AgentStatus {
                agent: "a\"b".into(),
                instances_running: 2,
                totals: Some(c.clone()),
                supervision: Some(pb::Supervision {
                    processes_started: 4,
                    restarts: 2,
                    lease_stops: 2,
                    lease_expiries: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            totals: Some(c),
            vehicles_not_driven: 6,
            ..Default::default()
        };
        let text = coordinator(&s, 1);
        // Every stop is counted, by cause, and what is not driven shows.
        for line in [
            "vtox_processes_started_total{agent=\"a\\\"b\"} 4",
            "vtox_restarts_total{agent=\"a\\\"b\"} 2",
            "vtox_lease_stops_total{agent=\"a\\\"b\"} 2",
            "vtox_lease_expiries_total{agent=\"a\\\"b\"} 1",
            "vtox_crashes_total{agent=\"a\\\"b\"} 0",
            "vtox_vehicles_not_driven 6",
            "vtox_run_failed 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(
            text.contains("vtox_messages_accepted_total{agent=\"a\\\"b\"} 3"),
            "{text}"
        );
        assert!(text.contains("vtox_messages_timed_out_total{agent=\"a\\\"b\"} 2"));
        assert!(text.contains("vtox_messages_accepted_late_total{agent=\"a\\\"b\"} 1"));
        assert!(text.contains("vtox_latency_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("vtox_latency_seconds_bucket{le=\"0.0025\"} 2"));
        assert!(text.contains("vtox_latency_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("vtox_instances_up 2") && text.contains("vtox_plan_vehicles 10"));
        // The delay histogram is apart from the service time: one message waited 3 s.
        assert!(
            text.contains("vtox_delay_seconds_bucket{le=\"2.5\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("vtox_delay_seconds_bucket{le=\"5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vtox_buffered_messages 7") && text.contains("vtox_offline_vehicles 4")
        );
        assert!(
            text.contains("vtox_messages_retried_total{agent=\"a\\\"b\"} 5"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split(' ').count(), 2, "{line}");
        }
    }
}
