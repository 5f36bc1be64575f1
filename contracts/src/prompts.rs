//! Prompt sets and their expansion (docs/contracts.md, issue 4 item 3: "seeded generated sets (count, length
//! range, seed)").
//!
//! A generated set must give the same tokens on every platform, thread count and dependency version,
//! or two machines would judge different prompts. So the stream is ChaCha8 (RFC 7539's block function
//! with 8 rounds, as `rand_chacha` implements it) keyed by the seed's little-endian bytes, and ranges
//! are drawn with our own unbiased integer rule below instead of `rand`'s samplers, whose algorithms
//! have changed between releases and depend on the width of `usize`.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::schema::{Contract, OnlyOn, Prompt, PromptSet, QWEN3_VOCAB};

/// The tokens of a generated set: `count` prompts, lengths uniform in `min_len..=max_len`, tokens
/// uniform below `vocab`. Lengths and tokens come from one stream in order (length, then its tokens).
pub fn generate_prompts(
    count: usize,
    min_len: usize,
    max_len: usize,
    seed: u64,
    vocab: u32,
) -> Vec<Vec<u32>> {
    let mut rng = stream(seed);
    let span = (max_len.saturating_sub(min_len) as u64) + 1;
    (0..count)
        .map(|_| {
            let len = min_len + uniform_below(&mut rng, span) as usize;
            (0..len).map(|_| uniform_below(&mut rng, u64::from(vocab.max(1))) as u32).collect()
        })
        .collect()
}

/// The token count of each prompt of a generated set, exactly as [`generate_prompts`] draws them (the
/// same stream, every token drawn and dropped), without holding the tokens.
pub fn generated_lengths(count: usize, min_len: usize, max_len: usize, seed: u64, vocab: u32) -> Vec<usize> {
    let mut rng = stream(seed);
    let span = (max_len.saturating_sub(min_len) as u64) + 1;
    (0..count)
        .map(|_| {
            let len = min_len + uniform_below(&mut rng, span) as usize;
            for _ in 0..len {
                uniform_below(&mut rng, u64::from(vocab.max(1)));
            }
            len
        })
        .collect()
}

/// The id of prompt `index` of a generated set of `count`: `{set}_{NN}`, zero-padded to at least two
/// digits and to the width of the largest index, so ids sort in order.
pub fn generated_id(set: &str, index: usize, count: usize) -> String {
    let width = count.saturating_sub(1).to_string().len().max(2);
    format!("{set}_{index:0width$}")
}

/// Whether `prompt` is the id of one of the `count` prompts of generated set `set` (as
/// [`generated_id`] names them), decided without listing them.
pub(crate) fn is_generated_id(set: &str, count: usize, prompt: &str) -> bool {
    let Some(index) = prompt.strip_prefix(set).and_then(|rest| rest.strip_prefix('_')) else { return false };
    index.bytes().all(|b| b.is_ascii_digit())
        && index.parse::<usize>().is_ok_and(|i| i < count && generated_id(set, i, count) == prompt)
}

/// ChaCha8 keyed by the seed: key bytes 0..8 = `seed` little-endian, the rest zero; nonce and counter 0.
fn stream(seed: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// A uniform integer in `0..n` (n >= 1) by Lemire's multiply-and-reject: the high word of `x * n` is
/// uniform once the low words below `2^64 mod n` are rejected.
fn uniform_below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let reject_below = n.wrapping_neg() % n;
    loop {
        let wide = u128::from(rng.next_u64()) * u128::from(n);
        if (wide as u64) >= reject_below {
            return (wide >> 64) as u64;
        }
    }
}

/// A text prompt that could not be tokenised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prompt `{prompt}` cannot be tokenised: {reason}")]
pub struct TextPromptError {
    /// The prompt id.
    pub prompt: String,
    /// Why.
    pub reason: String,
}

