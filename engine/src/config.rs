//! The Qwen3-MoE model configuration, as the `qwen3moe.*` GGUF keys state it.

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
