//! The backend's pipeline as its Redis shows it: how fast raw messages arrive, how fast each
//! diagnosis consumer group gets through them, whether a group's backlog grows, and which
//! messages the stream's MAXLEN trimmed before a group read them. Pure arithmetic over
//! samples; `vtox-coord` takes the samples (read-only) once a second.
//!
//! Counting rules (Redis 7 counters; older servers lack them and show "unknown"):
//! - ingest = growth of `entries-added` of the raw stream (`XINFO STREAM`): it counts every
//!   XADD, so the stream's MAXLEN trimming does not hide arrivals the way `XLEN` would.
//! - a group without consumers (`consumers` 0 in `XINFO GROUPS`) is **idle**: the backend
//!   created it but nothing reads it. It is listed apart and never judged. A group whose
//!   consumers exist but read nothing is judged like any other: that is a stuck backend.
//! - trimmed = `entries-added` − the stream's length: entries MAXLEN removed. A group's
//!   `entries-read` counts the entries delivered to it (Redis 7 adds one per delivered entry,
//!   also when it skips a trimmed stretch), so `trimmed − entries-read` is the number of
//!   entries trimmed before the group read them: `trimmed_unread`, a loss, never processing.
//!   It is exact whenever the group's last delivered ID lies before the stream's first entry
//!   (the group has fallen off the stream); right after a group jumped such a gap the same
//!   difference is lower, so the sampler carries the highest value seen forward (it can only
//!   grow), and the next sample behind the stream's head makes it exact again.
//! - a group's backlog = entries still in the stream and never delivered to it (`entries-added`
//!   − `entries-read` − `trimmed_unread`, at most the stream's length) plus entries delivered
//!   but not acknowledged (`pending`): the diagnosis work not yet done.
//! - a group's processing = growth of (`entries-read` − `pending`): entries it finished.
//!   Trimmed entries never count, so a group that reads nothing processes 0/s however much is
//!   trimmed past it.
//! - the backlog's slope is the least-squares line through the window's samples, in entries/s,
//!   so one batch read at a sampling instant does not decide a verdict. A live group falls
//!   behind when it grows faster than a tolerance of the ingest rate; it **loses** messages
//!   when its `trimmed_unread` grew during the window.
//!
//! Redis 8 recounts `entries-read` after a group skips a trimmed stretch; there the count of
//! a gap is seen while the group is behind the stream's head, and a jump over it counts as read.

use redis::Value;
use serde::Serialize;
use std::cmp::Ordering;
use std::fmt;

/// The stream the backend's ingest API appends to.
pub const RAW_STREAM: &str = "motor_raw_data";
/// The stream the backend's analyzers write their diagnoses to.
pub const RESULTS_STREAM: &str = "fault_diagnosis_results";
/// A backlog growing slower than this many entries/s is noise, whatever the ingest rate.
pub const MIN_GROWTH_PER_S: f64 = 2.0;

