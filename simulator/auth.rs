//! Bearer tokens for the authenticated route: one for every vehicle, one per vehicle, or one
//! obtained by logging in and renewed once when the backend answers 401. Tokens and passwords
//! are never logged.

use crate::counters::Counters;
use crate::stream::{open, TlsTarget};
use anyhow::{anyhow, bail, Result};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vtox::http1::{parse_head, BodyReader};
use vtox::login::{login_request, parse_login_answer};

/// Where the tokens come from.
pub enum Tokens {
    /// `--auth-token-file`.
    Shared(Arc<str>),
    /// `--vehicle-tokens`, by the vehicle's index in the slice.
    PerVehicle(Vec<Arc<str>>),
    /// `--login`.
    Login(Arc<Login>),
}

impl Tokens {
    /// The token for the vehicle at `idx` and its generation (renewals count up from 0), so
    /// that a 401 can tell whether it was caused by the token in use now or an older one.
    pub fn token(&self, idx: usize) -> (u64, Arc<str>) {
        match self {
            Tokens::Shared(t) => (0, t.clone()),
            Tokens::PerVehicle(v) => (0, v.get(idx).cloned().unwrap_or_else(|| Arc::from(""))),
            Tokens::Login(l) => l.current(),
        }
    }
}

/// Where and as whom to log in.
pub struct LoginSpec {
    pub host: String,
    pub port: u16,
    pub authority: String,
    pub path_prefix: String,
    /// The login URL as given, for messages.
    pub base: String,
    pub tls: Option<TlsTarget>,
    pub user: String,
    pub password: String,
    pub timeout: Duration,
}

/// A logged-in session: the current token and the single-flight renewal.
pub struct Login {
    spec: LoginSpec,
    current: Mutex<(u64, Arc<str>)>,
    renewing: AtomicBool,
    /// Where the logins done (the first one included) are counted.
    counters: Arc<Counters>,
}

/// A failed renewal waits this long before another 401 may start one: a login service that is
/// down must not be hammered by every vehicle's failures.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Most bytes of a login answer read; a token answer is a few hundred.
const MAX_ANSWER: usize = 256 * 1024;

impl Login {
    /// Logs in for the first time; the run does not start without a token.
    pub async fn start(spec: LoginSpec, counters: Arc<Counters>) -> Result<Arc<Login>> {
        let token = fetch(&spec).await?;
        counters.add(vtox::counters::Counter::Logins, 1);
        tracing::info!(login = %spec.base, user = %spec.user, "logged in");
        Ok(Arc::new(Login {
            spec,
            current: Mutex::new((0, Arc::from(token))),
            renewing: AtomicBool::new(false),
            counters,
        }))
    }

    fn current(&self) -> (u64, Arc<str>) {
        match self.current.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A request carrying the token of generation `generation` was answered 401. The first
    /// such answer for the current token starts one renewal; every other one (requests that
    /// were already under way with the same token, or with an older one) changes nothing.
    pub fn unauthorized(self: &Arc<Self>, generation: u64) {
        if self.current().0 != generation || self.renewing.swap(true, Relaxed) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            match fetch(&this.spec).await {
                Ok(token) => {
                    this.counters.add(vtox::counters::Counter::Logins, 1);
                    match this.current.lock() {
                        Ok(mut c) => *c = (generation + 1, Arc::from(token)),
                        Err(poisoned) => {
                            *poisoned.into_inner() = (generation + 1, Arc::from(token))
                        }
                    }
                    tracing::info!(login = %this.spec.base, "token renewed after a 401");
                }
                Err(e) => {
                    tracing::warn!(login = %this.spec.base, "renewing the token failed: {e:#}");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
            this.renewing.store(false, Relaxed);
        });
    }
}

/// One login exchange on its own connection, within the request timeout.
async fn fetch(spec: &LoginSpec) -> Result<String> {
    let exchange = async {
        let mut stream = open(&spec.host, spec.port, spec.tls.as_ref())
            .await
            .map_err(|e| anyhow!("cannot connect: {e}"))?;
        let request = login_request(
            &spec.path_prefix,
            &spec.authority,
            &spec.user,
            &spec.password,
        );
        stream.write_all(&request).await?;
        stream.flush().await?;
        let mut buf = Vec::with_capacity(4096);
        loop {
            if complete(&buf) {
                break;
            }
            if buf.len() > MAX_ANSWER {
                bail!("the answer is larger than {MAX_ANSWER} bytes");
            }
            if stream.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        Ok(parse_login_answer(&buf)?)
    };
    match tokio::time::timeout(spec.timeout, exchange).await {
        Ok(Ok(token)) => Ok(token),
        Ok(Err(e)) => Err(e.context(format!("login at {}", spec.base))),
        Err(_) => bail!(
            "login at {}: no answer within {:?}",
            spec.base,
            spec.timeout
        ),
    }
}

/// Whether `buf` holds a whole answer (framed by length or chunks; one framed by the close
/// ends when the server closes).
fn complete(buf: &[u8]) -> bool {
    let Ok(Some(head)) = parse_head(buf) else {
        return false;
    };
    let mut body = BodyReader::new(head.framing);
    body.feed(&buf[head.head_len..]).is_ok() && body.is_done()
}
