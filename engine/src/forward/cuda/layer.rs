//! One decoder layer on the device, in the one step order of the `cuda` backend ([`Layer::run`]), over a
//! kernel set ([`KernelSet`]): the `fast` kernels or the `exact` ones (`super::kernel_sets`). The order is
//! written here once, for both policies, for prompts and decode steps, with and without taps; a kernel
//! set decides only how each step is computed (which kernels, which fusions).

use moe_kernels::cuda::{
    AttentionShape, CudaDevice, CudaError, DevSlice, DevSliceMut, DeviceBuffer, DeviceMatrix,
};

use super::seeded;
use super::{DeviceModel, DeviceTaps, Workspace};
use crate::config::ModelConfig;
use crate::defect::Defect;

/// Decoder layer `l` of a model on a device.
pub(super) struct Layer<'a> {
    pub(super) d: &'a CudaDevice,
    pub(super) cfg: &'a ModelConfig,
    pub(super) model: &'a DeviceModel,
    pub(super) l: usize,
    /// The forward's seeded defect (`seeded`); `None` in every normal forward and in the decode graph.
    pub(super) defect: Option<Defect>,
}

/// Where a layer's tokens sit in the KV cache.
#[derive(Clone, Copy, Debug)]
pub(super) enum At {
    /// `n` tokens at positions `pos0..pos0 + n`; their keys and values go to those rows of the cache,
    /// which holds the earlier positions already.
    Positions { n: usize, pos0: usize },
    /// One token at the position the device holds in `work.pos[0]`, over caches of `capacity` positions:
    /// the kernels of a captured decode graph, which replays at any position. `tap_pos` is that position
    /// as the host knows it, used only to copy the step's cache rows into taps (never while capturing).
    DevicePosition { capacity: usize, tap_pos: usize },
}

impl At {
    /// The tokens the layer runs on.
    pub(super) fn n(self) -> usize {
        match self {
            At::Positions { n, .. } => n,
            At::DevicePosition { .. } => 1,
        }
    }

    /// The range of the cache (`[position][kv_dim]`) that holds these tokens' keys or values.
    fn new_rows(self, kv_dim: usize) -> std::ops::Range<usize> {
        match self {
            At::Positions { n, pos0 } => pos0 * kv_dim..(pos0 + n) * kv_dim,
            At::DevicePosition { tap_pos, .. } => tap_pos * kv_dim..(tap_pos + 1) * kv_dim,
        }
    }
}

/// The destination of the experts' weighted sum.
#[derive(Clone, Copy, Debug)]
pub(super) enum Sum {
    /// Added to the residual stream `work.x`.
    Residual,
    /// Added to the normed buffer `work.h` (zeroed first by the caller): the `moe_out` tap.
    Normed,
}

/// How each step of [`Layer::run`] is computed: one implementation per policy. Every method launches
/// kernels only (no host waits), so a decode step can be captured into a graph.
pub(super) trait KernelSet {
    /// `h = rmsnorm(x)` by the attention norm; `q = Wq h`; the tokens' cache rows of `keys` and `values`
    /// get `Wk h` and `Wv h`.
    fn attn_norm_qkv(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        values: &mut DeviceBuffer<f32>,
        at: At,
    ) -> Result<(), CudaError>;

    /// Per-head RMSNorm and NEOX RoPE of `q` and of the tokens' key rows.
    fn qk_norm_rope(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        at: At,
    ) -> Result<(), CudaError>;

    /// `attn = softmax(q kᵀ · scale) v` over the cache, causal.
    fn attention(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        keys: &DeviceBuffer<f32>,
        values: &DeviceBuffer<f32>,
        at: At,
        scale: f32,
    ) -> Result<(), CudaError>;

    /// `out = W · input` (or `out += W · input` when `accumulate`, one rounding) for `n` rows.
    fn project(
        &self,
        layer: &Layer<'_>,
        w: &DeviceMatrix,
        input: DevSlice<'_, f32>,
        n: usize,
        out: DevSliceMut<'_, f32>,
        accumulate: bool,
    ) -> Result<(), CudaError>;

