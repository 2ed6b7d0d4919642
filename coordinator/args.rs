//! Every flag of `vtox-coord`, as clap structs, with the checks and the run spec they make:
//! the bottom of the coordinator, imported by every layer above and importing none of them.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use std::net::SocketAddr;
use std::time::Duration;
use vtox::backlog;
use vtox::duration::parse_duration;
use vtox::wire::pb;

/// Spread a simulated EV fleet over many hosts and drive it against a VTOX backend.
///
/// Start `vtox-coord serve` once, `vtox-agent --join COORD:50051` on every host, then
/// `vtox-coord run N`. `vtox-coord run N --local` does all of it on this machine.
#[derive(Debug, Parser)]
#[command(name = "vtox-coord", version)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// This process's TLS certificate (PEM): the server's for `serve`, the client's (mutual
    /// TLS) for the other commands.
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The CA that signed the coordinator's certificate: talk to it over TLS (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// File holding the shared token that agents and the CLI must present (or VTOX_TOKEN).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = vtox::process::LogFormat::Text, global = true)]
    pub log_format: vtox::process::LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the coordinator: the gRPC server that agents join and the CLI talks to.
    Serve(ServeArgs),
    /// Show how N vehicles would spread over the hosts, and what each host can carry.
    Plan(PlanArgs),
    /// Estimate what each host can carry, beside the old tool's reference table.
    Capacity(CapacityArgs),
    /// Plan N vehicles over the joined agents, run them, watch live, print a summary.
    Run(RunArgs),
    /// Show the current run.
    Status(StatusArgs),
    /// Stop the current run; returns once every simulator has sent its last counts, and
    /// prints the final totals.
    Stop(CoordArg),
    /// List the agents that joined.
    Agents(AgentsArgs),
    /// Run growing fleets and find where the backend breaks; writes performance_test_report.json.
    Ramp(RampArgs),
    /// Move whole instances away from agents above their recommended capacity (75% of max)
    /// to agents below it, e.g. after new agents joined.
    Rebalance(CoordArg),
    /// Score the backend's diagnoses in its Redis against the faults vtox injected: per
    /// analyzer, faults found, false alarms and diagnosis lag.
    Score(ScoreArgs),
}

#[derive(Debug, ClapArgs)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// An agent that hears nothing from the coordinator this long stops its simulators.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub lease: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Most agents that may join.
    #[arg(long, default_value_t = 10_000)]
    pub max_agents: usize,
    /// Most joins accepted per second (a flood gets "resource exhausted" and retries later).
    #[arg(long, default_value_t = 100)]
    pub max_join_rate: u32,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_message_bytes: usize,
    /// Require client certificates signed by this CA (mutual TLS; PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Listen on a non-loopback address without a token (anyone who reaches it can join).
    #[arg(long)]
    pub insecure: bool,
    /// Keep the run here (written atomically) so that a restarted coordinator resumes it.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// A lost agent's vehicles move to other agents after the lease plus this.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub grace: Duration,
    /// How often assignments are resent (renewing leases) and agents report.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Serve the web dashboard at http://ADDR/ (beyond loopback only with a token, or
    /// --insecure, as for the gRPC listener).
    #[arg(long, value_name = "ADDR")]
    pub web_listen: Option<SocketAddr>,
    /// The backend's Redis, for the dashboard's pipeline panel and score.
    #[command(flatten)]
    pub redis: RedisArgs,
}

#[derive(Debug, Clone, ClapArgs)]
pub struct CoordArg {
    /// Coordinator address.
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "VTOX_COORD")]
    pub coord: String,
}

#[derive(Debug, Clone, ClapArgs)]
pub struct LoadArgs {
    /// Most vehicles per simulator process [default: what one core of the host drives at the
    /// interval, so about one process per core]. `--per-instance 50` is the old tool's layout;
    /// small processes cost more CPU each, and the estimate counts it.
    #[arg(long, value_name = "VEHICLES", value_parser = clap::value_parser!(u32).range(1..))]
    pub per_instance: Option<u32>,
    /// Time between two messages of one vehicle.
    #[arg(long, default_value = "1.2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Samples per message.
    #[arg(long, default_value_t = 10)]
    pub batch_size: u32,
    /// Plan even when the hosts' estimated capacity is too small.
    #[arg(long)]
    pub overcommit: bool,
}

