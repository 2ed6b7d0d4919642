//! `vtox-coord ramp`: runs the fleet at growing sizes, judges each step on its measured window
//! only, and writes `performance_test_report.json` with the reference keys computed from the
//! measurements. Exit code 0 when every step passed, 99 when a step missed an SLO (as k6 does).

use crate::backend::{unix_now, BackendRedis, Sampler};
use crate::cli::{connect, params_of, status_error};
use crate::{CoordArg, LoadArgs};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args as ClapArgs;
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;
use vtox::backlog;
use vtox::duration::parse_duration;
use vtox::metrics::Latency;
use vtox::wire::pb;

/// Exit code of a ramp in which a step missed its SLOs.
pub const EXIT_THRESHOLD: u8 = 99;
/// A step also fails when the backend accepted less than this share of the expected rate.
const MIN_THROUGHPUT_SHARE: f64 = 0.95;
/// The generator counts as healthy below this CPU use on every agent.
const GENERATOR_CPU_LIMIT: f64 = 80.0;

#[derive(Debug, ClapArgs)]
pub struct RampArgs {
    #[command(flatten)]
    pub coord: CoordArg,
    /// Start a coordinator, one agent and (without --target) a vtox-sink on this machine.
    #[arg(long)]
    pub local: bool,
    /// Base URL of the backend's ingest API [default: http://127.0.0.1:8000, or the local sink].
    #[arg(long)]
    pub target: Option<String>,
    /// Fleet sizes, in order.
    #[arg(
        long,
        default_value = "50,100,200,300,500,750,1000",
        value_delimiter = ','
    )]
    pub steps: Vec<u64>,
    /// Measured time of each step.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub step_duration: Duration,
    /// Unmeasured time at the start of each step.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// A step fails below this percent of successful requests.
    #[arg(long, default_value_t = 99.0)]
    pub min_success: f64,
    /// A step fails when its 95th percentile latency exceeds this.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub max_p95: Duration,
    /// Run every step even after one failed.
    #[arg(long = "continue")]
    pub keep_going: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "performance_test_report.json")]
    pub out: std::path::PathBuf,
    /// Also write one self-contained HTML file with the charts.
    #[arg(long, value_name = "FILE")]
    pub html: Option<std::path::PathBuf>,
    /// Also write per-second history to PREFIX_stats_history.csv (Locust's layout).
    #[arg(long, value_name = "PREFIX")]
    pub csv: Option<String>,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Percent of vehicles with a developing fault, e.g. insulation=5,bearing=3.
    #[arg(long, default_value = "")]
    pub faults: String,
    /// Wait until this many agents joined before the first step.
    #[arg(long, default_value_t = 1)]
    pub expect_agents: u32,
    /// Request timeout of the simulators.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub redis: crate::backend::RedisArgs,
}

/// One second of the ramp, for the CSV history.
struct HistoryRow {
    unix: f64,
    vehicles: u64,
    rate: f64,
    failures: f64,
    latency: Latency,
    total: u64,
    failed: u64,
}

/// One step's measurements over its window.
struct Step {
    vehicles: u64,
    expected_rate: f64,
    achieved_rate: f64,
    accepted_rate: f64,
    success: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    dropped: u64,
    agents: Vec<Value>,
    max_cpu: f64,
    failures: Vec<String>,
    /// What failed, as words a script can match: success, p95, throughput, backlog.
    failed_as: Vec<&'static str>,
    /// The backend's Redis over the measured window (with --redis).
    pipeline: Option<backlog::Window>,
    /// Groups whose backlog grew over the window.
    behind: Vec<String>,
}

impl Step {
    fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn generator_healthy(&self) -> bool {
        self.dropped == 0 && self.max_cpu < GENERATOR_CPU_LIMIT
    }

