//! Fault injection: which vehicles develop which fault, when, and how badly. Everything is a
//! pure function of (seed, vehicle number, time since the run started), so a vehicle keeps its
//! fault history wherever and whenever its simulator runs.

use crate::rng::{hash3, uniform, unit};
use std::fmt;
use std::str::FromStr;

/// The fault classes of the VTOX analyzers, plus `normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    Normal,
    TurnFault,
    Insulation,
    Bearing,
    Eccentricity,
    BrokenBar,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Normal,
        FaultKind::TurnFault,
        FaultKind::Insulation,
        FaultKind::Bearing,
        FaultKind::Eccentricity,
        FaultKind::BrokenBar,
    ];

    /// The name used on the wire and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            FaultKind::Normal => "normal",
            FaultKind::TurnFault => "turn_fault",
            FaultKind::Insulation => "insulation",
            FaultKind::Bearing => "bearing",
            FaultKind::Eccentricity => "eccentricity",
            FaultKind::BrokenBar => "broken_bar",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultSpecError {
    #[error(
        "unknown fault {0:?} (known: turn_fault, insulation, bearing, eccentricity, broken_bar)"
    )]
    Unknown(String),
    #[error("fault entry {0:?} must look like name=percent, e.g. bearing=3")]
    Syntax(String),
    #[error("fault percentage {0:?} must be a number from 0 to 100")]
    Percent(String),
    #[error("fault {0} is given twice")]
    Duplicate(FaultKind),
    #[error("fault percentages add up to {0}%, more than 100%")]
    Over100(f64),
}

impl FromStr for FaultKind {
    type Err = FaultSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| FaultSpecError::Unknown(s.to_string()))
    }
}

/// `--faults insulation=5,bearing=3`: the percent of vehicles that develop each fault; the
/// rest stay normal. Onsets fall within the first `onset_window_s` of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultMix {
    shares: Vec<(FaultKind, f64)>,
    onset_window_s: f64,
}

impl Default for FaultMix {
    fn default() -> Self {
        FaultMix {
            shares: Vec::new(),
            onset_window_s: MAX_ONSET_S,
        }
    }
}

impl FaultMix {
    pub fn none() -> Self {
        FaultMix::default()
    }

    /// The same mix with onsets within the first `seconds` of the run (`--fault-onset`);
    /// 0 makes every faulty vehicle faulty from its first message. Negative or non-finite
    /// values are taken as 0.
    pub fn with_onset_window(mut self, seconds: f64) -> Self {
        self.onset_window_s = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        self
    }

    /// The window after the run start in which onsets fall, in seconds.
    pub fn onset_window_s(&self) -> f64 {
        self.onset_window_s
    }

    pub fn shares(&self) -> &[(FaultKind, f64)] {
        &self.shares
    }

    /// Percent of vehicles with any fault.
    pub fn total_percent(&self) -> f64 {
        self.shares.iter().map(|(_, p)| p).sum()
    }
}

impl FromStr for FaultMix {
    type Err = FaultSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut shares: Vec<(FaultKind, f64)> = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, pct) = entry
                .split_once('=')
                .ok_or_else(|| FaultSpecError::Syntax(entry.to_string()))?;
            let kind: FaultKind = name.trim().parse()?;
            if kind == FaultKind::Normal {
                // "normal" is whatever is left; naming it is a likely misunderstanding.
                return Err(FaultSpecError::Unknown(name.trim().to_string()));
            }
            let p: f64 = pct
                .trim()
                .parse()
                .map_err(|_| FaultSpecError::Percent(pct.trim().to_string()))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(FaultSpecError::Percent(pct.trim().to_string()));
            }
            if shares.iter().any(|(k, _)| *k == kind) {
                return Err(FaultSpecError::Duplicate(kind));
            }
            shares.push((kind, p));
        }
        let total: f64 = shares.iter().map(|(_, p)| p).sum();
        if total > 100.0 + 1e-9 {
            return Err(FaultSpecError::Over100(total));
        }
        // A canonical order keeps assignment independent of how the user ordered the list.
        shares.sort_by_key(|(k, _)| *k);
        Ok(FaultMix {
            shares,
            ..FaultMix::default()
        })
    }
}

const TAG_KIND: u64 = 1;
const TAG_ONSET: u64 = 2;
const TAG_RAMP: u64 = 3;
const TAG_PEAK: u64 = 4;
const TAG_RECOVER: u64 = 5;
const TAG_HOLD: u64 = 6;

