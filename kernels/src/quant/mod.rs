//! GGUF tensor block formats, as defined by ggml (`ggml-common.h` for the byte layouts, `ggml-quants.c`
//! for the reference dequantisers and quantisers).
//!
//! Every format is a sequence of fixed-size blocks of [`GgmlType::block_size`] weights stored in
//! [`GgmlType::type_size`] bytes, little-endian. A row of `n` weights holds a whole number of blocks.
//!
//! Four operations per format, each with one definition shared by every caller:
//! - [`dequantize_row`]: f32, bit-identical to ggml's `dequantize_row_*` (same operation order, no FMA).
//! - [`dequantize_row_f64`]: f64, exact (every block field widened to f64; the formulas of these formats
//!   need at most 53 significant bits, so nothing is rounded). The `reference` backend's weights.
//! - [`dot_row`]: a quantised row times f32 activations, accumulated in f32, activations never quantised.
//!   The CPU backend's hot loop; its summation order is fixed (see [`dot_row`]).
//! - [`quantize_row`]: llama.cpp's reference quantisers (`quantize_row_*_ref`), bit for bit.
//!
//! One file per format family: `float` (F32, F16, BF16), `legacy` (Q4_0, Q5_0, Q5_1), `q8_0`, and the
//! K-quants `q4_k`, `q5_k`, `q6_k` with their shared scale search in `k_common`. The block formats
//! implement the crate-private `Block` trait; `dot` holds the fixed-order accumulator.

mod dot;
mod float;
mod k_common;
mod legacy;
mod q4_k;
mod q5_k;
mod q6_k;
mod q8_0;

use std::fmt;

use self::dot::Decode;
use self::legacy::{BlockQ4_0, BlockQ5_0, BlockQ5_1};
use self::q4_k::BlockQ4K;
use self::q5_k::BlockQ5K;
use self::q6_k::BlockQ6K;
use self::q8_0::BlockQ8_0;

/// A GGUF tensor type (ggml's `ggml_type`), limited to the types this project reads and writes.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the upper half of a binary32).
    BF16,
    /// 32 weights: f16 scale `d`, 4-bit quants, `w = d * (q - 8)`.
    Q4_0,
    /// 32 weights: f16 scale `d`, 5-bit quants, `w = d * (q - 16)`.
    Q5_0,
    /// 32 weights: f16 scale `d` and offset `m`, 5-bit quants, `w = d * q + m`.
    Q5_1,
    /// 32 weights: f16 scale `d`, 8-bit signed quants, `w = d * q`.
    Q8_0,
    /// 256 weights in 8 sub-blocks of 32: 6-bit scales and mins, 4-bit quants, `w = d*sc*q - dmin*m`.
    Q4_K,
    /// 256 weights in 8 sub-blocks of 32: 6-bit scales and mins, 5-bit quants, `w = d*sc*q - dmin*m`.
    Q5_K,
    /// 256 weights in 16 sub-blocks of 16: 8-bit signed scales, 6-bit quants, `w = d*sc*(q - 32)`.
    Q6_K,
}

impl GgmlType {
    /// Every supported type, in declaration order.
    pub const ALL: [GgmlType; 10] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The type with ggml's numeric id `id` (the `ggml_type` enum value stored in GGUF tensor infos),
    /// or `None` if it is not one this project supports.
    pub fn from_ggml_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|ty| ty.ggml_id() == id)
    }

    /// ggml's numeric id of this type (`ggml_type`).
    pub fn ggml_id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The type's name as ggml and GGUF tools print it (`"F32"`, `"Q4_K"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Weights per block: 1 for the float types, 32 for the legacy quants, 256 for the K-quants.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => k_common::QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => size_of::<BlockQ4_0>(),
            GgmlType::Q5_0 => size_of::<BlockQ5_0>(),
            GgmlType::Q5_1 => size_of::<BlockQ5_1>(),
            GgmlType::Q8_0 => size_of::<BlockQ8_0>(),
            GgmlType::Q4_K => size_of::<BlockQ4K>(),
            GgmlType::Q5_K => size_of::<BlockQ5K>(),
            GgmlType::Q6_K => size_of::<BlockQ6K>(),
        }
    }

    /// Bytes of a row of `n` weights, or `None` if `n` is not a multiple of [`Self::block_size`] or the
    /// size overflows `usize`.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }

    /// Whether the type stores quantised blocks (as opposed to one float per weight).
    pub fn is_quantized(self) -> bool {
        !matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantises one row exactly as ggml's `dequantize_row_*` does in f32 (same operation order,
/// bit-identical results).
///
/// # Panics
/// If `src.len() != ty.row_bytes(dst.len())` (callers validate tensor shapes first; a mismatch is a
/// programming error).
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_row_shape(ty, "dequantize_row", src.len(), dst.len());
    match ty {
        GgmlType::F32 => float::dequantize_f32(src, dst),
        GgmlType::F16 => float::dequantize_f16(src, dst),
        GgmlType::BF16 => float::dequantize_bf16(src, dst),
        GgmlType::Q4_0 => dequantize_blocks::<BlockQ4_0>(src, dst),
        GgmlType::Q5_0 => dequantize_blocks::<BlockQ5_0>(src, dst),
        GgmlType::Q5_1 => dequantize_blocks::<BlockQ5_1>(src, dst),
        GgmlType::Q8_0 => dequantize_blocks::<BlockQ8_0>(src, dst),
        GgmlType::Q4_K => dequantize_blocks::<BlockQ4K>(src, dst),
        GgmlType::Q5_K => dequantize_blocks::<BlockQ5K>(src, dst),
        GgmlType::Q6_K => dequantize_blocks::<BlockQ6K>(src, dst),
    }
}

