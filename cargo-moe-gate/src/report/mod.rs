//! Reports of a gate run (docs/gate.md): one [`GateReport`] value holds everything, and each writer renders it:
//! the terminal summary ([`terminal`]), `report.json` (this module, schema [`SCHEMA_VERSION`]), `report.md`
//! ([`markdown`]), `layers.svg` ([`svg`]) and JUnit XML ([`junit`]).

pub mod incomplete;
pub mod junit;
pub mod markdown;
pub mod svg;
pub mod table;
pub mod terminal;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::GateError;

/// Version of the `report.json` schema. Bump it when a field changes meaning or is removed; adding a
/// field keeps the version.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything a gate run found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateReport {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// `cargo-moe-gate X.Y.Z`.
    pub tool: String,
    /// The contract judged.
    pub contract: ContractInfo,
    /// The model run, and why it was chosen.
    pub model: ModelInfo,
    /// The shard this report covers (`--partition K/N`); `None` for the whole contract.
    #[serde(default)]
    pub partition: Option<PartitionInfo>,
    /// The shards a merged report was joined from (`cargo moe-gate merge`), by index; empty otherwise.
    #[serde(default)]
    pub shards: Vec<ShardSummary>,
    /// Whether CUDA was usable, and why not.
    pub cuda: CudaInfo,
    /// Wall time of each phase.
    pub timings: Timings,
    /// One entry per criterion, in contract order.
    pub criteria: Vec<CriterionReport>,
    /// One entry per planned trial, in plan order.
    pub trials: Vec<TrialReport>,
    /// Per-layer worst values of the per-layer criteria.
    pub layers: Vec<LayerTable>,
    /// The next token of every prompt, per run.
    pub argmax: Vec<ArgmaxRow>,
    /// The greedy decode of every prompt that a greedy criterion ran, per run, with its text.
    #[serde(default)]
    pub greedy: Vec<GreedyRow>,
    /// One diagnosis per (criterion, prompt) with an unexpected failure.
    pub diagnoses: Vec<Diagnosis>,
    /// Every first routing difference that explains a failure, certified as a tie or not.
    #[serde(default)]
    pub ties: Vec<crate::ties::TieReport>,
    /// The gate's decision.
    pub verdict: Verdict,
}

/// The contract judged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContractInfo {
    pub id: String,
    pub version: String,
    pub title: String,
    pub status: String,
    pub path: String,
}

/// The shard of a partitioned run (`--partition K/N`, docs/gate.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    /// K, from 1.
    pub index: usize,
    /// N.
    pub count: usize,
    /// The ids of this shard's prompts, in contract order.
    pub prompts: Vec<String>,
    /// How many prompts the contract has for this model, over all shards.
    pub total_prompts: usize,
}

impl std::fmt::Display for PartitionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "partition {}/{}: {} of {} prompts",
            self.index,
            self.count,
            self.prompts.len(),
            self.total_prompts
        )
    }
}

/// One shard of a merged report, as its own report said.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardSummary {
    /// The shard's partition.
    pub partition: PartitionInfo,
    /// The shard's report.json, as given to `merge`.
    pub report: String,
    /// The shard's own verdict (0 or 101): about its prompts only.
    pub exit_code: u8,
    /// The shard's own verdict line.
    pub line: String,
    /// The shard's timings.
    pub timings: Timings,
}

/// The model run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The spec loaded.
    pub spec: String,
    /// `--model`, `model` or `smoke_model`.
    pub source: String,
    /// Why that one (e.g. "no usable CUDA device: ...").
    pub reason: String,
    /// Decoder layers of the model.
    pub n_layer: usize,
}

/// Whether CUDA trials could run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CudaInfo {
    /// Whether any run of the contract needs CUDA.
    pub needed: bool,
    /// Whether a CUDA backend could be created.
    pub available: bool,
    /// Why not, when not.
    pub reason: Option<String>,
}

