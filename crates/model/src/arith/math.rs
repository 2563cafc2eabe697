//! `exp` and `ln` in binary32 from `+ − × ÷`, comparisons and bit
//! operations only: no platform libm (which differs between systems and
//! versions), no fused multiply-add, so every machine gets the same bits.
//! The polynomials are the classic Cephes minimax fits (about 1 ulp over
//! the reduced range); `docs/arithmetic.md` writes out the exact sequence.

/// `a ⊗ b ⊕ c` rounded once (IEEE-754 fusedMultiplyAdd), without a
/// hardware FMA and without libm: the product of two binary32 values is
/// exact in binary64, the sum is rounded to binary64 *to odd* (the
/// rounding error, exact by TwoSum, decides the last bit), and the final
/// conversion to binary32 then rounds correctly (binary64 carries more
/// than 24 + 2 bits). The same bits as a hardware FMA, on every input.
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    let p = f64::from(a) * f64::from(b);
    let c = f64::from(c);
    let s = p + c;
    // TwoSum: the exact rounding error of `s` (zero for an exact sum; NaN
    // only when `s` is not finite, which the mask below excludes).
    let v = s - p;
    let e = (p - (s - v)) + (c - v);
    let bits = s.to_bits();
    // Round to odd: an inexact, even `s` moves one ulp towards the exact
    // value. Written without branches so that kernels vectorise it.
    let inexact_even = s.is_finite() & (e != 0.0) & (bits & 1 == 0);
    let away_from_zero = (e > 0.0) == (s > 0.0);
    let step: u64 = match (inexact_even, away_from_zero) {
        (false, _) => 0,
        (true, true) => 1,
        (true, false) => u64::MAX,
    };
    f64::from_bits(bits.wrapping_add(step)) as f32
}

/// `log2(e)` rounded to binary32.
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split so that `n · LN2_HI` is exact for `|n| ≤ 2^15`.
#[allow(clippy::excessive_precision)] // exactly 355/512, written in full
const LN2_HI: f32 = 0.693_359_375;
/// `ln 2 − LN2_HI`.
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 · 2^23`: adding and subtracting it rounds to the nearest integer
/// (ties to even) for `|t| < 2^22`.
const ROUND: f32 = 12_582_912.0;
/// Above this, `exp` overflows to `+∞` (`ln(f32::MAX)` rounds below it).
const EXP_MAX: f32 = 88.722_84;
/// Below this, `exp` is `+0` (half the smallest subnormal is `e^−103.97`).
const EXP_MIN: f32 = -103.972_08;

/// `2^k` for `−126 ≤ k ≤ 127`, built from its exponent bits.
#[inline(always)]
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// `e^x`.
///
/// NaN → NaN; `x > 88.72284` → `+∞`; `x < −103.97208` → `+0`; otherwise
/// `x = n·ln2 + r` with `n = round_even(x ⊗ log2 e)`, `r = (x ⊖ n ⊗ LN2_HI) ⊖
/// n ⊗ LN2_LO`, `e^r` by a degree-7 polynomial, and the result scaled by
/// `2^⌊n/2⌋` then `2^(n − ⌊n/2⌋)` (two exact-or-once-rounded steps, so
/// subnormal results round once).
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return f32::NAN;
    }
    if x > EXP_MAX {
        return f32::INFINITY;
    }
    if x < EXP_MIN {
        return 0.0;
    }
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let z = r * r;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = (p * z + r) + 1.0;
    // |n| ≤ 150 here, so both halves are normal exponents.
    let n = n as i32;
    let half = n.div_euclid(2);
    (y * pow2(half)) * pow2(n - half)
}

