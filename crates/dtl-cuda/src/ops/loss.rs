//! Pooling over tokens, the soft-target cross entropy and the evaluation statistics.

use dtl_core::Result;
use dtl_kernels::checked_product;

use super::{elementwise, fill_ptr, invalid, n32, single_block, Arg, Exec, K};

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

/// Checks the token range of a pooling.
pub(super) fn token_range(op: &str, tokens: usize, from: usize, to: usize) -> Result<()> {
    if from >= to || to > tokens {
        return Err(invalid(
            op,
            format!("the token range {from}..{to} is empty or outside the {tokens} tokens"),
        ));
    }
    Ok(())
}
