//! What the K-quants share (ggml `ggml-quants.c`, "2-6 bit quantization in super-blocks"): the
//! super-block size, the 6-bit packing of Q4_K/Q5_K scales and mins (`get_scale_min_k4`), ggml's
//! rounding (`nearest_int`), and the two scale searches of the reference quantisers
//! (`make_qkx2_quants` for Q4_K/Q5_K, `make_qx_quants` for Q6_K).
//!
//! The searches repeat ggml's f32 arithmetic operation by operation (same association, no FMA), so the
//! chosen scales and quants are the ones llama.cpp chooses.

/// Weights per K-quant super-block (ggml `QK_K`).
pub(crate) const QK_K: usize = 256;

/// Bytes of the packed scales and mins of Q4_K/Q5_K (ggml `K_SCALE_SIZE`).
pub(crate) const K_SCALE_SIZE: usize = 12;

/// Below this magnitude a group counts as all zero (ggml `GROUP_MAX_EPS`).
pub(crate) const GROUP_MAX_EPS: f32 = 1e-15;

/// Writes one 32-weight sub-block of a Q4_K/Q5_K super-block with AVX-512: weight `l` is
/// `scale * q[l] - offset` for the unsigned quant in byte `l` of `quants`, the product and the difference
/// each rounded once (no FMA), as the portable decoders compute it.
///
/// # Safety
/// The CPU must support AVX-512F and AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[inline]
pub(crate) unsafe fn store_sub_block_avx512(
    quants: std::arch::x86_64::__m256i,
    scale: f32,
    offset: f32,
    out: &mut [f32; 32],
) {
    use std::arch::x86_64::*;
    let (scale, offset) = (_mm512_set1_ps(scale), _mm512_set1_ps(offset));
    let halves = [_mm256_castsi256_si128(quants), _mm256_extracti128_si256::<1>(quants)];
    for (bytes, out) in halves.into_iter().zip(out.as_chunks_mut::<16>().0) {
        let w = _mm512_sub_ps(_mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes))), offset);
        // SAFETY: `out` is 16 f32.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), w) };
    }
}

/// The 6-bit scales and 6-bit mins of the eight sub-blocks of a Q4_K/Q5_K super-block.
///
/// Layout of the 12 bytes `q` (ggml `get_scale_min_k4`): for `j < 4`, scale `j` is the low 6 bits of
/// `q[j]` and min `j` the low 6 bits of `q[j + 4]`; for `j >= 4`, scale `j` has the low nibble of
/// `q[j + 4]` as its low 4 bits and the top 2 bits of `q[j - 4]` as its high 2 bits, and min `j` has the
/// high nibble of `q[j + 4]` and the top 2 bits of `q[j]`.
#[inline(always)]
pub(crate) fn unpack_scale_min_k4(q: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    let (mut scales, mut mins) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        scales[j] = q[j] & 63;
        mins[j] = q[j + 4] & 63;
    }
    for j in 4..8 {
        scales[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        mins[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
    (scales, mins)
}

/// Packs eight 6-bit scales and mins into the 12-byte layout [`unpack_scale_min_k4`] reads (values above 63
/// lose their high bits, as in ggml).
pub(crate) fn pack_scale_min_k4(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut q = [0u8; K_SCALE_SIZE];
    for j in 0..8 {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            q[j] = ls;
            q[j + 4] = lm;
        } else {
            q[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            q[j - 4] |= (ls >> 4) << 6;
            q[j] |= (lm >> 4) << 6;
        }
    }
    q
}

/// ggml's `nearest_int`: round to nearest, ties to even, for `|v| <= 4194303` (2^22 - 1), by adding
/// 1.5 * 2^23 and reading the mantissa bits. Outside that range it returns what ggml's does (ggml only
/// asserts the range in debug builds), so out-of-range inputs still give llama.cpp's bytes.
#[inline(always)]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits();
    (bits & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Parameters of [`make_qkx2_quants`]: quant levels `0..=nmax`, and the `nstep + 1` inverse scales
/// tried, `(nmax + rmin + rdelta * is) / (max - min)` for `is = 0..=nstep`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QkxSearch {
    pub(crate) nmax: i32,
    pub(crate) rmin: f32,
    pub(crate) rdelta: f32,
    pub(crate) nstep: i32,
}

/// ggml's `make_qkx2_quants` with `use_mad = false`: fits `x ~ scale * l - the_min` with integer
/// levels `l` in `0..=nmax` minimising the weighted squared error, trying several scales and a
/// least-squares refit for each. Writes the levels to `levels` and returns `(scale, the_min)`
/// (`the_min >= 0`).
pub(crate) fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    search: QkxSearch,
) -> (f32, f32) {
    let n = x.len();
    debug_assert!(weights.len() == n && levels.len() == n && n <= 32);
    let nmax = search.nmax;

    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }

    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if search.nstep < 1 {
        return (scale, -min);
    }

    let mut aux = [0u8; 32];
    for is in 0..=search.nstep {
        iscale = (search.rmin + search.rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels.copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (what Q6_K's reference
/// quantiser uses): fits `x ~ scale * (l - nmax)` with levels `l` in `0..2 * nmax`, weighting each value
/// by `x^2`, trying 19 inverse scales around `-nmax / max`. Writes the levels to `levels` and returns
/// the scale (signed: the value of largest magnitude maps to level 0).
pub(crate) fn make_qx_quants(x: &[f32], levels: &mut [i8], nmax: i32) -> f32 {
    let n = x.len();
    debug_assert!(levels.len() == n);

    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }

    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Sums of `w * x * l` and `w * l * l` with `w = x * x`, in ggml's association.
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let write_levels = |iscale: f32, levels: &mut [i8]| {
        for (out, &v) in levels.iter_mut().zip(x) {
            *out = (nmax + level(iscale, v)) as i8;
        }
    };

    let iscale = -(nmax as f32) / max;
    write_levels(iscale, levels);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            write_levels(iscale, levels);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        let cases = [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (3.4999, 3), (-7.6, -8), (0.0, 0)];
        for (v, want) in cases {
            assert_eq!(nearest_int(v), want, "nearest_int({v})");
        }
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
        assert_eq!(nearest_int(-4_194_303.0), -4_194_303);
    }

    #[test]
    fn scale_min_packing_round_trips_all_six_bit_values() {
        for base in 0..64usize {
            let scales: [u8; 8] = std::array::from_fn(|j| ((base + 7 * j) % 64) as u8);
            let mins: [u8; 8] = std::array::from_fn(|j| ((base * 3 + 11 * j) % 64) as u8);
            assert_eq!(unpack_scale_min_k4(&pack_scale_min_k4(&scales, &mins)), (scales, mins));
        }
    }
}
