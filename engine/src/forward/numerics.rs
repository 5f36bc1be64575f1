//! What a backend must supply to run the shared Qwen3-MoE forward: a float type and the two operations
//! that touch quantised weights (a batched matrix-vector product and a row dequantisation). Everything
//! else (norms, RoPE, attention, routing, SwiGLU) is `moe_kernels::cpu`, generic over the float type.

use moe_kernels::GgmlType;
use moe_kernels::cpu::Real;

use crate::trace::Precision;
use crate::weights::WeightTensor;

/// A 2-D view of weight rows in their stored format: `rows` rows of `cols` weights, each `row_bytes` long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub ty: GgmlType,
    pub cols: usize,
    pub rows: usize,
    row_bytes: usize,
    data: &'a [u8],
}

impl<'a> Mat<'a> {
    /// A whole tensor as a matrix (a 1-D tensor is one row; a 3-D tensor stacks its slices).
    pub fn of(w: &'a WeightTensor) -> Self {
        Self { ty: w.ty, cols: w.row_len(), rows: w.n_rows(), row_bytes: w.row_bytes(), data: w.bytes() }
    }

    /// Slice `e` of a 3-D expert tensor `[n_expert][rows][cols]` (ggml dims `[cols, rows, n_expert]`).
    pub fn expert(w: &'a WeightTensor, e: usize) -> Self {
        let rows = w.dims.get(1).copied().unwrap_or(1);
        let row_bytes = w.row_bytes();
        let size = rows * row_bytes;
        Self { ty: w.ty, cols: w.row_len(), rows, row_bytes, data: &w.bytes()[e * size..(e + 1) * size] }
    }

    /// The stored bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// The arithmetic of one backend.
pub(crate) trait Numerics: Send + Sync + 'static {
    /// The float type every activation is held in.
    type F: Real;

    /// The width its traces are stored in (that of `F`).
    const PRECISION: Precision;

    /// `out[t][r] = w.row(r) · x[t]` for every row `r` of `w` and every row `t` of `x`
    /// (`x` is `[n_tok][w.cols]`, `out` is `[n_tok][w.rows]`). Reads each weight row once for all tokens.
    fn matmul(&self, w: Mat<'_>, x: &[Self::F], out: &mut [Self::F]);

    /// Row `r` of `w` as values of `F` (`out.len() == w.cols`).
    fn dequantize_row(&self, w: Mat<'_>, r: usize, out: &mut [Self::F]);
}

/// Runs `row_dots(r, out_r)` for every weight row `r` in parallel, where `out_r[t]` receives row `r`'s
/// product with token `t`, and lays the results out `[n_tok][rows]`. Shared by the backends' `matmul`.
pub(crate) fn matmul_by_rows<F: Real, S: Send>(
    rows: usize,
    n_tok: usize,
    out: &mut [F],
    init: impl Fn() -> S + Send + Sync,
    row_dots: impl Fn(&mut S, usize, &mut [F]) + Send + Sync,
) {
    use rayon::prelude::*;
    assert_eq!(out.len(), rows * n_tok, "matmul: output length");
    if n_tok == 1 {
        out.par_iter_mut()
            .enumerate()
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each_init(&init, |s, (r, o)| row_dots(s, r, std::slice::from_mut(o)));
        return;
    }
    let mut by_row = vec![F::ZERO; rows * n_tok];
    by_row
        .par_chunks_mut(n_tok)
        .enumerate()
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each_init(&init, |s, (r, o)| row_dots(s, r, o));
    transpose(&by_row, rows, n_tok, out);
}

/// Runs `tile_dots(r0, out_tile)` for every tile of `tile_rows` consecutive weight rows `r0..r0 +
/// out_tile.len() / n_tok` in parallel, where `out_tile[r * n_tok + t]` receives row `r0 + r`'s product
/// with token `t`, and lays the results out `[n_tok][rows]`. The `cpu` backend's batched `matmul`.
pub(crate) fn matmul_by_row_tiles<F: Real, S: Send>(
    rows: usize,
    n_tok: usize,
    tile_rows: usize,
    out: &mut [F],
    init: impl Fn() -> S + Send + Sync,
    tile_dots: impl Fn(&mut S, usize, &mut [F]) + Send + Sync,
) {
    use rayon::prelude::*;
    assert_eq!(out.len(), rows * n_tok, "matmul: output length");
    let mut by_row = vec![F::ZERO; rows * n_tok];
    by_row
        .par_chunks_mut(tile_rows * n_tok)
        .enumerate()
        .for_each_init(&init, |s, (i, o)| tile_dots(s, i * tile_rows, o));
    transpose(&by_row, rows, n_tok, out);
}

/// `out[t][r] = by_row[r][t]` (`by_row` is `[rows][n_tok]`), tokens in parallel blocks.
fn transpose<F: Real>(by_row: &[F], rows: usize, n_tok: usize, out: &mut [F]) {
    use rayon::prelude::*;
    out.par_chunks_mut(TRANSPOSE_TOKENS * rows).enumerate().for_each(|(b, o)| {
        let t0 = b * TRANSPOSE_TOKENS;
        let tokens = o.len() / rows;
        for (r, col) in by_row.chunks_exact(n_tok).enumerate() {
            for (t, &v) in col[t0..t0 + tokens].iter().enumerate() {
                o[t * rows + r] = v;
            }
        }
    });
}

/// Tokens per task of [`transpose`]: each task reads 16 consecutive values (one cache line of f32) of
/// every weight row's results.
const TRANSPOSE_TOKENS: usize = 16;

/// Fewest weight rows one rayon task takes: below this, scheduling costs more than a row of a small
/// model's dot products (a 256-wide row is ~100 ns).
const MIN_ROWS_PER_TASK: usize = 8;
