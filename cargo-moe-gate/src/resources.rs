//! What a gate run will need, checked before any forward runs: the recorded traces are all held in
//! memory until every trial is judged, so a contract whose prompts, greedy steps or model would not fit
//! is refused up front with the estimate (exit 2), rather than swapping or being killed hours in.

use moe_engine::config::ModelConfig;

use crate::error::GateError;
use crate::record::RunJob;

/// Bytes of one recorded value: traces hold every float as f64 whatever the backend computed in.
const VALUE_BYTES: u128 = 8;
/// Bytes of one recorded expert id.
const EXPERT_ID_BYTES: u128 = 4;
/// Values kept per greedy decode step: the chosen token and the top five.
const GREEDY_VALUES_PER_STEP: u128 = 6;

/// The memory a run's recordings take, from the jobs it will run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Forwards (one per run and prompt).
    pub forwards: usize,
    /// Prompt tokens over all forwards.
    pub tokens: u128,
    /// Bytes of every trace and greedy decode, all held until evaluation.
    pub bytes: u128,
}

/// The recordings of `jobs` on a model of configuration `c`: per prompt token, each layer's residual
/// stream (`hidden`), router logits (`n_expert`), chosen experts and their weights (`k` each), and the
/// logits (`vocab`).
pub fn estimate(jobs: &[RunJob], c: &ModelConfig) -> Estimate {
    let per_layer = (c.hidden as u128 + c.n_expert as u128 + c.n_expert_used as u128) * VALUE_BYTES
        + c.n_expert_used as u128 * EXPERT_ID_BYTES;
    let per_token = c.n_layer as u128 * per_layer + c.vocab as u128 * VALUE_BYTES;
    let mut out = Estimate { forwards: 0, tokens: 0, bytes: 0 };
    for job in jobs {
        for (prompt, steps) in &job.prompts {
            let tokens = prompt.tokens.len() as u128;
            out.forwards += 1;
            out.tokens += tokens;
            out.bytes += tokens * per_token + *steps as u128 * GREEDY_VALUES_PER_STEP * VALUE_BYTES;
        }
    }
    out
}

/// Refuses the run when its recordings alone need more memory than the machine has available now
/// (`MemAvailable` of /proc/meminfo; where that cannot be read the check is skipped, and says so).
pub fn check(jobs: &[RunJob], c: &ModelConfig) -> Result<Estimate, GateError> {
    let e = estimate(jobs, c);
    match available_memory() {
        Some(available) if e.bytes > available => Err(GateError::Resources {
            detail: format!(
                "the contract's {} forwards ({} prompt tokens on a model of {} layers and vocabulary {}) \
                 record {} of traces, all held until the trials are judged, and this machine has {} \
                 available",
                e.forwards,
                e.tokens,
                c.n_layer,
                c.vocab,
                gib(e.bytes),
                gib(available)
            ),
            shards: e.bytes.div_ceil(available.max(1)),
        }),
        Some(_) => Ok(e),
        None => {
            eprintln!(
                "moe-gate: cannot read the available memory (/proc/meminfo); the run's traces need {}",
                gib(e.bytes)
            );
            Ok(e)
        }
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn available_memory() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u128> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes in GiB for messages.
fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use moe_contracts::Prompt;
    use moe_engine::backend::{BackendKind, Policy};

    use super::*;

    fn job(prompts: &[(usize, usize)]) -> RunJob {
        RunJob {
            run: "cpu".into(),
            backend: BackendKind::Cpu,
            policy: Policy::Fast,
            sub_layer_taps: false,
            prompts: prompts
                .iter()
                .enumerate()
                .map(|(i, &(len, steps))| (Prompt { id: format!("p{i}"), tokens: vec![1; len] }, steps))
                .collect(),
        }
    }

    #[test]
    fn the_estimate_counts_every_recorded_value() {
        let tiny = moe_engine::synth::Preset::Tiny.config();
        // Per token: 4 layers x ((256 hidden + 16 logits + 4 weights) x 8 + 4 ids x 4) + 151936 x 8.
        let per_token = 4 * ((256 + 16 + 4) * 8 + 4 * 4) + 151_936 * 8;
        let e = estimate(&[job(&[(3, 0), (5, 2)])], &tiny);
        assert_eq!(e.forwards, 2);
        assert_eq!(e.tokens, 8);
        assert_eq!(e.bytes, 8 * per_token + 2 * 6 * 8);
    }

    #[test]
    fn ten_thousand_long_prompts_on_the_smoke_model_are_refused_with_the_estimate() {
        // The example: 10,000 prompts of 4096 tokens on synth:tiny record 4.1e7 tokens x 1.22 MB
        // (the per-token bytes above) = 46706.5 GiB of traces, more than any machine this runs on has.
        let tiny = moe_engine::synth::Preset::Tiny.config();
        let prompts = vec![(4096, 0); 10_000];
        let message = check(&[job(&prompts)], &tiny).unwrap_err().to_string();
        assert!(message.contains("10000 forwards (40960000 prompt tokens"), "{message}");
        assert!(message.contains("record 46706.5 GiB of traces"), "{message}");
        assert!(message.contains("--partition"), "{message}");
    }

    #[test]
    fn mem_available_is_read_in_kib() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }
}