/// Dequantises one row in f64 arithmetic from the block fields: scales, mins and quants are widened to
/// f64 and combined with the format's formula in f64. The result is exact (the formulas need at most 53
/// significant bits), so it is the true value of every stored weight.
///
/// # Panics
/// If `src.len() != ty.row_bytes(dst.len())`.
pub fn dequantize_row_f64(ty: GgmlType, src: &[u8], dst: &mut [f64]) {
    assert_row_shape(ty, "dequantize_row_f64", src.len(), dst.len());
    match ty {
        GgmlType::F32 => float::dequantize_f32_f64(src, dst),
        GgmlType::F16 => float::dequantize_f16_f64(src, dst),
        GgmlType::BF16 => float::dequantize_bf16_f64(src, dst),
        GgmlType::Q4_0 => dequantize_blocks_f64::<BlockQ4_0>(src, dst),
        GgmlType::Q5_0 => dequantize_blocks_f64::<BlockQ5_0>(src, dst),
        GgmlType::Q5_1 => dequantize_blocks_f64::<BlockQ5_1>(src, dst),
        GgmlType::Q8_0 => dequantize_blocks_f64::<BlockQ8_0>(src, dst),
        GgmlType::Q4_K => dequantize_blocks_f64::<BlockQ4K>(src, dst),
        GgmlType::Q5_K => dequantize_blocks_f64::<BlockQ5K>(src, dst),
        GgmlType::Q6_K => dequantize_blocks_f64::<BlockQ6K>(src, dst),
    }
}

/// Dot product of one quantised row with f32 activations, accumulated in f32, without quantising the
/// activations.
///
/// Definition (the same on every CPU, with or without SIMD): each weight `w[i]` is the f32 value
/// [`dequantize_row`] gives; the product `w[i] * x[i]` (rounded to f32) is added to lane `i % 16` of 16
/// f32 partial sums, in increasing `i`; the lanes are then reduced by the halving tree
/// `lane[l] += lane[l + h]` (for `l < h`) for `h = 8, 4, 2, 1`, and the result is `lane[0]`. No FMA
/// contraction. This is the order of `cpu::dot` (so `dot(&dequantized_row, x) == dot_row(ty, row, x)`
/// bit for bit), and a CUDA kernel with 16 threads per row and a shuffle-xor reduction reproduces it.
///
/// # Panics
/// If `row.len() != ty.row_bytes(x.len())`.
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    assert_row_shape(ty, "dot_row", row.len(), x.len());
    match ty {
        GgmlType::F32 => float::dot_f32(row, x),
        GgmlType::F16 => float::dot_f16(row, x),
        GgmlType::BF16 => float::dot_bf16(row, x),
        GgmlType::Q4_0 => dot::dot_blocks::<BlockQ4_0>(row, x),
        GgmlType::Q5_0 => dot::dot_blocks::<BlockQ5_0>(row, x),
        GgmlType::Q5_1 => dot::dot_blocks::<BlockQ5_1>(row, x),
        GgmlType::Q8_0 => dot::dot_blocks::<BlockQ8_0>(row, x),
        GgmlType::Q4_K => dot::dot_blocks::<BlockQ4K>(row, x),
        GgmlType::Q5_K => dot::dot_blocks::<BlockQ5K>(row, x),
        GgmlType::Q6_K => dot::dot_blocks::<BlockQ6K>(row, x),
    }
}

