//! The frozen backbone: a function with a forward and an input-only vector-Jacobian
//! product per block, never traced by autodiff.

use dfdx::prelude::*;
use rand::Rng;

use crate::Result;

/// Runtime description of a backbone variant: the numbers a pipeline is validated against
/// and a side network is built for.
///
/// ```
/// use dtl_core::BackboneSpec;
/// let spec = BackboneSpec::vit("vit_tiny_patch16_224", 224, 16, 192, 12, 3);
/// assert_eq!(spec.tokens(), 197);
/// assert_eq!(spec.grid, (14, 14));
/// assert_eq!(spec.mlp_hidden, 768);
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackboneSpec {
    /// Registered variant name, e.g. `vit_base_patch16_224`.
    pub name: String,
    /// Input image side in pixels (square inputs).
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Input channels (3).
    pub in_chans: usize,
    /// Token width D.
    pub width: usize,
    /// Number of blocks L.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Hidden width of the MLP.
    pub mlp_hidden: usize,
    /// Tokens before the patch tokens (1 for a class token).
    pub prefix_tokens: usize,
    /// Patch grid (rows, columns).
    pub grid: (usize, usize),
    /// Epsilon of every LayerNorm.
    pub norm_eps: f64,
    /// The stages, in order, covering blocks `0..depth`: one for a plain ViT; one per
    /// resolution for a hierarchical backbone such as Swin, whose width and token grid change
    /// between stages. The top-level `width`, `grid` and `prefix_tokens` are those of the last
    /// stage (what the final norm, the pooling and the head see).
    pub stages: Vec<StageSpec>,
    /// Parameters of the frozen backbone, for a layout other than the ViT's (set by the
    /// plugin; [`BackboneSpec::parameter_count`] returns it). `None`: the ViT layout's count.
    pub parameters: Option<usize>,
    /// Tokens one attention call sees when that is fewer than a sample's (a Swin window:
    /// 49 for a 7 x 7 window), for memory estimates. `None`: all tokens of a sample.
    pub attention_tokens: Option<usize>,
}

/// One stage of a backbone: a run of consecutive blocks that share a width and a token grid.
///
/// ```
/// use dtl_core::StageSpec;
/// let s = StageSpec { blocks: (2, 4), width: 32, heads: 2, grid: (8, 8), prefix_tokens: 0 };
/// assert_eq!(s.tokens(), 64);
/// assert!(s.contains(3) && !s.contains(4));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StageSpec {
    /// Global indices of the stage's blocks: `start..end`.
    pub blocks: (usize, usize),
    /// Token width of the stage.
    pub width: usize,
    /// Attention heads of the stage's blocks.
    pub heads: usize,
    /// Token grid of the stage (rows, columns).
    pub grid: (usize, usize),
    /// Tokens before the grid tokens (1 for a ViT's class token, 0 for Swin).
    pub prefix_tokens: usize,
}

impl StageSpec {
    /// All tokens of one sample: prefix plus grid.
    pub fn tokens(&self) -> usize {
        self.prefix_tokens + self.grid.0 * self.grid.1
    }

    /// Whether global block `block` belongs to this stage.
    pub fn contains(&self, block: usize) -> bool {
        (self.blocks.0..self.blocks.1).contains(&block)
    }
}

impl BackboneSpec {
    /// A timm-style ViT spec: class token, MLP ratio 4, LayerNorm eps 1e-6.
    pub fn vit(
        name: &str,
        image_size: usize,
        patch_size: usize,
        width: usize,
        depth: usize,
        heads: usize,
    ) -> Self {
        let g = image_size / patch_size;
        BackboneSpec {
            name: name.to_string(),
            image_size,
            patch_size,
            in_chans: 3,
            width,
            depth,
            heads,
            mlp_hidden: 4 * width,
            prefix_tokens: 1,
            grid: (g, g),
            norm_eps: 1e-6,
            stages: vec![StageSpec {
                blocks: (0, depth),
                width,
                heads,
                grid: (g, g),
                prefix_tokens: 1,
            }],
            parameters: None,
            attention_tokens: None,
        }
    }

    /// The spec with its single stage made to agree with the top-level fields again, after a
    /// struct update of a [`BackboneSpec::vit`] spec changed `grid`, `width`, `depth`, `heads` or
    /// `prefix_tokens` (a no-op for a hierarchical spec).
    ///
    /// ```
    /// use dtl_core::BackboneSpec;
    /// let s = BackboneSpec { grid: (1, 1), ..BackboneSpec::vit("toy", 8, 8, 4, 1, 1) }.single_stage();
    /// assert_eq!(s.stages[0].grid, (1, 1));
    /// ```
    pub fn single_stage(mut self) -> Self {
        if self.stages.len() <= 1 {
            self.stages = vec![StageSpec {
                blocks: (0, self.depth),
                width: self.width,
                heads: self.heads,
                grid: self.grid,
                prefix_tokens: self.prefix_tokens,
            }];
        }
        self
    }

