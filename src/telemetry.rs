//! The telemetry model (DESIGN.md, "Telemetry model"): each vehicle follows a drive cycle,
//! its winding temperature follows the load with a first-order thermal lag, and its injected
//! fault shapes the three phase currents, vibration and temperature the way the VTOX analyzers
//! expect to see it.

use crate::faults::{FaultKind, FaultMix, FaultPlan};
use crate::fleet::MODELS;
use crate::rng::{hash3, mix64, uniform, Rng};
use std::f64::consts::PI;

pub const AMBIENT_C: f64 = 25.0;
/// Winding thermal time constant. Minutes, as in a real traction motor: a fault's heating shows
/// as a trend across many messages, not a jump.
pub const THERMAL_TAU_S: f64 = 240.0;
/// Defect frequency of the bearing's outer race as a multiple of shaft speed.
pub const BEARING_DEFECT_ORDER: f64 = 3.6;

/// Where the motor is on its drive cycle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OperatingPoint {
    pub rpm: f64,
    /// Torque demand as a fraction of rated, 0..1.
    pub load: f64,
}

impl OperatingPoint {
    /// Electrical frequency with two pole pairs.
    pub fn f_e(&self) -> f64 {
        self.rpm / 30.0
    }

    /// Shaft rotation frequency.
    pub fn f_r(&self) -> f64 {
        self.rpm / 60.0
    }

    /// Rotor slip: rises with load, which is why broken-bar sidebands move apart under load.
    pub fn slip(&self) -> f64 {
        0.02 + 0.03 * self.load
    }
}

/// A vehicle's repeating urban cycle: stop, accelerate, cruise, brake, stop. Its period,
/// phase and cruise speed are drawn per vehicle so the fleet is never in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriveCycle {
    period_s: f64,
    offset_s: f64,
    cruise_rpm: f64,
}

fn smoothstep(x: f64) -> f64 {
    let x = x.clamp(0.0, 1.0);
    x * x * (3.0 - 2.0 * x)
}

impl DriveCycle {
    pub fn for_vehicle(seed: u64, n: u64) -> Self {
        let period_s = uniform(hash3(seed, n, 101), 90.0, 240.0);
        DriveCycle {
            period_s,
            offset_s: uniform(hash3(seed, n, 102), 0.0, period_s),
            cruise_rpm: uniform(hash3(seed, n, 103), 1200.0, 4800.0),
        }
    }

    pub fn at(&self, t: f64) -> OperatingPoint {
        let u = ((t + self.offset_s) / self.period_s).rem_euclid(1.0);
        let c = self.cruise_rpm;
        let (rpm, load) = if !(0.08..0.92).contains(&u) {
            (0.0, 0.0)
        } else if u < 0.25 {
            let x = (u - 0.08) / 0.17;
            (c * smoothstep(x), 0.65 + 0.25 * (PI * x).sin())
        } else if u < 0.75 {
            let x = (u - 0.25) / 0.5;
            (
                c * (1.0 + 0.08 * (6.0 * PI * x).sin()),
                0.35 + 0.1 * (4.0 * PI * x).sin(),
            )
        } else {
            let x = (u - 0.75) / 0.17;
            (c * (1.0 - smoothstep(x)), 0.15)
        };
        OperatingPoint { rpm, load }
    }
}

/// One sample point of a message; `ingest::write_body` writes it with the backend's field
/// names and a fixed number of decimals per quantity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub t: f64,
    pub ia: f64,
    pub ib: f64,
    pub ic: f64,
    pub vx: f64,
    pub vy: f64,
    pub vz: f64,
    pub temp: f64,
    /// Whole rpm.
    pub rpm: f64,
}

/// Rated and no-load phase current amplitudes of a model, in amperes.
fn currents_of_model(model: usize) -> (f64, f64) {
    let scale = 0.8 + 0.05 * model as f64;
    (14.0 * scale, 3.0 * scale)
}

/// Steady-state winding temperature for a load and an injected fault.
pub fn thermal_target(load: f64, kind: FaultKind, severity: f64) -> f64 {
    let extra = match kind {
        FaultKind::TurnFault => 20.0 * severity,
        FaultKind::Insulation => 50.0 * severity,
        _ => 0.0,
    };
    AMBIENT_C + 45.0 * load + extra
}

