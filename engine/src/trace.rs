//! Traces: what a forward computed at every tap, and the safetensors file format of docs/architecture.md.
//!
//! Values are held as f64 in memory whatever the backend computed in (an f32 converts to f64 exactly);
//! [`Trace::precision`] says which width the file stores, so a `reference` trace keeps its f64 values.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// A row-major matrix of `rows x cols` values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self { rows, cols, data: vec![0.0; rows * cols] }
    }

    /// Builds a matrix from any float rows laid out row-major.
    pub fn from_f32(rows: usize, cols: usize, data: &[f32]) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Self { rows, cols, data: data.iter().map(|&v| v as f64).collect() }
    }

    /// Builds a matrix from f64 rows laid out row-major.
    pub fn from_f64(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Self { rows, cols, data }
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f64] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// The float width a trace file stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

/// The taps of one decoder layer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerTrace {
    /// Residual stream after the layer, `[T, hidden]`.
    pub hidden: Matrix,
    /// Router logits, `[T, n_expert]`.
    pub router_logits: Matrix,
    /// Chosen experts, `[T, k]` row-major: by weight descending, ties by lower index.
    pub router_experts: Vec<u32>,
    /// Their weights after renormalisation, `[T, k]`.
    pub router_weights: Matrix,
}

/// The sub-layer taps of one decoder layer (docs/architecture.md, *Trace format*), in the order the layer
/// computes them. A forward records them only when its trace asks ([`Trace::with_sub_layer_taps`]), and
/// [`crate::backend::Forward::run_layer_tapped`] returns them for one layer; otherwise nothing is kept, so
/// normal runs keep their size and speed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SubLayerTaps {
    /// RMSNorm of the layer's input with the attention norm weights, `[T, hidden]`.
    pub attn_norm: Matrix,
    /// Queries after the per-head RMSNorm and RoPE, `[T, n_head * head_dim]`.
    pub q: Matrix,
    /// Keys after the per-head RMSNorm and RoPE (the rows the KV cache stores), `[T, n_kv_head * head_dim]`.
    pub k: Matrix,
    /// Values (the rows the KV cache stores), `[T, n_kv_head * head_dim]`.
    pub v: Matrix,
    /// The attention heads' output before the output projection, `[T, n_head * head_dim]`.
    pub attn_out: Matrix,
    /// The output projection of `attn_out`, before it is added to the residual stream, `[T, hidden]`.
    pub attn_proj: Matrix,
    /// The residual stream after the attention block (input + `attn_proj`), `[T, hidden]`.
    pub attn_residual: Matrix,
    /// RMSNorm of `attn_residual` with the FFN norm weights: the router's and the experts' input, `[T, hidden]`.
    pub ffn_norm: Matrix,
    /// Each routed slot's expert output before weighting, in the router's choice order: `[T, k * hidden]`
    /// in memory, `[T, k, hidden]` in the file.
    pub expert_out: Matrix,
    /// The weighted sum of the expert outputs, before it is added to the residual stream, `[T, hidden]`.
    pub moe_out: Matrix,
    /// Decode steps only ([`crate::backend::Forward::step_traced`]): every key row the step's attention read
    /// from the KV cache, positions `0..=pos`, `[pos + 1, n_kv_head * head_dim]`. `None` in a prefill,
    /// whose cache rows are `k` itself.
    pub cache_keys: Option<Matrix>,
    /// Decode steps only: every value row the step's attention read, as `cache_keys`.
    pub cache_values: Option<Matrix>,
}

/// The name of one sub-layer tap, in the order a layer computes them (docs/architecture.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubLayerTap {
    AttnNorm,
    Q,
    K,
    V,
    AttnOut,
    AttnProj,
    AttnResidual,
    FfnNorm,
    ExpertOut,
    MoeOut,
}

impl SubLayerTap {
    /// Every sub-layer tap, in the order a layer computes them.
    pub const ALL: [SubLayerTap; 10] = [
        SubLayerTap::AttnNorm,
        SubLayerTap::Q,
        SubLayerTap::K,
        SubLayerTap::V,
        SubLayerTap::AttnOut,
        SubLayerTap::AttnProj,
        SubLayerTap::AttnResidual,
        SubLayerTap::FfnNorm,
        SubLayerTap::ExpertOut,
        SubLayerTap::MoeOut,
    ];

