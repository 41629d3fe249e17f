//! Bounds on every size a pipeline, an override, a data file or a checkpoint can set.
//!
//! Nothing is allocated from a size that has not passed through here. Two kinds of bound:
//!
//! - **caps** on values that are absurd whatever the machine ([`MAX_IMAGE_SIDE`],
//!   [`MAX_CLASSES`], [`MAX_BATCH`], [`MAX_RAND_AUGMENT_OPS`], a rank above the token width);
//! - **a memory estimate** of one training step and one evaluation step from the backbone's
//!   [`BackboneSpec`], the batch, the side network, the head and the precision the step
//!   stores its activations and frozen weights at ([`step_memory`]), refused when it exceeds
//!   the memory of the machine ([`memory_limit`]).
//!
//! Sizes multiply in checked `u64` arithmetic: an overflow is itself a refusal, never a wrap.
//!
//! ```
//! use dtl_core::choice::Precision;
//! use dtl_core::limits::{step_memory, StepSizes};
//! use dtl_core::BackboneSpec;
//! let spec = BackboneSpec::vit("vit_base_patch16_224", 224, 16, 768, 12, 12);
//! let sizes = StepSizes { batch: 32, rank: 2, taps: 12, kernel: 3, classes: 100 };
//! let m = step_memory(&spec, &sizes, Precision::F32).unwrap();
//! // ViT-B at batch 32: the f32 weights (~330 MiB) plus a few GiB of activations.
//! assert!(m.train > 1 << 30 && m.train < 16 << 30, "{}", m.train);
//! assert!(m.eval < m.train);
//! // In bf16 the activations and frozen weights take half as much.
//! let half = step_memory(&spec, &sizes, Precision::Bf16).unwrap();
//! assert!(half.train < m.train * 6 / 10, "{} vs {}", half.train, m.train);
//! // A rank of 2^62 does not wrap around: it is an overflow, reported as `None`.
//! let huge = StepSizes { rank: 1 << 62, ..sizes };
//! assert!(step_memory(&spec, &huge, Precision::F32).is_none());
//! ```

use std::path::Path;

use crate::choice::Precision;
use crate::config::DeviceSpec;
use crate::{BackboneSpec, DtlError, PipelineConfig};

/// Largest image side in pixels an augmentation op may produce (`resize`, `center_crop`,
/// `random_resized_crop`): 8192 px is a 200 MiB RGB image, far beyond any backbone's input.
pub const MAX_IMAGE_SIDE: usize = 8192;

/// Largest image side a decoded input image may have (a 16k x 16k RGB image is 768 MiB).
pub const MAX_DECODED_SIDE: usize = 16384;

/// Most classes a head may have (`head.classes`, or a dataset's largest label plus one).
pub const MAX_CLASSES: usize = 1 << 22;

/// Largest training, evaluation or benchmark batch.
pub const MAX_BATCH: usize = 1 << 16;

/// Most RandAugment ops drawn per image (timm uses 2 or 3).
pub const MAX_RAND_AUGMENT_OPS: usize = 32;

/// Most threads a pipeline may ask for (`run.threads`, `data.workers`).
pub const MAX_THREADS: usize = 1024;

/// Most batches the loader may prepare ahead (`data.prefetch`).
pub const MAX_PREFETCH: usize = 1024;

/// What sets the size of one step, besides the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepSizes {
    /// Images per step.
    pub batch: usize,
    /// Rank of each low-rank map (0 for a linear probe).
    pub rank: usize,
    /// Tapped blocks (0 for a linear probe).
    pub taps: usize,
    /// Depthwise conv kernel (0 for none).
    pub kernel: usize,
    /// Classes of the head.
    pub classes: usize,
}

/// Estimated peak bytes of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepMemory {
    /// A training step: weights, kept block inputs, one block's internals, side network and
    /// head with their gradients and AdamW moments, logits.
    pub train: u64,
    /// An evaluation step: weights, two token buffers, one block's internals, logits.
    pub eval: u64,
}

fn mul(xs: &[u64]) -> Option<u64> {
    xs.iter().try_fold(1u64, |a, &x| a.checked_mul(x))
}

fn add(xs: &[u64]) -> Option<u64> {
    xs.iter().try_fold(0u64, |a, &x| a.checked_add(x))
}

