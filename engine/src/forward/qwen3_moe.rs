//! The Qwen3-MoE decoder, written once for every CPU-side backend.
//!
//! Semantics are Hugging Face transformers' `Qwen3MoeForCausalLM` (issue 2 item 4):
//! `x = embd[token]`; per layer `x += attn(rmsnorm(x))`, `x += moe(rmsnorm(x))`; `logits = output ·
//! rmsnorm(x)`. Attention: q, k, v projections, per-head RMSNorm of q and k before NEOX RoPE, grouped
//! query attention (query head `h` reads KV head `h / (n_head / n_kv_head)`), causal softmax scaled by
//! `head_dim^-0.5`, output projection. MoE: router logits, softmax over all experts, top-k (ties by
//! lower index), weights renormalised to sum to one, SwiGLU experts `down(silu(gate·h) * (up·h))`, summed
//! weighted in choice order. No BOS is added.
//!
//! Every f32 operation here is in the canonical order of `docs/numerics.md` (the `exact` policy), which
//! the CUDA backend reproduces bit for bit under `exact`.
//!
//! A prefill processes all T tokens of a layer together, so every weight row is read once per layer, and
//! tokens are grouped by the expert they chose. The arithmetic that touches quantised weights comes from
//! the backend's [`Numerics`]; everything else is `moe_kernels::cpu`.

use std::sync::Arc;

use moe_kernels::cpu::{KvView, Real, RopeTable, causal_attention_head, rms_norm, route, swiglu};
use rayon::prelude::*;

use super::check_tokens;
use super::numerics::{Mat, Numerics};
use crate::backend::{BackendKind, Forward, Policy};
use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::trace::{LayerTrace, Matrix, Trace};
use crate::weights::{LayerWeights, ModelWeights, WeightTensor};

/// A Qwen3-MoE forward with its KV cache, on the numerics `N`.
pub(crate) struct Qwen3Moe<N: Numerics> {
    model: Model<N>,
    rope: RopeTable<N::F>,
    cache: Vec<LayerCache<N::F>>,
    /// Positions held in every layer's cache.
    n_cached: usize,
}

/// What does not change between forwards: weights, norm vectors, the backend's arithmetic.
struct Model<N: Numerics> {
    kind: BackendKind,
    policy: Policy,
    weights: Arc<ModelWeights>,
    numerics: N,
    norms: Vec<LayerNorms<N::F>>,
    output_norm: Vec<N::F>,
    eps: N::F,
}

/// A layer's RMSNorm weights, converted to the working type once.
struct LayerNorms<F> {
    attn: Vec<F>,
    q: Vec<F>,
    k: Vec<F>,
    ffn: Vec<F>,
}

/// One layer's cached keys and values (after norm and RoPE), `[position][kv_dim]`.
struct LayerCache<F> {
    keys: Vec<F>,
    values: Vec<F>,
}

impl<F> LayerCache<F> {
    fn new() -> Self {
        Self { keys: Vec::new(), values: Vec::new() }
    }
}

/// A layer's router decisions for T tokens.
struct Routing<F> {
    /// `[T][n_expert]`
    logits: Vec<F>,
    /// `[T][k]`, by weight descending.
    experts: Vec<u32>,
    /// `[T][k]`, renormalised.
    weights: Vec<F>,
}

impl<N: Numerics> Qwen3Moe<N> {
    /// A forward of `weights` on `numerics`, reporting itself as `kind` / `policy`.
    pub fn new(kind: BackendKind, policy: Policy, weights: Arc<ModelWeights>, numerics: N) -> Self {
        let vector = |w: &WeightTensor| {
            let m = Mat::of(w);
            let mut v = vec![N::F::ZERO; m.cols];
            numerics.dequantize_row(m, 0, &mut v);
            v
        };
        let norms = weights
            .layers
            .iter()
            .map(|l| LayerNorms {
                attn: vector(&l.attn_norm),
                q: vector(&l.attn_q_norm),
                k: vector(&l.attn_k_norm),
                ffn: vector(&l.ffn_norm),
            })
            .collect();
        let output_norm = vector(&weights.output_norm);
        let cfg = &weights.config;
        let rope = RopeTable::new(cfg.head_dim, cfg.rope_theta);
        let eps = N::F::from_f64(cfg.rms_eps);
        let cache = (0..cfg.n_layer).map(|_| LayerCache::new()).collect();
        let model = Model { kind, policy, weights, numerics, norms, output_norm, eps };
        Self { model, rope, cache, n_cached: 0 }
    }