/// Quantises one row with llama.cpp's reference quantisers (`quantize_row_*_ref`; `make_qkx2_quants`
/// for Q4_K/Q5_K, `make_qx_quants` for Q6_K), so the bytes equal llama.cpp's for the same input
/// (llama.cpp compiled without FMA contraction). F16 and BF16 round to nearest, ties to even.
///
/// # Panics
/// If `dst.len() != ty.row_bytes(src.len())`.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    assert_row_shape(ty, "quantize_row", dst.len(), src.len());
    match ty {
        GgmlType::F32 => float::quantize_f32(src, dst),
        GgmlType::F16 => float::quantize_f16(src, dst),
        GgmlType::BF16 => float::quantize_bf16(src, dst),
        GgmlType::Q4_0 => quantize_blocks::<BlockQ4_0>(src, dst),
        GgmlType::Q5_0 => quantize_blocks::<BlockQ5_0>(src, dst),
        GgmlType::Q5_1 => quantize_blocks::<BlockQ5_1>(src, dst),
        GgmlType::Q8_0 => quantize_blocks::<BlockQ8_0>(src, dst),
        GgmlType::Q4_K => quantize_blocks::<BlockQ4K>(src, dst),
        GgmlType::Q5_K => quantize_blocks::<BlockQ5K>(src, dst),
        GgmlType::Q6_K => quantize_blocks::<BlockQ6K>(src, dst),
    }
}

/// Checks the precondition shared by the row functions: `bytes` is exactly the size of a row of
/// `weights` weights of type `ty`.
fn assert_row_shape(ty: GgmlType, op: &str, bytes: usize, weights: usize) {
    match ty.row_bytes(weights) {
        Some(expected) => assert!(
            expected == bytes,
            "{op}: a {ty} row of {weights} weights needs {expected} bytes, got {bytes} \
             (validate tensor shapes before calling)"
        ),
        None => panic!(
            "{op}: a {ty} row must hold a multiple of {} weights, got {weights} \
             (validate tensor shapes before calling)",
            ty.block_size()
        ),
    }
}

/// A quantised block format: a `#[repr(C)]` struct of byte arrays (alignment 1, so any byte slice of
/// the right length can be viewed as a slice of blocks) with the format's conversions. The f32
/// dequantisation (`Decode::dequantize`) is shared with the dot product.
pub(crate) trait Block: Decode {
    /// Writes the block's weights to `out`, computed exactly in f64.
    fn dequantize_f64(&self, out: &mut [f64]);

    /// Quantises `WEIGHTS` values with llama.cpp's reference quantiser.
    fn quantize(src: &[f32]) -> Self;
}

/// Dequantises a row of blocks of type `B` to f32. Lengths are checked by the caller.
fn dequantize_blocks<B: Block>(src: &[u8], dst: &mut [f32]) {
    let blocks: &[B] = bytemuck::cast_slice(src);
    let out: &mut [B::Weights] = bytemuck::cast_slice_mut(dst);
    #[cfg(target_arch = "x86_64")]
    if dot::avx512() {
        // SAFETY: the CPU supports AVX-512F and AVX2 (checked just above), the callee's requirement.
        return unsafe { B::dequantize_avx512(blocks, out) };
    }
    for (block, out) in blocks.iter().zip(out) {
        block.dequantize(out);
    }
}

/// Dequantises a row of blocks of type `B` exactly to f64. Lengths are checked by the caller.
fn dequantize_blocks_f64<B: Block>(src: &[u8], dst: &mut [f64]) {
    let blocks: &[B] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(B::WEIGHTS)) {
        block.dequantize_f64(out);
    }
}

/// Quantises a row into blocks of type `B`. Lengths are checked by the caller.
fn quantize_blocks<B: Block>(src: &[f32], dst: &mut [u8]) {
    let blocks: &mut [B] = bytemuck::cast_slice_mut(dst);
    for (block, values) in blocks.iter_mut().zip(src.chunks_exact(B::WEIGHTS)) {
        *block = B::quantize(values);
    }
}

/// Reads a little-endian IEEE binary16 field as f32 (exact), as `GGML_FP16_TO_FP32` does.
#[inline(always)]
fn f16_le(bytes: [u8; 2]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes(bytes))
}

/// Reads a little-endian IEEE binary16 field as f64 (exact), through the `half` crate: the f64 paths
/// use an implementation independent of [`f16_bits_to_f32`], so tests comparing the two check both.
fn f16_le_f64(bytes: [u8; 2]) -> f64 {
    half::f16::from_le_bytes(bytes).to_f64()
}

/// Widens IEEE binary16 bits to f32, exactly, without branches (so loops of it vectorise and it inlines
/// into the SIMD dot product). The exponent and mantissa are moved into an f32 whose value is the f16's
/// times 2^-112 (a subnormal f32 for a subnormal f16), then scaled by 2^112, which is exact; infinities
/// and NaNs keep their payload with an all-ones exponent.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(bits: u16) -> f32 {
    const TWO_POW_112: u32 = (127 + 112) << 23;
    let h = u32::from(bits);
    let sign = (h & 0x8000) << 16;
    let magnitude = h & 0x7fff;
    let shifted = magnitude << 13;
    let finite = f32::from_bits(shifted) * f32::from_bits(TWO_POW_112);
    let value = if magnitude >= 0x7c00 { f32::from_bits(shifted | 0x7f80_0000) } else { finite };
    f32::from_bits(value.to_bits() | sign)
}

