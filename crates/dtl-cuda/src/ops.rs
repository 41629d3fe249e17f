//! The operations of the kernel set, written once over [`Exec`]: the checks of every buffer
//! and size, then the launches of the project's kernels and the matrix products.
//!
//! [`crate::Gpu`] executes them on a CUDA device, [`crate::Emulator`] on the host (the same
//! kernels compiled as C++ with an emulation of the CUDA execution model), so the emulator
//! tests this code and `kernels.cu` on machines without a GPU.

#![allow(clippy::too_many_arguments)]

use cudarc::driver::LaunchConfig;
use dtl_core::choice::Precision;
use dtl_core::{DtlError, Result};
use dtl_kernels::{checked_product, AdamwStep, AttnShape, ConvShape, MergeShape, WindowShape};

use crate::blas::{Blas, Gemm};
use crate::fused::AttentionKernels;
use crate::lt::{EpilogueCounts, GemmEpilogue};

/// Threads per block of the elementwise kernels.
pub(crate) const THREADS: u32 = 256;
/// Most blocks of an elementwise launch (grid-stride loops cover the rest).
pub(crate) const MAX_BLOCKS: usize = 1 << 16;
/// Warps per block of the one-warp-per-row kernels.
pub(crate) const ROW_WARPS: u32 = 4;
/// Partial sums of `sum_squares` (f64 each) a device keeps.
pub(crate) const PARTIALS: usize = 1024;

/// The kernel entry points, in the order of [`crate::KERNEL_NAMES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum K {
    Fill,
    Add,
    BiasRows,
    SumRows,
    Gelu,
    GeluVjp,
    Swish,
    SwishVjp,
    AddScaled,
    Scaled,
    LayerNorm,
    LayerNormVjp,
    SplitQkv,
    SplitHeads,
    MergeHeads,
    MergeQkv,
    Softmax,
    SoftmaxVjp,
    Patchify,
    AssembleTokens,
    WindowPartition,
    PatchMerge,
    Dwconv,
    DwconvDx,
    DwconvDw,
    MeanTokens,
    MeanTokensVjp,
    SoftCrossEntropy,
    EvalStats,
    SumSquaresPartial,
    SumSquaresFinal,
    Adamw,
    AdamwFrom,
    Convert,
    AttnFused,
    AttnFusedDq,
    AttnFusedDkv,
}

/// A device pointer and the storage of the values it points to (f32, or bf16 with `bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dp {
    pub addr: u64,
    pub bf16: bool,
}

impl Dp {
    /// A pointer to f32 values (or to anything that is not a buffer's values, or null).
    pub fn f32(addr: u64) -> Dp {
        Dp { addr, bf16: false }
    }

    /// A pointer to bf16 values.
    pub fn bf16(addr: u64) -> Dp {
        Dp { addr, bf16: true }
    }

    /// Bytes per value.
    pub fn elem(&self) -> usize {
        if self.bf16 {
            2
        } else {
            4
        }
    }

    /// The pointer `values` values further on.
    pub fn at(&self, values: usize) -> Dp {
        Dp {
            addr: self.addr + (values * self.elem()) as u64,
            ..*self
        }
    }
}

/// The pointer `bytes` bytes further on, in the same storage.
impl std::ops::Add<u64> for Dp {
    type Output = Dp;
    fn add(self, bytes: u64) -> Dp {
        Dp {
            addr: self.addr + bytes,
            ..self
        }
    }
}

/// A kernel argument: a device pointer (with its storage), an `int` or a `float`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Arg {
    P(Dp),
    I(i32),
    F(f32),
}

/// The last argument, `st`, of a kernel that takes one: bit `j` set when argument `j` points
/// to bf16 values.
pub(crate) fn storage_mask(args: &[Arg]) -> Arg {
    Arg::I(args.iter().enumerate().fold(0, |m, (j, a)| match a {
        Arg::P(p) if p.bf16 => m | 1 << j,
        _ => m,
    }))
}

/// Checks a launch's pointers against the kernel: one without an `st` parameter (`storage`
/// false) reads and writes f32 only, and is refused a bf16 buffer.
pub(crate) fn check_storage(op: &str, name: &str, storage: bool, args: &[Arg]) -> Result<()> {
    if !storage && args.iter().any(|a| matches!(a, Arg::P(p) if p.bf16)) {
        return Err(DtlError::invalid(format!(
            "{op}: {name} takes f32 buffers only, and was given a bf16 one"
        )));
    }
    Ok(())
}

/// What the operations need from a device.
pub(crate) trait Exec {
    /// The device's buffer.
    type Buf;

    /// The device pointer of `b` after checking that it belongs to this device and holds
    /// at least `need` values.
    fn ptr(&self, op: &str, name: &str, b: &Self::Buf, need: usize) -> Result<Dp>;

    /// Launches kernel `k`, in order after all earlier work. A kernel whose last parameter is
    /// `int st` gets the [`storage_mask`] of `args` there; any other is refused bf16 pointers
    /// ([`check_storage`]).
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

    /// Runs `f` with the device pointer of its [`PARTIALS`] f64 partial sums, no other call
    /// of `with_partials` on this device running meanwhile.
    fn with_partials(&self, f: &mut dyn FnMut(u64) -> Result<()>) -> Result<()>;

    /// The attention kernels selected on this device.
    fn attention_kernels(&self) -> AttentionKernels {
        AttentionKernels::Unfused
    }

    /// Whether the attention of `s` runs the fused kernels (in either storage).
    fn fused_attention(&self, s: &AttnShape) -> bool {
        self.attention_kernels() == AttentionKernels::Fused && crate::fused::supports(s)
    }

