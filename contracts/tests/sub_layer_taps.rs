//! Criteria over sub-layer taps (issue 10 item 2, docs/contracts.md *Criteria*): they parse, plan per
//! layer, mark the runs whose traces must hold the taps, judge the tap's values (`expert_out` per token
//! row, `[T, k * hidden]`), say what is missing from a trace without taps, and refuse metrics that cannot
//! compare them.

use std::path::Path;

use moe_contracts::{Contract, Recorded, Tap, evaluate, parse};
use moe_engine::trace::{LayerTrace, Matrix, Precision, SubLayerTap, SubLayerTaps, Trace};

fn contract(criteria: &str) -> Result<Contract, String> {
    let text = format!(
        "contract: taps
version: 1.0.0
status: active
title: sub-layer taps
model: synth:small
smoke_model: synth:tiny
prompts:
  - {{id: p, tokens: [7, 8]}}
runs:
  cpu: {{backend: cpu}}
  cuda: {{backend: cuda}}
  other: {{backend: cpu}}
criteria:
{criteria}
amendments:
  - {{version: 1.0.0, date: 2026-11-29, kind: created, summary: test}}
"
    );
    parse(&text, Path::new("taps.yaml")).map_err(|e| e.to_string())
}

/// A trace of 2 tokens and 2 layers (hidden 3, top-2) whose taps all hold `value` (expert_out: 2 slots).
fn trace(value: f64) -> Trace {
    let mut t = Trace::new("m", "cpu", "fast", Precision::F32).with_sub_layer_taps();
    t.tokens = vec![7, 8];
    for _ in 0..2 {
        t.layers.push(LayerTrace {
            hidden: Matrix::from_f64(2, 3, vec![1.0; 6]),
            router_logits: Matrix::from_f64(2, 4, vec![0.0; 8]),
            router_experts: vec![0, 1, 0, 1],
            router_weights: Matrix::from_f64(2, 2, vec![0.5; 4]),
        });
        let mut taps = SubLayerTaps::default();
        for tap in SubLayerTap::ALL {
            let cols = if tap == SubLayerTap::ExpertOut { 6 } else { 3 };
            let m = Matrix::from_f64(2, cols, vec![value; 2 * cols]);
            match tap {
                SubLayerTap::AttnNorm => taps.attn_norm = m,
                SubLayerTap::Q => taps.q = m,
                SubLayerTap::K => taps.k = m,
                SubLayerTap::V => taps.v = m,
                SubLayerTap::AttnOut => taps.attn_out = m,
                SubLayerTap::AttnProj => taps.attn_proj = m,
                SubLayerTap::AttnResidual => taps.attn_residual = m,
                SubLayerTap::FfnNorm => taps.ffn_norm = m,
                SubLayerTap::ExpertOut => taps.expert_out = m,
                SubLayerTap::MoeOut => taps.moe_out = m,
            }
        }
        t.sub_layers.push(taps);
    }
    t.logits = Matrix::from_f64(2, 2, vec![0.0; 4]);
    t
}

#[test]
fn every_sub_layer_tap_is_a_per_layer_float_tap_named_as_in_trace_files() {
    for tap in SubLayerTap::ALL {
        let c = contract(&format!(
            "  - {{id: T, title: t, compare: [cuda, cpu], tap: {tap}, metric: nmse, per: [prompt, layer], \
             threshold: {{max: 1.0e-9}}}}"
        ))
        .unwrap_or_else(|e| panic!("{tap}: {e}"));
        let t = c.criteria[0].tap;
        assert_eq!((t.as_str(), t.sub_layer()), (tap.as_str(), Some(tap)));
        assert!(t.is_per_layer() && t.is_float());
        assert_eq!(c.plan(2).len(), 2, "{tap}: one trial per layer");
        assert!(c.needs_sub_layer_taps("cuda") && c.needs_sub_layer_taps("cpu"));
        assert!(!c.needs_sub_layer_taps("other"), "a run no sub-layer criterion reads records none");
    }
    assert_eq!(Tap::Hidden.sub_layer(), None);
}

#[test]
fn sub_layer_criteria_judge_the_taps_values() {
    let c = contract(
        "  - {id: EXP, title: e, compare: [cuda, cpu], tap: expert_out, metric: max_abs, per: [prompt, layer], \
         threshold: {max: 0.25}}",
    )
    .unwrap();
    let judge = |cuda: Trace| {
        let mut rec = Recorded::default();
        rec.traces.insert(("cuda".into(), "p".into()), cuda);
        rec.traces.insert(("cpu".into(), "p".into()), trace(1.0));
        c.plan(2).iter().map(|t| evaluate(&c, t, &rec)).collect::<Vec<_>>()
    };
    // |1.2 - 1.0| = 0.2 <= 0.25 passes; 0.5 fails, in every layer.
    let near = judge(trace(1.2));
    assert!(near.iter().all(|o| o.passed && (o.value - 0.2).abs() < 1e-12), "{near:?}");
    assert!(judge(trace(1.5)).iter().all(|o| !o.passed));

    let mut without = trace(1.0);
    without.sub_layers.clear();
    let missing = judge(without);
    assert!(missing[0].detail.contains("run `cuda` recorded no `expert_out.0`"), "{}", missing[0].detail);
}

#[test]
fn metrics_that_cannot_compare_a_sub_layer_tap_are_refused() {
    let e = contract(
        "  - {id: K, title: k, compare: [cuda, cpu], tap: attn_out, metric: kld, threshold: {max: 0.1}}",
    )
    .unwrap_err();
    assert!(e.contains("metric kld cannot compare tap attn_out; use tap logits"), "{e}");
    let e = contract(
        "  - {id: R, title: r, compare: [cuda, cpu], tap: moe_out, metric: error_ratio, threshold: {max: 1.5}, \
         reference: other}",
    )
    .unwrap_err();
    assert!(e.contains("metric error_ratio cannot compare tap moe_out"), "{e}");
}
