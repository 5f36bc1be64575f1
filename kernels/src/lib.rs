//! Compute kernels shared by moe-gate's backends.
//!
//! - [`quant`]: the GGUF block formats (F32, F16, BF16, Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): their
//!   byte layouts, exact dequantisation to f32 and f64, dot products of a quantised row with f32
//!   activations (activations are never quantised), and quantisers.
//! - [`cpu`]: the CPU side of every other kernel family (RMSNorm, RoPE, softmax, top-k, SwiGLU).
//! - `cuda` (feature `cuda`): the CUDA C sources, compiled at run time with NVRTC.
//!
//! The scalar implementation of each family is its definition; optimised variants are tested against it.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod quant;

pub use quant::GgmlType;