impl PromptSet {
    /// The prompts of this set.
    pub fn expand(&self) -> Vec<Prompt> {
        match self {
            PromptSet::Explicit { id, tokens, .. } => vec![Prompt { id: id.clone(), tokens: tokens.clone() }],
            PromptSet::Text { id, tokens, .. } => {
                vec![Prompt { id: id.clone(), tokens: tokens.clone().unwrap_or_default() }]
            }
            PromptSet::Generated { id, count, min_len, max_len, seed, vocab, .. } => {
                generate_prompts(*count, *min_len, *max_len, *seed, vocab.unwrap_or(QWEN3_VOCAB))
                    .into_iter()
                    .enumerate()
                    .map(|(i, tokens)| Prompt { id: generated_id(id, i, *count), tokens })
                    .collect()
            }
        }
    }
}

impl PromptSet {
    /// The ids of this set's prompts, in order, without generating any token.
    pub fn ids(&self) -> Vec<String> {
        match self {
            PromptSet::Explicit { id, .. } | PromptSet::Text { id, .. } => vec![id.clone()],
            PromptSet::Generated { id, count, .. } => {
                (0..*count).map(|i| generated_id(id, i, *count)).collect()
            }
        }
    }

    /// How many prompts this set holds.
    pub fn count(&self) -> usize {
        match self {
            PromptSet::Generated { count, .. } => *count,
            _ => 1,
        }
    }

    /// The fewest and the most tokens any prompt of this set has, known without drawing a generated
    /// set's stream (a text prompt not yet tokenised has none).
    pub fn length_bounds(&self) -> (usize, usize) {
        match self {
            PromptSet::Explicit { tokens, .. } => (tokens.len(), tokens.len()),
            PromptSet::Text { tokens, .. } => {
                let n = tokens.as_ref().map_or(0, Vec::len);
                (n, n)
            }
            PromptSet::Generated { min_len, max_len, .. } => (*min_len, *max_len),
        }
    }

    /// Each prompt's token count, in order: what [`PromptSet::expand`] gives, without holding the tokens.
    pub fn lengths(&self) -> Vec<usize> {
        match self {
            PromptSet::Generated { count, min_len, max_len, .. } if min_len == max_len => {
                vec![*min_len; *count]
            }
            PromptSet::Generated { count, min_len, max_len, seed, vocab, .. } => {
                generated_lengths(*count, *min_len, *max_len, *seed, vocab.unwrap_or(QWEN3_VOCAB))
            }
            _ => vec![self.length_bounds().0],
        }
    }
}

impl Contract {
    /// The id of every prompt of every set, in file order, without generating any token.
    pub fn prompt_ids(&self) -> Vec<String> {
        self.prompts.iter().flat_map(PromptSet::ids).collect()
    }

    /// Every prompt of every set, in file order.
    pub fn expand_prompts(&self) -> Vec<Prompt> {
        self.prompts.iter().flat_map(PromptSet::expand).collect()
    }

    /// Whether any prompt is written as text (then the model's tokenizer is needed).
    pub fn has_text_prompts(&self) -> bool {
        self.prompts.iter().any(|s| matches!(s, PromptSet::Text { .. }))
    }

    /// The contract with every text prompt tokenised by `encode` (the tokenizer of the model the gate
    /// runs). An error names the prompt; a text that gives no tokens is refused.
    pub fn tokenize_text<E: std::fmt::Display>(
        &self,
        mut encode: impl FnMut(&str) -> Result<Vec<u32>, E>,
    ) -> Result<Contract, TextPromptError> {
        let mut out = self.clone();
        for set in &mut out.prompts {
            if let PromptSet::Text { id, text, tokens, .. } = set {
                let ids = encode(text)
                    .map_err(|e| TextPromptError { prompt: id.clone(), reason: e.to_string() })?;
                if ids.is_empty() {
                    return Err(TextPromptError {
                        prompt: id.clone(),
                        reason: "the text gives no tokens; write at least one character".into(),
                    });
                }
                *tokens = Some(ids);
            }
        }
        Ok(out)
    }

    /// The text of prompt `id`, where it is written as text.
    pub fn prompt_text(&self, id: &str) -> Option<&str> {
        self.prompts.iter().find_map(|s| match s {
            PromptSet::Text { id: own, text, .. } if own == id => Some(text.as_str()),
            _ => None,
        })
    }

