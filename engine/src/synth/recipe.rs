//! The recipe of a synthetic model: its tensors (llama.cpp `qwen3moe` names and shapes), their types
//! in a given mix, and the distribution of each, chosen so a forward behaves like a trained model's.
//!
//! Every matrix draws zero-mean weights of standard deviation `gain / sqrt(fan_in)` (fan-in = row
//! length), so with RMS-normalised inputs each projection's output has RMS about `gain`. The gains are
//! set so that (docs/synthetic-models.md shows the measured per-layer statistics):
//! - the residual stream starts at RMS [`EMBED_STD`] and each of the `2 n_layer` sub-layers adds an
//!   uncorrelated part of RMS about 0.2, so the hidden RMS grows gently (0.75 to about 2 over 48 layers):
//!   no vanishing or exploding stream;
//! - attention is peaked: QK-norm gains around [`QK_NORM_GAIN`] give attention logits of standard
//!   deviation about 2.6, so a position's softmax is far from uniform;
//! - router logits have a standard deviation about [`ROUTER_GAIN`], with per-expert scales spread by
//!   ±[`ROUTER_ROW_SPREAD`] (unequal expert popularity): the k-th and (k+1)-th logits of 128 are
//!   separated by about 0.09 on median, with a near-tie (gap under 1e-3) in about 1% of decisions, as
//!   in trained routers;
//! - final logits have a standard deviation about [`LM_HEAD_GAIN`], a trained LM head's spread.

use moe_kernels::GgmlType;

use super::draw::Init;
use super::mix::QuantMix;
use crate::config::ModelConfig;

/// Standard deviation of the token embeddings: the residual stream's RMS before the first layer.
pub const EMBED_STD: f64 = 0.7;
/// Mean of the RMSNorm gains of the residual norms (`attn_norm`, `ffn_norm`, `output_norm`).
pub const NORM_GAIN: f64 = 1.0;
/// Spread of those gains, as in the reference fixtures (`1 + 0.1 N(0, 1)`): a norm weight that a
/// backend ignored would show.
pub const NORM_GAIN_SPREAD: f64 = 0.1;
/// Mean of the QK-norm gains (`attn_q_norm`, `attn_k_norm`): after the per-head RMSNorm, q·k/sqrt(d)
/// has standard deviation about the product of the two gains.
pub const QK_NORM_GAIN: f64 = 1.6;
/// Spread of the QK-norm gains.
pub const QK_NORM_GAIN_SPREAD: f64 = 0.3;
/// Gain of the q, k and v projections (q and k are renormalised by QK-norm, so only v's matters).
pub const QKV_GAIN: f64 = 1.0;
/// Gain of the attention output projection: the attention sub-layer adds about 0.2 RMS.
pub const ATTN_OUT_GAIN: f64 = 0.25;
/// Standard deviation of the router logits (before per-expert spread).
pub const ROUTER_GAIN: f64 = 2.0;
/// Per-expert spread of the router rows' scale.
pub const ROUTER_ROW_SPREAD: f64 = 0.25;
/// Gain of the expert gate and up projections: SiLU works in its curved region (|x| about 1).
pub const EXPERT_IN_GAIN: f64 = 1.0;
/// Gain of the expert down projections: one expert's output RMS is about 0.6 of this (SiLU(g)·u of
/// unit-variance g, u has RMS 0.6), and the renormalised top-k mixture of independent experts about
/// 0.47 of that, so the MoE sub-layer adds about 0.2 RMS.
pub const EXPERT_DOWN_GAIN: f64 = 0.7;
/// Gain of the LM head: the standard deviation of the final logits.
pub const LM_HEAD_GAIN: f64 = 3.0;

/// One tensor of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRecipe {
    /// llama.cpp's name, e.g. `blk.0.ffn_down_exps.weight`.
    pub name: String,
    /// Shape in ggml order (`dims[0]` is the row length).
    pub dims: Vec<usize>,
    /// Storage type in the requested mix.
    pub ty: GgmlType,
    /// Distribution of its values.
    pub init: Init,
}

/// The tensors of a Qwen3-MoE model of configuration `cfg` in `mix`, in llama.cpp's file order
/// (embeddings, each layer, final norm, LM head).
pub fn tensors(cfg: &ModelConfig, mix: QuantMix) -> Vec<TensorRecipe> {
    let (h, q, kv, f, e) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.expert_ffn, cfg.n_expert);
    let matrix =
        |gain: f64, fan_in: usize| Init::Normal { std: gain / (fan_in as f64).sqrt(), row_spread: 0.0 };
    let norm = Init::Gain { mean: NORM_GAIN, spread: NORM_GAIN_SPREAD };
    let qk_norm = Init::Gain { mean: QK_NORM_GAIN, spread: QK_NORM_GAIN_SPREAD };
    let router = Init::Normal { std: ROUTER_GAIN / (h as f64).sqrt(), row_spread: ROUTER_ROW_SPREAD };

    let mut list = vec![(
        "token_embd.weight".to_owned(),
        vec![h, cfg.vocab],
        Init::Normal { std: EMBED_STD, row_spread: 0.0 },
    )];
    for i in 0..cfg.n_layer {
        let name = |kind: &str| format!("blk.{i}.{kind}.weight");
        list.extend([
            (name("attn_norm"), vec![h], norm),
            (name("attn_q"), vec![h, q], matrix(QKV_GAIN, h)),
            (name("attn_k"), vec![h, kv], matrix(QKV_GAIN, h)),
            (name("attn_v"), vec![h, kv], matrix(QKV_GAIN, h)),
            (name("attn_q_norm"), vec![cfg.head_dim], qk_norm),
            (name("attn_k_norm"), vec![cfg.head_dim], qk_norm),
            (name("attn_output"), vec![q, h], matrix(ATTN_OUT_GAIN, q)),
            (name("ffn_norm"), vec![h], norm),
            (name("ffn_gate_inp"), vec![h, e], router),
            (name("ffn_gate_exps"), vec![h, f, e], matrix(EXPERT_IN_GAIN, h)),
            (name("ffn_up_exps"), vec![h, f, e], matrix(EXPERT_IN_GAIN, h)),
            (name("ffn_down_exps"), vec![f, h, e], matrix(EXPERT_DOWN_GAIN, f)),
        ]);
    }
    list.push(("output_norm.weight".to_owned(), vec![h], norm));
    list.push(("output.weight".to_owned(), vec![h, cfg.vocab], matrix(LM_HEAD_GAIN, h)));

    list.into_iter()
        .map(|(name, dims, init)| TensorRecipe {
            ty: mix.type_for(&name, &dims, cfg.n_layer),
            name,
            dims,
            init,
        })
        .collect()
}