    /// Runs `tokens` at positions `n_cached..`, appending them to the cache.
    fn run(&mut self, tokens: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>, EngineError> {
        let start = self.n_cached;
        check_tokens(self.model.config(), tokens, start)?;
        let cfg = self.model.config();
        let (n_tok, hidden) = (tokens.len(), cfg.hidden);
        self.rope.ensure(start + n_tok);

        let mut x = self.model.embed(tokens);
        let mut layer_traces = Vec::new();
        for (l, cache) in self.cache.iter_mut().enumerate() {
            let routing = self.model.decoder_layer(l, &mut x, start, &self.rope, cache);
            if trace.is_some() {
                layer_traces.push(self.model.layer_trace(&x, routing));
            }
        }
        self.n_cached = start + n_tok;

        let vocab = self.model.config().vocab;
        match trace {
            Some(trace) => {
                let logits = self.model.lm_head(&x);
                trace.backend = self.model.kind.to_string();
                trace.policy = self.model.policy.to_string();
                trace.precision = N::PRECISION;
                trace.tokens = tokens.to_vec();
                trace.layers = layer_traces;
                trace.logits = to_matrix(n_tok, vocab, &logits);
                Ok(to_f32(&logits[(n_tok - 1) * vocab..]))
            }
            None => Ok(to_f32(&self.model.lm_head(&x[(n_tok - 1) * hidden..]))),
        }
    }
}

impl<N: Numerics> Forward for Qwen3Moe<N> {
    fn kind(&self) -> BackendKind {
        self.model.kind
    }

    fn policy(&self) -> Policy {
        self.model.policy
    }

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn forward(&mut self, tokens: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>, EngineError> {
        check_tokens(self.model.config(), tokens, 0)?;
        for c in &mut self.cache {
            c.keys.clear();
            c.values.clear();
        }
        self.n_cached = 0;
        self.run(tokens, trace)
    }

    fn step(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        self.run(&[token], None)
    }

    fn run_layer(&mut self, layer: usize, input: &Matrix) -> Result<LayerTrace, EngineError> {
        let cfg = self.model.config();
        if layer >= cfg.n_layer {
            return Err(EngineError::LayerOutOfRange { layer, n_layer: cfg.n_layer });
        }
        let hidden = cfg.hidden;
        if input.rows == 0 || input.cols != hidden || input.data.len() != input.rows * input.cols {
            return Err(EngineError::InputShape { rows: input.rows, cols: input.cols, hidden });
        }
        if input.rows > cfg.context_length {
            return Err(EngineError::ContextFull {
                context_length: cfg.context_length,
                cached: 0,
                requested: input.rows,
            });
        }
        self.rope.ensure(input.rows);
        let mut x: Vec<N::F> = input.data.iter().map(|&v| N::F::from_f64(v)).collect();
        let mut scratch = LayerCache::new();
        let routing = self.model.decoder_layer(layer, &mut x, 0, &self.rope, &mut scratch);
        Ok(self.model.layer_trace(&x, routing))
    }
}

impl<N: Numerics> Model<N> {
    fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    /// The embedding rows of `tokens`, `[T][hidden]`.
    fn embed(&self, tokens: &[u32]) -> Vec<N::F> {
        let hidden = self.config().hidden;
        let table = Mat::of(&self.weights.token_embd);
        let mut x = vec![N::F::ZERO; tokens.len() * hidden];
        for (row, &t) in x.chunks_exact_mut(hidden).zip(tokens) {
            self.numerics.dequantize_row(table, t as usize, row);
        }
        x
    }

    /// Decoder layer `l` on the residual stream `x` (`[T][hidden]`, positions `start..start+T`), in place;
    /// appends the T positions' keys and values to `cache`. Returns the router's decisions.
    fn decoder_layer(
        &self,
        l: usize,
        x: &mut [N::F],
        start: usize,
        rope: &RopeTable<N::F>,
        cache: &mut LayerCache<N::F>,
    ) -> Routing<N::F> {
        let (w, norms) = (&self.weights.layers[l], &self.norms[l]);
        let h = self.rms_norm_rows(x, &norms.attn);
        let attn = self.attention(w, norms, &h, start, rope, cache);
        add_in_place(x, &attn);

        let h = self.rms_norm_rows(x, &norms.ffn);
        let routing = self.route(w, &h);
        let moe = self.experts(w, &h, &routing);
        add_in_place(x, &moe);
        routing
    }

