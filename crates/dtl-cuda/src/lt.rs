//! The bias of a linear added in the matrix product's epilogue: cuBLASLt's
//! `CUBLASLT_EPILOGUE_BIAS` (see docs/cuda.md, "Bias in the product's epilogue").
//!
//! The plain path of `y = x w^T + bias` writes the bias into every row of `y` (`BiasRows`), then
//! runs the cuBLAS product with `beta = 1`: the output is written and read once more than the
//! product needs. cuBLASLt can add a vector to every column of its column-major output `D` as
//! the product is written. [`crate::blas::Gemm::linear`] maps the row-major `y (m x n)` onto the
//! column-major `C (n x m)`, so the row-major bias (one value per output column `j < n`) is one
//! value per *row* of `C`, broadcast along its columns: exactly the epilogue's bias (a vector of
//! `Gemm::m` values).
//!
//! The epilogue runs only where everything is bf16 (`x`, `w`, `y` and the bias: the frozen
//! backbone's linears on a bf16 device), f32 compute; an f32 product keeps the plain path. Any
//! product cuBLASLt does not take (no algorithm from its heuristic, a failed call) runs the plain
//! path instead, and its shape is remembered; this is never an error.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::CudaStream;
use dtl_core::{DtlError, Result};

use crate::blas::Gemm;
use crate::ops::Dp;

/// How a device adds the bias of [`dtl_kernels::Kernels::linear`]: a kernel writing it into the
/// output before the product (`plain`), or cuBLASLt's bias epilogue (`lt`).
///
/// Read from the environment variable `DTL_GEMM_EPILOGUE` (`lt` or `plain`; unset or empty
/// means [`GemmEpilogue::Plain`]) when a [`crate::Gpu`] or an [`crate::Emulator`] is opened,
/// and changed with [`crate::DeviceSettings::set_gemm_epilogue`]. The default stays `Plain`
/// until the epilogue has been timed on a GPU. `Lt` is used for bf16 products with a bf16 bias
/// only; every other linear, and any shape cuBLASLt does not take, runs the plain path.
///
/// ```
/// use dtl_cuda::GemmEpilogue;
/// assert_eq!(GemmEpilogue::parse("lt").unwrap(), GemmEpilogue::Lt);
/// assert_eq!(GemmEpilogue::default(), GemmEpilogue::Plain);
/// assert!(GemmEpilogue::parse("gelu").unwrap_err().to_string().contains("DTL_GEMM_EPILOGUE"));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GemmEpilogue {
    /// `BiasRows` writes the bias into the output, then the cuBLAS product adds to it.
    #[default]
    Plain,
    /// cuBLASLt adds the bias as it writes the product (bf16 linears).
    Lt,
}

impl GemmEpilogue {
    /// The environment variable read when a device opens.
    ///
    /// ```
    /// assert_eq!(dtl_cuda::GemmEpilogue::ENV, "DTL_GEMM_EPILOGUE");
    /// ```
    pub const ENV: &'static str = "DTL_GEMM_EPILOGUE";

    /// The selection named `name` (`lt` or `plain`, any case, surrounding blanks ignored), or
    /// an error naming `DTL_GEMM_EPILOGUE` and the valid values.
    ///
    /// ```
    /// use dtl_cuda::GemmEpilogue;
    /// assert_eq!(GemmEpilogue::parse(" Plain ").unwrap(), GemmEpilogue::Plain);
    /// ```
    pub fn parse(name: &str) -> Result<GemmEpilogue> {
        match name.trim().to_ascii_lowercase().as_str() {
            "lt" => Ok(GemmEpilogue::Lt),
            "plain" => Ok(GemmEpilogue::Plain),
            other => Err(DtlError::invalid(format!(
                "{}: `{other}` is not a matrix-product epilogue; use `lt` or `plain`",
                Self::ENV
            ))),
        }
    }

