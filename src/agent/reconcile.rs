//! The agent's instances as a pure state machine: what the newest trusted assignment wants
//! against what runs, turned into actions (start this instance, stop that process, kill an
//! overstaying one), with each incarnation's counters and why it ended kept for the
//! heartbeats. The supervisor does only the process I/O around it: it spawns what `due`
//! returns, signals what the actions say, and feeds back starts, metric lines and exits.

use super::launch::{restart_after, RESTART_LIMIT};
use super::tally::{apply_tally, TallyKey};
use crate::metrics::TALLY_SLOTS;
use crate::wire::pb::{self, End, Phase};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// A simulator that stopped itself on its own lease is started again after this, if the
/// agent's lease holds: its agent was late, not gone.
pub const AFTER_SIM_LEASE: Duration = Duration::from_secs(1);
/// The exit code of a simulator that stopped because its agent went quiet (see vtox-sim).
pub const EXIT_LEASE_LOST: i32 = 3;

/// One instance the agent is to run.
#[derive(Debug, Clone)]
pub struct Instance {
    pub spec: pb::InstanceSpec,
    pub phase: Phase,
    pub restarts: u32,
    crashes: VecDeque<Instant>,
    pub incarnation: u64,
    pub counters: pb::Counters,
    pub pid: Option<u32>,
    pub next_start: Instant,
    pub last_error: String,
    /// Why its current incarnation ended (None while it runs or before it started).
    pub end: End,
}

/// A process told to stop: it finishes its requests in flight and exits by itself, or is
/// killed when it overstays (its tally still has its counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stopping {
    index: u32,
    incarnation: u64,
    /// None once it was killed.
    kill_at: Option<Instant>,
}

/// What the supervisor must do to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Finish the requests in flight and exit (SIGTERM).
    Stop(u32),
    /// It overstayed its stop (SIGKILL).
    Kill(u32),
}

/// What a desired state asks beyond the signals: on a new run, the tallies an earlier agent
/// process left for it are to be looked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub signals: Vec<Signal>,
    pub new_run: bool,
}

/// How an exit was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It was stopping on purpose; its counts are final now.
    Stopped,
    /// It ended its run's duration.
    Finished,
    /// It stopped itself on its own lease; started again at `AFTER_SIM_LEASE`.
    LeaseLost,
    /// It crashed: restarted with backoff.
    Crashed,
    /// It crashed too often: given up.
    CrashLoop,
    /// An exit of a process this state does not know (ignored).
    Unknown,
}

/// The instances of the current run, what ended of them, and the processes told to stop.
#[derive(Debug, Default)]
pub struct Instances {
    pub epoch: u64,
    pub run_id: String,
    pub spec: Option<pb::RunSpec>,
    current: BTreeMap<u32, Instance>,
    /// Ended incarnations of the current run; reported so that no count is ever lost.
    history: Vec<pb::InstanceStatus>,
    /// Processes told to stop that have not exited yet, by pid.
    stopping: BTreeMap<u32, Stopping>,
    /// Lease expiries acted on (each stops everything once).
    expiries_seen: u64,
    /// Instances stopped to shed load in this run: not started again by later assignments.
    shed: BTreeSet<u32>,
    /// Due starts held back by starvation.
    pub deferred: u32,
}

impl Instances {
    pub fn new() -> Instances {
        Instances::default()
    }

    /// How long a process told to stop may take before it is killed.
    pub fn stop_grace(&self) -> Duration {
        crate::process::stop_grace(self.spec.as_ref().map_or(5.0, |s| s.timeout_s))
    }

    pub fn get(&self, index: u32) -> Option<&Instance> {
        self.current.get(&index)
    }

