//! Typed launchers of the kernels: each checks every length, shape and limit its kernel relies on, then
//! queues the kernel on the device's stream. The operation each one computes, and in what order, is
//! documented on the kernel in the `.cu` sources and in `docs/numerics.md`.

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::device::{CudaDevice, DevSlice, DevSliceMut, DeviceBuffer, DeviceMatrix};
use super::error::CudaError;

/// Weight rows per block of the matrix-vector kernels (`MV_WARPS` in quant.cu).
const MV_WARPS: u32 = 4;
/// Warps per block and rows per warp of the single-token kernels (`DEC_WARPS`, `DEC_ROWS`), rows per block
/// of `moe_down_combine1` (`DC_ROWS`) and the most routed slots per token it takes (`DC_MAX_SLOTS`).
const DEC_WARPS: u32 = 8;
const DEC_ROWS: u32 = 1;
const DC_ROWS: u32 = 2;
const DC_MAX_SLOTS: usize = 8;
/// Most routed slots per token [`CudaDevice::moe_down_combine`] takes.
pub const FUSED_MAX_SLOTS: usize = DC_MAX_SLOTS;
/// Activation rows one warp multiplies per pass over a weight row (`TOKEN_TILE` in quant.cu).
const TOKEN_TILE: usize = 8;
/// Threads per block of `rmsnorm` (`RMS_THREADS` in norm_rope.cu).
const RMS_THREADS: u32 = 256;
/// Heads per block of `head_norm_rope` (`ROPE_WARPS`).
const ROPE_WARPS: u32 = 4;
/// Warps per block of `attention` (`ATT_WARPS`) and the largest head it holds in registers
/// (32 lanes x `ATT_MAX_PER_LANE`).
const ATT_WARPS: u32 = 16;
const ATT_MAX_HEAD_DIM: usize = 32 * 8;
/// Threads per block of `get_rows` and `moe_combine`.
const ELEMENTWISE_THREADS: u32 = 128;
const COMBINE_THREADS: u32 = 256;
/// Threads of the one block of `moe_group` (one expert per thread, looping beyond).
const GROUP_THREADS: u32 = 256;
/// Largest dynamic shared memory a kernel may ask for without opting in (48 KiB on every device).
pub(super) const MAX_DYNAMIC_SHARED: usize = 48 * 1024;
/// Largest grid y / z dimension.
pub(super) const MAX_GRID_YZ: usize = 65535;

/// Shape of one attention call: `n_tok` queries at positions `pos0 .. pos0 + n_tok` over a cache holding
/// at least `pos0 + n_tok` positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub n_tok: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub pos0: usize,
}

/// The routed slots grouped by expert ([`CudaDevice::moe_group`] fills it; only that kernel writes it,
/// so its indices are always in range).
pub struct ExpertGroups {
    offsets: DeviceBuffer<i32>,
    sorted: DeviceBuffer<i32>,
    n_expert: usize,
    n_slots: usize,
}

impl ExpertGroups {
    /// Number of routed slots currently grouped.
    pub fn n_slots(&self) -> usize {
        self.n_slots
    }
}

/// How an expert matrix-vector product finds each slot's expert.
#[derive(Clone, Copy)]
pub enum Routing<'a> {
    /// Slot `s` uses expert `ids[s]`; one block row per slot (cheapest for a few slots: decode).
    PerSlot { ids: DevSlice<'a, i32> },
    /// The slots grouped by expert: each expert's rows are read once per tile of its slots (prefill).
    Grouped(&'a ExpertGroups),
}

/// Where [`CudaDevice::head_norm_rope_with`] finds the token's position.
#[derive(Clone, Copy)]
pub enum RopePosition<'a> {
    /// Positions `pos0 ..` (known on the host).
    Host(usize),
    /// One token at position `pos[0]`, read on the device, below `max_pos`; with `at_position` the head
    /// vectors are row `pos[0]` of `x` (a KV cache of `max_pos` rows), otherwise row 0.
    Device { pos: DevSlice<'a, i32>, at_position: bool, max_pos: usize },
}

fn same_shape(a: &DeviceMatrix, b: &DeviceMatrix) -> bool {
    (a.ty, a.cols, a.rows, a.experts, a.row_bytes) == (b.ty, b.cols, b.rows, b.experts, b.row_bytes)
}

/// Converts a size to the kernel's `int`, naming what overflowed.
pub(super) fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v)
        .map_err(|_| CudaError::invalid(op, format!("{what} = {v} exceeds the kernels' int range")))
}

pub(super) fn need(op: &'static str, what: &str, have: usize, want: usize) -> Result<(), CudaError> {
    if have < want {
        return Err(CudaError::invalid(op, format!("{what} holds {have} values, needs {want}")));
    }
    Ok(())
}

/// Quantised-format kernels read activations as float4 (see `load_x8` in quant.cu): the view must start on a
/// 16-byte boundary (every view at a multiple of 4 values of a buffer does).
fn check_x_alignment(op: &'static str, w: &DeviceMatrix, x: &DevSlice<'_, f32>) -> Result<(), CudaError> {
    if w.ty.is_quantized() && !x.ptr.is_multiple_of(16) {
        return Err(CudaError::invalid(
            op,
            format!("activations for {} weights must start at a multiple of 4 values of a buffer", w.ty),
        ));
    }
    Ok(())
}

pub(super) fn grid_yz(op: &'static str, what: &str, v: usize) -> Result<u32, CudaError> {
    if v == 0 || v > MAX_GRID_YZ {
        return Err(CudaError::invalid(op, format!("{what} = {v} must be in 1..={MAX_GRID_YZ}")));
    }
    Ok(v as u32)
}

