// Shared definitions of moe-gate's CUDA kernels: integer types, half-precision conversions, warp reductions.
//
// The sources are compiled at run time with NVRTC, concatenated in the order `common.cuh`, `quant.cu`,
// `norm_rope.cu`, `attention.cu`, `moe.cu`, and include no header: NVRTC's built-in declarations (math
// functions, warp intrinsics) are all they use, so a machine needs only the driver and libnvrtc, not a CUDA
// toolkit's include directory.
//
// Canonical operation order (docs/numerics.md): a reduction over a row is split into lane-strided partial
// sums (lane l takes chunks l, l + 32, l + 64, ... in that order) combined by the xor butterfly below, whose
// result is identical in every lane.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define WARP_SIZE 32
// +infinity and a quiet NaN (no math.h under NVRTC).
#define F32_INF __int_as_float(0x7f800000)
#define F32_NAN __int_as_float(0x7fc00000)
#define FULL_MASK 0xffffffffu

// IEEE half -> float, exact (the PTX conversion; no cuda_fp16.h needed).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// bfloat16 -> float, exact: the 16 bits are the high half of the float.
__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Little-endian 16-bit load from a byte pointer of any alignment.
__device__ __forceinline__ u16 load_u16(const u8* p) {
    return (u16)((u32)p[0] | ((u32)p[1] << 8));
}

// Little-endian 32-bit load from a byte pointer of any alignment.
__device__ __forceinline__ u32 load_u32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// Sum over the 32 lanes of a warp by the xor butterfly (offsets 16, 8, 4, 2, 1). Lanes i and i^o add the
// same two values, so every lane ends with the bit-identical total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, o);
    }
    return v;
}

// Maximum over the 32 lanes of a warp (same butterfly).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    }
    return v;
}

// Sum over a block of up to 1024 threads: each warp's butterfly, then warp 0 sums the warp totals in warp
// order with the same butterfly. Every thread gets the total. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    float t = lane < n_warps ? scratch[lane] : 0.0f;
    t = warp_sum(t);
    return t;
}

// The canonical SiLU: x / (1 + exp(-x)). The addition and the product of swiglu are written as rounded
// intrinsics so that no kernel's context can contract them differently: every kernel that computes a
// SwiGLU gets the same bits.
__device__ __forceinline__ float silu(float x) {
    return x / __fadd_rn(1.0f, expf(-x));
}

// silu(g) * u, the SwiGLU of an expert's gate and up projections.
__device__ __forceinline__ float swiglu(float g, float u) {
    return __fmul_rn(silu(g), u);
}

// One term of the weighted sum of expert outputs: sum + w * o as one fused multiply-add (moe_combine and
// moe_down_combine1 both add their terms through this, in choice order from zero).
__device__ __forceinline__ float combine_term(float sum, float w, float o) {
    return __fmaf_rn(w, o, sum);
}
