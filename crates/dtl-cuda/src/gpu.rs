//! The GPU device: [`Gpu`] implements the kernel set [`Kernels`] on one CUDA device, over
//! [`GpuBuf`] buffers.
//!
//! Every `unsafe` call of the device lives here or in `blas.rs`, behind safe functions: each
//! operation checks the ownership and length of every buffer and that its sizes fit the
//! kernels' 32-bit indices before it launches anything, so no argument can make a kernel or a
//! matrix product touch memory outside its buffers.
//!
//! All work runs in order on one non-blocking stream per [`Gpu`]. cudarc's per-buffer event
//! tracking is off (it is only needed across streams, and it would get in the way of CUDA
//! graph capture): buffers are allocated and freed in stream order (`cuMemAllocAsync` /
//! `cuMemFreeAsync`), so a buffer dropped while work using it is queued stays valid until
//! that work is done.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    result as drv, sys as dsys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice,
    CudaStream, DevicePtr, DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use dtl_core::choice::Precision;
use dtl_core::{DtlError, Result};
use dtl_kernels::{check_len, Capture, GraphId, Kernels, MemoryStats};

use crate::blas::{Blas, Gemm};
use crate::fused::AttentionKernels;
use crate::lt::{EpilogueCounts, EpilogueStats, GemmEpilogue, Lt};
use crate::ops::{
    bf16_bits, check_storage, f32_from_bf16, invalid, resolve, storage_mask, Arg, Dp, Exec, Keep,
    K, PARTIALS,
};
use crate::profile::{self, Profiler};
use crate::{libs, nvrtc};

/// The oldest driver the device accepts, as `cuDriverGetVersion` reports it (CUDA 13.0, R580).
pub(crate) const MIN_DRIVER: i32 = 13000;

/// Values per pinned staging buffer of `upload` (two of them).
const STAGE: usize = 1 << 22;

/// Names a driver error by its code and the driver's text.
fn driver_text(e: DriverError) -> String {
    match (e.error_name(), e.error_string()) {
        (Ok(n), Ok(s)) => format!("{} ({})", n.to_string_lossy(), s.to_string_lossy()),
        _ => format!("{:?}", e.0),
    }
}

fn drv_err(what: &str, e: DriverError) -> DtlError {
    DtlError::Device(format!("{what}: CUDA driver error {}", driver_text(e)))
}

/// What the driver says about one device, without creating a context.
#[derive(Clone, Debug)]
pub(crate) struct DeviceInfo {
    pub name: String,
    pub cc: (u32, u32),
}

/// Checks everything [`Gpu::open`] needs for `cuda:<ordinal>` short of creating a context:
/// the libraries, the driver version, the device, its compute capability against NVRTC.
pub(crate) fn probe(ordinal: usize) -> std::result::Result<DeviceInfo, String> {
    libs::driver()?;
    let mut version = 0;
    // SAFETY: the driver library is loaded (checked above); `version` is a valid out-pointer.
    unsafe { dsys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| {
            format!(
                "the CUDA driver does not report its version: {}",
                driver_text(e)
            )
        })?;
    if version < MIN_DRIVER {
        return Err(format!(
            "the NVIDIA driver supports CUDA {}.{}, dtl needs a driver for CUDA 13.0 or newer (R580+)",
            version / 1000,
            version % 1000 / 10
        ));
    }
    drv::init().map_err(|e| match e.0 {
        dsys::cudaError_enum::CUDA_ERROR_NO_DEVICE => {
            "no CUDA device is present (the driver found no GPU)".to_string()
        }
        _ => format!("the CUDA driver failed to initialise: {}", driver_text(e)),
    })?;
    let count = drv::device::get_count()
        .map_err(|e| {
            format!(
                "the CUDA driver could not count devices: {}",
                driver_text(e)
            )
        })?
        .max(0) as usize;
    if ordinal >= count {
        return Err(match count {
            0 => format!("cuda:{ordinal} requested but no CUDA device is present"),
            1 => format!("cuda:{ordinal} requested but 1 CUDA device is present (cuda:0)"),
            n => format!(
                "cuda:{ordinal} requested but {n} CUDA devices are present (cuda:0 to cuda:{})",
                n - 1
            ),
        });
    }
    let dev = drv::device::get(ordinal as i32)
        .map_err(|e| format!("cuda:{ordinal}: {}", driver_text(e)))?;
    let attr = |a| {
        // SAFETY: `dev` comes from cuDeviceGet.
        unsafe { drv::device::get_attribute(dev, a) }
            .map_err(|e| format!("cuda:{ordinal}: {}", driver_text(e)))
    };
    let major = attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let name = drv::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".to_string());
    let cc = (major.max(0) as u32, minor.max(0) as u32);
    libs::nvrtc()?;
    libs::cublas()?;
    nvrtc::target_architecture(cc).map_err(|e| format!("cuda:{ordinal} ({name}): {e}"))?;
    Ok(DeviceInfo { name, cc })
}

