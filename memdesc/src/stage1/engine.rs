//! The stage-1 table engine: map, unmap, protect, write-protect, query,
//! access-flag harvesting and re-folding over a VMSAv8-64 table tree.
//!
//! Arm ARM DDI 0487: D8.2 (translation table walk, 4 KiB granule, 48- and
//! 39-bit input ranges), D8.3 (descriptors), D8.4.3/D8.4.6 (access flag,
//! dirty state), D8.6.1 (the Contiguous bit) and D8.14 (break-before-make,
//! FEAT_BBM). The rules applied are the rules of docs/architecture.md ("Stage-1 translation"):
//!
//! * every operation picks the largest legal unit (1 GiB / 2 MiB blocks,
//!   16-entry contiguous runs at levels 1-3, pages) and folds a run or
//!   collapses a table into a block as soon as it becomes eligible;
//! * a partial change of a run unfolds it with break-before-make (clear all
//!   16, DSB, TLBI over the run, DSB, write), or in place when FEAT_BBM level 2
//!   allows the size change;
//! * whole-run permission changes and access-flag clears are done in place,
//!   then one TLBI pass covers the run;
//! * a rewrite that unfolds or re-forms a run, splits a block or collapses
//!   a table keeps the access/dirty state of every old entry in every new
//!   one (see the module documentation of `stage1`);
//! * input is validated before the first descriptor write; tables needed for
//!   splits are allocated before anything changes (a walk never skips a
//!   block it cannot split), and a `map` that runs out of table memory half
//!   way is rolled back, so an out-of-memory `Err` leaves the tables as they
//!   were.
//!
//! The engine never allocates from a heap: recursion depth is at most four
//! levels and every per-operation buffer is a small array on the stack.

use super::attributes::Attributes;
use super::descriptor::{
    leaf_allowed, level_shift, level_size, Descriptor, DescriptorKind, CONT_ENTRIES, ENTRIES,
    OA_BITS,
};
use super::error::Stage1Error;
use super::flush::{invalidate, TlbDebt};
use super::hardware::{Features, TableMemory, TableMemoryError, TranslationHw};
use super::unit::{MappingSummary, MappingUnit};
use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};

/// Size of the translated input range (TTBR0_EL1, T0SZ = 64 - bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaSize {
    /// 48-bit VA: four levels, walk starts at level 0 (T0SZ = 16).
    Bits48,
    /// 39-bit VA: three levels, walk starts at level 1 (T0SZ = 25).
    Bits39,
}

impl VaSize {
    /// Input address bits.
    #[inline]
    pub const fn bits(self) -> u32 {
        match self {
            Self::Bits48 => 48,
            Self::Bits39 => 39,
        }
    }

    /// Level of the root table.
    #[inline]
    pub const fn start_level(self) -> u8 {
        match self {
            Self::Bits48 => 0,
            Self::Bits39 => 1,
        }
    }

    /// TCR_ELx.T0SZ value.
    #[inline]
    pub const fn t0sz(self) -> u64 {
        64 - self.bits() as u64
    }

    /// One past the highest translated input address.
    #[inline]
    pub const fn limit(self) -> u64 {
        1 << self.bits()
    }
}

/// The result of [`Stage1::query`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Output address of the queried input address.
    pub output: PhysAddr,
    /// Attributes of the unit.
    pub attributes: Attributes,
    /// Access flag, ORed over the whole contiguous run (rule 3).
    pub young: bool,
    /// Dirty state, ORed over the whole contiguous run (rule 3).
    pub dirty: bool,
    /// The translation unit containing the address.
    pub unit: MappingUnit,
    /// First input address of that unit.
    pub unit_va: VirtAddr,
}

/// What a range operation does to each covered leaf.
#[derive(Clone, Copy, Debug)]
enum LeafOp {
    Unmap,
    Protect(Attributes),
    WriteProtect,
    Refold,
}

/// Tables an operation may need for splits: two boundaries, at most two
/// levels of block (1 GiB then 2 MiB) each.
const STASH: usize = 4;
/// Freed tables waiting for the TLBI that makes freeing them safe.
const FREE_BATCH: usize = 16;
/// Runs unfolded or re-formed in place, re-read after the TLBI.
const REGATHER_BATCH: usize = 8;

/// Where an entry lives: (table, index, level).
type EntryAt = (PhysAddr, usize, u8);

/// Per-operation state: TLB debt, tables to free, pre-allocated split tables.
struct OpCtx {
    debt: TlbDebt,
    /// Each with the entry (table, index, level) of the block that replaced
    /// it in place, if any: its state is re-read into the block after the TLBI.
    frees: [(PhysAddr, Option<EntryAt>); FREE_BATCH],
    nfree: usize,
    stash: [PhysAddr; STASH],
    nstash: usize,
    wrote: bool,
    limit: MappingUnit,
    /// Why the walk could not do all of its work (a table it needed).
    error: Option<Stage1Error>,
    /// Groups (table, first index, level) converted in place (FEAT_BBM
    /// level 2): until the TLBI completes, a walker may still record access
    /// or dirty state through the old run in any of their entries.
    regather: [EntryAt; REGATHER_BATCH],
    nregather: usize,
}

impl OpCtx {
    const fn new(limit: MappingUnit) -> Self {
        Self {
            debt: TlbDebt::NONE,
            frees: [(PhysAddr(0), None); FREE_BATCH],
            nfree: 0,
            stash: [PhysAddr(0); STASH],
            nstash: 0,
            wrote: false,
            limit,
            error: None,
            regather: [(PhysAddr(0), 0, 0); REGATHER_BATCH],
            nregather: 0,
        }
    }
}

/// A stage-1 translation table tree and the platform it lives on.
///
/// `P` provides table memory and TLB maintenance; on target that is the hal's
/// MMU object, on the host a [`super::fake::FakePlatform`].
pub struct Stage1<P: TableMemory + TranslationHw> {
    platform: P,
    root: PhysAddr,
    va_size: VaSize,
    features: Features,
    /// A walker may use the tree (see [`Stage1::set_live`]).
    live: bool,
    /// First table-memory failure of the running operation (a count that
    /// could not be read or changed, a free refused); reported at its end.
    fault: Option<TableMemoryError>,
}

/// What [`Stage1::valid_count`] returns for a count it could not read:
/// neither 0 (the table would be freed) nor 512 (it would be collapsed).
pub(super) const COUNT_UNKNOWN: u32 = u32::MAX;

/// `[i0, i1)`: entries of a table at `level` based at `base` overlapping `[s, e)`.
#[inline]
fn span(level: u8, base: u64, s: u64, e: u64) -> (usize, usize) {
    let sh = level_shift(level);
    let i0 = ((s - base) >> sh) as usize;
    let i1 = (((e - 1 - base) >> sh) + 1) as usize;
    (i0, i1.min(ENTRIES))
}

/// True when 16 entries at `level` form a legal contiguous run (rules 1-2).
pub(super) fn run_eligible(run: &[Descriptor; CONT_ENTRIES], level: u8) -> bool {
    let first = run[0];
    if !first.is_leaf(level) {
        return false;
    }
    let size = level_size(level);
    let oa0 = first.output(level).0;
    if oa0 & (size * CONT_ENTRIES as u64 - 1) != 0 {
        return false;
    }
    let key = first.run_key();
    run.iter().enumerate().skip(1).all(|(k, d)| {
        d.is_leaf(level) && d.run_key() == key && d.output(level).0 == oa0 + k as u64 * size
    })
}

