//! The `reference` backend (docs/numerics.md): every activation f64, every weight dequantised exactly to f64 row
//! by row as it is used (never a whole-model f64 copy), plain dot products summed in index order. It is
//! the truth a divergence is measured against; rows run in parallel, which changes no value.

use std::sync::Arc;

use moe_kernels::quant::{dequantize_row, dequantize_row_f64};

use super::numerics::{Mat, Numerics, matmul_by_rows};
use super::qwen3_moe::Qwen3Moe;
use crate::backend::{BackendKind, Forward, Policy};
use crate::trace::Precision;
use crate::weights::ModelWeights;

/// How the reference turns stored weights into f64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDecoding {
    /// The exact value of every stored weight, computed in f64 (`dequantize_row_f64`). The default.
    #[default]
    ExactF64,
    /// ggml's f32 dequantisation (`dequantize_row`), widened to f64: what an f32 engine multiplies by.
    /// A diagnosis aid, to tell the formats' f32 rounding from the engine's.
    RoundedF32,
}

/// A reference forward of `weights`. The policy is recorded but changes nothing: the reference has one
/// way to compute.
pub fn create(weights: Arc<ModelWeights>, policy: Policy, decoding: WeightDecoding) -> impl Forward {
    Qwen3Moe::new(BackendKind::Reference, policy, weights, ReferenceNumerics { decoding })
}

/// f64 arithmetic over weights dequantised on the fly.
struct ReferenceNumerics {
    decoding: WeightDecoding,
}

impl ReferenceNumerics {
    fn decode(&self, w: Mat<'_>, r: usize, out: &mut [f64], f32_scratch: &mut Vec<f32>) {
        match self.decoding {
            WeightDecoding::ExactF64 => dequantize_row_f64(w.ty, w.row(r), out),
            WeightDecoding::RoundedF32 => {
                f32_scratch.resize(w.cols, 0.0);
                dequantize_row(w.ty, w.row(r), f32_scratch);
                for (o, &v) in out.iter_mut().zip(f32_scratch.iter()) {
                    *o = v as f64;
                }
            }
        }
    }
}

impl Numerics for ReferenceNumerics {
    type F = f64;
    const PRECISION: Precision = Precision::F64;

    fn matmul(&self, w: Mat<'_>, x: &[f64], out: &mut [f64]) {
        let n_tok = x.len() / w.cols;
        matmul_by_rows(
            w.rows,
            n_tok,
            out,
            || (vec![0.0f64; w.cols], Vec::new()),
            |(row, scratch), r, o| {
                self.decode(w, r, row, scratch);
                dots_in_index_order(row, x, o);
            },
        );
    }

    fn dequantize_row(&self, w: Mat<'_>, r: usize, out: &mut [f64]) {
        self.decode(w, r, out, &mut Vec::new());
    }
}

/// Tokens whose dot products with one weight row advance together in [`dots_in_index_order`].
const TOKENS_PER_PASS: usize = 4;

/// `out[t] = sum_i row[i] * x[t][i]` for every token row `t` of `x`, each sum added in increasing `i`
/// (the reference's one order). [`TOKENS_PER_PASS`] tokens at a time advance together: their sums are
/// independent, so the processor overlaps their additions instead of waiting on one chain, and every
/// sum still sees exactly the operations of a plain left-to-right loop, so the bits are those of
/// [`plain_dot`] (`dots_match_the_plain_loop_bit_for_bit`).
fn dots_in_index_order(row: &[f64], x: &[f64], out: &mut [f64]) {
    let cols = row.len();
    let token = |t: usize| &x[t * cols..(t + 1) * cols];
    let full = out.len() / TOKENS_PER_PASS * TOKENS_PER_PASS;
    for t in (0..full).step_by(TOKENS_PER_PASS) {
        let (a, b, c, d) = (token(t), token(t + 1), token(t + 2), token(t + 3));
        let mut s = [0.0f64; TOKENS_PER_PASS];
        for ((((&w, &a), &b), &c), &d) in row.iter().zip(a).zip(b).zip(c).zip(d) {
            s[0] += w * a;
            s[1] += w * b;
            s[2] += w * c;
            s[3] += w * d;
        }
        out[t..t + TOKENS_PER_PASS].copy_from_slice(&s);
    }
    for (t, o) in out.iter_mut().enumerate().skip(full) {
        *o = plain_dot(row, token(t));
    }
}

/// `sum_i a[i] * b[i]`, added in increasing `i`.
fn plain_dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0, |s, (&x, &y)| s + x * y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_match_the_plain_loop_bit_for_bit() {
        // Values spread over many binades, so any change of order or a fused multiply-add would change
        // low bits; every token count from 0 to 11 covers full passes and every remainder.
        let cols = 97;
        let value = |i: usize| ((i * 7919 % 1013) as f64 - 506.0) * 10f64.powi((i % 9) as i32 - 4);
        let row: Vec<f64> = (0..cols).map(value).collect();
        for n_tok in 0..12 {
            let x: Vec<f64> = (0..n_tok * cols).map(|i| value(i + 31) / 3.0).collect();
            let mut out = vec![f64::NAN; n_tok];
            dots_in_index_order(&row, &x, &mut out);
            for (t, &got) in out.iter().enumerate() {
                let want = plain_dot(&row, &x[t * cols..(t + 1) * cols]);
                assert_eq!(got.to_bits(), want.to_bits(), "{n_tok} tokens, token {t}");
            }
        }
    }
}
