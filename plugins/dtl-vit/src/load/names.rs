//! The name maps: a table of tensors onto [`VitWeights`] with timm's names (fused qkv,
//! PyTorch layouts) or the Google/Flax names (`Transformer/encoderblock_N/...`, HWIO and
//! `(in, out)` kernels), the way timm's `_load_weights` reads them.

use dtl_core::{BackboneSpec, Result};

use super::read::Reader;
use super::resample::resample_pos_embed;
use super::Grid;
use crate::weights::{BlockWeights, VitWeights};

/// Reads a position embedding of any grid and resamples it to the spec's grid.
fn pos_embed(
    spec: &BackboneSpec,
    r: &mut Reader<'_>,
    name: &str,
) -> Result<(Vec<f32>, Option<Grid>)> {
    let d = spec.width;
    let (shape, data) = r.take_any(name)?;
    let full = format!("{}{name}", r.prefix);
    let n = match shape.as_slice() {
        [1, n, w] if *w == d => *n,
        [n, w] if *w == d => *n,
        _ => {
            return Err(r.err(format!(
                "tensor `{full}`: expected shape [1, {}, {d}], found {shape:?}",
                spec.tokens()
            )))
        }
    };
    if n == spec.tokens() {
        return Ok((data, None));
    }
    let prefix = spec.prefix_tokens;
    let patches = n.saturating_sub(prefix);
    let side = (patches as f64).sqrt().round() as usize;
    if n <= prefix || side * side != patches {
        return Err(r.err(format!(
            "tensor `{full}`: expected shape [1, {}, {d}], found {shape:?} ({n} tokens are not {prefix} prefix token(s) plus a square patch grid, so it cannot be resampled)",
            spec.tokens()
        )));
    }
    let out = resample_pos_embed(&data, (side, side), spec.grid, prefix, d);
    Ok((out, Some((side, side))))
}

/// The weights under timm's names.
pub(super) fn read_timm(
    spec: &BackboneSpec,
    r: &mut Reader<'_>,
) -> Result<(VitWeights, Option<Grid>)> {
    let d = spec.width;
    let hdn = spec.mlp_hidden;
    let (c, p) = (spec.in_chans, spec.patch_size);
    let patch_w = r.take("patch_embed.proj.weight", &[d, c, p, p])?;
    let patch_b = r.take("patch_embed.proj.bias", &[d])?;
    let cls_token = if spec.prefix_tokens > 0 {
        r.take("cls_token", &[1, spec.prefix_tokens, d])?
    } else {
        Vec::new()
    };
    let (pos, resampled) = pos_embed(spec, r, "pos_embed")?;
    let mut blocks = Vec::with_capacity(spec.depth);
    for i in 0..spec.depth {
        let b = |s: &str| format!("blocks.{i}.{s}");
        blocks.push(BlockWeights {
            norm1_w: r.take(&b("norm1.weight"), &[d])?,
            norm1_b: r.take(&b("norm1.bias"), &[d])?,
            qkv_w: r.take(&b("attn.qkv.weight"), &[3 * d, d])?,
            qkv_b: r.take(&b("attn.qkv.bias"), &[3 * d])?,
            proj_w: r.take(&b("attn.proj.weight"), &[d, d])?,
            proj_b: r.take(&b("attn.proj.bias"), &[d])?,
            norm2_w: r.take(&b("norm2.weight"), &[d])?,
            norm2_b: r.take(&b("norm2.bias"), &[d])?,
            fc1_w: r.take(&b("mlp.fc1.weight"), &[hdn, d])?,
            fc1_b: r.take(&b("mlp.fc1.bias"), &[hdn])?,
            fc2_w: r.take(&b("mlp.fc2.weight"), &[d, hdn])?,
            fc2_b: r.take(&b("mlp.fc2.bias"), &[d])?,
        });
    }
    let norm_w = r.take("norm.weight", &[d])?;
    let norm_b = r.take("norm.bias", &[d])?;
    Ok((
        VitWeights {
            patch_w,
            patch_b,
            cls_token,
            pos_embed: pos,
            blocks,
            norm_w,
            norm_b,
        },
        resampled,
    ))
}