/// True when all 16 entries of a group are leaves with the Contiguous bit.
fn is_run(group: &[Descriptor; CONT_ENTRIES], level: u8) -> bool {
    group.iter().all(|d| d.is_leaf(level) && d.is_contiguous())
}

/// True when replacing live `old` by live `new` changes the output address,
/// memory type, global-ness or translation size: break-before-make (D8.14.1).
fn needs_break(old: Descriptor, new: Descriptor, level: u8) -> bool {
    if old.is_table(level) || new.is_table(level) {
        return old != new;
    }
    old.output(level) != new.output(level)
        || old.is_contiguous() != new.is_contiguous()
        || old.attr_index() != new.attr_index()
        || (old.bits() ^ new.bits()) & (Descriptor::SH_MASK | Descriptor::NG) != 0
}

/// Folds AF/dirty that hardware set in `found` (but not in `seen`) into a
/// leaf `new` with the same output address.
fn absorb(new: Descriptor, seen: Descriptor, found: Descriptor, level: u8) -> Descriptor {
    if !new.is_leaf(level) || !found.is_leaf(level) || new.output(level) != found.output(level) {
        return new;
    }
    let young = found.is_young() && !seen.is_young();
    let dirty = found.is_dirty() && !seen.is_dirty();
    if young || dirty {
        new.with_state(new.is_young() || young, new.is_dirty() || dirty)
    } else {
        new
    }
}

impl<P: TableMemory + TranslationHw> Stage1<P> {
    /// Creates an empty tree (allocates the root table) that a walker may
    /// use from the start: every rewrite of a valid entry is a
    /// compare-and-swap, so access/dirty updates of the hardware
    /// (FEAT_HAFDBS) are never lost.
    pub fn new(platform: P, va_size: VaSize, features: Features) -> Result<Self, Stage1Error> {
        let mut s = Self::new_detached(platform, va_size, features)?;
        s.live = true;
        Ok(s)
    }

    /// Creates an empty tree that no walker uses yet: it is not in any
    /// TTBR, or translation is off. Until [`Stage1::set_live`], every
    /// descriptor is written with a plain store: with the MMU off, data
    /// accesses are Device-nGnRnE, and exclusives or atomics on Device
    /// memory are IMPLEMENTATION DEFINED (Arm ARM B2.9, "Exclusive access
    /// instructions and Shareable memory locations"). TLB maintenance is
    /// issued as usual, so the tree is correct whenever it goes live.
    pub fn new_detached(
        mut platform: P,
        va_size: VaSize,
        features: Features,
    ) -> Result<Self, Stage1Error> {
        let root = platform.alloc_table()?;
        Ok(Self {
            platform,
            root,
            va_size,
            features,
            live: false,
            fault: None,
        })
    }

    /// Marks the tree live: call it before its root goes into a TTBR of a
    /// translation regime that is (or is about to be) enabled. From then on
    /// the hardware may update descriptors, so rewrites are compare-and-swaps.
    #[inline]
    pub fn set_live(&mut self) {
        self.live = true;
    }

    /// True when a walker may use the tree (see [`Stage1::new_detached`]).
    #[inline]
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Physical address of the root table (for TTBR0_EL1.BADDR).
    #[inline]
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// The input range size.
    #[inline]
    pub fn va_size(&self) -> VaSize {
        self.va_size
    }

    /// The features the engine was told about.
    #[inline]
    pub fn features(&self) -> Features {
        self.features
    }

    /// The platform (table memory and TLB maintenance).
    #[inline]
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// The platform, mutably (tests use it to reset counters or to play the
    /// hardware's part on the fake).
    #[inline]
    pub fn platform_mut(&mut self) -> &mut P {
        &mut self.platform
    }

    // ---- table access: the only unsafe code of the engine ----

    #[inline]
    pub(super) fn read(&self, table: PhysAddr, index: usize) -> Descriptor {
        debug_assert!(index < ENTRIES);
        // SAFETY: engine invariant: every table address passed here was
        // returned by `alloc_table` and not freed (it is the root, was read
        // from a table descriptor of the tree, or is a freshly allocated
        // split table), and `index < ENTRIES` by construction of `span`.
        Descriptor(unsafe { self.platform.read_entry(table, index) })
    }

    #[inline]
    fn write(&mut self, table: PhysAddr, index: usize, d: Descriptor) {
        debug_assert!(index < ENTRIES);
        // SAFETY: as in `read`; callers only write invalid -> anything on a
        // live table, or anything into a table not yet linked into the tree.
        unsafe { self.platform.write_entry(table, index, d.bits()) }
    }

    /// Writes `count` entries from `index`: `first`, then its output address
    /// advanced by `step` per entry (invalid entries or unlinked tables only).
    #[inline]
    fn fill(&mut self, table: PhysAddr, index: usize, first: Descriptor, step: u64, count: usize) {
        if count == 0 {
            return;
        }
        debug_assert!(index + count <= ENTRIES);
        // SAFETY: as in `read`, `index + count <= ENTRIES`; callers only fill
        // invalid entries of a live table or entries of an unlinked table.
        unsafe {
            self.platform
                .fill_entries(table, index, first.bits(), step, count)
        }
    }

    #[inline]
    fn cas(
        &mut self,
        table: PhysAddr,
        index: usize,
        cur: Descriptor,
        new: Descriptor,
    ) -> Result<(), Descriptor> {
        debug_assert!(index < ENTRIES);
        // SAFETY: as in `read`; break-before-make is ensured by `write_group`.
        unsafe {
            self.platform
                .compare_exchange_entry(table, index, cur.bits(), new.bits())
        }
        .map_err(Descriptor)
    }

    /// The valid-entry count of `table`, or [`COUNT_UNKNOWN`] (and the
    /// failure noted for the end of the operation) when the provider
    /// cannot tell.
    #[inline]
    pub(super) fn valid_count(&mut self, table: PhysAddr) -> u32 {
        // SAFETY: as in `read`; a zero delta only reads the count.
        match unsafe { self.platform.adjust_valid(table, 0) } {
            Ok(n) => n,
            Err(e) => {
                self.note(e);
                COUNT_UNKNOWN
            }
        }
    }

    #[inline]
    fn adjust(&mut self, table: PhysAddr, delta: i32) {
        if delta != 0 {
            // SAFETY: as in `read`; `delta` is the exact change of valid
            // entries the caller just wrote, so the count stays in 0..=512.
            if let Err(e) = unsafe { self.platform.adjust_valid(table, delta) } {
                self.note(e);
            }
        }
    }

    /// Returns a table to the provider; a refusal is noted.
    ///
    /// # Safety
    ///
    /// As for [`TableMemory::free_table`].
    unsafe fn release(&mut self, table: PhysAddr) {
        // SAFETY: forwarded from the caller.
        if let Err(e) = unsafe { self.platform.free_table(table) } {
            self.note(e);
        }
    }

    /// Forgets a noted failure (the linter reports them as findings).
    pub(super) fn clear_fault(&mut self) {
        self.fault = None;
    }

    /// Keeps the first table-memory failure of an operation.
    fn note(&mut self, e: TableMemoryError) {
        if self.fault.is_none() {
            self.fault = Some(e);
        }
    }

