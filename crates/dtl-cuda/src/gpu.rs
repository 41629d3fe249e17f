//! The GPU device handle, device buffers and the safe kernel and GEMM functions.
//!
//! Every `unsafe` call of the crate lives in this module: each public function checks the
//! lengths of its buffers against the sizes it is given before it launches anything, so no
//! argument can make a kernel or a GEMM read or write out of bounds.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaDevice, CudaFunction, CudaSlice, DeviceSlice, LaunchAsync, LaunchConfig};
use cudarc::nvrtc::Ptx;

use dtl_core::{DtlError, Result};

/// Name under which the kernels are loaded into a device.
const MODULE: &str = "dtl_kernels";

/// CUDA C source of the project's kernels (compiled at run time with NVRTC).
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// Every kernel entry point in [`KERNEL_SOURCE`].
pub const KERNEL_NAMES: &[&str] = &[
    "dtl_layer_norm",
    "dtl_layer_norm_vjp",
    "dtl_gelu",
    "dtl_bias_gelu",
    "dtl_gelu_vjp",
    "dtl_bias_add",
    "dtl_softmax_rows",
    "dtl_softmax_rows_vjp",
    "dtl_residual",
    "dtl_scale_samples",
    "dtl_split_heads",
    "dtl_merge_heads",
    "dtl_patchify",
    "dtl_assemble_tokens",
];

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;

/// Compiles [`KERNEL_SOURCE`] to PTX with NVRTC. Needs the NVRTC library but no GPU.
///
/// ```no_run
/// let ptx = dtl_cuda::compile_kernels().unwrap();
/// assert!(ptx.contains(".entry dtl_layer_norm"));
/// ```
pub fn compile_kernels() -> Result<String> {
    compile_ptx().map(|p| p.to_src())
}

/// NVRTC runs once per process; every device loads the same PTX.
fn compile_ptx() -> Result<Ptx> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        cudarc::nvrtc::compile_ptx(KERNEL_SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => format!(
                    "NVRTC could not compile the dtl kernels: {}",
                    log.to_string_lossy().replace('\n', " | ")
                ),
                other => format!("NVRTC failed on the dtl kernels: {other:?}"),
            })
    })
    .clone()
    .map(Ptx::from_src)
    .map_err(DtlError::Device)
}

/// Names a driver error by its code. cudarc's own formatting asks the driver for the text and
/// panics when the driver cannot answer (as the link-time stub driver cannot).
fn driver_code(e: &cudarc::driver::DriverError) -> String {
    format!("{:?}", e.0)
}

fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> DtlError + '_ {
    move |e| DtlError::Device(format!("{what}: CUDA driver error {}", driver_code(&e)))
}

fn blas_err(what: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> DtlError + '_ {
    move |e| DtlError::Device(format!("{what}: cuBLAS error {:?}", e.0))
}

fn check_len(op: &str, name: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        Err(DtlError::Invalid(format!(
            "{op}: buffer `{name}` holds {got} values, needs at least {want}"
        )))
    } else {
        Ok(())
    }
}

fn to_i32(op: &str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        DtlError::Invalid(format!(
            "{op}: `{name}` = {v} exceeds the 32-bit range the kernels use"
        ))
    })
}

/// Counts the CUDA devices, or says why there are none, without panicking.
fn device_count() -> Result<usize> {
    cudarc::driver::result::init().map_err(|e| {
        DtlError::Unavailable(format!(
            "no usable CUDA driver ({}); device cuda:N needs an NVIDIA GPU and its driver",
            driver_code(&e)
        ))
    })?;
    let n = cudarc::driver::result::device::get_count().map_err(|e| {
        DtlError::Unavailable(format!(
            "the CUDA driver could not count devices: {}",
            driver_code(&e)
        ))
    })?;
    Ok(n.max(0) as usize)
}

/// A float buffer in GPU memory.
///
/// Made by [`Gpu::upload`] or [`Gpu::zeros`], read back with [`Gpu::download`].
///
/// ```no_run
/// let gpu = dtl_cuda::Gpu::new(0).unwrap();
/// let v = gpu.upload(&[1.0, 2.0]).unwrap();
/// assert_eq!(v.len(), 2);
/// assert_eq!(gpu.download(&v).unwrap(), vec![1.0, 2.0]);
/// ```
pub struct GpuVec {
    buf: CudaSlice<f32>,
}

