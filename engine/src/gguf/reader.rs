//! The GGUF reader (specification: ggml `docs/gguf.md`; layout as ggml's `gguf.cpp` reads it).
//!
//! A file is: magic `GGUF`, a `u32` version, a `u64` tensor count, a `u64` key-value count, the key-value
//! pairs, the tensor infos, padding to the alignment, and the tensor data. Everything is little-endian.
//! Versions 2 and 3 share this layout (3 only added big-endian files, which this reader refuses).
//!
//! The reader trusts nothing: every length, count and offset is checked against the bytes that are left
//! before anything is allocated or sliced, so a truncated, corrupt or hostile file yields a [`GgufError`]
//! naming the field and byte offset, never a panic or an allocation larger than the file justifies.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::Path;

use memmap2::Mmap;
use moe_kernels::GgmlType;

use super::error::GgufError;
use super::value::{GgufValue, min_encoded_size, type_id};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;

/// Deepest array nesting accepted. Real files nest at most once (arrays of strings); the bound keeps a
/// hostile file from exhausting the stack through recursion.
pub const MAX_ARRAY_DEPTH: usize = 16;

/// Most array elements accepted across all metadata. The largest real vocabularies hold a few hundred
/// thousand tokens and merges; the bound caps the in-memory metadata (about 32 bytes per value) at
/// 512 MiB whatever the file claims.
pub const MAX_METADATA_VALUES: usize = 1 << 24;

/// Fewest bytes of one key-value pair: key length, value type, one-byte value.
const MIN_KV_BYTES: usize = 8 + 4 + 1;

/// Fewest bytes of one tensor info: name length, dimension count, one dimension, type, offset.
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 8 + 4 + 8;

/// One tensor's description in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Its shape in ggml order: `dims[0]` (ne0) is the row length, the contiguous axis.
    pub dims: Vec<usize>,
    /// Its storage type.
    pub ty: GgmlType,
    /// Where its bytes start, relative to the start of the data section.
    pub offset: u64,
    /// How many bytes it occupies.
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Number of weights.
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: its metadata, its tensor infos, and its bytes (memory-mapped when opened from a
/// path, so tensor data is paged in from disk only as it is read).
pub struct GgufFile {
    /// The format version (2 or 3).
    pub version: u32,
    /// The alignment of tensor data, in bytes (`general.alignment`, default 32).
    pub alignment: usize,
    metadata: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: usize,
    storage: Storage,
}

/// Where a file's bytes live.
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}

impl GgufFile {
    /// Opens and parses the file at `path`, memory-mapping it: tensor data is never copied into RAM.
    ///
    /// The mapping assumes the file is not modified or truncated while this value lives, as any
    /// memory-mapped model loader does (llama.cpp included); copy it first if another process may write it.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let open_error = |source| GgufError::Open { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(open_error)?;
        let len = file.metadata().map_err(open_error)?.len();
        if len == 0 {
            // Mapping an empty file fails on some platforms; the parser reports it as truncated.
            return Self::from_storage(Storage::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only and every access is bounds-checked against its length. The
        // remaining hazard, another process truncating or rewriting the file while it is mapped, is
        // excluded by the documented contract above.
        let map = unsafe { Mmap::map(&file) }.map_err(open_error)?;
        Self::from_storage(Storage::Mapped(map))
    }

    /// Parses a GGUF file held in memory (synthetic models are built this way).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<GgufFile, GgufError> {
        let layout = parse(storage.bytes())?;
        let key_index = layout.metadata.iter().enumerate().map(|(i, (key, _))| (key.clone(), i)).collect();
        let tensor_index = layout.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            version: layout.version,
            alignment: layout.alignment,
            metadata: layout.metadata,
            key_index,
            tensors: layout.tensors,
            tensor_index,
            data_start: layout.data_start,
            storage,
        })
    }

    /// Every metadata key and value, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Every tensor info, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of tensor `t`.
    ///
    /// # Panics
    /// If `t` does not describe bytes of this file (it was not taken from this file's [`Self::tensors`]).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        self.data_range(t).map(|range| &self.as_bytes()[range]).unwrap_or_else(|| {
            panic!("tensor {:?} lies outside this GGUF file; pass a TensorInfo taken from this file", t.name)
        })
    }

    /// The absolute byte range of tensor `t` in [`Self::as_bytes`], or `None` if it lies outside the file.
    pub fn data_range(&self, t: &TensorInfo) -> Option<Range<usize>> {
        let start = self.data_start.checked_add(usize::try_from(t.offset).ok()?)?;
        let end = start.checked_add(t.n_bytes)?;
        (end <= self.as_bytes().len()).then_some(start..end)
    }

    /// Byte position where the data section starts.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// The whole file.
    pub fn as_bytes(&self) -> &[u8] {
        self.storage.bytes()
    }
}

