//! How a vehicle's messages reach the backend. `store-and-forward` is what a telematics unit
//! does: one modem, one upload at a time; a message that cannot go out yet (the modem is busy,
//! the vehicle is out of coverage, the last upload failed) waits in a bounded buffer and goes
//! out later, in order, with its original sample times and `seq`; failures are retried with
//! jittered backoff. `at-most-once` is the open load model: every tick is sent at once on any
//! free connection, and one that finds none is dropped.
//!
//! Pure: the engine tells a vehicle's [`Modem`] what happened and when, and sends what it says.

pub mod forward;

use crate::rng::{hash3, uniform};
use std::collections::VecDeque;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// One request in flight per vehicle; the rest wait in its buffer and are retried.
    StoreAndForward,
    /// Every tick sent at once, never retried; a tick that finds no free connection is dropped.
    AtMostOnce,
}

impl Delivery {
    pub fn name(self) -> &'static str {
        match self {
            Delivery::StoreAndForward => "store-and-forward",
            Delivery::AtMostOnce => "at-most-once",
        }
    }

    /// The mode named `name` (as on the command line); None for an unknown one.
    pub fn parse(name: &str) -> Option<Delivery> {
        <Delivery as clap::ValueEnum>::from_str(name, false).ok()
    }
}

/// The first retry waits about this long; each further one twice as long ...
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// ... up to this.
pub const RETRY_CAP: Duration = Duration::from_secs(30);

/// Purpose tag of the backoff draw (see `rng::hash3`).
const TAG_BACKOFF: u64 = 0xB0_0001;

/// The wait before retry number `attempt` (1 for the first retry) of message `seq` of vehicle
/// `n`: exponential from `RETRY_BASE` to `RETRY_CAP`, times a draw from [0.5, 1) so that a
/// fleet that failed together does not come back together ("equal jitter").
pub fn backoff(seed: u64, n: u64, seq: u64, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    let full =
        (RETRY_BASE.as_secs_f64() * f64::from(1u32 << doublings)).min(RETRY_CAP.as_secs_f64());
    let key = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(attempt);
    let draw = uniform(hash3(seed, n ^ key.rotate_left(17), TAG_BACKOFF), 0.5, 1.0);
    Duration::from_secs_f64(full * draw)
}

/// Whether a message answered `status` may be taken on a later try: the target was busy,
/// down or wanted a new login. Any other refusal (a 422, a 404, a redirect) would be refused
/// again, so the message is given up (`discarded`).
pub fn retryable(status: u16) -> bool {
    matches!(status, 401 | 408 | 425 | 429 | 500..=599)
}

/// A message made but not delivered yet: what it takes to make its body again, identically
/// (its sample times follow from `seq` and the schedule; the thermal state it was made in is
/// the model's only memory). 16 bytes, so a full buffer of 600 costs under 10 KB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pending {
    pub seq: u64,
    pub temp_c: f32,
    /// Sends tried so far.
    pub attempts: u16,
    /// The last try timed out after the request was written: the target may have taken it, so
    /// sending it again may make a duplicate (`resent_after_timeout`).
    pub unknown: bool,
}

/// What became of one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered 200.
    Accepted,
    /// Answered with another status.
    Status(u16),
    /// No whole answer in time; `written` if the request went out whole.
    Timeout { written: bool },
    /// The connection, TLS or HTTP broke: the request was not taken.
    Broken,
}

/// What the modem made of an outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Settled {
    /// Delivered; the next message may go.
    Delivered(Pending),
    /// Refused for good and given up.
    Discarded(Pending),
    /// Kept at the head of the buffer, to be sent again at this time (ns since run start).
    RetryAt(i64),
}

/// One vehicle's modem: its buffer (head first) and whether an upload is under way. While one
/// is, the buffer's head is that message.
#[derive(Debug, Default)]
pub struct Modem {
    queue: VecDeque<Pending>,
    in_flight: bool,
    /// Backing off after a failure: nothing goes out before this time (ns since run start).
    retry_at: Option<i64>,
}

