//! How one simulator is launched and relaunched: its command line from the run spec (so that
//! the agent and `vtox-sim` agree on every flag) and the crash backoff.

use crate::sim_args::SimArgs;
use crate::wire::pb;
use clap::Parser;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Restart backoff: 1 s doubling to 30 s; a crash after five restarts within a minute marks
/// the instance failed.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Five restarts within this window and a sixth crash mark an instance failed.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
pub const RESTART_LIMIT: usize = 5;
/// Crashes older than this no longer lengthen the backoff: an instance that ran quietly for
/// ten minutes is restarted after 1 s again, as Kubernetes resets its crash backoff.
const BACKOFF_MEMORY: Duration = Duration::from_secs(600);

/// The simulator's command line for one instance of a run, at Unix time `now`; None when the
/// run's duration is already over (a restart late in a run has nothing left to drive).
pub fn sim_args(
    spec: &pb::RunSpec,
    inst: &pb::InstanceSpec,
    agent: &str,
    now: f64,
    lease: Duration,
) -> Option<SimArgs> {
    let duration = if spec.duration_s > 0.0 {
        // A restarted instance ends with the run, not a full duration after its restart.
        let remaining = spec.run_start + spec.duration_s - now.max(spec.run_start);
        if remaining <= 0.05 {
            return None;
        }
        Some(Duration::from_secs_f64((remaining * 1e3).round() / 1e3))
    } else {
        None
    };
    let secs = |s: f64| Duration::from_secs_f64(s.clamp(0.0, 1e9));
    let defaults =
        SimArgs::try_parse_from(["vtox-sim", "--vehicles", "1", "--target", "-"]).ok()?;
    let access = spec.access.clone().unwrap_or_default();
    let file = |p: &str| (!p.is_empty()).then(|| std::path::PathBuf::from(p));
    let text = |t: &str| (!t.is_empty()).then(|| t.to_string());
    Some(SimArgs {
        target_ca: file(&access.target_ca_file),
        target_insecure: access.target_insecure,
        auth_token_file: file(&access.auth_token_file),
        vehicle_tokens: file(&access.vehicle_tokens_file),
        login: text(&access.login_url),
        login_user: text(&access.login_user),
        login_password_file: file(&access.login_password_file),
        idle_timeout: if access.idle_timeout_s > 0.0 {
            secs(access.idle_timeout_s)
        } else {
            defaults.idle_timeout
        },
        vehicles: inst.vehicles,
        first_vehicle: inst.first_vehicle,
        target: spec.target.clone(),
        instance: inst.index,
        agent: Some(agent.to_string()),
        interval: secs(spec.interval_s),
        jitter: spec.jitter,
        batch_size: spec.batch_size as usize,
        sampling_rate: spec.sampling_rate,
        faults: spec.faults.clone(),
        fault_onset: spec.fault_onset_s.map_or(defaults.fault_onset, secs),
        seed: spec.seed,
        duration,
        timeout: secs(spec.timeout_s),
        max_in_flight: spec.max_in_flight as usize,
        id_template: if spec.id_template.is_empty() {
            defaults.id_template.clone()
        } else {
            spec.id_template.clone()
        },
        run_start: Some(spec.run_start),
        delivery: crate::delivery::Delivery::parse(&spec.delivery).unwrap_or(defaults.delivery),
        buffer: if spec.buffer > 0 {
            spec.buffer as usize
        } else {
            defaults.buffer
        },
        dropouts: text(&spec.dropouts),
        // Half the agent's lease: an orphaned simulator stops well before the coordinator may
        // hand its vehicles to another host (after the agent's lease plus a grace period).
        lease: Some(lease / 2),
        // Each process is planned at no more than one core's worth, and one thread sends the
        // most messages per core (no work stealing, no wake-ups across threads).
        threads: Some(1),
        ..defaults
    })
}

