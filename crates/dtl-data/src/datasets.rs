//! The dataset layouts: `vtab-1k`, `few-shot`, `image-folder`, `idx` and `csv` (and, in
//! [`crate::dg`], `domain-generalization` and `class-folder`).
//!
//! Every layout reads its index (list files, folders, headers) when a split is opened and
//! checks it then: missing list files, unparsable lines, labels out of range, missing images
//! and empty splits are reported at once, naming the file and line. Images are decoded when
//! an item is fetched, on the loader's worker threads.
//!
//! One module a layout: `vtab`, `few_shot`, `folder`, `idx` and `csv`, with `list` (the
//! [`ListDataset`] of the list layouts) and `pixels` (the in-memory [`PixelDataset`] of
//! `idx` and `csv`); here: decoding and the readers of `data.options` every layout uses.

use std::path::Path;

use dtl_core::config::DataConfig;
use dtl_core::{DatasetEntry, DtlError, Result, RgbImage, Split};

mod csv;
mod few_shot;
mod folder;
mod idx;
mod list;
mod pixels;
mod vtab;

pub use few_shot::FEW_SHOT_DATASETS;
pub use folder::FolderDataset;
pub(crate) use folder::{class_dirs, image_extensions, walk};
pub(crate) use list::parse_list;
pub use list::ListDataset;
pub use pixels::PixelDataset;
pub use vtab::{vtab_task, VTAB_SPLITS, VTAB_TASKS};

/// Decodes a JPEG or PNG file (greyscale becomes RGB, alpha is dropped).
///
/// The error is one line saying why, without the path (callers add the list file and line).
pub fn decode_image(path: &Path) -> std::result::Result<RgbImage, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    decode_bytes(&bytes)
}

/// Decodes JPEG or PNG bytes (greyscale becomes RGB, alpha is dropped).
///
/// ```
/// assert!(dtl_data::datasets::decode_bytes(b"not an image").is_err());
/// ```
pub fn decode_bytes(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let format = image::guess_format(bytes)
        .map_err(|_| "not a JPEG or PNG file (unknown format)".to_string())?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(format!(
            "{format:?} images are not supported; use JPEG or PNG"
        ));
    }
    // The size a header announces is not trusted: bounded before anything is allocated.
    let side = dtl_core::limits::MAX_DECODED_SIDE as u32;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(1 << 30);
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => format!(
            "the image is larger than {side}x{side} pixels or needs more than 1 GiB to decode"
        ),
        e => e.to_string(),
    })?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    Ok(RgbImage {
        width: w,
        height: h,
        data: rgb.into_raw(),
    })
}

/// Reads `classes` from `data.options`, if set.
pub(crate) fn option_classes(cfg: &DataConfig) -> Result<Option<usize>> {
    match cfg.options.get("classes") {
        None => Ok(None),
        Some(toml::Value::Integer(c)) if *c >= 1 => Ok(Some(*c as usize)),
        Some(v) => Err(DtlError::setting(
            "data.options.classes",
            format!("expected a positive integer, got {v}"),
        )),
    }
}

pub(crate) fn option_str<'a>(cfg: &'a DataConfig, key: &str) -> Result<Option<&'a str>> {
    match cfg.options.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(DtlError::setting(
            format!("data.options.{key}"),
            format!("expected a string, got {v}"),
        )),
    }
}

pub(crate) fn option_int(cfg: &DataConfig, key: &str) -> Result<Option<i64>> {
    match cfg.options.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(i)) => Ok(Some(*i)),
        Some(v) => Err(DtlError::setting(
            format!("data.options.{key}"),
            format!("expected an integer, got {v}"),
        )),
    }
}

/// Reads `keep_labels` from `data.options`: distinct labels to keep, in their new order.
fn option_keep_labels(cfg: &DataConfig) -> Result<Option<Vec<usize>>> {
    let bad = || {
        DtlError::setting(
            "data.options.keep_labels",
            "expected a list of distinct labels, e.g. [5, 6, 7, 8, 9]",
        )
    };
    match cfg.options.get("keep_labels") {
        None => Ok(None),
        Some(toml::Value::Array(a)) if !a.is_empty() => {
            let mut out = Vec::with_capacity(a.len());
            for v in a {
                match v {
                    toml::Value::Integer(i) if *i >= 0 && !out.contains(&(*i as usize)) => {
                        out.push(*i as usize)
                    }
                    _ => return Err(bad()),
                }
            }
            Ok(Some(out))
        }
        Some(_) => Err(bad()),
    }
}

/// Fails on option keys a layout does not know.
pub(crate) fn check_options(cfg: &DataConfig, known: &[&str]) -> Result<()> {
    for k in cfg.options.keys() {
        if !known.contains(&k.as_str()) {
            return Err(DtlError::setting(
                format!("data.options.{k}"),
                format!(
                    "unknown option for data.kind = \"{}\"; valid options: {}",
                    cfg.kind,
                    crate::params::names_or_none(known)
                ),
            ));
        }
    }
    Ok(())
}

/// The folder name and class count of the dataset of `catalog` (folder name, class count,
/// aliases) that `name` names, by its folder name or an alias, in any case.
pub(crate) fn find_dataset(
    catalog: &'static [(&'static str, usize, &'static [&'static str])],
    name: &str,
) -> Option<(&'static str, usize)> {
    let n = name.to_ascii_lowercase();
    catalog
        .iter()
        .find(|(o, _, a)| *o == n || a.contains(&n.as_str()))
        .map(|(o, c, _)| (*o, *c))
}

pub(crate) fn split_name(cfg: &DataConfig, split: Split) -> &str {
    match split {
        Split::Train => &cfg.train,
        Split::Test => &cfg.test,
    }
}

// The layouts of [`crate::dg`].
inventory::submit! { DatasetEntry { name: "domain-generalization", description: "NOAH domain-generalisation lists: <root>/<dataset>/annotations/{train_meta.list.num_shot_N.seed_S,val_meta.list}", build: crate::dg::open_dg, origin: module_path!() } }
inventory::submit! { DatasetEntry { name: "class-folder", description: "<root>[/<split>]/<class>/*.{jpg,png}, labels from data.options.class_index (e.g. WordNet ids) or the sorted folders", build: crate::dg::open_class_folder, origin: module_path!() } }
