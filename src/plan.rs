//! Spreading N vehicles over agents: whole instances of at most `per_instance` vehicles, in
//! proportion to each agent's capacity, never above it, with ranges contiguous in agent order
//! so that every vehicle number has exactly one owner.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanAgent {
    pub name: String,
    /// What the agent can carry (its estimate, already capped by the operator).
    pub max_vehicles: u64,
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
    #[error("a plan of {0} instances is more than vtox runs; raise --per-instance")]
    TooManyInstances(u64),
}

/// A heap entry: the agent furthest below its share comes first; ties go to agent order.
#[derive(PartialEq)]
struct Deficit(f64, usize);

impl Eq for Deficit {}

impl PartialOrd for Deficit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Deficit {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .total_cmp(&other.0)
            .then_with(|| other.1.cmp(&self.1))
    }
}

/// Plans `n` vehicles over `agents` (in their order). With `overcommit`, capacities only set
/// the proportions and may be exceeded.
pub fn plan(
    n: u64,
    agents: &[PlanAgent],
    per_instance: u32,
    overcommit: bool,
) -> Result<Plan, PlanError> {
    if n == 0 {
        return Err(PlanError::NoVehicles);
    }
    if per_instance == 0 {
        return Err(PlanError::NoInstanceSize);
    }
    if agents.is_empty() {
        return Err(PlanError::NoAgents);
    }
    let p = u64::from(per_instance);
    let count = n.div_ceil(p);
    if count > u64::from(u32::MAX / 2) {
        return Err(PlanError::TooManyInstances(count));
    }
    let total: u64 = agents
        .iter()
        .map(|a| a.max_vehicles)
        .fold(0, u64::saturating_add);
    if total < n && !overcommit {
        return Err(PlanError::Shortfall {
            needed: n,
            available: total,
            short: n - total,
            agents: agents.len(),
        });
    }
    // Each agent's share of the fleet, in proportion to its capacity (evenly if none has any).
    let weights: Vec<f64> = if total == 0 {
        vec![1.0; agents.len()]
    } else {
        agents.iter().map(|a| a.max_vehicles as f64).collect()
    };
    let weight_sum: f64 = weights.iter().sum();
    let target: Vec<f64> = weights.iter().map(|w| n as f64 * w / weight_sum).collect();
    let room = |i: usize, assigned: u64| -> u64 {
        if overcommit {
            u64::MAX
        } else {
            agents[i].max_vehicles.saturating_sub(assigned)
        }
    };

    let mut assigned = vec![0u64; agents.len()];
    let mut pieces: Vec<Vec<u64>> = vec![Vec::new(); agents.len()];
    let mut heap: BinaryHeap<Deficit> = (0..agents.len()).map(|i| Deficit(target[i], i)).collect();
    let mut set_aside = Vec::new();
    // No instance is smaller than the last one: an agent without room for it can never take a
    // whole instance again and leaves the heap for good (it may still take a split piece).
    let smallest = n - p * (count - 1);
    for k in 0..count {
        let mut size = if k + 1 == count {
            n - p * (count - 1)
        } else {
            p
        };
        while size > 0 {
            // The agent furthest below its share that has room for the whole instance.
            let mut chosen = None;
            while let Some(d) = heap.pop() {
                let r = room(d.1, assigned[d.1]);
                if r >= size {
                    chosen = Some(d.1);
                    break;
                }
                if r >= smallest {
                    set_aside.push(d);
                }
            }
            let (agent, piece) = match chosen {
                Some(i) => (i, size),
                None => {
                    // It fits nowhere whole: the agent with the most room takes what it can.
                    let best = (0..agents.len())
                        .max_by_key(|&i| (room(i, assigned[i]), std::cmp::Reverse(i)));
                    match best.filter(|&i| room(i, assigned[i]) > 0) {
                        Some(i) => {
                            let take = room(i, assigned[i]).min(size);
                            set_aside.retain(|d: &Deficit| d.1 != i);
                            (i, take)
                        }
                        None => {
                            return Err(PlanError::Shortfall {
                                needed: n,
                                available: total,
                                short: n.saturating_sub(total),
                                agents: agents.len(),
                            })
                        }
                    }
                }
            };
            heap.extend(set_aside.drain(..));
            assigned[agent] += piece;
            pieces[agent].push(piece);
            heap.push(Deficit(target[agent] - assigned[agent] as f64, agent));
            size -= piece;
        }
    }
    // Renumber so that ranges run contiguously in agent order.
    let mut next_vehicle = 0u64;
    let mut next_index = 0u32;
    let out = agents
        .iter()
        .zip(pieces)
        .map(|(a, sizes)| {
            let instances = sizes
                .into_iter()
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
                .collect::<Vec<_>>();
            AgentAssignment {
                name: a.name.clone(),
                max_vehicles: a.max_vehicles,
                vehicles: instances.iter().map(|i| i.vehicles).sum(),
                instances,
            }
        })
        .collect();
    Ok(Plan {
        vehicles: n,
        agents: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_can_start_at_any_vehicle() {
        let agents = [PlanAgent {
            name: "a".into(),
            max_vehicles: 1000,
        }];
        let p = plan(234, &agents, 50, false)
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
        let p = plan(10, &agents, 50, false).unwrap();
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
        let p = plan(234, &agents(&[100_000]), 50, false).unwrap();
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
        let p = plan(1000, &agents(&[3000, 1000]), 50, false).unwrap();
        assert_eq!((p.agents[0].vehicles, p.agents[1].vehicles), (750, 250));
        let p = plan(234, &agents(&[80, 10_000]), 50, false).unwrap();
        assert!(p.agents[0].vehicles <= 80);
        check_cover(&p, 234, 50);
        // Instances that fit nowhere whole are split.
        let p = plan(60, &agents(&[30, 30]), 50, false).unwrap();
        assert_eq!((p.agents[0].vehicles, p.agents[1].vehicles), (30, 30));
        check_cover(&p, 60, 50);
    }

    #[test]
    fn shortfall_and_bad_input() {
        let e = plan(1000, &agents(&[300, 300]), 50, false).unwrap_err();
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
            plan(0, &agents(&[1]), 50, false),
            Err(PlanError::NoVehicles)
        );
        assert_eq!(plan(1, &[], 50, false), Err(PlanError::NoAgents));
        assert_eq!(
            plan(1, &agents(&[1]), 0, false),
            Err(PlanError::NoInstanceSize)
        );
        let p = plan(1000, &agents(&[0, 0]), 50, true).unwrap();
        assert_eq!((p.agents[0].vehicles, p.agents[1].vehicles), (500, 500));
    }

    #[test]
    fn a_million_over_a_thousand_agents() {
        let maxes: Vec<u64> = (0..1000).map(|i| 1000 + (i % 7) * 300).collect();
        let p = plan(1_000_000, &agents(&maxes), 50, false).unwrap();
        check_cover(&p, 1_000_000, 50);
        for (a, m) in p.agents.iter().zip(&maxes) {
            assert!(a.vehicles <= *m);
        }
    }

    proptest! {
        #[test]
        fn ranges_cover_exactly(maxes in proptest::collection::vec(0u64..100_000, 1..20),
                                n in 1u64..200_000, per in 1u32..500) {
            let total: u64 = maxes.iter().sum();
            prop_assume!(total >= n);
            let a = agents(&maxes);
            let p = plan(n, &a, per, false).unwrap();
            check_cover(&p, n, u64::from(per));
            for (x, m) in p.agents.iter().zip(&maxes) {
                prop_assert!(x.vehicles <= *m);
            }
            prop_assert_eq!(&p, &plan(n, &a, per, false).unwrap());
        }

        #[test]
        fn overcommit_covers_anything(maxes in proptest::collection::vec(0u64..1000, 1..10),
                                      n in 1u64..50_000, per in 1u32..200) {
            let p = plan(n, &agents(&maxes), per, true).unwrap();
            check_cover(&p, n, u64::from(per));
        }
    }
}