    /// Whether `model_spec` is this contract's smoke model (sets with `only_on: model` skip it).
    pub fn is_smoke_model(&self, model_spec: &str) -> bool {
        model_spec == self.smoke_model
    }

    /// The contract as it applies to `model_spec` (the model the gate resolved): prompt sets marked
    /// `only_on: model` are dropped when it is the smoke model, and so are the criteria's references to
    /// them (a criterion left with no prompt has no trials). Call it before planning.
    pub fn for_model(&self, model_spec: &str) -> Contract {
        let mut out = self.clone();
        if !self.is_smoke_model(model_spec) {
            return out;
        }
        out.prompts.retain(|set| set.only_on() != Some(OnlyOn::Model));
        let kept = out.prompt_ids();
        let still_exists =
            |name: &String| out.prompts.iter().any(|s| s.id() == name) || kept.iter().any(|p| p == name);
        let criteria = out
            .criteria
            .iter()
            .cloned()
            .map(|mut c| {
                if let Some(names) = &mut c.prompts {
                    names.retain(|n| still_exists(n));
                }
                c
            })
            .collect();
        out.criteria = criteria;
        out
    }

    /// The prompts a criterion applies to, in file order, each with the id of its set and its token
    /// count (no token is kept: planning needs only how many there are).
    pub(crate) fn prompts_of(&self, criterion: &crate::Criterion) -> Vec<(String, String, usize)> {
        let mut out = Vec::new();
        for set in &self.prompts {
            let whole = criterion.selects(set.id());
            let ids: Vec<(usize, String)> =
                set.ids().into_iter().enumerate().filter(|(_, id)| whole || criterion.selects(id)).collect();
            if ids.is_empty() {
                continue; // a generated set none of whose prompts is selected: its stream is not drawn
            }
            let lengths = set.lengths();
            out.extend(ids.into_iter().map(|(i, id)| (set.id().to_string(), id, lengths[i])));
        }
        out
    }

