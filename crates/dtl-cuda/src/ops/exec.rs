//! [`Exec`], what the operations need from a device, with the checked matrix products every
//! device shares.

use cudarc::driver::LaunchConfig;
use dtl_core::{DtlError, Result};
use dtl_kernels::AttnShape;

use crate::blas::{Blas, Gemm};
use crate::fused::AttentionKernels;
use crate::lt::EpilogueCounts;
use crate::DeviceSettings;

use super::{elementwise, n32, Arg, Dp, K};

/// What the operations need from a device; its settings ([`DeviceSettings`]: the attention
/// kernels, the bias epilogue) select among the operations' paths.
pub(crate) trait Exec: DeviceSettings {
    /// The device's buffer.
    type Buf;

    /// The device pointer of `b` after checking that it belongs to this device and holds
    /// at least `need` values.
    fn ptr(&self, op: &str, name: &str, b: &Self::Buf, need: usize) -> Result<Dp>;

    /// Launches kernel `k`, in order after all earlier work. A kernel whose last parameter is
    /// `int st` gets the [`storage_mask`](super::storage_mask) of `args` there; any other is
    /// refused bf16 pointers ([`check_storage`](super::check_storage)).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters (but `st`) in number and type, and every
    /// pointer must hold at least the values the kernel touches for the sizes passed and
    /// `cfg`, in the storage it says.
    unsafe fn launch(&self, op: &str, k: K, cfg: LaunchConfig, args: &[Arg]) -> Result<()>;

    /// Runs one column-major product on raw pointers: `a` and `b` both f32 (`c` f32 too) or
    /// both bf16 (`c` either), f32 compute.
    ///
    /// # Safety
    /// As [`Blas::run`]: the pointers hold [`Gemm::extents`] values, `c` apart from `a`, `b`.
    unsafe fn gemm_raw(&self, op: &str, g: &Gemm, a: Dp, b: Dp, c: Dp) -> Result<()>;

    /// Copies `bytes` bytes from `src` to `dst`.
    ///
    /// # Safety
    /// Both pointers must hold `bytes` bytes and not overlap.
    unsafe fn copy_raw(&self, op: &str, src: u64, dst: u64, bytes: usize) -> Result<()>;

