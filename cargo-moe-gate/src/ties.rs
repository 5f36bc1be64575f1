//! Layer-isolated recordings and router-tie certification: the part of the verdict that rounding must not
//! be able to flip (docs/gate.md, "Router ties").
//!
//! Three steps, between recording and the verdict:
//! 1. [`TieWork::record_isolated`]: for every `mode: isolated` criterion, the candidate's layers each run
//!    alone (`Forward::run_layer`) on the baseline's input to that layer.
//! 2. [`TieWork::record_references`]: for every prompt where two compared runs (or an isolated layer and
//!    its baseline) choose different experts anywhere, the reference's layers up to the deepest such
//!    layer, so the swap can be measured against it (prompts without a swap never pay for a reference).
//! 3. [`TieWork::certify`]: for every prompt with failing accumulated trials, the first layer where the
//!    runs a trial reads route differently; the swap is a certified tie when the reference separates
//!    exactly the experts involved by less than `ties.margin` and every compared run computes that layer
//!    right on the reference's input. The failing trials from that layer on are then a tie cascade.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use moe_contracts::ties::{self, Flip};
use moe_contracts::{Contract, Criterion, Metric, Prompt, Recorded, TiePolicy, TrialOutcome, TrialPlan};
use moe_engine::backend::{BackendKind, Forward};
use moe_engine::trace::{Matrix, Trace};
use moe_engine::weights::ModelWeights;
use serde::{Deserialize, Serialize};

use crate::error::GateError;
use crate::report::TrialStatus;
use crate::trials::{Selection, criterion_of};

/// A first routing difference between two runs on one prompt, and whether it is a certified tie.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TieReport {
    pub prompt: String,
    /// The two runs whose expert choice differs.
    pub runs: [String; 2],
    /// The first layer where they route differently; for a next-token tie (`tokens`), the layer count
    /// (the choice is made after the last layer).
    pub layer: usize,
    /// For a failure in greedy decoding: the step whose input (the prompt and the tokens both runs agreed
    /// on before it) was traced again to find the swap. `None`: the prompt itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    /// For runs that route alike but choose different next tokens: the two tokens (`runs[0]`'s first);
    /// `gap` is then the reference's probability gap between them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<[u32; 2]>,
    /// Every position that differs at that layer.
    pub swaps: Vec<TieSwap>,
    /// The largest reference probability gap over the swaps (`None`: not measurable).
    pub gap: Option<f64>,
    /// The margin it was held to (`ties.margin`).
    pub margin: f64,
    /// Each compared non-reference run's layer, fed the reference's input: nmse against the reference.
    pub isolated: Vec<IsolatedCheck>,
    /// Whether the swap is a certified tie.
    pub certified: bool,
    /// Why, in one sentence.
    pub reason: String,
    /// The failing trials it explains (excused under `ties.policy: excuse`).
    pub trials: Vec<String>,
}

impl TieReport {
    /// Where the runs part, in words: `layer 12`, `layer 12, greedy step 19`, `next token, greedy step 19`.
    pub fn at(&self) -> String {
        let place = match self.tokens {
            Some([a, b]) => format!("next token {a} vs {b}"),
            None => format!("layer {}", self.layer),
        };
        match self.step {
            Some(step) => format!("{place}, greedy step {step}"),
            None => place,
        }
    }
}

/// One position's swap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TieSwap {
    pub position: usize,
    /// Experts only `runs[0]` chose.
    pub only_first: Vec<u32>,
    /// Experts only `runs[1]` chose.
    pub only_second: Vec<u32>,
}

/// A layer run alone on the reference's input, against the reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IsolatedCheck {
    pub run: String,
    pub nmse: f64,
    /// Positions set aside because the run's own expert choice there is a certified tie.
    pub tied_positions: Vec<usize>,
}

/// The most prompts whose reference the tie steps add. On the production shape an f64 reference prefix
/// costs seconds per prompt; a real defect flips experts on most prompts, and those failures stand
/// without certification anyway. Past this many, a swap is reported as not certified, with the reason.
pub const MAX_TIE_REFERENCES: usize = 24;

