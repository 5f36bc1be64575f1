//! Errors of the engine's forwards: what is wrong with a request, a model or a device, and what to do.

use crate::backend::{BackendKind, Policy};
use crate::weights::ModelError;

/// Everything a forward can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    // --- the model ---
    /// The model's file or tensors are not usable (see [`ModelError`]).
    #[error(transparent)]
    Model(#[from] ModelError),

    // --- the request ---
    /// A forward was asked for no tokens.
    #[error("the prompt is empty: pass at least one token id")]
    EmptyPrompt,
    /// A token id is not in the model's vocabulary.
    #[error(
        "token id {token} at position {position} is out of range: the vocabulary has {vocab} tokens \
         (ids 0..{vocab})"
    )]
    TokenOutOfRange { token: u32, position: usize, vocab: usize },
    /// The KV cache cannot take the requested tokens.
    #[error(
        "context full: {cached} cached + {requested} new tokens exceed the context length of \
         {context_length}; start a new forward with a shorter prompt"
    )]
    ContextFull { context_length: usize, cached: usize, requested: usize },
    /// `step_many` was given a token count other than the number of sequences the forward holds.
    #[error(
        "step_many got {tokens} tokens but the forward holds {held} sequences: pass one token per \
         sequence of the last forward_many, in order (a backend whose max_sequences() is 1 holds one)"
    )]
    SequenceCount { tokens: usize, held: usize },
    /// `add_sequences` on a backend that holds one sequence (its `max_sequences()` is 1).
    #[error(
        "the {backend} backend holds one sequence, so it cannot add sequences beside the one it holds: \
         forward each prompt alone (check max_sequences() before add_sequences)"
    )]
    CannotAddSequences { backend: String },
    /// `forward_many` was given a trace count other than its sequence count.
    #[error(
        "forward_many got {traces} traces for {sequences} sequences: pass one trace per sequence, or none"
    )]
    TraceCount { traces: usize, sequences: usize },
    /// `run_layer` was asked for a layer the model does not have.
    #[error("layer {layer} does not exist: the model has {n_layer} layers (0..{n_layer})")]
    LayerOutOfRange { layer: usize, n_layer: usize },
    /// `run_layer` was given an input of the wrong shape.
    #[error(
        "layer input has shape [{rows}, {cols}]: expected [T, {hidden}] with T >= 1 (one row per position)"
    )]
    InputShape { rows: usize, cols: usize, hidden: usize },
    /// The backend does not record sub-layer taps or decode-step traces.
    #[error(
        "the {backend} backend does not implement {what}: sub-layer taps are recorded by the reference, \
         cpu and cuda backends; diagnose with one of those"
    )]
    TapsUnsupported { backend: BackendKind, what: &'static str },
    /// A backend name that does not exist.
    #[error("unknown backend `{name}`: expected one of reference, cpu, cuda")]
    UnknownBackend { name: String },
    /// A policy name that does not exist.
    #[error("unknown policy `{name}`: expected one of fast, exact")]
    UnknownPolicy { name: String },
    /// The backend does not implement the requested policy.
    #[error("the {backend} backend does not support the `{policy}` policy: {reason}")]
    PolicyUnsupported { backend: BackendKind, policy: Policy, reason: String },

    /// A seeded defect was asked of a backend it is not built for (only `cargo moe-gate selftest` asks).
    #[error(
        "the seeded defect `{defect}` does not apply to the {backend} backend under `{policy}`: see its \
         catalogue entry (moe_engine::defect) for the backends and policies it applies to"
    )]
    DefectNotApplicable { defect: &'static str, backend: BackendKind, policy: Policy },
    /// A seeded defect name that is not in the catalogue.
    #[error("unknown seeded defect `{name}`: expected one of {known}")]
    UnknownDefect { name: String, known: String },

    // --- CUDA ---
    /// No usable CUDA device or driver (or the build lacks the `cuda` feature).
    #[error("CUDA is unavailable: {reason}")]
    CudaUnavailable { reason: String },
    /// A CUDA call failed; `stage` says which step of the forward (kernel compile, upload, launch, ...).
    #[error("CUDA failed while {stage}: {message}")]
    Cuda { stage: String, message: String },
}