    /// `Ok(v)`, or the table-memory failure noted during the operation.
    fn reported<T>(&mut self, v: T) -> Result<T, Stage1Error> {
        match self.fault.take() {
            None => Ok(v),
            Some(e) => Err(Stage1Error::TableMemory(e)),
        }
    }

    #[inline]
    fn leaf_template(&self, attrs: &Attributes, level: u8) -> Descriptor {
        let page = if level == 3 {
            Descriptor::TABLE_OR_PAGE
        } else {
            0
        };
        Descriptor(
            Descriptor::VALID
                | page
                | Descriptor::AF
                | attrs.leaf_bits(false, self.features.hafdbs),
        )
    }

    // ---- validation and read-only walks ----

    fn check_va(&self, va: VirtAddr, len: u64) -> Result<(u64, u64), Stage1Error> {
        if len == 0 {
            return Err(Stage1Error::EmptyRange);
        }
        if !va.is_aligned(PAGE_SIZE) {
            return Err(Stage1Error::Unaligned { value: va.0 });
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(Stage1Error::Unaligned { value: len });
        }
        match va.0.checked_add(len) {
            Some(end) if end <= self.va_size.limit() => Ok((va.0, end)),
            _ => Err(Stage1Error::VaOutOfRange { va: va.0 }),
        }
    }

    /// The leaf translating `va`: (table, index, level, descriptor).
    pub(super) fn find_leaf(&self, va: u64) -> Option<(PhysAddr, usize, u8, Descriptor)> {
        if va >= self.va_size.limit() {
            return None;
        }
        let mut table = self.root;
        let mut level = self.va_size.start_level();
        loop {
            let index = ((va >> level_shift(level)) & (ENTRIES as u64 - 1)) as usize;
            let d = self.read(table, index);
            match d.kind(level) {
                DescriptorKind::Table(next) => {
                    table = next;
                    level += 1;
                }
                DescriptorKind::Leaf => return Some((table, index, level, d)),
                _ => return None,
            }
        }
    }

    /// First address of `[s, e)` covered by a leaf (`want_mapped`) or by no
    /// leaf (`!want_mapped`).
    fn first_where(
        &self,
        table: PhysAddr,
        level: u8,
        base: u64,
        s: u64,
        e: u64,
        want_mapped: bool,
    ) -> Option<u64> {
        let (i0, i1) = span(level, base, s, e);
        let sh = level_shift(level);
        for i in i0..i1 {
            let ev = base + ((i as u64) << sh);
            let cs = s.max(ev);
            let ce = e.min(ev + (1 << sh));
            match self.read(table, i).kind(level) {
                DescriptorKind::Table(next) => {
                    if let Some(v) = self.first_where(next, level + 1, ev, cs, ce, want_mapped) {
                        return Some(v);
                    }
                }
                DescriptorKind::Leaf => {
                    if want_mapped {
                        return Some(cs);
                    }
                }
                _ => {
                    if !want_mapped {
                        return Some(cs);
                    }
                }
            }
        }
        None
    }

    // ---- public operations ----

    /// Maps `[va, va + len)` to `[pa, pa + len)` with the largest units the
    /// alignment allows. Fails without changing anything if any page of the
    /// range is already mapped.
    pub fn map(
        &mut self,
        va: VirtAddr,
        pa: PhysAddr,
        len: u64,
        attrs: Attributes,
    ) -> Result<(), Stage1Error> {
        self.map_limited(va, pa, len, attrs, MappingUnit::LARGEST)
    }

    /// [`Stage1::map`] with units no larger than `limit` (for instance
    /// [`MappingUnit::Page4K`] for memory that will be unmapped page by page).
    /// The limit applies to this call; a later operation that finds a run or
    /// table eligible may still fold it.
    pub fn map_limited(
        &mut self,
        va: VirtAddr,
        pa: PhysAddr,
        len: u64,
        attrs: Attributes,
        limit: MappingUnit,
    ) -> Result<(), Stage1Error> {
        let (s, e) = self.check_va(va, len)?;
        if !pa.is_aligned(PAGE_SIZE) {
            return Err(Stage1Error::Unaligned { value: pa.0 });
        }
        match pa.0.checked_add(len) {
            Some(end) if end <= 1 << OA_BITS => {}
            _ => return Err(Stage1Error::PaOutOfRange { pa: pa.0 }),
        }
        attrs.validate()?;
        if len == PAGE_SIZE {
            return self.map_page(s, pa.0, &attrs, limit);
        }
        let (root, start) = (self.root, self.va_size.start_level());
        if let Some(v) = self.first_where(root, start, 0, s, e, true) {
            return Err(Stage1Error::AlreadyMapped { va: v });
        }
        let mut ctx = OpCtx::new(limit);
        let offset = pa.0.wrapping_sub(s);
        match self.map_level(&mut ctx, &attrs, root, start, 0, s, e, offset) {
            Ok(()) => {
                if limit >= MappingUnit::Cont64K {
                    // Interior runs and tables were written in their final
                    // form; only the boundaries can now fold with neighbours.
                    let op = LeafOp::Refold;
                    self.modify_level(&mut ctx, &op, root, start, 0, s, s + PAGE_SIZE, true);
                    if e - PAGE_SIZE > s {
                        self.modify_level(&mut ctx, &op, root, start, 0, e - PAGE_SIZE, e, true);
                    }
                }
                self.finish(&mut ctx);
                self.reported(())
            }
            Err(at) => {
                // Everything below `at` was written by this call, at its
                // natural size and never folded with neighbours, so unmapping
                // it needs no split and restores the previous tree.
                if at > s {
                    self.modify_level(&mut ctx, &LeafOp::Unmap, root, start, 0, s, at, true);
                }
                self.finish(&mut ctx);
                let e = ctx.error.unwrap_or(Stage1Error::OutOfTableMemory);
                self.reported(())?;
                Err(e)
            }
        }
    }

    /// `map` of one page: one descent that validates, builds the missing
    /// tables unlinked and links them with a single store.
    fn map_page(
        &mut self,
        va: u64,
        pa: u64,
        attrs: &Attributes,
        limit: MappingUnit,
    ) -> Result<(), Stage1Error> {
        let mut table = self.root;
        let mut level = self.va_size.start_level();
        loop {
            match self.read(table, gva_index(va, level)).kind(level) {
                DescriptorKind::Table(next) => {
                    table = next;
                    level += 1;
                }
                DescriptorKind::Leaf => return Err(Stage1Error::AlreadyMapped { va }),
                _ => break,
            }
        }
        let need = (3 - level) as usize;
        let mut chain = [PhysAddr(0); 3];
        for k in 0..need {
            match self.platform.alloc_table() {
                Ok(t) => chain[k] = t,
                Err(e) => {
                    for t in &chain[..k] {
                        // SAFETY: allocated above and never linked.
                        unsafe { self.release(*t) };
                    }
                    self.reported(())?;
                    return Err(e.into());
                }
            }
        }
        let mut value = self.leaf_template(attrs, 3).with_output(PhysAddr(pa));
        for k in (0..need).rev() {
            let l = level + 1 + k as u8;
            self.write(chain[k], gva_index(va, l), value);
            self.adjust(chain[k], 1);
            value = Descriptor::table(chain[k]);
        }
        self.write(table, gva_index(va, level), value);
        self.adjust(table, 1);
        // Only a group that can now fold, or a table that just filled up,
        // can change anything above the new page.
        let leaf_table = if need > 0 { chain[need - 1] } else { table };
        if limit >= MappingUnit::Cont64K
            && (self.valid_count(leaf_table) as usize == ENTRIES
                || self.run_candidate(leaf_table, 3, gva_index(va, 3)))
        {
            let mut ctx = OpCtx::new(limit);
            ctx.wrote = true;
            let (root, start) = (self.root, self.va_size.start_level());
            let op = LeafOp::Refold;
            self.modify_level(&mut ctx, &op, root, start, 0, va, va + PAGE_SIZE, true);
            self.finish(&mut ctx);
        } else {
            // Invalid -> valid needs no TLBI: publish the store for the walker.
            self.platform.dsb_ishst();
            self.platform.isb();
        }
        self.reported(())
    }

