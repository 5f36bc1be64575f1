//! The gate run (docs/architecture.md, docs/contracts.md, docs/gate.md): load the contract, pick the model, record every needed
//! (run, prompt) forward once, evaluate every trial from the recorded traces, diagnose the failures,
//! hand the outcomes to libtest-mimic, then print the summary and write the reports. Under
//! `--partition K/N` only the trials of the partition's prompts exist for the run ([`crate::partition`]).
//!
//! Exit codes: 0 every blocking gate holds, 101 a blocking gate failed, 2 (a [`GateError`]) the run could
//! not be judged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use moe_contracts::{Contract, Prompt, Recorded};
use moe_engine::backend::{BackendKind, Policy};
use moe_engine::defect::Defect;
use moe_engine::weights::ModelWeights;

use crate::cli::GateArgs;
use crate::diagnose::Diagnoser;
use crate::error::GateError;
use crate::model::{CudaStatus, ModelChoice, choose_model, probe_cuda, resolve_model};
use crate::record::{self, top_logits};
use crate::report::{
    ArgmaxRow, ContractInfo, CudaInfo, Diagnosis, GateReport, ModelInfo, PartitionInfo, RunToken,
    SCHEMA_VERSION, Timings, TrialStatus, incomplete, terminal,
};
use crate::ties::{TieReport, TieWork};
use crate::trials;
use crate::verdict::Judged;

/// libtest's exit code for failed tests, which the gate reuses for a failed blocking gate.
pub const EXIT_FAILED: u8 = 101;

/// Runs the gate and returns its exit code (0 or 101); errors mean exit 2.
pub fn run_gate(args: &GateArgs) -> Result<u8, GateError> {
    let report = run_gate_with(args, &GateMode::default())?;
    Ok(report.map_or(0, |r| r.verdict.exit_code))
}

/// How a gate run is carried out besides its command line. The default is the gate's own run; only
/// `cargo moe-gate selftest` sets anything else.
#[derive(Debug, Clone, Copy, Default)]
pub struct GateMode {
    /// The seeded defect and the backend it is built into: every run of that backend whose policy it
    /// applies to gets it, runs of other backends stay clean (`moe_engine::defect`; the selftest's, never a
    /// normal run's).
    pub defect: Option<(Defect, BackendKind)>,
    /// No libtest lines, summary or notes: the caller reports the returned report its own way.
    pub quiet: bool,
    /// Resolve the contract's prompts as for its smoke model (prompt sets marked `only_on: model` dropped)
    /// whatever model runs: the selftest runs a small model with the smoke prompts.
    pub smoke_prompts: bool,
}

