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
//! Each is `im2col` (a copy, no arithmetic) followed by `Gemm::run`; the
//! work is shared between threads by images (forward, input gradient) or
//! by output rows of the product (weight gradient), never inside a dot
//! product.

use rayon::prelude::*;

use crate::arith::dispatch::Gemm;
use crate::arith::gemm::{
    pack_b_into, packed_b_len, run_packed, Init, KernelTask, Micro, PackedA, View, MAX_TILE,
};
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

/// Row `r = (c·k + ky)·k + kx` of one image's columns:
/// `row[y·wo + x] = Xp[c, y·s + ky, x·s + kx]` (`+0` in the padding).
fn fill_row(x: &[f32], g: &ConvGeom, r: usize, row: &mut [f32]) {
    let (k, s, p) = (g.k, g.s, g.p);
    let (c, ky, kx) = (r / (k * k), (r / k) % k, r % k);
    let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
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
            let lo = p.saturating_sub(kx).min(g.wo);
            let hi = (g.w + p).saturating_sub(kx).min(g.wo).max(lo);
            out[..lo].fill(0.0);
            out[lo..hi].copy_from_slice(&src[lo + kx - p..hi + kx - p]);
            out[hi..].fill(0.0);
        } else {
            for (xo, v) in out.iter_mut().enumerate() {
                let ix = (xo * s + kx) as isize - p as isize;
                *v = if ix >= 0 && ix < g.w as isize {
                    src[ix as usize]
                } else {
                    0.0
                };
            }
        }
    }
}

/// One image's columns (`c·k·k` rows of `ho·wo`) packed straight into
/// panels of `nr` columns, the right operand of the forward's product.
fn im2col_panels(x: &[f32], g: &ConvGeom, nr: usize, out: &mut [f32], row: &mut [f32]) {
    let (kk, n) = (g.patch(), g.ho * g.wo);
    let row = &mut row[..n];
    for r in 0..kk {
        fill_row(x, g, r, row);
        for (panel, chunk) in row.chunks(nr).enumerate() {
            let dst = &mut out[(panel * kk + r) * nr..(panel * kk + r + 1) * nr];
            dst[..chunk.len()].copy_from_slice(chunk);
            dst[chunk.len()..].fill(0.0);
        }
    }
}

/// Runs `f(n, image_out, scratch)` for every image, on the kernel threads
/// when there is more than one image; each thread's scratch comes from
/// `init` once per batch of images it takes.
fn per_image<S: Send>(
    out: &mut [f32],
    len: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(usize, &mut [f32], &mut S) + Sync + Send,
) {
    if len == 0 {
        return;
    }
    if out.len() > len && threads::count() > 1 {
        threads::install(|| {
            out.par_chunks_mut(len)
                .enumerate()
                .for_each_init(&init, |s, (n, o)| f(n, o, s))
        });
    } else {
        let mut s = init();
        out.chunks_mut(len)
            .enumerate()
            .for_each(|(n, o)| f(n, o, &mut s));
    }
}

/// One image of a stride-1 convolution without im2col (an implicit one):
/// `padded` is the input, `c` planes of `hp × wp` already padded, followed
/// by at least `NR` zeros; the output `[o, hp − k + 1, wp − k + 1]`. Output
/// positions are counted across the padded width (`j = y·wp + x`), so that
/// the `NR` outputs of a tile read `NR` consecutive inputs for every
/// `(c, ky, kx)` (at offset `c·hp·wp + ky·wp + kx`, in that order: the
/// forward's dot product); the `k − 1` positions past each row's end are
/// computed and dropped.
#[allow(clippy::too_many_arguments)]
fn direct_image<K: Micro>(
    kernel: K,
    a: &PackedA,
    offsets: &[usize],
    padded: &[f32],
    (hp, wp, k): (usize, usize, usize),
    out: &mut [f32],
    tmp: &mut Vec<f32>,
) {
    let (mr, nr) = (K::MR, K::NR);
    let (ho, wo) = (hp + 1 - k, wp + 1 - k);
    let o = a.m;
    let len = (ho - 1) * wp + wo;
    let ld = len.div_ceil(nr) * nr;
    tmp.resize(o * ld, 0.0);
    let kk = a.k;
    for j0 in (0..len).step_by(nr) {
        let b = &padded[j0..];
        for (bi, ap) in a.data.chunks_exact(kk * mr).enumerate() {
            let i0 = bi * mr;
            let height = mr.min(o - i0);
            if height == mr {
                kernel.tile_indirect(kk, ap, b, offsets, &mut tmp[i0 * ld + j0..], ld);
            } else {
                let mut scratch = [0.0f32; MAX_TILE];
                kernel.tile_indirect(kk, ap, b, offsets, &mut scratch, nr);
                for r in 0..height {
                    tmp[(i0 + r) * ld + j0..(i0 + r) * ld + j0 + nr]
                        .copy_from_slice(&scratch[r * nr..(r + 1) * nr]);
                }
            }
        }
    }
    for (plane, src) in out.chunks_exact_mut(ho * wo).zip(tmp.chunks_exact(ld)) {
        for (y, row) in plane.chunks_exact_mut(wo).enumerate() {
            row.copy_from_slice(&src[y * wp..y * wp + wo]);
        }
    }
}

