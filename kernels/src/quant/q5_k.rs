//! Q5_K: Q4_K with a fifth bit per weight (ggml `ggml-common.h` `block_q5_K`; `ggml-quants.c`
//! `dequantize_row_q5_K`, `quantize_row_q5_K_ref`).
//!
//! Weight `l` of sub-block `j` is `d * sc_j * q - dmin * m_j`, `q` in `0..32`, `(sc_j, m_j)` from
//! [`unpack_scale_min_k4`]. The low 4 bits are stored as in Q4_K (pair `p` of sub-blocks shares bytes
//! `qs[32p..32p + 32]`, low nibble for sub-block `2p`, high for `2p + 1`); the fifth bit of weight `l` of
//! sub-block `j` is bit `j` of `qh[l]`.

use bytemuck::{Pod, Zeroable};

use super::dot::Decode;
use super::k_common::{K_SCALE_SIZE, QK_K, QkxSearch, unpack_scale_min_k4};
use super::q4_k::quantize_k4_k5;
use super::{Block, f16_le, f16_le_f64};

/// Q5_K block, 176 bytes: `d` (f16) at 0, `dmin` (f16) at 2, `scales` (12 bytes) at 4, `qh` (32 bytes
/// of fifth bits) at 16, `qs` (128 bytes of low nibbles) at 48.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ5K {
    d: [u8; 2],
    dmin: [u8; 2],
    scales: [u8; K_SCALE_SIZE],
    qh: [u8; QK_K / 8],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// The reference quantiser's scale search for Q5_K (`make_qkx2_quants(32, 31, ..., -0.5f, 0.1f, 15)`).
const SEARCH: QkxSearch = QkxSearch { nmax: 31, rmin: -0.5, rdelta: 0.1, nstep: 15 };

impl BlockQ5K {
    /// The 5-bit quants of sub-blocks `2 * pair` and `2 * pair + 1`: the nibbles of
    /// `qs[32 * pair..][..32]` plus 16 where bit `2 * pair` (resp. `2 * pair + 1`) of `qh[l]` is set.
    #[inline(always)]
    fn pair_quants(&self, pair: usize) -> ([u8; 32], [u8; 32]) {
        let (u1, u2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
        let qs = &self.qs.as_chunks::<32>().0[pair];
        let (mut lo, mut hi) = ([0u8; 32], [0u8; 32]);
        for l in 0..32 {
            lo[l] = (qs[l] & 0xF) + if self.qh[l] & u1 != 0 { 16 } else { 0 };
            hi[l] = (qs[l] >> 4) + if self.qh[l] & u2 != 0 { 16 } else { 0 };
        }
        (lo, hi)
    }
}

impl Decode for BlockQ5K {
    const WEIGHTS: usize = QK_K;
    type Weights = [f32; QK_K];

    #[cfg(target_arch = "x86_64")]
    unsafe fn dequantize_avx512(units: &[Self], out: &mut [[f32; QK_K]]) {
        // SAFETY: the caller guarantees AVX-512F and AVX2, the decoder's requirement.
        unsafe { dequantize_blocks_avx512(units, out) }
    }

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32; QK_K]) {
        let (d, min) = (f16_le(self.d), f16_le(self.dmin));
        let (sc, m) = unpack_scale_min_k4(&self.scales);
        let (out, _) = out.as_chunks_mut::<64>();
        for (pair, out) in out.iter_mut().enumerate() {
            let (d1, m1) = (d * f32::from(sc[2 * pair]), min * f32::from(m[2 * pair]));
            let (d2, m2) = (d * f32::from(sc[2 * pair + 1]), min * f32::from(m[2 * pair + 1]));
            let (q_lo, q_hi) = self.pair_quants(pair);
            for l in 0..32 {
                out[l] = d1 * f32::from(q_lo[l]) - m1;
                out[l + 32] = d2 * f32::from(q_hi[l]) - m2;
            }
        }
    }
}

/// [`Decode::dequantize`] of whole blocks with AVX-512 (16 weights per instruction): the 5-bit quants
/// assembled from the nibbles and `qh`, converted exactly, times `d * sc`, minus `dmin * m`, each product
/// and difference rounded once, as the portable loop computes them, so the same bits (tested against it).
///
/// # Safety
/// The CPU must support AVX-512F (and so AVX2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
pub(super) unsafe fn dequantize_blocks_avx512(blocks: &[BlockQ5K], out: &mut [[f32; QK_K]]) {
    use super::k_common::store_sub_block_avx512;
    use std::arch::x86_64::*;
    let (nibble, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
    for (block, out) in blocks.iter().zip(out) {
        let (d, min) = (f16_le(block.d), f16_le(block.dmin));
        let (sc, m) = unpack_scale_min_k4(&block.scales);
        // SAFETY: `qh` holds 32 bytes.
        let qh = unsafe { _mm256_loadu_si256(block.qh.as_ptr().cast()) };
        for pair in 0..QK_K / 64 {
            // SAFETY: `qs` holds 128 bytes, so bytes 32 * pair.. 32 * pair + 32 are in bounds.
            let q = unsafe { _mm256_loadu_si256(block.qs.as_ptr().add(32 * pair).cast()) };
            let nibbles = [_mm256_and_si256(q, nibble), _mm256_and_si256(_mm256_srli_epi16::<4>(q), nibble)];
            for (i, low) in nibbles.into_iter().enumerate() {
                let sub = 2 * pair + i;
                // Bit `sub` of each `qh[l]`, as 16: shifted and masked within its byte (no bit crosses).
                let shift = _mm_cvtsi32_si128(sub as i32);
                let fifth = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srl_epi16(qh, shift), one));
                let quants = _mm256_or_si256(low, fifth);
                let (scale, offset) = (d * f32::from(sc[sub]), min * f32::from(m[sub]));
                let out = &mut out.as_chunks_mut::<32>().0[sub];
                // SAFETY: this function's own target features are the callee's requirement.
                unsafe { store_sub_block_avx512(quants, scale, offset, out) };
            }
        }
    }
}

impl Block for BlockQ5K {
    fn dequantize_f64(&self, out: &mut [f64]) {
        let (d, min) = (f16_le_f64(self.d), f16_le_f64(self.dmin));
        let (sc, m) = unpack_scale_min_k4(&self.scales);
        for (pair, out) in out.chunks_exact_mut(64).enumerate() {
            let (sc1, m1, sc2, m2) = (sc[2 * pair], m[2 * pair], sc[2 * pair + 1], m[2 * pair + 1]);
            let (q_lo, q_hi) = self.pair_quants(pair);
            let (lo, hi) = out.split_at_mut(32);
            for (q, lo) in q_lo.iter().zip(lo) {
                *lo = d * f64::from(sc1) * f64::from(*q) - min * f64::from(m1);
            }
            for (q, hi) in q_hi.iter().zip(hi) {
                *hi = d * f64::from(sc2) * f64::from(*q) - min * f64::from(m2);
            }
        }
    }

    fn quantize(x: &[f32]) -> Self {
        let q = quantize_k4_k5(x, SEARCH);
        let mut qh = [0u8; QK_K / 8];
        let mut qs = [0u8; QK_K / 2];
        for (pair, qs) in qs.chunks_exact_mut(32).enumerate() {
            let (m1, m2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
            let levels = &q.levels[64 * pair..64 * pair + 64];
            for l in 0..32 {
                let (mut l1, mut l2) = (levels[l], levels[l + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[l] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[l] |= m2;
                }
                qs[l] = l1 | (l2 << 4);
            }
        }
        BlockQ5K { d: q.d, dmin: q.dmin, scales: q.scales, qh, qs }
    }
}
