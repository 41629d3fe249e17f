//! AdamW with parameter groups and the learning-rate schedule.

use dfdx::prelude::*;
use dtl_core::config::{OptimConfig, ScheduleConfig};
use dtl_core::{DtlError, Param, Result};

use crate::device::{dev_err, TrainDevice};

/// A flat tensor on device `D`: a parameter's values, its gradient or an optimizer moment.
pub type Flat<D> = Tensor<(usize,), f32, D>;

/// AdamW with PyTorch's semantics (`torch.optim.AdamW`, `amsgrad=False`): decoupled weight
/// decay `p *= 1 - lr * wd` first, then the bias-corrected Adam step
/// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
///
/// Each tensor belongs to the decay group or the no-decay group (names ending in one of
/// `optim.no_decay`, by default `.bias`). The moments live on the training device and the
/// update runs there, in f32 (the bias corrections are computed in f64).
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::Param;
/// use dtl_runner::optim::AdamW;
/// let dev = Cpu::default();
/// let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0, vec![(1, true)], &dev);
/// let mut p = Param::from_vec(&dev, "w", &[1], vec![1.0]).unwrap();
/// let g = dev.tensor_from_vec(vec![0.5f32], (1,));
/// opt.step(vec![&mut p], &[g], 0.1).unwrap();
/// assert!((p.value.as_vec()[0] - 0.9).abs() < 1e-6);
/// ```
#[derive(Debug, Clone)]
pub struct AdamW<D: TrainDevice = Cpu> {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// (numel, decays) per tensor.
    layout: Vec<(usize, bool)>,
    /// First moments.
    pub exp_avg: Vec<Flat<D>>,
    /// Second moments.
    pub exp_avg_sq: Vec<Flat<D>>,
    /// Steps taken.
    pub steps: u64,
}

impl<D: TrainDevice> AdamW<D> {
    /// An optimizer on `dev` for tensors of the given `(numel, decays)` layout.
    pub fn new(
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        layout: Vec<(usize, bool)>,
        dev: &D,
    ) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            exp_avg: layout.iter().map(|&(n, _)| dev.zeros_like(&(n,))).collect(),
            exp_avg_sq: layout.iter().map(|&(n, _)| dev.zeros_like(&(n,))).collect(),
            layout,
            steps: 0,
        }
    }

    /// From the `[optim]` section, for `params` (their sizes, and their names for the
    /// weight-decay groups).
    pub fn from_config(cfg: &OptimConfig, params: &[&Param<D>], dev: &D) -> Self {
        let layout = params
            .iter()
            .map(|p| (p.numel(), cfg.decays(&p.name)))
            .collect();
        AdamW::new(
            cfg.betas[0],
            cfg.betas[1],
            cfg.eps,
            cfg.weight_decay,
            layout,
            dev,
        )
    }

    /// One update of every tensor with learning rate `lr`.
    pub fn step(&mut self, params: Vec<&mut Param<D>>, grads: &[Flat<D>], lr: f64) -> Result<()> {
        if params.len() != self.layout.len() || grads.len() != self.layout.len() {
            return Err(DtlError::shape(format!(
                "optimizer holds {} tensors, got {} parameters and {} gradients",
                self.layout.len(),
                params.len(),
                grads.len()
            )));
        }
        self.steps += 1;
        let t = self.steps as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        for (i, (&(n, decays), (p, g))) in self
            .layout
            .iter()
            .zip(params.into_iter().zip(grads))
            .enumerate()
        {
            if p.numel() != n || g.shape().0 != n {
                return Err(DtlError::shape(format!(
                    "optimizer tensor {i} holds {n} values, got {} parameters and {} gradients",
                    p.numel(),
                    g.shape().0
                )));
            }
            let m = (self.exp_avg[i].clone() * b1).try_add(g.clone() * (1.0 - b1));
            let m = m.map_err(dev_err)?;
            let v = (self.exp_avg_sq[i].clone() * b2).try_add(g.clone().square() * (1.0 - b2));
            let v = v.map_err(dev_err)?;
            let denom = (v.clone().sqrt() / bc2_sqrt as f32) + self.eps as f32;
            let mut value = p.value.clone();
            if decays && self.weight_decay != 0.0 {
                value = value * (1.0 - lr * self.weight_decay) as f32;
            }
            let update = (m.clone() * step_size).try_div(denom).map_err(dev_err)?;
            let value = value.try_sub(update).map_err(dev_err)?;
            p.value = value;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// The moments on the host, in parameter order (for checkpoints).
    pub fn moments(&self) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        (
            self.exp_avg.iter().map(|t| t.as_vec()).collect(),
            self.exp_avg_sq.iter().map(|t| t.as_vec()).collect(),
        )
    }

    /// Restores tensor `i`'s moments from host values.
    pub fn set_moments(&mut self, i: usize, exp_avg: &[f32], exp_avg_sq: &[f32]) -> Result<()> {
        let n = self.layout.get(i).map(|l| l.0).ok_or_else(|| {
            DtlError::argument(format!(
                "optimizer has {} tensors, no tensor {i}",
                self.layout.len()
            ))
        })?;
        if exp_avg.len() != n || exp_avg_sq.len() != n {
            return Err(DtlError::shape(format!(
                "optimizer tensor {i} holds {n} values, got moments of {} and {}",
                exp_avg.len(),
                exp_avg_sq.len()
            )));
        }
        self.exp_avg[i].copy_from(exp_avg);
        self.exp_avg_sq[i].copy_from(exp_avg_sq);
        Ok(())
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1). Returns the norm
/// before clipping.
///
/// ```
/// use dfdx::prelude::*;
/// let dev = Cpu::default();
/// let mut g = vec![dev.tensor_from_vec(vec![3.0f32], (1,)), dev.tensor_from_vec(vec![4.0f32], (1,))];
/// let n = dtl_runner::optim::clip_grad_norm(&mut g, 1.0).unwrap();
/// assert!((n - 5.0).abs() < 1e-6);
/// assert!((g[0].as_vec()[0] - 0.6).abs() < 1e-5);
/// ```
pub fn clip_grad_norm<D: TrainDevice>(grads: &mut [Flat<D>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        let s = g
            .clone()
            .try_square()
            .and_then(|t| t.try_sum())
            .map_err(dev_err)?;
        sq += s.as_vec()[0] as f64;
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.clone().try_mul(coef as f32).map_err(dev_err)?;
        }
    }
    Ok(norm)
}