/// Byte counters shared by a device and its buffers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) live: AtomicU64,
    pub(crate) peak: AtomicU64,
}

impl Counters {
    pub(crate) fn add(&self, bytes: u64) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Device memory that counts in [`Kernels::memory`] until it is freed (in stream order).
struct DevMem {
    _slice: CudaSlice<u8>,
    bytes: u64,
    counters: Arc<Counters>,
}

impl Drop for DevMem {
    fn drop(&mut self) {
        self.counters.sub(self.bytes);
    }
}

/// A buffer of `f32` or `bf16` values in the memory of one [`Gpu`]: the [`Kernels::Buf`] of
/// the GPU.
///
/// Made by [`Kernels::alloc`] (zero-filled) or [`Kernels::upload_new`] (f32), or on a device
/// opened for bf16 by [`Kernels::alloc_act`] and [`Kernels::upload_frozen`] (bf16); its bytes
/// count in [`Kernels::memory`] until it is dropped (or, while a recorded graph exists, until
/// the last graph is released). A buffer works only with the [`Gpu`] that made it (or a clone
/// of it); any other is refused with an error.
///
/// ```no_run
/// use dtl_kernels::Kernels;
/// let gpu = dtl_cuda::Gpu::open(0).unwrap();
/// let b = gpu.upload_new(&[1.0, 2.0]).unwrap();
/// assert_eq!(gpu.len(&b), 2);
/// assert_eq!(gpu.download(&b, 2).unwrap(), vec![1.0, 2.0]);
/// ```
pub struct GpuBuf {
    /// Owns the memory (freed in stream order, or kept while graphs exist, when dropped);
    /// work goes through `ptr`.
    mem: Option<DevMem>,
    ptr: u64,
    len: usize,
    bf16: bool,
    owner: u64,
    keep: Arc<Keep<DevMem>>,
}

impl GpuBuf {
    /// Number of values.
    ///
    /// ```no_run
    /// use dtl_kernels::Kernels;
    /// let gpu = dtl_cuda::Gpu::open(0).unwrap();
    /// assert_eq!(gpu.alloc(3).unwrap().len(), 3);
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no value.
    ///
    /// ```no_run
    /// use dtl_kernels::Kernels;
    /// let gpu = dtl_cuda::Gpu::open(0).unwrap();
    /// assert!(gpu.alloc(0).unwrap().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How the values are stored: `F32` or `Bf16`.
    ///
    /// ```no_run
    /// use dtl_core::choice::Precision;
    /// use dtl_kernels::Kernels;
    /// let gpu = dtl_cuda::Gpu::open_with(0, Precision::Bf16).unwrap();
    /// assert_eq!(gpu.alloc_act(3).unwrap().storage(), Precision::Bf16);
    /// assert_eq!(gpu.alloc(3).unwrap().storage(), Precision::F32);
    /// ```
    pub fn storage(&self) -> Precision {
        if self.bf16 {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        if let Some(m) = self.mem.take() {
            self.keep.drop_or_keep(m);
        }
    }
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf({} {} values)", self.len, self.storage())
    }
}

/// A recorded graph; used under the device's lock only.
struct Graph(CudaGraph);
// SAFETY: the graph is only reached under the `graphs` mutex of its device, one thread at a
// time, as the driver requires.
unsafe impl Send for Graph {}

/// The graphs of a device and the state of a recording.
#[derive(Default)]
struct Graphs {
    map: HashMap<u64, Graph>,
    next: u64,
}

/// Whether a recording is under way and, if something broke it, why.
#[derive(Default)]
struct Recording {
    active: bool,
    broken: Option<String>,
}

/// One pinned staging buffer of `upload` and the event after its last copy.
struct Stage {
    host: PinnedHostSlice<f32>,
    done: CudaEvent,
}

struct Staging {
    bufs: [Stage; 2],
    next: usize,
}

struct Inner {
    id: u64,
    ordinal: usize,
    name: String,
    cc: (u32, u32),
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: Vec<CudaFunction>,
    /// Declared before the workspace it uses, so that it is destroyed first.
    blas: Blas,
    /// The cuBLASLt handle of the bias epilogue, on the same workspace (the stream orders them).
    lt: Lt,
    epilogue_counts: EpilogueCounts,
    _blas_workspace: CudaSlice<u8>,
    /// The partial sums of `sum_squares`; the lock keeps its two launches together.
    partials: Mutex<CudaSlice<f32>>,
    partials_ptr: u64,
    staging: Mutex<Staging>,
    counters: Arc<Counters>,
    /// The bf16 copies of f32 operands of mixed products, grown on demand.
    scratch: Mutex<Option<(DevMem, u64, usize)>>,
    keep: Arc<Keep<DevMem>>,
    graphs: Mutex<Graphs>,
    recording: Mutex<Recording>,
    driver_base: Option<u64>,
    precision: Precision,
    /// The start and end events of each operation while profiling.
    profiler: Profiler<(CudaEvent, CudaEvent)>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Queued copies may still read the staging buffers and kernels may still run: wait
        // before the pinned memory, the module and the handle go.
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        self.graphs
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .clear();
        self.keep.clear();
    }
}

