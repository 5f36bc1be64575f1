//! Trial planning: names, layers and positions, known divergences matched by prompt, set or layer, and
//! what the smoke model drops.

use std::path::Path;

use moe_contracts::{Contract, parse};

const CONTRACT: &str = "\
contract: pl
version: 2.0.0
status: draft
title: planning
model: synth:small
smoke_model: synth:tiny
prompts:
  - {id: a, tokens: [1, 2, 3]}
  - {id: gen, count: 2, min_len: 2, max_len: 2, seed: 5, vocab: 100, only_on: model}
runs:
  cpu: {backend: cpu}
  ref64: {backend: reference}
criteria:
  - {id: L, title: l, compare: [cpu, ref64], tap: hidden, metric: max_abs, per: [prompt, layer], threshold: {max: 1}}
  - {id: LP, title: lp, compare: [cpu, ref64], tap: router_logits, metric: nmse, per: [layer, prompt, position], threshold: {max: 1}}
  - {id: G, title: g, compare: [cpu, ref64], tap: logits, metric: kld, threshold: {max: 1}, prompts: [gen]}
known_divergences:
  - {criterion: L, where: {prompt: gen, layer: 1}, status: investigating, note: whole set at layer 1,
     reason: every generated prompt diverges there}
  - {criterion: G, where: {prompt: gen_01}, status: benign, strict: true, note: one prompt}
amendments:
  - {version: 2.0.0, date: 2026-11-29, kind: loosened, summary: 'looser bound, so a major version'}
  - {version: 1.0.0, date: 2026-11-20, kind: created, summary: first}
";

fn contract() -> Contract {
    parse(CONTRACT, Path::new("pl.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn trials_are_named_by_prompt_layer_and_position() {
    let c = contract();
    let plan = c.plan(2);
    let names: Vec<&str> = plan.iter().filter(|t| t.prompt == "a").map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pl::L::a::layer00",
            "pl::L::a::layer01",
            "pl::LP::a::layer00::pos00",
            "pl::LP::a::layer00::pos01",
            "pl::LP::a::layer00::pos02",
            "pl::LP::a::layer01::pos00",
            "pl::LP::a::layer01::pos01",
            "pl::LP::a::layer01::pos02",
        ]
    );
    // 3 prompts (a, gen_00, gen_01) x 2 layers; (3 + 2 + 2) positions x 2 layers; G on gen only.
    assert_eq!(plan.len(), 6 + 14 + 2);
    assert!(plan.iter().all(|t| t.runs == ["cpu", "ref64"]));
}

#[test]
fn the_reference_defaults_to_the_only_reference_backend_run() {
    let c = contract();
    assert!(c.criteria.iter().all(|k| k.reference.as_deref() == Some("ref64")));
}

#[test]
fn known_divergences_match_by_set_prompt_and_layer() {
    let c = contract();
    let plan = c.plan(2);
    let expected: Vec<&str> = plan.iter().filter(|t| t.expected.is_some()).map(|t| t.name.as_str()).collect();
    assert_eq!(expected, ["pl::L::gen_00::layer01", "pl::L::gen_01::layer01", "pl::G::gen_01"]);
}

#[test]
fn the_smoke_model_drops_only_on_model_sets_and_their_trials() {
    let c = contract().for_model("synth:tiny");
    assert_eq!(c.expand_prompts().len(), 1);
    let g = c.criterion("G").unwrap();
    assert_eq!(g.prompts.as_deref(), Some(&[][..]), "G selected only the dropped set");
    let plan = c.plan(2);
    assert!(plan.iter().all(|t| t.criterion != "G" && t.prompt == "a"));
    assert_eq!(plan.len(), 2 + 6);
}

#[test]
fn needed_forwards_follow_each_criterion_s_prompts() {
    let c = contract();
    let forwards = c.needed_forwards();
    assert_eq!(forwards.len(), 6, "2 runs x 3 prompts, each once: {forwards:?}");
    assert_eq!(c.needed_runs(), ["cpu", "ref64"]);
}

#[test]
fn known_divergences_match_layer_ranges() {
    // `layers: {from, to}` covers from..=to; without `to`, every layer from `from` on (a divergence that a
    // router tie starts and the residual stream carries to the last layer); without `from`, from layer 0.
    let with = |layers: &str| {
        let src = CONTRACT
            .replace("where: {prompt: gen, layer: 1}", &format!("where: {{prompt: a, layers: {layers}}}"))
            .replace(",\n     reason: every generated prompt diverges there", "");
        let c = parse(&src, Path::new("pl.yaml")).unwrap_or_else(|e| panic!("{layers}: {e}"));
        let plan = c.plan(6);
        let layers: Vec<usize> = plan
            .iter()
            .filter(|t| t.criterion == "L" && t.expected.is_some())
            .map(|t| {
                assert_eq!(t.prompt, "a", "only prompt a is named");
                t.layer.expect("a per-layer trial")
            })
            .collect();
        layers
    };
    assert_eq!(with("{from: 2, to: 4}"), [2, 3, 4]);
    assert_eq!(with("{from: 3}"), [3, 4, 5]);
    assert_eq!(with("{to: 1}"), [0, 1]);
    assert_eq!(with("{from: 5, to: 5}"), [5]);
    assert_eq!(with("{from: 6}"), Vec::<usize>::new(), "a range past the model's layers matches nothing");
}

/// Issue 13 item 3: masks too broad to be safe are refused unless the entry says so. A `where.prompt`
/// naming a generated set, `where: all` or no `where` at all needs a `reason`; a `reason` on a narrow
/// entry is refused too, so the word always marks a broad mask (which the gate then lists in its `!!`
/// lines: tests/tests/end_to_end.rs `broad_masks_are_refused_unless_explicit_and_then_shown_above_the_verdict`).
#[test]
fn broad_masks_need_a_reason_and_narrow_ones_must_not_have_one() {
    let no_reason = ",\n     reason: every generated prompt diverges there";
    let cases = [
        (
            CONTRACT.replace(no_reason, ""),
            "`where.prompt: gen` names a prompt set, so the entry masks every prompt of it",
        ),
        (
            CONTRACT.replace(no_reason, "").replace("where: {prompt: gen, layer: 1}, ", ""),
            "without `where` would mask every trial of it",
        ),
        (
            CONTRACT.replace(no_reason, "").replace("where: {prompt: gen, layer: 1}", "where: all"),
            "`where: all` masks every trial of `L`",
        ),
        (CONTRACT.replace("note: one prompt}", "note: one prompt, reason: why}"), "this entry is narrow"),
    ];
    for (src, expected) in cases {
        let e = parse(&src, Path::new("pl.yaml")).expect_err(expected).to_string();
        assert!(e.contains(expected), "{e}\nshould contain {expected:?}");
    }
    let all = CONTRACT.replace("where: {prompt: gen, layer: 1}", "where: all");
    let c = parse(&all, Path::new("pl.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.plan(2).iter().filter(|t| t.criterion == "L").all(|t| t.expected.is_some()));
}
