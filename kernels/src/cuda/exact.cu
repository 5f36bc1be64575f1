// The `exact` policy's kernels: the canonical operation order of docs/numerics.md, the same order as the
// CPU's f32 kernels (`moe_kernels::quant::dot_row`, `moe_kernels::cpu`), so a `cuda` forward under `exact`
// gives the `cpu` forward's bits.
//
// Every floating-point operation is written as a correctly rounded intrinsic (__fadd_rn, __fsub_rn,
// __fmul_rn, __fdiv_rn, __fsqrt_rn), so neither NVRTC's --fmad default nor its -prec-div / -prec-sqrt /
// -ftz settings can change a result: no FMA contraction, IEEE division and square root, subnormals kept
// (as on the CPU). Comparisons and integer arithmetic are exact anyway.
//
// Dot products (weights x activations, q . k, sums of squares): 16 partial sums, element i into sum
// i % 16 in increasing i, then the halving tree s[l] += s[l + h] for h = 8, 4, 2, 1; the result is s[0].
// The xor butterfly over 16 lanes (offsets 8, 4, 2, 1) computes exactly that tree in lane 0: at each step
// lane l < h adds s[l] + s[l ^ h] = s[l] + s[l + h], with the operands in the CPU's order.

// ---- the canonical exp (moe_kernels::cpu::exp_f32; same constants, bit patterns, operations) ----------
#define EXACT_LOG2E __int_as_float(0x3fb8aa3b)
#define EXACT_LN2_HI __int_as_float(0x3f318000)
#define EXACT_LN2_LO __int_as_float(0xb95e8083)
#define EXACT_ROUND_MAGIC __int_as_float(0x4b400000)
#define EXACT_OVERFLOW __int_as_float(0x42b17218)
#define EXACT_UNDERFLOW __int_as_float(0xc2aeac50)

__device__ __forceinline__ float exact_exp(float x) {
    if (x != x) return x;
    if (x > EXACT_OVERFLOW) return F32_INF;
    if (x < EXACT_UNDERFLOW) return 0.0f;
    const float k = __fsub_rn(__fadd_rn(__fmul_rn(x, EXACT_LOG2E), EXACT_ROUND_MAGIC), EXACT_ROUND_MAGIC);
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(k, EXACT_LN2_HI)), __fmul_rn(k, EXACT_LN2_LO));
    float p = __int_as_float(0x39506967);
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(0x3ab743ce));
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(0x3c088908));
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(0x3d2aa9c1));
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(0x3e2aaaaa));
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(0x3f000000));
    const float e = __fadd_rn(__fadd_rn(__fmul_rn(p, __fmul_rn(r, r)), r), 1.0f);
    const int ki = (int)k;
    if (ki > 127) return __fmul_rn(__fmul_rn(e, __int_as_float(254 << 23)), 2.0f);
    return __fmul_rn(e, __int_as_float((ki + 127) << 23));
}

// silu(x) = x / (1 + exp(-x)) (moe_kernels::cpu::silu).
__device__ __forceinline__ float exact_silu(float x) {
    return __fdiv_rn(x, __fadd_rn(1.0f, exact_exp(-x)));
}

// y[i] = exact_exp(x[i]) for i < n: lets the tests compare the two exps bit for bit.
extern "C" __global__ void exp_exact(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = exact_exp(x[i]);
}

// Sum over lanes 0..16 by the halving tree (see the top of this file); lanes 16..31 do the same on their
// own values. Every lane of a 16-group ends with that group's result.
__device__ __forceinline__ float exact_tree16(float s) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) s = __fadd_rn(s, __shfl_xor_sync(FULL_MASK, s, o));
    return s;
}