    /// How this device adds the bias of a linear (see [`GemmEpilogue`]).
    fn gemm_epilogue(&self) -> GemmEpilogue {
        GemmEpilogue::Plain
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

/// The memory of dropped buffers a device keeps while graphs (which hold raw device pointers)
/// exist: [`Keep::hold`] for each graph (and each recording under way), [`Keep::unhold`]
/// when it goes; memory dropped meanwhile is kept until the last one goes.
pub(crate) struct Keep<M> {
    state: std::sync::Mutex<(usize, Vec<M>)>,
}

impl<M> Keep<M> {
    pub fn new() -> Keep<M> {
        Keep {
            state: std::sync::Mutex::new((0, Vec::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Vec<M>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees `m` now, or keeps it while a graph exists.
    pub fn drop_or_keep(&self, m: M) {
        let mut s = self.lock();
        if s.0 > 0 {
            s.1.push(m);
        } else {
            drop(s);
            drop(m);
        }
    }

    /// One more graph holds pointers.
    pub fn hold(&self) {
        self.lock().0 += 1;
    }

    /// One graph fewer; after the last, the memory kept is freed (outside the lock).
    pub fn unhold(&self) {
        let freed = {
            let mut s = self.lock();
            s.0 = s.0.saturating_sub(1);
            if s.0 == 0 {
                std::mem::take(&mut s.1)
            } else {
                Vec::new()
            }
        };
        drop(freed);
    }

    /// Frees everything kept, whatever the graphs (the device is going).
    pub fn clear(&self) {
        let freed = {
            let mut s = self.lock();
            s.0 = 0;
            std::mem::take(&mut s.1)
        };
        drop(freed);
    }
}

/// `v` rounded to bf16 (to nearest, ties to even; a NaN stays a quiet NaN of the same sign),
/// as its 16 bits: what the kernels' `dtl_f32_to_bf16` computes.
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits (exact).
pub(crate) fn f32_from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The precision a device is opened at: `Auto` (which a caller resolves first) is bf16.
pub(crate) fn resolve(p: Precision) -> Precision {
    match p {
        Precision::Auto => Precision::Bf16,
        p => p,
    }
}

pub(crate) fn n32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        DtlError::invalid(format!(
            "{op}: {what} = {v} exceeds the 32-bit range of the GPU kernels"
        ))
    })
}

pub(crate) fn invalid(op: &str, what: impl std::fmt::Display) -> DtlError {
    DtlError::invalid(format!("{op}: {what}"))
}

pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row; up to 256 threads, fewer for short rows.
pub(crate) fn block_rows(rows: usize, width: usize) -> LaunchConfig {
    let threads = width.div_ceil(32).clamp(1, 8) as u32 * 32;
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row.
pub(crate) fn warp_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROW_WARPS as usize) as u32, 1, 1),
        block_dim: (32 * ROW_WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn single_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Scratch layout of the attention: four `(batch, heads, tokens, head_dim)` slots (q, k, v
/// and the output, or in the VJP the output's gradient; the VJP writes dQ, dV and dK over q, v
/// and the output's gradient once they are no longer needed), then the probabilities and
/// their gradient `(batch, heads, tokens, tokens)`, in values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttnPlan {
    pub slot: usize,
    pub probs: usize,
}

impl AttnPlan {
    pub fn new(s: &AttnShape) -> Option<AttnPlan> {
        let slot = s
            .batch
            .checked_mul(s.tokens)?
            .checked_mul(s.heads)?
            .checked_mul(s.head_dim)?;
        let probs = s
            .batch
            .checked_mul(s.heads)?
            .checked_mul(s.tokens)?
            .checked_mul(s.tokens)?;
        Some(AttnPlan { slot, probs })
    }

    pub fn total(&self) -> Option<usize> {
        self.slot
            .checked_mul(4)?
            .checked_add(self.probs.checked_mul(2)?)
    }

    /// Offsets in values: q, k, v, o, P, dP.
    pub fn offsets(&self) -> [usize; 6] {
        let s = self.slot;
        [0, s, 2 * s, 3 * s, 4 * s, 4 * s + self.probs]
    }
}

/// Values of the attention scratch for `shape` (`usize::MAX` when that overflows, so that
/// allocating it fails with a clear error).
pub(crate) fn attention_scratch(shape: AttnShape) -> usize {
    AttnPlan::new(&shape)
        .and_then(|p| p.total())
        .unwrap_or(usize::MAX)
}

/// Values of the attention scratch for `shape` on `e`: the fused path's when it runs it.
pub(crate) fn attention_scratch_on<E: Exec>(e: &E, shape: AttnShape) -> usize {
    if e.fused_attention(&shape) {
        crate::fused::scratch(&shape)
    } else {
        attention_scratch(shape)
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

fn fill_ptr<E: Exec>(e: &E, op: &str, p: Dp, n: usize, value: f32) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let n = n32(op, "the values", n)?;
    // SAFETY: callers pass a pointer holding `n` values.
    unsafe {
        e.launch(
            op,
            K::Fill,
            elementwise(n as usize),
            &[Arg::P(p), Arg::I(n), Arg::F(value)],
        )
    }
}

/// Copies `n` values, converting when the storages differ.
fn copy_ptr<E: Exec>(e: &E, op: &str, src: Dp, dst: Dp, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if src.bf16 == dst.bf16 {
        // SAFETY: callers pass pointers holding `n` values each, not overlapping.
        return unsafe { e.copy_raw(op, src.addr, dst.addr, n * src.elem()) };
    }
    let ni = n32(op, "the values", n)?;
    // SAFETY: callers pass pointers holding `n` values each, not overlapping.
    unsafe {
        e.launch(
            op,
            K::Convert,
            elementwise(n),
            &[Arg::P(src), Arg::P(dst), Arg::I(ni)],
        )
    }
}

/// `y (m x n) [+]= x (m x k) w^T [+ bias]` on checked pointers.
///
/// With a bias: cuBLASLt's bias epilogue where the device selects it ([`GemmEpilogue::Lt`]),
/// everything is bf16 and the product is one it takes (`y = round(x w^T [+ y] + bias)`, one
/// rounding); else `BiasRows` writes `bias [+ y]` into `y` (rounded to its storage) and the
/// product adds to it with `beta = 1`.
#[allow(clippy::too_many_arguments)]
fn linear_ptr<E: Exec>(
    e: &E,
    op: &str,
    x: Dp,
    w: Dp,
    bias: Option<Dp>,
    (m, k, n): (usize, usize, usize),
    y: Dp,
    accumulate: bool,
) -> Result<()> {
    let len = m * n;
    if len == 0 {
        return Ok(());
    }
    let mut beta = if accumulate { 1.0 } else { 0.0 };
    if let Some(b) = bias {
        // Only a product that does not accumulate: adding onto `y` in the epilogue would round
        // the residual stream once where PyTorch (a linear, then the add) and the plain path
        // round twice, which moves the bf16 trajectories (docs/cuda.md, "Bias in the product's
        // epilogue").
        let fits = !accumulate && k > 0 && [x, w, y, b].iter().all(|p| p.bf16);
        if fits && e.gemm_epilogue() == GemmEpilogue::Lt {
            // SAFETY: w holds n * k, x m * k, y m * n values, bias n (checked by the callers).
            let fused = unsafe {
                e.gemm_bias(
                    op,
                    &Gemm::linear(m, k, n, beta),
                    (w, n * k),
                    (x, m * k),
                    (y, m * n),
                    (b, n),
                )
            }?;
            if fused {
                return Ok(());
            }
        }
        let (mi, ni) = (n32(op, "m", m)?, n32(op, "n", n)?);
        n32(op, "the output values", len)?;
        // SAFETY: y holds m * n values, bias n (checked by the callers).
        unsafe {
            e.launch(
                op,
                K::BiasRows,
                elementwise(len),
                &[
                    Arg::P(y),
                    Arg::P(b),
                    Arg::I(mi),
                    Arg::I(ni),
                    Arg::I(accumulate as i32),
                ],
            )
        }?;
        beta = 1.0;
    }
    if k == 0 {
        return if beta == 0.0 {
            fill_ptr(e, op, y, len, 0.0)
        } else {
            Ok(())
        };
    }
    // SAFETY: w holds n * k, x m * k, y m * n values (checked by the callers).
    unsafe {
        e.gemm(
            op,
            &Gemm::linear(m, k, n, beta),
            (w, n * k),
            (x, m * k),
            (y, m * n),
        )
    }
}

pub(crate) fn copy<E: Exec>(e: &E, src: &E::Buf, dst: &mut E::Buf, len: usize) -> Result<()> {
    const OP: &str = "copy";
    let s = e.src(OP, "src", src, len)?;
    let d = e.dst(OP, "dst", dst, len)?;
    copy_ptr(e, OP, s, d, len)
}

pub(crate) fn fill<E: Exec>(e: &E, dst: &mut E::Buf, len: usize, value: f32) -> Result<()> {
    const OP: &str = "fill";
    let d = e.dst(OP, "dst", dst, len)?;
    fill_ptr(e, OP, d, len, value)
}

pub(crate) fn add<E: Exec>(e: &E, y: &mut E::Buf, x: &E::Buf, len: usize) -> Result<()> {
    const OP: &str = "add";
    let xp = e.src(OP, "x", x, len)?;
    let yp = e.dst(OP, "y", y, len)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "len", len)?;
    // SAFETY: x and y hold `len` values (checked).
    unsafe {
        e.launch(
            OP,
            K::Add,
            elementwise(len),
            &[Arg::P(yp), Arg::P(xp), Arg::I(n)],
        )
    }
}

pub(crate) fn linear<E: Exec>(
    e: &E,
    x: &E::Buf,
    w: &E::Buf,
    bias: Option<&E::Buf>,
    m: usize,
    k: usize,
    n: usize,
    y: &mut E::Buf,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "linear";
    let xp = e.src(OP, "x", x, checked_product(OP, &[m, k])?)?;
    let wp = e.src(OP, "w", w, checked_product(OP, &[n, k])?)?;
    let bp = bias.map(|b| e.src(OP, "bias", b, n)).transpose()?;
    let yp = e.dst(OP, "y", y, checked_product(OP, &[m, n])?)?;
    linear_ptr(e, OP, xp, wp, bp, (m, k, n), yp, accumulate)
}

pub(crate) fn linear_vjp<E: Exec>(
    e: &E,
    dy: &E::Buf,
    w: &E::Buf,
    m: usize,
    k: usize,
    n: usize,
    dx: &mut E::Buf,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "linear_vjp";
    let dyp = e.src(OP, "dy", dy, checked_product(OP, &[m, n])?)?;
    let wp = e.src(OP, "w", w, checked_product(OP, &[n, k])?)?;
    let dxp = e.dst(OP, "dx", dx, checked_product(OP, &[m, k])?)?;
    if m * k == 0 {
        return Ok(());
    }
    if n == 0 {
        return if accumulate {
            Ok(())
        } else {
            fill_ptr(e, OP, dxp, m * k, 0.0)
        };
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: w holds n * k, dy m * n, dx m * k values (checked).
    unsafe {
        e.gemm(
            OP,
            &Gemm::linear_vjp(m, k, n, beta),
            (wp, n * k),
            (dyp, m * n),
            (dxp, m * k),
        )
    }
}

pub(crate) fn linear_wgrad<E: Exec>(
    e: &E,
    dy: &E::Buf,
    x: &E::Buf,
    m: usize,
    k: usize,
    n: usize,
    dw: &mut E::Buf,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "linear_wgrad";
    let dyp = e.src(OP, "dy", dy, checked_product(OP, &[m, n])?)?;
    let xp = e.src(OP, "x", x, checked_product(OP, &[m, k])?)?;
    let dwp = e.dst(OP, "dw", dw, checked_product(OP, &[n, k])?)?;
    if n * k == 0 {
        return Ok(());
    }
    if m == 0 {
        return if accumulate {
            Ok(())
        } else {
            fill_ptr(e, OP, dwp, n * k, 0.0)
        };
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: x holds m * k, dy m * n, dw n * k values (checked).
    unsafe {
        e.gemm(
            OP,
            &Gemm::linear_wgrad(m, k, n, beta),
            (xp, m * k),
            (dyp, m * n),
            (dwp, n * k),
        )
    }
}

pub(crate) fn sum_rows<E: Exec>(
    e: &E,
    dy: &E::Buf,
    m: usize,
    n: usize,
    db: &mut E::Buf,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "sum_rows";
    let len = checked_product(OP, &[m, n])?;
    let dyp = e.src(OP, "dy", dy, len)?;
    let dbp = e.dst(OP, "db", db, n)?;
    if n == 0 {
        return Ok(());
    }
    n32(OP, "m * n", len)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(32) as u32, 1, 1),
        block_dim: (32, 32, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: dy holds m * n values and db n (checked); m * n fits i32.
    unsafe {
        e.launch(
            OP,
            K::SumRows,
            cfg,
            &[
                Arg::P(dyp),
                Arg::P(dbp),
                Arg::I(m as i32),
                Arg::I(n as i32),
                Arg::I(accumulate as i32),
            ],
        )
    }
}

pub(crate) fn layer_norm<E: Exec>(
    e: &E,
    x: &E::Buf,
    gamma: &E::Buf,
    beta: &E::Buf,
    rows: usize,
    d: usize,
    eps: f32,
    y: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "layer_norm";
    let len = checked_product(OP, &[rows, d])?;
    let xp = e.src(OP, "x", x, len)?;
    let gp = e.src(OP, "gamma", gamma, d)?;
    let bp = e.src(OP, "beta", beta, d)?;
    let yp = e.dst(OP, "y", y, len)?;
    if len == 0 {
        return Ok(());
    }
    n32(OP, "rows * d", len)?;
    // SAFETY: x and y hold rows * d values, gamma and beta d (checked); one block per row.
    unsafe {
        e.launch(
            OP,
            K::LayerNorm,
            block_rows(rows, d),
            &[
                Arg::P(xp),
                Arg::P(gp),
                Arg::P(bp),
                Arg::P(yp),
                Arg::I(d as i32),
                Arg::F(eps),
            ],
        )
    }
}

pub(crate) fn layer_norm_vjp<E: Exec>(
    e: &E,
    x: &E::Buf,
    gamma: &E::Buf,
    dy: &E::Buf,
    rows: usize,
    d: usize,
    eps: f32,
    dx: &mut E::Buf,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "layer_norm_vjp";
    let len = checked_product(OP, &[rows, d])?;
    let xp = e.src(OP, "x", x, len)?;
    let gp = e.src(OP, "gamma", gamma, d)?;
    let dyp = e.src(OP, "dy", dy, len)?;
    let dxp = e.dst(OP, "dx", dx, len)?;
    if len == 0 {
        return Ok(());
    }
    n32(OP, "rows * d", len)?;
    // SAFETY: x, dy and dx hold rows * d values, gamma d (checked); one block per row.
    unsafe {
        e.launch(
            OP,
            K::LayerNormVjp,
            block_rows(rows, d),
            &[
                Arg::P(xp),
                Arg::P(gp),
                Arg::P(dyp),
                Arg::P(dxp),
                Arg::I(d as i32),
                Arg::F(eps),
                Arg::I(accumulate as i32),
            ],
        )
    }
}

pub(crate) fn gelu<E: Exec>(e: &E, x: &E::Buf, len: usize, y: &mut E::Buf) -> Result<()> {
    const OP: &str = "gelu";
    let xp = e.src(OP, "x", x, len)?;
    let yp = e.dst(OP, "y", y, len)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "len", len)?;
    // SAFETY: x and y hold `len` values (checked).
    unsafe {
        e.launch(
            OP,
            K::Gelu,
            elementwise(len),
            &[Arg::P(xp), Arg::P(yp), Arg::I(n)],
        )
    }
}

pub(crate) fn gelu_vjp<E: Exec>(e: &E, u: &E::Buf, len: usize, g: &mut E::Buf) -> Result<()> {
    const OP: &str = "gelu_vjp";
    let up = e.src(OP, "u", u, len)?;
    let gp = e.dst(OP, "g", g, len)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "len", len)?;
    // SAFETY: u and g hold `len` values (checked).
    unsafe {
        e.launch(
            OP,
            K::GeluVjp,
            elementwise(len),
            &[Arg::P(up), Arg::P(gp), Arg::I(n)],
        )
    }
}

pub(crate) fn attention<E: Exec>(
    e: &E,
    qkv: &E::Buf,
    shape: AttnShape,
    out: &mut E::Buf,
    scratch: &mut E::Buf,
) -> Result<()> {
    attention_with("attention", e, qkv, shape, None, out, scratch)
}

pub(crate) fn attention_bias<E: Exec>(
    e: &E,
    qkv: &E::Buf,
    shape: AttnShape,
    bias: &E::Buf,
    groups: usize,
    out: &mut E::Buf,
    scratch: &mut E::Buf,
) -> Result<()> {
    attention_with(
        "attention_bias",
        e,
        qkv,
        shape,
        Some((bias, groups)),
        out,
        scratch,
    )
}

/// The score bias of an attention as the softmax kernel's `(pointer, bias_rows)` (`(0, 1)`
/// without one), after checking `groups` and that the bias holds `groups x heads x tokens x
/// tokens` values.
fn score_bias<E: Exec>(
    e: &E,
    op: &str,
    s: &AttnShape,
    bias: Option<(&E::Buf, usize)>,
) -> Result<(Dp, i32)> {
    let Some((b, groups)) = bias else {
        return Ok((Dp::f32(0), 1));
    };
    if groups == 0 {
        return Err(invalid(op, "the bias has 0 groups; it needs at least 1"));
    }
    let rows = checked_product(op, &[groups, s.heads, s.tokens])?;
    let len = checked_product(op, &[rows, s.tokens])?;
    let p = e.src(op, "bias", b, len)?;
    if len == 0 {
        return Ok((p, 1));
    }
    n32(op, "the bias values", len)?;
    // rows <= len: it fits too
    Ok((p, rows as i32))
}

/// Attention, with an additive bias on the scores when `bias` is given.
fn attention_with<E: Exec>(
    op: &str,
    e: &E,
    qkv: &E::Buf,
    shape: AttnShape,
    bias: Option<(&E::Buf, usize)>,
    out: &mut E::Buf,
    scratch: &mut E::Buf,
) -> Result<()> {
    if e.fused_attention(&shape) {
        return crate::fused::attention(op, e, qkv, shape, bias, out, scratch);
    }
    let (plan, nqkv) = attn_plan(op, &shape)?;
    let qp = e.src(op, "qkv", qkv, nqkv)?;
    let (bp, bias_rows) = score_bias(e, op, &shape, bias)?;
    let outp = e.dst(op, "out", out, plan.slot)?;
    let need = plan
        .total()
        .ok_or_else(|| invalid(op, "the scratch size overflows"))?;
    let sp = e.dst(op, "scratch", scratch, need)?;
    if plan.slot == 0 {
        return Ok(());
    }
    let at = |i: usize| sp.at(plan.offsets()[i]);
    let (q, k, v, o, p) = (at(0), at(1), at(2), at(3), at(4));
    let AttnShape {
        batch: b,
        tokens: n,
        heads: h,
        head_dim: d,
    } = shape;
    let dims = [
        Arg::I(b as i32),
        Arg::I(n as i32),
        Arg::I(h as i32),
        Arg::I(d as i32),
    ];
    let bh = b * h;
    let (sl, pl) = (plan.slot, plan.probs);
    let scale = 1.0 / (d as f32).sqrt();
    // SAFETY (all launches and products below): qkv holds rows * 3 width values, out rows *
    // width, the scratch the four head slots and two probability blocks of `plan` (checked
    // by attn_plan and above), a bias `bias_rows` rows of n values (score_bias; the softmax
    // reads it only when not null); every count fits i32 (attn_plan, score_bias).
    unsafe {
        e.launch(
            op,
            K::SplitQkv,
            elementwise(plan.slot),
            &[
                Arg::P(qp),
                Arg::P(q),
                Arg::P(k),
                Arg::P(v),
                dims[0],
                dims[1],
                dims[2],
                dims[3],
            ],
        )?;
        e.gemm(
            op,
            &Gemm::scores(bh, n, d, scale),
            (k, sl),
            (q, sl),
            (p, pl),
        )?;
        e.launch(
            op,
            K::Softmax,
            warp_rows(bh * n),
            &[
                Arg::P(p),
                Arg::P(bp),
                Arg::I((bh * n) as i32),
                Arg::I(n as i32),
                Arg::I(bias_rows),
            ],
        )?;
        e.gemm(op, &Gemm::probs_values(bh, n, d), (v, sl), (p, pl), (o, sl))?;
        e.launch(
            op,
            K::MergeHeads,
            elementwise(plan.slot),
            &[
                Arg::P(o),
                Arg::P(outp),
                dims[0],
                dims[1],
                dims[2],
                dims[3],
                Arg::I((h * d) as i32),
                Arg::I(0),
            ],
        )
    }
}

pub(crate) fn attention_vjp<E: Exec>(
    e: &E,
    qkv: &E::Buf,
    dout: &E::Buf,
    shape: AttnShape,
    dqkv: &mut E::Buf,
    scratch: &mut E::Buf,
) -> Result<()> {
    attention_vjp_with("attention_vjp", e, qkv, dout, shape, None, dqkv, scratch)
}

pub(crate) fn attention_bias_vjp<E: Exec>(
    e: &E,
    qkv: &E::Buf,
    dout: &E::Buf,
    shape: AttnShape,
    bias: &E::Buf,
    groups: usize,
    dqkv: &mut E::Buf,
    scratch: &mut E::Buf,
) -> Result<()> {
    attention_vjp_with(
        "attention_bias_vjp",
        e,
        qkv,
        dout,
        shape,
        Some((bias, groups)),
        dqkv,
        scratch,
    )
}

/// Input-only VJP of [`attention_with`]: the probabilities are recomputed with the same bias,
/// which gets no gradient.
fn attention_vjp_with<E: Exec>(
    op: &str,
    e: &E,
    qkv: &E::Buf,
    dout: &E::Buf,
    shape: AttnShape,
    bias: Option<(&E::Buf, usize)>,
    dqkv: &mut E::Buf,
    scratch: &mut E::Buf,
) -> Result<()> {
    if e.fused_attention(&shape) {
        return crate::fused::attention_vjp(op, e, qkv, dout, shape, bias, dqkv, scratch);
    }
    let (plan, nqkv) = attn_plan(op, &shape)?;
    let qp = e.src(op, "qkv", qkv, nqkv)?;
    let dop = e.src(op, "dout", dout, plan.slot)?;
    let (bp, bias_rows) = score_bias(e, op, &shape, bias)?;
    let dqp = e.dst(op, "dqkv", dqkv, nqkv)?;
    let need = plan
        .total()
        .ok_or_else(|| invalid(op, "the scratch size overflows"))?;
    let sp = e.dst(op, "scratch", scratch, need)?;
    if plan.slot == 0 {
        return Ok(());
    }
    let at = |i: usize| sp.at(plan.offsets()[i]);
    let (q, k, v, go, p, dp) = (at(0), at(1), at(2), at(3), at(4), at(5));
    let AttnShape {
        batch: b,
        tokens: n,
        heads: h,
        head_dim: d,
    } = shape;
    let dims = [
        Arg::I(b as i32),
        Arg::I(n as i32),
        Arg::I(h as i32),
        Arg::I(d as i32),
    ];
    let bh = b * h;
    let (sl, pl) = (plan.slot, plan.probs);
    let rows = (bh * n) as i32;
    let scale = 1.0 / (d as f32).sqrt();
    // SAFETY (all launches and products below): as in `attention_with`, plus dout holds rows *
    // width values and dqkv rows * 3 width (checked).
    unsafe {
        e.launch(
            op,
            K::SplitQkv,
            elementwise(plan.slot),
            &[
                Arg::P(qp),
                Arg::P(q),
                Arg::P(k),
                Arg::P(v),
                dims[0],
                dims[1],
                dims[2],
                dims[3],
            ],
        )?;
        // the gradient of the output, in head layout, in the output slot
        e.launch(
            op,
            K::SplitHeads,
            elementwise(plan.slot),
            &[
                Arg::P(dop),
                Arg::P(go),
                dims[0],
                dims[1],
                dims[2],
                dims[3],
                Arg::I((h * d) as i32),
                Arg::I(0),
            ],
        )?;
        // the probabilities, recomputed
        e.gemm(
            op,
            &Gemm::scores(bh, n, d, scale),
            (k, sl),
            (q, sl),
            (p, pl),
        )?;
        e.launch(
            op,
            K::Softmax,
            warp_rows(bh * n),
            &[
                Arg::P(p),
                Arg::P(bp),
                Arg::I(rows),
                Arg::I(n as i32),
                Arg::I(bias_rows),
            ],
        )?;
        // dP = dO V^T, then dV = P^T dO into the v slot (v is no longer needed)
        e.gemm(
            op,
            &Gemm::grad_values_t(bh, n, d),
            (v, sl),
            (go, sl),
            (dp, pl),
        )?;
        e.gemm(
            op,
            &Gemm::probs_t_grad(bh, n, d),
            (go, sl),
            (p, pl),
            (v, sl),
        )?;
        // G = scale * P (dP - rowsum(dP P)), in place of dP
        e.launch(
            op,
            K::SoftmaxVjp,
            warp_rows(bh * n),
            &[
                Arg::P(p),
                Arg::P(dp),
                Arg::I(rows),
                Arg::I(n as i32),
                Arg::F(scale),
            ],
        )?;
        // dK = G^T Q into the dO slot (dO is no longer needed), then dQ = G K into the q slot
        e.gemm(op, &Gemm::grad_k(bh, n, d), (q, sl), (dp, pl), (go, sl))?;
        e.gemm(op, &Gemm::grad_q(bh, n, d), (k, sl), (dp, pl), (q, sl))?;
        e.launch(
            op,
            K::MergeQkv,
            elementwise(plan.slot),
            &[
                Arg::P(q),
                Arg::P(go),
                Arg::P(v),
                Arg::P(dqp),
                dims[0],
                dims[1],
                dims[2],
                dims[3],
            ],
        )
    }
}

pub(crate) fn add_scaled<E: Exec>(
    e: &E,
    x: &mut E::Buf,
    branch: &E::Buf,
    batch: usize,
    per_sample: usize,
    scales: Option<&E::Buf>,
) -> Result<()> {
    const OP: &str = "add_scaled";
    let len = checked_product(OP, &[batch, per_sample])?;
    let bp = e.src(OP, "branch", branch, len)?;
    let sp = scales.map(|s| e.src(OP, "scales", s, batch)).transpose()?;
    let xp = e.dst(OP, "x", x, len)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "batch * per_sample", len)?;
    match sp {
        // SAFETY: x and branch hold `len` values (checked).
        None => unsafe {
            e.launch(
                OP,
                K::Add,
                elementwise(len),
                &[Arg::P(xp), Arg::P(bp), Arg::I(n)],
            )
        },
        // SAFETY: x and branch hold `len` values, scales `batch` = len / per_sample (checked).
        Some(sp) => unsafe {
            e.launch(
                OP,
                K::AddScaled,
                elementwise(len),
                &[
                    Arg::P(xp),
                    Arg::P(bp),
                    Arg::P(sp),
                    Arg::I(n),
                    Arg::I(per_sample as i32),
                ],
            )
        },
    }
}

pub(crate) fn scaled<E: Exec>(
    e: &E,
    g: &E::Buf,
    batch: usize,
    per_sample: usize,
    scales: Option<&E::Buf>,
    out: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "scaled";
    let len = checked_product(OP, &[batch, per_sample])?;
    let gp = e.src(OP, "g", g, len)?;
    let sp = scales.map(|s| e.src(OP, "scales", s, batch)).transpose()?;
    let op = e.dst(OP, "out", out, len)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "batch * per_sample", len)?;
    match sp {
        None => copy_ptr(e, OP, gp, op, len),
        // SAFETY: g and out hold `len` values, scales `batch` = len / per_sample (checked).
        Some(sp) => unsafe {
            e.launch(
                OP,
                K::Scaled,
                elementwise(len),
                &[
                    Arg::P(gp),
                    Arg::P(sp),
                    Arg::P(op),
                    Arg::I(n),
                    Arg::I(per_sample as i32),
                ],
            )
        },
    }
}

pub(crate) fn patchify<E: Exec>(
    e: &E,
    images: &E::Buf,
    batch: usize,
    channels: usize,
    size: usize,
    patch: usize,
    cols: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "patchify";
    if patch == 0 || size % patch != 0 {
        return Err(invalid(
            OP,
            format!("an image of {size} pixels is not a whole number of {patch}-pixel patches"),
        ));
    }
    let len = checked_product(OP, &[batch, channels, size, size])?;
    let ip = e.src(OP, "images", images, len)?;
    let cp = e.dst(OP, "cols", cols, len)?;
    if len == 0 {
        return Ok(());
    }
    n32(OP, "the image values", len)?;
    // SAFETY: images and cols both hold batch * channels * size^2 values (checked; the
    // patches tile the image exactly).
    unsafe {
        e.launch(
            OP,
            K::Patchify,
            elementwise(len),
            &[
                Arg::P(ip),
                Arg::P(cp),
                Arg::I(batch as i32),
                Arg::I(channels as i32),
                Arg::I(size as i32),
                Arg::I(patch as i32),
            ],
        )
    }
}

pub(crate) fn assemble_tokens<E: Exec>(
    e: &E,
    patches: &E::Buf,
    prefix_tokens: &E::Buf,
    pos: &E::Buf,
    batch: usize,
    prefix: usize,
    patches_per_sample: usize,
    d: usize,
    out: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "assemble_tokens";
    let tokens = prefix
        .checked_add(patches_per_sample)
        .ok_or_else(|| invalid(OP, "the token count overflows"))?;
    let pp = e.src(
        OP,
        "patches",
        patches,
        checked_product(OP, &[batch, patches_per_sample, d])?,
    )?;
    let tp = e.src(
        OP,
        "prefix_tokens",
        prefix_tokens,
        checked_product(OP, &[prefix, d])?,
    )?;
    let sp = e.src(OP, "pos", pos, checked_product(OP, &[tokens, d])?)?;
    let len = checked_product(OP, &[batch, tokens, d])?;
    let op = e.dst(OP, "out", out, len)?;
    if len == 0 {
        return Ok(());
    }
    n32(OP, "the output values", len)?;
    // SAFETY: every index the kernel forms is below the lengths checked above.
    unsafe {
        e.launch(
            OP,
            K::AssembleTokens,
            elementwise(len),
            &[
                Arg::P(pp),
                Arg::P(tp),
                Arg::P(sp),
                Arg::P(op),
                Arg::I(batch as i32),
                Arg::I(prefix as i32),
                Arg::I(patches_per_sample as i32),
                Arg::I(d as i32),
            ],
        )
    }
}

/// Checks a shifted-window partition's shape: the values of the tensor, in 32 bits.
fn window_len(op: &str, s: &WindowShape) -> Result<usize> {
    let (g, w, sh) = (s.grid, s.window, s.shift);
    if w.0 == 0 || w.1 == 0 {
        return Err(invalid(
            op,
            format!("the window {}x{} has a side of 0", w.0, w.1),
        ));
    }
    if g.0 % w.0 != 0 || g.1 % w.1 != 0 {
        return Err(invalid(
            op,
            format!(
                "the {}x{} grid is not a whole number of {}x{} windows",
                g.0, g.1, w.0, w.1
            ),
        ));
    }
    if sh.0 >= w.0 || sh.1 >= w.1 {
        return Err(invalid(
            op,
            format!(
                "the shift ({}, {}) must be smaller than the {}x{} window in each direction",
                sh.0, sh.1, w.0, w.1
            ),
        ));
    }
    let len = checked_product(op, &[s.batch, g.0, g.1, s.width])?;
    n32(op, "the token values", len)?;
    Ok(len)
}

/// One launch of `dtl_window_partition`: the partition, or with `inverse` the merge.
fn window_shuffle<E: Exec>(
    e: &E,
    op: &str,
    x: &E::Buf,
    s: WindowShape,
    out: &mut E::Buf,
    inverse: bool,
) -> Result<()> {
    let len = window_len(op, &s)?;
    let xp = e.src(op, "x", x, len)?;
    let outp = e.dst(op, "out", out, len)?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: x and out hold the len values of the grid (checked); the windows tile the grid
    // exactly and the shift is below the window (window_len), so every index is below len,
    // and every size fits i32 (each is at most len).
    unsafe {
        e.launch(
            op,
            K::WindowPartition,
            elementwise(len),
            &[
                Arg::P(xp),
                Arg::P(outp),
                Arg::I(s.batch as i32),
                Arg::I(s.grid.0 as i32),
                Arg::I(s.grid.1 as i32),
                Arg::I(s.width as i32),
                Arg::I(s.window.0 as i32),
                Arg::I(s.window.1 as i32),
                Arg::I(s.shift.0 as i32),
                Arg::I(s.shift.1 as i32),
                Arg::I(inverse as i32),
            ],
        )
    }
}

pub(crate) fn window_partition<E: Exec>(
    e: &E,
    x: &E::Buf,
    shape: WindowShape,
    out: &mut E::Buf,
) -> Result<()> {
    window_shuffle(e, "window_partition", x, shape, out, false)
}

pub(crate) fn window_merge<E: Exec>(
    e: &E,
    x: &E::Buf,
    shape: WindowShape,
    out: &mut E::Buf,
) -> Result<()> {
    window_shuffle(e, "window_merge", x, shape, out, true)
}

/// Checks a patch merging's shape: the values of its input (and output), in 32 bits.
fn merge_len(op: &str, s: &MergeShape) -> Result<usize> {
    if s.grid.0 % 2 != 0 || s.grid.1 % 2 != 0 {
        return Err(invalid(
            op,
            format!(
                "the {}x{} grid has an odd side; patch merging needs both sides even",
                s.grid.0, s.grid.1
            ),
        ));
    }
    let len = checked_product(op, &[s.batch, s.grid.0, s.grid.1, s.width])?;
    n32(op, "the token values", len)?;
    Ok(len)
}

/// One launch of `dtl_patch_merge`: the merging, or with `inverse` its VJP.
fn merge_shuffle<E: Exec>(
    e: &E,
    op: &str,
    (src, src_name): (&E::Buf, &str),
    s: MergeShape,
    (dst, dst_name): (&mut E::Buf, &str),
    inverse: bool,
) -> Result<()> {
    let len = merge_len(op, &s)?;
    let sp = e.src(op, src_name, src, len)?;
    let dp = e.dst(op, dst_name, dst, len)?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: both buffers hold the len values (checked); the grid's sides are even, so the
    // merged grid holds the same values and every index is below len; every size fits i32.
    unsafe {
        e.launch(
            op,
            K::PatchMerge,
            elementwise(len),
            &[
                Arg::P(sp),
                Arg::P(dp),
                Arg::I(s.batch as i32),
                Arg::I(s.grid.0 as i32),
                Arg::I(s.grid.1 as i32),
                Arg::I(s.width as i32),
                Arg::I(inverse as i32),
            ],
        )
    }
}

pub(crate) fn patch_merge<E: Exec>(
    e: &E,
    x: &E::Buf,
    shape: MergeShape,
    out: &mut E::Buf,
) -> Result<()> {
    merge_shuffle(e, "patch_merge", (x, "x"), shape, (out, "out"), false)
}

pub(crate) fn patch_merge_vjp<E: Exec>(
    e: &E,
    dy: &E::Buf,
    shape: MergeShape,
    dx: &mut E::Buf,
) -> Result<()> {
    merge_shuffle(e, "patch_merge_vjp", (dy, "dy"), shape, (dx, "dx"), true)
}

pub(crate) fn swish<E: Exec>(
    e: &E,
    z: &E::Buf,
    len: usize,
    beta: f32,
    y: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "swish";
    let zp = e.src(OP, "z", z, len)?;
    let yp = e.dst(OP, "y", y, len)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "len", len)?;
    // SAFETY: z and y hold `len` values (checked).
    unsafe {
        e.launch(
            OP,
            K::Swish,
            elementwise(len),
            &[Arg::P(zp), Arg::P(yp), Arg::I(n), Arg::F(beta)],
        )
    }
}

