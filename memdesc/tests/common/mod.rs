//! Helpers shared by the integration tests.

pub mod loom_atomics;
