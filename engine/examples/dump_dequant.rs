//! Dumps every tensor of a GGUF model dequantised to f32 by this engine (`moe_kernels::quant::
//! dequantize_row`), for `scripts/check_gguf_py.py` to compare bit for bit with the Python `gguf`
//! package's dequantisation of the same file.
//!
//! ```text
//! cargo run -p moe-engine --example dump_dequant -- SPEC OUT_DIR
//! ```
//!
//! A synthetic SPEC is first written to `OUT_DIR/model.gguf` (the streamed writer, as `cargo moe-gate
//! synth` uses it); a path SPEC is read where it is. The model is then read back from disk, and each
//! tensor `i` is written to `OUT_DIR/tensor_i.f32` (little-endian f32, row-major, ggml order) and
//! described in `OUT_DIR/index.json` (`model`, and per tensor `name`, `type`, `dims`, `file`).

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use moe_engine::gguf::GgufFile;
use moe_engine::spec::{ModelSpec, synth_to_file};
use moe_kernels::quant::dequantize_row;

fn main() {
    if let Err(message) = run() {
        eprintln!("dump_dequant: {message}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [spec, out_dir] = &args[..] else {
        return Err("usage: dump_dequant SPEC OUT_DIR".to_owned());
    };
    let out_dir = PathBuf::from(out_dir);
    fs::create_dir_all(&out_dir).map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let spec: ModelSpec = spec.parse().map_err(|e| format!("{e}"))?;
    let model = match &spec {
        ModelSpec::Path(path) => path.clone(),
        ModelSpec::Synth { .. } => {
            let path = out_dir.join("model.gguf");
            synth_to_file(&spec, &path).map_err(|e| e.to_string())?;
            path
        }
    };
    let file = GgufFile::open(&model).map_err(|e| e.to_string())?;
    let mut index = Vec::new();
    for (i, t) in file.tensors().iter().enumerate() {
        let name = format!("tensor_{i}.f32");
        dump_tensor(&file, i, &out_dir.join(&name))?;
        index.push(serde_json::json!({ "name": t.name, "type": t.ty.name(), "dims": t.dims, "file": name }));
    }
    let index = serde_json::json!({ "model": model, "tensors": index });
    fs::write(out_dir.join("index.json"), index.to_string())
        .map_err(|e| format!("cannot write index.json: {e}"))?;
    println!("{}: {} tensors dumped to {}", model.display(), file.tensors().len(), out_dir.display());
    Ok(())
}

fn dump_tensor(file: &GgufFile, i: usize, path: &Path) -> Result<(), String> {
    let t = &file.tensors()[i];
    let row_len = t.dims[0];
    let row_bytes =
        t.ty.row_bytes(row_len).ok_or_else(|| format!("tensor {}: rows are not whole blocks", t.name))?;
    let write_error = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut out = BufWriter::new(fs::File::create(path).map_err(write_error)?);
    let mut values = vec![0.0f32; row_len];
    for row in file.tensor_data(t).chunks_exact(row_bytes) {
        dequantize_row(t.ty, row, &mut values);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.write_all(&bytes).map_err(write_error)?;
    }
    out.flush().map_err(write_error)
}
