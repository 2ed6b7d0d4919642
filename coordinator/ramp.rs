//! `vtox-coord ramp`: runs the fleet at growing sizes, judges each step on its measured window
//! only, searches for the knee between the last passing and the first failing fleet, and
//! writes `performance_test_report.json` with the reference keys computed from the
//! measurements (rules in `vtox::ramp`). Exit code 0 when every step passed, 99 when a step
//! missed an SLO (as k6 does).

use crate::args::RampArgs;
use crate::backend::{unix_now, BackendRedis, Sampler};
use crate::client::{status_error, ControlClient, Coord};
use crate::drive;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;
use vtox::backlog;
use vtox::metrics::Latency;
use vtox::ramp::{self as rules, GeneratorEvidence, GeneratorVerdict, HostUse, Search};
use vtox::wire::pb;

/// Exit code of a ramp in which a step missed its SLOs.
pub const EXIT_THRESHOLD: u8 = 99;
/// A step also fails when the backend accepted less than this share of the expected rate.
const MIN_THROUGHPUT_SHARE: f64 = 0.95;

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

/// Tells the coordinator how far the ramp got, for its dashboard. Best effort: a coordinator
/// that cannot take it (an older one) changes nothing about the ramp.
struct Progress {
    client: Option<ControlClient>,
    id: String,
    interval: f64,
    /// The SLOs the steps are judged by, so that the dashboard draws them as the report does.
    slo: Value,
}

impl Progress {
    async fn new(coord: &Coord, a: &RampArgs) -> Progress {
        Progress {
            client: coord.connect().await.ok(),
            id: format!("ramp-{}", (unix_now() * 1000.0) as u64),
            interval: a.drive.load.interval.as_secs_f64(),
            slo: json!({
                "p95_ms": a.max_p95.as_secs_f64() * 1e3,
                "delay_p95_ms": a.max_delay_p95.map(|d| d.as_secs_f64() * 1e3),
                "min_success": a.drive.min_success,
            }),
        }
    }

    async fn send(&mut self, mut req: pb::RampProgressRequest, steps: &[Step]) {
        let Some(client) = &mut self.client else {
            return;
        };
        req.ramp_id = self.id.clone();
        req.steps_json =
            Value::Array(steps.iter().map(|s| s.json(self.interval)).collect()).to_string();
        let mut current: Value = serde_json::from_str(&req.current_json).unwrap_or(json!({}));
        current["slo"] = self.slo.clone();
        req.current_json = current.to_string();
        if let Err(e) = client.ramp_progress(req).await {
            tracing::debug!(
                "the coordinator did not take the ramp's progress: {}",
                e.message()
            );
            if e.code() == tonic::Code::Unimplemented {
                self.client = None;
            }
        }
    }

    async fn step(&mut self, steps: &[Step], current: Value) {
        let req = pb::RampProgressRequest {
            state: "running".into(),
            current_json: current.to_string(),
            ..Default::default()
        };
        self.send(req, steps).await;
    }
}

/// One step's measurements over its window.
struct Step {
    vehicles: u64,
    /// A step of the search for the knee, not one of --steps.
    search: bool,
    measured_s: f64,
    expected_rate: f64,
    achieved_rate: f64,
    accepted_rate: f64,
    success: f64,
    /// Percentiles of the window's answers; None when nothing succeeded (a latency of
    /// failures only would read as a recovery).
    latency: Option<[f64; 4]>,
    /// Percentiles of the window's delays (scheduled time to answer), on the same terms.
    delay: Option<[f64; 4]>,
    /// Store-and-forward over the window: resent, dropped from full buffers, buffered at its
    /// end.
    retried: u64,
    buffer_dropped: u64,
    buffered: u64,
    dropped: u64,
    dropped_busy: u64,
    max_lag_ms: f64,
    /// Failed requests by cause: `timeout`, `connect`, `http_503`...
    causes: BTreeMap<String, u64>,
    /// Of the timeouts: answered 200 later after all.
    late_accepted: u64,
    peak_connections: u64,
    hosts: Vec<HostUse>,
    generator: GeneratorVerdict,
    failures: Vec<String>,
    /// What failed, as words a script can match: success, p95, delay, throughput, backlog, lost.
    failed_as: Vec<&'static str>,
    /// The backend's Redis over the measured window (with --redis).
    pipeline: Option<backlog::Window>,
}

