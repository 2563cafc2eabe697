//! `batch_norm2d` (`docs/arithmetic.md`, "batch_norm2d"): per channel `c`
//! over the `m = n·h·w` values of a batch, sums over `(n, y, x)` in order
//! from `+0`:
//!
//! ```text
//! mean = (Σ X) ⊘ f32(m)
//! S    = Σ (X ⊖ mean) ⊗ (X ⊖ mean)
//! var  = S ⊘ f32(m);   var_u = S ⊘ f32(m − 1)          (running statistics)
//! inv  = 1 ⊘ √(var ⊕ eps)
//! X̂    = (X ⊖ mean) ⊗ inv;   Y = X̂ ⊗ γ ⊕ β
//! ```
//!
//! Evaluation uses the running statistics: `Y = ((X ⊖ rm) ⊗ (1 ⊘ √(rv ⊕ eps))) ⊗ γ ⊕ β`.
//! Backward: `dβ = Σ dY`, `dγ = Σ dY ⊗ X̂`, `a = dβ ⊘ f32(m)`,
//! `b = dγ ⊘ f32(m)`, `dX = ((dY ⊖ a) ⊖ X̂ ⊗ b) ⊗ (γ ⊗ inv)`. Channels are
//! independent: the work is shared between threads by channels (the
//! reductions) and by planes (the elementwise passes).

use rayon::prelude::*;

use crate::arith::matrix::Matrix;
use crate::arith::threads;

/// What a training forward of `batch_norm2d` gives and keeps.
#[derive(Debug, Clone)]
pub struct BnForward {
    /// The output.
    pub y: Matrix,
    /// `X̂`, for the backward.
    pub xhat: Matrix,
    /// `inv` per channel, for the backward.
    pub inv: Vec<f32>,
    /// The batch mean per channel.
    pub mean: Vec<f32>,
    /// The unbiased batch variance per channel (for the running statistics).
    pub var_unbiased: Vec<f32>,
}

/// Applies `f` to every channel index, on the kernel threads when the
/// batch is large, collecting the results in channel order.
fn per_channel<T: Send>(c: usize, work: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if work >= 1 << 16 && threads::count() > 1 {
        threads::install(|| (0..c).into_par_iter().map(&f).collect())
    } else {
        (0..c).map(f).collect()
    }
}

/// Runs `f(plane, channel)` over every `[h, w]` plane of `out` (`[n, c·hw]`).
fn per_plane(
    out: &mut [f32],
    c: usize,
    hw: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync + Send,
) {
    if c == 0 {
        return;
    }
    let work = out.len();
    threads::for_chunks(out, hw, work, |i, o| f(i, i % c, o));
}

/// [`per_plane`] writing two outputs of the same shape in one pass:
/// `f(plane, channel, a, b)`.
fn per_plane2(
    a: &mut [f32],
    b: &mut [f32],
    c: usize,
    hw: usize,
    f: impl Fn(usize, usize, &mut [f32], &mut [f32]) + Sync + Send,
) {
    if hw == 0 || c == 0 {
        return;
    }
    if a.len() >= threads::PARALLEL_VALUES && threads::count() > 1 {
        threads::install(|| {
            a.par_chunks_mut(hw)
                .zip(b.par_chunks_mut(hw))
                .enumerate()
                .for_each(|(i, (x, y))| f(i, i % c, x, y))
        });
    } else {
        a.chunks_mut(hw)
            .zip(b.chunks_mut(hw))
            .enumerate()
            .for_each(|(i, (x, y))| f(i, i % c, x, y));
    }
}

/// Channels summed side by side: each channel's sum is one sequential
/// reduction, but the [`BLOCK`] of a block are independent, so one loop
/// keeps them all going (a single sum waits on each addition).
const BLOCK: usize = 8;

