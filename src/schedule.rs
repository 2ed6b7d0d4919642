//! When each vehicle sends. Tick k of vehicle n happens at a pure function of (seed, n, k)
//! measured from the run's start, so a simulator that restarts, or a range that moves to
//! another host, resumes every vehicle at the right tick and the right `seq` (= k), without
//! sending a seq twice and without bunching vehicles together.

use crate::rng::{hash3, unit};

/// 1/φ: consecutive multiples modulo 1 are spread evenly over [0, 1) for any contiguous run of
/// n (the three-gap theorem), which phases any slice of the fleet evenly over the interval.
const GOLDEN_FRACTION: f64 = 0.618_033_988_749_894_9;
const TAG_JITTER: u64 = 0x6A17;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("interval must be greater than zero")]
    Interval,
    #[error("jitter must be a fraction of the interval in [0, 1), got {0}")]
    Jitter(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    interval_s: f64,
    jitter: f64,
    seed: u64,
}

impl Schedule {
    /// `jitter` is the width of the uniform jitter window as a fraction of the interval
    /// (0.1 = ±5%). Below 1 the ticks of one vehicle can never swap order.
    pub fn new(interval_s: f64, jitter: f64, seed: u64) -> Result<Self, ScheduleError> {
        if !(interval_s.is_finite() && interval_s > 0.0) {
            return Err(ScheduleError::Interval);
        }
        if !(0.0..1.0).contains(&jitter) {
            return Err(ScheduleError::Jitter(jitter));
        }
        Ok(Schedule {
            interval_s,
            jitter,
            seed,
        })
    }

    pub fn interval_s(&self) -> f64 {
        self.interval_s
    }

    /// Offset of vehicle n's ticks within the interval.
    pub fn phase(&self, n: u64) -> f64 {
        (n as f64 * GOLDEN_FRACTION).fract() * self.interval_s
    }

    /// Seconds after the run start at which vehicle n sends message k.
    pub fn tick_time(&self, n: u64, k: u64) -> f64 {
        let j = (unit(hash3(self.seed ^ TAG_JITTER, n, k)) - 0.5) * self.jitter * self.interval_s;
        self.phase(n) + k as f64 * self.interval_s + j
    }

    /// The first tick of vehicle n at or after `t` seconds since the run start.
    pub fn first_tick_from(&self, n: u64, t: f64) -> u64 {
        let slack = self.jitter * self.interval_s;
        let guess = ((t - self.phase(n) - slack) / self.interval_s).floor();
        let mut k = if guess > 0.0 { guess as u64 } else { 0 };
        while self.tick_time(n, k) < t {
            k += 1;
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(Schedule::new(0.0, 0.1, 1), Err(ScheduleError::Interval));
        assert_eq!(Schedule::new(-1.0, 0.1, 1), Err(ScheduleError::Interval));
        assert_eq!(
            Schedule::new(f64::NAN, 0.1, 1),
            Err(ScheduleError::Interval)
        );
        assert_eq!(Schedule::new(1.2, 1.0, 1), Err(ScheduleError::Jitter(1.0)));
    }

    #[test]
    fn any_slice_is_phased_evenly() {
        // 50 vehicles anywhere in the fleet: no tenth of the interval holds more than twice
        // its fair share, so a slice never fires in one burst.
        let s = Schedule::new(1.2, 0.0, 9).unwrap();
        for first in [0u64, 50, 1234, 99_950] {
            let mut bins = [0u32; 10];
            for n in first..first + 50 {
                bins[(s.phase(n) / 1.2 * 10.0) as usize] += 1;
            }
            assert!(bins.iter().all(|&b| (2..=10).contains(&b)), "{bins:?}");
        }
    }

    #[test]
    fn average_rate_is_exact() {
        let s = Schedule::new(1.2, 0.1, 3).unwrap();
        let k = 10_000;
        let span = s.tick_time(7, k) - s.tick_time(7, 0);
        assert!((span / k as f64 - 1.2).abs() < 1e-3);
    }

    proptest! {
        #[test]
        fn ticks_are_ordered_and_resumable(n in 0u64..1_000_000, t in 0.0f64..100_000.0,
                                           jitter in 0.0f64..0.99, seed: u64) {
            let s = Schedule::new(1.2, jitter, seed).unwrap();
            let k = s.first_tick_from(n, t);
            prop_assert!(s.tick_time(n, k) >= t);
            if k > 0 {
                prop_assert!(s.tick_time(n, k - 1) < t);
            }
            prop_assert!(s.tick_time(n, k + 1) > s.tick_time(n, k));
        }
    }
}

/// A calendar queue of vehicle deadlines: slots of equal width around a cursor. With a fixed
/// interval every deadline is less than one interval ahead, so insert and pop are O(1), where
/// a binary heap over 100,000 vehicles spends most of the scheduler's time in cache misses.
/// Order within one slot is not kept: a slot is 1 ms wide by default, well below the jitter.
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<u32>>,
    width_ns: i64,
    /// Start time of the slot under the cursor.
    cursor_ns: i64,
    cursor: usize,
    len: usize,
}

