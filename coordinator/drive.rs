//! What `run` and `ramp` share: the flags that say how a fleet drives (one clap struct, its
//! defaults in one place), the checks made before anything starts, the run spec built from
//! them, the wait for agents, and the one watch loop that follows a run to its end, through a
//! coordinator restart and a Ctrl-C.

use crate::backend::RedisArgs;
use crate::cli::{connect, status_error, ControlClient};
use crate::local::LocalCluster;
use crate::{CoordArg, LoadArgs};
use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use vtox::duration::parse_duration;
use vtox::wire::pb;

/// The target when none is given and no local sink runs.
pub const DEFAULT_TARGET: &str = "http://127.0.0.1:8000";

#[derive(Debug, Clone, ClapArgs)]
pub struct DriveArgs {
    #[command(flatten)]
    pub coord: CoordArg,
    /// Start a coordinator, one agent and (without --target) a vtox-sink on this machine, and
    /// a dashboard on a free loopback port (its URL is printed).
    #[arg(long)]
    pub local: bool,
    /// With --local: where the dashboard listens [default: a free loopback port].
    #[arg(
        long,
        value_name = "ADDR",
        requires = "local",
        conflicts_with = "no_web"
    )]
    pub web_listen: Option<std::net::SocketAddr>,
    /// With --local: no dashboard.
    #[arg(long)]
    pub no_web: bool,
    /// Base URL of the backend's ingest API [default: http://127.0.0.1:8000, or the local sink].
    #[arg(long)]
    pub target: Option<String>,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Percent of vehicles with a developing fault, e.g. insulation=5,bearing=3.
    #[arg(long, default_value = "")]
    pub faults: String,
    /// The window after the run start in which fault onsets fall [default: 5m]; `0s` makes
    /// faulty vehicles faulty from their first message, so a short run already scores.
    #[arg(long, value_parser = parse_duration)]
    pub fault_onset: Option<Duration>,
    /// Delay between starting two instances on one agent. Schedules are anchored to the run
    /// start, so this only spreads process start-up; a late instance simply joins in step
    /// (short, so that a ramp step's instances are all up before its measured window).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub stagger: Duration,
    /// Wait until this many agents joined before planning.
    #[arg(long, default_value_t = 1)]
    pub expect_agents: u32,
    /// How long to wait for them.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub wait: Duration,
    /// Fewer than this percent of successful requests is a failure (exit 1 for `run`, a
    /// failed step for `ramp`).
    #[arg(long, default_value_t = 99.0)]
    pub min_success: f64,
    /// Seed of every random choice (which vehicles fail and when, drive cycles, jitter).
    #[arg(long, default_value_t = 2024)]
    pub seed: u64,
    /// Request timeout of the simulators.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Most requests in flight (connections) per instance.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: u32,
    /// How vehicles deliver: store-and-forward (one request in flight per vehicle, the rest
    /// buffered and retried with backoff, as a telematics unit does) or at-most-once (every
    /// tick sent at once and never retried; one that finds no free connection is dropped).
    #[arg(long, value_enum, default_value_t = vtox::delivery::Delivery::StoreAndForward)]
    pub delivery: vtox::delivery::Delivery,
    /// Messages each vehicle keeps while it cannot deliver (store-and-forward); the oldest is
    /// dropped when it is full.
    #[arg(long, default_value_t = 600, value_name = "MESSAGES")]
    pub buffer: u32,
    /// Vehicles out of coverage, as SHARE%/DURATION (e.g. 5%/90s: about 5 % offline at any
    /// moment, outages around 90 s); they buffer and burst on return (store-and-forward).
    #[arg(long, value_name = "SHARE%/DURATION")]
    pub dropouts: Option<String>,
    /// Fail the run when planned vehicles go undriven this long (a lost agent with no other
    /// to take them, a lease stop that did not come back, a crash loop); 0s never fails.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub max_not_driven: Duration,
    /// Samples per second of the samples in a message.
    #[arg(long, default_value_t = 50)]
    pub sampling_rate: u32,
    #[command(flatten)]
    pub access: AccessArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// How the simulators reach and sign in to an `https://` or authenticated target. Files are
