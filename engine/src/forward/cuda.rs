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
//! - The layer's step order is written once (`layer.rs`, `Layer::run`) for both policies, prompts,
//!   decode steps and isolated layers; `kernel_sets.rs` says how each step is computed under each policy.
//! - Under [`Policy::Exact`] every step runs the `*_exact` kernels instead: the canonical operation order
//!   of `docs/numerics.md`, the `cpu` backend's, with every operation explicitly rounded, and the RoPE
//!   cosines and sines taken from the host's table (`moe_kernels::cpu::RopeTable`, uploaded). The trace
//!   is then the `cpu` backend's bit for bit. Experts run one block row per routed slot.

mod kernel_sets;
mod layer;
mod seeded;

use kernel_sets::{Exact, Fast};
use layer::{At, Layer};

use std::sync::Arc;

use moe_kernels::cpu::RopeTable;
use moe_kernels::cuda::{
    CudaDevice, CudaError, DevSlice, DeviceBuffer, DeviceGraph, DeviceMatrix, ExactRows, ExpertGroups,
};
use moe_kernels::quant::dequantize_row;

use super::check_tokens;
use crate::backend::{BackendKind, Forward, Policy};
use crate::config::ModelConfig;
use crate::defect::Defect;
use crate::error::EngineError;
use crate::trace::{LayerTrace, Matrix, Precision, SubLayerTaps, Trace};
use crate::weights::{LayerWeights, ModelWeights, WeightTensor};

/// The device every forward uses (ordinal 0).
const DEVICE_ORDINAL: usize = 0;
/// KV-cache positions allocated at first; the cache doubles when a sequence outgrows it, up to the
/// model's context length (a production-shape context of 262144 positions would need 51 GB up front).
const INITIAL_KV_POSITIONS: usize = 256;

/// A CUDA forward of `weights` under `policy`: opens device 0 (compiling the kernels on first use) and
/// uploads the weights. [`Policy::Fast`] runs the fast kernels; [`Policy::Exact`] the canonical order of
/// `docs/numerics.md`, bit-identical to the `cpu` backend.
///
/// `defect` (only `cargo moe-gate selftest` passes one) seeds a catalogued mistake (`crate::defect`) into
/// the forward's orchestration (`cuda_seeded`).
pub fn create(
    weights: Arc<ModelWeights>,
    policy: Policy,
    defect: Option<Defect>,
) -> Result<Box<dyn Forward>, EngineError> {
    // A stream of its own: the decode graph is captured from this forward's stream, which no other
    // forward (on another thread) may queue work on meanwhile.
    let device = seeded::open_device(defect)
        .and_then(|d| d.fork())
        .map_err(|e| engine_error("opening the CUDA device", e))?;
    Ok(Box::new(CudaForward::new(device, weights, policy, defect)?))
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
    /// The routers in f32 for a seeded defect's kernel (`seeded::f32_routers`; empty otherwise).
    f32_routers: Vec<DeviceBuffer<f32>>,
}

impl DeviceModel {
    fn upload(device: &CudaDevice, w: &ModelWeights, defect: Option<Defect>) -> Result<Self, CudaError> {
        let cfg = &w.config;
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(l, lw)| upload_layer(device, lw, |t| seeded::expert_bytes(defect, l, cfg, t)))
            .collect::<Result<Vec<_>, _>>()?;
        let output = if w.tied_embeddings { None } else { Some(upload_matrix(device, &w.output)?) };
        let theta = seeded::rope_theta(defect, cfg);
        let inv_freq: Vec<f64> =
            (0..cfg.head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / cfg.head_dim as f64)).collect();
        Ok(DeviceModel {
            token_embd: upload_matrix(device, &w.token_embd)?,
            output,
            output_norm: upload_vector(device, &w.output_norm)?,
            layers,
            inv_freq: device.upload(&inv_freq)?,
            f32_routers: seeded::f32_routers(device, defect, w)?,
        })
    }

    fn output(&self) -> &DeviceMatrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }
}

