//! Scores the backend's diagnoses against the truth vtox injected: each entry of
//! `fault_diagnosis_results` is joined to its raw entry in `motor_raw_data` through
//! `original_message_id`, whose `metadata` says which fault was injected and when it was sent.
//!
//! Rules (exact counts, nothing estimated):
//! - A result is read from its fields `fault_type` (the analyzer's fault class; `analyzer`
//!   such as `bearing_diagnosis` is accepted instead), `status` (`warning`, `fault`,
//!   `critical` or `alarm` flag the message; `normal`, `ok` or `healthy` clear it) and
//!   `original_message_id`. A result missing one of them is `unreadable`.
//! - Its raw entry gone (trimmed by MAXLEN) counts as `raw_trimmed`; a raw entry without
//!   vtox's truth in its metadata counts as `no_truth`. Neither is guessed.
//! - For analyzer T, a joined message is *faulty* when its injected `fault_type` is T (vtox
//!   labels a vehicle `normal` before onset and after recovery, so the label is the signal),
//!   *normal* when it is `normal`, and *other* when it carries another fault.
//!   detection = flagged faulty / faulty; false positives = flagged normal / normal;
//!   precision = flagged faulty / all flagged.
//! - Lag = the result entry's ID time (when Redis took the diagnosis) minus the message's
//!   `sent_at`. Both clocks must agree (NTP); a negative lag counts in `clock_skew` as 0.

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use thiserror::Error;

/// The five analyzers of the backend, in the order they are shown.
pub const ANALYZERS: [&str; 5] = [
    "turn_fault",
    "insulation",
    "bearing",
    "eccentricity",
    "broken_bar",
];

/// What vtox injected into one message (its raw entry's `metadata`).
#[derive(Debug, Clone, PartialEq)]
pub struct Truth {
    pub fault_type: String,
    pub severity: f64,
    /// Unix milliseconds of `sent_at`.
    pub sent_at_ms: Option<f64>,
}

impl Truth {
    /// Reads the truth from the `metadata` JSON text; None when it carries none.
    pub fn from_metadata(text: &str) -> Option<Truth> {
        let v: Value = serde_json::from_str(text).ok()?;
        Some(Truth {
            fault_type: v.get("fault_type")?.as_str()?.to_string(),
            severity: v
                .get("fault_severity")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            sent_at_ms: v
                .get("sent_at")
                .and_then(Value::as_str)
                .and_then(parse_time_ms),
        })
    }
}

/// Unix milliseconds of an RFC 3339 time (`Z` or no zone, taken as UTC).
pub fn parse_time_ms(text: &str) -> Option<f64> {
    let t = humantime::parse_rfc3339_weak(text).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64() * 1e3)
}

/// The milliseconds part of a stream entry ID (`1764320000123-0`).
pub fn id_ms(id: &str) -> Option<u64> {
    id.split_once('-').map_or(id, |(ms, _)| ms).parse().ok()
}

/// One diagnosis as read from the results stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    pub analyzer: String,
    pub flagged: bool,
    pub original_id: String,
    pub at_ms: u64,
}

#[derive(Debug, Error, PartialEq)]
pub enum DiagnosisError {
    #[error("the result has no {0}")]
    Missing(&'static str),
    #[error("unknown status {0:?}")]
    Status(String),
    #[error("entry ID {0:?} is not a stream ID")]
    Id(String),
}

impl Diagnosis {
    /// Reads a result entry; `fields` are its field/value pairs.
    pub fn parse(id: &str, fields: &[(String, String)]) -> Result<Diagnosis, DiagnosisError> {
        let get = |k: &str| {
            fields
                .iter()
                .find(|(f, _)| f == k)
                .map(|(_, v)| v.trim())
                .filter(|v| !v.is_empty())
        };
        let analyzer = get("fault_type")
            .or_else(|| get("analyzer").map(|a| a.strip_suffix("_diagnosis").unwrap_or(a)))
            .ok_or(DiagnosisError::Missing("fault_type"))?;
        let status = get("status").ok_or(DiagnosisError::Missing("status"))?;
        let flagged = match status.to_ascii_lowercase().as_str() {
            "warning" | "fault" | "critical" | "alarm" => true,
            "normal" | "ok" | "healthy" => false,
            _ => return Err(DiagnosisError::Status(status.to_string())),
        };
        let original_id =
            get("original_message_id").ok_or(DiagnosisError::Missing("original_message_id"))?;
        Ok(Diagnosis {
            analyzer: analyzer.to_string(),
            flagged,
            original_id: original_id.to_string(),
            at_ms: id_ms(id).ok_or_else(|| DiagnosisError::Id(id.to_string()))?,
        })
    }
}

/// How a result's raw entry was found.
#[derive(Debug, Clone, Copy)]
pub enum Raw<'a> {
    /// The raw stream no longer holds it.
    Trimmed,
    /// Found; None when its metadata carries no truth.
    Found(Option<&'a Truth>),
}

/// Flagged out of seen, for one class of message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub seen: u64,
    pub flagged: u64,
}

