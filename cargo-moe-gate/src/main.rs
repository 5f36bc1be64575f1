//! `cargo moe-gate` (alias in .cargo/config.toml) or `cargo-moe-gate` (installed subcommand): see the
//! library, [`cargo_moe_gate::run`].

use std::process::ExitCode;

fn main() -> ExitCode {
    cargo_moe_gate::run(std::env::args_os())
}
