//! The tokenizer of every synthetic model: Qwen3's own (the Qwen team's byte-level BPE, Apache-2.0), so
//! text prompts tokenise on `synth:` models exactly as on the real Qwen3-MoE files, and llama.cpp and
//! other GGUF readers load synthetic models as they load real ones.
//!
//! The vocabulary and merges are in `qwen3_vocab/` (see its README for where they come from and how to
//! regenerate them). The metadata is what llama.cpp's converter writes for Qwen3: `model = "gpt2"`,
//! `pre = "qwen2"`; the 151 643 BPE tokens (type NORMAL); Qwen3's 26 added tokens at their ids, CONTROL
//! where the tokenizer marks them special or they are spelled `<|...|>`, USER_DEFINED otherwise (the
//! converter's rule); then `[PAD{id}]` entries (type UNUSED) up to the embedding table's size.

use crate::gguf::GgufValue;
use crate::tokenizer::token_type;

/// Qwen3's BPE tokens, one per line, by id.
const TOKENS: &str = include_str!("qwen3_vocab/tokens.txt");
/// Qwen3's merges, one `left right` pair per line, by rank.
const MERGES: &str = include_str!("qwen3_vocab/merges.txt");

/// Qwen3's added tokens from id [`BOS_ID`] on, and whether its tokenizer marks each special.
const ADDED: [(&str, bool); 26] = [
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<|object_ref_start|>", true),
    ("<|object_ref_end|>", true),
    ("<|box_start|>", true),
    ("<|box_end|>", true),
    ("<|quad_start|>", true),
    ("<|quad_end|>", true),
    ("<|vision_start|>", true),
    ("<|vision_end|>", true),
    ("<|vision_pad|>", true),
    ("<|image_pad|>", true),
    ("<|video_pad|>", true),
    ("<tool_call>", false),
    ("</tool_call>", false),
    ("<|fim_prefix|>", false),
    ("<|fim_middle|>", false),
    ("<|fim_suffix|>", false),
    ("<|fim_pad|>", false),
    ("<|repo_name|>", false),
    ("<|file_sep|>", false),
    ("<tool_response>", false),
    ("</tool_response>", false),
    ("<think>", false),
    ("</think>", false),
];

/// Qwen's `<|endoftext|>`: beginning-of-sequence and padding id (the first added token).
pub const BOS_ID: u32 = 151_643;
/// Qwen's `<|im_end|>`: end-of-sequence id.
pub const EOS_ID: u32 = 151_645;

/// The `tokenizer.ggml.*` metadata of a vocabulary of `vocab` ids. Every preset has Qwen3's 151 936;
/// a smaller `vocab` keeps the first `vocab` entries (the BPE stays whole down to 151 643).
pub fn metadata(vocab: usize) -> Vec<(&'static str, GgufValue)> {
    let (tokens, types) = tokens(vocab);
    vec![
        ("tokenizer.ggml.model", GgufValue::from("gpt2")),
        ("tokenizer.ggml.pre", GgufValue::from("qwen2")),
        (
            "tokenizer.ggml.merges",
            GgufValue::Array(MERGES.lines().map(|m| GgufValue::String(m.to_owned())).collect()),
        ),
        ("tokenizer.ggml.tokens", GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect())),
        ("tokenizer.ggml.token_type", GgufValue::Array(types.into_iter().map(GgufValue::I32).collect())),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(BOS_ID)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(EOS_ID)),
        ("tokenizer.ggml.padding_token_id", GgufValue::U32(BOS_ID)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
    ]
}

/// The token strings and llama.cpp token types, by id.
fn tokens(vocab: usize) -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = TOKENS.lines().map(str::to_owned).collect();
    let mut types = vec![token_type::NORMAL; tokens.len()];
    for (text, special) in ADDED {
        let looks_special = text.starts_with("<|") && text.ends_with("|>");
        types.push(if special || looks_special { token_type::CONTROL } else { token_type::USER_DEFINED });
        tokens.push(text.to_owned());
    }
    for id in tokens.len()..vocab {
        tokens.push(format!("[PAD{id}]"));
        types.push(token_type::UNUSED);
    }
    tokens.truncate(vocab);
    types.truncate(vocab);
    (tokens, types)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    /// The files hold Qwen3's 151 643 BPE tokens and 151 387 merges; every token string is distinct
    /// (llama.cpp maps strings back to ids), every merge joins two tokens into a token of the vocabulary,
    /// and the added tokens sit at Qwen3's ids.
    #[test]
    fn vocabulary_is_qwen3s_and_a_consistent_bpe() {
        let vocab = crate::synth::preset::QWEN3_VOCAB;
        let (tokens, types) = tokens(vocab);
        assert_eq!((tokens.len(), types.len()), (vocab, vocab));
        assert_eq!(TOKENS.lines().count(), BOS_ID as usize);
        assert_eq!(MERGES.lines().count(), 151_387);
        let distinct: HashSet<&str> = tokens.iter().map(String::as_str).collect();
        assert_eq!(distinct.len(), vocab);
        let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        for (rank, merge) in MERGES.lines().enumerate() {
            let (left, right) = merge.split_once(' ').expect("merge has two parts");
            let joined = format!("{left}{right}");
            assert!(index.contains_key(left) && index.contains_key(right), "merge {rank}: {merge:?}");
            assert!(index[joined.as_str()] < BOS_ID as usize, "merge {rank} forms no BPE token");
        }
        assert_eq!(tokens[BOS_ID as usize], "<|endoftext|>");
        assert_eq!(tokens[EOS_ID as usize], "<|im_end|>");
        assert_eq!((tokens[151_667].as_str(), types[151_667]), ("<think>", token_type::USER_DEFINED));
        assert_eq!((tokens[151_659].as_str(), types[151_659]), ("<|fim_prefix|>", token_type::CONTROL));
        assert_eq!((tokens[151_669].as_str(), types[151_669]), ("[PAD151669]", token_type::UNUSED));
        // GPT-2's byte map: ids 0..94 are the printable ASCII bytes '!'..'~' as themselves; the space
        // byte is spelled 'Ġ' (U+0120), id 220 in Qwen's vocabulary.
        assert_eq!((tokens[0].as_str(), tokens[93].as_str(), tokens[220].as_str()), ("!", "~", "Ġ"));
    }
}
