//! Fuzz target `report`: see [`moe_gate_fuzz::report`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moe_gate_fuzz::report(data));
