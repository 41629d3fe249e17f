//! The opt-in profiler of [`crate::Gpu`] and [`crate::Emulator`]
//! ([`dtl_kernels::Kernels::profile_start`], [`dtl_kernels::Kernels::profile_take`]).
//!
//! While it is on, every kernel launch, matrix product and device copy is timed and kept
//! under a label: the GPU brackets it with a pair of CUDA events on its stream (read once, at
//! the end, so that profiling does not wait for the device after each launch), the emulator
//! reads the host clock around it. Labels are few: a kernel's name, a product's operation,
//! shape and storage, `copy`, `graph replay`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use dtl_core::Result;
use dtl_kernels::KernelProfile;

use crate::blas::Gemm;

/// The label of a matrix product: the operation that asked for it, its shape `m x n x k`
/// (and `x batch` when batched) and the storage of its inputs.
pub(crate) fn gemm_label(op: &str, g: &Gemm, bf16: bool) -> String {
    let storage = if bf16 { "bf16" } else { "f32" };
    if g.batch > 1 {
        format!("gemm {op} {}x{}x{} x{} {storage}", g.m, g.n, g.k, g.batch)
    } else {
        format!("gemm {op} {}x{}x{} {storage}", g.m, g.n, g.k)
    }
}

/// The label of device-to-device copies.
pub(crate) const COPY: &str = "copy";

/// The label of replays of recorded graphs (one entry per replay: a graph is timed whole).
pub(crate) const REPLAY: &str = "graph replay";

/// Why a capture records no graph while profiling (the [`dtl_kernels::Capture::Plain`] reason).
pub(crate) const NO_CAPTURE: &str =
    "not recorded: kernel profiling is on (events inside a graph capture time nothing)";

/// Why profiling cannot start while a graph is being recorded.
pub(crate) const NOT_WHILE_RECORDING: &str =
    "kernel profiling cannot start while a graph is being recorded (events inside a capture time nothing)";

/// The clock of a GPU's profile.
pub(crate) const EVENTS: &str = "cuda events";

/// The clock of the emulator's profile.
pub(crate) const HOST_CLOCK: &str = "host clock (emulator)";

/// One profiled span.
struct Session<P> {
    started: Instant,
    index: HashMap<String, usize>,
    labels: Vec<String>,
    /// The label (an index into `labels`) and the pending timing of each operation, in order.
    marks: Vec<(usize, P)>,
}

/// A profiler whose timings are of type `P` (a pair of events on a GPU, a time on the host),
/// off until [`Profiler::start`].
pub(crate) struct Profiler<P> {
    on: AtomicBool,
    session: Mutex<Option<Session<P>>>,
    /// Timings of an earlier span, reused so that a span seldom creates new ones.
    spare: Mutex<Vec<P>>,
}

impl<P> Profiler<P> {
    pub(crate) fn new() -> Profiler<P> {
        Profiler {
            on: AtomicBool::new(false),
            session: Mutex::new(None),
            spare: Mutex::new(Vec::new()),
        }
    }

    /// Whether a span is being profiled (cheap: one atomic load).
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Starts a span, dropping one under way.
    pub(crate) fn start(&self) {
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = s.take() {
            self.recycle(old.marks);
        }
        *s = Some(Session {
            started: Instant::now(),
            index: HashMap::new(),
            labels: Vec::new(),
            marks: Vec::new(),
        });
        self.on.store(true, Ordering::Release);
    }

    /// A timing left from an earlier span, if one is there.
    pub(crate) fn spare(&self) -> Option<P> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// Returns a timing that was taken but not used.
    pub(crate) fn give_back(&self, p: P) {
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).push(p);
    }

    fn recycle(&self, marks: Vec<(usize, P)>) {
        self.spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(marks.into_iter().map(|(_, p)| p));
    }

    /// Keeps the timing `p` of one operation under `label`; dropped when no span is on.
    pub(crate) fn push(&self, label: &str, p: P) {
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = s.as_mut() else { return };
        let at = match s.index.get(label) {
            Some(&i) => i,
            None => {
                let i = s.labels.len();
                s.index.insert(label.to_string(), i);
                s.labels.push(label.to_string());
                i
            }
        };
        s.marks.push((at, p));
    }

    /// Ends the span and sums each label's timings, read with `ms` (milliseconds); `None`
    /// when no span was on. The caller has waited for the device first, so that the wall
    /// time covers the work.
    pub(crate) fn finish(
        &self,
        clock: &str,
        mut ms: impl FnMut(&P) -> Result<f64>,
    ) -> Result<Option<KernelProfile>> {
        let session = {
            let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
            self.on.store(false, Ordering::Release);
            s.take()
        };
        let Some(s) = session else { return Ok(None) };
        let wall_ms = s.started.elapsed().as_secs_f64() * 1e3;
        let mut totals = vec![(0u64, 0f64); s.labels.len()];
        let mut failed = None;
        for (at, p) in &s.marks {
            match ms(p) {
                Ok(t) => {
                    totals[*at].0 += 1;
                    totals[*at].1 += t;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.recycle(s.marks);
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(Some(KernelProfile::from_totals(
            clock,
            wall_ms,
            s.labels
                .into_iter()
                .zip(totals)
                .map(|(label, (calls, total))| (label, calls, total)),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_records_nothing_and_a_span_sums_its_labels() {
        let p: Profiler<f64> = Profiler::new();
        assert!(!p.is_on());
        p.push("a", 1.0);
        assert_eq!(p.finish("host clock", |t| Ok(*t)).unwrap(), None);
        p.start();
        assert!(p.is_on());
        p.push("a", 1.0);
        p.push("b", 3.0);
        p.push("a", 2.0);
        let prof = p.finish("host clock", |t| Ok(*t)).unwrap().unwrap();
        assert!(!p.is_on());
        assert_eq!(prof.rows.len(), 2);
        assert_eq!((prof.rows[0].calls, prof.rows[0].total_ms), (2, 3.0));
        assert_eq!(prof.rows[0].label, "a");
        // the timings are kept for the next span
        assert!(p.spare().is_some());
        let err = {
            p.start();
            p.push("a", 1.0);
            p.finish("host clock", |_| {
                Err(dtl_core::DtlError::Device("unreadable".into()))
            })
        };
        assert!(err.is_err());
        assert!(!p.is_on());
    }

    #[test]
    fn product_labels_name_shape_and_storage() {
        let g = Gemm {
            trans_a: false,
            trans_b: true,
            m: 4,
            n: 5,
            k: 6,
            lda: 4,
            ldb: 5,
            ldc: 4,
            alpha: 1.0,
            beta: 0.0,
            batch: 3,
            stride_a: 24,
            stride_b: 30,
            stride_c: 20,
        };
        assert_eq!(
            gemm_label("attention", &g, true),
            "gemm attention 4x5x6 x3 bf16"
        );
        let one = Gemm { batch: 1, ..g };
        assert_eq!(gemm_label("linear", &one, false), "gemm linear 4x5x6 f32");
    }
}
