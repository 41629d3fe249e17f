//! The kernel profiler (`Kernels::profile_start` / `profile_take`): each label counts its
//! operations, times are never negative, shares sum to 1, nothing is kept while it is off, and
//! no graph is recorded while it is on. Each check runs on a device of its own (the profiler
//! belongs to the device and its clones): the emulator when a C++20 compiler is there
//! (`DTL_SKIP_EMULATOR=1` leaves it out) and `cuda:0` when a GPU can be opened (otherwise the
//! GPU check says why and passes, unless `DTL_REQUIRE_GPU=1`).
#![cfg(feature = "cuda")]

use std::sync::Mutex;

use dtl_cuda::{Emulator, Gpu};
use dtl_kernels::{Capture, KernelProfile, Kernels};

/// Work with a known count of each kind of operation: two GELU launches, one product, one
/// device copy.
fn some_work<K: Kernels>(k: &K) {
    let x = k.upload_new(&[0.5, -1.0, 2.0, 0.0, 1.0, 3.0]).unwrap(); // 2 x 3
    let w = k.upload_new(&[1.0; 12]).unwrap(); // (out 4, in 3)
    let mut y = k.alloc(8).unwrap();
    let mut g = k.alloc(6).unwrap();
    let mut c = k.alloc(6).unwrap();
    k.synchronize().unwrap();
    k.gelu(&x, 6, &mut g).unwrap();
    k.gelu(&g, 6, &mut c).unwrap();
    k.linear(&x, &w, None, 2, 3, 4, &mut y, false).unwrap();
    k.copy(&x, &mut c, 6).unwrap();
    assert_eq!(k.download(&y, 8).unwrap()[0], 1.5);
}

fn calls(p: &KernelProfile, label: &str) -> u64 {
    p.rows
        .iter()
        .filter(|r| r.label == label)
        .map(|r| r.calls)
        .sum()
}

fn check<K: Kernels>(k: &K) {
    // off: nothing is kept and there is nothing to take
    some_work(k);
    assert_eq!(k.profile_take().unwrap(), None);

    k.profile_start().unwrap();
    some_work(k);
    let p = k.profile_take().unwrap().expect("a profile was running");
    eprintln!("{} ({} ms wall): {:?}", k.describe(), p.wall_ms, p.rows);
    assert_eq!(calls(&p, "dtl_gelu"), 2, "{:?}", p.rows);
    assert_eq!(calls(&p, "copy"), 1, "{:?}", p.rows);
    let products: Vec<_> = p
        .rows
        .iter()
        .filter(|r| r.label.starts_with("gemm linear "))
        .collect();
    assert_eq!(products.len(), 1, "{:?}", p.rows);
    assert_eq!(products[0].calls, 1);
    assert!(products[0].label.ends_with(" f32"), "{}", products[0].label);
    assert_eq!(p.calls(), 4, "only the timed operations: {:?}", p.rows);
    for r in &p.rows {
        assert!(
            r.total_ms >= 0.0 && r.mean_us >= 0.0 && r.share >= 0.0,
            "{r:?}"
        );
    }
    let shares: f64 = p.rows.iter().map(|r| r.share).sum();
    if p.total_ms() > 0.0 {
        assert!((shares - 1.0).abs() < 1e-9, "{shares}");
    }
    assert!(p.wall_ms >= 0.0);
    assert!(!p.clock.is_empty());
    // longest first
    assert!(p.rows.windows(2).all(|w| w[0].total_ms >= w[1].total_ms));

    // taken: off again
    some_work(k);
    assert_eq!(k.profile_take().unwrap(), None);

    // no graph is recorded while profiling; the work still runs, and is timed
    let x = k.upload_new(&[1.0, 2.0]).unwrap();
    let mut y = k.alloc(2).unwrap();
    k.profile_start().unwrap();
    let c = k.capture(&mut || k.gelu(&x, 2, &mut y)).unwrap();
    let why = c.reason().expect("no graph while profiling").to_string();
    assert!(why.contains("profiling"), "{why}");
    let p = k.profile_take().unwrap().unwrap();
    assert_eq!(calls(&p, "dtl_gelu"), 1, "{:?}", p.rows);

    // a graph recorded before is timed whole when replayed
    if let Capture::Graph(id) = k.capture(&mut || k.gelu(&x, 2, &mut y)).unwrap() {
        k.profile_start().unwrap();
        k.replay(&id).unwrap();
        k.replay(&id).unwrap();
        let p = k.profile_take().unwrap().unwrap();
        assert_eq!(calls(&p, "graph replay"), 2, "{:?}", p.rows);
        assert_eq!(p.calls(), 2, "{:?}", p.rows);
        k.release(id);
    }

    // starting again drops the span under way
    k.profile_start().unwrap();
    k.gelu(&x, 2, &mut y).unwrap();
    k.profile_start().unwrap();
    let p = k.profile_take().unwrap().unwrap();
    assert_eq!(p.calls(), 0, "{:?}", p.rows);
}

#[test]
fn profile_on_the_emulator() {
    if std::env::var("DTL_SKIP_EMULATOR").is_ok_and(|v| v == "1") {
        eprintln!("DTL_SKIP_EMULATOR=1: the emulator check is skipped");
        return;
    }
    match Emulator::new() {
        Ok(e) => {
            check(&e);
            assert_eq!(
                e.profile_take().unwrap(),
                None,
                "nothing left running after the checks"
            );
        }
        Err(e) => eprintln!("no emulator, its check is skipped: {e}"),
    }
}

#[test]
fn profile_on_a_bf16_emulator_names_the_storage() {
    if std::env::var("DTL_SKIP_EMULATOR").is_ok_and(|v| v == "1") {
        return;
    }
    let Ok(e) = Emulator::with_precision(dtl_core::choice::Precision::Bf16) else {
        return;
    };
    let x = e.upload_frozen(&[1.0; 6]).unwrap();
    let w = e.upload_frozen(&[1.0; 12]).unwrap();
    let mut y = e.alloc_act(8).unwrap();
    e.profile_start().unwrap();
    e.linear(&x, &w, None, 2, 3, 4, &mut y, false).unwrap();
    let p = e.profile_take().unwrap().unwrap();
    assert!(
        p.rows.iter().any(|r| r.label == "gemm linear 4x2x3 bf16"),
        "{:?}",
        p.rows
    );
}

#[test]
fn profile_on_a_gpu() {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    match Gpu::open(0) {
        Ok(g) => check(&g),
        Err(e) => {
            assert!(
                std::env::var("DTL_REQUIRE_GPU").map_or(true, |v| v != "1"),
                "DTL_REQUIRE_GPU=1 but cuda:0 cannot be opened: {e}"
            );
            eprintln!("no GPU at cuda:0, the GPU check is skipped: {e}");
        }
    }
}