// dot(a, b) over n elements by the 16 lanes of the calling thread's half-warp (lane l = threadIdx.x % 16
// takes elements l, l + 16, ... in order). Every lane of the half-warp returns the result.
#define EXACT_DOT_BATCH 16
__device__ __forceinline__ float exact_dot16(const float* a, const float* b, int n) {
    float s = 0.0f;
    // EXACT_DOT_BATCH elements' loads are issued before their (sequential) additions.
    for (int i0 = threadIdx.x & 15; i0 < n; i0 += 16 * EXACT_DOT_BATCH) {
        float av[EXACT_DOT_BATCH], bv[EXACT_DOT_BATCH];
#pragma unroll
        for (int u = 0; u < EXACT_DOT_BATCH; ++u) {
            const int i = i0 + 16 * u;
            av[u] = i < n ? a[i] : 0.0f;
            bv[u] = i < n ? b[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < EXACT_DOT_BATCH; ++u) {
            if (i0 + 16 * u < n) s = __fadd_rn(s, __fmul_rn(av[u], bv[u]));
        }
    }
    return exact_tree16(s);
}

// ---- weight rows ---------------------------------------------------------------------------------------

// Weight rows per block of the exact matrix-vector kernels: two threads per row.
#define EXACT_MV_ROWS 64
// Chunks a thread dequantises before it adds them (their loads in flight together; the additions stay in
// chunk order).
#define EXACT_CHUNK_BATCH 8

// dot(weight row, x) in dot_row's order, by the two threads 2j, 2j + 1 of a warp. Chunk c (weights
// 8c .. 8c + 8) lands in lanes 8 (c % 2) + i, so thread `half` = c % 2 holds lanes 8 half .. 8 half + 8 as
// acc[0..8] and takes chunks half, half + 2, ... in order. A float row's last partial chunk (k not a
// multiple of 8) belongs to the thread whose turn it is. Then the tree: lanes l + 8 come from the partner
// thread, the rest is within acc. Both threads return the result.
template <class F>
__device__ __forceinline__ float exact_row_dot(const u8* __restrict__ wrow, int k, const float* __restrict__ x) {
    const int half = threadIdx.x & 1;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    const int n_full = k >> 3;
    for (int c0 = half; c0 < n_full; c0 += 2 * EXACT_CHUNK_BATCH) {
        float v[EXACT_CHUNK_BATCH][8];
        float xv[EXACT_CHUNK_BATCH][8];
#pragma unroll
        for (int u = 0; u < EXACT_CHUNK_BATCH; ++u) {
            const int c = min(c0 + 2 * u, n_full - 1);
            F::chunk(wrow, c, v[u]);
#pragma unroll
            for (int i = 0; i < 8; ++i) xv[u][i] = x[8 * c + i];
        }
#pragma unroll
        for (int u = 0; u < EXACT_CHUNK_BATCH; ++u) {
            if (c0 + 2 * u < n_full) {
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(v[u][i], xv[u][i]));
            }
        }
    }
    if (F::QK == 1) {
        const int rem = k & 7;
        if (rem != 0 && half == (n_full & 1)) {
            for (int i = 0; i < rem; ++i) {
                const int e = 8 * n_full + i;
                acc[i] = __fadd_rn(acc[i], __fmul_rn(F::elem(wrow, e), x[e]));
            }
        }
    }
    // h = 8: s[i] = lanes[i] + lanes[i + 8] = (thread 0's acc[i]) + (thread 1's acc[i]).
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float other = __shfl_xor_sync(FULL_MASK, acc[i], 1);
        acc[i] = half == 0 ? __fadd_rn(acc[i], other) : __fadd_rn(other, acc[i]);
    }
#pragma unroll
    for (int h = 4; h > 0; h >>= 1) {
#pragma unroll
        for (int i = 0; i < h; ++i) acc[i] = __fadd_rn(acc[i], acc[i + h]);
    }
    return acc[0];
}

