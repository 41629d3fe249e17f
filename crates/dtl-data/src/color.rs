//! Photometric pixel operations on 8-bit RGB images, with PIL's `ImageEnhance` and
//! `ImageOps` semantics (blend against a degenerate image, per-channel lookup tables).

use dtl_core::RgbImage;

/// ITU-R 601-2 luma in PIL's fixed point: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
///
/// ```
/// assert_eq!(dtl_data::color::luma([255, 255, 255]), 255);
/// assert_eq!(dtl_data::color::luma([255, 0, 0]), 76);
/// ```
pub fn luma(p: [u8; 3]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

fn map(img: &RgbImage, f: impl Fn(usize, u8) -> u8) -> RgbImage {
    RgbImage {
        width: img.width,
        height: img.height,
        data: img
            .data
            .iter()
            .enumerate()
            .map(|(i, &v)| f(i % 3, v))
            .collect(),
    }
}

/// `degenerate + factor * (image - degenerate)` in `f32`, truncated and clamped to `0..=255`
/// (PIL `Image.blend`, which `ImageEnhance` uses).
fn blend_with(img: &RgbImage, factor: f64, degenerate: impl Fn(usize) -> u8) -> RgbImage {
    let data = img
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            // Single precision, as PIL computes it.
            let d = degenerate(i) as f32;
            let x = d + factor as f32 * (v as f32 - d);
            x.clamp(0.0, 255.0) as u8
        })
        .collect();
    RgbImage {
        width: img.width,
        height: img.height,
        data,
    }
}

/// Brightness: blend with black (`ImageEnhance.Brightness`).
///
/// ```
/// let img = dtl_core::RgbImage::new(1, 1, vec![100, 50, 200]).unwrap();
/// assert_eq!(dtl_data::color::brightness(&img, 0.5).data, vec![50, 25, 100]);
/// ```
pub fn brightness(img: &RgbImage, factor: f64) -> RgbImage {
    blend_with(img, factor, |_| 0)
}

/// Contrast: blend with the rounded mean luma (`ImageEnhance.Contrast`).
pub fn contrast(img: &RgbImage, factor: f64) -> RgbImage {
    let n = (img.data.len() / 3).max(1);
    let sum: u64 = img
        .data
        .chunks_exact(3)
        .map(|p| luma([p[0], p[1], p[2]]) as u64)
        .sum();
    let mean = (sum as f64 / n as f64 + 0.5) as u8;
    blend_with(img, factor, |_| mean)
}

/// Saturation: blend with the luma image (`ImageEnhance.Color`).
pub fn saturation(img: &RgbImage, factor: f64) -> RgbImage {
    let grey: Vec<u8> = img
        .data
        .chunks_exact(3)
        .map(|p| luma([p[0], p[1], p[2]]))
        .collect();
    blend_with(img, factor, |i| grey[i / 3])
}

/// Sharpness: blend with PIL's `SMOOTH` filter (3x3 kernel, centre 5, others 1, divided by
/// 13; the border keeps its pixels) (`ImageEnhance.Sharpness`).
pub fn sharpness(img: &RgbImage, factor: f64) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let mut smooth = img.data.clone();
    if w >= 3 && h >= 3 {
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                for ch in 0..3 {
                    let mut acc = 0u32;
                    for dy in 0..3 {
                        for dx in 0..3 {
                            let v = img.data[((y + dy - 1) * w + (x + dx - 1)) * 3 + ch] as u32;
                            acc += if dx == 1 && dy == 1 { 5 * v } else { v };
                        }
                    }
                    smooth[(y * w + x) * 3 + ch] = ((acc as f64 / 13.0) + 0.5).min(255.0) as u8;
                }
            }
        }
    }
    blend_with(img, factor, |i| smooth[i])
}

/// RGB to 8-bit HSV with PIL's quantisation (hue and saturation truncated to `0..=255`).
fn rgb_to_hsv8(p: [u8; 3]) -> [u8; 3] {
    let (r, g, b) = (p[0] as f32, p[1] as f32, p[2] as f32);
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return [0, 0, maxc as u8];
    }
    let cr = maxc - minc;
    let s = cr / maxc;
    let rc = (maxc - r) / cr;
    let gc = (maxc - g) / cr;
    let bc = (maxc - b) / cr;
    let h = if r == maxc {
        bc - gc
    } else if g == maxc {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    let h = ((h / 6.0) as f64 + 1.0) % 1.0;
    let q = |x: f64| ((x * 255.0) as i64).clamp(0, 255) as u8;
    [q(h), q(s as f64), maxc as u8]
}

