//! The `idx` layout: MNIST and Fashion-MNIST IDX files (gzip or raw), splits `train` and
//! `test`.

use std::path::{Path, PathBuf};

use dtl_core::config::DataConfig;
use dtl_core::{Dataset, DatasetEntry, DtlError, Result, Split};

use super::pixels::{read_maybe_gz, PixelDataset};
use super::{check_options, option_classes, option_keep_labels, split_name};

/// The first existing file among `<root>/<stem>` with the usual IDX name variants.
fn find_idx(root: &Path, prefix: &str, kind: &str) -> Result<PathBuf> {
    let names = [
        format!("{prefix}-{kind}-ubyte"),
        format!("{prefix}-{kind}-ubyte.gz"),
        format!(
            "{prefix}-{}.{}-ubyte",
            kind.split('-').next().unwrap_or(kind),
            kind.split('-').nth(1).unwrap_or("")
        ),
        format!(
            "{prefix}-{}.{}-ubyte.gz",
            kind.split('-').next().unwrap_or(kind),
            kind.split('-').nth(1).unwrap_or("")
        ),
    ];
    names
        .iter()
        .map(|n| root.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            DtlError::setting("data.root", format!(
                "`{}` has no `{}` or `{}`; the idx layout expects MNIST-style files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)",
                root.display(),
                names[0],
                names[1]
            ))
        })
}

fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

fn read_idx_labels(path: &Path) -> Result<Vec<usize>> {
    let b = read_maybe_gz(path)?;
    if b.len() < 8 || be32(&b, 0) != 0x0801 {
        return Err(DtlError::file(
            path,
            "not an IDX label file (the header must start with magic number 2049 = 0x00000801)",
        ));
    }
    let n = be32(&b, 4);
    if b.len() != 8 + n {
        return Err(DtlError::file(
            path,
            format!(
                "the header announces {n} labels but the file holds {}",
                b.len().saturating_sub(8)
            ),
        ));
    }
    Ok(b[8..].iter().map(|&v| v as usize).collect())
}

fn open_idx(cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
    check_options(cfg, &["classes", "keep_labels"])?;
    let keep = option_keep_labels(cfg)?;
    let name = split_name(cfg, split);
    let prefix = match name {
        "train" => "train",
        "test" | "t10k" => "t10k",
        other => {
            let key = if split == Split::Train {
                "data.train"
            } else {
                "data.test"
            };
            return Err(DtlError::setting(
                key,
                format!("`{other}` is not an idx split; use \"train\" or \"test\""),
            ));
        }
    };
    let img_path = find_idx(&cfg.root, prefix, "images-idx3")?;
    let lab_path = find_idx(&cfg.root, prefix, "labels-idx1")?;
    let b = read_maybe_gz(&img_path)?;
    if b.len() < 16 || be32(&b, 0) != 0x0803 {
        return Err(DtlError::file(
            &img_path,
            "not an IDX image file (the header must start with magic number 2051 = 0x00000803: unsigned bytes, 3 dimensions)",
        ));
    }
    let (n, rows, cols) = (be32(&b, 4), be32(&b, 8), be32(&b, 12));
    if b.len() != 16 + n * rows * cols {
        return Err(DtlError::file(
            &img_path,
            format!(
                "the header announces {n} images of {rows}x{cols} ({} bytes) but the file holds {} bytes of pixels",
                n * rows * cols,
                b.len().saturating_sub(16)
            ),
        ));
    }
    let labels = read_idx_labels(&lab_path)?;
    if labels.len() != n {
        return Err(DtlError::file(
            &lab_path,
            format!(
                "holds {} labels but `{}` holds {n} images",
                labels.len(),
                img_path.display()
            ),
        ));
    }
    if n == 0 {
        return Err(DtlError::file(
            &img_path,
            "the split is empty: the file holds no images",
        ));
    }
    let (classes, why) = match option_classes(cfg)? {
        Some(c) => (c, "data.options.classes"),
        None => {
            let mut max = labels.iter().copied().max().unwrap_or(0);
            let other = if prefix == "train" { "t10k" } else { "train" };
            if let Ok(p) = find_idx(&cfg.root, other, "labels-idx1") {
                max = max.max(read_idx_labels(&p)?.into_iter().max().unwrap_or(0));
            }
            (max + 1, "the largest label of both splits plus one")
        }
    };
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= classes) {
        return Err(DtlError::file(
            &lab_path,
            format!(
                "item {i}: label {l} is out of range: {classes} classes ({why}) allow labels 0-{}",
                classes - 1
            ),
        ));
    }
    let ds = PixelDataset {
        source: img_path,
        what: "image",
        width: cols,
        height: rows,
        channels: 1,
        pixels: b[16..].to_vec(),
        labels,
        classes,
        rows: None,
    };
    Ok(Box::new(match keep {
        Some(k) => ds.keep_labels(&k)?,
        None => ds,
    }))
}

inventory::submit! { DatasetEntry { name: "idx", description: "MNIST/Fashion-MNIST IDX files (gzip or raw), splits train/test", build: open_idx, origin: module_path!() } }
