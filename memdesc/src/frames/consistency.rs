//! The allocator's consistency check: every invariant of the page array, the
//! free lists and the hot caches, verified by one O(frames) walk
//! (docs/architecture.md, "The page array", the invariants).

use super::allocator::FrameAllocator;
use super::atomics::Atomics;
use super::buddy::MAX_ORDER;
use super::desc::FolioDesc;
use super::desc_cache::{desc_of, DescMemory};
use super::hot_cache::{HotCache, CACHE_MAX_ORDER};
use super::word::{FrameType, NO_LINK};
use crate::addr::Pfn;

/// What [`FrameAllocator::check_consistency`] found wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inconsistency {
    /// A hot-cached block is misaligned or not inside one RAM range.
    CachedBlockMisplaced,
    /// A non-first frame of a hot-cached block is not a free tail.
    CachedBlockBadTail,
    /// A listed free block is misaligned or not inside one RAM range.
    FreeBlockMisplaced,
    /// A non-first frame of a listed free block is not a free tail.
    FreeBlockBadTail,
    /// A page-array index maps to no PFN.
    BadIndex,
    /// A PFN lies in no RAM range.
    NoSection,
    /// A hot-cached block of an order without a hot cache.
    CachedOrderTooHigh,
    /// A word with an unknown type tag.
    UnknownTag,
    /// A folio frame outside its descriptor's range.
    FolioFrameOutsideDescriptor,
    /// The hot-cached words disagree with the hot caches.
    HotCacheMismatch,
    /// A hot-cache entry is not a cached block of its order.
    HotCacheEntryNotCachedBlock,
    /// The per-type counts disagree with the words.
    TypeCountMismatch,
    /// A free-list link points outside the page array.
    FreeLinkOutOfRange,
    /// A free-list entry is not a free head of its list's order.
    FreeListEntryNotHead,
    /// A free head's `prev` link is not the previous entry.
    BadPrevLink,
    /// A listed free block's buddy is a listed free block of the same order (not fully merged).
    NotMerged,
    /// A free list has a cycle.
    FreeListCycle,
    /// A per-order free block count disagrees with its list.
    FreeBlockCountMismatch,
    /// The frames in the free lists and hot caches disagree with the Free count.
    FreeFrameCountMismatch,
}

/// A frame-range consistency violation found by
/// [`FrameAllocator::check_consistency`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsistencyError {
    /// Where.
    pub pfn: Pfn,
    /// What.
    pub what: Inconsistency,
}

