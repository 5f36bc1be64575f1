//! cargo-moe-gate: the `cargo moe-gate` subcommand (docs/architecture.md). It judges a parity contract
//! (`contracts/*.yaml`, docs/contracts.md) on a model: every (run, prompt) forward is recorded once with a trace,
//! every trial is evaluated from the traces and reported through libtest-mimic, failures are diagnosed,
//! and the reports of docs/gate.md are written.
//!
//! - [`cli`]: the command line; [`discover`]: workspace and contracts; [`model`]: model choice and CUDA.
//! - [`record`]: the forwards; [`trials`]: selection, outcomes and libtest trials; [`diagnose`], with the
//!   op-level [`bisect`]ion of a defective layer or decode step.
//! - [`gate`]: the run itself; [`verdict`]: criteria and verdict from the trials; [`commands`]: the
//!   subcommands; [`report`]: the report writers.
//! - [`partition`]: `--partition K/N`; [`merge`]: `cargo moe-gate merge` of the shards' reports.
//! - [`bench`]: `cargo moe-gate bench`, the speed measurement.
//! - [`selftest`]: `cargo moe-gate selftest`, the gate judged on a catalogue of seeded defects.
//! - [`text`]: text prompts through the model's tokenizer, and token ids read back as text in reports.
//!
//! The binary is a thin `main` over [`run`], so the end-to-end tests and the `harness = false` test
//! target run exactly what `cargo moe-gate` runs.

pub mod bench;
pub mod bisect;
pub mod cli;
pub mod commands;
pub mod diagnose;
pub mod discover;
pub mod error;
pub mod gate;
pub mod lengths;
pub mod merge;
pub mod model;
pub mod output;
pub mod partition;
pub mod record;
pub mod report;
pub mod resources;
pub mod selftest;
pub mod text;
pub mod ties;
pub mod trials;
pub mod verdict;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::error::GateError;

/// The exit code of a run that could not be judged (bad arguments, unreadable or invalid contract or
/// model, CUDA required but absent).
pub const EXIT_UNJUDGED: u8 = 2;

/// Runs `cargo moe-gate` with these arguments (`argv[0]` first; a `moe-gate` `argv[1]`, as cargo passes to
/// an installed subcommand, is dropped) and returns the exit code.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    ExitCode::from(run_code(args))
}

/// Like [`run`], returning the exit code as a number: 0 every blocking gate holds, 101 a blocking gate
/// failed, 2 the run could not be judged.
pub fn run_code<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args = cli::normalize_args(args.into_iter().map(Into::into).collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_UNJUDGED } else { 0 };
        }
    };
    let result = match cli.command {
        None => gate::run_gate(&cli.gate),
        Some(command) => commands::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            report::incomplete::abandon(&e.to_string(), EXIT_UNJUDGED);
            EXIT_UNJUDGED
        }
    }
}

/// Prints an error the way the gate's users read it: one `error:` line, and for a contract error the
/// offending line with a caret.
fn report_error(e: &GateError) {
    eprintln!("error: {e}");
    if let GateError::Contract(ce) = e
        && let Some(snippet) = ce.snippet()
    {
        eprintln!("{snippet}");
    }
}
