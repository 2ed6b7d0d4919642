//! Every counter of a simulator instance, declared once. Each row below names the counter in
//! the wire contract (`pb::Counters`) and in the metric line, says how it merges (summed,
//! a gauge of what runs now, or a maximum), which slot of the crash-proof tally keeps it, and
//! which Prometheus family shows it; everything else is made from the rows: the metric line's
//! fields, the simulator's atomics, the conversions and merges of `pb::Counters`, the status
//! JSON, the Prometheus families and the tally's recovery. A test checks the rows against the
//! compiled wire contract, so a field added to the proto and not here fails.
//!
//! Adding a counter: a field in `Counters` of `proto/vtox/v1/agent.proto`, a row here, and
//! the `add(Counter::…)` where it happens.

use crate::metrics::{Latency, MetricsError};
use crate::wire::pb;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How a counter merges across incarnations, instances and agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Cumulative: summed.
    Sum,
    /// What runs now: summed over the current incarnations only.
    Gauge,
}

/// Where a counter lives in the metric line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// A top-level key.
    Line,
    /// Under `failures`.
    Failures,
    /// Not in the metric line: the agent counts it.
    Agent,
}

/// One row of the table.
pub struct Def {
    pub counter: Counter,
    /// Its field in `pb::Counters`, and its key in the status JSON.
    pub name: &'static str,
    /// Its key in the metric line (under `failures` for those).
    pub line_key: &'static str,
    pub home: Home,
    pub kind: Kind,
    /// Its slot in the tally file, where a killed simulator's count survives.
    pub tally: Option<usize>,
    /// Its Prometheus family and help.
    pub prometheus: Option<(&'static str, &'static str)>,
    pub help: &'static str,
    pub get: fn(&pb::Counters) -> u64,
    pub get_mut: fn(&mut pb::Counters) -> &mut u64,
    pub line: fn(&SimReport) -> u64,
}