pub(crate) fn swish_vjp<E: Exec>(
    e: &E,
    z: &E::Buf,
    dy: &E::Buf,
    len: usize,
    beta: f32,
    dz: &mut E::Buf,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "swish_vjp";
    let zp = e.src(OP, "z", z, len)?;
    let dyp = e.src(OP, "dy", dy, len)?;
    let dzp = e.dst(OP, "dz", dz, len)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "len", len)?;
    // SAFETY: z, dy and dz hold `len` values (checked).
    unsafe {
        e.launch(
            OP,
            K::SwishVjp,
            elementwise(len),
            &[
                Arg::P(zp),
                Arg::P(dyp),
                Arg::P(dzp),
                Arg::I(n),
                Arg::F(beta),
                Arg::I(accumulate as i32),
            ],
        )
    }
}

pub(crate) fn depthwise_conv<E: Exec>(
    e: &E,
    x: &E::Buf,
    w: &E::Buf,
    shape: ConvShape,
    y: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "depthwise_conv";
    let (len, nw) = conv_lens(OP, &shape)?;
    let xp = e.src(OP, "x", x, len)?;
    let wp = e.src(OP, "w", w, nw)?;
    let yp = e.dst(OP, "y", y, len)?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: x and y hold batch * tokens * width values, w width * k^2 (checked); the
    // counts fit i32 (conv_lens).
    unsafe {
        e.launch(
            OP,
            K::Dwconv,
            elementwise(len),
            &conv_args(&[xp, wp, yp], &shape),
        )
    }
}

