//! Datasets read from `<image path> <label>` list files (the `vtab-1k`, `few-shot` and
//! `domain-generalization` layouts).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dtl_core::{Dataset, DtlError, Example, Result};

use super::decode_image;

/// One line of a list file.
#[derive(Debug, Clone)]
struct ListItem {
    path: PathBuf,
    shown: String,
    label: usize,
    line: usize,
}

/// Items read from a `path label` list file; images are decoded on demand.
///
/// ```no_run
/// # use dtl_core::Dataset;
/// let ds = dtl_data::datasets::ListDataset::open("data/cifar/test.txt".as_ref(), "data/cifar".as_ref(), Some(100)).unwrap();
/// println!("{} items, first from {}", ds.len(), ds.describe(0));
/// ```
#[derive(Debug, Clone)]
pub struct ListDataset {
    list: Arc<PathBuf>,
    items: Vec<ListItem>,
    classes: usize,
}

/// Parses a list file into `(path, label, line)` triples without touching the images.
pub(crate) fn parse_list(list: &Path) -> Result<Vec<(String, usize, usize)>> {
    let text = crate::text::read(list)?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| {
            DtlError::file(
                list,
                format!("line {}: {why}; each line must be `<image path> <label>`, e.g. `images/0001.jpg 3`", i + 1),
            )
        };
        let (path, label) = line
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| bad(&format!("`{line}` has no label")))?;
        let label: usize = label
            .trim()
            .parse()
            .map_err(|_| bad(&format!("`{}` is not a class index", label.trim())))?;
        let label = crate::text::label(list, i + 1, label)?;
        out.push((path.trim().to_string(), label, i + 1));
    }
    Ok(out)
}

impl ListDataset {
    /// Opens `list`, resolving image paths against `base`. With `classes`, a label at or above
    /// it is an error; without, the class count is the largest label plus one.
    pub fn open(list: &Path, base: &Path, classes: Option<usize>) -> Result<Self> {
        let rows = parse_list(list)?;
        Self::from_rows(list, base, rows, classes, "")
    }

    pub(crate) fn from_rows(
        list: &Path,
        base: &Path,
        rows: Vec<(String, usize, usize)>,
        classes: Option<usize>,
        classes_why: &str,
    ) -> Result<Self> {
        if rows.is_empty() {
            return Err(DtlError::file(
                list,
                "the split is empty: the list has no `<image path> <label>` lines",
            ));
        }
        let classes = match classes {
            Some(c) => c,
            None => rows.iter().map(|r| r.1).max().unwrap_or(0) + 1,
        };
        let mut items = Vec::with_capacity(rows.len());
        for (shown, label, line) in rows {
            if label >= classes {
                return Err(DtlError::file(
                    list,
                    format!(
                        "line {line}: label {label} is out of range: {classes} classes{classes_why} allow labels 0-{}",
                        classes - 1
                    ),
                ));
            }
            let path = base.join(&shown);
            if let Some(why) = dtl_core::paths::not_a_file(&path) {
                return Err(DtlError::file(
                    list,
                    format!(
                        "line {line}: image `{shown}` {why} (looked for {})",
                        path.display()
                    ),
                ));
            }
            items.push(ListItem {
                path,
                shown,
                label,
                line,
            });
        }
        Ok(ListDataset {
            list: Arc::new(list.to_path_buf()),
            items,
            classes,
        })
    }
}

impl Dataset for ListDataset {
    fn sources(&self) -> Vec<PathBuf> {
        vec![self.list.to_path_buf()]
    }
    fn label(&self, index: usize) -> Option<usize> {
        self.items.get(index).map(|it| it.label)
    }
    fn len(&self) -> usize {
        self.items.len()
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn get(&self, index: usize) -> Result<Example> {
        let it = &self.items[index];
        if let Some(why) = dtl_core::paths::not_a_file(&it.path) {
            return Err(DtlError::file(
                self.list.as_path(),
                format!(
                    "line {}: image `{}` {why} (looked for {})",
                    it.line,
                    it.shown,
                    it.path.display()
                ),
            ));
        }
        let image = decode_image(&it.path).map_err(|e| {
            DtlError::file(
                self.list.as_path(),
                format!("line {}: cannot read image `{}`: {e}", it.line, it.shown),
            )
        })?;
        Ok(Example {
            image,
            label: it.label,
        })
    }
    fn describe(&self, index: usize) -> String {
        let it = &self.items[index];
        format!("{}:{} ({})", self.list.display(), it.line, it.shown)
    }
}
