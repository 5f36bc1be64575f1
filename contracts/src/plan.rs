//! Trial planning (docs/contracts.md): every criterion times its prompts times, where `per` says so, each layer
//! and each position, named `CONTRACT::CRITERION::PROMPT[::layerNN][::posNN]` so that libtest filters
//! select them naturally; and what the gate must record to judge them (which forwards, how many greedy
//! steps), so that each (run, prompt) forward runs exactly once.

use std::collections::{BTreeMap, BTreeSet};

use crate::prompts::is_generated_id;
use crate::schema::{BackendKind, Contract, Criterion, KnownDivergence, Metric, Per, PromptSet};

/// One trial: a criterion judged on one prompt (and one layer or position where `per` says so).
#[derive(Debug, Clone, PartialEq)]
pub struct TrialPlan {
    /// `CONTRACT::CRITERION::PROMPT`, then `::layerNN` and/or `::posNN` (two digits at least).
    pub name: String,
    /// The criterion id.
    pub criterion: String,
    /// The prompt id.
    pub prompt: String,
    /// The layer, for `per: [.., layer]`.
    pub layer: Option<usize>,
    /// The token position, for `per: [.., position]`.
    pub position: Option<usize>,
    /// Every run whose recording the trial reads: `[candidate, baseline]`, then the reference run when
    /// the metric reads it (topk_set tie margins, error_ratio).
    pub runs: Vec<String>,
    /// The known divergence this trial is expected to show, if one matches.
    pub expected: Option<KnownDivergence>,
}

/// What one prompt asks of the gate, known from the contract before any trial is planned or any token
/// generated: the runs that forward it (each with the greedy steps it decodes after it) and its trials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptDemand {
    /// The prompt id.
    pub id: String,
    /// Which set of `prompts` it belongs to.
    pub set: usize,
    /// Its place within that set.
    pub index: usize,
    /// Its token count, as bounded by its set (equal for explicit and text prompts).
    pub min_len: usize,
    /// See `min_len`.
    pub max_len: usize,
    /// Each run forwarding it, with the greedy steps decoded after it (0 = none).
    pub runs: BTreeMap<String, usize>,
    /// Its trials that do not depend on its length.
    pub trials: usize,
    /// Its trials per token (criteria judged `per: position`).
    pub trials_per_token: usize,
}

impl Contract {
    /// What every prompt of the contract asks of the gate on a model of `n_layer` layers, in prompt order
    /// (every prompt, read or not, so that indices are the ones `--partition` deals by), counting only
    /// the criteria `counted` keeps: each criterion's compared runs and metric reference on its prompts,
    /// the most greedy steps any greedy criterion asks of a run on a prompt, and the trials [`Contract::plan`]
    /// would make. Nothing is generated or planned: a contract too large to plan is measured first.
    pub fn demand(&self, n_layer: usize, counted: impl Fn(&Criterion) -> bool) -> Vec<PromptDemand> {
        let criteria: Vec<(&Criterion, Vec<String>)> =
            self.criteria.iter().filter(|c| counted(c)).map(|c| (c, trial_runs(c))).collect();
        let mut out = Vec::new();
        for (set_index, set) in self.prompts.iter().enumerate() {
            let (min_len, max_len) = set.length_bounds();
            for (index, id) in set.ids().into_iter().enumerate() {
                let mut demand = PromptDemand {
                    id,
                    set: set_index,
                    index,
                    min_len,
                    max_len,
                    runs: BTreeMap::new(),
                    trials: 0,
                    trials_per_token: 0,
                };
                for (c, runs) in &criteria {
                    if !(c.selects(set.id()) || c.selects(&demand.id)) {
                        continue;
                    }
                    let steps = if c.metric == Metric::Greedy { c.steps.unwrap_or(0) } else { 0 };
                    for run in runs {
                        let wanted = demand.runs.entry(run.clone()).or_default();
                        // A greedy criterion decodes its compared runs only (not a metric reference).
                        if c.compare.contains(run) {
                            *wanted = (*wanted).max(steps);
                        }
                    }
                    let layers = if c.is_per(Per::Layer) { n_layer } else { 1 };
                    match c.is_per(Per::Position) {
                        true => demand.trials_per_token += layers,
                        false => demand.trials += layers,
                    }
                }
                out.push(demand);
            }
        }
        out
    }

    /// Every trial of the contract on a model with `n_layer` decoder layers, in criterion order, then
    /// prompt order, then layer, then position.
    pub fn plan(&self, n_layer: usize) -> Vec<TrialPlan> {
        let mut trials = Vec::new();
        for criterion in &self.criteria {
            let runs = trial_runs(criterion);
            for (set, prompt, len) in self.prompts_of(criterion) {
                let layers: Vec<Option<usize>> = match criterion.is_per(Per::Layer) {
                    true => (0..n_layer).map(Some).collect(),
                    false => vec![None],
                };
                let positions: Vec<Option<usize>> = match criterion.is_per(Per::Position) {
                    true => (0..len).map(Some).collect(),
                    false => vec![None],
                };
                for &layer in &layers {
                    for &position in &positions {
                        trials.push(TrialPlan {
                            name: trial_name(&self.contract, &criterion.id, &prompt, layer, position),
                            criterion: criterion.id.clone(),
                            prompt: prompt.clone(),
                            layer,
                            position,
                            runs: runs.clone(),
                            expected: self.expected(&criterion.id, &set, &prompt, layer).cloned(),
                        });
                    }
                }
            }
        }
        trials
    }

