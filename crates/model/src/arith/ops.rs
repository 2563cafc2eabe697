//! Every op's forward and backward, the loss and the SGD update, as the
//! sequences of binary32 operations `docs/arithmetic.md` defines. Matrix
//! products go through [`super::dispatch`]; everything else is elementwise
//! or a per-row reduction written as one loop in a fixed order, which the
//! compiler may vectorise across independent outputs but never reorders.

use crate::arith::dispatch::gemm_into;
use crate::arith::gemm::{Init, View};
use crate::arith::math;
use crate::arith::matrix::Matrix;
use crate::arith::threads::for_chunks;

/// The one NaN that leaves a stage (messages, states, weights files):
/// `0x7FC0_0000`. Which NaN an operation produces differs between CPUs
/// and compilers; whether it produces one does not.
pub const CANONICAL_NAN: u32 = 0x7fc0_0000;

/// `v` with any NaN replaced by [`CANONICAL_NAN`].
#[inline]
pub fn canonical(v: f32) -> f32 {
    if v.is_nan() {
        f32::from_bits(CANONICAL_NAN)
    } else {
        v
    }
}

/// `C = A·B`.
pub fn matmul(a: View<'_>, b: View<'_>) -> Matrix {
    let mut c = Matrix::zeros(a.rows(), b.cols());
    gemm_into(a, b, c.as_mut_slice(), Init::Zero);
    c
}

/// `y = x·W ⊕ b`: the product first, then the bias added to each row.
pub fn linear_forward(x: &Matrix, w: View<'_>, b: &[f32]) -> Matrix {
    let mut y = matmul(View::of(x), w);
    let n = y.cols();
    for row in y.as_mut_slice().chunks_exact_mut(n.max(1)) {
        for (v, bias) in row.iter_mut().zip(b) {
            *v += *bias;
        }
    }
    y
}

/// The gradients of `linear`: `dX = dY·Wᵀ` (when asked), `dW = Xᵀ·dY`,
/// `db = Σ_rows dY` (rows in order, from +0).
pub fn linear_backward(
    x: &Matrix,
    w: View<'_>,
    dy: &Matrix,
    need_dx: bool,
) -> (Option<Matrix>, Matrix, Vec<f32>) {
    let dx = need_dx.then(|| matmul(View::of(dy), w.t()));
    let dw = matmul(View::of(x).t(), View::of(dy));
    (dx, dw, sum_rows(dy))
}

/// `s[j] = Σ_i m[i, j]`, `i` in order from +0.
pub fn sum_rows(m: &Matrix) -> Vec<f32> {
    let mut s = vec![0.0f32; m.cols()];
    for row in m.as_slice().chunks_exact(m.cols().max(1)) {
        for (acc, v) in s.iter_mut().zip(row) {
            *acc += *v;
        }
    }
    s
}

/// `relu(x) = x if x > 0 or x is NaN, else +0`.
pub fn relu_forward(x: Matrix) -> Matrix {
    let mut y = x;
    let work = y.as_slice().len();
    for_chunks(y.as_mut_slice(), ELEMENTWISE_BLOCK, work, |_, block| {
        for v in block {
            *v = if *v > 0.0 || v.is_nan() { *v } else { 0.0 };
        }
    });
    y
}

/// Elements per task when an elementwise op shares its work between the
/// kernel threads (a multiple of 64: a task owns whole mask words).
const ELEMENTWISE_BLOCK: usize = 1 << 15;

/// Which values of a relu's output are `> 0`, one bit each (what its
/// backward needs, 32 times smaller than the output).
pub fn relu_mask(y: &Matrix) -> Vec<u64> {
    let v = y.as_slice();
    let mut mask = vec![0u64; v.len().div_ceil(64)];
    for_chunks(&mut mask, ELEMENTWISE_BLOCK / 64, v.len(), |i, block| {
        let values = &v[i * ELEMENTWISE_BLOCK..v.len().min((i + 1) * ELEMENTWISE_BLOCK)];
        for (word, chunk) in block.iter_mut().zip(values.chunks(64)) {
            *word = mask_word(chunk);
        }
    });
    mask
}

