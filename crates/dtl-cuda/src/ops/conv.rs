//! The depthwise convolution over the patch-token grid and its VJP.

use cudarc::driver::LaunchConfig;
use dtl_core::Result;
use dtl_kernels::{checked_product, ConvShape};

use super::{elementwise, invalid, n32, Arg, Dp, Exec, K};

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

/// Checks a depthwise convolution's shape: `(token tensor values, weight values)`.
pub(super) fn conv_lens(op: &str, s: &ConvShape) -> Result<(usize, usize)> {
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