/// A stream entry ID, `ms-seq`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    pub fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId(ms.parse().ok()?, seq.parse().ok()?))
    }

    pub fn is_zero(self) -> bool {
        self == StreamId(0, 0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One consumer group of the raw stream at one instant (`XINFO GROUPS`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GroupSample {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    /// Entries delivered to the group so far (Redis 7+; none before its first read).
    pub entries_read: Option<u64>,
    /// Entries not yet delivered to the group, as Redis computes it (Redis 7+).
    pub lag: Option<u64>,
    pub last_delivered: Option<StreamId>,
    /// Entries trimmed from the stream before this group read them, since the stream began:
    /// set by [`Sample::settle`] and carried forward by [`carry`].
    pub trimmed_unread: Option<u64>,
}

impl GroupSample {
    /// Nothing reads this group: the backend created it, but it has no consumers.
    pub fn idle(&self) -> bool {
        self.consumers == 0
    }

    /// Entries delivered to the group. A group that never read (last delivered `0-0`) has
    /// none, whatever Redis reports for its counter.
    fn delivered(&self) -> Option<u64> {
        match (self.entries_read, self.last_delivered) {
            (Some(r), _) => Some(r),
            (None, Some(d)) if d.is_zero() => Some(0),
            _ => None,
        }
    }

    /// Diagnosis work not yet done: entries still in the stream that were never delivered to
    /// the group, plus delivered-but-unacknowledged ones.
    pub fn backlog(&self, raw_added: Option<u64>, raw_len: u64) -> Option<u64> {
        let undelivered = match (raw_added, self.delivered()) {
            (Some(added), Some(read)) => added
                .saturating_sub(read)
                .saturating_sub(self.trimmed_unread.unwrap_or(0)),
            // Without the counters, Redis' own lag is the best there is.
            _ => self.lag?,
        };
        Some(undelivered.min(raw_len) + self.pending)
    }

    /// Entries the group finished: delivered and acknowledged (trimmed ones never count).
    pub fn processed(&self) -> Option<u64> {
        Some(self.delivered()?.saturating_sub(self.pending))
    }
}

/// The backend's streams at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Unix seconds at which the sample was taken.
    pub at_s: f64,
    pub raw_len: u64,
    /// Entries ever added to the raw stream (0 while it does not exist; None before Redis 7).
    pub raw_added: Option<u64>,
    pub results_added: Option<u64>,
    pub groups: Vec<GroupSample>,
}

impl Sample {
    /// Computes each group's `trimmed_unread` from this sample's own counters.
    pub fn settle(&mut self) {
        let trimmed = self.raw_added.map(|a| a.saturating_sub(self.raw_len));
        for g in &mut self.groups {
            g.trimmed_unread = match (trimmed, g.delivered()) {
                (Some(t), Some(read)) => Some(t.saturating_sub(read)),
                _ => None,
            };
        }
    }
}

/// Carries each group's `trimmed_unread` forward from the previous sample: the count can only
/// grow, and a group that just jumped a trimmed gap shows less than it lost (see the module
/// doc). A stream that was deleted and made anew (fewer entries added than before) starts over.
pub fn carry(prev: &Sample, next: &mut Sample) {
    if next.raw_added < prev.raw_added {
        return;
    }
    for g in &mut next.groups {
        let before = prev
            .groups
            .iter()
            .find(|p| p.name == g.name)
            .and_then(|p| p.trimmed_unread);
        if let (Some(b), Some(now)) = (before, g.trimmed_unread) {
            g.trimmed_unread = Some(now.max(b));
        } else if g.trimmed_unread.is_none() {
            g.trimmed_unread = before;
        }
    }
}

/// One live group over a window of samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupWindow {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    pub backlog_start: Option<u64>,
    pub backlog_end: Option<u64>,
    /// Least-squares slope of the backlog, entries/s (positive: falling behind).
    pub backlog_slope_per_s: Option<f64>,
    /// Entries finished per second (delivered and acknowledged; never trimmed ones).
    pub processed_msgs_per_s: Option<f64>,
    /// Entries trimmed before this group read them, since the stream began.
    pub trimmed_unread: Option<u64>,
    /// Of those, trimmed during the window: messages this group never diagnosed.
    pub trimmed_unread_in_window: Option<u64>,
}

/// A group that nothing reads, listed apart and never judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdleGroup {
    pub name: String,
    pub pending: u64,
}

/// The pipeline over a window of samples: the one vocabulary of `status --json`, the live
/// views and the ramp report (`backend_pipeline`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    pub seconds: f64,
    pub raw_length: u64,
    pub ingest_msgs_per_s: Option<f64>,
    pub results_per_s: Option<f64>,
    /// Groups with consumers: judged.
    pub groups: Vec<GroupWindow>,
    /// Groups without consumers: listed, never judged.
    pub idle_groups: Vec<IdleGroup>,
    /// Live groups whose backlog grew faster than the tolerance allows.
    pub falling_behind: Vec<String>,
    /// Live groups that lost entries to trimming during the window.
    pub losing: Vec<String>,
    /// Messages of the window that at least one live group never diagnosed (the largest
    /// group's loss: a lower bound of the messages missing some diagnosis).
    pub never_diagnosed: u64,
    /// The slowest live group's processing rate, entries/s.
    pub slowest_msgs_per_s: Option<f64>,
    /// Its name.
    pub slowest_group: Option<String>,
    /// The growth above which a backlog counts as growing, entries/s.
    pub growth_limit_per_s: f64,
}

