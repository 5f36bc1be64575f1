//! `dot_row` throughput per GGUF type on one 2048-weight row (the production hidden size): the CPU
//! backend's hot loop. Throughput is in bytes of the quantised row per second, so the figures compare
//! with memory bandwidth; one row fits in L1, so this measures the kernel, not the memory system.
//!
//! `dot_tile`: a tile of 16 decoded rows of 2048 against 16 or 64 tokens, the batched CPU forward's
//! product (an expert's rows against the tokens routed to it). Throughput is in multiply-adds per second
//! (rows x 2048 x tokens per iteration), to compare with the core's peak (docs/benchmarks.md).
//!
//! `dequantize_row`: one 2048-weight row per type, in weights per second.
//!
//! Run: `cargo bench -p moe-kernels --bench dot -- --warm-up-time 1 --measurement-time 2`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moe_kernels::cpu::dot_tile;
use moe_kernels::quant::{GgmlType, dequantize_row, dot_row, quantize_row};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Weights per row: the hidden size of Qwen3-30B-A3B.
const ROW: usize = 2048;

fn bench_dot_row(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(2048);
    let weights: Vec<f32> = (0..ROW).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let x: Vec<f32> = (0..ROW).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut group = c.benchmark_group("dot_row_2048");
    for ty in GgmlType::ALL {
        let mut row = vec![0u8; ty.row_bytes(ROW).expect("2048 is a whole number of blocks")];
        quantize_row(ty, &weights, &mut row);
        group.throughput(Throughput::Bytes(row.len() as u64));
        group.bench_function(ty.name(), |b| b.iter(|| dot_row(ty, black_box(&row), black_box(&x))));
    }
    group.finish();
}

/// Rows of one `dot_tile` call in the batched forward.
const TILE_ROWS: usize = 16;

fn bench_dot_tile(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let rows: Vec<f32> = (0..TILE_ROWS * ROW).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut group = c.benchmark_group("dot_tile_16x2048");
    for tokens in [16usize, 64] {
        let xs: Vec<f32> = (0..tokens * ROW).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut out = vec![0.0f32; TILE_ROWS * tokens];
        group.throughput(Throughput::Elements((TILE_ROWS * ROW * tokens) as u64));
        group.bench_function(format!("tokens_{tokens}"), |b| {
            b.iter(|| dot_tile(black_box(&rows), black_box(&xs), ROW, &mut out))
        });
    }
    group.finish();
}

/// `dequantize_row` of one 2048-weight row per type: what the batched forward pays per weight row before
/// `dot_tile`; throughput in weights per second.
fn bench_dequantize_row(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(4096);
    let weights: Vec<f32> = (0..ROW).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut out = vec![0.0f32; ROW];
    let mut group = c.benchmark_group("dequantize_row_2048");
    for ty in GgmlType::ALL {
        let mut row = vec![0u8; ty.row_bytes(ROW).expect("2048 is a whole number of blocks")];
        quantize_row(ty, &weights, &mut row);
        group.throughput(Throughput::Elements(ROW as u64));
        group.bench_function(ty.name(), |b| b.iter(|| dequantize_row(ty, black_box(&row), &mut out)));
    }
    group.finish();
}

criterion_group!(benches, bench_dot_row, bench_dot_tile, bench_dequantize_row);
criterion_main!(benches);
