//! The fake's table memory: 4 KiB frames in a lent slice, a free list,
//! valid-entry counts, allocation limits and failures on demand.
//!
//! Implements the [`TableMemory`] contract (see its `# Safety`) on host
//! memory; every store is logged and shown to the checker in [`super::tlb`].

use super::log::Event;
use super::tlb::{BbmViolation, PackedState};
use super::{FakePlatform, FAKE_TABLE_BASE, NONE};
use crate::addr::PhysAddr;
use crate::stage1::descriptor::ENTRIES;
use crate::stage1::hardware::{TableMemory, TableMemoryError};

/// What the fake knows about a frame besides its entries.
#[derive(Clone, Copy, Debug)]
pub(super) struct FrameMeta {
    pub(super) in_use: bool,
    pub(super) valid: u32,
    pub(super) next_free: u32,
    /// Has a VA identity (linked now, or detached with possibly cached entries).
    pub(super) mapped: bool,
    /// Reachable from the root: writes are checked.
    pub(super) live: bool,
    pub(super) base_va: u64,
    pub(super) level: u8,
    pub(super) parent: u32,
    pub(super) parent_index: u16,
    pub(super) unclean: u32,
}

impl FrameMeta {
    pub(super) const EMPTY: Self = Self {
        in_use: false,
        valid: 0,
        next_free: NONE,
        mapped: false,
        live: false,
        base_va: 0,
        level: 0,
        parent: NONE,
        parent_index: 0,
        unclean: 0,
    };
}

/// One 4 KiB table frame of the fake, with the checker's per-entry state.
#[derive(Clone, Debug)]
pub struct FakeFrame {
    pub(super) entries: [u64; ENTRIES],
    /// The checker's [`super::tlb::EntryState`] of each entry.
    pub(super) state: [PackedState; ENTRIES],
    /// For a stale Contiguous entry: the pages of its run a TLBI has
    /// covered so far (bit p: page p of the 16). A cached copy of one entry
    /// of a run may translate any page of the run (D8.7.1), so it is gone
    /// only when all 16 were invalidated.
    pub(super) cover: [u16; ENTRIES],
    pub(super) meta: FrameMeta,
}

impl FakeFrame {
    /// An unused frame.
    pub const fn new() -> Self {
        Self {
            entries: [0; ENTRIES],
            state: [PackedState::CLEAN; ENTRIES],
            cover: [0; ENTRIES],
            meta: FrameMeta::EMPTY,
        }
    }
}

impl Default for FakeFrame {
    fn default() -> Self {
        Self::new()
    }
}

impl FakePlatform<'_> {
    /// Stores `new` into entry `i` of frame `f`: counted, logged, checked.
    #[inline]
    pub(super) fn store(&mut self, f: usize, i: usize, new: u64) {
        let old = self.frames[f].entries[i];
        self.frames[f].entries[i] = new;
        self.counters.writes += 1;
        if self.recording {
            self.record(Event::Write {
                table: PhysAddr(FAKE_TABLE_BASE + ((f as u64) << 12)),
                index: i as u16,
                old,
                new,
            });
            self.check_write(f, i, old, new);
        }
    }
}