    /// Self-attention of the T normalised rows `h` at positions `start..`, through the cache.
    fn attention(
        &self,
        w: &LayerWeights,
        norms: &LayerNorms<N::F>,
        h: &[N::F],
        start: usize,
        rope: &RopeTable<N::F>,
        cache: &mut LayerCache<N::F>,
    ) -> Vec<N::F> {
        let cfg = self.config();
        let (hd, q_dim, kv_dim) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
        let n_tok = h.len() / cfg.hidden;
        let mut q = self.matmul(&w.attn_q, h);
        let mut k = self.matmul(&w.attn_k, h);
        let v = self.matmul(&w.attn_v, h);
        self.norm_and_rotate_heads(&mut q, cfg.n_head, &norms.q, start, rope);
        self.norm_and_rotate_heads(&mut k, cfg.n_kv_head, &norms.k, start, rope);
        cache.keys.extend_from_slice(&k);
        cache.values.extend_from_slice(&v);

        let group = cfg.n_head / cfg.n_kv_head;
        let scale = N::F::from_f64(1.0 / (hd as f64).sqrt());
        let (keys, values) = (&cache.keys[..], &cache.values[..]);
        let mut out = vec![N::F::ZERO; n_tok * q_dim];
        out.par_chunks_mut(hd).zip(q.par_chunks(hd)).enumerate().for_each_init(
            Vec::new,
            |scores, (i, (o, qh))| {
                let (t, head) = (i / cfg.n_head, i % cfg.n_head);
                let kv = KvView { keys, values, row_width: kv_dim, offset: (head / group) * hd };
                causal_attention_head(qh, kv, start + t + 1, scale, scores, o);
            },
        );
        self.matmul(&w.attn_output, &out)
    }

    /// Per-head RMSNorm (weights `norm`, one head long) then RoPE of every head of the rows of `x`
    /// (`n_heads` heads per row, row `t` at position `start + t`).
    fn norm_and_rotate_heads(
        &self,
        x: &mut [N::F],
        n_heads: usize,
        norm: &[N::F],
        start: usize,
        rope: &RopeTable<N::F>,
    ) {
        let hd = self.config().head_dim;
        let mut normed = vec![N::F::ZERO; hd];
        for (i, head) in x.chunks_exact_mut(hd).enumerate() {
            rms_norm(head, norm, self.eps, &mut normed);
            head.copy_from_slice(&normed);
            rope.apply(head, start + i / n_heads);
        }
    }

    /// The router's logits and decisions for the T normalised rows `h`.
    fn route(&self, w: &LayerWeights, h: &[N::F]) -> Routing<N::F> {
        let cfg = self.config();
        let (n_expert, k) = (cfg.n_expert, cfg.n_expert_used);
        let logits = self.matmul(&w.ffn_gate_inp, h);
        let n_tok = logits.len() / n_expert;
        let mut experts = vec![0u32; n_tok * k];
        let mut weights = vec![N::F::ZERO; n_tok * k];
        let mut probs = vec![N::F::ZERO; n_expert];
        for ((row, e), wt) in
            logits.chunks_exact(n_expert).zip(experts.chunks_exact_mut(k)).zip(weights.chunks_exact_mut(k))
        {
            route(row, cfg.norm_topk_prob, &mut probs, e, wt);
        }
        Routing { logits, experts, weights }
    }

    /// The mixture-of-experts output for the T normalised rows `h`: every chosen expert runs once on the
    /// tokens that chose it (experts in parallel), and each token sums `expert_out * weight` over its
    /// experts in choice order (weight descending), starting from zero, the canonical order of
    /// `docs/numerics.md` item 9 (transformers sums in increasing expert index; the difference is f32
    /// round-off, and the f64 reference is insensitive to it).
    fn experts(&self, w: &LayerWeights, h: &[N::F], routing: &Routing<N::F>) -> Vec<N::F> {
        let cfg = self.config();
        let (hidden, k) = (cfg.hidden, cfg.n_expert_used);
        // For every expert, the (token, slot) pairs that chose it, in token order.
        let mut chosen_by: Vec<Vec<(usize, usize)>> = vec![Vec::new(); cfg.n_expert];
        for (i, &e) in routing.experts.iter().enumerate() {
            chosen_by[e as usize].push((i / k, i % k));
        }
        let active: Vec<usize> = (0..cfg.n_expert).filter(|&e| !chosen_by[e].is_empty()).collect();
        let outputs: Vec<Vec<N::F>> = active
            .par_iter()
            .map(|&e| {
                let rows: Vec<N::F> = chosen_by[e]
                    .iter()
                    .flat_map(|&(t, _)| &h[t * hidden..(t + 1) * hidden])
                    .copied()
                    .collect();
                self.expert_ffn(w, e, &rows)
            })
            .collect();

        // Every routed slot's output row, then each token's sum in choice order (docs/numerics.md item 9).
        let mut slot_out: Vec<&[N::F]> = vec![&[]; routing.experts.len()];
        for (&e, out) in active.iter().zip(&outputs) {
            for (&(t, slot), y) in chosen_by[e].iter().zip(out.chunks_exact(hidden)) {
                slot_out[t * k + slot] = y;
            }
        }
        let mut moe = vec![N::F::ZERO; h.len()];
        for ((m, ys), ws) in
            moe.chunks_exact_mut(hidden).zip(slot_out.chunks_exact(k)).zip(routing.weights.chunks_exact(k))
        {
            for (y, &weight) in ys.iter().zip(ws) {
                for (m, &v) in m.iter_mut().zip(y.iter()) {
                    *m += v * weight;
                }
            }
        }
        moe
    }

