//! Copies, fills and additions of buffers, and the linears: the product, its input-only VJP,
//! the weight gradient and the bias gradient (`sum_rows`).

use cudarc::driver::LaunchConfig;
use dtl_core::Result;
use dtl_kernels::checked_product;

use crate::blas::Gemm;
use crate::lt::GemmEpilogue;

use super::{elementwise, n32, Arg, Dp, Exec, K};

pub(super) fn fill_ptr<E: Exec>(e: &E, op: &str, p: Dp, n: usize, value: f32) -> Result<()> {
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
pub(super) fn copy_ptr<E: Exec>(e: &E, op: &str, src: Dp, dst: Dp, n: usize) -> Result<()> {
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
