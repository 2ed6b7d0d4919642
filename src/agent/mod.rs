//! The agent's decisions apart from its processes and sockets: whether its lease holds, which
//! assignments it may trust, whether the agent itself is starved of CPU and when it sheds
//! load. Time is an argument, so each rule is a unit test on a fake clock.
//!
//! The lease is what keeps a vehicle from being driven by two hosts: an agent that has not
//! heard its coordinator for longer than the lease stops its simulators, because by then the
//! coordinator may be about to move them (it waits lease + grace). After that, an assignment
//! is trusted only if it carries a newer epoch than the one the agent held, which the
//! coordinator issues as soon as a heartbeat says the agent lapsed.

use std::time::{Duration, Instant};

pub mod launch;
pub mod reconcile;
pub mod tally;

/// The agent's lease before its coordinator told its own: what `serve` defaults to.
pub const LEASE_BEFORE_JOIN: Duration = Duration::from_secs(5);

/// What to do with an assignment that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A newer desired state (or a new run): hand it to the supervisor.
    Apply,
    /// The state already applied, sent again: it renewed the lease, nothing else to do.
    Renewed,
    /// Older than the newest applied: refused.
    Stale,
    /// The agent's lease expired and this was issued at or before the epoch it held then: the
    /// coordinator may have moved these vehicles since, so only a newer epoch is trusted.
    AwaitNewer,
}

/// A lease expiry: how long the agent had heard nothing when it noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub silent: Duration,
}

#[derive(Debug, Clone)]
pub struct Lease {
    length: Duration,
    last_heard: Option<Instant>,
    /// Epoch and run of the newest assignment applied.
    epoch: u64,
    run_id: String,
    /// Whether that assignment holds instances: a lease only guards something held.
    holding: bool,
    /// Set by an expiry, cleared by the next assignment of a newer epoch.
    lapsed: bool,
    /// Expiries in the current run.
    expiries: u64,
}

impl Lease {
    pub fn new(length: Duration) -> Lease {
        Lease {
            length,
            last_heard: None,
            epoch: 0,
            run_id: String::new(),
            holding: false,
            lapsed: false,
            expiries: 0,
        }
    }

    /// The coordinator's lease, from its join reply.
    pub fn set_length(&mut self, length: Duration) {
        self.length = length;
    }

    pub fn length(&self) -> Duration {
        self.length
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The agent stopped everything on an expiry and waits for a newer epoch.
    pub fn lapsed(&self) -> bool {
        self.lapsed
    }

    pub fn expiries(&self) -> u64 {
        self.expiries
    }

    /// Whether the simulators may be kept alive: the lease holds (or nothing was ever held).
    pub fn valid(&self) -> bool {
        !self.lapsed
    }

    /// The lease at `now`, checked on the agent's own timer: the expiry is reported once.
    pub fn check(&mut self, now: Instant) -> Option<Expired> {
        let heard = self.last_heard?;
        let silent = now.saturating_duration_since(heard);
        if !self.holding || self.lapsed || silent <= self.length {
            return None;
        }
        self.lapsed = true;
        self.expiries += 1;
        Some(Expired { silent })
    }

    /// An assignment of `epoch` for `run_id` arrived at `now`. The lease is checked first: a
    /// message read after a silence longer than the lease may have waited in a queue while
    /// this agent was frozen, and does not make that silence shorter.
    pub fn heard(
        &mut self,
        epoch: u64,
        run_id: &str,
        holding: bool,
        now: Instant,
    ) -> (Option<Expired>, Verdict) {
        let expired = self.check(now);
        if epoch < self.epoch {
            return (expired, Verdict::Stale);
        }
        self.last_heard = Some(now);
        if self.lapsed && epoch <= self.epoch {
            return (expired, Verdict::AwaitNewer);
        }
        let verdict = if epoch == self.epoch && run_id == self.run_id && !self.lapsed {
            Verdict::Renewed
        } else {
            Verdict::Apply
        };
        // A new run counts afresh; the end of one (no run id) keeps its count for the
        // heartbeats that report its final state.
        if !run_id.is_empty() && run_id != self.run_id {
            self.expiries = 0;
        }
        self.lapsed = false;
        self.epoch = epoch;
        self.run_id = run_id.to_string();
        self.holding = holding;
        (expired, verdict)
    }
}

/// Which of the agent's loops a lag was measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    /// Lease, heartbeats and the simulators' keep-alive, on a thread of their own.
    Control,
    /// The simulator processes: spawning, their metric lines, their exits.
    Supervisor,
}

