//! VMSAv8-64 stage-1 translation table descriptors for the 4 KiB granule.
//!
//! Implements the descriptor formats of Arm ARM DDI 0487M.a.a, D8.3 ("Translation
//! table descriptor formats") and the level geometry of D8.2 ("Translation
//! table walk"), 48-bit output addresses (no FEAT_LPA/LPA2). A descriptor is a
//! plain `u64` newtype with one named constant per field, so the engine, the
//! linter and the fakes all decode it the same way.

use crate::addr::PhysAddr;

/// Entries per translation table (4 KiB granule, 8-byte descriptors).
pub const ENTRIES: usize = 512;
/// Entries in a contiguous run (D8.7.1: 16 entries for the 4 KiB granule at every level).
pub const CONT_ENTRIES: usize = 16;
/// Output address size in bits handled by this engine (48-bit OA, no FEAT_LPA).
pub const OA_BITS: u32 = 48;

/// log2 of the bytes mapped by one entry at `level` (0..=3).
#[inline]
pub const fn level_shift(level: u8) -> u32 {
    12 + 9 * (3 - level as u32)
}

/// Bytes mapped by one entry at `level` (0..=3): 512 GiB, 1 GiB, 2 MiB, 4 KiB.
#[inline]
pub const fn level_size(level: u8) -> u64 {
    1 << level_shift(level)
}

/// True when a leaf (block or page) entry is architecturally allowed at
/// `level` for the 4 KiB granule without FEAT_LPA2: 1 GiB and 2 MiB blocks
/// and 4 KiB pages (D8.3.1.2).
#[inline]
pub const fn leaf_allowed(level: u8) -> bool {
    level >= 1 && level <= 3
}

/// What a descriptor is at a given level (D8.3.1, bits\[1:0\]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorKind {
    /// bit\[0\] clear: faults, all other bits ignored by hardware.
    Invalid,
    /// Table descriptor (bits\[1:0\] = 0b11 at levels 0-2): next-level table address.
    Table(PhysAddr),
    /// Block (bits\[1:0\] = 0b01 at levels 1-2) or page (0b11 at level 3).
    Leaf,
    /// bits\[1:0\] = 0b01 where no block is allowed (level 0, level 3): reserved, faults.
    Reserved,
}

/// One stage-1 translation table descriptor (D8.3).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(transparent)]
pub struct Descriptor(pub u64);

impl Descriptor {
    /// The invalid (faulting) descriptor.
    pub const INVALID: Self = Self(0);

    /// bit\[0\]: valid.
    pub const VALID: u64 = 1 << 0;
    /// bit\[1\]: table (levels 0-2) or page (level 3); clear for a block.
    pub const TABLE_OR_PAGE: u64 = 1 << 1;
    /// bits\[4:2\]: AttrIndx, index into MAIR_ELx (D8.6.1).
    pub const ATTR_INDX_SHIFT: u32 = 2;
    /// Mask of AttrIndx.
    pub const ATTR_INDX_MASK: u64 = 0b111 << 2;
    /// bit\[5\]: NS (only meaningful in Secure state; this engine leaves it 0).
    pub const NS: u64 = 1 << 5;
    /// bit\[6\]: AP\[1\], EL0 access (D8.4.1.2); this engine never grants EL0 access.
    pub const AP_EL0: u64 = 1 << 6;
    /// bit\[7\]: AP\[2\], read-only (D8.4.1.2). With DBM set this is the hardware dirty state.
    pub const AP_READ_ONLY: u64 = 1 << 7;
    /// bits\[9:8\]: shareability (D8.6.2).
    pub const SH_SHIFT: u32 = 8;
    /// Mask of SH.
    pub const SH_MASK: u64 = 0b11 << 8;
    /// bit\[10\]: access flag (D8.5.1, FEAT_HAFDBS sets it in hardware).
    pub const AF: u64 = 1 << 10;
    /// bit\[11\]: not global (ASID-tagged).
    pub const NG: u64 = 1 << 11;
    /// bit\[16\]: nT, the FEAT_BBM level 1 block-translation hint; never set here.
    pub const NT: u64 = 1 << 16;
    /// bits\[47:12\]: output address mask for a page / table address.
    pub const OA_MASK: u64 = ((1u64 << OA_BITS) - 1) & !0xfff;
    /// bits\[50:48\]: RES0 here (OA\[51:48\] with FEAT_LPA, GP with FEAT_BTI: unused).
    pub const HIGH_RES0: u64 = 0b111 << 48;
    /// bit\[51\]: dirty bit modifier (D8.5.2, FEAT_HAFDBS).
    pub const DBM: u64 = 1 << 51;
    /// bit\[52\]: Contiguous (D8.7.1).
    pub const CONT: u64 = 1 << 52;
    /// bit\[53\]: PXN, privileged execute-never.
    pub const PXN: u64 = 1 << 53;
    /// bit\[54\]: UXN/XN, unprivileged execute-never.
    pub const UXN: u64 = 1 << 54;
    /// bit\[55\]: software dirty, one of the bits\[58:55\] reserved for software use.
    ///
    /// Holds the dirty state wherever the hardware cannot: read-only entries
    /// (write-protect keeps dirty here) and writable entries without FEAT_HAFDBS.
    pub const SW_DIRTY: u64 = 1 << 55;

