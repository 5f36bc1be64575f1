//! The `cuda` backend (docs/architecture.md, docs/numerics.md, issue 5): the whole Qwen3-MoE forward on one CUDA device.
//!
//! Semantics are those of [`super::qwen3_moe`] (Hugging Face transformers `Qwen3MoeForCausalLM`); the
//! kernels are `moe_kernels::cuda`, their operation order is written down in `docs/numerics.md`.
//!
//! - Weights are uploaded once, in their GGUF blocks (plain `cuMemAlloc`, never managed memory); norm
//!   vectors are converted to f32 on the way. Activations are f32 and never quantised.
//! - Per layer, everything runs on the device: RMSNorm, q/k/v projections (k and v written straight into
//!   the device KV cache), per-head q/k RMSNorm fused with NEOX RoPE, causal GQA attention over the
//!   cache, output projection added to the residual, RMSNorm, router, softmax + top-k + renormalisation,
//!   the chosen experts' SwiGLU and their weighted sum. Expert ids never leave the device: the expert
//!   kernels read them there, so nothing waits for the host between router and experts.
//! - The host waits only to return logits, and to copy a layer's taps back when a trace is requested.
//! - Few routed slots (decode, short prompts) run one block row per slot; more are first grouped by
//!   expert on the device so each expert's rows are read once per tile of its tokens. Both schedules
//!   compute every output with the same arithmetic.
//! - Under [`Policy::Exact`] every step runs the `*_exact` kernels instead: the canonical operation order
//!   of `docs/numerics.md`, the `cpu` backend's, with every operation explicitly rounded, and the RoPE
//!   cosines and sines taken from the host's table (`moe_kernels::cpu::RopeTable`, uploaded). The trace
//!   is then the `cpu` backend's bit for bit. Experts run one block row per routed slot.

use std::sync::Arc;

use moe_kernels::cpu::RopeTable;
use moe_kernels::cuda::{
    AttentionShape, CudaDevice, CudaError, DevSlice, DeviceBuffer, DeviceGraph, DeviceMatrix, ExactRows,
    ExpertGroups, FUSED_MAX_SLOTS, Routing,
};
use moe_kernels::quant::dequantize_row;

use super::check_tokens;
use crate::backend::{BackendKind, Forward, Policy};
use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::trace::{LayerTrace, Matrix, Precision, Trace};
use crate::weights::{LayerWeights, ModelWeights, WeightTensor};

/// The device every forward uses (ordinal 0).
const DEVICE_ORDINAL: usize = 0;
/// KV-cache positions allocated at first; the cache doubles when a sequence outgrows it, up to the
/// model's context length (a production-shape context of 262144 positions would need 51 GB up front).
const INITIAL_KV_POSITIONS: usize = 256;

/// A CUDA forward of `weights` under `policy`: opens device 0 (compiling the kernels on first use) and
/// uploads the weights. [`Policy::Fast`] runs the fast kernels; [`Policy::Exact`] the canonical order of
/// `docs/numerics.md`, bit-identical to the `cpu` backend.
pub fn create(weights: Arc<ModelWeights>, policy: Policy) -> Result<Box<dyn Forward>, EngineError> {
    // A stream of its own: the decode graph is captured from this forward's stream, which no other
    // forward (on another thread) may queue work on meanwhile.
    let device = CudaDevice::get(DEVICE_ORDINAL)
        .and_then(|d| d.fork())
        .map_err(|e| engine_error("opening the CUDA device", e))?;
    Ok(Box::new(CudaForward::new(device, weights, policy)?))
}

/// Turns a kernel-side error into the engine's: "no CUDA here" stays distinguishable from a failure.
fn engine_error(stage: &str, e: CudaError) -> EngineError {
    if e.is_unavailable() {
        EngineError::CudaUnavailable { reason: e.to_string() }
    } else {
        EngineError::Cuda { stage: stage.to_string(), message: e.to_string() }
    }
}

/// One decoder layer's weights on the device.
struct DeviceLayer {
    attn_norm: DeviceBuffer<f32>,
    q_norm: DeviceBuffer<f32>,
    k_norm: DeviceBuffer<f32>,
    ffn_norm: DeviceBuffer<f32>,
    q: DeviceMatrix,
    k: DeviceMatrix,
    v: DeviceMatrix,
    o: DeviceMatrix,
    router: DeviceMatrix,
    gate_exps: DeviceMatrix,
    up_exps: DeviceMatrix,
    down_exps: DeviceMatrix,
}

/// Every weight on the device.
struct DeviceModel {
    token_embd: DeviceMatrix,
    /// `None` when the output projection is the embedding table (tied embeddings).
    output: Option<DeviceMatrix>,
    output_norm: DeviceBuffer<f32>,
    layers: Vec<DeviceLayer>,
    /// RoPE inverse frequencies `theta^(-2i / head_dim)` in f64, the CPU's [`moe_kernels::cpu::RopeTable`]
    /// formula.
    inv_freq: DeviceBuffer<f64>,
}