/// `(rows, cols)` row-major -> `(cols, rows)` row-major.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = x[i * cols + j];
        }
    }
    out
}

/// The weights under the Google/Flax names (`big_vision`: the big_vision tree, whose
/// blocks number their attention and MLP from 0).
pub(super) fn read_flax(
    spec: &BackboneSpec,
    r: &mut Reader<'_>,
    big_vision: bool,
) -> Result<(VitWeights, Option<Grid>)> {
    let d = spec.width;
    let hdn = spec.mlp_hidden;
    let (c, p) = (spec.in_chans, spec.patch_size);
    let heads = spec.heads;
    let hd = d / heads;
    // HWIO (p, p, c, d) -> (d, c, p, p)
    let k = r.take("embedding/kernel", &[p, p, c, d])?;
    let mut patch_w = vec![0.0; d * c * p * p];
    for y in 0..p {
        for x in 0..p {
            for ci in 0..c {
                for o in 0..d {
                    patch_w[((o * c + ci) * p + y) * p + x] = k[((y * p + x) * c + ci) * d + o];
                }
            }
        }
    }
    let patch_b = r.take("embedding/bias", &[d])?;
    let cls_token = if spec.prefix_tokens > 0 {
        r.take("cls", &[1, spec.prefix_tokens, d])?
    } else {
        Vec::new()
    };
    let pos_name = if big_vision {
        "pos_embedding"
    } else {
        "Transformer/posembed_input/pos_embedding"
    };
    let (pos, resampled) = pos_embed(spec, r, pos_name)?;
    let (mha, mlp, ln2) = if big_vision { (0, 0, 1) } else { (1, 3, 2) };
    let mut blocks = Vec::with_capacity(spec.depth);
    for i in 0..spec.depth {
        let b = |s: &str| format!("Transformer/encoderblock_{i}/{s}");
        let a = |s: &str| b(&format!("MultiHeadDotProductAttention_{mha}/{s}"));
        let mut qkv_w = Vec::with_capacity(3 * d * d);
        let mut qkv_b = Vec::with_capacity(3 * d);
        for part in ["query", "key", "value"] {
            let kern = r.take(&a(&format!("{part}/kernel")), &[d, heads, hd])?;
            qkv_w.extend(transpose(&kern, d, d));
            qkv_b.extend(r.take(&a(&format!("{part}/bias")), &[heads, hd])?);
        }
        let out = r.take(&a("out/kernel"), &[heads, hd, d])?;
        blocks.push(BlockWeights {
            norm1_w: r.take(&b("LayerNorm_0/scale"), &[d])?,
            norm1_b: r.take(&b("LayerNorm_0/bias"), &[d])?,
            qkv_w,
            qkv_b,
            proj_w: transpose(&out, d, d),
            proj_b: r.take(&a("out/bias"), &[d])?,
            norm2_w: r.take(&b(&format!("LayerNorm_{ln2}/scale")), &[d])?,
            norm2_b: r.take(&b(&format!("LayerNorm_{ln2}/bias")), &[d])?,
            fc1_w: transpose(
                &r.take(&b(&format!("MlpBlock_{mlp}/Dense_0/kernel")), &[d, hdn])?,
                d,
                hdn,
            ),
            fc1_b: r.take(&b(&format!("MlpBlock_{mlp}/Dense_0/bias")), &[hdn])?,
            fc2_w: transpose(
                &r.take(&b(&format!("MlpBlock_{mlp}/Dense_1/kernel")), &[hdn, d])?,
                hdn,
                d,
            ),
            fc2_b: r.take(&b(&format!("MlpBlock_{mlp}/Dense_1/bias")), &[d])?,
        });
    }
    let norm_w = r.take("Transformer/encoder_norm/scale", &[d])?;
    let norm_b = r.take("Transformer/encoder_norm/bias", &[d])?;
    Ok((
        VitWeights {
            patch_w,
            patch_b,
            cls_token,
            pos_embed: pos,
            blocks,
            norm_w,
            norm_b,
        },
        resampled,
    ))
}
