//! Decoding of ESR_ELx for crash reports (Arm ARM DDI 0487M.a.a, D24.2.45
//! "ESR_EL1, Exception Syndrome Register (EL1)", and the ISS encodings for
//! instruction and data aborts).
//!
//! Pure functions, host-tested; the vector handler uses them to name the cause
//! of an exception in words.

/// The exception class (ESR bits 31:26).
pub const fn exception_class(esr: u64) -> u8 {
    ((esr >> 26) & 0x3f) as u8
}

/// The exception class in words.
pub const fn class_name(ec: u8) -> &'static str {
    match ec {
        0x00 => "Unknown reason",
        0x01 => "Trapped WFI/WFE",
        0x07 => "Trapped SIMD/FP access",
        0x0e => "Illegal execution state",
        0x15 => "SVC from AArch64",
        0x16 => "HVC from AArch64",
        0x17 => "SMC from AArch64",
        0x18 => "Trapped MSR/MRS/system instruction",
        0x19 => "Trapped SVE access",
        0x20 => "Instruction abort from a lower EL",
        0x21 => "Instruction abort from the same EL",
        0x22 => "PC alignment fault",
        0x24 => "Data abort from a lower EL",
        0x25 => "Data abort from the same EL",
        0x26 => "SP alignment fault",
        0x2c => "Trapped floating-point exception",
        0x2f => "SError interrupt",
        0x30 | 0x31 => "Breakpoint",
        0x32 | 0x33 => "Software step",
        0x34 | 0x35 => "Watchpoint",
        0x3c => "BRK instruction",
        _ => "Reserved or unhandled exception class",
    }
}

/// True for instruction and data aborts, whose FAR is valid and whose ISS
/// carries a fault status code.
pub const fn is_abort(ec: u8) -> bool {
    matches!(ec, 0x20 | 0x21 | 0x24 | 0x25)
}

/// True for data aborts.
pub const fn is_data_abort(ec: u8) -> bool {
    matches!(ec, 0x24 | 0x25)
}

/// What kind of fault an abort's status code (DFSC/IFSC, ISS bits 5:0) names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum FaultKind {
    /// Address size fault at a level.
    AddressSize(u8),
    /// Translation fault (no valid descriptor) at a level.
    Translation(u8),
    /// Access flag fault at a level.
    AccessFlag(u8),
    /// Permission fault at a level.
    Permission(u8),
    /// Synchronous external abort.
    External,
    /// Alignment fault.
    Alignment,
    /// TLB conflict abort.
    TlbConflict,
    /// Anything else (raw status code).
    Other(u8),
}

impl FaultKind {
    /// Decodes the 6-bit fault status code.
    pub const fn from_status(fsc: u8) -> Self {
        let level = fsc & 3;
        match fsc & 0x3f {
            0x00..=0x03 => Self::AddressSize(level),
            0x04..=0x07 => Self::Translation(level),
            0x09..=0x0b => Self::AccessFlag(level),
            0x0d..=0x0f => Self::Permission(level),
            0x10 => Self::External,
            0x21 => Self::Alignment,
            0x30 => Self::TlbConflict,
            other => Self::Other(other),
        }
    }

    /// The fault in words.
    pub const fn name(self) -> &'static str {
        match self {
            Self::AddressSize(_) => "address size fault",
            Self::Translation(_) => "translation fault",
            Self::AccessFlag(_) => "access flag fault",
            Self::Permission(_) => "permission fault",
            Self::External => "synchronous external abort",
            Self::Alignment => "alignment fault",
            Self::TlbConflict => "TLB conflict abort",
            Self::Other(_) => "other fault",
        }
    }

    /// The translation level the fault was reported at, if any.
    pub const fn level(self) -> Option<u8> {
        match self {
            Self::AddressSize(l)
            | Self::Translation(l)
            | Self::AccessFlag(l)
            | Self::Permission(l) => Some(l),
            _ => None,
        }
    }
}

/// The decoded parts of an abort's syndrome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub struct Abort {
    /// What kind of fault.
    pub kind: FaultKind,
    /// Data aborts: the access was a write (WnR, ISS bit 6).
    pub write: bool,
    /// True for instruction aborts.
    pub instruction: bool,
}

/// Decodes an abort's ISS; `None` when the class is not an abort.
pub const fn decode_abort(esr: u64) -> Option<Abort> {
    let ec = exception_class(esr);
    if !is_abort(ec) {
        return None;
    }
    Some(Abort {
        kind: FaultKind::from_status((esr & 0x3f) as u8),
        write: is_data_abort(ec) && (esr >> 6) & 1 == 1,
        instruction: !is_data_abort(ec),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_abort_write_permission_level3() {
        // EC=0x25, IL=1, WnR=1, DFSC=0b001111 (permission fault, level 3).
        let esr = (0x25u64 << 26) | (1 << 25) | (1 << 6) | 0x0f;
        assert_eq!(
            class_name(exception_class(esr)),
            "Data abort from the same EL"
        );
        let a = decode_abort(esr).unwrap();
        assert_eq!(a.kind, FaultKind::Permission(3));
        assert!(a.write && !a.instruction);
        assert_eq!(a.kind.name(), "permission fault");
    }

    #[test]
    fn instruction_abort_translation_level2() {
        let esr = (0x21u64 << 26) | (1 << 25) | 0x06;
        let a = decode_abort(esr).unwrap();
        assert_eq!(a.kind, FaultKind::Translation(2));
        assert!(a.instruction && !a.write);
        assert_eq!(a.kind.level(), Some(2));
    }

    #[test]
    fn non_aborts_have_no_abort_decode() {
        let svc = 0x15u64 << 26;
        assert_eq!(decode_abort(svc), None);
        assert_eq!(class_name(exception_class(svc)), "SVC from AArch64");
        assert_eq!(class_name(0x3c), "BRK instruction");
        assert_eq!(FaultKind::from_status(0x30), FaultKind::TlbConflict);
        assert_eq!(FaultKind::from_status(0x3f), FaultKind::Other(0x3f));
    }
}
