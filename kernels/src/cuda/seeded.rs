//! Launchers of the seeded defects' kernels (`seeded.cu`; `moe_engine::defect`, `cargo moe-gate
//! selftest` only), and the compile variants a defect inside a production kernel needs
//! ([`SEEDED_SOFTMAX_NO_MAX`], [`SEEDED_NO_FMA_CONTRACTION`], see [`CudaDevice::get_variant`]). No normal
//! forward launches or compiles any of them.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::{CudaDevice, DevSlice, DevSliceMut};
use super::error::CudaError;
use super::ops::{need, to_i32};

/// NVRTC option of the variant whose attention softmax does not subtract the maximum (attention.cu).
pub const SEEDED_SOFTMAX_NO_MAX: &str = "-DMOE_SEEDED_SOFTMAX_NO_MAX";
/// NVRTC option of the variant compiled without FMA contraction.
pub const SEEDED_NO_FMA_CONTRACTION: &str = "--fmad=false";

/// Threads per block of the seeded kernels (one value, block or product per thread).
const THREADS: u32 = 256;

fn grid(op: &'static str, items: usize) -> Result<LaunchConfig, CudaError> {
    let blocks = u32::try_from(items.div_ceil(THREADS as usize).max(1))
        .map_err(|_| CudaError::invalid(op, "too many items"))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

impl CudaDevice {
    /// Rounds `x` (`rows` rows of `cols`) in place to a symmetric 8-bit grid, in blocks of `block` values.
    pub fn seeded_round_q8(
        &self,
        x: DevSliceMut<'_, f32>,
        rows: usize,
        cols: usize,
        block: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "seeded_round_q8";
        need(OP, "x", x.len, rows * cols)?;
        if block == 0 {
            return Err(CudaError::invalid(OP, "block of 0 values"));
        }
        let (rows_i, cols_i, block_i) =
            (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?, to_i32(OP, "block", block)?);
        let cfg = grid(OP, rows * cols.div_ceil(block))?;
        self.launch(OP, &self.kernels.seeded.round_q8, cfg, |b| {
            b.arg(&x.ptr).arg(&rows_i).arg(&cols_i).arg(&block_i);
        })
    }

    /// Rounds every value of `x` in place to f16 and back.
    pub fn seeded_round_f16(&self, x: DevSliceMut<'_, f32>) -> Result<(), CudaError> {
        const OP: &str = "seeded_round_f16";
        let n = to_i32(OP, "x", x.len)?;
        self.launch(OP, &self.kernels.seeded.round_f16, grid(OP, x.len)?, |b| {
            b.arg(&x.ptr).arg(&n);
        })
    }

    /// `out[t][r] = w[r] · x[t]` over f32 weights `w` (`rows` x `cols`) for `n_tok` tokens, accumulated
    /// in bf16.
    pub fn seeded_matvec_bf16acc(
        &self,
        w: DevSlice<'_, f32>,
        x: DevSlice<'_, f32>,
        (rows, cols, n_tok): (usize, usize, usize),
        out: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "seeded_matvec_bf16acc";
        need(OP, "w", w.len, rows * cols)?;
        need(OP, "x", x.len, n_tok * cols)?;
        need(OP, "out", out.len, n_tok * rows)?;
        let (r, c, t) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?, to_i32(OP, "n_tok", n_tok)?);
        self.launch(OP, &self.kernels.seeded.matvec_bf16acc, grid(OP, rows * n_tok)?, |b| {
            b.arg(&w.ptr).arg(&x.ptr).arg(&out.ptr).arg(&r).arg(&c).arg(&t);
        })
    }
}
