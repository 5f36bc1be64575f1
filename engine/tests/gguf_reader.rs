//! The GGUF reader against hand-built files (GGUF specification, ggml `docs/gguf.md`): every value type,
//! versions 2 and 3, and one test per class of defect a truncated, corrupt or hostile file can have.
//!
//! Files are built byte by byte with [`Bytes`], independently of the crate's writer, so a bug shared by
//! reader and writer cannot hide here.

use moe_engine::gguf::reader::{MAX_ARRAY_DEPTH, MAX_METADATA_VALUES};
use moe_engine::gguf::{GgufError, GgufFile, GgufValue};
use moe_kernels::GgmlType;

/// A little-endian byte builder.
#[derive(Default, Clone)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(self, v: u8) -> Self {
        self.raw(&[v])
    }
    fn u32(self, v: u32) -> Self {
        self.raw(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Self {
        self.raw(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn pad_to(mut self, alignment: usize) -> Self {
        self.0.resize(self.0.len().next_multiple_of(alignment), 0);
        self
    }
}

const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;

/// Header: magic, version, tensor count, key-value count.
fn header(version: u32, n_tensors: u64, n_kv: u64) -> Bytes {
    Bytes::default().raw(b"GGUF").u32(version).u64(n_tensors).u64(n_kv)
}

/// A key-value pair with a raw value encoding.
fn kv(key: &str, ty: u32, value: Bytes) -> Bytes {
    Bytes::default().str(key).u32(ty).raw(&value.0)
}

/// A tensor info.
fn info(name: &str, dims: &[u64], ty: u32, offset: u64) -> Bytes {
    let b = dims.iter().fold(Bytes::default().str(name).u32(dims.len() as u32), |b, &d| b.u64(d));
    b.u32(ty).u64(offset)
}

/// A complete file: header, pairs, infos, padding to `alignment`, then `data_len` bytes of data.
fn file(version: u32, kvs: &[Bytes], infos: &[Bytes], alignment: usize, data_len: usize) -> Vec<u8> {
    let mut b = header(version, infos.len() as u64, kvs.len() as u64);
    for part in kvs.iter().chain(infos) {
        b = b.raw(&part.0);
    }
    let mut bytes = b.pad_to(alignment).0;
    bytes.extend((0..data_len).map(|i| i as u8));
    bytes
}

/// The one-tensor file most tests start from: one string key, `t` = F32 [8, 2] at offset 0.
fn simple(kvs: &[Bytes], infos: &[Bytes], data_len: usize) -> Vec<u8> {
    file(3, kvs, infos, 32, data_len)
}

fn name_kv() -> Bytes {
    kv("general.name", T_STRING, Bytes::default().str("tiny"))
}

fn f32_info() -> Bytes {
    info("t", &[8, 2], 0, 0)
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes)
}

fn parse_err(bytes: Vec<u8>) -> GgufError {
    match parse(bytes) {
        Ok(f) => panic!("expected an error, parsed {f:?}"),
        Err(e) => e,
    }
}

/// Asserts that `e`'s message mentions every fragment (names, offsets).
fn assert_mentions(e: &GgufError, fragments: &[&str]) {
    let msg = e.to_string();
    for f in fragments {
        assert!(msg.contains(f), "message {msg:?} should mention {f:?}");
    }
}

#[test]
fn a_valid_file_parses_in_versions_2_and_3() {
    for version in [2, 3] {
        let f = parse(file(version, &[name_kv()], &[f32_info()], 32, 64)).expect("valid file");
        assert_eq!(f.version, version);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.get("general.name").and_then(GgufValue::as_str), Some("tiny"));
        let t = f.tensor("t").expect("tensor t");
        assert_eq!((t.dims.as_slice(), t.ty, t.offset, t.n_bytes), (&[8, 2][..], GgmlType::F32, 0, 64));
        // header 24, pair 8+12+4+8+4 = 36 (to 60), info 8+1+4+16+4+8 = 41 (to 101), padded to 128.
        assert_eq!(f.data_start(), 128);
        let expected: Vec<u8> = (0..64).map(|i| i as u8).collect();
        assert_eq!(f.tensor_data(t), expected.as_slice());
    }
}

#[test]
fn every_value_type_and_nested_arrays_are_read() {
    let nested = Bytes::default()
        .u32(T_ARRAY)
        .u64(2)
        .raw(&Bytes::default().u32(T_U8).u64(2).u8(1).u8(2).0)
        .raw(&Bytes::default().u32(T_STRING).u64(1).str("x").0);
    let kvs = [
        kv("u8", 0, Bytes::default().u8(200)),
        kv("i8", 1, Bytes::default().raw(&(-5i8).to_le_bytes())),
        kv("u16", 2, Bytes::default().raw(&65535u16.to_le_bytes())),
        kv("i16", 3, Bytes::default().raw(&(-300i16).to_le_bytes())),
        kv("u32", 4, Bytes::default().u32(4_000_000_000)),
        kv("i32", 5, Bytes::default().raw(&(-7i32).to_le_bytes())),
        kv("f32", 6, Bytes::default().raw(&1.5f32.to_le_bytes())),
        kv("bool", 7, Bytes::default().u8(1)),
        kv("string", 8, Bytes::default().str("héllo")),
        kv("array", 9, nested),
        kv("u64", 10, Bytes::default().u64(u64::MAX)),
        kv("i64", 11, Bytes::default().raw(&i64::MIN.to_le_bytes())),
        kv("f64", 12, Bytes::default().raw(&(-0.25f64).to_le_bytes())),
        kv("empty", 9, Bytes::default().u32(T_U32).u64(0)),
    ];
    let f = parse(simple(&kvs, &[], 0)).expect("valid file");
    let expected = [
        ("u8", GgufValue::U8(200)),
        ("i8", GgufValue::I8(-5)),
        ("u16", GgufValue::U16(65535)),
        ("i16", GgufValue::I16(-300)),
        ("u32", GgufValue::U32(4_000_000_000)),
        ("i32", GgufValue::I32(-7)),
        ("f32", GgufValue::F32(1.5)),
        ("bool", GgufValue::Bool(true)),
        ("string", GgufValue::String("héllo".into())),
        (
            "array",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)]),
                GgufValue::Array(vec![GgufValue::String("x".into())]),
            ]),
        ),
        ("u64", GgufValue::U64(u64::MAX)),
        ("i64", GgufValue::I64(i64::MIN)),
        ("f64", GgufValue::F64(-0.25)),
        ("empty", GgufValue::Array(vec![])),
    ];
    let got: Vec<(&str, &GgufValue)> = f.metadata().iter().map(|(k, v)| (k.as_str(), v)).collect();
    let want: Vec<(&str, &GgufValue)> = expected.iter().map(|(k, v)| (*k, v)).collect();
    assert_eq!(got, want, "values, in file order");
    // The accessors convert across integer widths and refuse what does not fit.
    assert_eq!(f.get("i8").and_then(GgufValue::as_u64), None);
    assert_eq!(f.get("u16").and_then(GgufValue::as_u64), Some(65535));
    assert_eq!(f.get("i32").and_then(GgufValue::as_f64), Some(-7.0));
    assert_eq!(f.get("bool").and_then(GgufValue::as_bool), Some(true));
    assert_eq!(f.get("string").map(GgufValue::type_name), Some("string"));
    assert!(f.tensors().is_empty());
}

