//! Judging one trial from the recorded traces (docs/contracts.md, issue 4 item 3).
//!
//! What a trial reads: the criterion's tap of the candidate and baseline runs on the trial's prompt, at
//! the trial's layer (every layer when the tap is per layer and `per` lacks `layer`), over every
//! position (one with `per: position`; `argmax` without it reads the last position, the next token the
//! prompt predicts). Float metrics are computed over the flattened values of each layer; when a trial
//! covers several layers or positions its value is the worst of them. A NaN or Inf anywhere in what a
//! trial reads fails it, and `non_finite` says where, with the trace's first non-finite value (where it
//! started) when that is elsewhere.

use std::ops::Range;

use moe_engine::trace::{Matrix, Trace};

use crate::metrics::{self, TopkVerdict};
use crate::plan::TrialPlan;
use crate::record::{Recorded, TrialOutcome};
use crate::schema::{Bound, Contract, Criterion, Metric, Tap};
use crate::ties;

/// Why a trial could not produce a value.
enum Problem {
    /// A recording is missing or does not fit the trial.
    Unjudgeable(String),
    /// The trial read a NaN or Inf, here.
    NonFinite(String),
}

type Judged = Result<TrialOutcome, Problem>;

/// Judges one trial from the recordings. Never panics: a missing or ill-shaped recording fails the trial
/// with a detail saying what is missing.
pub fn evaluate(contract: &Contract, trial: &TrialPlan, rec: &Recorded) -> TrialOutcome {
    let Some(criterion) = contract.criterion(&trial.criterion) else {
        return TrialOutcome::unjudgeable(format!(
            "criterion `{}` is not in contract `{}`: the trial was planned from another contract",
            trial.criterion, contract.contract
        ));
    };
    let judged = match criterion.metric {
        Metric::Greedy => greedy_trial(criterion, trial, rec),
        Metric::Cosine
        | Metric::Nmse
        | Metric::MaxAbs
        | Metric::Kld
        | Metric::Argmax
        | Metric::TopkSet
        | Metric::Bitwise
        | Metric::ErrorRatio => trace_trial(contract, criterion, trial, rec),
    };
    judged.unwrap_or_else(|problem| match problem {
        Problem::Unjudgeable(detail) => TrialOutcome::unjudgeable(detail),
        Problem::NonFinite(location) => TrialOutcome::non_finite(location),
    })
}

/// The two traces a trial compares, with their run ids.
struct Pair<'a> {
    candidate: (&'a str, &'a Trace),
    baseline: (&'a str, &'a Trace),
    prompt: &'a str,
}

fn trace_trial(contract: &Contract, criterion: &Criterion, trial: &TrialPlan, rec: &Recorded) -> Judged {
    let candidate = match criterion.is_isolated() {
        true => isolated(rec, &criterion.compare, &trial.prompt)?,
        false => recorded(rec, &criterion.compare[0], &trial.prompt)?,
    };
    let pair = Pair {
        candidate: (&criterion.compare[0], candidate),
        baseline: (&criterion.compare[1], recorded(rec, &criterion.compare[1], &trial.prompt)?),
        prompt: &trial.prompt,
    };
    if pair.candidate.1.tokens != pair.baseline.1.tokens {
        return Err(Problem::Unjudgeable(format!(
            "runs `{}` and `{}` recorded different tokens for prompt `{}`",
            pair.candidate.0, pair.baseline.0, pair.prompt
        )));
    }
    let layers = layers_read(criterion.tap, trial.layer, &pair)?;
    let rows = rows_read(criterion.metric, trial.position, pair.baseline.1)?;
    match criterion.metric {
        Metric::Cosine | Metric::Nmse | Metric::MaxAbs => {
            let ties = TieRows { contract, criterion, rec };
            distance_trial(criterion, &pair, &layers, rows, &ties)
        }
        Metric::Bitwise => {
            let ties = TieRows { contract, criterion, rec };
            bitwise_trial(criterion, &pair, &layers, rows, &ties)
        }
        Metric::Kld => kld_trial(criterion, &pair, rows),
        Metric::Argmax => argmax_trial(&pair, rows),
        Metric::TopkSet => topk_trial(contract, criterion, rec, &pair, &layers, rows),
        Metric::ErrorRatio => error_ratio_trial(criterion, rec, &pair, &layers, rows),
        Metric::Greedy => Err(Problem::Unjudgeable("greedy trials read greedy steps, not traces".into())),
    }
}

