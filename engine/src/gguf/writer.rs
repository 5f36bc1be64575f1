//! The GGUF writer: version 3, little-endian, laid out as ggml's `gguf.cpp` and the Python `gguf` package
//! write it (specification: ggml `docs/gguf.md`).
//!
//! Declaring and writing are separate: metadata and tensor shapes are declared first, which fixes every
//! offset; [`GgufWriter::write_to`] then streams the header and asks a callback for each tensor's bytes in
//! turn, so a model never exists twice in memory (an 18 GB model can go straight from its generator to
//! disk).

use std::collections::HashSet;
use std::io::{self, Write};

use moe_kernels::GgmlType;

use super::error::GgufError;
use super::reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, TensorInfo, tensor_n_bytes};
use super::value::{GgufValue, type_id};

/// The version this writer produces.
pub const WRITE_VERSION: u32 = 3;

/// Longest tensor name ggml accepts (`GGML_MAX_NAME` is 64 including the terminating zero).
pub const MAX_TENSOR_NAME_BYTES: usize = 63;

/// Element type written for an empty array, which has no element to take it from: string arrays
/// (vocabularies, merges) are by far the most common arrays in model files.
const EMPTY_ARRAY_TYPE: u32 = type_id::STRING;

/// Builds a GGUF file: metadata and tensor declarations first, then the bytes, streamed.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    alignment: usize,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<TensorInfo>,
    names: HashSet<String>,
    /// End of the last declared tensor in the data section (before its trailing padding).
    data_end: usize,
    /// `general.alignment` as written: the writer's alignment.
    alignment_value: GgufValue,
}

impl GgufWriter {
    /// A writer aligning tensor data to `alignment` bytes (32 is the GGUF default). A non-default
    /// alignment is recorded in `general.alignment`, which the writer always keeps equal to it.
    ///
    /// # Panics
    /// If `alignment` is not a power of two that a `uint32` holds: the format cannot express it, and the
    /// value is a program constant, never file input.
    pub fn new(alignment: usize) -> Self {
        assert!(
            alignment.is_power_of_two() && u32::try_from(alignment).is_ok(),
            "GGUF alignment must be a power of two below 2^32, got {alignment}"
        );
        Self {
            alignment,
            metadata: Vec::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            data_end: 0,
            alignment_value: GgufValue::U32(alignment as u32),
        }
    }

