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
//! One call processes a **batch**: the new tokens of one or more sequences, each sequence with its own KV
//! cache, stacked as the rows of one residual stream. Every weight row is read once per layer for the
//! whole batch, and tokens are grouped by the expert they chose across all sequences; attention reads
//! each row's own sequence. No value depends on the batch a token came in (every operation is per row,
//! or per (row, weight row) in one fixed order), so a prompt forwarded with others gives the bits it
//! gives alone. The arithmetic that touches quantised weights comes from the backend's [`Numerics`];
//! everything else is `moe_kernels::cpu`.

pub(super) mod seeded;

use std::ops::Range;
use std::sync::Arc;

use moe_kernels::cpu::{KvView, Real, RopeTable, rms_norm, swiglu};
use rayon::prelude::*;

use super::check_tokens;
use super::numerics::{Mat, Numerics};
use crate::backend::{BackendKind, Forward, Policy};
use crate::config::ModelConfig;
use crate::defect::Defect;
use crate::error::EngineError;
use crate::trace::{LayerTrace, Matrix, SubLayerTaps, Trace};
use crate::weights::{LayerWeights, ModelWeights, WeightTensor};

/// A Qwen3-MoE forward with the KV caches of its sequences, on the numerics `N`.
pub(crate) struct Qwen3Moe<N: Numerics> {
    model: Model<N>,
    rope: RopeTable<N::F>,
    /// The sequences whose caches are held: one after `forward` (and at creation), one per sequence
    /// after `forward_many`.
    seqs: Vec<Sequence<N::F>>,
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
    /// The seeded defect of `cargo moe-gate selftest` (`seeded`); `None` in every normal forward.
    defect: Option<Defect>,
}

/// A layer's RMSNorm weights, converted to the working type once.
struct LayerNorms<F> {
    attn: Vec<F>,
    q: Vec<F>,
    k: Vec<F>,
    ffn: Vec<F>,
}

/// One sequence's KV cache: a [`LayerCache`] per layer, and how many positions each holds.
struct Sequence<F> {
    layers: Vec<LayerCache<F>>,
    n_cached: usize,
}

impl<F> Sequence<F> {
    fn new(n_layer: usize) -> Self {
        Self { layers: (0..n_layer).map(|_| LayerCache::new()).collect(), n_cached: 0 }
    }
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

/// Where the rows of a batch come from: sequence `s` owns rows `spans[s]`, and row `r` sits at position
/// `pos[r]` of its sequence.
struct Batch {
    spans: Vec<Range<usize>>,
    /// `[row]`: the index of the row's sequence in `spans`.
    seq: Vec<usize>,
    /// `[row]`: the row's position in its sequence.
    pos: Vec<usize>,
}

impl Batch {
    /// Sequences of `lens[s]` new tokens each, the first at position `starts[s]`.
    fn new(lens: impl IntoIterator<Item = usize>, starts: impl IntoIterator<Item = usize>) -> Self {
        let mut batch = Batch { spans: Vec::new(), seq: Vec::new(), pos: Vec::new() };
        for (s, (len, start)) in lens.into_iter().zip(starts).enumerate() {
            let first = batch.pos.len();
            batch.spans.push(first..first + len);
            batch.seq.extend(std::iter::repeat_n(s, len));
            batch.pos.extend(start..start + len);
        }
        batch
    }

