//! Multi-head attention, plain and with a score bias, and their input-only VJPs: the unfused
//! path's scratch plan and kernels, or the fused kernels where the device selects them.

use dtl_core::Result;
use dtl_kernels::{checked_product, AttnShape};

use crate::blas::Gemm;

use super::{elementwise, invalid, n32, warp_rows, Arg, Dp, Exec, K};

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

/// Checks an attention shape: its plan and the values of the fused `qkv`, all in 32 bits.
pub(super) fn attn_plan(op: &str, s: &AttnShape) -> Result<(AttnPlan, usize)> {
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
