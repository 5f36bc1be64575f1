//! Numerics of the row functions on random rows of every type: the f32 dequantisation against the exact
//! f64 one, the f32 dot product against an f64 dot (and against its documented summation order), and the
//! round trips that must be exact.

use moe_kernels::quant::{GgmlType, dequantize_row, dequantize_row_f64, dot_row, quantize_row};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A standard normal sample (Box-Muller over the seeded generator; no extra dependency).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Byte offsets of the f16 fields (scales, mins) inside one block of `ty`, from `ggml-common.h`.
fn f16_field_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
    }
}

/// A random row of `n` weights of type `ty`: quantised types get random bytes (every bit pattern of the
/// quants and packed scales) with finite random f16 scales; float types get N(0, 1) values.
fn random_row(ty: GgmlType, n: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let values: Vec<f32> = (0..n).map(|_| normal(rng)).collect();
    let mut row = vec![0u8; ty.row_bytes(n).expect("whole blocks")];
    if !ty.is_quantized() {
        quantize_row(ty, &values, &mut row);
        return row;
    }
    rng.fill(&mut row[..]);
    for block in row.chunks_exact_mut(ty.type_size()) {
        for &offset in f16_field_offsets(ty) {
            let scale = half::f16::from_f32(rng.random_range(-0.05f32..0.05));
            block[offset..offset + 2].copy_from_slice(&scale.to_bits().to_le_bytes());
        }
    }
    row
}

/// Row lengths per type: one block, the production expert FFN width (768) and hidden size (2048), plus
/// lengths that leave partial lane groups and chunks for the float types.
fn lengths(ty: GgmlType) -> Vec<usize> {
    if ty.is_quantized() {
        vec![ty.block_size(), 768, 2048]
    } else {
        vec![0, 1, 15, 17, 255, 257, 1000, 2048]
    }
}

/// `dot_row`'s documented definition, written independently: weight `i` times `x[i]` into lane `i % 16`,
/// then the halving tree.
fn lane_dot(w: &[f32], x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for i in 0..w.len() {
        lanes[i % 16] += w[i] * x[i];
    }
    for half in [8, 4, 2, 1] {
        for l in 0..half {
            lanes[l] += lanes[l + half];
        }
    }
    lanes[0]
}

#[test]
fn f32_dequantisation_is_the_exact_value_rounded_once() {
    // Every f32 formula of these formats multiplies an f16 by small integers (exact in f32: at most
    // 11 + 7 + 6 = 24 significant bits) and adds or subtracts at most one other exact term, so the only
    // rounding is the last one: the f32 result is the exact f64 value rounded to nearest, bit for bit.
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0001);
    for ty in GgmlType::ALL {
        for n in lengths(ty) {
            for _ in 0..8 {
                let row = random_row(ty, n, &mut rng);
                let (mut w32, mut w64) = (vec![0.0f32; n], vec![0.0f64; n]);
                dequantize_row(ty, &row, &mut w32);
                dequantize_row_f64(ty, &row, &mut w64);
                for i in 0..n {
                    assert!(w64[i].is_finite(), "{ty} n={n} weight {i}");
                    assert_eq!(w32[i].to_bits(), (w64[i] as f32).to_bits(), "{ty} n={n} weight {i}");
                }
            }
        }
    }
}

#[test]
fn dot_row_agrees_with_the_f64_dot_of_the_exact_weights() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0002);
    for ty in GgmlType::ALL {
        for n in lengths(ty) {
            for _ in 0..8 {
                let row = random_row(ty, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| normal(&mut rng)).collect();
                let mut w64 = vec![0.0f64; n];
                dequantize_row_f64(ty, &row, &mut w64);
                let exact: f64 = w64.iter().zip(&x).map(|(w, x)| w * f64::from(*x)).sum();
                let sum_abs: f64 = w64.iter().zip(&x).map(|(w, x)| (w * f64::from(*x)).abs()).sum();
                let got = f64::from(dot_row(ty, &row, &x));
                // Each of the 16 lanes adds ceil(n/16) products, then 4 tree levels: every term passes
                // through at most n/16 + 5 additions, plus the rounding of the weight and of the product.
                // With u = 2^-24, |error| <= gamma_k * sum|w x| with k = n/16 + 7; f32::EPSILON = 2u
                // doubles it as a margin for the gamma_k denominator and the f64 reference's rounding.
                let bound = (n / 16 + 7) as f64 * f64::from(f32::EPSILON) * sum_abs;
                assert!(
                    (got - exact).abs() <= bound,
                    "{ty} n={n}: dot_row {got} vs exact {exact}, error {} > bound {bound}",
                    (got - exact).abs()
                );
            }
        }
    }
}