    /// The criterion with this id.
    pub fn criterion(&self, id: &str) -> Option<&Criterion> {
        self.criteria.iter().find(|c| c.id == id)
    }

    /// Whether the trial reads a run on the CUDA backend (the gate lists it as ignored without CUDA).
    pub fn needs_cuda(&self, trial: &TrialPlan) -> bool {
        trial.runs.iter().any(|r| self.runs.get(r).is_some_and(|spec| spec.backend == BackendKind::Cuda))
    }

    /// The run ids the criteria read or use as reference, in `runs` order.
    pub fn needed_runs(&self) -> Vec<String> {
        let used = |run: &String| {
            self.criteria.iter().any(|c| c.compare.contains(run) || c.reference.as_ref() == Some(run))
        };
        self.runs.keys().filter(|r| used(r)).cloned().collect()
    }

    /// The (run, prompt) forwards evaluation reads, in `runs` order then prompt order: each criterion's
    /// compared runs on its prompts, and its reference run where the metric reads it (tie margins, error
    /// ratios).
    /// A criterion's reference is used for diagnosis where it was recorded for that prompt anyway.
    pub fn needed_forwards(&self) -> Vec<(String, String)> {
        let selected: Vec<(&Criterion, BTreeSet<String>)> =
            self.criteria.iter().map(|c| (c, self.prompt_ids_of(c).into_iter().collect())).collect();
        let prompts = self.prompt_ids();
        let mut needed: Vec<(String, String)> = Vec::new();
        for run in self.runs.keys() {
            for prompt in &prompts {
                let reads = |(c, ids): &(&Criterion, BTreeSet<String>)| {
                    (c.compare.contains(run) || c.metric_reference() == Some(run.as_str()))
                        && ids.contains(prompt)
                };
                if selected.iter().any(reads) {
                    needed.push((run.clone(), prompt.clone()));
                }
            }
        }
        needed
    }

    /// Whether `run`'s traces must hold sub-layer taps: a criterion comparing it names one (they cost
    /// memory and time, so other runs go without).
    pub fn needs_sub_layer_taps(&self, run: &str) -> bool {
        self.criteria.iter().any(|c| c.tap.sub_layer().is_some() && c.compare.iter().any(|r| r == run))
    }

    /// The greedy decode steps to record for `run`: the most any greedy criterion comparing it asks
    /// for (0 = none).
    pub fn greedy_steps(&self, run: &str) -> usize {
        self.greedy_criteria(run).filter_map(|c| c.steps).max().unwrap_or(0)
    }

    /// The greedy decode steps to record for `run` on `prompt` (0 = none).
    pub fn greedy_steps_for(&self, run: &str, prompt: &str) -> usize {
        self.greedy_criteria(run)
            .filter(|c| self.reads_prompt(c, prompt))
            .filter_map(|c| c.steps)
            .max()
            .unwrap_or(0)
    }

    /// Whether `criterion` runs `prompt` (a prompt id): named itself, or by its set, or every prompt.
    pub fn reads_prompt(&self, criterion: &Criterion, prompt: &str) -> bool {
        criterion.selects(prompt)
            || self.prompts.iter().any(|set| {
                criterion.selects(set.id())
                    && match set {
                        PromptSet::Generated { id, count, .. } => is_generated_id(id, *count, prompt),
                        _ => set.id() == prompt,
                    }
            })
    }

    fn greedy_criteria<'a>(&'a self, run: &'a str) -> impl Iterator<Item = &'a Criterion> + 'a {
        self.criteria.iter().filter(move |c| c.metric == Metric::Greedy && c.compare.iter().any(|r| r == run))
    }

    /// The first known divergence matching a trial of `criterion` on `prompt` (of set `set`) at `layer`.
    fn expected(
        &self,
        criterion: &str,
        set: &str,
        prompt: &str,
        layer: Option<usize>,
    ) -> Option<&KnownDivergence> {
        self.known_divergences.iter().find(|kd| {
            kd.criterion == criterion
                && kd.prompt.as_deref().is_none_or(|p| p == prompt || p == set)
                && kd.layers.is_none_or(|span| layer.is_some_and(|l| span.contains(l)))
        })
    }
}

/// The runs a trial of `criterion` reads.
fn trial_runs(criterion: &Criterion) -> Vec<String> {
    let mut runs = criterion.compare.to_vec();
    if let Some(reference) = criterion.metric_reference()
        && !runs.iter().any(|r| r == reference)
    {
        runs.push(reference.to_string());
    }
    runs
}

/// `CONTRACT::CRITERION::PROMPT[::layerNN][::posNN]`.
pub fn trial_name(
    contract: &str,
    criterion: &str,
    prompt: &str,
    layer: Option<usize>,
    position: Option<usize>,
) -> String {
    let mut name = format!("{contract}::{criterion}::{prompt}");
    if let Some(l) = layer {
        name.push_str(&format!("::layer{l:02}"));
    }
    if let Some(p) = position {
        name.push_str(&format!("::pos{p:02}"));
    }
    name
}
