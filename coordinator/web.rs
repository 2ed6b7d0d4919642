//! The web dashboard (`serve --web-listen`, and `run --local`/`ramp --local` on a free loopback
//! port): the live view of the run once a second over server-sent events, the ramp as it
//! goes, and the controls of the CLI with its validation. Every asset is compiled in, so it
//! works on a lab network without Internet.
//!
//! One producer task makes a frame a second from the coordinator's status (`dashboard::Board`)
//! and hands the same bytes to every open page, so ten dashboards cost about what one does.
//! Beyond loopback the dashboard needs the coordinator's token (or `--insecure`): the browser
//! signs in once and holds an HttpOnly, SameSite=Strict session cookie; every call checks it,
//! and state-changing calls are JSON POSTs from the page's own origin.

use crate::args::{RampArgs, RedisArgs, RunArgs, DEFAULT_TARGET};
use crate::backend::{BackendRedis, Sampler};
use crate::client::Coord;
use crate::server::Coordinator;
use anyhow::{bail, Context, Result};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use vtox::dashboard::Board;
use vtox::wire::pb;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");
const UPLOT_JS: &str = include_str!("web/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("web/uplot/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("web/uplot/LICENSE");

const SESSION_COOKIE: &str = "vtox_session";
/// A session lasts this long; sign in again after.
const SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: usize = 1024;
/// Frames a second while a page is open, and every this long otherwise (the history keeps
/// going, and a large fleet's status is not merged every second for nobody).
const UNWATCHED_FRAME: Duration = Duration::from_secs(10);
/// The diagnosis score is read from the backend's Redis this often.
const SCORE_EVERY: Duration = Duration::from_secs(15);

/// Where and how the dashboard serves.
#[derive(Debug, Clone)]
pub struct WebOptions {
    pub listen: SocketAddr,
    /// Listen beyond loopback without a token.
    pub insecure: bool,
    /// The coordinator's gRPC address and its token, for ramps started from the page (they are
    /// clients of it like the CLI's); the token is also the page's own.
    pub grpc: Coord,
    /// Whether that gRPC speaks TLS (ramps cannot be started from the page then).
    pub grpc_tls: bool,
    /// The target a run or ramp started from the page drives when none is given.
    pub default_target: Option<String>,
    /// That target is a vtox-sink on the agents' own host (`--local`): runs driving it are
    /// planned with its cost on their cores.
    pub local_sink: bool,
    /// The backend's Redis, for the pipeline panel and the score.
    pub redis: RedisArgs,
}

struct Web {
    coord: Arc<Coordinator>,
    token: Option<String>,
    opts: WebOptions,
    sessions: Mutex<HashMap<String, Instant>>,
    frames: watch::Sender<Arc<str>>,
    board: Mutex<Board>,
    last_status: Mutex<Arc<pb::RunStatus>>,
    ramp_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A dashboard serving in the background; dropping it stops it.
pub struct WebServer {
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for WebServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds the dashboard and serves it in the background.
pub async fn start(coord: Arc<Coordinator>, opts: WebOptions) -> Result<WebServer> {
    let token = opts.grpc.access.token.clone();
    if !opts.listen.ip().is_loopback() && token.is_none() && !opts.insecure {
        bail!(
            "refusing to serve the dashboard on {} without a token: anyone who reaches it could drive the fleet; pass --token-file (or VTOX_TOKEN), or --insecure",
            opts.listen
        );
    }
    opts.redis.check()?;
    // A Redis that is down now must not keep the coordinator from serving: the dashboard says
    // so and tries again.
    let redis = match BackendRedis::connect(&opts.redis).await {
        Ok(r) => Ok(r),
        Err(e) => {
            tracing::warn!("{e:#}; the dashboard's pipeline panel waits for it");
            Err(format!("{e:#}"))
        }
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the dashboard", opts.listen))?;
    let addr = listener.local_addr()?;
    let web = Arc::new(Web {
        coord,
        token,
        opts,
        sessions: Mutex::new(HashMap::new()),
        frames: watch::Sender::new(Arc::from("{}")),
        board: Mutex::new(Board::new()),
        last_status: Mutex::new(Arc::new(pb::RunStatus::default())),
        ramp_task: Mutex::new(None),
    });
    let producer = tokio::spawn(produce(web.clone(), redis));
    let app = router(web);
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the dashboard stopped: {e}");
        }
    });
    tracing::info!("dashboard on http://{addr}/");
    Ok(WebServer {
        addr,
        tasks: vec![producer, server],
    })
}

fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { page(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/uplot.js",
            get(|| async { page(UPLOT_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/uplot.css",
            get(|| async { page(UPLOT_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/licenses",
            get(|| async { page(UPLOT_LICENSE, "text/plain; charset=utf-8") }),
        )
        .route("/api/session", get(session))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/events", get(events))
        .route("/api/history", get(history))
        .route("/api/agents/{name}", get(agent))
        .route("/api/run", post(start_run))
        .route("/api/stop", post(stop))
        .route("/api/rebalance", post(rebalance))
        .route("/api/ramp", post(start_ramp))
        .route("/api/ramp/{file}", get(ramp_file))
        .with_state(web)
}

/// A compiled-in asset, with headers that keep the page to its own origin.
fn page(body: &'static str, kind: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    secure(h);
    r
}

fn secure(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    let mut r = (code, Json(json!({ "error": message.into() }))).into_response();
    secure(r.headers_mut());
    r
}

fn ok(v: Value) -> Response {
    let mut r = Json(v).into_response();
    secure(r.headers_mut());
    r
}

/// 32 random bytes from the kernel, as hex: a session id nobody can guess.
fn random_id() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Web {
    /// Whether the request may see and drive the run: always without a token; with one,
    /// by a live session cookie or the token itself as a Bearer (for scripts).
    fn allowed(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            let sessions = lock(&self.sessions);
            if sessions
                .get(id)
                .is_some_and(|made| made.elapsed() < SESSION_TTL)
            {
                return true;
            }
        }
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| vtox::auth::ct_eq(t.trim().as_bytes(), token.as_bytes()))
    }

    /// A state-changing call must be allowed, JSON, and not from another site. SameSite=Strict keeps
    /// the cookie off cross-site requests already; the origin and the content type (which a
    /// cross-site form cannot send) make sure of it.
    /// The refusal of a state-changing call, if it must be refused.
    fn refuse_post(&self, headers: &HeaderMap) -> Option<Response> {
        if !self.allowed(headers) {
            return Some(error(StatusCode::UNAUTHORIZED, "sign in first"));
        }
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return Some(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "control calls take application/json",
            ));
        }
        if headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "cross-site" || v == "same-site")
        {
            return Some(error(StatusCode::FORBIDDEN, "cross-site request refused"));
        }
        if foreign_origin(headers) {
            return Some(error(StatusCode::FORBIDDEN, "cross-origin request refused"));
        }
        None
    }
}

/// Whether the request says it comes from a page of another origin than this dashboard.
fn foreign_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    !origin
        .split_once("://")
        .is_some_and(|(_, rest)| !host.is_empty() && rest == host)
}

async fn session(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    ok(json!({
        "auth_required": web.token.is_some(),
        "signed_in": web.allowed(&headers),
        "default_target": web.opts.default_target.clone().unwrap_or_else(|| DEFAULT_TARGET.to_string()),
        "redis": web.opts.redis.redis.is_some(),
    }))
}

#[derive(Deserialize)]
struct LoginBody {
    token: String,
}

async fn login(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Option<Json<LoginBody>>,
) -> Response {
    let Some(token) = &web.token else {
        return ok(json!({"signed_in": true}));
    };
    if foreign_origin(&headers) {
        return error(StatusCode::FORBIDDEN, "cross-origin request refused");
    }
    let given = body.map(|b| b.0.token).unwrap_or_default();
    if !vtox::auth::ct_eq(given.trim().as_bytes(), token.as_bytes()) {
        // A guess costs a moment, so that guessing costs a lifetime.
        tokio::time::sleep(Duration::from_millis(300)).await;
        return error(StatusCode::UNAUTHORIZED, "wrong token");
    }
    let id = match random_id() {
        Ok(id) => id,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    {
        let mut sessions = lock(&web.sessions);
        sessions.retain(|_, made| made.elapsed() < SESSION_TTL);
        while sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, made)| **made)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => sessions.remove(&k),
                None => break,
            };
        }
        sessions.insert(id.clone(), Instant::now());
    }
    let mut r = ok(json!({"signed_in": true}));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        lock(&web.sessions).remove(id);
    }
    let mut r = ok(json!({"signed_in": false}));
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("vtox_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

async fn events(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if !web.allowed(&headers) {
        return error(StatusCode::UNAUTHORIZED, "sign in first");
    }
    let stream = WatchStream::new(web.frames.subscribe())
        .map(|frame| Ok::<_, Infallible>(Event::default().event("frame").data(&*frame)));
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    secure(r.headers_mut());
    r
}

async fn history(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if !web.allowed(&headers) {
        return error(StatusCode::UNAUTHORIZED, "sign in first");
    }
    let h = lock(&web.board).history();
    ok(serde_json::to_value(h).unwrap_or(Value::Null))
}

async fn agent(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if !web.allowed(&headers) {
        return error(StatusCode::UNAUTHORIZED, "sign in first");
    }
    let status = lock(&web.last_status).clone();
    let Some(a) = status.agents.iter().find(|a| a.agent == name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no agent {name:?} in the run"),
        );
    };
    let instances: Vec<Value> = a
        .instances
        .iter()
        .map(|i| {
            let c = i.counters.clone().unwrap_or_default();
            json!({
                "index": i.index,
                "first_vehicle": i.first_vehicle,
                "last_vehicle": (i.first_vehicle + i.vehicles).saturating_sub(1),
                "vehicles": i.vehicles,
                "phase": vtox::render::phase_name(i.phase),
                "restarts": i.restarts,
                "incarnation": i.incarnation,
                "last_error": i.last_error,
                "sent": c.sent,
                "accepted": c.accepted,
                "failed": c.failed,
                "dropped": c.dropped,
                "buffered": c.buffered,
                "offline": c.offline_vehicles,
                "connections": c.connections,
                "max_lag_ms": c.max_lag_ms,
            })
        })
        .collect();
    ok(json!({ "agent": name, "connected": a.connected, "instances": instances }))
}

