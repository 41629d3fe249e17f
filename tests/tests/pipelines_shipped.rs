//! Every pipeline shipped in `pipelines/` parses and is valid, except for the files a user brings
//! or installs (datasets, the ViT-B/16 weights).

use std::path::{Path, PathBuf};

use dtl_core::config::{validate, DeviceSpec, ValidationContext};
use dtl_core::{registry, DtlError, PipelineConfig};

use dtl_data as _;
// The Swin recipes (pipelines/vtab-1k-swin/) name Swin variants.
use dtl_swin as _;
use dtl_vit as _;

fn pipelines(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(pipelines(&p));
        } else if p.extension().is_some_and(|e| e == "toml") {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn shipped_pipelines_are_valid_but_for_user_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
    let files = pipelines(&root);
    assert!(files.len() >= 40, "found {} pipelines", files.len());
    let reg = registry().unwrap();
    let device_check = |d: DeviceSpec| match d {
        DeviceSpec::Cpu | DeviceSpec::Auto => Ok(()),
        DeviceSpec::Cuda(_) => Err("no GPU in tests".to_string()),
    };
    for f in files {
        let cfg = PipelineConfig::load(&f, &[]).unwrap_or_else(|e| panic!("{e}"));
        let cx = ValidationContext {
            file: &f,
            registry: reg,
            device_check: &device_check,
        };
        for e in validate(&cfg, &cx) {
            match &e {
                // Datasets are installed (scripts/setup-data.sh) or brought by the user.
                DtlError::Config { key, .. } if key == "data.root" => {}
                // Pretrained weights (ViT-B/16, Swin-B) are brought by the user.
                DtlError::Config { key, .. } if key == "backbone.weights" => {
                    let f = f.to_string_lossy();
                    assert!(
                        f.contains("vtab-1k")
                            || f.contains("few-shot")
                            || f.contains("domain-generalization"),
                        "{e}"
                    )
                }
                _ => panic!("{e}"),
            }
        }
    }
}
