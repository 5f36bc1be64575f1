//! The model's own tokenizer, built from its GGUF metadata (`tokenizer.ggml.*`), so text prompts become
//! the token ids the model was trained on and generated ids read back as text.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with `tokenizer.ggml.pre = "qwen2"`, what
//! llama.cpp's converter writes for Qwen2, Qwen3 and Qwen3-MoE. The tokenizer is the `tokenizers` crate's
//! BPE built from the file's vocabulary (`tokens`, by id) and `merges` (by rank), behind Qwen2's split
//! pattern and the byte-to-symbol map; control and user-defined tokens (`token_type` 3 and 4) are matched
//! in the text as whole tokens, as llama.cpp does when it parses special tokens. No Unicode normalisation
//! is applied (llama.cpp applies none; Hugging Face's Qwen tokenizer applies NFC, which differs only on
//! text that is not already NFC). A BOS token is prepended only where `tokenizer.ggml.add_bos_token` is
//! true. `scripts/check_tokenizer.py` checks the result against llama.cpp's tokenizer (docs/tokenizer.md).

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::{GgufFile, GgufValue};

/// Qwen2's pre-tokenizer split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`, Hugging Face's `Split` of the
/// Qwen2 tokenizer): contractions, letters with one leading non-letter, single digits, punctuation runs,
/// line breaks, and whitespace runs that leave their last space to the next word.
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`llama_token_type`) as `tokenizer.ggml.token_type` stores them.
pub mod token_type {
    /// An ordinary token of the BPE vocabulary.
    pub const NORMAL: i32 = 1;
    /// A control token (`<|im_start|>`, ...): matched whole in text.
    pub const CONTROL: i32 = 3;
    /// A user-defined token (`<think>`, ...): matched whole in text.
    pub const USER_DEFINED: i32 = 4;
    /// A padding entry of the embedding table, never produced.
    pub const UNUSED: i32 = 5;
}

/// Why a tokenizer could not be built or a text not tokenised.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required `tokenizer.ggml.*` key is absent.
    #[error(
        "the model has no tokenizer: metadata key {key:?} is missing; text prompts need a GGUF with its \
         tokenizer (llama.cpp's converter writes one), or give the prompt as `tokens`"
    )]
    Missing { key: &'static str },
    /// A key holds a value of the wrong type.
    #[error("tokenizer metadata key {key:?} is not {expected}")]
    WrongType { key: &'static str, expected: &'static str },
    /// A tokenizer kind this crate does not implement.
    #[error(
        "tokenizer {model:?} with pre-tokenizer {pre:?} is not supported (only \"gpt2\" with \"qwen2\", \
         the Qwen models' tokenizer); give the prompt as `tokens` instead"
    )]
    Unsupported { model: String, pre: String },
    /// The vocabulary or merges are inconsistent.
    #[error("the model's tokenizer is invalid: {reason}")]
    Invalid { reason: String },
    /// The text to tokenise is not UTF-8.
    #[error(
        "the text is not valid UTF-8 (byte {offset}: {reason}); prompts are UTF-8 text, give raw bytes as \
         `tokens` instead"
    )]
    InvalidUtf8 { offset: usize, reason: String },
    /// The tokenizer failed on a text.
    #[error("tokenizing failed: {reason}")]
    Encode { reason: String },
}

/// A model's tokenizer: text to ids and back.
pub struct ModelTokenizer {
    inner: Tokenizer,
    /// Prepended to every encoding where the model asks for it (`tokenizer.ggml.add_bos_token`).
    bos: Option<u32>,
    /// The number of token ids (the vocabulary, padding included).
    n_tokens: usize,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer").field("n_tokens", &self.n_tokens).field("bos", &self.bos).finish()
    }
}

impl ModelTokenizer {
    /// The tokenizer a GGUF file describes.
    pub fn from_gguf(file: &GgufFile) -> Result<ModelTokenizer, TokenizerError> {
        let model = string(file, "tokenizer.ggml.model")?;
        let pre = match file.get("tokenizer.ggml.pre") {
            Some(v) => v
                .as_str()
                .ok_or(TokenizerError::WrongType { key: "tokenizer.ggml.pre", expected: "a string" })?,
            None => "default",
        };
        if model != "gpt2" || pre != "qwen2" {
            return Err(TokenizerError::Unsupported { model: model.to_string(), pre: pre.to_string() });
        }
        let tokens = strings(file, "tokenizer.ggml.tokens")?;
        let merges = strings(file, "tokenizer.ggml.merges")?;
        let types = match file.get("tokenizer.ggml.token_type") {
            Some(v) => int_array(v, "tokenizer.ggml.token_type")?,
            None => vec![token_type::NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::Invalid {
                reason: format!("{} token types for {} tokens", types.len(), tokens.len()),
            });
        }
        let add_bos = file.get("tokenizer.ggml.add_bos_token").and_then(GgufValue::as_bool).unwrap_or(false);
        let bos =
            match file.get("tokenizer.ggml.bos_token_id").and_then(GgufValue::as_u64) {
                Some(id) if add_bos => Some(u32::try_from(id).map_err(|_| TokenizerError::Invalid {
                    reason: format!("bos_token_id {id} exceeds u32"),
                })?),
                _ => None,
            };
        let inner = build(&tokens, &merges, &types)?;
        Ok(ModelTokenizer { inner, bos, n_tokens: tokens.len() })
    }

