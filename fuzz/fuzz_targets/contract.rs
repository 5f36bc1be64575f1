//! Fuzz target `contract`: see [`moe_gate_fuzz::contract`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moe_gate_fuzz::contract(data));