/// The candidate's layers run on the baseline's inputs (`mode: isolated`).
fn isolated<'a>(
    rec: &'a Recorded,
    [candidate, baseline]: &[String; 2],
    prompt: &str,
) -> Result<&'a Trace, Problem> {
    rec.isolated(candidate, baseline, prompt).ok_or_else(|| {
        Problem::Unjudgeable(format!(
            "no isolated layers of run `{candidate}` on run `{baseline}`'s inputs were recorded for prompt `{prompt}`"
        ))
    })
}

/// What an isolated trial needs to set aside positions whose expert choice is a certified tie.
struct TieRows<'a> {
    contract: &'a Contract,
    criterion: &'a Criterion,
    rec: &'a Recorded,
}

/// The positions an isolated trial sets aside at one layer, or why it fails outright.
enum RowSplit {
    /// Compare every position read except these (certified ties), with the largest reference gap.
    Keep { tied: Vec<usize>, gap: f64 },
    /// A position chose other experts and the reference does not call it a tie.
    Differs(String),
}

impl TieRows<'_> {
    /// For an isolated criterion on a tap downstream of the router (hidden, router_weights): the
    /// positions among `rows` where the candidate, on the baseline's input, chose another expert set
    /// than the baseline. Each must be a tie the reference certifies (gap < the contract's `ties.margin`);
    /// such a position's row then differs by the swapped expert, which is not the layer's arithmetic,
    /// so it is set aside. Any other tap or mode sets nothing aside.
    fn split(&self, pair: &Pair<'_>, tap: Tap, layer: Option<usize>, rows: &Range<usize>) -> RowSplit {
        let keep_all = RowSplit::Keep { tied: Vec::new(), gap: 0.0 };
        let (true, Tap::Hidden | Tap::RouterWeights, Some(l)) = (self.criterion.is_isolated(), tap, layer)
        else {
            return keep_all;
        };
        let (Some(c), Some(b)) = (pair.candidate.1.layers.get(l), pair.baseline.1.layers.get(l)) else {
            return keep_all;
        };
        let swaps: Vec<ties::Swap> = ties::swaps_at(c, b, pair.baseline.1.top_k())
            .into_iter()
            .filter(|s| rows.contains(&s.position))
            .collect();
        if swaps.is_empty() {
            return keep_all;
        }
        let (run, margin) = (ties::reference_run(self.contract), self.contract.ties.margin);
        let reference = self.rec.tie_reference(run, pair.prompt);
        let (mut tied, mut worst) = (Vec::new(), 0.0f64);
        for swap in &swaps {
            let gap = reference.and_then(|r| ties::swap_gap(r, l, swap));
            match gap {
                Some(g) if g < margin => {
                    tied.push(swap.position);
                    worst = worst.max(g);
                }
                _ => {
                    let why = match (reference, gap) {
                        (None, _) => format!("no trace of reference run `{run}` to certify a tie"),
                        (Some(_), None) => "the reference cannot measure that swap".to_string(),
                        (Some(_), Some(g)) => {
                            format!("reference gap {g:.3e} >= ties.margin {margin:e}: not a tie")
                        }
                    };
                    return RowSplit::Differs(format!(
                        "layer {l}, position {}: run `{}` on `{}`'s input chose experts {:?} where `{}` chose {:?}; {why}",
                        swap.position,
                        pair.candidate.0,
                        pair.baseline.0,
                        swap.only_a,
                        pair.baseline.0,
                        swap.only_b
                    ));
                }
            }
        }
        RowSplit::Keep { tied, gap: worst }
    }
}

/// The values of `values` (`cols` per row, rows starting at `first_row`) outside the rows `skip`.
fn without_rows(values: &[f64], cols: usize, first_row: usize, skip: &[usize]) -> Vec<f64> {
    values
        .chunks(cols.max(1))
        .enumerate()
        .filter(|(i, _)| !skip.contains(&(first_row + i)))
        .flat_map(|(_, row)| row.iter().copied())
        .collect()
}

