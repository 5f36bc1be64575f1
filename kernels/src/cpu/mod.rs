//! CPU kernels other than the block formats: RMSNorm, RoPE, softmax, top-k routing, SwiGLU and causal
//! attention, plus the dot product they share.
//!
//! Every kernel is generic over [`Real`] (`f32` or `f64`), so the `reference` backend (f64) and the `cpu`
//! backend (f32) run one definition of each operation, in one operation order. The definitions follow the
//! Hugging Face transformers Qwen3-MoE modelling code (`Qwen3MoeRMSNorm`, `apply_rotary_pos_emb` with
//! `rotate_half`, `eager_attention_forward`, `Qwen3MoeSparseMoeBlock`), which is what the fixtures were
//! computed with.
//!
//! The kernels take slices whose lengths the caller derives from the model configuration; a length that
//! does not match is a programming error and panics (each function says which lengths must agree).

mod activation;
mod attention;
mod dot_each;
mod dot_tile;
mod exp;
mod norm;
mod real;
mod rope;
mod routing;
mod softmax;

pub use activation::{silu, swiglu};
pub use attention::{KvView, causal_attention_head};
pub use dot_each::dot_each;
pub use dot_tile::dot_tile;
pub use exp::exp_f32;
pub use norm::rms_norm;
pub use real::{Real, dot};
pub use rope::RopeTable;
pub use routing::{route, top_k};
pub use softmax::softmax_in_place;
