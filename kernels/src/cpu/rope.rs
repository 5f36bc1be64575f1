//! Rotary position embedding, NEOX ("rotate half") layout, as Qwen3 uses it (transformers
//! `apply_rotary_pos_emb` with `rotate_half`; llama.cpp `LLAMA_ROPE_TYPE_NEOX`).
//!
//! Element `i` of a head pairs with element `i + head_dim/2`; the pair rotates by
//! `pos * theta^(-2i/head_dim)`. Angles, sines and cosines are computed in f64 and rounded once to the
//! working type, in one table shared by every head and layer.

use super::real::Real;

/// Cosines and sines of the rotation angles, `[position][head_dim / 2]`, grown on demand.
#[derive(Debug, Clone)]
pub struct RopeTable<F> {
    head_dim: usize,
    inv_freq: Vec<f64>,
    cos: Vec<F>,
    sin: Vec<F>,
}

impl<F: Real> RopeTable<F> {
    /// An empty table for heads of `head_dim` (even) and base `theta`.
    ///
    /// # Panics
    /// If `head_dim` is zero or odd.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        assert!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "rope: head_dim {head_dim} must be even and positive"
        );
        // transformers: inv_freq = 1 / theta ** (arange(0, dim, 2) / dim)
        let inv_freq =
            (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        Self { head_dim, inv_freq, cos: Vec::new(), sin: Vec::new() }
    }

    /// Number of positions the table holds.
    pub fn len(&self) -> usize {
        self.cos.len() / (self.head_dim / 2)
    }

    /// Whether the table holds no position yet.
    pub fn is_empty(&self) -> bool {
        self.cos.is_empty()
    }

    /// Makes the table hold positions `0..n_pos`.
    pub fn ensure(&mut self, n_pos: usize) {
        for pos in self.len()..n_pos {
            for &f in &self.inv_freq {
                let angle = pos as f64 * f;
                self.cos.push(F::from_f64(angle.cos()));
                self.sin.push(F::from_f64(angle.sin()));
            }
        }
    }

    /// The cosines and sines of every position held, each laid out `[position][head_dim / 2]` (what the
    /// CUDA backend uploads under the `exact` policy, so both sides rotate by the same f32 values).
    pub fn tables(&self) -> (&[F], &[F]) {
        (&self.cos, &self.sin)
    }

    /// Rotates one head `x` (length `head_dim`) to position `pos`:
    /// `x[i], x[i+h] <- x[i]·cos - x[i+h]·sin, x[i+h]·cos + x[i]·sin` with `h = head_dim / 2`.
    ///
    /// # Panics
    /// If `x` is not one head long or `pos` is not in the table (call [`RopeTable::ensure`] first).
    pub fn apply(&self, x: &mut [F], pos: usize) {
        assert_eq!(x.len(), self.head_dim, "rope: head length");
        assert!(pos < self.len(), "rope: position {pos} not in the table of {}", self.len());
        let half = self.head_dim / 2;
        let (cos, sin) = (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half]);
        let (lo, hi) = x.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotation written as a complex multiplication with the angle from `exp(-ln(theta) * 2i/d)`.
    fn rotate_f64(x: &[f64], pos: usize, theta: f64) -> Vec<f64> {
        let d = x.len();
        let h = d / 2;
        let mut out = vec![0.0; d];
        for i in 0..h {
            let angle = pos as f64 * (-(theta.ln()) * (2 * i) as f64 / d as f64).exp();
            let (re, im) = (x[i], x[i + h]);
            let (c, s) = (angle.cos(), angle.sin());
            out[i] = re * c - im * s;
            out[i + h] = re * s + im * c;
        }
        out
    }

    fn head(d: usize) -> Vec<f64> {
        (0..d).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect()
    }

    #[test]
    fn f64_rotation_matches_complex_multiplication() {
        for (d, theta) in [(16, 1e4), (64, 1e4), (128, 1e6), (128, 1e7)] {
            let mut table = RopeTable::<f64>::new(d, theta);
            table.ensure(300);
            for pos in [0, 1, 2, 17, 299] {
                let mut x = head(d);
                table.apply(&mut x, pos);
                let want = rotate_f64(&head(d), pos, theta);
                for (a, b) in x.iter().zip(&want) {
                    // Angles up to 299 rad: cos/sin of an argument carrying ~300 * 2^-53 absolute error
                    // from the frequency computed two ways; 1e-12 covers it.
                    assert!((a - b).abs() < 1e-12, "d={d} pos={pos}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn f32_rotation_matches_to_f32_resolution_and_keeps_the_norm() {
        let mut table = RopeTable::<f32>::new(64, 1e6);
        table.ensure(50);
        let x0: Vec<f32> = head(64).iter().map(|&v| v as f32).collect();
        let mut x = x0.clone();
        table.apply(&mut x, 49);
        let want = rotate_f64(&x0.iter().map(|&v| v as f64).collect::<Vec<_>>(), 49, 1e6);
        for (a, b) in x.iter().zip(&want) {
            // cos/sin rounded to f32, two products, a sum, the input pair: at most ~6 roundings of 2^-24
            // relative on terms of magnitude <= 1.7 * sqrt(2): 1e-6.
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        let norm = |v: &[f32]| v.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
        assert!((norm(&x) - norm(&x0)).abs() < 1e-5 * norm(&x0));
    }

    #[test]
    fn position_zero_is_the_identity() {
        let mut table = RopeTable::<f64>::new(16, 1e4);
        table.ensure(1);
        let mut x = head(16);
        table.apply(&mut x, 0);
        assert_eq!(x, head(16));
    }

    #[test]
    fn the_table_grows_without_changing_earlier_positions() {
        let mut a = RopeTable::<f32>::new(8, 1e4);
        a.ensure(3);
        let mut b = RopeTable::<f32>::new(8, 1e4);
        b.ensure(1);
        b.ensure(3);
        assert_eq!(a.len(), 3);
        let (mut x, mut y) = (vec![1.0f32; 8], vec![1.0f32; 8]);
        a.apply(&mut x, 2);
        b.apply(&mut y, 2);
        assert_eq!(x, y);
    }
}
