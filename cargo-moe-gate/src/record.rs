//! Running the forwards (DESIGN §9): every needed (run, prompt) exactly once with a trace, plus the greedy
//! decode steps a criterion asks for. Runs go in parallel (one thread each, one backend each); each run's
//! prompts go in order on its backend. Progress bars go to stderr and are hidden when it is not a TTY.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_contracts::{GreedyStep, Prompt, Recorded};
use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
use moe_engine::trace::{Precision, Trace};
use moe_engine::weights::ModelWeights;

use crate::error::GateError;
use crate::report::RunTiming;

/// How many alternatives a greedy step records (vLLM's check_logprobs_close compares top-5 lists).
pub const GREEDY_TOP: usize = 5;

/// What one run has to compute.
#[derive(Debug, Clone)]
pub struct RunJob {
    /// The contract's run id.
    pub run: String,
    pub backend: BackendKind,
    pub policy: Policy,
    /// The prompts to forward, each with the number of greedy tokens to decode after it (0 = none).
    pub prompts: Vec<(Prompt, usize)>,
}

/// Everything the forwards produced.
pub struct Recording {
    /// Traces and greedy steps, keyed by (run, prompt), as evaluation reads them.
    pub recorded: Recorded,
    /// Each run's wall time.
    pub timings: Vec<RunTiming>,
    /// The backends, kept for the diagnosis (`run_layer`).
    pub backends: HashMap<String, Box<dyn Forward>>,
}

/// Runs every job, one thread per run. `ready` holds backends created earlier (the CUDA probe's), used
/// instead of creating new ones for the runs they name.
pub fn record(
    model_spec: &str,
    weights: &Arc<ModelWeights>,
    jobs: Vec<RunJob>,
    mut ready: HashMap<String, Box<dyn Forward>>,
) -> Result<Recording, GateError> {
    let progress = Progress::new(&jobs);
    let results: Vec<Result<RunOutput, GateError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let backend = ready.remove(&job.run);
                let bar = progress.bar(&job.run);
                let weights = Arc::clone(weights);
                scope.spawn(move || run_job(model_spec, weights, job, backend, &bar))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let mut recording =
        Recording { recorded: Recorded::default(), timings: Vec::new(), backends: HashMap::new() };
    for result in results {
        let out = result?;
        for (prompt, trace) in out.traces {
            recording.recorded.traces.insert((out.timing.run.clone(), prompt), trace);
        }
        for (prompt, steps) in out.greedy {
            recording.recorded.greedy.insert((out.timing.run.clone(), prompt), steps);
        }
        recording.backends.insert(out.timing.run.clone(), out.backend);
        recording.timings.push(out.timing);
    }
    recording.timings.sort_by(|a, b| a.run.cmp(&b.run));
    Ok(recording)
}

/// Forwards one prompt on `backend` with a trace (the trace's `model` is the spec).
pub fn trace_prompt(
    model_spec: &str,
    backend: &mut dyn Forward,
    prompt: &Prompt,
) -> Result<(Trace, Vec<f32>), GateError> {
    let precision = match backend.kind() {
        BackendKind::Reference => Precision::F64,
        BackendKind::Cpu | BackendKind::Cuda => Precision::F32,
    };
    let mut trace = Trace::new(model_spec, backend.kind().as_str(), backend.policy().as_str(), precision);
    let last = backend.forward(&prompt.tokens, Some(&mut trace)).map_err(|e| {
        GateError::engine(format!("the {} forward of prompt `{}`", backend.kind(), prompt.id), e)
    })?;
    Ok((trace, last))
}

/// Decodes `steps` greedy tokens after a prefill whose last logits are `first`: token i is the argmax
/// of the logits after token i-1 was appended.
pub fn greedy_decode(
    backend: &mut dyn Forward,
    first: Vec<f32>,
    steps: usize,
) -> Result<Vec<GreedyStep>, moe_engine::error::EngineError> {
    let mut out = Vec::with_capacity(steps);
    let mut logits = first;
    for i in 0..steps {
        let top5 = top_logits(&logits, GREEDY_TOP);
        let token = top5.first().map_or(0, |&(t, _)| t);
        out.push(GreedyStep::new(token, top5, &logits));
        if i + 1 < steps {
            logits = backend.step(token)?;
        }
    }
    Ok(out)
}

