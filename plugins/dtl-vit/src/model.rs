//! The ViT as a [`Backbone`] on the CPU: the blocks of [`VitOn`] run with [`CpuKernels`].

use std::marker::PhantomData;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use dfdx::prelude::*;
use dtl_core::{Backbone, BackboneSpec, DropPath, DtlError, Images, Result};
use dtl_kernels::{CpuBuf, CpuKernels, DropScales, KernelBackbone};

use crate::flat;
use crate::load::{load_weights, LoadReport};
use crate::on::{check_spec, VitOn, VitWorkspace};
use crate::weights::VitWeights;

/// The CPU kernels the CPU model runs on.
const K: CpuKernels = CpuKernels::new();

/// A timm Vision Transformer with compile-time token count `T` and width `W`.
///
/// Depth, heads, patch and image size are runtime values of its [`BackboneSpec`]; the spec
/// must agree with `T` and `W`. Each block is timm's pre-norm block (LayerNorm eps from
/// the spec, fused qkv with bias, scale `1/sqrt(head_dim)`, erf GELU MLP). Activations cross
/// the [`Backbone`] interface as dfdx tensors; inside, the model is a [`VitOn<CpuKernels>`]:
/// the same block code a GPU runs, on the CPU kernels (products on `gemm`, row-wise work on
/// rayon), with its scratch buffers planned once for the largest batch seen.
///
/// Research code instantiates its own geometry without touching this crate:
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::{Backbone, BackboneSpec};
/// use dtl_vit::Vit;
/// // image 16, patch 8 -> 4 patches + class token; width 8, 1 block, 2 heads
/// let spec = BackboneSpec::vit("my_vit", 16, 8, 8, 1, 2);
/// let vit = Vit::<Const<5>, Const<8>>::random(spec, 0).unwrap();
/// let dev = Cpu::default();
/// let x = vit.embed(&dev.sample_normal_like(&(2, Const::<3>, 16, 16))).unwrap();
/// let y = vit.block_forward(0, &x, None).unwrap();
/// assert_eq!(y.shape().1, Const::<5>);
/// ```
pub struct Vit<T: ConstDim, W: ConstDim> {
    on: VitOn<CpuKernels>,
    /// The weights as [`VitWeights`], copied out of `on` on first use.
    weights: OnceLock<VitWeights>,
    /// The scratch buffers of the last (largest) batch.
    ws: Mutex<Option<VitWorkspace<CpuKernels>>>,
    _dims: PhantomData<fn() -> (T, W)>,
}

impl<T: ConstDim, W: ConstDim> Clone for Vit<T, W> {
    fn clone(&self) -> Self {
        Vit {
            on: self.on.clone(),
            weights: self.weights.clone(),
            ws: Mutex::new(None),
            _dims: PhantomData,
        }
    }
}

impl<T: ConstDim, W: ConstDim> std::fmt::Debug for Vit<T, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Vit<{}, {}>({}, {} blocks)",
            T::SIZE,
            W::SIZE,
            self.on.spec().name,
            self.on.spec().depth
        )
    }
}

/// A ViT whose dims come from a [`Geometry`](crate::Geometry).
///
/// ```
/// use dtl_vit::{variants::VitTestPatch8_32, VitOf};
/// let vit: VitOf<VitTestPatch8_32> = dtl_vit::random::<VitTestPatch8_32>(0).unwrap();
/// ```
pub type VitOf<G> = Vit<<G as crate::Geometry>::Tokens, <G as crate::Geometry>::Width>;

impl<T: ConstDim, W: ConstDim> Vit<T, W> {
    /// Wraps weights for `spec`, checking the spec against `T`/`W` and every tensor length.
    ///
    /// ```
    /// use dfdx::prelude::Const;
    /// use dtl_core::BackboneSpec;
    /// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
    /// let w = dtl_vit::VitWeights::random(&spec, 0);
    /// assert!(dtl_vit::Vit::<Const<5>, Const<8>>::new(spec.clone(), w.clone()).is_ok());
    /// let e = dtl_vit::Vit::<Const<6>, Const<8>>::new(spec, w).unwrap_err().to_string();
    /// assert!(e.contains("5 tokens"), "{e}");
    /// ```
    pub fn new(spec: BackboneSpec, weights: VitWeights) -> Result<Self> {
        if spec.tokens() != T::SIZE || spec.width != W::SIZE {
            return Err(DtlError::shape(format!(
                "{}: the spec has {} tokens of width {}, but the type is Vit<Const<{}>, Const<{}>>",
                spec.name,
                spec.tokens(),
                spec.width,
                T::SIZE,
                W::SIZE
            )));
        }
        check_spec(&spec)?;
        Ok(Vit {
            on: VitOn::from_weights(&spec, weights)?,
            weights: OnceLock::new(),
            ws: Mutex::new(None),
            _dims: PhantomData,
        })
    }

