//! The validated weight set of a Qwen3-MoE model, as llama.cpp's `qwen3moe` architecture names and
//! shapes its tensors (`llama-arch.cpp`, `LLM_ARCH_QWEN3MOE`; shapes in ggml order, row length first).
//!
//! [`ModelWeights::from_gguf`] checks every tensor against the [`ModelConfig`] (present, shape, type) and
//! refuses tensors the architecture does not use, so the forwards can index weights without checks.
//! Weights stay in the file's mapping: a [`WeightTensor`] is an `Arc` of the file and a byte range.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use moe_kernels::GgmlType;

use crate::config::ModelConfig;
use crate::gguf::{GgufError, GgufFile};

/// What is wrong with a model file, beyond its GGUF encoding.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file is not valid GGUF.
    #[error(transparent)]
    Gguf(#[from] GgufError),

    /// The file holds another architecture.
    #[error(
        "general.architecture is {found:?}, expected \"qwen3moe\"; this engine runs Qwen3-MoE models only"
    )]
    WrongArchitecture { found: String },

    /// A required metadata key is absent.
    #[error("metadata key {key:?} is missing; a qwen3moe GGUF (as llama.cpp's converter writes it) has it")]
    MissingKey { key: String },

    /// A metadata key holds a value of the wrong type.
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongKeyType { key: String, expected: &'static str, found: &'static str },

    /// A metadata value the forward cannot run with.
    #[error("metadata key {key:?} = {value}: {reason}")]
    InvalidConfig { key: String, value: String, reason: String },

    /// A tensor the architecture needs is absent.
    #[error(
        "tensor {name:?} is missing; a qwen3moe model needs it (is the file complete, and of this \
         architecture?)"
    )]
    MissingTensor { name: String },

    /// A tensor's shape disagrees with the configuration.
    #[error(
        "tensor {name:?} has shape {found:?}, expected {expected:?} = {layout} (ggml order, row length \
         first) from the file's qwen3moe.* keys; the tensor and the keys disagree"
    )]
    WrongShape { name: String, expected: Vec<usize>, found: Vec<usize>, layout: &'static str },

    /// A tensor stored in a type its role does not allow.
    #[error("tensor {name:?} is {found}, but {role} must be one of {allowed}; convert the model again")]
    UnsupportedType { name: String, found: &'static str, role: &'static str, allowed: &'static str },

    /// A tensor the architecture does not use (another architecture's, or a layer beyond `block_count`).
    #[error(
        "tensor {name:?} is not part of a qwen3moe model of {n_layer} layers; the file is of another \
         architecture or its qwen3moe.block_count is wrong"
    )]
    UnexpectedTensor { name: String, n_layer: usize },
}

/// One tensor of a model: its description and its bytes, which stay in the (shared) file.
#[derive(Clone)]
pub struct WeightTensor {
    /// The tensor's name (a slice of an expert tensor is suffixed with `[expert]`).
    pub name: String,
    /// Its storage type.
    pub ty: GgmlType,
    /// Its shape in ggml order: `dims[0]` is the row length.
    pub dims: Vec<usize>,
    file: Arc<GgufFile>,
    range: Range<usize>,
    row_bytes: usize,
}

impl WeightTensor {
    /// The tensor named `name` in `file`, if there is one.
    pub fn from_file(file: &Arc<GgufFile>, name: &str) -> Option<WeightTensor> {
        let info = file.tensor(name)?;
        // The reader checked that the bytes lie in the file and that rows hold whole blocks.
        let range = file.data_range(info).expect("GgufFile checks every tensor lies inside the file");
        let row_bytes = info.ty.row_bytes(info.dims[0]).expect("GgufFile checks rows hold whole blocks");
        Some(WeightTensor {
            name: info.name.clone(),
            ty: info.ty,
            dims: info.dims.clone(),
            file: Arc::clone(file),
            range,
            row_bytes,
        })
    }

    /// All of the tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.file.as_bytes()[self.range.clone()]
    }

    /// Weights per row (`dims[0]`).
    pub fn row_len(&self) -> usize {
        self.dims[0]
    }

    /// Number of rows: the product of `dims[1..]` (1 for a vector).
    pub fn n_rows(&self) -> usize {
        self.dims[1..].iter().product()
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The bytes of row `i`.
    ///
    /// # Panics
    /// If `i >= self.n_rows()`, like slice indexing.
    pub fn row(&self, i: usize) -> &[u8] {
        assert!(i < self.n_rows(), "row {i} of tensor {:?} which has {} rows", self.name, self.n_rows());
        &self.bytes()[i * self.row_bytes..(i + 1) * self.row_bytes]
    }

    /// Expert `e`'s matrix: the `e`-th 2-D slice `[dims[0], dims[1]]` of a 3-D expert tensor.
    ///
    /// # Panics
    /// If the tensor is not 3-D or `e >= dims[2]`, like slice indexing.
    pub fn matrix(&self, e: usize) -> WeightTensor {
        assert!(
            self.dims.len() == 3 && e < self.dims[2],
            "matrix {e} of tensor {:?} with dims {:?}: needs a 3-D tensor with more than {e} matrices",
            self.name,
            self.dims
        );
        let matrix_bytes = self.dims[1] * self.row_bytes;
        let start = self.range.start + e * matrix_bytes;
        WeightTensor {
            name: format!("{}[{e}]", self.name),
            ty: self.ty,
            dims: self.dims[..2].to_vec(),
            file: Arc::clone(&self.file),
            range: start..start + matrix_bytes,
            row_bytes: self.row_bytes,
        }
    }

    /// Number of weights.
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Where the bytes lie in [`GgufFile::as_bytes`] (to upload a whole file once and index into it).
    pub fn byte_range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The file the bytes belong to.
    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }
}

