//! Shared by the `forward_*` tests: the fixtures of `tests/fixtures` (see its README.md) and error
//! measures.
#![allow(dead_code)] // each test crate uses a different part

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use moe_engine::gguf::GgufFile;
use moe_engine::weights::ModelWeights;
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

/// Number of prompts each fixture holds (lengths 1, 3, 5, 8, 13, 21).
pub const N_PROMPTS: usize = 6;

/// Every model of tests/fixtures with the float64 forward it must reproduce.
pub const FIXTURES: [(&str, &str); 5] = [
    ("public-tiny/model.gguf", "public-tiny/reference.safetensors"),
    ("public-tiny/model.q8_0.gguf", "public-tiny/reference_dequant_q8_0.safetensors"),
    // public-tiny's "Q4_K_M" holds Q5_0, Q5_1 and Q8_0 (its rows are too short for K-quants).
    ("public-tiny/model.q4_k_m.gguf", "public-tiny/reference_dequant_q4_k_m.safetensors"),
    ("q4k/model.q8_0.gguf", "q4k/reference_dequant_q8_0.safetensors"),
    // q4k's Q4_K_M holds Q4_K, Q5_K, Q6_K and Q8_0.
    ("q4k/model.q4_k_m.gguf", "q4k/reference_dequant_q4_k_m.safetensors"),
];

/// `tests/fixtures/<rel>` of the workspace.
pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

/// Loads a fixture model.
pub fn load_model(rel: &str) -> Arc<ModelWeights> {
    let path = fixture_path(rel);
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Arc::new(ModelWeights::from_gguf(Arc::new(file)).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// A tensor of a reference file: its shape and values widened to f64.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    /// The flat slice at leading indices `idx` (e.g. `[layer, position]` of a `[L, T, E]` tensor).
    pub fn at(&self, idx: &[usize]) -> &[f64] {
        let mut start = 0;
        let mut stride = self.data.len();
        for (d, &i) in idx.iter().enumerate() {
            stride /= self.shape[d];
            assert!(i < self.shape[d], "index {i} out of dim {d} of {:?}", self.shape);
            start += i * stride;
        }
        &self.data[start..start + stride]
    }
}

/// One prompt of a reference file (`p{i}.*`).
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// `[T, V]`
    pub logits: Tensor,
    /// `[L+1, T, H]`, `[0]` the embeddings.
    pub hidden: Tensor,
    /// `[L, T, E]`
    pub router_logits: Tensor,
    /// `[L, T, K]`
    pub topk_ids: Tensor,
    /// `[L, T, K]`
    pub topk_weights: Tensor,
    /// `[L, T]`: `p_k - p_(k+1)`, small at a near-tie.
    pub router_margin: Tensor,
}

/// Reads every prompt of the reference file `rel`.
pub fn load_reference(rel: &str) -> Vec<Prompt> {
    let path = fixture_path(rel);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let get = |name: &str| -> Tensor {
        let v = st.tensor(name).unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
        let data = match v.dtype() {
            Dtype::F64 => {
                v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
            }
            Dtype::I64 => {
                v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
            }
            other => panic!("{}: {name} has unexpected dtype {other:?}", path.display()),
        };
        Tensor { shape: v.shape().to_vec(), data }
    };
    (0..N_PROMPTS)
        .map(|i| {
            let t = |k: &str| get(&format!("p{i}.{k}"));
            Prompt {
                tokens: t("tokens").data.iter().map(|&v| v as u32).collect(),
                logits: t("logits"),
                hidden: t("hidden"),
                router_logits: t("router_logits"),
                topk_ids: t("topk_ids"),
                topk_weights: t("topk_weights"),
                router_margin: t("router_margin"),
            }
        })
        .collect()
}

/// Largest `|a - b|`.
pub fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// `||a - b|| / ||b||` (Euclidean norms).
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

/// Index of the largest value (the lowest index among equals).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// The worst errors of one comparison of a trace against a reference, over every prompt, position and
/// layer.
#[derive(Debug, Default, Clone, Copy)]
pub struct Errors {
    /// Largest absolute error of logits.
    pub logits_abs: f64,
    /// Largest per-position `||a - b|| / ||b||` of logits.
    pub logits_rel: f64,
    /// Largest absolute error of hidden states.
    pub hidden_abs: f64,
    /// Largest per-position `||a - b|| / ||b||` of hidden states.
    pub hidden_rel: f64,
    /// Largest absolute error of router logits.
    pub router_abs: f64,
    /// Largest absolute error of the renormalised router weights (matched by expert).
    pub weights_abs: f64,
    /// Positions (x layers) whose chosen expert set differs.
    pub topk_set_mismatches: usize,
    /// Positions whose argmax differs.
    pub argmax_mismatches: usize,
}

impl Errors {
    fn merge(&mut self, o: Errors) {
        self.logits_abs = self.logits_abs.max(o.logits_abs);
        self.logits_rel = self.logits_rel.max(o.logits_rel);
        self.hidden_abs = self.hidden_abs.max(o.hidden_abs);
        self.hidden_rel = self.hidden_rel.max(o.hidden_rel);
        self.router_abs = self.router_abs.max(o.router_abs);
        self.weights_abs = self.weights_abs.max(o.weights_abs);
        self.topk_set_mismatches += o.topk_set_mismatches;
        self.argmax_mismatches += o.argmax_mismatches;
    }
}

