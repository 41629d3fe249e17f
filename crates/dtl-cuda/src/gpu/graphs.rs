//! CUDA graphs: the recording of a [`Gpu`]'s work, the graphs it keeps, their replay and
//! release.

use std::collections::HashMap;

use cudarc::driver::{sys as dsys, CudaGraph};
use dtl_core::{DtlError, Result};
use dtl_kernels::{Capture, GraphId};

use crate::profile;

use super::{driver_text, drv_err, Gpu};

/// A recorded graph; used under the device's lock only.
pub(super) struct Graph(pub(super) CudaGraph);
// SAFETY: the graph is only reached under the `graphs` mutex of its device, one thread at a
// time, as the driver requires.
unsafe impl Send for Graph {}

/// The graphs of a device and the state of a recording.
#[derive(Default)]
pub(super) struct Graphs {
    pub(super) map: HashMap<u64, Graph>,
    pub(super) next: u64,
}

/// Whether a recording is under way and, if something broke it, why.
#[derive(Default)]
pub(super) struct Recording {
    pub(super) active: bool,
    pub(super) broken: Option<String>,
}

impl Gpu {
    /// Refuses `op` while a graph is being recorded (it would not be part of the graph, or
    /// cannot be), and marks the recording as broken.
    pub(super) fn not_recording(&self, op: &str) -> Result<()> {
        let mut r = self
            .inner
            .recording
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !r.active {
            return Ok(());
        }
        let why = format!("{op} while recording a graph");
        r.broken.get_or_insert_with(|| why.clone());
        Err(DtlError::Device(format!(
            "cuda:{}: {why} is not possible",
            self.inner.ordinal
        )))
    }

    /// Records `work` as a CUDA graph and runs it once ([`Kernels::capture`]); the work runs
    /// uncaptured, and the reason is returned, when the recording fails or the profiler is on.
    ///
    /// [`Kernels::capture`]: dtl_kernels::Kernels::capture
    pub(super) fn capture_graph(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Capture> {
        const OP: &str = "capture";
        self.bind(OP)?;
        if self.inner.profiler.is_on() {
            work()?;
            return Ok(Capture::Plain(profile::NO_CAPTURE.to_string()));
        }
        {
            let mut r = self
                .inner
                .recording
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if r.active {
                return Err(DtlError::Device(format!(
                    "cuda:{}: capture inside a capture",
                    self.inner.ordinal
                )));
            }
            *r = Recording {
                active: true,
                broken: None,
            };
        }
        // buffers dropped from here on are kept: the graph may hold their pointers
        self.inner.keep.hold();
        let stream = &self.inner.stream;
        let recorded: std::result::Result<CudaGraph, String> = match stream
            .begin_capture(dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            Err(e) => Err(format!("beginning the capture: {}", driver_text(e))),
            Ok(()) => {
                let ran = work();
                // the capture always ends, whatever happened in the work
                let ended = stream.end_capture(dsys::CUgraphInstantiate_flags(0));
                let broken = self
                    .inner
                    .recording
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .broken
                    .take();
                match (broken, ran, ended) {
                    (Some(why), _, _) => Err(why),
                    (None, Err(e), _) => Err(e.to_string()),
                    (None, Ok(()), Err(e)) => {
                        Err(format!("ending the capture: {}", driver_text(e)))
                    }
                    (None, Ok(()), Ok(None)) => Err("the capture recorded nothing".to_string()),
                    (None, Ok(()), Ok(Some(g))) => Ok(g),
                }
            }
        };
        self.inner
            .recording
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .active = false;
        match recorded {
            Ok(graph) => {
                // during the capture nothing ran: run it once now
                if let Err(e) = graph.launch() {
                    drop(graph);
                    self.inner.keep.unhold();
                    return Err(drv_err(
                        &format!("cuda:{}: launching a recorded graph", self.inner.ordinal),
                        e,
                    ));
                }
                let mut g = self.inner.graphs.lock().unwrap_or_else(|p| p.into_inner());
                g.next += 1;
                let id = g.next;
                g.map.insert(id, Graph(graph));
                Ok(Capture::Graph(GraphId(id)))
            }
            Err(reason) => {
                self.inner.keep.unhold();
                work()?;
                Ok(Capture::Plain(reason))
            }
        }
    }

    /// Runs recorded graph `graph` again ([`Kernels::replay`]).
    ///
    /// [`Kernels::replay`]: dtl_kernels::Kernels::replay
    pub(super) fn replay_graph(&self, graph: &GraphId) -> Result<()> {
        let g = self.inner.graphs.lock().unwrap_or_else(|p| p.into_inner());
        let found = g.map.get(&graph.0).ok_or_else(|| {
            DtlError::Device(format!(
                "cuda:{}: no recorded graph {} (released, or made by another device)",
                self.inner.ordinal, graph.0
            ))
        })?;
        self.timed(
            "replay",
            |_| Some(profile::REPLAY.to_string()),
            || {
                found.0.launch().map_err(|e| {
                    drv_err(
                        &format!("cuda:{}: replaying graph {}", self.inner.ordinal, graph.0),
                        e,
                    )
                })
            },
        )
    }

    /// Frees recorded graph `graph` and what was kept for it ([`Kernels::release`]).
    ///
    /// [`Kernels::release`]: dtl_kernels::Kernels::release
    pub(super) fn release_graph(&self, graph: GraphId) {
        let removed = self
            .inner
            .graphs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .remove(&graph.0);
        if let Some(g) = removed {
            // an executable graph still running is freed by the driver when it completes; the
            // memory kept for it is freed in stream order, after it
            let _ = self.bind("release");
            drop(g);
            self.inner.keep.unhold();
        }
    }
}
