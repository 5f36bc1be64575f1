//! moe-contracts: parity contracts (schema, validation) and the metrics they are judged by.
//!
//! A contract (docs/contracts.md; the schema field by field in docs/contracts.md) is a YAML file in `contracts/`
//! that says which runs (a backend and a policy) to compare, on which prompts, by which criteria, and
//! which divergences are known. This crate:
//! - parses it with serde-saphyr, rejecting unknown fields, and validates it ([`load`], [`parse`]);
//!   every error names `file:line:col`, what is wrong and what to do ([`ContractError`]);
//! - expands prompt sets, generated ones identically on every platform ([`Contract::expand_prompts`]);
//! - plans the trials and the forwards they need ([`Contract::plan`], [`Contract::needed_forwards`]);
//! - judges a trial from recorded traces ([`evaluate`], with the pure functions of [`metrics`]) and a
//!   criterion from its trials ([`summarize`]).
//!
//! Running forwards, libtest, reports and exit codes belong to the `cargo-moe-gate` binary.

mod error;
mod evaluate;
pub mod metrics;
mod plan;
mod prompts;
mod raw;
mod record;
mod schema;
pub mod ties;
mod validate;
mod verdict;

use std::path::Path;

pub use error::{ContractError, SourceLocation};
pub use evaluate::evaluate;
pub use plan::{PromptDemand, TrialPlan, trial_name};
pub use prompts::{TextPromptError, generate_prompts, generated_id, generated_lengths};
pub use record::{GreedyStep, Recorded, TrialOutcome};
pub use schema::{
    Amendment, AmendmentKind, BackendKind, Bound, Contract, Criterion, DIVERGENCE_STATUSES, Gate,
    KnownDivergence, LayerSpan, Metric, Mode, OnlyOn, Per, Policy, Prompt, PromptSet, QWEN3_VOCAB, RunSpec,
    Status, Tap, Threshold, TiePolicy, Ties,
};
pub use validate::{MAX_GENERATED_COUNT, MAX_GENERATED_LEN, MAX_GREEDY_STEPS};
pub use verdict::{CriterionSummary, all_blocking_gates_hold, summarize};

/// Reads, parses and validates the contract at `path`, and checks that its id is the file stem.
pub fn load(path: &Path) -> Result<Contract, ContractError> {
    let src = std::fs::read_to_string(path)
        .map_err(|source| ContractError::Read { path: path.to_path_buf(), source })?;
    let contract = parse(&src, path)?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    if contract.contract != stem {
        let at = contract_id_location(&src, path);
        return Err(ContractError::Invalid {
            at,
            message: format!("contract id `{}` differs from the file name `{stem}`", contract.contract),
            hint: format!("the gate finds contracts by file name: rename the file or set `contract: {stem}`"),
        });
    }
    Ok(contract)
}

/// Parses and validates contract text; `origin` is the path errors name.
pub fn parse(src: &str, origin: &Path) -> Result<Contract, ContractError> {
    let raw: raw::RawContract =
        serde_saphyr::from_str(src).map_err(|e| ContractError::from_yaml(origin, src, &e))?;
    validate::validate(raw, src, origin)
}

/// The location of the top-level `contract:` value (the parser's spans are gone once validated).
fn contract_id_location(src: &str, path: &Path) -> SourceLocation {
    let found = src.lines().enumerate().find_map(|(i, line)| {
        let rest = line.strip_prefix("contract:")?;
        let column = "contract:".len() + rest.len() - rest.trim_start().len() + 1;
        Some((i + 1, column))
    });
    let (line, column) = found.unwrap_or((0, 0));
    SourceLocation::at_line_col(path, src, line, column)
}
