//! `cargo moe-gate merge REPORT.json...` (docs/gate.md): joins the `report.json` files of the shards of one
//! `--partition K/N` run into the report the unpartitioned run would have written, and exits like the
//! gate (0, or 101 when a blocking gate fails).
//!
//! The shards must agree (one contract id and version, one model, one N, every partition 1..N exactly
//! once, no prompt in two shards); anything else is a [`MergeError`] (exit 2). The contract itself is
//! read again (the path the shards recorded, or `--contract`) and planned for the shards' model, so every
//! trial of the plan is found in the shard that owns its prompt, and each trial's recorded status is
//! checked against the contract's known divergences. The verdict is then computed as the gate computes
//! it, through [`Judged`] and [`moe_contracts::summarize`] over the union of the trials: a count or
//! fraction gate (`"N/M"`, `0.95`) is applied to all of a criterion's trials at once, which is not the
//! conjunction of the shards' verdicts. Per-layer tables are recomputed from the trials; next-token rows
//! and diagnoses, which are per prompt, are taken from the shard that ran the prompt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moe_contracts::{Contract, Prompt, TrialOutcome, TrialPlan};

use crate::cli::MergeArgs;
use crate::error::GateError;
use crate::gate::resolve_for_model;
use crate::partition::Partition;
use crate::report::{
    ArgmaxRow, CudaInfo, Diagnosis, GateReport, GreedyRow, SCHEMA_VERSION, ShardSummary, Timings,
    TrialReport, TrialStatus, terminal,
};
use crate::trials::{self, Selection};
use crate::verdict::Judged;

/// Why the shards' reports cannot be merged (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A report file cannot be read.
    #[error(
        "cannot read shard report {path}: {source}; pass the report.json each shard wrote under --report-dir"
    )]
    Read { path: PathBuf, source: std::io::Error },
    /// A file is not a gate report.
    #[error(
        "{path} is not a moe-gate report.json ({reason}); pass the report.json each shard wrote under --report-dir"
    )]
    Parse { path: PathBuf, reason: String },
    /// A report has a schema this tool does not read.
    #[error(
        "{path} has report schema {found}, this cargo-moe-gate reads schema {SCHEMA_VERSION}; merge with the \
         cargo-moe-gate version that wrote the shards"
    )]
    Schema { path: PathBuf, found: u32 },
    /// A report is of a run that did not finish.
    #[error(
        "{path} is the report of a run that did not finish ({why}); rerun that shard and merge its new \
         report.json"
    )]
    Incomplete { path: PathBuf, why: String },
    /// A report's partition is not K/N with 1 <= K <= N.
    #[error(
        "{path} claims partition {index}/{count}, which no run writes (1 <= K <= N); pass the report.json a shard wrote"
    )]
    BadPartition { path: PathBuf, index: usize, count: usize },
    /// A report claims more layers than it holds trials for.
    #[error(
        "{path} claims a model of {n_layer} layers but holds {trials} trials, too few for a per-layer \
         criterion over that depth; pass the report.json a shard wrote"
    )]
    BadLayerCount { path: PathBuf, n_layer: usize, trials: usize },
    /// A report is of an unpartitioned run.
    #[error(
        "{path} is not a shard: its run had no --partition; merge the reports of `--partition 1/N` .. `N/N` \
         runs of one contract"
    )]
    NotAShard { path: PathBuf },
    /// Two reports judged different contracts (or versions of one).
    #[error(
        "{first} and {other} are shards of different contracts ({first_contract} and {other_contract}); \
         merge the shards of one contract run only"
    )]
    DifferentContracts { first: PathBuf, first_contract: String, other: PathBuf, other_contract: String },
    /// Two reports ran different models.
    #[error(
        "{first} ran model `{first_model}` but {other} ran `{other_model}`; shards of one run must run one \
         model (pass the same --model to every shard, or run them all with or all without CUDA)"
    )]
    DifferentModels { first: PathBuf, first_model: String, other: PathBuf, other_model: String },
    /// Two reports were written by different versions of the gate.
    #[error(
        "{first} was written by {first_tool} but {other} by {other_tool}; run every shard with one gate version"
    )]
    DifferentTools { first: PathBuf, first_tool: String, other: PathBuf, other_tool: String },
    /// Two reports split the prompts into different numbers of partitions.
    #[error(
        "{first} is partition {first_partition} but {other} is partition {other_partition}: the shards split \
         the prompts differently; merge shards of one --partition K/N matrix (one N)"
    )]
    DifferentCounts { first: PathBuf, first_partition: String, other: PathBuf, other_partition: String },
    /// One partition is given twice.
    #[error(
        "partition {partition} is given twice ({first} and {other}); pass each shard's report.json exactly once"
    )]
    DuplicateShard { partition: String, first: PathBuf, other: PathBuf },
    /// Partitions are missing.
    #[error(
        "missing shard{s} {missing} of {count}: the merged report would not cover the whole contract; pass the \
         report.json of every partition 1/{count} .. {count}/{count}",
        s = if missing.contains(',') { "s" } else { "" }
    )]
    MissingShards { missing: String, count: usize },
    /// One prompt is claimed by two shards.
    #[error(
        "prompt `{prompt}` is in two shards ({first} and {other}); the shards were not dealt out from one \
         prompt list: rerun them with one contract and one model"
    )]
    PromptInTwoShards { prompt: String, first: PathBuf, other: PathBuf },
    /// The contract read now is not the one the shards judged.
    #[error(
        "the shards judged {shards} but {path} holds {found}; pass --contract with the contract the shards \
         judged"
    )]
    ContractVersion { path: PathBuf, shards: String, found: String },
    /// A shard's prompts are not the ones the contract deals to its partition.
    #[error(
        "{path} (partition {partition}) holds prompts [{found}] but the contract deals it [{expected}] on model \
         `{model}`; the contract's prompts changed since the shards ran: rerun them"
    )]
    PromptsDiffer { path: PathBuf, partition: String, found: String, expected: String, model: String },
    /// A planned trial is missing from the shard that owns its prompt.
    #[error(
        "{path} lacks trial `{trial}` of its prompt `{prompt}`; the shard ran another plan (a different model \
         depth or contract): rerun it"
    )]
    MissingTrial { path: PathBuf, trial: String, prompt: String },
    /// A shard holds a trial the contract does not plan.
    #[error(
        "{path} holds trial `{trial}`, which the contract does not plan (or not in this shard); the contract \
         changed since the shards ran: rerun them"
    )]
    UnknownTrial { path: PathBuf, trial: String },
    /// A trial's recorded status contradicts the contract's known divergences.
    #[error(
        "{path}: trial `{trial}` is recorded as {found} but the contract's known divergences make it {expected}; \
         the known divergences changed since the shards ran: rerun them"
    )]
    StatusDisagrees { path: PathBuf, trial: String, found: String, expected: String },
}

