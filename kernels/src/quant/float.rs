//! The float types F32, F16 and BF16: one little-endian value per weight (ggml `GGML_TYPE_F32`,
//! `GGML_TYPE_F16` = IEEE binary16, `GGML_TYPE_BF16` = the upper 16 bits of a binary32).
//!
//! Widening to f32 or f64 is exact. Narrowing rounds to nearest, ties to even, as ggml's
//! `GGML_FP32_TO_FP16` and `ggml_compute_fp32_to_bf16` do (a NaN stays a quiet NaN).
//!
//! For the dot product a row is cut into [`CHUNK`]-weight units decoded like quantised blocks, and the
//! remaining tail (fewer than [`CHUNK`] weights) goes to the same lanes, so every weight `i` still lands in
//! lane `i % 16` as [`super::dot_row`] defines.

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

use super::dot::{self, Decode, Lanes};
use super::f16_bits_to_f32;

/// Weights per unit of the float dot product (a multiple of the 16 lanes).
const CHUNK: usize = 256;

/// The f32 at each little-endian 4-byte chunk of `src`.
#[inline(always)]
fn f32s(src: &[u8]) -> impl Iterator<Item = f32> + '_ {
    src.as_chunks::<4>().0.iter().map(|b| f32::from_le_bytes(*b))
}

/// The binary16 bits at each little-endian 2-byte chunk of `src`.
#[inline(always)]
fn u16s(src: &[u8]) -> impl Iterator<Item = u16> + '_ {
    src.as_chunks::<2>().0.iter().map(|b| u16::from_le_bytes(*b))
}

/// bfloat16 bits widened to f32 (exact: they are its upper half).
#[inline(always)]
fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

pub(crate) fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (out, v) in dst.iter_mut().zip(f32s(src)) {
        *out = v;
    }
}

pub(crate) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (out, bits) in dst.iter_mut().zip(u16s(src)) {
        *out = f16_bits_to_f32(bits);
    }
}

pub(crate) fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (out, bits) in dst.iter_mut().zip(u16s(src)) {
        *out = bf16_bits_to_f32(bits);
    }
}

pub(crate) fn dequantize_f32_f64(src: &[u8], dst: &mut [f64]) {
    for (out, v) in dst.iter_mut().zip(f32s(src)) {
        *out = f64::from(v);
    }
}

/// Through the `half` crate, independently of [`f16_bits_to_f32`].
pub(crate) fn dequantize_f16_f64(src: &[u8], dst: &mut [f64]) {
    for (out, bits) in dst.iter_mut().zip(u16s(src)) {
        *out = f16::from_bits(bits).to_f64();
    }
}

/// Through the `half` crate, independently of [`bf16_bits_to_f32`].
pub(crate) fn dequantize_bf16_f64(src: &[u8], dst: &mut [f64]) {
    for (out, bits) in dst.iter_mut().zip(u16s(src)) {
        *out = bf16::from_bits(bits).to_f64();
    }
}

pub(crate) fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (out, v) in dst.as_chunks_mut::<4>().0.iter_mut().zip(src) {
        *out = v.to_le_bytes();
    }
}

pub(crate) fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (out, v) in dst.as_chunks_mut::<2>().0.iter_mut().zip(src) {
        *out = f16::from_f32(*v).to_bits().to_le_bytes();
    }
}

pub(crate) fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (out, v) in dst.as_chunks_mut::<2>().0.iter_mut().zip(src) {
        *out = bf16::from_f32(*v).to_bits().to_le_bytes();
    }
}

/// [`CHUNK`] F32 weights.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct ChunkF32([[u8; 4]; CHUNK]);

/// [`CHUNK`] F16 weights.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct ChunkF16([[u8; 2]; CHUNK]);

/// [`CHUNK`] BF16 weights.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct ChunkBF16([[u8; 2]; CHUNK]);

impl Decode for ChunkF32 {
    const WEIGHTS: usize = CHUNK;
    type Weights = [f32; CHUNK];

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32; CHUNK]) {
        for (out, bytes) in out.iter_mut().zip(&self.0) {
            *out = f32::from_le_bytes(*bytes);
        }
    }
}

impl Decode for ChunkF16 {
    const WEIGHTS: usize = CHUNK;
    type Weights = [f32; CHUNK];

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32; CHUNK]) {
        for (out, bytes) in out.iter_mut().zip(&self.0) {
            *out = f16_bits_to_f32(u16::from_le_bytes(*bytes));
        }
    }
}

impl Decode for ChunkBF16 {
    const WEIGHTS: usize = CHUNK;
    type Weights = [f32; CHUNK];

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32; CHUNK]) {
        for (out, bytes) in out.iter_mut().zip(&self.0) {
            *out = bf16_bits_to_f32(u16::from_le_bytes(*bytes));
        }
    }
}

/// The float dot product: whole chunks through [`dot::accumulate`], then the tail, then the lane sum.
fn dot_float<C: Decode>(row: &[u8], x: &[f32], decode: fn(&[u8], &mut [f32])) -> f32 {
    let bytes_per_weight = size_of::<C>() / C::WEIGHTS;
    let whole = x.len() / C::WEIGHTS * C::WEIGHTS;
    let (row_whole, row_tail) = row.split_at(whole * bytes_per_weight);
    let (x_whole, x_tail) = x.split_at(whole);
    let mut lanes = dot::accumulate::<C>(Lanes::new(), row_whole, x_whole);
    let mut w = [0.0f32; CHUNK];
    let w = &mut w[..x_tail.len()];
    decode(row_tail, w);
    lanes.add_aligned(w, x_tail);
    lanes.sum()
}

pub(crate) fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    dot_float::<ChunkF32>(row, x, dequantize_f32)
}

pub(crate) fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_float::<ChunkF16>(row, x, dequantize_f16)
}

pub(crate) fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    dot_float::<ChunkBF16>(row, x, dequantize_bf16)
}