impl Tally {
    fn add(&mut self, flagged: bool) {
        self.seen += 1;
        self.flagged += u64::from(flagged);
    }

    fn json(&self) -> Value {
        json!({"seen": self.seen, "flagged": self.flagged})
    }
}

fn percent(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

fn lag_histogram() -> Histogram<u64> {
    // 1 ms to 30 days: a backend far behind still scores exactly.
    Histogram::new_with_bounds(1, 30 * 86_400_000, 3).expect("constant bounds are valid")
}

/// One analyzer's score.
#[derive(Debug, Clone)]
pub struct AnalyzerScore {
    pub faulty: Tally,
    pub normal: Tally,
    pub other: Tally,
    /// Diagnosis lag in milliseconds.
    pub lag_ms: Histogram<u64>,
}

impl Default for AnalyzerScore {
    fn default() -> Self {
        AnalyzerScore {
            faulty: Tally::default(),
            normal: Tally::default(),
            other: Tally::default(),
            lag_ms: lag_histogram(),
        }
    }
}

impl AnalyzerScore {
    pub fn results(&self) -> u64 {
        self.faulty.seen + self.normal.seen + self.other.seen
    }

    pub fn detection_percent(&self) -> Option<f64> {
        percent(self.faulty.flagged, self.faulty.seen)
    }

    pub fn false_positive_percent(&self) -> Option<f64> {
        percent(self.normal.flagged, self.normal.seen)
    }

    pub fn precision_percent(&self) -> Option<f64> {
        percent(
            self.faulty.flagged,
            self.faulty.flagged + self.normal.flagged + self.other.flagged,
        )
    }

    fn lag_q(&self, q: f64) -> Option<u64> {
        (!self.lag_ms.is_empty()).then(|| self.lag_ms.value_at_quantile(q))
    }
}

/// The score of every result read.
#[derive(Debug, Clone, Default)]
pub struct Scorecard {
    pub results: u64,
    pub unreadable: u64,
    pub raw_trimmed: u64,
    pub no_truth: u64,
    pub clock_skew: u64,
    pub analyzers: BTreeMap<String, AnalyzerScore>,
}

impl Scorecard {
    pub fn new() -> Self {
        let mut s = Scorecard::default();
        for a in ANALYZERS {
            s.analyzers.insert(a.to_string(), AnalyzerScore::default());
        }
        s
    }

    /// Counts a result that could not be read.
    pub fn add_unreadable(&mut self) {
        self.results += 1;
        self.unreadable += 1;
    }

    /// Counts one diagnosis joined (or not) to its raw entry.
    pub fn add(&mut self, d: &Diagnosis, raw: Raw<'_>) {
        self.results += 1;
        let truth = match raw {
            Raw::Trimmed => {
                self.raw_trimmed += 1;
                return;
            }
            Raw::Found(None) => {
                self.no_truth += 1;
                return;
            }
            Raw::Found(Some(t)) => t,
        };
        let score = self.analyzers.entry(d.analyzer.clone()).or_default();
        if truth.fault_type == d.analyzer {
            score.faulty.add(d.flagged);
        } else if truth.fault_type == "normal" {
            score.normal.add(d.flagged);
        } else {
            score.other.add(d.flagged);
        }
        if let Some(sent) = truth.sent_at_ms {
            let lag = d.at_ms as f64 - sent;
            if lag < 0.0 {
                self.clock_skew += 1;
            }
            score.lag_ms.saturating_record(lag.max(0.0).round() as u64);
        }
    }

    /// Results joined to a raw entry with truth.
    pub fn joined(&self) -> u64 {
        self.analyzers.values().map(AnalyzerScore::results).sum()
    }

    pub fn json(&self) -> Value {
        let analyzers: serde_json::Map<String, Value> = self
            .analyzers
            .iter()
            .map(|(name, s)| {
                let lag = if s.lag_ms.is_empty() {
                    Value::Null
                } else {
                    json!({
                        "p50": s.lag_q(0.5), "p95": s.lag_q(0.95), "p99": s.lag_q(0.99),
                        "max": s.lag_ms.max(), "mean": s.lag_ms.mean(),
                    })
                };
                let v = json!({
                    "results": s.results(),
                    "faulty": s.faulty.json(),
                    "normal": s.normal.json(),
                    "other_faults": s.other.json(),
                    "detection_percent": s.detection_percent(),
                    "false_positive_percent": s.false_positive_percent(),
                    "precision_percent": s.precision_percent(),
                    "lag_ms": lag,
                });
                (name.clone(), v)
            })
            .collect();
        json!({
            "results": self.results,
            "joined": self.joined(),
            "raw_trimmed": self.raw_trimmed,
            "no_truth": self.no_truth,
            "unreadable": self.unreadable,
            "clock_skew": self.clock_skew,
            "analyzers": analyzers,
        })
    }

    pub fn table(&self) -> String {
        let pct = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.2}%"));
        let ms = |x: Option<u64>| x.map_or_else(|| "-".to_string(), |v| v.to_string());
        let mut out = format!(
            "{} results: {} joined, {} raw entry trimmed, {} without truth, {} unreadable{}\n",
            self.results,
            self.joined(),
            self.raw_trimmed,
            self.no_truth,
            self.unreadable,
            if self.clock_skew > 0 {
                format!(", {} before their send time (clock skew)", self.clock_skew)
            } else {
                String::new()
            }
        );
        out.push_str(&format!(
            "{:<14} {:>8} {:>15} {:>10} {:>15} {:>9} {:>10} {:>10} {:>10}\n",
            "analyzer",
            "results",
            "faults flagged",
            "detection",
            "normal flagged",
            "false +",
            "lag p50 ms",
            "p95 ms",
            "p99 ms"
        ));
        for (name, s) in &self.analyzers {
            out.push_str(&format!(
                "{:<14} {:>8} {:>15} {:>10} {:>15} {:>9} {:>10} {:>10} {:>10}\n",
                name,
                s.results(),
                format!("{}/{}", s.faulty.flagged, s.faulty.seen),
                pct(s.detection_percent()),
                format!("{}/{}", s.normal.flagged, s.normal.seen),
                pct(s.false_positive_percent()),
                ms(s.lag_q(0.5)),
                ms(s.lag_q(0.95)),
                ms(s.lag_q(0.99)),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn truth(kind: &str, sent_ms: f64) -> Truth {
        Truth {
            fault_type: kind.into(),
            severity: if kind == "normal" { 0.0 } else { 0.5 },
            sent_at_ms: Some(sent_ms),
        }
    }

    fn diag(analyzer: &str, flagged: bool, at_ms: u64) -> Diagnosis {
        Diagnosis {
            analyzer: analyzer.into(),
            flagged,
            original_id: "1-0".into(),
            at_ms,
        }
    }

    #[test]
    fn reads_truth_from_the_metadata_vtox_writes() {
        let t = Truth::from_metadata(
            r#"{"vehicle_id":"x","seq":3,"fault_type":"bearing","fault_severity":0.4213,
                "sent_at":"2026-11-28T09:00:00.124001Z"}"#,
        )
        .unwrap();
        assert_eq!(t.fault_type, "bearing");
        assert_eq!(t.severity, 0.4213);
        let ms = t.sent_at_ms.unwrap();
        assert!((ms - 1_795_856_400_124.001).abs() < 0.01, "{ms}");
        assert_eq!(Truth::from_metadata(r#"{"vehicle_id":"x"}"#), None);
        assert_eq!(Truth::from_metadata("not json"), None);
    }

    #[test]
    fn reads_results_in_the_backend_layout() {
        let d = Diagnosis::parse(
            "1764320000123-4",
            &fields(&[
                ("vehicle_id", "v"),
                ("fault_type", "bearing"),
                ("status", "Warning"),
                ("score", "0.7"),
                ("original_message_id", "1764320000001-0"),
            ]),
        )
        .unwrap();
        assert_eq!(
            d,
            Diagnosis {
                analyzer: "bearing".into(),
                flagged: true,
                original_id: "1764320000001-0".into(),
                at_ms: 1_764_320_000_123
            }
        );
        let d = Diagnosis::parse(
            "5-0",
            &fields(&[
                ("analyzer", "broken_bar_diagnosis"),
                ("status", "normal"),
                ("original_message_id", "1-0"),
            ]),
        )
        .unwrap();
        assert_eq!((d.analyzer.as_str(), d.flagged), ("broken_bar", false));
        let e = Diagnosis::parse("5-0", &fields(&[("fault_type", "bearing")]));
        assert_eq!(e, Err(DiagnosisError::Missing("status")));
        let e = Diagnosis::parse(
            "5-0",
            &fields(&[
                ("fault_type", "bearing"),
                ("status", "maybe"),
                ("original_message_id", "1-0"),
            ]),
        );
        assert_eq!(e, Err(DiagnosisError::Status("maybe".into())));
        let e = Diagnosis::parse(
            "x",
            &fields(&[
                ("fault_type", "bearing"),
                ("status", "ok"),
                ("original_message_id", "1-0"),
            ]),
        );
        assert_eq!(e, Err(DiagnosisError::Id("x".into())));
    }

    #[test]
    fn scores_are_exact_counts() {
        let mut s = Scorecard::new();
        let faulty = truth("bearing", 1000.0);
        let normal = truth("normal", 1000.0);
        let other = truth("insulation", 1000.0);
        // 4 bearing faults, 3 flagged; 10 normal, 1 flagged; 2 insulation, 1 flagged.
        for i in 0..4 {
            s.add(&diag("bearing", i < 3, 1100), Raw::Found(Some(&faulty)));
        }
        for i in 0..10 {
            s.add(&diag("bearing", i == 0, 1300), Raw::Found(Some(&normal)));
        }
        for i in 0..2 {
            s.add(&diag("bearing", i == 0, 1200), Raw::Found(Some(&other)));
        }
        s.add(&diag("bearing", true, 1), Raw::Trimmed);
        s.add(&diag("bearing", true, 1), Raw::Found(None));
        s.add_unreadable();
        let b = &s.analyzers["bearing"];
        assert_eq!(
            b.faulty,
            Tally {
                seen: 4,
                flagged: 3
            }
        );
        assert_eq!(
            b.normal,
            Tally {
                seen: 10,
                flagged: 1
            }
        );
        assert_eq!(
            b.other,
            Tally {
                seen: 2,
                flagged: 1
            }
        );
        assert_eq!(b.detection_percent(), Some(75.0));
        assert_eq!(b.false_positive_percent(), Some(10.0));
        assert_eq!(b.precision_percent(), Some(60.0));
        assert_eq!(
            (
                s.results,
                s.joined(),
                s.raw_trimmed,
                s.no_truth,
                s.unreadable
            ),
            (19, 16, 1, 1, 1)
        );
        assert_eq!(b.lag_q(0.5), Some(300));
        assert_eq!(b.lag_ms.min(), 100);
        let j = s.json();
        assert_eq!(j["analyzers"]["bearing"]["faulty"]["flagged"], 3);
        assert_eq!(
            j["analyzers"]["insulation"]["detection_percent"],
            Value::Null
        );
        assert_eq!(j["raw_trimmed"], 1);
        assert!(s.table().contains("3/4"), "{}", s.table());
    }

    #[test]
    fn a_result_before_its_send_time_is_clock_skew() {
        let mut s = Scorecard::new();
        s.add(
            &diag("bearing", false, 900),
            Raw::Found(Some(&truth("normal", 1000.0))),
        );
        assert_eq!(s.clock_skew, 1);
        assert_eq!(s.analyzers["bearing"].lag_ms.max(), 0);
    }

    #[test]
    fn an_hour_of_lag_is_recorded_exactly_enough() {
        let mut s = Scorecard::new();
        s.add(
            &diag("bearing", false, 3_600_000),
            Raw::Found(Some(&truth("normal", 0.0))),
        );
        let p50 = s.analyzers["bearing"].lag_q(0.5).unwrap();
        assert!((3_596_000..=3_604_000).contains(&p50), "{p50}");
    }

    #[test]
    fn stream_ids_give_milliseconds() {
        assert_eq!(id_ms("1764320000123-0"), Some(1_764_320_000_123));
        assert_eq!(id_ms("17"), Some(17));
        assert_eq!(id_ms("abc-0"), None);
    }
}