    /// The ids of the prompts a criterion applies to, in file order (no token generated).
    pub(crate) fn prompt_ids_of(&self, criterion: &crate::Criterion) -> Vec<String> {
        let mut out = Vec::new();
        for set in &self.prompts {
            let whole = criterion.selects(set.id());
            out.extend(set.ids().into_iter().filter(|id| whole || criterion.selects(id)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_tokens_stay_in_range() {
        let prompts = generate_prompts(200, 3, 9, 42, 1000);
        assert_eq!(prompts.len(), 200);
        assert!(prompts.iter().all(|p| (3..=9).contains(&p.len())));
        assert!(prompts.iter().flatten().all(|&t| t < 1000));
        // With 200 draws over 7 lengths, each length appears (a missing one has probability < 1e-12).
        for len in 3..=9 {
            assert!(prompts.iter().any(|p| p.len() == len), "length {len} never drawn");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_prompts_and_another_seed_others() {
        assert_eq!(generate_prompts(5, 1, 64, 7, QWEN3_VOCAB), generate_prompts(5, 1, 64, 7, QWEN3_VOCAB));
        assert_ne!(generate_prompts(5, 1, 64, 7, QWEN3_VOCAB), generate_prompts(5, 1, 64, 8, QWEN3_VOCAB));
    }

    /// Pins the stream: if this changes, every generated prompt of every contract changed, and the
    /// contracts' versions must say so. The values were produced by this code with rand_chacha 0.9.
    #[test]
    fn generated_prompts_are_pinned() {
        let prompts = generate_prompts(2, 1, 8, 20261129, QWEN3_VOCAB);
        assert_eq!(prompts, PINNED_PROMPTS.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
    }

    const PINNED_PROMPTS: [&[u32]; 2] =
        [&[149509, 76393, 144060, 6583, 11301, 63402, 72360, 126703], &[134232, 60872, 142449, 17532, 82607]];

    /// The stream is the ChaCha block function with 8 rounds (RFC 7539 §2.3 with 4 double rounds
    /// instead of 10), key = the seed, counter and nonce 0: checked against that definition written out
    /// here, so the prompts depend on a specification, not on a crate's choices.
    #[test]
    fn the_stream_is_the_chacha8_block_function() {
        let seed = 0x0123_4567_89ab_cdefu64;
        let mut state = [0u32; 16];
        state[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
        state[4] = seed as u32;
        state[5] = (seed >> 32) as u32;
        let mut x = state;
        let quarter = |x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize| {
            x[a] = x[a].wrapping_add(x[b]);
            x[d] = (x[d] ^ x[a]).rotate_left(16);
            x[c] = x[c].wrapping_add(x[d]);
            x[b] = (x[b] ^ x[c]).rotate_left(12);
            x[a] = x[a].wrapping_add(x[b]);
            x[d] = (x[d] ^ x[a]).rotate_left(8);
            x[c] = x[c].wrapping_add(x[d]);
            x[b] = (x[b] ^ x[c]).rotate_left(7);
        };
        for _ in 0..4 {
            quarter(&mut x, 0, 4, 8, 12);
            quarter(&mut x, 1, 5, 9, 13);
            quarter(&mut x, 2, 6, 10, 14);
            quarter(&mut x, 3, 7, 11, 15);
            quarter(&mut x, 0, 5, 10, 15);
            quarter(&mut x, 1, 6, 11, 12);
            quarter(&mut x, 2, 7, 8, 13);
            quarter(&mut x, 3, 4, 9, 14);
        }
        let block: Vec<u32> = x.iter().zip(&state).map(|(a, b)| a.wrapping_add(*b)).collect();
        let mut rng = stream(seed);
        let words: Vec<u32> = (0..16).map(|_| rng.next_u32()).collect();
        assert_eq!(words, block);
    }

    #[test]
    fn ids_and_lengths_are_the_expanded_prompts_without_their_tokens() {
        let set = PromptSet::Generated {
            id: "gen".into(),
            count: 150,
            min_len: 1,
            max_len: 40,
            seed: 9,
            vocab: Some(1000),
            only_on: None,
        };
        let expanded = set.expand();
        assert_eq!(set.ids(), expanded.iter().map(|p| p.id.clone()).collect::<Vec<_>>());
        assert_eq!(set.lengths(), expanded.iter().map(|p| p.tokens.len()).collect::<Vec<_>>());
        assert_eq!((set.count(), set.length_bounds()), (150, (1, 40)));
        assert!(is_generated_id("gen", 150, "gen_007") && is_generated_id("gen", 150, "gen_149"));
        for other in ["gen_150", "gen_07", "gen_0007", "gen_", "gen", "gen_+07", "ge_007", "gen_-01"] {
            assert!(!is_generated_id("gen", 150, other), "{other}");
        }
        let fixed = PromptSet::Generated {
            id: "fixed".into(),
            count: 150,
            min_len: 7,
            max_len: 7,
            seed: 9,
            vocab: None,
            only_on: None,
        };
        assert_eq!(fixed.lengths(), vec![7; 150]);
    }

    #[test]
    fn a_fixed_length_is_honoured() {
        assert!(generate_prompts(10, 5, 5, 1, 10).iter().all(|p| p.len() == 5));
    }

    #[test]
    fn uniform_below_is_unbiased_on_a_small_range() {
        // 60_000 draws over 3 values: each count is 20_000 +- 3 sigma (sigma = 115).
        let mut rng = stream(3);
        let mut counts = [0usize; 3];
        for _ in 0..60_000 {
            counts[uniform_below(&mut rng, 3) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c.abs_diff(20_000) < 350), "{counts:?}");
    }

    #[test]
    fn generated_ids_are_zero_padded() {
        assert_eq!(generated_id("gen", 3, 60), "gen_03");
        assert_eq!(generated_id("gen", 7, 150), "gen_007");
        assert_eq!(generated_id("gen", 0, 1), "gen_00");
    }
}