impl GpuVec {
    /// Number of floats.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the buffer holds no value.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == 0
    }
}

impl std::fmt::Debug for GpuVec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuVec(len = {})", self.len())
    }
}

/// Shape of a row-major matrix product `C = alpha * op(A) op(B) + beta * C`, optionally
/// repeated over a batch with fixed strides between the matrices.
///
/// `op(A)` is `m x k` and `op(B)` is `k x n`; with `trans_a` the buffer holds A as `k x m`,
/// with `trans_b` B as `n x k`. `C` is `m x n`.
///
/// ```
/// // y (rows x out) = x (rows x in) * w^T, with w stored (out x in) like a PyTorch Linear.
/// let mm = dtl_cuda::MatMul::new(4, 3, 2).trans_b();
/// assert_eq!((mm.m, mm.n, mm.k, mm.trans_b), (4, 3, 2, true));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatMul {
    /// Rows of `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Whether the `A` buffer holds `A^T` (`k x m`).
    pub trans_a: bool,
    /// Whether the `B` buffer holds `B^T` (`n x k`).
    pub trans_b: bool,
    /// Number of products.
    pub batch: usize,
    /// Floats between consecutive `A` matrices.
    pub stride_a: usize,
    /// Floats between consecutive `B` matrices.
    pub stride_b: usize,
    /// Floats between consecutive `C` matrices.
    pub stride_c: usize,
    /// Factor of the product.
    pub alpha: f32,
    /// Factor of the previous content of `C` (0 overwrites it).
    pub beta: f32,
}

impl MatMul {
    /// One product `C (m x n) = A (m x k) B (k x n)`, no transposes, alpha 1, beta 0.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        MatMul {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// The `A` buffer holds `A^T`.
    pub fn trans_a(mut self) -> Self {
        self.trans_a = true;
        self
    }

    /// The `B` buffer holds `B^T`.
    pub fn trans_b(mut self) -> Self {
        self.trans_b = true;
        self
    }

    /// `batch` products of densely packed matrices.
    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self.stride_a = self.m * self.k;
        self.stride_b = self.k * self.n;
        self.stride_c = self.m * self.n;
        self
    }

    /// Scales the product by `alpha`.
    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    /// Adds `beta` times the previous `C`.
    pub fn beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }

    fn need(batch: usize, stride: usize, size: usize) -> usize {
        if batch == 0 {
            0
        } else {
            (batch - 1) * stride + size
        }
    }
}

/// A CUDA device: the primary context of GPU `ordinal`, a cuBLAS handle and the project's
/// kernels. Cloning is cheap and shares all three.
///
/// It retains the device's primary context and works on the legacy default stream, exactly
/// like dfdx's `Cuda` device, so buffers and work of both are ordered with each other.
///
/// ```no_run
/// let gpu = dtl_cuda::Gpu::new(0).unwrap();
/// let x = gpu.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
/// let mut y = gpu.zeros(4).unwrap();
/// gpu.gelu(&x, &mut y).unwrap();
/// println!("{:?}", gpu.download(&y).unwrap());
/// ```
#[derive(Clone)]
pub struct Gpu {
    dev: Arc<CudaDevice>,
    blas: Arc<CudaBlas>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu(cuda:{})", self.dev.ordinal())
    }
}

impl Gpu {
    /// Number of CUDA devices; an error (not a panic) when there is no usable driver.
    pub fn count() -> Result<usize> {
        device_count()
    }

