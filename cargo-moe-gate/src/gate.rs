//! The gate run (DESIGN §1, §4, §7-§9): load the contract, pick the model, record every needed
//! (run, prompt) forward once, evaluate every trial from the recorded traces, diagnose the failures,
//! hand the outcomes to libtest-mimic, then print the summary and write the reports.
//!
//! Exit codes: 0 every blocking gate holds, 101 a blocking gate failed, 2 (a [`GateError`]) the run could
//! not be judged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use moe_contracts::{Contract, CriterionSummary, Prompt, Recorded, TrialOutcome, TrialPlan};
use moe_engine::backend::{BackendKind, Policy};
use moe_engine::weights::ModelWeights;

use crate::cli::GateArgs;
use crate::diagnose::Diagnoser;
use crate::error::GateError;
use crate::model::{CudaStatus, ModelChoice, choose_model, probe_cuda, resolve_model};
use crate::record::{self, top_logits};
use crate::report::{
    ArgmaxRow, ContractInfo, CriterionReport, CudaInfo, Diagnosis, GateReport, LayerRow, LayerTable,
    ModelInfo, RunToken, SCHEMA_VERSION, Timings, TrialReport, TrialStatus, Verdict, Worse, terminal,
};
use crate::trials::{self, Selection};

/// libtest's exit code for failed tests, which the gate reuses for a failed blocking gate.
pub const EXIT_FAILED: u8 = 101;

/// Runs the gate and returns its exit code (0 or 101); errors mean exit 2.
pub fn run_gate(args: &GateArgs) -> Result<u8, GateError> {
    let started = Instant::now();
    let path = crate::discover::locate_contract(args.contract.as_deref())?;
    let contract = moe_contracts::load(&path)?;
    note(&format!(
        "contract {} {} ({}, {})",
        contract.contract,
        contract.version,
        path.display(),
        contract.status
    ));

    let model_started = Instant::now();
    let (choice, weights, mut cuda) = select_model(&contract, args.model.as_deref())?;
    let model_s = model_started.elapsed().as_secs_f64();
    note(&format!("model {} ({}: {})", choice.spec, choice.source, choice.reason));
    if let Some(why) = &cuda.unavailable {
        if args.require_cuda {
            return Err(GateError::CudaRequired { reason: why.clone() });
        }
        if cuda.needed {
            note(&format!("CUDA unavailable ({why}): trials that need it are listed as ignored"));
        }
    }

    // Prompt sets marked `only_on: model` stay off the smoke model (a `--model` is never the smoke model).
    let contract = if choice.source == "--model" { contract } else { contract.for_model(&choice.spec) };
    let prompts = contract.expand_prompts();
    let plans = contract.plan(weights.config.n_layer);
    let selection = trials::select(&contract, &plans, &args.libtest, cuda.unavailable.as_deref());
    if args.libtest.list {
        let statuses: Vec<TrialStatus> =
            plans.iter().zip(&selection).map(|(p, s)| trials::status(p, s, None)).collect();
        let none = vec![None; plans.len()];
        let list = trials::libtest_trials(&contract, &plans, &statuses, &none, cuda.unavailable.as_deref());
        let _listed = libtest_mimic::run(&args.libtest, list);
        return Ok(0);
    }

    let jobs = trials::jobs(&contract, &plans, &selection, &prompts);
    let mut ready = HashMap::new();
    if let Some(probe) = cuda.probe.take()
        && let Some(job) = jobs.iter().find(|j| j.backend == BackendKind::Cuda && j.policy == probe.policy())
    {
        ready.insert(job.run.clone(), probe);
    }
    let mut recording = record::record(&choice.spec, &weights, jobs, ready)?;

    let evaluation_started = Instant::now();
    let outcomes = trials::evaluate(&contract, &plans, &selection, &recording.recorded);
    let statuses: Vec<TrialStatus> = plans
        .iter()
        .zip(&selection)
        .zip(&outcomes)
        .map(|((p, s), o)| trials::status(p, s, o.as_ref()))
        .collect();
    let judged: Vec<(TrialPlan, Option<TrialOutcome>)> = plans
        .iter()
        .zip(&selection)
        .zip(&outcomes)
        .filter(|((_, s), _)| **s != Selection::FilteredOut)
        .map(|((p, _), o)| (p.clone(), o.clone()))
        .collect();
    let summaries = moe_contracts::summarize(&contract, &judged);
    let evaluation_s = evaluation_started.elapsed().as_secs_f64();

    let diagnosis_started = Instant::now();
    let diagnoses = Diagnoser {
        contract: &contract,
        weights: &weights,
        model_spec: &choice.spec,
        prompts: &prompts,
        recorded: &mut recording.recorded,
        backends: &mut recording.backends,
        isolated_cache: HashMap::new(),
        extra_reference_forwards: 0,
    }
    .diagnose_all(&plans, &statuses, &outcomes);
    let diagnosis_s = diagnosis_started.elapsed().as_secs_f64();

    let list = trials::libtest_trials(&contract, &plans, &statuses, &outcomes, cuda.unavailable.as_deref());
    let _conclusion = libtest_mimic::run(&args.libtest, list);

    let timings = Timings {
        model_s,
        runs: recording.timings.clone(),
        evaluation_s,
        diagnosis_s,
        total_s: started.elapsed().as_secs_f64(),
    };
    let report = ReportInputs {
        contract: &contract,
        choice: &choice,
        n_layer: weights.config.n_layer,
        cuda: &cuda,
        plans: &plans,
        statuses: &statuses,
        outcomes: &outcomes,
        summaries: &summaries,
        recorded: &recording.recorded,
        prompts: &prompts,
    }
    .build(diagnoses, timings);

    let summary = terminal::render(&report);
    if args.libtest.format == Some(libtest_mimic::FormatSetting::Json) {
        eprint!("{summary}");
    } else {
        crate::commands::print_all(&summary);
    }
    if let Some(dir) = &args.report_dir {
        report.write_dir(dir)?;
        note(&format!("reports written to {}", dir.display()));
    }
    if let Some(file) = &args.junit {
        report.write_junit(file)?;
    }
    Ok(report.verdict.exit_code)
}

