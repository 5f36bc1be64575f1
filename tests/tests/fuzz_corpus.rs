//! The fuzz corpora (`fuzz/corpus/TARGET/`) and regression inputs (`fuzz/regressions/TARGET/`) replayed
//! through the fuzz targets' own harness, on stable, as ordinary tests: every input that once crashed a
//! parser stays fixed, and every input the fuzzer kept still parses without a panic.
//!
//! `write_seeds` (ignored; run by hand) writes the seed inputs from files the project itself writes.

#[allow(dead_code)] // only the gate runner is used here
mod common;

#[path = "../../fuzz/src/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_engine::gguf::{GgufValue, GgufWriter};
use moe_engine::trace::{LayerTrace, Matrix, Precision, Trace};
use moe_kernels::GgmlType;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every file under `fuzz/{corpus,regressions}/target`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else { continue };
        files.extend(entries.map(|e| e.expect("the corpus directory is readable").path()));
    }
    files.sort();
    files
}

#[test]
fn every_committed_input_is_handled_without_a_panic() {
    let mut failures = Vec::new();
    for (target, run) in harness::TARGETS {
        let files = inputs(target);
        assert!(
            files.len() >= 2,
            "fuzz target {target} has {} committed inputs; run write_seeds",
            files.len()
        );
        for file in files {
            let bytes = std::fs::read(&file).expect("a committed input is readable");
            if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "inputs that panic their parser:\n{}", failures.join("\n"));
}

#[test]
fn the_seeds_are_valid_inputs() {
    // A seed that no longer parses would leave the fuzzer exploring only the first error path: each
    // target's seeds must reach the end of its harness.
    let model = moe_engine::gguf::GgufFile::from_bytes(micro_model(GgmlType::Q8_0)).expect("micro model");
    moe_engine::weights::ModelWeights::from_gguf(Arc::new(model)).expect("the micro model loads");
    let trace = sample_trace(Precision::F64); // f64 round-trips bit for bit
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    trace.write_safetensors(&path).unwrap();
    assert_eq!(Trace::read_safetensors(&path).unwrap(), trace);
}

#[test]
#[ignore = "writes fuzz/corpus/*/seed-*: run by hand after a format change (`-- --ignored write_seeds`)"]
fn write_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    };
    write("gguf", "micro-f32.gguf", &micro_model(GgmlType::F32));
    write("gguf", "micro-q8_0.gguf", &micro_model(GgmlType::Q8_0));
    let dir = tempfile::tempdir().unwrap();
    for (name, precision) in [("f32", Precision::F32), ("f64", Precision::F64)] {
        let path = dir.path().join("t.safetensors");
        sample_trace(precision).write_safetensors(&path).unwrap();
        write("trace", &format!("{name}.safetensors"), &std::fs::read(&path).unwrap());
    }
    for entry in std::fs::read_dir(fuzz_dir().join("../contracts")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            write("contract", &name, &std::fs::read(&path).unwrap());
        }
    }
    for (name, partition) in [("1of1", "1/1"), ("1of2", "1/2")] {
        let out = dir.path().join(name);
        let contract = fuzz_dir().join("seeds/fuzz-merge-v1.yaml");
        let args = ["--contract", contract.to_str().unwrap(), "--partition", partition];
        let run = common::gate_in(
            &fuzz_dir().join(".."),
            &[&args[..], &["--report-dir", out.to_str().unwrap()]].concat(),
        );
        assert!(matches!(run.code, 0 | 101), "{}", run.all());
        write("report", &format!("{name}.json"), &std::fs::read(out.join("report.json")).unwrap());
    }
}

/// A complete qwen3moe model of the smallest shapes (hidden 32, one layer, two experts, vocabulary 3),
/// its matrices in `matrix_type`, every weight 0.5 (whatever the encoding, a valid one).
fn micro_model(matrix_type: GgmlType) -> Vec<u8> {
    micro_model_with(matrix_type, 3, &[])
}

