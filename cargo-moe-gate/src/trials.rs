//! From the contract's plan to libtest trials (docs/contracts.md): which trials the libtest arguments select,
//! which need CUDA that is absent (listed as ignored, decided before libtest sees them, so nextest shows
//! them skipped), which (run, prompt) forwards the selected trials need, and each trial's fate once its
//! outcome is evaluated from the recorded traces. Known divergences are expected failures; a strict one
//! that passes fails.

use std::collections::BTreeMap;

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use moe_contracts::{Contract, Criterion, Metric, Prompt, Recorded, TrialOutcome, TrialPlan};
use rayon::prelude::*;

use crate::record::RunJob;
use crate::report::TrialStatus;

/// What happens to a planned trial before anything runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// Selected and runnable: its forwards run and it is evaluated.
    Run,
    /// Listed as ignored, with the reason (needs CUDA where there is none, or plain `--ignored` logic).
    Ignored(String),
    /// Removed by the name filter or `--skip`.
    FilteredOut,
}

/// The criterion a trial belongs to (the plan only holds criteria of the contract).
pub fn criterion_of<'c>(contract: &'c Contract, plan: &TrialPlan) -> &'c Criterion {
    contract.criterion(&plan.criterion).expect("a trial plan names a criterion of its contract")
}

/// Why a trial cannot run here (it needs CUDA and CUDA is unusable), if so.
pub fn cuda_reason(contract: &Contract, plan: &TrialPlan, cuda_unavailable: Option<&str>) -> Option<String> {
    match cuda_unavailable {
        Some(why) if contract.needs_cuda(plan) => Some(format!("needs CUDA, which is unavailable: {why}")),
        _ => None,
    }
}

/// Decides every planned trial's selection the way libtest-mimic will (same filter code), so forwards
/// run only for trials that will be reported.
pub fn select(
    contract: &Contract,
    plans: &[TrialPlan],
    args: &Arguments,
    cuda_unavailable: Option<&str>,
) -> Vec<Selection> {
    plans
        .iter()
        .map(|plan| {
            let reason = cuda_reason(contract, plan, cuda_unavailable);
            let probe = Trial::test(plan.name.clone(), || Ok(())).with_ignored_flag(reason.is_some());
            if args.is_filtered_out(&probe) {
                Selection::FilteredOut
            } else if args.is_ignored(&probe) {
                Selection::Ignored(reason.unwrap_or_else(|| "ignored".into()))
            } else if let Some(reason) = reason {
                Selection::Ignored(reason)
            } else {
                Selection::Run
            }
        })
        .collect()
}

/// The forwards the selected trials need: per run, its prompts in contract order, each with the greedy
/// steps a greedy criterion asks of it. Each (run, prompt) appears once, however many trials read it.
pub fn jobs(
    contract: &Contract,
    plans: &[TrialPlan],
    selection: &[Selection],
    prompts: &[Prompt],
) -> Vec<RunJob> {
    let mut needed: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for (plan, sel) in plans.iter().zip(selection) {
        if *sel != Selection::Run {
            continue;
        }
        let criterion = criterion_of(contract, plan);
        for run in &plan.runs {
            let steps = match criterion.metric {
                Metric::Greedy => contract.greedy_steps_for(run, &plan.prompt),
                Metric::Cosine
                | Metric::Nmse
                | Metric::MaxAbs
                | Metric::Kld
                | Metric::Argmax
                | Metric::TopkSet
                | Metric::Bitwise
                | Metric::ErrorRatio => 0,
            };
            let entry = needed.entry(run.as_str()).or_default().entry(plan.prompt.as_str()).or_default();
            *entry = (*entry).max(steps);
        }
    }
    needed
        .into_iter()
        .filter_map(|(run, wanted)| {
            let spec = contract.runs.get(run)?;
            let prompts = prompts
                .iter()
                .filter_map(|p| wanted.get(p.id.as_str()).map(|&steps| (p.clone(), steps)))
                .collect();
            Some(RunJob {
                run: run.to_string(),
                backend: spec.backend,
                policy: spec.policy,
                prompts,
                sub_layer_taps: contract.needs_sub_layer_taps(run),
            })
        })
        .collect()
}

/// Evaluates every selected trial from the recorded traces (in parallel: evaluation is pure).
pub fn evaluate(
    contract: &Contract,
    plans: &[TrialPlan],
    selection: &[Selection],
    recorded: &Recorded,
) -> Vec<Option<TrialOutcome>> {
    plans
        .par_iter()
        .zip(selection.par_iter())
        .map(|(plan, sel)| match sel {
            Selection::Run => Some(moe_contracts::evaluate(contract, plan, recorded)),
            _ => None,
        })
        .collect()
}

