//! Quantisation mixes: which GGUF type each tensor of a model is stored in.
//!
//! The rules follow llama.cpp's `llama_model_quantize` in spirit, simplified to what docs/synthetic-models.md fixes:
//! norms (every 1-D tensor) and the MoE router (`ffn_gate_inp`) stay F32 in every mix; every other
//! matrix takes the mix's type; `q4_k_m` is Q4_K except Q6_K for `output` and for `attn_v` and
//! `ffn_down*` on the "more bits" layers of llama.cpp's `use_more_bits(i, n)`: `i < n/8`, `i >= 7n/8`,
//! or `(i - n/8) % 3 == 2`.
//!
//! A tensor whose row length is not a multiple of its type's block falls back as llama.cpp does
//! (`Q4_K -> Q5_0`, `Q5_K -> Q5_1`, `Q6_K -> Q8_0`, then `F16`); the synthetic presets never need it,
//! re-quantised user files may.

use std::fmt;

use moe_kernels::GgmlType;

/// How the weights of a model are stored: one type for every matrix, or llama.cpp's Q4_K_M mix.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QuantMix {
    /// Everything F32.
    F32,
    /// Matrices F16.
    F16,
    /// Matrices BF16.
    BF16,
    /// Matrices Q8_0.
    Q8_0,
    /// Matrices Q4_K.
    Q4_K,
    /// Matrices Q5_K.
    Q5_K,
    /// Matrices Q6_K.
    Q6_K,
    /// llama.cpp's Q4_K_M: Q4_K, with Q6_K for `output` and the more-bits layers' `attn_v` and
    /// `ffn_down_exps`. The format of the model of record, and the default.
    #[default]
    Q4_K_M,
}

/// What a tensor is, as far as choosing its type goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A 1-D tensor (RMSNorm gains): always F32.
    Vector,
    /// The MoE router `ffn_gate_inp`: always F32 (its logits decide top-k ties).
    Router,
    /// The LM head `output`.
    Output,
    /// The value projection `attn_v` of layer `i`.
    AttnV(usize),
    /// A down projection `ffn_down` / `ffn_down_exps` of layer `i`.
    FfnDown(usize),
    /// Any other matrix (token embeddings included).
    Matrix,
}

impl TensorRole {
    /// Classifies a tensor by its llama.cpp name and its number of dimensions.
    pub fn of(name: &str, n_dims: usize) -> TensorRole {
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|index| index.parse::<usize>().ok());
        let kind = match layer {
            Some(_) => name.splitn(3, '.').nth(2).unwrap_or(""),
            None => name,
        };
        match (layer, kind) {
            _ if n_dims < 2 => TensorRole::Vector,
            (Some(_), k) if k.starts_with("ffn_gate_inp") => TensorRole::Router,
            (Some(i), k) if k.starts_with("attn_v.") => TensorRole::AttnV(i),
            (Some(i), k) if k.starts_with("ffn_down") => TensorRole::FfnDown(i),
            (None, "output.weight") => TensorRole::Output,
            _ => TensorRole::Matrix,
        }
    }
}

impl QuantMix {
    /// Every mix, in the order of docs/synthetic-models.md.
    pub const ALL: [QuantMix; 8] = [
        QuantMix::F32,
        QuantMix::F16,
        QuantMix::BF16,
        QuantMix::Q8_0,
        QuantMix::Q4_K,
        QuantMix::Q5_K,
        QuantMix::Q6_K,
        QuantMix::Q4_K_M,
    ];

    /// The name used in specs and on the command line (`q4_k_m`, ...).
    pub fn name(self) -> &'static str {
        match self {
            QuantMix::F32 => "f32",
            QuantMix::F16 => "f16",
            QuantMix::BF16 => "bf16",
            QuantMix::Q8_0 => "q8_0",
            QuantMix::Q4_K => "q4_k",
            QuantMix::Q5_K => "q5_k",
            QuantMix::Q6_K => "q6_k",
            QuantMix::Q4_K_M => "q4_k_m",
        }
    }

    /// The mix called `name` (ASCII case-insensitive), if any.
    pub fn from_name(name: &str) -> Option<QuantMix> {
        QuantMix::ALL.into_iter().find(|q| q.name().eq_ignore_ascii_case(name))
    }

    /// The names of every mix, comma-separated, for messages.
    pub fn valid_names() -> String {
        QuantMix::ALL.map(QuantMix::name).join(", ")
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` for this mix. The single-type K mixes have no
    /// exact `llama_ftype`; they are recorded as the nearest one (`Q4_K_S`, `Q5_K_S`, `Q6_K`).
    pub fn file_type(self) -> u32 {
        match self {
            QuantMix::F32 => 0,
            QuantMix::F16 => 1,
            QuantMix::Q8_0 => 7,
            QuantMix::Q4_K => 14,
            QuantMix::Q4_K_M => 15,
            QuantMix::Q5_K => 16,
            QuantMix::Q6_K => 18,
            QuantMix::BF16 => 32,
        }
    }

    /// Whether any tensor of this mix is block-quantised (then `general.quantization_version` is written).
    pub fn is_quantized(self) -> bool {
        !matches!(self, QuantMix::F32 | QuantMix::F16 | QuantMix::BF16)
    }

    /// The type of a tensor of `role` in a model of `n_layer` layers, before any row-length fallback.
    pub fn tensor_type(self, role: TensorRole, n_layer: usize) -> GgmlType {
        if matches!(role, TensorRole::Vector | TensorRole::Router) {
            return GgmlType::F32;
        }
        match self {
            QuantMix::F32 => GgmlType::F32,
            QuantMix::F16 => GgmlType::F16,
            QuantMix::BF16 => GgmlType::BF16,
            QuantMix::Q8_0 => GgmlType::Q8_0,
            QuantMix::Q4_K => GgmlType::Q4_K,
            QuantMix::Q5_K => GgmlType::Q5_K,
            QuantMix::Q6_K => GgmlType::Q6_K,
            QuantMix::Q4_K_M => match role {
                TensorRole::Output => GgmlType::Q6_K,
                TensorRole::AttnV(i) | TensorRole::FfnDown(i) if use_more_bits(i, n_layer) => GgmlType::Q6_K,
                _ => GgmlType::Q4_K,
            },
        }
    }

    /// The type of tensor `name` with shape `dims` (ggml order) in a model of `n_layer` layers: the mix's
    /// choice, or the first fallback whose block divides the row length.
    pub fn type_for(self, name: &str, dims: &[usize], n_layer: usize) -> GgmlType {
        let wanted = self.tensor_type(TensorRole::of(name, dims.len()), n_layer);
        fit_row(wanted, dims.first().copied().unwrap_or(1))
    }
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)`: the layers that Q4_K_M stores with more bits.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// `ty`, or the first of llama.cpp's fallbacks for it whose block divides `row_len`.
pub fn fit_row(ty: GgmlType, row_len: usize) -> GgmlType {
    let mut ty = ty;
    while !row_len.is_multiple_of(ty.block_size()) {
        ty = match ty {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            _ => GgmlType::F16,
        };
    }
    ty
}

impl fmt::Display for QuantMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
