//! Glue between the wire types and the pure planner: agents' hardware reports become capacity
//! estimates, and a plan becomes the reply the CLI prints.

use crate::capacity::{self, HostCosts, HostSpec, LoadParams};
use crate::plan::{self, Plan, PlanAgent};
use crate::wire::pb;

/// The most vehicles one plan may hold: far beyond any fleet, small enough that a typo (an
/// extra zero or three) is caught rather than planned.
pub const MAX_FLEET: u64 = 100_000_000;

/// One host as the planner sees it.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub hardware: pb::Hardware,
    /// Operator cap; 0 = none.
    pub max_vehicles: u64,
}

/// Parses a vehicle count typed by a user, with messages that say what is wrong.
pub fn parse_vehicles(text: &str) -> Result<u64, String> {
    let t = text.trim().replace('_', "");
    if t.starts_with('-') {
        return Err(format!(
            "{text:?} is negative: the number of vehicles must be at least 1"
        ));
    }
    if t.is_empty() || !t.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{text:?} is not a whole number of vehicles"));
    }
    let n: u64 = t
        .parse()
        .map_err(|_| format!("{text:?} is too large; vtox plans up to {MAX_FLEET} vehicles"))?;
    if n == 0 {
        return Err("the number of vehicles must be at least 1".into());
    }
    if n > MAX_FLEET {
        return Err(format!(
            "{n} vehicles is more than the {MAX_FLEET} vtox plans for"
        ));
    }
    Ok(n)
}

pub fn host_spec(h: &Host) -> HostSpec {
    let c = h.hardware.calibration.clone().unwrap_or_default();
    HostSpec {
        name: h.name.clone(),
        logical_cores: h.hardware.logical_cores,
        memory_total_bytes: h.hardware.memory_total_bytes,
        memory_available_bytes: h.hardware.memory_available_bytes,
        link_mbps: h.hardware.link_mbps,
        msgs_per_core: h.hardware.calibrated_msgs_per_core,
        costs: HostCosts {
            process_cores: c.process_cores,
            process_bytes: c.process_rss_bytes,
            sink_us_per_msg: c.sink_us_per_msg,
        },
        max_vehicles: (h.max_vehicles > 0).then_some(h.max_vehicles),
    }
}

pub fn hardware_of(spec: &HostSpec) -> pb::Hardware {
    pb::Hardware {
        hostname: spec.name.clone(),
        logical_cores: spec.logical_cores,
        physical_cores: spec.logical_cores,
        memory_total_bytes: spec.memory_total_bytes,
        memory_available_bytes: spec.memory_available_bytes,
        link_mbps: spec.link_mbps,
        calibrated_msgs_per_core: spec.msgs_per_core,
        ..Default::default()
    }
}

/// The load of a plan request; a field left at zero takes the default (0 vehicles per
/// instance: sized by each host).
pub fn load_params(p: &pb::PlanParams) -> LoadParams {
    let d = LoadParams::default();
    LoadParams {
        interval_s: if p.interval_s > 0.0 {
            p.interval_s
        } else {
            d.interval_s
        },
        batch_size: if p.batch_size > 0 {
            p.batch_size
        } else {
            d.batch_size
        },
        per_instance: (p.per_instance > 0).then_some(p.per_instance),
        sink_on_host: p.sink_on_host,
    }
}

fn agent_plan(h: &Host, e: &capacity::Estimate, instances: Vec<pb::InstanceSpec>) -> pb::AgentPlan {
    pb::AgentPlan {
        agent: h.name.clone(),
        hardware: Some(h.hardware.clone()),
        max_vehicles: e.max_vehicles,
        recommended_vehicles: e.recommended_vehicles,
        limited_by: e.limited_by.to_string(),
        instances,
        per_process_vehicles: e.per_process_vehicles,
    }
}

/// Every host's estimate, without a plan.
pub fn capacity_reply(hosts: &[Host], params: &pb::PlanParams) -> pb::PlanReply {
    let load = load_params(params);
    let agents: Vec<pb::AgentPlan> = hosts
        .iter()
        .map(|h| agent_plan(h, &capacity::estimate(&host_spec(h), &load), Vec::new()))
        .collect();
    pb::PlanReply {
        total_vehicles: 0,
        total_max: agents.iter().map(|a| a.max_vehicles).sum(),
        total_recommended: agents.iter().map(|a| a.recommended_vehicles).sum(),
        agents,
        ..Default::default()
    }
}

/// Estimates every host and spreads the fleet over them, with the old tool's layout of the
/// same fleet beside it (its processes, and what the hosts carry in processes that small).
pub fn plan_hosts(
    hosts: &[Host],
    params: &pb::PlanParams,
) -> Result<(Plan, pb::PlanReply), String> {
    if hosts.is_empty() {
        return Err(
            "no agents have joined; start vtox-agent --join COORD:PORT on each host".into(),
        );
    }
    let load = load_params(params);
    let estimates: Vec<capacity::Estimate> = hosts
        .iter()
        .map(|h| capacity::estimate(&host_spec(h), &load))
        .collect();
    let agents: Vec<PlanAgent> = hosts
        .iter()
        .zip(&estimates)
        .map(|(h, e)| PlanAgent {
            name: h.name.clone(),
            max_vehicles: e.max_vehicles,
            per_process: e.per_process_vehicles,
        })
        .collect();
    let plan = plan::plan(
        params.vehicles,
        &agents,
        load.per_instance,
        params.overcommit,
    )
    .map_err(|e| e.to_string())?
    .starting_at(params.first_vehicle)
    .ok_or_else(|| format!("--first-vehicle {} is too large", params.first_vehicle))?;
    let old = LoadParams {
        per_instance: Some(capacity::OLD_TOOL_PER_INSTANCE),
        ..load
    };
    let reply = pb::PlanReply {
        agents: hosts
            .iter()
            .zip(&estimates)
            .zip(&plan.agents)
            .map(|((h, e), a)| {
                agent_plan(
                    h,
                    e,
                    a.instances.iter().map(pb::InstanceSpec::from).collect(),
                )
            })
            .collect(),
        total_vehicles: plan.vehicles,
        total_max: estimates.iter().map(|e| e.max_vehicles).sum(),
        total_recommended: estimates.iter().map(|e| e.recommended_vehicles).sum(),
        old_layout_instances: plan
            .vehicles
            .div_ceil(u64::from(capacity::OLD_TOOL_PER_INSTANCE)),
        old_layout_max_vehicles: hosts
            .iter()
            .map(|h| capacity::estimate(&host_spec(h), &old).max_vehicles)
            .sum(),
    };
    Ok((plan, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vehicle_counts_users_type() {
        assert_eq!(parse_vehicles("234"), Ok(234));
        assert_eq!(parse_vehicles("1_000"), Ok(1000));
        for bad in [
            "0",
            "-1",
            "abc",
            "1e12",
            "",
            "12.5",
            "1000000000000",
            "99999999999999999999999",
        ] {
            assert!(parse_vehicles(bad).is_err(), "{bad}");
        }
        assert!(parse_vehicles("-1").unwrap_err().contains("negative"));
    }
}