/// The learning-rate schedule: timm's `CosineLRScheduler` (warm-up overlapping the cosine,
/// `cycle_limit = 1` so the tail after `t_initial` sits at `lr_min`) or a constant rate with
/// the same linear warm-up, evaluated per epoch or per optimizer step.
///
/// ```
/// use dtl_core::config::ScheduleConfig;
/// use dtl_runner::optim::Schedule;
/// let cfg = ScheduleConfig { epochs: 110, t_initial: Some(100), warmup_epochs: 10, ..Default::default() };
/// let s = Schedule::new(&cfg, 1e-3, 1);
/// assert_eq!(s.lr(0, 0), 1e-7);
/// assert_eq!(s.lr(105, 0), 1e-8);
/// ```
#[derive(Debug, Clone)]
pub struct Schedule {
    cosine: bool,
    base_lr: f64,
    t_initial: f64,
    warmup_t: f64,
    warmup_lr: f64,
    lr_min: f64,
    cycle_decay: f64,
    per_step: bool,
    steps_per_epoch: usize,
}

impl Schedule {
    /// From the `[schedule]` section, the peak rate and the optimizer steps per epoch.
    pub fn new(cfg: &ScheduleConfig, base_lr: f64, steps_per_epoch: usize) -> Self {
        let spe = steps_per_epoch.max(1);
        let per_step = cfg.per == "step";
        let unit = if per_step { spe as f64 } else { 1.0 };
        Schedule {
            cosine: cfg.kind == "cosine",
            base_lr,
            t_initial: cfg.t_initial.unwrap_or(cfg.epochs) as f64 * unit,
            warmup_t: cfg.warmup_epochs as f64 * unit,
            warmup_lr: cfg.warmup_lr,
            lr_min: cfg.min_lr,
            cycle_decay: cfg.cycle_decay,
            per_step,
            steps_per_epoch: spe,
        }
    }

    /// timm's `_get_lr(t)` with `t` in the schedule's unit (epochs or steps).
    pub fn at(&self, t: f64) -> f64 {
        if t < self.warmup_t {
            let slope = (self.base_lr - self.warmup_lr) / self.warmup_t;
            return self.warmup_lr + t * slope;
        }
        if !self.cosine {
            return self.base_lr;
        }
        let i = (t / self.t_initial).floor();
        let t_curr = t - self.t_initial * i;
        if i >= 1.0 {
            return self.lr_min;
        }
        let lr_max = self.base_lr * self.cycle_decay.powf(i);
        self.lr_min
            + 0.5
                * (lr_max - self.lr_min)
                * (1.0 + (std::f64::consts::PI * t_curr / self.t_initial).cos())
    }

    /// The rate used for the step `step_in_epoch` of `epoch`.
    pub fn lr(&self, epoch: usize, step_in_epoch: usize) -> f64 {
        if self.per_step {
            self.at((epoch * self.steps_per_epoch + step_in_epoch) as f64)
        } else {
            self.at(epoch as f64)
        }
    }
}