/// One shard: its report and the file it came from.
#[derive(Debug, Clone)]
pub struct Shard {
    /// The report.json given to `merge`.
    pub path: PathBuf,
    /// Its content.
    pub report: GateReport,
}

/// Runs `cargo moe-gate merge`: reads the shards, merges them, prints the summary, writes the reports,
/// and returns the merged verdict's exit code.
pub fn run_merge(args: &MergeArgs) -> Result<u8, GateError> {
    let shards = args.reports.iter().map(|p| read_shard(p)).collect::<Result<Vec<_>, _>>()?;
    let shards = check_shards(shards)?;
    let contract = load_contract(args.contract.as_deref(), &shards[0])?;
    let mut report = merge(&contract, &shards)?;
    let empty = report.refuse_if_empty(args.allow_empty);
    crate::output::print_all(&terminal::render(&report));
    if let Some(dir) = &args.report_dir {
        report.write_dir(dir)?;
        eprintln!("moe-gate: merged report written to {}", dir.display());
    }
    if let Some(file) = &args.junit {
        report.write_junit(file)?;
    }
    if let Some(reason) = empty {
        return Err(GateError::nothing_judged(format!("the shards: {reason}"), None));
    }
    Ok(report.verdict.exit_code)
}

/// Reads one shard's report.json.
pub fn read_shard(path: &Path) -> Result<Shard, MergeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| MergeError::Read { path: path.to_path_buf(), source })?;
    parse_shard(&text, path)
}

/// Parses the text of one shard's report.json; `path` is the file errors name.
pub fn parse_shard(text: &str, path: &Path) -> Result<Shard, MergeError> {
    let schema = serde_json::from_str::<serde_json::Value>(text)
        .map_err(|e| MergeError::Parse { path: path.to_path_buf(), reason: e.to_string() })?
        .get("schema_version")
        .and_then(serde_json::Value::as_u64);
    match schema {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(v) => {
            return Err(MergeError::Schema {
                path: path.to_path_buf(),
                found: u32::try_from(v).unwrap_or(u32::MAX),
            });
        }
        None => {
            return Err(MergeError::Parse { path: path.to_path_buf(), reason: "no schema_version".into() });
        }
    }
    let report = GateReport::from_json(text)
        .map_err(|e| MergeError::Parse { path: path.to_path_buf(), reason: e.to_string() })?;
    if let Some(why) = &report.verdict.incomplete {
        return Err(MergeError::Incomplete { path: path.to_path_buf(), why: why.clone() });
    }
    Ok(Shard { path: path.to_path_buf(), report })
}