    /// The control thread's desired state: a lease expiry it has not acted on stops
    /// everything, an assignment of another epoch or run is applied.
    pub fn desired(
        &mut self,
        assignment: Option<&pb::Assignment>,
        expiries: u64,
        now: Instant,
    ) -> Applied {
        let mut out = Applied::default();
        if expiries > self.expiries_seen {
            self.expiries_seen = expiries;
            out.signals.extend(self.stop_all(End::Lease, now));
        }
        if let Some(a) = assignment.filter(|a| a.epoch != self.epoch || a.run_id != self.run_id) {
            let applied = self.apply(a, now);
            out.signals.extend(applied.signals);
            out.new_run = applied.new_run;
        }
        out
    }

    fn apply(&mut self, a: &pb::Assignment, now: Instant) -> Applied {
        let mut out = Applied::default();
        self.epoch = a.epoch;
        if a.run_id.is_empty() {
            // The run ended or was stopped: the simulators go, but the run's id and history
            // stay, so that their last metric lines still reach the coordinator.
            out.signals.extend(self.stop_all(End::Unassigned, now));
        } else if a.run_id != self.run_id {
            out.signals.extend(self.stop_all(End::Unassigned, now));
            self.history.clear();
            self.shed.clear();
            self.run_id = a.run_id.clone();
            out.new_run = true;
        }
        self.spec = a.spec.clone();
        let desired: BTreeMap<u32, pb::InstanceSpec> = a
            .instances
            .iter()
            .filter(|i| !self.shed.contains(&i.index))
            .map(|i| (i.index, *i))
            .collect();
        let unwanted: Vec<u32> = self
            .current
            .iter()
            .filter(|(idx, inst)| desired.get(idx) != Some(&inst.spec))
            .map(|(idx, _)| *idx)
            .collect();
        for idx in unwanted {
            out.signals.extend(self.stop(idx, End::Unassigned, now));
        }
        let stagger =
            Duration::from_secs_f64(self.spec.as_ref().map_or(0.0, |s| s.stagger_s.max(0.0)));
        let mut position = 0u32;
        for (idx, spec) in desired {
            if self.current.contains_key(&idx) {
                continue;
            }
            self.current
                .insert(idx, new_instance(spec, now + stagger * position));
            position += 1;
        }
        out
    }

    /// Stops instance `idx` for `end`: its process, if any, is told to finish.
    pub fn stop(&mut self, idx: u32, end: End, now: Instant) -> Option<Signal> {
        let mut inst = self.current.remove(&idx)?;
        // An instance without a process (waiting to start, in backoff, failed, finished) has
        // its last incarnation in the history already, with why that one ended.
        let pid = inst.pid?;
        self.stopping.insert(
            pid,
            Stopping {
                index: idx,
                incarnation: inst.incarnation,
                kill_at: Some(now + self.stop_grace()),
            },
        );
        // Its counts are final only once the process has exited (see `exited`).
        inst.phase = Phase::Stopping;
        inst.end = end;
        self.history.push(status_of(&self.run_id, idx, &inst));
        Some(Signal::Stop(pid))
    }

    pub fn stop_all(&mut self, end: End, now: Instant) -> Vec<Signal> {
        let all: Vec<u32> = self.current.keys().copied().collect();
        all.into_iter()
            .filter_map(|idx| self.stop(idx, end, now))
            .collect()
    }

    /// Processes that overstayed their stop: to be killed (their exit comes as any other).
    pub fn overdue(&mut self, now: Instant) -> Vec<Signal> {
        self.stopping
            .iter_mut()
            .filter(|(_, st)| st.kill_at.is_some_and(|t| t <= now))
            .map(|(pid, st)| {
                st.kill_at = None;
                Signal::Kill(*pid)
            })
            .collect()
    }

    /// The instances to start now. A starved agent starts none (it would only feed the
    /// starvation) and counts them as deferred.
    pub fn due(&mut self, now: Instant, starved: bool) -> Vec<u32> {
        let due: Vec<u32> = self
            .current
            .iter()
            .filter(|(_, i)| {
                i.pid.is_none()
                    && matches!(i.phase, Phase::Starting | Phase::Backoff)
                    && i.next_start <= now
            })
            .map(|(idx, _)| *idx)
            .collect();
        if starved {
            self.deferred = due.len() as u32;
            return Vec::new();
        }
        self.deferred = 0;
        due
    }

