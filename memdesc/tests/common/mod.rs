//! Helpers shared by the integration tests.

pub mod leak;
pub mod loom_atomics;
pub mod page_array;
pub mod seen;
