//! The stage-1 table engine's public face: [`Stage1`] with map, unmap,
//! protect, write-protect, query, access-flag harvesting and re-folding
//! over a VMSAv8-64 table tree, and the descriptor access all of it goes
//! through.
//!
//! Arm ARM DDI 0487M.a.a, chapter D8 (D8.2 walks, D8.3 descriptors, D8.4
//! permissions, D8.5 access/dirty state, D8.7.1 the Contiguous bit, D8.17.1
//! break-before-make); rules 1-8 of docs/architecture.md. The parts:
//!
//! * `cursor`: where a walk stands and the walks (lookup, scans, the two
//!   phases of `map`, the group-by-group rewrite of the other operations);
//! * `fold`: when entries form a run or a table can become a block;
//! * `rewrite`: writing a group live (break-before-make or in place),
//!   keeping access/dirty state, and what waits for the TLBI.
//!
//! Input is validated before the first descriptor write; tables needed for
//! splits are allocated before anything changes, and a `map` that runs out
//! of table memory half way is rolled back, so an out-of-memory `Err`
//! leaves the tables as they were. No heap: recursion depth is at most four
//! levels and every per-operation buffer is a small array on the stack.

mod cursor;
mod fold;
mod rewrite;

pub(super) use fold::{run_eligible, RunShape};

use self::cursor::{entry_index, Cursor};
use self::rewrite::{OpCtx, STASH};
use super::attributes::Attributes;
use super::descriptor::{
    level_size, AccessState, Descriptor, DescriptorKind, CONT_ENTRIES, ENTRIES, OA_BITS,
};
use super::error::Stage1Error;
use super::flush::TlbDebt;
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

/// A stage-1 translation table tree and the platform it lives on.
///
/// `P` provides table memory and TLB maintenance; on target that is the hal's
/// MMU object, on the host the fake of `stage1::fake` (feature `testing`).
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
    /// First VAs of the pinned 2 MiB chunks (see [`Stage1::pin_small`]).
    pinned: [u64; MAX_PINNED],
    /// How many of `pinned` are in use.
    pinned_len: usize,
}

/// 2 MiB chunks [`Stage1::pin_small`] can keep at most.
pub const MAX_PINNED: usize = 16;

/// Size of a pinned chunk: one level-3 table's worth.
const PIN_CHUNK: u64 = 2 << 20;

/// What [`Stage1::valid_count`] returns for a count it could not read:
/// neither 0 (the table would be freed) nor 512 (it would be collapsed).
pub(in crate::stage1) const COUNT_UNKNOWN: u32 = u32::MAX;

impl<P: TableMemory + TranslationHw> Stage1<P> {
    /// Creates an empty tree (allocates the root table) that a walker may
    /// use from the start: every rewrite of a valid entry is a
    /// compare-and-swap, so access/dirty updates of the hardware
    /// (FEAT_HAFDBS) are never lost.
    ///
    /// # Errors
    ///
    /// [`Stage1Error::OutOfTableMemory`] or [`Stage1Error::TableMemory`]
    /// when no root table can be allocated.
    pub fn new(platform: P, va_size: VaSize, features: Features) -> Result<Self, Stage1Error> {
        let mut s = Self::new_detached(platform, va_size, features)?;
        s.live = true;
        Ok(s)
    }

