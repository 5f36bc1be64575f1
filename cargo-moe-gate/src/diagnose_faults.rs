//! Tests of the diagnosis's op-level bisection (issue 10 item 3) on engineered faults: a test backend
//! wraps `cpu` on the `public-tiny` fixture and perturbs one op's output (and so everything after it) in
//! one layer, or the decode path from one step on. The real defect catalogue (`cargo moe-gate selftest`)
//! checks the same on seeded defects in the kernels.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use moe_contracts::{Recorded, TrialOutcome, TrialPlan};
use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
use moe_engine::config::ModelConfig;
use moe_engine::error::EngineError;
use moe_engine::trace::{LayerTrace, Matrix, SubLayerTaps, Trace};

use super::{Diagnoser, Op};
use crate::record::{greedy_decode, trace_prompt};

const CONTRACT: &str = "contract: faults-v1
version: 1.0.0
status: active
title: engineered faults
model: m.gguf
smoke_model: m.gguf
prompts:
  - {id: p, tokens: [3, 1, 4, 1, 5]}
runs:
  cpu: {backend: cpu}
  reference: {backend: reference}
criteria:
  - {id: HID, title: h, compare: [cpu, reference], tap: hidden, metric: cosine, per: [prompt, layer],
     threshold: {min: 0.9999}, gate: all}
  - {id: GREEDY, title: g, compare: [cpu, reference], tap: logits, metric: greedy, steps: 4, gate: all}
amendments:
  - {version: 1.0.0, date: 2026-11-29, kind: created, summary: test}
";

const MODEL: &str = "../tests/fixtures/public-tiny/model.gguf";

/// How much a fault scales a value: relative error 1e-3, nmse 1e-6, a hundred times the contract's
/// default `ties.isolated_nmse` (1e-8) and far below what a flipped expert gives, so the bisection must
/// tell it from rounding by the bound and not by its size.
const FAULT: f64 = 1e-3;

/// The ops of a layer in the order the bisection walks them, each with the fault that perturbs its
/// output first.
const PREFILL_OPS: [Op; 12] = [
    Op::AttnNorm,
    Op::QkvProj,
    Op::QkNormRope,
    Op::Attention,
    Op::OProj,
    Op::AttnResidual,
    Op::FfnNorm,
    Op::Router,
    Op::Topk,
    Op::Experts,
    Op::MoeCombine,
    Op::FfnResidual,
];

#[derive(Clone, Copy)]
enum Fault {
    /// Layer `layer`: the output of `PREFILL_OPS[from]` and of every op after it.
    Prefill { layer: usize, from: usize },
    /// Decode steps from the `from`-th after a prefill: the queries and keys of every layer (a RoPE
    /// position), and what follows.
    DecodeRope { from: usize },
    /// Decode steps from the `from`-th: the cache rows of earlier positions (a stale row), and what
    /// follows.
    DecodeStaleCache { from: usize },
    /// Decode steps from the `from`-th: the logits alone (the output norm or LM head of the step).
    DecodeHead { from: usize },
}

/// `cpu` with one engineered fault.
struct Faulty {
    inner: Box<dyn Forward>,
    fault: Option<Fault>,
    /// Decode steps since the last forward.
    steps: usize,
}

fn scale(m: &mut Matrix) {
    m.data.iter_mut().for_each(|v| *v *= 1.0 + FAULT);
}

/// Scales the taps of stages `from..` (the order of [`PREFILL_OPS`]); the top-k stage replaces position
/// 0's last expert with the first one it did not choose.
fn perturb(layer: &mut LayerTrace, taps: &mut SubLayerTaps, from: usize, n_expert: u32) {
    let k = layer.router_weights.cols;
    for op in PREFILL_OPS.iter().skip(from) {
        match op {
            Op::AttnNorm => scale(&mut taps.attn_norm),
            Op::QkvProj => scale(&mut taps.v),
            Op::QkNormRope => {
                scale(&mut taps.q);
                scale(&mut taps.k);
            }
            Op::Attention => scale(&mut taps.attn_out),
            Op::OProj => scale(&mut taps.attn_proj),
            Op::AttnResidual => scale(&mut taps.attn_residual),
            Op::FfnNorm => scale(&mut taps.ffn_norm),
            Op::Router => scale(&mut layer.router_logits),
            Op::Topk => {
                let chosen = layer.router_experts[..k].to_vec();
                let other = (0..n_expert).find(|e| !chosen.contains(e)).expect("an expert not chosen");
                layer.router_experts[k - 1] = other;
            }
            Op::Experts => scale(&mut taps.expert_out),
            Op::MoeCombine => scale(&mut taps.moe_out),
            _ => scale(&mut layer.hidden),
        }
    }
}

