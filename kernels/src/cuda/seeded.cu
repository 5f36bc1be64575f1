// Kernels of the seeded defects (moe_engine::defect; `cargo moe-gate selftest` only). No normal forward
// launches them: each is an extra step the defective orchestration inserts (seeded.rs launches them).

// Rounds each block of `block` values of x (rows of `cols`, blocks restarting at each row) to a symmetric
// 8-bit grid: step max|x| / 127 in f64, each value to the nearest step (half away from zero), as the
// CPU's round_to_q8_grid does. One thread per block.
extern "C" __global__ void seeded_round_q8(float* x, int rows, int cols, int block) {
    const int per_row = (cols + block - 1) / block;
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= rows * per_row) return;
    const int row = b / per_row;
    const int start = (b % per_row) * block;
    const int end = min(start + block, cols);
    float* v = x + (u64)row * cols;
    double amax = 0.0;
    for (int i = start; i < end; ++i) amax = fmax(amax, fabs((double)v[i]));
    if (amax == 0.0) return;
    const double step = amax / 127.0;
    for (int i = start; i < end; ++i) v[i] = (float)(round((double)v[i] / step) * step);
}

// Rounds each of the n values of x to f16 (nearest even) and back.
extern "C" __global__ void seeded_round_f16(float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned short h;
    float y;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x[i]));
    asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(h));
    x[i] = y;
}

// f32 rounded to bf16 (nearest even), as f32.
__device__ __forceinline__ float seeded_bf16(float v) {
    unsigned int bits = __float_as_uint(v);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return __uint_as_float(bits & 0xFFFF0000u);
}

// out[t][r] = w[r] . x[t] over f32 weights `w` [rows][cols], in increasing index, the running sum rounded
// to bf16 after each addition (each product rounded to f32 first). One thread per (row, token).
extern "C" __global__ void seeded_matvec_bf16acc(const float* w, const float* x, float* out, int rows,
                                                 int cols, int n_tok) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n_tok) return;
    const int t = i / rows;
    const int r = i % rows;
    const float* wr = w + (u64)r * cols;
    const float* xt = x + (u64)t * cols;
    float acc = 0.0f;
    for (int c = 0; c < cols; ++c) acc = seeded_bf16(__fadd_rn(acc, __fmul_rn(wr[c], xt[c])));
    out[(u64)t * rows + r] = acc;
}
