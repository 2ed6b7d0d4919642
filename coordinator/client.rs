//! How the CLI reaches a coordinator: its address and how this invocation proves itself (the
//! shared token, TLS), as one value made from the flags and passed down — no process-wide
//! state — and the gRPC client it opens.

use anyhow::{anyhow, Result};
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use vtox::wire::pb::control_service_client::ControlServiceClient;

/// Largest reply the CLI accepts from the coordinator: a status of 10,000 agents lists 20,000
/// instances, far beyond tonic's 4 MiB default.
const STATUS_MAX_BYTES: usize = 256 << 20;

pub type ControlClient = ControlServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, vtox::auth::Bearer>,
>;

/// How this invocation proves itself to a coordinator.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The shared token (`--token-file` or `VTOX_TOKEN`).
    pub token: Option<String>,
    /// Client TLS (`--tls-ca`, and `--tls-cert`/`--tls-key` for mutual TLS); None: plaintext.
    pub tls: Option<ClientTlsConfig>,
}

/// A coordinator to talk to: its address and the access to it.
#[derive(Debug, Clone)]
pub struct Coord {
    pub url: String,
    pub access: Access,
}

impl Coord {
    pub fn new(url: &str, access: &Access) -> Coord {
        Coord {
            url: url.to_string(),
            access: access.clone(),
        }
    }

    /// The address with the scheme TLS implies: with TLS configured, https whatever was typed.
    fn normalized(&self) -> String {
        let tls = self.access.tls.is_some();
        let url = &self.url;
        match url.split_once("://") {
            Some((_, rest)) if tls => format!("https://{rest}"),
            Some(_) => url.to_string(),
            None if tls => format!("https://{url}"),
            None => format!("http://{url}"),
        }
    }

    pub async fn connect(&self) -> Result<ControlClient> {
        let url = self.normalized();
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|_| anyhow!("{url:?} is not a coordinator address (HOST:PORT)"))?
            .connect_timeout(Duration::from_secs(3));
        let endpoint = match self.access.tls.clone() {
            Some(tls) => endpoint.tls_config(tls).map_err(|e| anyhow!("TLS: {e}"))?,
            None => endpoint,
        };
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| anyhow!("cannot reach the coordinator at {url}: {}", root_cause(&e)))?;
        let bearer = vtox::auth::Bearer::new(self.access.token.as_deref())
            .map_err(|e| anyhow!("token: {e}"))?;
        Ok(ControlServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(STATUS_MAX_BYTES))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

pub fn status_error(s: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    match s.code() {
        // Transport failures surface as these codes with protocol jargon; say what to check.
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal => anyhow!(
            "the coordinator did not answer properly ({}): is it running, and if it uses TLS, did you pass --tls-ca?",
            s.message()
        ),
        _ => anyhow!("{}", s.message()),
    }
}
