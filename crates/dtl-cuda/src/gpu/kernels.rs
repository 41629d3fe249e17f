//! The kernel set ([`Kernels`]) on a [`Gpu`]: transfers, synchronisation, memory statistics,
//! graphs, profiling, and the operations shared with every device.

use std::sync::atomic::Ordering;

use cudarc::driver::result as drv;
use dtl_core::choice::Precision;
use dtl_core::{DtlError, Result};
use dtl_kernels::{Capture, GraphId, Kernels, MemoryStats};

use crate::ops::{bf16_bits, f32_from_bf16, Exec};
use crate::profile;

use super::{drv_err, Gpu, GpuBuf, STAGE};

#[allow(clippy::too_many_arguments)]
impl Kernels for Gpu {
    type Buf = GpuBuf;

    fn describe(&self) -> String {
        format!("cuda:{} ({})", self.inner.ordinal, self.inner.name)
    }

    fn precision(&self) -> Precision {
        self.inner.precision
    }

    fn alloc(&self, len: usize) -> Result<GpuBuf> {
        self.alloc_buf(len, false)
    }

    fn alloc_act(&self, len: usize) -> Result<GpuBuf> {
        self.alloc_buf(len, self.bf16())
    }

    fn upload_frozen(&self, host: &[f32]) -> Result<GpuBuf> {
        let mut b = self.alloc_buf(host.len(), self.bf16())?;
        self.upload(host, &mut b)?;
        Ok(b)
    }

    fn len(&self, buf: &GpuBuf) -> usize {
        buf.len
    }

    fn upload(&self, host: &[f32], dst: &mut GpuBuf) -> Result<()> {
        const OP: &str = "upload";
        let base = self.dst(OP, "dst", dst, host.len())?;
        self.not_recording(OP)?;
        if host.is_empty() {
            return Ok(());
        }
        self.bind(OP)?;
        let mut st = self.inner.staging.lock().unwrap_or_else(|p| p.into_inner());
        for (i, chunk) in host.chunks(STAGE).enumerate() {
            let which = st.next;
            st.next ^= 1;
            let stage = &mut st.bufs[which];
            // The previous copy out of this staging buffer must be done before it is rewritten.
            stage.done.synchronize().map_err(|e| drv_err(OP, e))?;
            let p = stage.host.as_mut_ptr().map_err(|e| drv_err(OP, e))?;
            let at = base.at(i * STAGE).addr;
            let cu = self.inner.stream.cu_stream();
            if base.bf16 {
                // SAFETY: the staging buffer holds STAGE f32 values, room for as many bf16 ones;
                // no copy reads it (waited above), host memory never overlaps it. `dst` holds
                // host.len() values (checked), so the chunk fits at its offset; the staging
                // memory is pinned and stays untouched until `done` passes.
                unsafe {
                    let q = p as *mut u16;
                    for (j, v) in chunk.iter().enumerate() {
                        *q.add(j) = bf16_bits(*v);
                    }
                    let staged = std::slice::from_raw_parts(q as *const u16, chunk.len());
                    drv::memcpy_htod_async(at, staged, cu)
                }
                .map_err(|e| drv_err(OP, e))?;
            } else {
                // SAFETY: as above, with f32 values.
                unsafe {
                    std::ptr::copy_nonoverlapping(chunk.as_ptr(), p, chunk.len());
                    let staged = std::slice::from_raw_parts(p as *const f32, chunk.len());
                    drv::memcpy_htod_async(at, staged, cu)
                }
                .map_err(|e| drv_err(OP, e))?;
            }
            stage
                .done
                .record(&self.inner.stream)
                .map_err(|e| drv_err(OP, e))?;
        }
        Ok(())
    }

    fn download(&self, src: &GpuBuf, len: usize) -> Result<Vec<f32>> {
        const OP: &str = "download";
        let p = self.src(OP, "src", src, len)?;
        self.not_recording(OP)?;
        self.bind(OP)?;
        let cu = self.inner.stream.cu_stream();
        if p.bf16 {
            let mut bits = vec![0u16; len];
            if len > 0 {
                // SAFETY: `src` holds at least `len` bf16 values (checked), `bits` exactly `len`.
                unsafe { drv::memcpy_dtoh_async(&mut bits, p.addr, cu) }
                    .map_err(|e| drv_err(OP, e))?;
            }
            self.synchronize()?;
            return Ok(bits.into_iter().map(f32_from_bf16).collect());
        }
        let mut out = vec![0.0f32; len];
        if len > 0 {
            // SAFETY: `src` holds at least `len` values (checked) and `out` exactly `len`.
            unsafe { drv::memcpy_dtoh_async(&mut out, p.addr, cu) }.map_err(|e| drv_err(OP, e))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    fn synchronize(&self) -> Result<()> {
        const OP: &str = "synchronize";
        self.not_recording(OP)?;
        self.bind(OP)?;
        self.inner.stream.synchronize().map_err(|e| {
            drv_err(
                &format!("cuda:{}: queued work failed", self.inner.ordinal),
                e,
            )
        })?;
        self.inner.ctx.check_err().map_err(|e| {
            drv_err(
                &format!("cuda:{}: freeing memory failed", self.inner.ordinal),
                e,
            )
        })
    }

    fn memory(&self) -> Option<MemoryStats> {
        let c = &self.inner.counters;
        let driver_used = self.inner.driver_base.and_then(|base| {
            let (free, total) = self.inner.ctx.mem_get_info().ok()?;
            Some(((total - free) as u64).saturating_sub(base))
        });
        Some(MemoryStats {
            live: c.live.load(Ordering::Relaxed),
            peak: c.peak.load(Ordering::Relaxed),
            driver_used,
        })
    }

    fn reset_peak(&self) {
        let c = &self.inner.counters;
        c.peak
            .store(c.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Capture> {
        self.capture_graph(work)
    }

    fn replay(&self, graph: &GraphId) -> Result<()> {
        self.replay_graph(graph)
    }

    fn release(&self, graph: GraphId) {
        self.release_graph(graph)
    }

    fn profile_start(&self) -> Result<()> {
        self.bind("profile_start")?;
        if self
            .inner
            .recording
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .active
        {
            return Err(DtlError::Device(format!(
                "cuda:{}: {}",
                self.inner.ordinal,
                profile::NOT_WHILE_RECORDING
            )));
        }
        self.inner.profiler.start();
        Ok(())
    }

    fn profile_take(&self) -> Result<Option<dtl_kernels::KernelProfile>> {
        if !self.inner.profiler.is_on() {
            return Ok(None);
        }
        // one wait for all the work; the events are read after it
        let waited = self.synchronize();
        let ordinal = self.inner.ordinal;
        let profile = self.inner.profiler.finish(profile::EVENTS, |(start, end)| {
            start
                .elapsed_ms(end)
                .map(f64::from)
                .map_err(|e| drv_err(&format!("cuda:{ordinal}: reading the profiling events"), e))
        });
        waited?;
        profile
    }

    crate::ops::kernel_ops!();
}
