//! Judging a gate run from its trials (docs/contracts.md, docs/gate.md): each criterion's count and whether its `gate:`
//! holds (through [`moe_contracts::summarize`]), the per-trial and per-layer report entries, and the
//! verdict. The gate computes them from the outcomes it evaluated; `merge` from the outcomes the shards'
//! reports hold, so a merged report's verdict is computed exactly as one run over every prompt would be.

use moe_contracts::{Contract, Criterion, CriterionSummary, TrialOutcome, TrialPlan};

use crate::gate::EXIT_FAILED;
use crate::report::{
    CriterionReport, LayerRow, LayerTable, PartitionInfo, TrialReport, TrialStatus, Verdict, Worse,
};

/// Every planned trial of a run with its status and outcome (`None` when not evaluated), index by index.
pub struct Judged<'a> {
    /// The contract as resolved for the model.
    pub contract: &'a Contract,
    /// The planned trials, in plan order.
    pub plans: &'a [TrialPlan],
    /// Each trial's fate.
    pub statuses: &'a [TrialStatus],
    /// Each trial's outcome.
    pub outcomes: &'a [Option<TrialOutcome>],
}

impl Judged<'_> {
    /// Each criterion's summary: its gate applied to every trial that was not filtered out.
    pub fn summaries(&self) -> Vec<CriterionSummary> {
        let judged: Vec<(TrialPlan, Option<TrialOutcome>)> = self
            .plans
            .iter()
            .zip(self.statuses)
            .zip(self.outcomes)
            .filter(|((_, s), _)| !matches!(s, TrialStatus::FilteredOut | TrialStatus::TieExcused(_)))
            .map(|((p, _), o)| (p.clone(), o.clone()))
            .collect();
        moe_contracts::summarize(self.contract, &judged)
    }

    /// One report entry per planned trial, in plan order.
    pub fn trials(&self) -> Vec<TrialReport> {
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

    /// One report entry per criterion, in contract order, from [`Judged::summaries`].
    pub fn criteria(&self, summaries: &[CriterionSummary]) -> Vec<CriterionReport> {
        self.contract
            .criteria
            .iter()
            .map(|c| {
                let summary = summaries.iter().find(|s| s.criterion == c.id);
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
                    metric: c.metric,
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
                    tie_excused: count(|s| matches!(s, TrialStatus::TieExcused(_))),
                    unexpected_passes: summary.map(|s| s.unexpected_passes.clone()).unwrap_or_default(),
                    gate_holds: summary.is_none_or(|s| s.gate_holds),
                }
            })
            .collect()
    }

    /// Worst value per layer over prompts, for every criterion with per-layer trials.
    pub fn layer_tables(&self) -> Vec<LayerTable> {
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
                metric: c.metric,
                worse: direction,
                threshold,
                rows,
            });
        }
        tables
    }

    /// The gate's decision from the criteria: exit 101 when a blocking gate fails. A shard's line says
    /// which partition it judged, so its PASS is never read as the whole contract's.
    pub fn verdict(&self, criteria: &[CriterionReport], partition: Option<&PartitionInfo>) -> Verdict {
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
        let scope = partition.map(|p| format!(" for {p}")).unwrap_or_default();
        let line = if blocking_failed.is_empty() {
            let mut line = format!(
                "PASSED{scope}: every blocking gate holds ({judged} trials judged, {expected} expected failures, {ignored} ignored)"
            );
            if !advisory_failed.is_empty() {
                line.push_str(&format!("; advisory gates failed: {}", advisory_failed.join(", ")));
            }
            line
        } else {
            let (s, verb) = if blocking_failed.len() == 1 { ("", "does") } else { ("s", "do") };
            let mut line =
                format!("FAILED{scope}: blocking gate{s} {} {verb} not hold", blocking_failed.join(", "));
            if unexpected > 0 {
                line.push_str(&format!(" ({unexpected} strict known divergences passed unexpectedly)"));
            }
            line
        };
        let exit_code = if blocking_failed.is_empty() { 0 } else { EXIT_FAILED };
        let lenient = self.contract.known_divergences.iter().filter(|k| !k.strict).map(describe).collect();
        Verdict { exit_code, blocking_failed, advisory_failed, ignored, line, lenient, incomplete: None }
    }
}

/// A known divergence in one line: criterion, scope, status and note.
fn describe(k: &moe_contracts::KnownDivergence) -> String {
    let mut scope = Vec::new();
    if let Some(p) = &k.prompt {
        scope.push(format!("prompt {p}"));
    }
    if let Some(l) = &k.layers {
        scope.push(l.to_string());
    }
    let scope = if scope.is_empty() { "every trial".to_string() } else { scope.join(", ") };
    format!("{} ({scope}): {}: {}", k.criterion, k.status, k.note)
}

/// Which way a criterion's metric gets worse: bounded below (cosine) means lower is worse; everything
/// else (error sizes, mismatch counts) higher.
pub fn worse(c: &Criterion) -> Worse {
    match c.metric.bound() {
        Some(moe_contracts::Bound::Min) => Worse::Lower,
        _ => Worse::Higher,
    }
}
