//! The speed of a forward, measured the way docs/gate.md asks ("benchmarks, not timed tests"): prefill and
//! batch-1 decode tokens/s of one backend on one model, and how far decode is from the bandwidth bound.
//!
//! - Prefill: for each prompt length `n`, one warm-up `forward` of the `n`-token prompt, then `repeats`
//!   timed forwards without a trace; tokens/s = `n` / the median time.
//! - Decode: a [`DECODE_PREFILL`]-token prefill, then `decode` greedy `step`s (each feeds the argmax of
//!   the previous logits), each timed; the mean and standard deviation per token, tokens/s = 1 / mean.
//! - Roofline: the weight bytes one decoded token reads ([`decode_bytes_per_token`]) over a measured copy
//!   bandwidth ([`copy_bandwidth`]: device-to-device for `cuda`, host memory split over rayon's threads
//!   otherwise). A copy reads and writes every byte, so both are counted; that is the bandwidth a
//!   matrix-vector product streaming weights can hope for.
//!
//! `cargo moe-gate bench` and the `production_shape` bench of `engine/tests/cuda_forward.rs` both run
//! [`run`]; docs/benchmarks.md records its output.

use std::fmt;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::{BackendKind, Forward, Policy};
use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::weights::{ModelWeights, WeightTensor};

/// The version of [`BenchReport`]'s JSON form; raised when a field changes meaning or disappears.
pub const SCHEMA: u32 = 1;
/// Prompt length of the prefill that precedes the timed decode steps.
pub const DECODE_PREFILL: usize = 8;
/// Bytes copied by the bandwidth measurement: 1 GiB, far beyond any cache, so the copy streams memory.
pub const COPY_BYTES: usize = 1 << 30;
/// Copies timed by the bandwidth measurement; the fastest counts (the others met interference).
pub const COPY_REPEATS: usize = 5;

/// A benchmark that cannot be run as asked.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    // --- the plan ---
    /// A prefill length of 0 tokens.
    #[error("a prefill length is 0: every prefill needs at least one token")]
    ZeroPrefill,
    /// No timed repeat per prefill length.
    #[error("repeats is 0: each prefill length needs at least one timed forward")]
    ZeroRepeats,
    /// No decode step.
    #[error("decode is 0: the decode measurement needs at least one step")]
    ZeroDecode,
    /// A prefill longer than the model's context.
    #[error(
        "a prefill of {tokens} tokens exceeds the model's context length of {context_length}; give \
         prefill lengths up to {context_length}"
    )]
    PrefillTooLong { tokens: usize, context_length: usize },
    /// The decode steps and their prefill do not fit the model's context.
    #[error(
        "{steps} decode steps after the {DECODE_PREFILL}-token prefill need {} positions, more than the \
         model's context length of {context_length}; decode at most {} tokens",
        steps + DECODE_PREFILL,
        context_length.saturating_sub(DECODE_PREFILL)
    )]
    DecodeTooLong { steps: usize, context_length: usize },

    // --- measuring ---
    /// The host buffers of the bandwidth measurement could not be allocated.
    #[error(
        "cannot allocate 2 x {bytes} bytes of host memory to measure the copy bandwidth; free some \
         memory and run again"
    )]
    HostMemory { bytes: usize },
    /// A forward failed, or the device could not be used (see [`EngineError`]).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What to measure: prefill lengths, decode steps and timed repeats, each at least 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchPlan {
    prefill: Vec<usize>,
    decode: usize,
    repeats: usize,
}

impl BenchPlan {
    /// A plan timing a prefill of each length in `prefill` (`repeats` times each, after a warm-up) and
    /// `decode` greedy steps. Refuses a length, `decode` or `repeats` of 0.
    pub fn new(prefill: Vec<usize>, decode: usize, repeats: usize) -> Result<BenchPlan, BenchError> {
        if prefill.contains(&0) {
            return Err(BenchError::ZeroPrefill);
        }
        if repeats == 0 {
            return Err(BenchError::ZeroRepeats);
        }
        if decode == 0 {
            return Err(BenchError::ZeroDecode);
        }
        Ok(BenchPlan { prefill, decode, repeats })
    }

