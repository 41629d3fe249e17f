//! The parts of a timm pre-norm transformer block that do not depend on how its attention
//! mixes tokens, written once over the kernel set: the weights of its norm/linear pairs
//! ([`PreNorm`]), the MLP half and its input-only VJP ([`BlockCall`]), the residual joins
//! with stochastic depth, the final LayerNorm ([`NormOn`]) and the bookkeeping of a block's
//! saved internals ([`saved_mut`], [`saved_ref`]).
//!
//! A backbone plugin (ViT, Swin, ...) writes its attention half over the same [`BlockCall`]
//! and composes the block from the two halves:
//!
//! ```text
//! x1  = x  + s_attn * attention_branch(LN1(x))
//! out = x1 + s_mlp  * fc2(gelu(fc1(LN2(x1))))
//! ```
//!
//! ```
//! use dtl_kernels::block::{BlockCall, BlockScratch, PreNorm, Residual};
//! use dtl_kernels::{CpuKernels, Kernels};
//! let k = CpuKernels::new();
//! let (d, hidden, rows) = (4, 8, 3);
//! let w = PreNorm::<Vec<f32>>::zeros(d, hidden).upload(&k).unwrap();
//! let call = BlockCall::new(&k, &w, 1, rows, d, hidden, 1e-6, None, Residual::Fused);
//! let (mut h, mut a, mut g, mut u) = (
//!     k.alloc(rows * d).unwrap(),
//!     k.alloc(rows * d).unwrap(),
//!     k.alloc(rows * hidden).unwrap(),
//!     k.alloc(rows * hidden).unwrap(),
//! );
//! let mut x = k.upload_new(&[1.0; 12]).unwrap();
//! let s = BlockScratch { h: &mut h, a: &mut a, g: &mut g };
//! call.mlp_half(s, &mut u, &mut x).unwrap();
//! // zero weights: the MLP branch adds nothing
//! assert_eq!(k.download(&x, 12).unwrap(), vec![1.0; 12]);
//! ```

use dtl_core::{DtlError, Result};

use crate::{DropScales, Kernels};

/// The six norm/linear pairs of a timm pre-norm transformer block, in PyTorch's layouts
/// (linear weights `(out, in)` row-major), each tensor stored as a `T`: host vectors
/// (`PreNorm<Vec<f32>>`), device buffers (`PreNorm<K::Buf>`), lengths (`PreNorm<usize>`,
/// [`PreNorm::lens`]) or names ([`PreNorm::TIMM_NAMES`]).
///
/// For width `D` and MLP hidden width `H`: `qkv_w` is timm's fused `(3 D, D)` matrix whose
/// output rows are `[q | k | v]`, each split into heads.
///
/// ```
/// use dtl_kernels::block::PreNorm;
/// let w = PreNorm::<Vec<f32>>::zeros(8, 32);
/// assert_eq!((w.qkv_w.len(), w.fc1_w.len()), (3 * 8 * 8, 32 * 8));
/// assert_eq!(w.as_ref().map(Vec::len), PreNorm::lens(8, 32));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PreNorm<T> {
    /// `norm1.weight` (D).
    pub norm1_w: T,
    /// `norm1.bias` (D).
    pub norm1_b: T,
    /// `attn.qkv.weight` (3 D, D).
    pub qkv_w: T,
    /// `attn.qkv.bias` (3 D).
    pub qkv_b: T,
    /// `attn.proj.weight` (D, D).
    pub proj_w: T,
    /// `attn.proj.bias` (D).
    pub proj_b: T,
    /// `norm2.weight` (D).
    pub norm2_w: T,
    /// `norm2.bias` (D).
    pub norm2_b: T,
    /// `mlp.fc1.weight` (H, D).
    pub fc1_w: T,
    /// `mlp.fc1.bias` (H).
    pub fc1_b: T,
    /// `mlp.fc2.weight` (D, H).
    pub fc2_w: T,
    /// `mlp.fc2.bias` (D).
    pub fc2_b: T,
}

impl<T> PreNorm<T> {
    /// The tensors by reference.
    ///
    /// ```
    /// let w = dtl_kernels::block::PreNorm::<Vec<f32>>::zeros(2, 4);
    /// assert_eq!(w.as_ref().fc1_b.len(), 4);
    /// ```
    pub fn as_ref(&self) -> PreNorm<&T> {
        PreNorm {
            norm1_w: &self.norm1_w,
            norm1_b: &self.norm1_b,
            qkv_w: &self.qkv_w,
            qkv_b: &self.qkv_b,
            proj_w: &self.proj_w,
            proj_b: &self.proj_b,
            norm2_w: &self.norm2_w,
            norm2_b: &self.norm2_b,
            fc1_w: &self.fc1_w,
            fc1_b: &self.fc1_b,
            fc2_w: &self.fc2_w,
            fc2_b: &self.fc2_b,
        }
    }

