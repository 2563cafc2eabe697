//! `conv2d`, forward and backward, as matrix products of the reproducible
//! arithmetic (`docs/arithmetic.md`, "conv2d").
//!
//! Images are `[c, h, w]` planes, row-major, one after another in a
//! `[batch, c·h·w]` [`Matrix`]; the weight is `[out, in, k, k]`
//! (PyTorch's layout). With `Xp` the input padded with `+0`:
//!
//! - forward: `Y[n,o,y,x] = (Σ over (c, ky, kx) of W[o,c,ky,kx] · Xp[n,c,y·s+ky,x·s+kx]) ⊕ b[o]`,
//!   one dot product (FMAs from `+0`) per output, padding terms included;
//! - weight gradient: `dW[o,c,ky,kx]` the dot product over `(n, y, x)` of
//!   `dY[n,o,y,x]` and `Xp[n,c,y·s+ky,x·s+kx]`; `db[o] = Σ_(n,y,x) dY[n,o,y,x]`;
//! - input gradient: `dX[n,c,i,j]` the dot product over `(o, ky', kx')`
//!   of `W[o,c,k−1−ky',k−1−kx']` and `D[n,o,i+ky',j+kx']`, where `D` is
//!   `dY` spread `s` apart (zeros between) with `k−1−p` zeros in front:
//!   the transposed convolution, written as a convolution of stride 1.
//!
//! Each is `im2col` (a copy, no arithmetic) followed by [`Gemm::run`]; the
//! work is shared between threads by images (forward, input gradient) or
//! by output rows of the product (weight gradient), never inside a dot
//! product.

use rayon::prelude::*;

use crate::arith::dispatch::Gemm;
use crate::arith::gemm::{Init, View};
use crate::arith::matrix::Matrix;
use crate::arith::threads;

/// The geometry of one `conv2d`: input `[c, h, w]`, `o` filters of `k × k`,
/// stride `s`, padding `p` (`p < k`), output `[o, ho, wo]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel side.
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

impl ConvGeom {
    /// The geometry, with the output size derived; `None` if the window
    /// does not fit or a size is zero (the model's checks exclude both).
    pub fn new(
        c: usize,
        h: usize,
        w: usize,
        o: usize,
        k: usize,
        s: usize,
        p: usize,
    ) -> Option<Self> {
        if c == 0 || o == 0 || k == 0 || s == 0 || p >= k || h + 2 * p < k || w + 2 * p < k {
            return None;
        }
        Some(ConvGeom {
            c,
            h,
            w,
            o,
            k,
            s,
            p,
            ho: (h + 2 * p - k) / s + 1,
            wo: (w + 2 * p - k) / s + 1,
        })
    }

    /// Values of one input image.
    pub fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Values of one output image.
    pub fn out_len(&self) -> usize {
        self.o * self.ho * self.wo
    }

    /// The reduction length of the forward product, `c·k·k`.
    pub fn patch(&self) -> usize {
        self.c * self.k * self.k
    }
}

