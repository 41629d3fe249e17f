//! NVRTC compiles the project's kernels: no GPU needed, only the NVRTC library (from a CUDA
//! install, a Python wheel, or `eval "$(scripts/cuda-toolchain.sh)"`).
//!
//! Without NVRTC each test prints why and passes, unless `DTL_REQUIRE_NVRTC=1` (set in CI),
//! which turns a missing NVRTC (or missing bf16 headers) into a failure.
#![cfg(feature = "cuda")]

fn required() -> bool {
    std::env::var("DTL_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// Whether NVRTC is there; prints why not, or fails when it is required.
fn nvrtc_present(test: &str) -> bool {
    match dtl_cuda::libs::nvrtc() {
        Ok(lib) => {
            eprintln!("{test}: NVRTC {} at {}", lib.major, lib.path.display());
            true
        }
        Err(e) => {
            assert!(!required(), "DTL_REQUIRE_NVRTC=1 but {e}");
            eprintln!("{test}: skipped, {e}");
            false
        }
    }
}

#[test]
fn every_kernel_entry_point_compiles_for_each_gpu_generation() {
    if !nvrtc_present("kernels") {
        return;
    }
    let archs = dtl_cuda::nvrtc_architectures().unwrap();
    let (major, minor) = dtl_cuda::nvrtc_version().unwrap();
    eprintln!("NVRTC {major}.{minor} compiles for {archs:?}");
    // Ampere, Hopper (the H200) and the oldest NVRTC knows.
    let mut targets: Vec<u32> = [80, 90].into_iter().filter(|a| archs.contains(a)).collect();
    targets.push(*archs.iter().min().unwrap());
    for arch in targets {
        let ptx = dtl_cuda::compile_kernels(arch).unwrap_or_else(|e| panic!("compute_{arch}: {e}"));
        assert!(
            ptx.contains(&format!(".target sm_{arch}")),
            "compute_{arch}: no .target line"
        );
        for name in dtl_cuda::KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "compute_{arch}: the PTX lacks the entry point {name}"
            );
        }
        assert_eq!(
            ptx.matches(".entry ").count(),
            dtl_cuda::KERNEL_NAMES.len(),
            "KERNEL_NAMES must list every kernel of kernels.cu"
        );
        let version = ptx
            .lines()
            .find(|l| l.starts_with(".version"))
            .unwrap_or("?");
        eprintln!("compute_{arch}: {} bytes of PTX, {version}", ptx.len());
    }
    // compiled once per process: the second call returns the same text
    let arch = *archs.iter().max().unwrap();
    assert_eq!(
        dtl_cuda::compile_kernels(arch).unwrap(),
        dtl_cuda::compile_kernels(arch).unwrap()
    );
}

#[test]
fn the_device_architecture_maps_to_one_nvrtc_knows() {
    if !nvrtc_present("architecture") {
        return;
    }
    let archs = dtl_cuda::nvrtc_architectures().unwrap();
    if archs.contains(&90) {
        assert_eq!(dtl_cuda::target_architecture((9, 0)).unwrap(), 90);
    }
    // a device newer than NVRTC gets NVRTC's newest architecture; the driver JIT-compiles it
    let newest = *archs.iter().max().unwrap();
    assert_eq!(dtl_cuda::target_architecture((99, 9)).unwrap(), newest);
    let e = dtl_cuda::target_architecture((1, 0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("compute capability 1.0") && e.contains("too old"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn bf16_headers_are_found_and_compile() {
    if !nvrtc_present("bf16") {
        return;
    }
    let Some(dir) = dtl_cuda::libs::include_dir() else {
        assert!(
            !required(),
            "DTL_REQUIRE_NVRTC=1 but no folder with cuda_bf16.h was found"
        );
        eprintln!("bf16: skipped, no folder with cuda_bf16.h found");
        return;
    };
    eprintln!("bf16: headers in {}", dir.display());
    let src = r#"
#include <cuda_bf16.h>
extern "C" __global__ void dtl_probe_bf16(const __nv_bfloat16* x, float* out, int n) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += 32) s += __bfloat162float(x[i]);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) out[0] = s;
}
"#;
    let archs = dtl_cuda::nvrtc_architectures().unwrap();
    let arch = if archs.contains(&90) {
        90
    } else {
        *archs.iter().max().unwrap()
    };
    let ptx = dtl_cuda::compile_ptx(src, "probe_bf16.cu", arch).unwrap();
    assert!(ptx.contains(".entry dtl_probe_bf16("));
}

#[test]
fn a_compile_error_is_one_line_naming_the_file() {
    if !nvrtc_present("errors") {
        return;
    }
    let arch = *dtl_cuda::nvrtc_architectures()
        .unwrap()
        .iter()
        .max()
        .unwrap();
    let e = dtl_cuda::compile_ptx(
        "extern \"C\" __global__ void k() { undefined_fn(); }",
        "broken.cu",
        arch,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("broken.cu") && e.contains("undefined_fn"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let e = dtl_cuda::compile_ptx("a\0b", "nul.cu", arch)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NUL"), "{e}");
}

#[test]
fn the_library_report_has_one_line_per_library() {
    let lines = dtl_cuda::libs::report();
    assert_eq!(lines.len(), 4);
    for l in &lines {
        assert!(!l.contains('\n'), "{l}");
        eprintln!("{l}");
    }
}
