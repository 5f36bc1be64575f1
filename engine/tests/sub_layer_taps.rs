//! Sub-layer taps (issue 10 item 2, docs/architecture.md *Trace format*) of the CPU-side backends: the
//! `cpu` taps of every layer against the f64 `reference`'s, each layer run alone on the reference's input
//! (`run_layer_tapped`); a forward's taps are those of its layers run alone, and asking for them changes no
//! value; a decode step's trace (`step_traced`) holds the full forward's last row and the KV-cache rows.
//! The CUDA taps are compared with these in `cuda_forward.rs` (`taps_match_cpu::*`).

mod forward_support;

use std::sync::Arc;

use forward_support::{FIXTURES, load_model};
use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
use moe_engine::trace::{Matrix, Precision, SubLayerTap, SubLayerTaps, Trace};
use moe_engine::weights::ModelWeights;

/// Bound on the nmse of each `cpu` tap against the reference's, one layer run alone on the same input.
/// Both multiply the same exactly dequantised weights, so the difference is f32 round-off of the
/// activations through at most one layer: the unit round-off 6e-8 squared (3.6e-15) grown by dot products
/// of up to 4096 terms and a softmax, gate.md's "f32 through one layer gives ~1e-13..1e-11 against f64".
/// Measured here: at most 1.5e-13 (q4k Q4_K_M, moe_out; synth:tiny 1.3e-13, public-tiny 8.2e-14). 1e-10
/// leaves room for the longer dot products of larger models (gate.md's 1e-11 at the production shape) and
/// stays five orders below a real defect (8-bit activations: 1e-5 to 5e-4, gate.md).
const TAP_NMSE: f64 = 1e-10;

fn backend(weights: &Arc<ModelWeights>, kind: BackendKind) -> Box<dyn Forward> {
    create_backend(kind, Arc::clone(weights), Policy::Fast).expect("backend")
}

fn traced(f: &mut dyn Forward, tokens: &[u32], taps: bool) -> Trace {
    let trace = Trace::new("m", "", "", Precision::F64);
    let mut trace = if taps { trace.with_sub_layer_taps() } else { trace };
    f.forward(tokens, Some(&mut trace)).expect("forward");
    trace
}

fn nmse(a: &Matrix, b: &Matrix) -> f64 {
    assert_eq!((a.rows, a.cols), (b.rows, b.cols), "shapes");
    let err: f64 = a.data.iter().zip(&b.data).map(|(x, y)| (x - y) * (x - y)).sum();
    let energy: f64 = b.data.iter().map(|y| y * y).sum();
    if err == 0.0 { 0.0 } else { err / energy }
}

/// The layer input the reference feeds layer `l`: its own residual stream after layer `l - 1`, or the
/// exactly dequantised embeddings.
fn reference_input(weights: &ModelWeights, reference: &Trace, tokens: &[u32], l: usize) -> Matrix {
    match l {
        0 => {
            let hidden = weights.config.hidden;
            let mut data = vec![0.0; tokens.len() * hidden];
            for (row, &t) in data.chunks_exact_mut(hidden).zip(tokens) {
                let e = &weights.token_embd;
                moe_kernels::quant::dequantize_row_f64(e.ty, e.row(t as usize), row);
            }
            Matrix::from_f64(tokens.len(), hidden, data)
        }
        l => reference.layers[l - 1].hidden.clone(),
    }
}

/// Every layer of `cpu` and `reference` alone on the reference's input: the largest nmse of each tap.
fn worst_tap_nmse(weights: &Arc<ModelWeights>, tokens: &[u32]) -> Vec<(SubLayerTap, f64)> {
    let (mut cpu, mut reference) =
        (backend(weights, BackendKind::Cpu), backend(weights, BackendKind::Reference));
    let full = traced(&mut *reference, tokens, false);
    let mut worst: Vec<(SubLayerTap, f64)> = SubLayerTap::ALL.iter().map(|&t| (t, 0.0)).collect();
    for l in 0..weights.config.n_layer {
        let input = reference_input(weights, &full, tokens, l);
        let (c_layer, c) = cpu.run_layer_tapped(l, &input).expect("cpu layer");
        let (r_layer, r) = reference.run_layer_tapped(l, &input).expect("reference layer");
        assert_eq!(r_layer.hidden, full.layers[l].hidden, "the reference's layer alone is its forward's");
        // The slots compare the same experts only where both chose the same ones (no tie here).
        assert_eq!(c_layer.router_experts, r_layer.router_experts, "layer {l}: the same experts");
        for (tap, w) in &mut worst {
            *w = w.max(nmse(tap.of(&c), tap.of(&r)));
        }
    }
    worst
}

