//! The `cpu` backend (docs/numerics.md): f32 activations, rayon across weight rows (and experts and attention
//! heads in the shared forward), and each weight row multiplied straight from its quantised blocks in
//! `moe_kernels::quant::dot_row`'s operation order: no dequantised copy of the weights (at most one row
//! per thread), no quantisation of activations.

use std::sync::Arc;

use moe_kernels::cpu::dot_tile;
use moe_kernels::quant::{dequantize_row, dot_row};

use super::numerics::{Mat, Numerics, matmul_by_row_tiles, matmul_by_rows};
use super::qwen3_moe::Qwen3Moe;
use crate::backend::{BackendKind, Forward, Policy};
use crate::defect::Defect;
use crate::error::EngineError;
use crate::trace::Precision;
use crate::weights::ModelWeights;

/// A CPU forward of `weights` under `policy`.
///
/// Both policies run the same arithmetic: the CPU's f32 forward *is* the canonical operation order of
/// `docs/numerics.md` (`dot_row`'s 16-lane dot products, the canonical `exp`, sequential softmax sums,
/// the MoE sum in choice order), which costs nothing over a free order here (the weight-row dot products
/// dominate, and they were already in that order). So `exact` traces are bit-identical to `fast` ones,
/// and to the `cuda` backend's under `exact`.
///
/// `defect` (only `cargo moe-gate selftest` passes one) seeds a catalogued mistake into the forward
/// (`moe_engine::defect`).
pub fn create(
    weights: Arc<ModelWeights>,
    policy: Policy,
    defect: Option<Defect>,
) -> Result<impl Forward, EngineError> {
    Ok(Qwen3Moe::new(BackendKind::Cpu, policy, weights, CpuNumerics).with_defect(defect))
}

/// f32 arithmetic on quantised rows.
struct CpuNumerics;

impl Numerics for CpuNumerics {
    type F = f32;
    const PRECISION: Precision = Precision::F32;

    /// One token: `dot_row` straight from the blocks. Several tokens (a prefill, or a batch of
    /// sequences): tiles of [`TILE_ROWS`] rows are decoded into a per-thread scratch (the f32 values
    /// `dot_row` decodes block by block) and multiplied with every token by `moe_kernels::cpu::dot_tile`
    /// (cache-blocked, `cpu::dot`'s order for each product), whose lane order is `dot_row`'s, so a batch
    /// gives the same bits as decoding its tokens one at a time.
    fn matmul(&self, w: Mat<'_>, x: &[f32], out: &mut [f32]) {
        let n_tok = x.len() / w.cols;
        if n_tok == 1 {
            matmul_by_rows(w.rows, 1, out, || (), |_, r, o| o[0] = dot_row(w.ty, w.row(r), x));
            return;
        }
        matmul_by_row_tiles(
            w.rows,
            n_tok,
            TILE_ROWS,
            out,
            || vec![0f32; TILE_ROWS * w.cols],
            |decoded, r0, o| {
                let decoded = &mut decoded[..o.len() / n_tok * w.cols];
                for (r, row) in decoded.chunks_exact_mut(w.cols).enumerate() {
                    dequantize_row(w.ty, w.row(r0 + r), row);
                }
                dot_tile(decoded, x, w.cols, o);
            },
        );
    }

    fn dequantize_row(&self, w: Mat<'_>, r: usize, out: &mut [f32]) {
        dequantize_row(w.ty, w.row(r), out);
    }
}

/// Weight rows decoded together for a batched product: 16 rows of the production shape's longest rows
/// (2048 values) are 128 KiB of f32, which stay in L2 while every token of the batch passes them, and a
/// 2048-row projection still splits into 128 rayon tasks.
const TILE_ROWS: usize = 16;
