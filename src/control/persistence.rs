//! What survives a restart: the state the coordinator writes (its run, plan and every
//! incarnation's latest report), and the coordinator restored from it.

use super::{Control, Limits, Now, Run};
use crate::plan::{AgentAssignment, InstanceRange, Plan};
use crate::wire::pb;
use std::sync::Arc;

/// A stored run's state; files from before the enum hold it as text. A run is never idle:
/// a stored run without a state is taken as stopped.
fn restored_state(r: &pb::StoredRun) -> pb::RunState {
    match r.run_state() {
        pb::RunState::Idle => match pb::RunState::from_legacy(&r.legacy_state) {
            pb::RunState::Idle => pb::RunState::Stopped,
            s => s,
        },
        s => s,
    }
}

impl Control {
    /// The stored state but for its incarnations (see `StateToWrite`).
    pub(super) fn stored_head(&self) -> pb::StoredState {
        pb::StoredState {
            epoch: self.epoch,
            incarnations: Vec::new(),
            run: self.run.as_ref().map(|r| pb::StoredRun {
                id: r.id.clone(),
                legacy_state: String::new(),
                run_state: r.state.into(),
                spec: Some(r.spec.clone()),
                params: Some(r.params),
                agents: r
                    .plan
                    .agents
                    .iter()
                    .map(|a| pb::StoredAgent {
                        name: a.name.clone(),
                        max_vehicles: a.max_vehicles,
                        // Instances in handoff are kept with their new agent: a restart takes
                        // longer than the handoff anyway.
                        instances: a
                            .instances
                            .iter()
                            .chain(
                                r.parked
                                    .iter()
                                    .filter(|p| p.to == a.name)
                                    .map(|p| &p.instance),
                            )
                            .map(pb::InstanceSpec::from)
                            .collect(),
                    })
                    .collect(),
                started_unix: r.started,
                ended_unix: r.ended.unwrap_or(0.0),
                vehicles: r.plan.vehicles,
                failure: r.failure.clone(),
            }),
        }
    }

    /// A coordinator resuming what `stored` kept.
    pub fn restore(limits: Limits, stored: pb::StoredState, now: Now) -> Control {
        let run = stored.run.map(|r| Run {
            state: restored_state(&r),
            id: r.id,
            spec: r.spec.unwrap_or_default(),
            params: r.params.unwrap_or_default(),
            plan: Plan {
                vehicles: r.vehicles,
                agents: r
                    .agents
                    .into_iter()
                    .map(|a| AgentAssignment {
                        vehicles: a.instances.iter().map(|i| i.vehicles).sum(),
                        name: a.name,
                        max_vehicles: a.max_vehicles,
                        instances: a.instances.iter().map(InstanceRange::from).collect(),
                    })
                    .collect(),
            },
            started: r.started_unix,
            ended: (r.ended_unix > 0.0).then_some(r.ended_unix),
            parked: Vec::new(),
            failure: r.failure,
        });
        let incarnations = stored
            .incarnations
            .into_iter()
            .filter_map(|i| {
                let status = i.status?;
                Some((
                    (i.agent, status.index, status.incarnation),
                    Arc::new(status),
                ))
            })
            .collect();
        let mut c = Control::new(limits, now);
        // Newer than anything issued before the restart, whatever the clock did meanwhile.
        c.epoch = (stored.epoch + 1).max(now.unix_ms);
        c.run = run;
        c.incarnations = incarnations;
        // A restarted coordinator gives every instance a fresh start on the undriven clock.
        c.reset_driven(now);
        c
    }

    pub(super) fn reset_driven(&mut self, now: Now) {
        self.driven.clear();
        if let Some(run) = &self.run {
            for a in &run.plan.agents {
                for i in &a.instances {
                    self.driven.insert(i.index, now.mono);
                }
            }
        }
    }
}

/// A state to write: `pb::StoredState` with its incarnations still shared with the core.
pub struct StateToWrite {
    pub(super) head: pb::StoredState,
    pub(super) incarnations: Vec<(String, Arc<pb::InstanceStatus>)>,
}

impl StateToWrite {
    /// The `pb::StoredState` encoding, written to `out` as it is made. The incarnations are
    /// appended as the repeated field they are (field 3 of StoredState; agent 1 and status 2
    /// of StoredIncarnation), one at a time from the shared reports: building the message, or
    /// the whole encoding in memory, would first copy tens of MB for 10,000 agents.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        use prost::encoding::{encode_key, encode_varint, message, string, WireType};
        const INCARNATIONS: u32 = 3;
        out.write_all(&prost::Message::encode_to_vec(&self.head))?;
        let mut buf = Vec::new();
        for (agent, status) in &self.incarnations {
            buf.clear();
            let len = string::encoded_len(1, agent) + message::encoded_len(2, &**status);
            encode_key(INCARNATIONS, WireType::LengthDelimited, &mut buf);
            encode_varint(len as u64, &mut buf);
            string::encode(1, agent, &mut buf);
            message::encode(2, &**status, &mut buf);
            out.write_all(&buf)?;
        }
        Ok(())
    }

    /// The whole encoding in memory (for tests).
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = self.write_to(&mut out);
        out
    }
}
