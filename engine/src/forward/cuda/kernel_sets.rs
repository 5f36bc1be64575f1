//! The two kernel sets of the `cuda` backend's layer ([`super::layer::KernelSet`]): [`Fast`] (the `fast`
//! policy: fused launches where they exist, expert grouping, the decode graph's device-position kernels)
//! and [`Exact`] (the `exact` policy: the canonical operation order of `docs/numerics.md`, the `cpu`
//! backend's bits).

use moe_kernels::cuda::{
    CudaError, DevSlice, DevSliceMut, DeviceBuffer, DeviceMatrix, ExactRows, FUSED_MAX_SLOTS, Routing,
};

use super::layer::{At, KernelSet, Layer, Sum};
use super::seeded;
use super::{DeviceLayer, Workspace};
use crate::defect::Defect;

/// The `fast` kernels.
pub(super) struct Fast;

/// The `exact` kernels, with the RoPE tables (cosines, sines) they rotate by.
pub(super) struct Exact<'r> {
    pub(super) rope: (DevSlice<'r, f32>, DevSlice<'r, f32>),
}

/// Whether layer `lw`'s experts can run through the fused kernels (`moe_gate_up`, `moe_down_combine`):
/// gate and up projections of one shape and format, at most
/// [`FUSED_MAX_SLOTS`] experts per token.
fn fused_experts(lw: &DeviceLayer, k: usize) -> bool {
    let (g, u) = (&lw.gate_exps, &lw.up_exps);
    k <= FUSED_MAX_SLOTS
        && (g.ty(), g.cols(), g.rows(), g.experts()) == (u.ty(), u.cols(), u.rows(), u.experts())
}

/// The experts' input: the seeded copy, or the normed rows `h`.
fn expert_input<'a>(
    rounded: Option<&'a DeviceBuffer<f32>>,
    h: &'a DeviceBuffer<f32>,
    rows: std::ops::Range<usize>,
) -> Result<DevSlice<'a, f32>, CudaError> {
    rounded.map_or_else(|| h.slice(rows), |b| Ok(b.as_slice()))
}

