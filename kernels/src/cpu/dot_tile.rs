//! A tile of f32 rows dotted with many activation rows (a batch's weight-row products, once a few rows
//! are decoded), each product in [`dot`]'s operation order: bit for bit `dot(rows[r], xs[t])` for every
//! row `r` and token `t`.
//!
//! [`dot_each`](super::dot_each) streams every token's whole activation row past one weight row; with
//! hundreds of tokens those rows no longer fit in the core's caches, and every weight row reads them again
//! from memory. Here the products are cache-blocked the way a matrix product is: the tokens go in blocks
//! of [`TOKEN_BLOCK`], the row length in blocks of [`K_BLOCK`] values, and within one (token block,
//! column block) four tokens advance together through the column block of the tile's rows, four rows at a
//! time where the CPU has AVX-512 (an intrinsics kernel whose 16 products' lanes stay in registers) and
//! two at a time otherwise (each token's values loaded once for all of them), so the four tokens' slices
//! stay in L1 while the tile's rows pass. Each product's sixteen lane sums
//! are kept in memory between column blocks and resumed where they stopped, so every lane still receives
//! its products in increasing index, and the lanes are reduced by `dot`'s halving tree at the end: the
//! order, and with it every bit, is `dot`'s. Rust never fuses a multiply and an add, so the portable and
//! the AVX2 / AVX-512 builds of the loop give the same bits; the widest one the CPU has runs.

use super::real::LANES;

/// Tokens whose products advance together through one row: 4 x 16 lanes are 8 AVX2 registers (4
/// AVX-512 ones), leaving room for the row and the products.
const TOKENS_PER_PASS: usize = 4;

/// Values of a row per column block: the production rows (2048 values) in one block, so a product's lane
/// sums are resumed only for longer rows (the 4096-wide output projection). Four tokens' slices are then
/// 32 KiB, an L1 data cache, while two rows pass them at a time. Measured (`dot_tile_16x2048` bench, AMD
/// EPYC): with blocks of 256 values and one row per pass 15.1 and 14.1 G multiply-adds/s per core (16 and
/// 64 tokens; AVX2: 12.3, 13.2), with 2048 and two rows 24.3 and 21.5 (AVX2: 19.3, 18.2); larger blocks
/// alone, or two rows alone, gained nothing; four rows per pass in AVX-512 registers then 30.6 and 30.0.
/// A multiple of [`LANES`], so every block starts at lane 0.
const K_BLOCK: usize = 2048;

/// Tokens per token block: the lane sums of a 16-row tile's products with them are 64 KiB, held in L2
/// between column blocks.
const TOKEN_BLOCK: usize = 64;

/// Sixteen partial sums of one product.
type Lanes = [f32; LANES];

