//! Which model the gate runs, and whether CUDA is usable (docs/contracts.md): `--model` wins; otherwise the
//! contract's `model` (the model of record) where a CUDA backend can be created, its `smoke_model`
//! elsewhere. The choice and its reason are printed and kept in the report.

use std::sync::Arc;

use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
use moe_engine::error::EngineError;
use moe_engine::weights::ModelWeights;

use crate::error::GateError;

/// The model `bench` runs without `--model`: small enough for any machine.
pub const BENCH_DEFAULT_MODEL: &str = "synth:tiny";
/// The production shape (docs/synthetic-models.md), the model the CUDA numbers of docs/benchmarks.md are
/// measured on.
pub const PRODUCTION_MODEL: &str = "synth:qwen3-coder-30b-a3b:q4_k_m";

/// Loads a model spec: a `.gguf` path (memory-mapped) or `synth:PRESET[:QUANT][@SEED]` (built in memory).
/// The one place the gate turns a spec into weights.
pub fn resolve_model(spec: &str) -> Result<Arc<ModelWeights>, GateError> {
    moe_engine::spec::load_model(spec)
        .map_err(|e| GateError::Model { spec: spec.to_string(), reason: e.to_string() })
}

/// Whether CUDA trials can run.
pub struct CudaStatus {
    /// Whether the contract has a run on the `cuda` backend.
    pub needed: bool,
    /// Why CUDA is not usable (None when it is).
    pub unavailable: Option<String>,
    /// The backend created by the probe, kept for the first CUDA run so the weights are uploaded once.
    pub probe: Option<Box<dyn Forward>>,
}

impl CudaStatus {
    /// Whether a CUDA backend could be created.
    pub fn available(&self) -> bool {
        self.unavailable.is_none()
    }
}

/// Tries to create a CUDA backend on `weights`. `CudaUnavailable` (no driver, no device, or a build
/// without the `cuda` feature) is an answer, not an error; any other failure is an error.
pub fn probe_cuda(
    needed: bool,
    weights: &Arc<ModelWeights>,
    policy: Policy,
) -> Result<CudaStatus, GateError> {
    match create_backend(BackendKind::Cuda, Arc::clone(weights), policy) {
        Ok(backend) => Ok(CudaStatus { needed, unavailable: None, probe: Some(backend) }),
        Err(EngineError::CudaUnavailable { reason }) => {
            Ok(CudaStatus { needed, unavailable: Some(reason), probe: None })
        }
        Err(e) => Err(GateError::engine("creating the CUDA backend", e)),
    }
}

/// The model chosen for a run and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    /// The spec to load.
    pub spec: String,
    /// `--model`, `model` or `smoke_model`.
    pub source: &'static str,
    /// Why, in words.
    pub reason: String,
}

/// Picks the model: `--model` over both, the model of record where CUDA is usable, the smoke model
/// elsewhere.
pub fn choose_model(
    override_spec: Option<&str>,
    model: &str,
    smoke_model: &str,
    cuda_unavailable: Option<&str>,
) -> ModelChoice {
    match (override_spec, cuda_unavailable) {
        (Some(spec), _) => ModelChoice {
            spec: spec.to_string(),
            source: "--model",
            reason: "given on the command line (overrides the contract's model and smoke_model)".into(),
        },
        (None, None) => ModelChoice {
            spec: model.to_string(),
            source: "model",
            reason: "a CUDA device is usable, so the contract's model of record runs".into(),
        },
        (None, Some(why)) => ModelChoice {
            spec: smoke_model.to_string(),
            source: "smoke_model",
            reason: format!("no usable CUDA device ({why}), so the contract's smoke model runs"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_production_and_bench_default_models_are_valid_specs() {
        use moe_engine::spec::ModelSpec;
        assert!(PRODUCTION_MODEL.parse::<ModelSpec>().is_ok());
        assert!(BENCH_DEFAULT_MODEL.parse::<ModelSpec>().is_ok());
    }

    #[test]
    fn override_wins_over_both() {
        let c = choose_model(Some("m.gguf"), "synth:big", "synth:tiny", None);
        assert_eq!((c.spec.as_str(), c.source), ("m.gguf", "--model"));
        let c = choose_model(Some("m.gguf"), "synth:big", "synth:tiny", Some("no driver"));
        assert_eq!(c.spec, "m.gguf");
    }

    #[test]
    fn cuda_decides_between_model_and_smoke_model() {
        let c = choose_model(None, "synth:big", "synth:tiny", None);
        assert_eq!((c.spec.as_str(), c.source), ("synth:big", "model"));
        let c = choose_model(None, "synth:big", "synth:tiny", Some("built without the `cuda` feature"));
        assert_eq!((c.spec.as_str(), c.source), ("synth:tiny", "smoke_model"));
        assert!(c.reason.contains("built without the `cuda` feature"), "{}", c.reason);
    }

    #[test]
    fn missing_model_file_is_a_model_error() {
        let e = resolve_model("/nonexistent/dir/model.gguf").expect_err("a missing file must fail");
        let text = e.to_string();
        assert!(text.starts_with("cannot load model `/nonexistent/dir/model.gguf`"), "{text}");
    }
}
