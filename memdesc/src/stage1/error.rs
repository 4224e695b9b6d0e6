//! Errors of the stage-1 engine: bad caller input and exhausted table memory.
//!
//! Every operation validates before it writes a descriptor (or rolls back),
//! so an `Err` means the translation tables are unchanged (Arm ARM DDI 0487,
//! D8 gives the constraints checked here: alignment, VA/OA size, W^X).

use core::fmt;

use super::hardware::TableMemoryError;

/// Why a stage-1 operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage1Error {
    /// An address or length is not a multiple of 4 KiB.
    Unaligned {
        /// The offending value.
        value: u64,
    },
    /// The length is zero.
    EmptyRange,
    /// The virtual range leaves the translated input range (TTBR0, 2^VA bits).
    VaOutOfRange {
        /// Start of the refused range.
        va: u64,
    },
    /// The output range leaves the 48-bit output address space.
    PaOutOfRange {
        /// Start of the refused range.
        pa: u64,
    },
    /// `map` over a page that is already mapped.
    AlreadyMapped {
        /// First mapped page found in the range.
        va: u64,
    },
    /// `unmap`/`protect`/`query` of a page that is not mapped.
    NotMapped {
        /// First unmapped page found in the range.
        va: u64,
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
            Self::Unaligned { value } => write!(f, "{value:#x} is not 4 KiB aligned"),
            Self::EmptyRange => write!(f, "empty range"),
            Self::VaOutOfRange { va } => write!(f, "VA range at {va:#x} exceeds the input range"),
            Self::PaOutOfRange { pa } => write!(f, "PA range at {pa:#x} exceeds 48 bits"),
            Self::AlreadyMapped { va } => write!(f, "{va:#x} is already mapped"),
            Self::NotMapped { va } => write!(f, "{va:#x} is not mapped"),
            Self::WriteAndExecute => write!(f, "writable and executable mapping refused (W^X)"),
            Self::ExecutableDevice => write!(f, "executable Device memory refused"),
            Self::OutOfTableMemory => write!(f, "out of translation table memory"),
            Self::TableMemory(e) => write!(f, "translation table memory failed: {e:?}"),
        }
    }
}
