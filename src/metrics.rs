//! Metrics as they travel from a simulator to its agent and on to the coordinator. Counters
//! are cumulative since the instance started, so a lost or repeated report loses nothing;
//! latencies are HDR histograms, serialized in the standard compressed V2 format (base64), so
//! merging them anywhere gives exact fleet-wide percentiles.

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;

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

    fn to_v2(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        match hdrhistogram::serialization::V2Serializer::new().serialize(&self.0, &mut buf) {
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

/// V2 encoding constants, as HdrHistogram defines them.
const V2_COOKIE: u32 = 0x1c84_9303 | 0x10;
const V2_DEFLATE_COOKIE: u32 = 0x1c84_9304 | 0x10;
const V2_HEADER: usize = 40;

/// A latency histogram as its nonzero buckets only, in `Latency`'s bucket layout: what the
/// coordinator keeps and merges for thousands of instances, where a dense histogram (about
/// 170 KB each) would not fit. Decodes and encodes the V2 format directly, so that merging
/// costs no dense allocation per histogram.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Buckets {
    /// (bucket index, count), by index, no zero counts.
    counts: Vec<(u32, u64)>,
}

impl Buckets {
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|(_, c)| c).sum()
    }

    /// The values at quantiles `qs` (ascending, 0..=1) and the maximum, in microseconds,
    /// exactly as `Latency::quantile_ms` and `Latency::max_ms` give them, without the dense
    /// histogram (170 KB) that `Latency` would need: what a status reports per agent.
    pub fn quantiles_us<const N: usize>(&self, qs: [f64; N]) -> ([u64; N], u64) {
        let mut out = [0u64; N];
        let total = self.count();
        let Some(&(top, _)) = self.counts.last() else {
            return (out, 0);
        };
        let mut at = self.counts.iter();
        let (mut seen, mut index) = (0u64, 0u32);
        for (slot, q) in out.iter_mut().zip(qs) {
            // As hdrhistogram counts: the first bucket where the running count reaches
            // ceil(q * total), at least 1.
            let target = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
            while seen < target {
                let Some(&(i, c)) = at.next() else { break };
                seen += c;
                index = i;
            }
            *slot = if q == 0.0 {
                bucket_lowest_us(index)
            } else {
                bucket_highest_us(index)
            };
        }
        (out, bucket_highest_us(top))
    }

    /// Decodes V2 or V2 + deflate bytes (empty bytes: an empty histogram).
    pub fn from_bytes(bytes: &[u8]) -> Result<Buckets, MetricsError> {
        let mut counts = Vec::new();
        for_each_bucket(bytes, |i, c| counts.push((i, c)))?;
        Ok(Buckets { counts })
    }

    /// `self` minus `earlier`, bucket-wise (a window between two cumulative histograms);
    /// buckets that would go below zero are left out.
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        let mut old = earlier.counts.iter().peekable();
        let mut counts = Vec::new();
        for &(i, c) in &self.counts {
            while old.next_if(|(j, _)| *j < i).is_some() {}
            let before = old.next_if(|(j, _)| *j == i).map_or(0, |(_, c)| *c);
            if c > before {
                counts.push((i, c - before));
            }
        }
        Buckets { counts }
    }

    /// The uncompressed V2 encoding (which `Latency::from_bytes` reads like the deflated one):
    /// cheap to make for every agent on every status.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(V2_HEADER + self.counts.len() * 3 + 8);
        out.extend_from_slice(&V2_COOKIE.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&u32::from(SIGFIG).to_be_bytes());
        out.extend_from_slice(&LOWEST_US.to_be_bytes());
        out.extend_from_slice(&HIGHEST_US.to_be_bytes());
        out.extend_from_slice(&1.0f64.to_be_bytes());
        let mut next = 0u32;
        for &(i, c) in &self.counts {
            match i - next {
                0 => {}
                1 => varint(&mut out, 0),
                gap => varint(&mut out, zig_zag(-i64::from(gap))),
            }
            varint(&mut out, zig_zag(c.min(i64::MAX as u64) as i64));
            next = i + 1;
        }
        if self.counts.is_empty() {
            varint(&mut out, 0);
        }
        let len = (out.len() - V2_HEADER) as u32;
        out[4..8].copy_from_slice(&len.to_be_bytes());
        out
    }
}

