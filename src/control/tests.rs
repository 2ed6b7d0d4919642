//! The control core's rules on a fake clock.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

const LEASE: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(3);

/// A fake clock: a fixed origin plus whatever the test advances it by.
struct Clock {
    origin: Instant,
    at: Duration,
    unix0: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            origin: Instant::now(),
            at: Duration::ZERO,
            unix0: 1_800_000_000_000,
        }
    }
    fn now(&self) -> Now {
        Now {
            mono: self.origin + self.at,
            unix_ms: self.unix0 + self.at.as_millis() as u64,
        }
    }
    fn advance(&mut self, d: Duration) -> Now {
        self.at += d;
        self.now()
    }
}

fn limits() -> Limits {
    Limits {
        lease: LEASE,
        grace: GRACE,
        max_agents: 100,
        max_join_rate: 100,
    }
}

fn hardware() -> pb::Hardware {
    pb::Hardware {
        hostname: "h".into(),
        logical_cores: 8,
        physical_cores: 8,
        memory_total_bytes: 16 << 30,
        memory_available_bytes: 16 << 30,
        calibrated_msgs_per_core: 20_000.0,
        ..Default::default()
    }
}

fn connect(c: &mut Control, name: &str, max_vehicles: u64, now: Now) -> u64 {
    c.join(
        Joining {
            name: name.into(),
            hardware: hardware(),
            max_vehicles,
            address: String::new(),
        },
        now,
    )
    .unwrap();
    c.open_session(name, 0, now).unwrap().0
}

fn start(c: &mut Control, vehicles: u64, now: Now) {
    let req = pb::StartRequest {
        params: Some(pb::PlanParams {
            vehicles,
            per_instance: 50,
            interval_s: 1.2,
            batch_size: 10,
            overcommit: false,
            first_vehicle: 0,
            sink_on_host: false,
        }),
        spec: Some(pb::RunSpec::default()),
        expect_agents: 0,
    };
    let _ = c.start(req, now).unwrap();
}

/// A heartbeat of an agent that applied everything sent to it so far.
fn beat(c: &mut Control, name: &str, now: Now) {
    let hb = pb::Heartbeat {
        epoch: c.epoch(),
        ..Default::default()
    };
    let _ = c.heartbeat(name, hb, now);
}

/// Instance indexes per agent, as the tick sends them.
fn held(sends: &[Send]) -> BTreeMap<String, Vec<u32>> {
    sends
        .iter()
        .map(|s| {
            (
                s.agent.clone(),
                s.assignment.instances.iter().map(|i| i.index).collect(),
            )
        })
        .collect()
}

#[test]
fn a_lost_agents_instances_move_only_after_lease_and_grace() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 100, clock.now());
    connect(&mut c, "b", 300, clock.now());
    start(&mut c, 200, clock.now());
    let before = held(&c.tick(clock.now()));
    assert_eq!(before["a"].len() + before["b"].len(), 4);
    assert!(!before["a"].is_empty());
    // a falls silent; b goes on.
    let mut t = Duration::ZERO;
    while t < LEASE + GRACE - Duration::from_millis(100) {
        let now = clock.advance(Duration::from_millis(100));
        t += Duration::from_millis(100);
        beat(&mut c, "b", now);
        assert_eq!(held(&c.tick(now)), before, "moved after only {t:?}");
    }
    let now = clock.advance(Duration::from_millis(200));
    beat(&mut c, "b", now);
    let epoch = c.epoch();
    let after = held(&c.tick(now));
    assert!(after["a"].is_empty());
    assert_eq!(after["b"].len(), 4);
    assert!(c.epoch() > epoch, "a move is a newer epoch");
}