/// Everything that shapes one message's samples.
#[derive(Debug, Clone, Copy)]
pub struct SignalInput {
    pub op: OperatingPoint,
    pub temp_c: f64,
    pub kind: FaultKind,
    pub severity: f64,
    /// Model index into `MODELS` (sets the current rating).
    pub model: usize,
    /// Time of the first sample since the run start (drives the waveform phases).
    pub t_rel: f64,
    /// Unix time of the first sample (the `时间` field).
    pub t_abs: f64,
    pub fs: f64,
    pub points: usize,
}

/// Synthesizes the samples of one message into `out` (cleared first).
pub fn synthesize(input: &SignalInput, rng: &mut Rng, out: &mut Vec<Sample>) {
    out.clear();
    let SignalInput {
        op,
        temp_c,
        kind,
        severity: s,
        model,
        t_rel,
        t_abs,
        fs,
        points,
    } = *input;
    let (i_rated, i_nl) = currents_of_model(model);
    let running = op.rpm > 1.0;
    let amp = if running {
        i_nl + (i_rated - i_nl) * op.load
    } else {
        0.0
    };
    let (fe, fr) = (op.f_e(), op.f_r());
    let fbd = BEARING_DEFECT_ORDER * fr;
    let slip = op.slip();
    let tau = 2.0 * PI;
    let phase_shift = [0.0, tau / 3.0, 2.0 * tau / 3.0];
    let s_of = |k: FaultKind| if kind == k { s } else { 0.0 };
    let (turn, insul, bearing, ecc, bar) = (
        s_of(FaultKind::TurnFault),
        s_of(FaultKind::Insulation),
        s_of(FaultKind::Bearing),
        s_of(FaultKind::Eccentricity),
        s_of(FaultKind::BrokenBar),
    );
    let vib_sigma = (0.02 + 0.03 * op.rpm / 6000.0) * (1.0 + 2.0 * bearing);
    let (cos_pk, sin_pk) = (phase_shift.map(f64::cos), phase_shift.map(f64::sin));
    // Axis phases of the vibration tones: fixed, so that X, Y and Z are not identical.
    let (cos_ax, sin_ax) = (
        [1.0, 1.1f64.cos(), 2.2f64.cos()],
        [0.0, 1.1f64.sin(), 2.2f64.sin()],
    );
    let radial = [1.0, 1.0, 0.4];
    let imbalance = 0.01 * (op.rpm / 3000.0);
    let any_fault = s > 0.0 && kind != FaultKind::Normal;
    for i in 0..points {
        let dt = i as f64 / fs;
        let t = t_rel + dt;
        // One sin/cos pair per tone and sample; each phase and axis is a rotation of it.
        let (sin_t, cos_t) = (tau * fe * t).sin_cos();
        let (sin_r, cos_r) = (tau * fr * t).sin_cos();
        let mut phase = [0.0f64; 3];
        for (k, cur) in phase.iter_mut().enumerate() {
            let (cp, sp) = (cos_pk[k], sin_pk[k]);
            let mut v = amp * (sin_t * cp - cos_t * sp);
            if running && any_fault {
                let pk = phase_shift[k];
                if turn > 0.0 {
                    // Shorted turns unbalance the winding: a negative-sequence current, and
                    // (star point isolated) no zero sequence, which keeps it apart from leakage.
                    v += 0.15 * turn * amp * (sin_t * cp + cos_t * sp);
                }
                if insul > 0.0 {
                    // Leakage to ground is common to all phases: a zero-sequence current.
                    v += 0.35 * insul * (tau * fe * t + 0.3).sin();
                }
                if ecc > 0.0 {
                    v += 0.08
                        * ecc
                        * amp
                        * ((tau * (fe + fr) * t - pk).sin() + (tau * (fe - fr) * t - pk).sin());
                }
                if bar > 0.0 {
                    let (lo, hi) = ((1.0 - 2.0 * slip) * fe, (1.0 + 2.0 * slip) * fe);
                    v += 0.1 * bar * amp * ((tau * lo * t - pk).sin() + (tau * hi * t - pk).sin());
                }
                if bearing > 0.0 {
                    v += 0.04
                        * bearing
                        * amp
                        * ((tau * (fe + fbd) * t - pk).sin() + (tau * (fe - fbd) * t - pk).sin());
                }
            }
            *cur = v + 0.05 * rng.gauss();
        }
        let mut vib = [0.0f64; 3];
        for (axis, v) in vib.iter_mut().enumerate() {
            let mut x = vib_sigma * rng.gauss();
            if running {
                // sin(2π f_r t + axis phase)
                let shaft = sin_r * cos_ax[axis] + cos_r * sin_ax[axis];
                x += (imbalance + 0.25 * ecc) * radial[axis] * shaft;
                if any_fault {
                    let ph = axis as f64 * 1.1;
                    if bearing > 0.0 {
                        x += 0.3 * bearing * (tau * fbd * t + ph).sin();
                    }
                    if bar > 0.0 {
                        x += 0.05 * bar * (tau * 2.0 * slip * fe * t + ph).sin();
                    }
                    if turn > 0.0 {
                        x += 0.03 * turn * (tau * 2.0 * fe * t + ph).sin();
                    }
                }
            }
            *v = x;
        }
        out.push(Sample {
            t: t_abs + dt,
            ia: phase[0],
            ib: phase[1],
            ic: phase[2],
            vx: vib[0],
            vy: vib[1],
            vz: vib[2],
            temp: temp_c + 0.05 * rng.gauss(),
            rpm: op.rpm.round(),
        });
    }
}

