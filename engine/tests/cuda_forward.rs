//! The `cuda` backend against float64 forwards computed outside this project (tests/fixtures: transformers
//! on the F32 model, the float64 forward of the dequantised weights of each quantised file) and against the
//! `cpu` backend; its KV cache (decode after a prefill), `run_layer`, and its typed errors. Every prompt,
//! position and layer. Under the `exact` policy (`exact_*` cases): traces bit-identical to the `cpu`
//! backend's on every fixture and synthetic model (`--bench production_shape_exact`: the model of record).
//! Sub-layer taps (`taps_match_cpu::*`, both policies): each layer alone on the `cpu` forward's input gives
//! the `cpu` taps (bit for bit under `exact`, within f32 round-off under `fast`), asking for taps changes
//! no value, and a traced decode step holds its full forward's last row and the cache rows it read.
//!
//! Where no CUDA driver, NVRTC or device is found, every device case is reported as ignored with the reason
//! (CI has no GPU). Run on a GPU machine: `cargo test -p moe-engine --features cuda --test cuda_forward`.

mod forward_support;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    // The benchmarks exist only under --bench: nextest's test list does not accept libtest-mimic's
    // `: bench` lines, and the workspace builds this target with CUDA by default.
    #[cfg(feature = "cuda")]
    let trials: Vec<_> = cases::all().into_iter().filter(|t| args.bench || !t.is_bench()).collect();
    #[cfg(not(feature = "cuda"))]
    let trials = vec![libtest_mimic::Trial::ignorable_test("cuda_forward", || {
        Ok(libtest_mimic::Completion::ignored_with(
            "built without the `cuda` feature: run with --features cuda",
        ))
    })];
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(feature = "cuda")]
mod cases {
    use libtest_mimic::{Completion, Failed, Trial};
    use moe_engine::backend::{BackendKind, Forward, Policy, create_backend};
    use moe_engine::error::EngineError;
    use moe_engine::trace::{Matrix, Precision, SubLayerTap, Trace};
    use moe_kernels::cuda::CudaDevice;

    use super::forward_support::{
        BitAgreement, Errors, FIXTURES, argmax, compare_all, compare_trace, load_model, load_reference,
        max_abs, rel_l2,
    };

    /// Bound on the per-position relative error `||a - b|| / ||b||` of logits and hidden states against the
    /// float64 references. Issue 2 asks for <= 1e-4 of an f32 engine; the `cpu` backend measures at most
    /// 1.0e-6 and asserts 1e-5. The CUDA forward computes the same f32 operations in another summation
    /// order (and with FMA contraction), so its round-off is of the same size: 1e-5 separates that from a
    /// real defect (quantised activations give ~1e-2, a wrong RoPE or norm ~1).
    const REL_BOUND: f64 = 1e-5;
    /// Bound on the renormalised router weights (values in [0, 1]), as for the `cpu` backend.
    const ROUTER_WEIGHTS_ABS: f64 = 5e-6;
    /// Bound on `||cuda - cpu|| / ||cpu||` per position: both are f32 round-off away from the reference,
    /// so they are at most about twice that apart.
    const CUDA_CPU_REL_BOUND: f64 = 2e-5;

    /// Bound on the nmse of each `fast` cuda sub-layer tap against the `cpu` tap, one layer alone on the same
    /// f32 input: two f32 computations of one layer in different summation orders (and FMA contraction)
    /// differ by f32 round-off, nmse ~1e-14 (gate.md: 1e-13..1e-11 against f64 through one layer; the
    /// `cpu` taps measure at most 1.5e-13 against the reference, `sub_layer_taps.rs`). 1e-10 is the bound
    /// `sub_layer_taps.rs` holds `cpu` to against the reference, five orders below a real defect.
    const TAP_NMSE: f64 = 1e-10;

    /// Synthetic models checked against the `cpu` backend: `tiny` (16 experts top-4, K-quant rows of 256)
    /// and `small` (heads of 128, query width unlike the hidden size), both in the Q4_K_M mix.
    const SYNTH_SPECS: [&str; 2] = ["synth:tiny", "synth:small"];
    /// The model of record (docs/synthetic-models.md), benchmarked with `--bench`.
    const PRODUCTION_SPEC: &str = "synth:qwen3-coder-30b-a3b:q4_k_m";
    /// Environment variable that cuts the production benchmark down to what a kernel profiler should see:
    /// `decode` (two steps after the warm-up) or `prefill` (one 64-token forward after the warm-up).
    const PROFILE_ENV: &str = "MOE_GATE_BENCH_PROFILE";
    /// The contract's canonical prompts (docs/contracts.md).
    const CANONICAL_PROMPTS: [&[u32]; 4] =
        [&[785, 9217, 308], &[785], &[785, 374, 264, 6716], &[750, 220, 17, 220, 488, 220, 17, 30]];
    /// Smallest hidden-state cosine between `cuda` and `cpu` accepted on the synthetic models: issue 5's
    /// production bar (0.9999); f32 round-off measures orders of magnitude closer.
    const MIN_COSINE: f64 = 0.9999;
    /// A router decision whose k-th and (k+1)-th probabilities (of the `cpu` run) differ by less than this
    /// is a tie either backend may break either way (f32 round-off of a probability is ~1e-7).
    const TIE_MARGIN: f64 = 1e-6;

