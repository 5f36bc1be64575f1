//! End-to-end tests of `cargo moe-gate`: the binary on the fixture model (tests/fixtures/public-tiny,
//! HF transformers' float64 outputs are its ground truth elsewhere) with contracts written per test.
//! Exit codes are docs/architecture.md's: 0 every blocking gate holds, 101 a blocking gate failed, 2 not judged.

mod common;

use common::{CPU_CUDA_REF_RUNS, CPU_REF_RUNS, cuda_usable, fixture_model, gate_in, write_contract};
use moe_engine::trace::{Precision, Trace};

// Tolerances of the passing contract. The cpu backend (f32) is held to rel error <= 1e-4 against an f64
// forward on these fixtures (issue 2 item 7; it reaches ~1e-6). A relative error r gives
// cosine >= 1 - r^2/2 and nmse <= r^2, so cosine >= 0.99999 and nmse <= 1e-8 hold with margin while
// still failing any real defect (8-bit activation quantisation gives nmse ~1e-5).
const PASSING_CRITERIA: &str = "  - {id: HID, title: hidden states agree, compare: [cpu, reference], tap: hidden, metric: cosine,
     per: [prompt, layer], threshold: {min: 0.99999}, gate: all}
  - {id: LOGITS, title: logits agree, compare: [cpu, reference], tap: logits, metric: nmse,
     per: [prompt], threshold: {max: 1.0e-8}, gate: all}
  - {id: TOPK, title: same experts, compare: [cpu, reference], tap: router_experts, metric: topk_set,
     per: [prompt, layer], tie_margin: 1.0e-6, gate: all}
  - {id: ARG, title: same next token, compare: [cpu, reference], tap: logits, metric: argmax, per: [prompt], gate: all}
  - {id: GREEDY, title: same greedy tokens, compare: [cpu, reference], tap: logits, metric: greedy, steps: 4,
     per: [prompt], gate: all}";

/// No f32 forward reproduces an f64 one bit for bit, so `max_abs <= 0` on the hidden states must fail.
const IMPOSSIBLE_CRITERION: &str =
    "  - {id: EXACT, title: bit-exact hidden states, compare: [cpu, reference], tap: hidden,
     metric: max_abs, per: [prompt, layer], threshold: {max: 0.0}, gate: all}";

#[test]
fn passing_contract_exits_0_and_reports_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_contract(dir.path(), "e2e-pass-v1", CPU_REF_RUNS, PASSING_CRITERIA, "");
    let reports = dir.path().join("reports");
    let junit = dir.path().join("extra-junit.xml");
    let out = gate_in(
        dir.path(),
        &[
            "--contract",
            path.to_str().unwrap(),
            "--report-dir",
            reports.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.all());
    // 3 prompts x 2 layers (HID, TOPK) + 3 x 3 per-prompt criteria.
    assert!(out.stdout.contains("running 21 tests"), "{}", out.all());
    assert_eq!(out.trial("e2e-pass-v1::HID::p_long::layer01"), Some("ok"), "{}", out.all());
    assert!(out.stdout.contains("test result: ok. 21 passed; 0 failed"), "{}", out.all());
    for section in ["criteria", "per layer: worst value", "next token at the last position", "timings:"] {
        assert!(out.stdout.contains(section), "missing `{section}`:\n{}", out.all());
    }
    assert!(out.stdout.contains(
        "gate: PASSED: every blocking gate holds (21 trials judged, 0 expected failures, 0 ignored)"
    ));
    assert!(out.stderr.contains("(smoke_model: no usable CUDA device") || cuda_usable(), "{}", out.all());

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["schema_version"], 1);
    assert_eq!(json["verdict"]["exit_code"], 0);
    assert_eq!(json["trials"].as_array().unwrap().len(), 21);
    assert_eq!(json["layers"][0]["criterion"], "HID");
    assert_eq!(json["layers"][0]["rows"].as_array().unwrap().len(), 2);
    // Every (run, prompt) forward ran exactly once, however many trials read it.
    for run in json["timings"]["runs"].as_array().unwrap() {
        assert_eq!(run["prompts"], 3, "{run}");
        assert_eq!(run["tokens"], 12, "{run}");
        assert_eq!(run["greedy_steps"], 12, "4 greedy steps after each of 3 prompts: {run}");
    }
    for file in ["report.md", "layers.svg", "junit.xml"] {
        let text = std::fs::read_to_string(reports.join(file)).unwrap();
        assert!(text.contains("e2e-pass-v1"), "{file}");
    }
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"21\" failures=\"0\""), "{xml}");
}

#[test]
fn failing_contract_exits_101_names_the_trial_and_diagnoses() {
    let dir = tempfile::tempdir().unwrap();
    let criteria = format!("{PASSING_CRITERIA}\n{IMPOSSIBLE_CRITERION}");
    let path = write_contract(dir.path(), "e2e-fail-v1", CPU_REF_RUNS, &criteria, "");
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap()]);
    assert_eq!(out.code, 101, "{}", out.all());
    assert_eq!(out.trial("e2e-fail-v1::EXACT::p_mid::layer00"), Some("FAILED"), "{}", out.all());
    assert!(out.stdout.contains("gate: FAILED: blocking gate EXACT does not hold"), "{}", out.all());
    // The diagnosis: first divergent layer 0, layer 0 run alone on the reference's input is as close to
    // the reference as f32 allows, so it is accumulated rounding, not a defect.
    assert!(out.stdout.contains("EXACT::p_mid (cpu vs reference, 2 failing trials)"), "{}", out.all());
    assert!(out.stdout.contains("first divergent layer: 0"), "{}", out.all());
    assert!(out.stdout.contains("isolated layer 0 of cpu on the reference's input: nmse"), "{}", out.all());
    assert!(out.stdout.contains("reference router margin at the top-2 boundary, layer 0"), "{}", out.all());
}

