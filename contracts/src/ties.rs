//! Router near-ties: where two runs first choose different experts, and whether the reference certifies
//! that choice as decided by rounding (docs/gate.md, "Router ties").
//!
//! Everything here is pure: it reads traces. The gate adds what needs a backend (the reference forward of
//! a prompt that flipped, the layer run alone on the reference's input) in `cargo-moe-gate/src/ties.rs`.

use moe_engine::trace::{LayerTrace, Trace};

use crate::metrics::{self, TopkVerdict};
use crate::schema::Contract;

/// The run id under which the gate records the reference it creates to certify ties, when the contract
/// has no run on the reference backend.
pub const AD_HOC_REFERENCE: &str = "reference (ties)";

/// One position where two runs chose different expert sets at one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Swap {
    /// The token position.
    pub position: usize,
    /// Experts only the first run chose, ascending.
    pub only_a: Vec<u32>,
    /// Experts only the second run chose, ascending.
    pub only_b: Vec<u32>,
}

/// The first layer where two runs' routing differs, with every position that differs there.
#[derive(Debug, Clone, PartialEq)]
pub struct Flip {
    /// The layer.
    pub layer: usize,
    /// The positions that differ at that layer, ascending.
    pub swaps: Vec<Swap>,
}

/// The positions where `a` and `b` (one layer of two runs over the same tokens) chose different expert
/// sets; `k` experts per position. Layers of different shapes compare as no swap at all.
pub fn swaps_at(a: &LayerTrace, b: &LayerTrace, k: usize) -> Vec<Swap> {
    if k == 0 || a.router_experts.len() != b.router_experts.len() {
        return Vec::new();
    }
    a.router_experts
        .chunks(k)
        .zip(b.router_experts.chunks(k))
        .enumerate()
        .filter_map(|(position, (x, y))| match metrics::topk_set(x, y, None, None) {
            TopkVerdict::Differ { only_candidate, only_baseline, .. } => {
                Some(Swap { position, only_a: only_candidate, only_b: only_baseline })
            }
            _ => None,
        })
        .collect()
}

/// The first layer (in forward order) where the runs of `a` and `b` route some position differently.
pub fn first_flip(a: &Trace, b: &Trace) -> Option<Flip> {
    if a.tokens != b.tokens {
        return None;
    }
    let k = a.top_k();
    a.layers.iter().zip(&b.layers).enumerate().find_map(|(layer, (la, lb))| {
        let swaps = swaps_at(la, lb, k);
        (!swaps.is_empty()).then_some(Flip { layer, swaps })
    })
}

/// How far apart the reference puts exactly the experts of `swap` at its position of `layer`: the largest
/// `|p(x) - p(y)|` over x only one run chose and y only the other chose, from the reference's router
/// softmax. `None` when the reference lacks that layer or position, a value is not finite, or the swap is
/// not one for one (a set of another size).
pub fn swap_gap(reference: &Trace, layer: usize, swap: &Swap) -> Option<f64> {
    let logits = &reference.layers.get(layer)?.router_logits;
    if swap.position >= logits.rows || logits.data.len() != logits.rows * logits.cols {
        return None;
    }
    let row = logits.row(swap.position);
    if row.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let probs = metrics::softmax(row);
    match metrics::topk_set(&swap.only_a, &swap.only_b, Some(&probs), Some(f64::INFINITY)) {
        TopkVerdict::Tie { gap } => Some(gap),
        _ => None,
    }
}

/// The largest reference gap over the swaps of a flip (`None` if any cannot be measured).
pub fn flip_gap(reference: &Trace, flip: &Flip) -> Option<f64> {
    flip.swaps.iter().try_fold(0.0f64, |worst, s| Some(worst.max(swap_gap(reference, flip.layer, s)?)))
}

/// How far apart the reference puts two tokens at the last position of its trace: `|p(a) - p(b)|` of the
/// softmax over the vocabulary of its last logits row. The argmax counterpart of [`swap_gap`]: two runs
/// that route alike but choose different next tokens face a tie when the reference barely separates
/// exactly those two. `None` when the trace has no logits, a token is outside the row, or a value of the
/// row is not finite.
pub fn token_gap(reference: &Trace, a: u32, b: u32) -> Option<f64> {
    let logits = &reference.logits;
    if logits.rows == 0 || logits.data.len() != logits.rows * logits.cols {
        return None;
    }
    let row = logits.row(logits.rows - 1);
    if (a as usize) >= row.len() || (b as usize) >= row.len() || row.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let probs = metrics::softmax(row);
    Some((probs[a as usize] - probs[b as usize]).abs())
}

