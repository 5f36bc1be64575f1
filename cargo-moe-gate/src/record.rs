//! Running the forwards (docs/gate.md): every needed (run, prompt) exactly once with a trace, plus the greedy
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
    /// Whether the traces hold sub-layer taps (a criterion reads one from this run).
    pub sub_layer_taps: bool,
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
    let mut trace = new_trace(model_spec, backend);
    let last = backend.forward(&prompt.tokens, Some(&mut trace)).map_err(|e| {
        GateError::engine(format!("the {} forward of prompt `{}`", backend.kind(), prompt.id), e)
    })?;
    Ok((trace, last))
}

/// An empty trace of `backend`'s kind, policy and precision for the model `model_spec`.
pub(crate) fn new_trace(model_spec: &str, backend: &dyn Forward) -> Trace {
    let precision = match backend.kind() {
        BackendKind::Reference => Precision::F64,
        BackendKind::Cpu | BackendKind::Cuda => Precision::F32,
    };
    Trace::new(model_spec, backend.kind().as_str(), backend.policy().as_str(), precision)
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
        let step = greedy_step(&logits);
        let token = step.token;
        out.push(step);
        if i + 1 < steps {
            logits = backend.step(token)?;
        }
    }
    Ok(out)
}

/// Decodes `steps` greedy tokens after each of the prefills whose last logits are `firsts` (the
/// sequences of the backend's last `forward_many`), all sequences stepping together: token i of a
/// sequence is the argmax of its logits after token i-1 was appended, as [`greedy_decode`] decodes one.
pub fn greedy_decode_many(
    backend: &mut dyn Forward,
    firsts: Vec<Vec<f32>>,
    steps: usize,
) -> Result<Vec<Vec<GreedyStep>>, moe_engine::error::EngineError> {
    let mut out: Vec<Vec<GreedyStep>> = firsts.iter().map(|_| Vec::with_capacity(steps)).collect();
    let mut logits = firsts;
    for i in 0..steps {
        let tokens: Vec<u32> = logits
            .iter()
            .zip(&mut out)
            .map(|(logits, out)| {
                let step = greedy_step(logits);
                let token = step.token;
                out.push(step);
                token
            })
            .collect();
        if i + 1 < steps {
            logits = backend.step_many(&tokens)?;
        }
    }
    Ok(out)
}

/// The greedy choice after `logits` and its top [`GREEDY_TOP`] alternatives.
fn greedy_step(logits: &[f32]) -> GreedyStep {
    let top5 = top_logits(logits, GREEDY_TOP);
    let token = top5.first().map_or(0, |&(t, _)| t);
    GreedyStep::new(token, top5, logits)
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
    for group in decode_groups(&job.prompts, backend.max_sequences()) {
        // Forward the group's prompts in batches of bounded size, holding every sequence, then decode all
        // of them together: each greedy step reads every weight row once for the whole group.
        let mut lasts = Vec::with_capacity(group.len());
        for (b, batch) in batches(&group).into_iter().enumerate() {
            bar.set_message(batch[0].0.id.clone());
            let (batch_traces, batch_lasts) =
                trace_batch(model_spec, backend.as_mut(), batch, b > 0, job.sub_layer_taps)
                    .map_err(|e| with_run(e, &job.run))?;
            lasts.extend(batch_lasts);
            traces.extend(batch.iter().map(|(p, _)| p.id.clone()).zip(batch_traces));
            bar.inc(batch.len() as u64);
        }
        let steps = group[0].1;
        if steps > 0 {
            let decoded = greedy_decode_many(backend.as_mut(), lasts, steps).map_err(|e| {
                GateError::engine(
                    format!("run `{}`: greedy decoding after prompts {}", job.run, prompt_ids(&group)),
                    e,
                )
            })?;
            greedy.extend(group.iter().map(|(p, _)| p.id.clone()).zip(decoded));
        }
    }
    timing.seconds = start.elapsed().as_secs_f64();
    bar.finish_with_message(format!("{:.2} s", timing.seconds));
    Ok(RunOutput { traces, greedy, timing, backend })
}

/// Most prompt tokens one `forward_many` carries. Batching amortises decoding each weight row over the
/// batch's tokens (at the production shape, 1024 tokens give each of the 128 experts about 64 tokens
/// per layer, so decoding is a few percent of the products), while the batch's transient buffers stay
/// bounded: the f32 logits of every position (0.6 MB a token at a 151 936-token vocabulary) and the
/// traces being built (f64, about 2 MB a token at the production shape).
pub const BATCH_TOKENS: usize = 1024;

