//! The domain-generalisation layouts: `domain-generalization` (NOAH's list files for the
//! ImageNet 16-shot training lists and the ImageNet, -V2, -Sketch, -A and -R test lists) and
//! `class-folder` (`<root>/<class>/<image>` with the classes named by WordNet id or any other
//! folder name, mapped into a training label space).
//!
//! Both read their index when a split is opened and check it then, naming the file and line
//! (or folder) of the first problem, like the other layouts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dtl_core::config::DataConfig;
use dtl_core::{Dataset, DtlError, Result, Split};

use crate::datasets::{
    check_options, class_dirs, image_extensions, option_classes, option_int, option_str,
    parse_list, split_name, walk, FolderDataset, ListDataset,
};

/// The datasets of the domain-generalisation protocol: folder name (as in NOAH's
/// `data/domain-generalization` and the official DTL scripts), class count, aliases.
pub const DG_DATASETS: &[(&str, usize, &[&str])] = &[
    ("imagenet", 1000, &["imagenet-1k", "ilsvrc2012", "in1k"]),
    ("imagenetv2", 1000, &["imagenet-v2", "imagenet_v2", "v2"]),
    (
        "imagenet-sketch",
        1000,
        &["imagenet_sketch", "sketch", "imagenetsketch"],
    ),
    (
        "imagenet-adversarial",
        1000,
        &["imagenet-a", "imagenet_a", "imageneta"],
    ),
    (
        "imagenet-rendition",
        1000,
        &["imagenet-r", "imagenet_r", "imagenetr"],
    ),
];

/// The folder name and class count of a domain-generalisation dataset given by its name or
/// an alias.
///
/// ```
/// use dtl_data::dg::dg_dataset;
/// assert_eq!(dg_dataset("imagenet-a"), Some(("imagenet-adversarial", 1000)));
/// assert_eq!(dg_dataset("ImageNet-V2"), Some(("imagenetv2", 1000)));
/// assert_eq!(dg_dataset("cifar"), None);
/// ```
pub fn dg_dataset(name: &str) -> Option<(&'static str, usize)> {
    crate::datasets::find_dataset(DG_DATASETS, name)
}

fn names() -> String {
    DG_DATASETS
        .iter()
        .map(|d| d.0)
        .collect::<Vec<_>>()
        .join(", ")
}