    /// The selection of the environment variable `DTL_GEMM_EPILOGUE`: unset or empty is
    /// [`GemmEpilogue::Plain`], anything else as [`GemmEpilogue::parse`].
    ///
    /// ```
    /// let e = dtl_cuda::GemmEpilogue::from_env();
    /// assert!(e.is_ok() || std::env::var("DTL_GEMM_EPILOGUE").is_ok());
    /// ```
    pub fn from_env() -> Result<GemmEpilogue> {
        match std::env::var(Self::ENV) {
            Ok(v) if !v.trim().is_empty() => Self::parse(&v),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(GemmEpilogue::Plain),
            Err(std::env::VarError::NotUnicode(_)) => Err(DtlError::invalid(format!(
                "{}: the value is not UTF-8; use `lt` or `plain`",
                Self::ENV
            ))),
        }
    }

    /// The name [`GemmEpilogue::parse`] reads.
    ///
    /// ```
    /// assert_eq!(dtl_cuda::GemmEpilogue::Lt.name(), "lt");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            GemmEpilogue::Plain => "plain",
            GemmEpilogue::Lt => "lt",
        }
    }
}

/// How many bf16 linears with a bias ran with the epilogue selected: `fused` with cuBLASLt's
/// bias epilogue, `fallback` on the plain path because cuBLASLt (or the shape rule of
/// docs/cuda.md) did not take them. Counted since the device was opened, over its clones.
///
/// ```
/// let s = dtl_cuda::EpilogueStats::default();
/// assert_eq!((s.fused, s.fallback), (0, 0));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpilogueStats {
    /// Linears whose bias cuBLASLt added in the product's epilogue.
    pub fused: u64,
    /// Linears that wanted the epilogue and ran the plain path.
    pub fallback: u64,
}

/// The counters behind [`EpilogueStats`], shared by a device's clones.
#[derive(Debug, Default)]
pub(crate) struct EpilogueCounts {
    fused: AtomicU64,
    fallback: AtomicU64,
}

impl EpilogueCounts {
    pub fn count(&self, fused: bool) {
        let c = if fused { &self.fused } else { &self.fallback };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> EpilogueStats {
        EpilogueStats {
            fused: self.fused.load(Ordering::Relaxed),
            fallback: self.fallback.load(Ordering::Relaxed),
        }
    }
}

/// The largest size of any dimension given to the epilogue (larger ones run the plain path):
/// some cuBLASLt versions have computed wrong results for dimensions past `65535 * 32`.
pub(crate) const MAX_DIM: usize = 65_535 * 32;

/// Whether the epilogue path takes the product `g` with `bias` (the storages are checked by the
/// caller): one product (no batch), every dimension from 2 to [`MAX_DIM`] (cuBLASLt's
/// vector-shaped cases are left to cuBLAS), a bias aligned to 16 bytes.
pub(crate) fn takes(g: &Gemm, bias: Dp) -> bool {
    let dim = |d: usize| (2..=MAX_DIM).contains(&d);
    g.batch == 1 && dim(g.m) && dim(g.n) && dim(g.k) && bias.addr % 16 == 0
}

/// The alignment cuBLASLt may assume of a pointer: the largest power of two dividing it, at
/// most 256 bytes (its default).
fn alignment(addr: u64) -> u32 {
    if addr == 0 {
        256
    } else {
        (1u64 << addr.trailing_zeros().min(8)) as u32
    }
}

/// What a plan depends on: the product's shape and the operands' alignments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    trans: (bool, bool),
    mnk: (usize, usize, usize),
    ld: (usize, usize, usize),
    align: (u32, u32, u32),
}

struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_desc`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `create_matrix_layout`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// The descriptors of one shape and the algorithm cuBLASLt's heuristic chose for them.
struct Plan {
    desc: Desc,
    a: Layout,
    b: Layout,
    c: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// Sets one attribute of a matmul descriptor from `v`.
///
/// # Safety
/// `desc` must be live and `T` the attribute's type.
unsafe fn set_desc<T>(
    desc: &Desc,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> std::result::Result<(), CublasError> {
    // SAFETY: the caller's contract; `v` holds size_of::<T>() bytes.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc.0,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
}

/// Sets one attribute of a preference descriptor from `v`.
///
/// # Safety
/// `pref` must be live and `T` the attribute's type.
unsafe fn set_pref<T>(
    pref: &Pref,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    v: &T,
) -> std::result::Result<(), CublasError> {
    // SAFETY: the caller's contract; `v` holds size_of::<T>() bytes.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref.0,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
}

/// A cuBLASLt handle on the device's stream, its plans per shape and the workspace it uses
/// (the cuBLAS handle's: both run in order on the one stream, never at the same time).
pub(crate) struct Lt {
    /// `None` when cuBLASLt could not create a handle: every product then runs the plain path.
    handle: Option<sys::cublasLtHandle_t>,
    stream: sys::cudaStream_t,
    workspace: u64,
    workspace_bytes: usize,
    /// A plan per shape; `None` for a shape cuBLASLt does not take (remembered).
    plans: Mutex<HashMap<Key, Option<Plan>>>,
}

// SAFETY: a cuBLASLt handle may be used from any thread; the descriptors are only reached under
// the `plans` lock, and the device binds its context to the calling thread before every call.
unsafe impl Send for Lt {}
// SAFETY: see above.
unsafe impl Sync for Lt {}

impl Lt {
    /// A handle for `stream` using `workspace_bytes` of device memory at `workspace`; without
    /// one (cuBLASLt failed to create it) every product runs the plain path.
    ///
    /// # Safety
    /// `workspace` must point to `workspace_bytes` of device memory of `stream`'s context that
    /// outlives this value and is only used by work in order on `stream`.
    pub unsafe fn new(stream: &CudaStream, workspace: u64, workspace_bytes: usize) -> Lt {
        Lt {
            handle: lt::create_handle().ok(),
            stream: stream.cu_stream() as sys::cudaStream_t,
            workspace,
            workspace_bytes,
            plans: Mutex::new(HashMap::new()),
        }
    }

    /// The descriptors of `key` and the algorithm of the heuristic, or the error that refuses
    /// the shape.
    ///
    /// # Safety
    /// `handle` must be live.
    unsafe fn plan(
        &self,
        handle: sys::cublasLtHandle_t,
        key: &Key,
    ) -> std::result::Result<Plan, CublasError> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let (m, n, k) = (key.mnk.0 as u64, key.mnk.1 as u64, key.mnk.2 as u64);
        let (ta, tb) = key.trans;
        let desc = Desc(lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )?);
        // SAFETY: the descriptor is live; TRANSA/TRANSB are `cublasOperation_t` (int32: 0 N,
        // 1 T), EPILOGUE a `cublasLtEpilogue_t` (uint32).
        unsafe {
            set_desc(&desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &(ta as i32))?;
            set_desc(&desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &(tb as i32))?;
            set_desc(
                &desc,
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
        }
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let ld = |v: usize| v.max(1) as i64;
        let a = Layout(lt::create_matrix_layout(bf16, ar, ac, ld(key.ld.0))?);
        let b = Layout(lt::create_matrix_layout(bf16, br, bc, ld(key.ld.1))?);
        let c = Layout(lt::create_matrix_layout(bf16, m, n, ld(key.ld.2))?);
        let pref = Pref(lt::create_matmul_pref()?);
        // SAFETY: the preference is live; MAX_WORKSPACE_BYTES is a uint64, the alignments
        // uint32.
        unsafe {
            set_pref(
                &pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &(self.workspace_bytes as u64),
            )?;
            set_pref(
                &pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                &key.align.0,
            )?;
            set_pref(
                &pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                &key.align.1,
            )?;
            set_pref(
                &pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                &key.align.2,
            )?;
            set_pref(
                &pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                &key.align.2,
            )?;
        }
        // SAFETY: every descriptor is live; C and D share one layout (the product is in place).
        let found =
            unsafe { lt::get_matmul_algo_heuristic(handle, desc.0, a.0, b.0, c.0, c.0, pref.0) }?;
        if found.workspaceSize > self.workspace_bytes {
            return Err(CublasError(
                sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
            ));
        }
        Ok(Plan {
            desc,
            a,
            b,
            c,
            algo: found.algo,
        })
    }

    /// Runs `g` in place with the bias epilogue, all four operands bf16:
    /// `c = alpha op(a) op(b) + beta c + bias`, `bias` one value per row of `c` (`g.m`), f32
    /// compute. False (nothing queued) when cuBLASLt does not take the shape; the refusal is
    /// remembered, so the heuristic is asked once per shape.
    ///
    /// # Safety
    /// As [`crate::blas::Blas::run`] for `a`, `b` and `c`, and `bias` must hold `g.m` bf16
    /// values; `g` must pass [`takes`] and [`crate::blas::Blas::check`].
    pub unsafe fn run(&self, g: &Gemm, a: Dp, b: Dp, c: Dp, bias: Dp) -> bool {
        let Some(handle) = self.handle else {
            return false;
        };
        let key = Key {
            trans: (g.trans_a, g.trans_b),
            mnk: (g.m, g.n, g.k),
            ld: (g.lda, g.ldb, g.ldc),
            align: (alignment(a.addr), alignment(b.addr), alignment(c.addr)),
        };
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the handle is live for as long as `self`.
        let plan = plans
            .entry(key)
            .or_insert_with(|| unsafe { self.plan(handle, &key) }.ok());
        let Some(p) = plan.as_ref() else {
            return false;
        };
        let bias_ptr = bias.addr as *const c_void;
        // SAFETY: the descriptor is live and only used under the lock; BIAS_POINTER is a
        // `void*`, read by `cublasLtMatmul` when it is called (below, still under the lock).
        let set = unsafe {
            set_desc(
                &p.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias_ptr,
            )
        };
        // SAFETY: the caller's contract for the pointers; the plan was made for this shape and
        // these alignments; the workspace is the handle's own (see `new`).
        let ran = set.and_then(|()| unsafe {
            lt::matmul(
                handle,
                p.desc.0,
                &g.alpha as *const f32 as *const c_void,
                &g.beta as *const f32 as *const c_void,
                a.addr as *const c_void,
                p.a.0,
                b.addr as *const c_void,
                p.b.0,
                c.addr as *const c_void,
                p.c.0,
                c.addr as *mut c_void,
                p.c.0,
                &p.algo,
                self.workspace as *mut c_void,
                self.workspace_bytes,
                self.stream,
            )
        });
        if ran.is_err() {
            // a call cuBLASLt refuses queues nothing: remember the shape, run the plain path
            *plan = None;
            return false;
        }
        true
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // the plans' descriptors first, then the handle
        self.plans
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Some(h) = self.handle.take() {
            // SAFETY: created by `create_handle`, destroyed once.
            let _ = unsafe { lt::destroy_handle(h) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_parses_and_names_its_values() {
        for e in [GemmEpilogue::Plain, GemmEpilogue::Lt] {
            assert_eq!(GemmEpilogue::parse(e.name()).unwrap(), e);
        }
        assert_eq!(GemmEpilogue::parse(" LT ").unwrap(), GemmEpilogue::Lt);
        let e = GemmEpilogue::parse("gelu").unwrap_err().to_string();
        assert!(
            e.contains("DTL_GEMM_EPILOGUE") && e.contains("`lt` or `plain`"),
            "{e}"
        );
    }

    #[test]
    fn alignments_are_powers_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0), 256);
    }

    #[test]
    fn the_epilogue_takes_matrices_not_vectors() {
        let bias = Dp::bf16(0x1000);
        assert!(takes(&Gemm::linear(4, 3, 2, 0.0), bias));
        assert!(!takes(&Gemm::linear(1, 3, 2, 0.0), bias));
        assert!(!takes(&Gemm::linear(4, 1, 2, 0.0), bias));
        assert!(!takes(&Gemm::linear(4, 3, 1, 0.0), bias));
        assert!(!takes(&Gemm::linear(MAX_DIM + 1, 3, 2, 0.0), bias));
        assert!(!takes(&Gemm::linear(4, 3, 2, 0.0), Dp::bf16(0x1002)));
        assert!(!takes(&Gemm::scores(2, 4, 4, 1.0), bias));
    }
}
