//! Process plumbing every binary shares: the log setup (`--log-format`), the wait for a
//! shutdown signal, the Prometheus endpoint and how long a stopping simulator may take. Edge code, kept here only so
//! that four binaries do not each carry a copy.

use std::time::Duration;

/// How long a simulator told to stop may take before its agent kills it: its requests in
/// flight get one request timeout, the late answers it then waits for at most one more (see
/// vtox-sim's drain), plus a margin. Whoever waits for final counts waits about this long.
pub fn stop_grace(timeout_s: f64) -> Duration {
    Duration::from_secs_f64(2.0 * timeout_s.clamp(0.0, 600.0) + 5.0)
}

/// CPU time a process has used, in clock ticks (user + system, all threads), from the text of
/// its `/proc/PID/stat`; None when it does not parse.
pub fn proc_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: the fields resume after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace();
    // After the name: state (3), ppid (4) ... utime is field 14 and stime 15 of stat(5).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The share of a host's CPU that `ticks` of CPU time over `seconds` of wall time are, in
/// percent of all its `cores` (0..100, like a host's CPU use).
pub fn cpu_share_percent(ticks: u64, ticks_per_s: f64, seconds: f64, cores: u32) -> f64 {
    if seconds <= 0.0 || ticks_per_s <= 0.0 || cores == 0 {
        return 0.0;
    }
    (ticks as f64 / ticks_per_s / seconds / f64::from(cores) * 100.0).clamp(0.0, 100.0)
}

/// Serves `render()` as Prometheus text at `http://addr/metrics`, in the background, for
/// `--metrics-listen` on the coordinator and the agents.
pub async fn serve_metrics<F, Fut>(addr: std::net::SocketAddr, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = render();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    text.await,
                )
            }
        }),
    );
    tracing::info!("metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the metrics server stopped: {e}");
        }
    });
    Ok(())
}

/// Log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_from_proc_stat() {
        let stat =
            "4242 (vtox sim (x)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 150 37 0 0 20 0 3 0 99 0 0";
        assert_eq!(proc_stat_cpu_ticks(stat), Some(187));
        assert_eq!(proc_stat_cpu_ticks("garbage"), None);
        assert_eq!(proc_stat_cpu_ticks("1 (x) S 1 2"), None);
        // This very process has a stat file that parses.
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(proc_stat_cpu_ticks(&own).is_some());
    }

    #[test]
    fn cpu_shares_are_percent_of_the_whole_host() {
        // 100 ticks/s over 2 s on 2 cores: one core busy = 50 % of the host.
        assert_eq!(cpu_share_percent(200, 100.0, 2.0, 2), 50.0);
        assert_eq!(cpu_share_percent(200, 100.0, 0.0, 2), 0.0);
        assert_eq!(cpu_share_percent(1_000, 100.0, 1.0, 2), 100.0);
    }
}
