//! The seeded defects of the CPU-side forward (`crate::defect`, `cargo moe-gate selftest` only): each hook
//! below is one step of [`Model`]'s orchestration that does what the forward always does unless the
//! model was built with a defect that alters that step. The reference backend is never built with one
//! (`Qwen3Moe::with_defect` is called by the `cpu` backend alone), so its arithmetic is untouched.

use std::borrow::Cow;

use half::f16;
use moe_kernels::cpu::{KvView, Real, causal_attention_head, dot, route, top_k};
use rayon::prelude::*;

use super::{Batch, LayerCache, Model, add_in_place};
use crate::defect::{Defect, SWAPPED_EXPERTS, WRONG_ROPE_THETA};
use crate::forward::numerics::{Mat, Numerics};
use crate::weights::{LayerWeights, WeightTensor};

/// Values per block of [`Defect::Q8Block32ExpertInput`] (ggml's Q8_0).
const Q8_0_BLOCK: usize = 32;
/// Values per block of [`Defect::Q8Block256ExpertInput`] (ggml's Q8_K).
const Q8_K_BLOCK: usize = 256;
/// The largest magnitude of a signed 8-bit grid step count.
const Q8_MAX: f64 = 127.0;

impl<N: Numerics> Model<N> {
    fn has(&self, d: Defect) -> bool {
        self.defect == Some(d)
    }

    fn has_in_layer(&self, d: Defect, l: usize) -> bool {
        self.has(d) && d.in_layer(l, self.config().n_layer)
    }

    /// The RoPE base: the model's, or [`WRONG_ROPE_THETA`].
    pub(super) fn rope_theta(&self) -> f64 {
        match self.has(Defect::RopeWrongBase) {
            true => WRONG_ROPE_THETA,
            false => self.config().rope_theta,
        }
    }

    /// Positions the RoPE table needs beyond the batch's last one.
    pub(super) fn rope_lead(&self) -> usize {
        usize::from(self.has(Defect::RopeDecodePositionPlusOne))
    }