// SAFETY: frames come from the borrowed slice, are zeroed on allocation and
// never handed out twice while in use (free list plus `in_use` flag); every
// access is bounds-checked safe Rust on host memory, and the fake is
// single-threaded, so plain loads/stores are atomic with respect to it.
unsafe impl TableMemory for FakePlatform<'_> {
    fn alloc_table(&mut self) -> Result<PhysAddr, TableMemoryError> {
        if self.busy {
            return Err(TableMemoryError::Busy);
        }
        if let Some(n) = self.allocs_left.as_mut() {
            if *n == 0 {
                return Err(TableMemoryError::OutOfMemory);
            }
            *n -= 1;
        }
        let f = if self.free_head != NONE {
            let f = self.free_head as usize;
            self.free_head = self.frames[f].meta.next_free;
            f
        } else if self.high_water < self.frames.len() {
            self.high_water += 1;
            self.high_water - 1
        } else {
            return Err(TableMemoryError::OutOfMemory);
        };
        let fr = &mut self.frames[f];
        fr.entries = [0; ENTRIES];
        fr.state = [PackedState::CLEAN; ENTRIES];
        fr.meta = FrameMeta {
            in_use: true,
            ..FrameMeta::EMPTY
        };
        self.in_use += 1;
        self.counters.allocs += 1;
        let pa = PhysAddr(FAKE_TABLE_BASE + ((f as u64) << 12));
        if self.recording && !self.root_set {
            self.root_set = true;
            self.root_frame = f as u32;
            let m = &mut self.frames[f].meta;
            m.mapped = true;
            m.live = true;
            m.level = self.root_level;
        }
        self.record(Event::Alloc(pa));
        Ok(pa)
    }

    unsafe fn free_table(&mut self, table: PhysAddr) -> Result<(), TableMemoryError> {
        if self.busy {
            return Err(TableMemoryError::Busy);
        }
        let f = self.frame(table);
        if self.recording {
            let m = self.frames[f].meta;
            let parent_dirty = m.parent != NONE
                && !self.frames[m.parent as usize].state[m.parent_index as usize]
                    .get()
                    .is_clean();
            if m.unclean != 0 || parent_dirty {
                self.violation(BbmViolation::FreedWhileCached { table });
            }
            if m.unclean != 0 {
                self.frames[f].state = [PackedState::CLEAN; ENTRIES];
            }
            if m.valid != 0 {
                self.violation(BbmViolation::FreedWithValidCount {
                    table,
                    valid: m.valid,
                });
            }
        }
        self.frames[f].meta = FrameMeta {
            next_free: self.free_head,
            ..FrameMeta::EMPTY
        };
        self.free_head = f as u32;
        self.in_use -= 1;
        self.counters.frees += 1;
        self.record(Event::Free(table));
        Ok(())
    }

    #[inline]
    unsafe fn read_entry(&self, table: PhysAddr, index: usize) -> u64 {
        self.reads.set(self.reads.get() + 1);
        self.check_reachable(table);
        let f = ((table.0 - FAKE_TABLE_BASE) >> 12) as usize;
        self.frames[f].entries[index]
    }

    #[inline]
    unsafe fn write_entry(&mut self, table: PhysAddr, index: usize, value: u64) {
        self.check_reachable(table);
        let f = self.frame(table);
        self.store(f, index, value);
    }

    unsafe fn fill_entries(
        &mut self,
        table: PhysAddr,
        index: usize,
        first: u64,
        step: u64,
        count: usize,
    ) {
        self.check_reachable(table);
        let f = self.frame(table);
        if self.recording {
            for k in 0..count {
                self.store(f, index + k, first + k as u64 * step);
            }
        } else {
            for (k, e) in self.frames[f].entries[index..index + count]
                .iter_mut()
                .enumerate()
            {
                *e = first + k as u64 * step;
            }
            self.counters.writes += count as u64;
        }
    }

    #[inline]
    unsafe fn compare_exchange_entry(
        &mut self,
        table: PhysAddr,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<(), u64> {
        self.swaps += 1;
        if let Some((swap, (t, i), write)) = self.race {
            if swap == (table, index) {
                self.race = None;
                self.race_effect = Some(self.hw_touch(t, i, write));
            }
        }
        self.check_reachable(table);
        let f = self.frame(table);
        let found = self.frames[f].entries[index];
        if found != current {
            return Err(found);
        }
        self.store(f, index, new);
        Ok(())
    }

    #[inline]
    unsafe fn adjust_valid(
        &mut self,
        table: PhysAddr,
        delta: i32,
    ) -> Result<u32, TableMemoryError> {
        if self.busy {
            return Err(TableMemoryError::Busy);
        }
        let f = self.frame(table);
        let m = &mut self.frames[f].meta;
        match m.valid.checked_add_signed(delta) {
            Some(n) if n as usize <= ENTRIES => {
                m.valid = n;
                Ok(n)
            }
            _ => Err(TableMemoryError::CountOutOfRange { table }),
        }
    }
}