    /// The tensor name in trace files (with `.L` for layer L) and in contracts.
    pub fn as_str(self) -> &'static str {
        match self {
            SubLayerTap::AttnNorm => "attn_norm",
            SubLayerTap::Q => "q",
            SubLayerTap::K => "k",
            SubLayerTap::V => "v",
            SubLayerTap::AttnOut => "attn_out",
            SubLayerTap::AttnProj => "attn_proj",
            SubLayerTap::AttnResidual => "attn_residual",
            SubLayerTap::FfnNorm => "ffn_norm",
            SubLayerTap::ExpertOut => "expert_out",
            SubLayerTap::MoeOut => "moe_out",
        }
    }

    /// The tap of this name, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// This tap's values in `taps`.
    pub fn of(self, taps: &SubLayerTaps) -> &Matrix {
        match self {
            SubLayerTap::AttnNorm => &taps.attn_norm,
            SubLayerTap::Q => &taps.q,
            SubLayerTap::K => &taps.k,
            SubLayerTap::V => &taps.v,
            SubLayerTap::AttnOut => &taps.attn_out,
            SubLayerTap::AttnProj => &taps.attn_proj,
            SubLayerTap::AttnResidual => &taps.attn_residual,
            SubLayerTap::FfnNorm => &taps.ffn_norm,
            SubLayerTap::ExpertOut => &taps.expert_out,
            SubLayerTap::MoeOut => &taps.moe_out,
        }
    }

    fn of_mut(self, taps: &mut SubLayerTaps) -> &mut Matrix {
        match self {
            SubLayerTap::AttnNorm => &mut taps.attn_norm,
            SubLayerTap::Q => &mut taps.q,
            SubLayerTap::K => &mut taps.k,
            SubLayerTap::V => &mut taps.v,
            SubLayerTap::AttnOut => &mut taps.attn_out,
            SubLayerTap::AttnProj => &mut taps.attn_proj,
            SubLayerTap::AttnResidual => &mut taps.attn_residual,
            SubLayerTap::FfnNorm => &mut taps.ffn_norm,
            SubLayerTap::ExpertOut => &mut taps.expert_out,
            SubLayerTap::MoeOut => &mut taps.moe_out,
        }
    }
}

impl std::fmt::Display for SubLayerTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a forward over one prompt recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// The model spec it ran (a path or `synth:...`).
    pub model: String,
    /// `reference`, `cpu` or `cuda`.
    pub backend: String,
    /// `fast` or `exact`.
    pub policy: String,
    /// The float width written to files.
    pub precision: Precision,
    /// The prompt.
    pub tokens: Vec<u32>,
    /// One entry per decoder layer, in order.
    pub layers: Vec<LayerTrace>,
    /// Final logits at every position, `[T, vocab]`.
    pub logits: Matrix,
    /// Whether a forward filling this trace records [`Trace::sub_layers`] (off by default: the taps cost
    /// memory and, on CUDA, a copy back after every op).
    pub record_sub_layers: bool,
    /// One entry per decoder layer when `record_sub_layers` was set; empty otherwise.
    pub sub_layers: Vec<SubLayerTaps>,
}

/// Tensors a trace file stores per layer: `hidden`, `router_logits`, `router_experts`, `router_weights`.
const TENSORS_PER_LAYER: usize = 4;

/// Errors reading or writing a trace file.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot write trace file {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("cannot read trace file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a valid safetensors file: {reason}")]
    Format { path: String, reason: String },
    #[error("{path}: tensor `{tensor}` {reason}")]
    Tensor { path: String, tensor: String, reason: String },
}

