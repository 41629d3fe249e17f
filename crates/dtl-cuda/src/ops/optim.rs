//! The optimizer's kernels: the sum of squares of gradients and the AdamW step.

use cudarc::driver::LaunchConfig;
use dtl_core::Result;
use dtl_kernels::AdamwStep;

use super::{elementwise, invalid, n32, single_block, Arg, Dp, Exec, K, PARTIALS, THREADS};

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