    /// The number of token ids.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// The ids of `text` (BOS first where the model asks for it; control and user-defined tokens written
    /// in the text become their ids).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding =
            self.inner.encode(text, false).map_err(|e| TokenizerError::Encode { reason: e.to_string() })?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend(self.bos);
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The ids of `bytes`, which must be UTF-8: invalid input is refused with the offset of the first bad
    /// byte, never replaced.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>, TokenizerError> {
        let text = std::str::from_utf8(bytes).map_err(|e| TokenizerError::InvalidUtf8 {
            offset: e.valid_up_to(),
            reason: match e.error_len() {
                Some(n) => format!("{n} byte(s) that start no UTF-8 character"),
                None => "the input ends inside a multi-byte character".to_string(),
            },
        })?;
        self.encode(text)
    }

    /// The text of `ids`: the bytes their tokens stand for, with control and user-defined tokens
    /// written out; bytes that do not form UTF-8 (a token ending inside a character) show as U+FFFD.
    /// Ids outside the vocabulary show as `<id?>`.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut run: Vec<u32> = Vec::new();
        let flush = |run: &mut Vec<u32>, out: &mut String| {
            if !run.is_empty() {
                out.push_str(&self.inner.decode(run, false).unwrap_or_default());
                run.clear();
            }
        };
        for &id in ids {
            if (id as usize) < self.n_tokens {
                run.push(id);
            } else {
                flush(&mut run, &mut out);
                out.push_str(&format!("<{id}?>"));
            }
        }
        flush(&mut run, &mut out);
        out
    }
}

/// The `tokenizers` tokenizer of a byte-level BPE vocabulary with Qwen2's pre-tokenizer.
fn build(tokens: &[&str], merges: &[&str], types: &[i32]) -> Result<Tokenizer, TokenizerError> {
    let invalid = |reason: String| TokenizerError::Invalid { reason };
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token.to_string(), id as u32).is_some() {
            return Err(invalid(format!("token {token:?} appears twice (again at id {id})")));
        }
    }
    let pairs = merges
        .iter()
        .enumerate()
        .map(|(rank, m)| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(invalid(format!("merge {rank} ({m:?}) is not two tokens separated by a space"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .build()
        .map_err(|e| invalid(format!("the BPE model cannot be built: {e}")))?;
    let split =
        Split::new(SplitPattern::Regex(QWEN2_SPLIT.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| invalid(format!("Qwen2's split pattern does not compile: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let whole = |kind: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types)
            .filter(|(_, t)| **t == kind)
            .map(|(token, _)| AddedToken::from(token.to_string(), special))
            .collect()
    };
    tokenizer.add_special_tokens(&whole(token_type::CONTROL, true));
    tokenizer.add_tokens(&whole(token_type::USER_DEFINED, false));
    Ok(tokenizer)
}

fn string<'a>(file: &'a GgufFile, key: &'static str) -> Result<&'a str, TokenizerError> {
    file.get(key)
        .ok_or(TokenizerError::Missing { key })?
        .as_str()
        .ok_or(TokenizerError::WrongType { key, expected: "a string" })
}

fn strings<'a>(file: &'a GgufFile, key: &'static str) -> Result<Vec<&'a str>, TokenizerError> {
    let wrong = TokenizerError::WrongType { key, expected: "an array of strings" };
    let values = file.get(key).ok_or(TokenizerError::Missing { key })?.as_array().ok_or(wrong)?;
    values
        .iter()
        .map(|v| v.as_str().ok_or(TokenizerError::WrongType { key, expected: "an array of strings" }))
        .collect()
}

fn int_array(value: &GgufValue, key: &'static str) -> Result<Vec<i32>, TokenizerError> {
    let wrong = || TokenizerError::WrongType { key, expected: "an array of integers" };
    value
        .as_array()
        .ok_or_else(wrong)?
        .iter()
        .map(|v| match v {
            GgufValue::I32(i) => Ok(*i),
            other => other.as_u64().and_then(|u| i32::try_from(u).ok()).ok_or_else(wrong),
        })
        .collect()
}