impl fmt::Debug for WeightTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightTensor")
            .field("name", &self.name)
            .field("ty", &self.ty)
            .field("dims", &self.dims)
            .field("bytes", &self.range)
            .finish()
    }
}

/// The weights of one decoder layer (`blk.N.*`).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `attn_norm.weight` `[hidden]`: RMSNorm before attention.
    pub attn_norm: WeightTensor,
    /// `attn_q.weight` `[hidden, n_head * head_dim]`.
    pub attn_q: WeightTensor,
    /// `attn_k.weight` `[hidden, n_kv_head * head_dim]`.
    pub attn_k: WeightTensor,
    /// `attn_v.weight` `[hidden, n_kv_head * head_dim]`.
    pub attn_v: WeightTensor,
    /// `attn_output.weight` `[n_head * head_dim, hidden]`.
    pub attn_output: WeightTensor,
    /// `attn_q_norm.weight` `[head_dim]`: per-head RMSNorm of queries.
    pub attn_q_norm: WeightTensor,
    /// `attn_k_norm.weight` `[head_dim]`: per-head RMSNorm of keys.
    pub attn_k_norm: WeightTensor,
    /// `ffn_norm.weight` `[hidden]`: RMSNorm before the experts.
    pub ffn_norm: WeightTensor,
    /// `ffn_gate_inp.weight` `[hidden, n_expert]`: the router.
    pub ffn_gate_inp: WeightTensor,
    /// `ffn_gate_exps.weight` `[hidden, expert_ffn, n_expert]`.
    pub ffn_gate_exps: WeightTensor,
    /// `ffn_up_exps.weight` `[hidden, expert_ffn, n_expert]`.
    pub ffn_up_exps: WeightTensor,
    /// `ffn_down_exps.weight` `[expert_ffn, hidden, n_expert]`.
    pub ffn_down_exps: WeightTensor,
}

/// Every weight of a Qwen3-MoE model, checked against its configuration.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// The configuration the shapes were checked against.
    pub config: ModelConfig,
    /// `token_embd.weight` `[hidden, vocab]`.
    pub token_embd: WeightTensor,
    /// `output_norm.weight` `[hidden]`.
    pub output_norm: WeightTensor,
    /// `output.weight` `[hidden, vocab]`, or `token_embd` when the file has none (tied embeddings).
    pub output: WeightTensor,
    /// Whether `output` is `token_embd`.
    pub tied_embeddings: bool,
    /// The decoder layers, in order.
    pub layers: Vec<LayerWeights>,
    /// The file all weights live in.
    pub file: Arc<GgufFile>,
}

/// What a tensor is used for, which decides the types it may have.
#[derive(Clone, Copy)]
enum Role {
    /// Multiplied as a matrix or looked up by row: any type the kernels read.
    Matrix,
    /// Read element-wise in full precision (norm weights, the router): float types only.
    Float(&'static str),
}

/// Types a [`Role::Float`] tensor may have.
const FLOAT_TYPES: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];

impl ModelWeights {
    /// Opens `path` and validates it as a Qwen3-MoE model.
    pub fn open(path: &Path) -> Result<ModelWeights, ModelError> {
        Self::from_gguf(Arc::new(GgufFile::open(path)?))
    }

    /// Checks every tensor of `file` against the configuration its keys state: each one present, of the
    /// shape the configuration implies and a type its role allows, and no tensor left unused.
    pub fn from_gguf(file: Arc<GgufFile>) -> Result<ModelWeights, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let mut loader = Loader { file: &file, used: 0 };
        let c = &config;
        let (hidden, vocab) = (c.hidden, c.vocab);
        let token_embd =
            loader.get("token_embd.weight", &[hidden, vocab], "[hidden, vocab]", Role::Matrix)?;
        let output_norm = loader.get("output_norm.weight", &[hidden], "[hidden]", Role::Float("a norm"))?;
        let tied_embeddings = file.tensor("output.weight").is_none();
        let output = if tied_embeddings {
            token_embd.clone()
        } else {
            loader.get("output.weight", &[hidden, vocab], "[hidden, vocab]", Role::Matrix)?
        };
        let layers = (0..c.n_layer).map(|i| loader.layer(c, i)).collect::<Result<Vec<_>, _>>()?;
        if loader.used != file.tensors().len() {
            return Err(loader.unexpected(c));
        }
        Ok(ModelWeights { config, token_embd, output_norm, output, tied_embeddings, layers, file })
    }
}

