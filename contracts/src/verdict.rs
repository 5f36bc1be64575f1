//! Gate verdicts (docs/contracts.md): how many of a criterion's trials passed, whether its `gate:` holds, and
//! which known divergences behaved unexpectedly.
//!
//! Rules:
//! - an ignored trial (no outcome, e.g. it needs CUDA and there is none) counts nowhere;
//! - a trial matching a known divergence that fails is an expected failure: it counts nowhere, so it
//!   does not block;
//! - a trial matching a `strict: true` known divergence that passes is an unexpected pass: it is listed,
//!   and the gate fails (the divergence went away and the contract must say so);
//! - every other trial counts towards `passed` / `total`, and the gate (`all`, `N/M`, fraction) is
//!   applied to them.

use crate::plan::TrialPlan;
use crate::record::TrialOutcome;
use crate::schema::Contract;

/// The verdict on one criterion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriterionSummary {
    /// The criterion id.
    pub criterion: String,
    /// Trials that passed (expected failures and ignored trials excluded).
    pub passed: usize,
    /// Trials judged (expected failures and ignored trials excluded).
    pub total: usize,
    /// Whether the criterion's gate holds and no strict known divergence passed.
    pub gate_holds: bool,
    /// Whether a failed gate fails the build.
    pub blocking: bool,
    /// Names of trials whose strict known divergence passed.
    pub unexpected_passes: Vec<String>,
}

/// One summary per criterion, in contract order, from every planned trial and its outcome
/// (`None` = ignored).
pub fn summarize(
    contract: &Contract,
    results: &[(TrialPlan, Option<TrialOutcome>)],
) -> Vec<CriterionSummary> {
    contract
        .criteria
        .iter()
        .map(|criterion| {
            let mut summary = CriterionSummary {
                criterion: criterion.id.clone(),
                passed: 0,
                total: 0,
                gate_holds: false,
                blocking: criterion.blocking,
                unexpected_passes: Vec::new(),
            };
            let judged = results.iter().filter(|(plan, _)| plan.criterion == criterion.id);
            for (plan, outcome) in judged.filter_map(|(plan, outcome)| Some((plan, outcome.as_ref()?))) {
                match (&plan.expected, outcome.passed) {
                    (Some(_), false) => continue,
                    (Some(kd), true) if kd.strict => summary.unexpected_passes.push(plan.name.clone()),
                    _ => {}
                }
                summary.total += 1;
                summary.passed += usize::from(outcome.passed);
            }
            summary.gate_holds =
                summary.unexpected_passes.is_empty() && criterion.gate.holds(summary.passed, summary.total);
            summary
        })
        .collect()
}

/// Whether every blocking criterion's gate holds (exit code 0 versus 101).
pub fn all_blocking_gates_hold(summaries: &[CriterionSummary]) -> bool {
    summaries.iter().all(|s| s.gate_holds || !s.blocking)
}
