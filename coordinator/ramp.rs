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
use std::process::ExitCode;
use std::time::Duration;
use vtox::backlog;
use vtox::metrics::Latency;
use vtox::ramp::report::{csv, html, report, HistoryRow, Settings};
use vtox::ramp::step::{self, Slo, Step, Tracked};
use vtox::ramp::Search;
use vtox::wire::pb;

/// Exit code of a ramp in which a step missed its SLOs.
pub const EXIT_THRESHOLD: u8 = 99;

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
    let settings = settings(a);
    let mut report = report(&settings, &steps);
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
    let page = html(&settings, &steps, &report);
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

/// What every step of one ramp shares.
struct Ctx<'a> {
    a: &'a RampArgs,
    coord: &'a Coord,
    target: &'a str,
    sampler: Option<&'a Sampler>,
}

/// What a step's watch collects: the per-second history, the statuses at the window's
/// ends, what the window saw, and when the backend's streams are to be judged.
struct Watch {
    vehicles: u64,
    warmup_s: f64,
    /// The backend's streams are judged while the schedules run, not as the fleet winds down.
    schedule_end_s: f64,
    prev: Option<(f64, u64, u64, Latency)>,
    start: Option<pb::RunStatus>,
    tracked: Tracked,
    window: (f64, f64),
}

impl Watch {
    /// A status of the step's run: a history row, the window's start once the warm-up is over,
    /// what the window saw while the run ran; the progress bar's message.
    fn see(&mut self, s: &pb::RunStatus, history: &mut Vec<HistoryRow>) -> Option<String> {
        let t = s.totals.clone().unwrap_or_default();
        let lat = Latency::from_bytes(&t.latency_hdr).unwrap_or_default();
        let done = t.accepted + t.failed;
        let mut message = None;
        if let Some((pt, pdone, pfailed, plat)) = &self.prev {
            let dt = (s.elapsed_s - pt).max(0.001);
            let rate = done.saturating_sub(*pdone) as f64 / dt;
            message = Some(format!("{rate:.0} msg/s, {:.2}% ok", t.success_percent()));
            history.push(HistoryRow {
                unix: unix_now(),
                vehicles: self.vehicles,
                rate,
                failures: t.failed.saturating_sub(*pfailed) as f64 / dt,
                latency: lat.since(plat).unwrap_or_default(),
                total: done,
                failed: t.failed,
            });
        }
        self.prev = Some((s.elapsed_s, done, t.failed, lat));
        // The run's clock starts a second before its schedules (see Start).
        if s.elapsed_s >= self.warmup_s + 1.0 && self.start.is_none() {
            self.start = Some(s.clone());
            self.window.0 = unix_now();
        }
        if self.start.is_some() && s.state() == pb::RunState::Running {
            self.tracked.see(s);
            if s.elapsed_s <= self.schedule_end_s {
                self.window.1 = unix_now();
            }
        }
        message
    }
}

fn progress_bar(n: u64, total_s: f64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total_s.ceil() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(format!("{n} vehicles"));
    bar
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
    let a = ctx.a;
    let measured = if search {
        a.search_duration()
    } else {
        a.step_duration
    };
    let req = pb::StartRequest {
        params: Some(a.drive.params(n)),
        spec: Some(a.drive.spec(ctx.target, Some(a.warmup + measured))),
        expect_agents: 0,
    };
    let started = client.start(req).await.map_err(status_error)?.into_inner();
    let total_s = (a.warmup + measured).as_secs_f64() + 1.0;
    let bar = progress_bar(n, total_s);
    let mut watch = Watch {
        vehicles: n,
        warmup_s: a.warmup.as_secs_f64(),
        schedule_end_s: 1.0 + (a.warmup + measured).as_secs_f64(),
        prev: None,
        start: None,
        tracked: Tracked::default(),
        window: (0.0, 0.0),
    };
    let watched = drive::watch_run(
        client,
        ctx.coord,
        &started.run_id,
        Duration::from_millis(500),
        shutdown,
        |s| {
            bar.set_position(s.elapsed_s.min(total_s) as u64);
            if let Some(m) = watch.see(s, history) {
                bar.set_message(m);
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
    let (Some(start), Some(end)) = (watch.start, watched.last) else {
        bail!("the step ended before its measured window")
    };
    let plan = step::Plan {
        vehicles: n,
        search,
        interval_s: a.drive.load.interval.as_secs_f64(),
        measured_s: measured.as_secs_f64(),
    };
    let mut step = step::measure(plan, &start, &end, watch.tracked).map_err(|e| anyhow!(e))?;
    step::judge(&mut step, &slo(a));
    let pipeline = ctx.sampler.and_then(|x| {
        backlog::window(
            &x.between(watch.window.0, watch.window.1),
            a.drive.redis.tolerance(),
        )
    });
    if pipeline.is_none() && ctx.sampler.is_some() {
        tracing::warn!("no samples of the backend's Redis over the step; its backlog is unjudged");
    }
    step::judge_pipeline(&mut step, pipeline);
    Ok(Some(step))
}

/// The SLOs of `a`.
fn slo(a: &RampArgs) -> Slo {
    Slo {
        min_success: a.drive.min_success,
        max_p95_ms: a.max_p95.as_secs_f64() * 1e3,
        max_delay_p95_ms: a.max_delay_p95.map(|d| d.as_secs_f64() * 1e3),
    }
}

/// What the report says of how the ramp ran.
fn settings(a: &RampArgs) -> Settings {
    Settings {
        interval_s: a.drive.load.interval.as_secs_f64(),
        slo: slo(a),
        backlog_tolerance_percent: a
            .drive
            .redis
            .redis
            .as_ref()
            .map(|_| a.drive.redis.backlog_tolerance),
        step_duration_s: a.step_duration.as_secs_f64(),
        search_step_duration_s: a.search_duration().as_secs_f64(),
        warmup_s: a.warmup.as_secs_f64(),
    }
}