    /// Each tensor through `f`, in field order (`norm1_w` first, `fc2_b` last); the first
    /// error stops the rest.
    ///
    /// ```
    /// use dtl_kernels::block::PreNorm;
    /// let lens = PreNorm::lens(2, 4);
    /// let doubled: Result<_, ()> = lens.try_map(|n| Ok(2 * n));
    /// assert_eq!(doubled.unwrap().fc1_w, 16);
    /// ```
    pub fn try_map<U, E>(
        self,
        mut f: impl FnMut(T) -> std::result::Result<U, E>,
    ) -> std::result::Result<PreNorm<U>, E> {
        Ok(PreNorm {
            norm1_w: f(self.norm1_w)?,
            norm1_b: f(self.norm1_b)?,
            qkv_w: f(self.qkv_w)?,
            qkv_b: f(self.qkv_b)?,
            proj_w: f(self.proj_w)?,
            proj_b: f(self.proj_b)?,
            norm2_w: f(self.norm2_w)?,
            norm2_b: f(self.norm2_b)?,
            fc1_w: f(self.fc1_w)?,
            fc1_b: f(self.fc1_b)?,
            fc2_w: f(self.fc2_w)?,
            fc2_b: f(self.fc2_b)?,
        })
    }

    /// Each tensor through `f`, in field order.
    ///
    /// ```
    /// use dtl_kernels::block::PreNorm;
    /// assert_eq!(PreNorm::lens(2, 4).map(|n| n + 1).norm1_w, 3);
    /// ```
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> PreNorm<U> {
        match self.try_map(|t| Ok::<U, std::convert::Infallible>(f(t))) {
            Ok(p) => p,
            Err(never) => match never {},
        }
    }

    /// The tensors paired with those of `other`.
    ///
    /// ```
    /// use dtl_kernels::block::PreNorm;
    /// let p = PreNorm::TIMM_NAMES.zip(PreNorm::lens(2, 4));
    /// assert_eq!(p.fc1_w, ("mlp.fc1.weight", 8));
    /// ```
    pub fn zip<U>(self, other: PreNorm<U>) -> PreNorm<(T, U)> {
        PreNorm {
            norm1_w: (self.norm1_w, other.norm1_w),
            norm1_b: (self.norm1_b, other.norm1_b),
            qkv_w: (self.qkv_w, other.qkv_w),
            qkv_b: (self.qkv_b, other.qkv_b),
            proj_w: (self.proj_w, other.proj_w),
            proj_b: (self.proj_b, other.proj_b),
            norm2_w: (self.norm2_w, other.norm2_w),
            norm2_b: (self.norm2_b, other.norm2_b),
            fc1_w: (self.fc1_w, other.fc1_w),
            fc1_b: (self.fc1_b, other.fc1_b),
            fc2_w: (self.fc2_w, other.fc2_w),
            fc2_b: (self.fc2_b, other.fc2_b),
        }
    }

    /// The tensors in field order.
    ///
    /// ```
    /// use dtl_kernels::block::PreNorm;
    /// assert_eq!(PreNorm::TIMM_NAMES.into_array()[2], "attn.qkv.weight");
    /// ```
    pub fn into_array(self) -> [T; 12] {
        [
            self.norm1_w,
            self.norm1_b,
            self.qkv_w,
            self.qkv_b,
            self.proj_w,
            self.proj_b,
            self.norm2_w,
            self.norm2_b,
            self.fc1_w,
            self.fc1_b,
            self.fc2_w,
            self.fc2_b,
        ]
    }
}

impl PreNorm<&'static str> {
    /// timm's names of the tensors inside a block (`blocks.<i>.` or
    /// `layers.<s>.blocks.<j>.` goes before them).
    ///
    /// ```
    /// use dtl_kernels::block::PreNorm;
    /// assert_eq!(PreNorm::TIMM_NAMES.norm2_b, "norm2.bias");
    /// ```
    pub const TIMM_NAMES: PreNorm<&'static str> = PreNorm {
        norm1_w: "norm1.weight",
        norm1_b: "norm1.bias",
        qkv_w: "attn.qkv.weight",
        qkv_b: "attn.qkv.bias",
        proj_w: "attn.proj.weight",
        proj_b: "attn.proj.bias",
        norm2_w: "norm2.weight",
        norm2_b: "norm2.bias",
        fc1_w: "mlp.fc1.weight",
        fc1_b: "mlp.fc1.bias",
        fc2_w: "mlp.fc2.weight",
        fc2_b: "mlp.fc2.bias",
    };
}

impl PreNorm<usize> {
    /// The tensors' lengths for width `width` and MLP hidden width `hidden`.
    ///
    /// ```
    /// let l = dtl_kernels::block::PreNorm::lens(8, 32);
    /// assert_eq!((l.qkv_w, l.qkv_b, l.fc2_w), (192, 24, 256));
    /// ```
    pub fn lens(width: usize, hidden: usize) -> Self {
        let (d, h) = (width, hidden);
        PreNorm {
            norm1_w: d,
            norm1_b: d,
            qkv_w: 3 * d * d,
            qkv_b: 3 * d,
            proj_w: d * d,
            proj_b: d,
            norm2_w: d,
            norm2_b: d,
            fc1_w: h * d,
            fc1_b: h,
            fc2_w: d * h,
            fc2_b: d,
        }
    }
}

