//! Opening a device (checking for the driver and NVRTC first), compiling the kernels once per device,
//! and device memory: owned buffers, borrowed views, and weight matrices in their GGUF blocks.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdeviceptr, cudaError_enum};
use cudarc::driver::{CudaContext, CudaFunction, CudaGraph, CudaModule, CudaStream, DeviceRepr, result};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx, compile_ptx_with_opts};

use super::error::{CudaError, describe};
use super::tuning::{TUNE_ENV, Tuning};
use super::{SYNC_EACH_LAUNCH_ENV, program_source};
use crate::quant::GgmlType;

/// The oldest driver these kernels run on: the build targets the CUDA 13.0 driver API (cudarc feature
/// `cuda-13000`), and NVRTC 13 emits PTX that older drivers cannot load.
const MIN_DRIVER_VERSION: i32 = 13000;

/// What a device is, for reports (`docs/parity.md` records it with every measurement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Driver's CUDA version as `cuDriverGetVersion` reports it (13000 = 13.0).
    pub driver_version: i32,
    /// NVRTC's version (major, minor).
    pub nvrtc_version: (i32, i32),
    /// Device memory in bytes.
    pub total_memory: usize,
    /// The load-batch knobs the kernels were compiled with ([`Tuning`]; default: as they ship).
    pub tuning: Tuning,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (device {}, sm_{}{}, {:.1} GiB), driver CUDA {}.{}, NVRTC {}.{}",
            self.name,
            self.ordinal,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10,
            self.nvrtc_version.0,
            self.nvrtc_version.1,
        )?;
        if !self.tuning.is_default() {
            write!(f, ", kernels tuned with {TUNE_ENV}={}", self.tuning)?;
        }
        Ok(())
    }
}

/// The kernels of one block format (`F`: a loaded function; the kernel's name where only the names are
/// wanted, see [`kernel_entry_names`]).
#[derive(Clone)]
pub(crate) struct FormatKernels<F = CudaFunction> {
    pub(crate) matvec: F,
    pub(crate) moe_matvec: F,
    pub(crate) get_rows: F,
    /// The `exact` policy's matrix-vector product (plain and per routed slot), `exact.cu`.
    pub(crate) matvec_exact: F,
    /// The single-token (decode) kernels: plain and per-slot products, the fused gate + up projection
    /// with its SwiGLU, and the fused down projection + weighted sum + residual.
    pub(crate) matvec1: F,
    pub(crate) moe_matvec1: F,
    pub(crate) moe_gate_up1: F,
    pub(crate) moe_down_combine1: F,
    /// The router of one token with its softmax and top-k, `moe.cu`.
    pub(crate) router_topk1: F,
    /// The same, normalising its input first (`decode.cu`).
    pub(crate) norm_router_topk1: F,
}

/// Format pairs (q and k, v) of the fused decode kernel `norm_qkv1` besides one format for all three
/// (`decode.cu`): llama.cpp's K-quant mixes promote `attn_v`.
pub(crate) const NORM_QKV_MIXED: [(GgmlType, GgmlType); 3] =
    [(GgmlType::Q4_K, GgmlType::Q6_K), (GgmlType::Q5_K, GgmlType::Q6_K), (GgmlType::Q4_K, GgmlType::Q5_K)];

/// Every kernel of the program, looked up once.
#[derive(Clone)]
pub(crate) struct Kernels<F = CudaFunction> {
    pub(crate) formats: HashMap<GgmlType, FormatKernels<F>>,
    /// The decode step's attention input (norm, q, k, v) by (q and k format, v format), `decode.cu`.
    pub(crate) norm_qkv1: HashMap<(GgmlType, GgmlType), F>,
    pub(crate) rmsnorm: F,
    pub(crate) head_norm_rope: F,
    pub(crate) head_norm_rope_qk: F,
    pub(crate) attention: F,
    pub(crate) softmax_topk: F,
    pub(crate) moe_group: F,
    pub(crate) moe_combine: F,
    /// The `exact` policy's kernels (`exact.cu`).
    pub(crate) exact: ExactKernels<F>,
    /// The seeded defects' kernels (`seeded.cu`), launched by no normal forward.
    pub(crate) seeded: SeededKernels<F>,
}

