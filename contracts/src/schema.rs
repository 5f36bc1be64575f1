//! The typed contract (docs/contracts.md): what a contract file says once it has been parsed and validated.
//!
//! Every word that matters is a typed field: statuses, taps, metrics and amendment kinds are enums, the
//! version is semver, thresholds are numbers checked against the metric. docs/contracts.md describes the
//! YAML field by field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use moe_engine::backend::{BackendKind, Policy};

/// The vocabulary size of every Qwen3 model and every synthetic preset (docs/synthetic-models.md): the default range
/// of generated prompt tokens and the bound on explicit ones.
pub const QWEN3_VOCAB: u32 = 151_936;

/// A parity contract: which runs to compare, on which prompts, by which criteria.
#[derive(Debug, Clone, PartialEq)]
pub struct Contract {
    /// The contract id; equals the file stem.
    pub contract: String,
    /// The contract's version; equals the newest amendment's.
    pub version: semver::Version,
    /// Whether the contract is in force.
    pub status: Status,
    /// One line saying what the contract guarantees.
    pub title: String,
    /// The model of record: used where a CUDA device is present.
    pub model: String,
    /// The model used where no CUDA device is present.
    pub smoke_model: String,
    /// The prompt sets, in file order.
    pub prompts: Vec<PromptSet>,
    /// The runs (a backend and a policy each), by id.
    pub runs: BTreeMap<String, RunSpec>,
    /// The criteria, in file order.
    pub criteria: Vec<Criterion>,
    /// How router near-ties are certified, and what a certified tie cascade does to the verdict.
    pub ties: Ties,
    /// Expected failures: reported, not blocking; strict ones fail the gate when they pass.
    pub known_divergences: Vec<KnownDivergence>,
    /// The history of the contract, newest first.
    pub amendments: Vec<Amendment>,
    /// The file the contract was read from.
    pub path: PathBuf,
}

/// Whether a contract is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Being written: runs, but nobody relies on it yet.
    Draft,
    /// In force: its blocking gates block releases.
    Active,
    /// No longer in force: kept for history.
    Retired,
}

/// One forward configuration: a backend and a numerics policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSpec {
    /// Where the forward runs.
    pub backend: BackendKind,
    /// How it orders its arithmetic; `fast` unless the contract says otherwise.
    pub policy: Policy,
}

/// Which model a prompt set is restricted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnlyOn {
    /// Only where the gate does not run the contract's `smoke_model` (so the model of record, or a
    /// model given with `--model`): keeps large sets off the fast default gate.
    Model,
}

/// A set of prompts: listed token by token, written as text, or generated from a seed.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptSet {
    /// One prompt, token by token.
    Explicit {
        /// The prompt id (in trial names).
        id: String,
        /// The token ids.
        tokens: Vec<u32>,
        /// Restricts the prompt to some models; `None` = every model.
        only_on: Option<OnlyOn>,
    },
    /// One prompt as text, tokenised with the tokenizer of the model the gate runs
    /// ([`Contract::tokenize_text`]): the same text may be different ids on models with different
    /// vocabularies.
    Text {
        /// The prompt id (in trial names).
        id: String,
        /// The text, as written.
        text: String,
        /// Its token ids on the model the gate runs; `None` until [`Contract::tokenize_text`] (until then
        /// the prompt expands to no tokens and has no trials).
        tokens: Option<Vec<u32>>,
        /// Restricts the prompt to some models; `None` = every model.
        only_on: Option<OnlyOn>,
    },
    /// `count` prompts with lengths in `min_len..=max_len` and tokens below `vocab`, drawn from `seed`
    /// the same way on every platform; their ids are `{id}_{NN}`.
    Generated {
        /// The set id; prompt ids are `{id}_{NN}`.
        id: String,
        /// How many prompts.
        count: usize,
        /// Shortest prompt length.
        min_len: usize,
        /// Longest prompt length.
        max_len: usize,
        /// The seed of the ChaCha8 stream they are drawn from.
        seed: u64,
        /// Tokens are drawn below this; `None` = [`QWEN3_VOCAB`].
        vocab: Option<u32>,
        /// Restricts the set to some models; `None` = every model.
        only_on: Option<OnlyOn>,
    },
}

impl PromptSet {
    /// The set's id.
    pub fn id(&self) -> &str {
        match self {
            PromptSet::Explicit { id, .. } | PromptSet::Text { id, .. } | PromptSet::Generated { id, .. } => {
                id
            }
        }
    }

