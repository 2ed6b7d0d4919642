//! Store-and-forward across a slice of vehicles: each vehicle's modem, whether it is in
//! coverage, who waits for a free connection and who waits for a time (a backoff, a return to
//! coverage). Every decision of what goes out next, when a retry is due and what is dropped is
//! here; sending is behind `Uplink`, so the rules run in a unit test without sockets.

use super::{backoff, Modem, Outcome, Pending, Settled};
use crate::counters::Counter;
use crate::dropouts::Dropouts;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

/// Where messages go: the simulator's connections, or a test's record.
pub trait Uplink {
    /// Whether a connection is free now.
    fn has_room(&self) -> bool;
    /// Sends message `p` of vehicle `idx` (`waited`: it did not go out as it was made; it
    /// then carries the time it was made); false when no connection took it.
    fn send(&mut self, idx: u32, p: &Pending, waited: bool) -> bool;
    /// Counts something that happened to a message.
    fn count(&mut self, c: Counter, n: u64);
}

#[derive(Debug, Default)]
struct Slot {
    modem: Modem,
    /// Waiting in the queue for a free connection.
    waiting_lane: bool,
    /// Out of coverage when last looked at.
    offline: bool,
}

pub struct Forwarder {
    slots: Vec<Slot>,
    /// Fleet number of the first vehicle, and the seed of the backoff's jitter.
    first: u64,
    seed: u64,
    /// Most messages a vehicle keeps while it cannot deliver.
    buffer: usize,
    dropouts: Option<Dropouts>,
    /// (ns since the run start, vehicle): when to look at a vehicle again.
    wakes: BinaryHeap<Reverse<(i64, u32)>>,
    /// Vehicles with a message ready and no free connection, first come first served.
    lane_wait: VecDeque<u32>,
    /// Messages waiting in buffers now (not counting those in flight).
    buffered: u64,
}

impl Forwarder {
    pub fn new(
        vehicles: usize,
        first: u64,
        seed: u64,
        buffer: usize,
        dropouts: Option<Dropouts>,
    ) -> Forwarder {
        Forwarder {
            slots: (0..vehicles).map(|_| Slot::default()).collect(),
            first,
            seed,
            buffer,
            dropouts,
            wakes: BinaryHeap::new(),
            lane_wait: VecDeque::new(),
            buffered: 0,
        }
    }

    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// The next time a vehicle is to be looked at again (ns since the run start).
    pub fn next_wake(&self) -> Option<i64> {
        self.wakes.peek().map(|Reverse((at, _))| *at)
    }

    /// Message `seq` of vehicle `idx`, due at `due_ns`, is made at `now_ns` (at the thermal
    /// state `temp_c`): into the vehicle's buffer, and out at once if the vehicle may send.
    pub fn make(
        &mut self,
        idx: u32,
        seq: u64,
        temp_c: f64,
        due_ns: i64,
        now_ns: i64,
        up: &mut impl Uplink,
    ) {
        if !self.coverage(idx, due_ns) {
            up.count(Counter::OfflineTicks, 1);
        }
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        let dropped = slot.modem.produce(
            Pending {
                seq,
                temp_c: temp_c as f32,
                attempts: 0,
                unknown: false,
            },
            self.buffer,
        );
        self.buffered = self.buffered + 1 - dropped;
        if dropped > 0 {
            up.count(Counter::BufferDropped, dropped);
        }
        self.try_send(idx, now_ns, Some(seq), false, up);
    }

    /// Whether vehicle `idx` has coverage at `ns`; when it just lost coverage, asks to be
    /// woken on its return.
    fn coverage(&mut self, idx: u32, ns: i64) -> bool {
        let (Some(d), Some(slot)) = (&self.dropouts, self.slots.get_mut(idx as usize)) else {
            return true;
        };
        match d.offline_until(self.first + u64::from(idx), ns as f64 / 1e9) {
            Some(back) => {
                if !slot.offline {
                    slot.offline = true;
                    self.wakes.push(Reverse(((back * 1e9) as i64 + 1, idx)));
                }
                false
            }
            None => {
                slot.offline = false;
                true
            }
        }
    }

