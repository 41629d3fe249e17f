//! Pixel-level geometry: PIL-compatible convolution resizing, cropping, flipping and affine
//! warps of 8-bit RGB images.
//!
//! [`resize`] follows Pillow's separable convolution resampling for 8-bit images: filter
//! support scaled by the reduction factor (antialiasing when downscaling), coefficients
//! normalised per output pixel and rounded to 22-bit fixed point, a horizontal pass into an
//! 8-bit intermediate image followed by a vertical pass, each rounding and clamping to
//! `0..=255`. Results agree with `PIL.Image.resize` (Pillow 13) value for value on the cases
//! in this crate's tests.

use dtl_core::RgbImage;

/// Interpolation used by resizing and geometric ops.
///
/// ```
/// use dtl_data::resample::Interpolation;
/// assert_eq!("bicubic".parse::<Interpolation>().unwrap(), Interpolation::Bicubic);
/// assert!("lanczos7".parse::<Interpolation>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// Nearest neighbour (PIL `NEAREST`).
    Nearest,
    /// Triangle filter (PIL `BILINEAR`).
    Bilinear,
    /// Cubic convolution with a = -0.5 (PIL `BICUBIC`).
    Bicubic,
}

impl std::str::FromStr for Interpolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nearest" => Ok(Interpolation::Nearest),
            "bilinear" => Ok(Interpolation::Bilinear),
            "bicubic" => Ok(Interpolation::Bicubic),
            _ => Err(format!(
                "`{s}` is not an interpolation; use \"bicubic\", \"bilinear\" or \"nearest\""
            )),
        }
    }
}

impl Interpolation {
    fn support(self) -> f64 {
        match self {
            Interpolation::Nearest => 0.5,
            Interpolation::Bilinear => 1.0,
            Interpolation::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Interpolation::Nearest => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Interpolation::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Interpolation::Bicubic => cubic(x),
        }
    }
}

const CUBIC_A: f64 = -0.5;

fn cubic(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * CUBIC_A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel source windows and fixed-point weights along one axis.
struct Coeffs {
    ksize: usize,
    /// `(first source index, count)` per output pixel.
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn coeffs(in_size: usize, out_size: usize, filter: Interpolation) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Truncation toward zero, then clamping, as the reference does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin).min(ksize);
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            total += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..count {
            let w = if total != 0.0 { k[x] / total } else { k[x] };
            let f = w * (1u32 << PRECISION_BITS) as f64;
            row[x] = if w < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

fn clip8(v: i64) -> u8 {
    let v = v >> PRECISION_BITS;
    v.clamp(0, 255) as u8
}

fn horizontal(
    src: &[u8],
    w: usize,
    rows: std::ops::Range<usize>,
    c: &Coeffs,
    out_w: usize,
) -> Vec<u8> {
    let h = rows.len();
    let mut out = vec![0u8; out_w * h * 3];
    for (oy, y) in rows.enumerate() {
        let line = &src[y * w * 3..(y + 1) * w * 3];
        for xx in 0..out_w {
            let (xmin, count) = c.bounds[xx];
            let k = &c.weights[xx * c.ksize..xx * c.ksize + count];
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (i, &kw) in k.iter().enumerate() {
                let p = &line[(xmin + i) * 3..(xmin + i) * 3 + 3];
                for ch in 0..3 {
                    acc[ch] += p[ch] as i64 * kw as i64;
                }
            }
            let o = &mut out[(oy * out_w + xx) * 3..(oy * out_w + xx) * 3 + 3];
            for ch in 0..3 {
                o[ch] = clip8(acc[ch]);
            }
        }
    }
    out
}

fn vertical(src: &[u8], w: usize, offset: usize, c: &Coeffs, out_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; w * out_h * 3];
    for yy in 0..out_h {
        let (ymin, count) = c.bounds[yy];
        let k = &c.weights[yy * c.ksize..yy * c.ksize + count];
        for x in 0..w {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (i, &kw) in k.iter().enumerate() {
                let y = ymin + i - offset;
                let p = &src[(y * w + x) * 3..(y * w + x) * 3 + 3];
                for ch in 0..3 {
                    acc[ch] += p[ch] as i64 * kw as i64;
                }
            }
            let o = &mut out[(yy * w + x) * 3..(yy * w + x) * 3 + 3];
            for ch in 0..3 {
                o[ch] = clip8(acc[ch]);
            }
        }
    }
    out
}

/// Resizes to `width x height` like `PIL.Image.resize(size, resample)`.
///
/// ```
/// use dtl_core::RgbImage;
/// use dtl_data::resample::{resize, Interpolation};
/// let img = RgbImage::new(4, 4, vec![200; 48]).unwrap();
/// let out = resize(&img, 2, 3, Interpolation::Bicubic);
/// assert_eq!((out.width, out.height), (2, 3));
/// assert!(out.data.iter().all(|&v| v == 200));
/// ```
pub fn resize(img: &RgbImage, width: usize, height: usize, filter: Interpolation) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    if width == w && height == h {
        return img.clone();
    }
    if w == 0 || h == 0 || width == 0 || height == 0 {
        return RgbImage {
            width: width as u32,
            height: height as u32,
            data: vec![0; width * height * 3],
        };
    }
    if filter == Interpolation::Nearest {
        return resize_nearest(img, width, height);
    }
    let cx = coeffs(w, width, filter);
    let cy = coeffs(h, height, filter);
    let need_h = width != w;
    let need_v = height != h;
    let data = if need_h {
        let first = cy.bounds[0].0;
        let last = cy.bounds[height - 1].0 + cy.bounds[height - 1].1;
        let tmp = horizontal(&img.data, w, first..last, &cx, width);
        if need_v {
            vertical(&tmp, width, first, &cy, height)
        } else {
            tmp
        }
    } else {
        vertical(&img.data, w, 0, &cy, height)
    };
    RgbImage {
        width: width as u32,
        height: height as u32,
        data,
    }
}