/// A starved agent does not start simulators for this long after its last late timer.
pub const STARVED_WINDOW: Duration = Duration::from_secs(2);
/// Starved without a break for this long, the agent stops one of its processes.
pub const SHED_AFTER: Duration = Duration::from_secs(30);

/// Whether the agent's own timers fire on time. A timer more than a quarter of the lease
/// late means the host gives the agent too little CPU (its simulators, or anything else),
/// which is the generator's problem and must be said as such, not taken for a silent
/// coordinator.
#[derive(Debug, Clone)]
pub struct Health {
    threshold: Duration,
    last_late: Option<Instant>,
    streak_since: Option<Instant>,
    worst: [Duration; 2],
}

impl Health {
    pub fn new(lease: Duration) -> Health {
        Health {
            threshold: lease / 4,
            last_late: None,
            streak_since: None,
            worst: [Duration::ZERO; 2],
        }
    }

    pub fn set_lease(&mut self, lease: Duration) {
        self.threshold = lease / 4;
    }

    pub fn threshold(&self) -> Duration {
        self.threshold
    }

    /// A timer of `which` fired `lag` late at `now`.
    pub fn record(&mut self, which: Loop, now: Instant, lag: Duration) {
        let slot = &mut self.worst[which as usize];
        *slot = (*slot).max(lag);
        if lag <= self.threshold {
            return;
        }
        let continues = self
            .last_late
            .is_some_and(|t| now.saturating_duration_since(t) <= STARVED_WINDOW);
        if !continues {
            // The starvation began when the late timer should have fired.
            self.streak_since = Some(now.checked_sub(lag).unwrap_or(now));
        }
        self.last_late = Some(now);
    }

    pub fn starved(&self, now: Instant) -> bool {
        self.last_late
            .is_some_and(|t| now.saturating_duration_since(t) <= STARVED_WINDOW)
    }

    /// How long the agent has been starved without a break (zero when it is not).
    pub fn starved_for(&self, now: Instant) -> Duration {
        match self.streak_since {
            Some(since) if self.starved(now) => now.saturating_duration_since(since),
            _ => Duration::ZERO,
        }
    }

    /// Whether to stop one of `running` processes now to shed load: only after `SHED_AFTER`
    /// of unbroken starvation, never the last one, and then not again for another
    /// `SHED_AFTER` (the load just shed needs time to show).
    pub fn shed(&mut self, now: Instant, running: usize) -> bool {
        if running <= 1 || self.starved_for(now) < SHED_AFTER {
            return false;
        }
        self.streak_since = Some(now);
        true
    }

    /// The worst lag of each loop since the last call (for a heartbeat), and resets them.
    pub fn take_worst(&mut self) -> (Duration, Duration) {
        let w = self.worst;
        self.worst = [Duration::ZERO; 2];
        (w[Loop::Control as usize], w[Loop::Supervisor as usize])
    }
}