/// `(c, ky, kx)` offsets into `c` planes of `hp × wp`, in that order.
fn window_offsets(c: usize, hp: usize, wp: usize, k: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(c * k * k);
    for ci in 0..c {
        for ky in 0..k {
            for kx in 0..k {
                out.push(ci * hp * wp + ky * wp + kx);
            }
        }
    }
    out
}

/// Copies `c` planes of `h × w` into `out` (`c` planes of `hp × wp`, then
/// slack), `top`/`left` zeros in front of each plane's rows and columns.
fn pad_into(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    (hp, wp): (usize, usize),
    (top, left): (usize, usize),
    out: &mut [f32],
) {
    out.fill(0.0);
    for ci in 0..c {
        for y in 0..h {
            let dst = (ci * hp + top + y) * wp + left;
            out[dst..dst + w].copy_from_slice(&x[(ci * h + y) * w..(ci * h + y + 1) * w]);
        }
    }
}

struct Forward<'a> {
    x: &'a Matrix,
    w: &'a [f32],
    b: Option<&'a [f32]>,
    g: &'a ConvGeom,
}

impl KernelTask for Forward<'_> {
    type Output = Matrix;

    fn run<K: Micro>(self, kernel: K) -> Matrix {
        let g = self.g;
        let (kk, hw) = (g.patch(), g.ho * g.wo);
        let a = PackedA::new(View::rows_of(self.w, g.o, kk), K::MR);
        let mut y = Matrix::zeros(self.x.rows(), g.out_len());
        if g.s == 1 {
            let (hp, wp) = (g.h + 2 * g.p, g.w + 2 * g.p);
            let offsets = window_offsets(g.c, hp, wp, g.k);
            per_image(
                y.as_mut_slice(),
                g.out_len(),
                || (vec![0.0f32; g.c * hp * wp + K::NR], Vec::new()),
                |n, out, (padded, tmp)| {
                    pad_into(self.x.row(n), (g.c, g.h, g.w), (hp, wp), (g.p, g.p), padded);
                    direct_image(kernel, &a, &offsets, padded, (hp, wp, g.k), out, tmp);
                    if let Some(b) = self.b {
                        for (plane, bias) in out.chunks_exact_mut(hw).zip(b) {
                            for v in plane {
                                *v += *bias;
                            }
                        }
                    }
                },
            );
            return y;
        }
        let blen = packed_b_len(kk, hw, K::NR);
        per_image(
            y.as_mut_slice(),
            g.out_len(),
            || (vec![0.0f32; blen], vec![0.0f32; hw]),
            |n, out, (panels, row)| {
                im2col_panels(self.x.row(n), g, K::NR, panels, row);
                run_packed(kernel, &a, panels, hw, out, Init::Zero);
                if let Some(b) = self.b {
                    for (plane, bias) in out.chunks_exact_mut(hw).zip(b) {
                        for v in plane {
                            *v += *bias;
                        }
                    }
                }
            },
        );
        y
    }
}