fn resize_nearest(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let sx = w as f64 / width as f64;
    let sy = h as f64 / height as f64;
    let mut data = vec![0u8; width * height * 3];
    for y in 0..height {
        let iy = (((y as f64 + 0.5) * sy) as usize).min(h - 1);
        for x in 0..width {
            let ix = (((x as f64 + 0.5) * sx) as usize).min(w - 1);
            let s = (iy * w + ix) * 3;
            data[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage {
        width: width as u32,
        height: height as u32,
        data,
    }
}

/// The region `left, top, width, height` of an image; parts outside the image are black
/// (torchvision pads a centre crop larger than the image with zeros the same way).
///
/// ```
/// use dtl_core::RgbImage;
/// let img = RgbImage::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
/// let c = dtl_data::resample::crop(&img, 1, 0, 2, 1);
/// assert_eq!(c.data, vec![4, 5, 6, 0, 0, 0]);
/// ```
pub fn crop(img: &RgbImage, left: i64, top: i64, width: usize, height: usize) -> RgbImage {
    let (w, h) = (img.width as i64, img.height as i64);
    let mut data = vec![0u8; width * height * 3];
    for y in 0..height as i64 {
        let sy = top + y;
        if sy < 0 || sy >= h {
            continue;
        }
        for x in 0..width as i64 {
            let sx = left + x;
            if sx < 0 || sx >= w {
                continue;
            }
            let s = ((sy * w + sx) * 3) as usize;
            let d = ((y * width as i64 + x) * 3) as usize;
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage {
        width: width as u32,
        height: height as u32,
        data,
    }
}

/// Mirrors an image left to right.
///
/// ```
/// use dtl_core::RgbImage;
/// let img = RgbImage::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
/// assert_eq!(dtl_data::resample::hflip(&img).data, vec![4, 5, 6, 1, 2, 3]);
/// ```
pub fn hflip(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let mut data = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let s = (y * w + x) * 3;
            let d = (y * w + (w - 1 - x)) * 3;
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage {
        width: img.width,
        height: img.height,
        data,
    }
}

/// Warps an image with an inverse affine map, PIL `Image.transform(size, AFFINE, m)` style:
/// output pixel `(x, y)` samples the input at `(m[0] (x+.5) + m[1] (y+.5) + m[2],
/// m[3] (x+.5) + m[4] (y+.5) + m[5])`; samples outside the image take `fill`.
///
/// ```
/// use dtl_core::RgbImage;
/// use dtl_data::resample::{affine, Interpolation};
/// let img = RgbImage::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
/// // Shift one pixel to the left: output x reads input x + 1.
/// let out = affine(&img, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0], Interpolation::Nearest, [9, 9, 9]);
/// assert_eq!(out.data, vec![4, 5, 6, 9, 9, 9]);
/// ```
pub fn affine(img: &RgbImage, m: [f64; 6], filter: Interpolation, fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let mut data = vec![0u8; w * h * 3];
    let px = |x: i64, y: i64, ch: usize| -> f64 {
        img.data[((y as usize) * w + x as usize) * 3 + ch] as f64
    };
    for y in 0..h {
        for x in 0..w {
            let fx = m[0] * (x as f64 + 0.5) + m[1] * (y as f64 + 0.5) + m[2];
            let fy = m[3] * (x as f64 + 0.5) + m[4] * (y as f64 + 0.5) + m[5];
            let d = (y * w + x) * 3;
            if fx < 0.0 || fy < 0.0 || fx >= w as f64 || fy >= h as f64 {
                data[d..d + 3].copy_from_slice(&fill);
                continue;
            }
            match filter {
                Interpolation::Nearest => {
                    let s = (fy as usize * w + fx as usize) * 3;
                    data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
                }
                Interpolation::Bilinear | Interpolation::Bicubic => {
                    // Sample positions relative to pixel centres; edges repeat.
                    let sx = fx - 0.5;
                    let sy = fy - 0.5;
                    let x0 = sx.floor();
                    let y0 = sy.floor();
                    let tx = sx - x0;
                    let ty = sy - y0;
                    let (x0, y0) = (x0 as i64, y0 as i64);
                    let cl = |v: i64, n: usize| v.clamp(0, n as i64 - 1);
                    for ch in 0..3 {
                        let v = if filter == Interpolation::Bilinear {
                            let a = px(cl(x0, w), cl(y0, h), ch);
                            let b = px(cl(x0 + 1, w), cl(y0, h), ch);
                            let c = px(cl(x0, w), cl(y0 + 1, h), ch);
                            let e = px(cl(x0 + 1, w), cl(y0 + 1, h), ch);
                            let top = a + (b - a) * tx;
                            let bot = c + (e - c) * tx;
                            top + (bot - top) * ty
                        } else {
                            let mut acc = 0.0;
                            for j in -1..=2i64 {
                                let wy = cubic(ty - j as f64);
                                let mut row = 0.0;
                                for i in -1..=2i64 {
                                    row +=
                                        cubic(tx - i as f64) * px(cl(x0 + i, w), cl(y0 + j, h), ch);
                                }
                                acc += wy * row;
                            }
                            acc
                        };
                        data[d + ch] = (v + 0.5).clamp(0.0, 255.0) as u8;
                    }
                }
            }
        }
    }
    RgbImage {
        width: img.width,
        height: img.height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(w: u32, h: u32) -> RgbImage {
        let data = (0..w * h * 3)
            .map(|i| ((i * 37 + 11) % 256) as u8)
            .collect();
        RgbImage::new(w, h, data).unwrap()
    }

    /// Expected values (`tests/data/resize_pil.toml`) come from Pillow 13.0:
    ///
    /// ```python
    /// from PIL import Image
    /// def pat(w, h): return Image.frombytes("RGB", (w, h), bytes((i*37+11) % 256 for i in range(w*h*3)))
    /// for (w, h, ow, oh, f) in [(7,5,3,2,"BICUBIC"), (7,5,10,8,"BICUBIC"), (7,5,4,3,"BILINEAR"),
    ///                           (7,5,5,9,"NEAREST"), (7,5,7,3,"BICUBIC"), (23,17,5,4,"BICUBIC")]:
    ///     print(list(pat(w, h).resize((ow, oh), getattr(Image, f)).tobytes()))
    /// ```
    #[test]
    fn resize_matches_pil() {
        let pil = crate::testdata::Reference::parse(
            "resize_pil.toml",
            include_str!("../tests/data/resize_pil.toml"),
        );
        #[allow(clippy::type_complexity)]
        let cases: Vec<(u32, u32, usize, usize, Interpolation, &[u8])> = [
            (
                7,
                5,
                3,
                2,
                Interpolation::Bicubic,
                "from_7x5_to_3x2_bicubic",
            ),
            (
                7,
                5,
                10,
                8,
                Interpolation::Bicubic,
                "from_7x5_to_10x8_bicubic",
            ),
            (
                7,
                5,
                4,
                3,
                Interpolation::Bilinear,
                "from_7x5_to_4x3_bilinear",
            ),
            (
                7,
                5,
                5,
                9,
                Interpolation::Nearest,
                "from_7x5_to_5x9_nearest",
            ),
            (
                7,
                5,
                7,
                3,
                Interpolation::Bicubic,
                "from_7x5_to_7x3_bicubic",
            ),
            (
                23,
                17,
                5,
                4,
                Interpolation::Bicubic,
                "from_23x17_to_5x4_bicubic",
            ),
        ]
        .into_iter()
        .map(|(w, h, ow, oh, f, n)| (w, h, ow, oh, f, pil.get(n)))
        .collect();
        for (w, h, ow, oh, f, want) in &cases {
            let out = resize(&pattern(*w, *h), *ow, *oh, *f);
            assert_eq!((out.width as usize, out.height as usize), (*ow, *oh));
            assert_eq!(&out.data[..], *want, "{w}x{h} -> {ow}x{oh} {f:?}");
        }
    }

    #[test]
    fn solid_colour_survives_resizing() {
        let img = RgbImage::new(9, 6, [10u8, 128, 250].repeat(54)).unwrap();
        for f in [
            Interpolation::Bicubic,
            Interpolation::Bilinear,
            Interpolation::Nearest,
        ] {
            for (w, h) in [(4, 3), (20, 13), (9, 2)] {
                let out = resize(&img, w, h, f);
                assert!(
                    out.data.chunks(3).all(|p| p == [10, 128, 250]),
                    "{f:?} {w}x{h}"
                );
            }
        }
    }
}
