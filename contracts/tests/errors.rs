//! Every class of contract error, each from a broken copy of one valid contract, with the exact
//! `file:line:col` it must point at and what its message must say.

use std::path::Path;

use moe_contracts::{ContractError, parse};

/// A valid contract; each case below breaks one thing in it. Line numbers are in the comments.
const BASE: &str = "\
contract: t
version: 1.1.0
status: active
title: test
model: synth:small
smoke_model: synth:tiny
prompts:
  - {id: a, tokens: [1, 2, 3]}
  - {id: g, count: 3, min_len: 1, max_len: 4, seed: 1}
runs:
  cpu: {backend: cpu}
  cuda: {backend: cuda, policy: fast}
  reference: {backend: reference}
criteria:
  - id: C1
    title: layers
    compare: [cuda, cpu]
    tap: hidden
    metric: cosine
    per: [prompt, layer]
    threshold: {min: 0.99}
    gate: all
  - {id: C2, title: experts, compare: [cuda, cpu], tap: router_experts, metric: topk_set, tie_margin: 1.0e-5}
  - {id: C3, title: tokens, compare: [cuda, cpu], tap: logits, metric: greedy, steps: 8, prompts: [a]}
known_divergences:
  - {criterion: C1, where: {prompt: a, layer: 1}, status: benign, strict: true, note: tie}
amendments:
  - {version: 1.1.0, date: 2026-11-29, kind: tightened, summary: tighter}
  - {version: 1.0.0, date: 2026-11-28, kind: created, summary: first}
";

fn broken(find: &str, replace: &str) -> String {
    assert!(BASE.contains(find), "test bug: `{find}` is not in the base contract");
    BASE.replacen(find, replace, 1)
}

fn error_of(src: &str) -> ContractError {
    parse(src, Path::new("test.yaml")).expect_err("the broken contract must be rejected")
}