/// How late a periodic timer fired: the time since it last fired beyond its period.
pub fn lag(period: Duration, since_last: Duration) -> Duration {
    since_last.saturating_sub(period)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_lease_renewed_in_time_never_expires() {
        let t0 = Instant::now();
        let mut l = Lease::new(Duration::from_secs(5));
        assert_eq!(l.heard(10, "run-1", true, t0).1, Verdict::Apply);
        for s in 1..20 {
            assert_eq!(
                l.heard(10, "run-1", true, at(t0, s * 1000)),
                (None, Verdict::Renewed)
            );
            assert_eq!(l.check(at(t0, s * 1000 + 900)), None);
        }
        assert!(l.valid());
        assert_eq!(l.expiries(), 0);
    }

    #[test]
    fn silence_longer_than_the_lease_expires_it_once() {
        let t0 = Instant::now();
        let mut l = Lease::new(Duration::from_secs(5));
        l.heard(10, "run-1", true, t0);
        assert_eq!(l.check(at(t0, 5000)), None, "at the lease, not yet");
        assert_eq!(
            l.check(at(t0, 5100)),
            Some(Expired {
                silent: Duration::from_millis(5100)
            })
        );
        assert_eq!(l.check(at(t0, 6000)), None, "reported once");
        assert!(l.lapsed());
        assert_eq!(l.expiries(), 1);
        // An idle agent holds nothing to guard.
        let mut idle = Lease::new(Duration::from_secs(5));
        idle.heard(10, "", false, t0);
        assert_eq!(idle.check(at(t0, 60_000)), None);
        // Nor does one that never heard anything.
        assert_eq!(
            Lease::new(Duration::from_secs(1)).check(at(t0, 60_000)),
            None
        );
    }

    #[test]
    fn after_an_expiry_only_a_newer_epoch_is_trusted() {
        let t0 = Instant::now();
        let mut l = Lease::new(Duration::from_secs(5));
        l.heard(10, "run-1", true, t0);
        // Frozen for 8 s: the queued renewal, read on waking, finds the lease already gone.
        let (expired, v) = l.heard(10, "run-1", true, at(t0, 8000));
        assert_eq!(expired.map(|e| e.silent), Some(Duration::from_secs(8)));
        assert_eq!(v, Verdict::AwaitNewer);
        assert!(!l.valid());
        assert_eq!(l.heard(9, "run-1", true, at(t0, 8100)).1, Verdict::Stale);
        assert_eq!(
            l.heard(10, "run-1", true, at(t0, 8200)).1,
            Verdict::AwaitNewer
        );
        // The coordinator saw the lapse and issued a newer epoch: the instances come back.
        assert_eq!(
            l.heard(11, "run-1", true, at(t0, 9000)),
            (None, Verdict::Apply)
        );
        assert!(l.valid());
        assert_eq!(l.expiries(), 1, "counted for the run");
        assert_eq!(l.heard(12, "", false, at(t0, 9400)).1, Verdict::Apply);
        assert_eq!(l.expiries(), 1, "kept when the run ends");
        assert_eq!(l.heard(13, "run-2", true, at(t0, 9500)).1, Verdict::Apply);
        assert_eq!(l.expiries(), 0, "a new run counts afresh");
    }

    #[test]
    fn stale_and_repeated_assignments() {
        let t0 = Instant::now();
        let mut l = Lease::new(Duration::from_secs(5));
        assert_eq!(l.heard(10, "run-1", true, t0).1, Verdict::Apply);
        assert_eq!(l.heard(9, "run-1", true, t0).1, Verdict::Stale);
        assert_eq!(l.heard(10, "run-1", true, t0).1, Verdict::Renewed);
        assert_eq!(
            l.heard(10, "run-2", true, t0).1,
            Verdict::Apply,
            "a new run"
        );
        assert_eq!(l.heard(11, "run-2", false, t0).1, Verdict::Apply);
        // A stale message does not renew the lease.
        let mut l = Lease::new(Duration::from_secs(5));
        l.heard(10, "run-1", true, t0);
        l.heard(9, "run-1", true, at(t0, 4000));
        assert!(l.check(at(t0, 5500)).is_some());
    }

    #[test]
    fn a_late_timer_makes_the_agent_starved_for_a_while() {
        let t0 = Instant::now();
        let mut h = Health::new(Duration::from_secs(4));
        assert_eq!(h.threshold(), Duration::from_secs(1));
        h.record(Loop::Control, at(t0, 100), Duration::from_millis(900));
        assert!(!h.starved(at(t0, 100)), "within a quarter of the lease");
        // A freeze of 5 s (SIGSTOP): one very late timer, then on time again.
        h.record(Loop::Control, at(t0, 6000), Duration::from_millis(5000));
        assert!(h.starved(at(t0, 6000)));
        assert_eq!(h.starved_for(at(t0, 6000)), Duration::from_secs(5));
        assert!(h.starved(at(t0, 8000)));
        assert!(!h.starved(at(t0, 8001)), "over once the window passed");
        assert_eq!(h.starved_for(at(t0, 8001)), Duration::ZERO);
        assert_eq!(
            h.take_worst(),
            (Duration::from_millis(5000), Duration::ZERO)
        );
        assert_eq!(h.take_worst(), (Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn load_is_shed_only_after_unbroken_starvation_and_never_the_last_process() {
        let t0 = Instant::now();
        let mut h = Health::new(Duration::from_secs(4));
        // Late by 1.5 s every second for 40 s.
        let mut shed = Vec::new();
        for s in 1..=40u64 {
            let now = at(t0, s * 1000);
            h.record(Loop::Supervisor, now, Duration::from_millis(1500));
            if h.shed(now, 3) {
                shed.push(s);
            }
        }
        assert_eq!(shed, [30], "30 s after the starvation began");
        assert!(!h.shed(at(t0, 40_000), 1), "never the last process");
        // A break longer than the window starts the count again.
        let mut h = Health::new(Duration::from_secs(4));
        for s in (1..=20u64).chain(25..=45) {
            h.record(Loop::Control, at(t0, s * 1000), Duration::from_millis(1500));
        }
        assert!(!h.shed(at(t0, 45_000), 3));
    }

    #[test]
    fn lag_is_lateness_beyond_the_period() {
        assert_eq!(
            lag(Duration::from_millis(100), Duration::from_millis(350)),
            Duration::from_millis(250)
        );
        assert_eq!(
            lag(Duration::from_millis(100), Duration::from_millis(90)),
            Duration::ZERO
        );
    }
}