/// Runs the gate as `mode` says and returns its report (`None` for `--list`, which judges nothing). The
/// report files are written as for [`run_gate`].
pub fn run_gate_with(args: &GateArgs, mode: &GateMode) -> Result<Option<GateReport>, GateError> {
    let note = |msg: &str| {
        if !mode.quiet {
            note(msg);
        }
    };
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

    let contract = match mode.smoke_prompts {
        true => {
            let smoke = contract.smoke_model.clone();
            contract.for_model(&smoke)
        }
        false => resolve_for_model(contract, choice.source, &choice.spec),
    };
    let (contract, tokenizer) = crate::text::tokenize_prompts(contract, &weights, &choice.spec)?;
    // The contract measured before its prompts are generated or its trials planned: one too large for
    // this machine is refused here, not after building a plan that may itself not fit.
    let cuda_usable = cuda.unavailable.is_none();
    let counted = |c: &moe_contracts::Criterion| cuda_usable || !crate::resources::needs_cuda(&contract, c);
    crate::resources::check_contract(&contract, &weights.config, args.partition, counted)?;
    incomplete::watch(args, &contract, &choice, weights.config.n_layer);
    let mut prompts = contract.expand_prompts();
    let mut plans = contract.plan(weights.config.n_layer);
    let partition = args.partition.map(|part| {
        let info = part.info(&prompts);
        part.retain_trials(&mut plans, &prompts);
        prompts = part.prompts(&prompts);
        note(&format!(
            "{info} ({}); the other shards' trials do not exist in this run",
            info.prompts.join(", ")
        ));
        info
    });
    let selection = trials::select(&contract, &plans, &args.libtest, cuda.unavailable.as_deref());
    if args.libtest.list {
        let statuses: Vec<TrialStatus> =
            plans.iter().zip(&selection).map(|(p, s)| trials::status(p, s, None)).collect();
        let none = vec![None; plans.len()];
        let list = trials::libtest_trials(&contract, &plans, &statuses, &none, cuda.unavailable.as_deref());
        let _listed = libtest_mimic::run(&args.libtest, list);
        return Ok(None);
    }

    let jobs = trials::jobs(&contract, &plans, &selection, &prompts);
    crate::resources::check(&jobs, &weights.config)?;
    let mut ready = HashMap::new();
    if let Some(probe) = cuda.probe.take()
        && let Some(job) = jobs.iter().find(|j| j.backend == BackendKind::Cuda && j.policy == probe.policy())
    {
        ready.insert(job.run.clone(), probe);
    }
    if let Some(seeded) = mode.defect {
        crate::selftest::seed_backends(&mut ready, &contract, &weights, seeded)?;
    }
    let mut recording = record::record(&choice.spec, &weights, jobs, ready)?;
    if let Some(seeded) = mode.defect {
        crate::selftest::seed_backends(&mut recording.backends, &contract, &weights, seeded)?;
    }

    let ties_started = Instant::now();
    let mut tie_work = TieWork {
        contract: &contract,
        weights: &weights,
        prompts: &prompts,
        recorded: &mut recording.recorded,
        backends: &mut recording.backends,
    };
    tie_work.record_isolated(&plans, &selection)?;
    for line in tie_work.record_references(&plans, &selection)? {
        note(&line);
    }
    let ties_recording_s = ties_started.elapsed().as_secs_f64();

    let evaluation_started = Instant::now();
    let outcomes = trials::evaluate(&contract, &plans, &selection, &recording.recorded);
    let mut statuses: Vec<TrialStatus> = plans
        .iter()
        .zip(&selection)
        .zip(&outcomes)
        .map(|((p, s), o)| trials::status(p, s, o.as_ref()))
        .collect();
    let certify_started = Instant::now();
    let tie_reports = TieWork {
        contract: &contract,
        weights: &weights,
        prompts: &prompts,
        recorded: &mut recording.recorded,
        backends: &mut recording.backends,
    }
    .certify(&plans, &mut statuses, &outcomes);
    let certify_s = certify_started.elapsed().as_secs_f64();
    let ties_s = ties_recording_s + certify_s;
    let judged = Judged { contract: &contract, plans: &plans, statuses: &statuses, outcomes: &outcomes };
    let summaries = judged.summaries();
    incomplete::judged(&judged, &summaries);
    // Evaluation's wall time without the certification inside it (counted in ties_s).
    let evaluation_s = evaluation_started.elapsed().as_secs_f64() - certify_s;

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
        bisection_cache: HashMap::new(),
    }
    .diagnose_all(&plans, &statuses, &outcomes);
    let diagnosis_s = diagnosis_started.elapsed().as_secs_f64();

    if !mode.quiet {
        let list =
            trials::libtest_trials(&contract, &plans, &statuses, &outcomes, cuda.unavailable.as_deref());
        let _conclusion = libtest_mimic::run(&args.libtest, list);
    }

    let timings = Timings {
        model_s,
        runs: recording.timings.clone(),
        evaluation_s,
        ties_s,
        diagnosis_s,
        total_s: started.elapsed().as_secs_f64(),
    };
    let report = ReportInputs {
        judged,
        choice: &choice,
        n_layer: weights.config.n_layer,
        cuda: &cuda,
        recorded: &recording.recorded,
        prompts: &prompts,
        partition,
    }
    .build(&summaries, diagnoses, tie_reports, timings);
    let mut report = crate::text::annotate(report, tokenizer.as_deref(), &contract, &recording.recorded);

    incomplete::finished();
    let empty = report.refuse_if_empty(args.allow_empty);
    let summary = terminal::render(&report);
    match (mode.quiet, args.libtest.format) {
        (true, _) => {}
        (false, Some(libtest_mimic::FormatSetting::Json)) => eprint!("{summary}"),
        (false, _) => crate::output::print_all(&summary),
    }
    if let Some(dir) = &args.report_dir {
        report.write_dir(dir)?;
        note(&format!("reports written to {}", dir.display()));
    }
    if let Some(file) = &args.junit {
        report.write_junit(file)?;
    }
    if let Some(reason) = empty {
        return Err(GateError::nothing_judged(reason, args.libtest.filter.as_deref()));
    }
    Ok(Some(report))
}

/// A line on stderr (stdout belongs to libtest, whose `--format json` must stay parseable).
fn note(msg: &str) {
    eprintln!("moe-gate: {msg}");
}

/// The contract as it applies to the model chosen: prompt sets marked `only_on: model` stay off the
/// smoke model (a `--model` is never the smoke model). `merge` resolves the shards' contract the same way.
pub fn resolve_for_model(contract: Contract, model_source: &str, model_spec: &str) -> Contract {
    if model_source == "--model" { contract } else { contract.for_model(model_spec) }
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
    judged: Judged<'a>,
    choice: &'a ModelChoice,
    n_layer: usize,
    cuda: &'a CudaStatus,
    recorded: &'a Recorded,
    /// The prompts of the run (of its partition, when partitioned).
    prompts: &'a [Prompt],
    partition: Option<PartitionInfo>,
}

impl ReportInputs<'_> {
    fn build(
        self,
        summaries: &[moe_contracts::CriterionSummary],
        diagnoses: Vec<Diagnosis>,
        ties: Vec<TieReport>,
        timings: Timings,
    ) -> GateReport {
        let c = self.judged.contract;
        let criteria = self.judged.criteria(summaries);
        let verdict = self.judged.verdict(&criteria, self.partition.as_ref());
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
            partition: self.partition.clone(),
            shards: Vec::new(),
            cuda: CudaInfo {
                needed: self.cuda.needed,
                available: self.cuda.available(),
                reason: self.cuda.unavailable.clone(),
            },
            timings,
            criteria,
            trials: self.judged.trials(),
            layers: self.judged.layer_tables(),
            argmax: self.argmax_rows(),
            greedy: Vec::new(),
            diagnoses,
            ties,
            verdict,
        }
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
                        Some(RunToken { run: (*run).clone(), token, text: None, logit, margin })
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
}
