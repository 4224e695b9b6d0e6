//! The memory manager, arch-neutral and host-testable.
//!
//! Nothing here touches hardware: table memory, TLB maintenance and devices
//! reach this crate through small traits that the `hal` crate implements on
//! target and tests implement with recording fakes.
//!
//! The design, the invariants and the numbered stage-1 rules are in the
//! repository's `docs/architecture.md`; a comment that says "rule N" means
//! rule N of its "Stage-1 translation" section.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// Every public fallible function says when it fails (`# Errors`) and when
// it panics (`# Panics`).
#![warn(clippy::missing_errors_doc, clippy::missing_panics_doc)]

pub mod addr;
pub mod balloon;
pub mod frames;
pub mod layout;
pub mod stage1;
pub mod sync;

pub use addr::{Pfn, PhysAddr, VirtAddr, PAGE_SHIFT, PAGE_SIZE};
