//! Errors of the CUDA side: what is missing or failed, and what to do about it.

use cudarc::driver::DriverError;
use cudarc::driver::sys::cudaError_enum;

/// Everything opening a device, compiling the kernels, moving data or launching a kernel can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    // --- no CUDA here (the gate turns these into ignored trials) ---
    /// The driver library is missing or unusable.
    #[error("no usable CUDA driver: {reason}")]
    NoDriver { reason: String },
    /// The NVRTC runtime compiler library is missing.
    #[error(
        "no NVRTC library: {reason}; install the CUDA 13 NVRTC runtime (libnvrtc.so and \
         libnvrtc-builtins.so) and make it visible to the dynamic loader (LD_LIBRARY_PATH)"
    )]
    NoNvrtc { reason: String },
    /// The driver works but there is no device (or not the requested one).
    #[error("no CUDA device: {reason}")]
    NoDevice { reason: String },

    // --- CUDA is here but something failed ---
    /// `MOE_GATE_CUDA_TUNE` does not name knobs and values the kernels take.
    #[error(
        "{env}=`{spec}`: {reason}; it takes NAME=VALUE pairs separated by commas, NAME one of {knobs} and \
         VALUE in 1..={max} (or unset it to compile the kernels as they ship)",
        env = super::tuning::TUNE_ENV,
        knobs = super::tuning::knob_names(),
        max = super::tuning::MAX_KNOB
    )]
    Tuning { spec: String, reason: String },
    /// NVRTC rejected the kernels; the log says where.
    #[error(
        "NVRTC could not compile {program} for {arch} ({status}); the kernels' sources are \
         kernels/src/cuda/*.cu, and the log names the file and line. Compiler log:\n{log}"
    )]
    Compile { program: String, arch: String, status: String, log: String },
    /// A device allocation did not fit.
    #[error(
        "out of device memory while {stage}: {bytes} bytes requested, {free} of {total} bytes free; \
         use a smaller model or prompt, or a device with more memory"
    )]
    OutOfMemory { stage: String, bytes: usize, free: usize, total: usize },
    /// A driver call (copy, launch, synchronisation) failed.
    #[error("CUDA driver call failed while {stage}: {message}")]
    Driver { stage: String, message: String },
    /// An operation was called with inconsistent shapes or lengths (a programming error of the caller,
    /// reported instead of launching a kernel that would read or write out of bounds).
    #[error("invalid arguments for CUDA operation {op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },
}

impl CudaError {
    /// Whether the error means "no CUDA on this machine" (no driver, no NVRTC, no device) rather than a
    /// failure of CUDA that is present.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CudaError::NoDriver { .. } | CudaError::NoNvrtc { .. } | CudaError::NoDevice { .. })
    }

    /// A driver failure during `stage`, with the driver's name and description of the error.
    pub(crate) fn driver(stage: impl Into<String>, err: DriverError) -> Self {
        CudaError::Driver { stage: stage.into(), message: describe(err) }
    }

    /// An invalid-argument error of operation `op`.
    pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        CudaError::InvalidArgument { op, reason: reason.into() }
    }

    /// Whether a driver error is an out-of-memory condition.
    pub(crate) fn is_oom(err: &DriverError) -> bool {
        err.0 == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY
    }
}

/// `CUDA_ERROR_NAME: description` for a driver error.
pub(crate) fn describe(err: DriverError) -> String {
    let name = err.error_name().map(|s| s.to_string_lossy().into_owned());
    let text = err.error_string().map(|s| s.to_string_lossy().into_owned());
    match (name, text) {
        (Ok(n), Ok(t)) => format!("{n}: {t}"),
        _ => format!("{:?}", err.0),
    }
}
