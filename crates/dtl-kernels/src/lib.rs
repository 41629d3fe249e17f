//! The kernel set of dtl: the small set of device operations that a frozen backbone's blocks,
//! the side network, the head, the loss and the optimizer are written over, once, for every
//! device.
//!
//! - [`Kernels`]: the operations, over a device's own buffer type [`Kernels::Buf`]. The CPU
//!   implements them here ([`CpuKernels`]); a CUDA GPU in `dtl-cuda` (feature `cuda`).
//! - [`KernelBackbone`]: a frozen backbone written over [`Kernels`]: patch embedding, a block's
//!   forward and input-only VJP, the final norm and its VJP, on device buffers, with a
//!   workspace planned once per batch size (so that a training step allocates nothing).
//!
//! An algorithm written over the kernel set runs on every device that implements it, and is
//! tested on the CPU against the PyTorch reference; a device's kernels are tested against
//! their CPU twins.
//!
//! # Buffers
//!
//! Every operation is told the sizes it works on and reads and writes only that many leading
//! values of each buffer: a buffer may be longer than an operation needs (a workspace planned
//! for the largest batch serves a smaller last batch). A buffer shorter than an operation
//! needs is an error, never an out-of-bounds access. Matrices are row-major; a linear
//! layer's weight is PyTorch's `(out, in)`.
//!
//! ```
//! use dtl_kernels::{CpuKernels, Kernels};
//! let k = CpuKernels::new();
//! let x = k.upload_new(&[1.0, 2.0, 3.0, 4.0]).unwrap(); // 2 x 2
//! let w = k.upload_new(&[1.0, 0.0, 1.0, 1.0]).unwrap(); // (out 2, in 2)
//! let mut y = k.alloc(4).unwrap();
//! k.linear(&x, &w, None, 2, 2, 2, &mut y, false).unwrap();
//! assert_eq!(k.download(&y, 4).unwrap(), vec![1.0, 3.0, 3.0, 7.0]);
//! ```

#![warn(missing_docs)]
// Unsafe code lives in `cpu::strided` (the gemm call) and the SIMD dispatch of `cpu::ops` only.
#![deny(unsafe_code)]

use dtl_core::choice::Precision;
use dtl_core::{BackboneSpec, DropPath, DtlError, Result};

pub mod block;
pub mod cpu;
pub mod profile;

pub use cpu::{CpuBuf, CpuKernels};
pub use profile::{KernelProfile, ProfileRow};

/// Shapes of one multi-head self-attention call: `batch` samples of `tokens` tokens, `heads`
/// heads of `head_dim` channels (width `heads * head_dim`).
///
/// ```
/// let s = dtl_kernels::AttnShape { batch: 2, tokens: 5, heads: 3, head_dim: 4 };
/// assert_eq!(s.width(), 12);
/// assert_eq!(s.rows(), 10);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Samples.
    pub batch: usize,
    /// Tokens per sample.
    pub tokens: usize,
    /// Heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
}

impl AttnShape {
    /// Token width `heads * head_dim`.
    ///
    /// ```
    /// let s = dtl_kernels::AttnShape { batch: 1, tokens: 1, heads: 12, head_dim: 64 };
    /// assert_eq!(s.width(), 768);
    /// ```
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Token rows `batch * tokens`.
    ///
    /// ```
    /// let s = dtl_kernels::AttnShape { batch: 32, tokens: 197, heads: 12, head_dim: 64 };
    /// assert_eq!(s.rows(), 6304);
    /// ```
    pub fn rows(&self) -> usize {
        self.batch * self.tokens
    }
}

/// Shapes of a depthwise `k x k` "same" convolution over the patch tokens of a token tensor
/// `(batch, prefix + grid.0 * grid.1, width)`: one filter per channel, PyTorch's
/// `padding="same"` (for even `k`, `(k - 1) / 2` before and `k / 2` after), no bias; the
/// `prefix` tokens are copied through unconvolved.
///
/// ```
/// let s = dtl_kernels::ConvShape { batch: 1, prefix: 1, grid: (2, 3), width: 4, kernel: 3 };
/// assert_eq!(s.tokens(), 7);
/// assert_eq!(s.weights(), 4 * 9);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Samples.
    pub batch: usize,
    /// Tokens before the patch grid (a class token), passed through.
    pub prefix: usize,
    /// Patch grid (rows, columns).
    pub grid: (usize, usize),
    /// Channels.
    pub width: usize,
    /// Kernel side.
    pub kernel: usize,
}

impl ConvShape {
    /// Tokens per sample.
    ///
    /// ```
    /// let s = dtl_kernels::ConvShape { batch: 1, prefix: 1, grid: (14, 14), width: 768, kernel: 3 };
    /// assert_eq!(s.tokens(), 197);
    /// ```
    pub fn tokens(&self) -> usize {
        self.prefix + self.grid.0 * self.grid.1
    }

    /// Values of the weight `(width, 1, kernel, kernel)`.
    ///
    /// ```
    /// let s = dtl_kernels::ConvShape { batch: 1, prefix: 1, grid: (14, 14), width: 768, kernel: 4 };
    /// assert_eq!(s.weights(), 768 * 16);
    /// ```
    pub fn weights(&self) -> usize {
        self.width * self.kernel * self.kernel
    }
}

/// Shapes of a shifted-window partition of a token grid (Swin): `batch` samples of a
/// `grid.0 x grid.1` grid of `width` channels, rows row-major, no prefix tokens. The grid is
/// first rolled by `(-shift.0, -shift.1)` (PyTorch's `torch.roll(x, (-s0, -s1), (1, 2))`),
/// then cut into `window.0 x window.1` windows, ordered row-major over the windows and, inside
/// a window, row-major over its tokens: `(batch * windows, window.0 * window.1, width)`.
///
/// ```
/// let s = dtl_kernels::WindowShape { batch: 2, grid: (8, 8), width: 16, window: (4, 4), shift: (2, 2) };
/// assert_eq!(s.windows(), 4);
/// assert_eq!(s.window_tokens(), 16);
/// assert_eq!(s.len(), 2 * 64 * 16);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowShape {
    /// Samples.
    pub batch: usize,
    /// Token grid (rows, columns); each a multiple of the window's.
    pub grid: (usize, usize),
    /// Channels.
    pub width: usize,
    /// Window (rows, columns).
    pub window: (usize, usize),
    /// Cyclic shift (rows, columns), each smaller than the window's.
    pub shift: (usize, usize),
}

impl WindowShape {
    /// Windows per sample.
    pub fn windows(&self) -> usize {
        (self.grid.0 / self.window.0.max(1)) * (self.grid.1 / self.window.1.max(1))
    }

    /// Tokens per window.
    pub fn window_tokens(&self) -> usize {
        self.window.0 * self.window.1
    }

    /// Values of the whole tensor (the same before and after the partition).
    pub fn len(&self) -> usize {
        self.batch * self.grid.0 * self.grid.1 * self.width
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Shapes of a Swin patch merging: `batch` samples of a `grid.0 x grid.1` grid (both even) of
/// `width` channels become a `(grid.0 / 2) x (grid.1 / 2)` grid of `4 * width` channels, each
/// output token the concatenation of its 2 x 2 neighbours in the order (row, column) =
/// (0, 0), (1, 0), (0, 1), (1, 1) (timm's order).
///
/// ```
/// let s = dtl_kernels::MergeShape { batch: 1, grid: (4, 6), width: 8 };
/// assert_eq!(s.out_grid(), (2, 3));
/// assert_eq!(s.len(), 4 * 6 * 8);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeShape {
    /// Samples.
    pub batch: usize,
    /// Input grid (rows, columns), both even.
    pub grid: (usize, usize),
    /// Input channels.
    pub width: usize,
}

impl MergeShape {
    /// Output grid.
    pub fn out_grid(&self) -> (usize, usize) {
        (self.grid.0 / 2, self.grid.1 / 2)
    }

