//! `cargo moe-gate bench`: the product's own speed measurement (docs/gate.md: benchmarks, not timed tests).
//! It loads a model, creates one backend, and runs [`moe_engine::bench::run`]: prefill tokens/s per
//! prompt length, batch-1 decode tokens/s, and decode against the bandwidth roofline. The table goes to
//! stdout, progress to stderr, and `--json FILE` keeps the same numbers for docs/benchmarks.md and CI
//! trend tracking.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use moe_engine::backend::{BackendKind, Policy, create_backend};
use moe_engine::bench::{BenchPlan, BenchReport, Machine, SetupTimes};
use moe_engine::error::EngineError;
use moe_engine::spec::ModelSpec;

use crate::cli::BenchArgs;
use crate::commands::print_all;
use crate::error::GateError;
use crate::model::resolve_model;

/// The model `bench` runs without `--model`: small enough for any machine.
pub const DEFAULT_MODEL: &str = "synth:tiny";
/// The production shape (docs/synthetic-models.md), the model the CUDA numbers of docs/benchmarks.md are measured on.
pub const PRODUCTION_MODEL: &str = "synth:qwen3-coder-30b-a3b:q4_k_m";

/// A comma-separated list of token counts, each at least 1 (`--prefill 1,64,512`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lengths(pub Vec<usize>);

/// A `--prefill` value that is not a comma-separated list of token counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}`: {problem}; give comma-separated token counts of at least 1, e.g. 1,64,512")]
pub struct LengthsSyntaxError {
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FromStr for Lengths {
    type Err = LengthsSyntaxError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let error = |problem: String| LengthsSyntaxError { value: value.to_string(), problem };
        if value.trim().is_empty() {
            return Err(error("the list is empty".to_string()));
        }
        let lengths = value
            .split(',')
            .map(|item| match item.trim().parse::<usize>() {
                Ok(0) => Err(error("a prefill of 0 tokens measures nothing".to_string())),
                Ok(n) => Ok(n),
                Err(_) if item.trim().is_empty() => Err(error("an item is empty".to_string())),
                Err(_) => Err(error(format!("`{}` is not a whole number", item.trim()))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Lengths(lengths))
    }
}

impl fmt::Display for Lengths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(usize::to_string).collect();
        f.write_str(&items.join(","))
    }
}

/// Runs `cargo moe-gate bench`: exit 0 with the table printed (and the JSON written), or a
/// [`GateError`] (exit 2) for bad arguments, an unloadable model, no CUDA for `--backend cuda`, or a
/// failed measurement.
pub fn run_bench(args: &BenchArgs) -> Result<u8, GateError> {
    let backend: BackendKind =
        args.backend.parse().map_err(|e| GateError::Usage(format!("--backend: {e}")))?;
    let policy: Policy = args.policy.parse().map_err(|e| GateError::Usage(format!("--policy: {e}")))?;
    let plan = BenchPlan::new(args.prefill.0.clone(), args.decode, args.repeats)
        .map_err(|e| GateError::Usage(format!("bench: {e}")))?;

    eprintln!("bench: loading {}", args.model);
    let t0 = Instant::now();
    let weights = resolve_model(&args.model)?;
    let model_load_s = t0.elapsed().as_secs_f64();
    plan.check_fits(&weights.config)
        .map_err(|e| GateError::Usage(format!("bench on {}: {e}", args.model)))?;

    eprintln!("bench: creating the {backend} backend ({policy} policy)");
    let t0 = Instant::now();
    let mut forward = match create_backend(backend, weights.clone(), policy) {
        Ok(forward) => forward,
        Err(EngineError::CudaUnavailable { reason }) => return Err(GateError::NoCuda { reason }),
        Err(e) => return Err(GateError::engine(format!("creating the {backend} backend"), e)),
    };
    let setup = SetupTimes { model_load_s, backend_create_s: t0.elapsed().as_secs_f64() };

    let result = moe_engine::bench::run(&mut *forward, &weights, &plan, &mut |line| {
        eprintln!("bench: {line}");
    })?;
    let model = args.model.parse::<ModelSpec>().map_or_else(|_| args.model.clone(), |s| s.to_string());
    let report = BenchReport::new(model, backend, policy, Machine::detect(backend), setup, result);
    print_all(&report.to_string());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| GateError::write(path, e))?;
        std::fs::write(path, json + "\n").map_err(|e| GateError::write(path, e))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_comma_separated_counts() {
        assert_eq!("1,64,512".parse::<Lengths>().unwrap(), Lengths(vec![1, 64, 512]));
        assert_eq!(" 7 , 3 ".parse::<Lengths>().unwrap(), Lengths(vec![7, 3]));
        assert_eq!(Lengths(vec![1, 64, 512]).to_string(), "1,64,512");
    }

    #[test]
    fn bad_lengths_say_what_is_wrong() {
        let problem = |s: &str| s.parse::<Lengths>().unwrap_err().problem;
        assert_eq!(problem("1,64,x"), "`x` is not a whole number");
        assert_eq!(problem("1,-2"), "`-2` is not a whole number");
        assert_eq!(problem("1,,2"), "an item is empty");
        assert_eq!(problem(" "), "the list is empty");
        assert_eq!(problem("1,0"), "a prefill of 0 tokens measures nothing");
        let e = "1,64,x".parse::<Lengths>().unwrap_err().to_string();
        assert!(e.starts_with("`1,64,x`: ") && e.ends_with("e.g. 1,64,512"), "{e}");
    }

    #[test]
    fn the_production_model_is_a_valid_spec() {
        assert!(PRODUCTION_MODEL.parse::<ModelSpec>().is_ok());
        assert!(DEFAULT_MODEL.parse::<ModelSpec>().is_ok());
    }
}
