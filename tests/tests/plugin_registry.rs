//! A plugin registered from outside the workspace's crates, through the public API only.

use dfdx::prelude::*;
use dfdx::tensor::Merge;
use dtl_core::config::SideConfig;
use dtl_core::registry::{registry, BackboneEntry, BuildContext, SideEntry};
use dtl_core::{
    Act, Backbone, BackboneSpec, DropPath, DtlError, Images, Job, Param, Parameters,
    PipelineConfig, Result, SideNetwork,
};

// The line every binary and integration test needs to keep a plugin's registrations.
use dtl_vit as _;

/// A two-token, four-wide backbone whose blocks negate their input.
struct Negate(BackboneSpec);

type T4 = Tensor<(usize, Const<2>, Const<4>), f32, Cpu>;

impl Backbone<Cpu> for Negate {
    type Tokens = Const<2>;
    type Width = Const<4>;
    fn spec(&self) -> &BackboneSpec {
        &self.0
    }
    fn embed(&self, images: &Images<Cpu>) -> Result<T4> {
        let b = images.shape().0;
        Ok(images.device().ones_like(&(b, Const, Const)))
    }
    fn block_forward(&self, _: usize, x: &T4, _: Option<&DropPath>) -> Result<T4> {
        Ok(x.clone().negate())
    }
    fn block_vjp(&self, _: usize, _: &T4, g: &T4, _: Option<&DropPath>) -> Result<T4> {
        Ok(g.clone().negate())
    }
    fn norm_forward(
        &self,
        x: &Tensor<(usize, Const<4>), f32, Cpu>,
    ) -> Result<Tensor<(usize, Const<4>), f32, Cpu>> {
        Ok(x.clone())
    }
    fn norm_vjp(
        &self,
        _: &Tensor<(usize, Const<4>), f32, Cpu>,
        g: &Tensor<(usize, Const<4>), f32, Cpu>,
    ) -> Result<Tensor<(usize, Const<4>), f32, Cpu>> {
        Ok(g.clone())
    }
}

fn negate_spec() -> BackboneSpec {
    BackboneSpec {
        grid: (1, 1),
        ..BackboneSpec::vit("zz_negate_test", 8, 8, 4, 3, 1)
    }
    .single_stage()
}

fn negate_build(_: &PipelineConfig, _: &BuildContext) -> Result<Box<dyn Job>> {
    Err(DtlError::invalid(
        "the negating backbone is for registry tests only",
    ))
}

dtl_core::inventory::submit! {
    BackboneEntry {
        name: "zz_negate_test",
        description: "test backbone that negates",
        spec: negate_spec,
        build: negate_build,
        origin: module_path!(),
    }
}

/// Adds a learnt multiple of each tapped input.
struct Gain {
    taps: Vec<usize>,
    injects: Vec<usize>,
    gain: Param<Cpu>,
}

