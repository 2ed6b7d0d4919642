//! A ramp's report: the reference tool's keys computed from the steps by documented rules,
//! the advice, the per-second history in Locust's CSV layout, and one self-contained HTML file
//! with the verdicts and the charts.

use super::step::{Slo, Step, MIN_THROUGHPUT_SHARE};
use crate::backlog;
use crate::metrics::Latency;
use serde_json::{json, Value};

/// What the report says of how the ramp ran.
#[derive(Debug, Clone)]
pub struct Settings {
    pub interval_s: f64,
    pub slo: Slo,
    /// With `--redis`: the backlog tolerance, percent of the ingest rate.
    pub backlog_tolerance_percent: Option<f64>,
    pub step_duration_s: f64,
    pub search_step_duration_s: f64,
    pub warmup_s: f64,
}

/// One second of the ramp, for the CSV history.
pub struct HistoryRow {
    pub unix: f64,
    pub vehicles: u64,
    pub rate: f64,
    pub failures: f64,
    pub latency: Latency,
    pub total: u64,
    pub failed: u64,
}

/// The report: the reference tool's keys, computed from the steps by documented rules.
pub fn report(a: &Settings, steps: &[Step]) -> Value {
    let interval = a.interval_s;
    let outcomes: Vec<super::StepOutcome> = steps.iter().map(Step::outcome).collect();
    let limits = super::limits(&outcomes, interval);
    let recs = recommendations(steps, &limits);
    let never_diagnosed: u64 = steps
        .iter()
        .filter_map(|s| s.pipeline.as_ref())
        .map(|w| w.never_diagnosed)
        .sum();
    let idle: std::collections::BTreeSet<String> = steps
        .iter()
        .filter_map(|s| s.pipeline.as_ref())
        .flat_map(|w| w.idle_groups.iter().map(|g| g.name.clone()))
        .collect();
    json!({
        "test_summary": {
            "max_successful_vehicles": limits.max_successful_vehicles,
            "estimated_system_limit": limits.estimated_system_limit,
            "safe_operating_range": format!("0-{}", limits.recommended_max_vehicles),
        },
        "performance_limits": {
            "recommended_max_vehicles": limits.recommended_max_vehicles,
            "theoretical_max_vehicles": limits.estimated_system_limit,
            "ingest_limit_vehicles": limits.ingest.map(|l| l.vehicles),
            "ingest_limit_measured": limits.ingest.map(|l| l.measured),
            "diagnosis_limit_vehicles": limits.diagnosis.map(|l| l.vehicles),
            "diagnosis_limit_measured": limits.diagnosis.map(|l| l.measured),
            "limited_by": limits.limited_by,
        },
        "system_recommendations": recs,
        "slo": {
            "min_success_percent": a.slo.min_success,
            "max_p95_ms": a.slo.max_p95_ms,
            "max_delay_p95_ms": a.slo.max_delay_p95_ms,
            "min_throughput_share": MIN_THROUGHPUT_SHARE,
            "backlog_tolerance_percent": a.backlog_tolerance_percent,
            "generator_max_lag_ms": super::lag_bound_s(interval) * 1e3,
            "generator_max_simulator_cpu_percent": super::SIM_CPU_LIMIT,
        },
        "rules": {
            "max_successful_vehicles": "largest fleet (planned or search step) that met every SLO",
            "ingest_limit_vehicles": "accepted messages/s x interval of the smallest fleet that failed on HTTP (success, p95, throughput), at least the largest fleet whose HTTP side passed",
            "diagnosis_limit_vehicles": "the slowest live consumer group's processed messages/s x interval of the smallest fleet that failed on backlog or lost, at least the largest fleet whose diagnosis kept up",
            "estimated_system_limit": "the smaller measured limit, at least max_successful_vehicles; with no failure, max_successful_vehicles (a lower bound)",
            "recommended_max_vehicles": "75% of max_successful_vehicles (75% of estimated_system_limit when no fleet passed)",
            "backlog": "with --redis, a step fails as backlog when a live consumer group's backlog grew faster than --backlog-tolerance percent of the ingest rate (and 2 entries/s) over the measured window, by least squares",
            "lost": "with --redis, a step fails as lost when MAXLEN trimmed entries a live consumer group had not read yet during the measured window",
            "idle_groups": "consumer groups without consumers are listed, never judged",
            "generator": "the generator is unhealthy only on its own evidence: ticks reached more than an interval late, schedule lag beyond generator_max_lag_ms, or its simulators above generator_max_simulator_cpu_percent of their host; other load on the host is host_shared, not a generator limit",
            "search": "after the first failing step, bisection between the largest passing fleet below it (or 0) and the failure until the gap is at most --search-resolution of the failing fleet",
        },
        "messages_never_diagnosed": a.backlog_tolerance_percent.map(|_| never_diagnosed),
        "idle_groups": idle,
        "interval_s": interval,
        "step_duration_s": a.step_duration_s,
        "search_step_duration_s": a.search_step_duration_s,
        "warmup_s": a.warmup_s,
        "steps": steps.iter().map(|s| s.json(interval)).collect::<Vec<_>>(),
    })
}