/// The sentence an isolated trial adds about the tie positions it set aside.
fn tie_note(tied: &[(usize, usize)], gap: f64) -> String {
    match tied {
        [] => String::new(),
        _ => {
            let at: Vec<String> = tied.iter().map(|(l, p)| format!("layer {l} position {p}")).collect();
            format!("; set aside as certified router ties (reference gap <= {gap:.3e}): {}", at.join(", "))
        }
    }
}

fn recorded<'a>(rec: &'a Recorded, run: &str, prompt: &str) -> Result<&'a Trace, Problem> {
    rec.trace(run, prompt).ok_or_else(|| {
        Problem::Unjudgeable(format!("no trace was recorded for run `{run}` on prompt `{prompt}`"))
    })
}

/// The layers a trial reads: its own, every layer for a per-layer tap judged per prompt, none for logits.
fn layers_read(tap: Tap, layer: Option<usize>, pair: &Pair<'_>) -> Result<Vec<Option<usize>>, Problem> {
    if !tap.is_per_layer() {
        return Ok(vec![None]);
    }
    let (nc, nb) = (pair.candidate.1.layers.len(), pair.baseline.1.layers.len());
    if nc != nb {
        return Err(Problem::Unjudgeable(format!(
            "run `{}` recorded {nc} layers and run `{}` {nb} on prompt `{}`",
            pair.candidate.0, pair.baseline.0, pair.prompt
        )));
    }
    match layer {
        Some(l) if l < nb => Ok(vec![Some(l)]),
        Some(l) => Err(Problem::Unjudgeable(format!("layer {l} is beyond the {nb} layers recorded"))),
        None => Ok((0..nb).map(Some).collect()),
    }
}

/// The positions a trial reads: its own; the last for argmax; else all.
fn rows_read(metric: Metric, position: Option<usize>, trace: &Trace) -> Result<Range<usize>, Problem> {
    let t = trace.tokens.len();
    match position {
        Some(p) if p < t => Ok(p..p + 1),
        Some(p) => Err(Problem::Unjudgeable(format!("position {p} is beyond the prompt's {t} tokens"))),
        None if t == 0 => Err(Problem::Unjudgeable("the trace holds no tokens".into())),
        None if metric == Metric::Argmax => Ok(t - 1..t),
        None => Ok(0..t),
    }
}

/// The float matrix of `tap` (not router_experts) at `layer`.
fn float_tap(trace: &Trace, tap: Tap, layer: Option<usize>) -> Option<&Matrix> {
    let sub_layer = layer.and_then(|l| trace.sub_layers.get(l));
    let layer = layer.and_then(|l| trace.layers.get(l));
    match tap {
        Tap::Hidden => layer.map(|l| &l.hidden),
        Tap::RouterLogits => layer.map(|l| &l.router_logits),
        Tap::RouterWeights => layer.map(|l| &l.router_weights),
        Tap::Logits => Some(&trace.logits),
        Tap::RouterExperts => None,
        Tap::AttnNorm
        | Tap::Q
        | Tap::K
        | Tap::V
        | Tap::AttnOut
        | Tap::AttnProj
        | Tap::AttnResidual
        | Tap::FfnNorm
        | Tap::ExpertOut
        | Tap::MoeOut => tap.sub_layer().zip(sub_layer).map(|(sub, taps)| sub.of(taps)),
    }
}

/// The tensor name of docs/architecture.md for `tap` at `layer`.
fn tensor_name(tap: Tap, layer: Option<usize>) -> String {
    match layer {
        Some(l) => format!("{tap}.{l}"),
        None => tap.to_string(),
    }
}