/// One CUDA device running dtl's kernel set ([`Kernels`]): the project's own kernels (compiled
/// once per process with NVRTC for the device's compute capability; f32 arithmetic on f32 or
/// bf16 buffers) and cuBLAS products with f32 compute (TF32 off), all in order on one
/// non-blocking stream. Opened with [`Gpu::open_with`] for bf16, it stores activations and
/// frozen weights in bf16 (see docs/cuda.md, "Precision"); [`Kernels::capture`] records CUDA
/// graphs.
///
/// Cloning is cheap (one `Arc`) and shares the device, its stream and its buffers' accounting.
/// Operations are asynchronous: [`Kernels::download`] and [`Kernels::synchronize`] wait for
/// the work queued before them and report a failure of any of it.
///
/// ```no_run
/// use dtl_kernels::Kernels;
/// let gpu = dtl_cuda::Gpu::open(0).unwrap();
/// println!("{}", gpu.describe()); // cuda:0 (NVIDIA H200)
/// let x = gpu.upload_new(&[0.0, 1.0]).unwrap();
/// let mut y = gpu.alloc(2).unwrap();
/// gpu.gelu(&x, 2, &mut y).unwrap();
/// let v = gpu.download(&y, 2).unwrap();
/// assert!((v[1] - 0.841_344_7).abs() < 1e-6);
/// ```
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<Inner>,
    attention: AttentionKernels,
    epilogue: GemmEpilogue,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.describe())
    }
}

impl Gpu {
    /// Opens `cuda:<ordinal>`: loads the driver, NVRTC and cuBLAS (see [`crate::libs`]), checks
    /// the driver version, retains the device's primary context, compiles the kernels for the
    /// device (once per process and architecture), and creates the stream, the cuBLAS handle
    /// with its workspace and two pinned staging buffers for uploads.
    ///
    /// Errors name what is missing or wrong, e.g. `no CUDA device is present` or
    /// `cuda:2 requested but 1 CUDA device is present (cuda:0)`; nothing here panics.
    ///
    /// ```no_run
    /// let gpu = dtl_cuda::Gpu::open(0).unwrap();
    /// assert_eq!(gpu.ordinal(), 0);
    /// ```
    pub fn open(ordinal: usize) -> Result<Gpu> {
        Gpu::open_with(ordinal, Precision::F32)
    }