/// What the tie steps read and add to.
pub struct TieWork<'a> {
    pub contract: &'a Contract,
    pub weights: &'a Arc<ModelWeights>,
    pub prompts: &'a [Prompt],
    pub recorded: &'a mut Recorded,
    pub backends: &'a mut HashMap<String, Box<dyn Forward>>,
}

impl TieWork<'_> {
    /// Step 1: the isolated layers of every selected `mode: isolated` trial's (candidate, baseline,
    /// prompt), each recorded once.
    pub fn record_isolated(&mut self, plans: &[TrialPlan], selection: &[Selection]) -> Result<(), GateError> {
        for (plan, _) in plans.iter().zip(selection).filter(|(_, s)| **s == Selection::Run) {
            let criterion = criterion_of(self.contract, plan);
            if !criterion.is_isolated() {
                continue;
            }
            let [candidate, baseline] = &criterion.compare;
            let key = (candidate.clone(), baseline.clone(), plan.prompt.clone());
            if self.recorded.isolated.contains_key(&key) {
                continue;
            }
            let trace = self.isolated_layers(candidate, baseline, &plan.prompt)?;
            self.recorded.isolated.insert(key, trace);
        }
        Ok(())
    }

    /// The candidate's layers on the baseline's inputs: layer 0 is the candidate's own (its input is
    /// the token embeddings both runs share), layer `l` runs alone on the baseline's hidden state `l - 1`.
    fn isolated_layers(&mut self, candidate: &str, baseline: &str, prompt: &str) -> Result<Trace, GateError> {
        let missing = |run: &str| {
            GateError::Usage(format!(
                "internal: run `{run}` has no trace of prompt `{prompt}` to isolate layers on"
            ))
        };
        let own = self.recorded.trace(candidate, prompt).ok_or_else(|| missing(candidate))?;
        let base = self.recorded.trace(baseline, prompt).ok_or_else(|| missing(baseline))?;
        let mut out = Trace::new(&own.model, &own.backend, &own.policy, own.precision);
        out.tokens = own.tokens.clone();
        let inputs: Vec<Matrix> = base.layers.iter().map(|l| l.hidden.clone()).collect();
        let first = own.layers.first().cloned();
        out.layers.extend(first);
        // A run whose criteria read sub-layer taps has them in its trace; its isolated layers get them too.
        let tapped = own.record_sub_layers;
        if tapped {
            out = out.with_sub_layer_taps();
            out.sub_layers.extend(own.sub_layers.first().cloned());
        }
        let backend = self.backend(candidate)?;
        for (l, input) in inputs.iter().enumerate().take(inputs.len().saturating_sub(1)) {
            let what = || format!("run `{candidate}`: layer {} alone on `{baseline}`'s input", l + 1);
            if tapped {
                let (layer, taps) =
                    backend.run_layer_tapped(l + 1, input).map_err(|e| GateError::engine(what(), e))?;
                out.layers.push(layer);
                out.sub_layers.push(taps);
            } else {
                out.layers.push(backend.run_layer(l + 1, input).map_err(|e| GateError::engine(what(), e))?);
            }
        }
        Ok(out)
    }

    /// Step 2: the reference's layers for every prompt where some pair of runs that a selected trial
    /// compares (or an isolated layer and its baseline) chooses different experts, up to the deepest
    /// layer where one does. Returns notes for prompts left without one.
    pub fn record_references(
        &mut self,
        plans: &[TrialPlan],
        selection: &[Selection],
    ) -> Result<Vec<String>, GateError> {
        let reference = ties::reference_run(self.contract).to_string();
        let mut deepest: BTreeMap<usize, usize> = BTreeMap::new();
        // One look per (criterion, prompt): every trial of a per-layer criterion reads the same runs.
        let mut seen: std::collections::HashSet<(&str, &str)> = std::collections::HashSet::new();
        for (plan, _) in plans.iter().zip(selection).filter(|(_, s)| **s == Selection::Run) {
            if !seen.insert((plan.criterion.as_str(), plan.prompt.as_str())) {
                continue;
            }
            let criterion = criterion_of(self.contract, plan);
            let Some(prompt_at) = self.prompts.iter().position(|p| p.id == plan.prompt) else { continue };
            if let Some(layer) = self.deepest_swap(criterion, plan) {
                let d = deepest.entry(prompt_at).or_insert(layer);
                *d = (*d).max(layer);
            }
        }
        let mut notes = Vec::new();
        let mut added = 0usize;
        for (prompt_at, layer) in deepest {
            let prompt = self.prompts[prompt_at].clone();
            let have = self.recorded.tie_reference(&reference, &prompt.id).map_or(0, |t| t.layers.len());
            if have > layer {
                continue;
            }
            if added == MAX_TIE_REFERENCES {
                notes.push(format!(
                    "prompt `{}`: no reference to certify its router swaps (the gate adds at most \
                     {MAX_TIE_REFERENCES} per run; filter the gate to this prompt to certify them)",
                    prompt.id
                ));
                continue;
            }
            added += 1;
            let trace = self.reference_prefix(&reference, &prompt, layer)?;
            self.recorded.tie_references.insert(prompt.id.clone(), trace);
        }
        Ok(notes)
    }

    /// The deepest layer at which the runs `plan` reads route a position differently: for an isolated
    /// trial, its isolated layers against the baseline; otherwise the first flip of each pair of runs.
    fn deepest_swap(&self, criterion: &Criterion, plan: &TrialPlan) -> Option<usize> {
        let [candidate, baseline] = &criterion.compare;
        let base = self.recorded.trace(baseline, &plan.prompt)?;
        if criterion.is_isolated() {
            let iso = self.recorded.isolated(candidate, baseline, &plan.prompt)?;
            let k = base.top_k();
            return (0..iso.layers.len().min(base.layers.len()))
                .rev()
                .find(|&l| !ties::swaps_at(&iso.layers[l], &base.layers[l], k).is_empty());
        }
        pairs(&plan.runs)
            .filter_map(|(a, b)| {
                let (ta, tb) = (self.recorded.trace(a, &plan.prompt)?, self.recorded.trace(b, &plan.prompt)?);
                ties::first_flip(ta, tb).map(|f| f.layer)
            })
            .max()
    }

    /// The reference's layers `0..=last` of `prompt`: each layer run alone on the previous one's output,
    /// which is exactly the reference forward's residual stream (the f64 reference has one way to
    /// compute), without the layers after `last` and the LM head.
    fn reference_prefix(
        &mut self,
        reference: &str,
        prompt: &Prompt,
        last: usize,
    ) -> Result<Trace, GateError> {
        let mut input = embeddings(self.weights, &prompt.tokens);
        let backend = self.backend(reference)?;
        let mut trace = Trace::new("", "reference", "fast", moe_engine::trace::Precision::F64);
        trace.tokens = prompt.tokens.clone();
        for l in 0..=last.min(backend.config().n_layer.saturating_sub(1)) {
            let layer = backend.run_layer(l, &input).map_err(|e| {
                GateError::engine(format!("the tie reference, layer {l} of prompt `{}`", prompt.id), e)
            })?;
            input = layer.hidden.clone();
            trace.layers.push(layer);
        }
        Ok(trace)
    }

    /// The backend of `run`, created (and kept) when it has none yet; an unknown run id is the
    /// reference the gate creates.
    fn backend(&mut self, run: &str) -> Result<&mut dyn Forward, GateError> {
        crate::record::backend_for(self.backends, self.contract, self.weights, run, "tie certification")
    }

    /// Step 3: every failing accumulated trial whose runs first route differently at a layer at or
    /// before its own (any layer, for a trial over logits or greedy steps) is checked against that
    /// flip's certification; under `ties.policy: excuse` the certified ones become
    /// [`TrialStatus::TieExcused`]. Returns one report per (prompt, pair of runs) flip that explains a
    /// failure.
    pub fn certify(
        &mut self,
        plans: &[TrialPlan],
        statuses: &mut [TrialStatus],
        outcomes: &[Option<TrialOutcome>],
    ) -> Vec<TieReport> {
        let mut reports: Vec<TieReport> = Vec::new();
        let mut flips: HashMap<(String, String, String), Option<Flip>> = HashMap::new();
        let mut decode_budget = MAX_TIE_REFERENCES;
        for (i, plan) in plans.iter().enumerate() {
            if statuses[i] != TrialStatus::Failed || outcomes[i].is_none() {
                continue;
            }
            let criterion = criterion_of(self.contract, plan);
            if criterion.is_isolated() {
                continue;
            }
            let mut explaining: Option<usize> = None;
            for (a, b) in pairs(&plan.runs) {
                let key = (a.to_string(), b.to_string(), plan.prompt.clone());
                let flip = flips.entry(key).or_insert_with(|| self.flip(a, b, &plan.prompt)).clone();
                let Some(flip) = flip else { continue };
                if plan.layer.is_some_and(|l| l < flip.layer) {
                    continue;
                }
                let at = match reports.iter().position(|r| r.prompt == plan.prompt && r.runs == [a, b]) {
                    Some(at) => at,
                    None => {
                        reports.push(self.certify_flip(a, b, &plan.prompt, &flip, plans, statuses));
                        reports.len() - 1
                    }
                };
                if reports[at].certified || explaining.is_none() {
                    explaining = Some(at);
                }
                if reports[at].certified {
                    break;
                }
            }
            if explaining.is_none() && matches!(criterion.metric, Metric::Greedy | Metric::Argmax) {
                explaining = self.decode_report(criterion, plan, &mut reports, &mut decode_budget);
            }
            let Some(at) = explaining else { continue };
            reports[at].trials.push(plan.name.clone());
            if reports[at].certified && self.contract.ties.policy == TiePolicy::Excuse {
                statuses[i] = TrialStatus::TieExcused(tie_sentence(&reports[at]));
            }
        }
        reports
    }

    /// The index in `reports` of the next-token (decode) certification of `plan`'s runs and prompt,
    /// made when it is not there yet and `budget` allows another reference forward.
    fn decode_report(
        &mut self,
        criterion: &Criterion,
        plan: &TrialPlan,
        reports: &mut Vec<TieReport>,
        budget: &mut usize,
    ) -> Option<usize> {
        let [a, b] = &criterion.compare;
        let same = |r: &TieReport| {
            r.prompt == plan.prompt
                && r.runs == [a.as_str(), b.as_str()]
                && (r.step.is_some() || r.tokens.is_some())
        };
        if let Some(at) = reports.iter().position(same) {
            return Some(at);
        }
        let prompt = self.prompts.iter().find(|p| p.id == plan.prompt)?.clone();
        let report = if *budget == 0 {
            let mut r = self.report(a, b, &prompt.id);
            r.reason = format!(
                "not traced again: the gate certifies at most {MAX_TIE_REFERENCES} decode steps per run (filter \
                 the gate to this prompt to certify it)"
            );
            r
        } else {
            *budget -= 1;
            self.certify_decode(a, b, &prompt, criterion)
        };
        reports.push(report);
        Some(reports.len() - 1)
    }

    fn flip(&self, a: &str, b: &str, prompt: &str) -> Option<Flip> {
        ties::first_flip(self.recorded.trace(a, prompt)?, self.recorded.trace(b, prompt)?)
    }

    /// Whether the flip of runs `a`, `b` on `prompt` is a certified tie: the reference's gap between
    /// exactly the swapped experts is below the margin, every compared non-reference run is right on the
    /// reference's input at that layer, and no isolated trial of the same runs failed up to that layer.
    fn certify_flip(
        &mut self,
        a: &str,
        b: &str,
        prompt: &str,
        flip: &Flip,
        plans: &[TrialPlan],
        statuses: &[TrialStatus],
    ) -> TieReport {
        let reference = ties::reference_run(self.contract).to_string();
        let mut report = self.report(a, b, prompt);
        report.layer = flip.layer;
        report.swaps = tie_swaps(flip);
        let Some(ref_trace) = self.recorded.tie_reference(&reference, prompt).cloned() else {
            report.reason = format!("no reference trace of prompt `{prompt}` to measure the swap against");
            return report;
        };
        if let Err(why) = self.judge_flip(&mut report, &ref_trace, flip) {
            report.reason = why;
            return report;
        }
        if let Some(name) = failed_isolated_trial(self.contract, plans, statuses, [a, b], prompt, flip.layer)
        {
            report.reason = format!("the isolated trial {name} fails at or before layer {}", flip.layer);
            return report;
        }
        self.certified(report)
    }

    /// An empty (not certified) report of runs `a`, `b` on `prompt`.
    fn report(&self, a: &str, b: &str, prompt: &str) -> TieReport {
        TieReport {
            prompt: prompt.to_string(),
            runs: [a.to_string(), b.to_string()],
            layer: 0,
            step: None,
            tokens: None,
            swaps: Vec::new(),
            gap: None,
            margin: self.contract.ties.margin,
            isolated: Vec::new(),
            certified: false,
            reason: String::new(),
            trials: Vec::new(),
        }
    }

    /// Marks `report` certified, with the sentence that says why.
    fn certified(&self, mut report: TieReport) -> TieReport {
        let what = if report.tokens.is_some() { "next tokens" } else { "swapped experts" };
        let layers = if report.tokens.is_some() {
            "every layer is".to_string()
        } else {
            format!("layer {} is", report.layer)
        };
        report.certified = true;
        report.reason = format!(
            "the reference separates the {what} by {:.3e} < ties.margin {:e} and {layers} right on the \
             reference's input in every compared run: rounding decides this choice",
            report.gap.unwrap_or(f64::NAN),
            report.margin
        );
        report
    }

    /// The rule of a routing flip, against `reference` (a trace of the same tokens): the reference's gap
    /// between exactly the swapped experts below the margin, and every compared non-reference run right
    /// on the reference's input at the flip's layer. Err: why it is not a tie.
    fn judge_flip(&mut self, report: &mut TieReport, reference: &Trace, flip: &Flip) -> Result<(), String> {
        let margin = report.margin;
        report.gap = ties::flip_gap(reference, flip);
        match report.gap {
            Some(g) if g < margin => {}
            Some(g) => {
                return Err(format!(
                    "the reference separates the swapped experts by {g:.3e} >= ties.margin {margin:e}: not a tie"
                ));
            }
            None => return Err("the reference cannot measure the swap (not one expert for one)".into()),
        }
        for run in self.compared_runs(&report.runs) {
            let check = self.isolated_check(&run, reference, &report.prompt, flip.layer)?;
            report.isolated.push(check);
        }
        self.isolated_within_bound(report, &[flip.layer])
    }

    /// The compared runs that are not the reference (whose layers the isolated checks run).
    fn compared_runs(&self, runs: &[String; 2]) -> Vec<String> {
        runs.iter()
            .filter(|r| self.contract.runs.get(*r).is_none_or(|s| s.backend != BackendKind::Reference))
            .cloned()
            .collect()
    }

    /// Err when an isolated check of `report` is above `ties.isolated_nmse` (or NaN): a defect, whatever
    /// the margin.
    fn isolated_within_bound(&self, report: &TieReport, layers: &[usize]) -> Result<(), String> {
        let bound = self.contract.ties.isolated_nmse;
        match report.isolated.iter().find(|c| c.nmse > bound || c.nmse.is_nan()) {
            Some(bad) => Err(format!(
                "layer{} {} of `{}` computes something else on the reference's input (isolated nmse {:.3e} > \
                 ties.isolated_nmse {bound:e}): a defect, whatever the margin",
                if layers.len() == 1 { "" } else { "s" },
                match layers {
                    [one] => one.to_string(),
                    _ => format!("{}..={}", layers.first().unwrap_or(&0), layers.last().unwrap_or(&0)),
                },
                bad.run,
                bad.nmse
            )),
            None => Ok(()),
        }
    }

    /// A failing greedy (or last-position argmax) trial whose runs route every layer of the prompt
    /// alike: the input of the step where their tokens part (the prompt and the tokens both chose before
    /// it) is traced again as one forward on both runs and on the reference. A routing flip there is held
    /// to the rule of [`Self::judge_flip`]; with none, the two next tokens are a tie when the reference
    /// separates exactly them by less than the margin and every layer of every compared run is right on
    /// the reference's input.
    fn certify_decode(&mut self, a: &str, b: &str, prompt: &Prompt, criterion: &Criterion) -> TieReport {
        let mut report = self.report(a, b, &prompt.id);
        let parting = match self.parting(a, b, prompt, criterion) {
            Ok(p) => p,
            Err(why) => {
                report.reason = why;
                return report;
            }
        };
        report.step = (criterion.metric == Metric::Greedy).then_some(parting.step);
        let reference = ties::reference_run(self.contract).to_string();
        let traced = [a, b, reference.as_str()].map(|run| self.trace_tokens(run, &parting.tokens));
        let [ta, tb, tr] = match traced {
            [Ok(ta), Ok(tb), Ok(tr)] => [ta, tb, tr],
            [x, y, z] => {
                report.reason = [x, y, z].into_iter().find_map(Result::err).unwrap_or_default();
                return report;
            }
        };
        let judged = match ties::first_flip(&ta, &tb) {
            Some(flip) => {
                report.layer = flip.layer;
                report.swaps = tie_swaps(&flip);
                self.judge_flip(&mut report, &tr, &flip)
            }
            None => {
                report.layer = tr.layers.len();
                report.tokens = Some(parting.next);
                self.judge_token_tie(&mut report, &tr)
            }
        };
        match judged {
            Ok(()) => self.certified(report),
            Err(why) => {
                report.reason = why;
                report
            }
        }
    }

    /// Where runs `a` and `b` first choose different tokens on `prompt` under `criterion` (greedy: the
    /// first differing step; argmax: the prompt's last position).
    fn parting(&self, a: &str, b: &str, prompt: &Prompt, criterion: &Criterion) -> Result<Parting, String> {
        let id = &prompt.id;
        match criterion.metric {
            Metric::Greedy => {
                let get = |run: &str| {
                    self.recorded
                        .greedy_steps(run, id)
                        .ok_or_else(|| format!("run `{run}` has no greedy decode of prompt `{id}`"))
                };
                let (ga, gb) = (get(a)?, get(b)?);
                let steps = criterion.steps.unwrap_or(ga.len());
                let verdict = moe_contracts::metrics::greedy(ga, gb, steps);
                let d =
                    verdict.divergence.ok_or_else(|| format!("the greedy decodes of `{id}` do not part"))?;
                let mut tokens = prompt.tokens.clone();
                tokens.extend(ga[..d.step].iter().map(|s| s.token));
                Ok(Parting { step: d.step, tokens, next: [d.candidate_token, d.baseline_token] })
            }
            Metric::Argmax if criterion.is_per(moe_contracts::Per::Position) => {
                Err("a per-position argmax trial is certified only through a routing flip".into())
            }
            Metric::Argmax => {
                let last = |run: &str| {
                    self.recorded
                        .trace(run, id)
                        .and_then(|t| (t.logits.rows > 0).then(|| argmax(t.logits.row(t.logits.rows - 1))))
                        .ok_or_else(|| format!("run `{run}` has no logits of prompt `{id}`"))
                };
                Ok(Parting { step: 0, tokens: prompt.tokens.clone(), next: [last(a)?, last(b)?] })
            }
            other @ (Metric::Cosine
            | Metric::Nmse
            | Metric::MaxAbs
            | Metric::Kld
            | Metric::TopkSet
            | Metric::Bitwise
            | Metric::ErrorRatio) => {
                Err(format!("a failing `{}` trial with no routing flip is not a tie", other.as_str()))
            }
        }
    }

    /// A fresh forward of `tokens` on `run`, traced.
    fn trace_tokens(&mut self, run: &str, tokens: &[u32]) -> Result<Trace, String> {
        let backend = self.backend(run).map_err(|e| e.to_string())?;
        let mut trace = crate::record::new_trace("", backend);
        trace.tokens = tokens.to_vec();
        backend
            .forward(tokens, Some(&mut trace))
            .map_err(|e| format!("cannot trace {} tokens on `{run}` to find the swap: {e}", tokens.len()))?;
        Ok(trace)
    }

    /// The rule of a next-token tie, against `reference` (a trace of the same tokens with logits).
    fn judge_token_tie(&mut self, report: &mut TieReport, reference: &Trace) -> Result<(), String> {
        let [x, y] = report.tokens.unwrap_or_default();
        let margin = report.margin;
        report.gap = ties::token_gap(reference, x, y);
        match report.gap {
            Some(g) if g < margin => {}
            Some(g) => {
                return Err(format!(
                    "the reference separates the next tokens {x} and {y} by {g:.3e} >= ties.margin {margin:e}: \
                     not a tie"
                ));
            }
            None => return Err(format!("the reference cannot measure next tokens {x} and {y}")),
        }
        let layers: Vec<usize> = (0..reference.layers.len()).collect();
        for run in self.compared_runs(&report.runs) {
            let mut worst = IsolatedCheck { run: run.clone(), nmse: 0.0, tied_positions: Vec::new() };
            for &layer in &layers {
                let check = self.isolated_check(&run, reference, &report.prompt, layer)?;
                if check.nmse > worst.nmse || check.nmse.is_nan() {
                    worst.nmse = check.nmse;
                }
                worst.tied_positions.extend(check.tied_positions);
            }
            worst.tied_positions.sort_unstable();
            worst.tied_positions.dedup();
            report.isolated.push(worst);
        }
        self.isolated_within_bound(report, &layers)
    }

    /// `run`'s layer `layer` on the reference's input against the reference's output, with the positions
    /// where the run's own expert choice is a certified tie set aside (a swapped expert moves that row by
    /// ~1 %, which is routing, not the layer's arithmetic). Err: a swap that is not a tie.
    fn isolated_check(
        &mut self,
        run: &str,
        reference: &Trace,
        prompt: &str,
        layer: usize,
    ) -> Result<IsolatedCheck, String> {
        let input = match layer {
            0 => embeddings(self.weights, &reference.tokens),
            l => reference.layers[l - 1].hidden.clone(),
        };
        let got = self
            .backend(run)
            .and_then(|b| {
                b.run_layer(layer, &input)
                    .map_err(|e| GateError::engine(format!("run `{run}`: layer {layer} alone"), e))
            })
            .map_err(|e| format!("cannot run layer {layer} of `{run}` alone for prompt `{prompt}`: {e}"))?;
        let expected = &reference.layers[layer];
        let margin = self.contract.ties.margin;
        let mut tied = Vec::new();
        for swap in ties::swaps_at(&got, expected, reference.top_k()) {
            match ties::swap_gap(reference, layer, &swap) {
                Some(g) if g < margin => tied.push(swap.position),
                g => {
                    return Err(format!(
                        "layer {layer} of `{run}` on the reference's input chose experts {:?} where the reference chose \
                         {:?} at position {} (reference gap {}): a routing defect, not a tie",
                        swap.only_a,
                        swap.only_b,
                        swap.position,
                        g.map_or("not measurable".into(), |g| format!("{g:.3e}"))
                    ));
                }
            }
        }
        let cols = expected.hidden.cols.max(1);
        let keep = |m: &Matrix| -> Vec<f64> {
            m.data
                .chunks(cols)
                .enumerate()
                .filter(|(p, _)| !tied.contains(p))
                .flat_map(|(_, r)| r.iter().copied())
                .collect()
        };
        let nmse = moe_contracts::metrics::nmse(&keep(&got.hidden), &keep(&expected.hidden));
        Ok(IsolatedCheck { run: run.to_string(), nmse, tied_positions: tied })
    }
}