/// The rows `rows` of the candidate's and the baseline's float tap at `layer`, checked for shape and
/// for NaN/Inf.
fn float_rows<'a>(
    pair: &Pair<'a>,
    tap: Tap,
    layer: Option<usize>,
    rows: &Range<usize>,
) -> Result<(&'a [f64], &'a [f64], usize), Problem> {
    let name = tensor_name(tap, layer);
    let get = |(run, trace): (&str, &'a Trace)| -> Result<&'a Matrix, Problem> {
        let m = float_tap(trace, tap, layer)
            .ok_or_else(|| Problem::Unjudgeable(format!("run `{run}` recorded no `{name}`")))?;
        if m.cols == 0 || m.rows != trace.tokens.len() || m.data.len() != m.rows * m.cols {
            return Err(Problem::Unjudgeable(format!(
                "run `{run}`: `{name}` has {} rows of {} for {} tokens",
                m.rows,
                m.cols,
                trace.tokens.len()
            )));
        }
        Ok(m)
    };
    let (c, b) = (get(pair.candidate)?, get(pair.baseline)?);
    if c.cols != b.cols {
        return Err(Problem::Unjudgeable(format!(
            "`{name}` is {} wide in run `{}` and {} in run `{}`",
            c.cols, pair.candidate.0, b.cols, pair.baseline.0
        )));
    }
    let span = rows.start * c.cols..rows.end * c.cols;
    let (cs, bs) = (&c.data[span.clone()], &b.data[span]);
    for ((run, trace), values) in [(pair.candidate, cs), (pair.baseline, bs)] {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let (row, col) = (rows.start + i / c.cols, i % c.cols);
            return Err(non_finite(run, pair.prompt, trace, &name, row, col, values[i]));
        }
    }
    Ok((cs, bs, c.cols))
}

/// Where a NaN or Inf is, and where the trace's first one is when that is elsewhere.
fn non_finite(
    run: &str,
    prompt: &str,
    trace: &Trace,
    name: &str,
    row: usize,
    col: usize,
    value: f64,
) -> Problem {
    let mut location = format!("run `{run}`, prompt `{prompt}`: {name}[{row}, {col}] is {value}");
    if let Some((first, index)) = trace.first_non_finite() {
        let cols = matrix_by_name(trace, &first).map_or(1, |m| m.cols.max(1));
        let (r, c) = (index / cols, index % cols);
        if first != name || (r, c) != (row, col) {
            location.push_str(&format!("; the trace's first non-finite value is {first}[{r}, {c}]"));
        }
    }
    Problem::NonFinite(location)
}

/// The float matrix a trace tensor name (`hidden.3`, `logits`, ...) refers to.
fn matrix_by_name<'a>(trace: &'a Trace, name: &str) -> Option<&'a Matrix> {
    if name == "logits" {
        return Some(&trace.logits);
    }
    let (tensor, layer) = name.split_once('.')?;
    let l = layer.parse::<usize>().ok()?;
    if let Some(sub) = moe_engine::trace::SubLayerTap::from_name(tensor) {
        return trace.sub_layers.get(l).map(|taps| sub.of(taps));
    }
    let layer = trace.layers.get(l)?;
    match tensor {
        "hidden" => Some(&layer.hidden),
        "router_logits" => Some(&layer.router_logits),
        "router_weights" => Some(&layer.router_weights),
        _ => None,
    }
}

/// cosine, nmse, max_abs: one value per layer over the flattened rows; the worst decides. Isolated trials
/// set certified tie positions aside ([`TieRows::split`]).
fn distance_trial(
    criterion: &Criterion,
    pair: &Pair<'_>,
    layers: &[Option<usize>],
    rows: Range<usize>,
    ties: &TieRows<'_>,
) -> Judged {
    let metric = criterion.metric;
    let mut worst: Option<(f64, Option<usize>)> = None;
    let (mut tied, mut tie_gap) = (Vec::new(), 0.0f64);
    for &layer in layers {
        let (c, b, cols) = float_rows(pair, criterion.tap, layer, &rows)?;
        let skip = match ties.split(pair, criterion.tap, layer, &rows) {
            RowSplit::Differs(detail) => return Ok(differs(metric, detail)),
            RowSplit::Keep { tied: positions, gap } => {
                tie_gap = tie_gap.max(gap);
                tied.extend(positions.iter().map(|&p| (layer.unwrap_or(0), p)));
                positions
            }
        };
        if skip.len() == rows.len() {
            continue;
        }
        let (c, b) = match skip.is_empty() {
            true => (c.to_vec(), b.to_vec()),
            false => (without_rows(c, cols, rows.start, &skip), without_rows(b, cols, rows.start, &skip)),
        };
        let value = match metric {
            Metric::Cosine => metrics::cosine(&c, &b),
            Metric::Nmse => metrics::nmse(&c, &b),
            Metric::MaxAbs => metrics::max_abs(&c, &b),
            other @ (Metric::Kld
            | Metric::Argmax
            | Metric::TopkSet
            | Metric::Bitwise
            | Metric::Greedy
            | Metric::ErrorRatio) => {
                return Err(Problem::Unjudgeable(format!("metric {other} is not a distance over rows")));
            }
        };
        if worst.is_none_or(|(w, _)| is_worse(metric, value, w)) {
            worst = Some((value, layer));
        }
    }
    let Some((value, layer)) = worst else {
        let detail = format!("every position read is a certified router tie{}", tie_note(&tied, tie_gap));
        return Ok(TrialOutcome { value: f64::NAN, passed: true, detail, non_finite: None });
    };
    let passed = criterion.threshold.admits(value);
    let mut detail = format!("{metric} {} ({})", show(metric, value), criterion.threshold);
    if layers.len() > 1
        && let Some(l) = layer
    {
        detail.push_str(&format!(", worst at layer {l} of {}", layers.len()));
    }
    detail.push_str(&tie_note(&tied, tie_gap));
    Ok(TrialOutcome { value, passed, detail, non_finite: None })
}

