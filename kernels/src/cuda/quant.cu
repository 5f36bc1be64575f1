// GGUF block formats on the device: dequantisation and dequantise-dot matrix-vector products.
//
// Layouts and dequantisation formulas are ggml's (ggml-common.h, ggml-quants.c `dequantize_row_*`), the
// same definitions as the CPU twins in `moe_kernels::quant`. Each value is computed with explicitly rounded
// single operations (__fmul_rn, __fsub_rn, __fadd_rn) in ggml's order, so no FMA contraction can change
// it: a dequantised weight is bit-identical to the CPU's f32 dequantisation.
//
// A row is read in chunks of 8 consecutive weights (every block size is a multiple of 8). Activations stay
// f32: nothing is quantised on the activation side.

// Every format provides:
//   QK     weights per block (1 for the float formats)
//   BYTES  bytes per block
//   chunk(row, c, v)  v[0..8] = weights 8c .. 8c+8 of the row
//   Raw, load(row, c), decode(raw, c, v)
//                     chunk split in two: load reads chunk c's bytes (a Raw, held in registers), decode
//                     turns them into chunk c's 8 weights. The products load every chunk of a batch before
//                     they decode the first, so all of its loads are in flight together while the registers
//                     hold raw bytes (6 words for Q4_K) instead of 8 floats. chunk == decode(load).
//   elem(row, e)      weight e alone (used for the tail of float rows whose length is not a multiple of 8)

// load / decode for a format whose chunk has no cheaper raw form: Raw is the dequantised chunk itself.
#define MOE_GATE_RAW_IS_CHUNK                                                                                \
    struct Raw {                                                                                             \
        float v[8];                                                                                          \
    };                                                                                                       \
    __device__ static __forceinline__ Raw load(const u8* row, int c) {                                       \
        Raw r;                                                                                               \
        chunk(row, c, r.v);                                                                                  \
        return r;                                                                                            \
    }                                                                                                        \
    __device__ static __forceinline__ void decode(const Raw& r, int c, float* v) {                           \
        _Pragma("unroll") for (int i = 0; i < 8; ++i) v[i] = r.v[i];                                         \
    }

// Byte i (0..3) of `word`, minus `offset`, as a float, exactly: the byte becomes the low mantissa bits of
// 2^23 (one byte permute), and 2^23 + offset is subtracted (exact: both terms and the difference are
// integers below 2^24). One integer and one FP32 operation per weight instead of an integer-to-float
// conversion; the same value as (float)(byte - offset).
__device__ __forceinline__ float byte_minus(u32 word, int i, float two23_plus_offset) {
    return __fsub_rn(__uint_as_float(__byte_perm(word, 0x4B000000u, 0x7650u + (u32)i)), two23_plus_offset);
}
#define TWO23 8388608.0f

struct FmtF32 {
    static constexpr int QK = 1;
    static constexpr int BYTES = 4;
    __device__ static __forceinline__ float elem(const u8* row, int e) {
        return ((const float*)row)[e];
    }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) {
        const float* r = (const float*)row + 8 * c;
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = r[i];
    }
    MOE_GATE_RAW_IS_CHUNK
};

struct FmtF16 {
    static constexpr int QK = 1;
    static constexpr int BYTES = 2;
    __device__ static __forceinline__ float elem(const u8* row, int e) {
        return f16_to_f32(((const u16*)row)[e]);
    }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) {
        const u16* r = (const u16*)row + 8 * c;
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = f16_to_f32(r[i]);
    }
    MOE_GATE_RAW_IS_CHUNK
};

struct FmtBF16 {
    static constexpr int QK = 1;
    static constexpr int BYTES = 2;
    __device__ static __forceinline__ float elem(const u8* row, int e) {
        return bf16_to_f32(((const u16*)row)[e]);
    }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) {
        const u16* r = (const u16*)row + 8 * c;
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = bf16_to_f32(r[i]);
    }
    MOE_GATE_RAW_IS_CHUNK
};

// block_q4_0: f16 d; u8 qs[16]. Weight j < 16 is the low nibble of qs[j], weight j + 16 its high nibble;
// value (nibble - 8) * d.
struct FmtQ4_0 {
    static constexpr int QK = 32;
    static constexpr int BYTES = 18;
    __device__ static __forceinline__ float elem(const u8* row, int e) { return 0.0f; }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) {
        const u8* b = row + (u64)(c >> 2) * BYTES;
        const float d = f16_to_f32(load_u16(b));
        const int w = c & 3;
        const u8* qs = b + 2 + 8 * (w & 1);
        const int shift = (w >> 1) * 4;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int x = ((qs[i] >> shift) & 0x0F) - 8;
            v[i] = __fmul_rn((float)x, d);
        }
    }
    MOE_GATE_RAW_IS_CHUNK
};

