//! Small signal-analysis tools: least-squares tone fitting and symmetrical components. They
//! prove in tests that each injected fault leaves the signature an analyzer looks for, and can
//! check a captured message the same way.

use std::f64::consts::PI;

/// Amplitude and phase of one fitted sinusoid `amp · sin(2π f t + phase)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tone {
    pub freq: f64,
    pub amp: f64,
    pub phase: f64,
}

/// Fits `x[i] ≈ c + Σ a_k cos(2π f_k t_i) + b_k sin(2π f_k t_i)` by least squares with
/// `t_i = i / fs`. Unlike a DFT bin, this separates tones closer than the window's resolution
/// when their frequencies are known, which is how a motor analyzer that reads the speed uses
/// them. Returns None if the frequencies make the system singular (e.g. a duplicate).
pub fn fit_tones(x: &[f64], fs: f64, freqs: &[f64]) -> Option<Vec<Tone>> {
    let m = 1 + 2 * freqs.len();
    // Normal equations A^T A p = A^T x, built row by row to avoid storing A.
    let mut ata = vec![0.0; m * m];
    let mut atx = vec![0.0; m];
    let mut row = vec![0.0; m];
    for (i, &xi) in x.iter().enumerate() {
        let t = i as f64 / fs;
        row[0] = 1.0;
        for (k, f) in freqs.iter().enumerate() {
            let w = 2.0 * PI * f * t;
            row[1 + 2 * k] = w.cos();
            row[2 + 2 * k] = w.sin();
        }
        for r in 0..m {
            atx[r] += row[r] * xi;
            for c in 0..m {
                ata[r * m + c] += row[r] * row[c];
            }
        }
    }
    let p = solve(ata, atx, m)?;
    Some(
        freqs
            .iter()
            .enumerate()
            .map(|(k, &freq)| {
                let (a, b) = (p[1 + 2 * k], p[2 + 2 * k]);
                // a cos + b sin = amp sin(w t + phase) with amp = hypot(a, b), phase = atan2(a, b)
                Tone {
                    freq,
                    amp: a.hypot(b),
                    phase: a.atan2(b),
                }
            })
            .collect(),
    )
}

/// Gaussian elimination with partial pivoting on a dense m×m system.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, m: usize) -> Option<Vec<f64>> {
    for col in 0..m {
        let pivot =
            (col..m).max_by(|&i, &j| a[i * m + col].abs().total_cmp(&a[j * m + col].abs()))?;
        if a[pivot * m + col].abs() < 1e-9 {
            return None;
        }
        if pivot != col {
            for c in 0..m {
                a.swap(pivot * m + c, col * m + c);
            }
            b.swap(pivot, col);
        }
        for r in col + 1..m {
            let f = a[r * m + col] / a[col * m + col];
            for c in col..m {
                a[r * m + c] -= f * a[col * m + c];
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = vec![0.0; m];
    for r in (0..m).rev() {
        let s: f64 = (r + 1..m).map(|c| a[r * m + c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r * m + r];
    }
    Some(x)
}

/// Positive-, negative- and zero-sequence amplitudes of a three-phase signal at frequency f
/// (phases ordered a, b, c lagging by 120°). A healthy balanced machine has only a positive
/// sequence; a turn fault adds a negative one; leakage to ground adds a zero one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sequence {
    pub positive: f64,
    pub negative: f64,
    pub zero: f64,
}

pub fn sequence_components(
    ia: &[f64],
    ib: &[f64],
    ic: &[f64],
    fs: f64,
    f: f64,
) -> Option<Sequence> {
    // Phasor of amp·sin(wt + phase) as a complex number amp·e^{j·phase}.
    let phasor = |x: &[f64]| -> Option<(f64, f64)> {
        let t = fit_tones(x, fs, &[f])?;
        let tone = t.first()?;
        Some((tone.amp * tone.phase.cos(), tone.amp * tone.phase.sin()))
    };
    let (pa, pb, pc) = (phasor(ia)?, phasor(ib)?, phasor(ic)?);
    let rot = |(re, im): (f64, f64), ang: f64| {
        (
            re * ang.cos() - im * ang.sin(),
            re * ang.sin() + im * ang.cos(),
        )
    };
    let add3 = |x: (f64, f64), y: (f64, f64), z: (f64, f64)| {
        ((x.0 + y.0 + z.0) / 3.0, (x.1 + y.1 + z.1) / 3.0)
    };
    let a = 2.0 * PI / 3.0;
    let pos = add3(pa, rot(pb, a), rot(pc, 2.0 * a));
    let neg = add3(pa, rot(pb, 2.0 * a), rot(pc, a));
    let zero = add3(pa, pb, pc);
    let mag = |(re, im): (f64, f64)| re.hypot(im);
    Some(Sequence {
        positive: mag(pos),
        negative: mag(neg),
        zero: mag(zero),
    })
}

/// Root mean square after removing the mean.
pub fn ac_rms(x: &[f64]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_close_tones_exactly() {
        let fs = 10_000.0;
        let x: Vec<f64> = (0..1000)
            .map(|i| {
                let t = i as f64 / fs;
                0.5 + 10.0 * (2.0 * PI * 100.0 * t).sin() + 0.7 * (2.0 * PI * 93.0 * t + 1.0).sin()
            })
            .collect();
        let t = fit_tones(&x, fs, &[100.0, 93.0, 107.0]).unwrap();
        assert!((t[0].amp - 10.0).abs() < 1e-6);
        assert!((t[1].amp - 0.7).abs() < 1e-6);
        assert!((t[1].phase - 1.0).abs() < 1e-6);
        assert!(t[2].amp < 1e-6);
        assert!(fit_tones(&x, fs, &[100.0, 100.0]).is_none());
    }

    #[test]
    fn sequences_of_balanced_and_unbalanced_sets() {
        let fs = 10_000.0;
        let gen = |k: f64, neg: f64, zero: f64| -> Vec<f64> {
            (0..1000)
                .map(|i| {
                    let w = 2.0 * PI * 50.0 * i as f64 / fs;
                    let ph = 2.0 * PI * k / 3.0;
                    5.0 * (w - ph).sin() + neg * (w + ph).sin() + zero * w.sin()
                })
                .collect()
        };
        let s = sequence_components(
            &gen(0.0, 0.0, 0.0),
            &gen(1.0, 0.0, 0.0),
            &gen(2.0, 0.0, 0.0),
            fs,
            50.0,
        )
        .unwrap();
        assert!((s.positive - 5.0).abs() < 1e-6 && s.negative < 1e-6 && s.zero < 1e-6);
        let s = sequence_components(
            &gen(0.0, 1.0, 0.3),
            &gen(1.0, 1.0, 0.3),
            &gen(2.0, 1.0, 0.3),
            fs,
            50.0,
        )
        .unwrap();
        assert!((s.negative - 1.0).abs() < 1e-6 && (s.zero - 0.3).abs() < 1e-6);
    }
}
