//! The model tokenizer built from GGUF metadata: Qwen3's vocabulary on a synthetic model against ids that
//! llama.cpp's tokenizer gives for the same strings on the same file (scripts/check_tokenizer.py compares
//! thousands more; docs/tokenizer.md has the run), refusal of invalid UTF-8, and the errors of files
//! without a usable tokenizer.

use std::sync::Arc;

use moe_engine::gguf::{GgufFile, GgufValue, GgufWriter};
use moe_engine::tokenizer::{ModelTokenizer, TokenizerError};

fn synth_tokenizer() -> ModelTokenizer {
    let weights = moe_engine::spec::load_model("synth:tiny").expect("synth:tiny builds");
    ModelTokenizer::from_gguf(&weights.file).expect("synthetic models carry Qwen3's tokenizer")
}

/// Ids from llama.cpp (llama-cpp-python 0.3.36, `Llama(vocab_only=True).tokenize(text, add_bos=True,
/// special=True)`) on `cargo moe-gate synth --model synth:tiny`: an independent implementation of the same
/// vocabulary, merges and split pattern.
const LLAMA_CPP_IDS: &[(&str, &[u32])] = &[
    ("Hello world", &[9707, 1879]),
    ("def fib(n):", &[750, 15801, 1445, 1648]),
    ("2+2=", &[17, 10, 17, 28]),
    ("<|im_start|>user\nhi<|im_end|>", &[151644, 872, 198, 6023, 151645]),
];

#[test]
fn qwen3_ids_match_llama_cpp() {
    let t = synth_tokenizer();
    for (text, want) in LLAMA_CPP_IDS {
        assert_eq!(t.encode(text).unwrap(), *want, "{text:?}");
    }
}

/// Byte-level BPE covers every byte, so decoding the ids of any text gives the text back, whatever the
/// script; digits are split one per token (Qwen2's `\p{N}` rule) and special tokens stay whole.
#[test]
fn decoding_inverts_encoding_and_digits_split_singly() {
    let t = synth_tokenizer();
    for text in ["你好，世界！", "👨‍👩‍👧‍👦 family", "  \t\n\r\n  x", "naïve café", "<think>\nok\n</think>"]
    {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids), text, "{ids:?}");
    }
    assert_eq!(t.encode("12345").unwrap().len(), 5);
    assert_eq!(t.encode("<think>").unwrap(), [151667]);
    assert_eq!(t.decode(&[200_000]), "<200000?>");
}

#[test]
fn invalid_utf8_is_refused_with_its_offset() {
    let t = synth_tokenizer();
    let e = t.encode_bytes(b"abc\xffdef").unwrap_err();
    assert!(matches!(e, TokenizerError::InvalidUtf8 { offset: 3, .. }), "{e:?}");
    assert!(e.to_string().contains("not valid UTF-8 (byte 3"), "{e}");
    let e = t.encode_bytes(b"ab\xe2\x82").unwrap_err();
    assert!(e.to_string().contains("ends inside a multi-byte character"), "{e}");
    assert_eq!(t.encode_bytes("ok é".as_bytes()).unwrap(), t.encode("ok é").unwrap());
}

fn file_with(meta: &[(&str, GgufValue)]) -> Arc<GgufFile> {
    let mut w = GgufWriter::new(32);
    for (k, v) in meta {
        w.add_metadata(k, v.clone());
    }
    let bytes = w.to_vec(|_, _| Ok(())).expect("a GGUF image without tensors");
    Arc::new(GgufFile::from_bytes(bytes).expect("it reads back"))
}

#[test]
fn files_without_a_usable_tokenizer_say_what_to_do() {
    let e = ModelTokenizer::from_gguf(&file_with(&[])).unwrap_err();
    assert!(
        e.to_string().contains("\"tokenizer.ggml.model\" is missing") && e.to_string().contains("`tokens`"),
        "{e}"
    );
    let e = ModelTokenizer::from_gguf(&file_with(&[
        ("tokenizer.ggml.model", GgufValue::from("llama")),
        ("tokenizer.ggml.pre", GgufValue::from("default")),
    ]))
    .unwrap_err();
    assert!(matches!(e, TokenizerError::Unsupported { .. }), "{e:?}");
    let strings = |v: &[&str]| GgufValue::Array(v.iter().map(|s| GgufValue::String(s.to_string())).collect());
    let e = ModelTokenizer::from_gguf(&file_with(&[
        ("tokenizer.ggml.model", GgufValue::from("gpt2")),
        ("tokenizer.ggml.pre", GgufValue::from("qwen2")),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "a"])),
        ("tokenizer.ggml.merges", strings(&[])),
    ]))
    .unwrap_err();
    assert!(e.to_string().contains("\"a\" appears twice"), "{e}");
}