/// [`micro_model`] with a vocabulary of `vocab` and the metadata values of `overrides` (keys without the
/// `qwen3moe.` prefix) in place of its own.
fn micro_model_with(matrix_type: GgmlType, vocab: usize, overrides: &[(&str, GgufValue)]) -> Vec<u8> {
    let (hidden, n_head, n_kv, head_dim, n_exp, ffn) = (32, 2, 1, 4, 2, 32);
    let mut w = GgufWriter::new(32);
    let arch = |k: &str| format!("qwen3moe.{k}");
    w.add_metadata("general.architecture", GgufValue::from("qwen3moe"));
    let mut metadata: Vec<(&str, GgufValue)> = vec![
        ("attention.layer_norm_rms_epsilon", GgufValue::F32(1e-6)),
        ("rope.freq_base", GgufValue::F32(1e4)),
    ];
    for (k, v) in [
        ("block_count", 1),
        ("context_length", 64),
        ("embedding_length", hidden),
        ("attention.head_count", n_head),
        ("attention.head_count_kv", n_kv),
        ("attention.key_length", head_dim),
        ("attention.value_length", head_dim),
        ("expert_count", n_exp),
        ("expert_used_count", 1),
        ("expert_feed_forward_length", ffn),
    ] {
        metadata.push((k, GgufValue::U32(v as u32)));
    }
    for (k, v) in metadata {
        let v = overrides.iter().find(|(o, _)| *o == k).map_or(v, |(_, o)| o.clone());
        w.add_metadata(&arch(k), v);
    }
    let (q, kv) = (n_head * head_dim, n_kv * head_dim);
    let m = matrix_type;
    let f = GgmlType::F32;
    let mut tensors: Vec<(String, GgmlType, Vec<usize>)> = vec![
        ("token_embd.weight".into(), m, vec![hidden, vocab]),
        ("output_norm.weight".into(), f, vec![hidden]),
        ("output.weight".into(), m, vec![hidden, vocab]),
    ];
    for (name, ty, dims) in [
        ("attn_norm", f, vec![hidden]),
        ("attn_q", m, vec![hidden, q]),
        ("attn_k", m, vec![hidden, kv]),
        ("attn_v", m, vec![hidden, kv]),
        ("attn_output", f, vec![q, hidden]),
        ("attn_q_norm", f, vec![head_dim]),
        ("attn_k_norm", f, vec![head_dim]),
        ("ffn_norm", f, vec![hidden]),
        ("ffn_gate_inp", f, vec![hidden, n_exp]),
        ("ffn_gate_exps", m, vec![hidden, ffn, n_exp]),
        ("ffn_up_exps", m, vec![hidden, ffn, n_exp]),
        ("ffn_down_exps", m, vec![ffn, hidden, n_exp]),
    ] {
        tensors.push((format!("blk.0.{name}.weight"), ty, dims));
    }
    for (name, ty, dims) in &tensors {
        w.add_tensor(name, *ty, dims).unwrap();
    }
    w.to_vec(|i, sink| {
        let (_, ty, dims) = &tensors[i];
        let rows: usize = dims[1..].iter().product();
        let row: Vec<u8> = match ty {
            // Q8_0: an f16 scale (0.5 = 0x3800) and 32 quants of 1.
            GgmlType::Q8_0 => {
                [0x00, 0x38].into_iter().chain([1u8; 32]).collect::<Vec<u8>>().repeat(dims[0] / 32)
            }
            _ => 0.5f32.to_le_bytes().repeat(dims[0]),
        };
        sink.write_all(&row.repeat(rows))
    })
    .unwrap()
}

