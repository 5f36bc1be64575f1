// RMSNorm and the per-head q/k RMSNorm fused with NEOX rotary embedding (HF transformers Qwen3RMSNorm,
// apply_rotary_pos_emb with rotate_half).

// out[r] = (x[r] * (1 / sqrt(mean(x[r]^2) + eps))) * w for each of `rows` rows of length n.
// Grid rows, block RMS_THREADS: lane-strided partial sums of squares (thread i takes i, i + RMS_THREADS,
// ..., each square one fused multiply-add into its sum), block_sum. Rows of up to RMS_THREADS * RMS_HELD
// values are read once, into registers (one round of loads instead of one per pass).
#define RMS_THREADS 256
#define RMS_HELD 8

// One row: o[i] = (xr[i] * r) * w[i] with r = 1 / sqrt(mean(xr^2) + eps), by a block of RMS_THREADS threads
// (the `rmsnorm` kernel's body, also run by the decode kernels that normalise their own input: every
// caller gets the same bits). `scratch` holds 32 floats of shared memory; `o` may be shared memory.
__device__ __forceinline__ void rmsnorm_row(const float* xr, const float* w, int n, float eps, float* o,
                                            float* scratch) {
    const int tid = threadIdx.x;
    float ss = 0.0f;
    if (n <= RMS_THREADS * RMS_HELD) {
        float xv[RMS_HELD];
        float wv[RMS_HELD];
#pragma unroll
        for (int j = 0; j < RMS_HELD; ++j) {
            const int i = tid + RMS_THREADS * j;
            xv[j] = i < n ? xr[i] : 0.0f;
            wv[j] = i < n ? w[i] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < RMS_HELD; ++j) {
            if (tid + RMS_THREADS * j < n) ss = __fmaf_rn(xv[j], xv[j], ss);
        }
        ss = block_sum(ss, scratch);
        const float r = 1.0f / sqrtf(ss / (float)n + eps);
#pragma unroll
        for (int j = 0; j < RMS_HELD; ++j) {
            const int i = tid + RMS_THREADS * j;
            if (i < n) o[i] = __fmul_rn(__fmul_rn(xv[j], r), wv[j]);
        }
        return;
    }
    for (int i = tid; i < n; i += RMS_THREADS) ss = __fmaf_rn(xr[i], xr[i], ss);
    ss = block_sum(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = tid; i < n; i += RMS_THREADS) o[i] = __fmul_rn(__fmul_rn(xr[i], r), w[i]);
}

extern "C" __global__ void __launch_bounds__(RMS_THREADS)
    rmsnorm(const float* x, const float* w, int n, float eps, float* out) {
    __shared__ float scratch[32];
    rmsnorm_row(x + (u64)blockIdx.x * n, w, n, eps, out + (u64)blockIdx.x * n, scratch);
}

// In place on x [n_tok, n_head, head_dim] (rows `row_stride` floats apart, head h at h * head_dim):
// each head vector is RMS-normalised with weight w [head_dim] (skipped when w == 0), then rotated by NEOX
// RoPE at position pos0 + t: for i < head_dim / 2, with a = angle(pos, i) = pos * inv_freq[i] in f64,
//   x'[i] = x[i] cos a - x[i + half] sin a,   x'[i + half] = x[i + half] cos a + x[i] sin a,
// cos and sin evaluated in f64 and rounded to f32 (the shared table definition of docs/numerics.md).
// One warp per (t, head); grid ceil(n_tok * n_head / 4), block 128. head_dim even, <= 256.
// With `pos_ptr` != 0 the first position is *pos_ptr instead of pos0 (a device counter, so a captured graph
// replays at any position) and, with `at_position`, the rows start at row *pos_ptr of x (a KV cache); a
// position range outside [0, max_pos) leaves x alone.
#define ROPE_WARPS 4

// One head vector v[0..head_dim] at position pos, by one warp: RMS-normalised with w (skipped when w == 0;
// each square one fused multiply-add into lane-strided sums, warp_sum), then NEOX RoPE; every product and
// sum written as a rounded intrinsic, so all callers compute the same bits.
__device__ __forceinline__ void norm_rope_head(float* v, int head_dim, const float* w, float eps, int pos_i,
                                               const double* inv_freq) {
    const int lane = threadIdx.x & 31;
    const int half = head_dim / 2;
    float r = 1.0f;
    if (w != 0) {
        float ss = 0.0f;
        for (int i = lane; i < head_dim; i += WARP_SIZE) ss = __fmaf_rn(v[i], v[i], ss);
        ss = warp_sum(ss);
        r = 1.0f / sqrtf(ss / (float)head_dim + eps);
    }
    const double pos = (double)pos_i;
    for (int i = lane; i < half; i += WARP_SIZE) {
        float a = v[i];
        float b = v[i + half];
        if (w != 0) {
            a = __fmul_rn(__fmul_rn(a, r), w[i]);
            b = __fmul_rn(__fmul_rn(b, r), w[i + half]);
        }
        const double angle = pos * inv_freq[i];
        const float c = (float)cos(angle);
        const float s = (float)sin(angle);
        v[i] = __fmaf_rn(a, c, -__fmul_rn(b, s));
        v[i + half] = __fmaf_rn(b, c, __fmul_rn(a, s));
    }
}

extern "C" __global__ void __launch_bounds__(32 * ROPE_WARPS)
    head_norm_rope(float* x, u64 row_stride, int n_tok, int n_head, int head_dim, const float* w, float eps,
                   int pos0, const double* inv_freq, const int* pos_ptr, int at_position, int max_pos) {
    const int idx = blockIdx.x * ROPE_WARPS + (threadIdx.x >> 5);
    if (idx >= n_tok * n_head) return;
    if (pos_ptr != 0) {
        pos0 = *pos_ptr;
        if (at_position) x += (u64)max(pos0, 0) * row_stride;
    }
    if (pos0 < 0 || pos0 + n_tok > max_pos) return;
    const int t = idx / n_head;
    const int h = idx % n_head;
    norm_rope_head(x + (u64)t * row_stride + (u64)h * head_dim, head_dim, w, eps, pos0 + t, inv_freq);
}

// The q and k heads of one token in one launch, at the position *pos_ptr (a device counter): q heads
// [n_q_head][head_dim] in place with norm wq, then the k heads of cache row *pos_ptr (rows k_stride floats
// apart) with norm wk, each exactly as head_norm_rope computes it. One warp per head; a position outside
// [0, max_pos) leaves both alone.
extern "C" __global__ void __launch_bounds__(32 * ROPE_WARPS)
    head_norm_rope_qk(float* q, int n_q_head, const float* wq, float* k_cache, u64 k_stride, int n_k_head,
                      const float* wk, int head_dim, float eps, const double* inv_freq, const int* pos_ptr,
                      int max_pos) {
    const int idx = blockIdx.x * ROPE_WARPS + (threadIdx.x >> 5);
    const int pos = *pos_ptr;
    if (idx >= n_q_head + n_k_head || pos < 0 || pos >= max_pos) return;
    if (idx < n_q_head) {
        norm_rope_head(q + (u64)idx * head_dim, head_dim, wq, eps, pos, inv_freq);
    } else {
        float* v = k_cache + (u64)pos * k_stride + (u64)(idx - n_q_head) * head_dim;
        norm_rope_head(v, head_dim, wk, eps, pos, inv_freq);
    }
}
