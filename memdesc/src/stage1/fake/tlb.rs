//! The fake's TLB model and break-before-make checker.
//!
//! Arm ARM DDI 0487M.a.a, D8.17.1 (break-before-make: no valid entry may be
//! written where a translation for the same addresses may still be cached,
//! and no live change of output address, memory type or size without
//! FEAT_BBM level 2) and D8.17.8 (a descriptor store is made visible with
//! `DSB ISHST` before the TLBI that depends on it; a TLBI has completed only
//! after `DSB ISH`; a TLBI with a level hint only removes leaves of that
//! level; a last-level TLBI leaves walk caches alone; D8.7.1: a cached copy
//! of one entry of a run may translate any page of the run). It keeps one
//! [`EntryState`] per entry, and with a table window (see
//! [`FakePlatform::set_table_window`]) also checks that every descriptor
//! access goes through a VA the tree translates. "Rule N" is rule N of
//! docs/architecture.md, "Stage-1 translation".

use super::log::Event;
use super::{FakePlatform, FAKE_TABLE_BASE, NONE};
use crate::addr::{PhysAddr, VirtAddr};
use crate::stage1::descriptor::{level_shift, Descriptor, CONT_ENTRIES, ENTRIES};
use crate::stage1::hardware::{TlbiScope, TranslationHw};

/// What a TLB or walk cache may still hold for one entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum EntryState {
    /// Nothing cached differs from the entry.
    #[default]
    Clean,
    /// A cached copy of an old value may exist.
    Stale {
        /// It was a table descriptor: walk-cache entries (and the TLB
        /// entries of everything below) may exist.
        walk: bool,
        /// It was a Contiguous leaf: a TLB may hold it for the whole run,
        /// so it is gone only when TLBIs covered all 16 pages (`cover`).
        run: bool,
    },
    /// Covered by a TLBI; gone after the next `DSB ISH`.
    Invalidated {
        /// As for [`EntryState::Stale`].
        run: bool,
    },
}

impl EntryState {
    /// A stale table descriptor.
    pub(super) const STALE_WALK: Self = Self::Stale {
        walk: true,
        run: false,
    };

    /// A stale copy of `d` at `level` (a leaf, or an invalid entry).
    pub(super) fn stale_leaf(d: Descriptor, level: u8) -> Self {
        Self::Stale {
            walk: false,
            run: d.is_leaf(level) && d.is_contiguous(),
        }
    }

    /// True for [`EntryState::Clean`].
    pub(super) const fn is_clean(self) -> bool {
        matches!(self, Self::Clean)
    }

    /// True when the cached copy may cover the whole run.
    pub(super) const fn run(self) -> bool {
        matches!(
            self,
            Self::Stale { run: true, .. } | Self::Invalidated { run: true }
        )
    }

    /// The state after `next` happens to an entry in this state: a stale
    /// walk copy stays one, and a run copy stays a run copy until clean.
    pub(super) const fn then(self, next: Self) -> Self {
        match next {
            Self::Clean => Self::Clean,
            Self::Stale { walk, run } => Self::Stale {
                walk: walk || matches!(self, Self::Stale { walk: true, .. }),
                run: run || self.run(),
            },
            Self::Invalidated { run } => Self::Invalidated {
                run: run || self.run(),
            },
        }
    }
}

/// One [`EntryState`] in a byte, as a frame stores it: 0 is
/// [`EntryState::Clean`], so resetting a frame's 512 states on every table
/// allocation is a plain zero fill (the enum itself takes three bytes, and
/// a fill of it one store per entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PackedState(u8);

impl PackedState {
    /// [`EntryState::Clean`].
    pub(super) const CLEAN: Self = Self(0);
    const STALE: u8 = 1;
    const INVALIDATED: u8 = 2;
    const WALK: u8 = 4;
    const RUN: u8 = 8;

    /// The byte of `state`.
    #[inline]
    pub(super) const fn pack(state: EntryState) -> Self {
        Self(match state {
            EntryState::Clean => 0,
            EntryState::Stale { walk, run } => {
                Self::STALE | (walk as u8 * Self::WALK) | (run as u8 * Self::RUN)
            }
            EntryState::Invalidated { run } => Self::INVALIDATED | (run as u8 * Self::RUN),
        })
    }

