//! Fused attention: the forward and the input-only VJP of [`dtl_kernels::Kernels::attention`]
//! (and its biased form) as three kernels of `attention.cu` that never write the
//! `tokens x tokens` scores to device memory (see docs/cuda.md, "Fused attention").
//!
//! The forward runs `dtl_attn_fused` (an online softmax over tiles of 32 keys) and keeps the
//! log-sum-exp of every score row in the scratch. The VJP recomputes the output and those
//! statistics with the same kernel (the scratch of a forward is not assumed to survive until its
//! VJP), then `dtl_attn_fused_dq` (`D = rowsum(dO * O)` and dQ) and `dtl_attn_fused_dkv` (dK and
//! dV, one block owning its keys: no atomics, a fixed order of every sum).

#![allow(clippy::too_many_arguments)]

use cudarc::driver::LaunchConfig;
use dtl_core::{DtlError, Result};
use dtl_kernels::{checked_product, AttnShape};

use crate::ops::{invalid, n32, Arg, Dp, Exec, K};

/// Threads per block of the fused kernels (`DTL_ATTN_THREADS`).
const THREADS: u32 = 128;
/// The largest head dimension the fused kernels take (`DTL_ATTN_MAX_HD`).
pub(crate) const MAX_HEAD_DIM: usize = 128;
/// Query rows per block of the forward (`DTL_ATTN_WARPS * DTL_ATTN_FWD_ROWS`).
const FWD_ROWS: usize = 16;
/// Query rows per block of the dQ kernel (`DTL_ATTN_WARPS * DTL_ATTN_DQ_ROWS`).
const DQ_ROWS: usize = 8;
/// Keys per block of the dK/dV kernel (`DTL_ATTN_WARPS * DTL_ATTN_DKV_KEYS`).
const DKV_KEYS: usize = 8;

/// Which attention kernels a device runs for [`dtl_kernels::Kernels::attention`],
/// [`dtl_kernels::Kernels::attention_bias`] and their VJPs.
///
/// Read from the environment variable `DTL_ATTENTION` (`fused` or `unfused`; unset or empty
/// means [`AttentionKernels::Unfused`]) when a [`crate::Gpu`] or an [`crate::Emulator`] is
/// opened, and changed with [`crate::DeviceSettings::set_attention`]. The default stays
/// `Unfused` until the fused kernels have been measured faster on a GPU. A shape the fused
/// kernels cannot take (a head dimension above 128) runs unfused whatever is selected, and
/// [`dtl_kernels::Kernels::attention_scratch`] sizes the scratch for the path that runs.
///
/// ```
/// use dtl_cuda::AttentionKernels;
/// assert_eq!(AttentionKernels::parse("fused").unwrap(), AttentionKernels::Fused);
/// assert_eq!(AttentionKernels::default(), AttentionKernels::Unfused);
/// assert!(AttentionKernels::parse("flash").unwrap_err().to_string().contains("DTL_ATTENTION"));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AttentionKernels {
    /// Per-head q, k, v, cuBLAS products for the scores and the output, and a softmax kernel;
    /// the scratch holds the `(batch, heads, tokens, tokens)` probabilities and their gradient.
    #[default]
    Unfused,
    /// The fused kernels of `attention.cu`: the scores stay in registers and shared memory.
    Fused,
}

impl AttentionKernels {
    /// The environment variable read when a device opens.
    ///
    /// ```
    /// assert_eq!(dtl_cuda::AttentionKernels::ENV, "DTL_ATTENTION");
    /// ```
    pub const ENV: &'static str = "DTL_ATTENTION";

    /// The selection named `name` (`fused` or `unfused`, any case, surrounding blanks
    /// ignored), or an error naming `DTL_ATTENTION` and the valid values.
    ///
    /// ```
    /// use dtl_cuda::AttentionKernels;
    /// assert_eq!(AttentionKernels::parse(" Unfused ").unwrap(), AttentionKernels::Unfused);
    /// ```
    pub fn parse(name: &str) -> Result<AttentionKernels> {
        match name.trim().to_ascii_lowercase().as_str() {
            "fused" => Ok(AttentionKernels::Fused),
            "unfused" => Ok(AttentionKernels::Unfused),
            other => Err(DtlError::invalid(format!(
                "{}: `{other}` is not an attention implementation; use `fused` or `unfused`",
                Self::ENV
            ))),
        }
    }