impl DeviceModel {
    fn upload(device: &CudaDevice, w: &ModelWeights) -> Result<Self, CudaError> {
        let cfg = &w.config;
        let layers = w.layers.iter().map(|l| upload_layer(device, l)).collect::<Result<Vec<_>, _>>()?;
        let output = if w.tied_embeddings { None } else { Some(upload_matrix(device, &w.output)?) };
        let inv_freq: Vec<f64> = (0..cfg.head_dim / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / cfg.head_dim as f64))
            .collect();
        Ok(DeviceModel {
            token_embd: upload_matrix(device, &w.token_embd)?,
            output,
            output_norm: upload_vector(device, &w.output_norm)?,
            layers,
            inv_freq: device.upload(&inv_freq)?,
        })
    }

    fn output(&self) -> &DeviceMatrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }
}

fn upload_layer(device: &CudaDevice, l: &LayerWeights) -> Result<DeviceLayer, CudaError> {
    Ok(DeviceLayer {
        attn_norm: upload_vector(device, &l.attn_norm)?,
        q_norm: upload_vector(device, &l.attn_q_norm)?,
        k_norm: upload_vector(device, &l.attn_k_norm)?,
        ffn_norm: upload_vector(device, &l.ffn_norm)?,
        q: upload_matrix(device, &l.attn_q)?,
        k: upload_matrix(device, &l.attn_k)?,
        v: upload_matrix(device, &l.attn_v)?,
        o: upload_matrix(device, &l.attn_output)?,
        router: upload_matrix(device, &l.ffn_gate_inp)?,
        gate_exps: upload_matrix(device, &l.ffn_gate_exps)?,
        up_exps: upload_matrix(device, &l.ffn_up_exps)?,
        down_exps: upload_matrix(device, &l.ffn_down_exps)?,
    })
}

/// A 2-D matrix or 3-D expert stack, in its blocks.
fn upload_matrix(device: &CudaDevice, t: &WeightTensor) -> Result<DeviceMatrix, CudaError> {
    let experts = t.dims.get(2).copied().unwrap_or(1);
    let rows = t.dims.get(1).copied().unwrap_or(1);
    device.upload_matrix(t.ty, t.row_len(), rows, experts, t.bytes())
}

/// A norm vector, dequantised to f32 on the host (the CPU's exact f32 dequantisation).
fn upload_vector(device: &CudaDevice, t: &WeightTensor) -> Result<DeviceBuffer<f32>, CudaError> {
    let mut v = vec![0.0f32; t.n_elements()];
    dequantize_row(t.ty, t.bytes(), &mut v);
    device.upload(&v)
}

/// The RoPE cosines and sines of the `exact` policy: the host's f32 table (the `cpu` backend's values)
/// and its copy on the device, `[position][head_dim / 2]`.
struct ExactRope {
    table: RopeTable<f32>,
    cos: DeviceBuffer<f32>,
    sin: DeviceBuffer<f32>,
    /// Positions uploaded.
    uploaded: usize,
}

impl ExactRope {
    fn new(device: &CudaDevice, cfg: &ModelConfig) -> Result<Self, CudaError> {
        let mut rope = ExactRope {
            table: RopeTable::new(cfg.head_dim, cfg.rope_theta),
            cos: device.alloc_zeros(0)?,
            sin: device.alloc_zeros(0)?,
            uploaded: 0,
        };
        rope.ensure(device, cfg, INITIAL_KV_POSITIONS.min(cfg.context_length.max(1)))?;
        Ok(rope)
    }

    /// Makes the device tables hold `positions` (growing them to at least twice their size, at most the
    /// context length).
    fn ensure(&mut self, device: &CudaDevice, cfg: &ModelConfig, positions: usize) -> Result<(), CudaError> {
        if positions <= self.uploaded {
            return Ok(());
        }
        let n = positions.max(2 * self.uploaded).min(cfg.context_length.max(positions));
        self.table.ensure(n);
        let (cos, sin) = self.table.tables();
        self.cos = device.upload(cos)?;
        self.sin = device.upload(sin)?;
        self.uploaded = n;
        Ok(())
    }

    fn slices(&self) -> (DevSlice<'_, f32>, DevSlice<'_, f32>) {
        (self.cos.as_slice(), self.sin.as_slice())
    }
}

/// Keys and values of every layer, `[position][kv_dim]`, after norm and RoPE.
struct KvCache {
    keys: Vec<DeviceBuffer<f32>>,
    values: Vec<DeviceBuffer<f32>>,
    /// Positions each buffer holds.
    capacity: usize,
}

/// Activations for up to `capacity` tokens.
struct Workspace {
    capacity: usize,
    tokens: DeviceBuffer<i32>,
    /// The position of a decode step, read by the kernels of the captured decode graph.
    pos: DeviceBuffer<i32>,
    /// The block counter of the one-token router (`CudaDevice::router_topk`; 0 between launches).
    router_counter: DeviceBuffer<i32>,
    /// The residual stream `[T][hidden]`.
    x: DeviceBuffer<f32>,
    /// A normed copy of it.
    h: DeviceBuffer<f32>,
    q: DeviceBuffer<f32>,
    attn: DeviceBuffer<f32>,
    router_logits: DeviceBuffer<f32>,
    expert_ids: DeviceBuffer<i32>,
    expert_weights: DeviceBuffer<f32>,
    groups: ExpertGroups,
    /// Per routed slot `[T * k][expert_ffn]`: the gate projection, then silu(gate) * up.
    gate: DeviceBuffer<f32>,
    act: DeviceBuffer<f32>,
    /// Per routed slot `[T * k][hidden]`: the expert outputs before weighting.
    expert_out: DeviceBuffer<f32>,
    /// `[rows][vocab]` for the rows whose logits are wanted.
    logits: DeviceBuffer<f32>,
}

