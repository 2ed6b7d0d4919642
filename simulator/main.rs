//! `vtox-sim`: drives one contiguous slice of the fleet against a VTOX ingest endpoint and
//! prints cumulative metrics as JSON lines on stdout. Usable alone or under `vtox-agent`.

mod auth;
mod config;
mod counters;
mod engine;
mod lanes;
mod maker;
mod reader;
mod stream;
mod tally;

use anyhow::Result;
use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::watch;

use config::Args;

use engine::Stop;

/// Exit code of a simulator that stopped because its agent went silent: its agent tells it
/// from a crash by this.
const EXIT_LEASE_LOST: u8 = 3;

fn main() -> ExitCode {
    let args = Args::parse();
    vtox::process::init_logs(args.log_format, "info");
    let config = match config::Config::from_args(args) {
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
        Ok(Ok(Some(Stop::LeaseLost))) => ExitCode::from(EXIT_LEASE_LOST),
        Ok(Ok(_)) => ExitCode::SUCCESS,
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

/// Runs the engine until its duration ends or something stops it; says what did.
async fn run(config: config::Config) -> Result<Option<Stop>> {
    let (stop_tx, stop_rx) = watch::channel(None);
    if let Some(lease) = config.args.lease {
        tokio::spawn(watch_lease(lease, stop_tx.clone()));
    }
    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        vtox::process::shutdown_signal().await;
        tracing::info!("stopping: signal received");
        signal_tx.send_if_modified(|s| {
            let first = s.is_none();
            s.get_or_insert(Stop::Signal);
            first
        });
    });
    engine::run(config, stop_rx).await?;
    let why = *stop_tx.borrow();
    Ok(why)
}

/// The simulator's end of the lease: every byte on stdin renews it; end of file (the agent
/// died) or silence longer than the lease (the agent is frozen) stops the schedule.
async fn watch_lease(lease: Duration, stop: watch::Sender<Option<Stop>>) {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(lease, stdin.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => tracing::warn!("stopping: the agent is gone (stdin closed)"),
            Err(_) => tracing::warn!(?lease, "stopping: no word from the agent within the lease"),
        }
        stop.send_if_modified(|s| {
            let first = s.is_none();
            s.get_or_insert(Stop::LeaseLost);
            first
        });
        return;
    }
}