/// A failed isolated trial whose layer chose other experts than the reference can excuse.
fn differs(metric: Metric, detail: String) -> TrialOutcome {
    let value = match metric.bound() {
        Some(Bound::Min) => -1.0,
        _ => f64::INFINITY,
    };
    TrialOutcome { value, passed: false, detail, non_finite: None }
}

/// ‖candidate - reference‖ / ‖baseline - reference‖ per layer, each over the rows read; the worst decides.
fn error_ratio_trial(
    criterion: &Criterion,
    rec: &Recorded,
    pair: &Pair<'_>,
    layers: &[Option<usize>],
    rows: Range<usize>,
) -> Judged {
    let Some(run) = criterion.metric_reference() else {
        return Err(Problem::Unjudgeable(format!(
            "criterion `{}` names no reference run for error_ratio",
            criterion.id
        )));
    };
    let reference = (run, recorded(rec, run, pair.prompt)?);
    let to_reference = Pair { candidate: pair.candidate, baseline: reference, prompt: pair.prompt };
    if reference.1.tokens != pair.candidate.1.tokens {
        return Err(Problem::Unjudgeable(format!(
            "reference run `{run}` recorded other tokens than run `{}` for prompt `{}`",
            pair.candidate.0, pair.prompt
        )));
    }
    layers_read(criterion.tap, None, &to_reference)?;
    let mut worst: Option<(metrics::ErrorRatio, f64, Option<usize>)> = None;
    for &layer in layers {
        let (c, b, _) = float_rows(pair, criterion.tap, layer, &rows)?;
        let (_, r, _) = float_rows(&to_reference, criterion.tap, layer, &rows)?;
        let errors = metrics::error_ratio(c, b, r);
        let value = errors.value();
        if worst.is_none_or(|(_, w, _)| is_worse(Metric::ErrorRatio, value, w)) {
            worst = Some((errors, value, layer));
        }
    }
    let Some((errors, value, layer)) = worst else {
        return Err(Problem::Unjudgeable("the trial reads no layer".into()));
    };
    let passed = criterion.threshold.admits(value);
    let mut detail = format!(
        "error_ratio {} ({}): ‖{c} - {run}‖ = {:.4e}, ‖{b} - {run}‖ = {:.4e}",
        show(Metric::ErrorRatio, value),
        criterion.threshold,
        errors.candidate_error,
        errors.baseline_error,
        c = pair.candidate.0,
        b = pair.baseline.0,
    );
    if errors.baseline_error == 0.0 {
        detail.push_str(&format!(" (run `{}` reproduces `{run}` exactly)", pair.baseline.0));
    }
    if layers.len() > 1
        && let Some(l) = layer
    {
        detail.push_str(&format!(", worst at layer {l} of {}", layers.len()));
    }
    Ok(TrialOutcome { value, passed, detail, non_finite: None })
}

/// Whether `value` is worse than `than` for `metric` (NaN is worst).
fn is_worse(metric: Metric, value: f64, than: f64) -> bool {
    if value.is_nan() {
        return !than.is_nan();
    }
    match metric.bound() {
        Some(Bound::Min) => value < than,
        _ => value > than,
    }
}

