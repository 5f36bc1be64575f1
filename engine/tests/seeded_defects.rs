//! The seeded defects of the `cpu` backend (`moe_engine::defect`): each changes what its catalogue entry
//! says and nothing before it, against the clean forward on synth:tiny; the reference and every normal
//! path take none.

use std::sync::Arc;

use moe_engine::backend::{
    BackendKind, BackendOptions, Forward, Policy, create_backend, create_backend_with,
};
use moe_engine::defect::{Defect, Expected};
use moe_engine::error::EngineError;
use moe_engine::trace::{Precision, Trace};
use moe_engine::weights::ModelWeights;

const MODEL: &str = "synth:tiny";
/// Six tokens: attention over several positions, and enough routed slots to reach most experts.
const PROMPT: [u32; 6] = [785, 9217, 308, 374, 264, 6716];
/// Decode steps after the prefill for the decode-path defects.
const STEPS: [u32; 3] = [11, 220, 17];
/// nmse between two f32 forwards that only round differently is ~1e-13 at the layer of the change
/// (docs/gate.md: f32 through one layer gives 1e-13..1e-11 against f64); a seeded defect is counted as a
/// change of that layer when it moves it above 1e-11.
const ROUNDING_NMSE: f64 = 1e-11;

fn weights() -> Arc<ModelWeights> {
    moe_engine::spec::load_model(MODEL).expect("synth:tiny builds")
}

fn cpu(weights: &Arc<ModelWeights>, defect: Option<Defect>) -> Box<dyn Forward> {
    let options = BackendOptions { policy: Policy::Fast, defect };
    create_backend_with(BackendKind::Cpu, Arc::clone(weights), options).expect("cpu backend")
}

fn trace(f: &mut dyn Forward) -> Trace {
    let mut t = Trace::new(MODEL, "", "", Precision::F32);
    f.forward(&PROMPT, Some(&mut t)).expect("forward");
    t
}

fn nmse(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    num / den
}

/// The logits of each decode step after the prefill.
fn decode(f: &mut dyn Forward) -> Vec<Vec<f64>> {
    f.forward(&PROMPT, None).expect("prefill");
    STEPS.iter().map(|&t| f.step(t).expect("step").into_iter().map(f64::from).collect()).collect()
}

fn is_decode_defect(d: Defect) -> bool {
    matches!(d.info().expected, Expected::Harmful(h) if h.step.is_some())
}

#[test]
fn each_prefill_defect_changes_its_first_layer_and_nothing_before() {
    let w = weights();
    let n_layer = w.config.n_layer;
    let clean = trace(&mut *cpu(&w, None));
    for defect in Defect::for_backend(BackendKind::Cpu).filter(|&d| !is_decode_defect(d)) {
        let seeded = trace(&mut *cpu(&w, Some(defect)));
        let first = defect.info().layer.first(n_layer);
        for l in 0..first {
            assert_eq!(
                seeded.layers[l].hidden.data, clean.layers[l].hidden.data,
                "{defect}: layer {l} untouched"
            );
        }
        let moved = nmse(&seeded.layers[first].hidden.data, &clean.layers[first].hidden.data);
        match defect.info().expected {
            Expected::Harmful(_) => assert!(moved > ROUNDING_NMSE, "{defect}: layer {first} nmse {moved:e}"),
            Expected::Benign { .. } => {
                assert!(moved <= ROUNDING_NMSE, "{defect}: layer {first} nmse {moved:e}")
            }
        }
    }
}

#[test]
fn decode_defects_leave_the_prefill_and_change_the_decode_steps() {
    let w = weights();
    let clean_trace = trace(&mut *cpu(&w, None));
    let clean_steps = decode(&mut *cpu(&w, None));
    for defect in Defect::for_backend(BackendKind::Cpu).filter(|&d| is_decode_defect(d)) {
        let seeded_trace = trace(&mut *cpu(&w, Some(defect)));
        assert_eq!(seeded_trace.logits.data, clean_trace.logits.data, "{defect}: the prefill is untouched");
        let seeded_steps = decode(&mut *cpu(&w, Some(defect)));
        let moved = nmse(&seeded_steps[0], &clean_steps[0]);
        assert!(moved > ROUNDING_NMSE, "{defect}: the first decode step's logits moved by nmse {moved:e}");
    }
}

#[test]
fn routing_defects_change_what_they_say() {
    let w = weights();
    let (n_layer, k) = (w.config.n_layer, w.config.n_expert_used);
    let clean = trace(&mut *cpu(&w, None));

    // The (k+1)-th expert in layer 1's last slot, at every position; the other slots as before.
    let ninth = trace(&mut *cpu(&w, Some(Defect::TopkNinthExpert)));
    let (a, b) = (&ninth.layers[1].router_experts, &clean.layers[1].router_experts);
    for (pos, (sa, sb)) in a.chunks_exact(k).zip(b.chunks_exact(k)).enumerate() {
        assert_eq!(sa[..k - 1], sb[..k - 1], "position {pos}: the first k-1 choices stay");
        assert!(!sb.contains(&sa[k - 1]), "position {pos}: the last choice is a new expert");
    }

    // Not renormalised: the weights sum to the chosen probabilities' mass, below 1.
    let raw = trace(&mut *cpu(&w, Some(Defect::RouterWeightsNotRenormalised)));
    for row in raw.layers[0].router_weights.data.chunks_exact(k) {
        let sum: f64 = row.iter().sum();
        assert!(sum < 1.0 - 1e-3, "a top-{k} of 16 experts holds less than all the mass: {sum}");
    }

    // Swapped ids: the router's record is unchanged in every layer, the last layer's output is not.
    let swapped = trace(&mut *cpu(&w, Some(Defect::ExpertIdsSwappedLastLayer)));
    for l in 0..n_layer {
        assert_eq!(swapped.layers[l].router_experts, clean.layers[l].router_experts, "layer {l}");
    }
    let last = n_layer - 1;
    assert!(nmse(&swapped.layers[last].hidden.data, &clean.layers[last].hidden.data) > ROUNDING_NMSE);
}

#[test]
fn no_normal_path_sets_a_defect() {
    let w = weights();
    for kind in [BackendKind::Reference, BackendKind::Cpu] {
        for policy in Policy::ALL {
            let f = create_backend(kind, Arc::clone(&w), policy).expect("backend");
            assert_eq!(f.defect(), None, "{kind} {policy}");
        }
    }
    assert_eq!(BackendOptions::default().defect, None, "the default options hold no defect");
    assert_eq!(cpu(&w, Some(Defect::KvStaleRow)).defect(), Some(Defect::KvStaleRow));
}

#[test]
fn the_reference_and_foreign_backends_refuse_a_defect() {
    let w = weights();
    for defect in Defect::ALL {
        let options = BackendOptions { policy: Policy::Fast, defect: Some(defect) };
        let e = create_backend_with(BackendKind::Reference, Arc::clone(&w), options).err().expect("refused");
        assert!(matches!(e, EngineError::DefectNotApplicable { .. }), "{defect}: {e}");
    }
    let options = BackendOptions { policy: Policy::Fast, defect: Some(Defect::CudaExactNormTree) };
    let e = create_backend_with(BackendKind::Cpu, w, options).err().expect("a cuda-only change");
    assert!(e.to_string().contains("cuda-exact-norm-tree") && e.to_string().contains("cpu"), "{e}");
}
