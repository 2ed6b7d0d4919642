//! The sending engine: one scheduler task walks a timer wheel of per-vehicle deadlines, makes
//! each vehicle's message at its tick and hands it to a pooled HTTP/1.1 client; a reporter
//! task prints the cumulative counters. One scheduler (not a task per vehicle) keeps 100,000
//! vehicles to a few tens of megabytes. At most once, a tick is sent now or dropped;
//! store-and-forward, `vtox::delivery::forward::Forwarder` decides what goes out when, and the
//! lanes tell it every outcome.

use crate::auth::{Login, Tokens};
use crate::config::{AuthSource, Config};
use crate::counters::Counters;
use crate::lanes::{Done, LaneConfig, Lanes};
use crate::maker::{Clock, Maker, Vehicle};
use anyhow::Result;
use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch};
use vtox::counters::Counter;
use vtox::counters::SimReport;
use vtox::delivery::forward::{Forwarder, Uplink};
use vtox::delivery::{Delivery, Pending};
use vtox::fleet::model_of;
use vtox::ingest::{simulator_path, unix_secs, vehicle_path, BodyTemplate, IsoStamp};
use vtox::schedule::{Schedule, TimerWheel};
use vtox::telemetry::VehicleModel;

/// Why the schedule stopped (none while it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT or SIGTERM.
    Signal,
    /// The agent went quiet or away (stdin silent past the lease, or closed).
    LeaseLost,
}

/// Most ticks handled before the scheduler yields, so that response handling on the same
/// core is never starved by a long burst of due ticks.
const BURST: usize = 64;

/// Vehicles of the slice out of coverage now: exact, as outages are a pure function of the
/// vehicle and the time (100,000 vehicles take about a millisecond).
fn offline_now(cfg: &Config) -> u64 {
    let Some(d) = &cfg.dropouts else {
        return 0;
    };
    let t = unix_secs(SystemTime::now()) - unix_secs(cfg.run_start);
    let first = cfg.args.first_vehicle;
    (first..first + cfg.args.vehicles)
        .filter(|&n| d.is_offline(n, t))
        .count() as u64
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

fn snapshot(counters: &Counters, cfg: &Config, started: Instant, is_final: bool) -> SimReport {
    let who = crate::counters::Who {
        agent: cfg.agent.clone(),
        instance: cfg.args.instance,
        first_vehicle: cfg.args.first_vehicle,
        vehicles: cfg.args.vehicles,
    };
    counters.snapshot(&who, started, is_final, offline_now(cfg))
}

/// The final line of a run stopped before it sent anything.
fn finish_early(cfg: &Config) -> Result<()> {
    emit(&snapshot(&Counters::default(), cfg, Instant::now(), true));
    Ok(())
}

/// The connections as the forwarder sees them: a message goes out as a request the maker
/// builds for its vehicle.
struct Up<'a> {
    vehicles: &'a [Vehicle],
    maker: &'a mut Maker,
    lanes: &'a mut Lanes,
    counters: &'a Counters,
    schedule: &'a Schedule,
    first: u64,
}

impl Up<'_> {
    fn count_sent(&self, body_len: usize) {
        self.counters.add(Counter::Sent, 1);
        self.counters.add(Counter::Bytes, body_len as u64);
    }

    fn due_ns(&self, idx: u32, seq: u64) -> i64 {
        (self.schedule.tick_time(self.first + u64::from(idx), seq) * 1e9) as i64
    }
}

impl Uplink for Up<'_> {
    fn has_room(&self) -> bool {
        self.lanes.has_room()
    }

    fn send(&mut self, idx: u32, p: &Pending, waited: bool) -> bool {
        let due_ns = self.due_ns(idx, p.seq);
        let Some(v) = self.vehicles.get(idx as usize) else {
            return false;
        };
        let (job, body_len) = self
            .maker
            .job(v, idx, p.seq, due_ns, f64::from(p.temp_c), waited);
        match self.lanes.dispatch(job) {
            Ok(()) => {
                self.count_sent(body_len);
                true
            }
            Err(_) => false,
        }
    }

    fn count(&mut self, c: Counter, n: u64) {
        self.counters.add(c, n);
    }
}

struct Engine {
    vehicles: Vec<Vehicle>,
    first: u64,
    schedule: Schedule,
    counters: Arc<Counters>,
    lanes: Lanes,
    maker: Maker,
    /// Store-and-forward; None at most once.
    forward: Option<Forwarder>,
}

