//! The backend's pipeline as its Redis shows it: how fast raw messages arrive, how fast each
//! diagnosis consumer group gets through them, and whether a group's backlog grows. Pure
//! arithmetic over samples; `vtox-coord` takes the samples (read-only) once a second.
//!
//! Counting rules (Redis 7 and later; older servers lack the counters and show "unknown"):
//! - ingest = growth of `entries-added` of the raw stream (`XINFO STREAM`): it counts every
//!   XADD, so the stream's MAXLEN trimming does not hide arrivals the way `XLEN` would.
//! - a group's backlog = entries never delivered to it (`lag`, or `entries-added` minus the
//!   group's `entries-read` where Redis cannot compute `lag`) plus entries delivered but not
//!   acknowledged (`pending`): the diagnosis work not yet done.
//! - a group's processing = growth of (`entries-read` − `pending`): entries it finished.
//! - the backlog's slope is the least-squares line through the window's samples, in entries/s,
//!   so one batch read at a sampling instant does not decide a verdict.

use redis::Value;
use serde::Serialize;

/// The stream the backend's ingest API appends to.
pub const RAW_STREAM: &str = "motor_raw_data";
/// The stream the backend's analyzers write their diagnoses to.
pub const RESULTS_STREAM: &str = "fault_diagnosis_results";
/// A backlog growing slower than this many entries/s is noise, whatever the ingest rate.
pub const MIN_GROWTH_PER_S: f64 = 2.0;

/// One consumer group of the raw stream at one instant (`XINFO GROUPS`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GroupSample {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    /// Entries delivered to the group so far (Redis 7+).
    pub entries_read: Option<u64>,
    /// Entries not yet delivered to the group (Redis 7+, and not always computable).
    pub lag: Option<u64>,
}

impl GroupSample {
    /// Diagnosis work not yet done: undelivered plus delivered-but-unacknowledged entries.
    pub fn backlog(&self, raw_added: Option<u64>) -> Option<u64> {
        let undelivered = match self.lag {
            Some(lag) => lag,
            None => raw_added?.saturating_sub(self.entries_read?),
        };
        Some(undelivered + self.pending)
    }

    /// Entries the group finished: delivered and acknowledged. A group that has read nothing
    /// yet has no `entries-read`; its `lag` then tells the same.
    pub fn processed(&self, raw_added: Option<u64>) -> Option<u64> {
        let read = match self.entries_read {
            Some(r) => r,
            None => raw_added?.checked_sub(self.lag?)?,
        };
        Some(read.saturating_sub(self.pending))
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

/// One group over a window of samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupWindow {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    pub backlog_start: Option<u64>,
    pub backlog_end: Option<u64>,
    /// Least-squares slope of the backlog, entries/s (positive: falling behind).
    pub backlog_slope_per_s: Option<f64>,
    pub processed_per_s: Option<f64>,
}

/// The pipeline over a window of samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    pub seconds: f64,
    pub raw_len: u64,
    pub ingest_per_s: Option<f64>,
    pub results_per_s: Option<f64>,
    pub groups: Vec<GroupWindow>,
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

/// Summarizes samples (oldest first); None with fewer than two samples.
pub fn window(samples: &[Sample]) -> Option<Window> {
    let (first, last) = (samples.first()?, samples.last()?);
    let dt = last.at_s - first.at_s;
    if samples.len() < 2 || dt <= 0.0 {
        return None;
    }
    let groups = last
        .groups
        .iter()
        .map(|g| {
            let history: Vec<(f64, &GroupSample, Option<u64>)> = samples
                .iter()
                .filter_map(|s| {
                    let h = s.groups.iter().find(|x| x.name == g.name)?;
                    Some((s.at_s, h, s.raw_added))
                })
                .collect();
            let points: Vec<(f64, f64)> = history
                .iter()
                .filter_map(|(t, h, added)| Some((t - first.at_s, h.backlog(*added)? as f64)))
                .collect();
            let (t0, h0, a0) = history[0];
            let processed_per_s = if last.at_s > t0 {
                rate(
                    h0.processed(a0),
                    g.processed(last.raw_added),
                    last.at_s - t0,
                )
            } else {
                None
            };
            GroupWindow {
                name: g.name.clone(),
                consumers: g.consumers,
                pending: g.pending,
                backlog_start: h0.backlog(a0),
                backlog_end: g.backlog(last.raw_added),
                backlog_slope_per_s: slope(&points),
                processed_per_s,
            }
        })
        .collect();
    Some(Window {
        seconds: dt,
        raw_len: last.raw_len,
        ingest_per_s: rate(first.raw_added, last.raw_added, dt),
        results_per_s: rate(first.results_added, last.results_added, dt),
        groups,
    })
}

impl Window {
    /// The growth above which a backlog counts as growing: `tolerance` (a fraction) of the
    /// ingest rate, and never below [`MIN_GROWTH_PER_S`].
    pub fn growth_limit(&self, tolerance: f64) -> f64 {
        (self.ingest_per_s.unwrap_or(0.0) * tolerance).max(MIN_GROWTH_PER_S)
    }

