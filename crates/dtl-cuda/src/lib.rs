//! CUDA support for dtl.
//!
//! With the `cuda` feature this crate holds the project's GPU glue over cudarc: a device
//! handle ([`Gpu`]) sharing the process's primary CUDA context with dfdx, float buffers in
//! GPU memory ([`GpuVec`]), cuBLAS matrix products ([`MatMul`]) and the f32 kernels of the
//! frozen ViT (LayerNorm, GELU, softmax, residuals with drop-path scales, bias, head
//! split/merge, patch embedding), compiled at run time with NVRTC. Every function is safe:
//! buffer lengths are checked before anything is launched, and all `unsafe` code stays in
//! this crate.
//!
//! Without the feature it only reports that CUDA is not built in.

#![warn(missing_docs)]

#[cfg(feature = "cuda")]
mod gpu;

#[cfg(feature = "cuda")]
pub use gpu::{compile_kernels, Gpu, GpuVec, MatMul, KERNEL_NAMES, KERNEL_SOURCE};

/// Whether this build of dtl includes the CUDA path.
///
/// ```
/// assert_eq!(dtl_cuda::built_with_cuda(), cfg!(feature = "cuda"));
/// ```
pub fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// Checks that `cuda:<ordinal>` can be used, or says why not (never panics, also without
/// a driver).
///
/// ```
/// if !dtl_cuda::built_with_cuda() {
///     assert!(dtl_cuda::check_device(0).unwrap_err().contains("--features cuda"));
/// }
/// ```
pub fn check_device(ordinal: usize) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        let n = Gpu::count().map_err(|e| e.to_string())?;
        if ordinal < n {
            Ok(())
        } else {
            Err(format!(
                "cuda:{ordinal} requested but {n} CUDA device(s) are present"
            ))
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err("this dtl was built without CUDA; rebuild with `--features cuda` (see docs/cuda.md) or set run.device = \"cpu\"".to_string())
    }
}
