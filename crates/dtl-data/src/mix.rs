//! `mixup` and `cutmix`: batch-level ops with timm `Mixup` semantics (batch mode) that mix
//! each image with its mirror in the batch (`i` with `n - 1 - i`) and produce soft targets
//! with label smoothing.

use dtl_core::config::AugmentOp;
use dtl_core::data::{BatchAugment, TensorBatch};
use dtl_core::{Augment, AugmentEntry, DtlError, Result, Sample};
use rand::{Rng, RngCore};
use rand_distr::{Beta, Distribution};

use crate::ops::randint;
use crate::params::Params;

/// Mixup and/or cutmix with timm's batch-mode semantics.
///
/// With probability `prob` a batch is mixed; when both alphas are positive, cutmix is chosen
/// with probability `switch_prob`. The mixing weight `lam` is drawn from `Beta(alpha,
/// alpha)`; cutmix pastes a box of relative side `sqrt(1 - lam)` from the mirrored batch and
/// corrects `lam` to the pasted area. Targets are `lam * y + (1 - lam) * y_mirror` with
/// `y = one_hot * (1 - smoothing) + smoothing / classes`.
///
/// ```
/// use dtl_core::data::{BatchAugment, TensorBatch};
/// let mix = dtl_data::mix::Mix { mixup_alpha: 1.0, cutmix_alpha: 0.0, cutmix_minmax: None, prob: 1.0, switch_prob: 0.5, label_smoothing: 0.0 };
/// let mut b = TensorBatch::new(vec![1.0, 0.0], 1, 1, 1, vec![0, 1], 2).unwrap();
/// use rand::SeedableRng;
/// mix.apply_batch(&mut b, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3)).unwrap();
/// let t = b.soft_targets.unwrap();
/// // Each row sums to one and the image holds the same mix as its target.
/// assert!((t[0] + t[1] - 1.0).abs() < 1e-6);
/// assert!((b.images[0] - t[0]).abs() < 1e-6);
/// ```
#[derive(Debug, Clone)]
pub struct Mix {
    /// Beta parameter of mixup (0 = off).
    pub mixup_alpha: f64,
    /// Beta parameter of cutmix (0 = off).
    pub cutmix_alpha: f64,
    /// Box side range as fractions of the image (replaces the Beta draw when set).
    pub cutmix_minmax: Option<[f64; 2]>,
    /// Probability that a batch is mixed.
    pub prob: f64,
    /// Probability of cutmix rather than mixup when both are on.
    pub switch_prob: f64,
    /// Label smoothing of the soft targets.
    pub label_smoothing: f64,
}

fn beta(alpha: f64, rng: &mut dyn RngCore) -> f64 {
    match Beta::new(alpha, alpha) {
        Ok(d) => d.sample(rng),
        Err(_) => 1.0,
    }
}

impl Mix {
    /// `lam` and whether cutmix is used, drawn for one batch.
    fn params(&self, rng: &mut dyn RngCore) -> (f64, bool) {
        let cutmix_on = self.cutmix_alpha > 0.0 || self.cutmix_minmax.is_some();
        if rng.gen::<f64>() >= self.prob {
            return (1.0, false);
        }
        if self.mixup_alpha > 0.0 && cutmix_on {
            let cut = rng.gen::<f64>() < self.switch_prob;
            let lam = if cut {
                if self.cutmix_minmax.is_some() {
                    1.0
                } else {
                    beta(self.cutmix_alpha, rng)
                }
            } else {
                beta(self.mixup_alpha, rng)
            };
            (lam, cut)
        } else if self.mixup_alpha > 0.0 {
            (beta(self.mixup_alpha, rng), false)
        } else if cutmix_on {
            let lam = if self.cutmix_minmax.is_some() {
                1.0
            } else {
                beta(self.cutmix_alpha, rng)
            };
            (lam, true)
        } else {
            (1.0, false)
        }
    }

    /// The cutmix box `(top, bottom, left, right)` for `lam`.
    fn bbox(
        &self,
        h: usize,
        w: usize,
        lam: f64,
        rng: &mut dyn RngCore,
    ) -> (usize, usize, usize, usize) {
        if let Some([lo, hi]) = self.cutmix_minmax {
            let ch = randint(rng, (h as f64 * lo) as i64, (h as f64 * hi) as i64) as usize;
            let cw = randint(rng, (w as f64 * lo) as i64, (w as f64 * hi) as i64) as usize;
            let top = randint(rng, 0, (h - ch.min(h)) as i64) as usize;
            let left = randint(rng, 0, (w - cw.min(w)) as i64) as usize;
            return (top, (top + ch).min(h), left, (left + cw).min(w));
        }
        let ratio = (1.0 - lam).max(0.0).sqrt();
        let ch = (h as f64 * ratio) as i64;
        let cw = (w as f64 * ratio) as i64;
        let cy = randint(rng, 0, h as i64);
        let cx = randint(rng, 0, w as i64);
        let clip = |v: i64, n: usize| v.clamp(0, n as i64) as usize;
        (
            clip(cy - ch / 2, h),
            clip(cy + ch / 2, h),
            clip(cx - cw / 2, w),
            clip(cx + cw / 2, w),
        )
    }
}