    /// The model restriction, if any.
    pub fn only_on(&self) -> Option<OnlyOn> {
        match self {
            PromptSet::Explicit { only_on, .. }
            | PromptSet::Text { only_on, .. }
            | PromptSet::Generated { only_on, .. } => *only_on,
        }
    }
}

/// One prompt, after expansion of the sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The prompt id: the set id for an explicit prompt, `{set}_{NN}` for a generated one.
    pub id: String,
    /// The token ids.
    pub tokens: Vec<u32>,
}

/// One thing the contract guarantees, judged by trials.
#[derive(Debug, Clone, PartialEq)]
pub struct Criterion {
    /// The criterion id (in trial names), e.g. `AC-GPU-MOE-001`.
    pub id: String,
    /// One line saying what it checks.
    pub title: String,
    /// The two run ids compared: `[candidate, baseline]`.
    pub compare: [String; 2],
    /// What is compared.
    pub tap: Tap,
    /// How it is compared.
    pub metric: Metric,
    /// What one trial covers: always `prompt`, optionally `layer` and/or `position`.
    pub per: Vec<Per>,
    /// The bound on the metric (`min` for cosine, `max` for nmse/max_abs/kld/error_ratio, none for the
    /// rest).
    pub threshold: Threshold,
    /// How many trials must pass.
    pub gate: Gate,
    /// topk_set only: a swapped pair of experts is a tie when the reference separates their router
    /// probabilities by less than this.
    pub tie_margin: Option<f64>,
    /// greedy only: the number of greedy decode steps compared.
    pub steps: Option<usize>,
    /// Whether a failed gate fails the build (default true).
    pub blocking: bool,
    /// The run used for tie margins, error ratios and diagnosis: as written, else a run named
    /// `reference`, else the only run with the reference backend (error_ratio requires it written).
    pub reference: Option<String>,
    /// The prompts or prompt sets it applies to; `None` = every prompt.
    pub prompts: Option<Vec<String>>,
    /// Whether the candidate's layers are judged as its own forward computed them (accumulated) or each
    /// on the baseline's input to that layer (isolated).
    pub mode: Mode,
}

impl Criterion {
    /// Whether this criterion runs the prompt or prompt set named `name` (every one without `prompts`).
    pub fn selects(&self, name: &str) -> bool {
        self.prompts.as_ref().is_none_or(|names| names.iter().any(|n| n == name))
    }

    /// Whether one trial is run per `per`.
    pub fn is_per(&self, per: Per) -> bool {
        self.per.contains(&per)
    }

    /// The reference run the metric reads for every trial (error_ratio): the gate records it for the
    /// criterion's prompts up front.
    pub fn metric_reference(&self) -> Option<&str> {
        match self.metric {
            Metric::ErrorRatio => self.reference.as_deref(),
            Metric::Cosine
            | Metric::Nmse
            | Metric::MaxAbs
            | Metric::Kld
            | Metric::Argmax
            | Metric::TopkSet
            | Metric::Bitwise
            | Metric::Greedy => None,
        }
    }

    /// The reference run that certifies a topk_set swap as a tie. It is read only where the two runs
    /// choose different experts, so the gate records it only for the prompts where they do.
    pub fn tie_reference(&self) -> Option<&str> {
        match self.metric {
            Metric::TopkSet => self.tie_margin.and(self.reference.as_deref()),
            Metric::Cosine
            | Metric::Nmse
            | Metric::MaxAbs
            | Metric::Kld
            | Metric::Argmax
            | Metric::Bitwise
            | Metric::Greedy
            | Metric::ErrorRatio => None,
        }
    }

    /// Whether each layer of the candidate is judged on the baseline's input.
    pub fn is_isolated(&self) -> bool {
        self.mode == Mode::Isolated
    }
}

/// How the candidate's layers are fed for a per-layer criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Each run's own forward: layer `l` of the candidate read its own layer `l - 1`, so a difference
    /// anywhere carries on to every later layer (what an end user sees).
    #[default]
    Accumulated,
    /// Layer `l` of the candidate run alone on the baseline's residual stream after layer `l - 1` (layer
    /// 0 on the token embeddings, which both runs share): each layer is judged on its own kernels, with
    /// no accumulation and no cascade. Positions where the router's expert set differs are judged by
    /// the contract's `ties` rule: excluded when the reference certifies a tie, a failure otherwise.
    Isolated,
}

/// What a certified tie cascade does to the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TiePolicy {
    /// The downstream failures of a certified tie are reported as such and block nothing.
    #[default]
    Excuse,
    /// They are reported as such and fail as any other failure.
    Fail,
}