/// Wall time of each phase, in seconds. In a merged report each is the sum over the shards (machine
/// time, not the wall time of the CI matrix), and [`GateReport::shards`] keeps each shard's own.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Loading or synthesising the model.
    pub model_s: f64,
    /// Each run's forwards (all its prompts, including greedy steps).
    pub runs: Vec<RunTiming>,
    /// Evaluating every trial from the recorded traces.
    pub evaluation_s: f64,
    /// Isolated layers, tie references and tie certification.
    #[serde(default)]
    pub ties_s: f64,
    /// Diagnosing the failures (isolated layers, extra reference forwards).
    pub diagnosis_s: f64,
    /// The whole run.
    pub total_s: f64,
}

/// Wall time of one run's forwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunTiming {
    pub run: String,
    pub backend: String,
    pub policy: String,
    /// Prompts forwarded.
    pub prompts: usize,
    /// Prompt tokens forwarded.
    pub tokens: usize,
    /// Greedy decode steps taken.
    pub greedy_steps: usize,
    pub seconds: f64,
}

/// Which way a metric gets worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Worse {
    /// Smaller is worse (cosine, agreement rates): the threshold is a minimum.
    Lower,
    /// Larger is worse (nmse, max_abs, kld, mismatch counts): the threshold is a maximum.
    Higher,
}

impl Worse {
    /// Whether `new` is worse than `old` (a NaN is worst of all).
    pub fn is_worse(self, new: f64, old: f64) -> bool {
        match (new.is_nan(), old.is_nan()) {
            (_, true) => false,
            (true, false) => true,
            (false, false) => match self {
                Worse::Lower => new < old,
                Worse::Higher => new > old,
            },
        }
    }

    /// The worse of two values (a NaN is worst of all).
    pub fn worst(self, a: f64, b: f64) -> f64 {
        if self.is_worse(b, a) { b } else { a }
    }
}

/// One criterion's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CriterionReport {
    pub id: String,
    pub title: String,
    /// `candidate vs baseline`.
    pub compare: [String; 2],
    pub tap: String,
    pub metric: String,
    /// `all`, `N/M` or `fraction F`.
    pub gate: String,
    /// `min 0.9999`, `max 1e-3`, or empty.
    pub threshold: String,
    pub worse: Worse,
    pub blocking: bool,
    /// Trials that passed (expected failures do not count as passes).
    pub passed: usize,
    /// Trials judged (ignored and filtered-out trials excluded).
    pub total: usize,
    /// Trials listed as ignored.
    pub ignored: usize,
    /// Failures recorded as known divergences.
    pub expected_failures: usize,
    /// Failures excused as the cascade of a certified router tie.
    #[serde(default)]
    pub tie_excused: usize,
    /// Strict known divergences that passed: they fail the gate.
    pub unexpected_passes: Vec<String>,
    pub gate_holds: bool,
}

/// The fate of one trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum TrialStatus {
    Passed,
    Failed,
    /// Failed, as a known divergence of the contract says it does.
    ExpectedFailure,
    /// A strict known divergence that passed: the contract is out of date.
    UnexpectedPass,
    /// Failed downstream of a certified router tie (the reason names it), under `ties.policy: excuse`:
    /// counts nowhere, like an expected failure, but nobody had to write it into the contract.
    TieExcused(String),
    /// Listed as ignored (e.g. no CUDA), with the reason.
    Ignored(String),
    /// Not selected by the name filters.
    FilteredOut,
}

impl TrialStatus {
    /// Whether the trial counts against its criterion.
    pub fn is_failure(&self) -> bool {
        matches!(self, TrialStatus::Failed | TrialStatus::UnexpectedPass)
    }

    /// A short word for tables.
    pub fn word(&self) -> &'static str {
        match self {
            TrialStatus::Passed => "ok",
            TrialStatus::Failed => "FAILED",
            TrialStatus::ExpectedFailure => "expected failure",
            TrialStatus::UnexpectedPass => "UNEXPECTED PASS",
            TrialStatus::TieExcused(_) => "tie cascade",
            TrialStatus::Ignored(_) => "ignored",
            TrialStatus::FilteredOut => "filtered out",
        }
    }
}

