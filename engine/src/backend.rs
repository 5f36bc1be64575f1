//! The backends a forward runs on (docs/numerics.md), the numerics policies, and the [`Forward`] interface every
//! backend implements.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::defect::Defect;
use crate::error::EngineError;
use crate::forward;
use crate::trace::{LayerTrace, Matrix, SubLayerTaps, Trace};
use crate::weights::ModelWeights;

/// Where a forward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Every value f64, weights dequantised exactly, plain loops: the truth a divergence is measured against.
    Reference,
    /// f32 on the CPU, rayon across rows, experts and tokens.
    Cpu,
    /// f32 on a CUDA device (feature `cuda`).
    Cuda,
}

impl BackendKind {
    /// Every backend, in the order they are documented.
    pub const ALL: [BackendKind; 3] = [BackendKind::Reference, BackendKind::Cpu, BackendKind::Cuda];

    /// The name used on the command line and in trace files.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Reference => "reference",
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| EngineError::UnknownBackend { name: s.to_string() })
    }
}

/// How a backend orders its arithmetic (docs/numerics.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// Each backend's fastest way (the default).
    #[default]
    Fast,
    /// One canonical operation order per kernel family, so `cpu` and `cuda` agree bit for bit.
    Exact,
}

impl Policy {
    /// Both policies.
    pub const ALL: [Policy; 2] = [Policy::Fast, Policy::Exact];

    /// The name used on the command line and in trace files.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Fast => "fast",
            Policy::Exact => "exact",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| EngineError::UnknownPolicy { name: s.to_string() })
    }
}

/// A Qwen3-MoE forward with a KV cache, on one backend.
pub trait Forward: Send {
    /// The backend it runs on.
    fn kind(&self) -> BackendKind;

    /// The policy it was created with.
    fn policy(&self) -> Policy;

    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// Clears the KV cache and runs `tokens` from position 0 as one batch (prefill). Returns the logits of
    /// the last position.
    ///
    /// When `trace` is `Some`, fills its `tokens`, `layers` (hidden state and router logits, experts and
    /// weights of every layer) and `logits` at every position, and sets its `backend`, `policy` and
    /// `precision` to this forward's; the caller's `model` is kept. When the trace asks for sub-layer taps
    /// (`Trace::with_sub_layer_taps`), its `sub_layers` too, with the values of a forward without them. When `None`, nothing is recorded and
    /// only the last position's logits are computed.
    fn forward(&mut self, tokens: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>, EngineError>;

    /// Appends one token after the cached ones and returns its logits (the same values a full forward of
    /// the whole sequence gives at that position).
    fn step(&mut self, token: u32) -> Result<Vec<f32>, EngineError>;

    /// Clears the KV cache and runs each of `seqs` from position 0, as [`Forward::forward`] runs one
    /// sequence, keeping one KV cache per sequence for [`Forward::step_many`]. Returns each sequence's
    /// last-position logits; with `traces` (one per sequence, in order) fills them as `forward` does.
    ///
    /// Every value is the one `forward` gives for that sequence alone. A backend that batches overrides
    /// this (`cpu`: all sequences' tokens through every weight row together). The default runs `forward`
    /// on each sequence in turn, so afterwards its cache holds the last sequence only, and
    /// [`Forward::max_sequences`] is 1.
    fn forward_many(
        &mut self,
        seqs: &[&[u32]],
        mut traces: Option<&mut [Trace]>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        if let Some(traces) = &traces
            && traces.len() != seqs.len()
        {
            return Err(EngineError::TraceCount { traces: traces.len(), sequences: seqs.len() });
        }
        let mut last = Vec::with_capacity(seqs.len());
        for (s, tokens) in seqs.iter().enumerate() {
            last.push(self.forward(tokens, traces.as_deref_mut().map(|t| &mut t[s]))?);
        }
        Ok(last)
    }

    /// Runs each of `seqs` from position 0 as new sequences held after those already held (whose caches
    /// are kept), so that one [`Forward::step_many`] decodes them all together: prompts can be forwarded
    /// in batches of bounded size and still decode as one batch. Returns each new sequence's last-position
    /// logits; with `traces` (one per new sequence) fills them as `forward` does. Every value is the one
    /// `forward` gives for that sequence alone.
    ///
    /// The default (a backend that holds one sequence, [`Forward::max_sequences`] 1) refuses: it cannot
    /// keep a sequence beside the one it holds.
    fn add_sequences(
        &mut self,
        _seqs: &[&[u32]],
        _traces: Option<&mut [Trace]>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        Err(EngineError::CannotAddSequences { backend: self.kind().to_string() })
    }

    /// Appends `tokens[s]` to sequence `s` of the last [`Forward::forward_many`] and the
    /// [`Forward::add_sequences`] after it, in order (or the one sequence of the last `forward`), for every
    /// held sequence, and returns each one's logits: the values
    /// [`Forward::step`] gives for that sequence alone. The default holds one sequence and steps it.
    fn step_many(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        match tokens {
            [token] => Ok(vec![self.step(*token)?]),
            _ => Err(EngineError::SequenceCount { tokens: tokens.len(), held: 1 }),
        }
    }

    /// How many sequences one [`Forward::forward_many`] may hold for [`Forward::step_many`] to decode them
    /// together: 1 for a backend that keeps one KV cache (the default).
    fn max_sequences(&self) -> usize {
        1
    }

    /// Diagnosis: runs decoder layer `layer` alone on the residual stream `input` (`[T, hidden]`, positions
    /// `0..T`, causal attention among them, the KV cache neither read nor changed), returning the layer's
    /// taps as a forward records them: the output residual `[T, hidden]` and the router's logits, experts
    /// and weights. Layer-isolated criteria and the diagnosis judge a layer's own kernels with it.
    fn run_layer(&mut self, layer: usize, input: &Matrix) -> Result<LayerTrace, EngineError>;

    /// Diagnosis: [`Forward::run_layer`] with the layer's [`SubLayerTaps`] too (the op-level bisection
    /// compares them between backends). The layer's values are those of `run_layer`. A backend that
    /// cannot record them (the default) says so.
    fn run_layer_tapped(
        &mut self,
        layer: usize,
        input: &Matrix,
    ) -> Result<(LayerTrace, SubLayerTaps), EngineError> {
        let _ = (layer, input);
        Err(EngineError::TapsUnsupported { backend: self.kind(), what: "run_layer_tapped" })
    }

    /// Diagnosis: [`Forward::step`] with a trace of the one new position (its `tokens` is `[token]`, every
    /// layer's taps and the logits one row), and, when the trace asks for sub-layer taps, the KV-cache rows
    /// each layer's attention read ([`SubLayerTaps::cache_keys`]). The logits are those of `step`; a
    /// backend that replays a captured decode step runs it uncaptured here. A backend that cannot record a
    /// step (the default) says so.
    fn step_traced(&mut self, token: u32, trace: &mut Trace) -> Result<Vec<f32>, EngineError> {
        let _ = (token, trace);
        Err(EngineError::TapsUnsupported { backend: self.kind(), what: "step_traced" })
    }

    /// The seeded defect it was built with ([`BackendOptions::defect`]); `None` for every backend a normal
    /// run creates.
    fn defect(&self) -> Option<Defect> {
        None
    }
}

/// How a backend is built: its numerics policy and, for `cargo moe-gate selftest` only, a seeded defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendOptions {
    pub policy: Policy,
    /// A deliberate mistake from the catalogue (`moe_engine::defect`). Only the selftest sets it; every
    /// other path goes through [`create_backend`], which leaves it `None`.
    pub defect: Option<Defect>,
}

