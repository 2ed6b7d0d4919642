//! Process plumbing every binary shares: the log setup (`--log-format`), the wait for a
//! shutdown signal and how long a stopping simulator may take. Edge code, kept here only so
//! that four binaries do not each carry a copy.

use std::time::Duration;

/// How long a simulator told to stop may take before its agent kills it: its requests in
/// flight get one request timeout, the late answers it then waits for at most one more (see
/// vtox-sim's drain), plus a margin. Whoever waits for final counts waits about this long.
pub fn stop_grace(timeout_s: f64) -> Duration {
    Duration::from_secs_f64(2.0 * timeout_s.clamp(0.0, 600.0) + 5.0)
}

/// Log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr at `default_level` unless `RUST_LOG` says otherwise.
pub fn init_logs(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); only SIGINT stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
