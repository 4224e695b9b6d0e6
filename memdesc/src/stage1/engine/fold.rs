//! Folding and collapse: when 16 entries may form a Contiguous run, when a
//! full table may become one block, and the split of a block into a table.
//!
//! Arm ARM DDI 0487M.a.a, D8.7.1 (the Contiguous bit: 16 adjacent entries whose
//! VA and output address are aligned to the run, with identical attributes;
//! rules 1 and 2 of docs/architecture.md) and D8.3.1.2 (block descriptors:
//! output address aligned to the block size). [`RunShape`] is the one
//! implementation of "these entries translate as one unit"; runs, block
//! collapses, the linter and the fold decisions all use it.

use super::rewrite::{Group, GroupChange};
use super::Stage1;
use crate::addr::PhysAddr;
use crate::stage1::descriptor::{
    leaf_allowed, level_size, AccessState, Descriptor, CONT_ENTRIES, ENTRIES,
};
use crate::stage1::hardware::{TableMemory, TranslationHw};
use crate::stage1::unit::MappingUnit;

/// The shape of a unit of `count` leaves at one level that translate as
/// one: the bits they must share ([`Descriptor::run_key`]) and the output
/// address of the first, aligned to the unit.
#[derive(Clone, Copy, Debug)]
pub(in crate::stage1) struct RunShape {
    key: u64,
    base_output: u64,
    level: u8,
}

impl RunShape {
    /// The unit of `count` entries at `level` in which `d` is entry
    /// `position`, if `d` is a leaf and the unit's output address is
    /// aligned to the unit's size.
    #[inline]
    pub(in crate::stage1) fn of(
        d: Descriptor,
        position: usize,
        level: u8,
        count: usize,
    ) -> Option<Self> {
        Self::around(d, position, level).filter(|shape| shape.is_aligned(count))
    }

    /// The unit in which the leaf `d` is entry `position`, aligned or not
    /// (`None` when `d` is no leaf at `level`). The linter names what is
    /// wrong with a run through it; everything else takes [`RunShape::of`].
    #[inline]
    pub(in crate::stage1) fn around(d: Descriptor, position: usize, level: u8) -> Option<Self> {
        if !d.is_leaf(level) {
            return None;
        }
        let size = level_size(level);
        Some(Self {
            key: d.run_key(),
            base_output: d.output(level).0.wrapping_sub(position as u64 * size),
            level,
        })
    }

    /// Rule 1: the unit's output address is aligned to `count` entries.
    #[inline]
    pub(in crate::stage1) fn is_aligned(&self, count: usize) -> bool {
        self.base_output & (level_size(self.level) * count as u64 - 1) == 0
    }

    /// Rule 2, the attributes: `d` shares the bits every entry of the unit
    /// must share.
    #[inline]
    pub(in crate::stage1) fn same_key(&self, d: Descriptor) -> bool {
        d.run_key() == self.key
    }

    /// Rule 2, the addresses: `d` has the output address of entry
    /// `position`.
    #[inline]
    pub(in crate::stage1) fn follows(&self, position: usize, d: Descriptor) -> bool {
        d.output(self.level).0
            == self
                .base_output
                .wrapping_add(position as u64 * level_size(self.level))
    }

    /// True when `d` can be entry `position` of this unit: a leaf with the
    /// same attributes and permissions and the consecutive output address.
    #[inline]
    pub(in crate::stage1) fn fits(&self, position: usize, d: Descriptor) -> bool {
        d.is_leaf(self.level) && self.same_key(d) && self.follows(position, d)
    }

    /// Output address of the unit's first entry.
    #[inline]
    pub(in crate::stage1) fn base_output(&self) -> u64 {
        self.base_output
    }
}

/// True when 16 entries at `level` form a legal contiguous run (rules 1-2).
pub(in crate::stage1) fn run_eligible(run: &[Descriptor; CONT_ENTRIES], level: u8) -> bool {
    RunShape::of(run[0], 0, level, CONT_ENTRIES).is_some_and(|shape| {
        run.iter()
            .enumerate()
            .skip(1)
            .all(|(k, d)| shape.fits(k, *d))
    })
}

/// True when all 16 entries of a group are leaves with the Contiguous bit.
pub(super) fn is_run(group: &[Descriptor; CONT_ENTRIES], level: u8) -> bool {
    group.iter().all(|d| d.is_leaf(level) && d.is_contiguous())
}

