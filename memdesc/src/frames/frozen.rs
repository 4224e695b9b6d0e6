//! Frozen allocations: frames with no refcount at all (page tables, slab
//! backing, Offline and guard frames), typed by [`FrozenKind`].
//!
//! A page table or slab allocation gets a descriptor of its own type; Offline
//! and guard frames have none, their order lives in the misc word.

use super::allocator::{check_order, FrameAllocator};
use super::atomics::{AtomicCell, Atomics};
use super::desc::PageTableDesc;
use super::desc_cache::{desc_of, desc_word, DescMemory};
use super::error::FrameError;
use super::refcount::PageTableFrame;
use super::word::{FrameType, ReservedKind, Word, MISC_FLAG_TAIL};
use crate::addr::Pfn;
use core::sync::atomic::Ordering;

/// What a frozen (refcount 0) allocation is for: the four [`FrameType`]s
/// that are allocations without a refcount. Each kind *is* one frame type
/// ([`FrozenKind::frame_type`], [`FrozenKind::of`]); see [`FrameType`] for
/// how the classifications relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrozenKind {
    /// A translation table: gets a [`PageTableDesc`] with a valid-entry count.
    PageTable,
    /// Slab backing: gets a [`SlabDesc`](super::SlabDesc).
    Slab,
    /// Offline (ballooned): no descriptor.
    Offline,
    /// A guard frame: no descriptor.
    Guard,
}

impl FrozenKind {
    /// Every kind.
    pub const ALL: [FrozenKind; 4] = [
        FrozenKind::PageTable,
        FrozenKind::Slab,
        FrozenKind::Offline,
        FrozenKind::Guard,
    ];

    /// The frame type the allocation's words carry.
    pub const fn frame_type(self) -> FrameType {
        match self {
            Self::PageTable => FrameType::PageTable,
            Self::Slab => FrameType::Slab,
            Self::Offline => FrameType::Offline,
            Self::Guard => FrameType::Guard,
        }
    }

    /// The kind whose words carry `ty`; `None` for types that are not frozen
    /// allocations (Reserved, Free, Folio, HwPoison).
    pub const fn of(ty: FrameType) -> Option<Self> {
        Some(match ty {
            FrameType::PageTable => Self::PageTable,
            FrameType::Slab => Self::Slab,
            FrameType::Offline => Self::Offline,
            FrameType::Guard => Self::Guard,
            FrameType::Reserved | FrameType::Free | FrameType::Folio | FrameType::HwPoison => {
                return None
            }
        })
    }
}

impl From<FrozenKind> for FrameType {
    fn from(k: FrozenKind) -> Self {
        k.frame_type()
    }
}

