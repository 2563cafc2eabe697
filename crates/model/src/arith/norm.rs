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
    if hw == 0 || c == 0 {
        return;
    }
    if out.len() >= 1 << 16 && threads::count() > 1 {
        threads::install(|| {
            out.par_chunks_mut(hw)
                .enumerate()
                .for_each(|(i, o)| f(i, i % c, o))
        });
    } else {
        out.chunks_mut(hw)
            .enumerate()
            .for_each(|(i, o)| f(i, i % c, o));
    }
}

/// `Σ_(n, y, x) f(X[n, ch, y, x], n·c·hw + ch·hw + y·w + x)` in order from `+0`.
fn channel_sum(x: &[f32], c: usize, hw: usize, ch: usize, f: impl Fn(f32, usize) -> f32) -> f32 {
    let mut s = 0.0f32;
    let n = x.len().checked_div(c * hw).unwrap_or(0);
    for img in 0..n {
        let start = (img * c + ch) * hw;
        for (j, v) in x[start..start + hw].iter().enumerate() {
            s += f(*v, start + j);
        }
    }
    s
}

/// The training forward, with batch statistics. `m = rows·hw` must be at
/// least 2 (the caller checks: PyTorch refuses one value per channel too).
pub fn forward_train(
    x: &Matrix,
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> BnForward {
    let m = x.rows() * hw;
    let (mf, mf1) = (m as f32, m.saturating_sub(1) as f32);
    let data = x.as_slice();
    let stats = per_channel(c, data.len(), |ch| {
        let mean = channel_sum(data, c, hw, ch, |v, _| v) / mf;
        let s = channel_sum(data, c, hw, ch, |v, _| {
            let d = v - mean;
            d * d
        });
        let var = s / mf;
        let inv = 1.0 / (var + eps).sqrt();
        (mean, inv, s / mf1)
    });
    let mean: Vec<f32> = stats.iter().map(|s| s.0).collect();
    let inv: Vec<f32> = stats.iter().map(|s| s.1).collect();
    let var_unbiased: Vec<f32> = stats.iter().map(|s| s.2).collect();
    let mut xhat = Matrix::zeros(x.rows(), x.cols());
    per_plane(xhat.as_mut_slice(), c, hw, |i, ch, out| {
        for (o, v) in out.iter_mut().zip(&data[i * hw..(i + 1) * hw]) {
            *o = (*v - mean[ch]) * inv[ch];
        }
    });
    let mut y = Matrix::zeros(x.rows(), x.cols());
    let xh = xhat.as_slice();
    per_plane(y.as_mut_slice(), c, hw, |i, ch, out| {
        for (o, v) in out.iter_mut().zip(&xh[i * hw..(i + 1) * hw]) {
            *o = *v * gamma[ch] + beta[ch];
        }
    });
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
    x: &Matrix,
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
    let data = x.as_slice();
    let mut y = Matrix::zeros(x.rows(), x.cols());
    per_plane(y.as_mut_slice(), c, hw, |i, ch, out| {
        for (o, v) in out.iter_mut().zip(&data[i * hw..(i + 1) * hw]) {
            *o = ((*v - running_mean[ch]) * inv[ch]) * gamma[ch] + beta[ch];
        }
    });
    y
}

/// The backward: `(dX if need_dx, dγ, dβ)`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dy: &Matrix,
    xhat: &Matrix,
    inv: &[f32],
    gamma: &[f32],
    c: usize,
    hw: usize,
    need_dx: bool,
) -> (Option<Matrix>, Vec<f32>, Vec<f32>) {
    let m = (dy.rows() * hw) as f32;
    let (g, xh) = (dy.as_slice(), xhat.as_slice());
    let sums = per_channel(c, g.len(), |ch| {
        let dbeta = channel_sum(g, c, hw, ch, |v, _| v);
        let dgamma = channel_sum(g, c, hw, ch, |v, at| v * xh[at]);
        (dgamma, dbeta)
    });
    let dgamma: Vec<f32> = sums.iter().map(|s| s.0).collect();
    let dbeta: Vec<f32> = sums.iter().map(|s| s.1).collect();
    let dx = need_dx.then(|| {
        let a: Vec<f32> = dbeta.iter().map(|v| *v / m).collect();
        let b: Vec<f32> = dgamma.iter().map(|v| *v / m).collect();
        let k: Vec<f32> = gamma.iter().zip(inv).map(|(g, i)| *g * *i).collect();
        let mut dx = Matrix::zeros(dy.rows(), dy.cols());
        per_plane(dx.as_mut_slice(), c, hw, |i, ch, out| {
            let range = i * hw..(i + 1) * hw;
            for ((o, gv), xv) in out.iter_mut().zip(&g[range.clone()]).zip(&xh[range]) {
                *o = ((*gv - a[ch]) - *xv * b[ch]) * k[ch];
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
        let f = forward_train(&x, 2, 2, &[1.0, 2.0], &[0.0, 1.0], 0.0);
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
