//! The Qwen3-MoE model configuration, as the `qwen3moe.*` GGUF keys state it.

use crate::gguf::{GgufFile, GgufValue};
use crate::weights::ModelError;

/// Hyper-parameters of a Qwen3-MoE model (llama.cpp architecture name `qwen3moe`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `qwen3moe.block_count`
    pub n_layer: usize,
    /// `qwen3moe.embedding_length`
    pub hidden: usize,
    /// `qwen3moe.attention.head_count`
    pub n_head: usize,
    /// `qwen3moe.attention.head_count_kv`
    pub n_kv_head: usize,
    /// `qwen3moe.attention.key_length` (equal to `value_length` for this architecture)
    pub head_dim: usize,
    /// `qwen3moe.expert_count`
    pub n_expert: usize,
    /// `qwen3moe.expert_used_count`
    pub n_expert_used: usize,
    /// `qwen3moe.expert_feed_forward_length`
    pub expert_ffn: usize,
    /// rows of `token_embd.weight`
    pub vocab: usize,
    /// `qwen3moe.rope.freq_base`
    pub rope_theta: f64,
    /// `qwen3moe.attention.layer_norm_rms_epsilon`
    pub rms_eps: f64,
    /// `qwen3moe.context_length`
    pub context_length: usize,
    /// Renormalise the top-k router weights to sum to one (Qwen3-MoE: true; `qwen3moe.expert_weights_norm`
    /// where present).
    pub norm_topk_prob: bool,
}