// Row r of the weights times one input row, for every r < n; block row blockIdx.y is a token (plain
// product: ids == 0, row t of x to row t of y) or a routed slot s (ids != 0: expert ids[s]'s matrix, input
// row s / in_div, output row s). With `gate`: silu(gate[s, r]) * dot (the SwiGLU of the up projection);
// with `accumulate`: y + dot (a residual connection). An expert id outside [0, n_expert) gives NaN.
// Grid (ceil(n / EXACT_MV_ROWS), rows of y), block 2 * EXACT_MV_ROWS.
template <class F>
__device__ __forceinline__ void exact_matvec_impl(const u8* w, u64 expert_bytes, u64 row_bytes, int k, int n,
                                                  int n_expert, const float* x, int in_div, const int* ids,
                                                  float* y, const float* gate, int accumulate) {
    const int r = blockIdx.x * EXACT_MV_ROWS + (threadIdx.x >> 1);
    // Threads past the last row compute row n - 1 too (and discard it): the shuffles need the full warp.
    const int row = min(r, n - 1);
    const int s = blockIdx.y;
    int e = 0;
    bool valid = true;
    if (ids != 0) {
        e = ids[s];
        valid = e >= 0 && e < n_expert;
        if (!valid) e = 0;
    }
    const u8* wrow = w + (u64)e * expert_bytes + (u64)row * row_bytes;
    const float d = exact_row_dot<F>(wrow, k, x + (u64)(s / in_div) * k);
    if (r < n && (threadIdx.x & 1) == 0) {
        const u64 o = (u64)s * n + r;
        float val = d;
        if (gate != 0) val = __fmul_rn(exact_silu(gate[o]), val);
        if (!valid) val = F32_NAN;
        y[o] = accumulate ? __fadd_rn(y[o], val) : val;
    }
}

#define MOE_GATE_EXACT_FORMAT_KERNEL(F, name)                                                                \
    extern "C" __global__ void __launch_bounds__(2 * EXACT_MV_ROWS)                                         \
        matvec_exact_##name(const u8* __restrict__ w, u64 expert_bytes, u64 row_bytes, int k, int n,          \
                            int n_expert, const float* __restrict__ x, int in_div, const int* __restrict__ ids, \
                            float* y, const float* __restrict__ gate, int accumulate) {                       \
        exact_matvec_impl<F>(w, expert_bytes, row_bytes, k, n, n_expert, x, in_div, ids, y, gate, accumulate); \
    }

MOE_GATE_EXACT_FORMAT_KERNEL(FmtF32, f32)
MOE_GATE_EXACT_FORMAT_KERNEL(FmtF16, f16)
MOE_GATE_EXACT_FORMAT_KERNEL(FmtBF16, bf16)
MOE_GATE_EXACT_FORMAT_KERNEL(FmtQ4_0, q4_0)
MOE_GATE_EXACT_FORMAT_KERNEL(FmtQ5_0, q5_0)
MOE_GATE_EXACT_FORMAT_KERNEL(FmtQ5_1, q5_1)
MOE_GATE_EXACT_FORMAT_KERNEL(FmtQ8_0, q8_0)
MOE_GATE_EXACT_FORMAT_KERNEL(FmtQ4_K, q4_k)
MOE_GATE_EXACT_FORMAT_KERNEL(FmtQ5_K, q5_k)
MOE_GATE_EXACT_FORMAT_KERNEL(FmtQ6_K, q6_k)

// ---- norms, RoPE -----------------------------------------------------------------------------------------

// The RMSNorm of moe_kernels::cpu::rms_norm: ss = dot(x, x); r = 1 / sqrt(ss / n + eps);
// out[i] = w[i] * (x[i] * r). Grid rows, block 32 (both half-warps compute the statistic).
extern "C" __global__ void __launch_bounds__(32)
    rmsnorm_exact(const float* x, const float* w, int n, float eps, float* out) {
    const float* xr = x + (u64)blockIdx.x * n;
    float* o = out + (u64)blockIdx.x * n;
    const float ss = exact_dot16(xr, xr, n);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)n), eps)));
    for (int i = threadIdx.x; i < n; i += 32) o[i] = __fmul_rn(w[i], __fmul_rn(xr[i], r));
}

