//! Memory attributes and permissions of a stage-1 mapping.
//!
//! Arm ARM DDI 0487M.a.a, D8.4.1 (stage 1 permissions, execute-never) and
//! D8.6 (memory region attributes: AttrIndx into MAIR_ELx, shareability). The caller asks
//! for a memory kind and permissions; the engine chooses the descriptor bits,
//! including how the dirty state is kept (see [`Attributes::leaf_bits`]).

use super::descriptor::Descriptor;
use super::error::Stage1Error;

/// Memory type, selected through a fixed MAIR_ELx layout ([`MAIR_VALUE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemoryKind {
    /// Normal, inner/outer write-back read/write-allocate (MAIR index 0).
    NormalWriteBack,
    /// Normal, inner/outer non-cacheable (MAIR index 1).
    NormalNonCacheable,
    /// Device-nGnRE, for MMIO (MAIR index 2).
    DeviceNgnre,
    /// Device-nGnRnE, strongly ordered MMIO (MAIR index 3).
    DeviceNgnrne,
}

/// MAIR_ELx value matching [`MemoryKind::mair_index`]: Attr0 = 0xff (Normal
/// WB RW-allocate), Attr1 = 0x44 (Normal NC), Attr2 = 0x04 (Device-nGnRE),
/// Attr3 = 0x00 (Device-nGnRnE). The hal programs this into MAIR_EL1.
pub const MAIR_VALUE: u64 = 0xff | (0x44 << 8) | (0x04 << 16);

impl MemoryKind {
    /// AttrIndx for this kind under [`MAIR_VALUE`].
    #[inline]
    pub const fn mair_index(self) -> u8 {
        match self {
            Self::NormalWriteBack => 0,
            Self::NormalNonCacheable => 1,
            Self::DeviceNgnre => 2,
            Self::DeviceNgnrne => 3,
        }
    }

    /// The kind for an AttrIndx, `None` for indices this engine never writes.
    #[inline]
    pub const fn from_mair_index(index: u8) -> Option<Self> {
        match index {
            0 => Some(Self::NormalWriteBack),
            1 => Some(Self::NormalNonCacheable),
            2 => Some(Self::DeviceNgnre),
            3 => Some(Self::DeviceNgnrne),
            _ => None,
        }
    }

    /// True for the Device memory types.
    #[inline]
    pub const fn is_device(self) -> bool {
        matches!(self, Self::DeviceNgnre | Self::DeviceNgnrne)
    }
}

/// Shareability domain (SH\[1:0\], D8.6.2). Ignored by hardware for Device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shareability {
    /// SH = 0b00.
    NonShareable,
    /// SH = 0b10.
    OuterShareable,
    /// SH = 0b11.
    InnerShareable,
}

impl Shareability {
    /// The SH field value.
    #[inline]
    pub const fn bits(self) -> u64 {
        match self {
            Self::NonShareable => 0b00,
            Self::OuterShareable => 0b10,
            Self::InnerShareable => 0b11,
        }
    }

    /// Decodes SH; `None` for the reserved value 0b01.
    #[inline]
    pub const fn from_bits(bits: u64) -> Option<Self> {
        match bits {
            0b00 => Some(Self::NonShareable),
            0b10 => Some(Self::OuterShareable),
            0b11 => Some(Self::InnerShareable),
            _ => None,
        }
    }
}

/// What a mapping is: memory kind, permissions, shareability, global.
///
/// Mappings are EL1-only (AP\[1\] = 0, UXN = 1). Read access is implied by a
/// valid entry. `write && execute` is refused with
/// [`Stage1Error::WriteAndExecute`] (W^X), and executable Device memory with
/// [`Stage1Error::ExecutableDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attributes {
    /// Memory type.
    pub kind: MemoryKind,
    /// Writable at EL1.
    pub write: bool,
    /// Executable at EL1 (PXN clear).
    pub execute: bool,
    /// Shareability.
    pub shareability: Shareability,
    /// Global (nG clear): not tagged with an ASID.
    pub global: bool,
}

