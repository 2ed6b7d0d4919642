//! `vtox-sim`: drives one contiguous slice of the fleet against a VTOX ingest endpoint and
//! prints cumulative metrics as JSON lines on stdout. Usable alone or under `vtox-agent`.

mod auth;
mod engine;
mod lanes;
mod tally;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use vtox::duration::parse_duration;
use vtox::faults::FaultMix;
use vtox::fleet::IdTemplate;
use vtox::schedule::Schedule;

/// Drive vehicles [first-vehicle, first-vehicle + vehicles) against a VTOX ingest API.
///
/// Each vehicle sends one message of `--batch-size` samples every `--interval` (jittered),
/// phased so the slice never fires in one burst. The schedule is open: a slow target never
/// delays later messages; at most `--max-in-flight` requests are outstanding and a tick that
/// finds them all busy is counted as dropped. Metrics go to stdout, one JSON line per
/// `--report-every`, cumulative since start, and a final line (`"final": true`) on exit.
#[derive(Debug, Parser)]
#[command(name = "vtox-sim", version, about, long_about = None)]
pub struct Args {
    /// Number of vehicles this instance drives.
    #[arg(long, short = 'n')]
    pub vehicles: u64,
    /// Fleet number of the first vehicle (vehicle IDs, models and faults follow from it).
    #[arg(long, default_value_t = 0)]
    pub first_vehicle: u64,
    /// Base URL of the ingest API, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub target: String,
    /// Instance number, reported in every message's metadata.
    #[arg(long, default_value_t = 0)]
    pub instance: u32,
    /// Agent (host) name, reported in every message's metadata [default: the host name].
    #[arg(long)]
    pub agent: Option<String>,
    /// Time between two messages of one vehicle.
    #[arg(long, default_value = "1.2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Jitter window as a fraction of the interval (0.1 = each tick moves by up to ±5%).
    #[arg(long, default_value_t = 0.1)]
    pub jitter: f64,
    /// Samples per message.
    #[arg(long, default_value_t = 10)]
    pub batch_size: usize,
    /// Sampling rate of the samples, in Hz.
    #[arg(long, default_value_t = 50)]
    pub sampling_rate: u32,
    /// Percent of vehicles with a developing fault, e.g. insulation=5,bearing=3
    /// (turn_fault, insulation, bearing, eccentricity, broken_bar); the rest are normal.
    #[arg(long, default_value = "")]
    pub faults: String,
    /// The window after the run start in which fault onsets fall; `0s` makes every faulty
    /// vehicle faulty from its first message (its severity still grows from there), so that
    /// a short run already scores the diagnosis.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub fault_onset: Duration,
    /// Seed of every random choice: which vehicles fail and when, drive cycles, jitter.
    #[arg(long, default_value_t = 2024)]
    pub seed: u64,
    /// Stop after this long [default: run until SIGINT/SIGTERM].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// A request without a complete answer after this long counts as failed (timeout).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How long a timed-out request's connection stays open for the answer a stalled target
    /// may still give. A late 200 stays a failure (timeout) but is counted as `late_accepted`,
    /// so the messages the target really took are known exactly. 0 closes it at once.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub late_window: Duration,
    /// Close a kept-alive connection idle this long instead of reusing it. Keep it below the
    /// target's own idle limit (uvicorn: 5 s), so that a request never races the server's
    /// close; a connection the server closed earlier is noticed before reuse anyway.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Also trust the CA certificates of this PEM file for an `https://` target (besides the
    /// system's roots), e.g. a backend's private CA.
    #[arg(long, value_name = "FILE")]
    pub target_ca: Option<std::path::PathBuf>,
    /// Accept any certificate from an `https://` target. Only for a test backend with a
    /// throwaway certificate: the traffic is encrypted but the server is not authenticated.
    /// Logged as a warning at start.
    #[arg(long)]
    pub target_insecure: bool,
    /// Send to the authenticated route with this file's token (one line) as a Bearer token.
    #[arg(long, value_name = "FILE", group = "auth")]
    pub auth_token_file: Option<std::path::PathBuf>,
    /// Send to the authenticated route with one Bearer token per vehicle, from lines
    /// `vehicle_id<TAB>token`; every vehicle of the slice must be listed.
    #[arg(long, value_name = "FILE", group = "auth")]
    pub vehicle_tokens: Option<std::path::PathBuf>,
    /// Send to the authenticated route with a token obtained by logging in at
    /// `URL/auth/token` (JSON username and password, as the VTOX backend does); a 401 later
    /// renews it once (one login at a time, whatever the number of vehicles). Needs
    /// --login-user and --login-password-file.
    #[arg(long, value_name = "URL", group = "auth")]
    pub login: Option<String>,
    /// User name for --login.
    #[arg(long, value_name = "USER", requires = "login")]
    pub login_user: Option<String>,
    /// File holding the password for --login (never give it as an argument).
    #[arg(long, value_name = "FILE", requires = "login")]
    pub login_password_file: Option<std::path::PathBuf>,
    /// Most requests outstanding at once; a tick beyond it is dropped, never queued.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Time between two metric lines.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub report_every: Duration,
    /// Vehicle ID template: {plate} {model} {city} {serial} (= 202400000 + n) {n}.
    #[arg(long, default_value = vtox::fleet::DEFAULT_ID_TEMPLATE)]
    pub id_template: String,
    /// Run start as Unix seconds: schedules, `seq` numbers and fault onsets count from here,
    /// so a restarted or moved slice continues where it was [default: now].
    #[arg(long)]
    pub run_start: Option<f64>,
    /// Stop sending when stdin closes or stays silent this long. `vtox-agent` keeps it alive
    /// with a byte a second, so that a simulator whose agent was killed or frozen never keeps
    /// driving vehicles the coordinator may already have moved elsewhere. Exits with code 3.
    #[arg(long, value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// Keep the running totals in this file (shared memory), so that they can be read exactly
    /// even after the process is killed. `vtox-agent` passes one per instance.
    #[arg(long, value_name = "PATH")]
    pub tally: Option<std::path::PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = vtox::process::LogFormat::Text)]
    pub log_format: vtox::process::LogFormat,
}

