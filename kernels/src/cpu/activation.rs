//! The SwiGLU expert activation (Shazeer 2020): `silu(gate) * up`, as in transformers `Qwen3MoeMLP`.

use super::real::Real;

/// `x * sigmoid(x) = x / (1 + exp(-x))`; finite for every finite `x` (large negative `x` gives -0).
#[inline]
pub fn silu<F: Real>(x: F) -> F {
    x / (F::ONE + (-x).exp())
}

/// `out[i] = silu(gate[i]) * up[i]`.
///
/// # Panics
/// If the three slices differ in length.
pub fn swiglu<F: Real>(gate: &[F], up: &[F], out: &mut [F]) {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up lengths");
    assert_eq!(gate.len(), out.len(), "swiglu: output length");
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_matches_x_times_sigmoid() {
        for i in -80..=80 {
            let x = i as f64 / 8.0;
            let want = x * (1.0 / (1.0 + (-x).exp()));
            // Two formulations of the same value: a few ulp apart.
            assert!((silu(x) - want).abs() <= 4.0 * f64::EPSILON * want.abs().max(f64::MIN_POSITIVE));
            let got32 = silu(x as f32) as f64;
            // f32 exp is within a few ulp; 1e-6 relative covers it plus the division.
            assert!((got32 - want).abs() <= 1e-6 * want.abs().max(1e-30), "x={x}: {got32} vs {want}");
        }
    }

    #[test]
    fn extreme_inputs_stay_finite() {
        assert_eq!(silu(-1e4f32), 0.0);
        assert_eq!(silu(1e4f32), 1e4);
    }

    #[test]
    fn swiglu_multiplies_by_up() {
        let mut out = [0.0f64; 3];
        swiglu(&[0.0, 1.0, -2.0], &[5.0, 2.0, 3.0], &mut out);
        assert_eq!(out[0], 0.0);
        // Values below 2 in magnitude, three or four roundings apart: 1e-15.
        assert!((out[1] - 2.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-15);
        assert!((out[2] - 3.0 * -2.0 / (1.0 + 2.0f64.exp())).abs() < 1e-15);
    }
}
