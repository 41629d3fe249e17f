//! The kernel entry points and the launch shapes of the project's kernels.

use cudarc::driver::LaunchConfig;

/// Threads per block of the elementwise kernels.
pub(crate) const THREADS: u32 = 256;
/// Most blocks of an elementwise launch (grid-stride loops cover the rest).
pub(crate) const MAX_BLOCKS: usize = 1 << 16;
/// Warps per block of the one-warp-per-row kernels.
pub(crate) const ROW_WARPS: u32 = 4;
/// Partial sums of `sum_squares` (f64 each) a device keeps.
pub(crate) const PARTIALS: usize = 1024;

/// The kernel entry points, in the order of [`crate::KERNEL_NAMES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum K {
    Fill,
    Add,
    BiasRows,
    SumRows,
    Gelu,
    GeluVjp,
    Swish,
    SwishVjp,
    AddScaled,
    Scaled,
    LayerNorm,
    LayerNormVjp,
    SplitQkv,
    SplitHeads,
    MergeHeads,
    MergeQkv,
    Softmax,
    SoftmaxVjp,
    Patchify,
    AssembleTokens,
    WindowPartition,
    PatchMerge,
    Dwconv,
    DwconvDx,
    DwconvDw,
    MeanTokens,
    MeanTokensVjp,
    SoftCrossEntropy,
    EvalStats,
    SumSquaresPartial,
    SumSquaresFinal,
    Adamw,
    AdamwFrom,
    Convert,
    AttnFused,
    AttnFusedDq,
    AttnFusedDkv,
}

pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row; up to 256 threads, fewer for short rows.
pub(crate) fn block_rows(rows: usize, width: usize) -> LaunchConfig {
    let threads = width.div_ceil(32).clamp(1, 8) as u32 * 32;
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row.
pub(crate) fn warp_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROW_WARPS as usize) as u32, 1, 1),
        block_dim: (32 * ROW_WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn single_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