/// One trial's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialReport {
    /// `CONTRACT::CRITERION::PROMPT[::layerNN|::posNN]`.
    pub name: String,
    pub criterion: String,
    pub prompt: String,
    pub layer: Option<usize>,
    pub position: Option<usize>,
    #[serde(flatten)]
    pub status: TrialStatus,
    /// The metric value (None when not evaluated).
    pub value: Option<f64>,
    /// The evaluation's message.
    pub detail: String,
    /// Where the first NaN/Inf is, if the trial read one.
    pub non_finite: Option<String>,
    /// The known divergence that covers this trial (its status and note).
    pub known_divergence: Option<String>,
}

/// Worst value per layer of one per-layer criterion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerTable {
    pub criterion: String,
    pub metric: String,
    pub worse: Worse,
    /// The threshold the values are held to (`min` for [`Worse::Lower`], `max` for [`Worse::Higher`]).
    pub threshold: Option<f64>,
    pub rows: Vec<LayerRow>,
}

/// One layer of a [`LayerTable`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRow {
    pub layer: usize,
    /// The worst value over prompts.
    #[serde(deserialize_with = "finite_or_nan")]
    pub worst: f64,
    /// The prompt that gave it.
    pub worst_prompt: String,
    /// Whether any trial of this layer failed unexpectedly.
    pub failed: bool,
    /// Every prompt's value.
    #[serde(deserialize_with = "finite_or_nan_map")]
    pub values: BTreeMap<String, f64>,
}

/// The next token of one prompt according to each run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArgmaxRow {
    pub prompt: String,
    pub runs: Vec<RunToken>,
    /// Whether every run chose the same token.
    pub agree: bool,
}

/// One run's choice of next token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunToken {
    pub run: String,
    pub token: u32,
    /// The token's text in the model's tokenizer (`None` where the model has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(deserialize_with = "finite_or_nan")]
    pub logit: f64,
    /// Distance to the runner-up logit: a small margin makes a flip benign.
    #[serde(deserialize_with = "finite_or_nan")]
    pub margin: f64,
}

/// The greedy decodes of one prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GreedyRow {
    pub prompt: String,
    /// The prompt's text: as written for a text prompt, else its tokens decoded (`None` without a
    /// tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_text: Option<String>,
    pub runs: Vec<GreedyRun>,
    /// Whether every run decoded the same tokens.
    pub agree: bool,
}

/// One run's greedy decode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GreedyRun {
    pub run: String,
    pub tokens: Vec<u32>,
    /// The tokens' text in the model's tokenizer (`None` where the model has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// What the gate found out about one failing (criterion, prompt).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Diagnosis {
    pub criterion: String,
    pub prompt: String,
    /// `[candidate, baseline]`.
    pub compare: [String; 2],
    /// The run taken as the truth (None when the contract has none).
    pub reference: Option<String>,
    /// Unexpectedly failing trials of this (criterion, prompt).
    pub failing_trials: Vec<String>,
    /// Where the first NaN/Inf appeared, if any.
    pub non_finite: Option<String>,
    /// The first layer where the criterion fails (layer taps) or where the two runs route differently
    /// (logit taps).
    pub first_divergent_layer: Option<usize>,
    /// The criterion's value there (end to end: each run fed its own previous layer).
    pub end_to_end: Option<f64>,
    /// The same layer run alone on the reference's input, compared to the reference's output.
    pub isolated: Vec<IsolatedError>,
    /// The reference router's smallest margin at the top-k boundary in that layer.
    pub router_margin: Option<RouterMargin>,
    /// Each compared run's distance to the reference (nmse) at that layer, or on the logits.
    pub distance_to_reference: Vec<RunDistance>,
    /// The run closer to the reference.
    pub closer: Option<String>,
    /// One sentence that puts it together.
    pub summary: String,
    /// Parts of the diagnosis that could not be computed, and why.
    pub notes: Vec<String>,
    /// The first op of the defective layer that differs (issue 10 item 3's vocabulary: `attn_norm`,
    /// `qkv_proj`, ... `kv_cache`), where the op-level bisection named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// The first decode step that differs (1 = the first step after the prefill), for a divergence that
    /// starts in the decode path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
}