    /// `h = rmsnorm(x)` by the FFN norm; the router's logits; each token's top-k expert ids and weights.
    fn ffn_norm_route(&self, layer: &Layer<'_>, work: &mut Workspace, n: usize) -> Result<(), CudaError>;

    /// The whole expert block (SwiGLU experts and their weighted sum added to `x`) in fused launches,
    /// over `input` (the normed rows, or their seeded copy): `false` when the set has none for this case,
    /// and then nothing was launched.
    fn experts_fused(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        input: Option<&DeviceBuffer<f32>>,
        n: usize,
    ) -> Result<bool, CudaError>;

    /// Each routed slot's expert output `down(silu(gate · h) * (up · h))` into `work.expert_out`.
    fn expert_outputs(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        input: Option<&DeviceBuffer<f32>>,
        n: usize,
    ) -> Result<(), CudaError>;

    /// The weighted sum of `work.expert_out` over each token's slots, added to `sum`.
    fn combine(&self, layer: &Layer<'_>, work: &mut Workspace, n: usize, sum: Sum) -> Result<(), CudaError>;
}

impl Layer<'_> {
    /// The layer on the tokens in `work.x` (`at` says where they sit; their keys and values go to the
    /// cache), computed by `kernels`: the one step order of the `cuda` backend. With `taps`, each op's
    /// output is copied back into it as the layer runs (the same values).
    pub(super) fn run<K: KernelSet>(
        &self,
        kernels: &K,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        values: &mut DeviceBuffer<f32>,
        at: At,
        mut taps: Option<&mut DeviceTaps>,
    ) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l, .. } = *self;
        let lw = &model.layers[l];
        let n = at.n();
        let (hidden, qd, kvd, k) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.n_expert_used);
        let (xs, qs) = (0..n * hidden, 0..n * qd);

        // Attention block: x += o · attn(rope(norm(q)), rope(norm(k)), v), over norm(x).
        kernels.attn_norm_qkv(self, work, keys, values, at)?;
        if let Some(t) = taps.as_deref_mut() {
            t.attn_norm = d.download(work.h.slice(xs.clone())?)?;
        }
        kernels.qk_norm_rope(self, work, keys, at)?;
        if let At::Positions { n, pos0 } = at {
            self.stale_kv(keys, values, pos0, n)?;
        }
        if let Some(t) = taps.as_deref_mut() {
            let rows = at.new_rows(kvd);
            t.q = d.download(work.q.slice(qs.clone())?)?;
            t.k = d.download(keys.slice(rows.clone())?)?;
            t.v = d.download(values.slice(rows)?)?;
        }
        kernels.attention(self, work, keys, values, at, self.attention_scale())?;
        let seeded_heads = self.o_proj_input(work.attn.slice(qs.clone())?)?;
        {
            let Workspace { x, h, attn, .. } = &mut *work;
            let heads = || seeded_heads.as_ref().map_or(attn.slice(qs.clone()), |b| Ok(b.as_slice()));
            if let Some(t) = taps.as_deref_mut() {
                t.attn_out = d.download(attn.slice(qs.clone())?)?;
                // The projection alone, into the normed buffer (no longer read): the addend of the
                // accumulating launch below, which computes the same dot products and adds them once.
                kernels.project(self, &lw.o, heads()?, n, h.slice_mut(xs.clone())?, false)?;
                t.attn_proj = d.download(h.slice(xs.clone())?)?;
            }
            kernels.project(self, &lw.o, heads()?, n, x.slice_mut(xs.clone())?, self.attn_residual())?;
        }
        if let Some(t) = taps.as_deref_mut() {
            t.attn_residual = d.download(work.x.slice(xs.clone())?)?;
        }

        // MoE block: x += the chosen experts' down(silu(gate · h) * (up · h)), weighted, over h = norm(x).
        kernels.ffn_norm_route(self, work, n)?;
        if let Some(t) = taps.as_deref_mut() {
            t.ffn_norm = d.download(work.h.slice(xs.clone())?)?;
        }
        if seeded::in_layer(self.defect, Defect::TopkNinthExpert, l, cfg) {
            let Workspace { router_logits, expert_ids, expert_weights, .. } = &mut *work;
            let logits = router_logits.slice(0..n * cfg.n_expert)?;
            let (ids, wts) = (expert_ids.slice_mut(0..n * k)?, expert_weights.slice_mut(0..n * k)?);
            seeded::next_expert_routing(d, cfg, logits, ids, wts)?;
        }
        let rounded = self.expert_input(work.h.slice(xs.clone())?, n)?;
        if taps.is_none() && kernels.experts_fused(self, work, rounded.as_ref(), n)? {
            return Ok(());
        }
        kernels.expert_outputs(self, work, rounded.as_ref(), n)?;
        if let Some(t) = taps {
            t.expert_out = d.download(work.expert_out.slice(0..n * k * hidden)?)?;
            // The weighted sum alone, into the normed buffer (no longer read) zeroed: the kernel adds the
            // sum to what is there once, and 0 + s = s.
            d.copy_to_device(&vec![0.0f32; n * hidden], work.h.slice_mut(xs.clone())?)?;
            kernels.combine(self, work, n, Sum::Normed)?;
            t.moe_out = d.download(work.h.slice(xs)?)?;
        }
        kernels.combine(self, work, n, Sum::Residual)
    }

    /// RMSNorm of `rows` rows of `x` by `w` into `out`: the fast kernel, or the exact one's reduction
    /// tree under [`Defect::CudaExactNormTree`].
    pub(super) fn rmsnorm(
        &self,
        x: DevSlice<'_, f32>,
        w: DevSlice<'_, f32>,
        rows: usize,
        out: DevSliceMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let (hidden, eps) = (self.cfg.hidden, self.cfg.rms_eps as f32);
        match self.defect == Some(Defect::CudaExactNormTree) {
            true => self.d.rmsnorm_exact(x, w, rows, hidden, eps, out),
            false => self.d.rmsnorm(x, w, rows, hidden, eps, out),
        }
    }

    /// The q / k head-norm weights, or none when the norm is skipped.
    pub(super) fn qk_norm<'w>(&self, norm: DevSlice<'w, f32>, eps: f32) -> Option<(DevSlice<'w, f32>, f32)> {
        (self.defect != Some(Defect::QkNormSkipped)).then_some((norm, eps))
    }

    /// In a decode step (`pos0 > 0`) of the stale-row layer, the new cache rows hold the previous row.
    fn stale_kv(
        &self,
        keys: &mut DeviceBuffer<f32>,
        values: &mut DeviceBuffer<f32>,
        pos0: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        if pos0 == 0 || !seeded::in_layer(self.defect, Defect::KvStaleRow, self.l, self.cfg) {
            return Ok(());
        }
        let kvd = self.cfg.kv_dim();
        seeded::stale_rows(self.d, keys, kvd, pos0, n)?;
        seeded::stale_rows(self.d, values, kvd, pos0, n)
    }

    /// The attention score scale: `head_dim^-0.5`, or `1 / head_dim`.
    fn attention_scale(&self) -> f32 {
        let hd = self.cfg.head_dim as f64;
        match self.defect == Some(Defect::AttentionScaleInvHeadDim) {
            true => (1.0 / hd) as f32,
            false => (1.0 / hd.sqrt()) as f32,
        }
    }

    /// The heads' output rounded to f16 (a copy) under [`Defect::F16OutputProjectionInput`]; `None`: use
    /// the heads as they are.
    fn o_proj_input(&self, heads: DevSlice<'_, f32>) -> Result<Option<DeviceBuffer<f32>>, CudaError> {
        if self.defect != Some(Defect::F16OutputProjectionInput) {
            return Ok(None);
        }
        let mut copy = seeded::copy_of(self.d, heads)?;
        self.d.seeded_round_f16(copy.as_mut())?;
        Ok(Some(copy))
    }

    /// Whether the output projection is added to the residual stream (not in the dropped layer).
    fn attn_residual(&self) -> bool {
        !seeded::in_layer(self.defect, Defect::AttnResidualDropped, self.l, self.cfg)
    }

    /// Whether the router weights are renormalised.
    pub(super) fn norm_topk(&self) -> bool {
        self.cfg.norm_topk_prob && self.defect != Some(Defect::RouterWeightsNotRenormalised)
    }

    /// The experts' input (`n` normalised rows) rounded to a Q8 grid (a copy) under a Q8 defect; `None`:
    /// use the rows as they are.
    fn expert_input(&self, h: DevSlice<'_, f32>, n: usize) -> Result<Option<DeviceBuffer<f32>>, CudaError> {
        let Some(block) = seeded::q8_block(self.defect) else { return Ok(None) };
        let mut copy = seeded::copy_of(self.d, h)?;
        self.d.seeded_round_q8(copy.as_mut(), n, self.cfg.hidden, block)?;
        Ok(Some(copy))
    }

    /// The attention shape of `n_tok` tokens from position `pos0`.
    pub(super) fn attention_shape(&self, n_tok: usize, pos0: usize) -> AttentionShape {
        let cfg = self.cfg;
        AttentionShape { n_tok, n_head: cfg.n_head, n_kv_head: cfg.n_kv_head, head_dim: cfg.head_dim, pos0 }
    }
}