fn rate(a: Option<u64>, b: Option<u64>, dt: f64) -> Option<f64> {
    Some(b?.saturating_sub(a?) as f64 / dt)
}

/// Least-squares slope of y over x; None with fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= f64::EPSILON {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    Some(sxy / sxx)
}

/// The growth above which a backlog counts as growing: `tolerance` (a fraction) of the ingest
/// rate, and never below [`MIN_GROWTH_PER_S`].
pub fn growth_limit(ingest_per_s: Option<f64>, tolerance: f64) -> f64 {
    (ingest_per_s.unwrap_or(0.0) * tolerance).max(MIN_GROWTH_PER_S)
}

/// Summarizes samples (oldest first, settled and carried) and judges the live groups with
/// `tolerance` (a fraction of the ingest rate); None with fewer than two samples.
pub fn window(samples: &[Sample], tolerance: f64) -> Option<Window> {
    let (first, last) = (samples.first()?, samples.last()?);
    let dt = last.at_s - first.at_s;
    if samples.len() < 2 || dt <= 0.0 {
        return None;
    }
    let ingest = rate(first.raw_added, last.raw_added, dt);
    let limit = growth_limit(ingest, tolerance);
    let mut groups = Vec::new();
    let mut idle_groups = Vec::new();
    for g in &last.groups {
        if g.idle() {
            idle_groups.push(IdleGroup {
                name: g.name.clone(),
                pending: g.pending,
            });
            continue;
        }
        let history: Vec<(&Sample, &GroupSample)> = samples
            .iter()
            .filter_map(|s| Some((s, s.groups.iter().find(|x| x.name == g.name)?)))
            .collect();
        let points: Vec<(f64, f64)> = history
            .iter()
            .filter_map(|(s, h)| {
                Some((
                    s.at_s - first.at_s,
                    h.backlog(s.raw_added, s.raw_len)? as f64,
                ))
            })
            .collect();
        // Processing from the first sample in which the group's counter is known.
        let from = history.iter().find(|(_, h)| h.processed().is_some());
        let processed = from.and_then(|(s0, h0)| {
            (last.at_s > s0.at_s)
                .then(|| rate(h0.processed(), g.processed(), last.at_s - s0.at_s))
                .flatten()
        });
        let (s0, h0) = history[0];
        let lost_from = history.iter().find_map(|(_, h)| h.trimmed_unread);
        groups.push(GroupWindow {
            name: g.name.clone(),
            consumers: g.consumers,
            pending: g.pending,
            backlog_start: h0.backlog(s0.raw_added, s0.raw_len),
            backlog_end: g.backlog(last.raw_added, last.raw_len),
            backlog_slope_per_s: slope(&points),
            processed_msgs_per_s: processed,
            trimmed_unread: g.trimmed_unread,
            trimmed_unread_in_window: g
                .trimmed_unread
                .map(|end| end.saturating_sub(lost_from.unwrap_or(end))),
        });
    }
    let falling_behind = groups
        .iter()
        .filter(|g| g.backlog_slope_per_s.is_some_and(|s| s > limit))
        .map(|g| g.name.clone())
        .collect();
    let losing = groups
        .iter()
        .filter(|g| g.trimmed_unread_in_window.is_some_and(|n| n > 0))
        .map(|g| g.name.clone())
        .collect();
    let never_diagnosed = groups
        .iter()
        .filter_map(|g| g.trimmed_unread_in_window)
        .max()
        .unwrap_or(0);
    let slowest = groups
        .iter()
        .filter_map(|g| Some((g, g.processed_msgs_per_s?)))
        .min_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(Ordering::Equal));
    Some(Window {
        seconds: dt,
        raw_length: last.raw_len,
        ingest_msgs_per_s: ingest,
        results_per_s: rate(first.results_added, last.results_added, dt),
        slowest_msgs_per_s: slowest.map(|s| s.1),
        slowest_group: slowest.map(|s| s.0.name.clone()),
        groups,
        idle_groups,
        falling_behind,
        losing,
        never_diagnosed,
        growth_limit_per_s: limit,
    })
}

