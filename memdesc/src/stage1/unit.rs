//! Translation units (what one TLB entry can cover) and mapping summaries.
//!
//! Arm ARM DDI 0487M.a.a, D8.2.8 (block and page sizes of the 4 KiB granule) and
//! D8.7.1 (the Contiguous bit: 16 adjacent entries, one TLB entry). A
//! [`MappingSummary`] counts the units of a table tree; [`MappingSummary::optimum`]
//! computes the fewest units any table could use for a region, so the
//! firmware can log both side by side.

use super::descriptor::{level_size, CONT_ENTRIES};

/// One translation unit size, smallest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MappingUnit {
    /// Level-3 page.
    Page4K,
    /// 16 level-3 pages with the Contiguous bit.
    Cont64K,
    /// Level-2 block.
    Block2M,
    /// 16 level-2 blocks with the Contiguous bit.
    Cont32M,
    /// Level-1 block.
    Block1G,
    /// 16 level-1 blocks with the Contiguous bit.
    Cont16G,
}

impl MappingUnit {
    /// Every unit, smallest first.
    pub const ALL: [Self; 6] = [
        Self::Page4K,
        Self::Cont64K,
        Self::Block2M,
        Self::Cont32M,
        Self::Block1G,
        Self::Cont16G,
    ];
    /// The largest unit: no limit.
    pub const LARGEST: Self = Self::Cont16G;

    /// Bytes covered.
    #[inline]
    pub const fn size(self) -> u64 {
        match self {
            Self::Page4K => level_size(3),
            Self::Cont64K => level_size(3) * CONT_ENTRIES as u64,
            Self::Block2M => level_size(2),
            Self::Cont32M => level_size(2) * CONT_ENTRIES as u64,
            Self::Block1G => level_size(1),
            Self::Cont16G => level_size(1) * CONT_ENTRIES as u64,
        }
    }

    /// Table level of the entries forming this unit.
    #[inline]
    pub const fn level(self) -> u8 {
        match self {
            Self::Page4K | Self::Cont64K => 3,
            Self::Block2M | Self::Cont32M => 2,
            Self::Block1G | Self::Cont16G => 1,
        }
    }

    /// True for the Contiguous-bit units.
    #[inline]
    pub const fn is_contiguous(self) -> bool {
        matches!(self, Self::Cont64K | Self::Cont32M | Self::Cont16G)
    }

    /// Descriptors written to install one such unit.
    #[inline]
    pub const fn entries(self) -> u64 {
        if self.is_contiguous() {
            CONT_ENTRIES as u64
        } else {
            1
        }
    }

    /// The unit of a leaf at `level`, with or without the Contiguous bit.
    #[inline]
    pub const fn of_leaf(level: u8, contiguous: bool) -> Self {
        match (level, contiguous) {
            (3, false) => Self::Page4K,
            (3, true) => Self::Cont64K,
            (2, false) => Self::Block2M,
            (2, true) => Self::Cont32M,
            (_, false) => Self::Block1G,
            (_, true) => Self::Cont16G,
        }
    }

    /// True when, under this limit, a leaf may be written at `level`.
    #[inline]
    pub const fn allows_leaf(self, level: u8) -> bool {
        match level {
            3 => true,
            2 => self as u8 >= Self::Block2M as u8,
            1 => self as u8 >= Self::Block1G as u8,
            _ => false,
        }
    }

    /// True when, under this limit, a run at `level` may get the Contiguous bit.
    #[inline]
    pub const fn allows_contiguous(self, level: u8) -> bool {
        match level {
            3 => self as u8 >= Self::Cont64K as u8,
            2 => self as u8 >= Self::Cont32M as u8,
            1 => self as u8 >= Self::Cont16G as u8,
            _ => false,
        }
    }
}

/// Number of translation units of each size (= TLB entries needed to cover
/// the mappings once), plus the number of tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingSummary {
    /// Units of each size, indexed like [`MappingUnit::ALL`].
    pub units: [u64; 6],
    /// Translation tables in the tree (root included); 0 for an optimum.
    pub tables: u64,
}

impl MappingSummary {
    /// Units of one size.
    #[inline]
    pub const fn count(&self, unit: MappingUnit) -> u64 {
        self.units[unit as usize]
    }

    /// Adds `n` units of one size.
    #[inline]
    pub fn add(&mut self, unit: MappingUnit, n: u64) {
        self.units[unit as usize] += n;
    }

    /// TLB entries needed to cover everything once: one per unit.
    pub fn tlb_entries(&self) -> u64 {
        self.units.iter().sum()
    }

    /// Leaf descriptors in use (a contiguous run counts 16).
    pub fn leaf_descriptors(&self) -> u64 {
        MappingUnit::ALL
            .iter()
            .map(|u| self.units[*u as usize] * u.entries())
            .sum()
    }

    /// Bytes mapped.
    pub fn mapped_bytes(&self) -> u64 {
        MappingUnit::ALL
            .iter()
            .map(|u| self.units[*u as usize] * u.size())
            .sum()
    }

    /// The fewest units that can map `[va, va + len)` to `[pa, pa + len)`
    /// with units no larger than `limit`, added to `self`.
    ///
    /// Greedy (largest aligned unit first) is optimal here because every unit
    /// size divides the next one and a unit needs VA and PA aligned to its size.
    /// Addresses and `len` must be 4 KiB multiples; anything else adds nothing.
    pub fn add_optimum(&mut self, va: u64, pa: u64, len: u64, limit: MappingUnit) {
        let mut off = 0u64;
        if (va | pa | len) & (level_size(3) - 1) != 0 {
            return;
        }
        while off < len {
            let (v, p, left) = (va + off, pa + off, len - off);
            let mut chosen = MappingUnit::Page4K;
            for u in MappingUnit::ALL.iter().rev() {
                let s = u.size();
                if *u <= limit && (v | p) & (s - 1) == 0 && s <= left {
                    chosen = *u;
                    break;
                }
            }
            self.add(chosen, 1);
            off += chosen.size();
        }
    }

    /// Convenience: the optimum for one region.
    pub fn optimum(va: u64, pa: u64, len: u64) -> Self {
        let mut s = Self::default();
        s.add_optimum(va, pa, len, MappingUnit::LARGEST);
        s
    }
}
