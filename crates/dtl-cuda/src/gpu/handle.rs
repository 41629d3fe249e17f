//! The [`Gpu`] handle: opening a device, its state, its settings and the profiling of each
//! piece of work it issues.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys as dsys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
};
use cudarc::nvrtc::Ptx;
use dtl_core::choice::Precision;
use dtl_core::{DtlError, Result};
use dtl_kernels::Kernels;

use crate::blas::Blas;
use crate::fused::AttentionKernels;
use crate::lt::{EpilogueCounts, EpilogueStats, GemmEpilogue, Lt};
use crate::ops::{resolve, Keep, PARTIALS};
use crate::profile::Profiler;
use crate::{nvrtc, DeviceSettings};

use super::{drv_err, probe, Counters, DevMem, Graphs, Recording, Stage, Staging, STAGE};

pub(super) struct Inner {
    pub(super) id: u64,
    pub(super) ordinal: usize,
    pub(super) name: String,
    pub(super) cc: (u32, u32),
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) funcs: Vec<CudaFunction>,
    /// Declared before the workspace it uses, so that it is destroyed first.
    pub(super) blas: Blas,
    /// The cuBLASLt handle of the bias epilogue, on the same workspace (the stream orders them).
    pub(super) lt: Lt,
    pub(super) epilogue_counts: EpilogueCounts,
    _blas_workspace: CudaSlice<u8>,
    /// The partial sums of `sum_squares`; the lock keeps its two launches together.
    pub(super) partials: Mutex<CudaSlice<f32>>,
    pub(super) partials_ptr: u64,
    pub(super) staging: Mutex<Staging>,
    pub(super) counters: Arc<Counters>,
    /// The bf16 copies of f32 operands of mixed products, grown on demand.
    pub(super) scratch: Mutex<Option<(DevMem, u64, usize)>>,
    pub(super) keep: Arc<Keep<DevMem>>,
    pub(super) graphs: Mutex<Graphs>,
    pub(super) recording: Mutex<Recording>,
    pub(super) driver_base: Option<u64>,
    pub(super) precision: Precision,
    /// The start and end events of each operation while profiling.
    pub(super) profiler: Profiler<(CudaEvent, CudaEvent)>,
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
    pub(super) inner: Arc<Inner>,
    pub(super) attention: AttentionKernels,
    pub(super) epilogue: GemmEpilogue,
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

    /// Whether this device stores activations and frozen weights in bf16.
    pub(super) fn bf16(&self) -> bool {
        self.inner.precision == Precision::Bf16
    }

    pub(super) fn bind(&self, op: &str) -> Result<()> {
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

/// The settings of a GPU handle; see [`DeviceSettings`].
///
/// ```no_run
/// use dtl_cuda::{AttentionKernels, DeviceSettings};
/// let mut gpu = dtl_cuda::Gpu::open(0).unwrap();
/// gpu.set_attention(AttentionKernels::Fused);
/// assert_eq!(gpu.attention_kernels(), AttentionKernels::Fused);
/// let s = gpu.epilogue_stats();
/// assert_eq!(s.fused + s.fallback, 0);
/// ```
impl DeviceSettings for Gpu {
    fn set_attention(&mut self, kernels: AttentionKernels) {
        self.attention = kernels;
    }

    fn attention_kernels(&self) -> AttentionKernels {
        self.attention
    }

    fn set_gemm_epilogue(&mut self, epilogue: GemmEpilogue) {
        self.epilogue = epilogue;
    }

    fn gemm_epilogue(&self) -> GemmEpilogue {
        self.epilogue
    }

    fn epilogue_stats(&self) -> EpilogueStats {
        self.inner.epilogue_counts.stats()
    }
}
