//! The frozen backbone, the side network and the head composed into one model.

use std::sync::Arc;

use dfdx::prelude::*;
use dtl_core::{
    frozen_block, frozen_norm, Act, Backbone, DropPath, DtlError, Head, Images, Param, Result,
    SideNetwork,
};

use crate::device::{dev_err, TapeOf, TrainDevice};

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
        return Err(DtlError::invalid(format!(
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
                DtlError::invalid(format!(
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
            DtlError::invalid(format!(
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
            .map_err(|_| DtlError::invalid("pooled features do not match the backbone width"))?;
        let f = frozen_norm(&self.backbone, pooled)?;
        self.head.forward(to2(f))
    }

    /// Logits of a training step, with the tape for the backward pass. `drops[i]` holds
    /// block `i`'s stochastic-depth masks (or `None`).
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
        let taps = self.side.taps().to_vec();
        let injects = self.side.injects().to_vec();
        let first = *injects
            .first()
            .ok_or_else(|| DtlError::invalid("the side network injects into no block"))?;
        let mut z: Option<Act<D>> = None;
        for i in 0..=first.min(depth - 1) {
            if taps.contains(&i) {
                z = Some(self.side.tap_frozen(i, &to3(x.clone()), z)?);
            }
            x = bb.block_forward(i, &x, drop(i).as_deref())?;
        }
        let (inj, rest) = self.inject(first, z)?;
        z = rest;
        let mut xt: Act<D> = inj + to3(x);
        for i in first + 1..depth {
            if taps.contains(&i) {
                z = Some(self.side.tap(i, xt.with_empty_tape(), z)?);
            }
            xt = to3(frozen_block(bb, i, self.tokens(xt)?, drop(i))?);
            if injects.contains(&i) {
                let (inj, rest) = self.inject(i, z)?;
                z = rest;
                xt = xt + inj;
            }
        }
        self.head_on(xt)
    }

    /// Logits without any tape kept (evaluation).
    pub fn forward_eval(&self, images: &Images<D>) -> Result<Tensor<(usize, usize), f32, D>> {
        let bb = &self.backbone;
        let mut x = bb.embed(images)?;
        let mut z: Option<Act<D>> = None;
        let taps = self.side.taps().to_vec();
        let injects = self.side.injects().to_vec();
        for i in 0..bb.depth() {
            if taps.contains(&i) {
                z = Some(strip(self.side.tap_frozen(i, &to3(x.clone()), z)?));
            }
            x = bb.block_forward(i, &x, None)?;
            if injects.contains(&i) {
                let zz = z.as_ref().ok_or_else(|| {
                    DtlError::invalid(format!("block {i} is injected before any block is tapped"))
                })?;
                let inj = self.side.inject(i, &zz.with_empty_tape())?.split_tape().0;
                let x3 = to3(x);
                check_inject(i, inj.shape(), x3.shape())?;
                let sum = x3 + inj;
                x = sum
                    .try_realize::<(usize, B::Tokens, B::Width)>()
                    .map_err(|_| {
                        DtlError::invalid(
                            "side network output does not match the backbone's tokens",
                        )
                    })?;
            }
        }
        let prefix = bb.spec().prefix_tokens;
        let pooled = D::pool(to3(x), prefix, self.cls_pool)?
            .try_realize::<(usize, B::Width)>()
            .map_err(|_| DtlError::invalid("pooled features do not match the backbone width"))?;
        let f = to2(bb.norm_forward(&pooled)?);
        Ok(self
            .head
            .forward(f.put_tape(TapeOf::<D>::default()))?
            .split_tape()
            .0)
    }
}

/// Soft-target cross entropy averaged over the batch: `-sum(targets * log_softmax(logits)) / B`.
///
/// `targets` is (batch, classes) row-major; computed in f64.
///
/// ```
/// use dfdx::prelude::*;
/// let dev = Cpu::default();
/// let logits = dev.tensor_from_vec(vec![0.0f32, 0.0], (1, 2)).leaky_traced();
/// let loss = dtl_runner::model::soft_cross_entropy(logits, &[1.0, 0.0]).unwrap();
/// assert!((loss.array() - std::f32::consts::LN_2).abs() < 1e-6);
/// ```
pub fn soft_cross_entropy(
    logits: Logits,
    targets: &[f32],
) -> Result<Tensor<Rank0, f32, Cpu, TapeOf<Cpu>>> {
    let (bs, c) = *logits.shape();
    if targets.len() != bs * c {
        return Err(DtlError::invalid(format!(
            "targets hold {} values, logits are {bs}x{c}",
            targets.len()
        )));
    }
    let (l, mut tape) = logits.split_tape();
    let lv = l.as_vec();
    let mut loss = 0f64;
    let mut grad = vec![0f32; bs * c];
    for ((row, t), g) in lv
        .chunks_exact(c)
        .zip(targets.chunks_exact(c))
        .zip(grad.chunks_exact_mut(c))
    {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        let tsum: f64 = t.iter().map(|&v| v as f64).sum();
        for j in 0..c {
            let logp = row[j] as f64 - lse;
            loss -= t[j] as f64 * logp;
            g[j] = ((logp.exp() * tsum - t[j] as f64) / bs as f64) as f32;
        }
    }
    let dev = l.device().clone();
    let mut out: Tensor<Rank0, f32, Cpu> = dev.try_zeros().map_err(dev_err)?;
    out.copy_from(&[(loss / bs as f64) as f32]);
    let out_ghost = out.ghost();
    let l_ghost = l.ghost();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let go = grads.get(&out_ghost).as_vec()[0];
        let gl = grads.get_or_alloc_mut(&l_ghost)?;
        for (o, g) in gl.iter_mut().zip(&grad) {
            *o += go * g;
        }
        Ok(())
    });
    Ok(out.put_tape(tape))
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