impl PreNorm<Vec<f32>> {
    /// All-zero tensors for width `width` and MLP hidden width `hidden`.
    ///
    /// ```
    /// let w = dtl_kernels::block::PreNorm::<Vec<f32>>::zeros(2, 4);
    /// assert!(w.fc1_w.iter().all(|&v| v == 0.0));
    /// ```
    pub fn zeros(width: usize, hidden: usize) -> Self {
        PreNorm::lens(width, hidden).map(|n| vec![0.0; n])
    }
}

impl<T: AsRef<[f32]>> PreNorm<T> {
    /// Checks every tensor's length for width `width` and MLP hidden width `hidden`; the
    /// error names the model `name`, the tensor (`prefix` and timm's name), the length
    /// found and the one needed.
    ///
    /// ```
    /// use dtl_kernels::block::PreNorm;
    /// let mut w = PreNorm::<Vec<f32>>::zeros(2, 4);
    /// assert!(w.check("toy", "blocks.0.", 2, 4).is_ok());
    /// w.fc1_b.pop();
    /// let e = w.check("toy", "blocks.0.", 2, 4).unwrap_err().to_string();
    /// assert!(e.contains("blocks.0.mlp.fc1.bias"), "{e}");
    /// ```
    pub fn check(&self, name: &str, prefix: &str, width: usize, hidden: usize) -> Result<()> {
        let got = self.as_ref().map(|v| v.as_ref().len());
        let want = PreNorm::lens(width, hidden);
        for (key, (got, want)) in PreNorm::TIMM_NAMES.zip(got.zip(want)).into_array() {
            check_tensor_len(name, &format!("{prefix}{key}"), got, want)?;
        }
        Ok(())
    }

    /// The tensors on the device of `k`, as frozen weights ([`Kernels::upload_frozen`]), in
    /// field order.
    ///
    /// ```
    /// use dtl_kernels::block::PreNorm;
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let on = PreNorm::<Vec<f32>>::zeros(2, 4).upload(&k).unwrap();
    /// assert_eq!(k.len(&on.fc1_w), 8);
    /// ```
    pub fn upload<K: Kernels>(&self, k: &K) -> Result<PreNorm<K::Buf>> {
        self.as_ref().try_map(|v| k.upload_frozen(v.as_ref()))
    }
}

impl<B> PreNorm<B> {
    /// The tensors copied back to the host, for width `width` and MLP hidden width `hidden`.
    ///
    /// ```
    /// use dtl_kernels::block::PreNorm;
    /// use dtl_kernels::CpuKernels;
    /// let k = CpuKernels::new();
    /// let w = PreNorm::<Vec<f32>>::zeros(2, 4);
    /// assert_eq!(w.upload(&k).unwrap().download(&k, 2, 4).unwrap(), w);
    /// ```
    pub fn download<K: Kernels<Buf = B>>(
        &self,
        k: &K,
        width: usize,
        hidden: usize,
    ) -> Result<PreNorm<Vec<f32>>> {
        self.as_ref()
            .zip(PreNorm::lens(width, hidden))
            .try_map(|(b, n)| k.download(b, n))
    }
}

/// A LayerNorm's weight and bias on a device, with its width and epsilon: a backbone's final
/// norm, its forward and its input-only VJP.
///
/// ```
/// use dtl_kernels::block::NormOn;
/// use dtl_kernels::{CpuKernels, Kernels};
/// let k = CpuKernels::new();
/// let norm = NormOn::upload(&k, &[1.0, 1.0], &[0.0, 0.0], 0.0).unwrap();
/// let x = k.upload_new(&[1.0, 3.0]).unwrap();
/// let mut y = k.alloc(2).unwrap();
/// norm.forward(&k, &x, 1, &mut y).unwrap();
/// assert_eq!(k.download(&y, 2).unwrap(), vec![-1.0, 1.0]);
/// ```
pub struct NormOn<K: Kernels> {
    /// The weight (`width`).
    pub w: K::Buf,
    /// The bias (`width`).
    pub b: K::Buf,
    /// The normalised width.
    pub width: usize,
    /// The epsilon.
    pub eps: f32,
}

impl<K: Kernels> NormOn<K> {
    /// Uploads `w` and `b` as frozen weights ([`Kernels::upload_frozen`]), the width being
    /// their length; they must be equally long.
    ///
    /// ```
    /// use dtl_kernels::block::NormOn;
    /// let k = dtl_kernels::CpuKernels::new();
    /// assert_eq!(NormOn::upload(&k, &[1.0; 4], &[0.0; 4], 1e-6).unwrap().width, 4);
    /// assert!(NormOn::upload(&k, &[1.0; 4], &[0.0; 3], 1e-6).is_err());
    /// ```
    pub fn upload(k: &K, w: &[f32], b: &[f32], eps: f32) -> Result<Self> {
        if w.len() != b.len() {
            return Err(DtlError::shape(format!(
                "a LayerNorm's weight holds {} values and its bias {}: they must match",
                w.len(),
                b.len()
            )));
        }
        Ok(NormOn {
            w: k.upload_frozen(w)?,
            b: k.upload_frozen(b)?,
            width: w.len(),
            eps,
        })
    }