impl Attributes {
    /// Normal WB, read/write, execute-never, inner shareable: RAM and image data/bss.
    pub const DATA: Self = Self {
        kind: MemoryKind::NormalWriteBack,
        write: true,
        execute: false,
        shareability: Shareability::InnerShareable,
        global: true,
    };
    /// Normal WB, read-only, execute-never: image rodata.
    pub const RODATA: Self = Self {
        write: false,
        ..Self::DATA
    };
    /// Normal WB, read-only, executable: image text.
    pub const TEXT: Self = Self {
        write: false,
        execute: true,
        ..Self::DATA
    };
    /// Device-nGnRE, read/write, execute-never: MMIO windows.
    pub const DEVICE: Self = Self {
        kind: MemoryKind::DeviceNgnre,
        write: true,
        execute: false,
        shareability: Shareability::OuterShareable,
        global: true,
    };

    /// Checks the request: W^X and no executable Device memory.
    ///
    /// # Errors
    ///
    /// [`Stage1Error::WriteAndExecute`] for a writable and executable request,
    /// [`Stage1Error::ExecutableDevice`] for executable Device memory.
    pub const fn validate(&self) -> Result<(), Stage1Error> {
        if self.write && self.execute {
            return Err(Stage1Error::WriteAndExecute);
        }
        if self.execute && self.kind.is_device() {
            return Err(Stage1Error::ExecutableDevice);
        }
        Ok(())
    }

    /// Same memory type, shareability and global-ness: a change between two
    /// such attribute sets is a pure permission change, which needs no
    /// break-before-make (D8.17.1).
    #[inline]
    pub const fn same_type(&self, other: &Self) -> bool {
        self.kind.mair_index() == other.kind.mair_index()
            && self.shareability.bits() == other.shareability.bits()
            && self.global == other.global
    }

    /// Leaf descriptor bits for these attributes, without valid/type bits,
    /// output address, access flag or Contiguous bit.
    ///
    /// Dirty state (the Linux convention, D8.5.2): with FEAT_HAFDBS
    /// (`hafdbs`) a writable entry has DBM = 1 and starts writable-clean
    /// (AP\[2\] = 1); the hardware clears AP\[2\] on the first write, so
    /// "DBM && !AP\[2\]" means dirty. Without FEAT_HAFDBS nothing records a
    /// write, so a writable entry is written AP\[2\] = 0 with the software
    /// dirty bit set: conservatively dirty. Read-only entries keep the dirty
    /// state in the software dirty bit (bit 55), so write-protecting never
    /// loses it.
    #[inline]
    pub const fn leaf_bits(&self, dirty: bool, hafdbs: bool) -> u64 {
        let mut bits = (self.kind.mair_index() as u64) << Descriptor::ATTR_INDX_SHIFT
            | self.shareability.bits() << Descriptor::SH_SHIFT
            | Descriptor::UXN;
        if !self.execute {
            bits |= Descriptor::PXN;
        }
        if !self.global {
            bits |= Descriptor::NG;
        }
        if self.write {
            if hafdbs {
                bits |= Descriptor::DBM;
                if !dirty {
                    bits |= Descriptor::AP_READ_ONLY;
                }
            } else {
                bits |= Descriptor::SW_DIRTY;
            }
        } else {
            bits |= Descriptor::AP_READ_ONLY;
            if dirty {
                bits |= Descriptor::SW_DIRTY;
            }
        }
        bits
    }

    /// Decodes the attributes of a leaf; `None` for an AttrIndx or SH value
    /// this engine never writes.
    pub const fn from_descriptor(d: Descriptor) -> Option<Self> {
        let kind = match MemoryKind::from_mair_index(d.attr_index()) {
            Some(k) => k,
            None => return None,
        };
        let shareability =
            match Shareability::from_bits((d.bits() & Descriptor::SH_MASK) >> Descriptor::SH_SHIFT)
            {
                Some(s) => s,
                None => return None,
            };
        Some(Self {
            kind,
            write: d.is_writable(),
            execute: d.is_executable(),
            shareability,
            global: !d.has(Descriptor::NG),
        })
    }
}