macro_rules! counters {
    (@tally -) => { None };
    (@tally $n:literal) => { Some($n) };
    (@prom -) => { None };
    (@prom ($name:literal, $help:literal)) => { Some(($name, $help)) };
    (
        line { $( $(#[doc = $ld:literal])+ $lv:ident $lk:ident => $lf:ident : $lkind:ident, tally $lt:tt, prom $lp:tt; )* }
        failures { $( $(#[doc = $fd:literal])+ $fv:ident $fk:ident => $ff:ident : $fkind:ident, tally $ft:tt, prom $fp:tt; )* }
        agent { $( $(#[doc = $ad:literal])+ $av:ident => $af:ident : $akind:ident; )* }
    ) => {
        /// One counter, by name: the index of its row.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Counter { $($lv,)* $($fv,)* $($av,)* }

        /// The metric line's top-level counters (flattened into `SimReport`).
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct LineCounts { $( $(#[doc = $ld])+ #[serde(default)] pub $lk: u64, )* }

        /// The metric line's failure counters (flattened into `Failures`).
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct FailureCounts { $( $(#[doc = $fd])+ #[serde(default)] pub $fk: u64, )* }

        /// Every row, in the order of `Counter`.
        pub const DEFS: &[Def] = &[
            $( Def {
                counter: Counter::$lv, name: stringify!($lf), line_key: stringify!($lk),
                home: Home::Line, kind: Kind::$lkind, tally: counters!(@tally $lt),
                prometheus: counters!(@prom $lp), help: concat!($($ld),+),
                get: |c| c.$lf, get_mut: |c| &mut c.$lf, line: |r| r.counts.$lk,
            }, )*
            $( Def {
                counter: Counter::$fv, name: stringify!($ff), line_key: stringify!($fk),
                home: Home::Failures, kind: Kind::$fkind, tally: counters!(@tally $ft),
                prometheus: counters!(@prom $fp), help: concat!($($fd),+),
                get: |c| c.$ff, get_mut: |c| &mut c.$ff, line: |r| r.failures.counts.$fk,
            }, )*
            $( Def {
                counter: Counter::$av, name: stringify!($af), line_key: "",
                home: Home::Agent, kind: Kind::$akind, tally: None, prometheus: None,
                help: concat!($($ad),+),
                get: |c| c.$af, get_mut: |c| &mut c.$af, line: |_| 0,
            }, )*
        ];

        impl Atomics {
            /// The metric line's counters as they stand.
            pub fn line_counts(&self) -> (LineCounts, FailureCounts) {
                (
                    LineCounts { $( $lk: self.get(Counter::$lv), )* },
                    FailureCounts { $( $fk: self.get(Counter::$fv), )* },
                )
            }
        }
    };
}

counters! {
    line {
        /// Requests started (accepted + failed + in flight).
        Sent sent => sent: Sum, tally 0, prom ("vtox_messages_sent_total", "Messages sent (requests started).");
        /// Answered 200.
        Accepted accepted => accepted: Sum, tally 1, prom ("vtox_messages_accepted_total", "Messages answered 200.");
        /// Failed for any cause (the sum of `failures`).
        Failed failed => failed: Sum, tally 2, prom ("vtox_messages_failed_total", "Messages failed (status, timeout or connection).");
        /// Timed out (so counted in `failed`), then answered 200 after all: the target took
        /// these messages too, only too late.
        LateAccepted late_accepted => late_accepted: Sum, tally 7, prom ("vtox_messages_accepted_late_total", "Timed-out messages the target answered 200 after all (the target took them).");
        /// Ticks skipped: those that found the in-flight cap full and those the generator
        /// reached more than an interval late.
        Dropped dropped => dropped: Sum, tally 3, prom ("vtox_messages_dropped_total", "Ticks dropped by the generator (in-flight cap full or too late).");
        /// Of `dropped`: ticks that found every connection busy with a slow target; the rest
        /// were the generator's own lateness.
        DroppedBusy dropped_busy => dropped_busy: Sum, tally 18, prom -;
        /// Connections open now at most: one per lane, plus timed-out ones watched for a
        /// late answer.
        Connections connections => connections: Gauge, tally -, prom -;
        /// Request body bytes sent.
        Bytes bytes => bytes: Sum, tally 4, prom ("vtox_bytes_sent_total", "Message body bytes sent.");
        /// Logins done with `--login`: the first one and each renewal after a 401.
        Logins logins => logins: Sum, tally 19, prom -;
        /// Vehicles currently scheduled.
        ActiveVehicles active_vehicles => active_vehicles: Gauge, tally -, prom -;
        /// Messages made (one per vehicle tick), whether sent at once, buffered or dropped.
        Produced produced => produced: Sum, tally 11, prom ("vtox_messages_produced_total", "Messages made by vehicles (one per tick).");
        /// Messages waiting in vehicles' buffers now (store-and-forward), not counting those
        /// in flight.
        Buffered buffered => buffered: Gauge, tally -, prom -;
        /// Sends of a message tried before (store-and-forward).
        Retried retried => retried: Sum, tally 12, prom ("vtox_messages_retried_total", "Sends of a message tried before (store-and-forward).");
        /// Messages dropped from a full buffer, oldest first: never delivered.
        BufferDropped buffer_dropped => buffer_dropped: Sum, tally 13, prom ("vtox_messages_buffer_dropped_total", "Messages dropped from a vehicle's full buffer: never delivered.");
        /// Messages accepted after waiting in their vehicle's buffer (busy modem, no coverage
        /// or a failed try); their age at delivery is in `late_age`.
        DeliveredLate delivered_late => delivered_late: Sum, tally 14, prom ("vtox_messages_delivered_late_total", "Messages accepted after waiting in their vehicle's buffer.");
        /// Sends of a message whose previous try timed out after it was written: the target
        /// may have taken both, so at most this many accepted messages are duplicates.
        ResentAfterTimeout resent_after_timeout => resent_after_timeout: Sum, tally 15, prom ("vtox_messages_resent_after_timeout_total", "Resends of a message whose previous try timed out after it was written (possible duplicates).");
        /// Messages given up because the target refused them with a status no retry changes
        /// (a 422, a 404, a redirect).
        Discarded discarded => discarded: Sum, tally 16, prom ("vtox_messages_discarded_total", "Messages given up because the target refused them for good.");
        /// Vehicles out of coverage now (`--dropouts`).
        Offline offline => offline_vehicles: Gauge, tally -, prom -;
        /// Messages made while their vehicle was out of coverage.
        OfflineTicks offline_ticks => offline_ticks: Sum, tally 17, prom -;
    }
    failures {
        /// No complete answer within the request timeout.
        Timeouts timeout => timeouts: Sum, tally 5, prom ("vtox_messages_timed_out_total", "Messages failed because no answer came within the request timeout.");
        /// Of `timeout`: timed out before the request went out whole (connecting, or writing
        /// to a target that stopped reading), so the target cannot have taken it.
        TimeoutsUnsent timeout_unsent => timeouts_unsent: Sum, tally 8, prom -;
        /// The connection could not be made or broke.
        ConnectErrors connect => connect_errors: Sum, tally 6, prom -;
        /// The answer broke HTTP: a head over 64 KiB, a malformed head or bad chunked
        /// encoding.
        ProtocolErrors protocol => protocol_errors: Sum, tally 9, prom -;
        /// The TLS handshake failed: an untrusted certificate or one for another name.
        TlsErrors tls => tls_errors: Sum, tally 10, prom -;
    }
    agent {
        /// Metric lines from the instance that did not parse.
        BadLines => bad_lines: Sum;
    }
}

/// Failed requests by cause: the status codes, and the counters of the table whose home is
/// `failures` (flattened, so the line reads `"failures": {"status": {...}, "timeout": 2, ...}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    /// Answers other than 200, by status code.
    #[serde(default)]
    pub status: BTreeMap<u16, u64>,
    #[serde(flatten)]
    pub counts: FailureCounts,
}

impl std::ops::Deref for Failures {
    type Target = FailureCounts;
    fn deref(&self) -> &Self::Target {
        &self.counts
    }
}

impl std::ops::DerefMut for Failures {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.counts
    }
}

impl Failures {
    /// Every failure: the status codes, timeouts, connection, protocol and TLS errors
    /// (`timeout_unsent` is part of `timeout`).
    pub fn total(&self) -> u64 {
        self.status.values().sum::<u64>()
            + self.counts.timeout
            + self.counts.connect
            + self.counts.protocol
            + self.counts.tls
    }
}

/// One metric line of `vtox-sim` (stdout, one JSON object per line). Counters are cumulative
/// since the process started; those of the counter table (`crate::counters`) are flattened
/// in as top-level keys, and read as fields through `Deref` (`report.sent`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// True on the last line, written after in-flight requests finished or timed out.
    #[serde(rename = "final", default)]
    pub is_final: bool,
    #[serde(default)]
    pub agent: String,
    #[serde(default)]
    pub instance: u32,
    #[serde(default)]
    pub first_vehicle: u64,
    #[serde(default)]
    pub vehicles: u64,
    /// Wall-clock time of the report, Unix seconds.
    #[serde(default)]
    pub ts: f64,
    /// Seconds since the process started sending.
    #[serde(default)]
    pub elapsed_s: f64,
    #[serde(flatten)]
    pub counts: LineCounts,
    #[serde(default)]
    pub failures: Failures,
    /// Requests outstanding now.
    #[serde(default)]
    pub in_flight: u64,
    /// Worst lateness of a tick behind its schedule, in milliseconds, since the previous line:
    /// a generator short of CPU shows here before it shows anywhere else.
    #[serde(default)]
    pub max_lag_ms: f64,
    /// Convenience percentiles of all latencies so far, in milliseconds.
    #[serde(default)]
    pub p50_ms: f64,
    #[serde(default)]
    pub p95_ms: f64,
    #[serde(default)]
    pub p99_ms: f64,
    #[serde(default)]
    pub max_ms: f64,
    /// All latencies so far (µs), HDR V2 compressed, base64: service time, from the request
    /// handed to a connection to its answer read.
    #[serde(default)]
    pub latency: String,
    /// Delay from each message's scheduled time to its answer (µs), HDR V2 compressed, base64:
    /// unlike `latency`, it includes every wait before the request went out (a generator
    /// behind its schedule, a vehicle's queue), so a stall cannot hide (coordinated
    /// omission).
    #[serde(default)]
    pub delay: String,
    #[serde(default)]
    pub delay_p50_ms: f64,
    #[serde(default)]
    pub delay_p95_ms: f64,
    #[serde(default)]
    pub delay_p99_ms: f64,
    /// Age at delivery of the `delivered_late` messages (µs), HDR V2 compressed, base64.
    #[serde(default)]
    pub late_age: String,
}

impl std::ops::Deref for SimReport {
    type Target = LineCounts;
    fn deref(&self) -> &Self::Target {
        &self.counts
    }
}

impl std::ops::DerefMut for SimReport {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.counts
    }
}

impl SimReport {
    pub fn parse_line(line: &str) -> Result<SimReport, MetricsError> {
        Ok(serde_json::from_str(line)?)
    }

    pub fn latency(&self) -> Result<Latency, MetricsError> {
        Latency::decode(&self.latency)
    }
}

impl pb::Counters {
    /// The counters of one metric line of `vtox-sim`: every row of the counter table, and
    /// the status codes, times and histograms by hand.
    pub fn from_report(r: &SimReport) -> Self {
        let hdr = |b64: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default()
        };
        let mut c = pb::Counters {
            status: r
                .failures
                .status
                .iter()
                .map(|(k, v)| (u32::from(*k), *v))
                .collect(),
            elapsed_s: r.elapsed_s,
            max_lag_ms: r.max_lag_ms,
            latency_hdr: hdr(&r.latency),
            delay_hdr: hdr(&r.delay),
            late_age_hdr: hdr(&r.late_age),
            ..Default::default()
        };
        for d in DEFS {
            *(d.get_mut)(&mut c) = (d.line)(r);
        }
        c
    }

    /// Adds `other` to these counters: every row of the counter table (gauges too: a sum over
    /// instances), the status codes, and the times at their latest (histograms are merged
    /// separately: see `Latency`).
    pub fn add(&mut self, o: &pb::Counters) {
        for d in DEFS {
            *(d.get_mut)(self) += (d.get)(o);
        }
        for (k, v) in &o.status {
            *self.status.entry(*k).or_default() += v;
        }
        self.max_lag_ms = self.max_lag_ms.max(o.max_lag_ms);
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
    }

    /// These counters without their histograms (an instance's, in a status whose agent totals
    /// carry the merged one).
    pub fn without_histograms(&self) -> pb::Counters {
        pb::Counters {
            latency_hdr: Vec::new(),
            delay_hdr: Vec::new(),
            late_age_hdr: Vec::new(),
            latency_summary: None,
            status: self.status.clone(),
            ..*self
        }
    }

    /// Percent of finished requests that were accepted; 100 when none finished.
    pub fn success_percent(&self) -> f64 {
        let done = self.accepted + self.failed;
        if done == 0 {
            100.0
        } else {
            self.accepted as f64 * 100.0 / done as f64
        }
    }
}

/// The fields of `pb::Counters` that are no counters: status codes, times, histograms. Each
/// is merged by hand in `wire.rs`.
pub const NOT_COUNTERS: [&str; 7] = [
    "status",
    "elapsed_s",
    "max_lag_ms",
    "latency_hdr",
    "latency_summary",
    "delay_hdr",
    "late_age_hdr",
];

impl Counter {
    pub fn def(self) -> &'static Def {
        &DEFS[self as usize]
    }
}

/// Where a tally's counts go: the simulator's shared-memory file.
pub trait TallySink: Send + Sync {
    fn add(&self, slot: usize, n: u64);
}

/// The simulator's counters, one atomic per row, each increment mirrored into the tally when
/// its row has a slot.
pub struct Atomics {
    values: Vec<AtomicU64>,
    tally: Option<Box<dyn TallySink>>,
}

impl Default for Atomics {
    fn default() -> Self {
        Atomics::new(None)
    }
}

impl Atomics {
    pub fn new(tally: Option<Box<dyn TallySink>>) -> Atomics {
        Atomics {
            values: DEFS.iter().map(|_| AtomicU64::new(0)).collect(),
            tally,
        }
    }

    pub fn add(&self, c: Counter, n: u64) {
        if let Some(v) = self.values.get(c as usize) {
            v.fetch_add(n, Relaxed);
        }
        if let (Some(t), Some(slot)) = (&self.tally, c.def().tally) {
            t.add(slot, n);
        }
    }

    /// Sets a gauge (never mirrored: a killed process's gauges mean nothing).
    pub fn store(&self, c: Counter, v: u64) {
        if let Some(a) = self.values.get(c as usize) {
            a.store(v, Relaxed);
        }
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.values.get(c as usize).map_or(0, |v| v.load(Relaxed))
    }
}

/// Raises the counters to a killed simulator's tally (never lowers them: the tally may be of
/// an incarnation that never got going, and the counters of a later line).
pub fn apply_tally(c: &mut pb::Counters, t: &[u64]) {
    let Some(&sent) = Counter::Sent.def().tally.and_then(|s| t.get(s)) else {
        return;
    };
    if sent < c.sent {
        return;
    }
    for d in DEFS {
        if let Some(&v) = d.tally.and_then(|s| t.get(s)) {
            let f = (d.get_mut)(c);
            *f = (*f).max(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Latency;

    #[test]
    fn every_field_of_the_wire_contract_is_a_row_or_named_as_none() {
        let mut wire = crate::wire::proto_fields("Counters");
        wire.sort();
        let mut ours: Vec<&str> = DEFS.iter().map(|d| d.name).chain(NOT_COUNTERS).collect();
        ours.sort();
        assert_eq!(ours, wire);
        // Rows are in the order of `Counter`, so that a counter finds its own row.
        for (i, d) in DEFS.iter().enumerate() {
            assert_eq!(d.counter as usize, i, "{}", d.name);
        }
    }

    #[test]
    fn each_row_reads_and_writes_its_own_field() {
        for (i, d) in DEFS.iter().enumerate() {
            let mut c = pb::Counters::default();
            *(d.get_mut)(&mut c) = i as u64 + 7;
            assert_eq!((d.get)(&c), i as u64 + 7, "{}", d.name);
            let others: u64 = DEFS.iter().map(|e| (e.get)(&c)).sum();
            assert_eq!(others, i as u64 + 7, "{} touches another field", d.name);
        }
    }

    #[test]
    fn tally_slots_are_distinct_and_within_the_file() {
        let slots: Vec<usize> = DEFS.iter().filter_map(|d| d.tally).collect();
        let unique: std::collections::BTreeSet<_> = slots.iter().collect();
        assert_eq!(unique.len(), slots.len());
        assert!(slots.iter().all(|s| *s < crate::metrics::TALLY_SLOTS));
        // Every cumulative counter of the metric line survives a kill.
        for d in DEFS
            .iter()
            .filter(|d| d.kind == Kind::Sum && d.home != Home::Agent)
        {
            assert!(d.tally.is_some(), "{} has no tally slot", d.name);
        }
    }

    struct Recorded(std::sync::Mutex<Vec<(usize, u64)>>);
    impl TallySink for std::sync::Arc<Recorded> {
        fn add(&self, slot: usize, n: u64) {
            if let Ok(mut v) = self.0.lock() {
                v.push((slot, n));
            }
        }
    }

    #[test]
    fn increments_reach_the_tally_and_a_tally_raises_the_counters() {
        let rec = std::sync::Arc::new(Recorded(Default::default()));
        let a = Atomics::new(Some(Box::new(rec.clone())));
        a.add(Counter::Sent, 3);
        a.add(Counter::ProtocolErrors, 1);
        a.store(Counter::Buffered, 9);
        assert_eq!(a.get(Counter::Sent), 3);
        assert_eq!(
            *rec.0.lock().unwrap(),
            [(0, 3), (9, 1)],
            "gauges are not mirrored"
        );
        let (line, failures) = a.line_counts();
        assert_eq!((line.sent, line.buffered, failures.protocol), (3, 9, 1));
        // What a killed simulator's tally says raises what its last line said.
        let mut t = [0u64; crate::metrics::TALLY_SLOTS];
        t[0] = 10;
        t[9] = 2;
        t[10] = 1;
        let mut c = pb::Counters {
            sent: 8,
            protocol_errors: 1,
            ..Default::default()
        };
        apply_tally(&mut c, &t);
        assert_eq!((c.sent, c.protocol_errors, c.tls_errors), (10, 2, 1));
        // A tally behind the counters (an earlier incarnation's) changes nothing.
        let mut newer = pb::Counters {
            sent: 20,
            ..Default::default()
        };
        apply_tally(&mut newer, &t);
        assert_eq!((newer.sent, newer.protocol_errors), (20, 0));
    }

    #[test]
    fn report_lines_parse_and_failures_add_up() {
        let mut f = Failures::default();
        f.status.insert(500, 2);
        f.timeout = 3;
        let r = SimReport {
            counts: LineCounts {
                sent: 10,
                accepted: 5,
                failed: f.total(),
                ..Default::default()
            },
            failures: f,
            ..Default::default()
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"final\":false"));
        let back = SimReport::parse_line(&line).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.failures.total(), 5);
        assert!(SimReport::parse_line("{garbage").is_err());
    }

    #[test]
    fn counters_from_a_metric_line_add_up() {
        let mut lat = Latency::new();
        lat.record_us(1500);
        let mut failures = Failures::default();
        failures.status.insert(503, 2);
        failures.timeout = 1;
        failures.protocol = 2;
        failures.tls = 1;
        let mut delay = Latency::new();
        delay.record_us(9000);
        let r = SimReport {
            counts: LineCounts {
                sent: 10,
                accepted: 4,
                failed: 6,
                logins: 2,
                produced: 9,
                buffered: 3,
                retried: 2,
                buffer_dropped: 1,
                delivered_late: 1,
                resent_after_timeout: 1,
                discarded: 1,
                offline: 2,
                offline_ticks: 5,
                ..Default::default()
            },
            failures,
            latency: lat.encode(),
            delay: delay.encode(),
            ..Default::default()
        };
        let c = pb::Counters::from_report(&r);
        assert_eq!((c.sent, c.accepted, c.failed, c.timeouts), (10, 4, 6, 1));
        assert_eq!((c.protocol_errors, c.tls_errors, c.logins), (2, 1, 2));
        assert_eq!(c.status.get(&503), Some(&2));
        let mut total = c.clone();
        total.add(&c);
        assert_eq!((total.sent, total.status.get(&503).copied()), (20, Some(4)));
        assert_eq!(
            (total.protocol_errors, total.tls_errors, total.logins),
            (4, 2, 4)
        );
        assert!((total.success_percent() - 40.0).abs() < 1e-9);
        let back = Latency::from_bytes(&c.latency_hdr).unwrap();
        assert_eq!(back.count(), 1);
        assert_eq!(
            (
                total.produced,
                total.buffered,
                total.retried,
                total.buffer_dropped
            ),
            (18, 6, 4, 2)
        );
        assert_eq!(
            (
                total.delivered_late,
                total.resent_after_timeout,
                total.discarded,
                total.offline_vehicles,
                total.offline_ticks
            ),
            (2, 2, 2, 4, 10)
        );
        assert_eq!(Latency::from_bytes(&c.delay_hdr).unwrap().count(), 1);
    }
}
