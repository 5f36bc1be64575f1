//! Drawing tensor bytes: random weights written straight in their storage format, deterministically.
//!
//! Block layouts are ggml's (`ggml-common.h`: `block_q8_0`, `block_q4_K`, `block_q5_K`, `block_q6_K`).
//! Quantised tensors are drawn in the quantised domain: random block scales and random quants whose
//! distribution is a discretised normal, so a block dequantises to weights of the intended standard
//! deviation without ever existing as floats. That is what lets the 30B shape build in seconds.
//!
//! Determinism: a tensor is cut into chunks of a fixed number of rows that depends only on its type and
//! shape; each chunk draws from its own ChaCha8 stream keyed by (seed, tensor name, chunk index, recipe
//! version), and only integer arithmetic and IEEE-exact f64 operations (+, -, *, /, sqrt; no
//! transcendental function, whose last bit may differ between C libraries) turn random bits into bytes.
//! So the bytes are the same on every machine whatever the number of threads.

use std::sync::OnceLock;

use half::{bf16, f16};
use moe_kernels::GgmlType;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Changes whenever the drawing changes, so files of different recipes never share a stream.
pub const RECIPE_VERSION: u64 = 1;

/// Bytes of output per chunk (rounded down to whole rows, at least one row): small enough to balance
/// 16 threads over one tensor, large enough that seeding a stream costs nothing.
const CHUNK_BYTES: usize = 1 << 18;

/// How the values of one tensor are distributed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Zero-mean weights of standard deviation `std`; each row's scale is multiplied by a factor drawn
    /// uniformly from `[1 - row_spread, 1 + row_spread]` (unequal expert popularity for a router).
    Normal { std: f64, row_spread: f64 },
    /// Gains around `mean` with standard deviation `spread` (RMSNorm weights; F32 only).
    Gain { mean: f64, spread: f64 },
}

/// Fills `out`, the bytes of a tensor of type `ty` with rows of `row_len` weights, in parallel.
///
/// # Panics
/// If `out` is not a whole number of rows, or a `Gain` tensor is not F32: the plan that calls this is
/// built and checked by this module's crate, never from input.
pub fn fill_tensor(name: &str, ty: GgmlType, row_len: usize, init: Init, seed: u64, out: &mut [u8]) {
    let row_bytes = ty.row_bytes(row_len).expect("synthetic rows hold whole blocks");
    assert_eq!(out.len() % row_bytes, 0, "tensor {name}: {} bytes is not whole rows", out.len());
    let rows_per_chunk = (CHUNK_BYTES / row_bytes).max(1);
    let name_key = fnv1a64(name.as_bytes());
    out.par_chunks_mut(rows_per_chunk * row_bytes).enumerate().for_each(|(chunk, bytes)| {
        let mut rng = chunk_rng(seed, name_key, chunk as u64);
        for row in bytes.chunks_exact_mut(row_bytes) {
            draw_row(ty, init, &mut rng, row);
        }
    });
}

