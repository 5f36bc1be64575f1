//! `cargo moe-gate selftest` (issue 10 item 4; docs/gate.md, "What the gate catches"): the gate judged on
//! itself. It runs a contract once on clean backends and once per seeded defect of one backend
//! (`moe_engine::defect`), each time through the gate's own pipeline ([`crate::gate::run_gate_with`]), and
//! checks each outcome against the catalogue: a harmful defect must fail a blocking criterion of the
//! expected kind, and the diagnosis must blame the defect's backend at the expected first layer (and
//! decode step) and name the expected op; a benign change must pass. One table says it all, on stdout and
//! as `selftest.md` / `selftest.json` in the output directory.
//!
//! This is the one place a defect is switched on: [`seed_backends`] builds the defective backends through
//! `moe_engine::backend::create_backend_with`, which no other path of the gate calls with a defect.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use moe_contracts::Contract;
use moe_engine::backend::{BackendKind, BackendOptions, Forward, Policy, create_backend_with};
use moe_engine::defect::{Defect, Expected, Harm};
use moe_engine::weights::ModelWeights;
use serde::Serialize;

use crate::cli::{GateArgs, SelftestArgs};
use crate::error::GateError;
use crate::gate::{GateMode, run_gate_with};
use crate::report::{Diagnosis, GateReport};

/// The contract `--backend cpu` runs by default: cpu against the f64 reference on the smoke model.
pub const DEFAULT_CPU_CONTRACT: &str = "cpu-vs-reference-v1";
/// The contract `--backend cuda` runs by default: cuda against cpu.
pub const DEFAULT_CUDA_CONTRACT: &str = "qwen3-moe-forward-gpu-v1";
/// The model `--backend cuda` runs by default. The production shape's head_dim (128) and GQA (4:1), 32
/// experts top-4 so both MoE schedules (per slot and grouped) run, and 8 layers so the last layer is
/// not layer 1; a forward takes milliseconds where the model of record's (48 layers, 128 experts) takes
/// seconds, and the selftest runs the contract about twenty times.
pub const DEFAULT_CUDA_MODEL: &str = "synth:small";
/// Where the table is written unless `--out-dir` says otherwise.
pub const DEFAULT_OUT_DIR: &str = "target/moe-gate-selftest";
/// The exit code of a selftest where some defect was not caught or not located as the catalogue expects
/// (the gate's own code for a failed gate).
pub const EXIT_MISMATCH: u8 = crate::gate::EXIT_FAILED;

/// Runs the selftest and returns its exit code: 0 when every row matched the catalogue, 101 otherwise;
/// errors (exit 2) when it could not run.
pub fn run_selftest(args: &SelftestArgs) -> Result<u8, GateError> {
    let backend = selftest_backend(&args.backend)?;
    let defects = select_defects(backend, &args.defects)?;
    let gate_args = gate_args(args, backend);
    let path = crate::discover::locate_contract(gate_args.contract.as_deref())?;
    let contract = moe_contracts::load(&path)?;
    let policies = backend_policies(&contract, backend)?;
    let (runnable, inapplicable): (Vec<Defect>, Vec<Defect>) =
        defects.into_iter().partition(|d| policies.iter().any(|&p| d.applies_to(backend, p)));
    for d in &inapplicable {
        note(&format!(
            "{d}: not run, it applies to no {backend} run of {} (policies {})",
            contract.contract,
            policies.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }

    let started = Instant::now();
    note(&format!("clean baseline: {} on {backend}", contract.contract));
    let (baseline, baseline_s) = run_once(&gate_args, None)?;
    let mut rows = Vec::with_capacity(runnable.len());
    for (i, &defect) in runnable.iter().enumerate() {
        note(&format!("[{}/{}] {defect}", i + 1, runnable.len()));
        let (report, seconds) = run_once(&gate_args, Some((defect, backend)))?;
        rows.push(Row::judge(defect, backend, &contract, &report, seconds));
    }
    let outcome = Outcome {
        contract: format!("{} {}", contract.contract, contract.version),
        model: baseline.model.spec.clone(),
        backend: backend.to_string(),
        baseline: Baseline { exit_code: baseline.verdict.exit_code, seconds: baseline_s },
        not_run: inapplicable.iter().map(|d| d.name().to_string()).collect(),
        total_s: started.elapsed().as_secs_f64(),
        reasons: Vec::new(),
        rows,
    }
    .with_reasons();

    let table = outcome.markdown();
    crate::output::print_all(&table);
    let dir = args.out_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_OUT_DIR));
    outcome.write(&dir)?;
    note(&format!("table written to {}", dir.display()));
    Ok(match outcome.reasons.is_empty() {
        true => 0,
        false => EXIT_MISMATCH,
    })
}

