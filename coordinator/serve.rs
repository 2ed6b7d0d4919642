//! Serving the coordinator: the gRPC services with health, the reconcile loop, and for
//! `serve` the metrics endpoint and the dashboard beside them.

use crate::args::ServeArgs;
use crate::client::{Access, Coord};
use crate::server::{AgentApi, ControlApi, Coordinator, Settings};
use anyhow::{anyhow, bail, Context, Result};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use vtox::wire::pb::agent_service_server::AgentServiceServer;
use vtox::wire::pb::control_service_server::ControlServiceServer;

/// How agents and the CLI must prove themselves to this server: the shared token, and TLS.
#[derive(Clone, Default)]
pub struct ServerAccess {
    pub token: Option<String>,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

pub async fn serve(a: ServeArgs, access: ServerAccess) -> Result<()> {
    if !a.listen.ip().is_loopback() && access.token.is_none() && !a.insecure {
        bail!(
            "refusing to listen on {} without a token: anyone who reaches it could join or drive the fleet; pass --token-file (or VTOX_TOKEN), or --insecure",
            a.listen
        );
    }
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let coord = Coordinator::new(Settings::of(&a)).map_err(|e| anyhow!(e))?;
    if let Some(addr) = a.metrics_listen {
        let c = coord.clone();
        vtox::process::serve_metrics(addr, move || {
            let text = c.prometheus();
            async move { text }
        })
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    }
    // Kept for the life of the server: dropping it stops the dashboard.
    let _web = match a.web_listen {
        Some(listen) => Some(
            crate::web::start(
                coord.clone(),
                crate::web::WebOptions {
                    listen,
                    insecure: a.insecure,
                    grpc: Coord {
                        url: own_url(a.listen),
                        access: Access {
                            token: access.token.clone(),
                            tls: None,
                        },
                    },
                    grpc_tls: access.tls.is_some(),
                    default_target: None,
                    local_sink: false,
                    redis: a.redis.clone(),
                },
            )
            .await?,
        ),
        None => None,
    };
    tracing::info!("coordinator listening on {}", a.listen);
    serve_on(
        listener,
        coord,
        vtox::auth::Check::new(access.token.clone()),
        access.tls.clone(),
        a.max_message_bytes,
        async {
            vtox::process::shutdown_signal().await;
            tracing::info!("stopping");
        },
    )
    .await
}

/// How this coordinator reaches its own gRPC (ramps started from the dashboard): a wildcard
/// address is reached on loopback.
fn own_url(listen: std::net::SocketAddr) -> String {
    let ip = if listen.ip().is_unspecified() {
        match listen {
            std::net::SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        listen.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(ip, listen.port()))
}

/// Serves the coordinator on a bound listener until `shutdown` resolves.
pub async fn serve_on(
    listener: TcpListener,
    coord: Arc<Coordinator>,
    check: vtox::auth::Check,
    tls: Option<tonic::transport::ServerTlsConfig>,
    max_message_bytes: usize,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<AgentServiceServer<AgentApi>>().await;
    reporter
        .set_serving::<ControlServiceServer<ControlApi>>()
        .await;
    let reconcile = tokio::spawn(coord.clone().reconcile_loop());
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("the TLS certificate or key is not usable")?;
    }
    let result = builder
        .add_service(health)
        .add_service(InterceptedService::new(
            AgentServiceServer::new(AgentApi(coord.clone()))
                .max_decoding_message_size(max_message_bytes),
            check.clone(),
        ))
        .add_service(InterceptedService::new(
            ControlServiceServer::new(ControlApi(coord))
                .max_decoding_message_size(max_message_bytes),
            check,
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    reconcile.abort();
    result.context("the gRPC server failed")
}