/// The isolated error of one run at one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IsolatedError {
    pub run: String,
    pub layer: usize,
    /// nmse of the layer's output against the reference's output.
    #[serde(deserialize_with = "finite_or_nan")]
    pub nmse: f64,
    /// cosine of the same.
    #[serde(deserialize_with = "finite_or_nan")]
    pub cosine: f64,
}

/// `p_k - p_(k+1)` of the reference router softmax: how clearly the top-k boundary is separated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouterMargin {
    pub layer: usize,
    /// The position with the smallest margin.
    pub position: usize,
    #[serde(deserialize_with = "finite_or_nan")]
    pub margin: f64,
    pub k: usize,
}

/// A run's distance to the reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunDistance {
    pub run: String,
    /// `hidden.L` or `logits`.
    pub at: String,
    #[serde(deserialize_with = "finite_or_nan")]
    pub nmse: f64,
}

/// The gate's decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// 0: every blocking gate holds; 101: a blocking gate failed.
    pub exit_code: u8,
    /// Blocking criteria whose gate failed.
    pub blocking_failed: Vec<String>,
    /// Non-blocking criteria whose gate failed.
    pub advisory_failed: Vec<String>,
    /// Trials listed as ignored.
    pub ignored: usize,
    /// One line for humans.
    pub line: String,
    /// The known divergences that are not strict, described: a trial they mask could start passing, or
    /// fail for another reason, and the verdict would not change. Shown above the verdict line.
    #[serde(default)]
    pub lenient: Vec<String>,
    /// Why the run ended before judging everything (a signal, a device fault), when it did: the report
    /// then holds what was judged so far and is not a verdict (`merge` refuses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
}

impl GateReport {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report holds only serialisable values")
    }

    /// Reads a `report.json` back (what `merge` does with the shards' reports). JSON has no NaN or
    /// infinity: serde_json writes them as `null`, and they read back as NaN.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Writes report.json, report.md, layers.svg and junit.xml into `dir` (created if missing).
    pub fn write_dir(&self, dir: &Path) -> Result<(), GateError> {
        std::fs::create_dir_all(dir).map_err(|e| GateError::write(dir, e))?;
        write_file(&dir.join("report.json"), &self.to_json())?;
        write_file(&dir.join("report.md"), &markdown::render(self))?;
        write_file(&dir.join("layers.svg"), &svg::render(self)?)?;
        write_file(&dir.join("junit.xml"), &junit::render(self))
    }

    /// Why the run judged nothing that could fail the build, when it judged nothing: no trial of a
    /// blocking criterion was evaluated (every one filtered out by a name filter, ignored for lack of
    /// CUDA, or the contract selects none). Such a run proves nothing, so the gate refuses to pass it
    /// unless `--allow-empty` says it is deliberate.
    pub fn nothing_judged(&self) -> Option<String> {
        let blocking: Vec<&str> =
            self.criteria.iter().filter(|c| c.blocking).map(|c| c.id.as_str()).collect();
        let evaluated = |t: &&TrialReport| {
            blocking.contains(&t.criterion.as_str())
                && !matches!(t.status, TrialStatus::Ignored(_) | TrialStatus::FilteredOut)
        };
        if self.trials.iter().any(|t| evaluated(&t)) {
            return None;
        }
        let count = |f: fn(&TrialStatus) -> bool| self.trials.iter().filter(|t| f(&t.status)).count();
        let filtered = count(|s| *s == TrialStatus::FilteredOut);
        let ignored = count(|s| matches!(s, TrialStatus::Ignored(_)));
        Some(format!(
            "no trial of a blocking criterion was judged ({} planned: {filtered} filtered out by the name \
             filters, {ignored} ignored), so nothing was checked",
            self.trials.len()
        ))
    }

    /// Unless `allow_empty`, turns the verdict of a run that judged nothing ([`Self::nothing_judged`])
    /// into "not judged" (exit 2), and returns why.
    pub fn refuse_if_empty(&mut self, allow_empty: bool) -> Option<String> {
        let reason = self.nothing_judged().filter(|_| !allow_empty)?;
        self.verdict.exit_code = crate::EXIT_UNJUDGED;
        self.verdict.line = format!("NOT JUDGED: {reason}; it proves nothing (--allow-empty passes it)");
        Some(reason)
    }

    /// Writes the JUnit XML report to `path`.
    pub fn write_junit(&self, path: &Path) -> Result<(), GateError> {
        write_file(path, &junit::render(self))
    }
}

