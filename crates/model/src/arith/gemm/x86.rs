//! The x86-64 micro-kernels, written with explicit vector types
//! (`std::arch` intrinsics): each vector lane is one output of the tile and
//! adds its products in order, so the lanes never meet (no horizontal sum,
//! no gather or scatter).
//!
//! | kernel | tile | per term |
//! |---|---|---|
//! | [`Avx512`] | 8 × 32: 16 `zmm` accumulators | `vfmadd…ps zmm` (the FMA is AVX-512F's own) |
//! | [`Avx2`] | 6 × 16: 12 `ymm` accumulators | `vfmadd…ps ymm` (FMA3) |
//! | [`Sse2`] | 4 × 8: 16 `xmm` pairs in binary64 | the software FMA of `docs/arithmetic.md`, two outputs per instruction |
//!
//! A value of a kernel type exists only after the CPU was checked for its
//! instructions (`detect`), which is what makes calling the
//! `#[target_feature]` functions sound. This module is the engine's only
//! `unsafe` code besides nothing: the intrinsics that read and write
//! through raw pointers, inside bounds the safe wrappers assert.
//!
//! Over 600 lines: three kernels (AVX-512, AVX2 + FMA, SSE2 with the
//! software FMA), each with its plain, gathered and indirect entry points,
//! side by side so that their order of operations can be compared line by
//! line.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::{Init, Micro};

/// 8 × 32 tiles with AVX-512F.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// The kernel, if this CPU has AVX-512F.
    pub(crate) fn detect() -> Option<Self> {
        std::arch::is_x86_feature_detected!("avx512f").then_some(Avx512(()))
    }
}

impl Micro for Avx512 {
    const MR: usize = 8;
    const NR: usize = 32;

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
        super::check_gather_a(k, a, rows, 8, cols, b, 32, c, ldc);
        // SAFETY: `self` proves the CPU runs the kernel's instructions;
        // every index into `a` (row offset plus column offset), `b` and
        // `c` is within the bounds just checked.
        unsafe {
            avx512_8x32_gather_a(
                k,
                a.as_ptr(),
                rows.as_ptr(),
                cols.as_ptr(),
                b.as_ptr(),
                c.as_mut_ptr(),
                ldc,
                init == Init::Accumulate,
            )
        }
    }

    fn tile(self, k: usize, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize, init: Init) {
        assert!(a.len() >= k * 8 && b.len() >= k * 32 && c.len() >= 7 * ldc + 32);
        // SAFETY: `self` exists only where AVX-512F was detected; the
        // kernel reads `k·8` values of `a`, `k·32` of `b` and reads and
        // writes 8 rows of 32 values of `c`, `ldc` apart: asserted above.
        unsafe {
            avx512_8x32(
                k,
                a.as_ptr(),
                b.as_ptr(),
                c.as_mut_ptr(),
                ldc,
                init == Init::Accumulate,
            )
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
        super::check_indirect(k, a, 8, b, 32, offsets, c, ldc);
        // SAFETY: `self` proves the CPU runs the kernel's instructions;
        // every read of `a`, `b` (at each offset) and `c` is within the
        // bounds just checked.
        unsafe {
            avx512_8x32_indirect(
                k,
                a.as_ptr(),
                b.as_ptr(),
                offsets.as_ptr(),
                c.as_mut_ptr(),
                ldc,
            )
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn avx512_8x32_indirect(
    k: usize,
    mut a: *const f32,
    b: *const f32,
    offsets: *const usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    for p in 0..k {
        let bp = b.add(*offsets.add(p));
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*a.add(r));
            row[0] = _mm512_fmadd_ps(x, b0, row[0]);
            row[1] = _mm512_fmadd_ps(x, b1, row[1]);
        }
        a = a.add(8);
    }
    for (r, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * ldc), row[0]);
        _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn avx512_8x32(
    k: usize,
    mut a: *const f32,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = _mm512_loadu_ps(c.add(r * ldc));
            row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
        }
    }
    for _ in 0..k {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*a.add(r));
            row[0] = _mm512_fmadd_ps(x, b0, row[0]);
            row[1] = _mm512_fmadd_ps(x, b1, row[1]);
        }
        a = a.add(8);
        b = b.add(32);
    }
    for (r, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * ldc), row[0]);
        _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
    }
}

/// 6 × 16 tiles with AVX2 and FMA3.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// The kernel, if this CPU has AVX2 and FMA3.
    pub(crate) fn detect() -> Option<Self> {
        (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
            .then_some(Avx2(()))
    }
}

