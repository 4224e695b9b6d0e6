//! The virtio-balloon policy (docs/architecture.md, "The balloon"):
//! ballooned frames are Offline frames (frozen at zero, no descriptor, no
//! refcount), recorded in PFN arrays in frames of their own, unmapped from
//! the firmware's own map while the host has them.
//!
//! - [`BalloonDevice`] ([`device`]): what the policy needs from the device;
//!   the hal implements it over virtio-mmio, tests with a recording fake.
//! - [`BalloonEnv`] ([`env`](mod@env)): what it needs from the firmware: the frame
//!   allocator, unmap/map/refold of its own stage-1 map, frame memory.
//! - [`Balloon`] ([`policy`]): inflate/deflate towards `num_pages`, chunk
//!   preference, `actual`, stats, deflate-on-OOM, the floor, bad-device
//!   handling.
//! - [`PfnArray`] ([`pfn_array`]): the two-level le32 PFN arrays, which are
//!   also the inflate/deflate buffers.

pub mod device;
pub mod env;
pub mod error;
pub mod offline_ext;
pub mod pfn_array;
pub mod policy;
pub mod reporting;
pub mod stats;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
pub mod fake;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests;

pub use device::{
    feature, negotiate, queue_index, BalloonDevice, Buffer, DeviceError, Queue, Used,
};
pub use env::BalloonEnv;
pub use error::{BalloonError, Inconsistency};
pub use pfn_array::{PfnArray, PFNS_PER_FRAME};
pub use policy::{
    oom_shortfall, table_oom_shortfall, Balloon, BalloonConfig, Counters, Op, Status,
    MAX_PFNS_PER_DESC, PFNS_PER_CHAIN, TABLE_HEADROOM,
};
pub use reporting::{ReportCounters, Reporter, REPORT_ORDER, REPORT_PAGES};