impl Step {
    fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn limiting_side(&self) -> &'static str {
        rules::limiting_side(self.passed(), self.generator.healthy, &self.failed_as)
    }

    fn outcome(&self) -> rules::StepOutcome {
        rules::StepOutcome {
            vehicles: self.vehicles,
            passed: self.passed(),
            generator_healthy: self.generator.healthy,
            failed_as: self.failed_as.clone(),
            accepted_msgs_per_s: self.accepted_rate,
            slowest_group_msgs_per_s: self.pipeline.as_ref().and_then(|w| w.slowest_msgs_per_s),
        }
    }

    fn p95(&self) -> Option<f64> {
        self.latency.map(|l| l[1])
    }

    fn delay_p95(&self) -> Option<f64> {
        self.delay.map(|l| l[1])
    }

    fn json(&self, interval: f64) -> Value {
        let o = self.outcome();
        json!({
            "vehicles": self.vehicles,
            "search": self.search,
            "measured_s": self.measured_s,
            "expected_msgs_per_s": self.expected_rate,
            "achieved_msgs_per_s": self.achieved_rate,
            "accepted_msgs_per_s": self.accepted_rate,
            "success_percent": self.success,
            "latency_ms": self.latency.map(|[p50, p95, p99, max]| json!({"p50": p50, "p95": p95, "p99": p99, "max": max})),
            "delay_ms": self.delay.map(|[p50, p95, p99, max]| json!({"p50": p50, "p95": p95, "p99": p99, "max": max})),
            "retried": self.retried,
            "buffer_dropped": self.buffer_dropped,
            "buffered_at_end": self.buffered,
            "failures_by_cause": self.causes,
            "late_accepted": self.late_accepted,
            "dropped_ticks": self.dropped,
            "dropped_ticks_busy": self.dropped_busy,
            "max_lag_ms": self.max_lag_ms,
            "peak_connections": self.peak_connections,
            "agents": self.hosts,
            "verdict": if self.passed() { "pass" } else { "fail" },
            "failed_on": self.failures,
            "failed_as": self.failed_as,
            "generator_healthy": self.generator.healthy,
            "generator": self.generator,
            "host_shared": self.generator.host_shared,
            "limiting_side": self.limiting_side(),
            "ingest_limit_vehicles": o.ingest_limit_vehicles(interval),
            "diagnosis_limit_vehicles": o.diagnosis_limit_vehicles(interval),
            "backend_pipeline": self.pipeline,
        })
    }

    /// One line for the terminal.
    fn line(&self) -> String {
        format!(
            "{}: {:.0}/{:.0} msg/s accepted, {:.2}% ok, p95 {}{}{}{}",
            if self.passed() { "pass" } else { "FAIL" },
            self.accepted_rate,
            self.expected_rate,
            self.success,
            self.p95()
                .map_or_else(|| "-".to_string(), |p| format!("{p:.1} ms")),
            self.delay_p95()
                .map_or_else(String::new, |p| format!(", delay p95 {p:.1} ms")),
            if self.failures.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.failures.join("; "))
            },
            if self.generator.healthy {
                String::new()
            } else {
                format!(" [generator: {}]", self.generator.reasons.join("; "))
            }
        )
    }
}

/// Runs the ramp against the coordinator `coord` and `target` (the caller set them up, a
/// local cluster perhaps), with the backend's Redis when given; writes the report.
pub async fn ramp(
    a: &RampArgs,
    coord: &Coord,
    target: &str,
    mut redis: Option<BackendRedis>,
) -> Result<ExitCode> {
    let score_from = match &mut redis {
        Some(r) => Some(r.server_ms().await?),
        None => None,
    };
    let keep = (a.warmup + a.step_duration).as_secs() as usize + 30;
    let sampler = redis.clone().map(|r| Sampler::start(r, keep));
    let mut history = Vec::new();
    let mut progress = Progress::new(coord, a).await;
    let result = run_steps(
        a,
        coord,
        target,
        sampler.as_ref(),
        &mut history,
        &mut progress,
    )
    .await;
    finish(a, result, redis, score_from, &history, &mut progress).await
}