    /// Nothing is left to drive for `idx`: the run's duration is over.
    pub fn nothing_left(&mut self, idx: u32) {
        if let Some(inst) = self.current.get_mut(&idx) {
            inst.phase = Phase::Exited;
            inst.end = End::Finished;
        }
    }

    /// The tally key a process of `idx` started now as `incarnation` is to write.
    pub fn tally_key(&self, idx: u32, incarnation: u64) -> Option<TallyKey> {
        let inst = self.current.get(&idx)?;
        Some(TallyKey {
            run_id: self.run_id.clone(),
            index: idx,
            incarnation,
            first_vehicle: inst.spec.first_vehicle,
            vehicles: inst.spec.vehicles,
        })
    }

    /// The incarnation number for a process of `idx` started at Unix ms `now_ms`: the time,
    /// and always above the one before, so that every incarnation is told apart.
    pub fn next_incarnation(&self, idx: u32, now_ms: u64) -> u64 {
        self.current
            .get(&idx)
            .map_or(now_ms, |i| now_ms.max(i.incarnation + 1))
    }

    pub fn started(&mut self, idx: u32, incarnation: u64, pid: Option<u32>) {
        if let Some(inst) = self.current.get_mut(&idx) {
            inst.incarnation = incarnation;
            inst.counters = pb::Counters::default();
            inst.pid = pid;
            inst.phase = Phase::Running;
            inst.end = End::None;
        }
    }

    /// The process could not be started at all: a crash as far as backoff goes.
    pub fn start_failed(&mut self, idx: u32, error: String, now: Instant) {
        if let Some(inst) = self.current.get_mut(&idx) {
            inst.last_error = error;
            crashed(inst, now);
        }
    }

    /// A metric line of (`idx`, `incarnation`): the counters it carries replace the last.
    pub fn line(&mut self, idx: u32, incarnation: u64, mut counters: pb::Counters) {
        if let Some(inst) = self
            .current
            .get_mut(&idx)
            .filter(|i| i.incarnation == incarnation)
        {
            counters.bad_lines = inst.counters.bad_lines;
            inst.counters = counters;
        } else if let Some(h) = self
            .history
            .iter_mut()
            .find(|h| h.index == idx && h.incarnation == incarnation)
        {
            // The final line of a stopped instance arrives after it left the desired set.
            counters.bad_lines = h.counters.as_ref().map_or(0, |c| c.bad_lines);
            h.counters = Some(counters);
        }
    }

    pub fn bad_line(&mut self, idx: u32, incarnation: u64) {
        if let Some(inst) = self
            .current
            .get_mut(&idx)
            .filter(|i| i.incarnation == incarnation)
        {
            inst.counters.bad_lines += 1;
        }
    }

