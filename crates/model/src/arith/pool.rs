//! Pooling, forward and backward (`docs/arithmetic.md`, "Pooling"): each
//! `[h, w]` plane of each image on its own; the work is shared between
//! threads by planes.
//!
//! - `max_pool2d`: the window in row-major order, padding as `−∞`; the
//!   max of the reductions (the first element, then each later one that is
//!   `>`); backward: `dX` starts at `+0` and each output, in row-major
//!   order, adds its gradient to the input its max came from (nothing for
//!   a max that is padding).
//! - `avg_pool2d`: the sum of the window in row-major order (padding as
//!   `+0` terms) `⊘ f32(k·k)`; backward: each output, in row-major order,
//!   adds `dY ⊘ f32(k·k)` to every input of its window, in row-major order.
//! - `global_avg_pool`: `(Σ_(y,x) X[c,y,x]) ⊘ f32(h·w)`; backward
//!   `dX[c,y,x] = dY[c] ⊘ f32(h·w)`.

use rayon::prelude::*;

use crate::arith::matrix::Matrix;
use crate::arith::threads;

/// The geometry of a pooling op: planes `[h, w]` of `c` channels, square
/// windows of side `k`, stride `s`, padding `p` (`2p ≤ k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeom {
    /// Channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Window side.
    pub k: usize,
    /// Stride.
    pub s: usize,
    /// Padding.
    pub p: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
}

/// An argmax that fell on the padding.
pub const NO_INPUT: u32 = u32::MAX;

impl PoolGeom {
    /// The geometry, output size derived; `None` when it does not fit.
    pub fn new(c: usize, h: usize, w: usize, k: usize, s: usize, p: usize) -> Option<Self> {
        if c == 0 || k == 0 || s == 0 || 2 * p > k || h + 2 * p < k || w + 2 * p < k {
            return None;
        }
        Some(PoolGeom {
            c,
            h,
            w,
            k,
            s,
            p,
            ho: (h + 2 * p - k) / s + 1,
            wo: (w + 2 * p - k) / s + 1,
        })
    }

    fn window(&self, y: usize, x: usize) -> impl Iterator<Item = Option<usize>> + '_ {
        let (y0, x0) = (
            (y * self.s) as isize - self.p as isize,
            (x * self.s) as isize - self.p as isize,
        );
        (0..self.k).flat_map(move |ky| {
            (0..self.k).map(move |kx| {
                let (iy, ix) = (y0 + ky as isize, x0 + kx as isize);
                (iy >= 0 && ix >= 0 && iy < self.h as isize && ix < self.w as isize)
                    .then(|| iy as usize * self.w + ix as usize)
            })
        })
    }
}

/// Runs `f(plane_index, out_plane)` over the planes of `out` (each `len`
/// values), on the kernel threads when the work is large.
fn per_plane(out: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let work = out.len();
    threads::for_chunks(out, len, work, f);
}

/// `max_pool2d`: the output `[batch, c·ho·wo]` and, per output, the index
/// in its input plane of its max ([`NO_INPUT`] for padding).
pub fn max_pool_forward(x: &Matrix, g: &PoolGeom) -> (Matrix, Vec<u32>) {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    let mut y = Matrix::zeros(x.rows(), g.c * ohw);
    let mut arg = vec![NO_INPUT; x.rows() * g.c * ohw];
    let src = x.as_slice();
    let fill = |i: usize, (vals, idx): (&mut [f32], &mut [u32])| {
        let plane = &src[i * hw..(i + 1) * hw];
        if g.p == 0 {
            // Every window lies inside the plane: the same order, without
            // bounds per element.
            for y in 0..g.ho {
                for x in 0..g.wo {
                    let base = y * g.s * g.w + x * g.s;
                    let (mut m, mut at) = (plane[base], base);
                    for ky in 0..g.k {
                        let row = &plane[base + ky * g.w..base + ky * g.w + g.k];
                        for (kx, v) in row.iter().enumerate() {
                            if *v > m {
                                m = *v;
                                at = base + ky * g.w + kx;
                            }
                        }
                    }
                    vals[y * g.wo + x] = m;
                    idx[y * g.wo + x] = at as u32;
                }
            }
            return;
        }
        for y in 0..g.ho {
            for x in 0..g.wo {
                let mut m = f32::NEG_INFINITY;
                let mut at = NO_INPUT;
                for (j, pos) in g.window(y, x).enumerate() {
                    let v = pos.map_or(f32::NEG_INFINITY, |p| plane[p]);
                    if j == 0 || v > m {
                        m = v;
                        at = pos.map_or(NO_INPUT, |p| p as u32);
                    }
                }
                vals[y * g.wo + x] = m;
                idx[y * g.wo + x] = at;
            }
        }
    };
    if ohw > 0 {
        let out = y.as_mut_slice();
        if out.len() >= 1 << 16 && threads::count() > 1 {
            threads::install(|| {
                out.par_chunks_mut(ohw)
                    .zip(arg.par_chunks_mut(ohw))
                    .enumerate()
                    .for_each(|(i, pair)| fill(i, pair))
            });
        } else {
            out.chunks_mut(ohw)
                .zip(arg.chunks_mut(ohw))
                .enumerate()
                .for_each(|(i, pair)| fill(i, pair));
        }
    }
    (y, arg)
}

/// The input gradient of `max_pool2d`.
pub fn max_pool_backward(dy: &Matrix, arg: &[u32], g: &PoolGeom) -> Matrix {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    let mut dx = Matrix::zeros(dy.rows(), g.c * hw);
    let src = dy.as_slice();
    per_plane(dx.as_mut_slice(), hw, |i, out| {
        let grads = &src[i * ohw..(i + 1) * ohw];
        for (gv, a) in grads.iter().zip(&arg[i * ohw..(i + 1) * ohw]) {
            if *a != NO_INPUT {
                out[*a as usize] += *gv;
            }
        }
    });
    dx
}

