//! The fixed-order f32 accumulation behind [`super::dot_row`].
//!
//! Weight `i` of a row times activation `i` is added to lane `i % LANES` of [`LANES`] f32 partial sums,
//! in increasing `i`; the lanes are reduced by a halving tree. The order is independent of the SIMD width:
//! lane `l` is one SIMD element whatever the register size, and Rust never contracts `a * b + c` into an
//! FMA, so the AVX2 build of the loop gives the same bits as the portable one.
//!
//! Each block is first decoded into a stack buffer of f32 weights (exactly the values
//! [`super::dequantize_row`] gives), then multiplied into the lanes; both loops are straight-line code
//! over fixed-size arrays that LLVM vectorises.

use super::k_common::QK_K;

/// Number of independent f32 partial sums.
pub(crate) const LANES: usize = 16;

/// A unit of a row that decodes to f32 weights: a quantised block, or a fixed-size chunk of a float row.
pub(crate) trait Decode: bytemuck::Pod {
    /// Weights per unit; a multiple of [`LANES`], at most [`QK_K`].
    const WEIGHTS: usize;

    /// Writes the unit's `WEIGHTS` weights to `out` (as ggml's `dequantize_row_*` computes them in f32).
    fn dequantize(&self, out: &mut [f32]);
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

    /// Reduces the lanes: `lane[l] += lane[l + h]` for `h = 8, 4, 2, 1`; returns `lane[0]`.
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

/// The accumulation loop for the baseline target features.
#[inline(always)]
pub(crate) fn accumulate_portable<B: Decode>(mut lanes: Lanes, row: &[u8], x: &[f32]) -> Lanes {
    let units: &[B] = bytemuck::cast_slice(row);
    let mut buf = [0.0f32; QK_K];
    let w = &mut buf[..B::WEIGHTS];
    for (unit, x) in units.iter().zip(x.chunks_exact(B::WEIGHTS)) {
        unit.dequantize(w);
        lanes.add_products(w, x);
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
        let w: Vec<f32> = (0..80).map(|i| (i as f32 * 0.37).sin() * 10f32.powi(i % 7 - 3)).collect();
        let x: Vec<f32> = (0..80).map(|i| (i as f32 * 1.3).cos()).collect();
        let mut lanes = Lanes::new();
        lanes.add_products(&w[..32], &x[..32]);
        lanes.add_aligned(&w[32..79], &x[32..79]);
        assert_eq!(lanes.sum().to_bits(), lane_sum_reference(&w[..79], &x[..79]).to_bits());
    }
}