/// The advice: what failed first and why, on which side, and the fleet to keep to.
fn recommendations(steps: &[Step], limits: &super::Limits) -> Vec<String> {
    let mut recs = Vec::new();
    let first_fail = steps
        .iter()
        .filter(|s| !s.passed())
        .min_by_key(|s| s.vehicles);
    let Some(fail) = first_fail else {
        recs.push(format!(
            "every step passed; the limit lies above {} vehicles: extend --steps",
            limits.max_successful_vehicles
        ));
        recs.push(format!(
            "keep the fleet at or below {} vehicles (75% of the largest passing fleet)",
            limits.recommended_max_vehicles
        ));
        return recs;
    };
    if let Some(g) = steps
        .iter()
        .filter(|s| !s.generator.healthy)
        .min_by_key(|s| s.vehicles)
    {
        recs.push(format!(
            "the generator was the limit at {} vehicles ({}): add agents and rerun before drawing conclusions about the backend at that size",
            g.vehicles,
            g.generator.reasons.join("; ")
        ));
    }
    let shared: Vec<&str> = steps
        .iter()
        .flat_map(|s| s.generator.shared_hosts.iter().map(String::as_str))
        .take(1)
        .collect();
    if let Some(h) = shared.first() {
        recs.push(format!(
            "a generator host also ran other load ({h}); vtox judged its simulators on their own CPU and schedule, but the other load may have slowed the backend if it shares the host"
        ));
    }
    if let Some(l) = limits.ingest.filter(|l| l.measured) {
        let at = steps
            .iter()
            .filter(|s| s.generator.healthy && s.outcome().failed_on_http())
            .min_by_key(|s| s.vehicles);
        if let Some(s) = at {
            let why: Vec<String> = s.causes.iter().map(|(k, v)| format!("{v} × {k}")).collect();
            recs.push(format!(
                "the ingest API gave out at {} vehicles ({}{}); it served about {} vehicles' worth of messages",
                s.vehicles,
                s.failures
                    .iter()
                    .filter(|f| !f.starts_with("backlog") && !f.starts_with("lost"))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if why.is_empty() {
                    String::new()
                } else {
                    format!("; failures: {}", why.join(", "))
                },
                l.vehicles
            ));
        }
    }
    if let Some(l) = limits.diagnosis.filter(|l| l.measured) {
        let at = steps
            .iter()
            .filter(|s| s.generator.healthy && s.outcome().failed_on_diagnosis())
            .min_by_key(|s| s.vehicles);
        if let Some(s) = at {
            let w = s.pipeline.as_ref();
            recs.push(format!(
                "the diagnosis consumers fell behind the ingest at {} vehicles ({}); the slowest, {}, processed {} msg/s, about {} vehicles at this interval: add consumers to that group or make it faster{}",
                s.vehicles,
                s.failed_as
                    .iter()
                    .filter(|f| super::FAILED_AS_DIAGNOSIS.contains(f))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" and "),
                w.and_then(|w| w.slowest_group.clone()).unwrap_or_else(|| "?".into()),
                w.and_then(|w| w.slowest_msgs_per_s)
                    .map_or_else(|| "?".into(), |r| format!("{r:.1}")),
                l.vehicles,
                match w.map(|w| w.never_diagnosed).unwrap_or(0) {
                    0 => String::new(),
                    n => format!("; MAXLEN trimmed {n} messages before they were diagnosed"),
                }
            ));
        }
    }
    if limits.max_successful_vehicles > 0 {
        recs.push(format!(
            "keep the fleet at or below {} vehicles (75% of {}, the largest passing fleet); the {} side limits it first, at about {} vehicles",
            limits.recommended_max_vehicles,
            limits.max_successful_vehicles,
            limits.limited_by,
            limits.estimated_system_limit
        ));
    } else if limits.recommended_max_vehicles > 0 {
        recs.push(format!(
            "no fleet passed, down to {} vehicles; the backend served about {} vehicles' worth of messages, so start below {} vehicles and fix what failed first",
            fail.vehicles,
            limits.estimated_system_limit,
            limits.recommended_max_vehicles
        ));
    } else {
        recs.push(format!(
            "no fleet passed, down to {} vehicles, and the backend accepted almost nothing: check the target, its logs and what failed ({})",
            steps.iter().map(|s| s.vehicles).min().unwrap_or(fail.vehicles),
            fail.failures.join(", ")
        ));
    }
    recs
}

