//! What a gate run will need, checked before any forward runs: the recorded traces are all held in
//! memory until every trial is judged, so a contract whose prompts, greedy steps or model would not fit
//! is refused up front with the estimate (exit 2), rather than swapping or being killed hours in.

use moe_contracts::{Contract, PromptDemand};
use moe_engine::config::ModelConfig;

use crate::error::GateError;
use crate::partition::Partition;
use crate::record::RunJob;

/// Bytes of one recorded value: traces hold every float as f64 whatever the backend computed in.
const VALUE_BYTES: u128 = 8;
/// Bytes of one recorded expert id.
const EXPERT_ID_BYTES: u128 = 4;
/// Values kept per greedy decode step: the chosen token and the top five.
const GREEDY_VALUES_PER_STEP: u128 = 6;
/// Bytes a planned trial holds through the run, about: its plan (name, ids, runs), selection, status and
/// outcome. Counted before planning, where a contract of many positions or layers would otherwise
/// allocate its plan before any estimate ran.
const TRIAL_BYTES: u128 = 512;

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

/// Bytes of the recording of one prompt token: each layer's residual stream (`hidden`), router logits
/// (`n_expert`), chosen experts and their weights (`k` each), and the logits (`vocab`).
fn bytes_per_token(c: &ModelConfig) -> u128 {
    let per_layer = (c.hidden as u128 + c.n_expert as u128 + c.n_expert_used as u128) * VALUE_BYTES
        + c.n_expert_used as u128 * EXPERT_ID_BYTES;
    c.n_layer as u128 * per_layer + c.vocab as u128 * VALUE_BYTES
}

/// Bytes of the greedy decoding of `steps` steps.
fn greedy_bytes(steps: usize) -> u128 {
    steps as u128 * GREEDY_VALUES_PER_STEP * VALUE_BYTES
}

/// The recordings of `jobs` on a model of configuration `c`: every prompt token
/// ([`bytes_per_token`]) and greedy step of every forward.
pub fn estimate(jobs: &[RunJob], c: &ModelConfig) -> Estimate {
    let per_token = bytes_per_token(c);
    let mut out = Estimate { forwards: 0, tokens: 0, bytes: 0 };
    for job in jobs {
        for (prompt, steps) in &job.prompts {
            let tokens = prompt.tokens.len() as u128;
            out.forwards += 1;
            out.tokens += tokens;
            out.bytes += tokens * per_token + greedy_bytes(*steps);
        }
    }
    out
}