impl fmt::Debug for GgufFile {
    // Metadata can hold hundreds of thousands of vocabulary entries: summarise instead.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_start", &self.data_start)
            .field("file_bytes", &self.as_bytes().len())
            .finish()
    }
}

/// What a parse finds, before it is tied to the storage holding the bytes.
struct Layout {
    version: u32,
    alignment: usize,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<TensorInfo>,
    data_start: usize,
}

/// Parses a whole file: header, metadata, tensor infos, then checks every tensor's bytes lie in it.
fn parse(bytes: &[u8]) -> Result<Layout, GgufError> {
    let mut cur = Cursor { bytes, pos: 0 };
    let (version, n_tensors, n_kv) = parse_header(&mut cur)?;
    let (metadata, alignment) = parse_metadata(&mut cur, n_kv)?;
    let (tensors, info_offsets) = parse_tensor_infos(&mut cur, n_tensors, alignment)?;
    let data_start = data_section_start(&cur, alignment, tensors.is_empty())?;
    let data_len = bytes.len().saturating_sub(data_start);
    for (t, &offset) in tensors.iter().zip(&info_offsets) {
        check_tensor_range(t, offset, data_start, data_len)?;
    }
    Ok(Layout { version, alignment, metadata, tensors, data_start })
}

/// Magic, version and the two counts.
fn parse_header(cur: &mut Cursor<'_>) -> Result<(u32, u64, u64), GgufError> {
    let magic: [u8; 4] = cur.array().map_err(|s| s.truncated("magic"))?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = cur.u32().map_err(|s| s.truncated("version"))?;
    if !matches!(version, 2 | 3) {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let n_tensors = cur.u64().map_err(|s| s.truncated("tensor count"))?;
    let n_kv = cur.u64().map_err(|s| s.truncated("metadata key-value count"))?;
    Ok((version, n_tensors, n_kv))
}

/// The key-value pairs, and the alignment they set.
fn parse_metadata(cur: &mut Cursor<'_>, n_kv: u64) -> Result<(Vec<(String, GgufValue)>, usize), GgufError> {
    let n_kv =
        cur.bounded_count(n_kv, MIN_KV_BYTES, 16, || "metadata key-value count".into(), "key-value pairs")?;
    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(n_kv);
    let mut seen: HashSet<&str> = HashSet::with_capacity(n_kv);
    let mut budget = MAX_METADATA_VALUES;
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..n_kv {
        let key_at = cur.pos;
        let key = cur.string(|| format!("metadata key {i}"))?;
        if !seen.insert(key) {
            return Err(GgufError::DuplicateKey { key: key.to_owned(), offset: key_at as u64 });
        }
        let value_type = cur.u32().map_err(|s| s.truncated(format!("metadata key {key:?} value type")))?;
        let value = read_value(cur, value_type, key, 0, &mut budget)?;
        if key == ALIGNMENT_KEY {
            alignment = checked_alignment(&value, key_at)?;
        }
        metadata.push((key.to_owned(), value));
    }
    Ok((metadata, alignment))
}

/// One value of type `value_type`; arrays recurse up to [`MAX_ARRAY_DEPTH`].
fn read_value(
    cur: &mut Cursor<'_>,
    value_type: u32,
    key: &str,
    depth: usize,
    budget: &mut usize,
) -> Result<GgufValue, GgufError> {
    let at = cur.pos;
    let field = || format!("metadata key {key:?} value");
    let short = |s: Short| s.truncated(field());
    Ok(match value_type {
        type_id::U8 => GgufValue::U8(cur.u8().map_err(short)?),
        type_id::I8 => GgufValue::I8(i8::from_le_bytes(cur.array().map_err(short)?)),
        type_id::U16 => GgufValue::U16(u16::from_le_bytes(cur.array().map_err(short)?)),
        type_id::I16 => GgufValue::I16(i16::from_le_bytes(cur.array().map_err(short)?)),
        type_id::U32 => GgufValue::U32(cur.u32().map_err(short)?),
        type_id::I32 => GgufValue::I32(i32::from_le_bytes(cur.array().map_err(short)?)),
        type_id::F32 => GgufValue::F32(f32::from_le_bytes(cur.array().map_err(short)?)),
        type_id::U64 => GgufValue::U64(cur.u64().map_err(short)?),
        type_id::I64 => GgufValue::I64(i64::from_le_bytes(cur.array().map_err(short)?)),
        type_id::F64 => GgufValue::F64(f64::from_le_bytes(cur.array().map_err(short)?)),
        type_id::BOOL => match cur.u8().map_err(short)? {
            0 => GgufValue::Bool(false),
            1 => GgufValue::Bool(true),
            value => return Err(GgufError::InvalidBool { key: key.to_owned(), value, offset: at as u64 }),
        },
        type_id::STRING => GgufValue::String(cur.string(field)?.to_owned()),
        type_id::ARRAY => read_array(cur, key, depth, budget)?,
        type_id => {
            return Err(GgufError::UnknownValueType { key: key.to_owned(), type_id, offset: at as u64 });
        }
    })
}

/// An array: element type, element count, elements.
fn read_array(
    cur: &mut Cursor<'_>,
    key: &str,
    depth: usize,
    budget: &mut usize,
) -> Result<GgufValue, GgufError> {
    let at = cur.pos;
    if depth >= MAX_ARRAY_DEPTH {
        return Err(GgufError::ArrayTooDeep {
            key: key.to_owned(),
            offset: at as u64,
            max_depth: MAX_ARRAY_DEPTH,
        });
    }
    let elem_type = cur.u32().map_err(|s| s.truncated(format!("metadata key {key:?} array element type")))?;
    let Some(elem_bytes) = min_encoded_size(elem_type) else {
        return Err(GgufError::UnknownValueType {
            key: key.to_owned(),
            type_id: elem_type,
            offset: at as u64,
        });
    };
    let count_at = cur.pos;
    let field = || format!("metadata key {key:?} array length");
    let claimed = cur.u64().map_err(|s| s.truncated(field()))?;
    let count = cur.bounded_count(claimed, elem_bytes, count_at, field, "elements")?;
    *budget = budget.checked_sub(count).ok_or_else(|| GgufError::MetadataTooLarge {
        key: key.to_owned(),
        offset: at as u64,
        limit: MAX_METADATA_VALUES,
    })?;
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        items.push(read_value(cur, elem_type, key, depth + 1, budget)?);
    }
    Ok(GgufValue::Array(items))
}