/// The form of "start a run": every field as typed.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RunForm {
    pub vehicles: String,
    pub interval: String,
    pub duration: String,
    pub faults: String,
    pub target: String,
    pub delivery: String,
    pub dropouts: String,
}

/// `run` as the CLI parses it, so the page gets the same checks and the same words.
#[derive(clap::Parser, Debug)]
#[command(name = "run")]
struct RunCli {
    #[command(flatten)]
    run: RunArgs,
}

/// `ramp` likewise.
#[derive(clap::Parser, Debug)]
#[command(name = "ramp")]
struct RampCli {
    #[command(flatten)]
    ramp: RampArgs,
}

/// clap's message without its "error:" and its advice to read --help.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// A form field as the command-line words it stands for (none when left empty; a positional
/// one when `flag` is empty). Each field is also parsed alone, so that its error is shown
/// next to it.
fn flag_args(flag: &str, value: &str) -> Vec<String> {
    let value = value.trim();
    match (value.is_empty(), flag) {
        (true, _) => Vec::new(),
        (false, "") => vec![value.to_string()],
        (false, f) => vec![f.to_string(), value.to_string()],
    }
}

/// The field an error is about: the one whose flag the message names first ("form" when it
/// names none).
fn field_named(text: &str, fields: &[(&'static str, &str, &str)]) -> &'static str {
    fields
        .iter()
        .filter(|(_, flag, _)| !flag.is_empty())
        .filter_map(|(field, flag, _)| text.find(flag).map(|at| (at, *field)))
        .min()
        .map_or("form", |(_, field)| field)
}

/// Each form field's error, by field ("form" for the form as a whole).
type FormErrors = BTreeMap<&'static str, String>;

/// A form parsed and checked as the command line would be: each field alone first (with
/// `stub`, the words a command needs besides a flag, e.g. a vehicle count), so that its
/// error goes next to it, then all of them with `extra` words.
fn parse_form<C: clap::Parser>(
    command: &str,
    stub: &[&str],
    fields: &[(&'static str, &str, &str)],
    extra: &[String],
    check: impl Fn(&C) -> anyhow::Result<()>,
) -> Result<C, FormErrors> {
    let mut errors = BTreeMap::new();
    let mut all = vec![command.to_string()];
    for &(field, flag, value) in fields {
        let args = flag_args(flag, value);
        if args.is_empty() {
            continue;
        }
        all.extend(args.clone());
        let mut alone = vec![command.to_string()];
        if !flag.is_empty() {
            alone.extend(stub.iter().map(|w| w.to_string()));
        }
        alone.extend(args);
        match C::try_parse_from(&alone) {
            Err(e) => {
                errors.insert(field, clap_message(&e));
            }
            Ok(c) => {
                if let Err(e) = check(&c) {
                    errors.insert(field, format!("{e:#}"));
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    all.extend(extra.iter().cloned());
    let c = C::try_parse_from(&all).map_err(|e| BTreeMap::from([("form", clap_message(&e))]))?;
    if let Err(e) = check(&c) {
        let text = format!("{e:#}");
        return Err(BTreeMap::from([(field_named(&text, fields), text)]));
    }
    Ok(c)
}

/// A form refused: each field's error.
fn form_errors(errors: FormErrors) -> Response {
    let mut r = (StatusCode::BAD_REQUEST, Json(json!({ "errors": errors }))).into_response();
    secure(r.headers_mut());
    r
}

/// The run the form asks for, or each field's error.
pub fn parse_run_form(f: &RunForm, default_target: &str) -> Result<(RunArgs, String), FormErrors> {
    let fields: [(&'static str, &str, &str); 7] = [
        ("vehicles", "", &f.vehicles),
        ("interval", "--interval", &f.interval),
        ("duration", "--duration", &f.duration),
        ("faults", "--faults", &f.faults),
        ("target", "--target", &f.target),
        ("delivery", "--delivery", &f.delivery),
        ("dropouts", "--dropouts", &f.dropouts),
    ];
    let parsed = parse_form("run", &["1"], &fields, &[], |c: &RunCli| {
        c.run.drive.check()
    });
    if f.vehicles.trim().is_empty() {
        // Said next to the field, beside whatever else is wrong, rather than as clap's
        // "required argument" for the whole form.
        let mut errors = parsed.err().unwrap_or_default();
        errors.remove("form");
        errors.insert("vehicles", "how many vehicles?".to_string());
        return Err(errors);
    }
    let run = parsed?.run;
    let target = run
        .drive
        .target
        .clone()
        .unwrap_or_else(|| default_target.to_string());
    Ok((run, target))
}

async fn start_run(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Option<Json<RunForm>>,
) -> Response {
    if let Some(r) = web.refuse_post(&headers) {
        return r;
    }
    let form = body.map(|b| b.0).unwrap_or_default();
    let default_target = web
        .opts
        .default_target
        .clone()
        .unwrap_or_else(|| DEFAULT_TARGET.to_string());
    let (run, target) = match parse_run_form(&form, &default_target) {
        Ok(r) => r,
        Err(errors) => {
            let mut r =
                (StatusCode::BAD_REQUEST, Json(json!({ "errors": errors }))).into_response();
            secure(r.headers_mut());
            return r;
        }
    };
    let d = &run.drive;
    let req = pb::StartRequest {
        params: Some(pb::PlanParams {
            first_vehicle: run.first_vehicle,
            ..d.load.params(
                run.vehicles,
                web.opts.local_sink && target == default_target,
            )
        }),
        spec: Some(d.spec(&target, run.duration)),
        expect_agents: 0,
    };
    match web.coord.start(req) {
        Ok(reply) => ok(json!({ "run_id": reply.run_id })),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn stop(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if let Some(r) = web.refuse_post(&headers) {
        return r;
    }
    // A ramp started here would only start its next step: it stops with the run.
    if let Some(task) = lock(&web.ramp_task).take() {
        task.abort();
    }
    ok(json!({ "was_running": web.coord.stop() }))
}

async fn rebalance(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if let Some(r) = web.refuse_post(&headers) {
        return r;
    }
    match web.coord.rebalance() {
        Ok((instances, vehicles)) => {
            ok(json!({ "moved_instances": instances, "moved_vehicles": vehicles }))
        }
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

/// The form of "start a ramp".
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RampForm {
    pub steps: String,
    pub step_duration: String,
    pub warmup: String,
    pub interval: String,
    pub max_p95: String,
    pub faults: String,
    pub target: String,
}

async fn start_ramp(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Option<Json<RampForm>>,
) -> Response {
    if let Some(r) = web.refuse_post(&headers) {
        return r;
    }
    if web.opts.grpc_tls {
        return error(
            StatusCode::CONFLICT,
            "this coordinator serves gRPC over TLS: start ramps with `vtox-coord ramp` (they show here as they go)",
        );
    }
    if lock(&web.ramp_task)
        .as_ref()
        .is_some_and(|t| !t.is_finished())
    {
        return error(StatusCode::CONFLICT, "a ramp started here is still running");
    }
    let f = body.map(|b| b.0).unwrap_or_default();
    let fields: [(&'static str, &str, &str); 7] = [
        ("steps", "--steps", &f.steps),
        ("step_duration", "--step-duration", &f.step_duration),
        ("warmup", "--warmup", &f.warmup),
        ("interval", "--interval", &f.interval),
        ("max_p95", "--max-p95", &f.max_p95),
        ("faults", "--faults", &f.faults),
        ("target", "--target", &f.target),
    ];
    let dir = std::env::temp_dir().join(format!("vtox-ramp-{}", std::process::id()));
    let out = dir.join("performance_test_report.json");
    let mut extra = vec!["--out".to_string(), out.to_string_lossy().into_owned()];
    if f.target.trim().is_empty() {
        if let Some(t) = &web.opts.default_target {
            extra.extend(["--target".to_string(), t.clone()]);
        }
    }
    let args = match parse_form("ramp", &[], &fields, &extra, |c: &RampCli| c.ramp.check()) {
        Ok(c) => c.ramp,
        Err(errors) => return form_errors(errors),
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot create {}: {e}", dir.display()),
        );
    }
    let coord = web.opts.grpc.clone();
    let target = args
        .drive
        .target
        .clone()
        .unwrap_or_else(|| DEFAULT_TARGET.to_string());
    let task = tokio::spawn(async move {
        match crate::ramp::ramp(&args, &coord, &target, None).await {
            Ok(code) => tracing::info!(?code, "the ramp started from the dashboard ended"),
            Err(e) => tracing::warn!("the ramp started from the dashboard failed: {e:#}"),
        }
    });
    *lock(&web.ramp_task) = Some(task);
    ok(json!({ "started": true }))
}

async fn ramp_file(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> Response {
    if !web.allowed(&headers) {
        return error(StatusCode::UNAUTHORIZED, "sign in first");
    }
    let Some(board) = web.coord.ramp() else {
        return error(StatusCode::NOT_FOUND, "no ramp has reported yet");
    };
    let (body, kind) = match file.as_str() {
        "performance_test_report.json" => (board.report_json, "application/json"),
        "report.html" => (board.report_html, "text/html; charset=utf-8"),
        "ramp_stats_history.csv" => (board.history_csv, "text/csv; charset=utf-8"),
        _ => return error(StatusCode::NOT_FOUND, format!("no ramp file {file:?}")),
    };
    if body.is_empty() {
        return error(StatusCode::NOT_FOUND, "the ramp has not ended yet");
    }
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    secure(h);
    r
}

/// What a frame carries beside the run: the backend's pipeline, the score and the ramp.
#[derive(Serialize)]
struct FrameOut<'a> {
    #[serde(flatten)]
    frame: &'a vtox::dashboard::Frame,
    pipeline: Option<Value>,
    redis_error: Option<String>,
    score: Option<&'a Value>,
    ramp: Option<Value>,
}

fn ramp_view(b: crate::server::RampBoard) -> Value {
    json!({
        "id": b.id,
        "state": b.state,
        "steps": b.steps,
        "current": b.current,
        "error": b.error,
        "files": !b.report_json.is_empty(),
    })
}

/// How often a Redis that could not be reached is tried again.
const REDIS_RETRY: Duration = Duration::from_secs(10);

/// The producer: a frame a second while a page is open, every `UNWATCHED_FRAME` otherwise.
async fn produce(web: Arc<Web>, redis: Result<Option<BackendRedis>, String>) {
    let (redis, mut redis_down) = match redis {
        Ok(r) => (r, None),
        Err(e) => (None, Some(e)),
    };
    let mut last_try = Instant::now();
    let mut sampler = redis.clone().map(|r| Sampler::start(r, 120));
    let mut scorer = redis;
    let mut score: Option<Value> = None;
    let mut score_from: Option<(String, u64)> = None;
    let mut last_score = Instant::now() - SCORE_EVERY;
    let mut last_frame: Option<Instant> = None;
    let tolerance = web.opts.redis.tolerance();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let watched = web.frames.receiver_count() > 0;
        if !watched && last_frame.is_some_and(|t| t.elapsed() < UNWATCHED_FRAME) {
            continue;
        }
        last_frame = Some(Instant::now());
        if redis_down.is_some() && last_try.elapsed() >= REDIS_RETRY {
            last_try = Instant::now();
            match BackendRedis::connect(&web.opts.redis).await {
                Ok(r) => {
                    sampler = r.clone().map(|r| Sampler::start(r, 120));
                    scorer = r;
                    redis_down = None;
                }
                Err(e) => redis_down = Some(format!("{e:#}")),
            }
        }
        // Merging the status costs about 10 µs per instance histogram, each time anew (every
        // agent's counters move every heartbeat): a page gets a frame a second, but the
        // counters under it are merged at most every 50 merges' time (2 % of a core), between
        // one and five seconds; the frames between keep the last rates.
        let max_age =
            (web.coord.status_cost() * 50).clamp(Duration::from_secs(1), Duration::from_secs(5));
        let status = web.coord.dashboard_status(max_age).await;
        let agents = web.coord.list_agents();
        let epoch = web.coord.epoch();
        let now = crate::backend::unix_now();
        let frame = lock(&web.board).update(&status, &agents, epoch, now);
        // The score follows the run: counted from when this producer first saw it.
        if let Some(r) = &mut scorer {
            if !status.run_id.is_empty()
                && score_from
                    .as_ref()
                    .is_none_or(|(id, _)| *id != status.run_id)
            {
                if let Ok(ms) = r.server_ms().await {
                    score_from = Some((status.run_id.clone(), ms));
                    score = None;
                }
            }
            if watched && last_score.elapsed() >= SCORE_EVERY {
                if let Some((_, from)) = &score_from {
                    last_score = Instant::now();
                    match r.score(Some(*from)).await {
                        Ok(card) => score = Some(card.json()),
                        Err(e) => tracing::debug!("score: {e:#}"),
                    }
                }
            }
        }
        let pipeline = sampler.as_ref().and_then(|s| {
            vtox::backlog::window(&s.newest(30), tolerance)
                .and_then(|w| serde_json::to_value(w).ok())
        });
        let out = FrameOut {
            frame: &frame,
            pipeline,
            redis_error: redis_down
                .clone()
                .or_else(|| sampler.as_ref().and_then(Sampler::error)),
            score: score.as_ref(),
            ramp: web.coord.ramp().map(ramp_view),
        };
        *lock(&web.last_status) = Arc::new(status);
        match serde_json::to_string(&out) {
            Ok(text) => {
                web.frames.send_replace(Arc::from(text));
            }
            Err(e) => tracing::warn!("cannot encode a dashboard frame: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(vehicles: &str) -> RunForm {
        RunForm {
            vehicles: vehicles.into(),
            interval: "1s".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_run_form_is_checked_like_the_command_line_field_by_field() {
        let (run, target) = parse_run_form(&form("234"), "http://sink:8000").unwrap();
        assert_eq!((run.vehicles, target.as_str()), (234, "http://sink:8000"));
        let errors = parse_run_form(&form("0"), "http://sink").unwrap_err();
        assert!(errors["vehicles"].contains("at least 1"), "{errors:?}");
        let mut f = form("10");
        f.interval = "soon".into();
        f.faults = "gremlins=5".into();
        f.target = "ftp://x".into();
        let errors = parse_run_form(&f, "http://sink").unwrap_err();
        assert_eq!(
            errors.keys().copied().collect::<Vec<_>>(),
            ["faults", "interval", "target"],
            "{errors:?}"
        );
        let mut f = form("10");
        f.delivery = "at-most-once".into();
        f.dropouts = "5%/90s".into();
        let errors = parse_run_form(&f, "http://sink").unwrap_err();
        assert!(
            errors["dropouts"].contains("store-and-forward"),
            "{errors:?}"
        );
        assert!(parse_run_form(&form(""), "http://sink")
            .unwrap_err()
            .contains_key("vehicles"));
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; vtox_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        assert_eq!(random_id().unwrap().len(), 64);
        assert_ne!(random_id().unwrap(), random_id().unwrap());
    }
}