    /// The selection of the environment variable `DTL_ATTENTION`: unset or empty is
    /// [`AttentionKernels::Unfused`], anything else as [`AttentionKernels::parse`].
    ///
    /// ```
    /// let k = dtl_cuda::AttentionKernels::from_env();
    /// assert!(k.is_ok() || std::env::var("DTL_ATTENTION").is_ok());
    /// ```
    pub fn from_env() -> Result<AttentionKernels> {
        match std::env::var(Self::ENV) {
            Ok(v) if !v.trim().is_empty() => Self::parse(&v),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(AttentionKernels::Unfused),
            Err(std::env::VarError::NotUnicode(_)) => Err(DtlError::invalid(format!(
                "{}: the value is not UTF-8; use `fused` or `unfused`",
                Self::ENV
            ))),
        }
    }

    /// The name [`AttentionKernels::parse`] reads.
    ///
    /// ```
    /// use dtl_cuda::AttentionKernels;
    /// assert_eq!(AttentionKernels::Fused.name(), "fused");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            AttentionKernels::Unfused => "unfused",
            AttentionKernels::Fused => "fused",
        }
    }
}

/// Whether the fused kernels take `s` (every head dimension from 1 to [`MAX_HEAD_DIM`]; the
/// 32-bit ranges are checked by the operations).
pub(crate) fn supports(s: &AttnShape) -> bool {
    (1..=MAX_HEAD_DIM).contains(&s.head_dim)
}

/// Scratch layout of the fused path: first the log-sum-exp and `D = rowsum(dO * O)` of every
/// score row, `(batch, heads, tokens)` each, in f32 whatever the scratch's storage (`8 rows`
/// bytes); then, in the scratch's storage, the recomputed output `(batch * tokens, width)` (used
/// by the VJP only). `slot + 4 rows` values hold that in f32 and in bf16 storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FusedPlan {
    /// Values of one `(batch * tokens, width)` block.
    pub slot: usize,
    /// Score rows, `batch * heads * tokens`.
    pub rows: usize,
}

impl FusedPlan {
    pub fn new(s: &AttnShape) -> Option<FusedPlan> {
        let rows = s.batch.checked_mul(s.heads)?.checked_mul(s.tokens)?;
        let slot = rows.checked_mul(s.head_dim)?;
        Some(FusedPlan { slot, rows })
    }

    /// Values the forward and the VJP need.
    pub fn total(&self) -> Option<usize> {
        self.slot.checked_add(self.rows.checked_mul(4)?)
    }

    /// The statistics (f32) and the output slot (the scratch's storage) in the scratch `sp`.
    pub fn parts(&self, sp: Dp) -> (Dp, Dp, Dp) {
        let lse = Dp::f32(sp.addr);
        let dd = Dp::f32(sp.addr + 4 * self.rows as u64);
        (lse, dd, sp.at(8 * self.rows / sp.elem()))
    }
}

/// Values of the fused path's scratch for `shape` (`usize::MAX` when that overflows).
pub(crate) fn scratch(shape: &AttnShape) -> usize {
    FusedPlan::new(shape)
        .and_then(|p| p.total())
        .unwrap_or(usize::MAX)
}

/// Checks the shape, every buffer and the 32-bit ranges shared by the forward and the VJP:
/// `(plan, qkv values, bias pointer or 0, bias_heads)`.
fn check<E: Exec>(
    op: &str,
    e: &E,
    s: &AttnShape,
    bias: Option<(&E::Buf, usize)>,
) -> Result<(FusedPlan, usize, Dp, i32)> {
    if !supports(s) && s.head_dim != 0 {
        return Err(invalid(
            op,
            format!(
                "the fused attention takes head dimensions 1 to {MAX_HEAD_DIM}, not {}",
                s.head_dim
            ),
        ));
    }
    let plan =
        FusedPlan::new(s).ok_or_else(|| invalid(op, format!("the sizes of {s:?} overflow")))?;
    let nqkv = checked_product(op, &[plan.slot, 3])?;
    if plan.slot > 0 {
        n32(op, "the qkv values", nqkv)?;
        n32(op, "batch * heads", s.batch * s.heads)?;
        // the grid's y extent: tiles of 8 keys
        if s.tokens.div_ceil(DKV_KEYS) > 65_535 {
            return Err(invalid(
                op,
                format!(
                    "{} tokens are more than the fused attention's grid takes ({})",
                    s.tokens,
                    65_535 * DKV_KEYS
                ),
            ));
        }
    }
    let (bp, bias_heads) = match bias {
        None => (Dp::f32(0), 1),
        Some((b, groups)) => {
            if groups == 0 {
                return Err(invalid(op, "the bias has 0 groups; it needs at least 1"));
            }
            let heads = checked_product(op, &[groups, s.heads])?;
            let len = checked_product(op, &[heads, s.tokens, s.tokens])?;
            let p = e.src(op, "bias", b, len)?;
            if plan.slot > 0 {
                n32(op, "the bias values", len)?;
            }
            // heads <= len when there is work: it fits too
            (p, heads.min(i32::MAX as usize).max(1) as i32)
        }
    };
    Ok((plan, nqkv, bp, bias_heads))
}

