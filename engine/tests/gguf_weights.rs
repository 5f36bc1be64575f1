//! The model config (`qwen3moe.*` keys, llama.cpp's names) and the validated weight set, on small
//! models built in memory: a complete one, then one defect at a time, each with its message asserted.

use std::sync::Arc;

use moe_engine::config::ModelConfig;
use moe_engine::gguf::{GgufFile, GgufValue, GgufWriter};
use moe_engine::weights::{ModelError, ModelWeights, WeightTensor};
use moe_kernels::GgmlType;

/// A model description to edit before building: metadata and tensor declarations.
struct Model {
    meta: Vec<(String, GgufValue)>,
    tensors: Vec<(String, GgmlType, Vec<usize>)>,
}

const HIDDEN: usize = 64;
const N_HEAD: usize = 4;
const N_KV: usize = 2;
const HEAD_DIM: usize = 16;
const N_EXPERT: usize = 4;
const EXPERT_FFN: usize = 32;
const VOCAB: usize = 40;
const N_LAYER: usize = 2;

/// A complete two-layer model: norms and router F32, expert tensors F32 (so their values can be read
/// back), the other matrices Q8_0.
fn tiny() -> Model {
    let u = |v: usize| GgufValue::U32(v as u32);
    let meta = vec![
        ("general.architecture".to_owned(), "qwen3moe".into()),
        ("qwen3moe.block_count".to_owned(), u(N_LAYER)),
        ("qwen3moe.context_length".to_owned(), u(512)),
        ("qwen3moe.embedding_length".to_owned(), u(HIDDEN)),
        ("qwen3moe.attention.head_count".to_owned(), u(N_HEAD)),
        ("qwen3moe.attention.head_count_kv".to_owned(), u(N_KV)),
        ("qwen3moe.rope.freq_base".to_owned(), GgufValue::F32(1e6)),
        ("qwen3moe.attention.layer_norm_rms_epsilon".to_owned(), GgufValue::F32(1e-6)),
        ("qwen3moe.expert_count".to_owned(), u(N_EXPERT)),
        ("qwen3moe.expert_used_count".to_owned(), u(2)),
        ("qwen3moe.attention.key_length".to_owned(), u(HEAD_DIM)),
        ("qwen3moe.attention.value_length".to_owned(), u(HEAD_DIM)),
        ("qwen3moe.expert_feed_forward_length".to_owned(), u(EXPERT_FFN)),
    ];
    let (q, kv) = (N_HEAD * HEAD_DIM, N_KV * HEAD_DIM);
    let mut tensors = vec![
        ("token_embd.weight".to_owned(), GgmlType::Q8_0, vec![HIDDEN, VOCAB]),
        ("output_norm.weight".to_owned(), GgmlType::F32, vec![HIDDEN]),
        ("output.weight".to_owned(), GgmlType::Q8_0, vec![HIDDEN, VOCAB]),
    ];
    for l in 0..N_LAYER {
        let layer: [(&str, GgmlType, Vec<usize>); 12] = [
            ("attn_norm", GgmlType::F32, vec![HIDDEN]),
            ("attn_q", GgmlType::Q8_0, vec![HIDDEN, q]),
            ("attn_k", GgmlType::Q8_0, vec![HIDDEN, kv]),
            ("attn_v", GgmlType::Q8_0, vec![HIDDEN, kv]),
            ("attn_output", GgmlType::Q8_0, vec![q, HIDDEN]),
            ("attn_q_norm", GgmlType::F32, vec![HEAD_DIM]),
            ("attn_k_norm", GgmlType::F32, vec![HEAD_DIM]),
            ("ffn_norm", GgmlType::F32, vec![HIDDEN]),
            ("ffn_gate_inp", GgmlType::F32, vec![HIDDEN, N_EXPERT]),
            ("ffn_gate_exps", GgmlType::F32, vec![HIDDEN, EXPERT_FFN, N_EXPERT]),
            ("ffn_up_exps", GgmlType::F32, vec![HIDDEN, EXPERT_FFN, N_EXPERT]),
            ("ffn_down_exps", GgmlType::F32, vec![EXPERT_FFN, HIDDEN, N_EXPERT]),
        ];
        tensors.extend(layer.into_iter().map(|(n, ty, dims)| (format!("blk.{l}.{n}.weight"), ty, dims)));
    }
    Model { meta, tensors }
}