/// Runs every prompt of `reference` through `forward` with a trace and measures it against the reference.
pub fn compare_all(forward: &mut dyn moe_engine::backend::Forward, reference: &[Prompt]) -> Errors {
    let mut all = Errors::default();
    for p in reference {
        let mut trace = moe_engine::trace::Trace::new("fixture", "", "", moe_engine::trace::Precision::F64);
        let last = forward.forward(&p.tokens, Some(&mut trace)).expect("forward");
        let t = p.tokens.len();
        let vocab = p.logits.shape[1];
        let last_ref = trace.logits.row(t - 1);
        for (a, &b) in last.iter().zip(last_ref) {
            assert_eq!(*a, b as f32, "returned logits are the trace's last row");
        }
        all.merge(compare_trace(&trace, p, vocab));
    }
    all
}

/// Measures one trace against one reference prompt.
pub fn compare_trace(trace: &moe_engine::trace::Trace, p: &Prompt, vocab: usize) -> Errors {
    let t = p.tokens.len();
    let n_layer = p.router_logits.shape[0];
    let k = p.topk_ids.shape[2];
    assert_eq!(trace.tokens, p.tokens);
    assert_eq!(trace.layers.len(), n_layer);
    assert_eq!((trace.logits.rows, trace.logits.cols), (t, vocab));
    let mut e = Errors::default();
    for pos in 0..t {
        let (a, b) = (trace.logits.row(pos), p.logits.at(&[pos]));
        e.logits_abs = e.logits_abs.max(max_abs(a, b));
        e.logits_rel = e.logits_rel.max(rel_l2(a, b));
        e.argmax_mismatches += usize::from(argmax(a) != argmax(b));
        for (l, layer) in trace.layers.iter().enumerate() {
            let (a, b) = (layer.hidden.row(pos), p.hidden.at(&[l + 1, pos]));
            e.hidden_abs = e.hidden_abs.max(max_abs(a, b));
            e.hidden_rel = e.hidden_rel.max(rel_l2(a, b));
            e.router_abs =
                e.router_abs.max(max_abs(layer.router_logits.row(pos), p.router_logits.at(&[l, pos])));
            let ours = &layer.router_experts[pos * k..(pos + 1) * k];
            let theirs: Vec<u32> = p.topk_ids.at(&[l, pos]).iter().map(|&v| v as u32).collect();
            let (mut a_set, mut b_set) = (ours.to_vec(), theirs.clone());
            a_set.sort_unstable();
            b_set.sort_unstable();
            if a_set != b_set {
                e.topk_set_mismatches += 1;
                continue;
            }
            let weights: HashMap<u32, f64> =
                theirs.iter().copied().zip(p.topk_weights.at(&[l, pos]).iter().copied()).collect();
            for (j, ex) in ours.iter().enumerate() {
                let diff = (layer.router_weights.row(pos)[j] - weights[ex]).abs();
                e.weights_abs = e.weights_abs.max(diff);
            }
        }
    }
    e
}

/// How two traces of one prompt compare bit for bit (the `exact` policy's promise, docs/numerics.md).
#[derive(Debug, Default, Clone)]
pub struct BitAgreement {
    /// Tensors compared: per layer hidden, router logits, router experts, router weights; then the
    /// logits.
    pub tensors: usize,
    /// Tensors whose every value has the same f32 bits (experts: the same ids in the same order).
    pub identical: usize,
    /// The first tensors that differ, with their first differing index and values.
    pub first_differences: Vec<String>,
}

impl BitAgreement {
    /// Adds the comparison of `a` with `b` (two traces of the same prompt).
    pub fn add(&mut self, a: &moe_engine::trace::Trace, b: &moe_engine::trace::Trace) {
        assert_eq!(a.tokens, b.tokens, "traces of different prompts");
        assert_eq!(a.layers.len(), b.layers.len(), "traces of different depths");
        for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
            self.matrix(&format!("layer {l} hidden"), &x.hidden, &y.hidden);
            self.matrix(&format!("layer {l} router_logits"), &x.router_logits, &y.router_logits);
            self.tensors += 1;
            if x.router_experts == y.router_experts {
                self.identical += 1;
            } else {
                self.note(format!(
                    "layer {l} router_experts: {:?} vs {:?}",
                    x.router_experts, y.router_experts
                ));
            }
            self.matrix(&format!("layer {l} router_weights"), &x.router_weights, &y.router_weights);
        }
        self.matrix("logits", &a.logits, &b.logits);
    }

    /// Whether every tensor compared so far is identical.
    pub fn all_identical(&self) -> bool {
        self.identical == self.tensors
    }

    fn matrix(&mut self, what: &str, x: &moe_engine::trace::Matrix, y: &moe_engine::trace::Matrix) {
        self.tensors += 1;
        // The traces hold f32 values widened to f64 (exactly): compare the f32 bits.
        let bits = |m: &moe_engine::trace::Matrix| -> Vec<u32> {
            m.data.iter().map(|&v| (v as f32).to_bits()).collect()
        };
        let (bx, by) = (bits(x), bits(y));
        if (x.rows, x.cols) == (y.rows, y.cols) && bx == by {
            self.identical += 1;
            return;
        }
        let i = bx.iter().zip(&by).position(|(p, q)| p != q).unwrap_or(bx.len().min(by.len()));
        let (vx, vy) = (x.data.get(i).copied(), y.data.get(i).copied());
        self.note(format!("{what} [{}x{}]: first difference at {i}: {vx:?} vs {vy:?}", x.rows, x.cols));
    }

    fn note(&mut self, s: String) {
        if self.first_differences.len() < 5 {
            self.first_differences.push(s);
        }
    }
}
