//! Matrix products with one fixed order of operations per output.
//!
//! Every output of `C = A·B` is computed as
//!
//! ```text
//! s = +0.0
//! for p in 0..K:  s = fma(A[i,p], B[p,j], s)     (binary32, rounded once, to nearest even)
//! C[i,j] = s
//! ```
//!
//! a fused multiply-add per term (the product is not rounded on its own),
//! `p` in increasing order. Paths with a hardware FMA use it; the others
//! use [`super::math::fma`], which gives the same bits. The fast kernels compute many outputs at once (a tile of `MR`
//! rows by `NR` columns held in registers, vectorised across the columns)
//! but each output still sees exactly this sequence, so every tile size and
//! vector width gives the same bits as [`reference`]. Nothing here reads the
//! CPU's cache sizes or splits a reduction.

use crate::arith::math;
use crate::arith::matrix::Matrix;

/// How a kernel computes `a·b + c` rounded once.
pub(crate) trait MulAdd {
    /// `fma(a, b, c)`.
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

/// [`math::fma`]: any CPU.
pub(crate) struct SoftFma;

impl MulAdd for SoftFma {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        math::fma(a, b, c)
    }
}

/// The CPU's FMA instruction. Only instantiated inside functions compiled
/// with the FMA feature (or on AArch64, where it is baseline): elsewhere
/// `mul_add` would become a call to the C library.
pub(crate) struct HardFma;

impl MulAdd for HardFma {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// A read-only strided view of a matrix: element `(i, j)` is
/// `data[i·rs + j·cs]`. [`View::t`] is the transpose without a copy.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// The whole of `m`.
    pub fn of(m: &'a Matrix) -> Self {
        View {
            data: m.as_slice(),
            rows: m.rows(),
            cols: m.cols(),
            rs: m.cols(),
            cs: 1,
        }
    }

    /// A row-major `rows × cols` slice (`data.len()` must be `rows × cols`;
    /// callers check it).
    pub(crate) fn rows_of(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose.
    pub fn t(self) -> Self {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// The specification itself: one output at a time, `p` in order. Slow,
/// obviously right, and what every fast path is tested against.
pub(crate) fn reference(a: View<'_>, b: View<'_>, c: &mut [f32]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f32;
            for p in 0..k {
                s = math::fma(a.at(i, p), b.at(p, j), s);
            }
            c[i * n + j] = s;
        }
    }
}

/// Columns `j0 .. j0 + NR` of `B`, row by row (`K` rows of `NR`), zero
/// beyond the last column. Row-major `B` is copied a row segment at a
/// time.
fn pack_b<const NR: usize>(b: View<'_>) -> Vec<[f32; NR]> {
    let (k, n) = (b.rows, b.cols);
    let panels = n.div_ceil(NR);
    let mut out = vec![[0.0f32; NR]; panels * k];
    for (panel, dst) in out.chunks_exact_mut(k.max(1)).enumerate() {
        let j0 = panel * NR;
        let width = NR.min(n - j0);
        if b.cs == 1 && width == NR {
            // A fixed-size copy: inlined, not a call to memmove per row.
            for (p, row) in dst.iter_mut().enumerate() {
                let start = p * b.rs + j0;
                if let Ok(src) = <&[f32; NR]>::try_from(&b.data[start..start + NR]) {
                    *row = *src;
                }
            }
        } else if b.cs == 1 {
            for (p, row) in dst.iter_mut().enumerate() {
                let start = p * b.rs + j0;
                row[..width].copy_from_slice(&b.data[start..start + width]);
            }
        } else {
            for (p, row) in dst.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate().take(width) {
                    *v = b.at(p, j0 + j);
                }
            }
        }
    }
    out
}

/// Rows `i0 .. i0 + MR` of `A`, column by column (`K` columns of `MR`),
/// zero below the last row. Row-major `A` is read a row at a time, its
/// transpose a column segment at a time.
fn pack_a<const MR: usize>(a: View<'_>, i0: usize, out: &mut [[f32; MR]]) {
    let height = MR.min(a.rows - i0);
    let k = out.len();
    if height < MR {
        out.fill([0.0; MR]);
    }
    if a.cs == 1 {
        for r in 0..height {
            let start = (i0 + r) * a.rs;
            for (col, v) in out.iter_mut().zip(&a.data[start..start + k]) {
                col[r] = *v;
            }
        }
    } else if a.rs == 1 && height == MR {
        for (p, col) in out.iter_mut().enumerate() {
            let start = p * a.cs + i0;
            if let Ok(src) = <&[f32; MR]>::try_from(&a.data[start..start + MR]) {
                *col = *src;
            }
        }
    } else if a.rs == 1 {
        for (p, col) in out.iter_mut().enumerate() {
            let start = p * a.cs + i0;
            col[..height].copy_from_slice(&a.data[start..start + height]);
        }
    } else {
        for (p, col) in out.iter_mut().enumerate() {
            for (r, v) in col.iter_mut().enumerate().take(height) {
                *v = a.at(i0 + r, p);
            }
        }
    }
}

