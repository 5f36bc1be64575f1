//! Errors of the GGUF reader and writer: one variant per class of defect, each naming the field, key or
//! tensor and the byte offset where it was found.

use std::io;
use std::path::PathBuf;

use moe_kernels::GgmlType;

/// What the reader or writer found wrong. Offsets are byte positions from the start of the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or memory-mapped.
    #[error("cannot read GGUF file {path}: {source}; check the path and its permissions")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error(
        "not a GGUF file: bytes 0..4 are {found:02x?}, expected \"GGUF\" (47 47 55 46); \
         pass a .gguf model file"
    )]
    BadMagic { found: [u8; 4] },

    /// A version other than 2 or 3.
    #[error(
        "unsupported GGUF version {version} at byte 4: this reader handles versions 2 and 3{}",
        version_hint(*version)
    )]
    UnsupportedVersion { version: u32 },

    /// A fixed-size field runs past the end of the file.
    #[error(
        "file truncated: {field} at byte {offset} needs {needed} bytes but only {available} remain; \
         the file is incomplete, download or convert it again"
    )]
    Truncated { field: String, offset: u64, needed: u64, available: u64 },

    /// A length or count field claims more than the rest of the file can hold.
    #[error(
        "{field} at byte {offset} claims {claimed} {unit}, more than the {available} bytes left in the file \
         hold; the file is corrupt or truncated"
    )]
    LengthPastEnd { field: String, offset: u64, claimed: u64, unit: &'static str, available: u64 },

    /// A string is not UTF-8, as the specification requires.
    #[error("{field} at byte {offset} is not valid UTF-8; the file is corrupt")]
    InvalidUtf8 { field: String, offset: u64 },

    /// A metadata value type id outside the specification's 0..=12.
    #[error(
        "metadata key {key:?}: unknown value type id {type_id} at byte {offset} (GGUF defines 0..=12); \
         the file is corrupt or from a newer GGUF revision"
    )]
    UnknownValueType { key: String, type_id: u32, offset: u64 },

    /// A boolean stored as a byte other than 0 or 1.
    #[error(
        "metadata key {key:?}: bool at byte {offset} holds {value}, expected 0 or 1; the file is corrupt"
    )]
    InvalidBool { key: String, value: u8, offset: u64 },

    /// Arrays nested deeper than the reader accepts (a guard against stack exhaustion).
    #[error(
        "metadata key {key:?}: arrays nested deeper than {max_depth} levels at byte {offset}; \
         no model needs this, the file is corrupt or hostile"
    )]
    ArrayTooDeep { key: String, offset: u64, max_depth: usize },

    /// More array elements in all than the reader holds in memory (a guard against memory blow-up).
    #[error(
        "metadata key {key:?}: the array at byte {offset} takes the metadata past {limit} values in all; \
         no model needs this many, the file is corrupt or hostile"
    )]
    MetadataTooLarge { key: String, offset: u64, limit: usize },

    /// The same metadata key twice.
    #[error("duplicate metadata key {key:?} at byte {offset}; each key may appear once")]
    DuplicateKey { key: String, offset: u64 },

    /// The same tensor name twice.
    #[error("duplicate tensor name {name:?} at byte {offset}; each tensor may appear once")]
    DuplicateTensor { name: String, offset: u64 },

    /// `general.alignment` is not a `uint32`.
    #[error(
        "metadata key \"general.alignment\" at byte {offset} is a {found}, the specification requires uint32"
    )]
    AlignmentType { found: &'static str, offset: u64 },

    /// `general.alignment` is zero or not a power of two.
    #[error(
        "metadata key \"general.alignment\" at byte {offset} is {value}, the specification requires a \
         non-zero power of two"
    )]
    AlignmentValue { value: u64, offset: u64 },

    /// A tensor with no dimensions or more than ggml's four.
    #[error("tensor {tensor:?}: {n_dims} dimensions at byte {offset}, expected 1 to 4")]
    DimCount { tensor: String, n_dims: u32, offset: u64 },

    /// A tensor with an empty axis.
    #[error(
        "tensor {tensor:?}: dimension {axis} is zero at byte {offset}; every dimension must be at least 1"
    )]
    ZeroDim { tensor: String, axis: usize, offset: u64 },

    /// A tensor whose element count or byte size does not fit in memory addresses.
    #[error(
        "tensor {tensor:?}: dimensions {dims:?} at byte {offset} overflow the element count or byte size"
    )]
    DimOverflow { tensor: String, dims: Vec<u64>, offset: u64 },

    /// A tensor type this engine does not read.
    #[error(
        "tensor {tensor:?}: type id {type_id} ({}) at byte {offset} is not supported; supported types are {}",
        ggml_type_name(*type_id).unwrap_or("unknown to ggml"),
        supported_types()
    )]
    UnknownTensorType { tensor: String, type_id: u32, offset: u64 },

    /// A row that does not hold a whole number of blocks of its type.
    #[error(
        "tensor {tensor:?}: row length {row_len} (dimension 0, at byte {offset}) is not a multiple of the \
         {block_size}-weight block of type {ty}"
    )]
    RowNotBlockMultiple { tensor: String, row_len: usize, ty: &'static str, block_size: usize, offset: u64 },

    /// A tensor's data offset is not a multiple of the file's alignment.
    #[error(
        "tensor {tensor:?}: data offset {data_offset} (stored at byte {offset}) is not a multiple of the \
         alignment {alignment}; the file is corrupt"
    )]
    TensorMisaligned { tensor: String, data_offset: u64, alignment: usize, offset: u64 },

    /// A tensor's bytes do not lie inside the data section.
    #[error(
        "tensor {tensor:?}: bytes {data_offset}..{data_offset}+{n_bytes} of the data section (offset stored \
         at byte {offset}) lie outside it ({data_len} bytes from byte {data_start}); the file is truncated \
         or corrupt"
    )]
    TensorOutOfRange {
        tensor: String,
        data_offset: u64,
        n_bytes: usize,
        data_start: usize,
        data_len: usize,
        offset: u64,
    },

    /// The writer refused a tensor declaration.
    #[error("cannot declare tensor {tensor:?}: {reason}")]
    InvalidTensor { tensor: String, reason: String },

    /// Writing failed.
    #[error("writing GGUF {what}: {source}")]
    Write {
        what: String,
        #[source]
        source: io::Error,
    },

    /// The writer's `fill` produced a different number of bytes than the tensor's declared size.
    #[error(
        "tensor {tensor:?}: fill wrote {written} bytes, the declared {ty} tensor {dims:?} takes {expected}; \
         produce exactly the declared type and shape"
    )]
    FillSize { tensor: String, ty: &'static str, dims: Vec<usize>, expected: usize, written: usize },
}

/// ggml's name for tensor type id `id` (`ggml_type` in `ggml.h`), or `None` for ids it never assigned.
pub(crate) fn ggml_type_name(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "", "", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8",
        "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "", "", "", "TQ1_0", "TQ2_0", "", "", "", "MXFP4",
    ];
    NAMES.get(usize::try_from(id).ok()?).copied().filter(|name| !name.is_empty())
}

/// The names of the tensor types this engine reads, for messages.
fn supported_types() -> String {
    (0..64u32).filter_map(GgmlType::from_ggml_id).map(|ty| ty.name()).collect::<Vec<_>>().join(", ")
}

/// What to do about an unsupported version.
fn version_hint(version: u32) -> &'static str {
    match version {
        1 => "; version 1 files predate 64-bit counts, convert the model again with a current llama.cpp",
        v if matches!(v.swap_bytes(), 2 | 3) => {
            "; this looks like a big-endian file, only little-endian files are supported"
        }
        _ => "; the file is corrupt or from a newer GGUF revision",
    }
}