fn show(metric: Metric, value: f64) -> String {
    match metric {
        Metric::Cosine => format!("{value:.9} (1 - cos = {:.3e})", 1.0 - value),
        Metric::Nmse
        | Metric::MaxAbs
        | Metric::Kld
        | Metric::Argmax
        | Metric::TopkSet
        | Metric::Bitwise
        | Metric::Greedy
        | Metric::ErrorRatio => format!("{value:.4e}"),
    }
}

fn bitwise_trial(
    criterion: &Criterion,
    pair: &Pair<'_>,
    layers: &[Option<usize>],
    rows: Range<usize>,
    ties: &TieRows<'_>,
) -> Judged {
    for &layer in layers {
        if let RowSplit::Differs(detail) = ties.split(pair, criterion.tap, layer, &rows) {
            return Ok(TrialOutcome { value: f64::INFINITY, passed: false, detail, non_finite: None });
        }
    }
    let mut mismatches = 0usize;
    let mut first: Option<String> = None;
    let mut compared = 0usize;
    for &layer in layers {
        let name = tensor_name(criterion.tap, layer);
        let (diff, cols, len) = if criterion.tap == Tap::RouterExperts {
            let (c, b, k) = expert_rows(pair, layer, &rows)?;
            let mismatch = c.iter().zip(b).position(|(x, y)| x != y);
            let count = c.iter().zip(b).filter(|(x, y)| x != y).count();
            (metrics::BitwiseDiff { mismatches: count, first: mismatch }, k, c.len())
        } else {
            let (c, b, cols) = float_rows(pair, criterion.tap, layer, &rows)?;
            (metrics::bitwise(c, b), cols, c.len())
        };
        compared += len;
        mismatches += diff.mismatches;
        if let (None, Some(i)) = (&first, diff.first) {
            first = Some(format!("{name}[{}, {}]", rows.start + i / cols.max(1), i % cols.max(1)));
        }
    }
    let detail = match &first {
        None => format!("all {compared} values bit-identical"),
        Some(at) => format!("{mismatches} of {compared} values differ in their f32 bits; the first at {at}"),
    };
    Ok(TrialOutcome { value: mismatches as f64, passed: mismatches == 0, detail, non_finite: None })
}

/// KL(baseline || candidate) of each position's logits; the worst position decides.
fn kld_trial(criterion: &Criterion, pair: &Pair<'_>, rows: Range<usize>) -> Judged {
    let (c, b, cols) = float_rows(pair, Tap::Logits, None, &rows)?;
    let per_row: Vec<f64> = c.chunks(cols).zip(b.chunks(cols)).map(|(c, b)| metrics::kld(b, c)).collect();
    let (worst_row, value) =
        per_row.iter().copied().enumerate().fold((0, f64::NEG_INFINITY), |(wr, wv), (r, v)| {
            if v > wv || v.is_nan() { (r, v) } else { (wr, wv) }
        });
    let mean = per_row.iter().sum::<f64>() / per_row.len().max(1) as f64;
    let passed = criterion.threshold.admits(value);
    let detail = format!(
        "kld {value:.4e} nats at position {} ({}); mean {mean:.4e} over {} positions",
        rows.start + worst_row,
        criterion.threshold,
        per_row.len()
    );
    Ok(TrialOutcome { value, passed, detail, non_finite: None })
}

/// The same top token at each position read (value 1 = agree, 0 = differ).
fn argmax_trial(pair: &Pair<'_>, rows: Range<usize>) -> Judged {
    let (c, b, cols) = float_rows(pair, Tap::Logits, None, &rows)?;
    for (i, (cr, br)) in c.chunks(cols).zip(b.chunks(cols)).enumerate() {
        let (ct, bt) = (metrics::argmax(cr), metrics::argmax(br));
        if ct != bt {
            let detail = format!(
                "position {}: run `{}` picks token {ct} (logit {:.6}), run `{}` token {bt} (logit {:.6}); \
                 the baseline's top-2 gap is {:.3e}",
                rows.start + i,
                pair.candidate.0,
                cr[ct],
                pair.baseline.0,
                br[bt],
                metrics::top2_gap(br)
            );
            return Ok(TrialOutcome { value: 0.0, passed: false, detail, non_finite: None });
        }
    }
    let (ct, last) = (metrics::argmax(&c[c.len() - cols..]), rows.end - 1);
    let detail = match rows.len() {
        1 => format!("both pick token {ct} at position {last}"),
        n => format!("the same token at all {n} positions"),
    };
    Ok(TrialOutcome { value: 1.0, passed: true, detail, non_finite: None })
}