    /// Opens `cuda:<ordinal>`, creates a cuBLAS handle and loads the kernels (compiled with
    /// NVRTC on first use in the process).
    pub fn new(ordinal: usize) -> Result<Self> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(DtlError::Unavailable(format!(
                "cuda:{ordinal} requested but {n} CUDA device(s) are present (valid: {})",
                if n == 0 {
                    "none".to_string()
                } else {
                    format!("cuda:0 .. cuda:{}", n - 1)
                }
            )));
        }
        let dev = CudaDevice::new(ordinal).map_err(driver_err("opening the CUDA device"))?;
        let blas = CudaBlas::new(dev.clone()).map_err(blas_err("creating a cuBLAS handle"))?;
        if !dev.has_func(MODULE, KERNEL_NAMES[0]) {
            dev.load_ptx(compile_ptx()?, MODULE, KERNEL_NAMES)
                .map_err(driver_err("loading the dtl kernels"))?;
        }
        Ok(Gpu {
            dev,
            blas: Arc::new(blas),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal()
    }

    /// Free and total device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.dev
            .bind_to_thread()
            .map_err(driver_err("binding the CUDA context"))?;
        cudarc::driver::result::mem_get_info().map_err(driver_err("querying device memory"))
    }

    /// Waits for all queued work to finish.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize().map_err(driver_err("synchronizing"))
    }

    /// Copies host floats into a new device buffer.
    pub fn upload(&self, host: &[f32]) -> Result<GpuVec> {
        let buf = self
            .dev
            .htod_sync_copy(host)
            .map_err(driver_err("copying to the GPU"))?;
        Ok(GpuVec { buf })
    }

    /// Copies host floats into an existing buffer of the same length.
    pub fn upload_into(&self, host: &[f32], dst: &mut GpuVec) -> Result<()> {
        if host.len() != dst.len() {
            return Err(DtlError::Invalid(format!(
                "upload_into: {} host values for a buffer of {}",
                host.len(),
                dst.len()
            )));
        }
        self.dev
            .htod_sync_copy_into(host, &mut dst.buf)
            .map_err(driver_err("copying to the GPU"))
    }

    /// A new zero-filled device buffer of `len` floats.
    pub fn zeros(&self, len: usize) -> Result<GpuVec> {
        let buf = self
            .dev
            .alloc_zeros::<f32>(len)
            .map_err(driver_err("allocating GPU memory"))?;
        Ok(GpuVec { buf })
    }

    /// Copies a device buffer back to the host.
    pub fn download(&self, v: &GpuVec) -> Result<Vec<f32>> {
        self.dev
            .dtoh_sync_copy(&v.buf)
            .map_err(driver_err("copying from the GPU"))
    }

    /// `dst = src` for buffers of equal length.
    pub fn copy(&self, src: &GpuVec, dst: &mut GpuVec) -> Result<()> {
        if src.len() != dst.len() {
            return Err(DtlError::Invalid(format!(
                "copy: source holds {} values, destination {}",
                src.len(),
                dst.len()
            )));
        }
        self.dev
            .dtod_copy(&src.buf, &mut dst.buf)
            .map_err(driver_err("copying on the GPU"))
    }

    /// A new buffer holding a copy of `src`.
    pub fn duplicate(&self, src: &GpuVec) -> Result<GpuVec> {
        let buf = src
            .buf
            .try_clone()
            .map_err(driver_err("copying on the GPU"))?;
        Ok(GpuVec { buf })
    }

    fn func(&self, name: &str) -> Result<CudaFunction> {
        self.dev.get_func(MODULE, name).ok_or_else(|| {
            DtlError::Device(format!(
                "kernel `{name}` is not loaded on cuda:{}",
                self.ordinal()
            ))
        })
    }

    fn elementwise(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn per_row(op: &str, rows: usize, width: usize) -> Result<LaunchConfig> {
        let threads = width.div_ceil(32).clamp(1, 8) as u32 * 32;
        let rows = u32::try_from(rows)
            .map_err(|_| DtlError::Invalid(format!("{op}: {rows} rows exceed the launch limit")))?;
        Ok(LaunchConfig {
            grid_dim: (rows.max(1), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// Row-wise LayerNorm: `y = (x - mean) / sqrt(var + eps) * gamma + beta` over rows of
    /// width `d` (`x.len() / d` rows).
    pub fn layer_norm(
        &self,
        x: &GpuVec,
        gamma: &GpuVec,
        beta: &GpuVec,
        d: usize,
        eps: f32,
        y: &mut GpuVec,
    ) -> Result<()> {
        let op = "layer_norm";
        let rows = rows_of(op, x.len(), d)?;
        check_len(op, "gamma", gamma.len(), d)?;
        check_len(op, "beta", beta.len(), d)?;
        check_len(op, "y", y.len(), x.len())?;
        if rows == 0 {
            return Ok(());
        }
        let cfg = Self::per_row(op, rows, d)?;
        let d = to_i32(op, "d", d)?;
        // SAFETY: every row of x and y is in bounds (checked above); gamma/beta hold d values.
        unsafe {
            self.func("dtl_layer_norm")?
                .launch(cfg, (&x.buf, &gamma.buf, &beta.buf, &mut y.buf, d, eps))
        }
        .map_err(driver_err(op))
    }

    /// Input-only VJP of [`Gpu::layer_norm`]: the gradient with respect to `x` given the
    /// gradient `gy` of the output; written into `gx`, or added to it with `accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_vjp(
        &self,
        x: &GpuVec,
        gamma: &GpuVec,
        gy: &GpuVec,
        d: usize,
        eps: f32,
        gx: &mut GpuVec,
        accumulate: bool,
    ) -> Result<()> {
        let op = "layer_norm_vjp";
        let rows = rows_of(op, x.len(), d)?;
        check_len(op, "gamma", gamma.len(), d)?;
        check_len(op, "gy", gy.len(), x.len())?;
        check_len(op, "gx", gx.len(), x.len())?;
        if rows == 0 {
            return Ok(());
        }
        let cfg = Self::per_row(op, rows, d)?;
        let d = to_i32(op, "d", d)?;
        // SAFETY: x, gy and gx hold rows * d values; gamma holds d.
        unsafe {
            self.func("dtl_layer_norm_vjp")?.launch(
                cfg,
                (
                    &x.buf,
                    &gamma.buf,
                    &gy.buf,
                    &mut gx.buf,
                    d,
                    eps,
                    accumulate as i32,
                ),
            )
        }
        .map_err(driver_err(op))
    }

    /// `y = gelu(x)` with the exact (erf) GELU.
    pub fn gelu(&self, x: &GpuVec, y: &mut GpuVec) -> Result<()> {
        let op = "gelu";
        check_len(op, "y", y.len(), x.len())?;
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        // SAFETY: the kernel touches indices below n, held by both buffers.
        unsafe {
            self.func("dtl_gelu")?
                .launch(Self::elementwise(n), (&x.buf, &mut y.buf, n))
        }
        .map_err(driver_err(op))
    }

    /// Adds `bias` (width `d`) to every row of `u` in place, then `y = gelu(u)`; `u` keeps the
    /// pre-activation that [`Gpu::gelu_vjp`] needs.
    pub fn bias_gelu(&self, u: &mut GpuVec, bias: &GpuVec, d: usize, y: &mut GpuVec) -> Result<()> {
        let op = "bias_gelu";
        rows_of(op, u.len(), d)?;
        check_len(op, "bias", bias.len(), d)?;
        check_len(op, "y", y.len(), u.len())?;
        let n = u.len();
        if n == 0 {
            return Ok(());
        }
        let d = to_i32(op, "d", d)?;
        // SAFETY: indices below n are in u and y; i % d is in bias.
        unsafe {
            self.func("dtl_bias_gelu")?.launch(
                Self::elementwise(n),
                (&mut u.buf, &bias.buf, &mut y.buf, n, d),
            )
        }
        .map_err(driver_err(op))
    }

    /// `gx = gy * gelu'(u)`.
    pub fn gelu_vjp(&self, u: &GpuVec, gy: &GpuVec, gx: &mut GpuVec) -> Result<()> {
        let op = "gelu_vjp";
        check_len(op, "gy", gy.len(), u.len())?;
        check_len(op, "gx", gx.len(), u.len())?;
        let n = u.len();
        if n == 0 {
            return Ok(());
        }
        // SAFETY: indices below n are in all three buffers.
        unsafe {
            self.func("dtl_gelu_vjp")?
                .launch(Self::elementwise(n), (&u.buf, &gy.buf, &mut gx.buf, n))
        }
        .map_err(driver_err(op))
    }

    /// Adds `bias` (width `d`) to every row of `y` in place.
    pub fn bias_add(&self, y: &mut GpuVec, bias: &GpuVec, d: usize) -> Result<()> {
        let op = "bias_add";
        rows_of(op, y.len(), d)?;
        check_len(op, "bias", bias.len(), d)?;
        let n = y.len();
        if n == 0 {
            return Ok(());
        }
        let d = to_i32(op, "d", d)?;
        // SAFETY: indices below n are in y; i % d is in bias.
        unsafe {
            self.func("dtl_bias_add")?
                .launch(Self::elementwise(n), (&mut y.buf, &bias.buf, n, d))
        }
        .map_err(driver_err(op))
    }

    /// In place, row by row (rows of width `n`): `s = softmax(scale * s)`.
    pub fn softmax_rows(&self, s: &mut GpuVec, n: usize, scale: f32) -> Result<()> {
        let op = "softmax_rows";
        let rows = rows_of(op, s.len(), n)?;
        if rows == 0 {
            return Ok(());
        }
        let cfg = Self::per_row(op, rows, n)?;
        let n = to_i32(op, "n", n)?;
        // SAFETY: rows * n values are in s.
        unsafe {
            self.func("dtl_softmax_rows")?
                .launch(cfg, (&mut s.buf, n, scale))
        }
        .map_err(driver_err(op))
    }

    /// In place, row by row: turns the gradient `g` of `p = softmax(scale * s)` into the
    /// gradient with respect to `s`: `g = scale * p * (g - sum(g * p))`.
    pub fn softmax_rows_vjp(&self, p: &GpuVec, g: &mut GpuVec, n: usize, scale: f32) -> Result<()> {
        let op = "softmax_rows_vjp";
        let rows = rows_of(op, p.len(), n)?;
        check_len(op, "g", g.len(), p.len())?;
        if rows == 0 {
            return Ok(());
        }
        let cfg = Self::per_row(op, rows, n)?;
        let n = to_i32(op, "n", n)?;
        // SAFETY: rows * n values are in p and g.
        unsafe {
            self.func("dtl_softmax_rows_vjp")?
                .launch(cfg, (&p.buf, &mut g.buf, n, scale))
        }
        .map_err(driver_err(op))
    }

    /// `out = x + scales[s] * branch`, where sample `s` spans `x.len() / scales.len()` values
    /// (per-sample stochastic-depth scales; all ones for a plain residual).
    pub fn residual(
        &self,
        x: &GpuVec,
        branch: &GpuVec,
        scales: &GpuVec,
        out: &mut GpuVec,
    ) -> Result<()> {
        let op = "residual";
        let per = per_sample(op, x.len(), scales.len())?;
        check_len(op, "branch", branch.len(), x.len())?;
        check_len(op, "out", out.len(), x.len())?;
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        // SAFETY: indices below n are in x, branch and out; i / per < scales.len().
        unsafe {
            self.func("dtl_residual")?.launch(
                Self::elementwise(n),
                (&x.buf, &branch.buf, &scales.buf, &mut out.buf, n, per),
            )
        }
        .map_err(driver_err(op))
    }

    /// `out = scales[s] * g`, sample `s` spanning `g.len() / scales.len()` values.
    pub fn scale_samples(&self, g: &GpuVec, scales: &GpuVec, out: &mut GpuVec) -> Result<()> {
        let op = "scale_samples";
        let per = per_sample(op, g.len(), scales.len())?;
        check_len(op, "out", out.len(), g.len())?;
        let n = g.len();
        if n == 0 {
            return Ok(());
        }
        // SAFETY: indices below n are in g and out; i / per < scales.len().
        unsafe {
            self.func("dtl_scale_samples")?.launch(
                Self::elementwise(n),
                (&g.buf, &scales.buf, &mut out.buf, n, per),
            )
        }
        .map_err(driver_err(op))
    }

    /// Gathers heads: `dst (b, h, n, hd)` from the columns `offset + head * hd ..` of the
    /// rows of `src (b * n, stride)`. With `stride = 3 D` and `offset` 0, D or 2 D this splits
    /// timm's fused qkv output into q, k or v.
    #[allow(clippy::too_many_arguments)]
    pub fn split_heads(
        &self,
        src: &GpuVec,
        dst: &mut GpuVec,
        b: usize,
        n: usize,
        h: usize,
        hd: usize,
        stride: usize,
        offset: usize,
    ) -> Result<()> {
        self.heads(
            "split_heads",
            "dtl_split_heads",
            src,
            dst,
            [b, n, h, hd, stride, offset],
            true,
        )
    }

    /// The inverse of [`Gpu::split_heads`]: scatters `src (b, h, n, hd)` into the columns
    /// `offset + head * hd ..` of the rows of `dst (b * n, stride)`; other columns keep
    /// their values.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_heads(
        &self,
        src: &GpuVec,
        dst: &mut GpuVec,
        b: usize,
        n: usize,
        h: usize,
        hd: usize,
        stride: usize,
        offset: usize,
    ) -> Result<()> {
        self.heads(
            "merge_heads",
            "dtl_merge_heads",
            src,
            dst,
            [b, n, h, hd, stride, offset],
            false,
        )
    }

    fn heads(
        &self,
        op: &str,
        kernel: &str,
        src: &GpuVec,
        dst: &mut GpuVec,
        dims: [usize; 6],
        split: bool,
    ) -> Result<()> {
        let [b, n, h, hd, stride, offset] = dims;
        if offset + h * hd > stride {
            return Err(DtlError::Invalid(format!(
                "{op}: columns {offset}..{} do not fit rows of width {stride}",
                offset + h * hd
            )));
        }
        let heads_len = b * h * n * hd;
        let rows_len = b * n * stride;
        let (s_need, d_need) = if split {
            (rows_len, heads_len)
        } else {
            (heads_len, rows_len)
        };
        check_len(op, "src", src.len(), s_need)?;
        check_len(op, "dst", dst.len(), d_need)?;
        if heads_len == 0 {
            return Ok(());
        }
        let args = (
            to_i32(op, "b", b)?,
            to_i32(op, "n", n)?,
            to_i32(op, "h", h)?,
            to_i32(op, "hd", hd)?,
            to_i32(op, "stride", stride)?,
            to_i32(op, "offset", offset)?,
        );
        // SAFETY: the head layout (b, h, n, hd) and the row layout (b * n, stride) with the
        // column range checked above both fit their buffers.
        unsafe {
            self.func(kernel)?.launch(
                Self::elementwise(heads_len),
                (
                    &src.buf,
                    &mut dst.buf,
                    args.0,
                    args.1,
                    args.2,
                    args.3,
                    args.4,
                    args.5,
                ),
            )
        }
        .map_err(driver_err(op))
    }

    /// Patch rows for a patch embedding: `img (b, c, hgt, wid)` to
    /// `out (b * (hgt / p) * (wid / p), c * p * p)`, columns ordered (channel, row, column).
    #[allow(clippy::too_many_arguments)]
    pub fn patchify(
        &self,
        img: &GpuVec,
        out: &mut GpuVec,
        b: usize,
        c: usize,
        hgt: usize,
        wid: usize,
        p: usize,
    ) -> Result<()> {
        let op = "patchify";
        if p == 0 || hgt % p != 0 || wid % p != 0 {
            return Err(DtlError::Invalid(format!(
                "{op}: image {hgt}x{wid} is not a whole number of {p}x{p} patches"
            )));
        }
        check_len(op, "img", img.len(), b * c * hgt * wid)?;
        let total = b * c * hgt * wid;
        check_len(op, "out", out.len(), total)?;
        if total == 0 {
            return Ok(());
        }
        // SAFETY: both layouts hold b * c * hgt * wid values, checked above.
        unsafe {
            self.func("dtl_patchify")?.launch(
                Self::elementwise(total),
                (
                    &img.buf,
                    &mut out.buf,
                    to_i32(op, "b", b)?,
                    to_i32(op, "c", c)?,
                    to_i32(op, "hgt", hgt)?,
                    to_i32(op, "wid", wid)?,
                    to_i32(op, "p", p)?,
                ),
            )
        }
        .map_err(driver_err(op))
    }

    /// Token matrix `out (b, prefix + patches, d)`: the prefix tokens, then the patch rows
    /// `patches (b * patches, d)` plus `bias`; the position embedding `pos (prefix + patches, d)`
    /// is added to every token.
    #[allow(clippy::too_many_arguments)]
    pub fn assemble_tokens(
        &self,
        patch_rows: &GpuVec,
        bias: &GpuVec,
        prefix_tokens: &GpuVec,
        pos: &GpuVec,
        out: &mut GpuVec,
        b: usize,
        patches: usize,
        prefix: usize,
        d: usize,
    ) -> Result<()> {
        let op = "assemble_tokens";
        let tokens = prefix + patches;
        check_len(op, "patches", patch_rows.len(), b * patches * d)?;
        check_len(op, "bias", bias.len(), d)?;
        check_len(op, "prefix_tokens", prefix_tokens.len(), prefix * d)?;
        check_len(op, "pos", pos.len(), tokens * d)?;
        check_len(op, "out", out.len(), b * tokens * d)?;
        let total = b * tokens * d;
        if total == 0 {
            return Ok(());
        }
        // SAFETY: every index the kernel forms is bounded by the lengths checked above.
        unsafe {
            self.func("dtl_assemble_tokens")?.launch(
                Self::elementwise(total),
                (
                    &patch_rows.buf,
                    &bias.buf,
                    &prefix_tokens.buf,
                    &pos.buf,
                    &mut out.buf,
                    to_i32(op, "b", b)?,
                    to_i32(op, "patches", patches)?,
                    to_i32(op, "prefix", prefix)?,
                    to_i32(op, "d", d)?,
                ),
            )
        }
        .map_err(driver_err(op))
    }

    /// Row-major (batched) matrix product through cuBLAS, see [`MatMul`].
    pub fn matmul(&self, mm: &MatMul, a: &GpuVec, b: &GpuVec, c: &mut GpuVec) -> Result<()> {
        let op = "matmul";
        check_len(
            op,
            "a",
            a.len(),
            MatMul::need(mm.batch, mm.stride_a, mm.m * mm.k),
        )?;
        check_len(
            op,
            "b",
            b.len(),
            MatMul::need(mm.batch, mm.stride_b, mm.k * mm.n),
        )?;
        check_len(
            op,
            "c",
            c.len(),
            MatMul::need(mm.batch, mm.stride_c, mm.m * mm.n),
        )?;
        if mm.batch == 0 || mm.m == 0 || mm.n == 0 {
            return Ok(());
        }
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
        let tr = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let gemm = GemmConfig {
            transa: tr(mm.trans_b),
            transb: tr(mm.trans_a),
            m: to_i32(op, "n", mm.n)?,
            n: to_i32(op, "m", mm.m)?,
            k: to_i32(op, "k", mm.k)?,
            alpha: mm.alpha,
            lda: to_i32(op, "ldb", if mm.trans_b { mm.k } else { mm.n })?.max(1),
            ldb: to_i32(op, "lda", if mm.trans_a { mm.m } else { mm.k })?.max(1),
            beta: mm.beta,
            ldc: to_i32(op, "ldc", mm.n)?,
        };
        // SAFETY: the extents of all batch entries of a, b and c are checked above.
        if mm.batch == 1 {
            unsafe { self.blas.gemm(gemm, &b.buf, &a.buf, &mut c.buf) }.map_err(blas_err(op))
        } else {
            let cfg = StridedBatchedConfig {
                gemm,
                batch_size: to_i32(op, "batch", mm.batch)?,
                stride_a: mm.stride_b as i64,
                stride_b: mm.stride_a as i64,
                stride_c: mm.stride_c as i64,
            };
            unsafe {
                self.blas
                    .gemm_strided_batched(cfg, &b.buf, &a.buf, &mut c.buf)
            }
            .map_err(blas_err(op))
        }
    }

    /// A PyTorch-style linear layer on rows: `y (rows, out) = x (rows, in) w^T + bias`, with
    /// `w` stored `(out, in)`.
    pub fn linear(
        &self,
        x: &GpuVec,
        w: &GpuVec,
        bias: Option<&GpuVec>,
        in_features: usize,
        out_features: usize,
        y: &mut GpuVec,
    ) -> Result<()> {
        let op = "linear";
        let rows = rows_of(op, x.len(), in_features)?;
        check_len(op, "w", w.len(), in_features * out_features)?;
        check_len(op, "y", y.len(), rows * out_features)?;
        self.matmul(
            &MatMul::new(rows, out_features, in_features).trans_b(),
            x,
            w,
            y,
        )?;
        if let Some(bias) = bias {
            self.bias_add(y, bias, out_features)?;
        }
        Ok(())
    }

    /// Input-only VJP of [`Gpu::linear`]: `gx (rows, in) = gy (rows, out) w`, or added to
    /// `gx` with `accumulate`.
    pub fn linear_vjp(
        &self,
        gy: &GpuVec,
        w: &GpuVec,
        in_features: usize,
        out_features: usize,
        gx: &mut GpuVec,
        accumulate: bool,
    ) -> Result<()> {
        let op = "linear_vjp";
        let rows = rows_of(op, gy.len(), out_features)?;
        check_len(op, "w", w.len(), in_features * out_features)?;
        check_len(op, "gx", gx.len(), rows * in_features)?;
        let mm =
            MatMul::new(rows, in_features, out_features).beta(if accumulate { 1.0 } else { 0.0 });
        self.matmul(&mm, gy, w, gx)
    }
}

fn rows_of(op: &str, len: usize, width: usize) -> Result<usize> {
    if width == 0 || len % width != 0 {
        return Err(DtlError::Invalid(format!(
            "{op}: {len} values are not whole rows of width {width}"
        )));
    }
    Ok(len / width)
}

fn per_sample(op: &str, len: usize, samples: usize) -> Result<usize> {
    if samples == 0 || len % samples != 0 {
        return Err(DtlError::Invalid(format!(
            "{op}: {len} values cannot be split evenly over {samples} per-sample scales"
        )));
    }
    Ok((len / samples).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs without a GPU: NVRTC alone compiles the kernels.
    #[test]
    fn kernels_compile_with_nvrtc_and_export_every_entry_point() {
        let ptx = compile_kernels().expect("NVRTC compiles the kernels");
        for name in KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "PTX lacks the entry point {name}"
            );
        }
        let entries = ptx.matches(".entry ").count();
        assert_eq!(
            entries,
            KERNEL_NAMES.len(),
            "KERNEL_NAMES must list every kernel"
        );
    }

    #[test]
    fn shape_helpers_reject_partial_rows_and_uneven_samples() {
        assert_eq!(rows_of("op", 12, 4).unwrap(), 3);
        let e = rows_of("layer_norm", 10, 4).unwrap_err().to_string();
        assert!(e.contains("layer_norm") && e.contains("width 4"), "{e}");
        assert!(rows_of("op", 4, 0).is_err());
        assert_eq!(per_sample("op", 12, 3).unwrap(), 4);
        let e = per_sample("residual", 10, 3).unwrap_err().to_string();
        assert!(e.contains("residual") && e.contains("3 per-sample"), "{e}");
        assert!(check_len("op", "x", 3, 4).is_err());
        assert!(check_len("op", "x", 4, 4).is_ok());
        assert!(to_i32("op", "n", 1 << 40).is_err());
    }

    #[test]
    fn handles_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Gpu>();
        send_sync::<GpuVec>();
    }

    #[test]
    fn matmul_extents_cover_every_batch_entry() {
        let mm = MatMul::new(2, 3, 4).batched(5);
        assert_eq!((mm.stride_a, mm.stride_b, mm.stride_c), (8, 12, 6));
        assert_eq!(MatMul::need(mm.batch, mm.stride_a, 8), 40);
        assert_eq!(MatMul::need(0, 8, 8), 0);
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // On a machine without a GPU the stub or missing driver must give an error; on a GPU
        // machine the count is at least one.
        match Gpu::count() {
            Ok(n) => assert!(n >= 1 || Gpu::new(0).is_err()),
            Err(e) => assert!(e.to_string().contains("CUDA driver"), "{e}"),
        }
        if Gpu::count().unwrap_or(0) == 0 {
            let e = Gpu::new(0).unwrap_err().to_string();
            assert!(e.contains("CUDA") || e.contains("cuda:0"), "{e}");
        }
    }
}