#[test]
fn known_divergences_are_expected_failures_and_strict_ones_must_keep_failing() {
    let dir = tempfile::tempdir().unwrap();
    let known = "  - {criterion: EXACT, where: all, status: benign, note: f32 cannot match f64 bit for bit, reason: no prompt can}";
    let path = write_contract(dir.path(), "e2e-known-v1", CPU_REF_RUNS, IMPOSSIBLE_CRITERION, known);
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.all());
    let status = out.trial("e2e-known-v1::EXACT::p_mid::layer01").unwrap_or_default();
    assert!(status.starts_with("ignored (expected failure (benign: f32 cannot match f64"), "{}", out.all());
    assert!(out.stdout.contains("0/0 (6 expected failures)"), "{}", out.all());
    assert!(
        out.stdout.contains("gate: PASSED: every blocking gate holds (0 trials judged, 6 expected failures"),
        "{}",
        out.all()
    );

    let strict = "  - {criterion: HID, where: {layer: 0}, status: investigating, strict: true, note: tracked in issue 9}";
    let path = write_contract(dir.path(), "e2e-strict-v1", CPU_REF_RUNS, PASSING_CRITERIA, strict);
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap()]);
    assert_eq!(out.code, 101, "{}", out.all());
    assert_eq!(out.trial("e2e-strict-v1::HID::p_short::layer00"), Some("FAILED"), "{}", out.all());
    assert!(out.stdout.contains("unexpected pass"), "{}", out.all());
}

