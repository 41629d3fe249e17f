//! Frozen backbone functions as custom operations on dfdx's tape.
//!
//! Each wrapper runs the backbone's forward without recording anything inside it, then
//! registers one backward operation that calls the backbone's input-only VJP. The input
//! tensor is the only thing kept alive for the backward pass.
//!
//! dfdx's backward operations can only return the device's error type, which carries no
//! message. A VJP that fails therefore records its error for the thread, adds no gradient,
//! and the frozen operations after it skip their VJPs; the training step then returns the
//! recorded error with [`check_backward`] instead of updating anything.

use std::sync::Arc;

use dfdx::prelude::*;
use dfdx::tensor::Tape;

use crate::backbone::{Backbone, DropPath, FeaturesOf, TokensOf};
use crate::{DtlError, Result};

thread_local! {
    /// The first error a frozen VJP raised in this thread's current backward pass.
    static BACKWARD_ERROR: std::cell::RefCell<Option<DtlError>> = const { std::cell::RefCell::new(None) };
}

/// Whether a frozen VJP of this thread's backward pass has already failed.
fn backward_failed() -> bool {
    BACKWARD_ERROR.with(|e| e.borrow().is_some())
}

/// Runs a frozen VJP unless an earlier one failed; a failure is recorded, not raised.
fn run_vjp<T>(vjp: impl FnOnce() -> Result<T>) -> Option<T> {
    if backward_failed() {
        return None;
    }
    match vjp() {
        Ok(v) => Some(v),
        Err(e) => {
            BACKWARD_ERROR.with(|slot| *slot.borrow_mut() = Some(e));
            None
        }
    }
}

/// Takes the error a frozen VJP recorded during this thread's last backward pass: `Ok` when
/// every VJP succeeded (or none ran), else the first error, with the message of the backbone.
/// Call it after `backward()`; it also resets the record for the next pass.
///
/// ```
/// assert!(dtl_core::tape::check_backward().is_ok());
/// ```
pub fn check_backward() -> Result<()> {
    match BACKWARD_ERROR.with(|e| e.borrow_mut().take()) {
        None => Ok(()),
        Some(e) => Err(DtlError::invalid(format!("error in backward pass: {e}"))),
    }
}

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

/// `Block_i(x)` with an input-only backward.
///
/// With a [`NoneTape`] this is exactly [`Backbone::block_forward`]; with an [`OwnedTape`] it
/// also records one backward operation that keeps `x` alive and calls
/// [`Backbone::block_vjp`].
///
/// # Errors in the backward pass
/// When the backbone's VJP fails, the backward operation adds no gradient and records the
/// error; [`check_backward`] returns it after `backward()`.
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
            match run_vjp(|| bb.block_vjp(block, &x, &gy, drop.as_deref())) {
                Some(gx) => D::add_into(grads.get_or_alloc_mut(&x_ghost)?, &gx),
                None => Ok(()),
            }
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
            match run_vjp(|| bb.norm_vjp(&x, &gy)) {
                Some(gx) => D::add_into(grads.get_or_alloc_mut(&x_ghost)?, &gx),
                None => Ok(()),
            }
        });
    }
    Ok(y.put_tape(tape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackboneSpec;

    type Tok = Tensor<(usize, Const<2>, Const<4>), f32, Cpu>;
    type Feat = Tensor<(usize, Const<4>), f32, Cpu>;

    /// Blocks double their input; block 1's VJP fails.
    struct FailingVjp(BackboneSpec);

    impl Backbone<Cpu> for FailingVjp {
        type Tokens = Const<2>;
        type Width = Const<4>;
        fn spec(&self) -> &BackboneSpec {
            &self.0
        }
        fn embed(&self, images: &crate::Images<Cpu>) -> Result<Tok> {
            Ok(images.device().ones_like(&(images.shape().0, Const, Const)))
        }
        fn block_forward(&self, _i: usize, x: &Tok, _d: Option<&DropPath>) -> Result<Tok> {
            Ok(x.clone() * 2.0)
        }
        fn block_vjp(&self, i: usize, _x: &Tok, g: &Tok, _d: Option<&DropPath>) -> Result<Tok> {
            if i == 1 {
                return Err(DtlError::invalid("block 1: activations lost"));
            }
            Ok(g.clone() * 2.0)
        }
        fn norm_forward(&self, x: &Feat) -> Result<Feat> {
            Ok(x.clone())
        }
        fn norm_vjp(&self, _x: &Feat, g: &Feat) -> Result<Feat> {
            Ok(g.clone())
        }
    }

    fn backbone() -> Arc<FailingVjp> {
        let spec = BackboneSpec {
            grid: (1, 1),
            ..BackboneSpec::vit("failing", 8, 8, 4, 2, 1)
        }
        .single_stage();
        Arc::new(FailingVjp(spec))
    }

    #[test]
    fn a_failing_vjp_is_an_error_after_backward_not_a_panic() {
        let dev = Cpu::default();
        let bb = backbone();
        let x: Tok = dev.ones_like(&(1, Const, Const));
        let y0 = frozen_block(&bb, 0, x.leaky_traced(), None).unwrap();
        let y1 = frozen_block(&bb, 1, y0, None).unwrap();
        let _grads = y1.sum().backward();
        let e = check_backward().unwrap_err().to_string();
        assert_eq!(e, "error in backward pass: block 1: activations lost");
        // The record is taken: the next pass starts clean.
        assert!(check_backward().is_ok());
    }

    #[test]
    fn a_succeeding_vjp_leaves_no_error_and_the_gradient() {
        let dev = Cpu::default();
        let bb = backbone();
        let x: Tok = dev.ones_like(&(1, Const, Const));
        let y0 = frozen_block(&bb, 0, x.leaky_trace(), None).unwrap();
        let grads = y0.sum().backward();
        assert!(check_backward().is_ok());
        assert_eq!(grads.get(&x).as_vec(), vec![2.0; 8]);
    }
}
