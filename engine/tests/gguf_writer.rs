//! The GGUF writer: round trips through the reader, byte-identical rewrites of llama.cpp's own files
//! (so the layout is llama.cpp's, not merely self-consistent), streaming, and every refusal.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use moe_engine::gguf::{GgufError, GgufFile, GgufValue, GgufWriter};
use moe_kernels::GgmlType;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

/// Deterministic stand-in bytes for tensor `index` (the reader does not interpret tensor bytes).
fn pattern(index: usize, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + index * 7 + 1) as u8).collect()
}

/// Fills every tensor with its [`pattern`].
fn fill_patterns(w: &GgufWriter) -> impl FnMut(usize, &mut dyn Write) -> io::Result<()> + '_ {
    |i, out| out.write_all(&pattern(i, w.tensors()[i].n_bytes))
}

fn sample_writer(alignment: usize) -> GgufWriter {
    let mut w = GgufWriter::new(alignment);
    w.add_metadata("general.architecture", "qwen3moe".into());
    w.add_metadata("u8", GgufValue::U8(3));
    w.add_metadata("i8", GgufValue::I8(-3));
    w.add_metadata("u16", GgufValue::U16(700));
    w.add_metadata("i16", GgufValue::I16(-700));
    w.add_metadata("u32", GgufValue::U32(70_000));
    w.add_metadata("i32", GgufValue::I32(-70_000));
    w.add_metadata("f32", GgufValue::F32(0.1));
    w.add_metadata("bool", GgufValue::Bool(false));
    w.add_metadata("u64", GgufValue::U64(1 << 40));
    w.add_metadata("i64", GgufValue::I64(-(1 << 40)));
    w.add_metadata("f64", GgufValue::F64(1e-300));
    w.add_metadata("tokens", GgufValue::Array(vec!["a".into(), "ĠB".into(), "".into()]));
    let nested = GgufValue::Array(vec![
        GgufValue::Array(vec![GgufValue::I32(1)]),
        GgufValue::Array(vec![GgufValue::F64(2.0), GgufValue::F64(3.0)]),
    ]);
    w.add_metadata("nested", nested);
    let tensors: [(&str, GgmlType, &[usize]); 6] = [
        ("f32", GgmlType::F32, &[8, 3]),
        ("f16", GgmlType::F16, &[5]),
        ("bf16", GgmlType::BF16, &[2, 2]),
        ("q8_0", GgmlType::Q8_0, &[64, 2]),
        ("q4_k", GgmlType::Q4_K, &[256, 2, 3]),
        ("q6_k", GgmlType::Q6_K, &[512, 1, 1, 2]),
    ];
    for (name, ty, dims) in tensors {
        w.add_tensor(name, ty, dims).expect("valid declaration");
    }
    w
}

#[test]
fn round_trip_keeps_metadata_tensor_infos_and_bytes() {
    for alignment in [32, 64, 1] {
        let w = sample_writer(alignment);
        let bytes = w.to_vec(fill_patterns(&w)).expect("write");
        assert_eq!(bytes.len(), w.total_bytes());
        assert_eq!(bytes.len() % alignment, 0, "the file ends padded");
        let header = w.header_bytes();
        assert_eq!(&bytes[..header.len()], header.as_slice());

        let f = GgufFile::from_bytes(bytes).expect("the writer's output parses");
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, alignment);
        assert_eq!(f.data_start(), header.len());
        assert_eq!(f.metadata(), w.metadata().as_slice());
        assert_eq!(f.tensors(), w.tensors());
        for (i, t) in f.tensors().iter().enumerate() {
            assert_eq!(t.offset % alignment as u64, 0);
            assert_eq!(f.tensor_data(t), pattern(i, t.n_bytes).as_slice(), "{}", t.name);
        }
        // Sizes from ggml's block tables: Q8_0 34 bytes per 32, Q4_K 144 per 256, Q6_K 210 per 256.
        let sizes: Vec<usize> = f.tensors().iter().map(|t| t.n_bytes).collect();
        assert_eq!(sizes, [96, 10, 8, 2 * 2 * 34, 6 * 144, 2 * 2 * 210]);
        let has_alignment_key = f.get("general.alignment").is_some();
        assert_eq!(has_alignment_key, alignment != 32, "the key is written only when not the default");
        if has_alignment_key {
            assert_eq!(f.get("general.alignment"), Some(&GgufValue::U32(alignment as u32)));
        }
    }
}

/// llama.cpp's quantiser wrote these files; copying metadata and tensors through the writer must give
/// the same bytes, which pins key order, info layout, offsets and padding to llama.cpp's.
#[test]
fn rewriting_llama_cpp_files_is_byte_identical() {
    for rel in ["public-tiny/model.gguf", "public-tiny/model.q4_k_m.gguf", "q4k/model.q4_k_m.gguf"] {
        let original = std::fs::read(fixture(rel)).expect("fixture");
        let f = GgufFile::open(&fixture(rel)).expect("fixture parses");
        let mut w = GgufWriter::new(f.alignment);
        for (key, value) in f.metadata() {
            w.add_metadata(key, value.clone());
        }
        for t in f.tensors() {
            w.add_tensor(&t.name, t.ty, &t.dims).expect("declaration");
        }
        assert_eq!(w.tensors(), f.tensors(), "{rel}: offsets as llama.cpp laid them out");
        let copy = w.to_vec(|i, out| out.write_all(f.tensor_data(&f.tensors()[i]))).expect("write");
        assert_eq!(copy.len(), original.len(), "{rel}");
        assert!(copy == original, "{rel}: rewritten bytes differ");
    }
}