    /// The prefill lengths, in the order they are measured.
    pub fn prefill(&self) -> &[usize] {
        &self.prefill
    }

    /// The number of timed decode steps.
    pub fn decode(&self) -> usize {
        self.decode
    }

    /// The timed forwards per prefill length.
    pub fn repeats(&self) -> usize {
        self.repeats
    }

    /// Whether every forward of the plan fits the context of a model configured as `cfg`.
    pub fn check_fits(&self, cfg: &ModelConfig) -> Result<(), BenchError> {
        let context_length = cfg.context_length;
        if let Some(&tokens) = self.prefill.iter().find(|&&n| n > context_length) {
            return Err(BenchError::PrefillTooLong { tokens, context_length });
        }
        if DECODE_PREFILL + self.decode > context_length {
            return Err(BenchError::DecodeTooLong { steps: self.decode, context_length });
        }
        Ok(())
    }
}

/// The timings of one prefill length.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefillTiming {
    /// Prompt length.
    pub tokens: usize,
    /// Timed forwards (after one warm-up).
    pub repeats: usize,
    /// Median seconds of one forward.
    pub median_s: f64,
    /// Fastest forward, seconds.
    pub min_s: f64,
    /// Slowest forward, seconds.
    pub max_s: f64,
    /// `tokens / median_s`.
    pub tokens_per_s: f64,
}

/// The timings of batch-1 decode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodeTiming {
    /// Length of the prefill before the first step.
    pub prefill_tokens: usize,
    /// Timed steps.
    pub tokens: usize,
    /// Mean seconds per step.
    pub mean_s: f64,
    /// Standard deviation of the steps' seconds (over the steps measured, not an estimate of a population).
    pub stddev_s: f64,
    /// `1 / mean_s`.
    pub tokens_per_s: f64,
}

/// A measured copy bandwidth and how it was measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CopyBandwidth {
    /// `device-to-device` (cuda) or `host` (cpu, reference).
    pub method: &'static str,
    /// Bytes copied per copy.
    pub bytes: usize,
    /// Copies timed; the fastest counts.
    pub repeats: usize,
    /// Bytes read plus bytes written per second, of the fastest copy.
    pub bytes_per_s: f64,
}

/// Decode's bandwidth bound: weight bytes per token over the copy bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Roofline {
    /// Weight bytes one decoded token reads ([`decode_bytes_per_token`]).
    pub bytes_per_token: u64,
    /// The bandwidth those bytes stream at, at best.
    pub copy_bandwidth: CopyBandwidth,
    /// `copy_bandwidth.bytes_per_s / bytes_per_token`: decode tokens/s if reading weights were all it did.
    pub bound_tokens_per_s: f64,
    /// Measured decode tokens/s as a percentage of the bound.
    pub decode_percent_of_bound: f64,
}

/// Everything [`run`] measures on a forward.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchResult {
    /// One entry per prefill length of the plan, in its order.
    pub prefill: Vec<PrefillTiming>,
    /// Batch-1 decode.
    pub decode: DecodeTiming,
    /// Decode against the bandwidth bound.
    pub roofline: Roofline,
}

/// How long the model and the backend took to get ready (measured by the caller, which creates them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SetupTimes {
    /// Seconds to load (map and validate) or synthesise the model.
    pub model_load_s: f64,
    /// Seconds to create the backend (for `cuda`: the weight upload and, on first use, the NVRTC compile).
    pub backend_create_s: f64,
}

/// The machine a benchmark ran on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Machine {
    /// CPU model (`model name` of /proc/cpuinfo), where the system says.
    pub cpu: Option<String>,
    /// CPU architecture, e.g. `x86_64`.
    pub arch: &'static str,
    /// Operating system, e.g. `linux`.
    pub os: &'static str,
    /// Threads of rayon's pool (the `cpu` backend's parallelism).
    pub threads: usize,
    /// GPU name, when the benchmark ran on `cuda`.
    pub gpu: Option<String>,
    /// The CUDA version the GPU's driver supports (`cuDriverGetVersion`), e.g. `13.0`.
    pub cuda_driver: Option<String>,
}

