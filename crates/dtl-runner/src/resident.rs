//! The training step written over the kernel set: from the uploaded batch to the AdamW update,
//! everything stays in the device's memory.
//!
//! [`ResidentModel`] composes a frozen [`KernelBackbone`], the side network and the head
//! described by their registry entries in kernel-set terms ([`KernelSide`], [`KernelHead`]),
//! the loss, gradient clipping and AdamW, all over one [`Kernels`] device. Every buffer a step
//! needs is planned once for a largest batch ([`ResidentModel::plan`]) and reused; a step
//! allocates nothing on the device, and the host reads back only what it asks for (the loss at
//! logging steps, the evaluation counts at the end of an evaluation).
//!
//! The same code runs on every device: on the CPU with `dtl_kernels::CpuKernels` (where it is
//! tested against the PyTorch reference), on a CUDA GPU with `dtl_cuda::Gpu`.
//!
//! # The step
//!
//! With taps `T`, injects `J` and `f = min J`:
//!
//! ```text
//! x_0 = embed(images); z = 0
//! for i in 0..L:
//!     if i in T: t_i = x_i A_i^T; z += t_i B_i^T          # t_i (rows x r) is kept
//!     x_{i+1} = Block_i(x_i)                              # drop path from the step's masks
//!     if i in J: x_{i+1} += g(z)                          # g = swish_beta [then depthwise conv]
//! logits = head(norm(pool(x_L))); loss, dlogits = cross_entropy(logits, targets)
//! ```
//!
//! Kept for the backward pass: the inputs of the tapped blocks and of the blocks after `f`
//! (whose VJPs need them), the `t_i`, and a copy of `z` at each inject (one activation of its
//! stage per inject; the backward pass reads it, so it never sums the `t_i` again). The blocks
//! after `f` also keep internals from the forward pass
//! ([`KernelBackbone::block_forward_saving`], [`KernelBackbone::block_vjp_saved`]): with
//! `run.activations = "store"` all of them, so that their VJPs recompute nothing; with
//! `"recompute"` all but the last of [`KernelBackbone::saved_lens`] (for the ViT and Swin,
//! `x1` and `qkv` but not the MLP pre-activation, 4 of its 8 activations), so that their VJPs
//! recompute only LN2 and fc1. A block before `f` keeps nothing. The backward pass runs the
//! head, the norm's VJP and the blocks' input-only VJPs down to block `f + 1`, accumulating `dL/dz` over the injects; each tap's
//! maps then get their gradients from it, and the taps after `f` add theirs to `dL/dx_i`.
//!
//! # Stages
//!
//! A hierarchical backbone (several [`BackboneSpec::stages`], e.g. Swin) runs its transition
//! ([`KernelBackbone::stage_forward`]) at the start of every stage after the first, and `z`
//! starts again from zero there: taps and injects work at their stage's width and tokens, and
//! DTL+ has one conv per stage (`fusion.<s>.weight`) over that stage's grid. Without a class
//! token the final norm runs on every token and the head sees their mean. The backward pass
//! crosses the transitions after `f` with [`KernelBackbone::stage_vjp`] (their inputs are
//! kept), and `dL/dz` starts again from zero below each. What no gradient reaches there (a tap
//! with no inject at or after it in its stage, the conv of a stage without injects) keeps a
//! zero gradient and is left out of the update entirely, as PyTorch's AdamW leaves a parameter
//! whose `.grad` is None: no moment, no weight decay. (A single-stage backbone updates every
//! tensor, as the tape-based CPU path does.)
//!
//! # Precision
//!
//! The step stores what the backbone computes at the device's precision
//! ([`Kernels::precision`]; bf16 on a GPU opened for it, f32 on the CPU): the token
//! activations, the block inputs kept for the backward pass, the kept `z` per inject, the
//! blocks' stored internals and the gradient stream through the blocks are
//! [`Kernels::alloc_act`] buffers, as are the backbone's workspaces. In training the forward
//! pass takes `g(z)` from the kept copy of `z`, so that the forward and the backward pass see
//! the same (rounded) `z`: with `beta = 100` the slope of `swish_beta` is sensitive to it. The side network and the
//! head compute in f32 (`Kernels::alloc`): their parameters, gradients and AdamW moments, the
//! running `z` and its gradient, `t_i`, `g(z)`, the images, the pooled features, the logits,
//! the loss and every count. On the CPU all of it is f32, so the step is the same there.
//!
//! # Graphs
//!
//! A training step of a full batch (the planned batch size) is recorded once with
//! [`Kernels::capture`] and replayed with [`Kernels::replay`] on the later steps of that size,
//! so that a replayed step is one graph launch: the forward pass, the loss, the backward pass,
//! the gradient clipping and AdamW. The first full step runs as plain operations (so that
//! every lazily made device resource exists), the second is recorded. Images, targets and
//! drop-path scales are uploaded into the planned buffers before each replay, and so are the
//! step's AdamW scalars (learning rate, weight decay and bias corrections per parameter, which
//! change every step with the schedule and the step count): the recorded update reads them
//! there ([`Kernels::adamw_from`]) where a plain update passes them to its launches
//! ([`Kernels::adamw`]), with the same results bit for bit. A batch of another size (the last
//! partial batch of an epoch), a different set of dropping blocks or clipping norm, a
//! [`ResidentModel::forward_backward`] without the update (recorded on its own when it repeats)
//! and every evaluation run as plain operations. The loss is read after the step
//! ([`ResidentModel::read_loss`]). A device that records nothing (the CPU) runs the work
//! plainly and says why ([`GraphStatus::Plain`]); `DTL_GRAPHS=0` ([`graphs_from_env`]),
//! [`ResidentModel::set_graphs`] and [`ResidentSource::with_graphs`] turn recording off.
//! Replaying issues the recorded operations on the same buffers, so its results are those of
//! the plain step.

use std::sync::Arc;

use dfdx::prelude::*;
use dtl_core::choice::Precision;
use dtl_core::config::PipelineConfig;
use dtl_core::registry::{KernelHead, KernelSide};
use dtl_core::{BackboneSpec, DropPath, DtlError, Param, Result};
use dtl_kernels::{
    AdamwStep, Capture, ConvShape, DropScales, GraphId, KernelBackbone, Kernels, MemoryStats,
};

use dtl_core::BenchOptions;
use rand::SeedableRng;
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::data::{Batch, BatchIter};
use crate::device::TrainDevice;
use crate::job::{Engine, EngineSource, EvalResult};
use crate::optim::AdamW;

/// One trainable tensor on the device: its value, gradient and AdamW moments.
pub struct DeviceParam<K: Kernels> {
    /// Checkpoint name (`side.3.a`, `fusion.weight`, `head.weight`, ...).
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Whether weight decay applies (see `optim.no_decay`).
    pub decays: bool,
    /// Values.
    pub value: K::Buf,
    /// Gradient of the last step.
    pub grad: K::Buf,
    /// First moment.
    pub m: K::Buf,
    /// Second moment.
    pub v: K::Buf,
}

