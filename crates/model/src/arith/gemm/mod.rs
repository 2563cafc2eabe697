//! Matrix products with one fixed order of operations per output.
//!
//! Every output of `C = A·B` is computed as
//!
//! ```text
//! s = +0.0                                         (or C[i,j], when accumulating)
//! for p in 0..K:  s = fma(A[i,p], B[p,j], s)     (binary32, rounded once, to nearest even)
//! C[i,j] = s
//! ```
//!
//! a fused multiply-add per term (the product is not rounded on its own),
//! `p` in increasing order. *Accumulating* continues the sequence from the
//! value already in `C` (a reduction cut into several products, such as a
//! convolution's weight gradient summed over the images of a batch, carries
//! its partial value from one product to the next: `docs/arithmetic.md`).
//!
//! The fast kernels compute many outputs at once: a tile of `MR` rows by
//! `NR` columns held in vector registers (`Micro`), each register lane one
//! output, so each output still sees exactly this sequence and every tile
//! size, vector width and thread count gives the same bits as
//! [`reference`]. The micro-kernels are written with explicit vector types
//! per instruction set (`x86`: AVX-512F, AVX2 + FMA3, and SSE2 with the
//! software FMA), not left to the compiler's auto-vectoriser, whose choices
//! (gathers and scatters across rows, once) change with the compiler.
//!
//! `gemm` packs both operands into tile-shaped panels (zero-padded at
//! the edges), and runs the tiles; with more than one thread
//! ([`super::threads`]) the row blocks of `C` are shared out, never a
//! reduction. Nothing here reads the CPU's cache sizes.
//!
//! Over 600 lines: the reference order, the two packing layouts, the gather
//! and indirect checks and the driver that runs the kernels over packed
//! panels share one tile layout and are read against each other; the tests
//! are in `gemm/tests.rs`.

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use rayon::prelude::*;

use crate::arith::math;
use crate::arith::matrix::Matrix;
use crate::arith::threads;

/// How a kernel computes `a·b + c` rounded once.
pub(crate) trait MulAdd {
    /// `fma(a, b, c)`.
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

/// [`math::fma`]: any CPU (the portable kernel off x86-64, and tests).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
pub(crate) struct SoftFma;

impl MulAdd for SoftFma {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        math::fma(a, b, c)
    }
}

/// The CPU's FMA instruction, through `f32::mul_add`: only used where it
/// is baseline (AArch64); elsewhere `mul_add` may become a call to the C
/// library.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
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
    pub fn rows_of(data: &'a [f32], rows: usize, cols: usize) -> Self {
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

/// Whether a product starts every output from `+0` or continues the
/// reduction already in `C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// `s = +0`.
    Zero,
    /// `s = C[i,j]`: the sequence continues where an earlier product left
    /// it.
    Accumulate,
}

/// The specification itself: one output at a time, `p` in order, the
/// software FMA. Slow, obviously right, and what every fast path is tested
/// against.
pub(crate) fn reference(a: View<'_>, b: View<'_>, c: &mut [f32], init: Init) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    for i in 0..m {
        for j in 0..n {
            let mut s = match init {
                Init::Zero => 0.0f32,
                Init::Accumulate => c[i * n + j],
            };
            for p in 0..k {
                s = math::fma(a.at(i, p), b.at(p, j), s);
            }
            c[i * n + j] = s;
        }
    }
}

/// A register-tile micro-kernel: `MR × NR` outputs over the whole
/// reduction. A value of the type is the proof that the CPU runs its
/// instructions (constructed only after checking), so [`Micro::tile`] is
/// safe to call.
pub(crate) trait Micro: Copy + Send + Sync {
    /// Rows of a tile.
    const MR: usize;
    /// Columns of a tile.
    const NR: usize;

    /// `c[r·ldc + j] = fma-sequence over p of a[p·MR + r] ⊗ b[p·NR + j]`,
    /// starting from `+0` or from `c` itself ([`Init`]), for `r < MR`,
    /// `j < NR`. `a` holds `k·MR` values (packed, column by column), `b`
    /// `k·NR` (row by row); `c` at least `(MR − 1)·ldc + NR`. Panics if a
    /// slice is too short.
    fn tile(self, k: usize, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize, init: Init);

    /// [`Micro::tile`] with the left operand read in place: `A[r][p] =
    /// a[rows[r] + cols[p]]` for `r < MR`, `p < k` (a convolution's
    /// columns, each row a shifted window of its padded input). Panics if
    /// `rows` has fewer than `MR` entries, `cols` fewer than `k`, or an
    /// index reaches past `a`.
    #[allow(clippy::too_many_arguments)]
    fn tile_gather_a(
        self,
        k: usize,
        a: &[f32],
        rows: &[usize],
        cols: &[usize],
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        init: Init,
    );

