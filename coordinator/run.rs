//! The commands that drive a fleet, `run` and `ramp`: each checks its flags, reaches the
//! backend's Redis if asked, sets up the coordinator and target (a local cluster with
//! `--local`), drives, and tears the local cluster down whatever happened.

use crate::args::{DriveArgs, RampArgs, RunArgs, DEFAULT_TARGET};
use crate::backend::{self, BackendRedis, Sampler};
use crate::cli::LIVE_WINDOW;
use crate::client::{status_error, Access, ControlClient, Coord};
use crate::drive;
use crate::local::LocalCluster;
use crate::render::LiveView;
use anyhow::{anyhow, Result};
use serde_json::json;
use std::process::ExitCode;
use std::time::Duration;
use vtox::backlog;
use vtox::render::{plan_table, status_json, summary};
use vtox::wire::pb;

/// Backlog samples a run keeps (one a second): its summary judges the last minute.
const RUN_SAMPLES: usize = 60;

/// The coordinator and target to use: a local cluster with `--local`, else the given ones.
async fn endpoints(
    d: &DriveArgs,
    access: &Access,
) -> Result<(Option<LocalCluster>, Coord, String)> {
    if d.local {
        let web = (!d.no_web).then(|| crate::local::LocalWeb {
            listen: d
                .web_listen
                .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            redis: d.redis.clone(),
        });
        let c = crate::local::start(d.target.clone(), web).await?;
        // The local coordinator is plaintext on loopback, without a token.
        let coord = Coord::new(&c.coord_url, &Access::default());
        let target = c.target.clone();
        return Ok((Some(c), coord, target));
    }
    let target = d
        .target
        .clone()
        .unwrap_or_else(|| DEFAULT_TARGET.to_string());
    Ok((None, Coord::new(&d.coord.coord, access), target))
}

pub async fn run(a: RunArgs, access: &Access) -> Result<ExitCode> {
    a.drive.check()?;
    // Reached before any process starts, so that a wrong --redis costs nothing.
    let redis = BackendRedis::connect(&a.drive.redis).await?;
    let (cluster, coord, target) = endpoints(&a.drive, access).await?;
    let outcome = drive(&a, &coord, &target, redis).await;
    if let Some(c) = cluster {
        c.shutdown().await;
    }
    outcome
}

pub async fn ramp(a: RampArgs, access: &Access) -> Result<ExitCode> {
    a.check()?;
    let redis = BackendRedis::connect(&a.drive.redis).await?;
    let (cluster, coord, target) = endpoints(&a.drive, access).await?;
    let outcome = crate::ramp::ramp(&a, &coord, &target, redis).await;
    if let Some(c) = cluster {
        c.shutdown().await;
    }
    outcome
}

/// Starts the run, watches it to its end and prints its summary.
async fn drive(
    a: &RunArgs,
    coord: &Coord,
    target: &str,
    mut redis: Option<BackendRedis>,
) -> Result<ExitCode> {
    let d = &a.drive;
    let mut client = coord.connect().await?;
    drive::wait_for_agents(&mut client, d.expect_agents, d.wait).await?;
    let req = pb::StartRequest {
        params: Some(pb::PlanParams {
            first_vehicle: a.first_vehicle,
            ..d.params(a.vehicles)
        }),
        spec: Some(d.spec(target, a.duration)),
        expect_agents: d.expect_agents,
    };
    let score_from = match &mut redis {
        Some(r) => Some(r.server_ms().await?),
        None => None,
    };
    let started = client.start(req).await.map_err(status_error)?.into_inner();
    if let Some(plan) = &started.plan {
        eprint!("{}", plan_table(plan));
    }
    eprintln!(
        "run {} started against {target}; Ctrl-C stops it",
        started.run_id
    );
    let sampler = redis.clone().map(|r| Sampler::start(r, RUN_SAMPLES));
    let (status, driving_until) =
        follow(&mut client, coord, &started.run_id, sampler.as_ref(), d).await?;
    let mut out = status_json(&status);
    let mut text = summary(&status);
    if let (Some(r), Some(sampler)) = (&mut redis, &sampler) {
        let window = backlog::window(&sampler.between(0.0, driving_until), d.redis.tolerance());
        if let Some(w) = &window {
            text.push_str(&w.table());
        }
        out["backend_pipeline"] = json!(window);
        match r.score(score_from).await {
            Ok(card) => {
                text.push_str(&card.table());
                out["diagnosis"] = card.json();
            }
            Err(e) => eprintln!("warning: cannot score the diagnoses: {e:#}"),
        }
    }
    if a.json {
        println!("{out}");
    } else {
        print!("{text}");
    }
    Ok(verdict(&status, d.min_success))
}

/// Watches run `run_id` with the live view to its end (or a Ctrl-C, which stops it) and
/// returns its final status, with when the fleet last drove (the summary judges the backend's
/// streams while the fleet drove, not as it wound down).
async fn follow(
    client: &mut ControlClient,
    coord: &Coord,
    run_id: &str,
    sampler: Option<&Sampler>,
    d: &DriveArgs,
) -> Result<(pb::RunStatus, f64)> {
    let tolerance = d.redis.tolerance();
    let mut view = LiveView::new();
    let mut driving_until = backend::unix_now();
    let mut shutdown = drive::shutdown_signal();
    let watched = drive::watch_run(
        client,
        coord,
        run_id,
        Duration::from_secs(1),
        &mut shutdown,
        |status| {
            let backlog = sampler
                .map(|s| s.view(LIVE_WINDOW, tolerance))
                .unwrap_or_default();
            view.show(status, &backlog);
            if status.state() == pb::RunState::Running {
                driving_until = backend::unix_now();
            }
        },
    )
    .await?;
    let mut last = watched.last;
    if watched.interrupted {
        eprintln!("stopping the run");
        last = Some(drive::stop_and_settle(client, run_id).await?);
    } else if last
        .as_ref()
        .is_some_and(|s| matches!(s.state(), pb::RunState::Stopped | pb::RunState::Failed))
    {
        // Stopped from elsewhere (`vtox-coord stop`), or failed: the last counts are still on
        // their way.
        last = Some(drive::settled(client, run_id).await?);
    }
    let status = last.ok_or_else(|| anyhow!("no status received"))?;
    Ok((status, driving_until))
}

/// The exit code a run's end deserves, with the reason on stderr: 1 for a failed run, one
/// that sent nothing, or one below `--min-success`; a generator that could not keep up is
/// said, as it measured vtox's hosts rather than the backend.
fn verdict(status: &pb::RunStatus, min_success: f64) -> ExitCode {
    let totals = status.totals.clone().unwrap_or_default();
    if status.state() == pb::RunState::Failed {
        eprintln!("error: the run failed: {}", status.failure);
        return ExitCode::FAILURE;
    }
    if totals.sent == 0 {
        eprintln!("error: no message was sent");
        return ExitCode::FAILURE;
    }
    let generator = vtox::render::generator_verdict(status);
    if !generator.healthy {
        eprintln!(
            "warning: the generator could not keep up ({}); the numbers above measure vtox's hosts, not the backend",
            generator.reasons.join("; ")
        );
    }
    let success = totals.success_percent();
    if success < min_success {
        eprintln!("error: {success:.2}% of requests succeeded, below --min-success {min_success}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
