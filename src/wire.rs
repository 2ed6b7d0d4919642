//! The generated gRPC types of `proto/vtox/v1`, and conversions from the library's own types.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("vtox.v1");
}

use crate::metrics::SimReport;
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Prost's gRPC codec with 1 KiB starting buffers instead of 8 KiB. Each open stream keeps one
/// to encode and one to decode; a coordinator holds a session with every agent, so for 10,000
/// agents the default sizes alone are 160 MB, while a heartbeat or an assignment is one or two
/// KB (the buffers grow for a larger message, a status of thousands of agents, as needed).
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

const LEAN_BUFFERS: usize = 1024;
/// tonic's default: how much an encoder gathers before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(LEAN_BUFFERS, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(LEAN_BUFFERS, YIELD_THRESHOLD))
    }
}
use crate::plan::InstanceRange;
use base64::Engine as _;

impl pb::RunState {
    /// The name users read in tables, JSON and reports.
    pub fn name(self) -> &'static str {
        match self {
            pb::RunState::Idle => "idle",
            pb::RunState::Running => "running",
            pb::RunState::Stopped => "stopped",
            pb::RunState::Finished => "finished",
            pb::RunState::Failed => "failed",
        }
    }

    /// The state a state file written before the enum existed stored as text.
    pub fn from_legacy(name: &str) -> pb::RunState {
        match name {
            "running" => pb::RunState::Running,
            "finished" => pb::RunState::Finished,
            "failed" => pb::RunState::Failed,
            "" | "idle" => pb::RunState::Idle,
            _ => pb::RunState::Stopped,
        }
    }
}

/// The wire protocol's major version; a coordinator refuses agents that speak another.
pub const PROTOCOL_MAJOR: u32 = 1;

impl pb::Counters {
    /// The counters of one metric line of `vtox-sim`.
    pub fn from_report(r: &SimReport) -> Self {
        let hdr = |b64: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default()
        };
        let latency_hdr = hdr(&r.latency);
        pb::Counters {
            sent: r.sent,
            accepted: r.accepted,
            failed: r.failed,
            dropped: r.dropped,
            dropped_busy: r.dropped_busy,
            connections: r.connections,
            bytes: r.bytes,
            timeouts: r.failures.timeout,
            late_accepted: r.late_accepted,
            timeouts_unsent: r.failures.timeout_unsent,
            connect_errors: r.failures.connect,
            protocol_errors: r.failures.protocol,
            tls_errors: r.failures.tls,
            logins: r.logins,
            status: r
                .failures
                .status
                .iter()
                .map(|(k, v)| (u32::from(*k), *v))
                .collect(),
            elapsed_s: r.elapsed_s,
            max_lag_ms: r.max_lag_ms,
            latency_hdr,
            latency_summary: None,
            active_vehicles: r.active_vehicles,
            bad_lines: 0,
            produced: r.produced,
            buffered: r.buffered,
            retried: r.retried,
            buffer_dropped: r.buffer_dropped,
            delivered_late: r.delivered_late,
            resent_after_timeout: r.resent_after_timeout,
            discarded: r.discarded,
            offline: r.offline,
            offline_ticks: r.offline_ticks,
            delay_hdr: hdr(&r.delay),
            late_age_hdr: hdr(&r.late_age),
        }
    }

    /// Adds `other` to these counters (histograms are merged separately: see `Latency`).
    pub fn add(&mut self, o: &pb::Counters) {
        self.sent += o.sent;
        self.accepted += o.accepted;
        self.failed += o.failed;
        self.dropped += o.dropped;
        self.dropped_busy += o.dropped_busy;
        self.connections += o.connections;
        self.bytes += o.bytes;
        self.timeouts += o.timeouts;
        self.late_accepted += o.late_accepted;
        self.timeouts_unsent += o.timeouts_unsent;
        self.connect_errors += o.connect_errors;
        self.protocol_errors += o.protocol_errors;
        self.tls_errors += o.tls_errors;
        self.logins += o.logins;
        for (k, v) in &o.status {
            *self.status.entry(*k).or_default() += v;
        }
        self.active_vehicles += o.active_vehicles;
        self.bad_lines += o.bad_lines;
        self.produced += o.produced;
        self.buffered += o.buffered;
        self.retried += o.retried;
        self.buffer_dropped += o.buffer_dropped;
        self.delivered_late += o.delivered_late;
        self.resent_after_timeout += o.resent_after_timeout;
        self.discarded += o.discarded;
        self.offline += o.offline;
        self.offline_ticks += o.offline_ticks;
        self.max_lag_ms = self.max_lag_ms.max(o.max_lag_ms);
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
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

impl From<&InstanceRange> for pb::InstanceSpec {
    fn from(i: &InstanceRange) -> Self {
        pb::InstanceSpec {
            index: i.index,
            first_vehicle: i.first_vehicle,
            vehicles: i.vehicles,
        }
    }
}

impl From<&pb::InstanceSpec> for InstanceRange {
    fn from(i: &pb::InstanceSpec) -> Self {
        InstanceRange {
            index: i.index,
            first_vehicle: i.first_vehicle,
            vehicles: i.vehicles,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Failures, Latency};

    #[test]
    fn run_states_read_as_users_know_them_and_as_old_state_files_wrote_them() {
        for s in [
            pb::RunState::Idle,
            pb::RunState::Running,
            pb::RunState::Stopped,
            pb::RunState::Finished,
            pb::RunState::Failed,
        ] {
            assert_eq!(pb::RunState::from_legacy(s.name()), s);
        }
        assert_eq!(pb::RunStatus::default().state().name(), "idle");
        assert_eq!(pb::RunState::from_legacy("paused"), pb::RunState::Stopped);
    }

    #[test]
    fn instance_ranges_convert_both_ways() {
        let r = InstanceRange {
            index: 3,
            first_vehicle: 150,
            vehicles: 50,
        };
        let spec = pb::InstanceSpec::from(&r);
        assert_eq!(
            (spec.index, spec.first_vehicle, spec.vehicles),
            (3, 150, 50)
        );
        assert_eq!(InstanceRange::from(&spec), r);
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
            sent: 10,
            accepted: 4,
            failed: 6,
            logins: 2,
            failures,
            latency: lat.encode(),
            produced: 9,
            buffered: 3,
            retried: 2,
            buffer_dropped: 1,
            delivered_late: 1,
            resent_after_timeout: 1,
            discarded: 1,
            offline: 2,
            offline_ticks: 5,
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
                total.offline,
                total.offline_ticks
            ),
            (2, 2, 2, 4, 10)
        );
        assert_eq!(Latency::from_bytes(&c.delay_hdr).unwrap().count(), 1);
    }
}