/// Calls `f(bucket index, count)` for each nonzero bucket of V2 or V2 + deflate `bytes`, in
/// index order (empty bytes: none).
fn for_each_bucket(bytes: &[u8], mut f: impl FnMut(u32, u64)) -> Result<(), MetricsError> {
    if bytes.is_empty() {
        return Ok(());
    }
    if be_u32(bytes, 0)? == V2_DEFLATE_COOKIE {
        return with_inflated(bytes.get(8..).unwrap_or_default(), |raw| {
            v2_buckets(raw, &mut f)
        })?;
    }
    v2_buckets(bytes, &mut f)
}

fn v2_buckets(b: &[u8], f: &mut impl FnMut(u32, u64)) -> Result<(), MetricsError> {
    if be_u32(b, 0)? != V2_COOKIE {
        return Err(MetricsError::Decode("not a V2 histogram".into()));
    }
    let len = be_u32(b, 4)? as usize;
    let offset = be_u32(b, 8)?;
    let sigfig = be_u32(b, 12)?;
    let lowest = u64::from(be_u32(b, 16)?) << 32 | u64::from(be_u32(b, 20)?);
    if offset != 0 || sigfig != u32::from(SIGFIG) || lowest != LOWEST_US {
        // Another layout: let the library re-home it into ours.
        let l = Latency::from_bytes(b)?;
        return v2_buckets(&l.to_v2(), f);
    }
    let payload = b
        .get(V2_HEADER..V2_HEADER + len)
        .ok_or_else(|| MetricsError::Decode("histogram is truncated".into()))?;
    let (mut at, mut index) = (0usize, 0u64);
    while at < payload.len() {
        let mut v = 0u64;
        for i in 0..9 {
            let byte = *payload
                .get(at)
                .ok_or_else(|| MetricsError::Decode("histogram is truncated".into()))?;
            at += 1;
            if i == 8 {
                v |= u64::from(byte) << 56;
                break;
            }
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                break;
            }
        }
        let n = ((v >> 1) as i64) ^ -((v & 1) as i64);
        if n < 0 {
            index += n.unsigned_abs();
        } else {
            if n > 0 {
                let i = u32::try_from(index)
                    .map_err(|_| MetricsError::Decode("histogram is too wide".into()))?;
                f(i, n as u64);
            }
            index += 1;
        }
    }
    Ok(())
}

/// The largest inflated histogram accepted: a V2 encoding of every bucket of `Latency`'s
/// layout at the widest counts is under 400 KB, so anything larger is not a histogram.
const MAX_INFLATED: usize = 4 << 20;

thread_local! {
    /// One zlib decoder and one output buffer per thread, reset for each histogram: making a
    /// new decoder allocates and clears tens of KB, which for the few KB of a histogram cost
    /// more than the inflating (a coordinator inflates tens of thousands a second).
    static INFLATER: std::cell::RefCell<(flate2::Decompress, Vec<u8>)> =
        std::cell::RefCell::new((flate2::Decompress::new(true), Vec::new()));
}

/// Calls `f` with the inflated `input`.
fn with_inflated<R>(input: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<R, MetricsError> {
    INFLATER.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (d, out) = &mut *guard;
        d.reset(true);
        out.clear();
        out.reserve(input.len() * 4 + 64);
        loop {
            let (read, wrote) = (d.total_in(), d.total_out());
            let rest = input.get(read as usize..).unwrap_or_default();
            let status = d
                .decompress_vec(rest, out, flate2::FlushDecompress::None)
                .map_err(|e| MetricsError::Decode(e.to_string()))?;
            if status == flate2::Status::StreamEnd {
                let r = f(out);
                if out.capacity() > MAX_KEPT {
                    *out = Vec::new();
                }
                return Ok(r);
            }
            if out.len() == out.capacity() {
                if out.len() >= MAX_INFLATED {
                    return Err(MetricsError::Decode("histogram is too large".into()));
                }
                out.reserve(out.len().max(1024));
            } else if d.total_in() == read && d.total_out() == wrote {
                return Err(MetricsError::Decode("histogram is truncated".into()));
            }
        }
    })
}

/// An inflate buffer grown past this by an unusually wide histogram is not kept.
const MAX_KEPT: usize = 256 << 10;