/// The contract's rule for router near-ties (`ties:` in the YAML; every field optional).
///
/// Two runs that first choose different experts at (layer `l`, position `p`) have a *certified tie*
/// when the reference separates exactly the experts involved at (l, p) by less than `margin` (router
/// probabilities) and every compared non-reference run computes layer `l`, fed the reference's input,
/// to within `isolated_nmse` of the reference (positions where the run's own expert choice is itself a
/// tie aside). The accumulated trials of that prompt from layer `l` on (and its logits trials) are then
/// a *tie cascade*, excused or failed as `policy` says.
#[derive(Debug, Clone, PartialEq)]
pub struct Ties {
    /// What a certified tie cascade does to the verdict.
    pub policy: TiePolicy,
    /// The reference probability gap below which a swap of two experts is a tie.
    pub margin: f64,
    /// The isolated nmse (against the reference) above which a layer computes something else.
    pub isolated_nmse: f64,
    /// The run that certifies ties; `None` = the run named `reference`, else the only run on the
    /// reference backend, else a reference backend the gate creates.
    pub reference: Option<String>,
}

impl Ties {
    /// The default margin. f32 rounding moves a router logit by ~1e-5, which moves a probability p by
    /// ~p * 2e-5: at most 2.5e-6 for the top experts of the small presets, ~2e-7 for 128 experts, while
    /// a real routing defect swaps experts whose probabilities differ by 1e-3 or more.
    pub const DEFAULT_MARGIN: f64 = 1e-5;
    /// The default isolated bound. f32 arithmetic through one decoder layer leaves nmse around
    /// 1e-13..1e-11 against f64 (measured on the H200: <= 1.2e-14 for the production shape), while
    /// quantising activations to 8 bits gives 1e-5 to 5e-4: 1e-8 sits between them with 1000x either way.
    pub const DEFAULT_ISOLATED_NMSE: f64 = 1e-8;
}

impl Default for Ties {
    fn default() -> Self {
        Self {
            policy: TiePolicy::default(),
            margin: Self::DEFAULT_MARGIN,
            isolated_nmse: Self::DEFAULT_ISOLATED_NMSE,
            reference: None,
        }
    }
}

/// What a criterion compares (the trace tensors of docs/architecture.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tap {
    /// The residual stream after each decoder layer, `[T, hidden]`.
    Hidden,
    /// Each layer's router logits, `[T, n_expert]`.
    RouterLogits,
    /// Each layer's chosen experts, `[T, k]`.
    RouterExperts,
    /// Each layer's renormalised expert weights, `[T, k]`.
    RouterWeights,
    /// The final logits, `[T, vocab]`.
    Logits,
    /// Sub-layer taps of each layer (`moe_engine::trace::SubLayerTaps`, docs/architecture.md), recorded only
    /// for the runs a criterion reads them from: the attention norm's output, `[T, hidden]`.
    AttnNorm,
    /// Queries after q-norm and RoPE, `[T, n_head * head_dim]`.
    Q,
    /// Keys after k-norm and RoPE, `[T, n_kv_head * head_dim]`.
    K,
    /// Values, `[T, n_kv_head * head_dim]`.
    V,
    /// The attention output before the output projection, `[T, n_head * head_dim]`.
    AttnOut,
    /// The output projection, before the residual add, `[T, hidden]`.
    AttnProj,
    /// The residual stream after attention, `[T, hidden]`.
    AttnResidual,
    /// The FFN norm's output, `[T, hidden]`.
    FfnNorm,
    /// Each routed slot's expert output, `[T, k * hidden]` (`[T, k, hidden]` in trace files).
    ExpertOut,
    /// The weighted sum of the expert outputs, before the residual add, `[T, hidden]`.
    MoeOut,
}

impl Tap {
    /// Whether the tap exists once per decoder layer.
    pub fn is_per_layer(self) -> bool {
        !matches!(self, Tap::Logits)
    }

    /// The engine's sub-layer tap this is, if it is one (recorded only when a criterion reads it).
    pub fn sub_layer(self) -> Option<moe_engine::trace::SubLayerTap> {
        use moe_engine::trace::SubLayerTap as S;
        Some(match self {
            Tap::AttnNorm => S::AttnNorm,
            Tap::Q => S::Q,
            Tap::K => S::K,
            Tap::V => S::V,
            Tap::AttnOut => S::AttnOut,
            Tap::AttnProj => S::AttnProj,
            Tap::AttnResidual => S::AttnResidual,
            Tap::FfnNorm => S::FfnNorm,
            Tap::ExpertOut => S::ExpertOut,
            Tap::MoeOut => S::MoeOut,
            Tap::Hidden | Tap::RouterLogits | Tap::RouterExperts | Tap::RouterWeights | Tap::Logits => {
                return None;
            }
        })
    }

