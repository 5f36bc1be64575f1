// The decode step's fused kernels (one token): each normalises its own input row into shared memory with
// rmsnorm_row (the `rmsnorm` kernel's body, so its bits) before its products with dot_rows (matvec1's
// order, so its bits). Each saves the norm's launch; the q / k / v kernel saves two more. Every block
// normalises the row itself (it is hidden floats from L2, cheaper than a launch); block 0 also writes it
// to `h`, where the expert kernels and the taps read it.

#if RMS_THREADS != 32 * DEC_WARPS
#error "the fused decode kernels run rmsnorm_row with their DEC_WARPS warps"
#endif

// Chunks of 8 weights each lane of the fused router loads before it multiplies them (one row per warp).
#ifndef ROUTER_BATCH
#define ROUTER_BATCH 8
#endif

// Dynamic shared memory of the fused kernels, 16-byte aligned for load_x8's float4 reads.
extern __shared__ float4 decode_smem[];

// The normalised row of x (hidden floats) in shared memory, and in h when this is block 0.
__device__ __forceinline__ float* normed_row(const float* x, const float* norm_w, int hidden, float eps, float* h) {
    __shared__ float scratch[32];
    float* hs = (float*)decode_smem;
    rmsnorm_row(x, norm_w, hidden, eps, hs, scratch);
    __syncthreads();
    if (blockIdx.x == 0) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) h[i] = hs[i];
    }
    return hs;
}

// y[r0 .. r0 + DEC_ROWS) = W rows . rmsnorm(x) for the rows below n (matvec1's arithmetic), when `write`:
// the warp issues its rows' first loads, then the block normalises x (normed_row: every thread of the
// block must call this), so the norm's latency overlaps the weights'. A warp past the last row loads
// row n - 1 and writes nothing.
template <class F>
__device__ __forceinline__ void norm_rows(const float* x, const float* norm_w, int hidden, float eps, float* h,
                                          const u8* w, u64 row_bytes, int n, float* y, int r0, bool write) {
    const u8* rows[DEC_ROWS];
#pragma unroll
    for (int r = 0; r < DEC_ROWS; ++r) rows[r] = w + (u64)min(r0 + r, n - 1) * row_bytes;
    typename F::Raw raw[DEC_ROWS][DEC_BATCH];
    dot_rows_start<F, DEC_ROWS, DEC_BATCH>(rows, hidden, raw);
    const float* hs = normed_row(x, norm_w, hidden, eps, h);
    if (!write || r0 >= n) return;
    float acc[DEC_ROWS];
    dot_rows_finish<F, DEC_ROWS, DEC_BATCH>(rows, hidden, hs, raw, acc);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
            if (r0 + r < n) y[r0 + r] = acc[r];
        }
    }
}

// The attention input of one token: h = rmsnorm(x) * norm_w, then q = Wq h into q, k = Wk h and v = Wv h
// into row *pos of the caches (rows of nk and nv floats): the values of rmsnorm, matvec and two
// matvec_to_row, in one launch. Blocks [0, bq) take q's rows, the next bk k's, the rest v's, DEC_WARPS *
// DEC_ROWS rows each. A position outside [0, max_pos) writes only h. Block 32 * DEC_WARPS, dynamic shared
// memory hidden floats.
template <class Fqk, class Fv>
__device__ __forceinline__ void norm_qkv1_impl(const float* x, const float* norm_w, int hidden, float eps,
                                               float* h, const u8* wq, u64 q_bytes, int nq, float* q,
                                               const u8* wk, u64 k_bytes, int nk, float* k_cache, const u8* wv,
                                               u64 v_bytes, int nv, float* v_cache, const int* pos, int max_pos) {
    const int p = *pos;
    const bool write = p >= 0 && p < max_pos;
    const u64 row = write ? (u64)p : 0;
    const int per_block = DEC_WARPS * DEC_ROWS;
    const int bq = (nq + per_block - 1) / per_block;
    const int bk = (nk + per_block - 1) / per_block;
    const int warp_r0 = (threadIdx.x >> 5) * DEC_ROWS;
    int b = blockIdx.x;
    if (b < bq) {
        norm_rows<Fqk>(x, norm_w, hidden, eps, h, wq, q_bytes, nq, q, b * per_block + warp_r0, write);
        return;
    }
    b -= bq;
    if (b < bk) {
        norm_rows<Fqk>(x, norm_w, hidden, eps, h, wk, k_bytes, nk, k_cache + row * nk, b * per_block + warp_r0,
                       write);
        return;
    }
    b -= bk;
    norm_rows<Fv>(x, norm_w, hidden, eps, h, wv, v_bytes, nv, v_cache + row * nv, b * per_block + warp_r0, write);
}

