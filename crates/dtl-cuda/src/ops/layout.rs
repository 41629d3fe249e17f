//! The shuffles of token tensors: patches of images, the token sequence of a ViT, Swin's
//! shifted windows and its patch merging.

use dtl_core::Result;
use dtl_kernels::{checked_product, MergeShape, WindowShape};

use super::{elementwise, invalid, n32, Arg, Exec, K};

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
pub(super) fn window_len(op: &str, s: &WindowShape) -> Result<usize> {
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
pub(super) fn merge_len(op: &str, s: &MergeShape) -> Result<usize> {
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
