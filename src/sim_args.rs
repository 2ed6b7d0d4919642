//! The command line of `vtox-sim` as one type: the simulator parses it, and `vtox-agent` builds
//! a value of it and turns it into arguments with [`SimArgs::to_args`], so that a flag cannot
//! drift between the two. `to_args` walks clap's own list of arguments, so a field added here is
//! passed on without anyone having to remember it.

use crate::duration::parse_duration;
use clap::{CommandFactory, Parser};
use serde::{Serialize, Serializer};
use std::time::Duration;

/// Drive vehicles [first-vehicle, first-vehicle + vehicles) against a VTOX ingest API.
///
/// Each vehicle makes one message of `--batch-size` samples every `--interval` (jittered),
/// phased so the slice never fires in one burst, and delivers it as `--delivery` says: by
/// default as a vehicle's telematics unit does (one upload at a time, the rest buffered and
/// retried), or at most once (every tick sent at once; one that finds all `--max-in-flight`
/// connections busy is dropped). Metrics go to stdout, one JSON line per `--report-every`,
/// cumulative since start, and a final line (`"final": true`) on exit.
#[derive(Debug, Clone, PartialEq, Parser, Serialize)]
#[command(name = "vtox-sim", version, about, long_about = None)]
pub struct SimArgs {
    /// Number of vehicles this instance drives.
    #[arg(long, short = 'n')]
    pub vehicles: u64,
    /// Fleet number of the first vehicle (vehicle IDs, models and faults follow from it).
    #[arg(long, default_value_t = 0)]
    pub first_vehicle: u64,
    /// Base URL of the ingest API, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub target: String,
    /// Instance number, reported in every message's metadata.
    #[arg(long, default_value_t = 0)]
    pub instance: u32,
    /// Agent (host) name, reported in every message's metadata [default: the host name].
    #[arg(long)]
    pub agent: Option<String>,
    /// Time between two messages of one vehicle.
    #[serde(serialize_with = "duration_flag")]
    #[arg(long, default_value = "1.2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Jitter window as a fraction of the interval (0.1 = each tick moves by up to ±5%).
    #[arg(long, default_value_t = 0.1)]
    pub jitter: f64,
    /// Samples per message.
    #[arg(long, default_value_t = 10)]
    pub batch_size: usize,
    /// Sampling rate of the samples, in Hz.
    #[arg(long, default_value_t = 50)]
    pub sampling_rate: u32,
    /// Percent of vehicles with a developing fault, e.g. insulation=5,bearing=3
    /// (turn_fault, insulation, bearing, eccentricity, broken_bar); the rest are normal.
    #[arg(long, default_value = "")]
    pub faults: String,
    /// The window after the run start in which fault onsets fall; `0s` makes every faulty
    /// vehicle faulty from its first message (its severity still grows from there), so that
    /// a short run already scores the diagnosis.
    #[serde(serialize_with = "duration_flag")]
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub fault_onset: Duration,
    /// Seed of every random choice: which vehicles fail and when, drive cycles, jitter.
    #[arg(long, default_value_t = 2024)]
    pub seed: u64,
    /// Stop after this long [default: run until SIGINT/SIGTERM].
    #[serde(serialize_with = "optional_duration_flag")]
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// A request without a complete answer after this long counts as failed (timeout).
    #[serde(serialize_with = "duration_flag")]
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How long a timed-out request's connection stays open for the answer a stalled target
    /// may still give. A late 200 stays a failure (timeout) but is counted as `late_accepted`,
    /// so the messages the target really took are known exactly. 0 closes it at once.
    #[serde(serialize_with = "duration_flag")]
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub late_window: Duration,
    /// Close a kept-alive connection idle this long instead of reusing it. Keep it below the
    /// target's own idle limit (uvicorn: 5 s), so that a request never races the server's
    /// close; a connection the server closed earlier is noticed before reuse anyway.
    #[serde(serialize_with = "duration_flag")]
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Also trust the CA certificates of this PEM file for an `https://` target (besides the
    /// system's roots), e.g. a backend's private CA.
    #[arg(long, value_name = "FILE")]
    pub target_ca: Option<std::path::PathBuf>,
    /// Accept any certificate from an `https://` target. Only for a test backend with a
    /// throwaway certificate: the traffic is encrypted but the server is not authenticated.
    /// Logged as a warning at start.
    #[arg(long)]
    pub target_insecure: bool,
    /// Send to the authenticated route with this file's token (one line) as a Bearer token.
    #[arg(long, value_name = "FILE", group = "auth")]
    pub auth_token_file: Option<std::path::PathBuf>,
    /// Send to the authenticated route with one Bearer token per vehicle, from lines
    /// `vehicle_id<TAB>token`; every vehicle of the slice must be listed.
    #[arg(long, value_name = "FILE", group = "auth")]
    pub vehicle_tokens: Option<std::path::PathBuf>,
    /// Send to the authenticated route with a token obtained by logging in at
    /// `URL/auth/token` (JSON username and password, as the VTOX backend does); a 401 later
    /// renews it once (one login at a time, whatever the number of vehicles). Needs
    /// --login-user and --login-password-file.
    #[arg(long, value_name = "URL", group = "auth")]
    pub login: Option<String>,
    /// User name for --login.
    #[arg(long, value_name = "USER", requires = "login")]
    pub login_user: Option<String>,
    /// File holding the password for --login (never give it as an argument).
    #[arg(long, value_name = "FILE", requires = "login")]
    pub login_password_file: Option<std::path::PathBuf>,
    /// Most requests outstanding at once (connections). At most once, a tick beyond it is
    /// dropped; store-and-forward, it waits in its vehicle's buffer.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// How messages reach the target. store-and-forward: each vehicle has one request in
    /// flight at most; what it makes meanwhile, or could not deliver, waits in its buffer and
    /// goes out in order, failures retried with jittered backoff (0.5 s doubling to 30 s).
    /// at-most-once: the open model, every tick sent at once and never retried.
    #[arg(long, value_enum, default_value_t = crate::delivery::Delivery::StoreAndForward)]
    pub delivery: crate::delivery::Delivery,
    /// Messages each vehicle keeps while it cannot deliver (store-and-forward); when full, the
    /// oldest waiting one is dropped and counted as `buffer_dropped`.
    #[arg(long, default_value_t = 600, value_name = "MESSAGES")]
    pub buffer: usize,
    /// Vehicles out of coverage, as SHARE%/DURATION: e.g. 5%/90s keeps about 5 % of vehicles
    /// offline at any moment, each outage lasting around 90 s (tunnels, garages). Offline
    /// vehicles keep making messages into their buffer and send them on return
    /// (store-and-forward only).
    #[arg(long, value_name = "SHARE%/DURATION")]
    pub dropouts: Option<String>,
    /// Time between two metric lines.
    #[serde(serialize_with = "duration_flag")]
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub report_every: Duration,
    /// Vehicle ID template: {plate} {model} {city} {serial} (= 202400000 + n) {n}.
    #[arg(long, default_value = crate::fleet::DEFAULT_ID_TEMPLATE)]
    pub id_template: String,
    /// Run start as Unix seconds: schedules, `seq` numbers and fault onsets count from here,
    /// so a restarted or moved slice continues where it was [default: now].
    #[arg(long)]
    pub run_start: Option<f64>,
    /// Stop sending when stdin closes or stays silent this long. `vtox-agent` keeps it alive
    /// with a byte a second, so that a simulator whose agent was killed or frozen never keeps
    /// driving vehicles the coordinator may already have moved elsewhere. Exits with code 3.
    #[serde(serialize_with = "optional_duration_flag")]
    #[arg(long, value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// Keep the running totals in this file (shared memory), so that they can be read exactly
    /// even after the process is killed. `vtox-agent` passes one per instance.
    #[arg(long, value_name = "PATH")]
    pub tally: Option<std::path::PathBuf>,
    /// Worker threads of the simulator's runtime [default: the cores available]. `vtox-agent`
    /// gives each of a host's processes its share of the cores; 1 runs everything on one
    /// thread, which sends the most messages per core.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = crate::process::LogFormat::Text)]
    pub log_format: crate::process::LogFormat,
}

fn duration_flag<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}s", d.as_secs_f64()))
}

