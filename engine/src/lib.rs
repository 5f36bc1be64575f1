//! moe-engine: a Qwen3-MoE inference engine built to be checked.
//!
//! It reads GGUF files ([`gguf`]), derives the model configuration ([`config`]), and runs the forward on
//! three backends ([`backend`]): `reference` (every value f64, the truth), `cpu` (f32, rayon) and `cuda`.
//! [`defect`] is the catalogue of seeded defects a `cpu` or `cuda` backend can be built with, for
//! `cargo moe-gate selftest` only.
//! Any forward can record a [`trace`]: the residual stream after every layer, every router's logits and
//! choices, and the final logits. [`tokenizer`] turns text into the model's token ids and back, with the
//! tokenizer the GGUF file carries.

pub mod backend;
pub mod bench;
pub mod config;
pub mod defect;
pub mod error;
pub mod forward;
pub mod gguf;
pub mod quantize;
pub mod spec;
pub mod synth;
pub mod tokenizer;
pub mod trace;
pub mod weights;
