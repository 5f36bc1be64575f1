//! GGUF tensor block formats, as defined by ggml (`ggml-common.h`, `ggml-quants.c`).
//!
//! Every format is a sequence of fixed-size blocks of `block_size()` weights stored in `type_size()`
//! bytes. A row of `n` weights must hold a whole number of blocks.

/// A GGUF tensor type (ggml's `ggml_type`), limited to the types this project reads and writes.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}
