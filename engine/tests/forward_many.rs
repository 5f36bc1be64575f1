//! Batched forwards: `forward_many` runs several prompts through every weight row together, and
//! `step_many` decodes one token of each of them per call. Every value must be the one the prompt gets
//! alone (`forward`, then `step`), bit for bit: each value is computed by the same operations in the same
//! order whatever batch its token came in (a weight row's product with a token's activations does not
//! depend on the other tokens, attention reads only the token's own sequence, experts run per token and
//! are summed in choice order), so equality is exact, not approximate.

mod forward_support;

use forward_support::load_model;
use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
use moe_engine::config::ModelConfig;
use moe_engine::error::EngineError;
use moe_engine::trace::{LayerTrace, Matrix, Precision, Trace};

/// The K-quant fixture (Q4_K, Q5_K, Q6_K and Q8_0 rows of 256 values: the decoded-tile path) and the
/// F32 fixture (rows of 64 values, shorter than a column block).
const MODELS: [&str; 2] = ["q4k/model.q4_k_m.gguf", "public-tiny/model.gguf"];

/// Prompts of different lengths, 1 to 70 tokens: together more than one token block (64) of the tiled
/// products, one alone longer than a block; ids below both fixtures' vocabularies (256).
fn prompts() -> Vec<Vec<u32>> {
    [1usize, 7, 70, 2, 21]
        .iter()
        .enumerate()
        .map(|(p, &len)| (0..len).map(|i| ((i * 37 + p * 101 + 5) % 256) as u32).collect())
        .collect()
}

/// Greedy tokens decoded after each prompt.
const STEPS: usize = 6;

fn backend(model: &str, kind: BackendKind) -> Box<dyn Forward> {
    create_backend(kind, load_model(model), Policy::Fast).expect("backend")
}

fn new_trace() -> Trace {
    Trace::new("fixture", "", "", Precision::F64)
}

fn assert_bits(a: &Matrix, b: &Matrix, what: &str) {
    assert_eq!((a.rows, a.cols), (b.rows, b.cols), "{what}: shape");
    for (i, (x, y)) in a.data.iter().zip(&b.data).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: element {i}: {x} vs {y}");
    }
}

fn assert_traces_identical(a: &Trace, b: &Trace, what: &str) {
    assert_eq!((&a.backend, &a.policy, a.precision), (&b.backend, &b.policy, b.precision), "{what}: labels");
    assert_eq!(a.tokens, b.tokens, "{what}: tokens");
    assert_eq!(a.layers.len(), b.layers.len(), "{what}: layers");
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        let LayerTrace { hidden, router_logits, router_experts, router_weights } = x;
        assert_bits(hidden, &y.hidden, &format!("{what}: layer {l} hidden"));
        assert_bits(router_logits, &y.router_logits, &format!("{what}: layer {l} router logits"));
        assert_eq!(router_experts, &y.router_experts, "{what}: layer {l} experts");
        assert_bits(router_weights, &y.router_weights, &format!("{what}: layer {l} router weights"));
    }
    assert_bits(&a.logits, &b.logits, &format!("{what}: logits"));
}

fn assert_logits_identical(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: vocabulary");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: logit {i}: {x} vs {y}");
    }
}

/// The first index of the largest logit (the greedy choice).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Each prompt alone: its trace, then the logits of [`STEPS`] greedy steps (the prefill's first).
fn one_at_a_time(f: &mut dyn Forward, prompts: &[Vec<u32>]) -> Vec<(Trace, Vec<Vec<f32>>)> {
    prompts
        .iter()
        .map(|p| {
            let mut trace = new_trace();
            let mut logits = vec![f.forward(p, Some(&mut trace)).expect("forward")];
            for _ in 1..STEPS {
                let next = argmax(logits.last().expect("logits"));
                logits.push(f.step(next).expect("step"));
            }
            (trace, logits)
        })
        .collect()
}