impl Workspace {
    fn new(device: &CudaDevice, cfg: &ModelConfig, capacity: usize) -> Result<Self, CudaError> {
        let slots = capacity * cfg.n_expert_used;
        Ok(Workspace {
            capacity,
            tokens: device.alloc_zeros(capacity)?,
            pos: device.alloc_zeros(1)?,
            router_counter: device.alloc_zeros(1)?,
            x: device.alloc_zeros(capacity * cfg.hidden)?,
            h: device.alloc_zeros(capacity * cfg.hidden)?,
            q: device.alloc_zeros(capacity * cfg.q_dim())?,
            attn: device.alloc_zeros(capacity * cfg.q_dim())?,
            router_logits: device.alloc_zeros(capacity * cfg.n_expert)?,
            expert_ids: device.alloc_zeros(slots)?,
            expert_weights: device.alloc_zeros(slots)?,
            groups: device.expert_groups(cfg.n_expert, slots)?,
            gate: device.alloc_zeros(slots * cfg.expert_ffn)?,
            act: device.alloc_zeros(slots * cfg.expert_ffn)?,
            expert_out: device.alloc_zeros(slots * cfg.hidden)?,
            logits: device.alloc_zeros(cfg.vocab)?,
        })
    }
}

/// The CUDA forward: the device, the uploaded model, the KV cache and the activations.
struct CudaForward {
    device: Arc<CudaDevice>,
    weights: Arc<ModelWeights>,
    policy: Policy,
    model: DeviceModel,
    cache: KvCache,
    work: Workspace,
    /// Positions held in the cache.
    n_cached: usize,
    /// The RoPE tables of the `exact` policy (`None` under `fast`).
    exact_rope: Option<ExactRope>,
    /// The `fast` decode step (embedding, every layer, logits of one token) captured once and replayed at
    /// each step; the position comes from `work.pos`. Dropped whenever a buffer it uses is reallocated.
    decode_graph: Option<DeviceGraph>,
}

impl CudaForward {
    fn new(device: Arc<CudaDevice>, weights: Arc<ModelWeights>, policy: Policy) -> Result<Self, EngineError> {
        let cfg = &weights.config;
        let model =
            DeviceModel::upload(&device, &weights).map_err(|e| engine_error("uploading the weights", e))?;
        let positions = INITIAL_KV_POSITIONS.min(cfg.context_length.max(1));
        let cache =
            new_cache(&device, cfg, positions).map_err(|e| engine_error("allocating the KV cache", e))?;
        let work = Workspace::new(&device, cfg, 1).map_err(|e| engine_error("allocating activations", e))?;
        let exact_rope = match policy {
            Policy::Fast => None,
            Policy::Exact => {
                Some(ExactRope::new(&device, cfg).map_err(|e| engine_error("uploading the RoPE tables", e))?)
            }
        };
        Ok(CudaForward {
            device,
            weights,
            policy,
            model,
            cache,
            work,
            n_cached: 0,
            exact_rope,
            decode_graph: None,
        })
    }

    fn cfg(&self) -> &ModelConfig {
        &self.weights.config
    }

