//! The dataset layouts: `vtab-1k`, `few-shot`, `image-folder`, `idx` and `csv` (and, in
//! [`crate::dg`], `domain-generalization` and `class-folder`).
//!
//! Every layout reads its index (list files, folders, headers) when a split is opened and
//! checks it then: missing list files, unparsable lines, labels out of range, missing images
//! and empty splits are reported at once, naming the file and line. Images are decoded when
//! an item is fetched, on the loader's worker threads.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dtl_core::config::DataConfig;
use dtl_core::{Dataset, DatasetEntry, DtlError, Example, Result, RgbImage, Split};

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
        Some(v) => Err(DtlError::invalid(format!(
            "data.options.classes: expected a positive integer, got {v}"
        ))),
    }
}

pub(crate) fn option_str<'a>(cfg: &'a DataConfig, key: &str) -> Result<Option<&'a str>> {
    match cfg.options.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(DtlError::invalid(format!(
            "data.options.{key}: expected a string, got {v}"
        ))),
    }
}

pub(crate) fn option_int(cfg: &DataConfig, key: &str) -> Result<Option<i64>> {
    match cfg.options.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(i)) => Ok(Some(*i)),
        Some(v) => Err(DtlError::invalid(format!(
            "data.options.{key}: expected an integer, got {v}"
        ))),
    }
}

