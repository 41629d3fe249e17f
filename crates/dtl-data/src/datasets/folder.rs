//! The `image-folder` layout: `<root>/<split>/<class>/*.{jpg,png}`, classes sorted.

use std::path::{Path, PathBuf};

use dtl_core::config::DataConfig;
use dtl_core::{Dataset, DatasetEntry, DtlError, Example, Result, Split};

use super::{check_options, decode_image, split_name};

fn is_image_file(p: &Path, exts: &[String]) -> bool {
    p.extension()
        .map(|e| {
            let e = e.to_string_lossy().to_ascii_lowercase();
            exts.contains(&e)
        })
        .unwrap_or(false)
}

pub(crate) fn walk(dir: &Path, exts: &[String], out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DtlError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, exts, out)?;
        } else if is_image_file(&p, exts) {
            out.push(p);
        }
    }
    Ok(())
}

pub(crate) fn class_dirs(dir: &Path) -> Result<Vec<String>> {
    let mut classes: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| DtlError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    Ok(classes)
}

/// `<root>/<split>/<class>/**/*.{jpg,jpeg,png}`; classes are the sorted folder names of the
/// training split.
///
/// ```
/// use dtl_core::Dataset;
/// let tmp = tempfile::tempdir().unwrap();
/// for (split, class) in [("train", "cat"), ("train", "dog"), ("val", "dog")] {
///     let dir = tmp.path().join(split).join(class);
///     std::fs::create_dir_all(&dir).unwrap();
///     dtl_data::image::RgbImage::new(2, 2).save(dir.join("a.png")).unwrap();
/// }
/// let exts = ["png".to_string()];
/// let ds = dtl_data::datasets::FolderDataset::open(tmp.path(), "val", "train", &exts).unwrap();
/// assert_eq!((ds.len(), ds.num_classes(), ds.get(0).unwrap().label), (1, 2, 1));
/// ```
#[derive(Debug, Clone)]
pub struct FolderDataset {
    root: PathBuf,
    items: Vec<(PathBuf, usize)>,
    classes: usize,
}

impl FolderDataset {
    /// A dataset of the given `(image path, label)` items under `root` (which
    /// [`Dataset::describe`] strips from the paths), with `classes` classes.
    pub(crate) fn from_items(root: &Path, items: Vec<(PathBuf, usize)>, classes: usize) -> Self {
        FolderDataset {
            root: root.to_path_buf(),
            items,
            classes,
        }
    }

    /// Scans `<root>/<split>` with the class list of `<root>/<train>`.
    pub fn open(root: &Path, split: &str, train: &str, exts: &[String]) -> Result<Self> {
        let train_dir = root.join(train);
        let dir = root.join(split);
        for d in [&train_dir, &dir] {
            if !d.is_dir() {
                return Err(DtlError::setting("data.root", format!(
                    "split folder `{}` does not exist; image-folder expects <root>/<split>/<class>/<image>",
                    d.display()
                )));
            }
        }
        let classes = class_dirs(&train_dir)?;
        if classes.is_empty() {
            return Err(DtlError::file(
                &train_dir,
                "the split is empty: no class folders; image-folder expects <root>/<split>/<class>/<image>",
            ));
        }
        let mut items = Vec::new();
        for c in class_dirs(&dir)? {
            let label = classes.binary_search(&c).map_err(|_| {
                DtlError::file(
                    dir.join(&c),
                    format!(
                        "class folder `{c}` is not in the training split `{}`; its classes are: {}",
                        train_dir.display(),
                        classes.join(", ")
                    ),
                )
            })?;
            let mut files = Vec::new();
            walk(&dir.join(&c), exts, &mut files)?;
            items.extend(files.into_iter().map(|f| (f, label)));
        }
        if items.is_empty() {
            return Err(DtlError::file(
                &dir,
                format!(
                    "the split is empty: no images with extension {} in its class folders",
                    exts.join("/")
                ),
            ));
        }
        Ok(FolderDataset {
            root: dir,
            items,
            classes: classes.len(),
        })
    }
}

impl Dataset for FolderDataset {
    fn label(&self, index: usize) -> Option<usize> {
        self.items.get(index).map(|it| it.1)
    }
    fn len(&self) -> usize {
        self.items.len()
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn get(&self, index: usize) -> Result<Example> {
        let (path, label) = &self.items[index];
        let image = decode_image(path)
            .map_err(|e| DtlError::file(path, format!("cannot read image: {e}")))?;
        Ok(Example {
            image,
            label: *label,
        })
    }
    fn describe(&self, index: usize) -> String {
        let p = &self.items[index].0;
        p.strip_prefix(&self.root)
            .unwrap_or(p)
            .display()
            .to_string()
    }
}

pub(crate) fn image_extensions(cfg: &DataConfig) -> Result<Vec<String>> {
    match cfg.options.get("extensions") {
        None => Ok(vec!["jpg".into(), "jpeg".into(), "png".into()]),
        Some(toml::Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(|s| s.trim_start_matches('.').to_ascii_lowercase())
                    .ok_or_else(|| {
                        DtlError::setting(
                            "data.options.extensions",
                            "expected a list of strings such as [\"jpg\", \"png\"]",
                        )
                    })
            })
            .collect(),
        Some(_) => Err(DtlError::setting(
            "data.options.extensions",
            "expected a list of strings such as [\"jpg\", \"png\"]",
        )),
    }
}

fn open_folder(cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
    check_options(cfg, &["extensions"])?;
    let exts = image_extensions(cfg)?;
    Ok(Box::new(FolderDataset::open(
        &cfg.root,
        split_name(cfg, split),
        &cfg.train,
        &exts,
    )?))
}

inventory::submit! { DatasetEntry { name: "image-folder", description: "<root>/<split>/<class>/*.{jpg,png}, classes sorted", build: open_folder, origin: module_path!() } }