/// Writes the report of the steps measured and tells the coordinator how the ramp ended.
async fn finish(
    a: &RampArgs,
    result: Result<(Vec<Step>, bool)>,
    mut redis: Option<BackendRedis>,
    score_from: Option<u64>,
    history: &[HistoryRow],
    progress: &mut Progress,
) -> Result<ExitCode> {
    let failed = |e: &anyhow::Error| pb::RampProgressRequest {
        state: "failed".into(),
        error: format!("{e:#}"),
        ..Default::default()
    };
    let (steps, interrupted) = match result {
        Ok(r) => r,
        Err(e) => {
            progress.send(failed(&e), &[]).await;
            return Err(e);
        }
    };
    if steps.is_empty() {
        let e = anyhow!("interrupted before the first step was measured");
        progress.send(failed(&e), &[]).await;
        return Err(e);
    }
    let mut report = report(a, &steps);
    if let Some(r) = &mut redis {
        match r.score(score_from).await {
            Ok(card) => {
                eprint!("{}", card.table());
                report["diagnosis"] = card.json();
            }
            Err(e) => eprintln!("warning: cannot score the diagnoses: {e:#}"),
        }
    }
    let text = serde_json::to_string_pretty(&report)? + "\n";
    let page = html(a, &steps, &report);
    let rows = csv(history);
    progress
        .send(
            pb::RampProgressRequest {
                state: if interrupted { "interrupted" } else { "done" }.into(),
                report_json: text.clone(),
                report_html: page.clone(),
                history_csv: rows.clone(),
                ..Default::default()
            },
            &steps,
        )
        .await;
    std::fs::write(&a.out, text).with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!("report written to {}", a.out.display());
    if let Some(path) = &a.html {
        std::fs::write(path, page).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("charts written to {}", path.display());
    }
    if let Some(prefix) = &a.csv {
        let path = format!("{prefix}_stats_history.csv");
        std::fs::write(&path, rows).with_context(|| format!("cannot write {path}"))?;
        eprintln!("history written to {path}");
    }
    if let Some(recs) = report["system_recommendations"].as_array() {
        for r in recs.iter().filter_map(Value::as_str) {
            eprintln!("- {r}");
        }
    }
    println!("{}", report["test_summary"]);
    if interrupted {
        eprintln!("interrupted: the report covers the steps measured so far");
        return Ok(ExitCode::from(130));
    }
    Ok(if steps.iter().all(Step::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_THRESHOLD)
    })
}

async fn run_steps(
    a: &RampArgs,
    coord: &Coord,
    target: &str,
    sampler: Option<&Sampler>,
    history: &mut Vec<HistoryRow>,
    progress: &mut Progress,
) -> Result<(Vec<Step>, bool)> {
    let mut client = coord.connect().await?;
    drive::wait_for_agents(&mut client, a.drive.expect_agents, a.drive.wait).await?;
    let mut shutdown = drive::shutdown_signal();
    let ctx = Ctx {
        a,
        coord,
        target,
        sampler,
    };
    let mut steps: Vec<Step> = Vec::new();
    for (i, &n) in a.steps.iter().enumerate() {
        eprintln!(
            "step {}/{}: {n} vehicles for {:?} (+{:?} warm-up)",
            i + 1,
            a.steps.len(),
            a.step_duration,
            a.warmup
        );
        let total_s = (a.warmup + a.step_duration).as_secs_f64() + 1.0;
        progress
            .step(
                &steps,
                json!({"vehicles": n, "search": false, "started_unix": unix_now(), "total_s": total_s}),
            )
            .await;
        let Some(step) = run_step(&ctx, &mut client, n, false, history, &mut shutdown).await?
        else {
            return Ok((steps, true));
        };
        eprintln!("  {}", step.line());
        let failed = !step.passed();
        steps.push(step);
        if failed && !a.keep_going {
            break;
        }
    }
    if a.no_search {
        return Ok((steps, false));
    }
    // The knee lies between the largest fleet that passed below the first failure and that
    // failure: bisect there with shorter steps, so the report names a passing fleet even when
    // the first planned step already failed.
    let Some(first_fail) = steps
        .iter()
        .filter(|s| !s.passed())
        .map(|s| s.vehicles)
        .min()
    else {
        return Ok((steps, false));
    };
    let below = steps
        .iter()
        .filter(|s| s.passed() && s.vehicles < first_fail)
        .map(|s| s.vehicles)
        .max()
        .unwrap_or(0);
    let mut search = Search::new(below, first_fail, a.search_resolution / 100.0);
    while let Some(n) = search.next() {
        eprintln!(
            "search: {n} vehicles for {:?} (+{:?} warm-up), between {} passing and {} failing",
            a.search_duration(),
            a.warmup,
            search.passing,
            search.failing
        );
        let total_s = (a.warmup + a.search_duration()).as_secs_f64() + 1.0;
        progress
            .step(
                &steps,
                json!({"vehicles": n, "search": true, "started_unix": unix_now(), "total_s": total_s,
                       "passing": search.passing, "failing": search.failing}),
            )
            .await;
        let Some(step) = run_step(&ctx, &mut client, n, true, history, &mut shutdown).await? else {
            return Ok((steps, true));
        };
        eprintln!("  {}", step.line());
        search.record(n, step.passed());
        steps.push(step);
    }
    Ok((steps, false))
}

