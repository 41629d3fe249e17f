//! Layer norm, the GELU and swish activations with their VJPs, and the per-sample scaling of
//! stochastic depth (`add_scaled`, `scaled`).

use dtl_core::Result;
use dtl_kernels::checked_product;

use super::{block_rows, copy_ptr, elementwise, n32, Arg, Exec, K};

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