    /// Unmaps `[va, va + len)`; every page must be mapped. Tables that
    /// become empty are freed.
    pub fn unmap(&mut self, va: VirtAddr, len: u64) -> Result<(), Stage1Error> {
        self.modify(va, len, LeafOp::Unmap)
    }

    /// Changes the attributes of `[va, va + len)`; every page must be mapped.
    /// Access and dirty state are kept. A permission-only change of whole
    /// runs and blocks is done in place; a memory-type change, or a change to
    /// part of a run or block, breaks first.
    pub fn protect(
        &mut self,
        va: VirtAddr,
        len: u64,
        attrs: Attributes,
    ) -> Result<(), Stage1Error> {
        attrs.validate()?;
        self.modify(va, len, LeafOp::Protect(attrs))
    }

    /// Makes `[va, va + len)` read-only, keeping every entry's dirty state
    /// (moved to the software dirty bit, as Linux's `pte_wrprotect`).
    pub fn wrprotect(&mut self, va: VirtAddr, len: u64) -> Result<(), Stage1Error> {
        self.modify(va, len, LeafOp::WriteProtect)
    }

    /// Folds every run and collapses every table in `[va, va + len)` (widened
    /// to the runs and tables it touches) that has become eligible, e.g.
    /// after balloon deflate (rule 8). Holes are allowed.
    pub fn refold(&mut self, va: VirtAddr, len: u64) -> Result<(), Stage1Error> {
        let (s, e) = self.check_va(va, len)?;
        let mut ctx = OpCtx::new(MappingUnit::LARGEST);
        let (root, start) = (self.root, self.va_size.start_level());
        self.modify_level(&mut ctx, &LeafOp::Refold, root, start, 0, s, e, true);
        self.finish(&mut ctx);
        self.reported(())
    }

    /// Translates `va`: output address, attributes, and access/dirty ORed
    /// over the whole contiguous run (the hardware updates only the entry it
    /// used, rule 3).
    pub fn query(&self, va: VirtAddr) -> Result<Translation, Stage1Error> {
        let (table, index, level, d) = self
            .find_leaf(va.0)
            .ok_or(Stage1Error::NotMapped { va: va.0 })?;
        let size = level_size(level);
        let cont = d.is_contiguous();
        let (mut young, mut dirty) = (d.is_young(), d.is_dirty());
        if cont {
            let g = index & !(CONT_ENTRIES - 1);
            for k in 0..CONT_ENTRIES {
                let dk = self.read(table, g + k);
                young |= dk.is_young();
                dirty |= dk.is_dirty();
            }
        }
        let unit = MappingUnit::of_leaf(level, cont);
        let attributes =
            Attributes::from_descriptor(d).ok_or(Stage1Error::NotMapped { va: va.0 })?;
        Ok(Translation {
            output: PhysAddr(d.output(level).0 + (va.0 & (size - 1))),
            attributes,
            young,
            dirty,
            unit,
            unit_va: VirtAddr(va.0 & !(unit.size() - 1)),
        })
    }

    /// Returns whether the unit containing `va` was accessed (ORed over its
    /// contiguous run) and clears the access flag of every entry of the run
    /// in place, then one TLBI pass over the run.
    ///
    /// Without FEAT_HAFDBS the next access takes an Access flag fault, which
    /// the caller's fault handler must answer (as on Linux without HA).
    pub fn test_and_clear_young(&mut self, va: VirtAddr) -> Result<bool, Stage1Error> {
        let (table, index, level, d) = self
            .find_leaf(va.0)
            .ok_or(Stage1Error::NotMapped { va: va.0 })?;
        let size = level_size(level);
        let mut ctx = OpCtx::new(MappingUnit::LARGEST);
        let (first, n) = if d.is_contiguous() {
            (index & !(CONT_ENTRIES - 1), CONT_ENTRIES)
        } else {
            (index, 1)
        };
        let mut young = false;
        for i in first..first + n {
            let dk = self.read(table, i);
            if dk.is_young() {
                young = true;
                self.replace_live(table, i, level, dk, dk.with(Descriptor::AF, false));
            }
        }
        if young {
            let base = va.0 & !(size * n as u64 - 1);
            ctx.debt.add(base, size * n as u64, level, level, false);
            ctx.wrote = true;
        }
        self.finish(&mut ctx);
        Ok(young)
    }

    /// Where the leaf translating `va` lives: (table, index, level). For
    /// on-target tests that inspect what the hardware did to an entry, and
    /// for the fake's [`super::fake::FakePlatform::hw_touch`].
    pub fn leaf_entry(&self, va: VirtAddr) -> Option<(PhysAddr, usize, u8)> {
        self.find_leaf(va.0).map(|(t, i, l, _)| (t, i, l))
    }

    /// Counts the translation units and tables of the whole tree.
    pub fn summary(&self) -> MappingSummary {
        let mut s = MappingSummary::default();
        self.summarize(self.root, self.va_size.start_level(), &mut s);
        s
    }

    fn summarize(&self, table: PhysAddr, level: u8, s: &mut MappingSummary) {
        s.tables += 1;
        for i in 0..ENTRIES {
            let d = self.read(table, i);
            match d.kind(level) {
                DescriptorKind::Table(next) => self.summarize(next, level + 1, s),
                DescriptorKind::Leaf => {
                    let cont = d.is_contiguous();
                    if !cont || i % CONT_ENTRIES == 0 {
                        s.add(MappingUnit::of_leaf(level, cont), 1);
                    }
                }
                _ => {}
            }
        }
    }

    // ---- operation plumbing ----

    fn modify(&mut self, va: VirtAddr, len: u64, op: LeafOp) -> Result<(), Stage1Error> {
        let (s, e) = self.check_va(va, len)?;
        let (root, start) = (self.root, self.va_size.start_level());
        if let Some(v) = self.first_where(root, start, 0, s, e, false) {
            return Err(Stage1Error::NotMapped { va: v });
        }
        let mut ctx = OpCtx::new(MappingUnit::LARGEST);
        let needed = self.splits_needed(s, e);
        while ctx.nstash < needed {
            match self.platform.alloc_table() {
                Ok(t) => {
                    ctx.stash[ctx.nstash] = t;
                    ctx.nstash += 1;
                }
                Err(e) => {
                    self.finish(&mut ctx);
                    self.reported(())?;
                    return Err(e.into());
                }
            }
        }
        self.modify_level(&mut ctx, &op, root, start, 0, s, e, true);
        self.finish(&mut ctx);
        let short = ctx.error;
        self.reported(())?;
        short.map_or(Ok(()), Err)
    }