/// `general.alignment`: a `uint32`, non-zero power of two.
fn checked_alignment(value: &GgufValue, key_at: usize) -> Result<usize, GgufError> {
    let offset = key_at as u64;
    let GgufValue::U32(v) = *value else {
        return Err(GgufError::AlignmentType { found: value.type_name(), offset });
    };
    if !v.is_power_of_two() {
        return Err(GgufError::AlignmentValue { value: v.into(), offset });
    }
    usize::try_from(v).map_err(|_| GgufError::AlignmentValue { value: v.into(), offset })
}

/// The tensor infos, with the byte position of each info's offset field (for error messages).
fn parse_tensor_infos(
    cur: &mut Cursor<'_>,
    n_tensors: u64,
    alignment: usize,
) -> Result<(Vec<TensorInfo>, Vec<u64>), GgufError> {
    let n =
        cur.bounded_count(n_tensors, MIN_TENSOR_INFO_BYTES, 8, || "tensor count".into(), "tensor infos")?;
    let mut tensors = Vec::with_capacity(n);
    let mut offset_fields = Vec::with_capacity(n);
    let mut seen: HashSet<&str> = HashSet::with_capacity(n);
    for i in 0..n {
        let info_at = cur.pos;
        let name = cur.string(|| format!("tensor info {i} name"))?;
        if !seen.insert(name) {
            return Err(GgufError::DuplicateTensor { name: name.to_owned(), offset: info_at as u64 });
        }
        let field = |what: &str| format!("tensor {name:?} {what}");
        let dims_at = cur.pos as u64;
        let n_dims = cur.u32().map_err(|s| s.truncated(field("dimension count")))?;
        if !(1..=MAX_DIMS as u32).contains(&n_dims) {
            return Err(GgufError::DimCount { tensor: name.to_owned(), n_dims, offset: dims_at });
        }
        let mut raw_dims = Vec::with_capacity(MAX_DIMS);
        for axis in 0..n_dims {
            raw_dims.push(cur.u64().map_err(|s| s.truncated(field(&format!("dimension {axis}"))))?);
        }
        let type_at = cur.pos as u64;
        let type_id = cur.u32().map_err(|s| s.truncated(field("type")))?;
        let offset_at = cur.pos as u64;
        let offset = cur.u64().map_err(|s| s.truncated(field("data offset")))?;

        let ty = GgmlType::from_ggml_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            tensor: name.to_owned(),
            type_id,
            offset: type_at,
        })?;
        let dims =
            raw_dims.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>().map_err(|_| {
                GgufError::DimOverflow { tensor: name.to_owned(), dims: raw_dims.clone(), offset: dims_at }
            })?;
        let n_bytes = tensor_n_bytes(&dims, ty).map_err(|e| e.into_error(&dims, name, dims_at))?;
        if !offset.is_multiple_of(alignment as u64) {
            return Err(GgufError::TensorMisaligned {
                tensor: name.to_owned(),
                data_offset: offset,
                alignment,
                offset: offset_at,
            });
        }
        tensors.push(TensorInfo { name: name.to_owned(), dims, ty, offset, n_bytes });
        offset_fields.push(offset_at);
    }
    Ok((tensors, offset_fields))
}