impl Parameters<Cpu> for Gain {
    fn params(&self) -> Vec<&Param<Cpu>> {
        vec![&self.gain]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<Cpu>> {
        vec![&mut self.gain]
    }
}

impl SideNetwork<Cpu> for Gain {
    fn taps(&self) -> &[usize] {
        &self.taps
    }
    fn injects(&self) -> &[usize] {
        &self.injects
    }
    fn tap(&self, _: usize, x: Act<Cpu>, z: Option<Act<Cpu>>) -> Result<Act<Cpu>> {
        let shape = *x.shape();
        let g = self
            .gain
            .value
            .retaped::<OwnedTape<f32, Cpu>>()
            .reshape_like(&())
            .broadcast_like(&shape);
        let contribution = g * x;
        Ok(match z {
            Some(z) => z + contribution,
            None => contribution,
        })
    }
    fn inject(&self, _: usize, z: &Act<Cpu>) -> Result<Act<Cpu>> {
        Ok(z.with_empty_tape())
    }
}

fn gain_build(
    cfg: &SideConfig,
    spec: &BackboneSpec,
    dev: &Cpu,
) -> Result<Box<dyn SideNetwork<Cpu>>> {
    Ok(Box::new(Gain {
        taps: cfg.tap_blocks(spec.depth),
        injects: cfg.inject_blocks(spec.depth),
        gain: Param::from_vec(dev, "side.gain", &[1], vec![0.5])?,
    }))
}

dtl_core::inventory::submit! {
    SideEntry {
        name: "zz_gain_test",
        description: "test side network with one gain",
        build_cpu: gain_build,
        kernels: None,
        origin: module_path!(),
    }
}

#[test]
fn plugin_components_are_registered_and_sorted() {
    let reg = registry().unwrap();
    let names = reg.backbones.names();
    assert!(names.contains(&"zz_negate_test"));
    assert!(
        names.contains(&"vit_base_patch16_224"),
        "dtl_vit is linked: {names:?}"
    );
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(reg.backbone("zz_negate_test").unwrap().spec().depth, 3);
    assert!(reg.sides.names().contains(&"zz_gain_test"));
}

#[test]
fn a_registered_side_network_runs_through_frozen_blocks() {
    let reg = registry().unwrap();
    let dev = Cpu::default();
    let spec = negate_spec();
    let side_cfg = SideConfig {
        kind: "zz_gain_test".into(),
        taps: Some("0".parse().unwrap()),
        injects: Some("0".parse().unwrap()),
        ..SideConfig::default()
    };
    let side = (reg.side("zz_gain_test").unwrap().build_cpu)(&side_cfg, &spec, &dev).unwrap();
    let backbone = std::sync::Arc::new(Negate(spec));
    let x0 = backbone
        .embed(&dev.zeros_like(&(2, Const::<3>, 8, 8)))
        .unwrap();
    // z = 0.5 * x0; x1 = -x0 + z; then block 1 negates again: x2 = x0 - z.
    let x0_dyn = x0.clone().realize::<(usize, usize, usize)>();
    let z = side.tap_frozen(0, &x0_dyn, None).unwrap();
    // As the runner does: inject sees z with an empty tape; z's history rides on g.
    let (z, z_tape) = z.split_tape();
    let g = side.inject(0, &z.put_tape(OwnedTape::default())).unwrap();
    let (g, g_tape) = g.split_tape();
    let g = g.put_tape(g_tape.merge(z_tape));
    let x1 = dtl_core::frozen_block(
        &backbone,
        0,
        x0.clone().retaped::<OwnedTape<f32, Cpu>>(),
        None,
    )
    .unwrap();
    let x1 = x1 + g.realize::<(usize, Const<2>, Const<4>)>();
    let x2 = dtl_core::frozen_block(&backbone, 1, x1, None).unwrap();
    assert_eq!(x2.as_vec(), vec![0.5; 16]);
    // d(sum x2)/d gain = -sum(x0) = -16: the gradient flowed back through a frozen block.
    let grads = x2.sum().backward();
    let g = grads.get(&side.params()[0].value).as_vec();
    assert_eq!(g, vec![-16.0]);
}

#[test]
fn unknown_names_suggest_the_nearest() {
    let reg = registry().unwrap();
    let e = reg.side("zz_gian_test").err().unwrap().to_string();
    assert!(e.contains("did you mean `zz_gain_test`"), "{e}");
    assert!(e.contains("registered side networks:"), "{e}");
}

#[test]
fn a_side_network_without_kernels_is_refused_by_the_device_step_by_name() {
    use dtl_kernels::CpuKernels;
    let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    let spec = Backbone::<Cpu>::spec(&vit).clone();
    let k = CpuKernels::new();
    let on = dtl_vit::VitOn::upload(&k, &spec, vit.weights()).unwrap();
    let cfg = dtl_core::PipelineConfig::from_str(
        "[backbone]\nkind = \"vit_test_patch8_32\"\n[side]\nkind = \"zz_gain_test\"\n[data]\nkind = \"image-folder\"\nroot = \".\"\n",
        "p.toml".as_ref(),
        &[],
    )
    .unwrap();
    let e = dtl_runner::resident::ResidentModel::from_config(&cfg, k, std::sync::Arc::new(on), 3)
        .err()
        .expect("a side network with no kernel description cannot run on the device step")
        .to_string();
    assert!(
        e.contains("zz_gain_test") && e.contains("run.device = \"cpu\""),
        "{e}"
    );
}