    /// Values of the input (the same as of the output).
    pub fn len(&self) -> usize {
        self.batch * self.grid.0 * self.grid.1 * self.width
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The hyper-parameters of one AdamW update of one tensor, PyTorch's `torch.optim.AdamW`
/// (`amsgrad = False`): `p *= 1 - lr * weight_decay`, `m = b1 m + (1 - b1) g`,
/// `v = b2 v + (1 - b2) g^2`, `p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)`, where
/// `step_size = lr / (1 - b1^t)` and `bc2_sqrt = sqrt(1 - b2^t)` (computed in f64 by the caller).
///
/// ```
/// let s = dtl_kernels::AdamwStep::new(1e-3, 0.9, 0.999, 1e-8, 0.05, 1);
/// assert!((s.step_size - 1e-2).abs() < 1e-9);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay of this tensor (0 for the no-decay group).
    pub weight_decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
}

impl AdamwStep {
    /// The update at step `t` (1 for the first), with the bias corrections in f64.
    ///
    /// ```
    /// let s = dtl_kernels::AdamwStep::new(1e-3, 0.9, 0.999, 1e-8, 0.0, 2);
    /// assert!((s.bc2_sqrt as f64 - (1.0f64 - 0.999f64.powi(2)).sqrt()).abs() < 1e-7);
    /// ```
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, t: u64) -> Self {
        let t = t.min(i32::MAX as u64) as i32;
        AdamwStep {
            lr: lr as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            step_size: (lr / (1.0 - beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
        }
    }

    /// Values per entry of a buffer of step scalars ([`Kernels::adamw_from`]).
    ///
    /// ```
    /// assert_eq!(dtl_kernels::AdamwStep::SCALARS, 7);
    /// ```
    pub const SCALARS: usize = 7;

    /// The update as one entry of a buffer of step scalars ([`Kernels::adamw_from`]): `lr`,
    /// `weight_decay`, `step_size`, `bc2_sqrt`, `beta1`, `beta2`, `eps`, in that order.
    ///
    /// ```
    /// let s = dtl_kernels::AdamwStep::new(1e-3, 0.9, 0.999, 1e-8, 0.05, 1);
    /// assert_eq!(s.scalars()[1], 0.05);
    /// assert_eq!(dtl_kernels::AdamwStep::from_scalars(&s.scalars()), Some(s));
    /// ```
    pub fn scalars(&self) -> [f32; Self::SCALARS] {
        [
            self.lr,
            self.weight_decay,
            self.step_size,
            self.bc2_sqrt,
            self.beta1,
            self.beta2,
            self.eps,
        ]
    }

    /// The update an entry of step scalars holds (the inverse of [`AdamwStep::scalars`]);
    /// `None` when `entry` holds fewer than [`AdamwStep::SCALARS`] values.
    ///
    /// ```
    /// use dtl_kernels::AdamwStep;
    /// assert!(AdamwStep::from_scalars(&[0.1; 3]).is_none());
    /// assert_eq!(AdamwStep::from_scalars(&[0.1; 7]).unwrap().eps, 0.1);
    /// ```
    pub fn from_scalars(entry: &[f32]) -> Option<Self> {
        match *entry {
            [lr, weight_decay, step_size, bc2_sqrt, beta1, beta2, eps, ..] => Some(AdamwStep {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                step_size,
                bc2_sqrt,
            }),
            _ => None,
        }
    }
}

/// A graph recorded by [`Kernels::capture`], named by the device that holds it.
///
/// ```
/// let g = dtl_kernels::GraphId(3);
/// assert_eq!(g.0, 3);
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct GraphId(pub u64);

/// What [`Kernels::capture`] did with the work it ran.
///
/// ```
/// let c = dtl_kernels::Capture::Plain("the CPU does not record graphs".into());
/// assert!(c.reason().is_some());
/// ```
#[derive(Debug, PartialEq, Eq)]
pub enum Capture {
    /// Recorded: [`Kernels::replay`] issues it again.
    Graph(GraphId),
    /// Ran as plain operations and was not recorded, for the reason given.
    Plain(String),
}

impl Capture {
    /// Why the work was not recorded, if it was not.
    ///
    /// ```
    /// let c = dtl_kernels::Capture::Graph(dtl_kernels::GraphId(1));
    /// assert_eq!(c.reason(), None);
    /// ```
    pub fn reason(&self) -> Option<&str> {
        match self {
            Capture::Graph(_) => None,
            Capture::Plain(r) => Some(r),
        }
    }
}

/// What a device says about its memory, in bytes.
///
/// ```
/// let m = dtl_kernels::MemoryStats { live: 10, peak: 20, driver_used: None };
/// assert_eq!(m.peak_mib(), 20.0 / 1048576.0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryStats {
    /// Bytes held by live buffers (and the device's fixed workspaces) now.
    pub live: u64,
    /// The most `live` has been since the device was opened or [`Kernels::reset_peak`].
    pub peak: u64,
    /// The driver's used memory minus what it was when the device was opened, if known.
    pub driver_used: Option<u64>,
}

impl MemoryStats {
    /// `peak` in MiB.
    ///
    /// ```
    /// let m = dtl_kernels::MemoryStats { live: 0, peak: 3 << 20, driver_used: None };
    /// assert_eq!(m.peak_mib(), 3.0);
    /// ```
    pub fn peak_mib(&self) -> f64 {
        self.peak as f64 / (1u64 << 20) as f64
    }
}

/// The device operations dtl's algorithms are written over.
///
/// Each operation is told its sizes and touches only that many leading values of each buffer
/// (see the crate docs); a buffer too short for the sizes is an error. Operations may run
/// asynchronously on a device: they are ordered with each other, and [`Kernels::download`]
/// waits for everything queued before it. Every reduction accumulates in f32 or wider.
///
/// Parameters named `accumulate` add into the output instead of overwriting it.
///
/// A device implements every operation; an algorithm over `K: Kernels` is then written once.
/// [`CpuKernels`] is the reference the other devices are tested against.
///
/// ```
/// use dtl_kernels::{CpuKernels, Kernels};
/// // one algorithm, any device: y = gelu(x) + x
/// fn gelu_res<K: Kernels>(k: &K, x: &K::Buf, n: usize, y: &mut K::Buf) -> dtl_core::Result<()> {
///     k.gelu(x, n, y)?;
///     k.add(y, x, n)
/// }
/// let k = CpuKernels::new();
/// let x = k.upload_new(&[0.0, 1.0]).unwrap();
/// let mut y = k.alloc(2).unwrap();
/// gelu_res(&k, &x, 2, &mut y).unwrap();
/// let v = k.download(&y, 2).unwrap();
/// assert!((v[1] - 1.841_344_7).abs() < 1e-5);
/// ```
#[allow(clippy::too_many_arguments)]
pub trait Kernels: Send + Sync + 'static {
    /// A buffer of `f32` values in this device's memory.
    type Buf: Send + Sync + 'static;

    /// The device in words (`"cpu"`, `"cuda:0 (NVIDIA H200)"`).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// assert!(k.describe().starts_with("cpu"));
    /// ```
    fn describe(&self) -> String;

    // ---- memory -------------------------------------------------------------------------

