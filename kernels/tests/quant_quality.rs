//! Quantiser quality, measured the way llama.cpp's `tests/test-quantize-fns.cpp` measures it and held to
//! its bounds, on its synthetic signal and on Gaussian data.

use moe_kernels::quant::{GgmlType, dequantize_row, dot_row, quantize_row};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// test-quantize-fns.cpp `MAX_QUANTIZATION_TOTAL_ERROR`: the bound for every type of 4 bits or more
/// (the 2- and 3-bit bounds, 0.0075 and 0.0040, apply to types we do not implement).
const MAX_QUANTIZATION_TOTAL_ERROR: f64 = 0.002;

/// test-quantize-fns.cpp `MAX_DOT_PRODUCT_ERROR` (for the non-low-bit types). llama.cpp quantises the
/// activations too; we do not, so we only get closer.
const MAX_DOT_PRODUCT_ERROR: f64 = 0.02;

/// test-quantize-fns.cpp `test_size`: 32 * 128 values.
const TEST_SIZE: usize = 32 * 128;

/// test-quantize-fns.cpp `generate_data`: `0.1 + amplitude * cosf(i + offset)` (double sum, stored as
/// float).
fn generate_data(offset: f32, amplitude: f32) -> Vec<f32> {
    (0..TEST_SIZE).map(|i| (0.1 + f64::from(amplitude * (i as f32 + offset).cos())) as f32).collect()
}

/// N(0, 1) samples (Box-Muller over a seeded generator).
fn gaussian(seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..TEST_SIZE)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// test-quantize-fns.cpp `array_rmse`: `sqrt(sum (a - b)^2) / n` (their "RMSE", scaled by 1/sqrt(n)).
fn array_rmse(a: &[f32], b: &[f32]) -> f64 {
    let sum: f64 = a.iter().zip(b).map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2)).sum();
    sum.sqrt() / a.len() as f64
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut q = vec![0u8; ty.row_bytes(x.len()).expect("whole blocks")];
    quantize_row(ty, x, &mut q);
    q
}

/// test-quantize-fns.cpp `total_quantization_error`: quantise, dequantise, `array_rmse`.
fn total_quantization_error(ty: GgmlType, x: &[f32]) -> f64 {
    let mut back = vec![0.0f32; x.len()];
    dequantize_row(ty, &quantize(ty, x), &mut back);
    array_rmse(x, &back)
}

/// test-quantize-fns.cpp `dot_product_error`: `|dot(quantised a, b) - dot(a, b)| / n`.
fn dot_product_error(ty: GgmlType, a: &[f32], b: &[f32]) -> f64 {
    let reference: f64 = a.iter().zip(b).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
    (f64::from(dot_row(ty, &quantize(ty, a), b)) - reference).abs() / a.len() as f64
}

/// Measured when written (cos signal / Gaussian): Q4_0 0.00112 / 0.00130, Q5_0 0.00059 / 0.00064,
/// Q5_1 0.00056 / 0.00058, Q8_0 0.00007 / 0.00008, Q4_K 0.00098 / 0.00110, Q5_K 0.00053 / 0.00056,
/// Q6_K 0.00026 / 0.00027, BF16 0.00004 / 0.00003, F16 0.000004 / 0.000003.
#[test]
fn quantisation_error_is_within_llama_cpp_bounds() {
    let inputs = [("cos signal", generate_data(0.0, 2.0)), ("gaussian", gaussian(0x9a55))];
    for (label, x) in &inputs {
        for ty in GgmlType::ALL {
            let error = total_quantization_error(ty, x);
            assert!(error < MAX_QUANTIZATION_TOTAL_ERROR, "{ty} on {label}: total error {error}");
        }
    }
}

#[test]
fn dot_product_error_is_within_llama_cpp_bounds() {
    let (a, b) = (generate_data(0.0, 2.0), generate_data(1.0, 2.0));
    let (ga, gb) = (gaussian(1), gaussian(2));
    for ty in GgmlType::ALL {
        for (label, a, b) in [("cos signal", &a, &b), ("gaussian", &ga, &gb)] {
            let error = dot_product_error(ty, a, b);
            assert!(error < MAX_DOT_PRODUCT_ERROR, "{ty} on {label}: dot product error {error}");
        }
    }
}

#[test]
fn more_bits_give_less_error() {
    let x = gaussian(0xb175);
    let e = |ty| total_quantization_error(ty, &x);
    for (coarser, finer) in [
        (GgmlType::Q4_0, GgmlType::Q5_0),
        (GgmlType::Q5_0, GgmlType::Q8_0),
        (GgmlType::Q4_K, GgmlType::Q5_K),
        (GgmlType::Q5_K, GgmlType::Q6_K),
        (GgmlType::Q6_K, GgmlType::Q8_0),
        (GgmlType::Q8_0, GgmlType::BF16),
        (GgmlType::BF16, GgmlType::F16),
        // Same bits, better scheme: the K-quants' per-sub-block scales and mins beat one scale per 32.
        (GgmlType::Q4_0, GgmlType::Q4_K),
    ] {
        assert!(
            e(coarser) > e(finer),
            "{coarser} ({}) should err more than {finer} ({})",
            e(coarser),
            e(finer)
        );
    }
    assert_eq!(e(GgmlType::F32), 0.0);
}

#[test]
fn q8_0_error_is_at_most_half_a_step() {
    // Q8_0 rounds x / d to the nearest integer with d = amax / 127 (rounded to f16), so each weight is off
    // by at most d / 2, up to the f16 rounding of d (relative 2^-11, times at most 127 steps) and f32
    // rounding.
    let x = gaussian(0x0808);
    let q = quantize(GgmlType::Q8_0, &x);
    let mut back = vec![0.0f32; x.len()];
    dequantize_row(GgmlType::Q8_0, &q, &mut back);
    for (b, (xs, ws)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
        let d = f64::from(half::f16::from_le_bytes([q[34 * b], q[34 * b + 1]]).to_f32());
        let slack = d * (0.5 + 127.0 * 2f64.powi(-11)) + 1e-6;
        for (x, w) in xs.iter().zip(ws) {
            assert!((f64::from(*x) - f64::from(*w)).abs() <= slack, "block {b}: {x} -> {w}, d = {d}");
        }
    }
}
