//! The diagnosis of a failure (DESIGN §1, §8): where the divergence starts, whether that layer is wrong on
//! its own (the layer run alone on the reference's input, compared to the reference's output), whether
//! the reference router itself is near a tie there, and which run is closer to the reference.
//!
//! One diagnosis per (criterion, prompt) with an unexpected failure. The reference trace of that prompt
//! is recorded now if no criterion needed it (its forward then runs once, here).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use moe_contracts::{Contract, Criterion, Prompt, Recorded, Tap, TrialOutcome, TrialPlan};
use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
use moe_engine::trace::{Matrix, Trace};
use moe_engine::weights::ModelWeights;

use crate::error::GateError;
use crate::record::trace_prompt;
use crate::report::{Diagnosis, IsolatedError, RouterMargin, RunDistance, TrialStatus};
use crate::trials::criterion_of;

/// A router whose reference top-k boundary margin (`p_k - p_(k+1)`) is below this is called a near-tie
/// when the criterion gives no `tie_margin`: f32 rounding of the hidden state moves router probabilities
/// by ~1e-6, and a divergence the size of a real defect (activations quantised to 8 bits) by ~1e-3, so a
/// flip at a margin below 1e-4 is what rounding alone can cause.
pub const NEAR_TIE_MARGIN: f64 = 1e-4;

/// A layer whose isolated output differs from the reference's by more than this nmse computes something
/// else: f32 arithmetic through one decoder layer leaves nmse around 1e-13..1e-11 against f64 (relative
/// rounding 6e-8 per operation, a few dozen operations deep), while quantising activations to 8 bits (the
/// defect this gate was built to catch) gives about 1e-5. 1e-8 sits between them with 1000x margin either way.
pub const ISOLATED_DEFECT_NMSE: f64 = 1e-8;

/// The run id of the reference backend the diagnosis creates when the contract has no reference run.
const AD_HOC_REFERENCE: &str = "reference (diagnosis)";

/// Everything the diagnosis reads and may add to.
pub struct Diagnoser<'a> {
    pub contract: &'a Contract,
    pub weights: &'a Arc<ModelWeights>,
    pub model_spec: &'a str,
    pub prompts: &'a [Prompt],
    pub recorded: &'a mut Recorded,
    pub backends: &'a mut HashMap<String, Box<dyn Forward>>,
}