/// The kernels of `seeded.cu`.
#[derive(Clone)]
pub(crate) struct SeededKernels<F = CudaFunction> {
    pub(crate) round_q8: F,
    pub(crate) round_f16: F,
    pub(crate) matvec_bf16acc: F,
}

/// The kernels of `exact.cu` that do not depend on a block format.
#[derive(Clone)]
pub(crate) struct ExactKernels<F = CudaFunction> {
    pub(crate) exp: F,
    pub(crate) rmsnorm: F,
    pub(crate) head_norm_rope: F,
    pub(crate) attention: F,
    pub(crate) softmax_topk: F,
    pub(crate) moe_combine: F,
}

/// One CUDA device with the kernels compiled for it and the stream all work is queued on.
///
/// There is one per device and process ([`CudaDevice::get`]); it is shared (`Arc`) by every forward.
pub struct CudaDevice {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) kernels: Kernels,
    pub(crate) sync_each_launch: bool,
    info: DeviceInfo,
    _module: Arc<CudaModule>,
    ctx: Arc<CudaContext>,
}

/// Devices opened so far, by ordinal. Holding the lock while opening makes the NVRTC compile happen once.
static DEVICES: Mutex<Vec<Arc<CudaDevice>>> = Mutex::new(Vec::new());
/// A compile variant opened by [`CudaDevice::get_variant`]: its ordinal, its extra NVRTC options, the device.
type Variant = (usize, Vec<String>, Arc<CudaDevice>);
/// Compile variants opened so far, by ordinal and extra NVRTC options.
static VARIANTS: Mutex<Vec<Variant>> = Mutex::new(Vec::new());

impl CudaDevice {
    /// The device `ordinal`, opened (and its kernels compiled) on first use.
    ///
    /// Checks that the driver library, NVRTC and the device exist before calling into them, so a machine
    /// without CUDA gets [`CudaError::NoDriver`] / [`CudaError::NoNvrtc`] / [`CudaError::NoDevice`]
    /// (see [`CudaError::is_unavailable`]) instead of a panic.
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>, CudaError> {
        let mut devices = DEVICES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(d) = devices.iter().find(|d| d.info.ordinal == ordinal) {
            return Ok(d.clone());
        }
        let device = Arc::new(Self::open(ordinal)?);
        devices.push(device.clone());
        Ok(device)
    }