impl Modem {
    /// Messages waiting to go out (not counting one in flight).
    pub fn waiting(&self) -> usize {
        self.queue.len() - usize::from(self.in_flight)
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// A message just made. With `cap` messages already waiting, the oldest waiting one is
    /// dropped to make room (a message in flight is never dropped: its answer is coming);
    /// returns how many were dropped.
    pub fn produce(&mut self, p: Pending, cap: usize) -> u64 {
        let mut dropped = 0;
        while self.waiting() >= cap.max(1) {
            let oldest_waiting = usize::from(self.in_flight);
            if self.queue.remove(oldest_waiting).is_none() {
                break;
            }
            dropped += 1;
        }
        if self.queue.len() == self.queue.capacity() {
            // Doubling, but never past the buffer's own size: a full buffer of 600 holds 601
            // slots (with the one in flight), not the 1,024 that doubling would reach.
            let want = (self.queue.capacity() * 2).max(4).min(cap.max(1) + 1);
            self.queue
                .reserve_exact(want.saturating_sub(self.queue.len()).max(1));
        }
        self.queue.push_back(p);
        dropped
    }

    /// Slots the buffer holds now (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// The message to send now, if there is one and the modem may send: none in flight, not
    /// backing off. It stays at the head of the buffer until `settle`; its `attempts` counts
    /// this send.
    pub fn take(&mut self, now_ns: i64) -> Option<Pending> {
        if self.in_flight || self.retry_at.is_some_and(|t| t > now_ns) {
            return None;
        }
        let head = self.queue.front_mut()?;
        self.retry_at = None;
        self.in_flight = true;
        let sent = *head;
        head.attempts = head.attempts.saturating_add(1);
        head.unknown = false;
        Some(sent)
    }

    /// When a modem backing off may send again.
    pub fn retry_at(&self) -> Option<i64> {
        self.retry_at
    }

    /// The answer to the message in flight, at `now_ns`; `wait` is the backoff before the
    /// next try of a message that failed `attempts` times.
    pub fn settle(
        &mut self,
        outcome: Outcome,
        now_ns: i64,
        wait: impl FnOnce(&Pending) -> Duration,
    ) -> Option<Settled> {
        if !self.in_flight {
            return None;
        }
        self.in_flight = false;
        let retry = match outcome {
            Outcome::Accepted => return self.queue.pop_front().map(Settled::Delivered),
            Outcome::Status(s) if !retryable(s) => {
                return self.queue.pop_front().map(Settled::Discarded)
            }
            Outcome::Timeout { written } => written,
            Outcome::Status(_) | Outcome::Broken => false,
        };
        let head = self.queue.front_mut()?;
        head.unknown = retry;
        let at = now_ns.saturating_add(wait(head).as_nanos().min(i64::MAX as u128) as i64);
        self.retry_at = Some(at);
        Some(Settled::RetryAt(at))
    }

    /// Messages still here at the end: never sent, or never delivered.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> Pending {
        Pending {
            seq,
            temp_c: 40.0,
            attempts: 0,
            unknown: false,
        }
    }

    const NO_WAIT: fn(&Pending) -> Duration = |_| Duration::ZERO;

    #[test]
    fn one_upload_at_a_time_in_order() {
        let mut m = Modem::default();
        assert_eq!(m.produce(msg(0), 600), 0);
        assert_eq!(m.produce(msg(1), 600), 0);
        let first = m.take(0).unwrap();
        assert_eq!(first.seq, 0);
        assert_eq!(m.take(0), None, "busy while one is in flight");
        assert_eq!(m.waiting(), 1);
        assert_eq!(
            m.settle(Outcome::Accepted, 5, NO_WAIT),
            Some(Settled::Delivered(Pending {
                attempts: 1,
                ..msg(0)
            }))
        );
        assert_eq!(m.take(5).unwrap().seq, 1);
        assert!(m.settle(Outcome::Accepted, 6, NO_WAIT).is_some());
        assert!(m.is_empty());
        assert_eq!(m.take(7), None);
    }