/// All prompts together: their traces, then the logits of [`STEPS`] greedy steps of each.
fn all_together(f: &mut dyn Forward, prompts: &[Vec<u32>]) -> (Vec<Trace>, Vec<Vec<Vec<f32>>>) {
    in_groups(f, prompts, &[prompts.len()])
}

/// The prompts forwarded in groups of `sizes[g]` (the first by `forward_many`, the others by
/// `add_sequences`), then all decoded together: their traces and the logits of [`STEPS`] greedy steps.
fn in_groups(f: &mut dyn Forward, prompts: &[Vec<u32>], sizes: &[usize]) -> (Vec<Trace>, Vec<Vec<Vec<f32>>>) {
    let mut traces: Vec<Trace> = prompts.iter().map(|_| new_trace()).collect();
    let (mut firsts, mut at) = (Vec::new(), 0);
    for (g, &size) in sizes.iter().enumerate() {
        let seqs: Vec<&[u32]> = prompts[at..at + size].iter().map(|p| &p[..]).collect();
        let traces = Some(&mut traces[at..at + size]);
        firsts.extend(match g {
            0 => f.forward_many(&seqs, traces).expect("forward_many"),
            _ => f.add_sequences(&seqs, traces).expect("add_sequences"),
        });
        at += size;
    }
    assert_eq!(at, prompts.len(), "the groups cover every prompt");
    let mut logits: Vec<Vec<Vec<f32>>> = firsts.into_iter().map(|l| vec![l]).collect();
    for _ in 1..STEPS {
        let next: Vec<u32> = logits.iter().map(|l| argmax(l.last().expect("logits"))).collect();
        let stepped = f.step_many(&next).expect("step_many");
        for (l, s) in logits.iter_mut().zip(stepped) {
            l.push(s);
        }
    }
    (traces, logits)
}

fn check_batched_equals_single(
    model: &str,
    kind: BackendKind,
    prompts: &[Vec<u32>],
    make: impl Fn() -> Box<dyn Forward>,
) {
    let single = one_at_a_time(&mut *make(), prompts);
    let (traces, logits) = all_together(&mut *make(), prompts);
    for (p, ((want_trace, want_logits), (trace, logits))) in
        single.iter().zip(traces.iter().zip(&logits)).enumerate()
    {
        let what = format!("{model} {kind}, prompt {p} ({} tokens)", prompts[p].len());
        assert_traces_identical(trace, want_trace, &what);
        for (s, (got, want)) in logits.iter().zip(want_logits).enumerate() {
            assert_logits_identical(got, want, &format!("{what}, greedy step {s}"));
        }
    }
}

#[test]
fn forward_many_and_step_many_give_the_single_sequence_bits() {
    for model in MODELS {
        for kind in [BackendKind::Cpu, BackendKind::Reference] {
            check_batched_equals_single(model, kind, &prompts(), || backend(model, kind));
        }
    }
}

/// Prompts forwarded in three groups (`forward_many`, then `add_sequences` twice) and decoded as one
/// batch give each prompt's bits alone: how the gate forwards a run's prompts in bounded batches and
/// decodes all of them together.
#[test]
fn added_sequences_decode_with_the_held_ones_bit_for_bit() {
    let prompts = prompts();
    for model in MODELS {
        for kind in [BackendKind::Cpu, BackendKind::Reference] {
            let single = one_at_a_time(&mut *backend(model, kind), &prompts);
            let (traces, logits) = in_groups(&mut *backend(model, kind), &prompts, &[2, 1, 2]);
            for (p, ((want_trace, want_logits), (trace, logits))) in
                single.iter().zip(traces.iter().zip(&logits)).enumerate()
            {
                let what =
                    format!("{model} {kind}, prompt {p} ({} tokens), added in groups", prompts[p].len());
                assert_traces_identical(trace, want_trace, &what);
                for (s, (got, want)) in logits.iter().zip(want_logits).enumerate() {
                    assert_logits_identical(got, want, &format!("{what}, greedy step {s}"));
                }
            }
        }
    }
}

