//! The registered constructor: a side network without a kernel-set description is refused
//! with a message saying what Swin needs; a built-in one builds a job.

use dfdx::prelude::Cpu;
use dtl_core::config::SideConfig;
use dtl_core::{BackboneSpec, BuildContext, DtlError, PipelineConfig, Result, SideNetwork};
use dtl_swin::variants::SwinTest;

fn no_tape_side(_: &SideConfig, _: &BackboneSpec, _: &Cpu) -> Result<Box<dyn SideNetwork<Cpu>>> {
    Err(DtlError::invalid(
        "this side network is only registered, never built",
    ))
}

dtl_core::inventory::submit! {
    dtl_core::SideEntry {
        name: "swin-test-tape-only",
        description: "a side network with a dfdx constructor only",
        build_cpu: no_tape_side,
        kernels: None,
        origin: module_path!(),
    }
}

fn pipeline(side: &str, device: &str) -> PipelineConfig {
    let text = format!(
        "[run]\ndevice = \"{device}\"\n[backbone]\nkind = \"swin_test_patch2_window4_32\"\n\
         [side]\nkind = \"{side}\"\ntaps = \"2-7\"\ninjects = \"4-7\"\n\
         [data]\nkind = \"image-folder\"\nroot = \".\"\n"
    );
    PipelineConfig::from_str(&text, "swin.toml".as_ref(), &[]).unwrap()
}

#[test]
fn a_tape_only_side_network_is_refused_with_the_reason() {
    let cx = BuildContext {
        pipeline_file: "swin.toml".into(),
    };
    let e = dtl_swin::build::<SwinTest>(&pipeline("swin-test-tape-only", "cpu"), &cx)
        .err()
        .expect("a tape-only side network must be refused")
        .to_string();
    assert!(
        e.contains("built-in side network") && e.contains("`dtl`"),
        "{e}"
    );
    assert!(e.contains("single-stage"), "{e}");
    assert!(dtl_swin::build::<SwinTest>(&pipeline("dtl", "cpu"), &cx).is_ok());
    if !cfg!(feature = "cuda") {
        let e = dtl_swin::build::<SwinTest>(&pipeline("dtl", "cuda:0"), &cx)
            .err()
            .expect("no CUDA in this build")
            .to_string();
        assert!(e.contains("`cuda` feature"), "{e}");
    }
}