impl Machine {
    /// The machine this process runs on; the GPU is looked up only for `kind` = `cuda` (opening a device
    /// compiles the kernels, which a CPU benchmark should not wait for).
    pub fn detect(kind: BackendKind) -> Machine {
        let (gpu, cuda_driver) =
            if kind == BackendKind::Cuda { device::describe_gpu() } else { (None, None) };
        Machine {
            cpu: cpu_model(),
            arch: std::env::consts::ARCH,
            os: std::env::consts::OS,
            threads: rayon::current_num_threads(),
            gpu,
            cuda_driver,
        }
    }
}

/// A whole benchmark: what ran where, and its [`BenchResult`]. Its JSON form is versioned by `schema`;
/// its `Display` is the table `cargo moe-gate bench` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The engine's version.
    pub engine_version: &'static str,
    /// When the report was made, seconds since the Unix epoch.
    pub unix_time_s: u64,
    /// The model's spec (canonical form for synthetic models).
    pub model: String,
    /// The backend, `reference`, `cpu` or `cuda`.
    pub backend: &'static str,
    /// The numerics policy, `fast` or `exact`.
    pub policy: &'static str,
    /// Where it ran.
    pub machine: Machine,
    /// Model load and backend creation.
    pub setup: SetupTimes,
    /// The measurements.
    #[serde(flatten)]
    pub result: BenchResult,
}

impl BenchReport {
    /// A report of `result`, measured on `model` with a `backend` forward under `policy`, dated now.
    pub fn new(
        model: impl Into<String>,
        backend: BackendKind,
        policy: Policy,
        machine: Machine,
        setup: SetupTimes,
        result: BenchResult,
    ) -> BenchReport {
        let unix_time_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        BenchReport {
            schema: SCHEMA,
            engine_version: env!("CARGO_PKG_VERSION"),
            unix_time_s,
            model: model.into(),
            backend: backend.as_str(),
            policy: policy.as_str(),
            machine,
            setup,
            result,
        }
    }
}

/// Runs `plan` on `forward` (a forward of `weights`): prefill, decode and the roofline, calling
/// `progress` with a line before each phase.
///
/// The forward's KV cache is overwritten. Refuses a plan that does not fit the model's context.
pub fn run(
    forward: &mut dyn Forward,
    weights: &ModelWeights,
    plan: &BenchPlan,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchResult, BenchError> {
    plan.check_fits(&weights.config)?;
    let vocab = weights.config.vocab;
    let mut prefill = Vec::with_capacity(plan.prefill.len());
    for &n in &plan.prefill {
        progress(&format!("prefill, {n}-token prompt: 1 warm-up and {} timed forwards", plan.repeats));
        prefill.push(time_prefill(forward, &prompt(n, vocab), plan.repeats)?);
    }
    progress(&format!("decode: {DECODE_PREFILL}-token prefill, then {} timed greedy steps", plan.decode));
    let decode = time_decode(forward, vocab, plan.decode)?;
    progress(&format!("copy bandwidth: {COPY_REPEATS} copies of {}", size(COPY_BYTES)));
    let copy_bandwidth = copy_bandwidth(forward.kind())?;
    let bytes_per_token = decode_bytes_per_token(weights);
    let bound_tokens_per_s = copy_bandwidth.bytes_per_s / bytes_per_token as f64;
    let roofline = Roofline {
        bytes_per_token,
        copy_bandwidth,
        bound_tokens_per_s,
        decode_percent_of_bound: 100.0 * decode.tokens_per_s / bound_tokens_per_s,
    };
    Ok(BenchResult { prefill, decode, roofline })
}

/// The benchmark's prompt of `n` tokens: deterministic ids spread over a vocabulary of `vocab` tokens
/// (`(i * 7919 + 785) mod vocab`, a prime stride from the canonical prompt's first token).
pub fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    let vocab = vocab.max(1);
    (0..n).map(|i| ((i * 7919 + 785) % vocab) as u32).collect()
}