#[test]
fn a_frozen_agent_gets_a_newer_epoch_only_once_heard_from_again() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    connect(&mut c, "b", 300, clock.now());
    start(&mut c, 200, clock.now());
    let mut sent_to_a = 0;
    // a freezes (its TCP session stays open: assignments queue up for it).
    for _ in 0..12 {
        let now = clock.advance(Duration::from_secs(1));
        beat(&mut c, "b", now);
        for s in c.tick(now) {
            if s.agent == "a" {
                sent_to_a = sent_to_a.max(s.assignment.epoch);
            }
        }
    }
    // Its vehicles moved meanwhile; it thaws and reports.
    let now = clock.advance(Duration::from_millis(300));
    assert!(c.heartbeat("a", pb::Heartbeat::default(), now).reconcile);
    let next = c.tick(now);
    let to_a = next.iter().find(|s| s.agent == "a").unwrap();
    // Everything queued while it was frozen is older than what it gets now, so the agent
    // (which after a lapsed lease only takes a newer epoch) refuses the queue.
    assert!(to_a.assignment.epoch > sent_to_a);
    assert!(to_a.assignment.instances.is_empty());
}

#[test]
fn epochs_never_go_back_across_a_restore() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    start(&mut c, 100, clock.now());
    for _ in 0..5 {
        let _ = c.stop(clock.advance(Duration::from_millis(1)));
    }
    let issued = c.epoch();
    let bytes = c.take_write(clock.now()).unwrap().encode();
    // The restarted coordinator's wall clock went back an hour.
    let mut back = Clock::new();
    back.unix0 = clock.unix0 - 3_600_000;
    let stored = <pb::StoredState as prost::Message>::decode(bytes.as_slice()).unwrap();
    let mut r = Control::restore(limits(), stored, back.now());
    assert!(r.epoch() > issued);
    let restored = r.epoch();
    let _ = r.stop(back.now());
    assert!(r.epoch() > restored);
    // And with a clock far ahead, epochs follow it, still upward.
    let mut ahead = Clock::new();
    ahead.unix0 = clock.unix0 + 3_600_000;
    let stored = <pb::StoredState as prost::Message>::decode(bytes.as_slice()).unwrap();
    assert!(Control::restore(limits(), stored, ahead.now()).epoch() > issued);
}

#[test]
fn a_state_file_from_before_the_run_state_enum_still_resumes_its_run() {
    let clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    start(&mut c, 100, clock.now());
    let bytes = c.take_write(clock.now()).unwrap().encode();
    let mut stored = <pb::StoredState as prost::Message>::decode(bytes.as_slice()).unwrap();
    for (legacy, expect) in [
        ("running", pb::RunState::Running),
        ("stopped", pb::RunState::Stopped),
        ("finished", pb::RunState::Finished),
    ] {
        let run = stored.run.as_mut().unwrap();
        run.run_state = 0;
        run.legacy_state = legacy.into();
        let r = Control::restore(limits(), stored.clone(), clock.now());
        assert_eq!(r.status(clock.now()).state(), expect, "{legacy}");
    }
}

#[test]
fn a_restore_keeps_the_run_and_its_counts() {
    let clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    start(&mut c, 100, clock.now());
    let run_id = c.run().unwrap().id.clone();
    let hb = pb::Heartbeat {
        epoch: c.epoch(),
        lapsed: false,
        instances: vec![pb::InstanceStatus {
            run_id: run_id.clone(),
            index: 0,
            incarnation: 1,
            phase: pb::Phase::Running as i32,
            counters: Some(pb::Counters {
                sent: 10,
                accepted: 9,
                failed: 1,
                ..Default::default()
            }),
            ..Default::default()
        }],
        usage: None,
    };
    let _ = c.heartbeat("a", hb, clock.now());
    let write = c.take_write(clock.now()).unwrap();
    let bytes = write.encode();
    let stored = <pb::StoredState as prost::Message>::decode(bytes.as_slice()).unwrap();
    // The incarnations appended by hand read back as the message prost would have built.
    let mut built = write.head.clone();
    built.incarnations = write
        .incarnations
        .iter()
        .map(|(agent, s)| pb::StoredIncarnation {
            agent: agent.clone(),
            status: Some(pb::InstanceStatus::clone(s)),
        })
        .collect();
    assert_eq!(built.incarnations.len(), 1);
    assert_eq!(stored, built);
    assert_eq!(bytes, prost::Message::encode_to_vec(&built));
    let r = Control::restore(limits(), stored, clock.now());
    let s = r.status(clock.now());
    assert_eq!(s.run_id, run_id);
    assert_eq!(s.state(), pb::RunState::Running);
    assert_eq!(s.totals.unwrap().accepted, 9);
    assert_eq!(s.agents[0].instances_planned, 2);
}