/// The stream of chunk `chunk` of the tensor whose name hashes to `name_key`.
fn chunk_rng(seed: u64, name_key: u64, chunk: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (slot, word) in key.chunks_exact_mut(8).zip([seed, name_key, chunk, RECIPE_VERSION]) {
        slot.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// FNV-1a, 64-bit: a hash that, unlike std's, is specified and never changes between Rust releases.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Draws one row.
fn draw_row(ty: GgmlType, init: Init, rng: &mut ChaCha8Rng, row: &mut [u8]) {
    match init {
        Init::Gain { mean, spread } => {
            assert_eq!(ty, GgmlType::F32, "gains are stored as F32");
            for w in row.chunks_exact_mut(4) {
                w.copy_from_slice(&((mean + spread * standard_normal(rng)) as f32).to_le_bytes());
            }
        }
        Init::Normal { std, row_spread } => {
            let std = std * row_factor(rng, row_spread);
            let blocks = row.chunks_exact_mut(ty.type_size());
            match ty {
                GgmlType::F32 => blocks.for_each(|w| w.copy_from_slice(&normal_f32(rng, std).to_le_bytes())),
                GgmlType::F16 => blocks.for_each(|w| {
                    w.copy_from_slice(&f16::from_f32(normal_f32(rng, std)).to_bits().to_le_bytes())
                }),
                GgmlType::BF16 => blocks.for_each(|w| {
                    w.copy_from_slice(&bf16::from_f32(normal_f32(rng, std)).to_bits().to_le_bytes())
                }),
                GgmlType::Q8_0 => blocks.for_each(|b| q8_0_block(rng, std, b)),
                GgmlType::Q4_K => blocks.for_each(|b| q4_k_block(rng, std, b)),
                GgmlType::Q5_K => blocks.for_each(|b| q5_k_block(rng, std, b)),
                GgmlType::Q6_K => blocks.for_each(|b| q6_k_block(rng, std, b)),
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                    unreachable!("no synthetic mix stores {ty}")
                }
            }
        }
    }
}

/// A row's scale factor, uniform in `[1 - spread, 1 + spread]` (1 without drawing when `spread` is 0).
fn row_factor(rng: &mut ChaCha8Rng, spread: f64) -> f64 {
    if spread == 0.0 {
        return 1.0;
    }
    let u = f64::from(rng.next_u32() >> 8) / f64::from(1u32 << 24);
    1.0 + spread * (2.0 * u - 1.0)
}

/// A standard normal variate, approximated by the Irwin-Hall sum of four uniforms (mean 0, variance
/// exactly 1, bounded by ±2√3): exact integer sums and one rounding multiply, so bit-reproducible.
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let sum: u64 = (0..4).map(|_| u64::from(rng.next_u32() >> 8)).sum();
    // Each term is (r + 1/2) / 2^24, uniform on (0, 1); the sum has mean 2 and variance 1/3.
    const SQRT_3: f64 = 1.732_050_807_568_877_2;
    ((sum as f64 + 2.0) / f64::from(1u32 << 24) - 2.0) * SQRT_3
}

fn normal_f32(rng: &mut ChaCha8Rng, std: f64) -> f32 {
    (std * standard_normal(rng)) as f32
}

/// Rounds to binary16 and back (the value a block's f16 field will hold).
fn to_f16(v: f64) -> f16 {
    f16::from_f64(v)
}

/// Quant lookup tables: a uniformly random index maps to a quant value, so the quants follow a
/// discretised normal distribution (a binomial, clamped to the format's range).
struct QuantTables {
    /// 4-bit quants of Q4_K, centred on 7.5 (σ ≈ 3.2); indexed by a random byte.
    q4: Vec<u8>,
    /// 5-bit quants of Q5_K, centred on 15.5 (σ ≈ 6.5); indexed by a random byte.
    q5: Vec<u8>,
    /// 6-bit quants of Q6_K, centred on 32 (σ = 11); indexed by a random u16.
    q6: Vec<u8>,
    /// Signed 8-bit quants of Q8_0, centred on 0 (σ = 50), in -127..=127; indexed by a random u16.
    q8: Vec<i8>,
    /// Per table: the mean square distance of its values from the centre the format subtracts.
    q4_ms: f64,
    q5_ms: f64,
    q6_ms: f64,
    q8_ms: f64,
}

fn tables() -> &'static QuantTables {
    static TABLES: OnceLock<QuantTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let q4 = binomial_table(41, -13, 0, 15, 1 << 8);
        let q5 = binomial_table(169, -69, 0, 31, 1 << 8);
        let q6 = binomial_table(484, -210, 0, 63, 1 << 16);
        let q8 = binomial_table(10_000, -5000, -127, 127, 1 << 16);
        QuantTables {
            q4_ms: mean_square_about(&q4, 7.5),
            q5_ms: mean_square_about(&q5, 15.5),
            q6_ms: mean_square_about(&q6, 32.0),
            q8_ms: mean_square_about(&q8, 0.0),
            q4: q4.iter().map(|&v| v as u8).collect(),
            q5: q5.iter().map(|&v| v as u8).collect(),
            q6: q6.iter().map(|&v| v as u8).collect(),
            q8: q8.iter().map(|&v| v as i8).collect(),
        }
    })
}

