//! `evaluate` and `summarize` on hand-built traces whose metric values are computed by hand: passing
//! and failing trials, expected failures, strict unexpected passes, located NaNs, certified and
//! uncertified router ties, and the gate forms.

use std::path::Path;

use moe_contracts::{
    Contract, GreedyStep, Recorded, TrialOutcome, TrialPlan, all_blocking_gates_hold, evaluate, parse,
    summarize,
};
use moe_engine::trace::{LayerTrace, Matrix, Precision, Trace};

const CONTRACT: &str = "\
contract: ev
version: 1.0.0
status: active
title: evaluation on hand-built traces
model: synth:small
smoke_model: synth:tiny
prompts:
  - {id: p, tokens: [7, 8]}
runs:
  cpu: {backend: cpu}
  cuda: {backend: cuda}
  reference: {backend: reference}
criteria:
  - {id: HID, title: h, compare: [cuda, cpu], tap: hidden, metric: cosine, per: [prompt, layer], threshold: {min: 0.999}}
  - {id: WORST, title: w, compare: [cuda, cpu], tap: hidden, metric: cosine, threshold: {min: 0.999}}
  - {id: TOPK, title: e, compare: [cuda, cpu], tap: router_experts, metric: topk_set, per: [prompt, layer], tie_margin: 1.0e-3}
  - {id: ARG, title: a, compare: [cuda, cpu], tap: logits, metric: argmax}
  - {id: KLD, title: k, compare: [cuda, cpu], tap: logits, metric: kld, threshold: {max: 0.01}}
  - {id: POS, title: n, compare: [cuda, cpu], tap: logits, metric: nmse, per: [prompt, position], threshold: {max: 1.0e-3}}
  - {id: BITS, title: b, compare: [cuda, cpu], tap: logits, metric: bitwise}
  - {id: GREEDY, title: g, compare: [cuda, cpu], tap: logits, metric: greedy, steps: 3, blocking: false}
known_divergences:
  - {criterion: HID, where: {layer: 1}, status: not_benign, strict: true, note: layer 1 is known to diverge}
amendments:
  - {version: 1.0.0, date: 2026-11-29, kind: created, summary: test}
";