    /// Sends vehicle `idx`'s next buffered message if it may: nothing in flight, not backing
    /// off, in coverage, and a connection free (else it queues for one, behind those already
    /// queued unless `from_queue`). `fresh` is the seq just made: that one has not waited.
    fn try_send(
        &mut self,
        idx: u32,
        now_ns: i64,
        fresh: Option<u64>,
        from_queue: bool,
        up: &mut impl Uplink,
    ) {
        let Some(slot) = self.slots.get(idx as usize) else {
            return;
        };
        if slot.modem.in_flight() || slot.modem.is_empty() || slot.waiting_lane && !from_queue {
            return;
        }
        if slot.modem.retry_at().is_some_and(|t| t > now_ns) {
            return;
        }
        if !self.coverage(idx, now_ns) {
            return;
        }
        let slot = &mut self.slots[idx as usize];
        if !up.has_room() || (!from_queue && !self.lane_wait.is_empty()) {
            if !slot.waiting_lane {
                slot.waiting_lane = true;
                self.lane_wait.push_back(idx);
            }
            return;
        }
        slot.waiting_lane = false;
        let Some(p) = slot.modem.take(now_ns) else {
            return;
        };
        self.buffered -= 1;
        let waited = p.attempts > 0 || fresh != Some(p.seq);
        if p.attempts > 0 {
            up.count(Counter::Retried, 1);
        }
        if p.unknown {
            up.count(Counter::ResentAfterTimeout, 1);
        }
        if !up.send(idx, &p, waited) {
            // Room was checked just before; should a connection be gone, the message waits
            // for a retry like any that could not go out.
            self.settle(idx, Outcome::Broken, now_ns, up);
        }
    }

    /// The answer to vehicle `idx`'s upload.
    fn settle(&mut self, idx: u32, outcome: Outcome, now_ns: i64, up: &mut impl Uplink) {
        let (seed, n) = (self.seed, self.first + u64::from(idx));
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        match slot.modem.settle(outcome, now_ns, |p| {
            backoff(seed, n, p.seq, u32::from(p.attempts))
        }) {
            Some(Settled::Delivered(_)) | None => {}
            Some(Settled::Discarded(_)) => up.count(Counter::Discarded, 1),
            Some(Settled::RetryAt(at)) => {
                self.buffered += 1;
                self.wakes.push(Reverse((at, idx)));
            }
        }
    }

    /// An upload of vehicle `idx` ended: its modem learns the outcome, the freed connection
    /// goes to whoever waited for one, and the vehicle sends its next message if it has one.
    pub fn done(&mut self, idx: u32, outcome: Outcome, now_ns: i64, up: &mut impl Uplink) {
        self.settle(idx, outcome, now_ns, up);
        self.serve_lane_wait(now_ns, up);
        self.try_send(idx, now_ns, None, false, up);
    }

    /// Vehicles queued for a connection get the free ones, in order.
    fn serve_lane_wait(&mut self, now_ns: i64, up: &mut impl Uplink) {
        while up.has_room() {
            let Some(idx) = self.lane_wait.pop_front() else {
                break;
            };
            self.try_send(idx, now_ns, None, true, up);
            // Sent, or no longer able to send (backing off, offline): either way off the queue.
            if let Some(slot) = self.slots.get_mut(idx as usize) {
                slot.waiting_lane = false;
            }
        }
    }

    /// Vehicles whose backoff or outage ended by `now_ns`.
    pub fn wake_due(&mut self, now_ns: i64, up: &mut impl Uplink) {
        while let Some(&Reverse((at, idx))) = self.wakes.peek() {
            if at > now_ns {
                break;
            }
            self.wakes.pop();
            self.try_send(idx, now_ns, None, false, up);
        }
    }