#[test]
fn bad_magic() {
    let mut bytes = simple(&[], &[], 0);
    bytes[..4].copy_from_slice(b"GGML");
    let e = parse_err(bytes);
    assert!(matches!(e, GgufError::BadMagic { found } if &found == b"GGML"), "{e}");
    assert_mentions(&e, &["not a GGUF file", "47 47 55 46"]);
}

#[test]
fn unsupported_versions() {
    for (version, hint) in [(1, "version 1"), (4, "newer"), (3u32.swap_bytes(), "big-endian")] {
        let e = parse_err(file(version, &[], &[], 32, 0));
        assert!(matches!(e, GgufError::UnsupportedVersion { version: v } if v == version), "{e}");
        assert_mentions(&e, &["unsupported GGUF version", hint]);
    }
}

#[test]
fn truncated_header() {
    let bytes = header(3, 0, 0).0[..12].to_vec();
    let e = parse_err(bytes);
    assert!(matches!(e, GgufError::Truncated { offset: 8, needed: 8, available: 4, .. }), "{e}");
    assert_mentions(&e, &["tensor count", "byte 8"]);
    let e = parse_err(b"GG".to_vec());
    assert!(matches!(e, GgufError::Truncated { offset: 0, .. }), "{e}");
    assert_mentions(&e, &["magic"]);
}

