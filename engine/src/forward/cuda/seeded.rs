//! The seeded defects of the CUDA forward (`crate::defect`, `cargo moe-gate selftest` only): what the
//! forward's orchestration does differently when it was built with one. Each hook does what the forward
//! always does unless the defect alters that step: other upload-time values (RoPE base, swapped expert
//! stacks, an f32 router for the bf16 kernel), a compile variant of the kernels, or an extra launch of a
//! `seeded.cu` kernel on a copy of an activation. The decode graph is not used with a defect (decode
//! steps run `Layer::run` on one token, which computes the graph's values).

use std::sync::Arc;

use moe_kernels::cpu::route;
use moe_kernels::cuda::{
    CudaDevice, CudaError, DevSlice, DevSliceMut, DeviceBuffer, SEEDED_NO_FMA_CONTRACTION,
    SEEDED_SOFTMAX_NO_MAX,
};
use moe_kernels::quant::dequantize_row;

use super::DEVICE_ORDINAL;
use crate::config::ModelConfig;
use crate::defect::{Defect, SWAPPED_EXPERTS, WRONG_ROPE_THETA};
use crate::forward::qwen3_moe::seeded::take_next_expert;
use crate::weights::{ModelWeights, WeightTensor};

/// Values per block of the Q8 defects (ggml's Q8_0 and Q8_K).
const Q8_0_BLOCK: usize = 32;
const Q8_K_BLOCK: usize = 256;

/// The device with the kernels the defect needs: a compile variant for a defect inside a kernel, the
/// shipped kernels otherwise.
pub(super) fn open_device(defect: Option<Defect>) -> Result<Arc<CudaDevice>, CudaError> {
    match defect {
        Some(Defect::SoftmaxNoMaxSubtraction) => {
            CudaDevice::get_variant(DEVICE_ORDINAL, &[SEEDED_SOFTMAX_NO_MAX])
        }
        Some(Defect::CudaNoFmaContraction) => {
            CudaDevice::get_variant(DEVICE_ORDINAL, &[SEEDED_NO_FMA_CONTRACTION])
        }
        _ => CudaDevice::get(DEVICE_ORDINAL),
    }
}

/// The RoPE base the forward rotates by.
pub(super) fn rope_theta(defect: Option<Defect>, cfg: &ModelConfig) -> f64 {
    match defect {
        Some(Defect::RopeWrongBase) => WRONG_ROPE_THETA,
        _ => cfg.rope_theta,
    }
}

/// Positions the RoPE tables need beyond the last one of a run.
pub(super) fn rope_lead(defect: Option<Defect>) -> usize {
    usize::from(defect == Some(Defect::RopeDecodePositionPlusOne))
}

/// The position a run starting at `pos0` rotates its first token by: `pos0`, or one more in a decode
/// step.
pub(super) fn rope_pos0(defect: Option<Defect>, pos0: usize) -> usize {
    pos0 + usize::from(defect == Some(Defect::RopeDecodePositionPlusOne) && pos0 > 0)
}

/// Whether `defect` acts in layer `l`.
pub(super) fn in_layer(defect: Option<Defect>, d: Defect, l: usize, cfg: &ModelConfig) -> bool {
    defect == Some(d) && d.in_layer(l, cfg.n_layer)
}

/// The expert-stack bytes of `t` as uploaded: as stored, or with the two swapped experts' matrices
/// exchanged (layer `l` under [`Defect::ExpertIdsSwappedLastLayer`]).
pub(super) fn expert_bytes(defect: Option<Defect>, l: usize, cfg: &ModelConfig, t: &WeightTensor) -> Vec<u8> {
    let mut bytes = t.bytes().to_vec();
    if in_layer(defect, Defect::ExpertIdsSwappedLastLayer, l, cfg) {
        let experts = t.dims.get(2).copied().unwrap_or(1);
        let size = bytes.len() / experts.max(1);
        let (a, b) = SWAPPED_EXPERTS;
        if a < experts && b < experts && a < b {
            let (lo, hi) = bytes.split_at_mut(b * size);
            lo[a * size..(a + 1) * size].swap_with_slice(&mut hi[..size]);
        }
    }
    bytes
}