    /// Whether the tap holds floats (all but the expert ids).
    pub fn is_float(self) -> bool {
        !matches!(self, Tap::RouterExperts)
    }

    /// The name used in contracts and trace files.
    pub fn as_str(self) -> &'static str {
        match self {
            Tap::Hidden => "hidden",
            Tap::RouterLogits => "router_logits",
            Tap::RouterExperts => "router_experts",
            Tap::RouterWeights => "router_weights",
            Tap::Logits => "logits",
            Tap::AttnNorm
            | Tap::Q
            | Tap::K
            | Tap::V
            | Tap::AttnOut
            | Tap::AttnProj
            | Tap::AttnResidual
            | Tap::FfnNorm
            | Tap::ExpertOut
            | Tap::MoeOut => self.sub_layer().map_or("", |t| t.as_str()),
        }
    }
}

/// How two taps are compared (crate::metrics defines each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Cosine similarity of the flattened values; bound `min`.
    Cosine,
    /// Squared error normalised by the baseline's energy; bound `max`.
    Nmse,
    /// Largest absolute difference; bound `max`.
    MaxAbs,
    /// KL(baseline || candidate) of the softmax of each position's logits; bound `max`.
    Kld,
    /// The same top token (at the last position, or at each position with `per: position`).
    Argmax,
    /// The same set of chosen experts at every position (ties certified by the reference allowed).
    TopkSet,
    /// Bit-identical f32 values.
    Bitwise,
    /// The same tokens over `steps` greedy decode steps.
    Greedy,
    /// `‖candidate - reference‖ / ‖baseline - reference‖`: how much further from the reference run the
    /// candidate is than the baseline; bound `max`.
    ErrorRatio,
}

impl Metric {
    /// The name used in contracts.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Nmse => "nmse",
            Metric::MaxAbs => "max_abs",
            Metric::Kld => "kld",
            Metric::Argmax => "argmax",
            Metric::TopkSet => "topk_set",
            Metric::Bitwise => "bitwise",
            Metric::Greedy => "greedy",
            Metric::ErrorRatio => "error_ratio",
        }
    }

    /// Which side of the threshold the metric is bounded on, if it takes one.
    pub fn bound(self) -> Option<Bound> {
        match self {
            Metric::Cosine => Some(Bound::Min),
            Metric::Nmse | Metric::MaxAbs | Metric::Kld | Metric::ErrorRatio => Some(Bound::Max),
            Metric::Argmax | Metric::TopkSet | Metric::Bitwise | Metric::Greedy => None,
        }
    }
}

/// Which side a threshold bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Values at or above `min` pass.
    Min,
    /// Values at or below `max` pass.
    Max,
}

/// What one trial covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// One prompt (every trial covers exactly one).
    Prompt,
    /// One decoder layer.
    Layer,
    /// One token position.
    Position,
}

/// The bound on a metric's value.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Threshold {
    /// Values below fail.
    pub min: Option<f64>,
    /// Values above fail.
    pub max: Option<f64>,
}

impl Threshold {
    /// Whether `value` is within the bound (NaN never is).
    pub fn admits(&self, value: f64) -> bool {
        !value.is_nan() && self.min.is_none_or(|min| value >= min) && self.max.is_none_or(|max| value <= max)
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.min, self.max) {
            (Some(min), Some(max)) => write!(f, "{} <= value <= {}", Plain(min), Plain(max)),
            (Some(min), None) => write!(f, "min {min}"),
            (None, Some(max)) => write!(f, "max {}", Plain(max)),
            (None, None) => f.write_str("none"),
        }
    }
}

/// A bound as written in contracts: `1.5`, `0.01`, but `1e-5` and `1e6`.
struct Plain(f64);

impl fmt::Display for Plain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 == 0.0 || (1e-3..1e4).contains(&self.0.abs()) {
            true => write!(f, "{}", self.0),
            false => write!(f, "{:e}", self.0),
        }
    }
}

/// How many of a criterion's trials must pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gate {
    /// Every trial.
    All,
    /// At least `n` out of every `of` (`"N/M"`): the pass ratio must reach `n / of`.
    AtLeast { n: usize, of: usize },
    /// At least this fraction of the trials, in (0, 1].
    Fraction(f64),
}

