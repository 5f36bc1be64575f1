//! The block formats on real llama.cpp output: the tensors of the fixture models in
//! `tests/fixtures/` (see its README), quantised by llama.cpp's own `llama_model_quantize`.
//!
//! - public-tiny: the F32 model and its Q8_0 and "Q4_K_M" (Q5_0, Q5_1, Q8_0) variants. Without an
//!   importance matrix llama.cpp quantises these types with `quantize_row_*_ref`, so our quantiser must
//!   reproduce its bytes from the F32 weights exactly.
//! - q4k: real Q4_K, Q5_K, Q6_K and Q8_0 tensors (no F32 source): every row must dequantise to finite
//!   values, f32 equal to the exact f64 value rounded once, and the dot product must agree with f64.
//!
//! - quant_golden/: bytes that llama.cpp's `quantize_row_*_ref` produced for five 1024-value inputs
//!   (see quant_golden/README.md); this pins the K-quant quantisers, which no F32 fixture covers.
//!
//! The GGUF reader of `moe-engine` is not a dependency of this crate; [`gguf_tensors`] below reads just
//! the tensor table (GGUF v3: header, metadata skipped by type, tensor infos, aligned data).

use std::collections::HashMap;
use std::path::PathBuf;

use moe_kernels::quant::{GgmlType, dequantize_row, dequantize_row_f64, dot_row, quantize_row};

/// One tensor of a GGUF file: its type, its dimensions (ggml order: `dims[0]` is the row length) and
/// its bytes.
struct Tensor {
    ty: GgmlType,
    dims: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    fn row_len(&self) -> usize {
        self.dims[0]
    }

    fn rows(&self) -> impl Iterator<Item = &[u8]> {
        let row_bytes = self.ty.row_bytes(self.row_len()).expect("whole blocks per row");
        self.data.chunks_exact(row_bytes)
    }
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(path)
}

/// A little-endian cursor over a GGUF file, panicking (in this test only) on truncation.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).expect("UTF-8 string")
    }
    /// Skips a metadata value of GGUF type `ty`, returning it as u64 when it is an unsigned integer.
    fn skip_value(&mut self, ty: u32) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(u64::from(self.take(1)[0])),
            2 | 3 => Some(u64::from(u16::from_le_bytes(self.take(2).try_into().unwrap()))),
            4..=6 => Some(u64::from(self.u32())),
            10..=12 => Some(self.u64()),
            8 => {
                self.string();
                None
            }
            9 => {
                let (item_ty, n) = (self.u32(), self.u64());
                for _ in 0..n {
                    self.skip_value(item_ty);
                }
                None
            }
            other => panic!("unknown GGUF value type {other}"),
        }
    }
}

/// The tensors of a GGUF v2/v3 file, by name.
fn gguf_tensors(path: &str) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(fixture(path)).unwrap_or_else(|e| panic!("reading fixture {path}: {e}"));
    let mut c = Cursor { bytes: &bytes, pos: 0 };
    assert_eq!(c.take(4), b"GGUF", "{path}: magic");
    assert!(matches!(c.u32(), 2 | 3), "{path}: version");
    let (n_tensors, n_kv) = (c.u64(), c.u64());
    let mut alignment = 32;
    for _ in 0..n_kv {
        let key = c.string();
        let ty = c.u32();
        let value = c.skip_value(ty);
        if key == "general.alignment" {
            alignment = value.expect("integer alignment") as usize;
        }
    }
    let infos: Vec<(String, Vec<usize>, u32, usize)> = (0..n_tensors)
        .map(|_| {
            let name = c.string();
            let n_dims = c.u32();
            let dims = (0..n_dims).map(|_| c.u64() as usize).collect();
            (name, dims, c.u32(), c.u64() as usize)
        })
        .collect();
    let data_start = c.pos.next_multiple_of(alignment);
    infos
        .into_iter()
        .map(|(name, dims, type_id, offset)| {
            let ty = GgmlType::from_ggml_id(type_id).unwrap_or_else(|| panic!("{name}: type {type_id}"));
            let n: usize = dims.iter().product();
            let len = ty.row_bytes(n).expect("whole blocks");
            let data = bytes[data_start + offset..data_start + offset + len].to_vec();
            (name, Tensor { ty, dims, data })
        })
        .collect()
}