// In place on x [n_tok, n_head, head_dim] (rows `row_stride` floats apart): each head RMS-normalised with
// w [head_dim] as rmsnorm_exact, then NEOX RoPE at position pos0 + t with the host's f32 tables
// cos_tab / sin_tab [position][head_dim / 2] (moe_kernels::cpu::RopeTable):
//   x'[i] = x[i] c - x[i + half] s,   x'[i + half] = x[i + half] c + x[i] s.
// One warp per (t, head), 4 warps per block.
#define EXACT_ROPE_WARPS 4
extern "C" __global__ void __launch_bounds__(32 * EXACT_ROPE_WARPS)
    head_norm_rope_exact(float* x, u64 row_stride, int n_tok, int n_head, int head_dim, const float* w,
                         float eps, int pos0, const float* cos_tab, const float* sin_tab) {
    const int idx = blockIdx.x * EXACT_ROPE_WARPS + (threadIdx.x >> 5);
    if (idx >= n_tok * n_head) return;  // whole warps only
    const int lane = threadIdx.x & 31;
    const int t = idx / n_head;
    const int h = idx % n_head;
    float* v = x + (u64)t * row_stride + (u64)h * head_dim;
    const int half = head_dim / 2;
    const float ss = exact_dot16(v, v, head_dim);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)head_dim), eps)));
    const u64 tab = (u64)(pos0 + t) * half;
    __syncwarp();
    for (int i = lane; i < half; i += WARP_SIZE) {
        const float a = __fmul_rn(w[i], __fmul_rn(v[i], r));
        const float b = __fmul_rn(w[i + half], __fmul_rn(v[i + half], r));
        const float c = cos_tab[tab + i];
        const float s = sin_tab[tab + i];
        v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        v[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}

// ---- attention -------------------------------------------------------------------------------------------

// moe_kernels::cpu::causal_attention_head for query t (position pos0 + t) and head h over cache positions
// 0 ..= pos0 + t: s_p = dot(q, k_p) * scale (16-lane order; each half-warp one position); the softmax in
// one thread: m = max (first to last, `>`), e_p = exp(s_p - m), sum = e_0 + e_1 + ... in increasing p,
// a_p = e_p / sum; then out[e] = sum_p a_p * v_p[e] accumulated in increasing p from 0.
// Grid (n_head, n_tok), block 128, dynamic shared memory (pos0 + n_tok) floats.
extern "C" __global__ void __launch_bounds__(128)
    attention_exact(const float* q, const float* k_cache, const float* v_cache, float* out, int n_head,
                    int n_kv_head, int head_dim, int pos0, float scale) {
    extern __shared__ float sc[];
    const int h = blockIdx.x;
    const int t = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    const int kvh = h / (n_head / n_kv_head);
    const u64 kv_stride = (u64)n_kv_head * head_dim;
    const float* qr = q + ((u64)t * n_head + h) * head_dim;
    const int n_ctx = pos0 + t + 1;
    for (int p0 = 2 * warp; p0 < n_ctx; p0 += 2 * n_warps) {
        const int p = p0 + (lane >> 4);
        const int pc = min(p, n_ctx - 1);
        const float s = exact_dot16(qr, k_cache + (u64)pc * kv_stride + (u64)kvh * head_dim, head_dim);
        if ((lane & 15) == 0 && p < n_ctx) sc[p] = __fmul_rn(s, scale);
    }
    __syncthreads();
    __shared__ float stat;
    // The maximum and the sum in one thread, in increasing p; the exponentials and divisions (independent
    // of each other) spread over the block.
    if (threadIdx.x == 0) {
        float m = sc[0];
        for (int p = 0; p < n_ctx; ++p) {
            if (sc[p] > m) m = sc[p];
        }
        stat = m;
    }
    __syncthreads();
    const float m = stat;
    for (int p = threadIdx.x; p < n_ctx; p += blockDim.x) sc[p] = exact_exp(__fsub_rn(sc[p], m));
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int p = 0; p < n_ctx; ++p) sum = __fadd_rn(sum, sc[p]);
        stat = sum;
    }
    __syncthreads();
    const float sum = stat;
    for (int p = threadIdx.x; p < n_ctx; p += blockDim.x) sc[p] = __fdiv_rn(sc[p], sum);
    __syncthreads();
    float* o = out + ((u64)t * n_head + h) * head_dim;
    const float* vh = v_cache + (u64)kvh * head_dim;
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float acc = 0.0f;
#pragma unroll 8
        for (int p = 0; p < n_ctx; ++p) acc = __fadd_rn(acc, __fmul_rn(sc[p], vh[(u64)p * kv_stride + e]));
        o[e] = acc;
    }
}

