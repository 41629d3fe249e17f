//! Unit tests of the operations' checks and shapes.

use dtl_kernels::{AttnShape, ConvShape, MergeShape, WindowShape};

use super::*;

#[test]
fn kernel_enum_follows_the_entry_point_list() {
    let all = [
        K::Fill,
        K::Add,
        K::BiasRows,
        K::SumRows,
        K::Gelu,
        K::GeluVjp,
        K::Swish,
        K::SwishVjp,
        K::AddScaled,
        K::Scaled,
        K::LayerNorm,
        K::LayerNormVjp,
        K::SplitQkv,
        K::SplitHeads,
        K::MergeHeads,
        K::MergeQkv,
        K::Softmax,
        K::SoftmaxVjp,
        K::Patchify,
        K::AssembleTokens,
        K::WindowPartition,
        K::PatchMerge,
        K::Dwconv,
        K::DwconvDx,
        K::DwconvDw,
        K::MeanTokens,
        K::MeanTokensVjp,
        K::SoftCrossEntropy,
        K::EvalStats,
        K::SumSquaresPartial,
        K::SumSquaresFinal,
        K::Adamw,
        K::AdamwFrom,
        K::Convert,
        K::AttnFused,
        K::AttnFusedDq,
        K::AttnFusedDkv,
    ];
    assert_eq!(all.len(), crate::KERNEL_NAMES.len());
    for (i, k) in all.iter().enumerate() {
        assert_eq!(*k as usize, i);
        // `SumSquaresPartial` is `dtl_sum_squares_partial`: compare without underscores.
        let name = crate::KERNEL_NAMES[i]
            .trim_start_matches("dtl_")
            .replace('_', "");
        let variant = format!("{k:?}").to_lowercase();
        let variant = match variant.as_str() {
            "softmax" => "softmaxrows".to_string(),
            "softmaxvjp" => "softmaxrowsvjp".to_string(),
            _ => variant,
        };
        assert_eq!(name, variant, "entry {i}");
    }
}

#[test]
fn bf16_rounding_storage_masks_and_f32_only_kernels() {
    // to nearest, ties to even, NaN kept quiet, overflow to infinity
    assert_eq!(bf16_bits(1.0), 0x3f80);
    assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even below
    assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, even above
    assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(bf16_bits(f32::MAX), 0x7f80);
    assert_eq!(bf16_bits(-0.0), 0x8000);
    assert!(f32_from_bf16(bf16_bits(f32::NAN)).is_nan());
    assert_eq!(f32_from_bf16(0xbf80), -1.0);
    // bit j for argument j, pointers only
    let args = [
        Arg::P(Dp::bf16(8)),
        Arg::I(3),
        Arg::P(Dp::f32(16)),
        Arg::P(Dp::bf16(24)),
    ];
    assert_eq!(storage_mask(&args), Arg::I(0b1001));
    assert_eq!(Dp::bf16(100).at(3).addr, 106);
    assert_eq!(Dp::f32(100).at(3).addr, 112);
    assert!(check_storage("op", "k", true, &args).is_ok());
    let e = check_storage("op", "k", false, &args)
        .unwrap_err()
        .to_string();
    assert!(e.contains("op: k") && e.contains("f32"), "{e}");
    assert!(check_storage("op", "k", false, &[Arg::P(Dp::f32(8))]).is_ok());
    // every kernel of kernels.cu takes the storage
    let flags = crate::nvrtc::takes_storage();
    for (i, name) in crate::KERNEL_NAMES.iter().enumerate() {
        if !name.starts_with("dtl_attn_fused") {
            assert!(flags[i], "{name} has no `int st` parameter");
        }
    }
}

#[test]
fn kept_memory_waits_for_the_last_graph() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static FREED: AtomicUsize = AtomicUsize::new(0);
    struct M;
    impl Drop for M {
        fn drop(&mut self) {
            FREED.fetch_add(1, Ordering::Relaxed);
        }
    }
    let keep = Keep::new();
    keep.drop_or_keep(M);
    assert_eq!(FREED.load(Ordering::Relaxed), 1);
    keep.hold();
    keep.hold();
    keep.drop_or_keep(M);
    keep.unhold();
    assert_eq!(FREED.load(Ordering::Relaxed), 1);
    keep.unhold();
    assert_eq!(FREED.load(Ordering::Relaxed), 2);
    keep.hold();
    keep.drop_or_keep(M);
    keep.clear();
    assert_eq!(FREED.load(Ordering::Relaxed), 3);
}

