//! The catalogue of seeded defects (issue 10 item 4; docs/gate.md, "What the gate catches"): deliberate
//! mistakes a `cpu` or `cuda` backend can be built with, so that `cargo moe-gate selftest` can show which of
//! them the gate catches, and where it points.
//!
//! A defect is reachable only through [`crate::backend::BackendOptions::defect`]: [`crate::backend::create_backend`]
//! (every normal path: the gate, `trace`, `bench`, the tests) builds with none, no contract field, environment
//! variable or gate flag names one, and the `reference` backend refuses one. Each defect is an extra or
//! altered step of a backend's forward orchestration (or, for the CUDA kernels, a kernel only the defect
//! launches or a compile variant only the defect asks for); the production kernels are unchanged.
//!
//! Each entry says what it expects of the gate: a **harmful** defect must fail a blocking criterion of the
//! kinds listed, and the diagnosis must blame the defect's backend at the first layer (and decode step) the
//! defect touches and name the op ([`Op`]) it lives in; a **benign** change (another summation order, FMA,
//! another reduction tree: rounding only) must pass.

use std::fmt;
use std::str::FromStr;

use crate::backend::{BackendKind, Policy};
use crate::error::EngineError;

/// One seeded defect or benign change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Defect {
    /// The expert FFN's input rounded to a symmetric 8-bit grid in blocks of 32 (ggml's Q8_0 shape).
    Q8Block32ExpertInput,
    /// The expert FFN's input rounded to a symmetric 8-bit grid in blocks of 256 (ggml's Q8_K shape).
    Q8Block256ExpertInput,
    /// The attention output projection's input rounded to f16.
    F16OutputProjectionInput,
    /// The router's matrix-vector product accumulated in bf16 (each partial sum rounded to bf16).
    Bf16RouterAccumulation,
    /// Decode steps rotate q and k by position + 1 (the prefill is right).
    RopeDecodePositionPlusOne,
    /// RoPE with base 10 000 instead of the model's `rope_theta`.
    RopeWrongBase,
    /// Decode steps leave the new position's KV-cache row of one layer stale (it holds the previous row).
    KvStaleRow,
    /// One layer's top-k takes the (k+1)-th ranked expert (the 9th of a top-8) instead of the k-th.
    TopkNinthExpert,
    /// The router's top-k weights are not renormalised to sum to one.
    RouterWeightsNotRenormalised,
    /// The last layer computes expert 0 with expert 1's weights and expert 1 with expert 0's.
    ExpertIdsSwappedLastLayer,
    /// Attention scores scaled by `1 / head_dim` instead of `head_dim^-0.5`.
    AttentionScaleInvHeadDim,
    /// The attention softmax without the maximum subtracted before `exp`.
    SoftmaxNoMaxSubtraction,
    /// The per-head RMSNorm of q and k skipped (RoPE still applied).
    QkNormSkipped,
    /// One layer's attention residual dropped: `x = attn(x)` instead of `x + attn(x)`.
    AttnResidualDropped,
    /// Benign: each token's expert outputs summed in increasing expert index instead of choice order.
    MoeSumByExpertIndex,
    /// Benign: each term of the MoE combine one fused multiply-add (the product not rounded on its own).
    FmaMoeCombine,
    /// Benign: the attention projections (q, k, v, o) summed by a pairwise tree instead of 16 lanes.
    PairwiseAttentionProjections,
    /// Benign (cuda fast): the fast kernels compiled with `--fmad=false` (no FMA contraction).
    CudaNoFmaContraction,
    /// Benign (cuda fast): RMSNorm by the exact kernels' reduction tree (16-lane halving) in the fast path.
    CudaExactNormTree,
    /// Benign (cuda fast): attention by the exact kernel's order (all scores, then sequential sums)
    /// instead of the online softmax.
    CudaExactAttentionOrder,
}

/// The layer a defect acts in, or from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefectLayer {
    /// Every layer from the first: the diagnosis must name layer 0.
    Every,
    /// Only this layer.
    Only(usize),
    /// Only the model's last layer.
    Last,
}

impl DefectLayer {
    /// Whether the defect acts in layer `l` of a model of `n_layer` layers.
    pub fn covers(self, l: usize, n_layer: usize) -> bool {
        match self {
            DefectLayer::Every => true,
            DefectLayer::Only(only) => l == only.min(n_layer.saturating_sub(1)),
            DefectLayer::Last => l + 1 == n_layer,
        }
    }

    /// The first layer it acts in, in a model of `n_layer` layers.
    pub fn first(self, n_layer: usize) -> usize {
        match self {
            DefectLayer::Every => 0,
            DefectLayer::Only(only) => only.min(n_layer.saturating_sub(1)),
            DefectLayer::Last => n_layer.saturating_sub(1),
        }
    }
}

