//! Placement: allocations at a given PFN (`alloc_folio_at`,
//! `alloc_frozen_at`), reserved ranges (`reserve`, `unreserve`) and the
//! range checks and block surgery they share.

use super::allocator::FrameAllocator;
use super::atomics::Atomics;
use super::desc_cache::DescMemory;
use super::error::FrameError;
use super::frozen::FrozenKind;
use super::owner::Owner;
use super::page_array::{PfnRange, Section};
use super::refcount::FolioRef;
use super::word::{FrameType, ReservedKind, Word};
use crate::addr::Pfn;

/// A range the allocator must never hand out, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedRange {
    /// The frames (clipped to the page array; parts outside are ignored).
    pub range: PfnRange,
    /// Why.
    pub kind: ReservedKind,
}

impl<M: DescMemory, A: Atomics> FrameAllocator<'_, M, A> {
    /// A folio at exactly `[pfn, pfn + 2^order)`, which must be free.
    ///
    /// # Errors
    ///
    /// [`FrameError::InvalidOrder`], [`FrameError::Misaligned`],
    /// [`FrameError::NotManaged`]; [`FrameError::NotFree`] or
    /// [`FrameError::HwPoisoned`] naming the first frame of the range that is
    /// not free; [`FrameError::OutOfDescriptors`]. Nothing changes on error.
    pub fn alloc_folio_at(
        &mut self,
        pfn: Pfn,
        order: u8,
        owner: Owner,
    ) -> Result<FolioRef<A>, FrameError> {
        let (sec, idx) = self.take_at(pfn, order)?;
        let d = match self.get_folio_desc() {
            Ok(d) => d,
            Err(e) => {
                self.untake(&sec, idx, pfn.0, order);
                return Err(e);
            }
        };
        Ok(self.publish_folio(d, idx, pfn.0, order, owner))
    }

    /// Frozen frames at exactly `[pfn, pfn + 2^order)`, which must be free.
    ///
    /// # Errors
    ///
    /// As [`FrameAllocator::alloc_folio_at`].
    pub fn alloc_frozen_at(
        &mut self,
        pfn: Pfn,
        order: u8,
        kind: FrozenKind,
    ) -> Result<(), FrameError> {
        let (sec, idx) = self.take_at(pfn, order)?;
        let (head, tail) = match self.frozen_words(order, kind) {
            Ok(w) => w,
            Err(e) => {
                self.untake(&sec, idx, pfn.0, order);
                return Err(e);
            }
        };
        self.publish_frozen(idx, order, head, tail);
        Ok(())
    }

    /// Takes `range` (all frames must be free) as `Reserved(kind)`.
    ///
    /// # Errors
    ///
    /// [`FrameError::NotManaged`]; [`FrameError::NotFree`] or
    /// [`FrameError::HwPoisoned`] for the first frame that is not free.
    /// Nothing changes on error.
    pub fn reserve(&mut self, range: PfnRange, kind: ReservedKind) -> Result<(), FrameError> {
        self.drain_cache();
        for p in range.start.0..range.end.0 {
            let w = self.pa.word(Pfn(p))?;
            match w.frame_type() {
                Some(FrameType::Free) => {}
                Some(FrameType::HwPoison) => return Err(FrameError::HwPoisoned { pfn: Pfn(p) }),
                _ => return Err(FrameError::NotFree { pfn: Pfn(p) }),
            }
        }
        for p in range.start.0..range.end.0 {
            let (sec, idx) = self.pa.managed(Pfn(p))?;
            self.take_free_frame(&sec, idx, p)?;
            self.pa
                .store_release(idx, Word::misc(FrameType::Reserved, kind as u8, 0, 0));
            self.recount(FrameType::Free, FrameType::Reserved, 1);
        }
        Ok(())
    }

    /// Gives `range`, reserved as `Reserved(kind)` (by [`FrameAllocator::new`]
    /// or [`FrameAllocator::reserve`]), back to the allocator. Every frame
    /// must be `Reserved(kind)`; the allocator's own memory
    /// ([`ReservedKind::DescriptorCache`], [`ReservedKind::PageArray`]) is
    /// never given back. Refused with [`FrameError::Reserved`] (or
    /// `WrongType`, `HwPoisoned`, `NotManaged`) before anything changes.
    ///
    /// # Safety
    ///
    /// Nothing may use the memory of `range` any more (reserved frames are
    /// the image, the device tree, MMIO holes...: the allocator cannot know
    /// whether they are still in use); once given back, its frames are
    /// handed out to new owners.
    ///
    /// # Errors
    ///
    /// See above: checked for the whole range before anything changes.
    pub unsafe fn unreserve(
        &mut self,
        range: PfnRange,
        kind: ReservedKind,
    ) -> Result<(), FrameError> {
        for p in range.start.0..range.end.0 {
            let pfn = Pfn(p);
            let w = self.pa.word(pfn)?;
            match w.frame_type() {
                Some(FrameType::Reserved) => {}
                Some(FrameType::HwPoison) => return Err(FrameError::HwPoisoned { pfn }),
                Some(found) => return Err(FrameError::WrongType { pfn, found }),
                None => return Err(FrameError::Corrupt { pfn }),
            }
            let found = ReservedKind::from_subtype(w.subtype());
            if found != kind
                || matches!(
                    found,
                    ReservedKind::DescriptorCache | ReservedKind::PageArray
                )
            {
                return Err(FrameError::Reserved { pfn, kind: found });
            }
        }
        for p in range.start.0..range.end.0 {
            let (sec, idx) = self.pa.managed(Pfn(p))?;
            self.pa.store_relaxed(idx, Word::FREE_TAIL);
            self.lists.free(self.pa, &sec, idx, p, 0);
            self.recount(FrameType::Reserved, FrameType::Free, 1);
        }
        Ok(())
    }

    /// Takes the free range `[pfn, pfn + 2^order)` out of the buddy and
    /// parks it (head word Reserved, not counted anywhere) so descriptor
    /// growth can neither take it nor merge with it; the caller publishes
    /// it or gives it back with [`FrameAllocator::untake`].
    fn take_at(&mut self, pfn: Pfn, order: u8) -> Result<(Section, usize), FrameError> {
        self.drain_cache();
        let (sec, idx) = self.check_free_range(pfn, order)?;
        self.take_free_block(&sec, idx, pfn.0, order);
        self.pa.store_relaxed(idx, Word::RESERVED);
        Ok((sec, idx))
    }

    /// Gives a range parked by [`FrameAllocator::take_at`] back to the buddy.
    fn untake(&mut self, sec: &Section, idx: usize, pfn: u64, order: u8) {
        self.pa.store_relaxed(idx, Word::FREE_TAIL);
        self.lists.free(self.pa, sec, idx, pfn, order);
    }

    /// Checks that `[pfn, pfn + 2^order)` lies in one free block.
    fn check_free_range(&self, pfn: Pfn, order: u8) -> Result<(Section, usize), FrameError> {
        let sec = self.aligned_section(pfn, order)?;
        if !sec.holds_block(pfn.0, order) {
            return Err(FrameError::NotManaged { pfn: Pfn(sec.end) });
        }
        let idx = sec.index(pfn.0);
        match self.lists.find_block(self.pa, &sec, idx, pfn.0) {
            Some((_, hp, _, k)) if hp + (1u64 << k) >= pfn.0 + (1u64 << order) => Ok((sec, idx)),
            _ => {
                // Report the first frame that is not free.
                for i in 0..1u64 << order {
                    let w = self.pa.load_relaxed(idx + i as usize);
                    let at = Pfn(pfn.0 + i);
                    match w.frame_type() {
                        Some(FrameType::Free) => {}
                        Some(FrameType::HwPoison) => {
                            return Err(FrameError::HwPoisoned { pfn: at })
                        }
                        _ => return Err(FrameError::NotFree { pfn: at }),
                    }
                }
                Err(FrameError::NotFree { pfn })
            }
        }
    }

    /// Takes the (checked) free range `[pfn, pfn + 2^order)` out of its block.
    fn take_free_block(&mut self, sec: &Section, idx: usize, pfn: u64, order: u8) {
        if let Some(b) = self.lists.find_block(self.pa, sec, idx, pfn) {
            let (mut hidx, mut hp, w, mut k) = b;
            self.lists.unlink(self.pa, hidx, w, k);
            while k > order {
                k -= 1;
                let half = hp + (1u64 << k);
                let half_idx = hidx + (1usize << k);
                if pfn >= half {
                    self.lists.push(self.pa, hidx, k);
                    hidx = half_idx;
                    hp = half;
                } else {
                    self.lists.push(self.pa, half_idx, k);
                }
            }
        }
    }
}