impl KernelSet for Fast {
    fn attn_norm_qkv(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        values: &mut DeviceBuffer<f32>,
        at: At,
    ) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l, .. } = *layer;
        let lw = &model.layers[l];
        let (hidden, qd, kvd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let Workspace { x, h, q, pos, .. } = work;
        match at {
            At::Positions { n, pos0 } => {
                let (xs, new_kv) = (0..n * hidden, pos0 * kvd..(pos0 + n) * kvd);
                layer.rmsnorm(x.slice(xs.clone())?, lw.attn_norm.as_slice(), n, h.slice_mut(xs.clone())?)?;
                let hn = h.slice(xs)?;
                d.matvec(&lw.q, hn, n, q.slice_mut(0..n * qd)?, false)?;
                d.matvec(&lw.k, hn, n, keys.slice_mut(new_kv.clone())?, false)?;
                d.matvec(&lw.v, hn, n, values.slice_mut(new_kv)?, false)
            }
            At::DevicePosition { capacity, .. } => {
                let (xs, all_kv, pos) = (0..hidden, 0..capacity * kvd, pos.slice(0..1)?);
                if layer.defect.is_none() && d.has_norm_qkv(&lw.q, &lw.k, &lw.v) {
                    // Norm, q, k and v in one launch (the values of the four below).
                    let (x, norm, h) = (x.slice(xs.clone())?, lw.attn_norm.as_slice(), h.slice_mut(xs)?);
                    let caches = (keys.slice_mut(all_kv.clone())?, values.slice_mut(all_kv)?);
                    let eps = cfg.rms_eps as f32;
                    let w = (&lw.q, &lw.k, &lw.v);
                    return d.norm_qkv(x, norm, eps, h, w, q.slice_mut(0..qd)?, caches, capacity, pos);
                }
                layer.rmsnorm(x.slice(xs.clone())?, lw.attn_norm.as_slice(), 1, h.slice_mut(xs.clone())?)?;
                let hn = h.slice(xs)?;
                d.matvec(&lw.q, hn, 1, q.slice_mut(0..qd)?, false)?;
                d.matvec_to_row(&lw.k, hn, keys.slice_mut(all_kv.clone())?, capacity, pos)?;
                d.matvec_to_row(&lw.v, hn, values.slice_mut(all_kv)?, capacity, pos)
            }
        }
    }

    fn qk_norm_rope(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        at: At,
    ) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l, defect } = *layer;
        let lw = &model.layers[l];
        let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let (eps, inv_freq) = (cfg.rms_eps as f32, model.inv_freq.as_slice());
        let Workspace { q, pos, .. } = work;
        match at {
            At::Positions { n, pos0 } => {
                let rope_pos0 = seeded::rope_pos0(defect, pos0);
                let q_norm = layer.qk_norm(lw.q_norm.as_slice(), eps);
                d.head_norm_rope(
                    q.slice_mut(0..n * qd)?,
                    qd,
                    n,
                    cfg.n_head,
                    hd,
                    q_norm,
                    rope_pos0,
                    inv_freq,
                )?;
                let k_norm = layer.qk_norm(lw.k_norm.as_slice(), eps);
                let new_kv = keys.slice_mut(pos0 * kvd..(pos0 + n) * kvd)?;
                d.head_norm_rope(new_kv, kvd, n, cfg.n_kv_head, hd, k_norm, rope_pos0, inv_freq)
            }
            At::DevicePosition { capacity, .. } => d.head_norm_rope_qk(
                q.slice_mut(0..qd)?,
                (cfg.n_head, lw.q_norm.as_slice()),
                keys.slice_mut(0..capacity * kvd)?,
                (kvd, cfg.n_kv_head, lw.k_norm.as_slice()),
                hd,
                eps,
                inv_freq,
                (pos.slice(0..1)?, capacity),
            ),
        }
    }

    fn attention(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        keys: &DeviceBuffer<f32>,
        values: &DeviceBuffer<f32>,
        at: At,
        scale: f32,
    ) -> Result<(), CudaError> {
        let (d, cfg) = (layer.d, layer.cfg);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let Workspace { q, attn, pos, .. } = work;
        match at {
            At::Positions { n, pos0 } => {
                let shape = layer.attention_shape(n, pos0);
                let all_kv = 0..(pos0 + n) * kvd;
                let (kc, vc) = (keys.slice(all_kv.clone())?, values.slice(all_kv)?);
                let (q, out) = (q.slice(0..n * qd)?, attn.slice_mut(0..n * qd)?);
                match layer.defect == Some(Defect::CudaExactAttentionOrder) {
                    true => d.attention_exact(q, kc, vc, out, shape, scale),
                    false => d.attention(q, kc, vc, out, shape, scale),
                }
            }
            At::DevicePosition { capacity, .. } => {
                let all_kv = 0..capacity * kvd;
                let (kc, vc) = (keys.slice(all_kv.clone())?, values.slice(all_kv)?);
                let (q, out, shape) = (q.slice(0..qd)?, attn.slice_mut(0..qd)?, layer.attention_shape(1, 0));
                d.attention_with(q, kc, vc, out, shape, scale, Some((pos.slice(0..1)?, capacity)))
            }
        }
    }

    fn project(
        &self,
        layer: &Layer<'_>,
        w: &DeviceMatrix,
        input: DevSlice<'_, f32>,
        n: usize,
        out: DevSliceMut<'_, f32>,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        layer.d.matvec(w, input, n, out, accumulate)
    }

    fn ffn_norm_route(&self, layer: &Layer<'_>, work: &mut Workspace, n: usize) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l, defect } = *layer;
        let lw = &model.layers[l];
        let (hidden, n_exp, k) = (cfg.hidden, cfg.n_expert, cfg.n_expert_used);
        let Workspace { x, h, router_logits, router_counter, expert_ids, expert_weights, .. } = work;
        let (xs, slots, eps) = (0..n * hidden, n * k, cfg.rms_eps as f32);
        let (logits, norm_topk) = (router_logits.slice_mut(0..n * n_exp)?, layer.norm_topk());
        let (out_ids, out_w) = (expert_ids.slice_mut(0..slots)?, expert_weights.slice_mut(0..slots)?);
        if n == 1 && defect.is_none() && d.has_norm_router(hidden, n_exp) {
            // One token: norm, router, softmax and top-k in one launch (the values of the launches below).
            let (x, norm, h) = (x.slice(xs.clone())?, lw.ffn_norm.as_slice(), h.slice_mut(xs)?);
            let (choice, counter) = ((k, norm_topk), router_counter.as_mut());
            return d.norm_router_topk(x, norm, eps, h, &lw.router, logits, choice, out_ids, out_w, counter);
        }
        layer.rmsnorm(x.slice(xs.clone())?, lw.ffn_norm.as_slice(), n, h.slice_mut(xs.clone())?)?;
        let hn = h.slice(xs)?;
        if let Some(router) = model.f32_routers.get(l) {
            d.seeded_matvec_bf16acc(router.as_slice(), hn, (n_exp, hidden, n), logits)?;
            let logits = router_logits.slice(0..n * n_exp)?;
            d.softmax_topk(logits, n, n_exp, k, norm_topk, out_ids, out_w)
        } else if n == 1 {
            // One token: router, softmax and top-k in one launch (the values of the two below).
            d.router_topk(&lw.router, hn, logits, k, norm_topk, out_ids, out_w, router_counter.as_mut())
        } else {
            d.matvec(&lw.router, hn, n, logits, false)?;
            let logits = router_logits.slice(0..n * n_exp)?;
            d.softmax_topk(logits, n, n_exp, k, norm_topk, out_ids, out_w)
        }
    }

    fn experts_fused(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        input: Option<&DeviceBuffer<f32>>,
        n: usize,
    ) -> Result<bool, CudaError> {
        let Layer { d, cfg, model, l, .. } = *layer;
        let lw = &model.layers[l];
        let (hidden, ffn, k) = (cfg.hidden, cfg.expert_ffn, cfg.n_expert_used);
        let slots = n * k;
        // Few slots run one block row per slot (more are grouped by expert, `expert_outputs`); then gate +
        // up + SwiGLU in one pass and down + weighted sum + residual in another (the values of the
        // unfused launches).
        if slots >= cfg.n_expert || !fused_experts(lw, k) {
            return Ok(false);
        }
        let Workspace { x, h, expert_ids, expert_weights, act, .. } = work;
        let hn = expert_input(input, h, 0..n * hidden)?;
        let (ids, wts) = (expert_ids.slice(0..slots)?, expert_weights.slice(0..slots)?);
        d.moe_gate_up(&lw.gate_exps, &lw.up_exps, hn, k, ids, slots, act.slice_mut(0..slots * ffn)?)?;
        let a = act.slice(0..slots * ffn)?;
        d.moe_down_combine(&lw.down_exps, a, ids, wts, n, k, x.slice_mut(0..n * hidden)?)?;
        Ok(true)
    }

    fn expert_outputs(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        input: Option<&DeviceBuffer<f32>>,
        n: usize,
    ) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l, .. } = *layer;
        let lw = &model.layers[l];
        let (hidden, ffn, k) = (cfg.hidden, cfg.expert_ffn, cfg.n_expert_used);
        let slots = n * k;
        let Workspace { h, expert_ids, groups, gate, act, expert_out, .. } = work;
        let hn = expert_input(input, h, 0..n * hidden)?;
        let ids = expert_ids.slice(0..slots)?;
        let routing = if slots < cfg.n_expert {
            Routing::PerSlot { ids }
        } else {
            d.moe_group(ids, slots, groups)?;
            Routing::Grouped(&*groups)
        };
        d.moe_matvec(&lw.gate_exps, hn, k, routing, slots, gate.slice_mut(0..slots * ffn)?, None)?;
        let g = Some(gate.slice(0..slots * ffn)?);
        d.moe_matvec(&lw.up_exps, hn, k, routing, slots, act.slice_mut(0..slots * ffn)?, g)?;
        let a = act.slice(0..slots * ffn)?;
        d.moe_matvec(&lw.down_exps, a, 1, routing, slots, expert_out.slice_mut(0..slots * hidden)?, None)
    }

    fn combine(&self, layer: &Layer<'_>, work: &mut Workspace, n: usize, sum: Sum) -> Result<(), CudaError> {
        let cfg = layer.cfg;
        let (hidden, k) = (cfg.hidden, cfg.n_expert_used);
        let Workspace { x, h, expert_ids, expert_weights, expert_out, .. } = work;
        let (ids, wts) = (expert_ids.slice(0..n * k)?, expert_weights.slice(0..n * k)?);
        let outs = expert_out.slice(0..n * k * hidden)?;
        let into = match sum {
            Sum::Residual => x.slice_mut(0..n * hidden)?,
            Sum::Normed => h.slice_mut(0..n * hidden)?,
        };
        layer.d.moe_combine(outs, ids, wts, n, k, hidden, cfg.n_expert, into)
    }
}

