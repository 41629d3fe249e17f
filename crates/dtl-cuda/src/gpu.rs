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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    result as drv, sys as dsys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream,
    DevicePtr, DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use dtl_core::{DtlError, Result};
use dtl_kernels::{check_len, Kernels, MemoryStats};

use crate::blas::{Blas, Gemm};
use crate::ops::{invalid, Arg, Exec, K, PARTIALS};
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
struct Counters {
    live: AtomicU64,
    peak: AtomicU64,
}

impl Counters {
    fn add(&self, bytes: u64) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A buffer of `f32` values in the memory of one [`Gpu`]: the [`Kernels::Buf`] of the GPU.
///
/// Made by [`Kernels::alloc`] (zero-filled) or [`Kernels::upload_new`]; its bytes count in
/// [`Kernels::memory`] until it is dropped. A buffer works only with the [`Gpu`] that made it
/// (or a clone of it); any other is refused with an error.
///
/// ```no_run
/// use dtl_kernels::Kernels;
/// let gpu = dtl_cuda::Gpu::open(0).unwrap();
/// let b = gpu.upload_new(&[1.0, 2.0]).unwrap();
/// assert_eq!(gpu.len(&b), 2);
/// assert_eq!(gpu.download(&b, 2).unwrap(), vec![1.0, 2.0]);
/// ```
pub struct GpuBuf {
    /// Owns the memory (freed in stream order when dropped); work goes through `ptr`.
    _mem: CudaSlice<f32>,
    ptr: u64,
    len: usize,
    bytes: u64,
    owner: u64,
    counters: Arc<Counters>,
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
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        // the memory itself is freed by `_mem`, in stream order
        self.counters.sub(self.bytes);
    }
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf({} values)", self.len)
    }
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
    _blas_workspace: CudaSlice<u8>,
    /// The partial sums of `sum_squares`; the lock keeps its two launches together.
    partials: Mutex<CudaSlice<f32>>,
    partials_ptr: u64,
    staging: Mutex<Staging>,
    counters: Arc<Counters>,
    driver_base: Option<u64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Queued copies may still read the staging buffers and kernels may still run: wait
        // before the pinned memory, the module and the handle go.
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
    }
}

/// One CUDA device running dtl's kernel set ([`Kernels`]) in f32: the project's own kernels
/// (compiled once per process with NVRTC for the device's compute capability) and cuBLAS
/// products with f32 compute (TF32 off), all in order on one non-blocking stream.
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
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
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
                _blas_workspace: workspace,
                partials: Mutex::new(partials),
                partials_ptr,
                staging: Mutex::new(staging),
                counters,
                driver_base,
            }),
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

    fn bind(&self, op: &str) -> Result<()> {
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(|e| drv_err(&format!("{op} on cuda:{}", self.inner.ordinal), e))
    }
}

impl Exec for Gpu {
    type Buf = GpuBuf;

    fn ptr(&self, op: &str, name: &str, b: &GpuBuf, need: usize) -> Result<u64> {
        if b.owner != self.inner.id {
            return Err(invalid(
                op,
                format!("buffer `{name}` belongs to another GPU device handle"),
            ));
        }
        check_len(op, name, b.len, need)?;
        Ok(b.ptr)
    }

    unsafe fn launch(&self, op: &str, k: K, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = &self.inner.funcs[k as usize];
        let mut b = self.inner.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(p) => {
                    b.arg(p);
                }
                Arg::I(i) => {
                    b.arg(i);
                }
                Arg::F(x) => {
                    b.arg(x);
                }
            }
        }
        // SAFETY: the caller's contract (see `Exec::launch`).
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| drv_err(&format!("{op} on cuda:{}", self.inner.ordinal), e))
    }

    unsafe fn gemm_raw(&self, op: &str, g: &Gemm, a: u64, b: u64, c: u64) -> Result<()> {
        self.bind(op)?;
        // SAFETY: the caller's contract; the context is bound.
        unsafe { self.inner.blas.run(op, g, a, b, c) }
    }

    unsafe fn copy_raw(&self, op: &str, src: u64, dst: u64, n: usize) -> Result<()> {
        self.bind(op)?;
        // SAFETY: the caller's contract: both pointers hold `n` values, apart.
        unsafe { drv::memcpy_dtod_async(dst, src, n * 4, self.inner.stream.cu_stream()) }
            .map_err(|e| drv_err(op, e))
    }

    fn with_partials(&self, f: &mut dyn FnMut(u64) -> Result<()>) -> Result<()> {
        let _guard = self
            .inner
            .partials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(self.inner.partials_ptr)
    }
}

#[allow(clippy::too_many_arguments)]
impl Kernels for Gpu {
    type Buf = GpuBuf;

    fn describe(&self) -> String {
        format!("cuda:{} ({})", self.inner.ordinal, self.inner.name)
    }

    fn alloc(&self, len: usize) -> Result<GpuBuf> {
        const OP: &str = "alloc";
        let n = len.max(1);
        if n > isize::MAX as usize / 4 {
            return Err(invalid(OP, format!("{len} values do not fit in memory")));
        }
        self.bind(OP)?;
        let slice = self.inner.stream.alloc_zeros::<f32>(n).map_err(|e| {
            drv_err(
                &format!(
                    "allocating {:.1} MiB on cuda:{}",
                    (n * 4) as f64 / (1u64 << 20) as f64,
                    self.inner.ordinal
                ),
                e,
            )
        })?;
        let ptr = slice.device_ptr(&self.inner.stream).0;
        let bytes = (n * 4) as u64;
        self.inner.counters.add(bytes);
        Ok(GpuBuf {
            _mem: slice,
            ptr,
            len,
            bytes,
            owner: self.inner.id,
            counters: self.inner.counters.clone(),
        })
    }

    fn len(&self, buf: &GpuBuf) -> usize {
        buf.len
    }

    fn upload(&self, host: &[f32], dst: &mut GpuBuf) -> Result<()> {
        const OP: &str = "upload";
        let base = self.dst(OP, "dst", dst, host.len())?;
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
            // SAFETY: the staging buffer holds STAGE >= chunk.len() values, no copy reads it
            // (waited above), and host memory never overlaps it.
            let staged = unsafe {
                std::ptr::copy_nonoverlapping(chunk.as_ptr(), p, chunk.len());
                std::slice::from_raw_parts(p as *const f32, chunk.len())
            };
            let at = base + (i * STAGE * 4) as u64;
            // SAFETY: `dst` holds host.len() values (checked), so this chunk fits at its
            // offset; the staging memory is pinned and stays untouched until `done` passes.
            unsafe { drv::memcpy_htod_async(at, staged, self.inner.stream.cu_stream()) }
                .map_err(|e| drv_err(OP, e))?;
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
        self.bind(OP)?;
        let mut out = vec![0.0f32; len];
        if len > 0 {
            // SAFETY: `src` holds at least `len` values (checked) and `out` exactly `len`.
            unsafe { drv::memcpy_dtoh_async(&mut out, p, self.inner.stream.cu_stream()) }
                .map_err(|e| drv_err(OP, e))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    fn synchronize(&self) -> Result<()> {
        const OP: &str = "synchronize";
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