/// Reads a metric value written by [`GateReport::to_json`], where a non-finite value became `null`.
fn finite_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// [`finite_or_nan`] for every value of a map.
fn finite_or_nan_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let map = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
}

/// Writes one report file atomically (a temporary file renamed into place), so an interrupted run never
/// leaves a half report.json that `merge` would read as whole.
fn write_file(path: &Path, contents: &str) -> Result<(), GateError> {
    moe_engine::trace::write_atomically(path, contents.as_bytes()).map_err(|e| GateError::write(path, e))
}

/// Formats a metric value for humans: cosines with enough digits to see how far from 1 they are,
/// everything else in 4 significant digits.
pub fn fmt_value(metric: &str, v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    match metric {
        // Near 1, the digits that matter are in 1 - cosine.
        "cosine" if v == 1.0 => "1".into(),
        "cosine" if (1.0 - v).abs() < 1e-6 => format!("1 - {:.2e}", 1.0 - v),
        "cosine" => format!("{v:.9}"),
        "argmax" | "topk_set" | "bitwise" | "greedy" => {
            if v.fract() == 0.0 && v.abs() < 1e15 {
                format!("{v:.0}")
            } else {
                format!("{v:.4}")
            }
        }
        _ if v == 0.0 => "0".into(),
        _ if (1e-3..1e4).contains(&v.abs()) => format!("{v:.4}"),
        _ => format!("{v:.3e}"),
    }
}

#[cfg(test)]
pub(crate) mod sample {
    //! A hand-built report used by the writers' tests.
    use super::*;

    /// [`report`] as the shard `partition 2/3` of a run over prompts `p_0`, `p_a`, `p_b`, `p_c`, `p_d`.
    pub fn shard() -> GateReport {
        let mut r = report();
        r.partition = Some(PartitionInfo {
            index: 2,
            count: 3,
            prompts: vec!["p_a".into(), "p_d".into()],
            total_prompts: 5,
        });
        r
    }

    /// [`report`] as the merge of two shards.
    pub fn merged() -> GateReport {
        let mut r = report();
        r.shards = (1..=2)
            .map(|index| ShardSummary {
                partition: PartitionInfo {
                    index,
                    count: 2,
                    prompts: vec![if index == 1 { "p_a" } else { "p_b" }.into()],
                    total_prompts: 2,
                },
                report: format!("shard-{index}/report.json"),
                exit_code: if index == 1 { 0 } else { 101 },
                line: format!("shard {index}'s line"),
                timings: Timings { total_s: 0.5, ..Timings::default() },
            })
            .collect();
        r
    }

