//! CUDA support for dtl. Without the `cuda` feature this crate only reports that CUDA is not
//! built in.

/// Whether this build of dtl includes the CUDA path.
///
/// ```
/// assert_eq!(dtl_cuda::built_with_cuda(), cfg!(feature = "cuda"));
/// ```
pub fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// Checks that `cuda:<ordinal>` can be used, or says why not.
///
/// ```
/// if !dtl_cuda::built_with_cuda() {
///     assert!(dtl_cuda::check_device(0).unwrap_err().contains("--features cuda"));
/// }
/// ```
pub fn check_device(ordinal: usize) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        let n = cudarc::driver::CudaDevice::count()
            .map_err(|e| format!("no usable CUDA driver: {e:?}"))?;
        if (ordinal as i32) < n {
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