impl Gate {
    /// Whether `passed` of `total` trials satisfy the gate (no trials: it holds).
    pub fn holds(&self, passed: usize, total: usize) -> bool {
        match *self {
            Gate::All => passed == total,
            // Integer cross-multiplication: exact, no rounding at the boundary.
            Gate::AtLeast { n, of } => (passed as u128) * (of as u128) >= (n as u128) * (total as u128),
            // The product is rounded once; GATE_FRACTION_SLACK keeps e.g. 0.95 * 20 at 19.
            Gate::Fraction(f) => passed as f64 >= f * total as f64 - GATE_FRACTION_SLACK,
        }
    }
}

/// Absorbs the rounding of `fraction * total` (at most a few ulps of a number below 2^53) so a
/// fraction that is exactly met in decimal is met in binary too.
const GATE_FRACTION_SLACK: f64 = 1e-9;

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gate::All => f.write_str("all"),
            Gate::AtLeast { n, of } => write!(f, "{n}/{of}"),
            Gate::Fraction(x) => write!(f, "{x}"),
        }
    }
}

/// An expected failure recorded in the contract.
#[derive(Debug, Clone, PartialEq)]
pub struct KnownDivergence {
    /// The criterion whose trials diverge.
    pub criterion: String,
    /// Restricts it to one prompt (or every prompt of one set); `None` = every prompt.
    pub prompt: Option<String>,
    /// Restricts it to some layers (`where: {layer: L}` or `where: {layers: {from: A, to: B}}`);
    /// `None` = every layer.
    pub layers: Option<LayerSpan>,
    /// What is known about it: `benign`, `not_benign` or `investigating` (see [`DIVERGENCE_STATUSES`]).
    pub status: String,
    /// When true, the gate fails if a matching trial passes (the divergence went away unnoticed).
    pub strict: bool,
    /// Why it diverges, where it is tracked.
    pub note: String,
}

/// The layers a known divergence covers: `from` to `to`, both included; `to: None` means `from` and
/// every later layer (a divergence that starts at a router tie and is carried by the residual stream to
/// the last layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpan {
    /// The first layer covered.
    pub from: usize,
    /// The last layer covered; `None` = up to the last layer of the model.
    pub to: Option<usize>,
}

impl LayerSpan {
    /// Exactly layer `l`.
    pub fn one(l: usize) -> Self {
        LayerSpan { from: l, to: Some(l) }
    }

    /// Whether layer `l` is covered.
    pub fn contains(&self, l: usize) -> bool {
        l >= self.from && self.to.is_none_or(|to| l <= to)
    }
}

impl fmt::Display for LayerSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to {
            Some(to) if to == self.from => write!(f, "layer {to}"),
            Some(to) => write!(f, "layers {}-{to}", self.from),
            None => write!(f, "layers {} and later", self.from),
        }
    }
}

/// The statuses a known divergence may have.
pub const DIVERGENCE_STATUSES: [&str; 3] = ["benign", "not_benign", "investigating"];

/// One entry of a contract's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Amendment {
    /// The version it produced.
    pub version: semver::Version,
    /// When, as `YYYY-MM-DD`.
    pub date: String,
    /// What kind of change it was.
    pub kind: AmendmentKind,
    /// What changed and why.
    pub summary: String,
}

/// What kind of change an amendment made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmendmentKind {
    /// The first version (exactly one, the oldest).
    Created,
    /// A bound made stricter or a criterion added: the contract rejects more.
    Tightened,
    /// A bound relaxed or a criterion removed: the contract accepts more (needs a major version).
    Loosened,
    /// Prompts or runs added.
    Extended,
    /// Wording, comments or ids changed; the verdicts stay the same.
    Clarified,
    /// The status changed (draft, active, retired).
    Status,
    /// Known divergences recorded or retired: only the trials they name change verdict (a minor version;
    /// each entry carries its own evidence in `note`).
    Divergence,
}

impl AmendmentKind {
    /// Whether the amendment lets through something the previous version rejected.
    pub fn is_loosening(self) -> bool {
        matches!(self, AmendmentKind::Loosened)
    }
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Tap, Metric);

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Accumulated => "accumulated",
            Mode::Isolated => "isolated",
        })
    }
}

impl fmt::Display for TiePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TiePolicy::Excuse => "excuse",
            TiePolicy::Fail => "fail",
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Draft => "draft",
            Status::Active => "active",
            Status::Retired => "retired",
        })
    }
}

impl fmt::Display for Per {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Per::Prompt => "prompt",
            Per::Layer => "layer",
            Per::Position => "position",
        })
    }
}