/// Creates a forward of `weights` on backend `kind` with numerics `policy`.
///
/// `reference` ignores the policy (it has one way to compute); `cpu` supports `fast` only for now;
/// `cuda` needs the `cuda` feature and a device.
pub fn create_backend(
    kind: BackendKind,
    weights: Arc<ModelWeights>,
    policy: Policy,
) -> Result<Box<dyn Forward>, EngineError> {
    create_backend_with(kind, weights, BackendOptions { policy, defect: None })
}

/// [`create_backend`] with every option: `cargo moe-gate selftest` builds its defective backends here. A
/// defect the catalogue does not list for `kind` and the policy (the `reference` backend takes none) is
/// refused.
pub fn create_backend_with(
    kind: BackendKind,
    weights: Arc<ModelWeights>,
    options: BackendOptions,
) -> Result<Box<dyn Forward>, EngineError> {
    let BackendOptions { policy, defect } = options;
    if let Some(d) = defect {
        d.check_applies(kind, policy)?;
    }
    match kind {
        BackendKind::Reference => Ok(Box::new(forward::reference::create(
            weights,
            policy,
            forward::reference::WeightDecoding::ExactF64,
        ))),
        BackendKind::Cpu => Ok(Box::new(forward::cpu::create(weights, policy, defect)?)),
        BackendKind::Cuda => create_cuda(weights, policy, defect),
    }
}

#[cfg(feature = "cuda")]
fn create_cuda(
    weights: Arc<ModelWeights>,
    policy: Policy,
    defect: Option<Defect>,
) -> Result<Box<dyn Forward>, EngineError> {
    forward::cuda::create(weights, policy, defect)
}

#[cfg(not(feature = "cuda"))]
fn create_cuda(
    _weights: Arc<ModelWeights>,
    _policy: Policy,
    _defect: Option<Defect>,
) -> Result<Box<dyn Forward>, EngineError> {
    Err(EngineError::CudaUnavailable {
        reason: "built without the `cuda` feature: rebuild with --features cuda".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in BackendKind::ALL {
            assert_eq!(k.to_string().parse::<BackendKind>().unwrap(), k);
        }
        for p in Policy::ALL {
            assert_eq!(p.to_string().parse::<Policy>().unwrap(), p);
        }
        assert_eq!(Policy::default(), Policy::Fast);
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let e = "gpu".parse::<BackendKind>().unwrap_err().to_string();
        assert!(e.contains("`gpu`") && e.contains("reference, cpu, cuda"), "{e}");
        let e = "precise".parse::<Policy>().unwrap_err().to_string();
        assert!(e.contains("`precise`") && e.contains("fast, exact"), "{e}");
    }
}