    /// Runs `tokens` at positions `n_cached..` and appends them to the cache.
    fn run(&mut self, tokens: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>, EngineError> {
        let start = self.n_cached;
        check_tokens(self.cfg(), tokens, start)?;
        let n = tokens.len();
        self.ensure_workspace(n)?;
        self.ensure_cache(start + n)?;
        self.ensure_rope(start + n)?;
        if n == 1 && trace.is_none() && self.policy == Policy::Fast && !self.device.syncs_each_launch() {
            return self.decode_step(tokens[0], start);
        }
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        self.embed(&ids).map_err(|e| engine_error("looking up the embeddings", e))?;

        let recording = trace.is_some();
        let weights = Arc::clone(&self.weights);
        let mut layer_traces = Vec::new();
        for l in 0..weights.config.n_layer {
            let (keys, values) = (&mut self.cache.keys[l], &mut self.cache.values[l]);
            let stage = || format!("running layer {l}");
            let layer = Layer { d: &self.device, cfg: &weights.config, model: &self.model, l };
            match &self.exact_rope {
                None => layer.run(&mut self.work, keys, values, n, start),
                Some(rope) => layer.run_exact(&mut self.work, keys, values, n, start, rope.slices()),
            }
            .map_err(|e| engine_error(&stage(), e))?;
            if recording {
                layer_traces.push(self.layer_trace(n).map_err(|e| engine_error(&stage(), e))?);
            }
        }
        self.n_cached = start + n;

        let vocab = self.cfg().vocab;
        let rows = if recording { n } else { 1 };
        let logits = self.lm_head(n, rows).map_err(|e| engine_error("computing the logits", e))?;
        if let Some(trace) = trace {
            trace.backend = BackendKind::Cuda.to_string();
            trace.policy = self.policy.to_string();
            trace.precision = Precision::F32;
            trace.tokens = tokens.to_vec();
            trace.layers = layer_traces;
            trace.logits = Matrix::from_f32(n, vocab, &logits);
        }
        Ok(logits[(rows - 1) * vocab..].to_vec())
    }

    /// One token at position `pos` through the captured decode graph (captured on first use): the same
    /// kernels, and so the same values, as [`CudaForward::run`] on one token.
    fn decode_step(&mut self, token: u32, pos: usize) -> Result<Vec<f32>, EngineError> {
        let vocab = self.cfg().vocab;
        self.ensure_logits(1).map_err(|e| engine_error("allocating the logits", e))?;
        let step = || format!("decoding at position {pos}");
        let pos_i = i32::try_from(pos).map_err(|_| EngineError::Cuda {
            stage: step(),
            message: format!("position {pos} exceeds the kernels' int range"),
        })?;
        let d = Arc::clone(&self.device);
        d.copy_to_device(&[token as i32], self.work.tokens.as_mut()).map_err(|e| engine_error(&step(), e))?;
        d.copy_to_device(&[pos_i], self.work.pos.as_mut()).map_err(|e| engine_error(&step(), e))?;
        if self.decode_graph.is_none() {
            let graph = d
                .capture(|| self.enqueue_decode())
                .map_err(|e| engine_error("capturing the decode step", e))?;
            self.decode_graph = Some(graph);
        }
        if let Some(graph) = &self.decode_graph {
            d.replay(graph).map_err(|e| engine_error(&step(), e))?;
        }
        self.n_cached = pos + 1;
        d.download(self.work.logits.slice(0..vocab).map_err(|e| engine_error(&step(), e))?)
            .map_err(|e| engine_error(&step(), e))
    }

    /// Queues one decode step at the position in `work.pos`: embedding of `work.tokens[0]`, every layer
    /// (its key and value into the cache row of that position), final norm and logits into `work.logits`.
    fn enqueue_decode(&mut self) -> Result<(), CudaError> {
        let CudaForward { device, weights, model, cache, work, .. } = self;
        let (d, cfg) = (&**device, &weights.config);
        let (hidden, vocab) = (cfg.hidden, cfg.vocab);
        d.get_rows(&model.token_embd, work.tokens.slice(0..1)?, work.x.slice_mut(0..hidden)?)?;
        for l in 0..cfg.n_layer {
            let layer = Layer { d, cfg, model, l };
            layer.decode(work, &mut cache.keys[l], &mut cache.values[l], cache.capacity)?;
        }
        let (norm, eps) = (model.output_norm.as_slice(), cfg.rms_eps as f32);
        d.rmsnorm(work.x.slice(0..hidden)?, norm, 1, hidden, eps, work.h.slice_mut(0..hidden)?)?;
        d.matvec(model.output(), work.h.slice(0..hidden)?, 1, work.logits.slice_mut(0..vocab)?, false)
    }

    /// Makes the logits buffer hold `rows` rows.
    fn ensure_logits(&mut self, rows: usize) -> Result<(), CudaError> {
        let vocab = self.weights.config.vocab;
        if self.work.logits.len() < rows * vocab {
            self.decode_graph = None;
            self.work.logits = self.device.alloc_zeros(rows * vocab)?;
        }
        Ok(())
    }

    /// Grows the activations to hold `n` tokens (to the next power of two, so growth is rare).
    fn ensure_workspace(&mut self, n: usize) -> Result<(), EngineError> {
        if n > self.work.capacity {
            let capacity = n.next_power_of_two();
            self.decode_graph = None;
            let cfg = &self.weights.config;
            let grow = |work: &mut Workspace| -> Result<(), CudaError> {
                // Free the old buffers first: their memory may be needed for the new ones.
                *work = Workspace::new(&self.device, cfg, 1)?;
                *work = Workspace::new(&self.device, cfg, capacity)?;
                Ok(())
            };
            grow(&mut self.work).map_err(|e| engine_error("allocating activations", e))?;
        }
        Ok(())
    }

    /// Under `exact`, makes the device RoPE tables hold `positions`.
    fn ensure_rope(&mut self, positions: usize) -> Result<(), EngineError> {
        match &mut self.exact_rope {
            Some(rope) => rope
                .ensure(&self.device, &self.weights.config, positions)
                .map_err(|e| engine_error("uploading the RoPE tables", e)),
            None => Ok(()),
        }
    }

    /// Grows the KV cache to hold `positions`, keeping the cached ones.
    fn ensure_cache(&mut self, positions: usize) -> Result<(), EngineError> {
        if positions <= self.cache.capacity {
            return Ok(());
        }
        let cfg = &self.weights.config;
        let capacity = positions.max(2 * self.cache.capacity).min(cfg.context_length);
        self.decode_graph = None;
        let mut grown =
            new_cache(&self.device, cfg, capacity).map_err(|e| engine_error("growing the KV cache", e))?;
        let kept = self.n_cached * cfg.kv_dim();
        let copy = |src: &DeviceBuffer<f32>, dst: &mut DeviceBuffer<f32>| -> Result<(), CudaError> {
            self.device.copy_on_device(src.slice(0..kept)?, dst.slice_mut(0..kept)?)
        };
        for l in 0..cfg.n_layer {
            copy(&self.cache.keys[l], &mut grown.keys[l])
                .and_then(|_| copy(&self.cache.values[l], &mut grown.values[l]))
                .map_err(|e| engine_error("growing the KV cache", e))?;
        }
        self.cache = grown;
        Ok(())
    }

    /// `x[t] = embedding row ids[t]`.
    fn embed(&mut self, ids: &[i32]) -> Result<(), CudaError> {
        let hidden = self.cfg().hidden;
        let w = &mut self.work;
        self.device.copy_to_device(ids, w.tokens.as_mut())?;
        let out = w.x.slice_mut(0..ids.len() * hidden)?;
        self.device.get_rows(&self.model.token_embd, w.tokens.slice(0..ids.len())?, out)
    }

    /// Copies layer taps of the `n` tokens back: residual stream, router logits, choices, weights.
    fn layer_trace(&self, n: usize) -> Result<LayerTrace, CudaError> {
        let cfg = self.cfg();
        let (k, d) = (cfg.n_expert_used, &self.device);
        let w = &self.work;
        let hidden = d.download(w.x.slice(0..n * cfg.hidden)?)?;
        let logits = d.download(w.router_logits.slice(0..n * cfg.n_expert)?)?;
        let ids = d.download(w.expert_ids.slice(0..n * k)?)?;
        let weights = d.download(w.expert_weights.slice(0..n * k)?)?;
        Ok(LayerTrace {
            hidden: Matrix::from_f32(n, cfg.hidden, &hidden),
            router_logits: Matrix::from_f32(n, cfg.n_expert, &logits),
            router_experts: ids.iter().map(|&e| e as u32).collect(),
            router_weights: Matrix::from_f32(n, k, &weights),
        })
    }

    /// Logits of the last `rows` of the `n` positions: final RMSNorm, then the output projection.
    fn lm_head(&mut self, n: usize, rows: usize) -> Result<Vec<f32>, CudaError> {
        self.ensure_logits(rows)?;
        let cfg = &self.weights.config;
        let (hidden, vocab) = (cfg.hidden, cfg.vocab);
        let w = &mut self.work;
        let x = w.x.slice((n - rows) * hidden..n * hidden)?;
        let h = w.h.slice_mut(0..rows * hidden)?;
        let (norm, eps) = (self.model.output_norm.as_slice(), cfg.rms_eps as f32);
        let logits = w.logits.slice_mut(0..rows * vocab)?;
        let output = self.model.output();
        if self.policy == Policy::Exact {
            self.device.rmsnorm_exact(x, norm, rows, hidden, eps, h)?;
            let rows_of = ExactRows::Tokens { n_tok: rows };
            self.device.matvec_exact(output, w.h.slice(0..rows * hidden)?, rows_of, logits, None, false)?;
        } else {
            self.device.rmsnorm(x, norm, rows, hidden, eps, h)?;
            self.device.matvec(output, w.h.slice(0..rows * hidden)?, rows, logits, false)?;
        }
        self.device.download(w.logits.slice(0..rows * vocab)?)
    }
}

fn new_cache(device: &CudaDevice, cfg: &ModelConfig, positions: usize) -> Result<KvCache, CudaError> {
    let len = positions * cfg.kv_dim();
    let mut keys = Vec::with_capacity(cfg.n_layer);
    let mut values = Vec::with_capacity(cfg.n_layer);
    for _ in 0..cfg.n_layer {
        keys.push(device.alloc_zeros(len)?);
        values.push(device.alloc_zeros(len)?);
    }
    Ok(KvCache { keys, values, capacity: positions })
}

/// Whether layer `lw`'s experts can run through the fused kernels (`moe_gate_up`, `moe_down_combine`):
/// gate and up projections of one shape and format, at most [`FUSED_MAX_SLOTS`] experts per token.
fn fused_experts(lw: &DeviceLayer, k: usize) -> bool {
    let (g, u) = (&lw.gate_exps, &lw.up_exps);
    k <= FUSED_MAX_SLOTS
        && (g.ty(), g.cols(), g.rows(), g.experts()) == (u.ty(), u.cols(), u.rows(), u.experts())
}

/// Decoder layer `l` of a model on a device.
struct Layer<'a> {
    d: &'a CudaDevice,
    cfg: &'a ModelConfig,
    model: &'a DeviceModel,
    l: usize,
}

