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
