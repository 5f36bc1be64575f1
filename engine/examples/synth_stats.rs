//! Per-layer statistics of a model's forward, to check (and document in docs/synthetic-models.md) that a
//! synthetic model behaves like a trained one: hidden-state RMS, attention sharpness, router margins,
//! logit spread. Also reports the time and peak memory of loading (building) the model.
//!
//! ```text
//! cargo run --release -p moe-engine --example synth_stats -- SPEC [--tokens N] [--backend cpu|reference]
//! ```
//!
//! Attention probabilities are not part of a trace, so they are recomputed here in f64 from each layer's
//! traced input with the shared kernels (RMSNorm, QK-norm, NEOX RoPE), as the forward computes them.

use std::sync::Arc;
use std::time::Instant;

use moe_engine::backend::{BackendKind, Policy, create_backend};
use moe_engine::spec::load_model;
use moe_engine::trace::{Precision, Trace};
use moe_engine::weights::{ModelWeights, WeightTensor};
use moe_kernels::cpu::{RopeTable, rms_norm, softmax_in_place};
use moe_kernels::quant::dequantize_row_f64;
use rayon::prelude::*;

fn main() {
    if let Err(message) = run() {
        eprintln!("synth_stats: {message}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = args.first().ok_or("usage: synth_stats SPEC [--tokens N] [--backend cpu|reference]")?;
    let option = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    let n_tokens: usize =
        option("--tokens").map_or(Ok(32), |v| v.parse()).map_err(|e| format!("--tokens: {e}"))?;
    let backend: BackendKind =
        option("--backend").map_or(Ok(BackendKind::Cpu), |v| v.parse()).map_err(|e| e.to_string())?;

    let start = Instant::now();
    let weights = load_model(spec).map_err(|e| e.to_string())?;
    let built = start.elapsed().as_secs_f64();
    let file_bytes = weights.file.as_bytes().len();
    println!(
        "model {spec}: loaded in {built:.2} s; file {:.3} GB; peak RSS {}",
        file_bytes as f64 / 1e9,
        peak_rss()
    );

    let tokens = prompt(n_tokens, weights.config.vocab);
    let mut forward =
        create_backend(backend, Arc::clone(&weights), Policy::Fast).map_err(|e| e.to_string())?;
    let mut trace = Trace::new(spec, backend.as_str(), "fast", Precision::F64);
    let start = Instant::now();
    forward.forward(&tokens, Some(&mut trace)).map_err(|e| e.to_string())?;
    println!("{backend} forward of {n_tokens} tokens: {:.2} s", start.elapsed().as_secs_f64());
    if let Some((tensor, index)) = trace.first_non_finite() {
        return Err(format!("non-finite value in {tensor} at {index}"));
    }
    report(&weights, &tokens, &trace);
    Ok(())
}

/// A fixed pseudo-random prompt of ordinary (non-special) token ids.
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % (vocab.min(151_643) as u64)) as u32
        })
        .collect()
}

