//! [`Stage1Error`]: why a stage-1 operation was refused (bad caller input,
//! exhausted or failing table memory).
//!
//! Arm ARM DDI 0487M.a.a, D8.1 (input and output address sizes), D8.2.8
//! (4 KiB alignment) and D8.4.1 (permissions: W^X, no executable Device memory).
//! Every operation validates before it writes a descriptor (or rolls back),
//! so an `Err` other than [`Stage1Error::TableMemory`] means the tables are
//! unchanged.

use core::fmt;

use super::hardware::TableMemoryError;
use crate::addr::{PhysAddr, VirtAddr};

/// Why a stage-1 operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage1Error {
    /// The virtual address is not a multiple of 4 KiB.
    UnalignedVa {
        /// The address given.
        va: VirtAddr,
    },
    /// The physical (output) address is not a multiple of 4 KiB.
    UnalignedPa {
        /// The address given.
        pa: PhysAddr,
    },
    /// The length is not a multiple of 4 KiB.
    UnalignedLength {
        /// The length given.
        len: u64,
    },
    /// The length is zero.
    EmptyRange,
    /// The virtual range leaves the translated input range (TTBR0, 2^VA bits).
    VaOutOfRange {
        /// Start of the refused range.
        va: VirtAddr,
    },
    /// The output range leaves the 48-bit output address space.
    PaOutOfRange {
        /// Start of the refused range.
        pa: PhysAddr,
    },
    /// `map` over a page that is already mapped.
    AlreadyMapped {
        /// First mapped page found in the range.
        va: VirtAddr,
    },
    /// `unmap`/`protect`/`query` of a page that is not mapped.
    NotMapped {
        /// First unmapped page found in the range.
        va: VirtAddr,
    },
    /// A writable and executable mapping was requested (W^X).
    WriteAndExecute,
    /// Executable Device memory was requested.
    ExecutableDevice,
    /// The table-memory provider had no frame left; nothing was changed.
    OutOfTableMemory,
    /// The table-memory provider failed otherwise. When it refused a frame
    /// up front nothing was changed; when a valid-entry count update or a
    /// free failed, the operation finished its TLB maintenance, kept every
    /// table whose count it could not trust, and the provider's counts may
    /// now disagree with the tables (the linter reports where).
    TableMemory(TableMemoryError),
    /// [`Stage1::pin_small`](super::Stage1::pin_small) has no room for more
    /// pinned chunks.
    TooManyPinned,
}

impl From<TableMemoryError> for Stage1Error {
    fn from(e: TableMemoryError) -> Self {
        match e {
            TableMemoryError::OutOfMemory => Self::OutOfTableMemory,
            e => Self::TableMemory(e),
        }
    }
}

impl fmt::Display for Stage1Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnalignedVa { va } => write!(f, "VA {:#x} is not 4 KiB aligned", va.0),
            Self::UnalignedPa { pa } => write!(f, "PA {:#x} is not 4 KiB aligned", pa.0),
            Self::UnalignedLength { len } => write!(f, "length {len:#x} is not 4 KiB aligned"),
            Self::EmptyRange => write!(f, "empty range"),
            Self::VaOutOfRange { va } => {
                write!(f, "VA range at {:#x} exceeds the input range", va.0)
            }
            Self::PaOutOfRange { pa } => write!(f, "PA range at {:#x} exceeds 48 bits", pa.0),
            Self::AlreadyMapped { va } => write!(f, "{:#x} is already mapped", va.0),
            Self::NotMapped { va } => write!(f, "{:#x} is not mapped", va.0),
            Self::WriteAndExecute => write!(f, "writable and executable mapping refused (W^X)"),
            Self::ExecutableDevice => write!(f, "executable Device memory refused"),
            Self::OutOfTableMemory => write!(f, "out of translation table memory"),
            Self::TableMemory(e) => write!(f, "translation table memory failed: {e:?}"),
            Self::TooManyPinned => write!(f, "no room for another pinned chunk"),
        }
    }
}
