//! One f32 row dotted with many activation rows (the prefill's weight-row products), in [`dot`]'s
//! operation order for each of them: bit for bit `dot(a, x_t)` for every token `t`.
//!
//! Four tokens advance together through the row, each in its own sixteen lanes, so one load of the row
//! serves four products and the four addition chains overlap. Every lane of every token still receives
//! its products in increasing index and is reduced by the same halving tree, and Rust never fuses a
//! multiply and an add, so the order, and with it every bit, is [`dot`]'s. The loop is compiled twice,
//! for the baseline and for AVX2 (two 256-bit registers per token's lanes), and the widest one the CPU
//! has runs; the result does not depend on which.

use super::real::{LANES, dot};

/// Tokens per pass through the row: 4 x 16 lanes are 8 AVX2 registers, leaving room for the row.
const TOKENS_PER_PASS: usize = 4;

/// `out[t] = dot(a, &xs[t * a.len()..(t + 1) * a.len()])` for every token row `t` of `xs`.
///
/// # Panics
/// If `xs` does not hold exactly `out.len()` rows of `a.len()` values.
pub fn dot_each(a: &[f32], xs: &[f32], out: &mut [f32]) {
    assert_eq!(xs.len(), a.len() * out.len(), "dot_each: xs must hold out.len() rows of a.len() values");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of the callee.
            return unsafe { dot_each_avx2(a, xs, out) };
        }
    }
    dot_each_portable(a, xs, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_each_avx2(a: &[f32], xs: &[f32], out: &mut [f32]) {
    dot_each_portable(a, xs, out);
}

#[inline(always)]
fn dot_each_portable(a: &[f32], xs: &[f32], out: &mut [f32]) {
    let n = a.len();
    if n == 0 {
        out.fill(0.0);
        return;
    }
    let (a_chunks, a_rest) = a.as_chunks::<LANES>();
    let mut rows = xs.chunks_exact(n);
    let mut outs = out.chunks_exact_mut(TOKENS_PER_PASS);
    for o in &mut outs {
        let x: [&[f32]; TOKENS_PER_PASS] = std::array::from_fn(|_| rows.next().expect("a row per output"));
        let x_chunks: [&[[f32; LANES]]; TOKENS_PER_PASS] = x.map(|x| x.as_chunks::<LANES>().0);
        let mut acc = [[0.0f32; LANES]; TOKENS_PER_PASS];
        for (c, w) in a_chunks.iter().enumerate() {
            for (acc, x) in acc.iter_mut().zip(&x_chunks) {
                let x = &x[c];
                for l in 0..LANES {
                    acc[l] += w[l] * x[l];
                }
            }
        }
        let tail = a_chunks.len() * LANES;
        for (acc, x) in acc.iter_mut().zip(&x) {
            for (l, (&w, &v)) in a_rest.iter().zip(&x[tail..]).enumerate() {
                acc[l] += w * v;
            }
        }
        for (o, acc) in o.iter_mut().zip(acc) {
            *o = halving_sum(acc);
        }
    }
    for (o, x) in outs.into_remainder().iter_mut().zip(rows) {
        *o = dot(a, x);
    }
}

/// `dot`'s reduction: `lane[l] += lane[l + h]` for `l < h`, `h = 8, 4, 2, 1`; then `lane[0]`.
#[inline(always)]
fn halving_sum(mut lanes: [f32; LANES]) -> f32 {
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            lanes[l] += lanes[l + half];
        }
        half /= 2;
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn every_product_is_dot_bit_for_bit() {
        // Values over six binades, so a different order or a fused multiply-add changes low bits; row
        // lengths with and without a remainder of the 16 lanes, token counts covering full passes of 4
        // and every remainder.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut value = || rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-3..3));
        for n in [0usize, 1, 15, 16, 17, 100, 256, 768, 2048, 2049] {
            let a: Vec<f32> = (0..n).map(|_| value()).collect();
            for n_tok in 0..10 {
                let xs: Vec<f32> = (0..n * n_tok).map(|_| value()).collect();
                let mut out = vec![f32::NAN; n_tok];
                dot_each(&a, &xs, &mut out);
                for (t, &got) in out.iter().enumerate() {
                    let want = dot(&a, &xs[t * n..(t + 1) * n]);
                    assert_eq!(got.to_bits(), want.to_bits(), "row of {n}, {n_tok} tokens, token {t}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "dot_each: xs must hold")]
    fn a_short_activation_matrix_is_refused() {
        dot_each(&[1.0; 4], &[1.0; 7], &mut [0.0; 2]);
    }
}
