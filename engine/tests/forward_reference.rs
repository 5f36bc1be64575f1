//! The `reference` backend (f64) against float64 forwards computed outside this project
//! (tests/fixtures/README.md): Hugging Face transformers on the F32 model, and a float64 forward of the
//! dequantised weights of each quantised file. Every prompt, position and layer is compared.

mod forward_support;

use forward_support::{Errors, compare_all, load_model, load_reference};
use moe_engine::backend::{BackendKind, Policy, create_backend};
use moe_engine::forward::reference::{WeightDecoding, create};
use moe_engine::trace::{Precision, Trace};
use moe_kernels::quant::{dequantize_row, dequantize_row_f64};

/// Bound on absolute errors against transformers (logits, hidden states, router logits). Measured: 2.9e-13
/// (logits), 3.1e-13 (hidden), 1.8e-13 (router). transformers itself differs from an independent float64
/// forward by the same 2.9e-13 / 3.1e-13 (`numpy_vs_transformers_max_abs` in prompts.json), so that is the
/// floor of this comparison; 1e-12 leaves a factor of three.
const VS_TRANSFORMERS_ABS: f64 = 1e-12;

/// Bound on the per-position relative error `||a - b|| / ||b||` against transformers. Measured: 1.2e-13
/// (logits), 1.5e-13 (hidden); same margin as above.
const VS_TRANSFORMERS_REL: f64 = 5e-13;

/// Bound on absolute errors against the float64 forwards of the dequantised weights. Measured: at most
/// 4.3e-14 (q4k hidden states, values up to ~30): a few hundred roundings of 2^-53. 2e-13 leaves a factor
/// of four.
const VS_DEQUANT_ABS: f64 = 2e-13;

/// Bound on the per-position relative error against the dequantised forwards. Measured: at most 4.0e-15.
const VS_DEQUANT_REL: f64 = 2e-14;

/// Bound on the renormalised router weights (values in [0, 1]). Measured: 5.6e-16 (transformers) and
/// 2.2e-15 (dequantised forwards): a few ulp of 1.
const ROUTER_WEIGHTS_ABS: f64 = 1e-14;

/// The quantised fixture files and the float64 forward of their dequantised weights.
const QUANTISED: [(&str, &str); 4] = [
    ("public-tiny/model.q8_0.gguf", "public-tiny/reference_dequant_q8_0.safetensors"),
    ("public-tiny/model.q4_k_m.gguf", "public-tiny/reference_dequant_q4_k_m.safetensors"),
    ("q4k/model.q8_0.gguf", "q4k/reference_dequant_q8_0.safetensors"),
    ("q4k/model.q4_k_m.gguf", "q4k/reference_dequant_q4_k_m.safetensors"),
];

fn assert_within(e: &Errors, abs: f64, rel: f64, what: &str) {
    eprintln!("{what}: {e:?}");
    assert!(e.logits_abs <= abs, "{what}: logits max abs error {:e} > {abs:e}", e.logits_abs);
    assert!(e.logits_rel <= rel, "{what}: logits relative error {:e} > {rel:e}", e.logits_rel);
    assert!(e.hidden_abs <= abs, "{what}: hidden max abs error {:e} > {abs:e}", e.hidden_abs);
    assert!(e.hidden_rel <= rel, "{what}: hidden relative error {:e} > {rel:e}", e.hidden_rel);
    assert!(e.router_abs <= abs, "{what}: router logits max abs error {:e} > {abs:e}", e.router_abs);
    assert!(e.weights_abs <= ROUTER_WEIGHTS_ABS, "{what}: router weights error {:e}", e.weights_abs);
    assert_eq!(e.topk_set_mismatches, 0, "{what}: chosen expert sets differ");
    assert_eq!(e.argmax_mismatches, 0, "{what}: argmax differs");
}

#[test]
fn reference_matches_transformers_on_the_f32_model() {
    let mut f = create_backend(BackendKind::Reference, load_model("public-tiny/model.gguf"), Policy::Fast)
        .expect("reference backend");
    let e = compare_all(&mut *f, &load_reference("public-tiny/reference.safetensors"));
    assert_within(&e, VS_TRANSFORMERS_ABS, VS_TRANSFORMERS_REL, "reference vs transformers");
}

#[test]
fn reference_matches_the_dequantised_float64_forwards() {
    for (model, reference) in QUANTISED {
        let mut f = create(load_model(model), Policy::Fast, WeightDecoding::ExactF64);
        let e = compare_all(&mut f, &load_reference(reference));
        assert_within(&e, VS_DEQUANT_ABS, VS_DEQUANT_REL, model);
    }
}

/// Whether exact f64 dequantisation or ggml's f32 dequantisation reproduces the dequantised references
/// better: on these files they are the same weights. Every Q8_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weight
/// is a product of a half-precision scale and a small integer (minus a half-precision-derived minimum),
/// which f32 holds exactly, so the two decodings agree bit for bit and so do the two forwards.
#[test]
fn f32_and_exact_dequantisation_agree_on_the_fixture_files() {
    for (model, _) in QUANTISED {
        let weights = load_model(model);
        for t in weights.file.tensors() {
            let w = moe_engine::weights::WeightTensor::from_file(&weights.file, &t.name).expect("tensor");
            let (mut a, mut b) = (vec![0f32; w.row_len()], vec![0f64; w.row_len()]);
            for r in 0..w.n_rows() {
                dequantize_row(w.ty, w.row(r), &mut a);
                dequantize_row_f64(w.ty, w.row(r), &mut b);
                let widened: Vec<f64> = a.iter().map(|&v| v as f64).collect();
                assert_eq!(widened, b, "{model}: {} row {r} ({})", t.name, w.ty);
            }
        }
        let prompt = &load_reference(QUANTISED[0].1)[5].tokens;
        let trace = |decoding| {
            let mut f = create(weights.clone(), Policy::Fast, decoding);
            let mut trace = Trace::new(model, "", "", Precision::F64);
            moe_engine::backend::Forward::forward(&mut f, prompt, Some(&mut trace)).expect("forward");
            trace
        };
        assert_eq!(trace(WeightDecoding::ExactF64), trace(WeightDecoding::RoundedF32), "{model}");
    }
}

#[test]
fn reference_traces_are_f64_and_labelled() {
    let mut f = create_backend(BackendKind::Reference, load_model("public-tiny/model.gguf"), Policy::Exact)
        .expect("the reference accepts either policy");
    assert_eq!((f.kind(), f.policy()), (BackendKind::Reference, Policy::Exact));
    let mut trace = Trace::new("public-tiny", "?", "?", Precision::F32);
    f.forward(&[1, 2, 3], Some(&mut trace)).expect("forward");
    assert_eq!(
        (trace.model.as_str(), trace.backend.as_str(), trace.policy.as_str(), trace.precision),
        ("public-tiny", "reference", "exact", Precision::F64)
    );
    assert_eq!(trace.layers.len(), f.config().n_layer);
    assert_eq!(trace.top_k(), f.config().n_expert_used);
    assert_eq!(trace.first_non_finite(), None);
}