/// Where tensor data starts: the end of the infos, rounded up to the alignment. A file without tensors
/// may end without the padding.
fn data_section_start(cur: &Cursor<'_>, alignment: usize, no_tensors: bool) -> Result<usize, GgufError> {
    let end = cur.bytes.len();
    let start = cur.pos.checked_next_multiple_of(alignment).unwrap_or(usize::MAX);
    if start > end && !no_tensors {
        return Err(GgufError::Truncated {
            field: "padding before the tensor data".to_owned(),
            offset: cur.pos as u64,
            needed: (start - cur.pos) as u64,
            available: (end - cur.pos) as u64,
        });
    }
    Ok(start.min(end))
}

/// A tensor's bytes must lie inside the data section.
fn check_tensor_range(
    t: &TensorInfo,
    offset: u64,
    data_start: usize,
    data_len: usize,
) -> Result<(), GgufError> {
    let end = usize::try_from(t.offset).ok().and_then(|start| start.checked_add(t.n_bytes));
    if end.is_some_and(|end| end <= data_len) {
        return Ok(());
    }
    Err(GgufError::TensorOutOfRange {
        tensor: t.name.clone(),
        data_offset: t.offset,
        n_bytes: t.n_bytes,
        data_start,
        data_len,
        offset,
    })
}

/// Why a shape cannot be stored; the caller adds the tensor name and offset.
pub(crate) enum ShapeError {
    DimCount(usize),
    ZeroDim(usize),
    Overflow,
    NotBlockMultiple { row_len: usize, block_size: usize, ty: &'static str },
}

impl ShapeError {
    /// The reader's error for tensor `tensor` whose dimensions were read at byte `offset`.
    pub(crate) fn into_error(self, dims: &[usize], tensor: &str, offset: u64) -> GgufError {
        let tensor = tensor.to_owned();
        match self {
            Self::DimCount(n) => {
                GgufError::DimCount { tensor, n_dims: u32::try_from(n).unwrap_or(u32::MAX), offset }
            }
            Self::ZeroDim(axis) => GgufError::ZeroDim { tensor, axis, offset },
            Self::Overflow => {
                GgufError::DimOverflow { tensor, dims: dims.iter().map(|&d| d as u64).collect(), offset }
            }
            Self::NotBlockMultiple { row_len, block_size, ty } => {
                GgufError::RowNotBlockMultiple { tensor, row_len, ty, block_size, offset }
            }
        }
    }
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::DimCount(n) => write!(f, "{n} dimensions, expected 1 to {MAX_DIMS}"),
            Self::ZeroDim(axis) => write!(f, "dimension {axis} is zero"),
            Self::Overflow => f.write_str("the element count or byte size overflows"),
            Self::NotBlockMultiple { row_len, block_size, ty } => {
                write!(f, "row length {row_len} is not a multiple of the {block_size}-weight block of {ty}")
            }
        }
    }
}

