//! Op-level bisection (issue 10 items 2 and 3, docs/gate.md *Reading a diagnosis*): which op of a layer
//! computes something else than the reference from identical inputs.
//!
//! Both runs of one layer carry their sub-layer taps (`moe_engine::trace::SubLayerTaps`). The taps are
//! compared in the order the layer computes them; the first op whose output differs from the reference's
//! by more than the bound (nmse), while every op before it (its inputs) agrees, is the op named. Each op is
//! judged on the taps that are its output:
//!
//! | op | output compared |
//! | --- | --- |
//! | `attn_norm` | `attn_norm` |
//! | `qkv_proj` | `v` (the plain projection; q and k are also normed and rotated) |
//! | `qk_norm_rope` | `q`, `k` (with `v` agreeing) |
//! | `kv_cache` | decode steps: the cached key and value rows the step's attention read (`cache_keys`, `cache_values`), or the step's own key and value rows both differing while its queries agree |
//! | `attention` | `attn_out` |
//! | `o_proj` | `attn_proj` |
//! | `attn_residual` | `attn_residual` |
//! | `ffn_norm` | `ffn_norm` |
//! | `router` | `router_logits` |
//! | `topk` | `router_experts` (as sets per position) and `router_weights` |
//! | `experts` | `expert_out`, slot by slot matched by expert id |
//! | `moe_combine` | `moe_out` |
//! | `ffn_residual` | `hidden` |

use std::fmt;
use std::ops::Range;

use moe_contracts::metrics::nmse;
use moe_engine::trace::{LayerTrace, Matrix, SubLayerTaps};
use moe_engine::weights::{LayerWeights, WeightTensor};
use serde::{Deserialize, Serialize};

/// An op of the forward that a diagnosis can name (the selftest's catalogue names the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    AttnNorm,
    QkvProj,
    QkNormRope,
    Attention,
    OProj,
    AttnResidual,
    FfnNorm,
    Router,
    Topk,
    Experts,
    MoeCombine,
    FfnResidual,
    OutputNorm,
    LmHead,
    KvCache,
}

impl Op {
    /// Every op, in the order a forward runs them (the KV cache last: it is read by attention).
    pub const ALL: [Op; 15] = [
        Op::AttnNorm,
        Op::QkvProj,
        Op::QkNormRope,
        Op::Attention,
        Op::OProj,
        Op::AttnResidual,
        Op::FfnNorm,
        Op::Router,
        Op::Topk,
        Op::Experts,
        Op::MoeCombine,
        Op::FfnResidual,
        Op::OutputNorm,
        Op::LmHead,
        Op::KvCache,
    ];