/// The ops of a decoder layer (and the model's head) a diagnosis names, in forward order: the agreed
/// vocabulary of the op-level bisection (issue 10 item 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    AttnNorm,
    QkvProj,
    QkNormRope,
    Attention,
    OProj,
    AttnResidual,
    FfnNorm,
    Router,
    Topk,
    Experts,
    MoeCombine,
    FfnResidual,
    OutputNorm,
    LmHead,
    KvCache,
}

impl Op {
    /// The name a diagnosis carries (`op` in report.json).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::AttnNorm => "attn_norm",
            Op::QkvProj => "qkv_proj",
            Op::QkNormRope => "qk_norm_rope",
            Op::Attention => "attention",
            Op::OProj => "o_proj",
            Op::AttnResidual => "attn_residual",
            Op::FfnNorm => "ffn_norm",
            Op::Router => "router",
            Op::Topk => "topk",
            Op::Experts => "experts",
            Op::MoeCombine => "moe_combine",
            Op::FfnResidual => "ffn_residual",
            Op::OutputNorm => "output_norm",
            Op::LmHead => "lm_head",
            Op::KvCache => "kv_cache",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the gate must make of a defect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expected {
    /// A real defect: the gate must fail and the diagnosis must point at it.
    Harmful(Harm),
    /// Rounding only (or harmless at the model's scale, `why` says): every blocking gate must hold.
    Benign { why: &'static str },
}

/// Where a harmful defect must be found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Harm {
    /// Taps of which a blocking criterion must fail (each of them): `hidden`, `router_experts`, `logits`...
    pub caught_by: &'static [&'static str],
    /// The first layer the diagnosis must name.
    pub layer: DefectLayer,
    /// The op the diagnosis must name.
    pub op: Op,
    /// The decode step the diagnosis must name (1 = the first `Forward::step` after the prefill), for a
    /// defect of the decode path only.
    pub step: Option<usize>,
}

/// The catalogue entry of a defect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DefectInfo {
    /// Its name on the command line (`selftest --defect NAME`) and in reports.
    pub name: &'static str,
    /// What it changes, in one line.
    pub description: &'static str,
    /// The backends it can be built into.
    pub backends: &'static [BackendKind],
    /// The CUDA policies it applies to (the `cpu` backend has one arithmetic for both).
    pub cuda_policies: &'static [Policy],
    /// Where it acts.
    pub layer: DefectLayer,
    /// What the gate must make of it.
    pub expected: Expected,
}

/// Base of the wrong RoPE (Llama's; Qwen3 uses 1e6 or 1e7).
pub const WRONG_ROPE_THETA: f64 = 10_000.0;
/// The layer of the one-layer defects (not 0, so the diagnosis must localise past the first layer).
pub const ONE_LAYER: usize = 1;
/// The two experts whose ids [`Defect::ExpertIdsSwappedLastLayer`] swaps.
pub const SWAPPED_EXPERTS: (usize, usize) = (0, 1);

const CPU: &[BackendKind] = &[BackendKind::Cpu];
const CUDA: &[BackendKind] = &[BackendKind::Cuda];
const BOTH: &[BackendKind] = &[BackendKind::Cpu, BackendKind::Cuda];
const ALL_POLICIES: &[Policy] = &[Policy::Fast, Policy::Exact];
const FAST: &[Policy] = &[Policy::Fast];
const NO_POLICY: &[Policy] = &[];

const PREFILL: &[&str] = &["hidden"];
const ROUTING: &[&str] = &["hidden", "router_experts"];
const DECODE: &[&str] = &["logits"];

const fn harm(caught_by: &'static [&'static str], layer: DefectLayer, op: Op) -> Expected {
    Expected::Harmful(Harm { caught_by, layer, op, step: None })
}

const fn decode_harm(layer: DefectLayer, op: Op) -> Expected {
    Expected::Harmful(Harm { caught_by: DECODE, layer, op, step: Some(1) })
}

impl Defect {
    /// Every entry, harmful first, in catalogue order.
    pub const ALL: [Defect; 20] = [
        Defect::Q8Block32ExpertInput,
        Defect::Q8Block256ExpertInput,
        Defect::F16OutputProjectionInput,
        Defect::Bf16RouterAccumulation,
        Defect::RopeDecodePositionPlusOne,
        Defect::RopeWrongBase,
        Defect::KvStaleRow,
        Defect::TopkNinthExpert,
        Defect::RouterWeightsNotRenormalised,
        Defect::ExpertIdsSwappedLastLayer,
        Defect::AttentionScaleInvHeadDim,
        Defect::QkNormSkipped,
        Defect::AttnResidualDropped,
        Defect::SoftmaxNoMaxSubtraction,
        Defect::MoeSumByExpertIndex,
        Defect::FmaMoeCombine,
        Defect::PairwiseAttentionProjections,
        Defect::CudaNoFmaContraction,
        Defect::CudaExactNormTree,
        Defect::CudaExactAttentionOrder,
    ];

