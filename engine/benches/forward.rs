//! CPU forward throughput on the fixture models (issue 2 item 8): prefill tokens/s for a 21-token prompt
//! and decode tokens/s for one `step` after a 20-token prefill.
//!
//! Run: `cargo bench -p moe-engine --bench forward` (results and machine in docs/benchmarks.md).
//! Criterion reports throughput in elements/s, where one element is one token.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
use moe_engine::gguf::GgufFile;
use moe_engine::weights::ModelWeights;

/// The fixture models measured: the F32 model and the K-quant model of the production row widths.
const MODELS: [&str; 3] = ["public-tiny/model.gguf", "q4k/model.q8_0.gguf", "q4k/model.q4_k_m.gguf"];

/// The longest fixture prompt (21 tokens); every id is below the smaller vocabulary (256).
const PROMPT: [u32; 21] =
    [250, 54, 72, 92, 64, 233, 85, 16, 166, 51, 173, 68, 181, 244, 255, 200, 112, 27, 169, 227, 20];

fn cpu_forward(rel: &str) -> Box<dyn Forward> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel);
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let weights =
        ModelWeights::from_gguf(Arc::new(file)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    create_backend(BackendKind::Cpu, Arc::new(weights), Policy::Fast).expect("cpu backend")
}

fn prefill(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_prefill_21");
    group.throughput(Throughput::Elements(PROMPT.len() as u64));
    for model in MODELS {
        let mut f = cpu_forward(model);
        group.bench_function(model, |b| b.iter(|| f.forward(black_box(&PROMPT), None).expect("forward")));
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_decode_at_20");
    group.throughput(Throughput::Elements(1));
    let (prefix, next) = PROMPT.split_at(PROMPT.len() - 1);
    for model in MODELS {
        let mut f = cpu_forward(model);
        group.bench_function(model, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    f.forward(prefix, None).expect("prefill");
                    let start = Instant::now();
                    black_box(f.step(black_box(next[0])).expect("step"));
                    spent += start.elapsed();
                }
                spent
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = prefill, decode
}
criterion_main!(benches);