    /// `out = LN(x)` over `rows` rows of [`NormOn::width`] values.
    ///
    /// ```
    /// use dtl_kernels::block::NormOn;
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let norm = NormOn::upload(&k, &[2.0, 2.0], &[1.0, 1.0], 0.0).unwrap();
    /// let mut y = k.alloc(2).unwrap();
    /// norm.forward(&k, &k.upload_new(&[1.0, 3.0]).unwrap(), 1, &mut y).unwrap();
    /// assert_eq!(k.download(&y, 2).unwrap(), vec![-1.0, 3.0]);
    /// ```
    pub fn forward(&self, k: &K, x: &K::Buf, rows: usize, out: &mut K::Buf) -> Result<()> {
        k.layer_norm(x, &self.w, &self.b, rows, self.width, self.eps, out)
    }

    /// `dx = LN'(x)^T dy` over `rows` rows (no weight gradient).
    ///
    /// ```
    /// use dtl_kernels::block::NormOn;
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let norm = NormOn::upload(&k, &[1.0, 1.0], &[0.0, 0.0], 0.0).unwrap();
    /// let (x, dy) = (k.upload_new(&[1.0, 3.0]).unwrap(), k.upload_new(&[1.0, 1.0]).unwrap());
    /// let mut dx = k.alloc(2).unwrap();
    /// norm.vjp(&k, &x, &dy, 1, &mut dx).unwrap();
    /// assert_eq!(k.download(&dx, 2).unwrap(), vec![0.0, 0.0]);
    /// ```
    pub fn vjp(&self, k: &K, x: &K::Buf, dy: &K::Buf, rows: usize, dx: &mut K::Buf) -> Result<()> {
        k.layer_norm_vjp(x, &self.w, dy, rows, self.width, self.eps, dx, false)
    }

    /// The weight and the bias copied back to the host.
    ///
    /// ```
    /// use dtl_kernels::block::NormOn;
    /// let k = dtl_kernels::CpuKernels::new();
    /// let norm = NormOn::upload(&k, &[1.0, 2.0], &[3.0, 4.0], 0.0).unwrap();
    /// assert_eq!(norm.download(&k).unwrap(), (vec![1.0, 2.0], vec![3.0, 4.0]));
    /// ```
    pub fn download(&self, k: &K) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            k.download(&self.w, self.width)?,
            k.download(&self.b, self.width)?,
        ))
    }
}

impl<K: Kernels> Clone for NormOn<K>
where
    K::Buf: Clone,
{
    /// A copy on the same device (for devices whose buffers can be cloned, such as the
    /// CPU's).
    ///
    /// ```
    /// use dtl_kernels::block::NormOn;
    /// let k = dtl_kernels::CpuKernels::new();
    /// let norm = NormOn::upload(&k, &[1.0], &[0.0], 0.0).unwrap();
    /// assert_eq!(norm.clone().download(&k).unwrap(), norm.download(&k).unwrap());
    /// ```
    fn clone(&self) -> Self {
        NormOn {
            w: self.w.clone(),
            b: self.b.clone(),
            width: self.width,
            eps: self.eps,
        }
    }
}

/// How a block's branch joins the residual stream when no drop-path scales are given, and so
/// which kernels a block runs: a backbone keeps one choice, so that its kernel sequence (and
/// the CUDA graph recorded from it) and its values stay those it was validated with.
///
/// ```
/// use dtl_kernels::block::Residual;
/// assert_ne!(Residual::Fused, Residual::Scaled);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    /// Without scales the branch's last product accumulates straight onto the residual stream
    /// ([`Kernels::linear`] with `accumulate`), and the branch's gradient is the stream's
    /// own: no [`Kernels::add_scaled`] or [`Kernels::scaled`] runs. With scales, as
    /// [`Residual::Scaled`].
    Fused,
    /// The branch's output always joins through [`Kernels::add_scaled`] and its gradient is
    /// always formed by [`Kernels::scaled`] (a plain add and copy without scales).
    Scaled,
}

/// Which of a block's two branches (and so which of the [`DropScales`]).
///
/// ```
/// use dtl_kernels::block::Branch;
/// assert_ne!(Branch::Attn, Branch::Mlp);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Branch {
    /// The attention branch (`DropScales::attn`).
    Attn,
    /// The MLP branch (`DropScales::mlp`).
    Mlp,
}

/// The borrowed scratch buffers of a block's MLP half.
///
/// ```
/// use dtl_kernels::block::BlockScratch;
/// use dtl_kernels::{CpuKernels, Kernels};
/// let k = CpuKernels::new();
/// let (mut h, mut a, mut g) = (k.alloc(8).unwrap(), k.alloc(8).unwrap(), k.alloc(16).unwrap());
/// let s: BlockScratch<'_, CpuKernels> = BlockScratch { h: &mut h, a: &mut a, g: &mut g };
/// assert_eq!(k.len(s.g), 16);
/// ```
pub struct BlockScratch<'a, K: Kernels> {
    /// Rows x width: the LayerNorm's output, then the gradient of its input.
    pub h: &'a mut K::Buf,
    /// Rows x width: the branch's output, or its scaled gradient.
    pub a: &'a mut K::Buf,
    /// Rows x hidden: the GELU's output, then the gradient of the pre-activation.
    pub g: &'a mut K::Buf,
}