    /// Raw bits.
    #[inline]
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// bit\[0\].
    #[inline]
    pub const fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }

    /// Decodes bits\[1:0\] for `level`.
    #[inline]
    pub const fn kind(self, level: u8) -> DescriptorKind {
        if !self.is_valid() {
            return DescriptorKind::Invalid;
        }
        let table_or_page = self.0 & Self::TABLE_OR_PAGE != 0;
        match (level, table_or_page) {
            (3, true) => DescriptorKind::Leaf,
            (_, true) => DescriptorKind::Table(PhysAddr(self.0 & Self::OA_MASK)),
            (1 | 2, false) => DescriptorKind::Leaf,
            _ => DescriptorKind::Reserved,
        }
    }

    /// True for a table descriptor at `level`.
    #[inline]
    pub const fn is_table(self, level: u8) -> bool {
        level < 3 && self.0 & 0b11 == 0b11
    }

    /// True for a block or page descriptor at `level`.
    #[inline]
    pub const fn is_leaf(self, level: u8) -> bool {
        matches!(self.kind(level), DescriptorKind::Leaf)
    }

    /// Next-level table address of a table descriptor.
    #[inline]
    pub const fn table_address(self) -> PhysAddr {
        PhysAddr(self.0 & Self::OA_MASK)
    }

    /// Output address of a leaf at `level` (low bits below the block size dropped).
    #[inline]
    pub const fn output(self, level: u8) -> PhysAddr {
        PhysAddr(self.0 & Self::OA_MASK & !(level_size(level) - 1))
    }

    /// A table descriptor pointing at `table`.
    #[inline]
    pub const fn table(table: PhysAddr) -> Self {
        Self((table.0 & Self::OA_MASK) | Self::VALID | Self::TABLE_OR_PAGE)
    }

    /// True when `bit` (one of the constants above) is set.
    #[inline]
    pub const fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }

    /// Returns a copy with `bit` set or cleared.
    #[inline]
    #[must_use]
    pub const fn with(self, bit: u64, on: bool) -> Self {
        if on {
            Self(self.0 | bit)
        } else {
            Self(self.0 & !bit)
        }
    }

    /// Returns a copy with the output address replaced (leaf at `level`).
    #[inline]
    #[must_use]
    pub const fn with_output(self, oa: PhysAddr) -> Self {
        Self((self.0 & !Self::OA_MASK) | (oa.0 & Self::OA_MASK))
    }

    /// AttrIndx field.
    #[inline]
    pub const fn attr_index(self) -> u8 {
        ((self.0 & Self::ATTR_INDX_MASK) >> Self::ATTR_INDX_SHIFT) as u8
    }

    /// Contiguous bit.
    #[inline]
    pub const fn is_contiguous(self) -> bool {
        self.has(Self::CONT)
    }

    /// Access flag.
    #[inline]
    pub const fn is_young(self) -> bool {
        self.has(Self::AF)
    }

    /// Writable: AP\[2\] clear, or DBM set (writable-clean under FEAT_HAFDBS).
    #[inline]
    pub const fn is_writable(self) -> bool {
        !self.has(Self::AP_READ_ONLY) || self.has(Self::DBM)
    }

    /// Dirty, by the Linux convention: software dirty, or DBM set with AP\[2\]
    /// clear (the hardware cleared AP\[2\] on the first write).
    #[inline]
    pub const fn is_dirty(self) -> bool {
        self.has(Self::SW_DIRTY) || (self.has(Self::DBM) && !self.has(Self::AP_READ_ONLY))
    }

    /// Privileged-executable (PXN clear).
    #[inline]
    pub const fn is_executable(self) -> bool {
        !self.has(Self::PXN)
    }

    /// The bits that must be identical across a contiguous run or a block
    /// collapse: everything except the output address, access flag, dirty
    /// state (AP\[2\] when DBM is set, software dirty) and the Contiguous bit.
    #[inline]
    pub const fn run_key(self) -> u64 {
        let mut k = self.0 & !(Self::OA_MASK | Self::AF | Self::SW_DIRTY | Self::CONT);
        if self.has(Self::DBM) {
            k &= !Self::AP_READ_ONLY;
        }
        k
    }

    /// Returns a copy with the access and dirty state set to `young`/`dirty`,
    /// encoded where this entry keeps them (see [`Descriptor::is_dirty`]).
    #[inline]
    #[must_use]
    pub const fn with_state(self, young: bool, dirty: bool) -> Self {
        let d = self.with(Self::AF, young);
        if d.has(Self::DBM) {
            d.with(Self::AP_READ_ONLY, !dirty)
                .with(Self::SW_DIRTY, false)
        } else if !d.has(Self::AP_READ_ONLY) {
            // Writable without hardware dirty tracking: always dirty.
            d.with(Self::SW_DIRTY, true)
        } else {
            d.with(Self::SW_DIRTY, dirty)
        }
    }

    /// Converts a leaf at `from` level into the equivalent leaf shape at `to`
    /// level (block <-> page bit), keeping every other field.
    #[inline]
    #[must_use]
    pub const fn with_leaf_level(self, to: u8) -> Self {
        self.with(Self::TABLE_OR_PAGE, to == 3)
    }
}

