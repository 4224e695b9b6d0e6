//! Host fakes of [`TableMemory`] and [`TranslationHw`]: translation tables in
//! host memory, an operation log, counters and a break-before-make checker.
//!
//! The checker enforces Arm ARM DDI 0487, D8.14 (break-before-make: no valid
//! entry may be written where a translation for the same addresses may still
//! be cached, and no live change of output address, memory type or size
//! without FEAT_BBM level 2) and D8.13 (a descriptor store is made visible
//! with `DSB ISHST` before the TLBI that depends on it; a TLBI has completed
//! only after `DSB ISH`; a TLBI with a level hint only removes leaves of that
//! level; a last-level TLBI leaves walk caches alone). It tracks one state per
//! entry: clean, stale (a cached copy may exist), or invalidated (TLBI issued,
//! DSB pending).
//!
//! No heap: the caller lends the frames and the log buffer, so the fake
//! compiles in the `no_std` crate and tests or benchmarks allocate with `vec!`.
//! [`FakePlatform::counting`] is the fast variant for benchmarks: counters
//! only, no log, no checker.

use core::cell::Cell;

use super::descriptor::{level_shift, Descriptor, CONT_ENTRIES, ENTRIES};
use super::hardware::{Features, TableMemory, TableMemoryError, TlbiScope, TranslationHw};
use crate::addr::{PhysAddr, VirtAddr};

/// Physical address of the first fake frame (frame `n` is at base + n * 4 KiB).
pub const FAKE_TABLE_BASE: u64 = 0x40_0000_0000;

const CLEAN: u8 = 0;
const STALE: u8 = 1;
const STALE_WALK: u8 = 2;
const INVALIDATED: u8 = 3;
/// Flag on a non-clean state: the stale copy came from a Contiguous entry,
/// so a TLB may hold it for the whole run (D8.6.1), not only its own page.
const RUN: u8 = 0x80;
const NONE: u32 = u32::MAX;

/// An entry of a table frame: (table, index).
type Entry = (PhysAddr, usize);

#[derive(Clone, Copy, Debug)]
struct FrameMeta {
    in_use: bool,
    valid: u32,
    next_free: u32,
    /// Has a VA identity (linked now, or detached with possibly cached entries).
    mapped: bool,
    /// Reachable from the root: writes are checked.
    live: bool,
    base_va: u64,
    level: u8,
    parent: u32,
    parent_index: u16,
    unclean: u32,
}

impl FrameMeta {
    const EMPTY: Self = Self {
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
    entries: [u64; ENTRIES],
    state: [u8; ENTRIES],
    /// For a stale Contiguous entry: the pages of its run a TLBI has
    /// covered so far (bit p: page p of the 16). A cached copy of one entry
    /// of a run may translate any page of the run (D8.6.1), so it is gone
    /// only when all 16 were invalidated.
    cover: [u16; ENTRIES],
    meta: FrameMeta,
}

impl FakeFrame {
    /// An unused frame.
    pub const fn new() -> Self {
        Self {
            entries: [0; ENTRIES],
            state: [CLEAN; ENTRIES],
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

/// One recorded operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A descriptor store (plain or compare-and-swap).
    Write {
        /// Table frame.
        table: PhysAddr,
        /// Entry index.
        index: u16,
        /// Value before.
        old: u64,
        /// Value after.
        new: u64,
    },
    /// `TLBI VA(L)E1IS`.
    TlbiVa {
        /// Address.
        va: VirtAddr,
        /// Scope.
        scope: TlbiScope,
    },
    /// `TLBI RVA(L)E1IS`.
    TlbiRange {
        /// First address.
        va: VirtAddr,
        /// Length in bytes.
        len: u64,
        /// Scope.
        scope: TlbiScope,
    },
    /// `TLBI VMALLE1IS`.
    TlbiAll,
    /// `DSB ISHST`.
    DsbIshst,
    /// `DSB ISH`.
    DsbIsh,
    /// `ISB`.
    Isb,
    /// A table frame was allocated.
    Alloc(PhysAddr),
    /// A table frame was freed.
    Free(PhysAddr),
}

impl Event {
    /// True for any TLBI.
    pub const fn is_tlbi(&self) -> bool {
        matches!(
            self,
            Self::TlbiVa { .. } | Self::TlbiRange { .. } | Self::TlbiAll
        )
    }
}

/// Operation counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Descriptor reads.
    pub reads: u64,
    /// Descriptor writes (successful stores and compare-and-swaps).
    pub writes: u64,
    /// `TLBI` by VA.
    pub tlbi_va: u64,
    /// `TLBI` by range.
    pub tlbi_range: u64,
    /// `TLBI VMALLE1IS`.
    pub tlbi_all: u64,
    /// `DSB ISHST`.
    pub dsb_ishst: u64,
    /// `DSB ISH`.
    pub dsb_ish: u64,
    /// `ISB`.
    pub isb: u64,
    /// Table frames allocated.
    pub allocs: u64,
    /// Table frames freed.
    pub frees: u64,
}

impl Counters {
    /// All TLBI instructions.
    pub const fn tlbi(&self) -> u64 {
        self.tlbi_va + self.tlbi_range + self.tlbi_all
    }

