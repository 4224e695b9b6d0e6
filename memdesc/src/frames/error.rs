//! Typed errors of the page array and the frame allocator.
//!
//! Bad caller input (a PFN outside the array, a wrong order, freeing something
//! that is not that allocation) is always one of these, never a panic.

use super::word::{FrameType, ReservedKind};
use crate::addr::Pfn;
use core::fmt;

/// Why a page array could not be laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// More ranges than [`MAX_RANGES`](super::MAX_RANGES).
    TooManyRanges {
        /// Ranges given.
        given: usize,
    },
    /// A range with `end < start`.
    BadRange {
        /// Its start.
        start: Pfn,
        /// Its end.
        end: Pfn,
    },
    /// Two ranges overlap.
    Overlap {
        /// Where the second one starts.
        at: Pfn,
    },
    /// More frames than one array can link ([`MAX_FRAMES`](super::MAX_FRAMES)).
    TooManyFrames {
        /// Frames the ranges cover.
        frames: u64,
    },
    /// A range reaches [`PFN_LIMIT`](super::PFN_LIMIT) or beyond: its PFNs
    /// would not fit a folio descriptor.
    PfnTooHigh {
        /// The range's end.
        end: Pfn,
    },
    /// The storage handed in has fewer words than the ranges need.
    StorageTooSmall {
        /// Words needed.
        needed: u64,
        /// Words given.
        given: u64,
    },
}

/// Why a frame operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// No free block of (at least) this order with the requested alignment.
    OutOfMemory {
        /// Order asked for.
        order: u8,
    },
    /// A descriptor cache could not grow.
    OutOfDescriptors {
        /// Type whose descriptor was needed.
        ty: FrameType,
    },
    /// Order above [`MAX_ORDER`](super::MAX_ORDER).
    InvalidOrder {
        /// Order asked for.
        order: u8,
    },
    /// The PFN is not described by the page array.
    NotManaged {
        /// The PFN.
        pfn: Pfn,
    },
    /// The PFN is not aligned to the order of the operation.
    Misaligned {
        /// The PFN.
        pfn: Pfn,
        /// The order.
        order: u8,
    },
    /// The frame is free (owned by the buddy allocator).
    Free {
        /// The PFN.
        pfn: Pfn,
    },
    /// The frame is a folio whose refcount is frozen at 0.
    Frozen {
        /// The PFN.
        pfn: Pfn,
    },
    /// The frame is offline.
    Offline {
        /// The PFN.
        pfn: Pfn,
    },
    /// The frame is hardware-poisoned.
    HwPoisoned {
        /// The PFN.
        pfn: Pfn,
    },
    /// The frame has another type than the operation needs.
    WrongType {
        /// The PFN.
        pfn: Pfn,
        /// What it is.
        found: FrameType,
    },
    /// The frames are not exactly one allocation of this order starting here.
    NotAllocation {
        /// The first PFN that does not match.
        pfn: Pfn,
    },
    /// A frame of a range that had to be free is not.
    NotFree {
        /// The PFN.
        pfn: Pfn,
    },
    /// A folio's refcount was not the expected value.
    RefcountMismatch {
        /// Head PFN.
        pfn: Pfn,
        /// What it was.
        actual: u32,
    },
    /// A `put` found the refcount at zero (frozen or free): a reference
    /// was given up that the count did not hold. The count stays zero.
    RefcountUnderflow {
        /// Head PFN.
        pfn: Pfn,
    },
    /// A new reference would take the refcount above
    /// [`REFCOUNT_MAX`](super::REFCOUNT_MAX).
    RefcountSaturated {
        /// The PFN.
        pfn: Pfn,
    },
    /// A [`PageTableFrame`](super::PageTableFrame) for a table that was
    /// freed; the frame now holds another table, or none.
    StaleHandle {
        /// The PFN.
        pfn: Pfn,
    },
    /// The frame is reserved for a purpose the operation may not undo
    /// (the allocator's descriptor memory, the page array), or its kind is
    /// not the one given.
    Reserved {
        /// The PFN.
        pfn: Pfn,
        /// Why it is reserved.
        kind: ReservedKind,
    },
    /// Freeing a page table that still has valid entries.
    PageTableNotEmpty {
        /// The PFN.
        pfn: Pfn,
        /// Valid entries left.
        valid: u32,
    },
    /// Valid-entry count would go below zero or above the entries of a table.
    ValidCountOutOfRange,
    /// The frame was already poisoned.
    AlreadyPoisoned {
        /// The PFN.
        pfn: Pfn,
    },
    /// The page array is already driven by another allocator.
    ArrayInUse,
    /// A word with an unknown tag (memory corruption).
    Corrupt {
        /// The PFN.
        pfn: Pfn,
    },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl core::error::Error for LayoutError {}
impl core::error::Error for FrameError {}