    fn rows(&self) -> usize {
        self.pos.len()
    }
}

/// A layer's sub-layer values for every row of a batch, kept when a trace asks for them
/// ([`SubLayerTaps`] has what each one is).
struct RawTaps<F> {
    attn_norm: Vec<F>,
    q: Vec<F>,
    k: Vec<F>,
    v: Vec<F>,
    attn_out: Vec<F>,
    attn_proj: Vec<F>,
    attn_residual: Vec<F>,
    ffn_norm: Vec<F>,
    /// `[T][k][hidden]`, the router's choice order.
    expert_out: Vec<F>,
    moe_out: Vec<F>,
}

impl<F: Real> RawTaps<F> {
    /// The taps of the batch rows `rows` (one sequence).
    fn of_rows(&self, cfg: &ModelConfig, rows: Range<usize>) -> SubLayerTaps {
        let n = rows.len();
        let (hidden, q_dim, kv_dim) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let slots = cfg.n_expert_used * hidden;
        let m = |v: &[F], cols: usize| to_matrix(n, cols, &v[rows.start * cols..rows.end * cols]);
        SubLayerTaps {
            attn_norm: m(&self.attn_norm, hidden),
            q: m(&self.q, q_dim),
            k: m(&self.k, kv_dim),
            v: m(&self.v, kv_dim),
            attn_out: m(&self.attn_out, q_dim),
            attn_proj: m(&self.attn_proj, hidden),
            attn_residual: m(&self.attn_residual, hidden),
            ffn_norm: m(&self.ffn_norm, hidden),
            expert_out: m(&self.expert_out, slots),
            moe_out: m(&self.moe_out, hidden),
            cache_keys: None,
            cache_values: None,
        }
    }
}

/// What the attention block computed for the rows of a batch.
struct AttentionOut<F> {
    /// Queries and the new keys after norm and RoPE, the new values.
    q: Vec<F>,
    k: Vec<F>,
    v: Vec<F>,
    /// The heads' output before the output projection.
    heads: Vec<F>,
    /// The output projection of `heads`: what is added to the residual stream.
    proj: Vec<F>,
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
        let seqs = vec![Sequence::new(cfg.n_layer)];
        let model = Model { kind, policy, weights, numerics, norms, output_norm, eps, defect: None };
        Self { model, rope, seqs }
    }

    /// The same forward with `defect` seeded into it (`cargo moe-gate selftest` only, through the `cpu`
    /// backend's options; the reference never calls this).
    pub fn with_defect(mut self, defect: Option<Defect>) -> Self {
        self.model.defect = defect;
        let cfg = self.model.config();
        self.rope = RopeTable::new(cfg.head_dim, self.model.rope_theta());
        self
    }

    /// Drops every cache and holds `n` empty sequences.
    fn reset(&mut self, n: usize) {
        let n_layer = self.model.config().n_layer;
        self.seqs = (0..n).map(|_| Sequence::new(n_layer)).collect();
    }

