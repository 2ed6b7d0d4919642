//! The simulator's validated configuration: the flags checked by the library's rules
//! (`vtox::sim_config`), then the files they name read (tokens, a password, CAs) and TLS set up.
//! The engine never sees a value it has to reject.

use crate::auth;
use crate::stream::TlsTarget;
use anyhow::{bail, Context, Result};
use std::time::SystemTime;
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
    pub tls: Option<TlsTarget>,
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

impl Config {
    pub fn from_args(args: Args) -> Result<Config> {
        let checked = args.check()?;
        let target = checked.target;
        let tls = match target.tls {
            true => Some(tls_target(&args, &target)?),
            false => None,
        };
        let auth = auth_source(&args, &checked.template, checked.login.as_ref())?;
        let agent = match &args.agent {
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
            faults: checked.faults,
            template: checked.template,
            schedule: checked.schedule,
            run_start: checked.run_start.unwrap_or_else(SystemTime::now),
            tls,
            auth,
            dropouts: checked.dropouts,
            args,
        })
    }
}

fn auth_source(
    args: &Args,
    template: &IdTemplate,
    login: Option<&vtox::ingest::Target>,
) -> Result<Option<AuthSource>> {
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
    // `check` made sure a login has its user, a password file and a URL that parses.
    let (Some(login), Some(user), Some(password_file)) =
        (login.cloned(), &args.login_user, &args.login_password_file)
    else {
        return Ok(None);
    };
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

/// TLS towards `target` (the ingest target or the login), as --target-ca and
/// --target-insecure say.
fn tls_target(args: &Args, target: &vtox::ingest::Target) -> Result<TlsTarget> {
    use vtox::target_tls::{client_config, server_name, TrustOptions};
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
    Ok(TlsTarget {
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
