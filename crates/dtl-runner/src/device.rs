//! The devices the runner trains on, and the side-network operations each one provides.
//!
//! The training loop, the model and the optimizer are written once, generic over a
//! [`TrainDevice`]. The operations default to dfdx's device operations
//! ([`crate::generic_ops`]), which run on any dfdx device and are what the CUDA GPU
//! (feature `cuda`) uses; the CPU overrides them with its faster slice versions
//! ([`crate::ops`]), against which the generic ones are checked.

use dfdx::prelude::*;
use dfdx::tensor::Tape;
use dtl_core::config::PipelineConfig;
use dtl_core::{
    AccumulateGrad, Act, BackboneSpec, DtlError, Head, Matrix, Param, Result, SideNetwork,
};

/// Gradient tape of a training step on device `D`.
pub type TapeOf<D> = OwnedTape<f32, D>;

/// Converts a device error into the project's error type (dfdx's errors carry no text
/// beyond their debug form).
pub fn dev_err<E: std::fmt::Debug>(e: E) -> DtlError {
    DtlError::Device(format!("{e:?}"))
}

/// A device the runner can train on: dfdx's `Cpu`, or `Cuda` with the `cuda` feature.
///
/// Besides dfdx's own kernels, a training device provides the side network's and the head's
/// operations with memory-lean backward passes (nothing is kept for the backward pass but
/// the inputs it needs, and no gradient is formed for an input that needs none). Each has a
/// default built from dfdx's device operations; a device may override it with its own.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_runner::device::TrainDevice;
/// let dev = Cpu::default();
/// let x = dev.tensor_from_vec(vec![1.0f32, 3.0, 5.0], (1, 3, 1));
/// let pooled = Cpu::pool(x, 1, false).unwrap();
/// assert_eq!(pooled.as_vec(), vec![4.0]);
/// ```
pub trait TrainDevice:
    Device<f32> + AccumulateGrad + dfdx::tensor::Cache + Clone + 'static
{
    /// The pipeline's side network and head on `dev`, through the registry, their initial
    /// values drawn from the seeded CPU generator `init`.
    #[allow(clippy::type_complexity)]
    fn build_parts(
        cfg: &PipelineConfig,
        spec: &BackboneSpec,
        classes: usize,
        init: &Cpu,
        dev: &Self,
    ) -> Result<(Box<dyn SideNetwork<Self>>, Box<dyn Head<Self>>)>;
    /// `y = x A^T B^T` (see [`crate::ops::low_rank`]); the gradient of `x` is formed only when
    /// `x_tape` is given.
    fn low_rank(
        x: &Tensor<(usize, usize, usize), f32, Self>,
        x_tape: Option<TapeOf<Self>>,
        a: &Param<Self>,
        b: &Param<Self>,
    ) -> Result<Act<Self>> {
        crate::generic_ops::low_rank(x, x_tape, a, b)
    }
    /// `z * sigmoid(beta * z)` (see [`crate::ops::swish`]).
    fn swish(z: Act<Self>, beta: f32) -> Result<Act<Self>> {
        crate::generic_ops::swish(z, beta)
    }
    /// Depthwise "same" convolution over the patch grid (see
    /// [`crate::ops::depthwise_conv_tokens`]).
    fn depthwise_conv_tokens(
        s: Act<Self>,
        w: &Param<Self>,
        prefix: usize,
        grid: (usize, usize),
    ) -> Result<Act<Self>> {
        crate::generic_ops::depthwise_conv_tokens(s, w, prefix, grid)
    }
    /// `f W^T + bias` (see [`crate::ops::linear`]).
    fn linear(f: Matrix<Self>, w: &Param<Self>, bias: &Param<Self>) -> Result<Matrix<Self>> {
        crate::generic_ops::linear(f, w, bias)
    }
    /// Mean of the tokens from `prefix` on, or token 0 (see [`crate::ops::pool`]).
    fn pool<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize, usize), f32, Self, T>,
        prefix: usize,
        cls: bool,
    ) -> Result<Tensor<(usize, usize), f32, Self, T>> {
        crate::generic_ops::pool(x, prefix, cls)
    }
    /// Soft-target cross entropy (see [`crate::model::soft_cross_entropy`]).
    fn soft_cross_entropy(
        logits: Matrix<Self>,
        targets: &[f32],
    ) -> Result<Tensor<Rank0, f32, Self, TapeOf<Self>>> {
        crate::generic_ops::soft_cross_entropy(logits, targets)
    }
}

impl TrainDevice for Cpu {
    fn build_parts(
        cfg: &PipelineConfig,
        spec: &BackboneSpec,
        classes: usize,
        init: &Cpu,
        _dev: &Self,
    ) -> Result<(Box<dyn SideNetwork<Self>>, Box<dyn Head<Self>>)> {
        let reg = dtl_core::registry()?;
        let side = (reg.side(&cfg.side.kind)?.build_cpu)(&cfg.side, spec, init)?;
        let head = (reg.head(&cfg.head.kind)?.build_cpu)(&cfg.head, spec, classes, init)?;
        Ok((side, head))
    }
    fn low_rank(
        x: &Tensor<(usize, usize, usize), f32, Self>,
        x_tape: Option<TapeOf<Self>>,
        a: &Param<Self>,
        b: &Param<Self>,
    ) -> Result<Act<Self>> {
        crate::ops::low_rank(x, x_tape, a, b)
    }
    fn swish(z: Act<Self>, beta: f32) -> Result<Act<Self>> {
        Ok(crate::ops::swish(z, beta))
    }
    fn depthwise_conv_tokens(
        s: Act<Self>,
        w: &Param<Self>,
        prefix: usize,
        grid: (usize, usize),
    ) -> Result<Act<Self>> {
        crate::ops::depthwise_conv_tokens(s, w, prefix, grid)
    }
    fn linear(f: Matrix<Self>, w: &Param<Self>, bias: &Param<Self>) -> Result<Matrix<Self>> {
        crate::ops::linear(f, w, bias)
    }
    fn pool<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize, usize), f32, Self, T>,
        prefix: usize,
        cls: bool,
    ) -> Result<Tensor<(usize, usize), f32, Self, T>> {
        Ok(crate::ops::pool(x, prefix, cls))
    }
    fn soft_cross_entropy(
        logits: Matrix<Self>,
        targets: &[f32],
    ) -> Result<Tensor<Rank0, f32, Self, TapeOf<Self>>> {
        crate::model::soft_cross_entropy(logits, targets)
    }
}

#[cfg(feature = "cuda")]
impl TrainDevice for Cuda {
    fn build_parts(
        cfg: &PipelineConfig,
        spec: &BackboneSpec,
        classes: usize,
        init: &Cpu,
        dev: &Self,
    ) -> Result<(Box<dyn SideNetwork<Self>>, Box<dyn Head<Self>>)> {
        let reg = dtl_core::registry()?;
        let no_gpu = |what: &str, name: &str| {
            DtlError::Unavailable(format!(
                "{what} `{name}` has no CUDA implementation; run it with run.device = \"cpu\""
            ))
        };
        let side = reg.side(&cfg.side.kind)?;
        let build_side = side
            .build_cuda
            .ok_or_else(|| no_gpu("side.kind", side.name))?;
        let head = reg.head(&cfg.head.kind)?;
        let build_head = head
            .build_cuda
            .ok_or_else(|| no_gpu("head.kind", head.name))?;
        Ok((
            build_side(&cfg.side, spec, init, dev)?,
            build_head(&cfg.head, spec, classes, init, dev)?,
        ))
    }
}