/// `resolution` equiprobable values of `Binomial(n, 1/2) + offset` clamped to `[lo, hi]`: entry `i` is
/// the value whose cumulative probability first exceeds `(i + 1/2) / resolution`.
fn binomial_table(n: u32, offset: i64, lo: i64, hi: i64, resolution: usize) -> Vec<i64> {
    // Unnormalised probabilities by recurrence from the mode (no factorials, no exp): far tails
    // underflow to zero, which they are at the table's resolution anyway.
    let n = n as usize;
    let mode = n / 2;
    let mut p = vec![0.0f64; n + 1];
    p[mode] = 1.0;
    for k in mode..n {
        p[k + 1] = p[k] * (n - k) as f64 / (k + 1) as f64;
    }
    for k in (1..=mode).rev() {
        p[k - 1] = p[k] * k as f64 / (n - k + 1) as f64;
    }
    let total: f64 = p.iter().sum();
    let mut table = Vec::with_capacity(resolution);
    let (mut k, mut cdf) = (0usize, p[0] / total);
    for i in 0..resolution {
        let target = (i as f64 + 0.5) / resolution as f64;
        while cdf <= target && k < n {
            k += 1;
            cdf += p[k] / total;
        }
        table.push((k as i64 + offset).clamp(lo, hi));
    }
    table
}

fn mean_square_about(table: &[i64], centre: f64) -> f64 {
    table.iter().map(|&v| (v as f64 - centre) * (v as f64 - centre)).sum::<f64>() / table.len() as f64
}

/// Mean of `k²` for `k` uniform on `lo..=hi`.
fn mean_square_uniform(lo: u32, hi: u32) -> f64 {
    (lo..=hi).map(|k| f64::from(k * k)).sum::<f64>() / f64::from(hi - lo + 1)
}

/// Q8_0 block scale factors: `d` is multiplied by `(Q8_FACTOR_LO + r) / 64` with `r` uniform on
/// `0..=32`, the block-to-block spread of absmax scales in real files.
const Q8_FACTOR_LO: u32 = 48;

/// `block_q8_0`: f16 `d`, 32 × i8 `qs`; `w = d * q`.
fn q8_0_block(rng: &mut ChaCha8Rng, std: f64, block: &mut [u8]) {
    let t = tables();
    let mut r = [0u8; 65];
    rng.fill_bytes(&mut r);
    let factor_ms = mean_square_uniform(Q8_FACTOR_LO, Q8_FACTOR_LO + 32) / (64.0 * 64.0);
    let factor = f64::from(Q8_FACTOR_LO + u32::from(r[64]) % 33) / 64.0;
    let d = std / (factor_ms * t.q8_ms).sqrt() * factor;
    block[0..2].copy_from_slice(&to_f16(d).to_bits().to_le_bytes());
    for (q, idx) in block[2..34].iter_mut().zip(r[..64].chunks_exact(2)) {
        *q = t.q8[usize::from(u16::from_le_bytes([idx[0], idx[1]]))] as u8;
    }
}

/// Lowest 6-bit sub-block scale drawn for Q4_K and Q5_K (the highest is 63, as the quantiser makes it).
const K_SCALE_LO: u32 = 32;

/// Draws the 8 (scale, min) pairs of a Q4_K or Q5_K block and its `d`, `dmin`, and writes the first 16
/// bytes (`d`, `dmin`, `scales[12]`). Mins are set so each sub-block is centred on zero within a few
/// units of `dmin` (a small per-sub-block mean, as real quantised weights have): `dmin = centre * d`
/// and `m = sc + jitter`, jitter uniform on -2..=2.
fn k_scales(rng: &mut ChaCha8Rng, std: f64, centre: f64, quant_ms: f64, head: &mut [u8]) {
    let mut r = [0u8; 16];
    rng.fill_bytes(&mut r);
    let d = to_f16(std / (mean_square_uniform(K_SCALE_LO, 63) * quant_ms).sqrt());
    let dmin = to_f16(centre * d.to_f64());
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        sc[j] = (K_SCALE_LO + u32::from(r[j]) % (64 - K_SCALE_LO)) as u8;
        m[j] = (i32::from(sc[j]) + i32::from(r[8 + j] % 5) - 2).clamp(0, 63) as u8;
    }
    head[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
    head[2..4].copy_from_slice(&dmin.to_bits().to_le_bytes());
    head[4..16].copy_from_slice(&pack_k_scales(&sc, &m));
}