    /// The device `ordinal` with the kernels compiled with the extra NVRTC `options` (a `-D` define or a
    /// flag only a seeded defect asks for: `seeded::SEEDED_*`), opened and compiled on first use. No
    /// normal forward asks for one: [`CudaDevice::get`] compiles the kernels as they ship.
    pub fn get_variant(ordinal: usize, options: &[&str]) -> Result<Arc<CudaDevice>, CudaError> {
        let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
        let mut variants = VARIANTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, _, d)) = variants.iter().find(|(o, opts, _)| *o == ordinal && *opts == options) {
            return Ok(d.clone());
        }
        let base = Self::get(ordinal)?;
        base.bind()?;
        let arch = format!("compute_{}{}", base.info.compute_capability.0, base.info.compute_capability.1);
        let mut all = base.info.tuning.nvrtc_options();
        all.extend(options.iter().cloned());
        let ptx = compile_named_with(KERNELS_PROGRAM, program_source(), &arch, &all)?;
        let module = base.ctx.load_module(ptx).map_err(|e| {
            CudaError::driver(format!("loading the kernels compiled for {arch} with {options:?}"), e)
        })?;
        let kernels = load_kernels(&module)?;
        let stream = base.ctx.new_stream().map_err(|e| CudaError::driver("creating the stream", e))?;
        let device = Arc::new(CudaDevice {
            stream,
            kernels,
            sync_each_launch: base.sync_each_launch,
            info: base.info.clone(),
            _module: module,
            ctx: base.ctx.clone(),
        });
        variants.push((ordinal, options, device.clone()));
        Ok(device)
    }

    /// The same device and compiled kernels with a stream of its own: work queued through the fork is
    /// ordered only with other work of the fork. A forward that captures a graph needs one, since a
    /// capture records whatever any thread queues on the capturing stream.
    pub fn fork(&self) -> Result<Arc<CudaDevice>, CudaError> {
        self.bind()?;
        let stream = self.ctx.new_stream().map_err(|e| CudaError::driver("creating a stream", e))?;
        Ok(Arc::new(CudaDevice {
            stream,
            kernels: self.kernels.clone(),
            sync_each_launch: self.sync_each_launch,
            info: self.info.clone(),
            _module: self._module.clone(),
            ctx: self.ctx.clone(),
        }))
    }

    /// Whether the libraries CUDA needs are present, without opening a device: `Err` says what is
    /// missing. Cheap; [`CudaDevice::get`] checks this too.
    pub fn probe_libraries() -> Result<(), CudaError> {
        // SAFETY: only tries to dlopen the library under its usual names; nothing is called.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDriver {
                reason: "the driver library (libcuda.so) was not found by the dynamic loader; this machine \
                         has no NVIDIA driver installed (or it is not on the loader's path)"
                    .to_string(),
            });
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::NoNvrtc {
                reason: "libnvrtc.so was not found by the dynamic loader".to_string(),
            });
        }
        Ok(())
    }

    /// The device's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open(ordinal: usize) -> Result<CudaDevice, CudaError> {
        Self::probe_libraries()?;
        // cudarc panics when a symbol is missing from the loaded library (an unexpected driver build):
        // report that as an unusable driver instead of unwinding through the caller.
        match catch_unwind(AssertUnwindSafe(|| Self::open_checked(ordinal))) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".to_string());
                Err(CudaError::NoDriver { reason: format!("the CUDA libraries could not be used: {what}") })
            }
        }
    }

    fn open_checked(ordinal: usize) -> Result<CudaDevice, CudaError> {
        let driver_version = driver_version()?;
        init_driver()?;
        let count = result::device::get_count().map_err(|e| CudaError::driver("counting devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice {
                reason: format!("device {ordinal} was requested but the driver reports {count} device(s)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::driver("creating the context", e))?;
        // Only our own buffers (not cudarc's CudaSlice) are used, and all on one stream: no events needed.
        // SAFETY: no CudaSlice exists in this context, so none can miss its synchronisation events.
        unsafe { ctx.disable_event_tracking() };
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(|e| CudaError::driver("reading the device name", e))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(|e| CudaError::driver("reading the compute capability", e))?,
            driver_version,
            nvrtc_version: nvrtc_version()?,
            total_memory: ctx.total_mem().map_err(|e| CudaError::driver("reading the memory size", e))?,
            tuning: Tuning::from_env()?,
        };
        let module = compile(&ctx, info.compute_capability, &info.tuning.nvrtc_options())?;
        let kernels = load_kernels(&module)?;
        let stream = ctx.new_stream().map_err(|e| CudaError::driver("creating the stream", e))?;
        let sync_each_launch = std::env::var(SYNC_EACH_LAUNCH_ENV).is_ok_and(|v| v != "0");
        Ok(CudaDevice { stream, kernels, sync_each_launch, info, _module: module, ctx })
    }

    /// Makes this device's context current on the calling thread (every entry point calls it, so
    /// forwards may move between threads).
    pub(crate) fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(|e| CudaError::driver("binding the context to this thread", e))
    }

    /// Waits until everything queued so far has finished; reports any asynchronous failure.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        self.stream.synchronize().map_err(|e| CudaError::driver("waiting for the device", e))
    }

    /// A new buffer of `len` zeros.
    pub fn alloc_zeros<T: DeviceScalar>(&self, len: usize) -> Result<DeviceBuffer<T>, CudaError> {
        let buf = self.alloc_raw::<T>(len, "allocating a buffer")?;
        if len > 0 {
            // SAFETY: the allocation holds exactly len * size_of::<T>() bytes.
            unsafe { result::memset_d8_async(buf.ptr, 0, buf.bytes(), self.stream.cu_stream()) }
                .map_err(|e| CudaError::driver("clearing a buffer", e))?;
        }
        Ok(buf)
    }

    /// A new buffer holding a copy of `data`.
    pub fn upload<T: DeviceScalar>(&self, data: &[T]) -> Result<DeviceBuffer<T>, CudaError> {
        let mut buf = self.alloc_raw::<T>(data.len(), "uploading a buffer")?;
        self.copy_to_device(data, buf.as_mut())?;
        Ok(buf)
    }

    /// A weight tensor of `experts` matrices of `rows` rows of `cols` weights of type `ty`, from its GGUF
    /// bytes (`bytes.len()` must be `experts * rows * ty.row_bytes(cols)`).
    pub fn upload_matrix(
        &self,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        experts: usize,
        bytes: &[u8],
    ) -> Result<DeviceMatrix, CudaError> {
        let op = "upload_matrix";
        let row_bytes = ty.row_bytes(cols).ok_or_else(|| {
            CudaError::invalid(op, format!("a {ty} row of {cols} weights is not a whole number of blocks"))
        })?;
        let expected = row_bytes.checked_mul(rows).and_then(|b| b.checked_mul(experts));
        if expected != Some(bytes.len()) || cols == 0 || rows == 0 || experts == 0 {
            return Err(CudaError::invalid(
                op,
                format!(
                    "{experts} x {rows} rows of {cols} {ty} weights need {expected:?} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
        if i32::try_from(cols).is_err() || i32::try_from(rows).is_err() || i32::try_from(experts).is_err() {
            return Err(CudaError::invalid(op, format!("shape {experts} x {rows} x {cols} exceeds i32")));
        }
        let mut data = self.alloc_raw::<u8>(bytes.len(), "uploading weights")?;
        self.copy_to_device(bytes, data.as_mut())?;
        Ok(DeviceMatrix { data, ty, cols, rows, experts, row_bytes })
    }

    /// Copies `src` into the start of `dst` (`dst` at least as long).
    pub fn copy_to_device<T: DeviceScalar>(
        &self,
        src: &[T],
        dst: DevSliceMut<'_, T>,
    ) -> Result<(), CudaError> {
        if src.len() > dst.len {
            return Err(CudaError::invalid(
                "copy_to_device",
                format!("{} values do not fit a view of {}", src.len(), dst.len),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst is a live view of at least src.len() values of T; a pageable source is staged before
        // the call returns, so src may be dropped afterwards.
        unsafe { result::memcpy_htod_async(dst.ptr, src, self.stream.cu_stream()) }
            .map_err(|e| CudaError::driver("copying to the device", e))
    }

    /// Copies `src` to the host, waiting for all queued work first.
    pub fn download<T: DeviceScalar>(&self, src: DevSlice<'_, T>) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); src.len];
        if src.len == 0 {
            return Ok(out);
        }
        self.bind()?;
        // SAFETY: src is a live view of src.len values; out has the same length; we wait before returning.
        unsafe { result::memcpy_dtoh_async(&mut out, src.ptr, self.stream.cu_stream()) }
            .map_err(|e| CudaError::driver("copying to the host", e))?;
        self.synchronize()?;
        Ok(out)
    }

    /// Copies `src` into the start of `dst` on the device.
    pub fn copy_on_device<T: DeviceScalar>(
        &self,
        src: DevSlice<'_, T>,
        dst: DevSliceMut<'_, T>,
    ) -> Result<(), CudaError> {
        if src.len > dst.len {
            return Err(CudaError::invalid(
                "copy_on_device",
                format!("{} values do not fit a view of {}", src.len, dst.len),
            ));
        }
        if src.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let bytes = src.len * size_of::<T>();
        // SAFETY: both views are live and hold at least `bytes` bytes; they come from distinct borrows.
        unsafe { result::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.stream.cu_stream()) }
            .map_err(|e| CudaError::driver("copying on the device", e))
    }

    /// Records the work `enqueue` queues on this device (kernel launches and copies between device
    /// buffers; nothing that waits for the device or allocates) into a graph instead of running it: replaying
    /// the graph ([`CudaDevice::replay`]) queues all of it with one call, without the per-launch overhead.
    /// The graph keeps the buffers and arguments it was captured with: whatever changes from one replay to
    /// the next must be read by the kernels from device memory. With [`super::SYNC_EACH_LAUNCH_ENV`] set,
    /// capturing is refused (a launch would wait for the device inside the capture).
    pub fn capture(&self, enqueue: impl FnOnce() -> Result<(), CudaError>) -> Result<DeviceGraph, CudaError> {
        let op = "capture";
        if self.sync_each_launch {
            return Err(CudaError::invalid(
                op,
                format!(
                    "{SYNC_EACH_LAUNCH_ENV} makes every launch wait, which a graph capture cannot; unset it"
                ),
            ));
        }
        self.bind()?;
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| CudaError::driver("starting a graph capture", e))?;
        let queued = enqueue();
        // The capture must end whatever happened, or the stream stays in capture mode.
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        queued?;
        match ended.map_err(|e| CudaError::driver("ending a graph capture", e))? {
            Some(graph) => Ok(DeviceGraph { graph }),
            None => Err(CudaError::invalid(op, "the capture recorded no work")),
        }
    }

    /// Whether every launch waits for its kernel ([`super::SYNC_EACH_LAUNCH_ENV`]); graphs cannot be
    /// captured then.
    pub fn syncs_each_launch(&self) -> bool {
        self.sync_each_launch
    }

    /// Queues every operation of `graph` on this device's stream.
    pub fn replay(&self, graph: &DeviceGraph) -> Result<(), CudaError> {
        self.bind()?;
        graph.graph.launch().map_err(|e| CudaError::driver("launching a captured graph", e))?;
        if self.sync_each_launch {
            self.synchronize()?;
        }
        Ok(())
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), CudaError> {
        self.bind()?;
        result::mem_get_info().map_err(|e| CudaError::driver("reading the free memory", e))
    }

    fn alloc_raw<T: DeviceScalar>(&self, len: usize, stage: &str) -> Result<DeviceBuffer<T>, CudaError> {
        let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| {
            CudaError::invalid("alloc", format!("{len} values of {} bytes overflow", size_of::<T>()))
        })?;
        if bytes == 0 {
            return Ok(DeviceBuffer { ptr: 0, len: 0, stream: self.stream.clone(), _t: PhantomData });
        }
        self.bind()?;
        // SAFETY: a plain device allocation; the buffer owns it and frees it once.
        match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => Ok(DeviceBuffer { ptr, len, stream: self.stream.clone(), _t: PhantomData }),
            Err(e) if CudaError::is_oom(&e) => {
                let (free, total) = result::mem_get_info().unwrap_or((0, 0));
                Err(CudaError::OutOfMemory { stage: stage.to_string(), bytes, free, total })
            }
            Err(e) => Err(CudaError::driver(stage, e)),
        }
    }
}

/// The driver's CUDA version, refusing drivers older than [`MIN_DRIVER_VERSION`].
fn driver_version() -> Result<i32, CudaError> {
    let mut version = 0i32;
    // SAFETY: writes one int; valid before cuInit.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| CudaError::NoDriver { reason: format!("cuDriverGetVersion failed: {}", describe(e)) })?;
    if version < MIN_DRIVER_VERSION {
        return Err(CudaError::NoDriver {
            reason: format!(
                "the driver supports CUDA {}.{}, these kernels need CUDA {}.{} or newer: update the NVIDIA driver",
                version / 1000,
                version % 1000 / 10,
                MIN_DRIVER_VERSION / 1000,
                MIN_DRIVER_VERSION % 1000 / 10
            ),
        });
    }
    Ok(version)
}

/// `cuInit`, telling "no device" apart from a broken driver.
fn init_driver() -> Result<(), CudaError> {
    result::init().map_err(|e| match e.0 {
        cudaError_enum::CUDA_ERROR_NO_DEVICE => {
            CudaError::NoDevice { reason: "the driver is installed but reports no CUDA device".to_string() }
        }
        _ => CudaError::NoDriver { reason: format!("cuInit failed: {}", describe(e)) },
    })
}

fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::NoNvrtc { reason: format!("nvrtcVersion failed: {e:?}") })?;
    Ok((major, minor))
}