impl Layer<'_> {
    /// The layer on the `n` tokens in `work.x` at positions `pos0..pos0 + n`, whose keys and values
    /// go to positions `pos0..` of `keys` / `values` (which hold the earlier positions already): the fast
    /// kernels.
    fn run(
        &self,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        values: &mut DeviceBuffer<f32>,
        n: usize,
        pos0: usize,
    ) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l } = *self;
        let lw = &model.layers[l];
        let (hidden, qd, kvd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let eps = cfg.rms_eps as f32;
        let Workspace { x, h, q, attn, .. } = &mut *work;
        let xs = 0..n * hidden;
        let new_kv = pos0 * kvd..(pos0 + n) * kvd;
        let all_kv = 0..(pos0 + n) * kvd;

        // Attention block: x += o · attn(rope(norm(q)), rope(norm(k)), v), over norm(x).
        d.rmsnorm(x.slice(xs.clone())?, lw.attn_norm.as_slice(), n, hidden, eps, h.slice_mut(xs.clone())?)?;
        let hn = h.slice(xs.clone())?;
        d.matvec(&lw.q, hn, n, q.slice_mut(0..n * qd)?, false)?;
        d.matvec(&lw.k, hn, n, keys.slice_mut(new_kv.clone())?, false)?;
        d.matvec(&lw.v, hn, n, values.slice_mut(new_kv.clone())?, false)?;
        let inv_freq = model.inv_freq.as_slice();
        let q_norm = Some((lw.q_norm.as_slice(), eps));
        d.head_norm_rope(q.slice_mut(0..n * qd)?, qd, n, cfg.n_head, cfg.head_dim, q_norm, pos0, inv_freq)?;
        let k_norm = Some((lw.k_norm.as_slice(), eps));
        d.head_norm_rope(
            keys.slice_mut(new_kv)?,
            kvd,
            n,
            cfg.n_kv_head,
            cfg.head_dim,
            k_norm,
            pos0,
            inv_freq,
        )?;
        let shape = self.attention_shape(n, pos0);
        let scale = (1.0 / (cfg.head_dim as f64).sqrt()) as f32;
        let (kc, vc) = (keys.slice(all_kv.clone())?, values.slice(all_kv)?);
        d.attention(q.slice(0..n * qd)?, kc, vc, attn.slice_mut(0..n * qd)?, shape, scale)?;
        d.matvec(&lw.o, attn.slice(0..n * qd)?, n, x.slice_mut(xs)?, true)?;
        self.moe(work, n)
    }

    /// [`Layer::run`] on one token whose position is read from the device (`work.pos[0]`), over caches
    /// of `capacity` positions: the kernels of a captured decode graph, which replays at any position. The
    /// same kernels as `run` on one token, so the same values.
    fn decode(
        &self,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        values: &mut DeviceBuffer<f32>,
        capacity: usize,
    ) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l } = *self;
        let lw = &model.layers[l];
        let (hidden, qd, kvd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let eps = cfg.rms_eps as f32;
        let Workspace { x, h, q, attn, pos, .. } = &mut *work;
        let pos = pos.slice(0..1)?;
        let (xs, all_kv) = (0..hidden, 0..capacity * kvd);

        d.rmsnorm(x.slice(xs.clone())?, lw.attn_norm.as_slice(), 1, hidden, eps, h.slice_mut(xs.clone())?)?;
        let hn = h.slice(xs.clone())?;
        d.matvec(&lw.q, hn, 1, q.slice_mut(0..qd)?, false)?;
        d.matvec_to_row(&lw.k, hn, keys.slice_mut(all_kv.clone())?, capacity, pos)?;
        d.matvec_to_row(&lw.v, hn, values.slice_mut(all_kv.clone())?, capacity, pos)?;
        let (inv_freq, hd) = (model.inv_freq.as_slice(), cfg.head_dim);
        d.head_norm_rope_qk(
            q.slice_mut(0..qd)?,
            (cfg.n_head, lw.q_norm.as_slice()),
            keys.slice_mut(all_kv.clone())?,
            (kvd, cfg.n_kv_head, lw.k_norm.as_slice()),
            hd,
            eps,
            inv_freq,
            (pos, capacity),
        )?;
        let shape = self.attention_shape(1, 0);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let (kc, vc) = (keys.slice(all_kv.clone())?, values.slice(all_kv)?);
        let out = attn.slice_mut(0..qd)?;
        d.attention_with(q.slice(0..qd)?, kc, vc, out, shape, scale, Some((pos, capacity)))?;
        d.matvec(&lw.o, attn.slice(0..qd)?, 1, x.slice_mut(xs)?, true)?;
        self.moe(work, 1)
    }

    fn attention_shape(&self, n_tok: usize, pos0: usize) -> AttentionShape {
        let cfg = self.cfg;
        AttentionShape { n_tok, n_head: cfg.n_head, n_kv_head: cfg.n_kv_head, head_dim: cfg.head_dim, pos0 }
    }

    /// The MoE block of the fast kernels on the `n` tokens in `work.x`: x += sum over the chosen experts
    /// of weight * down(silu(gate · h) * (up · h)), over norm(x).
    fn moe(&self, work: &mut Workspace, n: usize) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l } = *self;
        let lw = &model.layers[l];
        let hidden = cfg.hidden;
        let (n_exp, k) = (cfg.n_expert, cfg.n_expert_used);
        let eps = cfg.rms_eps as f32;
        let Workspace {
            x,
            h,
            router_logits,
            router_counter,
            expert_ids,
            expert_weights,
            groups,
            gate,
            act,
            expert_out,
            ..
        } = work;
        let xs = 0..n * hidden;
        d.rmsnorm(x.slice(xs.clone())?, lw.ffn_norm.as_slice(), n, hidden, eps, h.slice_mut(xs.clone())?)?;
        let hn = h.slice(xs.clone())?;
        let slots = n * k;
        let (logits, norm_topk) = (router_logits.slice_mut(0..n * n_exp)?, cfg.norm_topk_prob);
        let (out_ids, out_w) = (expert_ids.slice_mut(0..slots)?, expert_weights.slice_mut(0..slots)?);
        if n == 1 {
            // One token: router, softmax and top-k in one launch (the values of the two below).
            d.router_topk(&lw.router, hn, logits, k, norm_topk, out_ids, out_w, router_counter.as_mut())?;
        } else {
            d.matvec(&lw.router, hn, n, logits, false)?;
            let logits = router_logits.slice(0..n * n_exp)?;
            d.softmax_topk(logits, n, n_exp, k, norm_topk, out_ids, out_w)?;
        }
        let ids: DevSlice<'_, i32> = expert_ids.slice(0..slots)?;
        let routing = if slots < n_exp {
            Routing::PerSlot { ids }
        } else {
            d.moe_group(ids, slots, groups)?;
            Routing::Grouped(&*groups)
        };
        let ffn = cfg.expert_ffn;
        let wts = expert_weights.slice(0..slots)?;
        if let Routing::PerSlot { .. } = routing
            && fused_experts(lw, k)
        {
            // Few slots: gate + up + SwiGLU in one pass, then down + weighted sum + residual in another
            // (the same values as the four launches below).
            d.moe_gate_up(&lw.gate_exps, &lw.up_exps, hn, k, ids, slots, act.slice_mut(0..slots * ffn)?)?;
            let a = act.slice(0..slots * ffn)?;
            return d.moe_down_combine(&lw.down_exps, a, ids, wts, n, k, x.slice_mut(xs)?);
        }
        d.moe_matvec(&lw.gate_exps, hn, k, routing, slots, gate.slice_mut(0..slots * ffn)?, None)?;
        let g = Some(gate.slice(0..slots * ffn)?);
        d.moe_matvec(&lw.up_exps, hn, k, routing, slots, act.slice_mut(0..slots * ffn)?, g)?;
        let a = act.slice(0..slots * ffn)?;
        d.moe_matvec(&lw.down_exps, a, 1, routing, slots, expert_out.slice_mut(0..slots * hidden)?, None)?;
        d.moe_combine(expert_out.slice(0..slots * hidden)?, ids, wts, n, k, hidden, n_exp, x.slice_mut(xs)?)
    }

    /// As [`Layer::run`] with the `exact` kernels (the `cpu` backend's operation order, bit for bit) and the
    /// RoPE tables `rope` (cosines, sines). Experts run one block row per routed slot.
    fn run_exact(
        &self,
        work: &mut Workspace,
        keys: &mut DeviceBuffer<f32>,
        values: &mut DeviceBuffer<f32>,
        n: usize,
        pos0: usize,
        rope: (DevSlice<'_, f32>, DevSlice<'_, f32>),
    ) -> Result<(), CudaError> {
        let Layer { d, cfg, model, l } = *self;
        let lw = &model.layers[l];
        let (hidden, qd, kvd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let (n_exp, k) = (cfg.n_expert, cfg.n_expert_used);
        let eps = cfg.rms_eps as f32;
        let Workspace {
            x, h, q, attn, router_logits, expert_ids, expert_weights, gate, act, expert_out, ..
        } = work;
        let xs = 0..n * hidden;
        let new_kv = pos0 * kvd..(pos0 + n) * kvd;
        let all_kv = 0..(pos0 + n) * kvd;
        let tokens = ExactRows::Tokens { n_tok: n };

        // Attention block.
        d.rmsnorm_exact(
            x.slice(xs.clone())?,
            lw.attn_norm.as_slice(),
            n,
            hidden,
            eps,
            h.slice_mut(xs.clone())?,
        )?;
        let hn = h.slice(xs.clone())?;
        d.matvec_exact(&lw.q, hn, tokens, q.slice_mut(0..n * qd)?, None, false)?;
        d.matvec_exact(&lw.k, hn, tokens, keys.slice_mut(new_kv.clone())?, None, false)?;
        d.matvec_exact(&lw.v, hn, tokens, values.slice_mut(new_kv.clone())?, None, false)?;
        let (hd, q_norm, k_norm) = (cfg.head_dim, (lw.q_norm.as_slice(), eps), (lw.k_norm.as_slice(), eps));
        d.head_norm_rope_exact(q.slice_mut(0..n * qd)?, qd, n, cfg.n_head, hd, q_norm, pos0, rope)?;
        d.head_norm_rope_exact(keys.slice_mut(new_kv)?, kvd, n, cfg.n_kv_head, hd, k_norm, pos0, rope)?;
        let shape =
            AttentionShape { n_tok: n, n_head: cfg.n_head, n_kv_head: cfg.n_kv_head, head_dim: hd, pos0 };
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let (kc, vc) = (keys.slice(all_kv.clone())?, values.slice(all_kv)?);
        d.attention_exact(q.slice(0..n * qd)?, kc, vc, attn.slice_mut(0..n * qd)?, shape, scale)?;
        d.matvec_exact(&lw.o, attn.slice(0..n * qd)?, tokens, x.slice_mut(xs.clone())?, None, true)?;

        // MoE block.
        d.rmsnorm_exact(
            x.slice(xs.clone())?,
            lw.ffn_norm.as_slice(),
            n,
            hidden,
            eps,
            h.slice_mut(xs.clone())?,
        )?;
        let hn = h.slice(xs.clone())?;
        d.matvec_exact(&lw.router, hn, tokens, router_logits.slice_mut(0..n * n_exp)?, None, false)?;
        let slots = n * k;
        d.softmax_topk_exact(
            router_logits.slice(0..n * n_exp)?,
            n,
            n_exp,
            k,
            cfg.norm_topk_prob,
            expert_ids.slice_mut(0..slots)?,
            expert_weights.slice_mut(0..slots)?,
        )?;
        let ids: DevSlice<'_, i32> = expert_ids.slice(0..slots)?;
        let ffn = cfg.expert_ffn;
        let per_token = ExactRows::Slots { ids, in_div: k };
        d.matvec_exact(&lw.gate_exps, hn, per_token, gate.slice_mut(0..slots * ffn)?, None, false)?;
        let g = Some(gate.slice(0..slots * ffn)?);
        d.matvec_exact(&lw.up_exps, hn, per_token, act.slice_mut(0..slots * ffn)?, g, false)?;
        let a = act.slice(0..slots * ffn)?;
        let per_slot = ExactRows::Slots { ids, in_div: 1 };
        d.matvec_exact(&lw.down_exps, a, per_slot, expert_out.slice_mut(0..slots * hidden)?, None, false)?;
        let wts = expert_weights.slice(0..slots)?;
        d.moe_combine_exact(
            expert_out.slice(0..slots * hidden)?,
            ids,
            wts,
            n,
            k,
            hidden,
            n_exp,
            x.slice_mut(xs)?,
        )
    }
}

