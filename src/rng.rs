//! Deterministic hashing and a small fast PRNG. Vehicle identity, fault schedules and jitter
//! must be pure functions of (seed, n, ...) that never change between releases, so they use
//! this fixed SplitMix64 rather than a library generator whose stream may change.

/// One SplitMix64 step: a strong 64-bit mixer, cheap and stable forever.
pub const fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of a seed, a vehicle number and a purpose tag (so that different decisions about the
/// same vehicle are independent).
pub const fn hash3(seed: u64, n: u64, tag: u64) -> u64 {
    mix64(mix64(mix64(seed) ^ n) ^ tag.wrapping_mul(0xA24B_AED4_963E_E407))
}

/// Maps a hash to [0, 1) using its top 53 bits.
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform draw in [lo, hi) from a hash.
pub fn uniform(h: u64, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * unit(h)
}

/// SplitMix64 as a stream generator, for measurement noise.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn next_f64(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// Approximately normal noise (sum of four uniforms, variance matched): cheap, bounded,
    /// and plenty for sensor noise.
    pub fn gauss(&mut self) -> f64 {
        let s = self.next_f64() + self.next_f64() + self.next_f64() + self.next_f64();
        (s - 2.0) * 1.732_050_807_568_877_2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_across_releases() {
        // Pinned values: changing them would change every fleet's identity and faults.
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
        assert_ne!(hash3(1, 2, 3), hash3(1, 3, 2));
    }

    #[test]
    fn unit_is_in_range_and_gauss_has_unit_variance() {
        let mut r = Rng::new(7);
        let n = 100_000;
        let (mut sum, mut sq) = (0.0, 0.0);
        for _ in 0..n {
            let u = r.next_f64();
            assert!((0.0..1.0).contains(&u));
            let g = r.gauss();
            sum += g;
            sq += g * g;
        }
        let mean = sum / n as f64;
        let var = sq / n as f64 - mean * mean;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "var {var}");
    }
}