    /// Opens `cuda:<ordinal>` as [`Gpu::open`] does, storing activations and frozen weights at
    /// `precision` ([`Kernels::alloc_act`], [`Kernels::upload_frozen`]); `Auto` is taken as
    /// bf16 (a caller resolves it with `Precision::on_device` first).
    ///
    /// ```no_run
    /// use dtl_core::choice::Precision;
    /// use dtl_kernels::Kernels;
    /// let gpu = dtl_cuda::Gpu::open_with(0, Precision::Bf16).unwrap();
    /// assert_eq!(gpu.precision(), Precision::Bf16);
    /// ```
    pub fn open_with(ordinal: usize, precision: Precision) -> Result<Gpu> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let attention = AttentionKernels::from_env()?;
        let epilogue = GemmEpilogue::from_env()?;
        let info = probe(ordinal).map_err(DtlError::Unavailable)?;
        let arch = nvrtc::target_architecture(info.cc)?;
        let ptx = nvrtc::compile_kernels(arch)?;
        let what = |s: &str| format!("cuda:{ordinal}: {s}");
        let ctx =
            CudaContext::new(ordinal).map_err(|e| drv_err(&what("creating the context"), e))?;
        // SAFETY: every buffer of this context is used on the one stream made below only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| drv_err(&what("creating the stream"), e))?;
        let module = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
            let hint = if e.0 == dsys::cudaError_enum::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                " (the driver is older than the NVRTC that compiled them; update the driver)"
            } else {
                ""
            };
            drv_err(&what(&format!("loading the kernels{hint}")), e)
        })?;
        let funcs = nvrtc::KERNEL_NAMES
            .iter()
            .map(|n| {
                module
                    .load_function(n)
                    .map_err(|e| drv_err(&what(&format!("kernel {n}")), e))
            })
            .collect::<Result<Vec<_>>>()?;
        let driver_base = ctx
            .mem_get_info()
            .ok()
            .map(|(free, total)| (total - free) as u64);
        let counters = Arc::new(Counters::default());
        // cuBLAS recommends 32 MiB of workspace from Hopper on, 4 MiB before.
        let ws_bytes: usize = if info.cc.0 >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream
            .alloc_zeros::<u8>(ws_bytes)
            .map_err(|e| drv_err(&what("allocating the cuBLAS workspace"), e))?;
        let ws_ptr = workspace.device_ptr(&stream).0;
        ctx.bind_to_thread()
            .map_err(|e| drv_err(&what("binding the context"), e))?;
        // SAFETY: the workspace is device memory of this context that lives as long as the
        // handle (both in `Inner`, the handle dropped first); the context is bound.
        let blas = unsafe { Blas::new(&stream, ws_ptr, ws_bytes) }?;
        // SAFETY: the same workspace, used by the cuBLASLt handle in order on the same stream;
        // the handle is destroyed before it (declared first in `Inner`).
        let lt = unsafe { Lt::new(&stream, ws_ptr, ws_bytes) };
        let partials = stream
            .alloc_zeros::<f32>(2 * PARTIALS)
            .map_err(|e| drv_err(&what("allocating the reduction buffer"), e))?;
        let partials_ptr = partials.device_ptr(&stream).0;
        counters.add((ws_bytes + 8 * PARTIALS) as u64);
        let stage = || -> Result<Stage> {
            // SAFETY: the memory is zeroed right away, before any read.
            let mut host = unsafe { ctx.alloc_pinned::<f32>(STAGE) }
                .map_err(|e| drv_err(&what("allocating pinned host memory"), e))?;
            let p = host
                .as_mut_ptr()
                .map_err(|e| drv_err(&what("pinned host memory"), e))?;
            // SAFETY: `p` points to STAGE f32 values just allocated.
            unsafe { std::ptr::write_bytes(p, 0, STAGE) };
            let done = ctx
                .new_event(None)
                .map_err(|e| drv_err(&what("creating an event"), e))?;
            Ok(Stage { host, done })
        };
        let staging = Staging {
            bufs: [stage()?, stage()?],
            next: 0,
        };
        Ok(Gpu {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                ordinal,
                name: info.name,
                cc: info.cc,
                ctx,
                stream,
                funcs,
                blas,
                lt,
                epilogue_counts: EpilogueCounts::default(),
                _blas_workspace: workspace,
                partials: Mutex::new(partials),
                partials_ptr,
                staging: Mutex::new(staging),
                counters,
                scratch: Mutex::new(None),
                keep: Arc::new(Keep::new()),
                graphs: Mutex::new(Graphs::default()),
                recording: Mutex::new(Recording::default()),
                profiler: Profiler::new(),
                driver_base,
                precision: resolve(precision),
            }),
            attention,
            epilogue,
        })
    }

    /// Selects the attention kernels of this handle (clones made later inherit it); the
    /// initial selection is `DTL_ATTENTION`'s when the device was opened (see
    /// [`AttentionKernels`]). Plan the scratch ([`Kernels::attention_scratch`]) after choosing.
    ///
    /// ```no_run
    /// let mut gpu = dtl_cuda::Gpu::open(0).unwrap();
    /// gpu.set_attention(dtl_cuda::AttentionKernels::Fused);
    /// assert_eq!(gpu.attention_kernels(), dtl_cuda::AttentionKernels::Fused);
    /// ```
    pub fn set_attention(&mut self, kernels: AttentionKernels) {
        self.attention = kernels;
    }

    /// The attention kernels this handle runs (see [`Gpu::set_attention`]).
    ///
    /// ```no_run
    /// println!("{}", dtl_cuda::Gpu::open(0).unwrap().attention_kernels().name());
    /// ```
    pub fn attention_kernels(&self) -> AttentionKernels {
        self.attention
    }

    /// Selects how this handle adds the bias of a linear (clones made later inherit it); the
    /// initial selection is `DTL_GEMM_EPILOGUE`'s when the device was opened (see
    /// [`GemmEpilogue`]).
    ///
    /// ```no_run
    /// let mut gpu = dtl_cuda::Gpu::open(0).unwrap();
    /// gpu.set_gemm_epilogue(dtl_cuda::GemmEpilogue::Lt);
    /// assert_eq!(gpu.gemm_epilogue(), dtl_cuda::GemmEpilogue::Lt);
    /// ```
    pub fn set_gemm_epilogue(&mut self, epilogue: GemmEpilogue) {
        self.epilogue = epilogue;
    }

    /// How this handle adds the bias of a linear (see [`Gpu::set_gemm_epilogue`]).
    ///
    /// ```no_run
    /// println!("{}", dtl_cuda::Gpu::open(0).unwrap().gemm_epilogue().name());
    /// ```
    pub fn gemm_epilogue(&self) -> GemmEpilogue {
        self.epilogue
    }

    /// How many bf16 linears with a bias ran with cuBLASLt's bias epilogue and how many fell
    /// back to the plain path, since the device was opened (over all its clones).
    ///
    /// ```no_run
    /// let s = dtl_cuda::Gpu::open(0).unwrap().epilogue_stats();
    /// assert_eq!(s.fused + s.fallback, 0);
    /// ```
    pub fn epilogue_stats(&self) -> EpilogueStats {
        self.inner.epilogue_counts.stats()
    }

    /// The device ordinal `N` of `cuda:N`.
    ///
    /// ```no_run
    /// assert_eq!(dtl_cuda::Gpu::open(0).unwrap().ordinal(), 0);
    /// ```
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// The device's name, as the driver gives it (`NVIDIA H200`).
    ///
    /// ```no_run
    /// println!("{}", dtl_cuda::Gpu::open(0).unwrap().name());
    /// ```
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The device's compute capability `(major, minor)` (`(9, 0)` for Hopper).
    ///
    /// ```no_run
    /// let (major, _) = dtl_cuda::Gpu::open(0).unwrap().compute_capability();
    /// assert!(major >= 7);
    /// ```
    pub fn compute_capability(&self) -> (u32, u32) {
        self.inner.cc
    }

    /// Refuses `op` while a graph is being recorded (it would not be part of the graph, or
    /// cannot be), and marks the recording as broken.
    fn not_recording(&self, op: &str) -> Result<()> {
        let mut r = self
            .inner
            .recording
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !r.active {
            return Ok(());
        }
        let why = format!("{op} while recording a graph");
        r.broken.get_or_insert_with(|| why.clone());
        Err(DtlError::Device(format!(
            "cuda:{}: {why} is not possible",
            self.inner.ordinal
        )))
    }

    /// A zero-filled allocation of `bytes` (at least 1) that counts in the memory stats.
    fn alloc_mem(&self, op: &str, bytes: usize) -> Result<(DevMem, u64)> {
        self.not_recording(op)?;
        self.bind(op)?;
        let slice = self
            .inner
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| {
                drv_err(
                    &format!(
                        "allocating {:.1} MiB on cuda:{}",
                        bytes as f64 / (1u64 << 20) as f64,
                        self.inner.ordinal
                    ),
                    e,
                )
            })?;
        let ptr = slice.device_ptr(&self.inner.stream).0;
        let bytes = bytes.max(1) as u64;
        self.inner.counters.add(bytes);
        Ok((
            DevMem {
                _slice: slice,
                bytes,
                counters: self.inner.counters.clone(),
            },
            ptr,
        ))
    }

    /// A zero-filled buffer of `len` values, bf16 with `bf16`.
    fn alloc_buf(&self, len: usize, bf16: bool) -> Result<GpuBuf> {
        const OP: &str = "alloc";
        let elem = if bf16 { 2 } else { 4 };
        if len > isize::MAX as usize / elem {
            return Err(invalid(OP, format!("{len} values do not fit in memory")));
        }
        let (mem, ptr) = self.alloc_mem(OP, len.max(1) * elem)?;
        Ok(GpuBuf {
            mem: Some(mem),
            ptr,
            len,
            bf16,
            owner: self.inner.id,
            keep: self.inner.keep.clone(),
        })
    }

    /// Whether this device stores activations and frozen weights in bf16.
    fn bf16(&self) -> bool {
        self.inner.precision == Precision::Bf16
    }

    fn bind(&self, op: &str) -> Result<()> {
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(|e| drv_err(&format!("{op} on cuda:{}", self.inner.ordinal), e))
    }

    /// Issues `work` on the stream; while the profiler is on, between a start and an end event
    /// kept under the label `label` gives for its result (none: the work issued nothing, the
    /// events are dropped). The events are read when the profile is taken, not here. Every
    /// launch, product and device copy goes through this.
    pub(crate) fn timed<T>(
        &self,
        op: &str,
        label: impl FnOnce(&T) -> Option<String>,
        work: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let p = &self.inner.profiler;
        if !p.is_on() {
            return work();
        }
        let what = || format!("{op} on cuda:{}: profiling", self.inner.ordinal);
        let (start, end) = match p.spare() {
            Some(pair) => pair,
            None => {
                let event = || {
                    self.inner
                        .ctx
                        .new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(|e| drv_err(&what(), e))
                };
                (event()?, event()?)
            }
        };
        let stream = &self.inner.stream;
        start.record(stream).map_err(|e| drv_err(&what(), e))?;
        let done = work()?;
        match label(&done) {
            Some(l) => {
                end.record(stream).map_err(|e| drv_err(&what(), e))?;
                p.push(&l, (start, end));
            }
            None => p.give_back((start, end)),
        }
        Ok(done)
    }
}

