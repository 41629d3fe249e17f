//! Workspace integration tests live in .
