//! The instance's counters, shared by the scheduler, the lanes, the login and the reporter:
//! one atomic per row of the counter table (each increment mirrored into the crash-proof
//! tally), the few gauges the lanes keep for themselves, the status codes and the histograms.
//! `snapshot` turns them into a metric line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};
use vtox::counters::{Atomics, Counter};
use vtox::counters::{Failures, SimReport};
use vtox::ingest::unix_secs;
use vtox::metrics::Latency;

/// Who a metric line is of.
#[derive(Debug, Clone, Default)]
pub struct Who {
    pub agent: String,
    pub instance: u32,
    pub first_vehicle: u64,
    pub vehicles: u64,
}

#[derive(Default)]
pub struct Counters {
    /// Every counter of the table.
    pub c: Atomics,
    /// Lanes opened so far: each holds at most one connection, and lanes are never closed, so
    /// this is the most connections the instance has had open at once.
    pub lanes: AtomicU64,
    pub in_flight: AtomicU64,
    /// Timed-out connections still watched for a late answer.
    pub late_pending: AtomicU64,
    pub max_lag_us: AtomicU64,
    status: Mutex<BTreeMap<u16, u64>>,
    histograms: Mutex<Histograms>,
}

/// The histograms, under one lock: an answer records into two or three of them at once.
#[derive(Default)]
struct Histograms {
    latency: Latency,
    delay: Latency,
    late_age: Latency,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Counters {
    pub fn new(tally: Option<Box<dyn vtox::counters::TallySink>>) -> Counters {
        Counters {
            c: Atomics::new(tally),
            ..Default::default()
        }
    }

    pub fn add(&self, c: Counter, n: u64) {
        self.c.add(c, n);
    }

    /// The metric line as the counters stand, for the instance `who` describes (`offline`:
    /// vehicles out of coverage now).
    pub fn snapshot(&self, who: &Who, started: Instant, is_final: bool, offline: u64) -> SimReport {
        let (latency, delay, late_age) = {
            let h = lock(&self.histograms);
            (h.latency.clone(), h.delay.clone(), h.late_age.clone())
        };
        self.c.store(
            Counter::Connections,
            self.lanes.load(Relaxed) + self.late_pending.load(Relaxed),
        );
        self.c.store(Counter::Offline, offline);
        let (counts, failure_counts) = self.c.line_counts();
        SimReport {
            is_final,
            agent: who.agent.clone(),
            instance: who.instance,
            first_vehicle: who.first_vehicle,
            vehicles: who.vehicles,
            ts: unix_secs(SystemTime::now()),
            elapsed_s: started.elapsed().as_secs_f64(),
            counts,
            failures: Failures {
                status: lock(&self.status).clone(),
                counts: failure_counts,
            },
            in_flight: self.in_flight.load(Relaxed),
            max_lag_ms: self.max_lag_us.swap(0, Relaxed) as f64 / 1000.0,
            p50_ms: latency.quantile_ms(0.50),
            p95_ms: latency.quantile_ms(0.95),
            p99_ms: latency.quantile_ms(0.99),
            max_ms: latency.max_ms(),
            latency: latency.encode(),
            delay_p50_ms: delay.quantile_ms(0.50),
            delay_p95_ms: delay.quantile_ms(0.95),
            delay_p99_ms: delay.quantile_ms(0.99),
            delay: delay.encode(),
            late_age: late_age.encode(),
        }
    }

    /// An answer (of any status) to a request handed to a connection at `created` for a
    /// message due at `due`: its service time, its delay since the message was due, and for a
    /// buffered message (`waited`) that was accepted, its age at delivery.
    pub fn record_answer(&self, created: Instant, due: Instant, waited: bool, status: u16) {
        let now = Instant::now();
        let us = |since: Instant| now.saturating_duration_since(since).as_micros() as u64;
        let late = waited && status == 200;
        {
            let mut h = lock(&self.histograms);
            h.latency.record_us(us(created));
            h.delay.record_us(us(due));
            if late {
                h.late_age.record_us(us(due));
            }
        }
        if late {
            self.add(Counter::DeliveredLate, 1);
        }
    }

    pub fn record_status(&self, code: u16) {
        *lock(&self.status).entry(code).or_default() += 1;
    }
}