impl ModelConfig {
    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

/// The architecture name this engine runs (`general.architecture`).
pub const ARCHITECTURE: &str = "qwen3moe";

/// `qwen3moe.rope.freq_base` when absent (llama.cpp's default).
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl ModelConfig {
    /// Reads the configuration from a GGUF file's `qwen3moe.*` keys (llama.cpp's names), and the
    /// vocabulary size from the rows of `token_embd.weight`. Every value is checked for what the forward
    /// needs (non-zero sizes, whole KV groups, an even head dimension for RoPE, k <= experts, finite
    /// positive epsilon and theta).
    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig, ModelError> {
        let arch_key = "general.architecture";
        let arch = f.get(arch_key).ok_or_else(|| ModelError::MissingKey { key: arch_key.to_owned() })?;
        let arch = arch.as_str().ok_or_else(|| wrong_type(arch_key, "string", arch))?;
        if arch != ARCHITECTURE {
            return Err(ModelError::WrongArchitecture { found: arch.to_owned() });
        }
        let n_layer = positive(f, "block_count")?;
        let hidden = positive(f, "embedding_length")?;
        let n_head = positive(f, "attention.head_count")?;
        let n_kv_head = positive(f, "attention.head_count_kv")?;
        let head_dim = match size(f, "attention.key_length")? {
            Some(head_dim) => head_dim,
            None if hidden.is_multiple_of(n_head) => hidden / n_head,
            None => {
                let reason =
                    format!("absent, and embedding_length / head_count = {hidden} / {n_head} is not whole");
                return Err(invalid("attention.key_length", "(default)", reason));
            }
        };
        if let Some(value_length) = size(f, "attention.value_length")?
            && value_length != head_dim
        {
            let reason = format!("differs from the key length {head_dim}, which qwen3moe does not allow");
            return Err(invalid("attention.value_length", value_length, reason));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(invalid(
                "attention.key_length",
                head_dim,
                "RoPE needs an even head dimension".to_owned(),
            ));
        }
        if !n_head.is_multiple_of(n_kv_head) {
            let reason = format!("does not divide head_count {n_head} into whole query groups");
            return Err(invalid("attention.head_count_kv", n_kv_head, reason));
        }
        product("attention.head_count", n_head, "attention.key_length", head_dim)?;
        product("attention.head_count_kv", n_kv_head, "attention.key_length", head_dim)?;
        let n_expert = positive(f, "expert_count")?;
        let n_expert_used = positive(f, "expert_used_count")?;
        if n_expert_used > n_expert {
            return Err(invalid(
                "expert_used_count",
                n_expert_used,
                format!("exceeds expert_count {n_expert}"),
            ));
        }
        let rms_eps = positive_float(f, "attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| ModelError::MissingKey { key: qkey("attention.layer_norm_rms_epsilon") })?;
        let rope_theta = positive_float(f, "rope.freq_base")?.unwrap_or(DEFAULT_ROPE_THETA);
        let norm_topk_prob =
            optional(f, "expert_weights_norm", GgufValue::as_bool, "a bool")?.unwrap_or(true);
        // Every key is checked before the tensors are read, so a bad key is named as such.
        let expert_ffn = positive(f, "expert_feed_forward_length")?;
        let context_length = positive(f, "context_length")?;
        Ok(ModelConfig {
            n_layer,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            n_expert,
            n_expert_used,
            expert_ffn,
            vocab: vocab_size(f, hidden)?,
            rope_theta,
            rms_eps,
            context_length,
            norm_topk_prob,
        })
    }
}

/// A derived size, `a * b` of keys `a_name` and `b_name` (the query width `head_count * key_length`, the
/// key width `head_count_kv * key_length`): refused, naming the first key, when it overflows `usize` or
/// exceeds [`MAX_DERIVED_SIZE`], so [`ModelConfig::q_dim`] and [`ModelConfig::kv_dim`] never overflow
/// on a configuration read from a file.
fn product(a_name: &str, a: usize, b_name: &str, b: usize) -> Result<usize, ModelError> {
    match a.checked_mul(b) {
        Some(n) if n <= MAX_DERIVED_SIZE => Ok(n),
        _ => Err(invalid(
            a_name,
            a,
            format!(
                "times {} = {b} exceeds {MAX_DERIVED_SIZE}, the widest activation row this engine sizes",
                qkey(b_name)
            ),
        )),
    }
}

/// The largest width a derived activation row (queries, keys) may have: 2^31 values, as ggml's `int32`
/// row lengths allow; the production model's query width is 4096.
pub const MAX_DERIVED_SIZE: usize = 1 << 31;

/// The full key of architecture key `name`.
fn qkey(name: &str) -> String {
    format!("{ARCHITECTURE}.{name}")
}

/// An optional `qwen3moe.*` key converted by `convert`, refused when present with another type.
fn optional<T>(
    f: &GgufFile,
    name: &str,
    convert: impl Fn(&GgufValue) -> Option<T>,
    expected: &'static str,
) -> Result<Option<T>, ModelError> {
    let key = qkey(name);
    match f.get(&key) {
        None => Ok(None),
        Some(value) => convert(value).map(Some).ok_or_else(|| wrong_type(&key, expected, value)),
    }
}

/// A required `qwen3moe.*` size.
fn positive(f: &GgufFile, name: &str) -> Result<usize, ModelError> {
    size(f, name)?.ok_or_else(|| ModelError::MissingKey { key: qkey(name) })
}

/// An optional `qwen3moe.*` size: a non-zero integer that fits in `usize`.
fn size(f: &GgufFile, name: &str) -> Result<Option<usize>, ModelError> {
    let Some(value) = optional(f, name, GgufValue::as_u64, "a non-negative integer")? else {
        return Ok(None);
    };
    match usize::try_from(value) {
        Ok(0) => Err(invalid(name, 0, "must be at least 1".to_owned())),
        Ok(v) => Ok(Some(v)),
        Err(_) => Err(invalid(name, value, "does not fit in memory sizes".to_owned())),
    }
}

/// An optional `qwen3moe.*` float that must be finite and positive.
fn positive_float(f: &GgufFile, name: &str) -> Result<Option<f64>, ModelError> {
    let value = optional(f, name, GgufValue::as_f64, "a number")?;
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            Err(invalid(name, v, "must be finite and positive".to_owned()))
        }
        _ => Ok(value),
    }
}

/// Rows of `token_embd.weight`, which must be `[hidden, vocab]`.
fn vocab_size(f: &GgufFile, hidden: usize) -> Result<usize, ModelError> {
    let name = "token_embd.weight";
    let t = f.tensor(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_owned() })?;
    match t.dims[..] {
        [row, vocab] if row == hidden => Ok(vocab),
        _ => Err(ModelError::WrongShape {
            name: name.to_owned(),
            expected: vec![hidden, t.dims.get(1).copied().unwrap_or(0)],
            found: t.dims.clone(),
            layout: "[embedding_length, vocab]",
        }),
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &GgufValue) -> ModelError {
    ModelError::WrongKeyType { key: key.to_owned(), expected, found: found.type_name() }
}