    /// Its catalogue entry.
    pub fn info(self) -> DefectInfo {
        use DefectLayer::{Every, Last, Only};
        let entry = |name, description, backends, cuda_policies, layer, expected| DefectInfo {
            name,
            description,
            backends,
            cuda_policies,
            layer,
            expected,
        };
        match self {
            Defect::Q8Block32ExpertInput => entry(
                "q8-32-expert-input",
                "the expert FFN input rounded to an 8-bit grid, blocks of 32 (Q8_0)",
                BOTH,
                ALL_POLICIES,
                Every,
                harm(PREFILL, Every, Op::Experts),
            ),
            Defect::Q8Block256ExpertInput => entry(
                "q8-256-expert-input",
                "the expert FFN input rounded to an 8-bit grid, blocks of 256 (Q8_K)",
                BOTH,
                ALL_POLICIES,
                Every,
                harm(PREFILL, Every, Op::Experts),
            ),
            Defect::F16OutputProjectionInput => entry(
                "f16-o-proj-input",
                "the attention output projection's input rounded to f16",
                BOTH,
                ALL_POLICIES,
                Every,
                harm(PREFILL, Every, Op::OProj),
            ),
            Defect::Bf16RouterAccumulation => entry(
                "bf16-router-accumulation",
                "the router matvec accumulated in bf16 (each partial sum rounded)",
                BOTH,
                ALL_POLICIES,
                Every,
                harm(ROUTING, Every, Op::Router),
            ),
            Defect::RopeDecodePositionPlusOne => entry(
                "rope-decode-position-plus-one",
                "decode steps rotate q and k by position + 1",
                BOTH,
                ALL_POLICIES,
                Every,
                decode_harm(Every, Op::QkNormRope),
            ),
            Defect::RopeWrongBase => entry(
                "rope-wrong-base",
                "RoPE base 10000 instead of the model's rope_theta",
                BOTH,
                ALL_POLICIES,
                Every,
                harm(PREFILL, Every, Op::QkNormRope),
            ),
            Defect::KvStaleRow => entry(
                "kv-stale-row",
                "decode steps leave layer 1's new KV-cache row stale (the previous row's values)",
                BOTH,
                ALL_POLICIES,
                Only(ONE_LAYER),
                decode_harm(Only(ONE_LAYER), Op::KvCache),
            ),
            Defect::TopkNinthExpert => entry(
                "topk-ninth-expert",
                "layer 1's top-k takes the (k+1)-th expert (the 9th of 8) instead of the k-th",
                BOTH,
                ALL_POLICIES,
                Only(ONE_LAYER),
                harm(ROUTING, Only(ONE_LAYER), Op::Topk),
            ),
            Defect::RouterWeightsNotRenormalised => entry(
                "router-weights-not-renormalised",
                "the top-k router weights are not renormalised to sum to 1",
                BOTH,
                ALL_POLICIES,
                Every,
                harm(PREFILL, Every, Op::Topk),
            ),
            Defect::ExpertIdsSwappedLastLayer => entry(
                "expert-ids-swapped-last-layer",
                "the last layer runs expert 0 with expert 1's weights and 1 with 0's",
                BOTH,
                ALL_POLICIES,
                Last,
                harm(PREFILL, Last, Op::Experts),
            ),
            Defect::AttentionScaleInvHeadDim => entry(
                "attention-scale-inv-head-dim",
                "attention scores scaled by 1/head_dim instead of 1/sqrt(head_dim)",
                BOTH,
                ALL_POLICIES,
                Every,
                harm(PREFILL, Every, Op::Attention),
            ),
            Defect::QkNormSkipped => entry(
                "qk-norm-skipped",
                "the per-head RMSNorm of q and k skipped",
                BOTH,
                FAST,
                Every,
                harm(PREFILL, Every, Op::QkNormRope),
            ),
            Defect::AttnResidualDropped => entry(
                "attn-residual-dropped",
                "layer 1's attention residual add dropped: x = attn(x)",
                BOTH,
                ALL_POLICIES,
                Only(ONE_LAYER),
                harm(PREFILL, Only(ONE_LAYER), Op::AttnResidual),
            ),
            Defect::SoftmaxNoMaxSubtraction => entry(
                "softmax-no-max-subtraction",
                "the attention softmax without the max subtracted before exp",
                BOTH,
                FAST,
                Every,
                Expected::Benign {
                    why: "exp(s)/sum exp(s) equals exp(s-m)/sum exp(s-m) exactly in real arithmetic; in f32 it \
                          differs by rounding only until a score exceeds ~88 and exp overflows to inf. \
                          Attention scores here are O(1-10), so the gate must (and cannot) see it",
                },
            ),
            Defect::MoeSumByExpertIndex => entry(
                "moe-sum-by-expert-index",
                "experts summed in increasing expert index, not choice order",
                CPU,
                NO_POLICY,
                Every,
                Expected::Benign { why: "another summation order: f32 rounding only" },
            ),
            Defect::FmaMoeCombine => entry(
                "fma-moe-combine",
                "each MoE combine term one fused multiply-add",
                CPU,
                NO_POLICY,
                Every,
                Expected::Benign { why: "FMA skips one rounding per term: f32 rounding only" },
            ),
            Defect::PairwiseAttentionProjections => entry(
                "pairwise-attention-projections",
                "q, k, v, o projections summed by a pairwise tree",
                CPU,
                NO_POLICY,
                Every,
                Expected::Benign { why: "another reduction tree: f32 rounding only" },
            ),
            Defect::CudaNoFmaContraction => entry(
                "cuda-fmad-off",
                "the fast kernels compiled with --fmad=false",
                CUDA,
                FAST,
                Every,
                Expected::Benign { why: "FMA contraction off: f32 rounding only" },
            ),
            Defect::CudaExactNormTree => entry(
                "cuda-exact-norm-tree",
                "RMSNorm by the exact kernel's 16-lane halving tree in the fast path",
                CUDA,
                FAST,
                Every,
                Expected::Benign { why: "another reduction tree: f32 rounding only" },
            ),
            Defect::CudaExactAttentionOrder => entry(
                "cuda-exact-attention-order",
                "attention by the exact kernel's order instead of the online softmax",
                CUDA,
                FAST,
                Every,
                Expected::Benign { why: "another summation order: f32 rounding only" },
            ),
        }
    }

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Whether it can be built into a `kind` backend under `policy` (the `cpu` backend ignores the policy).
    pub fn applies_to(self, kind: BackendKind, policy: Policy) -> bool {
        let info = self.info();
        info.backends.contains(&kind) && (kind != BackendKind::Cuda || info.cuda_policies.contains(&policy))
    }