/// The highest use each agent's host showed during the window.
fn track_hosts(hosts: &mut BTreeMap<String, HostUse>, s: &pb::RunStatus) {
    for ag in &s.agents {
        let u = ag.usage.unwrap_or_default();
        let e = hosts.entry(ag.agent.clone()).or_insert_with(|| HostUse {
            name: ag.agent.clone(),
            ..Default::default()
        });
        e.cores = e.cores.max(u.cores);
        e.host_cpu_percent = e.host_cpu_percent.max(u.cpu_percent);
        e.simulators_cpu_percent = match (e.simulators_cpu_percent, u.simulators_cpu_percent) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        e.rss_bytes = e.rss_bytes.max(u.rss_bytes);
    }
}

/// Connections the run's simulators hold now: the sum over running instances.
fn connections(s: &pb::RunStatus) -> u64 {
    s.agents
        .iter()
        .flat_map(|a| &a.instances)
        .filter(|i| i.phase == pb::Phase::Running as i32)
        .filter_map(|i| i.counters.as_ref())
        .map(|c| c.connections)
        .sum()
}

/// Failed requests by cause between two totals.
fn causes(t0: &pb::Counters, t1: &pb::Counters) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut put = |k: String, v: u64| {
        if v > 0 {
            out.insert(k, v);
        }
    };
    put("timeout".into(), t1.timeouts.saturating_sub(t0.timeouts));
    put(
        "connect".into(),
        t1.connect_errors.saturating_sub(t0.connect_errors),
    );
    put(
        "protocol".into(),
        t1.protocol_errors.saturating_sub(t0.protocol_errors),
    );
    put("tls".into(), t1.tls_errors.saturating_sub(t0.tls_errors));
    for (code, n) in &t1.status {
        let before = t0.status.get(code).copied().unwrap_or(0);
        put(format!("http_{code}"), n.saturating_sub(before));
    }
    out
}

/// What every step of one ramp shares.
struct Ctx<'a> {
    a: &'a RampArgs,
    coord: &'a Coord,
    target: &'a str,
    sampler: Option<&'a Sampler>,
}

