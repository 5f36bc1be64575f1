//! Synthetic Qwen3-MoE models (docs/synthetic-models.md): any preset shape up to the production 30B-A3B, in any
//! quantisation mix, seeded and byte-identical on every machine and thread count.
//!
//! - [`preset`]: the shapes; [`mix`]: which type each tensor is stored in;
//! - [`recipe`]: the tensor list and the scale of each, chosen for realistic activations;
//! - [`draw`]: the bytes, drawn directly in each block format, in parallel, deterministically;
//! - [`tokenizer`]: a minimal byte-level BPE vocabulary of Qwen3's size, so other GGUF readers load the files.
//!
//! [`SynthModel::build`] lays the whole GGUF image out in one buffer of the file's exact size and fills
//! every tensor in place (peak memory: the weights plus the metadata); [`SynthModel::write_file`]
//! streams it to disk one tensor at a time.

pub mod draw;
pub mod mix;
pub mod preset;
pub mod recipe;
pub mod tokenizer;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use moe_kernels::GgmlType;
use rayon::prelude::*;

pub use self::mix::QuantMix;
pub use self::preset::Preset;
use self::recipe::TensorRecipe;
use crate::config::{ARCHITECTURE, ModelConfig};
use crate::gguf::{GgufFile, GgufValue, GgufWriter};
use crate::spec::{ModelSpec, SpecError};

/// Tensor data alignment of the files written (GGUF's default).
pub const ALIGNMENT: usize = 32;

/// llama.cpp's `GGML_QNT_VERSION`, written as `general.quantization_version` by every quantiser.
const QUANTIZATION_VERSION: u32 = 2;

/// A synthetic model, fully described: shape, mix, seed and the recipe of every tensor.
#[derive(Debug, Clone)]
pub struct SynthModel {
    preset: Preset,
    quant: QuantMix,
    seed: u64,
    config: ModelConfig,
    tensors: Vec<TensorRecipe>,
}

impl SynthModel {
    /// The model `synth:PRESET:QUANT@SEED`.
    pub fn new(preset: Preset, quant: QuantMix, seed: u64) -> Self {
        let config = preset.config();
        let tensors = recipe::tensors(&config, quant);
        Self { preset, quant, seed, config, tensors }
    }

    /// The configuration the model has.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Every tensor's name, shape, type and distribution, in file order.
    pub fn tensors(&self) -> &[TensorRecipe] {
        &self.tensors
    }