#[test]
fn launch_shapes_stay_within_cuda_limits() {
    let e = elementwise(1);
    assert_eq!((e.grid_dim.0, e.block_dim.0), (1, THREADS));
    assert_eq!(elementwise(usize::MAX / 2).grid_dim.0 as usize, MAX_BLOCKS);
    assert_eq!(elementwise(0).grid_dim.0, 1);
    assert_eq!(block_rows(10, 768).block_dim.0, 256);
    assert_eq!(block_rows(10, 5).block_dim.0, 32);
    assert_eq!(warp_rows(9).grid_dim.0, 3);
}

#[test]
fn attention_scratch_plan() {
    let s = AttnShape {
        batch: 2,
        tokens: 5,
        heads: 3,
        head_dim: 4,
    };
    let p = AttnPlan::new(&s).unwrap();
    assert_eq!(
        p,
        AttnPlan {
            slot: 120,
            probs: 150
        }
    );
    assert_eq!(p.total(), Some(4 * 120 + 2 * 150));
    assert_eq!(attention_scratch(s), 4 * 120 + 2 * 150);
    assert_eq!(p.offsets()[5], 4 * 120 + 150);
    let huge = AttnShape {
        batch: usize::MAX,
        tokens: 2,
        heads: 1,
        head_dim: 1,
    };
    assert_eq!(AttnPlan::new(&huge), None);
    assert_eq!(attention_scratch(huge), usize::MAX);
    let big = AttnShape {
        batch: 1 << 20,
        tokens: 197,
        heads: 12,
        head_dim: 64,
    };
    let e = attn_plan("attention", &big).unwrap_err().to_string();
    assert!(e.contains("32-bit"), "{e}");
}

#[test]
fn window_and_merge_shape_checks() {
    let s = WindowShape {
        batch: 2,
        grid: (8, 12),
        width: 5,
        window: (4, 3),
        shift: (2, 1),
    };
    assert_eq!(window_len("w", &s).unwrap(), 2 * 8 * 12 * 5);
    for (bad, part) in [
        (WindowShape { grid: (8, 10), ..s }, "whole number"),
        (WindowShape { shift: (4, 0), ..s }, "smaller"),
        (
            WindowShape {
                window: (4, 0),
                ..s
            },
            "side of 0",
        ),
    ] {
        let e = window_len("w", &bad).unwrap_err().to_string();
        assert!(e.contains("w: ") && e.contains(part), "{e}");
    }
    let big = WindowShape {
        batch: 1 << 20,
        grid: (56, 56),
        width: 96,
        window: (7, 7),
        shift: (3, 3),
    };
    assert!(window_len("w", &big)
        .unwrap_err()
        .to_string()
        .contains("32-bit"));
    let m = MergeShape {
        batch: 2,
        grid: (4, 6),
        width: 3,
    };
    assert_eq!(merge_len("m", &m).unwrap(), 2 * 4 * 6 * 3);
    let e = merge_len("m", &MergeShape { grid: (4, 5), ..m })
        .unwrap_err()
        .to_string();
    assert!(e.contains("4x5") && e.contains("odd"), "{e}");
}

#[test]
fn conv_shape_checks() {
    let s = ConvShape {
        batch: 2,
        prefix: 1,
        grid: (3, 4),
        width: 5,
        kernel: 4,
    };
    assert_eq!(conv_lens("c", &s).unwrap(), (2 * 13 * 5, 5 * 16));
    let e = conv_lens("c", &ConvShape { kernel: 0, ..s })
        .unwrap_err()
        .to_string();
    assert!(e.contains("kernel side is 0"), "{e}");
    assert!(token_range("m", 5, 1, 5).is_ok());
    assert!(token_range("m", 5, 2, 2).is_err());
    assert!(token_range("m", 5, 1, 6).is_err());
}