/// Packs eight 6-bit scales and mins as ggml's `get_scale_min_k4` unpacks them: bytes 0..4 hold
/// scales 0..4 and the top two bits of scales 4..8, bytes 4..8 mins 0..4 and the top bits of mins
/// 4..8, bytes 8..12 the low nibbles of scales (low) and mins (high) 4..8.
fn pack_k_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    out
}

/// `block_q4_K`: f16 `d`, f16 `dmin`, `scales[12]`, `qs[128]` (two 4-bit quants a byte).
fn q4_k_block(rng: &mut ChaCha8Rng, std: f64, block: &mut [u8]) {
    let t = tables();
    k_scales(rng, std, 7.5, t.q4_ms, &mut block[..16]);
    let mut r = [0u8; 256];
    rng.fill_bytes(&mut r);
    for (q, pair) in block[16..144].iter_mut().zip(r.chunks_exact(2)) {
        *q = t.q4[usize::from(pair[0])] | (t.q4[usize::from(pair[1])] << 4);
    }
}

/// `block_q5_K`: f16 `d`, f16 `dmin`, `scales[12]`, `qh[32]`, `qs[128]`. Quant `l` of sub-block `2j`
/// (`2j + 1`) has its low nibble in the low (high) half of `qs[32j + l]` and its fifth bit in bit `2j`
/// (`2j + 1`) of `qh[l]`.
fn q5_k_block(rng: &mut ChaCha8Rng, std: f64, block: &mut [u8]) {
    let t = tables();
    k_scales(rng, std, 15.5, t.q5_ms, &mut block[..16]);
    let mut r = [0u8; 256];
    rng.fill_bytes(&mut r);
    let (qh, qs) = block[16..176].split_at_mut(32);
    qh.fill(0);
    for j in 0..4 {
        for l in 0..32 {
            let lo = t.q5[usize::from(r[64 * j + 2 * l])];
            let hi = t.q5[usize::from(r[64 * j + 2 * l + 1])];
            qs[32 * j + l] = (lo & 0x0f) | ((hi & 0x0f) << 4);
            qh[l] |= ((lo >> 4) << (2 * j)) | ((hi >> 4) << (2 * j + 1));
        }
    }
}

/// Lowest magnitude of a Q6_K sub-block scale drawn (the highest is 127); signs are random.
const Q6_SCALE_LO: u32 = 64;