    /// All DSB instructions.
    pub const fn dsb(&self) -> u64 {
        self.dsb_ishst + self.dsb_ish
    }
}

/// A rule of D8.13/D8.14 the engine broke, as seen by the checker.
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

/// Fake table memory and TLB: see the module documentation.
pub struct FakePlatform<'a> {
    frames: &'a mut [FakeFrame],
    high_water: usize,
    free_head: u32,
    in_use: usize,
    peak_in_use: usize,
    recording: bool,
    features: Features,
    root_level: u8,
    root_set: bool,
    log: &'a mut [Event],
    log_len: usize,
    log_dropped: u64,
    counters: Counters,
    reads: Cell<u64>,
    violations: Cell<[Option<BbmViolation>; 8]>,
    violation_count: Cell<u64>,
    /// VA at which the engine reaches table frame 0 through the tree it
    /// edits (frame n at `va + n * 4 KiB`), if the tree maps its own tables.
    table_window: Option<u64>,
    /// Frame index of the root table.
    root_frame: u32,
    stores_unsynced: bool,
    allocs_left: Option<u64>,
    /// Just before the next compare-and-swap on (table, index): the
    /// hardware accesses through entry (table, index) of the second pair.
    race: Option<(Entry, Entry, bool)>,
    /// Just before the next TLBI: the hardware accesses through this entry.
    race_tlbi: Option<(PhysAddr, usize, bool)>,
    swaps: u64,
    busy: bool,
    race_effect: Option<(bool, bool)>,
}

impl<'a> FakePlatform<'a> {
    /// A recording fake: logs into `log` (events past its end are counted
    /// but dropped), checks break-before-make for a tree whose root (the
    /// first table allocated) is at `root_level`, with `features` deciding
    /// what FEAT_BBM allows.
    pub fn new(
        frames: &'a mut [FakeFrame],
        log: &'a mut [Event],
        features: Features,
        root_level: u8,
    ) -> Self {
        Self {
            frames,
            high_water: 0,
            free_head: NONE,
            in_use: 0,
            peak_in_use: 0,
            recording: true,
            features,
            root_level,
            root_set: false,
            log,
            log_len: 0,
            log_dropped: 0,
            counters: Counters::default(),
            reads: Cell::new(0),
            violations: Cell::new([None; 8]),
            violation_count: Cell::new(0),
            table_window: None,
            root_frame: NONE,
            stores_unsynced: false,
            allocs_left: None,
            race: None,
            race_tlbi: None,
            swaps: 0,
            busy: false,
            race_effect: None,
        }
    }

    /// A counting-only fake (no log, no checker) for benchmarks.
    pub fn counting(frames: &'a mut [FakeFrame]) -> Self {
        let mut f = Self::new(frames, &mut [], Features::NONE, 0);
        f.recording = false;
        f
    }

    /// Counters since creation or the last [`FakePlatform::reset_counters`].
    pub fn counters(&self) -> Counters {
        Counters {
            reads: self.reads.get(),
            ..self.counters
        }
    }

    /// Zeroes the counters and the log.
    pub fn reset_counters(&mut self) {
        self.counters = Counters::default();
        self.reads.set(0);
        self.log_len = 0;
        self.log_dropped = 0;
    }

    /// The events logged since the last reset (up to the buffer size).
    pub fn log(&self) -> &[Event] {
        &self.log[..self.log_len]
    }

    /// Events that did not fit in the log buffer.
    pub fn log_dropped(&self) -> u64 {
        self.log_dropped
    }