fn optional_duration_flag<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => duration_flag(d, s),
        None => s.serialize_none(),
    }
}

impl SimArgs {
    /// The arguments that make `vtox-sim` parse back to this value (without the program name).
    pub fn to_args(&self) -> Vec<String> {
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(self) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for arg in SimArgs::command().get_arguments() {
            let (Some(long), Some(value)) = (arg.get_long(), fields.get(arg.get_id().as_str()))
            else {
                continue;
            };
            match value {
                serde_json::Value::Null | serde_json::Value::Bool(false) => {}
                serde_json::Value::Bool(true) => out.push(format!("--{long}")),
                serde_json::Value::String(text) => {
                    out.push(format!("--{long}"));
                    out.push(text.clone());
                }
                other => {
                    out.push(format!("--{long}"));
                    out.push(other.to_string());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_goes_through_the_command_line_and_back() {
        let mut a =
            SimArgs::try_parse_from(["vtox-sim", "--vehicles", "50", "--target", "http://h:1"])
                .unwrap();
        assert_eq!(
            SimArgs::try_parse_from(std::iter::once("vtox-sim".to_string()).chain(a.to_args()))
                .unwrap(),
            a
        );
        // Away from every default.
        a.first_vehicle = 150;
        a.instance = 3;
        a.agent = Some("host a".into());
        a.interval = Duration::from_millis(1500);
        a.jitter = 0.25;
        a.batch_size = 20;
        a.sampling_rate = 10_000;
        a.faults = "bearing=5,insulation=3".into();
        a.fault_onset = Duration::ZERO;
        a.seed = 7;
        a.duration = Some(Duration::from_secs_f64(12.345));
        a.timeout = Duration::from_secs(2);
        a.late_window = Duration::ZERO;
        a.max_in_flight = 9;
        a.delivery = crate::delivery::Delivery::AtMostOnce;
        a.buffer = 3;
        a.dropouts = Some("5%/90s".into());
        a.run_start = Some(1_796_000_000.25);
        a.lease = Some(Duration::from_millis(2500));
        a.tally = Some("/tmp/x y.tally".into());
        a.target_insecure = true;
        a.threads = Some(1);
        a.log_format = crate::process::LogFormat::Json;
        let args = a.to_args();
        let back =
            SimArgs::try_parse_from(std::iter::once("vtox-sim".to_string()).chain(args.clone()))
                .unwrap();
        assert_eq!(back, a, "{args:?}");
        // Every field is an argument: none is left for the agent to forget.
        let fields = match serde_json::to_value(&a).unwrap() {
            serde_json::Value::Object(m) => m.len(),
            _ => 0,
        };
        let ids = SimArgs::command()
            .get_arguments()
            .filter(|x| x.get_long().is_some())
            .count();
        assert_eq!(fields, ids);
    }
}