/// Builds the backend of every run of `contract` that the gate forwards on `backend`, whose policy
/// `defect` applies to, with `defect` seeded, unless `backends` already holds one so built. Runs of other
/// backends stay clean, so the contract compares the defective backend with a sound one (a defect seeded
/// into both sides of `cuda vs cpu` would cancel out). Called by the gate before recording (the runs'
/// backends) and after (runs only the diagnosis would create).
pub(crate) fn seed_backends(
    backends: &mut HashMap<String, Box<dyn Forward>>,
    contract: &Contract,
    weights: &Arc<ModelWeights>,
    (defect, backend): (Defect, BackendKind),
) -> Result<(), GateError> {
    for run in contract.needed_runs() {
        let Some(spec) = contract.runs.get(&run) else { continue };
        if spec.backend != backend
            || !defect.applies_to(spec.backend, spec.policy)
            || backends.get(&run).is_some_and(|b| b.defect() == Some(defect))
        {
            continue;
        }
        let options = BackendOptions { policy: spec.policy, defect: Some(defect) };
        let backend = create_backend_with(spec.backend, Arc::clone(weights), options).map_err(|e| {
            GateError::engine(
                format!("building the {} backend of `{run}` with defect {defect}", spec.backend),
                e,
            )
        })?;
        backends.insert(run, backend);
    }
    Ok(())
}

/// `--backend`: `cpu` or `cuda` (the reference takes no defect).
fn selftest_backend(name: &str) -> Result<BackendKind, GateError> {
    match name.parse::<BackendKind>() {
        Ok(kind @ (BackendKind::Cpu | BackendKind::Cuda)) => Ok(kind),
        _ => Err(GateError::Usage(format!(
            "--backend {name}: the selftest seeds defects into `cpu` or `cuda` (the reference is the truth \
             and takes none)"
        ))),
    }
}

/// The catalogue's entries for `backend`, or those `names` picks (each must exist and apply to it).
pub fn select_defects(backend: BackendKind, names: &[String]) -> Result<Vec<Defect>, GateError> {
    let all: Vec<Defect> = Defect::for_backend(backend).collect();
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|name| {
            let d = name.parse::<Defect>().map_err(|e| GateError::Usage(format!("--defect: {e}")))?;
            match all.contains(&d) {
                true => Ok(d),
                false => Err(GateError::Usage(format!(
                    "--defect {name} is not a {backend} defect; the {backend} catalogue: {}",
                    all.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
                ))),
            }
        })
        .collect()
}

/// The gate's arguments for every run of the selftest: the contract and model (defaults per backend), no
/// report files of its own, CUDA required for the cuda defects (a selftest that skipped them would prove
/// nothing).
fn gate_args(args: &SelftestArgs, backend: BackendKind) -> GateArgs {
    let (contract, model) = match backend {
        BackendKind::Cuda => (DEFAULT_CUDA_CONTRACT, Some(DEFAULT_CUDA_MODEL)),
        _ => (DEFAULT_CPU_CONTRACT, None),
    };
    GateArgs {
        contract: Some(args.contract.clone().unwrap_or_else(|| contract.to_string())),
        model: args.model.clone().or_else(|| model.map(str::to_string)),
        require_cuda: backend == BackendKind::Cuda,
        report_dir: None,
        junit: None,
        allow_empty: false,
        partition: None,
        libtest: libtest_mimic::Arguments::default(),
    }
}

