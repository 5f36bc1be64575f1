//! The `reference` backend (DESIGN §6): every activation f64, every weight dequantised exactly to f64 row
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
                for (t, o) in o.iter_mut().enumerate() {
                    *o = plain_dot(row, &x[t * w.cols..(t + 1) * w.cols]);
                }
            },
        );
    }

    fn dequantize_row(&self, w: Mat<'_>, r: usize, out: &mut [f64]) {
        self.decode(w, r, out, &mut Vec::new());
    }
}

/// `sum_i a[i] * b[i]`, added in increasing `i`.
fn plain_dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0, |s, (&x, &y)| s + x * y)
}