/// The forward: `x` is `[batch, c·h·w]`, `w` is `[o, c, k, k]` and `b`
/// (if any) `[o]`; the result `[batch, o·ho·wo]`.
pub fn conv2d_forward(x: &Matrix, w: &[f32], b: Option<&[f32]>, g: &ConvGeom) -> Matrix {
    Gemm::active().task(Forward { x, w, b, g })
}

struct WeightGrad<'a> {
    x: &'a Matrix,
    dy: &'a Matrix,
    g: &'a ConvGeom,
}

impl KernelTask for WeightGrad<'_> {
    type Output = Vec<f32>;

    /// `dWᵀ[(c,ky,kx), o]`, continued image after image (the reduction
    /// over `(n, y, x)` in order, carried from one product to the next).
    /// The left operand is read in place from each image's padded input
    /// (row `(c, ky, kx)` at offset `c·hp·wp + ky·wp + kx`, column `(y, x)`
    /// at `y·s·wp + x·s`); the row blocks of `dWᵀ` are shared between
    /// threads, each walking every image for its own rows.
    fn run<K: Micro>(self, kernel: K) -> Vec<f32> {
        let g = self.g;
        let (kk, hw, o) = (g.patch(), g.ho * g.wo, g.o);
        let batch = self.x.rows();
        let (mr, nr) = (K::MR, K::NR);
        let (hp, wp) = (g.h + 2 * g.p, g.w + 2 * g.p);
        let plen = g.c * hp * wp;
        // Every image padded, and dY_nᵀ (hw × o) of every image packed,
        // once, shared.
        let blen = packed_b_len(hw, o, nr);
        // Every value of both is rewritten below (`pad_into` clears each
        // image's block first, `pack_b_into` writes every value of its
        // panels), so they come from this thread's scratch uncleared.
        let mut padded = threads::take_scratch(&PADDED, batch * plen);
        let mut packed = threads::take_scratch(&PACKED, batch * blen);
        let prepare = |(n, (pad, pack)): (usize, (&mut [f32], &mut [f32]))| {
            pad_into(self.x.row(n), (g.c, g.h, g.w), (hp, wp), (g.p, g.p), pad);
            pack_b_into(View::rows_of(self.dy.row(n), o, hw).t(), nr, pack);
        };
        if batch > 1 && threads::count() > 1 {
            threads::install(|| {
                padded
                    .par_chunks_mut(plen)
                    .zip(packed.par_chunks_mut(blen))
                    .enumerate()
                    .for_each(prepare)
            });
        } else {
            padded
                .chunks_mut(plen)
                .zip(packed.chunks_mut(blen))
                .enumerate()
                .for_each(prepare);
        }
        let mut row_offsets: Vec<usize> = (0..kk.div_ceil(mr) * mr)
            .map(|r| {
                let r = r.min(kk - 1);
                let (c, ky, kx) = (r / (g.k * g.k), (r / g.k) % g.k, r % g.k);
                c * hp * wp + ky * wp + kx
            })
            .collect();
        row_offsets.shrink_to_fit();
        let cols: Vec<usize> = (0..hw)
            .map(|p| (p / g.wo) * g.s * wp + (p % g.wo) * g.s)
            .collect();
        let mut dwt = vec![0.0f32; kk * o];
        let block = |(bi, out): (usize, &mut [f32])| {
            let height = out.len() / o;
            let rows = &row_offsets[bi * mr..bi * mr + mr];
            for n in 0..batch {
                let a = &padded[n * plen..(n + 1) * plen];
                let bp = &packed[n * blen..(n + 1) * blen];
                let init = if n == 0 { Init::Zero } else { Init::Accumulate };
                for (panel, panel_b) in bp.chunks_exact(hw * nr).enumerate() {
                    let j0 = panel * nr;
                    let width = nr.min(o - j0);
                    if height == mr && width == nr {
                        kernel.tile_gather_a(hw, a, rows, &cols, panel_b, &mut out[j0..], o, init);
                    } else {
                        let mut scratch = [0.0f32; MAX_TILE];
                        if init == Init::Accumulate {
                            for r in 0..height {
                                scratch[r * nr..r * nr + width]
                                    .copy_from_slice(&out[r * o + j0..r * o + j0 + width]);
                            }
                        }
                        kernel.tile_gather_a(hw, a, rows, &cols, panel_b, &mut scratch, nr, init);
                        for r in 0..height {
                            out[r * o + j0..r * o + j0 + width]
                                .copy_from_slice(&scratch[r * nr..r * nr + width]);
                        }
                    }
                }
            }
        };
        if kk > mr && threads::count() > 1 {
            threads::install(|| dwt.par_chunks_mut(mr * o).enumerate().for_each(block));
        } else {
            dwt.chunks_mut(mr * o).enumerate().for_each(block);
        }
        let mut dw = vec![0.0f32; o * kk];
        for (r, row) in dwt.chunks_exact(o).enumerate() {
            for (oi, v) in row.iter().enumerate() {
                dw[oi * kk + r] = *v;
            }
        }
        threads::keep_scratch(&PADDED, padded);
        threads::keep_scratch(&PACKED, packed);
        dw
    }
}

