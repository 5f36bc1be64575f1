//! The float types the kernels run in, and the dot product every kernel family shares.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

/// A float type a kernel can compute in: `f32` (the `cpu` backend) or `f64` (the `reference` backend).
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
    + 'static
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// The nearest value of this type (round to nearest even).
    fn from_f64(v: f64) -> Self;
    /// The value widened to f64 (exact for both types).
    fn to_f64(self) -> f64;
    /// Square root, correctly rounded.
    fn sqrt(self) -> Self;
    /// Natural exponential (for f32 the canonical one of `docs/numerics.md`, the same bits as on CUDA).
    fn exp(self) -> Self;
}

macro_rules! impl_real {
    ($t:ty, $exp:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            /// f32: the canonical exponential [`super::exp_f32`] (bit-identical to the CUDA kernels'); f64:
            /// the platform's `exp` (the `reference` backend, far below f32 resolution).
            #[inline]
            fn exp(self) -> Self {
                $exp(self)
            }
        }
    };
}

impl_real!(f32, super::exp::exp_f32);
impl_real!(f64, f64::exp);

/// Number of independent partial sums in [`dot`]: sixteen lanes let the compiler vectorise the loop and
/// make the rounding error grow with `n / 16` instead of `n`. The same count and order as
/// [`crate::quant::dot_row`], so one dot-product definition serves weights and activations alike.
pub(super) const LANES: usize = 16;

/// The dot product of `a` and `b`, accumulated in `F`.
///
/// Operation order (the definition, shared with [`crate::quant::dot_row`]): the product `a[i] * b[i]`
/// is added to partial sum `i % 16` in increasing `i`; the partial sums are then reduced by the halving
/// tree `s[j] += s[j + h]` for `h = 8, 4, 2, 1`, and the result is `s[0]`. So for a decoded weight row
/// `w = dequantize_row(row)`, `dot(&w, x) == dot_row(ty, row, x)` bit for bit.
///
/// # Panics
/// If `a` and `b` differ in length.
pub fn dot<F: Real>(a: &[F], b: &[F]) -> F {
    assert_eq!(a.len(), b.len(), "dot: operands differ in length");
    let mut acc = [F::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            let hi = acc[l + width];
            acc[l] += hi;
        }
        width /= 2;
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn dot_matches_an_exact_sum_of_products() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for n in [0, 1, 7, 8, 9, 64, 257, 2048] {
            let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            // Products of two f32 are exact in f64, and the f64 sum of n <= 2048 of them carries at most
            // ~n * 2^-53 relative error: an exact reference at f32 resolution.
            let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let abs_sum: f64 = a.iter().zip(&b).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum();
            let got = dot(&a, &b) as f64;
            // Sixteen lanes of n/16 sequential additions plus a 4-level tree: each of the (n/8 + 3) roundings
            // is at most 2^-24 relative to the running sum, bounded by the sum of |products|; one more for
            // rounding each product to f32.
            let bound = (n as f64 / 16.0 + 6.0) * f32::EPSILON as f64 / 2.0 * abs_sum + f64::MIN_POSITIVE;
            assert!((got - exact).abs() <= bound, "n={n}: {got} vs {exact} (bound {bound})");
        }
    }

    #[test]
    fn dot_of_a_decoded_row_is_dot_row_bit_for_bit() {
        use crate::GgmlType;
        use crate::quant::{dequantize_row, dot_row, quantize_row};
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for ty in GgmlType::ALL {
            for n in [256usize, 512, 768] {
                let src: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
                let mut row = vec![0u8; ty.row_bytes(n).expect("whole blocks")];
                quantize_row(ty, &src, &mut row);
                let mut w = vec![0f32; n];
                dequantize_row(ty, &row, &mut w);
                assert_eq!(dot(&w, &x).to_bits(), dot_row(ty, &row, &x).to_bits(), "{ty} n={n}");
            }
        }
    }

    #[test]
    fn dot_in_f64_is_exact_on_integers() {
        let a: Vec<f64> = (0..37).map(|i| i as f64).collect();
        let b: Vec<f64> = (0..37).map(|i| (i % 5) as f64 - 2.0).collect();
        let expected: f64 = (0..37).map(|i| i as f64 * ((i % 5) as f64 - 2.0)).sum();
        assert_eq!(dot(&a, &b), expected);
    }
}
