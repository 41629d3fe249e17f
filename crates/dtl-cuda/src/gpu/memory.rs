//! Device memory and its accounting: the [`GpuBuf`] buffers, the byte counters, the pinned
//! staging buffers of uploads and the allocations of a [`Gpu`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, PinnedHostSlice};
use dtl_core::choice::Precision;
use dtl_core::Result;

use crate::ops::{invalid, Keep};

use super::{drv_err, Gpu};

/// Values per pinned staging buffer of `upload` (two of them).
pub(super) const STAGE: usize = 1 << 22;

/// Byte counters shared by a device and its buffers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) live: AtomicU64,
    pub(crate) peak: AtomicU64,
}

impl Counters {
    pub(crate) fn add(&self, bytes: u64) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Device memory that counts in [`Kernels::memory`](dtl_kernels::Kernels::memory) until it is
/// freed (in stream order).
pub(super) struct DevMem {
    _slice: CudaSlice<u8>,
    pub(super) bytes: u64,
    pub(super) counters: Arc<Counters>,
}

impl Drop for DevMem {
    fn drop(&mut self) {
        self.counters.sub(self.bytes);
    }
}

/// A buffer of `f32` or `bf16` values in the memory of one [`Gpu`]: the [`Kernels::Buf`] of
/// the GPU.
///
/// Made by [`Kernels::alloc`] (zero-filled) or [`Kernels::upload_new`] (f32), or on a device
/// opened for bf16 by [`Kernels::alloc_act`] and [`Kernels::upload_frozen`] (bf16); its bytes
/// count in [`Kernels::memory`] until it is dropped (or, while a recorded graph exists, until
/// the last graph is released). A buffer works only with the [`Gpu`] that made it (or a clone
/// of it); any other is refused with an error.
///
/// ```no_run
/// use dtl_kernels::Kernels;
/// let gpu = dtl_cuda::Gpu::open(0).unwrap();
/// let b = gpu.upload_new(&[1.0, 2.0]).unwrap();
/// assert_eq!(gpu.len(&b), 2);
/// assert_eq!(gpu.download(&b, 2).unwrap(), vec![1.0, 2.0]);
/// ```
///
/// [`Kernels::Buf`]: dtl_kernels::Kernels::Buf
/// [`Kernels::alloc`]: dtl_kernels::Kernels::alloc
/// [`Kernels::upload_new`]: dtl_kernels::Kernels::upload_new
/// [`Kernels::alloc_act`]: dtl_kernels::Kernels::alloc_act
/// [`Kernels::upload_frozen`]: dtl_kernels::Kernels::upload_frozen
/// [`Kernels::memory`]: dtl_kernels::Kernels::memory
pub struct GpuBuf {
    /// Owns the memory (freed in stream order, or kept while graphs exist, when dropped);
    /// work goes through `ptr`.
    pub(super) mem: Option<DevMem>,
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) bf16: bool,
    pub(super) owner: u64,
    pub(super) keep: Arc<Keep<DevMem>>,
}

impl GpuBuf {
    /// Number of values.
    ///
    /// ```no_run
    /// use dtl_kernels::Kernels;
    /// let gpu = dtl_cuda::Gpu::open(0).unwrap();
    /// assert_eq!(gpu.alloc(3).unwrap().len(), 3);
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no value.
    ///
    /// ```no_run
    /// use dtl_kernels::Kernels;
    /// let gpu = dtl_cuda::Gpu::open(0).unwrap();
    /// assert!(gpu.alloc(0).unwrap().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How the values are stored: `F32` or `Bf16`.
    ///
    /// ```no_run
    /// use dtl_core::choice::Precision;
    /// use dtl_kernels::Kernels;
    /// let gpu = dtl_cuda::Gpu::open_with(0, Precision::Bf16).unwrap();
    /// assert_eq!(gpu.alloc_act(3).unwrap().storage(), Precision::Bf16);
    /// assert_eq!(gpu.alloc(3).unwrap().storage(), Precision::F32);
    /// ```
    pub fn storage(&self) -> Precision {
        if self.bf16 {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        if let Some(m) = self.mem.take() {
            self.keep.drop_or_keep(m);
        }
    }
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf({} {} values)", self.len, self.storage())
    }
}

/// One pinned staging buffer of `upload` and the event after its last copy.
pub(super) struct Stage {
    pub(super) host: PinnedHostSlice<f32>,
    pub(super) done: CudaEvent,
}

pub(super) struct Staging {
    pub(super) bufs: [Stage; 2],
    pub(super) next: usize,
}

impl Gpu {
    /// A zero-filled allocation of `bytes` (at least 1) that counts in the memory stats.
    pub(super) fn alloc_mem(&self, op: &str, bytes: usize) -> Result<(DevMem, u64)> {
        self.not_recording(op)?;
        self.bind(op)?;
        let slice = self
            .inner
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| {
                drv_err(
                    &format!(
                        "allocating {:.1} MiB on cuda:{}",
                        bytes as f64 / (1u64 << 20) as f64,
                        self.inner.ordinal
                    ),
                    e,
                )
            })?;
        let ptr = slice.device_ptr(&self.inner.stream).0;
        let bytes = bytes.max(1) as u64;
        self.inner.counters.add(bytes);
        Ok((
            DevMem {
                _slice: slice,
                bytes,
                counters: self.inner.counters.clone(),
            },
            ptr,
        ))
    }

    /// A zero-filled buffer of `len` values, bf16 with `bf16`.
    pub(super) fn alloc_buf(&self, len: usize, bf16: bool) -> Result<GpuBuf> {
        const OP: &str = "alloc";
        let elem = if bf16 { 2 } else { 4 };
        if len > isize::MAX as usize / elem {
            return Err(invalid(OP, format!("{len} values do not fit in memory")));
        }
        let (mem, ptr) = self.alloc_mem(OP, len.max(1) * elem)?;
        Ok(GpuBuf {
            mem: Some(mem),
            ptr,
            len,
            bf16,
            owner: self.inner.id,
            keep: self.inner.keep.clone(),
        })
    }
}