    /// Random timm-style weights from `seed`, for benchmarks and tests.
    ///
    /// ```
    /// use dfdx::prelude::Const;
    /// let spec = dtl_core::BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
    /// let vit = dtl_vit::Vit::<Const<5>, Const<8>>::random(spec, 0).unwrap();
    /// assert_eq!(vit.weights().blocks.len(), 1);
    /// ```
    pub fn random(spec: BackboneSpec, seed: u64) -> Result<Self> {
        let w = VitWeights::random(&spec, seed);
        Self::new(spec, w)
    }

    /// Loads a checkpoint (`format`: `auto`, `safetensors` or `npz`) for `spec`.
    ///
    /// ```no_run
    /// use dfdx::prelude::Const;
    /// let spec = dtl_core::BackboneSpec::vit("vit_test_patch8_32", 32, 8, 48, 4, 3);
    /// let vit = dtl_vit::Vit::<Const<17>, Const<48>>::load(spec, "model.safetensors".as_ref(), "auto").unwrap();
    /// ```
    pub fn load(spec: BackboneSpec, path: &Path, format: &str) -> Result<Self> {
        Ok(Self::load_with_report(spec, path, format)?.0)
    }

    /// Like [`Vit::load`], also returning what the loader did.
    ///
    /// ```no_run
    /// use dfdx::prelude::Const;
    /// let spec = dtl_core::BackboneSpec::vit("vit_test_patch8_32", 32, 8, 48, 4, 3);
    /// let (vit, report) =
    ///     dtl_vit::Vit::<Const<17>, Const<48>>::load_with_report(spec, "ViT.npz".as_ref(), "auto").unwrap();
    /// println!("{} tensors, {} layout", report.tensors, report.layout);
    /// ```
    pub fn load_with_report(
        spec: BackboneSpec,
        path: &Path,
        format: &str,
    ) -> Result<(Self, LoadReport)> {
        let (w, report) = load_weights(&spec, path, format)?;
        Ok((Self::new(spec, w)?, report))
    }

    /// The weights (copied out of the model's buffers on the first call).
    ///
    /// ```
    /// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    /// assert_eq!(vit.weights().pos_embed.len(), 17 * 48);
    /// ```
    pub fn weights(&self) -> &VitWeights {
        self.weights.get_or_init(|| {
            self.on
                .download(&K)
                .expect("the model's buffers hold the lengths of its spec")
        })
    }

    /// The model as a [`VitOn`] on the CPU kernels: what its methods run.
    ///
    /// ```
    /// use dtl_kernels::KernelBackbone;
    /// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    /// let k = dtl_kernels::CpuKernels::new();
    /// assert_eq!(KernelBackbone::<dtl_kernels::CpuKernels>::spec(vit.on()).tokens(), 17);
    /// ```
    pub fn on(&self) -> &VitOn<CpuKernels> {
        &self.on
    }

    fn spec_ref(&self) -> &BackboneSpec {
        self.on.spec()
    }

    fn rows_ok(&self, what: &str, len: usize, batch: usize, per: usize) -> Result<()> {
        if len != batch * per {
            return Err(DtlError::shape(format!(
                "{}: {what} holds {len} values, expected {batch} x {per}",
                self.spec_ref().name
            )));
        }
        Ok(())
    }

    fn block_ok(&self, i: usize) -> Result<()> {
        let s = self.spec_ref();
        if i >= s.depth {
            return Err(DtlError::argument(format!(
                "{}: block {i} does not exist (the variant has {} blocks)",
                s.name, s.depth
            )));
        }
        Ok(())
    }

    fn drop_scales(
        &self,
        drop: Option<&DropPath>,
        batch: usize,
    ) -> Result<Option<DropScales<CpuKernels>>> {
        match drop {
            None => Ok(None),
            Some(d) => {
                if d.attn.len() != batch || d.mlp.len() != batch {
                    return Err(DtlError::shape(format!(
                        "drop path scales for {} / {} samples given to a batch of {batch}",
                        d.attn.len(),
                        d.mlp.len()
                    )));
                }
                Ok(Some(DropScales {
                    attn: CpuBuf::from_slice(&d.attn),
                    mlp: CpuBuf::from_slice(&d.mlp),
                }))
            }
        }
    }