/// One call of a pre-norm block on a device: its weights, the batch's geometry, the
/// drop-path scales and the [`Residual`] joins. Gives the MLP half, its input-only VJP and the
/// residual joins with stochastic depth, which a backbone's attention half uses too.
///
/// ```
/// use dtl_kernels::block::{Branch, BlockCall, PreNorm, Residual};
/// use dtl_kernels::{CpuKernels, DropScales, Kernels};
/// let k = CpuKernels::new();
/// let w = PreNorm::<Vec<f32>>::zeros(2, 4).upload(&k).unwrap();
/// let mut drop = DropScales::alloc(&k, 2).unwrap();
/// drop.set(&k, &dtl_core::DropPath { attn: vec![0.0, 2.0], mlp: vec![1.0, 1.0] }).unwrap();
/// // 2 samples of 1 token of width 2
/// let call = BlockCall::new(&k, &w, 2, 1, 2, 4, 1e-6, Some(&drop), Residual::Fused);
/// assert_eq!(call.rows(), 2);
/// let (dy, mut tmp) = (k.upload_new(&[1.0; 4]).unwrap(), k.alloc(4).unwrap());
/// let da = call.branch_grad(&dy, Branch::Attn, &mut tmp).unwrap();
/// assert_eq!(k.download(da, 4).unwrap(), vec![0.0, 0.0, 2.0, 2.0]);
/// ```
pub struct BlockCall<'a, K: Kernels> {
    /// The device.
    pub k: &'a K,
    /// The block's weights.
    pub w: &'a PreNorm<K::Buf>,
    /// Samples.
    pub batch: usize,
    /// Tokens per sample.
    pub tokens: usize,
    /// Width.
    pub width: usize,
    /// MLP hidden width.
    pub hidden: usize,
    /// The LayerNorms' epsilon.
    pub eps: f32,
    /// Per-sample drop-path scales; none: every branch kept at scale 1.
    pub drop: Option<&'a DropScales<K>>,
    /// How the branches join the residual stream.
    pub residual: Residual,
}

impl<K: Kernels> Clone for BlockCall<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: Kernels> Copy for BlockCall<'_, K> {}

