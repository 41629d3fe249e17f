//! The project's CUDA C kernels and their compilation to PTX with NVRTC (no GPU needed).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result::NvrtcError, sys, CompileError, CompileOptions};
use dtl_core::{DtlError, Result};

use crate::libs;

/// CUDA C source of the f32 kernels of [`crate::Gpu`]: `kernels.cu`, then the fused attention
/// of `attention.cu`.
///
/// ```
/// assert!(dtl_cuda::KERNEL_SOURCE.contains("dtl_layer_norm"));
/// assert!(dtl_cuda::KERNEL_SOURCE.contains("dtl_attn_fused"));
/// ```
pub const KERNEL_SOURCE: &str = concat!(
    include_str!("kernels.cu"),
    "\n",
    include_str!("attention.cu")
);

/// Every kernel entry point of [`KERNEL_SOURCE`], in the order [`crate::Gpu`] loads them.
///
/// ```
/// assert!(dtl_cuda::KERNEL_NAMES.contains(&"dtl_adamw"));
/// ```
pub const KERNEL_NAMES: &[&str] = &[
    "dtl_fill",
    "dtl_add",
    "dtl_bias_rows",
    "dtl_sum_rows",
    "dtl_gelu",
    "dtl_gelu_vjp",
    "dtl_swish",
    "dtl_swish_vjp",
    "dtl_add_scaled",
    "dtl_scaled",
    "dtl_layer_norm",
    "dtl_layer_norm_vjp",
    "dtl_split_qkv",
    "dtl_split_heads",
    "dtl_merge_heads",
    "dtl_merge_qkv",
    "dtl_softmax_rows",
    "dtl_softmax_rows_vjp",
    "dtl_patchify",
    "dtl_assemble_tokens",
    "dtl_window_partition",
    "dtl_patch_merge",
    "dtl_dwconv",
    "dtl_dwconv_dx",
    "dtl_dwconv_dw",
    "dtl_mean_tokens",
    "dtl_mean_tokens_vjp",
    "dtl_soft_cross_entropy",
    "dtl_eval_stats",
    "dtl_sum_squares_partial",
    "dtl_sum_squares_final",
    "dtl_adamw",
    "dtl_adamw_from",
    "dtl_convert",
    "dtl_attn_fused",
    "dtl_attn_fused_dq",
    "dtl_attn_fused_dkv",
];

/// For each kernel of [`KERNEL_NAMES`], whether its last parameter is `int st`, the storage
/// of its buffers (see `kernels.cu`); a kernel without it takes f32 buffers only.
pub(crate) fn takes_storage() -> &'static [bool] {
    static FLAGS: OnceLock<Vec<bool>> = OnceLock::new();
    FLAGS.get_or_init(|| {
        KERNEL_NAMES
            .iter()
            .map(|name| {
                let Some(at) = KERNEL_SOURCE.find(&format!(" {name}(")) else {
                    return false;
                };
                let rest = &KERNEL_SOURCE[at + name.len() + 2..];
                let params = &rest[..rest.find(')').unwrap_or(0)];
                let last = params.rsplit(',').next().unwrap_or("");
                last.split_whitespace().collect::<Vec<_>>() == ["int", "st"]
            })
            .collect()
    })
}

fn nvrtc_err(what: &str, e: NvrtcError) -> DtlError {
    DtlError::Device(format!("{what}: NVRTC error {:?}", e.0))
}

/// The version of the NVRTC library found (loading it on first use).
///
/// ```no_run
/// let (major, minor) = dtl_cuda::nvrtc_version().unwrap();
/// assert!(major >= 12, "{major}.{minor}");
/// ```
pub fn nvrtc_version() -> Result<(u32, u32)> {
    libs::nvrtc().map_err(DtlError::Unavailable)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); both out-pointers are valid.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_err("asking NVRTC for its version", e))?;
    Ok((major.max(0) as u32, minor.max(0) as u32))
}