#[test]
fn cuda_trials_are_ignored_without_cuda_and_required_cuda_is_exit_2() {
    if cuda_usable() {
        eprintln!("skipped: CUDA is usable here, so its absence cannot be tested");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let criteria =
        "  - {id: GPU, title: cuda agrees with cpu, compare: [cuda, cpu], tap: hidden, metric: cosine,
     per: [prompt, layer], threshold: {min: 0.9999}, gate: all}
  - {id: CPU, title: cpu agrees with f64, compare: [cpu, reference], tap: hidden, metric: cosine,
     per: [prompt, layer], threshold: {min: 0.99999}, gate: all}";
    let path = write_contract(dir.path(), "e2e-cuda-v1", CPU_CUDA_REF_RUNS, criteria, "");
    let contract = path.to_str().unwrap();

    let out = gate_in(dir.path(), &["--contract", contract]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(out.trial("e2e-cuda-v1::GPU::p_mid::layer01"), Some("ignored"), "{}", out.all());
    assert!(out.stdout.contains("6 passed; 0 failed; 6 ignored"), "{}", out.all());
    assert!(out.stdout.contains("cuda: unavailable ("), "the summary says why: {}", out.all());

    // Decided when listing, so nextest (which lists with --ignored) shows them skipped.
    let out = gate_in(dir.path(), &["--contract", contract, "--list", "--ignored"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let listed: Vec<&str> = out.stdout.lines().filter(|l| l.ends_with(": test")).collect();
    assert_eq!(listed.len(), 6, "{}", out.all());
    assert!(listed.iter().all(|l| l.contains("::GPU::")), "{listed:?}");

    let out = gate_in(dir.path(), &["--contract", contract, "--require-cuda"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("error: CUDA is required (--require-cuda) but not usable"), "{}", out.all());
}

#[test]
fn list_filters_and_exact_select_trials_without_running_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_contract(dir.path(), "e2e-filter-v1", CPU_REF_RUNS, PASSING_CRITERIA, "");
    let contract = path.to_str().unwrap();

    let out = gate_in(dir.path(), &["--contract", contract, "--list"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("e2e-filter-v1::TOPK::p_long::layer01: test"), "{}", out.all());
    assert!(out.stdout.contains("e2e-filter-v1::ARG::p_short: test"), "{}", out.all());
    assert!(!out.stdout.contains("gate:"), "listing prints no summary: {}", out.all());

    let name = "e2e-filter-v1::HID::p_mid::layer01";
    let out = gate_in(dir.path(), &["--contract", contract, "--exact", name]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("running 1 test"), "{}", out.all());
    assert!(
        out.stdout.contains("1 passed; 0 failed; 0 ignored; 0 measured; 20 filtered out"),
        "{}",
        out.all()
    );

    let out = gate_in(dir.path(), &["--contract", contract, "ARG", "--skip", "p_long"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("running 2 tests"), "{}", out.all());

    // The installed-subcommand form (`cargo-moe-gate moe-gate ...`) parses the same way.
    let out = gate_in(dir.path(), &["moe-gate", "--contract", contract, "--list", "--format", "terse"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(out.stdout.lines().filter(|l| l.ends_with(": test")).count(), 21, "{}", out.all());
}

#[test]
fn json_format_keeps_stdout_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_contract(dir.path(), "e2e-json-v1", CPU_REF_RUNS, PASSING_CRITERIA, "");
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap(), "--format", "json", "ARG"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ok = events.iter().filter(|e| e["type"] == "test" && e["event"] == "ok").count();
    assert_eq!(ok, 3, "{}", out.all());
    assert!(out.stderr.contains("gate: PASSED"), "the summary goes to stderr: {}", out.all());
}

#[test]
fn broken_contracts_exit_2_with_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let unknown_field =
        PASSING_CRITERIA.replace("gate: all}\n  - {id: LOGITS", "gate: all, bogus: 1}\n  - {id: LOGITS");
    let path = write_contract(dir.path(), "e2e-broken-v1", CPU_REF_RUNS, &unknown_field, "");
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());
    let expected = format!("error: {}:16:", path.display());
    assert!(out.stderr.contains(&expected) && out.stderr.contains("bogus"), "{}", out.all());

    let unknown_run = PASSING_CRITERIA.replace(
        "compare: [cpu, reference], tap: logits, metric: nmse",
        "compare: [gpu, reference], tap: logits, metric: nmse",
    );
    let path = write_contract(dir.path(), "e2e-badrun-v1", CPU_REF_RUNS, &unknown_run, "");
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());
    let expected = format!("error: {}:17:", path.display());
    assert!(out.stderr.contains(&expected) && out.stderr.contains("gpu"), "{}", out.all());

    let out = gate_in(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stdout.contains("INVALID") && out.stdout.contains("1 invalid"), "{}", out.all());

    let out = gate_in(dir.path(), &["--contract", dir.path().join("absent-v1.yaml").to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("cannot read the contract"), "{}", out.all());
}

#[test]
fn unloadable_models_and_unknown_places_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_contract(dir.path(), "e2e-model-v1", CPU_REF_RUNS, PASSING_CRITERIA, "");
    let missing = dir.path().join("missing.gguf");
    let out =
        gate_in(dir.path(), &["--contract", path.to_str().unwrap(), "--model", missing.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains(&format!("error: cannot load model `{}`", missing.display())),
        "{}",
        out.all()
    );

    let not_gguf = dir.path().join("not.gguf");
    std::fs::write(&not_gguf, b"this is not a model").unwrap();
    let out =
        gate_in(dir.path(), &["--contract", path.to_str().unwrap(), "--model", not_gguf.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());

    // A contract by name needs the workspace; outside one the error says what to do.
    let out = gate_in(dir.path(), &["--contract", "qwen3-moe-forward-gpu-v1"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("cannot find the moe-gate workspace"), "{}", out.all());

    let out = gate_in(dir.path(), &["--no-such-flag"]);
    assert_eq!(out.code, 2, "{}", out.all());
}

#[test]
fn nan_in_a_layer_fails_the_trials_that_read_it_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let model = with_nan_in(&fixture_model(), "blk.1.ffn_norm.weight", dir.path());
    let path = write_contract(dir.path(), "e2e-nan-v1", CPU_REF_RUNS, PASSING_CRITERIA, "");
    let out =
        gate_in(dir.path(), &["--contract", path.to_str().unwrap(), "--model", model.to_str().unwrap()]);
    assert_eq!(out.code, 101, "{}", out.all());
    assert_eq!(out.trial("e2e-nan-v1::HID::p_mid::layer00"), Some("ok"), "{}", out.all());
    assert_eq!(out.trial("e2e-nan-v1::HID::p_mid::layer01"), Some("FAILED"), "{}", out.all());
    assert!(out.stdout.contains("non-finite value"), "{}", out.all());
    assert!(out.stdout.contains("a non-finite value appears first at"), "{}", out.all());
}

/// A copy of `model` with the first value of tensor `name` (F32) replaced by NaN.
fn with_nan_in(model: &std::path::Path, name: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let mut bytes = std::fs::read(model).unwrap();
    let file = moe_engine::gguf::GgufFile::open(model).unwrap();
    let info = file.tensor(name).unwrap_or_else(|| panic!("the fixture has {name}"));
    let data = file.tensor_data(info).to_vec();
    let at = bytes.windows(data.len()).position(|w| w == data).expect("the tensor's bytes are in the file");
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let out = dir.join("nan.gguf");
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn trace_writes_the_design_format_and_rejects_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model();
    let model = model.to_str().unwrap();
    let out_path = dir.path().join("t.safetensors");
    let out_str = out_path.to_str().unwrap();
    let out = gate_in(
        dir.path(),
        &["trace", "--model", model, "--tokens", "17,42,99", "--backend", "reference", "--out", out_str],
    );
    assert_eq!(out.code, 0, "{}", out.all());
    let trace = Trace::read_safetensors(&out_path).unwrap();
    assert_eq!(trace.tokens, vec![17, 42, 99]);
    assert_eq!(trace.backend, "reference");
    assert_eq!(trace.precision, Precision::F64, "the reference keeps f64 (docs/architecture.md)");
    assert_eq!(trace.layers.len(), 2);
    assert_eq!((trace.logits.rows, trace.logits.cols), (3, 256));
    assert_eq!((trace.layers[1].hidden.rows, trace.layers[1].hidden.cols), (3, 64));
    assert_eq!(trace.top_k(), 2);

    let cases: [(&[&str], &str); 4] = [
        (&["--tokens", "1,2", "--backend", "gpu", "--out", out_str], "unknown backend `gpu`"),
        (&["--tokens", "1,300", "--backend", "cpu", "--out", out_str], "token id 300"),
        (&["--tokens", "", "--backend", "cpu", "--out", out_str], "--tokens"),
        (&["--tokens", "1", "--backend", "cpu", "--out", "/nonexistent-dir/t.safetensors"], "cannot write"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["trace", "--model", model];
        full.extend_from_slice(args);
        let out = gate_in(dir.path(), &full);
        assert_eq!(out.code, 2, "{args:?}: {}", out.all());
        assert!(out.stderr.contains(expected), "{args:?} should say `{expected}`: {}", out.all());
    }
}

#[test]
fn trace_with_taps_writes_every_layers_sub_layer_taps() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model();
    let out_path = dir.path().join("t.safetensors");
    let args = ["--tokens", "17,42,99", "--backend", "cpu", "--taps", "--out", out_path.to_str().unwrap()];
    let out = gate_in(dir.path(), &[&["trace", "--model", model.to_str().unwrap()][..], &args].concat());
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("2 layers with sub-layer taps"), "{}", out.all());
    let trace = Trace::read_safetensors(&out_path).unwrap();
    assert_eq!(trace.sub_layers.len(), 2, "one entry per layer");
    let taps = &trace.sub_layers[1];
    // public-tiny: hidden 64, top-2; `expert_out` is [T, k * hidden] in memory ([T, k, hidden] in the file).
    assert_eq!((taps.attn_norm.rows, taps.attn_norm.cols), (3, 64));
    assert_eq!((taps.expert_out.rows, taps.expert_out.cols), (3, 2 * 64));
    assert_eq!(taps.cache_keys, None, "a prefill's cache rows are its `k`");
}

/// The workspace root: its default contract runs on the smoke model `synth:tiny` (well under a second).
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The trial names `--list` prints with `extra` arguments.
fn listed(cwd: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--list"];
    args.extend_from_slice(extra);
    let out = gate_in(cwd, &args);
    assert_eq!(out.code, 0, "{}", out.all());
    out.stdout.lines().filter_map(|l| l.strip_suffix(": test")).map(str::to_string).collect()
}

fn report_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn partitions_split_the_default_contract_and_merge_into_its_verdict() {
    if cuda_usable() {
        eprintln!("skipped: with CUDA the default contract runs its production-shape model, not synth:tiny");
        return;
    }
    let root = workspace_root();
    let all = listed(&root, &[]);
    let first = listed(&root, &["--partition", "1/2"]);
    let second = listed(&root, &["--partition", "2/2"]);
    assert!(!first.is_empty() && !second.is_empty(), "{first:?} {second:?}");
    assert!(first.iter().all(|t| !second.contains(t)), "no trial in both shards");
    let mut union: Vec<String> = first.iter().chain(&second).cloned().collect();
    union.sort();
    let mut whole = all.clone();
    whole.sort();
    assert_eq!(union, whole, "the shards together list exactly the unpartitioned run's trials");

    let dir = tempfile::tempdir().unwrap();
    let reports = |name: &str| dir.path().join(name);
    let run = |extra: &[&str], name: &str| {
        let target = reports(name);
        let mut args = vec!["--report-dir", target.to_str().unwrap()];
        args.extend_from_slice(extra);
        gate_in(&root, &args)
    };
    let whole_run = run(&[], "whole");
    assert!(whole_run.code == 0 || whole_run.code == 101, "{}", whole_run.all());
    for (k, name) in [("1/2", "shard1"), ("2/2", "shard2")] {
        let out = run(&["--partition", k], name);
        // The default contract has 4 prompts on the smoke model (its generated set is `only_on: model`).
        let scope = format!("partition {k}: 2 of 4 prompts");
        let verdict = out.stdout.lines().find(|l| l.starts_with("gate: ")).unwrap_or_default();
        assert!(verdict.contains(&format!(" for {scope}: ")), "the verdict names the shard: {}", out.all());
        assert!(out.stdout.contains(&format!("\n{scope} (")), "so does the header: {}", out.all());
        let json = report_json(&reports(name));
        assert_eq!(json["partition"]["count"], 2);
        assert_eq!(json["partition"]["prompts"].as_array().unwrap().len(), 2);
    }
    assert_eq!(report_json(&reports("whole"))["partition"], serde_json::Value::Null);

    let shard = |name: &str| reports(name).join("report.json").to_str().unwrap().to_string();
    let merged_dir = reports("merged");
    let merged = gate_in(
        &root,
        &["merge", &shard("shard2"), &shard("shard1"), "--report-dir", merged_dir.to_str().unwrap()],
    );
    assert_eq!(merged.code, whole_run.code, "{}", merged.all());
    assert!(merged.stdout.contains("merged from 2 shards:"), "{}", merged.all());
    let (m, w) = (report_json(&merged_dir), report_json(&reports("whole")));
    assert_eq!(m["verdict"], w["verdict"], "the same verdict, line and all");
    assert_eq!(m["criteria"], w["criteria"], "the same per-criterion counts and gates");
    // Each (run, prompt) forward is deterministic and its values travel through JSON exactly, so the
    // merged trials are the unpartitioned run's, value for value, in plan order.
    assert_eq!(m["trials"], w["trials"]);
    assert_eq!(m["layers"], w["layers"]);
    assert_eq!(m["argmax"], w["argmax"]);
    assert_eq!(m["partition"], serde_json::Value::Null);
    assert_eq!(m["shards"].as_array().unwrap().len(), 2);
    for file in ["report.md", "layers.svg", "junit.xml"] {
        assert!(merged_dir.join(file).is_file(), "{file}");
    }
}

#[test]
fn merge_refuses_shards_that_do_not_make_one_run() {
    if cuda_usable() {
        eprintln!("skipped: with CUDA the default contract runs its production-shape model, not synth:tiny");
        return;
    }
    let root = workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let shard1 = dir.path().join("shard1");
    let out = gate_in(&root, &["--partition", "1/2", "--report-dir", shard1.to_str().unwrap()]);
    assert!(out.code == 0 || out.code == 101, "{}", out.all());
    let shard1 = shard1.join("report.json");
    let shard1 = shard1.to_str().unwrap();

    let out = gate_in(&root, &["merge", shard1]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("error: missing shard 2/2 of 2"), "{}", out.all());

    let out = gate_in(&root, &["merge", shard1, shard1]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("error: partition 1/2 is given twice"), "{}", out.all());

    let path = write_contract(dir.path(), "e2e-shard-v1", CPU_REF_RUNS, PASSING_CRITERIA, "");
    let other = dir.path().join("other");
    let out = gate_in(
        dir.path(),
        &[
            "--contract",
            path.to_str().unwrap(),
            "--partition",
            "2/2",
            "--report-dir",
            other.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.all());
    let out = gate_in(&root, &["merge", shard1, other.join("report.json").to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("are shards of different contracts (qwen3-moe-forward-gpu-v1 ")
            && out.stderr.contains("and e2e-shard-v1 1.0.0); merge the shards of one contract run only"),
        "{}",
        out.all()
    );

    for bad in ["0/3", "4/3", "a/b", "3"] {
        let out = gate_in(&root, &["--partition", bad, "--list"]);
        assert_eq!(out.code, 2, "{bad}: {}", out.all());
        assert!(
            out.stderr.contains("the accepted form is K/N with whole numbers 1 <= K <= N"),
            "{}",
            out.all()
        );
    }
}

/// A positive, finite number at `value` (a time or a rate; no speed is asserted).
fn positive(value: &serde_json::Value, what: &str) -> f64 {
    let x = value.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {value}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

#[test]
fn bench_measures_prefill_and_decode_and_writes_the_numbers_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let args = ["--model", "synth:tiny", "--backend", "cpu", "--prefill", "1,4", "--decode", "3"];
    let mut full = vec!["bench"];
    full.extend_from_slice(&args);
    full.extend_from_slice(&["--repeats", "1", "--json", json_path.to_str().unwrap()]);
    let out = gate_in(dir.path(), &full);
    assert_eq!(out.code, 0, "{}", out.all());
    for row in
        ["| prefill | 1 |", "| prefill | 4 |", "| decode (batch 1, 8-token prefill first) | 3 |", "roofline:"]
    {
        assert!(out.stdout.contains(row), "the table has `{row}`: {}", out.all());
    }
    assert!(out.stderr.contains("bench: wrote"), "progress goes to stderr: {}", out.all());

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json["schema"], 1);
    assert_eq!(json["model"], "synth:tiny:q4_k_m@0", "the canonical spec");
    assert_eq!((json["backend"].as_str(), json["policy"].as_str()), (Some("cpu"), Some("fast")));
    assert!(json["machine"]["threads"].as_u64().unwrap() >= 1, "{json}");
    positive(&json["setup"]["model_load_s"], "model_load_s");
    assert!(json["setup"]["backend_create_s"].as_f64().unwrap() >= 0.0, "{json}");

    let prefill = json["prefill"].as_array().unwrap();
    let lengths: Vec<u64> = prefill.iter().map(|p| p["tokens"].as_u64().unwrap()).collect();
    assert_eq!(lengths, [1, 4]);
    for p in prefill {
        assert_eq!(p["repeats"], 1, "{p}");
        let (min, median, max) = (
            positive(&p["min_s"], "min_s"),
            positive(&p["median_s"], "median_s"),
            positive(&p["max_s"], "max_s"),
        );
        assert!(min <= median && median <= max, "{p}");
        let rate = positive(&p["tokens_per_s"], "tokens_per_s");
        assert!((rate * median / p["tokens"].as_f64().unwrap() - 1.0).abs() < 1e-9, "tokens / median: {p}");
    }

    let decode = &json["decode"];
    assert_eq!(
        (decode["tokens"].as_u64(), decode["prefill_tokens"].as_u64()),
        (Some(3), Some(8)),
        "{decode}"
    );
    let mean = positive(&decode["mean_s"], "mean_s");
    assert!((positive(&decode["tokens_per_s"], "decode tokens_per_s") * mean - 1.0).abs() < 1e-9, "{decode}");
    let sd = decode["stddev_s"].as_f64().unwrap();
    assert!(sd.is_finite() && sd >= 0.0, "{decode}");

    // The roofline's bytes are the engine's count for this model; the bandwidth is a host copy of 1 GiB.
    let roofline = &json["roofline"];
    let weights = moe_engine::spec::load_model("synth:tiny").unwrap();
    assert_eq!(
        roofline["bytes_per_token"].as_u64(),
        Some(moe_engine::bench::decode_bytes_per_token(&weights))
    );
    assert_eq!(roofline["copy_bandwidth"]["method"], "host");
    assert_eq!(roofline["copy_bandwidth"]["bytes"].as_u64(), Some(1 << 30));
    let bandwidth = positive(&roofline["copy_bandwidth"]["bytes_per_s"], "bytes_per_s");
    let bound = positive(&roofline["bound_tokens_per_s"], "bound_tokens_per_s");
    let bytes = roofline["bytes_per_token"].as_f64().unwrap();
    assert!((bound * bytes / bandwidth - 1.0).abs() < 1e-9, "bound = bandwidth / bytes: {roofline}");
    positive(&roofline["decode_percent_of_bound"], "decode_percent_of_bound");
}

#[test]
fn bench_refuses_bad_arguments_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 8] = [
        (&["--prefill", "1,64,x"], "`x` is not a whole number"),
        (&["--prefill", "1,0"], "a prefill of 0 tokens"),
        (&["--backend", "gpu"], "unknown backend `gpu`"),
        (&["--policy", "precise"], "unknown policy `precise`"),
        (&["--repeats", "0"], "repeats is 0"),
        (&["--decode", "0"], "decode is 0"),
        (&["--prefill", "1,5000"], "a prefill of 5000 tokens exceeds the model's context length of 4096"),
        (&["--model", "synth:huge"], "cannot load model `synth:huge`"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        let out = gate_in(dir.path(), &full);
        assert_eq!(out.code, 2, "{args:?}: {}", out.all());
        assert!(out.stderr.contains(expected), "{args:?} should say `{expected}`: {}", out.all());
    }
    if cuda_usable() {
        eprintln!("skipped the no-CUDA case: CUDA is usable here");
        return;
    }
    let out = gate_in(dir.path(), &["bench", "--backend", "cuda", "--prefill", "1", "--decode", "1"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("error: no CUDA to benchmark on: "), "{}", out.all());
}

/// A copy of the fixture model whose layer-0 router gives experts 0, 1 and 2 the same row (4x expert 0's,
/// so the three lead wherever that row's logit is positive), expert 1's and 2's off by one f32 ulp in one
/// element each. Their logits then differ by ~1e-8 relative, below f32 rounding of a 64-term dot product
/// (~1e-7): which two of the three the f32 cpu forward keeps is decided by rounding, while the f64
/// reference decides by the true order. Every such swap is a genuine router tie.
fn with_router_tie(dir: &std::path::Path) -> std::path::PathBuf {
    let model = fixture_model();
    let mut bytes = std::fs::read(&model).unwrap();
    let file = moe_engine::gguf::GgufFile::open(&model).unwrap();
    let info = file.tensor("blk.0.ffn_gate_inp.weight").expect("the fixture has a layer-0 router");
    assert_eq!(info.ty, moe_kernels::GgmlType::F32, "the fixture's router is F32");
    let data = file.tensor_data(info).to_vec();
    let at = bytes.windows(data.len()).position(|w| w == data).expect("the tensor's bytes are in the file");
    let row_len = info.dims[0];
    let row: Vec<f32> =
        data[..4 * row_len].chunks(4).map(|b| 4.0 * f32::from_le_bytes(b.try_into().unwrap())).collect();
    for expert in 0..3usize {
        let mut r = row.clone();
        if expert > 0 {
            r[expert] = f32::from_bits(r[expert].to_bits() + 1);
        }
        for (i, v) in r.iter().enumerate() {
            let o = at + 4 * (expert * row_len + i);
            bytes[o..o + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    let out = dir.join("tie.gguf");
    std::fs::write(&out, bytes).unwrap();
    out
}

/// Issue 11: a router tie that f32 rounding resolves differently from f64 is certified by the gate itself
/// (the reference's gap between exactly the swapped experts, the layer right in isolation), its cascade is
/// excused under `ties.policy: excuse` and fails under `fail`, and no known divergence is written.
#[test]
fn a_router_tie_is_certified_and_its_cascade_excused_or_failed_as_the_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let model = with_router_tie(dir.path());
    let prompts: Vec<String> = (0..24u32)
        .map(|i| {
            format!(
                "  - {{id: p{i:02}, tokens: [{}, {}, {}]}}",
                (1 + 37 * i) % 256,
                (5 + 11 * i) % 256,
                (3 + 53 * i) % 256
            )
        })
        .collect();
    let contract = |policy: &str| {
        format!(
            "contract: e2e-ties-{policy}-v1
version: 1.0.0
status: active
title: a router tie certified by the gate
model: {m}
smoke_model: {m}
prompts:
{p}
runs:
  cpu: {{backend: cpu}}
  reference: {{backend: reference}}
ties: {{policy: {policy}, margin: 1.0e-5, isolated_nmse: 1.0e-8}}
criteria:
  - {{id: ISO, title: each layer alone, mode: isolated, compare: [cpu, reference], tap: hidden, metric: nmse,
     per: [prompt, layer], threshold: {{max: 1.0e-8}}}}
  - {{id: HID, title: accumulated, compare: [cpu, reference], tap: hidden, metric: nmse, per: [prompt, layer],
     threshold: {{max: 1.0e-8}}}}
  - {{id: SETS, title: experts, compare: [cpu, reference], tap: router_experts, metric: topk_set,
     per: [prompt, layer], tie_margin: 1.0e-5}}
amendments:
  - {{version: 1.0.0, date: 2026-12-02, kind: created, summary: test}}
",
            m = model.display(),
            p = prompts.join("\n")
        )
    };
    let run = |policy: &str| {
        let path = dir.path().join(format!("e2e-ties-{policy}-v1.yaml"));
        std::fs::write(&path, contract(policy)).unwrap();
        let reports = dir.path().join(policy);
        let out = gate_in(
            dir.path(),
            &["--contract", path.to_str().unwrap(), "--report-dir", reports.to_str().unwrap()],
        );
        let report = match reports.join("report.json").exists() {
            true => report_json(&reports),
            false => panic!("no report.json: {}", out.all()),
        };
        (out, report)
    };

    let (out, report) = run("excuse");
    assert_eq!(out.code, 0, "{}", out.all());
    let ties = report["ties"].as_array().expect("a ties section");
    let certified: Vec<&serde_json::Value> = ties.iter().filter(|t| t["certified"] == true).collect();
    assert!(!certified.is_empty(), "the engineered tie flips at least one position: {}", out.all());
    for t in &certified {
        assert_eq!(t["layer"], 0, "{t}");
        let swap = &t["swaps"][0];
        let swapped: Vec<u64> =
            [&swap["only_first"][0], &swap["only_second"][0]].iter().map(|e| e.as_u64().unwrap()).collect();
        assert!(swapped.iter().all(|e| *e < 3), "only experts 0, 1, 2 are tied: {t}");
        assert!(t["gap"].as_f64().unwrap() < 1e-5, "{t}");
        assert!(t["isolated"][0]["nmse"].as_f64().unwrap() <= 1e-8, "{t}");
    }
    let excused = report["criteria"].as_array().unwrap().iter().map(|c| c["tie_excused"].as_u64().unwrap());
    assert!(excused.sum::<u64>() > 0, "the cascade is excused: {}", out.all());
    assert!(
        out.stdout.contains("ties (router and next-token):") && out.stdout.contains("CERTIFIED"),
        "{}",
        out.all()
    );
    assert!(out.stdout.contains("certified router tie cascade"), "{}", out.all());

    let (out, report) = run("fail");
    assert_eq!(out.code, 101, "under policy fail the cascade blocks: {}", out.all());
    assert!(report["ties"].as_array().unwrap().iter().any(|t| t["certified"] == true), "{}", out.all());
}

/// The fixture model with two output rows made a near-tie: tokens 7 and 9 both get 8 x the row of token
/// 0, token 9's first element one ulp higher. Wherever that row scores high the next token is 7 or 9, and
/// the reference's probability gap between them (about |h_0| x 8 x 1 ulp of the row, ~1e-8) is far below
/// the f32 rounding of a dot product of that size (~1e-7), so rounding decides between them.
fn with_next_token_tie(dir: &std::path::Path) -> std::path::PathBuf {
    let model = fixture_model();
    let mut bytes = std::fs::read(&model).unwrap();
    let file = moe_engine::gguf::GgufFile::open(&model).unwrap();
    let info = file.tensor("output.weight").expect("the fixture has an output matrix");
    assert_eq!(info.ty, moe_kernels::GgmlType::F32, "the fixture's output matrix is F32");
    let data = file.tensor_data(info).to_vec();
    let at = bytes.windows(data.len()).position(|w| w == data).expect("the tensor's bytes are in the file");
    let row_len = info.dims[0];
    let row: Vec<f32> =
        data[..4 * row_len].chunks(4).map(|b| 8.0 * f32::from_le_bytes(b.try_into().unwrap())).collect();
    for token in [7usize, 9] {
        let mut r = row.clone();
        if token == 9 {
            r[0] = f32::from_bits(r[0].to_bits() + 1);
        }
        for (i, v) in r.iter().enumerate() {
            let o = at + 4 * (token * row_len + i);
            bytes[o..o + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    let out = dir.join("next-token-tie.gguf");
    std::fs::write(&out, bytes).unwrap();
    out
}

/// Issue 11 item 3: a greedy decode that parts at a next-token near-tie (no expert choice differs) is
/// certified by tracing the step's input again on both runs and the reference: the reference barely
/// separates exactly the two tokens and every layer is right in isolation, so the greedy and argmax
/// failures are excused; at a step after the first too, not only at the prompt's own next token.
#[test]
fn a_next_token_tie_in_greedy_decoding_is_certified_at_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = with_next_token_tie(dir.path());
    let prompts: Vec<String> = (0..32u32)
        .map(|i| format!("  - {{id: p{i:02}, tokens: [{}, {}]}}", (3 + 41 * i) % 256, (11 + 17 * i) % 256))
        .collect();
    let yaml = format!(
        "contract: e2e-next-token-tie-v1
version: 1.0.0
status: active
title: a next-token tie certified by the gate
model: {m}
smoke_model: {m}
prompts:
{p}
runs:
  cpu: {{backend: cpu}}
  reference: {{backend: reference}}
ties: {{policy: excuse, margin: 1.0e-5, isolated_nmse: 1.0e-8}}
criteria:
  - {{id: ARGMAX, title: next token, compare: [cpu, reference], tap: logits, metric: argmax, per: [prompt]}}
  - {{id: GREEDY, title: greedy, compare: [cpu, reference], tap: logits, metric: greedy, steps: 12,
     per: [prompt]}}
amendments:
  - {{version: 1.0.0, date: 2026-12-03, kind: created, summary: test}}
",
        m = model.display(),
        p = prompts.join("\n")
    );
    let path = dir.path().join("e2e-next-token-tie-v1.yaml");
    std::fs::write(&path, yaml).unwrap();
    let reports = dir.path().join("reports");
    let out = gate_in(
        dir.path(),
        &["--contract", path.to_str().unwrap(), "--report-dir", reports.to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "every parting is a certified tie: {}", out.all());
    let report = report_json(&reports);
    let ties = report["ties"].as_array().expect("a ties section");
    assert!(!ties.is_empty(), "the engineered tie parts at least one decode: {}", out.all());
    for t in ties {
        assert_eq!(t["certified"], true, "{t}");
        let tokens: Vec<u64> =
            t["tokens"].as_array().expect("a next-token tie").iter().map(|v| v.as_u64().unwrap()).collect();
        assert!(tokens.iter().all(|t| *t == 7 || *t == 9) && tokens[0] != tokens[1], "only 7 and 9 tie: {t}");
        assert!(t["gap"].as_f64().unwrap() < 1e-5, "{t}");
        assert!(t["isolated"][0]["nmse"].as_f64().unwrap() <= 1e-8, "{t}");
    }
    assert!(
        ties.iter().any(|t| t["step"].as_u64().is_some_and(|s| s > 0)),
        "some decode parts after its first step: {}",
        out.all()
    );
    let excused: u64 =
        report["criteria"].as_array().unwrap().iter().map(|c| c["tie_excused"].as_u64().unwrap()).sum();
    assert!(excused > 0, "{}", out.all());
    assert!(
        out.stdout.contains("next token 7 vs 9") || out.stdout.contains("next token 9 vs 7"),
        "{}",
        out.all()
    );
}

/// A prompt written as text runs on the synthetic model's Qwen3 tokenizer, and the report shows the next
/// token and the greedy decode as text next to the ids; a text that cannot be tokenised is exit 2 naming
/// the prompt.
#[test]
fn text_prompts_are_tokenised_and_outputs_read_back_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let contract = |id: &str, prompt: &str| {
        let yaml = format!(
            "contract: {id}
version: 1.0.0
status: active
title: text prompts
model: synth:tiny
smoke_model: synth:tiny
prompts:
  - {{id: fib, text: {prompt}}}
  - {{id: ids, tokens: [785, 9217, 308]}}
runs:
{CPU_REF_RUNS}
criteria:
  - {{id: ARG, title: same next token, compare: [cpu, reference], tap: logits, metric: argmax, per: [prompt], gate: all}}
  - {{id: GREEDY, title: same greedy tokens, compare: [cpu, reference], tap: logits, metric: greedy, steps: 3,
     per: [prompt], gate: all}}
amendments:
  - {{version: 1.0.0, date: 2026-12-02, kind: created, summary: written by the end-to-end tests}}
"
        );
        let path = dir.path().join(format!("{id}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let path = contract("e2e-text-v1", "\"def fib(n):\"");
    let reports = dir.path().join("reports");
    let out = gate_in(
        dir.path(),
        &["--contract", path.to_str().unwrap(), "--report-dir", reports.to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(out.trial("e2e-text-v1::ARG::fib"), Some("ok"), "{}", out.all());
    assert!(
        out.stdout.contains("greedy decode") && out.stdout.contains("fib \"def fib(n):\" -> "),
        "{}",
        out.all()
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("report.json")).unwrap()).unwrap();
    let greedy = json["greedy"].as_array().expect("greedy rows");
    let fib = greedy.iter().find(|g| g["prompt"] == "fib").expect("the text prompt's greedy row");
    assert_eq!(fib["prompt_text"], "def fib(n):");
    let run = &fib["runs"][0];
    let ids: Vec<u32> =
        run["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids.len(), 3);
    // The text is the ids decoded by the same tokenizer, independently of the report.
    let weights = moe_engine::spec::load_model("synth:tiny").unwrap();
    let tok = moe_engine::tokenizer::ModelTokenizer::from_gguf(&weights.file).unwrap();
    assert_eq!(run["text"].as_str(), Some(tok.decode(&ids).as_str()));
    let arg = &json["argmax"][0]["runs"][0];
    assert_eq!(arg["text"].as_str(), Some(tok.decode(&[arg["token"].as_u64().unwrap() as u32]).as_str()));
    assert!(std::fs::read_to_string(reports.join("report.md")).unwrap().contains("## Greedy decode"));

    let path = contract("e2e-text-empty-v1", "\"\"");
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("prompt `fib` has an empty `text`"), "{}", out.all());
}

/// Issue 13 item 6 through the binary: the example (10,000 generated prompts of 4096 tokens on
/// the smoke model), judged per position and decoded 4096 greedy steps, is refused with the estimate
/// before its prompts are generated or its trials planned. Before the check ran first, the gate planned
/// 40,960,000 trials (11 GB resident after 100 s) or, with the greedy criterion, scanned every generated
/// prompt once per trial, and never reached its refusal.
#[test]
fn a_contract_beyond_the_machine_is_refused_before_it_is_planned() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "contract: e2e-huge-v1\nversion: 1.0.0\nstatus: draft\ntitle: t\nmodel: synth:tiny
smoke_model: synth:tiny
prompts:
  - {id: gen, count: 10000, min_len: 4096, max_len: 4096, seed: 1}
runs:
  cpu: {backend: cpu}
  cpu2: {backend: cpu}
  reference: {backend: reference}
criteria:
  - {id: POS, title: t, compare: [cpu, reference], tap: logits, metric: argmax, per: [prompt, position], gate: all}
  - {id: DEC, title: t, compare: [cpu, cpu2], tap: logits, metric: greedy, steps: 4096, per: [prompt], gate: all}
amendments:
  - {version: 1.0.0, date: 2026-12-03, kind: created, summary: s}
";
    let path = dir.path().join("e2e-huge-v1.yaml");
    std::fs::write(&path, yaml).unwrap();
    let started = std::time::Instant::now();
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap(), "--report-dir", "reports"]);
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("error: refused before running: the contract's 30000 forwards (122880000 prompt tokens on a model of 4 layers"), "{}", out.all());
    assert!(out.stderr.contains("plan 40970000 trials in 140142.8 GiB"), "{}", out.all());
    assert!(out.stderr.contains("--partition K/N"), "{}", out.all());
    // Refused from the contract: nothing was recorded, so no report was started either.
    assert!(!dir.path().join("reports").exists(), "{}", out.all());
    // Generous on a loaded machine; the refusal takes about a second here (the planned run never ended).
    assert!(seconds < 60.0, "refused after {seconds:.1} s");
}

/// Issue 13 item 3 through the binary: a known divergence without `where` (masking every trial of its
/// criterion) is refused, exit 2, unless it says `where: all` with a `reason`; then the run shows it in
/// the `!!` lines right above the verdict. (A `where.prompt` naming a whole set: `contracts/tests/errors.rs`.)
#[test]
fn broad_masks_are_refused_unless_explicit_and_then_shown_above_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let bare = "  - {criterion: ARG, status: investigating, strict: false, note: masks everything}";
    let path = write_contract(dir.path(), "e2e-broad-v1", CPU_REF_RUNS, PASSING_CRITERIA, bare);
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("where: all") && out.stderr.contains("reason"), "{}", out.all());

    let explicit = "  - {criterion: ARG, where: all, reason: every prompt is affected, status: investigating,
     strict: false, note: masks everything}";
    let path = write_contract(dir.path(), "e2e-broad-v2", CPU_REF_RUNS, PASSING_CRITERIA, explicit);
    let out = gate_in(dir.path(), &["--contract", path.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.all());
    // The summary goes to stdout (stderr under `--format json`).
    let lenient =
        out.stdout.find("!! 1 non-strict known divergence").unwrap_or_else(|| panic!("{}", out.all()));
    let verdict = out.stdout.find("gate: PASSED").unwrap_or_else(|| panic!("{}", out.all()));
    assert!(lenient < verdict, "the !! lines come right above the verdict: {}", out.all());
    assert!(out.stdout.contains("!!   ") && out.stdout.contains("every prompt is affected"), "{}", out.all());
}

/// Issue 13 item 7 through the binary: `cargo moe-gate valdate` (a typo of `validate`) filters every
/// trial out and exits 2 with "NOT JUDGED" and a "did you mean", unless `--allow-empty`; `merge` of such
/// a run's report exits 2 the same way.
#[test]
fn a_run_or_merge_that_judges_nothing_does_not_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_contract(dir.path(), "e2e-empty-v1", CPU_REF_RUNS, PASSING_CRITERIA, "");
    let contract = path.to_str().unwrap();
    let out = gate_in(dir.path(), &["--contract", contract, "valdate"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stdout.contains("gate: NOT JUDGED"), "{}", out.all());
    assert!(out.stderr.contains("did you mean `cargo moe-gate validate`?"), "{}", out.all());

    let out = gate_in(
        dir.path(),
        &["--contract", contract, "--allow-empty", "--partition", "1/1", "--report-dir", "empty", "valdate"],
    );
    assert_eq!(out.code, 0, "{}", out.all());
    let shard = dir.path().join("empty/report.json");
    assert!(shard.is_file(), "{}", out.all());

    let out = gate_in(dir.path(), &["merge", shard.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stdout.contains("NOT JUDGED"), "{}", out.all());
    assert!(out.stderr.contains("--allow-empty"), "{}", out.all());
    let out = gate_in(dir.path(), &["merge", shard.to_str().unwrap(), "--allow-empty"]);
    assert_eq!(out.code, 0, "{}", out.all());
}

/// Issue 13 item 5, through the binary: SIGTERM in the middle of a run ends it with exit 143, a message on
/// stderr, and report.json / junit.xml written with what was judged so far and marked incomplete (a
/// later `merge` refuses them). The breadth contract (512 prompts on synth:tiny) runs for seconds, so the
/// signal lands while the forwards are being recorded.
#[test]
fn sigterm_mid_run_leaves_reports_marked_incomplete_and_exit_143() {
    let dir = tempfile::tempdir().unwrap();
    let contract = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contracts/cpu-vs-reference-breadth-v1.yaml");
    let reports = dir.path().join("reports");
    let child = std::process::Command::new(common::GATE)
        .args(["--contract", contract.to_str().unwrap(), "--report-dir", reports.to_str().unwrap(), "-q"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the gate binary starts");
    // Long enough for the model and the signal handler to be set up, far shorter than the run (~20 s on
    // 2 cores).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -TERM {}", child.id());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "SIGTERM is exit 143: {stderr}");
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
    let report = report_json(&reports);
    let why = report["verdict"]["incomplete"].as_str().expect("report.json marked incomplete");
    assert!(why.contains("SIGTERM"), "{why}");
    let junit = std::fs::read_to_string(reports.join("junit.xml")).expect("junit.xml written");
    assert!(junit.contains("::incomplete") && junit.contains("SIGTERM"), "{junit}");
}