    /// A zero-filled buffer of `len` values.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// assert_eq!(k.download(&k.alloc(3).unwrap(), 3).unwrap(), vec![0.0; 3]);
    /// ```
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// Number of values `buf` holds.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// assert_eq!(k.len(&k.alloc(3).unwrap()), 3);
    /// ```
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Copies `host` into the leading values of `dst`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let mut b = k.alloc(3).unwrap();
    /// k.upload(&[1.0, 2.0], &mut b).unwrap();
    /// assert_eq!(k.download(&b, 3).unwrap(), vec![1.0, 2.0, 0.0]);
    /// ```
    fn upload(&self, host: &[f32], dst: &mut Self::Buf) -> Result<()>;
    /// A new buffer holding `host`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// assert_eq!(k.len(&k.upload_new(&[1.0, 2.0]).unwrap()), 2);
    /// ```
    fn upload_new(&self, host: &[f32]) -> Result<Self::Buf> {
        let mut b = self.alloc(host.len())?;
        self.upload(host, &mut b)?;
        Ok(b)
    }
    /// The leading `len` values of `src` on the host (waits for queued work).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let b = k.upload_new(&[1.0, 2.0, 3.0]).unwrap();
    /// assert_eq!(k.download(&b, 2).unwrap(), vec![1.0, 2.0]);
    /// ```
    fn download(&self, src: &Self::Buf, len: usize) -> Result<Vec<f32>>;
    /// `dst[..len] = src[..len]`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let a = k.upload_new(&[1.0, 2.0]).unwrap();
    /// let mut b = k.alloc(2).unwrap();
    /// k.copy(&a, &mut b, 1).unwrap();
    /// assert_eq!(k.download(&b, 2).unwrap(), vec![1.0, 0.0]);
    /// ```
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf, len: usize) -> Result<()>;
    /// `dst[..len] = value`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let mut b = k.alloc(3).unwrap();
    /// k.fill(&mut b, 2, 7.0).unwrap();
    /// assert_eq!(k.download(&b, 3).unwrap(), vec![7.0, 7.0, 0.0]);
    /// ```
    fn fill(&self, dst: &mut Self::Buf, len: usize, value: f32) -> Result<()>;
    /// `y[..len] += x[..len]`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let mut y = k.upload_new(&[1.0, 2.0]).unwrap();
    /// k.add(&mut y, &k.upload_new(&[3.0, 4.0]).unwrap(), 2).unwrap();
    /// assert_eq!(k.download(&y, 2).unwrap(), vec![4.0, 6.0]);
    /// ```
    fn add(&self, y: &mut Self::Buf, x: &Self::Buf, len: usize) -> Result<()>;
    /// Waits until every queued operation has finished.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// k.synchronize().unwrap();
    /// ```
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Memory held by this device's buffers, when the device tracks it.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// if let Some(m) = k.memory() {
    ///     assert!(m.peak >= m.live);
    /// }
    /// ```
    fn memory(&self) -> Option<MemoryStats> {
        None
    }
    /// Starts a new peak of [`MemoryStats::peak`] from the memory live now.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// k.reset_peak();
    /// ```
    fn reset_peak(&self) {}

    // ---- precision ----------------------------------------------------------------------

    /// The precision this device stores activations and frozen weights at: `F32` unless the
    /// device was opened for bf16 (a GPU only). Parameters, gradients, optimizer state and
    /// every reduction stay f32 whatever this says.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// assert_eq!(CpuKernels::new().precision(), dtl_core::choice::Precision::F32);
    /// ```
    fn precision(&self) -> Precision {
        Precision::F32
    }
    /// A zero-filled buffer of `len` activations (a backbone block's inputs and internals,
    /// and their gradients), stored at [`Kernels::precision`]. The operations read and write
    /// it as any other buffer; [`Kernels::upload`] and [`Kernels::download`] convert.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// assert_eq!(k.download(&k.alloc_act(2).unwrap(), 2).unwrap(), vec![0.0; 2]);
    /// ```
    fn alloc_act(&self, len: usize) -> Result<Self::Buf> {
        self.alloc(len)
    }
    /// A new buffer holding frozen weights `host`, stored at [`Kernels::precision`] (so in
    /// bf16 mode they are rounded to bf16 once, at upload).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let w = k.upload_frozen(&[0.5, 1.0]).unwrap();
    /// assert_eq!(k.download(&w, 2).unwrap(), vec![0.5, 1.0]);
    /// ```
    fn upload_frozen(&self, host: &[f32]) -> Result<Self::Buf> {
        self.upload_new(host)
    }

    // ---- graphs -------------------------------------------------------------------------

    /// Runs `work` once and, on a device that can, records the operations it issues into a
    /// graph that [`Kernels::replay`] issues again with one launch (CUDA graphs). The work must
    /// be a fixed sequence: no allocation, no download, the same buffers and sizes every time;
    /// what changes between replays must live in device buffers (written with
    /// [`Kernels::upload`] before the replay). A device without graphs, or work that cannot
    /// be recorded, returns [`Capture::Plain`] with the reason, after running the work as plain
    /// operations.
    ///
    /// ```
    /// use dtl_kernels::{Capture, CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let mut y = k.alloc(2).unwrap();
    /// let c = k.capture(&mut || k.fill(&mut y, 2, 1.0)).unwrap();
    /// assert!(matches!(c, Capture::Plain(_)));
    /// assert_eq!(k.download(&y, 2).unwrap(), vec![1.0; 2]);
    /// ```
    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Capture> {
        work()?;
        Ok(Capture::Plain(format!(
            "{} does not record graphs",
            self.describe()
        )))
    }
    /// Issues the operations recorded by [`Kernels::capture`] again.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, GraphId, Kernels};
    /// let k = CpuKernels::new();
    /// assert!(k.replay(&GraphId(0)).is_err());
    /// ```
    fn replay(&self, graph: &GraphId) -> Result<()> {
        Err(DtlError::Device(format!(
            "{}: no recorded graph {}",
            self.describe(),
            graph.0
        )))
    }
    /// Frees a graph recorded by [`Kernels::capture`] (replaying it afterwards is an error).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, GraphId, Kernels};
    /// CpuKernels::new().release(GraphId(0));
    /// ```
    fn release(&self, graph: GraphId) {
        let _ = graph;
    }

    // ---- profiling ----------------------------------------------------------------------

    /// Starts timing every operation issued from now on (each kernel launch, matrix product
    /// and device copy), keyed by a label, until [`Kernels::profile_take`]; a profile already
    /// running starts afresh. While profiling, [`Kernels::capture`] records no graph (events
    /// inside a recording time nothing): the work runs as plain operations, and the
    /// [`Capture::Plain`] reason says so. Devices without a profiler (the CPU) refuse.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let e = CpuKernels::new().profile_start().unwrap_err().to_string();
    /// assert!(e.contains("CUDA device"), "{e}");
    /// ```
    fn profile_start(&self) -> Result<()> {
        Err(DtlError::Device(format!(
            "{}: kernel profiling needs a CUDA device (run.device = \"cuda:N\") or the CUDA emulator",
            self.describe()
        )))
    }
    /// Stops profiling and returns the profile of the span since [`Kernels::profile_start`]
    /// (after waiting for the work to finish), or `None` when no profile was running or the
    /// device has no profiler.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// assert_eq!(CpuKernels::new().profile_take().unwrap(), None);
    /// ```
    fn profile_take(&self) -> Result<Option<KernelProfile>> {
        Ok(None)
    }

    // ---- products -----------------------------------------------------------------------