    /// Whether it acts in layer `l` of a model of `n_layer` layers.
    pub fn in_layer(self, l: usize, n_layer: usize) -> bool {
        self.info().layer.covers(l, n_layer)
    }

    /// Every entry that applies to backend `kind` (under some policy).
    pub fn for_backend(kind: BackendKind) -> impl Iterator<Item = Defect> {
        Self::ALL.into_iter().filter(move |d| d.info().backends.contains(&kind))
    }

    /// `Err` unless it can be built into a `kind` backend under `policy`: what to do instead.
    pub fn check_applies(self, kind: BackendKind, policy: Policy) -> Result<(), EngineError> {
        if self.applies_to(kind, policy) {
            return Ok(());
        }
        Err(EngineError::DefectNotApplicable { defect: self.name(), backend: kind, policy })
    }
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Defect {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|d| d.name() == s).ok_or_else(|| EngineError::UnknownDefect {
            name: s.to_string(),
            known: Self::ALL.iter().map(|d| d.name()).collect::<Vec<_>>().join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for d in Defect::ALL {
            assert_eq!(d.name().parse::<Defect>().unwrap(), d);
        }
        let mut names: Vec<&str> = Defect::ALL.iter().map(|d| d.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Defect::ALL.len());
        let e = "nope".parse::<Defect>().unwrap_err().to_string();
        assert!(e.contains("`nope`") && e.contains("q8-32-expert-input"), "{e}");
    }

    #[test]
    fn the_catalogue_covers_what_issue_10_asks() {
        let harmful = |kind| {
            Defect::for_backend(kind).filter(|d| matches!(d.info().expected, Expected::Harmful(_))).count()
        };
        let benign = |kind| {
            Defect::for_backend(kind).filter(|d| matches!(d.info().expected, Expected::Benign { .. })).count()
        };
        for kind in [BackendKind::Cpu, BackendKind::Cuda] {
            assert!(harmful(kind) >= 12, "{kind}: {} harmful", harmful(kind));
            assert!(benign(kind) >= 3, "{kind}: {} benign", benign(kind));
        }
        assert_eq!(Defect::for_backend(BackendKind::Reference).count(), 0, "the reference takes none");
    }

    #[test]
    fn layers_resolve_on_a_model() {
        assert_eq!(DefectLayer::Last.first(4), 3);
        assert!(DefectLayer::Last.covers(3, 4) && !DefectLayer::Last.covers(2, 4));
        assert_eq!(DefectLayer::Only(1).first(4), 1);
        assert_eq!(DefectLayer::Only(1).first(1), 0, "a one-layer model has only layer 0");
        assert!(DefectLayer::Every.covers(2, 4));
    }
}