/// Bit `k` of the word: `chunk[k] > 0` (at most 64 values), built a byte
/// at a time so that the compiler turns each byte into one vector compare.
#[inline]
fn mask_word(chunk: &[f32]) -> u64 {
    let mut word = 0u64;
    for (k, eight) in chunk.chunks(8).enumerate() {
        let mut byte = 0u64;
        for (bit, x) in eight.iter().enumerate() {
            byte |= u64::from(*x > 0.0) << bit;
        }
        word |= byte << (8 * k);
    }
    word
}

/// `dX = dY where the mask's bit is set, else +0` ([`relu_mask`]; the
/// same as [`relu_backward`] with the output the mask was taken from).
pub fn relu_backward_masked(mask: &[u64], dy: Matrix) -> Matrix {
    let mut dx = dy;
    let words = ELEMENTWISE_BLOCK / 64;
    let work = dx.as_slice().len();
    for_chunks(dx.as_mut_slice(), ELEMENTWISE_BLOCK, work, |i, block| {
        let bits = mask.get(i * words..).unwrap_or_default();
        for (chunk, word) in block.chunks_mut(64).zip(bits) {
            for (bit, g) in chunk.iter_mut().enumerate() {
                // All ones where the bit is set (`g` kept, bit for bit,
                // NaNs included), else all zeros (+0): no branch.
                let keep = 0u32.wrapping_sub(((word >> bit) & 1) as u32);
                *g = f32::from_bits(g.to_bits() & keep);
            }
        }
    });
    dx
}

/// `dX = dY where y > 0, else +0`.
pub fn relu_backward(y: &Matrix, dy: Matrix) -> Matrix {
    let mut dx = dy;
    for (g, out) in dx.as_mut_slice().iter_mut().zip(y.as_slice()) {
        *g = if *out > 0.0 { *g } else { 0.0 };
    }
    dx
}

/// `(x ⊖ mean) ⊘ std`.
pub fn normalize_forward(x: Matrix, mean: f32, std: f32) -> Matrix {
    let mut y = x;
    y.map_in_place(|v| (v - mean) / std);
    y
}

/// `dX = dY ⊘ std`.
pub fn normalize_backward(dy: Matrix, std: f32) -> Matrix {
    let mut dx = dy;
    dx.map_in_place(|g| g / std);
    dx
}

/// Per row: `m = max` (first element, then each later one that is `>`),
/// `s = Σ exp(x_j ⊖ m)` in order from +0, `l = ln s`,
/// `y_j = (x_j ⊖ m) ⊖ l`.
pub fn log_softmax_forward(x: Matrix) -> Matrix {
    let mut y = x;
    let n = y.cols();
    for row in y.as_mut_slice().chunks_exact_mut(n.max(1)) {
        let mut m = row[0];
        for v in &row[1..] {
            if *v > m {
                m = *v;
            }
        }
        let mut s = 0.0f32;
        for v in row.iter() {
            s += math::exp(*v - m);
        }
        let l = math::ln(s);
        for v in row.iter_mut() {
            *v = (*v - m) - l;
        }
    }
    y
}

/// Per row: `S = Σ dY_j` in order from +0, `dX_j = dY_j ⊖ exp(y_j) ⊗ S`.
pub fn log_softmax_backward(y: &Matrix, dy: Matrix) -> Matrix {
    let mut dx = dy;
    let n = dx.cols();
    for (grow, yrow) in dx
        .as_mut_slice()
        .chunks_exact_mut(n.max(1))
        .zip(y.as_slice().chunks_exact(n.max(1)))
    {
        let mut s = 0.0f32;
        for g in grow.iter() {
            s += *g;
        }
        for (g, out) in grow.iter_mut().zip(yrow) {
            *g -= math::exp(*out) * s;
        }
    }
    dx
}