// block_q5_0: f16 d; u8 qh[4] (bit j = fifth bit of weight j); u8 qs[16] (nibbles as in q4_0);
// value (nibble | fifth bit << 4) - 16, times d.
struct FmtQ5_0 {
    static constexpr int QK = 32;
    static constexpr int BYTES = 22;
    __device__ static __forceinline__ float elem(const u8* row, int e) { return 0.0f; }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) {
        const u8* b = row + (u64)(c >> 2) * BYTES;
        const float d = f16_to_f32(load_u16(b));
        const u32 qh = load_u32(b + 2);
        const int w = c & 3;
        const u8* qs = b + 6 + 8 * (w & 1);
        const int shift = (w >> 1) * 4;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int j = 8 * w + i;
            const int x = (int)(((qs[i] >> shift) & 0x0F) | (((qh >> j) & 1u) << 4)) - 16;
            v[i] = __fmul_rn((float)x, d);
        }
    }
    MOE_GATE_RAW_IS_CHUNK
};

// block_q5_1: f16 d; f16 m; u8 qh[4]; u8 qs[16]; value (nibble | fifth bit << 4) * d + m.
struct FmtQ5_1 {
    static constexpr int QK = 32;
    static constexpr int BYTES = 24;
    __device__ static __forceinline__ float elem(const u8* row, int e) { return 0.0f; }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) {
        const u8* b = row + (u64)(c >> 2) * BYTES;
        const float d = f16_to_f32(load_u16(b));
        const float m = f16_to_f32(load_u16(b + 2));
        const u32 qh = load_u32(b + 4);
        const int w = c & 3;
        const u8* qs = b + 8 + 8 * (w & 1);
        const int shift = (w >> 1) * 4;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int j = 8 * w + i;
            const int x = (int)(((qs[i] >> shift) & 0x0F) | (((qh >> j) & 1u) << 4));
            v[i] = __fadd_rn(__fmul_rn((float)x, d), m);
        }
    }
    MOE_GATE_RAW_IS_CHUNK
};

// block_q8_0: f16 d; i8 qs[32]; value q * d.
struct FmtQ8_0 {
    static constexpr int QK = 32;
    static constexpr int BYTES = 34;
    __device__ static __forceinline__ float elem(const u8* row, int e) { return 0.0f; }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) {
        const u8* b = row + (u64)(c >> 2) * BYTES;
        // 34-byte blocks keep 2-byte alignment: d and the 8 quants as 16-bit loads.
        const float d = f16_to_f32(*(const u16*)b);
        const u16* qs = (const u16*)(b + 2 + 8 * (c & 3));
        u16 q[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) q[i] = qs[i];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const i8 x = (i8)((q[i >> 1] >> (8 * (i & 1))) & 0xFF);
            v[i] = __fmul_rn((float)x, d);
        }
    }
    MOE_GATE_RAW_IS_CHUNK
};

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4), from the
// 12 scale bytes held in three little-endian words, without a branch.
__device__ __forceinline__ void scale_min_k4(int j, u32 w0, u32 w1, u32 w2, int* sc, int* m) {
    const int i = j & 3;
    const int q0 = (w0 >> (8 * i)) & 0xFF;  // q[j] for j < 4, q[j - 4] for j >= 4
    const int q1 = (w1 >> (8 * i)) & 0xFF;  // q[j + 4] for j < 4, q[j] for j >= 4
    const int q2 = (w2 >> (8 * i)) & 0xFF;  // q[j + 4] for j >= 4
    const bool low = j < 4;
    *sc = low ? (q0 & 63) : ((q2 & 0x0F) | ((q0 >> 6) << 4));
    *m = low ? (q1 & 63) : ((q2 >> 4) | ((q1 >> 6) << 4));
}

// block_q4_K: f16 d; f16 dmin; u8 scales[12]; u8 qs[128]. Sub-block s (32 weights) has scale d * sc_s and
// min dmin * m_s; its nibbles are the low (s even) or high (s odd) halves of qs[32 * (s / 2) ..][0..32].
// value (d * sc) * q - (dmin * m). Blocks are 144 bytes and rows start 16-byte aligned (the launcher's
// DeviceMatrix guarantees it), so the fields are read as aligned words.
struct FmtQ4_K {
    static constexpr int QK = 256;
    static constexpr int BYTES = 144;
    // The super-block's 16-byte head (d, dmin, scales) and the 8 bytes holding the chunk's nibbles.
    struct Raw {
        uint4 head;
        uint2 q;
    };
    __device__ static __forceinline__ float elem(const u8* row, int e) { return 0.0f; }
    __device__ static __forceinline__ Raw load(const u8* row, int c) {
        const u8* b = row + (u64)(c >> 5) * BYTES;
        const int w = c & 31;
        const int s = w >> 2;
        Raw r;
        r.head = *(const uint4*)b;
        r.q = *(const uint2*)(b + 16 + 32 * (s >> 1) + 8 * (w & 3));
        return r;
    }
    __device__ static __forceinline__ void decode(const Raw& r, int c, float* v) {
        const int s = (c & 31) >> 2;
        int sc, m;
        scale_min_k4(s, r.head.y, r.head.z, r.head.w, &sc, &m);
        const float d = f16_to_f32((u16)(r.head.x & 0xFFFF));
        const float dmin = f16_to_f32((u16)(r.head.x >> 16));
        const float d1 = __fmul_rn(d, (float)sc);
        const float m1 = __fmul_rn(dmin, (float)m);
        const int shift = (s & 1) * 4;
        const u32 lo = (r.q.x >> shift) & 0x0F0F0F0Fu;
        const u32 hi = (r.q.y >> shift) & 0x0F0F0F0Fu;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float x = byte_minus(i < 4 ? lo : hi, i & 3, TWO23);
            v[i] = __fsub_rn(__fmul_rn(d1, x), m1);
        }
    }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) { decode(load(row, c), c, v); }
};

