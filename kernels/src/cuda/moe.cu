// The MoE router and the combination of expert outputs (HF transformers Qwen3MoeSparseMoeBlock:
// softmax over all experts, top-k, weights renormalised to sum 1 when norm_topk_prob).

// For token t: p = softmax(logits[t]) (p_i = exp(l_i - max) / sum, sums lane-strided + warp_sum), then k
// rounds of arg-max over the not yet chosen p (higher p first, equal p by lower index), then the k weights
// divided by their sum taken in choice order (when `renormalise`). Expert ids stay on the device.
// Grid n_tok, block 32, dynamic shared memory n_expert floats. A NaN router row yields in-range ids
// (0, 1, ...) with NaN weights, so no later kernel reads out of bounds and the NaN stays visible.
// One warp computes one token's choices (`p`: n_expert floats of shared memory); the logits are read
// through L2 (`__ldcg`), so a block may read those that other blocks of its grid wrote.
__device__ __forceinline__ void softmax_topk_row(const float* l, int n_expert, int k, int renormalise,
                                                 int* out_ids, float* out_w, float* p) {
    const int lane = threadIdx.x & 31;
    float mx = -F32_INF;
#pragma unroll 4
    for (int i = lane; i < n_expert; i += WARP_SIZE) mx = fmaxf(mx, __ldcg(l + i));
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int i = lane; i < n_expert; i += WARP_SIZE) {
        const float e = expf(__ldcg(l + i) - mx);
        p[i] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    bool poisoned = !(sum > 0.0f) || isinf(sum) || isnan(mx);
    for (int i = lane; i < n_expert; i += WARP_SIZE) {
        p[i] = p[i] / sum;
        if (isnan(__ldcg(l + i))) poisoned = true;
    }
    poisoned = __any_sync(FULL_MASK, poisoned);
    __syncwarp();
    // Every lane ends each round with the same choice (the butterfly), so every lane adds the weights in
    // choice order from zero (the sum lane 0 used to re-read from out_w) and lane j % 32 writes choice j,
    // keeping its weight (j < 32) for the division: no global value is read back.
    float sum_w = 0.0f;
    float mine = 0.0f;
    for (int j = 0; j < k; ++j) {
        // -1 marks a chosen expert: every probability is >= 0.
        float best = -1.0f;
        int best_i = 0x7fffffff;
        for (int i = lane; i < n_expert; i += WARP_SIZE) {
            if (p[i] > best) {
                best = p[i];
                best_i = i;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(FULL_MASK, best, o);
            const int oi = __shfl_xor_sync(FULL_MASK, best_i, o);
            if (ob > best || (ob == best && oi < best_i)) {
                best = ob;
                best_i = oi;
            }
        }
        const bool bad = poisoned || best_i >= n_expert;
        const float w = bad ? F32_NAN : best;
        if (lane == (j & 31)) {
            out_ids[j] = bad ? j % n_expert : best_i;
            out_w[j] = w;
            if (j < WARP_SIZE) mine = w;
        }
        if (!bad && lane == (best_i & 31)) p[best_i] = -1.0f;
        sum_w += w;
        __syncwarp();
    }
    if (renormalise) {
        for (int j = lane; j < k; j += WARP_SIZE) out_w[j] = (j < WARP_SIZE ? mine : out_w[j]) / sum_w;
    }
}

extern "C" __global__ void __launch_bounds__(32)
    softmax_topk(const float* logits, int n_expert, int k, int renormalise, int* ids, float* weights) {
    extern __shared__ float p[];
    const u64 t = blockIdx.x;
    softmax_topk_row(logits + t * n_expert, n_expert, k, renormalise, ids + t * k, weights + t * k, p);
}

// The router of one token in one launch: logits = W x as matvec1 computes them (each block its rows),
// then the last block to finish (counted in *counter, which it resets to 0) runs softmax_topk_row on
// them: the values of matvec then softmax_topk, one launch fewer. Grid ceil(n_expert / (DEC_WARPS *
// DEC_ROWS)), block 32 * DEC_WARPS, dynamic shared memory n_expert floats.
template <class F>
__device__ __forceinline__ void router_topk1_impl(const u8* w, u64 row_bytes, int k_cols, int n_expert,
                                                  const float* x, float* logits, int k, int renormalise,
                                                  int* ids, float* weights, int* counter) {
    extern __shared__ float router_p[];
    __shared__ int is_last;
    const int r0 = (blockIdx.x * DEC_WARPS + (threadIdx.x >> 5)) * DEC_ROWS;
    if (r0 < n_expert) {
        const u8* rows[DEC_ROWS];
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) rows[r] = w + (u64)min(r0 + r, n_expert - 1) * row_bytes;
        float acc[DEC_ROWS];
        dot_rows<F, DEC_ROWS, DEC_BATCH>(rows, k_cols, x, acc);
        if ((threadIdx.x & 31) == 0) {
#pragma unroll
            for (int r = 0; r < DEC_ROWS; ++r) {
                if (r0 + r < n_expert) logits[r0 + r] = acc[r];
            }
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (threadIdx.x < 32) softmax_topk_row(logits, n_expert, k, renormalise, ids, weights, router_p);
    if (threadIdx.x == 0) *counter = 0;
}

#define MOE_GATE_ROUTER_KERNEL(F, name)                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)                                             \
        router_topk1_##name(const u8* __restrict__ w, u64 row_bytes, int k_cols, int n_expert,               \
                            const float* __restrict__ x, float* logits, int k, int renormalise, int* ids,    \
                            float* weights, int* counter) {                                                  \
        router_topk1_impl<F>(w, row_bytes, k_cols, n_expert, x, logits, k, renormalise, ids, weights,        \
                             counter);                                                                       \
    }

MOE_GATE_ROUTER_KERNEL(FmtF32, f32)
MOE_GATE_ROUTER_KERNEL(FmtF16, f16)
MOE_GATE_ROUTER_KERNEL(FmtBF16, bf16)
MOE_GATE_ROUTER_KERNEL(FmtQ4_0, q4_0)
MOE_GATE_ROUTER_KERNEL(FmtQ5_0, q5_0)
MOE_GATE_ROUTER_KERNEL(FmtQ5_1, q5_1)
MOE_GATE_ROUTER_KERNEL(FmtQ8_0, q8_0)
MOE_GATE_ROUTER_KERNEL(FmtQ4_K, q4_k)
MOE_GATE_ROUTER_KERNEL(FmtQ5_K, q5_k)
MOE_GATE_ROUTER_KERNEL(FmtQ6_K, q6_k)

// Groups the routed slots by expert: offsets[e] .. offsets[e + 1] delimit, in `sorted`, the slots s (in
// increasing order) with ids[s] == e. Ids outside [0, n_expert) are left out (their slots get NaN from
// moe_combine). One block; thread e scans all ids for expert e, so the order never depends on timing.
// Dynamic shared memory: n_expert + 1 ints.
extern "C" __global__ void moe_group(const int* ids, int n_slots, int n_expert, int* offsets, int* sorted) {
    extern __shared__ int start[];
    for (int e = threadIdx.x; e < n_expert; e += blockDim.x) {
        int c = 0;
        for (int s = 0; s < n_slots; ++s) c += ids[s] == e;
        start[e + 1] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        start[0] = 0;
        for (int e = 0; e < n_expert; ++e) start[e + 1] += start[e];
    }
    __syncthreads();
    for (int e = threadIdx.x; e <= n_expert; e += blockDim.x) offsets[e] = start[e];
    for (int e = threadIdx.x; e < n_expert; e += blockDim.x) {
        int pos = start[e];
        for (int s = 0; s < n_slots; ++s) {
            if (ids[s] == e) sorted[pos++] = s;
        }
    }
}

// x[t, r] += sum_j weights[t, j] * expert_out[t * k + j, r], the k terms summed in choice order first.
// Grid (ceil(hidden / 256), n_tok), block 256. A slot whose id is out of range contributes NaN.
extern "C" __global__ void __launch_bounds__(256)
    moe_combine(const float* expert_out, const int* ids, const float* weights, int k, int hidden, int n_expert,
                float* x) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y;
    if (r >= hidden) return;
    float s = 0.0f;
    for (int j = 0; j < k; ++j) {
        const u64 slot = (u64)t * k + j;
        const int e = ids[slot];
        const float v = (e >= 0 && e < n_expert) ? expert_out[slot * hidden + r] : F32_NAN;
        s = combine_term(s, weights[slot], v);
    }
    float* o = x + (u64)t * hidden + r;
    *o = __fadd_rn(*o, s);
}