/// Checks that the shards are the partitions 1..N of one run and returns them ordered by partition.
pub fn check_shards(mut shards: Vec<Shard>) -> Result<Vec<Shard>, MergeError> {
    for s in &shards {
        let Some(p) = &s.report.partition else {
            return Err(MergeError::NotAShard { path: s.path.clone() });
        };
        // Issue 13 fuzzing: `count: 0` divided by zero, `index: 0` underflowed in the prompt dealing.
        if p.index == 0 || p.index > p.count {
            return Err(MergeError::BadPartition { path: s.path.clone(), index: p.index, count: p.count });
        }
    }
    let first = shards.first().expect("clap requires at least one report").clone();
    let contract_of = |r: &GateReport| format!("{} {}", r.contract.id, r.contract.version);
    for other in &shards[1..] {
        let (a, b) = (&first.report, &other.report);
        let (first_path, other_path) = (first.path.clone(), other.path.clone());
        if contract_of(a) != contract_of(b) {
            return Err(MergeError::DifferentContracts {
                first: first_path,
                first_contract: contract_of(a),
                other: other_path,
                other_contract: contract_of(b),
            });
        }
        if a.model.spec != b.model.spec {
            return Err(MergeError::DifferentModels {
                first: first_path,
                first_model: a.model.spec.clone(),
                other: other_path,
                other_model: b.model.spec.clone(),
            });
        }
        if a.tool != b.tool {
            return Err(MergeError::DifferentTools {
                first: first_path,
                first_tool: a.tool.clone(),
                other: other_path,
                other_tool: b.tool.clone(),
            });
        }
        let (pa, pb) = (partition_of(a), partition_of(b));
        if pa.count != pb.count {
            return Err(MergeError::DifferentCounts {
                first: first_path,
                first_partition: pa.to_string(),
                other: other_path,
                other_partition: pb.to_string(),
            });
        }
    }
    shards.sort_by_key(|s| partition_of(&s.report).index);
    for pair in shards.windows(2) {
        let p = partition_of(&pair[0].report);
        if p == partition_of(&pair[1].report) {
            return Err(MergeError::DuplicateShard {
                partition: p.to_string(),
                first: pair[0].path.clone(),
                other: pair[1].path.clone(),
            });
        }
    }
    let count = partition_of(&first.report).count;
    let present: Vec<usize> = shards.iter().map(|s| partition_of(&s.report).index).collect();
    let missing: Vec<String> =
        (1..=count).filter(|k| !present.contains(k)).map(|k| format!("{k}/{count}")).collect();
    if !missing.is_empty() {
        return Err(MergeError::MissingShards { missing: missing.join(", "), count });
    }
    let mut owner: HashMap<&str, &Path> = HashMap::new();
    for s in &shards {
        for prompt in &s.report.partition.as_ref().expect("checked above").prompts {
            if let Some(first) = owner.insert(prompt, &s.path) {
                return Err(MergeError::PromptInTwoShards {
                    prompt: prompt.clone(),
                    first: first.to_path_buf(),
                    other: s.path.clone(),
                });
            }
        }
    }
    Ok(shards)
}

/// The partition of a shard's report (checked to be present).
fn partition_of(report: &GateReport) -> Partition {
    let p = report.partition.as_ref().expect("a shard's report has a partition");
    Partition { index: p.index, count: p.count }
}

/// The contract the shards judged: `--contract` if given, else the path the shards recorded, else the
/// workspace's contract of that id; it must have the shards' id and version.
fn load_contract(arg: Option<&str>, shard: &Shard) -> Result<Contract, GateError> {
    let recorded = Path::new(&shard.report.contract.path);
    let path = match arg {
        Some(arg) => crate::discover::locate_contract(Some(arg))?,
        None if recorded.is_file() => recorded.to_path_buf(),
        None => crate::discover::locate_contract(Some(&shard.report.contract.id))?,
    };
    let contract = moe_contracts::load(&path)?;
    let shards = format!("{} {}", shard.report.contract.id, shard.report.contract.version);
    let found = format!("{} {}", contract.contract, contract.version);
    if shards != found {
        return Err(MergeError::ContractVersion { path, shards, found }.into());
    }
    Ok(contract)
}