    /// Runs `f` with a workspace for at least `batch` samples: the cached one (re-planned
    /// when too small), or a fresh one when another thread holds it.
    fn with_workspace<R>(
        &self,
        batch: usize,
        f: impl FnOnce(&mut VitWorkspace<CpuKernels>) -> Result<R>,
    ) -> Result<R> {
        match self.ws.try_lock() {
            Ok(mut cached) => {
                if cached.as_ref().map_or(true, |w| w.batch() < batch) {
                    // release the old buffers before planning the larger ones
                    *cached = None;
                    *cached = Some(self.on.workspace(&K, batch)?);
                }
                f(cached.as_mut().expect("planned above"))
            }
            Err(_) => f(&mut self.on.workspace(&K, batch)?),
        }
    }

    fn block_forward_buf(
        &self,
        i: usize,
        x: &CpuBuf,
        batch: usize,
        drop: Option<&DropPath>,
    ) -> Result<Vec<f32>> {
        let (n, d) = (T::SIZE, W::SIZE);
        self.rows_ok("the block input", x.len(), batch, n * d)?;
        self.block_ok(i)?;
        let drop = self.drop_scales(drop, batch)?;
        let mut out = CpuBuf::zeros(batch * n * d);
        self.with_workspace(batch, |ws| {
            self.on
                .block_forward(&K, ws, i, x, batch, drop.as_ref(), &mut out)
        })?;
        Ok(out.into_vec())
    }

    fn block_vjp_buf(
        &self,
        i: usize,
        x: &CpuBuf,
        grad_out: &CpuBuf,
        batch: usize,
        drop: Option<&DropPath>,
    ) -> Result<Vec<f32>> {
        let (n, d) = (T::SIZE, W::SIZE);
        self.rows_ok("the block input", x.len(), batch, n * d)?;
        self.rows_ok("the output gradient", grad_out.len(), batch, n * d)?;
        self.block_ok(i)?;
        let drop = self.drop_scales(drop, batch)?;
        let mut dx = CpuBuf::zeros(batch * n * d);
        self.with_workspace(batch, |ws| {
            self.on
                .block_vjp(&K, ws, i, x, grad_out, batch, drop.as_ref(), &mut dx)
        })?;
        Ok(dx.into_vec())
    }

    fn embed_buf(&self, images: &CpuBuf, batch: usize) -> Result<Vec<f32>> {
        let s = self.spec_ref();
        let (c, img) = (s.in_chans, s.image_size);
        self.rows_ok("the image batch", images.len(), batch, c * img * img)?;
        let mut out = CpuBuf::zeros(batch * T::SIZE * W::SIZE);
        self.with_workspace(batch, |ws| self.on.embed(&K, ws, images, batch, &mut out))?;
        Ok(out.into_vec())
    }

    fn norm_forward_buf(&self, x: &CpuBuf) -> Result<Vec<f32>> {
        let d = W::SIZE;
        if x.len() % d != 0 {
            return Err(DtlError::shape(format!(
                "{}: {} values are not whole rows of width {d}",
                self.spec_ref().name,
                x.len()
            )));
        }
        let mut out = CpuBuf::zeros(x.len());
        self.on.norm_forward(&K, x, x.len() / d, &mut out)?;
        Ok(out.into_vec())
    }

    fn norm_vjp_buf(&self, x: &CpuBuf, grad_out: &CpuBuf) -> Result<Vec<f32>> {
        let d = W::SIZE;
        if x.len() % d != 0 || x.len() != grad_out.len() {
            return Err(DtlError::shape(format!(
                "{}: norm VJP got {} inputs and {} gradients, expected equal whole rows of width {d}",
                self.spec_ref().name,
                x.len(),
                grad_out.len()
            )));
        }
        let mut dx = CpuBuf::zeros(x.len());
        self.on.norm_vjp(&K, x, grad_out, x.len() / d, &mut dx)?;
        Ok(dx.into_vec())
    }

    /// Block `i` on flat activations (batch * tokens * width).
    ///
    /// ```
    /// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    /// let x = vit.embed_flat(&vec![0.1; 3 * 32 * 32], 1).unwrap();
    /// assert_eq!(vit.block_forward_flat(0, &x, 1, None).unwrap().len(), 17 * 48);
    /// ```
    pub fn block_forward_flat(
        &self,
        i: usize,
        x: &[f32],
        batch: usize,
        drop: Option<&DropPath>,
    ) -> Result<Vec<f32>> {
        self.block_forward_buf(i, &CpuBuf::from_slice(x), batch, drop)
    }