    /// Creates an empty tree that no walker uses yet: it is not in any
    /// TTBR, or translation is off. Until [`Stage1::set_live`], every
    /// descriptor is written with a plain store: with the MMU off, data
    /// accesses are Device-nGnRnE, and exclusives or atomics on Device
    /// memory are IMPLEMENTATION DEFINED (Arm ARM B2.12.2, "Exclusive access
    /// instructions and Shareable memory locations"). TLB maintenance is
    /// issued as usual, so the tree is correct whenever it goes live.
    ///
    /// # Errors
    ///
    /// As for [`Stage1::new`].
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
            pinned: [0; MAX_PINNED],
            pinned_len: 0,
        })
    }

    /// Pins `[va, va + len)` (2 MiB aligned, nothing mapped in it yet) to
    /// small units for the life of the tree: from now on no block and no
    /// run larger than 64 KiB ever covers any of it (a map over it writes
    /// a level-3 table of pages and 64 KiB runs, and no refold collapses
    /// that table). For memory that must never lie inside a unit that
    /// gets broken: a provider that takes every table frame from pinned
    /// chunks it never hands out for anything else has no table inside a
    /// block or run that a split or unfold breaks, so splits work without
    /// FEAT_BBM level 2 however the tree maps its own tables.
    ///
    /// # Errors
    ///
    /// [`Stage1Error::UnalignedVa`] / [`Stage1Error::UnalignedLength`] for
    /// a range not aligned to 2 MiB, [`Stage1Error::EmptyRange`],
    /// [`Stage1Error::VaOutOfRange`], [`Stage1Error::AlreadyMapped`] when a
    /// page of it is mapped, [`Stage1Error::TooManyPinned`] past
    /// [`MAX_PINNED`] chunks. Nothing is pinned on error.
    pub fn pin_small(&mut self, va: VirtAddr, len: u64) -> Result<(), Stage1Error> {
        let (start, end) = self.check_va(va, len)?;
        if !start.is_multiple_of(PIN_CHUNK) {
            return Err(Stage1Error::UnalignedVa { va });
        }
        if !len.is_multiple_of(PIN_CHUNK) {
            return Err(Stage1Error::UnalignedLength { len });
        }
        if let Some(mapped) = self.first_where(&self.cursor(start, end), true) {
            return Err(Stage1Error::AlreadyMapped {
                va: VirtAddr(mapped),
            });
        }
        let new = (start..end)
            .step_by(PIN_CHUNK as usize)
            .filter(|c| self.pinned_in(*c, *c + PIN_CHUNK).is_none())
            .count();
        if self.pinned_len + new > MAX_PINNED {
            return Err(Stage1Error::TooManyPinned);
        }
        for chunk in (start..end).step_by(PIN_CHUNK as usize) {
            if self.pinned_in(chunk, chunk + PIN_CHUNK).is_none() {
                self.pinned[self.pinned_len] = chunk;
                self.pinned_len += 1;
            }
        }
        Ok(())
    }

    /// The lowest pinned chunk that meets `[start, end)`, if any.
    #[inline]
    pub(in crate::stage1) fn pinned_in(&self, start: u64, end: u64) -> Option<u64> {
        self.pinned[..self.pinned_len]
            .iter()
            .copied()
            .filter(|&c| c < end && c + PIN_CHUNK > start)
            .min()
    }

    /// True when a leaf or run of `size` bytes at `va` may be written:
    /// 64 KiB and smaller always, larger ones only clear of pinned chunks.
    #[inline]
    pub(in crate::stage1) fn unit_allowed(&self, va: u64, size: u64) -> bool {
        size <= 16 * PAGE_SIZE || self.pinned_len == 0 || self.pinned_in(va, va + size).is_none()
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
    /// hardware's part on the fake). A test hook: only with the `testing`
    /// feature.
    #[cfg(any(test, feature = "testing"))]
    #[inline]
    pub fn platform_mut(&mut self) -> &mut P {
        &mut self.platform
    }

    // ---- table access: the only unsafe code of the engine ----

    #[inline]
    pub(in crate::stage1) fn read(&self, table: PhysAddr, index: usize) -> Descriptor {
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
    pub(in crate::stage1) fn valid_count(&mut self, table: PhysAddr) -> u32 {
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
    pub(in crate::stage1) fn clear_fault(&mut self) {
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

    /// A new leaf for `attrs` at `level`: access flag set, clean.
    #[inline]
    fn leaf_template(&self, attrs: &Attributes, level: u8) -> Descriptor {
        leaf(attrs, level, false, self.features.hafdbs).with(Descriptor::AF, true)
    }

    // ---- validation ----

    /// `(start, end)` of `[va, va + len)` if it is a non-empty, 4 KiB
    /// aligned part of the input range.
    fn check_va(&self, va: VirtAddr, len: u64) -> Result<(u64, u64), Stage1Error> {
        if len == 0 {
            return Err(Stage1Error::EmptyRange);
        }
        if !va.is_aligned(PAGE_SIZE) {
            return Err(Stage1Error::UnalignedVa { va });
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(Stage1Error::UnalignedLength { len });
        }
        match va.0.checked_add(len) {
            Some(end) if end <= self.va_size.limit() => Ok((va.0, end)),
            _ => Err(Stage1Error::VaOutOfRange { va }),
        }
    }

    /// A cursor on the root covering `[start, end)`.
    fn cursor(&self, start: u64, end: u64) -> Cursor {
        Cursor::new(self.root, self.va_size.start_level(), start, end)
    }

    // ---- public operations ----

    /// Maps `[va, va + len)` to `[pa, pa + len)` with the largest units the
    /// alignment allows. Fails without changing anything if any page of the
    /// range is already mapped.
    ///
    /// # Errors
    ///
    /// As for [`Stage1::map_limited`].
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
    ///
    /// # Errors
    ///
    /// Nothing is changed on any of these:
    ///
    /// * [`Stage1Error::EmptyRange`], [`Stage1Error::UnalignedVa`],
    ///   [`Stage1Error::UnalignedPa`], [`Stage1Error::UnalignedLength`];
    /// * [`Stage1Error::VaOutOfRange`] / [`Stage1Error::PaOutOfRange`] when the
    ///   range leaves the input range or the 48-bit output range;
    /// * [`Stage1Error::WriteAndExecute`], [`Stage1Error::ExecutableDevice`];
    /// * [`Stage1Error::AlreadyMapped`] with the first mapped page;
    /// * [`Stage1Error::OutOfTableMemory`] (what was mapped is rolled back).
    ///
    /// [`Stage1Error::TableMemory`] when the provider failed otherwise (see
    /// that variant for what then holds).
    pub fn map_limited(
        &mut self,
        va: VirtAddr,
        pa: PhysAddr,
        len: u64,
        attrs: Attributes,
        limit: MappingUnit,
    ) -> Result<(), Stage1Error> {
        let (start, end) = self.check_va(va, len)?;
        if !pa.is_aligned(PAGE_SIZE) {
            return Err(Stage1Error::UnalignedPa { pa });
        }
        match pa.0.checked_add(len) {
            Some(end) if end <= 1 << OA_BITS => {}
            _ => return Err(Stage1Error::PaOutOfRange { pa }),
        }
        attrs.validate()?;
        if len == PAGE_SIZE {
            return self.map_page(start, pa.0, &attrs, limit);
        }
        if let Some(mapped) = self.first_where(&self.cursor(start, end), true) {
            return Err(Stage1Error::AlreadyMapped {
                va: VirtAddr(mapped),
            });
        }
        let mut ctx = OpCtx::new(limit);
        let offset = pa.0.wrapping_sub(start);
        let whole = self.cursor(start, end);
        let (mapped, mut debt) = self.map_level(&mut ctx, &attrs, &whole, offset, TlbDebt::NONE);
        match mapped {
            Ok(()) => {
                if limit >= MappingUnit::Cont64K {
                    // Interior runs and tables were written in their final
                    // form; only the boundaries can now fold with neighbours.
                    let op = LeafOp::Refold;
                    let first_page = self.cursor(start, start + PAGE_SIZE);
                    debt = self.modify_level(&mut ctx, &op, &first_page, debt);
                    if end - PAGE_SIZE > start {
                        let last_page = self.cursor(end - PAGE_SIZE, end);
                        debt = self.modify_level(&mut ctx, &op, &last_page, debt);
                    }
                }
                self.finish(&mut ctx, debt);
                self.reported(())
            }
            Err(stopped_at) => {
                // Everything below `stopped_at` was written by this call, at
                // its natural size and never folded with neighbours, so
                // unmapping it needs no split and restores the previous tree.
                if stopped_at > start {
                    let done = self.cursor(start, stopped_at);
                    debt = self.modify_level(&mut ctx, &LeafOp::Unmap, &done, debt);
                }
                self.finish(&mut ctx, debt);
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
            match self.read(table, entry_index(va, level)).kind(level) {
                DescriptorKind::Table(next) => {
                    table = next;
                    level += 1;
                }
                DescriptorKind::Leaf => {
                    return Err(Stage1Error::AlreadyMapped { va: VirtAddr(va) })
                }
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
            let child_level = level + 1 + k as u8;
            self.write(chain[k], entry_index(va, child_level), value);
            self.adjust(chain[k], 1);
            value = Descriptor::table(chain[k]);
        }
        self.write(table, entry_index(va, level), value);
        self.adjust(table, 1);
        // Only a group that can now fold, or a table that just filled up,
        // can change anything above the new page.
        let leaf_table = if need > 0 { chain[need - 1] } else { table };
        if limit >= MappingUnit::Cont64K
            && (self.valid_count(leaf_table) as usize == ENTRIES
                || self.run_candidate(leaf_table, 3, entry_index(va, 3)))
        {
            let mut ctx = OpCtx::new(limit);
            ctx.wrote = true;
            let page = self.cursor(va, va + PAGE_SIZE);
            let debt = self.modify_level(&mut ctx, &LeafOp::Refold, &page, TlbDebt::NONE);
            self.finish(&mut ctx, debt);
        } else {
            // Invalid -> valid needs no TLBI: publish the store for the walker.
            self.platform.dsb_ishst();
            self.platform.isb();
        }
        self.reported(())
    }

    /// Unmaps `[va, va + len)`; every page must be mapped. Tables that
    /// become empty are freed.
    ///
    /// # Errors
    ///
    /// [`Stage1Error::EmptyRange`], [`Stage1Error::UnalignedVa`],
    /// [`Stage1Error::UnalignedLength`], [`Stage1Error::VaOutOfRange`] for a bad
    /// range and [`Stage1Error::NotMapped`] with the first page of it that is
    /// not mapped; [`Stage1Error::OutOfTableMemory`] when a block that must be
    /// split finds no table frame. On these nothing is changed.
    /// [`Stage1Error::TableMemory`] when the provider failed otherwise.
    pub fn unmap(&mut self, va: VirtAddr, len: u64) -> Result<(), Stage1Error> {
        self.modify(va, len, LeafOp::Unmap)
    }

    /// Changes the attributes of `[va, va + len)`; every page must be mapped.
    /// Access and dirty state are kept. A permission-only change of whole
    /// runs and blocks is done in place; a memory-type change, or a change to
    /// part of a run or block, breaks first.
    ///
    /// # Errors
    ///
    /// As for [`Stage1::unmap`], and [`Stage1Error::WriteAndExecute`] or
    /// [`Stage1Error::ExecutableDevice`] for refused attributes.
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
    ///
    /// # Errors
    ///
    /// As for [`Stage1::unmap`].
    pub fn wrprotect(&mut self, va: VirtAddr, len: u64) -> Result<(), Stage1Error> {
        self.modify(va, len, LeafOp::WriteProtect)
    }

    /// Folds every run and collapses every table in `[va, va + len)` (widened
    /// to the runs and tables it touches) that has become eligible, e.g.
    /// after balloon deflate (rule 8). Holes are allowed.
    ///
    /// # Errors
    ///
    /// [`Stage1Error::EmptyRange`], [`Stage1Error::UnalignedVa`],
    /// [`Stage1Error::UnalignedLength`], [`Stage1Error::VaOutOfRange`] for a bad
    /// range; [`Stage1Error::TableMemory`] when a valid-entry count or a free
    /// failed (the tables stay a correct translation).
    pub fn refold(&mut self, va: VirtAddr, len: u64) -> Result<(), Stage1Error> {
        let (start, end) = self.check_va(va, len)?;
        let mut ctx = OpCtx::new(MappingUnit::LARGEST);
        let whole = self.cursor(start, end);
        let debt = self.modify_level(&mut ctx, &LeafOp::Refold, &whole, TlbDebt::NONE);
        self.finish(&mut ctx, debt);
        self.reported(())
    }

    /// Translates `va`: output address, attributes, and access/dirty ORed
    /// over the whole contiguous run (the hardware updates only the entry it
    /// used, rule 3).
    ///
    /// # Errors
    ///
    /// [`Stage1Error::NotMapped`] when no leaf translates `va`.
    pub fn query(&self, va: VirtAddr) -> Result<Translation, Stage1Error> {
        let leaf = self.find_leaf(va.0).ok_or(Stage1Error::NotMapped { va })?;
        let (d, level) = (leaf.descriptor, leaf.level);
        let size = level_size(level);
        let contiguous = d.is_contiguous();
        // Rule 3: a run's state is that of all its entries.
        let state = if contiguous {
            let first = leaf.index & !(CONT_ENTRIES - 1);
            AccessState::gather(
                (0..CONT_ENTRIES).map(|k| self.read(leaf.table, first + k)),
                level,
            )
            .or(AccessState::of(d))
        } else {
            AccessState::of(d)
        };
        let unit = MappingUnit::of_leaf(level, contiguous);
        let attributes = Attributes::from_descriptor(d).ok_or(Stage1Error::NotMapped { va })?;
        Ok(Translation {
            output: PhysAddr(d.output(level).0 + (va.0 & (size - 1))),
            attributes,
            young: state.young,
            dirty: state.dirty,
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
    ///
    /// # Errors
    ///
    /// [`Stage1Error::NotMapped`] when no leaf translates `va`.
    pub fn test_and_clear_young(&mut self, va: VirtAddr) -> Result<bool, Stage1Error> {
        let leaf = self.find_leaf(va.0).ok_or(Stage1Error::NotMapped { va })?;
        let (table, level) = (leaf.table, leaf.level);
        let size = level_size(level);
        let mut ctx = OpCtx::new(MappingUnit::LARGEST);
        let (first, count) = if leaf.descriptor.is_contiguous() {
            (leaf.index & !(CONT_ENTRIES - 1), CONT_ENTRIES)
        } else {
            (leaf.index, 1)
        };
        let mut young = false;
        let mut debt = TlbDebt::NONE;
        for i in first..first + count {
            let entry = self.read(table, i);
            if entry.is_young() {
                young = true;
                self.replace_live(table, i, level, entry, entry.with(Descriptor::AF, false));
            }
        }
        if young {
            let unit = size * count as u64;
            debt.add(va.0 & !(unit - 1), unit, level, level, false);
            ctx.wrote = true;
        }
        self.finish(&mut ctx, debt);
        Ok(young)
    }

    /// Where the leaf translating `va` lives: (table, index, level), for
    /// the fake's [`super::fake::FakePlatform::hw_touch`]. A test hook:
    /// only with the `testing` feature.
    #[cfg(any(test, feature = "testing"))]
    pub fn leaf_entry(&self, va: VirtAddr) -> Option<(PhysAddr, usize, u8)> {
        self.find_leaf(va.0).map(|l| (l.table, l.index, l.level))
    }

    /// Counts the translation units and tables of the whole tree.
    pub fn summary(&self) -> MappingSummary {
        let mut summary = MappingSummary::default();
        self.summarize(self.root, self.va_size.start_level(), &mut summary);
        summary
    }

    // ---- operation plumbing ----

    /// Unmap, protect and write-protect: validate, allocate the split
    /// tables, walk, settle.
    fn modify(&mut self, va: VirtAddr, len: u64, op: LeafOp) -> Result<(), Stage1Error> {
        let (start, end) = self.check_va(va, len)?;
        if let Some(hole) = self.first_where(&self.cursor(start, end), false) {
            return Err(Stage1Error::NotMapped { va: VirtAddr(hole) });
        }
        let mut ctx = OpCtx::new(MappingUnit::LARGEST);
        let needed = self.splits_needed(start, end);
        while ctx.stash_count < needed {
            match self.platform.alloc_table() {
                Ok(t) => {
                    ctx.stash[ctx.stash_count] = t;
                    ctx.stash_count += 1;
                }
                Err(e) => {
                    self.finish(&mut ctx, TlbDebt::NONE);
                    self.reported(())?;
                    return Err(e.into());
                }
            }
        }
        let whole = self.cursor(start, end);
        let debt = self.modify_level(&mut ctx, &op, &whole, TlbDebt::NONE);
        self.finish(&mut ctx, debt);
        let short = ctx.error;
        self.reported(())?;
        short.map_or(Ok(()), Err)
    }

    /// Tables needed to split the blocks that `[start, end)` covers only
    /// partly.
    fn splits_needed(&self, start: u64, end: u64) -> usize {
        let mut blocks = [(0u8, 0u64); STASH];
        let mut count = 0;
        for (boundary, probe) in [(start, start), (end, end - PAGE_SIZE)] {
            let Some(leaf) = self.find_leaf(probe) else {
                continue;
            };
            let mut level = leaf.level;
            while level < 3 && boundary & (level_size(level) - 1) != 0 {
                let block = (level, boundary & !(level_size(level) - 1));
                if !blocks[..count].contains(&block) {
                    blocks[count] = block;
                    count += 1;
                }
                level += 1;
            }
        }
        count
    }

    /// A table for splitting a block: from the stash `modify` filled, so
    /// that running out of table memory is found before anything changes.
    fn take_split_table(&mut self, ctx: &mut OpCtx) -> Result<PhysAddr, Stage1Error> {
        if ctx.stash_count > 0 {
            ctx.stash_count -= 1;
            return Ok(ctx.stash[ctx.stash_count]);
        }
        // Only if `splits_needed` missed a split (a bug): try once more,
        // and fail the operation rather than skip part of its range.
        self.platform.alloc_table().map_err(Stage1Error::from)
    }

    /// The new value of a covered leaf `d` at `level` under `op`.
    fn apply(&self, op: &LeafOp, d: Descriptor, level: u8) -> Descriptor {
        let rebuild = |attrs: &Attributes| {
            let keep = d.bits() & (Descriptor::AF | Descriptor::CONT);
            Descriptor(leaf(attrs, level, d.is_dirty(), self.features.hafdbs).bits() | keep)
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
}

/// The one way a leaf is built: valid, the block or page encoding of
/// `level` (D8.3.1.2), and the attribute bits of `attrs` with the dirty state
/// `dirty` encoded where this entry keeps it.
#[inline]
fn leaf(attrs: &Attributes, level: u8, dirty: bool, hafdbs: bool) -> Descriptor {
    Descriptor(Descriptor::VALID | attrs.leaf_bits(dirty, hafdbs)).with_leaf_level(level)
}