    type Outcome = Result<Completion, Failed>;

    /// The CUDA forward of `model`, or the reason the case is ignored.
    fn cuda_forward(model: &str) -> Result<Box<dyn Forward>, Outcome> {
        match create_backend(BackendKind::Cuda, load_model(model), Policy::Fast) {
            Ok(f) => Ok(f),
            Err(EngineError::CudaUnavailable { reason }) => Err(Ok(Completion::ignored_with(reason))),
            Err(e) => Err(Err(Failed::from(format!("{model}: {e}")))),
        }
    }

    /// Runs `body` with the CUDA forward of `model` (ignored where there is no CUDA).
    fn with_cuda(model: &'static str, body: impl FnOnce(&mut dyn Forward) -> Result<(), String>) -> Outcome {
        match cuda_forward(model) {
            Ok(mut f) => body(&mut *f).map(|()| Completion::Completed).map_err(Failed::from),
            Err(outcome) => outcome,
        }
    }

    fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
        if cond { Ok(()) } else { Err(what()) }
    }

    fn trace_of(f: &mut dyn Forward, tokens: &[u32]) -> Result<Trace, String> {
        let mut trace = Trace::new("fixture", "", "", Precision::F64);
        f.forward(tokens, Some(&mut trace)).map_err(|e| e.to_string())?;
        Ok(trace)
    }

    fn row_f32(m: &Matrix, r: usize) -> Vec<f32> {
        m.row(r).iter().map(|&v| v as f32).collect()
    }

    pub fn all() -> Vec<Trial> {
        let have_device = match CudaDevice::get(0) {
            Ok(d) => {
                eprintln!("CUDA forward tests on {}", d.info());
                true
            }
            Err(e) => {
                eprintln!("CUDA forward tests: no usable CUDA here, the device cases are ignored: {e}");
                false
            }
        };
        let mut t = Vec::new();
        for spec in SYNTH_SPECS {
            t.push(Trial::ignorable_test(format!("synth_matches_cpu::{spec}"), move || {
                synth_matches_cpu(spec)
            }));
        }
        t.push(
            Trial::bench(format!("production_shape::{PRODUCTION_SPEC}"), |test_mode| {
                // Synthesising and uploading 17 GB is a benchmark's job, not a test's: only with --bench.
                if test_mode {
                    Ok(None)
                } else {
                    production_shape(PRODUCTION_SPEC).map(Some).map_err(Failed::from)
                }
            })
            .with_ignored_flag(!have_device),
        );
        for (model, reference) in FIXTURES {
            t.push(Trial::ignorable_test(format!("matches_reference::{model}"), move || {
                with_cuda(model, |f| matches_reference(f, model, reference))
            }));
            t.push(Trial::ignorable_test(format!("matches_cpu::{model}"), move || {
                with_cuda(model, |f| matches_cpu(f, model, reference))
            }));
            t.push(Trial::ignorable_test(format!("run_layer::{model}"), move || {
                with_cuda(model, |f| run_layer_reproduces_layers(f, reference))
            }));
        }
        for (model, reference) in [FIXTURES[0], FIXTURES[4]] {
            t.push(Trial::ignorable_test(format!("decode_after_prefill::{model}"), move || {
                with_cuda(model, |f| decode_after_prefill(f, reference))
            }));
        }
        t.push(Trial::ignorable_test("errors_are_typed", || with_cuda(FIXTURES[0].0, errors_are_typed)));
        for (model, reference) in FIXTURES {
            t.push(Trial::ignorable_test(format!("exact_bitwise_vs_cpu::{model}"), move || {
                exact_bitwise_on_fixture(model, reference)
            }));
        }
        for spec in SYNTH_SPECS {
            t.push(Trial::ignorable_test(format!("exact_bitwise_vs_cpu::{spec}"), move || {
                exact_bitwise_on_synth(spec)
            }));
        }
        t.push(Trial::ignorable_test("exact_decode_after_prefill", exact_decode_after_prefill));
        for policy in Policy::ALL {
            for model in [FIXTURES[0].0, FIXTURES[4].0, SYNTH_SPECS[0]] {
                t.push(Trial::ignorable_test(format!("taps_match_cpu::{policy}::{model}"), move || {
                    taps_match_cpu(model, policy)
                }));
            }
        }
        t.push(
            Trial::bench(format!("production_shape_exact::{PRODUCTION_SPEC}"), |test_mode| {
                if test_mode {
                    Ok(None)
                } else {
                    production_shape_exact(PRODUCTION_SPEC).map(Some).map_err(Failed::from)
                }
            })
            .with_ignored_flag(!have_device),
        );
        t
    }

    /// A `cuda` and a `cpu` forward.
    type Pair = (Box<dyn Forward>, Box<dyn Forward>);

    /// The `cpu` and `cuda` forwards of `weights` under `exact`, or the reason the case is ignored.
    fn exact_pair(weights: std::sync::Arc<moe_engine::weights::ModelWeights>) -> Result<Pair, Outcome> {
        let cuda = match create_backend(BackendKind::Cuda, weights.clone(), Policy::Exact) {
            Ok(f) => f,
            Err(EngineError::CudaUnavailable { reason }) => return Err(Ok(Completion::ignored_with(reason))),
            Err(e) => return Err(Err(Failed::from(e.to_string()))),
        };
        let cpu = create_backend(BackendKind::Cpu, weights, Policy::Exact)
            .map_err(|e| Err(e.to_string().into()))?;
        Ok((cuda, cpu))
    }

    /// Runs every prompt through both and compares the traces bit for bit.
    fn exact_bitwise(
        what: &str,
        cuda: &mut dyn Forward,
        cpu: &mut dyn Forward,
        prompts: &[Vec<u32>],
    ) -> Outcome {
        let mut bits = BitAgreement::default();
        for p in prompts {
            let ours = trace_of(cuda, p)?;
            ensure(ours.policy == "exact" && ours.backend == "cuda", || {
                format!("{what}: trace labelled {} / {}", ours.backend, ours.policy)
            })?;
            bits.add(&ours, &trace_of(cpu, p)?);
        }
        println!(
            "    {what}: exact cuda vs exact cpu: {} of {} tensors bit-identical ({} prompts){}",
            bits.identical,
            bits.tensors,
            prompts.len(),
            if bits.all_identical() {
                String::new()
            } else {
                format!("; first differences: {:?}", bits.first_differences)
            }
        );
        ensure(bits.all_identical(), || {
            format!("{what}: {} of {} tensors differ", bits.tensors - bits.identical, bits.tensors)
        })?;
        Ok(Completion::Completed)
    }

    /// Every prompt of a fixture: `exact` cuda and cpu traces are bit-identical.
    fn exact_bitwise_on_fixture(model: &str, reference: &str) -> Outcome {
        let (mut cuda, mut cpu) = match exact_pair(load_model(model)) {
            Ok(pair) => pair,
            Err(outcome) => return outcome,
        };
        let prompts: Vec<Vec<u32>> = load_reference(reference).into_iter().map(|p| p.tokens).collect();
        exact_bitwise(model, &mut *cuda, &mut *cpu, &prompts)
    }

    /// Prompts of 1 to 40 tokens over a synthetic model's vocabulary, after the canonical ones.
    fn synth_prompts(vocab: usize) -> Vec<Vec<u32>> {
        let mut prompts: Vec<Vec<u32>> = CANONICAL_PROMPTS.iter().map(|p| p.to_vec()).collect();
        for (i, n) in [1usize, 7, 19, 40].into_iter().enumerate() {
            prompts.push((0..n).map(|j| ((j * 7919 + i * 104_729 + 11) % vocab) as u32).collect());
        }
        prompts
    }

    /// The canonical and four generated prompts on a synthetic model: bit-identical traces.
    fn exact_bitwise_on_synth(spec: &str) -> Outcome {
        let weights = moe_engine::spec::load_model(spec).map_err(|e| Failed::from(e.to_string()))?;
        let vocab = weights.config.vocab;
        let (mut cuda, mut cpu) = match exact_pair(weights) {
            Ok(pair) => pair,
            Err(outcome) => return outcome,
        };
        exact_bitwise(spec, &mut *cuda, &mut *cpu, &synth_prompts(vocab))
    }

    /// Under `exact`, decoding through the KV cache (and past the first RoPE table upload: 300 positions
    /// > the initial 256) gives the `cpu` backend's logits bit for bit at every step.
    fn exact_decode_after_prefill() -> Outcome {
        let weights = moe_engine::spec::load_model("synth:tiny").map_err(|e| Failed::from(e.to_string()))?;
        let vocab = weights.config.vocab;
        let (mut cuda, mut cpu) = match exact_pair(weights) {
            Ok(pair) => pair,
            Err(outcome) => return outcome,
        };
        let prompt: Vec<u32> = (0..5).map(|j| ((j * 31 + 7) % vocab) as u32).collect();
        let (a, b) = (cuda.forward(&prompt, None), cpu.forward(&prompt, None));
        let (mut a, mut b) = (a.map_err(|e| e.to_string())?, b.map_err(|e| e.to_string())?);
        for step in 0..300 {
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            ensure(same, || format!("logits differ after {step} decode steps"))?;
            let next = (0..b.len()).fold(0, |best, i| if b[i] > b[best] { i } else { best }) as u32;
            a = cuda.step(next).map_err(|e| e.to_string())?;
            b = cpu.step(next).map_err(|e| e.to_string())?;
        }
        println!(
            "    exact decode: 300 greedy steps on synth:tiny, cuda and cpu logits bit-identical at every step"
        );
        Ok(Completion::Completed)
    }

    /// The model of record under `exact`: the canonical prompts bit for bit against `cpu`, and the decode
    /// speed of `exact` against `fast` (64 greedy steps after an 8-token prefill each).
    fn production_shape_exact(spec: &str) -> Result<libtest_mimic::Measurement, String> {
        use std::time::Instant;
        let weights = moe_engine::spec::load_model(spec).map_err(|e| e.to_string())?;
        let mut exact =
            create_backend(BackendKind::Cuda, weights.clone(), Policy::Exact).map_err(|e| e.to_string())?;
        let mut cpu =
            create_backend(BackendKind::Cpu, weights.clone(), Policy::Exact).map_err(|e| e.to_string())?;
        let prompts: Vec<Vec<u32>> = CANONICAL_PROMPTS.iter().map(|p| p.to_vec()).collect();
        let bitwise = exact_bitwise(spec, &mut *exact, &mut *cpu, &prompts);
        drop(cpu);
        let decode = |f: &mut dyn Forward| -> Result<f64, String> {
            f.forward(CANONICAL_PROMPTS[3], None).map_err(|e| e.to_string())?;
            let mut next = 785u32;
            let t0 = Instant::now();
            for _ in 0..64 {
                let logits = f.step(next).map_err(|e| e.to_string())?;
                next = (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b }) as u32;
            }
            Ok(t0.elapsed().as_secs_f64() / 64.0)
        };
        let t_exact = decode(&mut *exact)?;
        let t0 = Instant::now();
        exact
            .forward(
                &(0..64).map(|i| ((i * 7919 + 785) % weights.config.vocab) as u32).collect::<Vec<_>>(),
                None,
            )
            .map_err(|e| e.to_string())?;
        let prefill_exact = t0.elapsed().as_secs_f64();
        drop(exact);
        let mut fast = create_backend(BackendKind::Cuda, weights, Policy::Fast).map_err(|e| e.to_string())?;
        let t_fast = decode(&mut *fast)?;
        println!(
            "    decode per token: exact {:.2} ms ({:.0} tokens/s), fast {:.2} ms ({:.0} tokens/s); exact prefill of 64 tokens {:.1} ms",
            t_exact * 1e3,
            1.0 / t_exact,
            t_fast * 1e3,
            1.0 / t_fast,
            prefill_exact * 1e3
        );
        bitwise.map_err(|e| format!("{e:?}"))?;
        Ok(libtest_mimic::Measurement { avg: (t_exact * 1e9) as u64, variance: 0 })
    }

    fn check_errors(what: &str, e: &Errors) -> Result<(), String> {
        println!("    {what}: {e:?}");
        ensure(e.logits_rel <= REL_BOUND, || format!("{what}: logits relative error {:e}", e.logits_rel))?;
        ensure(e.hidden_rel <= REL_BOUND, || format!("{what}: hidden relative error {:e}", e.hidden_rel))?;
        ensure(e.weights_abs <= ROUTER_WEIGHTS_ABS, || {
            format!("{what}: router weights error {:e}", e.weights_abs)
        })?;
        ensure(e.topk_set_mismatches == 0, || {
            format!("{what}: {} chosen expert sets differ", e.topk_set_mismatches)
        })?;
        ensure(e.argmax_mismatches == 0, || format!("{what}: {} argmax differ", e.argmax_mismatches))
    }

    /// Every prompt, position and layer against the float64 reference; the trace is labelled `cuda`.
    fn matches_reference(f: &mut dyn Forward, model: &str, reference: &str) -> Result<(), String> {
        let e = compare_all(f, &load_reference(reference));
        check_errors(&format!("cuda vs {reference}"), &e)?;
        let trace = trace_of(f, &[1, 2])?;
        ensure(
            (trace.backend.as_str(), trace.policy.as_str(), trace.precision)
                == ("cuda", "fast", Precision::F32),
            || {
                format!(
                    "{model}: trace labelled {} / {} / {:?}",
                    trace.backend, trace.policy, trace.precision
                )
            },
        )
    }

    /// Against the `cpu` backend on the same file: logits and hidden states within round-off of each
    /// other, the same experts and the same argmax everywhere. Also prints, per layer, how far each is from
    /// the reference (issue 5: `cuda` no further from the reference than `cpu`).
    fn matches_cpu(f: &mut dyn Forward, model: &str, reference: &str) -> Result<(), String> {
        let mut cpu =
            create_backend(BackendKind::Cpu, load_model(model), Policy::Fast).map_err(|e| e.to_string())?;
        let prompts = load_reference(reference);
        let n_layer = prompts[0].router_logits.shape[0];
        let (mut worst_cuda, mut worst_cpu) = (vec![0.0f64; n_layer], vec![0.0f64; n_layer]);
        for p in &prompts {
            let (ours, theirs) = (trace_of(f, &p.tokens)?, trace_of(&mut *cpu, &p.tokens)?);
            let vocab = p.logits.shape[1];
            // The cpu trace in the role of the reference: every tap compared, sets and argmax must agree.
            let cpu_ref = super::forward_support::Prompt {
                tokens: p.tokens.clone(),
                logits: tensor(&theirs.logits, &[p.tokens.len(), vocab]),
                hidden: hidden_tensor(&theirs, p),
                router_logits: stack(theirs.layers.iter().map(|l| &l.router_logits)),
                topk_ids: ids_tensor(&theirs, p),
                topk_weights: stack(theirs.layers.iter().map(|l| &l.router_weights)),
                router_margin: p.router_margin.clone(),
            };
            let e = compare_trace(&ours, &cpu_ref, vocab);
            ensure(e.logits_rel <= CUDA_CPU_REL_BOUND && e.hidden_rel <= CUDA_CPU_REL_BOUND, || {
                format!(
                    "{model}: cuda and cpu differ by {:e} (logits) / {:e} (hidden)",
                    e.logits_rel, e.hidden_rel
                )
            })?;
            ensure(e.topk_set_mismatches == 0 && e.argmax_mismatches == 0, || {
                format!("{model}: cuda and cpu choose differently: {e:?}")
            })?;
            for l in 0..n_layer {
                for pos in 0..p.tokens.len() {
                    let truth = p.hidden.at(&[l + 1, pos]);
                    worst_cuda[l] = worst_cuda[l].max(rel_l2(ours.layers[l].hidden.row(pos), truth));
                    worst_cpu[l] = worst_cpu[l].max(rel_l2(theirs.layers[l].hidden.row(pos), truth));
                }
            }
        }
        for l in 0..n_layer {
            println!(
                "    {model} layer {l}: hidden rel. error vs reference: cuda {:.2e}, cpu {:.2e}",
                worst_cuda[l], worst_cpu[l]
            );
        }
        Ok(())
    }

    fn tensor(m: &Matrix, shape: &[usize]) -> super::forward_support::Tensor {
        super::forward_support::Tensor { shape: shape.to_vec(), data: m.data.clone() }
    }

    /// `[L+1, T, H]` from a trace (row 0, the embeddings, is not compared and left zero).
    fn hidden_tensor(t: &Trace, p: &super::forward_support::Prompt) -> super::forward_support::Tensor {
        let mut data = vec![0.0; p.hidden.at(&[0]).len()];
        for l in &t.layers {
            data.extend_from_slice(&l.hidden.data);
        }
        super::forward_support::Tensor { shape: p.hidden.shape.clone(), data }
    }

    fn ids_tensor(t: &Trace, p: &super::forward_support::Prompt) -> super::forward_support::Tensor {
        let data = t.layers.iter().flat_map(|l| l.router_experts.iter().map(|&e| e as f64)).collect();
        super::forward_support::Tensor { shape: p.topk_ids.shape.clone(), data }
    }

    fn stack<'a>(ms: impl Iterator<Item = &'a Matrix>) -> super::forward_support::Tensor {
        let ms: Vec<&Matrix> = ms.collect();
        let data = ms.iter().flat_map(|m| m.data.iter().copied()).collect();
        super::forward_support::Tensor { shape: vec![ms.len(), ms[0].rows, ms[0].cols], data }
    }

    /// Each layer run alone on the reference's input reproduces the reference's output.
    fn run_layer_reproduces_layers(f: &mut dyn Forward, reference: &str) -> Result<(), String> {
        let prompts = load_reference(reference);
        let mut worst = 0.0f64;
        for p in &prompts {
            let (n_layer, t, hidden) = (p.hidden.shape[0] - 1, p.hidden.shape[1], p.hidden.shape[2]);
            for l in 0..n_layer {
                let input = Matrix::from_f64(t, hidden, p.hidden.at(&[l]).to_vec());
                let out = f.run_layer(l, &input).map_err(|e| e.to_string())?.hidden;
                for pos in 0..t {
                    worst = worst.max(rel_l2(out.row(pos), p.hidden.at(&[l + 1, pos])));
                }
            }
        }
        println!("    run_layer vs {reference}: worst per-position relative error {worst:.3e}");
        ensure(worst <= REL_BOUND, || format!("run_layer relative error {worst:e} exceeds {REL_BOUND:e}"))
    }

    /// Prefill `tokens[..n]`, then step through the rest: every position's logits equal the full forward's.
    /// Each value is computed by the same arithmetic whether its token came in a batch or alone (a weight
    /// row's dot product with one token does not depend on the others; both MoE schedules compute each
    /// output the same way; attention reads the same cached keys and values), so they must agree exactly.
    fn decode_after_prefill(f: &mut dyn Forward, reference: &str) -> Result<(), String> {
        let prompts = load_reference(reference);
        let mut worst = 0.0f64;
        for p in [&prompts[3], &prompts[5]] {
            let full = trace_of(f, &p.tokens)?;
            for n in [1, 2, p.tokens.len() - 1] {
                let last = f.forward(&p.tokens[..n], None).map_err(|e| e.to_string())?;
                worst = worst.max(max_abs_f32(&last, &row_f32(&full.logits, n - 1)));
                for (pos, &tok) in p.tokens.iter().enumerate().skip(n) {
                    let logits = f.step(tok).map_err(|e| e.to_string())?;
                    worst = worst.max(max_abs_f32(&logits, &row_f32(&full.logits, pos)));
                }
            }
        }
        let stepped = {
            f.forward(&[5], None).map_err(|e| e.to_string())?;
            f.step(42).map_err(|e| e.to_string())?
        };
        let direct = trace_of(f, &[5, 42])?;
        worst = worst.max(max_abs_f32(&stepped, &row_f32(&direct.logits, 1)));
        println!("    decode vs full forward on {reference}: largest logit difference {worst:e}");
        ensure(worst == 0.0, || format!("decoded logits differ from the full forward's by up to {worst:e}"))
    }

    fn max_abs_f32(a: &[f32], b: &[f32]) -> f64 {
        let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        max_abs(&a, &b)
    }

    fn errors_are_typed(f: &mut dyn Forward) -> Result<(), String> {
        let vocab = f.config().vocab as u32;
        let n_layer = f.config().n_layer;
        let hidden = f.config().hidden;
        match f.forward(&[], None) {
            Err(EngineError::EmptyPrompt) => {}
            other => return Err(format!("empty prompt: {other:?}")),
        }
        match f.forward(&[1, vocab], None) {
            Err(EngineError::TokenOutOfRange { token, position: 1, .. }) if token == vocab => {}
            other => return Err(format!("token out of range: {other:?}")),
        }
        match f.run_layer(n_layer, &Matrix::zeros(1, hidden)) {
            Err(EngineError::LayerOutOfRange { .. }) => {}
            other => return Err(format!("layer out of range: {other:?}")),
        }
        match f.run_layer(0, &Matrix::zeros(2, hidden + 1)) {
            Err(EngineError::InputShape { .. }) => {}
            other => return Err(format!("input shape: {other:?}")),
        }
        // After the errors the forward still works.
        f.forward(&[1, 2, 3], None).map(|_| ()).map_err(|e| e.to_string())
    }

    fn cosine(a: &[f64], b: &[f64]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    /// `p_k - p_(k+1)` of the softmax of router logits `row`.
    fn router_margin(row: &[f64], k: usize) -> f64 {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut p: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
        let s: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= s);
        p.sort_by(|a, b| b.total_cmp(a));
        if k < p.len() { p[k - 1] - p[k] } else { f64::INFINITY }
    }

    /// How a `cuda` trace compares with a `cpu` trace of the same prompt.
    #[derive(Debug, Default)]
    struct Agreement {
        /// Smallest cosine of hidden states, per layer.
        min_cosine: Vec<f64>,
        /// (layer, position) decisions whose expert sets differ, and how many of them are ties.
        set_mismatches: usize,
        tie_mismatches: usize,
        argmax_mismatches: usize,
        logits_rel: f64,
    }

    fn agreement(ours: &Trace, theirs: &Trace, agg: &mut Agreement) {
        let n_layer = theirs.layers.len();
        agg.min_cosine.resize(n_layer, 1.0);
        let t = theirs.tokens.len();
        let k = theirs.top_k();
        for (l, (a, b)) in ours.layers.iter().zip(&theirs.layers).enumerate() {
            for pos in 0..t {
                agg.min_cosine[l] = agg.min_cosine[l].min(cosine(a.hidden.row(pos), b.hidden.row(pos)));
                let (mut x, mut y) = (
                    a.router_experts[pos * k..(pos + 1) * k].to_vec(),
                    b.router_experts[pos * k..(pos + 1) * k].to_vec(),
                );
                x.sort_unstable();
                y.sort_unstable();
                if x != y {
                    agg.set_mismatches += 1;
                    if router_margin(b.router_logits.row(pos), k) < TIE_MARGIN {
                        agg.tie_mismatches += 1;
                    }
                }
            }
        }
        for pos in 0..t {
            let (a, b) = (ours.logits.row(pos), theirs.logits.row(pos));
            agg.argmax_mismatches += usize::from(argmax(a) != argmax(b));
            agg.logits_rel = agg.logits_rel.max(rel_l2(a, b));
        }
    }

    /// The canonical prompts through `cuda` and `cpu` on a synthetic model: hidden-state cosine at every
    /// layer, the same experts (except certified ties) and the same argmax.
    fn synth_matches_cpu(spec: &str) -> Outcome {
        let weights = moe_engine::spec::load_model(spec).map_err(|e| Failed::from(e.to_string()))?;
        let mut f = match create_backend(BackendKind::Cuda, weights.clone(), Policy::Fast) {
            Ok(f) => f,
            Err(EngineError::CudaUnavailable { reason }) => return Ok(Completion::ignored_with(reason)),
            Err(e) => return Err(e.to_string().into()),
        };
        let mut cpu = create_backend(BackendKind::Cpu, weights, Policy::Fast).map_err(|e| e.to_string())?;
        let mut agg = Agreement::default();
        for p in CANONICAL_PROMPTS {
            agreement(&trace_of(&mut *f, p)?, &trace_of(&mut *cpu, p)?, &mut agg);
        }
        let worst = agg.min_cosine.iter().copied().fold(1.0, f64::min);
        println!(
            "    {spec}: cuda vs cpu: min hidden cosine {worst:.9} (1 - cosine per layer {:?}), logits rel {:.2e}, \
             expert-set mismatches {} ({} ties), argmax mismatches {}",
            agg.min_cosine.iter().map(|c| format!("{:.1e}", 1.0 - c)).collect::<Vec<_>>(),
            agg.logits_rel,
            agg.set_mismatches,
            agg.tie_mismatches,
            agg.argmax_mismatches
        );
        ensure(worst >= MIN_COSINE, || format!("{spec}: hidden cosine {worst} below {MIN_COSINE}"))?;
        ensure(agg.set_mismatches == agg.tie_mismatches, || {
            format!("{spec}: experts differ beyond ties: {agg:?}")
        })?;
        ensure(agg.argmax_mismatches == 0, || format!("{spec}: argmax differs: {agg:?}"))?;
        Ok(Completion::Completed)
    }

    /// The model of record, measured by `moe_engine::bench` (what `cargo moe-gate bench --backend cuda
    /// --model synth:qwen3-coder-30b-a3b:q4_k_m` runs): synthesis and upload time, prefill tokens/s at
    /// prompt lengths 1, 64 and 512, batch-1 decode of 128 tokens, the bandwidth roofline; then a sanity
    /// comparison with `cpu` on the canonical prompts. The measurement reported to the harness is the
    /// decode time per token.
    fn production_shape(spec: &str) -> Result<libtest_mimic::Measurement, String> {
        use moe_engine::bench::{self, BenchPlan, BenchReport, Machine, SetupTimes};
        use std::time::Instant;
        let t0 = Instant::now();
        let weights = moe_engine::spec::load_model(spec).map_err(|e| e.to_string())?;
        let model_load_s = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut f =
            create_backend(BackendKind::Cuda, weights.clone(), Policy::Fast).map_err(|e| e.to_string())?;
        let setup = SetupTimes { model_load_s, backend_create_s: t0.elapsed().as_secs_f64() };

        // For a kernel profiler: after a warm-up, only two decode steps or one 64-token prefill.
        let profile = std::env::var(PROFILE_ENV);
        if let Ok(what @ ("decode" | "prefill")) = profile.as_deref() {
            let prompt = |n| bench::prompt(n, weights.config.vocab);
            f.forward(&prompt(8), None).map_err(|e| e.to_string())?;
            match what {
                "decode" => f.step(785).and_then(|_| f.step(9217)).map(drop),
                _ => f.forward(&prompt(64), None).map(drop),
            }
            .map_err(|e| e.to_string())?;
            return Ok(libtest_mimic::Measurement { avg: 0, variance: 0 });
        }

        let plan = BenchPlan::new(vec![1, 64, 512], 128, 3).map_err(|e| e.to_string())?;
        let result = bench::run(&mut *f, &weights, &plan, &mut |line| println!("    {line}"))
            .map_err(|e| e.to_string())?;
        let machine = Machine::detect(BackendKind::Cuda);
        let report = BenchReport::new(spec, BackendKind::Cuda, Policy::Fast, machine, setup, result);
        for line in report.to_string().lines() {
            println!("    {line}");
        }

        let mut cpu = create_backend(BackendKind::Cpu, weights, Policy::Fast).map_err(|e| e.to_string())?;
        let mut agg = Agreement::default();
        for p in CANONICAL_PROMPTS {
            agreement(&trace_of(&mut *f, p)?, &trace_of(&mut *cpu, p)?, &mut agg);
        }
        println!(
            "    sanity vs cpu on the 4 canonical prompts: 1 - min hidden cosine per layer {:?}; logits rel {:.2e}; \
             expert-set mismatches {} ({} ties); argmax mismatches {}",
            agg.min_cosine.iter().map(|c| format!("{:.1e}", 1.0 - c)).collect::<Vec<_>>(),
            agg.logits_rel,
            agg.set_mismatches,
            agg.tie_mismatches,
            agg.argmax_mismatches
        );
        // libtest prints `variance` as the `+/-` after the time: the standard deviation reads as that.
        let decode = &report.result.decode;
        Ok(libtest_mimic::Measurement {
            avg: (decode.mean_s * 1e9) as u64,
            variance: (decode.stddev_s * 1e9) as u64,
        })
    }

    /// The CUDA forward of `model` (a fixture path or a synthetic spec) under `policy` with a `cpu` one, or
    /// the reason the case is ignored.
    fn pair_of(model: &str, policy: Policy) -> Result<Pair, Outcome> {
        let weights = match model.strip_prefix("synth:") {
            Some(_) => moe_engine::spec::load_model(model).map_err(|e| Err(Failed::from(e.to_string())))?,
            None => load_model(model),
        };
        let cuda = match create_backend(BackendKind::Cuda, weights.clone(), policy) {
            Ok(f) => f,
            Err(EngineError::CudaUnavailable { reason }) => return Err(Ok(Completion::ignored_with(reason))),
            Err(e) => return Err(Err(Failed::from(e.to_string()))),
        };
        let cpu = create_backend(BackendKind::Cpu, weights, policy).map_err(|e| Err(e.to_string().into()))?;
        Ok((cuda, cpu))
    }

    fn nmse(a: &Matrix, b: &Matrix) -> f64 {
        let err: f64 = a.data.iter().zip(&b.data).map(|(x, y)| (x - y) * (x - y)).sum();
        let energy: f64 = b.data.iter().map(|y| y * y).sum();
        if err == 0.0 { 0.0 } else { err / energy }
    }

    /// Sub-layer taps of `cuda` under `policy` against `cpu` (issue 10 item 2): every layer alone on the
    /// `cpu` forward's input (`run_layer_tapped`) gives the `cpu` layer's taps (bit for bit under `exact`;
    /// nmse <= [`TAP_NMSE`] under `fast`, the expert slots where both chose the same experts); a forward
    /// with taps gives the values of one without (the fast experts then take the unfused launches); a
    /// traced decode step (under `fast`: the captured graph's kernels, launched one by one) gives the full
    /// forward's last row and every cache row it read.
    fn taps_match_cpu(model: &str, policy: Policy) -> Outcome {
        let (mut cuda, mut cpu) = match pair_of(model, policy) {
            Ok(pair) => pair,
            Err(outcome) => return outcome,
        };
        let n_layer = cuda.config().n_layer;
        let vocab = cuda.config().vocab as u32;
        let tokens: Vec<u32> = CANONICAL_PROMPTS[3].iter().map(|&t| t % vocab).collect();
        let with_taps = |f: &mut dyn Forward, tokens: &[u32], taps: bool| -> Result<Trace, String> {
            let trace = Trace::new("m", "", "", Precision::F64);
            let mut trace = if taps { trace.with_sub_layer_taps() } else { trace };
            f.forward(tokens, Some(&mut trace)).map_err(|e| e.to_string())?;
            Ok(trace)
        };
        let base = with_taps(&mut *cpu, &tokens, true)?;
        let (mut worst, mut skipped_slots) = (0.0f64, 0);
        for l in 0..n_layer {
            let input = match l {
                0 => continue, // layer 0 reads the embeddings, which each backend looks up itself
                l => base.layers[l - 1].hidden.clone(),
            };
            let (layer, taps) = cuda.run_layer_tapped(l, &input).map_err(|e| e.to_string())?;
            let same_experts = layer.router_experts == base.layers[l].router_experts;
            for tap in SubLayerTap::ALL {
                let (ours, theirs) = (tap.of(&taps), tap.of(&base.sub_layers[l]));
                ensure((ours.rows, ours.cols) == (theirs.rows, theirs.cols), || {
                    format!("{model} layer {l} {tap}: shape")
                })?;
                if policy == Policy::Exact {
                    ensure(ours == theirs, || format!("{model} exact layer {l}: {tap} differs from cpu's"))?;
                } else if same_experts || !matches!(tap, SubLayerTap::ExpertOut | SubLayerTap::MoeOut) {
                    let e = nmse(ours, theirs);
                    worst = worst.max(e);
                    ensure(e <= TAP_NMSE, || {
                        format!("{model} fast layer {l}: {tap} nmse {e:e} > {TAP_NMSE:e}")
                    })?;
                } else {
                    skipped_slots += 1;
                }
            }
        }
        let plain = with_taps(&mut *cuda, &tokens, false)?;
        let tapped = with_taps(&mut *cuda, &tokens, true)?;
        ensure(plain.layers == tapped.layers && plain.logits == tapped.logits, || {
            format!("{model} {policy}: asking for taps changed the forward's values")
        })?;
        ensure(tapped.sub_layers.len() == n_layer, || {
            format!("{model}: {} tapped layers", tapped.sub_layers.len())
        })?;
        let n = tokens.len();
        cuda.forward(&tokens[..n - 1], None).map_err(|e| e.to_string())?;
        let mut step = Trace::new("m", "", "", Precision::F64).with_sub_layer_taps();
        cuda.step_traced(tokens[n - 1], &mut step).map_err(|e| e.to_string())?;
        let last = |m: &Matrix| Matrix::from_f64(1, m.cols, m.row(m.rows - 1).to_vec());
        for l in 0..n_layer {
            let (s, t) = (&step.sub_layers[l], &tapped.sub_layers[l]);
            ensure(step.layers[l].hidden == last(&tapped.layers[l].hidden), || {
                format!("{model} step layer {l}: hidden")
            })?;
            for tap in SubLayerTap::ALL {
                ensure(tap.of(s) == &last(tap.of(t)), || format!("{model} step layer {l}: {tap}"))?;
            }
            ensure(s.cache_keys.as_ref() == Some(&t.k) && s.cache_values.as_ref() == Some(&t.v), || {
                format!("{model} step layer {l}: cache rows")
            })?;
        }
        println!(
            "    {model} {policy}: taps vs cpu worst nmse {worst:.3e} ({skipped_slots} expert taps set aside at ties); \
             taps change no value; the traced step is the forward's last row"
        );
        Ok(Completion::Completed)
    }
}