/// Merges checked shards ([`check_shards`]) of a run of `contract` into the whole run's report.
pub fn merge(contract: &Contract, shards: &[Shard]) -> Result<GateReport, MergeError> {
    let first = &shards[0].report;
    let contract = resolve_for_model(contract.clone(), &first.model.source, &first.model.spec);
    let prompts = contract.expand_prompts();
    check_prompts(&prompts, shards, &first.model.spec)?;

    // Issue 13 fuzzing: a huge `n_layer` made the plan allocate a trial per claimed layer. A shard of a
    // per-layer criterion holds a trial per layer for each of its prompts, so no real report claims more
    // layers than its trials.
    let (n_layer, trials) = (first.model.n_layer, shards.iter().map(|s| s.report.trials.len()).sum());
    if contract.criteria.iter().any(|c| c.is_per(moe_contracts::Per::Layer)) && n_layer > trials {
        return Err(MergeError::BadLayerCount { path: shards[0].path.clone(), n_layer, trials });
    }
    let plans = contract.plan(n_layer);
    let (statuses, outcomes) = recorded_outcomes(&plans, &prompts, shards)?;
    let judged = Judged { contract: &contract, plans: &plans, statuses: &statuses, outcomes: &outcomes };
    let summaries = judged.summaries();
    let criteria = judged.criteria(&summaries);
    let verdict = judged.verdict(&criteria, None);

    let position = |prompt: &str| prompts.iter().position(|p| p.id == prompt).unwrap_or(usize::MAX);
    let mut argmax: Vec<ArgmaxRow> = shards.iter().flat_map(|s| s.report.argmax.clone()).collect();
    argmax.sort_by_key(|row| position(&row.prompt));
    let mut greedy: Vec<GreedyRow> = shards.iter().flat_map(|s| s.report.greedy.clone()).collect();
    greedy.sort_by_key(|row| position(&row.prompt));
    let criterion_index = |id: &str| contract.criteria.iter().position(|c| c.id == id).unwrap_or(usize::MAX);
    let mut diagnoses: Vec<Diagnosis> = shards.iter().flat_map(|s| s.report.diagnoses.clone()).collect();
    diagnoses.sort_by_key(|d| (criterion_index(&d.criterion), position(&d.prompt)));
    let mut ties: Vec<crate::ties::TieReport> = shards.iter().flat_map(|s| s.report.ties.clone()).collect();
    ties.sort_by_key(|t| position(&t.prompt));

    Ok(GateReport {
        schema_version: SCHEMA_VERSION,
        tool: first.tool.clone(),
        contract: first.contract.clone(),
        model: first.model.clone(),
        partition: None,
        shards: shards.iter().map(summary_of).collect(),
        cuda: CudaInfo {
            needed: shards.iter().any(|s| s.report.cuda.needed),
            available: shards.iter().all(|s| s.report.cuda.available),
            reason: shards.iter().find_map(|s| s.report.cuda.reason.clone()),
        },
        timings: summed_timings(shards),
        criteria,
        trials: judged.trials(),
        layers: judged.layer_tables(),
        argmax,
        greedy,
        diagnoses,
        ties,
        verdict,
    })
}

/// Checks that each shard holds the prompts the contract deals to its partition.
fn check_prompts(prompts: &[Prompt], shards: &[Shard], model: &str) -> Result<(), MergeError> {
    for s in shards {
        let info = s.report.partition.as_ref().expect("checked shards have a partition");
        let expected: Vec<String> =
            partition_of(&s.report).prompts(prompts).into_iter().map(|p| p.id).collect();
        if info.prompts != expected || info.total_prompts != prompts.len() {
            return Err(MergeError::PromptsDiffer {
                path: s.path.clone(),
                partition: partition_of(&s.report).to_string(),
                found: info.prompts.join(", "),
                expected: expected.join(", "),
                model: model.to_string(),
            });
        }
    }
    Ok(())
}

/// Each planned trial's status and outcome, as recorded by the shard that owns its prompt.
type Recorded = (Vec<TrialStatus>, Vec<Option<TrialOutcome>>);