impl Diagnoser<'_> {
    /// One diagnosis per (criterion, prompt) that has an unexpected failure, in plan order.
    pub fn diagnose_all(
        &mut self,
        plans: &[TrialPlan],
        statuses: &[TrialStatus],
        outcomes: &[Option<TrialOutcome>],
    ) -> Result<Vec<Diagnosis>, GateError> {
        let mut groups: BTreeMap<(usize, String), Vec<usize>> = BTreeMap::new();
        let mut order: Vec<(usize, String)> = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            if statuses[i] != TrialStatus::Failed {
                continue;
            }
            let ci = self.contract.criteria.iter().position(|c| c.id == plan.criterion).unwrap_or(0);
            let key = (ci, plan.prompt.clone());
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().push(i);
        }
        let mut out = Vec::with_capacity(order.len());
        for key in order {
            let members = &groups[&key];
            let failing: Vec<(&TrialPlan, &TrialOutcome)> =
                members.iter().filter_map(|&i| outcomes[i].as_ref().map(|o| (&plans[i], o))).collect();
            if let Some(d) = self.diagnose(&failing)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// The diagnosis of the failing trials of one (criterion, prompt).
    fn diagnose(&mut self, failing: &[(&TrialPlan, &TrialOutcome)]) -> Result<Option<Diagnosis>, GateError> {
        let Some(&(first_plan, _)) = failing.first() else { return Ok(None) };
        let criterion = criterion_of(self.contract, first_plan).clone();
        let prompt_id = first_plan.prompt.clone();
        let Some(prompt) = self.prompts.iter().find(|p| p.id == prompt_id).cloned() else { return Ok(None) };
        let reference = self.reference_run(&criterion);
        self.ensure_reference_trace(&reference, &prompt)?;
        let mut d = Diagnosis {
            criterion: criterion.id.clone(),
            prompt: prompt_id.clone(),
            compare: criterion.compare.clone(),
            reference: Some(reference.clone()),
            failing_trials: failing.iter().map(|(p, _)| p.name.clone()).collect(),
            non_finite: failing.iter().find_map(|(_, o)| o.non_finite.clone()),
            first_divergent_layer: None,
            end_to_end: None,
            isolated: Vec::new(),
            router_margin: None,
            distance_to_reference: Vec::new(),
            closer: None,
            summary: String::new(),
        };
        let candidates: Vec<String> =
            criterion.compare.iter().filter(|r| **r != reference).cloned().collect();
        if criterion.tap.is_per_layer() {
            let first = failing.iter().filter_map(|(p, o)| p.layer.map(|l| (l, o.value))).min_by_key(|(l, _)| *l);
            d.first_divergent_layer = first.map(|(l, _)| l).or_else(|| self.first_routing_difference(&criterion, &prompt_id));
            d.end_to_end = first.map(|(_, v)| v);
        } else {
            d.first_divergent_layer = self.first_routing_difference(&criterion, &prompt_id);
        }
        if let Some(layer) = d.first_divergent_layer {
            for run in &candidates {
                if let Some(iso) = self.isolated(run, &reference, &prompt, layer)? {
                    d.isolated.push(iso);
                }
            }
            d.router_margin = self.router_margin(&reference, &prompt_id, layer);
        }
        let at_layer = criterion.tap.is_per_layer().then_some(d.first_divergent_layer).flatten();
        d.distance_to_reference = candidates
            .iter()
            .filter_map(|run| self.distance(run, &reference, &prompt_id, at_layer))
            .collect();
        if d.distance_to_reference.len() == 2 {
            let (a, b) = (&d.distance_to_reference[0], &d.distance_to_reference[1]);
            d.closer = Some(if a.nmse <= b.nmse { a.run.clone() } else { b.run.clone() });
        }
        d.summary = self.summarize(&criterion, &d, &reference, &prompt_id);
        Ok(Some(d))
    }

    /// The run taken as the truth: the criterion's reference, else a run on the reference backend, else a
    /// reference backend created for the diagnosis.
    fn reference_run(&self, criterion: &Criterion) -> String {
        if let Some(r) = &criterion.reference {
            return r.clone();
        }
        if self.contract.runs.get("reference").is_some_and(|s| s.backend == BackendKind::Reference) {
            return "reference".into();
        }
        self.contract
            .runs
            .iter()
            .find(|(_, s)| s.backend == BackendKind::Reference)
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| AD_HOC_REFERENCE.to_string())
    }

    /// Records the reference's trace of `prompt` if no trial needed it.
    fn ensure_reference_trace(&mut self, reference: &str, prompt: &Prompt) -> Result<(), GateError> {
        let key = (reference.to_string(), prompt.id.clone());
        if self.recorded.traces.contains_key(&key) {
            return Ok(());
        }
        let model_spec = self.model_spec;
        let backend = self.backend(reference)?;
        let (trace, _) = trace_prompt(model_spec, backend, prompt)?;
        self.recorded.traces.insert(key, trace);
        Ok(())
    }

    /// The backend of `run`, created (and kept) if the run had no forward yet.
    fn backend(&mut self, run: &str) -> Result<&mut dyn Forward, GateError> {
        if !self.backends.contains_key(run) {
            let (kind, policy) = match self.contract.runs.get(run) {
                Some(spec) => (spec.backend, spec.policy),
                None => (BackendKind::Reference, Policy::Fast),
            };
            let backend = create_backend(kind, Arc::clone(self.weights), policy)
                .map_err(|e| GateError::engine(format!("creating the {kind} backend of `{run}` for the diagnosis"), e))?;
            self.backends.insert(run.to_string(), backend);
        }
        Ok(self.backends.get_mut(run).expect("inserted above").as_mut())
    }

    fn trace(&self, run: &str, prompt: &str) -> Option<&Trace> {
        self.recorded.traces.get(&(run.to_string(), prompt.to_string()))
    }

    /// Layer `layer` of `run` fed the reference's input, compared to the reference's output.
    fn isolated(
        &mut self,
        run: &str,
        reference: &str,
        prompt: &Prompt,
        layer: usize,
    ) -> Result<Option<IsolatedError>, GateError> {
        let Some(ref_trace) = self.trace(reference, &prompt.id) else { return Ok(None) };
        let Some(expected) = ref_trace.layers.get(layer).map(|l| l.hidden.clone()) else { return Ok(None) };
        let input = match layer {
            0 => embeddings(self.weights, &prompt.tokens),
            l => ref_trace.layers[l - 1].hidden.clone(),
        };
        if !self.backends.contains_key(run) {
            return Ok(None);
        }
        let backend = self.backend(run)?;
        let got = backend
            .run_layer(layer, &input)
            .map_err(|e| GateError::engine(format!("run `{run}`: layer {layer} alone for the diagnosis"), e))?;
        Ok(Some(IsolatedError {
            run: run.to_string(),
            layer,
            nmse: moe_contracts::metrics::nmse(&got.data, &expected.data),
            cosine: moe_contracts::metrics::cosine(&got.data, &expected.data),
        }))
    }

    /// The reference router's smallest top-k boundary margin over the positions of `layer`.
    fn router_margin(&self, reference: &str, prompt: &str, layer: usize) -> Option<RouterMargin> {
        let trace = self.trace(reference, prompt)?;
        let logits = &trace.layers.get(layer)?.router_logits;
        let k = trace.top_k();
        (0..logits.rows)
            .map(|pos| (pos, moe_contracts::metrics::router_margin(&moe_contracts::metrics::softmax(logits.row(pos)), k)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(position, margin)| RouterMargin { layer, position, margin, k })
    }

    /// The first layer where the two compared runs choose different expert sets at some position.
    fn first_routing_difference(&self, criterion: &Criterion, prompt: &str) -> Option<usize> {
        let a = self.trace(&criterion.compare[0], prompt)?;
        let b = self.trace(&criterion.compare[1], prompt)?;
        let k = a.top_k();
        (0..a.layers.len().min(b.layers.len())).find(|&l| {
            let (ea, eb) = (&a.layers[l].router_experts, &b.layers[l].router_experts);
            ea.chunks(k.max(1)).zip(eb.chunks(k.max(1))).any(|(x, y)| {
                let (mut x, mut y) = (x.to_vec(), y.to_vec());
                x.sort_unstable();
                y.sort_unstable();
                x != y
            })
        })
    }

    /// nmse of `run` against the reference: at `hidden.L`, or on the logits.
    fn distance(&self, run: &str, reference: &str, prompt: &str, layer: Option<usize>) -> Option<RunDistance> {
        let t = self.trace(run, prompt)?;
        let r = self.trace(reference, prompt)?;
        let (at, a, b) = match layer {
            Some(l) => (format!("hidden.{l}"), &t.layers.get(l)?.hidden, &r.layers.get(l)?.hidden),
            None => ("logits".to_string(), &t.logits, &r.logits),
        };
        Some(RunDistance { run: run.to_string(), at, nmse: moe_contracts::metrics::nmse(&a.data, &b.data) })
    }

    /// One sentence: a NaN, a router near-tie, a defective layer, or accumulated drift.
    fn summarize(&self, criterion: &Criterion, d: &Diagnosis, reference: &str, prompt: &str) -> String {
        let closer = match (&d.closer, d.distance_to_reference.as_slice()) {
            (Some(c), [a, b]) => format!(
                "; {c} is closer to the reference (nmse {:.3e} vs {:.3e} at {})",
                a.nmse.min(b.nmse),
                a.nmse.max(b.nmse),
                a.at
            ),
            _ => String::new(),
        };
        if let Some(nf) = &d.non_finite {
            return format!("a non-finite value appears first at {nf}: fix that before anything else{closer}");
        }
        let tie_margin = criterion.tie_margin.unwrap_or(NEAR_TIE_MARGIN);
        let Some(layer) = d.first_divergent_layer else {
            if criterion.tap == Tap::Logits {
                if let Some(m) = self.logit_margin(reference, prompt).filter(|m| *m < tie_margin) {
                    return format!(
                        "routing agrees in every layer and the reference's top two logits differ by only {m:.3e}: \
                         a near-tie, a flip here is benign{closer}"
                    );
                }
                return format!("routing agrees in every layer: the logits drift by accumulated rounding{closer}");
            }
            return format!("no layer could be singled out{closer}");
        };
        let near_tie = d.router_margin.as_ref().filter(|m| m.margin < tie_margin);
        let routing_differs = self.first_routing_difference(criterion, prompt) == Some(layer);
        if let (Some(m), true) = (near_tie, routing_differs) {
            return format!(
                "router near-tie at layer {layer}: the reference separates the top-{} boundary by only {:.3e} \
                 (position {}), so the expert choice flips on rounding; likely benign{closer}",
                m.k, m.margin, m.position
            );
        }
        let defective: Vec<&IsolatedError> =
            d.isolated.iter().filter(|i| i.nmse > ISOLATED_DEFECT_NMSE || i.nmse.is_nan()).collect();
        if let Some(iso) = defective.first() {
            return format!(
                "layer {layer} of `{}` computes something else than the reference on the same input (isolated \
                 nmse {:.3e} > {ISOLATED_DEFECT_NMSE:e}): a defect in this layer's kernels, not accumulated \
                 error{closer}",
                iso.run, iso.nmse
            );
        }
        if !d.isolated.is_empty() {
            let worst = d.isolated.iter().map(|i| i.nmse).fold(0.0, f64::max);
            return format!(
                "layer {layer} is right on the reference's input (isolated nmse {worst:.3e}): the divergence \
                 accumulates from earlier layers{}{closer}",
                if routing_differs { " and flips an expert choice here" } else { "" }
            );
        }
        format!("the divergence starts at layer {layer}{closer}")
    }

    /// The reference's top-1 minus top-2 logit at the last position.
    fn logit_margin(&self, reference: &str, prompt: &str) -> Option<f64> {
        let t = self.trace(reference, prompt)?;
        let last = t.logits.rows.checked_sub(1)?;
        let row = t.logits.row(last);
        let (mut a, mut b) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
        for &v in row {
            if v > a {
                b = a;
                a = v;
            } else if v > b {
                b = v;
            }
        }
        Some(a - b)
    }
}

/// The token embeddings of `tokens` (the input of layer 0), dequantised exactly in f64.
fn embeddings(weights: &ModelWeights, tokens: &[u32]) -> Matrix {
    let hidden = weights.config.hidden;
    let mut data = vec![0.0f64; tokens.len() * hidden];
    for (row, &t) in data.chunks_mut(hidden).zip(tokens) {
        moe_kernels::quant::dequantize_row_f64(weights.token_embd.ty, weights.token_embd.row(t as usize), row);
    }
    Matrix::from_f64(tokens.len(), hidden, data)
}
