//! Coverage dropouts (`--dropouts 5%/90s`): when a vehicle is out of coverage (tunnels,
//! garages), as a pure function of (seed, n, t) like the fault schedule, so a slice moved to
//! another host drops out at the same moments.
//!
//! Each vehicle's time is cut into cycles of `mean / share` seconds (30 min for 5 %/90 s),
//! shifted by a per-vehicle phase so the fleet never drops out in step. In each cycle the
//! vehicle has one outage of 0.5..1.5 × `mean` at a random place in the cycle: over a long
//! run the offline share is exactly `share` on average, and at any moment about `share` of a
//! large fleet is offline.

use crate::rng::{hash3, uniform};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DropoutError {
    #[error("{0:?} is not SHARE%/DURATION, e.g. 5%/90s")]
    Syntax(String),
    #[error("the offline share must be above 0 and at most 50 %: {0}")]
    Share(String),
    #[error("the outage duration must be at least 1 s: {0}")]
    Duration(String),
}

/// Purpose tags, so outages are independent of every other draw about a vehicle.
const TAG_PHASE: u64 = 0xD0_0001;
const TAG_START: u64 = 0xD0_0002;
const TAG_LENGTH: u64 = 0xD0_0003;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropouts {
    /// Fraction of time offline, 0 < share <= 0.5.
    share: f64,
    /// Mean outage length in seconds.
    mean_s: f64,
    seed: u64,
}

impl Dropouts {
    /// Parses `5%/90s` (a share in percent, a slash, a duration).
    pub fn parse(text: &str, seed: u64) -> Result<Dropouts, DropoutError> {
        let syntax = || DropoutError::Syntax(text.to_string());
        let (share, dur) = text.split_once('/').ok_or_else(syntax)?;
        let share: f64 = share
            .trim()
            .strip_suffix('%')
            .ok_or_else(syntax)?
            .trim()
            .parse()
            .map_err(|_| syntax())?;
        if !(share > 0.0 && share <= 50.0) {
            return Err(DropoutError::Share(text.to_string()));
        }
        let mean = crate::duration::parse_duration(dur.trim()).map_err(|_| syntax())?;
        if mean.as_secs_f64() < 1.0 {
            return Err(DropoutError::Duration(text.to_string()));
        }
        Ok(Dropouts {
            share: share / 100.0,
            mean_s: mean.as_secs_f64(),
            seed,
        })
    }

    fn cycle_s(&self) -> f64 {
        self.mean_s / self.share
    }

    /// The outage of vehicle `n` in its cycle `k`: (start, end) in seconds since the run start.
    fn outage(&self, n: u64, k: i64) -> (f64, f64) {
        let cycle = self.cycle_s();
        let phase = uniform(hash3(self.seed, n, TAG_PHASE), 0.0, cycle);
        let key = n ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let len = uniform(hash3(self.seed, key, TAG_LENGTH), 0.5, 1.5) * self.mean_s;
        // len <= 1.5 * mean <= cycle for any share up to 50 %, so the outage fits its cycle.
        let at = uniform(hash3(self.seed, key, TAG_START), 0.0, cycle - len);
        let start = k as f64 * cycle - phase + at;
        (start, start + len)
    }

    /// Whether vehicle `n` is out of coverage at `t` seconds after the run start; while it
    /// is, `Some(t_back)` says when it returns.
    pub fn offline_until(&self, n: u64, t: f64) -> Option<f64> {
        let cycle = self.cycle_s();
        let phase = uniform(hash3(self.seed, n, TAG_PHASE), 0.0, cycle);
        let k = ((t + phase) / cycle).floor() as i64;
        let (start, end) = self.outage(n, k);
        (t >= start && t < end).then_some(end)
    }

    pub fn is_offline(&self, n: u64, t: f64) -> bool {
        self.offline_until(n, t).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        let d = Dropouts::parse("5%/90s", 1).unwrap();
        assert_eq!((d.share, d.mean_s), (0.05, 90.0));
        assert!(Dropouts::parse(" 12.5 % / 2m", 1).is_ok());
        assert!(matches!(
            Dropouts::parse("5/90s", 1),
            Err(DropoutError::Syntax(_))
        ));
        assert!(matches!(
            Dropouts::parse("5%", 1),
            Err(DropoutError::Syntax(_))
        ));
        assert!(matches!(
            Dropouts::parse("0%/90s", 1),
            Err(DropoutError::Share(_))
        ));
        assert!(matches!(
            Dropouts::parse("60%/90s", 1),
            Err(DropoutError::Share(_))
        ));
        assert!(matches!(
            Dropouts::parse("x%/90s", 1),
            Err(DropoutError::Syntax(_))
        ));
        assert!(matches!(
            Dropouts::parse("5%/100ms", 1),
            Err(DropoutError::Duration(_))
        ));
    }

    #[test]
    fn about_the_share_is_offline_at_any_moment() {
        let d = Dropouts::parse("5%/90s", 2024).unwrap();
        for t in [0.0, 37.0, 600.0, 3600.0, 86_400.0] {
            let off = (0..20_000).filter(|&n| d.is_offline(n, t)).count() as f64 / 20_000.0;
            assert!((off - 0.05).abs() < 0.01, "at {t} s: {off}");
        }
        // And over one vehicle's long run.
        let steps = 200_000;
        let off = (0..steps)
            .filter(|&i| d.is_offline(7, i as f64 * 1.0))
            .count() as f64;
        assert!(
            (off / steps as f64 - 0.05).abs() < 0.01,
            "{}",
            off / steps as f64
        );
    }

    #[test]
    fn outages_last_around_the_mean() {
        let d = Dropouts::parse("5%/90s", 9).unwrap();
        let mut lengths = Vec::new();
        for n in 0..300 {
            let mut t = 0.0;
            while t < 20_000.0 {
                match d.offline_until(n, t) {
                    Some(back) => {
                        // Find where this outage began, to the step.
                        let mut begin = t;
                        while begin > 0.0 && d.is_offline(n, begin - 0.5) {
                            begin -= 0.5;
                        }
                        // One already under way at the run start is seen cut short.
                        if begin > 0.0 {
                            lengths.push(back - begin);
                        }
                        t = back + 0.5;
                    }
                    None => t += 0.5,
                }
            }
        }
        assert!(lengths.len() > 1000, "{}", lengths.len());
        let mean = lengths.iter().sum::<f64>() / lengths.len() as f64;
        assert!((mean - 90.0).abs() < 6.0, "mean outage {mean} s");
        assert!(
            lengths.iter().all(|&l| (44.0..=136.0).contains(&l)),
            "within 0.5..1.5 × mean"
        );
    }

    #[test]
    fn pure_and_seeded() {
        let a = Dropouts::parse("10%/60s", 1).unwrap();
        let b = Dropouts::parse("10%/60s", 2).unwrap();
        let pattern = |d: &Dropouts| {
            (0..2000)
                .map(|i| d.is_offline(3, i as f64))
                .collect::<Vec<_>>()
        };
        assert_eq!(pattern(&a), pattern(&a));
        assert_ne!(pattern(&a), pattern(&b));
        // Returning means online right at the return time.
        let t = (0..100_000)
            .map(|i| i as f64 * 0.25)
            .find(|&t| a.is_offline(3, t))
            .unwrap();
        let back = a.offline_until(3, t).unwrap();
        assert!(back > t && !a.is_offline(3, back));
    }
}