    fn json(&self) -> Value {
        json!({
            "vehicles": self.vehicles,
            "expected_msgs_per_s": self.expected_rate,
            "achieved_msgs_per_s": self.achieved_rate,
            "accepted_msgs_per_s": self.accepted_rate,
            "success_percent": self.success,
            "latency_ms": {"p50": self.p50, "p95": self.p95, "p99": self.p99, "max": self.max},
            "dropped_ticks": self.dropped,
            "agents": self.agents,
            "verdict": if self.passed() { "pass" } else { "fail" },
            "failed_on": self.failures,
            "generator_healthy": self.generator_healthy(),
            "failed_as": self.failed_as,
            "limiting_side": if self.passed() { "none" } else if self.generator_healthy() { "backend" } else { "generator" },
            "backend_pipeline": self.pipeline.as_ref().map(|w| json!({
                "ingest_msgs_per_s": w.ingest_per_s,
                "results_per_s": w.results_per_s,
                "groups": w.groups.iter().map(|g| json!({
                    "name": g.name,
                    "consumers": g.consumers,
                    "processed_msgs_per_s": g.processed_per_s,
                    "lag_slope_per_s": g.backlog_slope_per_s,
                    "backlog_start": g.backlog_start,
                    "backlog_end": g.backlog_end,
                })).collect::<Vec<_>>(),
                "falling_behind": self.behind,
            })),
        })
    }
}

pub async fn ramp(a: RampArgs) -> Result<ExitCode> {
    if a.steps.is_empty() || a.steps.contains(&0) {
        bail!("--steps must list fleet sizes of at least 1 vehicle");
    }
    if let Some(t) = &a.target {
        vtox::ingest::Target::parse(t).context("--target")?;
    }
    a.faults
        .parse::<vtox::faults::FaultMix>()
        .context("--faults")?;
    a.redis.check()?;
    let mut redis = BackendRedis::connect(&a.redis).await?;
    let score_from = match &mut redis {
        Some(r) => Some(r.server_ms().await?),
        None => None,
    };
    let keep = (a.warmup + a.step_duration).as_secs() as usize + 30;
    let sampler = redis.clone().map(|r| Sampler::start(r, keep));
    let cluster = if a.local {
        Some(crate::local::start(a.target.clone()).await?)
    } else {
        None
    };
    let (url, target) = match &cluster {
        Some(c) => (c.coord_url.clone(), c.target.clone()),
        None => (
            a.coord.coord.clone(),
            a.target
                .clone()
                .unwrap_or_else(|| "http://127.0.0.1:8000".into()),
        ),
    };
    let mut history = Vec::new();
    let result = run_steps(&a, &url, &target, sampler.as_ref(), &mut history).await;
    if let Some(c) = cluster {
        c.shutdown().await;
    }
    let steps = result?;
    let mut report = report(&a, &steps);
    if let Some(r) = &mut redis {
        match r.score(score_from).await {
            Ok(card) => {
                eprint!("{}", card.table());
                report["diagnosis"] = card.json();
            }
            Err(e) => eprintln!("warning: cannot score the diagnoses: {e:#}"),
        }
    }
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.out, text + "\n")
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!("report written to {}", a.out.display());
    if let Some(path) = &a.html {
        std::fs::write(path, html(&a, &steps, &report))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("charts written to {}", path.display());
    }
    if let Some(prefix) = &a.csv {
        let path = format!("{prefix}_stats_history.csv");
        std::fs::write(&path, csv(&history)).with_context(|| format!("cannot write {path}"))?;
        eprintln!("history written to {path}");
    }
    println!("{}", report["test_summary"]);
    Ok(if steps.iter().all(Step::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_THRESHOLD)
    })
}