    /// `y (m x n) [+]= x (m x k) w^T [+ bias]`, `w` is `(n, k)`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// // y = x w^T + b: x (1 x 2), w (3 x 2)
    /// let x = k.upload_new(&[1.0, 2.0]).unwrap();
    /// let w = k.upload_new(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]).unwrap();
    /// let b = k.upload_new(&[0.5; 3]).unwrap();
    /// let mut y = k.alloc(3).unwrap();
    /// k.linear(&x, &w, Some(&b), 1, 2, 3, &mut y, false).unwrap();
    /// assert_eq!(k.download(&y, 3).unwrap(), vec![1.5, 2.5, 3.5]);
    /// ```
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        m: usize,
        k: usize,
        n: usize,
        y: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// The input gradient of [`Kernels::linear`]: `dx (m x k) [+]= dy (m x n) w`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let dy = k.upload_new(&[1.0, 1.0, 1.0]).unwrap();
    /// let w = k.upload_new(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]).unwrap();
    /// let mut dx = k.alloc(2).unwrap();
    /// k.linear_vjp(&dy, &w, 1, 2, 3, &mut dx, false).unwrap();
    /// assert_eq!(k.download(&dx, 2).unwrap(), vec![2.0, 2.0]);
    /// ```
    fn linear_vjp(
        &self,
        dy: &Self::Buf,
        w: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// The weight gradient of [`Kernels::linear`]: `dw (n x k) [+]= dy^T (n x m) x (m x k)`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let dy = k.upload_new(&[1.0, 2.0]).unwrap(); // (1 x 2)
    /// let x = k.upload_new(&[3.0]).unwrap(); // (1 x 1)
    /// let mut dw = k.alloc(2).unwrap();
    /// k.linear_wgrad(&dy, &x, 1, 1, 2, &mut dw, false).unwrap();
    /// assert_eq!(k.download(&dw, 2).unwrap(), vec![3.0, 6.0]);
    /// ```
    fn linear_wgrad(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        dw: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// The bias gradient: `db (n) [+]= sum over the m rows of dy (m x n)`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let dy = k.upload_new(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let mut db = k.alloc(2).unwrap();
    /// k.sum_rows(&dy, 2, 2, &mut db, false).unwrap();
    /// assert_eq!(k.download(&db, 2).unwrap(), vec![4.0, 6.0]);
    /// ```
    fn sum_rows(
        &self,
        dy: &Self::Buf,
        m: usize,
        n: usize,
        db: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;

    // ---- transformer blocks -------------------------------------------------------------

    /// Row-wise LayerNorm of `x (rows x d)` with weight `gamma` and bias `beta` into `y`
    /// (statistics in f32, biased variance).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let x = k.upload_new(&[1.0, 3.0]).unwrap();
    /// let (g, b) = (k.upload_new(&[1.0, 1.0]).unwrap(), k.upload_new(&[0.0, 0.0]).unwrap());
    /// let mut y = k.alloc(2).unwrap();
    /// k.layer_norm(&x, &g, &b, 1, 2, 0.0, &mut y).unwrap();
    /// assert_eq!(k.download(&y, 2).unwrap(), vec![-1.0, 1.0]);
    /// ```
    fn layer_norm(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        rows: usize,
        d: usize,
        eps: f32,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Input-only VJP of [`Kernels::layer_norm`]: `dx [+]= dLN(x)/dx^T dy`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// // a constant gradient through a unit-weight LayerNorm vanishes
    /// let x = k.upload_new(&[1.0, 3.0]).unwrap();
    /// let g = k.upload_new(&[1.0, 1.0]).unwrap();
    /// let mut dx = k.alloc(2).unwrap();
    /// k.layer_norm_vjp(&x, &g, &g, 1, 2, 0.0, &mut dx, false).unwrap();
    /// assert_eq!(k.download(&dx, 2).unwrap(), vec![0.0, 0.0]);
    /// ```
    fn layer_norm_vjp(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        dy: &Self::Buf,
        rows: usize,
        d: usize,
        eps: f32,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// `y = gelu(x)` (the erf GELU) over `len` values.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let x = k.upload_new(&[0.0, 1.0]).unwrap();
    /// let mut y = k.alloc(2).unwrap();
    /// k.gelu(&x, 2, &mut y).unwrap();
    /// assert!((k.download(&y, 2).unwrap()[1] - 0.841_344_7).abs() < 1e-6);
    /// ```
    fn gelu(&self, x: &Self::Buf, len: usize, y: &mut Self::Buf) -> Result<()>;
    /// `g *= gelu'(u)` over `len` values: turns the gradient of `gelu(u)` into that of `u`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let u = k.upload_new(&[0.0]).unwrap();
    /// let mut g = k.upload_new(&[2.0]).unwrap();
    /// k.gelu_vjp(&u, 1, &mut g).unwrap();
    /// assert_eq!(k.download(&g, 1).unwrap(), vec![1.0]); // gelu'(0) = 1/2
    /// ```
    fn gelu_vjp(&self, u: &Self::Buf, len: usize, g: &mut Self::Buf) -> Result<()>;
    /// Multi-head self-attention core on the fused `qkv (rows x 3 width)` buffer (timm's
    /// `[q | k | v]`, each split into heads): `out (rows x width)`, head `h` of sample `b` is
    /// `softmax(q k^T / sqrt(head_dim)) v`. `scratch` holds at least
    /// [`Kernels::attention_scratch`] values.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels, AttnShape};
    /// let k = CpuKernels::new();
    /// // one token per sample: the output is its value vector
    /// let s = AttnShape { batch: 1, tokens: 1, heads: 1, head_dim: 2 };
    /// let qkv = k.upload_new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    /// let (mut out, mut scratch) = (k.alloc(2).unwrap(), k.alloc(k.attention_scratch(s)).unwrap());
    /// k.attention(&qkv, s, &mut out, &mut scratch).unwrap();
    /// assert_eq!(k.download(&out, 2).unwrap(), vec![5.0, 6.0]);
    /// ```
    fn attention(
        &self,
        qkv: &Self::Buf,
        shape: AttnShape,
        out: &mut Self::Buf,
        scratch: &mut Self::Buf,
    ) -> Result<()>;
    /// Input-only VJP of [`Kernels::attention`]: `dqkv` (overwritten) from the gradient of the
    /// output, the probabilities recomputed.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels, AttnShape};
    /// let k = CpuKernels::new();
    /// let s = AttnShape { batch: 1, tokens: 1, heads: 1, head_dim: 2 };
    /// let qkv = k.upload_new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    /// let dout = k.upload_new(&[1.0, -1.0]).unwrap();
    /// let (mut dqkv, mut scratch) = (k.alloc(6).unwrap(), k.alloc(k.attention_scratch(s)).unwrap());
    /// k.attention_vjp(&qkv, &dout, s, &mut dqkv, &mut scratch).unwrap();
    /// assert_eq!(k.download(&dqkv, 6).unwrap(), vec![0.0, 0.0, 0.0, 0.0, 1.0, -1.0]);
    /// ```
    fn attention_vjp(
        &self,
        qkv: &Self::Buf,
        dout: &Self::Buf,
        shape: AttnShape,
        dqkv: &mut Self::Buf,
        scratch: &mut Self::Buf,
    ) -> Result<()>;
    /// Values of the scratch buffer [`Kernels::attention`] and [`Kernels::attention_vjp`]
    /// need for `shape` (0 when the device needs none).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels, AttnShape};
    /// let k = CpuKernels::new();
    /// let s = AttnShape { batch: 2, tokens: 197, heads: 12, head_dim: 64 };
    /// let scratch = k.alloc(k.attention_scratch(s)).unwrap();
    /// ```
    fn attention_scratch(&self, shape: AttnShape) -> usize;
    /// Values of the attention probabilities [`Kernels::attention_keeping`] keeps for
    /// `shape`, 0 where the device keeps none (the default: then
    /// [`Kernels::attention_vjp_kept`] recomputes them, as [`Kernels::attention_vjp`] does).
    /// A backbone that keeps its blocks' internals can reserve this much more per block.
    ///
    /// ```
    /// use dtl_kernels::{AttnShape, CpuKernels, Kernels};
    /// let s = AttnShape { batch: 2, tokens: 5, heads: 3, head_dim: 4 };
    /// assert_eq!(CpuKernels::attention_probs_len(s), 2 * 3 * 5 * 5);
    /// ```
    fn attention_probs_len(_shape: AttnShape) -> usize
    where
        Self: Sized,
    {
        0
    }
    /// [`Kernels::attention`], also writing the probabilities to `probs` from value `at` on
    /// ([`Kernels::attention_probs_len`] values, nothing where that is 0) for
    /// [`Kernels::attention_vjp_kept`]. The output is that of [`Kernels::attention`]. The
    /// default keeps nothing.
    ///
    /// ```
    /// use dtl_kernels::{AttnShape, CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let s = AttnShape { batch: 1, tokens: 1, heads: 1, head_dim: 2 };
    /// let qkv = k.upload_new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    /// let (mut out, mut scratch) = (k.alloc(2).unwrap(), k.alloc(k.attention_scratch(s)).unwrap());
    /// let mut probs = k.alloc(3).unwrap();
    /// k.attention_keeping(&qkv, s, &mut out, &mut scratch, &mut probs, 2).unwrap();
    /// assert_eq!(k.download(&out, 2).unwrap(), vec![5.0, 6.0]);
    /// assert_eq!(k.download(&probs, 3).unwrap(), vec![0.0, 0.0, 1.0]);
    /// ```
    fn attention_keeping(
        &self,
        qkv: &Self::Buf,
        shape: AttnShape,
        out: &mut Self::Buf,
        scratch: &mut Self::Buf,
        probs: &mut Self::Buf,
        at: usize,
    ) -> Result<()> {
        let _ = (probs, at);
        self.attention(qkv, shape, out, scratch)
    }
    /// [`Kernels::attention_vjp`] with the probabilities [`Kernels::attention_keeping`] wrote
    /// to `probs` from value `at` on: the same gradient, without recomputing them. The default
    /// (for devices that keep none) recomputes them.
    ///
    /// ```
    /// use dtl_kernels::{AttnShape, CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let s = AttnShape { batch: 1, tokens: 2, heads: 1, head_dim: 1 };
    /// let qkv = k.upload_new(&[1.0, 0.5, 2.0, -1.0, 0.3, 4.0]).unwrap();
    /// let dout = k.upload_new(&[1.0, 2.0]).unwrap();
    /// let mut scratch = k.alloc(k.attention_scratch(s)).unwrap();
    /// let (mut out, mut probs) = (k.alloc(2).unwrap(), k.alloc(4).unwrap());
    /// k.attention_keeping(&qkv, s, &mut out, &mut scratch, &mut probs, 0).unwrap();
    /// let (mut kept, mut again) = (k.alloc(6).unwrap(), k.alloc(6).unwrap());
    /// k.attention_vjp_kept(&qkv, &probs, 0, &dout, s, &mut kept, &mut scratch).unwrap();
    /// k.attention_vjp(&qkv, &dout, s, &mut again, &mut scratch).unwrap();
    /// assert_eq!(k.download(&kept, 6).unwrap(), k.download(&again, 6).unwrap());
    /// ```
    #[allow(clippy::too_many_arguments)]
    fn attention_vjp_kept(
        &self,
        qkv: &Self::Buf,
        probs: &Self::Buf,
        at: usize,
        dout: &Self::Buf,
        shape: AttnShape,
        dqkv: &mut Self::Buf,
        scratch: &mut Self::Buf,
    ) -> Result<()> {
        let _ = (probs, at);
        self.attention_vjp(qkv, dout, shape, dqkv, scratch)
    }
    /// `x[b] += s[b] * branch[b]` for each of `batch` samples of `per_sample` values; no
    /// `scales` means 1 for every sample (residual with drop path).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let mut x = k.upload_new(&[1.0, 1.0]).unwrap();
    /// let branch = k.upload_new(&[1.0, 2.0]).unwrap();
    /// let scales = k.upload_new(&[0.0, 2.0]).unwrap(); // sample 0 dropped
    /// k.add_scaled(&mut x, &branch, 2, 1, Some(&scales)).unwrap();
    /// assert_eq!(k.download(&x, 2).unwrap(), vec![1.0, 5.0]);
    /// ```
    fn add_scaled(
        &self,
        x: &mut Self::Buf,
        branch: &Self::Buf,
        batch: usize,
        per_sample: usize,
        scales: Option<&Self::Buf>,
    ) -> Result<()>;
    /// `out[b] = s[b] * g[b]` (no `scales`: a copy).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let g = k.upload_new(&[1.0, 2.0]).unwrap();
    /// let scales = k.upload_new(&[0.0, 2.0]).unwrap();
    /// let mut out = k.alloc(2).unwrap();
    /// k.scaled(&g, 2, 1, Some(&scales), &mut out).unwrap();
    /// assert_eq!(k.download(&out, 2).unwrap(), vec![0.0, 4.0]);
    /// ```
    fn scaled(
        &self,
        g: &Self::Buf,
        batch: usize,
        per_sample: usize,
        scales: Option<&Self::Buf>,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// im2col of a patch embedding: `images (batch, channels, size, size)` to
    /// `cols (batch * (size / patch)^2, channels * patch * patch)`, one row per patch in
    /// row-major grid order, columns in `(channel, row, column)` order (a conv weight's).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// // one 1-channel 2x2 image in 1x1 patches: one value per row
    /// let img = k.upload_new(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let mut cols = k.alloc(4).unwrap();
    /// k.patchify(&img, 1, 1, 2, 1, &mut cols).unwrap();
    /// assert_eq!(k.download(&cols, 4).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    /// ```
    fn patchify(
        &self,
        images: &Self::Buf,
        batch: usize,
        channels: usize,
        size: usize,
        patch: usize,
        cols: &mut Self::Buf,
    ) -> Result<()>;
    /// Token assembly: `out (batch, prefix + patches, d)` where token `t < prefix` is
    /// `prefix_tokens[t] + pos[t]` and token `prefix + j` is `patches[b, j] + pos[prefix + j]`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// // width 1: a class token 10, two patches 5 and 6, position embedding 1, 2, 3
    /// let (p, c) = (k.upload_new(&[5.0, 6.0]).unwrap(), k.upload_new(&[10.0]).unwrap());
    /// let pos = k.upload_new(&[1.0, 2.0, 3.0]).unwrap();
    /// let mut out = k.alloc(3).unwrap();
    /// k.assemble_tokens(&p, &c, &pos, 1, 1, 2, 1, &mut out).unwrap();
    /// assert_eq!(k.download(&out, 3).unwrap(), vec![11.0, 7.0, 9.0]);
    /// ```
    fn assemble_tokens(
        &self,
        patches: &Self::Buf,
        prefix_tokens: &Self::Buf,
        pos: &Self::Buf,
        batch: usize,
        prefix: usize,
        patches_per_sample: usize,
        d: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    // ---- side network, pooling, loss ----------------------------------------------------

    /// `y = z * sigmoid(beta * z)` over `len` values.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let z = k.upload_new(&[0.0, 1.0]).unwrap();
    /// let mut y = k.alloc(2).unwrap();
    /// k.swish(&z, 2, 100.0, &mut y).unwrap();
    /// assert_eq!(k.download(&y, 2).unwrap(), vec![0.0, 1.0]);
    /// ```
    fn swish(&self, z: &Self::Buf, len: usize, beta: f32, y: &mut Self::Buf) -> Result<()>;
    /// The gradient of [`Kernels::swish`] with respect to `z`: `dz [+]= dy * swish'(z)`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let z = k.upload_new(&[0.0]).unwrap();
    /// let dy = k.upload_new(&[2.0]).unwrap();
    /// let mut dz = k.alloc(1).unwrap();
    /// k.swish_vjp(&z, &dy, 1, 3.0, &mut dz, false).unwrap();
    /// assert_eq!(k.download(&dz, 1).unwrap(), vec![1.0]); // swish'(0) = 1/2
    /// ```
    fn swish_vjp(
        &self,
        z: &Self::Buf,
        dy: &Self::Buf,
        len: usize,
        beta: f32,
        dz: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// Depthwise "same" convolution of the patch tokens of `x`, prefix tokens copied (see
    /// [`ConvShape`]); `w` is `(width, 1, k, k)`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels, ConvShape};
    /// let k = CpuKernels::new();
    /// // a 3x3 kernel whose centre tap is 1 is the identity
    /// let s = ConvShape { batch: 1, prefix: 1, grid: (2, 2), width: 1, kernel: 3 };
    /// let mut w = [0.0f32; 9];
    /// w[4] = 1.0;
    /// let x = k.upload_new(&[7.0, 1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let mut y = k.alloc(5).unwrap();
    /// k.depthwise_conv(&x, &k.upload_new(&w).unwrap(), s, &mut y).unwrap();
    /// assert_eq!(k.download(&y, 5).unwrap(), vec![7.0, 1.0, 2.0, 3.0, 4.0]);
    /// ```
    fn depthwise_conv(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        shape: ConvShape,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Both gradients of [`Kernels::depthwise_conv`]: `dx` (overwritten; the prefix tokens'
    /// gradient passes through) and `dw [+]= ...`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels, ConvShape};
    /// let k = CpuKernels::new();
    /// // a 1x1 kernel of 2: dx = 2 dy on the patches, dw = sum(x dy) over them
    /// let s = ConvShape { batch: 1, prefix: 1, grid: (1, 2), width: 1, kernel: 1 };
    /// let (x, w) = (k.upload_new(&[5.0, 1.0, 2.0]).unwrap(), k.upload_new(&[2.0]).unwrap());
    /// let dy = k.upload_new(&[1.0, 1.0, 3.0]).unwrap();
    /// let (mut dx, mut dw) = (k.alloc(3).unwrap(), k.alloc(1).unwrap());
    /// k.depthwise_conv_vjp(&x, &w, &dy, s, &mut dx, &mut dw, false).unwrap();
    /// assert_eq!(k.download(&dx, 3).unwrap(), vec![1.0, 2.0, 6.0]);
    /// assert_eq!(k.download(&dw, 1).unwrap(), vec![7.0]);
    /// ```
    fn depthwise_conv_vjp(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        shape: ConvShape,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        accumulate_dw: bool,
    ) -> Result<()>;
    /// `out (batch, d)`: the mean of tokens `from..to` of `x (batch, tokens, d)`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// // the patch tokens 1..3 of one sample of width 1
    /// let x = k.upload_new(&[9.0, 1.0, 3.0]).unwrap();
    /// let mut m = k.alloc(1).unwrap();
    /// k.mean_tokens(&x, 1, 3, 1, 1, 3, &mut m).unwrap();
    /// assert_eq!(k.download(&m, 1).unwrap(), vec![2.0]);
    /// ```
    fn mean_tokens(
        &self,
        x: &Self::Buf,
        batch: usize,
        tokens: usize,
        d: usize,
        from: usize,
        to: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// The VJP of [`Kernels::mean_tokens`]: `dx (batch, tokens, d)` (overwritten) holds
    /// `g / (to - from)` at tokens `from..to` and zero elsewhere.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let g = k.upload_new(&[4.0]).unwrap();
    /// let mut dx = k.alloc(3).unwrap();
    /// k.mean_tokens_vjp(&g, 1, 3, 1, 1, 3, &mut dx).unwrap();
    /// assert_eq!(k.download(&dx, 3).unwrap(), vec![0.0, 2.0, 2.0]);
    /// ```
    fn mean_tokens_vjp(
        &self,
        g: &Self::Buf,
        batch: usize,
        tokens: usize,
        d: usize,
        from: usize,
        to: usize,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// Soft-target cross entropy of `logits (batch x classes)` against `targets` (same
    /// shape): `loss[0] = -sum(t * log_softmax(l)) / batch` and
    /// `grad = (softmax(l) * sum(t) - t) / batch`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let l = k.upload_new(&[0.0, 0.0]).unwrap();
    /// let t = k.upload_new(&[1.0, 0.0]).unwrap();
    /// let (mut loss, mut grad) = (k.alloc(1).unwrap(), k.alloc(2).unwrap());
    /// k.soft_cross_entropy(&l, &t, 1, 2, &mut loss, &mut grad).unwrap();
    /// assert!((k.download(&loss, 1).unwrap()[0] - std::f32::consts::LN_2).abs() < 1e-6);
    /// assert_eq!(k.download(&grad, 2).unwrap(), vec![-0.5, 0.5]);
    /// ```
    fn soft_cross_entropy(
        &self,
        logits: &Self::Buf,
        targets: &Self::Buf,
        batch: usize,
        classes: usize,
        loss: &mut Self::Buf,
        grad: &mut Self::Buf,
    ) -> Result<()>;
    /// Evaluation counts, accumulated into `stats[0..4]`: top-1 hits, top-5 hits, the sum of
    /// the cross entropy against the hard labels, and the number of rows whose logits are not
    /// all finite. `labels` holds class indices as `f32`; a label outside `0..classes` is
    /// counted as neither hit and its loss as infinite.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// // two rows of 2 classes, both labelled 1: a top-1 hit and a top-5 hit only
    /// let l = k.upload_new(&[1.0, 3.0, 2.0, 0.0]).unwrap();
    /// let labels = k.upload_new(&[1.0, 1.0]).unwrap();
    /// let mut stats = k.alloc(4).unwrap();
    /// k.eval_stats(&l, &labels, 2, 2, &mut stats).unwrap();
    /// let s = k.download(&stats, 4).unwrap();
    /// assert_eq!((s[0], s[1], s[3]), (1.0, 2.0, 0.0));
    /// ```
    fn eval_stats(
        &self,
        logits: &Self::Buf,
        labels: &Self::Buf,
        batch: usize,
        classes: usize,
        stats: &mut Self::Buf,
    ) -> Result<()>;

    // ---- optimizer ----------------------------------------------------------------------

    /// `acc[0] += sum(x[..len]^2)`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let x = k.upload_new(&[3.0, 4.0]).unwrap();
    /// let mut acc = k.upload_new(&[1.0]).unwrap();
    /// k.sum_squares(&x, 2, &mut acc).unwrap();
    /// assert_eq!(k.download(&acc, 1).unwrap(), vec![26.0]);
    /// ```
    fn sum_squares(&self, x: &Self::Buf, len: usize, acc: &mut Self::Buf) -> Result<()>;
    /// One AdamW update of `len` values of `param` with gradient `grad` and moments `m`, `v`
    /// (see [`AdamwStep`]). With `clip = Some((sq, max_norm))`, where `sq[0]` is the squared
    /// norm of all gradients, the gradient is first multiplied by PyTorch's
    /// `clip_grad_norm_` factor `min(1, max_norm / (sqrt(sq[0]) + 1e-6))`.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels, AdamwStep};
    /// let k = CpuKernels::new();
    /// let step = AdamwStep::new(0.1, 0.9, 0.999, 1e-8, 0.0, 1);
    /// let mut p = k.upload_new(&[1.0]).unwrap();
    /// let g = k.upload_new(&[0.5]).unwrap();
    /// let (mut m, mut v) = (k.alloc(1).unwrap(), k.alloc(1).unwrap());
    /// k.adamw(&mut p, &g, &mut m, &mut v, 1, &step, None).unwrap();
    /// assert!((k.download(&p, 1).unwrap()[0] - 0.9).abs() < 1e-6); // the first step moves by lr
    /// ```
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        len: usize,
        step: &AdamwStep,
        clip: Option<(&Self::Buf, f32)>,
    ) -> Result<()>;
    /// [`Kernels::adamw`] with the step's scalars read from the device: entry `index` of
    /// `scalars`, which holds [`AdamwStep::SCALARS`] values per entry (entry `i` at
    /// `scalars[i * SCALARS..]`, laid out as [`AdamwStep::scalars`]). The result is that of
    /// [`Kernels::adamw`] with [`AdamwStep::from_scalars`] of the entry, bit for bit. Because
    /// the scalars are device values, a graph recorded with [`Kernels::capture`] follows what
    /// [`Kernels::upload`] writes into `scalars` before each [`Kernels::replay`] (a learning-rate
    /// schedule, the step count of the bias corrections). The default downloads the entry and
    /// calls [`Kernels::adamw`]; a device that records graphs reads it in its kernel.
    ///
    /// ```
    /// use dtl_kernels::{AdamwStep, CpuKernels, Kernels};
    /// let k = CpuKernels::new();
    /// let steps = [AdamwStep::new(0.1, 0.9, 0.999, 1e-8, 0.0, 1), AdamwStep::new(0.2, 0.9, 0.999, 1e-8, 0.0, 1)];
    /// let scalars = k.upload_new(&steps.iter().flat_map(|s| s.scalars()).collect::<Vec<_>>()).unwrap();
    /// let mut p = k.upload_new(&[1.0]).unwrap();
    /// let g = k.upload_new(&[0.5]).unwrap();
    /// let (mut m, mut v) = (k.alloc(1).unwrap(), k.alloc(1).unwrap());
    /// k.adamw_from(&mut p, &g, &mut m, &mut v, 1, &scalars, 1, None).unwrap();
    /// let got = k.download(&p, 1).unwrap()[0];
    /// assert!((got - 0.8).abs() < 1e-5, "{got}"); // entry 1: lr 0.2
    /// assert!(k.adamw_from(&mut p, &g, &mut m, &mut v, 1, &scalars, 2, None).is_err());
    /// ```
    fn adamw_from(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        len: usize,
        scalars: &Self::Buf,
        index: usize,
        clip: Option<(&Self::Buf, f32)>,
    ) -> Result<()> {
        let need = adamw_scalars_len(self.len(scalars), index)?;
        let host = self.download(scalars, need)?;
        let step = AdamwStep::from_scalars(&host[need - AdamwStep::SCALARS..])
            .ok_or_else(|| DtlError::shape("adamw_from: the step scalars are incomplete"))?;
        self.adamw(param, grad, m, v, len, &step, clip)
    }

    /// [`Kernels::attention`] with an additive bias on the scores before the softmax:
    /// `bias` holds `groups x heads x tokens x tokens` values and sample `b` of the batch uses
    /// group `b % groups` (Swin: the relative-position bias, plus the shifted-window mask with
    /// one group per window). `scratch` as for [`Kernels::attention`].
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels, AttnShape};
    /// let k = CpuKernels::new();
    /// // two tokens, one head: a large bias on the second key picks its value vector
    /// let s = AttnShape { batch: 1, tokens: 2, heads: 1, head_dim: 1 };
    /// let qkv = k.upload_new(&[0.0, 0.0, 0.0, 1.0, 1.0, 2.0]).unwrap(); // rows [q k v]
    /// let bias = k.upload_new(&[0.0, 50.0, 0.0, 50.0]).unwrap();
    /// let (mut out, mut scratch) = (k.alloc(2).unwrap(), k.alloc(k.attention_scratch(s)).unwrap());
    /// k.attention_bias(&qkv, s, &bias, 1, &mut out, &mut scratch).unwrap();
    /// let o = k.download(&out, 2).unwrap();
    /// assert!((o[0] - 2.0).abs() < 1e-6 && (o[1] - 2.0).abs() < 1e-6);
    /// ```
    fn attention_bias(
        &self,
        qkv: &Self::Buf,
        shape: AttnShape,
        bias: &Self::Buf,
        groups: usize,
        out: &mut Self::Buf,
        scratch: &mut Self::Buf,
    ) -> Result<()>;
    /// Input-only VJP of [`Kernels::attention_bias`] (`dqkv` overwritten; the bias is constant).
    #[allow(clippy::too_many_arguments)]
    fn attention_bias_vjp(
        &self,
        qkv: &Self::Buf,
        dout: &Self::Buf,
        shape: AttnShape,
        bias: &Self::Buf,
        groups: usize,
        dqkv: &mut Self::Buf,
        scratch: &mut Self::Buf,
    ) -> Result<()>;
    /// Rolls a token grid and cuts it into windows (see [`WindowShape`]); `out` gets
    /// [`WindowShape::len`] values. Its VJP is [`Kernels::window_merge`].
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels, WindowShape};
    /// let k = CpuKernels::new();
    /// // a 2 x 4 grid of one channel, two 2 x 2 windows, no shift
    /// let s = WindowShape { batch: 1, grid: (2, 4), width: 1, window: (2, 2), shift: (0, 0) };
    /// let x = k.upload_new(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]).unwrap();
    /// let (mut w, mut back) = (k.alloc(8).unwrap(), k.alloc(8).unwrap());
    /// k.window_partition(&x, s, &mut w).unwrap();
    /// assert_eq!(k.download(&w, 8).unwrap(), vec![0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
    /// k.window_merge(&w, s, &mut back).unwrap();
    /// assert_eq!(k.download(&back, 8).unwrap(), k.download(&x, 8).unwrap());
    /// ```
    fn window_partition(
        &self,
        x: &Self::Buf,
        shape: WindowShape,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// The inverse of [`Kernels::window_partition`]: windows back into the grid, then the roll
    /// undone. Its VJP is [`Kernels::window_partition`].
    fn window_merge(&self, x: &Self::Buf, shape: WindowShape, out: &mut Self::Buf) -> Result<()>;
    /// Gathers each 2 x 2 neighbourhood into one token of four times the width (see
    /// [`MergeShape`]); the LayerNorm and the reduction that follow are separate calls.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, Kernels, MergeShape};
    /// let k = CpuKernels::new();
    /// // a 2 x 2 grid of one channel becomes one token of four: (0,0), (1,0), (0,1), (1,1)
    /// let s = MergeShape { batch: 1, grid: (2, 2), width: 1 };
    /// let x = k.upload_new(&[0.0, 1.0, 2.0, 3.0]).unwrap();
    /// let mut y = k.alloc(4).unwrap();
    /// k.patch_merge(&x, s, &mut y).unwrap();
    /// assert_eq!(k.download(&y, 4).unwrap(), vec![0.0, 2.0, 1.0, 3.0]);
    /// ```
    fn patch_merge(&self, x: &Self::Buf, shape: MergeShape, out: &mut Self::Buf) -> Result<()>;
    /// VJP (and inverse) of [`Kernels::patch_merge`]: `dx` (overwritten) from `dy`.
    fn patch_merge_vjp(&self, dy: &Self::Buf, shape: MergeShape, dx: &mut Self::Buf) -> Result<()>;
}

/// Per-sample stochastic-depth scales of one block on a device (see [`DropPath`]).
///
/// ```
/// use dtl_kernels::{CpuKernels, DropScales};
/// let k = CpuKernels::new();
/// let s = DropScales::alloc(&k, 4).unwrap();
/// assert_eq!(s.mlp.len(), 4);
/// ```
pub struct DropScales<K: Kernels> {
    /// Scale of the attention branch per sample.
    pub attn: K::Buf,
    /// Scale of the MLP branch per sample.
    pub mlp: K::Buf,
}

impl<K: Kernels> DropScales<K> {
    /// Buffers for `batch` samples (zeros).
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, DropScales, Kernels};
    /// let k = CpuKernels::new();
    /// let s = DropScales::alloc(&k, 2).unwrap();
    /// assert_eq!(k.download(&s.attn, 2).unwrap(), vec![0.0, 0.0]);
    /// ```
    pub fn alloc(k: &K, batch: usize) -> Result<Self> {
        Ok(DropScales {
            attn: k.alloc(batch)?,
            mlp: k.alloc(batch)?,
        })
    }

    /// Copies the scales of `drop` in.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, DropScales, Kernels};
    /// let k = CpuKernels::new();
    /// let mut s = DropScales::alloc(&k, 2).unwrap();
    /// let d = dtl_core::DropPath { attn: vec![0.0, 2.0], mlp: vec![2.0, 2.0] };
    /// s.set(&k, &d).unwrap();
    /// assert_eq!(k.download(&s.attn, 2).unwrap(), vec![0.0, 2.0]);
    /// ```
    pub fn set(&mut self, k: &K, drop: &DropPath) -> Result<()> {
        k.upload(&drop.attn, &mut self.attn)?;
        k.upload(&drop.mlp, &mut self.mlp)
    }
}

/// A frozen backbone written over the kernel set: every part of its forward and its
/// input-only VJPs on device buffers, so that a training step never leaves the device.
///
/// Activations are `(batch, tokens, width)` row-major with the spec's token count and width;
/// images `(batch, channels, size, size)`, normalised. The [`KernelBackbone::Workspace`] is
/// planned once for a largest batch and reused by every call with that many samples or fewer.
/// A block's VJP recomputes the block's internals from its input; no weight gradient is ever
/// formed. A backbone may also keep a block's internals from the forward pass
/// ([`KernelBackbone::saved_lens`], [`KernelBackbone::block_forward_saving`]) so that its VJP
/// recomputes nothing ([`KernelBackbone::block_vjp_saved`]); by default it keeps nothing.
///
/// ```
/// use dtl_core::BackboneSpec;
/// use dtl_kernels::{CpuKernels, KernelBackbone, Kernels};
/// /// Blocks that double their input; its norm is the identity.
/// struct Doubler(BackboneSpec);
/// impl<K: Kernels> KernelBackbone<K> for Doubler {
///     type Workspace = ();
///     fn spec(&self) -> &BackboneSpec { &self.0 }
///     fn workspace(&self, _k: &K, _batch: usize) -> dtl_core::Result<()> { Ok(()) }
///     fn embed(&self, k: &K, _ws: &mut (), _images: &K::Buf, batch: usize, out: &mut K::Buf) -> dtl_core::Result<()> {
///         k.fill(out, batch * 2 * 4, 1.0)
///     }
///     fn block_forward(&self, k: &K, _ws: &mut (), _i: usize, x: &K::Buf, batch: usize,
///         _drop: Option<&dtl_kernels::DropScales<K>>, out: &mut K::Buf) -> dtl_core::Result<()> {
///         k.copy(x, out, batch * 8)?;
///         k.add(out, x, batch * 8)
///     }
///     fn block_vjp(&self, k: &K, _ws: &mut (), _i: usize, _x: &K::Buf, dy: &K::Buf, batch: usize,
///         _drop: Option<&dtl_kernels::DropScales<K>>, dx: &mut K::Buf) -> dtl_core::Result<()> {
///         k.copy(dy, dx, batch * 8)?;
///         k.add(dx, dy, batch * 8)
///     }
///     fn norm_forward(&self, k: &K, x: &K::Buf, rows: usize, out: &mut K::Buf) -> dtl_core::Result<()> {
///         k.copy(x, out, rows * 4)
///     }
///     fn norm_vjp(&self, k: &K, _x: &K::Buf, dy: &K::Buf, rows: usize, dx: &mut K::Buf) -> dtl_core::Result<()> {
///         k.copy(dy, dx, rows * 4)
///     }
/// }
/// let spec = BackboneSpec { grid: (1, 1), ..BackboneSpec::vit("doubler", 8, 8, 4, 1, 1) }.single_stage();
/// let k = CpuKernels::new();
/// let bb = Doubler(spec);
/// let mut ws = KernelBackbone::<CpuKernels>::workspace(&bb, &k, 1).unwrap();
/// let images = k.alloc(3 * 8 * 8).unwrap();
/// let (mut x, mut y) = (k.alloc(8).unwrap(), k.alloc(8).unwrap());
/// bb.embed(&k, &mut ws, &images, 1, &mut x).unwrap();
/// bb.block_forward(&k, &mut ws, 0, &x, 1, None, &mut y).unwrap();
/// assert_eq!(k.download(&y, 8).unwrap(), vec![2.0; 8]);
/// ```
#[allow(clippy::too_many_arguments)]
pub trait KernelBackbone<K: Kernels>: Send + Sync + 'static {
    /// Scratch buffers of the blocks, planned for one largest batch.
    type Workspace: Send;

    /// The variant's numbers.
    fn spec(&self) -> &BackboneSpec;
    /// Plans the scratch buffers for batches of up to `batch` samples.
    fn workspace(&self, k: &K, batch: usize) -> Result<Self::Workspace>;
    /// Patch embedding, prefix tokens and position embedding: `x_0` into `out`.
    fn embed(
        &self,
        k: &K,
        ws: &mut Self::Workspace,
        images: &K::Buf,
        batch: usize,
        out: &mut K::Buf,
    ) -> Result<()>;
    /// `out = Block_i(x)`; `drop` holds the stochastic-depth scales in training.
    fn block_forward(
        &self,
        k: &K,
        ws: &mut Self::Workspace,
        block: usize,
        x: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        out: &mut K::Buf,
    ) -> Result<()>;
    /// `dx` (overwritten): the gradient with respect to the block input `x` given `dy`, the
    /// gradient of the block output; internals recomputed from `x`.
    fn block_vjp(
        &self,
        k: &K,
        ws: &mut Self::Workspace,
        block: usize,
        x: &K::Buf,
        dy: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        dx: &mut K::Buf,
    ) -> Result<()>;
    /// The lengths of the buffers of a block's internals that
    /// [`KernelBackbone::block_forward_saving`] keeps for [`KernelBackbone::block_vjp_saved`],
    /// for batches of up to `batch` samples (the caller plans one set per block it saves).
    /// Empty (the default): the backbone keeps nothing and its VJP always recomputes.
    fn saved_lens(&self, batch: usize) -> Result<Vec<usize>> {
        let _ = batch;
        Ok(Vec::new())
    }
    /// [`KernelBackbone::block_forward`], also writing the block's internals into `saved`
    /// (buffers of [`KernelBackbone::saved_lens`]). The default keeps nothing.
    fn block_forward_saving(
        &self,
        k: &K,
        ws: &mut Self::Workspace,
        block: usize,
        x: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        out: &mut K::Buf,
        saved: &mut [K::Buf],
    ) -> Result<()> {
        let _ = saved;
        self.block_forward(k, ws, block, x, batch, drop, out)
    }
    /// [`KernelBackbone::block_vjp`] from the internals that
    /// [`KernelBackbone::block_forward_saving`] kept in `saved` (same block, input, batch and
    /// drop scales), recomputing nothing. The default recomputes.
    fn block_vjp_saved(
        &self,
        k: &K,
        ws: &mut Self::Workspace,
        block: usize,
        x: &K::Buf,
        dy: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        saved: &[K::Buf],
        dx: &mut K::Buf,
    ) -> Result<()> {
        let _ = saved;
        self.block_vjp(k, ws, block, x, dy, batch, drop, dx)
    }
    /// The transition into stage `stage` (at least 1) of a hierarchical backbone (Swin's patch
    /// merging): `out` gets the stage's input tokens from `x`, the output of the stage before.
    /// Called only for the stages after the first of [`BackboneSpec::stages`]; a single-stage
    /// backbone keeps the default, which refuses.
    fn stage_forward(
        &self,
        k: &K,
        ws: &mut Self::Workspace,
        stage: usize,
        x: &K::Buf,
        batch: usize,
        out: &mut K::Buf,
    ) -> Result<()> {
        let _ = (k, ws, x, batch, out);
        Err(DtlError::argument(format!(
            "backbone `{}` has a single stage; it has no transition into stage {stage}",
            self.spec().name
        )))
    }
    /// Input-only VJP of [`KernelBackbone::stage_forward`]: `dx` (overwritten, the shape of the
    /// previous stage's output) from `dy`, given the transition's input `x`.
    fn stage_vjp(
        &self,
        k: &K,
        ws: &mut Self::Workspace,
        stage: usize,
        x: &K::Buf,
        dy: &K::Buf,
        batch: usize,
        dx: &mut K::Buf,
    ) -> Result<()> {
        let _ = (k, ws, x, dy, batch, dx);
        Err(DtlError::argument(format!(
            "backbone `{}` has a single stage; it has no transition into stage {stage}",
            self.spec().name
        )))
    }
    /// The final norm on `rows` rows of the width.
    fn norm_forward(&self, k: &K, x: &K::Buf, rows: usize, out: &mut K::Buf) -> Result<()>;
    /// Input-only VJP of the final norm (`dx` overwritten).
    fn norm_vjp(&self, k: &K, x: &K::Buf, dy: &K::Buf, rows: usize, dx: &mut K::Buf) -> Result<()>;
}

/// Checks that a buffer of `got` values holds the `want` an operation needs.
///
/// ```
/// assert!(dtl_kernels::check_len("gelu", "x", 4, 4).is_ok());
/// let e = dtl_kernels::check_len("gelu", "x", 3, 4).unwrap_err().to_string();
/// assert!(e.contains("`x`") && e.contains("4"));
/// ```
pub fn check_len(op: &str, name: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        Err(DtlError::buffer_len(op, name, got, want))
    } else {
        Ok(())
    }
}

/// The values of a buffer of step scalars ([`Kernels::adamw_from`]) up to the end of entry
/// `index`, after checking that a buffer of `have` values holds them.
///
/// ```
/// assert_eq!(dtl_kernels::adamw_scalars_len(14, 1).unwrap(), 14);
/// let e = dtl_kernels::adamw_scalars_len(14, 2).unwrap_err().to_string();
/// assert!(e.contains("entry 2") && e.contains("21"), "{e}");
/// ```
pub fn adamw_scalars_len(have: usize, index: usize) -> Result<usize> {
    let need = index
        .checked_add(1)
        .and_then(|e| e.checked_mul(AdamwStep::SCALARS));
    match need {
        Some(need) if need <= have => Ok(need),
        _ => Err(DtlError::shape(format!(
            "adamw_from: buffer `scalars` holds {have} values ({} entries of {}), entry {index} \
             needs {}",
            have / AdamwStep::SCALARS,
            AdamwStep::SCALARS,
            need.map_or_else(|| "more than fit in memory".to_string(), |n| n.to_string())
        ))),
    }
}

/// `a * b * ...` with overflow reported as an error naming `what`.
///
/// ```
/// assert_eq!(dtl_kernels::checked_product("tokens", &[2, 3, 4]).unwrap(), 24);
/// assert!(dtl_kernels::checked_product("tokens", &[usize::MAX, 2]).is_err());
/// ```
pub fn checked_product(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            DtlError::shape(format!(
                "{what}: the sizes {dims:?} overflow when multiplied"
            ))
        })
}