impl<K: Kernels> DeviceParam<K> {
    fn new(k: &K, p: &Param<Cpu>, decays: bool) -> Result<Self> {
        let n = p.numel();
        Ok(DeviceParam {
            name: p.name.clone(),
            shape: p.shape.clone(),
            decays,
            value: k.upload_new(&p.value.as_vec())?,
            grad: k.alloc(n)?,
            m: k.alloc(n)?,
            v: k.alloc(n)?,
        })
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where each trainable tensor sits in [`ResidentModel::params`].
#[derive(Debug, Clone)]
struct Layout {
    /// `(block, index of A, index of B)` per tap, ascending blocks.
    taps: Vec<(usize, usize, usize)>,
    /// Inject blocks, ascending.
    injects: Vec<usize>,
    rank: usize,
    beta: f32,
    /// Per stage, the index of its conv (`fusion.weight`, or `fusion.<s>.weight` on a
    /// hierarchical backbone), and the kernel side (DTL+).
    conv: Option<(Vec<usize>, usize)>,
    head_w: usize,
    head_b: usize,
    /// Per parameter: on a hierarchical backbone, no gradient can reach it (a tap with no
    /// inject at or after it in its stage, the conv of a stage without injects), so the update
    /// leaves it untouched. All false on a single-stage backbone.
    unused: Vec<bool>,
}

impl Layout {
    fn is_probe(&self) -> bool {
        self.taps.is_empty()
    }
    fn first_inject(&self) -> Option<usize> {
        self.injects.first().copied()
    }
    fn tap_of(&self, block: usize) -> Option<usize> {
        self.taps.iter().position(|t| t.0 == block)
    }
}

/// The buffers of a step for batches of up to `cap` samples.
struct Buffers<K: Kernels, B: KernelBackbone<K>> {
    cap: usize,
    ws: B::Workspace,
    images: K::Buf,
    targets: K::Buf,
    labels: K::Buf,
    cur: K::Buf,
    next: K::Buf,
    /// Per block: its input, for the blocks whose input the backward pass needs.
    saved: Vec<Option<K::Buf>>,
    /// Per stage: the input of the transition into it (the previous stage's output), for the
    /// transitions the backward pass crosses.
    trans: Vec<Option<K::Buf>>,
    /// The final norm of every token (backbones without a class token: norm, then mean).
    normed: K::Buf,
    /// Per tap (in tap order): `x_i A_i^T`.
    t: Vec<K::Buf>,
    z: K::Buf,
    /// Per block: for an inject, `z` as it was there in the forward pass (rows x width of its
    /// stage; one activation per inject, 6 x 1.2 MiB for ViT-Ti/16 at batch 8 with injects
    /// 6-11), which the backward pass reads instead of summing it again from the `t_i`.
    zk: Vec<Option<K::Buf>>,
    s: K::Buf,
    inj: K::Buf,
    gx: K::Buf,
    gx2: K::Buf,
    gz: K::Buf,
    ds: K::Buf,
    dt: K::Buf,
    pooled: K::Buf,
    feats: K::Buf,
    logits: K::Buf,
    dlogits: K::Buf,
    dfeats: K::Buf,
    dpooled: K::Buf,
    loss: K::Buf,
    sq: K::Buf,
    /// The AdamW scalars of the step, one entry of [`AdamwStep::SCALARS`] values per
    /// parameter (in [`ResidentModel::params`] order), uploaded before a recorded step runs.
    scalars: K::Buf,
    stats: K::Buf,
    drops: Vec<DropScales<K>>,
    /// Per block: its internals from the forward pass for the blocks after the first inject
    /// (all of [`KernelBackbone::saved_lens`] with `run.activations = "store"`, all but the
    /// last with `"recompute"`), else empty.
    internals: Vec<Vec<K::Buf>>,
}

/// Hyper-parameters of AdamW (see [`AdamwStep`]).
#[derive(Debug, Clone, Copy)]
struct AdamSettings {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

/// Counts of an evaluation pass, read from the device once at its end.
///
/// ```
/// let c = dtl_runner::resident::EvalCounts { top1: 3.0, top5: 4.0, loss_sum: 2.0, non_finite: 0.0, images: 4 };
/// assert_eq!(c.top1_rate(), 0.75);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalCounts {
    /// Top-1 hits.
    pub top1: f64,
    /// Top-5 hits.
    pub top5: f64,
    /// Sum of the per-image cross entropy.
    pub loss_sum: f64,
    /// Images whose logits were not all finite.
    pub non_finite: f64,
    /// Images evaluated.
    pub images: usize,
}

impl EvalCounts {
    /// Top-1 accuracy in `[0, 1]` (0 for no image).
    pub fn top1_rate(&self) -> f64 {
        self.top1 / self.images.max(1) as f64
    }
}

/// A frozen backbone, the side network and the head, with their gradients and optimizer state,
/// all in the memory of one [`Kernels`] device.
///
/// Built from a pipeline with [`ResidentModel::from_config`]: the side network and head are
/// the registered ones, described in kernel-set terms by their registry entries, and their
/// initial values are drawn from the same seeded CPU generator as the CPU path's, so a run
/// starts from the same parameters on every device. Parameters are in the same order and
/// under the same names as the CPU model's, so checkpoints move between devices.
///
/// ```no_run
/// # fn demo<K: dtl_kernels::Kernels + Clone, B: dtl_kernels::KernelBackbone<K>>(
/// #     cfg: &dtl_core::PipelineConfig, k: K, backbone: B) -> dtl_core::Result<()> {
/// use std::sync::Arc;
/// use dtl_runner::resident::ResidentModel;
/// let mut model = ResidentModel::from_config(cfg, k, Arc::new(backbone), 10)?;
/// model.plan(32)?;
/// let images = vec![0.0f32; 32 * 3 * 224 * 224];
/// let targets = dtl_runner::model::smoothed_targets(&[0; 32], 10, 0.0);
/// let drops = vec![None; 12];
/// model.train_step(&images, 32, &targets, &drops, 1e-3, None)?;
/// let loss = model.read_loss()?;
/// # Ok(()) }
/// ```
pub struct ResidentModel<K: Kernels, B: KernelBackbone<K>> {
    k: K,
    backbone: Arc<B>,
    spec: BackboneSpec,
    classes: usize,
    cls_pool: bool,
    layout: Layout,
    params: Vec<DeviceParam<K>>,
    adam: AdamSettings,
    /// Optimizer steps taken.
    steps: u64,
    /// `run.activations = "store"`: the blocks after the first inject keep all their internals
    /// (else all but the last, see [`KernelBackbone::saved_lens`]).
    store: bool,
    bufs: Option<Buffers<K, B>>,
    /// Whether the step may be recorded as a graph, and whether it has been.
    graph_status: GraphStatus,
    /// The recorded step of the full batch, when there is one.
    graph: Option<StepGraph>,
    /// What the last plain step of the full batch did: the next step of the full batch that
    /// does the same is recorded.
    warm: Option<StepKind>,
}

impl<K: Kernels, B: KernelBackbone<K>> Drop for ResidentModel<K, B> {
    fn drop(&mut self) {
        if let Some(g) = self.graph.take() {
            self.k.release(g.id);
        }
    }
}

/// What one step of the full batch runs: which blocks drop, and whether the update follows
/// the backward pass (`Some`, with the clipping norm) or not (`None`,
/// [`ResidentModel::forward_backward`]). A recorded step is replayed only for the same kind.
#[derive(Debug, Clone, PartialEq)]
struct StepKind {
    batch: usize,
    drops: Vec<bool>,
    update: Option<Option<f32>>,
}

/// A recorded step: the forward and backward pass, and with [`StepKind::update`] the
/// clipping and AdamW, of the steps of its kind.
struct StepGraph {
    kind: StepKind,
    id: GraphId,
}

/// Whether the training step runs as a recorded graph ([`Kernels::capture`]), as the reports
/// give it ([`GraphStatus::describe`]).
///
/// ```
/// use dtl_runner::resident::GraphStatus;
/// assert_eq!(GraphStatus::Captured.describe(), "captured");
/// assert_eq!(GraphStatus::Plain("cpu does not record graphs".into()).describe(), "cpu does not record graphs");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphStatus {
    /// Graphs are turned off, for the reason given (`DTL_GRAPHS=0`,
    /// [`ResidentModel::set_graphs`]).
    Off(String),
    /// Nothing recorded yet: the step of the full batch is recorded on its second run (the
    /// first runs as plain operations, so that every lazily made device resource exists).
    Pending,
    /// The step of the full batch is recorded and replayed: the forward and backward pass,
    /// and in training the gradient clipping and AdamW, as one graph launch.
    Captured,
    /// The device ran the step as plain operations instead of recording it, for the reason
    /// given ([`Capture::Plain`]).
    Plain(String),
}

impl GraphStatus {
    /// The words the reports carry under `graph`: `captured`, or why not.
    ///
    /// ```
    /// use dtl_runner::resident::GraphStatus;
    /// assert_eq!(GraphStatus::Off("DTL_GRAPHS=0".into()).describe(), "off (DTL_GRAPHS=0)");
    /// assert!(GraphStatus::Pending.describe().starts_with("not recorded"));
    /// ```
    pub fn describe(&self) -> String {
        match self {
            GraphStatus::Off(why) => format!("off ({why})"),
            GraphStatus::Pending => {
                "not recorded: fewer than two steps ran at the full batch size".to_string()
            }
            GraphStatus::Captured => "captured".to_string(),
            GraphStatus::Plain(why) => why.clone(),
        }
    }
}

/// Whether the environment allows the training step to be recorded as a graph:
/// `DTL_GRAPHS` unset, empty, `1`, `on` or `true` allows it; `0`, `off` or `false` turns it
/// off; anything else is an error naming the variable.
///
/// ```
/// // unset in the doc tests' environment
/// if std::env::var_os("DTL_GRAPHS").is_none() {
///     assert!(dtl_runner::resident::graphs_from_env().unwrap());
/// }
/// ```
pub fn graphs_from_env() -> Result<bool> {
    match std::env::var("DTL_GRAPHS") {
        Err(_) => Ok(true),
        Ok(v) => match v.trim() {
            "" | "1" | "on" | "true" => Ok(true),
            "0" | "off" | "false" => Ok(false),
            other => Err(DtlError::env(
                "DTL_GRAPHS",
                other,
                "1 (record the training step as a CUDA graph, the default) or 0 (plain launches)",
            )),
        },
    }
}

fn unsupported(what: &str, name: &str) -> DtlError {
    DtlError::Unavailable(format!(
        "{what} = \"{name}\" has no implementation over the kernel set, so it cannot train on a GPU; \
         use a built-in one (side.kind = \"dtl\", \"dtl+\" or \"linear\"; head.kind = \"linear\") \
         or set run.device = \"cpu\""
    ))
}

impl<K: Kernels + Clone, B: KernelBackbone<K>> ResidentModel<K, B> {
    /// The pipeline's side network and head on `k` for `classes` classes, initialised from
    /// `run.seed` exactly as the CPU model is.
    pub fn from_config(
        cfg: &PipelineConfig,
        k: K,
        backbone: Arc<B>,
        classes: usize,
    ) -> Result<Self> {
        let spec = backbone.spec().clone();
        let reg = dtl_core::registry()?;
        let side_entry = reg.side(&cfg.side.kind)?;
        let side = (side_entry
            .kernels
            .ok_or_else(|| unsupported("side.kind", side_entry.name))?)(
            &cfg.side, &spec
        )?;
        let head_entry = reg.head(&cfg.head.kind)?;
        let head = (head_entry
            .kernels
            .ok_or_else(|| unsupported("head.kind", head_entry.name))?)(
            &cfg.head, &spec, classes
        )?;
        let init = Cpu::seed_from_u64(cfg.run.seed);
        let (cpu_side, cpu_head) = Cpu::build_parts(cfg, &spec, classes, &init, &init)?;
        let mut host: Vec<&Param<Cpu>> = cpu_side.params();
        host.extend(cpu_head.params());
        let params = host
            .iter()
            .map(|p| DeviceParam::new(&k, p, cfg.optim.decays(&p.name)))
            .collect::<Result<Vec<_>>>()?;
        let adam = AdamSettings {
            beta1: cfg.optim.betas[0],
            beta2: cfg.optim.betas[1],
            eps: cfg.optim.eps,
            weight_decay: cfg.optim.weight_decay,
        };
        let graphs = graphs_from_env()?;
        let mut model = Self::assemble(
            k,
            backbone,
            spec,
            side,
            head,
            params,
            adam,
            classes,
            cfg.head.pool == "cls",
        )?;
        model.store = cfg.run.activations == "store";
        if !graphs {
            model.graph_status = GraphStatus::Off("DTL_GRAPHS=0".into());
        }
        Ok(model)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        k: K,
        backbone: Arc<B>,
        spec: BackboneSpec,
        side: KernelSide,
        head: KernelHead,
        params: Vec<DeviceParam<K>>,
        adam: AdamSettings,
        classes: usize,
        cls_pool: bool,
    ) -> Result<Self> {
        let find = |name: &str, shape: &[usize]| -> Result<usize> {
            let i = params.iter().position(|p| p.name == name).ok_or_else(|| {
                DtlError::argument(format!(
                    "the side network and head hold no tensor `{name}` (they hold {})",
                    params
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            if params[i].shape != shape {
                return Err(DtlError::shape(format!(
                    "tensor `{name}` has shape {:?}, the kernel-set step needs {shape:?}",
                    params[i].shape
                )));
            }
            Ok(i)
        };
        check_stages(&spec)?;
        if cls_pool && spec.prefix_tokens == 0 {
            return Err(DtlError::config(
                "pipeline",
                "head.pool",
                None,
                format!(
                    "\"cls\" needs a class token and backbone `{}` has none; use \"mean\"",
                    spec.name
                ),
            ));
        }
        let d = spec.width;
        let KernelHead::Linear = head;
        let head_w = find("head.weight", &[classes, d])?;
        let head_b = find("head.bias", &[classes])?;
        let layout = match side {
            KernelSide::None => Layout {
                taps: Vec::new(),
                injects: Vec::new(),
                rank: 0,
                beta: 0.0,
                conv: None,
                head_w,
                head_b,
                unused: vec![false; params.len()],
            },
            KernelSide::LowRank {
                rank,
                beta,
                taps,
                injects,
                kernel,
            } => {
                if taps.is_empty() || injects.is_empty() || injects[0] < taps[0] {
                    return Err(DtlError::argument(
                        "side network: needs at least one tap and one inject, and no inject before the first tap",
                    ));
                }
                if let Some(bad) = taps.iter().chain(&injects).find(|&&i| i >= spec.depth) {
                    return Err(DtlError::argument(format!(
                        "side network: block {bad} is past the depth of `{}` (blocks 0-{})",
                        spec.name,
                        spec.depth.saturating_sub(1)
                    )));
                }
                let taps = taps
                    .iter()
                    .map(|&i| {
                        let w = spec.stage(i).width;
                        Ok((
                            i,
                            find(&format!("side.{i}.a"), &[rank, w])?,
                            find(&format!("side.{i}.b"), &[w, rank])?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let conv = if kernel > 0 {
                    let convs = crate::sides::fusion_names(&spec)
                        .iter()
                        .map(|(name, w)| find(name, &[*w, 1, kernel, kernel]))
                        .collect::<Result<Vec<_>>>()?;
                    Some((convs, kernel))
                } else {
                    None
                };
                // What no gradient reaches on a hierarchical backbone: PyTorch leaves a
                // parameter whose `.grad` is None untouched, weight decay included. A
                // single-stage backbone updates every tensor, as the tape-based CPU path does
                // (a tap after the last inject keeps a zero gradient and decays), so that both
                // paths train the same values.
                let mut unused = vec![false; params.len()];
                let injected = |from: usize| {
                    let st = spec.stage(from);
                    !spec.is_hierarchical() || injects.iter().any(|&j| j >= from && st.contains(j))
                };
                for &(i, a, b) in &taps {
                    if !injected(i) {
                        unused[a] = true;
                        unused[b] = true;
                    }
                }
                if let Some((convs, _)) = &conv {
                    for (&c, st) in convs.iter().zip(&spec.stages) {
                        unused[c] = !injected(st.blocks.0);
                    }
                }
                Layout {
                    taps,
                    injects,
                    rank,
                    beta,
                    conv,
                    head_w,
                    head_b,
                    unused,
                }
            }
        };
        Ok(ResidentModel {
            k,
            backbone,
            spec,
            classes,
            cls_pool,
            layout,
            params,
            adam,
            steps: 0,
            store: false,
            bufs: None,
            graph_status: GraphStatus::Pending,
            graph: None,
            warm: None,
        })
    }

    /// The device.
    pub fn kernels(&self) -> &K {
        &self.k
    }

    /// The frozen backbone.
    pub fn backbone(&self) -> &Arc<B> {
        &self.backbone
    }

    /// Classes of the head.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The trainable tensors, side network first, then the head (the CPU model's order).
    pub fn params(&self) -> &[DeviceParam<K>] {
        &self.params
    }

    /// Number of trainable scalars.
    pub fn trainable_params(&self) -> usize {
        self.params.iter().map(|p| p.numel()).sum()
    }

    /// Optimizer steps taken.
    pub fn optim_steps(&self) -> u64 {
        self.steps
    }

    /// Memory of the device, when it tracks it.
    pub fn memory(&self) -> Option<MemoryStats> {
        self.k.memory()
    }

    /// The precision the device stores activations and frozen weights at
    /// ([`Kernels::precision`]); parameters, gradients and optimizer state are f32 always.
    pub fn precision(&self) -> Precision {
        self.k.precision()
    }

    /// Allows (the default, unless `DTL_GRAPHS=0`) or forbids recording the training step as
    /// a graph. Forbidding it releases a recorded graph; allowing it again records on the
    /// second step of the full batch from then on.
    pub fn set_graphs(&mut self, on: bool) {
        if let Some(g) = self.graph.take() {
            self.k.release(g.id);
        }
        self.warm = None;
        self.graph_status = if on {
            GraphStatus::Pending
        } else {
            GraphStatus::Off("turned off by the caller".into())
        };
    }

    /// Whether the training step runs as a recorded graph.
    pub fn graph_status(&self) -> &GraphStatus {
        &self.graph_status
    }

    /// Plans every buffer a step needs for batches of up to `batch` samples (done once; a
    /// larger batch later plans again).
    pub fn plan(&mut self, batch: usize) -> Result<()> {
        if batch == 0 {
            return Err(DtlError::argument("the batch size must be at least 1"));
        }
        if self.bufs.as_ref().is_some_and(|b| b.cap >= batch) {
            return Ok(());
        }
        // Free the old plan (and the graph that holds its buffers) before making the new one.
        self.forget_graph();
        self.bufs = None;
        let k = &self.k;
        let s = &self.spec;
        let (d, c) = (s.width, self.classes);
        // Activations of each stage, and the largest: the buffers every stage shares.
        let stage_acts = s
            .stages
            .iter()
            .map(|st| dtl_kernels::checked_product("activations", &[batch, st.tokens(), st.width]))
            .collect::<Result<Vec<_>>>()?;
        let act = stage_acts.iter().copied().max().unwrap_or(0);
        let max_rows = s
            .stages
            .iter()
            .map(|st| batch * st.tokens())
            .max()
            .unwrap_or(0);
        let l = &self.layout;
        let keep = |i: usize| match l.first_inject() {
            Some(f) => l.tap_of(i).is_some() || i > f,
            None => false,
        };
        let side_act = if l.is_probe() { 0 } else { act };
        let saved = (0..s.depth)
            .map(|i| {
                if keep(i) {
                    k.alloc_act(stage_acts[s.stage_of(i)]).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let trans = (0..s.stages.len())
            .map(|si| match l.first_inject() {
                Some(f) if si > 0 && f < s.stages[si].blocks.0 => {
                    k.alloc_act(stage_acts[si - 1]).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let t = l
            .taps
            .iter()
            .map(|&(i, _, _)| k.alloc(batch * s.stage(i).tokens() * l.rank))
            .collect::<Result<Vec<_>>>()?;
        let drops = (0..s.depth)
            .map(|_| DropScales::alloc(k, batch))
            .collect::<Result<Vec<_>>>()?;
        let conv_act = if l.conv.is_some() { act } else { 0 };
        // One set of internals per kept block, of the lengths the backbone gives for its
        // largest batch (for a hierarchical backbone, lengths that hold any stage's block);
        // "recompute" leaves out the last, largest one (the ViT's and Swin's MLP
        // pre-activation), whose VJP then recomputes only LN2 and fc1.
        let mut lens = self.backbone.saved_lens(batch)?;
        if !self.store {
            lens.pop();
        }
        let zk = (0..s.depth)
            .map(|i| {
                if l.injects.contains(&i) {
                    k.alloc_act(stage_acts[s.stage_of(i)]).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let internals = (0..s.depth)
            .map(|i| match l.first_inject() {
                Some(f) if i > f => lens.iter().map(|&len| k.alloc_act(len)).collect(),
                _ => Ok(Vec::new()),
            })
            .collect::<Result<Vec<_>>>()?;
        let bufs = Buffers {
            cap: batch,
            ws: self.backbone.workspace(k, batch)?,
            images: k.alloc(dtl_kernels::checked_product(
                "images",
                &[batch, s.in_chans, s.image_size, s.image_size],
            )?)?,
            targets: k.alloc(batch * c)?,
            labels: k.alloc(batch)?,
            cur: k.alloc_act(act)?,
            next: k.alloc_act(act)?,
            saved,
            trans,
            normed: k.alloc(if self.norm_first() {
                stage_acts[stage_acts.len() - 1]
            } else {
                0
            })?,
            t,
            z: k.alloc(side_act)?,
            zk,
            s: k.alloc(conv_act)?,
            inj: k.alloc(side_act)?,
            gx: k.alloc_act(side_act)?,
            gx2: k.alloc_act(side_act)?,
            gz: k.alloc(side_act)?,
            ds: k.alloc(conv_act)?,
            dt: k.alloc(max_rows * l.rank)?,
            pooled: k.alloc(batch * d)?,
            feats: k.alloc(batch * d)?,
            logits: k.alloc(batch * c)?,
            dlogits: k.alloc(batch * c)?,
            dfeats: k.alloc(batch * d)?,
            dpooled: k.alloc(batch * d)?,
            loss: k.alloc(1)?,
            sq: k.alloc(1)?,
            scalars: k.alloc(dtl_kernels::checked_product(
                "step scalars",
                &[self.params.len(), AdamwStep::SCALARS],
            )?)?,
            stats: k.alloc(4)?,
            drops,
            internals,
        };
        self.bufs = Some(bufs);
        Ok(())
    }

    fn check_batch(&self, images: usize, n: usize) -> Result<()> {
        let s = &self.spec;
        let want = n * s.in_chans * s.image_size * s.image_size;
        if n == 0 || images != want {
            return Err(DtlError::shape(format!(
                "a batch of {n} images needs {want} values at {0}x{0}, got {images}",
                s.image_size
            )));
        }
        Ok(())
    }

    /// The token range the head pools over.
    fn pool_range(&self) -> (usize, usize) {
        if self.cls_pool {
            (0, 1)
        } else {
            (self.spec.prefix_tokens, self.spec.tokens())
        }
    }

    /// Whether the final norm runs on every token before the mean (a hierarchical backbone
    /// such as Swin), rather than on the pooled tokens (a ViT).
    fn norm_first(&self) -> bool {
        self.spec.is_hierarchical()
    }

    /// `(tokens, width)` of stage `stage`.
    fn stage_dims(&self, stage: usize) -> (usize, usize) {
        let st = &self.spec.stages[stage];
        (st.tokens(), st.width)
    }

    fn conv_shape(&self, batch: usize, kernel: usize, stage: usize) -> ConvShape {
        let st = &self.spec.stages[stage];
        ConvShape {
            batch,
            prefix: st.prefix_tokens,
            grid: st.grid,
            width: st.width,
            kernel,
        }
    }

    /// The forward pass on the uploaded images (`bufs.images`) up to the logits: with `train`,
    /// keeps what the backward pass needs and applies the drop-path scales in `bufs.drops`.
    fn forward(
        &self,
        bufs: &mut Buffers<K, B>,
        n: usize,
        train: bool,
        drops: &[bool],
    ) -> Result<()> {
        let k = &self.k;
        let bb = &*self.backbone;
        let s = &self.spec;
        let l = &self.layout;
        bb.embed(k, &mut bufs.ws, &bufs.images, n, &mut bufs.cur)?;
        for (si, st) in s.stages.iter().enumerate() {
            let (tokens, d) = (st.tokens(), st.width);
            let rows = n * tokens;
            let act = rows * d;
            if si > 0 {
                if train {
                    if let Some(x) = bufs.trans[si].as_mut() {
                        let (pt, pd) = self.stage_dims(si - 1);
                        k.copy(&bufs.cur, x, n * pt * pd)?;
                    }
                }
                bb.stage_forward(k, &mut bufs.ws, si, &bufs.cur, n, &mut bufs.next)?;
                std::mem::swap(&mut bufs.cur, &mut bufs.next);
            }
            // The side state starts again from zero in every stage.
            if !l.is_probe() {
                k.fill(&mut bufs.z, act, 0.0)?;
            }
            for i in st.blocks.0..st.blocks.1 {
                if train {
                    if let Some(x) = bufs.saved[i].as_mut() {
                        k.copy(&bufs.cur, x, act)?;
                    }
                }
                if let Some(ti) = l.tap_of(i) {
                    let (_, a, b) = l.taps[ti];
                    let t = &mut bufs.t[ti];
                    k.linear(
                        &bufs.cur,
                        &self.params[a].value,
                        None,
                        rows,
                        d,
                        l.rank,
                        t,
                        false,
                    )?;
                    k.linear(
                        t,
                        &self.params[b].value,
                        None,
                        rows,
                        l.rank,
                        d,
                        &mut bufs.z,
                        true,
                    )?;
                }
                let drop = if train && drops.get(i).copied().unwrap_or(false) {
                    Some(&bufs.drops[i])
                } else {
                    None
                };
                let keep = &mut bufs.internals[i];
                if train && !keep.is_empty() {
                    bb.block_forward_saving(
                        k,
                        &mut bufs.ws,
                        i,
                        &bufs.cur,
                        n,
                        drop,
                        &mut bufs.next,
                        keep,
                    )?;
                } else {
                    bb.block_forward(k, &mut bufs.ws, i, &bufs.cur, n, drop, &mut bufs.next)?;
                }
                std::mem::swap(&mut bufs.cur, &mut bufs.next);
                if l.injects.contains(&i) {
                    // In training, g(z) is taken from the copy the backward pass reads (at the
                    // activations' precision), so that both passes see the same z.
                    let kept = match bufs.zk[i].as_mut() {
                        Some(zk) if train => {
                            k.copy(&bufs.z, zk, act)?;
                            &*zk
                        }
                        _ => &bufs.z,
                    };
                    self.side_out(kept, &mut bufs.s, &mut bufs.inj, n, si)?;
                    k.add(&mut bufs.cur, &bufs.inj, act)?;
                }
            }
        }
        let (tokens, d) = (s.tokens(), s.width);
        let (from, to) = self.pool_range();
        if self.norm_first() {
            bb.norm_forward(k, &bufs.cur, n * tokens, &mut bufs.normed)?;
            k.mean_tokens(&bufs.normed, n, tokens, d, from, to, &mut bufs.feats)?;
        } else {
            k.mean_tokens(&bufs.cur, n, tokens, d, from, to, &mut bufs.pooled)?;
            bb.norm_forward(k, &bufs.pooled, n, &mut bufs.feats)?;
        }
        let (w, b) = (&self.params[l.head_w].value, &self.params[l.head_b].value);
        k.linear(
            &bufs.feats,
            w,
            Some(b),
            n,
            d,
            self.classes,
            &mut bufs.logits,
            false,
        )
    }

    /// `inj = g(z)` in stage `stage` (`s`: the swish output before the conv of DTL+).
    fn side_out(
        &self,
        z: &K::Buf,
        s: &mut K::Buf,
        inj: &mut K::Buf,
        n: usize,
        stage: usize,
    ) -> Result<()> {
        let k = &self.k;
        let l = &self.layout;
        let (tokens, d) = self.stage_dims(stage);
        let act = n * tokens * d;
        match &l.conv {
            None => k.swish(z, act, l.beta, inj),
            Some((w, kernel)) => {
                k.swish(z, act, l.beta, s)?;
                k.depthwise_conv(
                    s,
                    &self.params[w[stage]].value,
                    self.conv_shape(n, *kernel, stage),
                    inj,
                )
            }
        }
    }

    /// Gradients of tap `ti`'s maps from `bufs.gz`; with `dx`, adds its path to `bufs.gx`.
    fn tap_backward(
        &mut self,
        bufs: &mut Buffers<K, B>,
        n: usize,
        ti: usize,
        dx: bool,
    ) -> Result<()> {
        let k = &self.k;
        let l = &self.layout;
        let (block, a, b) = l.taps[ti];
        let st = self.spec.stage(block);
        let (rows, d, r) = (n * st.tokens(), st.width, l.rank);
        let x = bufs.saved[block]
            .as_ref()
            .ok_or_else(|| DtlError::not_kept(&format!("input of tapped block {block}")))?;
        k.linear_wgrad(
            &bufs.gz,
            &bufs.t[ti],
            rows,
            r,
            d,
            &mut self.params[b].grad,
            false,
        )?;
        k.linear_vjp(
            &bufs.gz,
            &self.params[b].value,
            rows,
            r,
            d,
            &mut bufs.dt,
            false,
        )?;
        k.linear_wgrad(&bufs.dt, x, rows, d, r, &mut self.params[a].grad, false)?;
        if dx {
            k.linear_vjp(
                &bufs.dt,
                &self.params[a].value,
                rows,
                d,
                r,
                &mut bufs.gx,
                true,
            )?;
        }
        Ok(())
    }

    /// The backward pass after [`Self::forward`] and the loss: every parameter's gradient.
    fn backward(&mut self, bufs: &mut Buffers<K, B>, n: usize, drops: &[bool]) -> Result<()> {
        let k = self.k.clone();
        let k = &k;
        let (tokens, d, c) = (self.spec.tokens(), self.spec.width, self.classes);
        let (head_w, head_b) = (self.layout.head_w, self.layout.head_b);
        for p in self.params.iter_mut() {
            let len = p.numel();
            k.fill(&mut p.grad, len, 0.0)?;
        }
        k.linear_wgrad(
            &bufs.dlogits,
            &bufs.feats,
            n,
            d,
            c,
            &mut self.params[head_w].grad,
            false,
        )?;
        k.sum_rows(&bufs.dlogits, n, c, &mut self.params[head_b].grad, false)?;
        let Some(first) = self.layout.first_inject() else {
            return Ok(());
        };
        k.linear_vjp(
            &bufs.dlogits,
            &self.params[head_w].value,
            n,
            d,
            c,
            &mut bufs.dfeats,
            false,
        )?;
        let (from, to) = self.pool_range();
        if self.norm_first() {
            k.mean_tokens_vjp(&bufs.dfeats, n, tokens, d, from, to, &mut bufs.gx2)?;
            self.backbone
                .norm_vjp(k, &bufs.cur, &bufs.gx2, n * tokens, &mut bufs.gx)?;
        } else {
            self.backbone
                .norm_vjp(k, &bufs.pooled, &bufs.dfeats, n, &mut bufs.dpooled)?;
            k.mean_tokens_vjp(&bufs.dpooled, n, tokens, d, from, to, &mut bufs.gx)?;
        }
        k.fill(&mut bufs.gz, n * tokens * d, 0.0)?;
        let beta = self.layout.beta;
        for i in (first..self.spec.depth).rev() {
            let si = self.spec.stage_of(i);
            let (st_tokens, st_d) = self.stage_dims(si);
            let act = n * st_tokens * st_d;
            if self.layout.injects.contains(&i) {
                let z = bufs.zk[i]
                    .as_ref()
                    .ok_or_else(|| DtlError::not_kept(&format!("side state at inject {i}")))?;
                match &self.layout.conv {
                    None => k.swish_vjp(z, &bufs.gx, act, beta, &mut bufs.gz, true)?,
                    Some((w, kernel)) => {
                        k.swish(z, act, beta, &mut bufs.s)?;
                        let shape = self.conv_shape(n, *kernel, si);
                        let (wv, wg) = split_value_grad(&mut self.params[w[si]]);
                        k.depthwise_conv_vjp(&bufs.s, wv, &bufs.gx, shape, &mut bufs.ds, wg, true)?;
                        k.swish_vjp(z, &bufs.ds, act, beta, &mut bufs.gz, true)?;
                    }
                }
            }
            if i > first {
                let x = bufs.saved[i]
                    .as_ref()
                    .ok_or_else(|| DtlError::not_kept(&format!("input of block {i}")))?;
                let drop = if drops.get(i).copied().unwrap_or(false) {
                    Some(&bufs.drops[i])
                } else {
                    None
                };
                let kept = &bufs.internals[i];
                if kept.is_empty() {
                    self.backbone.block_vjp(
                        k,
                        &mut bufs.ws,
                        i,
                        x,
                        &bufs.gx,
                        n,
                        drop,
                        &mut bufs.gx2,
                    )?;
                } else {
                    self.backbone.block_vjp_saved(
                        k,
                        &mut bufs.ws,
                        i,
                        x,
                        &bufs.gx,
                        n,
                        drop,
                        kept,
                        &mut bufs.gx2,
                    )?;
                }
                std::mem::swap(&mut bufs.gx, &mut bufs.gx2);
            }
            if let Some(ti) = self.layout.tap_of(i) {
                if !self.layout.unused[self.layout.taps[ti].1] {
                    self.tap_backward(bufs, n, ti, i > first)?;
                }
            }
            let start = self.spec.stages[si].blocks.0;
            if i == start && i > first {
                // Down through the transition into this stage; the side state of the stage
                // before started from zero, and so does its gradient.
                let x = bufs.trans[si].as_ref().ok_or_else(|| {
                    DtlError::not_kept(&format!("input of the transition into stage {si}"))
                })?;
                self.backbone
                    .stage_vjp(k, &mut bufs.ws, si, x, &bufs.gx, n, &mut bufs.gx2)?;
                std::mem::swap(&mut bufs.gx, &mut bufs.gx2);
                let (pt, pd) = self.stage_dims(si - 1);
                k.fill(&mut bufs.gz, n * pt * pd, 0.0)?;
            }
        }
        for ti in (0..self.layout.taps.len()).rev() {
            let (block, a, _) = self.layout.taps[ti];
            if block < first && !self.layout.unused[a] {
                self.tap_backward(bufs, n, ti, false)?;
            }
        }
        Ok(())
    }

    /// Uploads a batch, its targets and its drop-path masks into the plan (planning a larger
    /// one when needed); returns which blocks drop.
    fn upload_batch(
        &mut self,
        images: &[f32],
        n: usize,
        targets: Option<&[f32]>,
        drops: &[Option<Arc<DropPath>>],
    ) -> Result<Vec<bool>> {
        self.check_batch(images.len(), n)?;
        if let Some(t) = targets {
            if t.len() != n * self.classes {
                return Err(DtlError::shape(format!(
                    "targets hold {} values, expected {n} images x {} classes",
                    t.len(),
                    self.classes
                )));
            }
        }
        self.plan(n)?;
        let k = &self.k;
        let bufs = self.bufs.as_mut().expect("planned above");
        k.upload(images, &mut bufs.images)?;
        if let Some(t) = targets {
            k.upload(t, &mut bufs.targets)?;
        }
        let mut on = vec![false; self.spec.depth];
        for (i, d) in drops.iter().enumerate().take(self.spec.depth) {
            if let Some(d) = d {
                if d.attn.len() != n || d.mlp.len() != n {
                    return Err(DtlError::shape(format!(
                        "drop path scales for {} / {} samples given to a batch of {n}",
                        d.attn.len(),
                        d.mlp.len()
                    )));
                }
                bufs.drops[i].set(k, d)?;
                on[i] = true;
            }
        }
        Ok(on)
    }

    /// Forward pass, loss and every gradient for one batch, without an update. `targets` is
    /// `(n, classes)` (soft or smoothed); `drops[i]` holds block `i`'s drop-path masks.
    pub fn forward_backward(
        &mut self,
        images: &[f32],
        n: usize,
        targets: &[f32],
        drops: &[Option<Arc<DropPath>>],
    ) -> Result<()> {
        self.step(images, n, targets, drops, None)
    }

    /// Uploads the batch and runs the step on it (see [`Self::step_graphed`]); with
    /// `update = Some((lr, clip))` the update follows the backward pass.
    fn step(
        &mut self,
        images: &[f32],
        n: usize,
        targets: &[f32],
        drops: &[Option<Arc<DropPath>>],
        update: Option<(f64, Option<f64>)>,
    ) -> Result<()> {
        let on = self.upload_batch(images, n, Some(targets), drops)?;
        let kind = StepKind {
            batch: n,
            drops: on,
            update: update.map(|(_, clip)| clip.map(|c| c as f32)),
        };
        let mut bufs = self.bufs.take().expect("planned by upload_batch");
        let r = self.step_graphed(&mut bufs, &kind, update.map(|(lr, _)| lr));
        self.bufs = Some(bufs);
        r
    }

    /// Releases a recorded graph (its buffers are about to go); the next steps of the full
    /// batch record again.
    fn forget_graph(&mut self) {
        if let Some(g) = self.graph.take() {
            self.k.release(g.id);
        }
        self.warm = None;
        if self.graph_status == GraphStatus::Captured {
            self.graph_status = GraphStatus::Pending;
        }
    }

    /// The step of `kind` on the uploaded batch, with the update at learning rate `lr` when
    /// the kind has one: replayed when the recorded graph is of this kind, recorded on the
    /// second step of the full batch of one kind, plain operations otherwise (another batch
    /// size, graphs off or refused by the device). A recorded or replayed update reads its
    /// scalars from `bufs.scalars`, uploaded here first; a plain one passes them to the launch.
    fn step_graphed(
        &mut self,
        bufs: &mut Buffers<K, B>,
        kind: &StepKind,
        lr: Option<f64>,
    ) -> Result<()> {
        let replay = self.graph.as_ref().is_some_and(|g| &g.kind == kind);
        let record = !replay
            && kind.batch == bufs.cap
            && self.graph.is_none()
            && self.graph_status == GraphStatus::Pending
            && self.warm.as_ref() == Some(kind);
        if !replay && !record {
            if kind.batch == bufs.cap
                && self.graph.is_none()
                && self.graph_status == GraphStatus::Pending
            {
                self.warm = Some(kind.clone());
            }
            self.forward_backward_planned(bufs, kind.batch, &kind.drops)?;
            return match lr {
                Some(lr) => self.update_planned(bufs, lr, kind.update.flatten()),
                None => Ok(()),
            };
        }
        if let Some(lr) = lr {
            self.steps += 1;
            let scalars: Vec<f32> = self
                .adamw_steps(lr)
                .iter()
                .flat_map(|s| s.scalars())
                .collect();
            self.k.upload(&scalars, &mut bufs.scalars)?;
        }
        if replay {
            let g = self.graph.as_ref().expect("checked above");
            return self.k.replay(&g.id);
        }
        let k = self.k.clone();
        let rec = k.capture(&mut || {
            self.forward_backward_planned(bufs, kind.batch, &kind.drops)?;
            match kind.update {
                Some(clip) => self.clip_and_adamw(bufs, clip, None),
                None => Ok(()),
            }
        })?;
        match rec {
            Capture::Graph(id) => {
                self.graph = Some(StepGraph {
                    kind: kind.clone(),
                    id,
                });
                self.graph_status = GraphStatus::Captured;
            }
            Capture::Plain(why) => self.graph_status = GraphStatus::Plain(why),
        }
        Ok(())
    }

    fn forward_backward_planned(
        &mut self,
        bufs: &mut Buffers<K, B>,
        n: usize,
        on: &[bool],
    ) -> Result<()> {
        self.forward(bufs, n, true, on)?;
        let (b, c) = (n, self.classes);
        self.k.soft_cross_entropy(
            &bufs.logits,
            &bufs.targets,
            b,
            c,
            &mut bufs.loss,
            &mut bufs.dlogits,
        )?;
        self.backward(bufs, n, on)
    }

    /// One optimisation step: forward, backward, optional gradient clipping to `clip` (total
    /// L2 norm, PyTorch's `clip_grad_norm_`) and AdamW at learning rate `lr`, recorded and
    /// replayed as one graph where the device can (see the module doc). Nothing is read back;
    /// [`Self::read_loss`] gives the loss of this step.
    pub fn train_step(
        &mut self,
        images: &[f32],
        n: usize,
        targets: &[f32],
        drops: &[Option<Arc<DropPath>>],
        lr: f64,
        clip: Option<f64>,
    ) -> Result<()> {
        self.step(images, n, targets, drops, Some((lr, clip)))
    }

    /// AdamW on the gradients of the last [`Self::forward_backward`], as plain operations.
    pub fn update(&mut self, lr: f64, clip: Option<f64>) -> Result<()> {
        let mut bufs = self
            .bufs
            .take()
            .ok_or_else(|| DtlError::state("update before any forward and backward pass"))?;
        let r = self.update_planned(&mut bufs, lr, clip.map(|c| c as f32));
        self.bufs = Some(bufs);
        r
    }

    /// The update of the next step at learning rate `lr` for each parameter, in
    /// [`Self::params`] order (call after counting the step in `self.steps`).
    fn adamw_steps(&self, lr: f64) -> Vec<AdamwStep> {
        let a = self.adam;
        self.params
            .iter()
            .map(|p| {
                let wd = if p.decays { a.weight_decay } else { 0.0 };
                AdamwStep::new(lr, a.beta1, a.beta2, a.eps, wd, self.steps)
            })
            .collect()
    }

    /// Counts the step and updates with its scalars as launch arguments.
    fn update_planned(
        &mut self,
        bufs: &mut Buffers<K, B>,
        lr: f64,
        clip: Option<f32>,
    ) -> Result<()> {
        self.steps += 1;
        let steps = self.adamw_steps(lr);
        self.clip_and_adamw(bufs, clip, Some(&steps))
    }

    /// Optional gradient clipping to `clip` (the squared norm of every gradient into
    /// `bufs.sq`) and AdamW on every parameter a gradient reaches, with the scalars of
    /// `steps` (per parameter) as launch arguments, or, with `None`, read by the kernels from
    /// `bufs.scalars` ([`Kernels::adamw_from`]; what a recorded step does). Both give the
    /// same values bit for bit.
    fn clip_and_adamw(
        &mut self,
        bufs: &mut Buffers<K, B>,
        clip: Option<f32>,
        steps: Option<&[AdamwStep]>,
    ) -> Result<()> {
        let k = &self.k;
        let unused = &self.layout.unused;
        if clip.is_some() {
            k.fill(&mut bufs.sq, 1, 0.0)?;
            for (p, _) in self.params.iter().zip(unused).filter(|(_, &u)| !u) {
                k.sum_squares(&p.grad, p.numel(), &mut bufs.sq)?;
            }
        }
        // A parameter no gradient reaches is left as it is (no moment, no weight decay).
        for (i, (p, _)) in self
            .params
            .iter_mut()
            .zip(unused)
            .enumerate()
            .filter(|(_, (_, &u))| !u)
        {
            let len = p.numel();
            let clip = clip.map(|c| (&bufs.sq, c));
            match steps {
                Some(steps) => k.adamw(
                    &mut p.value,
                    &p.grad,
                    &mut p.m,
                    &mut p.v,
                    len,
                    &steps[i],
                    clip,
                )?,
                None => k.adamw_from(
                    &mut p.value,
                    &p.grad,
                    &mut p.m,
                    &mut p.v,
                    len,
                    &bufs.scalars,
                    i,
                    clip,
                )?,
            }
        }
        Ok(())
    }

    /// The loss of the last forward pass (reads one value from the device).
    pub fn read_loss(&self) -> Result<f32> {
        let bufs = self
            .bufs
            .as_ref()
            .ok_or_else(|| DtlError::state("no step has run yet"))?;
        Ok(self.k.download(&bufs.loss, 1)?[0])
    }

    /// The logits of the last forward pass, `(n, classes)` row-major.
    pub fn read_logits(&self, n: usize) -> Result<Vec<f32>> {
        let bufs = self
            .bufs
            .as_ref()
            .ok_or_else(|| DtlError::state("no step has run yet"))?;
        self.k.download(&bufs.logits, n * self.classes)
    }

    /// Every gradient of the last step on the host, in [`Self::params`] order.
    pub fn read_grads(&self) -> Result<Vec<Vec<f32>>> {
        self.params
            .iter()
            .map(|p| self.k.download(&p.grad, p.numel()))
            .collect()
    }

    /// Logits of `n` images without keeping anything for a backward pass (evaluation).
    pub fn forward_eval(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        self.upload_batch(images, n, None, &[])?;
        let mut bufs = self.bufs.take().expect("planned by upload_batch");
        let r = self.forward(&mut bufs, n, false, &[]);
        self.bufs = Some(bufs);
        r?;
        self.read_logits(n)
    }

    /// Starts an evaluation pass: zeroes the counts on the device.
    pub fn eval_begin(&mut self, batch: usize) -> Result<()> {
        self.plan(batch)?;
        let bufs = self.bufs.as_mut().expect("planned above");
        self.k.fill(&mut bufs.stats, 4, 0.0)
    }

    /// Adds one batch's counts on the device; `labels` must lie in `0..classes`.
    pub fn eval_batch(&mut self, images: &[f32], n: usize, labels: &[usize]) -> Result<()> {
        self.eval_batch_masked(images, n, labels, None)
    }

    /// [`Self::eval_batch`] with a class mask: `mask` holds at least `n x classes` values on
    /// the device (one row of 0 / [`crate::job::MASKED_LOGIT`] per image, see
    /// [`crate::job::subset_mask`]) and is added to the logits before the counts, so that only
    /// the kept classes compete for top-1 and top-5 and make up the loss.
    pub fn eval_batch_masked(
        &mut self,
        images: &[f32],
        n: usize,
        labels: &[usize],
        mask: Option<&K::Buf>,
    ) -> Result<()> {
        if labels.len() != n {
            return Err(DtlError::shape(format!(
                "a batch of {n} images came with {} labels",
                labels.len()
            )));
        }
        if let Some(&l) = labels.iter().find(|&&l| l >= self.classes) {
            return Err(DtlError::label_range(l, self.classes));
        }
        self.upload_batch(images, n, None, &[])?;
        let mut bufs = self.bufs.take().expect("planned by upload_batch");
        let lab: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
        let r = (|| {
            self.k.upload(&lab, &mut bufs.labels)?;
            self.forward(&mut bufs, n, false, &[])?;
            if let Some(m) = mask {
                self.k.add(&mut bufs.logits, m, n * self.classes)?;
            }
            self.k
                .eval_stats(&bufs.logits, &bufs.labels, n, self.classes, &mut bufs.stats)
        })();
        self.bufs = Some(bufs);
        r
    }

    /// Reads the counts of the evaluation pass (`images` is the caller's count).
    pub fn eval_end(&self, images: usize) -> Result<EvalCounts> {
        let bufs = self
            .bufs
            .as_ref()
            .ok_or_else(|| DtlError::state("no evaluation has started"))?;
        let s = self.k.download(&bufs.stats, 4)?;
        Ok(EvalCounts {
            top1: s[0] as f64,
            top5: s[1] as f64,
            loss_sum: s[2] as f64,
            non_finite: s[3] as f64,
            images,
        })
    }

    /// The parameters on the host as CPU parameters (for checkpoints and the CPU model).
    pub fn host_params(&self) -> Result<Vec<Param<Cpu>>> {
        let dev = Cpu::default();
        self.params
            .iter()
            .map(|p| {
                Param::from_vec(
                    &dev,
                    &p.name,
                    &p.shape,
                    self.k.download(&p.value, p.numel())?,
                )
            })
            .collect()
    }

    /// The optimizer state on the host, as the CPU optimizer holds it (for checkpoints).
    pub fn host_optim(&self) -> Result<AdamW<Cpu>> {
        let dev = Cpu::default();
        let mut opt = self.host_optim_zeroed();
        for (i, p) in self.params.iter().enumerate() {
            let n = p.numel();
            opt.exp_avg[i] = dev.tensor_from_vec(self.k.download(&p.m, n)?, (n,));
            opt.exp_avg_sq[i] = dev.tensor_from_vec(self.k.download(&p.v, n)?, (n,));
        }
        opt.steps = self.steps;
        Ok(opt)
    }

    /// A CPU optimizer with this model's hyper-parameters and decay groups, its moments zero;
    /// built from the parameters' sizes, so no value is read from the device.
    fn host_optim_zeroed(&self) -> AdamW<Cpu> {
        let a = self.adam;
        let layout = self.params.iter().map(|p| (p.numel(), p.decays)).collect();
        AdamW::new(
            a.beta1,
            a.beta2,
            a.eps,
            a.weight_decay,
            layout,
            &Cpu::default(),
        )
    }

    /// Loads a checkpoint's parameters and, with `optim`, its optimizer state.
    pub fn load_checkpoint(&mut self, ck: &Checkpoint, optim: bool) -> Result<()> {
        let mut host = self.host_params()?;
        ck.apply(host.iter_mut().collect())?;
        for (p, h) in self.params.iter_mut().zip(&host) {
            self.k.upload(&h.value.as_vec(), &mut p.value)?;
        }
        if optim {
            let names: Vec<String> = host.iter().map(|p| p.name.clone()).collect();
            let mut opt = self.host_optim_zeroed();
            ck.apply_optim(&mut opt, &names)?;
            for (i, p) in self.params.iter_mut().enumerate() {
                self.k.upload(&opt.exp_avg[i].as_vec(), &mut p.m)?;
                self.k.upload(&opt.exp_avg_sq[i].as_vec(), &mut p.v)?;
            }
            self.steps = opt.steps;
        }
        Ok(())
    }

    /// Replaces the parameters' values (in [`Self::params`] order), e.g. with a reference's.
    pub fn set_params(&mut self, values: &[Vec<f32>]) -> Result<()> {
        if values.len() != self.params.len() {
            return Err(DtlError::shape(format!(
                "{} tensors given for {} parameters",
                values.len(),
                self.params.len()
            )));
        }
        for (p, v) in self.params.iter_mut().zip(values) {
            if v.len() != p.numel() {
                return Err(DtlError::shape(format!(
                    "`{}` holds {} values, {} given",
                    p.name,
                    p.numel(),
                    v.len()
                )));
            }
            self.k.upload(v, &mut p.value)?;
        }
        Ok(())
    }
}

/// Checks that the stages of `spec` cover its blocks in order and end at its top-level width,
/// grid and prefix (what the norm and the head see).
fn check_stages(spec: &BackboneSpec) -> Result<()> {
    let bad = |why: String| {
        Err(DtlError::argument(format!(
            "backbone `{}`: its stages {:?} {why}",
            spec.name,
            spec.stages
                .iter()
                .map(|s| (s.blocks.0, s.blocks.1))
                .collect::<Vec<_>>()
        )))
    };
    let Some(last) = spec.stages.last() else {
        return bad("are empty: a backbone has at least one stage".into());
    };
    let mut next = 0;
    for st in &spec.stages {
        if st.blocks.0 != next || st.blocks.1 <= st.blocks.0 {
            return bad(format!(
                "do not cover blocks 0-{} in order, each stage holding at least one block",
                spec.depth.saturating_sub(1)
            ));
        }
        next = st.blocks.1;
    }
    if next != spec.depth {
        return bad(format!("end at block {next}, the depth is {}", spec.depth));
    }
    if (last.width, last.grid, last.prefix_tokens) != (spec.width, spec.grid, spec.prefix_tokens) {
        return bad(format!(
            "end at width {}, grid {:?}, {} prefix tokens, but the backbone's are {}, {:?}, {}",
            last.width, last.grid, last.prefix_tokens, spec.width, spec.grid, spec.prefix_tokens
        ));
    }
    Ok(())
}

/// The value and the gradient of one parameter, borrowed together.
fn split_value_grad<K: Kernels>(p: &mut DeviceParam<K>) -> (&K::Buf, &mut K::Buf) {
    (&p.value, &mut p.grad)
}

/// The frozen backbone of a device job and the device it trains on.
///
/// ```
/// fn source<K: dtl_kernels::Kernels + Clone, B: dtl_kernels::KernelBackbone<K>>(k: K, backbone: B)
///     -> dtl_runner::resident::ResidentSource<K, B> {
///     // every step as plain operations, whatever `DTL_GRAPHS` says
///     dtl_runner::resident::ResidentSource::new(k, backbone).with_graphs(false)
/// }
/// ```
pub struct ResidentSource<K: Kernels + Clone, B: KernelBackbone<K>> {
    k: K,
    backbone: Arc<B>,
    graphs: bool,
}

impl<K: Kernels + Clone, B: KernelBackbone<K>> ResidentSource<K, B> {
    /// `backbone` on device `k`.
    pub fn new(k: K, backbone: B) -> Self {
        ResidentSource {
            k,
            backbone: Arc::new(backbone),
            graphs: true,
        }
    }

    /// With `false`, the engines it makes never record the training step as a graph (see
    /// [`ResidentModel::set_graphs`]); with `true` (the default) they do where the device can,
    /// unless `DTL_GRAPHS=0`.
    pub fn with_graphs(mut self, on: bool) -> Self {
        self.graphs = on;
        self
    }
}

/// [`ResidentModel`] as the training loop drives it.
pub struct ResidentEngine<K: Kernels + Clone, B: KernelBackbone<K>> {
    model: ResidentModel<K, B>,
    loss_acc: K::Buf,
}

impl<K: Kernels + Clone, B: KernelBackbone<K>> ResidentEngine<K, B> {
    /// The model.
    pub fn model(&self) -> &ResidentModel<K, B> {
        &self.model
    }
}

impl<K: Kernels + Clone, B: KernelBackbone<K>> EngineSource for ResidentSource<K, B> {
    type Engine = ResidentEngine<K, B>;
    fn spec(&self) -> &BackboneSpec {
        self.backbone.spec()
    }
    fn engine(&self, cfg: &PipelineConfig, classes: usize) -> Result<ResidentEngine<K, B>> {
        let mut model =
            ResidentModel::from_config(cfg, self.k.clone(), Arc::clone(&self.backbone), classes)?;
        if !self.graphs {
            model.set_graphs(false);
        }
        model.plan(cfg.data.batch_size.max(1))?;
        let loss_acc = self.k.alloc(1)?;
        Ok(ResidentEngine { model, loss_acc })
    }
    fn bench(&self, cfg: &PipelineConfig, opts: &BenchOptions) -> Result<Value> {
        bench(cfg, &self.k, &self.backbone, opts)
    }
}

impl<K: Kernels + Clone, B: KernelBackbone<K>> Engine for ResidentEngine<K, B> {
    fn trainable_params(&self) -> usize {
        self.model.trainable_params()
    }
    fn optim_steps(&self) -> u64 {
        self.model.optim_steps()
    }
    fn host_params(&self) -> Result<Vec<Param<Cpu>>> {
        self.model.host_params()
    }
    fn host_optim(&self) -> Result<AdamW<Cpu>> {
        self.model.host_optim()
    }
    fn load(&mut self, ck: &Checkpoint, optim: bool) -> Result<()> {
        self.model.load_checkpoint(ck, optim)
    }
    fn train_step(
        &mut self,
        batch: &Batch,
        targets: &[f32],
        drops: &[Option<Arc<DropPath>>],
        lr: f64,
        clip: Option<f64>,
        read_loss: bool,
    ) -> Result<Option<f32>> {
        self.model
            .train_step(&batch.images, batch.n, targets, drops, lr, clip)?;
        let bufs = self.model.bufs.as_ref().expect("a step plans its buffers");
        self.model.k.add(&mut self.loss_acc, &bufs.loss, 1)?;
        if read_loss {
            Ok(Some(self.model.read_loss()?))
        } else {
            Ok(None)
        }
    }
    fn loss_sum(&self) -> Result<f64> {
        Ok(self.model.k.download(&self.loss_acc, 1)?[0] as f64)
    }
    fn set_loss_sum(&mut self, value: f64) -> Result<()> {
        self.model.k.upload(&[value as f32], &mut self.loss_acc)
    }
    fn evaluate(&mut self, batches: Box<dyn BatchIter>) -> Result<EvalResult> {
        self.evaluate_masked(batches, None)
    }
    fn evaluate_masked(
        &mut self,
        batches: Box<dyn BatchIter>,
        mask: Option<&[f32]>,
    ) -> Result<EvalResult> {
        let mut started = false;
        let mut images = 0usize;
        let mut non_finite = 0.0;
        // The mask, one row per image of the first (largest) batch, stays on the device.
        let mut rows: Option<(K::Buf, usize)> = None;
        for (step, batch) in batches.enumerate() {
            let batch = batch?;
            if !started {
                self.model.eval_begin(batch.n)?;
                started = true;
            }
            if let Some(m) = mask {
                if rows.as_ref().map_or(true, |r| r.1 < batch.n) {
                    crate::job::check_mask(m, self.model.classes)?;
                    let tiled: Vec<f32> = (0..batch.n).flat_map(|_| m.iter().copied()).collect();
                    rows = Some((self.model.k.upload_new(&tiled)?, batch.n));
                }
            }
            self.model.eval_batch_masked(
                &batch.images,
                batch.n,
                &batch.labels,
                rows.as_ref().map(|r| &r.0),
            )?;
            images += batch.n;
            // Four numbers per step, so that a NaN or an Inf is reported with its step.
            let bad = self.model.eval_end(images)?.non_finite;
            if bad > non_finite {
                return Err(crate::sanity::non_finite_logits(
                    step,
                    (bad - non_finite) as usize,
                    batch.n,
                    &batch.images,
                ));
            }
            non_finite = bad;
        }
        if !started {
            return Ok(EvalResult {
                top1: 0.0,
                top5: 0.0,
                loss: 0.0,
                images: 0,
            });
        }
        let c = self.model.eval_end(images)?;
        if c.non_finite > 0.0 {
            return Err(DtlError::diverged(
                c.non_finite as usize,
                images,
                format!(
                    "the logits of {} of {images} test images are not finite (NaN or Inf): the side network or head has diverged; lower optim.lr or set optim.clip_grad",
                    c.non_finite
                ),
            ));
        }
        let n = images.max(1) as f64;
        Ok(EvalResult {
            top1: c.top1 / n,
            top5: c.top5 / n,
            loss: c.loss_sum / n,
            images,
        })
    }
    fn memory_mib(&self) -> Option<f64> {
        self.model.memory().map(|m| m.peak_mib())
    }
    fn device(&self) -> String {
        format!("{}, {}", self.model.k.describe(), self.model.precision())
    }
    fn precision(&self) -> String {
        self.model.precision().to_string()
    }
    fn graph(&self) -> Option<String> {
        Some(self.model.graph_status().describe())
    }
}

/// `dtl bench` on a device: throughput and peak device memory of full training steps of
/// `dtl`, `dtl+` and `linear` (the pipeline's side settings), of the frozen forward and of
/// the forward plus every block's VJP, for each batch size of `opts`.
///
/// `train` measures `dtl` and `dtl+` with each `run.activations` policy (the row's
/// `activations`: `recompute` or `store`) and the linear probe once; `idle_rss_mib` is the
/// process's resident memory just before the row's model is built (the frozen weights loaded,
/// nothing planned), so `peak_rss_mib - idle_rss_mib` is what the step adds (exact for the
/// first row; later rows reuse memory the allocator kept from earlier ones).
/// Each row holds `what`, `side`, `batch`, `img_per_s`, `peak_gpu_mib` (the most the device's
/// live buffers held during the timed steps, workspaces included), `gpu_driver_mib` (the
/// driver's used-memory growth since the device was opened), `peak_rss_mib` and `precision`
/// (the device's); training rows also `graph` (`captured` when the timed steps replayed the
/// recorded step, else why not: the step is recorded on its second run, before the timing).
/// The device is synchronised before each timing starts and ends.
pub fn bench<K: Kernels + Clone, B: KernelBackbone<K>>(
    cfg: &PipelineConfig,
    k: &K,
    backbone: &Arc<B>,
    opts: &BenchOptions,
) -> Result<Value> {
    let spec = backbone.spec().clone();
    let s = spec.image_size;
    let classes = cfg.head.classes.unwrap_or(10);
    let what = crate::bench::check_what(&opts.what)?;
    let mut rows = Vec::new();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.run.seed);
    for &batch in &opts.batches {
        if batch == 0 {
            return Err(DtlError::argument("bench: batch sizes must be at least 1"));
        }
        let images: Vec<f32> = {
            use rand::Rng;
            (0..batch * spec.in_chans * s * s)
                .map(|_| rng.gen_range(-1.0f32..1.0))
                .collect()
        };
        let labels: Vec<usize> = (0..batch).map(|i| i % classes).collect();
        let targets = crate::model::smoothed_targets(&labels, classes, 0.0);
        for w in &what {
            match w.as_str() {
                "train" => {
                    let runs = crate::bench::KINDS.iter().flat_map(|&kind| {
                        // the linear probe has no block VJP: one policy is all it has
                        let modes: &[&str] = if kind == "linear" {
                            &["recompute"]
                        } else {
                            &["recompute", "store"]
                        };
                        modes.iter().map(move |&mode| (kind, mode))
                    });
                    let runs =
                        runs.filter(|&(kind, mode)| crate::bench::measured(cfg, opts, kind, mode));
                    for (kind, mode) in runs {
                        let mut c = crate::bench::with_side(cfg, kind);
                        c.run.activations = mode.to_string();
                        k.synchronize()?;
                        let idle = crate::report::rss_mib();
                        let mut model = ResidentModel::from_config(
                            &c,
                            k.clone(),
                            Arc::clone(backbone),
                            classes,
                        )?;
                        model.plan(batch)?;
                        if opts.profile {
                            model.set_graphs(false);
                        }
                        let mut step = 0u64;
                        let mut run = || {
                            let drops = crate::step::drop_masks(
                                c.backbone.drop_path,
                                spec.depth,
                                batch,
                                c.run.seed,
                                step,
                            );
                            step += 1;
                            model.train_step(&images, batch, &targets, &drops, c.optim.lr, None)
                        };
                        // The step is recorded on its second run: let that happen before the
                        // timing, whatever the warm-up.
                        for _ in opts.warmup..2 {
                            run()?;
                        }
                        let m = measure_device(k, opts, batch, &mut run)?;
                        let mut r =
                            device_row("train", kind, batch, &m, Some(model.trainable_params()));
                        r["activations"] = serde_json::json!(mode);
                        r["idle_rss_mib"] = serde_json::json!(idle);
                        r["graph"] = serde_json::json!(model.graph_status().describe());
                        crate::bench::note_profiled_graph(&mut r);
                        rows.push(r);
                        drop(model);
                    }
                }
                "forward" | "vjp" => {
                    let mut ws = backbone.workspace(k, batch)?;
                    let acts: Vec<usize> = spec
                        .stages
                        .iter()
                        .map(|st| batch * st.tokens() * st.width)
                        .collect();
                    let act = acts.iter().copied().max().unwrap_or(0);
                    let img = k.upload_new(&images)?;
                    let mut x = k.alloc(act)?;
                    let mut y = k.alloc(act)?;
                    let vjp = w == "vjp";
                    // With `vjp`: every block's input and every transition's input.
                    let mut inputs = Vec::new();
                    let mut trans = Vec::new();
                    if vjp {
                        for i in 0..spec.depth {
                            inputs.push(k.alloc(acts[spec.stage_of(i)])?);
                        }
                        for si in 1..spec.stages.len() {
                            trans.push(k.alloc(acts[si - 1])?);
                        }
                    }
                    let m = measure_device(k, opts, batch, || {
                        backbone.embed(k, &mut ws, &img, batch, &mut x)?;
                        for (si, st) in spec.stages.iter().enumerate() {
                            if si > 0 {
                                if let Some(kept) = trans.get_mut(si - 1) {
                                    k.copy(&x, kept, acts[si - 1])?;
                                }
                                backbone.stage_forward(k, &mut ws, si, &x, batch, &mut y)?;
                                std::mem::swap(&mut x, &mut y);
                            }
                            for i in st.blocks.0..st.blocks.1 {
                                if let Some(kept) = inputs.get_mut(i) {
                                    k.copy(&x, kept, acts[si])?;
                                }
                                backbone.block_forward(k, &mut ws, i, &x, batch, None, &mut y)?;
                                std::mem::swap(&mut x, &mut y);
                            }
                        }
                        if vjp {
                            for (si, st) in spec.stages.iter().enumerate().rev() {
                                for i in (st.blocks.0..st.blocks.1).rev() {
                                    backbone.block_vjp(
                                        k, &mut ws, i, &inputs[i], &x, batch, None, &mut y,
                                    )?;
                                    std::mem::swap(&mut x, &mut y);
                                }
                                if si > 0 {
                                    backbone.stage_vjp(
                                        k,
                                        &mut ws,
                                        si,
                                        &trans[si - 1],
                                        &x,
                                        batch,
                                        &mut y,
                                    )?;
                                    std::mem::swap(&mut x, &mut y);
                                }
                            }
                        }
                        Ok(())
                    })?;
                    rows.push(device_row(w, "none", batch, &m, None));
                }
                _ => unreachable!("checked by check_what"),
            }
        }
    }
    Ok(
        serde_json::json!({"backbone": spec.name, "image_size": s, "device": k.describe(),
            "precision": k.precision().to_string(), "rows": rows}),
    )
}

/// Throughput and memory of `steps` calls of `f` on a device after `warmup` calls.
struct DeviceMeasured {
    precision: Precision,
    img_per_s: f64,
    peak_gpu_mib: Option<f64>,
    gpu_driver_mib: Option<f64>,
    peak_rss_mib: Option<f64>,
    profile: Option<crate::report::BenchProfile>,
}

fn measure_device<K: Kernels>(
    k: &K,
    opts: &BenchOptions,
    batch: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<DeviceMeasured> {
    for _ in 0..opts.warmup {
        f()?;
    }
    k.synchronize()?;
    k.reset_peak();
    crate::report::reset_peak_rss();
    let steps = opts.steps.max(1);
    crate::bench::profile_start(k, opts)?;
    let t = std::time::Instant::now();
    for _ in 0..steps {
        f()?;
    }
    k.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let profile = crate::bench::profile_take(k, steps)?;
    let mem = k.memory();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(DeviceMeasured {
        precision: k.precision(),
        img_per_s: (steps * batch) as f64 / secs.max(1e-12),
        peak_gpu_mib: mem.map(|m| mib(m.peak)),
        gpu_driver_mib: mem.and_then(|m| m.driver_used).map(mib),
        peak_rss_mib: crate::report::peak_rss_mib(),
        profile,
    })
}

fn device_row(
    what: &str,
    side: &str,
    batch: usize,
    m: &DeviceMeasured,
    params: Option<usize>,
) -> Value {
    let mut r = serde_json::json!({"what": what, "side": side, "batch": batch, "img_per_s": m.img_per_s,
        "peak_rss_mib": m.peak_rss_mib, "peak_gpu_mib": m.peak_gpu_mib, "gpu_driver_mib": m.gpu_driver_mib,
        "precision": m.precision.to_string()});
    if let Some(p) = params {
        r["trainable_params"] = serde_json::json!(p);
    }
    if let Some(p) = &m.profile {
        r["profile"] = serde_json::json!(p);
    }
    r
}
