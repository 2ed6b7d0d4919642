//! `vtox-coord`: the coordinator (`serve`) and the CLI that plans, starts, watches and stops
//! fleets across the agents that joined it.

mod args;
mod backend;
mod cli;
mod client;
mod drive;
mod local;
mod ramp;
mod render;
mod run;
mod serve;
mod server;
mod web;

use args::{Cli, Cmd};
use clap::Parser;
use client::Access;
use serve::ServerAccess;
use std::process::ExitCode;

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
    let access = match access(&cli) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
        let (client, server) = access;
        match cli.cmd {
            Cmd::Serve(a) => serve::serve(a, server).await.map(|_| ExitCode::SUCCESS),
            Cmd::Plan(a) => cli::plan(a, &client).await,
            Cmd::Capacity(a) => cli::capacity(a, &client).await,
            Cmd::Run(a) => run::run(a, &client).await,
            Cmd::Status(a) => cli::status(a, &client).await,
            Cmd::Stop(a) => cli::stop(a, &client).await,
            Cmd::Agents(a) => cli::agents(a, &client).await,
            Cmd::Rebalance(a) => cli::rebalance(a, &client).await,
            Cmd::Ramp(a) => run::ramp(a, &client).await,
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

/// How this invocation proves itself: the shared token (never echoed: neither in logs nor in
/// `--help`, the env value is hidden) and TLS, the server's for `serve`, the client's for the
/// other commands.
fn access(cli: &Cli) -> anyhow::Result<(Access, ServerAccess)> {
    let token = vtox::auth::load(cli.token_file.as_deref(), std::env::var("VTOX_TOKEN").ok())?;
    let mut client = Access {
        token: token.clone(),
        tls: None,
    };
    let mut server = ServerAccess { token, tls: None };
    match &cli.cmd {
        Cmd::Serve(a) => {
            server.tls = vtox::auth::server_tls(
                cli.tls_cert.as_deref(),
                cli.tls_key.as_deref(),
                a.tls_client_ca.as_deref(),
            )?
        }
        _ => {
            client.tls = vtox::auth::client_tls(
                cli.tls_ca.as_deref(),
                cli.tls_cert.as_deref(),
                cli.tls_key.as_deref(),
            )?
        }
    }
    Ok((client, server))
}
