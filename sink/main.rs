//! vtox-sink: a stand-in for the VTOX backend's ingest API (same routes, validation and Redis XADD), for demos and tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::{Parser, ValueEnum};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use tracing::{debug, info, warn};

use vtox::sink::{
    check_bearer, is_json_content_type, parse_body, BodyError, FieldError, FieldErrorKind,
    SinkStats,
};

/// Per-call bound on Redis: a hung Redis must turn into a 500, not a hung client.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long in-flight requests (e.g. ones held by --delay) may finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// FastAPI sets no body limit; this only stops a runaway client, far above a 10 kHz message.
const BODY_LIMIT: usize = 64 * 1024 * 1024;

const SIM_ROUTE: &str = "/api/v1/diagnosis-stream/simulator/vehicles/{vehicle_id}/data";
const AUTH_ROUTE: &str = "/api/v1/diagnosis-stream/vehicles/{vehicle_id}/data";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A VTOX-compatible ingest endpoint: validates bodies like the FastAPI backend, counts what
/// it receives (GET /stats, /stats/vehicles; POST /stats/reset) and optionally writes every
/// accepted message to a Redis stream exactly as the backend does.
#[derive(Debug, Parser)]
#[command(name = "vtox-sink", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one; the chosen address is logged).
    #[arg(long, default_value = "127.0.0.1:8000", value_name = "ADDR")]
    listen: SocketAddr,
    /// Redis URL; with it, every accepted message is XADDed to --stream.
    #[arg(long, value_name = "URL", value_parser = vtox::redis_url::parse)]
    redis: Option<String>,
    /// Redis stream key.
    #[arg(long, default_value = "motor_raw_data", value_name = "KEY")]
    stream: String,
    /// Approximate stream length cap (XADD MAXLEN ~); 0 disables trimming.
    #[arg(long, default_value_t = 50_000, value_name = "N")]
    maxlen: u64,
    /// Bearer token required on the authenticated route; without it any non-empty bearer passes.
    #[arg(
        long,
        env = "VTOX_SINK_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Wait this long before answering every ingest request (e.g. 500ms, 3s): a slow backend.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Answer at most this many ingest requests per second with 200 (a token bucket with a
    /// tenth of a second of burst); the rest get 503: a backend with a known limit. 0 refuses
    /// every request.
    #[arg(long, value_name = "N")]
    max_rps: Option<u64>,
    /// Be down for a while: answer every ingest request 503 during DURATION from the start,
    /// or from AT on (e.g. 6s, 30s+1m). Repeat for several outages.
    #[arg(long, value_name = "[AT+]DURATION")]
    outage: Vec<vtox::sink::Outage>,
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

struct RedisSink {
    conn: ConnectionManager,
    stream: String,
    maxlen: u64,
    /// Last known state, so an outage is logged once when it starts and once when it ends
    /// rather than once per request.
    healthy: AtomicBool,
}

impl RedisSink {
    /// The backend's exact command: `XADD <stream> MAXLEN ~ <n> * vehicle_id .. timestamp ..
    /// sensor_data .. metadata .. data_type motor_sensor_data`.
    async fn xadd(
        &self,
        vehicle_id: &str,
        timestamp: &str,
        sensor_data: &str,
        metadata: &str,
    ) -> Result<String, String> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream);
        if self.maxlen > 0 {
            cmd.arg("MAXLEN").arg("~").arg(self.maxlen);
        }
        cmd.arg("*")
            .arg("vehicle_id")
            .arg(vehicle_id)
            .arg("timestamp")
            .arg(timestamp)
            .arg("sensor_data")
            .arg(sensor_data)
            .arg("metadata")
            .arg(metadata)
            .arg("data_type")
            .arg("motor_sensor_data");
        let mut conn = self.conn.clone();
        let result =
            match tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<String>(&mut conn)).await {
                Ok(Ok(id)) => Ok(id),
                Ok(Err(e)) => Err(format!("redis error: {e}")),
                Err(_) => Err(format!("redis did not answer within {REDIS_TIMEOUT:?}")),
            };
        match &result {
            Ok(_) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    info!(stream = %self.stream, "redis is writable again");
                }
            }
            Err(e) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    warn!(error = %e, "redis write failed; answering 500 until it recovers");
                }
            }
        }
        result
    }
}