async fn run_steps(
    a: &RampArgs,
    url: &str,
    target: &str,
    sampler: Option<&Sampler>,
    history: &mut Vec<HistoryRow>,
) -> Result<Vec<Step>> {
    let mut client = connect(url).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let agents = client
            .list_agents(pb::ListAgentsRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .agents;
        if agents.iter().filter(|x| x.connected).count() as u32 >= a.expect_agents.max(1) {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "fewer than {} agents joined within a minute",
                a.expect_agents.max(1)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut steps = Vec::new();
    for (i, &n) in a.steps.iter().enumerate() {
        eprintln!(
            "step {}/{}: {n} vehicles for {:?} (+{:?} warm-up)",
            i + 1,
            a.steps.len(),
            a.step_duration,
            a.warmup
        );
        let step = run_step(a, &mut client, target, n, sampler, history).await?;
        eprintln!(
            "  {}: {:.0}/{:.0} msg/s, {:.2}% ok, p95 {:.1} ms{}",
            if step.passed() { "pass" } else { "FAIL" },
            step.accepted_rate,
            step.expected_rate,
            step.success,
            step.p95,
            if step.failures.is_empty() {
                String::new()
            } else {
                format!(" ({})", step.failures.join(", "))
            }
        );
        let failed = !step.passed();
        steps.push(step);
        if failed && !a.keep_going {
            break;
        }
    }
    Ok(steps)
}

async fn run_step(
    a: &RampArgs,
    client: &mut crate::cli::ControlClient,
    target: &str,
    n: u64,
    sampler: Option<&Sampler>,
    history: &mut Vec<HistoryRow>,
) -> Result<Step> {
    let interval = a.load.interval.as_secs_f64();
    let spec = pb::RunSpec {
        target: target.to_string(),
        interval_s: interval,
        jitter: 0.1,
        batch_size: a.load.batch_size,
        sampling_rate: 50,
        faults: a.faults.clone(),
        seed: 2024,
        timeout_s: a.timeout.as_secs_f64(),
        max_in_flight: 1024,
        stagger_s: 0.05,
        duration_s: (a.warmup + a.step_duration).as_secs_f64(),
        ..Default::default()
    };
    let req = pb::StartRequest {
        params: Some(params_of(n, &a.load)),
        spec: Some(spec),
        expect_agents: 0,
    };
    let started = client.start(req).await.map_err(status_error)?.into_inner();
    let mut watch = client
        .watch(pb::WatchRequest { interval_ms: 500 })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut start: Option<pb::RunStatus> = None;
    let mut end: Option<pb::RunStatus> = None;
    let mut max_cpu: std::collections::BTreeMap<String, (f64, u64)> = Default::default();
    let total_s = (a.warmup + a.step_duration).as_secs_f64() + 1.0;
    let bar = indicatif::ProgressBar::new(total_s.ceil() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(format!("{n} vehicles"));
    let mut prev: Option<(f64, u64, u64, Latency)> = None;
    let (mut window_from, mut window_to) = (0.0, 0.0);
    while let Some(s) = watch.message().await.map_err(status_error)? {
        if s.run_id != started.run_id {
            bail!("the coordinator started another run");
        }
        bar.set_position(s.elapsed_s.min(total_s) as u64);
        let t = s.totals.clone().unwrap_or_default();
        let lat = Latency::from_bytes(&t.latency_hdr).unwrap_or_default();
        let done = t.accepted + t.failed;
        if let Some((pt, pdone, pfailed, plat)) = &prev {
            let dt = (s.elapsed_s - pt).max(0.001);
            let rate = done.saturating_sub(*pdone) as f64 / dt;
            bar.set_message(format!("{rate:.0} msg/s, {:.2}% ok", t.success_percent()));
            history.push(HistoryRow {
                unix: unix_now(),
                vehicles: n,
                rate,
                failures: t.failed.saturating_sub(*pfailed) as f64 / dt,
                latency: lat.since(plat).unwrap_or_default(),
                total: done,
                failed: t.failed,
            });
        }
        prev = Some((s.elapsed_s, done, t.failed, lat));
        // The run's clock starts a second before its schedules (see Start).
        let measuring = s.elapsed_s >= a.warmup.as_secs_f64() + 1.0;
        if measuring && start.is_none() {
            start = Some(s.clone());
            window_from = unix_now();
        }
        if start.is_some() {
            for ag in &s.agents {
                let u = ag.usage.unwrap_or_default();
                let e = max_cpu.entry(ag.agent.clone()).or_default();
                e.0 = e.0.max(u.cpu_percent);
                e.1 = e.1.max(u.rss_bytes);
            }
        }
        if s.state != "running" {
            end = Some(s);
            break;
        }
        // The backend's streams are judged while the fleet drives, not as it winds down.
        window_to = unix_now();
    }
    let (Some(start), Some(end)) = (start, end) else {
        bail!("the step ended before its measured window")
    };
    let pipeline = sampler.and_then(|x| backlog::window(&x.between(window_from, window_to)));
    let (t0, t1) = (
        start.totals.unwrap_or_default(),
        end.totals.unwrap_or_default(),
    );
    let window = (end.elapsed_s - start.elapsed_s)
        .max(0.001)
        .min(a.step_duration.as_secs_f64() + 1.0);
    let window = window.max(1.0);
    let done = (t1.accepted + t1.failed).saturating_sub(t0.accepted + t0.failed);
    let accepted = t1.accepted.saturating_sub(t0.accepted);
    let lat = Latency::from_bytes(&t1.latency_hdr)
        .and_then(|l| l.since(&Latency::from_bytes(&t0.latency_hdr)?))
        .map_err(|e| anyhow!("latency window: {e}"))?;
    let expected = n as f64 / interval;
    let mut step = Step {
        vehicles: n,
        expected_rate: expected,
        achieved_rate: done as f64 / window,
        accepted_rate: accepted as f64 / window,
        success: if done == 0 {
            0.0
        } else {
            accepted as f64 * 100.0 / done as f64
        },
        p50: lat.quantile_ms(0.5),
        p95: lat.quantile_ms(0.95),
        p99: lat.quantile_ms(0.99),
        max: lat.max_ms(),
        dropped: t1.dropped.saturating_sub(t0.dropped),
        agents: max_cpu
            .iter()
            .map(|(k, (c, r))| json!({"name": k, "cpu_percent": c, "rss_bytes": r}))
            .collect(),
        max_cpu: max_cpu.values().map(|v| v.0).fold(0.0, f64::max),
        failures: Vec::new(),
        failed_as: Vec::new(),
        pipeline: None,
        behind: Vec::new(),
    };
    if step.success < a.min_success {
        step.failures
            .push(format!("success {:.2}% < {}%", step.success, a.min_success));
        step.failed_as.push("success");
    }
    if step.p95 > a.max_p95.as_secs_f64() * 1e3 {
        step.failures.push(format!(
            "p95 {:.1} ms > {} ms",
            step.p95,
            a.max_p95.as_millis()
        ));
        step.failed_as.push("p95");
    }
    if step.accepted_rate < expected * MIN_THROUGHPUT_SHARE {
        step.failures.push(format!(
            "accepted {:.0}/s < {:.0}% of {:.0}/s",
            step.accepted_rate,
            MIN_THROUGHPUT_SHARE * 100.0,
            expected
        ));
        step.failed_as.push("throughput");
    }
    if let Some(w) = &pipeline {
        let behind = w.falling_behind(a.redis.tolerance());
        for g in &behind {
            step.failures.push(format!(
                "backlog: {} processed {}/s of {}/s ingested, its backlog growing {:.1}/s",
                g.name,
                g.processed_per_s
                    .map_or_else(|| "?".into(), |r| format!("{r:.1}")),
                w.ingest_per_s
                    .map_or_else(|| "?".into(), |r| format!("{r:.1}")),
                g.backlog_slope_per_s.unwrap_or(0.0),
            ));
        }
        if !behind.is_empty() {
            step.failed_as.push("backlog");
        }
        step.behind = behind.iter().map(|g| g.name.clone()).collect();
    } else if sampler.is_some() {
        tracing::warn!("no samples of the backend's Redis over the step; its backlog is unjudged");
    }
    step.pipeline = pipeline;
    Ok(step)
}

/// The report: the reference tool's keys, computed from the steps by documented rules.
fn report(a: &RampArgs, steps: &[Step]) -> Value {
    let interval = a.load.interval.as_secs_f64();
    let max_ok = steps
        .iter()
        .filter(|s| s.passed())
        .map(|s| s.vehicles)
        .max()
        .unwrap_or(0);
    let first_fail = steps.iter().find(|s| !s.passed());
    // The limit is what the backend actually served at the first failing step, in vehicles at
    // this interval (never below the largest passing step); without a failure, the largest
    // step is a lower bound.
    let limit = match first_fail {
        Some(f) => ((f.accepted_rate * interval).floor() as u64).max(max_ok),
        None => max_ok,
    };
    let recommended = (max_ok as f64 * 0.75).floor() as u64;
    let mut recs = Vec::new();
    match first_fail {
        Some(f) if !f.generator_healthy() => recs.push(format!(
            "the generator was the limit at {} vehicles (dropped ticks or agents above {GENERATOR_CPU_LIMIT}% CPU): add agents and rerun before drawing conclusions about the backend",
            f.vehicles
        )),
        Some(f) => recs.push(format!(
            "the backend failed at {} vehicles ({}); it served about {} vehicles' worth of messages",
            f.vehicles,
            f.failures.join(", "),
            limit
        )),
        None => recs.push(format!("every step passed; the limit lies above {max_ok} vehicles: extend --steps")),
    }
    if let Some(f) = first_fail.filter(|f| !f.behind.is_empty()) {
        recs.push(format!(
            "the diagnosis consumers fell behind the ingest at {} vehicles ({}): the API answered, but its results come later and later; add consumers to those groups or make them faster",
            f.vehicles,
            f.behind.join(", ")
        ));
    }
    recs.push(format!(
        "keep the fleet at or below {recommended} vehicles (75% of the largest passing step)"
    ));
    json!({
        "test_summary": {
            "max_successful_vehicles": max_ok,
            "estimated_system_limit": limit,
            "safe_operating_range": format!("0-{recommended}"),
        },
        "performance_limits": {
            "recommended_max_vehicles": recommended,
            "theoretical_max_vehicles": limit,
        },
        "system_recommendations": recs,
        "slo": {
            "min_success_percent": a.min_success,
            "max_p95_ms": a.max_p95.as_secs_f64() * 1e3,
            "min_throughput_share": MIN_THROUGHPUT_SHARE,
            "backlog_tolerance_percent": a.redis.redis.as_ref().map(|_| a.redis.backlog_tolerance),
        },
        "rules": {
            "max_successful_vehicles": "largest step that met every SLO",
            "estimated_system_limit": "accepted messages/s of the first failing step x interval, at least max_successful_vehicles",
            "recommended_max_vehicles": "75% of max_successful_vehicles",
            "backlog": "with --redis, a step fails as backlog when a consumer group's backlog (lag + pending) grew faster than --backlog-tolerance percent of the ingest rate (and 2 entries/s) over the measured window, by least squares",
        },
        "interval_s": interval,
        "step_duration_s": a.step_duration.as_secs_f64(),
        "warmup_s": a.warmup.as_secs_f64(),
        "steps": steps.iter().map(Step::json).collect::<Vec<_>>(),
    })
}

/// Locust's `_stats_history.csv` columns, one row a second of the ramp.
fn csv(rows: &[HistoryRow]) -> String {
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

/// One self-contained HTML file: the summary and three SVG charts with their SLO lines.
fn html(a: &RampArgs, steps: &[Step], report: &Value) -> String {
    use vtox::charts::{svg, Chart};
    let x: Vec<f64> = steps.iter().map(|s| s.vehicles as f64).collect();
    let mut charts = vec![
        Chart {
            title: "Throughput: achieved vs expected",
            y_label: "messages/s",
            x: &x,
            series: vec![
                ("expected", steps.iter().map(|s| s.expected_rate).collect()),
                ("accepted", steps.iter().map(|s| s.accepted_rate).collect()),
            ],
            slo: None,
        },
        Chart {
            title: "Latency percentiles",
            y_label: "ms",
            x: &x,
            series: vec![
                ("p50", steps.iter().map(|s| s.p50).collect()),
                ("p95", steps.iter().map(|s| s.p95).collect()),
                ("p99", steps.iter().map(|s| s.p99).collect()),
            ],
            slo: Some(("p95 SLO", a.max_p95.as_secs_f64() * 1e3)),
        },
        Chart {
            title: "Success rate",
            y_label: "% of requests",
            x: &x,
            series: vec![("success", steps.iter().map(|s| s.success).collect())],
            slo: Some(("success SLO", a.min_success)),
        },
    ];
    if steps.iter().any(|s| s.pipeline.is_some()) {
        // The slowest group decides when diagnoses fall behind.
        let of = |f: &dyn Fn(&backlog::Window) -> Option<f64>| -> Vec<f64> {
            steps
                .iter()
                .map(|s| s.pipeline.as_ref().and_then(f).unwrap_or(0.0))
                .collect()
        };
        charts.push(Chart {
            title: "Diagnosis: ingest vs the slowest consumer group",
            y_label: "messages/s",
            x: &x,
            series: vec![
                ("ingested", of(&|w| w.ingest_per_s)),
                (
                    "processed by the slowest group",
                    of(&|w| {
                        w.groups
                            .iter()
                            .filter_map(|g| g.processed_per_s)
                            .reduce(f64::min)
                    }),
                ),
            ],
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
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>vtox ramp report</title>\n<style>body{{font-family:sans-serif;max-width:780px;margin:2em auto}}figure{{margin:1em 0}}</style></head>\n<body><h1>vtox ramp report</h1>\n<pre>{}</pre>\n<ul>{recs}</ul>\n{body}</body></html>\n",
        escape(&summary)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
