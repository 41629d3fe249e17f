//! The training step, from batch to update: the model of a pipeline built through the
//! registry ([`build_model`]), the stochastic-depth masks of one step ([`drop_masks`]), the
//! forward and backward pass ([`loss_and_grads`]) and one AdamW update with optional
//! clipping ([`train_step`]), on any [`TrainDevice`].
//!
//! The training loop ([`crate::job`]) and the throughput measurement ([`crate::bench`]) both
//! run their steps through this module.
//!
//! ```
//! use std::sync::Arc;
//! use dfdx::prelude::*;
//! use dtl_core::{Backbone, PipelineConfig};
//! use dtl_runner::{model::smoothed_targets, optim::AdamW, step, toy::ToyBackbone};
//! let cfg = PipelineConfig::from_str(
//!     "[backbone]\nkind = \"toy\"\n[data]\nkind = \"image-folder\"\nroot = \".\"\n",
//!     "toy.toml".as_ref(), &[]).unwrap();
//! let dev = Cpu::default();
//! let bb = Arc::new(ToyBackbone::new(&dev, 0));
//! let mut model = step::build_model(&cfg, &bb, 2, &dev).unwrap();
//! let mut opt = AdamW::from_config(&cfg.optim, &model.params(), &dev);
//! let s = bb.spec().image_size;
//! let images: dtl_core::Images<Cpu> =
//!     dev.tensor_from_vec(vec![0.5; 2 * 3 * s * s], (2, Const::<3>, s, s));
//! let targets = smoothed_targets(&[0, 1], 2, 0.0);
//! let drops = step::drop_masks(0.1, bb.spec().depth, 2, cfg.run.seed, 0);
//! let loss = step::train_step(&mut model, &mut opt, &images, &targets, &drops, 1e-3, Some(1.0))
//!     .unwrap();
//! assert!(loss.is_finite());
//! ```

use std::sync::Arc;

use dfdx::prelude::*;
use dtl_core::{Backbone, DropPath, PipelineConfig, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::device::{dev_err, TrainDevice};
use crate::model::Model;
use crate::optim::{clip_grad_norm, AdamW, Flat};

/// Builds the model of `cfg` on `backbone` through the registry, on `dev` (side network and
/// head initialised from `run.seed`, identically on every device).
pub fn build_model<B: Backbone<D>, D: TrainDevice>(
    cfg: &PipelineConfig,
    backbone: &Arc<B>,
    classes: usize,
    dev: &D,
) -> Result<Model<B, D>> {
    let init = Cpu::seed_from_u64(cfg.run.seed);
    let (side, head) = D::build_parts(cfg, backbone.spec(), classes, &init, dev)?;
    Ok(Model::new(
        Arc::clone(backbone),
        side,
        head,
        cfg.head.pool == "cls",
    ))
}

/// The outcome of one forward and backward pass.
#[derive(Debug, Clone)]
pub struct StepGrads<D: TrainDevice = Cpu> {
    /// The mean loss.
    pub loss: f32,
    /// The logits, (batch, classes) row-major.
    pub logits: Vec<f32>,
    /// The gradient of every trainable tensor, in [`Model::params`] order, on the device.
    pub grads: Vec<Flat<D>>,
}

impl<D: TrainDevice> StepGrads<D> {
    /// The gradients on the host.
    pub fn host_grads(&self) -> Vec<Vec<f32>> {
        self.grads.iter().map(|g| g.as_vec()).collect()
    }
}

/// Forward and backward pass of one batch: loss, logits and every trainable gradient.
///
/// ```
/// use std::sync::Arc;
/// use dfdx::prelude::*;
/// use dtl_core::{Backbone, PipelineConfig};
/// use dtl_runner::{model::smoothed_targets, step, toy::ToyBackbone};
/// let cfg = PipelineConfig::from_str(
///     "[backbone]\nkind = \"toy\"\n[data]\nkind = \"image-folder\"\nroot = \".\"\n",
///     "toy.toml".as_ref(), &[]).unwrap();
/// let dev = Cpu::default();
/// let bb = Arc::new(ToyBackbone::new(&dev, 0));
/// let model = step::build_model(&cfg, &bb, 2, &dev).unwrap();
/// let s = bb.spec().image_size;
/// let images: dtl_core::Images<Cpu> =
///     dev.tensor_from_vec(vec![0.5; 2 * 3 * s * s], (2, Const::<3>, s, s));
/// let drops = step::drop_masks(0.0, bb.spec().depth, 2, 0, 0);
/// let out = step::loss_and_grads(&model, &images, &smoothed_targets(&[0, 1], 2, 0.0), &drops)
///     .unwrap();
/// assert_eq!((out.logits.len(), out.host_grads().len()), (4, model.params().len()));
/// ```
pub fn loss_and_grads<B: Backbone<D>, D: TrainDevice>(
    model: &Model<B, D>,
    images: &dtl_core::Images<D>,
    targets: &[f32],
    drops: &[Option<Arc<DropPath>>],
) -> Result<StepGrads<D>> {
    let logits = model.forward_train(images, drops)?;
    let logit_values = logits.as_vec();
    let loss = D::soft_cross_entropy(logits, targets)?;
    let value = loss.as_vec()[0];
    // A record left by a backward pass nobody checked is not this step's.
    let _ = dtl_core::tape::check_backward();
    let mut grads = loss.backward();
    dtl_core::tape::check_backward()?;
    let mut gs = Vec::new();
    for p in model.params() {
        // A parameter the loss does not reach gets a zero gradient.
        grads.try_alloc_for(&p.value).map_err(dev_err)?;
        gs.push(grads.get(&p.value));
    }
    Ok(StepGrads {
        loss: value,
        logits: logit_values,
        grads: gs,
    })
}

/// One optimisation step; returns the loss before the update.
pub fn train_step<B: Backbone<D>, D: TrainDevice>(
    model: &mut Model<B, D>,
    opt: &mut AdamW<D>,
    images: &dtl_core::Images<D>,
    targets: &[f32],
    drops: &[Option<Arc<DropPath>>],
    lr: f64,
    clip: Option<f64>,
) -> Result<f32> {
    let StepGrads {
        loss, mut grads, ..
    } = loss_and_grads(model, images, targets, drops)?;
    if let Some(c) = clip {
        clip_grad_norm(&mut grads, c)?;
    }
    opt.step(model.params_mut(), &grads, lr)?;
    Ok(loss)
}

/// Stochastic-depth masks for every block of one step, drawn from a generator seeded by the
/// run seed and the global step (so a resumed run draws the same masks).
///
/// ```
/// use dtl_runner::step::drop_masks;
/// assert!(drop_masks(0.0, 4, 2, 7, 3).iter().all(Option::is_none));
/// let (a, b) = (drop_masks(0.2, 4, 2, 7, 3), drop_masks(0.2, 4, 2, 7, 3));
/// assert_eq!(a.len(), 4);
/// assert_eq!(a, b);
/// ```
pub fn drop_masks(
    rate: f64,
    depth: usize,
    batch: usize,
    seed: u64,
    step: u64,
) -> Vec<Option<Arc<DropPath>>> {
    if rate <= 0.0 {
        return vec![None; depth];
    }
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0xD0F),
    );
    DropPath::block_rates(rate, depth)
        .into_iter()
        .map(|r| DropPath::sample(r, batch, &mut rng).map(Arc::new))
        .collect()
}