/// Runs one step and judges it; None when interrupted (the step's run is stopped).
async fn run_step(
    ctx: &Ctx<'_>,
    client: &mut ControlClient,
    n: u64,
    search: bool,
    history: &mut Vec<HistoryRow>,
    shutdown: &mut drive::Shutdown,
) -> Result<Option<Step>> {
    let Ctx {
        a,
        coord,
        target,
        sampler,
    } = *ctx;
    let interval = a.drive.load.interval.as_secs_f64();
    let measured = if search {
        a.search_duration()
    } else {
        a.step_duration
    };
    let req = pb::StartRequest {
        params: Some(a.drive.params(n)),
        spec: Some(a.drive.spec(target, Some(a.warmup + measured))),
        expect_agents: 0,
    };
    let started = client.start(req).await.map_err(status_error)?.into_inner();
    let mut start: Option<pb::RunStatus> = None;
    let mut hosts: BTreeMap<String, HostUse> = Default::default();
    let (mut peak_connections, mut max_lag_ms) = (0u64, 0f64);
    let total_s = (a.warmup + measured).as_secs_f64() + 1.0;
    let bar = indicatif::ProgressBar::new(total_s.ceil() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(format!("{n} vehicles"));
    let mut prev: Option<(f64, u64, u64, Latency)> = None;
    let (mut window_from, mut window_to) = (0.0, 0.0);
    // The backend's streams are judged while the schedules run, not as the fleet winds down.
    let schedule_end = 1.0 + (a.warmup + measured).as_secs_f64();
    let watched = drive::watch_run(
        client,
        coord,
        &started.run_id,
        Duration::from_millis(500),
        shutdown,
        |s| {
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
            let running = s.state() == pb::RunState::Running;
            // The run's clock starts a second before its schedules (see Start).
            let measuring = s.elapsed_s >= a.warmup.as_secs_f64() + 1.0;
            if measuring && start.is_none() {
                start = Some(s.clone());
                window_from = unix_now();
            }
            if start.is_some() && running {
                track_hosts(&mut hosts, s);
                peak_connections = peak_connections.max(connections(s));
                max_lag_ms = max_lag_ms.max(t.max_lag_ms);
                if s.elapsed_s <= schedule_end {
                    window_to = unix_now();
                }
            }
        },
    )
    .await?;
    bar.finish_and_clear();
    if watched.interrupted {
        eprintln!("stopping the step");
        drive::stop_and_settle(client, &started.run_id).await?;
        return Ok(None);
    }
    let end = watched.last;
    let (Some(start), Some(end)) = (start, end) else {
        bail!("the step ended before its measured window")
    };
    let pipeline = sampler.and_then(|x| {
        backlog::window(
            &x.between(window_from, window_to),
            a.drive.redis.tolerance(),
        )
    });
    let (t0, t1) = (
        start.totals.unwrap_or_default(),
        end.totals.unwrap_or_default(),
    );
    // The counters' own clock (the simulators' elapsed time when they were sampled) times
    // the window: statuses are taken every half second but counters move once a heartbeat,
    // so two statuses a second apart can hold zero or two heartbeats' worth of messages, and
    // a final status that comes late (a busy host) would add time in which nothing was sent.
    let sampled = t1.elapsed_s - t0.elapsed_s;
    let window = if sampled >= 0.5 {
        sampled
    } else {
        (end.elapsed_s - start.elapsed_s)
            .max(0.001)
            .min(measured.as_secs_f64() + 1.0)
            .max(1.0)
    };
    let done = (t1.accepted + t1.failed).saturating_sub(t0.accepted + t0.failed);
    let accepted = t1.accepted.saturating_sub(t0.accepted);
    let window_of = |later: &[u8], earlier: &[u8]| {
        Latency::from_bytes(later).and_then(|l| l.since(&Latency::from_bytes(earlier)?))
    };
    let lat =
        window_of(&t1.latency_hdr, &t0.latency_hdr).map_err(|e| anyhow!("latency window: {e}"))?;
    let delay =
        window_of(&t1.delay_hdr, &t0.delay_hdr).map_err(|e| anyhow!("delay window: {e}"))?;
    let quantiles = |l: &Latency| {
        (accepted > 0 && l.count() > 0).then(|| {
            [
                l.quantile_ms(0.5),
                l.quantile_ms(0.95),
                l.quantile_ms(0.99),
                l.max_ms(),
            ]
        })
    };
    let expected = n as f64 / interval;
    let dropped = t1.dropped.saturating_sub(t0.dropped);
    let dropped_busy = t1.dropped_busy.saturating_sub(t0.dropped_busy);
    let hosts: Vec<HostUse> = hosts.into_values().collect();
    let generator = rules::judge_generator(&GeneratorEvidence {
        interval_s: interval,
        late_ticks: dropped.saturating_sub(dropped_busy),
        max_lag_s: max_lag_ms / 1e3,
        hosts: hosts.clone(),
    });
    let mut step = Step {
        vehicles: n,
        search,
        measured_s: window,
        expected_rate: expected,
        achieved_rate: done as f64 / window,
        accepted_rate: accepted as f64 / window,
        success: if done == 0 {
            0.0
        } else {
            accepted as f64 * 100.0 / done as f64
        },
        latency: quantiles(&lat),
        delay: quantiles(&delay),
        retried: t1.retried.saturating_sub(t0.retried),
        buffer_dropped: t1.buffer_dropped.saturating_sub(t0.buffer_dropped),
        buffered: t1.buffered,
        dropped,
        dropped_busy,
        max_lag_ms,
        causes: causes(&t0, &t1),
        late_accepted: t1.late_accepted.saturating_sub(t0.late_accepted),
        peak_connections,
        hosts,
        generator,
        failures: Vec::new(),
        failed_as: Vec::new(),
        pipeline: None,
    };
    if step.success < a.drive.min_success {
        step.failures.push(format!(
            "success {:.2}% < {}%",
            step.success, a.drive.min_success
        ));
        step.failed_as.push("success");
    }
    let max_p95 = a.max_p95.as_secs_f64() * 1e3;
    if let Some(p95) = step.p95().filter(|p| *p > max_p95) {
        step.failures
            .push(format!("p95 {p95:.1} ms > {} ms", a.max_p95.as_millis()));
        step.failed_as.push("p95");
    }
    if let Some(limit) = a.max_delay_p95 {
        let max = limit.as_secs_f64() * 1e3;
        if let Some(p95) = step.delay_p95().filter(|p| *p > max) {
            step.failures
                .push(format!("delay p95 {p95:.1} ms > {} ms", limit.as_millis()));
            step.failed_as.push("delay");
        }
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
        let rate = |r: Option<f64>| r.map_or_else(|| "?".into(), |r| format!("{r:.1}"));
        for g in w.behind() {
            step.failures.push(format!(
                "backlog: {} processed {}/s of {}/s ingested, its backlog growing {:.1}/s",
                g.name,
                rate(g.processed_msgs_per_s),
                rate(w.ingest_msgs_per_s),
                g.backlog_slope_per_s.unwrap_or(0.0),
            ));
        }
        if !w.falling_behind.is_empty() {
            step.failed_as.push("backlog");
        }
        for g in w.lost() {
            step.failures.push(format!(
                "lost: MAXLEN trimmed {} messages before {} read them (it processed {}/s)",
                g.trimmed_unread_in_window.unwrap_or(0),
                g.name,
                rate(g.processed_msgs_per_s),
            ));
        }
        if !w.losing.is_empty() {
            step.failed_as.push("lost");
        }
    } else if sampler.is_some() {
        tracing::warn!("no samples of the backend's Redis over the step; its backlog is unjudged");
    }
    step.pipeline = pipeline;
    Ok(Some(step))
}

/// The report: the reference tool's keys, computed from the steps by documented rules.
fn report(a: &RampArgs, steps: &[Step]) -> Value {
    let interval = a.drive.load.interval.as_secs_f64();
    let outcomes: Vec<rules::StepOutcome> = steps.iter().map(Step::outcome).collect();
    let limits = rules::limits(&outcomes, interval);
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
            "min_success_percent": a.drive.min_success,
            "max_p95_ms": a.max_p95.as_secs_f64() * 1e3,
            "min_throughput_share": MIN_THROUGHPUT_SHARE,
            "backlog_tolerance_percent": a.drive.redis.redis.as_ref().map(|_| a.drive.redis.backlog_tolerance),
            "generator_max_lag_ms": rules::lag_bound_s(interval) * 1e3,
            "generator_max_simulator_cpu_percent": rules::SIM_CPU_LIMIT,
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
        "messages_never_diagnosed": a.drive.redis.redis.as_ref().map(|_| never_diagnosed),
        "idle_groups": idle,
        "interval_s": interval,
        "step_duration_s": a.step_duration.as_secs_f64(),
        "search_step_duration_s": a.search_duration().as_secs_f64(),
        "warmup_s": a.warmup.as_secs_f64(),
        "steps": steps.iter().map(|s| s.json(interval)).collect::<Vec<_>>(),
    })
}