#[test]
fn writes_come_at_once_for_intent_and_at_most_every_two_seconds_for_metrics() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    assert!(c.take_write(clock.now()).is_some());
    assert!(c.take_write(clock.now()).is_none());
    start(&mut c, 50, clock.now());
    assert!(c.take_write(clock.now()).is_some());
    let run_id = c.run().unwrap().id.clone();
    let report = |sent| pb::Heartbeat {
        instances: vec![pb::InstanceStatus {
            run_id: run_id.clone(),
            counters: Some(pb::Counters {
                sent,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let _ = c.heartbeat("a", report(1), clock.advance(Duration::from_millis(500)));
    assert!(c.take_write(clock.now()).is_none());
    let _ = c.heartbeat("a", report(2), clock.advance(Duration::from_millis(1600)));
    assert!(c.take_write(clock.now()).is_some());
}

#[test]
fn a_late_joiner_takes_the_shortfall() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 100, clock.now());
    connect(&mut c, "b", 100, clock.now());
    start(&mut c, 200, clock.now());
    let _ = c.tick(clock.now());
    // a is lost and b has no room: its vehicles wait, shown as unassigned.
    let _ = c.session_closed("a", 1);
    for _ in 0..10 {
        let now = clock.advance(Duration::from_secs(1));
        beat(&mut c, "b", now);
        let _ = c.tick(now);
    }
    assert_eq!(c.status(clock.now()).unassigned_vehicles, 100);
    let now = clock.advance(Duration::from_secs(1));
    beat(&mut c, "b", now);
    connect(&mut c, "late", 0, now);
    let sends = held(&c.tick(now));
    assert_eq!(sends["late"].len(), 2);
    assert_eq!(sends["b"].len(), 2);
    assert_eq!(c.status(now).unassigned_vehicles, 0);
}

#[test]
fn rebalance_moves_whole_instances_after_the_handoff_gap() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 100, clock.now());
    connect(&mut c, "b", 100, clock.now());
    start(&mut c, 200, clock.now());
    let ranges: BTreeMap<u32, (u64, u64)> = c
        .tick(clock.now())
        .iter()
        .flat_map(|s| s.assignment.instances.clone())
        .map(|i| (i.index, (i.first_vehicle, i.vehicles)))
        .collect();
    let now = clock.advance(Duration::from_secs(1));
    for a in ["a", "b"] {
        beat(&mut c, a, now);
    }
    connect(&mut c, "new", 0, now);
    let ((moved, vehicles), cmd) = c.rebalance(now).unwrap();
    assert!(cmd.reconcile);
    assert_eq!((moved, vehicles), (2, 100));
    // Taken from the old agents at once; nobody drives them until a handoff after the old
    // agents said they let go (at their next heartbeat, 100 ms on here).
    let mut t = Duration::ZERO;
    while t < HANDOFF + Duration::from_millis(100) {
        let sends = held(&c.tick(clock.now()));
        assert!(sends["new"].is_empty(), "given after only {t:?}");
        assert_eq!(sends["a"].len() + sends["b"].len(), 2);
        assert_eq!(c.status(clock.now()).unassigned_vehicles, 100);
        t += Duration::from_millis(100);
        let now = clock.advance(Duration::from_millis(100));
        for a in ["a", "b", "new"] {
            beat(&mut c, a, now);
        }
    }
    let sends = c.tick(clock.now());
    let new = sends.iter().find(|s| s.agent == "new").unwrap();
    assert_eq!(new.assignment.instances.len(), 2);
    for i in &new.assignment.instances {
        assert_eq!(
            ranges[&i.index],
            (i.first_vehicle, i.vehicles),
            "moved whole"
        );
    }
    assert!(c.rebalance(clock.now()).unwrap().0 .0 == 0);
}

