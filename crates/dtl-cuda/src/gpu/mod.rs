//! The GPU device: [`Gpu`] implements the kernel set [`Kernels`] on one CUDA device, over
//! [`GpuBuf`] buffers.
//!
//! Every `unsafe` call of the device lives in this module or in `blas.rs` and `lt.rs`, behind
//! safe functions: each operation checks the ownership and length of every buffer and that its
//! sizes fit the kernels' 32-bit indices before it launches anything, so no argument can make
//! a kernel or a matrix product touch memory outside its buffers.
//!
//! All work runs in order on one non-blocking stream per [`Gpu`]. cudarc's per-buffer event
//! tracking is off (it is only needed across streams, and it would get in the way of CUDA
//! graph capture): buffers are allocated and freed in stream order (`cuMemAllocAsync` /
//! `cuMemFreeAsync`), so a buffer dropped while work using it is queued stays valid until
//! that work is done.
//!
//! [`Kernels`]: dtl_kernels::Kernels

mod driver;
mod exec;
mod graphs;
mod handle;
mod kernels;
mod memory;
#[cfg(test)]
mod tests;

pub(crate) use driver::probe;
use driver::{driver_text, drv_err};
use graphs::{Graphs, Recording};
pub use handle::Gpu;
pub(crate) use memory::Counters;
pub use memory::GpuBuf;
use memory::{DevMem, Stage, Staging, STAGE};