impl Trace {
    /// An empty trace, to be filled by a forward.
    pub fn new(model: &str, backend: &str, policy: &str, precision: Precision) -> Self {
        Self {
            model: model.to_string(),
            backend: backend.to_string(),
            policy: policy.to_string(),
            precision,
            tokens: Vec::new(),
            layers: Vec::new(),
            logits: Matrix::default(),
            record_sub_layers: false,
            sub_layers: Vec::new(),
        }
    }

    /// The same trace, asking the forward that fills it to record every layer's [`SubLayerTaps`] too.
    pub fn with_sub_layer_taps(mut self) -> Self {
        self.record_sub_layers = true;
        self
    }

    /// Number of experts chosen per token (0 for a trace without layers).
    pub fn top_k(&self) -> usize {
        match self.layers.first() {
            Some(l) if !self.tokens.is_empty() => l.router_experts.len() / self.tokens.len(),
            _ => 0,
        }
    }

    /// The first non-finite value, as `(tensor name, flat index)`, in the order layers are computed.
    pub fn first_non_finite(&self) -> Option<(String, usize)> {
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, m) in [
                ("router_logits", &layer.router_logits),
                ("router_weights", &layer.router_weights),
                ("hidden", &layer.hidden),
            ] {
                if let Some(i) = m.data.iter().position(|v| !v.is_finite()) {
                    return Some((format!("{name}.{l}"), i));
                }
            }
        }
        self.logits.data.iter().position(|v| !v.is_finite()).map(|i| ("logits".to_string(), i))
    }

    /// Writes the trace as safetensors (docs/architecture.md).
    pub fn write_safetensors(&self, path: &Path) -> Result<(), TraceError> {
        let t = self.tokens.len();
        let k = self.top_k();
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let tokens: Vec<u8> = self.tokens.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect();
        tensors.push(("tokens".into(), Dtype::I32, vec![t], tokens));
        for (l, layer) in self.layers.iter().enumerate() {
            tensors.push(self.float_tensor(format!("hidden.{l}"), &layer.hidden));
            tensors.push(self.float_tensor(format!("router_logits.{l}"), &layer.router_logits));
            let experts: Vec<u8> =
                layer.router_experts.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect();
            tensors.push((format!("router_experts.{l}"), Dtype::I32, vec![t, k], experts));
            tensors.push(self.float_tensor(format!("router_weights.{l}"), &layer.router_weights));
        }
        for (l, taps) in self.sub_layers.iter().enumerate() {
            for tap in SubLayerTap::ALL {
                let mut tensor = self.float_tensor(format!("{tap}.{l}"), tap.of(taps));
                if tap == SubLayerTap::ExpertOut {
                    // `[T, k * hidden]` in memory, `[T, k, hidden]` in the file.
                    tensor.2 = vec![taps.expert_out.rows, k, taps.expert_out.cols / k.max(1)];
                }
                tensors.push(tensor);
            }
            let cache = [("cache_keys", &taps.cache_keys), ("cache_values", &taps.cache_values)];
            for (name, m) in cache {
                if let Some(m) = m {
                    tensors.push(self.float_tensor(format!("{name}.{l}"), m));
                }
            }
        }
        tensors.push(self.float_tensor("logits".into(), &self.logits));

        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                let view = TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| TraceError::Tensor {
                    path: path.display().to_string(),
                    tensor: name.clone(),
                    reason: e.to_string(),
                })?;
                Ok((name.clone(), view))
            })
            .collect::<Result<_, TraceError>>()?;
        let metadata: HashMap<String, String> = [
            ("model", self.model.clone()),
            ("backend", self.backend.clone()),
            ("policy", self.policy.clone()),
            ("engine_version", env!("CARGO_PKG_VERSION").to_string()),
            ("n_layer", self.layers.len().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|reason| reason.to_string())
            .and_then(with_sorted_header)
            .map_err(|reason| TraceError::Format { path: path.display().to_string(), reason })?;
        write_atomically(path, &bytes)
            .map_err(|source| TraceError::Write { path: path.display().to_string(), source })
    }

    fn float_tensor(&self, name: String, m: &Matrix) -> (String, Dtype, Vec<usize>, Vec<u8>) {
        let shape = vec![m.rows, m.cols];
        match self.precision {
            Precision::F32 => {
                let bytes = m.data.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
                (name, Dtype::F32, shape, bytes)
            }
            Precision::F64 => {
                let bytes = m.data.iter().flat_map(|&v| v.to_le_bytes()).collect();
                (name, Dtype::F64, shape, bytes)
            }
        }
    }

    /// Reads a trace written by [`Trace::write_safetensors`].
    pub fn read_safetensors(path: &Path) -> Result<Self, TraceError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| TraceError::Read { path: p.clone(), source })?;
        Self::from_safetensors_bytes(&bytes, &p)
    }

    /// Parses the bytes of a trace file; `p` is the path errors name. Every shape is checked against the
    /// bytes before it is used, so a corrupt or hostile file is an error, never a panic.
    pub fn from_safetensors_bytes(bytes: &[u8], p: &str) -> Result<Self, TraceError> {
        let p = p.to_string();
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| TraceError::Format { path: p.clone(), reason: e.to_string() })?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| TraceError::Format { path: p.clone(), reason: e.to_string() })?;
        let md = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| md.get(k).cloned().unwrap_or_default();
        let n_layer: usize = get("n_layer").parse().map_err(|_| TraceError::Format {
            path: p.clone(),
            reason: "metadata `n_layer` is missing or not a number".into(),
        })?;
        // Four tensors per layer: a count the file cannot hold is refused before anything is allocated.
        if n_layer > st.len() / TENSORS_PER_LAYER {
            return Err(TraceError::Format {
                path: p.clone(),
                reason: format!(
                    "metadata `n_layer` = {n_layer}, but the file holds only {} tensors",
                    st.len()
                ),
            });
        }
        let tensor_err = |tensor: &str, reason: String| TraceError::Tensor {
            path: p.clone(),
            tensor: tensor.to_string(),
            reason,
        };
        let view = |name: &str| st.tensor(name).map_err(|e| tensor_err(name, e.to_string()));
        let ints = |name: &str| -> Result<Vec<u32>, TraceError> {
            let v = view(name)?;
            if v.dtype() != Dtype::I32 {
                return Err(tensor_err(name, format!("has dtype {:?}, expected I32", v.dtype())));
            }
            Ok(v.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect())
        };
        let mut precision = Precision::F32;
        // `dims` is how many dimensions the tensor has: 2, or 3 for `expert_out` (`[T, k, hidden]`, read
        // as `[T, k * hidden]`).
        let mut floats_of = |name: &str, dims: usize| -> Result<Matrix, TraceError> {
            let v = view(name)?;
            let shape = v.shape();
            if shape.len() != dims {
                return Err(tensor_err(name, format!("has shape {shape:?}, expected {dims} dimensions")));
            }
            let cols = shape[1..].iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let Some(cols) = cols else {
                return Err(tensor_err(name, format!("has shape {shape:?}, too large")));
            };
            let data: Vec<f64> = match v.dtype() {
                Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => {
                    precision = Precision::F64;
                    v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
                }
                other => return Err(tensor_err(name, format!("has dtype {other:?}, expected F32 or F64"))),
            };
            Ok(Matrix::from_f64(shape[0], cols, data))
        };
        let mut floats = |name: &str| floats_of(name, 2);
        let tokens = ints("tokens")?;
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            layers.push(LayerTrace {
                hidden: floats(&format!("hidden.{l}"))?,
                router_logits: floats(&format!("router_logits.{l}"))?,
                router_experts: ints(&format!("router_experts.{l}"))?,
                router_weights: floats(&format!("router_weights.{l}"))?,
            });
        }
        let logits = floats("logits")?;
        // Sub-layer taps are in the file when layer 0's first one is.
        let has_taps = n_layer > 0 && st.tensor(&format!("{}.0", SubLayerTap::AttnNorm)).is_ok();
        let mut sub_layers = Vec::with_capacity(if has_taps { n_layer } else { 0 });
        for l in (0..n_layer).filter(|_| has_taps) {
            let mut taps = SubLayerTaps::default();
            for tap in SubLayerTap::ALL {
                let dims = if tap == SubLayerTap::ExpertOut { 3 } else { 2 };
                *tap.of_mut(&mut taps) = floats_of(&format!("{tap}.{l}"), dims)?;
            }
            for (name, slot) in
                [("cache_keys", &mut taps.cache_keys), ("cache_values", &mut taps.cache_values)]
            {
                let name = format!("{name}.{l}");
                if st.tensor(&name).is_ok() {
                    *slot = Some(floats_of(&name, 2)?);
                }
            }
            sub_layers.push(taps);
        }
        Ok(Self {
            model: get("model"),
            backend: get("backend"),
            policy: get("policy"),
            precision,
            tokens,
            layers,
            logits,
            record_sub_layers: has_taps,
            sub_layers,
        })
    }
}

