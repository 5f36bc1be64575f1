//! What each fuzz target does with one input. Every function takes arbitrary bytes and must return
//! without panicking, hanging or allocating more than the input justifies; an error is an acceptable
//! answer, and is rendered (as the gate would print it) so that its formatting runs too.

use std::path::Path;
use std::sync::Arc;

use cargo_moe_gate::resources::check_contract_within;
use moe_contracts::Contract;
use moe_engine::gguf::GgufFile;
use moe_engine::synth::Preset;
use moe_engine::trace::Trace;
use moe_engine::weights::{ModelWeights, WeightTensor};

/// A target: its name and what it does with one input.
pub type Target = (&'static str, fn(&[u8]));

/// The targets, as named under `fuzz/fuzz_targets/` and `fuzz/corpus/`.
pub const TARGETS: [Target; 4] =
    [("gguf", gguf), ("contract", contract), ("trace", trace), ("report", report)];

/// The contract `report` merges shards of (its seed reports are runs of it).
const MERGE_CONTRACT: &str = include_str!("../seeds/fuzz-merge-v1.yaml");

/// The memory the `contract` target plans within, as the gate plans within the machine's available
/// memory: fixed, so that an input does the same on every machine.
const AVAILABLE: u128 = 4 << 30;

/// The GGUF reader (header, metadata, tensor table), then the model loader (configuration and every
/// tensor's shape and type), then the bytes of each tensor's first and last row, dequantised.
pub fn gguf(data: &[u8]) {
    let file = match GgufFile::from_bytes(data.to_vec()) {
        Ok(file) => file,
        Err(e) => return drop(e.to_string()),
    };
    for t in file.tensors() {
        std::hint::black_box(file.tensor_data(t));
    }
    let weights = match ModelWeights::from_gguf(Arc::new(file)) {
        Ok(weights) => weights,
        Err(e) => return drop(e.to_string()),
    };
    let mut tensors = vec![&weights.token_embd, &weights.output_norm, &weights.output];
    for l in &weights.layers {
        tensors.extend([&l.attn_norm, &l.attn_q, &l.attn_k, &l.attn_v, &l.attn_output, &l.attn_q_norm]);
        tensors.extend([&l.attn_k_norm, &l.ffn_norm, &l.ffn_gate_inp, &l.ffn_gate_exps, &l.ffn_up_exps]);
        tensors.push(&l.ffn_down_exps);
    }
    for t in tensors {
        touch_rows(t);
        if t.dims.len() == 3 {
            touch_rows(&t.matrix(t.dims[2] - 1));
        }
    }
}

/// Dequantises the first and last row of `t`.
fn touch_rows(t: &WeightTensor) {
    let mut row = vec![0f32; t.row_len()];
    for i in [0, t.n_rows() - 1] {
        moe_kernels::quant::dequantize_row(t.ty, t.row(i), &mut row);
    }
    std::hint::black_box(&row);
}

/// The contract parser and validator, then what the gate derives from a valid contract, in the gate's
/// order (`run_gate`): the contract resolved for the model, its resource estimate before anything is
/// generated or planned (a refusal is an answer, rendered), then the prompts, the trial plan and the
/// forwards it needs. Once on the smoke model's shape (synth:tiny) and once on the production shape.
pub fn contract(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let contract = match moe_contracts::parse(src, Path::new("fuzz.yaml")) {
        Ok(contract) => contract,
        Err(e) => {
            drop(e.to_string());
            drop(e.snippet());
            return;
        }
    };
    let models = [
        (&contract.smoke_model, Preset::Tiny.config()),
        (&contract.model, Preset::Qwen3Coder30bA3b.config()),
    ];
    for (model, config) in models {
        let resolved = contract.for_model(model);
        let counted = |_: &moe_contracts::Criterion| true;
        if let Err(e) = check_contract_within(&resolved, &config, None, counted, AVAILABLE) {
            drop(e.to_string());
            continue;
        }
        let prompts = resolved.expand_prompts();
        let plans = resolved.plan(config.n_layer);
        std::hint::black_box((prompts.len(), plans.len(), resolved.needed_forwards()));
    }
}

/// The trace file reader.
pub fn trace(data: &[u8]) {
    match Trace::from_safetensors_bytes(data, "fuzz.safetensors") {
        Ok(t) => drop(std::hint::black_box(t.first_non_finite())),
        Err(e) => drop(e.to_string()),
    }
}

/// `merge`'s input: one report.json, checked as a shard and merged against the contract it names.
pub fn report(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let shard = match cargo_moe_gate::merge::parse_shard(text, Path::new("report.json")) {
        Ok(shard) => shard,
        Err(e) => return drop(e.to_string()),
    };
    let shards = match cargo_moe_gate::merge::check_shards(vec![shard]) {
        Ok(shards) => shards,
        Err(e) => return drop(e.to_string()),
    };
    match cargo_moe_gate::merge::merge(&merge_contract(), &shards) {
        Ok(merged) => drop(std::hint::black_box(merged.to_json())),
        Err(e) => drop(e.to_string()),
    }
}

fn merge_contract() -> Contract {
    moe_contracts::parse(MERGE_CONTRACT, Path::new("fuzz/seeds/fuzz-merge-v1.yaml"))
        .expect("the workspace's contract is valid")
}