/// Bytes a tensor of shape `dims` (ggml order) and type `ty` occupies, with every rule of the format:
/// 1 to 4 dimensions, none zero, whole blocks per row, element count within `i64` (ggml's `int64_t`).
pub(crate) fn tensor_n_bytes(dims: &[usize], ty: GgmlType) -> Result<usize, ShapeError> {
    if !(1..=MAX_DIMS).contains(&dims.len()) {
        return Err(ShapeError::DimCount(dims.len()));
    }
    if let Some(axis) = dims.iter().position(|&d| d == 0) {
        return Err(ShapeError::ZeroDim(axis));
    }
    let n_elements =
        dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or(ShapeError::Overflow)?;
    if i64::try_from(n_elements).is_err() {
        return Err(ShapeError::Overflow);
    }
    let row_len = dims[0];
    if !row_len.is_multiple_of(ty.block_size()) {
        return Err(ShapeError::NotBlockMultiple { row_len, block_size: ty.block_size(), ty: ty.name() });
    }
    let row_bytes = ty.row_bytes(row_len).ok_or(ShapeError::Overflow)?;
    let n_rows: usize = dims[1..].iter().product(); // divides n_elements, so it cannot overflow
    row_bytes.checked_mul(n_rows).ok_or(ShapeError::Overflow)
}

/// Too few bytes left for a fixed-size field.
struct Short {
    offset: usize,
    needed: usize,
    available: usize,
}

impl Short {
    fn truncated(self, field: impl Into<String>) -> GgufError {
        GgufError::Truncated {
            field: field.into(),
            offset: self.offset as u64,
            needed: self.needed as u64,
            available: self.available as u64,
        }
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let short = Short { offset: self.pos, needed: n, available: self.remaining() };
        let chunk = self.bytes.get(self.pos..).and_then(|rest| rest.get(..n)).ok_or(short)?;
        self.pos += n;
        Ok(chunk)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_le_bytes)
    }

    /// A count of items taking at least `min_item_bytes` each, if the rest of the file can hold them.
    fn fitting_count(&self, claimed: u64, min_item_bytes: usize) -> Option<usize> {
        let n = usize::try_from(claimed).ok()?;
        n.checked_mul(min_item_bytes).is_some_and(|bytes| bytes <= self.remaining()).then_some(n)
    }

    /// `claimed` items of at least `min_item_bytes` each, refused with an error naming `field` (a count
    /// read at byte `field_at`) when the rest of the file cannot hold them.
    fn bounded_count(
        &self,
        claimed: u64,
        min_item_bytes: usize,
        field_at: usize,
        field: impl FnOnce() -> String,
        unit: &'static str,
    ) -> Result<usize, GgufError> {
        self.fitting_count(claimed, min_item_bytes).ok_or_else(|| GgufError::LengthPastEnd {
            field: field(),
            offset: field_at as u64,
            claimed,
            unit,
            available: self.remaining() as u64,
        })
    }

    /// A length-prefixed UTF-8 string, borrowed from the file.
    fn string(&mut self, field: impl Fn() -> String) -> Result<&'a str, GgufError> {
        let at = self.pos;
        let claimed = self.u64().map_err(|s| s.truncated(format!("{} length", field())))?;
        let len = self.bounded_count(claimed, 1, at, &field, "bytes")?;
        let raw = self.take(len).map_err(|s| s.truncated(field()))?;
        std::str::from_utf8(raw).map_err(|_| GgufError::InvalidUtf8 { field: field(), offset: at as u64 + 8 })
    }
}