/// For each channel `ch` of the block starting at `ch0`:
/// `Σ_(n, y, x) f(X[n, ch, y, x], n·c·hw + ch·hw + y·w + x, ch)` in order
/// from `+0` (channels past the last are computed on the last and
/// dropped by the caller).
fn block_sums(
    x: &[f32],
    c: usize,
    hw: usize,
    ch0: usize,
    f: impl Fn(f32, usize, usize) -> f32,
) -> [f32; BLOCK] {
    let n = x.len().checked_div(c * hw).unwrap_or(0);
    block_sums_n(n, c, hw, ch0, |at, ch| [f(x[at], at, ch)]).map(|[s]| s)
}

/// `(Σ g, Σ g ⊗ h)` for each channel of the block starting at `ch0`, in
/// one pass over `g` and `h` (the backward's `dβ` and `dγ`): each sum
/// takes its terms in the order [`block_sums`] does, so the bits are those
/// of two separate passes.
fn block_sums_pair(g: &[f32], h: &[f32], c: usize, hw: usize, ch0: usize) -> [[f32; 2]; BLOCK] {
    let n = g.len().checked_div(c * hw).unwrap_or(0);
    block_sums_n(n, c, hw, ch0, |at, _| [g[at], g[at] * h[at]])
}

/// `S` sums side by side for each channel of the block starting at `ch0`
/// over `n` images: sum `s` of channel `ch` is `Σ_(n, y, x) f(at, ch)[s]`
/// (`at = n·c·hw + ch·hw + y·w + x`) in that order from `+0`.
fn block_sums_n<const S: usize>(
    n: usize,
    c: usize,
    hw: usize,
    ch0: usize,
    f: impl Fn(usize, usize) -> [f32; S],
) -> [[f32; S]; BLOCK] {
    let mut acc = [[0.0f32; S]; BLOCK];
    let chs: [usize; BLOCK] = std::array::from_fn(|b| (ch0 + b).min(c.saturating_sub(1)));
    for img in 0..n {
        let starts: [usize; BLOCK] = std::array::from_fn(|b| (img * c + chs[b]) * hw);
        for j in 0..hw {
            for b in 0..BLOCK {
                let at = starts[b] + j;
                for (a, v) in acc[b].iter_mut().zip(f(at, chs[b])) {
                    *a += v;
                }
            }
        }
    }
    acc
}

/// [`block_sums`] over every channel, in blocks, on the kernel threads
/// when the batch is large: `out[ch]` for each channel.
fn channel_sums(
    x: &[f32],
    c: usize,
    hw: usize,
    f: impl Fn(f32, usize, usize) -> f32 + Sync + Send,
) -> Vec<f32> {
    let blocks = per_channel(c.div_ceil(BLOCK), x.len(), |bi| {
        block_sums(x, c, hw, bi * BLOCK, &f)
    });
    blocks.into_iter().flatten().take(c).collect()
}

/// The training forward, with batch statistics. `m = rows·hw` must be at
/// least 2 (the caller checks: PyTorch refuses one value per channel too).
pub fn forward_train(
    x: Matrix,
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> BnForward {
    let m = x.rows() * hw;
    let (mf, mf1) = (m as f32, m.saturating_sub(1) as f32);
    let data = x.as_slice();
    let mean: Vec<f32> = channel_sums(data, c, hw, |v, _, _| v)
        .into_iter()
        .map(|s| s / mf)
        .collect();
    let squares = channel_sums(data, c, hw, |v, _, ch| {
        let d = v - mean[ch];
        d * d
    });
    let inv: Vec<f32> = squares
        .iter()
        .map(|s| 1.0 / (*s / mf + eps).sqrt())
        .collect();
    let var_unbiased: Vec<f32> = squares.iter().map(|s| *s / mf1).collect();
    // Y takes X's buffer (X is not needed after this op): one buffer
    // fewer to allocate and clear.
    let mut xhat = Matrix::zeros(x.rows(), x.cols());
    let mut y = x;
    per_plane2(
        xhat.as_mut_slice(),
        y.as_mut_slice(),
        c,
        hw,
        |_, ch, xh, out| {
            for (h, v) in xh.iter_mut().zip(out.iter_mut()) {
                *h = (*v - mean[ch]) * inv[ch];
                *v = *h * gamma[ch] + beta[ch];
            }
        },
    );
    BnForward {
        y,
        xhat,
        inv,
        mean,
        var_unbiased,
    }
}

/// The evaluation forward, with the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn forward_eval(
    x: Matrix,
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
) -> Matrix {
    let inv: Vec<f32> = running_var
        .iter()
        .map(|v| 1.0 / (*v + eps).sqrt())
        .collect();
    let mut y = x;
    per_plane(y.as_mut_slice(), c, hw, |_, ch, out| {
        for v in out.iter_mut() {
            *v = ((*v - running_mean[ch]) * inv[ch]) * gamma[ch] + beta[ch];
        }
    });
    y
}