/// Most KV-cache positions (prompt tokens plus greedy steps, over all sequences) one group of prompts
/// holds while it decodes together. Decoding a group together reads every weight row once per greedy step
/// for all its sequences: the contract of record's 260 prompts (4155 tokens, 32 steps each, 12,475
/// positions) decode as one group instead of five, so the experts' rows are decoded 32 times instead of
/// 160. The bound keeps the caches small: at the production shape a position holds 48 layers x 1024
/// f32 keys and values (196 KB), so 16,384 positions are 3.2 GB.
pub const DECODE_POSITIONS: usize = 16_384;

/// The prompts of a run in groups that decode together: prompts with the same number of greedy steps,
/// at most `max_sequences` prompts and at most [`DECODE_POSITIONS`] positions per group (a prompt that
/// alone needs more goes alone). Prompts without greedy steps decode nothing, so nothing is gained by
/// holding their caches: their groups are bounded by [`BATCH_TOKENS`], one batch each.
fn decode_groups(prompts: &[(Prompt, usize)], max_sequences: usize) -> Vec<Vec<(&Prompt, usize)>> {
    let mut by_steps: BTreeMap<usize, Vec<(&Prompt, usize)>> = BTreeMap::new();
    for (p, steps) in prompts {
        by_steps.entry(*steps).or_default().push((p, *steps));
    }
    let mut out = Vec::new();
    for (steps, same_steps) in by_steps {
        let bound = if steps == 0 { BATCH_TOKENS } else { DECODE_POSITIONS };
        let mut group: Vec<(&Prompt, usize)> = Vec::new();
        let mut positions = 0;
        for item in same_steps {
            let need = item.0.tokens.len() + item.1;
            if !group.is_empty() && (group.len() == max_sequences.max(1) || positions + need > bound) {
                out.push(std::mem::take(&mut group));
                positions = 0;
            }
            positions += need;
            group.push(item);
        }
        if !group.is_empty() {
            out.push(group);
        }
    }
    out
}

/// A group's prompts in batches for `forward_many` / `add_sequences`: where the group has more than
/// [`BATCH_TOKENS`] tokens, the fewest batches of at most that many tokens (a longer prompt goes alone),
/// of about equal size.
fn batches<'g, 'p>(group: &'g [(&'p Prompt, usize)]) -> Vec<&'g [(&'p Prompt, usize)]> {
    let tokens: usize = group.iter().map(|(p, _)| p.tokens.len()).sum();
    let target = tokens.div_ceil(tokens.div_ceil(BATCH_TOKENS).max(1));
    let mut out = Vec::new();
    let (mut start, mut batch_tokens) = (0, 0);
    for (i, (p, _)) in group.iter().enumerate() {
        let len = p.tokens.len();
        if i > start && (batch_tokens + len > BATCH_TOKENS || batch_tokens >= target) {
            out.push(&group[start..i]);
            (start, batch_tokens) = (i, 0);
        }
        batch_tokens += len;
    }
    if start < group.len() {
        out.push(&group[start..]);
    }
    out
}

/// Forwards the prompts of `batch` together with a trace each (the traces' `model` is the spec): as the
/// backend's only sequences, or, when `add`, as sequences held beside those of the group's earlier
/// batches.
fn trace_batch(
    model_spec: &str,
    backend: &mut dyn Forward,
    batch: &[(&Prompt, usize)],
    add: bool,
    sub_layer_taps: bool,
) -> Result<(Vec<Trace>, Vec<Vec<f32>>), GateError> {
    let new = |backend: &dyn Forward| {
        let trace = new_trace(model_spec, backend);
        if sub_layer_taps { trace.with_sub_layer_taps() } else { trace }
    };
    if let ([(prompt, _)], false) = (batch, add) {
        let mut trace = new(backend);
        let last = backend.forward(&prompt.tokens, Some(&mut trace)).map_err(|e| {
            GateError::engine(format!("the {} forward of prompt `{}`", backend.kind(), prompt.id), e)
        })?;
        return Ok((vec![trace], vec![last]));
    }
    let mut traces: Vec<Trace> = batch.iter().map(|_| new(backend)).collect();
    let seqs: Vec<&[u32]> = batch.iter().map(|(p, _)| &p.tokens[..]).collect();
    let lasts = match add {
        true => backend.add_sequences(&seqs, Some(&mut traces)),
        false => backend.forward_many(&seqs, Some(&mut traces)),
    }
    .map_err(|e| {
        GateError::engine(format!("the {} forward of prompts {}", backend.kind(), prompt_ids(batch)), e)
    })?;
    Ok((traces, lasts))
}

