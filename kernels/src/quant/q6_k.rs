//! Q6_K: 256-weight super-blocks of 16 sub-blocks of 16, each with an 8-bit signed scale, 6-bit quants
//! (ggml `ggml-common.h` `block_q6_K`; `ggml-quants.c` `dequantize_row_q6_K`, `quantize_row_q6_K_ref`).
//!
//! Weight `i` (sub-block `i / 16`) is `d * scales[i / 16] * (q_i - 32)`. The super-block is stored as two
//! halves of 128 weights; in half `h`, for `l` in `0..32`, with `ql = ql[64h..]` and `qh = qh[32h..]`:
//! weight `128h + l` has low bits `ql[l] & 0xF` and high bits `qh[l] & 3`; weight `128h + 32 + l` has
//! `ql[l + 32] & 0xF` and `(qh[l] >> 2) & 3`; weight `128h + 64 + l` has `ql[l] >> 4` and
//! `(qh[l] >> 4) & 3`; weight `128h + 96 + l` has `ql[l + 32] >> 4` and `qh[l] >> 6`.

use bytemuck::{Pod, Zeroable};

use super::dot::Decode;
use super::k_common::{GROUP_MAX_EPS, QK_K, make_qx_quants, nearest_int};
use super::{Block, f16_le, f16_le_f64, f16_le_from};

/// Q6_K block, 210 bytes: `ql` (128 bytes, low 4 bits) at 0, `qh` (64 bytes, high 2 bits) at 128,
/// `scales` (16 × i8) at 192, `d` (f16) at 208.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ6K {
    ql: [u8; QK_K / 2],
    qh: [u8; QK_K / 4],
    scales: [u8; QK_K / 16],
    d: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

impl BlockQ6K {
    /// The signed 6-bit quants (`q - 32`, in `-32..32`) of half `h` (weights `128h..128h + 128`).
    #[inline(always)]
    fn half_quants(&self, h: usize) -> [i8; 128] {
        let ql = &self.ql.as_chunks::<64>().0[h];
        let qh = &self.qh.as_chunks::<32>().0[h];
        let mut q = [0i8; 128];
        for l in 0..32 {
            q[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            q[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            q[l + 96] = ((ql[l + 32] >> 4) | ((qh[l] >> 6) << 4)) as i8 - 32;
        }
        q
    }
}

impl Decode for BlockQ6K {
    const WEIGHTS: usize = QK_K;
    type Weights = [f32; QK_K];

    #[cfg(target_arch = "x86_64")]
    unsafe fn dequantize_avx512(units: &[Self], out: &mut [[f32; QK_K]]) {
        // SAFETY: the caller guarantees AVX-512F and AVX2, the decoder's requirement.
        unsafe { dequantize_blocks_avx512(units, out) }
    }

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = f16_le(self.d);
        let (out, _) = out.as_chunks_mut::<128>();
        for (h, out) in out.iter_mut().enumerate() {
            let q = self.half_quants(h);
            let (q, _) = q.as_chunks::<16>();
            let (out, _) = out.as_chunks_mut::<16>();
            for s in 0..8 {
                // ggml computes `d * sc * q` left to right: `(d * sc) * q`.
                let dsc = d * f32::from(self.scales[8 * h + s] as i8);
                for l in 0..16 {
                    out[s][l] = dsc * f32::from(q[s][l]);
                }
            }
        }
    }
}

/// [`Decode::dequantize`] of whole blocks with AVX-512 (16 weights per instruction): the same f32
/// operations in the same order (each signed quant converted exactly, times `d * scale`, rounded once),
/// so the same bits as the portable loop; the tests compare the two on every quant and scale.
///
/// # Safety
/// The CPU must support AVX-512F (and so AVX2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
pub(super) unsafe fn dequantize_blocks_avx512(blocks: &[BlockQ6K], out: &mut [[f32; QK_K]]) {
    use std::arch::x86_64::*;
    let (low4, low2, bias) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3), _mm256_set1_epi8(32));
    for (block, out) in blocks.iter().zip(out) {
        let d = f16_le(block.d);
        for h in 0..2 {
            // SAFETY: `ql` holds 128 bytes and `qh` 64: bytes 64h..64h + 64 and 32h..32h + 32 are in bounds.
            let (ql0, ql1, qh) = unsafe {
                (
                    _mm256_loadu_si256(block.ql.as_ptr().add(64 * h).cast()),
                    _mm256_loadu_si256(block.ql.as_ptr().add(64 * h + 32).cast()),
                    _mm256_loadu_si256(block.qh.as_ptr().add(32 * h).cast()),
                )
            };
            // The four runs of 32 weights of the half (module docs), as `q - 32` in signed bytes. The 16-bit
            // shifts move no set bit across a byte: each operand is masked to its field first or after.
            let high = |shift: __m256i| {
                _mm256_slli_epi16::<4>(_mm256_and_si256(
                    _mm256_srl_epi16(qh, _mm256_castsi256_si128(shift)),
                    low2,
                ))
            };
            let runs = [
                _mm256_or_si256(_mm256_and_si256(ql0, low4), high(_mm256_set1_epi64x(0))),
                _mm256_or_si256(_mm256_and_si256(ql1, low4), high(_mm256_set1_epi64x(2))),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                    high(_mm256_set1_epi64x(4)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                    high(_mm256_set1_epi64x(6)),
                ),
            ];
            for (r, run) in runs.into_iter().enumerate() {
                let run = _mm256_sub_epi8(run, bias);
                for (half, bytes) in
                    [_mm256_castsi256_si128(run), _mm256_extracti128_si256::<1>(run)].into_iter().enumerate()
                {
                    // Sub-block s of the half: 16 weights from 128h + 16s, scale `scales[8h + s]`.
                    let s = 2 * r + half;
                    // ggml computes `d * sc * q` left to right: `(d * sc) * q`.
                    let dsc = _mm512_set1_ps(d * f32::from(block.scales[8 * h + s] as i8));
                    let w = _mm512_mul_ps(dsc, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
                    // SAFETY: weights 128h + 16s.. 128h + 16s + 16 are in the 256 of `out`.
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(128 * h + 16 * s), w) };
                }
            }
        }
    }
}

