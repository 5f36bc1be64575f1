//! RMSNorm as Qwen3-MoE defines it (transformers `Qwen3MoeRMSNorm`, Zhang & Sennrich 2019).

use super::real::{Real, dot};

/// `out[i] = weight[i] * (x[i] * (1 / sqrt(mean(x²) + eps)))`, every step in `F`.
///
/// The statistic is computed in the working precision (the mean of squares with [`dot`], plus `eps`, one
/// reciprocal square root), multiplied into `x`, and only then scaled by the weight, as transformers does.
/// `x` and `out` may not alias; use a copy to normalise in place.
///
/// # Panics
/// If `x`, `weight` and `out` differ in length, or `x` is empty.
pub fn rms_norm<F: Real>(x: &[F], weight: &[F], eps: F, out: &mut [F]) {
    assert!(!x.is_empty(), "rms_norm: empty vector");
    assert_eq!(x.len(), weight.len(), "rms_norm: weight length");
    assert_eq!(x.len(), out.len(), "rms_norm: output length");
    let mean_sq = dot(x, x) / F::from_f64(x.len() as f64);
    let inv_rms = F::ONE / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv_rms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The textbook formula, in f64.
    fn rms_norm_f64(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        x.iter().zip(w).map(|(v, w)| w * v / (ms + eps).sqrt()).collect()
    }

    fn random(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    #[test]
    fn f64_matches_the_formula_to_round_off() {
        for n in [1, 16, 64, 2048] {
            let (x, w) = (random(n, 1, 3.0), random(n, 2, 1.5));
            let mut out = vec![0.0; n];
            rms_norm(&x, &w, 1e-6, &mut out);
            let want = rms_norm_f64(&x, &w, 1e-6);
            for (a, b) in out.iter().zip(&want) {
                // A handful of roundings of 2^-53 each on values of order |w| * sqrt(n): 1e-14 absolute.
                assert!((a - b).abs() <= 1e-14, "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn f32_matches_the_formula_to_f32_resolution() {
        for n in [16, 256, 2048] {
            let (x, w) = (random(n, 3, 3.0), random(n, 4, 1.5));
            let (x32, w32): (Vec<f32>, Vec<f32>) =
                (x.iter().map(|&v| v as f32).collect(), w.iter().map(|&v| v as f32).collect());
            let mut out = vec![0.0f32; n];
            rms_norm(&x32, &w32, 1e-6, &mut out);
            let xr: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
            let wr: Vec<f64> = w32.iter().map(|&v| v as f64).collect();
            let want = rms_norm_f64(&xr, &wr, 1e-6);
            for (a, b) in out.iter().zip(&want) {
                // The statistic carries ~(n/8 + 5) * 2^-24 relative error (see `dot`), halved by the square
                // root; three more roundings follow. 1e-5 relative covers n = 2048 with margin.
                assert!((*a as f64 - b).abs() <= 1e-5 * b.abs().max(1e-3), "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn unit_weight_output_has_unit_rms() {
        let x = random(100, 5, 10.0);
        let mut out = vec![0.0; 100];
        rms_norm(&x, &vec![1.0; 100], 0.0, &mut out);
        let rms = (out.iter().map(|v| v * v).sum::<f64>() / 100.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-14, "rms {rms}");
    }

    #[test]
    fn eps_keeps_a_zero_vector_finite() {
        let mut out = vec![1.0f32; 4];
        rms_norm(&[0.0f32; 4], &[2.0; 4], 1e-6, &mut out);
        assert_eq!(out, vec![0.0; 4]);
    }
}
