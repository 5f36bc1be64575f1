//! Launchers of the `exact` policy's kernels (`exact.cu`): the canonical operation order of
//! `docs/numerics.md`, in which each result is bit-identical to the CPU kernels' (`quant::dot_row`,
//! `cpu::rms_norm`, `cpu::RopeTable::apply`, `cpu::causal_attention_head`, `cpu::route`, `cpu::exp_f32`).
//! Like the `fast` launchers, each checks every length and limit its kernel relies on before the launch.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::{CudaDevice, DevSlice, DevSliceMut, DeviceMatrix};
use super::error::CudaError;
use super::ops::{MAX_DYNAMIC_SHARED, grid_yz, need, to_i32};

/// Weight rows per block of `matvec_exact_*` (`EXACT_MV_ROWS` in exact.cu; two threads per row).
const EXACT_MV_ROWS: u32 = 64;
/// Heads per block of `head_norm_rope_exact` (`EXACT_ROPE_WARPS`).
const EXACT_ROPE_WARPS: u32 = 4;
/// Threads per block of `attention_exact` and `exp_exact` (`moe_combine_exact` shares `moe_combine`'s).
const ATTENTION_THREADS: u32 = 128;
const EXP_THREADS: u32 = 256;
/// Most positions `attention_exact` holds (one f32 score each in shared memory).
pub const EXACT_ATTENTION_MAX_POSITIONS: usize = MAX_DYNAMIC_SHARED / 4;

/// Where the rows of an exact matrix-vector product come from.
#[derive(Clone, Copy)]
pub enum ExactRows<'a> {
    /// Row `t` of `x` times the (single) matrix into row `t` of `y`, for `t < n_tok`.
    Tokens { n_tok: usize },
    /// Routed slot `s < ids.len()`: expert `ids[s]`'s matrix times row `s / in_div` of `x`, into row `s`.
    Slots { ids: DevSlice<'a, i32>, in_div: usize },
}