impl<'a, K: Kernels> BlockCall<'a, K> {
    /// A call of the block with weights `w` on `k` for `batch` samples of `tokens` tokens.
    ///
    /// ```
    /// use dtl_kernels::block::{BlockCall, PreNorm, Residual};
    /// let k = dtl_kernels::CpuKernels::new();
    /// let w = PreNorm::<Vec<f32>>::zeros(2, 4).upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 3, 5, 2, 4, 1e-6, None, Residual::Scaled);
    /// assert_eq!(call.rows(), 15);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        k: &'a K,
        w: &'a PreNorm<K::Buf>,
        batch: usize,
        tokens: usize,
        width: usize,
        hidden: usize,
        eps: f32,
        drop: Option<&'a DropScales<K>>,
        residual: Residual,
    ) -> Self {
        BlockCall {
            k,
            w,
            batch,
            tokens,
            width,
            hidden,
            eps,
            drop,
            residual,
        }
    }

    /// Tokens of the batch: `batch x tokens`.
    ///
    /// ```
    /// use dtl_kernels::block::{BlockCall, PreNorm, Residual};
    /// let k = dtl_kernels::CpuKernels::new();
    /// let w = PreNorm::<Vec<f32>>::zeros(2, 4).upload(&k).unwrap();
    /// assert_eq!(BlockCall::new(&k, &w, 2, 5, 2, 4, 0.0, None, Residual::Fused).rows(), 10);
    /// ```
    pub fn rows(&self) -> usize {
        self.batch * self.tokens
    }

    /// The drop-path scales of `branch`, if any.
    ///
    /// ```
    /// use dtl_kernels::block::{Branch, BlockCall, PreNorm, Residual};
    /// let k = dtl_kernels::CpuKernels::new();
    /// let w = PreNorm::<Vec<f32>>::zeros(2, 4).upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 1, 1, 2, 4, 0.0, None, Residual::Fused);
    /// assert!(call.scales(Branch::Mlp).is_none());
    /// ```
    pub fn scales(&self, branch: Branch) -> Option<&'a K::Buf> {
        self.drop.map(|dp| match branch {
            Branch::Attn => &dp.attn,
            Branch::Mlp => &dp.mlp,
        })
    }

    /// `out += s * (input w^T + b)` for the branch `branch`, `input` holding `rows x in_dim`
    /// values and `w` being `(width, in_dim)`; `tmp` (rows x width) is scratch.
    ///
    /// ```
    /// use dtl_kernels::block::{Branch, BlockCall, PreNorm, Residual};
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let w = PreNorm::<Vec<f32>>::zeros(1, 1).upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 1, 1, 1, 1, 0.0, None, Residual::Fused);
    /// let (x, lw, lb) = (k.upload_new(&[2.0]).unwrap(), k.upload_new(&[3.0]).unwrap(), k.upload_new(&[1.0]).unwrap());
    /// let (mut tmp, mut out) = (k.alloc(1).unwrap(), k.upload_new(&[10.0]).unwrap());
    /// call.add_branch(&x, &lw, &lb, 1, Branch::Mlp, &mut tmp, &mut out).unwrap();
    /// assert_eq!(k.download(&out, 1).unwrap(), vec![17.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn add_branch(
        &self,
        input: &K::Buf,
        w: &K::Buf,
        b: &K::Buf,
        in_dim: usize,
        branch: Branch,
        tmp: &mut K::Buf,
        out: &mut K::Buf,
    ) -> Result<()> {
        let (k, rows, d) = (self.k, self.rows(), self.width);
        match (self.residual, self.scales(branch)) {
            // nothing dropped: the product accumulates straight onto the residual
            (Residual::Fused, None) => k.linear(input, w, Some(b), rows, in_dim, d, out, true),
            (_, scales) => {
                k.linear(input, w, Some(b), rows, in_dim, d, tmp, false)?;
                k.add_scaled(out, tmp, self.batch, self.tokens * d, scales)
            }
        }
    }

    /// The gradient of `branch`'s output from that of the residual stream `dy`: `s * dy`
    /// in `tmp` (rows x width), or `dy` itself where nothing is scaled
    /// ([`Residual::Fused`] without scales).
    ///
    /// ```
    /// use dtl_kernels::block::{Branch, BlockCall, PreNorm, Residual};
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let w = PreNorm::<Vec<f32>>::zeros(1, 1).upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 1, 1, 1, 1, 0.0, None, Residual::Scaled);
    /// let (dy, mut tmp) = (k.upload_new(&[4.0]).unwrap(), k.alloc(1).unwrap());
    /// assert_eq!(k.download(call.branch_grad(&dy, Branch::Attn, &mut tmp).unwrap(), 1).unwrap(), vec![4.0]);
    /// ```
    pub fn branch_grad<'b>(
        &self,
        dy: &'b K::Buf,
        branch: Branch,
        tmp: &'b mut K::Buf,
    ) -> Result<&'b K::Buf> {
        match (self.residual, self.scales(branch)) {
            (Residual::Fused, None) => Ok(dy),
            (_, scales) => {
                let per = self.tokens * self.width;
                self.k.scaled(dy, self.batch, per, scales, tmp)?;
                Ok(&*tmp)
            }
        }
    }

    /// The MLP pre-activation `u = fc1(LN2(x1))` into `u` (rows x hidden), `h` (rows x
    /// width) scratch.
    ///
    /// ```
    /// use dtl_kernels::block::{BlockCall, PreNorm, Residual};
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let mut w = PreNorm::<Vec<f32>>::zeros(2, 1);
    /// w.fc1_b = vec![0.5];
    /// let w = w.upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 1, 1, 2, 1, 0.0, None, Residual::Fused);
    /// let (mut h, mut u) = (k.alloc(2).unwrap(), k.alloc(1).unwrap());
    /// call.mlp_pre(&mut h, &k.upload_new(&[1.0, 3.0]).unwrap(), &mut u).unwrap();
    /// assert_eq!(k.download(&u, 1).unwrap(), vec![0.5]);
    /// ```
    pub fn mlp_pre(&self, h: &mut K::Buf, x1: &K::Buf, u: &mut K::Buf) -> Result<()> {
        let (k, w, rows, d) = (self.k, self.w, self.rows(), self.width);
        k.layer_norm(x1, &w.norm2_w, &w.norm2_b, rows, d, self.eps, h)?;
        k.linear(h, &w.fc1_w, Some(&w.fc1_b), rows, d, self.hidden, u, false)
    }

    /// `out += s_mlp * fc2(gelu(u))` (`out` holding `x1`), `g` (rows x hidden) and `a`
    /// (rows x width) scratch.
    ///
    /// ```
    /// use dtl_kernels::block::{BlockCall, PreNorm, Residual};
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let mut w = PreNorm::<Vec<f32>>::zeros(1, 1);
    /// w.fc2_b = vec![0.5];
    /// let w = w.upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 1, 1, 1, 1, 0.0, None, Residual::Scaled);
    /// let (mut g, mut a, mut out) = (k.alloc(1).unwrap(), k.alloc(1).unwrap(), k.upload_new(&[1.0]).unwrap());
    /// call.mlp_out(&mut g, &mut a, &k.upload_new(&[0.0]).unwrap(), &mut out).unwrap();
    /// assert_eq!(k.download(&out, 1).unwrap(), vec![1.5]);
    /// ```
    pub fn mlp_out(
        &self,
        g: &mut K::Buf,
        a: &mut K::Buf,
        u: &K::Buf,
        out: &mut K::Buf,
    ) -> Result<()> {
        let w = self.w;
        self.k.gelu(u, self.rows() * self.hidden, g)?;
        self.add_branch(g, &w.fc2_w, &w.fc2_b, self.hidden, Branch::Mlp, a, out)
    }

    /// The MLP half in place: `x += s_mlp * fc2(gelu(fc1(LN2(x))))`, the pre-activation left in
    /// `u` (rows x hidden).
    ///
    /// ```
    /// use dtl_kernels::block::{BlockCall, BlockScratch, PreNorm, Residual};
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let mut w = PreNorm::<Vec<f32>>::zeros(2, 3);
    /// w.fc2_b = vec![1.0, 2.0];
    /// let w = w.upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 1, 1, 2, 3, 1e-6, None, Residual::Fused);
    /// let (mut h, mut a, mut g, mut u) =
    ///     (k.alloc(2).unwrap(), k.alloc(2).unwrap(), k.alloc(3).unwrap(), k.alloc(3).unwrap());
    /// let mut x = k.upload_new(&[1.0, 1.0]).unwrap();
    /// call.mlp_half(BlockScratch { h: &mut h, a: &mut a, g: &mut g }, &mut u, &mut x).unwrap();
    /// assert_eq!(k.download(&x, 2).unwrap(), vec![2.0, 3.0]);
    /// ```
    pub fn mlp_half(&self, s: BlockScratch<'_, K>, u: &mut K::Buf, x: &mut K::Buf) -> Result<()> {
        self.mlp_pre(s.h, x, u)?;
        self.mlp_out(s.g, s.a, u, x)
    }

    /// The MLP half from `x1` into `out`: `out = x1 + s_mlp * fc2(gelu(fc1(LN2(x1))))`, the
    /// pre-activation kept in `u` (rows x hidden).
    ///
    /// ```
    /// use dtl_kernels::block::{BlockCall, BlockScratch, PreNorm, Residual};
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let w = PreNorm::<Vec<f32>>::zeros(2, 3).upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 1, 1, 2, 3, 1e-6, None, Residual::Scaled);
    /// let (mut h, mut a, mut g, mut u) =
    ///     (k.alloc(2).unwrap(), k.alloc(2).unwrap(), k.alloc(3).unwrap(), k.alloc(3).unwrap());
    /// let (x1, mut out) = (k.upload_new(&[1.0, 2.0]).unwrap(), k.alloc(2).unwrap());
    /// let s = BlockScratch { h: &mut h, a: &mut a, g: &mut g };
    /// call.mlp_half_from(s, &x1, &mut u, &mut out).unwrap();
    /// assert_eq!(k.download(&out, 2).unwrap(), vec![1.0, 2.0]);
    /// ```
    pub fn mlp_half_from(
        &self,
        s: BlockScratch<'_, K>,
        x1: &K::Buf,
        u: &mut K::Buf,
        out: &mut K::Buf,
    ) -> Result<()> {
        self.mlp_pre(s.h, x1, u)?;
        self.k.copy(x1, out, self.rows() * self.width)?;
        self.mlp_out(s.g, s.a, u, out)
    }

    /// The MLP half's input-only VJP: `dx = dy + LN2'(x1)^T fc1^T (gelu'(u) fc2^T (s_mlp dy))`,
    /// from the half's input `x1` and its pre-activation `u`.
    ///
    /// ```
    /// use dtl_kernels::block::{BlockCall, BlockScratch, PreNorm, Residual};
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let w = PreNorm::<Vec<f32>>::zeros(2, 3).upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 1, 1, 2, 3, 1e-6, None, Residual::Fused);
    /// let (mut h, mut a, mut g) = (k.alloc(2).unwrap(), k.alloc(2).unwrap(), k.alloc(3).unwrap());
    /// let (x1, u) = (k.upload_new(&[1.0, 2.0]).unwrap(), k.alloc(3).unwrap());
    /// let (dy, mut dx) = (k.upload_new(&[1.0, -1.0]).unwrap(), k.alloc(2).unwrap());
    /// let s = BlockScratch { h: &mut h, a: &mut a, g: &mut g };
    /// call.mlp_vjp(s, &x1, &u, &dy, &mut dx).unwrap();
    /// // zero weights: the gradient passes the residual unchanged
    /// assert_eq!(k.download(&dx, 2).unwrap(), vec![1.0, -1.0]);
    /// ```
    pub fn mlp_vjp(
        &self,
        s: BlockScratch<'_, K>,
        x1: &K::Buf,
        u: &K::Buf,
        dy: &K::Buf,
        dx: &mut K::Buf,
    ) -> Result<()> {
        let (k, w, rows) = (self.k, self.w, self.rows());
        let (d, hidden) = (self.width, self.hidden);
        // dm = s_mlp * dy; du = gelu'(u) * (dm fc2); dh2 = du fc1
        let dm = self.branch_grad(dy, Branch::Mlp, s.a)?;
        k.linear_vjp(dm, &w.fc2_w, rows, hidden, d, s.g, false)?;
        k.gelu_vjp(u, rows * hidden, s.g)?;
        k.linear_vjp(s.g, &w.fc1_w, rows, d, hidden, s.h, false)?;
        // dx1 = dy + LN2'(x1)^T dh2
        k.copy(dy, dx, rows * d)?;
        k.layer_norm_vjp(x1, &w.norm2_w, s.h, rows, d, self.eps, dx, true)
    }

    /// [`BlockCall::mlp_vjp`] from a saved pre-activation `u`, or, without one, after
    /// recomputing it ([`BlockCall::mlp_pre`]) into `spare` (rows x hidden).
    ///
    /// ```
    /// use dtl_kernels::block::{BlockCall, BlockScratch, PreNorm, Residual};
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let w = PreNorm::<Vec<f32>>::zeros(2, 3).upload(&k).unwrap();
    /// let call = BlockCall::new(&k, &w, 1, 1, 2, 3, 1e-6, None, Residual::Scaled);
    /// let (mut h, mut a, mut g) = (k.alloc(2).unwrap(), k.alloc(2).unwrap(), k.alloc(3).unwrap());
    /// let (x1, mut spare) = (k.upload_new(&[1.0, 2.0]).unwrap(), k.alloc(3).unwrap());
    /// let (dy, mut dx) = (k.upload_new(&[1.0, -1.0]).unwrap(), k.alloc(2).unwrap());
    /// let s = BlockScratch { h: &mut h, a: &mut a, g: &mut g };
    /// call.mlp_vjp_saved(s, &x1, None, &mut spare, &dy, &mut dx).unwrap();
    /// assert_eq!(k.download(&dx, 2).unwrap(), vec![1.0, -1.0]);
    /// ```
    pub fn mlp_vjp_saved(
        &self,
        s: BlockScratch<'_, K>,
        x1: &K::Buf,
        u: Option<&K::Buf>,
        spare: &mut K::Buf,
        dy: &K::Buf,
        dx: &mut K::Buf,
    ) -> Result<()> {
        let u = match u {
            Some(u) => u,
            None => {
                self.mlp_pre(&mut *s.h, x1, spare)?;
                &*spare
            }
        };
        self.mlp_vjp(s, x1, u, dy, dx)
    }
}

