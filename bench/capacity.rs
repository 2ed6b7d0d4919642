//! Capacity benchmark: does a host at the fleet `plan --local` recommends run clean, and does
//! one driven far past it stay alive and say why? It sweeps `vtox-coord run N --local` (a
//! coordinator, an agent, the built-in sink and the simulators, all on this machine) from 10 %
//! to 200 % of the recommended fleet, each step a few minutes, and reads for every step the
//! run's own summary (success, lease expiries, restarts, the generator's verdict) and, from
//! /proc, independently of vtox, the CPU its processes used in the steady part of the step.
//!
//! Run: `cargo build --release && cargo bench --bench capacity`
//! (STEPS=10,50,100,150,200 percent of the recommended fleet; STEP_SECONDS=180 each, the 100 %
//! step LONG_SECONDS=300). Writes bench/results/capacity.json and capacity.md (the table), the
//! charts to docs/img/capacity.svg and capacity-cpu.svg, and exits 1 when a check fails: at 100 % at least 99 % success
//! and no lease expiry; at 200 % a run that stays alive, says it is generator-limited, with no
//! lease expiry and no restart. `REDRAW=1` redraws the table and charts from the last results.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The first seconds of a step are start-up and are left out of the CPU figures.
const SETTLE: Duration = Duration::from_secs(30);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn release(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/release")
        .join(name)
}

/// CPU ticks of every live process by its name (vtox-sim, vtox-agent, vtox-sink,
/// vtox-coord), summed, and which pids they were.
fn ticks_by_name() -> HashMap<String, HashMap<u32, u64>> {
    let mut out: HashMap<String, HashMap<u32, u64>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for pid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        if !name.starts_with("vtox-") {
            continue;
        }
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let t = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.entry(name.to_string()).or_default().insert(pid, t);
    }
    out
}

/// Cores each process kind used between two looks (processes alive at both).
fn cores_between(
    a: &HashMap<String, HashMap<u32, u64>>,
    b: &HashMap<String, HashMap<u32, u64>>,
    seconds: f64,
) -> HashMap<String, f64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    b.iter()
        .map(|(name, pids)| {
            let used: u64 = pids
                .iter()
                .filter_map(|(pid, t)| Some(t.saturating_sub(*a.get(name)?.get(pid)?)))
                .sum();
            (name.clone(), used as f64 / hz / seconds)
        })
        .collect()
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Step {
    percent: u64,
    vehicles: u64,
    seconds: u64,
    state: String,
    success_percent: f64,
    /// Accepted of the messages the schedule made: what a backlog or a slow generator hides.
    delivered_percent: f64,
    dropped_percent: f64,
    p95_ms: f64,
    lease_expiries: u64,
    restarts: u64,
    generator_healthy: bool,
    generator: String,
    sim_cores: f64,
    agent_cores: f64,
    sink_cores: f64,
    coord_cores: f64,
}

fn recommended() -> Result<(u64, String), String> {
    let out = Command::new(release("vtox-coord"))
        .args(["plan", "1", "--local", "--json"])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("vtox-coord plan: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("plan --json: {e}"))?;
    let rec = v["total_recommended_vehicles"]
        .as_u64()
        .ok_or("no recommended fleet in the plan")?;
    Ok((rec, v.to_string()))
}

fn run_step(percent: u64, vehicles: u64, seconds: u64) -> Result<Step, String> {
    eprintln!("== {percent} % of the recommended fleet: {vehicles} vehicles for {seconds} s");
    let child = Command::new(release("vtox-coord"))
        .args([
            "run",
            &vehicles.to_string(),
            "--local",
            "--no-web",
            "--duration",
            &format!("{seconds}s"),
            "--min-success",
            "0",
            // Past the estimate on purpose: that is what the sweep measures.
            "--overcommit",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("vtox-coord run: {e}"))?;
    let started = Instant::now();
    std::thread::sleep(SETTLE);
    let (a, at) = (ticks_by_name(), Instant::now());
    // The last look before the fleet stops driving.
    let until = started + Duration::from_secs(seconds.saturating_sub(5).max(SETTLE.as_secs() + 5));
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(1));
    }
    let (b, bt) = (ticks_by_name(), Instant::now());
    let out = child
        .wait_with_output()
        .map_err(|e| format!("vtox-coord run: {e}"))?;
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("the run's summary is not JSON ({e})"))?;
    let cores = cores_between(&a, &b, bt.duration_since(at).as_secs_f64());
    let t = &s["totals"];
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let produced = num(&t["produced"]).max(1.0);
    let late = num(&t["dropped"]) - num(&t["dropped_busy"]);
    let reasons: Vec<String> = s["generator"]["reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(String::from))
        .collect();
    let step = Step {
        percent,
        vehicles,
        seconds,
        state: s["state"].as_str().unwrap_or("?").to_string(),
        success_percent: num(&t["success_percent"]),
        delivered_percent: num(&t["accepted"]) * 100.0 / produced,
        dropped_percent: late * 100.0 / (produced + late),
        p95_ms: num(&t["p95_ms"]),
        lease_expiries: s["supervision"]["lease_expiries"].as_u64().unwrap_or(0),
        restarts: s["supervision"]["restarts"].as_u64().unwrap_or(0),
        generator_healthy: s["generator"]["healthy"].as_bool().unwrap_or(false),
        generator: reasons.join("; "),
        sim_cores: cores.get("vtox-sim").copied().unwrap_or(0.0),
        agent_cores: cores.get("vtox-agent").copied().unwrap_or(0.0),
        sink_cores: cores.get("vtox-sink").copied().unwrap_or(0.0),
        coord_cores: cores.get("vtox-coord").copied().unwrap_or(0.0),
    };
    eprintln!("   {step:?}");
    Ok(step)
}

