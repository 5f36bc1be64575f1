//! Causal scaled dot-product attention for one query head (Vaswani et al. 2017), as transformers'
//! `eager_attention_forward` computes it: `softmax(q·Kᵀ * scale) · V` over the positions up to the
//! query's.

use super::real::{Real, dot};
use super::softmax::softmax_in_place;

/// The keys and values of one KV head, read from a cache laid out `[position][row_width]` with the head at
/// `offset..offset + head_dim` of each row.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a, F> {
    /// Cached keys, `[n_pos][row_width]`.
    pub keys: &'a [F],
    /// Cached values, same layout as `keys`.
    pub values: &'a [F],
    /// Width of one cached row (all KV heads).
    pub row_width: usize,
    /// Start of this head within a row.
    pub offset: usize,
}

impl<F> KvView<'_, F> {
    fn key(&self, pos: usize, len: usize) -> &[F] {
        let start = pos * self.row_width + self.offset;
        &self.keys[start..start + len]
    }

    fn value(&self, pos: usize, len: usize) -> &[F] {
        let start = pos * self.row_width + self.offset;
        &self.values[start..start + len]
    }
}

/// Attends query head `q` at position `n_ctx - 1` over cached positions `0..n_ctx` of `kv`:
/// `s_p = (q · k_p) * scale`, `a = softmax(s)`, `out = sum_p a_p v_p` (summed in increasing `p`).
/// `scores` is scratch space, resized as needed.
///
/// # Panics
/// If `out` and `q` differ in length, `n_ctx` is zero, or the cache holds fewer than `n_ctx` positions.
pub fn causal_attention_head<F: Real>(
    q: &[F],
    kv: KvView<'_, F>,
    n_ctx: usize,
    scale: F,
    scores: &mut Vec<F>,
    out: &mut [F],
) {
    assert_eq!(q.len(), out.len(), "attention: output length");
    assert!(n_ctx > 0, "attention: no position to attend to");
    let d = q.len();
    scores.clear();
    scores.extend((0..n_ctx).map(|p| dot(q, kv.key(p, d)) * scale));
    softmax_in_place(scores);
    out.fill(F::ZERO);
    for (p, &a) in scores.iter().enumerate() {
        for (o, &v) in out.iter_mut().zip(kv.value(p, d)) {
            *o += a * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive attention in f64 with an explicit exp/sum and the head cut out of each row.
    fn attend_f64(q: &[f64], keys: &[Vec<f64>], values: &[Vec<f64>], scale: f64) -> Vec<f64> {
        let s: Vec<f64> =
            keys.iter().map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale).collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..q.len()).map(|j| e.iter().zip(values).map(|(w, v)| w / z * v[j]).sum()).collect()
    }

    fn val(i: usize) -> f64 {
        ((i * 53 % 23) as f64 - 11.0) / 7.0
    }

    #[test]
    fn matches_naive_attention_on_a_strided_cache() {
        let (n_pos, row_width, offset, d) = (6, 12, 4, 4);
        let keys: Vec<f64> = (0..n_pos * row_width).map(val).collect();
        let values: Vec<f64> = (0..n_pos * row_width).map(|i| val(i + 1000)).collect();
        let q: Vec<f64> = (0..d).map(|i| val(i + 77)).collect();
        let kv = KvView { keys: &keys, values: &values, row_width, offset };
        let scale = 1.0 / (d as f64).sqrt();
        for n_ctx in 1..=n_pos {
            let mut out = vec![0.0; d];
            causal_attention_head(&q, kv, n_ctx, scale, &mut Vec::new(), &mut out);
            let heads = |buf: &[f64]| -> Vec<Vec<f64>> {
                (0..n_ctx).map(|p| buf[p * row_width + offset..p * row_width + offset + d].to_vec()).collect()
            };
            let want = attend_f64(&q, &heads(&keys), &heads(&values), scale);
            for (a, b) in out.iter().zip(&want) {
                // Values of order 1, a handful of f64 roundings per term: 1e-14.
                assert!((a - b).abs() < 1e-14, "n_ctx {n_ctx}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_single_position_returns_its_value() {
        let keys = [1.0f32, 2.0];
        let values = [3.0f32, -4.0];
        let kv = KvView { keys: &keys, values: &values, row_width: 2, offset: 0 };
        let mut out = [0.0f32; 2];
        causal_attention_head(&[0.5, 0.5], kv, 1, 0.7, &mut Vec::new(), &mut out);
        assert_eq!(out, [3.0, -4.0]);
    }
}