impl Block for BlockQ6K {
    fn dequantize_f64(&self, out: &mut [f64]) {
        let d = f16_le_f64(self.d);
        for (h, out) in out.chunks_exact_mut(128).enumerate() {
            let q = self.half_quants(h);
            for (s, (q, out)) in q.chunks_exact(16).zip(out.chunks_exact_mut(16)).enumerate() {
                let sc = f64::from(self.scales[8 * h + s] as i8);
                for (q, out) in q.iter().zip(out) {
                    *out = d * sc * f64::from(*q);
                }
            }
        }
    }

    fn quantize(x: &[f32]) -> Self {
        let mut levels = [0i8; QK_K];
        let mut scales = [0.0f32; QK_K / 16];
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for (ib, scale) in scales.iter_mut().enumerate() {
            let range = 16 * ib..16 * ib + 16;
            *scale = make_qx_quants(&x[range.clone()], &mut levels[range], 32);
            if scale.abs() > max_abs_scale {
                max_abs_scale = scale.abs();
                max_scale = *scale;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            return BlockQ6K::zeroed();
        }

        let iscale = -128.0 / max_scale;
        let d = f16_le_from(1.0 / iscale);
        // `as i8` wraps like C's conversion to `int8_t` (values are in -128..=127 here).
        let block_scales: [i8; QK_K / 16] =
            std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
        for (j, sc) in block_scales.iter().enumerate() {
            let d = f16_le(d) * f32::from(*sc);
            if d == 0.0 {
                // ggml keeps the levels of the scale search for a sub-block whose stored scale is zero.
                continue;
            }
            for i in 16 * j..16 * j + 16 {
                levels[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as i8;
            }
        }

        let mut ql = [0u8; QK_K / 2];
        let mut qh = [0u8; QK_K / 4];
        for h in 0..2 {
            let levels = &levels[128 * h..128 * h + 128];
            let (ql, qh) = (&mut ql[64 * h..64 * h + 64], &mut qh[32 * h..32 * h + 32]);
            for l in 0..32 {
                let [q1, q2, q3, q4] = [0, 32, 64, 96].map(|o| levels[l + o] as u8);
                ql[l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        BlockQ6K { ql, qh, scales: block_scales.map(|s| s as u8), d }
    }
}