impl Micro for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;

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
        super::check_gather_a(k, a, rows, 6, cols, b, 16, c, ldc);
        // SAFETY: `self` proves the CPU runs the kernel's instructions;
        // every index into `a` (row offset plus column offset), `b` and
        // `c` is within the bounds just checked.
        unsafe {
            avx2_6x16_gather_a(
                k,
                a.as_ptr(),
                rows.as_ptr(),
                cols.as_ptr(),
                b.as_ptr(),
                c.as_mut_ptr(),
                ldc,
                init == Init::Accumulate,
            )
        }
    }

    fn tile(self, k: usize, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize, init: Init) {
        assert!(a.len() >= k * 6 && b.len() >= k * 16 && c.len() >= 5 * ldc + 16);
        // SAFETY: `self` exists only where AVX2 and FMA were detected; the
        // bounds of every access are asserted above (as for `Avx512`).
        unsafe {
            avx2_6x16(
                k,
                a.as_ptr(),
                b.as_ptr(),
                c.as_mut_ptr(),
                ldc,
                init == Init::Accumulate,
            )
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
        super::check_indirect(k, a, 6, b, 16, offsets, c, ldc);
        // SAFETY: `self` proves the CPU runs the kernel's instructions;
        // every read of `a`, `b` (at each offset) and `c` is within the
        // bounds just checked.
        unsafe {
            avx2_6x16_indirect(
                k,
                a.as_ptr(),
                b.as_ptr(),
                offsets.as_ptr(),
                c.as_mut_ptr(),
                ldc,
            )
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_6x16_indirect(
    k: usize,
    mut a: *const f32,
    b: *const f32,
    offsets: *const usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    for p in 0..k {
        let bp = b.add(*offsets.add(p));
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm256_set1_ps(*a.add(r));
            row[0] = _mm256_fmadd_ps(x, b0, row[0]);
            row[1] = _mm256_fmadd_ps(x, b1, row[1]);
        }
        a = a.add(6);
    }
    for (r, row) in acc.iter().enumerate() {
        _mm256_storeu_ps(c.add(r * ldc), row[0]);
        _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_6x16(
    k: usize,
    mut a: *const f32,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = _mm256_loadu_ps(c.add(r * ldc));
            row[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
        }
    }
    for _ in 0..k {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm256_set1_ps(*a.add(r));
            row[0] = _mm256_fmadd_ps(x, b0, row[0]);
            row[1] = _mm256_fmadd_ps(x, b1, row[1]);
        }
        a = a.add(6);
        b = b.add(16);
    }
    for (r, row) in acc.iter().enumerate() {
        _mm256_storeu_ps(c.add(r * ldc), row[0]);
        _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
    }
}

/// 4 × 8 tiles on baseline x86-64 (SSE2), with the software FMA
/// (`docs/arithmetic.md`, "The software FMA") two outputs at a time in
/// binary64 lanes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sse2(());

impl Sse2 {
    /// The kernel: SSE2 is part of x86-64.
    pub(crate) fn detect() -> Option<Self> {
        Some(Sse2::baseline())
    }

    /// The kernel (x86-64 always has SSE2).
    pub(crate) const fn baseline() -> Self {
        Sse2(())
    }
}

impl Micro for Sse2 {
    const MR: usize = 4;
    const NR: usize = 8;

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
        super::check_gather_a(k, a, rows, 4, cols, b, 8, c, ldc);
        // SAFETY: `self` proves the CPU runs the kernel's instructions;
        // every index into `a` (row offset plus column offset), `b` and
        // `c` is within the bounds just checked.
        unsafe {
            sse2_4x8_gather_a(
                k,
                a.as_ptr(),
                rows.as_ptr(),
                cols.as_ptr(),
                b.as_ptr(),
                c.as_mut_ptr(),
                ldc,
                init == Init::Accumulate,
            )
        }
    }

    fn tile(self, k: usize, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize, init: Init) {
        assert!(a.len() >= k * 4 && b.len() >= k * 8 && c.len() >= 3 * ldc + 8);
        // SAFETY: SSE2 is baseline on x86-64; the bounds of every access
        // are asserted above.
        unsafe {
            sse2_4x8(
                k,
                a.as_ptr(),
                b.as_ptr(),
                c.as_mut_ptr(),
                ldc,
                init == Init::Accumulate,
            )
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
        super::check_indirect(k, a, 4, b, 8, offsets, c, ldc);
        // SAFETY: `self` proves the CPU runs the kernel's instructions;
        // every read of `a`, `b` (at each offset) and `c` is within the
        // bounds just checked.
        unsafe {
            sse2_4x8_indirect(
                k,
                a.as_ptr(),
                b.as_ptr(),
                offsets.as_ptr(),
                c.as_mut_ptr(),
                ldc,
            )
        }
    }
}

/// `fma(a, b, c)` in both lanes, `a`, `b`, `c` binary32 values held in
/// binary64 lanes; the result rounded to binary32 and widened back
/// (exactly). The steps of `math::fma`, lane by lane.
#[inline(always)]
unsafe fn soft_fma_pd(a: __m128d, b: __m128d, c: __m128d) -> __m128d {
    let zero = _mm_setzero_pd();
    let one = _mm_set1_epi64x(1);
    // The product of two binary32 values is exact in binary64.
    let p = _mm_mul_pd(a, b);
    let s = _mm_add_pd(p, c);
    // TwoSum: e is the exact rounding error of s.
    let v = _mm_sub_pd(s, p);
    let e = _mm_add_pd(_mm_sub_pd(p, _mm_sub_pd(s, v)), _mm_sub_pd(c, v));
    // |s| < ∞ (false for NaN and ±∞).
    let abs = _mm_castsi128_pd(_mm_set1_epi64x(i64::MAX));
    let finite = _mm_cmplt_pd(_mm_and_pd(s, abs), _mm_set1_pd(f64::INFINITY));
    let inexact = _mm_cmpneq_pd(e, zero);
    let bits = _mm_castpd_si128(s);
    // The last significand bit is 0: compare the low 32-bit halves, then
    // copy each low half's answer over its 64-bit lane.
    let even32 = _mm_cmpeq_epi32(_mm_and_si128(bits, one), _mm_setzero_si128());
    let even = _mm_shuffle_epi32::<0b10_10_00_00>(even32);
    let inexact_even = _mm_and_si128(_mm_castpd_si128(_mm_and_pd(finite, inexact)), even);
    // One ulp away from zero (+1 on the bits) when e and s have the same
    // sign, towards it (−1, all ones) when not.
    let towards = _mm_castpd_si128(_mm_xor_pd(_mm_cmpgt_pd(e, zero), _mm_cmpgt_pd(s, zero)));
    let step = _mm_and_si128(inexact_even, _mm_or_si128(towards, one));
    let odd = _mm_castsi128_pd(_mm_add_epi64(bits, step));
    _mm_cvtps_pd(_mm_cvtpd_ps(odd))
}

unsafe fn sse2_4x8_indirect(
    k: usize,
    mut a: *const f32,
    b: *const f32,
    offsets: *const usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm_setzero_pd(); 4]; 4];
    for p in 0..k {
        let bp = b.add(*offsets.add(p));
        let lo = _mm_loadu_ps(bp);
        let hi = _mm_loadu_ps(bp.add(4));
        let bv = [
            _mm_cvtps_pd(lo),
            _mm_cvtps_pd(_mm_movehl_ps(lo, lo)),
            _mm_cvtps_pd(hi),
            _mm_cvtps_pd(_mm_movehl_ps(hi, hi)),
        ];
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm_set1_pd(f64::from(*a.add(r)));
            for (pair, bq) in row.iter_mut().zip(&bv) {
                *pair = soft_fma_pd(x, *bq, *pair);
            }
        }
        a = a.add(4);
    }
    for (r, row) in acc.iter().enumerate() {
        for (q, pair) in row.iter().enumerate() {
            _mm_store_sd(
                c.add(r * ldc + 2 * q).cast(),
                _mm_castps_pd(_mm_cvtpd_ps(*pair)),
            );
        }
    }
}

