//! The one adapter between dfdx tensors and the ViT's flat-buffer implementation.
//!
//! The CPU model ([`crate::Vit`]) computes on flat row-major `f32` buffers; these functions
//! do the shape checks, hand a tensor's values over as a [`CpuBuf`] (no further copy) and
//! wrap the result in a tensor on the caller's device.

use dfdx::prelude::*;
use dtl_core::{BackboneSpec, DtlError, Images, Result};
use dtl_kernels::CpuBuf;

/// Tokens (batch, tokens, width) on device `D`.
pub(crate) type Tokens<T, W, D> = Tensor<(usize, T, W), f32, D>;
/// Rows (batch, width) on device `D`.
pub(crate) type Rows<W, D> = Tensor<(usize, W), f32, D>;

/// Patch embedding: checks the image size, then `f(images, batch)`.
pub(crate) fn embed<T: ConstDim, W: ConstDim, D: Device<f32>>(
    spec: &BackboneSpec,
    images: &Images<D>,
    f: impl FnOnce(CpuBuf, usize) -> Result<Vec<f32>>,
) -> Result<Tokens<T, W, D>> {
    let (b, _, h, w) = *images.shape();
    let size = spec.image_size;
    if h != size || w != size {
        return Err(DtlError::shape(format!(
            "{}: images are {h}x{w}, the backbone takes {size}x{size}",
            spec.name
        )));
    }
    let out = f(CpuBuf::from_vec(images.as_vec()), b)?;
    Ok(images
        .device()
        .tensor_from_vec(out, (b, T::default(), W::default())))
}

/// A block forward: `f(x, batch)`, same shape out.
pub(crate) fn block<T: ConstDim, W: ConstDim, D: Device<f32>>(
    x: &Tokens<T, W, D>,
    f: impl FnOnce(CpuBuf, usize) -> Result<Vec<f32>>,
) -> Result<Tokens<T, W, D>> {
    let y = f(CpuBuf::from_vec(x.as_vec()), x.shape().0)?;
    Ok(x.device().tensor_from_vec(y, *x.shape()))
}

/// A block VJP: checks that input and gradient hold the same batch, then
/// `f(x, grad_out, batch)`.
pub(crate) fn block_vjp<T: ConstDim, W: ConstDim, D: Device<f32>>(
    spec: &BackboneSpec,
    x: &Tokens<T, W, D>,
    grad_out: &Tokens<T, W, D>,
    f: impl FnOnce(CpuBuf, CpuBuf, usize) -> Result<Vec<f32>>,
) -> Result<Tokens<T, W, D>> {
    let b = x.shape().0;
    if grad_out.shape().0 != b {
        return Err(DtlError::shape(format!(
            "{}: block VJP got a gradient for {} samples and an input of {b}",
            spec.name,
            grad_out.shape().0
        )));
    }
    let g = f(
        CpuBuf::from_vec(x.as_vec()),
        CpuBuf::from_vec(grad_out.as_vec()),
        b,
    )?;
    Ok(x.device().tensor_from_vec(g, *x.shape()))
}

/// The final norm on rows: `f(x)`.
pub(crate) fn rows<W: ConstDim, D: Device<f32>>(
    x: &Rows<W, D>,
    f: impl FnOnce(CpuBuf) -> Result<Vec<f32>>,
) -> Result<Rows<W, D>> {
    let y = f(CpuBuf::from_vec(x.as_vec()))?;
    Ok(x.device().tensor_from_vec(y, *x.shape()))
}

/// The final norm's VJP on rows: `f(x, grad_out)`.
pub(crate) fn rows_vjp<W: ConstDim, D: Device<f32>>(
    x: &Rows<W, D>,
    grad_out: &Rows<W, D>,
    f: impl FnOnce(CpuBuf, CpuBuf) -> Result<Vec<f32>>,
) -> Result<Rows<W, D>> {
    let g = f(
        CpuBuf::from_vec(x.as_vec()),
        CpuBuf::from_vec(grad_out.as_vec()),
    )?;
    Ok(x.device().tensor_from_vec(g, *x.shape()))
}
