//! How fast synthetic models build (issue 3, item 4): the whole `tiny` and `small` presets in memory,
//! and one decoder layer of the production shape (`synth:qwen3-coder-30b-a3b:q4_k_m`) drawn into a
//! buffer, from which the full build extrapolates (48 layers plus embeddings and LM head; the per-layer
//! cost is the same for every layer up to the Q4_K/Q6_K mix, which the bench alternates).
//!
//! Run: `cargo bench -p moe-engine --bench synth`. Criterion reports bytes/s (one byte = one byte of
//! GGUF image). The full production build and its peak RSS are measured by the `synth_stats` example on
//! a 16-core machine (docs/synthetic-models.md).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moe_engine::spec::{Preset, QuantMix};
use moe_engine::synth::SynthModel;
use moe_engine::synth::draw::fill_tensor;

fn build_presets(c: &mut Criterion) {
    let mut group = c.benchmark_group("synth_build");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for preset in [Preset::Tiny, Preset::Small] {
        let model = SynthModel::new(preset, QuantMix::Q4_K_M, 0);
        let bytes = model.build().expect("build").as_bytes().len();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("{preset}:q4_k_m"), |b| {
            b.iter(|| black_box(model.build().expect("build")))
        });
    }
    group.finish();
}

/// One production layer: layer 0 (Q6_K `attn_v` and `ffn_down_exps`) and layer 6 (all Q4_K), so the
/// mean of the two is the mean layer of the Q4_K_M mix (24 of 48 layers take each form).
fn production_layer(c: &mut Criterion) {
    let model = SynthModel::new(Preset::Qwen3Coder30bA3b, QuantMix::Q4_K_M, 0);
    let mut group = c.benchmark_group("synth_production_layer");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    for layer in [0, 6] {
        let prefix = format!("blk.{layer}.");
        let tensors: Vec<_> = model.tensors().iter().filter(|t| t.name.starts_with(&prefix)).collect();
        let sizes: Vec<usize> = tensors
            .iter()
            .map(|t| t.ty.row_bytes(t.dims[0]).unwrap() * t.dims[1..].iter().product::<usize>())
            .collect();
        let mut buffers: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
        group.throughput(Throughput::Bytes(sizes.iter().sum::<usize>() as u64));
        group.bench_function(format!("qwen3-coder-30b-a3b:q4_k_m/layer{layer}"), |b| {
            b.iter(|| {
                for (t, buffer) in tensors.iter().zip(buffers.iter_mut()) {
                    fill_tensor(&t.name, t.ty, t.dims[0], t.init, 0, buffer);
                }
                black_box(&buffers);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, build_presets, production_layer);
criterion_main!(benches);