/// Bytes of weights one decoded token reads: every attention matrix and router of every layer,
/// `n_expert_used` of the `n_expert` matrices of each expert tensor, one embedding row and the output
/// projection. Norm weights (a few KB per layer) are left out.
pub fn decode_bytes_per_token(weights: &ModelWeights) -> u64 {
    let used = weights.config.n_expert_used as u64;
    let whole = |t: &WeightTensor| t.bytes().len() as u64;
    // One expert's matrix of a `[row, rows, n_expert]` tensor is `rows` rows.
    let routed = |t: &WeightTensor| (t.dims[1] * t.row_bytes()) as u64 * used;
    let mut bytes = whole(&weights.output) + weights.token_embd.row_bytes() as u64;
    for l in &weights.layers {
        bytes +=
            [&l.attn_q, &l.attn_k, &l.attn_v, &l.attn_output, &l.ffn_gate_inp].map(whole).iter().sum::<u64>();
        bytes += [&l.ffn_gate_exps, &l.ffn_up_exps, &l.ffn_down_exps].map(routed).iter().sum::<u64>();
    }
    bytes
}

/// The copy bandwidth the weights of a `kind` forward stream at, at best: [`COPY_REPEATS`] copies of
/// [`COPY_BYTES`], the fastest counting, bytes read plus bytes written. `cuda` copies device memory
/// (device 0, the backend's); `cpu` and `reference` copy host memory in one chunk per rayon thread.
pub fn copy_bandwidth(kind: BackendKind) -> Result<CopyBandwidth, BenchError> {
    let (method, bytes_per_s) = match kind {
        BackendKind::Cuda => ("device-to-device", device::copy_bandwidth(COPY_BYTES, COPY_REPEATS)?),
        BackendKind::Cpu | BackendKind::Reference => ("host", host_copy_bandwidth(COPY_BYTES, COPY_REPEATS)?),
    };
    Ok(CopyBandwidth { method, bytes: COPY_BYTES, repeats: COPY_REPEATS, bytes_per_s })
}

/// One warm-up forward of `tokens`, then `repeats` timed ones.
fn time_prefill(
    forward: &mut dyn Forward,
    tokens: &[u32],
    repeats: usize,
) -> Result<PrefillTiming, BenchError> {
    forward.forward(tokens, None)?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = Instant::now();
        forward.forward(tokens, None)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median_s = median(&times);
    Ok(PrefillTiming {
        tokens: tokens.len(),
        repeats,
        median_s,
        min_s: times[0],
        max_s: times[times.len() - 1],
        tokens_per_s: tokens.len() as f64 / median_s,
    })
}

/// A [`DECODE_PREFILL`]-token prefill, then `steps` timed greedy steps.
fn time_decode(forward: &mut dyn Forward, vocab: usize, steps: usize) -> Result<DecodeTiming, BenchError> {
    let mut next = argmax(&forward.forward(&prompt(DECODE_PREFILL, vocab), None)?);
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        let logits = forward.step(next)?;
        times.push(t0.elapsed().as_secs_f64());
        next = argmax(&logits);
    }
    let (mean_s, stddev_s) = mean_and_stddev(&times);
    Ok(DecodeTiming {
        prefill_tokens: DECODE_PREFILL,
        tokens: steps,
        mean_s,
        stddev_s,
        tokens_per_s: 1.0 / mean_s,
    })
}

/// The greedy choice: the highest logit, the lowest id among equals (the router's `top_k` with k = 1).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = [0u32];
    moe_kernels::cpu::top_k(logits, &mut best);
    best[0]
}

/// The median of sorted, non-empty `values` (the mean of the middle two for an even count).
fn median(sorted: &[f64]) -> f64 {
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 }
}

/// Mean and standard deviation of non-empty `values`.
fn mean_and_stddev(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, variance.sqrt())
}