    /// The position each row of `batch` is rotated by: its own, or one more in a decode step (a row whose
    /// sequence had cached positions).
    pub(super) fn rope_positions<'b>(&self, batch: &'b Batch) -> Cow<'b, [usize]> {
        if !self.has(Defect::RopeDecodePositionPlusOne) {
            return Cow::Borrowed(&batch.pos);
        }
        let decoding = |t: usize| batch.pos[batch.spans[batch.seq[t]].start] > 0;
        Cow::Owned((0..batch.rows()).map(|t| batch.pos[t] + usize::from(decoding(t))).collect())
    }

    /// The q / k head-norm weights, or none when the norm is skipped.
    pub(super) fn qk_norm<'a>(&self, norm: &'a [N::F]) -> Option<&'a [N::F]> {
        (!self.has(Defect::QkNormSkipped)).then_some(norm)
    }

    /// In a decode step of the stale-row layer, the new cache row of each decoding sequence is overwritten
    /// with the row before it (the write of the new key and value never happened).
    pub(super) fn stale_kv_rows(&self, l: usize, caches: &mut [&mut LayerCache<N::F>], batch: &Batch) {
        if !self.has_in_layer(Defect::KvStaleRow, l) {
            return;
        }
        let kv_dim = self.config().kv_dim();
        for (cache, span) in caches.iter_mut().zip(&batch.spans) {
            let start = batch.pos[span.start];
            if start == 0 {
                continue;
            }
            for p in start..start + span.len() {
                for rows in [&mut cache.keys, &mut cache.values] {
                    rows.copy_within((p - 1) * kv_dim..p * kv_dim, p * kv_dim);
                }
            }
        }
    }

    /// The attention score scale: `head_dim^-0.5`, or `1 / head_dim`.
    pub(super) fn attention_scale(&self) -> f64 {
        let hd = self.config().head_dim as f64;
        match self.has(Defect::AttentionScaleInvHeadDim) {
            true => 1.0 / hd,
            false => 1.0 / hd.sqrt(),
        }
    }

    /// One query head's causal attention (`moe_kernels::cpu::causal_attention_head`, or the same without
    /// the max subtracted in the softmax).
    pub(super) fn attention_head(
        &self,
        q: &[N::F],
        kv: KvView<'_, N::F>,
        n_ctx: usize,
        scale: N::F,
        scores: &mut Vec<N::F>,
        out: &mut [N::F],
    ) {
        if !self.has(Defect::SoftmaxNoMaxSubtraction) {
            return causal_attention_head(q, kv, n_ctx, scale, scores, out);
        }
        let d = q.len();
        fn row<F>(rows: &[F], p: usize, width: usize, offset: usize, d: usize) -> &[F] {
            &rows[p * width + offset..p * width + offset + d]
        }
        let row = |rows, p| row(rows, p, kv.row_width, kv.offset, d);
        scores.clear();
        scores.extend((0..n_ctx).map(|p| dot(q, row(kv.keys, p)) * scale));
        let mut sum = N::F::ZERO;
        for s in scores.iter_mut() {
            *s = s.exp();
            sum += *s;
        }
        out.fill(N::F::ZERO);
        for (p, &e) in scores.iter().enumerate() {
            let a = e / sum;
            for (o, &v) in out.iter_mut().zip(row(kv.values, p)) {
                *o += a * v;
            }
        }
    }

    /// The input of the attention output projection: the heads' output, or it rounded to f16.
    pub(super) fn o_proj_input<'a>(&self, heads: &'a [N::F]) -> Cow<'a, [N::F]> {
        if !self.has(Defect::F16OutputProjectionInput) {
            return Cow::Borrowed(heads);
        }
        Cow::Owned(heads.iter().map(|&v| N::F::from_f64(f16::from_f64(v.to_f64()).to_f64())).collect())
    }

    /// A q, k, v or o projection: the backend's matmul, or a pairwise tree over each row's products.
    pub(super) fn attn_matmul(&self, w: &WeightTensor, x: &[N::F]) -> Vec<N::F> {
        if !self.has(Defect::PairwiseAttentionProjections) {
            return self.matmul(w, x);
        }
        self.matmul_rowwise(Mat::of(w), x, pairwise_dot)
    }

    /// `x += attn`, or, in the dropped layer, `x = attn`.
    pub(super) fn attn_residual(&self, l: usize, x: &mut [N::F], attn: &[N::F]) {
        match self.has_in_layer(Defect::AttnResidualDropped, l) {
            true => x.copy_from_slice(attn),
            false => add_in_place(x, attn),
        }
    }

    /// The router logits: the backend's matmul, or each dot product accumulated in bf16.
    pub(super) fn router_logits(&self, w: &LayerWeights, h: &[N::F]) -> Vec<N::F> {
        if !self.has(Defect::Bf16RouterAccumulation) {
            return self.matmul(&w.ffn_gate_inp, h);
        }
        self.matmul_rowwise(Mat::of(&w.ffn_gate_inp), h, bf16_accumulated_dot)
    }

    /// One token's routing in layer `l` (`moe_kernels::cpu::route`, unless a defect alters the top-k or
    /// the renormalisation).
    pub(super) fn route_row(
        &self,
        l: usize,
        logits: &[N::F],
        probs: &mut [N::F],
        experts: &mut [u32],
        weights: &mut [N::F],
    ) {
        let normalize = self.config().norm_topk_prob && !self.has(Defect::RouterWeightsNotRenormalised);
        route(logits, normalize, probs, experts, weights);
        if self.has_in_layer(Defect::TopkNinthExpert, l) {
            take_next_expert(probs, normalize, experts, weights);
        }
    }

    /// The input of the experts' FFN: the normalised rows, or them rounded to a Q8 grid.
    pub(super) fn expert_input<'a>(&self, h: &'a [N::F]) -> Cow<'a, [N::F]> {
        let block = match self.defect {
            Some(Defect::Q8Block32ExpertInput) => Q8_0_BLOCK,
            Some(Defect::Q8Block256ExpertInput) => Q8_K_BLOCK,
            _ => return Cow::Borrowed(h),
        };
        let hidden = self.config().hidden;
        let mut out = h.to_vec();
        out.par_chunks_mut(hidden).for_each(|row| row.chunks_mut(block).for_each(round_to_q8_grid));
        Cow::Owned(out)
    }

    /// The expert whose weights compute expert `e` in layer `l`: `e`, or its partner in the swap.
    pub(super) fn expert_weights_of(&self, l: usize, e: usize) -> usize {
        if !self.has_in_layer(Defect::ExpertIdsSwappedLastLayer, l) {
            return e;
        }
        match SWAPPED_EXPERTS {
            (a, b) if e == a => b,
            (a, b) if e == b => a,
            _ => e,
        }
    }

    /// One token's MoE output under a benign change of the combine's order or rounding (the plain combine
    /// otherwise): `m` is zero on entry, `ys[s]` the slot outputs, `ws[s]` their weights, `ids[s]` their
    /// experts.
    pub(super) fn seeded_combine(&self, m: &mut [N::F], ys: &[&[N::F]], ws: &[N::F], ids: &[u32]) {
        let mut slots: Vec<usize> = (0..ys.len()).collect();
        if self.has(Defect::MoeSumByExpertIndex) {
            slots.sort_by_key(|&s| ids[s]);
        }
        let fused = self.has(Defect::FmaMoeCombine);
        for s in slots {
            for (m, &v) in m.iter_mut().zip(ys[s].iter()) {
                *m = match fused {
                    true => N::F::from_f64(v.to_f64().mul_add(ws[s].to_f64(), m.to_f64())),
                    false => *m + v * ws[s],
                };
            }
        }
    }

    /// `w · x` for the rows of `x`, each product by `row_dot(dequantised weight row, token row)`: the
    /// seeded products' way (one row at a time; slower than the backend's, and only the selftest runs it).
    fn matmul_rowwise(
        &self,
        w: Mat<'_>,
        x: &[N::F],
        row_dot: impl Fn(&[N::F], &[N::F]) -> N::F + Sync,
    ) -> Vec<N::F> {
        let n_tok = x.len() / w.cols;
        let mut by_row = vec![N::F::ZERO; w.rows * n_tok];
        by_row.par_chunks_mut(n_tok).enumerate().for_each_init(
            || vec![N::F::ZERO; w.cols],
            |row, (r, out)| {
                self.numerics.dequantize_row(w, r, row);
                for (o, xt) in out.iter_mut().zip(x.chunks_exact(w.cols)) {
                    *o = row_dot(row, xt);
                }
            },
        );
        let mut out = vec![N::F::ZERO; w.rows * n_tok];
        for (r, col) in by_row.chunks_exact(n_tok).enumerate() {
            for (t, &v) in col.iter().enumerate() {
                out[t * w.rows + r] = v;
            }
        }
        out
    }
}

