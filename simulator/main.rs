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
use vtox::faults::FaultMix;
use vtox::fleet::IdTemplate;
use vtox::schedule::Schedule;

pub use vtox::sim_args::SimArgs as Args;

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
    /// Coverage outages (`--dropouts`).
    pub dropouts: Option<vtox::dropouts::Dropouts>,
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
    if args.buffer == 0 {
        bail!("--buffer must be at least 1 message");
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let dropouts = match &args.dropouts {
        None => None,
        Some(_) if args.delivery == vtox::delivery::Delivery::AtMostOnce => {
            bail!("--dropouts needs --delivery store-and-forward: a vehicle out of coverage keeps its messages until it is back")
        }
        Some(text) => Some(vtox::dropouts::Dropouts::parse(text, args.seed).context("--dropouts")?),
    };
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
        dropouts,
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
    // One thread (one core under taskset, or the agent's share for this process) gets the
    // single-threaded scheduler: no work stealing, no cross-thread wake-ups, measurably more
    // messages per second.
    let threads = config.args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    let built = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
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