impl Engine {
    /// Splits the engine into the forwarder and the connections it sends through.
    fn split(&mut self) -> (Option<&mut Forwarder>, Up<'_>) {
        (
            self.forward.as_mut(),
            Up {
                vehicles: &self.vehicles,
                maker: &mut self.maker,
                lanes: &mut self.lanes,
                counters: &self.counters,
                schedule: &self.schedule,
                first: self.first,
            },
        )
    }

    /// The tick `k` of vehicle `idx`, due at `due_ns`, reached at `now_ns`.
    fn tick(&mut self, idx: u32, k: u64, due_ns: i64, now_ns: i64) {
        let span = self.maker.batch_span_ns;
        let Some(v) = self.vehicles.get_mut(idx as usize) else {
            return;
        };
        let temp_c = v.model.advance((due_ns - span) as f64 / 1e9);
        let (forward, mut up) = self.split();
        match forward {
            Some(f) => f.make(idx, k, temp_c, due_ns, now_ns, &mut up),
            None => {
                // At most once: the message goes out now, or is dropped.
                let sent = up.has_room()
                    && up.send(
                        idx,
                        &Pending {
                            seq: k,
                            temp_c: temp_c as f32,
                            attempts: 0,
                            unknown: false,
                        },
                        false,
                    );
                if !sent {
                    up.count(Counter::Dropped, 1);
                    up.count(Counter::DroppedBusy, 1);
                }
            }
        }
    }

    fn done(&mut self, d: Done, now_ns: i64) {
        if let (Some(f), mut up) = self.split() {
            f.done(d.vehicle, d.outcome, now_ns, &mut up);
        }
    }

    fn wake_due(&mut self, now_ns: i64) {
        if let (Some(f), mut up) = self.split() {
            f.wake_due(now_ns, &mut up);
        }
    }

    fn publish(&self) {
        if let Some(f) = &self.forward {
            self.counters.c.store(Counter::Buffered, f.buffered());
        }
    }
}

/// The run's clock, anchored at the run start (which may lie ahead: a coordinated start).
fn clock_of(cfg: &Config) -> Clock {
    let origin = Instant::now();
    // Nanoseconds since the run start at `origin`; negative when the run starts in the future.
    let origin_rel_ns: i64 = match SystemTime::now().duration_since(cfg.run_start) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    };
    Clock {
        origin,
        origin_rel_ns,
        start_unix: unix_secs(cfg.run_start),
    }
}

/// Every vehicle of the slice, and the wheel of their first ticks.
fn vehicles(cfg: &Config, login: bool, clock: &Clock) -> (Vec<Vehicle>, TimerWheel) {
    let args = &cfg.args;
    let schedule = cfg.schedule;
    let interval_ns = (schedule.interval_s() * 1e9) as i64;
    let now_ns = clock.now_ns();
    // A process that starts the run (not one restarted in its middle) drives every vehicle
    // from seq 0, also those whose first tick fell in the moments before it was up (or, with
    // jitter, just before the run start), so that no vehicle's stream begins with a gap.
    let now_s = if now_ns < interval_ns / 2 {
        f64::NEG_INFINITY
    } else {
        now_ns as f64 / 1e9
    };
    let jitter_span = (schedule.interval_s() * (1.0 + args.jitter) * 1e9) as i64;
    let mut wheel = TimerWheel::new(now_ns, jitter_span + 2_000_000);
    let mut out = Vec::with_capacity(args.vehicles as usize);
    for i in 0..args.vehicles {
        let n = args.first_vehicle + i;
        let id = cfg.template.render(n);
        let route = if login {
            vehicle_path(&id)
        } else {
            simulator_path(&id, model_of(n).city)
        };
        let k = schedule.first_tick_from(n, now_s);
        wheel.insert((schedule.tick_time(n, k) * 1e9) as i64, i as u32);
        out.push(Vehicle {
            model: VehicleModel::new(args.seed, n, &cfg.faults),
            template: BodyTemplate::new(&id, model_of(n).name, &cfg.agent, args.instance),
            path: format!("{}{}", cfg.path_prefix, route).into_boxed_str(),
            next_k: k,
        });
    }
    (out, wheel)
}

