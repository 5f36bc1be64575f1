//! A minimal byte-level BPE vocabulary of Qwen3's size, so llama.cpp and other GGUF readers load
//! synthetic models as they load real ones (`tokenizer.ggml.model = "gpt2"`, as the reference fixtures
//! carry it).
//!
//! Tokens `0..256` are the 256 bytes in GPT-2's byte-to-unicode spelling; then two-symbol tokens, then
//! three-symbol tokens (a two-symbol token followed by a byte), each with the merge that forms it, in
//! rank order; then Qwen's special tokens at Qwen's ids (`<|endoftext|>` 151643, `<|im_start|>` 151644,
//! `<|im_end|>` 151645) and unique padding tokens up to the vocabulary size. Every token string is
//! unique, and every merge joins two earlier tokens into a later one.

use crate::gguf::GgufValue;

/// llama.cpp's token type of an ordinary token (`LLAMA_TOKEN_TYPE_NORMAL`).
const TOKEN_NORMAL: i32 = 1;
/// llama.cpp's token type of a special token (`LLAMA_TOKEN_TYPE_CONTROL`).
const TOKEN_CONTROL: i32 = 3;

/// Qwen's `<|endoftext|>`: beginning-of-sequence and padding id.
pub const BOS_ID: u32 = 151_643;
/// Qwen's `<|im_end|>`: end-of-sequence id.
pub const EOS_ID: u32 = 151_645;

/// The `tokenizer.ggml.*` metadata of a vocabulary of `vocab` tokens (`vocab` > 151 645).
pub fn metadata(vocab: usize) -> Vec<(&'static str, GgufValue)> {
    let tokens = tokens(vocab);
    let types = (0..vocab)
        .map(|id| GgufValue::I32(if id >= BOS_ID as usize { TOKEN_CONTROL } else { TOKEN_NORMAL }))
        .collect();
    vec![
        ("tokenizer.ggml.model", GgufValue::from("gpt2")),
        ("tokenizer.ggml.pre", GgufValue::from("qwen2")),
        (
            "tokenizer.ggml.merges",
            GgufValue::Array(merges(vocab).into_iter().map(GgufValue::String).collect()),
        ),
        ("tokenizer.ggml.tokens", GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect())),
        ("tokenizer.ggml.token_type", GgufValue::Array(types)),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(BOS_ID)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(EOS_ID)),
        ("tokenizer.ggml.padding_token_id", GgufValue::U32(BOS_ID)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
    ]
}

/// The token strings, by id.
fn tokens(vocab: usize) -> Vec<String> {
    let symbols = byte_symbols();
    let merged = BOS_ID as usize - 256;
    let mut out: Vec<String> = symbols.iter().map(char::to_string).collect();
    out.extend((0..merged).map(|j| {
        let (left, right) = merge_parts(&symbols, j);
        left + &right
    }));
    out.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(str::to_owned));
    out.extend((out.len()..vocab).map(|id| format!("[PAD{id}]")));
    out.truncate(vocab);
    out
}

/// The merges, by rank: merge `j` forms token `256 + j`.
fn merges(vocab: usize) -> Vec<String> {
    let symbols = byte_symbols();
    let merged = (BOS_ID as usize - 256).min(vocab.saturating_sub(256));
    (0..merged)
        .map(|j| {
            let (left, right) = merge_parts(&symbols, j);
            format!("{left} {right}")
        })
        .collect()
}

/// The two parts merge `j` joins: for `j < 65536` two bytes; after that a two-symbol token (the first
/// ones, in order) and a byte.
fn merge_parts(symbols: &[char; 256], j: usize) -> (String, String) {
    if j < 256 * 256 {
        (symbols[j / 256].to_string(), symbols[j % 256].to_string())
    } else {
        let k = j - 256 * 256;
        let pair = k / 256;
        let left: String = [symbols[pair / 256], symbols[pair % 256]].iter().collect();
        (left, symbols[k % 256].to_string())
    }
}

/// GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for themselves, the others for the
/// code points from U+0100 on, in byte order. No symbol is a space, so merges can be space-separated.
fn byte_symbols() -> [char; 256] {
    let printable =
        |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 0x100u32;
    std::array::from_fn(|b| {
        let b = b as u32;
        if printable(b) {
            char::from_u32(b).unwrap_or('?')
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('?')
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Every token string is distinct (llama.cpp maps strings back to ids) and every merge joins two
    /// existing tokens into the next one.
    #[test]
    fn vocabulary_is_a_consistent_bpe() {
        let vocab = 151_936;
        let tokens = tokens(vocab);
        assert_eq!(tokens.len(), vocab);
        let distinct: HashSet<&str> = tokens.iter().map(String::as_str).collect();
        assert_eq!(distinct.len(), vocab);
        let index: std::collections::HashMap<&str, usize> =
            tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        for (rank, merge) in merges(vocab).iter().enumerate() {
            let (left, right) = merge.split_once(' ').expect("merge has two parts");
            assert!(index[left] < 256 + rank && index[right] < 256 + rank, "merge {rank} uses a later token");
            assert_eq!(index[format!("{left}{right}").as_str()], 256 + rank);
        }
        assert_eq!(tokens[BOS_ID as usize], "<|endoftext|>");
        assert_eq!(tokens[EOS_ID as usize], "<|im_end|>");
        // GPT-2's map: byte 0x21 '!' stands for itself, byte 0 for U+0100, space (0x20) for U+0120 'Ġ'.
        assert_eq!((tokens[0x21].as_str(), tokens[0].as_str(), tokens[0x20].as_str()), ("!", "\u{100}", "Ġ"));
    }
}
