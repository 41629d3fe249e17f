//! The device checks of `tests/tests/cuda_kernels.rs`, compiled into this crate's tests so that
//! `cargo test -p dtl-cuda --features cuda` runs them: on the emulator (the device code on the
//! host, see `dtl_cuda::Emulator`) when a C++20 compiler is there, and on `cuda:0` when a GPU is.
#![cfg(feature = "cuda")]

#[path = "../../../tests/tests/cuda_kernels.rs"]
mod cuda_kernels;