/// Reads `keep_labels` from `data.options`: distinct labels to keep, in their new order.
fn option_keep_labels(cfg: &DataConfig) -> Result<Option<Vec<usize>>> {
    let bad = || {
        DtlError::invalid(
            "data.options.keep_labels: expected a list of distinct labels, e.g. [5, 6, 7, 8, 9]",
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
            return Err(DtlError::invalid(format!(
                "data.options.{k}: unknown option for data.kind = \"{}\"; valid options: {}",
                cfg.kind,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    Ok(())
}

pub(crate) fn split_name(cfg: &DataConfig, split: Split) -> &str {
    match split {
        Split::Train => &cfg.train,
        Split::Test => &cfg.test,
    }
}

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

// ---------------------------------------------------------------- vtab-1k

/// The VTAB-1k tasks: official folder name, class count, accepted aliases.
pub const VTAB_TASKS: &[(&str, usize, &[&str])] = &[
    ("cifar", 100, &["cifar100", "cifar_100", "cifar-100"]),
    (
        "caltech101",
        102,
        &["caltech", "caltech_101", "caltech-101"],
    ),
    ("dtd", 47, &["textures"]),
    (
        "oxford_flowers102",
        102,
        &["flowers", "flowers102", "oxford_flowers", "flowers_102"],
    ),
    (
        "oxford_iiit_pet",
        37,
        &[
            "pets",
            "pet",
            "oxford_pets",
            "oxford_iiit_pets",
            "oxford-iiit-pet",
        ],
    ),
    ("svhn", 10, &["svhn_cropped"]),
    ("sun397", 397, &["sun", "sun_397"]),
    ("patch_camelyon", 2, &["camelyon", "pcam", "patchcamelyon"]),
    ("eurosat", 10, &["euro_sat"]),
    ("resisc45", 45, &["resisc", "resisc_45"]),
    (
        "diabetic_retinopathy",
        5,
        &["retinopathy", "diabetic_retinopathy_detection", "dr"],
    ),
    ("clevr_count", 8, &["clevr_count_all", "clevr-count"]),
    (
        "clevr_dist",
        6,
        &[
            "clevr_closest_object_distance",
            "clevr_distance",
            "clevr-dist",
        ],
    ),
    ("dmlab", 6, &["dm_lab"]),
    (
        "kitti",
        4,
        &[
            "kitti_dist",
            "kitti_distance",
            "kitti_closest_vehicle_distance",
        ],
    ),
    (
        "dsprites_loc",
        16,
        &[
            "dsprites_location",
            "dsprites_xpos",
            "dsprites_label_x_position",
        ],
    ),
    (
        "dsprites_ori",
        16,
        &["dsprites_orientation", "dsprites_label_orientation"],
    ),
    (
        "smallnorb_azi",
        18,
        &["smallnorb_azimuth", "smallnorb_label_azimuth"],
    ),
    (
        "smallnorb_ele",
        9,
        &["smallnorb_elevation", "smallnorb_label_elevation"],
    ),
];

/// The official VTAB-1k folder name for a task name or alias, and its class count.
///
/// ```
/// assert_eq!(dtl_data::datasets::vtab_task("cifar_100"), Some(("cifar", 100)));
/// assert_eq!(dtl_data::datasets::vtab_task("pets"), Some(("oxford_iiit_pet", 37)));
/// assert_eq!(dtl_data::datasets::vtab_task("imagenet"), None);
/// ```
pub fn vtab_task(name: &str) -> Option<(&'static str, usize)> {
    let n = name.to_ascii_lowercase().replace('-', "_");
    VTAB_TASKS
        .iter()
        .find(|(official, _, aliases)| {
            *official == n || aliases.iter().any(|a| a.replace('-', "_") == n)
        })
        .map(|(o, c, _)| (*o, *c))
}

/// The VTAB-1k list names.
pub const VTAB_SPLITS: [&str; 4] = ["train800val200", "train800", "val200", "test"];

fn open_vtab(cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
    check_options(cfg, &["classes"])?;
    let task = cfg.task.as_deref().ok_or_else(|| {
        DtlError::invalid(format!(
            "data.task: required for data.kind = \"vtab-1k\"; name a task folder under `{}`, e.g. \"cifar\", \"caltech101\", \"oxford_flowers102\"",
            cfg.root.display()
        ))
    })?;
    // A folder with the exact name wins; otherwise aliases map to the official name.
    let (folder, known) = if cfg.root.join(task).is_dir() {
        (
            task.to_string(),
            vtab_task(task).filter(|(o, _)| *o == task).map(|(_, c)| c),
        )
    } else if let Some((official, c)) = vtab_task(task) {
        (official.to_string(), Some(c))
    } else {
        let names: Vec<&str> = VTAB_TASKS.iter().map(|t| t.0).collect();
        let hint = dtl_core::error::closest(task, names.iter().copied())
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        return Err(DtlError::invalid(format!(
            "data.task: `{task}` is not a VTAB-1k task and `{}` has no such folder{hint}; tasks: {}",
            cfg.root.display(),
            names.join(", ")
        )));
    };
    let dir = cfg.root.join(&folder);
    if !dir.is_dir() {
        return Err(DtlError::invalid(format!(
            "data.task: task folder `{}` does not exist; extract the VTAB-1k task `{folder}` there (it holds {})",
            dir.display(),
            VTAB_SPLITS.map(|s| format!("{s}.txt")).join(", ")
        )));
    }
    let name = split_name(cfg, split);
    let list = dir.join(format!("{name}.txt"));
    if let Some(why) = dtl_core::paths::not_a_file(&list) {
        let key = if split == Split::Train {
            "data.train"
        } else {
            "data.test"
        };
        return Err(DtlError::invalid(format!(
            "{key}: split `{name}` has no list file: `{}` {why}; VTAB-1k splits: {}",
            list.display(),
            VTAB_SPLITS.join(", ")
        )));
    }
    let (classes, why) = match (option_classes(cfg)?, known) {
        (Some(c), _) => (Some(c), " (data.options.classes)".to_string()),
        (None, Some(c)) => (Some(c), format!(" (task `{folder}`)")),
        (None, None) => {
            // Unknown task: the class count is shared by all splits, so read every list.
            let mut max = 0;
            for s in VTAB_SPLITS {
                let l = dir.join(format!("{s}.txt"));
                if l.is_file() {
                    for r in parse_list(&l)? {
                        max = max.max(r.1);
                    }
                }
            }
            (
                Some(max + 1),
                " (the largest label in the task's lists plus one)".to_string(),
            )
        }
    };
    let rows = parse_list(&list)?;
    Ok(Box::new(ListDataset::from_rows(
        &list, &dir, rows, classes, &why,
    )?))
}

// ---------------------------------------------------------------- few-shot

/// The FGFS few-shot datasets: folder name, class count, aliases.
pub const FEW_SHOT_DATASETS: &[(&str, usize, &[&str])] = &[
    ("fgvc-aircraft", 100, &["aircraft", "fgvc_aircraft"]),
    ("food-101", 101, &["food", "food101", "food_101"]),
    (
        "oxford-flowers102",
        102,
        &["flowers", "flowers102", "oxford_flowers102"],
    ),
    (
        "oxford-pets",
        37,
        &["pets", "oxford_pets", "oxford_iiit_pet"],
    ),
    (
        "stanford-cars",
        196,
        &["cars", "stanford_cars", "standford-cars"],
    ),
];

fn few_shot_dataset(name: &str) -> Option<(&'static str, usize)> {
    let n = name.to_ascii_lowercase();
    FEW_SHOT_DATASETS
        .iter()
        .find(|(o, _, a)| *o == n || a.contains(&n.as_str()))
        .map(|(o, c, _)| (*o, *c))
}

fn open_few_shot(cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
    check_options(cfg, &["shots", "seed", "images", "classes"])?;
    let task = cfg.task.as_deref().ok_or_else(|| {
        DtlError::invalid(
            "data.task: required for data.kind = \"few-shot\"; name the dataset, e.g. \"fgvc-aircraft\", \"food-101\", \"oxford-flowers102\", \"oxford-pets\", \"stanford-cars\"",
        )
    })?;
    let candidates = |name: &str| {
        [
            cfg.root
                .join("few-shot_split")
                .join(name)
                .join("annotations"),
            cfg.root.join(name).join("annotations"),
        ]
    };
    let known = few_shot_dataset(task);
    let mut folder = task.to_string();
    let mut ann = candidates(task).into_iter().find(|p| p.is_dir());
    if ann.is_none() {
        if let Some((official, _)) = known {
            folder = official.to_string();
            ann = candidates(official).into_iter().find(|p| p.is_dir());
        }
    }
    let ann = ann.ok_or_else(|| {
        DtlError::invalid(format!(
            "data.task: no annotations for `{task}`: looked for `{}`; the FGFS layout is few-shot_split/<dataset>/annotations/ under data.root",
            candidates(&folder)[0].display()
        ))
    })?;
    let shots = option_int(cfg, "shots")?.unwrap_or(16);
    let seed = option_int(cfg, "seed")?.unwrap_or(0);
    let name = split_name(cfg, split);
    let file = if name == "train" {
        format!("train_meta.list.num_shot_{shots}.seed_{seed}")
    } else {
        format!("{name}_meta.list")
    };
    let list = ann.join(&file);
    if !list.is_file() {
        let mut present: Vec<String> = std::fs::read_dir(&ann)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        present.sort();
        let key = if name == "train" {
            "data.options.shots/seed".to_string()
        } else if split == Split::Train {
            "data.train".to_string()
        } else {
            "data.test".to_string()
        };
        return Err(DtlError::invalid(format!(
            "{key}: list `{}` does not exist (split `{name}`, shots {shots}, seed {seed}); shots are 1, 2, 4, 8 or 16 and seeds 0-2; lists present: {}",
            list.display(),
            present.join(", ")
        )));
    }
    let images = match option_str(cfg, "images")? {
        Some(p) => cfg.root.join(p),
        None => cfg.root.join(&folder),
    };
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

// ---------------------------------------------------------------- image-folder

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
                return Err(DtlError::invalid(format!(
                    "data.root: split folder `{}` does not exist; image-folder expects <root>/<split>/<class>/<image>",
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
                    .ok_or_else(|| DtlError::invalid("data.options.extensions: expected a list of strings such as [\"jpg\", \"png\"]"))
            })
            .collect(),
        Some(_) => Err(DtlError::invalid(
            "data.options.extensions: expected a list of strings such as [\"jpg\", \"png\"]",
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

// ---------------------------------------------------------------- in-memory pixel sets

/// Decoded pixels held in memory (IDX and CSV): greyscale or RGB, all the same size.
/// Opened through the `idx` and `csv` layouts.
///
/// ```
/// use dtl_core::{config::DataConfig, Dataset, Split};
/// let tmp = tempfile::tempdir().unwrap();
/// std::fs::write(tmp.path().join("train.csv"), "label,a,b,c,d\n1,0,255,0,255\n").unwrap();
/// let cfg: DataConfig = toml::from_str(&format!("kind = \"csv\"\nroot = {:?}", tmp.path())).unwrap();
/// let ds = dtl_core::registry().unwrap().open_dataset(&cfg, Split::Train).unwrap();
/// assert_eq!(ds.get(0).unwrap().image.pixel(1, 0), [255, 255, 255]);
/// assert!(ds.describe(0).ends_with("train.csv:2"));
/// # let _ = dtl_data::DataPipeline::new;
/// ```
#[derive(Debug, Clone)]
pub struct PixelDataset {
    source: PathBuf,
    what: &'static str,
    width: usize,
    height: usize,
    channels: usize,
    pixels: Vec<u8>,
    labels: Vec<usize>,
    classes: usize,
    /// Row (CSV line) of each item, for messages.
    rows: Option<Vec<usize>>,
}

impl PixelDataset {
    /// Keeps the items whose label is in `keep` and relabels them by their position in it.
    fn keep_labels(mut self, keep: &[usize]) -> Result<Self> {
        let n = self.width * self.height * self.channels;
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        let mut rows = self.rows.as_ref().map(|_| Vec::new());
        for (i, &l) in self.labels.iter().enumerate() {
            if let Some(new) = keep.iter().position(|&k| k == l) {
                pixels.extend_from_slice(&self.pixels[i * n..(i + 1) * n]);
                labels.push(new);
                if let (Some(out), Some(src)) = (rows.as_mut(), self.rows.as_ref()) {
                    out.push(src[i]);
                }
            }
        }
        if labels.is_empty() {
            return Err(DtlError::file(
                &self.source,
                format!("the split is empty: no item has a label in data.options.keep_labels = {keep:?}"),
            ));
        }
        self.pixels = pixels;
        self.labels = labels;
        self.rows = rows;
        self.classes = keep.len();
        Ok(self)
    }
}

impl Dataset for PixelDataset {
    fn sources(&self) -> Vec<PathBuf> {
        vec![self.source.clone()]
    }
    fn label(&self, index: usize) -> Option<usize> {
        self.labels.get(index).copied()
    }
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn get(&self, index: usize) -> Result<Example> {
        let n = self.width * self.height * self.channels;
        let px = &self.pixels[index * n..(index + 1) * n];
        let data = if self.channels == 1 {
            px.iter().flat_map(|&v| [v, v, v]).collect()
        } else {
            px.to_vec()
        };
        Ok(Example {
            image: RgbImage::new(self.width as u32, self.height as u32, data)?,
            label: self.labels[index],
        })
    }
    fn describe(&self, index: usize) -> String {
        match &self.rows {
            Some(r) => format!("{}:{}", self.source.display(), r[index]),
            None => format!("{} {} {index}", self.source.display(), self.what),
        }
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| DtlError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DtlError::file(path, format!("cannot decompress gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

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
            DtlError::invalid(format!(
                "data.root: `{}` has no `{}` or `{}`; the idx layout expects MNIST-style files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)",
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
            return Err(DtlError::invalid(format!(
                "{key}: `{other}` is not an idx split; use \"train\" or \"test\""
            )));
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
            return Err(DtlError::invalid(format!(
                "data.options.channels: must be 1 (greyscale) or 3 (RGB, values r,g,b per pixel), got {c}"
            )))
        }
    };
    let name = split_name(cfg, split);
    let path = find_csv(&cfg.root, name).ok_or_else(|| {
        let key = if split == Split::Train { "data.train" } else { "data.test" };
        DtlError::invalid(format!(
            "{key}: `{}` has no `{name}.csv` or `{name}.csv.gz`; the csv layout expects <root>/<split>.csv[.gz]",
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

inventory::submit! { DatasetEntry { name: "vtab-1k", description: "VTAB-1k lists: <root>/<task>/{train800val200,train800,val200,test}.txt", build: open_vtab, origin: module_path!() } }
inventory::submit! { DatasetEntry { name: "few-shot", description: "FGFS few-shot lists: <root>/few-shot_split/<dataset>/annotations/*", build: open_few_shot, origin: module_path!() } }
inventory::submit! { DatasetEntry { name: "image-folder", description: "<root>/<split>/<class>/*.{jpg,png}, classes sorted", build: open_folder, origin: module_path!() } }
inventory::submit! { DatasetEntry { name: "idx", description: "MNIST/Fashion-MNIST IDX files (gzip or raw), splits train/test", build: open_idx, origin: module_path!() } }
inventory::submit! { DatasetEntry { name: "domain-generalization", description: "NOAH domain-generalisation lists: <root>/<dataset>/annotations/{train_meta.list.num_shot_N.seed_S,val_meta.list}", build: crate::dg::open_dg, origin: module_path!() } }
inventory::submit! { DatasetEntry { name: "class-folder", description: "<root>[/<split>]/<class>/*.{jpg,png}, labels from data.options.class_index (e.g. WordNet ids) or the sorted folders", build: crate::dg::open_class_folder, origin: module_path!() } }
inventory::submit! { DatasetEntry { name: "csv", description: "<root>/<split>.csv[.gz] rows label,p0,p1,... (greyscale or RGB)", build: open_csv, origin: module_path!() } }
