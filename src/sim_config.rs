//! Every rule a simulator's flags must follow, once: `vtox-sim` checks its own command line with
//! it, and `run`, `ramp`, `plan` and the dashboard's forms check the command line their
//! simulators would get, so that a value every simulator would refuse is refused at once, in the
//! simulator's own words. Pure: files named by the flags are read by the simulator afterwards.

use crate::delivery::Delivery;
use crate::dropouts::Dropouts;
use crate::faults::FaultMix;
use crate::fleet::IdTemplate;
use crate::ingest::Target;
use crate::schedule::Schedule;
use crate::sim_args::SimArgs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The simulator's flags, checked and parsed.
#[derive(Debug, Clone)]
pub struct Checked {
    pub target: Target,
    pub faults: FaultMix,
    pub template: IdTemplate,
    pub schedule: Schedule,
    pub dropouts: Option<Dropouts>,
    /// `--run-start`, or None for "now".
    pub run_start: Option<SystemTime>,
    /// The login URL, when `--login` is given.
    pub login: Option<Target>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("--vehicles must be at least 1")]
    NoVehicles,
    #[error("--first-vehicle + --vehicles overflows")]
    Overflow,
    #[error("--vehicles {0} is more than one instance can drive")]
    TooManyVehicles(u64),
    #[error("--target: {0}")]
    Target(String),
    #[error("--faults: {0}")]
    Faults(String),
    #[error("--id-template: {0}")]
    Template(String),
    #[error("--interval/--jitter: {0}")]
    Schedule(String),
    #[error("--batch-size must be at least 1")]
    NoBatch,
    #[error("--sampling-rate must be at least 1 Hz")]
    NoSamplingRate,
    #[error("--max-in-flight must be at least 1")]
    NoInFlight,
    #[error("--buffer must be at least 1 message")]
    NoBuffer,
    #[error("--threads must be at least 1")]
    NoThreads,
    #[error("--dropouts needs --delivery store-and-forward: a vehicle out of coverage keeps its messages until it is back")]
    DropoutsNeedForwarding,
    #[error("--dropouts: {0}")]
    Dropouts(String),
    #[error("--timeout and --report-every must be greater than zero")]
    ZeroTime,
    #[error("--duration must be greater than zero")]
    ZeroDuration,
    #[error("--run-start {0} is not a Unix time")]
    RunStart(f64),
    #[error("--agent must not be empty")]
    EmptyAgent,
    #[error("--target-ca and --target-insecure need an https:// --target or --login")]
    TlsWithoutHttps,
    #[error("--target-insecure trusts everything: --target-ca would be ignored")]
    InsecureAndCa,
    #[error("--login needs --login-user and --login-password-file")]
    LoginIncomplete,
    #[error("--login-user must not be empty")]
    EmptyLoginUser,
    #[error("--login: {0}")]
    Login(String),
}

impl SimArgs {
    /// Checks every rule of the flags that needs no file; the simulator reads the files
    /// (tokens, passwords, CAs) after this.
    pub fn check(&self) -> Result<Checked, ConfigError> {
        self.check_counts()?;
        let target = Target::parse(&self.target).map_err(|e| ConfigError::Target(e.to_string()))?;
        let faults = self
            .faults
            .parse::<FaultMix>()
            .map_err(|e| ConfigError::Faults(e.to_string()))?
            .with_onset_window(self.fault_onset.as_secs_f64());
        let template = IdTemplate::parse(&self.id_template)
            .map_err(|e| ConfigError::Template(e.to_string()))?;
        let schedule = Schedule::new(self.interval.as_secs_f64(), self.jitter, self.seed)
            .map_err(|e| ConfigError::Schedule(e.to_string()))?;
        let dropouts = match &self.dropouts {
            None => None,
            Some(_) if self.delivery == Delivery::AtMostOnce => {
                return Err(ConfigError::DropoutsNeedForwarding)
            }
            Some(text) => Some(
                Dropouts::parse(text, self.seed)
                    .map_err(|e| ConfigError::Dropouts(e.to_string()))?,
            ),
        };
        let run_start = match self.run_start {
            None => None,
            Some(s) if s.is_finite() && s >= 0.0 => Some(UNIX_EPOCH + Duration::from_secs_f64(s)),
            Some(s) => return Err(ConfigError::RunStart(s)),
        };
        if self.agent.as_deref() == Some("") {
            return Err(ConfigError::EmptyAgent);
        }
        let login = self.check_login()?;
        let https = target.tls || login.as_ref().is_some_and(|l| l.tls);
        if (self.target_ca.is_some() || self.target_insecure) && !https {
            return Err(ConfigError::TlsWithoutHttps);
        }
        if self.target_insecure && self.target_ca.is_some() {
            return Err(ConfigError::InsecureAndCa);
        }
        Ok(Checked {
            target,
            faults,
            template,
            schedule,
            dropouts,
            run_start,
            login,
        })
    }