impl Faulty {
    fn new(weights: &Arc<moe_engine::weights::ModelWeights>, fault: Option<Fault>) -> Self {
        let inner = create_backend(BackendKind::Cpu, Arc::clone(weights), Policy::Fast).expect("cpu");
        Faulty { inner, fault, steps: 0 }
    }

    fn decode_fault_active(&self) -> bool {
        match self.fault {
            Some(
                Fault::DecodeRope { from } | Fault::DecodeStaleCache { from } | Fault::DecodeHead { from },
            ) => self.steps >= from,
            _ => false,
        }
    }
}

impl Forward for Faulty {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }

    fn policy(&self) -> Policy {
        self.inner.policy()
    }

    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn forward(&mut self, tokens: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>, EngineError> {
        self.steps = 0;
        self.inner.forward(tokens, trace)
    }

    fn step(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        self.steps += 1;
        let mut logits = self.inner.step(token)?;
        if self.decode_fault_active() {
            logits.iter_mut().for_each(|v| *v *= 1.0 + FAULT as f32 * 10.0);
        }
        Ok(logits)
    }

    fn step_traced(&mut self, token: u32, trace: &mut Trace) -> Result<Vec<f32>, EngineError> {
        self.steps += 1;
        let mut logits = self.inner.step_traced(token, trace)?;
        if self.decode_fault_active() {
            let n_expert = self.config().n_expert as u32;
            for (layer, taps) in trace.layers.iter_mut().zip(&mut trace.sub_layers) {
                match self.fault {
                    Some(Fault::DecodeHead { .. }) => {}
                    Some(Fault::DecodeStaleCache { .. }) => {
                        // Position 0's cached key and value rows, then what attention computes from them.
                        let kv = taps.k.cols;
                        for m in [taps.cache_keys.as_mut(), taps.cache_values.as_mut()].into_iter().flatten()
                        {
                            m.data[..kv].iter_mut().for_each(|v| *v += 1.0);
                        }
                        perturb(layer, taps, 3, n_expert);
                    }
                    _ => perturb(layer, taps, 2, n_expert),
                }
            }
            logits.iter_mut().for_each(|v| *v *= 1.0 + FAULT as f32 * 10.0);
            trace.logits = Matrix::from_f32(1, logits.len(), &logits);
        }
        Ok(logits)
    }

    fn run_layer(&mut self, layer: usize, input: &Matrix) -> Result<LayerTrace, EngineError> {
        Ok(self.run_layer_tapped(layer, input)?.0)
    }

    fn run_layer_tapped(
        &mut self,
        l: usize,
        input: &Matrix,
    ) -> Result<(LayerTrace, SubLayerTaps), EngineError> {
        let (mut layer, mut taps) = self.inner.run_layer_tapped(l, input)?;
        if let Some(Fault::Prefill { layer: at, from }) = self.fault
            && at == l
        {
            perturb(&mut layer, &mut taps, from, self.config().n_expert as u32);
        }
        Ok((layer, taps))
    }
}