    /// Violations found by the checker (the first eight are kept).
    pub fn violations(&self) -> impl Iterator<Item = BbmViolation> + '_ {
        self.violations.get().into_iter().flatten()
    }

    /// Number of violations found by the checker.
    pub fn violation_count(&self) -> u64 {
        self.violation_count.get()
    }

    /// Models a tree that maps its own table frames, as the firmware's
    /// identity map of RAM does: from now on table frame n is reached at
    /// `va + n * 4 KiB` through the tree itself, and every descriptor
    /// access of the engine whose VA that tree does not translate (for
    /// instance inside a block cleared by break-before-make) is recorded
    /// as [`BbmViolation::TableAccessUnmapped`]: on a CPU it is a
    /// translation fault. `None` turns the check off.
    pub fn set_table_window(&mut self, va: Option<VirtAddr>) {
        self.table_window = va.map(|v| v.0);
    }

    /// Entries whose old translation may still be cached, plus one if
    /// stores were not made visible: zero after every complete operation.
    pub fn unflushed(&self) -> u64 {
        let frames: u64 = self.frames[..self.high_water]
            .iter()
            .map(|f| f.meta.unclean as u64)
            .sum();
        frames + self.stores_unsynced as u64
    }

    /// Table frames in use now.
    pub fn tables_in_use(&self) -> usize {
        self.in_use
    }

    /// Most table frames in use at once.
    pub fn peak_tables(&self) -> usize {
        self.peak_in_use
    }

    /// While `busy`, every allocation, free and valid-count access fails
    /// with [`TableMemoryError::Busy`] (as the firmware's provider does
    /// when it is re-entered); descriptor accesses still work.
    pub fn set_busy(&mut self, busy: bool) {
        self.busy = busy;
    }

    /// Lets only `n` more allocations succeed (`None`: unlimited).
    pub fn set_alloc_limit(&mut self, n: Option<u64>) {
        self.allocs_left = n;
    }

    /// Plays the hardware (FEAT_HAFDBS): an access through entry `index` of
    /// `table` sets AF, and a write to a DBM entry clears AP\[2\]. Not counted.
    ///
    /// Returns whether the access happened and whether it was a write: the
    /// hardware updates only a valid leaf, and records a write only where
    /// DBM allows it (otherwise the write faults and does not happen).
    pub fn hw_touch(&mut self, table: PhysAddr, index: usize, write: bool) -> (bool, bool) {
        let f = self.frame(table);
        let d = Descriptor(self.frames[f].entries[index]);
        // The counting fake tracks no levels: any valid entry will do.
        let leaf = if self.recording {
            d.is_leaf(self.frames[f].meta.level)
        } else {
            d.is_valid()
        };
        if !leaf {
            // The hardware never updates an invalid or table descriptor.
            return (false, false);
        }
        let mut n = d.with(Descriptor::AF, true);
        let written = write && d.has(Descriptor::DBM);
        if written {
            n = n.with(Descriptor::AP_READ_ONLY, false);
        }
        self.frames[f].entries[index] = n.bits();
        (true, written)
    }

    /// What the last race that fired did ([`FakePlatform::hw_touch`]'s
    /// result), since the last call; pending races are dropped.
    pub fn take_race_effect(&mut self) -> Option<(bool, bool)> {
        self.race = None;
        self.race_tlbi = None;
        self.race_effect.take()
    }

    /// Plays a hardware race: just before the next compare-and-swap on entry
    /// `index` of `table`, the hardware accesses (and, if `write`, writes)
    /// through it, as [`FakePlatform::hw_touch`]. The swap then fails and the
    /// engine must carry the new access/dirty state into what it writes.
    pub fn race_next_swap(&mut self, table: PhysAddr, index: usize, write: bool) {
        self.race = Some(((table, index), (table, index), write));
    }

    /// Like [`FakePlatform::race_next_swap`], but the hardware goes through
    /// another entry, `touch`: for instance a leaf of a table whose parent
    /// entry the engine is about to swap (a walker that read the parent
    /// before the swap can still use the old table).
    pub fn race_next_swap_touching(&mut self, swap: Entry, touch: Entry, write: bool) {
        self.race = Some((swap, touch, write));
    }

    /// Plays the hardware just before the next TLBI: an access through
    /// entry `index` of `table` (as [`FakePlatform::hw_touch`]), as a
    /// walker may do until the TLBI has completed.
    pub fn race_next_tlbi(&mut self, table: PhysAddr, index: usize, write: bool) {
        self.race_tlbi = Some((table, index, write));
    }

