//! The legacy 32-weight formats Q4_0, Q5_0 and Q5_1 (ggml `ggml-common.h` `block_q4_0`, `block_q5_0`,
//! `block_q5_1`; `ggml-quants.c` `dequantize_row_q*` and `quantize_row_q*_ref`).
//!
//! In all three, byte `j` of `qs` holds weight `j` in its low nibble and weight `j + 16` in its high
//! nibble. Q5_0/Q5_1 keep the fifth bit of weight `i` in bit `i` of the little-endian u32 `qh`.

use bytemuck::{Pod, Zeroable};

use super::dot::Decode;
use super::{Block, f16_le, f16_le_f64, f16_le_from};

/// Weights per legacy block (ggml `QK4_0`, `QK5_0`, `QK5_1`).
const QK: usize = 32;

/// Q4_0 block, 18 bytes: `d` (f16) at 0, `qs` (16 bytes of 4-bit quants) at 2.
/// Weight `i` is `(q_i - 8) * d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ4_0 {
    d: [u8; 2],
    qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// Q5_0 block, 22 bytes: `d` (f16) at 0, `qh` (u32 of fifth bits) at 2, `qs` (low nibbles) at 6.
/// Weight `i` is `(q_i - 16) * d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ5_0 {
    d: [u8; 2],
    qh: [u8; 4],
    qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

/// Q5_1 block, 24 bytes: `d` (f16) at 0, `m` (f16) at 2, `qh` (u32 of fifth bits) at 4, `qs` at 8.
/// Weight `i` is `q_i * d + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ5_1 {
    d: [u8; 2],
    m: [u8; 2],
    qh: [u8; 4],
    qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);

/// The 5-bit quants of a Q5_0/Q5_1 block, in weight order: the low nibbles of `qs`, plus 16 where
/// bit `i` of `qh` is set.
#[inline(always)]
fn quants5(qh: [u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0x0F) | if qh & (1 << j) != 0 { 0x10 } else { 0 };
        q[j + QK / 2] = (qs[j] >> 4) | if qh & (1 << (j + QK / 2)) != 0 { 0x10 } else { 0 };
    }
    q
}

/// Packs 32 5-bit quants into `qh` and `qs` (ggml's bit placement).
fn pack_quants5(q: &[u8; QK]) -> ([u8; 4], [u8; QK / 2]) {
    let mut qh = 0u32;
    let mut qs = [0u8; QK / 2];
    for j in 0..QK / 2 {
        let (q0, q1) = (q[j], q[j + QK / 2]);
        qs[j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= u32::from((q0 & 0x10) >> 4) << j;
        qh |= u32::from((q1 & 0x10) >> 4) << (j + QK / 2);
    }
    (qh.to_le_bytes(), qs)
}

/// The value of largest magnitude (the first such, keeping its sign), as the symmetric reference
/// quantisers pick it.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Minimum and maximum of `x`, starting from `(f32::MAX, -f32::MAX)` as the reference quantisers do.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `1 / d`, or 0 when `d` is 0 (as the reference quantisers).
fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

impl Decode for BlockQ4_0 {
    const WEIGHTS: usize = QK;
    type Weights = [f32; QK];

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32; QK]) {
        let d = f16_le(self.d);
        for j in 0..QK / 2 {
            out[j] = (i32::from(self.qs[j] & 0x0F) - 8) as f32 * d;
            out[j + QK / 2] = (i32::from(self.qs[j] >> 4) - 8) as f32 * d;
        }
    }
}

impl Block for BlockQ4_0 {
    fn dequantize_f64(&self, out: &mut [f64]) {
        let d = f16_le_f64(self.d);
        let (lo, hi) = out.split_at_mut(QK / 2);
        for ((q, lo), hi) in self.qs.iter().zip(lo).zip(hi) {
            *lo = f64::from(i32::from(q & 0x0F) - 8) * d;
            *hi = f64::from(i32::from(q >> 4) - 8) * d;
        }
    }

    fn quantize(x: &[f32]) -> Self {
        let d = signed_absmax(x) / -8.0;
        let id = inverse_or_zero(d);
        let mut qs = [0u8; QK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            // `as i8` truncates toward zero like C's `(int8_t)` for the in-range values here.
            let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((x[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            *q = q0 | (q1 << 4);
        }
        BlockQ4_0 { d: f16_le_from(d), qs }
    }
}

impl Decode for BlockQ5_0 {
    const WEIGHTS: usize = QK;
    type Weights = [f32; QK];

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32; QK]) {
        let d = f16_le(self.d);
        for (q, out) in quants5(self.qh, &self.qs).iter().zip(out) {
            *out = (i32::from(*q) - 16) as f32 * d;
        }
    }
}

impl Block for BlockQ5_0 {
    fn dequantize_f64(&self, out: &mut [f64]) {
        let d = f16_le_f64(self.d);
        for (q, out) in quants5(self.qh, &self.qs).iter().zip(out) {
            *out = f64::from(i32::from(*q) - 16) * d;
        }
    }

    fn quantize(x: &[f32]) -> Self {
        let d = signed_absmax(x) / -16.0;
        let id = inverse_or_zero(d);
        let q: [u8; QK] = std::array::from_fn(|i| ((x[i] * id + 16.5) as i8).min(31) as u8);
        let (qh, qs) = pack_quants5(&q);
        BlockQ5_0 { d: f16_le_from(d), qh, qs }
    }
}

impl Decode for BlockQ5_1 {
    const WEIGHTS: usize = QK;
    type Weights = [f32; QK];

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32; QK]) {
        let (d, m) = (f16_le(self.d), f16_le(self.m));
        for (q, out) in quants5(self.qh, &self.qs).iter().zip(out) {
            *out = f32::from(*q) * d + m;
        }
    }
}

impl Block for BlockQ5_1 {
    fn dequantize_f64(&self, out: &mut [f64]) {
        let (d, m) = (f16_le_f64(self.d), f16_le_f64(self.m));
        for (q, out) in quants5(self.qh, &self.qs).iter().zip(out) {
            *out = f64::from(*q) * d + m;
        }
    }

    fn quantize(x: &[f32]) -> Self {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inverse_or_zero(d);
        // C's `(uint8_t)` of a value in 0..=31.5; `as u8` truncates the same way.
        let q: [u8; QK] = std::array::from_fn(|i| ((x[i] - min) * id + 0.5) as u8);
        let (qh, qs) = pack_quants5(&q);
        BlockQ5_1 { d: f16_le_from(d), m: f16_le_from(min), qh, qs }
    }
}