/// One `MR × NR` tile over the whole reduction: `acc[r][j]` starts at +0
/// and gains `a[p][r] ⊗ b[p][j]` for `p` in order.
#[inline(always)]
fn tile<F: MulAdd, const MR: usize, const NR: usize>(
    a: &[[f32; MR]],
    b: &[[f32; NR]],
) -> [[f32; NR]; MR] {
    let mut acc = [[0.0f32; NR]; MR];
    for (av, bv) in a.iter().zip(b) {
        for r in 0..MR {
            let x = av[r];
            for j in 0..NR {
                acc[r][j] = F::fma(x, bv[j], acc[r][j]);
            }
        }
    }
    acc
}

/// `C = A·B` with `MR × NR` register tiles. `#[inline(always)]` so that
/// each instantiation is compiled with the target features of the
/// function that calls it (the kernel paths of [`super::dispatch`]).
#[inline(always)]
pub(crate) fn tiled<F: MulAdd, const MR: usize, const NR: usize>(
    a: View<'_>,
    b: View<'_>,
    c: &mut [f32],
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let packed_b = pack_b::<NR>(b);
    let mut packed_a = vec![[0.0f32; MR]; k];
    for i0 in (0..m).step_by(MR) {
        pack_a::<MR>(a, i0, &mut packed_a);
        let height = MR.min(m - i0);
        for (panel, bp) in packed_b.chunks_exact(k).enumerate() {
            let acc = tile::<F, MR, NR>(&packed_a, bp);
            let j0 = panel * NR;
            let width = NR.min(n - j0);
            for (r, acc_row) in acc.iter().enumerate().take(height) {
                let start = (i0 + r) * n + j0;
                c[start..start + width].copy_from_slice(&acc_row[..width]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // Mixed magnitudes and signs, so a reordered sum would show.
        (0..n as u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                let m = (x % 2001) as f32 / 1000.0 - 1.0;
                m * [1.0, 1e-3, 1e3, 0.5][(x % 4) as usize]
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn tiles_of_every_shape_equal_the_reference_bit_for_bit() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 13, 5),
            (64, 70, 33),
            (13, 1, 40),
            (6, 16, 16),
        ] {
            let a = Matrix::new(m, k, values(m * k, 1)).unwrap();
            let b = Matrix::new(k, n, values(k * n, 2)).unwrap();
            let mut want = vec![0.0; m * n];
            reference(View::of(&a), View::of(&b), &mut want);
            for got in [
                {
                    let mut c = vec![9.0; m * n];
                    tiled::<SoftFma, 4, 8>(View::of(&a), View::of(&b), &mut c);
                    c
                },
                {
                    let mut c = vec![9.0; m * n];
                    tiled::<SoftFma, 6, 16>(View::of(&a), View::of(&b), &mut c);
                    c
                },
                {
                    let mut c = vec![9.0; m * n];
                    tiled::<SoftFma, 8, 32>(View::of(&a), View::of(&b), &mut c);
                    c
                },
            ] {
                assert_eq!(bits(&got), bits(&want), "{m}×{k}×{n}");
            }
        }
    }

    #[test]
    fn transposed_views_read_the_transpose() {
        let a = Matrix::new(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let mut c = vec![0.0; 4];
        // A·Aᵀ
        tiled::<SoftFma, 4, 8>(View::of(&a), View::of(&a).t(), &mut c);
        assert_eq!(c, vec![14.0, 32.0, 32.0, 77.0]);
        // Aᵀ·A is 3 × 3
        let mut c = vec![0.0; 9];
        reference(View::of(&a).t(), View::of(&a), &mut c);
        assert_eq!(
            c,
            vec![17.0, 22.0, 27.0, 22.0, 29.0, 36.0, 27.0, 36.0, 45.0]
        );
    }

    #[test]
    fn each_term_is_fused_not_rounded_twice() {
        // 1 + (1 + ε)·(−(1 − ε)) = ε²: a rounded product would be −1,
        // and 1 − 1 = 0; fused, the ε² survives.
        let e = f32::EPSILON;
        let a = Matrix::new(1, 2, vec![1.0, 1.0 + e]).unwrap();
        let b = Matrix::new(2, 1, vec![1.0, -(1.0 - e)]).unwrap();
        let mut c = vec![0.0; 1];
        reference(View::of(&a), View::of(&b), &mut c);
        assert_eq!(c[0], e * e);
        let mut t = vec![0.0; 1];
        tiled::<SoftFma, 4, 8>(View::of(&a), View::of(&b), &mut t);
        assert_eq!(t[0].to_bits(), c[0].to_bits());
    }

    #[test]
    fn the_order_is_sequential_not_pairwise() {
        // 1e8 + 1 − 1e8 + 1 … : sequential f32 sums lose each 1, a
        // pairwise or lane-split sum would keep some.
        let k = 8;
        let a = Matrix::new(1, k, vec![1.0; k]).unwrap();
        let b = Matrix::new(k, 1, vec![1e8, 1.0, -1e8, 1.0, 1.0, 1.0, 1.0, 1.0]).unwrap();
        let mut c = vec![0.0; 1];
        tiled::<SoftFma, 4, 8>(View::of(&a), View::of(&b), &mut c);
        let mut s = 0.0f32;
        for v in b.as_slice() {
            s = math::fma(1.0, *v, s);
        }
        assert_eq!(c[0].to_bits(), s.to_bits());
        assert_eq!(c[0], 5.0);
    }
}