pub(crate) fn depthwise_conv_vjp<E: Exec>(
    e: &E,
    x: &E::Buf,
    w: &E::Buf,
    dy: &E::Buf,
    shape: ConvShape,
    dx: &mut E::Buf,
    dw: &mut E::Buf,
    accumulate_dw: bool,
) -> Result<()> {
    const OP: &str = "depthwise_conv_vjp";
    let (len, nw) = conv_lens(OP, &shape)?;
    let xp = e.src(OP, "x", x, len)?;
    let wp = e.src(OP, "w", w, nw)?;
    let dyp = e.src(OP, "dy", dy, len)?;
    let dxp = e.dst(OP, "dx", dx, len)?;
    let dwp = e.dst(OP, "dw", dw, nw)?;
    if len > 0 {
        // SAFETY: dy and dx hold batch * tokens * width values, w width * k^2 (checked).
        unsafe {
            e.launch(
                OP,
                K::DwconvDx,
                elementwise(len),
                &conv_args(&[dyp, wp, dxp], &shape),
            )
        }?;
    }
    if nw == 0 {
        return Ok(());
    }
    let mut args = conv_args(&[xp, dyp, dwp], &shape);
    args.push(Arg::I(accumulate_dw as i32));
    let cfg = LaunchConfig {
        grid_dim: (
            shape.width.div_ceil(32) as u32,
            (shape.kernel * shape.kernel) as u32,
            1,
        ),
        block_dim: (32, 16, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x and dy hold batch * tokens * width values, dw width * k^2 (checked); k^2
    // fits the grid's y dimension (conv_lens).
    unsafe { e.launch(OP, K::DwconvDw, cfg, &args) }
}

pub(crate) fn mean_tokens<E: Exec>(
    e: &E,
    x: &E::Buf,
    batch: usize,
    tokens: usize,
    d: usize,
    from: usize,
    to: usize,
    out: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "mean_tokens";
    token_range(OP, tokens, from, to)?;
    let len = checked_product(OP, &[batch, tokens, d])?;
    let xp = e.src(OP, "x", x, len)?;
    let op = e.dst(OP, "out", out, checked_product(OP, &[batch, d])?)?;
    if batch * d == 0 {
        return Ok(());
    }
    n32(OP, "the input values", len)?;
    // SAFETY: x holds batch * tokens * d values and out batch * d (checked); from < to <= tokens.
    unsafe {
        e.launch(
            OP,
            K::MeanTokens,
            elementwise(batch * d),
            &[
                Arg::P(xp),
                Arg::P(op),
                Arg::I(batch as i32),
                Arg::I(tokens as i32),
                Arg::I(d as i32),
                Arg::I(from as i32),
                Arg::I(to as i32),
            ],
        )
    }
}

pub(crate) fn mean_tokens_vjp<E: Exec>(
    e: &E,
    g: &E::Buf,
    batch: usize,
    tokens: usize,
    d: usize,
    from: usize,
    to: usize,
    dx: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "mean_tokens_vjp";
    token_range(OP, tokens, from, to)?;
    let gp = e.src(OP, "g", g, checked_product(OP, &[batch, d])?)?;
    let len = checked_product(OP, &[batch, tokens, d])?;
    let dxp = e.dst(OP, "dx", dx, len)?;
    if len == 0 {
        return Ok(());
    }
    n32(OP, "the output values", len)?;
    // SAFETY: g holds batch * d values and dx batch * tokens * d (checked).
    unsafe {
        e.launch(
            OP,
            K::MeanTokensVjp,
            elementwise(len),
            &[
                Arg::P(gp),
                Arg::P(dxp),
                Arg::I(batch as i32),
                Arg::I(tokens as i32),
                Arg::I(d as i32),
                Arg::I(from as i32),
                Arg::I(to as i32),
            ],
        )
    }
}

pub(crate) fn soft_cross_entropy<E: Exec>(
    e: &E,
    logits: &E::Buf,
    targets: &E::Buf,
    batch: usize,
    classes: usize,
    loss: &mut E::Buf,
    grad: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "soft_cross_entropy";
    let len = checked_product(OP, &[batch, classes])?;
    let lp = e.src(OP, "logits", logits, len)?;
    let tp = e.src(OP, "targets", targets, len)?;
    let lossp = e.dst(OP, "loss", loss, 1)?;
    let gp = e.dst(OP, "grad", grad, len)?;
    if len == 0 {
        return fill_ptr(e, OP, lossp, 1, 0.0);
    }
    n32(OP, "batch * classes", len)?;
    // SAFETY: logits, targets and grad hold batch * classes values, loss one (checked).
    unsafe {
        e.launch(
            OP,
            K::SoftCrossEntropy,
            single_block(1024),
            &[
                Arg::P(lp),
                Arg::P(tp),
                Arg::P(lossp),
                Arg::P(gp),
                Arg::I(batch as i32),
                Arg::I(classes as i32),
            ],
        )
    }
}

pub(crate) fn eval_stats<E: Exec>(
    e: &E,
    logits: &E::Buf,
    labels: &E::Buf,
    batch: usize,
    classes: usize,
    stats: &mut E::Buf,
) -> Result<()> {
    const OP: &str = "eval_stats";
    let len = checked_product(OP, &[batch, classes])?;
    let lp = e.src(OP, "logits", logits, len)?;
    let yp = e.src(OP, "labels", labels, batch)?;
    let sp = e.dst(OP, "stats", stats, 4)?;
    if batch == 0 {
        return Ok(());
    }
    n32(OP, "batch * classes", len)?;
    n32(OP, "classes", classes)?;
    // SAFETY: logits hold batch * classes values, labels batch, stats four (checked).
    unsafe {
        e.launch(
            OP,
            K::EvalStats,
            single_block(1024),
            &[
                Arg::P(lp),
                Arg::P(yp),
                Arg::P(sp),
                Arg::I(batch as i32),
                Arg::I(classes as i32),
            ],
        )
    }
}

pub(crate) fn sum_squares<E: Exec>(e: &E, x: &E::Buf, len: usize, acc: &mut E::Buf) -> Result<()> {
    const OP: &str = "sum_squares";
    let xp = e.src(OP, "x", x, len)?;
    let ap = e.dst(OP, "acc", acc, 1)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "len", len)?;
    let parts = len.div_ceil(THREADS as usize * 4).clamp(1, PARTIALS);
    let cfg = LaunchConfig {
        grid_dim: (parts as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // The two launches share the device's partial sums; `with_partials` keeps any other
    // sum_squares out from between them.
    e.with_partials(&mut |pp| {
        // SAFETY: x holds `len` values, acc one (checked); the partials buffer holds PARTIALS
        // f64 values and the grid has at most PARTIALS blocks.
        unsafe {
            e.launch(
                OP,
                K::SumSquaresPartial,
                cfg,
                &[Arg::P(xp), Arg::P(Dp::f32(pp)), Arg::I(n)],
            )?;
            e.launch(
                OP,
                K::SumSquaresFinal,
                single_block(1024),
                &[Arg::P(Dp::f32(pp)), Arg::P(ap), Arg::I(parts as i32)],
            )
        }
    })
}

pub(crate) fn adamw<E: Exec>(
    e: &E,
    param: &mut E::Buf,
    grad: &E::Buf,
    m: &mut E::Buf,
    v: &mut E::Buf,
    len: usize,
    step: &AdamwStep,
    clip: Option<(&E::Buf, f32)>,
) -> Result<()> {
    const OP: &str = "adamw";
    let gp = e.src(OP, "grad", grad, len)?;
    let clip = clip
        .map(|(sq, max_norm)| e.src(OP, "sq", sq, 1).map(|p| (p, max_norm)))
        .transpose()?;
    let pp = e.dst(OP, "param", param, len)?;
    let mp = e.dst(OP, "m", m, len)?;
    let vp = e.dst(OP, "v", v, len)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "len", len)?;
    let decay = if step.weight_decay != 0.0 {
        (1.0 - step.lr as f64 * step.weight_decay as f64) as f32
    } else {
        1.0
    };
    // Without clipping the kernel never reads `sq`; any valid pointer stands in.
    let (sq, max_norm, has_clip) = match clip {
        Some((p, max_norm)) => (p, max_norm, 1),
        None => (gp, 0.0, 0),
    };
    // SAFETY: param, grad, m and v hold `len` values, sq one when clipping (checked).
    unsafe {
        e.launch(
            OP,
            K::Adamw,
            elementwise(len),
            &[
                Arg::P(pp),
                Arg::P(gp),
                Arg::P(mp),
                Arg::P(vp),
                Arg::I(n),
                Arg::F(step.beta1),
                Arg::F(step.beta2),
                Arg::F(step.eps),
                Arg::F(decay),
                Arg::F(step.step_size),
                Arg::F(step.bc2_sqrt),
                Arg::P(sq),
                Arg::F(max_norm),
                Arg::I(has_clip),
            ],
        )
    }
}

/// [`adamw`] with the step's scalars read by the kernel from entry `index` of `scalars` (see
/// [`dtl_kernels::Kernels::adamw_from`]), so that a recorded graph follows the buffer.
pub(crate) fn adamw_from<E: Exec>(
    e: &E,
    param: &mut E::Buf,
    grad: &E::Buf,
    m: &mut E::Buf,
    v: &mut E::Buf,
    len: usize,
    scalars: &E::Buf,
    index: usize,
    clip: Option<(&E::Buf, f32)>,
) -> Result<()> {
    const OP: &str = "adamw_from";
    let gp = e.src(OP, "grad", grad, len)?;
    let clip = clip
        .map(|(sq, max_norm)| e.src(OP, "sq", sq, 1).map(|p| (p, max_norm)))
        .transpose()?;
    // The buffer holds the entries up to `index`.
    let need = index
        .checked_add(1)
        .and_then(|e| e.checked_mul(AdamwStep::SCALARS))
        .ok_or_else(|| invalid(OP, format!("step scalars entry {index} is out of range")))?;
    let sp = e.src(OP, "scalars", scalars, need)?;
    let index = n32(OP, "index", index)?;
    let pp = e.dst(OP, "param", param, len)?;
    let mp = e.dst(OP, "m", m, len)?;
    let vp = e.dst(OP, "v", v, len)?;
    if len == 0 {
        return Ok(());
    }
    let n = n32(OP, "len", len)?;
    // Without clipping the kernel never reads `sq`; any valid pointer stands in.
    let (sq, max_norm, has_clip) = match clip {
        Some((p, max_norm)) => (p, max_norm, 1),
        None => (gp, 0.0, 0),
    };
    // SAFETY: param, grad, m and v hold `len` values, scalars `(index + 1) * SCALARS`, sq one
    // when clipping (checked).
    unsafe {
        e.launch(
            OP,
            K::AdamwFrom,
            elementwise(len),
            &[
                Arg::P(pp),
                Arg::P(gp),
                Arg::P(mp),
                Arg::P(vp),
                Arg::I(n),
                Arg::P(sp),
                Arg::I(index),
                Arg::P(sq),
                Arg::F(max_norm),
                Arg::I(has_clip),
            ],
        )
    }
}

/// Checks an attention shape: its plan and the values of the fused `qkv`, all in 32 bits.
fn attn_plan(op: &str, s: &AttnShape) -> Result<(AttnPlan, usize)> {
    let plan =
        AttnPlan::new(s).ok_or_else(|| invalid(op, format!("the sizes of {s:?} overflow")))?;
    let nqkv = checked_product(op, &[plan.slot, 3])?;
    if plan.slot > 0 {
        n32(op, "the qkv values", nqkv)?;
        n32(op, "the attention probabilities", plan.probs)?;
        n32(op, "batch * heads", s.batch * s.heads)?;
    }
    Ok((plan, nqkv))
}

/// Checks a depthwise convolution's shape: `(token tensor values, weight values)`.
fn conv_lens(op: &str, s: &ConvShape) -> Result<(usize, usize)> {
    if s.kernel == 0 {
        return Err(invalid(op, "the kernel side is 0"));
    }
    let grid = checked_product(op, &[s.grid.0, s.grid.1])?;
    let tokens = s
        .prefix
        .checked_add(grid)
        .ok_or_else(|| invalid(op, "the token count overflows"))?;
    let len = checked_product(op, &[s.batch, tokens, s.width])?;
    let nw = checked_product(op, &[s.width, s.kernel, s.kernel])?;
    n32(op, "the token values", len)?;
    n32(op, "the weight values", nw)?;
    if s.kernel * s.kernel > 65_535 {
        return Err(invalid(
            op,
            format!("a {0}x{0} kernel is too large", s.kernel),
        ));
    }
    Ok((len, nw))
}

fn conv_args(ptrs: &[Dp; 3], s: &ConvShape) -> Vec<Arg> {
    vec![
        Arg::P(ptrs[0]),
        Arg::P(ptrs[1]),
        Arg::P(ptrs[2]),
        Arg::I(s.batch as i32),
        Arg::I(s.prefix as i32),
        Arg::I(s.grid.0 as i32),
        Arg::I(s.grid.1 as i32),
        Arg::I(s.width as i32),
        Arg::I(s.kernel as i32),
    ]
}

/// Checks the token range of a pooling.
fn token_range(op: &str, tokens: usize, from: usize, to: usize) -> Result<()> {
    if from >= to || to > tokens {
        return Err(invalid(
            op,
            format!("the token range {from}..{to} is empty or outside the {tokens} tokens"),
        ));
    }
    Ok(())
}

/// The methods of [`dtl_kernels::Kernels`] that are the same on every [`Exec`] device, for
/// use inside its `impl Kernels`: each checks and runs the operation of this module. The
/// device writes the rest (`describe`, `alloc`, `len`, `upload`, `download`, `synchronize`,
/// `memory`, `reset_peak`).
macro_rules! kernel_ops {
    () => {
        fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf, len: usize) -> Result<()> {
            $crate::ops::copy(self, src, dst, len)
        }

        fn fill(&self, dst: &mut Self::Buf, len: usize, value: f32) -> Result<()> {
            $crate::ops::fill(self, dst, len, value)
        }

        fn add(&self, y: &mut Self::Buf, x: &Self::Buf, len: usize) -> Result<()> {
            $crate::ops::add(self, y, x, len)
        }

        fn linear(
            &self,
            x: &Self::Buf,
            w: &Self::Buf,
            bias: Option<&Self::Buf>,
            m: usize,
            k: usize,
            n: usize,
            y: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::linear(self, x, w, bias, m, k, n, y, accumulate)
        }

        fn linear_vjp(
            &self,
            dy: &Self::Buf,
            w: &Self::Buf,
            m: usize,
            k: usize,
            n: usize,
            dx: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::linear_vjp(self, dy, w, m, k, n, dx, accumulate)
        }

        fn linear_wgrad(
            &self,
            dy: &Self::Buf,
            x: &Self::Buf,
            m: usize,
            k: usize,
            n: usize,
            dw: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::linear_wgrad(self, dy, x, m, k, n, dw, accumulate)
        }

        fn sum_rows(
            &self,
            dy: &Self::Buf,
            m: usize,
            n: usize,
            db: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::sum_rows(self, dy, m, n, db, accumulate)
        }

        fn layer_norm(
            &self,
            x: &Self::Buf,
            gamma: &Self::Buf,
            beta: &Self::Buf,
            rows: usize,
            d: usize,
            eps: f32,
            y: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::layer_norm(self, x, gamma, beta, rows, d, eps, y)
        }

        fn layer_norm_vjp(
            &self,
            x: &Self::Buf,
            gamma: &Self::Buf,
            dy: &Self::Buf,
            rows: usize,
            d: usize,
            eps: f32,
            dx: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::layer_norm_vjp(self, x, gamma, dy, rows, d, eps, dx, accumulate)
        }

        fn gelu(&self, x: &Self::Buf, len: usize, y: &mut Self::Buf) -> Result<()> {
            $crate::ops::gelu(self, x, len, y)
        }

        fn gelu_vjp(&self, u: &Self::Buf, len: usize, g: &mut Self::Buf) -> Result<()> {
            $crate::ops::gelu_vjp(self, u, len, g)
        }

        fn attention(
            &self,
            qkv: &Self::Buf,
            shape: dtl_kernels::AttnShape,
            out: &mut Self::Buf,
            scratch: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::attention(self, qkv, shape, out, scratch)
        }

        fn attention_vjp(
            &self,
            qkv: &Self::Buf,
            dout: &Self::Buf,
            shape: dtl_kernels::AttnShape,
            dqkv: &mut Self::Buf,
            scratch: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::attention_vjp(self, qkv, dout, shape, dqkv, scratch)
        }

        fn attention_bias(
            &self,
            qkv: &Self::Buf,
            shape: dtl_kernels::AttnShape,
            bias: &Self::Buf,
            groups: usize,
            out: &mut Self::Buf,
            scratch: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::attention_bias(self, qkv, shape, bias, groups, out, scratch)
        }

        fn attention_bias_vjp(
            &self,
            qkv: &Self::Buf,
            dout: &Self::Buf,
            shape: dtl_kernels::AttnShape,
            bias: &Self::Buf,
            groups: usize,
            dqkv: &mut Self::Buf,
            scratch: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::attention_bias_vjp(self, qkv, dout, shape, bias, groups, dqkv, scratch)
        }

        fn window_partition(
            &self,
            x: &Self::Buf,
            shape: dtl_kernels::WindowShape,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::window_partition(self, x, shape, out)
        }

        fn window_merge(
            &self,
            x: &Self::Buf,
            shape: dtl_kernels::WindowShape,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::window_merge(self, x, shape, out)
        }

        fn patch_merge(
            &self,
            x: &Self::Buf,
            shape: dtl_kernels::MergeShape,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::patch_merge(self, x, shape, out)
        }

        fn patch_merge_vjp(
            &self,
            dy: &Self::Buf,
            shape: dtl_kernels::MergeShape,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::patch_merge_vjp(self, dy, shape, dx)
        }

        fn attention_scratch(&self, shape: dtl_kernels::AttnShape) -> usize {
            $crate::ops::attention_scratch_on(self, shape)
        }

        fn add_scaled(
            &self,
            x: &mut Self::Buf,
            branch: &Self::Buf,
            batch: usize,
            per_sample: usize,
            scales: Option<&Self::Buf>,
        ) -> Result<()> {
            $crate::ops::add_scaled(self, x, branch, batch, per_sample, scales)
        }

        fn scaled(
            &self,
            g: &Self::Buf,
            batch: usize,
            per_sample: usize,
            scales: Option<&Self::Buf>,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::scaled(self, g, batch, per_sample, scales, out)
        }

        fn patchify(
            &self,
            images: &Self::Buf,
            batch: usize,
            channels: usize,
            size: usize,
            patch: usize,
            cols: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::patchify(self, images, batch, channels, size, patch, cols)
        }

        fn assemble_tokens(
            &self,
            patches: &Self::Buf,
            prefix_tokens: &Self::Buf,
            pos: &Self::Buf,
            batch: usize,
            prefix: usize,
            patches_per_sample: usize,
            d: usize,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::assemble_tokens(
                self,
                patches,
                prefix_tokens,
                pos,
                batch,
                prefix,
                patches_per_sample,
                d,
                out,
            )
        }

        fn swish(&self, z: &Self::Buf, len: usize, beta: f32, y: &mut Self::Buf) -> Result<()> {
            $crate::ops::swish(self, z, len, beta, y)
        }

        fn swish_vjp(
            &self,
            z: &Self::Buf,
            dy: &Self::Buf,
            len: usize,
            beta: f32,
            dz: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::swish_vjp(self, z, dy, len, beta, dz, accumulate)
        }

        fn depthwise_conv(
            &self,
            x: &Self::Buf,
            w: &Self::Buf,
            shape: dtl_kernels::ConvShape,
            y: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::depthwise_conv(self, x, w, shape, y)
        }

        fn depthwise_conv_vjp(
            &self,
            x: &Self::Buf,
            w: &Self::Buf,
            dy: &Self::Buf,
            shape: dtl_kernels::ConvShape,
            dx: &mut Self::Buf,
            dw: &mut Self::Buf,
            accumulate_dw: bool,
        ) -> Result<()> {
            $crate::ops::depthwise_conv_vjp(self, x, w, dy, shape, dx, dw, accumulate_dw)
        }

        fn mean_tokens(
            &self,
            x: &Self::Buf,
            batch: usize,
            tokens: usize,
            d: usize,
            from: usize,
            to: usize,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::mean_tokens(self, x, batch, tokens, d, from, to, out)
        }

        fn mean_tokens_vjp(
            &self,
            g: &Self::Buf,
            batch: usize,
            tokens: usize,
            d: usize,
            from: usize,
            to: usize,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::mean_tokens_vjp(self, g, batch, tokens, d, from, to, dx)
        }

        fn soft_cross_entropy(
            &self,
            logits: &Self::Buf,
            targets: &Self::Buf,
            batch: usize,
            classes: usize,
            loss: &mut Self::Buf,
            grad: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::soft_cross_entropy(self, logits, targets, batch, classes, loss, grad)
        }

        fn eval_stats(
            &self,
            logits: &Self::Buf,
            labels: &Self::Buf,
            batch: usize,
            classes: usize,
            stats: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::eval_stats(self, logits, labels, batch, classes, stats)
        }

        fn sum_squares(&self, x: &Self::Buf, len: usize, acc: &mut Self::Buf) -> Result<()> {
            $crate::ops::sum_squares(self, x, len, acc)
        }

        fn adamw(
            &self,
            param: &mut Self::Buf,
            grad: &Self::Buf,
            m: &mut Self::Buf,
            v: &mut Self::Buf,
            len: usize,
            step: &dtl_kernels::AdamwStep,
            clip: Option<(&Self::Buf, f32)>,
        ) -> Result<()> {
            $crate::ops::adamw(self, param, grad, m, v, len, step, clip)
        }

        fn adamw_from(
            &self,
            param: &mut Self::Buf,
            grad: &Self::Buf,
            m: &mut Self::Buf,
            v: &mut Self::Buf,
            len: usize,
            scalars: &Self::Buf,
            index: usize,
            clip: Option<(&Self::Buf, f32)>,
        ) -> Result<()> {
            $crate::ops::adamw_from(self, param, grad, m, v, len, scalars, index, clip)
        }
    };
}
pub(crate) use kernel_ops;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_enum_follows_the_entry_point_list() {
        let all = [
            K::Fill,
            K::Add,
            K::BiasRows,
            K::SumRows,
            K::Gelu,
            K::GeluVjp,
            K::Swish,
            K::SwishVjp,
            K::AddScaled,
            K::Scaled,
            K::LayerNorm,
            K::LayerNormVjp,
            K::SplitQkv,
            K::SplitHeads,
            K::MergeHeads,
            K::MergeQkv,
            K::Softmax,
            K::SoftmaxVjp,
            K::Patchify,
            K::AssembleTokens,
            K::WindowPartition,
            K::PatchMerge,
            K::Dwconv,
            K::DwconvDx,
            K::DwconvDw,
            K::MeanTokens,
            K::MeanTokensVjp,
            K::SoftCrossEntropy,
            K::EvalStats,
            K::SumSquaresPartial,
            K::SumSquaresFinal,
            K::Adamw,
            K::AdamwFrom,
            K::Convert,
            K::AttnFused,
            K::AttnFusedDq,
            K::AttnFusedDkv,
        ];
        assert_eq!(all.len(), crate::KERNEL_NAMES.len());
        for (i, k) in all.iter().enumerate() {
            assert_eq!(*k as usize, i);
            // `SumSquaresPartial` is `dtl_sum_squares_partial`: compare without underscores.
            let name = crate::KERNEL_NAMES[i]
                .trim_start_matches("dtl_")
                .replace('_', "");
            let variant = format!("{k:?}").to_lowercase();
            let variant = match variant.as_str() {
                "softmax" => "softmaxrows".to_string(),
                "softmaxvjp" => "softmaxrowsvjp".to_string(),
                _ => variant,
            };
            assert_eq!(name, variant, "entry {i}");
        }
    }

    #[test]
    fn bf16_rounding_storage_masks_and_f32_only_kernels() {
        // to nearest, ties to even, NaN kept quiet, overflow to infinity
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even below
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, even above
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80);
        assert_eq!(bf16_bits(-0.0), 0x8000);
        assert!(f32_from_bf16(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(f32_from_bf16(0xbf80), -1.0);
        // bit j for argument j, pointers only
        let args = [
            Arg::P(Dp::bf16(8)),
            Arg::I(3),
            Arg::P(Dp::f32(16)),
            Arg::P(Dp::bf16(24)),
        ];
        assert_eq!(storage_mask(&args), Arg::I(0b1001));
        assert_eq!(Dp::bf16(100).at(3).addr, 106);
        assert_eq!(Dp::f32(100).at(3).addr, 112);
        assert!(check_storage("op", "k", true, &args).is_ok());
        let e = check_storage("op", "k", false, &args)
            .unwrap_err()
            .to_string();
        assert!(e.contains("op: k") && e.contains("f32"), "{e}");
        assert!(check_storage("op", "k", false, &[Arg::P(Dp::f32(8))]).is_ok());
        // every kernel of kernels.cu takes the storage
        let flags = crate::nvrtc::takes_storage();
        for (i, name) in crate::KERNEL_NAMES.iter().enumerate() {
            if !name.starts_with("dtl_attn_fused") {
                assert!(flags[i], "{name} has no `int st` parameter");
            }
        }
    }

    #[test]
    fn kept_memory_waits_for_the_last_graph() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static FREED: AtomicUsize = AtomicUsize::new(0);
        struct M;
        impl Drop for M {
            fn drop(&mut self) {
                FREED.fetch_add(1, Ordering::Relaxed);
            }
        }
        let keep = Keep::new();
        keep.drop_or_keep(M);
        assert_eq!(FREED.load(Ordering::Relaxed), 1);
        keep.hold();
        keep.hold();
        keep.drop_or_keep(M);
        keep.unhold();
        assert_eq!(FREED.load(Ordering::Relaxed), 1);
        keep.unhold();
        assert_eq!(FREED.load(Ordering::Relaxed), 2);
        keep.hold();
        keep.drop_or_keep(M);
        keep.clear();
        assert_eq!(FREED.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn launch_shapes_stay_within_cuda_limits() {
        let e = elementwise(1);
        assert_eq!((e.grid_dim.0, e.block_dim.0), (1, THREADS));
        assert_eq!(elementwise(usize::MAX / 2).grid_dim.0 as usize, MAX_BLOCKS);
        assert_eq!(elementwise(0).grid_dim.0, 1);
        assert_eq!(block_rows(10, 768).block_dim.0, 256);
        assert_eq!(block_rows(10, 5).block_dim.0, 32);
        assert_eq!(warp_rows(9).grid_dim.0, 3);
    }

    #[test]
    fn attention_scratch_plan() {
        let s = AttnShape {
            batch: 2,
            tokens: 5,
            heads: 3,
            head_dim: 4,
        };
        let p = AttnPlan::new(&s).unwrap();
        assert_eq!(
            p,
            AttnPlan {
                slot: 120,
                probs: 150
            }
        );
        assert_eq!(p.total(), Some(4 * 120 + 2 * 150));
        assert_eq!(attention_scratch(s), 4 * 120 + 2 * 150);
        assert_eq!(p.offsets()[5], 4 * 120 + 150);
        let huge = AttnShape {
            batch: usize::MAX,
            tokens: 2,
            heads: 1,
            head_dim: 1,
        };
        assert_eq!(AttnPlan::new(&huge), None);
        assert_eq!(attention_scratch(huge), usize::MAX);
        let big = AttnShape {
            batch: 1 << 20,
            tokens: 197,
            heads: 12,
            head_dim: 64,
        };
        let e = attn_plan("attention", &big).unwrap_err().to_string();
        assert!(e.contains("32-bit"), "{e}");
    }

    #[test]
    fn window_and_merge_shape_checks() {
        let s = WindowShape {
            batch: 2,
            grid: (8, 12),
            width: 5,
            window: (4, 3),
            shift: (2, 1),
        };
        assert_eq!(window_len("w", &s).unwrap(), 2 * 8 * 12 * 5);
        for (bad, part) in [
            (WindowShape { grid: (8, 10), ..s }, "whole number"),
            (WindowShape { shift: (4, 0), ..s }, "smaller"),
            (
                WindowShape {
                    window: (4, 0),
                    ..s
                },
                "side of 0",
            ),
        ] {
            let e = window_len("w", &bad).unwrap_err().to_string();
            assert!(e.contains("w: ") && e.contains(part), "{e}");
        }
        let big = WindowShape {
            batch: 1 << 20,
            grid: (56, 56),
            width: 96,
            window: (7, 7),
            shift: (3, 3),
        };
        assert!(window_len("w", &big)
            .unwrap_err()
            .to_string()
            .contains("32-bit"));
        let m = MergeShape {
            batch: 2,
            grid: (4, 6),
            width: 3,
        };
        assert_eq!(merge_len("m", &m).unwrap(), 2 * 4 * 6 * 3);
        let e = merge_len("m", &MergeShape { grid: (4, 5), ..m })
            .unwrap_err()
            .to_string();
        assert!(e.contains("4x5") && e.contains("odd"), "{e}");
    }

    #[test]
    fn conv_shape_checks() {
        let s = ConvShape {
            batch: 2,
            prefix: 1,
            grid: (3, 4),
            width: 5,
            kernel: 4,
        };
        assert_eq!(conv_lens("c", &s).unwrap(), (2 * 13 * 5, 5 * 16));
        let e = conv_lens("c", &ConvShape { kernel: 0, ..s })
            .unwrap_err()
            .to_string();
        assert!(e.contains("kernel side is 0"), "{e}");
        assert!(token_range("m", 5, 1, 5).is_ok());
        assert!(token_range("m", 5, 2, 2).is_err());
        assert!(token_range("m", 5, 1, 6).is_err());
    }
}