/// Rounds `block` in place to a symmetric 8-bit grid: step `max|x| / 127`, each value to the nearest step
/// (what a Q8_0 / Q8_K quantise-dequantise does to activations).
pub(crate) fn round_to_q8_grid<F: Real>(block: &mut [F]) {
    let amax = block.iter().map(|v| v.to_f64().abs()).fold(0.0, f64::max);
    if amax == 0.0 {
        return;
    }
    let step = amax / Q8_MAX;
    for v in block {
        *v = F::from_f64((v.to_f64() / step).round() * step);
    }
}

/// `value` rounded to bf16 (nearest, ties to even), as f32.
pub(crate) fn round_to_bf16(value: f32) -> f32 {
    half::bf16::from_f32(value).to_f32()
}

/// `w · x` in increasing index with the running sum rounded to bf16 after every addition.
fn bf16_accumulated_dot<F: Real>(w: &[F], x: &[F]) -> F {
    let sum = w.iter().zip(x).fold(0.0f32, |acc, (&a, &b)| round_to_bf16(acc + (a * b).to_f64() as f32));
    F::from_f64(f64::from(sum))
}

/// `w · x` summed by a pairwise tree (halves until 8 products, summed in order).
fn pairwise_dot<F: Real>(w: &[F], x: &[F]) -> F {
    const LEAF: usize = 8;
    if w.len() <= LEAF {
        return w.iter().zip(x).fold(F::ZERO, |s, (&a, &b)| s + a * b);
    }
    let half = w.len() / 2;
    pairwise_dot(&w[..half], &x[..half]) + pairwise_dot(&w[half..], &x[half..])
}

/// Replaces the k-th chosen expert by the (k+1)-th ranked one (`probs` is the router softmax), and the
/// weights by the new set's probabilities, renormalised when `normalize`.
pub(crate) fn take_next_expert<F: Real>(
    probs: &[F],
    normalize: bool,
    experts: &mut [u32],
    weights: &mut [F],
) {
    let k = experts.len();
    if k == 0 || k >= probs.len() {
        return;
    }
    let mut ranked = vec![0u32; k + 1];
    top_k(probs, &mut ranked);
    experts[k - 1] = ranked[k];
    for (w, &e) in weights.iter_mut().zip(experts.iter()) {
        *w = probs[e as usize];
    }
    if normalize {
        let sum = weights.iter().fold(F::ZERO, |s, &w| s + w);
        for w in weights.iter_mut() {
            *w = *w / sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_grid_has_at_most_255_levels_and_keeps_the_extremes() {
        let mut block: Vec<f32> = (0..32).map(|i| ((i * 37 % 29) as f32 - 14.0) / 3.0).collect();
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let original = block.clone();
        round_to_q8_grid(&mut block);
        let step = f64::from(amax) / Q8_MAX;
        for (r, o) in block.iter().zip(&original) {
            // Each value moves by at most half a step (plus f32 rounding of the result).
            assert!((f64::from(*r) - f64::from(*o)).abs() <= step / 2.0 + 1e-6, "{r} vs {o}");
            let q = f64::from(*r) / step;
            assert!((q - q.round()).abs() < 1e-4, "{r} is on the grid");
        }
        assert_eq!(block.iter().fold(0.0f32, |m, v| m.max(v.abs())), amax, "the largest stays");
    }

    #[test]
    fn bf16_rounding_keeps_eight_significant_bits() {
        assert_eq!(round_to_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even gives 1.
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
    }

    #[test]
    fn the_next_expert_replaces_the_last_choice() {
        let probs = [0.05f32, 0.4, 0.1, 0.3, 0.15];
        let (mut experts, mut weights) = ([1u32, 3, 4], [0.0f32; 3]);
        take_next_expert(&probs, true, &mut experts, &mut weights);
        assert_eq!(experts, [1, 3, 2], "the 4th ranked (0.1) instead of the 3rd (0.15)");
        let sum: f32 = weights.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "renormalised: {sum}");
    }
}