    /// The process of (`idx`, `incarnation`) exited with `code` (None: killed by a signal).
    /// `tally` reads a killed process's exact totals (the supervisor's file I/O).
    pub fn exited(
        &mut self,
        idx: u32,
        incarnation: u64,
        code: Option<i32>,
        detail: &str,
        now: Instant,
        tally: impl FnOnce(&TallyKey) -> Option<[u64; TALLY_SLOTS]>,
    ) -> Exit {
        let key = |inst: &Instance, run_id: &str| TallyKey {
            run_id: run_id.to_string(),
            index: idx,
            incarnation,
            first_vehicle: inst.spec.first_vehicle,
            vehicles: inst.spec.vehicles,
        };
        let run_id = self.run_id.clone();
        let Some(inst) = self
            .current
            .get_mut(&idx)
            .filter(|i| i.incarnation == incarnation && i.pid.is_some())
        else {
            return self.stopped(idx, incarnation, code == Some(0), tally);
        };
        inst.pid = None;
        inst.phase = Phase::Exited;
        if code == Some(0) {
            inst.end = End::Finished;
            self.history.push(status_of(&run_id, idx, inst));
            return Exit::Finished;
        }
        // A killed simulator's last metric line is up to a report interval old; its tally
        // file has the exact totals.
        if let Some(t) = tally(&key(inst, &run_id)) {
            apply_tally(&mut inst.counters, &t);
        }
        if code == Some(EXIT_LEASE_LOST) {
            // Its keep-alive from this agent ran late (the agent starved or frozen): not a
            // crash. It comes back once the agent's lease holds; if that lapsed too, the
            // lease expiry stops the instance and the next assignment restarts it.
            inst.end = End::Lease;
            inst.last_error = "stopped itself: no keep-alive from its agent in time".into();
            self.history.push(status_of(&run_id, idx, inst));
            inst.phase = Phase::Starting;
            inst.next_start = now + AFTER_SIM_LEASE;
            return Exit::LeaseLost;
        }
        inst.last_error = format!("exited: {detail}");
        inst.end = End::Crashed;
        crashed(inst, now);
        let mut ended = status_of(&run_id, idx, inst);
        let failed = inst.phase == Phase::Failed;
        if !failed {
            ended.phase = Phase::Exited as i32;
        }
        self.history.push(ended);
        if failed {
            Exit::CrashLoop
        } else {
            Exit::Crashed
        }
    }

    /// A process told to stop has exited: its counts are final. One that did not end
    /// cleanly (killed at agent shutdown, say) may have written no last line; its tally has
    /// the exact totals.
    fn stopped(
        &mut self,
        idx: u32,
        incarnation: u64,
        success: bool,
        tally: impl FnOnce(&TallyKey) -> Option<[u64; TALLY_SLOTS]>,
    ) -> Exit {
        self.stopping
            .retain(|_, st| (st.index, st.incarnation) != (idx, incarnation));
        let Some(h) = self.history.iter_mut().find(|h| {
            h.index == idx && h.incarnation == incarnation && h.phase == Phase::Stopping as i32
        }) else {
            return Exit::Unknown;
        };
        h.phase = Phase::Exited as i32;
        if !success {
            let key = TallyKey {
                run_id: h.run_id.clone(),
                index: idx,
                incarnation,
                first_vehicle: h.first_vehicle,
                vehicles: h.vehicles,
            };
            if let Some(t) = tally(&key) {
                apply_tally(h.counters.get_or_insert_with(Default::default), &t);
            }
        }
        Exit::Stopped
    }

    /// After long unbroken starvation (`health` decides), stops the newest running instance:
    /// its vehicles are not driven (and shown as such) rather than every vehicle of the host
    /// driven late. Returns the instance and the signal for its process.
    pub fn shed(&mut self, now: Instant, health: &mut super::Health) -> Option<(u32, Signal)> {
        let running: Vec<u32> = self
            .current
            .iter()
            .filter(|(_, i)| i.phase == Phase::Running)
            .map(|(idx, _)| *idx)
            .collect();
        if !health.shed(now, running.len()) {
            return None;
        }
        let idx = *running.last()?;
        self.shed.insert(idx);
        Some((idx, self.stop(idx, End::Shed, now)?))
    }

    /// Every incarnation of the run: the ended ones, then the current ones.
    pub fn statuses(&self) -> Vec<pb::InstanceStatus> {
        let mut out: Vec<pb::InstanceStatus> = self
            .history
            .iter()
            .filter(|h| {
                self.current
                    .get(&h.index)
                    .is_none_or(|i| i.incarnation != h.incarnation)
            })
            .cloned()
            .collect();
        out.extend(
            self.current
                .iter()
                .map(|(idx, inst)| status_of(&self.run_id, *idx, inst)),
        );
        out
    }

    /// Every simulator process, running or stopping.
    pub fn pids(&self) -> Vec<u32> {
        self.current
            .values()
            .filter_map(|i| i.pid)
            .chain(self.stopping.keys().copied())
            .collect()
    }
}

