//! `mode: isolated` criteria and the `ties:` rule on hand-built traces: an isolated trial reads the
//! candidate's layers run on the baseline's inputs, sets aside a position whose expert swap the reference
//! certifies as a tie, and fails on a swap it does not; topk_set reads the reference only where sets differ.

use std::path::Path;

use moe_contracts::{Contract, Mode, Recorded, TiePolicy, TrialOutcome, evaluate, parse, ties};
use moe_engine::trace::{LayerTrace, Matrix, Precision, Trace};

const CONTRACT: &str = "\
contract: iso
version: 1.0.0
status: active
title: isolated criteria on hand-built traces
model: synth:small
smoke_model: synth:tiny
prompts:
  - {id: p, tokens: [7, 8]}
runs:
  cpu: {backend: cpu}
  cuda: {backend: cuda}
  reference: {backend: reference}
ties: {margin: 1.0e-3}
criteria:
  - {id: ISO, title: i, mode: isolated, compare: [cuda, cpu], tap: hidden, metric: nmse, per: [prompt, layer], threshold: {max: 1.0e-9}}
  - {id: ISOSET, title: s, mode: isolated, compare: [cuda, cpu], tap: router_experts, metric: topk_set, per: [prompt, layer]}
  - {id: ACC, title: a, compare: [cuda, cpu], tap: hidden, metric: nmse, per: [prompt, layer], threshold: {max: 1.0e-9}}
amendments:
  - {version: 1.0.0, date: 2026-12-02, kind: created, summary: test}
";