/// Host copy bandwidth: `repeats` copies of `bytes`, split in one chunk per rayon thread, the fastest
/// counting twice its bytes (read and written) per second.
fn host_copy_bandwidth(bytes: usize, repeats: usize) -> Result<f64, BenchError> {
    let alloc = |fill: u8| -> Result<Vec<u8>, BenchError> {
        let mut v = Vec::new();
        v.try_reserve_exact(bytes).map_err(|_| BenchError::HostMemory { bytes })?;
        // Writing every byte makes the pages real: an untouched zeroed allocation maps one shared page,
        // and copying from it would measure the cache.
        v.resize(bytes, fill);
        Ok(v)
    };
    let src = alloc(0x5a)?;
    let mut dst = alloc(0)?;
    let chunk = bytes.div_ceil(rayon::current_num_threads()).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t0 = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * bytes as f64 / best.max(f64::MIN_POSITIVE))
}

/// The CPU's model name from /proc/cpuinfo (Linux on x86; absent elsewhere).
fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "model name")
        .map(|(_, value)| value.trim().to_string())
}

/// The CUDA side of the measurements; without the `cuda` feature the same functions say there is none.
#[cfg(feature = "cuda")]
mod device {
    use moe_kernels::cuda::{CudaDevice, CudaError};

    use super::BenchError;
    use crate::error::EngineError;

    /// The device the `cuda` backend runs on.
    const ORDINAL: usize = 0;

    /// Device-to-device copy bandwidth: `repeats` copies of `bytes`, the fastest counting twice its
    /// bytes (read and written) per second.
    pub(super) fn copy_bandwidth(bytes: usize, repeats: usize) -> Result<f64, BenchError> {
        let stage = "measuring the device copy bandwidth";
        let failed = |e: CudaError| -> BenchError {
            if e.is_unavailable() {
                EngineError::CudaUnavailable { reason: e.to_string() }.into()
            } else {
                EngineError::Cuda { stage: stage.to_string(), message: e.to_string() }.into()
            }
        };
        let d = CudaDevice::get(ORDINAL).map_err(failed)?;
        let n = bytes / size_of::<f32>();
        let src = d.alloc_zeros::<f32>(n).map_err(failed)?;
        let mut dst = d.alloc_zeros::<f32>(n).map_err(failed)?;
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            d.synchronize().map_err(failed)?;
            let t0 = std::time::Instant::now();
            d.copy_on_device(src.as_slice(), dst.as_mut()).map_err(failed)?;
            d.synchronize().map_err(failed)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n * size_of::<f32>()) as f64 / best.max(f64::MIN_POSITIVE))
    }

    /// The GPU's name and its driver's CUDA version, if the device opens.
    pub(super) fn describe_gpu() -> (Option<String>, Option<String>) {
        match CudaDevice::get(ORDINAL) {
            Ok(d) => {
                let info = d.info();
                let v = info.driver_version;
                // A variant measured under MOE_GATE_CUDA_TUNE says so wherever the machine is named.
                let name = if info.tuning.is_default() {
                    info.name.clone()
                } else {
                    format!("{} (kernels tuned: {}={})", info.name, moe_kernels::cuda::TUNE_ENV, info.tuning)
                };
                (Some(name), Some(format!("{}.{}", v / 1000, v % 1000 / 10)))
            }
            Err(_) => (None, None),
        }
    }
}

/// Without the `cuda` feature there is no device to measure.
#[cfg(not(feature = "cuda"))]
mod device {
    use super::BenchError;
    use crate::error::EngineError;

    /// Always the engine's "no CUDA" error.
    pub(super) fn copy_bandwidth(_bytes: usize, _repeats: usize) -> Result<f64, BenchError> {
        Err(EngineError::CudaUnavailable {
            reason: "built without the `cuda` feature: rebuild with --features cuda".to_string(),
        }
        .into())
    }

