//! The frozen backbone, the side network and the head composed into one model.

use std::sync::Arc;

use dfdx::prelude::*;
use dtl_core::{
    frozen_block, frozen_norm, Act, Backbone, DropPath, DtlError, Head, Images, Param, Result,
    SideNetwork,
};

use crate::device::{TapeOf, TrainDevice};
pub use crate::ops::soft_cross_entropy;

/// A backbone's tokens with the tape of a training step.
type TracedTokens<D, B> =
    Tensor<(usize, <B as Backbone<D>>::Tokens, <B as Backbone<D>>::Width), f32, D, TapeOf<D>>;

/// Logits with the tape of a training step.
pub type Logits<D = Cpu> = Tensor<(usize, usize), f32, D, TapeOf<D>>;

/// A frozen backbone with its trainable side network and head.
///
/// Training runs the blocks before the first inject without a tape, the later ones through
/// [`frozen_block`] (only each block's input is kept), and the linear probe without any tape
/// in the backbone. The backbone never receives a gradient for its weights.
///
/// ```
/// use std::sync::Arc;
/// use dfdx::prelude::*;
/// use dtl_core::BackboneSpec;
/// use dtl_runner::{model::Model, sides::{DtlSide, LinearHead}, toy::ToyBackbone};
/// let dev = Cpu::seed_from_u64(0);
/// let bb = Arc::new(ToyBackbone::new(&dev, 0));
/// let spec = bb.spec_ref().clone();
/// let side = DtlSide::new(&spec, 2, 100.0, vec![0, 1], vec![1], 0, &dev, &dev).unwrap();
/// let head = LinearHead::new(spec.width, 3, &dev, &dev).unwrap();
/// let model = Model::new(bb, Box::new(side), Box::new(head), false);
/// let images = dev.sample_normal_like(&(2, Const::<3>, 8, 8));
/// let logits = model.forward_eval(&images).unwrap();
/// assert_eq!(*logits.shape(), (2, 3));
/// ```
pub struct Model<B: Backbone<D>, D: TrainDevice = Cpu> {
    /// The frozen backbone.
    pub backbone: Arc<B>,
    /// The side network.
    pub side: Box<dyn SideNetwork<D>>,
    /// The classifier.
    pub head: Box<dyn Head<D>>,
    /// Pool the class token instead of the mean of the patch tokens.
    pub cls_pool: bool,
}

fn to3<S, D, T>(x: Tensor<S, f32, D, T>) -> Tensor<(usize, usize, usize), f32, D, T>
where
    S: Shape<Concrete = [usize; 3]> + dfdx::shapes::RealizeShapeTo<(usize, usize, usize)>,
    D: TrainDevice,
    T: dfdx::tensor::Tape<f32, D>,
{
    match x.try_realize::<(usize, usize, usize)>() {
        Ok(v) => v,
        Err(_) => unreachable!("every 3-d shape realizes as runtime dims"),
    }
}

fn to2<S, D, T>(x: Tensor<S, f32, D, T>) -> Tensor<(usize, usize), f32, D, T>
where
    S: Shape<Concrete = [usize; 2]> + dfdx::shapes::RealizeShapeTo<(usize, usize)>,
    D: TrainDevice,
    T: dfdx::tensor::Tape<f32, D>,
{
    match x.try_realize::<(usize, usize)>() {
        Ok(v) => v,
        Err(_) => unreachable!("every 2-d shape realizes as runtime dims"),
    }
}

fn check_inject(
    block: usize,
    got: &(usize, usize, usize),
    want: &(usize, usize, usize),
) -> Result<()> {
    if got != want {
        return Err(DtlError::shape(format!(
            "side network `inject` at block {block} returned shape {got:?}, the tokens are {want:?}"
        )));
    }
    Ok(())
}

fn strip<D: TrainDevice>(t: Act<D>) -> Act<D> {
    t.split_tape().0.put_tape(TapeOf::<D>::default())
}

impl<B: Backbone<D>, D: TrainDevice> Model<B, D> {
    /// Composes the parts.
    pub fn new(
        backbone: Arc<B>,
        side: Box<dyn SideNetwork<D>>,
        head: Box<dyn Head<D>>,
        cls_pool: bool,
    ) -> Self {
        Model {
            backbone,
            side,
            head,
            cls_pool,
        }
    }