impl<M: DescMemory, A: Atomics> FrameAllocator<'_, M, A> {
    /// Words and (maybe) descriptor for a frozen allocation of `kind`.
    // Forced: see `alloc_frozen_aligned`.
    #[inline(always)]
    pub(crate) fn frozen_words(
        &mut self,
        order: u8,
        kind: FrozenKind,
    ) -> Result<(Word, Word), FrameError> {
        Ok(match kind {
            FrozenKind::PageTable => {
                let d = self.get_table_desc()?;
                d.init(order);
                let w = desc_word(d);
                (w, w)
            }
            FrozenKind::Slab => {
                let d = self.get_slab_desc()?;
                d.init(order);
                let w = desc_word(d);
                (w, w)
            }
            FrozenKind::Offline | FrozenKind::Guard => {
                let ty = kind.frame_type();
                (
                    Word::misc(ty, 0, order, 0),
                    Word::misc(ty, 0, order, MISC_FLAG_TAIL),
                )
            }
        })
    }

    /// `2^order` frames with refcount frozen at 0, typed by `kind`.
    ///
    /// # Errors
    ///
    /// [`FrameError::InvalidOrder`] above [`MAX_ORDER`](super::MAX_ORDER);
    /// [`FrameError::OutOfMemory`] when no free block of the order exists;
    /// [`FrameError::OutOfDescriptors`] when a page-table or slab descriptor
    /// cannot be had.
    #[inline]
    pub fn alloc_frozen(&mut self, order: u8, kind: FrozenKind) -> Result<Pfn, FrameError> {
        self.alloc_frozen_aligned(order, order, kind)
    }

    /// As [`FrameAllocator::alloc_frozen`], first PFN aligned to `2^align`.
    ///
    /// # Errors
    ///
    /// As [`FrameAllocator::alloc_frozen`], and [`FrameError::InvalidOrder`]
    /// for an `align` above [`MAX_ORDER`](super::MAX_ORDER).
    // Forced (with `frozen_words`, `free_frozen`, `FrameAllocator::put`):
    // after the split into modules and the per-CPU code, LLVM stopped
    // inlining these into a caller's loop, and the alloc + free pairs of
    // `cargo qemu bench memdesc` were 10-20 % slower than before.
    #[inline(always)]
    pub fn alloc_frozen_aligned(
        &mut self,
        order: u8,
        align: u8,
        kind: FrozenKind,
    ) -> Result<Pfn, FrameError> {
        check_order(order)?;
        check_order(align)?;
        let (head, tail) = self.frozen_words(order, kind)?;
        let (idx, pfn) = match self.take_block(order, align) {
            Ok(b) => b,
            Err(e) => {
                self.drop_desc(head);
                return Err(e);
            }
        };
        self.publish_frozen(idx, order, head, tail);
        Ok(Pfn(pfn))
    }

    /// Writes an allocation's words (descriptor filled in first) and counts it.
    pub(super) fn publish_frozen(&mut self, idx: usize, order: u8, head: Word, tail: Word) {
        // Release fence before the relaxed word stores: a lock-free reader
        // that acquires a word (`PageArray::load` in `page_table`, `slab`)
        // sees the descriptor `frozen_words` initialised. Pairs with that
        // Acquire load.
        A::fence(Ordering::Release);
        let cells = self.pa.cells(idx, 1usize << order);
        cells[0].store(head.raw(), Ordering::Relaxed);
        for c in &cells[1..] {
            c.store(tail.raw(), Ordering::Relaxed);
        }
        let n = 1u64 << order;
        self.by_type[FrameType::Free.index()] -= n;
        if let Some(t) = head.frame_type() {
            self.by_type[t.index()] += n;
        }
    }

    /// Frees a frozen allocation (page table, slab, offline, guard).
    /// Poisoned frames in it stay poisoned. Reserved frames are not frozen
    /// allocations ([`FrameError::Reserved`]); see [`FrameAllocator::unreserve`].
    ///
    /// # Errors
    ///
    /// [`FrameError::InvalidOrder`], [`FrameError::Misaligned`],
    /// [`FrameError::NotManaged`], [`FrameError::NotAllocation`],
    /// [`FrameError::Free`], [`FrameError::HwPoisoned`] or
    /// [`FrameError::WrongType`] (a folio) when `[pfn, pfn + 2^order)` is not
    /// exactly one frozen allocation; [`FrameError::Reserved`] for reserved
    /// frames; [`FrameError::PageTableNotEmpty`] for a table with valid entries.
    /// Nothing changes on error.
    // Forced: see `alloc_frozen_aligned`.
    #[inline(always)]
    pub fn free_frozen(&mut self, pfn: Pfn, order: u8) -> Result<(), FrameError> {
        let (sec, idx, head, poisoned) = self.check_allocation(pfn, order)?;
        let ty = head.frame_type().ok_or(FrameError::Corrupt { pfn })?;
        if ty == FrameType::Reserved {
            return Err(FrameError::Reserved {
                pfn,
                kind: ReservedKind::from_subtype(head.subtype()),
            });
        }
        Self::check_table_empty(pfn, head)?;
        self.drop_desc(head);
        let freed = self.give_back(&sec, idx, pfn.0, order, poisoned);
        self.by_type[ty.index()] -= freed;
        Ok(())
    }

    /// An empty translation table (order 0, valid count 0).
    ///
    /// # Errors
    ///
    /// As [`FrameAllocator::alloc_frozen`].
    pub fn alloc_page_table(&mut self) -> Result<PageTableFrame<A>, FrameError> {
        let pfn = self.alloc_frozen(0, FrozenKind::PageTable)?;
        self.pa.page_table(pfn)
    }

    /// Frees a translation table; fails while it has valid entries, and for
    /// a stale handle (the frame holds another table, or none, since).
    ///
    /// # Errors
    ///
    /// [`FrameError::StaleHandle`] when the frame no longer holds this table;
    /// [`FrameError::PageTableNotEmpty`] while it has valid entries.
    pub fn free_page_table(&mut self, t: PageTableFrame<A>) -> Result<(), FrameError> {
        t.check_current()?;
        // The frame must still hold this table (its original word, if poisoned).
        let now = self.pa.effective(self.pa.word(t.pfn())?);
        if now != desc_word(t.desc()) {
            return Err(FrameError::StaleHandle { pfn: t.pfn() });
        }
        self.free_frozen(t.pfn(), 0)
    }

    /// `PageTableNotEmpty` when `head` (an allocation's head word, the
    /// original one for a poisoned frame) is a table with valid entries.
    pub(crate) fn check_table_empty(pfn: Pfn, head: Word) -> Result<(), FrameError> {
        if let Some(d) = desc_of::<A, PageTableDesc<A>>(head) {
            let valid = d.valid();
            if valid != 0 {
                return Err(FrameError::PageTableNotEmpty { pfn, valid });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_kinds_are_exactly_the_refcountless_allocation_types() {
        for ty in FrameType::ALL {
            let frozen = FrozenKind::of(ty);
            assert_eq!(frozen.map(FrozenKind::frame_type), frozen.map(|_| ty));
            let expect = !matches!(
                ty,
                FrameType::Reserved | FrameType::Free | FrameType::Folio | FrameType::HwPoison
            );
            assert_eq!(frozen.is_some(), expect, "{ty:?}");
        }
        for k in FrozenKind::ALL {
            assert_eq!(FrozenKind::of(FrameType::from(k)), Some(k));
        }
    }
}