    /// The state this byte holds.
    #[inline]
    pub(super) const fn get(self) -> EntryState {
        let run = self.0 & Self::RUN != 0;
        if self.0 & Self::STALE != 0 {
            EntryState::Stale {
                walk: self.0 & Self::WALK != 0,
                run,
            }
        } else if self.0 & Self::INVALIDATED != 0 {
            EntryState::Invalidated { run }
        } else {
            EntryState::Clean
        }
    }
}

/// A rule of D8.17 the engine broke, as seen by the checker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BbmViolation {
    /// A valid entry was written while a translation for part of its range
    /// could still be cached (no TLBI, or no `DSB ISH` after it).
    MakeBeforeInvalidated {
        /// Entry address.
        va: u64,
        /// Entry level.
        level: u8,
    },
    /// A live entry changed output address, memory type or size in place
    /// (size is allowed with FEAT_BBM level 2).
    LiveChangeNeedsBreak {
        /// Entry address.
        va: u64,
        /// Entry level.
        level: u8,
        /// Value before.
        old: u64,
        /// Value after.
        new: u64,
    },
    /// A valid leaf was written next to a valid leaf of its 16-entry group
    /// with a different Contiguous bit (rule 2) without FEAT_BBM level 2.
    ContiguousMismatch {
        /// Entry address.
        va: u64,
        /// Entry level.
        level: u8,
    },
    /// A TLBI was issued with descriptor stores not yet made visible by a DSB.
    TlbiBeforeStoreBarrier,
    /// A table was freed while a walk cache or TLB could still hold entries from it.
    FreedWhileCached {
        /// The table.
        table: PhysAddr,
    },
    /// The engine read or wrote a descriptor of `table` while the tree did
    /// not translate the VA it reaches that table at (a translation fault
    /// on a CPU; see [`FakePlatform::set_table_window`]).
    TableAccessUnmapped {
        /// The table.
        table: PhysAddr,
        /// The VA of the access.
        va: VirtAddr,
    },
    /// A table was freed with a non-zero valid-entry count (the page array
    /// refuses to free such a page-table frame, so on target it would leak).
    FreedWithValidCount {
        /// The table.
        table: PhysAddr,
        /// Its count when freed.
        valid: u32,
    },
}