/// `ln x`.
///
/// NaN or `x < 0` → NaN; `±0` → `−∞`; `+∞` → `+∞`; otherwise `x = m·2^e`
/// with `m` in `[√½, √2)` (subnormals first scaled by `2^23`), `f = m ⊖ 1`
/// (exact), and `ln x = f + (poly(f)·f·f² ⊕ e·LN2_LO ⊖ ½f²) + e·LN2_HI` in
/// the order written in `docs/arithmetic.md`.
#[inline]
pub fn ln(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    let (x, bias) = if x < f32::MIN_POSITIVE {
        (x * 8_388_608.0, 23)
    } else {
        (x, 0)
    };
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127 - bias;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let f = m - 1.0;
    let z = f * f;
    let mut p = 7.037_683_6e-2_f32;
    p = p * f - 1.151_461e-1;
    p = p * f + 1.167_699_9e-1;
    p = p * f - 1.242_014_1e-1;
    p = p * f + 1.424_932_3e-1;
    p = p * f - 1.666_805_8e-1;
    p = p * f + 2.000_071_5e-1;
    p = p * f - 2.499_999_4e-1;
    p = p * f + 3.333_333e-1;
    let ef = e as f32;
    let mut y = p * f * z;
    y += ef * LN2_LO;
    y -= 0.5 * z;
    let r = f + y;
    r + ef * LN2_HI
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f64::from(f32::from_bits(b32.abs().to_bits() + 1)) - f64::from(b32.abs())).abs();
        (f64::from(a) - b).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulps_of_f64_over_the_normal_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(ulps(exp(x), f64::from(x).exp()));
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst {worst} ulps");
    }

    #[test]
    fn ln_is_within_two_ulps_of_f64() {
        let mut worst = 0.0f64;
        for i in 1..200_000u32 {
            let x = f32::from_bits(0x0080_0000 + i.wrapping_mul(10_651));
            if x.is_finite() && x > 0.0 {
                worst = worst.max(ulps(ln(x), f64::from(x).ln()));
            }
        }
        assert!(worst <= 2.0, "worst {worst} ulps");
    }

    /// `f32::mul_add` compiled without the FMA feature calls the C
    /// library's `fmaf`, which IEEE-754 requires to round once: our
    /// software FMA must agree with it everywhere.
    #[test]
    fn software_fma_equals_the_correctly_rounded_fma() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            1.0e-40,
            -1.0e-45,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::EPSILON,
            1.0 + f32::EPSILON,
            3.0e38,
            1.0e-20,
        ];
        let check = |a: f32, b: f32, c: f32| {
            let want = a.mul_add(b, c);
            let got = fma(a, b, c);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "fma({a:e}, {b:e}, {c:e}) = {got:e}, want {want:e}"
            );
        };
        for &a in &specials {
            for &b in &specials {
                for &c in &specials {
                    check(a, b, c);
                }
            }
        }
        let mut x = 0x1234_5678u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..300_000 {
            let (a, b) = (f32::from_bits(next()), f32::from_bits(next()));
            // c near −a·b makes the cancellation and tie cases common.
            let c = if next() % 2 == 0 {
                f32::from_bits(next())
            } else {
                -(a * b) * (1.0 + f32::from_bits(next() >> 9 | 0x3000_0000))
            };
            check(a, b, c);
        }
    }

    #[test]
    fn special_values_follow_the_written_rules() {
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-104.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        // Subnormal results are produced, not flushed.
        let tiny = exp(-100.0);
        assert!(tiny > 0.0 && tiny < f32::MIN_POSITIVE, "{tiny}");
        // Within one step of the subnormal grid (2^-149).
        assert!((f64::from(tiny) - (-100f64).exp()).abs() <= f64::from(f32::from_bits(1)));
        assert!(ln(f32::NAN).is_nan());
        assert!(ln(-1.0).is_nan());
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert_eq!(ln(-0.0), f32::NEG_INFINITY);
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert_eq!(ln(1.0), 0.0);
        let sub = ln(1e-40);
        assert!((f64::from(sub) - 1e-40f64.ln()).abs() < 1e-5, "{sub}");
    }
}