impl Forward for CudaForward {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn policy(&self) -> Policy {
        self.policy
    }

    fn config(&self) -> &ModelConfig {
        self.cfg()
    }

    fn forward(&mut self, tokens: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>, EngineError> {
        check_tokens(self.cfg(), tokens, 0)?;
        self.n_cached = 0;
        self.run(tokens, trace)
    }

    fn step(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        self.run(&[token], None)
    }

    fn run_layer(&mut self, layer: usize, input: &Matrix) -> Result<LayerTrace, EngineError> {
        let cfg = self.weights.config.clone();
        if layer >= cfg.n_layer {
            return Err(EngineError::LayerOutOfRange { layer, n_layer: cfg.n_layer });
        }
        let (n, hidden) = (input.rows, cfg.hidden);
        if n == 0 || input.cols != hidden || input.data.len() != n * hidden {
            return Err(EngineError::InputShape { rows: input.rows, cols: input.cols, hidden });
        }
        if n > cfg.context_length {
            return Err(EngineError::ContextFull {
                context_length: cfg.context_length,
                cached: 0,
                requested: n,
            });
        }
        self.ensure_workspace(n)?;
        self.ensure_rope(n)?;
        let stage = format!("running layer {layer} alone");
        let x: Vec<f32> = input.data.iter().map(|&v| v as f32).collect();
        let d = &self.device;
        let run = |work: &mut Workspace| -> Result<(), CudaError> {
            // A scratch cache of n positions: the forward's own cache is neither read nor changed.
            let mut keys = d.alloc_zeros::<f32>(n * cfg.kv_dim())?;
            let mut values = d.alloc_zeros::<f32>(n * cfg.kv_dim())?;
            d.copy_to_device(&x, work.x.slice_mut(0..n * hidden)?)?;
            let run = Layer { d, cfg: &cfg, model: &self.model, l: layer };
            match &self.exact_rope {
                None => run.run(work, &mut keys, &mut values, n, 0)?,
                Some(rope) => run.run_exact(work, &mut keys, &mut values, n, 0, rope.slices())?,
            }
            Ok(())
        };
        run(&mut self.work).map_err(|e| engine_error(&stage, e))?;
        self.layer_trace(n).map_err(|e| engine_error(&stage, e))
    }
}

#[cfg(test)]
mod fault_tests {
    use super::*;

