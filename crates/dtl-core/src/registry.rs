//! The component registry: every backbone, side network, head, dataset and augmentation op
//! that dtl can name in a pipeline.
//!
//! Plugins register with `inventory::submit!`; the registry is gathered once, sorted by name,
//! and a duplicate name is an error naming both registrations. A binary must reference every
//! plugin crate it wants (`use dtl_vit as _;`) or the linker drops its registrations.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use dfdx::prelude::Cpu;

pub use crate::config::resolve_path;
use crate::config::{AugmentOp, DataConfig, HeadConfig, PipelineConfig, SideConfig};
use crate::data::{Augment, Dataset};
use crate::job::Job;
use crate::side::{Head, SideNetwork};
pub use crate::side_traits::{side_traits, SideTraits};
use crate::{BackboneSpec, DtlError, Result};

/// Which split of a dataset to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training split (`data.train`).
    Train,
    /// The evaluation split (`data.test`).
    Test,
}

/// Everything a backbone's job constructor needs besides the pipeline.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The pipeline file the configuration came from (for messages).
    pub pipeline_file: std::path::PathBuf,
}

/// A registered backbone variant.
///
/// `build` is a monomorphised constructor: it instantiates the runner for this variant's
/// compile-time dims and returns it as a type-erased [`Job`].
///
/// ```
/// use dtl_core::registry::{BackboneEntry, BuildContext};
/// use dtl_core::{BackboneSpec, PipelineConfig, Result, Job};
/// fn spec() -> BackboneSpec { BackboneSpec::vit("toy_vit", 32, 8, 48, 4, 3) }
/// fn build(_: &PipelineConfig, _: &BuildContext) -> Result<Box<dyn Job>> {
///     Err(dtl_core::DtlError::invalid("toy backbone cannot run"))
/// }
/// dtl_core::inventory::submit! {
///     BackboneEntry { name: "toy_vit", description: "a toy", spec, build, origin: module_path!() }
/// }
/// let reg = dtl_core::registry::registry().unwrap();
/// assert_eq!(reg.backbone("toy_vit").unwrap().spec().depth, 4);
/// ```
pub struct BackboneEntry {
    /// Name used in `backbone.kind`.
    pub name: &'static str,
    /// One line for `dtl list`.
    pub description: &'static str,
    /// The variant's numbers, without loading anything.
    pub spec: fn() -> BackboneSpec,
    /// Builds the runnable pipeline for this variant.
    pub build: fn(&PipelineConfig, &BuildContext) -> Result<Box<dyn Job>>,
    /// Where the registration comes from (`module_path!()`).
    pub origin: &'static str,
}

/// Builds a side network for the CPU device: `(config, backbone spec, device)`. The device
/// is seeded by `run.seed`; initial values come from its generator.
pub type SideBuilder = fn(&SideConfig, &BackboneSpec, &Cpu) -> Result<Box<dyn SideNetwork<Cpu>>>;

/// What a side network is in the terms of the kernel set, so that a device step written over
/// `dtl_kernels::Kernels` can run it without dfdx: the built-in `dtl`, `dtl+` and `linear`
/// sides describe themselves this way. A plugin side network that only exists as dfdx code on
/// the CPU has none.
///
/// ```
/// use dtl_core::registry::KernelSide;
/// let s = KernelSide::LowRank { rank: 2, beta: 100.0, taps: vec![0, 1], injects: vec![1], kernel: 3 };
/// assert!(matches!(s, KernelSide::LowRank { kernel: 3, .. }));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum KernelSide {
    /// No side network: a linear probe, only the head trains.
    None,
    /// DTL's Compact Side Network: `z += x_i A_i^T B_i^T` at each tap, `x += g(z)` after each
    /// inject, `g = swish_beta`, followed by one depthwise `kernel x kernel` conv when
    /// `kernel > 0` (DTL+). Parameters in the order `side.<i>.a`, `side.<i>.b` per tap, then
    /// `fusion.weight`.
    LowRank {
        /// Rank r of each map.
        rank: usize,
        /// beta of swish_beta.
        beta: f32,
        /// Tapped blocks, ascending.
        taps: Vec<usize>,
        /// Inject blocks, ascending.
        injects: Vec<usize>,
        /// Depthwise conv kernel side (0: none).
        kernel: usize,
    },
}

