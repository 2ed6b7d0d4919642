//! Where the fleet goes: starting and stopping a run, rebalancing, moving the instances of
//! lost agents, handing parked instances over, and each agent's assignment.

use super::{AgentEntry, Commands, Control, Now, Parked, Run, HANDOFF, NOTHING, RECONCILE};
use crate::plan::AgentAssignment;
use crate::planning;
use crate::wire::pb;
use std::collections::BTreeMap;

impl Control {
    /// Starts a run over the connected agents.
    pub fn start(
        &mut self,
        req: pb::StartRequest,
        now: Now,
    ) -> Result<(pb::StartReply, Commands), String> {
        let params = req.params.unwrap_or_default();
        let mut spec = req.spec.unwrap_or_default();
        if let Some(run) = self
            .run
            .as_ref()
            .filter(|r| r.state == pb::RunState::Running)
        {
            return Err(format!(
                "run {} is in progress; stop it first (vtox-coord stop)",
                run.id
            ));
        }
        let hosts = self.connected_hosts();
        if (hosts.len() as u32) < req.expect_agents {
            return Err(format!(
                "{} agents are connected, {} expected",
                hosts.len(),
                req.expect_agents
            ));
        }
        let (plan, reply) = planning::plan_hosts(&hosts, &params)?;
        if spec.run_start <= 0.0 {
            // A moment ahead, so that every host starts its schedule from the same instant.
            spec.run_start = now.unix_s() + 1.0;
        }
        let id = format!("run-{}", now.unix_ms);
        tracing::info!(
            run = id,
            vehicles = plan.vehicles,
            agents = plan.agents.len(),
            "run started"
        );
        self.run = Some(Run {
            id: id.clone(),
            spec,
            params,
            plan,
            started: now.unix_s(),
            state: pb::RunState::Running,
            ended: None,
            parked: Vec::new(),
            failure: String::new(),
        });
        self.incarnations.clear();
        self.reported.clear();
        self.reset_driven(now);
        self.bump_epoch(now);
        Ok((
            pb::StartReply {
                run_id: id,
                plan: Some(reply),
            },
            RECONCILE,
        ))
    }

    /// Stops the run; says whether one was running.
    pub fn stop(&mut self, now: Now) -> (bool, Commands) {
        let was_running = match &mut self.run {
            Some(run) if run.state == pb::RunState::Running => {
                run.state = pb::RunState::Stopped;
                run.ended = Some(now.unix_s());
                tracing::info!(run = run.id, "run stopped");
                true
            }
            _ => false,
        };
        self.bump_epoch(now);
        (was_running, RECONCILE)
    }

    /// Moves instances, largest index first, from agents above their recommended load (75% of
    /// their capacity) to live agents below it, through the parking lot. Returns what moved.
    pub fn rebalance(&mut self, now: Now) -> Result<((u32, u64), Commands), String> {
        if !self.running() {
            return Err("no run is in progress".into());
        }
        self.include_late_joiners();
        let lease = self.limits.lease;
        let agents = &self.agents;
        let Some(run) = self.run.as_mut() else {
            return Err("no run is in progress".into());
        };
        let live = |name: &str| {
            agents.get(name).is_some_and(|a| {
                a.connected() && now.mono.saturating_duration_since(a.last_seen) < lease
            })
        };
        let recommended =
            |max: u64| (max as f64 * crate::capacity::RECOMMENDED_SHARE).floor() as u64;
        let mut incoming: BTreeMap<String, u64> = BTreeMap::new();
        for p in &run.parked {
            *incoming.entry(p.to.clone()).or_default() += p.instance.vehicles;
        }
        let (mut moved, mut vehicles) = (0u32, 0u64);
        // What `bump_epoch` below makes of it.
        let next_epoch = (self.epoch + 1).max(now.unix_ms);
        let plan = &mut run.plan.agents;
        for from in 0..plan.len() {
            while plan[from].vehicles > recommended(plan[from].max_vehicles) {
                let Some(inst) = plan[from].instances.last().copied() else {
                    break;
                };
                let to = (0..plan.len())
                    .filter(|&j| j != from && live(&plan[j].name))
                    .map(|j| {
                        let load =
                            plan[j].vehicles + incoming.get(&plan[j].name).copied().unwrap_or(0);
                        (j, recommended(plan[j].max_vehicles).saturating_sub(load))
                    })
                    .filter(|(_, room)| *room >= inst.vehicles)
                    .max_by_key(|(j, room)| (*room, std::cmp::Reverse(*j)));
                let Some((to, _)) = to else { break };
                plan[from].instances.pop();
                plan[from].vehicles -= inst.vehicles;
                let dest = plan[to].name.clone();
                *incoming.entry(dest.clone()).or_default() += inst.vehicles;
                tracing::info!(
                    instance = inst.index,
                    from = plan[from].name,
                    to = dest,
                    "rebalancing"
                );
                run.parked.push(Parked {
                    instance: inst,
                    from: plan[from].name.clone(),
                    to: dest,
                    epoch: next_epoch,
                    let_go: None,
                });
                moved += 1;
                vehicles += inst.vehicles;
            }
        }
        let commands = if moved > 0 {
            self.bump_epoch(now);
            RECONCILE
        } else {
            NOTHING
        };
        Ok(((moved, vehicles), commands))
    }