fn new_instance(spec: pb::InstanceSpec, next_start: Instant) -> Instance {
    Instance {
        spec,
        phase: Phase::Starting,
        restarts: 0,
        crashes: VecDeque::new(),
        incarnation: 0,
        counters: pb::Counters::default(),
        pid: None,
        next_start,
        last_error: String::new(),
        end: End::None,
    }
}

/// Schedules a restart with backoff, or marks the instance failed when it crash-loops.
fn crashed(inst: &mut Instance, now: Instant) {
    inst.crashes.push_back(now);
    match restart_after(&mut inst.crashes, now) {
        None => {
            tracing::error!(
                instance = inst.spec.index,
                "crash loop: {RESTART_LIMIT} restarts within a minute and it crashed again; giving up"
            );
            inst.phase = Phase::Failed;
        }
        Some(backoff) => {
            inst.restarts += 1;
            inst.phase = Phase::Backoff;
            inst.next_start = now + backoff;
        }
    }
}

pub fn status_of(run_id: &str, idx: u32, inst: &Instance) -> pb::InstanceStatus {
    pb::InstanceStatus {
        run_id: run_id.to_string(),
        index: idx,
        first_vehicle: inst.spec.first_vehicle,
        vehicles: inst.spec.vehicles,
        phase: inst.phase as i32,
        restarts: inst.restarts,
        incarnation: inst.incarnation,
        counters: Some(inst.counters.clone()),
        last_error: inst.last_error.clone(),
        end: inst.end as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn assignment(epoch: u64, run: &str, indexes: &[u32]) -> pb::Assignment {
        pb::Assignment {
            epoch,
            run_id: run.into(),
            spec: Some(pb::RunSpec {
                stagger_s: 0.1,
                timeout_s: 5.0,
                ..Default::default()
            }),
            instances: indexes
                .iter()
                .map(|&i| pb::InstanceSpec {
                    index: i,
                    first_vehicle: u64::from(i) * 50,
                    vehicles: 50,
                })
                .collect(),
        }
    }

    /// Starts whatever is due at `now`, each as pid 1000 + index.
    fn start_due(s: &mut Instances, now: Instant) -> Vec<u32> {
        let due = s.due(now, false);
        for &i in &due {
            let inc = s.next_incarnation(i, 1_000 + u64::from(i));
            s.started(i, inc, Some(1000 + i));
        }
        due
    }

    fn phases(s: &Instances) -> Vec<(u32, Phase, End)> {
        s.statuses()
            .iter()
            .map(|x| (x.index, x.phase(), x.end()))
            .collect()
    }

    #[test]
    fn an_assignment_starts_its_instances_staggered() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        let a = s.desired(Some(&assignment(5, "run-1", &[0, 1, 2])), 0, t0);
        assert_eq!(
            a,
            Applied {
                signals: vec![],
                new_run: true
            }
        );
        assert_eq!(
            start_due(&mut s, t0),
            [0],
            "one now, the next after the stagger"
        );
        assert_eq!(start_due(&mut s, ms(t0, 100)), [1]);
        assert_eq!(start_due(&mut s, ms(t0, 200)), [2]);
        assert_eq!(s.pids(), [1000, 1001, 1002]);
        // The same assignment again changes nothing.
        assert_eq!(
            s.desired(Some(&assignment(5, "run-1", &[0, 1, 2])), 0, t0),
            Applied::default()
        );
    }

    #[test]
    fn instances_no_longer_assigned_are_stopped_and_killed_if_they_overstay() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        s.desired(Some(&assignment(5, "run-1", &[0, 1])), 0, t0);
        start_due(&mut s, ms(t0, 200));
        let a = s.desired(Some(&assignment(6, "run-1", &[0])), 0, ms(t0, 300));
        assert_eq!(a.signals, [Signal::Stop(1001)]);
        assert!(s.overdue(ms(t0, 300)).is_empty());
        let grace = s.stop_grace();
        assert_eq!(s.overdue(ms(t0, 300) + grace), [Signal::Kill(1001)]);
        assert!(s.overdue(ms(t0, 400) + grace).is_empty(), "killed once");
        // Its exit makes its counts final, as exited, ended as unassigned.
        let exit = s.exited(1, 1001, None, "killed", ms(t0, 500) + grace, |_| None);
        assert_eq!(exit, Exit::Stopped);
        assert!(phases(&s).contains(&(1, Phase::Exited, End::Unassigned)));
        assert_eq!(s.pids(), [1000]);
    }

    #[test]
    fn a_crash_is_restarted_with_backoff_and_a_crash_loop_given_up() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        s.desired(Some(&assignment(5, "run-1", &[0])), 0, t0);
        let mut at = 0u64;
        let mut exits = Vec::new();
        for _ in 0..7 {
            let due = start_due(&mut s, ms(t0, at));
            if due.is_empty() {
                break;
            }
            let inc = s.get(0).map(|i| i.incarnation).unwrap_or(0);
            let exit = s.exited(0, inc, Some(101), "exit status: 101", ms(t0, at), |_| None);
            exits.push(exit);
            at = s
                .get(0)
                .map(|i| i.next_start.duration_since(t0).as_millis() as u64)
                .unwrap_or(at);
        }
        assert_eq!(exits.iter().filter(|e| **e == Exit::Crashed).count(), 5);
        assert_eq!(exits.last(), Some(&Exit::CrashLoop));
        assert_eq!(
            s.get(0).map(|i| (i.phase, i.restarts)),
            Some((Phase::Failed, 5))
        );
        assert!(s.due(ms(t0, 1_000_000), false).is_empty(), "never again");
        // Every incarnation is reported, each ended as crashed.
        let crashed = s
            .statuses()
            .iter()
            .filter(|x| x.end() == End::Crashed)
            .count();
        assert_eq!(crashed, 6);
    }

    #[test]
    fn a_lease_expiry_stops_everything_once_and_the_next_epoch_restarts_it() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        let a = assignment(5, "run-1", &[0, 1]);
        s.desired(Some(&a), 0, t0);
        start_due(&mut s, ms(t0, 100));
        let stop = s.desired(Some(&a), 1, ms(t0, 200));
        assert_eq!(stop.signals, [Signal::Stop(1000), Signal::Stop(1001)]);
        // The same expiry count, and the same epoch, ask for nothing more.
        assert_eq!(s.desired(Some(&a), 1, ms(t0, 300)), Applied::default());
        assert!(s.due(ms(t0, 300), false).is_empty());
        for i in [0, 1] {
            s.exited(i, 1000 + u64::from(i), Some(0), "", ms(t0, 400), |_| None);
        }
        assert!(
            phases(&s).iter().all(|p| p.2 == End::Lease),
            "{:?}",
            phases(&s)
        );
        // The coordinator confirmed with a newer epoch: both start again.
        s.desired(Some(&assignment(6, "run-1", &[0, 1])), 1, ms(t0, 500));
        assert_eq!(start_due(&mut s, ms(t0, 600)), [0, 1]);
    }

    #[test]
    fn a_simulator_that_lost_its_own_lease_comes_back_without_counting_as_a_crash() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        s.desired(Some(&assignment(5, "run-1", &[0])), 0, t0);
        start_due(&mut s, t0);
        let exit = s.exited(
            0,
            1000,
            Some(EXIT_LEASE_LOST),
            "exit status: 3",
            ms(t0, 10),
            |_| None,
        );
        assert_eq!(exit, Exit::LeaseLost);
        let i = s.get(0).unwrap();
        assert_eq!(
            (i.phase, i.restarts, i.end),
            (Phase::Starting, 0, End::Lease)
        );
        assert!(s.due(ms(t0, 500), false).is_empty(), "after a second");
        assert_eq!(s.due(ms(t0, 1010), false), [0]);
    }

    #[test]
    fn a_starved_agent_holds_its_starts_back_and_counts_them() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        s.desired(Some(&assignment(5, "run-1", &[0, 1])), 0, t0);
        assert!(s.due(ms(t0, 1000), true).is_empty());
        assert_eq!(s.deferred, 2);
        assert_eq!(s.due(ms(t0, 1100), false), [0, 1]);
        assert_eq!(s.deferred, 0);
    }

    #[test]
    fn a_killed_process_gets_its_exact_counts_from_its_tally() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        s.desired(Some(&assignment(5, "run-1", &[2])), 0, t0);
        start_due(&mut s, t0);
        s.line(
            2,
            1002,
            pb::Counters {
                sent: 8,
                accepted: 8,
                ..Default::default()
            },
        );
        let mut seen = None;
        s.exited(2, 1002, None, "signal: 9", ms(t0, 10), |k| {
            seen = Some(k.clone());
            let mut t = [0u64; TALLY_SLOTS];
            for c in [
                crate::counters::Counter::Sent,
                crate::counters::Counter::Accepted,
            ] {
                t[c.def().tally.unwrap_or(0)] = 10;
            }
            Some(t)
        });
        let k = seen.unwrap();
        assert_eq!(
            (k.run_id.as_str(), k.index, k.incarnation, k.first_vehicle),
            ("run-1", 2, 1002, 100)
        );
        let c = s.statuses()[0].counters.clone().unwrap();
        assert_eq!((c.sent, c.accepted), (10, 10));
    }

    #[test]
    fn a_new_run_starts_afresh_and_an_ended_one_keeps_its_history() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        s.desired(Some(&assignment(5, "run-1", &[0])), 0, t0);
        start_due(&mut s, t0);
        let end = s.desired(Some(&assignment(6, "", &[])), 0, ms(t0, 10));
        assert_eq!(end.signals, [Signal::Stop(1000)]);
        assert!(!end.new_run);
        s.line(
            0,
            1000,
            pb::Counters {
                sent: 3,
                ..Default::default()
            },
        );
        assert_eq!(
            s.statuses()[0].counters.as_ref().map(|c| c.sent),
            Some(3),
            "the final line lands"
        );
        let next = s.desired(Some(&assignment(7, "run-2", &[0])), 0, ms(t0, 20));
        assert!(next.new_run);
        assert_eq!(s.statuses().len(), 1, "only the new run's instance");
        assert_eq!(s.statuses()[0].run_id, "run-2");
    }

    #[test]
    fn a_stale_exit_changes_nothing() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        s.desired(Some(&assignment(5, "run-1", &[0])), 0, t0);
        start_due(&mut s, t0);
        assert_eq!(s.exited(0, 999, Some(1), "", t0, |_| None), Exit::Unknown);
        assert_eq!(s.get(0).map(|i| i.phase), Some(Phase::Running));
    }

    #[test]
    fn load_is_shed_from_the_newest_instance_and_never_comes_back_in_the_run() {
        let t0 = Instant::now();
        let mut s = Instances::new();
        let a = assignment(5, "run-1", &[0, 1, 2]);
        s.desired(Some(&a), 0, t0);
        for k in 0..3 {
            start_due(&mut s, ms(t0, 100 * k));
        }
        let mut health = super::super::Health::new(Duration::from_secs(4));
        let mut shed = None;
        for sec in 1..=31u64 {
            health.record(
                super::super::Loop::Control,
                ms(t0, sec * 1000),
                Duration::from_millis(1500),
            );
            if let Some(x) = s.shed(ms(t0, sec * 1000), &mut health) {
                shed = Some(x);
            }
        }
        assert_eq!(shed, Some((2, Signal::Stop(1002))));
        s.exited(2, 1002, Some(0), "", ms(t0, 32_000), |_| None);
        assert!(phases(&s).contains(&(2, Phase::Exited, End::Shed)));
        // Renewals of the assignment do not bring it back.
        s.desired(Some(&assignment(6, "run-1", &[0, 1, 2])), 0, ms(t0, 33_000));
        assert!(s.due(ms(t0, 40_000), false).is_empty());
    }
}