    #[test]
    fn a_failure_keeps_the_message_at_the_head_until_its_backoff_ends() {
        let mut m = Modem::default();
        m.produce(msg(0), 600);
        m.produce(msg(1), 600);
        m.take(0);
        let s = m.settle(Outcome::Status(503), 1_000, |p| {
            Duration::from_nanos(100 * u64::from(p.attempts))
        });
        assert_eq!(s, Some(Settled::RetryAt(1_100)));
        assert_eq!(m.take(1_099), None);
        let again = m.take(1_100).unwrap();
        assert_eq!((again.seq, again.attempts), (0, 1));
        assert!(!again.unknown);
        // A timeout after the request went out: the target may have it.
        m.settle(Outcome::Timeout { written: true }, 2_000, NO_WAIT);
        let third = m.take(2_000).unwrap();
        assert_eq!((third.seq, third.attempts, third.unknown), (0, 2, true));
        // One that never went out whole is known not taken.
        m.settle(Outcome::Timeout { written: false }, 3_000, NO_WAIT);
        assert!(!m.take(3_000).unwrap().unknown);
        m.settle(Outcome::Accepted, 4_000, NO_WAIT);
        assert_eq!(m.take(4_000).unwrap().seq, 1);
    }

    #[test]
    fn refusals_a_retry_cannot_change_are_given_up() {
        for (status, retried) in [
            (422, false),
            (404, false),
            (301, false),
            (400, false),
            (401, true),
            (408, true),
            (429, true),
            (500, true),
            (503, true),
        ] {
            let mut m = Modem::default();
            m.produce(msg(3), 600);
            m.take(0);
            let s = m.settle(Outcome::Status(status), 0, NO_WAIT).unwrap();
            assert_eq!(matches!(s, Settled::RetryAt(_)), retried, "{status}");
            assert_eq!(m.is_empty(), !retried, "{status}");
        }
    }

    #[test]
    fn a_full_buffer_drops_its_oldest_waiting_message_never_the_one_in_flight() {
        let mut m = Modem::default();
        for seq in 0..3 {
            assert_eq!(m.produce(msg(seq), 3), 0);
        }
        m.take(0);
        // 0 in flight, 1 and 2 waiting: room for one more.
        assert_eq!(m.produce(msg(3), 3), 0);
        assert_eq!(m.produce(msg(4), 3), 1);
        assert_eq!(m.waiting(), 3);
        m.settle(Outcome::Accepted, 0, NO_WAIT);
        let left: Vec<u64> = std::iter::from_fn(|| {
            let p = m.take(0)?;
            m.settle(Outcome::Accepted, 0, NO_WAIT);
            Some(p.seq)
        })
        .collect();
        assert_eq!(left, [2, 3, 4], "1 was the oldest waiting");
    }

    #[test]
    fn a_buffer_of_one_keeps_the_newest() {
        let mut m = Modem::default();
        for seq in 0..5 {
            m.produce(msg(seq), 1);
        }
        assert_eq!(m.waiting(), 1);
        assert_eq!(m.take(0).map(|p| p.seq), Some(4));
        assert_eq!(
            m.produce(msg(5), 1),
            0,
            "one waits beside the one in flight"
        );
        assert_eq!(m.produce(msg(6), 1), 1);
    }

    #[test]
    fn a_buffer_grows_as_needed_and_never_past_its_size() {
        let mut m = Modem::default();
        m.produce(msg(0), 600);
        assert!(m.capacity() < 16, "{}", m.capacity());
        m.take(0);
        for seq in 1..2000 {
            m.produce(msg(seq), 600);
        }
        assert_eq!(m.waiting(), 600);
        assert!(m.capacity() <= 608, "{}", m.capacity());
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_is_pure() {
        for attempt in 1..20 {
            let full = (RETRY_BASE.as_secs_f64() * 2f64.powi(attempt as i32 - 1))
                .min(RETRY_CAP.as_secs_f64());
            for seq in 0..50 {
                let b = backoff(7, 3, seq, attempt).as_secs_f64();
                assert!(b >= full * 0.5 - 1e-9 && b < full, "{attempt}: {b}");
                assert_eq!(backoff(7, 3, seq, attempt), backoff(7, 3, seq, attempt));
            }
        }
        // Vehicles that failed together spread out.
        let spread: std::collections::BTreeSet<u128> =
            (0..100).map(|n| backoff(1, n, 5, 3).as_millis()).collect();
        assert!(spread.len() > 50, "{}", spread.len());
    }

    #[test]
    fn delivery_names_round_trip() {
        for d in [Delivery::StoreAndForward, Delivery::AtMostOnce] {
            assert_eq!(Delivery::parse(d.name()), Some(d));
            assert_eq!(
                serde_json::to_value(d).unwrap(),
                serde_json::Value::String(d.name().into())
            );
        }
        assert_eq!(Delivery::parse("sometimes"), None);
    }
}