/// Describes a side network in kernel-set terms: `(config, backbone spec)`.
pub type KernelSideFn = fn(&SideConfig, &BackboneSpec) -> Result<KernelSide>;

/// What a head is in the terms of the kernel set (see [`KernelSide`]).
///
/// ```
/// assert_eq!(dtl_core::registry::KernelHead::Linear, dtl_core::registry::KernelHead::Linear);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelHead {
    /// `logits = features W^T + b`: parameters `head.weight` (classes, width), `head.bias`.
    Linear,
}

/// Describes a head in kernel-set terms: `(config, backbone spec, classes)`.
pub type KernelHeadFn = fn(&HeadConfig, &BackboneSpec, usize) -> Result<KernelHead>;

/// A registered side network.
///
/// `kernels` is `None` for a side network that exists only as dfdx code on the CPU; a
/// pipeline asking for it on a GPU then gets an error naming it.
pub struct SideEntry {
    /// Name used in `side.kind`.
    pub name: &'static str,
    /// One line for `dtl list`.
    pub description: &'static str,
    /// Constructor on the CPU.
    pub build_cpu: SideBuilder,
    /// The side network in kernel-set terms, for the device training step.
    pub kernels: Option<KernelSideFn>,
    /// Where the registration comes from.
    pub origin: &'static str,
}

/// Builds a head for the CPU device: `(config, backbone spec, classes, device)`.
pub type HeadBuilder = fn(&HeadConfig, &BackboneSpec, usize, &Cpu) -> Result<Box<dyn Head<Cpu>>>;

/// A registered head.
pub struct HeadEntry {
    /// Name used in `head.kind`.
    pub name: &'static str,
    /// One line for `dtl list`.
    pub description: &'static str,
    /// Constructor on the CPU.
    pub build_cpu: HeadBuilder,
    /// The head in kernel-set terms, for the device training step.
    pub kernels: Option<KernelHeadFn>,
    /// Where the registration comes from.
    pub origin: &'static str,
}

/// Opens a dataset split: `(data config, split)`.
pub type DatasetBuilder = fn(&DataConfig, Split) -> Result<Box<dyn Dataset>>;

/// A registered dataset layout.
pub struct DatasetEntry {
    /// Name used in `data.kind`.
    pub name: &'static str,
    /// One line for `dtl list`.
    pub description: &'static str,
    /// Opens a split.
    pub build: DatasetBuilder,
    /// Where the registration comes from.
    pub origin: &'static str,
}

/// Builds an augmentation op from its table: `(op, key path for messages)`.
pub type AugmentBuilder = fn(&AugmentOp, &str) -> Result<Box<dyn Augment>>;

/// A registered augmentation op.
pub struct AugmentEntry {
    /// Name used in `op = "..."`.
    pub name: &'static str,
    /// One line for `dtl list`.
    pub description: &'static str,
    /// Builds the op from its parameters.
    pub build: AugmentBuilder,
    /// Where the registration comes from.
    pub origin: &'static str,
}

inventory::collect!(BackboneEntry);
inventory::collect!(SideEntry);
inventory::collect!(HeadEntry);
inventory::collect!(DatasetEntry);
inventory::collect!(AugmentEntry);

/// Common view of every entry kind.
pub trait Entry: 'static {
    /// Registry kind in messages (`backbone`, `side network`, ...).
    const KIND: &'static str;
    /// Registered name.
    fn name(&self) -> &'static str;
    /// One-line description.
    fn description(&self) -> &'static str;
    /// Registration origin.
    fn origin(&self) -> &'static str;
}

macro_rules! entry {
    ($t:ty, $kind:literal) => {
        impl Entry for $t {
            const KIND: &'static str = $kind;
            fn name(&self) -> &'static str {
                self.name
            }
            fn description(&self) -> &'static str {
                self.description
            }
            fn origin(&self) -> &'static str {
                self.origin
            }
        }
    };
}
entry!(BackboneEntry, "backbone");
entry!(SideEntry, "side network");
entry!(HeadEntry, "head");
entry!(DatasetEntry, "dataset");
entry!(AugmentEntry, "augmentation op");

