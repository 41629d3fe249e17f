//! A Swin variant's hyper-parameters and the per-stage, per-block geometry derived from them.

use dtl_core::{BackboneSpec, DtlError, Result, StageSpec};

/// The hyper-parameters of a timm `SwinTransformer` (timm 1.0 layout): what a variant is.
///
/// Stage `s` has width `embed_dim * 2^s`, `heads[s]` heads and a token grid of
/// `image_size / patch_size / 2^s` per side. Its blocks attend inside windows of
/// `window` x `window` tokens, every odd block of a stage shifted by `window / 2`; a stage
/// whose grid is no larger than the window uses one window of the grid's size and no shift
/// (as timm does).
///
/// ```
/// let c = dtl_swin::SwinConfig::new("t", 224, 4, 96, &[2, 2, 6, 2], &[3, 6, 12, 24], 7);
/// let spec = c.spec();
/// assert_eq!((spec.width, spec.grid, spec.depth), (768, (7, 7), 12));
/// assert_eq!(c.window_of(11), 7);
/// assert_eq!(c.shift_of(1), 3);
/// assert_eq!(c.shift_of(11), 0); // 7 x 7 grid: one window, no shift
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwinConfig {
    /// Registered variant name.
    pub name: String,
    /// Input image side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Input channels (3).
    pub in_chans: usize,
    /// Width of the first stage.
    pub embed_dim: usize,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Attention heads per stage.
    pub heads: Vec<usize>,
    /// Attention window side.
    pub window: usize,
    /// MLP hidden width over the block width.
    pub mlp_ratio: usize,
}

impl SwinConfig {
    /// A config with 3 input channels and MLP ratio 4.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2, 2, 2], &[1, 2, 2, 4], 4);
    /// assert_eq!(c.stages(), 4);
    /// ```
    pub fn new(
        name: &str,
        image_size: usize,
        patch_size: usize,
        embed_dim: usize,
        depths: &[usize],
        heads: &[usize],
        window: usize,
    ) -> Self {
        SwinConfig {
            name: name.to_string(),
            image_size,
            patch_size,
            in_chans: 3,
            embed_dim,
            depths: depths.to_vec(),
            heads: heads.to_vec(),
            window,
            mlp_ratio: 4,
        }
    }

    /// Number of stages.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 224, 4, 96, &[2, 2, 6, 2], &[3, 6, 12, 24], 7);
    /// assert_eq!(c.stages(), 4);
    /// ```
    pub fn stages(&self) -> usize {
        self.depths.len()
    }

    /// Width of stage `s`.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 224, 4, 96, &[2, 2, 6, 2], &[3, 6, 12, 24], 7);
    /// assert_eq!(c.width(2), 384);
    /// ```
    pub fn width(&self, s: usize) -> usize {
        self.embed_dim << s
    }

    /// Token grid side of stage `s`.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 224, 4, 96, &[2, 2, 6, 2], &[3, 6, 12, 24], 7);
    /// assert_eq!(c.resolution(1), 28);
    /// ```
    pub fn resolution(&self, s: usize) -> usize {
        (self.image_size / self.patch_size.max(1)) >> s
    }

    /// The stage holding global block `block` and the block's index inside it.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 224, 4, 96, &[2, 2, 6, 2], &[3, 6, 12, 24], 7);
    /// assert_eq!(c.locate(5), Some((2, 1)));
    /// assert_eq!(c.locate(12), None);
    /// ```
    pub fn locate(&self, block: usize) -> Option<(usize, usize)> {
        let mut start = 0;
        for (s, &d) in self.depths.iter().enumerate() {
            if block < start + d {
                return Some((s, block - start));
            }
            start += d;
        }
        None
    }

    /// The window side the blocks of stage `s` use: the configured one, or the stage's grid
    /// side when that is no larger.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2, 2, 2], &[1, 2, 2, 4], 4);
    /// assert_eq!((c.stage_window(0), c.stage_window(3)), (4, 2));
    /// ```
    pub fn stage_window(&self, s: usize) -> usize {
        let r = self.resolution(s);
        if r <= self.window {
            r
        } else {
            self.window
        }
    }