fn report(w: &ModelWeights, tokens: &[u32], trace: &Trace) {
    let c = &w.config;
    let k = c.n_expert_used;
    println!();
    println!(
        "| layer | hidden RMS (min / mean / max over positions) | attention: entropy / ln(n) | max prob | router logit std | top-{k} margin median | min | margins < 1e-3 |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut input: Vec<Vec<f64>> = tokens.iter().map(|&t| row_f64(&w.token_embd, t as usize)).collect();
    let mut all_margins = Vec::new();
    for (l, layer) in trace.layers.iter().enumerate() {
        let rms: Vec<f64> = (0..tokens.len()).map(|t| rms(layer.hidden.row(t))).collect();
        let (entropy, max_prob) = attention_stats(w, l, &input);
        let mut margins = Vec::new();
        let mut logit_std = 0.0;
        for t in 0..tokens.len() {
            let mut logits = layer.router_logits.row(t).to_vec();
            let mean = logits.iter().sum::<f64>() / logits.len() as f64;
            logit_std +=
                (logits.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / logits.len() as f64).sqrt();
            logits.sort_by(|a, b| b.total_cmp(a));
            margins.push(logits[k - 1] - logits[k]);
        }
        logit_std /= tokens.len() as f64;
        margins.sort_by(f64::total_cmp);
        println!(
            "| {l} | {:.3} / {:.3} / {:.3} | {entropy:.3} | {max_prob:.3} | {logit_std:.3} | {:.4} | {:.2e} | {} |",
            rms.iter().copied().fold(f64::INFINITY, f64::min),
            rms.iter().sum::<f64>() / rms.len() as f64,
            rms.iter().copied().fold(0.0, f64::max),
            margins[margins.len() / 2],
            margins[0],
            margins.iter().filter(|&&m| m < 1e-3).count(),
        );
        all_margins.extend(margins);
        input = (0..tokens.len()).map(|t| layer.hidden.row(t).to_vec()).collect();
    }
    all_margins.sort_by(f64::total_cmp);
    let n = all_margins.len() as f64;
    let below = |x: f64| all_margins.iter().filter(|&&m| m < x).count() as f64 / n;
    println!();
    println!(
        "router margins (logit k minus logit k+1) over {} decisions: median {:.4}, P(<1e-2) {:.3}, P(<1e-3) {:.4}, P(<1e-4) {:.4}, min {:.2e}",
        all_margins.len(),
        all_margins[all_margins.len() / 2],
        below(1e-2),
        below(1e-3),
        below(1e-4),
        all_margins[0]
    );
    let last = trace.logits.row(tokens.len() - 1);
    let mean = last.iter().sum::<f64>() / last.len() as f64;
    let std = (last.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / last.len() as f64).sqrt();
    let mut sorted = last.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    println!(
        "final logits at the last position: std {std:.3}, top-1 {:.3} above the mean, top-1 - top-2 {:.4}",
        sorted[0] - mean,
        sorted[0] - sorted[1]
    );
}

/// Mean over heads and positions t >= 1 of the attention entropy divided by ln(t + 1) (1 = uniform),
/// and the mean largest attention probability.
fn attention_stats(w: &ModelWeights, l: usize, input: &[Vec<f64>]) -> (f64, f64) {
    let c = &w.config;
    let layer = &w.layers[l];
    let eps = c.rms_eps;
    let norm = vector_f64(&layer.attn_norm);
    let (q_norm, k_norm) = (vector_f64(&layer.attn_q_norm), vector_f64(&layer.attn_k_norm));
    let normed: Vec<Vec<f64>> = input
        .iter()
        .map(|x| {
            let mut out = vec![0.0; x.len()];
            rms_norm(x, &norm, eps, &mut out);
            out
        })
        .collect();
    let q = matmul(&layer.attn_q, &normed);
    let k = matmul(&layer.attn_k, &normed);
    let d = c.head_dim;
    let mut rope = RopeTable::<f64>::new(d, c.rope_theta);
    rope.ensure(input.len());
    let heads = |x: &[Vec<f64>], weight: &[f64], n_head: usize| -> Vec<Vec<Vec<f64>>> {
        x.iter()
            .enumerate()
            .map(|(pos, row)| {
                (0..n_head)
                    .map(|h| {
                        let mut out = vec![0.0; d];
                        rms_norm(&row[h * d..(h + 1) * d], weight, eps, &mut out);
                        rope.apply(&mut out, pos);
                        out
                    })
                    .collect()
            })
            .collect()
    };
    let (qh, kh) = (heads(&q, &q_norm, c.n_head), heads(&k, &k_norm, c.n_kv_head));
    let group = c.n_head / c.n_kv_head;
    let scale = 1.0 / (d as f64).sqrt();
    let (mut entropy, mut max_prob, mut count) = (0.0, 0.0, 0.0);
    for (t, query) in qh.iter().enumerate().skip(1) {
        for (h, q) in query.iter().enumerate() {
            let mut scores: Vec<f64> = kh[..=t]
                .iter()
                .map(|keys| q.iter().zip(&keys[h / group]).map(|(a, b)| a * b).sum::<f64>() * scale)
                .collect();
            softmax_in_place(&mut scores);
            entropy +=
                -scores.iter().filter(|&&p| p > 0.0).map(|p| p * p.ln()).sum::<f64>() / ((t + 1) as f64).ln();
            max_prob += scores.iter().copied().fold(0.0, f64::max);
            count += 1.0;
        }
    }
    (entropy / count, max_prob / count)
}

/// `W x` for each input row, with rows of `W` dequantised exactly, in parallel over rows of `W`.
fn matmul(w: &WeightTensor, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let cols: Vec<Vec<f64>> = (0..w.n_rows())
        .into_par_iter()
        .map(|r| {
            let row = row_f64(w, r);
            xs.iter().map(|x| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
        })
        .collect();
    (0..xs.len()).map(|t| cols.iter().map(|c| c[t]).collect()).collect()
}

fn row_f64(w: &WeightTensor, r: usize) -> Vec<f64> {
    let mut out = vec![0.0; w.row_len()];
    dequantize_row_f64(w.ty, w.row(r), &mut out);
    out
}

fn vector_f64(w: &WeightTensor) -> Vec<f64> {
    row_f64(w, 0)
}

fn rms(x: &[f64]) -> f64 {
    (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt()
}

/// The process's peak resident memory (`VmHWM`), where the platform reports it.
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l["VmHWM:".len()..].trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