impl Exec for Gpu {
    type Buf = GpuBuf;

    fn ptr(&self, op: &str, name: &str, b: &GpuBuf, need: usize) -> Result<Dp> {
        if b.owner != self.inner.id {
            return Err(invalid(
                op,
                format!("buffer `{name}` belongs to another GPU device handle"),
            ));
        }
        check_len(op, name, b.len, need)?;
        Ok(Dp {
            addr: b.ptr,
            bf16: b.bf16,
        })
    }

    unsafe fn launch(&self, op: &str, k: K, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let storage = nvrtc::takes_storage()[k as usize];
        check_storage(op, nvrtc::KERNEL_NAMES[k as usize], storage, args)?;
        let mask = storage.then(|| storage_mask(args));
        let f = &self.inner.funcs[k as usize];
        let mut b = self.inner.stream.launch_builder(f);
        for a in args.iter().chain(mask.as_ref()) {
            match a {
                Arg::P(p) => {
                    b.arg(&p.addr);
                }
                Arg::I(i) => {
                    b.arg(i);
                }
                Arg::F(x) => {
                    b.arg(x);
                }
            }
        }
        let name = nvrtc::KERNEL_NAMES[k as usize];
        self.timed(
            op,
            |_| Some(name.to_string()),
            || {
                // SAFETY: the caller's contract (see `Exec::launch`).
                unsafe { b.launch(cfg) }
                    .map(|_| ())
                    .map_err(|e| drv_err(&format!("{op} on cuda:{}", self.inner.ordinal), e))
            },
        )
    }