    /// Every trainable tensor: the side network's, then the head's.
    pub fn params(&self) -> Vec<&Param<D>> {
        let mut v = self.side.params();
        v.extend(self.head.params());
        v
    }

    /// The same tensors, mutably, in the same order.
    pub fn params_mut(&mut self) -> Vec<&mut Param<D>> {
        let mut v = self.side.params_mut();
        v.extend(self.head.params_mut());
        v
    }

    /// Number of trainable scalars.
    pub fn trainable_params(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }

    fn tokens(&self, x: Act<D>) -> Result<TracedTokens<D, B>> {
        x.try_realize::<(usize, B::Tokens, B::Width)>()
            .map_err(|x| {
                DtlError::shape(format!(
                    "activations of shape {:?} do not fit backbone `{}`",
                    x.shape(),
                    self.backbone.spec().name
                ))
            })
    }

    /// g(z) for `block`, keeping z's history on the returned tensor; z continues with an
    /// empty tape.
    fn inject(&self, block: usize, z: Option<Act<D>>) -> Result<(Act<D>, Option<Act<D>>)> {
        let z = z.ok_or_else(|| {
            DtlError::state(format!(
                "block {block} is injected before any block is tapped"
            ))
        })?;
        let (zd, zt) = z.split_tape();
        let out = self
            .side
            .inject(block, &zd.clone().put_tape(TapeOf::<D>::default()))?;
        let spec = self.backbone.spec();
        check_inject(
            block,
            out.shape(),
            &(zd.shape().0, spec.tokens(), spec.width),
        )?;
        let (od, ot) = out.split_tape();
        Ok((
            od.put_tape(ot.merge(zt)),
            Some(zd.put_tape(TapeOf::<D>::default())),
        ))
    }

    fn head_on(&self, x: Tensor<(usize, usize, usize), f32, D, TapeOf<D>>) -> Result<Logits<D>> {
        let prefix = self.backbone.spec().prefix_tokens;
        let pooled = D::pool(x, prefix, self.cls_pool)?;
        let pooled = pooled
            .try_realize::<(usize, B::Width)>()
            .map_err(|_| DtlError::shape("pooled features do not match the backbone width"))?;
        let f = frozen_norm(&self.backbone, pooled)?;
        self.head.forward(to2(f))
    }

    /// The block loop both forward passes run: for each block of `blocks`, the side
    /// network's tap when the block is tapped (`tap(i, &x, z)` returns the new side state),
    /// the block itself (`block(i, x)`), then g(z) added when the block is one of `injects`
    /// (`inject(i, x, z)`). Returns the tokens after the last block and the side state.
    ///
    /// The passes differ only in what each step keeps for a backward pass, so they pass the
    /// steps in and share the order of operations.
    #[allow(clippy::too_many_arguments)]
    fn block_loop<X>(
        &self,
        blocks: impl IntoIterator<Item = usize>,
        injects: &[usize],
        mut x: X,
        mut z: Option<Act<D>>,
        mut tap: impl FnMut(usize, &X, Option<Act<D>>) -> Result<Act<D>>,
        mut block: impl FnMut(usize, X) -> Result<X>,
        mut inject: impl FnMut(usize, X, Option<Act<D>>) -> Result<(X, Option<Act<D>>)>,
    ) -> Result<(X, Option<Act<D>>)> {
        let taps = self.side.taps();
        for i in blocks {
            if taps.contains(&i) {
                z = Some(tap(i, &x, z)?);
            }
            x = block(i, x)?;
            if injects.contains(&i) {
                (x, z) = inject(i, x, z)?;
            }
        }
        Ok((x, z))
    }