/// The error for a saved state of the wrong number of buffers.
fn saved_count(name: &str, got: usize) -> DtlError {
    DtlError::argument(format!(
        "{name}: a block's saved internals are 3 buffers (x1, qkv, u) or 2 (x1, qkv), {got} given"
    ))
}

/// A pre-norm block's saved internals as given to `KernelBackbone::block_forward_saving`:
/// `[x1, qkv, u]` or `[x1, qkv]` (`u`, the MLP pre-activation, then recomputed); any other
/// count is an error naming the model `name`.
///
/// ```
/// let mut saved = vec![vec![1.0f32], vec![2.0], vec![3.0]];
/// let (x1, _qkv, u) = dtl_kernels::block::saved_mut("toy", &mut saved).unwrap();
/// x1[0] = 5.0;
/// assert!(u.is_some());
/// assert!(dtl_kernels::block::saved_mut("toy", &mut saved[..1]).is_err());
/// ```
pub fn saved_mut<'s, B>(
    name: &str,
    saved: &'s mut [B],
) -> Result<(&'s mut B, &'s mut B, Option<&'s mut B>)> {
    let got = saved.len();
    match saved {
        [x1, qkv, u] => Ok((x1, qkv, Some(u))),
        [x1, qkv] => Ok((x1, qkv, None)),
        _ => Err(saved_count(name, got)),
    }
}

