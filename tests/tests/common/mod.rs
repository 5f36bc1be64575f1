//! Helpers of the end-to-end tests: the fixture model, contracts written into a temporary directory, and
//! the gate binary run as a process.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binary under test: `cargo_moe_gate::run`, exactly as `cargo moe-gate` runs it.
pub const GATE: &str = env!("CARGO_BIN_EXE_gate-under-test");

/// The small fixture model (hidden 64, 2 layers, 8 experts top-2, vocab 256; tests/fixtures/README.md).
pub fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/public-tiny/model.gguf")
}

/// What a finished gate process left.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// What libtest printed for trial `name` (`ok`, `FAILED`, `ignored, REASON`), if it ran.
    pub fn trial(&self, name: &str) -> Option<&str> {
        let prefix = format!("test {name} ");
        let line = self.stdout.lines().find(|l| l.starts_with(&prefix))?;
        line.split_once(" ... ").map(|(_, status)| status.trim())
    }

    /// Both streams, for assertion messages.
    pub fn all(&self) -> String {
        format!("--- exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs the gate with `args` in directory `cwd`.
pub fn gate_in(cwd: &Path, args: &[&str]) -> Outcome {
    let out = Command::new(GATE).args(args).current_dir(cwd).output().expect("the gate binary starts");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A contract file for the fixture model: three prompts (token ids below the fixture's vocabulary of
/// 256), the given runs, criteria and known divergences (YAML lines, indented as list items).
pub fn write_contract(dir: &Path, id: &str, runs: &str, criteria: &str, known: &str) -> PathBuf {
    let model = fixture_model();
    let model = model.display();
    let known = if known.is_empty() { String::new() } else { format!("known_divergences:\n{known}\n") };
    let yaml = format!(
        "contract: {id}
version: 1.0.0
status: active
title: written by the end-to-end tests
model: {model}
smoke_model: {model}
prompts:
  - {{id: p_short, tokens: [1]}}
  - {{id: p_mid, tokens: [17, 42, 99]}}
  - {{id: p_long, tokens: [5, 200, 31, 77, 150, 3, 64, 128]}}
runs:
{runs}
criteria:
{criteria}
{known}amendments:
  - {{version: 1.0.0, date: 2026-11-29, kind: created, summary: written by the end-to-end tests}}
"
    );
    let path = dir.join(format!("{id}.yaml"));
    std::fs::write(&path, yaml).expect("the temp dir is writable");
    path
}

/// The cpu and reference runs.
pub const CPU_REF_RUNS: &str = "  cpu: {backend: cpu}\n  reference: {backend: reference}";

/// cpu, cuda and reference runs.
pub const CPU_CUDA_REF_RUNS: &str =
    "  cpu: {backend: cpu}\n  cuda: {backend: cuda}\n  reference: {backend: reference}";

/// Whether a CUDA backend can be created here (tests that need its absence skip where it is present).
pub fn cuda_usable() -> bool {
    let weights = moe_engine::weights::ModelWeights::open(&fixture_model()).expect("the fixture model loads");
    moe_engine::backend::create_backend(
        moe_engine::backend::BackendKind::Cuda,
        std::sync::Arc::new(weights),
        moe_engine::backend::Policy::Fast,
    )
    .is_ok()
}