#[derive(Debug, ClapArgs)]
pub struct PlanArgs {
    /// Number of vehicles.
    #[arg(value_parser = vtox::planning::parse_vehicles, allow_hyphen_values = true)]
    pub vehicles: u64,
    /// Plan over the agents joined to this coordinator.
    #[arg(long, conflicts_with = "hosts")]
    pub coord: Option<String>,
    /// Plan over hypothetical hosts, e.g. 4c8g,8c32g@1000mbps,3x16c64g.
    #[arg(long)]
    pub hosts: Option<String>,
    /// Plan as `run --local` does: this machine, with the built-in sink sharing its cores.
    #[arg(long, conflicts_with_all = ["coord", "hosts"])]
    pub local: bool,
    /// Cap every host at this many vehicles.
    #[arg(long)]
    pub max_vehicles: Option<u64>,
    /// Number of the first vehicle: several coordinators, each over its own hosts, split one
    /// fleet into slices (e.g. 0 and 50000 for two halves of 100,000).
    #[arg(long, default_value_t = 0)]
    pub first_vehicle: u64,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, ClapArgs)]
pub struct CapacityArgs {
    /// Estimate the agents joined to this coordinator.
    #[arg(long, conflicts_with = "hosts")]
    pub coord: Option<String>,
    /// Estimate hypothetical hosts, e.g. 4c8g,8c32g@1000mbps.
    #[arg(long)]
    pub hosts: Option<String>,
    /// Estimate as `run --local` runs: this machine, with the built-in sink sharing its cores.
    #[arg(long, conflicts_with_all = ["coord", "hosts"])]
    pub local: bool,
    #[command(flatten)]
    pub load: LoadArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, ClapArgs)]
pub struct RunArgs {
    /// Number of vehicles.
    #[arg(value_parser = vtox::planning::parse_vehicles, allow_hyphen_values = true)]
    pub vehicles: u64,
    #[command(flatten)]
    pub drive: DriveArgs,
    /// Number of the first vehicle: several coordinators, each over its own hosts, split one
    /// fleet into slices (e.g. 0 and 50000 for two halves of 100,000).
    #[arg(long, default_value_t = 0)]
    pub first_vehicle: u64,
    /// How long the fleet drives [default: until Ctrl-C].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print the final summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, ClapArgs)]
pub struct StatusArgs {
    #[command(flatten)]
    pub coord: CoordArg,
    /// Keep printing until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, ClapArgs)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub coord: CoordArg,
    #[arg(long)]
    pub json: bool,
}

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
        self.load.params(n, self.local && self.target.is_none())
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
}

/// `5%`, `5` or `0.5%`: a percentage from 0 (exclusive) to 100.
fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage, e.g. 5%"))?;
    if v > 0.0 && v <= 100.0 {
        Ok(v)
    } else {
        Err(format!("{s:?} must be above 0% and at most 100%"))
    }
}