/// A trial's fate from its selection and outcome: known divergences turn failures into expected
/// failures, and strict ones turn passes into unexpected passes.
pub fn status(plan: &TrialPlan, selection: &Selection, outcome: Option<&TrialOutcome>) -> TrialStatus {
    match (selection, outcome) {
        (Selection::FilteredOut, _) => TrialStatus::FilteredOut,
        (Selection::Ignored(reason), _) => TrialStatus::Ignored(reason.clone()),
        (Selection::Run, None) => TrialStatus::Ignored("not evaluated".into()),
        (Selection::Run, Some(o)) => match (&plan.expected, o.passed) {
            (None, true) => TrialStatus::Passed,
            (None, false) => TrialStatus::Failed,
            (Some(_), false) => TrialStatus::ExpectedFailure,
            (Some(kd), true) if kd.strict => TrialStatus::UnexpectedPass,
            (Some(_), true) => TrialStatus::Passed,
        },
    }
}

/// The libtest message of a failed trial.
pub fn failure_message(plan: &TrialPlan, outcome: &TrialOutcome, status: &TrialStatus) -> String {
    let mut msg = match status {
        TrialStatus::UnexpectedPass => {
            let kd = plan.expected.as_ref().map(|k| k.note.as_str()).unwrap_or("");
            format!(
                "unexpected pass: the contract records a strict known divergence here ({kd}), but the trial \
                 passes ({}); the divergence is gone: remove or amend the known divergence",
                outcome.detail
            )
        }
        _ => outcome.detail.clone(),
    };
    if let Some(nf) = &outcome.non_finite {
        msg.push_str(&format!("\nnon-finite value: {nf}"));
    }
    msg
}