/// Compiles the program for the device's architecture (PTX for `compute_XY`, finished by the driver), with
/// the `tuning` knobs' NVRTC options (none: the kernels as they ship).
fn compile(
    ctx: &Arc<CudaContext>,
    (major, minor): (i32, i32),
    tuning: &[String],
) -> Result<Arc<CudaModule>, CudaError> {
    let arch = format!("compute_{major}{minor}");
    let ptx = compile_named_with(KERNELS_PROGRAM, program_source(), &arch, tuning)?;
    ctx.load_module(ptx).map_err(|e| CudaError::driver(format!("loading the kernels compiled for {arch}"), e))
}

/// Compiles the kernels with NVRTC for virtual architecture `arch` (e.g. `compute_90`) and returns the
/// PTX text, without a driver or device: checks that the sources compile on any machine with NVRTC.
pub fn compile_program(arch: &str) -> Result<String, CudaError> {
    compile_source(KERNELS_PROGRAM, &program_source(), arch)
}

/// [`compile_program`] with the extra NVRTC `options` of a seeded defect's compile variant
/// ([`CudaDevice::get_variant`]): checks without a device that each variant compiles.
pub fn compile_program_variant(arch: &str, options: &[&str]) -> Result<String, CudaError> {
    // SAFETY: only tries to dlopen the library under its usual names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::NoNvrtc {
            reason: "libnvrtc.so was not found by the dynamic loader".to_string(),
        });
    }
    let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
    Ok(compile_named_with(KERNELS_PROGRAM, program_source(), arch, &options)?.to_src())
}