/// The counters, with the tally file when `--tally` names one.
fn counters_of(cfg: &Config) -> Arc<Counters> {
    let tally = cfg.args.tally.as_deref().and_then(|p| {
        let t = crate::tally::Tally::create(p);
        if t.is_none() {
            tracing::warn!(path = %p.display(), "cannot map the tally file; counts of a killed run may be short");
        }
        t
    });
    Arc::new(Counters::new(
        tally.map(|t| Box::new(t) as Box<dyn vtox::counters::TallySink>),
    ))
}

/// The reporter: a metric line every `--report-every` until `done` fires.
fn reporter(
    counters: Arc<Counters>,
    cfg: Arc<Config>,
    started: Instant,
    mut done: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let every = cfg.args.report_every;
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticker.tick() => emit(&snapshot(&counters, &cfg, started, false)),
                _ = done.changed() => break,
            }
        }
    })
}

pub async fn run(mut cfg: Config, mut stop: watch::Receiver<Option<Stop>>) -> Result<()> {
    let auth = cfg.auth.take();
    let cfg = Arc::new(cfg);
    let clock = clock_of(&cfg);
    if clock.origin_rel_ns < 0 {
        // The run starts in the future (a coordinated start): wait for it, so that every
        // first deadline lies within one interval, as the timer wheel requires.
        let wait = (-clock.origin_rel_ns) as u64;
        tracing::info!(in_s = wait as f64 / 1e9, "waiting for the run start");
        tokio::select! {
            _ = stop.changed() => return finish_early(&cfg),
            _ = tokio::time::sleep(Duration::from_nanos(wait)) => {}
        }
    }
    let counters = counters_of(&cfg);
    let tokens = match auth {
        None => None,
        Some(AuthSource::Tokens(t)) => Some(t),
        Some(AuthSource::Login(spec)) => {
            let login = tokio::select! {
                _ = stop.changed() => return finish_early(&cfg),
                l = Login::start(*spec, counters.clone()) => l?,
            };
            Some(Tokens::Login(login))
        }
    };
    let (vehicles, wheel) = vehicles(&cfg, tokens.is_some(), &clock);
    let args = &cfg.args;
    tracing::info!(
        vehicles = args.vehicles,
        first_vehicle = args.first_vehicle,
        target = %cfg.base,
        rate_per_s = args.vehicles as f64 / cfg.schedule.interval_s(),
        delivery = args.delivery.name(),
        "sending"
    );
    let forward = args.delivery == Delivery::StoreAndForward;
    let (outcomes_tx, outcomes) = mpsc::unbounded_channel::<Done>();
    let lanes = Lanes::new(
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
            done: forward.then_some(outcomes_tx),
        },
        counters.clone(),
    );
    counters.c.store(Counter::ActiveVehicles, args.vehicles);
    let started = Instant::now();
    let (done_tx, done_rx) = watch::channel(false);
    let reporter = reporter(counters.clone(), cfg.clone(), started, done_rx);
    let fs = f64::from(args.sampling_rate);
    let points = args.batch_size;
    let mut engine = Engine {
        vehicles,
        first: args.first_vehicle,
        schedule: cfg.schedule,
        counters: counters.clone(),
        lanes,
        maker: Maker {
            cfg: cfg.clone(),
            clock,
            tokens,
            fs,
            points,
            batch_span_ns: ((points - 1) as f64 / fs * 1e9) as i64,
            samples: Vec::with_capacity(points),
            body_cap: 1024,
            sent_at: IsoStamp::default(),
            made_at: IsoStamp::default(),
        },
        forward: forward.then(|| {
            Forwarder::new(
                args.vehicles as usize,
                args.first_vehicle,
                args.seed,
                args.buffer,
                cfg.dropouts,
            )
        }),
    };
    let end = args
        .duration
        .map(|d| tokio::time::Instant::from_std(started + d));
    let outcomes = schedule(&mut engine, wheel, clock, outcomes, end, &mut stop).await;
    drain(engine, outcomes, &cfg).await;
    let _ = done_tx.send(true);
    let _ = reporter.await;
    let report = snapshot(&counters, &cfg, started, true);
    tracing::info!(
        sent = report.sent,
        accepted = report.accepted,
        failed = report.failed,
        dropped = report.dropped,
        buffered = report.buffered,
        "stopped"
    );
    emit(&report);
    Ok(())
}