/// read on every agent's host, so put them there (they never travel through the coordinator).
#[derive(Debug, Clone, ClapArgs)]
pub struct AccessArgs {
    /// Also trust the CA certificates of this PEM file for an `https://` target (a path on
    /// every agent's host).
    #[arg(long, value_name = "FILE")]
    pub target_ca: Option<std::path::PathBuf>,
    /// Accept any certificate from an `https://` target (a test backend only; logged).
    #[arg(long)]
    pub target_insecure: bool,
    /// Send to the authenticated route with this file's Bearer token (a path on every agent's
    /// host).
    #[arg(long, value_name = "FILE", group = "target_auth")]
    pub auth_token_file: Option<std::path::PathBuf>,
    /// One Bearer token per vehicle, lines `vehicle_id<TAB>token` (a path on every agent's
    /// host).
    #[arg(long, value_name = "FILE", group = "target_auth")]
    pub vehicle_tokens: Option<std::path::PathBuf>,
    /// Log in at URL/auth/token as the VTOX backend expects; a 401 renews the token once.
    #[arg(long, value_name = "URL", group = "target_auth", requires_all = ["login_user", "login_password_file"])]
    pub login: Option<String>,
    /// User name for --login.
    #[arg(long, value_name = "USER", requires = "login")]
    pub login_user: Option<String>,
    /// File with the password for --login (a path on every agent's host).
    #[arg(long, value_name = "FILE", requires = "login")]
    pub login_password_file: Option<std::path::PathBuf>,
    /// Close a kept-alive connection idle this long instead of reusing it [default: the
    /// simulator's, 4s: below uvicorn's 5 s].
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
}

impl AccessArgs {
    fn spec(&self) -> pb::TargetAccess {
        let path = |p: &Option<std::path::PathBuf>| {
            p.as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        pb::TargetAccess {
            target_ca_file: path(&self.target_ca),
            target_insecure: self.target_insecure,
            auth_token_file: path(&self.auth_token_file),
            vehicle_tokens_file: path(&self.vehicle_tokens),
            login_url: self.login.clone().unwrap_or_default(),
            login_user: self.login_user.clone().unwrap_or_default(),
            login_password_file: path(&self.login_password_file),
            idle_timeout_s: self.idle_timeout.map_or(0.0, |d| d.as_secs_f64()),
        }
    }
}

impl DriveArgs {
    /// Everything checked before any process starts or any plan is made.
    pub fn check(&self) -> Result<()> {
        if !(0.0..=100.0).contains(&self.min_success) {
            bail!("--min-success must be a percentage from 0 to 100");
        }
        if let Some(t) = &self.target {
            vtox::ingest::Target::parse(t).context("--target")?;
        }
        self.faults
            .parse::<vtox::faults::FaultMix>()
            .context("--faults")?;
        if self.buffer == 0 {
            bail!("--buffer must be at least 1 message");
        }
        if let Some(d) = &self.dropouts {
            if self.delivery == vtox::delivery::Delivery::AtMostOnce {
                bail!("--dropouts needs --delivery store-and-forward: a vehicle out of coverage keeps its messages until it is back");
            }
            vtox::dropouts::Dropouts::parse(d, self.seed).context("--dropouts")?;
        }
        self.redis.check()
    }

    /// The plan request for `n` vehicles: with `--local` and no `--target`, the agents share
    /// their host with the built-in sink, whose cost per message the estimate then counts.
    pub fn params(&self, n: u64) -> pb::PlanParams {
        crate::cli::params_of(n, &self.load, self.local && self.target.is_none())
    }

    /// How every instance of a run drives, for a run of `duration` (None: until stopped).
    pub fn spec(&self, target: &str, duration: Option<Duration>) -> pb::RunSpec {
        pb::RunSpec {
            target: target.to_string(),
            interval_s: self.load.interval.as_secs_f64(),
            jitter: 0.1,
            batch_size: self.load.batch_size,
            sampling_rate: self.sampling_rate,
            faults: self.faults.clone(),
            seed: self.seed,
            run_start: 0.0,
            timeout_s: self.timeout.as_secs_f64(),
            max_in_flight: self.max_in_flight,
            stagger_s: self.stagger.as_secs_f64(),
            id_template: String::new(),
            duration_s: duration.map_or(0.0, |d| d.as_secs_f64()),
            fault_onset_s: self.fault_onset.map(|d| d.as_secs_f64()),
            access: Some(self.access.spec()),
            delivery: self.delivery.name().to_string(),
            buffer: self.buffer,
            dropouts: self.dropouts.clone().unwrap_or_default(),
            max_not_driven_s: self.max_not_driven.as_secs_f64(),
        }
    }

    /// The coordinator and target to use: a local cluster with `--local`, else the given ones.
    pub async fn endpoints(&self) -> Result<(Option<LocalCluster>, String, String)> {
        if self.local {
            let web = (!self.no_web).then(|| crate::local::LocalWeb {
                listen: self
                    .web_listen
                    .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
                redis: self.redis.clone(),
            });
            let c = crate::local::start(self.target.clone(), web).await?;
            let (url, target) = (c.coord_url.clone(), c.target.clone());
            return Ok((Some(c), url, target));
        }
        Ok((
            None,
            self.coord.coord.clone(),
            self.target
                .clone()
                .unwrap_or_else(|| DEFAULT_TARGET.to_string()),
        ))
    }
}

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
    coord_url: &str,
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
            bail!("lost the coordinator at {coord_url} for a minute");
        }
        eprintln!("lost the coordinator; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = &mut *shutdown => return Ok(Watched { last, interrupted: true }),
        }
        if let Ok(c) = connect(coord_url).await {
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