/// (what is broken, text to find, its replacement, `file:line:col` expected, words the message must hold)
const CASES: &[(&str, &str, &str, &str, &str)] = &[
    // Schema errors, located by serde-saphyr.
    (
        "unknown field",
        "    gate: all\n",
        "    gate: all\n    bogus: 1\n",
        "test.yaml:23:5",
        "unknown field `bogus`",
    ),
    ("unknown metric", "metric: cosine", "metric: cosin", "test.yaml:19:13", "unknown variant `cosin`"),
    ("unknown status", "status: active", "status: live", "test.yaml:3:9", "unknown variant `live`"),
    ("missing field", "title: test\n", "", "test.yaml:26:1", "missing field `title`"),
    ("yaml syntax", "tokens: [1, 2, 3]}", "tokens: [1, 2, 3}", "test.yaml:8:21", "mismatched bracket"),
    (
        "duplicate run id",
        "  reference: {backend: reference}",
        "  cpu: {backend: reference}",
        "test.yaml:13:3",
        "duplicate",
    ),
    ("negative layer", "layer: 1}", "layer: -1}", "test.yaml:26:47", "invalid u64"),
    ("gate N > M", "    gate: all", "    gate: \"5/4\"", "test.yaml:22:11", "gate `5/4` needs 1 <= N <= M"),
    (
        "gate fraction",
        "    gate: all",
        "    gate: 1.5",
        "test.yaml:22:11",
        "gate fraction 1.5 is outside (0, 1]",
    ),
    ("gate word", "    gate: all", "    gate: most", "test.yaml:22:11", "gate `most` is not `all`"),
    // Semantic errors, located at the offending value.
    (
        "version not semver",
        "version: 1.1.0",
        "version: 1.1",
        "test.yaml:2:10",
        "`1.1` is not a semantic version",
    ),
    (
        "newest amendment differs",
        "version: 1.1.0",
        "version: 1.2.0",
        "test.yaml:28:15",
        "the newest amendment is 1.1.0, but the contract's version is 1.2.0",
    ),
    (
        "amendments out of order",
        "{version: 1.0.0, date: 2026-11-28",
        "{version: 1.2.0, date: 2026-11-28",
        "test.yaml:29:15",
        "amendment 1.2.0 is listed after 1.1.0",
    ),
    (
        "dates out of order",
        "date: 2026-11-28",
        "date: 2026-11-30",
        "test.yaml:29:28",
        "is dated after the newer",
    ),
    (
        "not a date",
        "date: 2026-11-28",
        "date: 2026-02-30",
        "test.yaml:29:28",
        "date `2026-02-30` is not a calendar date",
    ),
    (
        "created not oldest",
        "kind: tightened",
        "kind: created",
        "test.yaml:28:46",
        "amendment 1.1.0 is `created` but is not the oldest",
    ),
    (
        "loosened without major bump",
        "kind: tightened",
        "kind: loosened",
        "test.yaml:28:15",
        "loosening amendment 1.1.0 keeps major version 1",
    ),
    ("duplicate criterion id", "{id: C3,", "{id: C2,", "test.yaml:24:10", "criterion id `C2` is used twice"),
    (
        "generated id collides",
        "{id: a, tokens",
        "{id: g_01, tokens",
        "test.yaml:9:10",
        "prompt id `g_01` is used twice",
    ),
    (
        "id with ::",
        "{id: a, tokens",
        "{id: \"a::b\", tokens",
        "test.yaml:8:10",
        "prompt id `a::b` contains `:`",
    ),
    (
        "explicit token beyond vocab",
        "tokens: [1, 2, 3]",
        "tokens: [1, 151936, 3]",
        "test.yaml:8:25",
        "token 151936 of prompt `a` is outside the vocabulary",
    ),
    ("empty prompt", "tokens: [1, 2, 3]", "tokens: []", "test.yaml:8:21", "prompt `a` has no tokens"),
    (
        "tokens and generator",
        "{id: a, tokens: [1, 2, 3]}",
        "{id: a, tokens: [1], seed: 3}",
        "test.yaml:8:10",
        "has both `tokens` and generator fields",
    ),
    (
        "generator incomplete",
        "count: 3, min_len: 1, max_len: 4, seed: 1",
        "count: 3, min_len: 1, max_len: 4",
        "test.yaml:9:10",
        "has neither `tokens`, `text` nor all of",
    ),
    (
        "max_len < min_len",
        "min_len: 1, max_len: 4",
        "min_len: 5, max_len: 4",
        "test.yaml:9:44",
        "`max_len: 4` is outside 5..=4096",
    ),
    ("count 0", "count: 3", "count: 0", "test.yaml:9:20", "`count: 0` is outside 1..=10000"),
    (
        "vocab too large",
        "seed: 1}",
        "seed: 1, vocab: 200000}",
        "test.yaml:9:63",
        "`vocab: 200000` is outside 1..=151936",
    ),
    (
        "unknown backend",
        "{backend: cuda, policy",
        "{backend: rocm, policy",
        "test.yaml:12:19",
        "unknown backend `rocm`; use one of: reference, cpu, cuda",
    ),
    (
        "unknown policy",
        "policy: fast",
        "policy: quick",
        "test.yaml:12:33",
        "unknown policy `quick`; use one of: fast, exact",
    ),
    (
        "compare unknown run",
        "compare: [cuda, cpu]\n    tap: hidden",
        "compare: [cuda, cpu2]\n    tap: hidden",
        "test.yaml:17:21",
        "run `cpu2` is not declared under `runs`",
    ),
    (
        "compare one run twice",
        "compare: [cuda, cpu]\n    tap: hidden",
        "compare: [cpu, cpu]\n    tap: hidden",
        "test.yaml:17:20",
        "`compare` names `cpu` twice",
    ),
    (
        "compare three runs",
        "compare: [cuda, cpu]\n    tap: hidden",
        "compare: [cuda, cpu, reference]\n    tap: hidden",
        "test.yaml:17:14",
        "`compare` lists 3 runs",
    ),
    (
        "cosine on expert ids",
        "tap: hidden",
        "tap: router_experts",
        "test.yaml:19:13",
        "metric cosine cannot compare tap router_experts",
    ),
    (
        "topk_set on hidden",
        "tap: router_experts, metric: topk_set",
        "tap: hidden, metric: topk_set",
        "test.yaml:23:73",
        "metric topk_set cannot compare tap hidden; use tap router_experts",
    ),
    (
        "greedy on hidden",
        "tap: logits, metric: greedy",
        "tap: hidden, metric: greedy",
        "test.yaml:24:72",
        "metric greedy cannot compare tap hidden; use tap logits",
    ),
    (
        "per layer on logits",
        "metric: greedy, steps: 8,",
        "metric: argmax, per: [prompt, layer],",
        "test.yaml:24:94",
        "tap logits has no layers",
    ),
    ("per without prompt", "per: [prompt, layer]", "per: [layer]", "test.yaml:20:10", "`per` lacks `prompt`"),
    (
        "greedy per position",
        "steps: 8,",
        "steps: 8, per: [prompt, position],",
        "test.yaml:24:104",
        "greedy decoding is judged once per prompt",
    ),
    (
        "cosine without threshold",
        "    threshold: {min: 0.99}\n",
        "",
        "test.yaml:19:13",
        "metric cosine needs a threshold",
    ),
    (
        "cosine bounded by max",
        "{min: 0.99}",
        "{max: 0.99}",
        "test.yaml:21:16",
        "metric cosine is bounded by `min` only",
    ),
    ("cosine beyond 1", "{min: 0.99}", "{min: 1.5}", "test.yaml:21:16", "cosine min 1.5 is outside [-1, 1]"),
    (
        "nmse bounded by min",
        "metric: cosine",
        "metric: nmse",
        "test.yaml:21:16",
        "metric nmse is bounded by `max` only",
    ),
    (
        "nmse below 0",
        "metric: cosine\n    per: [prompt, layer]\n    threshold: {min: 0.99}",
        "metric: nmse\n    per: [prompt, layer]\n    threshold: {max: -1.0}",
        "test.yaml:21:16",
        "nmse max -1 is negative, so nothing could pass",
    ),
    (
        "threshold on topk_set",
        "tie_margin: 1.0e-5}",
        "tie_margin: 1.0e-5, threshold: {max: 0}}",
        "test.yaml:23:122",
        "metric topk_set takes no threshold",
    ),
    (
        "greedy without steps",
        "metric: greedy, steps: 8,",
        "metric: greedy,",
        "test.yaml:24:72",
        "metric greedy needs `steps`",
    ),
    (
        "steps on topk_set",
        "tie_margin: 1.0e-5}",
        "tie_margin: 1.0e-5, steps: 3}",
        "test.yaml:23:118",
        "`steps` only applies to metric greedy",
    ),
    (
        "tie margin on cosine",
        "    gate: all\n",
        "    gate: all\n    tie_margin: 0.1\n",
        "test.yaml:23:17",
        "`tie_margin` only applies to metric topk_set",
    ),
    (
        "tie margin out of range",
        "tie_margin: 1.0e-5",
        "tie_margin: 2",
        "test.yaml:23:103",
        "`tie_margin: 2` is outside (0, 1)",
    ),
    (
        "tie margin without reference",
        "  reference: {backend: reference}\n",
        "",
        "test.yaml:22:103",
        "`tie_margin` needs a reference run",
    ),
    (
        "unknown reference run",
        "tie_margin: 1.0e-5}",
        "tie_margin: 1.0e-5, reference: ref}",
        "test.yaml:23:122",
        "run `ref` is not declared under `runs`",
    ),
    (
        "error_ratio without reference",
        "metric: cosine\n    per: [prompt, layer]\n    threshold: {min: 0.99}",
        "metric: error_ratio\n    per: [prompt, layer]\n    threshold: {max: 1.5}",
        "test.yaml:19:13",
        "metric error_ratio needs `reference`",
    ),
    (
        "error_ratio against a compared run",
        "metric: cosine\n    per: [prompt, layer]\n    threshold: {min: 0.99}",
        "metric: error_ratio\n    per: [prompt, layer]\n    threshold: {max: 1.5}\n    reference: cpu",
        "test.yaml:22:16",
        "measures both compared runs against `cpu`, which is one of them",
    ),
    (
        "error_ratio bounded by 0",
        "metric: cosine\n    per: [prompt, layer]\n    threshold: {min: 0.99}",
        "metric: error_ratio\n    per: [prompt, layer]\n    threshold: {max: 0}\n    reference: reference",
        "test.yaml:21:16",
        "error_ratio max 0 would pass only a candidate that reproduces the reference exactly",
    ),
    (
        "error_ratio on router weights",
        "tap: hidden\n    metric: cosine\n    per: [prompt, layer]\n    threshold: {min: 0.99}",
        "tap: router_weights\n    metric: error_ratio\n    per: [prompt, layer]\n    threshold: {max: 1.5}",
        "test.yaml:19:13",
        "metric error_ratio cannot compare tap router_weights; use tap hidden, router_logits or logits",
    ),
    (
        "criterion selects unknown prompt",
        "prompts: [a]",
        "prompts: [b]",
        "test.yaml:24:100",
        "prompt `b` is not declared under `prompts`",
    ),
    (
        "criterion selects nothing",
        "prompts: [a]",
        "prompts: []",
        "test.yaml:24:99",
        "`prompts: []` selects no prompt",
    ),
    (
        "divergence of unknown criterion",
        "{criterion: C1,",
        "{criterion: C9,",
        "test.yaml:26:17",
        "criterion `C9`, which the contract does not have; use one of: C1, C2, C3",
    ),
    (
        "divergence of unknown prompt",
        "{prompt: a, layer",
        "{prompt: z, layer",
        "test.yaml:26:37",
        "prompt `z` is not declared under `prompts`",
    ),
    (
        "divergence layer without per layer",
        "{criterion: C1, where: {prompt: a, layer: 1}",
        "{criterion: C3, where: {prompt: a, layer: 1}",
        "test.yaml:26:47",
        "criterion `C3` has no trial per layer",
    ),
    (
        "divergence layers without per layer",
        "{criterion: C1, where: {prompt: a, layer: 1}",
        "{criterion: C3, where: {prompt: a, layers: {from: 2}}",
        "test.yaml:26:48",
        "criterion `C3` has no trial per layer, so a divergence at layers 2 and later never matches",
    ),
    (
        "divergence layer and layers",
        "layer: 1}",
        "layer: 1, layers: {from: 1, to: 2}}",
        "test.yaml:26:58",
        "`where` has both `layer` and `layers`",
    ),
    (
        "divergence layers empty",
        "layer: 1}",
        "layers: {}}",
        "test.yaml:26:48",
        "`layers` gives neither `from` nor `to`",
    ),
    (
        "divergence layers reversed",
        "layer: 1}",
        "layers: {from: 3, to: 1}}",
        "test.yaml:26:48",
        "`layers` runs from 3 down to 1; give `from` <= `to`",
    ),
    (
        "divergence layers unknown field",
        "layer: 1}",
        "layers: {from: 1, upto: 2}}",
        "test.yaml:26:",
        "unknown field `upto`",
    ),
    (
        "divergence prompt outside criterion",
        "{criterion: C1, where: {prompt: a, layer: 1}",
        "{criterion: C3, where: {prompt: g}",
        "test.yaml:26:37",
        "criterion `C3` does not run prompt `g`",
    ),
    (
        "divergence status",
        "status: benign",
        "status: fine",
        "test.yaml:26:59",
        "unknown known-divergence status `fine`; use one of: benign, not_benign, investigating",
    ),
    (
        "divergence listed twice",
        "known_divergences:\n",
        "known_divergences:\n  - {criterion: C1, where: {prompt: a, layer: 1}, status: benign, note: again}\n",
        "test.yaml:27:17",
        "listed twice",
    ),
];

