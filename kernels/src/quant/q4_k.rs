//! Q4_K: 256-weight super-blocks of 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min
//! (ggml `ggml-common.h` `block_q4_K`; `ggml-quants.c` `dequantize_row_q4_K`, `quantize_row_q4_K_ref`).
//!
//! Weight `l` of sub-block `j` is `d * sc_j * q - dmin * m_j` with `(sc_j, m_j)` from
//! [`unpack_scale_min_k4`]. The quants are stored by pairs of sub-blocks: for pair `p` (sub-blocks `2p` and
//! `2p + 1`), byte `qs[32p + l]` holds weight `l` of sub-block `2p` in its low nibble and weight `l` of
//! sub-block `2p + 1` in its high nibble.

use bytemuck::{Pod, Zeroable};

use super::dot::Decode;
use super::k_common::{
    K_SCALE_SIZE, QK_K, QkxSearch, make_qkx2_quants, nearest_int, pack_scale_min_k4, unpack_scale_min_k4,
};
use super::{Block, f16_le, f16_le_f64, f16_le_from};

/// Q4_K block, 144 bytes: `d` (f16) at 0, `dmin` (f16) at 2, `scales` (12 bytes, 6-bit scales and
/// mins) at 4, `qs` (128 bytes of 4-bit quants) at 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ4K {
    d: [u8; 2],
    dmin: [u8; 2],
    scales: [u8; K_SCALE_SIZE],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// The reference quantiser's scale search for Q4_K (`make_qkx2_quants(32, 15, ..., -1.f, 0.1f, 20)`).
const SEARCH: QkxSearch = QkxSearch { nmax: 15, rmin: -1.0, rdelta: 0.1, nstep: 20 };

impl Decode for BlockQ4K {
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
        let (qs, _) = self.qs.as_chunks::<32>();
        let (out, _) = out.as_chunks_mut::<64>();
        for (pair, (q, out)) in qs.iter().zip(out).enumerate() {
            let (d1, m1) = (d * f32::from(sc[2 * pair]), min * f32::from(m[2 * pair]));
            let (d2, m2) = (d * f32::from(sc[2 * pair + 1]), min * f32::from(m[2 * pair + 1]));
            for l in 0..32 {
                out[l] = d1 * f32::from(q[l] & 0xF) - m1;
                out[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
            }
        }
    }
}

/// [`Decode::dequantize`] of whole blocks with AVX-512 (16 weights per instruction): the same f32
/// operations in the same order (each quant converted exactly, times `d * sc`, minus `dmin * m`, each
/// product and difference rounded once, no FMA), so the same bits as the portable loop; the tests
/// compare the two on every nibble, scale and min.
///
/// # Safety
/// The CPU must support AVX-512F (and so AVX2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
pub(super) unsafe fn dequantize_blocks_avx512(blocks: &[BlockQ4K], out: &mut [[f32; QK_K]]) {
    use super::k_common::store_sub_block_avx512;
    use std::arch::x86_64::*;
    let nibble = _mm256_set1_epi8(0x0F);
    for (block, out) in blocks.iter().zip(out) {
        let (d, min) = (f16_le(block.d), f16_le(block.dmin));
        let (sc, m) = unpack_scale_min_k4(&block.scales);
        for pair in 0..QK_K / 64 {
            // SAFETY: `qs` holds 128 bytes, so bytes 32 * pair.. 32 * pair + 32 are in bounds.
            let q = unsafe { _mm256_loadu_si256(block.qs.as_ptr().add(32 * pair).cast()) };
            let lo = _mm256_and_si256(q, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), nibble);
            for (sub, quants) in [(2 * pair, lo), (2 * pair + 1, hi)] {
                let (scale, offset) = (d * f32::from(sc[sub]), min * f32::from(m[sub]));
                let out = &mut out.as_chunks_mut::<32>().0[sub];
                // SAFETY: this function's own target features are the callee's requirement.
                unsafe { store_sub_block_avx512(quants, scale, offset, out) };
            }
        }
    }
}

impl Block for BlockQ4K {
    fn dequantize_f64(&self, out: &mut [f64]) {
        let (d, min) = (f16_le_f64(self.d), f16_le_f64(self.dmin));
        let (sc, m) = unpack_scale_min_k4(&self.scales);
        for (pair, (q, out)) in self.qs.chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1, sc2, m2) = (sc[2 * pair], m[2 * pair], sc[2 * pair + 1], m[2 * pair + 1]);
            let (lo, hi) = out.split_at_mut(32);
            for ((q, lo), hi) in q.iter().zip(lo).zip(hi) {
                *lo = d * f64::from(sc1) * f64::from(q & 0xF) - min * f64::from(m1);
                *hi = d * f64::from(sc2) * f64::from(q >> 4) - min * f64::from(m2);
            }
        }
    }

    fn quantize(x: &[f32]) -> Self {
        let q = quantize_k4_k5(x, SEARCH);
        let mut qs = [0u8; QK_K / 2];
        for (pair, qs) in qs.chunks_exact_mut(32).enumerate() {
            let levels = &q.levels[64 * pair..64 * pair + 64];
            for (l, byte) in qs.iter_mut().enumerate() {
                *byte = levels[l] | (levels[l + 32] << 4);
            }
        }
        BlockQ4K { d: q.d, dmin: q.dmin, scales: q.scales, qs }
    }
}

/// The part of a Q4_K/Q5_K super-block the two reference quantisers compute identically.
pub(crate) struct QuantizedK4K5 {
    /// Super-block scale (f16, little-endian).
    pub(crate) d: [u8; 2],
    /// Super-block min scale (f16, little-endian).
    pub(crate) dmin: [u8; 2],
    /// Packed 6-bit scales and mins.
    pub(crate) scales: [u8; K_SCALE_SIZE],
    /// One level per weight, in `0..=search.nmax`.
    pub(crate) levels: [u8; QK_K],
}

/// The shared body of `quantize_row_q4_K_ref` and `quantize_row_q5_K_ref`: a scale and min per
/// sub-block by [`make_qkx2_quants`] (weights `sqrt(mean(x^2)) + |x|`), both quantised to 6 bits against
/// the largest, then every weight re-quantised against the stored (rounded) scales.
pub(crate) fn quantize_k4_k5(x: &[f32], search: QkxSearch) -> QuantizedK4K5 {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        (scales[j], mins[j]) = make_qkx2_quants(xs, &weights, &mut levels[32 * j..32 * j + 32], search);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // `as u8` wraps like C's conversion to `uint8_t` before the `MIN(63, ...)`.
    let ls: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_scale * scales[j]) as u8).min(63));
    let lm: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_min * mins[j]) as u8).min(63));
    let packed = pack_scale_min_k4(&ls, &lm);
    let d = f16_le_from(max_scale / 63.0);
    let dmin = f16_le_from(max_min / 63.0);

    let nmax = search.nmax;
    let (sc, m) = unpack_scale_min_k4(&packed);
    for j in 0..8 {
        let d = f16_le(d) * f32::from(sc[j]);
        if d == 0.0 {
            // ggml keeps the levels of the scale search for a sub-block whose stored scale is zero.
            continue;
        }
        let dm = f16_le(dmin) * f32::from(m[j]);
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    QuantizedK4K5 { d, dmin, scales: packed, levels }
}
