//! The default gate as a `harness = false` test target: the workspace's default contract
//! (`[workspace.metadata.moe-gate] default-contract`) on the model the gate picks here (its smoke model
//! without CUDA), one libtest trial per contract trial. libtest's arguments pass through, so
//! `cargo test -p moe-gate-tests --test default_gate -- AC-GPU-MOE-003` filters and `cargo nextest run`
//! lists and runs the trials one by one (CUDA trials show as skipped where CUDA is absent).

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = vec!["cargo-moe-gate".into()];
    args.extend(std::env::args_os().skip(1));
    cargo_moe_gate::run(args)
}