fn table(steps: &[Step], recommended: u64) -> String {
    let mut md = format!(
        "Recommended fleet of this machine with the built-in sink (`plan --local`): {recommended} vehicles.\n\n\
         | % of rec. | vehicles | state | success % | delivered % | ticks dropped % | p95 ms | lease expiries | restarts | generator | CPU: sims | agent | sink | coord |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n"
    );
    for s in steps {
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.2} | {:.3} | {:.2} | {:.3} |\n",
            s.percent,
            s.vehicles,
            s.state,
            s.success_percent,
            s.delivered_percent,
            s.dropped_percent,
            s.p95_ms,
            s.lease_expiries,
            s.restarts,
            if s.generator_healthy { "healthy" } else { "limited" },
            s.sim_cores,
            s.agent_cores,
            s.sink_cores,
            s.coord_cores
        ));
    }
    md.push_str("\nCPU in cores over the steady part of each step (from /proc, not from vtox).\n");
    md
}

/// Two charts: what the run delivered, and the CPU each kind of process used.
fn charts(steps: &[Step]) -> Result<(String, String), String> {
    let x: Vec<f64> = steps.iter().map(|s| s.vehicles as f64).collect();
    let series = |f: fn(&Step) -> f64| steps.iter().map(|s| Some(f(s))).collect::<Vec<_>>();
    let delivered = vtox::charts::svg(&vtox::charts::Chart {
        title: "run --local, 10 % to 200 % of the recommended fleet: what it delivered",
        y_label: "% ",
        x: &x,
        series: vec![
            ("success % of answers", series(|s| s.success_percent)),
            (
                "accepted % of messages made",
                series(|s| s.delivered_percent),
            ),
            (
                "ticks dropped % (generator late)",
                series(|s| s.dropped_percent),
            ),
        ],
        search: &[],
        slo: Some(("99 %", 99.0)),
    })?;
    let cpu = vtox::charts::svg(&vtox::charts::Chart {
        title: "the CPU each kind of process used (from /proc)",
        y_label: "cores",
        x: &x,
        series: vec![
            ("vtox-sim (nice 10)", series(|s| s.sim_cores)),
            ("vtox-sink", series(|s| s.sink_cores)),
            ("vtox-agent", series(|s| s.agent_cores)),
            ("vtox-coord", series(|s| s.coord_cores)),
        ],
        search: &[],
        slo: Some(("the host's 2 cores", 2.0)),
    })?;
    Ok((delivered, cpu))
}

/// `REDRAW=1`: the table and charts again from the last results, without running anything.
fn redraw(dir: &std::path::Path) {
    let text = std::fs::read_to_string(dir.join("capacity.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let steps: Vec<Step> = serde_json::from_value(v["steps"].clone()).unwrap_or_default();
    let rec = v["recommended"].as_u64().unwrap_or(0);
    let md = table(&steps, rec);
    write_results(dir, rec, &v["plan"].to_string(), &steps, &md);
    println!("{md}");
    check(&steps);
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    if std::env::var("REDRAW").is_ok_and(|v| v == "1") {
        return redraw(&dir);
    }
    let percents: Vec<u64> = std::env::var("STEPS")
        .unwrap_or_else(|_| "10,50,100,150,200".into())
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let step_s = env_num("STEP_SECONDS", 180);
    let long_s = env_num("LONG_SECONDS", 300);
    let (rec, plan) = match recommended() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e} (build first: cargo build --release)");
            std::process::exit(2);
        }
    };
    eprintln!("recommended fleet with the built-in sink: {rec} vehicles");
    let mut steps = Vec::new();
    for p in percents {
        let seconds = if p == 100 { long_s } else { step_s };
        match run_step(p, (rec * p / 100).max(1), seconds) {
            Ok(s) => steps.push(s),
            Err(e) => {
                eprintln!("error: step {p} %: {e}");
                std::process::exit(1);
            }
        }
    }
    let _ = std::fs::create_dir_all(&dir);
    let md = table(&steps, rec);
    write_results(&dir, rec, &plan, &steps, &md);
    println!("{md}");
    check(&steps);
}

fn write_results(dir: &std::path::Path, rec: u64, plan: &str, steps: &[Step], md: &str) {
    let json = serde_json::json!({ "recommended": rec, "plan": serde_json::from_str::<serde_json::Value>(plan).ok(), "steps": steps });
    let _ = std::fs::write(dir.join("capacity.json"), format!("{json:#}\n"));
    let _ = std::fs::write(dir.join("capacity.md"), md);
    match charts(steps) {
        Ok((delivered, cpu)) => {
            // The charts the README shows, kept in git beside the docs.
            let img = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/img");
            let _ = std::fs::create_dir_all(&img);
            let _ = std::fs::write(img.join("capacity.svg"), delivered);
            let _ = std::fs::write(img.join("capacity-cpu.svg"), cpu);
        }
        Err(e) => eprintln!("warning: no chart: {e}"),
    }
}

/// The acceptance checks; exits 1 when one fails.
fn check(steps: &[Step]) {
    let mut failed = Vec::new();
    for s in steps {
        if s.percent == 100 && (s.success_percent < 99.0 || s.lease_expiries > 0) {
            failed.push(format!("at the recommended fleet: {s:?}"));
        }
        if s.percent == 200
            && (s.state == "failed"
                || s.generator_healthy
                || s.lease_expiries > 0
                || s.restarts > 0)
        {
            failed.push(format!("at twice the recommended fleet: {s:?}"));
        }
    }
    if failed.is_empty() {
        println!("all checks passed");
    } else {
        for f in &failed {
            println!("CHECK FAILED {f}");
        }
        std::process::exit(1);
    }
}