/// The virtual architectures NVRTC can compile for, as `10 * major + minor` (`75`, `80`, `90`, ...).
///
/// ```no_run
/// assert!(dtl_cuda::nvrtc_architectures().unwrap().contains(&90));
/// ```
pub fn nvrtc_architectures() -> Result<Vec<u32>> {
    libs::nvrtc().map_err(DtlError::Unavailable)?;
    let mut n = 0;
    // SAFETY: NVRTC is loaded; `n` is a valid out-pointer.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(|e| nvrtc_err("asking NVRTC for its architectures", e))?;
    let mut archs = vec![0i32; n.max(0) as usize];
    if !archs.is_empty() {
        // SAFETY: `archs` holds the `n` values NVRTC writes.
        unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(|e| nvrtc_err("asking NVRTC for its architectures", e))?;
    }
    Ok(archs.into_iter().map(|a| a.max(0) as u32).collect())
}

/// The architecture to compile for a device of compute capability `(major, minor)`: its own
/// when NVRTC knows it, else the newest older one NVRTC knows (the driver compiles that PTX
/// for the device).
///
/// ```no_run
/// assert_eq!(dtl_cuda::target_architecture((9, 0)).unwrap(), 90);
/// ```
pub fn target_architecture(cc: (u32, u32)) -> Result<u32> {
    let want = cc.0 * 10 + cc.1;
    let archs = nvrtc_architectures()?;
    archs
        .iter()
        .copied()
        .filter(|&a| a <= want)
        .max()
        .ok_or_else(|| {
            let (maj, min) = nvrtc_version().unwrap_or((0, 0));
            DtlError::Unavailable(format!(
                "a GPU of compute capability {}.{} is too old for NVRTC {maj}.{min}, which compiles for {}",
                cc.0,
                cc.1,
                archs
                    .iter()
                    .map(|a| format!("{}.{}", a / 10, a % 10))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Compiles CUDA C `source` to PTX for the virtual architecture `arch` (`90` for compute
/// capability 9.0) with NVRTC, with line information for profilers and, when a folder with
/// `cuda_bf16.h` is found ([`crate::libs::include_dir`]), that folder on the include path.
/// Needs the NVRTC library but no GPU.
///
/// ```no_run
/// let src = r#"extern "C" __global__ void twice(float* x, int n) {
///     int i = blockIdx.x * blockDim.x + threadIdx.x;
///     if (i < n) x[i] *= 2.0f;
/// }"#;
/// let ptx = dtl_cuda::compile_ptx(src, "twice.cu", 90).unwrap();
/// assert!(ptx.contains(".entry twice("));
/// ```
pub fn compile_ptx(source: &str, name: &str, arch: u32) -> Result<String> {
    libs::nvrtc().map_err(DtlError::Unavailable)?;
    if source.contains('\0') || name.contains('\0') {
        return Err(DtlError::invalid(format!(
            "NVRTC: the source or the name of `{name}` contains a NUL byte"
        )));
    }
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{arch}"),
            "--generate-line-info".to_string(),
        ],
        include_paths: libs::include_dir()
            .map(|d| d.display().to_string())
            .into_iter()
            .collect(),
        name: Some(name.to_string()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map(|p| p.to_src())
        .map_err(|e| match e {
            CompileError::CompileError { log, .. } => DtlError::Device(format!(
                "NVRTC could not compile {name} for compute_{arch}: {}",
                log.to_string_lossy().trim().replace('\n', " | ")
            )),
            other => DtlError::Device(format!("NVRTC failed on {name}: {other:?}")),
        })
}

/// The PTX of [`KERNEL_SOURCE`] for the virtual architecture `arch`, compiled once per process
/// and architecture.
///
/// ```no_run
/// let ptx = dtl_cuda::compile_kernels(90).unwrap();
/// assert!(ptx.contains(".entry dtl_layer_norm("));
/// ```
pub fn compile_kernels(arch: u32) -> Result<String> {
    static CACHE: OnceLock<Mutex<HashMap<u32, std::result::Result<String, String>>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(done) = map.get(&arch) {
        return done.clone().map_err(DtlError::Device);
    }
    match compile_ptx(KERNEL_SOURCE, "dtl_kernels.cu", arch) {
        Ok(ptx) => {
            map.insert(arch, Ok(ptx.clone()));
            Ok(ptx)
        }
        // A missing NVRTC is not cached as a compile failure: it is cached by `libs` already.
        Err(DtlError::Device(m)) => {
            map.insert(arch, Err(m.clone()));
            Err(DtlError::Device(m))
        }
        Err(e) => Err(e),
    }
}