// The router of one token from the residual stream: h = rmsnorm(x) * norm_w, logits = W h (one row per
// warp, its ROUTER_BATCH chunks loaded before the norm is computed), then the last block to finish
// (counted in *counter, which it resets to 0) makes the choices with softmax_topk_row: the values of
// rmsnorm then router_topk1. Grid ceil(n_expert / DEC_WARPS), block 32 * DEC_WARPS, dynamic shared memory
// hidden + n_expert floats.
template <class F>
__device__ __forceinline__ void norm_router_topk1_impl(const float* x, const float* norm_w, int hidden, float eps,
                                                       float* h, const u8* w, u64 row_bytes, int n_expert,
                                                       float* logits, int k, int renormalise, int* ids,
                                                       float* weights, int* counter) {
    __shared__ int is_last;
    const int row = blockIdx.x * DEC_WARPS + (threadIdx.x >> 5);
    const u8* rows[1] = {w + (u64)min(row, n_expert - 1) * row_bytes};
    typename F::Raw raw[1][ROUTER_BATCH];
    dot_rows_start<F, 1, ROUTER_BATCH>(rows, hidden, raw);
    const float* hs = normed_row(x, norm_w, hidden, eps, h);
    float* p = (float*)decode_smem + ((hidden + 3) & ~3);
    if (row < n_expert) {
        float acc[1];
        dot_rows_finish<F, 1, ROUTER_BATCH, false>(rows, hidden, hs, raw, acc);
        if ((threadIdx.x & 31) == 0) logits[row] = acc[0];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (threadIdx.x < 32) softmax_topk_row(logits, n_expert, k, renormalise, ids, weights, p);
    if (threadIdx.x == 0) *counter = 0;
}

#define MOE_GATE_NORM_QKV_KERNEL(Fqk, Fv, name)                                                               \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)                                             \
        norm_qkv1_##name(const float* __restrict__ x, const float* __restrict__ norm_w, int hidden, float eps, \
                         float* __restrict__ h, const u8* __restrict__ wq, u64 q_bytes, int nq,              \
                         float* __restrict__ q, const u8* __restrict__ wk, u64 k_bytes, int nk,              \
                         float* __restrict__ k_cache, const u8* __restrict__ wv, u64 v_bytes, int nv,        \
                         float* __restrict__ v_cache, const int* __restrict__ pos, int max_pos) {            \
        norm_qkv1_impl<Fqk, Fv>(x, norm_w, hidden, eps, h, wq, q_bytes, nq, q, wk, k_bytes, nk, k_cache, wv, \
                                v_bytes, nv, v_cache, pos, max_pos);                                         \
    }

#define MOE_GATE_NORM_ROUTER_KERNEL(F, name)                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)                                             \
        norm_router_topk1_##name(const float* __restrict__ x, const float* __restrict__ norm_w, int hidden,   \
                                 float eps, float* __restrict__ h, const u8* __restrict__ w, u64 row_bytes,  \
                                 int n_expert, float* logits, int k, int renormalise, int* ids,              \
                                 float* weights, int* counter) {                                             \
        norm_router_topk1_impl<F>(x, norm_w, hidden, eps, h, w, row_bytes, n_expert, logits, k, renormalise, \
                                  ids, weights, counter);                                                    \
    }

// One format for q, k and v: every format. Mixed: the K-quant mixes of llama.cpp's Q4_K_M / Q5_K_M
// (attn_v promoted to Q6_K in some layers) and Q4_K q/k with Q5_K v.
#define MOE_GATE_DECODE_FORMAT_KERNELS(F, name)                                                              \
    MOE_GATE_NORM_QKV_KERNEL(F, F, name##_##name)                                                            \
    MOE_GATE_NORM_ROUTER_KERNEL(F, name)

MOE_GATE_DECODE_FORMAT_KERNELS(FmtF32, f32)
MOE_GATE_DECODE_FORMAT_KERNELS(FmtF16, f16)
MOE_GATE_DECODE_FORMAT_KERNELS(FmtBF16, bf16)
MOE_GATE_DECODE_FORMAT_KERNELS(FmtQ4_0, q4_0)
MOE_GATE_DECODE_FORMAT_KERNELS(FmtQ5_0, q5_0)
MOE_GATE_DECODE_FORMAT_KERNELS(FmtQ5_1, q5_1)
MOE_GATE_DECODE_FORMAT_KERNELS(FmtQ8_0, q8_0)
MOE_GATE_DECODE_FORMAT_KERNELS(FmtQ4_K, q4_k)
MOE_GATE_DECODE_FORMAT_KERNELS(FmtQ5_K, q5_k)
MOE_GATE_DECODE_FORMAT_KERNELS(FmtQ6_K, q6_k)
MOE_GATE_NORM_QKV_KERNEL(FmtQ4_K, FmtQ6_K, q4_k_q6_k)
MOE_GATE_NORM_QKV_KERNEL(FmtQ5_K, FmtQ6_K, q5_k_q6_k)
MOE_GATE_NORM_QKV_KERNEL(FmtQ4_K, FmtQ5_K, q4_k_q5_k)