unsafe fn sse2_4x8(
    k: usize,
    mut a: *const f32,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    // acc[r][q]: outputs (r, 2q) and (r, 2q + 1).
    let mut acc = [[_mm_setzero_pd(); 4]; 4];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            for (q, pair) in row.iter_mut().enumerate() {
                *pair = _mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd(c.add(r * ldc + 2 * q).cast())));
            }
        }
    }
    for _ in 0..k {
        let lo = _mm_loadu_ps(b);
        let hi = _mm_loadu_ps(b.add(4));
        let bv = [
            _mm_cvtps_pd(lo),
            _mm_cvtps_pd(_mm_movehl_ps(lo, lo)),
            _mm_cvtps_pd(hi),
            _mm_cvtps_pd(_mm_movehl_ps(hi, hi)),
        ];
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm_set1_pd(f64::from(*a.add(r)));
            for (pair, bq) in row.iter_mut().zip(&bv) {
                *pair = soft_fma_pd(x, *bq, *pair);
            }
        }
        a = a.add(4);
        b = b.add(8);
    }
    for (r, row) in acc.iter().enumerate() {
        for (q, pair) in row.iter().enumerate() {
            _mm_store_sd(
                c.add(r * ldc + 2 * q).cast(),
                _mm_castps_pd(_mm_cvtpd_ps(*pair)),
            );
        }
    }
}

