//! `cargo moe-gate` as the end-to-end tests spawn it: [`cargo_moe_gate::run`] on the process arguments.

use std::process::ExitCode;

fn main() -> ExitCode {
    cargo_moe_gate::run(std::env::args_os())
}