    /// Runs `f` with the device pointer of the device's conversion scratch, grown to at least
    /// `bytes` first (which fails while a graph is being recorded), no other call of
    /// `with_scratch` on this device running meanwhile.
    fn with_scratch(
        &self,
        op: &str,
        bytes: usize,
        f: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<()>;

    /// Runs `f` with the device pointer of its [`PARTIALS`](super::PARTIALS) f64 partial
    /// sums, no other call of `with_partials` on this device running meanwhile.
    fn with_partials(&self, f: &mut dyn FnMut(u64) -> Result<()>) -> Result<()>;

    /// Whether the attention of `s` runs the fused kernels (in either storage).
    fn fused_attention(&self, s: &AttnShape) -> bool {
        self.attention_kernels() == AttentionKernels::Fused && crate::fused::supports(s)
    }

    /// The device's counts of linears that ran with or fell back from the epilogue.
    fn epilogue_counts(&self) -> Option<&EpilogueCounts> {
        None
    }

    /// Runs one column-major product in place with a bias epilogue on raw pointers, all four
    /// bf16: `c = alpha op(a) op(b) + beta c + bias`, `bias` one value per row of `c`
    /// (`g.m`), f32 compute, one rounding to bf16. False, with nothing queued, when the device
    /// does not run this product that way (the caller then runs the plain path).
    ///
    /// # Safety
    /// As [`Exec::gemm_raw`], and `bias` must hold `g.m` values apart from `c`.
    unsafe fn gemm_bias_raw(
        &self,
        op: &str,
        g: &Gemm,
        a: Dp,
        b: Dp,
        c: Dp,
        bias: Dp,
    ) -> Result<bool> {
        let _ = (op, g, a, b, c, bias);
        Ok(false)
    }

    /// [`Exec::gemm_bias_raw`] after the checks of [`Exec::gemm`] and of the bias (`g.m`
    /// values, apart from `c`), for bf16 `a`, `b`, `c` and `bias` only; false (nothing queued)
    /// where the epilogue does not take the product ([`crate::lt::takes`]) or the device
    /// refuses it. Counted in [`Exec::epilogue_counts`].
    ///
    /// # Safety
    /// Each pointer must hold the values given with it, `c` apart from the others.
    unsafe fn gemm_bias(
        &self,
        op: &str,
        g: &Gemm,
        a: (Dp, usize),
        b: (Dp, usize),
        c: (Dp, usize),
        bias: (Dp, usize),
    ) -> Result<bool> {
        check_gemm(op, g, a, b, c)?;
        if bias.1 < g.m || overlaps(c.0, c.1, bias.0, g.m) {
            return Err(DtlError::Device(format!(
                "{op}: internal error: the bias of a matrix product is short of {} values or overlaps its output",
                g.m
            )));
        }
        if ![a.0, b.0, c.0, bias.0].iter().all(|p| p.bf16) {
            return Err(DtlError::Device(format!(
                "{op}: internal error: a bias epilogue needs bf16 operands, output and bias"
            )));
        }
        let fused = crate::lt::takes(g, bias.0)
            // SAFETY: the caller's contract, the extents and overlaps checked above.
            && unsafe { self.gemm_bias_raw(op, g, a.0, b.0, c.0, bias.0) }?;
        if let Some(counts) = self.epilogue_counts() {
            counts.count(fused);
        }
        Ok(fused)
    }

    /// The pointer of a buffer an operation reads.
    fn src(&self, op: &str, name: &str, b: &Self::Buf, need: usize) -> Result<Dp> {
        self.ptr(op, name, b, need)
    }

    /// The pointer of a buffer an operation writes.
    fn dst(&self, op: &str, name: &str, b: &mut Self::Buf, need: usize) -> Result<Dp> {
        self.ptr(op, name, b, need)
    }

    /// Runs a product after checking its 32-bit ranges, that its extents fit the operands,
    /// each given as (device pointer, values it holds), and that the output overlaps neither
    /// input.
    ///
    /// When every operand is f32 this is one f32 product (f32 compute, TF32 off). When any is
    /// bf16, the f32 ones among `a` and `b` are first rounded to bf16 in the device's
    /// conversion scratch, and the product takes bf16 `a` and `b` with f32 compute and writes
    /// `c` in its own storage (PyTorch autocast's rule).
    ///
    /// # Safety
    /// Each pointer must hold the values given with it, `c` apart from `a` and `b`.
    unsafe fn gemm(
        &self,
        op: &str,
        g: &Gemm,
        a: (Dp, usize),
        b: (Dp, usize),
        c: (Dp, usize),
    ) -> Result<()> {
        check_gemm(op, g, a, b, c)?;
        let (ea, eb, _) = g.extents();
        let (a, b, c) = (a.0, b.0, c.0);
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        if !(a.bf16 || b.bf16 || c.bf16) || (a.bf16 && b.bf16) {
            return self.gemm_raw(op, g, a, b, c);
        }
        // The f32 operands, rounded to bf16 in the scratch: `a`'s values first, then `b`'s.
        let need_a = if a.bf16 { 0 } else { ea };
        let need_b = if b.bf16 { 0 } else { eb };
        self.with_scratch(op, 2 * (need_a + need_b), &mut |scratch| {
            let sa = Dp::bf16(scratch);
            let sb = sa.at(need_a);
            for (from, to, n) in [(a, sa, need_a), (b, sb, need_b)] {
                if n > 0 {
                    let ni = n32(op, "the operand values", n)?;
                    // SAFETY: `from` holds n values (checked above); the scratch holds
                    // need_a + need_b bf16 values, and `to` is followed by n of them.
                    unsafe {
                        self.launch(
                            op,
                            K::Convert,
                            elementwise(n),
                            &[Arg::P(from), Arg::P(to), Arg::I(ni)],
                        )
                    }?;
                }
            }
            let a16 = if a.bf16 { a } else { sa };
            let b16 = if b.bf16 { b } else { sb };
            // SAFETY: as above; the scratch is the device's own, apart from `c`.
            unsafe { self.gemm_raw(op, g, a16, b16, c) }
        })
    }
}

/// Whether `nx` values at `x` and `ny` values at `y` share memory.
fn overlaps(x: Dp, nx: usize, y: Dp, ny: usize) -> bool {
    nx > 0
        && ny > 0
        && x.addr < y.addr + (y.elem() * ny) as u64
        && y.addr < x.addr + (x.elem() * nx) as u64
}

/// Checks a product's 32-bit ranges, that its extents fit the operands (each given as
/// (device pointer, values it holds)) and that the output overlaps neither input.
fn check_gemm(op: &str, g: &Gemm, a: (Dp, usize), b: (Dp, usize), c: (Dp, usize)) -> Result<()> {
    Blas::check(op, g)?;
    let (ea, eb, ec) = g.extents();
    if ea > a.1 || eb > b.1 || ec > c.1 {
        return Err(DtlError::Device(format!(
            "{op}: internal error: a matrix product would reach past its operands ({ea}, {eb}, {ec} values of {}, {}, {})",
            a.1, b.1, c.1
        )));
    }
    if overlaps(c.0, ec, a.0, ea) || overlaps(c.0, ec, b.0, eb) {
        return Err(DtlError::Device(format!(
            "{op}: internal error: a matrix product would write over one of its operands"
        )));
    }
    Ok(())
}