/// What one message injected: the ground truth that goes into its metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Truth {
    pub kind: FaultKind,
    pub severity: f64,
    pub op: OperatingPoint,
}

/// One vehicle's evolving state: its drive cycle and fault plan (pure), and its winding
/// temperature (the only memory). Noise is drawn per message from (seed, n, seq), so a message
/// made now can be synthesized later (a vehicle's buffered message, sent when it can be) with
/// exactly the samples it would have had.
#[derive(Debug, Clone)]
pub struct VehicleModel {
    pub n: u64,
    pub model: usize,
    pub cycle: DriveCycle,
    pub plan: FaultPlan,
    temp_c: f64,
    last_t: f64,
    noise: u64,
}

impl VehicleModel {
    pub fn new(seed: u64, n: u64, mix: &FaultMix) -> Self {
        Self::with_plan(seed, n, FaultPlan::for_vehicle(mix, seed, n))
    }

    pub fn with_plan(seed: u64, n: u64, plan: FaultPlan) -> Self {
        VehicleModel {
            n,
            model: (n % MODELS.len() as u64) as usize,
            cycle: DriveCycle::for_vehicle(seed, n),
            plan,
            temp_c: f64::NAN,
            last_t: f64::NAN,
            noise: hash3(seed, n, 104),
        }
    }

    pub fn temp_c(&self) -> f64 {
        self.temp_c
    }

    /// Advances the thermal state to `t_rel` (seconds since the run start), as a message made
    /// then does, and returns the winding temperature the message carries.
    pub fn advance(&mut self, t_rel: f64) -> f64 {
        let op = self.cycle.at(t_rel);
        let (kind, severity) = self.plan.state(t_rel);
        let target = thermal_target(op.load, kind, severity);
        if self.temp_c.is_nan() {
            // A vehicle that joins mid-run starts warm rather than cold: closer to the truth of
            // a car already on the road than an ambient start would be.
            self.temp_c = thermal_target(0.35, kind, severity);
        } else {
            let dt = (t_rel - self.last_t).max(0.0);
            self.temp_c += (target - self.temp_c) * (1.0 - (-dt / THERMAL_TAU_S).exp());
        }
        self.last_t = t_rel;
        self.temp_c
    }

    /// The samples of message `seq`, made at `t_rel` (Unix time `t_abs`) with winding
    /// temperature `temp_c` (from `advance`): a pure function of its arguments.
    #[allow(clippy::too_many_arguments)]
    pub fn render(
        &self,
        seq: u64,
        t_rel: f64,
        t_abs: f64,
        temp_c: f64,
        fs: f64,
        points: usize,
        out: &mut Vec<Sample>,
    ) -> Truth {
        let op = self.cycle.at(t_rel);
        let (kind, severity) = self.plan.state(t_rel);
        let input = SignalInput {
            op,
            temp_c,
            kind,
            severity,
            model: self.model,
            t_rel,
            t_abs,
            fs,
            points,
        };
        let mut rng = Rng::new(mix64(self.noise ^ seq.wrapping_mul(0xD6E8_FEB8_6659_FD93)));
        synthesize(&input, &mut rng, out);
        Truth { kind, severity, op }
    }