fn contract() -> Contract {
    parse(CONTRACT, Path::new("iso.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

/// Two tokens, two layers, hidden 3, 4 experts top-2. Router logits: row 0 puts experts 1 and 2 at
/// probabilities 0.2061 and 0.2060 (8.2e-5 apart, a tie under the contract's 1e-3); row 1 puts them at
/// 0.237 and 0.087 (0.15 apart).
fn trace(backend: &str) -> Trace {
    let mut t = Trace::new("synth:test", backend, "fast", Precision::F32);
    t.tokens = vec![7, 8];
    for l in 0..2 {
        let base = l as f64;
        t.layers.push(LayerTrace {
            hidden: Matrix::from_f64(2, 3, vec![1.0 + base, 2.0, 3.0, -1.0, 0.5, 2.0 + base]),
            router_logits: Matrix::from_f64(2, 4, vec![2.0, 1.0, 0.9996, -1.0, 2.0, 1.0, 0.0, -1.0]),
            router_experts: vec![0, 1, 0, 1],
            router_weights: Matrix::from_f64(2, 2, vec![0.7, 0.3, 0.7, 0.3]),
        });
    }
    t.logits = Matrix::from_f64(2, 2, vec![0.0, 1.0, 0.0, 1.0]);
    t
}

/// cpu and cuda identical as forwards; `isolated` is cuda's layers on cpu's inputs; the reference is
/// recorded only when `with_reference`.
fn recorded(isolated: Trace, with_reference: bool) -> Recorded {
    let mut rec = Recorded::default();
    rec.traces.insert(("cpu".into(), "p".into()), trace("cpu"));
    rec.traces.insert(("cuda".into(), "p".into()), trace("cuda"));
    if with_reference {
        rec.tie_references.insert("p".into(), trace("reference"));
    }
    rec.isolated.insert(("cuda".into(), "cpu".into(), "p".into()), isolated);
    rec
}

fn outcome(c: &Contract, rec: &Recorded, name: &str) -> TrialOutcome {
    let trial = c.plan(2).into_iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no trial {name}"));
    evaluate(c, &trial, rec)
}

#[test]
fn the_contract_reads_mode_and_ties() {
    let c = contract();
    assert_eq!(c.criterion("ISO").unwrap().mode, Mode::Isolated);
    assert_eq!(c.criterion("ACC").unwrap().mode, Mode::Accumulated);
    assert_eq!(c.ties.margin, 1e-3);
    assert_eq!(c.ties.policy, TiePolicy::Excuse, "the default");
    assert_eq!(c.ties.isolated_nmse, moe_contracts::Ties::DEFAULT_ISOLATED_NMSE);
    assert_eq!(ties::reference_run(&c), "reference", "the run named reference");
}

#[test]
fn an_isolated_trial_reads_the_isolated_layers_not_the_forward() {
    let c = contract();
    let mut iso = trace("cuda");
    // Layer 1 of cuda on cpu's input: row 1 off by 1 % of its norm; the forward itself is identical.
    iso.layers[1].hidden.data[3] += 0.03;
    let rec = recorded(iso, false);
    let bad = outcome(&c, &rec, "iso::ISO::p::layer01");
    assert!(!bad.passed, "{}", bad.detail);
    // nmse = 0.03^2 / (2^2 + 2^2 + 3^2 + 1 + 0.25 + 3^2) = 9e-4 / 27.25.
    assert!((bad.value - 9e-4 / 27.25).abs() < 1e-15, "{}", bad.value);
    assert!(outcome(&c, &rec, "iso::ISO::p::layer00").passed);
    assert!(outcome(&c, &rec, "iso::ACC::p::layer01").passed, "the accumulated trial reads the forward");
}

#[test]
fn a_swap_the_reference_certifies_is_set_aside_and_one_it_does_not_fails() {
    let c = contract();
    // Position 0 of layer 1 swaps expert 1 for 2 (reference gap 8.2e-5 < 1e-3): its row moves by the
    // swapped expert; position 1 is exact.
    let mut tie = trace("cuda");
    tie.layers[1].router_experts = vec![0, 2, 0, 1];
    tie.layers[1].hidden.data[..3].copy_from_slice(&[2.5, 1.0, 3.3]);
    let rec = recorded(tie, true);
    let o = outcome(&c, &rec, "iso::ISO::p::layer01");
    assert!(o.passed, "{}", o.detail);
    assert_eq!(o.value, 0.0, "the remaining position is exact");
    assert!(
        o.detail.contains("certified router ties") && o.detail.contains("layer 1 position 0"),
        "{}",
        o.detail
    );
    let set = outcome(&c, &rec, "iso::ISOSET::p::layer01");
    assert!(set.passed && set.detail.contains("1 certified ties"), "{}", set.detail);

    // Without the reference the same swap cannot be certified.
    let mut tie = trace("cuda");
    tie.layers[1].router_experts = vec![0, 2, 0, 1];
    let o = outcome(&c, &recorded(tie, false), "iso::ISO::p::layer01");
    assert!(!o.passed && o.detail.contains("no trace of reference run"), "{}", o.detail);

    // Position 1 swaps expert 1 for 2, which the reference separates by 0.15: a routing defect.
    let mut swap = trace("cuda");
    swap.layers[1].router_experts = vec![0, 1, 0, 2];
    let rec = recorded(swap, true);
    let o = outcome(&c, &rec, "iso::ISO::p::layer01");
    assert!(!o.passed && o.detail.contains("not a tie"), "{}", o.detail);
    let set = outcome(&c, &rec, "iso::ISOSET::p::layer01");
    assert!(!set.passed && set.value == 1.0, "{}", set.detail);
}

#[test]
fn a_criterion_that_cannot_be_isolated_is_refused() {
    let bad = CONTRACT.replace(
        "{id: ACC, title: a, compare: [cuda, cpu], tap: hidden,",
        "{id: ACC, title: a, mode: isolated, compare: [cuda, cpu], tap: logits, metric: argmax} #",
    );
    let e = parse(&bad, Path::new("iso.yaml")).unwrap_err().to_string();
    assert!(e.contains("`mode: isolated`") && e.contains("tap logits has no layers"), "{e}");
    let bad = CONTRACT.replace("ties: {margin: 1.0e-3}", "ties: {margin: 2.0}");
    let e = parse(&bad, Path::new("iso.yaml")).unwrap_err().to_string();
    assert!(e.contains("ties.margin: 2") && e.contains("outside (0, 1)"), "{e}");
    let bad = CONTRACT.replace("ties: {margin: 1.0e-3}", "ties: {reference: cpu}");
    let e = parse(&bad, Path::new("iso.yaml")).unwrap_err().to_string();
    assert!(e.contains("only a reference run can certify a tie"), "{e}");
}
