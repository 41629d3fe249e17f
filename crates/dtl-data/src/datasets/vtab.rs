//! The `vtab-1k` layout: `<root>/<task>/{train800val200,train800,val200,test}.txt`.

use dtl_core::config::DataConfig;
use dtl_core::{Dataset, DatasetEntry, DtlError, Result, Split};

use super::{check_options, option_classes, parse_list, split_name, ListDataset};

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
        DtlError::setting("data.task", format!(
            "required for data.kind = \"vtab-1k\"; name a task folder under `{}`, e.g. \"cifar\", \"caltech101\", \"oxford_flowers102\"",
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
        return Err(DtlError::setting(
            "data.task",
            format!(
                "`{task}` is not a VTAB-1k task and `{}` has no such folder{hint}; tasks: {}",
                cfg.root.display(),
                names.join(", ")
            ),
        ));
    };
    let dir = cfg.root.join(&folder);
    if !dir.is_dir() {
        return Err(DtlError::setting("data.task", format!(
            "task folder `{}` does not exist; extract the VTAB-1k task `{folder}` there (it holds {})",
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
        return Err(DtlError::setting(
            key,
            format!(
                "split `{name}` has no list file: `{}` {why}; VTAB-1k splits: {}",
                list.display(),
                VTAB_SPLITS.join(", ")
            ),
        ));
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

inventory::submit! { DatasetEntry { name: "vtab-1k", description: "VTAB-1k lists: <root>/<task>/{train800val200,train800,val200,test}.txt", build: open_vtab, origin: module_path!() } }