fn grid(s: &AttnShape, per_block: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (s.batch * s.heads) as u32,
            s.tokens.div_ceil(per_block) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dims(s: &AttnShape) -> [Arg; 4] {
    [
        Arg::I(s.batch as i32),
        Arg::I(s.tokens as i32),
        Arg::I(s.heads as i32),
        Arg::I(s.head_dim as i32),
    ]
}

/// The fused forward: `out` and, in the scratch's statistics, the log-sum-exp of every row.
pub(crate) fn attention<E: Exec>(
    op: &str,
    e: &E,
    qkv: &E::Buf,
    shape: AttnShape,
    bias: Option<(&E::Buf, usize)>,
    out: &mut E::Buf,
    scratch: &mut E::Buf,
) -> Result<()> {
    let (plan, nqkv, bp, bias_heads) = check(op, e, &shape, bias)?;
    let qp = e.src(op, "qkv", qkv, nqkv)?;
    let outp = e.dst(op, "out", out, plan.slot)?;
    let need = plan
        .total()
        .ok_or_else(|| invalid(op, "the scratch size overflows"))?;
    let sp = e.dst(op, "scratch", scratch, need)?;
    if plan.slot == 0 {
        return Ok(());
    }
    let (lse, _, _) = plan.parts(sp);
    // SAFETY: qkv holds batch * tokens rows of 3 width values, out batch * tokens rows of
    // width, the scratch the statistics at its start (`FusedPlan::parts`, checked above, in
    // bytes that fit f32 and bf16 storage alike); the bias, when not
    // null, bias_heads matrices of tokens x tokens; every count fits i32 (check).
    unsafe { launch_forward(op, e, &shape, qp, bp, outp, lse, bias_heads) }
}

/// Launches the forward kernel: the output into `out` and the log-sum-exp of every row into
/// `lse`.
///
/// # Safety
/// The pointers hold what [`attention`] checks for `shape`; `bias_heads` is 1 without a bias.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_forward<E: Exec>(
    op: &str,
    e: &E,
    shape: &AttnShape,
    qp: Dp,
    bp: Dp,
    out: Dp,
    lse: Dp,
    bias_heads: i32,
) -> Result<()> {
    let [b, n, h, d] = dims(shape);
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    // SAFETY: as the caller promises.
    unsafe {
        e.launch(
            op,
            K::AttnFused,
            grid(shape, FWD_ROWS),
            &[
                Arg::P(qp),
                Arg::P(bp),
                Arg::P(out),
                Arg::P(lse),
                b,
                n,
                h,
                d,
                Arg::I(bias_heads),
                Arg::F(scale),
            ],
        )
    }
}