impl Augment for Mix {
    fn apply(&self, _sample: Sample, _rng: &mut dyn RngCore) -> Result<Sample> {
        Err(DtlError::argument(
            "mixup/cutmix work on whole batches; list them under `augment.batch`",
        ))
    }

    fn as_batch(&self) -> Option<&dyn BatchAugment> {
        Some(self)
    }
}

impl BatchAugment for Mix {
    fn apply_batch(&self, b: &mut TensorBatch, rng: &mut dyn RngCore) -> Result<()> {
        let n = b.n();
        let classes = b.num_classes;
        if let Some(&bad) = b.labels.iter().find(|&&l| l >= classes) {
            return Err(DtlError::label_range(bad, classes));
        }
        let (mut lam, cut) = self.params(rng);
        let per = b.image_len();
        if lam < 1.0 || cut {
            let orig = b.images.clone();
            if cut {
                let (t, bo, l, r) = self.bbox(b.height, b.width, lam, rng);
                for i in 0..n {
                    let j = n - 1 - i;
                    for c in 0..b.channels {
                        for y in t..bo {
                            let row = (c * b.height + y) * b.width;
                            let d = i * per + row;
                            let s = j * per + row;
                            b.images[d + l..d + r].copy_from_slice(&orig[s + l..s + r]);
                        }
                    }
                }
                lam = 1.0 - ((bo - t) * (r - l)) as f64 / (b.height * b.width) as f64;
            } else {
                let lf = lam as f32;
                for i in 0..n {
                    let j = n - 1 - i;
                    for k in 0..per {
                        b.images[i * per + k] =
                            orig[i * per + k] * lf + orig[j * per + k] * (1.0 - lf);
                    }
                }
            }
        }
        let off = (self.label_smoothing / classes as f64) as f32;
        let on = (1.0 - self.label_smoothing) as f32 + off;
        let lf = lam as f32;
        let mut t = vec![0f32; n * classes];
        for i in 0..n {
            let row = &mut t[i * classes..(i + 1) * classes];
            for v in row.iter_mut() {
                *v = off;
            }
            row[b.labels[i]] += (on - off) * lf;
            row[b.labels[n - 1 - i]] += (on - off) * (1.0 - lf);
        }
        b.soft_targets = Some(t);
        Ok(())
    }
}

fn build(op: &AugmentOp, path: &str, cutmix: bool) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let alpha = p.f64_or("alpha", 1.0)?;
    let other_key = if cutmix {
        "mixup_alpha"
    } else {
        "cutmix_alpha"
    };
    let other = p.f64_or(other_key, 0.0)?;
    for (k, v) in [("alpha", alpha), (other_key, other)] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(p.err(k, format!("must be 0 or more, got {v}")));
        }
    }
    let (mixup_alpha, cutmix_alpha) = if cutmix {
        (other, alpha)
    } else {
        (alpha, other)
    };
    let cutmix_minmax = match p.f64s_opt("minmax", 2)? {
        Some(v) if 0.0 < v[0] && v[0] <= v[1] && v[1] <= 1.0 => Some([v[0], v[1]]),
        Some(v) => {
            return Err(p.err(
                "minmax",
                format!(
                    "must be [lo, hi] with 0 < lo <= hi <= 1, got [{}, {}]",
                    v[0], v[1]
                ),
            ))
        }
        None => None,
    };
    if cutmix_minmax.is_some() && !cutmix {
        return Err(p.err("minmax", "belongs to `cutmix`"));
    }
    let prob = p.prob_or("prob", 1.0)?;
    let switch_prob = p.prob_or("switch_prob", 0.5)?;
    let label_smoothing = p.f64_or("label_smoothing", 0.0)?;
    if !(0.0..1.0).contains(&label_smoothing) {
        return Err(p.err(
            "label_smoothing",
            format!("must be in [0, 1), got {label_smoothing}"),
        ));
    }
    p.finish()?;
    Ok(Box::new(Mix {
        mixup_alpha,
        cutmix_alpha,
        cutmix_minmax,
        prob,
        switch_prob,
        label_smoothing,
    }))
}

fn build_mixup(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    build(op, path, false)
}

fn build_cutmix(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    build(op, path, true)
}

inventory::submit! { AugmentEntry { name: "mixup", description: "batch op: timm mixup (alpha, cutmix_alpha, prob, switch_prob, label_smoothing)", build: build_mixup, origin: module_path!() } }
inventory::submit! { AugmentEntry { name: "cutmix", description: "batch op: timm cutmix (alpha, mixup_alpha, minmax, prob, switch_prob, label_smoothing)", build: build_cutmix, origin: module_path!() } }
