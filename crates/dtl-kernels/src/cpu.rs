//! The kernel set on the CPU: [`CpuKernels`] over [`CpuBuf`] host buffers.
//!
//! The loops themselves live in [`ops`] (products, LayerNorm, GELU, attention, residuals,
//! patch embedding) and [`side`] (side network, pooling, loss, optimizer); [`strided`] holds
//! the one call into the `gemm` crate. [`CpuKernels`] checks every size and buffer length,
//! then runs them on the leading values of its buffers.
//!
//! ```
//! use dtl_kernels::{CpuBuf, CpuKernels, Kernels};
//! let k = CpuKernels::new();
//! let z = CpuBuf::from_vec(vec![0.0, 1.0]);
//! let mut y = k.alloc(2).unwrap();
//! k.swish(&z, 2, 1.0, &mut y).unwrap();
//! assert!((y[1] - 0.731_058_6).abs() < 1e-6);
//! ```

use std::ops::{Deref, DerefMut};

use dtl_core::{DtlError, Result};
use rayon::prelude::*;

use crate::{check_len, checked_product, AdamwStep, AttnShape, ConvShape, Kernels};

pub mod ops;
pub mod side;
#[allow(unsafe_code)]
pub mod strided;
pub mod window;

/// A buffer of `f32` values in host memory, the [`Kernels::Buf`] of [`CpuKernels`].
///
/// It dereferences to `[f32]`. Its allocation comes from, and on drop returns to, a small
/// per-thread pool of large buffers ([`ops::scratch`], [`ops::recycle`]), so that an
/// algorithm that allocates its intermediates per call does not map fresh pages from the
/// system each time.
///
/// ```
/// use dtl_kernels::CpuBuf;
/// let mut b = CpuBuf::from_vec(vec![1.0, 2.0]);
/// b[0] = 3.0;
/// assert_eq!(b.as_slice(), &[3.0, 2.0]);
/// assert_eq!(b.into_vec(), vec![3.0, 2.0]);
/// ```
#[derive(Default, PartialEq)]
pub struct CpuBuf(Vec<f32>);

impl CpuBuf {
    /// `len` zeros, from the pool when it holds a large enough allocation.
    ///
    /// ```
    /// let b = dtl_kernels::CpuBuf::zeros(3);
    /// assert_eq!(&b[..], &[0.0; 3]);
    /// ```
    pub fn zeros(len: usize) -> Self {
        CpuBuf(ops::scratch(len))
    }

    /// Wraps `v` (no copy).
    ///
    /// ```
    /// assert_eq!(dtl_kernels::CpuBuf::from_vec(vec![1.0]).len(), 1);
    /// ```
    pub fn from_vec(v: Vec<f32>) -> Self {
        CpuBuf(v)
    }

    /// A buffer holding a copy of `v`.
    ///
    /// ```
    /// assert_eq!(dtl_kernels::CpuBuf::from_slice(&[1.0, 2.0]).as_slice(), &[1.0, 2.0]);
    /// ```
    pub fn from_slice(v: &[f32]) -> Self {
        let mut b = ops::pooled(v.len()).unwrap_or_else(|| Vec::with_capacity(v.len()));
        b.extend_from_slice(v);
        CpuBuf(b)
    }

    /// The values, as a `Vec` (no copy; the allocation leaves the pool's reach).
    ///
    /// ```
    /// assert_eq!(dtl_kernels::CpuBuf::from_vec(vec![1.0]).into_vec(), vec![1.0]);
    /// ```
    pub fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.0)
    }

    /// The values.
    ///
    /// ```
    /// assert_eq!(dtl_kernels::CpuBuf::zeros(2).as_slice(), &[0.0, 0.0]);
    /// ```
    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }

    /// The values, writable.
    ///
    /// ```
    /// let mut b = dtl_kernels::CpuBuf::zeros(1);
    /// b.as_mut_slice()[0] = 2.0;
    /// assert_eq!(b[0], 2.0);
    /// ```
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl Drop for CpuBuf {
    fn drop(&mut self) {
        ops::recycle(std::mem::take(&mut self.0));
    }
}