/// The name of a failed isolated trial comparing exactly `runs` on `prompt` at a layer <= `layer`.
fn failed_isolated_trial(
    contract: &Contract,
    plans: &[TrialPlan],
    statuses: &[TrialStatus],
    runs: [&str; 2],
    prompt: &str,
    layer: usize,
) -> Option<String> {
    plans.iter().zip(statuses).find_map(|(p, s)| {
        let c = criterion_of(contract, p);
        let same_runs = c.compare.iter().all(|r| runs.contains(&r.as_str()));
        (c.is_isolated()
            && same_runs
            && p.prompt == prompt
            && p.layer.is_none_or(|l| l <= layer)
            && s.is_failure())
        .then(|| p.name.clone())
    })
}

/// Every unordered pair of distinct runs of a trial, in the trial's order.
fn pairs(runs: &[String]) -> impl Iterator<Item = (&str, &str)> {
    runs.iter()
        .enumerate()
        .flat_map(move |(i, a)| runs[i + 1..].iter().map(move |b| (a.as_str(), b.as_str())))
}

/// The reason a tie-excused trial shows in libtest and the reports.
pub fn tie_sentence(t: &TieReport) -> String {
    let gap = t.gap.map_or("?".into(), |g| format!("{g:.3e}"));
    match t.tokens {
        Some([x, y]) => format!(
            "certified next-token tie cascade: `{}` and `{}` route alike but choose tokens {x} and {y} at {}, \
             reference gap {gap} < {:e}",
            t.runs[0],
            t.runs[1],
            t.at(),
            t.margin
        ),
        None => format!(
            "certified router tie cascade: `{}` and `{}` first choose different experts at {} ({}), reference \
             gap {gap} < {:e}",
            t.runs[0],
            t.runs[1],
            t.at(),
            swaps_text(t, "; ", "position "),
            t.margin
        ),
    }
}

