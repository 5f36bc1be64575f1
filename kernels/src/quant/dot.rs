//! The fixed-order f32 accumulation behind [`super::dot_row`].
//!
//! Weight `i` of a row times activation `i` is added to lane `i % LANES` of [`LANES`] f32 partial sums,
//! in increasing `i`; the lanes are reduced by a halving tree. The order is independent of the SIMD width:
//! lane `l` is one SIMD element whatever the register size, and Rust never contracts `a * b + c` into an
//! FMA, so the AVX2 build of the loop gives the same bits as the portable one.
//!
//! Why 16 lanes: the definition `cpu::real::dot` shares for activations, so a decoded row dotted there
//! equals `dot_row` bit for bit. A CUDA kernel can follow the same order exactly with 16 threads per row
//! (thread `t` sums the elements `i ≡ t (mod 16)`, then a shuffle-xor reduction by 8, 4, 2, 1 yields the
//! halving tree's `lane[0]`, IEEE addition being commutative). Measured: 32 lanes were no faster, the
//! decoding dominates.
//!
//! Each block is first decoded into a stack buffer of f32 weights (exactly the values
//! [`super::dequantize_row`] gives), then multiplied into the lanes; both loops are straight-line code
//! over fixed-size arrays that LLVM vectorises.

use bytemuck::Zeroable;

/// Number of independent f32 partial sums.
pub(crate) const LANES: usize = 16;

/// A unit of a row that decodes to f32 weights: a quantised block, or a fixed-size chunk of a float row.
pub(crate) trait Decode: bytemuck::Pod {
    /// Weights per unit; a multiple of [`LANES`].
    const WEIGHTS: usize;

    /// `[f32; WEIGHTS]`: a fixed-size array, so the decoders compile to straight-line vector code.
    type Weights: bytemuck::Pod;

    /// Writes the unit's weights to `out` (as ggml's `dequantize_row_*` computes them in f32).
    fn dequantize(&self, out: &mut Self::Weights);

    /// [`Decode::dequantize`] of every unit of `units` into `out`, with an AVX-512 decoder where the type
    /// has one (Q4_K, Q6_K: the same bits); the portable loop otherwise.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX2.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dequantize_avx512(units: &[Self], out: &mut [Self::Weights]) {
        for (unit, out) in units.iter().zip(out) {
            unit.dequantize(out);
        }
    }
}

/// Whether this CPU runs the AVX-512 decoders of [`Decode::dequantize_avx512`]: AVX-512F and AVX2.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx2")
}

/// [`LANES`] f32 partial sums.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lanes([f32; LANES]);

impl Lanes {
    /// All lanes zero.
    pub(crate) const fn new() -> Lanes {
        Lanes([0.0; LANES])
    }

    /// Adds `w[k] * x[k]` to lane `k % LANES`, in increasing `k`. `w` and `x` have the same length, a
    /// multiple of [`LANES`] (any remainder is ignored).
    #[inline(always)]
    fn add_products(&mut self, w: &[f32], x: &[f32]) {
        let (w, _) = w.as_chunks::<LANES>();
        let (x, _) = x.as_chunks::<LANES>();
        for (w, x) in w.iter().zip(x) {
            for l in 0..LANES {
                self.0[l] += w[l] * x[l];
            }
        }
    }

    /// Adds `w[k] * x[k]` to lane `k % LANES`, in increasing `k`, for any length (the part of a row
    /// given starts at a multiple of [`LANES`]).
    pub(crate) fn add_aligned(&mut self, w: &[f32], x: &[f32]) {
        debug_assert_eq!(w.len(), x.len());
        let split = w.len() / LANES * LANES;
        self.add_products(&w[..split], &x[..split]);
        for ((lane, w), x) in self.0.iter_mut().zip(&w[split..]).zip(&x[split..]) {
            *lane += w * x;
        }
    }

    /// Reduces the lanes: `lane[l] += lane[l + h]` for `l < h`, for `h = 8, 4, 2, 1`; returns `lane[0]`.
    pub(crate) fn sum(self) -> f32 {
        let mut lanes = self.0;
        let mut half = LANES / 2;
        while half > 0 {
            for l in 0..half {
                lanes[l] += lanes[l + half];
            }
            half /= 2;
        }
        lanes[0]
    }
}

/// Dot product of a row of whole units of type `B` with `x` (`x.len()` is the row's weight count).
pub(crate) fn dot_blocks<B: Decode>(row: &[u8], x: &[f32]) -> f32 {
    accumulate::<B>(Lanes::new(), row, x).sum()
}