/// The diagnosis of `criterion` failing on prompt `p` (at `layer` for HID) with `cpu` faulty as `fault`.
fn diagnose(fault: Option<Fault>, criterion: &str, layer: Option<usize>) -> crate::report::Diagnosis {
    let contract = moe_contracts::parse(CONTRACT, Path::new("faults-v1.yaml")).unwrap();
    let weights = crate::model::resolve_model(MODEL).unwrap();
    let prompts = contract.expand_prompts();
    let prompt = &prompts[0];
    let mut cpu = Faulty::new(&weights, fault);
    let mut reference = create_backend(BackendKind::Reference, Arc::clone(&weights), Policy::Fast).unwrap();
    let mut recorded = Recorded::default();
    let (trace, last) = trace_prompt("m", &mut cpu, prompt).unwrap();
    recorded.traces.insert(("cpu".into(), "p".into()), trace);
    recorded.greedy.insert(("cpu".into(), "p".into()), greedy_decode(&mut cpu, last, 4).unwrap());
    let (trace, _) = trace_prompt("m", &mut *reference, prompt).unwrap();
    recorded.traces.insert(("reference".into(), "p".into()), trace);
    let mut backends: HashMap<String, Box<dyn Forward>> = HashMap::new();
    backends.insert("cpu".into(), Box::new(cpu));
    backends.insert("reference".into(), reference);

    let plan = TrialPlan {
        name: format!("faults-v1::{criterion}::p"),
        criterion: criterion.into(),
        prompt: "p".into(),
        layer,
        position: None,
        runs: vec!["cpu".into(), "reference".into()],
        expected: None,
    };
    let outcome = TrialOutcome { value: 0.5, passed: false, detail: "failed".into(), non_finite: None };
    let mut dg = Diagnoser {
        contract: &contract,
        weights: &weights,
        model_spec: "m",
        prompts: &prompts,
        recorded: &mut recorded,
        backends: &mut backends,
        isolated_cache: HashMap::new(),
        extra_reference_forwards: 0,
        bisection_cache: HashMap::new(),
    };
    dg.diagnose(&[(&plan, &outcome)]).expect("a diagnosis")
}

#[test]
fn a_fault_in_any_op_of_a_layer_is_named_with_its_numbers() {
    let layer = 1;
    for (from, &want) in PREFILL_OPS.iter().enumerate() {
        let d = diagnose(Some(Fault::Prefill { layer, from }), "HID", Some(layer));
        assert_eq!((d.op, d.step), (Some(want), None), "fault at {want}: {}", d.summary);
        let b = &d.bisections[0];
        assert_eq!((b.run.as_str(), b.layer, b.checks.len()), ("cpu", layer, from + 1), "{want}");
        // Every op before the fault agrees to rounding (cpu against f64 on the same input: <= 1e-12,
        // sub_layer_taps.rs measures 1.5e-13 at most); the faulty op is at the fault's size.
        for c in &b.checks[..from] {
            assert!(!c.differs && c.nmse < 1e-12, "{want}: {} agrees: {:e}", c.op, c.nmse);
        }
        let last = b.checks.last().unwrap();
        if want == Op::Topk {
            assert_eq!(last.differing_positions, 1, "one position chose another expert");
        } else {
            // (1 + 1e-3) x: nmse 1e-6, give or take the rounding of the unperturbed values.
            assert!((last.nmse / (FAULT * FAULT) - 1.0).abs() < 1e-3, "{want}: nmse {:e}", last.nmse);
        }
        assert!(
            d.summary.starts_with(&format!("layer {layer} of `cpu` computes something else")),
            "{}",
            d.summary
        );
        assert!(d.summary.contains(&format!("[{want}]")), "{}", d.summary);
    }
}

#[test]
fn a_decode_path_fault_names_the_first_differing_step_and_its_op() {
    for (fault, want) in [
        (Fault::DecodeRope { from: 2 }, Op::QkNormRope),
        (Fault::DecodeStaleCache { from: 2 }, Op::KvCache),
        (Fault::DecodeHead { from: 2 }, Op::LmHead),
    ] {
        let d = diagnose(Some(fault), "GREEDY", None);
        assert_eq!((d.op, d.step), (Some(want), Some(2)), "{}", d.summary);
        // Every layer is faulty and the first is named; a faulty head comes after the last layer.
        let layer = if want == Op::LmHead { 1 } else { 0 };
        assert_eq!(d.bisections[0].layer, layer, "{}", d.summary);
        assert!(
            d.summary.starts_with("the prefill agrees layer by layer, but the decode path of `cpu` differs"),
            "{}",
            d.summary
        );
        assert!(d.summary.contains("decode step 2 (position 6;"), "{}", d.summary);
    }
}

#[test]
fn without_a_fault_nothing_is_named() {
    let d = diagnose(None, "GREEDY", None);
    assert_eq!((d.op, d.step), (None, None));
    assert!(d.bisections.is_empty(), "every decode step agrees with the full forward: nothing to bisect");
    assert!(d.summary.starts_with("routing agrees in every layer"), "{}", d.summary);
    let d = diagnose(None, "HID", Some(1));
    assert_eq!(d.op, None);
    assert!(d.bisections.is_empty(), "a layer right in isolation is not bisected: {}", d.summary);
}
