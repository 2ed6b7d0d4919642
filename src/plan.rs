//! Spreading N vehicles over agents: each agent's share in proportion to its capacity, never
//! above it, cut into simulator processes sized by the host (about one per core) or by the
//! user's `--per-instance` bound, with ranges contiguous in agent order so that every vehicle
//! number has exactly one owner.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanAgent {
    pub name: String,
    /// What the agent can carry (its estimate, already capped by the operator).
    pub max_vehicles: u64,
    /// Most vehicles one process of this host drives (one core's worth); 0 = no limit.
    pub per_process: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRange {
    pub index: u32,
    pub first_vehicle: u64,
    pub vehicles: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAssignment {
    pub name: String,
    pub max_vehicles: u64,
    pub vehicles: u64,
    pub instances: Vec<InstanceRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub vehicles: u64,
    pub agents: Vec<AgentAssignment>,
}

impl Plan {
    /// Moves every range up by `first`, so that the plan covers [first, first + N): one slice
    /// of a fleet split over several coordinators. None when the numbers would overflow.
    pub fn starting_at(mut self, first: u64) -> Option<Plan> {
        first.checked_add(self.vehicles)?;
        for a in &mut self.agents {
            for i in &mut a.instances {
                i.first_vehicle += first;
            }
        }
        Some(self)
    }
}

/// More processes than any fleet needs (10,000 hosts of 100 cores): a bound of 1 vehicle per
/// process for a large fleet is a typo, and would allocate without end.
pub const MAX_INSTANCES: u64 = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("the number of vehicles must be at least 1")]
    NoVehicles,
    #[error("--per-instance must be at least 1")]
    NoInstanceSize,
    #[error("no agents to plan over; start vtox-agent --join COORD:PORT on each host")]
    NoAgents,
    #[error("{needed} vehicles need {short} more than the {available} the {agents} agents can carry; add hosts or pass --overcommit")]
    Shortfall {
        needed: u64,
        available: u64,
        short: u64,
        agents: usize,
    },
    #[error("a plan of {0} instances is more than vtox runs (at most {MAX_INSTANCES}); raise --per-instance or leave it out")]
    TooManyInstances(u64),
}

/// Plans `n` vehicles over `agents` (in their order), in processes of at most `per_instance`
/// vehicles where given. With `overcommit`, capacities only set the proportions and may be
/// exceeded.
pub fn plan(
    n: u64,
    agents: &[PlanAgent],
    per_instance: Option<u32>,
    overcommit: bool,
) -> Result<Plan, PlanError> {
    if n == 0 {
        return Err(PlanError::NoVehicles);
    }
    if per_instance == Some(0) {
        return Err(PlanError::NoInstanceSize);
    }
    if agents.is_empty() {
        return Err(PlanError::NoAgents);
    }
    let total: u128 = agents.iter().map(|a| u128::from(a.max_vehicles)).sum();
    if total < u128::from(n) && !overcommit {
        let available = total.min(u128::from(u64::MAX)) as u64;
        return Err(PlanError::Shortfall {
            needed: n,
            available,
            short: n - available,
            agents: agents.len(),
        });
    }
    let shares = shares(n, agents, total);
    let bound = per_instance.map(u64::from);
    let count: u64 = agents
        .iter()
        .zip(&shares)
        .map(|(a, &share)| Cut::new(share, bound, a.per_process).count())
        .fold(0, u64::saturating_add);
    if count > MAX_INSTANCES {
        return Err(PlanError::TooManyInstances(count));
    }
    // Ranges run contiguously in agent order.
    let mut next_vehicle = 0u64;
    let mut next_index = 0u32;
    let out = agents
        .iter()
        .zip(shares)
        .map(|(a, share)| {
            let instances: Vec<InstanceRange> = Cut::new(share, bound, a.per_process)
                .sizes()
                .map(|v| {
                    let r = InstanceRange {
                        index: next_index,
                        first_vehicle: next_vehicle,
                        vehicles: v,
                    };
                    next_index += 1;
                    next_vehicle += v;
                    r
                })
                .collect();
            AgentAssignment {
                name: a.name.clone(),
                max_vehicles: a.max_vehicles,
                vehicles: share,
                instances,
            }
        })
        .collect();
    Ok(Plan {
        vehicles: n,
        agents: out,
    })
}

/// Each agent's vehicles: `n` in proportion to the capacities (evenly where none has any),
/// rounded by largest remainder in exact integers. Where the capacities hold `n`, no share
/// exceeds its agent's capacity: `n * max / total <= max`, and a share rounded up had a
/// remainder, so it was below its (whole) capacity.
fn shares(n: u64, agents: &[PlanAgent], total: u128) -> Vec<u64> {
    let weights: Vec<u128> = if total == 0 {
        vec![1; agents.len()]
    } else {
        agents.iter().map(|a| u128::from(a.max_vehicles)).collect()
    };
    let sum: u128 = weights.iter().sum();
    let n128 = u128::from(n);
    let mut shares: Vec<u64> = weights.iter().map(|w| (n128 * w / sum) as u64).collect();
    let given: u64 = shares.iter().sum();
    let mut order: Vec<usize> = (0..agents.len()).collect();
    // Largest remainder first; ties go to agent order.
    order.sort_by_key(|&i| (std::cmp::Reverse(n128 * weights[i] % sum), i));
    for &i in order.iter().take((n - given) as usize) {
        shares[i] += 1;
    }
    shares
}