fn present_lists(dir: &Path) -> String {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// `images/<sub>` under a dataset folder when it exists (the ImageNet layout of the official
/// code), else the dataset folder itself.
fn image_base(dataset_dir: &Path, sub: &str) -> PathBuf {
    let nested = dataset_dir.join("images").join(sub);
    if nested.is_dir() {
        nested
    } else {
        dataset_dir.to_path_buf()
    }
}

/// Opens a split of the `domain-generalization` layout.
///
/// `data.task` is the source dataset (default `imagenet`). The training split `train` reads
/// `<root>/<task>/annotations/train_meta.list.num_shot_<shots>.seed_<seed>`
/// (`data.options.shots`, default 16, and `seed`, default 0); a test split named `test`,
/// `val` or after the source reads the source's `val_meta.list`; any other test split names
/// a target (`imagenetv2`, `imagenet-sketch`, `imagenet-adversarial`, `imagenet-rendition`
/// or their aliases `imagenet-v2`, `imagenet-a`, `imagenet-r`, or a folder of the same
/// layout) and reads `<root>/<target>/annotations/val_meta.list`. Lines are
/// `<image path> <label>` with ImageNet's 1000-class labels; images lie under
/// `<dataset>/images/{train,val}` when that folder exists, else under `<dataset>`.
///
/// ```
/// use dtl_core::{config::DataConfig, Split};
/// let tmp = tempfile::tempdir().unwrap();
/// let ann = tmp.path().join("imagenet-adversarial/annotations");
/// std::fs::create_dir_all(ann.join("../imagenet-a/n01498041")).unwrap();
/// dtl_data::image::RgbImage::new(2, 2)
///     .save(ann.join("../imagenet-a/n01498041/a b.png")).unwrap();
/// std::fs::write(ann.join("val_meta.list"), "imagenet-a/n01498041/a b.png 6\n").unwrap();
/// let cfg: DataConfig = toml::from_str(&format!(
///     "kind = \"domain-generalization\"\nroot = {:?}\ntest = \"imagenet-a\"", tmp.path())).unwrap();
/// let ds = dtl_core::registry().unwrap().open_dataset(&cfg, Split::Test).unwrap();
/// assert_eq!((ds.len(), ds.num_classes(), ds.label(0)), (1, 1000, Some(6)));
/// # let _ = dtl_data::DataPipeline::new;
/// ```
pub fn open_dg(cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
    check_options(cfg, &["shots", "seed", "classes"])?;
    let source_name = cfg.task.as_deref().unwrap_or("imagenet");
    let source = dg_dataset(source_name).map_or(source_name, |d| d.0);
    let name = split_name(cfg, split);
    let folder_of = |n: &str| -> Option<String> {
        let official = dg_dataset(n).map(|d| d.0.to_string());
        [official, Some(n.to_string())]
            .into_iter()
            .flatten()
            .find(|f| cfg.root.join(f).is_dir())
    };
    // The source's folder; a target's test split does not need it.
    let src = || -> Result<PathBuf> {
        folder_of(source).map(|f| cfg.root.join(f)).ok_or_else(|| {
            DtlError::setting("data.task", format!(
                "the source dataset folder `{}` does not exist; the layout is <root>/<dataset>/annotations/ with datasets {}",
                cfg.root.join(source).display(),
                names()
            ))
        })
    };
    let shots = option_int(cfg, "shots")?.unwrap_or(16);
    let seed = option_int(cfg, "seed")?.unwrap_or(0);
    let (key, dataset_dir, file, images) = match split {
        Split::Train if name == "train" => {
            let dir = src()?;
            (
                "data.options.shots/seed".to_string(),
                dir.clone(),
                format!("train_meta.list.num_shot_{shots}.seed_{seed}"),
                image_base(&dir, "train"),
            )
        }
        Split::Train => {
            let dir = src()?;
            (
                "data.train".to_string(),
                dir.clone(),
                format!("{name}_meta.list"),
                image_base(&dir, "train"),
            )
        }
        Split::Test => {
            let is_source = ["test", "val"].contains(&name)
                || name == source_name
                || dg_dataset(name).is_some_and(|d| d.0 == source);
            if is_source {
                let dir = src()?;
                (
                    "data.test".to_string(),
                    dir.clone(),
                    "val_meta.list".to_string(),
                    image_base(&dir, "val"),
                )
            } else {
                let dir = folder_of(name).ok_or_else(|| {
                    DtlError::setting("data.test", format!(
                        "`{name}` is not a test set of this layout: no folder `{}`; name \"test\" (the source's val_meta.list) or a target: {}",
                        cfg.root.join(dg_dataset(name).map_or(name, |d| d.0)).display(),
                        names()
                    ))
                })?;
                let dir = cfg.root.join(dir);
                (
                    "data.test".to_string(),
                    dir.clone(),
                    "val_meta.list".to_string(),
                    dir,
                )
            }
        }
    };
    let ann = dataset_dir.join("annotations");
    let list = ann.join(&file);
    if !list.is_file() {
        return Err(DtlError::setting(key, format!(
            "list `{}` does not exist (split `{name}`, shots {shots}, seed {seed}); NOAH's ImageNet lists have shots 1, 2, 4, 8 or 16 and seeds 0-2; lists present in `{}`: {}",
            list.display(),
            ann.display(),
            present_lists(&ann)
        )));
    }
    let known = dataset_dir
        .file_name()
        .and_then(|f| dg_dataset(&f.to_string_lossy()));
    let (classes, why) = match (option_classes(cfg)?, known) {
        (Some(c), _) => (Some(c), " (data.options.classes)".to_string()),
        (None, Some((o, c))) => (Some(c), format!(" (dataset `{o}`)")),
        (None, None) => (None, String::new()),
    };
    let rows = parse_list(&list)?;
    Ok(Box::new(ListDataset::from_rows(
        &list, &images, rows, classes, &why,
    )?))
}

/// A training label space by class name: names in label order.
#[derive(Debug, Clone)]
pub struct ClassIndex {
    /// Where the names came from (named in errors).
    pub source: String,
    /// Class name -> label.
    pub labels: BTreeMap<String, usize>,
    /// Number of classes.
    pub classes: usize,
}

impl ClassIndex {
    /// Reads a class index file. Two forms are understood, line by line:
    /// - a list file of `<class>/<image> <label>` lines (a training list of the `few-shot` or
    ///   `domain-generalization` layout): the class of a line is the first folder of its
    ///   path, its label the number;
    /// - one class per line, first word the class name (`n01440764` or
    ///   `n01440764 tench, Tinca tinca`, as ImageNet's synset files): labels in line order.
    ///
    /// ```
    /// let tmp = tempfile::tempdir().unwrap();
    /// let f = tmp.path().join("train.list");
    /// std::fs::write(&f, "n02/x.JPEG 1\nn01/y.JPEG 0\nn02/z.JPEG 1\n").unwrap();
    /// let ix = dtl_data::dg::ClassIndex::read(&f).unwrap();
    /// assert_eq!((ix.labels["n01"], ix.labels["n02"], ix.classes), (0, 1, 2));
    /// std::fs::write(&f, "n05 dog\nn03 cat\n").unwrap();
    /// let ix = dtl_data::dg::ClassIndex::read(&f).unwrap();
    /// assert_eq!((ix.labels["n05"], ix.labels["n03"]), (0, 1));
    /// std::fs::write(&f, "n02/x.JPEG 1\nn02/z.JPEG 3\n").unwrap();
    /// assert!(dtl_data::dg::ClassIndex::read(&f).unwrap_err().to_string().contains("line 2"));
    /// ```
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::text::read(path)?;
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty())
            .collect();
        if lines.is_empty() {
            return Err(DtlError::file(
                path,
                "the class index is empty: write one class per line or give a training list",
            ));
        }
        let is_list = lines.iter().all(|(_, l)| {
            l.rsplit_once(char::is_whitespace)
                .is_some_and(|(p, n)| p.contains('/') && n.parse::<usize>().is_ok())
        });
        let mut labels = BTreeMap::new();
        if is_list {
            for (no, l) in &lines {
                let (p, n) = l.rsplit_once(char::is_whitespace).expect("checked above");
                let class = p.trim().split('/').next().unwrap_or("").to_string();
                let label: usize = n.parse().expect("checked above");
                let label = crate::text::label(path, *no, label)?;
                match labels.get(&class) {
                    Some(&have) if have != label => {
                        return Err(DtlError::file(
                            path,
                            format!("line {no}: class folder `{class}` has label {label} here and {have} above; a class index gives every class one label"),
                        ))
                    }
                    _ => {
                        labels.insert(class, label);
                    }
                }
            }
            let mut seen: BTreeMap<usize, &String> = BTreeMap::new();
            for (c, l) in &labels {
                if let Some(other) = seen.insert(*l, c) {
                    return Err(DtlError::file(
                        path,
                        format!("label {l} is given to two class folders, `{other}` and `{c}`"),
                    ));
                }
            }
        } else {
            for (i, (no, l)) in lines.iter().enumerate() {
                let class = l.split_whitespace().next().unwrap_or("").to_string();
                if labels.insert(class.clone(), i).is_some() {
                    return Err(DtlError::file(
                        path,
                        format!("line {no}: class `{class}` is listed twice; list each class once, in label order"),
                    ));
                }
            }
        }
        let classes = labels.values().max().map_or(0, |m| m + 1);
        Ok(ClassIndex {
            source: path.display().to_string(),
            labels,
            classes,
        })
    }

    /// The sorted folder names of `dir` as labels 0, 1, ... (torchvision's `ImageFolder`).
    pub fn from_folders(dir: &Path) -> Result<Self> {
        let names = class_dirs(dir)?;
        Ok(ClassIndex {
            source: format!("the sorted class folders of `{}`", dir.display()),
            classes: names.len(),
            labels: names.into_iter().enumerate().map(|(i, n)| (n, i)).collect(),
        })
    }
}