/// Half the sub-buckets of `Latency`'s layout (3 significant digits: 2,048 sub-buckets), as
/// a power of two; the unit magnitude is 0 since the lowest value is 1 µs.
const SUB_HALF_MAGNITUDE: u32 = 10;

/// (lowest value, width) of bucket `index` in `Latency`'s layout, as hdrhistogram maps them.
fn bucket_span(index: u32) -> (u64, u64) {
    let half = 1u64 << SUB_HALF_MAGNITUDE;
    let (bucket, sub) = match (index >> SUB_HALF_MAGNITUDE).checked_sub(1) {
        Some(b) => (b, (u64::from(index) & (half - 1)) + half),
        None => (0, u64::from(index) & (half - 1)),
    };
    (sub << bucket, 1u64 << bucket)
}

fn bucket_lowest_us(index: u32) -> u64 {
    bucket_span(index).0
}

fn bucket_highest_us(index: u32) -> u64 {
    let (low, width) = bucket_span(index);
    low + width - 1
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, MetricsError> {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| MetricsError::Decode("histogram is truncated".into()))
}

fn zig_zag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    for _ in 0..8 {
        if v < 0x80 {
            out.push(v as u8);
            return;
        }
        out.push(0x80 | (v & 0x7f) as u8);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Adds many `Buckets` bucket-wise: one dense array of counts, however many are added.
#[derive(Debug, Default)]
pub struct BucketSum {
    dense: Vec<u64>,
}

impl BucketSum {
    pub fn add(&mut self, b: &Buckets) {
        if let Some(&(top, _)) = b.counts.last() {
            if self.dense.len() <= top as usize {
                self.dense.resize(top as usize + 1, 0);
            }
        }
        for &(i, c) in &b.counts {
            let slot = &mut self.dense[i as usize];
            *slot = slot.saturating_add(c);
        }
    }

    /// Adds a histogram straight from its V2 (or V2 + deflate) bytes, without decoding it
    /// into buckets first: how a status sums thousands of instances' histograms fleet-wide.
    pub fn add_bytes(&mut self, bytes: &[u8]) -> Result<(), MetricsError> {
        let dense = &mut self.dense;
        for_each_bucket(bytes, |i, c| {
            let i = i as usize;
            if dense.len() <= i {
                dense.resize(i + 1, 0);
            }
            dense[i] = dense[i].saturating_add(c);
        })
    }

    /// The sum so far, leaving this sum empty (and its memory ready for the next).
    pub fn take(&mut self) -> Buckets {
        let mut out = Buckets::default();
        self.take_into(&mut out);
        out
    }

    /// `take` into `out`, reusing its memory: summing one agent after another allocates once.
    pub fn take_into(&mut self, out: &mut Buckets) {
        out.counts.clear();
        out.counts.extend(
            self.dense
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (i as u32, std::mem::take(c))),
        );
        self.dense.clear();
    }

    pub fn finish(&self) -> Buckets {
        Buckets {
            counts: self
                .dense
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (i as u32, *c))
                .collect(),
        }
    }
}