#[test]
fn dot_row_follows_its_documented_summation_order() {
    // Bit-identical to the definition computed from `dequantize_row`: whatever SIMD path the CPU takes.
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0003);
    for ty in GgmlType::ALL {
        for n in lengths(ty) {
            let row = random_row(ty, n, &mut rng);
            let x: Vec<f32> = (0..n).map(|_| normal(&mut rng)).collect();
            let mut w = vec![0.0f32; n];
            dequantize_row(ty, &row, &mut w);
            assert_eq!(dot_row(ty, &row, &x).to_bits(), lane_dot(&w, &x).to_bits(), "{ty} n={n}");
        }
    }
}

#[test]
fn f16_and_bf16_round_trip_every_non_nan_value() {
    for ty in [GgmlType::F16, GgmlType::BF16] {
        let mut nans = 0;
        for bits in 0..=u16::MAX {
            let src = bits.to_le_bytes();
            let (mut w, mut w64) = ([0.0f32], [0.0f64]);
            dequantize_row(ty, &src, &mut w);
            dequantize_row_f64(ty, &src, &mut w64);
            let mut back = [0u8; 2];
            quantize_row(ty, &w, &mut back);
            if w[0].is_nan() {
                // A NaN stays a NaN (possibly quieted), as in ggml.
                nans += 1;
                let mut again = [0.0f32];
                dequantize_row(ty, &back, &mut again);
                assert!(again[0].is_nan() && w64[0].is_nan(), "{ty} {bits:#06x}");
            } else {
                assert_eq!(u16::from_le_bytes(back), bits, "{ty} {bits:#06x} -> {} -> back", w[0]);
                assert_eq!(w64[0], f64::from(w[0]), "{ty} {bits:#06x}");
            }
        }
        // 2 * (2^mantissa_bits - 1) NaN patterns: 2 * 1023 for f16, 2 * 127 for bf16.
        assert_eq!(nans, if ty == GgmlType::F16 { 2046 } else { 254 }, "{ty}");
    }
}

#[test]
fn f16_and_bf16_round_to_nearest_even() {
    // 1 + 2^-11 is halfway between f16 1 and 1 + 2^-10: ties to even gives 1; 1 + 3 * 2^-11 gives
    // 1 + 2^-9 (even mantissa). For bf16 the same with 2^-8 steps.
    let cases = [
        (GgmlType::F16, 1.0 + 2f32.powi(-11), 1.0),
        (GgmlType::F16, 1.0 + 3.0 * 2f32.powi(-11), 1.0 + 2f32.powi(-9)),
        (GgmlType::F16, 65520.0, f32::INFINITY),
        (GgmlType::BF16, 1.0 + 2f32.powi(-8), 1.0),
        (GgmlType::BF16, 1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-6)),
    ];
    for (ty, value, want) in cases {
        let mut bytes = [0u8; 2];
        quantize_row(ty, &[value], &mut bytes);
        let mut back = [0.0f32];
        dequantize_row(ty, &bytes, &mut back);
        assert_eq!(back[0], want, "{ty} {value}");
    }
}

#[test]
fn q8_0_requantisation_is_stable() {
    // Requantising a dequantised Q8_0 block reproduces it: its largest quant is ±127 (or the block is
    // zero), so the new scale is 127 * d / 127 = d exactly and every q * d * (1 / d) rounds back to q.
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0004);
    let n = 32 * 64;
    for trial in 0..16 {
        let scale = [1e-4f32, 1.0, 300.0, 0.0][trial % 4];
        let values: Vec<f32> = (0..n).map(|_| normal(&mut rng) * scale).collect();
        let mut block = vec![0u8; GgmlType::Q8_0.row_bytes(n).unwrap()];
        quantize_row(GgmlType::Q8_0, &values, &mut block);
        let mut w = vec![0.0f32; n];
        dequantize_row(GgmlType::Q8_0, &block, &mut w);
        let mut again = vec![0u8; block.len()];
        quantize_row(GgmlType::Q8_0, &w, &mut again);
        assert_eq!(again, block, "trial {trial} (scale {scale})");
    }
}

#[test]
fn f32_round_trip_is_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0005);
    let values: Vec<f32> = (0..1000).map(|_| f32::from_bits(rng.random::<u32>() & 0x7f7f_ffff)).collect();
    let mut bytes = vec![0u8; 4000];
    quantize_row(GgmlType::F32, &values, &mut bytes);
    let mut back = vec![0.0f32; 1000];
    dequantize_row(GgmlType::F32, &bytes, &mut back);
    assert!(values.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()));
}