/// Locust's `_stats_history.csv` columns, one row a second of the ramp.
pub fn csv(rows: &[HistoryRow]) -> String {
    let mut out = String::from(
        "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%,Total Request Count,Total Failure Count\n",
    );
    for r in rows {
        let q = |p: f64| r.latency.quantile_ms(p).round() as u64;
        out.push_str(&format!(
            "{},{},POST,ingest,{:.2},{:.2},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.unix as u64,
            r.vehicles,
            r.rate,
            r.failures,
            q(0.5),
            q(0.66),
            q(0.75),
            q(0.8),
            q(0.9),
            q(0.95),
            q(0.98),
            q(0.99),
            q(0.999),
            q(0.9999),
            r.latency.max_ms().round() as u64,
            r.total,
            r.failed
        ));
    }
    out
}

/// The verdict table: a row per step, in fleet order.
fn verdict_table(steps: &[Step]) -> String {
    let mut rows: Vec<&Step> = steps.iter().collect();
    rows.sort_by_key(|s| (s.vehicles, s.search));
    let mut out = String::from(
        "<table id=\"verdicts\"><thead><tr><th>vehicles</th><th>step</th><th>expected msg/s</th><th>accepted msg/s</th><th>success %</th><th>p95 ms</th><th>delay p95 ms</th><th>failures by cause</th><th>peak connections</th><th>verdict</th><th>failed as</th><th>limiting side</th></tr></thead><tbody>\n",
    );
    for s in rows {
        let causes: Vec<String> = s.causes.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            if s.passed() { "pass" } else { "fail" },
            s.vehicles,
            if s.search { "search" } else { "planned" },
            s.expected_rate,
            s.accepted_rate,
            s.success,
            s.p95().map_or_else(|| "-".into(), |p| format!("{p:.1}")),
            s.delay_p95().map_or_else(|| "-".into(), |p| format!("{p:.1}")),
            escape(&causes.join(", ")),
            s.peak_connections,
            if s.passed() { "pass" } else { "fail" },
            escape(&s.failed_as.join(", ")),
            s.limiting_side(),
        ));
    }
    out.push_str("</tbody></table>\n");
    out
}

