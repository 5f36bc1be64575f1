//! End-to-end tests of cargo-moe-gate live in `tests/`.