/// Takes tensors from a file, checking each and counting those used.
struct Loader<'a> {
    file: &'a Arc<GgufFile>,
    used: usize,
}

impl Loader<'_> {
    fn layer(&mut self, c: &ModelConfig, i: usize) -> Result<LayerWeights, ModelError> {
        let (hidden, q, kv, hd) = (c.hidden, c.q_dim(), c.kv_dim(), c.head_dim);
        let (ffn, n_exp) = (c.expert_ffn, c.n_expert);
        let mut get = |name: &str, dims: &[usize], layout, role| {
            self.get(&format!("blk.{i}.{name}.weight"), dims, layout, role)
        };
        Ok(LayerWeights {
            attn_norm: get("attn_norm", &[hidden], "[hidden]", Role::Float("a norm"))?,
            attn_q: get("attn_q", &[hidden, q], "[hidden, n_head * head_dim]", Role::Matrix)?,
            attn_k: get("attn_k", &[hidden, kv], "[hidden, n_kv_head * head_dim]", Role::Matrix)?,
            attn_v: get("attn_v", &[hidden, kv], "[hidden, n_kv_head * head_dim]", Role::Matrix)?,
            attn_output: get("attn_output", &[q, hidden], "[n_head * head_dim, hidden]", Role::Matrix)?,
            attn_q_norm: get("attn_q_norm", &[hd], "[head_dim]", Role::Float("a norm"))?,
            attn_k_norm: get("attn_k_norm", &[hd], "[head_dim]", Role::Float("a norm"))?,
            ffn_norm: get("ffn_norm", &[hidden], "[hidden]", Role::Float("a norm"))?,
            ffn_gate_inp: get(
                "ffn_gate_inp",
                &[hidden, n_exp],
                "[hidden, n_expert]",
                Role::Float("the router"),
            )?,
            ffn_gate_exps: get(
                "ffn_gate_exps",
                &[hidden, ffn, n_exp],
                "[hidden, expert_ffn, n_expert]",
                Role::Matrix,
            )?,
            ffn_up_exps: get(
                "ffn_up_exps",
                &[hidden, ffn, n_exp],
                "[hidden, expert_ffn, n_expert]",
                Role::Matrix,
            )?,
            ffn_down_exps: get(
                "ffn_down_exps",
                &[ffn, hidden, n_exp],
                "[expert_ffn, hidden, n_expert]",
                Role::Matrix,
            )?,
        })
    }

    /// Tensor `name`, checked to have shape `dims` (described by `layout`) and a type `role` allows.
    fn get(
        &mut self,
        name: &str,
        dims: &[usize],
        layout: &'static str,
        role: Role,
    ) -> Result<WeightTensor, ModelError> {
        let t = WeightTensor::from_file(self.file, name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_owned() })?;
        if t.dims != dims {
            return Err(ModelError::WrongShape {
                name: t.name,
                expected: dims.to_vec(),
                found: t.dims,
                layout,
            });
        }
        if let Role::Float(what) = role
            && !FLOAT_TYPES.contains(&t.ty)
        {
            return Err(ModelError::UnsupportedType {
                name: t.name,
                found: t.ty.name(),
                role: what,
                allowed: "F32, F16, BF16",
            });
        }
        self.used += 1;
        Ok(t)
    }

    /// The first tensor of the file that a model of configuration `c` does not use.
    fn unexpected(&self, c: &ModelConfig) -> ModelError {
        const LAYER_TENSORS: [&str; 12] = [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "attn_q_norm",
            "attn_k_norm",
            "ffn_norm",
            "ffn_gate_inp",
            "ffn_gate_exps",
            "ffn_up_exps",
            "ffn_down_exps",
        ];
        let is_used = |name: &str| {
            if matches!(name, "token_embd.weight" | "output_norm.weight" | "output.weight") {
                return true;
            }
            let Some(rest) = name.strip_prefix("blk.") else { return false };
            let Some((layer, tensor)) = rest.split_once('.') else { return false };
            let in_range = layer.parse::<usize>().is_ok_and(|l| l < c.n_layer && l.to_string() == layer);
            in_range && tensor.strip_suffix(".weight").is_some_and(|t| LAYER_TENSORS.contains(&t))
        };
        let name = self.file.tensors().iter().map(|t| t.name.as_str()).find(|n| !is_used(n)).unwrap_or("?");
        ModelError::UnexpectedTensor { name: name.to_owned(), n_layer: c.n_layer }
    }
}