    unsafe fn gemm_raw(&self, op: &str, g: &Gemm, a: Dp, b: Dp, c: Dp) -> Result<()> {
        self.bind(op)?;
        self.timed(
            op,
            |_| Some(profile::gemm_label(op, g, a.bf16)),
            || {
                // SAFETY: the caller's contract; the context is bound.
                unsafe { self.inner.blas.run(op, g, a, b, c) }
            },
        )
    }

    unsafe fn copy_raw(&self, op: &str, src: u64, dst: u64, bytes: usize) -> Result<()> {
        self.bind(op)?;
        self.timed(
            op,
            |_| Some(profile::COPY.to_string()),
            || {
                // SAFETY: the caller's contract: both pointers hold `bytes` bytes, apart.
                unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.inner.stream.cu_stream()) }
                    .map_err(|e| drv_err(op, e))
            },
        )
    }

    fn with_scratch(
        &self,
        op: &str,
        bytes: usize,
        f: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<()> {
        let mut s = self.inner.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if s.as_ref().map_or(true, |(_, _, cap)| *cap < bytes) {
            // grow to the next power of two (at least 1 MiB), so that it seldom grows again
            let cap = bytes.next_power_of_two().max(1 << 20);
            let (mem, ptr) = self.alloc_mem(&format!("{op}: growing the bf16 scratch"), cap)?;
            if let Some((old, _, _)) = s.replace((mem, ptr, cap)) {
                self.inner.keep.drop_or_keep(old);
            }
        }
        let ptr = s.as_ref().map_or(0, |(_, p, _)| *p);
        f(ptr)
    }

    fn with_partials(&self, f: &mut dyn FnMut(u64) -> Result<()>) -> Result<()> {
        let _guard = self
            .inner
            .partials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(self.inner.partials_ptr)
    }

    fn attention_kernels(&self) -> AttentionKernels {
        self.attention
    }

    fn gemm_epilogue(&self) -> GemmEpilogue {
        self.epilogue
    }

    fn epilogue_counts(&self) -> Option<&EpilogueCounts> {
        Some(&self.inner.epilogue_counts)
    }

    unsafe fn gemm_bias_raw(
        &self,
        op: &str,
        g: &Gemm,
        a: Dp,
        b: Dp,
        c: Dp,
        bias: Dp,
    ) -> Result<bool> {
        self.bind(op)?;
        self.timed(
            op,
            |&fused: &bool| fused.then(|| format!("{} +bias", profile::gemm_label(op, g, a.bf16))),
            || {
                // SAFETY: the caller's contract (checked by `Exec::gemm_bias`); the context is
                // bound.
                Ok(unsafe { self.inner.lt.run(g, a, b, c, bias) })
            },
        )
    }
}

#[allow(clippy::too_many_arguments)]
impl Kernels for Gpu {
    type Buf = GpuBuf;

