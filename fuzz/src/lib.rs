//! The fuzz targets' bodies, one function per parser; `fuzz_targets/*.rs` hand them libFuzzer's input.
//! The same file is compiled into the workspace's corpus replay test (`tests/tests/fuzz_corpus.rs`), so
//! every committed input runs on stable in CI.

mod harness;

pub use harness::{TARGETS, contract, gguf, report, trace};