/// Estimated peak memory of a training and an evaluation step of `spec` with `sizes`, in
/// bytes, or `None` when the sizes overflow 64 bits. See the module docs.
///
/// `precision` is what the step stores the backbone's activations (token tensors, the block
/// inputs kept for the backward pass, the blocks' internals) and its frozen weights at:
/// 2 bytes a value in [`Precision::Bf16`], 4 otherwise ([`Precision::Auto`] counts as f32:
/// resolve it for the device first, [`Precision::on_device`]). The images, the side network,
/// the head, their gradients and AdamW moments and the logits are f32 in every precision.
pub fn step_memory(spec: &BackboneSpec, s: &StepSizes, precision: Precision) -> Option<StepMemory> {
    const F: u64 = 4;
    // Bytes of an activation or frozen weight.
    let act: u64 = if precision == Precision::Bf16 { 2 } else { F };
    let b = s.batch as u64;
    // The last stage's width (the head's input); the activations take the largest stage.
    let d = spec.width as u64;
    let px = mul(&[
        spec.in_chans as u64,
        spec.image_size as u64,
        spec.image_size as u64,
    ])?;
    let weights = mul(&[spec.parameter_count() as u64, act])?;
    let images = mul(&[b, px, F])?;
    // Per stage (one for a ViT): a token tensor and one block's internals: qkv, the
    // attention matrices and the MLP's hidden activations, in bytes at the activations'
    // precision; `tokens_f32` the same token tensor in f32 (the side network's).
    let ratio = spec.mlp_hidden as f64 / spec.width.max(1) as f64;
    let (mut tokens, mut tokens_f32, mut block, mut kept_blocks, mut t_max, mut d_max) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for st in &spec.stages {
        let t = st.tokens() as u64;
        let ds = st.width as u64;
        let heads = st.heads.max(1) as u64;
        let hidden = (ratio * st.width as f64).ceil() as u64;
        let span = spec
            .attention_tokens
            .map_or(t, |a| (a as u64).min(t))
            .max(1);
        let calls = mul(&[b, t.div_ceil(span)])?;
        let x = mul(&[b, t, ds, act])?;
        tokens = tokens.max(x);
        tokens_f32 = tokens_f32.max(mul(&[b, t, ds, F])?);
        block = block.max(add(&[
            mul(&[x, 3])?,
            mul(&[calls, heads, span, span, act])?,
            mul(&[b, t, hidden, 2, act])?,
        ])?);
        kept_blocks = add(&[kept_blocks, mul(&[x, (st.blocks.1 - st.blocks.0) as u64])?])?;
        t_max = t_max.max(t);
        d_max = d_max.max(ds);
    }
    let classes = s.classes as u64;
    // Parameter, gradient and two AdamW moments.
    let head = mul(&[add(&[mul(&[classes, d])?, classes])?, 4, F])?;
    let logits = mul(&[b, classes, 3, F])?;
    let side_params = add(&[
        mul(&[s.taps as u64, s.rank as u64, d_max, 2])?,
        mul(&[
            d_max,
            s.kernel as u64,
            s.kernel as u64,
            spec.stages.len().max(1) as u64,
        ])?,
    ])?;
    let side = add(&[
        mul(&[side_params, 4, F])?,
        // The taps' outputs t_i (rows x r) and the side state z.
        mul(&[s.taps as u64, b, t_max, s.rank as u64, F])?,
        mul(&[tokens_f32, 2])?,
    ])?;
    // Kept for the backward pass: every block's input at most, plus the running tokens.
    let kept = add(&[kept_blocks, mul(&[tokens, 2])?])?;
    let train = add(&[weights, images, kept, mul(&[block, 2])?, head, logits, side])?;
    let eval = add(&[weights, images, mul(&[tokens, 2])?, block, head, logits])?;
    Some(StepMemory { train, eval })
}

/// The largest image side the augmentation ops of `cfg` produce (their `size` parameters),
/// at least the backbone's input size.
fn augment_side(cfg: &PipelineConfig, spec: &BackboneSpec) -> u64 {
    let mut side = spec.image_size as u64;
    for op in cfg
        .augment
        .train
        .iter()
        .chain(&cfg.augment.test)
        .chain(&cfg.augment.batch)
    {
        match op.params.get("size") {
            Some(toml::Value::Integer(i)) => side = side.max(*i.max(&0) as u64),
            Some(toml::Value::Array(a)) => {
                for v in a {
                    if let toml::Value::Integer(i) = v {
                        side = side.max(*i.max(&0) as u64);
                    }
                }
            }
            _ => {}
        }
    }
    side
}

