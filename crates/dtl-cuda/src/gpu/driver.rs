//! What the driver says about a device before it is opened, and the errors of driver calls.

use cudarc::driver::{result as drv, sys as dsys, DriverError};
use dtl_core::DtlError;

use crate::{libs, nvrtc};

/// The oldest driver the device accepts, as `cuDriverGetVersion` reports it (CUDA 13.0, R580).
pub(crate) const MIN_DRIVER: i32 = 13000;

/// Names a driver error by its code and the driver's text.
pub(super) fn driver_text(e: DriverError) -> String {
    match (e.error_name(), e.error_string()) {
        (Ok(n), Ok(s)) => format!("{} ({})", n.to_string_lossy(), s.to_string_lossy()),
        _ => format!("{:?}", e.0),
    }
}

pub(super) fn drv_err(what: &str, e: DriverError) -> DtlError {
    DtlError::Device(format!("{what}: CUDA driver error {}", driver_text(e)))
}

/// What the driver says about one device, without creating a context.
#[derive(Clone, Debug)]
pub(crate) struct DeviceInfo {
    pub name: String,
    pub cc: (u32, u32),
}

/// Checks everything [`Gpu::open`](super::Gpu::open) needs for `cuda:<ordinal>` short of
/// creating a context: the libraries, the driver version, the device, its compute capability
/// against NVRTC.
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