    /// The name in report.json and the terminal: `attn_norm`, `qkv_proj`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Op::AttnNorm => "attn_norm",
            Op::QkvProj => "qkv_proj",
            Op::QkNormRope => "qk_norm_rope",
            Op::Attention => "attention",
            Op::OProj => "o_proj",
            Op::AttnResidual => "attn_residual",
            Op::FfnNorm => "ffn_norm",
            Op::Router => "router",
            Op::Topk => "topk",
            Op::Experts => "experts",
            Op::MoeCombine => "moe_combine",
            Op::FfnResidual => "ffn_residual",
            Op::OutputNorm => "output_norm",
            Op::LmHead => "lm_head",
            Op::KvCache => "kv_cache",
        }
    }

    /// What the op computes, for sentences.
    pub fn describe(self) -> &'static str {
        match self {
            Op::AttnNorm => "attention RMSNorm",
            Op::QkvProj => "q/k/v projection",
            Op::QkNormRope => "q/k RMSNorm and RoPE",
            Op::Attention => "attention (scores, softmax, weighted values)",
            Op::OProj => "attention output projection",
            Op::AttnResidual => "residual add after attention",
            Op::FfnNorm => "FFN RMSNorm",
            Op::Router => "router projection",
            Op::Topk => "router softmax, top-k and renormalisation",
            Op::Experts => "expert gate/up/down",
            Op::MoeCombine => "weighted sum of the expert outputs",
            Op::FfnResidual => "residual add after the MoE",
            Op::OutputNorm => "output RMSNorm",
            Op::LmHead => "output norm and LM head",
            Op::KvCache => "KV cache",
        }
    }

    /// The weights the op multiplies (their formats go into the sentence).
    fn weights(self, w: &LayerWeights) -> Vec<&WeightTensor> {
        match self {
            Op::QkvProj => vec![&w.attn_q, &w.attn_k, &w.attn_v],
            Op::OProj => vec![&w.attn_output],
            Op::Router => vec![&w.ffn_gate_inp],
            Op::Experts => vec![&w.ffn_gate_exps, &w.ffn_up_exps, &w.ffn_down_exps],
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One op compared.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpCheck {
    pub op: Op,
    /// The taps compared, e.g. `q, k` or `expert_out`.
    pub taps: String,
    /// nmse of the run's values against the reference's (the worst of the taps compared).
    #[serde(deserialize_with = "crate::report::finite_or_nan")]
    pub nmse: f64,
    /// `topk` only: positions whose expert sets differ.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub differing_positions: usize,
    /// Whether this op's output differs beyond the bound.
    pub differs: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What the bisection of one run found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpBisection {
    /// The run bisected, and the run it was compared with (the reference).
    pub run: String,
    pub reference: String,
    pub layer: usize,
    /// The greedy step whose decode step differs (`None` for a layer of the prefill).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    /// The first op whose output differs while its inputs agree (`None`: every op agrees).
    pub op: Option<Op>,
    /// The ops compared, in order, up to and including `op`.
    pub checks: Vec<OpCheck>,
    /// The nmse bound beyond which an op differs (the contract's `ties.isolated_nmse`).
    pub bound: f64,
    /// The finding in one sentence, with its numbers.
    pub sentence: String,
}

/// A layer as one run computed it: its taps and its sub-layer taps.
#[derive(Clone, Copy)]
pub struct Tapped<'a> {
    pub layer: &'a LayerTrace,
    pub taps: &'a SubLayerTaps,
}

/// Compares `run` with `truth` op by op and returns the checks up to and including the first op whose
/// output differs by more than `bound` (nmse), with that op. `run`'s rows are `truth`'s rows `rows` (all of
/// them for a layer run alone on the same input; the last for a decode step, whose cache rows
/// `run.taps.cache_keys` are compared with `truth`'s keys at positions `0..rows.end`).
pub fn first_differing_op(
    run: Tapped<'_>,
    truth: Tapped<'_>,
    rows: Range<usize>,
    bound: f64,
) -> (Option<Op>, Vec<OpCheck>) {
    let mut walk = Walk { checks: Vec::new(), bound };
    let (r, t) = (run.taps, truth.taps);
    let e = |a: &Matrix, b: &Matrix| nmse(&a.data, rows_of(b, &rows));
    if walk.differs(Op::AttnNorm, "attn_norm", e(&r.attn_norm, &t.attn_norm)) {
        return walk.found(Op::AttnNorm);
    }
    let (eq, ek, ev) = (e(&r.q, &t.q), e(&r.k, &t.k), e(&r.v, &t.v));
    let decode = r.cache_keys.is_some();
    if walk.beyond(ev) {
        // A decode step's new key and value rows both wrong while its queries agree: the cache write.
        let op = if decode && walk.beyond(ek) && !walk.beyond(eq) { Op::KvCache } else { Op::QkvProj };
        walk.differs(op, "v", ev);
        return walk.found(op);
    }
    walk.differs(Op::QkvProj, "v", ev);
    if walk.differs(Op::QkNormRope, "q, k", eq.max(ek)) {
        return walk.found(Op::QkNormRope);
    }
    if let (Some(keys), Some(values)) = (&r.cache_keys, &r.cache_values) {
        let cached = |m: &Matrix, of: &Matrix| match m.rows == rows.end && m.cols == of.cols {
            true => nmse(&m.data, &of.data[..rows.end * of.cols]),
            false => f64::NAN,
        };
        let worst = cached(keys, &t.k).max(cached(values, &t.v));
        if walk.differs(Op::KvCache, "cache_keys, cache_values", worst) {
            return walk.found(Op::KvCache);
        }
    }
    let staged = [
        (Op::Attention, "attn_out", e(&r.attn_out, &t.attn_out)),
        (Op::OProj, "attn_proj", e(&r.attn_proj, &t.attn_proj)),
        (Op::AttnResidual, "attn_residual", e(&r.attn_residual, &t.attn_residual)),
        (Op::FfnNorm, "ffn_norm", e(&r.ffn_norm, &t.ffn_norm)),
        (Op::Router, "router_logits", e(&run.layer.router_logits, &truth.layer.router_logits)),
    ];
    for (op, taps, value) in staged {
        if walk.differs(op, taps, value) {
            return walk.found(op);
        }
    }
    let routing = Routing::compare(run, truth, &rows);
    if walk.topk(routing.differing_positions, routing.weights_nmse) {
        return walk.found(Op::Topk);
    }
    let staged = [
        (Op::Experts, "expert_out", routing.expert_out_nmse),
        (Op::MoeCombine, "moe_out", e(&r.moe_out, &t.moe_out)),
        (Op::FfnResidual, "hidden", e(&run.layer.hidden, &truth.layer.hidden)),
    ];
    for (op, taps, value) in staged {
        if walk.differs(op, taps, value) {
            return walk.found(op);
        }
    }
    (None, walk.checks)
}

/// The rows `rows` of `m`, flattened (empty where `m` has fewer: the comparison then says NaN).
fn rows_of<'m>(m: &'m Matrix, rows: &Range<usize>) -> &'m [f64] {
    m.data.get(rows.start * m.cols..rows.end * m.cols).unwrap_or(&[])
}

