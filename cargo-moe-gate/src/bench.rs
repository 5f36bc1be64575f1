//! `cargo moe-gate bench`: the product's own speed measurement (docs/gate.md: benchmarks, not timed tests).
//! It loads a model, creates one backend, and runs [`moe_engine::bench::run`]: prefill tokens/s per
//! prompt length, batch-1 decode tokens/s, and decode against the bandwidth roofline. The table goes to
//! stdout, progress to stderr, and `--json FILE` keeps the same numbers for docs/benchmarks.md and CI
//! trend tracking.

use std::time::Instant;

use moe_engine::backend::{BackendKind, Policy, create_backend};
use moe_engine::bench::{BenchPlan, BenchReport, Machine, SetupTimes};
use moe_engine::error::EngineError;
use moe_engine::spec::ModelSpec;

use crate::cli::BenchArgs;
use crate::error::GateError;
use crate::model::resolve_model;
use crate::output::print_all;

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
