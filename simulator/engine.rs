//! The sending engine: one scheduler task walks a timer wheel of per-vehicle deadlines, builds each
//! message fresh and hands it to a pooled HTTP/1.1 client; a reporter task prints the
//! cumulative counters. One scheduler (not a task per vehicle) keeps 100,000 vehicles to a few
//! tens of megabytes and makes the open-model rule easy to enforce in one place.

use crate::auth::{Login, Tokens};
use crate::{AuthSource, Config};
use anyhow::Result;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use vtox::fleet::model_of;
use vtox::ingest::{iso_utc, simulator_path, unix_secs, vehicle_path, BodyTemplate, MessageFields};
use vtox::metrics::{Failures, Latency, SimReport};
use vtox::schedule::TimerWheel;
use vtox::telemetry::{Sample, VehicleModel};

use crate::lanes::{Job, LaneConfig, Lanes};
use crate::tally::{self, Tally};
use vtox::http1::RequestBuf;

/// Most ticks handled before the scheduler yields, so that response handling on the same
/// core is never starved by a long burst of due ticks.
const BURST: usize = 64;

struct Vehicle {
    model: VehicleModel,
    template: BodyTemplate,
    /// Request target in origin form: the path and query; the Host header names the target.
    path: Box<str>,
    next_k: u64,
}

/// Counters shared by the scheduler, the lanes and the reporter.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub dropped: AtomicU64,
    /// Of `dropped`: ticks that found every connection busy.
    pub dropped_busy: AtomicU64,
    /// Lanes opened so far: each holds at most one connection, and lanes are never closed, so
    /// this is the most connections the instance has had open at once.
    pub lanes: AtomicU64,
    pub bytes: AtomicU64,
    pub in_flight: AtomicU64,
    pub timeout: AtomicU64,
    /// Of `timeout`: the request never went out whole.
    pub timeout_unsent: AtomicU64,
    /// Timed-out requests the target answered 200 after all (within `--late-window`).
    pub late_accepted: AtomicU64,
    /// Timed-out connections still watched for a late answer.
    pub late_pending: AtomicU64,
    pub connect: AtomicU64,
    pub protocol: AtomicU64,
    pub tls: AtomicU64,
    pub active: AtomicU64,
    /// Logins done with `--login` (the first and each renewal).
    pub logins: Arc<AtomicU64>,
    pub max_lag_us: AtomicU64,
    status: Mutex<BTreeMap<u16, u64>>,
    latency: Mutex<Latency>,
    /// The crash-proof copy of the totals, when `--tally` is given.
    pub tally: Option<Tally>,
}

impl Counters {
    fn snapshot(&self, cfg: &Config, started: Instant, is_final: bool) -> SimReport {
        let latency = match self.latency.lock() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let status = match self.status.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let failures = Failures {
            status,
            timeout: self.timeout.load(Relaxed),
            timeout_unsent: self.timeout_unsent.load(Relaxed),
            connect: self.connect.load(Relaxed),
            protocol: self.protocol.load(Relaxed),
            tls: self.tls.load(Relaxed),
        };
        SimReport {
            is_final,
            agent: cfg.agent.clone(),
            instance: cfg.args.instance,
            first_vehicle: cfg.args.first_vehicle,
            vehicles: cfg.args.vehicles,
            ts: unix_secs(SystemTime::now()),
            elapsed_s: started.elapsed().as_secs_f64(),
            sent: self.sent.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            late_accepted: self.late_accepted.load(Relaxed),
            failed: failures.total(),
            failures,
            dropped: self.dropped.load(Relaxed),
            dropped_busy: self.dropped_busy.load(Relaxed),
            connections: self.lanes.load(Relaxed) + self.late_pending.load(Relaxed),
            logins: self.logins.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            active_vehicles: self.active.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            max_lag_ms: self.max_lag_us.swap(0, Relaxed) as f64 / 1000.0,
            p50_ms: latency.quantile_ms(0.50),
            p95_ms: latency.quantile_ms(0.95),
            p99_ms: latency.quantile_ms(0.99),
            max_ms: latency.max_ms(),
            latency: latency.encode(),
        }
    }

    pub fn record_latency(&self, us: u64) {
        match self.latency.lock() {
            Ok(mut l) => l.record_us(us),
            Err(poisoned) => poisoned.into_inner().record_us(us),
        }
    }

    pub fn tally(&self, slot: usize, n: u64) {
        if let Some(t) = &self.tally {
            t.add(slot, n);
        }
    }

    pub fn record_status(&self, code: u16) {
        match self.status.lock() {
            Ok(mut s) => *s.entry(code).or_default() += 1,
            Err(poisoned) => *poisoned.into_inner().entry(code).or_default() += 1,
        }
    }
}