/// The name NVRTC gives the kernels' program (compiler messages name the `*.cu` part through `#line`).
const KERNELS_PROGRAM: &str = "moe_gate_kernels.cu";

/// Compiles any CUDA C program `src`, named `name` in compiler messages, with the options the kernels
/// are compiled with, for virtual architecture `arch`, and returns the PTX text. It needs only NVRTC:
/// a way to try a kernel change on a machine without a device, and what the tests use to check that a
/// compile error reaches the caller with the compiler's log.
pub fn compile_source(name: &str, src: &str, arch: &str) -> Result<String, CudaError> {
    // SAFETY: only tries to dlopen the library under its usual names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::NoNvrtc {
            reason: "libnvrtc.so was not found by the dynamic loader".to_string(),
        });
    }
    Ok(compile_named(name, src.to_string(), arch)?.to_src())
}

fn compile_named(name: &str, src: String, arch: &str) -> Result<Ptx, CudaError> {
    compile_named_with(name, src, arch, &[])
}

/// Compiles `src` with the kernels' options and the `extra` ones (a compile variant: `seeded::SEEDED_*`).
fn compile_named_with(name: &str, src: String, arch: &str, extra: &[String]) -> Result<Ptx, CudaError> {
    let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    options.extend(extra.iter().cloned());
    let opts = CompileOptions { options, name: Some(name.to_string()), ..Default::default() };
    let failed = |status: String, log: String| CudaError::Compile {
        program: name.to_string(),
        arch: arch.to_string(),
        status,
        log,
    };
    compile_ptx_with_opts(src, opts).map_err(|e| match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            failed(format!("{nvrtc:?}"), log.to_string_lossy().into_owned())
        }
        other => failed(format!("{other:?}"), String::new()),
    })
}