impl Model {
    fn set(mut self, key: &str, value: GgufValue) -> Self {
        match self.meta.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.meta.push((key.to_owned(), value)),
        }
        self
    }

    fn remove_key(mut self, key: &str) -> Self {
        self.meta.retain(|(k, _)| k != key);
        self
    }

    fn remove_tensor(mut self, name: &str) -> Self {
        self.tensors.retain(|(n, _, _)| n != name);
        self
    }

    fn retype(mut self, name: &str, ty: GgmlType, dims: &[usize]) -> Self {
        let t = self.tensors.iter_mut().find(|(n, _, _)| n == name).expect("tensor of the tiny model");
        (t.1, t.2) = (ty, dims.to_vec());
        self
    }

    fn add_tensor(mut self, name: &str, ty: GgmlType, dims: &[usize]) -> Self {
        self.tensors.push((name.to_owned(), ty, dims.to_vec()));
        self
    }

    /// The file. F32 tensor `i` holds `i * 1e5 + j` at element `j`; other types hold zeros.
    fn file(&self) -> Arc<GgufFile> {
        let mut w = GgufWriter::new(32);
        for (k, v) in &self.meta {
            w.add_metadata(k, v.clone());
        }
        for (name, ty, dims) in &self.tensors {
            w.add_tensor(name, *ty, dims).expect("valid declaration");
        }
        let bytes = w
            .to_vec(|i, out| {
                let t = &w.tensors()[i];
                if t.ty == GgmlType::F32 {
                    let mut values = (0..t.n_elements()).map(|j| (i * 100_000 + j) as f32);
                    values.try_for_each(|v| out.write_all(&v.to_le_bytes()))
                } else {
                    out.write_all(&vec![0; t.n_bytes])
                }
            })
            .expect("write");
        Arc::new(GgufFile::from_bytes(bytes).expect("parse"))
    }

    fn weights(&self) -> Result<ModelWeights, ModelError> {
        ModelWeights::from_gguf(self.file())
    }

    fn error(&self) -> ModelError {
        match self.weights() {
            Ok(_) => panic!("expected the model to be refused"),
            Err(e) => e,
        }
    }
}

