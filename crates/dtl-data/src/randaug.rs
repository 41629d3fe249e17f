//! `rand_augment`: RandAugment with timm's configuration-string meaning.
//!
//! `config = "rand-m9-mstd0.5-inc1"` means: magnitude 9 (of 10), magnitude drawn per op from
//! a normal distribution with standard deviation 0.5 and clipped to `[0, 10]`, the
//! "increasing" op set (stronger with magnitude for every op), 2 ops per image (`n`), each
//! applied with probability 0.5. The op set is timm's: AutoContrast, Equalize, Invert,
//! Rotate, Posterize, Solarize, SolarizeAdd, Color, Contrast, Brightness, Sharpness, ShearX,
//! ShearY, TranslateXRel, TranslateYRel. Geometric ops fill uncovered pixels with the dataset
//! mean and pick bilinear or bicubic sampling at random.

use dtl_core::config::AugmentOp;
use dtl_core::{Augment, AugmentEntry, DtlError, Result, RgbImage, Sample};
use rand::{Rng, RngCore};
use rand_distr::StandardNormal;

use crate::color;
use crate::params::Params;
use crate::resample::{affine, Interpolation};

/// The ops of the RandAugment op set.
///
/// ```
/// use dtl_data::randaug::{RandOp, RAND_OPS};
/// assert_eq!(RAND_OPS.len(), 15);
/// assert_eq!(RAND_OPS[3], RandOp::Rotate);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandOp {
    /// Per-channel range stretch.
    AutoContrast,
    /// Per-channel histogram equalisation.
    Equalize,
    /// `255 - v`.
    Invert,
    /// Rotation by up to 30 degrees.
    Rotate,
    /// Keep fewer bits (4 down to 0 bits as the magnitude grows in the increasing set).
    Posterize,
    /// Invert values above a threshold.
    Solarize,
    /// Add up to 110 to values below 128.
    SolarizeAdd,
    /// Saturation factor.
    Color,
    /// Contrast factor.
    Contrast,
    /// Brightness factor.
    Brightness,
    /// Sharpness factor.
    Sharpness,
    /// Horizontal shear up to 0.3.
    ShearX,
    /// Vertical shear up to 0.3.
    ShearY,
    /// Horizontal translation up to 45% of the width.
    TranslateX,
    /// Vertical translation up to 45% of the height.
    TranslateY,
}

/// timm's op list, in its order.
pub const RAND_OPS: [RandOp; 15] = [
    RandOp::AutoContrast,
    RandOp::Equalize,
    RandOp::Invert,
    RandOp::Rotate,
    RandOp::Posterize,
    RandOp::Solarize,
    RandOp::SolarizeAdd,
    RandOp::Color,
    RandOp::Contrast,
    RandOp::Brightness,
    RandOp::Sharpness,
    RandOp::ShearX,
    RandOp::ShearY,
    RandOp::TranslateX,
    RandOp::TranslateY,
];

/// RandAugment's settings.
///
/// ```
/// let r = dtl_data::randaug::RandAugment::parse("rand-m9-mstd0.5-inc1").unwrap();
/// assert_eq!((r.magnitude, r.magnitude_std, r.increasing, r.num_ops), (9.0, 0.5, true, 2));
/// assert!(dtl_data::randaug::RandAugment::parse("rand-q3").is_err());
/// ```
#[derive(Debug, Clone)]
pub struct RandAugment {
    /// Ops per image.
    pub num_ops: usize,
    /// Magnitude, on a 0-10 scale.
    pub magnitude: f64,
    /// Standard deviation of the per-op magnitude (`inf` = uniform in `[0, magnitude]`).
    pub magnitude_std: f64,
    /// Upper clip of the magnitude.
    pub magnitude_max: f64,
    /// Probability that each chosen op applies.
    pub prob: f64,
    /// The increasing op variants (timm `inc1`).
    pub increasing: bool,
    /// Fill colour of geometric ops.
    pub fill: [u8; 3],
    /// Fixed filter, or `None` to pick bilinear or bicubic at random.
    pub filter: Option<Interpolation>,
}