/// The checks made so far.
struct Walk {
    checks: Vec<OpCheck>,
    bound: f64,
}

impl Walk {
    fn beyond(&self, nmse: f64) -> bool {
        nmse > self.bound || nmse.is_nan()
    }

    /// Records `op`'s check; whether it differs.
    fn differs(&mut self, op: Op, taps: &str, nmse: f64) -> bool {
        let differs = self.beyond(nmse);
        self.checks.push(OpCheck { op, taps: taps.to_string(), nmse, differing_positions: 0, differs });
        differs
    }

    fn topk(&mut self, differing_positions: usize, weights_nmse: f64) -> bool {
        let differs = differing_positions > 0 || self.beyond(weights_nmse);
        let taps = "router_experts, router_weights".to_string();
        self.checks.push(OpCheck { op: Op::Topk, taps, nmse: weights_nmse, differing_positions, differs });
        differs
    }

    fn found(self, op: Op) -> (Option<Op>, Vec<OpCheck>) {
        (Some(op), self.checks)
    }
}

/// The routing of a run against the truth's at the compared rows, and its expert outputs matched slot by
/// slot by expert id (the choice order may differ where two weights are within rounding).
struct Routing {
    differing_positions: usize,
    /// Over the positions with the same expert set, weights matched by expert id.
    weights_nmse: f64,
    /// Over the same positions, each expert's output matched by expert id.
    expert_out_nmse: f64,
}