impl Clone for CpuBuf {
    fn clone(&self) -> Self {
        CpuBuf::from_slice(&self.0)
    }
}

impl std::fmt::Debug for CpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() <= 16 {
            write!(f, "CpuBuf({:?})", self.0)
        } else {
            write!(f, "CpuBuf({} values: {:?} ...)", self.0.len(), &self.0[..8])
        }
    }
}

impl Deref for CpuBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl DerefMut for CpuBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl From<Vec<f32>> for CpuBuf {
    fn from(v: Vec<f32>) -> Self {
        CpuBuf(v)
    }
}

impl From<CpuBuf> for Vec<f32> {
    fn from(b: CpuBuf) -> Self {
        b.into_vec()
    }
}

/// The kernel set on the CPU: the reference every other device is tested against.
///
/// Products run on the `gemm` crate, the rows of their output split over rayon's threads;
/// row-wise work and attention are parallelised with rayon, with AVX-512 or AVX2 + FMA
/// inner loops where the CPU has them. Operations run synchronously, and every sum runs in
/// an order fixed by the sizes and the number of threads, never by the threads' timing.
/// Values agree with the dfdx-based CPU runner's to rounding: the depthwise conv, the mean
/// pooling, the loss and the AdamW update follow its order of operations term by term,
/// while swish uses [`ops::exp_fast`] and a linear layer adds its bias after the product; a
/// clipped update can also differ in the last bit, since [`Kernels::sum_squares`]
/// accumulates the squared norm in f64 where the runner sums each tensor in f32.
///
/// ```
/// use dtl_kernels::{CpuKernels, Kernels};
/// let k = CpuKernels::new();
/// let x = k.upload_new(&[1.0, -1.0]).unwrap();
/// let mut acc = k.alloc(1).unwrap();
/// k.sum_squares(&x, 2, &mut acc).unwrap();
/// assert_eq!(k.download(&acc, 1).unwrap(), vec![2.0]);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuKernels {
    _private: (),
}

impl CpuKernels {
    /// The CPU kernels, on rayon's global thread pool.
    ///
    /// ```
    /// use dtl_kernels::Kernels;
    /// assert!(dtl_kernels::CpuKernels::new().describe().starts_with("cpu"));
    /// ```
    pub const fn new() -> Self {
        CpuKernels { _private: () }
    }
}

/// The leading `n` values of `b`, or an error naming the operation and the buffer.
fn src<'a>(op: &str, name: &str, b: &'a CpuBuf, n: usize) -> Result<&'a [f32]> {
    check_len(op, name, b.len(), n)?;
    Ok(&b[..n])
}

/// The leading `n` values of `b`, writable, or an error naming the operation and the buffer.
fn dst<'a>(op: &str, name: &str, b: &'a mut CpuBuf, n: usize) -> Result<&'a mut [f32]> {
    check_len(op, name, b.len(), n)?;
    Ok(&mut b[..n])
}

fn invalid(op: &str, what: String) -> DtlError {
    DtlError::invalid(format!("{op}: {what}"))
}