impl CudaDevice {
    /// `y[t] (+)= W x[t]` for `t < n_tok`: `x` is `[n_tok, w.cols]`, `y` is `[n_tok, w.rows]`; with
    /// `accumulate` the products are added to `y` (a residual connection), otherwise they replace it.
    pub fn matvec(
        &self,
        w: &DeviceMatrix,
        x: DevSlice<'_, f32>,
        n_tok: usize,
        y: DevSliceMut<'_, f32>,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        let op = "matvec";
        if w.experts != 1 {
            return Err(CudaError::invalid(
                op,
                format!("a stack of {} expert matrices: use moe_matvec", w.experts),
            ));
        }
        need(op, "x", x.len, n_tok * w.cols)?;
        need(op, "y", y.len, n_tok * w.rows)?;
        check_x_alignment(op, w, &x)?;
        if n_tok == 1 {
            return self.matvec1(op, w, x, y.ptr, accumulate, None);
        }
        let tiles = grid_yz(op, "token tiles", n_tok.div_ceil(TOKEN_TILE))?;
        let (k, n, t) =
            (to_i32(op, "cols", w.cols)?, to_i32(op, "rows", w.rows)?, to_i32(op, "n_tok", n_tok)?);
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(MV_WARPS), tiles, 1),
            block_dim: (32 * MV_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.kernels.formats[&w.ty].matvec;
        let (wp, rb, acc) = (w.data.as_slice().ptr, w.row_bytes as u64, accumulate as i32);
        self.launch(op, f, cfg, |b| {
            b.arg(&wp).arg(&rb).arg(&k).arg(&n).arg(&x.ptr).arg(&t).arg(&y.ptr).arg(&acc);
        })
    }

    /// `y[*pos] = W x` for one token, where `y` holds `max_pos` rows of `w.rows` and the row index is read
    /// from the device (`pos[0]`): the K / V projection of a decode step into its KV cache row, so a
    /// captured graph replays at any position. A position outside `0..max_pos` writes nothing.
    pub fn matvec_to_row(
        &self,
        w: &DeviceMatrix,
        x: DevSlice<'_, f32>,
        y: DevSliceMut<'_, f32>,
        max_pos: usize,
        pos: DevSlice<'_, i32>,
    ) -> Result<(), CudaError> {
        let op = "matvec_to_row";
        if w.experts != 1 {
            return Err(CudaError::invalid(op, "an expert stack needs moe_matvec"));
        }
        need(op, "x", x.len, w.cols)?;
        need(op, "y", y.len, max_pos * w.rows)?;
        need(op, "pos", pos.len, 1)?;
        check_x_alignment(op, w, &x)?;
        self.matvec1(op, w, x, y.ptr, false, Some((pos, max_pos)))
    }

