//! The `cpu` backend (DESIGN §6): f32 activations, rayon across weight rows (and experts and attention
//! heads in the shared forward), and each weight row multiplied straight from its quantised blocks by
//! `moe_kernels::quant::dot_row`: no dequantised copy of the weights, no quantisation of activations.

use std::sync::Arc;

use moe_kernels::quant::{dequantize_row, dot_row};

use super::numerics::{Mat, Numerics, matmul_by_rows};
use super::qwen3_moe::Qwen3Moe;
use crate::backend::{BackendKind, Forward, Policy};
use crate::error::EngineError;
use crate::weights::ModelWeights;

/// A CPU forward of `weights`. Only [`Policy::Fast`] exists so far: the canonical operation order of
/// `exact` is designed with the CUDA backend (DESIGN §6).
pub fn create(weights: Arc<ModelWeights>, policy: Policy) -> Result<impl Forward, EngineError> {
    if policy != Policy::Fast {
        return Err(EngineError::PolicyUnsupported {
            backend: BackendKind::Cpu,
            policy,
            reason: "its canonical operation order is not implemented yet; use --policy fast".to_string(),
        });
    }
    Ok(Qwen3Moe::new(BackendKind::Cpu, policy, weights, CpuNumerics))
}

/// f32 arithmetic on quantised rows.
struct CpuNumerics;

impl Numerics for CpuNumerics {
    type F = f32;

    fn matmul(&self, w: Mat<'_>, x: &[f32], out: &mut [f32]) {
        let n_tok = x.len() / w.cols;
        matmul_by_rows(
            w.rows,
            n_tok,
            out,
            || (),
            |_, r, o| {
                let row = w.row(r);
                for (t, o) in o.iter_mut().enumerate() {
                    *o = dot_row(w.ty, row, &x[t * w.cols..(t + 1) * w.cols]);
                }
            },
        );
    }

    fn dequantize_row(&self, w: Mat<'_>, r: usize, out: &mut [f32]) {
        dequantize_row(w.ty, w.row(r), out);
    }
}
