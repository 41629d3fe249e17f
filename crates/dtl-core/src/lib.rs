//! Core of dtl: the traits of disentangled transfer learning, the component registry and
//! the pipeline schema.
//!
//! - [`Backbone`]: a frozen model with a per-block forward and an input-only VJP.
//! - [`SideNetwork`] and [`Head`]: the trainable parts, ordinary dfdx computations on a tape.
//! - [`tape`]: frozen blocks as custom operations on dfdx's tape.
//! - [`Dataset`] and [`Augment`]: where samples come from and what happens to them.
//! - [`registry`](mod@registry): every component a pipeline can name, gathered with `inventory`.
//! - [`config`]: the pipeline TOML schema, its loading and its validation.

#![warn(missing_docs)]

pub mod backbone;
pub mod choice;
pub mod config;
pub mod data;
pub mod error;
pub mod fsio;
pub mod job;
pub mod limits;
pub mod paths;
pub mod registry;
pub mod side;
mod side_traits;
pub mod tape;
mod validate;

pub use backbone::{Backbone, BackboneSpec, DropPath, FeaturesOf, Images, StageSpec, TokensOf};
pub use config::PipelineConfig;
pub use data::{Augment, Dataset, Example, FloatImage, RgbImage, Sample};
pub use error::{DtlError, Result};
pub use job::{BenchOptions, Job, RunEnv};
pub use registry::{
    registry, AugmentEntry, BackboneEntry, BuildContext, DatasetEntry, HeadEntry, Registry,
    SideEntry, Split,
};
pub use side::{Act, Head, Matrix, Param, Parameters, SideNetwork};
pub use tape::{check_backward, frozen_block, frozen_norm, AccumulateGrad};

#[doc(hidden)]
pub use inventory;
