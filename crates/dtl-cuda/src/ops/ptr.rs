//! Device pointers and kernel arguments, the bf16 bits of a value, the checks shared by every
//! operation, and the memory a device keeps while graphs hold its pointers.

use dtl_core::choice::Precision;
use dtl_core::{DtlError, Result};

/// A device pointer and the storage of the values it points to (f32, or bf16 with `bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dp {
    pub addr: u64,
    pub bf16: bool,
}

impl Dp {
    /// A pointer to f32 values (or to anything that is not a buffer's values, or null).
    pub fn f32(addr: u64) -> Dp {
        Dp { addr, bf16: false }
    }

    /// A pointer to bf16 values.
    pub fn bf16(addr: u64) -> Dp {
        Dp { addr, bf16: true }
    }

    /// Bytes per value.
    pub fn elem(&self) -> usize {
        if self.bf16 {
            2
        } else {
            4
        }
    }

    /// The pointer `values` values further on.
    pub fn at(&self, values: usize) -> Dp {
        Dp {
            addr: self.addr + (values * self.elem()) as u64,
            ..*self
        }
    }
}

/// The pointer `bytes` bytes further on, in the same storage.
impl std::ops::Add<u64> for Dp {
    type Output = Dp;
    fn add(self, bytes: u64) -> Dp {
        Dp {
            addr: self.addr + bytes,
            ..self
        }
    }
}

/// A kernel argument: a device pointer (with its storage), an `int` or a `float`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Arg {
    P(Dp),
    I(i32),
    F(f32),
}

/// The last argument, `st`, of a kernel that takes one: bit `j` set when argument `j` points
/// to bf16 values.
pub(crate) fn storage_mask(args: &[Arg]) -> Arg {
    Arg::I(args.iter().enumerate().fold(0, |m, (j, a)| match a {
        Arg::P(p) if p.bf16 => m | 1 << j,
        _ => m,
    }))
}

/// Checks a launch's pointers against the kernel: one without an `st` parameter (`storage`
/// false) reads and writes f32 only, and is refused a bf16 buffer.
pub(crate) fn check_storage(op: &str, name: &str, storage: bool, args: &[Arg]) -> Result<()> {
    if !storage && args.iter().any(|a| matches!(a, Arg::P(p) if p.bf16)) {
        return Err(DtlError::argument(format!(
            "{op}: {name} takes f32 buffers only, and was given a bf16 one"
        )));
    }
    Ok(())
}

/// The memory of dropped buffers a device keeps while graphs (which hold raw device pointers)
/// exist: [`Keep::hold`] for each graph (and each recording under way), [`Keep::unhold`]
/// when it goes; memory dropped meanwhile is kept until the last one goes.
pub(crate) struct Keep<M> {
    state: std::sync::Mutex<(usize, Vec<M>)>,
}

impl<M> Keep<M> {
    pub fn new() -> Keep<M> {
        Keep {
            state: std::sync::Mutex::new((0, Vec::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Vec<M>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees `m` now, or keeps it while a graph exists.
    pub fn drop_or_keep(&self, m: M) {
        let mut s = self.lock();
        if s.0 > 0 {
            s.1.push(m);
        } else {
            drop(s);
            drop(m);
        }
    }

    /// One more graph holds pointers.
    pub fn hold(&self) {
        self.lock().0 += 1;
    }

    /// One graph fewer; after the last, the memory kept is freed (outside the lock).
    pub fn unhold(&self) {
        let freed = {
            let mut s = self.lock();
            s.0 = s.0.saturating_sub(1);
            if s.0 == 0 {
                std::mem::take(&mut s.1)
            } else {
                Vec::new()
            }
        };
        drop(freed);
    }

    /// Frees everything kept, whatever the graphs (the device is going).
    pub fn clear(&self) {
        let freed = {
            let mut s = self.lock();
            s.0 = 0;
            std::mem::take(&mut s.1)
        };
        drop(freed);
    }
}

/// `v` rounded to bf16 (to nearest, ties to even; a NaN stays a quiet NaN of the same sign),
/// as its 16 bits: what the kernels' `dtl_f32_to_bf16` computes.
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits (exact).
pub(crate) fn f32_from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The precision a device is opened at: `Auto` (which a caller resolves first) is bf16.
pub(crate) fn resolve(p: Precision) -> Precision {
    match p {
        Precision::Auto => Precision::Bf16,
        p => p,
    }
}

pub(crate) fn n32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        DtlError::argument(format!(
            "{op}: {what} = {v} exceeds the 32-bit range of the GPU kernels"
        ))
    })
}

pub(crate) fn invalid(op: &str, what: impl std::fmt::Display) -> DtlError {
    DtlError::invalid(format!("{op}: {what}"))
}
