//! The [`Exec`] device of [`Gpu`]: buffer checks, kernel launches, products and copies on
//! its stream.

use cudarc::driver::{result as drv, LaunchConfig, PushKernelArg};
use dtl_core::Result;
use dtl_kernels::check_len;

use crate::blas::Gemm;
use crate::lt::EpilogueCounts;
use crate::ops::{check_storage, invalid, storage_mask, Arg, Dp, Exec, K};
use crate::{nvrtc, profile};

use super::{drv_err, Gpu, GpuBuf};

impl Exec for Gpu {
    type Buf = GpuBuf;

    fn ptr(&self, op: &str, name: &str, b: &GpuBuf, need: usize) -> Result<Dp> {
        if b.owner != self.inner.id {
            return Err(invalid(
                op,
                format!("buffer `{name}` belongs to another GPU device handle"),
            ));
        }
        check_len(op, name, b.len, need)?;
        Ok(Dp {
            addr: b.ptr,
            bf16: b.bf16,
        })
    }

    unsafe fn launch(&self, op: &str, k: K, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let storage = nvrtc::takes_storage()[k as usize];
        check_storage(op, nvrtc::KERNEL_NAMES[k as usize], storage, args)?;
        let mask = storage.then(|| storage_mask(args));
        let f = &self.inner.funcs[k as usize];
        let mut b = self.inner.stream.launch_builder(f);
        for a in args.iter().chain(mask.as_ref()) {
            match a {
                Arg::P(p) => {
                    b.arg(&p.addr);
                }
                Arg::I(i) => {
                    b.arg(i);
                }
                Arg::F(x) => {
                    b.arg(x);
                }
            }
        }
        let name = nvrtc::KERNEL_NAMES[k as usize];
        self.timed(
            op,
            |_| Some(name.to_string()),
            || {
                // SAFETY: the caller's contract (see `Exec::launch`).
                unsafe { b.launch(cfg) }
                    .map(|_| ())
                    .map_err(|e| drv_err(&format!("{op} on cuda:{}", self.inner.ordinal), e))
            },
        )
    }

    unsafe fn gemm_raw(&self, op: &str, g: &Gemm, a: Dp, b: Dp, c: Dp) -> Result<()> {
        self.bind(op)?;
        self.timed(
            op,
            |_| Some(profile::gemm_label(op, g, a.bf16)),
            || {
                // SAFETY: the caller's contract; the context is bound.
                unsafe { self.inner.blas.run(op, g, a, b, c) }
            },
        )
    }

    unsafe fn copy_raw(&self, op: &str, src: u64, dst: u64, bytes: usize) -> Result<()> {
        self.bind(op)?;
        self.timed(
            op,
            |_| Some(profile::COPY.to_string()),
            || {
                // SAFETY: the caller's contract: both pointers hold `bytes` bytes, apart.
                unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.inner.stream.cu_stream()) }
                    .map_err(|e| drv_err(op, e))
            },
        )
    }

    fn with_scratch(
        &self,
        op: &str,
        bytes: usize,
        f: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<()> {
        let mut s = self.inner.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if s.as_ref().map_or(true, |(_, _, cap)| *cap < bytes) {
            // grow to the next power of two (at least 1 MiB), so that it seldom grows again
            let cap = bytes.next_power_of_two().max(1 << 20);
            let (mem, ptr) = self.alloc_mem(&format!("{op}: growing the bf16 scratch"), cap)?;
            if let Some((old, _, _)) = s.replace((mem, ptr, cap)) {
                self.inner.keep.drop_or_keep(old);
            }
        }
        let ptr = s.as_ref().map_or(0, |(_, p, _)| *p);
        f(ptr)
    }

    fn with_partials(&self, f: &mut dyn FnMut(u64) -> Result<()>) -> Result<()> {
        let _guard = self
            .inner
            .partials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(self.inner.partials_ptr)
    }

    fn epilogue_counts(&self) -> Option<&EpilogueCounts> {
        Some(&self.inner.epilogue_counts)
    }

    unsafe fn gemm_bias_raw(
        &self,
        op: &str,
        g: &Gemm,
        a: Dp,
        b: Dp,
        c: Dp,
        bias: Dp,
    ) -> Result<bool> {
        self.bind(op)?;
        self.timed(
            op,
            |&fused: &bool| fused.then(|| format!("{} +bias", profile::gemm_label(op, g, a.bf16))),
            || {
                // SAFETY: the caller's contract (checked by `Exec::gemm_bias`); the context is
                // bound.
                Ok(unsafe { self.inner.lt.run(g, a, b, c, bias) })
            },
        )
    }
}