/// The libtest-mimic trials: each runner only reports the outcome computed before. Trials that need an
/// absent CUDA carry the ignored flag (so listing and nextest see them as ignored); run anyway with
/// `--include-ignored`, they report "ignored" with the reason. Expected failures report "ignored" with
/// the known divergence, so they are visible but not failures.
pub fn libtest_trials(
    contract: &Contract,
    plans: &[TrialPlan],
    statuses: &[TrialStatus],
    outcomes: &[Option<TrialOutcome>],
    cuda_unavailable: Option<&str>,
) -> Vec<Trial> {
    plans
        .iter()
        .zip(statuses)
        .zip(outcomes)
        .map(|((plan, status), outcome)| {
            let flagged = cuda_reason(contract, plan, cuda_unavailable).is_some();
            let result: Result<Completion, Failed> = match (status, outcome) {
                (TrialStatus::Failed | TrialStatus::UnexpectedPass, Some(o)) => {
                    Err(failure_message(plan, o, status).into())
                }
                (TrialStatus::ExpectedFailure, Some(o)) => {
                    let kd = plan
                        .expected
                        .as_ref()
                        .map(|k| format!("{}: {}", k.status, k.note))
                        .unwrap_or_default();
                    Ok(Completion::ignored_with(format!("expected failure ({kd}): {}", o.detail)))
                }
                (TrialStatus::TieExcused(reason), Some(o)) => {
                    Ok(Completion::ignored_with(format!("{reason}: {}", o.detail)))
                }
                (TrialStatus::Ignored(reason), _) => Ok(Completion::ignored_with(reason)),
                _ => Ok(Completion::Completed),
            };
            Trial::ignorable_test(plan.name.clone(), move || result).with_ignored_flag(flagged)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_contracts::KnownDivergence;
    use std::path::Path;

    /// Two prompts, cpu/cuda/reference runs, a per-layer CUDA criterion, a CPU one and a greedy one.
    const CONTRACT: &str = "contract: sel-v1
version: 1.0.0
status: active
title: selection
model: synth:big
smoke_model: synth:tiny
prompts:
  - {id: pa, tokens: [1, 2]}
  - {id: pb, tokens: [3]}
runs:
  cpu: {backend: cpu}
  cuda: {backend: cuda}
  reference: {backend: reference}
criteria:
  - {id: GPU, title: g, compare: [cuda, cpu], tap: hidden, metric: cosine, per: [prompt, layer],
     threshold: {min: 0.9}, gate: all}
  - {id: CPU, title: c, compare: [cpu, reference], tap: hidden, metric: cosine, per: [prompt, layer],
     threshold: {min: 0.9}, gate: all}
  - {id: GREEDY, title: d, compare: [cpu, reference], tap: logits, metric: greedy, steps: 5, per: [prompt],
     prompts: [pb], gate: all}
amendments:
  - {version: 1.0.0, date: 2026-11-29, kind: created, summary: test}
";

    fn contract() -> Contract {
        moe_contracts::parse(CONTRACT, Path::new("sel-v1.yaml")).unwrap()
    }

    fn args(extra: &[&str]) -> Arguments {
        Arguments::from_iter(std::iter::once("gate").chain(extra.iter().copied()))
    }

    #[test]
    fn cuda_trials_are_ignored_with_the_reason_and_filters_apply() {
        let c = contract();
        let plans = c.plan(2);
        let sel = select(&c, &plans, &args(&[]), Some("no driver"));
        let by_name = |n: &str| &sel[plans.iter().position(|p| p.name == n).unwrap()];
        assert_eq!(
            by_name("sel-v1::GPU::pa::layer01"),
            &Selection::Ignored("needs CUDA, which is unavailable: no driver".into())
        );
        assert_eq!(by_name("sel-v1::CPU::pa::layer01"), &Selection::Run);
        let sel = select(&c, &plans, &args(&[]), None);
        assert!(sel.iter().all(|s| *s == Selection::Run), "with CUDA everything runs");
        let sel = select(&c, &plans, &args(&["--skip", "layer00", "CPU"]), Some("no driver"));
        let running: Vec<&str> = plans
            .iter()
            .zip(&sel)
            .filter(|(_, s)| **s == Selection::Run)
            .map(|(p, _)| p.name.as_str())
            .collect();
        assert_eq!(running, vec!["sel-v1::CPU::pa::layer01", "sel-v1::CPU::pb::layer01"]);
        let sel = select(&c, &plans, &args(&["--ignored"]), Some("no driver"));
        assert!(
            plans.iter().zip(&sel).all(|(p, s)| (p.criterion == "GPU") == matches!(s, Selection::Ignored(_)))
        );
    }

    #[test]
    fn each_run_and_prompt_is_forwarded_once_with_its_greedy_steps() {
        let c = contract();
        let plans = c.plan(2);
        let prompts = c.expand_prompts();
        let sel = select(&c, &plans, &args(&[]), Some("no driver"));
        let all = jobs(&c, &plans, &sel, &prompts);
        let summary: Vec<(String, Vec<(String, usize)>)> = all
            .iter()
            .map(|j| (j.run.clone(), j.prompts.iter().map(|(p, s)| (p.id.clone(), *s)).collect()))
            .collect();
        let expected = vec![("pa".to_string(), 0), ("pb".to_string(), 5)];
        assert_eq!(summary, vec![("cpu".to_string(), expected.clone()), ("reference".to_string(), expected)]);
        let sel = select(&c, &plans, &args(&["--exact", "sel-v1::CPU::pa::layer00"]), Some("no driver"));
        let one = jobs(&c, &plans, &sel, &prompts);
        assert_eq!(one.len(), 2);
        assert!(one.iter().all(|j| j.prompts.len() == 1 && j.prompts[0] == (prompts[0].clone(), 0)));
    }

    fn plan(expected: Option<KnownDivergence>) -> TrialPlan {
        TrialPlan {
            name: "c::K::p::layer00".into(),
            criterion: "K".into(),
            prompt: "p".into(),
            layer: Some(0),
            position: None,
            runs: vec!["cpu".into(), "reference".into()],
            expected,
        }
    }

    fn outcome(passed: bool) -> TrialOutcome {
        TrialOutcome { value: 0.5, passed, detail: "cosine 0.5".into(), non_finite: None }
    }

    fn known(strict: bool) -> KnownDivergence {
        KnownDivergence {
            criterion: "K".into(),
            prompt: None,
            layers: Some(moe_contracts::LayerSpan::one(0)),
            status: "investigating".into(),
            strict,
            note: "issue 7".into(),
        }
    }

    #[test]
    fn statuses_follow_known_divergences() {
        let run = Selection::Run;
        assert_eq!(status(&plan(None), &run, Some(&outcome(true))), TrialStatus::Passed);
        assert_eq!(status(&plan(None), &run, Some(&outcome(false))), TrialStatus::Failed);
        assert_eq!(
            status(&plan(Some(known(false))), &run, Some(&outcome(false))),
            TrialStatus::ExpectedFailure
        );
        assert_eq!(
            status(&plan(Some(known(true))), &run, Some(&outcome(false))),
            TrialStatus::ExpectedFailure
        );
        assert_eq!(status(&plan(Some(known(true))), &run, Some(&outcome(true))), TrialStatus::UnexpectedPass);
        assert_eq!(status(&plan(Some(known(false))), &run, Some(&outcome(true))), TrialStatus::Passed);
        assert_eq!(
            status(&plan(None), &Selection::Ignored("needs CUDA".into()), None),
            TrialStatus::Ignored("needs CUDA".into())
        );
        assert_eq!(status(&plan(None), &Selection::FilteredOut, None), TrialStatus::FilteredOut);
    }

    #[test]
    fn unexpected_pass_message_says_what_to_do() {
        let p = plan(Some(known(true)));
        let msg = failure_message(&p, &outcome(true), &TrialStatus::UnexpectedPass);
        assert!(
            msg.contains("unexpected pass") && msg.contains("issue 7") && msg.contains("remove"),
            "{msg}"
        );
        let mut o = outcome(false);
        o.non_finite = Some("cpu: hidden.0[3]".into());
        let msg = failure_message(&plan(None), &o, &TrialStatus::Failed);
        assert_eq!(msg, "cosine 0.5\nnon-finite value: cpu: hidden.0[3]");
    }
}
