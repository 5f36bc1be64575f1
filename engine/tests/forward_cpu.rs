//! The `cpu` backend (f32) against float64 forwards computed outside this project (tests/fixtures):
//! transformers on the F32 model, and the float64 forward of the dequantised weights of each quantised
//! file (the tight oracle for an f32 engine on those weights). Every prompt, position and layer.

mod forward_support;

use forward_support::{compare_all, load_model, load_reference};
use moe_engine::backend::{BackendKind, Policy, create_backend};
use moe_engine::trace::{Precision, Trace};

/// Bound on the per-position relative error `||a - b|| / ||b||` of logits and hidden states. Issue 2 asks
/// for <= 1e-4; f32 round-off measures at most 1.0e-6 (q4k, hidden 256), so this asserts 1e-5, ten times
/// the measurement: quantised activations (~1e-2) or a lost f64 statistic would exceed it.
const REL_BOUND: f64 = 1e-5;

/// Bound on the renormalised router weights (values in [0, 1]). Measured: at most 4.9e-7.
const ROUTER_WEIGHTS_ABS: f64 = 5e-6;

fn check(model: &str, reference: &str) {
    let mut f = create_backend(BackendKind::Cpu, load_model(model), Policy::Fast).expect("cpu backend");
    let e = compare_all(&mut *f, &load_reference(reference));
    eprintln!("cpu on {model}: {e:?}");
    assert!(e.logits_rel <= REL_BOUND, "{model}: logits relative error {:e}", e.logits_rel);
    assert!(e.hidden_rel <= REL_BOUND, "{model}: hidden relative error {:e}", e.hidden_rel);
    assert!(e.weights_abs <= ROUTER_WEIGHTS_ABS, "{model}: router weights error {:e}", e.weights_abs);
    assert_eq!(e.topk_set_mismatches, 0, "{model}: chosen expert sets differ");
    assert_eq!(e.argmax_mismatches, 0, "{model}: argmax differs");
}

#[test]
fn cpu_matches_transformers_on_the_f32_model() {
    check("public-tiny/model.gguf", "public-tiny/reference.safetensors");
}

#[test]
fn cpu_matches_the_dequantised_reference_on_q8_0() {
    check("public-tiny/model.q8_0.gguf", "public-tiny/reference_dequant_q8_0.safetensors");
    check("q4k/model.q8_0.gguf", "q4k/reference_dequant_q8_0.safetensors");
}

#[test]
fn cpu_matches_the_dequantised_reference_on_legacy_quants() {
    // public-tiny's "Q4_K_M" holds Q5_0, Q5_1 and Q8_0 (its rows are too short for K-quants).
    check("public-tiny/model.q4_k_m.gguf", "public-tiny/reference_dequant_q4_k_m.safetensors");
}

#[test]
fn cpu_matches_the_dequantised_reference_on_k_quants() {
    // q4k's Q4_K_M holds Q4_K, Q5_K, Q6_K and Q8_0.
    check("q4k/model.q4_k_m.gguf", "q4k/reference_dequant_q4_k_m.safetensors");
}

#[test]
fn cpu_traces_are_f32_and_labelled() {
    let mut f = create_backend(BackendKind::Cpu, load_model("public-tiny/model.gguf"), Policy::Fast).unwrap();
    assert_eq!((f.kind(), f.policy()), (BackendKind::Cpu, Policy::Fast));
    let mut trace = Trace::new("public-tiny", "?", "?", Precision::F64);
    let logits = f.forward(&[7, 8], Some(&mut trace)).expect("forward");
    assert_eq!(
        (trace.backend.as_str(), trace.policy.as_str(), trace.precision),
        ("cpu", "fast", Precision::F32)
    );
    assert_eq!(logits.len(), f.config().vocab);
    // Every traced value is an f32 widened (the trace file stores f32 without loss).
    for layer in &trace.layers {
        assert!(layer.hidden.data.iter().all(|&v| v as f32 as f64 == v));
    }
}