/// Finds every planned trial in the shard that owns its prompt and rebuilds its outcome from the
/// report: passed for `passed` and unexpected passes, failed for failures and expected failures, none
/// for ignored and filtered-out trials (which count nowhere, as in the gate).
fn recorded_outcomes(
    plans: &[TrialPlan],
    prompts: &[Prompt],
    shards: &[Shard],
) -> Result<Recorded, MergeError> {
    let by_name: Vec<HashMap<&str, &TrialReport>> =
        shards.iter().map(|s| s.report.trials.iter().map(|t| (t.name.as_str(), t)).collect()).collect();
    let mut used = vec![0usize; shards.len()];
    let mut statuses = Vec::with_capacity(plans.len());
    let mut outcomes = Vec::with_capacity(plans.len());
    for plan in plans {
        let at = prompts.iter().position(|p| p.id == plan.prompt);
        let owner = shards
            .iter()
            .position(|s| partition_of(&s.report).owns(at))
            .expect("the partitions 1..N together own every position");
        let shard = &shards[owner];
        let trial = by_name[owner].get(plan.name.as_str()).ok_or_else(|| MergeError::MissingTrial {
            path: shard.path.clone(),
            trial: plan.name.clone(),
            prompt: plan.prompt.clone(),
        })?;
        used[owner] += 1;
        let outcome = outcome_of(trial);
        if let Some(o) = &outcome {
            let expected = trials::status(plan, &Selection::Run, Some(o));
            // A shard's tie certification turns a failure into a tie cascade; the shard decided it.
            let certified =
                matches!(trial.status, TrialStatus::TieExcused(_)) && expected == TrialStatus::Failed;
            if expected != trial.status && !certified {
                return Err(MergeError::StatusDisagrees {
                    path: shard.path.clone(),
                    trial: plan.name.clone(),
                    found: trial.status.word().to_string(),
                    expected: expected.word().to_string(),
                });
            }
        }
        statuses.push(trial.status.clone());
        outcomes.push(outcome);
    }
    for (i, shard) in shards.iter().enumerate() {
        if used[i] != shard.report.trials.len() {
            let planned = |name: &str| plans.iter().any(|p| p.name == name);
            let extra = shard
                .report
                .trials
                .iter()
                .find(|t| !planned(&t.name))
                .map_or_else(|| "a trial twice".to_string(), |t| t.name.clone());
            return Err(MergeError::UnknownTrial { path: shard.path.clone(), trial: extra });
        }
    }
    Ok((statuses, outcomes))
}

/// The outcome a trial report records (`None` when it was not evaluated).
fn outcome_of(trial: &TrialReport) -> Option<TrialOutcome> {
    let passed = match trial.status {
        TrialStatus::Passed | TrialStatus::UnexpectedPass => true,
        TrialStatus::Failed | TrialStatus::ExpectedFailure | TrialStatus::TieExcused(_) => false,
        TrialStatus::Ignored(_) | TrialStatus::FilteredOut => return None,
    };
    Some(TrialOutcome {
        value: trial.value.unwrap_or(f64::NAN),
        passed,
        detail: trial.detail.clone(),
        non_finite: trial.non_finite.clone(),
    })
}

/// What the merged report keeps of one shard.
fn summary_of(shard: &Shard) -> ShardSummary {
    let r = &shard.report;
    ShardSummary {
        partition: r.partition.clone().expect("checked shards have a partition"),
        report: shard.path.display().to_string(),
        exit_code: r.verdict.exit_code,
        line: r.verdict.line.clone(),
        timings: r.timings.clone(),
    }
}