    /// At the end: the last outcomes settle, and what is left in the buffers (never
    /// delivered) is counted and returned.
    pub fn finish(&mut self, outcomes: impl IntoIterator<Item = (u32, Outcome)>) -> u64 {
        for (idx, outcome) in outcomes {
            if let Some(slot) = self.slots.get_mut(idx as usize) {
                let _ = slot.modem.settle(outcome, 0, |_| Duration::ZERO);
            }
        }
        self.buffered = self.slots.iter().map(|s| s.modem.len() as u64).sum();
        self.buffered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Connections that take what they are given while they have room, and a record of what
    /// went out and what was counted.
    #[derive(Default)]
    struct Record {
        room: usize,
        in_flight: usize,
        sent: Vec<(u32, u64, bool)>,
        counts: BTreeMap<&'static str, u64>,
    }

    impl Uplink for Record {
        fn has_room(&self) -> bool {
            self.in_flight < self.room
        }
        fn send(&mut self, idx: u32, p: &Pending, waited: bool) -> bool {
            if !self.has_room() {
                return false;
            }
            self.in_flight += 1;
            self.sent.push((idx, p.seq, waited));
            true
        }
        fn count(&mut self, c: Counter, n: u64) {
            *self.counts.entry(c.def().name).or_default() += n;
        }
    }

    impl Record {
        fn with_room(room: usize) -> Record {
            Record {
                room,
                ..Default::default()
            }
        }
        fn answer(&mut self, f: &mut Forwarder, idx: u32, outcome: Outcome, now_ns: i64) {
            self.in_flight -= 1;
            f.done(idx, outcome, now_ns, self);
        }
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn each_vehicle_has_one_upload_at_a_time_and_sends_in_order() {
        let mut up = Record::with_room(10);
        let mut f = Forwarder::new(2, 0, 7, 600, None);
        f.make(0, 0, 40.0, 0, 0, &mut up);
        f.make(0, 1, 40.0, S, S, &mut up);
        f.make(1, 0, 40.0, 0, S, &mut up);
        assert_eq!(
            up.sent,
            [(0, 0, false), (1, 0, false)],
            "seq 1 waits for seq 0"
        );
        assert_eq!(f.buffered(), 1);
        up.answer(&mut f, 0, Outcome::Accepted, 2 * S);
        assert_eq!(
            up.sent.last(),
            Some(&(0, 1, true)),
            "then goes, marked as waited"
        );
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn a_failure_is_retried_after_its_backoff_and_counted() {
        let mut up = Record::with_room(10);
        let mut f = Forwarder::new(1, 0, 7, 600, None);
        f.make(0, 0, 40.0, 0, 0, &mut up);
        up.answer(&mut f, 0, Outcome::Status(503), S);
        assert_eq!(up.sent.len(), 1, "not at once");
        let at = f.next_wake().unwrap();
        let wait = Duration::from_nanos((at - S) as u64);
        assert_eq!(
            wait,
            backoff(7, 0, 0, 1),
            "the vehicle's own jittered backoff"
        );
        f.wake_due(at - 1, &mut up);
        assert_eq!(up.sent.len(), 1);
        f.wake_due(at, &mut up);
        assert_eq!(up.sent[1], (0, 0, true));
        assert_eq!(up.counts.get("retried"), Some(&1));
        // A timeout after the request was written may have been taken: its resend says so.
        up.answer(&mut f, 0, Outcome::Timeout { written: true }, at + S);
        let at = f.next_wake().unwrap();
        f.wake_due(at, &mut up);
        assert_eq!(up.counts.get("resent_after_timeout"), Some(&1));
        // A refusal no retry changes is given up.
        up.answer(&mut f, 0, Outcome::Status(422), at + S);
        assert_eq!(up.counts.get("discarded"), Some(&1));
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn a_full_buffer_drops_its_oldest_and_counts_it() {
        let mut up = Record::with_room(10);
        let mut f = Forwarder::new(1, 0, 7, 3, None);
        for seq in 0..6 {
            f.make(0, seq, 40.0, seq as i64 * S, seq as i64 * S, &mut up);
        }
        // Seq 0 is in flight; of 1..5 the buffer of 3 keeps 3, 4 and 5.
        assert_eq!(up.counts.get("buffer_dropped"), Some(&2));
        assert_eq!(f.buffered(), 3);
        for t in 6..9 {
            up.answer(&mut f, 0, Outcome::Accepted, t * S);
        }
        let seqs: Vec<u64> = up.sent.iter().map(|s| s.1).collect();
        assert_eq!(seqs, [0, 3, 4, 5]);
    }

    #[test]
    fn vehicles_wait_for_a_connection_first_come_first_served() {
        let mut up = Record::with_room(1);
        let mut f = Forwarder::new(3, 0, 7, 600, None);
        for idx in 0..3 {
            f.make(idx, 0, 40.0, 0, 0, &mut up);
        }
        assert_eq!(up.sent, [(0, 0, false)]);
        up.answer(&mut f, 0, Outcome::Accepted, S);
        up.answer(&mut f, 1, Outcome::Accepted, 2 * S);
        let order: Vec<u32> = up.sent.iter().map(|s| s.0).collect();
        assert_eq!(order, [0, 1, 2]);
    }

    #[test]
    fn a_vehicle_out_of_coverage_buffers_and_sends_on_its_return() {
        // Half the fleet offline, outages of 60 s around t = 0.
        let d = Dropouts::parse("40%/60s", 3).unwrap();
        let idx = (0..200u32)
            .find(|&i| d.offline_until(u64::from(i), 0.0).is_some())
            .unwrap();
        let back = d.offline_until(u64::from(idx), 0.0).unwrap();
        let mut up = Record::with_room(10);
        let mut f = Forwarder::new(200, 0, 7, 600, Some(d));
        f.make(idx, 0, 40.0, 0, 0, &mut up);
        f.make(idx, 1, 40.0, S, S, &mut up);
        assert!(up.sent.is_empty());
        assert_eq!(up.counts.get("offline_ticks"), Some(&2));
        let wake = f.next_wake().unwrap();
        assert_eq!(wake, (back * 1e9) as i64 + 1);
        f.wake_due(wake, &mut up);
        assert_eq!(up.sent, [(idx, 0, true)]);
        up.answer(&mut f, idx, Outcome::Accepted, wake + 1);
        assert_eq!(up.sent[1], (idx, 1, true), "the burst goes out in order");
    }

    #[test]
    fn what_is_left_at_the_end_is_counted() {
        let mut up = Record::with_room(10);
        let mut f = Forwarder::new(1, 0, 7, 600, None);
        for seq in 0..3 {
            f.make(0, seq, 40.0, 0, 0, &mut up);
        }
        // Seq 0 was in flight and its timeout came after the stop: it stays with the rest.
        assert_eq!(f.finish([(0, Outcome::Timeout { written: false })]), 3);
    }
}