    fn describe(&self) -> String {
        format!("cuda:{} ({})", self.inner.ordinal, self.inner.name)
    }

    fn precision(&self) -> Precision {
        self.inner.precision
    }

    fn alloc(&self, len: usize) -> Result<GpuBuf> {
        self.alloc_buf(len, false)
    }

    fn alloc_act(&self, len: usize) -> Result<GpuBuf> {
        self.alloc_buf(len, self.bf16())
    }

    fn upload_frozen(&self, host: &[f32]) -> Result<GpuBuf> {
        let mut b = self.alloc_buf(host.len(), self.bf16())?;
        self.upload(host, &mut b)?;
        Ok(b)
    }

    fn len(&self, buf: &GpuBuf) -> usize {
        buf.len
    }

    fn upload(&self, host: &[f32], dst: &mut GpuBuf) -> Result<()> {
        const OP: &str = "upload";
        let base = self.dst(OP, "dst", dst, host.len())?;
        self.not_recording(OP)?;
        if host.is_empty() {
            return Ok(());
        }
        self.bind(OP)?;
        let mut st = self.inner.staging.lock().unwrap_or_else(|p| p.into_inner());
        for (i, chunk) in host.chunks(STAGE).enumerate() {
            let which = st.next;
            st.next ^= 1;
            let stage = &mut st.bufs[which];
            // The previous copy out of this staging buffer must be done before it is rewritten.
            stage.done.synchronize().map_err(|e| drv_err(OP, e))?;
            let p = stage.host.as_mut_ptr().map_err(|e| drv_err(OP, e))?;
            let at = base.at(i * STAGE).addr;
            let cu = self.inner.stream.cu_stream();
            if base.bf16 {
                // SAFETY: the staging buffer holds STAGE f32 values, room for as many bf16 ones;
                // no copy reads it (waited above), host memory never overlaps it. `dst` holds
                // host.len() values (checked), so the chunk fits at its offset; the staging
                // memory is pinned and stays untouched until `done` passes.
                unsafe {
                    let q = p as *mut u16;
                    for (j, v) in chunk.iter().enumerate() {
                        *q.add(j) = bf16_bits(*v);
                    }
                    let staged = std::slice::from_raw_parts(q as *const u16, chunk.len());
                    drv::memcpy_htod_async(at, staged, cu)
                }
                .map_err(|e| drv_err(OP, e))?;
            } else {
                // SAFETY: as above, with f32 values.
                unsafe {
                    std::ptr::copy_nonoverlapping(chunk.as_ptr(), p, chunk.len());
                    let staged = std::slice::from_raw_parts(p as *const f32, chunk.len());
                    drv::memcpy_htod_async(at, staged, cu)
                }
                .map_err(|e| drv_err(OP, e))?;
            }
            stage
                .done
                .record(&self.inner.stream)
                .map_err(|e| drv_err(OP, e))?;
        }
        Ok(())
    }