/// 8-bit HSV back to RGB, PIL's formulas (rounded, clamped).
fn hsv8_to_rgb(hsv: [u8; 3]) -> [u8; 3] {
    let (h, s, v) = (hsv[0] as f32, hsv[1] as f32, hsv[2]);
    if hsv[1] == 0 {
        return [v; 3];
    }
    let vf = v as f32;
    let i = (h * 6.0 / 255.0).floor();
    let f = h * 6.0 / 255.0 - i;
    let fs = s / 255.0;
    let c = |x: f32| x.round().clamp(0.0, 255.0) as u8;
    let p = c(vf * (1.0 - fs));
    let q = c(vf * (1.0 - fs * f));
    let t = c(vf * (1.0 - fs * (1.0 - f)));
    match (i as i64).rem_euclid(6) {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Hue shift by `factor` of a full turn, `factor` in `[-0.5, 0.5]` (torchvision
/// `adjust_hue` on PIL images: the 8-bit hue channel is shifted by `int(factor * 255)` with
/// wrap-around).
///
/// ```
/// let img = dtl_core::RgbImage::new(1, 1, vec![255, 0, 0]).unwrap();
/// assert_eq!(dtl_data::color::hue(&img, 0.0).data, vec![255, 0, 0]);
/// let g = dtl_data::color::hue(&img, 1.0 / 3.0).data;
/// assert!(g[1] > 240 && g[0] < 10);
/// ```
pub fn hue(img: &RgbImage, factor: f64) -> RgbImage {
    let shift = (factor * 255.0) as i64;
    let data = img
        .data
        .chunks_exact(3)
        .flat_map(|p| {
            let [h, s, v] = rgb_to_hsv8([p[0], p[1], p[2]]);
            let h = (h as i64 + shift).rem_euclid(256) as u8;
            hsv8_to_rgb([h, s, v])
        })
        .collect();
    RgbImage {
        width: img.width,
        height: img.height,
        data,
    }
}

fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in img.data.chunks_exact(3) {
        for ch in 0..3 {
            h[ch][p[ch] as usize] += 1;
        }
    }
    h
}

/// Per-channel stretch of the used range to `0..=255` (`ImageOps.autocontrast`).
pub fn autocontrast(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for ch in 0..3 {
        let lo = hist[ch].iter().position(|&c| c > 0).unwrap_or(0);
        let hi = hist[ch].iter().rposition(|&c| c > 0).unwrap_or(255);
        for (i, slot) in luts[ch].iter_mut().enumerate() {
            *slot = if hi <= lo {
                i as u8
            } else {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                (i as f64 * scale + offset).clamp(0.0, 255.0) as u8
            };
        }
    }
    map(img, |ch, v| luts[ch][v as usize])
}

/// Per-channel histogram equalisation (`ImageOps.equalize`).
pub fn equalize(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for ch in 0..3 {
        let h = &hist[ch];
        let used: Vec<u64> = h.iter().copied().filter(|&c| c > 0).collect();
        let step = if used.len() <= 1 {
            0
        } else {
            (used.iter().sum::<u64>() - used[used.len() - 1]) / 255
        };
        if step == 0 {
            for (i, slot) in luts[ch].iter_mut().enumerate() {
                *slot = i as u8;
            }
            continue;
        }
        let mut n = step / 2;
        for i in 0..256 {
            luts[ch][i] = (n / step).min(255) as u8;
            n += h[i];
        }
    }
    map(img, |ch, v| luts[ch][v as usize])
}

/// `255 - v` (`ImageOps.invert`).
pub fn invert(img: &RgbImage) -> RgbImage {
    map(img, |_, v| 255 - v)
}

/// Keeps the top `bits` bits of each value (`ImageOps.posterize`).
///
/// ```
/// let img = dtl_core::RgbImage::new(1, 1, vec![255, 130, 7]).unwrap();
/// assert_eq!(dtl_data::color::posterize(&img, 1).data, vec![128, 128, 0]);
/// ```
pub fn posterize(img: &RgbImage, bits: u32) -> RgbImage {
    let mask: u8 = if bits >= 8 {
        0xff
    } else {
        !((1u16 << (8 - bits)) - 1) as u8
    };
    map(img, |_, v| v & mask)
}

/// Inverts values at or above `threshold` (`ImageOps.solarize`).
pub fn solarize(img: &RgbImage, threshold: u32) -> RgbImage {
    map(img, |_, v| if (v as u32) < threshold { v } else { 255 - v })
}

/// Adds `add` to values below `threshold`, clamping at 255 (timm's `solarize_add`).
pub fn solarize_add(img: &RgbImage, add: i32, threshold: u32) -> RgbImage {
    map(img, |_, v| {
        if (v as u32) < threshold {
            (v as i32 + add).clamp(0, 255) as u8
        } else {
            v
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values (`tests/data/color_pil.toml`) come from Pillow 13.0 on the same 6x5
    /// pattern:
    ///
    /// ```python
    /// from PIL import Image, ImageEnhance, ImageOps
    /// img = Image.frombytes("RGB", (6, 5), bytes((i*37+11) % 256 for i in range(90)))
    /// ImageEnhance.Brightness(img).enhance(1.3)   # brightness_1_3, and likewise
    /// ImageEnhance.Contrast(img).enhance(0.6)     # Color = saturation, Sharpness
    /// ImageOps.autocontrast(img); ImageOps.equalize(img)
    /// ImageOps.posterize(img, 3); ImageOps.solarize(img, 100)
    /// import torchvision.transforms.functional as F   # torchvision 0.29
    /// F.adjust_hue(img, 0.2)                          # and -0.3, 0.45
    /// ```
    #[test]
    fn photometric_ops_match_pil() {
        let img = RgbImage::new(
            6,
            5,
            (0..90u32).map(|i| ((i * 37 + 11) % 256) as u8).collect(),
        )
        .unwrap();
        let pil = crate::testdata::Reference::parse(
            "color_pil.toml",
            include_str!("../tests/data/color_pil.toml"),
        );
        let cases: Vec<(&str, &[u8])> = [
            "brightness_1_3",
            "contrast_0_6",
            "contrast_1_7",
            "saturation_0_4",
            "saturation_1_5",
            "sharpness_1_8",
            "sharpness_0_2",
            "autocontrast",
            "equalize",
            "posterize_3",
            "solarize_100",
        ]
        .into_iter()
        .map(|n| (n, pil.get(n)))
        .collect();
        let hue_cases: Vec<(f64, &[u8])> =
            [(0.2, "hue_0_2"), (-0.3, "hue_m0_3"), (0.45, "hue_0_45")]
                .into_iter()
                .map(|(f, n)| (f, pil.get(n)))
                .collect();
        let mut failed = Vec::new();
        for (f, want) in &hue_cases {
            let out = hue(&img, *f);
            if &out.data[..] != *want {
                failed.push(format!("hue {f}: {:?}", out.data));
            }
        }
        for (name, want) in &cases {
            let out = match *name {
                "brightness_1_3" => brightness(&img, 1.3),
                "contrast_0_6" => contrast(&img, 0.6),
                "contrast_1_7" => contrast(&img, 1.7),
                "saturation_0_4" => saturation(&img, 0.4),
                "saturation_1_5" => saturation(&img, 1.5),
                "sharpness_1_8" => sharpness(&img, 1.8),
                "sharpness_0_2" => sharpness(&img, 0.2),
                "autocontrast" => autocontrast(&img),
                "equalize" => equalize(&img),
                "posterize_3" => posterize(&img, 3),
                "solarize_100" => solarize(&img, 100),
                _ => unreachable!(),
            };
            let diff = out
                .data
                .iter()
                .zip(want.iter())
                .map(|(a, b)| (*a as i32 - *b as i32).abs())
                .max()
                .unwrap();
            if diff > 0 {
                failed.push(format!("{name}: max difference {diff}"));
            }
        }
        assert!(failed.is_empty(), "{failed:?}");
    }
}