/// The run that certifies ties for `contract`: its `ties.reference` (explicit, or the run named
/// `reference`, or its only reference-backend run), else the one the gate creates.
pub fn reference_run(contract: &Contract) -> &str {
    contract.ties.reference.as_deref().unwrap_or(AD_HOC_REFERENCE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_engine::trace::{Matrix, Precision};

    /// A trace of two positions and `layers.len()` layers, each position choosing the given 2 experts
    /// of 4, with router logits `logits` (the same at every layer and position).
    fn trace(layers: &[[[u32; 2]; 2]], logits: [f64; 4]) -> Trace {
        let mut t = Trace::new("m", "cpu", "fast", Precision::F64);
        t.tokens = vec![5, 6];
        for chosen in layers {
            t.layers.push(LayerTrace {
                hidden: Matrix::zeros(2, 3),
                router_logits: Matrix::from_f64(2, 4, [logits, logits].concat()),
                router_experts: chosen.concat(),
                router_weights: Matrix::zeros(2, 2),
            });
        }
        t
    }

    #[test]
    fn the_first_flip_names_the_layer_the_position_and_exactly_the_swapped_experts() {
        let logits = [0.0; 4];
        let a = trace(&[[[0, 1], [0, 1]], [[0, 1], [2, 1]], [[3, 1], [2, 1]]], logits);
        let b = trace(&[[[1, 0], [0, 1]], [[0, 1], [0, 1]], [[0, 1], [0, 1]]], logits);
        let flip = first_flip(&a, &b).expect("layer 1 differs");
        assert_eq!(flip.layer, 1, "layer 0 holds the same sets in another order");
        assert_eq!(flip.swaps, vec![Swap { position: 1, only_a: vec![2], only_b: vec![0] }]);
        assert_eq!(first_flip(&a, &a), None);
    }

    #[test]
    fn the_gap_is_the_reference_probability_difference_of_the_swapped_experts_only() {
        // Softmax of [ln 4, ln 3, ln 2, ln 1] = [0.4, 0.3, 0.2, 0.1]: experts 1 and 2 are 0.1 apart, 2 and
        // 3 are 0.1 apart, 0 and 3 are 0.3 apart; the top-2 boundary (0.3 vs 0.2) is not what is read.
        let reference = trace(&[[[0, 1], [0, 1]]], [4f64.ln(), 3f64.ln(), 2f64.ln(), 0.0]);
        let swap = |a: u32, b: u32| Swap { position: 0, only_a: vec![a], only_b: vec![b] };
        let gap = |s: &Swap| swap_gap(&reference, 0, s).unwrap();
        assert!((gap(&swap(1, 2)) - 0.1).abs() < 1e-12);
        assert!((gap(&swap(0, 3)) - 0.3).abs() < 1e-12);
        assert_eq!(swap_gap(&reference, 1, &swap(0, 3)), None, "no such layer");
        let two_for_one = Swap { position: 0, only_a: vec![0, 1], only_b: vec![] };
        assert_eq!(swap_gap(&reference, 0, &two_for_one), None, "not a swap");
        let flip = Flip { layer: 0, swaps: vec![swap(1, 2), Swap { position: 1, ..swap(0, 3) }] };
        assert!((flip_gap(&reference, &flip).unwrap() - 0.3).abs() < 1e-12, "the worst swap decides");
    }

    #[test]
    fn the_token_gap_is_the_reference_probability_difference_of_the_two_tokens_at_the_last_position() {
        // Last row softmax of [ln 4, ln 3, ln 2, ln 1] = [0.4, 0.3, 0.2, 0.1]; the first row is ignored.
        let mut reference = trace(&[], [0.0; 4]);
        let last = [4f64.ln(), 3f64.ln(), 2f64.ln(), 0.0];
        reference.logits = Matrix::from_f64(2, 4, [[9.0, 0.0, 0.0, 0.0], last].concat());
        assert!((token_gap(&reference, 0, 1).unwrap() - 0.1).abs() < 1e-12);
        assert!((token_gap(&reference, 3, 0).unwrap() - 0.3).abs() < 1e-12, "order does not matter");
        assert_eq!(token_gap(&reference, 0, 4), None, "outside the vocabulary");
        reference.logits = Matrix::zeros(0, 4);
        assert_eq!(token_gap(&reference, 0, 1), None, "no logits");
    }
}