#[test]
fn joins_beyond_the_rate_or_the_limit_or_on_a_live_name_are_refused() {
    let mut clock = Clock::new();
    let mut l = limits();
    l.max_join_rate = 2;
    l.max_agents = 3;
    let mut c = Control::new(l, clock.now());
    let j = |name: &str| Joining {
        name: name.into(),
        hardware: hardware(),
        max_vehicles: 0,
        address: "x".into(),
    };
    c.join(j("a"), clock.now()).unwrap();
    c.join(j("b"), clock.now()).unwrap();
    assert_eq!(c.join(j("c"), clock.now()), Err(JoinRefused::Rate(2)));
    let now = clock.advance(Duration::from_secs(1));
    c.join(j("c"), now).unwrap();
    assert_eq!(c.join(j("d"), now), Err(JoinRefused::Full(3)));
    let now = clock.advance(Duration::from_secs(1));
    let _ = c.open_session("a", 0, now).unwrap();
    assert_eq!(
        c.open_session("a", 0, now).unwrap_err(),
        SessionRefused::AlreadyOpen
    );
    assert_eq!(
        c.join(j("a"), now),
        Err(JoinRefused::Taken {
            address: "x".into()
        })
    );
    // A silent session's name is free again after the lease.
    let now = clock.advance(LEASE + Duration::from_millis(1));
    c.join(j("a"), now).unwrap();
}