    fn download(&self, src: &GpuBuf, len: usize) -> Result<Vec<f32>> {
        const OP: &str = "download";
        let p = self.src(OP, "src", src, len)?;
        self.not_recording(OP)?;
        self.bind(OP)?;
        let cu = self.inner.stream.cu_stream();
        if p.bf16 {
            let mut bits = vec![0u16; len];
            if len > 0 {
                // SAFETY: `src` holds at least `len` bf16 values (checked), `bits` exactly `len`.
                unsafe { drv::memcpy_dtoh_async(&mut bits, p.addr, cu) }
                    .map_err(|e| drv_err(OP, e))?;
            }
            self.synchronize()?;
            return Ok(bits.into_iter().map(f32_from_bf16).collect());
        }
        let mut out = vec![0.0f32; len];
        if len > 0 {
            // SAFETY: `src` holds at least `len` values (checked) and `out` exactly `len`.
            unsafe { drv::memcpy_dtoh_async(&mut out, p.addr, cu) }.map_err(|e| drv_err(OP, e))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    fn synchronize(&self) -> Result<()> {
        const OP: &str = "synchronize";
        self.not_recording(OP)?;
        self.bind(OP)?;
        self.inner.stream.synchronize().map_err(|e| {
            drv_err(
                &format!("cuda:{}: queued work failed", self.inner.ordinal),
                e,
            )
        })?;
        self.inner.ctx.check_err().map_err(|e| {
            drv_err(
                &format!("cuda:{}: freeing memory failed", self.inner.ordinal),
                e,
            )
        })
    }

    fn memory(&self) -> Option<MemoryStats> {
        let c = &self.inner.counters;
        let driver_used = self.inner.driver_base.and_then(|base| {
            let (free, total) = self.inner.ctx.mem_get_info().ok()?;
            Some(((total - free) as u64).saturating_sub(base))
        });
        Some(MemoryStats {
            live: c.live.load(Ordering::Relaxed),
            peak: c.peak.load(Ordering::Relaxed),
            driver_used,
        })
    }

    fn reset_peak(&self) {
        let c = &self.inner.counters;
        c.peak
            .store(c.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Capture> {
        const OP: &str = "capture";
        self.bind(OP)?;
        if self.inner.profiler.is_on() {
            work()?;
            return Ok(Capture::Plain(profile::NO_CAPTURE.to_string()));
        }
        {
            let mut r = self
                .inner
                .recording
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if r.active {
                return Err(DtlError::Device(format!(
                    "cuda:{}: capture inside a capture",
                    self.inner.ordinal
                )));
            }
            *r = Recording {
                active: true,
                broken: None,
            };
        }
        // buffers dropped from here on are kept: the graph may hold their pointers
        self.inner.keep.hold();
        let stream = &self.inner.stream;
        let recorded: std::result::Result<CudaGraph, String> = match stream
            .begin_capture(dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            Err(e) => Err(format!("beginning the capture: {}", driver_text(e))),
            Ok(()) => {
                let ran = work();
                // the capture always ends, whatever happened in the work
                let ended = stream.end_capture(dsys::CUgraphInstantiate_flags(0));
                let broken = self
                    .inner
                    .recording
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .broken
                    .take();
                match (broken, ran, ended) {
                    (Some(why), _, _) => Err(why),
                    (None, Err(e), _) => Err(e.to_string()),
                    (None, Ok(()), Err(e)) => {
                        Err(format!("ending the capture: {}", driver_text(e)))
                    }
                    (None, Ok(()), Ok(None)) => Err("the capture recorded nothing".to_string()),
                    (None, Ok(()), Ok(Some(g))) => Ok(g),
                }
            }
        };
        self.inner
            .recording
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .active = false;
        match recorded {
            Ok(graph) => {
                // during the capture nothing ran: run it once now
                if let Err(e) = graph.launch() {
                    drop(graph);
                    self.inner.keep.unhold();
                    return Err(drv_err(
                        &format!("cuda:{}: launching a recorded graph", self.inner.ordinal),
                        e,
                    ));
                }
                let mut g = self.inner.graphs.lock().unwrap_or_else(|p| p.into_inner());
                g.next += 1;
                let id = g.next;
                g.map.insert(id, Graph(graph));
                Ok(Capture::Graph(GraphId(id)))
            }
            Err(reason) => {
                self.inner.keep.unhold();
                work()?;
                Ok(Capture::Plain(reason))
            }
        }
    }

    fn replay(&self, graph: &GraphId) -> Result<()> {
        let g = self.inner.graphs.lock().unwrap_or_else(|p| p.into_inner());
        let found = g.map.get(&graph.0).ok_or_else(|| {
            DtlError::Device(format!(
                "cuda:{}: no recorded graph {} (released, or made by another device)",
                self.inner.ordinal, graph.0
            ))
        })?;
        self.timed(
            "replay",
            |_| Some(profile::REPLAY.to_string()),
            || {
                found.0.launch().map_err(|e| {
                    drv_err(
                        &format!("cuda:{}: replaying graph {}", self.inner.ordinal, graph.0),
                        e,
                    )
                })
            },
        )
    }

    fn release(&self, graph: GraphId) {
        let removed = self
            .inner
            .graphs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .remove(&graph.0);
        if let Some(g) = removed {
            // an executable graph still running is freed by the driver when it completes; the
            // memory kept for it is freed in stream order, after it
            let _ = self.bind("release");
            drop(g);
            self.inner.keep.unhold();
        }
    }

    fn profile_start(&self) -> Result<()> {
        self.bind("profile_start")?;
        if self
            .inner
            .recording
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .active
        {
            return Err(DtlError::Device(format!(
                "cuda:{}: {}",
                self.inner.ordinal,
                profile::NOT_WHILE_RECORDING
            )));
        }
        self.inner.profiler.start();
        Ok(())
    }

    fn profile_take(&self) -> Result<Option<dtl_kernels::KernelProfile>> {
        if !self.inner.profiler.is_on() {
            return Ok(None);
        }
        // one wait for all the work; the events are read after it
        let waited = self.synchronize();
        let ordinal = self.inner.ordinal;
        let profile = self.inner.profiler.finish(profile::EVENTS, |(start, end)| {
            start
                .elapsed_ms(end)
                .map(f64::from)
                .map_err(|e| drv_err(&format!("cuda:{ordinal}: reading the profiling events"), e))
        });
        waited?;
        profile
    }

    crate::ops::kernel_ops!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Gpu>();
        send_sync::<GpuBuf>();
    }
}