    /// Compare-and-swap attempts since creation.
    pub fn swaps(&self) -> u64 {
        self.swaps
    }

    fn tlbi_race(&mut self) {
        if let Some((t, i, write)) = self.race_tlbi.take() {
            self.race_effect = Some(self.hw_touch(t, i, write));
        }
    }

    #[inline]
    fn frame(&self, table: PhysAddr) -> usize {
        let f = (table.0.wrapping_sub(FAKE_TABLE_BASE) >> 12) as usize;
        // The counting fake only bounds-checks (it must stay cheap for
        // benchmarks); the recording fake also catches use of a freed table.
        assert!(f < self.high_water, "fake: {table:?} is not a table");
        assert!(
            !self.recording || self.frames[f].meta.in_use,
            "fake: {table:?} is not an allocated table"
        );
        f
    }

    #[inline]
    fn record(&mut self, e: Event) {
        if !self.recording {
            return;
        }
        if self.log_len < self.log.len() {
            self.log[self.log_len] = e;
            self.log_len += 1;
        } else {
            self.log_dropped += 1;
        }
    }

    fn violation(&self, v: BbmViolation) {
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
    fn check_reachable(&self, table: PhysAddr) {
        let Some(window) = self.table_window else {
            return;
        };
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

    fn set_state(&mut self, f: usize, i: usize, st: u8) {
        let fr = &mut self.frames[f];
        let was = fr.state[i];
        if st & !RUN == STALE || st & !RUN == STALE_WALK {
            // A new stale copy: earlier TLBIs did not remove it.
            fr.cover[i] = 0;
        }
        if was == CLEAN && st != CLEAN {
            fr.meta.unclean += 1;
        } else if was != CLEAN && st == CLEAN {
            fr.meta.unclean -= 1;
        }
        fr.state[i] = if st == CLEAN {
            CLEAN
        } else {
            let base = if was & !RUN == STALE_WALK && st & !RUN == STALE {
                STALE_WALK
            } else {
                st & !RUN
            };
            base | ((was | st) & RUN)
        };
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
                self.set_state(f, i, STALE_WALK);
                self.detach(d.table_address());
            } else if d.is_valid() {
                self.set_state(f, i, STALE | run_flag(d, level));
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
                let st = fr.state[i as usize];
                let eva = base + (i << sh);
                st != CLEAN && (st & RUN != 0 || (eva < hi && eva + (1 << sh) > lo))
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

    fn check_write(&mut self, f: usize, i: usize, old: u64, new: u64) {
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
                    self.set_state(f, i, STALE_WALK);
                    self.detach(o.table_address());
                } else {
                    self.set_state(f, i, STALE | run_flag(o, level));
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
                    self.set_state(f, i, STALE_WALK);
                    self.detach(o.table_address());
                } else {
                    self.set_state(f, i, STALE | run_flag(o, level));
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
                let raw = self.frames[f].state[i];
                let st = raw & !RUN;
                let hit = match scope {
                    None => st == STALE || st == STALE_WALK,
                    Some(s) => {
                        (st == STALE && s.level.is_none_or(|l| l == m.level))
                            || (st == STALE_WALK && !s.last_level_only && s.level.is_none())
                    }
                };
                if !hit {
                    continue;
                }
                let gone = if raw & RUN != 0 {
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
                    self.set_state(f, i, INVALIDATED);
                }
            }
        }
    }

    #[inline]
    fn store(&mut self, f: usize, i: usize, new: u64) {
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

fn run_flag(d: Descriptor, level: u8) -> u8 {
    if d.is_leaf(level) && d.is_contiguous() {
        RUN
    } else {
        0
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
        fr.state = [CLEAN; ENTRIES];
        fr.meta = FrameMeta {
            in_use: true,
            ..FrameMeta::EMPTY
        };
        self.in_use += 1;
        self.peak_in_use = self.peak_in_use.max(self.in_use);
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
                && self.frames[m.parent as usize].state[m.parent_index as usize] != CLEAN;
            if m.unclean != 0 || parent_dirty {
                self.violation(BbmViolation::FreedWhileCached { table });
            }
            if m.unclean != 0 {
                self.frames[f].state = [CLEAN; ENTRIES];
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
                if self.frames[f].state[i] & !RUN == INVALIDATED {
                    self.set_state(f, i, CLEAN);
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