struct App {
    stats: Mutex<SinkStats>,
    started: Instant,
    token: Option<String>,
    delay: Option<Duration>,
    redis: Option<RedisSink>,
    /// --max-rps.
    limit: Option<Mutex<vtox::sink::Admission>>,
    outages: Vec<vtox::sink::Outage>,
}

impl App {
    fn stats(&self) -> MutexGuard<'_, SinkStats> {
        // A panic while holding the lock leaves plain counters behind; keep serving them.
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Serialize)]
struct Received<'a> {
    status: &'static str,
    message: &'static str,
    vehicle_id: &'a str,
    stream_id: Option<&'a str>,
    timestamp: &'a str,
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn detail(status: StatusCode, msg: &str) -> Response {
    (status, Json(serde_json::json!({ "detail": msg }))).into_response()
}

async fn ingest_sim(state: State<Arc<App>>, path: Path<String>, req: Request) -> Response {
    ingest(state, path, req, false).await
}

async fn ingest_auth(state: State<Arc<App>>, path: Path<String>, req: Request) -> Response {
    ingest(state, path, req, true).await
}

async fn ingest(
    State(app): State<Arc<App>>,
    Path(vehicle_id): Path<String>,
    req: Request,
    authenticated: bool,
) -> Response {
    // Before anything else, as a slow backend is slow on every answer; a client that hangs up
    // during the wait usually has its request dropped here, uncounted.
    if let Some(d) = app.delay {
        tokio::time::sleep(d).await;
    }
    let now = app.started.elapsed();
    if app.outages.iter().any(|o| o.covers(now)) {
        app.stats().record_unavailable();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"detail": "outage"})),
        )
            .into_response();
    }
    if let Some(limit) = &app.limit {
        let admitted = limit.lock().unwrap_or_else(|e| e.into_inner()).admit(now);
        if !admitted {
            app.stats().record_unavailable();
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"detail": "over --max-rps"})),
            )
                .into_response();
        }
    }
    if authenticated {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if let Err(e) = check_bearer(auth, app.token.as_deref()) {
            app.stats().record_unauthorized();
            debug!(vehicle_id, error = %e, "unauthorized");
            let mut resp = detail(StatusCode::UNAUTHORIZED, &e.to_string());
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    let json_body = is_json_content_type(
        req.headers()
            .get(header::CONTENT_TYPE)
            .map(HeaderValue::as_bytes),
    );
    let body = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(rejection) => return rejection.into_response(),
    };
    let parsed = if json_body {
        parse_body(&body)
    } else {
        Err(BodyError::Fields(vec![FieldError {
            loc: &[],
            kind: FieldErrorKind::ModelAttributes,
        }]))
    };
    let msg = match parsed {
        Ok(m) => m,
        Err(e) => {
            app.stats().record_rejected();
            debug!(vehicle_id, error = %e, "rejected");
            let body = serde_json::to_vec(&e.detail()).unwrap_or_default();
            return json_bytes(StatusCode::UNPROCESSABLE_ENTITY, body);
        }
    };

    let timestamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let stream_id = match &app.redis {
        None => None,
        Some(r) => {
            match r
                .xadd(
                    &vehicle_id,
                    &timestamp,
                    msg.sensor_data.get(),
                    msg.metadata_text(),
                )
                .await
            {
                Ok(id) => Some(id),
                Err(e) => {
                    app.stats().record_redis_error();
                    return detail(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("failed to store data: {e}"),
                    );
                }
            }
        }
    };
    let now = app.started.elapsed();
    app.stats()
        .record_accepted(&vehicle_id, &msg, body.len(), now);
    let out = Received {
        status: "success",
        message: "data received",
        vehicle_id: &vehicle_id,
        stream_id: stream_id.as_deref(),
        timestamp: &timestamp,
    };
    json_bytes(StatusCode::OK, serde_json::to_vec(&out).unwrap_or_default())
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    let snap = app.stats().snapshot(app.started.elapsed());
    Json(snap).into_response()
}