/// Onsets fall in the first five minutes of a run by default, so that short runs see faults
/// develop (`--fault-onset` changes it).
pub const MAX_ONSET_S: f64 = 300.0;

/// With an onset window of 0, a fault begins this long before the run start: even the oldest
/// sample of a vehicle's first message carries it, with a severity already visibly grown
/// (a tenth to a half of its peak), and it keeps growing from there.
pub const FROM_START_LEAD_S: f64 = 60.0;

/// One vehicle's fault history over the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    pub kind: FaultKind,
    /// Seconds after the run start at which the fault begins.
    pub onset_s: f64,
    /// Seconds from onset to peak severity (and from the end of the hold back to zero).
    pub ramp_s: f64,
    /// Severity reached at the peak, in (0, 1].
    pub peak: f64,
    /// Intermittent faults hold at the peak this long, then recover; None for faults that stay.
    pub recover_after_s: Option<f64>,
}

impl FaultPlan {
    pub const NORMAL: FaultPlan = FaultPlan {
        kind: FaultKind::Normal,
        onset_s: f64::INFINITY,
        ramp_s: 1.0,
        peak: 0.0,
        recover_after_s: None,
    };

    /// Decides vehicle n's fault from the mix. The kind is drawn by a hash of (seed, n), so
    /// the share of each fault holds on any large enough range of vehicles.
    pub fn for_vehicle(mix: &FaultMix, seed: u64, n: u64) -> FaultPlan {
        let u = unit(hash3(seed, n, TAG_KIND)) * 100.0;
        let mut acc = 0.0;
        let Some(kind) = mix.shares.iter().find_map(|(k, p)| {
            acc += p;
            (u < acc).then_some(*k)
        }) else {
            return FaultPlan::NORMAL;
        };
        let recovers = unit(hash3(seed, n, TAG_RECOVER)) < 0.25;
        FaultPlan {
            kind,
            onset_s: if mix.onset_window_s > 0.0 {
                uniform(hash3(seed, n, TAG_ONSET), 0.0, mix.onset_window_s)
            } else {
                -FROM_START_LEAD_S
            },
            ramp_s: uniform(hash3(seed, n, TAG_RAMP), 120.0, 600.0),
            peak: uniform(hash3(seed, n, TAG_PEAK), 0.4, 1.0),
            recover_after_s: recovers.then(|| uniform(hash3(seed, n, TAG_HOLD), 60.0, 300.0)),
        }
    }

    /// A plan with a given kind and constant severity from t = 0 (tests, calibration).
    pub fn constant(kind: FaultKind, severity: f64) -> FaultPlan {
        FaultPlan {
            kind,
            onset_s: -1e9,
            ramp_s: 1e-9,
            peak: severity.clamp(0.0, 1.0),
            recover_after_s: None,
        }
    }

    /// Severity at `t` seconds after the run start: 0 before onset, a linear rise to the peak,
    /// then either a plateau or, for intermittent faults, a hold and a linear recovery.
    pub fn severity(&self, t: f64) -> f64 {
        if self.kind == FaultKind::Normal || t <= self.onset_s {
            return 0.0;
        }
        let since = t - self.onset_s;
        if since < self.ramp_s {
            return self.peak * since / self.ramp_s;
        }
        match self.recover_after_s {
            None => self.peak,
            Some(hold) => {
                let after_hold = since - self.ramp_s - hold;
                if after_hold <= 0.0 {
                    self.peak
                } else {
                    (self.peak * (1.0 - after_hold / self.ramp_s)).max(0.0)
                }
            }
        }
    }