/// Bytes the loader holds besides the step: the batches prepared ahead and in the workers
/// (f32 `3 x S x S` images), and each worker's images between augmentation ops (up to the
/// largest side an op produces, in 8-bit and float form), or `None` on overflow.
///
/// ```
/// use dtl_core::{BackboneSpec, PipelineConfig};
/// let toml = "[backbone]\nkind = \"v\"\n[data]\nkind = \"csv\"\nroot = \".\"\n";
/// let cfg = PipelineConfig::from_str(toml, "p.toml".as_ref(), &[]).unwrap();
/// let spec = BackboneSpec::vit("vit_base_patch16_224", 224, 16, 768, 12, 12);
/// let m = dtl_core::limits::loader_memory(&cfg, &spec, 32).unwrap();
/// assert!(m > 7 * 32 * 3 * 224 * 224 * 4 && m < 1 << 30, "{m}");
/// ```
pub fn loader_memory(cfg: &PipelineConfig, spec: &BackboneSpec, batch: usize) -> Option<u64> {
    let s = spec.image_size as u64;
    let batches = add(&[cfg.data.prefetch as u64, cfg.data.workers as u64, 1])?;
    let ahead = mul(&[batches, batch as u64, 3, s, s, 4])?;
    let a = augment_side(cfg, spec);
    let per_worker = mul(&[a, a, 3, 1 + 1 + 4])?;
    add(&[ahead, mul(&[cfg.data.workers.max(1) as u64, per_worker])?])
}

/// The memory a step may use, in bytes, and where that figure comes from.
///
/// `DTL_MEMORY_LIMIT_MIB` sets it explicitly; otherwise it is the machine's memory
/// (`MemTotal` of `/proc/meminfo`), or no limit where that cannot be read.
///
/// ```
/// let (bytes, what) = dtl_core::limits::memory_limit();
/// assert!(bytes > 0 && !what.is_empty());
/// ```
pub fn memory_limit() -> (u64, String) {
    if let Some(mib) = std::env::var("DTL_MEMORY_LIMIT_MIB")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return (
            mib.saturating_mul(1 << 20),
            format!("the limit DTL_MEMORY_LIMIT_MIB = {mib} MiB"),
        );
    }
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    match total {
        Some(kib) => (
            kib.saturating_mul(1024),
            format!(
                "this machine's {} of memory",
                human(kib.saturating_mul(1024))
            ),
        ),
        None => (u64::MAX, "no known memory limit".to_string()),
    }
}

/// `bytes` as MiB or GiB, for messages.
///
/// ```
/// assert_eq!(dtl_core::limits::human(3 << 30), "3.0 GiB");
/// assert_eq!(dtl_core::limits::human(5 << 20), "5 MiB");
/// ```
pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    }
}

/// The [`StepSizes`] of a pipeline's training step on `spec` with `classes` classes.
pub fn sizes_of(cfg: &PipelineConfig, spec: &BackboneSpec, classes: usize) -> StepSizes {
    let linear = !crate::registry::side_traits(&cfg.side.kind).taps;
    StepSizes {
        batch: cfg.data.batch_size,
        rank: if linear { 0 } else { cfg.side.rank },
        taps: if linear {
            0
        } else {
            cfg.side.tap_blocks(spec.depth).len()
        },
        kernel: if linear { 0 } else { cfg.side.kernel_size() },
        classes,
    }
}

/// The caps on a pipeline's sizes that hold whatever the machine: `side.rank` at most the
/// token width, `head.classes` at most [`MAX_CLASSES`], batches at most [`MAX_BATCH`],
/// threads at most [`MAX_THREADS`], prefetched batches at most [`MAX_PREFETCH`].
/// Each problem is an error naming `file` and the key.
///
/// ```
/// use dtl_core::{BackboneSpec, PipelineConfig};
/// let toml = "[backbone]\nkind = \"v\"\n[data]\nkind = \"csv\"\nroot = \".\"\nworkers = 100000000\n";
/// let cfg = PipelineConfig::from_str(toml, "p.toml".as_ref(), &[]).unwrap();
/// let spec = BackboneSpec::vit("vit_test", 32, 8, 48, 4, 3);
/// let errs = dtl_core::limits::caps(&cfg, &spec, "p.toml".as_ref());
/// assert_eq!(errs[0].to_string(), "p.toml: key `data.workers`: 100000000 is more than 1024 threads");
/// ```
pub fn caps(cfg: &PipelineConfig, spec: &BackboneSpec, file: &Path) -> Vec<DtlError> {
    let mut errs = Vec::new();
    if crate::registry::side_traits(&cfg.side.kind).taps && cfg.side.rank > spec.width {
        errs.push(DtlError::config(
            file,
            "side.rank",
            None,
            format!(
                "{} is more than the token width {} of `{}`; a low-rank map has rank 1 to {} (the paper uses 2 to 4)",
                cfg.side.rank, spec.width, spec.name, spec.width
            ),
        ));
    }
    if let Some(c) = cfg.head.classes {
        if c > MAX_CLASSES {
            errs.push(DtlError::config(
                file,
                "head.classes",
                None,
                format!("{c} is more than the {MAX_CLASSES} classes a head may have"),
            ));
        }
    }
    for (key, v, max, what) in [
        ("run.threads", cfg.run.threads, MAX_THREADS, "threads"),
        ("data.workers", cfg.data.workers, MAX_THREADS, "threads"),
        (
            "data.prefetch",
            cfg.data.prefetch,
            MAX_PREFETCH,
            "batches prepared ahead",
        ),
    ] {
        if v > max {
            errs.push(DtlError::config(
                file,
                key,
                None,
                format!("{v} is more than {max} {what}"),
            ));
        }
    }
    for (key, v) in [
        ("data.batch_size", Some(cfg.data.batch_size)),
        ("data.eval_batch_size", cfg.data.eval_batch_size),
    ] {
        if let Some(v) = v {
            if v > MAX_BATCH {
                errs.push(DtlError::config(
                    file,
                    key,
                    None,
                    format!("{v} is more than the largest batch, {MAX_BATCH}"),
                ));
            }
        }
    }
    errs
}