/// The router matrices of every layer dequantised to f32, for [`Defect::Bf16RouterAccumulation`]'s
/// kernel; none otherwise.
pub(super) fn f32_routers(
    device: &CudaDevice,
    defect: Option<Defect>,
    w: &ModelWeights,
) -> Result<Vec<DeviceBuffer<f32>>, CudaError> {
    if defect != Some(Defect::Bf16RouterAccumulation) {
        return Ok(Vec::new());
    }
    w.layers
        .iter()
        .map(|l| {
            let t = &l.ffn_gate_inp;
            let (rows, cols) = (t.n_rows(), t.row_len());
            let mut f = vec![0f32; rows * cols];
            for (r, row) in f.chunks_exact_mut(cols).enumerate() {
                dequantize_row(t.ty, &t.bytes()[r * t.row_bytes()..(r + 1) * t.row_bytes()], row);
            }
            device.upload(&f)
        })
        .collect()
}

/// The Q8 block of the defect, if it rounds the experts' input.
pub(super) fn q8_block(defect: Option<Defect>) -> Option<usize> {
    match defect {
        Some(Defect::Q8Block32ExpertInput) => Some(Q8_0_BLOCK),
        Some(Defect::Q8Block256ExpertInput) => Some(Q8_K_BLOCK),
        _ => None,
    }
}

/// A device copy of `src` (`len` values) for a seeded kernel to round.
pub(super) fn copy_of(d: &CudaDevice, src: DevSlice<'_, f32>) -> Result<DeviceBuffer<f32>, CudaError> {
    let mut copy = d.alloc_zeros::<f32>(src.len())?;
    d.copy_on_device(src, copy.as_mut())?;
    Ok(copy)
}

/// In a decode step of the stale-row layer (`pos0 > 0`), the `n` new cache rows are overwritten with
/// the row before the first (the write of the new keys and values never happened).
pub(super) fn stale_rows(
    d: &CudaDevice,
    rows: &mut DeviceBuffer<f32>,
    kvd: usize,
    pos0: usize,
    n: usize,
) -> Result<(), CudaError> {
    for p in pos0..pos0 + n {
        let previous = copy_of(d, rows.slice((p - 1) * kvd..p * kvd)?)?;
        d.copy_on_device(previous.as_slice(), rows.slice_mut(p * kvd..(p + 1) * kvd)?)?;
    }
    Ok(())
}

/// [`Defect::TopkNinthExpert`]: the layer's routing recomputed on the host from the device's router logits
/// (`moe_kernels::cpu::route`, then the (k+1)-th expert instead of the k-th), and uploaded over the
/// device's choice.
pub(super) fn next_expert_routing(
    d: &CudaDevice,
    cfg: &ModelConfig,
    logits: DevSlice<'_, f32>,
    ids: DevSliceMut<'_, i32>,
    weights: DevSliceMut<'_, f32>,
) -> Result<(), CudaError> {
    let (n_exp, k) = (cfg.n_expert, cfg.n_expert_used);
    let logits = d.download(logits)?;
    let n = logits.len() / n_exp;
    let (mut all_ids, mut all_w) = (vec![0i32; n * k], vec![0f32; n * k]);
    let mut probs = vec![0f32; n_exp];
    for (t, row) in logits.chunks_exact(n_exp).enumerate() {
        let (mut e, mut w) = (vec![0u32; k], vec![0f32; k]);
        route(row, cfg.norm_topk_prob, &mut probs, &mut e, &mut w);
        take_next_expert(&probs, cfg.norm_topk_prob, &mut e, &mut w);
        for s in 0..k {
            all_ids[t * k + s] = e[s] as i32;
            all_w[t * k + s] = w[s];
        }
    }
    d.copy_to_device(&all_ids, ids)?;
    d.copy_to_device(&all_w, weights)
}
