//! The CUDA device of dtl.
//!
//! With the `cuda` feature this crate implements the kernel set [`dtl_kernels::Kernels`] on an
//! NVIDIA GPU: [`Gpu`] (one device, one stream) over [`GpuBuf`] buffers of f32 or bf16 values,
//! with the project's own kernels ([`KERNEL_SOURCE`], compiled at run time with NVRTC for the
//! device; f32 arithmetic whatever the storage) and cuBLAS products with f32 compute, and CUDA
//! graphs ([`dtl_kernels::Kernels::capture`]). It builds without any CUDA software: the driver, NVRTC and
//! cuBLAS are found and loaded when first needed ([`libs`]), and anything missing is an error
//! naming it, never a panic. Every function is safe; all `unsafe` code stays in this crate.
//!
//! [`Emulator`] runs the same device code on the host (the kernels compiled as C++ against an
//! emulation of the CUDA execution model), so that it is tested on machines without a GPU.
//! Both take the same run-time settings ([`DeviceSettings`]: fused or unfused attention, the
//! bias of a linear in cuBLASLt's epilogue or not).
//!
//! Without the feature only the device checks below exist, and they say that CUDA is not
//! built in.
//!
//! ```
//! // Which device `run.device = "auto"` would pick; None without a usable GPU.
//! match dtl_cuda::first_usable() {
//!     Some(n) => println!("using cuda:{n}"),
//!     None => println!("no usable GPU: {}", dtl_cuda::check_device(0).unwrap_err()),
//! }
//! ```

#![warn(missing_docs)]

#[cfg(feature = "cuda")]
mod blas;
#[cfg(feature = "cuda")]
mod emulator;
#[cfg(feature = "cuda")]
mod fused;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
pub mod libs;
#[cfg(feature = "cuda")]
mod lt;
#[cfg(feature = "cuda")]
mod nvrtc;
#[cfg(feature = "cuda")]
mod ops;
#[cfg(feature = "cuda")]
mod profile;
#[cfg(feature = "cuda")]
mod settings;

#[cfg(feature = "cuda")]
pub use emulator::{EmuBuf, Emulator};
#[cfg(feature = "cuda")]
pub use fused::AttentionKernels;
#[cfg(feature = "cuda")]
pub use gpu::{Gpu, GpuBuf};
#[cfg(feature = "cuda")]
pub use lt::{EpilogueStats, GemmEpilogue};
#[cfg(feature = "cuda")]
pub use nvrtc::{
    compile_kernels, compile_ptx, nvrtc_architectures, nvrtc_version, target_architecture,
    KERNEL_NAMES, KERNEL_SOURCE,
};
#[cfg(feature = "cuda")]
pub use settings::DeviceSettings;

/// The message of every device check in a build without the `cuda` feature.
#[cfg_attr(feature = "cuda", allow(dead_code))]
const NOT_BUILT: &str = "this dtl was built without CUDA; rebuild with `--features cuda` (see docs/cuda.md) or set run.device = \"cpu\"";

/// Whether this build of dtl includes the CUDA device.
///
/// ```
/// assert_eq!(dtl_cuda::built_with_cuda(), cfg!(feature = "cuda"));
/// ```
pub fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// Checks that `cuda:<ordinal>` can be opened, or says in one line why not: CUDA not built
/// in, no driver or one older than CUDA 13.0, no such device, NVRTC or cuBLAS not found, a
/// GPU too old for NVRTC. It loads the libraries but creates no context; it never panics.
///
/// ```
/// if !dtl_cuda::built_with_cuda() {
///     assert!(dtl_cuda::check_device(0).unwrap_err().contains("--features cuda"));
/// }
/// ```
pub fn check_device(ordinal: usize) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        gpu::probe(ordinal).map(|_| ())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(NOT_BUILT.to_string())
    }
}

/// The lowest ordinal `N` for which [`check_device`] succeeds, if any (what
/// `run.device = "auto"` uses); `None` without the feature, a driver or a usable GPU.
///
/// ```
/// if let Some(n) = dtl_cuda::first_usable() {
///     assert!(dtl_cuda::check_device(n).is_ok());
/// }
/// ```
pub fn first_usable() -> Option<usize> {
    #[cfg(feature = "cuda")]
    {
        (0..device_count()).find(|&n| check_device(n).is_ok())
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Number of CUDA devices the driver reports; 0 without the feature or a usable driver.
///
/// ```
/// let n = dtl_cuda::device_count();
/// if n == 0 {
///     assert!(dtl_cuda::check_device(0).is_err());
/// }
/// ```
pub fn device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        if libs::driver().is_err() {
            return 0;
        }
        if cudarc::driver::result::init().is_err() {
            return 0;
        }
        cudarc::driver::result::device::get_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn checks_never_panic_and_agree() {
        match super::check_device(0) {
            Ok(()) => assert_eq!(super::first_usable(), Some(0)),
            Err(e) => {
                assert!(!e.is_empty() && !e.contains('\n'), "{e:?}");
                if !super::built_with_cuda() {
                    assert_eq!(e, super::NOT_BUILT);
                    assert_eq!(super::first_usable(), None);
                    assert_eq!(super::device_count(), 0);
                }
            }
        }
        let far = super::check_device(1 << 20).unwrap_err();
        assert!(!far.contains('\n'), "{far}");
    }
}
