//! The devices the GPU tests run on: `dtl_cuda::Gpu` at `cuda:0` when one can be opened
//! (otherwise a test says why and passes, unless `DTL_REQUIRE_GPU=1`), and `dtl_cuda::Emulator`,
//! the same device code on the host, when a C++20 compiler is there (`DTL_SKIP_EMULATOR=1`
//! leaves it out).

#![allow(dead_code)]

use std::sync::OnceLock;

use dtl_cuda::{Emulator, Gpu};
use dtl_kernels::Kernels;

/// `cuda:0`, opened once per test binary.
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::open(0) {
        Ok(g) => {
            eprintln!("device: {}", g.describe());
            Some(g)
        }
        Err(e) => {
            assert!(
                std::env::var("DTL_REQUIRE_GPU").map_or(true, |v| v != "1"),
                "DTL_REQUIRE_GPU=1 but cuda:0 cannot be opened: {e}"
            );
            eprintln!("no GPU at cuda:0, the GPU checks are skipped: {e}");
            None
        }
    })
    .as_ref()
}

/// The host emulation of the device code, made once per test binary.
pub fn emulator() -> Option<&'static Emulator> {
    static EMU: OnceLock<Option<Emulator>> = OnceLock::new();
    EMU.get_or_init(|| {
        if std::env::var("DTL_SKIP_EMULATOR").is_ok_and(|v| v == "1") {
            eprintln!("DTL_SKIP_EMULATOR=1: the emulator checks are skipped");
            return None;
        }
        match Emulator::new() {
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("no emulator, its checks are skipped: {e}");
                None
            }
        }
    })
    .as_ref()
}

/// `cuda:0` opened for bf16 storage, once per test binary (when a GPU is there).
pub fn gpu_bf16() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        gpu()?;
        Some(Gpu::open_with(0, dtl_core::choice::Precision::Bf16).expect("cuda:0 for bf16"))
    })
    .as_ref()
}

/// The emulator with bf16 storage, made once per test binary (when the emulator is there).
pub fn emulator_bf16() -> Option<&'static Emulator> {
    static EMU: OnceLock<Option<Emulator>> = OnceLock::new();
    EMU.get_or_init(|| {
        emulator()?;
        Some(Emulator::with_precision(dtl_core::choice::Precision::Bf16).expect("the emulator"))
    })
    .as_ref()
}