    /// Window side of global block `block` (0 past the depth).
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2, 2, 2], &[1, 2, 2, 4], 4);
    /// assert_eq!(c.window_of(7), 2);
    /// ```
    pub fn window_of(&self, block: usize) -> usize {
        self.locate(block).map_or(0, |(s, _)| self.stage_window(s))
    }

    /// Cyclic shift of global block `block`: `window / 2` for the odd blocks of a stage whose
    /// grid is larger than the window, else 0.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2, 2, 2], &[1, 2, 2, 4], 4);
    /// assert_eq!((c.shift_of(0), c.shift_of(1), c.shift_of(3), c.shift_of(5)), (0, 2, 2, 0));
    /// ```
    pub fn shift_of(&self, block: usize) -> usize {
        match self.locate(block) {
            Some((s, j)) if j % 2 == 1 && self.resolution(s) > self.window => self.window / 2,
            _ => 0,
        }
    }

    /// Entries of the relative-position bias table of stage `s`: `(2 w - 1)^2` for its window `w`.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 224, 4, 96, &[2, 2, 6, 2], &[3, 6, 12, 24], 7);
    /// assert_eq!(c.table_len(0), 169);
    /// ```
    pub fn table_len(&self, s: usize) -> usize {
        let w = 2 * self.stage_window(s) - 1;
        w * w
    }

    /// Checks that the geometry is one the blocks can run: whole patches, a grid that halves
    /// evenly at every stage transition, windows that tile every stage's grid, widths that
    /// split into the heads.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 224, 4, 96, &[2, 2, 6, 2], &[3, 6, 12, 24], 7);
    /// assert!(c.check().is_ok());
    /// let bad = dtl_swin::SwinConfig::new("bad", 224, 4, 96, &[2, 2], &[3, 5], 7);
    /// assert!(bad.check().unwrap_err().to_string().contains("5 heads"));
    /// ```
    pub fn check(&self) -> Result<()> {
        let n = &self.name;
        let bad = |m: String| Err(DtlError::invalid(format!("{n}: {m}")));
        if self.depths.is_empty() || self.depths.len() != self.heads.len() {
            return bad(format!(
                "{} stage depths and {} head counts given; give one of each per stage",
                self.depths.len(),
                self.heads.len()
            ));
        }
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            return bad(format!(
                "image size {} is not a whole number of {}-pixel patches",
                self.image_size, self.patch_size
            ));
        }
        if self.window == 0 || self.embed_dim == 0 || self.mlp_ratio == 0 {
            return bad("the window, embedding width and MLP ratio must be positive".into());
        }
        let g0 = self.image_size / self.patch_size;
        for s in 0..self.stages() {
            if s > 0 && (g0 >> (s - 1)) % 2 != 0 {
                return bad(format!(
                    "stage {s}: the {0}x{0} grid of stage {1} cannot be halved by patch merging",
                    g0 >> (s - 1),
                    s - 1
                ));
            }
            let (r, w) = (self.resolution(s), self.stage_window(s));
            if r == 0 || r % w != 0 {
                return bad(format!(
                    "stage {s}: the {r}x{r} grid is not a whole number of {w}x{w} windows"
                ));
            }
            let (c, h) = (self.width(s), self.heads[s]);
            if h == 0 || c % h != 0 {
                return bad(format!(
                    "stage {s}: width {c} is not divisible by {h} heads"
                ));
            }
            if self.depths[s] == 0 {
                return bad(format!("stage {s} has no blocks"));
            }
        }
        Ok(())
    }

    /// The spec the runner and the side network see: one [`StageSpec`] per stage, no prefix
    /// tokens, LayerNorm eps 1e-5; the top-level width, heads, grid and MLP width are the last
    /// stage's.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2, 2, 2], &[1, 2, 2, 4], 4);
    /// let s = c.spec();
    /// assert_eq!(s.stages[1].blocks, (2, 4));
    /// assert_eq!((s.stages[1].width, s.stages[1].grid), (32, (8, 8)));
    /// assert_eq!((s.tokens(), s.mlp_hidden, s.norm_eps), (4, 512, 1e-5));
    /// ```
    pub fn spec(&self) -> BackboneSpec {
        let mut start = 0;
        let stages: Vec<StageSpec> = self
            .depths
            .iter()
            .enumerate()
            .map(|(s, &d)| {
                let r = self.resolution(s);
                let st = StageSpec {
                    blocks: (start, start + d),
                    width: self.width(s),
                    heads: self.heads.get(s).copied().unwrap_or(1),
                    grid: (r, r),
                    prefix_tokens: 0,
                };
                start += d;
                st
            })
            .collect();
        let last = stages.last().cloned().unwrap_or(StageSpec {
            blocks: (0, 0),
            width: self.embed_dim,
            heads: 1,
            grid: (0, 0),
            prefix_tokens: 0,
        });
        BackboneSpec {
            name: self.name.clone(),
            image_size: self.image_size,
            patch_size: self.patch_size,
            in_chans: self.in_chans,
            width: last.width,
            depth: start,
            heads: last.heads,
            mlp_hidden: self.mlp_ratio * last.width,
            prefix_tokens: 0,
            grid: last.grid,
            norm_eps: 1e-5,
            stages,
            parameters: Some(self.parameter_count()),
            attention_tokens: Some(self.window * self.window),
        }
    }

    /// Parameters of the frozen backbone (patch embedding, blocks with their position-bias
    /// tables, patch mergings, final norm; no classifier).
    ///
    /// ```
    /// // timm's swin_tiny_patch4_window7_224 has 28.29M parameters with its 1000-class head
    /// let c = dtl_swin::SwinConfig::new("t", 224, 4, 96, &[2, 2, 6, 2], &[3, 6, 12, 24], 7);
    /// assert_eq!(c.parameter_count() + 768 * 1000 + 1000, 28_288_354);
    /// ```
    pub fn parameter_count(&self) -> usize {
        let p = self.patch_size;
        let c0 = self.embed_dim;
        let mut n = self.in_chans * p * p * c0 + c0 + 2 * c0;
        for s in 0..self.stages() {
            let c = self.width(s);
            let h = self.mlp_ratio * c;
            if s > 0 {
                let cin = self.width(s - 1);
                n += 2 * 4 * cin + 4 * cin * c;
            }
            let block = 2 * c
                + (3 * c * c + 3 * c)
                + (c * c + c)
                + self.table_len(s) * self.heads[s]
                + 2 * c
                + (c * h + h)
                + (h * c + c);
            n += self.depths[s] * block;
        }
        n + 2 * self.width(self.stages() - 1)
    }
}