/// The policies of `contract`'s runs on `backend`; an error when it has none (nothing to seed).
fn backend_policies(contract: &Contract, backend: BackendKind) -> Result<Vec<Policy>, GateError> {
    let mut policies: Vec<Policy> =
        contract.runs.values().filter(|s| s.backend == backend).map(|s| s.policy).collect();
    policies.dedup();
    if policies.is_empty() {
        return Err(GateError::Usage(format!(
            "contract {} has no run on the {backend} backend, so no {backend} defect can show in it; pass \
             --contract with one that has (e.g. {} for cpu, {} for cuda)",
            contract.contract, DEFAULT_CPU_CONTRACT, DEFAULT_CUDA_CONTRACT
        )));
    }
    Ok(policies)
}

/// One gate run (quiet, the contract's smoke prompts) with `defect` seeded, and its wall time.
fn run_once(args: &GateArgs, defect: Option<(Defect, BackendKind)>) -> Result<(GateReport, f64), GateError> {
    let started = Instant::now();
    let mode = GateMode { defect, quiet: true, smoke_prompts: true };
    let report = run_gate_with(args, &mode)?
        .ok_or_else(|| GateError::Usage("the selftest's gate run listed instead of judging".into()))?;
    Ok((report, started.elapsed().as_secs_f64()))
}

fn note(msg: &str) {
    eprintln!("moe-gate selftest: {msg}");
}

/// What the diagnosis concluded, in the terms the catalogue expects.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DiagnosisVerdict {
    /// No diagnosis (nothing failed).
    None,
    /// A NaN or Inf located.
    NonFinite,
    /// A layer of `run` wrong on the reference's input.
    Defect { run: String },
    /// A certified-looking router near-tie: rounding decides (never right for a harmful defect).
    RouterTie,
    /// Accumulated error or rounding: the diagnosis blamed no backend.
    Accumulated,
}

impl DiagnosisVerdict {
    /// The verdict of diagnosis `d`, whose contract calls a layer defective above `isolated_nmse`.
    pub fn of(d: &Diagnosis, isolated_nmse: f64) -> Self {
        if d.non_finite.is_some() {
            return DiagnosisVerdict::NonFinite;
        }
        if let Some(i) = d.isolated.iter().find(|i| i.nmse > isolated_nmse || i.nmse.is_nan()) {
            return DiagnosisVerdict::Defect { run: i.run.clone() };
        }
        if d.summary.starts_with("router tie") {
            return DiagnosisVerdict::RouterTie;
        }
        // A diagnosis that names a defect by other evidence (a decode step, an op) names its run in
        // backquotes.
        if d.summary.contains("defect")
            && let Some(run) = d.compare.iter().find(|r| d.summary.contains(&format!("`{r}`")))
        {
            return DiagnosisVerdict::Defect { run: run.clone() };
        }
        DiagnosisVerdict::Accumulated
    }

    fn label(&self) -> String {
        match self {
            DiagnosisVerdict::None => "-".into(),
            DiagnosisVerdict::NonFinite => "non-finite".into(),
            DiagnosisVerdict::Defect { run } => format!("defect of `{run}`"),
            DiagnosisVerdict::RouterTie => "router tie".into(),
            DiagnosisVerdict::Accumulated => "accumulated / rounding".into(),
        }
    }
}

/// One check of a row against the catalogue.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `caught`, `backend`, `layer`, `step`, `op` or `passes`.
    pub what: &'static str,
    /// `Some(true)` matched, `Some(false)` contradicted, `None` not available yet (the diagnosis named
    /// no op or step): never counted as matched.
    pub matched: Option<bool>,
    /// What was expected and what was seen.
    pub detail: String,
}

/// One defect's run, judged against the catalogue.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub defect: String,
    pub description: String,
    /// `harmful: ...` or `benign: why`.
    pub expected: String,
    /// The gate's exit code on this defect.
    pub exit_code: u8,
    /// The blocking criteria that failed, `ID (tap metric)`.
    pub caught_by: Vec<String>,
    /// The first layer a diagnosis names, and the decode step.
    pub layer: Option<usize>,
    pub step: Option<usize>,
    pub diagnosis: DiagnosisVerdict,
    /// The largest isolated nmse (that layer on the reference's input, against the reference) of the
    /// diagnosis.
    pub isolated_nmse: Option<f64>,
    /// The diagnosis' summary sentence of that layer.
    pub summary: Option<String>,
    /// The op the diagnosis named.
    pub op: Option<String>,
    pub checks: Vec<Check>,
    /// Every check matched.
    pub matched: bool,
    pub seconds: f64,
}