/// Slots of a simulator's tally file (`vtox-sim --tally`): native-endian u64 counters that
/// survive the process being killed. Which counter has which slot is in its row of the counter
/// table (`crate::counters`).
pub const TALLY_SLOTS: usize = 32;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn latency_of(values: &[u64]) -> Latency {
        let mut l = Latency::new();
        for v in values {
            l.record_us(*v);
        }
        l
    }

    proptest! {
        /// What the coordinator merges from buckets is exactly what merging every full
        /// histogram gives: same counts, same percentiles.
        #[test]
        fn buckets_merge_exactly_like_full_histograms(
            hists in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![1u64..3000, 1u64..700_000_000], 0..200),
                0..6,
            )
        ) {
            let mut full = Latency::new();
            let mut sum = BucketSum::default();
            for values in &hists {
                let l = latency_of(values);
                full.merge(&l).unwrap();
                let b = Buckets::from_bytes(&l.to_bytes()).unwrap();
                prop_assert_eq!(Latency::from_bytes(&b.to_bytes()).unwrap(), l.clone());
                sum.add(&b);
            }
            let summed = sum.finish();
            // And taking the first histogram back out leaves the rest.
            if let Some(first) = hists.first() {
                let mut rest = Latency::new();
                for values in &hists[1..] {
                    rest.merge(&latency_of(values)).unwrap();
                }
                let first = Buckets::from_bytes(&latency_of(first).to_bytes()).unwrap();
                let rest = Buckets::from_bytes(&rest.to_bytes()).unwrap();
                prop_assert_eq!(summed.since(&first), rest);
            }
            // Summing straight from the bytes gives the same, and taking a sum empties it.
            let mut from_bytes = BucketSum::default();
            for values in &hists {
                from_bytes.add_bytes(&latency_of(values).to_bytes()).unwrap();
            }
            prop_assert_eq!(&from_bytes.take(), &summed);
            prop_assert!(from_bytes.take().is_empty());
            let merged = Latency::from_bytes(&sum.finish().to_bytes()).unwrap();
            prop_assert_eq!(merged.count(), full.count());
            for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
                prop_assert_eq!(merged.quantile_ms(q), full.quantile_ms(q));
            }
            prop_assert_eq!(merged, full);
        }

        /// Quantiles read from buckets are those `Latency` gives for the same values.
        #[test]
        fn bucket_quantiles_match_the_full_histogram(
            values in proptest::collection::vec(prop_oneof![1u64..3000, 1u64..700_000_000], 0..300)
        ) {
            let l = latency_of(&values);
            let b = Buckets::from_bytes(&l.to_bytes()).unwrap();
            prop_assert_eq!(b.count(), l.count());
            let qs = [0.0, 0.5, 0.95, 0.99, 0.999, 1.0];
            let (got, max) = b.quantiles_us(qs);
            for (q, us) in qs.iter().zip(got) {
                prop_assert_eq!(us as f64 / 1000.0, l.quantile_ms(*q), "q={}", q);
            }
            prop_assert_eq!(max as f64 / 1000.0, l.max_ms());
        }
    }

    #[test]
    fn buckets_read_empty_uncompressed_and_foreign_layouts() {
        assert!(Buckets::from_bytes(&[]).unwrap().is_empty());
        let empty = Latency::new();
        assert!(Buckets::from_bytes(&empty.to_bytes()).unwrap().is_empty());
        assert_eq!(
            Latency::from_bytes(&Buckets::default().to_bytes()).unwrap(),
            empty
        );
        let l = latency_of(&[5, 900, 12_345]);
        assert_eq!(
            Buckets::from_bytes(&l.to_v2()).unwrap(),
            Buckets::from_bytes(&l.to_bytes()).unwrap()
        );
        // Two significant digits: re-homed into the standard layout.
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000, 2).unwrap();
        h.record(1500).unwrap();
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&h, &mut bytes)
            .unwrap();
        let b = Latency::from_bytes(&Buckets::from_bytes(&bytes).unwrap().to_bytes()).unwrap();
        assert_eq!(b.count(), 1);
        assert!(Buckets::from_bytes(&[1, 2, 3]).is_err());
        assert!(Buckets::from_bytes(&l.to_bytes()[..20]).is_err());
    }

    #[test]
    fn a_histogram_that_compresses_well_decodes_whole() {
        // Thousands of buckets with like counts deflate to a few hundred bytes: more than
        // four times as large once inflated, which must not be read as a broken histogram.
        let mut l = Latency::new();
        for t in 0..100u64 {
            for k in 0..50u64 {
                l.record_us(800 + (k * 101 + t * 37) % 5000);
            }
        }
        let bytes = l.to_bytes();
        let b = Buckets::from_bytes(&bytes).unwrap();
        assert!(
            bytes.len() * 8 < b.to_bytes().len(),
            "{} bytes",
            bytes.len()
        );
        assert_eq!(b.count(), 5000);
        assert_eq!(Latency::from_bytes(&b.to_bytes()).unwrap(), l);
        let mut sum = BucketSum::default();
        sum.add_bytes(&bytes).unwrap();
        sum.add_bytes(&bytes).unwrap();
        assert_eq!(sum.take().count(), 10_000);
    }

    #[test]
    fn tally_files_of_both_sizes_read() {
        let file: Vec<u8> = (1..=TALLY_SLOTS as u64)
            .flat_map(u64::to_ne_bytes)
            .collect();
        let t = read_tally(&file).expect("current size");
        assert_eq!((t[0], t[8]), (1, 9));
        // An 8-slot file of an earlier version: the newer slots read as 0.
        let t = read_tally(&file[..64]).expect("earlier size");
        assert_eq!((t[7], t[8]), (8, 0));
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
}
