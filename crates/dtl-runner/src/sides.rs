//! The built-in side networks (`dtl`, `dtl+`, `linear`) and the `linear` head.

use dfdx::prelude::*;
use dtl_core::config::{HeadConfig, SideConfig};
use dtl_core::registry::{HeadEntry, KernelHead, KernelSide, SideEntry, SideTraits};
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

/// A parameter `name` of shape `want` on `dev` from host values of shape `shape`; a shape
/// that differs, or values that do not fill it, is an error naming the tensor and both shapes.
fn host_param<D: TrainDevice>(
    dev: &D,
    what: &str,
    name: &str,
    want: &[usize],
    shape: &[usize],
    values: Vec<f32>,
) -> Result<Param<D>> {
    if shape != want {
        return Err(DtlError::shape(format!(
            "{what}: tensor `{name}` has shape {shape:?}, expected {want:?}"
        )));
    }
    let n: usize = want.iter().product();
    if values.len() != n {
        return Err(DtlError::shape(format!(
            "{what}: tensor `{name}` of shape {want:?} needs {n} values, got {} (shape [{}])",
            values.len(),
            values.len()
        )));
    }
    Param::from_vec(dev, name, want, values)
}

/// The Compact Side Network of DTL, with the optional depthwise conv of DTL+.
///
/// One low-rank map `x A_i^T B_i^T` per tapped block (`side.<i>.a` (r, D) from
/// U(-1/sqrt D, 1/sqrt D), `side.<i>.b` (D, r) zeros), `g(z) = swish_beta(z)` added after each
/// inject block and, when `kernel > 0`, one shared depthwise `k x k` conv (`fusion.weight`
/// (D, 1, k, k), PyTorch's Conv2d default init) over the patch grid of `g(z)`.
///
/// On a hierarchical backbone (several [`BackboneSpec::stages`], e.g. Swin) each tap's maps
/// have the width `C_s` of the tapped block's stage, and DTL+ holds one conv per stage,
/// `fusion.<s>.weight` (C_s, 1, k, k) for every stage, after all the maps. Such a side network
/// trains with the device step ([`crate::resident`]); its tape-based forward refuses a
/// hierarchical backbone.
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
    hierarchical: bool,
    /// `side.<i>.a`, `side.<i>.b` per tap in order, then `fusion.weight` (one per stage,
    /// `fusion.<s>.weight`, on a hierarchical backbone) when kernel > 0.
    params: Vec<Param<D>>,
}