    /// Whether the backbone has more than one stage (its width or tokens change with depth).
    pub fn is_hierarchical(&self) -> bool {
        self.stages.len() > 1
    }

    /// Index of the stage holding global block `block` (the last stage when past the depth).
    ///
    /// ```
    /// let spec = dtl_core::BackboneSpec::vit("vit_tiny_patch16_224", 224, 16, 192, 12, 3);
    /// assert_eq!(spec.stage_of(11), 0);
    /// ```
    pub fn stage_of(&self, block: usize) -> usize {
        self.stages
            .iter()
            .position(|s| s.contains(block))
            .unwrap_or(self.stages.len().saturating_sub(1))
    }

    /// The stage holding global block `block`.
    pub fn stage(&self, block: usize) -> &StageSpec {
        &self.stages[self.stage_of(block)]
    }

    /// All tokens: prefix plus patches.
    pub fn tokens(&self) -> usize {
        self.prefix_tokens + self.grid.0 * self.grid.1
    }

    /// Number of patch tokens.
    pub fn patches(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// Parameters of the frozen backbone, for reports: [`BackboneSpec::parameters`] when the
    /// plugin set it, else the ViT layout's count.
    ///
    /// ```
    /// let spec = dtl_core::BackboneSpec::vit("vit_base_patch16_224", 224, 16, 768, 12, 12);
    /// assert_eq!(spec.parameter_count(), 85_798_656);
    /// ```
    pub fn parameter_count(&self) -> usize {
        if let Some(n) = self.parameters {
            return n;
        }
        let d = self.width;
        let h = self.mlp_hidden;
        let embed = self.in_chans * self.patch_size * self.patch_size * d + d;
        let prefix = self.prefix_tokens * d;
        let pos = self.tokens() * d;
        let block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d);
        embed + prefix + pos + self.depth * block + 2 * d
    }
}

/// Per-sample stochastic-depth scales of one block in one training step.
///
/// Each entry is `0` (the residual branch is dropped for that sample) or `1 / keep`.
/// The same value is used by the block's forward and its VJP, so recomputation is exact.
///
/// ```
/// use dtl_core::DropPath;
/// use rand::SeedableRng;
/// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
/// assert!(DropPath::sample(0.0, 4, &mut rng).is_none());
/// let d = DropPath::sample(0.5, 4, &mut rng).unwrap();
/// assert!(d.attn.iter().all(|&s| s == 0.0 || s == 2.0));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DropPath {
    /// Scale of the attention branch, one per sample.
    pub attn: Vec<f32>,
    /// Scale of the MLP branch, one per sample.
    pub mlp: Vec<f32>,
}

