//! Requests a forward must refuse with a typed error, and what it says.

mod forward_support;

use std::sync::Arc;

use forward_support::{fixture_path, load_model};
use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
use moe_engine::error::EngineError;
use moe_engine::gguf::GgufFile;
use moe_engine::trace::Matrix;
use moe_engine::weights::ModelWeights;

const MODEL: &str = "public-tiny/model.gguf";

fn backends() -> Vec<Box<dyn Forward>> {
    [BackendKind::Reference, BackendKind::Cpu]
        .into_iter()
        .map(|k| create_backend(k, load_model(MODEL), Policy::Fast).expect("backend"))
        .collect()
}

#[test]
fn an_empty_prompt_is_refused() {
    for mut f in backends() {
        let e = f.forward(&[], None).unwrap_err();
        assert!(matches!(e, EngineError::EmptyPrompt), "{e:?}");
        assert!(e.to_string().contains("at least one token"), "{e}");
    }
}

#[test]
fn a_token_outside_the_vocabulary_is_refused_with_its_position() {
    for mut f in backends() {
        let vocab = f.config().vocab;
        let e = f.forward(&[1, 2, vocab as u32], None).unwrap_err();
        let expected = EngineError::TokenOutOfRange { token: vocab as u32, position: 2, vocab };
        assert_eq!(e.to_string(), expected.to_string());
        assert!(matches!(e, EngineError::TokenOutOfRange { position: 2, .. }), "{e:?}");
        assert!(e.to_string().contains("256 tokens"), "{e}");

        let ok = f.forward(&[1, 2], None).expect("forward");
        let e = f.step(u32::MAX).unwrap_err();
        assert!(matches!(e, EngineError::TokenOutOfRange { position: 2, .. }), "{e:?}");
        // The refused step changed nothing: the next step continues after the prefill.
        let next = f.step(3).expect("step");
        assert_eq!(f.forward(&[1, 2, 3], None).expect("forward"), next);
        assert_ne!(ok, next);
    }
}

/// The fixture model with its context length cut to `n`.
fn with_context(n: usize) -> Arc<ModelWeights> {
    let file = GgufFile::open(&fixture_path(MODEL)).expect("gguf");
    let mut weights = ModelWeights::from_gguf(Arc::new(file)).expect("weights");
    weights.config.context_length = n;
    Arc::new(weights)
}

#[test]
fn the_context_length_is_enforced() {
    for kind in [BackendKind::Reference, BackendKind::Cpu] {
        let mut f = create_backend(kind, with_context(4), Policy::Fast).expect("backend");
        let e = f.forward(&[1, 2, 3, 4, 5], None).unwrap_err();
        assert!(
            matches!(e, EngineError::ContextFull { context_length: 4, cached: 0, requested: 5 }),
            "{e:?}"
        );
        f.forward(&[1, 2, 3], None).expect("forward");
        f.step(4).expect("the fourth position fits");
        let e = f.step(5).unwrap_err();
        assert!(matches!(e, EngineError::ContextFull { cached: 4, requested: 1, .. }), "{e:?}");
        assert!(e.to_string().contains("context length of 4"), "{e}");
        let e = f.run_layer(0, &Matrix::zeros(5, f.config().hidden)).unwrap_err();
        assert!(matches!(e, EngineError::ContextFull { .. }), "{e:?}");
    }
}

#[test]
fn run_layer_checks_layer_and_shape() {
    for mut f in backends() {
        let (n_layer, hidden) = (f.config().n_layer, f.config().hidden);
        let e = f.run_layer(n_layer, &Matrix::zeros(2, hidden)).unwrap_err();
        assert!(
            matches!(e, EngineError::LayerOutOfRange { layer, n_layer: n } if layer == n && n == n_layer),
            "{e:?}"
        );
        let e = f.run_layer(0, &Matrix::zeros(2, hidden + 1)).unwrap_err();
        assert!(matches!(e, EngineError::InputShape { rows: 2, .. }), "{e:?}");
        assert!(e.to_string().contains(&format!("[T, {hidden}]")), "{e}");
        let e = f.run_layer(0, &Matrix::zeros(0, hidden)).unwrap_err();
        assert!(matches!(e, EngineError::InputShape { rows: 0, .. }), "{e:?}");
    }
}

#[test]
fn the_cpu_backend_accepts_both_policies() {
    // `exact` is the canonical operation order of docs/numerics.md, which the CPU forward implements
    // (forward_exact.rs checks its traces).
    for policy in Policy::ALL {
        let f = create_backend(BackendKind::Cpu, load_model(MODEL), policy).expect("accepted");
        assert_eq!((f.kind(), f.policy()), (BackendKind::Cpu, policy));
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_says_how_to_get_it() {
    let e = create_backend(BackendKind::Cuda, load_model(MODEL), Policy::Fast).err().expect("refused");
    assert!(matches!(e, EngineError::CudaUnavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("--features cuda"), "{e}");
}