/// Issue 13 item 2 through the gate binary: a well-formed GGUF whose metadata is absurd exits 2 with an
/// error naming the key and the value, before any tensor is used (no panic, no overflow).
#[test]
fn absurd_but_well_formed_models_exit_2_naming_the_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let contract = common::write_contract(
        dir.path(),
        "absurd-v1",
        common::CPU_REF_RUNS,
        "  - {id: L, title: l, compare: [cpu, reference], tap: logits, metric: argmax, per: [prompt], gate: all}",
        "",
    );
    let big = GgufValue::U32(1 << 31);
    // (what, vocabulary, metadata overrides, expected in the error)
    type Case<'a> = (&'a str, usize, Vec<(&'a str, GgufValue)>, &'a str);
    let cases: Vec<Case> = vec![
        ("0 experts", 3, vec![("expert_count", GgufValue::U32(0))], "\"qwen3moe.expert_count\" = 0"),
        (
            "top-k above the experts",
            3,
            vec![("expert_used_count", GgufValue::U32(3))],
            "\"qwen3moe.expert_used_count\" = 3",
        ),
        (
            "0 heads",
            3,
            vec![("attention.head_count", GgufValue::U32(0))],
            "\"qwen3moe.attention.head_count\" = 0",
        ),
        (
            "kv heads not dividing the heads",
            3,
            vec![("attention.head_count_kv", GgufValue::U32(3))],
            "\"qwen3moe.attention.head_count_kv\" = 3",
        ),
        (
            "a head size of 0",
            3,
            vec![("attention.key_length", GgufValue::U32(0)), ("attention.value_length", GgufValue::U32(0))],
            "\"qwen3moe.attention.key_length\" = 0",
        ),
        (
            "key and value sizes differ",
            3,
            vec![("attention.value_length", GgufValue::U32(8))],
            "\"qwen3moe.attention.value_length\" = 8",
        ),
        (
            "heads x head size overflowing",
            3,
            vec![
                ("attention.head_count", big.clone()),
                ("attention.key_length", big.clone()),
                ("attention.value_length", big),
            ],
            "\"qwen3moe.attention.head_count\" = 2147483648",
        ),
        (
            "a head size not fitting the hidden size's tensors",
            3,
            vec![("attention.key_length", GgufValue::U32(8)), ("attention.value_length", GgufValue::U32(8))],
            "attn_q",
        ),
        (
            "context length 0",
            3,
            vec![("context_length", GgufValue::U32(0))],
            "\"qwen3moe.context_length\" = 0",
        ),
        (
            "RoPE base negative",
            3,
            vec![("rope.freq_base", GgufValue::F32(-1.0))],
            "\"qwen3moe.rope.freq_base\" = -1",
        ),
        (
            "RoPE base NaN",
            3,
            vec![("rope.freq_base", GgufValue::F32(f32::NAN))],
            "\"qwen3moe.rope.freq_base\" = NaN",
        ),
        (
            "RoPE base infinite",
            3,
            vec![("rope.freq_base", GgufValue::F32(f32::INFINITY))],
            "\"qwen3moe.rope.freq_base\" = inf",
        ),
        (
            "eps 0",
            3,
            vec![("attention.layer_norm_rms_epsilon", GgufValue::F32(0.0))],
            "\"qwen3moe.attention.layer_norm_rms_epsilon\" = 0",
        ),
        (
            "eps negative",
            3,
            vec![("attention.layer_norm_rms_epsilon", GgufValue::F32(-1e-6))],
            "\"qwen3moe.attention.layer_norm_rms_epsilon\" = -0.00000099",
        ),
        ("vocabulary 0", 0, vec![], "token_embd.weight"),
    ];
    let mut failures = Vec::new();
    for (what, vocab, overrides, expected) in cases {
        let model = dir.path().join("absurd.gguf");
        let bytes = match vocab {
            // The writer refuses a zero dimension: write a vocabulary of 1, then make it 0 in the header.
            0 => zero_vocabulary(micro_model_with(GgmlType::F32, 1, &overrides)),
            _ => micro_model_with(GgmlType::F32, vocab, &overrides),
        };
        std::fs::write(&model, bytes).unwrap();
        let out = common::gate_in(
            dir.path(),
            &["--contract", contract.to_str().unwrap(), "--model", model.to_str().unwrap()],
        );
        let panicked = out.stderr.contains("panicked");
        if out.code != 2 || panicked || !out.stderr.contains(expected) {
            failures.push(format!("{what}: expected exit 2 with {expected:?}\n{}", out.all()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `model` (of vocabulary 1) with the vocabulary dimension of `token_embd.weight` set to 0 in its tensor
/// table (name, 2 dimensions, 32, 1).
fn zero_vocabulary(mut model: Vec<u8>) -> Vec<u8> {
    let mut info = b"token_embd.weight".to_vec();
    info.extend(2u32.to_le_bytes());
    info.extend(32u64.to_le_bytes());
    let at = model.windows(info.len()).position(|w| w == info).expect("the tensor's entry") + info.len();
    assert_eq!(model[at..at + 8], 1u64.to_le_bytes());
    model[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    model
}

/// A two-layer trace of two tokens (hidden 3, four experts top-2, vocabulary 5).
fn sample_trace(precision: Precision) -> Trace {
    let mut t = Trace::new("synth:tiny", "cpu", "fast", precision);
    t.tokens = vec![785, 9217];
    for l in 0..2 {
        t.layers.push(LayerTrace {
            hidden: Matrix::from_f64(2, 3, vec![1.0, -2.5, 3.0, 0.1, 0.2, l as f64]),
            router_logits: Matrix::from_f64(2, 4, vec![0.5, 0.25, -1.0, 2.0, 0.0, 1.0, 1.5, -0.5]),
            router_experts: vec![3, 0, 2, 1],
            router_weights: Matrix::from_f64(2, 2, vec![0.75, 0.25, 0.5, 0.5]),
        });
    }
    t.logits = Matrix::from_f64(2, 5, (0..10).map(|i| i as f64 / 7.0).collect());
    t
}
