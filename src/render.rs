//! How a coordinator's answers read: tables, the live view's text and summaries for people,
//! one JSON object for scripts. Pure functions of the gRPC messages (the time passed in), so
//! every command and the tests render alike; the CLI only puts the text on the terminal.

use crate::fleet::vehicle_id;
use crate::metrics::Latency;
use crate::wire::pb;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

pub fn link(mbps: u32) -> String {
    if mbps == 0 {
        "-".into()
    } else {
        format!("{mbps} Mb/s")
    }
}

pub fn plan_json(reply: &pb::PlanReply) -> Value {
    json!({
        "vehicles": reply.total_vehicles,
        "total_max_vehicles": reply.total_max,
        "total_recommended_vehicles": reply.total_recommended,
        "old_layout": {"per_instance": crate::capacity::OLD_TOOL_PER_INSTANCE, "instances": reply.old_layout_instances, "max_vehicles": reply.old_layout_max_vehicles},
        "agents": reply.agents.iter().map(|a| {
            let hw = a.hardware.clone().unwrap_or_default();
            json!({
                "name": a.agent,
                "cores": hw.logical_cores,
                "memory_bytes": hw.memory_total_bytes,
                "link_mbps": hw.link_mbps,
                "max_vehicles": a.max_vehicles,
                "recommended_vehicles": a.recommended_vehicles,
                "limited_by": a.limited_by,
                "per_process_vehicles": a.per_process_vehicles,
                "vehicles": a.instances.iter().map(|i| i.vehicles).sum::<u64>(),
                "instances": a.instances.iter().map(|i| json!({
                    "index": i.index,
                    "first_vehicle": i.first_vehicle,
                    "vehicles": i.vehicles,
                    "first_id": vehicle_id(i.first_vehicle),
                    "last_id": vehicle_id(i.first_vehicle + i.vehicles.saturating_sub(1)),
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
    })
}

pub fn plan_table(reply: &pb::PlanReply) -> String {
    let mut out = String::new();
    let instances: usize = reply.agents.iter().map(|a| a.instances.len()).sum();
    for a in &reply.agents {
        let hw = a.hardware.clone().unwrap_or_default();
        let vehicles: u64 = a.instances.iter().map(|i| i.vehicles).sum();
        let _ = writeln!(
            out,
            "{}: {} cores, {}, link {}; carries up to {} vehicles (recommended {}, limited by {}); planned {} vehicles in {} of up to {}",
            a.agent,
            hw.logical_cores,
            gib(hw.memory_total_bytes),
            link(hw.link_mbps),
            a.max_vehicles,
            a.recommended_vehicles,
            a.limited_by,
            vehicles,
            plural(a.instances.len() as u64, "instance"),
            a.per_process_vehicles
        );
        for i in &a.instances {
            let last = i.first_vehicle + i.vehicles.saturating_sub(1);
            let _ = writeln!(
                out,
                "  instance {:>4}  vehicles {:>7}..{:<7} ({:>3})  {} .. {}",
                i.index,
                i.first_vehicle,
                last,
                i.vehicles,
                vehicle_id(i.first_vehicle),
                vehicle_id(last)
            );
        }
    }
    let _ = writeln!(
        out,
        "total: {} vehicles in {} on {}; capacity {} vehicles (recommended {})",
        reply.total_vehicles,
        plural(instances as u64, "instance"),
        plural(reply.agents.len() as u64, "agent"),
        reply.total_max,
        reply.total_recommended
    );
    if reply.old_layout_instances > 0 {
        let _ = writeln!(
            out,
            "the old tool's layout (--per-instance 50) would be {} processes, and these hosts would carry {} vehicles that way (each process costs CPU of its own)",
            reply.old_layout_instances, reply.old_layout_max_vehicles
        );
    }
    out
}

/// p50, p95, p99 and max in ms: from the histogram, or from the percentiles that stand in for
/// it in an agent's totals.
pub fn percentiles(c: &pb::Counters) -> (f64, f64, f64, f64) {
    if let (true, Some(s)) = (c.latency_hdr.is_empty(), &c.latency_summary) {
        let ms = |us: u64| us as f64 / 1000.0;
        return (ms(s.p50_us), ms(s.p95_us), ms(s.p99_us), ms(s.max_us));
    }
    let l = Latency::from_bytes(&c.latency_hdr).unwrap_or_default();
    (
        l.quantile_ms(0.5),
        l.quantile_ms(0.95),
        l.quantile_ms(0.99),
        l.max_ms(),
    )
}

/// p50, p95, p99 and max in ms of the delay from each message's scheduled time to its answer;
/// None where no simulator recorded one.
pub fn delay_percentiles(c: &pb::Counters) -> Option<(f64, f64, f64, f64)> {
    if c.delay_hdr.is_empty() {
        return None;
    }
    let l = Latency::from_bytes(&c.delay_hdr).ok()?;
    Some((
        l.quantile_ms(0.5),
        l.quantile_ms(0.95),
        l.quantile_ms(0.99),
        l.max_ms(),
    ))
}

/// Whether the run delivers store-and-forward (its statuses then tell buffers and outages).
fn forwarding(s: &pb::RunStatus) -> bool {
    s.spec.as_ref().is_some_and(|x| {
        crate::delivery::Delivery::parse(&x.delivery)
            .is_none_or(|d| d == crate::delivery::Delivery::StoreAndForward)
    })
}

/// The live table: redrawn in place on a terminal, printed every few seconds otherwise.
/// The live table's text, with each agent's rate of answers since the previous look.
#[derive(Default)]
pub struct Live {
    previous: HashMap<String, (u64, Instant)>,
}

const LIVE_HEADER: [&str; 13] = [
    "agent",
    "instances",
    "vehicles",
    "msg/s",
    "ok %",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "host%",
    "sim%",
    "rss MiB",
    "restarts",
    "lag ms",
];

impl Live {
    /// The run's status at `now` as the live table; `extra` (the backend's backlog) goes below.
    pub fn text(&mut self, s: &pb::RunStatus, extra: &str, now: Instant) -> String {
        let h = LIVE_HEADER;
        let mut text = format!(
            "{:<16} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>5} {:>5} {:>8} {:>8} {:>7}\n",
            h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11], h[12]
        );
        for agent in &s.agents {
            text.push_str(&self.agent_row(agent, now));
        }
        text.push_str(&totals_line(s));
        if let Some(line) = undriven_line(s) {
            let _ = writeln!(text, "{line}");
        }
        text.push_str(extra);
        text
    }

    fn agent_row(&mut self, agent: &pb::AgentStatus, now: Instant) -> String {
        let c = agent.totals.clone().unwrap_or_default();
        let done = c.accepted + c.failed;
        let rate = match self.previous.insert(agent.agent.clone(), (done, now)) {
            Some((prev, t)) if now > t => {
                (done.saturating_sub(prev)) as f64 / now.duration_since(t).as_secs_f64()
            }
            _ => 0.0,
        };
        let (p50, p95, p99, _) = percentiles(&c);
        let usage = agent.usage.unwrap_or_default();
        let restarts = agent.supervision.map_or(0, |x| x.restarts);
        let lag = usage.control_lag_ms.max(usage.supervisor_lag_ms);
        format!(
            "{:<16} {:>4}/{:<4} {:>9} {:>9.0} {:>8.2} {:>8.1} {:>8.1} {:>8.1} {:>5.0} {:>5} {:>8.0} {:>8} {:>7.0}{}{}\n",
            agent.agent,
            agent.instances_running,
            agent.instances_planned,
            agent.vehicles,
            rate,
            c.success_percent(),
            p50,
            p95,
            p99,
            usage.cpu_percent,
            usage
                .simulators_cpu_percent
                .map_or_else(|| "-".to_string(), |x| format!("{x:.0}")),
            usage.rss_bytes as f64 / (1u64 << 20) as f64,
            restarts,
            lag,
            if agent.connected { "" } else { "  (disconnected)" },
            if usage.starved { "  (starved of CPU)" } else { "" }
        )
    }
}

/// The fleet's line below the agents.
fn totals_line(s: &pb::RunStatus) -> String {
    let t = s.totals.clone().unwrap_or_default();
    let mut text = format!(
        "{} {:.0}s  sent {}  accepted {}  failed {}  dropped {}  unassigned vehicles {}",
        s.state().name(),
        s.elapsed_s,
        t.sent,
        t.accepted,
        t.failed,
        t.dropped,
        s.unassigned_vehicles
    );
    if forwarding(s) {
        let _ = write!(
            text,
            "  buffered {}  offline vehicles {}",
            t.buffered, t.offline_vehicles
        );
    }
    if let Some((_, _, p99, _)) = delay_percentiles(&t) {
        let _ = write!(text, "  delay p99 {p99:.1} ms");
    }
    text.push('\n');
    text
}

/// "1 agent", "3 agents".
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub fn summary(s: &pb::RunStatus) -> String {
    let t = s.totals.clone().unwrap_or_default();
    let (p50, p95, p99, max) = percentiles(&t);
    let instances: u32 = s.agents.iter().map(|a| a.instances_planned).sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {} {} after {:.1} s: {} vehicles on {} in {}",
        s.run_id,
        s.state().name(),
        s.elapsed_s,
        s.vehicles,
        plural(s.agents.len() as u64, "agent"),
        plural(u64::from(instances), "instance"),
    );
    let _ = writeln!(
        out,
        "  sent {}  accepted {} ({:.2}%)  failed {}  dropped {}",
        t.sent,
        t.accepted,
        t.success_percent(),
        t.failed,
        t.dropped
    );
    if t.failed > 0 {
        let _ = writeln!(out, "  failures: {}", failure_causes(&t).join(", "));
    }
    let _ = writeln!(
        out,
        "  latency ms: p50 {p50:.1}  p95 {p95:.1}  p99 {p99:.1}  max {max:.1}   (service time: request to answer)"
    );
    if let Some((p50, p95, p99, max)) = delay_percentiles(&t) {
        let _ = writeln!(
            out,
            "  delay ms:   p50 {p50:.1}  p95 {p95:.1}  p99 {p99:.1}  max {max:.1}   (scheduled time to answer)"
        );
    }
    if forwarding(s) {
        let _ = writeln!(out, "  delivery: {}", delivery_line(&t));
    }
    let _ = writeln!(out, "  generator: {}", generator_line(s));
    if let Some(line) = undriven_line(s) {
        let _ = writeln!(out, "{line}");
    }
    if !s.failure.is_empty() {
        let _ = writeln!(out, "  FAILED: {}", s.failure);
    }
    for a in &s.agents {
        let _ = writeln!(out, "  {}", agent_line(a));
    }
    out
}

/// Failed requests by cause, in words.
fn failure_causes(t: &pb::Counters) -> Vec<String> {
    let mut causes = Vec::new();
    if t.timeouts > 0 {
        causes.push(if t.late_accepted > 0 {
            format!(
                "{} timed out ({} of them answered 200 later)",
                t.timeouts, t.late_accepted
            )
        } else {
            format!("{} timed out", t.timeouts)
        });
    }
    for (n, what) in [
        (t.connect_errors, "connection errors"),
        (t.protocol_errors, "broken HTTP answers"),
        (t.tls_errors, "TLS handshake failures"),
    ] {
        if n > 0 {
            causes.push(format!("{n} {what}"));
        }
    }
    causes.extend(
        t.status
            .iter()
            .map(|(code, n)| format!("{n} × HTTP {code}")),
    );
    causes
}

/// An agent's line of the summary: its vehicles, instances, counts and processes.
fn agent_line(a: &pb::AgentStatus) -> String {
    let c = a.totals.clone().unwrap_or_default();
    format!(
        "{}: {} vehicles, {}/{} instances running, accepted {} of {} sent; {}",
        a.agent,
        a.vehicles,
        a.instances_running,
        a.instances_planned,
        c.accepted,
        c.sent,
        crate::supervision::words(&a.supervision.unwrap_or_default())
    )
}

/// Whether the simulators kept their schedule, on their own evidence (late ticks, lag, their
/// CPU), and whether a host also ran other load (said as a fact).
pub fn generator_verdict(s: &pb::RunStatus) -> crate::ramp::GeneratorVerdict {
    let t = s.totals.clone().unwrap_or_default();
    crate::ramp::judge_generator(&crate::ramp::GeneratorEvidence {
        interval_s: s.spec.as_ref().map_or(1.2, |x| x.interval_s),
        late_ticks: t.dropped.saturating_sub(t.dropped_busy),
        max_lag_s: t.max_lag_ms / 1e3,
        hosts: s
            .agents
            .iter()
            .map(|a| {
                let u = a.usage.unwrap_or_default();
                crate::ramp::HostUse {
                    name: a.agent.clone(),
                    cores: u.cores,
                    host_cpu_percent: u.cpu_percent,
                    simulators_cpu_percent: u.simulators_cpu_percent,
                    rss_bytes: u.rss_bytes,
                }
            })
            .collect(),
    })
}

fn generator_line(s: &pb::RunStatus) -> String {
    let t = s.totals.clone().unwrap_or_default();
    let v = generator_verdict(s);
    let mut line = if v.healthy {
        format!("kept its schedule (worst lag {:.0} ms)", t.max_lag_ms)
    } else {
        let late = t.dropped.saturating_sub(t.dropped_busy);
        let share = late as f64 * 100.0 / (t.produced + late).max(1) as f64;
        format!(
            "GENERATOR-LIMITED: {}; {share:.1} % of ticks were dropped: these numbers measure vtox's hosts, not the backend (plan fewer vehicles per host, or add hosts)",
            v.reasons.join("; ")
        )
    };
    let starved: Vec<&str> = s
        .agents
        .iter()
        .filter(|a| a.usage.is_some_and(|u| u.starved))
        .map(|a| a.agent.as_str())
        .collect();
    if !starved.is_empty() {
        let _ = write!(line, "; agents starved of CPU: {}", starved.join(", "));
    }
    if v.host_shared {
        let _ = write!(
            line,
            "; hosts shared with other load ({})",
            v.shared_hosts.join("; ")
        );
    }
    line
}

/// "NOT DRIVEN: 20000 vehicles for 4 m 2 s (local: stopped on a lease expiry of its agent)",
/// once vehicles have waited long enough to be more than a start or a handoff.
pub fn undriven_line(s: &pb::RunStatus) -> Option<String> {
    if s.vehicles_not_driven == 0 || s.not_driven_s < UNDRIVEN_SHOWN_AFTER_S {
        return None;
    }
    let causes: Vec<String> = s
        .agents
        .iter()
        .filter(|a| a.vehicles_not_driven > 0)
        .map(|a| {
            format!(
                "{}: {} vehicles, {}",
                a.agent, a.vehicles_not_driven, a.not_driven_cause
            )
        })
        .collect();
    Some(format!(
        "  NOT DRIVEN: {} vehicles for {} ({})",
        s.vehicles_not_driven,
        humantime::format_duration(Duration::from_secs(s.not_driven_s as u64)),
        causes.join("; ")
    ))
}

/// Vehicles undriven for less than this are starting or in a handoff, not news.
const UNDRIVEN_SHOWN_AFTER_S: f64 = 5.0;

/// What store-and-forward did: messages made, how many waited and how, and what is left.
fn delivery_line(t: &pb::Counters) -> String {
    let mut parts = vec![format!("{} messages made", t.produced)];
    if t.delivered_late > 0 {
        let age = Latency::from_bytes(&t.late_age_hdr).unwrap_or_default();
        parts.push(format!(
            "{} delivered late (age p50 {:.1} s, max {:.1} s)",
            t.delivered_late,
            age.quantile_ms(0.5) / 1e3,
            age.max_ms() / 1e3
        ));
    }
    for (n, what) in [
        (t.retried, "resent"),
        (
            t.resent_after_timeout,
            "resent after a timeout (possible duplicates)",
        ),
        (t.buffer_dropped, "dropped from full buffers"),
        (t.discarded, "given up (refused for good)"),
        (t.buffered, "still buffered"),
        (t.offline_ticks, "made out of coverage"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    parts.join(", ")
}

/// The counters as JSON: every row of the counter table by its name, the status codes, the
/// success rate and the percentiles of latency and delay.
pub fn counters_json(c: &pb::Counters) -> Value {
    let (p50, p95, p99, max) = percentiles(c);
    let delay = delay_percentiles(c).map(
        |(p50, p95, p99, max)| json!({"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max}),
    );
    let mut out: serde_json::Map<String, Value> = crate::counters::DEFS
        .iter()
        .map(|d| (d.name.to_string(), json!((d.get)(c))))
        .collect();
    out.insert(
        "status".into(),
        Value::Object(
            c.status
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect(),
        ),
    );
    for (k, v) in [
        ("success_percent", json!(c.success_percent())),
        ("p50_ms", json!(p50)),
        ("p95_ms", json!(p95)),
        ("p99_ms", json!(p99)),
        ("max_ms", json!(max)),
        ("delay", json!(delay)),
        ("max_lag_ms", json!(c.max_lag_ms)),
    ] {
        out.insert(k.into(), v);
    }
    Value::Object(out)
}

pub fn phase_name(p: i32) -> &'static str {
    match pb::Phase::try_from(p).unwrap_or(pb::Phase::Unspecified) {
        pb::Phase::Unspecified => "unknown",
        pb::Phase::Starting => "starting",
        pb::Phase::Running => "running",
        pb::Phase::Backoff => "backoff",
        pb::Phase::Failed => "failed",
        pb::Phase::Exited => "exited",
        pb::Phase::Stopping => "stopping",
    }
}

pub fn end_name(e: i32) -> &'static str {
    match pb::End::try_from(e).unwrap_or(pb::End::None) {
        pb::End::None => "",
        pb::End::Finished => "finished",
        pb::End::Crashed => "crashed",
        pb::End::Lease => "lease",
        pb::End::Unassigned => "unassigned",
        pb::End::Shed => "shed",
        pb::End::Shutdown => "shutdown",
    }
}

pub fn status_json(s: &pb::RunStatus) -> Value {
    json!({
        "run_id": s.run_id,
        "state": s.state().name(),
        "vehicles": s.vehicles,
        "elapsed_s": s.elapsed_s,
        "target": s.spec.as_ref().map(|x| x.target.clone()),
        "unassigned_vehicles": s.unassigned_vehicles,
        "vehicles_not_driven": s.vehicles_not_driven,
        "not_driven_s": s.not_driven_s,
        "failure": (!s.failure.is_empty()).then(|| s.failure.clone()),
        "supervision": crate::supervision::json(&s.supervision.unwrap_or_default()),
        "generator": generator_verdict(s),
        "totals": counters_json(&s.totals.clone().unwrap_or_default()),
        "agents": s.agents.iter().map(agent_json).collect::<Vec<_>>(),
    })
}

fn agent_json(a: &pb::AgentStatus) -> Value {
    let u = a.usage.unwrap_or_default();
    json!({
        "name": a.agent,
        "connected": a.connected,
        "vehicles": a.vehicles,
        "instances_running": a.instances_running,
        "instances_planned": a.instances_planned,
        "cpu_percent": a.usage.map(|u| u.cpu_percent),
        "simulators_cpu_percent": u.simulators_cpu_percent,
        "rss_bytes": a.usage.map(|u| u.rss_bytes),
        "agent_cpu_percent": u.agent_cpu_percent,
        "control_lag_ms": u.control_lag_ms,
        "supervisor_lag_ms": u.supervisor_lag_ms,
        "starved": u.starved,
        "starts_deferred": u.starts_deferred,
        "supervision": crate::supervision::json(&a.supervision.unwrap_or_default()),
        "vehicles_not_driven": a.vehicles_not_driven,
        "not_driven_s": a.not_driven_s,
        "not_driven_cause": (!a.not_driven_cause.is_empty()).then(|| a.not_driven_cause.clone()),
        "totals": counters_json(&a.totals.clone().unwrap_or_default()),
        "instances": a.instances.iter().map(instance_json).collect::<Vec<_>>(),
    })
}

fn instance_json(i: &pb::InstanceStatus) -> Value {
    json!({
        "index": i.index,
        "first_vehicle": i.first_vehicle,
        "vehicles": i.vehicles,
        "phase": phase_name(i.phase),
        "restarts": i.restarts,
        "incarnation": i.incarnation,
        "end": end_name(i.end),
        "last_error": i.last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_failures_by_cause_and_only_when_there_are_some() {
        let mut s = pb::RunStatus {
            run_id: "run-1".into(),
            state: pb::RunState::Finished.into(),
            vehicles: 50,
            agents: vec![pb::AgentStatus {
                instances_planned: 1,
                ..Default::default()
            }],
            totals: Some(pb::Counters {
                sent: 10,
                accepted: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = summary(&s);
        assert!(
            text.contains("50 vehicles on 1 agent in 1 instance\n"),
            "{text}"
        );
        assert!(!text.contains("failures"), "{text}");

        s.totals = Some(pb::Counters {
            sent: 10,
            accepted: 4,
            failed: 6,
            timeouts: 3,
            late_accepted: 2,
            connect_errors: 1,
            status: [(503, 2)].into_iter().collect(),
            ..Default::default()
        });
        let text = summary(&s);
        assert!(
            text.contains(
                "failures: 3 timed out (2 of them answered 200 later), 1 connection errors, 2 × HTTP 503"
            ),
            "{text}"
        );
    }
}
