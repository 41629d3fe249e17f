//! The dfdx devices the tape-based model trains on, and the side-network operations each one
//! provides.
//!
//! The tape-based model ([`crate::model`]), the optimizer and the checkpoints are written
//! generic over a [`TrainDevice`]; dfdx's `Cpu` is the one implemented, with the slice
//! operations of [`crate::ops`]. A GPU trains through the device step of [`crate::resident`]
//! instead, which is written over the kernel set (`dtl_kernels::Kernels`).

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

/// A dfdx device the tape-based model can train on (dfdx's `Cpu`).
///
/// Besides dfdx's own kernels, a training device provides the side network's and the head's
/// operations with memory-lean backward passes (nothing is kept for the backward pass but
/// the inputs it needs, and no gradient is formed for an input that needs none).
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
    ) -> Result<Act<Self>>;
    /// `z * sigmoid(beta * z)` (see [`crate::ops::swish`]).
    fn swish(z: Act<Self>, beta: f32) -> Result<Act<Self>>;
    /// Depthwise "same" convolution over the patch grid (see
    /// [`crate::ops::depthwise_conv_tokens`]).
    fn depthwise_conv_tokens(
        s: Act<Self>,
        w: &Param<Self>,
        prefix: usize,
        grid: (usize, usize),
    ) -> Result<Act<Self>>;
    /// `f W^T + bias` (see [`crate::ops::linear`]).
    fn linear(f: Matrix<Self>, w: &Param<Self>, bias: &Param<Self>) -> Result<Matrix<Self>>;
    /// Mean of the tokens from `prefix` on, or token 0 (see [`crate::ops::pool`]).
    fn pool<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize, usize), f32, Self, T>,
        prefix: usize,
        cls: bool,
    ) -> Result<Tensor<(usize, usize), f32, Self, T>>;
    /// Soft-target cross entropy (see [`crate::ops::soft_cross_entropy`]).
    fn soft_cross_entropy(
        logits: Matrix<Self>,
        targets: &[f32],
    ) -> Result<Tensor<Rank0, f32, Self, TapeOf<Self>>>;
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
        crate::ops::soft_cross_entropy(logits, targets)
    }
}