/// The ids of a batch's prompts, for messages: `a`, `b`, ...
fn prompt_ids(batch: &[(&Prompt, usize)]) -> String {
    batch.iter().map(|(p, _)| format!("`{}`", p.id)).collect::<Vec<_>>().join(", ")
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

/// The backend of `run` in `backends`, created (and kept) when the run has none yet: the diagnosis and the
/// tie steps use it after recording. A run id the contract does not declare is a reference backend the
/// gate creates; `purpose` names the step in the error.
pub fn backend_for<'b>(
    backends: &'b mut HashMap<String, Box<dyn Forward>>,
    contract: &moe_contracts::Contract,
    weights: &Arc<ModelWeights>,
    run: &str,
    purpose: &str,
) -> Result<&'b mut dyn Forward, GateError> {
    if !backends.contains_key(run) {
        let (kind, policy) = match contract.runs.get(run) {
            Some(spec) => (spec.backend, spec.policy),
            None => (BackendKind::Reference, Policy::Fast),
        };
        let backend = create_backend(kind, Arc::clone(weights), policy).map_err(|e| {
            GateError::engine(format!("creating the {kind} backend of `{run}` for {purpose}"), e)
        })?;
        backends.insert(run.to_string(), backend);
    }
    Ok(backends.get_mut(run).expect("inserted above").as_mut())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(id: &str, len: usize) -> Prompt {
        Prompt { id: id.to_string(), tokens: (0..len).map(|i| (i * 7919 + 785) as u32 % 151_936).collect() }
    }

    #[test]
    fn batched_greedy_decoding_is_each_prompts_own() {
        // synth:tiny on cpu: three prompts decoded together choose, step by step, the tokens and top-5
        // logits (bit for bit, as GreedyStep's f32 equality compares them) of each decoded alone.
        let weights = moe_engine::spec::load_model("synth:tiny").expect("synth:tiny");
        let mut f = create_backend(BackendKind::Cpu, weights, Policy::Fast).expect("cpu backend");
        let prompts = [prompt("a", 1), prompt("b", 9), prompt("c", 4)];
        let steps = 5;
        let alone: Vec<Vec<GreedyStep>> = prompts
            .iter()
            .map(|p| {
                let first = f.forward(&p.tokens, None).expect("forward");
                greedy_decode(&mut *f, first, steps).expect("greedy")
            })
            .collect();
        let seqs: Vec<&[u32]> = prompts.iter().map(|p| &p.tokens[..]).collect();
        let firsts = f.forward_many(&seqs, None).expect("forward_many");
        let together = greedy_decode_many(&mut *f, firsts, steps).expect("greedy_many");
        assert_eq!(together, alone);
    }

    #[test]
    fn groups_decode_by_steps_within_the_bounds_and_batches_within_the_token_bound() {
        // 400 prompts of 1..200 tokens, a third with 32 greedy steps: more positions than one group holds.
        let prompts: Vec<(Prompt, usize)> = (0..400)
            .map(|i| (prompt(&format!("p{i}"), 1 + i * 37 % 200), if i % 3 == 0 { 32 } else { 0 }))
            .collect();
        for max_sequences in [1, 5, usize::MAX] {
            let groups = decode_groups(&prompts, max_sequences);
            let mut seen: Vec<&str> = Vec::new();
            for g in &groups {
                assert!(g.len() <= max_sequences && g.iter().all(|(_, s)| *s == g[0].1), "{max_sequences}");
                let positions: usize = g.iter().map(|(p, s)| p.tokens.len() + s).sum();
                let bound = if g[0].1 == 0 { BATCH_TOKENS } else { DECODE_POSITIONS };
                assert!(g.len() == 1 || positions <= bound, "{positions} positions");
                let batches = batches(g);
                let in_order: Vec<&str> =
                    batches.iter().copied().flatten().map(|(p, _)| p.id.as_str()).collect();
                let group_order: Vec<&str> = g.iter().map(|(p, _)| p.id.as_str()).collect();
                assert_eq!(in_order, group_order, "batches cover the group in order");
                for b in &batches {
                    let tokens: usize = b.iter().map(|(p, _)| p.tokens.len()).sum();
                    assert!(b.len() == 1 || tokens <= BATCH_TOKENS, "{tokens} tokens in {} prompts", b.len());
                }
                seen.extend(group_order);
            }
            seen.sort_unstable();
            let mut want: Vec<&str> = prompts.iter().map(|(p, _)| p.id.as_str()).collect();
            want.sort_unstable();
            assert_eq!(seen, want, "every prompt exactly once");
            if max_sequences == usize::MAX {
                // The 134 prompts with steps need 18,143 positions: two groups, no more.
                let decoding = groups.iter().filter(|g| g[0].1 == 32).count();
                assert_eq!(decoding, 2, "the prompts with greedy steps decode in the fewest groups");
            }
        }
    }

    #[test]
    fn top_logits_orders_by_value_then_lower_id() {
        let logits = [0.5, 2.0, f32::NAN, 2.0, -1.0, 3.0, 0.5];
        assert_eq!(top_logits(&logits, 3), vec![(5, 3.0), (1, 2.0), (3, 2.0)]);
        assert_eq!(top_logits(&logits, 10).len(), 6, "the NaN is never chosen");
        assert_eq!(top_logits(&[f32::NAN], 5), vec![]);
    }
}