/// Every weight that llama.cpp quantised from the F32 public-tiny model, quantised again by us, gives
/// llama.cpp's bytes.
#[test]
fn quantize_row_reproduces_llama_cpp_bytes_on_public_tiny() {
    let source = gguf_tensors("public-tiny/model.gguf");
    let mut checked: HashMap<GgmlType, usize> = HashMap::new();
    for file in ["public-tiny/model.q8_0.gguf", "public-tiny/model.q4_k_m.gguf"] {
        for (name, quantised) in gguf_tensors(file) {
            if !quantised.ty.is_quantized() {
                continue;
            }
            let f32_tensor = &source[&name];
            assert_eq!(f32_tensor.ty, GgmlType::F32, "{name}");
            assert_eq!(f32_tensor.dims, quantised.dims, "{name}");
            let n = quantised.row_len();
            let mut values = vec![0.0f32; n];
            let mut ours = vec![0u8; quantised.ty.row_bytes(n).unwrap()];
            for (r, (src, theirs)) in f32_tensor.rows().zip(quantised.rows()).enumerate() {
                dequantize_row(GgmlType::F32, src, &mut values);
                quantize_row(quantised.ty, &values, &mut ours);
                assert!(
                    ours == theirs,
                    "{file} {name} ({}) row {r}: bytes differ from llama.cpp's",
                    quantised.ty
                );
            }
            *checked.entry(quantised.ty).or_default() += quantised.data.len();
        }
    }
    // The fixture must really exercise the three types (README: Q8_0, and Q5_0/Q5_1 in the Q4_K_M mix).
    for ty in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q5_1] {
        assert!(checked.get(&ty).copied().unwrap_or(0) > 0, "no {ty} tensor checked");
    }
}

/// Real K-quant rows (and the others in the q4k model) dequantise to finite values, bit-equal to the
/// exact f64 value rounded once to f32, and their dot products agree with an f64 dot.
#[test]
fn real_llama_cpp_blocks_dequantise_exactly_and_dot_correctly() {
    let mut seen: HashMap<GgmlType, usize> = HashMap::new();
    for file in ["q4k/model.q4_k_m.gguf", "public-tiny/model.q4_k_m.gguf"] {
        for (name, t) in gguf_tensors(file) {
            let n = t.row_len();
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.75).collect();
            let (mut w32, mut w64) = (vec![0.0f32; n], vec![0.0f64; n]);
            for (r, row) in t.rows().enumerate() {
                dequantize_row(t.ty, row, &mut w32);
                dequantize_row_f64(t.ty, row, &mut w64);
                for (i, (a, b)) in w32.iter().zip(&w64).enumerate() {
                    assert!(b.is_finite(), "{file} {name} row {r} weight {i}: {b}");
                    assert_eq!(a.to_bits(), (*b as f32).to_bits(), "{file} {name} row {r} weight {i}");
                }
                let exact: f64 = w64.iter().zip(&x).map(|(w, x)| w * f64::from(*x)).sum();
                let sum_abs: f64 = w64.iter().zip(&x).map(|(w, x)| (w * f64::from(*x)).abs()).sum();
                let got = f64::from(dot_row(t.ty, row, &x));
                // f32 accumulation over ceil(n/16) terms per lane plus a 4-level tree and the weight
                // and product roundings: |error| <= (n/16 + 7) * eps_f32 * sum |w x| (a gamma_k bound;
                // eps_f32 = 2u gives a factor-2 margin).
                let bound = (n / 16 + 7) as f64 * f64::from(f32::EPSILON) * sum_abs;
                assert!((got - exact).abs() <= bound, "{file} {name} row {r}: dot {got} vs {exact}");
            }
            *seen.entry(t.ty).or_default() += 1;
        }
    }
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q5_1]
    {
        assert!(seen.contains_key(&ty), "no {ty} tensor in the fixtures");
    }
}

/// Our quantisers reproduce, byte for byte, what llama.cpp's reference quantisers wrote for the golden
/// inputs (Gaussian, heavy-tailed, all-positive, sparse, and edge cases: zero, constant, tiny and huge
/// super-blocks).
#[test]
fn quantize_row_reproduces_llama_cpp_reference_quantisers() {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/quant_golden");
    let read =
        |name: &str| std::fs::read(golden.join(name)).unwrap_or_else(|e| panic!("quant_golden/{name}: {e}"));
    let types = [
        ("q4_0", GgmlType::Q4_0),
        ("q5_0", GgmlType::Q5_0),
        ("q5_1", GgmlType::Q5_1),
        ("q8_0", GgmlType::Q8_0),
        ("q4_K", GgmlType::Q4_K),
        ("q5_K", GgmlType::Q5_K),
        ("q6_K", GgmlType::Q6_K),
    ];
    for input in ["gauss", "heavy", "positive", "sparse", "edge"] {
        let x: Vec<f32> = read(&format!("{input}.f32"))
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(x.len(), 1024, "{input}.f32");
        for (suffix, ty) in types {
            let theirs = read(&format!("{input}.{suffix}"));
            let mut ours = vec![0u8; ty.row_bytes(x.len()).unwrap()];
            quantize_row(ty, &x, &mut ours);
            assert_eq!(ours.len(), theirs.len(), "{input}.{suffix}: size");
            for (b, (ours, theirs)) in
                ours.chunks(ty.type_size()).zip(theirs.chunks(ty.type_size())).enumerate()
            {
                assert_eq!(ours, theirs, "{input} {ty} block {b}: bytes differ from llama.cpp's");
            }
        }
    }
}