    /// Launches the single-token product (`matvec1_*`) after the caller's checks.
    fn matvec1(
        &self,
        op: &'static str,
        w: &DeviceMatrix,
        x: DevSlice<'_, f32>,
        y_ptr: u64,
        accumulate: bool,
        row: Option<(DevSlice<'_, i32>, usize)>,
    ) -> Result<(), CudaError> {
        let (k, n) = (to_i32(op, "cols", w.cols)?, to_i32(op, "rows", w.rows)?);
        let (pos_ptr, max_pos) = match row {
            Some((p, max)) => (p.ptr, to_i32(op, "positions", max)?),
            None => (0u64, 1i32),
        };
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(DEC_WARPS * DEC_ROWS), 1, 1),
            block_dim: (32 * DEC_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.kernels.formats[&w.ty].matvec1;
        let (wp, rb, acc) = (w.data.as_slice().ptr, w.row_bytes as u64, accumulate as i32);
        self.launch(op, f, cfg, |b| {
            b.arg(&wp).arg(&rb).arg(&k).arg(&n).arg(&x.ptr).arg(&y_ptr).arg(&acc).arg(&pos_ptr).arg(&max_pos);
        })
    }

    /// `out[t] = row tokens[t] of W`, dequantised (`out` is `[tokens.len(), w.cols]`). A token outside
    /// `0..w.rows` gives a row of NaN.
    pub fn get_rows(
        &self,
        w: &DeviceMatrix,
        tokens: DevSlice<'_, i32>,
        out: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let op = "get_rows";
        if w.experts != 1 {
            return Err(CudaError::invalid(op, "an expert stack has no rows to look up"));
        }
        let n_tok = tokens.len;
        need(op, "out", out.len, n_tok * w.cols)?;
        let ty = grid_yz(op, "tokens", n_tok)?;
        let (k, n_rows) = (to_i32(op, "cols", w.cols)?, to_i32(op, "rows", w.rows)?);
        let chunks = w.cols.div_ceil(8) as u32;
        let cfg = LaunchConfig {
            grid_dim: (chunks.div_ceil(ELEMENTWISE_THREADS), ty, 1),
            block_dim: (ELEMENTWISE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.kernels.formats[&w.ty].get_rows;
        let (wp, rb) = (w.data.as_slice().ptr, w.row_bytes as u64);
        self.launch(op, f, cfg, |b| {
            b.arg(&wp).arg(&rb).arg(&k).arg(&n_rows).arg(&tokens.ptr).arg(&out.ptr);
        })
    }

    /// RMSNorm of `rows` rows of length `n`: `out = (x / sqrt(mean(x^2) + eps)) * w`.
    pub fn rmsnorm(
        &self,
        x: DevSlice<'_, f32>,
        w: DevSlice<'_, f32>,
        rows: usize,
        n: usize,
        eps: f32,
        out: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        self.rmsnorm_with("rmsnorm", &self.kernels.rmsnorm, RMS_THREADS, x, w, rows, n, eps, out)
    }

    /// Launches an RMSNorm kernel `f` (the `fast` or the `exact` one: same arguments, `threads` per row)
    /// after the checks both rely on.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rmsnorm_with(
        &self,
        op: &'static str,
        f: &CudaFunction,
        threads: u32,
        x: DevSlice<'_, f32>,
        w: DevSlice<'_, f32>,
        rows: usize,
        n: usize,
        eps: f32,
        out: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        if rows == 0 || n == 0 {
            return Err(CudaError::invalid(op, format!("empty shape [{rows}, {n}]")));
        }
        need(op, "x", x.len, rows * n)?;
        need(op, "w", w.len, n)?;
        need(op, "out", out.len, rows * n)?;
        let rows_u32 = u32::try_from(rows).map_err(|_| CudaError::invalid(op, "too many rows"))?;
        let n_i = to_i32(op, "n", n)?;
        let cfg =
            LaunchConfig { grid_dim: (rows_u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        self.launch(op, f, cfg, |b| {
            b.arg(&x.ptr).arg(&w.ptr).arg(&n_i).arg(&eps).arg(&out.ptr);
        })
    }

    /// In place on `n_tok` rows (`row_stride` floats apart) of `n_head` heads of `head_dim`: per-head RMSNorm
    /// with `norm` (when given) and NEOX RoPE at positions `pos0 + t`, angles `pos * inv_freq[i]` in f64.
    #[allow(clippy::too_many_arguments)]
    pub fn head_norm_rope(
        &self,
        x: DevSliceMut<'_, f32>,
        row_stride: usize,
        n_tok: usize,
        n_head: usize,
        head_dim: usize,
        norm: Option<(DevSlice<'_, f32>, f32)>,
        pos0: usize,
        inv_freq: DevSlice<'_, f64>,
    ) -> Result<(), CudaError> {
        self.head_norm_rope_with(
            x,
            row_stride,
            n_tok,
            n_head,
            head_dim,
            norm,
            RopePosition::Host(pos0),
            inv_freq,
        )
    }

    /// [`CudaDevice::head_norm_rope`] for one token whose position is read from the device
    /// ([`RopePosition`]), so a captured graph replays at any position.
    #[allow(clippy::too_many_arguments)]
    pub fn head_norm_rope_with(
        &self,
        x: DevSliceMut<'_, f32>,
        row_stride: usize,
        n_tok: usize,
        n_head: usize,
        head_dim: usize,
        norm: Option<(DevSlice<'_, f32>, f32)>,
        position: RopePosition<'_>,
        inv_freq: DevSlice<'_, f64>,
    ) -> Result<(), CudaError> {
        let op = "head_norm_rope";
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
        let (pos0, pos_ptr, at_position, max_pos) = match position {
            RopePosition::Host(pos0) => (pos0, 0u64, false, pos0 + n_tok),
            RopePosition::Device { pos, at_position, max_pos } => {
                need(op, "pos", pos.len, 1)?;
                if n_tok != 1 {
                    return Err(CudaError::invalid(op, "a device position is for one token"));
                }
                (0, pos.ptr, at_position, max_pos)
            }
        };
        let rows = if at_position { max_pos } else { n_tok };
        need(op, "x", x.len, (rows.max(1) - 1) * row_stride + n_head * head_dim)?;
        need(op, "inv_freq", inv_freq.len, head_dim / 2)?;
        let (w_ptr, eps) = match norm {
            Some((w, eps)) => {
                need(op, "norm weight", w.len, head_dim)?;
                (w.ptr, eps)
            }
            None => (0u64, 0.0f32),
        };
        let heads = n_tok * n_head;
        let blocks = u32::try_from(heads.div_ceil(ROPE_WARPS as usize))
            .map_err(|_| CudaError::invalid(op, "too many heads"))?;
        let (t, h, d, p) = (
            to_i32(op, "n_tok", n_tok)?,
            to_i32(op, "n_head", n_head)?,
            to_i32(op, "head_dim", head_dim)?,
            to_i32(op, "position", pos0 + n_tok)?,
        );
        to_i32(op, "heads", heads)?;
        let pos0_i = p - t;
        let (max_pos_i, at_i) = (to_i32(op, "positions", max_pos)?, at_position as i32);
        let stride = row_stride as u64;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32 * ROPE_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(op, &self.kernels.head_norm_rope, cfg, |b| {
            b.arg(&x.ptr)
                .arg(&stride)
                .arg(&t)
                .arg(&h)
                .arg(&d)
                .arg(&w_ptr)
                .arg(&eps)
                .arg(&pos0_i)
                .arg(&inv_freq.ptr)
                .arg(&pos_ptr)
                .arg(&at_i)
                .arg(&max_pos_i);
        })
    }

    /// The per-head RMSNorm + RoPE of one token's queries and keys in one launch, at the position
    /// `pos[0]` read from the device: `q` holds `n_q_head` heads in place, the keys are row `pos[0]` of
    /// `k_cache` (`max_pos` rows of `k_row` floats, `n_k_head` heads each). Each head's values are those of
    /// [`CudaDevice::head_norm_rope`].
    #[allow(clippy::too_many_arguments)]
    pub fn head_norm_rope_qk(
        &self,
        q: DevSliceMut<'_, f32>,
        (n_q_head, q_norm): (usize, DevSlice<'_, f32>),
        k_cache: DevSliceMut<'_, f32>,
        (k_row, n_k_head, k_norm): (usize, usize, DevSlice<'_, f32>),
        head_dim: usize,
        eps: f32,
        inv_freq: DevSlice<'_, f64>,
        (pos, max_pos): (DevSlice<'_, i32>, usize),
    ) -> Result<(), CudaError> {
        let op = "head_norm_rope_qk";
        if head_dim == 0 || !head_dim.is_multiple_of(2) || max_pos == 0 || k_row < n_k_head * head_dim {
            return Err(CudaError::invalid(
                op,
                format!("{n_q_head} + {n_k_head} heads of {head_dim} (must be even), key rows of {k_row}"),
            ));
        }
        need(op, "q", q.len, n_q_head * head_dim)?;
        need(op, "k_cache", k_cache.len, max_pos * k_row)?;
        need(op, "q norm weight", q_norm.len, head_dim)?;
        need(op, "k norm weight", k_norm.len, head_dim)?;
        need(op, "inv_freq", inv_freq.len, head_dim / 2)?;
        need(op, "pos", pos.len, 1)?;
        let heads = n_q_head + n_k_head;
        let blocks = u32::try_from(heads.div_ceil(ROPE_WARPS as usize))
            .map_err(|_| CudaError::invalid(op, "too many heads"))?;
        let (nq, nk, d, mp) = (
            to_i32(op, "n_q_head", n_q_head)?,
            to_i32(op, "n_k_head", n_k_head)?,
            to_i32(op, "head_dim", head_dim)?,
            to_i32(op, "positions", max_pos)?,
        );
        to_i32(op, "heads", heads)?;
        let stride = k_row as u64;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32 * ROPE_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(op, &self.kernels.head_norm_rope_qk, cfg, |b| {
            b.arg(&q.ptr)
                .arg(&nq)
                .arg(&q_norm.ptr)
                .arg(&k_cache.ptr)
                .arg(&stride)
                .arg(&nk)
                .arg(&k_norm.ptr)
                .arg(&d)
                .arg(&eps)
                .arg(&inv_freq.ptr)
                .arg(&pos.ptr)
                .arg(&mp);
        })
    }

    /// Causal GQA attention: `out[t, h] = softmax(q[t, h] . K[0..=pos0+t] * scale) V[0..=pos0+t]` with the
    /// kv head `h / (n_head / n_kv_head)`. Caches are `[positions, n_kv_head, head_dim]`.
    pub fn attention(
        &self,
        q: DevSlice<'_, f32>,
        k_cache: DevSlice<'_, f32>,
        v_cache: DevSlice<'_, f32>,
        out: DevSliceMut<'_, f32>,
        shape: AttentionShape,
        scale: f32,
    ) -> Result<(), CudaError> {
        self.attention_with(q, k_cache, v_cache, out, shape, scale, None)
    }

    /// [`CudaDevice::attention`]; with `device_pos` = (`pos`, `max_pos`), one query whose position is read
    /// from the device (`pos[0]`, `shape.pos0` ignored) over caches of `max_pos` positions, so a captured
    /// graph replays at any position.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_with(
        &self,
        q: DevSlice<'_, f32>,
        k_cache: DevSlice<'_, f32>,
        v_cache: DevSlice<'_, f32>,
        out: DevSliceMut<'_, f32>,
        shape: AttentionShape,
        scale: f32,
        device_pos: Option<(DevSlice<'_, i32>, usize)>,
    ) -> Result<(), CudaError> {
        let op = "attention";
        let AttentionShape { n_tok, n_head, n_kv_head, head_dim, mut pos0 } = shape;
        let (pos_ptr, max_pos) = match device_pos {
            Some((pos, max_pos)) => {
                need(op, "pos", pos.len, 1)?;
                if n_tok != 1 || max_pos == 0 {
                    return Err(CudaError::invalid(op, "a device position is for one query over a cache"));
                }
                pos0 = max_pos - 1;
                (pos.ptr, max_pos)
            }
            None => (0u64, pos0 + n_tok),
        };
        if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) || head_dim == 0 || head_dim > ATT_MAX_HEAD_DIM
        {
            return Err(CudaError::invalid(
                op,
                format!(
                    "{n_head} query heads over {n_kv_head} kv heads of {head_dim} \
                     (query heads must be a multiple of kv heads; head_dim 1..={ATT_MAX_HEAD_DIM})"
                ),
            ));
        }
        let q_len = n_tok * n_head * head_dim;
        let kv_len = (pos0 + n_tok) * n_kv_head * head_dim;
        need(op, "q", q.len, q_len)?;
        need(op, "out", out.len, q_len)?;
        need(op, "k_cache", k_cache.len, kv_len)?;
        need(op, "v_cache", v_cache.len, kv_len)?;
        let tok = grid_yz(op, "n_tok", n_tok)?;
        let (h, kvh, d, p) = (
            to_i32(op, "n_head", n_head)?,
            to_i32(op, "n_kv_head", n_kv_head)?,
            to_i32(op, "head_dim", head_dim)?,
            to_i32(op, "position", pos0 + n_tok)?,
        );
        let pos0_i = p - n_tok as i32;
        let max_pos_i = to_i32(op, "positions", max_pos)?;
        let cfg = LaunchConfig {
            grid_dim: (n_head as u32, tok, 1),
            block_dim: (32 * ATT_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(op, &self.kernels.attention, cfg, |b| {
            b.arg(&q.ptr)
                .arg(&k_cache.ptr)
                .arg(&v_cache.ptr)
                .arg(&out.ptr)
                .arg(&h)
                .arg(&kvh)
                .arg(&d)
                .arg(&pos0_i)
                .arg(&scale)
                .arg(&pos_ptr)
                .arg(&max_pos_i);
        })
    }

    /// Router decisions of `n_tok` tokens: softmax over `n_expert` logits, the `k` most probable experts
    /// (ties by lower index) into `ids` `[n_tok, k]`, their probabilities (divided by their sum when
    /// `renormalise`) into `weights`.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_topk(
        &self,
        logits: DevSlice<'_, f32>,
        n_tok: usize,
        n_expert: usize,
        k: usize,
        renormalise: bool,
        ids: DevSliceMut<'_, i32>,
        weights: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let op = "softmax_topk";
        if k == 0 || k > n_expert || n_expert * 4 > MAX_DYNAMIC_SHARED {
            return Err(CudaError::invalid(op, format!("top-{k} of {n_expert} experts")));
        }
        need(op, "logits", logits.len, n_tok * n_expert)?;
        need(op, "ids", ids.len, n_tok * k)?;
        need(op, "weights", weights.len, n_tok * k)?;
        let blocks = u32::try_from(n_tok).map_err(|_| CudaError::invalid(op, "too many tokens"))?;
        if blocks == 0 {
            return Err(CudaError::invalid(op, "no tokens"));
        }
        let (e, k_i, norm) = (n_expert as i32, k as i32, renormalise as i32);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: (n_expert * 4) as u32,
        };
        self.launch(op, &self.kernels.softmax_topk, cfg, |b| {
            b.arg(&logits.ptr).arg(&e).arg(&k_i).arg(&norm).arg(&ids.ptr).arg(&weights.ptr);
        })
    }

    /// The router of one token in one launch: `logits = W x` (as [`CudaDevice::matvec`]), then the
    /// choices of [`CudaDevice::softmax_topk`] on them, made by the last block to finish. `counter` is one
    /// device int that must hold 0 before the launch (the kernel leaves it at 0).
    #[allow(clippy::too_many_arguments)]
    pub fn router_topk(
        &self,
        w: &DeviceMatrix,
        x: DevSlice<'_, f32>,
        logits: DevSliceMut<'_, f32>,
        k: usize,
        renormalise: bool,
        ids: DevSliceMut<'_, i32>,
        weights: DevSliceMut<'_, f32>,
        counter: DevSliceMut<'_, i32>,
    ) -> Result<(), CudaError> {
        let op = "router_topk";
        let n_expert = w.rows;
        if w.experts != 1 || k == 0 || k > n_expert || n_expert * 4 > MAX_DYNAMIC_SHARED {
            return Err(CudaError::invalid(op, format!("top-{k} of {n_expert} experts")));
        }
        need(op, "x", x.len, w.cols)?;
        check_x_alignment(op, w, &x)?;
        need(op, "logits", logits.len, n_expert)?;
        need(op, "ids", ids.len, k)?;
        need(op, "weights", weights.len, k)?;
        need(op, "counter", counter.len, 1)?;
        let (cols, e, k_i, norm) =
            (to_i32(op, "cols", w.cols)?, to_i32(op, "n_expert", n_expert)?, k as i32, renormalise as i32);
        let cfg = LaunchConfig {
            grid_dim: ((n_expert as u32).div_ceil(DEC_WARPS * DEC_ROWS), 1, 1),
            block_dim: (32 * DEC_WARPS, 1, 1),
            shared_mem_bytes: (n_expert * 4) as u32,
        };
        let f = &self.kernels.formats[&w.ty].router_topk1;
        let (wp, rb) = (w.data.as_slice().ptr, w.row_bytes as u64);
        self.launch(op, f, cfg, |b| {
            b.arg(&wp)
                .arg(&rb)
                .arg(&cols)
                .arg(&e)
                .arg(&x.ptr)
                .arg(&logits.ptr)
                .arg(&k_i)
                .arg(&norm)
                .arg(&ids.ptr)
                .arg(&weights.ptr)
                .arg(&counter.ptr);
        })
    }

    /// Whether [`CudaDevice::norm_qkv`] has a kernel for these weights: q and k of one format, v of the
    /// same or a K-quant mix's (see `decode.cu`), all of one row length.
    pub fn has_norm_qkv(&self, q: &DeviceMatrix, k: &DeviceMatrix, v: &DeviceMatrix) -> bool {
        q.ty == k.ty
            && (q.cols, q.experts) == (k.cols, 1)
            && (v.cols, k.experts, v.experts) == (q.cols, 1, 1)
            && self.kernels.norm_qkv1.contains_key(&(q.ty, v.ty))
    }

    /// The attention input of one decode step in one launch: `h = rmsnorm(x) * norm` (as
    /// [`CudaDevice::rmsnorm`]), `q = Wq h` and, into row `pos[0]` of caches of `max_pos` rows, `Wk h` and
    /// `Wv h` (as [`CudaDevice::matvec`] and [`CudaDevice::matvec_to_row`]): the same values as those four
    /// launches. A position outside `0..max_pos` writes only `h`.
    #[allow(clippy::too_many_arguments)]
    pub fn norm_qkv(
        &self,
        x: DevSlice<'_, f32>,
        norm: DevSlice<'_, f32>,
        eps: f32,
        h: DevSliceMut<'_, f32>,
        (wq, wk, wv): (&DeviceMatrix, &DeviceMatrix, &DeviceMatrix),
        q: DevSliceMut<'_, f32>,
        (k_cache, v_cache): (DevSliceMut<'_, f32>, DevSliceMut<'_, f32>),
        max_pos: usize,
        pos: DevSlice<'_, i32>,
    ) -> Result<(), CudaError> {
        let op = "norm_qkv";
        if !self.has_norm_qkv(wq, wk, wv) {
            return Err(CudaError::invalid(
                op,
                format!(
                    "no fused kernel for q {} [{}], k {} [{}], v {} [{}]: use rmsnorm and matvec",
                    wq.ty, wq.cols, wk.ty, wk.cols, wv.ty, wv.cols
                ),
            ));
        }
        let hidden = wq.cols;
        if hidden == 0 || hidden * 4 > MAX_DYNAMIC_SHARED {
            return Err(CudaError::invalid(op, format!("a row of {hidden} does not fit shared memory")));
        }
        need(op, "x", x.len, hidden)?;
        need(op, "norm", norm.len, hidden)?;
        need(op, "h", h.len, hidden)?;
        need(op, "q", q.len, wq.rows)?;
        need(op, "k_cache", k_cache.len, max_pos * wk.rows)?;
        need(op, "v_cache", v_cache.len, max_pos * wv.rows)?;
        need(op, "pos", pos.len, 1)?;
        let per_block = DEC_WARPS * DEC_ROWS;
        let blocks: u32 = [wq.rows, wk.rows, wv.rows].iter().map(|&r| (r as u32).div_ceil(per_block)).sum();
        let (k, nq, nk, nv) = (
            to_i32(op, "cols", hidden)?,
            to_i32(op, "q rows", wq.rows)?,
            to_i32(op, "k rows", wk.rows)?,
            to_i32(op, "v rows", wv.rows)?,
        );
        let mp = to_i32(op, "positions", max_pos)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32 * DEC_WARPS, 1, 1),
            shared_mem_bytes: (hidden * 4) as u32,
        };
        let f = &self.kernels.norm_qkv1[&(wq.ty, wv.ty)];
        let (qp, kp, vp) = (wq.data.as_slice().ptr, wk.data.as_slice().ptr, wv.data.as_slice().ptr);
        let (qb, kb, vb) = (wq.row_bytes as u64, wk.row_bytes as u64, wv.row_bytes as u64);
        self.launch(op, f, cfg, |b| {
            b.arg(&x.ptr).arg(&norm.ptr).arg(&k).arg(&eps).arg(&h.ptr);
            b.arg(&qp).arg(&qb).arg(&nq).arg(&q.ptr);
            b.arg(&kp).arg(&kb).arg(&nk).arg(&k_cache.ptr);
            b.arg(&vp).arg(&vb).arg(&nv).arg(&v_cache.ptr);
            b.arg(&pos.ptr).arg(&mp);
        })
    }

    /// Whether [`CudaDevice::norm_router_topk`] takes a router of `n_expert` rows of `hidden`: its input
    /// row and probabilities fit shared memory.
    pub fn has_norm_router(&self, hidden: usize, n_expert: usize) -> bool {
        (hidden.next_multiple_of(4) + n_expert) * 4 <= MAX_DYNAMIC_SHARED
    }

    /// The router of one token from the residual stream in one launch: `h = rmsnorm(x) * norm` (as
    /// [`CudaDevice::rmsnorm`]), then what [`CudaDevice::router_topk`] makes of `h`: the same values as
    /// those two launches. `counter` is one device int that must hold 0 (the kernel leaves it at 0).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_router_topk(
        &self,
        x: DevSlice<'_, f32>,
        norm: DevSlice<'_, f32>,
        eps: f32,
        h: DevSliceMut<'_, f32>,
        w: &DeviceMatrix,
        logits: DevSliceMut<'_, f32>,
        (k, renormalise): (usize, bool),
        ids: DevSliceMut<'_, i32>,
        weights: DevSliceMut<'_, f32>,
        counter: DevSliceMut<'_, i32>,
    ) -> Result<(), CudaError> {
        let op = "norm_router_topk";
        let (n_expert, hidden) = (w.rows, w.cols);
        if w.experts != 1 || k == 0 || k > n_expert || hidden == 0 || !self.has_norm_router(hidden, n_expert)
        {
            return Err(CudaError::invalid(
                op,
                format!("top-{k} of {n_expert} experts over rows of {hidden}"),
            ));
        }
        need(op, "x", x.len, hidden)?;
        need(op, "norm", norm.len, hidden)?;
        need(op, "h", h.len, hidden)?;
        need(op, "logits", logits.len, n_expert)?;
        need(op, "ids", ids.len, k)?;
        need(op, "weights", weights.len, k)?;
        need(op, "counter", counter.len, 1)?;
        let (cols, e, k_i, norm_i) =
            (to_i32(op, "cols", hidden)?, to_i32(op, "n_expert", n_expert)?, k as i32, renormalise as i32);
        let cfg = LaunchConfig {
            grid_dim: ((n_expert as u32).div_ceil(DEC_WARPS), 1, 1),
            block_dim: (32 * DEC_WARPS, 1, 1),
            shared_mem_bytes: ((hidden.next_multiple_of(4) + n_expert) * 4) as u32,
        };
        let f = &self.kernels.formats[&w.ty].norm_router_topk1;
        let (wp, rb) = (w.data.as_slice().ptr, w.row_bytes as u64);
        self.launch(op, f, cfg, |b| {
            b.arg(&x.ptr).arg(&norm.ptr).arg(&cols).arg(&eps).arg(&h.ptr);
            b.arg(&wp).arg(&rb).arg(&e).arg(&logits.ptr).arg(&k_i).arg(&norm_i);
            b.arg(&ids.ptr).arg(&weights.ptr).arg(&counter.ptr);
        })
    }

    /// Room to group up to `max_slots` routed slots over `n_expert` experts.
    pub fn expert_groups(&self, n_expert: usize, max_slots: usize) -> Result<ExpertGroups, CudaError> {
        Ok(ExpertGroups {
            offsets: self.alloc_zeros(n_expert + 1)?,
            sorted: self.alloc_zeros(max_slots)?,
            n_expert,
            n_slots: 0,
        })
    }

    /// Groups the first `n_slots` routed slots of `ids` by expert into `groups` (slots with an id outside
    /// the experts are left out; [`CudaDevice::moe_combine`] turns them into NaN).
    pub fn moe_group(
        &self,
        ids: DevSlice<'_, i32>,
        n_slots: usize,
        groups: &mut ExpertGroups,
    ) -> Result<(), CudaError> {
        let op = "moe_group";
        need(op, "ids", ids.len, n_slots)?;
        need(op, "groups", groups.sorted.len(), n_slots)?;
        if (groups.n_expert + 1) * 4 > MAX_DYNAMIC_SHARED {
            return Err(CudaError::invalid(op, format!("{} experts", groups.n_expert)));
        }
        let (s, e) = (to_i32(op, "n_slots", n_slots)?, to_i32(op, "n_expert", groups.n_expert)?);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (GROUP_THREADS, 1, 1),
            shared_mem_bytes: ((groups.n_expert + 1) * 4) as u32,
        };
        let (off, sorted) = (groups.offsets.as_slice().ptr, groups.sorted.as_slice().ptr);
        self.launch(op, &self.kernels.moe_group, cfg, |b| {
            b.arg(&ids.ptr).arg(&s).arg(&e).arg(&off).arg(&sorted);
        })?;
        groups.n_slots = n_slots;
        Ok(())
    }

    /// Expert products over `n_slots` routed slots: `y[s] = W[expert(s)] x[s / in_div]` (`y` is
    /// `[n_slots, w.rows]`, `x` rows of `w.cols`), or `silu(gate[s]) * (W[expert(s)] x[s / in_div])` with
    /// `gate` (the SwiGLU of the up projection). `in_div` is k when `x` holds one row per token, 1 when it
    /// holds one row per slot.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_matvec(
        &self,
        w: &DeviceMatrix,
        x: DevSlice<'_, f32>,
        in_div: usize,
        routing: Routing<'_>,
        n_slots: usize,
        y: DevSliceMut<'_, f32>,
        gate: Option<DevSlice<'_, f32>>,
    ) -> Result<(), CudaError> {
        let op = "moe_matvec";
        if in_div == 0 || n_slots == 0 {
            return Err(CudaError::invalid(op, format!("{n_slots} slots, in_div {in_div}")));
        }
        need(op, "x", x.len, ((n_slots - 1) / in_div + 1) * w.cols)?;
        check_x_alignment(op, w, &x)?;
        need(op, "y", y.len, n_slots * w.rows)?;
        let gate_ptr = match gate {
            Some(g) => {
                need(op, "gate", g.len, n_slots * w.rows)?;
                g.ptr
            }
            None => 0u64,
        };
        let (ids_ptr, off_ptr, sorted_ptr, grid_y) = match routing {
            Routing::PerSlot { ids } => {
                need(op, "ids", ids.len, n_slots)?;
                (ids.ptr, 0u64, 0u64, grid_yz(op, "slots", n_slots)?)
            }
            Routing::Grouped(g) => {
                if g.n_slots != n_slots || g.n_expert != w.experts {
                    return Err(CudaError::invalid(
                        op,
                        format!(
                            "groups of {} slots over {} experts used for {n_slots} slots over {} experts",
                            g.n_slots, g.n_expert, w.experts
                        ),
                    ));
                }
                (0u64, g.offsets.as_slice().ptr, g.sorted.as_slice().ptr, grid_yz(op, "experts", w.experts)?)
            }
        };
        let (k, n, e, div) = (
            to_i32(op, "cols", w.cols)?,
            to_i32(op, "rows", w.rows)?,
            to_i32(op, "experts", w.experts)?,
            to_i32(op, "in_div", in_div)?,
        );
        to_i32(op, "n_slots", n_slots)?;
        let (wp, eb, rb) = (w.data.as_slice().ptr, (w.row_bytes * w.rows) as u64, w.row_bytes as u64);
        if let Routing::PerSlot { .. } = routing {
            // One input row per block row: the single-token kernel (same arithmetic, fewer registers).
            let cfg = LaunchConfig {
                grid_dim: ((w.rows as u32).div_ceil(DEC_WARPS * DEC_ROWS), grid_y, 1),
                block_dim: (32 * DEC_WARPS, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = &self.kernels.formats[&w.ty].moe_matvec1;
            return self.launch(op, f, cfg, |b| {
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
                    .arg(&gate_ptr);
            });
        }
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(MV_WARPS), grid_y, 1),
            block_dim: (32 * MV_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.kernels.formats[&w.ty].moe_matvec;
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
                .arg(&off_ptr)
                .arg(&sorted_ptr)
                .arg(&y.ptr)
                .arg(&gate_ptr);
        })
    }

    /// The gate and up projections of `n_slots` routed slots in one pass: `act[s] = silu(G[e] x) * (U[e] x)`
    /// for `e = ids[s]`, `x` = row `s / in_div` of `x` (the values [`CudaDevice::moe_matvec`] gives for the
    /// gate and then the up projection with that gate). `gate` and `up` must share shape and format.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gate_up(
        &self,
        gate: &DeviceMatrix,
        up: &DeviceMatrix,
        x: DevSlice<'_, f32>,
        in_div: usize,
        ids: DevSlice<'_, i32>,
        n_slots: usize,
        act: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let op = "moe_gate_up";
        if !same_shape(gate, up) {
            return Err(CudaError::invalid(op, "gate and up projections of different shapes or formats"));
        }
        if in_div == 0 || n_slots == 0 {
            return Err(CudaError::invalid(op, format!("{n_slots} slots, in_div {in_div}")));
        }
        need(op, "x", x.len, ((n_slots - 1) / in_div + 1) * gate.cols)?;
        check_x_alignment(op, gate, &x)?;
        need(op, "ids", ids.len, n_slots)?;
        need(op, "act", act.len, n_slots * gate.rows)?;
        let grid_y = grid_yz(op, "slots", n_slots)?;
        let (k, n, e, div) = (
            to_i32(op, "cols", gate.cols)?,
            to_i32(op, "rows", gate.rows)?,
            to_i32(op, "experts", gate.experts)?,
            to_i32(op, "in_div", in_div)?,
        );
        let cfg = LaunchConfig {
            grid_dim: ((gate.rows as u32).div_ceil(DEC_WARPS), grid_y, 1),
            block_dim: (32 * DEC_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.kernels.formats[&gate.ty].moe_gate_up1;
        let (gp, upp) = (gate.data.as_slice().ptr, up.data.as_slice().ptr);
        let (eb, rb) = ((gate.row_bytes * gate.rows) as u64, gate.row_bytes as u64);
        self.launch(op, f, cfg, |b| {
            b.arg(&gp)
                .arg(&upp)
                .arg(&eb)
                .arg(&rb)
                .arg(&k)
                .arg(&n)
                .arg(&e)
                .arg(&x.ptr)
                .arg(&div)
                .arg(&ids.ptr)
                .arg(&act.ptr);
        })
    }

    /// The down projection of each of `n_tok` tokens' `k` routed slots and their weighted sum into the
    /// residual in one pass: `x[t] += sum_j weights[t, j] * (D[ids[t k + j]] act[t k + j])`, the values
    /// [`CudaDevice::moe_matvec`] then [`CudaDevice::moe_combine`] give. At most 8 slots per token.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_down_combine(
        &self,
        down: &DeviceMatrix,
        act: DevSlice<'_, f32>,
        ids: DevSlice<'_, i32>,
        weights: DevSlice<'_, f32>,
        n_tok: usize,
        k: usize,
        x: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let op = "moe_down_combine";
        if k == 0 || k > DC_MAX_SLOTS {
            return Err(CudaError::invalid(op, format!("{k} slots per token (1..={DC_MAX_SLOTS})")));
        }
        let slots = n_tok * k;
        need(op, "act", act.len, slots * down.cols)?;
        check_x_alignment(op, down, &act)?;
        need(op, "ids", ids.len, slots)?;
        need(op, "weights", weights.len, slots)?;
        need(op, "x", x.len, n_tok * down.rows)?;
        let tok = grid_yz(op, "n_tok", n_tok)?;
        let (cols, n, e, k_i) = (
            to_i32(op, "cols", down.cols)?,
            to_i32(op, "rows", down.rows)?,
            to_i32(op, "experts", down.experts)?,
            to_i32(op, "k", k)?,
        );
        let cfg = LaunchConfig {
            grid_dim: ((down.rows as u32).div_ceil(DC_ROWS), tok, 1),
            block_dim: (32 * k as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.kernels.formats[&down.ty].moe_down_combine1;
        let (wp, eb, rb) =
            (down.data.as_slice().ptr, (down.row_bytes * down.rows) as u64, down.row_bytes as u64);
        self.launch(op, f, cfg, |b| {
            b.arg(&wp)
                .arg(&eb)
                .arg(&rb)
                .arg(&cols)
                .arg(&n)
                .arg(&e)
                .arg(&act.ptr)
                .arg(&ids.ptr)
                .arg(&weights.ptr)
                .arg(&k_i)
                .arg(&x.ptr);
        })
    }

    /// `x[t] += sum_j weights[t, j] * expert_out[t * k + j]` for `t < n_tok` (rows of `hidden`); a slot
    /// whose id is not below `n_expert` contributes NaN.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine(
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
        let f = &self.kernels.moe_combine;
        self.moe_combine_with("moe_combine", f, expert_out, ids, weights, n_tok, k, hidden, n_expert, x)
    }

    /// Launches a combine kernel `f` (the `fast` or the `exact` one: same arguments and grid) after the
    /// checks both rely on.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe_combine_with(
        &self,
        op: &'static str,
        f: &CudaFunction,
        expert_out: DevSlice<'_, f32>,
        ids: DevSlice<'_, i32>,
        weights: DevSlice<'_, f32>,
        n_tok: usize,
        k: usize,
        hidden: usize,
        n_expert: usize,
        x: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        need(op, "expert_out", expert_out.len, n_tok * k * hidden)?;
        need(op, "ids", ids.len, n_tok * k)?;
        need(op, "weights", weights.len, n_tok * k)?;
        need(op, "x", x.len, n_tok * hidden)?;
        let tok = grid_yz(op, "n_tok", n_tok)?;
        let (k_i, h, e) =
            (to_i32(op, "k", k)?, to_i32(op, "hidden", hidden)?, to_i32(op, "n_expert", n_expert)?);
        let cfg = LaunchConfig {
            grid_dim: ((hidden as u32).div_ceil(COMBINE_THREADS), tok, 1),
            block_dim: (COMBINE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(op, f, cfg, |b| {
            b.arg(&expert_out.ptr).arg(&ids.ptr).arg(&weights.ptr).arg(&k_i).arg(&h).arg(&e).arg(&x.ptr);
        })
    }

    /// Queues `f` with the arguments `push` adds, and with [`super::SYNC_EACH_LAUNCH_ENV`] waits for it.
    pub(super) fn launch<'a>(
        &'a self,
        op: &'static str,
        f: &'a CudaFunction,
        cfg: LaunchConfig,
        push: impl FnOnce(&mut cudarc::driver::LaunchArgs<'a>),
    ) -> Result<(), CudaError> {
        self.bind()?;
        let mut builder = self.stream.launch_builder(f);
        push(&mut builder);
        // SAFETY: the caller checked every length and index the kernel uses against the views it passed,
        // and the argument list matches the kernel's parameter types one for one.
        unsafe { builder.launch(cfg) }.map_err(|e| CudaError::driver(format!("launching {op}"), e))?;
        if self.sync_each_launch {
            self.stream.synchronize().map_err(|e| CudaError::driver(format!("running {op}"), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `#define NAME value` in the kernels' sources.
    fn cuda_define(name: &str) -> u64 {
        let src = crate::cuda::program_source();
        let prefix = format!("#define {name} ");
        let line = src
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in the CUDA sources"));
        line[prefix.len()..].trim().parse().unwrap_or_else(|e| panic!("`{line}`: {e}"))
    }

    /// The launchers' block and grid shapes mirror the kernels' `#define`s: a change on one side only would
    /// launch too few blocks (rows left unwritten, found only on a GPU) or index past a block's rows. This
    /// holds the two together on any machine.
    #[test]
    fn launch_geometry_matches_the_cuda_defines() {
        let pairs: [(&str, u64); 10] = [
            ("MV_WARPS", MV_WARPS.into()),
            ("DEC_WARPS", DEC_WARPS.into()),
            ("DEC_ROWS", DEC_ROWS.into()),
            ("DC_ROWS", DC_ROWS.into()),
            ("DC_MAX_SLOTS", DC_MAX_SLOTS as u64),
            ("TOKEN_TILE", TOKEN_TILE as u64),
            ("RMS_THREADS", RMS_THREADS.into()),
            ("ROPE_WARPS", ROPE_WARPS.into()),
            ("ATT_WARPS", ATT_WARPS.into()),
            ("ATT_MAX_PER_LANE", (ATT_MAX_HEAD_DIM / 32) as u64),
        ];
        for (name, rust) in pairs {
            assert_eq!(
                cuda_define(name),
                rust,
                "{name}: the CUDA #define and the launcher's constant differ"
            );
        }
    }
}