impl Default for RandAugment {
    fn default() -> Self {
        RandAugment {
            num_ops: 2,
            magnitude: 10.0,
            magnitude_std: 0.0,
            magnitude_max: 10.0,
            prob: 0.5,
            increasing: false,
            fill: [128; 3],
            filter: None,
        }
    }
}

impl RandAugment {
    /// Parses a timm configuration string `rand-m9-n2-mstd0.5-mmax10-inc1-p0.5`.
    pub fn parse(config: &str) -> std::result::Result<Self, String> {
        let mut r = RandAugment::default();
        let mut parts = config.split('-');
        if parts.next() != Some("rand") {
            return Err(format!(
                "`{config}` is not a RandAugment string; it must start with \"rand\", e.g. \"rand-m9-mstd0.5-inc1\""
            ));
        }
        for part in parts {
            let bad = || {
                format!("`{part}` in `{config}` is not understood; use m<magnitude>, n<ops>, mstd<std>, mmax<max>, inc<0|1>, p<prob>")
            };
            let num = |s: &str| s.parse::<f64>().map_err(|_| bad());
            if let Some(v) = part.strip_prefix("mstd") {
                r.magnitude_std = num(v)?;
            } else if let Some(v) = part.strip_prefix("mmax") {
                r.magnitude_max = num(v)?;
            } else if let Some(v) = part.strip_prefix("inc") {
                r.increasing = num(v)? != 0.0;
            } else if let Some(v) = part.strip_prefix('m') {
                r.magnitude = num(v)?;
            } else if let Some(v) = part.strip_prefix('n') {
                r.num_ops = num(v)? as usize;
            } else if let Some(v) = part.strip_prefix('p') {
                r.prob = num(v)?;
            } else {
                return Err(bad());
            }
        }
        Ok(r)
    }

    fn apply_op(&self, op: RandOp, img: &RgbImage, level: f64, rng: &mut dyn RngCore) -> RgbImage {
        let frac = level / 10.0;
        let mut negate = |x: f64| if rng.gen::<f64>() < 0.5 { -x } else { x };
        // Enhancement factor: 1 +- 0.9 frac (increasing) or 0.1 + 1.8 frac.
        let enhance = |negate: &mut dyn FnMut(f64) -> f64| {
            if self.increasing {
                1.0 + negate(frac * 0.9)
            } else {
                frac * 1.8 + 0.1
            }
        };
        match op {
            RandOp::AutoContrast => color::autocontrast(img),
            RandOp::Equalize => color::equalize(img),
            RandOp::Invert => color::invert(img),
            RandOp::Posterize => {
                let bits = if self.increasing {
                    4 - (frac * 4.0) as i64
                } else {
                    (frac * 4.0) as i64
                };
                color::posterize(img, bits.clamp(0, 8) as u32)
            }
            RandOp::Solarize => {
                let t = if self.increasing {
                    256 - (frac * 256.0) as i64
                } else {
                    (frac * 256.0) as i64
                };
                color::solarize(img, t.clamp(0, 256) as u32)
            }
            RandOp::SolarizeAdd => color::solarize_add(img, (frac * 110.0) as i32, 128),
            RandOp::Color => color::saturation(img, enhance(&mut negate)),
            RandOp::Contrast => color::contrast(img, enhance(&mut negate)),
            RandOp::Brightness => color::brightness(img, enhance(&mut negate)),
            RandOp::Sharpness => color::sharpness(img, enhance(&mut negate)),
            RandOp::Rotate
            | RandOp::ShearX
            | RandOp::ShearY
            | RandOp::TranslateX
            | RandOp::TranslateY => {
                let amount = match op {
                    RandOp::Rotate => negate(frac * 30.0),
                    RandOp::ShearX | RandOp::ShearY => negate(frac * 0.3),
                    _ => negate(frac * 0.45),
                };
                let filter = self.filter.unwrap_or_else(|| {
                    if rng.gen::<bool>() {
                        Interpolation::Bilinear
                    } else {
                        Interpolation::Bicubic
                    }
                });
                let m = geometry_matrix(op, amount, img.width as f64, img.height as f64);
                affine(img, m, filter, self.fill)
            }
        }
    }
}