/// Layer `l`'s weights; the expert stacks' bytes come from `experts` (as stored, but for a seeded defect).
fn upload_layer(
    device: &CudaDevice,
    l: &LayerWeights,
    experts: impl Fn(&WeightTensor) -> Vec<u8>,
) -> Result<DeviceLayer, CudaError> {
    let stack = |t: &WeightTensor| {
        let dims = (t.dims.get(2).copied().unwrap_or(1), t.dims.get(1).copied().unwrap_or(1));
        device.upload_matrix(t.ty, t.row_len(), dims.1, dims.0, &experts(t))
    };
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
        gate_exps: stack(&l.ffn_gate_exps)?,
        up_exps: stack(&l.ffn_up_exps)?,
        down_exps: stack(&l.ffn_down_exps)?,
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
    fn new(device: &CudaDevice, cfg: &ModelConfig, theta: f64) -> Result<Self, CudaError> {
        let mut rope = ExactRope {
            table: RopeTable::new(cfg.head_dim, theta),
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

/// One layer's sub-layer values, copied back from the device after each op when taps are asked for
/// (never in the captured decode graph). [`SubLayerTaps`] says what each one is.
#[derive(Default)]
struct DeviceTaps {
    attn_norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn_out: Vec<f32>,
    attn_proj: Vec<f32>,
    attn_residual: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// `[T * k][hidden]`: the slot-major `expert_out` buffer.
    expert_out: Vec<f32>,
    moe_out: Vec<f32>,
}

impl DeviceTaps {
    /// The taps of the `n` tokens the layer ran on.
    fn into_taps(self, cfg: &ModelConfig, n: usize) -> SubLayerTaps {
        let (hidden, q_dim, kv_dim) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        SubLayerTaps {
            attn_norm: Matrix::from_f32(n, hidden, &self.attn_norm),
            q: Matrix::from_f32(n, q_dim, &self.q),
            k: Matrix::from_f32(n, kv_dim, &self.k),
            v: Matrix::from_f32(n, kv_dim, &self.v),
            attn_out: Matrix::from_f32(n, q_dim, &self.attn_out),
            attn_proj: Matrix::from_f32(n, hidden, &self.attn_proj),
            attn_residual: Matrix::from_f32(n, hidden, &self.attn_residual),
            ffn_norm: Matrix::from_f32(n, hidden, &self.ffn_norm),
            expert_out: Matrix::from_f32(n, cfg.n_expert_used * hidden, &self.expert_out),
            moe_out: Matrix::from_f32(n, hidden, &self.moe_out),
            cache_keys: None,
            cache_values: None,
        }
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
    /// The seeded defect of `cargo moe-gate selftest`; `None` in every normal forward.
    defect: Option<Defect>,
}

impl CudaForward {
    fn new(
        device: Arc<CudaDevice>,
        weights: Arc<ModelWeights>,
        policy: Policy,
        defect: Option<Defect>,
    ) -> Result<Self, EngineError> {
        let cfg = &weights.config;
        let model = DeviceModel::upload(&device, &weights, defect)
            .map_err(|e| engine_error("uploading the weights", e))?;
        let positions = INITIAL_KV_POSITIONS.min(cfg.context_length.max(1));
        let cache =
            new_cache(&device, cfg, positions).map_err(|e| engine_error("allocating the KV cache", e))?;
        let work = Workspace::new(&device, cfg, 1).map_err(|e| engine_error("allocating activations", e))?;
        let exact_rope = match policy {
            Policy::Fast => None,
            Policy::Exact => {
                let theta = seeded::rope_theta(defect, cfg);
                Some(
                    ExactRope::new(&device, cfg, theta)
                        .map_err(|e| engine_error("uploading the RoPE tables", e))?,
                )
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
            defect,
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
        self.ensure_rope(start + n + seeded::rope_lead(self.defect))?;
        let graph = self.defect.is_none() && !self.device.syncs_each_launch();
        if n == 1 && trace.is_none() && self.policy == Policy::Fast && graph {
            return self.decode_step(tokens[0], start);
        }
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        self.embed(&ids).map_err(|e| engine_error("looking up the embeddings", e))?;

        let recording = trace.is_some();
        let record_taps = trace.as_ref().is_some_and(|t| t.record_sub_layers);
        let weights = Arc::clone(&self.weights);
        let cfg = &weights.config;
        let mut layer_traces = Vec::new();
        let mut sub_layers = Vec::new();
        for l in 0..cfg.n_layer {
            let (keys, values) = (&mut self.cache.keys[l], &mut self.cache.values[l]);
            let stage = || format!("running layer {l}");
            let layer = Layer { d: &self.device, cfg, model: &self.model, l, defect: self.defect };
            let mut taps = record_taps.then(DeviceTaps::default);
            let at = At::Positions { n, pos0: start };
            match &self.exact_rope {
                None => layer.run(&Fast, &mut self.work, keys, values, at, taps.as_mut()),
                Some(rope) => {
                    let exact = Exact { rope: rope.slices() };
                    layer.run(&exact, &mut self.work, keys, values, at, taps.as_mut())
                }
            }
            .map_err(|e| engine_error(&stage(), e))?;
            if recording {
                layer_traces.push(self.layer_trace(n).map_err(|e| engine_error(&stage(), e))?);
            }
            if let Some(taps) = taps {
                let mut taps = taps.into_taps(cfg, n);
                if start > 0 {
                    // A decode step: the cache rows its attention read, earlier positions included.
                    let cached = self.cache_rows(l, start + n).map_err(|e| engine_error(&stage(), e))?;
                    (taps.cache_keys, taps.cache_values) = (Some(cached.0), Some(cached.1));
                }
                sub_layers.push(taps);
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
            trace.sub_layers = sub_layers;
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

    /// One token at the next position through the `fast` decode step's own kernels (those the captured
    /// graph replays: K/V projections into the cache row, fused q/k norm and RoPE, attention at a device
    /// position), launched one by one, recording every layer's taps into `trace` and, when it asks for
    /// them, the sub-layer taps with the cache rows each layer's attention read. A defect of the decode
    /// kernels shows here as in the graph.
    fn decode_traced(&mut self, token: u32, trace: &mut Trace) -> Result<Vec<f32>, EngineError> {
        let pos = self.n_cached;
        check_tokens(self.cfg(), &[token], pos)?;
        self.ensure_workspace(1)?;
        self.ensure_cache(pos + 1)?;
        self.ensure_logits(1).map_err(|e| engine_error("allocating the logits", e))?;
        let stage = format!("decoding at position {pos} with taps");
        let pos_i = i32::try_from(pos).map_err(|_| EngineError::Cuda {
            stage: stage.clone(),
            message: format!("position {pos} exceeds the kernels' int range"),
        })?;
        let record_taps = trace.record_sub_layers;
        let weights = Arc::clone(&self.weights);
        let (d, cfg) = (Arc::clone(&self.device), &weights.config);
        let (hidden, vocab, capacity) = (cfg.hidden, cfg.vocab, self.cache.capacity);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        let mut sub_layers = Vec::new();
        let mut decode = || -> Result<Vec<f32>, CudaError> {
            d.copy_to_device(&[token as i32], self.work.tokens.as_mut())?;
            d.copy_to_device(&[pos_i], self.work.pos.as_mut())?;
            d.get_rows(
                &self.model.token_embd,
                self.work.tokens.slice(0..1)?,
                self.work.x.slice_mut(0..hidden)?,
            )?;
            for l in 0..cfg.n_layer {
                let layer = Layer { d: &d, cfg, model: &self.model, l, defect: self.defect };
                let mut taps = record_taps.then(DeviceTaps::default);
                let (keys, values) = (&mut self.cache.keys[l], &mut self.cache.values[l]);
                let at = At::DevicePosition { capacity, tap_pos: pos };
                layer.run(&Fast, &mut self.work, keys, values, at, taps.as_mut())?;
                layers.push(self.layer_trace(1)?);
                if let Some(taps) = taps {
                    let mut taps = taps.into_taps(cfg, 1);
                    let (keys, values) = self.cache_rows(l, pos + 1)?;
                    (taps.cache_keys, taps.cache_values) = (Some(keys), Some(values));
                    sub_layers.push(taps);
                }
            }
            let (norm, eps) = (self.model.output_norm.as_slice(), cfg.rms_eps as f32);
            let w = &mut self.work;
            d.rmsnorm(w.x.slice(0..hidden)?, norm, 1, hidden, eps, w.h.slice_mut(0..hidden)?)?;
            d.matvec(self.model.output(), w.h.slice(0..hidden)?, 1, w.logits.slice_mut(0..vocab)?, false)?;
            d.download(w.logits.slice(0..vocab)?)
        };
        let logits = decode().map_err(|e| engine_error(&stage, e))?;
        self.n_cached = pos + 1;
        trace.backend = BackendKind::Cuda.to_string();
        trace.policy = self.policy.to_string();
        trace.precision = Precision::F32;
        trace.tokens = vec![token];
        trace.layers = layers;
        trace.sub_layers = sub_layers;
        trace.logits = Matrix::from_f32(1, vocab, &logits);
        Ok(logits)
    }

    /// Queues one decode step at the position in `work.pos`: embedding of `work.tokens[0]`, every layer
    /// (its key and value into the cache row of that position), final norm and logits into `work.logits`.
    fn enqueue_decode(&mut self) -> Result<(), CudaError> {
        let CudaForward { device, weights, model, cache, work, .. } = self;
        let (d, cfg) = (&**device, &weights.config);
        let (hidden, vocab) = (cfg.hidden, cfg.vocab);
        d.get_rows(&model.token_embd, work.tokens.slice(0..1)?, work.x.slice_mut(0..hidden)?)?;
        for l in 0..cfg.n_layer {
            let layer = Layer { d, cfg, model, l, defect: None };
            let at = At::DevicePosition { capacity: cache.capacity, tap_pos: 0 };
            layer.run(&Fast, work, &mut cache.keys[l], &mut cache.values[l], at, None)?;
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

    /// The first `positions` rows of layer `l`'s cached keys and values.
    fn cache_rows(&self, l: usize, positions: usize) -> Result<(Matrix, Matrix), CudaError> {
        let kv_dim = self.cfg().kv_dim();
        let rows = 0..positions * kv_dim;
        let keys = self.device.download(self.cache.keys[l].slice(rows.clone())?)?;
        let values = self.device.download(self.cache.values[l].slice(rows)?)?;
        Ok((Matrix::from_f32(positions, kv_dim, &keys), Matrix::from_f32(positions, kv_dim, &values)))
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

    fn defect(&self) -> Option<Defect> {
        self.defect
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
        match self.policy {
            // `fast` decodes through the kernels of the captured graph: run those, launched one by one.
            // A seeded defect keeps the graph out of its steps (`run` carries the defect), so its traced
            // step is `run` too.
            Policy::Fast if self.defect.is_none() => self.decode_traced(token, trace),
            // `exact` has no graph: its steps are `run` on one token.
            Policy::Fast | Policy::Exact => self.run(&[token], Some(trace)),
        }
    }
}

impl CudaForward {
    /// Decoder layer `layer` alone on `input` (`Forward::run_layer`) over a scratch cache, with its
    /// sub-layer taps when `record`.
    fn layer_alone(
        &mut self,
        layer: usize,
        input: &Matrix,
        record: bool,
    ) -> Result<(LayerTrace, Option<SubLayerTaps>), EngineError> {
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
        let mut taps = record.then(DeviceTaps::default);
        let run = |work: &mut Workspace, taps: Option<&mut DeviceTaps>| -> Result<(), CudaError> {
            // A scratch cache of n positions: the forward's own cache is neither read nor changed.
            let mut keys = d.alloc_zeros::<f32>(n * cfg.kv_dim())?;
            let mut values = d.alloc_zeros::<f32>(n * cfg.kv_dim())?;
            d.copy_to_device(&x, work.x.slice_mut(0..n * hidden)?)?;
            let run = Layer { d, cfg: &cfg, model: &self.model, l: layer, defect: self.defect };
            let at = At::Positions { n, pos0: 0 };
            match &self.exact_rope {
                None => run.run(&Fast, work, &mut keys, &mut values, at, taps)?,
                Some(rope) => {
                    run.run(&Exact { rope: rope.slices() }, work, &mut keys, &mut values, at, taps)?
                }
            }
            Ok(())
        };
        run(&mut self.work, taps.as_mut()).map_err(|e| engine_error(&stage, e))?;
        let trace = self.layer_trace(n).map_err(|e| engine_error(&stage, e))?;
        Ok((trace, taps.map(|t| t.into_taps(&cfg, n))))
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