// block_q5_K: f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]. As Q4_K, plus a fifth bit: bit s of
// qh[l] for weight l of sub-block s. value (d * sc) * (nibble + 16 * bit) - (dmin * m). 176-byte blocks:
// aligned words as for Q4_K.
struct FmtQ5_K {
    static constexpr int QK = 256;
    static constexpr int BYTES = 176;
    struct Raw {
        uint4 head;
        uint2 h;
        uint2 q;
    };
    __device__ static __forceinline__ float elem(const u8* row, int e) { return 0.0f; }
    __device__ static __forceinline__ Raw load(const u8* row, int c) {
        const u8* b = row + (u64)(c >> 5) * BYTES;
        const int w = c & 31;
        const int s = w >> 2;
        const int l0 = 8 * (w & 3);
        Raw r;
        r.head = *(const uint4*)b;
        r.h = *(const uint2*)(b + 16 + l0);
        r.q = *(const uint2*)(b + 48 + 32 * (s >> 1) + l0);
        return r;
    }
    __device__ static __forceinline__ void decode(const Raw& r, int c, float* v) {
        const int s = (c & 31) >> 2;
        int sc, m;
        scale_min_k4(s, r.head.y, r.head.z, r.head.w, &sc, &m);
        const float d = f16_to_f32((u16)(r.head.x & 0xFFFF));
        const float dmin = f16_to_f32((u16)(r.head.x >> 16));
        const float d1 = __fmul_rn(d, (float)sc);
        const float m1 = __fmul_rn(dmin, (float)m);
        const int shift = (s & 1) * 4;
        // Each byte: its nibble, plus bit s of the matching qh byte moved to bit 4.
        const u32 lo = ((r.q.x >> shift) & 0x0F0F0F0Fu) | (((r.h.x >> s) & 0x01010101u) << 4);
        const u32 hi = ((r.q.y >> shift) & 0x0F0F0F0Fu) | (((r.h.y >> s) & 0x01010101u) << 4);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float x = byte_minus(i < 4 ? lo : hi, i & 3, TWO23);
            v[i] = __fsub_rn(__fmul_rn(d1, x), m1);
        }
    }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) { decode(load(row, c), c, v); }
};

// 8 bytes at p (2-byte aligned) as two little-endian words: three aligned word loads around them, shifted
// into place (a shift of 0 when p is 4-byte aligned). Never reads past p + 10.
__device__ __forceinline__ uint2 load_8_at_2(const u8* p) {
    const u32* a = (const u32*)((u64)p & ~(u64)3);
    const u32 sh = ((u32)(u64)p & 3u) * 8u;
    const u32 w0 = a[0], w1 = a[1], w2 = a[2];
    return make_uint2(__funnelshift_r(w0, w1, sh), __funnelshift_r(w1, w2, sh));
}

// block_q6_K: u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d. Weight e: half h = e / 128, r = e % 128,
// quarter q = r / 32, l = r % 32; low 4 bits from ql[64h + 32 (q & 1) + l] (high nibble when q >= 2),
// high 2 bits from qh[32h + l] >> 2q; scale scales[8h + l / 16 + 2q]. value (d * scale) * (bits - 32).
// 210-byte blocks keep only 2-byte alignment: the 8 ql and 8 qh bytes of a chunk come through load_8_at_2
// (the 8 qh bytes end at most at byte 192 + 2, inside the block).
struct FmtQ6_K {
    static constexpr int QK = 256;
    static constexpr int BYTES = 210;
    struct Raw {
        uint2 ql;
        uint2 qh;
        u32 d;
        int scale;
    };
    __device__ static __forceinline__ float elem(const u8* row, int e) { return 0.0f; }
    __device__ static __forceinline__ Raw load(const u8* row, int c) {
        const u8* b = row + (u64)(c >> 5) * BYTES;
        const int e0 = 8 * (c & 31);
        const int h = e0 >> 7;
        const int q = (e0 & 127) >> 5;
        const int l0 = e0 & 31;
        Raw r;
        r.ql = load_8_at_2(b + 64 * h + 32 * (q & 1) + l0);
        r.qh = load_8_at_2(b + 128 + 32 * h + l0);
        r.d = *(const u16*)(b + 208);
        r.scale = ((const i8*)(b + 192))[8 * h + (l0 >> 4) + 2 * q];
        return r;
    }
    __device__ static __forceinline__ void decode(const Raw& r, int c, float* v) {
        const int q = ((8 * (c & 31)) & 127) >> 5;
        const float ds = __fmul_rn(f16_to_f32((u16)r.d), (float)r.scale);
        const int lshift = (q >> 1) * 4;
        const int hshift = 2 * q;
        // Each byte: 4 low bits from ql, 2 high bits from qh, 0..63 (the - 32 is in byte_minus).
        const u32 lo = ((r.ql.x >> lshift) & 0x0F0F0F0Fu) | (((r.qh.x >> hshift) & 0x03030303u) << 4);
        const u32 hi = ((r.ql.y >> lshift) & 0x0F0F0F0Fu) | (((r.qh.y >> hshift) & 0x03030303u) << 4);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(ds, byte_minus(i < 4 ? lo : hi, i & 3, TWO23 + 32.0f));
    }
    __device__ static __forceinline__ void chunk(const u8* row, int c, float* v) { decode(load(row, c), c, v); }
};