    /// Tables needed to split the blocks that `[s, e)` covers only partly.
    fn splits_needed(&self, s: u64, e: u64) -> usize {
        let mut ids = [(0u8, 0u64); STASH];
        let mut n = 0;
        for (b, probe) in [(s, s), (e, e - PAGE_SIZE)] {
            let Some((_, _, level, _)) = self.find_leaf(probe) else {
                continue;
            };
            let mut lv = level;
            while lv < 3 && b & (level_size(lv) - 1) != 0 {
                let id = (lv, b & !(level_size(lv) - 1));
                if !ids[..n].contains(&id) {
                    ids[n] = id;
                    n += 1;
                }
                lv += 1;
            }
        }
        n
    }

    /// Pays the TLB debt, publishes the writes, frees what waited for that.
    fn finish(&mut self, ctx: &mut OpCtx) {
        if ctx.debt.is_due() {
            ctx.debt.settle(&mut self.platform, self.features);
            self.platform.isb();
        } else if ctx.wrote {
            self.platform.dsb_ishst();
            self.platform.isb();
        }
        self.regather(ctx);
        self.free_deferred(ctx);
        for i in 0..ctx.nstash {
            // SAFETY: stash tables were allocated by this operation and
            // never linked into the tree, so nothing can cache them.
            unsafe { self.release(ctx.stash[i]) };
        }
        ctx.nstash = 0;
    }

    /// After the TLBI: ORs the state found in the leaves of each group
    /// converted in place into all of them (rule 3).
    fn regather(&mut self, ctx: &mut OpCtx) {
        let mut wrote = false;
        for r in 0..ctx.nregather {
            let (table, first, level) = ctx.regather[r];
            let (mut young, mut dirty) = (false, false);
            for k in 0..CONT_ENTRIES {
                let d = self.read(table, first + k);
                if d.is_leaf(level) {
                    young |= d.is_young();
                    dirty |= d.is_dirty();
                }
            }
            for k in 0..CONT_ENTRIES {
                wrote |= self.spread_live(table, first + k, level, young, dirty);
            }
        }
        ctx.nregather = 0;
        if wrote {
            self.platform.dsb_ishst();
        }
    }

    fn free_deferred(&mut self, ctx: &mut OpCtx) {
        let mut wrote = false;
        for i in 0..ctx.nfree {
            let (table, parent) = ctx.frees[i];
            if let Some((pt, pi, level)) = parent {
                // Rule 3: walkers may have written through the old table
                // until the TLBI that precedes this completed.
                let (young, dirty) = self.table_state(table, level + 1);
                wrote |= self.spread_live(pt, pi, level, young, dirty);
            }
        }
        if wrote {
            self.platform.dsb_ishst();
        }
        for i in 0..ctx.nfree {
            let (table, _) = ctx.frees[i];
            // A table discarded whole (a full table collapsed into a block)
            // still counts its entries: the frame provider wants 0. A count
            // that cannot be read or zeroed keeps the table out of the
            // provider's hands (lost, never reused) and fails the operation.
            let left = self.valid_count(table);
            if left == COUNT_UNKNOWN {
                continue;
            }
            if left != 0 {
                // SAFETY: the table is still ours until it is freed below;
                // brings the count to exactly 0.
                if let Err(e) = unsafe { self.platform.adjust_valid(table, -(left as i32)) } {
                    self.note(e);
                    continue;
                }
            }
            // SAFETY: the descriptor pointing at this table was cleared or
            // replaced and the TLB debt covering it (non-last-level TLBI) was
            // settled before we got here (`finish`, `defer_free`), or the
            // table was never linked (split then collapsed again).
            unsafe { self.release(table) };
        }
        ctx.nfree = 0;
    }

    fn defer_free(&mut self, ctx: &mut OpCtx, table: PhysAddr) {
        self.defer_free_from(ctx, table, None);
    }

    fn defer_free_from(&mut self, ctx: &mut OpCtx, table: PhysAddr, parent: Option<EntryAt>) {
        if ctx.nfree == FREE_BATCH {
            ctx.debt.settle(&mut self.platform, self.features);
            self.regather(ctx);
            self.free_deferred(ctx);
        }
        ctx.frees[ctx.nfree] = (table, parent);
        ctx.nfree += 1;
    }

    /// Phase one of `map`: writes leaves and creates tables, entry by entry,
    /// into entries validated to be invalid. `Err(va)`: no table for `va`;
    /// everything below `va` is mapped.
    #[allow(clippy::too_many_arguments)]
    fn map_level(
        &mut self,
        ctx: &mut OpCtx,
        attrs: &Attributes,
        table: PhysAddr,
        level: u8,
        base: u64,
        s: u64,
        e: u64,
        offset: u64,
    ) -> Result<(), u64> {
        let (i0, i1) = span(level, base, s, e);
        let sh = level_shift(level);
        let size = 1u64 << sh;
        let leaf_ok = leaf_allowed(level) && ctx.limit.allows_leaf(level);
        let cont_ok = leaf_ok && ctx.limit.allows_contiguous(level);
        let run = size * CONT_ENTRIES as u64;
        let template = self.leaf_template(attrs, level);
        let mut added = 0i32;
        let mut i = i0;
        while i < i1 {
            let ev = base + ((i as u64) << sh);
            let cs = s.max(ev);
            let ce = e.min(ev + size);
            let oa = ev.wrapping_add(offset);
            if leaf_ok && cs == ev && ce == ev + size && oa & (size - 1) == 0 {
                // Every following entry up to the last one wholly inside
                // [s, e) is a leaf too (same alignment): write them in bulk,
                // whole aligned groups with the Contiguous bit.
                let j = (i + ((e - ev) >> sh) as usize).min(i1);
                let group_oa = oa.wrapping_sub((i % CONT_ENTRIES) as u64 * size);
                let head = if cont_ok && group_oa & (run - 1) == 0 {
                    i.next_multiple_of(CONT_ENTRIES).min(j)
                } else {
                    j
                };
                self.fill(table, i, template.with_output(PhysAddr(oa)), size, head - i);
                let whole = (j - head) / CONT_ENTRIES * CONT_ENTRIES;
                let cont = template.with(Descriptor::CONT, true);
                let first = PhysAddr(oa + (head - i) as u64 * size);
                self.fill(table, head, cont.with_output(first), size, whole);
                let tail = head + whole;
                let first = PhysAddr(oa + (tail - i) as u64 * size);
                self.fill(table, tail, template.with_output(first), size, j - tail);
                added += (j - i) as i32;
                i = j;
                ctx.wrote = true;
                continue;
            }
            let d = self.read(table, i);
            let child = if let DescriptorKind::Table(next) = d.kind(level) {
                next
            } else {
                let next = match self.platform.alloc_table() {
                    Ok(next) => next,
                    Err(e) => {
                        self.adjust(table, added);
                        ctx.error = Some(e.into());
                        return Err(cs);
                    }
                };
                self.write(table, i, Descriptor::table(next));
                added += 1;
                ctx.wrote = true;
                next
            };
            if let Err(at) = self.map_level(ctx, attrs, child, level + 1, ev, cs, ce, offset) {
                self.adjust(table, added);
                if self.valid_count(child) == 0 {
                    let cur = self.read(table, i);
                    self.replace_live(table, i, level, cur, Descriptor::INVALID);
                    self.adjust(table, -1);
                    ctx.debt.add_walk(ev);
                    self.defer_free(ctx, child);
                }
                return Err(at);
            }
            i += 1;
        }
        self.adjust(table, added);
        Ok(())
    }