#[test]
fn truncated_key_value() {
    let bytes = simple(&[name_kv(), kv("general.alignment", T_U32, Bytes::default().u32(32))], &[], 0);
    // The second pair starts at 24 + 36 = 60; its key ends at 60 + 8 + 17, its type at 89. Cut in the
    // middle of the u32 value: two bytes of four remain.
    let e = parse_err(bytes[..91].to_vec());
    assert!(matches!(e, GgufError::Truncated { offset: 89, needed: 4, available: 2, .. }), "{e}");
    assert_mentions(&e, &["\"general.alignment\" value", "byte 89"]);
    // Cut inside the second key's length.
    let e = parse_err(bytes[..64].to_vec());
    assert!(matches!(e, GgufError::Truncated { offset: 60, .. }), "{e}");
    assert_mentions(&e, &["metadata key 1 length", "byte 60"]);
    // Too short for even the pairs' smallest encodings: the count is refused.
    let e = parse_err(bytes[..40].to_vec());
    assert!(matches!(e, GgufError::LengthPastEnd { offset: 16, claimed: 2, .. }), "{e}");
}

#[test]
fn truncated_tensor_info() {
    let bytes = simple(&[], &[info("blk.0.w", &[8, 2, 1, 1], 0, 0)], 64);
    // header 24, name 8+7 (to 39), dimension count (to 43), dimensions at 43, 51, 59, 67: cut in the last.
    let e = parse_err(bytes[..70].to_vec());
    assert!(matches!(e, GgufError::Truncated { offset: 67, needed: 8, available: 3, .. }), "{e}");
    assert_mentions(&e, &["tensor \"blk.0.w\" dimension 3", "byte 67"]);
}

#[test]
fn truncated_data() {
    let bytes = simple(&[], &[f32_info()], 64);
    // The data needs 64 bytes from the data start; keep 40.
    let data_start = bytes.len() - 64;
    let e = parse_err(bytes[..data_start + 40].to_vec());
    assert!(matches!(e, GgufError::TensorOutOfRange { n_bytes: 64, data_len: 40, .. }), "{e}");
    assert_mentions(&e, &["\"t\"", "truncated"]);
    // Cut inside the padding before the data: the data section itself is missing.
    let infos_end = header(3, 1, 0).len() + f32_info().len();
    let e = parse_err(bytes[..infos_end + 1].to_vec());
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert_mentions(&e, &["padding before the tensor data"]);
}

#[test]
fn string_length_past_the_end() {
    // A key claiming 2^40 bytes: refused before any allocation.
    let bytes = header(3, 0, 1).u64(1 << 40).raw(b"abcdefghijklmnop").0;
    let e = parse_err(bytes);
    assert!(
        matches!(e, GgufError::LengthPastEnd { claimed, offset: 24, available: 16, .. } if claimed == 1 << 40)
    );
    assert_mentions(&e, &["metadata key 0", "byte 24"]);
    // A string value claiming u64::MAX bytes.
    let bytes = simple(&[kv("general.name", T_STRING, Bytes::default().u64(u64::MAX))], &[], 0);
    let e = parse_err(bytes);
    assert!(matches!(e, GgufError::LengthPastEnd { claimed: u64::MAX, .. }), "{e}");
    assert_mentions(&e, &["\"general.name\" value"]);
}

#[test]
fn array_length_past_the_end() {
    for (elem, count) in [(T_U8, 1u64 << 40), (T_U64, u64::MAX / 4), (T_STRING, 1 << 20), (T_ARRAY, 1 << 30)]
    {
        let bytes = simple(&[kv("tokens", T_ARRAY, Bytes::default().u32(elem).u64(count))], &[], 0);
        let e = parse_err(bytes);
        assert!(matches!(e, GgufError::LengthPastEnd { claimed, .. } if claimed == count), "{e}");
        assert_mentions(&e, &["\"tokens\" array length", "elements"]);
    }
}

#[test]
fn too_many_keys_or_tensors_for_the_file() {
    let e = parse_err(header(3, 0, u64::MAX).0);
    assert!(matches!(e, GgufError::LengthPastEnd { offset: 16, .. }), "{e}");
    assert_mentions(&e, &["key-value count"]);
    let e = parse_err(header(3, 1 << 50, 0).raw(&[0; 64]).0);
    assert!(matches!(e, GgufError::LengthPastEnd { offset: 8, .. }), "{e}");
    assert_mentions(&e, &["tensor count"]);
}