// Token tile: how many activation rows one warp multiplies with a weight row it has dequantised once.
#define TOKEN_TILE 8
// Warps (= weight rows) per block of the matrix-vector kernels.
#define MV_WARPS 4

// x[0..8] of an activation row. Quantised formats have rows of a multiple of 8 weights and the launcher
// checks that x is 16-byte aligned, so every chunk of x is: two float4 loads. Float formats may have any
// row length: scalar loads.
template <class F>
__device__ __forceinline__ void load_x8(const float* __restrict__ p, float* xv) {
    if (F::QK > 1) {
        const float4 a = ((const float4*)p)[0];
        const float4 b = ((const float4*)p)[1];
        xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
        xv[4] = b.x; xv[5] = b.y; xv[6] = b.z; xv[7] = b.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) xv[i] = p[i];
    }
}

// Chunks a lane loads (F::load) before it dequantises and multiplies the first: their loads are
// independent, so all of them are in flight together instead of one chunk's latency after another's.
#ifndef CHUNK_BATCH
#define CHUNK_BATCH 4
#endif

// acc[j] = dot(weight row, xs[j]) for j < nt, in the canonical order: lane l accumulates chunks
// l, l + 32, ... (each chunk's 8 products in order, each one fused multiply-add into the running sum) into
// one partial sum per token, then warp_sum. A float row whose length is not a multiple of 8 ends with a
// partial chunk, taken by the lane whose turn it is. Chunks are dequantised BATCH at a time (a chunk past
// the row end re-reads the last chunk and is not added); the additions stay in chunk order, so neither
// BATCH nor TILE changes a token's result.
template <class F, int TILE, int BATCH>
__device__ __forceinline__ void dot_tile_t(const u8* __restrict__ wrow, int k, const float* const* xs, int nt,
                                           float* acc) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < TILE; ++j) acc[j] = 0.0f;
    const int n_full = k >> 3;
    // Chunk c0 + 32 u of batch `base` (a multiple of 32): c & 31 == lane for every chunk c of this lane.
    for (int base = 0; base + lane < n_full; base += WARP_SIZE * BATCH) {
        const int c0 = base + lane;
        typename F::Raw raw[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) raw[u] = F::load(wrow, min(c0 + WARP_SIZE * u, n_full - 1));
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int c = c0 + WARP_SIZE * u;
            if (c < n_full) {
                float v[8];
                F::decode(raw[u], c, v);
#pragma unroll
                for (int j = 0; j < TILE; ++j) {
                    if (j < nt) {
                        float xv[8];
                        load_x8<F>(xs[j] + 8 * c, xv);
                        float s = acc[j];
#pragma unroll
                        for (int i = 0; i < 8; ++i) s = __fmaf_rn(v[i], xv[i], s);
                        acc[j] = s;
                    }
                }
            }
        }
    }
    if (F::QK == 1) {
        const int rem = k & 7;
        if (rem != 0 && lane == (n_full & 31)) {
            for (int i = 0; i < rem; ++i) {
                const int e = 8 * n_full + i;
                const float w = F::elem(wrow, e);
#pragma unroll
                for (int j = 0; j < TILE; ++j) {
                    if (j < nt) acc[j] = __fmaf_rn(w, xs[j][e], acc[j]);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < TILE; ++j) acc[j] = warp_sum(acc[j]);
}

template <class F>
__device__ __forceinline__ void dot_tile(const u8* __restrict__ wrow, int k, const float* const* xs, int nt,
                                         float* acc) {
    dot_tile_t<F, TOKEN_TILE, CHUNK_BATCH>(wrow, k, xs, nt, acc);
}

// acc[r] = dot(rows[r], x) for r < R: R weight rows against one activation row, each in exactly
// dot_tile_t's order (so each result is the bits dot_tile_t gives for that row and token): the
// single-token (decode) kernels' dot product. Software-pipelined: the raw chunks of the next BATCH are
// loaded before the current BATCH is dequantised and multiplied, so a lane keeps R * BATCH chunks of
// loads in flight while it computes. Split in two so a fused kernel can issue the first batch's loads
// before it computes its input (dot_rows_start, then dot_rows_finish).

// Loads one batch: chunks c + 32 u of each row (u < BATCH), a chunk past the row's n_full re-reading the
// last one.
template <class F, int R, int BATCH>
__device__ __forceinline__ void load_batch(const u8* const* rows, int c, int n_full,
                                           typename F::Raw (&raw)[R][BATCH]) {
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
#pragma unroll
        for (int r = 0; r < R; ++r) raw[r][u] = F::load(rows[r], min(c + WARP_SIZE * u, n_full - 1));
    }
}

// Issues the loads of the first batch: chunks lane + 32 u of each row (u < BATCH).
template <class F, int R, int BATCH>
__device__ __forceinline__ void dot_rows_start(const u8* const* rows, int k, typename F::Raw (&raw)[R][BATCH]) {
    load_batch<F, R, BATCH>(rows, threadIdx.x & 31, k >> 3, raw);
}

// Completes dot_rows from the batch dot_rows_start loaded into `raw`. PIPE = false loads each batch when
// its turn comes instead (half the registers): for rows a lane covers in one batch, where there is
// nothing to prefetch.
template <class F, int R, int BATCH, bool PIPE = true>
__device__ __forceinline__ void dot_rows_finish(const u8* const* rows, int k, const float* __restrict__ x,
                                                typename F::Raw (&raw)[R][BATCH], float* acc) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    const int n_full = k >> 3;
    // Chunk c0 + 32 u of batch `base` (a multiple of 32): c & 31 == lane for every chunk c of this lane.
    for (int base = 0; base + lane < n_full; base += WARP_SIZE * BATCH) {
        const int c0 = base + lane;
        if (!PIPE && base != 0) load_batch<F, R, BATCH>(rows, c0, n_full, raw);
        typename F::Raw cur[R][BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
#pragma unroll
            for (int r = 0; r < R; ++r) cur[r][u] = raw[r][u];
        }
        // The next batch's loads (the condition is the same in every lane of the warp).
        const int next = base + WARP_SIZE * BATCH;
        if (PIPE && next < n_full) load_batch<F, R, BATCH>(rows, next + lane, n_full, raw);
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int c = c0 + WARP_SIZE * u;
            if (c < n_full) {
                float xv[8];
                load_x8<F>(x + 8 * c, xv);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    float v[8];
                    F::decode(cur[r][u], c, v);
                    float s = acc[r];
#pragma unroll
                    for (int i = 0; i < 8; ++i) s = __fmaf_rn(v[i], xv[i], s);
                    acc[r] = s;
                }
            }
        }
    }
    if (F::QK == 1) {
        const int rem = k & 7;
        if (rem != 0 && lane == (n_full & 31)) {
            for (int i = 0; i < rem; ++i) {
                const int e = 8 * n_full + i;
#pragma unroll
                for (int r = 0; r < R; ++r) acc[r] = __fmaf_rn(F::elem(rows[r], e), x[e], acc[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
}

template <class F, int R, int BATCH, bool PIPE = true>
__device__ __forceinline__ void dot_rows(const u8* const* rows, int k, const float* __restrict__ x, float* acc) {
    typename F::Raw raw[R][BATCH];
    dot_rows_start<F, R, BATCH>(rows, k, raw);
    dot_rows_finish<F, R, BATCH, PIPE>(rows, k, x, raw, acc);
}

// y[t, r] (+)= dot(W row r, x[t]) for r < n, t < n_tok. W: n rows of row_bytes; x: [n_tok, k]; y: [n_tok, n].
// Grid (ceil(n / MV_WARPS), ceil(n_tok / TOKEN_TILE)), block 32 * MV_WARPS.
template <class F>
__device__ __forceinline__ void matvec_impl(const u8* w, u64 row_bytes, int k, int n, const float* x,
                                            int n_tok, float* y, int accumulate) {
    const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const int t0 = blockIdx.y * TOKEN_TILE;
    const int nt = min(TOKEN_TILE, n_tok - t0);
    const float* xs[TOKEN_TILE];
#pragma unroll
    for (int j = 0; j < TOKEN_TILE; ++j) xs[j] = x + (u64)(t0 + min(j, nt - 1)) * k;
    float acc[TOKEN_TILE];
    dot_tile<F>(w + (u64)row * row_bytes, k, xs, nt, acc);
    if ((threadIdx.x & 31) == 0) {
        for (int j = 0; j < nt; ++j) {
            float* o = y + (u64)(t0 + j) * n + row;
            *o = accumulate ? *o + acc[j] : acc[j];
        }
    }
}

// Expert matrix-vector products over routed slots. A slot s = t * k_used + j is token t's j-th expert
// ids[s]; its input row is x[s / in_div] (in_div = k_used when the input is the token's hidden state,
// 1 when it is the slot's own activation) and its output row is y[s]. With `gate`, the output is
// silu(gate[s, r]) * dot (the SwiGLU of the up projection); otherwise the dot itself.
// Two schedules, the same arithmetic for every output:
//   per slot  (offsets == 0): grid (ceil(n / MV_WARPS), n_slots); block y handles slot blockIdx.y.
//   grouped   (offsets != 0): grid (ceil(n / MV_WARPS), n_expert); block y handles expert blockIdx.y's
//             slots sorted[offsets[e] .. offsets[e + 1]] in tiles of TOKEN_TILE, reading its rows once
//             per tile instead of once per slot.
// An expert id outside [0, n_expert) yields NaN outputs instead of a read out of bounds.
template <class F>
__device__ __forceinline__ void moe_matvec_impl(const u8* w, u64 expert_bytes, u64 row_bytes, int k, int n,
                                                int n_expert, const float* x, int in_div, const int* ids,
                                                const int* offsets, const int* sorted, float* y,
                                                const float* gate) {
    const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    int e, begin, end;
    if (offsets != 0) {
        e = blockIdx.y;
        begin = offsets[e];
        end = offsets[e + 1];
    } else {
        e = ids[blockIdx.y];
        begin = blockIdx.y;
        end = begin + 1;
    }
    const bool valid = e >= 0 && e < n_expert;
    const u8* wrow = w + (valid ? (u64)e * expert_bytes : 0) + (u64)row * row_bytes;
    for (int b = begin; b < end; b += TOKEN_TILE) {
        const int nt = min(TOKEN_TILE, end - b);
        int slots[TOKEN_TILE];
        const float* xs[TOKEN_TILE];
#pragma unroll
        for (int j = 0; j < TOKEN_TILE; ++j) {
            const int i = b + min(j, nt - 1);
            slots[j] = offsets != 0 ? sorted[i] : i;
            xs[j] = x + (u64)(slots[j] / in_div) * k;
        }
        float acc[TOKEN_TILE];
        dot_tile<F>(wrow, k, xs, nt, acc);
        if ((threadIdx.x & 31) == 0) {
            for (int j = 0; j < nt; ++j) {
                const u64 o = (u64)slots[j] * n + row;
                float val = acc[j];
                if (gate != 0) val = swiglu(gate[o], val);
                y[o] = valid ? val : F32_NAN;
            }
        }
    }
}

// ---- single-token (decode) kernels -----------------------------------------------------------------------
// Each warp takes DEC_ROWS weight rows against one activation row with dot_rows, so every result is the
// bits the tiled kernels above give for the same row and token (decode after a prefill reproduces the
// prefill's values), with far fewer registers than a tile of 8 tokens needs and all of a row's chunks in
// flight at once.

// Warps per block and rows per warp of the single-token kernels.
#define DEC_WARPS 8
#define DEC_ROWS 1
#ifndef DEC_BATCH
#define DEC_BATCH 4
#endif
// Chunks per row of the batches moe_gate_up1 pipelines (two rows per warp: gate and up).
#ifndef GU_BATCH
#define GU_BATCH 2
#endif

// y[r] (+)= dot(W row r, x) for r < n: one token. With `pos` != 0 the output is row *pos of y (rows of n:
// the KV cache row of the position a device counter holds, so a captured graph replays at any position);
// a position outside [0, max_pos) writes nothing. Grid ceil(n / (DEC_WARPS * DEC_ROWS)), block
// 32 * DEC_WARPS.
template <class F>
__device__ __forceinline__ void matvec1_impl(const u8* w, u64 row_bytes, int k, int n, const float* x, float* y,
                                             int accumulate, const int* pos, int max_pos) {
    const int r0 = (blockIdx.x * DEC_WARPS + (threadIdx.x >> 5)) * DEC_ROWS;
    if (r0 >= n) return;
    const u8* rows[DEC_ROWS];
#pragma unroll
    for (int r = 0; r < DEC_ROWS; ++r) rows[r] = w + (u64)min(r0 + r, n - 1) * row_bytes;
    // The weights' first loads go out before the position's (they do not depend on it).
    typename F::Raw raw[DEC_ROWS][DEC_BATCH];
    dot_rows_start<F, DEC_ROWS, DEC_BATCH>(rows, k, raw);
    const int p = pos != 0 ? *pos : 0;
    if (p < 0 || p >= max_pos) return;
    float acc[DEC_ROWS];
    dot_rows_finish<F, DEC_ROWS, DEC_BATCH>(rows, k, x, raw, acc);
    if ((threadIdx.x & 31) == 0) {
        float* yb = y + (u64)p * n;
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
            if (r0 + r < n) {
                float* o = yb + r0 + r;
                *o = accumulate ? *o + acc[r] : acc[r];
            }
        }
    }
}

// Per routed slot s (grid y): y[s] = W[ids[s]] x[s / in_div], or with `gate` silu(gate[s]) * that (as
// moe_matvec's per-slot schedule computes it). Grid (ceil(n / (DEC_WARPS * DEC_ROWS)), n_slots).
template <class F>
__device__ __forceinline__ void moe_matvec1_impl(const u8* w, u64 expert_bytes, u64 row_bytes, int k, int n,
                                                 int n_expert, const float* x, int in_div, const int* ids,
                                                 float* y, const float* gate) {
    const int r0 = (blockIdx.x * DEC_WARPS + (threadIdx.x >> 5)) * DEC_ROWS;
    if (r0 >= n) return;
    const int s = blockIdx.y;
    const int e = ids[s];
    const bool valid = e >= 0 && e < n_expert;
    const u8* base = w + (valid ? (u64)e * expert_bytes : 0);
    const u8* rows[DEC_ROWS];
#pragma unroll
    for (int r = 0; r < DEC_ROWS; ++r) rows[r] = base + (u64)min(r0 + r, n - 1) * row_bytes;
    float acc[DEC_ROWS];
    dot_rows<F, DEC_ROWS, DEC_BATCH>(rows, k, x + (u64)(s / in_div) * k, acc);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
            if (r0 + r < n) {
                const u64 o = (u64)s * n + r0 + r;
                float val = acc[r];
                if (gate != 0) val = swiglu(gate[o], val);
                y[o] = valid ? val : F32_NAN;
            }
        }
    }
}

// The gate and up projections of routed slot s together (grid y): act[s, r] = silu(G[e] x . ) * (U[e] x)
// for e = ids[s], x = x[s / in_div]: the values moe_matvec gives for the gate and then the up projection
// with that gate, in one pass (both rows' loads in flight together). Grid (ceil(n / DEC_WARPS), n_slots).
template <class F>
__device__ __forceinline__ void moe_gate_up1_impl(const u8* wg, const u8* wu, u64 expert_bytes, u64 row_bytes,
                                                  int k, int n, int n_expert, const float* x, int in_div,
                                                  const int* ids, float* act) {
    const int row = blockIdx.x * DEC_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const int s = blockIdx.y;
    const int e = ids[s];
    const bool valid = e >= 0 && e < n_expert;
    const u64 off = (valid ? (u64)e * expert_bytes : 0) + (u64)row * row_bytes;
    const u8* rows[2] = {wg + off, wu + off};
    float acc[2];
    dot_rows<F, 2, GU_BATCH>(rows, k, x + (u64)(s / in_div) * k, acc);
    if ((threadIdx.x & 31) == 0) act[(u64)s * n + row] = valid ? swiglu(acc[0], acc[1]) : F32_NAN;
}

// Rows per block of moe_down_combine1.
#define DC_ROWS 2
// Chunks per row each lane of moe_down_combine1 loads before it multiplies: 3 covers a row of 768 weights
// (Qwen3-30B-A3B's expert width) in one round of loads.
#ifndef DC_BATCH
#define DC_BATCH 3
#endif
// Most routed slots per token moe_down_combine1 takes (one warp each).
#define DC_MAX_SLOTS 8

// The down projection of token t's k_used routed slots and their weighted sum into the residual (grid y =
// t): warp j computes rows r0 .. r0 + DC_ROWS of expert ids[t k_used + j] against act[t k_used + j] (as
// moe_matvec does), then one thread per row adds the slots in choice order from zero and adds the sum to
// x, as moe_combine does: x[t, r] = x[t, r] + (((0 + w_0 o_0) + w_1 o_1) + ...). Grid (ceil(n / DC_ROWS),
// n_tok), block 32 * k_used (k_used <= DC_MAX_SLOTS).
template <class F>
__device__ __forceinline__ void moe_down_combine1_impl(const u8* w, u64 expert_bytes, u64 row_bytes, int k,
                                                       int n, int n_expert, const float* act, const int* ids,
                                                       const float* weights, int k_used, float* x) {
    __shared__ float part[DC_ROWS][DC_MAX_SLOTS];
    const int j = threadIdx.x >> 5;
    const int t = blockIdx.y;
    const int r0 = blockIdx.x * DC_ROWS;
    const u64 s = (u64)t * k_used + j;
    const int e = ids[s];
    const bool valid = e >= 0 && e < n_expert;
    const u8* base = w + (valid ? (u64)e * expert_bytes : 0);
    const u8* rows[DC_ROWS];
#pragma unroll
    for (int r = 0; r < DC_ROWS; ++r) rows[r] = base + (u64)min(r0 + r, n - 1) * row_bytes;
    float acc[DC_ROWS];
    dot_rows<F, DC_ROWS, DC_BATCH, false>(rows, k, act + s * k, acc);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int r = 0; r < DC_ROWS; ++r) part[r][j] = valid ? acc[r] : F32_NAN;
    }
    __syncthreads();
    const int r = threadIdx.x;
    if (r < DC_ROWS && r0 + r < n) {
        float sum = 0.0f;
        for (int jj = 0; jj < k_used; ++jj) sum = combine_term(sum, weights[(u64)t * k_used + jj], part[r][jj]);
        float* o = x + (u64)t * n + r0 + r;
        *o = __fadd_rn(*o, sum);
    }
}