/// The schedule, until the run's end or a stop: every due tick is made and sent (or dropped
/// when the generator reached it more than an interval late), and outcomes and wakes are
/// handled between ticks. Returns the outcomes' receiver for the drain.
async fn schedule(
    engine: &mut Engine,
    mut wheel: TimerWheel,
    clock: Clock,
    mut outcomes: mpsc::UnboundedReceiver<Done>,
    end: Option<tokio::time::Instant>,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> mpsc::UnboundedReceiver<Done> {
    let forward = engine.forward.is_some();
    let interval_ns = (engine.schedule.interval_s() * 1e9) as i64;
    let mut due: Vec<u32> = Vec::with_capacity(BURST);
    while let Some(next_tick) = wheel.next_due_ns() {
        let next_ns = match engine.forward.as_ref().and_then(Forwarder::next_wake) {
            Some(at) => next_tick.min(at),
            None => next_tick,
        };
        let wake = clock.instant(next_ns);
        if wake > Instant::now() {
            let wake = tokio::time::Instant::from_std(wake);
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = async { match end { Some(e) => tokio::time::sleep_until(e).await, None => std::future::pending().await } } => break,
                Some(d) = outcomes.recv(), if forward => engine.done(d, clock.now_ns()),
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        if stop.borrow().is_some() || end.is_some_and(|e| tokio::time::Instant::now() >= e) {
            break;
        }
        let now_ns = clock.now_ns();
        if forward {
            while let Ok(d) = outcomes.try_recv() {
                engine.done(d, now_ns);
            }
            engine.wake_due(now_ns);
        }
        due.clear();
        wheel.pop_due(now_ns, BURST, &mut due);
        for &idx in &due {
            let Some(v) = engine.vehicles.get_mut(idx as usize) else {
                continue;
            };
            let n = engine.first + u64::from(idx);
            let k = v.next_k;
            v.next_k += 1;
            let due_ns = (engine.schedule.tick_time(n, k) * 1e9) as i64;
            wheel.insert((engine.schedule.tick_time(n, k + 1) * 1e9) as i64, idx);
            let lag_ns = now_ns - due_ns;
            let c = &engine.counters;
            c.max_lag_us
                .fetch_max((lag_ns / 1000).max(0) as u64, Relaxed);
            c.add(Counter::Produced, 1);
            // More than an interval behind means the generator cannot keep the schedule;
            // sending late ticks in a burst would misstate the load, so they count as dropped
            // (the generator's own evidence, in either delivery mode).
            if lag_ns > interval_ns {
                c.add(Counter::Dropped, 1);
                continue;
            }
            engine.tick(idx, k, due_ns, now_ns);
        }
        engine.publish();
        if due.len() == BURST {
            tokio::task::yield_now().await;
        }
    }
    outcomes
}

/// After the schedule: the lanes finish their requests in flight (and the late answers they
/// wait for, up to one timeout more), and what is left in the buffers is said, not lost.
async fn drain(engine: Engine, mut outcomes: mpsc::UnboundedReceiver<Done>, cfg: &Config) {
    let Engine {
        lanes,
        mut forward,
        counters,
        ..
    } = engine;
    // Closing the lanes' channels lets each finish its request in flight, then exit.
    drop(lanes);
    counters.c.store(Counter::ActiveVehicles, 0);
    let outstanding = || counters.in_flight.load(Relaxed) + counters.late_pending.load(Relaxed);
    if outstanding() > 0 {
        tracing::info!(
            in_flight = counters.in_flight.load(Relaxed),
            late_pending = counters.late_pending.load(Relaxed),
            "waiting for outstanding requests"
        );
    }
    // A target that stays silent must not hold a stop past the agent's patience
    // (`vtox::process::stop_grace`).
    let args = &cfg.args;
    let drain_end = Instant::now()
        + args.timeout
        + args.timeout.min(args.late_window)
        + Duration::from_millis(200);
    while outstanding() > 0 && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(f) = &mut forward {
        let mut last = Vec::new();
        while let Ok(d) = outcomes.try_recv() {
            last.push((d.vehicle, d.outcome));
        }
        let left = f.finish(last);
        counters.c.store(Counter::Buffered, left);
        if left > 0 {
            tracing::warn!(
                buffered = left,
                "messages still in vehicles' buffers at the end were never delivered"
            );
        }
    }
}