fn assert_mentions(e: &ModelError, fragments: &[&str]) {
    let msg = e.to_string();
    for f in fragments {
        assert!(msg.contains(f), "message {msg:?} should mention {f:?}");
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn a_complete_model_loads_with_its_config() {
    let w = tiny().weights().expect("valid model");
    let expected = ModelConfig {
        n_layer: N_LAYER,
        hidden: HIDDEN,
        n_head: N_HEAD,
        n_kv_head: N_KV,
        head_dim: HEAD_DIM,
        n_expert: N_EXPERT,
        n_expert_used: 2,
        expert_ffn: EXPERT_FFN,
        vocab: VOCAB,
        rope_theta: 1e6,
        rms_eps: f64::from(1e-6f32),
        context_length: 512,
        norm_topk_prob: true,
    };
    assert_eq!(w.config, expected);
    assert!(!w.tied_embeddings);
    assert_eq!(w.layers.len(), N_LAYER);
    assert_eq!(w.output.name, "output.weight");
    assert_eq!(w.layers[1].attn_output.dims, [N_HEAD * HEAD_DIM, HIDDEN]);
}

#[test]
fn weight_tensors_address_rows_and_expert_matrices() {
    let model = tiny();
    let w = model.weights().expect("valid model");
    let up = &w.layers[1].ffn_up_exps;
    let index = model.tensors.iter().position(|(n, _, _)| n == "blk.1.ffn_up_exps.weight").unwrap();
    let base = (index * 100_000) as f32;
    assert_eq!((up.row_len(), up.n_rows(), up.row_bytes()), (HIDDEN, EXPERT_FFN * N_EXPERT, HIDDEN * 4));
    for e in 0..N_EXPERT {
        let m = up.matrix(e);
        assert_eq!((m.dims.as_slice(), m.n_rows()), (&[HIDDEN, EXPERT_FFN][..], EXPERT_FFN));
        for r in [0, 17, EXPERT_FFN - 1] {
            let first = base + ((e * EXPERT_FFN + r) * HIDDEN) as f32;
            let want: Vec<f32> = (0..HIDDEN).map(|j| first + j as f32).collect();
            assert_eq!(f32s(m.row(r)), want, "expert {e} row {r}");
        }
    }
    // Clones share the file instead of copying bytes, and can cross threads.
    fn send_sync<T: Send + Sync>(_: &T) {}
    send_sync(up);
    let copy = up.clone();
    assert!(Arc::ptr_eq(copy.file(), up.file()) && Arc::ptr_eq(up.file(), &w.file));
    assert_eq!(copy.byte_range(), up.byte_range());
    assert_eq!(WeightTensor::from_file(&w.file, "no.such.weight").map(|t| t.name), None);
}

#[test]
#[should_panic(expected = "row 2 of tensor \"output_norm.weight\" which has 1 rows")]
fn row_out_of_range_panics_like_slice_indexing() {
    let w = tiny().weights().expect("valid model");
    w.output_norm.row(2);
}

#[test]
fn absent_output_means_tied_embeddings() {
    let w = tiny().remove_tensor("output.weight").weights().expect("valid model");
    assert!(w.tied_embeddings);
    assert_eq!(w.output.name, "token_embd.weight");
    assert_eq!(w.output.byte_range(), w.token_embd.byte_range());
}

#[test]
fn missing_tensor() {
    let e = tiny().remove_tensor("blk.1.attn_k_norm.weight").error();
    assert!(matches!(e, ModelError::MissingTensor { ref name } if name == "blk.1.attn_k_norm.weight"), "{e}");
    assert_mentions(&e, &["\"blk.1.attn_k_norm.weight\" is missing"]);
    // Without token_embd the vocabulary size is unknown: the config already says so.
    let e = tiny().remove_tensor("token_embd.weight").error();
    assert_mentions(&e, &["\"token_embd.weight\" is missing"]);
}

#[test]
fn wrong_shape() {
    let e = tiny().retype("blk.0.attn_q.weight", GgmlType::Q8_0, &[HIDDEN, 96]).error();
    assert!(matches!(e, ModelError::WrongShape { .. }), "{e}");
    assert_mentions(
        &e,
        &["\"blk.0.attn_q.weight\"", "[64, 96]", "expected [64, 64]", "[hidden, n_head * head_dim]"],
    );
    // ffn_down_exps declared like ffn_up_exps (row length and columns swapped).
    let e =
        tiny().retype("blk.1.ffn_down_exps.weight", GgmlType::F32, &[HIDDEN, EXPERT_FFN, N_EXPERT]).error();
    assert_mentions(&e, &["[64, 32, 4]", "expected [32, 64, 4]", "[expert_ffn, hidden, n_expert]"]);
    let e = tiny().retype("token_embd.weight", GgmlType::F32, &[HIDDEN, VOCAB, 1]).error();
    assert_mentions(&e, &["\"token_embd.weight\"", "[64, 40, 1]"]);
}

#[test]
fn unsupported_type_for_a_norm_or_the_router() {
    let e = tiny().retype("blk.0.ffn_norm.weight", GgmlType::Q8_0, &[HIDDEN]).error();
    let norm = "blk.0.ffn_norm.weight";
    assert!(matches!(e, ModelError::UnsupportedType { ref name, found: "Q8_0", .. } if name == norm), "{e}");
    assert_mentions(&e, &["is Q8_0", "a norm must be one of F32, F16, BF16"]);
    let e = tiny().retype("blk.1.ffn_gate_inp.weight", GgmlType::Q4_0, &[HIDDEN, N_EXPERT]).error();
    assert_mentions(&e, &["\"blk.1.ffn_gate_inp.weight\" is Q4_0", "the router"]);
    // Half-precision norms and router are fine.
    let model = tiny().retype("blk.0.attn_q_norm.weight", GgmlType::F16, &[HEAD_DIM]).retype(
        "blk.0.ffn_gate_inp.weight",
        GgmlType::BF16,
        &[HIDDEN, N_EXPERT],
    );
    assert!(model.weights().is_ok());
}

#[test]
fn unexpected_tensors_are_refused() {
    let e = tiny().add_tensor("blk.2.attn_norm.weight", GgmlType::F32, &[HIDDEN]).error();
    assert!(
        matches!(e, ModelError::UnexpectedTensor { ref name, n_layer: 2 } if name == "blk.2.attn_norm.weight")
    );
    assert_mentions(&e, &["not part of a qwen3moe model of 2 layers"]);
    let e = tiny().add_tensor("blk.0.ffn_gate_shexp.weight", GgmlType::F32, &[HIDDEN, 8]).error();
    assert_mentions(&e, &["\"blk.0.ffn_gate_shexp.weight\""]);
}

#[test]
fn config_defaults_and_integer_widths() {
    let model = tiny()
        .remove_key("qwen3moe.attention.key_length")
        .remove_key("qwen3moe.attention.value_length")
        .remove_key("qwen3moe.rope.freq_base")
        .set("qwen3moe.expert_weights_norm", GgufValue::Bool(false))
        .set("qwen3moe.block_count", GgufValue::U64(2))
        .set("qwen3moe.expert_count", GgufValue::I32(4))
        .set("qwen3moe.attention.layer_norm_rms_epsilon", GgufValue::F64(1e-5));
    let c = ModelConfig::from_gguf(&model.file()).expect("valid config");
    assert_eq!(c.head_dim, HIDDEN / N_HEAD, "key_length defaults to hidden / n_head");
    assert_eq!(c.rope_theta, 10_000.0);
    assert!(!c.norm_topk_prob);
    assert_eq!((c.n_layer, c.n_expert, c.rms_eps), (2, 4, 1e-5));
}

#[test]
fn config_errors_name_the_key() {
    let u = |v: u32| GgufValue::U32(v);
    let cases: Vec<(Model, &[&str])> = vec![
        (tiny().set("general.architecture", "llama".into()), &["\"llama\"", "expected \"qwen3moe\""]),
        (tiny().remove_key("general.architecture"), &["\"general.architecture\" is missing"]),
        (tiny().remove_key("qwen3moe.expert_count"), &["\"qwen3moe.expert_count\" is missing"]),
        (
            tiny().set("qwen3moe.block_count", "two".into()),
            &["\"qwen3moe.block_count\" has type string, expected a non-negative integer"],
        ),
        (
            tiny().set("qwen3moe.block_count", GgufValue::I32(-1)),
            &["\"qwen3moe.block_count\" has type int32"],
        ),
        (tiny().set("qwen3moe.block_count", u(0)), &["\"qwen3moe.block_count\" = 0", "at least 1"]),
        (
            tiny().set("qwen3moe.expert_used_count", u(5)),
            &["\"qwen3moe.expert_used_count\" = 5", "exceeds expert_count 4"],
        ),
        (
            tiny().set("qwen3moe.attention.head_count_kv", u(3)),
            &["\"qwen3moe.attention.head_count_kv\" = 3", "whole query groups"],
        ),
        (
            tiny().set("qwen3moe.attention.key_length", u(15)).remove_key("qwen3moe.attention.value_length"),
            &["\"qwen3moe.attention.key_length\" = 15", "even"],
        ),
        (
            tiny().set("qwen3moe.attention.value_length", u(8)),
            &["\"qwen3moe.attention.value_length\" = 8", "key length 16"],
        ),
        (
            tiny().set("qwen3moe.attention.layer_norm_rms_epsilon", GgufValue::F32(f32::NAN)),
            &["layer_norm_rms_epsilon\" = NaN", "finite and positive"],
        ),
        (
            tiny().remove_key("qwen3moe.attention.layer_norm_rms_epsilon"),
            &["\"qwen3moe.attention.layer_norm_rms_epsilon\" is missing"],
        ),
        (
            tiny().set("qwen3moe.expert_weights_norm", u(1)),
            &["\"qwen3moe.expert_weights_norm\" has type uint32, expected a bool"],
        ),
        (
            tiny().set("qwen3moe.attention.head_count", u(3)).remove_key("qwen3moe.attention.key_length"),
            &["\"qwen3moe.attention.key_length\"", "64 / 3 is not whole"],
        ),
    ];
    for (model, fragments) in cases {
        let e = ModelConfig::from_gguf(&model.file()).unwrap_err();
        assert_mentions(&e, fragments);
        // The weight set refuses the same file with the same error.
        assert_eq!(model.error().to_string(), e.to_string());
    }
}