    /// Advances to `t_rel` and synthesizes message `seq`, whose first sample is at `t_rel`
    /// (Unix time `t_abs`).
    pub fn message(
        &mut self,
        seq: u64,
        t_rel: f64,
        t_abs: f64,
        fs: f64,
        points: usize,
        out: &mut Vec<Sample>,
    ) -> Truth {
        let temp_c = self.advance(t_rel);
        self.render(seq, t_rel, t_abs, temp_c, fs, points, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{ac_rms, fit_tones, sequence_components};

    const FS: f64 = 10_000.0;
    const POINTS: usize = 1000;
    const OP: OperatingPoint = OperatingPoint {
        rpm: 3000.0,
        load: 0.6,
    };

    fn signal(kind: FaultKind, severity: f64) -> Vec<Sample> {
        let input = SignalInput {
            op: OP,
            temp_c: 60.0,
            kind,
            severity,
            model: 0,
            t_rel: 12.34,
            t_abs: 1_764_320_000.0,
            fs: FS,
            points: POINTS,
        };
        let mut out = Vec::new();
        synthesize(&input, &mut Rng::new(5), &mut out);
        out
    }

    fn col(s: &[Sample], f: impl Fn(&Sample) -> f64) -> Vec<f64> {
        s.iter().map(f).collect()
    }

    /// Sideband amplitude relative to the fundamental, fitting both jointly.
    fn sideband_ratio(s: &[Sample], lo: f64, hi: f64) -> f64 {
        let ia = col(s, |x| x.ia);
        let t = fit_tones(&ia, FS, &[OP.f_e(), lo, hi]).unwrap();
        (t[1].amp + t[2].amp) / 2.0 / t[0].amp
    }

    fn tone_amp(x: &[f64], f: f64) -> f64 {
        fit_tones(x, FS, &[f]).unwrap()[0].amp
    }

    #[test]
    fn broken_bar_shows_slip_sidebands() {
        let (fe, slip) = (OP.f_e(), OP.slip());
        let (lo, hi) = ((1.0 - 2.0 * slip) * fe, (1.0 + 2.0 * slip) * fe);
        let faulty = sideband_ratio(&signal(FaultKind::BrokenBar, 1.0), lo, hi);
        let normal = sideband_ratio(&signal(FaultKind::Normal, 0.0), lo, hi);
        assert!(faulty > 0.08, "faulty {faulty}");
        assert!(normal < 0.01, "normal {normal}");
        let half = sideband_ratio(&signal(FaultKind::BrokenBar, 0.5), lo, hi);
        assert!(
            (half / faulty - 0.5).abs() < 0.1,
            "scales with severity: {half} vs {faulty}"
        );
    }

    #[test]
    fn eccentricity_shows_shaft_sidebands_and_vibration() {
        let (fe, fr) = (OP.f_e(), OP.f_r());
        let f = signal(FaultKind::Eccentricity, 1.0);
        let n = signal(FaultKind::Normal, 0.0);
        assert!(sideband_ratio(&f, fe - fr, fe + fr) > 0.06);
        assert!(sideband_ratio(&n, fe - fr, fe + fr) < 0.01);
        let vf = tone_amp(&col(&f, |x| x.vx), fr);
        let vn = tone_amp(&col(&n, |x| x.vx), fr);
        assert!(vf > 0.2 && vn < 0.03, "vibration at f_r: {vf} vs {vn}");
    }

    #[test]
    fn turn_fault_shows_negative_sequence_and_heat() {
        let seq = |s: &[Sample]| {
            sequence_components(
                &col(s, |x| x.ia),
                &col(s, |x| x.ib),
                &col(s, |x| x.ic),
                FS,
                OP.f_e(),
            )
            .unwrap()
        };
        let f = seq(&signal(FaultKind::TurnFault, 1.0));
        let n = seq(&signal(FaultKind::Normal, 0.0));
        assert!(f.negative / f.positive > 0.1, "faulty {f:?}");
        assert!(n.negative / n.positive < 0.01, "normal {n:?}");
        assert!(
            thermal_target(0.5, FaultKind::TurnFault, 1.0)
                > thermal_target(0.5, FaultKind::Normal, 0.0) + 15.0
        );
    }

    #[test]
    fn insulation_heats_the_winding_and_leaks_current() {
        let seq = |s: &[Sample]| {
            sequence_components(
                &col(s, |x| x.ia),
                &col(s, |x| x.ib),
                &col(s, |x| x.ic),
                FS,
                OP.f_e(),
            )
            .unwrap()
        };
        assert!(seq(&signal(FaultKind::Insulation, 1.0)).zero > 0.3);
        assert!(seq(&signal(FaultKind::Normal, 0.0)).zero < 0.02);
        // Through the thermal lag: a vehicle at constant severity 1 settles 50 °C above its twin.
        let mut faulty =
            VehicleModel::with_plan(1, 0, FaultPlan::constant(FaultKind::Insulation, 1.0));
        let mut healthy = VehicleModel::with_plan(1, 0, FaultPlan::NORMAL);
        let mut buf = Vec::new();
        let mut t = 0.0;
        let (mut first_gap, mut gap) = (None, 0.0);
        let mut seq = 0;
        while t < 3600.0 {
            faulty.message(seq, t, 0.0, 50.0, 10, &mut buf);
            healthy.message(seq, t, 0.0, 50.0, 10, &mut buf);
            seq += 1;
            gap = faulty.temp_c() - healthy.temp_c();
            first_gap.get_or_insert(gap);
            t += 1.2;
        }
        assert!((gap - 50.0).abs() < 1.0, "settled gap {gap}");
    }

    #[test]
    fn bearing_shows_defect_frequency_in_vibration_and_current() {
        let fbd = BEARING_DEFECT_ORDER * OP.f_r();
        let f = signal(FaultKind::Bearing, 1.0);
        let n = signal(FaultKind::Normal, 0.0);
        let vf = tone_amp(&col(&f, |x| x.vz), fbd);
        let vn = tone_amp(&col(&n, |x| x.vz), fbd);
        assert!(vf > 0.2 && vn < 0.02, "vibration at f_bd: {vf} vs {vn}");
        assert!(ac_rms(&col(&f, |x| x.vy)) > 2.0 * ac_rms(&col(&n, |x| x.vy)));
        assert!(sideband_ratio(&f, OP.f_e() - fbd, OP.f_e() + fbd) > 0.03);
        assert!(sideband_ratio(&n, OP.f_e() - fbd, OP.f_e() + fbd) < 0.01);
    }

    #[test]
    fn normal_vehicles_carry_no_signature_of_any_fault() {
        // A fleet vehicle without a fault, at the same operating point as the faulty twins.
        let n = signal(FaultKind::Normal, 0.0);
        let seq = sequence_components(
            &col(&n, |x| x.ia),
            &col(&n, |x| x.ib),
            &col(&n, |x| x.ic),
            FS,
            OP.f_e(),
        )
        .unwrap();
        assert!(seq.negative / seq.positive < 0.01 && seq.zero < 0.02);
        assert!(
            (seq.positive - (3.0 * 0.8 + 11.0 * 0.8 * 0.6)).abs() < 0.1,
            "amplitude follows load: {seq:?}"
        );
    }

    #[test]
    fn drive_cycle_is_plausible_and_pure() {
        let c = DriveCycle::for_vehicle(3, 17);
        assert_eq!(c, DriveCycle::for_vehicle(3, 17));
        let (mut stopped, mut moving, mut max_rpm) = (0, 0, 0.0f64);
        for i in 0..2400 {
            let op = c.at(i as f64 * 0.5);
            assert!((0.0..=1.0).contains(&op.load) && op.rpm >= 0.0);
            if op.rpm == 0.0 {
                stopped += 1
            } else {
                moving += 1
            }
            max_rpm = max_rpm.max(op.rpm);
        }
        assert!(stopped > 100 && moving > 1000 && max_rpm < 5500.0);
    }

    #[test]
    fn samples_are_timed_at_the_sampling_rate() {
        let mut v = VehicleModel::new(1, 3, &FaultMix::none());
        let mut buf = Vec::new();
        v.message(0, 100.0, 1_764_320_000.0, 50.0, 10, &mut buf);
        assert_eq!(buf.len(), 10);
        assert!((buf[1].t - buf[0].t - 0.02).abs() < 1e-6);
        assert!((buf[9].t - 1_764_320_000.18).abs() < 1e-6);
        assert_eq!(buf[0].rpm, buf[0].rpm.round());
    }

    #[test]
    fn a_message_synthesized_later_has_the_samples_it_had_when_made() {
        let mix: FaultMix = "bearing=50".parse().unwrap();
        let mut now = VehicleModel::new(7, 11, &mix);
        let mut later = VehicleModel::new(7, 11, &mix);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut kept = Vec::new();
        for seq in 0..20u64 {
            let t = seq as f64 * 1.2;
            now.message(seq, t, 1.7e9 + t, 50.0, 10, &mut a);
            kept.push((seq, t, later.advance(t), a.clone()));
        }
        // Made at their ticks, synthesized afterwards and out of step with making.
        for (seq, t, temp, made) in kept.iter().rev() {
            later.render(*seq, *t, 1.7e9 + t, *temp, 50.0, 10, &mut b);
            assert_eq!(&b, made, "seq {seq}");
        }
        // Noise differs from message to message.
        now.message(20, 24.0, 1.7e9, 50.0, 10, &mut a);
        now.message(21, 24.0, 1.7e9, 50.0, 10, &mut b);
        assert_ne!(a, b);
    }
}