/// One self-contained HTML file: the summary, the advice, the verdict table and the SVG charts
/// with their SLO lines.
pub fn html(a: &Settings, steps: &[Step], report: &Value) -> String {
    use crate::charts::{svg, Chart};
    let x: Vec<f64> = steps.iter().map(|s| s.vehicles as f64).collect();
    let search: Vec<bool> = steps.iter().map(|s| s.search).collect();
    let lat =
        |i: usize| -> Vec<Option<f64>> { steps.iter().map(|s| s.latency.map(|l| l[i])).collect() };
    let delay =
        |i: usize| -> Vec<Option<f64>> { steps.iter().map(|s| s.delay.map(|l| l[i])).collect() };
    let mut charts = vec![
        Chart {
            title: "Throughput: accepted vs expected",
            y_label: "messages/s",
            x: &x,
            series: vec![
                (
                    "expected",
                    steps.iter().map(|s| Some(s.expected_rate)).collect(),
                ),
                (
                    "accepted",
                    steps.iter().map(|s| Some(s.accepted_rate)).collect(),
                ),
            ],
            search: &search,
            slo: None,
        },
        Chart {
            title: "Latency percentiles (steps with successful requests)",
            y_label: "ms",
            x: &x,
            series: vec![("p50", lat(0)), ("p95", lat(1)), ("p99", lat(2))],
            search: &search,
            slo: Some(("p95 SLO", a.slo.max_p95_ms)),
        },
        Chart {
            title: "Delay percentiles: scheduled time to answer (steps with successful requests)",
            y_label: "ms",
            x: &x,
            series: vec![("p50", delay(0)), ("p95", delay(1)), ("p99", delay(2))],
            search: &search,
            slo: a.slo.max_delay_p95_ms.map(|d| ("delay p95 SLO", d)),
        },
        Chart {
            title: "Success rate",
            y_label: "% of requests",
            x: &x,
            series: vec![("success", steps.iter().map(|s| Some(s.success)).collect())],
            search: &search,
            slo: Some(("success SLO", a.slo.min_success)),
        },
    ];
    if steps.iter().any(|s| s.pipeline.is_some()) {
        // The slowest live group decides when diagnoses fall behind; idle groups are not in it.
        let of = |f: &dyn Fn(&backlog::Window) -> Option<f64>| -> Vec<Option<f64>> {
            steps
                .iter()
                .map(|s| s.pipeline.as_ref().and_then(f))
                .collect()
        };
        charts.push(Chart {
            title: "Diagnosis: ingest vs the slowest live consumer group",
            y_label: "messages/s",
            x: &x,
            series: vec![
                ("ingested", of(&|w| w.ingest_msgs_per_s)),
                (
                    "processed by the slowest live group",
                    of(&|w| w.slowest_msgs_per_s),
                ),
            ],
            search: &search,
            slo: None,
        });
    }
    let mut body = String::new();
    for c in &charts {
        match svg(c) {
            Ok(s) => body.push_str(&format!("<figure>{s}</figure>\n")),
            Err(e) => body.push_str(&format!(
                "<p>chart {:?} could not be drawn: {e}</p>\n",
                c.title
            )),
        }
    }
    let summary = serde_json::to_string_pretty(&report["test_summary"]).unwrap_or_default();
    let recs: String = report["system_recommendations"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|r| r.as_str())
                .map(|r| format!("<li>{}</li>", escape(r)))
                .collect()
        })
        .unwrap_or_default();
    let idle = report["idle_groups"]
        .as_array()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let names: Vec<&str> = l.iter().filter_map(Value::as_str).collect();
            format!(
                "<p>Idle consumer groups (no consumers, not judged): {}</p>\n",
                escape(&names.join(", "))
            )
        })
        .unwrap_or_default();
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>vtox ramp report</title>\n<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}figure{{margin:1em 0}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}tr.fail td{{background:#fde8e8}}</style></head>\n<body><h1>vtox ramp report</h1>\n<pre>{}</pre>\n<ul>{recs}</ul>\n{idle}<h2>Verdicts</h2>\n{}<p>Search steps are drawn as hollow triangles; a step without a successful request has no latency point.</p>\n{body}</body></html>\n",
        escape(&summary),
        verdict_table(steps),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
