//! The Qwen3-MoE forward, written once (`qwen3_moe`) over a small numeric interface, and the backends
//! that supply it: [`reference`](mod@reference) (f64, weights dequantised exactly, the truth) and
//! [`cpu`] (f32, rayon, quantised dot products straight from the blocks). The CUDA backend lives in
//! `cuda` (feature `cuda`).
//!
//! Semantics: Hugging Face transformers `Qwen3MoeForCausalLM` (see issue 2 item 4).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod numerics;
mod qwen3_moe;
pub mod reference;

use crate::config::ModelConfig;
use crate::error::EngineError;

/// What every backend refuses before computing: an empty prompt, a token id outside the vocabulary, and
/// more tokens than the context holds after the `start` already cached.
pub(crate) fn check_tokens(cfg: &ModelConfig, tokens: &[u32], start: usize) -> Result<(), EngineError> {
    if tokens.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    if let Some((position, &token)) = tokens.iter().enumerate().find(|&(_, &t)| t as usize >= cfg.vocab) {
        return Err(EngineError::TokenOutOfRange { token, position: start + position, vocab: cfg.vocab });
    }
    if start + tokens.len() > cfg.context_length {
        return Err(EngineError::ContextFull {
            context_length: cfg.context_length,
            cached: start,
            requested: tokens.len(),
        });
    }
    Ok(())
}