    /// Runs `new[s]` after the cached positions of sequence `s`, for every held sequence, as one batch,
    /// appending them to the caches. Returns each sequence's last-position logits; with `traces` (one
    /// per sequence), records every position's taps and logits in them.
    fn run(&mut self, new: &[&[u32]], traces: Option<&mut [Trace]>) -> Result<Vec<Vec<f32>>, EngineError> {
        debug_assert_eq!(new.len(), self.seqs.len(), "one token list per held sequence");
        for (tokens, seq) in new.iter().zip(&self.seqs) {
            check_tokens(self.model.config(), tokens, seq.n_cached)?;
        }
        let batch = Batch::new(new.iter().map(|t| t.len()), self.seqs.iter().map(|s| s.n_cached));
        let n_pos = batch.pos.iter().max().map_or(0, |&p| p + 1);
        self.rope.ensure(n_pos + self.model.rope_lead());

        let mut x = self.model.embed(&new.concat());
        let n_layer = self.model.config().n_layer;
        let mut layer_traces: Vec<Vec<LayerTrace>> = match traces {
            Some(_) => new.iter().map(|_| Vec::with_capacity(n_layer)).collect(),
            None => Vec::new(),
        };
        let record = traces.as_ref().is_some_and(|t| t.iter().any(|t| t.record_sub_layers));
        let mut sub_layers: Vec<Vec<SubLayerTaps>> = match record {
            true => new.iter().map(|_| Vec::with_capacity(n_layer)).collect(),
            false => Vec::new(),
        };
        for l in 0..n_layer {
            let mut caches: Vec<&mut LayerCache<N::F>> =
                self.seqs.iter_mut().map(|s| &mut s.layers[l]).collect();
            let (routing, raw) = self.model.decoder_layer(l, &mut x, &batch, &self.rope, &mut caches, record);
            for (span, layers) in batch.spans.iter().zip(&mut layer_traces) {
                layers.push(self.model.layer_trace(&x, &routing, span.clone()));
            }
            let Some(raw) = raw else { continue };
            for ((span, subs), cache) in batch.spans.iter().zip(&mut sub_layers).zip(&caches) {
                let mut taps = raw.of_rows(self.model.config(), span.clone());
                if batch.pos[span.start] > 0 {
                    // A decode step: the cache rows its attention read, earlier positions included.
                    let kv_dim = self.model.config().kv_dim();
                    let rows = cache.keys.len() / kv_dim;
                    taps.cache_keys = Some(to_matrix(rows, kv_dim, &cache.keys));
                    taps.cache_values = Some(to_matrix(rows, kv_dim, &cache.values));
                }
                subs.push(taps);
            }
        }
        for (seq, span) in self.seqs.iter_mut().zip(&batch.spans) {
            seq.n_cached += span.len();
        }

        let (hidden, vocab) = (self.model.config().hidden, self.model.config().vocab);
        match traces {
            Some(traces) => {
                let logits = self.model.lm_head(&x);
                let mut last = Vec::with_capacity(new.len());
                let mut sub_layers = sub_layers.into_iter();
                for ((trace, span), layers) in traces.iter_mut().zip(&batch.spans).zip(layer_traces) {
                    if let Some(subs) = sub_layers.next().filter(|_| trace.record_sub_layers) {
                        trace.sub_layers = subs;
                    }
                    trace.backend = self.model.kind.to_string();
                    trace.policy = self.model.policy.to_string();
                    trace.precision = N::PRECISION;
                    trace.tokens = new[batch.seq[span.start]].to_vec();
                    trace.layers = layers;
                    trace.logits =
                        to_matrix(span.len(), vocab, &logits[span.start * vocab..span.end * vocab]);
                    last.push(to_f32(&logits[(span.end - 1) * vocab..span.end * vocab]));
                }
                Ok(last)
            }
            None => {
                let last_rows: Vec<N::F> = batch
                    .spans
                    .iter()
                    .flat_map(|s| &x[(s.end - 1) * hidden..s.end * hidden])
                    .copied()
                    .collect();
                let logits = self.model.lm_head(&last_rows);
                Ok(logits.chunks_exact(vocab).map(to_f32).collect())
            }
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
        self.reset(1);
        let last = self.run(&[tokens], trace.map(std::slice::from_mut))?;
        Ok(last.into_iter().next().expect("one sequence"))
    }

    fn step(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        let last = self.step_many(&[token])?;
        Ok(last.into_iter().next().expect("one sequence"))
    }

    fn forward_many(
        &mut self,
        seqs: &[&[u32]],
        traces: Option<&mut [Trace]>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        if let Some(traces) = &traces
            && traces.len() != seqs.len()
        {
            return Err(EngineError::TraceCount { traces: traces.len(), sequences: seqs.len() });
        }
        for tokens in seqs {
            check_tokens(self.model.config(), tokens, 0)?;
        }
        self.reset(seqs.len());
        self.run(seqs, traces)
    }

    fn add_sequences(
        &mut self,
        seqs: &[&[u32]],
        traces: Option<&mut [Trace]>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        // The new sequences run as a `forward_many` of their own (their values do not depend on the
        // batch), then join the held ones; on an error the held ones are kept as they were.
        let mut held = std::mem::take(&mut self.seqs);
        let last = self.forward_many(seqs, traces);
        held.append(&mut self.seqs);
        self.seqs = held;
        last
    }

    fn step_many(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        if tokens.len() != self.seqs.len() {
            return Err(EngineError::SequenceCount { tokens: tokens.len(), held: self.seqs.len() });
        }
        let new: Vec<&[u32]> = tokens.iter().map(std::slice::from_ref).collect();
        self.run(&new, None)
    }

    fn max_sequences(&self) -> usize {
        usize::MAX
    }

    fn defect(&self) -> Option<Defect> {
        self.model.defect
    }

    fn run_layer(&mut self, layer: usize, input: &Matrix) -> Result<LayerTrace, EngineError> {
        Ok(self.layer_alone(layer, input, false)?.0)
    }

    fn run_layer_tapped(
        &mut self,
        layer: usize,
        input: &Matrix,
    ) -> Result<(LayerTrace, SubLayerTaps), EngineError> {
        let (trace, taps) = self.layer_alone(layer, input, true)?;
        Ok((trace, taps.expect("taps were asked for")))
    }

    fn step_traced(&mut self, token: u32, trace: &mut Trace) -> Result<Vec<f32>, EngineError> {
        if self.seqs.len() != 1 {
            return Err(EngineError::SequenceCount { tokens: 1, held: self.seqs.len() });
        }
        let last = self.run(&[std::slice::from_ref(&token)], Some(std::slice::from_mut(trace)))?;
        Ok(last.into_iter().next().expect("one sequence"))
    }
}

impl<N: Numerics> Qwen3Moe<N> {
    /// Decoder layer `layer` alone on `input` (`Forward::run_layer`), with its sub-layer taps when
    /// `record`.
    fn layer_alone(
        &mut self,
        layer: usize,
        input: &Matrix,
        record: bool,
    ) -> Result<(LayerTrace, Option<SubLayerTaps>), EngineError> {
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
        let batch = Batch::new([input.rows], [0]);
        let (routing, raw) =
            self.model.decoder_layer(layer, &mut x, &batch, &self.rope, &mut [&mut scratch], record);
        let taps = raw.map(|raw| raw.of_rows(self.model.config(), 0..input.rows));
        Ok((self.model.layer_trace(&x, &routing, 0..input.rows), taps))
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
        x.par_chunks_exact_mut(hidden).zip(tokens).for_each(|(row, &t)| {
            self.numerics.dequantize_row(table, t as usize, row);
        });
        x
    }