    /// Puts agents that joined after the plan was made into it (with nothing yet), so that
    /// moves and rebalancing can give them work.
    pub(super) fn include_late_joiners(&mut self) {
        let Some(run) = self.run.as_mut() else { return };
        let load = planning::load_params(&run.params);
        let planned: std::collections::HashSet<&str> =
            run.plan.agents.iter().map(|a| a.name.as_str()).collect();
        let mut late = Vec::new();
        for (name, entry) in &self.agents {
            if entry.connected() && !planned.contains(name.as_str()) {
                let host = planning::Host {
                    name: name.clone(),
                    hardware: entry.hardware.clone(),
                    max_vehicles: entry.max_vehicles,
                };
                let max =
                    crate::capacity::estimate(&planning::host_spec(&host), &load).max_vehicles;
                late.push(AgentAssignment {
                    name: name.clone(),
                    max_vehicles: max,
                    vehicles: 0,
                    instances: Vec::new(),
                });
            }
        }
        run.plan.agents.extend(late);
    }

    /// Moves the instances of agents silent for longer than lease + grace to connected agents
    /// with room, whole and with the same vehicle numbers; late joiners take part. Instances
    /// that fit nowhere stay where they are and show as unassigned until an agent with room
    /// joins. Returns whether anything moved.
    pub(super) fn move_orphans(&mut self, now: Now) -> bool {
        let limit = self.limits.lease + self.limits.grace;
        let born = self.born;
        let silent = |a: &AgentEntry| now.mono.saturating_duration_since(a.last_seen);
        let dead_in = |agents: &BTreeMap<String, AgentEntry>, name: &str| match agents.get(name) {
            Some(a) => silent(a) > limit,
            None => now.mono.saturating_duration_since(born) > limit,
        };
        let Some(run) = self
            .run
            .as_ref()
            .filter(|r| r.state == pb::RunState::Running)
        else {
            return false;
        };
        if !run
            .plan
            .agents
            .iter()
            .any(|a| !a.instances.is_empty() && dead_in(&self.agents, &a.name))
        {
            return false;
        }
        self.include_late_joiners();
        let agents_map = &self.agents;
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        // Silence, not a closed stream, is what counts: a frozen agent keeps its TCP connection.
        let live = |name: &str| {
            agents_map
                .get(name)
                .is_some_and(|a| a.connected() && silent(a) < limit)
        };
        let dead = |name: &str| dead_in(agents_map, name);
        let mut moved = false;
        let agents = &mut run.plan.agents;
        for from in 0..agents.len() {
            if agents[from].instances.is_empty() || !dead(&agents[from].name) {
                continue;
            }
            let orphans = std::mem::take(&mut agents[from].instances);
            for inst in orphans {
                let to = (0..agents.len())
                    .filter(|&i| i != from && live(&agents[i].name))
                    .filter(|&i| {
                        agents[i].max_vehicles.saturating_sub(agents[i].vehicles) >= inst.vehicles
                    })
                    .max_by_key(|&i| {
                        (
                            agents[i].max_vehicles.saturating_sub(agents[i].vehicles),
                            std::cmp::Reverse(i),
                        )
                    });
                let dest = to.unwrap_or(from);
                if dest != from {
                    tracing::warn!(
                        instance = inst.index,
                        from = agents[from].name,
                        to = agents[dest].name,
                        "moving vehicles {}..{} of a lost agent",
                        inst.first_vehicle,
                        inst.first_vehicle + inst.vehicles
                    );
                    agents[from].vehicles -= inst.vehicles;
                    agents[dest].vehicles += inst.vehicles;
                    moved = true;
                }
                agents[dest].instances.push(inst);
            }
        }
        moved
    }