/// [`saved_mut`] for reading, as given to `KernelBackbone::block_vjp_saved`.
///
/// ```
/// let saved = vec![vec![1.0f32], vec![2.0]];
/// let (_x1, qkv, u) = dtl_kernels::block::saved_ref("toy", &saved).unwrap();
/// assert_eq!((qkv[0], u.is_none()), (2.0, true));
/// let e = dtl_kernels::block::saved_ref("toy", &saved[..1]).unwrap_err().to_string();
/// assert!(e.contains("3 buffers"), "{e}");
/// ```
pub fn saved_ref<'s, B>(name: &str, saved: &'s [B]) -> Result<(&'s B, &'s B, Option<&'s B>)> {
    match saved {
        [x1, qkv, u] => Ok((x1, qkv, Some(u))),
        [x1, qkv] => Ok((x1, qkv, None)),
        _ => Err(saved_count(name, saved.len())),
    }
}

/// Refuses a batch larger than the one a workspace was planned for, naming the model `name`.
///
/// ```
/// assert!(dtl_kernels::block::check_batch("toy", 4, 3).is_ok());
/// let e = dtl_kernels::block::check_batch("toy", 4, 5).unwrap_err().to_string();
/// assert!(e.contains("planned for 4"), "{e}");
/// ```
pub fn check_batch(name: &str, planned: usize, batch: usize) -> Result<()> {
    if batch > planned {
        return Err(DtlError::argument(format!(
            "{name}: a batch of {batch} given to a workspace planned for {planned}"
        )));
    }
    Ok(())
}

/// Refuses a weights tensor `key` of the model `name` holding `got` values where the variant
/// needs `want`: the one length check of every backbone's weights.
///
/// ```
/// assert!(dtl_kernels::block::check_tensor_len("toy", "norm.bias", 4, 4).is_ok());
/// let e = dtl_kernels::block::check_tensor_len("toy", "norm.bias", 3, 4).unwrap_err();
/// assert_eq!(e.to_string(), "toy: tensor `norm.bias` holds 3 values, the variant needs 4");
/// ```
pub fn check_tensor_len(name: &str, key: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(DtlError::shape(format!(
            "{name}: tensor `{key}` holds {got} values, the variant needs {want}"
        )));
    }
    Ok(())
}