    /// Decoder layer `l` on the residual stream `x` (the rows of `batch`), in place; appends each
    /// sequence's new keys and values to its cache (`caches[s]` for `batch.spans[s]`). Returns the
    /// router's decisions, and with `record` the layer's sub-layer values (the same arithmetic either way).
    fn decoder_layer(
        &self,
        l: usize,
        x: &mut [N::F],
        batch: &Batch,
        rope: &RopeTable<N::F>,
        caches: &mut [&mut LayerCache<N::F>],
        record: bool,
    ) -> (Routing<N::F>, Option<RawTaps<N::F>>) {
        let (w, norms) = (&self.weights.layers[l], &self.norms[l]);
        let attn_norm = self.rms_norm_rows(x, &norms.attn);
        let attn = self.attention(l, w, norms, &attn_norm, batch, rope, caches);
        self.attn_residual(l, x, &attn.proj);
        // Kept only for the taps: a forward without them frees the attention buffers here.
        let attn = record.then_some((attn, x.to_vec()));

        let ffn_norm = self.rms_norm_rows(x, &norms.ffn);
        let routing = self.route(l, w, &ffn_norm);
        let (moe, expert_out) = self.experts(l, w, &ffn_norm, &routing, record);
        add_in_place(x, &moe);
        let taps = attn.zip(expert_out).map(|((attn, attn_residual), expert_out)| RawTaps {
            attn_norm,
            q: attn.q,
            k: attn.k,
            v: attn.v,
            attn_out: attn.heads,
            attn_proj: attn.proj,
            attn_residual,
            ffn_norm,
            expert_out,
            moe_out: moe,
        });
        (routing, taps)
    }

