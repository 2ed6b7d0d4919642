//! What `run` and `ramp` share once a fleet is planned: the wait for agents, and the one watch
//! loop that follows a run to its end, through a coordinator restart and a Ctrl-C, then waits
//! for its final counts.

use crate::client::{status_error, ControlClient, Coord};
use anyhow::{bail, Result};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use vtox::wire::pb;

/// Waits until `expect` agents are connected, for at most `wait`.
pub async fn wait_for_agents(
    client: &mut ControlClient,
    expect: u32,
    wait: Duration,
) -> Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        let agents = client
            .list_agents(pb::ListAgentsRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .agents;
        let connected = agents.iter().filter(|x| x.connected).count() as u32;
        if connected >= expect.max(1) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{connected} of {} expected agents joined within {wait:?}",
                expect.max(1)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How a watched run ended.
pub struct Watched {
    /// The last status seen (the run no longer running, unless interrupted).
    pub last: Option<pb::RunStatus>,
    /// Ctrl-C (or SIGTERM) came first.
    pub interrupted: bool,
}

/// A shutdown signal that several watch loops can wait on in turn.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A future for SIGINT/SIGTERM.
pub fn shutdown_signal() -> Shutdown {
    Box::pin(vtox::process::shutdown_signal())
}

/// Follows run `run_id` until it is no longer running, calling `each` with every status. A
/// coordinator that restarts (with --state-dir) resumes the run, so a lost stream is
/// reconnected for up to a minute. Returns early when `shutdown` fires.
pub async fn watch_run(
    client: &mut ControlClient,
    coord: &Coord,
    run_id: &str,
    every: Duration,
    shutdown: &mut Shutdown,
    mut each: impl FnMut(&pb::RunStatus),
) -> Result<Watched> {
    let mut last = None;
    let mut lost_since: Option<Instant> = None;
    loop {
        let stream = match client
            .watch(pb::WatchRequest {
                interval_ms: every.as_millis() as u64,
            })
            .await
        {
            Ok(s) => Some(s.into_inner()),
            Err(s) => {
                tracing::warn!("cannot watch the run: {}", s.message());
                None
            }
        };
        if let Some(mut watch) = stream {
            loop {
                tokio::select! {
                    msg = watch.message() => match msg {
                        Ok(Some(status)) => {
                            lost_since = None;
                            if status.run_id != run_id {
                                bail!("the coordinator no longer has run {run_id} (it was restarted without --state-dir, or another run started)");
                            }
                            each(&status);
                            let done = status.state() != pb::RunState::Running;
                            last = Some(status);
                            if done {
                                return Ok(Watched { last, interrupted: false });
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = &mut *shutdown => return Ok(Watched { last, interrupted: true }),
                }
            }
        }
        let since = *lost_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(60) {
            bail!("lost the coordinator at {} for a minute", coord.url);
        }
        eprintln!("lost the coordinator; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = &mut *shutdown => return Ok(Watched { last, interrupted: true }),
        }
        if let Ok(c) = coord.connect().await {
            *client = c;
        }
    }
}

/// Whether an instance may still change its counts: its process has not exited yet.
fn unsettled(i: &pb::InstanceStatus) -> bool {
    matches!(
        pb::Phase::try_from(i.phase),
        Ok(pb::Phase::Starting | pb::Phase::Running | pb::Phase::Stopping)
    )
}

/// The status of a stopped run once every simulator has finished its requests in flight
/// (and the late answers it waits for) and sent its last line, so the totals printed are
/// final. Gives up, with what it has, a little after the agents' own patience (then they
/// kill the simulator and read its tally).
pub async fn settled(client: &mut ControlClient, run_id: &str) -> Result<pb::RunStatus> {
    let started = Instant::now();
    loop {
        let status = client
            .status(pb::StatusRequest {
                fresh: true,
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let timeout_s = status.spec.as_ref().map_or(5.0, |s| s.timeout_s);
        let patience = vtox::process::stop_grace(timeout_s) + Duration::from_secs(5);
        let busy = status
            .agents
            .iter()
            .filter(|a| a.connected)
            .flat_map(|a| &a.instances)
            .filter(|i| i.run_id == run_id && unsettled(i))
            .count();
        if busy == 0 {
            return Ok(status);
        }
        if started.elapsed() > patience {
            eprintln!(
                "{busy} instances have not reported their last counts; the totals may be short"
            );
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops the run and waits for its final counts.
pub async fn stop_and_settle(client: &mut ControlClient, run_id: &str) -> Result<pb::RunStatus> {
    client
        .stop(pb::StopRequest {})
        .await
        .map_err(status_error)?;
    settled(client, run_id).await
}