/// How one agent's share is cut into processes. A bound at or below what one process of the
/// host drives gives processes of exactly the bound and one remainder (the old tool's
/// 50/50/50/50/34); otherwise the share is spread evenly over as few processes as the host's
/// size allows, so that no process carries much more than another.
struct Cut {
    share: u64,
    size: u64,
    even: bool,
}

impl Cut {
    fn new(share: u64, bound: Option<u64>, per_process: u64) -> Cut {
        let host = if per_process == 0 {
            u64::MAX
        } else {
            per_process
        };
        match bound {
            Some(b) if b <= host => Cut {
                share,
                size: b,
                even: false,
            },
            _ => Cut {
                share,
                size: host.min(bound.unwrap_or(u64::MAX)),
                even: true,
            },
        }
    }

    fn count(&self) -> u64 {
        self.share.div_ceil(self.size)
    }

    fn sizes(&self) -> impl Iterator<Item = u64> + '_ {
        let k = self.count();
        (0..k).map(move |i| {
            if self.even {
                // The first share % k processes take one vehicle more.
                self.share / k + u64::from(i < self.share % k)
            } else {
                self.size.min(self.share - i * self.size)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_can_start_at_any_vehicle() {
        let agents = [PlanAgent {
            name: "a".into(),
            max_vehicles: 1000,
            per_process: 0,
        }];
        let p = plan(234, &agents, Some(50), false)
            .unwrap()
            .starting_at(1000)
            .unwrap();
        let firsts: Vec<u64> = p.agents[0]
            .instances
            .iter()
            .map(|i| i.first_vehicle)
            .collect();
        assert_eq!(firsts, [1000, 1050, 1100, 1150, 1200]);
        assert_eq!(p.vehicles, 234);
        let p = plan(10, &agents, Some(50), false).unwrap();
        assert!(p.starting_at(u64::MAX - 5).is_none());
    }
    use proptest::prelude::*;

    fn agents(maxes: &[u64]) -> Vec<PlanAgent> {
        maxes
            .iter()
            .enumerate()
            .map(|(i, m)| PlanAgent {
                name: format!("a{i}"),
                max_vehicles: *m,
                per_process: 0,
            })
            .collect()
    }

    fn check_cover(p: &Plan, n: u64, per_instance: u64) {
        let mut next = 0;
        let mut index = 0;
        for a in &p.agents {
            for i in &a.instances {
                assert_eq!(i.first_vehicle, next, "contiguous in agent order");
                assert_eq!(i.index, index);
                assert!(i.vehicles >= 1 && i.vehicles <= per_instance);
                next += i.vehicles;
                index += 1;
            }
            assert_eq!(
                a.vehicles,
                a.instances.iter().map(|i| i.vehicles).sum::<u64>()
            );
        }
        assert_eq!(next, n, "covers [0, n) exactly");
    }

    #[test]
    fn the_reference_split() {
        let p = plan(234, &agents(&[100_000]), Some(50), false).unwrap();
        let got: Vec<(u32, u64, u64)> = p.agents[0]
            .instances
            .iter()
            .map(|i| (i.index, i.first_vehicle, i.vehicles))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0, 50),
                (1, 50, 50),
                (2, 100, 50),
                (3, 150, 50),
                (4, 200, 34)
            ]
        );
    }

    #[test]
    fn proportional_and_capped() {
        let p = plan(1000, &agents(&[3000, 1000]), Some(50), false).unwrap();
        assert_eq!((p.agents[0].vehicles, p.agents[1].vehicles), (750, 250));
        let p = plan(234, &agents(&[80, 10_000]), Some(50), false).unwrap();
        assert!(p.agents[0].vehicles <= 80);
        check_cover(&p, 234, 50);
        // Instances that fit nowhere whole are split.
        let p = plan(60, &agents(&[30, 30]), Some(50), false).unwrap();
        assert_eq!((p.agents[0].vehicles, p.agents[1].vehicles), (30, 30));
        check_cover(&p, 60, 50);
    }

    #[test]
    fn shortfall_and_bad_input() {
        let e = plan(1000, &agents(&[300, 300]), Some(50), false).unwrap_err();
        assert_eq!(
            e,
            PlanError::Shortfall {
                needed: 1000,
                available: 600,
                short: 400,
                agents: 2
            }
        );
        assert!(e.to_string().contains("400 more than the 600"));
        assert_eq!(
            plan(0, &agents(&[1]), Some(50), false),
            Err(PlanError::NoVehicles)
        );
        assert_eq!(plan(1, &[], Some(50), false), Err(PlanError::NoAgents));
        assert_eq!(
            plan(1, &agents(&[1]), Some(0), false),
            Err(PlanError::NoInstanceSize)
        );
        let p = plan(1000, &agents(&[0, 0]), Some(50), true).unwrap();
        assert_eq!((p.agents[0].vehicles, p.agents[1].vehicles), (500, 500));
    }

