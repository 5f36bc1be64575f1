//! The synthetic model shapes (docs/synthetic-models.md): two small ones for tests and the default gate, and the two
//! production Qwen3-MoE 30B-A3B configurations exactly as their released `config.json` files state them.

use std::fmt;

use crate::config::ModelConfig;

/// The vocabulary of every preset: Qwen3's (151 643 BPE tokens and specials, padded to 151 936), so a
/// contract's token ids are valid on every preset.
pub const QWEN3_VOCAB: usize = 151_936;

/// A named model shape for `synth:PRESET` specs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// 4 layers, hidden 256, 4 q / 2 kv heads of 64, 16 experts top-4, expert FFN 256: the embedded
    /// default, small enough that the whole default gate runs in seconds on 2 cores.
    Tiny,
    /// 8 layers, hidden 512, 8 q / 2 kv heads of 128, 32 experts top-4, expert FFN 256: the production
    /// head size and a query width that differs from the hidden size, still cheap for the f64 reference.
    Small,
    /// Qwen3-30B-A3B: 48 layers, hidden 2048, 32 q / 4 kv heads of 128, 128 experts top-8, expert FFN
    /// 768, rope theta 1e6, context 40 960.
    Qwen3_30bA3b,
    /// Qwen3-Coder-30B-A3B-Instruct: the same shape as [`Preset::Qwen3_30bA3b`] with rope theta 1e7 and
    /// context 262 144. The model of record.
    Qwen3Coder30bA3b,
}

impl Preset {
    /// Every preset, smallest first.
    pub const ALL: [Preset; 4] =
        [Preset::Tiny, Preset::Small, Preset::Qwen3_30bA3b, Preset::Qwen3Coder30bA3b];

    /// The name used in specs (`synth:NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Qwen3_30bA3b => "qwen3-30b-a3b",
            Preset::Qwen3Coder30bA3b => "qwen3-coder-30b-a3b",
        }
    }

    /// The preset called `name` (ASCII case-insensitive), if any.
    pub fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(name))
    }

    /// The names of every preset, comma-separated, for messages.
    pub fn valid_names() -> String {
        Preset::ALL.map(Preset::name).join(", ")
    }

    /// The model configuration this preset builds.
    pub fn config(self) -> ModelConfig {
        let production = |rope_theta: f64, context_length: usize| ModelConfig {
            n_layer: 48,
            hidden: 2048,
            n_head: 32,
            n_kv_head: 4,
            head_dim: 128,
            n_expert: 128,
            n_expert_used: 8,
            expert_ffn: 768,
            vocab: QWEN3_VOCAB,
            rope_theta,
            rms_eps: 1e-6,
            context_length,
            norm_topk_prob: true,
        };
        match self {
            Preset::Tiny => ModelConfig {
                n_layer: 4,
                hidden: 256,
                n_head: 4,
                n_kv_head: 2,
                head_dim: 64,
                n_expert: 16,
                n_expert_used: 4,
                expert_ffn: 256,
                vocab: QWEN3_VOCAB,
                rope_theta: 1e6,
                rms_eps: 1e-6,
                context_length: 4096,
                norm_topk_prob: true,
            },
            Preset::Small => ModelConfig {
                n_layer: 8,
                hidden: 512,
                n_head: 8,
                n_kv_head: 2,
                head_dim: 128,
                n_expert: 32,
                n_expert_used: 4,
                expert_ffn: 256,
                vocab: QWEN3_VOCAB,
                rope_theta: 1e6,
                rms_eps: 1e-6,
                context_length: 8192,
                norm_topk_prob: true,
            },
            Preset::Qwen3_30bA3b => production(1e6, 40_960),
            Preset::Qwen3Coder30bA3b => production(1e7, 262_144),
        }
    }

    /// `qwen3moe.feed_forward_length`: the dense FFN width of the released configs (`intermediate_size`),
    /// which no layer of these models uses (every layer is MoE) but llama.cpp's loader reads.
    pub fn dense_ffn(self) -> usize {
        match self {
            Preset::Tiny => 512,
            Preset::Small => 1024,
            Preset::Qwen3_30bA3b => 6144,
            Preset::Qwen3Coder30bA3b => 5472,
        }
    }

    /// The human-readable model name written to `general.name`.
    pub fn display_name(self) -> &'static str {
        match self {
            Preset::Tiny => "moe-gate synthetic tiny",
            Preset::Small => "moe-gate synthetic small",
            Preset::Qwen3_30bA3b => "moe-gate synthetic Qwen3-30B-A3B",
            Preset::Qwen3Coder30bA3b => "moe-gate synthetic Qwen3-Coder-30B-A3B",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
