//! The per-sample augmentation and preprocessing ops that `[augment]` lists can name.
//!
//! Geometric and photometric ops work on 8-bit pixels ([`Sample::Rgb`]); `to_tensor` and
//! `normalize` turn pixels into a float tensor; `random_erasing` works on the tensor.
//! `hflip` and `center_crop` accept either form. Every op draws its randomness from the
//! per-sample generator it is given, so results depend only on the seed, the epoch and the
//! item, never on the worker that runs it.

use dtl_core::config::AugmentOp;
use dtl_core::{Augment, AugmentEntry, DtlError, FloatImage, Result, RgbImage, Sample};
use rand::{Rng, RngCore};
use rand_distr::StandardNormal;

use crate::params::{Params, Size};
use crate::resample::{self, Interpolation};

/// `lo + (hi - lo) * U[0, 1)`; returns `lo` for an empty range.
pub(crate) fn uniform(rng: &mut dyn RngCore, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

/// An integer in `lo..hi` (exclusive); `lo` when the range is empty.
pub(crate) fn randint(rng: &mut dyn RngCore, lo: i64, hi: i64) -> i64 {
    if hi <= lo + 1 {
        lo
    } else {
        lo + rng.gen_range(0..(hi - lo))
    }
}

fn need_rgb(sample: Sample, op: &str) -> Result<RgbImage> {
    match sample {
        Sample::Rgb(img) => Ok(img),
        Sample::Tensor(_) => Err(DtlError::argument(format!(
            "op `{op}` works on pixels but got a tensor; put it before `to_tensor`/`normalize`"
        ))),
    }
}

fn interpolation(p: &Params<'_>, default: Interpolation) -> Result<Interpolation> {
    match p.str_opt("interpolation")? {
        None => Ok(default),
        Some(s) => s.parse().map_err(|m| p.err("interpolation", m)),
    }
}

/// `resize`: `size` (an integer sets the shorter side, keeping the aspect ratio, like
/// torchvision's `Resize(int)`; `[h, w]` is exact), `interpolation` (`bicubic` default,
/// `bilinear`, `nearest`), PIL-compatible resampling with antialiasing.
///
/// ```
/// use dtl_core::{Augment, RgbImage, Sample};
/// let op = dtl_data::ops::Resize { size: dtl_data::params::Size::Short(2), filter: dtl_data::resample::Interpolation::Bicubic };
/// let out = op.apply(Sample::Rgb(RgbImage::new(4, 8, vec![7; 96]).unwrap()), &mut rand::rngs::mock::StepRng::new(0, 1)).unwrap();
/// match out { Sample::Rgb(i) => assert_eq!((i.width, i.height), (2, 4)), _ => unreachable!() }
/// ```
#[derive(Debug, Clone)]
pub struct Resize {
    /// Target size.
    pub size: Size,
    /// Resampling filter.
    pub filter: Interpolation,
}

impl Augment for Resize {
    fn apply(&self, sample: Sample, _rng: &mut dyn RngCore) -> Result<Sample> {
        let img = need_rgb(sample, "resize")?;
        let (w, h) = self.size.resolve(img.width as usize, img.height as usize);
        Ok(Sample::Rgb(resample::resize(&img, w, h, self.filter)))
    }
}

fn build_resize(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let size = p.size("size")?;
    let filter = interpolation(&p, Interpolation::Bicubic)?;
    p.finish()?;
    Ok(Box::new(Resize { size, filter }))
}

/// `center_crop`: `size` (integer for a square or `[h, w]`); torchvision semantics (offsets
/// rounded half to even, zero padding when the crop is larger than the image).
///
/// ```
/// use dtl_core::{Augment, RgbImage, Sample};
/// let op = dtl_data::ops::CenterCrop { size: dtl_data::params::Size::Short(2) };
/// let img = RgbImage::new(4, 4, (0..48).collect()).unwrap();
/// let out = op.apply(Sample::Rgb(img), &mut rand::rngs::mock::StepRng::new(0, 1)).unwrap();
/// match out { Sample::Rgb(i) => assert_eq!(i.pixel(0, 0), [15, 16, 17]), _ => unreachable!() }
/// ```
#[derive(Debug, Clone)]
pub struct CenterCrop {
    /// Crop size.
    pub size: Size,
}

fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

impl Augment for CenterCrop {
    fn apply(&self, sample: Sample, _rng: &mut dyn RngCore) -> Result<Sample> {
        let (cw, ch) = self.size.square();
        match sample {
            Sample::Rgb(img) => {
                let left = round_half_even((img.width as f64 - cw as f64) / 2.0);
                let top = round_half_even((img.height as f64 - ch as f64) / 2.0);
                Ok(Sample::Rgb(resample::crop(&img, left, top, cw, ch)))
            }
            Sample::Tensor(t) => {
                let left = round_half_even((t.width as f64 - cw as f64) / 2.0);
                let top = round_half_even((t.height as f64 - ch as f64) / 2.0);
                let mut out = FloatImage::zeros(t.channels, ch, cw);
                for c in 0..t.channels {
                    for y in 0..ch as i64 {
                        let sy = top + y;
                        if sy < 0 || sy >= t.height as i64 {
                            continue;
                        }
                        for x in 0..cw as i64 {
                            let sx = left + x;
                            if sx < 0 || sx >= t.width as i64 {
                                continue;
                            }
                            out.data[(c * ch + y as usize) * cw + x as usize] =
                                t.data[(c * t.height + sy as usize) * t.width + sx as usize];
                        }
                    }
                }
                Ok(Sample::Tensor(out))
            }
        }
    }
}

fn build_center_crop(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let size = p.size("size")?;
    p.finish()?;
    Ok(Box::new(CenterCrop { size }))
}

/// `random_resized_crop`: torchvision `RandomResizedCrop` semantics: `size`, `scale`
/// (`[0.08, 1.0]`), `ratio` (`[3/4, 4/3]`), `interpolation` (`bilinear`); up to 10 attempts
/// at a random area and log-uniform aspect ratio, then a centre crop clamped to the ratio
/// range as fallback.
///
/// ```
/// use dtl_core::{Augment, RgbImage, Sample};
/// use dtl_data::{ops::RandomResizedCrop, params::Size, resample::Interpolation};
/// let op = RandomResizedCrop { size: Size::Exact(6, 4), scale: [0.08, 1.0], ratio: [0.75, 4.0 / 3.0], filter: Interpolation::Bicubic };
/// let img = RgbImage::new(20, 10, vec![9; 600]).unwrap();
/// match op.apply(Sample::Rgb(img), &mut rand::rngs::mock::StepRng::new(7, 1 << 59)).unwrap() {
///     Sample::Rgb(out) => assert_eq!((out.width, out.height), (4, 6)),
///     _ => unreachable!(),
/// }
/// ```
#[derive(Debug, Clone)]
pub struct RandomResizedCrop {
    /// Output size.
    pub size: Size,
    /// Range of the crop area as a fraction of the image.
    pub scale: [f64; 2],
    /// Range of the crop aspect ratio (width / height).
    pub ratio: [f64; 2],
    /// Resampling filter.
    pub filter: Interpolation,
}

impl RandomResizedCrop {
    /// The crop `(left, top, width, height)` for an image of `width x height`.
    ///
    /// ```
    /// use dtl_data::{ops::RandomResizedCrop, params::Size, resample::Interpolation};
    /// let op = RandomResizedCrop { size: Size::Short(8), scale: [0.08, 1.0], ratio: [0.75, 4.0 / 3.0], filter: Interpolation::Bilinear };
    /// let (l, t, w, h) = op.params(100, 50, &mut rand::rngs::mock::StepRng::new(1 << 60, 1 << 58));
    /// assert!(l + w <= 100 && t + h <= 50 && w > 0 && h > 0);
    /// ```
    pub fn params(
        &self,
        width: usize,
        height: usize,
        rng: &mut dyn RngCore,
    ) -> (usize, usize, usize, usize) {
        let area = (width * height) as f64;
        let log_ratio = [self.ratio[0].ln(), self.ratio[1].ln()];
        for _ in 0..10 {
            let target = area * uniform(rng, self.scale[0], self.scale[1]);
            let aspect = uniform(rng, log_ratio[0], log_ratio[1]).exp();
            let w = (target * aspect).sqrt().round() as usize;
            let h = (target / aspect).sqrt().round() as usize;
            if w > 0 && w <= width && h > 0 && h <= height {
                let top = randint(rng, 0, (height - h + 1) as i64) as usize;
                let left = randint(rng, 0, (width - w + 1) as i64) as usize;
                return (left, top, w, h);
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (lo, hi) = (
            self.ratio[0].min(self.ratio[1]),
            self.ratio[0].max(self.ratio[1]),
        );
        let (w, h) = if in_ratio < lo {
            (width, ((width as f64 / lo).round() as usize).min(height))
        } else if in_ratio > hi {
            (((height as f64 * hi).round() as usize).min(width), height)
        } else {
            (width, height)
        };
        ((width - w) / 2, (height - h) / 2, w, h)
    }
}

impl Augment for RandomResizedCrop {
    fn apply(&self, sample: Sample, rng: &mut dyn RngCore) -> Result<Sample> {
        let img = need_rgb(sample, "random_resized_crop")?;
        let (l, t, w, h) = self.params(img.width as usize, img.height as usize, rng);
        let c = resample::crop(&img, l as i64, t as i64, w, h);
        let (ow, oh) = self.size.square();
        Ok(Sample::Rgb(resample::resize(&c, ow, oh, self.filter)))
    }
}

fn range2(p: &Params<'_>, key: &'static str, default: [f64; 2]) -> Result<[f64; 2]> {
    match p.f64s_opt(key, 2)? {
        None => Ok(default),
        Some(v) => {
            if !(v[0] > 0.0 && v[0] <= v[1]) {
                return Err(p.err(
                    key,
                    format!(
                        "must be [low, high] with 0 < low <= high, got [{}, {}]",
                        v[0], v[1]
                    ),
                ));
            }
            Ok([v[0], v[1]])
        }
    }
}

fn build_rrc(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let size = p.size("size")?;
    let scale = range2(&p, "scale", [0.08, 1.0])?;
    let ratio = range2(&p, "ratio", [3.0 / 4.0, 4.0 / 3.0])?;
    let filter = interpolation(&p, Interpolation::Bilinear)?;
    p.finish()?;
    Ok(Box::new(RandomResizedCrop {
        size,
        scale,
        ratio,
        filter,
    }))
}

/// `hflip`: mirror left to right with probability `p` (0.5).
///
/// ```
/// use dtl_core::{Augment, RgbImage, Sample};
/// let img = RgbImage::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
/// let out = dtl_data::ops::HFlip { p: 1.0 }.apply(Sample::Rgb(img), &mut rand::rngs::mock::StepRng::new(0, 1)).unwrap();
/// assert_eq!(out, Sample::Rgb(RgbImage::new(2, 1, vec![4, 5, 6, 1, 2, 3]).unwrap()));
/// ```
#[derive(Debug, Clone)]
pub struct HFlip {
    /// Probability of flipping.
    pub p: f64,
}

impl Augment for HFlip {
    fn apply(&self, sample: Sample, rng: &mut dyn RngCore) -> Result<Sample> {
        if rng.gen::<f64>() >= self.p {
            return Ok(sample);
        }
        Ok(match sample {
            Sample::Rgb(img) => Sample::Rgb(resample::hflip(&img)),
            Sample::Tensor(mut t) => {
                for row in t.data.chunks_exact_mut(t.width.max(1)) {
                    row.reverse();
                }
                Sample::Tensor(t)
            }
        })
    }
}

fn build_hflip(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let prob = p.prob_or("p", 0.5)?;
    p.finish()?;
    Ok(Box::new(HFlip { p: prob }))
}

/// `color_jitter`: torchvision `ColorJitter` semantics: `brightness`, `contrast`,
/// `saturation` (a number `x` means factors in `[max(0, 1-x), 1+x]`, or give `[lo, hi]`) and
/// `hue` (`x` means `[-x, x]`, at most 0.5); the four adjustments run in a random order.
///
/// ```
/// use dtl_core::{Augment, RgbImage, Sample};
/// let op = dtl_data::ops::ColorJitter { brightness: Some([0.5, 0.5]), contrast: None, saturation: None, hue: None };
/// let img = RgbImage::new(1, 1, vec![100, 50, 20]).unwrap();
/// let out = op.apply(Sample::Rgb(img), &mut rand::rngs::mock::StepRng::new(0, 1)).unwrap();
/// assert_eq!(out, Sample::Rgb(RgbImage::new(1, 1, vec![50, 25, 10]).unwrap()));
/// ```
#[derive(Debug, Clone)]
pub struct ColorJitter {
    /// Brightness factor range.
    pub brightness: Option<[f64; 2]>,
    /// Contrast factor range.
    pub contrast: Option<[f64; 2]>,
    /// Saturation factor range.
    pub saturation: Option<[f64; 2]>,
    /// Hue shift range (fractions of a turn).
    pub hue: Option<[f64; 2]>,
}

impl Augment for ColorJitter {
    fn apply(&self, sample: Sample, rng: &mut dyn RngCore) -> Result<Sample> {
        let mut img = need_rgb(sample, "color_jitter")?;
        let mut order = [0usize, 1, 2, 3];
        for i in (1..4).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        let mut draw = |r: Option<[f64; 2]>| r.map(|[lo, hi]| uniform(rng, lo, hi));
        let factors = [
            draw(self.brightness),
            draw(self.contrast),
            draw(self.saturation),
            draw(self.hue),
        ];
        for i in order {
            if let Some(f) = factors[i] {
                img = match i {
                    0 => crate::color::brightness(&img, f),
                    1 => crate::color::contrast(&img, f),
                    2 => crate::color::saturation(&img, f),
                    _ => crate::color::hue(&img, f),
                };
            }
        }
        Ok(Sample::Rgb(img))
    }
}

fn jitter_range(p: &Params<'_>, key: &'static str, hue: bool) -> Result<Option<[f64; 2]>> {
    if let Some(v) = p.f64s_opt(key, 2).ok().flatten() {
        let ok = if hue {
            -0.5 <= v[0] && v[0] <= v[1] && v[1] <= 0.5
        } else {
            0.0 <= v[0] && v[0] <= v[1]
        };
        if !ok {
            return Err(p.err(
                key,
                if hue {
                    "must be [lo, hi] with -0.5 <= lo <= hi <= 0.5"
                } else {
                    "must be [lo, hi] with 0 <= lo <= hi"
                },
            ));
        }
        return Ok(Some([v[0], v[1]]));
    }
    match p.f64_opt(key) {
        Ok(None) => Ok(None),
        Ok(Some(x)) if hue => {
            if !(0.0..=0.5).contains(&x) {
                return Err(p.err(key, format!("must be in [0, 0.5], got {x}")));
            }
            Ok((x > 0.0).then_some([-x, x]))
        }
        Ok(Some(x)) => {
            if x < 0.0 {
                return Err(p.err(key, format!("must be 0 or more, got {x}")));
            }
            Ok((x > 0.0).then_some([(1.0 - x).max(0.0), 1.0 + x]))
        }
        Err(_) => Err(p.err(key, "expected a number or [lo, hi]")),
    }
}

fn build_color_jitter(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let op = ColorJitter {
        brightness: jitter_range(&p, "brightness", false)?,
        contrast: jitter_range(&p, "contrast", false)?,
        saturation: jitter_range(&p, "saturation", false)?,
        hue: jitter_range(&p, "hue", true)?,
    };
    p.finish()?;
    Ok(Box::new(op))
}

/// `to_tensor` (`mean`/`std` default to 0 and 1: values in `[0, 1]`) and `normalize`
/// (`mean`/`std` default to `data.mean`/`data.std`): pixels become `(v / 255 - mean) / std`
/// in `CHW` layout; `normalize` on a tensor only applies the mean and std.
///
/// ```
/// use dtl_core::{Augment, RgbImage, Sample};
/// let op = dtl_data::ops::Normalize { mean: [0.5; 3], std: [0.5; 3] };
/// let s = op.apply(Sample::Rgb(RgbImage::new(1, 1, vec![255, 0, 51]).unwrap()), &mut rand::rngs::mock::StepRng::new(0, 1)).unwrap();
/// match s { Sample::Tensor(t) => assert_eq!(t.data, vec![1.0, -1.0, (51.0f32 / 255.0 - 0.5) / 0.5]), _ => unreachable!() }
/// ```
#[derive(Debug, Clone)]
pub struct Normalize {
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

/// Pixels to a normalised `CHW` tensor: `(v / 255 - mean) / std`.
pub fn to_tensor(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> FloatImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let mut t = FloatImage::zeros(3, h, w);
    let plane = w * h;
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            t.data[c * plane + i] = (p[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    t
}

impl Augment for Normalize {
    fn apply(&self, sample: Sample, _rng: &mut dyn RngCore) -> Result<Sample> {
        Ok(Sample::Tensor(match sample {
            Sample::Rgb(img) => to_tensor(&img, self.mean, self.std),
            Sample::Tensor(mut t) => {
                if t.channels != 3 {
                    return Err(DtlError::shape(format!(
                        "op `normalize` needs 3 channels, got {}",
                        t.channels
                    )));
                }
                let plane = t.width * t.height;
                for (i, v) in t.data.iter_mut().enumerate() {
                    let c = i / plane.max(1);
                    *v = (*v - self.mean[c]) / self.std[c];
                }
                t
            }
        }))
    }
}

fn triple(p: &Params<'_>, key: &'static str, default: f32, positive: bool) -> Result<[f32; 3]> {
    let v = match p.f64s_opt(key, 3).ok().flatten() {
        Some(v) => [v[0] as f32, v[1] as f32, v[2] as f32],
        None => match p.f64_opt(key) {
            Ok(Some(x)) => [x as f32; 3],
            Ok(None) => [default; 3],
            Err(_) => return Err(p.err(key, "expected a number or a list of 3 numbers")),
        },
    };
    if positive && v.iter().any(|&s| s <= 0.0) {
        return Err(p.err(key, format!("every value must be positive, got {v:?}")));
    }
    Ok(v)
}

fn build_normalize(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let mean = triple(&p, "mean", 0.5, false)?;
    let std = triple(&p, "std", 0.5, true)?;
    p.finish()?;
    Ok(Box::new(Normalize { mean, std }))
}

fn build_to_tensor(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let mean = triple(&p, "mean", 0.0, false)?;
    let std = triple(&p, "std", 1.0, true)?;
    p.finish()?;
    Ok(Box::new(Normalize { mean, std }))
}

/// How random erasing fills the erased box.
///
/// ```
/// assert_ne!(dtl_data::ops::EraseMode::Const, dtl_data::ops::EraseMode::Pixel);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EraseMode {
    /// Zeros (the normalised mean).
    Const,
    /// One standard-normal value per channel.
    Rand,
    /// Standard-normal noise per pixel.
    Pixel,
}

/// `random_erasing`: timm `RandomErasing` semantics on the normalised tensor: with
/// probability `prob` (0.5), `count` boxes (`min_count`..=`max_count`, 1) of area
/// `min_area`..`max_area` (0.02..1/3) of the image divided by the count and aspect
/// `min_aspect`..`max_aspect` (0.3..1/0.3, log-uniform), up to 10 attempts each, filled per
/// `mode` (`const`, `rand` or `pixel`).
///
/// ```
/// use dtl_core::{Augment, FloatImage, Sample};
/// use dtl_data::ops::{EraseMode, RandomErasing};
/// let op = RandomErasing { prob: 1.0, mode: EraseMode::Const, area: [0.2, 0.3], log_aspect: [0.0, 0.0], count: [1, 1] };
/// let t = FloatImage { channels: 3, height: 10, width: 10, data: vec![1.0; 300] };
/// use rand::SeedableRng;
/// match op.apply(Sample::Tensor(t), &mut rand_chacha::ChaCha8Rng::seed_from_u64(0)).unwrap() {
///     // A square box of side round(sqrt(20..30)) = 4 or 5, zeroed on all channels.
///     Sample::Tensor(o) => assert!([48, 75].contains(&o.data.iter().filter(|&&v| v == 0.0).count())),
///     _ => unreachable!(),
/// }
/// ```
#[derive(Debug, Clone)]
pub struct RandomErasing {
    /// Probability of erasing.
    pub prob: f64,
    /// Fill mode.
    pub mode: EraseMode,
    /// Area range as fractions of the image.
    pub area: [f64; 2],
    /// Log aspect-ratio range.
    pub log_aspect: [f64; 2],
    /// Range of the number of boxes.
    pub count: [usize; 2],
}

impl Augment for RandomErasing {
    fn apply(&self, sample: Sample, rng: &mut dyn RngCore) -> Result<Sample> {
        let mut t = match sample {
            Sample::Tensor(t) => t,
            Sample::Rgb(_) => {
                return Err(DtlError::argument(
                    "op `random_erasing` works on tensors; put it after `normalize`",
                ))
            }
        };
        if rng.gen::<f64>() >= self.prob {
            return Ok(Sample::Tensor(t));
        }
        let (h, w, c) = (t.height, t.width, t.channels);
        let area = (h * w) as f64;
        let count = if self.count[0] == self.count[1] {
            self.count[0]
        } else {
            randint(rng, self.count[0] as i64, self.count[1] as i64 + 1) as usize
        };
        for _ in 0..count {
            for _ in 0..10 {
                let target = uniform(rng, self.area[0], self.area[1]) * area / count as f64;
                let aspect = uniform(rng, self.log_aspect[0], self.log_aspect[1]).exp();
                let eh = (target * aspect).sqrt().round() as usize;
                let ew = (target / aspect).sqrt().round() as usize;
                if ew < w && eh < h {
                    let top = randint(rng, 0, (h - eh + 1) as i64) as usize;
                    let left = randint(rng, 0, (w - ew + 1) as i64) as usize;
                    let per_channel: Vec<f32> = (0..c)
                        .map(|_| match self.mode {
                            EraseMode::Rand => rng.sample::<f32, _>(StandardNormal),
                            _ => 0.0,
                        })
                        .collect();
                    for (ch, &fill) in per_channel.iter().enumerate() {
                        for y in top..top + eh {
                            for x in left..left + ew {
                                t.data[(ch * h + y) * w + x] = match self.mode {
                                    EraseMode::Pixel => rng.sample::<f32, _>(StandardNormal),
                                    _ => fill,
                                };
                            }
                        }
                    }
                    break;
                }
            }
        }
        Ok(Sample::Tensor(t))
    }
}

fn build_random_erasing(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let prob = p.prob_or("prob", 0.5)?;
    let mode = match p.str_opt("mode")?.unwrap_or("const") {
        "const" => EraseMode::Const,
        "rand" => EraseMode::Rand,
        "pixel" => EraseMode::Pixel,
        m => {
            return Err(p.err(
                "mode",
                format!("`{m}` is not an erasing mode; use \"const\", \"rand\" or \"pixel\""),
            ))
        }
    };
    let min_area = p.f64_or("min_area", 0.02)?;
    let max_area = p.f64_or("max_area", 1.0 / 3.0)?;
    if !(0.0 < min_area && min_area <= max_area && max_area <= 1.0) {
        return Err(p.err(
            "max_area",
            format!("need 0 < min_area <= max_area <= 1, got {min_area} and {max_area}"),
        ));
    }
    let min_aspect = p.f64_or("min_aspect", 0.3)?;
    let max_aspect = p.f64_or("max_aspect", 1.0 / min_aspect)?;
    if !(min_aspect > 0.0 && min_aspect <= max_aspect) {
        return Err(p.err(
            "min_aspect",
            format!("need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}"),
        ));
    }
    let min_count = p.usize_opt("min_count")?.unwrap_or(1);
    let max_count = p.usize_opt("max_count")?.unwrap_or(min_count);
    if min_count == 0 || max_count < min_count {
        return Err(p.err(
            "max_count",
            format!("need 1 <= min_count <= max_count, got {min_count} and {max_count}"),
        ));
    }
    p.finish()?;
    Ok(Box::new(RandomErasing {
        prob,
        mode,
        area: [min_area, max_area],
        log_aspect: [min_aspect.ln(), max_aspect.ln()],
        count: [min_count, max_count],
    }))
}

inventory::submit! { AugmentEntry { name: "resize", description: "resize (size = shorter side or [h, w]; bicubic|bilinear|nearest, PIL-compatible)", build: build_resize, origin: module_path!() } }
inventory::submit! { AugmentEntry { name: "center_crop", description: "centre crop to size (integer or [h, w])", build: build_center_crop, origin: module_path!() } }
inventory::submit! { AugmentEntry { name: "random_resized_crop", description: "torchvision RandomResizedCrop (size, scale, ratio, interpolation)", build: build_rrc, origin: module_path!() } }
inventory::submit! { AugmentEntry { name: "hflip", description: "horizontal flip with probability p", build: build_hflip, origin: module_path!() } }
inventory::submit! { AugmentEntry { name: "color_jitter", description: "torchvision ColorJitter (brightness, contrast, saturation, hue)", build: build_color_jitter, origin: module_path!() } }
inventory::submit! { AugmentEntry { name: "normalize", description: "pixels to a CHW tensor, (v/255 - mean) / std (defaults: data.mean, data.std)", build: build_normalize, origin: module_path!() } }
inventory::submit! { AugmentEntry { name: "to_tensor", description: "pixels to a CHW tensor in [0, 1]", build: build_to_tensor, origin: module_path!() } }
inventory::submit! { AugmentEntry { name: "random_erasing", description: "timm RandomErasing on the tensor (prob, mode const|rand|pixel, areas, aspects, counts)", build: build_random_erasing, origin: module_path!() } }

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(11)
    }

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::new(w, h, (0..w * h * 3).map(|i| (i % 251) as u8).collect()).unwrap()
    }

    fn rgb(s: Sample) -> RgbImage {
        match s {
            Sample::Rgb(i) => i,
            Sample::Tensor(_) => panic!("expected pixels"),
        }
    }

    #[test]
    fn center_crop_offsets_round_half_to_even_like_torchvision() {
        // torchvision: left = int(round((7 - 2) / 2.0)) = round(2.5) = 2, top = round(1.5) = 2.
        let img = pattern(7, 5);
        let out = rgb(CenterCrop {
            size: Size::Short(2),
        }
        .apply(Sample::Rgb(img.clone()), &mut rng())
        .unwrap());
        assert_eq!(out.pixel(0, 0), img.pixel(2, 2));
        // A crop larger than the image pads with zeros around it.
        let out = rgb(CenterCrop {
            size: Size::Exact(7, 9),
        }
        .apply(Sample::Rgb(img.clone()), &mut rng())
        .unwrap());
        assert_eq!(out.pixel(0, 0), [0, 0, 0]);
        assert_eq!(out.pixel(1, 1), img.pixel(0, 0));
    }

    #[test]
    fn random_resized_crop_stays_inside_and_falls_back_to_the_centre() {
        let op = RandomResizedCrop {
            size: Size::Short(4),
            scale: [0.08, 1.0],
            ratio: [0.75, 4.0 / 3.0],
            filter: Interpolation::Bilinear,
        };
        let mut r = rng();
        for _ in 0..200 {
            let (l, t, w, h) = op.params(30, 20, &mut r);
            assert!(w >= 1 && h >= 1 && l + w <= 30 && t + h <= 20);
            let ratio = w as f64 / h as f64;
            assert!(ratio > 0.6 && ratio < 1.6, "{ratio}");
        }
        // No attempt can fit an aspect ratio of 10 or more in a square: the centre crop clamped
        // to the smallest allowed ratio is used.
        let wide = RandomResizedCrop {
            ratio: [10.0, 20.0],
            ..op.clone()
        };
        assert_eq!(wide.params(20, 20, &mut r), (0, 9, 20, 2));
        let out = rgb(op.apply(Sample::Rgb(pattern(30, 20)), &mut r).unwrap());
        assert_eq!((out.width, out.height), (4, 4));
    }

    #[test]
    fn random_erasing_modes() {
        let t = FloatImage {
            channels: 3,
            height: 10,
            width: 10,
            data: vec![5.0; 300],
        };
        let mk = |mode| RandomErasing {
            prob: 1.0,
            mode,
            area: [0.1, 0.3],
            log_aspect: [0.3f64.ln(), (1.0 / 0.3f64).ln()],
            count: [1, 1],
        };
        let mut r = rng();
        for _ in 0..20 {
            let out = match mk(EraseMode::Const)
                .apply(Sample::Tensor(t.clone()), &mut r)
                .unwrap()
            {
                Sample::Tensor(o) => o,
                _ => unreachable!(),
            };
            let zeros = out.data.iter().filter(|&&v| v == 0.0).count();
            // One box of 10-30% of the area (after rounding of its sides), on all 3 channels.
            assert!(
                zeros % 3 == 0 && zeros / 3 >= 4 && zeros / 3 <= 40,
                "{zeros}"
            );
        }
        let out = match mk(EraseMode::Pixel)
            .apply(Sample::Tensor(t.clone()), &mut r)
            .unwrap()
        {
            Sample::Tensor(o) => o,
            _ => unreachable!(),
        };
        let changed: Vec<f32> = out.data.iter().copied().filter(|&v| v != 5.0).collect();
        assert!(changed.len() > 3);
        let never = RandomErasing {
            prob: 0.0,
            ..mk(EraseMode::Rand)
        };
        assert_eq!(
            never.apply(Sample::Tensor(t.clone()), &mut r).unwrap(),
            Sample::Tensor(t)
        );
    }

    #[test]
    fn hflip_on_pixels_and_tensors_agree() {
        let img = pattern(5, 3);
        let op = HFlip { p: 1.0 };
        let a = to_tensor(
            &rgb(op.apply(Sample::Rgb(img.clone()), &mut rng()).unwrap()),
            [0.0; 3],
            [1.0; 3],
        );
        let b = op
            .apply(
                Sample::Tensor(to_tensor(&img, [0.0; 3], [1.0; 3])),
                &mut rng(),
            )
            .unwrap();
        assert_eq!(Sample::Tensor(a), b);
    }

    #[test]
    fn color_jitter_ranges() {
        let mut t = toml::Table::new();
        t.insert("brightness".into(), toml::Value::Float(0.4));
        t.insert("hue".into(), toml::Value::Float(0.6));
        let op = AugmentOp {
            op: "color_jitter".into(),
            params: t,
        };
        let e = build_color_jitter(&op, "augment.train[3]")
            .err()
            .unwrap()
            .to_string();
        assert_eq!(e, "augment.train[3].hue: must be in [0, 0.5], got 0.6");
        let mut r = rng();
        let cj = ColorJitter {
            brightness: Some([0.6, 1.4]),
            contrast: None,
            saturation: None,
            hue: None,
        };
        let img = RgbImage::new(1, 1, vec![100, 100, 100]).unwrap();
        for _ in 0..50 {
            let v = rgb(cj.apply(Sample::Rgb(img.clone()), &mut r).unwrap()).data[0];
            assert!((60..=140).contains(&v));
        }
    }
}
