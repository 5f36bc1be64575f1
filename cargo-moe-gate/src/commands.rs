//! The subcommands next to the gate run (docs/architecture.md): `trace`, `synth`, `validate`, `list`, `quantize`,
//! `merge` (docs/gate.md, in [`crate::merge`]), `bench` (docs/gate.md, in [`crate::bench`]) and `tokenize`
//! (in [`crate::text`]).
//! Each returns the process exit code (0, 101 for a merge whose blocking gate fails, or 2 through a
//! [`GateError`]).

use std::path::PathBuf;

use moe_engine::backend::{BackendKind, Policy, create_backend};
use moe_engine::spec::{ModelSpec, QuantMix, SpecError};
use moe_engine::trace::{Precision, Trace};

use crate::cli::{Command, QuantizeArgs, SynthArgs, TraceArgs, ValidateArgs};
use crate::discover::{Workspace, locate_contract};
use crate::error::GateError;
use crate::model::resolve_model;
use crate::output::print_all;

/// Runs one subcommand.
pub fn run(command: Command) -> Result<u8, GateError> {
    match command {
        Command::Trace(args) => trace(&args),
        Command::Synth(args) => synth(&args),
        Command::Validate(args) => validate(&args),
        Command::List => list(),
        Command::Quantize(args) => quantize(&args),
        Command::Merge(args) => crate::merge::run_merge(&args),
        Command::Bench(args) => crate::bench::run_bench(&args),
        Command::Tokenize(args) => crate::text::run_tokenize(&args),
        Command::Selftest(args) => crate::selftest::run_selftest(&args),
    }
}

/// `trace`: one forward with a trace, written as safetensors (docs/architecture.md).
fn trace(args: &TraceArgs) -> Result<u8, GateError> {
    let backend: BackendKind =
        args.backend.parse().map_err(|e| GateError::Usage(format!("--backend: {e}")))?;
    let policy: Policy = args.policy.parse().map_err(|e| GateError::Usage(format!("--policy: {e}")))?;
    if args.tokens.is_empty() {
        return Err(GateError::Usage("--tokens: the prompt is empty; pass at least one token id".into()));
    }
    let weights = resolve_model(&args.model)?;
    let mut forward = create_backend(backend, weights, policy)
        .map_err(|e| GateError::engine(format!("creating the {backend} backend"), e))?;
    let precision = if backend == BackendKind::Reference { Precision::F64 } else { Precision::F32 };
    let trace = Trace::new(&args.model, backend.as_str(), policy.as_str(), precision);
    let mut trace = if args.taps { trace.with_sub_layer_taps() } else { trace };
    forward
        .forward(&args.tokens, Some(&mut trace))
        .map_err(|e| GateError::engine(format!("the {backend} forward of {:?}", args.tokens), e))?;
    trace.write_safetensors(&args.out).map_err(|e| GateError::write(&args.out, e))?;
    let taps = if trace.sub_layers.is_empty() { "" } else { " with sub-layer taps" };
    println!(
        "wrote {}: {} tokens, {} layers{taps}, {} backend ({} policy), model {}",
        args.out.display(),
        trace.tokens.len(),
        trace.layers.len(),
        backend,
        policy,
        args.model
    );
    Ok(0)
}

/// `synth`: a synthetic model written as GGUF (streamed, never whole in memory).
fn synth(args: &SynthArgs) -> Result<u8, GateError> {
    let model_err = |reason: String| GateError::Model { spec: args.model.clone(), reason };
    let spec: ModelSpec = args.model.parse().map_err(|e: SpecError| model_err(e.to_string()))?;
    if matches!(spec, ModelSpec::Path(_)) {
        return Err(GateError::Usage(format!(
            "--model {}: `synth` writes synthetic models; give synth:PRESET[:QUANT][@SEED]",
            args.model
        )));
    }
    moe_engine::spec::synth_to_file(&spec, &args.out).map_err(|e| model_err(e.to_string()))?;
    println!("wrote {} ({spec})", args.out.display());
    Ok(0)
}

/// `quantize`: re-quantises a GGUF file to another tensor mix, keeping its metadata.
fn quantize(args: &QuantizeArgs) -> Result<u8, GateError> {
    let mix = QuantMix::from_name(&args.quant).ok_or_else(|| {
        GateError::Usage(format!(
            "--quant {}: unknown; valid quants are {}",
            args.quant,
            QuantMix::valid_names()
        ))
    })?;
    moe_engine::quantize::requantize(&args.input, &args.out, mix)
        .map_err(|e| GateError::Model { spec: args.input.display().to_string(), reason: e.to_string() })?;
    println!("wrote {} ({} re-quantised to {mix})", args.out.display(), args.input.display());
    Ok(0)
}

/// Appends one line to `out` (the listing is printed at once, so a closed pipe ends it quietly).
macro_rules! outln {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

/// `validate`: loads each contract; prints `ok` or the error with its line; exit 2 if any is invalid.
fn validate(args: &ValidateArgs) -> Result<u8, GateError> {
    let paths: Vec<PathBuf> = if args.contracts.is_empty() {
        Workspace::discover()?.contract_files()?
    } else {
        args.contracts.iter().map(|c| locate_contract(Some(c))).collect::<Result<_, _>>()?
    };
    if paths.is_empty() {
        return Err(GateError::Usage("no contract files to validate".into()));
    }
    let mut out = String::new();
    let mut invalid = 0;
    for path in &paths {
        match moe_contracts::load(path) {
            Ok(c) => outln!(
                out,
                "ok      {} ({} {}, {}, {} criteria)",
                path.display(),
                c.contract,
                c.version,
                c.status,
                c.criteria.len()
            ),
            Err(e) => {
                invalid += 1;
                outln!(out, "INVALID {e}");
                if let Some(snippet) = e.snippet() {
                    outln!(out, "{snippet}");
                }
            }
        }
    }
    outln!(out, "{} contracts, {} valid, {invalid} invalid", paths.len(), paths.len() - invalid);
    print_all(&out);
    Ok(if invalid == 0 { 0 } else { 2 })
}

/// `list`: the workspace's contracts and their criteria.
fn list() -> Result<u8, GateError> {
    let workspace = Workspace::discover()?;
    let mut out = String::new();
    let mut invalid = 0;
    for path in workspace.contract_files()? {
        let c = match moe_contracts::load(&path) {
            Ok(c) => c,
            Err(e) => {
                invalid += 1;
                outln!(out, "INVALID {e}\n");
                continue;
            }
        };
        let default = if workspace.default_contract.as_deref() == Some(c.contract.as_str()) {
            " (default)"
        } else {
            ""
        };
        outln!(out, "{} {} [{}]{default}: {}", c.contract, c.version, c.status, c.title);
        outln!(out, "  model {} (smoke model {}), file {}", c.model, c.smoke_model, path.display());
        let runs: Vec<String> =
            c.runs.iter().map(|(id, r)| format!("{id}={}/{}", r.backend, r.policy)).collect();
        outln!(out, "  runs: {}", runs.join(", "));
        for k in &c.criteria {
            let threshold = match (k.threshold.min, k.threshold.max) {
                (None, None) => String::new(),
                _ => format!(", {}", k.threshold),
            };
            let blocking = if k.blocking { "" } else { ", advisory" };
            outln!(
                out,
                "  {}: {} vs {}, {} of {}, gate {}{threshold}{blocking} - {}",
                k.id,
                k.compare[0],
                k.compare[1],
                k.metric,
                k.tap,
                k.gate,
                k.title
            );
        }
        outln!(out);
    }
    print_all(&out);
    Ok(if invalid == 0 { 0 } else { 2 })
}