impl Window {
    /// The live groups that fell behind.
    pub fn behind(&self) -> impl Iterator<Item = &GroupWindow> {
        self.groups
            .iter()
            .filter(|g| self.falling_behind.contains(&g.name))
    }

    /// The live groups that lost entries to trimming.
    pub fn lost(&self) -> impl Iterator<Item = &GroupWindow> {
        self.groups.iter().filter(|g| self.losing.contains(&g.name))
    }

    /// One table for people: the streams, a line per live group, then the idle ones.
    pub fn table(&self) -> String {
        let opt = |x: Option<f64>| x.map_or_else(|| "unknown".to_string(), |v| format!("{v:.1}"));
        let num = |x: Option<u64>| x.map_or_else(|| "unknown".to_string(), |v| v.to_string());
        let mut out = format!(
            "redis: {} raw entries, ingest {}/s, results {}/s\n",
            self.raw_length,
            opt(self.ingest_msgs_per_s),
            opt(self.results_per_s)
        );
        if self.groups.is_empty() {
            out.push_str("  no consumer group with consumers reads the raw stream\n");
        } else {
            out.push_str(&format!(
                "{:<28} {:>9} {:>9} {:>9} {:>11} {:>14}  trend\n",
                "group", "consumers", "pending", "backlog", "processed/s", "trimmed_unread"
            ));
        }
        for g in &self.groups {
            let mut trend = match g.backlog_slope_per_s {
                None => "unknown".to_string(),
                Some(s) if s > self.growth_limit_per_s => format!("GROWING +{s:.1}/s"),
                Some(s) if s < -self.growth_limit_per_s => format!("draining {s:.1}/s"),
                Some(_) => "steady".to_string(),
            };
            if let Some(n) = g.trimmed_unread_in_window.filter(|n| *n > 0) {
                trend.push_str(&format!(", LOSING {n} trimmed unread"));
            }
            out.push_str(&format!(
                "{:<28} {:>9} {:>9} {:>9} {:>11} {:>14}  {trend}\n",
                g.name,
                g.consumers,
                g.pending,
                num(g.backlog_end),
                opt(g.processed_msgs_per_s),
                num(g.trimmed_unread),
            ));
        }
        if !self.idle_groups.is_empty() {
            let names: Vec<&str> = self.idle_groups.iter().map(|g| g.name.as_str()).collect();
            out.push_str(&format!(
                "idle (no consumers, not judged): {}\n",
                names.join(", ")
            ));
        }
        out
    }
}

/// The key/value pairs of a RESP2 flat array or a RESP3 map.
pub fn pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Map(m) => m.iter().filter_map(|(k, v)| Some((text(k)?, v))).collect(),
        Value::Array(a) => a
            .chunks_exact(2)
            .filter_map(|kv| Some((text(&kv[0])?, &kv[1])))
            .collect(),
        _ => Vec::new(),
    }
}

/// A string reply as text.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// A counter reply (Redis answers some counters as strings).
pub fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::Double(d) if *d >= 0.0 => Some(*d as u64),
        other => text(other)?.parse().ok(),
    }
}

