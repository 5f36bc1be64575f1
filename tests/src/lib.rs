//! End-to-end tests of cargo-moe-gate: `tests/end_to_end.rs` runs the binary `gate-under-test` (the same
//! `cargo_moe_gate::run` as `cargo moe-gate`) on the fixture models with contracts written for each test,
//! and `tests/default_gate.rs` runs the workspace's default contract as a `harness = false` test target,
//! so `cargo test` and `cargo nextest run` judge the default gate trial by trial.