    /// Logits of a training step, with the tape for the backward pass. `drops[i]` holds
    /// block `i`'s stochastic-depth masks (or `None`).
    ///
    /// The blocks up to the first inject run without a tape (their taps see untraced
    /// tokens); from there on the tokens carry the tape and each block is a
    /// [`frozen_block`], which keeps only its input for the backward pass.
    pub fn forward_train(
        &self,
        images: &Images<D>,
        drops: &[Option<Arc<DropPath>>],
    ) -> Result<Logits<D>> {
        let bb = &self.backbone;
        let depth = bb.depth();
        let drop = |i: usize| drops.get(i).cloned().flatten();
        let mut x = bb.embed(images)?;
        if self.side.is_linear_probe() {
            for i in 0..depth {
                x = bb.block_forward(i, &x, drop(i).as_deref())?;
            }
            return self.head_on(to3(x).put_tape(TapeOf::<D>::default()));
        }
        let injects = self.side.injects();
        let first = *injects
            .first()
            .ok_or_else(|| DtlError::invalid("the side network injects into no block"))?;
        // Up to and including the first inject block: no tape, no inject inside the loop.
        let (x, z) = self.block_loop(
            0..=first.min(depth - 1),
            &[],
            x,
            None,
            |i, x, z| self.side.tap_frozen(i, &to3(x.clone()), z),
            |i, x| bb.block_forward(i, &x, drop(i).as_deref()),
            |_, x, z| Ok((x, z)),
        )?;
        // The first inject starts the tape of the tokens (the tape rides on the left operand).
        let (inj, z) = self.inject(first, z)?;
        let xt: Act<D> = inj + to3(x);
        let (xt, _) = self.block_loop(
            first + 1..depth,
            injects,
            xt,
            z,
            |i, xt, z| self.side.tap(i, xt.with_empty_tape(), z),
            |i, xt| Ok(to3(frozen_block(bb, i, self.tokens(xt)?, drop(i))?)),
            |i, xt, z| {
                let (inj, rest) = self.inject(i, z)?;
                Ok((xt + inj, rest))
            },
        )?;
        self.head_on(xt)
    }

    /// Logits without any tape kept (evaluation).
    pub fn forward_eval(&self, images: &Images<D>) -> Result<Tensor<(usize, usize), f32, D>> {
        let bb = &self.backbone;
        let x = bb.embed(images)?;
        let injects = self.side.injects();
        let (x, _) = self.block_loop(
            0..bb.depth(),
            injects,
            x,
            None,
            |i, x, z| Ok(strip(self.side.tap_frozen(i, &to3(x.clone()), z)?)),
            |i, x| bb.block_forward(i, &x, None),
            |i, x, z| {
                let zz = z.as_ref().ok_or_else(|| {
                    DtlError::state(format!("block {i} is injected before any block is tapped"))
                })?;
                let inj = self.side.inject(i, &zz.with_empty_tape())?.split_tape().0;
                let x3 = to3(x);
                check_inject(i, inj.shape(), x3.shape())?;
                let sum = x3 + inj;
                let x = sum
                    .try_realize::<(usize, B::Tokens, B::Width)>()
                    .map_err(|_| {
                        DtlError::shape("side network output does not match the backbone's tokens")
                    })?;
                Ok((x, z))
            },
        )?;
        let prefix = bb.spec().prefix_tokens;
        let pooled = D::pool(to3(x), prefix, self.cls_pool)?
            .try_realize::<(usize, B::Width)>()
            .map_err(|_| DtlError::shape("pooled features do not match the backbone width"))?;
        let f = to2(bb.norm_forward(&pooled)?);
        Ok(self
            .head
            .forward(f.put_tape(TapeOf::<D>::default()))?
            .split_tape()
            .0)
    }
}

/// Targets for hard labels with label smoothing `s`: `(1 - s) * onehot + s / C`.
///
/// ```
/// assert_eq!(dtl_runner::model::smoothed_targets(&[1], 2, 0.0), vec![0.0, 1.0]);
/// assert_eq!(dtl_runner::model::smoothed_targets(&[0], 2, 0.5), vec![0.75, 0.25]);
/// ```
pub fn smoothed_targets(labels: &[usize], classes: usize, smoothing: f64) -> Vec<f32> {
    let off = smoothing / classes as f64;
    let mut t = vec![off as f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        if l < classes {
            t[i * classes + l] = (1.0 - smoothing + off) as f32;
        }
    }
    t
}