/// Writes `bytes` to `path` so that a reader finds either the old file or the whole new one, never a
/// part: the bytes go to a temporary file beside `path` (same directory, so the same file system), are
/// flushed to disk, and the temporary file is renamed over `path`. A crash or a kill in between leaves
/// at most the temporary file (`.NAME.tmp-PID`), which no reader of `path` picks up.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The same file with its JSON header's keys sorted (tensor names, and the `__metadata__` entries,
/// which `safetensors::serialize` takes as a `HashMap` and so writes in a different order in every
/// process), padded back to the header's length. The same trace then always gives the same bytes.
fn with_sorted_header(mut bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    type Header = BTreeMap<String, serde_json::Value>;
    let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or("no header length")?;
    let len = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|e| e.to_string())?;
    let raw = bytes.get(8..8 + len).ok_or("header longer than the file")?;
    let mut header: Header = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    if let Some(meta) = header.remove("__metadata__") {
        let sorted: BTreeMap<String, String> = serde_json::from_value(meta).map_err(|e| e.to_string())?;
        header.insert("__metadata__".into(), serde_json::to_value(sorted).map_err(|e| e.to_string())?);
    }
    let text = serde_json::to_string(&header).map_err(|e| e.to_string())?;
    if text.len() > len {
        return Err(format!("sorted header is {} bytes, the original {len}", text.len()));
    }
    let padded = format!("{text:<len$}");
    bytes[8..8 + len].copy_from_slice(padded.as_bytes());
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(precision: Precision) -> Trace {
        let mut t = Trace::new("synth:tiny", "cpu", "fast", precision);
        t.tokens = vec![785, 9217];
        t.layers.push(LayerTrace {
            hidden: Matrix::from_f64(2, 3, vec![1.0, -2.5, 3.0, 0.1, 0.2, 0.3]),
            router_logits: Matrix::from_f64(2, 4, vec![0.5; 8]),
            router_experts: vec![3, 1, 0, 2],
            router_weights: Matrix::from_f64(2, 2, vec![0.75, 0.25, 0.5, 0.5]),
        });
        t.logits = Matrix::from_f64(2, 5, (0..10).map(|i| i as f64 / 7.0).collect());
        t
    }

    #[test]
    fn f64_trace_round_trips_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let t = sample(Precision::F64);
        t.write_safetensors(&path).unwrap();
        assert_eq!(Trace::read_safetensors(&path).unwrap(), t);
    }

    /// `sample` with every sub-layer tap of its one layer filled with distinct values (k = 2, hidden 3),
    /// and a decode step's cache rows.
    fn sample_with_taps(precision: Precision) -> Trace {
        let mut t = sample(precision).with_sub_layer_taps();
        let m = |rows: usize, cols: usize, seed: f64| {
            Matrix::from_f64(rows, cols, (0..rows * cols).map(|i| seed + i as f64 / 3.0).collect())
        };
        let mut taps = SubLayerTaps::default();
        for (i, tap) in SubLayerTap::ALL.into_iter().enumerate() {
            let cols = if tap == SubLayerTap::ExpertOut { 2 * 3 } else { 3 };
            *tap.of_mut(&mut taps) = m(2, cols, i as f64 * 10.0);
        }
        taps.cache_keys = Some(m(2, 3, -1.0));
        taps.cache_values = Some(m(2, 3, -2.0));
        t.sub_layers.push(taps);
        t
    }

    #[test]
    fn sub_layer_taps_round_trip_with_documented_names_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let t = sample_with_taps(Precision::F64);
        t.write_safetensors(&path).unwrap();
        assert_eq!(Trace::read_safetensors(&path).unwrap(), t, "f64 taps come back bit for bit");

        // The names and shapes a numpy / safetensors reader sees (docs/architecture.md).
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for tap in SubLayerTap::ALL {
            let shape = st.tensor(&format!("{tap}.0")).unwrap().shape().to_vec();
            let want = if tap == SubLayerTap::ExpertOut { vec![2, 2, 3] } else { vec![2, 3] };
            assert_eq!(shape, want, "{tap}");
        }
        assert_eq!(st.tensor("cache_keys.0").unwrap().shape(), [2, 3]);

        // Without taps nothing of them is written, and nothing comes back.
        let plain = sample(Precision::F32);
        plain.write_safetensors(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(SafeTensors::deserialize(&bytes).unwrap().len(), 6, "tokens, 4 per layer, logits");
        let back = Trace::read_safetensors(&path).unwrap();
        assert!(back.sub_layers.is_empty() && !back.record_sub_layers);
    }

    #[test]
    fn f32_trace_stores_f32_rounding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let t = sample(Precision::F32);
        t.write_safetensors(&path).unwrap();
        let back = Trace::read_safetensors(&path).unwrap();
        assert_eq!(back.precision, Precision::F32);
        assert_eq!(back.logits.data[1], (1.0f64 / 7.0) as f32 as f64);
        assert_eq!(back.layers[0].router_experts, vec![3, 1, 0, 2]);
    }

    #[test]
    fn the_same_trace_always_gives_the_same_bytes() {
        // Each write builds a new metadata HashMap, with its own random iteration order: without the
        // sorted header, two writes of five metadata keys differ with probability 119/120.
        let dir = tempfile::tempdir().unwrap();
        let t = sample(Precision::F32);
        let files: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                let path = dir.path().join(format!("t{i}.safetensors"));
                t.write_safetensors(&path).unwrap();
                std::fs::read(&path).unwrap()
            })
            .collect();
        assert!(files.windows(2).all(|w| w[0] == w[1]), "trace bytes differ between writes");
        let text = String::from_utf8_lossy(&files[0]);
        let meta = text.find("\"__metadata__\"").expect("metadata in the header");
        let keys = ["backend", "engine_version", "model", "n_layer", "policy"];
        let at: Vec<usize> = keys.iter().map(|k| text[meta..].find(&format!("\"{k}\"")).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "metadata keys in sorted order: {at:?}");
    }

    #[test]
    fn an_atomic_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::fs::write(&path, "old contents, longer than the new").unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["r.json"], "only the target remains");
        // A failed write (the directory is gone) reports the error and leaves nothing behind.
        let missing = dir.path().join("no-such-dir/r.json");
        assert!(write_atomically(&missing, b"x").is_err());
    }

    #[test]
    fn a_layer_count_the_file_cannot_hold_is_refused_before_allocating() {
        // Issue 13 fuzzing: `n_layer` = 10^15 in the metadata made the reader reserve 10^15 layers.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        sample(Precision::F32).write_safetensors(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let at = text.find("\"n_layer\":\"1\"").expect("n_layer in the header") + "\"n_layer\":\"".len();
        let mut patched = bytes.clone();
        patched[at] = b'9'; // one digit keeps the header length: "9" layers in a file of 1
        let e = Trace::from_safetensors_bytes(&patched, "t").unwrap_err().to_string();
        assert!(e.contains("`n_layer` = 9, but the file holds only 6 tensors"), "{e}");
    }

    #[test]
    fn non_finite_values_are_located() {
        let mut t = sample(Precision::F32);
        assert_eq!(t.first_non_finite(), None);
        t.layers[0].hidden.data[4] = f64::NAN;
        assert_eq!(t.first_non_finite(), Some(("hidden.0".to_string(), 4)));
    }
}