/// Checks a depthwise convolution's shape and returns the values per token tensor.
fn conv_len(op: &str, s: &ConvShape) -> Result<usize> {
    if s.kernel == 0 {
        return Err(invalid(op, "the kernel side is 0".into()));
    }
    checked_product(op, &[s.batch, s.prefix + s.grid.0 * s.grid.1, s.width])
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

/// Checks an attention shape and returns `(qkv values, output values)`.
fn attn_lens(op: &str, s: &AttnShape) -> Result<(usize, usize)> {
    let out = checked_product(op, &[s.batch, s.tokens, s.heads, s.head_dim])?;
    let qkv = checked_product(op, &[out, 3])?;
    Ok((qkv, out))
}

/// The end of the kept attention probabilities that start at value `at` (the length a
/// buffer needs for them), checked for overflow.
fn probs_len(op: &str, s: &AttnShape, at: usize) -> Result<usize> {
    let n = checked_product(op, &[s.batch, s.heads, s.tokens, s.tokens])?;
    n.checked_add(at).ok_or_else(|| {
        invalid(
            op,
            format!("probabilities at {at} overflow the buffer length"),
        )
    })
}

#[allow(clippy::too_many_arguments)]
impl Kernels for CpuKernels {
    type Buf = CpuBuf;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn alloc(&self, len: usize) -> Result<CpuBuf> {
        Ok(CpuBuf::zeros(len))
    }

    fn len(&self, buf: &CpuBuf) -> usize {
        buf.0.len()
    }

    fn upload(&self, host: &[f32], dst_buf: &mut CpuBuf) -> Result<()> {
        dst("upload", "dst", dst_buf, host.len())?.copy_from_slice(host);
        Ok(())
    }

    fn upload_new(&self, host: &[f32]) -> Result<CpuBuf> {
        Ok(CpuBuf::from_slice(host))
    }

    fn download(&self, src_buf: &CpuBuf, len: usize) -> Result<Vec<f32>> {
        Ok(src("download", "src", src_buf, len)?.to_vec())
    }

    fn copy(&self, s: &CpuBuf, d: &mut CpuBuf, len: usize) -> Result<()> {
        let s = src("copy", "src", s, len)?;
        dst("copy", "dst", d, len)?.copy_from_slice(s);
        Ok(())
    }

    fn fill(&self, d: &mut CpuBuf, len: usize, value: f32) -> Result<()> {
        dst("fill", "dst", d, len)?.fill(value);
        Ok(())
    }

    fn add(&self, y: &mut CpuBuf, x: &CpuBuf, len: usize) -> Result<()> {
        let x = src("add", "x", x, len)?;
        let y = dst("add", "y", y, len)?;
        y.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(y, x)| {
                for (a, b) in y.iter_mut().zip(x) {
                    *a += b;
                }
            });
        Ok(())
    }

    fn linear(
        &self,
        x: &CpuBuf,
        w: &CpuBuf,
        bias: Option<&CpuBuf>,
        m: usize,
        k: usize,
        n: usize,
        y: &mut CpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "linear";
        let x = src(OP, "x", x, checked_product(OP, &[m, k])?)?;
        let w = src(OP, "w", w, checked_product(OP, &[n, k])?)?;
        let bias = bias.map(|b| src(OP, "bias", b, n)).transpose()?;
        let y = dst(OP, "y", y, checked_product(OP, &[m, n])?)?;
        ops::linear(x, w, bias, m, k, n, y, accumulate);
        Ok(())
    }

    fn linear_vjp(
        &self,
        dy: &CpuBuf,
        w: &CpuBuf,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut CpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "linear_vjp";
        let dy = src(OP, "dy", dy, checked_product(OP, &[m, n])?)?;
        let w = src(OP, "w", w, checked_product(OP, &[n, k])?)?;
        let dx = dst(OP, "dx", dx, checked_product(OP, &[m, k])?)?;
        ops::linear_vjp(dy, w, m, k, n, dx, accumulate);
        Ok(())
    }

    fn linear_wgrad(
        &self,
        dy: &CpuBuf,
        x: &CpuBuf,
        m: usize,
        k: usize,
        n: usize,
        dw: &mut CpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "linear_wgrad";
        let dy = src(OP, "dy", dy, checked_product(OP, &[m, n])?)?;
        let x = src(OP, "x", x, checked_product(OP, &[m, k])?)?;
        let dw = dst(OP, "dw", dw, checked_product(OP, &[n, k])?)?;
        ops::linear_wgrad(dy, x, m, k, n, dw, accumulate);
        Ok(())
    }

    fn sum_rows(
        &self,
        dy: &CpuBuf,
        m: usize,
        n: usize,
        db: &mut CpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "sum_rows";
        let dy = src(OP, "dy", dy, checked_product(OP, &[m, n])?)?;
        let db = dst(OP, "db", db, n)?;
        ops::sum_rows(dy, m, n, db, accumulate);
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &CpuBuf,
        gamma: &CpuBuf,
        beta: &CpuBuf,
        rows: usize,
        d: usize,
        eps: f32,
        y: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "layer_norm";
        let len = checked_product(OP, &[rows, d])?;
        let x = src(OP, "x", x, len)?;
        let gamma = src(OP, "gamma", gamma, d)?;
        let beta = src(OP, "beta", beta, d)?;
        let y = dst(OP, "y", y, len)?;
        ops::layer_norm(x, gamma, beta, d, eps, y);
        Ok(())
    }

    fn layer_norm_vjp(
        &self,
        x: &CpuBuf,
        gamma: &CpuBuf,
        dy: &CpuBuf,
        rows: usize,
        d: usize,
        eps: f32,
        dx: &mut CpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "layer_norm_vjp";
        let len = checked_product(OP, &[rows, d])?;
        let x = src(OP, "x", x, len)?;
        let gamma = src(OP, "gamma", gamma, d)?;
        let dy = src(OP, "dy", dy, len)?;
        let dx = dst(OP, "dx", dx, len)?;
        ops::layer_norm_vjp(x, gamma, dy, d, eps, dx, accumulate);
        Ok(())
    }

    fn gelu(&self, x: &CpuBuf, len: usize, y: &mut CpuBuf) -> Result<()> {
        let x = src("gelu", "x", x, len)?;
        ops::gelu(x, dst("gelu", "y", y, len)?);
        Ok(())
    }

    fn gelu_vjp(&self, u: &CpuBuf, len: usize, g: &mut CpuBuf) -> Result<()> {
        let u = src("gelu_vjp", "u", u, len)?;
        ops::gelu_backward_inplace(u, dst("gelu_vjp", "g", g, len)?);
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CpuBuf,
        shape: AttnShape,
        out: &mut CpuBuf,
        scratch: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "attention";
        let (nqkv, nout) = attn_lens(OP, &shape)?;
        let qkv = src(OP, "qkv", qkv, nqkv)?;
        let out = dst(OP, "out", out, nout)?;
        let heads = dst(OP, "scratch", scratch, nout)?;
        ops::attention(qkv, shape, out, heads);
        Ok(())
    }

    fn attention_vjp(
        &self,
        qkv: &CpuBuf,
        dout: &CpuBuf,
        shape: AttnShape,
        dqkv: &mut CpuBuf,
        scratch: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "attention_vjp";
        let (nqkv, nout) = attn_lens(OP, &shape)?;
        let qkv = src(OP, "qkv", qkv, nqkv)?;
        let dout = src(OP, "dout", dout, nout)?;
        let dqkv = dst(OP, "dqkv", dqkv, nqkv)?;
        let heads = dst(OP, "scratch", scratch, nqkv)?;
        ops::attention_vjp(qkv, dout, shape, dqkv, heads);
        Ok(())
    }

    fn attention_scratch(&self, shape: AttnShape) -> usize {
        ops::attention_scratch_len(shape)
    }

    fn attention_probs_len(shape: AttnShape) -> usize {
        ops::attention_probs_len(shape)
    }

    fn attention_keeping(
        &self,
        qkv: &CpuBuf,
        shape: AttnShape,
        out: &mut CpuBuf,
        scratch: &mut CpuBuf,
        probs: &mut CpuBuf,
        at: usize,
    ) -> Result<()> {
        const OP: &str = "attention_keeping";
        let (nqkv, nout) = attn_lens(OP, &shape)?;
        let np = probs_len(OP, &shape, at)?;
        let qkv = src(OP, "qkv", qkv, nqkv)?;
        let out = dst(OP, "out", out, nout)?;
        let heads = dst(OP, "scratch", scratch, nout)?;
        let probs = &mut dst(OP, "probs", probs, np)?[at..];
        ops::attention_keeping(qkv, shape, out, heads, Some(probs));
        Ok(())
    }

    fn attention_vjp_kept(
        &self,
        qkv: &CpuBuf,
        probs: &CpuBuf,
        at: usize,
        dout: &CpuBuf,
        shape: AttnShape,
        dqkv: &mut CpuBuf,
        scratch: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "attention_vjp_kept";
        let (nqkv, nout) = attn_lens(OP, &shape)?;
        let np = probs_len(OP, &shape, at)?;
        let qkv = src(OP, "qkv", qkv, nqkv)?;
        let probs = &src(OP, "probs", probs, np)?[at..];
        let dout = src(OP, "dout", dout, nout)?;
        let dqkv = dst(OP, "dqkv", dqkv, nqkv)?;
        let heads = dst(OP, "scratch", scratch, nqkv)?;
        ops::attention_vjp_kept(qkv, Some(probs), dout, shape, dqkv, heads);
        Ok(())
    }

    fn add_scaled(
        &self,
        x: &mut CpuBuf,
        branch: &CpuBuf,
        batch: usize,
        per_sample: usize,
        scales: Option<&CpuBuf>,
    ) -> Result<()> {
        const OP: &str = "add_scaled";
        let len = checked_product(OP, &[batch, per_sample])?;
        let branch = src(OP, "branch", branch, len)?;
        let scales = scales.map(|s| src(OP, "scales", s, batch)).transpose()?;
        ops::add_scaled(dst(OP, "x", x, len)?, branch, batch, per_sample, scales);
        Ok(())
    }

    fn scaled(
        &self,
        g: &CpuBuf,
        batch: usize,
        per_sample: usize,
        scales: Option<&CpuBuf>,
        out: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "scaled";
        let len = checked_product(OP, &[batch, per_sample])?;
        let g = src(OP, "g", g, len)?;
        let scales = scales.map(|s| src(OP, "scales", s, batch)).transpose()?;
        ops::scaled(g, batch, per_sample, scales, dst(OP, "out", out, len)?);
        Ok(())
    }

    fn patchify(
        &self,
        images: &CpuBuf,
        batch: usize,
        channels: usize,
        size: usize,
        patch: usize,
        cols: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "patchify";
        if patch == 0 || size % patch != 0 {
            return Err(invalid(
                OP,
                format!("an image of {size} pixels is not a whole number of {patch}-pixel patches"),
            ));
        }
        let g = size / patch;
        let images = src(
            OP,
            "images",
            images,
            checked_product(OP, &[batch, channels, size, size])?,
        )?;
        let ncols = checked_product(OP, &[batch, g, g, channels, patch, patch])?;
        ops::patchify(
            images,
            batch,
            channels,
            size,
            patch,
            dst(OP, "cols", cols, ncols)?,
        );
        Ok(())
    }

    fn assemble_tokens(
        &self,
        patches: &CpuBuf,
        prefix_tokens: &CpuBuf,
        pos: &CpuBuf,
        batch: usize,
        prefix: usize,
        patches_per_sample: usize,
        d: usize,
        out: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "assemble_tokens";
        let tokens = prefix
            .checked_add(patches_per_sample)
            .ok_or_else(|| invalid(OP, "the token count overflows".into()))?;
        let patches = src(
            OP,
            "patches",
            patches,
            checked_product(OP, &[batch, patches_per_sample, d])?,
        )?;
        let prefix_tokens = src(
            OP,
            "prefix_tokens",
            prefix_tokens,
            checked_product(OP, &[prefix, d])?,
        )?;
        let pos = src(OP, "pos", pos, checked_product(OP, &[tokens, d])?)?;
        let out = dst(OP, "out", out, checked_product(OP, &[batch, tokens, d])?)?;
        ops::assemble_tokens(
            patches,
            prefix_tokens,
            pos,
            batch,
            prefix,
            patches_per_sample,
            d,
            out,
        );
        Ok(())
    }

    fn swish(&self, z: &CpuBuf, len: usize, beta: f32, y: &mut CpuBuf) -> Result<()> {
        let z = src("swish", "z", z, len)?;
        side::swish(z, beta, dst("swish", "y", y, len)?);
        Ok(())
    }

    fn swish_vjp(
        &self,
        z: &CpuBuf,
        dy: &CpuBuf,
        len: usize,
        beta: f32,
        dz: &mut CpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "swish_vjp";
        let z = src(OP, "z", z, len)?;
        let dy = src(OP, "dy", dy, len)?;
        side::swish_vjp(z, dy, beta, dst(OP, "dz", dz, len)?, accumulate);
        Ok(())
    }

    fn depthwise_conv(
        &self,
        x: &CpuBuf,
        w: &CpuBuf,
        shape: ConvShape,
        y: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "depthwise_conv";
        let len = conv_len(OP, &shape)?;
        let x = src(OP, "x", x, len)?;
        let w = src(
            OP,
            "w",
            w,
            checked_product(OP, &[shape.width, shape.kernel, shape.kernel])?,
        )?;
        side::depthwise_conv(x, w, shape, dst(OP, "y", y, len)?);
        Ok(())
    }

    fn depthwise_conv_vjp(
        &self,
        x: &CpuBuf,
        w: &CpuBuf,
        dy: &CpuBuf,
        shape: ConvShape,
        dx: &mut CpuBuf,
        dw: &mut CpuBuf,
        accumulate_dw: bool,
    ) -> Result<()> {
        const OP: &str = "depthwise_conv_vjp";
        let len = conv_len(OP, &shape)?;
        let nw = checked_product(OP, &[shape.width, shape.kernel, shape.kernel])?;
        let x = src(OP, "x", x, len)?;
        let w = src(OP, "w", w, nw)?;
        let dy = src(OP, "dy", dy, len)?;
        let dx = dst(OP, "dx", dx, len)?;
        let dw = dst(OP, "dw", dw, nw)?;
        side::depthwise_conv_vjp(x, w, dy, shape, dx, dw, accumulate_dw);
        Ok(())
    }

    fn mean_tokens(
        &self,
        x: &CpuBuf,
        batch: usize,
        tokens: usize,
        d: usize,
        from: usize,
        to: usize,
        out: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "mean_tokens";
        token_range(OP, tokens, from, to)?;
        let x = src(OP, "x", x, checked_product(OP, &[batch, tokens, d])?)?;
        let out = dst(OP, "out", out, checked_product(OP, &[batch, d])?)?;
        side::mean_tokens(x, batch, tokens, d, from, to, out);
        Ok(())
    }

    fn mean_tokens_vjp(
        &self,
        g: &CpuBuf,
        batch: usize,
        tokens: usize,
        d: usize,
        from: usize,
        to: usize,
        dx: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "mean_tokens_vjp";
        token_range(OP, tokens, from, to)?;
        let g = src(OP, "g", g, checked_product(OP, &[batch, d])?)?;
        let dx = dst(OP, "dx", dx, checked_product(OP, &[batch, tokens, d])?)?;
        side::mean_tokens_vjp(g, batch, tokens, d, from, to, dx);
        Ok(())
    }

    fn soft_cross_entropy(
        &self,
        logits: &CpuBuf,
        targets: &CpuBuf,
        batch: usize,
        classes: usize,
        loss: &mut CpuBuf,
        grad: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "soft_cross_entropy";
        let len = checked_product(OP, &[batch, classes])?;
        let logits = src(OP, "logits", logits, len)?;
        let targets = src(OP, "targets", targets, len)?;
        let loss = dst(OP, "loss", loss, 1)?;
        let grad = dst(OP, "grad", grad, len)?;
        loss[0] = side::soft_cross_entropy(logits, targets, batch, classes, grad) as f32;
        Ok(())
    }

    fn eval_stats(
        &self,
        logits: &CpuBuf,
        labels: &CpuBuf,
        batch: usize,
        classes: usize,
        stats: &mut CpuBuf,
    ) -> Result<()> {
        const OP: &str = "eval_stats";
        let logits = src(
            OP,
            "logits",
            logits,
            checked_product(OP, &[batch, classes])?,
        )?;
        let labels = src(OP, "labels", labels, batch)?;
        let stats = dst(OP, "stats", stats, 4)?;
        let s = side::eval_stats(logits, labels, batch, classes);
        for (o, v) in stats.iter_mut().zip(s) {
            *o = (*o as f64 + v) as f32;
        }
        Ok(())
    }

    fn sum_squares(&self, x: &CpuBuf, len: usize, acc: &mut CpuBuf) -> Result<()> {
        let x = src("sum_squares", "x", x, len)?;
        let acc = dst("sum_squares", "acc", acc, 1)?;
        acc[0] = (acc[0] as f64 + side::sum_squares(x)) as f32;
        Ok(())
    }

    fn adamw(
        &self,
        param: &mut CpuBuf,
        grad: &CpuBuf,
        m: &mut CpuBuf,
        v: &mut CpuBuf,
        len: usize,
        step: &AdamwStep,
        clip: Option<(&CpuBuf, f32)>,
    ) -> Result<()> {
        const OP: &str = "adamw";
        let grad = src(OP, "grad", grad, len)?;
        let clip = match clip {
            Some((sq, max_norm)) => side::clip_factor(src(OP, "sq", sq, 1)?[0], max_norm),
            None => None,
        };
        let param = dst(OP, "param", param, len)?;
        let m = dst(OP, "m", m, len)?;
        let v = dst(OP, "v", v, len)?;
        side::adamw(param, grad, m, v, step, clip);
        Ok(())
    }

    fn attention_bias(
        &self,
        qkv: &CpuBuf,
        shape: AttnShape,
        bias: &CpuBuf,
        groups: usize,
        out: &mut CpuBuf,
        _scratch: &mut CpuBuf,
    ) -> Result<()> {
        window::attention_bias_op(qkv, shape, bias, groups, out)
    }

    fn attention_bias_vjp(
        &self,
        qkv: &CpuBuf,
        dout: &CpuBuf,
        shape: AttnShape,
        bias: &CpuBuf,
        groups: usize,
        dqkv: &mut CpuBuf,
        _scratch: &mut CpuBuf,
    ) -> Result<()> {
        window::attention_bias_vjp_op(qkv, dout, shape, bias, groups, dqkv)
    }

    fn window_partition(
        &self,
        x: &CpuBuf,
        shape: crate::WindowShape,
        out: &mut CpuBuf,
    ) -> Result<()> {
        window::window_op(x, shape, out, false)
    }

    fn window_merge(&self, x: &CpuBuf, shape: crate::WindowShape, out: &mut CpuBuf) -> Result<()> {
        window::window_op(x, shape, out, true)
    }

    fn patch_merge(&self, x: &CpuBuf, shape: crate::MergeShape, out: &mut CpuBuf) -> Result<()> {
        window::merge_op(x, shape, out, false)
    }

    fn patch_merge_vjp(
        &self,
        dy: &CpuBuf,
        shape: crate::MergeShape,
        dx: &mut CpuBuf,
    ) -> Result<()> {
        window::merge_op(dy, shape, dx, true)
    }
}

#[cfg(test)]
mod tests;
