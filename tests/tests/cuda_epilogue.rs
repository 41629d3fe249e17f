//! The bias-epilogue checks of `crates/dtl-cuda/tests/epilogue.rs`, compiled here as well so that
//! the GPU check (`scripts/gpu-check.sh`, which runs the `cuda_*` tests of this folder) runs them
//! on `cuda:0`.
#![cfg(feature = "cuda")]

#[path = "../../crates/dtl-cuda/tests/epilogue.rs"]
mod epilogue;