/// Refuses the run when its recordings alone need more memory than the machine has available now
/// (`MemAvailable` of /proc/meminfo; where that cannot be read the check is skipped, and says so).
/// This is the exact check of the forwards the selected trials need, after planning; [`check_contract`]
/// runs before it.
pub fn check(jobs: &[RunJob], c: &ModelConfig) -> Result<Estimate, GateError> {
    let e = estimate(jobs, c);
    match available_memory() {
        Some(available) if e.bytes > available => Err(refusal(&e, 0, c, available, true)),
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

/// The bounds of what a contract's run needs, measured before anything is generated or planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContractEstimate {
    /// With every generated prompt at its set's `min_len`.
    pub least: Estimate,
    /// With every generated prompt at its set's `max_len`.
    pub most: Estimate,
    /// Trials the plan will hold, at the least and the most.
    pub trials: (u128, u128),
}

/// What the run of `contract` (as resolved for the model, and cut to `partition`) needs on a model of
/// configuration `c`, counting the criteria `counted` keeps (the gate leaves out those needing CUDA where
/// there is none): its recordings as [`estimate`] counts them, and [`TRIAL_BYTES`] per planned trial.
/// Bounds only: a generated set's lengths are not drawn.
pub fn estimate_contract(
    contract: &Contract,
    c: &ModelConfig,
    partition: Option<Partition>,
    counted: impl Fn(&moe_contracts::Criterion) -> bool,
) -> ContractEstimate {
    let demand = owned(contract.demand(c.n_layer, counted), partition);
    let sum = |len: fn(&PromptDemand) -> usize| {
        let mut e = Estimate { forwards: 0, tokens: 0, bytes: 0 };
        let mut trials = 0u128;
        for d in &demand {
            let (bytes, t) = prompt_bytes(d, len(d), c);
            e.forwards += d.runs.len();
            e.tokens += (len(d) * d.runs.len()) as u128;
            e.bytes += bytes;
            trials += t;
        }
        (e, trials)
    };
    let (least, fewest) = sum(|d| d.min_len);
    let (most, most_trials) = sum(|d| d.max_len);
    ContractEstimate { least, most, trials: (fewest, most_trials) }
}

/// The prompts of `partition` (all without one): `--partition` deals prompts out by their place.
fn owned(demand: Vec<PromptDemand>, partition: Option<Partition>) -> Vec<PromptDemand> {
    match partition {
        None => demand,
        Some(p) => demand.into_iter().enumerate().filter(|(i, _)| p.owns(Some(*i))).map(|(_, d)| d).collect(),
    }
}

/// The bytes (recordings and planned trials) and trials of prompt `d` at `len` tokens.
fn prompt_bytes(d: &PromptDemand, len: usize, c: &ModelConfig) -> (u128, u128) {
    let len = len as u128;
    let recordings: u128 = d.runs.values().map(|&steps| len * bytes_per_token(c) + greedy_bytes(steps)).sum();
    let trials = d.trials as u128 + d.trials_per_token as u128 * len;
    (recordings + trials * TRIAL_BYTES, trials)
}

/// Whether a criterion reads a run on the CUDA backend (its trials are ignored where CUDA is unusable).
pub fn needs_cuda(contract: &Contract, criterion: &moe_contracts::Criterion) -> bool {
    let cuda =
        |run: &str| contract.runs.get(run).is_some_and(|s| s.backend == moe_contracts::BackendKind::Cuda);
    criterion.compare.iter().any(|r| cuda(r)) || criterion.metric_reference().is_some_and(cuda)
}

/// The check of [`check`], run before the contract's prompts are generated and its trials planned, so
/// that a contract too large for the machine is refused before it is built in memory: refused when even
/// the least it needs exceeds `available` (bytes; the machine's available memory in the gate), passed
/// when the most fits, and otherwise decided on the exact lengths of the generated prompts (drawn from
/// their streams without keeping the tokens).
pub fn check_contract_within(
    contract: &Contract,
    c: &ModelConfig,
    partition: Option<Partition>,
    counted: impl Fn(&moe_contracts::Criterion) -> bool + Copy,
    available: u128,
) -> Result<(), GateError> {
    let bounds = estimate_contract(contract, c, partition, counted);
    if bounds.least.bytes > available {
        let exact = bounds.least == bounds.most;
        return Err(refusal(&bounds.least, bounds.trials.0, c, available, exact));
    }
    if bounds.most.bytes <= available {
        return Ok(());
    }
    // Between the bounds: the exact lengths decide.
    let demand = owned(contract.demand(c.n_layer, counted), partition);
    let mut lengths: Vec<Option<Vec<usize>>> = vec![None; contract.prompts.len()];
    let mut e = Estimate { forwards: 0, tokens: 0, bytes: 0 };
    let mut trials = 0u128;
    for d in &demand {
        let len = match d.min_len == d.max_len {
            true => d.min_len,
            false => lengths[d.set].get_or_insert_with(|| contract.prompts[d.set].lengths())[d.index],
        };
        let (bytes, t) = prompt_bytes(d, len, c);
        e.forwards += d.runs.len();
        e.tokens += (len * d.runs.len()) as u128;
        e.bytes += bytes;
        trials += t;
    }
    match e.bytes > available {
        true => Err(refusal(&e, trials, c, available, true)),
        false => Ok(()),
    }
}

/// [`check_contract_within`] the machine's available memory (skipped where that cannot be read: the
/// check after planning says so).
pub fn check_contract(
    contract: &Contract,
    c: &ModelConfig,
    partition: Option<Partition>,
    counted: impl Fn(&moe_contracts::Criterion) -> bool + Copy,
) -> Result<(), GateError> {
    match available_memory() {
        Some(available) => check_contract_within(contract, c, partition, counted, available),
        None => Ok(()),
    }
}

/// The refusal of a run needing `e` (and `trials` planned trials, where counted) with `available` bytes;
/// `exact` false says the estimate is a lower bound.
fn refusal(e: &Estimate, trials: u128, c: &ModelConfig, available: u128, exact: bool) -> GateError {
    let least = if exact { "" } else { "at least " };
    let bytes = gib(e.bytes);
    let what = match trials {
        0 => format!("record {least}{bytes} of traces"),
        n => format!("record traces and plan {least}{n} trials in {least}{bytes}"),
    };
    GateError::Resources {
        detail: format!(
            "the contract's {} forwards ({least}{} prompt tokens on a model of {} layers and vocabulary {}) \
             {what}, all held until the trials are judged, and this machine has {} available",
            e.forwards,
            e.tokens,
            c.n_layer,
            c.vocab,
            gib(available)
        ),
        shards: e.bytes.div_ceil(available.max(1)),
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
        // The issue's example: 10,000 prompts of 4096 tokens on synth:tiny record 4.1e7 tokens x 1.22 MB
        // (the per-token bytes above) = 46706.5 GiB of traces, more than any machine this runs on has.
        let tiny = moe_engine::synth::Preset::Tiny.config();
        let prompts = vec![(4096, 0); 10_000];
        let message = check(&[job(&prompts)], &tiny).unwrap_err().to_string();
        assert!(message.contains("10000 forwards (40960000 prompt tokens"), "{message}");
        assert!(message.contains("record 46706.5 GiB of traces"), "{message}");
        assert!(message.contains("--partition"), "{message}");
    }

    /// The issue's example as a contract: `count` generated prompts of `min..=max` tokens, forwarded on
    /// cpu and the reference, judged per prompt and position (`argmax`) and decoded 4096 steps (`greedy`).
    fn huge(count: usize, min: usize, max: usize) -> Contract {
        let yaml = format!(
            "contract: huge\nversion: 1.0.0\nstatus: draft\ntitle: t\nmodel: synth:tiny\nsmoke_model: synth:tiny
prompts:
  - {{id: gen, count: {count}, min_len: {min}, max_len: {max}, seed: 1}}
runs:
  cpu: {{backend: cpu}}
  cpu2: {{backend: cpu}}
  reference: {{backend: reference}}
criteria:
  - {{id: POS, title: t, compare: [cpu, reference], tap: logits, metric: argmax, per: [prompt, position], gate: all}}
  - {{id: DEC, title: t, compare: [cpu, cpu2], tap: logits, metric: greedy, steps: 4096, per: [prompt], gate: all}}
amendments:
  - {{version: 1.0.0, date: 2026-12-03, kind: created, summary: s}}
"
        );
        moe_contracts::parse(&yaml, std::path::Path::new("huge.yaml")).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_issue_s_example_is_refused_before_its_prompts_or_trials_exist() {
        // 10,000 x 4096 tokens on three runs: 122,880,000 prompt tokens, 40,960,000 per-position trials
        // and 20,000 greedy decodes of 4096 steps. Before this check ran first, the gate generated the
        // 40,960,000 tokens several times, planned the 40,960,000 trials (11 GB resident after 100 s) and,
        // with a greedy criterion, scanned every prompt once per trial; now it is refused from the
        // contract alone.
        let tiny = moe_engine::synth::Preset::Tiny.config();
        let c = huge(10_000, 4096, 4096);
        let bounds = estimate_contract(&c, &tiny, None, |_| true);
        assert_eq!(bounds.least, bounds.most, "one length: the bounds are exact");
        assert_eq!(bounds.trials, (40_960_000 + 10_000, 40_960_000 + 10_000));
        assert_eq!((bounds.least.forwards, bounds.least.tokens), (30_000, 122_880_000));
        let per_token = 4 * ((256 + 16 + 4) * 8 + 4 * 4) + 151_936 * 8;
        let greedy = 2 * 10_000 * 4096 * 6 * 8;
        assert_eq!(bounds.least.bytes, 122_880_000 * per_token + greedy + 40_970_000 * TRIAL_BYTES);
        let message = check_contract_within(&c, &tiny, None, |_| true, 64 << 30).unwrap_err().to_string();
        assert!(message.contains("the contract's 30000 forwards (122880000 prompt tokens"), "{message}");
        assert!(message.contains("plan 40970000 trials in 140142.8 GiB"), "{message}");
        assert!(message.contains("this machine has 64.0 GiB available"), "{message}");
        assert!(message.contains("at least 2190 shards with --partition"), "{message}");
    }

    #[test]
    fn lengths_are_drawn_only_between_the_bounds_and_partitions_count_their_own_prompts() {
        let tiny = moe_engine::synth::Preset::Tiny.config();
        let c = huge(20, 1, 64);
        let bounds = estimate_contract(&c, &tiny, None, |_| true);
        assert_eq!((bounds.least.tokens, bounds.most.tokens), (60, 64 * 60));
        // The exact need, from the planned run: the forwards' recordings and the trials.
        let prompts = c.expand_prompts();
        let plans = c.plan(tiny.n_layer);
        let selection = vec![crate::trials::Selection::Run; plans.len()];
        let jobs = crate::trials::jobs(&c, &plans, &selection, &prompts);
        let exact = estimate(&jobs, &tiny).bytes + plans.len() as u128 * TRIAL_BYTES;
        assert!(bounds.least.bytes < exact && exact < bounds.most.bytes);
        // Just above and just below the exact need, within the bounds: the drawn lengths decide.
        assert!(check_contract_within(&c, &tiny, None, |_| true, exact).is_ok());
        let message = check_contract_within(&c, &tiny, None, |_| true, exact - 1).unwrap_err().to_string();
        assert!(message.contains(&format!("plan {} trials", plans.len())), "{message}");
        assert!(message.contains("(1464 prompt tokens"), "exact, not a bound: {message}");
        // A shard counts its own prompts: 1/2 holds prompts 0, 2, 4, ...
        let half = estimate_contract(&c, &tiny, Some(Partition { index: 1, count: 2 }), |_| true);
        assert_eq!(half.least.forwards, 30);
        assert_eq!(half.least.tokens, 30);
        // Criteria left out (CUDA trials where there is no CUDA) are not counted.
        let none = estimate_contract(&c, &tiny, None, |_| false);
        assert_eq!((none.most.bytes, none.trials), (0, (0, 0)));
    }

    #[test]
    fn mem_available_is_read_in_kib() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }
}