impl<D: TrainDevice> DtlSide<D> {
    /// A freshly initialised side network for `spec` on `dev`, its initial values drawn from
    /// the seeded CPU generator `init` (so every device starts from the same values).
    ///
    /// `rank` is r of every low-rank map, `beta` the slope of `swish_beta`, `taps` the blocks
    /// whose outputs feed the side network, `injects` the blocks after which `g(z)` is added,
    /// `kernel` the DTL+ depthwise conv size (0: plain DTL).
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
        let shapes = Self::shapes(spec, rank, &taps, &injects, kernel)?;
        let mut params = Vec::with_capacity(shapes.len());
        for (name, shape) in shapes {
            let p = if name.starts_with("fusion.") {
                uniform(init, dev, &name, &shape, 1.0 / kernel as f32)?
            } else if name.ends_with(".b") {
                Param::zeros(dev, &name, &shape)
            } else {
                uniform(init, dev, &name, &shape, 1.0 / (shape[1] as f32).sqrt())?
            };
            params.push(p);
        }
        Ok(Self::assemble(spec, beta, taps, injects, kernel, params))
    }

    /// The names and shapes of the parameters of a side network for `spec`, in parameter
    /// order: `side.<i>.a` (r, D) and `side.<i>.b` (D, r) for each tap `i` in order, then,
    /// when `kernel > 0`, `fusion.weight` (D, 1, k, k) (one `fusion.<s>.weight` per stage on a
    /// hierarchical backbone). Errors on a rank of 0, a block past the depth, no tap, no
    /// inject, or an inject before the first tap.
    ///
    /// ```
    /// use dtl_core::BackboneSpec;
    /// use dtl_runner::sides::DtlSide;
    /// let spec = BackboneSpec::vit("toy", 32, 8, 48, 4, 3);
    /// let s = DtlSide::<dfdx::prelude::Cpu>::shapes(&spec, 2, &[1, 3], &[3], 3).unwrap();
    /// assert_eq!(s[0], ("side.1.a".to_string(), vec![2, 48]));
    /// assert_eq!(s[4], ("fusion.weight".to_string(), vec![48, 1, 3, 3]));
    /// assert!(DtlSide::<dfdx::prelude::Cpu>::shapes(&spec, 2, &[1], &[4], 0).is_err());
    /// ```
    pub fn shapes(
        spec: &BackboneSpec,
        rank: usize,
        taps: &[usize],
        injects: &[usize],
        kernel: usize,
    ) -> Result<Vec<(String, Vec<usize>)>> {
        if rank == 0 {
            return Err(DtlError::argument("side.rank must be at least 1"));
        }
        if let Some(bad) = taps.iter().chain(injects).find(|&&i| i >= spec.depth) {
            return Err(DtlError::argument(format!(
                "side network: block {bad} is past the depth of `{}` (blocks 0-{})",
                spec.name,
                spec.depth.saturating_sub(1)
            )));
        }
        if taps.is_empty() || injects.is_empty() || injects[0] < taps[0] {
            return Err(DtlError::argument(
                "side network: needs at least one tap and one inject, and no inject before the first tap",
            ));
        }
        let mut out = Vec::new();
        for &i in taps {
            let d = spec.stage(i).width;
            out.push((format!("side.{i}.a"), vec![rank, d]));
            out.push((format!("side.{i}.b"), vec![d, rank]));
        }
        if kernel > 0 {
            for (name, d) in fusion_names(spec) {
                out.push((name, vec![d, 1, kernel, kernel]));
            }
        }
        Ok(out)
    }

    /// A side network for `spec` on `dev` with the given parameter values.
    ///
    /// `values` holds one `(shape, values)` pair per parameter, in the order of
    /// [`DtlSide::shapes`] (row-major values: `side.<i>.a` (r, D), `side.<i>.b` (D, r) per tap,
    /// then the DTL+ conv(s)). A wrong count, or a shape or length that does not match, is an
    /// error naming the tensor and both shapes. The other arguments are those of
    /// [`DtlSide::new`].
    ///
    /// ```
    /// use dfdx::prelude::*;
    /// use dtl_core::{BackboneSpec, Parameters};
    /// use dtl_runner::sides::DtlSide;
    /// let spec = BackboneSpec::vit("toy", 32, 8, 48, 4, 3);
    /// let dev = Cpu::default();
    /// let values: Vec<(Vec<usize>, Vec<f32>)> = DtlSide::<Cpu>::shapes(&spec, 2, &[2, 3], &[3], 0)
    ///     .unwrap()
    ///     .into_iter()
    ///     .map(|(_, shape)| { let n = shape.iter().product(); (shape, vec![0.01; n]) })
    ///     .collect();
    /// let side = DtlSide::from_params(&spec, 2, 100.0, vec![2, 3], vec![3], 0, values.clone(), &dev).unwrap();
    /// assert_eq!(side.params()[1].name, "side.2.b");
    /// let mut bad = values;
    /// bad[1].0 = vec![2, 48];
    /// let e = DtlSide::from_params(&spec, 2, 100.0, vec![2, 3], vec![3], 0, bad, &dev).err().unwrap();
    /// assert!(e.to_string().contains("side.2.b") && e.to_string().contains("[48, 2]"), "{e}");
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn from_params(
        spec: &BackboneSpec,
        rank: usize,
        beta: f64,
        taps: Vec<usize>,
        injects: Vec<usize>,
        kernel: usize,
        values: Vec<(Vec<usize>, Vec<f32>)>,
        dev: &D,
    ) -> Result<Self> {
        let shapes = Self::shapes(spec, rank, &taps, &injects, kernel)?;
        if values.len() != shapes.len() {
            let names: Vec<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
            return Err(DtlError::shape(format!(
                "side network: {} tensors given, `{}` needs {} ({})",
                values.len(),
                spec.name,
                shapes.len(),
                names.join(", ")
            )));
        }
        let mut params = Vec::with_capacity(shapes.len());
        for ((name, want), (shape, v)) in shapes.into_iter().zip(values) {
            params.push(host_param(dev, "side network", &name, &want, &shape, v)?);
        }
        Ok(Self::assemble(spec, beta, taps, injects, kernel, params))
    }

    fn assemble(
        spec: &BackboneSpec,
        beta: f64,
        taps: Vec<usize>,
        injects: Vec<usize>,
        kernel: usize,
        params: Vec<Param<D>>,
    ) -> Self {
        DtlSide {
            taps,
            injects,
            beta: beta as f32,
            kernel,
            prefix: spec.prefix_tokens,
            grid: spec.grid,
            hierarchical: spec.is_hierarchical(),
            params,
        }
    }

    fn single_stage(&self) -> Result<()> {
        if self.hierarchical {
            return Err(DtlError::Unavailable(
                "the tape-based side network needs a single-stage backbone; a hierarchical one \
                 (several stages) trains with the device step"
                    .into(),
            ));
        }
        Ok(())
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
            DtlError::argument(format!(
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
        self.single_stage()?;
        let (a, b) = self.maps(block)?;
        let (x, tape) = x.split_tape();
        let y = D::low_rank(&x, Some(tape), a, b)?;
        Ok(accumulate(z, y))
    }
    fn tap_frozen(&self, block: usize, x: &Act<D, NoneTape>, z: Option<Act<D>>) -> Result<Act<D>> {
        self.single_stage()?;
        let (a, b) = self.maps(block)?;
        let y = D::low_rank(x, None, a, b)?;
        Ok(accumulate(z, y))
    }
    fn inject(&self, _block: usize, z: &Act<D>) -> Result<Act<D>> {
        self.single_stage()?;
        let s = D::swish(z.with_empty_tape(), self.beta)?;
        if self.kernel == 0 {
            return Ok(s);
        }
        let w = self.params.last().expect("dtl+ holds its fusion weight");
        D::depthwise_conv_tokens(s, w, self.prefix, self.grid)
    }
}

/// The names and widths of the DTL+ convs of `spec`: `fusion.weight` at the width of a
/// single-stage backbone; `fusion.<s>.weight` at each stage's width for a hierarchical one.
///
/// ```
/// use dtl_core::{BackboneSpec, StageSpec};
/// use dtl_runner::sides::fusion_names;
/// let vit = BackboneSpec::vit("toy", 32, 8, 48, 4, 3);
/// assert_eq!(fusion_names(&vit), vec![("fusion.weight".to_string(), 48)]);
/// let st = |blocks, width| StageSpec { blocks, width, heads: 1, grid: (2, 2), prefix_tokens: 0 };
/// let two = BackboneSpec { stages: vec![st((0, 2), 24), st((2, 4), 48)], ..vit };
/// assert_eq!(fusion_names(&two)[1], ("fusion.1.weight".to_string(), 48));
/// ```
pub fn fusion_names(spec: &BackboneSpec) -> Vec<(String, usize)> {
    if spec.is_hierarchical() {
        spec.stages
            .iter()
            .enumerate()
            .map(|(s, st)| (format!("fusion.{s}.weight"), st.width))
            .collect()
    } else {
        vec![("fusion.weight".to_string(), spec.width)]
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
        Err(DtlError::argument(format!(
            "the linear probe taps no block (asked for block {block})"
        )))
    }
    fn inject(&self, block: usize, _z: &Act<D>) -> Result<Act<D>> {
        Err(DtlError::argument(format!(
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
            return Err(DtlError::argument(
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

impl<D: TrainDevice> LinearHead<D> {
    /// A head on `dev` with the given values: `weight` is `head.weight` as (shape, values)
    /// with shape (classes, width), `bias` is `head.bias` with shape (classes). The shapes
    /// give the head its width and classes; a bias that does not match, a shape that is not
    /// 2-d / 1-d, or values that do not fill their shape are errors naming the tensor and both
    /// shapes.
    ///
    /// ```
    /// use dfdx::prelude::*;
    /// use dtl_core::Head;
    /// use dtl_runner::sides::LinearHead;
    /// let dev = Cpu::default();
    /// let h = LinearHead::from_params((vec![2, 3], vec![0.5; 6]), (vec![2], vec![0.0, 1.0]), &dev).unwrap();
    /// assert_eq!(h.classes(), 2);
    /// let y = h.forward(dev.ones_like(&(1, 3)).leaky_traced()).unwrap();
    /// assert_eq!(y.as_vec(), vec![1.5, 2.5]);
    /// let e = LinearHead::from_params((vec![2, 3], vec![0.5; 6]), (vec![3], vec![0.0; 3]), &dev);
    /// assert!(e.is_err_and(|e| e.to_string().contains("head.bias")));
    /// ```
    pub fn from_params(
        weight: (Vec<usize>, Vec<f32>),
        bias: (Vec<usize>, Vec<f32>),
        dev: &D,
    ) -> Result<Self> {
        let (classes, width) = match weight.0.as_slice() {
            &[c, w] if c > 0 && w > 0 => (c, w),
            other => {
                return Err(DtlError::shape(format!(
                    "head: tensor `head.weight` has shape {other:?}, expected [classes, width] \
                     with both at least 1"
                )))
            }
        };
        let w = host_param(
            dev,
            "head",
            "head.weight",
            &[classes, width],
            &weight.0,
            weight.1,
        )?;
        let b = host_param(dev, "head", "head.bias", &[classes], &bias.0, bias.1)?;
        Ok(LinearHead {
            classes,
            params: vec![w, b],
        })
    }
}

/// The `dtl` / `dtl+` side network and the `linear` head of a dtl checkpoint file (the
/// `best.safetensors` / `last.safetensors` a run writes), for backbone `spec` on `dev`.
///
/// The side network's settings (rank, beta, taps, injects, kernel) come from the pipeline
/// stored in the checkpoint, the values from its tensors (`side.<i>.a`, `side.<i>.b`,
/// `fusion.weight`, `head.weight`, `head.bias`; the optimizer state is ignored). A missing or
/// extra tensor, or one whose shape differs from what `spec` and the settings give, is an
/// error naming the file, the tensor and both shapes.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::{BackboneSpec, Head, Parameters};
/// use dtl_runner::sides::{from_safetensors, DtlSide, LinearHead};
/// let spec = BackboneSpec::vit("toy", 32, 8, 48, 4, 3);
/// let dev = Cpu::seed_from_u64(0);
/// let side = DtlSide::new(&spec, 2, 100.0, vec![0, 1, 2, 3], vec![2, 3], 0, &dev, &dev).unwrap();
/// let head = LinearHead::new(48, 5, &dev, &dev).unwrap();
/// let pipeline = "[backbone]\nkind = \"toy\"\n[side]\nkind = \"dtl\"\ntaps = \"0-3\"\n\
///                 injects = \"2-3\"\n[data]\nkind = \"image-folder\"\nroot = \".\"\n";
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("last.safetensors");
/// let params: Vec<_> = side.params().into_iter().chain(head.params()).collect();
/// dtl_runner::checkpoint::save(&path, &params, None, pipeline, &serde_json::json!({})).unwrap();
/// let (side2, head2) = from_safetensors(&path, &spec, &dev).unwrap();
/// assert_eq!(side2.params()[0].value.as_vec(), side.params()[0].value.as_vec());
/// assert_eq!(head2.classes(), 5);
/// ```
pub fn from_safetensors<D: TrainDevice>(
    path: &std::path::Path,
    spec: &BackboneSpec,
    dev: &D,
) -> Result<(DtlSide<D>, LinearHead<D>)> {
    let ck = crate::checkpoint::load(path)?;
    if ck.pipeline.trim().is_empty() {
        return Err(DtlError::file(
            path,
            "the checkpoint stores no pipeline (metadata `pipeline`), so the side network's \
             settings are unknown; build it with `DtlSide::from_params`",
        ));
    }
    let cfg = dtl_core::PipelineConfig::from_str(&ck.pipeline, path, &[])?;
    let side = &cfg.side;
    if side.kind != "dtl" && side.kind != "dtl+" {
        return Err(DtlError::file(
            path,
            format!(
                "the checkpoint was trained with side.kind = \"{}\"; only \"dtl\" and \"dtl+\" \
                 side networks are read here",
                side.kind
            ),
        ));
    }
    if cfg.head.kind != "linear" {
        return Err(DtlError::file(
            path,
            format!(
                "the checkpoint was trained with head.kind = \"{}\"; only the \"linear\" head \
                 is read here",
                cfg.head.kind
            ),
        ));
    }
    let (taps, injects) = (side.tap_blocks(spec.depth), side.inject_blocks(spec.depth));
    let kernel = side.kernel_size();
    let shapes = DtlSide::<D>::shapes(spec, side.rank, &taps, &injects, kernel)
        .map_err(|e| DtlError::file(path, e.to_string()))?;
    let mut stored: std::collections::HashMap<&str, (&Vec<usize>, &Vec<f32>)> = ck
        .params
        .iter()
        .map(|(n, s, v)| (n.as_str(), (s, v)))
        .collect();
    let mut take = |name: &str| {
        stored
            .remove(name)
            .map(|(s, v)| (s.clone(), v.clone()))
            .ok_or_else(|| {
                DtlError::file(
                    path,
                    format!("tensor `{name}` is missing (the side network of its pipeline and the head need it)"),
                )
            })
    };
    let mut values = Vec::with_capacity(shapes.len());
    for (name, _) in &shapes {
        values.push(take(name)?);
    }
    let (weight, bias) = (take("head.weight")?, take("head.bias")?);
    if let Some(extra) = stored.keys().min() {
        return Err(DtlError::file(
            path,
            format!(
                "tensor `{extra}` is not a parameter of a `{}` side network or the linear head",
                side.kind
            ),
        ));
    }
    if weight.0.get(1) != Some(&spec.width) {
        return Err(DtlError::file(
            path,
            format!(
                "tensor `head.weight` has shape {:?}, expected [classes, {}] (the width of `{}`)",
                weight.0, spec.width, spec.name
            ),
        ));
    }
    let file = |e: DtlError| DtlError::file(path, e.to_string());
    let net = DtlSide::from_params(
        spec, side.rank, side.beta, taps, injects, kernel, values, dev,
    )
    .map_err(file)?;
    let head = LinearHead::from_params(weight, bias, dev).map_err(file)?;
    Ok((net, head))
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
    SideTraits {
        label: Some("DTL"),
        reads_options: false,
        ..SideTraits::plugin("dtl")
    }
}

inventory::submit! {
    SideTraits {
        default_kernel: 3,
        label: Some("DTL+"),
        label_kernel: true,
        reads_options: false,
        ..SideTraits::plugin("dtl+")
    }
}

inventory::submit! {
    SideTraits {
        taps: false,
        reads_options: false,
        ..SideTraits::plugin("linear")
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