#[test]
fn the_base_contract_is_valid() {
    let c = parse(BASE, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.criteria.len(), 3);
    assert_eq!(c.known_divergences.len(), 1);
}

#[test]
fn every_error_names_the_line_and_column_and_what_is_wrong() {
    let mut failures = Vec::new();
    for &(what, find, replace, at, words) in CASES {
        let message = error_of(&broken(find, replace)).to_string();
        if !message.starts_with(at) || !message.contains(words) {
            failures.push(format!("{what}: expected `{at}` ... `{words}`, got\n    {message}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn every_error_says_what_to_do() {
    for &(what, find, replace, _, _) in CASES {
        let message = error_of(&broken(find, replace)).to_string();
        let (_, hint) = message.rsplit_once("; ").unwrap_or_else(|| panic!("{what}: no hint in `{message}`"));
        assert!(hint.len() > 5, "{what}: hint `{hint}` is too short");
    }
}

#[test]
fn a_snippet_shows_the_line_with_a_caret_under_the_column() {
    let err = error_of(&broken("metric: cosine", "metric: cosin"));
    assert_eq!(err.snippet().unwrap(), "19 |     metric: cosin\n   |             ^");
}

#[test]
fn load_checks_the_id_against_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other-name.yaml");
    std::fs::write(&path, BASE).unwrap();
    let message = moe_contracts::load(&path).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "{}:1:11: contract id `t` differs from the file name `other-name`",
            path.display()
        )),
        "{message}"
    );
}

#[test]
fn a_missing_file_says_which_and_what_to_do() {
    let message = moe_contracts::load(Path::new("/nonexistent/contracts/x.yaml")).unwrap_err().to_string();
    assert!(message.starts_with("/nonexistent/contracts/x.yaml: cannot read the contract"), "{message}");
    assert!(message.contains("check the path"), "{message}");
}
