//! Metrics as they travel from a simulator to its agent and on to the coordinator. Counters
//! are cumulative since the instance started, so a lost or repeated report loses nothing;
//! latencies are HDR histograms, serialized in the standard compressed V2 format (base64), so
//! merging them anywhere gives exact fleet-wide percentiles.

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Latencies are recorded in microseconds from 1 µs to 10 minutes at 3 significant digits.
const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 600_000_000;
const SIGFIG: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("latency histogram is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("latency histogram does not decode: {0}")]
    Decode(String),
    #[error("latency histograms cannot be merged: {0}")]
    Merge(String),
    #[error("metric line does not parse: {0}")]
    Line(#[from] serde_json::Error),
}

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialEq for Latency {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Latency {
    pub fn new() -> Self {
        // The bounds are constants known to be valid.
        match Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGFIG) {
            Ok(h) => Latency(h),
            Err(_) => unreachable!("constant histogram bounds are valid"),
        }
    }

    /// Records one latency; values beyond the range are clamped to its top, not lost.
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(LOWEST_US));
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at quantile q (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// How many recorded latencies are at most `us` microseconds (to bucket precision).
    pub fn count_at_most_us(&self, us: u64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        self.0.count_between(0, us.min(self.0.high()))
    }

    pub fn max_ms(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.max() as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        self.0.mean() / 1000.0
    }

    /// Adds every recorded value of `other` (exact: identical bucket layouts add bucket-wise).
    pub fn merge(&mut self, other: &Latency) -> Result<(), MetricsError> {
        self.0
            .add(&other.0)
            .map_err(|e| MetricsError::Merge(format!("{e:?}")))
    }

    /// `other` minus `earlier` (a window between two cumulative snapshots).
    pub fn since(&self, earlier: &Latency) -> Result<Latency, MetricsError> {
        let mut h = self.0.clone();
        h.subtract(&earlier.0)
            .map_err(|e| MetricsError::Merge(format!("{e:?}")))?;
        Ok(Latency(h))
    }

    /// The standard compressed V2 encoding, base64 (as in HdrHistogram logs).
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_bytes())
    }

    pub fn decode(text: &str) -> Result<Latency, MetricsError> {
        Self::from_bytes(&base64::engine::general_purpose::STANDARD.decode(text)?)
    }

    /// The standard compressed V2 encoding as raw bytes (for protobuf fields).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Serializing into a Vec only fails on values the histogram cannot hold.
        match V2DeflateSerializer::new().serialize(&self.0, &mut buf) {
            Ok(_) => buf,
            Err(_) => Vec::new(),
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Latency, MetricsError> {
        if bytes.is_empty() {
            return Ok(Latency::new());
        }
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| MetricsError::Decode(format!("{e:?}")))?;
        // Re-home the values into our standard layout so any two decoded histograms merge.
        let mut out = Latency::new();
        out.0
            .add(&h)
            .map_err(|e| MetricsError::Merge(format!("{e:?}")))?;
        Ok(out)
    }
}

/// Slots of a simulator's tally file (`vtox-sim --tally`): native-endian u64 counters that
/// survive the process being killed.
pub const TALLY_SENT: usize = 0;
pub const TALLY_ACCEPTED: usize = 1;
pub const TALLY_FAILED: usize = 2;
pub const TALLY_DROPPED: usize = 3;
pub const TALLY_BYTES: usize = 4;
pub const TALLY_TIMEOUT: usize = 5;
pub const TALLY_CONNECT: usize = 6;
pub const TALLY_LATE: usize = 7;
pub const TALLY_UNSENT: usize = 8;
pub const TALLY_PROTOCOL: usize = 9;
pub const TALLY_TLS: usize = 10;
pub const TALLY_SLOTS: usize = 16;
/// Files of earlier versions had 8 slots; the newer ones read as 0 from them.
const TALLY_SLOTS_MIN: usize = 8;

/// Reads a tally file's counters; None when it is missing or short.
pub fn read_tally(bytes: &[u8]) -> Option<[u64; TALLY_SLOTS]> {
    if bytes.len() < TALLY_SLOTS_MIN * 8 {
        return None;
    }
    let mut out = [0u64; TALLY_SLOTS];
    for (i, v) in out.iter_mut().enumerate().take(bytes.len() / 8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        *v = u64::from_ne_bytes(b);
    }
    Some(out)
}

/// Failed requests by cause.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    /// Answers other than 200, by status code.
    #[serde(default)]
    pub status: BTreeMap<u16, u64>,
    /// No complete answer within the request timeout.
    #[serde(default)]
    pub timeout: u64,
    /// Of `timeout`: timed out before the request went out whole (connecting, or writing to a
    /// target that stopped reading), so the target cannot have taken it.
    #[serde(default)]
    pub timeout_unsent: u64,
    /// The connection could not be made or broke.
    #[serde(default)]
    pub connect: u64,
    /// The answer broke HTTP: a head over 64 KiB, a malformed head or bad chunked encoding.
    #[serde(default)]
    pub protocol: u64,
    /// The TLS handshake failed: an untrusted certificate or one for another name.
    #[serde(default)]
    pub tls: u64,
}

