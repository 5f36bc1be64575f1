//! The CUDA side of every kernel family (feature `cuda`): CUDA C sources compiled at run time with NVRTC,
//! device memory, and typed, bounds-checked launchers.
//!
//! - `*.cu` / `common.cuh`: the kernels. Block formats follow ggml (`ggml-common.h`, `ggml-quants.c`); the
//!   model kernels follow Hugging Face transformers' Qwen3-MoE (`Qwen3MoeRMSNorm`, `apply_rotary_pos_emb`,
//!   `eager_attention_forward`, `Qwen3MoeSparseMoeBlock`). Their operation order is written down in
//!   `docs/numerics.md`.
//! - [`CudaDevice`]: one per device and process ([`CudaDevice::get`]); opening it checks for the driver
//!   and NVRTC before touching either (cudarc panics when a library is missing) and compiles the kernels
//!   once.
//! - [`DeviceBuffer`] / [`DevSlice`] / [`DevSliceMut`]: plain device allocations (`cuMemAlloc`, never
//!   managed memory) and borrowed views of them; [`DeviceMatrix`]: a weight tensor in its GGUF blocks.
//! - The operations (`CudaDevice::matvec`, `rmsnorm`, `attention`, `softmax_topk`, `moe_matvec`, ...):
//!   every length and index a kernel relies on is checked on the host before the launch, and the kernels
//!   turn out-of-range token or expert ids into NaN instead of reading out of bounds, so the API is safe.
//!
//! - The `exact` policy's kernels (`exact.cu`, launched by `CudaDevice::*_exact`) follow the canonical
//!   operation order of `docs/numerics.md`, the CPU kernels' order, with every operation explicitly
//!   rounded: their results are the CPU's bits.
//!
//! - [`Tuning`]: the kernels' load batches set at run time (`MOE_GATE_CUDA_TUNE`), to measure a variant on
//!   a device without a rebuild; no knob changes a result.
//!
//! - The seeded defects' kernels (`seeded.cu`, launched by `CudaDevice::seeded_*`) and compile variants
//!   (`CudaDevice::get_variant`): `cargo moe-gate selftest` only (`moe_engine::defect`).
//!
//! Everything is enqueued on the device's stream (one per `CudaDevice`; [`CudaDevice::fork`] gives another);
//! only downloads wait for it.

mod device;
mod error;
mod exact;
mod ops;
mod seeded;
mod tuning;

pub use device::{
    CudaDevice, DevSlice, DevSliceMut, DeviceBuffer, DeviceGraph, DeviceInfo, DeviceMatrix, DeviceScalar,
    compile_program, compile_program_variant, compile_source, kernel_entry_names,
};
pub use error::CudaError;
pub use exact::{EXACT_ATTENTION_MAX_POSITIONS, ExactRows};
pub use ops::{AttentionShape, ExpertGroups, FUSED_MAX_SLOTS, RopePosition, Routing};
pub use seeded::{SEEDED_NO_FMA_CONTRACTION, SEEDED_SOFTMAX_NO_MAX};
pub use tuning::{KNOBS as TUNING_KNOBS, TUNE_ENV, Tuning};

/// Environment variable that makes every launch wait for the kernel and check its status, so an
/// asynchronous fault (an illegal address, say) is reported at the operation that caused it. Any value
/// but `0` turns it on; it slows the forward down.
pub const SYNC_EACH_LAUNCH_ENV: &str = "MOE_GATE_CUDA_SYNC";

/// Environment variable that turns "no NVRTC here" from an ignored compile test into a failed one: CI sets
/// it where it has installed NVRTC, so a compile check cannot pass by skipping. Any value but `0` turns it
/// on.
pub const REQUIRE_NVRTC_ENV: &str = "MOE_GATE_REQUIRE_NVRTC";

/// The CUDA C program, in the order its parts depend on each other.
const SOURCES: [(&str, &str); 8] = [
    ("common.cuh", include_str!("common.cuh")),
    ("quant.cu", include_str!("quant.cu")),
    ("norm_rope.cu", include_str!("norm_rope.cu")),
    ("attention.cu", include_str!("attention.cu")),
    ("moe.cu", include_str!("moe.cu")),
    ("decode.cu", include_str!("decode.cu")),
    ("exact.cu", include_str!("exact.cu")),
    ("seeded.cu", include_str!("seeded.cu")),
];

/// The whole program as NVRTC compiles it: the parts concatenated, each preceded by a `#line` directive
/// so compiler messages name the file and line they come from.
pub fn program_source() -> String {
    let mut src = String::new();
    for (name, text) in SOURCES {
        src.push_str(&format!("#line 1 \"{name}\"\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}