impl Row {
    /// Judges the gate's `report` on `defect` (seeded in `backend`) against the catalogue.
    pub fn judge(
        defect: Defect,
        backend: BackendKind,
        contract: &Contract,
        report: &GateReport,
        seconds: f64,
    ) -> Row {
        let info = defect.info();
        let failing: Vec<&crate::report::CriterionReport> =
            report.criteria.iter().filter(|c| c.blocking && !c.gate_holds).collect();
        let first = first_diagnosis(&report.diagnoses);
        let bound = contract.ties.isolated_nmse;
        let diagnosis = first.map_or(DiagnosisVerdict::None, |d| DiagnosisVerdict::of(d, bound));
        let n_layer = report.model.n_layer;
        let checks = match info.expected {
            Expected::Benign { .. } => vec![Check {
                what: "passes",
                matched: Some(report.verdict.exit_code == 0),
                detail: format!("exit {} (want 0)", report.verdict.exit_code),
            }],
            Expected::Harmful(harm) => {
                let seen = Seen { failing: &failing, diagnosis: &diagnosis, first, contract, n_layer };
                seen.checks(&harm, backend)
            }
        };
        let matched = checks.iter().all(|c| c.matched == Some(true));
        Row {
            defect: info.name.to_string(),
            description: info.description.to_string(),
            expected: expectation(&info.expected, n_layer),
            exit_code: report.verdict.exit_code,
            caught_by: failing.iter().map(|c| format!("{} ({} {})", c.id, c.tap, c.metric)).collect(),
            layer: first.and_then(|d| d.first_divergent_layer),
            step: first.and_then(|d| d.step),
            diagnosis,
            isolated_nmse: first.and_then(|d| d.isolated.iter().map(|i| i.nmse).reduce(f64::max)),
            summary: first.map(|d| d.summary.clone()),
            op: first.and_then(|d| d.op).map(|op| op.as_str().to_string()),
            checks,
            matched,
            seconds,
        }
    }
}

/// The diagnosis a row reports: the one naming the lowest layer (a defect verdict first among equals,
/// then plan order); without any layer, the first one.
fn first_diagnosis(diagnoses: &[Diagnosis]) -> Option<&Diagnosis> {
    let with_layer = diagnoses.iter().filter(|d| d.first_divergent_layer.is_some());
    let lowest = with_layer.min_by_key(|d| (d.first_divergent_layer, d.isolated.is_empty()));
    lowest.or(diagnoses.first())
}

/// What a harmful row saw.
struct Seen<'a> {
    failing: &'a [&'a crate::report::CriterionReport],
    diagnosis: &'a DiagnosisVerdict,
    first: Option<&'a Diagnosis>,
    contract: &'a Contract,
    n_layer: usize,
}