impl Failures {
    pub fn total(&self) -> u64 {
        self.status.values().sum::<u64>() + self.timeout + self.connect + self.protocol + self.tls
    }

    pub fn add(&mut self, other: &Failures) {
        for (code, n) in &other.status {
            *self.status.entry(*code).or_default() += n;
        }
        self.timeout += other.timeout;
        self.timeout_unsent += other.timeout_unsent;
        self.connect += other.connect;
        self.protocol += other.protocol;
        self.tls += other.tls;
    }
}

/// One metric line of `vtox-sim` (stdout, one JSON object per line). Counters are cumulative
/// since the process started.
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
    /// Requests started (accepted + failed + in flight).
    pub sent: u64,
    /// Answered 200.
    pub accepted: u64,
    /// Timed out (so counted in `failed`), then answered 200 after all: the target took these
    /// messages too, only too late.
    #[serde(default)]
    pub late_accepted: u64,
    /// Failed for any cause (the sum of `failures`).
    pub failed: u64,
    #[serde(default)]
    pub failures: Failures,
    /// Ticks skipped: those that found the in-flight cap full (the schedule is open: a slow
    /// target never delays later ticks) and those the generator reached more than an interval
    /// late.
    pub dropped: u64,
    /// Of `dropped`: ticks that found every connection busy with a slow target. The rest were
    /// the generator's own lateness.
    #[serde(default)]
    pub dropped_busy: u64,
    /// Connections open now at most: one per lane, plus timed-out ones watched for a late
    /// answer.
    #[serde(default)]
    pub connections: u64,
    /// Request body bytes sent.
    pub bytes: u64,
    /// Logins done with `--login`: the first one and each renewal after a 401.
    #[serde(default)]
    pub logins: u64,
    /// Vehicles currently scheduled.
    #[serde(default)]
    pub active_vehicles: u64,
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
    /// All latencies so far (µs), HDR V2 compressed, base64.
    #[serde(default)]
    pub latency: String,
}

impl SimReport {
    pub fn parse_line(line: &str) -> Result<SimReport, MetricsError> {
        Ok(serde_json::from_str(line)?)
    }

    pub fn latency(&self) -> Result<Latency, MetricsError> {
        Latency::decode(&self.latency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_files_of_both_sizes_read() {
        let file: Vec<u8> = (1..=TALLY_SLOTS as u64)
            .flat_map(u64::to_ne_bytes)
            .collect();
        let t = read_tally(&file).expect("current size");
        assert_eq!((t[TALLY_SENT], t[TALLY_UNSENT]), (1, 9));
        // An 8-slot file of an earlier version: the newer slots read as 0.
        let t = read_tally(&file[..64]).expect("earlier size");
        assert_eq!((t[TALLY_LATE], t[TALLY_UNSENT]), (8, 0));
        assert_eq!(read_tally(&file[..63]), None);
    }

    fn filled(values: impl IntoIterator<Item = u64>) -> Latency {
        let mut l = Latency::new();
        for v in values {
            l.record_us(v);
        }
        l
    }

    #[test]
    fn merge_is_exact() {
        let a: Vec<u64> = (1..5000).map(|i| i * 37 % 100_000 + 1).collect();
        let b: Vec<u64> = (1..7000).map(|i| i * 91 % 2_000_000 + 1).collect();
        let mut merged = filled(a.iter().copied());
        merged.merge(&filled(b.iter().copied())).unwrap();
        let union = filled(a.iter().chain(b.iter()).copied());
        assert_eq!(merged, union);
        for q in [0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            assert_eq!(merged.quantile_ms(q), union.quantile_ms(q));
        }
    }

    #[test]
    fn encoding_round_trips_and_merges_after_decoding() {
        let a = filled((1..1000).map(|i| i * 13));
        let b = filled((1..3000).map(|i| i * 7 + 100_000));
        let mut via_wire = Latency::decode(&a.encode()).unwrap();
        via_wire
            .merge(&Latency::decode(&b.encode()).unwrap())
            .unwrap();
        let mut direct = a.clone();
        direct.merge(&b).unwrap();
        assert_eq!(via_wire, direct);
        assert_eq!(Latency::decode("").unwrap().count(), 0);
        assert!(Latency::decode("not base64!").is_err());
    }

    #[test]
    fn windows_between_snapshots() {
        let early = filled([100, 200]);
        let mut late = early.clone();
        late.record_us(5_000_000);
        let w = late.since(&early).unwrap();
        assert_eq!(w.count(), 1);
        assert!((w.max_ms() - 5000.0).abs() < 5.0);
    }

    #[test]
    fn out_of_range_values_are_kept() {
        let l = filled([0, u64::MAX]);
        assert_eq!(l.count(), 2);
    }

    #[test]
    fn report_lines_parse_and_failures_add_up() {
        let mut f = Failures::default();
        f.status.insert(500, 2);
        f.timeout = 3;
        let r = SimReport {
            sent: 10,
            accepted: 5,
            failed: f.total(),
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
}