    /// The rules of sizes and counts.
    fn check_counts(&self) -> Result<(), ConfigError> {
        if self.vehicles == 0 {
            return Err(ConfigError::NoVehicles);
        }
        if self.first_vehicle.checked_add(self.vehicles).is_none() {
            return Err(ConfigError::Overflow);
        }
        if self.vehicles > u64::from(u32::MAX) {
            return Err(ConfigError::TooManyVehicles(self.vehicles));
        }
        let rules = [
            (self.batch_size == 0, ConfigError::NoBatch),
            (self.sampling_rate == 0, ConfigError::NoSamplingRate),
            (self.max_in_flight == 0, ConfigError::NoInFlight),
            (self.buffer == 0, ConfigError::NoBuffer),
            (self.threads == Some(0), ConfigError::NoThreads),
            (
                self.timeout.is_zero() || self.report_every.is_zero(),
                ConfigError::ZeroTime,
            ),
            (
                self.duration.is_some_and(|d| d.is_zero()),
                ConfigError::ZeroDuration,
            ),
        ];
        match rules.into_iter().find(|(broken, _)| *broken) {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    fn check_login(&self) -> Result<Option<Target>, ConfigError> {
        let Some(url) = &self.login else {
            return Ok(None);
        };
        match (&self.login_user, &self.login_password_file) {
            (Some(u), Some(_)) if u.is_empty() => Err(ConfigError::EmptyLoginUser),
            (Some(_), Some(_)) => Target::parse(url)
                .map(Some)
                .map_err(|e| ConfigError::Login(e.to_string())),
            _ => Err(ConfigError::LoginIncomplete),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> SimArgs {
        let mut all = vec!["vtox-sim", "--vehicles", "10", "--target", "http://h:8000"];
        all.extend_from_slice(extra);
        SimArgs::try_parse_from(all).unwrap()
    }

    #[test]
    fn the_defaults_pass() {
        let c = args(&[]).check().unwrap();
        assert_eq!((c.target.host.as_str(), c.target.port), ("h", 8000));
        assert!(c.dropouts.is_none() && c.run_start.is_none() && c.login.is_none());
    }

    #[test]
    fn every_rule_refuses_in_its_own_words() {
        let cases: &[(&[&str], ConfigError)] = &[
            (&["--batch-size", "0"], ConfigError::NoBatch),
            (&["--sampling-rate", "0"], ConfigError::NoSamplingRate),
            (&["--max-in-flight", "0"], ConfigError::NoInFlight),
            (&["--buffer", "0"], ConfigError::NoBuffer),
            (&["--threads", "0"], ConfigError::NoThreads),
            (&["--timeout", "0s"], ConfigError::ZeroTime),
            (&["--report-every", "0s"], ConfigError::ZeroTime),
            (&["--duration", "0s"], ConfigError::ZeroDuration),
            (&["--agent", ""], ConfigError::EmptyAgent),
            (&["--run-start=-5"], ConfigError::RunStart(-5.0)),
            (
                &["--dropouts", "5%/90s", "--delivery", "at-most-once"],
                ConfigError::DropoutsNeedForwarding,
            ),
            (&["--target-insecure"], ConfigError::TlsWithoutHttps),
            (&["--login", "http://h:8000"], ConfigError::LoginIncomplete),
            (
                &[
                    "--login",
                    "http://h:8000",
                    "--login-user",
                    "",
                    "--login-password-file",
                    "/p",
                ],
                ConfigError::EmptyLoginUser,
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(args(extra).check().unwrap_err(), *want, "{extra:?}");
        }
        // Rules whose words come from the parser they use.
        for (extra, starts) in [
            (&["--interval", "0s"][..], "--interval/--jitter: "),
            (&["--faults", "rust=5"][..], "--faults: "),
            (&["--id-template", "{nope}"][..], "--id-template: "),
            (&["--dropouts", "90%/1s"][..], "--dropouts: "),
        ] {
            let e = args(extra).check().unwrap_err().to_string();
            assert!(e.starts_with(starts), "{extra:?}: {e}");
        }
        let mut bad = args(&[]);
        bad.vehicles = 0;
        assert_eq!(bad.check().unwrap_err(), ConfigError::NoVehicles);
        bad = args(&[]);
        bad.target = "ftp://x".into();
        assert!(bad
            .check()
            .unwrap_err()
            .to_string()
            .starts_with("--target: "));
        bad = args(&[]);
        bad.first_vehicle = u64::MAX;
        assert_eq!(bad.check().unwrap_err(), ConfigError::Overflow);
    }

    #[test]
    fn tls_flags_need_https_and_do_not_go_together() {
        let mut a = args(&["--target-insecure", "--target-ca", "/ca.pem"]);
        a.target = "https://h:8443".into();
        assert_eq!(a.check().unwrap_err(), ConfigError::InsecureAndCa);
        let mut a = args(&["--target-ca", "/ca.pem"]);
        a.target = "https://h:8443".into();
        assert!(a.check().is_ok());
        // An https login alone is reason enough for a CA.
        let a = args(&[
            "--target-ca",
            "/ca.pem",
            "--login",
            "https://auth:8443",
            "--login-user",
            "fleet",
            "--login-password-file",
            "/p",
        ]);
        assert!(a.check().unwrap().login.is_some_and(|l| l.tls));
    }
}