impl FakePlatform<'_> {
    pub(super) fn violation(&self, v: BbmViolation) {
        let n = self.violation_count.get() as usize;
        let mut kept = self.violations.get();
        if n < kept.len() {
            kept[n] = Some(v);
            self.violations.set(kept);
        }
        self.violation_count.set(n as u64 + 1);
    }

    /// With a table window set: records a descriptor access to `table`
    /// whose VA the tree does not translate right now.
    #[inline]
    pub(super) fn check_reachable(&self, table: PhysAddr) {
        // Inline and cheap when off: benchmarks run the counting fake.
        if let Some(window) = self.table_window {
            self.check_translated(table, window);
        }
    }

    #[cold]
    fn check_translated(&self, table: PhysAddr, window: u64) {
        if !self.recording || self.root_frame == NONE {
            return;
        }
        let va = window + table.0.wrapping_sub(FAKE_TABLE_BASE);
        let mut f = self.root_frame as usize;
        let mut level = self.root_level;
        let translated = loop {
            let d = Descriptor(self.frames[f].entries[((va >> level_shift(level)) & 511) as usize]);
            if d.is_table(level) {
                f = (d.table_address().0.wrapping_sub(FAKE_TABLE_BASE) >> 12) as usize;
                level += 1;
                if f >= self.high_water {
                    break false;
                }
            } else {
                break d.is_leaf(level);
            }
        };
        if !translated {
            self.violation(BbmViolation::TableAccessUnmapped {
                table,
                va: VirtAddr(va),
            });
        }
    }

    fn set_state(&mut self, f: usize, i: usize, next: EntryState) {
        let frame = &mut self.frames[f];
        let was = frame.state[i].get();
        if matches!(next, EntryState::Stale { .. }) {
            // A new stale copy: earlier TLBIs did not remove it.
            frame.cover[i] = 0;
        }
        if was.is_clean() && !next.is_clean() {
            frame.meta.unclean += 1;
        } else if !was.is_clean() && next.is_clean() {
            frame.meta.unclean -= 1;
        }
        frame.state[i] = PackedState::pack(was.then(next));
    }

    /// A table descriptor pointing at `table` was removed: its entries may
    /// still be cached.
    fn detach(&mut self, table: PhysAddr) {
        let f = self.frame(table);
        self.frames[f].meta.live = false;
        let level = self.frames[f].meta.level;
        for i in 0..ENTRIES {
            let d = Descriptor(self.frames[f].entries[i]);
            if d.is_table(level) {
                self.set_state(f, i, EntryState::STALE_WALK);
                self.detach(d.table_address());
            } else if d.is_valid() {
                self.set_state(f, i, EntryState::stale_leaf(d, level));
            }
        }
    }

    /// `table` was linked at `va`, `level`, from entry `index` of frame `parent`.
    fn attach(&mut self, table: PhysAddr, va: u64, level: u8, parent: usize, index: usize) {
        let f = self.frame(table);
        let m = &mut self.frames[f].meta;
        m.mapped = true;
        m.live = true;
        m.base_va = va;
        m.level = level;
        m.parent = parent as u32;
        m.parent_index = index as u16;
        for i in 0..ENTRIES {
            let d = Descriptor(self.frames[f].entries[i]);
            if d.is_table(level) {
                let cva = va + ((i as u64) << level_shift(level));
                self.attach(d.table_address(), cva, level + 1, f, i);
            }
        }
    }

    fn any_unclean(&self, lo: u64, hi: u64) -> bool {
        self.frames[..self.high_water].iter().any(|fr| {
            if !fr.meta.mapped || fr.meta.unclean == 0 {
                return false;
            }
            let sh = level_shift(fr.meta.level);
            let base = fr.meta.base_va;
            let end = base + ((ENTRIES as u64) << sh);
            // Widen to whole runs: a stale Contiguous entry covers its run.
            let run = (CONT_ENTRIES as u64) << sh;
            let (wlo, whi) = (lo & !(run - 1), hi.saturating_add(run - 1) & !(run - 1));
            if whi <= base || wlo >= end {
                return false;
            }
            let i0 = (wlo.max(base) - base) >> sh;
            let i1 = ((whi.min(end) - 1 - base) >> sh) + 1;
            (i0..i1).any(|i| {
                let state = fr.state[i as usize].get();
                let entry_va = base + (i << sh);
                !state.is_clean() && (state.run() || (entry_va < hi && entry_va + (1 << sh) > lo))
            })
        })
    }

    /// With FEAT_BBM below level 2, a valid leaf must never sit next to a
    /// valid leaf of its group with a different Contiguous bit (misprogrammed
    /// run, TLB conflict possible).
    fn check_group(&mut self, f: usize, i: usize, n: Descriptor, va: u64, level: u8) {
        if self.features.bbm_level >= 2 || level == 0 || !n.is_leaf(level) {
            return;
        }
        let g = i & !(CONT_ENTRIES - 1);
        let mixed = (g..g + CONT_ENTRIES).any(|k| {
            let d = Descriptor(self.frames[f].entries[k]);
            k != i && d.is_leaf(level) && d.is_contiguous() != n.is_contiguous()
        });
        if mixed {
            self.violation(BbmViolation::ContiguousMismatch { va, level });
        }
    }

    pub(super) fn check_write(&mut self, f: usize, i: usize, old: u64, new: u64) {
        let m = self.frames[f].meta;
        if !self.recording || !m.live {
            return;
        }
        self.stores_unsynced = true;
        let level = m.level;
        let sh = level_shift(level);
        let va = m.base_va + ((i as u64) << sh);
        let (o, n) = (Descriptor(old), Descriptor(new));
        match (o.is_valid(), n.is_valid()) {
            (true, false) => {
                if o.is_table(level) {
                    self.set_state(f, i, EntryState::STALE_WALK);
                    self.detach(o.table_address());
                } else {
                    self.set_state(f, i, EntryState::stale_leaf(o, level));
                }
            }
            (false, true) => {
                if self.any_unclean(va, va + (1 << sh)) {
                    self.violation(BbmViolation::MakeBeforeInvalidated { va, level });
                }
                self.check_group(f, i, n, va, level);
                if n.is_table(level) {
                    self.attach(n.table_address(), va, level + 1, f, i);
                }
            }
            // Setting AF or the dirty state needs no TLB maintenance: a
            // stale copy only makes the hardware set them again.
            (true, true) if state_upgrade(o, n, level) => {}
            (true, true) if old != new => {
                let (ot, nt) = (o.is_table(level), n.is_table(level));
                let type_change = if !ot && !nt {
                    o.output(level) != n.output(level)
                        || o.attr_index() != n.attr_index()
                        || (old ^ new) & (Descriptor::SH_MASK | Descriptor::NG) != 0
                } else {
                    ot && nt
                };
                let size_change = ot != nt || (!ot && o.is_contiguous() != n.is_contiguous());
                // A block <-> table change in place is only a size change
                // when every leaf below the table translates as the block
                // did: same output, memory type, shareability, nG.
                let type_change = type_change
                    || (!ot
                        && nt
                        && !self.same_translation(n.table_address(), level + 1, o, level))
                    || (ot
                        && !nt
                        && !self.same_translation(o.table_address(), level + 1, n, level));
                if type_change || (size_change && self.features.bbm_level < 2) {
                    self.violation(BbmViolation::LiveChangeNeedsBreak {
                        va,
                        level,
                        old,
                        new,
                    });
                }
                if ot {
                    self.set_state(f, i, EntryState::STALE_WALK);
                    self.detach(o.table_address());
                } else {
                    self.set_state(f, i, EntryState::stale_leaf(o, level));
                }
                self.check_group(f, i, n, va, level);
                if nt {
                    self.attach(n.table_address(), va, level + 1, f, i);
                }
            }
            _ => {}
        }
    }

    /// True when every valid leaf below `table` (at `level`) translates as
    /// the leaf `block` at `block_level` does: output address, AttrIndx,
    /// SH and nG.
    fn same_translation(
        &self,
        table: PhysAddr,
        level: u8,
        block: Descriptor,
        block_level: u8,
    ) -> bool {
        let f = self.frame(table);
        let oa = block.output(block_level).0;
        let key = Descriptor::ATTR_INDX_MASK | Descriptor::SH_MASK | Descriptor::NG;
        let sh = level_shift(level);
        (0..ENTRIES).all(|i| {
            let d = Descriptor(self.frames[f].entries[i]);
            let at = oa + ((i as u64) << sh);
            if d.is_table(level) {
                self.same_translation(
                    d.table_address(),
                    level + 1,
                    block.with_output(PhysAddr(at)),
                    level,
                )
            } else if d.is_leaf(level) {
                d.output(level).0 == at && (d.bits() ^ block.bits()) & key == 0
            } else {
                true
            }
        })
    }

    fn tlbi_covering(&mut self, lo: u64, hi: u64, scope: Option<TlbiScope>) {
        if !self.recording {
            return;
        }
        if self.stores_unsynced {
            self.violation(BbmViolation::TlbiBeforeStoreBarrier);
        }
        for f in 0..self.high_water {
            let m = self.frames[f].meta;
            if !m.mapped || m.unclean == 0 {
                continue;
            }
            let sh = level_shift(m.level);
            let end = m.base_va + ((ENTRIES as u64) << sh);
            if hi <= m.base_va || lo >= end {
                continue;
            }
            let i0 = ((lo.max(m.base_va) - m.base_va) >> sh) as usize;
            let i1 = (((hi.min(end) - 1 - m.base_va) >> sh) + 1) as usize;
            // Stale run entries of the groups touched count too.
            let (w0, w1) = (
                i0 & !(CONT_ENTRIES - 1),
                i1.next_multiple_of(CONT_ENTRIES).min(ENTRIES),
            );
            for i in w0..w1 {
                let state = self.frames[f].state[i].get();
                let hit = match (state, scope) {
                    (EntryState::Stale { .. }, None) => true,
                    (EntryState::Stale { walk: false, .. }, Some(s)) => {
                        s.level.is_none_or(|l| l == m.level)
                    }
                    (EntryState::Stale { walk: true, .. }, Some(s)) => {
                        !s.last_level_only && s.level.is_none()
                    }
                    _ => false,
                };
                if !hit {
                    continue;
                }
                let gone = if state.run() {
                    let g = i & !(CONT_ENTRIES - 1);
                    let mut mask = 0u16;
                    for p in 0..CONT_ENTRIES {
                        let plo = m.base_va + (((g + p) as u64) << sh);
                        if plo < hi && plo + (1 << sh) > lo {
                            mask |= 1 << p;
                        }
                    }
                    self.frames[f].cover[i] |= mask;
                    self.frames[f].cover[i] == u16::MAX
                } else {
                    (i0..i1).contains(&i)
                };
                if gone {
                    self.set_state(f, i, EntryState::Invalidated { run: false });
                }
            }
        }
    }
}

