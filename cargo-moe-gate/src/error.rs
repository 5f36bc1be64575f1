//! Why a run could not be judged. Every variant is exit code 2 (docs/architecture.md) and says what is wrong and what
//! to do about it.

use std::path::PathBuf;

/// A run that could not be judged: bad arguments, an unreadable or invalid contract or model, CUDA required
/// but absent, or a report that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    // --- discovery ---
    /// `cargo metadata` failed: not inside a Cargo workspace, or no cargo on PATH.
    #[error(
        "cannot find the moe-gate workspace ({reason}); run inside the checkout (its Cargo.toml has \
         [workspace.metadata.moe-gate]) or pass --contract PATH/TO/CONTRACT.yaml"
    )]
    Workspace { reason: String },
    /// `[workspace.metadata.moe-gate]` is missing a field or has one of the wrong type.
    #[error("{manifest}: [workspace.metadata.moe-gate] {field}: {reason}")]
    WorkspaceMetadata { manifest: PathBuf, field: &'static str, reason: String },
    /// `--contract NAME` names no file in the contracts dir.
    #[error("no contract `{name}` in {dir}: expected {dir}/{name}.yaml; available: {available}")]
    ContractNotFound { name: String, dir: PathBuf, available: String },
    /// The contracts dir cannot be listed.
    #[error("cannot list contracts in {dir}: {source}; check contracts-dir in [workspace.metadata.moe-gate]")]
    ContractsDir { dir: PathBuf, source: std::io::Error },

    // --- contract and model ---
    /// The contract does not parse or does not validate (the message has path:line:col).
    #[error("{0}")]
    Contract(#[from] moe_contracts::ContractError),
    /// The model cannot be loaded.
    #[error("cannot load model `{spec}`: {reason}")]
    Model { spec: String, reason: String },
    /// The contract's text prompts cannot be tokenised on the model.
    #[error("text prompts on model `{spec}`: {reason}")]
    TextPrompt { spec: String, reason: String },
    /// A command-line value is wrong.
    #[error("{0}")]
    Usage(String),

    // --- running ---
    /// `--require-cuda` was given and CUDA is not usable.
    #[error("CUDA is required (--require-cuda) but not usable: {reason}")]
    CudaRequired { reason: String },
    /// `bench --backend cuda` where CUDA is not usable.
    #[error(
        "no CUDA to benchmark on: {reason}; run on a machine with an NVIDIA driver and device, or pick \
         --backend cpu"
    )]
    NoCuda { reason: String },
    /// A benchmark failed while measuring.
    #[error("the benchmark failed: {0}")]
    Bench(#[from] moe_engine::bench::BenchError),
    /// A backend failed while running a forward.
    #[error("{what}: {source}")]
    Engine { what: String, source: moe_engine::error::EngineError },

    /// The run would need more memory than the machine has.
    #[error(
        "refused before running: {detail}; split the run into at least {shards} shards with --partition \
         K/N (merged by `cargo moe-gate merge`), or run fewer or shorter prompts"
    )]
    Resources { detail: String, shards: u128 },
    /// The run judged no trial of a blocking criterion, and `--allow-empty` was not given.
    #[error(
        "{reason}{hint}; fix the name filter or the contract, or pass --allow-empty if this is deliberate"
    )]
    NothingJudged { reason: String, hint: String },

    // --- merging shards ---
    /// The shards' reports cannot be merged.
    #[error("{0}")]
    Merge(#[from] crate::merge::MergeError),

    // --- outputs ---
    /// A report or output file could not be written.
    #[error("cannot write {path}: {reason}; check that the directory exists and is writable")]
    Write { path: PathBuf, reason: String },
}

impl GateError {
    /// Wraps an engine error with what was being done.
    pub fn engine(what: impl Into<String>, source: moe_engine::error::EngineError) -> Self {
        Self::Engine { what: what.into(), source }
    }

    /// A run that judged nothing: `reason`, and a "did you mean" when the name filter looks like a
    /// mistyped subcommand.
    pub fn nothing_judged(reason: String, filter: Option<&str>) -> Self {
        let hint = match filter.and_then(crate::cli::subcommand_typo) {
            Some(sub) => format!(
                "; the name filter `{}` looks like a mistyped subcommand: did you mean `cargo moe-gate {sub}`?",
                filter.unwrap_or_default()
            ),
            None => String::new(),
        };
        Self::NothingJudged { reason, hint }
    }

    /// A write failure of `path`.
    pub fn write(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::Write { path: path.into(), reason: reason.to_string() }
    }
}