impl TimerWheel {
    /// A wheel for deadlines at most `horizon_ns` after the cursor, starting at `start_ns`.
    pub fn new(start_ns: i64, horizon_ns: i64) -> Self {
        let horizon_ns = horizon_ns.max(1);
        let width_ns = (horizon_ns / 65_536).max(1_000_000);
        let n = (horizon_ns / width_ns + 2) as usize;
        let start_ns = start_ns.div_euclid(width_ns) * width_ns;
        TimerWheel {
            slots: vec![Vec::new(); n],
            width_ns,
            cursor_ns: start_ns,
            cursor: 0,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `id` at `due_ns`. A deadline already passed lands in the current slot; one beyond
    /// the horizon lands in the last slot (and so fires early): callers keep within it.
    pub fn insert(&mut self, due_ns: i64, id: u32) {
        let ahead = ((due_ns - self.cursor_ns).max(0) / self.width_ns) as usize;
        let ahead = ahead.min(self.slots.len() - 1);
        let slot = (self.cursor + ahead) % self.slots.len();
        self.slots[slot].push(id);
        self.len += 1;
    }

    /// The start of the earliest non-empty slot, if any (a lower bound of the next deadline).
    pub fn next_due_ns(&self) -> Option<i64> {
        if self.len == 0 {
            return None;
        }
        (0..self.slots.len())
            .find(|i| !self.slots[(self.cursor + i) % self.slots.len()].is_empty())
            .map(|i| self.cursor_ns + i as i64 * self.width_ns)
    }

    /// Moves every id whose slot started at or before `now_ns` into `out`, up to `max` ids.
    pub fn pop_due(&mut self, now_ns: i64, max: usize, out: &mut Vec<u32>) {
        while out.len() < max && self.len > 0 {
            if self.cursor_ns > now_ns {
                return;
            }
            let slot = &mut self.slots[self.cursor];
            let take = slot.len().min(max - out.len());
            out.extend(slot.drain(slot.len() - take..));
            self.len -= take;
            if slot.is_empty() {
                self.cursor = (self.cursor + 1) % self.slots.len();
                self.cursor_ns += self.width_ns;
            }
        }
    }

    pub fn slot_width_ns(&self) -> i64 {
        self.width_ns
    }
}

#[cfg(test)]
mod wheel_tests {
    use super::*;

    #[test]
    fn pops_in_slot_order_and_never_early() {
        let ms = 1_000_000i64;
        let mut w = TimerWheel::new(0, 1_200 * ms);
        for (i, due) in [5 * ms, 0, 1_100 * ms, 5 * ms + 10, 300 * ms]
            .iter()
            .enumerate()
        {
            w.insert(*due, i as u32);
        }
        let mut out = Vec::new();
        w.pop_due(4 * ms, 100, &mut out);
        assert_eq!(out, vec![1]);
        out.clear();
        w.pop_due(6 * ms, 100, &mut out);
        out.sort();
        assert_eq!(out, vec![0, 3]);
        assert_eq!(w.next_due_ns(), Some(300 * ms));
        out.clear();
        // Re-inserting past the end of the first lap wraps around the ring.
        w.insert(1_250 * ms, 9);
        w.pop_due(1_200 * ms, 100, &mut out);
        assert_eq!(out, vec![4, 2]);
        out.clear();
        w.pop_due(1_251 * ms, 1, &mut out);
        assert_eq!(out, vec![9]);
        assert!(w.is_empty());
    }

    #[test]
    fn respects_the_batch_limit() {
        let mut w = TimerWheel::new(0, 1_000_000_000);
        for i in 0..10 {
            w.insert(0, i);
        }
        let mut out = Vec::new();
        w.pop_due(0, 4, &mut out);
        assert_eq!(out.len(), 4);
        assert_eq!(w.len(), 6);
    }

    #[test]
    fn drives_a_schedule_at_the_right_rate() {
        // 1000 vehicles over 10 s of a 1.2 s schedule, popped every millisecond: every tick
        // fires in order per vehicle, none before its deadline's slot.
        let s = Schedule::new(1.2, 0.1, 1).unwrap();
        let ms = 1_000_000i64;
        let mut w = TimerWheel::new(0, (1.2 * 1.1e9) as i64 + ms);
        let mut next_k = vec![0u64; 1000];
        for n in 0..1000u64 {
            w.insert((s.tick_time(n, 0) * 1e9) as i64, n as u32);
        }
        let mut fired = 0u64;
        let mut out = Vec::new();
        for step in 0..10_000i64 {
            let now = step * ms;
            out.clear();
            w.pop_due(now, usize::MAX, &mut out);
            for &id in &out {
                let due = (s.tick_time(id as u64, next_k[id as usize]) * 1e9) as i64;
                assert!(due < now + ms, "fired early");
                next_k[id as usize] += 1;
                fired += 1;
                w.insert(
                    (s.tick_time(id as u64, next_k[id as usize]) * 1e9) as i64,
                    id,
                );
            }
        }
        let expected = 1000.0 * 10.0 / 1.2;
        assert!((fired as f64 - expected).abs() / expected < 0.07, "{fired}");
    }
}
