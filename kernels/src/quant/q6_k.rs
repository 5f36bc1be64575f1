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