    /// Hands parked instances to their new agents once their handoff time has passed and
    /// their old agent is known to have let go.
    pub(super) fn release_parked(&mut self, now: Now) -> bool {
        let limit = self.limits.lease + self.limits.grace;
        let agents = &self.agents;
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        let ready_now = |p: &Parked| {
            p.let_go.is_some_and(|t| t + HANDOFF <= now.mono)
                || agents
                    .get(&p.from)
                    .is_none_or(|a| now.mono.saturating_duration_since(a.last_seen) > limit)
        };
        let (ready, waiting): (Vec<Parked>, Vec<Parked>) =
            run.parked.drain(..).partition(ready_now);
        run.parked = waiting;
        let released = !ready.is_empty();
        for p in ready {
            match run.plan.agents.iter_mut().find(|a| a.name == p.to) {
                Some(a) => {
                    a.vehicles += p.instance.vehicles;
                    a.instances.push(p.instance);
                    a.instances.sort_by_key(|i| i.index);
                }
                None => tracing::error!(agent = p.to, "a parked instance's agent left the plan"),
            }
        }
        released
    }

    /// The assignment of an agent with `planned` in the running plan (None: nothing to run).
    pub(super) fn assignment_of(&self, planned: Option<&AgentAssignment>) -> pb::Assignment {
        match &self.run {
            Some(run) if run.state == pb::RunState::Running => pb::Assignment {
                epoch: self.epoch,
                run_id: run.id.clone(),
                spec: Some(run.spec.clone()),
                instances: planned
                    .iter()
                    .flat_map(|a| a.instances.iter())
                    .map(pb::InstanceSpec::from)
                    .collect(),
            },
            _ => pb::Assignment {
                epoch: self.epoch,
                run_id: String::new(),
                spec: None,
                instances: Vec::new(),
            },
        }
    }

    /// A run with a duration is finished once every planned instance reported that it exited,
    /// or well after its end (an agent that vanished cannot hold the run open).
    pub(super) fn update_run_state(&mut self, now: Now) {
        if self.fail_if_undriven(now) {
            self.bump_epoch(now);
            return;
        }
        let Some(run) = &self.run else { return };
        if run.state != pb::RunState::Running || run.spec.duration_s <= 0.0 {
            return;
        }
        let elapsed = now.unix_s() - run.spec.run_start;
        if elapsed < run.spec.duration_s {
            return;
        }
        let all_exited = || {
            run.plan.agents.iter().all(|a| {
                a.instances.iter().all(|i| {
                    self.incarnations
                        .range((a.name.clone(), i.index, 0)..=(a.name.clone(), i.index, u64::MAX))
                        .next_back()
                        .is_some_and(|(_, s)| s.phase == pb::Phase::Exited as i32)
                })
            })
        };
        if elapsed > run.spec.duration_s + 30.0 || all_exited() {
            if let Some(run) = &mut self.run {
                run.state = pb::RunState::Finished;
                run.ended = Some(now.unix_s());
            }
            self.bump_epoch(now);
        }
    }
}