/// `out[r * n_tok + t] = dot(&rows[r * n..(r + 1) * n], &xs[t * n..(t + 1) * n])` for every row `r` of
/// `rows` and every token row `t` of `xs` (`n_tok = xs.len() / n`).
///
/// # Panics
/// If `rows` and `xs` are not whole rows of `n` values, or `out` does not hold one value per (row,
/// token).
pub fn dot_tile(rows: &[f32], xs: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        out.fill(0.0);
        return;
    }
    assert!(
        rows.len().is_multiple_of(n) && xs.len().is_multiple_of(n),
        "dot_tile: rows and xs must be whole rows of n values"
    );
    assert_eq!(out.len(), rows.len() / n * (xs.len() / n), "dot_tile: out must hold rows x tokens values");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above), the only requirement of the callee.
            return unsafe { dot_tile_avx512(rows, xs, n, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of the callee.
            return unsafe { dot_tile_avx2(rows, xs, n, out) };
        }
    }
    dot_tile_portable(rows, xs, n, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dot_tile_avx512(rows: &[f32], xs: &[f32], n: usize, out: &mut [f32]) {
    dot_tile_blocked(rows, xs, n, out, Some(add_products_4x4_avx512));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_tile_avx2(rows: &[f32], xs: &[f32], n: usize, out: &mut [f32]) {
    dot_tile_portable(rows, xs, n, out);
}

#[inline(always)]
fn dot_tile_portable(rows: &[f32], xs: &[f32], n: usize, out: &mut [f32]) {
    dot_tile_blocked(rows, xs, n, out, None);
}

/// A kernel adding four rows' products with [`TOKENS_PER_PASS`] tokens to their lanes, as
/// [`add_products`] adds each (the same products in the same order). `unsafe`: it may need CPU features
/// its caller checked.
type RowQuadKernel = unsafe fn([&[f32]; 4], [&[f32]; TOKENS_PER_PASS], [&mut [Lanes; TOKENS_PER_PASS]; 4]);

/// The blocked loop; with `quad`, rows go four at a time through it (the rest two at a time, then one).
///
/// # Safety (of `quad`)
/// `quad` is `Some` only where the CPU has what the kernel needs (`dot_tile` checks before passing it).
#[inline(always)]
fn dot_tile_blocked(rows: &[f32], xs: &[f32], n: usize, out: &mut [f32], quad_rows: Option<RowQuadKernel>) {
    let (n_rows, n_tok) = (rows.len() / n, xs.len() / n);
    let mut lanes = vec![[0.0f32; LANES]; n_rows * TOKEN_BLOCK.min(n_tok)];
    for t0 in (0..n_tok).step_by(TOKEN_BLOCK) {
        let tb = TOKEN_BLOCK.min(n_tok - t0);
        let lanes = &mut lanes[..n_rows * tb];
        lanes.fill([0.0; LANES]);
        for k0 in (0..n).step_by(K_BLOCK) {
            let k = k0..(k0 + K_BLOCK).min(n);
            let x = |t: usize| &xs[(t0 + t) * n..][k.clone()];
            let full = tb / TOKENS_PER_PASS * TOKENS_PER_PASS;
            for t in (0..full).step_by(TOKENS_PER_PASS) {
                let xq: [&[f32]; TOKENS_PER_PASS] = std::array::from_fn(|i| x(t + i));
                let w = |r: usize| &rows[r * n..][k.clone()];
                let mut r = 0;
                if let Some(kernel) = quad_rows {
                    // Four rows per pass: each token's chunk is loaded once for the four rows' products.
                    for group in lanes.chunks_exact_mut(4 * tb) {
                        let (ab, cd) = group.split_at_mut(2 * tb);
                        let ((a, b), (c, d)) = (ab.split_at_mut(tb), cd.split_at_mut(tb));
                        let lanes = [quad(a, t), quad(b, t), quad(c, t), quad(d, t)];
                        // SAFETY: `quad_rows` is `Some` only where the CPU has the kernel's features.
                        unsafe { kernel([w(r), w(r + 1), w(r + 2), w(r + 3)], xq, lanes) };
                        r += 4;
                    }
                }
                // Two rows per pass: each token's slice is loaded once for both rows' products.
                let mut pairs = lanes[r * tb..].chunks_exact_mut(2 * tb);
                for pair_lanes in pairs.by_ref() {
                    let (a, b) = pair_lanes.split_at_mut(tb);
                    add_products_rows([w(r), w(r + 1)], xq, [quad(a, t), quad(b, t)]);
                    r += 2;
                }
                let single = pairs.into_remainder();
                if !single.is_empty() {
                    add_products(w(r), xq, quad(single, t));
                }
            }
            for t in full..tb {
                for (r, row_lanes) in lanes.chunks_exact_mut(tb).enumerate() {
                    let w = &rows[r * n..][k.clone()];
                    add_products::<1>(
                        w,
                        [x(t)],
                        std::slice::from_mut(&mut row_lanes[t]).try_into().expect("one"),
                    );
                }
            }
        }
        for (r, row_lanes) in lanes.chunks_exact(tb).enumerate() {
            for (t, l) in row_lanes.iter().enumerate() {
                out[r * n_tok + t0 + t] = halving_sum(*l);
            }
        }
    }
}

/// Adds `w[i] * x[j][i]` to lane `i % 16` of `lanes[j]`, in increasing `i`, for the `J` tokens `x`
/// (`w` starts at a multiple of [`LANES`] of its row, so its index `i` has the row index's lane).
#[inline(always)]
fn add_products<const J: usize>(w: &[f32], x: [&[f32]; J], lanes: &mut [Lanes; J]) {
    let (w_chunks, w_rest) = w.as_chunks::<LANES>();
    let x_chunks: [&[[f32; LANES]]; J] = x.map(|x| x.as_chunks::<LANES>().0);
    let mut acc = *lanes;
    for (c, w) in w_chunks.iter().enumerate() {
        for (acc, x) in acc.iter_mut().zip(&x_chunks) {
            let x = &x[c];
            for l in 0..LANES {
                acc[l] += w[l] * x[l];
            }
        }
    }
    let tail = w_chunks.len() * LANES;
    for (acc, x) in acc.iter_mut().zip(&x) {
        for (l, (&w, &v)) in w_rest.iter().zip(&x[tail..]).enumerate() {
            acc[l] += w * v;
        }
    }
    *lanes = acc;
}

/// The [`TOKENS_PER_PASS`] lane sums of one row's products starting at token `t`.
#[inline(always)]
fn quad(row_lanes: &mut [Lanes], t: usize) -> &mut [Lanes; TOKENS_PER_PASS] {
    (&mut row_lanes[t..t + TOKENS_PER_PASS]).try_into().expect("four tokens")
}

/// [`add_products`] for two rows at once: each token's chunk is loaded once and multiplied with both
/// rows' chunks; each product's lanes receive exactly what `add_products` gives them, in the same order.
#[inline(always)]
fn add_products_rows<const J: usize>(w: [&[f32]; 2], x: [&[f32]; J], lanes: [&mut [Lanes; J]; 2]) {
    let (w0_chunks, w0_rest) = w[0].as_chunks::<LANES>();
    let w1_chunks = w[1].as_chunks::<LANES>().0;
    let x_chunks: [&[[f32; LANES]]; J] = x.map(|x| x.as_chunks::<LANES>().0);
    let [l0, l1] = lanes;
    let (mut acc0, mut acc1) = (*l0, *l1);
    for (c, (w0, w1)) in w0_chunks.iter().zip(w1_chunks).enumerate() {
        for j in 0..J {
            let x = &x_chunks[j][c];
            for l in 0..LANES {
                acc0[j][l] += w0[l] * x[l];
                acc1[j][l] += w1[l] * x[l];
            }
        }
    }
    let tail = w0_chunks.len() * LANES;
    for (j, x) in x.iter().enumerate() {
        for (l, (&w0, &v)) in w0_rest.iter().zip(&x[tail..]).enumerate() {
            acc0[j][l] += w0 * v;
        }
        for (l, (&w1, &v)) in w[1][tail..].iter().zip(&x[tail..]).enumerate() {
            acc1[j][l] += w1 * v;
        }
    }
    (*l0, *l1) = (acc0, acc1);
}

/// [`add_products`] for four rows at once with AVX-512: each token's chunk of 16 values is loaded once
/// into a register and multiplied with the four rows' chunks; the 16 products' lanes stay in registers
/// through the block. Each lane receives `w * x` (one rounded multiply, then one rounded add, never fused)
/// in increasing index, as `add_products` adds it, so the bits are the same.
///
/// # Safety
/// The CPU must support AVX-512F. Every row slice has the length of every token slice.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_products_4x4_avx512(
    w: [&[f32]; 4],
    x: [&[f32]; TOKENS_PER_PASS],
    lanes: [&mut [Lanes; TOKENS_PER_PASS]; 4],
) {
    use std::arch::x86_64::*;
    let len = w[0].len();
    debug_assert!(w.iter().all(|w| w.len() == len) && x.iter().all(|x| x.len() == len));
    let chunks = len / LANES;
    let mut acc = [[_mm512_setzero_ps(); TOKENS_PER_PASS]; 4];
    for (acc, lanes) in acc.iter_mut().zip(&lanes) {
        for (acc, lanes) in acc.iter_mut().zip(lanes.iter()) {
            // SAFETY: a `Lanes` is 16 f32.
            *acc = unsafe { _mm512_loadu_ps(lanes.as_ptr()) };
        }
    }
    for c in 0..chunks {
        let at = c * LANES;
        // SAFETY: chunk `c` of every slice is in bounds (`at + 16 <= len`, all slices `len` long).
        let xv: [__m512; TOKENS_PER_PASS] =
            std::array::from_fn(|j| unsafe { _mm512_loadu_ps(x[j].as_ptr().add(at)) });
        for (acc, w) in acc.iter_mut().zip(&w) {
            // SAFETY: as above.
            let wv = unsafe { _mm512_loadu_ps(w.as_ptr().add(at)) };
            for (acc, xv) in acc.iter_mut().zip(&xv) {
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(wv, *xv));
            }
        }
    }
    let tail = chunks * LANES;
    for ((acc, lanes), w) in acc.iter().zip(lanes).zip(&w) {
        for ((acc, lanes), x) in acc.iter().zip(lanes.iter_mut()).zip(&x) {
            // SAFETY: a `Lanes` is 16 f32.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *acc) };
            for (l, (&w, &v)) in w[tail..].iter().zip(&x[tail..]).enumerate() {
                lanes[l] += w * v;
            }
        }
    }
}

