//! GGUF, the model file format of ggml and llama.cpp: reader, writer and metadata values.
//!
//! Implements the GGUF specification (ggml `docs/gguf.md`), versions 2 and 3, little-endian, as ggml's
//! `gguf.cpp` reads and writes it. Tensor types are those of [`moe_kernels::GgmlType`].
//!
//! - [`reader`]: [`GgufFile`], which memory-maps a file and validates every size and offset in it.
//! - [`writer`]: [`GgufWriter`], which declares metadata and tensors first and then streams the bytes.
//! - [`value`]: [`GgufValue`], one metadata value.
//! - [`error`]: [`GgufError`], one variant per class of defect.

pub mod error;
pub mod reader;
pub mod value;
pub mod writer;

pub use error::GgufError;
pub use reader::{GgufFile, TensorInfo};
pub use value::GgufValue;
pub use writer::GgufWriter;