    /// What is injected at time t: the fault and its severity, or `normal` at 0 when nothing
    /// is (before onset or after recovery), so the label is always the ground truth.
    pub fn state(&self, t: f64) -> (FaultKind, f64) {
        let s = self.severity(t);
        if s > 0.0 {
            (self.kind, s)
        } else {
            (FaultKind::Normal, 0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mixes() {
        let m: FaultMix = "insulation=5, bearing=3".parse().unwrap();
        assert_eq!(
            m.shares(),
            &[(FaultKind::Insulation, 5.0), (FaultKind::Bearing, 3.0)]
        );
        assert_eq!(m.total_percent(), 8.0);
        assert_eq!("".parse::<FaultMix>().unwrap(), FaultMix::none());
    }

    #[test]
    fn rejects_bad_mixes() {
        assert_eq!(
            "rust=5".parse::<FaultMix>(),
            Err(FaultSpecError::Unknown("rust".into()))
        );
        assert_eq!(
            "bearing".parse::<FaultMix>(),
            Err(FaultSpecError::Syntax("bearing".into()))
        );
        assert_eq!(
            "bearing=x".parse::<FaultMix>(),
            Err(FaultSpecError::Percent("x".into()))
        );
        assert_eq!(
            "bearing=-1".parse::<FaultMix>(),
            Err(FaultSpecError::Percent("-1".into()))
        );
        assert_eq!(
            "bearing=1,bearing=2".parse::<FaultMix>(),
            Err(FaultSpecError::Duplicate(FaultKind::Bearing))
        );
        assert_eq!(
            "bearing=60,insulation=50".parse::<FaultMix>(),
            Err(FaultSpecError::Over100(110.0))
        );
        assert!("normal=5".parse::<FaultMix>().is_err());
    }

    #[test]
    fn assignment_is_deterministic_and_follows_the_mix() {
        let m: FaultMix = "insulation=5,bearing=3,broken_bar=2".parse().unwrap();
        let n = 200_000u64;
        let mut counts = std::collections::HashMap::new();
        for v in 0..n {
            let p = FaultPlan::for_vehicle(&m, 42, v);
            assert_eq!(p, FaultPlan::for_vehicle(&m, 42, v));
            *counts.entry(p.kind).or_insert(0u64) += 1;
        }
        let pct = |k| *counts.get(&k).unwrap_or(&0) as f64 * 100.0 / n as f64;
        assert!((pct(FaultKind::Insulation) - 5.0).abs() < 0.2);
        assert!((pct(FaultKind::Bearing) - 3.0).abs() < 0.2);
        assert!((pct(FaultKind::BrokenBar) - 2.0).abs() < 0.2);
        assert_eq!(pct(FaultKind::TurnFault), 0.0);
        // Another seed picks other vehicles.
        let differs = (0..1000).any(|v| {
            FaultPlan::for_vehicle(&m, 42, v).kind != FaultPlan::for_vehicle(&m, 43, v).kind
        });
        assert!(differs);
        // The order in the spec does not matter.
        let m2: FaultMix = "broken_bar=2,bearing=3,insulation=5".parse().unwrap();
        assert_eq!(
            FaultPlan::for_vehicle(&m2, 42, 77),
            FaultPlan::for_vehicle(&m, 42, 77)
        );
    }

    #[test]
    fn the_onset_window_bounds_onsets_and_zero_means_from_the_first_message() {
        let m: FaultMix = "bearing=100".parse().unwrap();
        assert_eq!(m.onset_window_s(), MAX_ONSET_S);
        let onsets = |mix: &FaultMix| -> Vec<f64> {
            (0..2000)
                .map(|v| FaultPlan::for_vehicle(mix, 7, v).onset_s)
                .collect()
        };
        let short = m.clone().with_onset_window(30.0);
        let o = onsets(&short);
        assert!(o.iter().all(|x| (0.0..30.0).contains(x)));
        assert!(o.iter().any(|x| *x > 25.0), "spread over the window");
        // The kind, ramp and peak do not depend on the window.
        assert_eq!(
            FaultPlan::for_vehicle(&short, 7, 3).peak,
            FaultPlan::for_vehicle(&m, 7, 3).peak
        );
        let now = m.clone().with_onset_window(0.0);
        for v in 0..2000 {
            let p = FaultPlan::for_vehicle(&now, 7, v);
            // Even a first message whose samples reach back before the run start is faulty.
            let (kind, s) = p.state(-0.2);
            assert_eq!(kind, FaultKind::Bearing);
            assert!(s > 0.0 && s < p.peak, "severity still grows: {s}");
            assert!(p.severity(60.0) > s);
        }
        assert_eq!(m.clone().with_onset_window(-5.0).onset_window_s(), 0.0);
        assert_eq!(m.with_onset_window(f64::NAN).onset_window_s(), 0.0);
    }

    #[test]
    fn severity_rises_holds_and_recovers() {
        let p = FaultPlan {
            kind: FaultKind::Bearing,
            onset_s: 10.0,
            ramp_s: 100.0,
            peak: 0.8,
            recover_after_s: Some(50.0),
        };
        assert_eq!(p.state(5.0), (FaultKind::Normal, 0.0));
        assert!((p.severity(60.0) - 0.4).abs() < 1e-12);
        assert_eq!(p.severity(130.0), 0.8);
        assert!((p.severity(210.0) - 0.4).abs() < 1e-12);
        assert_eq!(p.state(300.0), (FaultKind::Normal, 0.0));
        let stays = FaultPlan {
            recover_after_s: None,
            ..p
        };
        assert_eq!(stays.severity(1e6), 0.8);
    }
}