    /// Adds metadata key `key`, after those already added; adding a key again replaces its value in place.
    /// `general.alignment` is written as the writer's alignment whatever value is given here.
    ///
    /// # Panics
    /// If `value` holds an array whose elements differ in type: GGUF stores one element type per array,
    /// and values read from a file never mix types, so this is a bug in the caller.
    pub fn add_metadata(&mut self, key: &str, value: GgufValue) {
        if let Err(why) = check_homogeneous(&value) {
            panic!("metadata key {key:?}: {why}; GGUF arrays hold elements of one type");
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, slot)) => *slot = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
    }

    /// Declares the next tensor: its name, type and shape in ggml order (`dims[0]` is the row length).
    /// Its offset follows the previous tensor's, aligned.
    pub fn add_tensor(&mut self, name: &str, ty: GgmlType, dims: &[usize]) -> Result<(), GgufError> {
        let refuse = |reason: String| GgufError::InvalidTensor { tensor: name.to_owned(), reason };
        if name.len() > MAX_TENSOR_NAME_BYTES {
            return Err(refuse(format!(
                "the name is {} bytes, ggml allows at most {MAX_TENSOR_NAME_BYTES}",
                name.len()
            )));
        }
        if self.names.contains(name) {
            return Err(refuse("a tensor of that name is already declared".to_owned()));
        }
        let n_bytes = tensor_n_bytes(dims, ty).map_err(|e| refuse(format!("{e} (dimensions {dims:?})")))?;
        let overflow = || refuse("the data section would exceed the address space".to_owned());
        let offset = self.data_end.checked_next_multiple_of(self.alignment).ok_or_else(overflow)?;
        let end = offset.checked_add(n_bytes).ok_or_else(overflow)?;
        end.checked_next_multiple_of(self.alignment).ok_or_else(overflow)?;
        self.names.insert(name.to_owned());
        self.tensors.push(TensorInfo {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty,
            offset: offset as u64,
            n_bytes,
        });
        self.data_end = end;
        Ok(())
    }

    /// The tensors declared so far, with their offsets.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The metadata as it will be written (with `general.alignment` set to the writer's alignment).
    pub fn metadata(&self) -> Vec<(String, GgufValue)> {
        self.effective_metadata().map(|(k, v)| (k.to_owned(), v.clone())).collect()
    }

    /// Everything before the tensor data: header, metadata, tensor infos and the padding to the data start.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header_len());
        out.extend_from_slice(&GGUF_MAGIC);
        put_u32(&mut out, WRITE_VERSION);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.effective_metadata().count() as u64);
        for (key, value) in self.effective_metadata() {
            put_str(&mut out, key);
            put_u32(&mut out, value.type_id());
            put_value(&mut out, value);
        }
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d as u64);
            }
            put_u32(&mut out, t.ty.ggml_id());
            put_u64(&mut out, t.offset);
        }
        out.resize(out.len().next_multiple_of(self.alignment), 0);
        out
    }

    /// Size of the whole file: [`Self::header_bytes`] plus the data section, padded to the alignment.
    pub fn total_bytes(&self) -> usize {
        self.header_len() + self.data_len()
    }

    /// Writes the file: the header, then each tensor's bytes as `fill(index, sink)` produces them (in
    /// declaration order; each must be exactly the declared size), with the alignment padding between.
    /// `w` receives many small writes: give it a `BufWriter` when it is a file.
    pub fn write_to<W: Write>(
        &self,
        mut w: W,
        mut fill: impl FnMut(usize, &mut dyn Write) -> io::Result<()>,
    ) -> Result<(), GgufError> {
        let write_error = |what: String| move |source| GgufError::Write { what, source };
        w.write_all(&self.header_bytes()).map_err(write_error("header".to_owned()))?;
        let mut pos = 0usize;
        for (index, t) in self.tensors.iter().enumerate() {
            let start = t.offset as usize; // declared by add_tensor, so within usize
            write_zeros(&mut w, start - pos)
                .map_err(write_error(format!("padding before tensor {:?}", t.name)))?;
            let mut sink = SizedSink { inner: &mut w, written: 0, limit: t.n_bytes };
            let filled = fill(index, &mut sink);
            let written = sink.written;
            // An overrun is reported as such, not as the refusal it provoked.
            if written <= t.n_bytes {
                filled.map_err(write_error(format!("tensor {:?}", t.name)))?;
            }
            if written != t.n_bytes {
                return Err(GgufError::FillSize {
                    tensor: t.name.clone(),
                    ty: t.ty.name(),
                    dims: t.dims.clone(),
                    expected: t.n_bytes,
                    written,
                });
            }
            pos = start + t.n_bytes;
        }
        write_zeros(&mut w, self.data_len() - pos).map_err(write_error("final padding".to_owned()))?;
        w.flush().map_err(write_error("flush".to_owned()))
    }

    /// [`Self::write_to`] into one buffer, allocated once at the file's exact size.
    pub fn to_vec(
        &self,
        fill: impl FnMut(usize, &mut dyn Write) -> io::Result<()>,
    ) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::with_capacity(self.total_bytes());
        self.write_to(&mut out, fill)?;
        Ok(out)
    }

    /// The metadata to write: `general.alignment` replaced by the writer's, or appended when it differs
    /// from the default.
    fn effective_metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        let alignment = &self.alignment_value;
        let has_key = self.metadata.iter().any(|(k, _)| k == ALIGNMENT_KEY);
        let appended =
            (!has_key && self.alignment != DEFAULT_ALIGNMENT).then_some((ALIGNMENT_KEY, alignment));
        self.metadata
            .iter()
            .map(move |(k, v)| (k.as_str(), if k == ALIGNMENT_KEY { alignment } else { v }))
            .chain(appended)
    }

    fn header_len(&self) -> usize {
        let kv: usize = self.effective_metadata().map(|(k, v)| 8 + k.len() + 4 + value_len(v)).sum();
        let infos: usize = self.tensors.iter().map(|t| 8 + t.name.len() + 4 + 8 * t.dims.len() + 4 + 8).sum();
        (4 + 4 + 8 + 8 + kv + infos).next_multiple_of(self.alignment)
    }

    /// The data section with its trailing padding (checked not to overflow in add_tensor).
    fn data_len(&self) -> usize {
        self.data_end.next_multiple_of(self.alignment)
    }
}

/// Passes bytes on to the file, refusing any beyond the tensor's size.
struct SizedSink<'a, W: Write> {
    inner: &'a mut W,
    written: usize,
    limit: usize,
}

impl<W: Write> Write for SizedSink<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written.saturating_add(buf.len()) > self.limit {
            self.written = self.written.saturating_add(buf.len());
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more bytes than the tensor's declared size",
            ));
        }
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_zeros(w: &mut impl Write, mut n: usize) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let chunk = n.min(ZEROS.len());
        w.write_all(&ZEROS[..chunk])?;
        n -= chunk;
    }
    Ok(())
}

/// Checks that every array in `value`, at any depth, holds elements of one type.
fn check_homogeneous(value: &GgufValue) -> Result<(), String> {
    let GgufValue::Array(items) = value else { return Ok(()) };
    if let Some(first) = items.first()
        && let Some(other) = items.iter().find(|v| v.type_id() != first.type_id())
    {
        return Err(format!("array mixes {} and {} elements", first.type_name(), other.type_name()));
    }
    items.iter().try_for_each(check_homogeneous)
}

/// Encoded size of a value (without its type id).
fn value_len(value: &GgufValue) -> usize {
    match value {
        GgufValue::U8(_) | GgufValue::I8(_) | GgufValue::Bool(_) => 1,
        GgufValue::U16(_) | GgufValue::I16(_) => 2,
        GgufValue::U32(_) | GgufValue::I32(_) | GgufValue::F32(_) => 4,
        GgufValue::U64(_) | GgufValue::I64(_) | GgufValue::F64(_) => 8,
        GgufValue::String(s) => 8 + s.len(),
        GgufValue::Array(items) => 4 + 8 + items.iter().map(value_len).sum::<usize>(),
    }
}

fn put_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => put_u32(out, *v),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            put_u32(out, items.first().map_or(EMPTY_ARRAY_TYPE, GgufValue::type_id));
            put_u64(out, items.len() as u64);
            for item in items {
                put_value(out, item);
            }
        }
        GgufValue::U64(v) => put_u64(out, *v),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}