impl Exact<'_> {
    /// The `exact` kernels have no device-position variant: decode graphs are `fast` only, and `exact`
    /// decode steps run on host positions.
    fn positions(at: At, op: &'static str) -> Result<(usize, usize), CudaError> {
        match at {
            At::Positions { n, pos0 } => Ok((n, pos0)),
            At::DevicePosition { .. } => {
                let reason = "the exact kernels read host positions only (no decode graph)".to_string();
                Err(CudaError::InvalidArgument { op, reason })
            }
        }
    }
}

impl KernelSet for Exact<'_> {
    fn attn_norm_qkv(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        values: &mut DeviceBuffer<f32>,
        at: At,
    ) -> Result<(), CudaError> {
        let (n, pos0) = Self::positions(at, "exact attn_norm_qkv")?;
        let Layer { d, cfg, model, l, .. } = *layer;
        let lw = &model.layers[l];
        let (hidden, qd, kvd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let (xs, new_kv, tokens) =
            (0..n * hidden, pos0 * kvd..(pos0 + n) * kvd, ExactRows::Tokens { n_tok: n });
        let Workspace { x, h, q, .. } = work;
        let eps = cfg.rms_eps as f32;
        d.rmsnorm_exact(
            x.slice(xs.clone())?,
            lw.attn_norm.as_slice(),
            n,
            hidden,
            eps,
            h.slice_mut(xs.clone())?,
        )?;
        let hn = h.slice(xs)?;
        d.matvec_exact(&lw.q, hn, tokens, q.slice_mut(0..n * qd)?, None, false)?;
        d.matvec_exact(&lw.k, hn, tokens, keys.slice_mut(new_kv.clone())?, None, false)?;
        d.matvec_exact(&lw.v, hn, tokens, values.slice_mut(new_kv)?, None, false)
    }

    fn qk_norm_rope(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        at: At,
    ) -> Result<(), CudaError> {
        let (n, pos0) = Self::positions(at, "exact qk_norm_rope")?;
        let Layer { d, cfg, model, l, defect } = *layer;
        let lw = &model.layers[l];
        let (qd, kvd, hd, eps) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim, cfg.rms_eps as f32);
        let (q_norm, k_norm) = ((lw.q_norm.as_slice(), eps), (lw.k_norm.as_slice(), eps));
        let rope_pos0 = seeded::rope_pos0(defect, pos0);
        let q = work.q.slice_mut(0..n * qd)?;
        d.head_norm_rope_exact(q, qd, n, cfg.n_head, hd, q_norm, rope_pos0, self.rope)?;
        let new_kv = keys.slice_mut(pos0 * kvd..(pos0 + n) * kvd)?;
        d.head_norm_rope_exact(new_kv, kvd, n, cfg.n_kv_head, hd, k_norm, rope_pos0, self.rope)
    }

    fn attention(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        keys: &DeviceBuffer<f32>,
        values: &DeviceBuffer<f32>,
        at: At,
        scale: f32,
    ) -> Result<(), CudaError> {
        let (n, pos0) = Self::positions(at, "exact attention")?;
        let (qd, kvd) = (layer.cfg.q_dim(), layer.cfg.kv_dim());
        let all_kv = 0..(pos0 + n) * kvd;
        let (kc, vc) = (keys.slice(all_kv.clone())?, values.slice(all_kv)?);
        let (q, out) = (work.q.slice(0..n * qd)?, work.attn.slice_mut(0..n * qd)?);
        layer.d.attention_exact(q, kc, vc, out, layer.attention_shape(n, pos0), scale)
    }

    fn project(
        &self,
        layer: &Layer<'_>,
        w: &DeviceMatrix,
        input: DevSlice<'_, f32>,
        n: usize,
        out: DevSliceMut<'_, f32>,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        layer.d.matvec_exact(w, input, ExactRows::Tokens { n_tok: n }, out, None, accumulate)
    }

    fn ffn_norm_route(&self, layer: &Layer<'_>, work: &mut Workspace, n: usize) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l, .. } = *layer;
        let lw = &model.layers[l];
        let (hidden, n_exp, k, eps) = (cfg.hidden, cfg.n_expert, cfg.n_expert_used, cfg.rms_eps as f32);
        let Workspace { x, h, router_logits, expert_ids, expert_weights, .. } = work;
        let xs = 0..n * hidden;
        d.rmsnorm_exact(
            x.slice(xs.clone())?,
            lw.ffn_norm.as_slice(),
            n,
            hidden,
            eps,
            h.slice_mut(xs.clone())?,
        )?;
        let hn = h.slice(xs)?;
        let logits = router_logits.slice_mut(0..n * n_exp)?;
        match model.f32_routers.get(l) {
            Some(router) => d.seeded_matvec_bf16acc(router.as_slice(), hn, (n_exp, hidden, n), logits)?,
            None => d.matvec_exact(&lw.router, hn, ExactRows::Tokens { n_tok: n }, logits, None, false)?,
        }
        let slots = n * k;
        d.softmax_topk_exact(
            router_logits.slice(0..n * n_exp)?,
            n,
            n_exp,
            k,
            layer.norm_topk(),
            expert_ids.slice_mut(0..slots)?,
            expert_weights.slice_mut(0..slots)?,
        )
    }

    fn experts_fused(
        &self,
        _layer: &Layer<'_>,
        _work: &mut Workspace,
        _input: Option<&DeviceBuffer<f32>>,
        _n: usize,
    ) -> Result<bool, CudaError> {
        // The canonical order runs the experts one block row per routed slot, unfused.
        Ok(false)
    }

    fn expert_outputs(
        &self,
        layer: &Layer<'_>,
        work: &mut Workspace,
        input: Option<&DeviceBuffer<f32>>,
        n: usize,
    ) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l, .. } = *layer;
        let lw = &model.layers[l];
        let (hidden, ffn, k) = (cfg.hidden, cfg.expert_ffn, cfg.n_expert_used);
        let slots = n * k;
        let Workspace { h, expert_ids, gate, act, expert_out, .. } = work;
        let hn = expert_input(input, h, 0..n * hidden)?;
        let ids = expert_ids.slice(0..slots)?;
        let per_token = ExactRows::Slots { ids, in_div: k };
        d.matvec_exact(&lw.gate_exps, hn, per_token, gate.slice_mut(0..slots * ffn)?, None, false)?;
        let g = Some(gate.slice(0..slots * ffn)?);
        d.matvec_exact(&lw.up_exps, hn, per_token, act.slice_mut(0..slots * ffn)?, g, false)?;
        let a = act.slice(0..slots * ffn)?;
        let per_slot = ExactRows::Slots { ids, in_div: 1 };
        d.matvec_exact(&lw.down_exps, a, per_slot, expert_out.slice_mut(0..slots * hidden)?, None, false)
    }

    fn combine(&self, layer: &Layer<'_>, work: &mut Workspace, n: usize, sum: Sum) -> Result<(), CudaError> {
        let cfg = layer.cfg;
        let (hidden, k) = (cfg.hidden, cfg.n_expert_used);
        let Workspace { x, h, expert_ids, expert_weights, expert_out, .. } = work;
        let (ids, wts) = (expert_ids.slice(0..n * k)?, expert_weights.slice(0..n * k)?);
        let outs = expert_out.slice(0..n * k * hidden)?;
        let into = match sum {
            Sum::Residual => x.slice_mut(0..n * hidden)?,
            Sum::Normed => h.slice_mut(0..n * hidden)?,
        };
        layer.d.moe_combine_exact(outs, ids, wts, n, k, hidden, cfg.n_expert, into)
    }
}
