//! Softmax (the max-subtracted form every framework uses).

use super::real::Real;

/// `x[i] <- exp(x[i] - max) / sum_j exp(x[j] - max)`, in `F`, the sum taken in increasing `j`.
///
/// An empty slice is left alone.
pub fn softmax_in_place<F: Real>(x: &mut [F]) {
    let Some(&first) = x.first() else { return };
    let max = x.iter().fold(first, |m, &v| if v > m { v } else { m });
    let mut sum = F::ZERO;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v = *v / sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax_f64(x: &[f64]) -> Vec<f64> {
        let e: Vec<f64> = x.iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn matches_the_formula() {
        let x: Vec<f64> = (0..128).map(|i| ((i * 29 % 17) as f64 - 8.0) / 4.0).collect();
        let mut y = x.clone();
        softmax_in_place(&mut y);
        for (a, b) in y.iter().zip(softmax_f64(&x)) {
            // exp of arguments <= 2 in magnitude and 128 summands: a few ulp of f64.
            assert!((a - b).abs() <= 1e-15, "{a} vs {b}");
        }
        let mut y32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        softmax_in_place(&mut y32);
        for (a, b) in y32.iter().zip(softmax_f64(&x)) {
            // f32 exp (a few ulp) and a 128-term sequential sum (<= 128 * 2^-24 relative): 1e-5 relative.
            assert!((*a as f64 - b).abs() <= 1e-5 * b, "{a} vs {b}");
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let mut y = vec![1000.0f32, 1000.0, -1000.0];
        softmax_in_place(&mut y);
        assert_eq!(y, vec![0.5, 0.5, 0.0]);
    }

    #[test]
    fn empty_is_a_no_op() {
        let mut y: Vec<f64> = Vec::new();
        softmax_in_place(&mut y);
        assert!(y.is_empty());
    }
}
