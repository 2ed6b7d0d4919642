//! The sending engine: one scheduler task walks a timer wheel of per-vehicle deadlines, makes
//! each vehicle's message at its tick and hands it to a pooled HTTP/1.1 client; a reporter
//! task prints the cumulative counters. One scheduler (not a task per vehicle) keeps 100,000
//! vehicles to a few tens of megabytes and keeps each delivery rule in one place: at most
//! once (send now or drop), or store-and-forward (each vehicle's `Modem` decides what goes
//! out when; the lanes tell it every outcome).

use crate::auth::{Login, Tokens};
use crate::{AuthSource, Config};
use anyhow::Result;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use vtox::delivery::{backoff, Delivery, Modem, Pending, Settled};
use vtox::fleet::model_of;
use vtox::ingest::{
    simulator_path, unix_secs, vehicle_path, BodyTemplate, IsoStamp, MessageFields,
};
use vtox::metrics::{Failures, Latency, SimReport};
use vtox::schedule::TimerWheel;
use vtox::telemetry::{Sample, VehicleModel};

use crate::lanes::{Done, Job, LaneConfig, Lanes};
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
    /// Store-and-forward: the vehicle's buffer and upload.
    modem: Modem,
    /// Waiting in the queue for a free connection.
    waiting_lane: bool,
    /// Out of coverage when last looked at.
    offline: bool,
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
    pub produced: AtomicU64,
    pub buffered: AtomicU64,
    pub retried: AtomicU64,
    pub buffer_dropped: AtomicU64,
    pub delivered_late: AtomicU64,
    pub resent_after_timeout: AtomicU64,
    pub discarded: AtomicU64,
    pub offline_ticks: AtomicU64,
    status: Mutex<BTreeMap<u16, u64>>,
    histograms: Mutex<Histograms>,
    /// The crash-proof copy of the totals, when `--tally` is given.
    pub tally: Option<Tally>,
}

/// The histograms, under one lock: an answer records into two or three of them at once.
#[derive(Default)]
struct Histograms {
    latency: Latency,
    delay: Latency,
    late_age: Latency,
}

impl Counters {
    fn snapshot(&self, cfg: &Config, started: Instant, is_final: bool) -> SimReport {
        let (latency, delay, late_age) = {
            let h = match self.histograms.lock() {
                Ok(h) => h,
                Err(poisoned) => poisoned.into_inner(),
            };
            (h.latency.clone(), h.delay.clone(), h.late_age.clone())
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
            produced: self.produced.load(Relaxed),
            buffered: self.buffered.load(Relaxed),
            retried: self.retried.load(Relaxed),
            buffer_dropped: self.buffer_dropped.load(Relaxed),
            delivered_late: self.delivered_late.load(Relaxed),
            resent_after_timeout: self.resent_after_timeout.load(Relaxed),
            discarded: self.discarded.load(Relaxed),
            offline: offline_now(cfg),
            offline_ticks: self.offline_ticks.load(Relaxed),
            delay_p50_ms: delay.quantile_ms(0.50),
            delay_p95_ms: delay.quantile_ms(0.95),
            delay_p99_ms: delay.quantile_ms(0.99),
            delay: delay.encode(),
            late_age: late_age.encode(),
        }
    }