#[test]
fn a_run_with_a_duration_finishes_when_every_instance_exited() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    let req = pb::StartRequest {
        params: Some(pb::PlanParams {
            vehicles: 50,
            per_instance: 50,
            ..Default::default()
        }),
        spec: Some(pb::RunSpec {
            duration_s: 10.0,
            ..Default::default()
        }),
        expect_agents: 1,
    };
    let _ = c.start(req, clock.now()).unwrap();
    let run_id = c.run().unwrap().id.clone();
    let now = clock.advance(Duration::from_secs(12));
    let _ = c.tick(now);
    assert!(c.running(), "waits for the instance to say it exited");
    let hb = pb::Heartbeat {
        instances: vec![pb::InstanceStatus {
            run_id,
            phase: pb::Phase::Exited as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    let _ = c.heartbeat("a", hb, now);
    let _ = c.tick(now);
    assert_eq!(c.status(now).state(), pb::RunState::Finished);
}

fn statuses(c: &Control, list: &[(u32, u64, pb::Phase, pb::End)]) -> Vec<pb::InstanceStatus> {
    let run_id = c.run().unwrap().id.clone();
    list.iter()
        .map(|&(index, incarnation, phase, end)| pb::InstanceStatus {
            run_id: run_id.clone(),
            index,
            incarnation,
            phase: phase as i32,
            end: end as i32,
            vehicles: 50,
            ..Default::default()
        })
        .collect()
}

#[test]
fn an_agent_that_stopped_on_its_own_lease_expiry_gets_a_newer_epoch_at_once() {
    let clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    start(&mut c, 100, clock.now());
    let _ = c.tick(clock.now());
    let held = c.epoch();
    // Its heartbeats never stopped (the coordinator saw no silence), but it lapsed.
    let hb = pb::Heartbeat {
        epoch: held,
        lapsed: true,
        ..Default::default()
    };
    assert_eq!(c.heartbeat("a", hb.clone(), clock.now()), RECONCILE);
    assert!(c.epoch() > held, "a newer epoch, or it waits for ever");
    let sends = c.tick(clock.now());
    assert!(sends.iter().all(|s| s.assignment.epoch > held));
    assert_eq!(sends[0].assignment.instances.len(), 2, "with its instances");
    // A lapsed heartbeat sent before it heard the newer epoch asks for nothing more.
    let newer = c.epoch();
    assert_eq!(c.heartbeat("a", hb, clock.now()), NOTHING);
    assert_eq!(c.epoch(), newer);
}

#[test]
fn undriven_vehicles_are_shown_with_their_cause_and_fail_the_run_after_the_limit() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    let req = pb::StartRequest {
        params: Some(pb::PlanParams {
            vehicles: 100,
            per_instance: 50,
            ..Default::default()
        }),
        spec: Some(pb::RunSpec {
            max_not_driven_s: 30.0,
            ..Default::default()
        }),
        expect_agents: 1,
    };
    let _ = c.start(req, clock.now()).unwrap();
    let now = clock.advance(Duration::from_secs(1));
    let running = statuses(
        &c,
        &[
            (0, 1, pb::Phase::Running, pb::End::None),
            (1, 2, pb::Phase::Running, pb::End::None),
        ],
    );
    let _ = c.heartbeat(
        "a",
        pb::Heartbeat {
            epoch: c.epoch(),
            instances: running,
            ..Default::default()
        },
        now,
    );
    let s = c.status(now);
    assert_eq!(
        (s.vehicles_not_driven, s.state()),
        (0, pb::RunState::Running)
    );
    // Both stopped on a lease expiry of the agent, which waits for a newer epoch that
    // (in this test) never comes.
    let now = clock.advance(Duration::from_secs(1));
    let stopped = statuses(
        &c,
        &[
            (0, 1, pb::Phase::Exited, pb::End::Lease),
            (1, 2, pb::Phase::Exited, pb::End::Lease),
        ],
    );
    let hb = pb::Heartbeat {
        epoch: 0,
        instances: stopped,
        ..Default::default()
    };
    let _ = c.heartbeat("a", hb.clone(), now);
    let now = clock.advance(Duration::from_secs(20));
    let _ = c.heartbeat("a", hb.clone(), now);
    let _ = c.tick(now);
    let s = c.status(now);
    assert_eq!(s.vehicles_not_driven, 100);
    assert!(
        (s.not_driven_s - 21.0).abs() < 0.01,
        "since last seen running: {}",
        s.not_driven_s
    );
    assert_eq!(s.agents[0].vehicles_not_driven, 100);
    assert!(
        s.agents[0].not_driven_cause.contains("lease expiry"),
        "{:?}",
        s.agents[0]
    );
    assert_eq!(s.state(), pb::RunState::Running, "not yet past 30 s");
    let now = clock.advance(Duration::from_secs(11));
    let _ = c.heartbeat("a", hb, now);
    let _ = c.tick(now);
    let s = c.status(now);
    assert_eq!(s.state(), pb::RunState::Failed);
    assert!(
        s.failure.starts_with(
            "100 vehicles of agent a were not driven for 32 s (stopped on a lease expiry"
        ),
        "{}",
        s.failure
    );
    assert!(
        c.tick(now)
            .iter()
            .all(|x| x.assignment.instances.is_empty()),
        "a failed run drives nothing"
    );
}

#[test]
fn a_lost_agent_and_an_unreported_instance_are_undriven_too() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    start(&mut c, 100, clock.now());
    let now = clock.advance(Duration::from_secs(2));
    let one = statuses(&c, &[(0, 1, pb::Phase::Running, pb::End::None)]);
    let _ = c.heartbeat(
        "a",
        pb::Heartbeat {
            epoch: c.epoch(),
            instances: one,
            ..Default::default()
        },
        now,
    );
    let u = c.undriven(now);
    assert_eq!(u.len(), 1);
    assert_eq!((u[0].index, u[0].cause.as_str()), (1, "not reported yet"));
    let now = clock.advance(LEASE + Duration::from_secs(1));
    let causes: Vec<String> = c.undriven(now).into_iter().map(|u| u.cause).collect();
    assert_eq!(causes, ["agent a is lost", "agent a is lost"]);
}