#[test]
fn unknown_value_type() {
    let bytes = simple(&[name_kv(), kv("weird", 13, Bytes::default().u32(0))], &[], 0);
    let e = parse_err(bytes);
    assert!(matches!(e, GgufError::UnknownValueType { type_id: 13, ref key, .. } if key == "weird"), "{e}");
    assert_mentions(&e, &["\"weird\"", "13"]);
    // Also as an array element type.
    let bytes = simple(&[kv("arr", T_ARRAY, Bytes::default().u32(99).u64(0))], &[], 0);
    let e = parse_err(bytes);
    assert!(matches!(e, GgufError::UnknownValueType { type_id: 99, .. }), "{e}");
}

#[test]
fn invalid_bool_and_utf8() {
    let e = parse_err(simple(&[kv("flag", T_BOOL, Bytes::default().u8(2))], &[], 0));
    assert!(matches!(e, GgufError::InvalidBool { value: 2, .. }), "{e}");
    assert_mentions(&e, &["\"flag\""]);
    let e = parse_err(simple(&[kv("s", T_STRING, Bytes::default().u64(2).raw(&[0xff, 0xfe]))], &[], 0));
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
    assert_mentions(&e, &["\"s\" value", "UTF-8"]);
}

#[test]
fn arrays_nested_too_deep() {
    let nest = |levels: usize| {
        let mut value = Bytes::default().u32(T_U8).u64(0);
        for _ in 1..levels {
            value = Bytes::default().u32(T_ARRAY).u64(1).raw(&value.0);
        }
        simple(&[kv("deep", T_ARRAY, value)], &[], 0)
    };
    assert!(parse(nest(MAX_ARRAY_DEPTH)).is_ok(), "{MAX_ARRAY_DEPTH} levels are accepted");
    let e = parse_err(nest(MAX_ARRAY_DEPTH + 1));
    assert!(matches!(e, GgufError::ArrayTooDeep { .. }), "{e}");
    assert_mentions(&e, &["\"deep\""]);
}

#[test]
fn metadata_larger_than_the_cap() {
    // The elements are really there, so only the cap can refuse them; it does before allocating values.
    let count = MAX_METADATA_VALUES + 1;
    let mut value = Bytes::default().u32(T_U8).u64(count as u64);
    value.0.resize(value.0.len() + count, 7);
    let e = parse_err(simple(&[kv("huge", T_ARRAY, value)], &[], 0));
    assert!(matches!(e, GgufError::MetadataTooLarge { .. }), "{e}");
    assert_mentions(&e, &["\"huge\""]);
}

#[test]
fn duplicate_key() {
    let e = parse_err(simple(&[name_kv(), name_kv()], &[], 0));
    let second = (24 + name_kv().len()) as u64;
    assert!(
        matches!(e, GgufError::DuplicateKey { ref key, offset } if key == "general.name" && offset == second)
    );
    assert_mentions(&e, &["\"general.name\"", &format!("byte {second}")]);
}

#[test]
fn duplicate_tensor_name() {
    let e = parse_err(simple(&[], &[info("t", &[8], 0, 0), info("t", &[8], 0, 32)], 64));
    assert!(matches!(e, GgufError::DuplicateTensor { ref name, .. } if name == "t"), "{e}");
}

#[test]
fn tensor_offset_out_of_range() {
    for offset in [64, 1 << 62, u64::MAX - 31] {
        let e = parse_err(simple(&[], &[info("t", &[8, 2], 0, offset)], 64));
        assert!(matches!(e, GgufError::TensorOutOfRange { data_offset, .. } if data_offset == offset), "{e}");
        assert_mentions(&e, &["\"t\"", &offset.to_string()]);
    }
}

#[test]
fn tensor_offset_misaligned() {
    let e = parse_err(simple(&[], &[info("t", &[8], 0, 4)], 64));
    assert!(matches!(e, GgufError::TensorMisaligned { data_offset: 4, alignment: 32, .. }), "{e}");
}

#[test]
fn zero_missing_or_too_many_dimensions() {
    let e = parse_err(simple(&[], &[info("t", &[8, 0], 0, 0)], 64));
    assert!(matches!(e, GgufError::ZeroDim { axis: 1, .. }), "{e}");
    let e = parse_err(simple(&[], &[info("t", &[], 0, 0)], 64));
    assert!(matches!(e, GgufError::DimCount { n_dims: 0, .. }), "{e}");
    // Five dimensions, and a dimension count that would otherwise make the reader loop for long.
    let e = parse_err(simple(&[], &[info("t", &[1, 1, 1, 1, 8], 0, 0)], 64));
    assert!(matches!(e, GgufError::DimCount { n_dims: 5, .. }), "{e}");
    let bytes = simple(&[], &[Bytes::default().str("t").u32(u32::MAX)], 0);
    assert!(matches!(parse_err(bytes), GgufError::DimCount { n_dims: u32::MAX, .. }));
}