/// When to restart after the crashes so far (the latest at `now`), or None when the instance
/// crash-loops. Forgets crashes older than `BACKOFF_MEMORY`.
pub fn restart_after(crashes: &mut VecDeque<Instant>, now: Instant) -> Option<Duration> {
    while crashes
        .front()
        .is_some_and(|t| now.duration_since(*t) > BACKOFF_MEMORY)
    {
        crashes.pop_front();
    }
    let recent = crashes
        .iter()
        .filter(|t| now.duration_since(**t) <= CRASH_WINDOW)
        .count();
    if recent > RESTART_LIMIT {
        return None;
    }
    let doublings = crashes.len().saturating_sub(1).min(5) as u32;
    Some(
        BACKOFF_FIRST
            .saturating_mul(1 << doublings)
            .min(BACKOFF_MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulator_gets_the_run_spec_and_the_rest_of_the_run() {
        let spec = pb::RunSpec {
            target: "https://vtox:8443/x".into(),
            interval_s: 1.2,
            jitter: 0.1,
            batch_size: 10,
            sampling_rate: 50,
            faults: "bearing=3".into(),
            seed: 9,
            run_start: 1000.0,
            timeout_s: 5.0,
            max_in_flight: 64,
            duration_s: 60.0,
            fault_onset_s: Some(0.0),
            access: Some(pb::TargetAccess {
                target_ca_file: "/etc/vtox/backend-ca.pem".into(),
                login_url: "https://vtox:8443".into(),
                login_user: "fleet".into(),
                login_password_file: "/etc/vtox/password".into(),
                ..Default::default()
            }),
            delivery: "at-most-once".into(),
            buffer: 20,
            dropouts: "5%/90s".into(),
            ..Default::default()
        };
        let inst = pb::InstanceSpec {
            index: 2,
            first_vehicle: 100,
            vehicles: 50,
        };
        let a = sim_args(&spec, &inst, "host-a", 1030.0, Duration::from_secs(5)).unwrap();
        assert_eq!((a.vehicles, a.first_vehicle, a.instance), (50, 100, 2));
        assert_eq!(
            a.duration,
            Some(Duration::from_secs(30)),
            "the rest of the run"
        );
        assert_eq!(a.fault_onset, Duration::ZERO);
        assert_eq!(a.lease, Some(Duration::from_millis(2500)));
        assert_eq!(a.threads, Some(1));
        assert_eq!(a.run_start, Some(1000.0));
        assert_eq!(a.target_ca, Some("/etc/vtox/backend-ca.pem".into()));
        assert_eq!(a.login_user.as_deref(), Some("fleet"));
        assert_eq!(a.auth_token_file, None);
        assert_eq!(a.delivery, crate::delivery::Delivery::AtMostOnce);
        assert_eq!((a.buffer, a.dropouts.as_deref()), (20, Some("5%/90s")));
        // What the agent passes is what the simulator parses.
        let back =
            SimArgs::try_parse_from(std::iter::once("vtox-sim".to_string()).chain(a.to_args()))
                .unwrap();
        assert_eq!(back, a);
        assert!(sim_args(&spec, &inst, "host-a", 1060.0, Duration::from_secs(5)).is_none());
        // Without a duration or an onset the simulator's own defaults hold.
        let open = pb::RunSpec {
            duration_s: 0.0,
            fault_onset_s: None,
            ..spec
        };
        let a = sim_args(&open, &inst, "host-a", 1030.0, Duration::from_secs(5)).unwrap();
        assert_eq!(a.duration, None);
        assert_eq!(a.fault_onset, Duration::from_secs(300));
        // Nor with an older coordinator that sends no delivery settings.
        let old = pb::RunSpec {
            delivery: String::new(),
            buffer: 0,
            dropouts: String::new(),
            ..open
        };
        let a = sim_args(&old, &inst, "host-a", 1030.0, Duration::from_secs(5)).unwrap();
        assert_eq!(a.delivery, crate::delivery::Delivery::StoreAndForward);
        assert_eq!((a.buffer, a.dropouts), (600, None));
    }

    #[test]
    fn backoff_doubles_to_30_s_gives_up_on_a_crash_loop_and_forgets() {
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let mut crashes = VecDeque::new();
        // Crashing at once after each restart: 1, 2, 4, 8, 16 s, then the sixth crash within
        // a minute (at 31 s) is a crash loop.
        let mut at = 0;
        let mut waits = Vec::new();
        loop {
            crashes.push_back(secs(at));
            match restart_after(&mut crashes, secs(at)) {
                Some(d) => {
                    waits.push(d.as_secs());
                    at += d.as_secs();
                }
                None => break,
            }
        }
        assert_eq!(waits, [1, 2, 4, 8, 16]);
        assert_eq!(at, 31);

        // Crashing every 40 s never makes five restarts a minute: the wait grows to 30 s.
        let mut crashes = VecDeque::new();
        let waits: Vec<u64> = (0..8)
            .map(|i| {
                crashes.push_back(secs(i * 40));
                restart_after(&mut crashes, secs(i * 40)).map_or(0, |d| d.as_secs())
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);

        // Ten quiet minutes later the backoff starts over.
        crashes.push_back(secs(7 * 40 + 601));
        assert_eq!(
            restart_after(&mut crashes, secs(7 * 40 + 601)),
            Some(Duration::from_secs(1))
        );
    }
}
