//! The built-in side networks (`dtl`, `dtl+`, `linear`) and the `linear` head.

use dfdx::prelude::*;
use dtl_core::config::{HeadConfig, SideConfig};
use dtl_core::registry::{HeadEntry, KernelHead, KernelSide, SideEntry};
use dtl_core::{Act, BackboneSpec, DtlError, Head, Matrix, Param, Parameters, Result, SideNetwork};
use rand::distributions::Uniform;

use crate::device::TrainDevice;

/// A parameter on `dev` drawn from U(-bound, bound) with the seeded CPU generator `init`.
fn uniform<D: TrainDevice>(
    init: &Cpu,
    dev: &D,
    name: &str,
    shape: &[usize],
    bound: f32,
) -> Result<Param<D>> {
    let n: usize = shape.iter().product();
    let t: Tensor<(usize,), f32, Cpu> =
        init.sample_like(&(n,), Uniform::new_inclusive(-bound, bound));
    Param::from_vec(dev, name, shape, t.as_vec())
}

/// The Compact Side Network of DTL, with the optional depthwise conv of DTL+.
///
/// One low-rank map `x A_i^T B_i^T` per tapped block (`side.<i>.a` (r, D) from
/// U(-1/sqrt D, 1/sqrt D), `side.<i>.b` (D, r) zeros), `g(z) = swish_beta(z)` added after each
/// inject block and, when `kernel > 0`, one shared depthwise `k x k` conv (`fusion.weight`
/// (D, 1, k, k), PyTorch's Conv2d default init) over the patch grid of `g(z)`.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::{BackboneSpec, Parameters, SideNetwork};
/// use dtl_runner::sides::DtlSide;
/// let spec = BackboneSpec::vit("toy", 32, 8, 48, 4, 3);
/// let dev = Cpu::seed_from_u64(0);
/// let side = DtlSide::new(&spec, 2, 100.0, vec![0, 1, 2, 3], vec![2, 3], 3, &dev, &dev).unwrap();
/// assert_eq!(side.parameter_count(), 4 * 2 * 2 * 48 + 48 * 9);
/// assert_eq!(side.params()[0].name, "side.0.a");
/// ```
pub struct DtlSide<D: TrainDevice = Cpu> {
    taps: Vec<usize>,
    injects: Vec<usize>,
    beta: f32,
    kernel: usize,
    prefix: usize,
    grid: (usize, usize),
    /// `side.<i>.a`, `side.<i>.b` per tap in order, then `fusion.weight` when kernel > 0.
    params: Vec<Param<D>>,
}

impl<D: TrainDevice> DtlSide<D> {
    /// A freshly initialised side network for `spec` on `dev`, its initial values drawn from
    /// the seeded CPU generator `init` (so every device starts from the same values).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: &BackboneSpec,
        rank: usize,
        beta: f64,
        taps: Vec<usize>,
        injects: Vec<usize>,
        kernel: usize,
        init: &Cpu,
        dev: &D,
    ) -> Result<Self> {
        let d = spec.width;
        if rank == 0 {
            return Err(DtlError::invalid("side.rank must be at least 1"));
        }
        if let Some(bad) = taps.iter().chain(&injects).find(|&&i| i >= spec.depth) {
            return Err(DtlError::invalid(format!(
                "side network: block {bad} is past the depth of `{}` (blocks 0-{})",
                spec.name,
                spec.depth.saturating_sub(1)
            )));
        }
        if taps.is_empty() || injects.is_empty() || injects[0] < taps[0] {
            return Err(DtlError::invalid(
                "side network: needs at least one tap and one inject, and no inject before the first tap",
            ));
        }
        let mut params = Vec::new();
        let bound = 1.0 / (d as f32).sqrt();
        for &i in &taps {
            params.push(uniform(
                init,
                dev,
                &format!("side.{i}.a"),
                &[rank, d],
                bound,
            )?);
            params.push(Param::zeros(dev, &format!("side.{i}.b"), &[d, rank]));
        }
        if kernel > 0 {
            params.push(uniform(
                init,
                dev,
                "fusion.weight",
                &[d, 1, kernel, kernel],
                1.0 / kernel as f32,
            )?);
        }
        Ok(DtlSide {
            taps,
            injects,
            beta: beta as f32,
            kernel,
            prefix: spec.prefix_tokens,
            grid: spec.grid,
            params,
        })
    }

    /// Builds from a `[side]` section (the `dtl` and `dtl+` registrations).
    pub fn from_config(cfg: &SideConfig, spec: &BackboneSpec, init: &Cpu, dev: &D) -> Result<Self> {
        Self::new(
            spec,
            cfg.rank,
            cfg.beta,
            cfg.tap_blocks(spec.depth),
            cfg.inject_blocks(spec.depth),
            cfg.kernel_size(),
            init,
            dev,
        )
    }

    fn maps(&self, block: usize) -> Result<(&Param<D>, &Param<D>)> {
        let k = self.taps.iter().position(|&t| t == block).ok_or_else(|| {
            DtlError::invalid(format!(
                "side network: block {block} is not tapped (taps {:?})",
                self.taps
            ))
        })?;
        Ok((&self.params[2 * k], &self.params[2 * k + 1]))
    }
}