impl Routing {
    fn compare(run: Tapped<'_>, truth: Tapped<'_>, rows: &Range<usize>) -> Self {
        let k = run.layer.router_weights.cols;
        let hidden = run.taps.expert_out.cols.checked_div(k).unwrap_or(0);
        let (mut differing_positions, mut w, mut tw, mut y, mut ty) = (0, vec![], vec![], vec![], vec![]);
        for (i, pos) in rows.clone().enumerate() {
            let ids = |l: &LayerTrace, row: usize| {
                l.router_experts.get(row * k..(row + 1) * k).unwrap_or(&[]).to_vec()
            };
            let (a, b) = (ids(run.layer, i), ids(truth.layer, pos));
            let mut sa = a.clone();
            let mut sb = b.clone();
            sa.sort_unstable();
            sb.sort_unstable();
            if sa != sb || a.len() != k {
                differing_positions += 1;
                continue;
            }
            for (j, e) in a.iter().enumerate() {
                let tj = b.iter().position(|x| x == e).expect("same set");
                w.push(run.layer.router_weights.row(i)[j]);
                tw.push(truth.layer.router_weights.row(pos)[tj]);
                y.extend_from_slice(&run.taps.expert_out.row(i)[j * hidden..(j + 1) * hidden]);
                ty.extend_from_slice(&truth.taps.expert_out.row(pos)[tj * hidden..(tj + 1) * hidden]);
            }
        }
        Routing { differing_positions, weights_nmse: nmse(&w, &tw), expert_out_nmse: nmse(&y, &ty) }
    }
}