thread_local! {
    /// The weight gradient's padded inputs and packed output gradients,
    /// kept on this thread from one call to the next: a step of the VGG
    /// model cleared about 14 MB of fresh buffers for them per layer, on
    /// the calling thread while the others waited.
    static PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
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
    let dw = Gemm::active().task(WeightGrad { x, dy, g });
    let hw = g.ho * g.wo;
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

struct InputGrad<'a> {
    dy: &'a Matrix,
    w: &'a [f32],
    g: &'a ConvGeom,
}

impl KernelTask for InputGrad<'_> {
    type Output = Matrix;

    fn run<K: Micro>(self, kernel: K) -> Matrix {
        let g = self.g;
        let (k, q) = (g.k, g.k - 1 - g.p);
        // W'[c][(o, ky', kx')] = W[o][c][k−1−ky'][k−1−kx'].
        let okk = g.o * k * k;
        let mut wt = vec![0.0f32; g.c * okk];
        for o in 0..g.o {
            for c in 0..g.c {
                for ky in 0..k {
                    for kx in 0..k {
                        wt[c * okk + (o * k + (k - 1 - ky)) * k + (k - 1 - kx)] =
                            g_weight(self.w, g, o, c, ky, kx);
                    }
                }
            }
        }
        let a = PackedA::new(View::rows_of(&wt, g.c, okk), K::MR);
        // A stride-1 convolution of D (o planes of hd × wd) without
        // padding: with stride 1, D is dY padded by q on every side;
        // otherwise dY spread s apart in a (h + k − 1) × (w + k − 1)
        // plane, q zeros in front.
        let (hd, wd) = (g.h + k - 1, g.w + k - 1);
        let offsets = window_offsets(g.o, hd, wd, k);
        let ohw = g.ho * g.wo;
        let mut dx = Matrix::zeros(self.dy.rows(), g.in_len());
        per_image(
            dx.as_mut_slice(),
            g.in_len(),
            || (vec![0.0f32; g.o * hd * wd + K::NR], Vec::new()),
            |n, out, (d, tmp)| {
                let src = self.dy.row(n);
                if g.s == 1 {
                    pad_into(src, (g.o, g.ho, g.wo), (hd, wd), (q, q), d);
                } else {
                    d.fill(0.0);
                    for o in 0..g.o {
                        for y in 0..g.ho {
                            for x in 0..g.wo {
                                d[(o * hd + q + y * g.s) * wd + q + x * g.s] =
                                    src[o * ohw + y * g.wo + x];
                            }
                        }
                    }
                }
                direct_image(kernel, &a, &offsets, d, (hd, wd, k), out, tmp);
            },
        );
        dx
    }
}

#[inline(always)]
fn g_weight(w: &[f32], g: &ConvGeom, o: usize, c: usize, ky: usize, kx: usize) -> f32 {
    w[((o * g.c + c) * g.k + ky) * g.k + kx]
}

/// The input gradient `[batch, c·h·w]`: the transposed convolution of
/// `dy` with `w`, as a stride-1 convolution of `dy` spread and padded
/// (see the module's description).
pub fn conv2d_backward_input(dy: &Matrix, w: &[f32], g: &ConvGeom) -> Matrix {
    Gemm::active().task(InputGrad { dy, w, g })
}

#[cfg(test)]
mod tests;
