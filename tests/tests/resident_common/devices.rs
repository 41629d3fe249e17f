//! The devices the device-step tests run on, each test its own: `cuda:0` when a GPU can be
//! opened (otherwise a test says why and passes, unless `DTL_REQUIRE_GPU=1`), one test at a
//! time, and a fresh `dtl_cuda::Emulator` when a C++20 compiler is there
//! (`DTL_SKIP_EMULATOR=1` leaves it out).
//!
//! Each test has a device of its own because the training step records itself as a graph:
//! everything issued on a device while it records goes into the recording, so two tests
//! training at once on one device would record each other's work.

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use dtl_core::choice::Precision;
use dtl_cuda::{Emulator, Gpu};
use dtl_kernels::Kernels;

/// `cuda:0` opened at `precision`, held by this test alone until the guard drops.
pub fn gpu(precision: Precision) -> Option<(MutexGuard<'static, ()>, Gpu)> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    match Gpu::open_with(0, precision) {
        Ok(g) => {
            eprintln!("device: {} ({precision})", g.describe());
            Some((guard, g))
        }
        Err(e) => {
            assert!(
                std::env::var("DTL_REQUIRE_GPU").map_or(true, |v| v != "1"),
                "DTL_REQUIRE_GPU=1 but cuda:0 cannot be opened: {e}"
            );
            eprintln!("no GPU at cuda:0, the GPU checks are skipped: {e}");
            None
        }
    }
}

/// A new emulated device storing at `precision`.
pub fn emulator(precision: Precision) -> Option<Emulator> {
    if std::env::var("DTL_SKIP_EMULATOR").is_ok_and(|v| v == "1") {
        eprintln!("DTL_SKIP_EMULATOR=1: the emulator checks are skipped");
        return None;
    }
    match Emulator::with_precision(precision) {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("no emulator, its checks are skipped: {e}");
            None
        }
    }
}

/// A `#[test]` running `$body` with `$k` bound to each device present at `$p`.
macro_rules! on_devices {
    ($p:expr, $name:ident, $k:ident => $body:expr) => {
        #[test]
        fn $name() {
            if let Some((_one_at_a_time, $k)) = devices::gpu($p) {
                $body;
            }
            if let Some($k) = devices::emulator($p) {
                $body;
            }
        }
    };
}