    /// Self-attention of the normalised rows `h` of `batch`, each row over its own sequence's cache.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: usize,
        w: &LayerWeights,
        norms: &LayerNorms<N::F>,
        h: &[N::F],
        batch: &Batch,
        rope: &RopeTable<N::F>,
        caches: &mut [&mut LayerCache<N::F>],
    ) -> AttentionOut<N::F> {
        let cfg = self.config();
        let (hd, q_dim, kv_dim) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
        let mut q = self.attn_matmul(&w.attn_q, h);
        let mut k = self.attn_matmul(&w.attn_k, h);
        let v = self.attn_matmul(&w.attn_v, h);
        let rope_pos = self.rope_positions(batch);
        self.norm_and_rotate_heads(&mut q, cfg.n_head, self.qk_norm(&norms.q), &rope_pos, rope);
        self.norm_and_rotate_heads(&mut k, cfg.n_kv_head, self.qk_norm(&norms.k), &rope_pos, rope);
        for (cache, span) in caches.iter_mut().zip(&batch.spans) {
            cache.keys.extend_from_slice(&k[span.start * kv_dim..span.end * kv_dim]);
            cache.values.extend_from_slice(&v[span.start * kv_dim..span.end * kv_dim]);
        }
        self.stale_kv_rows(l, caches, batch);

        let group = cfg.n_head / cfg.n_kv_head;
        let scale = N::F::from_f64(self.attention_scale());
        let kv: Vec<&LayerCache<N::F>> = caches.iter().map(|c| &**c).collect();
        let mut out = vec![N::F::ZERO; batch.rows() * q_dim];
        out.par_chunks_mut(hd).zip(q.par_chunks(hd)).enumerate().for_each_init(
            Vec::new,
            |scores, (i, (o, qh))| {
                let (t, head) = (i / cfg.n_head, i % cfg.n_head);
                let cache = kv[batch.seq[t]];
                let (keys, values) = (&cache.keys[..], &cache.values[..]);
                let view = KvView { keys, values, row_width: kv_dim, offset: (head / group) * hd };
                self.attention_head(qh, view, batch.pos[t] + 1, scale, scores, o);
            },
        );
        let proj = self.attn_matmul(&w.attn_output, &self.o_proj_input(&out));
        AttentionOut { q, k, v, heads: out, proj }
    }

    /// Per-head RMSNorm (weights `norm`, one head long; `None` only under a seeded defect) then RoPE of
    /// every head of the rows of `x` (`n_heads` heads per row, row `t` at position `pos[t]`).
    fn norm_and_rotate_heads(
        &self,
        x: &mut [N::F],
        n_heads: usize,
        norm: Option<&[N::F]>,
        pos: &[usize],
        rope: &RopeTable<N::F>,
    ) {
        let hd = self.config().head_dim;
        x.par_chunks_exact_mut(n_heads * hd).zip(pos).for_each_init(
            || vec![N::F::ZERO; hd],
            |normed, (row, &p)| {
                for head in row.chunks_exact_mut(hd) {
                    if let Some(norm) = norm {
                        rms_norm(head, norm, self.eps, normed);
                        head.copy_from_slice(normed);
                    }
                    rope.apply(head, p);
                }
            },
        );
    }

    /// The router's logits and decisions for the T normalised rows `h`.
    fn route(&self, l: usize, w: &LayerWeights, h: &[N::F]) -> Routing<N::F> {
        let cfg = self.config();
        let (n_expert, k) = (cfg.n_expert, cfg.n_expert_used);
        let logits = self.router_logits(w, h);
        let n_tok = logits.len() / n_expert;
        let mut experts = vec![0u32; n_tok * k];
        let mut weights = vec![N::F::ZERO; n_tok * k];
        logits
            .par_chunks_exact(n_expert)
            .zip(experts.par_chunks_exact_mut(k))
            .zip(weights.par_chunks_exact_mut(k))
            .for_each_init(
                || vec![N::F::ZERO; n_expert],
                |probs, ((row, e), wt)| self.route_row(l, row, probs, e, wt),
            );
        Routing { logits, experts, weights }
    }

