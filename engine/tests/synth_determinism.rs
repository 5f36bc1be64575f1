//! Synthetic models are deterministic and platform-independent (issue 3, item 2): the same spec gives
//! byte-identical GGUF images whatever the rayon pool size, in memory or streamed to disk, and equal to
//! a pinned digest, so a machine or toolchain that drew different bytes fails here.

use moe_engine::spec::{ModelSpec, Preset, QuantMix, synth_to_file};
use moe_engine::synth::SynthModel;

/// FNV-1a over the image, 64-bit: a fixed, specified digest (std's hashers may change between releases).
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn build_with_threads(preset: Preset, quant: QuantMix, seed: u64, threads: usize) -> Vec<u8> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    let file = pool.install(|| SynthModel::new(preset, quant, seed).build()).expect("build");
    file.as_bytes().to_vec()
}

#[test]
fn same_bytes_for_any_pool_size() {
    for (preset, quant) in
        [(Preset::Tiny, QuantMix::Q4_K_M), (Preset::Tiny, QuantMix::F32), (Preset::Small, QuantMix::Q4_K_M)]
    {
        let one = build_with_threads(preset, quant, 5, 1);
        for threads in [2, 3] {
            assert!(
                one == build_with_threads(preset, quant, 5, threads),
                "{preset} {quant}: {threads} threads differ"
            );
        }
    }
}

#[test]
fn streamed_file_equals_the_in_memory_image() {
    let dir = tempfile::tempdir().expect("temp dir");
    for quant in [QuantMix::Q4_K_M, QuantMix::BF16, QuantMix::Q8_0] {
        let spec = ModelSpec::Synth { preset: Preset::Tiny, quant, seed: 1 };
        let path = dir.path().join(format!("tiny-{quant}.gguf"));
        synth_to_file(&spec, &path).expect("write");
        let on_disk = std::fs::read(&path).expect("read back");
        let in_memory = SynthModel::new(Preset::Tiny, quant, 1).build().expect("build");
        assert!(on_disk == in_memory.as_bytes(), "{quant}: the file and the in-memory image differ");
    }
}

#[test]
fn seeds_give_different_weights_of_the_same_layout() {
    let a = SynthModel::new(Preset::Tiny, QuantMix::Q4_K, 1).build().expect("build");
    let b = SynthModel::new(Preset::Tiny, QuantMix::Q4_K, 2).build().expect("build");
    assert_eq!(
        a.tensors().iter().map(|t| (&t.name, t.offset)).collect::<Vec<_>>(),
        b.tensors().iter().map(|t| (&t.name, t.offset)).collect::<Vec<_>>()
    );
    for t in a.tensors().iter().filter(|t| t.dims.len() > 1) {
        let other = b.tensor(&t.name).expect("same tensors");
        assert_ne!(a.tensor_data(t), b.tensor_data(other), "{}: seeds 1 and 2 drew the same bytes", t.name);
    }
}

/// The pinned digests of two images (the K-quant and the float drawing paths). They change only with
/// `synth::draw::RECIPE_VERSION` (bump it and update these together) or the metadata (last: Qwen3's real
/// tokenizer, issue 12); a difference on one machine only means the drawing is not platform-independent.
#[test]
fn images_match_the_pinned_digests() {
    let q4_k_m = build_with_threads(Preset::Tiny, QuantMix::Q4_K_M, 0, 2);
    let f32 = build_with_threads(Preset::Tiny, QuantMix::F32, 0, 2);
    assert_eq!(
        format!("{:016x} {:016x}", digest(&q4_k_m), digest(&f32)),
        "0b0939cd4a385f69 f8395892b121fa2e"
    );
}