/// `c = (−1) ⊘ rows`, the factor of the mean negative log-likelihood.
fn nll_factor(rows: usize) -> f32 {
    -1.0 / rows as f32
}

/// `loss = (Σ_i y[i, t_i], i in order from +0) ⊗ c`, `c = −1 ⊘ rows`.
/// Labels are the caller's to check (one per row, each `< classes`).
pub fn nll_forward(y: &Matrix, labels: &[u32], rows: usize) -> f32 {
    let mut s = 0.0f32;
    for (i, t) in labels.iter().enumerate() {
        s += y.row(i)[*t as usize];
    }
    s * nll_factor(rows)
}

/// `dX[i, t_i] = c`, every other entry `+0`.
pub fn nll_backward(labels: &[u32], classes: usize, rows: usize) -> Matrix {
    let mut dx = Matrix::zeros(labels.len(), classes);
    let c = nll_factor(rows);
    for (row, t) in dx
        .as_mut_slice()
        .chunks_exact_mut(classes.max(1))
        .zip(labels)
    {
        row[*t as usize] = c;
    }
    dx
}

/// The multipliers of a `dropout` mask: for each value, `u = f32(r >> 8) ⊗
/// 2^−24` from the next `u32` `r` of a ChaCha8 stream seeded with `seed`;
/// the value is kept (multiplier `1 ⊘ (1 ⊖ p)`) when `u ≥ p`, else zeroed
/// (multiplier `+0`).
pub fn dropout_mask(seed: u64, len: usize, p: f32) -> Vec<f32> {
    use rand::RngCore;
    let scale = 1.0 / (1.0 - p);
    let mut r = crate::init::rng(seed);
    (0..len)
        .map(|_| {
            let u = (r.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
            if u >= p {
                scale
            } else {
                0.0
            }
        })
        .collect()
}

/// `y = x ⊗ m`, elementwise (dropout forward and backward).
pub fn mul_assign(x: &mut [f32], m: &[f32]) {
    for (v, k) in x.iter_mut().zip(m) {
        *v *= *k;
    }
}

/// `acc ⊕= g`, elementwise (the sum of a step's micro-batch gradients,
/// taken in micro-batch order by the caller).
pub fn add_assign(acc: &mut [f32], g: &[f32]) {
    for (a, v) in acc.iter_mut().zip(g) {
        *a += *v;
    }
}

/// One SGD step on one parameter tensor, PyTorch's rule: with momentum
/// `μ ≠ 0`, `v = g` on the first step and `v = μ ⊗ v ⊕ g` after, then
/// `p = p ⊖ lr ⊗ v`; without, `p = p ⊖ lr ⊗ g`.
pub fn sgd_step(p: &mut [f32], velocity: &mut Option<Vec<f32>>, g: Vec<f32>, lr: f32, mu: f32) {
    if mu != 0.0 {
        let v = match velocity.take() {
            Some(mut v) => {
                for (vi, gi) in v.iter_mut().zip(&g) {
                    *vi = mu * *vi + *gi;
                }
                v
            }
            None => g,
        };
        for (pi, vi) in p.iter_mut().zip(&v) {
            *pi -= lr * *vi;
        }
        *velocity = Some(v);
    } else {
        for (pi, gi) in p.iter_mut().zip(&g) {
            *pi -= lr * *gi;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relu ops against their one-loop definitions, on lengths around
    /// the block and word sizes, with NaNs and signed zeros, on one and on
    /// three threads: the same bits.
    #[test]
    fn relu_ops_match_their_definitions_on_any_thread_count() {
        let special = [
            f32::NAN,
            -0.0,
            0.0,
            -1.5,
            2.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
        ];
        for len in [
            1usize,
            63,
            64,
            65,
            1000,
            ELEMENTWISE_BLOCK,
            ELEMENTWISE_BLOCK + 65,
            3 * ELEMENTWISE_BLOCK + 7,
        ] {
            let x: Vec<f32> = (0..len)
                .map(|i| {
                    if i % 17 == 0 {
                        special[(i / 17) % special.len()]
                    } else {
                        ((i * 7919) % 2001) as f32 / 1000.0 - 1.0
                    }
                })
                .collect();
            let dy: Vec<f32> = (0..len).map(|i| (i % 13) as f32 - 6.5).collect();
            let want_y: Vec<u32> = x
                .iter()
                .map(|v| if *v > 0.0 || v.is_nan() { *v } else { 0.0 }.to_bits())
                .collect();
            let mut want_mask = vec![0u64; len.div_ceil(64)];
            for (i, v) in want_y.iter().enumerate() {
                want_mask[i / 64] |= u64::from(f32::from_bits(*v) > 0.0) << (i % 64);
            }
            let want_dx: Vec<u32> = dy
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let on = (want_mask[i / 64] >> (i % 64)) & 1 == 1;
                    if on { *g } else { 0.0 }.to_bits()
                })
                .collect();
            for threads in [1, 3] {
                let (y, mask, dx) = crate::arith::threads::with_count(threads, || {
                    let y = relu_forward(Matrix::new(1, len, x.clone()).unwrap());
                    let mask = relu_mask(&y);
                    let dx = relu_backward_masked(&mask, Matrix::new(1, len, dy.clone()).unwrap());
                    (y, mask, dx)
                })
                .unwrap();
                let bits =
                    |m: &Matrix| m.as_slice().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), want_y, "forward, {len} values, {threads} threads");
                assert_eq!(mask, want_mask, "mask, {len} values, {threads} threads");
                assert_eq!(
                    bits(&dx),
                    want_dx,
                    "backward, {len} values, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn log_softmax_rows_sum_to_one_and_survive_large_inputs() {
        let x = Matrix::new(2, 3, vec![1.0, 2.0, 3.0, 1000.0, -1000.0, 1000.0]).unwrap();
        let y = log_softmax_forward(x);
        for r in 0..2 {
            let s: f64 = y.row(r).iter().map(|v| f64::from(*v).exp()).sum();
            assert!((s - 1.0).abs() < 1e-6, "row {r}: {s}");
        }
        assert!((y.row(1)[0] - (-std::f32::consts::LN_2)).abs() < 1e-6);
    }

    #[test]
    fn relu_keeps_nan_and_zeroes_negative_zero() {
        let y = relu_forward(Matrix::new(1, 4, vec![-0.0, -1.0, 2.0, f32::NAN]).unwrap());
        assert_eq!(y.as_slice()[0].to_bits(), 0.0f32.to_bits());
        assert_eq!(y.as_slice()[1], 0.0);
        assert_eq!(y.as_slice()[2], 2.0);
        assert!(y.as_slice()[3].is_nan());
    }

    #[test]
    fn sgd_first_step_takes_the_gradient_as_velocity() {
        let mut p = vec![1.0f32, 2.0];
        let mut v = None;
        sgd_step(&mut p, &mut v, vec![0.5, -0.5], 0.1, 0.9);
        assert_eq!(p, vec![1.0 - 0.1 * 0.5, 2.0 + 0.1 * 0.5]);
        assert_eq!(v, Some(vec![0.5, -0.5]));
        sgd_step(&mut p, &mut v, vec![1.0, 1.0], 0.1, 0.9);
        assert_eq!(v, Some(vec![0.9 * 0.5 + 1.0, 0.9 * -0.5 + 1.0]));
    }

    #[test]
    fn canonical_replaces_every_nan_payload() {
        for bits in [0x7fc0_0001u32, 0xffc0_0000, 0x7f80_0001] {
            assert_eq!(canonical(f32::from_bits(bits)).to_bits(), CANONICAL_NAN);
        }
        assert_eq!(canonical(-0.0).to_bits(), (-0.0f32).to_bits());
    }
}