    /// The mixture-of-experts output for the T normalised rows `h`: every chosen expert runs once on the
    /// tokens that chose it (experts in parallel), and each token sums `expert_out * weight` over its
    /// experts in choice order (weight descending), starting from zero, the canonical order of
    /// `docs/numerics.md` item 9 (transformers sums in increasing expert index; the difference is f32
    /// round-off, and the f64 reference is insensitive to it). With `record`, also every routed slot's
    /// expert output, `[T][k][hidden]`.
    fn experts(
        &self,
        l: usize,
        w: &LayerWeights,
        h: &[N::F],
        routing: &Routing<N::F>,
        record: bool,
    ) -> (Vec<N::F>, Option<Vec<N::F>>) {
        let cfg = self.config();
        let h = &self.expert_input(h)[..];
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
                self.expert_ffn(w, self.expert_weights_of(l, e), &rows)
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
        moe.par_chunks_exact_mut(hidden)
            .zip(slot_out.par_chunks_exact(k))
            .zip(routing.weights.par_chunks_exact(k))
            .zip(routing.experts.par_chunks_exact(k))
            .for_each(|(((m, ys), ws), ids)| match self.defect {
                None => combine(m, ys, ws),
                Some(_) => self.seeded_combine(m, ys, ws, ids),
            });
        let slots = record.then(|| slot_out.concat());
        (moe, slots)
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
        out.par_chunks_exact_mut(norm.len())
            .zip(x.par_chunks_exact(norm.len()))
            .for_each(|(o, row)| rms_norm(row, norm, self.eps, o));
        out
    }

    /// `w · x` for the rows of `x` (`[T][w.row_len]`): `[T][w.n_rows]`.
    fn matmul(&self, w: &WeightTensor, x: &[N::F]) -> Vec<N::F> {
        let m = Mat::of(w);
        let mut out = vec![N::F::ZERO; x.len() / m.cols * m.rows];
        self.numerics.matmul(m, x, &mut out);
        out
    }

    /// The taps of one layer for the batch rows `rows` (one sequence): the residual stream `x` after the
    /// layer, and its router's decisions.
    fn layer_trace(&self, x: &[N::F], routing: &Routing<N::F>, rows: Range<usize>) -> LayerTrace {
        let cfg = self.config();
        let (hidden, n_expert, k) = (cfg.hidden, cfg.n_expert, cfg.n_expert_used);
        let n_tok = rows.len();
        LayerTrace {
            hidden: to_matrix(n_tok, hidden, &x[rows.start * hidden..rows.end * hidden]),
            router_logits: to_matrix(
                n_tok,
                n_expert,
                &routing.logits[rows.start * n_expert..rows.end * n_expert],
            ),
            router_experts: routing.experts[rows.start * k..rows.end * k].to_vec(),
            router_weights: to_matrix(n_tok, k, &routing.weights[rows.start * k..rows.end * k]),
        }
    }
}

/// One token's MoE output `m` (zero on entry): `sum ys[s] * ws[s]` in choice order from zero
/// (docs/numerics.md item 9).
fn combine<F: Real>(m: &mut [F], ys: &[&[F]], ws: &[F]) {
    for (y, &weight) in ys.iter().zip(ws) {
        for (m, &v) in m.iter_mut().zip(y.iter()) {
            *m += v * weight;
        }
    }
}

/// `x += d`, element by element (one rounding each: docs/numerics.md item 10).
fn add_in_place<F: Real>(x: &mut [F], d: &[F]) {
    x.par_chunks_mut(ELEMENTS_PER_TASK).zip(d.par_chunks(ELEMENTS_PER_TASK)).for_each(|(x, d)| {
        for (a, &b) in x.iter_mut().zip(d) {
            *a += b;
        }
    });
}

/// Elements an element-wise rayon task takes at least: below this a task costs more to schedule than
/// to run.
const ELEMENTS_PER_TASK: usize = 1 << 14;

fn to_matrix<F: Real>(rows: usize, cols: usize, v: &[F]) -> Matrix {
    let mut data = vec![0.0f64; v.len()];
    data.par_chunks_mut(ELEMENTS_PER_TASK).zip(v.par_chunks(ELEMENTS_PER_TASK)).for_each(|(d, v)| {
        for (d, x) in d.iter_mut().zip(v) {
            *d = x.to_f64();
        }
    });
    Matrix::from_f64(rows, cols, data)
}

fn to_f32<F: Real>(v: &[F]) -> Vec<f32> {
    v.iter().map(|x| x.to_f64() as f32).collect()
}