/// The advice: what failed first and why, on which side, and the fleet to keep to.
fn recommendations(steps: &[Step], limits: &rules::Limits) -> Vec<String> {
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
                    .filter(|f| rules::FAILED_AS_DIAGNOSIS.contains(f))
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
fn html(a: &RampArgs, steps: &[Step], report: &Value) -> String {
    use vtox::charts::{svg, Chart};
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
            slo: Some(("p95 SLO", a.max_p95.as_secs_f64() * 1e3)),
        },
        Chart {
            title: "Delay percentiles: scheduled time to answer (steps with successful requests)",
            y_label: "ms",
            x: &x,
            series: vec![("p50", delay(0)), ("p95", delay(1)), ("p99", delay(2))],
            search: &search,
            slo: a
                .max_delay_p95
                .map(|d| ("delay p95 SLO", d.as_secs_f64() * 1e3)),
        },
        Chart {
            title: "Success rate",
            y_label: "% of requests",
            x: &x,
            series: vec![("success", steps.iter().map(|s| Some(s.success)).collect())],
            search: &search,
            slo: Some(("success SLO", a.drive.min_success)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_by_cause_are_differences_per_status() {
        let t0 = pb::Counters {
            timeouts: 2,
            status: [(503, 5)].into_iter().collect(),
            ..Default::default()
        };
        let t1 = pb::Counters {
            timeouts: 7,
            connect_errors: 1,
            status: [(503, 9), (500, 2)].into_iter().collect(),
            ..Default::default()
        };
        let c = causes(&t0, &t1);
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            [
                ("connect".to_string(), 1),
                ("http_500".to_string(), 2),
                ("http_503".to_string(), 4),
                ("timeout".to_string(), 5)
            ]
        );
    }
}