#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx512_8x32_gather_a(
    k: usize,
    a: *const f32,
    rows: *const usize,
    cols: *const usize,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let bases: [*const f32; 8] = std::array::from_fn(|r| a.add(*rows.add(r)));
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = _mm512_loadu_ps(c.add(r * ldc));
            row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
        }
    }
    for p in 0..k {
        let j = *cols.add(p);
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (row, base) in acc.iter_mut().zip(&bases) {
            let x = _mm512_set1_ps(*base.add(j));
            row[0] = _mm512_fmadd_ps(x, b0, row[0]);
            row[1] = _mm512_fmadd_ps(x, b1, row[1]);
        }
        b = b.add(32);
    }
    for (r, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * ldc), row[0]);
        _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
    }
}

#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx2_6x16_gather_a(
    k: usize,
    a: *const f32,
    rows: *const usize,
    cols: *const usize,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let bases: [*const f32; 6] = std::array::from_fn(|r| a.add(*rows.add(r)));
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = _mm256_loadu_ps(c.add(r * ldc));
            row[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
        }
    }
    for p in 0..k {
        let j = *cols.add(p);
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (row, base) in acc.iter_mut().zip(&bases) {
            let x = _mm256_set1_ps(*base.add(j));
            row[0] = _mm256_fmadd_ps(x, b0, row[0]);
            row[1] = _mm256_fmadd_ps(x, b1, row[1]);
        }
        b = b.add(16);
    }
    for (r, row) in acc.iter().enumerate() {
        _mm256_storeu_ps(c.add(r * ldc), row[0]);
        _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn sse2_4x8_gather_a(
    k: usize,
    a: *const f32,
    rows: *const usize,
    cols: *const usize,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let bases: [*const f32; 4] = std::array::from_fn(|r| a.add(*rows.add(r)));
    let mut acc = [[_mm_setzero_pd(); 4]; 4];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            for (q, pair) in row.iter_mut().enumerate() {
                *pair = _mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd(c.add(r * ldc + 2 * q).cast())));
            }
        }
    }
    for p in 0..k {
        let j = *cols.add(p);
        let lo = _mm_loadu_ps(b);
        let hi = _mm_loadu_ps(b.add(4));
        let bv = [
            _mm_cvtps_pd(lo),
            _mm_cvtps_pd(_mm_movehl_ps(lo, lo)),
            _mm_cvtps_pd(hi),
            _mm_cvtps_pd(_mm_movehl_ps(hi, hi)),
        ];
        for (row, base) in acc.iter_mut().zip(&bases) {
            let x = _mm_set1_pd(f64::from(*base.add(j)));
            for (pair, bq) in row.iter_mut().zip(&bv) {
                *pair = soft_fma_pd(x, *bq, *pair);
            }
        }
        b = b.add(8);
    }
    for (r, row) in acc.iter().enumerate() {
        for (q, pair) in row.iter().enumerate() {
            _mm_store_sd(
                c.add(r * ldc + 2 * q).cast(),
                _mm_castps_pd(_mm_cvtpd_ps(*pair)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::check_kernel;
    use super::*;
    use crate::arith::math;

    #[test]
    fn avx512_gives_the_reference_bits() {
        match Avx512::detect() {
            Some(k) => check_kernel(k),
            None => eprintln!("skipped: no AVX-512F on this CPU"),
        }
    }

    #[test]
    fn avx2_gives_the_reference_bits() {
        match Avx2::detect() {
            Some(k) => check_kernel(k),
            None => eprintln!("skipped: no AVX2 + FMA on this CPU"),
        }
    }

    #[test]
    fn sse2_gives_the_reference_bits() {
        check_kernel(Sse2::detect().unwrap_or_else(|| unreachable!()));
    }

    #[test]
    fn the_vector_software_fma_equals_the_scalar_one_on_edge_cases() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::EPSILON,
            1.0 + f32::EPSILON,
            1.0 - f32::EPSILON / 2.0,
            f32::MIN_POSITIVE,
            1.0e-40,
            -1.0e-45,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            3.0,
            1.0 / 3.0,
            16_777_216.0,
            -16_777_217.0,
        ];
        for &a in &specials {
            for &b in &specials {
                for &c in &specials {
                    let want = math::fma(a, b, c);
                    // SAFETY: SSE2 is baseline on x86-64.
                    let got = unsafe {
                        let r = soft_fma_pd(
                            _mm_set1_pd(f64::from(a)),
                            _mm_set1_pd(f64::from(b)),
                            _mm_set1_pd(f64::from(c)),
                        );
                        _mm_cvtsd_f64(r) as f32
                    };
                    if want.is_nan() {
                        assert!(got.is_nan(), "fma({a}, {b}, {c})");
                    } else {
                        assert_eq!(got.to_bits(), want.to_bits(), "fma({a:e}, {b:e}, {c:e})");
                    }
                }
            }
        }
    }
}