    /// No GPU is known.
    pub(super) fn describe_gpu() -> (Option<String>, Option<String>) {
        (None, None)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(
            f,
            "model {}, backend {} (policy {}), moe-engine {}",
            self.model, self.backend, self.policy, self.engine_version
        )?;
        write!(
            f,
            "machine: {} ({}), {} rayon threads, {}",
            m.cpu.as_deref().unwrap_or("unknown CPU"),
            m.arch,
            m.threads,
            m.os
        )?;
        if let Some(gpu) = &m.gpu {
            write!(f, "; GPU {gpu}")?;
            if let Some(v) = &m.cuda_driver {
                write!(f, ", driver CUDA {v}")?;
            }
        }
        writeln!(f)?;
        writeln!(
            f,
            "setup: model load {:.3} s, backend creation {:.3} s\n",
            self.setup.model_load_s, self.setup.backend_create_s
        )?;
        writeln!(f, "| measurement | tokens | time | tokens/s |")?;
        writeln!(f, "| :--- | ---: | ---: | ---: |")?;
        for p in &self.result.prefill {
            writeln!(
                f,
                "| prefill | {} | {} (median of {}; min {}, max {}) | {:.1} |",
                p.tokens,
                seconds(p.median_s),
                p.repeats,
                seconds(p.min_s),
                seconds(p.max_s),
                p.tokens_per_s
            )?;
        }
        let d = &self.result.decode;
        writeln!(
            f,
            "| decode (batch 1, {}-token prefill first) | {} | {}/token (sd {}) | {:.1} |\n",
            d.prefill_tokens,
            d.tokens,
            seconds(d.mean_s),
            seconds(d.stddev_s),
            d.tokens_per_s
        )?;
        let r = &self.result.roofline;
        let c = &r.copy_bandwidth;
        writeln!(
            f,
            "roofline: {:.1} MB of weights per decoded token over a {} copy bandwidth of {:.1} GB/s ({}, \
             best of {}, read+write counted) bounds decode at {:.1} tokens/s; measured decode is {:.1}% of it",
            r.bytes_per_token as f64 / 1e6,
            c.method,
            c.bytes_per_s / 1e9,
            size(c.bytes),
            c.repeats,
            r.bound_tokens_per_s,
            r.decode_percent_of_bound
        )
    }
}

/// A byte count in binary units: `1 GiB`, `64 MiB`, `512 KiB` or bytes.
fn size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / (1 << 10) as f64),
        b => format!("{b} bytes"),
    }
}