/// The backward: `(dX if need_dx, dγ, dβ)`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dy: Matrix,
    xhat: &Matrix,
    inv: &[f32],
    gamma: &[f32],
    c: usize,
    hw: usize,
    need_dx: bool,
) -> (Option<Matrix>, Vec<f32>, Vec<f32>) {
    let m = (dy.rows() * hw) as f32;
    let (g, xh) = (dy.as_slice(), xhat.as_slice());
    let pairs: Vec<[f32; 2]> = per_channel(c.div_ceil(BLOCK), g.len(), |bi| {
        block_sums_pair(g, xh, c, hw, bi * BLOCK)
    })
    .into_iter()
    .flatten()
    .take(c)
    .collect();
    let dbeta: Vec<f32> = pairs.iter().map(|p| p[0]).collect();
    let dgamma: Vec<f32> = pairs.iter().map(|p| p[1]).collect();
    let dx = need_dx.then(|| {
        let a: Vec<f32> = dbeta.iter().map(|v| *v / m).collect();
        let b: Vec<f32> = dgamma.iter().map(|v| *v / m).collect();
        let k: Vec<f32> = gamma.iter().zip(inv).map(|(g, i)| *g * *i).collect();
        // dX takes dY's buffer (the sums above were its last readers).
        let mut dx = dy;
        per_plane(dx.as_mut_slice(), c, hw, |i, ch, out| {
            for (gv, xv) in out.iter_mut().zip(&xh[i * hw..(i + 1) * hw]) {
                *gv = ((*gv - a[ch]) - *xv * b[ch]) * k[ch];
            }
        });
        dx
    });
    (dx, dgamma, dbeta)
}

/// One running statistic's update: `r = (1 ⊖ momentum) ⊗ r ⊕ momentum ⊗ batch`.
pub fn update_running(running: &mut [f32], batch: &[f32], momentum: f32) {
    let keep = 1.0 - momentum;
    for (r, b) in running.iter_mut().zip(batch) {
        *r = keep * *r + momentum * *b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_statistics_normalise_each_channel() {
        // Two images, two channels of 2 values.
        let x = Matrix::new(2, 4, vec![1.0, 3.0, 10.0, 10.0, 5.0, 7.0, 20.0, 30.0]).unwrap();
        let f = forward_train(x, 2, 2, &[1.0, 2.0], &[0.0, 1.0], 0.0);
        assert_eq!(f.mean, vec![4.0, 17.5]);
        // channel 0: values 1 3 5 7, var 5, unbiased 20/3.
        assert_eq!(f.var_unbiased[0], 20.0 / 3.0);
        assert!((f.inv[0] - 1.0 / 5f32.sqrt()).abs() < 1e-7);
        let y0: Vec<f32> = [0usize, 1, 4, 5]
            .iter()
            .map(|i| f.y.as_slice()[*i])
            .collect();
        let mean: f32 = y0.iter().sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6, "{y0:?}");
    }

    #[test]
    fn running_statistics_move_by_momentum() {
        let mut r = vec![0.0f32, 1.0];
        update_running(&mut r, &[1.0, 3.0], 0.1);
        assert_eq!(r, vec![0.1, 0.9f32 * 1.0 + 0.1 * 3.0]);
    }
}
