//! AdamW with parameter groups and the learning-rate schedule.

use dtl_core::config::{OptimConfig, ScheduleConfig};
use dtl_core::{DtlError, Result};

/// AdamW with PyTorch's semantics (`torch.optim.AdamW`, `amsgrad=False`): decoupled weight
/// decay `p *= 1 - lr * wd` first, then the bias-corrected Adam step
/// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
///
/// Each tensor belongs to the decay group or the no-decay group (names ending in one of
/// `optim.no_decay`, by default `.bias`). The arithmetic runs in f64, the state is kept in f32.
///
/// ```
/// use dtl_runner::optim::AdamW;
/// let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0, vec![(1, true)]);
/// let mut p = vec![vec![1.0f32]];
/// opt.step(&mut p, &[vec![0.5]], 0.1).unwrap();
/// assert!((p[0][0] - 0.9).abs() < 1e-6);
/// ```
#[derive(Debug, Clone)]
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// (numel, decays) per tensor.
    layout: Vec<(usize, bool)>,
    /// First moments.
    pub exp_avg: Vec<Vec<f32>>,
    /// Second moments.
    pub exp_avg_sq: Vec<Vec<f32>>,
    /// Steps taken.
    pub steps: u64,
}

impl AdamW {
    /// An optimizer for tensors of the given `(numel, decays)` layout.
    pub fn new(
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        layout: Vec<(usize, bool)>,
    ) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            exp_avg: layout.iter().map(|&(n, _)| vec![0.0; n]).collect(),
            exp_avg_sq: layout.iter().map(|&(n, _)| vec![0.0; n]).collect(),
            layout,
            steps: 0,
        }
    }

    /// From the `[optim]` section and the parameter names/sizes.
    pub fn from_config(cfg: &OptimConfig, params: &[(String, usize)]) -> Self {
        let layout = params.iter().map(|(n, k)| (*k, cfg.decays(n))).collect();
        AdamW::new(
            cfg.betas[0],
            cfg.betas[1],
            cfg.eps,
            cfg.weight_decay,
            layout,
        )
    }

    /// One update of every tensor with learning rate `lr`.
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if params.len() != self.layout.len() || grads.len() != self.layout.len() {
            return Err(DtlError::invalid(format!(
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
        let step_size = lr / bc1;
        for (i, (&(n, decays), (p, g))) in self
            .layout
            .iter()
            .zip(params.iter_mut().zip(grads))
            .enumerate()
        {
            if p.len() != n || g.len() != n {
                return Err(DtlError::invalid(format!(
                    "optimizer tensor {i} holds {n} values, got {} parameters and {} gradients",
                    p.len(),
                    g.len()
                )));
            }
            let decay = if decays {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            let (m, v) = (&mut self.exp_avg[i], &mut self.exp_avg_sq[i]);
            for k in 0..n {
                let gk = g[k] as f64;
                let mk = m[k] as f64 + (gk - m[k] as f64) * (1.0 - self.beta1);
                let vk = v[k] as f64 * self.beta2 + (1.0 - self.beta2) * gk * gk;
                m[k] = mk as f32;
                v[k] = vk as f32;
                let denom = vk.sqrt() / bc2_sqrt + self.eps;
                p[k] = (p[k] as f64 * decay - step_size * mk / denom) as f32;
            }
        }
        Ok(())
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1). Returns the norm
/// before clipping.
///
/// ```
/// let mut g = vec![vec![3.0f32], vec![4.0]];
/// let n = dtl_runner::optim::clip_grad_norm(&mut g, 1.0);
/// assert!((n - 5.0).abs() < 1e-9);
/// assert!((g[0][0] - 0.6).abs() < 1e-5);
/// ```
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for v in grads.iter_mut().flat_map(|g| g.iter_mut()) {
            *v = (*v as f64 * coef) as f32;
        }
    }
    norm
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