fn load_kernels(module: &Arc<CudaModule>) -> Result<Kernels, CudaError> {
    look_up_kernels(|name| {
        module.load_function(name).map_err(|e| CudaError::driver(format!("looking up kernel {name}"), e))
    })
}

/// Every kernel the device opens by name, each looked up with `load`: the one list of entry points, used
/// by [`CudaDevice::get`] and by [`kernel_entry_names`].
fn look_up_kernels<F, E>(mut load: impl FnMut(&str) -> Result<F, E>) -> Result<Kernels<F>, E> {
    let mut formats = HashMap::new();
    for ty in GgmlType::ALL {
        let suffix = ty.name().to_ascii_lowercase();
        formats.insert(
            ty,
            FormatKernels {
                matvec: load(&format!("matvec_{suffix}"))?,
                moe_matvec: load(&format!("moe_matvec_{suffix}"))?,
                get_rows: load(&format!("get_rows_{suffix}"))?,
                matvec_exact: load(&format!("matvec_exact_{suffix}"))?,
                matvec1: load(&format!("matvec1_{suffix}"))?,
                moe_matvec1: load(&format!("moe_matvec1_{suffix}"))?,
                moe_gate_up1: load(&format!("moe_gate_up1_{suffix}"))?,
                moe_down_combine1: load(&format!("moe_down_combine1_{suffix}"))?,
                router_topk1: load(&format!("router_topk1_{suffix}"))?,
                norm_router_topk1: load(&format!("norm_router_topk1_{suffix}"))?,
            },
        );
    }
    let pairs = GgmlType::ALL.into_iter().map(|ty| (ty, ty)).chain(NORM_QKV_MIXED);
    let mut norm_qkv1 = HashMap::new();
    for (qk, v) in pairs {
        let name = |ty: GgmlType| ty.name().to_ascii_lowercase();
        norm_qkv1.insert((qk, v), load(&format!("norm_qkv1_{}_{}", name(qk), name(v)))?);
    }
    Ok(Kernels {
        formats,
        norm_qkv1,
        rmsnorm: load("rmsnorm")?,
        head_norm_rope: load("head_norm_rope")?,
        head_norm_rope_qk: load("head_norm_rope_qk")?,
        attention: load("attention")?,
        softmax_topk: load("softmax_topk")?,
        moe_group: load("moe_group")?,
        moe_combine: load("moe_combine")?,
        exact: ExactKernels {
            exp: load("exp_exact")?,
            rmsnorm: load("rmsnorm_exact")?,
            head_norm_rope: load("head_norm_rope_exact")?,
            attention: load("attention_exact")?,
            softmax_topk: load("softmax_topk_exact")?,
            moe_combine: load("moe_combine_exact")?,
        },
        seeded: SeededKernels {
            round_q8: load("seeded_round_q8")?,
            round_f16: load("seeded_round_f16")?,
            matvec_bf16acc: load("seeded_matvec_bf16acc")?,
        },
    })
}