/// The expert ids of the candidate and the baseline at `layer`, rows `rows`, and k.
fn expert_rows<'a>(
    pair: &Pair<'a>,
    layer: Option<usize>,
    rows: &Range<usize>,
) -> Result<(&'a [u32], &'a [u32], usize), Problem> {
    let name = tensor_name(Tap::RouterExperts, layer);
    let get = |(run, trace): (&str, &'a Trace)| -> Result<(&'a [u32], usize), Problem> {
        let ids = layer.and_then(|l| trace.layers.get(l)).map(|l| l.router_experts.as_slice());
        let ids = ids.ok_or_else(|| Problem::Unjudgeable(format!("run `{run}` recorded no `{name}`")))?;
        let t = trace.tokens.len();
        if t == 0 || ids.is_empty() || !ids.len().is_multiple_of(t) {
            return Err(Problem::Unjudgeable(format!(
                "run `{run}`: `{name}` holds {} ids for {t} tokens",
                ids.len()
            )));
        }
        Ok((ids, ids.len() / t))
    };
    let ((c, kc), (b, kb)) = (get(pair.candidate)?, get(pair.baseline)?);
    if kc != kb {
        return Err(Problem::Unjudgeable(format!(
            "run `{}` chose {kc} experts per token and run `{}` {kb}",
            pair.candidate.0, pair.baseline.0
        )));
    }
    let span = rows.start * kc..rows.end * kc;
    Ok((&c[span.clone()], &b[span], kc))
}

/// The same experts at every (layer, position) read; swaps the reference cannot separate are ties. The
/// margin is the criterion's `tie_margin`, else the contract's `ties.margin`; the reference is the
/// criterion's, else the contract's tie reference, read only where the sets differ (the gate records it
/// for the prompts where they do).
fn topk_trial(
    contract: &Contract,
    criterion: &Criterion,
    rec: &Recorded,
    pair: &Pair<'_>,
    layers: &[Option<usize>],
    rows: Range<usize>,
) -> Judged {
    let run = criterion.tie_reference().unwrap_or_else(|| ties::reference_run(contract));
    let margin = criterion.tie_margin.unwrap_or(contract.ties.margin);
    let reference = rec.tie_reference(run, pair.prompt);
    let (mut compared, mut tied, mut differ) = (0usize, 0usize, 0usize);
    let mut first: Option<String> = None;
    for &layer in layers {
        let (c, b, k) = expert_rows(pair, layer, &rows)?;
        // The experts were chosen from the router logits: a NaN or Inf there fails the trial too.
        float_rows(pair, Tap::RouterLogits, layer, &rows)?;
        for (i, (cr, br)) in c.chunks(k).zip(b.chunks(k)).enumerate() {
            let row = rows.start + i;
            compared += 1;
            if metrics::topk_set(cr, br, None, None) == TopkVerdict::Same {
                continue;
            }
            // The tie reference may stop at the first layer where the runs route differently: a swap
            // past it is downstream of that one (its cascade), not a tie to measure on its own.
            let covered = |r: &Trace| layer.is_none_or(|l| l < r.layers.len());
            let probs = match reference {
                Some(r) if covered(r) => Some(reference_probs((run, r), pair.prompt, layer, row)?),
                _ => None,
            };
            match metrics::topk_set(cr, br, probs.as_deref(), Some(margin)) {
                TopkVerdict::Same => {}
                TopkVerdict::Tie { .. } => tied += 1,
                TopkVerdict::Differ { only_candidate, only_baseline, gap } => {
                    differ += 1;
                    first.get_or_insert_with(|| {
                        let gap = match gap {
                            Some(g) => format!(", reference probability gap {g:.3e}"),
                            None if reference.is_none() => {
                                format!(", no trace of reference run `{run}` to certify a tie")
                            }
                            None if probs.is_none() => ", past the layers of the tie reference (it stops at the first routing \
                                 difference, of which this is the cascade)"
                                .to_string(),
                            None => String::new(),
                        };
                        let margin = probs.as_deref().map_or(String::new(), |p| {
                            format!(", reference router margin {:.3e}", metrics::router_margin(p, k))
                        });
                        format!(
                            "layer {}, position {row}: run `{}` alone chose {only_candidate:?}, run `{}` alone \
                             {only_baseline:?}{gap}{margin}",
                            layer.map_or("-".to_string(), |l| l.to_string()),
                            pair.candidate.0,
                            pair.baseline.0
                        )
                    });
                }
            }
        }
    }
    let tie_note = format!("{tied} certified ties (reference gap < {margin:e})");
    let detail = match &first {
        None => format!("no real difference over {compared} (layer, position) pairs; {tie_note}"),
        Some(at) => format!(
            "{differ} of {compared} (layer, position) pairs chose other experts; {tie_note}; first: {at}"
        ),
    };
    Ok(TrialOutcome { value: differ as f64, passed: differ == 0, detail, non_finite: None })
}

