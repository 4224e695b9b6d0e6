//! Host fakes of [`TableMemory`] and [`TranslationHw`] for tests and
//! benchmarks (the `testing` feature): translation tables in host memory
//! (`memory`), a model of what TLBs and walk caches may still hold with
//! a break-before-make checker (`tlb`), and an operation log with
//! counters (`log`).
//!
//! The checker enforces Arm ARM DDI 0487M.a.a, D8.17.1 (break-before-make)
//! and D8.17.8 (TLB maintenance ordering and coverage); see `tlb`. No heap:
//! the caller lends the frames and the log buffer, and tests or benchmarks
//! allocate them with `vec!`. [`FakePlatform::counting`] is the fast
//! variant for benchmarks: counters only, no log, no checker.
//!
//! [`TableMemory`]: crate::stage1::TableMemory
//! [`TranslationHw`]: crate::stage1::TranslationHw

mod log;
mod memory;
mod tlb;

use core::cell::Cell;

pub use self::log::{Counters, Event};
pub use self::memory::FakeFrame;
pub use self::tlb::BbmViolation;

use self::log::Log;
use crate::addr::{PhysAddr, VirtAddr};
use crate::stage1::descriptor::Descriptor;
use crate::stage1::hardware::Features;

/// Physical address of the first fake frame (frame `n` is at base + n * 4 KiB).
pub const FAKE_TABLE_BASE: u64 = 0x40_0000_0000;

/// No frame (free-list end, no parent, no root yet).
const NONE: u32 = u32::MAX;

/// An entry of a table frame: (table, index).
type Entry = (PhysAddr, usize);

/// Fake table memory and TLB: see the module documentation.
pub struct FakePlatform<'a> {
    frames: &'a mut [FakeFrame],
    high_water: usize,
    free_head: u32,
    in_use: usize,
    recording: bool,
    features: Features,
    root_level: u8,
    root_set: bool,
    log: Log<'a>,
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
            recording: true,
            features,
            root_level,
            root_set: false,
            log: Log::new(log),
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
        self.log.clear();
    }

    /// The events logged since the last reset (up to the buffer size).
    pub fn log(&self) -> &[Event] {
        self.log.events()
    }

    /// Events that did not fit in the log buffer.
    pub fn log_dropped(&self) -> u64 {
        self.log.dropped()
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

    /// While `busy`, every allocation, free and valid-count access fails
    /// with [`TableMemoryError::Busy`](crate::stage1::TableMemoryError::Busy) (as the firmware's provider does
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

    pub(super) fn tlbi_race(&mut self) {
        if let Some((t, i, write)) = self.race_tlbi.take() {
            self.race_effect = Some(self.hw_touch(t, i, write));
        }
    }

    #[inline]
    pub(super) fn frame(&self, table: PhysAddr) -> usize {
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
    pub(super) fn record(&mut self, e: Event) {
        if self.recording {
            self.log.record(e);
        }
    }
}