/// The fused input-only VJP: `dqkv` (every value written) from `dout`.
pub(crate) fn attention_vjp<E: Exec>(
    op: &str,
    e: &E,
    qkv: &E::Buf,
    dout: &E::Buf,
    shape: AttnShape,
    bias: Option<(&E::Buf, usize)>,
    dqkv: &mut E::Buf,
    scratch: &mut E::Buf,
) -> Result<()> {
    let (plan, nqkv, bp, bias_heads) = check(op, e, &shape, bias)?;
    let qp = e.src(op, "qkv", qkv, nqkv)?;
    let dop = e.src(op, "dout", dout, plan.slot)?;
    let dqp = e.dst(op, "dqkv", dqkv, nqkv)?;
    let need = plan
        .total()
        .ok_or_else(|| invalid(op, "the scratch size overflows"))?;
    let sp = e.dst(op, "scratch", scratch, need)?;
    if plan.slot == 0 {
        return Ok(());
    }
    let (lse, dd, o) = plan.parts(sp);
    let [b, n, h, d] = dims(&shape);
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    // SAFETY: as in `attention`, plus dout holds batch * tokens rows of width values, dqkv
    // rows of 3 width, and the scratch the output slot and both statistics (checked above).
    unsafe {
        launch_forward(op, e, &shape, qp, bp, o, lse, bias_heads)?;
        e.launch(
            op,
            K::AttnFusedDq,
            grid(&shape, DQ_ROWS),
            &[
                Arg::P(qp),
                Arg::P(bp),
                Arg::P(o),
                Arg::P(dop),
                Arg::P(lse),
                Arg::P(dd),
                Arg::P(dqp),
                b,
                n,
                h,
                d,
                Arg::I(bias_heads),
                Arg::F(scale),
            ],
        )?;
        e.launch(
            op,
            K::AttnFusedDkv,
            grid(&shape, DKV_KEYS),
            &[
                Arg::P(qp),
                Arg::P(bp),
                Arg::P(dop),
                Arg::P(lse),
                Arg::P(dd),
                Arg::P(dqp),
                b,
                n,
                h,
                d,
                Arg::I(bias_heads),
                Arg::F(scale),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_selection_and_names_the_variable() {
        assert_eq!(
            AttentionKernels::parse("FUSED").unwrap(),
            AttentionKernels::Fused
        );
        for k in [AttentionKernels::Fused, AttentionKernels::Unfused] {
            assert_eq!(AttentionKernels::parse(k.name()).unwrap(), k);
        }
        let e = AttentionKernels::parse("flash").unwrap_err().to_string();
        assert!(
            e.contains("DTL_ATTENTION") && e.contains("`fused` or `unfused`"),
            "{e}"
        );
    }

    #[test]
    fn scratch_holds_one_output_and_two_statistics() {
        let s = AttnShape {
            batch: 2,
            tokens: 5,
            heads: 3,
            head_dim: 4,
        };
        assert_eq!(scratch(&s), 2 * 5 * 3 * 4 + 4 * 2 * 3 * 5);
        let plan = FusedPlan::new(&s).unwrap();
        for sp in [Dp::f32(1024), Dp::bf16(1024)] {
            let (lse, dd, o) = plan.parts(sp);
            assert!(!lse.bf16 && !dd.bf16 && o.bf16 == sp.bf16);
            assert_eq!((lse.addr, dd.addr, o.addr), (1024, 1024 + 120, 1024 + 240));
            // the output slot ends within the scratch's values
            let end = o.addr + (plan.slot * sp.elem()) as u64;
            assert!(end <= sp.addr + (plan.total().unwrap() * sp.elem()) as u64);
        }
        let huge = AttnShape {
            batch: usize::MAX,
            tokens: 2,
            heads: 1,
            head_dim: 1,
        };
        assert_eq!(scratch(&huge), usize::MAX);
        assert!(supports(&s));
        assert!(!supports(&AttnShape {
            head_dim: MAX_HEAD_DIM + 1,
            ..s
        }));
    }

    #[test]
    fn launch_shapes_match_the_kernels() {
        let src = crate::nvrtc::KERNEL_SOURCE;
        for (name, v) in [
            ("DTL_ATTN_WARPS 4", 4),
            ("DTL_ATTN_MAX_HD 128", MAX_HEAD_DIM),
            ("DTL_ATTN_FWD_ROWS 4", FWD_ROWS / 4),
            ("DTL_ATTN_DQ_ROWS 2", DQ_ROWS / 4),
            ("DTL_ATTN_DKV_KEYS 2", DKV_KEYS / 4),
        ] {
            assert!(src.contains(&format!("#define {name}")), "{name} ({v})");
        }
        assert_eq!(THREADS, 32 * 4);
        let s = AttnShape {
            batch: 3,
            tokens: 197,
            heads: 12,
            head_dim: 64,
        };
        let g = grid(&s, FWD_ROWS);
        assert_eq!((g.grid_dim.0, g.grid_dim.1), (36, 13));
    }
}