impl DropPath {
    /// Draws the masks for `batch` samples at drop probability `rate`; `None` when `rate` is 0.
    pub fn sample(rate: f64, batch: usize, rng: &mut impl Rng) -> Option<Self> {
        if rate <= 0.0 {
            return None;
        }
        let keep = 1.0 - rate;
        let mut draw = || {
            (0..batch)
                .map(|_| {
                    if rng.gen::<f64>() < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect::<Vec<f32>>()
        };
        let attn = draw();
        let mlp = draw();
        Some(DropPath { attn, mlp })
    }

    /// timm's per-block rates: linearly spaced from 0 to `rate` over `depth` blocks.
    ///
    /// ```
    /// assert_eq!(dtl_core::DropPath::block_rates(0.2, 3), vec![0.0, 0.1, 0.2]);
    /// ```
    pub fn block_rates(rate: f64, depth: usize) -> Vec<f64> {
        if depth <= 1 {
            return vec![0.0; depth];
        }
        (0..depth)
            .map(|i| rate * i as f64 / (depth - 1) as f64)
            .collect()
    }
}

/// Token activations of a backbone: (batch, tokens, width) with the backbone's compile-time dims.
pub type TokensOf<B, D, T = NoneTape> =
    Tensor<(usize, <B as Backbone<D>>::Tokens, <B as Backbone<D>>::Width), f32, D, T>;

/// Pooled features of a backbone: (batch, width).
pub type FeaturesOf<B, D, T = NoneTape> = Tensor<(usize, <B as Backbone<D>>::Width), f32, D, T>;

/// Images entering a backbone: (batch, 3, height, width), already normalised.
pub type Images<D> = Tensor<(usize, Const<3>, usize, usize), f32, D>;

/// A frozen vision backbone, split the way disentangled transfer learning needs it.
///
/// The token count and width are compile-time dims, so code written for one variant cannot
/// be handed activations of another. No method records anything on a tape and no weight
/// gradient is ever computed: [`Backbone::block_vjp`] returns only the gradient with respect
/// to the block input, recomputing what it needs from that input.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::{Backbone, BackboneSpec, DropPath, Result};
///
/// /// A toy backbone whose blocks double their input.
/// struct Doubler(BackboneSpec);
/// impl Backbone<Cpu> for Doubler {
///     type Tokens = Const<2>;
///     type Width = Const<4>;
///     fn spec(&self) -> &BackboneSpec { &self.0 }
///     fn embed(&self, images: &dtl_core::Images<Cpu>) -> Result<Tensor<(usize, Const<2>, Const<4>), f32, Cpu>> {
///         let b = images.shape().0;
///         Ok(images.device().ones_like(&(b, Const, Const)))
///     }
///     fn block_forward(&self, _i: usize, x: &Tensor<(usize, Const<2>, Const<4>), f32, Cpu>, _d: Option<&DropPath>)
///         -> Result<Tensor<(usize, Const<2>, Const<4>), f32, Cpu>> { Ok(x.clone() * 2.0) }
///     fn block_vjp(&self, _i: usize, _x: &Tensor<(usize, Const<2>, Const<4>), f32, Cpu>,
///         g: &Tensor<(usize, Const<2>, Const<4>), f32, Cpu>, _d: Option<&DropPath>)
///         -> Result<Tensor<(usize, Const<2>, Const<4>), f32, Cpu>> { Ok(g.clone() * 2.0) }
///     fn norm_forward(&self, x: &Tensor<(usize, Const<4>), f32, Cpu>) -> Result<Tensor<(usize, Const<4>), f32, Cpu>> { Ok(x.clone()) }
///     fn norm_vjp(&self, _x: &Tensor<(usize, Const<4>), f32, Cpu>, g: &Tensor<(usize, Const<4>), f32, Cpu>)
///         -> Result<Tensor<(usize, Const<4>), f32, Cpu>> { Ok(g.clone()) }
/// }
/// let spec = BackboneSpec { grid: (1, 1), ..BackboneSpec::vit("doubler", 8, 8, 4, 1, 1) }.single_stage();
/// let dev = Cpu::default();
/// let b = Doubler(spec);
/// let x = b.embed(&dev.zeros_like(&(1, Const::<3>, 8, 8))).unwrap();
/// let y = b.block_forward(0, &x, None).unwrap();
/// assert_eq!(y.as_vec(), vec![2.0; 8]);
/// ```
pub trait Backbone<D: Device<f32>>: 'static {
    /// Token count (prefix + patches) as a compile-time dim.
    type Tokens: ConstDim;
    /// Token width as a compile-time dim.
    type Width: ConstDim;

    /// The variant's numbers.
    fn spec(&self) -> &BackboneSpec;

    /// Number of blocks.
    fn depth(&self) -> usize {
        self.spec().depth
    }

    /// Names of the blocks, in order (timm's `blocks.<i>`).
    fn block_names(&self) -> Vec<String> {
        (0..self.depth()).map(|i| format!("blocks.{i}")).collect()
    }

    /// Patch embedding, prefix tokens and position embedding: `x_0`.
    fn embed(&self, images: &Images<D>) -> Result<TokensOf<Self, D>>;

    /// `x_{i+1} = Block_i(x_i)`; `drop` holds the stochastic-depth scales in training.
    fn block_forward(
        &self,
        block: usize,
        x: &TokensOf<Self, D>,
        drop: Option<&DropPath>,
    ) -> Result<TokensOf<Self, D>>;

    /// The gradient with respect to the block input `x`, given the gradient of the block
    /// output; internals are recomputed from `x`, weights get no gradient.
    fn block_vjp(
        &self,
        block: usize,
        x: &TokensOf<Self, D>,
        grad_out: &TokensOf<Self, D>,
        drop: Option<&DropPath>,
    ) -> Result<TokensOf<Self, D>>;

    /// The final LayerNorm applied row-wise to (rows, width).
    fn norm_forward(
        &self,
        x: &Tensor<(usize, Self::Width), f32, D>,
    ) -> Result<Tensor<(usize, Self::Width), f32, D>>;

    /// Input-only VJP of the final LayerNorm.
    fn norm_vjp(
        &self,
        x: &Tensor<(usize, Self::Width), f32, D>,
        grad_out: &Tensor<(usize, Self::Width), f32, D>,
    ) -> Result<Tensor<(usize, Self::Width), f32, D>>;
}
