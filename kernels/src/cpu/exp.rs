//! The one f32 exponential of the canonical operation order (`docs/numerics.md`, item 4), used by every
//! f32 softmax (router and attention) and SiLU on both the `cpu` and the `cuda` backends.
//!
//! Neither the platform's `expf` nor CUDA's is used: their results differ in the last bit for some
//! inputs, which would make the two backends' traces differ. This one is built from correctly rounded
//! f32 additions, subtractions and multiplications only (Rust never contracts them into an FMA; the CUDA
//! twin `exact_exp` in `exact.cu` writes `__fadd_rn` / `__fmul_rn`), so it gives the same bits
//! everywhere:
//!
//! 1. `k = round(x * log2(e))` by the round-to-nearest-even of adding and subtracting `1.5 * 2^23`;
//! 2. Cody-Waite reduction `r = (x - k * LN2_HI) - k * LN2_LO`, where `LN2_HI` has 9 significant bits so
//!    `k * LN2_HI` is exact for `|k| <= 128`;
//! 3. `exp(r) = ((P(r) * r²) + r) + 1` on `|r| <= ln2 / 2` with the degree-5 polynomial `P` of Cephes'
//!    `expf` (Moshier 1984), evaluated by Horner's rule;
//! 4. the result times `2^k`, built from the exponent bits (`2^127 * 2` for `k = 128`).
//!
//! Inputs above `ln(f32::MAX)` give `+inf`, inputs below `-87.33655` (just under `ln` of the smallest
//! normal) give `+0`, NaN propagates. Accuracy: within 2 ulp of the exact value on the normal range
//! (tested against f64 below).

/// `log2(e)` rounded to f32.
const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
/// High part of `ln 2`: `0.693359375`, 9 significant bits.
const LN2_HI: f32 = f32::from_bits(0x3f31_8000);
/// `ln 2 - LN2_HI`, rounded to f32 (`-2.12194440e-4`).
const LN2_LO: f32 = f32::from_bits(0xb95e_8083);
/// `1.5 * 2^23`: adding and subtracting it rounds an f32 of magnitude below `2^22` to an integer.
const ROUND_MAGIC: f32 = f32::from_bits(0x4b40_0000);
/// Above this `exp` overflows f32: `88.72283935546875`.
const OVERFLOW: f32 = f32::from_bits(0x42b1_7218);
/// Below this the result is flushed to `+0`: `-87.3365478515625`.
const UNDERFLOW: f32 = f32::from_bits(0xc2ae_ac50);
/// Cephes `expf` coefficients, highest degree first (`1.9875691500e-4 ... 5.0000001201e-1`).
const POLY: [f32; 6] = [
    f32::from_bits(0x3950_6967),
    f32::from_bits(0x3ab7_43ce),
    f32::from_bits(0x3c08_8908),
    f32::from_bits(0x3d2a_a9c1),
    f32::from_bits(0x3e2a_aaaa),
    f32::from_bits(0x3f00_0000),
];

/// `e^x` in f32, in the canonical operation order described in the module documentation.
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > OVERFLOW {
        return f32::INFINITY;
    }
    if x < UNDERFLOW {
        return 0.0;
    }
    let k = (x * LOG2E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = POLY[0];
    for &c in &POLY[1..] {
        p = p * r + c;
    }
    let e = (p * (r * r) + r) + 1.0;
    // k is an integer in [-126, 128] here (|x| <= 88.73).
    let k = k as i32;
    if k > 127 {
        return e * f32::from_bits(254 << 23) * 2.0;
    }
    e * f32::from_bits(((k + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between `got` and the f64 value `want` (at `got`'s binade).
    fn ulps(got: f32, want: f64) -> f64 {
        let ulp = (got.abs() as f64).max(f32::MIN_POSITIVE as f64) * f32::EPSILON as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn within_two_ulp_of_f64_on_the_normal_range() {
        let mut worst = 0.0f64;
        let n = 200_000;
        for i in 0..=n {
            let x = -87.0 + 175.5 * i as f32 / n as f32;
            let got = exp_f32(x);
            worst = worst.max(ulps(got, (x as f64).exp()));
        }
        // Cephes' polynomial is good to ~1 ulp on the reduced range; the scaling by 2^k is exact and
        // the Cody-Waite reduction loses under half an ulp: 2 ulp bounds the whole.
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    #[test]
    fn edge_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        // Near the overflow bound (k = 128, the 2^127 * 2 branch) the result is finite and accurate.
        let big = exp_f32(88.7);
        assert!(big.is_finite() && ulps(big, (88.7f32 as f64).exp()) <= 2.0, "{big}");
        // Just above the underflow bound: about the smallest normal.
        let small = exp_f32(-87.3);
        assert!(ulps(small, (-87.3f32 as f64).exp()) <= 2.0, "{small}");
    }
}
