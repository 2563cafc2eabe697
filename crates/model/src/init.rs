//! Seeded, PyTorch-style parameter initialisation.
//!
//! `nn.Linear` draws its weight with `kaiming_uniform_(a = √5)` and its bias
//! from `U(−1/√fan_in, 1/√fan_in)`; both bounds come to `1/√fan_in`. We draw
//! from ChaCha8 streams derived from one seed, so a stage initialises to the
//! same bits wherever it runs.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Derives an independent 64-bit seed for sub-stream `index` (SplitMix64
/// finaliser over the pair), used for per-stage, per-op and per-epoch
/// streams.
pub fn derive_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed
        ^ index
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The RNG for a seed.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A uniform draw in `[-bound, bound)` with 24 random mantissa bits.
pub fn uniform(rng: &mut impl RngCore, bound: f32) -> f32 {
    let unit = (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
    bound * (2.0 * unit - 1.0)
}

/// Weight `[fan_in, fan_out]` and bias `[fan_out]` of a linear op, as
/// PyTorch's `nn.Linear` would draw them (from our RNG).
pub fn linear(seed: u64, fan_in: usize, fan_out: usize) -> (Vec<f32>, Vec<f32>) {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let mut w_rng = rng(derive_seed(seed, 0));
    let mut b_rng = rng(derive_seed(seed, 1));
    let weight = (0..fan_in * fan_out)
        .map(|_| uniform(&mut w_rng, bound))
        .collect();
    let bias = (0..fan_out).map(|_| uniform(&mut b_rng, bound)).collect();
    (weight, bias)
}

/// Weight `[out, fan_in]` (a `conv2d` weight `[out, in, k, k]`, drawn in
/// that order) and bias `[out]`, with PyTorch's bounds for `fan_in = in·k·k`.
pub fn conv(seed: u64, fan_in: usize, out: usize) -> (Vec<f32>, Vec<f32>) {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let mut w_rng = rng(derive_seed(seed, 0));
    let mut b_rng = rng(derive_seed(seed, 1));
    let weight = (0..fan_in * out)
        .map(|_| uniform(&mut w_rng, bound))
        .collect();
    let bias = (0..out).map(|_| uniform(&mut b_rng, bound)).collect();
    (weight, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_init_is_seeded_and_bounded() {
        let (w1, b1) = linear(7, 784, 128);
        let (w2, b2) = linear(7, 784, 128);
        assert_eq!(w1, w2);
        assert_eq!(b1, b2);
        let (w3, _) = linear(8, 784, 128);
        assert_ne!(w1, w3);
        let bound = 1.0 / 784f32.sqrt();
        assert!(w1.iter().chain(&b1).all(|v| v.abs() <= bound));
        let mean: f32 = w1.iter().sum::<f32>() / w1.len() as f32;
        assert!(mean.abs() < 0.002, "mean {mean}");
        let var: f32 = w1.iter().map(|v| v * v).sum::<f32>() / w1.len() as f32;
        let expect = bound * bound / 3.0;
        assert!(
            (var - expect).abs() < 0.05 * expect,
            "var {var} vs {expect}"
        );
    }

    #[test]
    fn derived_seeds_differ() {
        assert_ne!(derive_seed(1, 0), derive_seed(1, 1));
        assert_ne!(derive_seed(1, 0), derive_seed(2, 0));
    }
}