/// Everything validated: the engine never sees a value it has to reject.
pub struct Config {
    pub args: Args,
    pub agent: String,
    /// Target as given, without a trailing slash (for messages).
    pub base: String,
    pub host: String,
    pub port: u16,
    /// `host:port` for the Host header.
    pub authority: String,
    /// Path of the target URL before the ingest route, e.g. `/vtox` behind a reverse proxy.
    pub path_prefix: String,
    pub faults: FaultMix,
    pub template: IdTemplate,
    pub schedule: Schedule,
    pub run_start: SystemTime,
    /// For an `https://` target.
    pub tls: Option<lanes::TlsTarget>,
    /// For the authenticated route.
    pub auth: Option<AuthSource>,
}

/// How the authenticated route's tokens are had.
pub enum AuthSource {
    Tokens(auth::Tokens),
    /// Logged in by the engine before the first message.
    Login(Box<auth::LoginSpec>),
}

fn validate(args: Args) -> Result<Config> {
    if args.vehicles == 0 {
        bail!("--vehicles must be at least 1");
    }
    if args.first_vehicle.checked_add(args.vehicles).is_none() {
        bail!("--first-vehicle + --vehicles overflows");
    }
    if args.vehicles > u32::MAX as u64 {
        bail!(
            "--vehicles {} is more than one instance can drive",
            args.vehicles
        );
    }
    let target = vtox::ingest::Target::parse(&args.target).context("--target")?;
    let faults = args
        .faults
        .parse::<FaultMix>()
        .context("--faults")?
        .with_onset_window(args.fault_onset.as_secs_f64());
    let tls = target_tls(&args, &target)?;
    let template = IdTemplate::parse(&args.id_template).context("--id-template")?;
    let auth = auth_source(&args, &template)?;
    let schedule = Schedule::new(args.interval.as_secs_f64(), args.jitter, args.seed)
        .context("--interval/--jitter")?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.sampling_rate == 0 {
        bail!("--sampling-rate must be at least 1 Hz");
    }
    if args.max_in_flight == 0 {
        bail!("--max-in-flight must be at least 1");
    }
    if args.timeout.is_zero() || args.report_every.is_zero() {
        bail!("--timeout and --report-every must be greater than zero");
    }
    if args.duration.is_some_and(|d| d.is_zero()) {
        bail!("--duration must be greater than zero");
    }
    let run_start = match args.run_start {
        None => SystemTime::now(),
        Some(s) if s.is_finite() && s >= 0.0 => UNIX_EPOCH + Duration::from_secs_f64(s),
        Some(s) => bail!("--run-start {s} is not a Unix time"),
    };
    let agent = match &args.agent {
        Some(a) if a.is_empty() => bail!("--agent must not be empty"),
        Some(a) => a.clone(),
        None => hostname(),
    };
    Ok(Config {
        agent,
        base: target.base,
        host: target.host,
        port: target.port,
        authority: target.authority,
        path_prefix: target.path_prefix,
        faults,
        template,
        schedule,
        run_start,
        tls,
        auth,
        args,
    })
}