/// A tie's swaps in one line: `{prefix}3: [5] vs [9]` joined by `sep`; empty for a next-token tie.
pub fn swaps_text(t: &TieReport, sep: &str, prefix: &str) -> String {
    let swaps: Vec<String> = t
        .swaps
        .iter()
        .map(|s| format!("{prefix}{} {:?}/{:?}", s.position, s.only_first, s.only_second))
        .collect();
    swaps.join(sep)
}

/// The token embeddings of `tokens` (the input of layer 0), dequantised exactly in f64.
pub fn embeddings(weights: &ModelWeights, tokens: &[u32]) -> Matrix {
    let hidden = weights.config.hidden;
    let mut data = vec![0.0f64; tokens.len() * hidden];
    for (row, &t) in data.chunks_mut(hidden).zip(tokens) {
        moe_kernels::quant::dequantize_row_f64(
            weights.token_embd.ty,
            weights.token_embd.row(t as usize),
            row,
        );
    }
    Matrix::from_f64(tokens.len(), hidden, data)
}

/// Where two runs first choose different tokens: the greedy step (0 for the prompt's own next token),
/// the tokens of its input (the prompt and the tokens agreed before it), and the two tokens chosen.
struct Parting {
    step: usize,
    tokens: Vec<u32>,
    next: [u32; 2],
}

/// A flip's swaps as reported.
fn tie_swaps(flip: &Flip) -> Vec<TieSwap> {
    flip.swaps
        .iter()
        .map(|s| TieSwap {
            position: s.position,
            only_first: s.only_a.clone(),
            only_second: s.only_b.clone(),
        })
        .collect()
}

/// The index of the largest value of `row`, the lowest on equality (NaNs never chosen).
fn argmax(row: &[f64]) -> u32 {
    let mut best: Option<(usize, f64)> = None;
    for (i, &v) in row.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}