#[test]
fn cpu_taps_match_the_reference_on_every_layer() {
    let prompt: &[u32] = &[785, 9217, 308, 6716, 30];
    let mut models: Vec<(String, Arc<ModelWeights>)> =
        vec![("synth:tiny".into(), moe_engine::spec::load_model("synth:tiny").expect("synth:tiny"))];
    for (model, _) in [FIXTURES[0], FIXTURES[4]] {
        models.push((model.to_string(), load_model(model)));
    }
    for (name, weights) in &models {
        let tokens: Vec<u32> = prompt.iter().map(|&t| t % weights.config.vocab as u32).collect();
        let worst = worst_tap_nmse(weights, &tokens);
        println!("{name}: worst nmse per tap {worst:?}");
        for (tap, w) in worst {
            assert!(w <= TAP_NMSE, "{name}: tap {tap} nmse {w:e} > {TAP_NMSE:e}");
        }
    }
}

#[test]
fn a_forwards_taps_are_its_layers_alone_and_cost_no_value() {
    let weights = load_model(FIXTURES[0].0);
    let tokens = [3, 1, 4, 1, 5];
    for kind in [BackendKind::Cpu, BackendKind::Reference] {
        let mut f = backend(&weights, kind);
        let plain = traced(&mut *f, &tokens, false);
        let tapped = traced(&mut *f, &tokens, true);
        assert!(plain.sub_layers.is_empty(), "{kind}: no taps unless asked");
        assert_eq!((&tapped.layers, &tapped.logits), (&plain.layers, &plain.logits), "{kind}: same values");
        assert_eq!(tapped.sub_layers.len(), weights.config.n_layer);
        for l in 0..weights.config.n_layer {
            let input = reference_input(&weights, &tapped, &tokens, l);
            let (layer, taps) = f.run_layer_tapped(l, &input).expect("layer alone");
            // Layer 0 alone reads the exact f64 embeddings, the cpu forward its f32 ones: compare from 1.
            if l > 0 || kind == BackendKind::Reference {
                assert_eq!(layer, tapped.layers[l], "{kind} layer {l}");
                assert_eq!(taps, tapped.sub_layers[l], "{kind} layer {l}: taps bit for bit");
            }
            check_tap_consistency(&weights, &taps, &input, kind, l);
        }
    }
}

/// What the taps say of each other: the residual after attention is the input plus the projection, and
/// the layer's output is that plus the MoE output (one f32 or f64 addition each, as the forward adds).
fn check_tap_consistency(
    weights: &ModelWeights,
    taps: &SubLayerTaps,
    input: &Matrix,
    kind: BackendKind,
    l: usize,
) {
    let round = |v: f64| if kind == BackendKind::Cpu { v as f32 as f64 } else { v };
    for i in 0..input.data.len() {
        let (x, p) = (round(input.data[i]), taps.attn_proj.data[i]);
        let want = if kind == BackendKind::Cpu { (x as f32 + p as f32) as f64 } else { x + p };
        assert_eq!(taps.attn_residual.data[i], want, "{kind} layer {l}: attn_residual = input + attn_proj");
    }
    let (k, hidden) = (weights.config.n_expert_used, weights.config.hidden);
    assert_eq!((taps.expert_out.rows, taps.expert_out.cols), (input.rows, k * hidden), "expert_out shape");
}

#[test]
fn a_step_trace_is_the_full_forwards_last_row_with_the_cache_it_read() {
    let weights = load_model(FIXTURES[0].0);
    let tokens = [3, 1, 4, 1, 5, 9];
    for kind in [BackendKind::Cpu, BackendKind::Reference] {
        let mut f = backend(&weights, kind);
        let full = traced(&mut *f, &tokens, true);
        let n = tokens.len();
        f.forward(&tokens[..n - 2], None).expect("prefill");
        f.step(tokens[n - 2]).expect("step");
        let mut step = Trace::new("m", "", "", Precision::F64).with_sub_layer_taps();
        let logits = f.step_traced(tokens[n - 1], &mut step).expect("traced step");
        assert_eq!(step.tokens, [tokens[n - 1]]);
        let last = |m: &Matrix| Matrix::from_f64(1, m.cols, m.row(m.rows - 1).to_vec());
        let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        assert_eq!(logits, as_f32(full.logits.row(n - 1)), "{kind}: the step's logits");
        for l in 0..weights.config.n_layer {
            let (s, t) = (&step.sub_layers[l], &full.sub_layers[l]);
            assert_eq!(step.layers[l].hidden, last(&full.layers[l].hidden), "{kind} layer {l}: hidden");
            for tap in SubLayerTap::ALL {
                assert_eq!(tap.of(s), &last(tap.of(t)), "{kind} layer {l}: {tap}");
            }
            assert_eq!(s.cache_keys.as_ref(), Some(&t.k), "{kind} layer {l}: every cached key");
            assert_eq!(s.cache_values.as_ref(), Some(&t.v), "{kind} layer {l}: every cached value");
        }
    }
}
