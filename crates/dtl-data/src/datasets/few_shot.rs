//! The `few-shot` layout: the FGFS lists `<root>/few-shot_split/<dataset>/annotations/*`.

use dtl_core::config::DataConfig;
use dtl_core::{Dataset, DatasetEntry, DtlError, Result, Split};

use super::{
    check_options, find_dataset, option_classes, option_int, option_str, parse_list, split_name,
    ListDataset,
};

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
    find_dataset(FEW_SHOT_DATASETS, name)
}

fn open_few_shot(cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
    check_options(cfg, &["shots", "seed", "images", "classes"])?;
    let task = cfg.task.as_deref().ok_or_else(|| {
        DtlError::setting(
            "data.task", "required for data.kind = \"few-shot\"; name the dataset, e.g. \"fgvc-aircraft\", \"food-101\", \"oxford-flowers102\", \"oxford-pets\", \"stanford-cars\"",
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
        DtlError::setting("data.task", format!(
            "no annotations for `{task}`: looked for `{}`; the FGFS layout is few-shot_split/<dataset>/annotations/ under data.root",
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
        return Err(DtlError::setting(key, format!(
            "list `{}` does not exist (split `{name}`, shots {shots}, seed {seed}); shots are 1, 2, 4, 8 or 16 and seeds 0-2; lists present: {}",
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

inventory::submit! { DatasetEntry { name: "few-shot", description: "FGFS few-shot lists: <root>/few-shot_split/<dataset>/annotations/*", build: open_few_shot, origin: module_path!() } }