impl Seen<'_> {
    fn checks(&self, harm: &Harm, backend: BackendKind) -> Vec<Check> {
        let mut checks = vec![self.caught(harm), self.blamed(backend), self.layer(harm)];
        if let Some(step) = harm.step {
            let seen = self.first.and_then(|d| d.step);
            checks.push(Check {
                what: "step",
                matched: seen.map(|s| s == step),
                detail: format!("{} (want {step})", seen.map_or("-".into(), |s| s.to_string())),
            });
        }
        let op = self.first.and_then(|d| d.op).map(|op| op.as_str());
        checks.push(Check {
            what: "op",
            matched: op.map(|o| o == harm.op.as_str()),
            detail: format!("{} (want {})", op.unwrap_or("- (not named)"), harm.op),
        });
        checks
    }

    /// A blocking criterion of every expected tap failed.
    fn caught(&self, harm: &Harm) -> Check {
        let missing: Vec<&str> = harm
            .caught_by
            .iter()
            .copied()
            .filter(|tap| !self.failing.iter().any(|c| c.tap == *tap))
            .collect();
        Check {
            what: "caught",
            matched: Some(!self.failing.is_empty() && missing.is_empty()),
            detail: match (self.failing.is_empty(), missing.is_empty()) {
                (true, _) => "every blocking gate holds".into(),
                (false, true) => format!("a blocking {} criterion failed", harm.caught_by.join(" and ")),
                (false, false) => format!("no blocking criterion on {} failed", missing.join(", ")),
            },
        }
    }

    /// The diagnosis blamed a run of the defect's backend.
    fn blamed(&self, backend: BackendKind) -> Check {
        let run_backend = |run: &str| self.contract.runs.get(run).map(|s| s.backend);
        let (matched, detail) = match self.diagnosis {
            DiagnosisVerdict::Defect { run } => {
                (run_backend(run) == Some(backend), format!("defect of `{run}` (want a {backend} run)"))
            }
            other => (false, format!("{} (want a defect of a {backend} run)", other.label())),
        };
        Check { what: "backend", matched: Some(matched), detail }
    }

    /// The diagnosis named the defect's first layer.
    fn layer(&self, harm: &Harm) -> Check {
        let want = harm.layer.first(self.n_layer);
        let seen = self.first.and_then(|d| d.first_divergent_layer);
        Check {
            what: "layer",
            matched: Some(seen == Some(want)),
            detail: format!("{} (want {want})", seen.map_or("-".into(), |l| l.to_string())),
        }
    }
}

/// The catalogue's expectation in a few words, with the layer resolved on a model of `n_layer` layers.
fn expectation(expected: &Expected, n_layer: usize) -> String {
    match expected {
        Expected::Benign { .. } => "benign: passes".into(),
        Expected::Harmful(h) => {
            let step = h.step.map_or(String::new(), |s| format!(" step {s}"));
            format!("{}, L{}{step}, {}", h.caught_by.join("+"), h.layer.first(n_layer), h.op)
        }
    }
}

/// The clean run.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub exit_code: u8,
    pub seconds: f64,
}

/// The whole selftest: what `selftest.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub contract: String,
    pub model: String,
    pub backend: String,
    pub baseline: Baseline,
    /// Catalogue entries of the backend that apply to none of the contract's runs' policies.
    pub not_run: Vec<String>,
    pub rows: Vec<Row>,
    pub total_s: f64,
    /// Why the selftest fails (empty when it passes).
    pub reasons: Vec<String>,
}

impl Outcome {
    fn with_reasons(mut self) -> Self {
        if self.baseline.exit_code != 0 {
            self.reasons.push(format!(
                "the clean baseline fails (exit {}): the contract does not hold without a defect, so no \
                 defect can be judged; run the gate on it and fix that first",
                self.baseline.exit_code
            ));
        }
        for row in self.rows.iter().filter(|r| !r.matched) {
            let unmatched: Vec<String> = row
                .checks
                .iter()
                .filter(|c| c.matched != Some(true))
                .map(|c| match c.matched {
                    None => format!("{} not named yet: {}", c.what, c.detail),
                    _ => format!("{}: {}", c.what, c.detail),
                })
                .collect();
            self.reasons.push(format!("{}: {}", row.defect, unmatched.join("; ")));
        }
        self
    }