/// A duration in the unit that keeps 3-4 significant digits readable.
fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load_model;

    /// Bytes of one row of `n` weights of a GGUF type, from the ggml block layouts (ggml-common.h):
    /// written out here rather than asked of `GgmlType`, so the count below is independent of the code
    /// it checks.
    fn row_bytes_by_spec(type_name: &str, n: usize) -> usize {
        let (block, block_bytes) = match type_name {
            "F32" => (1, 4),
            "F16" | "BF16" => (1, 2),
            "Q8_0" => (32, 2 + 32),                 // f16 scale + 32 int8
            "Q4_K" => (256, 2 + 2 + 12 + 128),      // d, dmin, 12 bytes of 6-bit scales, 256 nibbles
            "Q5_K" => (256, 2 + 2 + 12 + 32 + 128), // + 32 bytes of high bits
            "Q6_K" => (256, 128 + 64 + 16 + 2),     // low nibbles, high 2 bits, int8 scales, d
            other => panic!("type {other} is not used by the synthetic presets"),
        };
        assert_eq!(n % block, 0, "{type_name} rows hold whole blocks");
        n / block * block_bytes
    }

    /// synth:tiny in F32, counted from the preset's dimensions alone: 4 bytes a weight.
    #[test]
    fn decode_bytes_of_tiny_f32_match_a_count_from_the_config() {
        let w = load_model("synth:tiny:f32").unwrap();
        // Preset::Tiny (docs/synthetic-models.md): 4 layers, hidden 256, 4 q heads / 2 kv heads of 64, 16 experts top-4,
        // expert FFN 256, vocab 151936.
        let (layers, hidden, q, kv, experts_used, ffn, n_expert, vocab) =
            (4u64, 256u64, 4 * 64u64, 2 * 64u64, 4u64, 256u64, 16u64, 151_936u64);
        let attention = hidden * q + 2 * hidden * kv + q * hidden;
        let router = hidden * n_expert;
        let experts = experts_used * 3 * hidden * ffn;
        let expected = 4 * (layers * (attention + router + experts) + hidden * vocab + hidden);
        assert_eq!(decode_bytes_per_token(&w), expected);
    }

    /// synth:tiny in its default Q4_K_M mix: each tensor's type as stored, its bytes from the block sizes.
    #[test]
    fn decode_bytes_of_tiny_q4_k_m_match_a_count_from_the_block_sizes() {
        let w = load_model("synth:tiny").unwrap();
        let c = &w.config;
        let matrix = |t: &WeightTensor, rows: usize| rows * row_bytes_by_spec(t.ty.name(), t.dims[0]);
        let mut expected = matrix(&w.output, c.vocab) + matrix(&w.token_embd, 1);
        for l in &w.layers {
            expected += matrix(&l.attn_q, c.q_dim())
                + matrix(&l.attn_k, c.kv_dim())
                + matrix(&l.attn_v, c.kv_dim())
                + matrix(&l.attn_output, c.hidden)
                + matrix(&l.ffn_gate_inp, c.n_expert);
            expected += c.n_expert_used
                * (matrix(&l.ffn_gate_exps, c.expert_ffn)
                    + matrix(&l.ffn_up_exps, c.expert_ffn)
                    + matrix(&l.ffn_down_exps, c.hidden));
        }
        // The mix stores some tensors in Q6_K: the count must not be the all-Q4_K one.
        assert!(w.layers.iter().any(|l| l.attn_v.ty.name() == "Q6_K"), "the mix has Q6_K layers");
        assert_eq!(decode_bytes_per_token(&w), expected as u64);
    }

    #[test]
    fn plans_refuse_zeros_and_what_the_context_cannot_hold() {
        assert!(matches!(BenchPlan::new(vec![1, 0], 4, 1), Err(BenchError::ZeroPrefill)));
        assert!(matches!(BenchPlan::new(vec![1], 4, 0), Err(BenchError::ZeroRepeats)));
        assert!(matches!(BenchPlan::new(vec![1], 0, 1), Err(BenchError::ZeroDecode)));
        let cfg = crate::spec::Preset::Tiny.config(); // context 4096
        assert!(BenchPlan::new(vec![1, 4096], 4096 - DECODE_PREFILL, 1).unwrap().check_fits(&cfg).is_ok());
        let e = BenchPlan::new(vec![4097], 1, 1).unwrap().check_fits(&cfg).unwrap_err();
        assert!(matches!(e, BenchError::PrefillTooLong { tokens: 4097, context_length: 4096 }), "{e}");
        let e = BenchPlan::new(vec![1], 4096, 1).unwrap().check_fits(&cfg).unwrap_err();
        assert!(e.to_string().contains("decode at most 4088 tokens"), "{e}");
    }

    #[test]
    fn prompts_are_deterministic_and_inside_the_vocabulary() {
        assert_eq!(prompt(3, 151_936), [785, 8704, 16623]);
        assert_eq!(prompt(3, 1000), [785, 704, 623]);
        assert!(prompt(512, 256).iter().all(|&t| t < 256));
    }

    #[test]
    fn statistics_of_small_samples() {
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), 3.0);
        let (mean, sd) = mean_and_stddev(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!((mean, sd), (5.0, 2.0));
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), 1, "ties go to the lower id");
        assert_eq!([size(1 << 30), size(3 << 19), size(100)], ["1 GiB", "1.5 MiB", "100 bytes"]);
        assert_eq!([seconds(2.0), seconds(0.0125), seconds(4.2e-5)], ["2.000 s", "12.500 ms", "42.0 µs"]);
    }

    /// The host copy returns a finite, positive rate for a copy small enough for a unit test (its size is
    /// what makes it a measurement; no speed is asserted).
    #[test]
    fn host_copy_bandwidth_is_a_positive_rate() {
        let rate = host_copy_bandwidth(1 << 20, 2).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
    }
}