fn auth_source(args: &Args, template: &IdTemplate) -> Result<Option<AuthSource>> {
    use std::sync::Arc;
    use vtox::login::{parse_vehicle_tokens, read_secret, read_token};
    if let Some(path) = &args.auth_token_file {
        let token = read_token(path).context("--auth-token-file")?;
        return Ok(Some(AuthSource::Tokens(auth::Tokens::Shared(Arc::from(
            token,
        )))));
    }
    if let Some(path) = &args.vehicle_tokens {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--vehicle-tokens: cannot read {shown}"))?;
        let table = parse_vehicle_tokens(&shown, &text).context("--vehicle-tokens")?;
        let mut tokens = Vec::with_capacity(args.vehicles as usize);
        for n in args.first_vehicle..args.first_vehicle + args.vehicles {
            let id = template.render(n);
            match table.get(&id) {
                Some(t) => tokens.push(Arc::from(t.as_str())),
                None => bail!("--vehicle-tokens: vehicle {id} (n = {n}) has no token in {shown}"),
            }
        }
        return Ok(Some(AuthSource::Tokens(auth::Tokens::PerVehicle(tokens))));
    }
    let Some(url) = &args.login else {
        return Ok(None);
    };
    let (Some(user), Some(password_file)) = (&args.login_user, &args.login_password_file) else {
        bail!("--login needs --login-user and --login-password-file");
    };
    if user.is_empty() {
        bail!("--login-user must not be empty");
    }
    let login = vtox::ingest::Target::parse(url).context("--login")?;
    let password = read_secret(password_file).context("--login-password-file")?;
    let tls = match login.tls {
        true => Some(tls_target(args, &login)?),
        false => None,
    };
    Ok(Some(AuthSource::Login(Box::new(auth::LoginSpec {
        host: login.host,
        port: login.port,
        authority: login.authority,
        path_prefix: login.path_prefix,
        base: login.base,
        tls,
        user: user.clone(),
        password,
        timeout: args.timeout,
    }))))
}

fn target_tls(args: &Args, target: &vtox::ingest::Target) -> Result<Option<lanes::TlsTarget>> {
    let login_tls = args
        .login
        .as_deref()
        .is_some_and(|l| l.starts_with("https://"));
    if !target.tls {
        if (args.target_ca.is_some() || args.target_insecure) && !login_tls {
            bail!("--target-ca and --target-insecure need an https:// --target or --login");
        }
        return Ok(None);
    }
    tls_target(args, target).map(Some)
}

/// TLS towards `target` (the ingest target or the login), as --target-ca and
/// --target-insecure say.
fn tls_target(args: &Args, target: &vtox::ingest::Target) -> Result<lanes::TlsTarget> {
    use vtox::target_tls::{client_config, server_name, TrustOptions};
    if args.target_insecure && args.target_ca.is_some() {
        bail!("--target-insecure trusts everything: --target-ca would be ignored");
    }
    let (config, trust) = client_config(&TrustOptions {
        ca_file: args.target_ca.as_deref(),
        insecure: args.target_insecure,
        system_roots: true,
    })
    .context("--target-ca")?;
    if args.target_insecure {
        tracing::warn!(
            target = %target.base,
            "--target-insecure: the target's TLS certificate is NOT verified; use only against a test backend"
        );
    } else {
        tracing::info!(
            system_roots = trust.system,
            added = trust.added,
            "TLS towards the target"
        );
    }
    Ok(lanes::TlsTarget {
        connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
        name: server_name(&target.host).context("--target")?,
        base: target.base.clone(),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    vtox::process::init_logs(args.log_format, "info");
    let config = match validate(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // One core (e.g. under taskset) gets the single-threaded scheduler: no work stealing, no
    // cross-thread wake-ups, measurably more messages per second.
    let cores = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1);
    let built = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The engine runs as a task, not inside block_on: block_on polls on the main thread, and
    // on a one-core budget every hand-off between it and a worker thread is a context switch.
    match runtime.block_on(async { tokio::spawn(run(config)).await }) {
        Ok(Ok(())) if LEASE_LOST.load(std::sync::atomic::Ordering::Relaxed) => {
            ExitCode::from(EXIT_LEASE_LOST)
        }
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: the engine stopped unexpectedly: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(lease) = config.args.lease {
        tokio::spawn(watch_lease(lease, stop_tx.clone()));
    }
    tokio::spawn(async move {
        vtox::process::shutdown_signal().await;
        tracing::info!("stopping: signal received");
        let _ = stop_tx.send(true);
    });
    engine::run(config, stop_rx).await
}

/// Set when the lease ran out, so that the exit code tells the agent this was no normal end.
static LEASE_LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Exit code of a simulator that stopped because its agent went silent.
const EXIT_LEASE_LOST: u8 = 3;

/// The simulator's end of the lease: every byte on stdin renews it; end of file (the agent
/// died) or silence longer than the lease (the agent is frozen) stops the schedule.
async fn watch_lease(lease: Duration, stop: watch::Sender<bool>) {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(lease, stdin.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => tracing::warn!("stopping: the agent is gone (stdin closed)"),
            Err(_) => tracing::warn!(?lease, "stopping: no word from the agent within the lease"),
        }
        LEASE_LOST.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = stop.send(true);
        return;
    }
}