#[test]
fn the_cpu_backend_batches_any_number_of_sequences() {
    assert_eq!(backend(MODELS[0], BackendKind::Cpu).max_sequences(), usize::MAX);
}

/// A backend with only the required methods (as the CUDA backend is): the trait's default
/// `forward_many` / `step_many` run one sequence at a time through `forward` / `step`.
struct SingleSequence(Box<dyn Forward>);

impl Forward for SingleSequence {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }
    fn policy(&self) -> Policy {
        self.0.policy()
    }
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }
    fn forward(&mut self, tokens: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>, EngineError> {
        self.0.forward(tokens, trace)
    }
    fn step(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        self.0.step(token)
    }
    fn run_layer(&mut self, layer: usize, input: &Matrix) -> Result<LayerTrace, EngineError> {
        self.0.run_layer(layer, input)
    }
}

#[test]
fn the_default_methods_run_one_sequence_at_a_time() {
    let model = MODELS[0];
    let single = || -> Box<dyn Forward> { Box::new(SingleSequence(backend(model, BackendKind::Cpu))) };
    assert_eq!(single().max_sequences(), 1);
    // One sequence through the defaults: the same bits as forward and step.
    check_batched_equals_single(model, BackendKind::Cpu, &prompts()[2..3], single);
    // Several: last logits still per sequence; stepping more than one is refused.
    let prompts = prompts();
    let seqs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let mut f = single();
    let lasts = f.forward_many(&seqs, None).expect("forward_many");
    let mut cpu = backend(model, BackendKind::Cpu);
    for (p, last) in prompts.iter().zip(&lasts) {
        assert_logits_identical(last, &cpu.forward(p, None).expect("forward"), "default forward_many");
    }
    let e = f.step_many(&[1, 2, 3, 4, 5]).expect_err("five sequences through a single-sequence backend");
    assert!(matches!(e, EngineError::SequenceCount { tokens: 5, held: 1 }), "{e}");
    let e = f.add_sequences(&seqs[..1], None).expect_err("a sequence beside the one held");
    assert!(matches!(e, EngineError::CannotAddSequences { .. }), "{e}");
    assert!(e.to_string().contains("forward each prompt alone"), "{e}");
}

#[test]
fn mismatched_counts_are_refused_with_what_to_pass() {
    let mut f = backend(MODELS[0], BackendKind::Cpu);
    let prompts = prompts();
    let seqs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let mut two = vec![new_trace(), new_trace()];
    let e = f.forward_many(&seqs, Some(&mut two)).expect_err("two traces for five prompts");
    assert!(matches!(e, EngineError::TraceCount { traces: 2, sequences: 5 }), "{e}");
    assert!(e.to_string().contains("one trace per sequence"), "{e}");

    f.forward_many(&seqs, None).expect("forward_many");
    let e = f.step_many(&[1, 2]).expect_err("two tokens for five sequences");
    assert!(matches!(e, EngineError::SequenceCount { tokens: 2, held: 5 }), "{e}");
    assert!(e.to_string().contains("one token per sequence"), "{e}");
    let e = f.step(1).expect_err("one token for five sequences");
    assert!(matches!(e, EngineError::SequenceCount { tokens: 1, held: 5 }), "{e}");

    // A bad token anywhere refuses the whole batch before anything runs, and names its position.
    let bad: Vec<&[u32]> = vec![&[1, 2], &[3, 999]];
    let e = f.forward_many(&bad, None).expect_err("token 999 is outside the 256-token vocabulary");
    assert!(matches!(e, EngineError::TokenOutOfRange { token: 999, position: 1, .. }), "{e}");
    f.step_many(&[1, 2, 3, 4, 5]).expect("the five sequences are still held");
}