impl<D: TrainDevice> Parameters<D> for DtlSide<D> {
    fn params(&self) -> Vec<&Param<D>> {
        self.params.iter().collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<D>> {
        self.params.iter_mut().collect()
    }
}

fn accumulate<D: TrainDevice>(z: Option<Act<D>>, y: Act<D>) -> Act<D> {
    match z {
        Some(z) => z + y,
        None => y,
    }
}

impl<D: TrainDevice> SideNetwork<D> for DtlSide<D> {
    fn taps(&self) -> &[usize] {
        &self.taps
    }
    fn injects(&self) -> &[usize] {
        &self.injects
    }
    fn tap(&self, block: usize, x: Act<D>, z: Option<Act<D>>) -> Result<Act<D>> {
        let (a, b) = self.maps(block)?;
        let (x, tape) = x.split_tape();
        let y = D::low_rank(&x, Some(tape), a, b)?;
        Ok(accumulate(z, y))
    }
    fn tap_frozen(&self, block: usize, x: &Act<D, NoneTape>, z: Option<Act<D>>) -> Result<Act<D>> {
        let (a, b) = self.maps(block)?;
        let y = D::low_rank(x, None, a, b)?;
        Ok(accumulate(z, y))
    }
    fn inject(&self, _block: usize, z: &Act<D>) -> Result<Act<D>> {
        let s = D::swish(z.with_empty_tape(), self.beta)?;
        if self.kernel == 0 {
            return Ok(s);
        }
        let w = self.params.last().expect("dtl+ holds its fusion weight");
        D::depthwise_conv_tokens(s, w, self.prefix, self.grid)
    }
}

/// The linear probe: no side network at all, only the head trains and the backbone runs
/// without a tape.
///
/// ```
/// use dfdx::prelude::Cpu;
/// use dtl_core::{Parameters, SideNetwork};
/// let p = dtl_runner::sides::LinearProbe;
/// assert!(SideNetwork::<Cpu>::is_linear_probe(&p));
/// assert_eq!(Parameters::<Cpu>::parameter_count(&p), 0);
/// ```
pub struct LinearProbe;

impl<D: TrainDevice> Parameters<D> for LinearProbe {
    fn params(&self) -> Vec<&Param<D>> {
        Vec::new()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<D>> {
        Vec::new()
    }
}

impl<D: TrainDevice> SideNetwork<D> for LinearProbe {
    fn taps(&self) -> &[usize] {
        &[]
    }
    fn injects(&self) -> &[usize] {
        &[]
    }
    fn tap(&self, block: usize, _x: Act<D>, _z: Option<Act<D>>) -> Result<Act<D>> {
        Err(DtlError::invalid(format!(
            "the linear probe taps no block (asked for block {block})"
        )))
    }
    fn inject(&self, block: usize, _z: &Act<D>) -> Result<Act<D>> {
        Err(DtlError::invalid(format!(
            "the linear probe injects into no block (asked for block {block})"
        )))
    }
}

/// The linear classifier `head.weight` (C, D), `head.bias` (C), initialised like PyTorch's
/// `nn.Linear` (both from U(-1/sqrt D, 1/sqrt D)).
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::{Head, Parameters};
/// let dev = Cpu::seed_from_u64(1);
/// let h = dtl_runner::sides::LinearHead::new(4, 3, &dev, &dev).unwrap();
/// assert_eq!(h.parameter_count(), 15);
/// let y = h.forward(dev.ones_like(&(2, 4)).leaky_traced()).unwrap();
/// assert_eq!(*y.shape(), (2, 3));
/// ```
pub struct LinearHead<D: TrainDevice = Cpu> {
    classes: usize,
    params: Vec<Param<D>>,
}

impl<D: TrainDevice> LinearHead<D> {
    /// A freshly initialised head from `width` features to `classes` logits on `dev`, drawn
    /// from the seeded CPU generator `init`.
    pub fn new(width: usize, classes: usize, init: &Cpu, dev: &D) -> Result<Self> {
        if classes == 0 {
            return Err(DtlError::invalid(
                "head: the number of classes must be at least 1",
            ));
        }
        let bound = 1.0 / (width as f32).sqrt();
        Ok(LinearHead {
            classes,
            params: vec![
                uniform(init, dev, "head.weight", &[classes, width], bound)?,
                uniform(init, dev, "head.bias", &[classes], bound)?,
            ],
        })
    }
}

impl<D: TrainDevice> Parameters<D> for LinearHead<D> {
    fn params(&self) -> Vec<&Param<D>> {
        self.params.iter().collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<D>> {
        self.params.iter_mut().collect()
    }
}

impl<D: TrainDevice> Head<D> for LinearHead<D> {
    fn classes(&self) -> usize {
        self.classes
    }
    fn forward(&self, features: Matrix<D>) -> Result<Matrix<D>> {
        D::linear(features, &self.params[0], &self.params[1])
    }
}

/// The `dtl` / `dtl+` constructor on any training device, initial values from `init`.
fn dtl_on<D: TrainDevice>(
    cfg: &SideConfig,
    spec: &BackboneSpec,
    init: &Cpu,
    dev: &D,
) -> Result<Box<dyn SideNetwork<D>>> {
    Ok(Box::new(DtlSide::from_config(cfg, spec, init, dev)?))
}

/// The `linear` probe on any training device.
fn linear_on<D: TrainDevice>(
    _: &SideConfig,
    _: &BackboneSpec,
    _: &Cpu,
    _: &D,
) -> Result<Box<dyn SideNetwork<D>>> {
    Ok(Box::new(LinearProbe))
}

/// The `linear` head on any training device, initial values from `init`.
fn head_on<D: TrainDevice>(
    _: &HeadConfig,
    spec: &BackboneSpec,
    classes: usize,
    init: &Cpu,
    dev: &D,
) -> Result<Box<dyn Head<D>>> {
    Ok(Box::new(LinearHead::new(spec.width, classes, init, dev)?))
}

// The CPU constructors: the seeded CPU device is also the generator of the initial values.
fn dtl_cpu(c: &SideConfig, s: &BackboneSpec, dev: &Cpu) -> Result<Box<dyn SideNetwork<Cpu>>> {
    dtl_on(c, s, dev, dev)
}

fn linear_cpu(c: &SideConfig, s: &BackboneSpec, dev: &Cpu) -> Result<Box<dyn SideNetwork<Cpu>>> {
    linear_on(c, s, dev, dev)
}

fn head_cpu(c: &HeadConfig, s: &BackboneSpec, n: usize, dev: &Cpu) -> Result<Box<dyn Head<Cpu>>> {
    head_on(c, s, n, dev, dev)
}

/// `dtl` / `dtl+` in kernel-set terms (the device training step).
fn dtl_kernels(cfg: &SideConfig, spec: &BackboneSpec) -> Result<KernelSide> {
    Ok(KernelSide::LowRank {
        rank: cfg.rank,
        beta: cfg.beta as f32,
        taps: cfg.tap_blocks(spec.depth),
        injects: cfg.inject_blocks(spec.depth),
        kernel: cfg.kernel_size(),
    })
}

/// The linear probe in kernel-set terms.
fn linear_kernels(_: &SideConfig, _: &BackboneSpec) -> Result<KernelSide> {
    Ok(KernelSide::None)
}

/// The linear head in kernel-set terms.
fn head_kernels(_: &HeadConfig, _: &BackboneSpec, _: usize) -> Result<KernelHead> {
    Ok(KernelHead::Linear)
}

inventory::submit! {
    SideEntry {
        name: "dtl",
        description: "DTL: low-rank maps on the tapped blocks, swish_beta, added after the inject blocks",
        build_cpu: dtl_cpu,
        kernels: Some(dtl_kernels),
        origin: module_path!(),
    }
}

inventory::submit! {
    SideEntry {
        name: "dtl+",
        description: "DTL+: DTL plus a shared depthwise k x k conv over the patch grid (side.kernel, default 3)",
        build_cpu: dtl_cpu,
        kernels: Some(dtl_kernels),
        origin: module_path!(),
    }
}

inventory::submit! {
    SideEntry {
        name: "linear",
        description: "linear probe: no side network, the backbone runs without a tape",
        build_cpu: linear_cpu,
        kernels: Some(linear_kernels),
        origin: module_path!(),
    }
}

inventory::submit! {
    HeadEntry {
        name: "linear",
        description: "pooled tokens -> the backbone's final norm -> linear classifier",
        build_cpu: head_cpu,
        kernels: Some(head_kernels),
        origin: module_path!(),
    }
}
