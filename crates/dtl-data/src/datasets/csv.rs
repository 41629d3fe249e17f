//! The `csv` layout: `<root>/<split>.csv[.gz]`, rows `label,p0,p1,...` (greyscale or RGB).

use std::path::{Path, PathBuf};

use dtl_core::config::DataConfig;
use dtl_core::{Dataset, DatasetEntry, DtlError, Result, Split};

use super::pixels::{read_maybe_gz, PixelDataset};
use super::{check_options, option_classes, option_int, option_keep_labels, split_name};

fn find_csv(root: &Path, split: &str) -> Option<PathBuf> {
    [format!("{split}.csv"), format!("{split}.csv.gz")]
        .iter()
        .map(|n| root.join(n))
        .find(|p| p.is_file())
}

/// Parses a CSV of `label,p0,p1,...` rows; returns labels, pixels, side and line numbers.
#[allow(clippy::type_complexity)]
fn parse_csv(
    path: &Path,
    channels: usize,
    labels_only: bool,
) -> Result<(Vec<usize>, Vec<u8>, usize, Vec<usize>)> {
    let bytes = read_maybe_gz(path)?;
    let text = crate::text::decode(path, &bytes)?;
    let mut labels = Vec::new();
    let mut pixels = Vec::new();
    let mut lines = Vec::new();
    let mut fields_per_row = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split(',').map(str::trim);
        let first = fields.next().unwrap_or("");
        let label = match first.parse::<f64>() {
            Ok(v) if v >= 0.0 && v.fract() == 0.0 => {
                crate::text::label(path, i + 1, v.min(usize::MAX as f64) as usize)?
            }
            Ok(v) => {
                return Err(DtlError::file(
                    path,
                    format!(
                        "line {}: label `{v}` is not a class index (a whole number from 0)",
                        i + 1
                    ),
                ))
            }
            Err(_) if labels.is_empty() && fields_per_row.is_none() => {
                // A header row: remember its width and skip it.
                fields_per_row = Some(line.split(',').count());
                continue;
            }
            Err(_) => {
                return Err(DtlError::file(
                    path,
                    format!(
                        "line {}: label `{first}` is not a number; rows must be `label,p0,p1,...`",
                        i + 1
                    ),
                ))
            }
        };
        let count = line.split(',').count();
        match fields_per_row {
            None => fields_per_row = Some(count),
            Some(f) if f != count => {
                return Err(DtlError::file(
                    path,
                    format!(
                        "line {}: has {count} fields but the first row has {f}",
                        i + 1
                    ),
                ))
            }
            _ => {}
        }
        labels.push(label);
        lines.push(i + 1);
        if labels_only {
            continue;
        }
        for (j, f) in fields.enumerate() {
            let v: f64 = f.parse().map_err(|_| {
                DtlError::file(
                    path,
                    format!("line {}: pixel {j} `{f}` is not a number", i + 1),
                )
            })?;
            if !(0.0..=255.0).contains(&v) {
                return Err(DtlError::file(
                    path,
                    format!("line {}: pixel {j} is {v}; pixels must be in 0-255", i + 1),
                ));
            }
            pixels.push(v.round() as u8);
        }
    }
    let per = fields_per_row.unwrap_or(1).saturating_sub(1);
    let side = ((per / channels) as f64).sqrt().round() as usize;
    if !labels.is_empty() && (side * side * channels != per || per == 0) {
        return Err(DtlError::file(
            path,
            format!(
                "rows hold {per} pixel values, which is not {} a square image (side*side{}); set data.options.channels to match",
                if channels == 1 { "greyscale for" } else { "RGB for" },
                if channels == 1 { "" } else { "*3" }
            ),
        ));
    }
    Ok((labels, pixels, side, lines))
}

fn open_csv(cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
    check_options(cfg, &["classes", "channels", "keep_labels"])?;
    let keep = option_keep_labels(cfg)?;
    let channels = match option_int(cfg, "channels")?.unwrap_or(1) {
        1 => 1,
        3 => 3,
        c => {
            return Err(DtlError::setting(
                "data.options.channels",
                format!("must be 1 (greyscale) or 3 (RGB, values r,g,b per pixel), got {c}"),
            ))
        }
    };
    let name = split_name(cfg, split);
    let path = find_csv(&cfg.root, name).ok_or_else(|| {
        let key = if split == Split::Train { "data.train" } else { "data.test" };
        DtlError::setting(key, format!(
            "`{}` has no `{name}.csv` or `{name}.csv.gz`; the csv layout expects <root>/<split>.csv[.gz]",
            cfg.root.display()
        ))
    })?;
    let (labels, pixels, side, lines) = parse_csv(&path, channels, false)?;
    if labels.is_empty() {
        return Err(DtlError::file(
            &path,
            "the split is empty: no `label,p0,p1,...` rows",
        ));
    }
    let (classes, why) = match option_classes(cfg)? {
        Some(c) => (c, "data.options.classes"),
        None => {
            let mut max = labels.iter().copied().max().unwrap_or(0);
            let other = if split == Split::Train {
                &cfg.test
            } else {
                &cfg.train
            };
            if let Some(p) = find_csv(&cfg.root, other) {
                max = max.max(
                    parse_csv(&p, channels, true)?
                        .0
                        .into_iter()
                        .max()
                        .unwrap_or(0),
                );
            }
            (max + 1, "the largest label of both splits plus one")
        }
    };
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= classes) {
        return Err(DtlError::file(
            &path,
            format!(
                "line {}: label {l} is out of range: {classes} classes ({why}) allow labels 0-{}",
                lines[i],
                classes - 1
            ),
        ));
    }
    let ds = PixelDataset {
        source: path,
        what: "row",
        width: side,
        height: side,
        channels,
        pixels,
        labels,
        classes,
        rows: Some(lines),
    };
    Ok(Box::new(match keep {
        Some(k) => ds.keep_labels(&k)?,
        None => ds,
    }))
}

inventory::submit! { DatasetEntry { name: "csv", description: "<root>/<split>.csv[.gz] rows label,p0,p1,... (greyscale or RGB)", build: open_csv, origin: module_path!() } }