/// The access and dirty state of one or more leaves, the one currency of
/// rule 3 (docs/architecture.md, "Stage-1 translation"): gathered over a
/// run, taken from what the hardware wrote, added to the entries that
/// replace a run or block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct AccessState {
    /// Access flag set.
    pub young: bool,
    /// Dirty (see [`Descriptor::is_dirty`]).
    pub dirty: bool,
}

impl AccessState {
    /// Neither accessed nor dirty.
    pub const NONE: Self = Self {
        young: false,
        dirty: false,
    };

    /// The state `d` records.
    #[inline]
    pub const fn of(d: Descriptor) -> Self {
        Self {
            young: d.is_young(),
            dirty: d.is_dirty(),
        }
    }

    /// The state ORed over the leaves (at `level`) among `entries`.
    #[inline]
    pub fn gather(entries: impl IntoIterator<Item = Descriptor>, level: u8) -> Self {
        entries
            .into_iter()
            .filter(|d| d.is_leaf(level))
            .fold(Self::NONE, |s, d| s.or(Self::of(d)))
    }

    /// What the hardware set in `found` that `seen` did not have.
    #[inline]
    pub const fn gained(seen: Descriptor, found: Descriptor) -> Self {
        Self::of(found).beyond(Self::of(seen))
    }

    /// Both ORed.
    #[inline]
    #[must_use]
    pub const fn or(self, other: Self) -> Self {
        Self {
            young: self.young || other.young,
            dirty: self.dirty || other.dirty,
        }
    }

    /// What `self` has that `known` does not.
    #[inline]
    #[must_use]
    pub const fn beyond(self, known: Self) -> Self {
        Self {
            young: self.young && !known.young,
            dirty: self.dirty && !known.dirty,
        }
    }

    /// True when neither bit is set.
    #[inline]
    pub const fn is_none(self) -> bool {
        !(self.young || self.dirty)
    }

    /// The leaf `d` with this state added to its own.
    #[inline]
    #[must_use]
    pub const fn added_to(self, d: Descriptor) -> Descriptor {
        d.with_state(d.is_young() || self.young, d.is_dirty() || self.dirty)
    }
}

impl core::fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Descriptor({:#018x})", self.0)
    }
}