fn emit(report: &SimReport) {
    match serde_json::to_string(report) {
        Ok(line) => {
            let mut out = std::io::stdout().lock();
            // A closed stdout means nobody reads the metrics; the run itself goes on.
            let _ = writeln!(out, "{line}").and_then(|_| out.flush());
        }
        Err(e) => tracing::warn!("cannot serialize a metric line: {e}"),
    }
}

/// The final line of a run stopped before it sent anything.
fn finish_early(cfg: &Config) -> Result<()> {
    emit(&Counters::default().snapshot(cfg, Instant::now(), true));
    Ok(())
}

pub async fn run(mut cfg: Config, mut stop: watch::Receiver<bool>) -> Result<()> {
    let auth = cfg.auth.take();
    let cfg = Arc::new(cfg);
    let args = &cfg.args;

    let schedule = cfg.schedule;
    let interval_ns = (schedule.interval_s() * 1e9) as i64;
    let origin = Instant::now();
    // Seconds since the run start at `origin`; negative when the run starts in the future.
    let origin_rel_ns: i64 = match SystemTime::now().duration_since(cfg.run_start) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    };
    let rel_now_ns = move || origin_rel_ns + origin.elapsed().as_nanos() as i64;

    if origin_rel_ns < 0 {
        // The run starts in the future (a coordinated start): wait for it, so that every
        // first deadline lies within one interval, as the timer wheel requires.
        tracing::info!(
            in_s = -origin_rel_ns as f64 / 1e9,
            "waiting for the run start"
        );
        tokio::select! {
            _ = stop.changed() => return finish_early(&cfg),
            _ = tokio::time::sleep(Duration::from_nanos((-origin_rel_ns) as u64)) => {}
        }
    }
    let first = args.first_vehicle;
    let now_ns = rel_now_ns();
    let now_s = now_ns as f64 / 1e9;
    let jitter_span = (schedule.interval_s() * (1.0 + args.jitter) * 1e9) as i64;
    let mut wheel = TimerWheel::new(now_ns, jitter_span + 2_000_000);
    let mut vehicles = Vec::with_capacity(args.vehicles as usize);
    for i in 0..args.vehicles {
        let n = first + i;
        let id = cfg.template.render(n);
        let route = match auth {
            Some(_) => vehicle_path(&id),
            None => simulator_path(&id, model_of(n).city),
        };
        let path = format!("{}{}", cfg.path_prefix, route);
        let k = schedule.first_tick_from(n, now_s);
        wheel.insert((schedule.tick_time(n, k) * 1e9) as i64, i as u32);
        vehicles.push(Vehicle {
            model: VehicleModel::new(args.seed, n, &cfg.faults),
            template: BodyTemplate::new(&id, model_of(n).name, &cfg.agent, args.instance),
            path: path.into_boxed_str(),
            next_k: k,
        });
    }
    tracing::info!(
        vehicles = args.vehicles,
        first_vehicle = first,
        target = %cfg.base,
        rate_per_s = args.vehicles as f64 / schedule.interval_s(),
        "sending"
    );

    let counters = Arc::new(Counters {
        tally: args.tally.as_deref().and_then(|p| {
            let t = Tally::create(p);
            if t.is_none() {
                tracing::warn!(path = %p.display(), "cannot map the tally file; counts of a killed run may be short");
            }
            t
        }),
        ..Default::default()
    });
    let tokens = match auth {
        None => None,
        Some(AuthSource::Tokens(t)) => Some(t),
        Some(AuthSource::Login(spec)) => {
            let login = tokio::select! {
                _ = stop.changed() => return finish_early(&cfg),
                l = Login::start(*spec, counters.logins.clone()) => l?,
            };
            Some(Tokens::Login(login))
        }
    };
    let mut lanes = Lanes::new(
        LaneConfig {
            host: cfg.host.clone(),
            port: cfg.port,
            timeout: args.timeout,
            late_window: args.late_window,
            idle_limit: args.idle_timeout,
            tls: cfg.tls.clone(),
            login: match &tokens {
                Some(Tokens::Login(l)) => Some(l.clone()),
                _ => None,
            },
            max: args.max_in_flight,
        },
        counters.clone(),
    );
    counters.active.store(args.vehicles, Relaxed);
    let started = Instant::now();
    let (done_tx, mut done_rx) = watch::channel(false);
    let reporter = {
        let (counters, cfg) = (counters.clone(), cfg.clone());
        let every = args.report_every;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = ticker.tick() => emit(&counters.snapshot(&cfg, started, false)),
                    _ = done_rx.changed() => break,
                }
            }
        })
    };

    let end = args
        .duration
        .map(|d| tokio::time::Instant::from_std(started + d));
    let fs = args.sampling_rate as f64;
    let points = args.batch_size;
    let batch_span_ns = ((points - 1) as f64 / fs * 1e9) as i64;
    let mut samples: Vec<Sample> = Vec::with_capacity(points);
    let mut body_cap = 1024;

    let mut due: Vec<u32> = Vec::with_capacity(BURST);
    'schedule: while let Some(next_ns) = wheel.next_due_ns() {
        let wake = origin + Duration::from_nanos((next_ns - origin_rel_ns).max(0) as u64);
        if wake > Instant::now() {
            let wake = tokio::time::Instant::from_std(wake);
            tokio::select! {
                biased;
                _ = stop.changed() => break 'schedule,
                _ = async { match end { Some(e) => tokio::time::sleep_until(e).await, None => std::future::pending().await } } => break 'schedule,
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        if *stop.borrow() || end.is_some_and(|e| tokio::time::Instant::now() >= e) {
            break;
        }
        let now_ns = rel_now_ns();
        due.clear();
        wheel.pop_due(now_ns, BURST, &mut due);
        for &idx in &due {
            let v = &mut vehicles[idx as usize];
            let n = first + idx as u64;
            let k = v.next_k;
            v.next_k += 1;
            let due_ns = (schedule.tick_time(n, k) * 1e9) as i64;
            wheel.insert((schedule.tick_time(n, k + 1) * 1e9) as i64, idx);

            let lag_ns = now_ns - due_ns;
            counters
                .max_lag_us
                .fetch_max((lag_ns / 1000).max(0) as u64, Relaxed);
            // More than an interval behind means the generator cannot keep the schedule;
            // sending late ticks in a burst would misstate the load, so they count as dropped.
            let late = lag_ns > interval_ns;
            if late || !lanes.has_room() {
                counters.dropped.fetch_add(1, Relaxed);
                counters.tally(tally::TALLY_DROPPED, 1);
                if !late {
                    counters.dropped_busy.fetch_add(1, Relaxed);
                }
                continue;
            }

            let wall = SystemTime::now();
            let t_rel = (now_ns - batch_span_ns) as f64 / 1e9;
            let t_abs = unix_secs(wall) - batch_span_ns as f64 / 1e9;
            let truth = v.model.message(t_rel, t_abs, fs, points, &mut samples);
            let sent_at = iso_utc(wall);
            let fields = MessageFields {
                seq: k,
                fault_type: truth.kind.as_str(),
                fault_severity: truth.severity,
                sent_at: &sent_at,
                sampling_rate: args.sampling_rate,
            };
            let token = tokens.as_ref().map(|t| t.token(idx as usize));
            let token_len = token.as_ref().map_or(0, |(_, t)| t.len() + 24);
            let mut req = RequestBuf::new(body_cap, v.path.len(), cfg.authority.len() + token_len);
            v.template.write(req.body(), &samples, &fields);
            let body_len = req.body_len();
            body_cap = body_cap.max(body_len + 64);
            let (bytes, start) =
                req.finish_with_bearer(&v.path, &cfg.authority, token.as_ref().map(|(_, t)| &**t));
            let job = Job {
                bytes,
                start,
                created: Instant::now(),
                auth_gen: token.map_or(0, |(g, _)| g),
            };
            match lanes.dispatch(job) {
                Ok(()) => {
                    counters.sent.fetch_add(1, Relaxed);
                    counters.bytes.fetch_add(body_len as u64, Relaxed);
                    counters.tally(tally::TALLY_SENT, 1);
                    counters.tally(tally::TALLY_BYTES, body_len as u64);
                }
                Err(_) => {
                    counters.dropped.fetch_add(1, Relaxed);
                    counters.dropped_busy.fetch_add(1, Relaxed);
                    counters.tally(tally::TALLY_DROPPED, 1);
                }
            }
        }
        if due.len() == BURST {
            tokio::task::yield_now().await;
        }
    }

    // Closing the lanes' channels lets each finish its request in flight, then exit.
    drop(lanes);
    counters.active.store(0, Relaxed);
    let outstanding = || counters.in_flight.load(Relaxed) + counters.late_pending.load(Relaxed);
    if outstanding() > 0 {
        tracing::info!(
            in_flight = counters.in_flight.load(Relaxed),
            late_pending = counters.late_pending.load(Relaxed),
            "waiting for outstanding requests"
        );
    }
    // Requests in flight end by themselves within a timeout; the late answers they may turn
    // into get at most one timeout more, not the whole late window: a target that stays
    // silent must not hold a stop (the agent's patience, `vtox::process::stop_grace`).
    let drain_end = Instant::now()
        + args.timeout
        + args.timeout.min(args.late_window)
        + Duration::from_millis(200);
    while outstanding() > 0 && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = done_tx.send(true);
    let _ = reporter.await;
    let report = counters.snapshot(&cfg, started, true);
    tracing::info!(
        sent = report.sent,
        accepted = report.accepted,
        failed = report.failed,
        dropped = report.dropped,
        "stopped"
    );
    emit(&report);
    Ok(())
}