/// A line on stderr (stdout belongs to libtest, whose `--format json` must stay parseable).
fn note(msg: &str) {
    eprintln!("moe-gate: {msg}");
}

/// Loads the model the gate runs and probes CUDA. Without `--model`, the smoke model is loaded first
/// (it is small) to probe CUDA; where CUDA works, the model of record replaces it and the probe is
/// repeated on it, so the CUDA run reuses that backend and the weights are uploaded once.
fn select_model(
    contract: &Contract,
    override_spec: Option<&str>,
) -> Result<(ModelChoice, Arc<ModelWeights>, CudaStatus), GateError> {
    let cuda_runs: Vec<Policy> = contract
        .needed_runs()
        .iter()
        .filter_map(|r| contract.runs.get(r))
        .filter(|s| s.backend == BackendKind::Cuda)
        .map(|s| s.policy)
        .collect();
    let needed = !cuda_runs.is_empty();
    let policy = cuda_runs.first().copied().unwrap_or_default();
    if let Some(spec) = override_spec {
        let weights = resolve_model(spec)?;
        let cuda = probe_cuda(needed, &weights, policy)?;
        let choice =
            choose_model(Some(spec), &contract.model, &contract.smoke_model, cuda.unavailable.as_deref());
        return Ok((choice, weights, cuda));
    }
    let smoke = resolve_model(&contract.smoke_model)?;
    let cuda = probe_cuda(needed, &smoke, policy)?;
    let choice = choose_model(None, &contract.model, &contract.smoke_model, cuda.unavailable.as_deref());
    if choice.spec == contract.smoke_model {
        return Ok((choice, smoke, cuda));
    }
    drop(cuda);
    drop(smoke);
    let weights = resolve_model(&choice.spec)?;
    let cuda = probe_cuda(needed, &weights, policy)?;
    Ok((choice, weights, cuda))
}

/// What the report is built from.
struct ReportInputs<'a> {
    contract: &'a Contract,
    choice: &'a ModelChoice,
    n_layer: usize,
    cuda: &'a CudaStatus,
    plans: &'a [TrialPlan],
    statuses: &'a [TrialStatus],
    outcomes: &'a [Option<TrialOutcome>],
    summaries: &'a [CriterionSummary],
    recorded: &'a Recorded,
    prompts: &'a [Prompt],
}

