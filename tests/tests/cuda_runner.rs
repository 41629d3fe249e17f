//! GPU parity of the whole training step with the PyTorch reference fixtures: the frozen ViT
//! on the GPU (`dtl_vit::cuda::CudaVit`), the DTL / DTL+ side network, head, loss and AdamW on
//! dfdx's `Cuda` device, within 1e-3 relative in f32. They need a CUDA GPU: build with
//! `cargo test -p dtl-tests --features cuda --no-run`; scripts/gpu-check.sh runs them.
#![cfg(feature = "cuda")]

mod gpu_common;
mod parity_common;

use dfdx::prelude::Cuda;
use dtl_vit::cuda::CudaVit;
use parity_common::{adamw_trajectory, forward_and_grads, setup, Case, RefVit};

const TOL: f64 = 1e-3;

type Geo = dtl_vit::variants::VitTestPatch8_32;
type GpuCase =
    Case<CudaVit<<Geo as dtl_vit::Geometry>::Tokens, <Geo as dtl_vit::Geometry>::Width>, Cuda>;

fn case(name: &str) -> GpuCase {
    let gpu = gpu_common::gpu();
    let dev = Cuda::try_build(0, 0).expect("dfdx's CUDA device at cuda:0");
    setup(name, dev, |vit: RefVit| {
        CudaVit::from_cpu(&vit, &gpu).expect("uploading the reference ViT")
    })
}

#[test]
fn dtl_step_on_gpu_matches_reference() {
    forward_and_grads("dtl", case("dtl"), TOL);
}

#[test]
fn dtlplus_step_on_gpu_matches_reference() {
    forward_and_grads("dtlplus", case("dtlplus"), TOL);
}

#[test]
fn dtl_adamw_trajectory_on_gpu_matches_reference() {
    adamw_trajectory("dtl", case("dtl"), TOL);
}

#[test]
fn dtlplus_adamw_trajectory_on_gpu_matches_reference() {
    adamw_trajectory("dtlplus", case("dtlplus"), TOL);
}