/// The `n` largest logits, largest first, equal values by lower token id; NaNs are never chosen.
pub fn top_logits(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() || (top.len() == n && v <= top[n - 1].1) {
            continue;
        }
        let at = top.iter().position(|&(_, t)| v > t).unwrap_or(top.len());
        top.insert(at, (i as u32, v));
        top.truncate(n);
    }
    top
}

struct RunOutput {
    traces: Vec<(String, Trace)>,
    greedy: Vec<(String, Vec<GreedyStep>)>,
    timing: RunTiming,
    backend: Box<dyn Forward>,
}

fn run_job(
    model_spec: &str,
    weights: Arc<ModelWeights>,
    job: RunJob,
    backend: Option<Box<dyn Forward>>,
    bar: &ProgressBar,
) -> Result<RunOutput, GateError> {
    let start = Instant::now();
    let mut backend = match backend {
        Some(b) => b,
        None => create_backend(job.backend, weights, job.policy).map_err(|e| {
            GateError::engine(format!("creating the {} backend of run `{}`", job.backend, job.run), e)
        })?,
    };
    let mut timing = RunTiming {
        run: job.run.clone(),
        backend: job.backend.to_string(),
        policy: job.policy.to_string(),
        prompts: job.prompts.len(),
        tokens: job.prompts.iter().map(|(p, _)| p.tokens.len()).sum(),
        greedy_steps: job.prompts.iter().map(|(_, s)| s).sum(),
        seconds: 0.0,
    };
    let mut traces = Vec::with_capacity(job.prompts.len());
    let mut greedy = Vec::new();
    for (prompt, steps) in &job.prompts {
        bar.set_message(prompt.id.clone());
        let (trace, last) =
            trace_prompt(model_spec, backend.as_mut(), prompt).map_err(|e| with_run(e, &job.run))?;
        if *steps > 0 {
            let decoded = greedy_decode(backend.as_mut(), last, *steps).map_err(|e| {
                GateError::engine(
                    format!("run `{}`: greedy decoding after prompt `{}`", job.run, prompt.id),
                    e,
                )
            })?;
            greedy.push((prompt.id.clone(), decoded));
        }
        traces.push((prompt.id.clone(), trace));
        bar.inc(1);
    }
    timing.seconds = start.elapsed().as_secs_f64();
    bar.finish_with_message(format!("{:.2} s", timing.seconds));
    Ok(RunOutput { traces, greedy, timing, backend })
}

fn with_run(e: GateError, run: &str) -> GateError {
    match e {
        GateError::Engine { what, source } => {
            GateError::Engine { what: format!("run `{run}`: {what}"), source }
        }
        other => other,
    }
}

/// One progress bar per run on stderr, hidden when stderr is not a terminal.
struct Progress {
    multi: MultiProgress,
    lengths: BTreeMap<String, u64>,
}

impl Progress {
    fn new(jobs: &[RunJob]) -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let lengths = jobs.iter().map(|j| (j.run.clone(), j.prompts.len() as u64)).collect();
        Self { multi: MultiProgress::with_draw_target(target), lengths }
    }

    fn bar(&self, run: &str) -> ProgressBar {
        let len = self.lengths.get(run).copied().unwrap_or(0);
        let style =
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} prompts {elapsed:>4} {msg}")
                .expect("the progress template is valid")
                .progress_chars("=> ");
        self.multi.add(ProgressBar::new(len).with_style(style).with_prefix(run.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_logits_orders_by_value_then_lower_id() {
        let logits = [0.5, 2.0, f32::NAN, 2.0, -1.0, 3.0, 0.5];
        assert_eq!(top_logits(&logits, 3), vec![(5, 3.0), (1, 2.0), (3, 2.0)]);
        assert_eq!(top_logits(&logits, 10).len(), 6, "the NaN is never chosen");
        assert_eq!(top_logits(&[f32::NAN], 5), vec![]);
    }
}