/// True when `n` is the leaf `o` with only AF, the hardware dirty state
/// (AP\[2\] cleared under DBM) or the software dirty bit newly set.
fn state_upgrade(o: Descriptor, n: Descriptor, level: u8) -> bool {
    let state = Descriptor::AF | Descriptor::AP_READ_ONLY | Descriptor::SW_DIRTY;
    let gained = n.bits() & !o.bits();
    let lost = o.bits() & !n.bits();
    o.is_leaf(level)
        && (o.bits() ^ n.bits()) & !state == 0
        && gained & !(Descriptor::AF | Descriptor::SW_DIRTY) == 0
        && (lost == 0 || (lost == Descriptor::AP_READ_ONLY && o.has(Descriptor::DBM)))
}

impl TranslationHw for FakePlatform<'_> {
    #[inline]
    fn tlbi_va(&mut self, va: VirtAddr, scope: TlbiScope) {
        self.tlbi_race();
        self.counters.tlbi_va += 1;
        self.record(Event::TlbiVa { va, scope });
        self.tlbi_covering(va.0, va.0 + 1, Some(scope));
    }

    fn tlbi_va_range(&mut self, va: VirtAddr, len: u64, scope: TlbiScope) {
        self.tlbi_race();
        self.counters.tlbi_range += 1;
        self.record(Event::TlbiRange { va, len, scope });
        self.tlbi_covering(va.0, va.0 + len, Some(scope));
    }

    fn tlbi_all(&mut self) {
        self.tlbi_race();
        self.counters.tlbi_all += 1;
        self.record(Event::TlbiAll);
        self.tlbi_covering(0, u64::MAX, None);
    }

    #[inline]
    fn dsb_ishst(&mut self) {
        self.counters.dsb_ishst += 1;
        self.record(Event::DsbIshst);
        self.stores_unsynced = false;
    }

    fn dsb_ish(&mut self) {
        self.counters.dsb_ish += 1;
        self.record(Event::DsbIsh);
        self.stores_unsynced = false;
        if !self.recording {
            return;
        }
        for f in 0..self.high_water {
            if self.frames[f].meta.unclean == 0 {
                continue;
            }
            for i in 0..ENTRIES {
                if matches!(
                    self.frames[f].state[i].get(),
                    EntryState::Invalidated { .. }
                ) {
                    self.set_state(f, i, EntryState::Clean);
                }
            }
        }
    }

    #[inline]
    fn isb(&mut self) {
        self.counters.isb += 1;
        self.record(Event::Isb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every state survives its byte, and the byte of `Clean` is 0 (what a
    /// frame's zero fill relies on).
    #[test]
    fn every_entry_state_round_trips_through_its_byte() {
        assert_eq!(PackedState::pack(EntryState::Clean), PackedState::CLEAN);
        assert_eq!(PackedState::default(), PackedState::CLEAN);
        let mut states = vec![EntryState::Clean];
        for walk in [false, true] {
            for run in [false, true] {
                states.push(EntryState::Stale { walk, run });
            }
        }
        states.extend([false, true].map(|run| EntryState::Invalidated { run }));
        for s in &states {
            assert_eq!(PackedState::pack(*s).get(), *s, "{s:?}");
        }
        let bytes: std::collections::BTreeSet<_> = states
            .iter()
            .map(|s| PackedState::pack(*s))
            .map(|p| p.0)
            .collect();
        assert_eq!(bytes.len(), states.len(), "two states share a byte");
    }
}