/// Opens `<folder>/<class>/**/*.{jpg,jpeg,png}` with each class folder's label looked up in a
/// [`ClassIndex`] (a folder that the index does not name is an error): the test sets of the domain-generalisation protocol as they are
/// distributed (ImageNet-A, -R, -Sketch: one folder per WordNet id). Opened through the
/// `class-folder` layout.
///
/// ```
/// use dtl_core::Dataset;
/// let tmp = tempfile::tempdir().unwrap();
/// for class in ["n02", "n05"] {
///     let dir = tmp.path().join("a").join(class);
///     std::fs::create_dir_all(&dir).unwrap();
///     dtl_data::image::RgbImage::new(2, 2).save(dir.join("x.png")).unwrap();
/// }
/// std::fs::write(tmp.path().join("classes.txt"), "n01\nn02\nn03\nn04\nn05\n").unwrap();
/// let ix = dtl_data::dg::ClassIndex::read(&tmp.path().join("classes.txt")).unwrap();
/// let exts = ["png".to_string()];
/// let ds = dtl_data::dg::scan_class_folder(&tmp.path().join("a"), &ix, &exts).unwrap();
/// assert_eq!((ds.len(), ds.num_classes(), ds.label(0), ds.label(1)), (2, 5, Some(1), Some(4)));
/// ```
pub fn scan_class_folder(dir: &Path, index: &ClassIndex, exts: &[String]) -> Result<FolderDataset> {
    if !dir.is_dir() {
        return Err(DtlError::setting("data.root", format!(
                "folder `{}` does not exist; class-folder expects <root>/<class>/<image> (or <root>/<split>/<class>/<image>)",
                dir.display()
            )));
    }
    let mut items = Vec::new();
    for c in class_dirs(dir)? {
        let label = *index.labels.get(&c).ok_or_else(|| {
                let some: Vec<&str> = index.labels.keys().take(5).map(|s| s.as_str()).collect();
                DtlError::file(
                    dir.join(&c),
                    format!(
                        "class folder `{c}` is not in the class index ({}, {} classes, e.g. {}); fix data.options.class_index or remove the folder",
                        index.source,
                        index.classes,
                        some.join(", ")
                    ),
                )
            })?;
        let mut files = Vec::new();
        walk(&dir.join(&c), exts, &mut files)?;
        items.extend(files.into_iter().map(|f| (f, label)));
    }
    if items.is_empty() {
        return Err(DtlError::file(
                dir,
                format!(
                    "the split is empty: no images with extension {} in class folders; class-folder expects <root>/<class>/<image>",
                    exts.join("/")
                ),
            ));
    }
    Ok(FolderDataset::from_items(dir, items, index.classes))
}

