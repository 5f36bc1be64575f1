//! Q8_0: 32 weights with one f16 scale and 8-bit signed quants (ggml `ggml-common.h` `block_q8_0`;
//! `ggml-quants.c` `dequantize_row_q8_0`, `quantize_row_q8_0_ref`).

use bytemuck::{Pod, Zeroable};

use super::dot::Decode;
use super::{Block, f16_le, f16_le_f64, f16_le_from};

/// Weights per block (ggml `QK8_0`).
const QK8_0: usize = 32;

/// Q8_0 block, 34 bytes: `d` (f16) at 0, `qs` (32 × i8) at 2. Weight `i` is `qs[i] * d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ8_0 {
    d: [u8; 2],
    qs: [u8; QK8_0],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

impl Decode for BlockQ8_0 {
    const WEIGHTS: usize = QK8_0;
    type Weights = [f32; QK8_0];

    #[cfg(target_arch = "x86_64")]
    unsafe fn dequantize_avx512(units: &[Self], out: &mut [[f32; QK8_0]]) {
        // SAFETY: the caller guarantees AVX-512F and AVX2, the decoder's requirement.
        unsafe { dequantize_blocks_avx512(units, out) }
    }

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32; QK8_0]) {
        let d = f16_le(self.d);
        for (out, q) in out.iter_mut().zip(&self.qs) {
            *out = f32::from(*q as i8) * d;
        }
    }
}

/// [`Decode::dequantize`] of whole blocks with AVX-512: each signed quant converted exactly, times `d`,
/// rounded once, as the portable loop computes it, so the same bits (tested against it).
///
/// # Safety
/// The CPU must support AVX-512F (and so AVX2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
pub(super) unsafe fn dequantize_blocks_avx512(blocks: &[BlockQ8_0], out: &mut [[f32; QK8_0]]) {
    use std::arch::x86_64::*;
    for (block, out) in blocks.iter().zip(out) {
        let d = _mm512_set1_ps(f16_le(block.d));
        for half in 0..2 {
            // SAFETY: `qs` holds 32 bytes: bytes 16 * half.. 16 * half + 16 are in bounds.
            let q = unsafe { _mm_loadu_si128(block.qs.as_ptr().add(16 * half).cast()) };
            let w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
            // SAFETY: weights 16 * half.. 16 * half + 16 are in the 32 of `out`.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * half), w) };
        }
    }
}

impl Block for BlockQ8_0 {
    fn dequantize_f64(&self, out: &mut [f64]) {
        let d = f16_le_f64(self.d);
        for (q, out) in self.qs.iter().zip(out) {
            *out = f64::from(*q as i8) * d;
        }
    }

    fn quantize(x: &[f32]) -> Self {
        let amax = x.iter().fold(0.0f32, |amax, v| amax.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        // `round` is C's `roundf` (half away from zero); |x * id| <= 127 (up to rounding), so the
        // saturating `as i8` never saturates on finite input.
        let qs = std::array::from_fn(|i| (x[i] * id).round() as i8 as u8);
        BlockQ8_0 { d: f16_le_from(d), qs }
    }
}
