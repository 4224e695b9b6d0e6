//! Why a balloon operation failed or what the device did wrong.

use super::device::{DeviceError, Queue};
use crate::addr::Pfn;
use crate::frames::FrameError;
use crate::stage1::Stage1Error;
use core::fmt;

/// A balloon failure. Device misbehaviour is reported with one of these and
/// never loses a frame: the policy resets the device where it must and
/// carries on with every frame still accounted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalloonError {
    /// The frame allocator refused.
    Frames(FrameError),
    /// The firmware's stage-1 map could not be changed.
    Map(Stage1Error),
    /// The transport refused.
    Device(DeviceError),
    /// The frame allocator is held by someone else (re-entrant use).
    FramesBusy,
    /// ConfigGeneration changed during every one of the reads of the config.
    ConfigUnstable,
    /// `num_pages` asks for more pages than the machine has; the balloon
    /// follows as far as its floor allows.
    TargetBeyondRam {
        /// What the device asked for.
        num_pages: u32,
        /// Frames the page array describes.
        ram_pages: u64,
    },
    /// `num_pages` changed this many times within one flapping window.
    TargetFlapping {
        /// Changes seen in the window.
        changes: u32,
    },
    /// The device returned a used id that is not a chain in flight.
    UnknownUsedId {
        /// The queue.
        queue: Queue,
        /// The id.
        id: u16,
    },
    /// The device claims to have written into a device-readable chain.
    WrongUsedLength {
        /// The queue.
        queue: Queue,
        /// The chain's id.
        id: u16,
        /// The length it gave.
        len: u32,
    },
    /// The device set DEVICE_NEEDS_RESET.
    DeviceNeedsReset,
    /// The device could not be reset and brought up again.
    ResetFailed(DeviceError),
    /// Deflate-on-OOM asked for but not negotiated: ballooned pages stay.
    DeflateOnOomNotNegotiated,
    /// An inflate or deflate is in flight and did not complete.
    Busy,
    /// A frame above what a 32-bit PFN can name (virtio uses le32 PFNs).
    PfnTooHigh {
        /// The frame.
        pfn: Pfn,
    },
    /// The PFN arrays' directory is full.
    ArrayFull,
    /// Balloon state and page array disagree (a bug or memory corruption).
    Corrupt {
        /// Where.
        pfn: Pfn,
        /// What.
        what: Inconsistency,
    },
}

/// What [`BalloonError::Corrupt`] found wrong in the balloon's own records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inconsistency {
    /// An array page is named that no directory frame holds.
    NoDirectoryFrame,
    /// A PFN array index past the arrays' end.
    IndexOutOfRange,
    /// A ballooned chunk starts before the first PFN the arrays record.
    ChunkBeforeArrays,
    /// A ballooned chunk's frames are not consecutive in the PFN arrays.
    ChunkNotConsecutive,
}

impl From<FrameError> for BalloonError {
    fn from(e: FrameError) -> Self {
        Self::Frames(e)
    }
}

impl From<Stage1Error> for BalloonError {
    fn from(e: Stage1Error) -> Self {
        Self::Map(e)
    }
}

impl From<DeviceError> for BalloonError {
    fn from(e: DeviceError) -> Self {
        Self::Device(e)
    }
}

impl BalloonError {
    /// Whether the policy had to reset the device because of this error.
    pub fn needs_reset(&self) -> bool {
        matches!(
            self,
            Self::UnknownUsedId { .. } | Self::WrongUsedLength { .. } | Self::DeviceNeedsReset
        )
    }
}

impl fmt::Display for BalloonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl core::error::Error for BalloonError {}