    /// [`Micro::tile`] from `+0` with the right operand read in place:
    /// row `p` of `B` is `b[offsets[p] .. offsets[p] + NR]` (an implicit
    /// im2col: a convolution's input, each `p` a shifted window of it).
    /// Panics if `offsets` has fewer than `k` entries or one reaches past
    /// `b`.
    fn tile_indirect(
        self,
        k: usize,
        a: &[f32],
        b: &[f32],
        offsets: &[usize],
        c: &mut [f32],
        ldc: usize,
    );
}

/// Checks the bounds of [`Micro::tile_gather_a`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn check_gather_a(
    k: usize,
    a: &[f32],
    rows: &[usize],
    mr: usize,
    cols: &[usize],
    b: &[f32],
    nr: usize,
    c: &[f32],
    ldc: usize,
) {
    assert!(rows.len() >= mr && cols.len() >= k && b.len() >= k * nr);
    assert!(c.len() >= (mr - 1) * ldc + nr);
    let (r, p) = (
        rows[..mr].iter().max().copied().unwrap_or(0),
        cols[..k].iter().max().copied().unwrap_or(0),
    );
    assert!(k == 0 || r + p < a.len(), "an index past the operand");
}

/// Checks the bounds of [`Micro::tile_indirect`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn check_indirect(
    k: usize,
    a: &[f32],
    mr: usize,
    b: &[f32],
    nr: usize,
    offsets: &[usize],
    c: &[f32],
    ldc: usize,
) {
    assert!(a.len() >= k * mr && offsets.len() >= k && c.len() >= (mr - 1) * ldc + nr);
    assert!(
        offsets[..k].iter().all(|o| o + nr <= b.len()),
        "an offset past the operand"
    );
}

/// The largest `MR × NR` of any kernel (the scratch tile for the edges).
pub(crate) const MAX_TILE: usize = 256;

/// The portable tile: plain Rust over `[f32; NR]` rows, for the paths
/// without explicit vector code (AArch64, where NEON has a hardware FMA;
/// the tests). One accumulator per output, `p` in order.
pub(crate) struct Portable<F, const MR: usize, const NR: usize>(
    std::marker::PhantomData<fn() -> F>,
);

impl<F, const MR: usize, const NR: usize> Clone for Portable<F, MR, NR> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F, const MR: usize, const NR: usize> Copy for Portable<F, MR, NR> {}

impl<F, const MR: usize, const NR: usize> Portable<F, MR, NR> {
    /// The kernel (it runs on any CPU).
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub(crate) const fn new() -> Self {
        Portable(std::marker::PhantomData)
    }
}

impl<F: MulAdd, const MR: usize, const NR: usize> Micro for Portable<F, MR, NR> {
    const MR: usize = MR;
    const NR: usize = NR;

