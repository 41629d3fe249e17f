//! Workspace integration tests live in .

/// The programmatic path of `docs/library.md`; its example runs as this crate's doc test.
#[doc = include_str!("../../docs/library.md")]
pub mod library {}