    /// Issue 13 item 5 without a GPU: a fault mid-run (out of device memory, an NVRTC compile failure, a
    /// driver error) becomes an engine failure (not "CUDA unavailable", which would make the gate ignore
    /// the trials) whose message says what happened, where, and what to do; the gate wraps it with the
    /// forward it was running and exits 2 (`cargo_moe_gate::run_code`).
    #[test]
    fn device_faults_are_failures_that_say_what_happened_and_what_to_do() {
        let cases = [
            (
                CudaError::OutOfMemory {
                    stage: "allocating the KV cache".into(),
                    bytes: 1 << 30,
                    free: 4096,
                    total: 1 << 34,
                },
                "CUDA failed while the forward: out of device memory while allocating the KV cache: 1073741824 bytes \
                 requested, 4096 of 17179869184 bytes free; use a smaller model or prompt, or a device with more memory",
            ),
            (
                CudaError::Compile {
                    program: "forward.cu".into(),
                    arch: "compute_90".into(),
                    status: "NVRTC_ERROR_COMPILATION".into(),
                    log: "forward.cu(12): error".into(),
                },
                "CUDA failed while the forward: NVRTC could not compile forward.cu for compute_90 \
                 (NVRTC_ERROR_COMPILATION); the kernels' sources are kernels/src/cuda/*.cu, and the log names \
                 the file and line. Compiler log:\nforward.cu(12): error",
            ),
            (
                CudaError::Driver {
                    stage: "copying the logits".into(),
                    message: "CUDA_ERROR_LAUNCH_FAILED".into(),
                },
                "CUDA failed while the forward: CUDA driver call failed while copying the logits: CUDA_ERROR_LAUNCH_FAILED",
            ),
        ];
        for (fault, expected) in cases {
            let e = engine_error("the forward", fault);
            assert!(matches!(e, EngineError::Cuda { .. }), "{e:?}");
            assert_eq!(e.to_string(), expected);
        }
        let absent =
            engine_error("opening the CUDA device", CudaError::NoDriver { reason: "no libcuda".into() });
        assert!(matches!(absent, EngineError::CudaUnavailable { .. }), "{absent:?}");
    }
}