/// Adds the products of a row of whole units of type `B` with `x` to `lanes`, with the widest SIMD
/// this CPU has (the result does not depend on which).
pub(crate) fn accumulate<B: Decode>(lanes: Lanes, row: &[u8], x: &[f32]) -> Lanes {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of the callee.
            return unsafe { accumulate_avx2::<B>(lanes, row, x) };
        }
    }
    accumulate_portable::<B>(lanes, row, x)
}

/// [`accumulate_portable`] compiled for AVX2 (256-bit registers: two per 16 lanes instead of four).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn accumulate_avx2<B: Decode>(lanes: Lanes, row: &[u8], x: &[f32]) -> Lanes {
    accumulate_portable::<B>(lanes, row, x)
}

/// The f32 values of a `[f32; N]`.
#[inline(always)]
fn as_f32s<W: bytemuck::Pod>(w: &W) -> &[f32] {
    bytemuck::cast_slice(std::slice::from_ref(w))
}

/// The accumulation loop for the baseline target features.
#[inline(always)]
pub(crate) fn accumulate_portable<B: Decode>(mut lanes: Lanes, row: &[u8], x: &[f32]) -> Lanes {
    let units: &[B] = bytemuck::cast_slice(row);
    let x: &[B::Weights] = bytemuck::cast_slice(x);
    let mut w = B::Weights::zeroed();
    for (unit, x) in units.iter().zip(x) {
        unit.dequantize(&mut w);
        lanes.add_products(as_f32s(&w), as_f32s(x));
    }
    lanes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane definition, written as plainly as possible.
    fn lane_sum_reference(w: &[f32], x: &[f32]) -> f32 {
        let mut lanes = [0.0f32; LANES];
        for (i, (w, x)) in w.iter().zip(x).enumerate() {
            lanes[i % LANES] += w * x;
        }
        for half in [8, 4, 2, 1] {
            for l in 0..half {
                lanes[l] += lanes[l + half];
            }
        }
        lanes[0]
    }

    #[test]
    fn lanes_follow_the_documented_order() {
        // Values whose sums depend on the order (mixed magnitudes), so a different order shows.
        let w: Vec<f32> = (0..150).map(|i| (i as f32 * 0.37).sin() * 10f32.powi(i % 7 - 3)).collect();
        let x: Vec<f32> = (0..150).map(|i| (i as f32 * 1.3).cos()).collect();
        let mut lanes = Lanes::new();
        lanes.add_products(&w[..64], &x[..64]);
        lanes.add_aligned(&w[64..143], &x[64..143]);
        assert_eq!(lanes.sum().to_bits(), lane_sum_reference(&w[..143], &x[..143]).to_bits());
    }

    /// Rows of `ty` quantised from a deterministic signal, with activations of mixed magnitude.
    fn row_and_x(ty: crate::GgmlType, n: usize) -> (Vec<u8>, Vec<f32>) {
        let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.61).sin() * (1.0 + (i % 13) as f32)).collect();
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.29).cos() * 10f32.powi(i as i32 % 5 - 2)).collect();
        let mut row = vec![0u8; ty.row_bytes(n).unwrap()];
        crate::quant::quantize_row(ty, &values, &mut row);
        (row, x)
    }

    fn simd_matches_portable<B: Decode>(ty: crate::GgmlType) {
        let (row, x) = row_and_x(ty, 2048);
        let simd = accumulate::<B>(Lanes::new(), &row, &x);
        let portable = accumulate_portable::<B>(Lanes::new(), &row, &x);
        assert_eq!(simd.0.map(f32::to_bits), portable.0.map(f32::to_bits), "{ty}");
    }

    #[test]
    fn simd_and_portable_paths_agree_bit_for_bit() {
        use crate::GgmlType;
        use crate::quant::{float, legacy, q4_k, q5_k, q6_k, q8_0};
        simd_matches_portable::<float::ChunkF32>(GgmlType::F32);
        simd_matches_portable::<float::ChunkF16>(GgmlType::F16);
        simd_matches_portable::<float::ChunkBF16>(GgmlType::BF16);
        simd_matches_portable::<legacy::BlockQ4_0>(GgmlType::Q4_0);
        simd_matches_portable::<legacy::BlockQ5_0>(GgmlType::Q5_0);
        simd_matches_portable::<legacy::BlockQ5_1>(GgmlType::Q5_1);
        simd_matches_portable::<q8_0::BlockQ8_0>(GgmlType::Q8_0);
        simd_matches_portable::<q4_k::BlockQ4K>(GgmlType::Q4_K);
        simd_matches_portable::<q5_k::BlockQ5K>(GgmlType::Q5_K);
        simd_matches_portable::<q6_k::BlockQ6K>(GgmlType::Q6_K);
    }
}
