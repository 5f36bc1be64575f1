//! Fuzz target `gguf`: see [`moe_gate_fuzz::gguf`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moe_gate_fuzz::gguf(data));