    /// A report of a 2-layer model where layer 1 of prompt `p_b` fails the cosine criterion.
    pub fn report() -> GateReport {
        let trial = |criterion: &str, prompt: &str, layer: Option<usize>, value: f64, status: TrialStatus| {
            TrialReport {
                name: match layer {
                    Some(l) => format!("c-v1::{criterion}::{prompt}::layer{l:02}"),
                    None => format!("c-v1::{criterion}::{prompt}"),
                },
                criterion: criterion.into(),
                prompt: prompt.into(),
                layer,
                position: None,
                status,
                value: Some(value),
                detail: format!("cosine {value}"),
                non_finite: None,
                known_divergence: None,
            }
        };
        let mut values_0 = BTreeMap::new();
        values_0.insert("p_a".to_string(), 0.999999);
        values_0.insert("p_b".to_string(), 0.99999);
        let mut values_1 = BTreeMap::new();
        values_1.insert("p_a".to_string(), 0.99998);
        values_1.insert("p_b".to_string(), 0.95);
        GateReport {
            schema_version: SCHEMA_VERSION,
            tool: "cargo-moe-gate 0.1.0".into(),
            contract: ContractInfo {
                id: "c-v1".into(),
                version: "1.0.0".into(),
                title: "cpu agrees with the <reference> & more".into(),
                status: "active".into(),
                path: "contracts/c-v1.yaml".into(),
            },
            model: ModelInfo {
                spec: "synth:tiny".into(),
                source: "smoke_model".into(),
                reason: "no usable CUDA device: built without the `cuda` feature".into(),
                n_layer: 2,
            },
            partition: None,
            shards: vec![],
            cuda: CudaInfo {
                needed: true,
                available: false,
                reason: Some("built without the `cuda` feature".into()),
            },
            timings: Timings {
                model_s: 0.5,
                runs: vec![RunTiming {
                    run: "cpu".into(),
                    backend: "cpu".into(),
                    policy: "fast".into(),
                    prompts: 2,
                    tokens: 5,
                    greedy_steps: 0,
                    seconds: 0.25,
                }],
                evaluation_s: 0.01,
                ties_s: 0.0,
                diagnosis_s: 0.02,
                total_s: 0.9,
            },
            criteria: vec![CriterionReport {
                id: "HID".into(),
                title: "hidden states agree".into(),
                compare: ["cpu".into(), "reference".into()],
                tap: "hidden".into(),
                metric: "cosine".into(),
                gate: "all".into(),
                threshold: "min 0.9999".into(),
                worse: Worse::Lower,
                blocking: true,
                passed: 3,
                total: 4,
                ignored: 0,
                expected_failures: 0,
                tie_excused: 0,
                unexpected_passes: vec![],
                gate_holds: false,
            }],
            trials: vec![
                trial("HID", "p_a", Some(0), 0.999999, TrialStatus::Passed),
                trial("HID", "p_a", Some(1), 0.99998, TrialStatus::Passed),
                trial("HID", "p_b", Some(0), 0.99999, TrialStatus::Passed),
                trial("HID", "p_b", Some(1), 0.95, TrialStatus::Failed),
                trial("GPU", "p_a", None, 1.0, TrialStatus::Ignored("CUDA unavailable".into())),
            ],
            layers: vec![LayerTable {
                criterion: "HID".into(),
                metric: "cosine".into(),
                worse: Worse::Lower,
                threshold: Some(0.9999),
                rows: vec![
                    LayerRow {
                        layer: 0,
                        worst: 0.99999,
                        worst_prompt: "p_b".into(),
                        failed: false,
                        values: values_0,
                    },
                    LayerRow {
                        layer: 1,
                        worst: 0.95,
                        worst_prompt: "p_b".into(),
                        failed: true,
                        values: values_1,
                    },
                ],
            }],
            argmax: vec![ArgmaxRow {
                prompt: "p_a".into(),
                runs: vec![
                    RunToken {
                        run: "cpu".into(),
                        token: 17,
                        text: Some("2".into()),
                        logit: 3.25,
                        margin: 0.5,
                    },
                    RunToken {
                        run: "reference".into(),
                        token: 17,
                        text: Some("2".into()),
                        logit: 3.2500001,
                        margin: 0.5,
                    },
                ],
                agree: true,
            }],
            greedy: vec![GreedyRow {
                prompt: "p_a".into(),
                prompt_text: Some("1+1=".into()),
                runs: vec![
                    GreedyRun { run: "cpu".into(), tokens: vec![17, 198], text: Some("2\n".into()) },
                    GreedyRun { run: "reference".into(), tokens: vec![17, 198], text: Some("2\n".into()) },
                ],
                agree: true,
            }],
            diagnoses: vec![Diagnosis {
                criterion: "HID".into(),
                prompt: "p_b".into(),
                compare: ["cpu".into(), "reference".into()],
                reference: Some("reference".into()),
                failing_trials: vec!["c-v1::HID::p_b::layer01".into()],
                non_finite: None,
                first_divergent_layer: Some(1),
                end_to_end: Some(0.95),
                isolated: vec![IsolatedError { run: "cpu".into(), layer: 1, nmse: 0.08, cosine: 0.96 }],
                router_margin: Some(RouterMargin { layer: 1, position: 2, margin: 0.2, k: 2 }),
                distance_to_reference: vec![RunDistance {
                    run: "cpu".into(),
                    at: "hidden.1".into(),
                    nmse: 0.09,
                }],
                closer: None,
                summary: "layer 1 itself diverges".into(),
                notes: vec!["isolated layer unavailable: the backend has no run_layer".into()],
                op: None,
                step: None,
            }],
            ties: vec![],
            verdict: Verdict {
                exit_code: 101,
                blocking_failed: vec!["HID".into()],
                advisory_failed: vec![],
                ignored: 1,
                line: "FAILED: blocking gate HID does not hold".into(),
                lenient: vec![],
                incomplete: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_report_carries_schema_version_and_statuses() {
        let report = sample::report();
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["trials"][3]["status"], "failed");
        assert_eq!(v["trials"][4]["status"], "ignored");
        assert_eq!(v["trials"][4]["reason"], "CUDA unavailable");
        assert_eq!(v["layers"][0]["rows"][1]["worst"], 0.95);
        assert_eq!(v["verdict"]["exit_code"], 101);
    }

    #[test]
    fn json_reads_back_with_non_finite_values_as_nan() {
        let mut report = sample::shard();
        report.trials[3].value = Some(f64::NAN);
        report.layers[0].rows[1].worst = f64::INFINITY;
        report.argmax[0].runs[0].margin = f64::NAN;
        let json = report.to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["partition"]["index"], 2);
        assert_eq!(v["partition"]["prompts"], serde_json::json!(["p_a", "p_d"]));
        assert_eq!(v["trials"][3]["value"], serde_json::Value::Null);
        let back = GateReport::from_json(&json).unwrap();
        assert_eq!(back.partition, report.partition);
        assert_eq!(back.trials[3].value, None, "a NaN value reads back as not evaluated");
        assert_eq!(back.trials[3].status, TrialStatus::Failed);
        assert_eq!(back.trials[4].status, TrialStatus::Ignored("CUDA unavailable".into()));
        assert!(back.layers[0].rows[1].worst.is_nan() && back.argmax[0].runs[0].margin.is_nan());
        assert_eq!(back.layers[0].rows[0].values["p_b"], 0.99999);
        assert_eq!(back.to_json(), GateReport::from_json(&back.to_json()).unwrap().to_json());
        let unpartitioned = sample::report().to_json();
        assert!(unpartitioned.contains("\"partition\": null"), "{unpartitioned}");
    }

    #[test]
    fn write_dir_writes_four_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/report");
        sample::report().write_dir(&out).unwrap();
        for f in ["report.json", "report.md", "layers.svg", "junit.xml"] {
            let len = std::fs::metadata(out.join(f)).unwrap().len();
            assert!(len > 100, "{f} has {len} bytes");
        }
    }

    #[test]
    fn worst_respects_direction_and_nan() {
        assert_eq!(Worse::Lower.worst(0.9, 0.8), 0.8);
        assert_eq!(Worse::Higher.worst(0.9, 0.8), 0.9);
        assert!(Worse::Higher.worst(f64::NAN, 0.8).is_nan());
        assert!(Worse::Lower.worst(0.8, f64::NAN).is_nan());
        assert!(Worse::Lower.is_worse(0.5, 0.9) && !Worse::Higher.is_worse(0.5, 0.9));
    }

    #[test]
    fn values_are_formatted_per_metric() {
        assert_eq!(fmt_value("cosine", 0.99999873), "0.999998730");
        assert_eq!(fmt_value("cosine", 1.0 - 3.25e-12), "1 - 3.25e-12");
        assert_eq!(fmt_value("cosine", 1.0), "1");
        assert_eq!(fmt_value("nmse", 3.2e-9), "3.200e-9");
        assert_eq!(fmt_value("max_abs", 0.5), "0.5000");
        assert_eq!(fmt_value("topk_set", 2.0), "2");
        assert_eq!(fmt_value("kld", 0.0), "0");
        assert_eq!(fmt_value("kld", f64::NAN), "NaN");
    }
}