fn invalid(name: &str, value: impl std::fmt::Display, reason: String) -> ModelError {
    ModelError::InvalidConfig { key: qkey(name), value: value.to_string(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufWriter;

    /// The metadata of a small valid configuration (no tensors: the checks of this module run first, and
    /// `token_embd.weight` is only needed for the vocabulary, after them).
    fn file(overrides: &[(&str, GgufValue)]) -> GgufFile {
        let mut keys: Vec<(String, GgufValue)> = [
            ("block_count", GgufValue::U32(2)),
            ("embedding_length", GgufValue::U32(64)),
            ("attention.head_count", GgufValue::U32(4)),
            ("attention.head_count_kv", GgufValue::U32(2)),
            ("attention.key_length", GgufValue::U32(16)),
            ("expert_count", GgufValue::U32(8)),
            ("expert_used_count", GgufValue::U32(2)),
            ("expert_feed_forward_length", GgufValue::U32(32)),
            ("context_length", GgufValue::U32(512)),
            ("attention.layer_norm_rms_epsilon", GgufValue::F32(1e-6)),
        ]
        .into_iter()
        .map(|(k, v)| (qkey(k), v))
        .collect();
        for (key, value) in overrides {
            keys.retain(|(k, _)| k != key);
            keys.push((key.to_string(), value.clone()));
        }
        let mut w = GgufWriter::new(32);
        w.add_metadata("general.architecture", GgufValue::from(ARCHITECTURE));
        for (k, v) in keys {
            w.add_metadata(&k, v);
        }
        GgufFile::from_bytes(w.to_vec(|_, _| Ok(())).unwrap()).unwrap()
    }

    fn refusal(overrides: &[(&str, GgufValue)]) -> String {
        ModelConfig::from_gguf(&file(overrides)).unwrap_err().to_string()
    }

    #[test]
    fn the_base_configuration_reaches_the_vocabulary() {
        // Every key above is valid: only the missing embedding tensor remains, so each case below is
        // refused by its own key.
        assert!(refusal(&[]).contains("token_embd.weight"), "{}", refusal(&[]));
    }

    #[test]
    fn absurd_metadata_is_refused_naming_the_key_and_value() {
        let big = GgufValue::U64(1 << 40);
        let cases: Vec<(Vec<(&str, GgufValue)>, &str)> = vec![
            // 2^40 heads of 2^40 values overflow usize: q_dim would panic in the dev profile.
            (
                vec![
                    ("qwen3moe.attention.head_count", big.clone()),
                    ("qwen3moe.attention.key_length", big.clone()),
                ],
                "\"qwen3moe.attention.head_count\" = 1099511627776",
            ),
            (
                vec![
                    ("qwen3moe.attention.head_count", big.clone()),
                    ("qwen3moe.attention.head_count_kv", big.clone()),
                    ("qwen3moe.attention.key_length", GgufValue::U32(2)),
                ],
                "\"qwen3moe.attention.head_count\" = 1099511627776",
            ),
            (vec![("qwen3moe.expert_count", GgufValue::U32(0))], "\"qwen3moe.expert_count\" = 0"),
            (vec![("qwen3moe.expert_used_count", GgufValue::U32(9))], "\"qwen3moe.expert_used_count\" = 9"),
            (vec![("qwen3moe.context_length", GgufValue::U32(0))], "\"qwen3moe.context_length\" = 0"),
            (vec![("qwen3moe.rope.freq_base", GgufValue::F32(-1.0))], "\"qwen3moe.rope.freq_base\" = -1"),
            (
                vec![("qwen3moe.rope.freq_base", GgufValue::F32(f32::INFINITY))],
                "\"qwen3moe.rope.freq_base\" = inf",
            ),
            (
                vec![("qwen3moe.attention.layer_norm_rms_epsilon", GgufValue::F32(0.0))],
                "\"qwen3moe.attention.layer_norm_rms_epsilon\" = 0",
            ),
            (
                vec![("qwen3moe.attention.head_count_kv", GgufValue::U32(8))],
                "\"qwen3moe.attention.head_count_kv\" = 8",
            ),
        ];
        for (overrides, expected) in cases {
            let message = refusal(&overrides);
            assert!(message.contains(expected), "{message:?} should contain {expected:?}");
        }
    }
}