    /// The table (markdown, also what the terminal shows) and the verdict.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "selftest of the {} defects: contract {}, model {}; clean baseline exit {} ({:.1} s)\n",
            self.backend, self.contract, self.model, self.baseline.exit_code, self.baseline.seconds
        );
        s.push_str("| defect | expected | caught by | layer (step) | diagnosis | op | matched |\n");
        s.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
        for r in &self.rows {
            let caught = match r.caught_by.is_empty() {
                true => "- (passes)".to_string(),
                false => r.caught_by.join(", "),
            };
            let layer = match (r.layer, r.step) {
                (Some(l), Some(s)) => format!("{l} (step {s})"),
                (Some(l), None) => l.to_string(),
                (None, Some(s)) => format!("- (step {s})"),
                (None, None) => "-".to_string(),
            };
            let matched = match r.matched {
                true => "yes".to_string(),
                false => {
                    let bad: Vec<String> = r
                        .checks
                        .iter()
                        .filter(|c| c.matched != Some(true))
                        .map(|c| match c.matched {
                            None => format!("{} pending", c.what),
                            _ => format!("{} no", c.what),
                        })
                        .collect();
                    format!("NO ({})", bad.join(", "))
                }
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.defect,
                r.expected,
                caught,
                layer,
                match r.isolated_nmse {
                    Some(nmse) => format!("{} (isolated nmse {nmse:.1e})", r.diagnosis.label()),
                    None => r.diagnosis.label(),
                },
                r.op.as_deref().unwrap_or("-"),
                matched
            );
        }
        if !self.not_run.is_empty() {
            let _ = writeln!(
                s,
                "\nnot run (no run of this contract has a policy they apply to): {}",
                self.not_run.join(", ")
            );
        }
        let matched = self.rows.iter().filter(|r| r.matched).count();
        let _ = writeln!(
            s,
            "\n{matched}/{} rows match the catalogue; {:.1} s in all",
            self.rows.len(),
            self.total_s
        );
        match self.reasons.is_empty() {
            true => s.push_str(
                "selftest: PASSED: every harmful defect caught and located, every benign change passes\n",
            ),
            false => {
                s.push_str("selftest: FAILED:\n");
                for reason in &self.reasons {
                    let _ = writeln!(s, "  {reason}");
                }
            }
        }
        s
    }

    /// Writes `selftest.md` and `selftest.json` into `dir` (created if missing).
    fn write(&self, dir: &std::path::Path) -> Result<(), GateError> {
        std::fs::create_dir_all(dir).map_err(|e| GateError::write(dir, e))?;
        let md = dir.join("selftest.md");
        std::fs::write(&md, self.markdown()).map_err(|e| GateError::write(&md, e))?;
        let json = dir.join("selftest.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| GateError::write(&json, e))?;
        std::fs::write(&json, text).map_err(|e| GateError::write(&json, e))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const CONTRACT: &str = "\
contract: seed-v1
version: 1.0.0
status: active
title: seeding
model: m.gguf
smoke_model: m.gguf
prompts:
  - {id: p, tokens: [1, 2]}
runs:
  cpu: {backend: cpu}
  cpu_exact: {backend: cpu, policy: exact}
  gpu: {backend: cuda}
  reference: {backend: reference}
criteria:
  - {id: A, title: a, compare: [gpu, cpu], tap: hidden, metric: cosine, per: [prompt, layer],
     threshold: {min: 0.9999}, gate: all}
  - {id: B, title: b, compare: [cpu_exact, reference], tap: hidden, metric: cosine, per: [prompt, layer],
     threshold: {min: 0.9999}, gate: all}
amendments:
  - {version: 1.0.0, date: 2026-12-03, kind: created, summary: test}
";

    /// A defect seeded into one backend reaches every run of that backend and no other: seeded into both
    /// sides of `gpu vs cpu` it would cancel out and the contract would pass on a broken kernel (the
    /// selftest on the CUDA contracts once did exactly that). Seeding `cpu` must not even build the
    /// `cuda` run's backend (there is no GPU here, so trying would fail).
    #[test]
    fn a_defect_is_seeded_into_its_own_backend_s_runs_only() {
        let contract = moe_contracts::parse(CONTRACT, Path::new("seed-v1.yaml")).unwrap();
        let weights = crate::model::resolve_model("../tests/fixtures/public-tiny/model.gguf").unwrap();
        let mut backends = HashMap::new();
        let seeded = (Defect::RopeWrongBase, BackendKind::Cpu);
        seed_backends(&mut backends, &contract, &weights, seeded).unwrap();
        let mut runs: Vec<(&str, Option<Defect>)> =
            backends.iter().map(|(run, b)| (run.as_str(), b.defect())).collect();
        runs.sort_by_key(|r| r.0);
        assert_eq!(runs, [("cpu", Some(Defect::RopeWrongBase)), ("cpu_exact", Some(Defect::RopeWrongBase))]);
    }
}
