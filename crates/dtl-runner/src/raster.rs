//! PNG pictures drawn with plotters' bitmap backend, text included, without a font library:
//! [`TextBitmap`] draws text from a built-in glyph table (DejaVu Sans at 16 px, scaled to the
//! requested size) and delegates everything else to `BitMapBackend`.

use std::path::Path;

use dtl_core::{DtlError, Result};
use plotters::backend::BitMapBackend;
use plotters::coord::Shift;
use plotters::prelude::{DrawingArea, IntoDrawingArea};
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind,
    FontTransform,
};

use crate::glyphs::{CELL_HEIGHT, GLYPHS};

/// A bitmap drawing backend that renders text from the built-in glyph table.
///
/// ```
/// use plotters::prelude::*;
/// let mut buf = vec![255u8; 60 * 20 * 3];
/// {
///     let back = dtl_runner::raster::TextBitmap::new(&mut buf, (60, 20));
///     let root = back.into_drawing_area();
///     root.draw(&Text::new("Hi", (2, 2), ("sans-serif", 16).into_font())).unwrap();
///     root.present().unwrap();
/// }
/// assert!(buf.iter().any(|&v| v < 128), "some pixels are dark");
/// ```
pub struct TextBitmap<'a> {
    inner: BitMapBackend<'a>,
}

impl<'a> TextBitmap<'a> {
    /// Draws into `buf`, RGB rows of `size.0` pixels, `size.1` rows.
    pub fn new(buf: &'a mut [u8], size: (u32, u32)) -> Self {
        TextBitmap {
            inner: BitMapBackend::with_buffer(buf, size),
        }
    }
}

fn glyph(c: char) -> (u8, u8, &'static str) {
    let i = c as usize;
    if (32..=126).contains(&i) {
        GLYPHS[i - 32]
    } else {
        GLYPHS['?' as usize - 32]
    }
}

/// Width and height in pixels of `text` at font size `size`.
fn text_size(text: &str, size: f64) -> (u32, u32) {
    let scale = size / CELL_HEIGHT as f64;
    let w: f64 = text.chars().map(|c| glyph(c).0 as f64 * scale).sum();
    (w.ceil() as u32, (CELL_HEIGHT as f64 * scale).ceil() as u32)
}

impl DrawingBackend for TextBitmap<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }
    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_path(path, style)
    }
    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn estimate_text_size<TStyle: BackendTextStyle>(
        &self,
        text: &str,
        style: &TStyle,
    ) -> std::result::Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        Ok(text_size(text, style.size()))
    }

    fn draw_text<TStyle: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &TStyle,
        pos: BackendCoord,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let size = style.size();
        let scale = size / CELL_HEIGHT as f64;
        let (w, h) = text_size(text, size);
        let (w, h) = (w as i32, h as i32);
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Right => -w,
            HPos::Center => -w / 2,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -h / 2,
            VPos::Bottom => -h,
        };
        let trans = style.transform();
        let (bw, bh) = self.get_size();
        let mut x0 = 0.0f64;
        for c in text.chars() {
            let (adv, gw, alpha) = glyph(c);
            let gw = gw as usize;
            let cw = (gw as f64 * scale).ceil() as i32;
            for py in 0..h {
                for px in 0..cw {
                    // Nearest glyph pixel of this output pixel.
                    let gx = ((px as f64 + 0.5) / scale) as usize;
                    let gy = ((py as f64 + 0.5) / scale) as usize;
                    if gx >= gw || gy >= CELL_HEIGHT {
                        continue;
                    }
                    let a = alpha.as_bytes()[gy * gw + gx];
                    let a = (a as char).to_digit(16).unwrap_or(0) as f64 / 15.0;
                    if a <= 0.0 {
                        continue;
                    }
                    let (x, y) = (x0.round() as i32 + px + dx, py + dy);
                    let (x, y) = match trans {
                        FontTransform::None => (x, y),
                        FontTransform::Rotate90 => (-y, x),
                        FontTransform::Rotate180 => (-x, -y),
                        FontTransform::Rotate270 => (y, -x),
                    };
                    let (x, y) = (pos.0 + x, pos.1 + y);
                    if x >= 0 && y >= 0 && (x as u32) < bw && (y as u32) < bh {
                        self.inner.draw_pixel(
                            (x, y),
                            BackendColor {
                                alpha: color.alpha * a,
                                rgb: color.rgb,
                            },
                        )?;
                    }
                }
            }
            x0 += adv as f64 * scale;
        }
        Ok(())
    }
}

/// Draws a `size` picture with `draw` and writes it to `path` as PNG.
///
/// ```
/// use plotters::prelude::*;
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("a.png");
/// dtl_runner::raster::write_png(&p, (40, 30), |root| {
///     root.fill(&WHITE).map_err(|e| e.to_string())?;
///     root.draw(&Text::new("ok", (2, 2), ("sans-serif", 14).into_font()))
///         .map_err(|e| e.to_string())
/// })
/// .unwrap();
/// assert_eq!(&std::fs::read(&p).unwrap()[1..4], b"PNG");
/// ```
pub fn write_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<TextBitmap<'_>, Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    let err = |e: String| DtlError::file(path, format!("cannot draw the picture: {e}"));
    let mut buf = vec![255u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = TextBitmap::new(&mut buf, size).into_drawing_area();
        draw(&root).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(size.0, size.1, buf)
        .ok_or_else(|| err("the pixel buffer does not match the picture size".into()))?;
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| DtlError::file(path, format!("cannot write the PNG: {e}")))
}
