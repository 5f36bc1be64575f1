//! Text in and out: a contract's text prompts (`{id, text}`) become token ids through the tokenizer of the
//! model the gate runs (the one its GGUF carries), and the report shows the text of every next token and
//! greedy decode next to its ids.

use std::sync::Arc;

use moe_contracts::{Contract, Recorded};
use moe_engine::tokenizer::ModelTokenizer;
use moe_engine::weights::ModelWeights;

use crate::error::GateError;
use crate::report::{GateReport, GreedyRow, GreedyRun};

/// The contract with its text prompts tokenised, and the model's tokenizer (`None` where the model has
/// none it can read: then the report shows ids only, and a contract with text prompts is refused).
pub fn tokenize_prompts(
    contract: Contract,
    weights: &ModelWeights,
    spec: &str,
) -> Result<(Contract, Option<Arc<ModelTokenizer>>), GateError> {
    let refused = |reason: String| GateError::TextPrompt { spec: spec.to_string(), reason };
    let tokenizer = match ModelTokenizer::from_gguf(&weights.file) {
        Ok(t) => Arc::new(t),
        Err(e) if contract.has_text_prompts() => return Err(refused(e.to_string())),
        Err(_) => return Ok((contract, None)),
    };
    if !contract.has_text_prompts() {
        return Ok((contract, Some(tokenizer)));
    }
    let vocab = weights.config.vocab;
    let contract = contract
        .tokenize_text(|text| {
            let ids = tokenizer.encode(text).map_err(|e| e.to_string())?;
            match ids.iter().find(|&&id| id as usize >= vocab) {
                Some(id) => Err(format!(
                    "the tokenizer gave id {id}, outside the model's {vocab}-token embedding table"
                )),
                None => Ok(ids),
            }
        })
        .map_err(|e| refused(e.to_string()))?;
    Ok((contract, Some(tokenizer)))
}

/// The report with the text of every next token and greedy decode (ids only without a tokenizer).
pub fn annotate(
    mut report: GateReport,
    tokenizer: Option<&ModelTokenizer>,
    contract: &Contract,
    recorded: &Recorded,
) -> GateReport {
    let decode = |ids: &[u32]| tokenizer.map(|t| t.decode(ids));
    for row in &mut report.argmax {
        for run in &mut row.runs {
            run.text = decode(&[run.token]);
        }
    }
    let mut runs: Vec<&String> = recorded.greedy.keys().map(|(run, _)| run).collect();
    runs.sort();
    runs.dedup();
    report.greedy = contract
        .expand_prompts()
        .iter()
        .filter_map(|p| {
            let decoded: Vec<GreedyRun> = runs
                .iter()
                .filter_map(|run| {
                    let steps = recorded.greedy.get(&((*run).clone(), p.id.clone()))?;
                    let tokens: Vec<u32> = steps.iter().map(|s| s.token).collect();
                    Some(GreedyRun { run: (*run).clone(), text: decode(&tokens), tokens })
                })
                .collect();
            if decoded.is_empty() {
                return None;
            }
            let agree = decoded.iter().all(|r| r.tokens == decoded[0].tokens);
            let prompt_text = contract.prompt_text(&p.id).map(str::to_string);
            Some(GreedyRow { prompt: p.id.clone(), prompt_text, runs: decoded, agree })
        })
        .collect();
    report
}

/// A decoded text as one line for tables: quoted, with line breaks, tabs and quotes escaped.
pub fn quoted(text: &str) -> String {
    format!("{text:?}")
}

/// `tokenize`: one text, or a file of JSON lines (what scripts/check_tokenizer.py compares with
/// llama.cpp's tokenizer).
pub fn run_tokenize(args: &crate::cli::TokenizeArgs) -> Result<u8, GateError> {
    let tokenizer = model_tokenizer(&args.model)?;
    if let Some(text) = &args.text {
        let ids = tokenizer
            .encode(text)
            .map_err(|e| GateError::TextPrompt { spec: args.model.clone(), reason: e.to_string() })?;
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", list.join(","));
        println!("{} tokens: {}", ids.len(), quoted(&tokenizer.decode(&ids)));
        return Ok(0);
    }
    let path = args.jsonl.as_ref().ok_or_else(|| GateError::Usage("give --text or --jsonl".into()))?;
    let input = std::fs::read_to_string(path)
        .map_err(|e| GateError::Usage(format!("--jsonl {}: {e}", path.display())))?;
    let mut out = String::new();
    for (n, line) in input.lines().enumerate() {
        let bytes = jsonl_input(line)
            .map_err(|e| GateError::Usage(format!("--jsonl {}:{}: {e}", path.display(), n + 1)))?;
        let result = match tokenizer.encode_bytes(&bytes) {
            Ok(ids) => serde_json::json!({ "ids": ids, "text": tokenizer.decode(&ids) }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        out.push_str(&result.to_string());
        out.push('\n');
    }
    print!("{out}");
    Ok(0)
}

/// The tokenizer of a model spec: read from the file's metadata for a `.gguf` path (no weights are
/// checked), from the built model for a `synth:` spec.
fn model_tokenizer(spec: &str) -> Result<ModelTokenizer, GateError> {
    let refused = |reason: String| GateError::TextPrompt { spec: spec.to_string(), reason };
    let parsed: moe_engine::spec::ModelSpec =
        spec.parse().map_err(|e: moe_engine::spec::SpecError| refused(e.to_string()))?;
    let file = match parsed {
        moe_engine::spec::ModelSpec::Path(path) => Arc::new(
            moe_engine::gguf::GgufFile::open(&path)
                .map_err(|e| GateError::Model { spec: spec.to_string(), reason: e.to_string() })?,
        ),
        moe_engine::spec::ModelSpec::Synth { .. } => Arc::clone(&crate::model::resolve_model(spec)?.file),
    };
    ModelTokenizer::from_gguf(&file).map_err(|e| refused(e.to_string()))
}

/// The bytes of one JSON line: `{"text": "..."}` or `{"hex": "..."}`.
fn jsonl_input(line: &str) -> Result<Vec<u8>, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(text) = value.get("text").and_then(serde_json::Value::as_str) {
        return Ok(text.as_bytes().to_vec());
    }
    let hex = value
        .get("hex")
        .and_then(serde_json::Value::as_str)
        .ok_or("expected {\"text\": ...} or {\"hex\": ...}")?;
    if !hex.len().is_multiple_of(2) {
        return Err("`hex` has an odd number of digits".into());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .map_err(|_| format!("`hex` digit pair {:?}", &hex[i..i + 2]))
        })
        .collect()
}
