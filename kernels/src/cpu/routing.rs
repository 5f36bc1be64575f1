//! Router decisions of a mixture-of-experts layer: softmax over all experts, deterministic top-k, and
//! renormalisation of the chosen weights (transformers `Qwen3MoeSparseMoeBlock` with
//! `norm_topk_prob = true`; docs/numerics.md for the tie-break).

use super::real::Real;
use super::softmax::softmax_in_place;

/// Writes into `out` the indices of the `out.len()` largest `values`, largest first; equal values are
/// ordered by lower index. NaN values are never preferred to a number.
///
/// # Panics
/// If `out` is longer than `values`.
pub fn top_k<F: Real>(values: &[F], out: &mut [u32]) {
    let k = out.len();
    assert!(k <= values.len(), "top_k: k = {k} exceeds {} values", values.len());
    let mut filled = 0;
    for (i, &v) in values.iter().enumerate() {
        // Position after every kept entry that is >= v (earlier indices win ties), NaN kept last.
        let mut at = filled;
        while at > 0 {
            let prev = values[out[at - 1] as usize];
            if v.partial_cmp(&v).is_none() || prev >= v {
                break;
            }
            at -= 1;
        }
        if at == k {
            continue;
        }
        let end = if filled < k { filled } else { k - 1 };
        out.copy_within(at..end, at + 1);
        out[at] = i as u32;
        filled = (filled + 1).min(k);
    }
}

/// Routes one token: `probs <- softmax(logits)`, `experts <- top_k(probs)`, and
/// `weights[j] = probs[experts[j]]`, divided by their sum when `normalize` (Qwen3-MoE's `norm_topk_prob`).
///
/// # Panics
/// If `probs` and `logits` differ in length, `experts` and `weights` differ in length, or k exceeds the
/// number of experts.
pub fn route<F: Real>(
    logits: &[F],
    normalize: bool,
    probs: &mut [F],
    experts: &mut [u32],
    weights: &mut [F],
) {
    assert_eq!(logits.len(), probs.len(), "route: probs length");
    assert_eq!(experts.len(), weights.len(), "route: experts and weights lengths");
    probs.copy_from_slice(logits);
    softmax_in_place(probs);
    top_k(probs, experts);
    for (w, &e) in weights.iter_mut().zip(experts.iter()) {
        *w = probs[e as usize];
    }
    if normalize {
        let sum = weights.iter().fold(F::ZERO, |s, &w| s + w);
        for w in weights.iter_mut() {
            *w = *w / sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-k by a full stable sort: descending value, ascending index.
    fn top_k_by_sort(values: &[f64], k: usize) -> Vec<u32> {
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(|&a, &b| values[b].partial_cmp(&values[a]).unwrap().then(a.cmp(&b)));
        idx[..k].iter().map(|&i| i as u32).collect()
    }

    #[test]
    fn matches_a_full_sort_including_ties() {
        // Many repeated values so that ties at the k boundary are common.
        for seed in 0..200u64 {
            let n = 1 + (seed as usize % 17);
            let values: Vec<f64> = (0..n).map(|i| ((i as u64 * 7 + seed * 13) % 5) as f64).collect();
            for k in 0..=n {
                let mut out = vec![0u32; k];
                top_k(&values, &mut out);
                assert_eq!(out, top_k_by_sort(&values, k), "values {values:?} k {k}");
            }
        }
    }

    #[test]
    fn equal_values_prefer_the_lower_index() {
        let mut out = [0u32; 2];
        top_k(&[0.25f32, 0.5, 0.25, 0.5], &mut out);
        assert_eq!(out, [1, 3]);
    }

    #[test]
    fn nan_is_never_preferred() {
        let mut out = [0u32; 2];
        top_k(&[f64::NAN, 0.1, f64::NAN, 0.3], &mut out);
        assert_eq!(out, [3, 1]);
    }

    #[test]
    fn route_renormalises_the_chosen_probabilities() {
        let logits = [0.1f64, 2.0, -1.0, 1.5, 0.0];
        let (mut probs, mut experts, mut weights) = ([0.0; 5], [0u32; 2], [0.0; 2]);
        route(&logits, true, &mut probs, &mut experts, &mut weights);
        assert_eq!(experts, [1, 3]);
        // softmax then renormalise over {1, 3} equals a softmax over the two chosen logits.
        let (e1, e3) = (2.0f64.exp(), 1.5f64.exp());
        assert!((weights[0] - e1 / (e1 + e3)).abs() < 1e-15);
        assert!((weights[1] - e3 / (e1 + e3)).abs() < 1e-15);
        route(&logits, false, &mut probs, &mut experts, &mut weights);
        let total: f64 = logits.iter().map(|v| v.exp()).sum();
        assert!((weights[0] - e1 / total).abs() < 1e-15);
    }
}