impl<M: DescMemory, A: Atomics> FrameAllocator<'_, M, A> {
    /// Walks the whole page array and the free lists and checks every
    /// invariant: counts per type and order, list links, tails, folio
    /// coverage. O(frames); for tests and debug builds.
    ///
    /// # Errors
    ///
    /// The first violated invariant, as a [`ConsistencyError`] naming the
    /// frame and the [`Inconsistency`].
    pub fn check_consistency(&self) -> Result<(), ConsistencyError> {
        self.check_with(&[], &self.by_type)
    }

    /// [`check_consistency`](Self::check_consistency) with hot caches held
    /// outside this allocator (the per-CPU caches of an
    /// [`SmpFrameAllocator`](super::SmpFrameAllocator)) and the per-type
    /// counts including their frames.
    pub(super) fn check_with(
        &self,
        extra: &[&HotCache],
        by_type: &[u64; FrameType::COUNT],
    ) -> Result<(), ConsistencyError> {
        let pa = self.pa;
        let err = |idx: usize, what| ConsistencyError {
            pfn: pa.pfn_of(idx).unwrap_or(Pfn(u64::MAX)),
            what,
        };
        // A free block (in a hot cache or a free list) starting at index
        // `i`: aligned to its order, inside one RAM range, every other frame
        // a free tail.
        let check_free_block = |i: usize, o: u8, cached: bool| -> Result<(), ConsistencyError> {
            let (misplaced, bad_tail) = if cached {
                (
                    Inconsistency::CachedBlockMisplaced,
                    Inconsistency::CachedBlockBadTail,
                )
            } else {
                (
                    Inconsistency::FreeBlockMisplaced,
                    Inconsistency::FreeBlockBadTail,
                )
            };
            let pfn = pa.pfn_of(i).ok_or(err(i, Inconsistency::BadIndex))?.0;
            let sec = pa.section_of(pfn).ok_or(err(i, Inconsistency::NoSection))?;
            if pfn & ((1u64 << o) - 1) != 0 || !sec.holds_block(pfn, o) {
                return Err(err(i, misplaced));
            }
            match (i + 1..i + (1usize << o)).find(|&t| !pa.load(t).is_free_tail()) {
                Some(t) => Err(err(t, bad_tail)),
                None => Ok(()),
            }
        };
        let mut counts = [0u64; FrameType::COUNT];
        let mut cached = [0usize; CACHE_MAX_ORDER as usize + 1];
        for i in 0..pa.len() {
            let w = pa.load(i);
            if w.is_free_cached() {
                let o = w.free_cached_order();
                if o > CACHE_MAX_ORDER {
                    return Err(err(i, Inconsistency::CachedOrderTooHigh));
                }
                cached[o as usize] += 1;
            }
            let t = w.frame_type().ok_or(err(i, Inconsistency::UnknownTag))?;
            counts[t.index()] += 1;
            if let Some(d) = desc_of::<A, FolioDesc<A>>(w) {
                let pfn = pa.pfn_of(i).ok_or(err(i, Inconsistency::BadIndex))?;
                if pfn.0 < d.head().0 || pfn.0 >= d.head().0 + (1u64 << d.order()) {
                    return Err(err(i, Inconsistency::FolioFrameOutsideDescriptor));
                }
            }
        }
        let caches = || core::iter::once(&self.hot).chain(extra.iter().copied());
        for o in 0..=CACHE_MAX_ORDER {
            if cached[o as usize] != caches().map(|c| c.len(o)).sum::<usize>() {
                return Err(err(0, Inconsistency::HotCacheMismatch));
            }
            for &i in caches().flat_map(|c| c.entries(o)) {
                let i = i as usize;
                let w = pa.load(i);
                if !w.is_free_cached() || w.free_cached_order() != o {
                    return Err(err(i, Inconsistency::HotCacheEntryNotCachedBlock));
                }
                check_free_block(i, o, true)?;
            }
        }
        if counts != *by_type {
            return Err(err(0, Inconsistency::TypeCountMismatch));
        }
        let mut free_frames = 0u64;
        for o in 0..=MAX_ORDER {
            let mut idx = self.lists.head(o);
            let mut prev = NO_LINK;
            let mut n = 0u64;
            while idx != NO_LINK {
                let i = idx as usize;
                if i >= pa.len() {
                    return Err(err(0, Inconsistency::FreeLinkOutOfRange));
                }
                let w = pa.load(i);
                if !w.is_free_head() || w.free_order() != o {
                    return Err(err(i, Inconsistency::FreeListEntryNotHead));
                }
                if w.free_prev() != prev {
                    return Err(err(i, Inconsistency::BadPrevLink));
                }
                check_free_block(i, o, false)?;
                // Fully merged: no listed block has a listed free buddy of
                // its own order (hot-cached blocks are left unmerged on
                // purpose and have no head bit).
                if o < MAX_ORDER {
                    let pfn = pa.pfn_of(i).ok_or(err(i, Inconsistency::BadIndex))?.0;
                    let buddy = pfn ^ (1u64 << o);
                    if let Some(sec) = pa.section_of(pfn) {
                        if sec.holds_block(buddy, o) {
                            let bw = pa.load(sec.index(buddy));
                            if bw.is_free_head() && bw.free_order() == o {
                                return Err(err(i, Inconsistency::NotMerged));
                            }
                        }
                    }
                }
                n += 1;
                if n > pa.len() as u64 {
                    return Err(err(i, Inconsistency::FreeListCycle));
                }
                prev = idx;
                idx = w.free_next();
            }
            if n != self.lists.blocks[o as usize] {
                return Err(err(0, Inconsistency::FreeBlockCountMismatch));
            }
            free_frames += n << o;
        }
        if free_frames + caches().map(HotCache::frames).sum::<u64>()
            != by_type[FrameType::Free.index()]
        {
            return Err(err(0, Inconsistency::FreeFrameCountMismatch));
        }
        Ok(())
    }
}