/// Rounds `value` to IEEE binary16 (nearest, ties to even, as `GGML_FP32_TO_FP16`), little-endian.
#[inline]
fn f16_le_from(value: f32) -> [u8; 2] {
    half::f16::from_f32(value).to_bits().to_le_bytes()
}

#[cfg(all(test, target_arch = "x86_64"))]
mod avx512_tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Random blocks of `B` whose f16 fields (at `f16_at`) are finite: every other byte (quants, scales,
    /// mins) takes any value, as in a file.
    fn random_blocks<B: Block>(rng: &mut ChaCha8Rng, n: usize, f16_at: &[usize]) -> Vec<B> {
        let mut bytes = vec![0u8; n * size_of::<B>()];
        bytes.iter_mut().for_each(|b| *b = rng.random());
        for block in bytes.chunks_exact_mut(size_of::<B>()) {
            for &at in f16_at {
                // Exponent field 31 is inf / NaN, which no quantiser writes: use 30 instead.
                if block[at + 1] & 0x7C == 0x7C {
                    block[at + 1] &= !0x04;
                }
            }
        }
        bytemuck::cast_slice(&bytes).to_vec()
    }

    /// The AVX-512 decoders give the portable ones' bits on every weight of 4096 random blocks of each
    /// K type and 32768 of Q8_0 (every nibble, fifth bit, 6-bit scale and min, signed 8-bit scale, 6-bit
    /// and 8-bit quant occurs many times). Where the CPU
    /// lacks AVX-512 there is nothing to compare: the test says so and checks nothing else.
    #[test]
    fn avx512_decoders_give_the_portable_bits() {
        if !dot::avx512() {
            eprintln!("no AVX-512 on this CPU: the portable decoders are the only ones, nothing to compare");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(20261203);
        let q4k: Vec<BlockQ4K> = random_blocks(&mut rng, 4096, &[0, 2]);
        let q5k: Vec<BlockQ5K> = random_blocks(&mut rng, 4096, &[0, 2]);
        let q6k: Vec<BlockQ6K> = random_blocks(&mut rng, 4096, &[208]);
        let q8_0: Vec<BlockQ8_0> = random_blocks(&mut rng, 4096 * 8, &[0]);
        let (mut simd, mut portable) = (vec![[0f32; 256]; 4096], vec![[0f32; 256]; 4096]);

        // SAFETY: AVX-512F and AVX2 are present (checked above).
        unsafe { q4_k::dequantize_blocks_avx512(&q4k, &mut simd) };
        q4k.iter().zip(&mut portable).for_each(|(b, out)| b.dequantize(out));
        assert_same_bits("Q4_K", &simd, &portable);

        // SAFETY: as above.
        unsafe { q6_k::dequantize_blocks_avx512(&q6k, &mut simd) };
        q6k.iter().zip(&mut portable).for_each(|(b, out)| b.dequantize(out));
        assert_same_bits("Q6_K", &simd, &portable);

        // SAFETY: as above.
        unsafe { q5_k::dequantize_blocks_avx512(&q5k, &mut simd) };
        q5k.iter().zip(&mut portable).for_each(|(b, out)| b.dequantize(out));
        assert_same_bits("Q5_K", &simd, &portable);

        // Q8_0 blocks hold 32 weights: 8 per row of 256 here.
        let (simd32, portable32): (&mut [[f32; 32]], &mut [[f32; 32]]) =
            (bytemuck::cast_slice_mut(&mut simd), bytemuck::cast_slice_mut(&mut portable));
        // SAFETY: as above.
        unsafe { q8_0::dequantize_blocks_avx512(&q8_0, simd32) };
        q8_0.iter().zip(portable32.iter_mut()).for_each(|(b, out)| b.dequantize(out));
        assert_same_bits("Q8_0", &simd, &portable);
    }

    fn assert_same_bits(ty: &str, simd: &[[f32; 256]], portable: &[[f32; 256]]) {
        for (b, (s, p)) in simd.iter().zip(portable).enumerate() {
            for (i, (s, p)) in s.iter().zip(p).enumerate() {
                assert_eq!(
                    s.to_bits(),
                    p.to_bits(),
                    "{ty} block {b} weight {i}: AVX-512 {s} != portable {p}"
                );
            }
        }
    }
}
