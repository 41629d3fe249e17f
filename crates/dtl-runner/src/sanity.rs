//! Non-finite values are never a result: checks on weights, checkpoints and logits that turn
//! a NaN or an Inf into an error naming where it is and what to do about it.

use std::path::Path;

use dtl_core::{DtlError, Result};

/// The index and value of the first non-finite entry of `values`, if any.
///
/// ```
/// assert_eq!(dtl_runner::sanity::first_non_finite(&[1.0, f32::NAN]).map(|p| p.0), Some(1));
/// assert_eq!(dtl_runner::sanity::first_non_finite(&[1.0, 2.0]).map(|p| p.0), None);
/// assert_eq!(dtl_runner::sanity::first_non_finite(&[f32::INFINITY]).map(|p| p.0), Some(0));
/// ```
pub fn first_non_finite(values: &[f32]) -> Option<(usize, f32)> {
    values
        .iter()
        .position(|v| !v.is_finite())
        .map(|i| (i, values[i]))
}

/// Refuses a tensor of `file` holding a NaN or an Inf, naming the tensor and the first bad
/// entry; `what` says what the file is (`weights`, `checkpoint`).
///
/// ```
/// use dtl_runner::sanity::finite_tensor;
/// assert!(finite_tensor("w.safetensors".as_ref(), "weights", "norm.weight", &[1.0, 1.0]).is_ok());
/// let e = finite_tensor("w.safetensors".as_ref(), "weights", "norm.weight", &[1.0, f32::NAN]).unwrap_err();
/// assert_eq!(e.to_string(), "w.safetensors: weights tensor `norm.weight` holds NaN at index 1; the file is damaged or was saved from a diverged model: use an intact copy");
/// ```
pub fn finite_tensor(file: &Path, what: &str, name: &str, values: &[f32]) -> Result<()> {
    match first_non_finite(values) {
        None => Ok(()),
        Some((i, v)) => Err(DtlError::file(
            file,
            format!(
                "{what} tensor `{name}` holds {v} at index {i}; the file is damaged or was saved from a diverged model: use an intact copy"
            ),
        )),
    }
}

/// Refuses logits of evaluation step `step` (0-based) that hold a NaN or an Inf. The advice
/// follows the cause: non-finite input images point at the data settings; otherwise the
/// weights and parameters (checked finite when they were loaded) overflow, which points at
/// training.
///
/// ```
/// use dtl_runner::sanity::finite_logits;
/// assert!(finite_logits(&[0.1, 0.2], 2, 0, &[0.0; 4]).is_ok());
/// let e = finite_logits(&[0.1, 0.2, f32::NAN, 0.0], 2, 3, &[0.0; 8]).unwrap_err();
/// assert!(e.to_string().starts_with("evaluation step 4: the logits of 1 of 2 images are not finite"), "{e}");
/// let e = finite_logits(&[f32::NAN, 0.0], 2, 0, &[f32::INFINITY]).unwrap_err();
/// assert!(e.to_string().contains("data.std"), "{e}");
/// ```
pub fn finite_logits(logits: &[f32], classes: usize, step: usize, images: &[f32]) -> Result<()> {
    let classes = classes.max(1);
    let bad = logits
        .chunks(classes)
        .filter(|r| r.iter().any(|v| !v.is_finite()))
        .count();
    if bad == 0 {
        return Ok(());
    }
    Err(non_finite_logits(
        step,
        bad,
        logits.len().div_ceil(classes),
        images,
    ))
}

/// The error for `bad` of `n` images of evaluation step `step` (0-based) with non-finite
/// logits; `images` are the step's inputs, which decide the advice (see [`finite_logits`]).
pub fn non_finite_logits(step: usize, bad: usize, n: usize, images: &[f32]) -> DtlError {
    let advice = if first_non_finite(images).is_some() {
        "the input images already hold NaN or Inf: check data.mean, data.std and the augment ops"
    } else {
        "the backbone weights and the trained parameters are finite, so the side network or head overflows: it has diverged in training; retrain with a lower optim.lr or with optim.clip_grad"
    };
    DtlError::diverged(
        bad,
        n,
        format!(
            "evaluation step {}: the logits of {bad} of {n} images are not finite (NaN or Inf); {advice}",
            step + 1
        ),
    )
}