/// The name of every kernel a device looks up in the compiled program, both policies (`fast` and
/// `exact`), in lookup order: a compile-only check (no driver, no device) that the PTX of
/// [`compile_program`] has an `.entry` for each proves that [`CudaDevice::get`] would find them all.
pub fn kernel_entry_names() -> Vec<String> {
    let mut names = Vec::new();
    let looked_up = look_up_kernels(|name| {
        names.push(name.to_string());
        Ok::<(), std::convert::Infallible>(())
    });
    match looked_up {
        Ok(_) => names,
        Err(never) => match never {},
    }
}

/// Work captured by [`CudaDevice::capture`], replayed by [`CudaDevice::replay`]. It refers to the device
/// buffers it was captured with: replay it only while they live.
pub struct DeviceGraph {
    graph: CudaGraph,
}

// SAFETY: the graph and its executable are driver handles that may be used from any thread once the
// context is bound (replay binds it); CUDA only forbids using one graph from two threads at once, which
// `DeviceGraph` rules out by not being `Sync` (replay borrows it, so one thread at a time uses it).
unsafe impl Send for DeviceGraph {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for i32 {}
    impl Sealed for u8 {}
}

/// Element types device buffers hold.
pub trait DeviceScalar: sealed::Sealed + DeviceRepr + Copy + Default + Send + Sync + 'static {}
impl DeviceScalar for f32 {}
impl DeviceScalar for f64 {}
impl DeviceScalar for i32 {}
impl DeviceScalar for u8 {}

/// An owned device allocation of `len` values (`cuMemAlloc`; freed on drop after the stream drains).
pub struct DeviceBuffer<T: DeviceScalar> {
    ptr: CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
    _t: PhantomData<T>,
}