    /// Applies `op` to `[s, e)` within `table`, group of 16 by group of 16,
    /// folding, unfolding, splitting and collapsing as needed. `live`: the
    /// table is reachable by the MMU (false inside a new split table).
    #[allow(clippy::too_many_arguments)]
    fn modify_level(
        &mut self,
        ctx: &mut OpCtx,
        op: &LeafOp,
        table: PhysAddr,
        level: u8,
        base: u64,
        s: u64,
        e: u64,
        live: bool,
    ) {
        let (i0, i1) = span(level, base, s, e);
        let sh = level_shift(level);
        let size = 1u64 << sh;
        let mut g = i0 & !(CONT_ENTRIES - 1);
        while g < i1 {
            // Entries of this group inside the range are read first; the
            // others only when a fold decision needs them.
            let k0 = i0.max(g) - g;
            let k1 = i1.min(g + CONT_ENTRIES) - g;
            let mut old = [Descriptor::INVALID; CONT_ENTRIES];
            for (k, d) in old.iter_mut().enumerate().take(k1).skip(k0) {
                *d = self.read(table, g + k);
            }
            let mut new = old;
            let mut to_free = [None; CONT_ENTRIES];
            for k in 0..CONT_ENTRIES {
                let i = g + k;
                if i < i0 || i >= i1 {
                    continue;
                }
                let ev = base + ((i as u64) << sh);
                let cs = s.max(ev);
                let ce = e.min(ev + size);
                let covered = cs == ev && ce == ev + size;
                let d = old[k];
                match d.kind(level) {
                    DescriptorKind::Table(child)
                        if matches!(op, LeafOp::Refold)
                            && covered
                            && self.valid_count(child) as usize == ENTRIES
                            && self.collapse_candidate(child, level, ctx.limit).is_some() =>
                    {
                        // Collapsing directly beats folding its runs first.
                        if let Some(block) = self.collapse_candidate(child, level, ctx.limit) {
                            new[k] = block;
                            to_free[k] = Some(child);
                        }
                    }
                    DescriptorKind::Table(child) => {
                        self.modify_level(ctx, op, child, level + 1, ev, cs, ce, live);
                        let n = self.valid_count(child);
                        if n == 0 {
                            new[k] = Descriptor::INVALID;
                            to_free[k] = Some(child);
                        } else if n as usize == ENTRIES {
                            if let Some(block) = self.collapse_candidate(child, level, ctx.limit) {
                                new[k] = block;
                                to_free[k] = Some(child);
                            }
                        }
                    }
                    DescriptorKind::Leaf if covered => new[k] = self.apply(op, d, level),
                    DescriptorKind::Leaf if !matches!(op, LeafOp::Refold) => {
                        let t = match self.take_split_table(ctx) {
                            Ok(t) => t,
                            Err(e) => {
                                // `splits_needed` allocated one table per
                                // partly covered block, so this is not
                                // reached; if it were, the block stays
                                // whole and the operation fails.
                                ctx.error.get_or_insert(e);
                                continue;
                            }
                        };
                        self.fill_split(t, d, level);
                        self.modify_level(ctx, op, t, level + 1, ev, cs, ce, false);
                        if let Some(block) = self.collapse_candidate(t, level, MappingUnit::LARGEST)
                        {
                            new[k] = block;
                            to_free[k] = Some(t);
                        } else {
                            new[k] = Descriptor::table(t);
                        }
                    }
                    _ => {}
                }
            }
            if level >= 1 && self.complete_group(table, level, g, k0, k1, &mut old, &mut new) {
                let fold = run_eligible(&new, level)
                    && (ctx.limit.allows_contiguous(level)
                        || old.iter().all(|d| d.is_leaf(level) && d.is_contiguous()));
                for d in new.iter_mut() {
                    if d.is_leaf(level) {
                        *d = d.with(Descriptor::CONT, fold);
                    }
                }
            }
            let gva = base + ((g as u64) << sh);
            let collapsed = self.write_group(ctx, op, table, level, gva, &old, &mut new, live);
            for (k, t) in to_free.into_iter().enumerate() {
                if let Some(t) = t {
                    let parent = (collapsed & (1 << k) != 0).then_some((table, g + k, level));
                    self.defer_free_from(ctx, t, parent);
                }
            }
            g += CONT_ENTRIES;
        }
    }

    /// Reads the entries of a group outside `k0..k1` when a fold decision
    /// needs them: always when the group was folded, otherwise only while
    /// they could still form a run with the new in-range entries. Returns
    /// true when the whole group was read (the fold decision may run); false
    /// means no fold is possible and, the group being unfolded, nothing
    /// outside `k0..k1` changes.
    #[allow(clippy::too_many_arguments)]
    fn complete_group(
        &self,
        table: PhysAddr,
        level: u8,
        g: usize,
        k0: usize,
        k1: usize,
        old: &mut [Descriptor; CONT_ENTRIES],
        new: &mut [Descriptor; CONT_ENTRIES],
    ) -> bool {
        if k0 == 0 && k1 == CONT_ENTRIES {
            return true;
        }
        let folded = old[k0].is_leaf(level) && old[k0].is_contiguous();
        let r = new[k0];
        let size = level_size(level);
        let base_oa = r.output(level).0.wrapping_sub(k0 as u64 * size);
        let possible = (k0..k1).all(|k| new[k].is_leaf(level))
            && base_oa & (size * CONT_ENTRIES as u64 - 1) == 0;
        if !folded && !possible {
            return false;
        }
        for k in (0..k0).chain(k1..CONT_ENTRIES) {
            let d = self.read(table, g + k);
            old[k] = d;
            new[k] = d;
            let fits = d.is_leaf(level)
                && d.run_key() == r.run_key()
                && d.output(level).0 == base_oa.wrapping_add(k as u64 * size);
            if !folded && !fits {
                return false;
            }
        }
        true
    }

    /// True when the unfolded group holding entry `index` now forms a legal
    /// run (stops reading at the first entry that does not fit).
    fn run_candidate(&self, table: PhysAddr, level: u8, index: usize) -> bool {
        let g = index & !(CONT_ENTRIES - 1);
        let size = level_size(level);
        let r = self.read(table, index);
        if !r.is_leaf(level) || r.is_contiguous() {
            return false;
        }
        let base_oa = r.output(level).0.wrapping_sub((index - g) as u64 * size);
        if base_oa & (size * CONT_ENTRIES as u64 - 1) != 0 {
            return false;
        }
        (0..CONT_ENTRIES).all(|k| {
            let d = self.read(table, g + k);
            d.is_leaf(level)
                && d.run_key() == r.run_key()
                && d.output(level).0 == base_oa.wrapping_add(k as u64 * size)
        })
    }

    /// A table for splitting a block: from the stash `modify` filled, so
    /// that running out of table memory is found before anything changes.
    fn take_split_table(&mut self, ctx: &mut OpCtx) -> Result<PhysAddr, Stage1Error> {
        if ctx.nstash > 0 {
            ctx.nstash -= 1;
            return Ok(ctx.stash[ctx.nstash]);
        }
        // Only if `splits_needed` missed a split (a bug): try once more,
        // and fail the operation rather than skip part of its range.
        self.platform.alloc_table().map_err(Stage1Error::from)
    }