async fn stats_vehicles(State(app): State<Arc<App>>) -> Response {
    let list = app.stats().vehicles();
    Json(list).into_response()
}

async fn stats_reset(State(app): State<Arc<App>>) -> Response {
    app.stats().reset(app.started.elapsed());
    Json(serde_json::json!({"status": "reset"})).into_response()
}

async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn not_found() -> Response {
    detail(StatusCode::NOT_FOUND, "Not Found")
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(SIM_ROUTE, post(ingest_sim))
        .route(AUTH_ROUTE, post(ingest_auth))
        .route("/stats", get(stats))
        .route("/stats/vehicles", get(stats_vehicles))
        .route("/stats/reset", post(stats_reset))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn connect_redis(url: &str, stream: &str, maxlen: u64) -> anyhow::Result<RedisSink> {
    let client = redis::Client::open(url).context("invalid --redis URL")?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        // Few, short retries: a request waits on them, and the 2 s bound must hold.
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200));
    // Lazy, so the sink starts (and answers 500) while Redis is down.
    let conn = ConnectionManager::new_lazy_with_config(client, config)
        .context("create the redis connection manager")?;
    // Probed in the background: an unreachable host must not delay listening.
    let mut probe = conn.clone();
    let stream_name = stream.to_string();
    tokio::spawn(async move {
        let ping = redis::cmd("PING");
        match tokio::time::timeout(REDIS_TIMEOUT, ping.query_async::<String>(&mut probe)).await {
            Ok(Ok(_)) => info!(stream = %stream_name, maxlen, "redis reachable"),
            Ok(Err(e)) => warn!(
                error = %e,
                "redis unreachable at startup; ingest answers 500 until it is back"
            ),
            Err(_) => warn!(
                "redis did not answer within {REDIS_TIMEOUT:?} at startup; ingest answers 500 until it is back"
            ),
        }
    });
    Ok(RedisSink {
        conn,
        stream: stream.to_string(),
        maxlen,
        // Assumed up, so the first failure (if any) is logged by the write path too.
        healthy: AtomicBool::new(true),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let redis = match &args.redis {
        Some(url) => Some(connect_redis(url, &args.stream, args.maxlen)?),
        None => None,
    };
    let app = Arc::new(App {
        stats: Mutex::new(SinkStats::new()),
        started: Instant::now(),
        token: args.token.filter(|t| !t.is_empty()),
        delay: args.delay.filter(|d| !d.is_zero()),
        redis,
        limit: args
            .max_rps
            .map(|m| Mutex::new(vtox::sink::Admission::new(m))),
        outages: args.outage.clone(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let local = listener.local_addr().context("read the bound address")?;
    info!(
        addr = %local,
        redis = app.redis.is_some(),
        auth_token = app.token.is_some(),
        delay = ?app.delay,
        "vtox-sink listening"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = axum::serve(listener, router(app)).with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    });
    let serve = std::future::IntoFuture::into_future(serve);
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => return r.context("serve"),
        sig = shutdown_signal() => {
            info!(signal = sig?, "shutting down");
        }
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut serve).await {
        Ok(r) => r.context("serve")?,
        Err(_) => warn!("in-flight requests still open after {SHUTDOWN_GRACE:?}; exiting anyway"),
    }
    info!("stopped");
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    // clap prints its own error and exits 2 on bad arguments (incl. --listen and --redis).
    let args = Args::parse();
    init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
