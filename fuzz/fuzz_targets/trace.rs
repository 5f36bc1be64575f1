//! Fuzz target `trace`: see [`moe_gate_fuzz::trace`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moe_gate_fuzz::trace(data));