impl CudaDevice {
    /// `y[i] = exp(x[i])` with the canonical exponential (`moe_kernels::cpu::exp_f32`'s bits).
    pub fn exp_exact(&self, x: DevSlice<'_, f32>, y: DevSliceMut<'_, f32>) -> Result<(), CudaError> {
        let op = "exp_exact";
        need(op, "y", y.len, x.len)?;
        let n = to_i32(op, "n", x.len)?;
        if n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((x.len as u32).div_ceil(EXP_THREADS), 1, 1),
            block_dim: (EXP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(op, &self.kernels.exact.exp, cfg, |b| {
            b.arg(&x.ptr).arg(&y.ptr).arg(&n);
        })
    }

    /// `y[r] (+)= W x[r]` for the rows `rows` names, each dot product in `dot_row`'s 16-lane order; with
    /// `gate`, `y = silu(gate) * (W x)` (the SwiGLU of the up projection, canonical `exp`); with
    /// `accumulate`, `y = y + W x` (one rounding: a residual connection).
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_exact(
        &self,
        w: &DeviceMatrix,
        x: DevSlice<'_, f32>,
        rows: ExactRows<'_>,
        y: DevSliceMut<'_, f32>,
        gate: Option<DevSlice<'_, f32>>,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        let op = "matvec_exact";
        let (n_out, x_rows, ids_ptr, in_div) = match rows {
            ExactRows::Tokens { n_tok } => {
                if w.experts != 1 {
                    return Err(CudaError::invalid(
                        op,
                        format!("a stack of {} expert matrices needs routed slots", w.experts),
                    ));
                }
                (n_tok, n_tok, 0u64, 1usize)
            }
            ExactRows::Slots { ids, in_div } => {
                if in_div == 0 || ids.len == 0 {
                    return Err(CudaError::invalid(op, format!("{} slots, in_div {in_div}", ids.len)));
                }
                (ids.len, (ids.len - 1) / in_div + 1, ids.ptr, in_div)
            }
        };
        need(op, "x", x.len, x_rows * w.cols)?;
        need(op, "y", y.len, n_out * w.rows)?;
        if let Some(g) = gate {
            need(op, "gate", g.len, n_out * w.rows)?;
        }
        let grid_y = grid_yz(op, "output rows", n_out)?;
        let (k, n, e, div) = (
            to_i32(op, "cols", w.cols)?,
            to_i32(op, "rows", w.rows)?,
            to_i32(op, "experts", w.experts)?,
            to_i32(op, "in_div", in_div)?,
        );
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(EXACT_MV_ROWS), grid_y, 1),
            block_dim: (2 * EXACT_MV_ROWS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.kernels.formats[&w.ty].matvec_exact;
        let (wp, eb, rb) = (w.data.as_slice().ptr, (w.row_bytes * w.rows) as u64, w.row_bytes as u64);
        let (gate_ptr, acc) = (gate.map_or(0u64, |g| g.ptr), accumulate as i32);
        self.launch(op, f, cfg, |b| {
            b.arg(&wp)
                .arg(&eb)
                .arg(&rb)
                .arg(&k)
                .arg(&n)
                .arg(&e)
                .arg(&x.ptr)
                .arg(&div)
                .arg(&ids_ptr)
                .arg(&y.ptr)
                .arg(&gate_ptr)
                .arg(&acc);
        })
    }

    /// RMSNorm of `rows` rows of length `n` as `moe_kernels::cpu::rms_norm` computes it in f32.
    pub fn rmsnorm_exact(
        &self,
        x: DevSlice<'_, f32>,
        w: DevSlice<'_, f32>,
        rows: usize,
        n: usize,
        eps: f32,
        out: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        // Block 32: `exact.cu`'s rmsnorm_exact is written for one warp per row (`__launch_bounds__(32)`).
        self.rmsnorm_with("rmsnorm_exact", &self.kernels.exact.rmsnorm, 32, x, w, rows, n, eps, out)
    }

    /// In place on `n_tok` rows (`row_stride` floats apart) of `n_head` heads of `head_dim`: per-head
    /// RMSNorm with `norm` and `eps`, then NEOX RoPE at positions `pos0 + t` with the host's f32 tables
    /// `cos` / `sin` `[position][head_dim / 2]` (`moe_kernels::cpu::RopeTable::tables`).
    #[allow(clippy::too_many_arguments)]
    pub fn head_norm_rope_exact(
        &self,
        x: DevSliceMut<'_, f32>,
        row_stride: usize,
        n_tok: usize,
        n_head: usize,
        head_dim: usize,
        (norm, eps): (DevSlice<'_, f32>, f32),
        pos0: usize,
        (cos, sin): (DevSlice<'_, f32>, DevSlice<'_, f32>),
    ) -> Result<(), CudaError> {
        let op = "head_norm_rope_exact";
        if head_dim == 0
            || !head_dim.is_multiple_of(2)
            || n_tok == 0
            || n_head == 0
            || row_stride < n_head * head_dim
        {
            return Err(CudaError::invalid(
                op,
                format!("n_tok {n_tok}, {n_head} heads of {head_dim} (must be even) in rows of {row_stride}"),
            ));
        }
        need(op, "x", x.len, (n_tok - 1) * row_stride + n_head * head_dim)?;
        need(op, "norm weight", norm.len, head_dim)?;
        let table = (pos0 + n_tok) * (head_dim / 2);
        need(op, "cos table", cos.len, table)?;
        need(op, "sin table", sin.len, table)?;
        let heads = n_tok * n_head;
        let blocks = u32::try_from(heads.div_ceil(EXACT_ROPE_WARPS as usize))
            .map_err(|_| CudaError::invalid(op, "too many heads"))?;
        let (t, h, d, p) = (
            to_i32(op, "n_tok", n_tok)?,
            to_i32(op, "n_head", n_head)?,
            to_i32(op, "head_dim", head_dim)?,
            to_i32(op, "position", pos0 + n_tok)?,
        );
        to_i32(op, "heads", heads)?;
        let (pos0_i, stride) = (p - t, row_stride as u64);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32 * EXACT_ROPE_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(op, &self.kernels.exact.head_norm_rope, cfg, |b| {
            b.arg(&x.ptr)
                .arg(&stride)
                .arg(&t)
                .arg(&h)
                .arg(&d)
                .arg(&norm.ptr)
                .arg(&eps)
                .arg(&pos0_i)
                .arg(&cos.ptr)
                .arg(&sin.ptr);
        })
    }

    /// Causal GQA attention as `moe_kernels::cpu::causal_attention_head` computes it (see
    /// [`CudaDevice::attention`] for the layout); at most [`EXACT_ATTENTION_MAX_POSITIONS`] positions.
    pub fn attention_exact(
        &self,
        q: DevSlice<'_, f32>,
        k_cache: DevSlice<'_, f32>,
        v_cache: DevSlice<'_, f32>,
        out: DevSliceMut<'_, f32>,
        shape: super::AttentionShape,
        scale: f32,
    ) -> Result<(), CudaError> {
        let op = "attention_exact";
        let super::AttentionShape { n_tok, n_head, n_kv_head, head_dim, pos0 } = shape;
        if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) || head_dim == 0 {
            return Err(CudaError::invalid(
                op,
                format!(
                    "{n_head} query heads over {n_kv_head} kv heads of {head_dim} \
                     (query heads must be a multiple of kv heads)"
                ),
            ));
        }
        let n_ctx = pos0 + n_tok;
        if n_ctx > EXACT_ATTENTION_MAX_POSITIONS {
            return Err(CudaError::invalid(
                op,
                format!(
                    "{n_ctx} positions exceed the {EXACT_ATTENTION_MAX_POSITIONS} the exact kernel holds in \
                     shared memory; use the fast policy for longer contexts"
                ),
            ));
        }
        let q_len = n_tok * n_head * head_dim;
        let kv_len = n_ctx * n_kv_head * head_dim;
        need(op, "q", q.len, q_len)?;
        need(op, "out", out.len, q_len)?;
        need(op, "k_cache", k_cache.len, kv_len)?;
        need(op, "v_cache", v_cache.len, kv_len)?;
        let tok = grid_yz(op, "n_tok", n_tok)?;
        let (h, kvh, d, p) = (
            to_i32(op, "n_head", n_head)?,
            to_i32(op, "n_kv_head", n_kv_head)?,
            to_i32(op, "head_dim", head_dim)?,
            to_i32(op, "position", n_ctx)?,
        );
        let pos0_i = p - n_tok as i32;
        let cfg = LaunchConfig {
            grid_dim: (n_head as u32, tok, 1),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: (n_ctx * 4) as u32,
        };
        self.launch(op, &self.kernels.exact.attention, cfg, |b| {
            b.arg(&q.ptr)
                .arg(&k_cache.ptr)
                .arg(&v_cache.ptr)
                .arg(&out.ptr)
                .arg(&h)
                .arg(&kvh)
                .arg(&d)
                .arg(&pos0_i)
                .arg(&scale);
        })
    }

    /// Router decisions of `n_tok` tokens as `moe_kernels::cpu::route` computes them in f32 (softmax with
    /// the canonical `exp`, top-k with ties to the lower index, renormalisation in choice order).
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_topk_exact(
        &self,
        logits: DevSlice<'_, f32>,
        n_tok: usize,
        n_expert: usize,
        k: usize,
        renormalise: bool,
        ids: DevSliceMut<'_, i32>,
        weights: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let op = "softmax_topk_exact";
        if n_expert == 0 || k == 0 || k > n_expert || n_expert * 4 > MAX_DYNAMIC_SHARED {
            return Err(CudaError::invalid(
                op,
                format!("top {k} of {n_expert} experts (1 <= k <= n_expert <= {})", MAX_DYNAMIC_SHARED / 4),
            ));
        }
        need(op, "logits", logits.len, n_tok * n_expert)?;
        need(op, "ids", ids.len, n_tok * k)?;
        need(op, "weights", weights.len, n_tok * k)?;
        let tok = u32::try_from(n_tok).map_err(|_| CudaError::invalid(op, "too many tokens"))?;
        let (e, k_i, r) = (to_i32(op, "n_expert", n_expert)?, to_i32(op, "k", k)?, renormalise as i32);
        let cfg = LaunchConfig {
            grid_dim: (tok, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: (n_expert * 4) as u32,
        };
        self.launch(op, &self.kernels.exact.softmax_topk, cfg, |b| {
            b.arg(&logits.ptr).arg(&e).arg(&k_i).arg(&r).arg(&ids.ptr).arg(&weights.ptr);
        })
    }

    /// `x[t] = x[t] + sum_j expert_out[t * k + j] * weights[t, j]`, the sum from zero in choice order as
    /// the CPU forward takes it; a slot whose id is not below `n_expert` contributes NaN.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine_exact(
        &self,
        expert_out: DevSlice<'_, f32>,
        ids: DevSlice<'_, i32>,
        weights: DevSlice<'_, f32>,
        n_tok: usize,
        k: usize,
        hidden: usize,
        n_expert: usize,
        x: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let f = &self.kernels.exact.moe_combine;
        self.moe_combine_with("moe_combine_exact", f, expert_out, ids, weights, n_tok, k, hidden, n_expert, x)
    }
}