/// Opens a split of the `class-folder` layout: `<root>/<split>` when that folder exists,
/// else `<root>` itself, holds one folder per class. `data.options.class_index` (a file,
/// relative to `data.root`; see [`ClassIndex::read`]) gives the labels, e.g. ImageNet's
/// training list so that WordNet-id folders get ImageNet's labels; without it the sorted
/// folder names are the labels.
pub fn open_class_folder(cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
    check_options(cfg, &["extensions", "class_index", "classes"])?;
    let exts = image_extensions(cfg)?;
    let name = split_name(cfg, split);
    let sub = cfg.root.join(name);
    let dir = if sub.is_dir() { sub } else { cfg.root.clone() };
    let mut index = match option_str(cfg, "class_index")? {
        Some(f) => {
            let path = cfg.root.join(f);
            if let Some(why) = dtl_core::paths::not_a_file(&path) {
                return Err(DtlError::setting("data.options.class_index", format!(
                    "`{}` {why}; give a file (relative to data.root) with one class per line or a `<class>/<image> <label>` list",
                    path.display()
                )));
            }
            ClassIndex::read(&path)?
        }
        None => ClassIndex::from_folders(&dir)?,
    };
    if let Some(c) = option_classes(cfg)? {
        if c < index.classes {
            return Err(DtlError::setting(
                "data.options.classes",
                format!(
                    "{c} is fewer than the {} classes of {}",
                    index.classes, index.source
                ),
            ));
        }
        index.classes = c;
    }
    Ok(Box::new(scan_class_folder(&dir, &index, &exts)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        crate::image::RgbImage::new(2, 2).save(path).unwrap();
    }

    fn cfg(root: &Path, extra: &str) -> DataConfig {
        toml::from_str(&format!(
            "kind = \"domain-generalization\"\nroot = {:?}\n{extra}",
            root
        ))
        .unwrap()
    }

    fn err(cfg: &DataConfig, split: Split) -> String {
        match open(cfg, split) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        }
    }

    fn open(cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
        if cfg.kind == "class-folder" {
            open_class_folder(cfg, split)
        } else {
            open_dg(cfg, split)
        }
    }

    #[test]
    fn imagenet_lists_read_their_image_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let inet = tmp.path().join("imagenet");
        png(&inet.join("images/train/n01/a.JPEG.png"));
        png(&inet.join("images/val/n01/v.png"));
        std::fs::create_dir_all(inet.join("annotations")).unwrap();
        std::fs::write(
            inet.join("annotations/train_meta.list.num_shot_16.seed_2"),
            "n01/a.JPEG.png 0\n",
        )
        .unwrap();
        std::fs::write(inet.join("annotations/val_meta.list"), "n01/v.png 0\n").unwrap();
        let c = cfg(tmp.path(), "[options]\nseed = 2");
        let train = open(&c, Split::Train).unwrap();
        assert_eq!((train.len(), train.num_classes()), (1, 1000));
        assert!(train
            .describe(0)
            .contains("train_meta.list.num_shot_16.seed_2:1"));
        let test = open(&c, Split::Test).unwrap();
        assert_eq!(test.get(0).unwrap().label, 0);
        // A missing list names the key and the lists that are there.
        let e = err(&cfg(tmp.path(), "[options]\nshots = 4"), Split::Train);
        assert!(
            e.contains("data.options.shots/seed") && e.contains("num_shot_4.seed_0"),
            "{e}"
        );
        assert!(
            e.contains("lists present") && e.contains("val_meta.list"),
            "{e}"
        );
        // An unknown target names the valid ones.
        let e = err(&cfg(tmp.path(), "test = \"imagenet-c\""), Split::Test);
        assert!(
            e.starts_with("data.test") && e.contains("imagenet-rendition"),
            "{e}"
        );
        // A bad line names the file and line.
        std::fs::write(
            inet.join("annotations/val_meta.list"),
            "n01/v.png 0\nn01/v.png x\n",
        )
        .unwrap();
        let e = err(&c, Split::Test);
        assert!(e.contains("val_meta.list") && e.contains("line 2"), "{e}");
        // A label past the 1000 classes, and a missing image.
        std::fs::write(inet.join("annotations/val_meta.list"), "n01/v.png 1000\n").unwrap();
        let e = err(&c, Split::Test);
        assert!(
            e.contains("line 1") && e.contains("dataset `imagenet`"),
            "{e}"
        );
        std::fs::write(inet.join("annotations/val_meta.list"), "n01/w.png 1\n").unwrap();
        let e = err(&c, Split::Test);
        assert!(e.contains("image `n01/w.png`"), "{e}");
        let e = err(&cfg(tmp.path(), "[options]\nshot = 4"), Split::Train);
        assert!(
            e.contains("data.options.shot") && e.contains("shots, seed, classes"),
            "{e}"
        );
    }

    #[test]
    fn class_folders_take_their_labels_from_the_index() {
        let tmp = tempfile::tempdir().unwrap();
        for w in ["n03", "n01"] {
            png(&tmp.path().join("r").join(w).join("x.png"));
        }
        std::fs::write(
            tmp.path().join("synsets.txt"),
            "n01 tench\nn02 goldfish\nn03 shark\n",
        )
        .unwrap();
        let mut c = cfg(
            &tmp.path().join("r"),
            "[options]\nclass_index = \"../synsets.txt\"",
        );
        c.kind = "class-folder".into();
        let ds = open(&c, Split::Test).unwrap();
        assert_eq!(ds.num_classes(), 3);
        let labels: Vec<usize> = (0..ds.len()).map(|i| ds.label(i).unwrap()).collect();
        assert_eq!(labels, [0, 2]);
        assert_eq!(ds.describe(1), "n03/x.png");
        // Without an index, the sorted folders.
        c.options = toml::Table::new();
        let ds = open(&c, Split::Test).unwrap();
        assert_eq!((ds.num_classes(), ds.label(1)), (2, Some(1)));
        // A folder the index does not name.
        png(&tmp.path().join("r/n09/y.png"));
        c.options
            .insert("class_index".into(), toml::Value::from("../synsets.txt"));
        let e = err(&c, Split::Test);
        assert!(
            e.contains("class folder `n09`") && e.contains("synsets.txt"),
            "{e}"
        );
        c.options
            .insert("class_index".into(), toml::Value::from("../none.txt"));
        let e = err(&c, Split::Test);
        assert!(e.starts_with("data.options.class_index"), "{e}");
    }
}