    /// The new value of a covered leaf.
    fn apply(&self, op: &LeafOp, d: Descriptor, level: u8) -> Descriptor {
        let hafdbs = self.features.hafdbs;
        let rebuild = |a: &Attributes| {
            let page = if level == 3 {
                Descriptor::TABLE_OR_PAGE
            } else {
                0
            };
            Descriptor(
                Descriptor::VALID
                    | page
                    | a.leaf_bits(d.is_dirty(), hafdbs)
                    | (d.bits() & (Descriptor::AF | Descriptor::CONT)),
            )
            .with_output(d.output(level))
        };
        match op {
            LeafOp::Unmap => Descriptor::INVALID,
            LeafOp::Refold => d,
            LeafOp::Protect(a) => rebuild(a),
            LeafOp::WriteProtect => match Attributes::from_descriptor(d) {
                Some(mut a) => {
                    a.write = false;
                    rebuild(&a)
                }
                None => d
                    .with(Descriptor::AP_READ_ONLY, true)
                    .with(Descriptor::DBM, false)
                    .with(Descriptor::SW_DIRTY, d.is_dirty()),
            },
        }
    }

    /// Fills a new (unlinked) table at `level + 1` with the translation of
    /// the block `d`, folded into contiguous runs.
    fn fill_split(&mut self, t: PhysAddr, d: Descriptor, level: u8) {
        let cl = level + 1;
        let csize = level_size(cl);
        let oa = d.output(level).0;
        let child = d.with_leaf_level(cl).with(Descriptor::CONT, true);
        self.fill(t, 0, child.with_output(PhysAddr(oa)), csize, ENTRIES);
        self.adjust(t, ENTRIES as i32);
    }

    /// The block at `level` equivalent to the full table `child`, if its 512
    /// leaves are uniform and aligned; access/dirty are ORed into the block.
    pub(super) fn collapse_candidate(
        &self,
        child: PhysAddr,
        level: u8,
        limit: MappingUnit,
    ) -> Option<Descriptor> {
        if !leaf_allowed(level) || !limit.allows_leaf(level) {
            return None;
        }
        let cl = level + 1;
        let csize = level_size(cl);
        let first = self.read(child, 0);
        let last = self.read(child, ENTRIES - 1);
        if !first.is_leaf(cl) || !last.is_leaf(cl) {
            return None;
        }
        let oa0 = first.output(cl).0;
        let key = first.run_key();
        if oa0 & (level_size(level) - 1) != 0
            || last.run_key() != key
            || last.output(cl).0 != oa0 + (ENTRIES as u64 - 1) * csize
        {
            return None;
        }
        let (mut young, mut dirty) = (false, false);
        for i in 0..ENTRIES {
            let d = self.read(child, i);
            if !d.is_leaf(cl) || d.run_key() != key || d.output(cl).0 != oa0 + i as u64 * csize {
                return None;
            }
            young |= d.is_young();
            dirty |= d.is_dirty();
        }
        Some(
            first
                .with_leaf_level(level)
                .with(Descriptor::CONT, false)
                .with_output(PhysAddr(oa0))
                .with_state(young, dirty),
        )
    }

    /// Replaces a live entry atomically. If hardware changed it since it was
    /// read (FEAT_HAFDBS), the AF/dirty it set are carried into `new` and the
    /// exchange retried. Returns the value replaced.
    fn replace_live(
        &mut self,
        table: PhysAddr,
        index: usize,
        level: u8,
        mut cur: Descriptor,
        mut new: Descriptor,
    ) -> Descriptor {
        if !self.live {
            // No walker: nothing can change the entry behind our back.
            self.write(table, index, new);
            return cur;
        }
        loop {
            match self.cas(table, index, cur, new) {
                Ok(()) => return cur,
                Err(found) => {
                    new = self.carry_state(new, cur, found, level);
                    cur = found;
                }
            }
        }
    }

    /// Carries AF/dirty that hardware set in `found` (not in `seen`) into
    /// `new`: into the leaf itself, or into every leaf of a new split table.
    fn carry_state(
        &mut self,
        new: Descriptor,
        seen: Descriptor,
        found: Descriptor,
        level: u8,
    ) -> Descriptor {
        if new.is_table(level) && found.is_leaf(level) {
            let young = found.is_young() && !seen.is_young();
            let dirty = found.is_dirty() && !seen.is_dirty();
            return self.spread(new, young, dirty, level);
        }
        absorb(new, seen, found, level)
    }

    /// ORs `young`/`dirty` into `d`, a new entry at `level` not yet written:
    /// into the leaf itself, or into every leaf below a new (unlinked) table.
    fn spread(&mut self, d: Descriptor, young: bool, dirty: bool, level: u8) -> Descriptor {
        if !(young || dirty) {
            return d;
        }
        if d.is_leaf(level) {
            return d.with_state(d.is_young() || young, d.is_dirty() || dirty);
        }
        if d.is_table(level) {
            let t = d.table_address();
            for i in 0..ENTRIES {
                let c = self.read(t, i);
                let n = self.spread(c, young, dirty, level + 1);
                if n != c {
                    self.write(t, i, n);
                }
            }
        }
        d
    }

    /// ORs `young`/`dirty` into the live entry `index` of `table` (a leaf,
    /// or every leaf below a table) with compare-and-swap: a state upgrade
    /// only, which needs no TLB maintenance.
    /// Returns whether anything was written.
    fn spread_live(
        &mut self,
        table: PhysAddr,
        index: usize,
        level: u8,
        young: bool,
        dirty: bool,
    ) -> bool {
        if !(young || dirty) {
            return false;
        }
        let c = self.read(table, index);
        let mut wrote = false;
        if c.is_leaf(level) {
            let n = c.with_state(c.is_young() || young, c.is_dirty() || dirty);
            if n != c {
                self.replace_live(table, index, level, c, n);
                wrote = true;
            }
        } else if c.is_table(level) {
            for i in 0..ENTRIES {
                wrote |= self.spread_live(c.table_address(), i, level + 1, young, dirty);
            }
        }
        wrote
    }

    /// True when the break of a live entry may be skipped under FEAT_BBM
    /// level 2: only the translation size changes (Contiguous bit, block <->
    /// table), not the output address or memory type.
    fn size_only(&self, op: &LeafOp, old: Descriptor, new: Descriptor, level: u8) -> bool {
        match (old.is_table(level), new.is_table(level)) {
            (false, true) => match op {
                LeafOp::Protect(a) => {
                    Attributes::from_descriptor(old).is_some_and(|o| o.same_type(a))
                }
                _ => true,
            },
            (true, false) => true,
            (false, false) => {
                old.output(level) == new.output(level)
                    && old.attr_index() == new.attr_index()
                    && (old.bits() ^ new.bits()) & (Descriptor::SH_MASK | Descriptor::NG) == 0
            }
            (true, true) => false,
        }
    }