    #[inline(always)]
    fn tile(self, k: usize, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize, init: Init) {
        let (a, b) = (&a[..k * MR], &b[..k * NR]);
        let mut acc = [[0.0f32; NR]; MR];
        if init == Init::Accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                row.copy_from_slice(&c[r * ldc..r * ldc + NR]);
            }
        }
        for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            for r in 0..MR {
                let x = av[r];
                for j in 0..NR {
                    acc[r][j] = F::fma(x, bv[j], acc[r][j]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            c[r * ldc..r * ldc + NR].copy_from_slice(row);
        }
    }

    fn tile_gather_a(
        self,
        k: usize,
        a: &[f32],
        rows: &[usize],
        cols: &[usize],
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        init: Init,
    ) {
        check_gather_a(k, a, rows, MR, cols, b, NR, c, ldc);
        let mut acc = [[0.0f32; NR]; MR];
        if init == Init::Accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                row.copy_from_slice(&c[r * ldc..r * ldc + NR]);
            }
        }
        for (col, bv) in cols[..k].iter().zip(b.chunks_exact(NR)) {
            for r in 0..MR {
                let x = a[rows[r] + col];
                for j in 0..NR {
                    acc[r][j] = F::fma(x, bv[j], acc[r][j]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            c[r * ldc..r * ldc + NR].copy_from_slice(row);
        }
    }

    fn tile_indirect(
        self,
        k: usize,
        a: &[f32],
        b: &[f32],
        offsets: &[usize],
        c: &mut [f32],
        ldc: usize,
    ) {
        check_indirect(k, a, MR, b, NR, offsets, c, ldc);
        let mut acc = [[0.0f32; NR]; MR];
        for (av, off) in a.chunks_exact(MR).zip(&offsets[..k]) {
            let bv = &b[*off..*off + NR];
            for r in 0..MR {
                let x = av[r];
                for j in 0..NR {
                    acc[r][j] = F::fma(x, bv[j], acc[r][j]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            c[r * ldc..r * ldc + NR].copy_from_slice(row);
        }
    }
}

/// Columns `j0 .. j0 + NR` of `B`, row by row (`K` rows of `NR`), zero
/// beyond the last column.
fn pack_b(b: View<'_>, j0: usize, nr: usize, out: &mut [f32]) {
    let k = b.rows;
    let width = nr.min(b.cols - j0);
    if width < nr {
        out.fill(0.0);
    }
    if b.cs == 1 {
        for (p, row) in out.chunks_exact_mut(nr).take(k).enumerate() {
            let start = p * b.rs + j0;
            row[..width].copy_from_slice(&b.data[start..start + width]);
        }
    } else if b.rs == 1 {
        // A transposed row-major matrix: read each of its rows in order,
        // write it down the panel.
        for j in 0..width {
            let start = (j0 + j) * b.cs;
            for (p, v) in b.data[start..start + k].iter().enumerate() {
                out[p * nr + j] = *v;
            }
        }
    } else {
        for (p, row) in out.chunks_exact_mut(nr).take(k).enumerate() {
            for (j, v) in row.iter_mut().enumerate().take(width) {
                *v = b.at(p, j0 + j);
            }
        }
    }
}

/// Rows `i0 .. i0 + MR` of `A`, column by column (`K` columns of `MR`),
/// zero below the last row.
fn pack_a(a: View<'_>, i0: usize, mr: usize, out: &mut [f32]) {
    let k = a.cols;
    let height = mr.min(a.rows - i0);
    if height < mr {
        out.fill(0.0);
    }
    if a.cs == 1 {
        for r in 0..height {
            let start = (i0 + r) * a.rs;
            for (col, v) in out.chunks_exact_mut(mr).zip(&a.data[start..start + k]) {
                col[r] = *v;
            }
        }
    } else if a.rs == 1 {
        for (p, col) in out.chunks_exact_mut(mr).take(k).enumerate() {
            let start = p * a.cs + i0;
            col[..height].copy_from_slice(&a.data[start..start + height]);
        }
    } else {
        for (p, col) in out.chunks_exact_mut(mr).take(k).enumerate() {
            for (r, v) in col.iter_mut().enumerate().take(height) {
                *v = a.at(i0 + r, p);
            }
        }
    }
}

/// A left operand packed once for many products (a convolution's weight,
/// reused for every image): row blocks of `mr` rows, each `k` columns of
/// `mr` values, zero below the last row.
pub(crate) struct PackedA {
    pub(crate) m: usize,
    pub(crate) k: usize,
    mr: usize,
    pub(crate) data: Vec<f32>,
}

impl PackedA {
    /// Packs `a` for a kernel with `mr`-row tiles.
    pub(crate) fn new(a: View<'_>, mr: usize) -> Self {
        let (m, k) = (a.rows, a.cols);
        let blocks = m.div_ceil(mr);
        let mut data = vec![0.0f32; blocks * k * mr];
        if k > 0 {
            for (bi, out) in data.chunks_exact_mut(k * mr).enumerate() {
                pack_a(a, bi * mr, mr, out);
            }
        }
        PackedA { m, k, mr, data }
    }
}

/// The length of `B` (`k × n`) packed into panels of `nr` columns.
pub(crate) fn packed_b_len(k: usize, n: usize, nr: usize) -> usize {
    n.div_ceil(nr) * k * nr
}

/// Packs `b` into panels of `nr` columns (`out.len()` is
/// [`packed_b_len`]).
pub(crate) fn pack_b_into(b: View<'_>, nr: usize, out: &mut [f32]) {
    let k = b.rows;
    if k == 0 {
        return;
    }
    for (panel, o) in out.chunks_exact_mut(k * nr).enumerate() {
        pack_b(b, panel * nr, nr, o);
    }
}

/// `C = A·B` (or continued), `A` packed, `B` packed into panels of
/// `K::NR` columns, `C` row-major `A.rows × n`, on the calling thread.
pub(crate) fn run_packed<K: Micro>(
    kernel: K,
    a: &PackedA,
    b: &[f32],
    n: usize,
    c: &mut [f32],
    init: Init,
) {
    let (m, k) = (a.m, a.k);
    let (mr, nr) = (K::MR, K::NR);
    assert_eq!(a.mr, mr, "packed for another kernel");
    assert_eq!(c.len(), m * n, "output size");
    assert!(b.len() >= packed_b_len(k, n, nr), "packed B size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if init == Init::Zero {
            c.fill(0.0);
        }
        return;
    }
    // Panels outer, row blocks inner: one panel of B stays in cache while
    // every row block of the (small, already packed) A passes over it.
    for (panel, bp) in b.chunks_exact(k * nr).take(n.div_ceil(nr)).enumerate() {
        let j0 = panel * nr;
        let width = nr.min(n - j0);
        for (bi, ap) in a.data.chunks_exact(k * mr).enumerate() {
            let i0 = bi * mr;
            let height = mr.min(m - i0);
            let rows = &mut c[i0 * n..(i0 + height) * n];
            tile_into(kernel, k, ap, bp, rows, n, j0, height, width, init);
        }
    }
}

/// One tile of `C` at row block `rows` (its first row first), columns
/// `j0 .. j0 + width`, through a scratch tile at the edges.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_into<K: Micro>(
    kernel: K,
    k: usize,
    ap: &[f32],
    bp: &[f32],
    rows: &mut [f32],
    n: usize,
    j0: usize,
    height: usize,
    width: usize,
    init: Init,
) {
    let (mr, nr) = (K::MR, K::NR);
    if height == mr && width == nr {
        kernel.tile(k, ap, bp, &mut rows[j0..], n, init);
    } else {
        let mut scratch = [0.0f32; MAX_TILE];
        if init == Init::Accumulate {
            for r in 0..height {
                scratch[r * nr..r * nr + width]
                    .copy_from_slice(&rows[r * n + j0..r * n + j0 + width]);
            }
        }
        kernel.tile(k, ap, bp, &mut scratch, nr, init);
        for r in 0..height {
            rows[r * n + j0..r * n + j0 + width].copy_from_slice(&scratch[r * nr..r * nr + width]);
        }
    }
}

/// Work that runs on whichever micro-kernel the kernel path has
/// ([`super::dispatch::Gemm::task`]): generic over the kernel, so a
/// convolution's packing matches its tile shape.
pub(crate) trait KernelTask {
    /// What the work gives.
    type Output;
    /// Does the work with `kernel`.
    fn run<K: Micro>(self, kernel: K) -> Self::Output;
}

/// Products smaller than this many multiply-adds run on the calling
/// thread: handing them out costs more than it saves. (Measured on the
/// 2-core EPYC: at 2^19 the paper's MLP, whose largest product is
/// 64 × 784 × 128 = 6.4 M, ran 25 % slower on 2 threads than on 1,
/// 0.28 against 0.22 s per epoch, waking the pool for products of tens of
/// microseconds; the VGG's convolutions, hundreds of millions each, gain
/// 1.4× from the second core.)
const PARALLEL_MIN_WORK: usize = 1 << 24;

/// `C = A·B` (or `C = C + A·B` continued, [`Init::Accumulate`]) with the
/// micro-kernel `kernel`. `c` is row-major `A.rows × B.cols`.
pub(crate) fn gemm<K: Micro>(kernel: K, a: View<'_>, b: View<'_>, c: &mut [f32], init: Init) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(a.cols, b.rows, "inner dimensions");
    assert_eq!(c.len(), m * n, "output size");
    assert!(K::MR * K::NR <= MAX_TILE);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if init == Init::Zero {
            c.fill(0.0);
        }
        return;
    }
    let (mr, nr) = (K::MR, K::NR);
    let panels = n.div_ceil(nr);
    let mut packed_b = threads::take_scratch(&PACKED_B, panels * k * nr);
    for (panel, out) in packed_b.chunks_exact_mut(k * nr).enumerate() {
        pack_b(b, panel * nr, nr, out);
    }
    let packed = &packed_b;
    // One task per block of MR rows of C: its rows are its own, so tasks
    // never share an output (nor a reduction). `pack_a` rewrites every
    // value of its buffer, so one buffer serves a thread's blocks.
    let block = |packed_a: &mut Vec<f32>, (bi, rows): (usize, &mut [f32])| {
        pack_a(a, bi * mr, mr, packed_a);
        let height = rows.len() / n;
        for (panel, bp) in packed.chunks_exact(k * nr).enumerate() {
            let j0 = panel * nr;
            let width = nr.min(n - j0);
            tile_into(kernel, k, packed_a, bp, rows, n, j0, height, width, init);
        }
    };
    let blocks = m.div_ceil(mr);
    if blocks > 1 && m * n * k >= PARALLEL_MIN_WORK && threads::count() > 1 {
        threads::install(|| {
            c.par_chunks_mut(mr * n)
                .enumerate()
                .for_each_init(|| vec![0.0f32; k * mr], block)
        });
    } else {
        let mut packed_a = vec![0.0f32; k * mr];
        for job in c.chunks_mut(mr * n).enumerate() {
            block(&mut packed_a, job);
        }
    }
    threads::keep_scratch(&PACKED_B, packed_b);
}

thread_local! {
    /// [`gemm`]'s packed right operand, kept on the calling thread from
    /// one product to the next (the paper MLP packs its 784 × 128 weights
    /// three times a step): `pack_b` writes every value of its panels, so
    /// the buffer needs no clearing.
    static PACKED_B: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests;