#[test]
fn write_to_streams_into_a_file() {
    let w = sample_writer(32);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sample.gguf");
    let file = std::fs::File::create(&path).expect("create");
    let mut calls = Vec::new();
    w.write_to(io::BufWriter::new(file), |i, out| {
        calls.push(i);
        // Write in small pieces: the sink must accept any split.
        for chunk in pattern(i, w.tensors()[i].n_bytes).chunks(7) {
            out.write_all(chunk)?;
        }
        Ok(())
    })
    .expect("write");
    assert_eq!(calls, (0..w.tensors().len()).collect::<Vec<_>>(), "one call per tensor, in order");
    let expected = w.to_vec(fill_patterns(&w)).expect("write");
    let f = GgufFile::open(&path).expect("parse");
    assert_eq!(f.as_bytes(), expected.as_slice());
}

#[test]
fn fill_must_produce_exactly_the_declared_bytes() {
    let w = sample_writer(32);
    for delta in [-1isize, 1] {
        let e = w
            .to_vec(|i, out| {
                let n = w.tensors()[i].n_bytes;
                let n = if i == 3 { n.saturating_add_signed(delta) } else { n };
                out.write_all(&pattern(i, n))
            })
            .unwrap_err();
        let expected = w.tensors()[3].n_bytes;
        assert!(
            matches!(e, GgufError::FillSize { ref tensor, expected: x, written, .. }
                if tensor == "q8_0" && x == expected && written == expected.saturating_add_signed(delta)),
            "{e}"
        );
        assert!(e.to_string().contains("Q8_0 tensor [64, 2] takes 136"), "{e}");
    }
    // An error of the callback itself is passed on, naming the tensor.
    let e = w.to_vec(|_, _| Err(io::Error::other("disk full"))).unwrap_err();
    assert!(matches!(e, GgufError::Write { .. }), "{e}");
    assert!(e.to_string().contains("\"f32\"") && e.to_string().contains("disk full"), "{e}");
}

#[test]
fn add_tensor_refuses_what_the_format_cannot_hold() {
    let mut w = GgufWriter::new(32);
    w.add_tensor("t", GgmlType::F32, &[4]).expect("valid");
    let cases: [(&str, GgmlType, &[usize], &str); 6] = [
        ("t", GgmlType::F32, &[4], "already declared"),
        ("z", GgmlType::F32, &[4, 0], "dimension 1 is zero"),
        ("d", GgmlType::F32, &[1, 1, 1, 1, 1], "5 dimensions"),
        ("e", GgmlType::F32, &[], "0 dimensions"),
        ("b", GgmlType::Q4_K, &[128], "not a multiple of the 256-weight block of Q4_K"),
        ("o", GgmlType::F32, &[usize::MAX / 2, 4], "overflows"),
    ];
    for (name, ty, dims, reason) in cases {
        let e = w.add_tensor(name, ty, dims).unwrap_err();
        assert!(matches!(e, GgufError::InvalidTensor { ref tensor, .. } if tensor == name), "{e}");
        assert!(e.to_string().contains(reason), "{e} should say {reason:?}");
    }
    let long = "x".repeat(64);
    let e = w.add_tensor(&long, GgmlType::F32, &[4]).unwrap_err();
    assert!(e.to_string().contains("at most 63"), "{e}");
    assert_eq!(w.tensors().len(), 1, "refused declarations leave no trace");
}

#[test]
fn metadata_keeps_insertion_order_and_replaces_in_place() {
    let mut w = GgufWriter::new(64);
    w.add_metadata("a", GgufValue::U32(1));
    w.add_metadata("general.alignment", GgufValue::U32(8));
    w.add_metadata("b", GgufValue::U32(2));
    w.add_metadata("a", GgufValue::String("again".into()));
    let keys: Vec<(String, GgufValue)> = w.metadata();
    assert_eq!(
        keys,
        [
            ("a".to_owned(), GgufValue::String("again".into())),
            ("general.alignment".to_owned(), GgufValue::U32(64)),
            ("b".to_owned(), GgufValue::U32(2)),
        ]
    );
    let f = GgufFile::from_bytes(w.to_vec(|_, _| Ok(())).expect("write")).expect("parse");
    assert_eq!(f.metadata(), keys.as_slice());
    assert_eq!(f.alignment, 64);
}

#[test]
#[should_panic(expected = "array mixes uint32 and string elements")]
fn mixed_type_arrays_are_a_caller_bug() {
    GgufWriter::new(32).add_metadata("bad", GgufValue::Array(vec![GgufValue::U32(1), "x".into()]));
}