    /// The canonical spec of this model.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec::Synth { preset: self.preset, quant: self.quant, seed: self.seed }
    }

    /// Bytes of tensor data (without header, vocabulary or padding).
    pub fn weight_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.ty.row_bytes(t.dims[0]).unwrap_or(0) * rows(&t.dims)).sum()
    }

    /// Builds the model as a GGUF file in memory: one buffer of the file's exact size, every tensor
    /// drawn in place in parallel.
    pub fn build(&self) -> Result<GgufFile, SpecError> {
        let writer = self.writer()?;
        let header = writer.header_bytes();
        let mut image = vec![0u8; writer.total_bytes()];
        let (head, mut data) = image.split_at_mut(header.len());
        head.copy_from_slice(&header);
        let mut jobs = Vec::with_capacity(self.tensors.len());
        let mut consumed = 0usize;
        for (info, tensor) in writer.tensors().iter().zip(&self.tensors) {
            let start = info.offset as usize - consumed;
            let (mine, rest) = std::mem::take(&mut data)[start..].split_at_mut(info.n_bytes);
            jobs.push((tensor, mine));
            data = rest;
            consumed = info.offset as usize + info.n_bytes;
        }
        jobs.into_par_iter().for_each(|(tensor, bytes)| self.fill(tensor, bytes));
        GgufFile::from_bytes(image)
            .map_err(|source| SpecError::Gguf { path: self.spec().to_string(), source })
    }

    /// Writes the model to `out` as a GGUF file, one tensor at a time (each drawn in parallel into a
    /// reused buffer, then written).
    pub fn write_file(&self, out: &Path) -> Result<(), SpecError> {
        let writer = self.writer()?;
        let file =
            File::create(out).map_err(|source| SpecError::Write { path: out.to_path_buf(), source })?;
        let mut buffer = Vec::new();
        writer
            .write_to(BufWriter::with_capacity(1 << 20, file), |index, sink: &mut dyn Write| {
                let tensor = &self.tensors[index];
                buffer.clear();
                buffer.resize(writer.tensors()[index].n_bytes, 0);
                self.fill(tensor, &mut buffer);
                sink.write_all(&buffer)
            })
            .map_err(|source| SpecError::Gguf { path: out.display().to_string(), source })
    }

    /// Draws one tensor's bytes.
    fn fill(&self, tensor: &TensorRecipe, bytes: &mut [u8]) {
        draw::fill_tensor(&tensor.name, tensor.ty, tensor.dims[0], tensor.init, self.seed, bytes);
    }

    /// A GGUF writer with this model's metadata and tensor declarations.
    fn writer(&self) -> Result<GgufWriter, SpecError> {
        let mut w = GgufWriter::new(ALIGNMENT);
        for (key, value) in self.metadata() {
            w.add_metadata(&key, value);
        }
        for t in &self.tensors {
            w.add_tensor(&t.name, t.ty, &t.dims)
                .map_err(|source| SpecError::Gguf { path: self.spec().to_string(), source })?;
        }
        Ok(w)
    }

    /// The metadata llama.cpp's converter writes for a Qwen3-MoE model, plus the spec that made it.
    fn metadata(&self) -> Vec<(String, GgufValue)> {
        let c = &self.config;
        let u32_of = |v: usize| GgufValue::U32(u32::try_from(v).expect("preset sizes fit in u32"));
        let arch = |key: &str| format!("{ARCHITECTURE}.{key}");
        let mut meta = vec![
            ("general.architecture".to_owned(), GgufValue::from(ARCHITECTURE)),
            ("general.type".to_owned(), GgufValue::from("model")),
            ("general.name".to_owned(), GgufValue::from(self.preset.display_name())),
            ("general.alignment".to_owned(), u32_of(ALIGNMENT)),
            (arch("block_count"), u32_of(c.n_layer)),
            (arch("context_length"), u32_of(c.context_length)),
            (arch("embedding_length"), u32_of(c.hidden)),
            (arch("feed_forward_length"), u32_of(self.preset.dense_ffn())),
            (arch("attention.head_count"), u32_of(c.n_head)),
            (arch("attention.head_count_kv"), u32_of(c.n_kv_head)),
            (arch("rope.freq_base"), GgufValue::F32(c.rope_theta as f32)),
            (arch("attention.layer_norm_rms_epsilon"), GgufValue::F32(c.rms_eps as f32)),
            (arch("expert_count"), u32_of(c.n_expert)),
            (arch("expert_used_count"), u32_of(c.n_expert_used)),
            (arch("attention.key_length"), u32_of(c.head_dim)),
            (arch("attention.value_length"), u32_of(c.head_dim)),
            (arch("expert_feed_forward_length"), u32_of(c.expert_ffn)),
        ];
        meta.extend(tokenizer::metadata(c.vocab).into_iter().map(|(k, v)| (k.to_owned(), v)));
        meta.push(("general.file_type".to_owned(), GgufValue::U32(self.quant.file_type())));
        if self.quant.is_quantized() {
            meta.push(("general.quantization_version".to_owned(), GgufValue::U32(QUANTIZATION_VERSION)));
        }
        meta.push(("moe_gate.synth.spec".to_owned(), GgufValue::String(self.spec().to_string())));
        meta.push(("moe_gate.synth.recipe_version".to_owned(), GgufValue::U64(draw::RECIPE_VERSION)));
        meta
    }
}

/// Rows of a tensor of shape `dims` (every dimension but the first).
fn rows(dims: &[usize]) -> usize {
    dims[1..].iter().product()
}

/// Whether every tensor of every preset in every mix is of a type [`draw`] can produce (the presets'
/// row lengths are multiples of 256, so no fallback type appears).
pub fn drawable(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q5_1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every preset in every mix declares only types the drawer produces, and Q4_K_M puts Q6_K where
    /// llama.cpp's rule says.
    #[test]
    fn every_preset_and_mix_is_drawable() {
        for preset in Preset::ALL {
            for quant in QuantMix::ALL {
                let model = SynthModel::new(preset, quant, 0);
                for t in model.tensors() {
                    assert!(drawable(t.ty), "{preset} {quant}: {} is {}", t.name, t.ty);
                    if t.dims.len() > 1 {
                        assert_eq!(t.dims[0] % 256, 0, "{preset}: {} row length", t.name);
                    }
                }
            }
        }
        let model = SynthModel::new(Preset::Qwen3Coder30bA3b, QuantMix::Q4_K_M, 0);
        let q6k_layers: Vec<usize> = (0..48)
            .filter(|i| {
                let ty = |kind: &str| {
                    model.tensors().iter().find(|t| t.name == format!("blk.{i}.{kind}.weight")).unwrap().ty
                };
                assert_eq!(ty("attn_v"), ty("ffn_down_exps"));
                ty("attn_v") == GgmlType::Q6_K
            })
            .collect();
        // n = 48: i < 6, i >= 42, and (i - 6) % 3 == 2 for i = 8, 11, ..., 41.
        let expected =
            [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47];
        assert_eq!(q6k_layers, expected);
        assert_eq!(q6k_layers.len(), 24);
    }

    /// The production Q4_K_M weights take about 18.6 GB (issue 3's figure: the memory bound is 1.1x it).
    #[test]
    fn production_weight_bytes() {
        let bytes = SynthModel::new(Preset::Qwen3Coder30bA3b, QuantMix::Q4_K_M, 0).weight_bytes();
        assert!((18.0e9..19.0e9).contains(&(bytes as f64)), "{bytes}");
    }
}
