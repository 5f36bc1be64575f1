//! CPU kernels other than the block formats: RMSNorm, RoPE, softmax, top-k, SwiGLU.
