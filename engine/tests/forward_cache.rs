//! The KV cache and `run_layer`: decoding token by token after a prefill gives the logits of a full
//! forward, and one layer run alone on a given input reproduces that layer's output.

mod forward_support;

use forward_support::{Prompt, load_model, load_reference, max_abs, rel_l2};
use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
use moe_engine::trace::{Matrix, Precision, Trace};

/// The fixture model and its transformers reference.
const MODEL: &str = "public-tiny/model.gguf";
const REFERENCE: &str = "public-tiny/reference.safetensors";

fn backend(kind: BackendKind) -> Box<dyn Forward> {
    create_backend(kind, load_model(MODEL), Policy::Fast).expect("backend")
}

fn full_trace(f: &mut dyn Forward, tokens: &[u32]) -> Trace {
    let mut trace = Trace::new(MODEL, "", "", Precision::F64);
    f.forward(tokens, Some(&mut trace)).expect("forward");
    trace
}

fn row_f32(m: &Matrix, r: usize) -> Vec<f32> {
    m.row(r).iter().map(|&v| v as f32).collect()
}

/// Prefill `tokens[..n]`, then step through the rest: every position's logits equal the full forward's
/// bit for bit. Each value is computed by the same operations in the same order whether its token came in
/// a batch or alone (a weight row's dot product with one token's activations does not depend on the other
/// tokens; attention reads the same cached keys and values; experts are summed in index order), so
/// equality is exact, not approximate.
#[test]
fn decoding_after_a_prefill_gives_the_full_forward_logits() {
    let prompts = load_reference(REFERENCE);
    for kind in [BackendKind::Reference, BackendKind::Cpu] {
        let mut f = backend(kind);
        for p in [&prompts[3], &prompts[5]] {
            let full = full_trace(&mut *f, &p.tokens);
            for n in [1, 2, p.tokens.len() - 1] {
                let last = f.forward(&p.tokens[..n], None).expect("prefill");
                assert_eq!(last, row_f32(&full.logits, n - 1), "{kind}: prefill of {n}");
                for (pos, &tok) in p.tokens.iter().enumerate().skip(n) {
                    let logits = f.step(tok).expect("step");
                    assert_eq!(logits, row_f32(&full.logits, pos), "{kind}: prefill {n}, step at {pos}");
                }
            }
        }
    }
}

#[test]
fn a_step_on_an_empty_cache_is_a_forward_of_one_token() {
    for kind in [BackendKind::Reference, BackendKind::Cpu] {
        let mut f = backend(kind);
        let stepped = f.step(42).expect("step");
        assert_eq!(stepped, f.forward(&[42], None).expect("forward"), "{kind}");
    }
}

#[test]
fn a_forward_starts_again_from_position_zero() {
    let mut f = backend(BackendKind::Cpu);
    let fresh = f.forward(&[5, 6, 7], None).expect("forward");
    f.forward(&[100, 101, 102, 103], None).expect("forward");
    f.step(9).expect("step");
    assert_eq!(f.forward(&[5, 6, 7], None).expect("forward"), fresh);
}

/// Bound on `run_layer` of the reference against transformers, fed transformers' own layer input: the
/// whole-model comparison measures 3.1e-13 on hidden states (forward_reference.rs), one layer can only
/// do as well or better.
const REFERENCE_LAYER_ABS: f64 = 1e-12;

/// Bound on the per-position relative error of the cpu's `run_layer` fed transformers' input: one layer
/// of f32 round-off, measured below 1e-6 for the whole model.
const CPU_LAYER_REL: f64 = 1e-5;

fn layer_input(p: &Prompt, layer: usize) -> Matrix {
    let t = p.tokens.len();
    let hidden = p.hidden.shape[2];
    Matrix::from_f64(t, hidden, p.hidden.at(&[layer]).to_vec())
}

#[test]
fn run_layer_reproduces_each_layer_from_the_reference_input() {
    let prompts = load_reference(REFERENCE);
    let mut reference = backend(BackendKind::Reference);
    let mut cpu = backend(BackendKind::Cpu);
    for p in &prompts {
        for layer in 0..p.router_logits.shape[0] {
            let input = layer_input(p, layer);
            let expected = p.hidden.at(&[layer + 1]);
            let out = reference.run_layer(layer, &input).expect("run_layer").hidden;
            assert_eq!((out.rows, out.cols), (input.rows, input.cols));
            let err = max_abs(&out.data, expected);
            assert!(err <= REFERENCE_LAYER_ABS, "reference layer {layer}, T={}: {err:e}", input.rows);
            let out = cpu.run_layer(layer, &input).expect("run_layer").hidden;
            for pos in 0..input.rows {
                let h = input.cols;
                let err = rel_l2(&out.data[pos * h..(pos + 1) * h], &expected[pos * h..(pos + 1) * h]);
                assert!(err <= CPU_LAYER_REL, "cpu layer {layer}, position {pos}: {err:e}");
            }
        }
    }
}

/// Fed the backend's own input for a layer, `run_layer` gives exactly the trace's output of that layer
/// (trace values are exact in the backend's float type, and the layer runs the same operations).
#[test]
fn run_layer_on_a_traced_input_reproduces_the_trace_exactly() {
    let p = &load_reference(REFERENCE)[4];
    for kind in [BackendKind::Reference, BackendKind::Cpu] {
        let mut f = backend(kind);
        let trace = full_trace(&mut *f, &p.tokens);
        for layer in 1..trace.layers.len() {
            let out = f.run_layer(layer, &trace.layers[layer - 1].hidden).expect("run_layer");
            // Every tap, router decisions included, is the forward's own.
            assert_eq!(out, trace.layers[layer], "{kind} layer {layer}");
        }
    }
}

#[test]
fn run_layer_leaves_the_cache_alone() {
    let p = &load_reference(REFERENCE)[3];
    let mut f = backend(BackendKind::Cpu);
    let full = full_trace(&mut *f, &p.tokens);
    f.forward(&p.tokens[..4], None).expect("prefill");
    f.run_layer(0, &layer_input(p, 0)).expect("run_layer");
    assert_eq!(f.step(p.tokens[4]).expect("step"), row_f32(&full.logits, 4));
}