/// The sentence of a finding: "`cpu`'s expert gate/up/down (Q4_K, Q4_K, Q6_K) differs from the
/// reference's on the same input: nmse 3.1e-4 on expert_out; attn_norm, ..., topk agree to within nmse
/// 1.2e-14". `place` says where ("at layer 3", "in decode step 2 (position 7), layer 0").
pub fn sentence(
    run: &str,
    place: &str,
    op: Option<Op>,
    checks: &[OpCheck],
    layer: Option<&LayerWeights>,
) -> String {
    let agreeing: Vec<&OpCheck> = checks.iter().filter(|c| !c.differs).collect();
    let worst = agreeing.iter().map(|c| c.nmse).fold(0.0, f64::max);
    let agree = match agreeing.as_slice() {
        [] => String::new(),
        list => {
            let names: Vec<&str> = list.iter().map(|c| c.op.as_str()).collect();
            format!("; {} agree to within nmse {worst:.1e}", names.join(", "))
        }
    };
    let Some(op) = op else {
        return format!("every op of `{run}` {place} agrees with the reference within nmse {worst:.1e}");
    };
    let formats = layer.map(|w| op.weights(w)).unwrap_or_default();
    let formats = match formats.as_slice() {
        [] => String::new(),
        ws => {
            let mut names: Vec<String> = ws.iter().map(|w| w.ty.to_string()).collect();
            names.dedup();
            format!(" ({})", names.join(", "))
        }
    };
    let what = checks.last().map_or(String::new(), |c| match c.differing_positions {
        0 => format!("nmse {:.1e} on {}", c.nmse, c.taps),
        n => format!("{n} positions choose other experts"),
    });
    format!("`{run}`'s {} [{op}]{formats} differs from the reference's {place}: {what}{agree}", op.describe())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_engine::trace::SubLayerTap;

    /// A layer of 2 positions, hidden 2, 4 experts top-2, every tap filled with distinct values.
    fn layer() -> (LayerTrace, SubLayerTaps) {
        let m = |cols: usize, seed: f64| {
            Matrix::from_f64(2, cols, (0..2 * cols).map(|i| seed + 1.0 + i as f64 / 7.0).collect())
        };
        let layer = LayerTrace {
            hidden: m(2, 0.5),
            router_logits: m(4, 0.25),
            router_experts: vec![2, 0, 1, 3],
            router_weights: Matrix::from_f64(2, 2, vec![0.6, 0.4, 0.7, 0.3]),
        };
        let mut taps = SubLayerTaps::default();
        for (i, tap) in SubLayerTap::ALL.into_iter().enumerate() {
            let cols = if tap == SubLayerTap::ExpertOut { 4 } else { 2 };
            set(&mut taps, tap, m(cols, i as f64));
        }
        (layer, taps)
    }

    fn set(taps: &mut SubLayerTaps, tap: SubLayerTap, m: Matrix) {
        match tap {
            SubLayerTap::AttnNorm => taps.attn_norm = m,
            SubLayerTap::Q => taps.q = m,
            SubLayerTap::K => taps.k = m,
            SubLayerTap::V => taps.v = m,
            SubLayerTap::AttnOut => taps.attn_out = m,
            SubLayerTap::AttnProj => taps.attn_proj = m,
            SubLayerTap::AttnResidual => taps.attn_residual = m,
            SubLayerTap::FfnNorm => taps.ffn_norm = m,
            SubLayerTap::ExpertOut => taps.expert_out = m,
            SubLayerTap::MoeOut => taps.moe_out = m,
        }
    }

    /// Relative perturbation of a faulty op: nmse 1e-6, far above the bound and far below what a
    /// flipped expert gives.
    const FAULT: f64 = 1e-3;
    /// The bound of the tests: the contract's default `ties.isolated_nmse`.
    const BOUND: f64 = 1e-8;

    fn scale(m: &mut Matrix) {
        m.data.iter_mut().for_each(|v| *v *= 1.0 + FAULT);
    }

    #[test]
    fn identical_layers_agree_everywhere_and_every_faulty_op_is_named() {
        let (tl, tt) = layer();
        let truth = Tapped { layer: &tl, taps: &tt };
        let (op, checks) = first_differing_op(truth, truth, 0..2, BOUND);
        assert_eq!(op, None);
        assert_eq!(checks.len(), 12, "every op of a layer but the cache, which a prefill has not");
        assert!(checks.iter().all(|c| c.nmse == 0.0 && !c.differs));

        // A fault in one op changes its output and every later one; the first is named.
        type Fault = fn(&mut LayerTrace, &mut SubLayerTaps);
        let cases: [(Op, Fault); 12] = [
            (Op::AttnNorm, |_, t| scale(&mut t.attn_norm)),
            (Op::QkvProj, |_, t| scale(&mut t.v)),
            (Op::QkNormRope, |_, t| scale(&mut t.k)),
            (Op::Attention, |_, t| scale(&mut t.attn_out)),
            (Op::OProj, |_, t| scale(&mut t.attn_proj)),
            (Op::AttnResidual, |_, t| scale(&mut t.attn_residual)),
            (Op::FfnNorm, |_, t| scale(&mut t.ffn_norm)),
            (Op::Router, |l, _| scale(&mut l.router_logits)),
            (Op::Topk, |l, _| l.router_experts.swap(1, 2)),
            (Op::Experts, |_, t| scale(&mut t.expert_out)),
            (Op::MoeCombine, |_, t| scale(&mut t.moe_out)),
            (Op::FfnResidual, |l, _| scale(&mut l.hidden)),
        ];
        for (want, fault) in cases {
            let (mut l, mut t) = layer();
            fault(&mut l, &mut t);
            let (op, checks) = first_differing_op(Tapped { layer: &l, taps: &t }, truth, 0..2, BOUND);
            assert_eq!(op, Some(want));
            let last = checks.last().unwrap();
            assert!(last.differs && checks[..checks.len() - 1].iter().all(|c| !c.differs && c.nmse == 0.0));
            if want != Op::Topk {
                // (1 + 1e-3) x: nmse 1e-6.
                assert!((last.nmse - FAULT * FAULT).abs() < 1e-9, "{want}: {}", last.nmse);
            }
        }
    }

    #[test]
    fn the_same_experts_in_another_order_are_matched_by_id() {
        let (tl, tt) = layer();
        let (mut l, mut t) = layer();
        // Position 0 lists its two experts the other way round, with weights and outputs to match.
        l.router_experts.swap(0, 1);
        l.router_weights.data.swap(0, 1);
        let row: Vec<f64> = t.expert_out.row(0).to_vec();
        t.expert_out.data[..4].copy_from_slice(&[&row[2..], &row[..2]].concat());
        let (op, _) =
            first_differing_op(Tapped { layer: &l, taps: &t }, Tapped { layer: &tl, taps: &tt }, 0..2, BOUND);
        assert_eq!(op, None);
    }

    #[test]
    fn a_decode_step_is_compared_with_the_truths_row_and_its_cache_rows() {
        // The truth: a forward of 2 positions; the run: its decode step at position 1, one row, with the
        // cache rows it read.
        let (tl, tt) = layer();
        let last = |m: &Matrix| Matrix::from_f64(1, m.cols, m.row(1).to_vec());
        let step = || {
            let l = LayerTrace {
                hidden: last(&tl.hidden),
                router_logits: last(&tl.router_logits),
                router_experts: tl.router_experts[2..].to_vec(),
                router_weights: last(&tl.router_weights),
            };
            let mut t = SubLayerTaps::default();
            for tap in SubLayerTap::ALL {
                set(&mut t, tap, last(tap.of(&tt)));
            }
            (t.cache_keys, t.cache_values) = (Some(tt.k.clone()), Some(tt.v.clone()));
            (l, t)
        };
        let truth = Tapped { layer: &tl, taps: &tt };
        let (l, t) = step();
        let (op, checks) = first_differing_op(Tapped { layer: &l, taps: &t }, truth, 1..2, BOUND);
        assert_eq!((op, checks.len()), (None, 13), "every op, the cache included");

        // A stale cache row (an earlier position): the step's own rows agree, the cache does not.
        let (l, mut t) = step();
        t.cache_keys.as_mut().unwrap().data[0] += 1.0;
        t.cache_values.as_mut().unwrap().data[0] += 1.0;
        let (op, _) = first_differing_op(Tapped { layer: &l, taps: &t }, truth, 1..2, BOUND);
        assert_eq!(op, Some(Op::KvCache));

        // The step's key and value rows both wrong with its queries right (a cache row written from
        // elsewhere): kv_cache; queries and keys wrong with values right (a RoPE position): qk_norm_rope.
        let (l, mut t) = step();
        scale(&mut t.k);
        scale(&mut t.v);
        assert_eq!(
            first_differing_op(Tapped { layer: &l, taps: &t }, truth, 1..2, BOUND).0,
            Some(Op::KvCache)
        );
        let (l, mut t) = step();
        scale(&mut t.q);
        scale(&mut t.k);
        let (op, _) = first_differing_op(Tapped { layer: &l, taps: &t }, truth, 1..2, BOUND);
        assert_eq!(op, Some(Op::QkNormRope));
    }

    #[test]
    fn the_sentence_names_the_op_its_numbers_and_what_agrees() {
        let checks = vec![
            OpCheck {
                op: Op::AttnNorm,
                taps: "attn_norm".into(),
                nmse: 1e-15,
                differing_positions: 0,
                differs: false,
            },
            OpCheck { op: Op::QkvProj, taps: "v".into(), nmse: 3e-4, differing_positions: 0, differs: true },
        ];
        let s = sentence("cuda", "at layer 3 on the same input", Some(Op::QkvProj), &checks, None);
        assert_eq!(
            s,
            "`cuda`'s q/k/v projection [qkv_proj] differs from the reference's at layer 3 on the same input: \
             nmse 3.0e-4 on v; attn_norm agree to within nmse 1.0e-15"
        );
        assert_eq!(serde_json::to_string(&Op::QkNormRope).unwrap(), "\"qk_norm_rope\"");
        for op in Op::ALL {
            assert_eq!(serde_json::to_string(&op).unwrap(), format!("\"{op}\""), "serde and as_str agree");
        }
    }
}