#[test]
fn supervision_counts_every_process_started_and_why_each_ended() {
    let clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 300, clock.now());
    start(&mut c, 150, clock.now());
    let list = statuses(
        &c,
        &[
            (0, 1, pb::Phase::Exited, pb::End::Lease),
            (0, 5, pb::Phase::Running, pb::End::None),
            (1, 2, pb::Phase::Exited, pb::End::Crashed),
            (1, 3, pb::Phase::Exited, pb::End::Shed),
            (2, 0, pb::Phase::Starting, pb::End::None),
        ],
    );
    let hb = pb::Heartbeat {
        epoch: c.epoch(),
        instances: list,
        usage: Some(pb::HostUsage {
            lease_expiries: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let _ = c.heartbeat("a", hb, clock.now());
    let s = c.status(clock.now());
    let want = pb::Supervision {
        processes_started: 4,
        restarts: 2,
        crashes: 1,
        lease_stops: 1,
        lease_expiries: 1,
        shed: 1,
    };
    assert_eq!(s.agents[0].supervision, Some(want));
    assert_eq!(s.supervision, Some(want), "the fleet's is the sum");
}

#[test]
fn a_coordinator_late_by_its_own_stall_does_not_hold_it_against_its_agents() {
    let mut clock = Clock::new();
    let mut c = Control::new(limits(), clock.now());
    connect(&mut c, "a", 100, clock.now());
    connect(&mut c, "b", 300, clock.now());
    start(&mut c, 200, clock.now());
    let before = held(&c.tick(clock.now()));
    // The coordinator itself got no CPU for lease + grace + 1 s: nobody was heard.
    let stall = LEASE + GRACE + Duration::from_secs(1);
    let now = clock.advance(stall);
    c.stalled(stall, now);
    assert_eq!(held(&c.tick(now)), before, "nothing moved");
    // Silence after the stall counts again.
    let now = clock.advance(LEASE + GRACE + Duration::from_secs(1));
    beat(&mut c, "b", now);
    assert!(held(&c.tick(now))["a"].is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Wait(u64),
    Freeze(usize),
    Thaw(usize),
    Kill(usize),
    Rejoin(usize),
    Rebalance,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (100u64..3000).prop_map(Op::Wait),
        1 => (0usize..4).prop_map(Op::Freeze),
        1 => (0usize..4).prop_map(Op::Thaw),
        1 => (0usize..4).prop_map(Op::Kill),
        1 => (0usize..4).prop_map(Op::Rejoin),
        1 => Just(Op::Rebalance),
    ]
}

proptest! {
    /// Whatever agents do, a vehicle range goes to a new agent only when its old one was
    /// told to let go at least a handoff earlier, or has been silent for lease + grace:
    /// never two drivers at once.
    #[test]
    fn no_range_is_ever_held_by_two_agents(ops in proptest::collection::vec(op(), 1..80)) {
        let names = ["a", "b", "c", "d"];
        let mut clock = Clock::new();
        let mut c = Control::new(limits(), clock.now());
        let mut sessions: [Option<u64>; 4] = [None; 4];
        let mut frozen = [false; 4];
        for (i, n) in names.iter().enumerate().take(3) {
            sessions[i] = Some(connect(&mut c, n, 200, clock.now()));
        }
        start(&mut c, 300, clock.now());
        // Per instance: who was last given it, and per (agent, instance) when it was last
        // told to let go of it.
        let mut holder: BTreeMap<u32, usize> = BTreeMap::new();
        let mut released: BTreeMap<(usize, u32), Duration> = BTreeMap::new();
        let mut heard: [Duration; 4] = [Duration::ZERO; 4];
        // Each agent process (a rejoin at epoch 0 is a new one), and per instance the
        // process that was given it and when that process was last heard: a range is lost
        // with the process that held it, whatever a new process of the same agent does.
        let mut process = [0u32; 4];
        let mut held_by: BTreeMap<u32, (usize, u32, Duration)> = BTreeMap::new();
        // The epoch each agent last applied (and so reports).
        let mut applied = [0u64; 4];
        for op in ops {
            match op {
                Op::Wait(ms) => { clock.advance(Duration::from_millis(ms)); }
                Op::Freeze(i) => frozen[i] = true,
                Op::Thaw(i) => frozen[i] = false,
                Op::Kill(i) => {
                    if let Some(s) = sessions[i].take() {
                        let _ = c.session_closed(names[i], s);
                    }
                }
                Op::Rejoin(i) => {
                    if sessions[i].is_none() {
                        let now = clock.now();
                        let j = Joining { name: names[i].into(), hardware: hardware(), max_vehicles: 200, address: String::new() };
                        if c.join(j, now).is_ok() {
                            sessions[i] = c.open_session(names[i], 0, now).ok().map(|x| x.0);
                            heard[i] = clock.at;
                            process[i] += 1;
                        }
                    }
                }
                Op::Rebalance => { let _ = c.rebalance(clock.now()); }
            }
            let now = clock.now();
            for i in 0..4 {
                if sessions[i].is_some() && !frozen[i] {
                    let hb = pb::Heartbeat { epoch: applied[i], ..Default::default() };
                    let _ = c.heartbeat(names[i], hb, now);
                    // An agent silent for longer than its lease has stopped its simulators:
                    // back, it holds nothing it held before until it is given it again.
                    let kept = clock.at <= heard[i] + LEASE;
                    heard[i] = clock.at;
                    for (inst, (agent, p, at)) in held_by.iter_mut() {
                        // What it was told to let go of, it no longer holds either.
                        let holds = !released.contains_key(&(i, *inst));
                        if kept && holds && *agent == i && *p == process[i] {
                            *at = clock.at;
                        }
                    }
                }
            }
            let sends = c.tick(now);
            let mut seen = BTreeSet::new();
            for s in &sends {
                let i = names.iter().position(|n| *n == s.agent).unwrap();
                let mine: BTreeSet<u32> = s.assignment.instances.iter().map(|x| x.index).collect();
                for inst in &mine {
                    prop_assert!(seen.insert(*inst), "instance {} sent to two agents in one tick", inst);
                    if let Some(&old) = holder.get(inst) {
                        if old != i {
                            let let_go = released.get(&(old, *inst)).is_some_and(|t| *t + HANDOFF <= clock.at);
                            let lost = held_by.get(inst).is_some_and(|(_, _, at)| *at + LEASE + GRACE < clock.at);
                            prop_assert!(let_go || lost, "instance {} moved from {} to {} too soon", inst, names[old], names[i]);
                        }
                    }
                    holder.insert(*inst, i);
                    let fresh = held_by.get(inst).is_none_or(|(a, p, at)| {
                        *a != i || *p != process[i] || clock.at > *at + LEASE
                    });
                    if fresh {
                        held_by.insert(*inst, (i, process[i], heard[i]));
                    }
                }
                // Frozen agents receive nothing: what is queued for them counts once they read it,
                // and by then it is older than the epoch that lets them resume.
                if !frozen[i] {
                    applied[i] = s.assignment.epoch;
                    for (inst, h) in &holder {
                        if *h == i && !mine.contains(inst) {
                            released.entry((i, *inst)).or_insert(clock.at);
                        }
                    }
                }
                for inst in &mine {
                    released.remove(&(i, *inst));
                }
            }
        }
    }
}