// out[t, 0..k] = row tokens[t] of W, dequantised (the embedding lookup; with tokens 0..n, a dequantiser).
// Grid (ceil(ceil(k / 8) / 128), n_tok), block 128: thread c writes chunk c. A token >= n_rows gives NaN.
template <class F>
__device__ __forceinline__ void get_rows_impl(const u8* w, u64 row_bytes, int k, int n_rows, const int* tokens,
                                              float* out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y;
    if (8 * c >= k) return;
    const int tok = tokens[t];
    float* o = out + (u64)t * k + 8 * c;
    const int n = min(8, k - 8 * c);
    if (tok < 0 || tok >= n_rows) {
        for (int i = 0; i < n; ++i) o[i] = F32_NAN;
        return;
    }
    const u8* row = w + (u64)tok * row_bytes;
    if (n == 8) {
        float v[8];
        F::chunk(row, c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = v[i];
    } else {
        for (int i = 0; i < n; ++i) o[i] = F::elem(row, 8 * c + i);
    }
}

#define MOE_GATE_FORMAT_KERNELS(F, name)                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * MV_WARPS)                                              \
        matvec_##name(const u8* __restrict__ w, u64 row_bytes, int k, int n, const float* __restrict__ x,    \
                      int n_tok, float* __restrict__ y, int accumulate) {                                                                      \
        matvec_impl<F>(w, row_bytes, k, n, x, n_tok, y, accumulate);                                         \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * MV_WARPS)                                              \
        moe_matvec_##name(const u8* __restrict__ w, u64 expert_bytes, u64 row_bytes, int k, int n,           \
                          int n_expert, const float* __restrict__ x, int in_div, const int* __restrict__ ids, \
                          const int* __restrict__ offsets, const int* __restrict__ sorted,                   \
                          float* __restrict__ y, const float* __restrict__ gate) {                                                     \
        moe_matvec_impl<F>(w, expert_bytes, row_bytes, k, n, n_expert, x, in_div, ids, offsets, sorted, y,   \
                           gate);                                                                            \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)                                             \
        matvec1_##name(const u8* __restrict__ w, u64 row_bytes, int k, int n, const float* __restrict__ x,   \
                       float* __restrict__ y, int accumulate, const int* __restrict__ pos, int max_pos) {   \
        matvec1_impl<F>(w, row_bytes, k, n, x, y, accumulate, pos, max_pos);                                 \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)                                             \
        moe_matvec1_##name(const u8* __restrict__ w, u64 expert_bytes, u64 row_bytes, int k, int n,          \
                           int n_expert, const float* __restrict__ x, int in_div, const int* __restrict__ ids, \
                           float* __restrict__ y, const float* __restrict__ gate) {                          \
        moe_matvec1_impl<F>(w, expert_bytes, row_bytes, k, n, n_expert, x, in_div, ids, y, gate);            \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)                                             \
        moe_gate_up1_##name(const u8* __restrict__ wg, const u8* __restrict__ wu, u64 expert_bytes,          \
                            u64 row_bytes, int k, int n, int n_expert, const float* __restrict__ x,          \
                            int in_div, const int* __restrict__ ids, float* __restrict__ act) {              \
        moe_gate_up1_impl<F>(wg, wu, expert_bytes, row_bytes, k, n, n_expert, x, in_div, ids, act);          \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * DC_MAX_SLOTS)                                           \
        moe_down_combine1_##name(const u8* __restrict__ w, u64 expert_bytes, u64 row_bytes, int k, int n,    \
                                 int n_expert, const float* __restrict__ act, const int* __restrict__ ids,   \
                                 const float* __restrict__ weights, int k_used, float* x) {                  \
        moe_down_combine1_impl<F>(w, expert_bytes, row_bytes, k, n, n_expert, act, ids, weights, k_used, x); \
    }                                                                                                        \
    extern "C" __global__ void get_rows_##name(const u8* w, u64 row_bytes, int k, int n_rows,                \
                                               const int* tokens, float* out) {                              \
        get_rows_impl<F>(w, row_bytes, k, n_rows, tokens, out);                                              \
    }

MOE_GATE_FORMAT_KERNELS(FmtF32, f32)
MOE_GATE_FORMAT_KERNELS(FmtF16, f16)
MOE_GATE_FORMAT_KERNELS(FmtBF16, bf16)
MOE_GATE_FORMAT_KERNELS(FmtQ4_0, q4_0)
MOE_GATE_FORMAT_KERNELS(FmtQ5_0, q5_0)
MOE_GATE_FORMAT_KERNELS(FmtQ5_1, q5_1)
MOE_GATE_FORMAT_KERNELS(FmtQ8_0, q8_0)
MOE_GATE_FORMAT_KERNELS(FmtQ4_K, q4_k)
MOE_GATE_FORMAT_KERNELS(FmtQ5_K, q5_k)
MOE_GATE_FORMAT_KERNELS(FmtQ6_K, q6_k)