/// The reference's router probabilities at (layer, row), checked for NaN/Inf.
fn reference_probs(
    (run, trace): (&str, &Trace),
    prompt: &str,
    layer: Option<usize>,
    row: usize,
) -> Result<Vec<f64>, Problem> {
    let name = tensor_name(Tap::RouterLogits, layer);
    let m = float_tap(trace, Tap::RouterLogits, layer)
        .filter(|m| row < m.rows && m.data.len() == m.rows * m.cols)
        .ok_or_else(|| {
            Problem::Unjudgeable(format!("reference run `{run}` recorded no `{name}` row {row}"))
        })?;
    let logits = m.row(row);
    if let Some(col) = logits.iter().position(|v| !v.is_finite()) {
        return Err(non_finite(run, prompt, trace, &name, row, col, logits[col]));
    }
    Ok(metrics::softmax(logits))
}

/// The same tokens for `steps` greedy steps; at the first difference, top-5 membership both ways.
fn greedy_trial(criterion: &Criterion, trial: &TrialPlan, rec: &Recorded) -> Judged {
    let steps = criterion.steps.unwrap_or(0);
    let get = |run: &str| -> Result<&[crate::GreedyStep], Problem> {
        let recorded = rec.greedy_steps(run, &trial.prompt).ok_or_else(|| {
            Problem::Unjudgeable(format!(
                "no greedy decode was recorded for run `{run}` on prompt `{}`",
                trial.prompt
            ))
        })?;
        if recorded.len() < steps {
            return Err(Problem::Unjudgeable(format!(
                "run `{run}` recorded {} greedy steps on prompt `{}`; the criterion compares {steps}",
                recorded.len(),
                trial.prompt
            )));
        }
        if let Some((i, (t, v))) = recorded[..steps].iter().enumerate().find_map(|(i, s)| {
            let in_top5 = s.top5.iter().find(|(_, v)| !v.is_finite()).copied();
            in_top5.or(s.non_finite).map(|x| (i, x))
        }) {
            return Err(Problem::NonFinite(format!(
                "run `{run}`, prompt `{}`: greedy step {i}, the logit of token {t} is {v}",
                trial.prompt
            )));
        }
        Ok(recorded)
    };
    let [candidate, baseline] = &criterion.compare;
    let verdict = metrics::greedy(get(candidate)?, get(baseline)?, steps);
    let Some(d) = verdict.divergence else {
        let detail = format!("the same {steps} tokens");
        return Ok(TrialOutcome { value: verdict.matched as f64, passed: true, detail, non_finite: None });
    };
    let yes_no = |b: bool| if b { "in" } else { "not in" };
    let mut detail = format!(
        "step {} of {steps}: run `{candidate}` picks {} ({} `{baseline}`'s top-5), run `{baseline}` picks {} ({} \
         `{candidate}`'s top-5)",
        d.step,
        d.candidate_token,
        yes_no(d.candidate_in_baseline_top5),
        d.baseline_token,
        yes_no(d.baseline_in_candidate_top5)
    );
    if d.is_near_tie() {
        detail.push_str("; a near-tie (vLLM's check_logprobs_close would accept it)");
    }
    Ok(TrialOutcome { value: verdict.matched as f64, passed: false, detail, non_finite: None })
}
