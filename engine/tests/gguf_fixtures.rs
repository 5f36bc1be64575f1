//! The reader, config and weight set on the reference fixtures (tests/fixtures/README.md): GGUF files
//! written by an independent converter and by llama.cpp's quantiser, checked against the facts recorded
//! next to them (`verify.json`, `prompts.json`) and against the float64 reference's embeddings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_engine::gguf::{GgufFile, GgufValue};
use moe_engine::weights::ModelWeights;
use moe_kernels::GgmlType;
use moe_kernels::quant::dequantize_row_f64;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

fn json(rel: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(rel)).expect("fixture")).expect("fixture json")
}

/// The model files, and the `verify.json` section describing each (`None`: the all-F32 source).
const FILES: [(&str, &str, Option<&str>); 5] = [
    ("public-tiny", "model.gguf", None),
    ("public-tiny", "model.q8_0.gguf", Some("q8_0")),
    ("public-tiny", "model.q4_k_m.gguf", Some("q4_k_m")),
    ("q4k", "model.q8_0.gguf", Some("q8_0")),
    ("q4k", "model.q4_k_m.gguf", Some("q4_k_m")),
];

#[test]
fn tensor_counts_types_and_sizes_match_verify_json() {
    for (dir, name, section) in FILES {
        let f = GgufFile::open(&fixture(&format!("{dir}/{name}"))).expect("fixture parses");
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.tensors().len(), 27, "{dir}/{name}: 3 global + 2 layers x 12");
        let Some(section) = section else {
            assert!(f.tensors().iter().all(|t| t.ty == GgmlType::F32), "{dir}/{name} is all F32");
            continue;
        };
        let verify = &json(&format!("{dir}/verify.json"))[section];
        assert_eq!(f.as_bytes().len() as u64, verify["file_bytes"].as_u64().unwrap(), "{dir}/{name}");

        let mut histogram: BTreeMap<&str, u64> = BTreeMap::new();
        for t in f.tensors() {
            *histogram.entry(t.ty.name()).or_default() += 1;
        }
        let expected: BTreeMap<&str, u64> = verify["tensor_types"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_u64().unwrap()))
            .collect();
        assert_eq!(histogram, expected, "{dir}/{name}");

        for (tensor, ty) in verify["tensor_type_by_name"].as_object().unwrap() {
            let t = f.tensor(tensor).unwrap_or_else(|| panic!("{dir}/{name}: {tensor}"));
            assert_eq!(t.ty.name(), ty.as_str().unwrap(), "{dir}/{name}: {tensor}");
        }
    }
}

#[test]
fn config_matches_the_transformers_config() {
    for (dir, name, _) in FILES {
        let weights = ModelWeights::open(&fixture(&format!("{dir}/{name}"))).expect("valid model");
        let hf = &json(&format!("{dir}/prompts.json"))["config"];
        let n = |key: &str| hf[key].as_u64().unwrap_or_else(|| panic!("config.{key}")) as usize;
        let c = &weights.config;
        let got = [
            c.n_layer,
            c.hidden,
            c.n_head,
            c.n_kv_head,
            c.head_dim,
            c.n_expert,
            c.n_expert_used,
            c.expert_ffn,
            c.vocab,
            c.context_length,
        ];
        let want = [
            n("num_hidden_layers"),
            n("hidden_size"),
            n("num_attention_heads"),
            n("num_key_value_heads"),
            n("head_dim"),
            n("num_local_experts"),
            n("num_experts_per_tok"),
            n("moe_intermediate_size"),
            n("vocab_size"),
            n("max_position_embeddings"),
        ];
        assert_eq!(got, want, "{dir}/{name}");
        assert_eq!(c.rope_theta, hf["rope_parameters"]["rope_theta"].as_f64().unwrap());
        // The file stores epsilon as float32: exactly 1e-6 rounded to f32.
        assert_eq!(c.rms_eps, f64::from(hf["rms_norm_eps"].as_f64().unwrap() as f32));
        assert_eq!(c.norm_topk_prob, hf["norm_topk_prob"].as_bool().unwrap());
        assert_eq!(weights.tied_embeddings, hf["tie_word_embeddings"].as_bool().unwrap());
        assert_eq!(weights.layers.len(), c.n_layer);
        assert!(
            weights
                .file
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .is_some_and(|t| t.len() == c.vocab)
        );
    }
}

/// `p{i}.hidden[0]` of the float64 reference is the embedding of each prompt token, so the rows the
/// reader hands out must decode to exactly those values: from the F32 file directly, and from the
/// Q4_K_M file through the exact f64 dequantisation (`reference_dequant_q4_k_m` used the same weights).
#[test]
fn embedding_rows_are_the_references_embeddings() {
    let cases = [
        ("public-tiny", "model.gguf", "reference.safetensors"),
        ("q4k", "model.q4_k_m.gguf", "reference_dequant_q4_k_m.safetensors"),
    ];
    for (dir, model, reference) in cases {
        let weights = ModelWeights::from_gguf(Arc::new(
            GgufFile::open(&fixture(&format!("{dir}/{model}"))).expect("fixture parses"),
        ))
        .expect("valid model");
        let embd = &weights.token_embd;
        let hidden = weights.config.hidden;
        let bytes = std::fs::read(fixture(&format!("{dir}/{reference}"))).expect("reference");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut checked = 0;
        for p in 0..6 {
            let tokens = st.tensor(&format!("p{p}.tokens")).expect("tokens");
            let states = st.tensor(&format!("p{p}.hidden")).expect("hidden");
            assert_eq!((tokens.dtype(), states.dtype()), (Dtype::I64, Dtype::F64));
            let tokens: Vec<i64> =
                tokens.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
            let states: Vec<f64> =
                states.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
            for (pos, &token) in tokens.iter().enumerate() {
                let mut row = vec![0.0f64; hidden];
                dequantize_row_f64(embd.ty, embd.row(token as usize), &mut row);
                let want = &states[pos * hidden..(pos + 1) * hidden];
                assert_eq!(row.as_slice(), want, "{dir}/{model}: prompt {p} position {pos} token {token}");
                checked += 1;
            }
        }
        assert_eq!(checked, 1 + 3 + 5 + 8 + 13 + 21);
    }
}

/// Expert slices and rows address the right bytes: layer 1's Q6_K down projection of the q4k file, read
/// through `matrix(e).row(r)`, is consecutive 210-byte rows of the whole tensor in ggml order.
#[test]
fn expert_matrices_and_rows_slice_the_tensor() {
    let weights = ModelWeights::open(&fixture("q4k/model.q4_k_m.gguf")).expect("valid model");
    let down = &weights.layers[1].ffn_down_exps;
    assert_eq!((down.ty, down.dims.as_slice()), (GgmlType::Q6_K, &[256, 256, 8][..]));
    assert_eq!(down.row_bytes(), 210);
    assert_eq!(down.n_rows(), 256 * 8);
    let all = down.bytes();
    for e in [0, 3, 7] {
        let m = down.matrix(e);
        assert_eq!(m.dims, [256, 256]);
        assert_eq!(m.name, format!("blk.1.ffn_down_exps.weight[{e}]"));
        for r in [0, 100, 255] {
            let at = (e * 256 + r) * 210;
            assert_eq!(m.row(r), &all[at..at + 210]);
            assert_eq!(down.row(e * 256 + r), m.row(r));
        }
    }
    let info = weights.file.tensor("blk.1.ffn_down_exps.weight").unwrap();
    assert_eq!(all, weights.file.tensor_data(info));
    assert_eq!(all.len(), 256 * 8 * 210);
}
