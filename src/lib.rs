//! vtox: the pure core shared by every binary (fleet identity, telemetry model, schedules,
//! metrics, ingest contract, the ramp's judgements). Nothing here opens a socket, spawns a
//! process or reads a clock on its own: callers pass time in, which keeps every piece testable
//! in isolation. The two exceptions are named edge modules the binaries share so that none
//! carries a copy: `process` (logs, signals, the metrics endpoint) and `hardware` (what the
//! host offers).

pub mod agent;
pub mod auth;
pub mod backlog;
pub mod capacity;
pub mod charts;
pub mod control;
pub mod counters;
pub mod dashboard;
pub mod delivery;
pub mod dropouts;
pub mod duration;
pub mod faults;
pub mod fleet;
pub mod hardware;
pub mod http1;
pub mod ingest;
pub mod login;
pub mod metrics;
pub mod plan;
pub mod planning;
pub mod process;
pub mod prometheus;
pub mod ramp;
pub mod redis_url;
pub mod render;
pub mod rng;
pub mod schedule;
pub mod score;
pub mod signal;
pub mod sim_args;
pub mod sim_config;
pub mod sink;
pub mod supervision;
pub mod target_tls;
pub mod telemetry;
pub mod wire;