    /// Groups whose backlog grew faster than the limit over the window: diagnosis slower
    /// than ingest.
    pub fn falling_behind(&self, tolerance: f64) -> Vec<&GroupWindow> {
        let limit = self.growth_limit(tolerance);
        self.groups
            .iter()
            .filter(|g| g.backlog_slope_per_s.is_some_and(|s| s > limit))
            .collect()
    }

    /// One table for people: the streams, then a line per group.
    pub fn table(&self, tolerance: f64) -> String {
        let opt = |x: Option<f64>| x.map_or_else(|| "unknown".to_string(), |v| format!("{v:.1}"));
        let mut out = format!(
            "redis: {} raw entries, ingest {}/s, results {}/s\n",
            self.raw_len,
            opt(self.ingest_per_s),
            opt(self.results_per_s)
        );
        if self.groups.is_empty() {
            out.push_str("  no consumer group reads the raw stream\n");
            return out;
        }
        out.push_str(&format!(
            "{:<28} {:>9} {:>9} {:>9} {:>9}  trend\n",
            "group", "consumers", "pending", "backlog", "done/s"
        ));
        let limit = self.growth_limit(tolerance);
        for g in &self.groups {
            let trend = match g.backlog_slope_per_s {
                None => "unknown".to_string(),
                Some(s) if s > limit => format!("GROWING +{s:.1}/s"),
                Some(s) if s < -limit => format!("draining {s:.1}/s"),
                Some(_) => "steady".to_string(),
            };
            out.push_str(&format!(
                "{:<28} {:>9} {:>9} {:>9} {:>9}  {trend}\n",
                g.name,
                g.consumers,
                g.pending,
                g.backlog_end
                    .map_or_else(|| "unknown".into(), |b| b.to_string()),
                opt(g.processed_per_s),
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

    fn group(name: &str, pending: u64, read: u64, lag: Option<u64>) -> GroupSample {
        GroupSample {
            name: name.into(),
            consumers: 1,
            pending,
            entries_read: Some(read),
            lag,
        }
    }

    fn sample(t: f64, added: u64, groups: Vec<GroupSample>) -> Sample {
        Sample {
            at_s: t,
            raw_len: added.min(50_000),
            raw_added: Some(added),
            results_added: Some(added * 5),
            groups,
        }
    }

    #[test]
    fn backlog_counts_undelivered_and_unacknowledged_work() {
        assert_eq!(group("g", 7, 100, Some(30)).backlog(Some(130)), Some(37));
        // Without lag, from the stream's counter.
        assert_eq!(group("g", 7, 100, None).backlog(Some(150)), Some(57));
        assert_eq!(group("g", 7, 100, None).backlog(None), None);
        assert_eq!(group("g", 7, 100, None).processed(None), Some(93));
        let unread = GroupSample {
            lag: Some(40),
            ..Default::default()
        };
        assert_eq!(unread.processed(Some(40)), Some(0));
        assert_eq!(unread.processed(None), None);
        let old = GroupSample {
            name: "g".into(),
            pending: 3,
            ..Default::default()
        };
        assert_eq!(old.backlog(Some(10)), None, "Redis 6 cannot tell");
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
                    vec![
                        group("fast", 2, added, Some(0)),
                        group("slow", 10, 1000 + 100 * i, Some(60 * i)),
                    ],
                )
            })
            .collect();
        let w = window(&samples).unwrap();
        assert_eq!(w.ingest_per_s, Some(160.0));
        assert_eq!(w.results_per_s, Some(800.0));
        let slow = &w.groups[1];
        assert_eq!(slow.processed_per_s, Some(100.0));
        assert!((slow.backlog_slope_per_s.unwrap() - 60.0).abs() < 1e-9);
        assert_eq!(
            (slow.backlog_start, slow.backlog_end),
            (Some(10), Some(610))
        );
        let behind: Vec<_> = w.falling_behind(0.1).iter().map(|g| &g.name).collect();
        assert_eq!(behind, ["slow"]);
        let t = w.table(0.1);
        assert!(t.contains("GROWING +60.0/s") && t.contains("steady"), "{t}");
        // A generous tolerance (50% of 160/s = 80/s) lets it pass.
        assert!(w.falling_behind(0.5).is_empty());
    }

    #[test]
    fn small_growth_is_noise() {
        let samples: Vec<Sample> = (0..5)
            .map(|i| sample(i as f64, 10 + i, vec![group("g", 0, 10, Some(i))]))
            .collect();
        let w = window(&samples).unwrap();
        assert!(
            w.falling_behind(0.0).is_empty(),
            "1 entry/s is below the floor"
        );
        assert!(window(&samples[..1]).is_none());
    }

    #[test]
    fn a_group_that_appears_mid_window_is_judged_on_its_own_samples() {
        let mut samples: Vec<Sample> = (0..4).map(|i| sample(i as f64, 100, vec![])).collect();
        samples[2].groups.push(group("late", 0, 100, Some(0)));
        samples[3].groups.push(group("late", 0, 100, Some(0)));
        let w = window(&samples).unwrap();
        assert_eq!(w.groups[0].processed_per_s, Some(0.0));
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
        ]);
        assert_eq!(parse_entries_added(&stream), Some(42));
        assert_eq!(parse_entries_added(&Value::Array(vec![])), None);
    }
}