#[test]
fn overflowing_dimensions() {
    for dims in
        [&[1u64 << 32, 1 << 32][..], &[u64::MAX], &[1 << 62, 2], &[1 << 16, 1 << 16, 1 << 16, 1 << 16]]
    {
        let e = parse_err(simple(&[], &[info("t", dims, 0, 0)], 64));
        assert!(matches!(e, GgufError::DimOverflow { .. }), "{dims:?}: {e}");
        assert_mentions(&e, &["\"t\"", "overflow"]);
    }
}

#[test]
fn unknown_tensor_type() {
    // Q2_K (10) is a real ggml type this engine does not read; 77 is no type at all.
    for (id, name) in [(10, "Q2_K"), (77, "unknown to ggml")] {
        let e = parse_err(simple(&[], &[info("blk.0.ffn_up_exps.weight", &[256], id, 0)], 256));
        assert!(matches!(e, GgufError::UnknownTensorType { type_id, .. } if type_id == id), "{e}");
        assert_mentions(&e, &["\"blk.0.ffn_up_exps.weight\"", name, "Q4_K"]);
    }
}

#[test]
fn row_length_not_a_multiple_of_the_block() {
    // Q8_0 (8) has 32-weight blocks; Q4_K (12) 256-weight blocks.
    for (id, row, block) in [(8, 33, 32), (12, 128, 256)] {
        let e = parse_err(simple(&[], &[info("t", &[row, 2], id, 0)], 1024));
        assert!(
            matches!(e, GgufError::RowNotBlockMultiple { row_len, block_size, .. }
            if row_len == row as usize && block_size == block),
            "{e}"
        );
    }
}

#[test]
fn alignment_is_honoured() {
    let align = kv("general.alignment", T_U32, Bytes::default().u32(64));
    let bytes = file(3, &[align], &[info("a", &[8], 0, 0), info("b", &[8], 0, 64)], 64, 96);
    let f = parse(bytes).expect("valid file");
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_start() % 64, 0);
    assert_eq!(f.tensor_data(f.tensor("b").unwrap()), &(64..96).map(|i| i as u8).collect::<Vec<_>>()[..]);
    // Offset 32 is aligned by default but not to 64.
    let align = kv("general.alignment", T_U32, Bytes::default().u32(64));
    let e = parse_err(file(3, &[align], &[info("a", &[8], 0, 32)], 64, 128));
    assert!(matches!(e, GgufError::TensorMisaligned { alignment: 64, .. }), "{e}");
}

#[test]
fn wrong_typed_alignment() {
    let e = parse_err(simple(&[kv("general.alignment", T_U64, Bytes::default().u64(64))], &[], 0));
    assert!(matches!(e, GgufError::AlignmentType { found: "uint64", offset: 24 }), "{e}");
    assert_mentions(&e, &["general.alignment", "uint32"]);
}

#[test]
fn zero_or_non_power_of_two_alignment() {
    for value in [0, 48, 3] {
        let e = parse_err(simple(&[kv("general.alignment", T_U32, Bytes::default().u32(value))], &[], 0));
        assert!(matches!(e, GgufError::AlignmentValue { value: v, .. } if v == u64::from(value)), "{e}");
        assert_mentions(&e, &["power of two"]);
    }
}

#[test]
fn open_reports_missing_files_and_maps_real_ones() {
    let e = GgufFile::open(std::path::Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(matches!(e, GgufError::Open { .. }), "{e}");
    assert_mentions(&e, &["/nonexistent/model.gguf"]);

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("m.gguf");
    let bytes = simple(&[name_kv()], &[f32_info()], 64);
    std::fs::write(&path, &bytes).expect("write");
    let f = GgufFile::open(&path).expect("valid file");
    assert_eq!(f.as_bytes(), bytes.as_slice());
    assert_eq!(f.tensor_data(f.tensor("t").unwrap()), &bytes[bytes.len() - 64..]);
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").expect("write");
    assert!(matches!(GgufFile::open(&empty), Err(GgufError::Truncated { offset: 0, .. })));
}