impl GroupChange {
    /// Sets or clears the Contiguous bit of every new leaf of a fully read
    /// group: set when the new entries form a run and `limit` allows runs
    /// at `level` (or the group already was one).
    pub(super) fn fold(&mut self, level: u8, limit: MappingUnit) {
        let fold = run_eligible(&self.new, level)
            && (limit.allows_contiguous(level) || is_run(&self.old, level));
        for d in self.new.iter_mut() {
            if d.is_leaf(level) {
                *d = d.with(Descriptor::CONT, fold);
            }
        }
    }
}

impl<P: TableMemory + TranslationHw> Stage1<P> {
    /// Reads the entries of a group outside `in_range` when a fold decision
    /// needs them: always when the group was folded, otherwise only while
    /// they could still form a run with the new in-range entries. Returns
    /// true when the whole group was read (the fold decision may run);
    /// false means no fold is possible and, the group being unfolded,
    /// nothing outside `in_range` changes.
    pub(super) fn complete_group(
        &self,
        group: &Group,
        in_range: core::ops::Range<usize>,
        change: &mut GroupChange,
    ) -> bool {
        if in_range == (0..CONT_ENTRIES) {
            return true;
        }
        let level = group.level;
        let first = in_range.start;
        let folded = change.old[first].is_leaf(level) && change.old[first].is_contiguous();
        let shape = RunShape::of(change.new[first], first, level, CONT_ENTRIES)
            .filter(|_| in_range.clone().all(|k| change.new[k].is_leaf(level)));
        if !folded && shape.is_none() {
            return false;
        }
        for k in (0..in_range.start).chain(in_range.end..CONT_ENTRIES) {
            let d = self.read(group.table, group.first + k);
            change.old[k] = d;
            change.new[k] = d;
            if !folded && !shape.is_some_and(|s| s.fits(k, d)) {
                return false;
            }
        }
        true
    }

    /// True when the unfolded group holding entry `index` now forms a legal
    /// run (stops reading at the first entry that does not fit).
    pub(super) fn run_candidate(&self, table: PhysAddr, level: u8, index: usize) -> bool {
        let first = index & !(CONT_ENTRIES - 1);
        let d = self.read(table, index);
        if d.is_contiguous() {
            return false;
        }
        let Some(shape) = RunShape::of(d, index - first, level, CONT_ENTRIES) else {
            return false;
        };
        (0..CONT_ENTRIES).all(|k| shape.fits(k, self.read(table, first + k)))
    }

    /// Fills a new (unlinked) table at `level + 1` with the translation of
    /// the block `block`, folded into contiguous runs.
    pub(super) fn fill_split(&mut self, table: PhysAddr, block: Descriptor, level: u8) {
        let child_level = level + 1;
        let child = block
            .with_leaf_level(child_level)
            .with(Descriptor::CONT, true)
            .with_output(block.output(level));
        self.fill(table, 0, child, level_size(child_level), ENTRIES);
        self.adjust(table, ENTRIES as i32);
    }

    /// The block at `level` (at `va`) equivalent to the full table `child`,
    /// if its 512 leaves are uniform and aligned and the block would not
    /// cover a pinned chunk; access/dirty are ORed into the block.
    pub(in crate::stage1) fn collapse_candidate(
        &self,
        child: PhysAddr,
        level: u8,
        va: u64,
        limit: MappingUnit,
    ) -> Option<Descriptor> {
        if !leaf_allowed(level)
            || !limit.allows_leaf(level)
            || !self.unit_allowed(va, level_size(level))
        {
            return None;
        }
        let child_level = level + 1;
        let first = self.read(child, 0);
        let last = self.read(child, ENTRIES - 1);
        let shape = RunShape::of(first, 0, child_level, ENTRIES)?;
        if !shape.fits(ENTRIES - 1, last) {
            return None;
        }
        let mut state = AccessState::NONE;
        for i in 0..ENTRIES {
            let d = self.read(child, i);
            if !shape.fits(i, d) {
                return None;
            }
            state = state.or(AccessState::of(d));
        }
        Some(
            first
                .with_leaf_level(level)
                .with(Descriptor::CONT, false)
                .with_output(PhysAddr(shape.base_output()))
                .with_state(state.young, state.dirty),
        )
    }
}