/// The inverse affine map (output to input coordinates, PIL's convention) of a geometric
/// op: `Rotate` by `amount` degrees counter-clockwise about the centre, `ShearX`/`ShearY` by
/// `amount`, `TranslateX`/`TranslateY` by `amount` times the width/height. Other ops get the
/// identity.
///
/// ```
/// use dtl_data::randaug::{geometry_matrix, RandOp};
/// assert_eq!(geometry_matrix(RandOp::TranslateX, 0.25, 8.0, 4.0), [1.0, 0.0, 2.0, 0.0, 1.0, 0.0]);
/// ```
pub fn geometry_matrix(op: RandOp, amount: f64, w: f64, h: f64) -> [f64; 6] {
    match op {
        RandOp::Rotate => {
            let a = -amount.to_radians();
            let (c, s) = (a.cos(), a.sin());
            let (cx, cy) = (w / 2.0, h / 2.0);
            [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy]
        }
        RandOp::ShearX => [1.0, amount, 0.0, 0.0, 1.0, 0.0],
        RandOp::ShearY => [1.0, 0.0, 0.0, amount, 1.0, 0.0],
        RandOp::TranslateX => [1.0, 0.0, amount * w, 0.0, 1.0, 0.0],
        RandOp::TranslateY => [1.0, 0.0, 0.0, 0.0, 1.0, amount * h],
        _ => [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    }
}

impl Augment for RandAugment {
    fn apply(&self, sample: Sample, rng: &mut dyn RngCore) -> Result<Sample> {
        let mut img = match sample {
            Sample::Rgb(img) => img,
            Sample::Tensor(_) => {
                return Err(DtlError::argument(
                    "op `rand_augment` works on pixels but got a tensor; put it before `to_tensor`/`normalize`",
                ))
            }
        };
        for _ in 0..self.num_ops {
            let op = RAND_OPS[rng.gen_range(0..RAND_OPS.len())];
            if self.prob < 1.0 && rng.gen::<f64>() > self.prob {
                continue;
            }
            let mut m = self.magnitude;
            if self.magnitude_std > 0.0 {
                if self.magnitude_std.is_infinite() {
                    m = crate::ops::uniform(rng, 0.0, m);
                } else {
                    m += self.magnitude_std * rng.sample::<f64, _>(StandardNormal);
                }
            }
            let level = m.clamp(0.0, self.magnitude_max);
            img = self.apply_op(op, &img, level, rng);
        }
        Ok(Sample::Rgb(img))
    }
}

fn build_rand_augment(op: &AugmentOp, path: &str) -> Result<Box<dyn Augment>> {
    let p = Params::new(&op.op, &op.params, path);
    let mut r = match p.str_opt("config")? {
        Some(s) => RandAugment::parse(s).map_err(|m| p.err("config", m))?,
        None => RandAugment::default(),
    };
    if let Some(m) = p.f64_opt("magnitude")? {
        r.magnitude = m;
    }
    if let Some(n) = p.usize_opt("num_ops")? {
        r.num_ops = n;
    }
    if r.num_ops > dtl_core::limits::MAX_RAND_AUGMENT_OPS {
        let key = if p.has("num_ops") {
            "num_ops"
        } else {
            "config"
        };
        return Err(p.err(
            key,
            format!(
                "{} ops per image is more than {}; timm's RandAugment draws 2 or 3",
                r.num_ops,
                dtl_core::limits::MAX_RAND_AUGMENT_OPS
            ),
        ));
    }
    if let Some(s) = p.f64_opt("magnitude_std")? {
        r.magnitude_std = s;
    }
    if let Some(s) = p.f64_opt("magnitude_max")? {
        r.magnitude_max = s;
    }
    r.increasing = p.bool_or("increasing", r.increasing)?;
    r.prob = p.prob_or("prob", r.prob)?;
    if let Some(v) = p.f64s_opt("fill", 3)? {
        if v.iter().any(|x| !(0.0..=255.0).contains(x)) {
            return Err(p.err("fill", "values must be in 0..=255"));
        }
        r.fill = [v[0] as u8, v[1] as u8, v[2] as u8];
    }
    r.filter = match p.str_opt("interpolation")?.unwrap_or("random") {
        "random" => None,
        s => Some(
            s.parse()
                .map_err(|m: String| p.err("interpolation", format!("{m} (or \"random\")")))?,
        ),
    };
    if !(0.0..=r.magnitude_max.max(0.0)).contains(&r.magnitude) && r.magnitude_max >= 0.0 {
        return Err(p.err(
            "magnitude",
            format!("must be in [0, {}], got {}", r.magnitude_max, r.magnitude),
        ));
    }
    if r.magnitude_std < 0.0 {
        return Err(p.err(
            "magnitude_std",
            format!("must be 0 or more, got {}", r.magnitude_std),
        ));
    }
    if !(0.0..=1.0).contains(&r.prob) {
        return Err(p.err("prob", format!("must be in [0, 1], got {}", r.prob)));
    }
    p.finish()?;
    Ok(Box::new(r))
}

inventory::submit! { AugmentEntry { name: "rand_augment", description: "RandAugment, timm meaning (config = \"rand-m9-mstd0.5-inc1\" or keys)", build: build_rand_augment, origin: module_path!() } }

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Expected values (`tests/data/geometry_pil.toml`) come from Pillow 13.0 (nearest
    /// sampling, fill (9, 8, 7)):
    ///
    /// ```python
    /// from PIL import Image
    /// img = Image.frombytes("RGB", (7, 6), bytes((i*37+11) % 256 for i in range(126)))
    /// img.rotate(25, resample=Image.NEAREST, fillcolor=(9, 8, 7))       # and -40
    /// img.transform(img.size, Image.AFFINE, (1, 0.27, 0, 0, 1, 0), resample=Image.NEAREST, fillcolor=(9, 8, 7))
    /// img.transform(img.size, Image.AFFINE, (1, 0, 0, -0.3, 1, 0), ...)   # shear_y
    /// img.transform(img.size, Image.AFFINE, (1, 0, 2.6, 0, 1, -1.2), ...) # translate
    /// ```
    #[test]
    fn geometry_matches_pil() {
        let img = RgbImage::new(
            7,
            6,
            (0..126u32).map(|i| ((i * 37 + 11) % 256) as u8).collect(),
        )
        .unwrap();
        let pil = crate::testdata::Reference::parse(
            "geometry_pil.toml",
            include_str!("../tests/data/geometry_pil.toml"),
        );
        let cases: Vec<(&str, &[u8])> =
            ["rotate_25", "rotate_m40", "shear_x", "shear_y", "translate"]
                .into_iter()
                .map(|n| (n, pil.get(n)))
                .collect();
        for (name, want) in &cases {
            let m = match *name {
                "rotate_25" => geometry_matrix(RandOp::Rotate, 25.0, 7.0, 6.0),
                "rotate_m40" => geometry_matrix(RandOp::Rotate, -40.0, 7.0, 6.0),
                "shear_x" => geometry_matrix(RandOp::ShearX, 0.27, 7.0, 6.0),
                "shear_y" => geometry_matrix(RandOp::ShearY, -0.3, 7.0, 6.0),
                _ => [1.0, 0.0, 2.6, 0.0, 1.0, -1.2],
            };
            let out = affine(&img, m, Interpolation::Nearest, [9, 8, 7]);
            assert_eq!(&out.data[..], *want, "{name}");
        }
    }

    #[test]
    fn every_op_keeps_the_size_at_every_magnitude() {
        let img = RgbImage::new(
            9,
            7,
            (0..189u32).map(|i| ((i * 53 + 5) % 256) as u8).collect(),
        )
        .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        for increasing in [false, true] {
            let ra = RandAugment {
                increasing,
                ..RandAugment::default()
            };
            for op in RAND_OPS {
                for level in [0.0, 4.5, 10.0] {
                    let out = ra.apply_op(op, &img, level, &mut rng);
                    assert_eq!((out.width, out.height), (9, 7), "{op:?} at {level}");
                }
            }
        }
        // At magnitude 0 the increasing colour ops are the identity.
        let ra = RandAugment {
            increasing: true,
            ..RandAugment::default()
        };
        for op in [
            RandOp::Color,
            RandOp::Contrast,
            RandOp::Brightness,
            RandOp::Sharpness,
            RandOp::Solarize,
        ] {
            let out = ra.apply_op(op, &img, 0.0, &mut rng);
            assert_eq!(out, img, "{op:?}");
        }
    }
}