// ---- router, combine -------------------------------------------------------------------------------------

// moe_kernels::cpu::route for token t: p = softmax(logits[t]) (as in attention_exact: the maximum and
// the sum in one thread in increasing index, the exponentials and divisions spread over the warp); then
// the top k of the CPU's insertion (a value goes after every kept value >= it, so ties keep the lower
// index, and NaN is never preferred), which is the first k of the total order "greater value first, equal
// values by lower index, NaN after every number and NaNs by index": each lane ranks its experts by counting
// the experts ahead of them in that order, and an expert of rank j < k is choice j. Weights p[ids[j]],
// divided by their sum taken in choice order when `renormalise`. Grid n_tok, block 32, dynamic shared
// memory n_expert floats.
__device__ __forceinline__ bool exact_ahead(float pj, int j, float pi, int i) {
    const bool nan_i = pi != pi;
    const bool nan_j = pj != pj;
    if (nan_i) return nan_j ? j < i : true;
    return !nan_j && (pj > pi || (pj == pi && j < i));
}

extern "C" __global__ void __launch_bounds__(32)
    softmax_topk_exact(const float* logits, int n_expert, int k, int renormalise, int* ids, float* weights) {
    extern __shared__ float p[];
    __shared__ float stat;
    const int t = blockIdx.x;
    const int lane = threadIdx.x;
    const float* l = logits + (u64)t * n_expert;
    // The logits into shared memory first (all loads in flight together), then the scan in one thread.
    for (int i = lane; i < n_expert; i += WARP_SIZE) p[i] = l[i];
    __syncwarp();
    if (lane == 0) {
        float m = p[0];
        for (int i = 0; i < n_expert; ++i) {
            if (p[i] > m) m = p[i];
        }
        stat = m;
    }
    __syncwarp();
    const float m = stat;
    for (int i = lane; i < n_expert; i += WARP_SIZE) p[i] = exact_exp(__fsub_rn(p[i], m));
    __syncwarp();
    if (lane == 0) {
        float sum = 0.0f;
        for (int i = 0; i < n_expert; ++i) sum = __fadd_rn(sum, p[i]);
        stat = sum;
    }
    __syncwarp();
    const float sum = stat;
    for (int i = lane; i < n_expert; i += WARP_SIZE) p[i] = __fdiv_rn(p[i], sum);
    __syncwarp();
    int* out = ids + (u64)t * k;
    float* wt = weights + (u64)t * k;
    for (int i = lane; i < n_expert; i += WARP_SIZE) {
        const float pi = p[i];
        int rank = 0;
        for (int j = 0; j < n_expert && rank < k; ++j) rank += exact_ahead(p[j], j, pi, i);
        if (rank < k) {
            out[rank] = i;
            wt[rank] = pi;
        }
    }
    __syncwarp();
    if (lane == 0 && renormalise) {
        float s = 0.0f;
        for (int j = 0; j < k; ++j) s = __fadd_rn(s, wt[j]);
        for (int j = 0; j < k; ++j) wt[j] = __fdiv_rn(wt[j], s);
    }
}

// x[t, r] = x[t, r] + ((0 + o_0 w_0) + o_1 w_1 + ...) over the k slots of token t in choice order (each
// product rounded, then added), as the CPU forward sums. A slot whose id is out of range contributes NaN.
// Grid (ceil(hidden / 256), n_tok), block 256.
extern "C" __global__ void __launch_bounds__(256)
    moe_combine_exact(const float* expert_out, const int* ids, const float* weights, int k, int hidden,
                      int n_expert, float* x) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y;
    if (r >= hidden) return;
    float s = 0.0f;
    for (int j = 0; j < k; ++j) {
        const u64 slot = (u64)t * k + j;
        const int e = ids[slot];
        const float v = (e >= 0 && e < n_expert) ? expert_out[slot * hidden + r] : F32_NAN;
        s = __fadd_rn(s, __fmul_rn(v, weights[slot]));
    }
    float* o = x + (u64)t * hidden + r;
    *o = __fadd_rn(*o, s);
}