/// `block_q6_K`: `ql[128]`, `qh[64]`, `scales[16]` (i8), f16 `d`; `w = d * sc * (q - 32)`. Quants come in
/// fours sharing a `qh` byte: for half `h` and `l < 32`, the quants at `l`, `l + 32`, `l + 64`, `l + 96`
/// have low nibbles in `ql[64h + l]` (low), `ql[64h + l + 32]` (low), `ql[64h + l]` (high),
/// `ql[64h + l + 32]` (high) and their top two bits in bits 0-1, 2-3, 4-5, 6-7 of `qh[32h + l]`.
fn q6_k_block(rng: &mut ChaCha8Rng, std: f64, block: &mut [u8]) {
    let t = tables();
    let mut r = [0u8; 512 + 32];
    rng.fill_bytes(&mut r);
    let q = |i: usize| t.q6[usize::from(u16::from_le_bytes([r[2 * i], r[2 * i + 1]]))];
    let (ql, rest) = block.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    let (scales, d_bytes) = rest.split_at_mut(16);
    for h in 0..2 {
        for l in 0..32 {
            let base = 128 * h + 4 * l;
            let (q1, q2, q3, q4) = (q(base), q(base + 1), q(base + 2), q(base + 3));
            ql[64 * h + l] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
            ql[64 * h + l + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
            qh[32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    for (s, bits) in scales.iter_mut().zip(&r[512..]) {
        let magnitude = (Q6_SCALE_LO + u32::from(bits & 0x7f) % (128 - Q6_SCALE_LO)) as i8;
        *s = (if bits & 0x80 != 0 { -magnitude } else { magnitude }) as u8;
    }
    let d = std / (mean_square_uniform(Q6_SCALE_LO, 127) * t.q6_ms).sqrt();
    d_bytes.copy_from_slice(&to_f16(d).to_bits().to_le_bytes());
}

#[cfg(test)]
mod tests {
    use moe_kernels::quant::dequantize_row_f64;

    use super::*;

    /// The drawn weights have the intended standard deviation and zero mean, in every format.
    ///
    /// Tolerance: 65 536 weights estimate a standard deviation to about 0.3% (1/sqrt(2N)); block scales
    /// add a correlated part (256 weights share a K-quant super-block, 32 a Q8_0 block), and the f16
    /// rounding of `d` and the min jitter bias K-quants by under 1%: 3% covers both with margin while
    /// still catching any wrong constant (a wrong centre or table shifts the std by 10% or more).
    #[test]
    fn drawn_weights_have_the_intended_std() {
        let std = 0.02;
        let row_len = 4096;
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let rows = 16;
            let mut bytes = vec![0u8; ty.row_bytes(row_len).unwrap() * rows];
            fill_tensor(
                "blk.0.test.weight",
                ty,
                row_len,
                Init::Normal { std, row_spread: 0.0 },
                7,
                &mut bytes,
            );
            let mut w = vec![0.0f64; row_len * rows];
            for (row, out) in
                bytes.chunks_exact(ty.row_bytes(row_len).unwrap()).zip(w.chunks_exact_mut(row_len))
            {
                dequantize_row_f64(ty, row, out);
            }
            let n = w.len() as f64;
            let mean = w.iter().sum::<f64>() / n;
            let rms = (w.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
            assert!((rms / std - 1.0).abs() < 0.03, "{ty}: rms {rms} for intended std {std}");
            assert!(mean.abs() < 0.05 * std, "{ty}: mean {mean}");
        }
    }

    /// Every K-quant code appears: the tables reach the ends of each format's range (so kernels see
    /// the extreme quants), and the Q6_K quants are centred (q - 32 has mean about 0).
    #[test]
    fn quant_tables_cover_each_format_range() {
        let t = tables();
        let covers = |table: &[u8], max: u8| (0..=max).all(|v| table.contains(&v));
        assert!(covers(&t.q4, 15) && covers(&t.q5, 31) && covers(&t.q6, 63));
        assert!(t.q8.contains(&-127) && t.q8.contains(&127));
        let q6_mean = t.q6.iter().map(|&v| f64::from(v) - 32.0).sum::<f64>() / t.q6.len() as f64;
        assert!(q6_mean.abs() < 0.1, "q6 mean {q6_mean}");
    }

    /// The scale packing is the inverse of ggml's `get_scale_min_k4`.
    #[test]
    fn k_scale_packing_inverts_ggml_unpacking() {
        let sc = [1, 63, 17, 32, 45, 2, 60, 33];
        let m = [0, 5, 63, 31, 16, 47, 1, 62];
        let q = pack_k_scales(&sc, &m);
        for j in 0..8 {
            let (s, mm) = if j < 4 {
                (q[j] & 63, q[j + 4] & 63)
            } else {
                ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
            };
            assert_eq!((s, mm), (sc[j], m[j]), "sub-block {j}");
        }
    }

    /// The same seed gives the same bytes whatever the thread count; another seed or name does not.
    #[test]
    fn drawing_is_deterministic_across_pool_sizes() {
        let draw = |threads: usize, seed: u64, name: &str| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut bytes = vec![0u8; GgmlType::Q4_K.row_bytes(2048).unwrap() * 600];
            pool.install(|| {
                fill_tensor(
                    name,
                    GgmlType::Q4_K,
                    2048,
                    Init::Normal { std: 0.1, row_spread: 0.2 },
                    seed,
                    &mut bytes,
                )
            });
            bytes
        };
        let one = draw(1, 3, "a.weight");
        assert_eq!(one, draw(3, 3, "a.weight"));
        assert_ne!(one, draw(3, 4, "a.weight"));
        assert_ne!(one, draw(3, 3, "b.weight"));
    }
}