/// `dot`'s reduction: `lane[l] += lane[l + h]` for `l < h`, `h = 8, 4, 2, 1`; then `lane[0]`.
#[inline(always)]
fn halving_sum(mut lanes: Lanes) -> f32 {
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            lanes[l] += lanes[l + half];
        }
        half /= 2;
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::super::real::dot;
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn every_product_is_dot_bit_for_bit() {
        // Values over six binades, so a different order or a fused multiply-add changes low bits. Row
        // lengths below, at and across the column block (K_BLOCK) with and without a remainder of the 16
        // lanes; token counts covering passes of 4 with every remainder and more than one token block
        // (64); tiles of 1 to 9 rows (groups of four rows, pairs and a last single one).
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut value = || rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-3..3));
        for n in [1usize, 17, 256, 300, 513, K_BLOCK, K_BLOCK + 1, 2 * K_BLOCK + 40] {
            for n_rows in 1..10 {
                let rows: Vec<f32> = (0..n * n_rows).map(|_| value()).collect();
                for n_tok in [1usize, 3, 4, 7, 64, 70, 133] {
                    let xs: Vec<f32> = (0..n * n_tok).map(|_| value()).collect();
                    let mut out = vec![f32::NAN; n_rows * n_tok];
                    dot_tile(&rows, &xs, n, &mut out);
                    for r in 0..n_rows {
                        for t in 0..n_tok {
                            let want = dot(&rows[r * n..(r + 1) * n], &xs[t * n..(t + 1) * n]);
                            let got = out[r * n_tok + t];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "n {n}, {n_rows} rows, {n_tok} tokens: ({r}, {t})"
                            );
                        }
                    }
                }
            }
        }
    }
}