    /// Writes one group of 16 entries from `old` to `new`.
    ///
    /// Live entries whose change needs break-before-make are cleared first,
    /// then `DSB ISHST`, one TLBI pass over them, `DSB ISH`, and only then
    /// written (rule 4/6) -- unless FEAT_BBM level 2 covers the change, in
    /// which case they are rewritten in place. In-place changes add to the
    /// operation's TLB debt; changes touching a contiguous run add the whole
    /// run (rule 7). Returns the entries where a table was replaced by a
    /// block in place: their old tables must be re-read after the TLBI.
    #[allow(clippy::too_many_arguments)]
    fn write_group(
        &mut self,
        ctx: &mut OpCtx,
        op: &LeafOp,
        table: PhysAddr,
        level: u8,
        gva: u64,
        old: &[Descriptor; CONT_ENTRIES],
        new: &mut [Descriptor; CONT_ENTRIES],
        live: bool,
    ) -> u16 {
        let size = level_size(level);
        let mut delta = 0i32;
        if !live {
            for k in 0..CONT_ENTRIES {
                if new[k] != old[k] {
                    self.write(table, gva_index(gva, level) + k, new[k]);
                    delta += new[k].is_valid() as i32 - old[k].is_valid() as i32;
                }
            }
            self.adjust(table, delta);
            return 0;
        }
        let first = gva_index(gva, level);
        let mut cur = *old;
        let mut brk = 0u32;
        for k in 0..CONT_ENTRIES {
            if old[k].is_valid()
                && new[k].is_valid()
                && new[k] != old[k]
                && needs_break(old[k], new[k], level)
            {
                brk |= 1 << k;
            }
        }
        let bbm2 = self.features.bbm_level >= 2
            && (0..CONT_ENTRIES)
                .filter(|k| brk & (1 << k) != 0)
                .all(|k| self.size_only(op, old[k], new[k], level));
        if brk != 0 && !bbm2 && old[0].is_leaf(level) && old[0].is_contiguous() {
            // Rule 4: a partial change unfolds the whole run, so every live
            // entry of the old run is cleared, not only the changed ones.
            for (k, d) in old.iter().enumerate() {
                if d.is_valid() {
                    brk |= 1 << k;
                }
            }
        }
        // Rule 3: a run that is unfolded or re-formed hands the access and
        // dirty state of every old entry to every new one (the hardware may
        // have recorded a write to any page of a run in any of its entries).
        let convert = level >= 1 && is_run(old, level) != is_run(new, level);
        let (mut young, mut dirty) = (false, false);
        if convert {
            for d in old.iter().filter(|d| d.is_leaf(level)) {
                young |= d.is_young();
                dirty |= d.is_dirty();
            }
            // Before any break: a new table may lie inside the range the
            // break unmaps (the tree maps its own table frames), so every
            // new entry and table is complete before the window opens.
            for d in new.iter_mut() {
                *d = self.spread(*d, young, dirty, level);
            }
        }
        // State the hardware set after the gather above, found by a swap:
        // for the whole group (`late_*`) or for one new table (`carry`).
        // Written into the live entries after the make, as an upgrade that
        // needs no TLB maintenance, never into a table during the window.
        let (mut late_young, mut late_dirty) = (false, false);
        let mut carry = [(false, false); CONT_ENTRIES];
        let mut collapsed = 0u16;
        if brk != 0 && !bbm2 {
            let (mut walk, mut finest) = (false, level);
            for k in 0..CONT_ENTRIES {
                if brk & (1 << k) == 0 {
                    continue;
                }
                let found = self.replace_live(table, first + k, level, old[k], Descriptor::INVALID);
                if convert && found.is_leaf(level) {
                    // Exact: an invalid entry gets no hardware update.
                    late_young |= found.is_young() && !young;
                    late_dirty |= found.is_dirty() && !dirty;
                }
                if new[k].is_table(level) && found.is_leaf(level) {
                    carry[k] = (
                        found.is_young() && !old[k].is_young(),
                        found.is_dirty() && !old[k].is_dirty(),
                    );
                } else {
                    new[k] = absorb(new[k], old[k], found, level);
                }
                if old[k].is_table(level) {
                    walk = true;
                    finest = level + 1;
                    if new[k].is_leaf(level) {
                        // Rule 3: the old table may have been written
                        // through until the TLBI completed; it is re-read
                        // into the block after the make (`free_deferred`),
                        // not here: it may lie inside the range unmapped now.
                        collapsed |= 1 << k;
                    }
                }
                cur[k] = Descriptor::INVALID;
                delta -= 1;
            }
            let lo = gva + brk.trailing_zeros() as u64 * size;
            let hi = gva + (32 - brk.leading_zeros()) as u64 * size;
            self.platform.dsb_ishst();
            invalidate(
                &mut self.platform,
                self.features,
                lo,
                hi,
                finest,
                level,
                walk,
            );
            self.platform.dsb_ish();
            ctx.wrote = true;
        }
        // Rule 7: a cached copy of any entry of a run may translate any page
        // of the run, so in-place changes of a run are paid for once, over
        // the whole run, below.
        let run_group = level >= 1 && (old[0].is_contiguous() || new[0].is_contiguous());
        let mut in_place = false;
        for k in 0..CONT_ENTRIES {
            if new[k] == cur[k] {
                continue;
            }
            let ev = gva + k as u64 * size;
            if cur[k].is_valid() {
                let found = self.replace_live(table, first + k, level, cur[k], new[k]);
                if convert && found.is_leaf(level) {
                    // In place (FEAT_BBM level 2): the hardware may have
                    // updated an entry after the gather above, also one
                    // that is now unmapped, so `regather` cannot see it.
                    late_young |= found.is_young() && !young;
                    late_dirty |= found.is_dirty() && !dirty;
                }
                in_place = true;
                if cur[k].is_table(level) && new[k].is_leaf(level) {
                    collapsed |= 1 << k;
                }
                if cur[k].is_table(level) {
                    if new[k].is_valid() {
                        ctx.debt.add(ev, size, level + 1, level, true);
                    } else {
                        ctx.debt.add_walk(ev);
                    }
                } else if !run_group {
                    ctx.debt.add(ev, size, level, level, false);
                }
            } else {
                self.write(table, first + k, new[k]);
            }
            delta += new[k].is_valid() as i32 - cur[k].is_valid() as i32;
            ctx.wrote = true;
        }
        for (k, d) in new.iter().enumerate() {
            if d.is_valid() {
                let (young, dirty) = carry[k];
                self.spread_live(
                    table,
                    first + k,
                    level,
                    late_young || young,
                    late_dirty || dirty,
                );
            }
        }
        if in_place && run_group {
            let run = size * CONT_ENTRIES as u64;
            ctx.debt.add(gva, run, level, level, false);
        }
        if in_place && convert {
            // In place (FEAT_BBM level 2): the hardware may update any
            // entry through the old run until the TLBI has completed, also
            // entries already rewritten above; `regather` picks that up.
            if ctx.nregather == REGATHER_BATCH {
                ctx.debt.settle(&mut self.platform, self.features);
                self.regather(ctx);
                self.free_deferred(ctx);
            }
            ctx.regather[ctx.nregather] = (table, first, level);
            ctx.nregather += 1;
        }
        self.adjust(table, delta);
        collapsed
    }

    /// Access and dirty state ORed over every leaf below `table` at `level`.
    fn table_state(&self, table: PhysAddr, level: u8) -> (bool, bool) {
        let (mut young, mut dirty) = (false, false);
        for i in 0..ENTRIES {
            let d = self.read(table, i);
            if d.is_leaf(level) {
                young |= d.is_young();
                dirty |= d.is_dirty();
            } else if d.is_table(level) {
                let (y, w) = self.table_state(d.table_address(), level + 1);
                young |= y;
                dirty |= w;
            }
        }
        (young, dirty)
    }
}

/// Index of the entry mapping `va` in its table at `level`.
#[inline]
fn gva_index(va: u64, level: u8) -> usize {
    ((va >> level_shift(level)) & (ENTRIES as u64 - 1)) as usize
}
