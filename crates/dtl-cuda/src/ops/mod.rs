//! The operations of the kernel set, written once over [`Exec`]: the checks of every buffer
//! and size, then the launches of the project's kernels and the matrix products.
//!
//! [`crate::Gpu`] executes them on a CUDA device, [`crate::Emulator`] on the host (the same
//! kernels compiled as C++ with an emulation of the CUDA execution model), so the emulator
//! tests this code and `kernels.cu` on machines without a GPU.

#![allow(clippy::too_many_arguments)]

mod attention;
mod conv;
mod dispatch;
mod exec;
mod launch;
mod layout;
mod loss;
mod norm;
mod optim;
mod products;
mod ptr;
#[cfg(test)]
mod tests;

pub(crate) use attention::*;
pub(crate) use conv::*;
pub(crate) use dispatch::kernel_ops;
pub(crate) use exec::*;
pub(crate) use launch::*;
pub(crate) use layout::*;
pub(crate) use loss::*;
pub(crate) use norm::*;
pub(crate) use optim::*;
pub(crate) use products::*;
pub(crate) use ptr::*;