    #[test]
    fn a_million_over_a_thousand_agents() {
        let maxes: Vec<u64> = (0..1000).map(|i| 1000 + (i % 7) * 300).collect();
        let p = plan(1_000_000, &agents(&maxes), Some(50), false).unwrap();
        check_cover(&p, 1_000_000, 50);
        for (a, m) in p.agents.iter().zip(&maxes) {
            assert!(a.vehicles <= *m);
        }
    }

    fn sized(maxes: &[(u64, u64)]) -> Vec<PlanAgent> {
        maxes
            .iter()
            .enumerate()
            .map(|(i, (m, p))| PlanAgent {
                name: format!("a{i}"),
                max_vehicles: *m,
                per_process: *p,
            })
            .collect()
    }

    fn sizes(p: &Plan) -> Vec<Vec<u64>> {
        p.agents
            .iter()
            .map(|a| a.instances.iter().map(|i| i.vehicles).collect())
            .collect()
    }

    #[test]
    fn processes_are_sized_by_the_host() {
        // A 2-core host whose core drives 26,500 vehicles: one process until one would carry
        // more, then the share evenly over two.
        let host = sized(&[(60_000, 26_500)]);
        assert_eq!(
            sizes(&plan(1000, &host, None, false).unwrap()),
            [vec![1000]]
        );
        assert_eq!(
            sizes(&plan(26_500, &host, None, false).unwrap()),
            [vec![26_500]]
        );
        assert_eq!(
            sizes(&plan(53_001, &host, None, false).unwrap()),
            [vec![17_667, 17_667, 17_667]]
        );
        assert_eq!(
            sizes(&plan(20_000, &host, None, false).unwrap()),
            [vec![20_000]],
            "not 400 processes of 50"
        );
        // --per-instance is an upper bound: below the host's size it gives the old layout,
        // above it changes nothing.
        assert_eq!(
            sizes(&plan(234, &host, Some(50), false).unwrap()),
            [vec![50, 50, 50, 50, 34]]
        );
        assert_eq!(
            sizes(&plan(53_000, &host, Some(1_000_000), false).unwrap()),
            [vec![26_500, 26_500]]
        );
        assert_eq!(
            sizes(&plan(30_000, &host, Some(20_000), false).unwrap()),
            [vec![20_000, 10_000]]
        );
        // Each host by its own size.
        let mixed = sized(&[(40_000, 10_000), (40_000, 40_000)]);
        assert_eq!(
            sizes(&plan(50_000, &mixed, None, false).unwrap()),
            [vec![8334, 8333, 8333], vec![25_000]]
        );
    }

    #[test]
    fn a_bound_that_would_make_millions_of_processes_is_refused() {
        let e = plan(100_000_000, &agents(&[100_000_000]), Some(1), false).unwrap_err();
        assert_eq!(e, PlanError::TooManyInstances(100_000_000));
        assert!(e.to_string().contains("raise --per-instance"), "{e}");
        assert!(plan(1_000_000, &agents(&[1_000_000]), Some(1), false).is_ok());
    }

    proptest! {
        #[test]
        fn ranges_cover_exactly(maxes in proptest::collection::vec(0u64..100_000, 1..20),
                                n in 1u64..200_000, per in 1u32..500) {
            let total: u64 = maxes.iter().sum();
            prop_assume!(total >= n);
            let a = agents(&maxes);
            let p = plan(n, &a, Some(per), false).unwrap();
            check_cover(&p, n, u64::from(per));
            for (x, m) in p.agents.iter().zip(&maxes) {
                prop_assert!(x.vehicles <= *m);
            }
            prop_assert_eq!(&p, &plan(n, &a, Some(per), false).unwrap());
        }

        #[test]
        fn host_sized_processes_cover_exactly_and_stay_within_size(
            hosts in proptest::collection::vec((0u64..100_000, 1u64..40_000), 1..20),
            n in 1u64..200_000, bound in proptest::option::of(1u32..50_000)) {
            let total: u64 = hosts.iter().map(|h| h.0).sum();
            prop_assume!(total >= n);
            let a = sized(&hosts);
            let p = plan(n, &a, bound, false).unwrap();
            check_cover(&p, n, u64::from(bound.unwrap_or(u32::MAX)));
            for (x, (max, per_process)) in p.agents.iter().zip(&hosts) {
                prop_assert!(x.vehicles <= *max);
                let size = (*per_process).min(u64::from(bound.unwrap_or(u32::MAX)));
                prop_assert!(x.instances.iter().all(|i| i.vehicles <= size));
                // As few processes as the size allows.
                prop_assert_eq!(x.instances.len() as u64, x.vehicles.div_ceil(size));
            }
        }

        #[test]
        fn overcommit_covers_anything(maxes in proptest::collection::vec(0u64..1000, 1..10),
                                      n in 1u64..50_000, per in 1u32..200) {
            let p = plan(n, &agents(&maxes), Some(per), true).unwrap();
            check_cover(&p, n, u64::from(per));
        }
    }
}
