//! What the gate records once per (run, prompt) and hands to evaluation (docs/gate.md: "run each (run,
//! prompt) once, evaluate every trial from the recorded traces"), and what one trial's evaluation says.

use std::collections::HashMap;

use moe_engine::trace::Trace;

/// One greedy decode step: the chosen token and the five best tokens with their logits.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GreedyStep {
    /// The token chosen (the argmax of the step's logits).
    pub token: u32,
    /// The five highest-scoring tokens with their logits, best first.
    pub top5: Vec<(u32, f32)>,
    /// The first NaN or Inf among all of the step's logits, as `(token, logit)`: the top-5 alone would
    /// hide one outside it, and a step that computed a NaN anywhere fails its greedy trial.
    #[serde(default)]
    pub non_finite: Option<(u32, f32)>,
}

impl GreedyStep {
    /// The step that chose `token` with `top5` from the step's full `logits` (scanned for NaN/Inf).
    pub fn new(token: u32, top5: Vec<(u32, f32)>, logits: &[f32]) -> Self {
        let non_finite = logits.iter().position(|v| !v.is_finite()).map(|i| (i as u32, logits[i]));
        Self { token, top5, non_finite }
    }
}

/// Everything the gate recorded, keyed by `(run id, prompt id)`.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// The trace of each forward.
    pub traces: HashMap<(String, String), Trace>,
    /// The greedy decode of each (run, prompt) that a greedy criterion needs.
    pub greedy: HashMap<(String, String), Vec<GreedyStep>>,
    /// For `mode: isolated` criteria, keyed by `(candidate, baseline, prompt)`: the candidate's layers,
    /// each run alone on the baseline's input to it (layer 0 on the shared token embeddings), as a
    /// trace with the prompt's tokens and no logits.
    pub isolated: HashMap<(String, String, String), Trace>,
    /// The reference's layers up to the deepest one a router tie needs, by prompt, for the prompts where
    /// two runs chose different experts and no criterion recorded the reference's whole forward.
    pub tie_references: HashMap<String, Trace>,
}

impl Recorded {
    /// The trace of `run` on `prompt`.
    pub fn trace(&self, run: &str, prompt: &str) -> Option<&Trace> {
        self.traces.get(&(run.to_string(), prompt.to_string()))
    }

    /// The candidate's layers run on the baseline's inputs, for `prompt`.
    pub fn isolated(&self, candidate: &str, baseline: &str, prompt: &str) -> Option<&Trace> {
        self.isolated.get(&(candidate.to_string(), baseline.to_string(), prompt.to_string()))
    }

    /// The trace that certifies ties on `prompt`: the tie reference's prefix, else `run`'s whole trace.
    pub fn tie_reference(&self, run: &str, prompt: &str) -> Option<&Trace> {
        self.tie_references.get(prompt).or_else(|| self.trace(run, prompt))
    }

    /// The greedy steps of `run` on `prompt`.
    pub fn greedy_steps(&self, run: &str, prompt: &str) -> Option<&[GreedyStep]> {
        self.greedy.get(&(run.to_string(), prompt.to_string())).map(Vec::as_slice)
    }
}

/// The result of one trial.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialOutcome {
    /// The metric's value (the worst over what the trial covers); NaN when it could not be computed.
    pub value: f64,
    /// Whether the value is within the criterion's bound (before known divergences are considered).
    pub passed: bool,
    /// A human sentence: the value, the bound, where the worst value is, ties certified.
    pub detail: String,
    /// Where the first NaN or Inf the trial read is, when there is one (the trial then fails).
    pub non_finite: Option<String>,
}

impl TrialOutcome {
    /// A failed trial that could not be judged (a recording is missing or does not fit).
    pub(crate) fn unjudgeable(detail: String) -> Self {
        Self { value: f64::NAN, passed: false, detail, non_finite: None }
    }

    /// A failed trial that read a NaN or Inf.
    pub(crate) fn non_finite(location: String) -> Self {
        Self {
            value: f64::NAN,
            passed: false,
            detail: format!("non-finite value: {location}"),
            non_finite: Some(location),
        }
    }
}