/// The precision `cfg`'s step stores activations and frozen weights at, for [`step_memory`]:
/// `run.precision` resolved for `run.device`; a device left to `auto` may be the CPU, so there
/// it counts f32 unless bf16 is asked for.
fn stored_precision(cfg: &PipelineConfig) -> Precision {
    cfg.run
        .precision
        .on_device(matches!(cfg.run.device, DeviceSpec::Cuda(_)))
}

/// Refuses a pipeline whose training or evaluation step would not fit in memory
/// ([`memory_limit`]), naming the key that weighs most, the estimate and the limit.
/// `classes` is the head's class count (`head.classes` or the dataset's).
///
/// ```
/// use dtl_core::limits::check_memory;
/// use dtl_core::{BackboneSpec, PipelineConfig};
/// let toml = "[backbone]\nkind = \"vit\"\n[data]\nkind = \"csv\"\nroot = \".\"\nbatch_size = 60000\n";
/// let cfg = PipelineConfig::from_str(toml, "p.toml".as_ref(), &[]).unwrap();
/// let spec = BackboneSpec::vit("vit_base_patch16_224", 224, 16, 768, 12, 12);
/// let e = check_memory(&cfg, &spec, 10, "p.toml".as_ref()).unwrap_err();
/// assert!(e.to_string().contains("key `data.batch_size`"), "{e}");
/// assert!(check_memory(&cfg, &spec, 10, "p.toml".as_ref()).is_err());
/// ```
pub fn check_memory(
    cfg: &PipelineConfig,
    spec: &BackboneSpec,
    classes: usize,
    file: &Path,
) -> Result<(), DtlError> {
    let (limit, what) = memory_limit();
    let precision = stored_precision(cfg);
    let train = sizes_of(cfg, spec, classes);
    let eval = StepSizes {
        batch: cfg.eval_batch_size(),
        ..train
    };
    // Which key makes the step large: compare the step against the same step with that
    // one size at its smallest.
    let heaviest = |s: &StepSizes, batch_key: &'static str, train: bool| -> &'static str {
        let pick = |m: StepMemory| if train { m.train } else { m.eval };
        let base = |f: &dyn Fn(&mut StepSizes)| {
            let mut t = *s;
            f(&mut t);
            step_memory(spec, &t, precision).map(pick)
        };
        let full = step_memory(spec, s, precision)
            .map(pick)
            .unwrap_or(u64::MAX);
        // Setting a key to its smallest value that still overflows does not make it the culprit.
        let gain = |b: Option<u64>| b.map_or(0, |b| full.saturating_sub(b));
        let cands: [(&'static str, u64); 3] = [
            (batch_key, gain(base(&|t| t.batch = 1))),
            ("side.rank", gain(base(&|t| t.rank = 1.min(t.rank)))),
            ("head.classes", gain(base(&|t| t.classes = 2))),
        ];
        cands
            .iter()
            .max_by_key(|c| c.1)
            .map(|c| c.0)
            .unwrap_or(batch_key)
    };
    let describe = |s: &StepSizes| {
        format!(
            "`{}`, batch {}, rank {}, {} taps, {} classes",
            spec.name, s.batch, s.rank, s.taps, s.classes
        )
    };
    for (what_step, sizes, key, pick) in [
        ("a training step", train, "data.batch_size", true),
        ("an evaluation step", eval, "data.eval_batch_size", false),
    ] {
        let need = step_memory(spec, &sizes, precision)
            .map(|m| if pick { m.train } else { m.eval })
            .and_then(|m| add(&[m, loader_memory(cfg, spec, sizes.batch)?]));
        match need {
            None => {
                return Err(DtlError::config(
                    file,
                    heaviest(&sizes, key, pick),
                    None,
                    format!(
                        "the memory of {what_step} overflows 64 bits ({}); lower it",
                        describe(&sizes)
                    ),
                ))
            }
            Some(n) if n > limit => {
                return Err(DtlError::config(
                    file,
                    heaviest(&sizes, key, pick),
                    None,
                    format!(
                        "{what_step} needs about {} ({}), more than {what}; lower it",
                        human(n),
                        describe(&sizes)
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BackboneSpec {
        BackboneSpec::vit("vit_base_patch16_224", 224, 16, 768, 12, 12)
    }

    #[test]
    fn the_estimate_grows_with_every_size_and_never_wraps() {
        let s = StepSizes {
            batch: 8,
            rank: 2,
            taps: 12,
            kernel: 3,
            classes: 10,
        };
        let m = step_memory(&spec(), &s, Precision::F32).unwrap();
        for bigger in [
            StepSizes { batch: 16, ..s },
            StepSizes { rank: 64, ..s },
            StepSizes {
                classes: 10_000,
                ..s
            },
        ] {
            assert!(step_memory(&spec(), &bigger, Precision::F32).unwrap().train > m.train);
        }
        for absurd in [
            StepSizes {
                batch: usize::MAX,
                ..s
            },
            StepSizes {
                classes: usize::MAX,
                ..s
            },
            StepSizes { rank: 1 << 62, ..s },
        ] {
            assert!(step_memory(&spec(), &absurd, Precision::F32).is_none());
        }
    }

    #[test]
    fn bf16_counts_activations_and_frozen_weights_at_two_bytes() {
        let s = StepSizes {
            batch: 8,
            rank: 2,
            taps: 12,
            kernel: 3,
            classes: 10,
        };
        let f32 = step_memory(&spec(), &s, Precision::F32).unwrap();
        let bf16 = step_memory(&spec(), &s, Precision::Bf16).unwrap();
        // `auto` not resolved for a device counts as f32
        assert_eq!(step_memory(&spec(), &s, Precision::Auto), Some(f32));
        // the evaluation step is the frozen backbone, its activations and the f32 head and
        // images: all but those halve
        let images = 8 * 3 * 224 * 224 * 4;
        let head = (10 * 768 + 10) * 4 * 4;
        let logits = 8 * 10 * 3 * 4;
        let fixed = images + head + logits;
        assert_eq!(bf16.eval - fixed, (f32.eval - fixed) / 2);
        // training keeps the side network's f32 state: less than half is saved
        assert!(bf16.train < f32.train && bf16.train > f32.train / 2);
        assert!(bf16.train > bf16.eval);
        // the memory check counts at the precision the pipeline runs at
        let cfg = |run: &str| {
            let t = format!(
                "[backbone]\nkind = \"v\"\n[run]\n{run}\n[data]\nkind = \"csv\"\nroot = \".\"\n"
            );
            PipelineConfig::from_str(&t, "p.toml".as_ref(), &[]).unwrap()
        };
        for (run, want) in [
            ("device = \"cuda:0\"", Precision::Bf16),
            ("device = \"cuda:0\"\nprecision = \"f32\"", Precision::F32),
            ("device = \"cpu\"", Precision::F32),
            ("device = \"auto\"", Precision::F32),
            ("device = \"auto\"\nprecision = \"bf16\"", Precision::Bf16),
        ] {
            assert_eq!(stored_precision(&cfg(run)), want, "{run}");
        }
    }

    #[test]
    fn the_heaviest_key_is_named() {
        let cfg = |extra: &str| {
            let t =
                format!("[backbone]\nkind = \"v\"\n[data]\nkind = \"csv\"\nroot = \".\"\n{extra}");
            PipelineConfig::from_str(&t, "p.toml".as_ref(), &[]).unwrap()
        };
        let f: &Path = "p.toml".as_ref();
        let e = check_memory(&cfg("[side]\nrank = 4611686018427387904\n"), &spec(), 10, f);
        assert!(e.unwrap_err().to_string().contains("key `side.rank`"));
        let e = check_memory(&cfg(""), &spec(), 4_000_000_000, f).unwrap_err();
        assert!(e.to_string().contains("key `head.classes`"), "{e}");
        assert!(check_memory(&cfg(""), &spec(), 10, f).is_ok());
    }
}