#[derive(Debug, ClapArgs)]
pub struct RampArgs {
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
    /// A step fails when the 95th percentile of its latency (service time: request handed to a
    /// connection until the answer was read, the backend's own responsiveness) exceeds this.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub max_p95: Duration,
    /// A step also fails when the 95th percentile of its delay (each message's scheduled time
    /// until its answer: what a vehicle's buffer or a stalled generator added, i.e. how fresh
    /// the data is when the backend has it) exceeds this [default: not judged].
    #[arg(long, value_parser = parse_duration)]
    pub max_delay_p95: Option<Duration>,
    /// Run every planned step even after one failed.
    #[arg(long = "continue")]
    pub keep_going: bool,
    /// After the first failing step, bisect between the last passing fleet (or 0) and the
    /// failing one until the gap is at most this share of the failing fleet.
    #[arg(long, default_value = "5%", value_parser = parse_percent, value_name = "PERCENT")]
    pub search_resolution: f64,
    /// Measured time of each search step [default: half of --step-duration].
    #[arg(long, value_parser = parse_duration)]
    pub search_step_duration: Option<Duration>,
    /// Do not search for the knee after a failing step.
    #[arg(long)]
    pub no_search: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "performance_test_report.json")]
    pub out: std::path::PathBuf,
    /// Also write one self-contained HTML file with the verdicts and charts.
    #[arg(long, value_name = "FILE")]
    pub html: Option<std::path::PathBuf>,
    /// Also write per-second history to PREFIX_stats_history.csv (Locust's layout).
    #[arg(long, value_name = "PREFIX")]
    pub csv: Option<String>,
    #[command(flatten)]
    pub drive: DriveArgs,
}

impl RampArgs {
    /// Everything checked before any process starts.
    pub fn check(&self) -> Result<()> {
        if self.steps.is_empty() || self.steps.contains(&0) {
            bail!("--steps must list fleet sizes of at least 1 vehicle");
        }
        self.drive.check()
    }

    pub fn search_duration(&self) -> Duration {
        self.search_step_duration
            .unwrap_or(self.step_duration / 2)
            .max(Duration::from_secs(1))
    }
}

#[derive(Debug, Clone, ClapArgs)]
pub struct RedisArgs {
    /// The backend's Redis, watched read-only: diagnosis backlog per consumer group, and the
    /// diagnoses scored against the injected faults.
    #[arg(long, value_name = "URL", value_parser = vtox::redis_url::parse)]
    pub redis: Option<String>,
    /// The stream the ingest API appends raw messages to.
    #[arg(long, default_value = backlog::RAW_STREAM, value_name = "KEY")]
    pub raw_stream: String,
    /// The stream the analyzers write diagnoses to.
    #[arg(long, default_value = backlog::RESULTS_STREAM, value_name = "KEY")]
    pub results_stream: String,
    /// A consumer group whose backlog grows faster than this percent of the ingest rate
    /// (and at least 2 entries/s) falls behind.
    #[arg(long, default_value_t = 10.0, value_name = "PERCENT")]
    pub backlog_tolerance: f64,
}

impl RedisArgs {
    pub fn tolerance(&self) -> f64 {
        self.backlog_tolerance / 100.0
    }

    pub fn check(&self) -> Result<()> {
        if !(0.0..=1000.0).contains(&self.backlog_tolerance) {
            anyhow::bail!("--backlog-tolerance must be a percentage from 0 to 1000");
        }
        Ok(())
    }
}

#[derive(Debug, ClapArgs)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Only the diagnoses written in this last stretch of time [default: all].
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl ServeArgs {
    /// `serve`'s defaults, for the coordinator that `--local` runs in-process.
    pub fn defaults() -> Result<ServeArgs> {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            serve: ServeArgs,
        }
        use clap::Parser as _;
        Ok(Only::try_parse_from(["vtox-coord"])
            .map_err(|e| anyhow!("serve's defaults: {e}"))?
            .serve)
    }
}

impl LoadArgs {
    /// A plan request for `n` vehicles at this load; `sink_on_host` when the target is a
    /// vtox-sink on the agents' own host (`--local`), whose cost then counts against their
    /// cores.
    pub fn params(&self, n: u64, sink_on_host: bool) -> pb::PlanParams {
        pb::PlanParams {
            vehicles: n,
            first_vehicle: 0,
            per_instance: self.per_instance.unwrap_or(0),
            interval_s: self.interval.as_secs_f64(),
            batch_size: self.batch_size,
            overcommit: self.overcommit,
            sink_on_host,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_parse_with_or_without_the_sign() {
        assert_eq!(parse_percent("5%"), Ok(5.0));
        assert_eq!(parse_percent("2.5"), Ok(2.5));
        assert!(parse_percent("0%").is_err());
        assert!(parse_percent("120%").is_err());
        assert!(parse_percent("x").is_err());
    }
}