impl ReportInputs<'_> {
    fn build(&self, diagnoses: Vec<Diagnosis>, timings: Timings) -> GateReport {
        let c = self.contract;
        let criteria = self.criteria();
        let verdict = self.verdict(&criteria);
        GateReport {
            schema_version: SCHEMA_VERSION,
            tool: format!("cargo-moe-gate {}", env!("CARGO_PKG_VERSION")),
            contract: ContractInfo {
                id: c.contract.clone(),
                version: c.version.to_string(),
                title: c.title.clone(),
                status: c.status.to_string(),
                path: c.path.display().to_string(),
            },
            model: ModelInfo {
                spec: self.choice.spec.clone(),
                source: self.choice.source.to_string(),
                reason: self.choice.reason.clone(),
                n_layer: self.n_layer,
            },
            cuda: CudaInfo {
                needed: self.cuda.needed,
                available: self.cuda.available(),
                reason: self.cuda.unavailable.clone(),
            },
            timings,
            criteria,
            trials: self.trials(),
            layers: self.layer_tables(),
            argmax: self.argmax_rows(),
            diagnoses,
            verdict,
        }
    }

    fn trials(&self) -> Vec<TrialReport> {
        self.plans
            .iter()
            .zip(self.statuses)
            .zip(self.outcomes)
            .map(|((plan, status), outcome)| TrialReport {
                name: plan.name.clone(),
                criterion: plan.criterion.clone(),
                prompt: plan.prompt.clone(),
                layer: plan.layer,
                position: plan.position,
                status: status.clone(),
                value: outcome.as_ref().map(|o| o.value),
                detail: outcome.as_ref().map(|o| o.detail.clone()).unwrap_or_default(),
                non_finite: outcome.as_ref().and_then(|o| o.non_finite.clone()),
                known_divergence: plan.expected.as_ref().map(|k| format!("{}: {}", k.status, k.note)),
            })
            .collect()
    }

    fn criteria(&self) -> Vec<CriterionReport> {
        self.contract
            .criteria
            .iter()
            .map(|c| {
                let summary = self.summaries.iter().find(|s| s.criterion == c.id);
                let mine: Vec<&TrialStatus> = self
                    .plans
                    .iter()
                    .zip(self.statuses)
                    .filter(|(p, _)| p.criterion == c.id)
                    .map(|(_, s)| s)
                    .collect();
                let count = |f: fn(&TrialStatus) -> bool| mine.iter().filter(|s| f(s)).count();
                CriterionReport {
                    id: c.id.clone(),
                    title: c.title.clone(),
                    compare: c.compare.clone(),
                    tap: c.tap.to_string(),
                    metric: c.metric.to_string(),
                    gate: c.gate.to_string(),
                    threshold: match (c.threshold.min, c.threshold.max) {
                        (None, None) => String::new(),
                        _ => c.threshold.to_string(),
                    },
                    worse: worse(c),
                    blocking: c.blocking,
                    passed: summary.map_or(0, |s| s.passed),
                    total: summary.map_or(0, |s| s.total),
                    ignored: count(|s| matches!(s, TrialStatus::Ignored(_))),
                    expected_failures: count(|s| *s == TrialStatus::ExpectedFailure),
                    unexpected_passes: summary.map(|s| s.unexpected_passes.clone()).unwrap_or_default(),
                    gate_holds: summary.is_none_or(|s| s.gate_holds),
                }
            })
            .collect()
    }

    /// Worst value per layer over prompts, for every criterion with per-layer trials.
    fn layer_tables(&self) -> Vec<LayerTable> {
        let mut tables = Vec::new();
        for c in &self.contract.criteria {
            let direction = worse(c);
            let mut rows: Vec<LayerRow> = Vec::new();
            for ((plan, status), outcome) in self.plans.iter().zip(self.statuses).zip(self.outcomes) {
                let (Some(layer), Some(o)) = (plan.layer, outcome) else { continue };
                if plan.criterion != c.id {
                    continue;
                }
                let row = match rows.iter_mut().position(|r| r.layer == layer) {
                    Some(i) => &mut rows[i],
                    None => {
                        rows.push(LayerRow {
                            layer,
                            worst: o.value,
                            worst_prompt: plan.prompt.clone(),
                            failed: false,
                            values: Default::default(),
                        });
                        rows.last_mut().expect("pushed")
                    }
                };
                let v = row.values.get(&plan.prompt).map_or(o.value, |&prev| direction.worst(prev, o.value));
                row.values.insert(plan.prompt.clone(), v);
                if direction.is_worse(o.value, row.worst) {
                    row.worst = o.value;
                    row.worst_prompt = plan.prompt.clone();
                }
                row.failed |= status.is_failure();
            }
            if rows.is_empty() {
                continue;
            }
            rows.sort_by_key(|r| r.layer);
            let threshold = match direction {
                Worse::Lower => c.threshold.min,
                Worse::Higher => c.threshold.max,
            };
            tables.push(LayerTable {
                criterion: c.id.clone(),
                metric: c.metric.to_string(),
                worse: direction,
                threshold,
                rows,
            });
        }
        tables
    }

    /// Each prompt's next token according to each recorded run (last position of its trace).
    fn argmax_rows(&self) -> Vec<ArgmaxRow> {
        let mut runs: Vec<&String> = self.recorded.traces.keys().map(|(r, _)| r).collect();
        runs.sort();
        runs.dedup();
        self.prompts
            .iter()
            .filter_map(|p| {
                let tokens: Vec<RunToken> = runs
                    .iter()
                    .filter_map(|run| {
                        let trace = self.recorded.traces.get(&((*run).clone(), p.id.clone()))?;
                        let last = trace.logits.rows.checked_sub(1)?;
                        let row: Vec<f32> = trace.logits.row(last).iter().map(|&v| v as f32).collect();
                        let top = top_logits(&row, 2);
                        let &(token, _) = top.first()?;
                        let logit = trace.logits.row(last)[token as usize];
                        let margin = top
                            .get(1)
                            .map_or(f64::INFINITY, |&(t2, _)| logit - trace.logits.row(last)[t2 as usize]);
                        Some(RunToken { run: (*run).clone(), token, logit, margin })
                    })
                    .collect();
                if tokens.is_empty() {
                    return None;
                }
                let agree = tokens.iter().all(|t| t.token == tokens[0].token);
                Some(ArgmaxRow { prompt: p.id.clone(), runs: tokens, agree })
            })
            .collect()
    }

    fn verdict(&self, criteria: &[CriterionReport]) -> Verdict {
        let failed = |blocking: bool| -> Vec<String> {
            criteria
                .iter()
                .filter(|c| c.blocking == blocking && !c.gate_holds)
                .map(|c| c.id.clone())
                .collect()
        };
        let blocking_failed = failed(true);
        let advisory_failed = failed(false);
        let ignored = self.statuses.iter().filter(|s| matches!(s, TrialStatus::Ignored(_))).count();
        let judged: usize = criteria.iter().map(|c| c.total).sum();
        let expected: usize = criteria.iter().map(|c| c.expected_failures).sum();
        let unexpected: usize = criteria.iter().map(|c| c.unexpected_passes.len()).sum();
        let line = if blocking_failed.is_empty() {
            let mut line = format!(
                "PASSED: every blocking gate holds ({judged} trials judged, {expected} expected failures, {ignored} ignored)"
            );
            if !advisory_failed.is_empty() {
                line.push_str(&format!("; advisory gates failed: {}", advisory_failed.join(", ")));
            }
            line
        } else {
            let (s, verb) = if blocking_failed.len() == 1 { ("", "does") } else { ("s", "do") };
            let mut line = format!("FAILED: blocking gate{s} {} {verb} not hold", blocking_failed.join(", "));
            if unexpected > 0 {
                line.push_str(&format!(" ({unexpected} strict known divergences passed unexpectedly)"));
            }
            line
        };
        let exit_code = if blocking_failed.is_empty() { 0 } else { EXIT_FAILED };
        Verdict { exit_code, blocking_failed, advisory_failed, ignored, line }
    }
}

/// Which way a criterion's metric gets worse: bounded below (cosine) means lower is worse; everything
/// else (error sizes, mismatch counts) higher.
fn worse(c: &moe_contracts::Criterion) -> Worse {
    match c.metric.bound() {
        Some(moe_contracts::Bound::Min) => Worse::Lower,
        _ => Worse::Higher,
    }
}