fn field<'a>(p: &'a [(String, &'a Value)], key: &str) -> Option<&'a Value> {
    p.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// The groups of an `XINFO GROUPS` reply; entries it cannot read are skipped.
pub fn parse_groups(reply: &Value) -> Vec<GroupSample> {
    let Value::Array(list) = reply else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|g| {
            let p = pairs(g);
            Some(GroupSample {
                name: text(field(&p, "name")?)?,
                consumers: field(&p, "consumers").and_then(number).unwrap_or(0),
                pending: field(&p, "pending").and_then(number).unwrap_or(0),
                entries_read: field(&p, "entries-read").and_then(number),
                lag: field(&p, "lag").and_then(number),
                last_delivered: field(&p, "last-delivered-id")
                    .and_then(text)
                    .and_then(|s| StreamId::parse(&s)),
                trimmed_unread: None,
            })
        })
        .collect()
}

/// `entries-added` of an `XINFO STREAM` reply (None before Redis 7).
pub fn parse_entries_added(reply: &Value) -> Option<u64> {
    field(&pairs(reply), "entries-added").and_then(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn group(name: &str, pending: u64, read: u64) -> GroupSample {
        GroupSample {
            name: name.into(),
            consumers: 1,
            pending,
            entries_read: Some(read),
            lag: None,
            last_delivered: Some(StreamId(read, 0)),
            trimmed_unread: None,
        }
    }

    /// A stream that never trims (length = entries added), settled.
    fn sample(t: f64, added: u64, groups: Vec<GroupSample>) -> Sample {
        trimmed(t, added, added, groups)
    }

    fn trimmed(t: f64, added: u64, len: u64, groups: Vec<GroupSample>) -> Sample {
        let mut s = Sample {
            at_s: t,
            raw_len: len,
            raw_added: Some(added),
            results_added: Some(added * 5),
            groups,
        };
        s.settle();
        s
    }

    /// Settles and carries a series as the sampler does.
    fn series(mut samples: Vec<Sample>) -> Vec<Sample> {
        for i in 1..samples.len() {
            let (a, b) = samples.split_at_mut(i);
            carry(&a[i - 1], &mut b[0]);
        }
        samples
    }

    #[test]
    fn backlog_counts_undelivered_and_unacknowledged_work() {
        assert_eq!(group("g", 7, 100).backlog(Some(130), 130), Some(37));
        assert_eq!(group("g", 7, 100).processed(), Some(93));
        // Without the counters (Redis 6), Redis' lag is used where there is one.
        let old = GroupSample {
            name: "g".into(),
            pending: 3,
            lag: Some(4),
            ..Default::default()
        };
        assert_eq!(old.backlog(None, 10), Some(7));
        assert_eq!(old.processed(), None);
        // A group that never read has processed nothing, and all of the stream is its backlog.
        let never = GroupSample {
            name: "g".into(),
            consumers: 1,
            last_delivered: Some(StreamId(0, 0)),
            ..Default::default()
        };
        assert_eq!(never.processed(), Some(0));
        assert_eq!(never.backlog(Some(40), 40), Some(40));
    }

    #[test]
    fn stream_ids_order_and_parse() {
        assert_eq!(
            StreamId::parse("1796418348473-2"),
            Some(StreamId(1796418348473, 2))
        );
        assert!(StreamId::parse("5-1") < StreamId::parse("5-2"));
        assert!(StreamId::parse("5-9") < StreamId::parse("6-0"));
        assert_eq!(StreamId::parse("x-1"), None);
        assert_eq!(StreamId(3, 4).to_string(), "3-4");
    }

    #[test]
    fn slope_is_least_squares() {
        assert_eq!(slope(&[(0.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 5.0)]), None);
        let s = slope(&[(0.0, 0.0), (1.0, 2.0), (2.0, 4.0), (3.0, 6.0)]).unwrap();
        assert!((s - 2.0).abs() < 1e-9);
        // A sawtooth around a flat level is flat.
        let saw: Vec<_> = (0..20)
            .map(|i| (i as f64, if i % 2 == 0 { 0.0 } else { 10.0 }))
            .collect();
        assert!(slope(&saw).unwrap().abs() < 1.0);
    }

    #[test]
    fn a_slow_group_falls_behind_and_a_fast_one_does_not() {
        // 160 msg/s in; "fast" keeps up, "slow" finishes 100/s.
        let samples: Vec<Sample> = (0..=10)
            .map(|i| {
                let added = 1000 + 160 * i;
                sample(
                    i as f64,
                    added,
                    vec![group("fast", 2, added), group("slow", 10, 1000 + 100 * i)],
                )
            })
            .collect();
        let samples = series(samples);
        let w = window(&samples, 0.1).unwrap();
        assert_eq!(w.ingest_msgs_per_s, Some(160.0));
        assert_eq!(w.results_per_s, Some(800.0));
        let slow = &w.groups[1];
        assert_eq!(slow.processed_msgs_per_s, Some(100.0));
        assert!((slow.backlog_slope_per_s.unwrap() - 60.0).abs() < 1e-9);
        assert_eq!(
            (slow.backlog_start, slow.backlog_end),
            (Some(10), Some(610))
        );
        assert_eq!(w.falling_behind, ["slow"]);
        assert!(w.losing.is_empty());
        assert_eq!(w.slowest_group.as_deref(), Some("slow"));
        let t = w.table();
        assert!(t.contains("GROWING +60.0/s") && t.contains("steady"), "{t}");
        // A generous tolerance (50% of 160/s = 80/s) lets it pass.
        let lenient = window(&samples, 0.5).unwrap();
        assert!(lenient.falling_behind.is_empty());
    }

    #[test]
    fn groups_without_consumers_are_idle_and_never_judged() {
        // An idle group read nothing while the stream filled and MAXLEN trimmed it.
        let idle = |name: &str| GroupSample {
            name: name.into(),
            consumers: 0,
            last_delivered: Some(StreamId(0, 0)),
            ..Default::default()
        };
        let samples: Vec<Sample> = (0..=10)
            .map(|i| {
                let added = 50_000 + 300 * i;
                trimmed(
                    i as f64,
                    added,
                    50_000,
                    vec![
                        idle("performance_monitor_group"),
                        group("bearing_diagnosis", 1, added),
                    ],
                )
            })
            .collect();
        let w = window(&series(samples), 0.1).unwrap();
        assert_eq!(w.idle_groups.len(), 1);
        assert_eq!(w.idle_groups[0].name, "performance_monitor_group");
        assert_eq!(w.groups.len(), 1, "only live groups are judged");
        assert!(w.falling_behind.is_empty() && w.losing.is_empty());
        assert_eq!(w.slowest_group.as_deref(), Some("bearing_diagnosis"));
        assert!(w
            .table()
            .contains("idle (no consumers, not judged): performance_monitor_group"));
    }

    #[test]
    fn a_stuck_group_with_consumers_is_judged_and_trimming_is_never_processing() {
        // Consumers exist but read nothing; MAXLEN 1000 trims what it never read.
        let stuck = GroupSample {
            name: "stuck".into(),
            consumers: 2,
            last_delivered: Some(StreamId(0, 0)),
            ..Default::default()
        };
        let samples: Vec<Sample> = (0..=10)
            .map(|i| trimmed(i as f64, 1000 + 100 * i, 1000, vec![stuck.clone()]))
            .collect();
        let w = window(&series(samples), 0.1).unwrap();
        let g = &w.groups[0];
        assert_eq!(
            g.processed_msgs_per_s,
            Some(0.0),
            "trimmed is not processed"
        );
        assert_eq!(g.trimmed_unread, Some(1000));
        assert_eq!(g.trimmed_unread_in_window, Some(1000));
        assert_eq!(
            g.backlog_end,
            Some(1000),
            "never more than the stream holds"
        );
        assert_eq!(w.losing, ["stuck"]);
        assert_eq!(w.never_diagnosed, 1000);
        assert!(w.table().contains("LOSING 1000"), "{}", w.table());
    }

    #[test]
    fn trimmed_unread_is_exact_behind_the_head_and_carried_over_a_gap() {
        // MAXLEN 10, as seen on Redis 7.0: 40 entries added, the group read 13 and then two
        // more after jumping the trimmed stretch 14..=30 (entries-read 15, not 32).
        let behind = GroupSample {
            name: "g".into(),
            consumers: 1,
            pending: 3,
            entries_read: Some(13),
            lag: Some(27),
            last_delivered: Some(StreamId(13, 0)),
            trimmed_unread: None,
        };
        let mut s0 = trimmed(0.0, 40, 10, vec![behind]);
        assert_eq!(s0.groups[0].trimmed_unread, Some(17), "entries 14..=30");
        assert_eq!(s0.groups[0].backlog(s0.raw_added, s0.raw_len), Some(13));
        s0.settle();
        let jumped = GroupSample {
            name: "g".into(),
            consumers: 1,
            pending: 5,
            entries_read: Some(15),
            lag: Some(25),
            last_delivered: Some(StreamId(32, 0)),
            trimmed_unread: None,
        };
        let mut s1 = trimmed(1.0, 40, 10, vec![jumped]);
        // Alone it would say 15; carried, the 17 lost entries stay lost.
        assert_eq!(s1.groups[0].trimmed_unread, Some(15));
        carry(&s0, &mut s1);
        assert_eq!(s1.groups[0].trimmed_unread, Some(17));
        // 8 entries after #32 are still to be delivered, and 5 are pending.
        assert_eq!(s1.groups[0].backlog(s1.raw_added, s1.raw_len), Some(13));
        let w = window(&[s0, s1], 0.1).unwrap();
        assert_eq!(
            w.groups[0].processed_msgs_per_s,
            Some(0.0),
            "2 read, 2 more pending"
        );
        assert_eq!(w.groups[0].trimmed_unread_in_window, Some(0));
    }

    #[test]
    fn small_growth_is_noise() {
        let samples: Vec<Sample> = (0..5)
            .map(|i| sample(i as f64, 10 + i, vec![group("g", 0, 10)]))
            .collect();
        let w = window(&samples, 0.0).unwrap();
        assert!(w.falling_behind.is_empty(), "1 entry/s is below the floor");
        assert!(window(&samples[..1], 0.0).is_none());
    }

    #[test]
    fn a_group_that_appears_mid_window_is_judged_on_its_own_samples() {
        let mut samples: Vec<Sample> = (0..4).map(|i| sample(i as f64, 100, vec![])).collect();
        samples[2].groups.push(group("late", 0, 100));
        samples[3].groups.push(group("late", 0, 100));
        let w = window(&samples, 0.1).unwrap();
        assert_eq!(w.groups[0].processed_msgs_per_s, Some(0.0));
        assert_eq!(w.groups[0].backlog_slope_per_s, Some(0.0));
    }

    #[test]
    fn parses_xinfo_replies_in_resp2_and_resp3() {
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("name"),
            bulk("bearing_diagnosis"),
            bulk("consumers"),
            Value::Int(2),
            bulk("pending"),
            Value::Int(5),
            bulk("last-delivered-id"),
            bulk("1-0"),
            bulk("entries-read"),
            Value::Int(120),
            bulk("lag"),
            Value::Nil,
        ])]);
        assert_eq!(
            parse_groups(&resp2),
            vec![GroupSample {
                name: "bearing_diagnosis".into(),
                consumers: 2,
                pending: 5,
                entries_read: Some(120),
                lag: None,
                last_delivered: Some(StreamId(1, 0)),
                trimmed_unread: None,
            }]
        );
        let resp3 = Value::Array(vec![Value::Map(vec![
            (bulk("name"), bulk("g")),
            (bulk("pending"), Value::Int(1)),
            (bulk("lag"), Value::Int(4)),
        ])]);
        assert_eq!(parse_groups(&resp3)[0].lag, Some(4));
        assert!(parse_groups(&Value::Nil).is_empty());
        let stream = Value::Array(vec![
            bulk("length"),
            Value::Int(3),
            bulk("entries-added"),
            Value::Int(42),
            bulk("first-entry"),
            Value::Array(vec![bulk("17-3"), Value::Array(vec![bulk("f"), bulk("v")])]),
        ]);
        assert_eq!(parse_entries_added(&stream), Some(42));
        assert_eq!(parse_entries_added(&Value::Array(vec![])), None);
    }
}