    /// Input-only VJP of block `i` on flat buffers; internals are recomputed from `x`.
    ///
    /// ```
    /// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    /// let x = vit.embed_flat(&vec![0.1; 3 * 32 * 32], 1).unwrap();
    /// let g = vit.block_vjp_flat(0, &x, &vec![1.0; x.len()], 1, None).unwrap();
    /// assert_eq!(g.len(), x.len());
    /// ```
    pub fn block_vjp_flat(
        &self,
        i: usize,
        x: &[f32],
        grad_out: &[f32],
        batch: usize,
        drop_path: Option<&DropPath>,
    ) -> Result<Vec<f32>> {
        self.block_vjp_buf(
            i,
            &CpuBuf::from_slice(x),
            &CpuBuf::from_slice(grad_out),
            batch,
            drop_path,
        )
    }

    /// Patch embedding, class token and position embedding on flat NCHW images.
    ///
    /// ```
    /// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    /// assert_eq!(vit.embed_flat(&vec![0.1; 2 * 3 * 32 * 32], 2).unwrap().len(), 2 * 17 * 48);
    /// ```
    pub fn embed_flat(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.embed_buf(&CpuBuf::from_slice(images), batch)
    }

    /// The final LayerNorm on flat rows of width `W`.
    ///
    /// ```
    /// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    /// let y = vit.norm_forward_flat(&(0..96).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    /// assert!(y[..48].iter().sum::<f32>().abs() < 1e-3); // unit weight, zero bias
    /// ```
    pub fn norm_forward_flat(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.norm_forward_buf(&CpuBuf::from_slice(x))
    }

    /// Input-only VJP of the final LayerNorm on flat rows.
    ///
    /// ```
    /// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    /// let x: Vec<f32> = (0..48).map(|i| i as f32).collect();
    /// let g = vit.norm_vjp_flat(&x, &vec![1.0; 48]).unwrap();
    /// assert!(g.iter().all(|v| v.abs() < 1e-5)); // a constant gradient vanishes
    /// ```
    pub fn norm_vjp_flat(&self, x: &[f32], grad_out: &[f32]) -> Result<Vec<f32>> {
        self.norm_vjp_buf(&CpuBuf::from_slice(x), &CpuBuf::from_slice(grad_out))
    }

    /// The whole frozen forward: embedding, every block, final norm on all tokens (timm's
    /// `forward_features`). Returns flat (batch, tokens, width).
    ///
    /// ```
    /// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    /// let y = vit.forward_features_flat(&vec![0.1; 3 * 32 * 32], 1).unwrap();
    /// assert_eq!(y.len(), 17 * 48);
    /// ```
    pub fn forward_features_flat(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let mut x = CpuBuf::from_vec(self.embed_flat(images, batch)?);
        for i in 0..self.spec_ref().depth {
            x = CpuBuf::from_vec(self.block_forward_buf(i, &x, batch, None)?);
        }
        self.norm_forward_buf(&x)
    }
}

type Tok<T, W> = flat::Tokens<T, W, Cpu>;
type Rows<W> = flat::Rows<W, Cpu>;

impl<T: ConstDim, W: ConstDim> Backbone<Cpu> for Vit<T, W> {
    type Tokens = T;
    type Width = W;

    fn spec(&self) -> &BackboneSpec {
        self.on.spec()
    }

    fn embed(&self, images: &Images<Cpu>) -> Result<Tok<T, W>> {
        flat::embed(self.on.spec(), images, |v, b| self.embed_buf(&v, b))
    }

    fn block_forward(
        &self,
        block: usize,
        x: &Tok<T, W>,
        drop: Option<&DropPath>,
    ) -> Result<Tok<T, W>> {
        flat::block(x, |v, b| self.block_forward_buf(block, &v, b, drop))
    }

    fn block_vjp(
        &self,
        block: usize,
        x: &Tok<T, W>,
        grad_out: &Tok<T, W>,
        drop: Option<&DropPath>,
    ) -> Result<Tok<T, W>> {
        flat::block_vjp(self.on.spec(), x, grad_out, |v, g, b| {
            self.block_vjp_buf(block, &v, &g, b, drop)
        })
    }

    fn norm_forward(&self, x: &Rows<W>) -> Result<Rows<W>> {
        flat::rows(x, |v| self.norm_forward_buf(&v))
    }

    fn norm_vjp(&self, x: &Rows<W>, grad_out: &Rows<W>) -> Result<Rows<W>> {
        flat::rows_vjp(x, grad_out, |v, g| self.norm_vjp_buf(&v, &g))
    }
}