/// `cols[(c·k + ky)·k + kx][y·wo + x] = Xp[c, y·s + ky, x·s + kx]` for one
/// image (`+0` where the window reaches into the padding).
fn im2col(x: &[f32], g: &ConvGeom, cols: &mut [f32]) {
    let (k, s, p) = (g.k, g.s, g.p);
    let n = g.ho * g.wo;
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((c * k + ky) * k + kx) * n..][..n];
                for y in 0..g.ho {
                    let out = &mut row[y * g.wo..(y + 1) * g.wo];
                    let iy = (y * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= g.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    if s == 1 {
                        // ix = x + kx − p: a shifted copy with zero edges.
                        let shift = kx as isize - p as isize;
                        for (x, v) in out.iter_mut().enumerate() {
                            let ix = x as isize + shift;
                            *v = if ix >= 0 && ix < g.w as isize {
                                src[ix as usize]
                            } else {
                                0.0
                            };
                        }
                    } else {
                        for (x, v) in out.iter_mut().enumerate() {
                            let ix = (x * s + kx) as isize - p as isize;
                            *v = if ix >= 0 && ix < g.w as isize {
                                src[ix as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
    }
}

/// Runs `f(n, image_out)` for every image, on the kernel threads when
/// there is more than one image.
fn per_image(out: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if len == 0 {
        return;
    }
    if out.len() > len && threads::count() > 1 {
        threads::install(|| {
            out.par_chunks_mut(len)
                .enumerate()
                .for_each(|(n, o)| f(n, o))
        });
    } else {
        out.chunks_mut(len).enumerate().for_each(|(n, o)| f(n, o));
    }
}

/// The forward: `x` is `[batch, c·h·w]`, `w` is `[o, c, k, k]` and `b`
/// (if any) `[o]`; the result `[batch, o·ho·wo]`.
pub fn conv2d_forward(x: &Matrix, w: &[f32], b: Option<&[f32]>, g: &ConvGeom) -> Matrix {
    let batch = x.rows();
    let gemm = Gemm::active();
    let mut y = Matrix::zeros(batch, g.out_len());
    let (kk, hw) = (g.patch(), g.ho * g.wo);
    per_image(y.as_mut_slice(), g.out_len(), |n, out| {
        let mut cols = vec![0.0f32; kk * hw];
        im2col(x.row(n), g, &mut cols);
        gemm.run(
            View::rows_of(w, g.o, kk),
            View::rows_of(&cols, kk, hw),
            out,
            Init::Zero,
        );
        if let Some(b) = b {
            for (plane, bias) in out.chunks_exact_mut(hw).zip(b) {
                for v in plane {
                    *v += *bias;
                }
            }
        }
    });
    y
}

/// The weight gradient `[o, c, k, k]` and the bias gradient `[o]` (if
/// `with_bias`), from the forward's input `x` and the output gradient
/// `dy` (`[batch, o·ho·wo]`).
pub fn conv2d_backward_weight(
    x: &Matrix,
    dy: &Matrix,
    g: &ConvGeom,
    with_bias: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let gemm = Gemm::active();
    let (kk, hw) = (g.patch(), g.ho * g.wo);
    // dWᵀ[(c,ky,kx), o], continued image after image: the reduction over
    // (n, y, x) in order, carried from one product to the next.
    let mut dwt = vec![0.0f32; kk * g.o];
    let mut cols = vec![0.0f32; kk * hw];
    for n in 0..x.rows() {
        im2col(x.row(n), g, &mut cols);
        gemm.run(
            View::rows_of(&cols, kk, hw),
            View::rows_of(dy.row(n), g.o, hw).t(),
            &mut dwt,
            if n == 0 { Init::Zero } else { Init::Accumulate },
        );
    }
    let mut dw = vec![0.0f32; g.o * kk];
    for (r, row) in dwt.chunks_exact(g.o).enumerate() {
        for (o, v) in row.iter().enumerate() {
            dw[o * kk + r] = *v;
        }
    }
    let db = with_bias.then(|| {
        let mut db = vec![0.0f32; g.o];
        for n in 0..dy.rows() {
            for (acc, plane) in db.iter_mut().zip(dy.row(n).chunks_exact(hw)) {
                for v in plane {
                    *acc += *v;
                }
            }
        }
        db
    });
    (dw, db)
}

/// The input gradient `[batch, c·h·w]`: the transposed convolution of
/// `dy` with `w`, as a stride-1 convolution of `dy` spread and padded
/// (see the module's description).
pub fn conv2d_backward_input(dy: &Matrix, w: &[f32], g: &ConvGeom) -> Matrix {
    let gemm = Gemm::active();
    let (k, q) = (g.k, g.k - 1 - g.p);
    // W'[c][(o, ky', kx')] = W[o][c][k−1−ky'][k−1−kx'].
    let okk = g.o * k * k;
    let mut wt = vec![0.0f32; g.c * okk];
    for o in 0..g.o {
        for c in 0..g.c {
            for ky in 0..k {
                for kx in 0..k {
                    wt[c * okk + (o * k + (k - 1 - ky)) * k + (k - 1 - kx)] =
                        w[((o * g.c + c) * k + ky) * k + kx];
                }
            }
        }
    }
    // The stride-1 convolution over D: input [o, hd, wd], output [c, h, w].
    let (hd, wd) = (g.h + k - 1, g.w + k - 1);
    let spread = ConvGeom {
        c: g.o,
        h: hd,
        w: wd,
        o: g.c,
        k,
        s: 1,
        p: 0,
        ho: g.h,
        wo: g.w,
    };
    let hw_out = g.ho * g.wo;
    let mut dx = Matrix::zeros(dy.rows(), g.in_len());
    per_image(dx.as_mut_slice(), g.in_len(), |n, out| {
        let mut d = vec![0.0f32; g.o * hd * wd];
        let src = dy.row(n);
        for o in 0..g.o {
            for y in 0..g.ho {
                for x in 0..g.wo {
                    d[(o * hd + q + y * g.s) * wd + q + x * g.s] = src[o * hw_out + y * g.wo + x];
                }
            }
        }
        let mut cols = vec![0.0f32; okk * g.h * g.w];
        im2col(&d, &spread, &mut cols);
        gemm.run(
            View::rows_of(&wt, g.c, okk),
            View::rows_of(&cols, okk, g.h * g.w),
            out,
            Init::Zero,
        );
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::math;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The definitions, literally: one output at a time.
    fn naive_forward(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        g: &ConvGeom,
        batch: usize,
    ) -> Vec<f32> {
        let xp = |n: usize, c: usize, iy: isize, ix: isize| {
            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                0.0
            } else {
                x[n * g.in_len() + (c * g.h + iy as usize) * g.w + ix as usize]
            }
        };
        let mut out = Vec::new();
        for n in 0..batch {
            for o in 0..g.o {
                for y in 0..g.ho {
                    for xx in 0..g.wo {
                        let mut s = 0.0f32;
                        for c in 0..g.c {
                            for ky in 0..g.k {
                                for kx in 0..g.k {
                                    let iy = (y * g.s + ky) as isize - g.p as isize;
                                    let ix = (xx * g.s + kx) as isize - g.p as isize;
                                    s = math::fma(
                                        w[((o * g.c + c) * g.k + ky) * g.k + kx],
                                        xp(n, c, iy, ix),
                                        s,
                                    );
                                }
                            }
                        }
                        out.push(b.map_or(s, |b| s + b[o]));
                    }
                }
            }
        }
        out
    }

    fn naive_dw(x: &[f32], dy: &[f32], g: &ConvGeom, batch: usize) -> Vec<f32> {
        let mut dw = vec![0.0f32; g.o * g.patch()];
        for o in 0..g.o {
            for c in 0..g.c {
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let mut s = 0.0f32;
                        for n in 0..batch {
                            for y in 0..g.ho {
                                for xx in 0..g.wo {
                                    let iy = (y * g.s + ky) as isize - g.p as isize;
                                    let ix = (xx * g.s + kx) as isize - g.p as isize;
                                    let xv = if iy < 0
                                        || ix < 0
                                        || iy >= g.h as isize
                                        || ix >= g.w as isize
                                    {
                                        0.0
                                    } else {
                                        x[n * g.in_len()
                                            + (c * g.h + iy as usize) * g.w
                                            + ix as usize]
                                    };
                                    s = math::fma(
                                        dy[n * g.out_len() + (o * g.ho + y) * g.wo + xx],
                                        xv,
                                        s,
                                    );
                                }
                            }
                        }
                        dw[((o * g.c + c) * g.k + ky) * g.k + kx] = s;
                    }
                }
            }
        }
        dw
    }

    fn naive_dx(dy: &[f32], w: &[f32], g: &ConvGeom, batch: usize) -> Vec<f32> {
        let q = (g.k - 1 - g.p) as isize;
        let d = |n: usize, o: usize, i: isize, j: isize| -> f32 {
            // D[o, i, j] = dY[o, (i−q)/s, (j−q)/s] where that divides.
            let (a, b) = (i - q, j - q);
            if a < 0 || b < 0 || a % g.s as isize != 0 || b % g.s as isize != 0 {
                return 0.0;
            }
            let (y, x) = ((a / g.s as isize) as usize, (b / g.s as isize) as usize);
            if y >= g.ho || x >= g.wo {
                return 0.0;
            }
            dy[n * g.out_len() + (o * g.ho + y) * g.wo + x]
        };
        let mut dx = Vec::new();
        for n in 0..batch {
            for c in 0..g.c {
                for i in 0..g.h {
                    for j in 0..g.w {
                        let mut s = 0.0f32;
                        for o in 0..g.o {
                            for ky2 in 0..g.k {
                                for kx2 in 0..g.k {
                                    let wv = w[((o * g.c + c) * g.k + (g.k - 1 - ky2)) * g.k
                                        + (g.k - 1 - kx2)];
                                    s = math::fma(
                                        wv,
                                        d(n, o, (i + ky2) as isize, (j + kx2) as isize),
                                        s,
                                    );
                                }
                            }
                        }
                        dx.push(s);
                    }
                }
            }
        }
        dx
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn every_product_equals_its_definition_bit_for_bit() {
        let batch = 3;
        for (c, h, w, o, k, s, p) in [
            (2, 5, 6, 3, 3, 1, 1),
            (1, 7, 7, 4, 3, 2, 1),
            (3, 6, 5, 2, 2, 2, 0),
            (2, 4, 4, 5, 1, 1, 0),
            (2, 9, 8, 3, 5, 3, 2),
        ] {
            let g = ConvGeom::new(c, h, w, o, k, s, p).unwrap();
            let x = Matrix::new(batch, g.in_len(), values(batch * g.in_len(), 1)).unwrap();
            let wv = values(g.o * g.patch(), 2);
            let b = values(g.o, 3);
            let dy = Matrix::new(batch, g.out_len(), values(batch * g.out_len(), 4)).unwrap();
            for t in [1, 2] {
                threads::with_count(t, || {
                    let y = conv2d_forward(&x, &wv, Some(&b), &g);
                    assert_eq!(
                        bits(y.as_slice()),
                        bits(&naive_forward(x.as_slice(), &wv, Some(&b), &g, batch)),
                        "forward {g:?}"
                    );
                    let (dw, db) = conv2d_backward_weight(&x, &dy, &g, true);
                    assert_eq!(
                        bits(&dw),
                        bits(&naive_dw(x.as_slice(), dy.as_slice(), &g, batch)),
                        "dW {g:?}"
                    );
                    let db = db.unwrap();
                    for (oi, v) in db.iter().enumerate() {
                        let mut sum = 0.0f32;
                        for n in 0..batch {
                            for e in &dy.row(n)[oi * g.ho * g.wo..(oi + 1) * g.ho * g.wo] {
                                sum += *e;
                            }
                        }
                        assert_eq!(v.to_bits(), sum.to_bits());
                    }
                    let dx = conv2d_backward_input(&dy, &wv, &g);
                    assert_eq!(
                        bits(dx.as_slice()),
                        bits(&naive_dx(dy.as_slice(), &wv, &g, batch)),
                        "dX {g:?}"
                    );
                })
                .unwrap();
            }
        }
    }

    #[test]
    fn the_input_gradient_is_the_adjoint_of_the_forward() {
        // <conv(x), dy> = <x, conv_input_grad(dy)> up to rounding.
        let g = ConvGeom::new(2, 7, 6, 3, 3, 2, 1).unwrap();
        let x = Matrix::new(1, g.in_len(), values(g.in_len(), 5)).unwrap();
        let wv = values(g.o * g.patch(), 6);
        let dy = Matrix::new(1, g.out_len(), values(g.out_len(), 7)).unwrap();
        let y = conv2d_forward(&x, &wv, None, &g);
        let dx = conv2d_backward_input(&dy, &wv, &g);
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
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }
}
