//! Frozen backbone functions as custom operations on dfdx's tape.
//!
//! Each wrapper runs the backbone's forward without recording anything inside it, then
//! registers one backward operation that calls the backbone's input-only VJP. The input
//! tensor is the only thing kept alive for the backward pass.

use std::sync::Arc;

use dfdx::prelude::*;
use dfdx::tensor::Tape;

use crate::backbone::{Backbone, DropPath, FeaturesOf, TokensOf};
use crate::Result;

/// A device whose gradient buffers can accumulate a tensor computed elsewhere.
///
/// dfdx keeps gradients in device-specific buffers; this trait is the one place that knows
/// how to add a tensor into one of them.
pub trait AccumulateGrad: Device<f32> {
    /// `dst += value`, where `dst` is a gradient buffer of the same length as `value`.
    fn add_into<S: Shape>(
        dst: &mut <Self as dfdx::tensor::Storage<f32>>::Vec,
        value: &Tensor<S, f32, Self>,
    ) -> Result<(), Self::Err>;
}

impl AccumulateGrad for Cpu {
    fn add_into<S: Shape>(
        dst: &mut <Self as dfdx::tensor::Storage<f32>>::Vec,
        value: &Tensor<S, f32, Self>,
    ) -> Result<(), Self::Err> {
        for (g, v) in dst.iter_mut().zip(value.as_vec()) {
            *g += v;
        }
        Ok(())
    }
}

/// Converts a backbone error raised inside a backward pass into the device error type the
/// tape expects, keeping the message on stderr (dfdx's error types carry no text).
fn report<T>(r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("error in backward pass: {e}");
            None
        }
    }
}

/// `Block_i(x)` with an input-only backward.
///
/// With a [`NoneTape`] this is exactly [`Backbone::block_forward`]; with an [`OwnedTape`] it
/// also records one backward operation that keeps `x` alive and calls
/// [`Backbone::block_vjp`].
///
/// # Panics
/// The backward operation panics if the backbone's VJP fails, since dfdx's tape gives it no
/// way to return a message; the message is printed first.
pub fn frozen_block<B, D, T>(
    backbone: &Arc<B>,
    block: usize,
    x: TokensOf<B, D, T>,
    drop: Option<Arc<DropPath>>,
) -> Result<TokensOf<B, D, T>>
where
    B: Backbone<D>,
    D: AccumulateGrad,
    T: Tape<f32, D>,
{
    let (x, mut tape) = x.split_tape();
    let y = backbone.block_forward(block, &x, drop.as_deref())?;
    if T::OWNS_TAPE {
        let y_ghost = y.ghost();
        let x_ghost = x.ghost();
        let bb = Arc::clone(backbone);
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&y_ghost)?;
            let gy = grads.get(&y_ghost);
            let gx = report(bb.block_vjp(block, &x, &gy, drop.as_deref()))
                .expect("frozen block VJP failed");
            D::add_into(grads.get_or_alloc_mut(&x_ghost)?, &gx)
        });
    }
    Ok(y.put_tape(tape))
}

/// The backbone's final LayerNorm on (rows, width) with an input-only backward.
pub fn frozen_norm<B, D, T>(
    backbone: &Arc<B>,
    x: FeaturesOf<B, D, T>,
) -> Result<FeaturesOf<B, D, T>>
where
    B: Backbone<D>,
    D: AccumulateGrad,
    T: Tape<f32, D>,
{
    let (x, mut tape) = x.split_tape();
    let y = backbone.norm_forward(&x)?;
    if T::OWNS_TAPE {
        let y_ghost = y.ghost();
        let x_ghost = x.ghost();
        let bb = Arc::clone(backbone);
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&y_ghost)?;
            let gy = grads.get(&y_ghost);
            let gx = report(bb.norm_vjp(&x, &gy)).expect("frozen norm VJP failed");
            D::add_into(grads.get_or_alloc_mut(&x_ghost)?, &gx)
        });
    }
    Ok(y.put_tape(tape))
}
