// Causal grouped-query attention over a device KV cache (HF transformers eager_attention_forward:
// softmax(q k^T * scale) v, query head h reading kv head h / (n_head / n_kv_head)).

// Query t of the batch sits at position pos0 + t and attends to cache positions 0 ..= pos0 + t.
// q: [n_tok, n_head, head_dim]; k_cache, v_cache: [positions, n_kv_head, head_dim]; out like q.
// One block per (head, t), ATT_WARPS warps; warp w takes keys w, w + ATT_WARPS, ... with an online
// softmax (running max m, running sum l, accumulator acc), then the warps' states are merged in warp order:
// M = max m_w, L = sum l_w exp(m_w - M), out = sum acc_w exp(m_w - M) / L. head_dim <= 32 * ATT_MAX_PER_LANE.
#define ATT_WARPS 16
#define ATT_MAX_PER_LANE 8
// With `pos_ptr` != 0 the first query's position is *pos_ptr (a device counter, so a captured graph replays
// at any position); positions past max_pos (the cache's) leave out untouched.
extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)
    attention(const float* q, const float* k_cache, const float* v_cache, float* out, int n_head,
              int n_kv_head, int head_dim, int pos0, float scale, const int* pos_ptr, int max_pos) {
    if (pos_ptr != 0) pos0 = *pos_ptr;
    if (pos0 < 0 || pos0 + (int)gridDim.y > max_pos) return;
    __shared__ float s_m[ATT_WARPS];
    __shared__ float s_l[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][32 * ATT_MAX_PER_LANE];
    const int h = blockIdx.x;
    const int t = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int kvh = h / (n_head / n_kv_head);
    const u64 kv_stride = (u64)n_kv_head * head_dim;
    const float* qr = q + ((u64)t * n_head + h) * head_dim;
    const int last = pos0 + t;

    float qv[ATT_MAX_PER_LANE];
    float acc[ATT_MAX_PER_LANE];
#pragma unroll
    for (int a = 0; a < ATT_MAX_PER_LANE; ++a) {
        const int e = lane + 32 * a;
        qv[a] = e < head_dim ? qr[e] : 0.0f;
        acc[a] = 0.0f;
    }
    float m = -F32_INF;
    float l = 0.0f;
#pragma unroll 2
    for (int j = warp; j <= last; j += ATT_WARPS) {
        const float* kr = k_cache + (u64)j * kv_stride + (u64)kvh * head_dim;
        const float* vr = v_cache + (u64)j * kv_stride + (u64)kvh * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int a = 0; a < ATT_MAX_PER_LANE; ++a) {
            const int e = lane + 32 * a;
            if (e < head_dim) s += qv[a] * kr[e];
        }
        s = warp_sum(s) * scale;
#ifdef MOE_SEEDED_SOFTMAX_NO_MAX
        // Seeded defect (selftest only): no maximum subtracted, exp of the raw scores.
        const float m_new = 0.0f;
#else
        const float m_new = fmaxf(m, s);
#endif
        const float corr = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int a = 0; a < ATT_MAX_PER_LANE; ++a) {
            const int e = lane + 32 * a;
            if (e < head_dim) acc[a] = acc[a] * corr + p * vr[e];
        }
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int a = 0; a < ATT_MAX_PER_LANE; ++a) {
        const int e = lane + 32 * a;
        if (e < head_dim) s_acc[warp][e] = acc[a];
    }
    __syncthreads();
    float big_m = s_m[0];
    for (int w = 1; w < ATT_WARPS; ++w) big_m = fmaxf(big_m, s_m[w]);
    float big_l = 0.0f;
    for (int w = 0; w < ATT_WARPS; ++w) big_l += s_l[w] * expf(s_m[w] - big_m);
    float* o = out + ((u64)t * n_head + h) * head_dim;
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) sum += s_acc[w][e] * expf(s_m[w] - big_m);
        o[e] = sum / big_l;
    }
}