    /// Expert `e`'s SwiGLU feed-forward on the rows `x` (`[n][hidden]`): `down(silu(gate·x) * (up·x))`.
    fn expert_ffn(&self, w: &LayerWeights, e: usize, x: &[N::F]) -> Vec<N::F> {
        let n = x.len() / self.config().hidden;
        let (gate_w, up_w, down_w) = (
            Mat::expert(&w.ffn_gate_exps, e),
            Mat::expert(&w.ffn_up_exps, e),
            Mat::expert(&w.ffn_down_exps, e),
        );
        let mut gate = vec![N::F::ZERO; n * gate_w.rows];
        let mut up = vec![N::F::ZERO; n * up_w.rows];
        self.numerics.matmul(gate_w, x, &mut gate);
        self.numerics.matmul(up_w, x, &mut up);
        let mut act = vec![N::F::ZERO; gate.len()];
        swiglu(&gate, &up, &mut act);
        let mut out = vec![N::F::ZERO; n * down_w.rows];
        self.numerics.matmul(down_w, &act, &mut out);
        out
    }

    /// The final RMSNorm and the LM head on the rows of `x`: logits `[rows][vocab]`.
    fn lm_head(&self, x: &[N::F]) -> Vec<N::F> {
        let h = self.rms_norm_rows(x, &self.output_norm);
        self.matmul(&self.weights.output, &h)
    }

    /// RMSNorm of every `hidden`-wide row of `x` with weights `norm`.
    fn rms_norm_rows(&self, x: &[N::F], norm: &[N::F]) -> Vec<N::F> {
        let mut out = vec![N::F::ZERO; x.len()];
        for (o, row) in out.chunks_exact_mut(norm.len()).zip(x.chunks_exact(norm.len())) {
            rms_norm(row, norm, self.eps, o);
        }
        out
    }

    /// `w · x` for the rows of `x` (`[T][w.row_len]`): `[T][w.n_rows]`.
    fn matmul(&self, w: &WeightTensor, x: &[N::F]) -> Vec<N::F> {
        let m = Mat::of(w);
        let mut out = vec![N::F::ZERO; x.len() / m.cols * m.rows];
        self.numerics.matmul(m, x, &mut out);
        out
    }

    /// The taps of one layer: the residual stream `x` after it, and its router's decisions.
    fn layer_trace(&self, x: &[N::F], routing: Routing<N::F>) -> LayerTrace {
        let cfg = self.config();
        let n_tok = x.len() / cfg.hidden;
        LayerTrace {
            hidden: to_matrix(n_tok, cfg.hidden, x),
            router_logits: to_matrix(n_tok, cfg.n_expert, &routing.logits),
            router_experts: routing.experts,
            router_weights: to_matrix(n_tok, cfg.n_expert_used, &routing.weights),
        }
    }
}

fn add_in_place<F: Real>(x: &mut [F], d: &[F]) {
    for (a, &b) in x.iter_mut().zip(d) {
        *a += b;
    }
}

fn to_matrix<F: Real>(rows: usize, cols: usize, v: &[F]) -> Matrix {
    Matrix::from_f64(rows, cols, v.iter().map(|x| x.to_f64()).collect())
}

fn to_f32<F: Real>(v: &[F]) -> Vec<f32> {
    v.iter().map(|x| x.to_f64() as f32).collect()
}