/// Every phase summed over the shards; each run's forwards summed over the shards (runs in order of
/// first appearance).
fn summed_timings(shards: &[Shard]) -> Timings {
    let mut sum = Timings::default();
    for t in shards.iter().map(|s| &s.report.timings) {
        sum.model_s += t.model_s;
        sum.evaluation_s += t.evaluation_s;
        sum.ties_s += t.ties_s;
        sum.diagnosis_s += t.diagnosis_s;
        sum.total_s += t.total_s;
        for run in &t.runs {
            match sum.runs.iter_mut().find(|r| r.run == run.run) {
                Some(r) => {
                    r.prompts += run.prompts;
                    r.tokens += run.tokens;
                    r.greedy_steps += run.greedy_steps;
                    r.seconds += run.seconds;
                }
                None => sum.runs.push(run.clone()),
            }
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ContractInfo, ModelInfo};

    /// Four prompts; a per-prompt criterion with a count gate (3 of every 4 trials must pass), a
    /// per-layer one with `gate: all`, and a strict known divergence on layer 1 of `p3`.
    const CONTRACT: &str = "contract: merge-v1
version: 1.2.0
status: active
title: merging shards
model: synth:tiny
smoke_model: synth:tiny
prompts:
  - {id: p0, tokens: [1]}
  - {id: p1, tokens: [2, 3]}
  - {id: p2, tokens: [4]}
  - {id: p3, tokens: [5, 6, 7]}
runs:
  cpu: {backend: cpu}
  reference: {backend: reference}
criteria:
  - {id: ARG, title: a, compare: [cpu, reference], tap: logits, metric: argmax, per: [prompt], gate: \"3/4\"}
  - {id: HID, title: h, compare: [cpu, reference], tap: hidden, metric: cosine, per: [prompt, layer],
     threshold: {min: 0.9}, gate: all}
known_divergences:
  - {criterion: HID, where: {prompt: p3, layer: 1}, status: investigating, strict: true, note: issue 12}
amendments:
  - {version: 1.2.0, date: 2026-12-01, kind: tightened, summary: test}
  - {version: 1.0.0, date: 2026-11-29, kind: created, summary: test}
";

    const N_LAYER: usize = 2;

    fn contract() -> Contract {
        moe_contracts::parse(CONTRACT, Path::new("merge-v1.yaml")).unwrap()
    }

    /// What the gate would judge: ARG fails on `p1` only; HID passes everywhere except on `p2` layer 0
    /// when `hid_fails` (and on `p3` layer 1, where the strict known divergence makes a pass fail).
    fn outcome(plan: &TrialPlan, hid_fails: bool) -> TrialOutcome {
        let passed = match (plan.criterion.as_str(), plan.prompt.as_str(), plan.layer) {
            ("ARG", "p1", _) => false,
            ("HID", "p2", Some(0)) => !hid_fails,
            _ => true,
        };
        // Values with all 17 digits in use, so the JSON round trip must be exact to keep them.
        let layer = plan.layer.unwrap_or(0) as f64;
        let value = match plan.criterion.as_str() {
            "ARG" => f64::from(u8::from(!passed)),
            _ if passed => 0.9999999999999911 - 1.1e-15 * layer - 1e-16 * plan.prompt.len() as f64,
            _ => f64::NAN,
        };
        TrialOutcome { value, passed, detail: format!("value {value}"), non_finite: None }
    }

    /// The report of shard `index` of `count` (`None`: the unpartitioned run), built from the same
    /// pieces as the gate's ([`Judged`], [`Partition`]).
    fn run(index: Option<usize>, count: usize, hid_fails: bool) -> GateReport {
        let c = contract();
        let all = c.expand_prompts();
        let mut plans = c.plan(N_LAYER);
        let partition = index.map(|index| Partition { index, count });
        if let Some(p) = partition {
            p.retain_trials(&mut plans, &all);
        }
        let outcomes: Vec<Option<TrialOutcome>> = plans.iter().map(|p| Some(outcome(p, hid_fails))).collect();
        let statuses: Vec<TrialStatus> = plans
            .iter()
            .zip(&outcomes)
            .map(|(p, o)| trials::status(p, &Selection::Run, o.as_ref()))
            .collect();
        let judged = Judged { contract: &c, plans: &plans, statuses: &statuses, outcomes: &outcomes };
        let info = partition.map(|p| p.info(&all));
        let criteria = judged.criteria(&judged.summaries());
        let verdict = judged.verdict(&criteria, info.as_ref());
        let prompts = info.as_ref().map_or(all.len(), |i| i.prompts.len());
        GateReport {
            schema_version: SCHEMA_VERSION,
            tool: "cargo-moe-gate 0.1.0".into(),
            contract: ContractInfo {
                id: c.contract.clone(),
                version: c.version.to_string(),
                title: c.title.clone(),
                status: c.status.to_string(),
                path: "contracts/merge-v1.yaml".into(),
            },
            model: ModelInfo {
                spec: "synth:tiny".into(),
                source: "smoke_model".into(),
                reason: "no usable CUDA device".into(),
                n_layer: N_LAYER,
            },
            partition: info,
            shards: vec![],
            cuda: CudaInfo { needed: false, available: false, reason: None },
            timings: Timings {
                model_s: 0.5,
                runs: vec![crate::report::RunTiming {
                    run: "cpu".into(),
                    backend: "cpu".into(),
                    policy: "fast".into(),
                    prompts,
                    tokens: prompts * 2,
                    greedy_steps: 0,
                    seconds: 0.25,
                }],
                evaluation_s: 0.125,
                ties_s: 0.0,
                diagnosis_s: 0.0,
                total_s: 1.0,
            },
            criteria,
            trials: judged.trials(),
            layers: judged.layer_tables(),
            argmax: vec![],
            greedy: vec![],
            diagnoses: vec![],
            ties: vec![],
            verdict,
        }
    }

    /// Shard reports as `merge` reads them: written as JSON and read back.
    fn shards(count: usize, indices: &[usize], hid_fails: bool) -> (tempfile::TempDir, Vec<Shard>) {
        let dir = tempfile::tempdir().unwrap();
        let shards = indices
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let path = dir.path().join(format!("shard{i}-{k}of{count}.json"));
                std::fs::write(&path, run(Some(k), count, hid_fails).to_json()).unwrap();
                read_shard(&path).unwrap()
            })
            .collect();
        (dir, shards)
    }

    fn merged(count: usize, hid_fails: bool) -> GateReport {
        let (_dir, s) = shards(count, &(1..=count).rev().collect::<Vec<_>>(), hid_fails);
        merge(&contract(), &check_shards(s).unwrap()).unwrap()
    }

    fn counts(report: &GateReport) -> Vec<(String, usize, usize, bool)> {
        report.criteria.iter().map(|c| (c.id.clone(), c.passed, c.total, c.gate_holds)).collect()
    }

    #[test]
    fn a_count_gate_is_judged_over_every_shard_at_once() {
        // ARG: p1 fails. Shard 2/2 (p1, p3) alone is 1 of 2, below 3 of 4, so it fails on its own;
        // over all four prompts 3 of 4 pass and the gate holds. AND-ing the shards would say 101.
        let (_dir, s) = shards(2, &[2, 1], false);
        assert_eq!(s.iter().map(|s| s.report.verdict.exit_code).collect::<Vec<_>>(), [101, 0]);
        assert!(s[0].report.verdict.line.starts_with("FAILED for partition 2/2: 2 of 4 prompts"));
        let report = merge(&contract(), &check_shards(s).unwrap()).unwrap();
        let whole = run(None, 1, false);
        assert_eq!(counts(&report)[0], ("ARG".to_string(), 3, 4, true));
        // HID: 4 prompts x 2 layers all pass, but one is a strict known divergence that passed: listed,
        // and the gate fails.
        assert_eq!(counts(&report)[1], ("HID".to_string(), 8, 8, false));
        assert_eq!(report.criteria[1].unexpected_passes, ["merge-v1::HID::p3::layer01"]);
        assert_eq!(counts(&report), counts(&whole));
        assert_eq!(report.verdict.line, whole.verdict.line);
        assert_eq!(report.verdict.exit_code, 101, "the unexpected pass fails HID");
    }

    #[test]
    fn merged_report_equals_the_unpartitioned_one() {
        for count in [1, 2, 3, 4, 6] {
            let report = merged(count, true);
            let whole = run(None, 1, true);
            let names = |r: &GateReport| r.trials.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
            assert_eq!(names(&report), names(&whole), "plan order, {count} shards");
            let statuses = |r: &GateReport| r.trials.iter().map(|t| t.status.clone()).collect::<Vec<_>>();
            assert_eq!(statuses(&report), statuses(&whole));
            let bits =
                |r: &GateReport| r.trials.iter().map(|t| t.value.map(f64::to_bits)).collect::<Vec<_>>();
            assert_eq!(bits(&report), bits(&whole), "values read back bit for bit");
            assert_eq!(counts(&report), counts(&whole));
            assert_eq!(report.verdict.line, whole.verdict.line);
            assert_eq!(report.verdict.blocking_failed, ["HID"]);
            // The NaN of the failing trial was written as null and is NaN again in the layer table.
            let row = &report.layers[0].rows[0];
            assert!(row.worst.is_nan() && row.worst_prompt == "p2" && row.failed, "{row:?}");
            assert_eq!(report.layers[0].rows.len(), whole.layers[0].rows.len());
            assert_eq!(report.partition, None);
            assert_eq!(report.shards.len(), count);
            // Timings: each shard ran 1.0 s in all; the cpu run forwarded every prompt once.
            assert_eq!(report.timings.total_s, count as f64);
            assert_eq!(report.timings.runs[0].prompts, 4);
            assert_eq!(
                report.shards.iter().map(|s| s.partition.index).collect::<Vec<_>>(),
                (1..=count).collect::<Vec<_>>()
            );
        }
    }

    fn merge_error(count: usize, indices: &[usize]) -> String {
        let (_dir, s) = shards(count, indices, false);
        check_shards(s).and_then(|s| merge(&contract(), &s)).unwrap_err().to_string()
    }

    #[test]
    fn missing_and_duplicated_shards_are_refused() {
        let e = merge_error(3, &[1, 3]);
        assert!(e.contains("missing shard 2/3 of 3") && e.contains("every partition 1/3 .. 3/3"), "{e}");
        let e = merge_error(4, &[4, 1]);
        assert!(e.contains("missing shards 2/4, 3/4 of 4"), "{e}");
        let e = merge_error(2, &[1, 2, 1]);
        assert!(e.contains("partition 1/2 is given twice") && e.contains("exactly once"), "{e}");
    }

    #[test]
    fn shards_of_different_runs_are_refused() {
        let (_dir, good) = shards(2, &[1, 2], false);
        let refuse = |edit: &dyn Fn(&mut GateReport), expected: &str| {
            let mut s = good.clone();
            edit(&mut s[1].report);
            let e = check_shards(s).and_then(|s| merge(&contract(), &s)).unwrap_err().to_string();
            assert!(e.contains(expected), "expected `{expected}` in: {e}");
        };
        refuse(
            &|r| r.contract.id = "other-v1".into(),
            "shards of different contracts (merge-v1 1.2.0 and other-v1 1.2.0)",
        );
        refuse(&|r| r.contract.version = "1.0.0".into(), "(merge-v1 1.2.0 and merge-v1 1.0.0)");
        refuse(&|r| r.model.spec = "synth:small".into(), "ran `synth:small`");
        refuse(
            &|r| r.partition.as_mut().unwrap().count = 3,
            "is partition 2/3: the shards split the prompts differently",
        );
        refuse(&|r| r.partition = None, "is not a shard: its run had no --partition");
        refuse(&|r| r.partition.as_mut().unwrap().prompts.push("p0".into()), "prompt `p0` is in two shards");
        refuse(
            &|r| r.partition.as_mut().unwrap().prompts.pop().map(drop).unwrap_or(()),
            "holds prompts [p1] but the contract deals it [p1, p3]",
        );
        refuse(
            &|r| r.trials.retain(|t| t.name != "merge-v1::HID::p1::layer01"),
            "lacks trial `merge-v1::HID::p1::layer01`",
        );
        refuse(
            &|r| {
                let mut extra = r.trials[0].clone();
                extra.name = "merge-v1::GONE::p1".into();
                r.trials.push(extra);
            },
            "holds trial `merge-v1::GONE::p1`, which the contract does not plan",
        );
        refuse(
            &|r| {
                let t = r.trials.iter_mut().find(|t| t.name == "merge-v1::HID::p3::layer01").unwrap();
                t.status = TrialStatus::Passed;
            },
            "recorded as ok but the contract's known divergences make it UNEXPECTED PASS",
        );
    }

    #[test]
    fn a_contract_of_another_version_is_refused() {
        let (dir, s) = shards(2, &[1, 2], false);
        let path = dir.path().join("merge-v1.yaml");
        std::fs::write(
            &path,
            CONTRACT.replace("version: 1.2.0\n", "version: 1.3.0\n").replace(
                "  - {version: 1.2.0,",
                "  - {version: 1.3.0, date: 2026-12-02, kind: clarified, summary: t}\n  - {version: 1.2.0,",
            ),
        )
        .unwrap();
        let e = load_contract(Some(path.to_str().unwrap()), &s[0]).unwrap_err().to_string();
        assert!(
            e.contains("the shards judged merge-v1 1.2.0 but") && e.contains("holds merge-v1 1.3.0"),
            "{e}"
        );
        std::fs::write(&path, CONTRACT).unwrap();
        assert_eq!(load_contract(Some(path.to_str().unwrap()), &s[0]).unwrap().version.to_string(), "1.2.0");
    }

    #[test]
    fn unreadable_and_foreign_files_say_what_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_shard(&dir.path().join("absent.json")).unwrap_err().to_string();
        assert!(e.contains("cannot read shard report") && e.contains("--report-dir"), "{e}");
        let junk = dir.path().join("junk.json");
        std::fs::write(&junk, "{\"hello\": 1}").unwrap();
        let e = read_shard(&junk).unwrap_err().to_string();
        assert!(e.contains("is not a moe-gate report.json (no schema_version)"), "{e}");
        std::fs::write(&junk, "{\"schema_version\": 7}").unwrap();
        let e = read_shard(&junk).unwrap_err().to_string();
        assert!(e.contains("has report schema 7, this cargo-moe-gate reads schema 1"), "{e}");
    }

    #[test]
    fn hostile_partitions_and_layer_counts_are_refused() {
        // Issue 13 fuzzing (target `report`): these panicked (division by zero, underflow) or allocated
        // a trial per claimed layer before they were checked.
        let (_dir, good) = shards(2, &[1, 2], false);
        for (index, count) in [(1, 0), (0, 2), (3, 2)] {
            let mut bad = good.clone();
            let p = bad[0].report.partition.as_mut().unwrap();
            (p.index, p.count) = (index, count);
            let e = check_shards(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("claims partition {index}/{count}")), "{e}");
        }
        let mut huge = check_shards(good).unwrap();
        for s in &mut huge {
            s.report.model.n_layer = 1 << 50;
        }
        let e = merge(&contract(), &huge).unwrap_err().to_string();
        assert!(e.contains("claims a model of 1125899906842624 layers"), "{e}");
    }
}
