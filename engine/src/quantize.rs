//! The re-quantising converter: an existing GGUF model (typically F32, F16 or BF16) written again in
//! another [`QuantMix`], every metadata key kept (`cargo moe-gate quantize --in A.gguf --out B.gguf
//! --quant q4_k_m`).
//!
//! Each tensor's type is chosen by the same rules as the synthetic models' ([`crate::synth::mix`]):
//! norms and router F32, the mix's type elsewhere, llama.cpp's fallbacks where a row is not a whole
//! number of blocks. Each row is dequantised to f32 ([`dequantize_row`]) and quantised with llama.cpp's
//! reference quantisers ([`quantize_row`]); a tensor that keeps its type is copied byte for byte.
//! `general.file_type` (and `general.quantization_version` for quantised mixes) are set to the new mix;
//! every other key is written as read, in the same order.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use moe_kernels::GgmlType;
use moe_kernels::quant::{dequantize_row, quantize_row};
use rayon::prelude::*;

use crate::gguf::{GgufFile, GgufValue, GgufWriter, TensorInfo};
use crate::spec::SpecError;
use crate::synth::QuantMix;

/// llama.cpp's `GGML_QNT_VERSION`.
const QUANTIZATION_VERSION: u32 = 2;

/// Converts the GGUF model at `input` to `mix` and writes it to `output`, streaming one tensor at a time.
pub fn requantize(input: &Path, output: &Path, mix: QuantMix) -> Result<(), SpecError> {
    if same_file(input, output) {
        return Err(SpecError::SameFile { path: output.to_path_buf() });
    }
    let gguf_error = |path: &Path| {
        let path = path.display().to_string();
        move |source| SpecError::Gguf { path, source }
    };
    let file = GgufFile::open(input).map_err(gguf_error(input))?;
    let n_layer = layer_count(&file);
    let targets: Vec<GgmlType> =
        file.tensors().iter().map(|t| mix.type_for(&t.name, &t.dims, n_layer)).collect();

    let mut writer = GgufWriter::new(file.alignment);
    for (key, value) in file.metadata() {
        writer.add_metadata(key, value.clone());
    }
    writer.add_metadata("general.file_type", GgufValue::U32(mix.file_type()));
    if mix.is_quantized() {
        writer.add_metadata("general.quantization_version", GgufValue::U32(QUANTIZATION_VERSION));
    }
    for (t, &ty) in file.tensors().iter().zip(&targets) {
        writer.add_tensor(&t.name, ty, &t.dims).map_err(gguf_error(output))?;
    }

    let out =
        File::create(output).map_err(|source| SpecError::Write { path: output.to_path_buf(), source })?;
    let mut buffer = Vec::new();
    writer
        .write_to(BufWriter::with_capacity(1 << 20, out), |index, sink: &mut dyn Write| {
            let (t, ty) = (&file.tensors()[index], targets[index]);
            let src = file.tensor_data(t);
            if t.ty == ty {
                return sink.write_all(src);
            }
            buffer.clear();
            buffer.resize(writer.tensors()[index].n_bytes, 0);
            convert(t, src, ty, &mut buffer);
            sink.write_all(&buffer)
        })
        .map_err(gguf_error(output))
}

/// Re-encodes the rows of tensor `t` (bytes `src`) as type `ty` into `dst`, rows in parallel.
fn convert(t: &TensorInfo, src: &[u8], ty: GgmlType, dst: &mut [u8]) {
    let row_len = t.dims[0];
    let (src_row, dst_row) = (
        t.n_bytes / t.dims[1..].iter().product::<usize>(),
        dst.len() / t.dims[1..].iter().product::<usize>(),
    );
    dst.par_chunks_mut(dst_row).zip(src.par_chunks(src_row)).for_each_init(
        || vec![0.0f32; row_len],
        |values, (out, row)| {
            dequantize_row(t.ty, row, values);
            quantize_row(ty, values, out);
        },
    );
}

/// The model's layer count: `{architecture}.block_count`, or one more than the highest `blk.N` index.
fn layer_count(file: &GgufFile) -> usize {
    let declared = file
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .and_then(|arch| file.get(&format!("{arch}.block_count")))
        .and_then(GgufValue::as_u64)
        .and_then(|n| usize::try_from(n).ok());
    declared.unwrap_or_else(|| {
        file.tensors()
            .iter()
            .filter_map(|t| t.name.strip_prefix("blk.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |i| i + 1)
    })
}

/// Whether `a` and `b` name the same existing file (writing the output would truncate the mapped input).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