    /// An answer (of any status) to `job`: its service time, its delay since the message was
    /// due, and for a buffered message that was accepted, its age at delivery.
    pub fn record_answer(&self, job: &Job, status: u16) {
        let now = Instant::now();
        let us = |since: Instant| now.saturating_duration_since(since).as_micros() as u64;
        let late = job.waited && status == 200;
        {
            let mut h = match self.histograms.lock() {
                Ok(h) => h,
                Err(poisoned) => poisoned.into_inner(),
            };
            h.latency.record_us(us(job.created));
            h.delay.record_us(us(job.due));
            if late {
                h.late_age.record_us(us(job.due));
            }
        }
        if late {
            self.delivered_late.fetch_add(1, Relaxed);
            self.tally(tally::TALLY_DELIVERED_LATE, 1);
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

/// The final line of a run stopped before it sent anything.
fn finish_early(cfg: &Config) -> Result<()> {
    emit(&Counters::default().snapshot(cfg, Instant::now(), true));
    Ok(())
}

/// Times of the run: `ns` are nanoseconds since the run start, as the schedule counts them.
#[derive(Clone, Copy)]
struct Clock {
    origin: Instant,
    /// Nanoseconds since the run start at `origin`; negative when the run starts later.
    origin_rel_ns: i64,
    /// The run start as Unix seconds.
    start_unix: f64,
}

impl Clock {
    fn now_ns(&self) -> i64 {
        self.origin_rel_ns + self.origin.elapsed().as_nanos() as i64
    }

    /// The instant `ns` after the run start.
    fn instant(&self, ns: i64) -> Instant {
        let d = ns - self.origin_rel_ns;
        if d >= 0 {
            self.origin + Duration::from_nanos(d as u64)
        } else {
            self.origin
                .checked_sub(Duration::from_nanos(d.unsigned_abs()))
                .unwrap_or(self.origin)
        }
    }
}

/// What the scheduler needs to make and send a message.
struct Maker {
    cfg: Arc<Config>,
    clock: Clock,
    tokens: Option<Tokens>,
    fs: f64,
    points: usize,
    /// From the first sample of a message to its last: a message made at its tick carries
    /// the samples of the batch that just ended.
    batch_span_ns: i64,
    samples: Vec<Sample>,
    body_cap: usize,
    sent_at: IsoStamp,
    made_at: IsoStamp,
}

impl Maker {
    /// The job of sending message `seq` of vehicle `idx`, made at its scheduled time `due_ns`
    /// with winding temperature `temp_c`, and its body's length; `waited` when it did not go
    /// out as it was made (its `timestamp` is then when it was made, not when it was sent).
    fn job(
        &mut self,
        v: &Vehicle,
        idx: u32,
        seq: u64,
        due_ns: i64,
        temp_c: f64,
        waited: bool,
    ) -> (Job, usize) {
        let t_rel_ns = due_ns - self.batch_span_ns;
        let t_rel = t_rel_ns as f64 / 1e9;
        let t_abs = self.clock.start_unix + t_rel;
        let truth = v.model.render(
            seq,
            t_rel,
            t_abs,
            temp_c,
            self.fs,
            self.points,
            &mut self.samples,
        );
        let sent_at = self.sent_at.at(SystemTime::now());
        let made_at = if waited {
            let made = (self.clock.start_unix + due_ns as f64 / 1e9).max(0.0);
            self.made_at
                .at(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(made))
        } else {
            sent_at
        };
        let fields = MessageFields {
            seq,
            fault_type: truth.kind.as_str(),
            fault_severity: truth.severity,
            sent_at,
            made_at,
            sampling_rate: self.cfg.args.sampling_rate,
        };
        let token = self.tokens.as_ref().map(|t| t.token(idx as usize));
        let token_len = token.as_ref().map_or(0, |(_, t)| t.len() + 24);
        let mut req = RequestBuf::new(
            self.body_cap,
            v.path.len(),
            self.cfg.authority.len() + token_len,
        );
        v.template.write(req.body(), &self.samples, &fields);
        let body_len = req.body_len();
        self.body_cap = self.body_cap.max(body_len + 64);
        let (bytes, start) = req.finish_with_bearer(
            &v.path,
            &self.cfg.authority,
            token.as_ref().map(|(_, t)| &**t),
        );
        let job = Job {
            bytes,
            start,
            created: Instant::now(),
            due: self.clock.instant(due_ns),
            vehicle: idx,
            waited,
            auth_gen: token.map_or(0, |(g, _)| g),
        };
        (job, body_len)
    }
}

/// Store-and-forward bookkeeping across the fleet: what waits for a time (a retry, a return
/// to coverage) and what waits for a connection.
#[derive(Default)]
struct Forwarding {
    /// (ns since the run start, vehicle): when to look at a vehicle again.
    wakes: BinaryHeap<Reverse<(i64, u32)>>,
    /// Vehicles with a message ready and no free connection, first come first served.
    lane_wait: VecDeque<u32>,
    buffered: u64,
}

struct Engine {
    vehicles: Vec<Vehicle>,
    first: u64,
    seed: u64,
    buffer: usize,
    dropouts: Option<vtox::dropouts::Dropouts>,
    schedule: vtox::schedule::Schedule,
    counters: Arc<Counters>,
    lanes: Lanes,
    maker: Maker,
    fwd: Forwarding,
}

impl Engine {
    fn due_ns(&self, idx: u32, seq: u64) -> i64 {
        (self.schedule.tick_time(self.first + idx as u64, seq) * 1e9) as i64
    }

    /// At most once: the message of tick `seq` goes out now, or is dropped.
    fn send_at_most_once(&mut self, idx: u32, seq: u64, due_ns: i64) {
        if !self.lanes.has_room() {
            self.drop_busy();
            return;
        }
        let v = &mut self.vehicles[idx as usize];
        let temp_c = v
            .model
            .advance((due_ns - self.maker.batch_span_ns) as f64 / 1e9);
        let (job, body_len) = self.maker.job(v, idx, seq, due_ns, temp_c, false);
        match self.lanes.dispatch(job) {
            Ok(()) => self.count_sent(body_len),
            Err(_) => self.drop_busy(),
        }
    }

    fn drop_busy(&self) {
        let c = &self.counters;
        c.dropped.fetch_add(1, Relaxed);
        c.dropped_busy.fetch_add(1, Relaxed);
        c.tally(tally::TALLY_DROPPED, 1);
    }

    fn count_sent(&self, body_len: usize) {
        let c = &self.counters;
        c.sent.fetch_add(1, Relaxed);
        c.bytes.fetch_add(body_len as u64, Relaxed);
        c.tally(tally::TALLY_SENT, 1);
        c.tally(tally::TALLY_BYTES, body_len as u64);
    }

    /// Store-and-forward: the message of tick `seq` goes into its vehicle's buffer, and out at
    /// once if the vehicle may send.
    fn make(&mut self, idx: u32, seq: u64, due_ns: i64, now_ns: i64) {
        let online = self.coverage(idx, due_ns);
        let c = &self.counters;
        if !online {
            c.offline_ticks.fetch_add(1, Relaxed);
            c.tally(tally::TALLY_OFFLINE_TICKS, 1);
        }
        let v = &mut self.vehicles[idx as usize];
        let temp_c = v
            .model
            .advance((due_ns - self.maker.batch_span_ns) as f64 / 1e9);
        let dropped = v.modem.produce(
            Pending {
                seq,
                temp_c: temp_c as f32,
                attempts: 0,
                unknown: false,
            },
            self.buffer,
        );
        self.fwd.buffered = self.fwd.buffered + 1 - dropped;
        if dropped > 0 {
            c.buffer_dropped.fetch_add(dropped, Relaxed);
            c.tally(tally::TALLY_BUFFER_DROPPED, dropped);
        }
        self.try_send(idx, now_ns, Some(seq), false);
    }

    /// Whether vehicle `idx` has coverage at `ns`; when it just lost coverage, asks to be
    /// woken on its return.
    fn coverage(&mut self, idx: u32, ns: i64) -> bool {
        let Some(d) = &self.dropouts else {
            return true;
        };
        let v = &mut self.vehicles[idx as usize];
        match d.offline_until(self.first + idx as u64, ns as f64 / 1e9) {
            Some(back) => {
                if !v.offline {
                    v.offline = true;
                    self.fwd.wakes.push(Reverse(((back * 1e9) as i64 + 1, idx)));
                }
                false
            }
            None => {
                v.offline = false;
                true
            }
        }
    }

    /// Sends vehicle `idx`'s next buffered message if it may: nothing in flight, not backing
    /// off, in coverage, and a connection free (else it queues for one, behind those already
    /// queued unless `from_queue`). `fresh` is the seq just made: that one has not waited.
    fn try_send(&mut self, idx: u32, now_ns: i64, fresh: Option<u64>, from_queue: bool) {
        {
            let v = &self.vehicles[idx as usize];
            if v.modem.in_flight() || v.modem.is_empty() || v.waiting_lane && !from_queue {
                return;
            }
            if v.modem.retry_at().is_some_and(|t| t > now_ns) {
                return;
            }
        }
        if !self.coverage(idx, now_ns) {
            return;
        }
        if !self.lanes.has_room() || (!from_queue && !self.fwd.lane_wait.is_empty()) {
            let v = &mut self.vehicles[idx as usize];
            if !v.waiting_lane {
                v.waiting_lane = true;
                self.fwd.lane_wait.push_back(idx);
            }
            return;
        }
        let v = &mut self.vehicles[idx as usize];
        v.waiting_lane = false;
        let Some(p) = v.modem.take(now_ns) else {
            return;
        };
        self.fwd.buffered -= 1;
        let waited = p.attempts > 0 || fresh != Some(p.seq);
        let c = &self.counters;
        if p.attempts > 0 {
            c.retried.fetch_add(1, Relaxed);
            c.tally(tally::TALLY_RETRIED, 1);
        }
        if p.unknown {
            c.resent_after_timeout.fetch_add(1, Relaxed);
            c.tally(tally::TALLY_RESENT, 1);
        }
        let due_ns = self.due_ns(idx, p.seq);
        let v = &self.vehicles[idx as usize];
        let (job, body_len) = self
            .maker
            .job(v, idx, p.seq, due_ns, f64::from(p.temp_c), waited);
        match self.lanes.dispatch(job) {
            Ok(()) => self.count_sent(body_len),
            // Room was checked just before; should a lane be gone, the message waits for a
            // retry like any that could not go out.
            Err(_) => self.settle(idx, vtox::delivery::Outcome::Broken, now_ns),
        }
    }

    /// The answer to vehicle `idx`'s upload.
    fn settle(&mut self, idx: u32, outcome: vtox::delivery::Outcome, now_ns: i64) {
        let (seed, n) = (self.seed, self.first + idx as u64);
        let v = &mut self.vehicles[idx as usize];
        match v.modem.settle(outcome, now_ns, |p| {
            backoff(seed, n, p.seq, u32::from(p.attempts))
        }) {
            Some(Settled::Delivered(_)) | None => {}
            Some(Settled::Discarded(_)) => {
                self.counters.discarded.fetch_add(1, Relaxed);
                self.counters.tally(tally::TALLY_DISCARDED, 1);
            }
            Some(Settled::RetryAt(at)) => {
                self.fwd.buffered += 1;
                self.fwd.wakes.push(Reverse((at, idx)));
            }
        }
    }

    fn done(&mut self, d: Done, now_ns: i64) {
        self.settle(d.vehicle, d.outcome, now_ns);
        self.serve_lane_wait(now_ns);
        self.try_send(d.vehicle, now_ns, None, false);
    }

    /// Vehicles queued for a connection get the free ones, in order.
    fn serve_lane_wait(&mut self, now_ns: i64) {
        while self.lanes.has_room() {
            let Some(idx) = self.fwd.lane_wait.pop_front() else {
                break;
            };
            self.try_send(idx, now_ns, None, true);
            // Sent, or no longer able to send (backing off, offline): either way off the queue.
            self.vehicles[idx as usize].waiting_lane = false;
        }
    }

    /// Vehicles whose backoff or outage ended by `now_ns`.
    fn wake_due(&mut self, now_ns: i64) {
        while let Some(&Reverse((at, idx))) = self.fwd.wakes.peek() {
            if at > now_ns {
                break;
            }
            self.fwd.wakes.pop();
            self.try_send(idx, now_ns, None, false);
        }
    }

    fn publish(&self) {
        self.counters.buffered.store(self.fwd.buffered, Relaxed);
    }
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
    let clock = Clock {
        origin,
        origin_rel_ns,
        start_unix: unix_secs(cfg.run_start),
    };

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
            modem: Modem::default(),
            waiting_lane: false,
            offline: false,
        });
    }
    let forward = args.delivery == Delivery::StoreAndForward;
    tracing::info!(
        vehicles = args.vehicles,
        first_vehicle = first,
        target = %cfg.base,
        rate_per_s = args.vehicles as f64 / schedule.interval_s(),
        delivery = args.delivery.name(),
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
    let (outcomes_tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel::<Done>();
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
    let mut engine = Engine {
        vehicles,
        first,
        seed: args.seed,
        buffer: args.buffer,
        dropouts: cfg.dropouts,
        schedule,
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
        fwd: Forwarding::default(),
    };

    let mut due: Vec<u32> = Vec::with_capacity(BURST);
    'schedule: while let Some(next_tick) = wheel.next_due_ns() {
        let next_ns = match engine.fwd.wakes.peek() {
            Some(&Reverse((at, _))) => next_tick.min(at),
            None => next_tick,
        };
        let wake = clock.instant(next_ns);
        if wake > Instant::now() {
            let wake = tokio::time::Instant::from_std(wake);
            tokio::select! {
                biased;
                _ = stop.changed() => break 'schedule,
                _ = async { match end { Some(e) => tokio::time::sleep_until(e).await, None => std::future::pending().await } } => break 'schedule,
                Some(d) = outcomes.recv(), if forward => engine.done(d, clock.now_ns()),
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        if *stop.borrow() || end.is_some_and(|e| tokio::time::Instant::now() >= e) {
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
            let v = &mut engine.vehicles[idx as usize];
            let n = first + idx as u64;
            let k = v.next_k;
            v.next_k += 1;
            let due_ns = (schedule.tick_time(n, k) * 1e9) as i64;
            wheel.insert((schedule.tick_time(n, k + 1) * 1e9) as i64, idx);

            let lag_ns = now_ns - due_ns;
            counters
                .max_lag_us
                .fetch_max((lag_ns / 1000).max(0) as u64, Relaxed);
            counters.produced.fetch_add(1, Relaxed);
            counters.tally(tally::TALLY_PRODUCED, 1);
            // More than an interval behind means the generator cannot keep the schedule;
            // sending late ticks in a burst would misstate the load, so they count as dropped
            // (the generator's own evidence, in either delivery mode).
            if lag_ns > interval_ns {
                counters.dropped.fetch_add(1, Relaxed);
                counters.tally(tally::TALLY_DROPPED, 1);
                continue;
            }
            if forward {
                engine.make(idx, k, due_ns, now_ns);
            } else {
                engine.send_at_most_once(idx, k, due_ns);
            }
        }
        if forward {
            engine.publish();
        }
        if due.len() == BURST {
            tokio::task::yield_now().await;
        }
    }

    // Closing the lanes' channels lets each finish its request in flight, then exit.
    let Engine {
        lanes,
        mut vehicles,
        mut fwd,
        ..
    } = engine;
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
    if forward {
        // What is left in the buffers was never delivered: said, not lost silently.
        while let Ok(d) = outcomes.try_recv() {
            let v = &mut vehicles[d.vehicle as usize];
            let _ = v.modem.settle(d.outcome, 0, |_| Duration::ZERO);
        }
        fwd.buffered = vehicles.iter().map(|v| v.modem.len() as u64).sum();
        counters.buffered.store(fwd.buffered, Relaxed);
        if fwd.buffered > 0 {
            tracing::warn!(
                buffered = fwd.buffered,
                "messages still in vehicles' buffers at the end were never delivered"
            );
        }
    }
    let _ = done_tx.send(true);
    let _ = reporter.await;
    let report = counters.snapshot(&cfg, started, true);
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