/// `avg_pool2d` (padding counted as `+0` terms of the window).
pub fn avg_pool_forward(x: &Matrix, g: &PoolGeom) -> Matrix {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    let area = (g.k * g.k) as f32;
    let mut y = Matrix::zeros(x.rows(), g.c * ohw);
    let src = x.as_slice();
    per_plane(y.as_mut_slice(), ohw, |i, out| {
        let plane = &src[i * hw..(i + 1) * hw];
        for y in 0..g.ho {
            for x in 0..g.wo {
                let mut s = 0.0f32;
                for pos in g.window(y, x) {
                    s += pos.map_or(0.0, |p| plane[p]);
                }
                out[y * g.wo + x] = s / area;
            }
        }
    });
    y
}

/// The input gradient of `avg_pool2d`.
pub fn avg_pool_backward(dy: &Matrix, g: &PoolGeom) -> Matrix {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    let area = (g.k * g.k) as f32;
    let mut dx = Matrix::zeros(dy.rows(), g.c * hw);
    let src = dy.as_slice();
    per_plane(dx.as_mut_slice(), hw, |i, out| {
        let grads = &src[i * ohw..(i + 1) * ohw];
        for y in 0..g.ho {
            for x in 0..g.wo {
                let share = grads[y * g.wo + x] / area;
                for p in g.window(y, x).flatten() {
                    out[p] += share;
                }
            }
        }
    });
    dx
}

/// `global_avg_pool`: `[batch, c·hw]` to `[batch, c]`.
pub fn global_avg_forward(x: &Matrix, c: usize, hw: usize) -> Matrix {
    let area = hw as f32;
    let mut y = Matrix::zeros(x.rows(), c);
    for (out, v) in y
        .as_mut_slice()
        .iter_mut()
        .zip(x.as_slice().chunks_exact(hw.max(1)))
    {
        let mut s = 0.0f32;
        for e in v {
            s += *e;
        }
        *out = s / area;
    }
    y
}

/// The input gradient of `global_avg_pool`.
pub fn global_avg_backward(dy: &Matrix, c: usize, hw: usize) -> Matrix {
    let area = hw as f32;
    let mut dx = Matrix::zeros(dy.rows(), c * hw);
    for (plane, g) in dx
        .as_mut_slice()
        .chunks_exact_mut(hw.max(1))
        .zip(dy.as_slice())
    {
        plane.fill(*g / area);
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_takes_the_first_maximum_and_routes_the_gradient_there() {
        let g = PoolGeom::new(1, 2, 4, 2, 2, 0).unwrap();
        let x = Matrix::new(1, 8, vec![1.0, 3.0, 5.0, 5.0, 3.0, 2.0, 0.0, 5.0]).unwrap();
        let (y, arg) = max_pool_forward(&x, &g);
        assert_eq!(y.as_slice(), &[3.0, 5.0]);
        assert_eq!(arg, vec![1, 2]);
        let dx = max_pool_backward(&Matrix::new(1, 2, vec![1.0, 2.0]).unwrap(), &arg, &g);
        assert_eq!(dx.as_slice(), &[0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn overlapping_windows_add_their_gradients_and_padding_is_minus_infinity() {
        // 3×3 windows, stride 1, padding 1 on a 2×2 plane: every window
        // sees the whole plane; the max of −1 … −4 is −1 (at 0), never a pad.
        let g = PoolGeom::new(1, 2, 2, 3, 1, 1).unwrap();
        assert_eq!((g.ho, g.wo), (2, 2));
        let x = Matrix::new(1, 4, vec![-1.0, -2.0, -3.0, -4.0]).unwrap();
        let (y, arg) = max_pool_forward(&x, &g);
        assert_eq!(y.as_slice(), &[-1.0; 4]);
        assert_eq!(arg, vec![0; 4]);
        let dx = max_pool_backward(
            &Matrix::new(1, 4, vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
            &arg,
            &g,
        );
        assert_eq!(dx.as_slice(), &[10.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn avg_pool_counts_padding_and_its_backward_is_the_adjoint() {
        let g = PoolGeom::new(2, 3, 3, 2, 1, 1).unwrap();
        assert_eq!((g.ho, g.wo), (4, 4));
        let x: Vec<f32> = (0..18).map(|i| i as f32 * 0.25 - 1.0).collect();
        let x = Matrix::new(1, 18, x).unwrap();
        let y = avg_pool_forward(&x, &g);
        // Corner window: one real value and three pads.
        assert_eq!(y.as_slice()[0], -1.0 / 4.0);
        let dy: Vec<f32> = (0..32).map(|i| (i % 7) as f32 - 3.0).collect();
        let dy = Matrix::new(1, 32, dy).unwrap();
        let dx = avg_pool_backward(&dy, &g);
        let lhs: f64 = y
            .as_slice()
            .iter()
            .zip(dy.as_slice())
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let rhs: f64 = x
            .as_slice()
            .iter()
            .zip(dx.as_slice())
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs}");
    }

    #[test]
    fn global_average_is_the_plane_mean() {
        let x = Matrix::new(1, 8, vec![1.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0, -1.0]).unwrap();
        let y = global_avg_forward(&x, 2, 4);
        assert_eq!(y.as_slice(), &[2.5, -1.0]);
        let dx = global_avg_backward(&Matrix::new(1, 2, vec![4.0, 8.0]).unwrap(), 2, 4);
        assert_eq!(dx.as_slice(), &[1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
    }
}