impl<T: DeviceScalar> DeviceBuffer<T> {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bytes(&self) -> usize {
        self.len * size_of::<T>()
    }

    /// A view of the whole buffer.
    pub fn as_slice(&self) -> DevSlice<'_, T> {
        DevSlice { ptr: self.ptr, len: self.len, _b: PhantomData }
    }

    /// A mutable view of the whole buffer.
    pub fn as_mut(&mut self) -> DevSliceMut<'_, T> {
        DevSliceMut { ptr: self.ptr, len: self.len, _b: PhantomData }
    }

    /// A view of `range`.
    pub fn slice(&self, range: Range<usize>) -> Result<DevSlice<'_, T>, CudaError> {
        self.as_slice().slice(range)
    }

    /// A mutable view of `range`.
    pub fn slice_mut(&mut self, range: Range<usize>) -> Result<DevSliceMut<'_, T>, CudaError> {
        self.as_mut().into_slice(range)
    }
}

impl<T: DeviceScalar> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        let ctx = self.stream.context();
        ctx.record_err(ctx.bind_to_thread());
        // Kernels still queued may use the memory: let them finish first.
        ctx.record_err(self.stream.synchronize());
        // SAFETY: allocated by malloc_sync in alloc_raw, freed only here.
        ctx.record_err(unsafe { result::free_sync(self.ptr) });
    }
}

/// A borrowed view of `len` device values.
#[derive(Clone, Copy)]
pub struct DevSlice<'a, T> {
    pub(crate) ptr: CUdeviceptr,
    pub(crate) len: usize,
    _b: PhantomData<&'a [T]>,
}

impl<'a, T> DevSlice<'a, T> {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sub-view `range`.
    pub fn slice(self, range: Range<usize>) -> Result<DevSlice<'a, T>, CudaError> {
        check_range(&range, self.len)?;
        Ok(DevSlice {
            ptr: self.ptr + (range.start * size_of::<T>()) as u64,
            len: range.len(),
            _b: PhantomData,
        })
    }
}

/// A borrowed mutable view of `len` device values.
pub struct DevSliceMut<'a, T> {
    pub(crate) ptr: CUdeviceptr,
    pub(crate) len: usize,
    _b: PhantomData<&'a mut [T]>,
}

impl<'a, T> DevSliceMut<'a, T> {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A shorter-lived mutable view of the same values.
    pub fn reborrow(&mut self) -> DevSliceMut<'_, T> {
        DevSliceMut { ptr: self.ptr, len: self.len, _b: PhantomData }
    }

    /// A read-only view of the same values.
    pub fn as_const(&self) -> DevSlice<'_, T> {
        DevSlice { ptr: self.ptr, len: self.len, _b: PhantomData }
    }

    /// The sub-view `range`.
    pub fn into_slice(self, range: Range<usize>) -> Result<DevSliceMut<'a, T>, CudaError> {
        check_range(&range, self.len)?;
        Ok(DevSliceMut {
            ptr: self.ptr + (range.start * size_of::<T>()) as u64,
            len: range.len(),
            _b: PhantomData,
        })
    }
}

fn check_range(range: &Range<usize>, len: usize) -> Result<(), CudaError> {
    if range.start > range.end || range.end > len {
        return Err(CudaError::invalid(
            "slice",
            format!("range {range:?} is outside a view of {len} values"),
        ));
    }
    Ok(())
}

/// A weight tensor on the device, in its GGUF blocks: `experts` matrices (1 for a plain matrix) of `rows`
/// rows of `cols` weights, rows `row_bytes` apart.
pub struct DeviceMatrix {
    pub(crate) data: DeviceBuffer<u8>,
    pub(crate) ty: GgmlType,
    pub(crate) cols: usize,
    pub(crate) rows: usize,
    pub(crate) experts: usize,
    pub(crate) row_bytes: usize,
}

impl DeviceMatrix {
    /// Block format.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Weights per row (the input width of a matrix-vector product).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows per matrix (the output width).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of matrices (experts); 1 for a plain matrix.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}
