//! `vtox-coord`: the coordinator (`serve`) and the CLI that plans, starts, watches and stops
//! fleets across the agents that joined it.

mod backend;
mod cli;
mod control;
mod drive;
mod local;
mod planning;
mod ramp;
mod render;
mod server;
mod web;

use clap::{Args as ClapArgs, Parser, Subcommand};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use vtox::duration::parse_duration;

/// Spread a simulated EV fleet over many hosts and drive it against a VTOX backend.
///
/// Start `vtox-coord serve` once, `vtox-agent --join COORD:50051` on every host, then
/// `vtox-coord run N`. `vtox-coord run N --local` does all of it on this machine.
#[derive(Debug, Parser)]
#[command(name = "vtox-coord", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// This process's TLS certificate (PEM): the server's for `serve`, the client's (mutual
    /// TLS) for the other commands.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,
    /// The CA that signed the coordinator's certificate: talk to it over TLS (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// File holding the shared token that agents and the CLI must present (or VTOX_TOKEN).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = vtox::process::LogFormat::Text, global = true)]
    log_format: vtox::process::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Cmd {
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
    Ramp(ramp::RampArgs),
    /// Move whole instances away from agents above their recommended capacity (75% of max)
    /// to agents below it, e.g. after new agents joined.
    Rebalance(CoordArg),
    /// Score the backend's diagnoses in its Redis against the faults vtox injected: per
    /// analyzer, faults found, false alarms and diagnosis lag.
    Score(backend::ScoreArgs),
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
    pub redis: backend::RedisArgs,
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
    #[arg(value_parser = planning::parse_vehicles, allow_hyphen_values = true)]
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
    #[arg(value_parser = planning::parse_vehicles, allow_hyphen_values = true)]
    pub vehicles: u64,
    #[command(flatten)]
    pub drive: drive::DriveArgs,
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
    pub redis: backend::RedisArgs,
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

/// glibc adapts its mmap threshold to the largest block freed, after which buffers of tens of
/// MB (a 10,000-agent status, a state file's worth of reports) come from the heap and their
/// pages stay with the process; a fixed threshold returns them on free. Measured with 10,000
/// agents: 1,139 MiB peak RSS before, 914 MiB after (README, scaling).
fn keep_large_buffers_returnable() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> ExitCode {
    keep_large_buffers_returnable();
    let cli = Cli::parse();
    // The server logs its work; the CLI commands print results and keep logs to warnings.
    let default_level = if matches!(cli.cmd, Cmd::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    vtox::process::init_logs(cli.log_format, default_level);
    // Never echoed: neither in logs nor in --help (the env value is hidden).
    match vtox::auth::load(cli.token_file.as_deref(), std::env::var("VTOX_TOKEN").ok()) {
        Ok(t) => {
            let _ = cli::TOKEN.set(t);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let tls = match &cli.cmd {
        Cmd::Serve(a) => vtox::auth::server_tls(
            cli.tls_cert.as_deref(),
            cli.tls_key.as_deref(),
            a.tls_client_ca.as_deref(),
        )
        .map(|t| cli::SERVER_TLS.set(t).is_ok()),
        _ => vtox::auth::client_tls(
            cli.tls_ca.as_deref(),
            cli.tls_cert.as_deref(),
            cli.tls_key.as_deref(),
        )
        .map(|t| cli::CLIENT_TLS.set(t).is_ok()),
    };
    if let Err(e) = tls {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => cli::serve(a).await.map(|_| ExitCode::SUCCESS),
            Cmd::Plan(a) => cli::plan(a).await,
            Cmd::Capacity(a) => cli::capacity(a).await,
            Cmd::Run(a) => cli::run(a).await,
            Cmd::Status(a) => cli::status(a).await,
            Cmd::Stop(a) => cli::stop(a).await,
            Cmd::Agents(a) => cli::agents(a).await,
            Cmd::Rebalance(a) => cli::rebalance(a).await,
            Cmd::Ramp(a) => ramp::ramp(a).await,
            Cmd::Score(a) => backend::score(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