impl BackboneEntry {
    /// The variant's numbers.
    pub fn spec(&self) -> BackboneSpec {
        (self.spec)()
    }
}

/// One kind of component, sorted by name.
pub struct Table<E: 'static> {
    by_name: BTreeMap<&'static str, &'static E>,
}

impl<E: Entry> Table<E> {
    fn gather(items: impl Iterator<Item = &'static E>) -> Result<Self> {
        let mut by_name: BTreeMap<&'static str, &'static E> = BTreeMap::new();
        for e in items {
            if let Some(prev) = by_name.insert(e.name(), e) {
                return Err(DtlError::DuplicateComponent {
                    kind: E::KIND,
                    name: e.name().to_string(),
                    first: prev.origin().to_string(),
                    second: e.origin().to_string(),
                });
            }
        }
        Ok(Table { by_name })
    }

    /// Looks a name up; an unknown name gives the nearest registered one and the full list.
    pub fn get(&self, name: &str) -> Result<&'static E> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| self.unknown(name))
    }

    /// The error for an unknown name.
    pub fn unknown(&self, name: &str) -> DtlError {
        DtlError::UnknownComponent {
            kind: E::KIND,
            name: name.to_string(),
            suggestion: crate::error::closest(name, self.by_name.keys().copied()),
            registered: self.names().iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Sorted names.
    pub fn names(&self) -> Vec<&'static str> {
        self.by_name.keys().copied().collect()
    }

    /// Entries sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &'static E> + '_ {
        self.by_name.values().copied()
    }
}

/// Every registered component, sorted.
pub struct Registry {
    /// Backbone variants.
    pub backbones: Table<BackboneEntry>,
    /// Side networks.
    pub sides: Table<SideEntry>,
    /// Heads.
    pub heads: Table<HeadEntry>,
    /// Dataset layouts.
    pub datasets: Table<DatasetEntry>,
    /// Augmentation ops.
    pub augments: Table<AugmentEntry>,
}

impl Registry {
    /// Gathers what the linked crates registered, refusing duplicate names.
    pub fn gather() -> Result<Self> {
        Ok(Registry {
            backbones: Table::gather(inventory::iter::<BackboneEntry>.into_iter())?,
            sides: Table::gather(inventory::iter::<SideEntry>.into_iter())?,
            heads: Table::gather(inventory::iter::<HeadEntry>.into_iter())?,
            datasets: Table::gather(inventory::iter::<DatasetEntry>.into_iter())?,
            augments: Table::gather(inventory::iter::<AugmentEntry>.into_iter())?,
        })
    }

    /// A backbone by name.
    pub fn backbone(&self, name: &str) -> Result<&'static BackboneEntry> {
        self.backbones.get(name)
    }

    /// A side network by name.
    pub fn side(&self, name: &str) -> Result<&'static SideEntry> {
        self.sides.get(name)
    }

    /// What side network `name` registered about itself ([`side_traits`]).
    pub fn side_traits(&self, name: &str) -> SideTraits {
        side_traits(name)
    }

    /// A head by name.
    pub fn head(&self, name: &str) -> Result<&'static HeadEntry> {
        self.heads.get(name)
    }

    /// A dataset layout by name.
    pub fn dataset(&self, name: &str) -> Result<&'static DatasetEntry> {
        self.datasets.get(name)
    }

    /// An augmentation op by name.
    pub fn augment(&self, name: &str) -> Result<&'static AugmentEntry> {
        self.augments.get(name)
    }

    /// Opens a dataset split through its registered layout.
    pub fn open_dataset(&self, cfg: &DataConfig, split: Split) -> Result<Box<dyn Dataset>> {
        (self.dataset(&cfg.kind)?.build)(cfg, split)
    }
}

/// The process-wide registry, gathered on first use.
///
/// Returns the duplicate-name error every time it is called if registration was inconsistent.
pub fn registry() -> Result<&'static Registry> {
    static REG: OnceLock<std::result::Result<Registry, String>> = OnceLock::new();
    REG.get_or_init(|| Registry::gather().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| DtlError::invalid(e.clone()))
}