fn contract() -> Contract {
    parse(CONTRACT, Path::new("ev.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

/// A trace of 2 tokens, 2 layers, hidden 3, 4 experts top-2, vocabulary 2.
fn trace(backend: &str) -> Trace {
    let mut t = Trace::new("synth:test", backend, "fast", Precision::F32);
    t.tokens = vec![7, 8];
    for l in 0..2 {
        let base = l as f64;
        t.layers.push(LayerTrace {
            hidden: Matrix::from_f64(2, 3, vec![1.0 + base, 2.0, 3.0, -1.0, 0.5, 2.0 + base]),
            // Row 0: probabilities of experts 1 and 2 are 0.2061 and 0.2060, 8.2e-5 apart; row 1: 0.237 and 0.087.
            router_logits: Matrix::from_f64(2, 4, vec![2.0, 1.0, 0.9996, -1.0, 2.0, 1.0, 0.0, -1.0]),
            router_experts: vec![0, 1, 0, 1],
            router_weights: Matrix::from_f64(2, 2, vec![0.7, 0.3, 0.7, 0.3]),
        });
    }
    t.logits = Matrix::from_f64(2, 2, vec![0.0, 3f64.ln(), 0.0, 3f64.ln()]);
    t
}

fn recorded(cuda: Trace) -> Recorded {
    let mut rec = Recorded::default();
    for (run, t) in [("cuda", cuda), ("cpu", trace("cpu")), ("reference", trace("reference"))] {
        rec.traces.insert((run.to_string(), "p".to_string()), t);
    }
    let steps = |tokens: &[u32]| {
        tokens
            .iter()
            .map(|&t| GreedyStep { token: t, top5: vec![(t, 5.0), (t + 1, 4.0)], non_finite: None })
            .collect()
    };
    rec.greedy.insert(("cpu".into(), "p".into()), steps(&[3, 4, 5]));
    rec.greedy.insert(("cuda".into(), "p".into()), steps(&[3, 4, 5]));
    rec
}

fn run_all(c: &Contract, rec: &Recorded) -> Vec<(TrialPlan, Option<TrialOutcome>)> {
    c.plan(2)
        .into_iter()
        .map(|t| {
            let outcome = evaluate(c, &t, rec);
            (t, Some(outcome))
        })
        .collect()
}

fn outcome(c: &Contract, rec: &Recorded, name: &str) -> TrialOutcome {
    let trial = c.plan(2).into_iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no trial {name}"));
    evaluate(c, &trial, rec)
}

#[test]
fn identical_traces_pass_every_trial_and_a_strict_divergence_that_passes_fails_its_gate() {
    let c = contract();
    let rec = recorded(trace("cuda"));
    let results = run_all(&c, &rec);
    for (plan, out) in &results {
        let out = out.as_ref().unwrap();
        assert!(out.passed, "{}: {}", plan.name, out.detail);
        assert_eq!(out.non_finite, None);
    }
    let summaries = summarize(&c, &results);
    let hid = &summaries[0];
    assert_eq!(hid.criterion, "HID");
    assert_eq!(hid.unexpected_passes, ["ev::HID::p::layer01"]);
    assert!(!hid.gate_holds, "a strict known divergence that passes must fail the gate");
    assert_eq!((hid.passed, hid.total), (2, 2));
    assert!(summaries[1..].iter().all(|s| s.gate_holds && s.unexpected_passes.is_empty()));
    assert!(!all_blocking_gates_hold(&summaries));
}

#[test]
fn a_failing_trial_with_a_known_divergence_is_an_expected_failure() {
    let c = contract();
    let mut cuda = trace("cuda");
    // Layer 1, row 0 becomes orthogonal-ish: cosine well below 0.999.
    cuda.layers[1].hidden.data[..3].copy_from_slice(&[-2.0, 3.0, 0.0]);
    let results = run_all(&c, &recorded(cuda));
    let (_, layer1) = results.iter().find(|(p, _)| p.name == "ev::HID::p::layer01").unwrap();
    assert!(!layer1.as_ref().unwrap().passed);
    let hid = &summarize(&c, &results)[0];
    assert_eq!((hid.passed, hid.total), (1, 1), "the expected failure counts nowhere");
    assert!(hid.gate_holds);
    assert!(hid.unexpected_passes.is_empty());
}

#[test]
fn an_unexpected_failure_fails_the_gate_with_the_hand_computed_cosine() {
    let c = contract();
    let mut cuda = trace("cuda");
    // Layer 0 of the baseline is [1, 2, 3, -1, 0.5, 2]; the candidate's last value becomes 1:
    // a.b = 1 + 4 + 9 + 1 + 0.25 + 2 = 17.25, |a|^2 = 16.25, |b|^2 = 19.25: cosine 0.975320.
    cuda.layers[0].hidden.data[5] = 1.0;
    let rec = recorded(cuda);
    let out = outcome(&c, &rec, "ev::HID::p::layer00");
    let expected = 17.25 / (16.25f64.sqrt() * 19.25f64.sqrt());
    assert!((expected - 0.975_320).abs() < 1e-6);
    assert!((out.value - expected).abs() < 1e-12, "{} vs {expected}", out.value);
    assert!(!out.passed);
    assert!(out.detail.contains("min 0.999"), "{}", out.detail);
    // The per-prompt criterion over all layers reports the worst layer.
    let worst = outcome(&c, &rec, "ev::WORST::p");
    assert_eq!(worst.value, out.value);
    assert!(worst.detail.contains("worst at layer 0 of 2"), "{}", worst.detail);
    let summaries = summarize(&c, &run_all(&c, &rec));
    assert!(!summaries[0].gate_holds && summaries[0].blocking);
    assert!(!all_blocking_gates_hold(&summaries));
}

#[test]
fn a_nan_fails_the_trials_that_read_it_and_is_located() {
    let c = contract();
    let mut cuda = trace("cuda");
    cuda.layers[0].router_logits.data[5] = f64::NAN; // router_logits.0[1, 1]
    cuda.layers[1].hidden.data[4] = f64::INFINITY; // hidden.1[1, 1]
    let rec = recorded(cuda);
    let out = outcome(&c, &rec, "ev::HID::p::layer01");
    assert!(!out.passed && out.value.is_nan());
    assert_eq!(
        out.non_finite.as_deref(),
        Some(
            "run `cuda`, prompt `p`: hidden.1[1, 1] is inf; the trace's first non-finite value is router_logits.0[1, 1]"
        )
    );
    // Layer 0's hidden state is finite: that trial still passes.
    assert!(outcome(&c, &rec, "ev::HID::p::layer00").passed);
}

#[test]
fn a_nan_in_the_reference_fails_a_tie_check_that_reads_it() {
    let c = contract();
    // The reference is read only where the sets differ: row 0 swaps expert 1 for 2.
    let mut cuda = trace("cuda");
    cuda.layers[0].router_experts = vec![0, 2, 0, 1];
    let mut rec = recorded(cuda);
    rec.traces.get_mut(&("reference".to_string(), "p".to_string())).unwrap().layers[0].router_logits.data
        [2] = f64::NAN;
    let out = outcome(&c, &rec, "ev::TOPK::p::layer00");
    assert_eq!(out.non_finite.as_deref(), Some("run `reference`, prompt `p`: router_logits.0[0, 2] is NaN"));
}

#[test]
fn a_router_swap_is_a_tie_only_where_the_reference_cannot_separate_the_experts() {
    let c = contract();
    let mut cuda = trace("cuda");
    // Position 0 of both layers: cuda picks {0, 2} where cpu picks {0, 1}. The reference's logits put
    // experts 1 and 2 0.0004 apart: probabilities 0.206 differ by 8.2e-5 < tie_margin 1e-3: a tie.
    cuda.layers[0].router_experts = vec![0, 2, 0, 1];
    // Position 1: logits 1.0 and 0.0 put them 0.15 apart: a real difference.
    cuda.layers[1].router_experts = vec![0, 1, 0, 2];
    let rec = recorded(cuda);
    let tie = outcome(&c, &rec, "ev::TOPK::p::layer00");
    assert!(tie.passed, "{}", tie.detail);
    assert_eq!(tie.value, 0.0);
    assert!(tie.detail.contains("1 certified ties"), "{}", tie.detail);
    let real = outcome(&c, &rec, "ev::TOPK::p::layer01");
    assert!(!real.passed);
    assert_eq!(real.value, 1.0);
    assert!(
        real.detail.contains("position 1: run `cuda` alone chose [2], run `cpu` alone [1]"),
        "{}",
        real.detail
    );
    assert!(real.detail.contains("0 certified ties"), "{}", real.detail);
}

#[test]
fn argmax_reads_the_last_position() {
    let c = contract();
    let mut cuda = trace("cuda");
    cuda.logits.data[0] = 10.0; // position 0 only: argmax reads the last position, which still agrees
    assert!(outcome(&c, &recorded(cuda.clone()), "ev::ARG::p").passed);
    cuda.logits.data[2] = 10.0; // position 1: token 0 instead of token 1
    let out = outcome(&c, &recorded(cuda), "ev::ARG::p");
    assert!(!out.passed);
    assert_eq!(out.value, 0.0);
    assert!(
        out.detail.contains("run `cuda` picks token 0 (logit 10.000000), run `cpu` token 1"),
        "{}",
        out.detail
    );
}

#[test]
fn kld_is_the_worst_position_of_kl_baseline_to_candidate() {
    let c = contract();
    let mut cuda = trace("cuda");
    cuda.logits.data[2..].copy_from_slice(&[0.0, 0.0]);
    // Position 1: P = [1/4, 3/4] (cpu), Q = [1/2, 1/2] (cuda): KL = 1/4 ln 1/2 + 3/4 ln 3/2.
    let expected = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
    let out = outcome(&c, &recorded(cuda), "ev::KLD::p");
    assert!((out.value - expected).abs() < 1e-12);
    assert!(!out.passed, "0.13 nats exceed max 0.01");
    assert!(out.detail.contains("at position 1"), "{}", out.detail);
}

#[test]
fn a_per_position_trial_reads_only_its_row() {
    let c = contract();
    let mut cuda = trace("cuda");
    cuda.logits.data[0] = 1.0; // row 0 = [1, ln 3] vs [0, ln 3]: nmse = 1 / (ln 3)^2
    let rec = recorded(cuda);
    let row0 = outcome(&c, &rec, "ev::POS::p::pos00");
    assert!((row0.value - 1.0 / 3f64.ln().powi(2)).abs() < 1e-12);
    assert!(!row0.passed);
    let row1 = outcome(&c, &rec, "ev::POS::p::pos01");
    assert_eq!(row1.value, 0.0);
    assert!(row1.passed);
}

#[test]
fn bitwise_counts_f32_bit_differences() {
    let c = contract();
    let mut cuda = trace("cuda");
    let ulp = f32::from_bits((3f64.ln() as f32).to_bits() + 1) as f64;
    cuda.logits.data[3] = ulp;
    let out = outcome(&c, &recorded(cuda), "ev::BITS::p");
    assert_eq!(out.value, 1.0);
    assert!(!out.passed);
    assert!(
        out.detail.contains("1 of 4 values differ in their f32 bits; the first at logits[1, 1]"),
        "{}",
        out.detail
    );
}

#[test]
fn greedy_reports_the_first_divergence_and_top5_membership() {
    let c = contract();
    let mut rec = recorded(trace("cuda"));
    // Step 1: cuda picks 9 (top-5 [9, 10]); cpu picks 4 (top-5 [4, 5]): neither is in the other's.
    rec.greedy.insert(
        ("cuda".into(), "p".into()),
        vec![
            GreedyStep { token: 3, top5: vec![(3, 5.0)], non_finite: None },
            GreedyStep { token: 9, top5: vec![(9, 5.0), (10, 4.0)], non_finite: None },
            GreedyStep { token: 5, top5: vec![(5, 5.0)], non_finite: None },
        ],
    );
    let out = outcome(&c, &rec, "ev::GREEDY::p");
    assert!(!out.passed);
    assert_eq!(out.value, 1.0, "one step matched before the divergence");
    assert!(out.detail.contains("step 1 of 3: run `cuda` picks 9 (not in `cpu`'s top-5), run `cpu` picks 4 (not in `cuda`'s top-5)"), "{}", out.detail);
    // The criterion is not blocking: its failed gate does not fail the build.
    let summaries = summarize(&c, &run_all(&c, &rec));
    let greedy = summaries.iter().find(|s| s.criterion == "GREEDY").unwrap();
    assert!(!greedy.gate_holds && !greedy.blocking);
}

#[test]
fn a_missing_recording_fails_the_trial_and_says_which() {
    let c = contract();
    let mut rec = recorded(trace("cuda"));
    rec.traces.remove(&("cuda".to_string(), "p".to_string()));
    let out = outcome(&c, &rec, "ev::HID::p::layer00");
    assert!(!out.passed);
    assert_eq!(out.detail, "no trace was recorded for run `cuda` on prompt `p`");
    rec.greedy.clear();
    assert!(
        outcome(&c, &rec, "ev::GREEDY::p").detail.starts_with("no greedy decode was recorded for run `cuda`")
    );
}

#[test]
fn ignored_trials_count_nowhere() {
    let c = contract();
    let results: Vec<(TrialPlan, Option<TrialOutcome>)> = c.plan(2).into_iter().map(|t| (t, None)).collect();
    let summaries = summarize(&c, &results);
    assert!(summaries.iter().all(|s| s.total == 0 && s.passed == 0 && s.gate_holds));
}

fn gate_contract(gate: &str) -> Contract {
    let src = CONTRACT.replace(
        "per: [prompt, position], threshold: {max: 1.0e-3}}",
        &format!("per: [prompt, position], threshold: {{max: 1.0e-3}}, gate: {gate}}}"),
    );
    parse(&src, Path::new("ev.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

/// POS has one trial per position (2); `passed` of them pass.
fn pos_summary(c: &Contract, passed: usize) -> bool {
    let results: Vec<(TrialPlan, Option<TrialOutcome>)> = c
        .plan(2)
        .into_iter()
        .filter(|t| t.criterion == "POS")
        .enumerate()
        .map(|(i, t)| {
            (
                t,
                Some(TrialOutcome {
                    value: 0.0,
                    passed: i < passed,
                    detail: String::new(),
                    non_finite: None,
                }),
            )
        })
        .collect();
    summarize(c, &results).iter().find(|s| s.criterion == "POS").unwrap().gate_holds
}

#[test]
fn gate_forms_all_n_of_m_and_fraction() {
    let all = gate_contract("all");
    assert!(pos_summary(&all, 2) && !pos_summary(&all, 1));
    let half = gate_contract("\"1/2\"");
    assert!(pos_summary(&half, 1) && !pos_summary(&half, 0));
    let most = gate_contract("0.75");
    assert!(pos_summary(&most, 2) && !pos_summary(&most, 1));
    let fraction = gate_contract("0.5");
    assert!(pos_summary(&fraction, 1));
}

#[test]
fn ill_shaped_recordings_fail_without_panicking() {
    let c = contract();
    let mut cuda = trace("cuda");
    cuda.logits = Matrix::from_f64(2, 0, vec![]);
    cuda.layers[0].router_experts.clear();
    cuda.layers[1].hidden = Matrix::from_f64(1, 3, vec![1.0, 2.0, 3.0]);
    let rec = recorded(cuda);
    for (name, words) in [
        ("ev::ARG::p", "run `cuda`: `logits` has 2 rows of 0 for 2 tokens"),
        ("ev::TOPK::p::layer00", "run `cuda`: `router_experts.0` holds 0 ids for 2 tokens"),
        ("ev::HID::p::layer01", "run `cuda`: `hidden.1` has 1 rows of 3 for 2 tokens"),
    ] {
        let out = outcome(&c, &rec, name);
        assert!(!out.passed && out.value.is_nan(), "{name}");
        assert_eq!(out.detail, words);
    }
}

/// error_ratio: cuda against the f64 reference, relative to cpu, per layer, per prompt (worst layer) and
/// on the logits.
const ERROR_RATIO_CONTRACT: &str = "\
contract: er
version: 1.0.0
status: active
title: error ratios on hand-built traces
model: synth:small
smoke_model: synth:tiny
prompts:
  - {id: p, tokens: [7, 8]}
runs:
  cpu: {backend: cpu}
  cuda: {backend: cuda}
  f64: {backend: reference}
criteria:
  - {id: ER, title: r, compare: [cuda, cpu], reference: f64, tap: hidden, metric: error_ratio, per: [prompt, layer], threshold: {max: 1.5}}
  - {id: ERP, title: w, compare: [cuda, cpu], reference: f64, tap: hidden, metric: error_ratio, threshold: {max: 1.5}}
  - {id: ERL, title: l, compare: [cuda, cpu], reference: f64, tap: logits, metric: error_ratio, threshold: {max: 1.5}}
amendments:
  - {version: 1.0.0, date: 2026-11-29, kind: created, summary: test}
";

/// The reference is `trace`; cpu and cuda move some values by binary fractions, so every difference and
/// norm below is exact: layer 0, cpu (+3/8, +1/2) (error 5/8), cuda +3/4 (error 3/4), ratio 1.2; layer
/// 1, cpu +1/4 (error 1/4), cuda (+3/4, +1) (error 5/4), ratio 5. The logits stay exact on both sides.
fn error_ratio_recording() -> Recorded {
    let mut cpu = trace("cpu");
    cpu.layers[0].hidden.data[0] += 0.375;
    cpu.layers[0].hidden.data[1] += 0.5;
    cpu.layers[1].hidden.data[3] += 0.25;
    let mut cuda = trace("cuda");
    cuda.layers[0].hidden.data[5] += 0.75;
    cuda.layers[1].hidden.data[0] += 0.75;
    cuda.layers[1].hidden.data[2] += 1.0;
    let mut rec = Recorded::default();
    for (run, t) in [("cuda", cuda), ("cpu", cpu), ("f64", trace("reference"))] {
        rec.traces.insert((run.to_string(), "p".to_string()), t);
    }
    rec
}

#[test]
fn error_ratio_trials_read_the_reference_and_compare_distances_per_layer() {
    let c = parse(ERROR_RATIO_CONTRACT, Path::new("er.yaml")).unwrap_or_else(|e| panic!("{e}"));
    // The reference run is read by every trial, so the gate records it.
    assert!(c.plan(2).iter().all(|t| t.runs == ["cuda", "cpu", "f64"]));
    assert!(c.needed_forwards().contains(&("f64".to_string(), "p".to_string())));
    let rec = error_ratio_recording();

    let layer0 = outcome(&c, &rec, "er::ER::p::layer00");
    assert_eq!(layer0.value, 0.75 / 0.625);
    assert!(layer0.passed, "{}", layer0.detail);
    assert_eq!(
        layer0.detail,
        "error_ratio 1.2000e0 (max 1.5): ‖cuda - f64‖ = 7.5000e-1, ‖cpu - f64‖ = 6.2500e-1"
    );
    let layer1 = outcome(&c, &rec, "er::ER::p::layer01");
    assert_eq!(layer1.value, 5.0);
    assert!(!layer1.passed);
    let worst = outcome(&c, &rec, "er::ERP::p");
    assert_eq!(worst.value, 5.0);
    assert!(worst.detail.contains("worst at layer 1 of 2"), "{}", worst.detail);

    // Both logits reproduce the reference exactly: 0, a pass.
    let logits = outcome(&c, &rec, "er::ERL::p");
    assert_eq!((logits.value, logits.passed), (0.0, true), "{}", logits.detail);
}

#[test]
fn error_ratio_against_an_exact_baseline_fails_any_candidate_error() {
    let c = parse(ERROR_RATIO_CONTRACT, Path::new("er.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let mut rec = error_ratio_recording();
    rec.traces.get_mut(&("cuda".to_string(), "p".to_string())).unwrap().logits.data[1] += 1.0 / 1024.0;
    let out = outcome(&c, &rec, "er::ERL::p");
    assert_eq!(out.value, f64::INFINITY);
    assert!(!out.passed);
    assert!(out.detail.contains("run `cpu` reproduces `f64` exactly"), "{}", out.detail);
}

#[test]
fn error_ratio_without_the_reference_recording_or_with_a_nan_in_it_fails() {
    let c = parse(ERROR_RATIO_CONTRACT, Path::new("er.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let mut rec = error_ratio_recording();
    let key = ("f64".to_string(), "p".to_string());
    rec.traces.get_mut(&key).unwrap().layers[1].hidden.data[4] = f64::NAN;
    let out = outcome(&c, &rec, "er::ER::p::layer01");
    assert!(!out.passed && out.value.is_nan());
    assert_eq!(out.non_finite.as_deref(), Some("run `f64`, prompt `p`: hidden.1[1, 1] is NaN"));
    rec.traces.remove(&key);
    let out = outcome(&c, &rec, "er::ER::p::layer00");
    assert!(!out.passed);
    assert_eq!(out.detail, "no trace was recorded for run `f64` on prompt `p`");
}

/// One criterion of every metric, each reading what the NaN test below poisons.
const EVERY_METRIC: &str = "\
contract: nan
version: 1.0.0
status: active
title: every metric on a non-finite value
model: synth:small
smoke_model: synth:tiny
prompts:
  - {id: p, tokens: [7, 8]}
runs:
  cpu: {backend: cpu}
  cuda: {backend: cuda}
  reference: {backend: reference}
criteria:
  - {id: COS, title: t, compare: [cuda, cpu], tap: hidden, metric: cosine, per: [prompt, layer], threshold: {min: 0.9}}
  - {id: NMSE, title: t, compare: [cuda, cpu], tap: hidden, metric: nmse, per: [prompt, layer], threshold: {max: 1.0}}
  - {id: MAX, title: t, compare: [cuda, cpu], tap: hidden, metric: max_abs, per: [prompt, layer], threshold: {max: 1.0}}
  - {id: RATIO, title: t, compare: [cuda, cpu], reference: reference, tap: hidden, metric: error_ratio, per: [prompt, layer], threshold: {max: 1.5}}
  - {id: BITS, title: t, compare: [cuda, cpu], tap: hidden, metric: bitwise, per: [prompt, layer]}
  - {id: KLD, title: t, compare: [cuda, cpu], tap: logits, metric: kld, threshold: {max: 0.01}}
  - {id: ARG, title: t, compare: [cuda, cpu], tap: logits, metric: argmax}
  - {id: TOPK, title: t, compare: [cuda, cpu], tap: router_experts, metric: topk_set, per: [prompt, layer]}
  - {id: GREEDY, title: t, compare: [cuda, cpu], tap: logits, metric: greedy, steps: 3}
amendments:
  - {version: 1.0.0, date: 2026-12-02, kind: created, summary: test}
";

#[test]
fn a_non_finite_value_fails_the_trial_of_every_metric_that_reads_it() {
    let c = parse(EVERY_METRIC, Path::new("nan.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let mut cuda = trace("cuda");
    cuda.layers[0].hidden.data[1] = f64::NAN; // hidden.0[0, 1]
    cuda.layers[0].router_logits.data[3] = f64::INFINITY; // router_logits.0[0, 3]: the experts' source
    cuda.logits.data[3] = f64::NAN; // logits[1, 1]: the last position, which argmax reads
    let mut rec = recorded(cuda);
    // A NaN logit outside the top-5 of greedy step 2: only the step's flag records it.
    let steps: Vec<GreedyStep> = [3, 4, 5]
        .into_iter()
        .map(|t| GreedyStep::new(t, vec![(t, 5.0)], &[1.0, 5.0, if t == 5 { f32::NAN } else { 0.0 }]))
        .collect();
    assert_eq!(steps[2].non_finite.map(|(t, _)| t), Some(2));
    rec.greedy.insert(("cuda".into(), "p".into()), steps);
    let cases = [
        ("COS::p::layer00", "hidden.0[0, 1] is NaN"),
        ("NMSE::p::layer00", "hidden.0[0, 1] is NaN"),
        ("MAX::p::layer00", "hidden.0[0, 1] is NaN"),
        ("RATIO::p::layer00", "hidden.0[0, 1] is NaN"),
        ("BITS::p::layer00", "hidden.0[0, 1] is NaN"),
        ("KLD::p", "logits[1, 1] is NaN"),
        ("ARG::p", "logits[1, 1] is NaN"),
        ("TOPK::p::layer00", "router_logits.0[0, 3] is inf"),
        ("GREEDY::p", "greedy step 2, the logit of token 2 is NaN"),
    ];
    for (trial, location) in cases {
        let out = outcome(&c, &rec, &format!("nan::{trial}"));
        assert!(!out.passed && out.value.is_nan(), "{trial}: {out:?}");
        let found =
            out.non_finite.unwrap_or_else(|| panic!("{trial}: no non-finite location in {:?}", out.detail));
        assert!(found.contains(location), "{trial}: {found:?} should contain {location:?}");
    }
    // Layer 1 is finite everywhere: its trials pass, so the failures above are the NaN's, not the data's.
    for trial in ["COS::p::layer01", "NMSE::p::layer01", "BITS::p::layer01", "TOPK::p::layer01"] {
        assert!(outcome(&c, &rec, &format!("nan::{trial}")).passed, "{trial}");
    }
}
