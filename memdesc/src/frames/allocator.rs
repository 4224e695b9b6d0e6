//! The frame allocator: buddy free lists in the page array, descriptor
//! caches, per-type counts, folio and frozen allocations.
//!
//! All state changes take `&mut self` (the firmware wraps the allocator in
//! its lock); lock-free readers use the shared [`PageArray`] directly. Every
//! page-array word is owned by exactly one of: the buddy (Free), an
//! allocation (Folio/Slab/PageTable/Offline/Guard/Reserved), or the poison
//! list (HwPoison), and `by_type` counts words by tag.

use super::atomics::{AtomicCell, Atomics, CoreAtomics};
use super::buddy::{FreeLists, MAX_ORDER, ORDERS};
use super::desc::{Desc, FolioDesc, HwPoisonDesc, PageTableDesc, SlabDesc, FOLIO_HWPOISON};
use super::desc_cache::{desc_of, desc_word, DescCache, DescMemory};
use super::error::FrameError;
use super::hot_cache::{HotCache, HOT_MAX_ORDER};
use super::owner::Owner;
use super::page_array::{PageArray, PfnRange, Section};
use super::refcount::{FolioRef, FrozenFolio, LastRef, PageTableFrame};
use super::word::{FrameType, ReservedKind, Word, MISC_FLAG_TAIL, NO_LINK};
use crate::addr::Pfn;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

/// A range the allocator must never hand out, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedRange {
    /// The frames (clipped to the page array; parts outside are ignored).
    pub range: PfnRange,
    /// Why.
    pub kind: ReservedKind,
}

/// What a frozen (refcount 0) allocation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrozenKind {
    /// A translation table: gets a [`PageTableDesc`] with a valid-entry count.
    PageTable,
    /// Slab backing: gets a [`SlabDesc`].
    Slab,
    /// Offline (ballooned): no descriptor.
    Offline,
    /// A guard frame: no descriptor.
    Guard,
}

/// What [`FrameAllocator::release`] did with a folio whose last reference went.
#[must_use]
pub enum Released<A: Atomics = CoreAtomics> {
    /// Owner [`Owner::Buddy`]: the frames went back to the free lists
    /// (except poisoned ones, which stay HwPoison).
    Freed {
        /// First frame.
        pfn: Pfn,
        /// Order.
        order: u8,
    },
    /// Another owner: the folio stays allocated, frozen at 0, for the owner.
    ToOwner {
        /// Who it goes to.
        owner: Owner,
        /// The frozen folio.
        folio: FrozenFolio<A>,
    },
}

/// Counters, all consistent with each other between `&mut` operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames described by the page array.
    pub frames: u64,
    /// Frames per type, indexed by [`FrameType::index`].
    pub by_type: [u64; FrameType::COUNT],
    /// Free buddy blocks per order.
    pub free_blocks: [u64; ORDERS],
    /// Free frames parked in the hot caches (also counted as Free).
    pub cached_frames: u64,
    /// Live descriptors per descriptor type: folio, slab, page table, hwpoison.
    pub live_descs: [u64; 4],
    /// Bytes of descriptor memory taken (whole chunks).
    pub desc_bytes: u64,
}

impl FrameStats {
    /// Frames of type `ty`.
    pub fn count(&self, ty: FrameType) -> u64 {
        self.by_type[ty.index()]
    }
}

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

/// The buddy frame allocator over one [`PageArray`].
pub struct FrameAllocator<'a, M: DescMemory, A: Atomics = CoreAtomics> {
    pub(crate) pa: &'a PageArray<'a, A>,
    pub(crate) mem: M,
    pub(crate) lists: FreeLists,
    hot: HotCache,
    pub(crate) by_type: [u64; FrameType::COUNT],
    pub(crate) folios: DescCache<FolioDesc<A>, A>,
    pub(crate) tables: DescCache<PageTableDesc<A>, A>,
    pub(crate) slabs: DescCache<SlabDesc<A>, A>,
    pub(crate) poison: DescCache<HwPoisonDesc<A>, A>,
    chunks: u64,
}

#[inline(always)]
fn check_order(order: u8) -> Result<(), FrameError> {
    if order > MAX_ORDER {
        Err(FrameError::InvalidOrder { order })
    } else {
        Ok(())
    }
}

impl<'a, M: DescMemory, A: Atomics> FrameAllocator<'a, M, A> {
    /// Takes over `pa`: every frame becomes free except those in `reserved`,
    /// which become `Reserved(kind)`. Descriptor memory comes from `mem`.
    pub fn new(
        pa: &'a PageArray<'a, A>,
        mem: M,
        reserved: &[ReservedRange],
    ) -> Result<Self, FrameError> {
        if !pa.claim() {
            return Err(FrameError::ArrayInUse);
        }
        let mut s = Self {
            pa,
            mem,
            lists: FreeLists::new(),
            hot: HotCache::new(),
            by_type: [0; FrameType::COUNT],
            folios: DescCache::new(),
            tables: DescCache::new(),
            slabs: DescCache::new(),
            poison: DescCache::new(),
            chunks: 0,
        };
        for sec in pa.sections() {
            for pfn in sec.start..sec.end {
                pa.store_relaxed(sec.index(pfn), Word::FREE_TAIL);
            }
            s.lists.free_range(pa, sec, sec.start, sec.end);
        }
        s.by_type[FrameType::Free.index()] = pa.len() as u64;
        for r in reserved {
            for sec in pa.sections() {
                let start = r.range.start.0.max(sec.start);
                let end = r.range.end.0.min(sec.end);
                for pfn in start..end {
                    let idx = sec.index(pfn);
                    if pa.load_relaxed(idx).frame_type() == Some(FrameType::Free) {
                        s.take_free_frame(sec, idx, pfn)?;
                        s.by_type[FrameType::Free.index()] -= 1;
                        s.by_type[FrameType::Reserved.index()] += 1;
                    }
                    pa.store_release(idx, Word::misc(FrameType::Reserved, r.kind as u8, 0, 0));
                }
            }
        }
        Ok(s)
    }

    /// The page array this allocator drives.
    #[inline]
    pub fn page_array(&self) -> &'a PageArray<'a, A> {
        self.pa
    }

    /// Frames of type `ty`.
    #[inline]
    pub fn count(&self, ty: FrameType) -> u64 {
        self.by_type[ty.index()]
    }

    /// Free buddy blocks of `order` (0 for orders above [`MAX_ORDER`]);
    /// blocks in the hot caches are not included.
    #[inline]
    pub fn free_blocks(&self, order: u8) -> u64 {
        self.lists.blocks.get(order as usize).copied().unwrap_or(0)
    }

    /// All counters.
    pub fn stats(&self) -> FrameStats {
        FrameStats {
            frames: self.pa.len() as u64,
            by_type: self.by_type,
            free_blocks: self.lists.blocks,
            cached_frames: self.hot.frames(),
            live_descs: [
                self.folios.live,
                self.slabs.live,
                self.tables.live,
                self.poison.live,
            ],
            desc_bytes: self.chunks * super::desc_cache::CHUNK_SIZE as u64,
        }
    }

    /// Gives every block of the hot caches back to the buddy lists
    /// (merging them). Done automatically before an allocation would fail
    /// and before operations on specific free frames.
    pub fn drain_cache(&mut self) {
        for order in 0..=HOT_MAX_ORDER {
            while let Some(idx) = self.hot.pop(order) {
                let Some(pfn) = self.pa.pfn_of(idx) else {
                    continue;
                };
                if let Some(sec) = self.pa.section_of(pfn.0) {
                    let sec = *sec;
                    self.lists.free(self.pa, &sec, idx, pfn.0, order);
                }
            }
        }
    }

    // ---- internals ------------------------------------------------------------

    /// A free block of `order` aligned to `2^align`: from the hot cache of
    /// its order, else from the buddy (draining the caches and retrying
    /// before giving up). Its words are left for the caller to write.
    #[inline(always)]
    fn take_block(&mut self, order: u8, align: u8) -> Result<(usize, u64), FrameError> {
        if align <= order {
            if let Some(idx) = self.hot.pop(order) {
                if let Some(pfn) = self.pa.pfn_of(idx) {
                    return Ok((idx, pfn.0));
                }
            }
        }
        match self.lists.alloc(self.pa, order, align) {
            Err(_) if !self.hot.is_empty() => {
                self.drain_cache();
                self.lists.alloc(self.pa, order, align)
            }
            r => r,
        }
    }

    /// Removes frame `pfn` (free) from its free block. Word left to the caller.
    fn take_free_frame(&mut self, sec: &Section, idx: usize, pfn: u64) -> Result<(), FrameError> {
        let block = self
            .lists
            .find_block(self.pa, sec, idx, pfn)
            .ok_or(FrameError::NotFree { pfn: Pfn(pfn) })?;
        self.lists.take_frame(self.pa, block, pfn);
        Ok(())
    }

    /// A chunk of descriptor memory: from `mem`, or a frame of our own.
    fn chunk(&mut self) -> Option<NonNull<u8>> {
        if let Some(c) = self.mem.chunk() {
            self.chunks += 1;
            return Some(c);
        }
        let (idx, pfn) = self.take_block(0, 0).ok()?;
        match self.mem.map_frame(Pfn(pfn)) {
            Some(c) => {
                self.pa.store_release(
                    idx,
                    Word::misc(
                        FrameType::Reserved,
                        ReservedKind::DescriptorCache as u8,
                        0,
                        0,
                    ),
                );
                self.by_type[FrameType::Free.index()] -= 1;
                self.by_type[FrameType::Reserved.index()] += 1;
                self.chunks += 1;
                Some(c)
            }
            None => {
                let sec = *self.pa.section_of(pfn)?;
                self.lists.free(self.pa, &sec, idx, pfn, 0);
                None
            }
        }
    }

    /// A free descriptor from the cache `sel` picks, growing it if needed.
    #[inline]
    fn get_desc<D: Desc<A>>(
        &mut self,
        sel: impl Fn(&mut Self) -> &mut DescCache<D, A>,
    ) -> Result<&'static D, FrameError> {
        if sel(self).is_empty() {
            let c = self
                .chunk()
                .ok_or(FrameError::OutOfDescriptors { ty: D::TYPE })?;
            // SAFETY: `chunk` returns memory satisfying the DescMemory
            // contract (from `mem`, or a frame we typed Reserved for good).
            unsafe { sel(self).add_chunk(c) };
        }
        sel(self)
            .alloc()
            .ok_or(FrameError::OutOfDescriptors { ty: D::TYPE })
    }

    /// A free folio descriptor, its count checked to be 0 (frozen): no
    /// `try_get` raises a zero count, so the `unfreeze` that publishes it
    /// cannot fail. A descriptor found otherwise is corrupt and never reused.
    pub(crate) fn get_folio_desc(&mut self) -> Result<&'static FolioDesc<A>, FrameError> {
        let d = self.get_desc(|s| &mut s.folios)?;
        if d.refcount() != 0 {
            return Err(FrameError::Corrupt { pfn: d.head() });
        }
        Ok(d)
    }
    pub(crate) fn get_table_desc(&mut self) -> Result<&'static PageTableDesc<A>, FrameError> {
        self.get_desc(|s| &mut s.tables)
    }
    pub(crate) fn get_slab_desc(&mut self) -> Result<&'static SlabDesc<A>, FrameError> {
        self.get_desc(|s| &mut s.slabs)
    }
    pub(crate) fn get_poison_desc(&mut self) -> Result<&'static HwPoisonDesc<A>, FrameError> {
        self.get_desc(|s| &mut s.poison)
    }

    /// Writes `w` to every frame of `[idx, idx + 2^order)`.
    #[inline(always)]
    fn fill(&self, idx: usize, order: u8, w: Word) {
        // One release fence instead of a release store per frame: a reader
        // that acquires any of these words sees the descriptor's contents.
        A::fence(Ordering::Release);
        for c in self.pa.cells(idx, 1usize << order) {
            c.store(w.raw(), Ordering::Relaxed);
        }
    }

    /// Gives a whole allocation back to the buddy. Frames that are HwPoison
    /// stay so when `poisoned` is set. Returns the frames freed.
    #[inline]
    fn give_back(&mut self, sec: &Section, idx: usize, pfn: u64, order: u8, poisoned: bool) -> u64 {
        let n = 1usize << order;
        if !poisoned {
            for c in &self.pa.cells(idx, n)[1..] {
                c.store(Word::FREE_TAIL.raw(), Ordering::Relaxed);
            }
            if self.hot.push(order, idx) {
                self.pa.store_relaxed(idx, Word::free_cached(order));
                self.by_type[FrameType::Free.index()] += n as u64;
                return n as u64;
            }
            self.lists.free(self.pa, sec, idx, pfn, order);
            self.by_type[FrameType::Free.index()] += n as u64;
            return n as u64;
        }
        let mut freed = 0;
        for i in 0..n {
            if self.pa.load_relaxed(idx + i).frame_type() == Some(FrameType::HwPoison) {
                continue;
            }
            self.pa.store_relaxed(idx + i, Word::FREE_TAIL);
            self.lists.free(self.pa, sec, idx + i, pfn + i as u64, 0);
            freed += 1;
        }
        self.by_type[FrameType::Free.index()] += freed;
        freed
    }

    /// Rewrites every frame of an allocation: `head`/`tail` words for healthy
    /// frames, the kept original for poisoned ones. Returns the healthy count.
    pub(crate) fn rewrite(&mut self, idx: usize, order: u8, head: Word, tail: Word) -> u64 {
        let mut healthy = 0;
        for i in 0..1usize << order {
            let w = if i == 0 { head } else { tail };
            let cur = self.pa.load_relaxed(idx + i);
            if let Some(d) = desc_of::<A, HwPoisonDesc<A>>(cur) {
                d.init(w);
            } else {
                self.pa.store_release(idx + i, w);
                healthy += 1;
            }
        }
        healthy
    }

    /// Checks that `[pfn, pfn + 2^order)` is exactly one allocation (not a
    /// folio, not free); returns its section, index, head word (the
    /// original one if the head frame is poisoned) and whether any frame of
    /// it is poisoned.
    #[inline]
    pub(crate) fn check_allocation(
        &self,
        pfn: Pfn,
        order: u8,
    ) -> Result<(Section, usize, Word, bool), FrameError> {
        check_order(order)?;
        if pfn.0 & ((1u64 << order) - 1) != 0 {
            return Err(FrameError::Misaligned { pfn, order });
        }
        let sec = *self
            .pa
            .section_of(pfn.0)
            .ok_or(FrameError::NotManaged { pfn })?;
        if !sec.holds_block(pfn.0, order) {
            return Err(FrameError::NotAllocation { pfn });
        }
        let idx = sec.index(pfn.0);
        let raw = self.pa.load_relaxed(idx);
        let head = self.pa.effective(raw);
        let ty = head.frame_type().ok_or(FrameError::Corrupt { pfn })?;
        let tail = match ty {
            // Poisoned while free: it left the allocator poisoned, not free.
            FrameType::Free if raw.frame_type() == Some(FrameType::HwPoison) => {
                return Err(FrameError::HwPoisoned { pfn })
            }
            FrameType::Free => return Err(FrameError::Free { pfn }),
            FrameType::HwPoison => return Err(FrameError::HwPoisoned { pfn }),
            FrameType::Folio => return Err(FrameError::WrongType { pfn, found: ty }),
            FrameType::Slab | FrameType::PageTable => {
                let desc_order = if ty == FrameType::Slab {
                    desc_of::<A, SlabDesc<A>>(head).map(|d| d.order())
                } else {
                    desc_of::<A, PageTableDesc<A>>(head).map(|d| d.order())
                }
                .ok_or(FrameError::Corrupt { pfn })?;
                if desc_order != order {
                    return Err(FrameError::NotAllocation { pfn });
                }
                head
            }
            FrameType::Reserved | FrameType::Guard | FrameType::Offline => {
                if head.misc_order() != order || head.misc_flags() & MISC_FLAG_TAIL != 0 {
                    return Err(FrameError::NotAllocation { pfn });
                }
                Word::misc(ty, head.subtype(), order, MISC_FLAG_TAIL)
            }
        };
        let mut poisoned = raw.frame_type() == Some(FrameType::HwPoison);
        let rest = &self.pa.cells(idx, 1usize << order)[1..];
        // Fast path: every other frame holds exactly the tail word.
        if !rest.iter().all(|c| c.load(Ordering::Relaxed) == tail.raw()) {
            for (i, c) in rest.iter().enumerate() {
                let mut w = Word::from_raw(c.load(Ordering::Relaxed));
                if w != tail && w.frame_type() == Some(FrameType::HwPoison) {
                    poisoned = true;
                    w = self.pa.effective(w);
                }
                if w != tail {
                    return Err(FrameError::NotAllocation {
                        pfn: Pfn(pfn.0 + 1 + i as u64),
                    });
                }
            }
        }
        Ok((sec, idx, head, poisoned))
    }

    /// Frees the descriptor a (non-folio) head word points to, if any.
    pub(crate) fn drop_desc(&mut self, head: Word) {
        if let Some(d) = desc_of::<A, PageTableDesc<A>>(head) {
            d.retire();
            self.tables.free(d);
        } else if let Some(d) = desc_of::<A, SlabDesc<A>>(head) {
            self.slabs.free(d);
        }
    }

    /// Words and (maybe) descriptor for a frozen allocation of `kind`.
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
                let ty = if kind == FrozenKind::Offline {
                    FrameType::Offline
                } else {
                    FrameType::Guard
                };
                (
                    Word::misc(ty, 0, order, 0),
                    Word::misc(ty, 0, order, MISC_FLAG_TAIL),
                )
            }
        })
    }

    // ---- folios -------------------------------------------------------------

    /// A folio of `2^order` frames, refcount 1, owned by `owner`.
    #[inline]
    pub fn alloc_folio(&mut self, order: u8, owner: Owner) -> Result<FolioRef<A>, FrameError> {
        self.alloc_folio_aligned(order, order, owner)
    }

    /// A folio of `2^order` frames whose first PFN is aligned to `2^align`.
    pub fn alloc_folio_aligned(
        &mut self,
        order: u8,
        align: u8,
        owner: Owner,
    ) -> Result<FolioRef<A>, FrameError> {
        check_order(order)?;
        check_order(align)?;
        let d = self.get_folio_desc()?;
        let (idx, pfn) = match self.take_block(order, align) {
            Ok(b) => b,
            Err(e) => {
                self.folios.free(d);
                return Err(e);
            }
        };
        Ok(self.publish_folio(d, idx, pfn, order, owner))
    }

    #[inline(always)]
    fn publish_folio(
        &mut self,
        d: &'static FolioDesc<A>,
        idx: usize,
        pfn: u64,
        order: u8,
        owner: Owner,
    ) -> FolioRef<A> {
        d.init(Pfn(pfn), order, owner);
        // Cannot fail: `get_folio_desc` checked the count is 0, and no
        // `try_get` raises a zero count.
        let _ = d.unfreeze(1);
        self.fill(idx, order, desc_word(d));
        let n = 1u64 << order;
        self.by_type[FrameType::Free.index()] -= n;
        self.by_type[FrameType::Folio.index()] += n;
        FolioRef::counted(d)
    }

    /// A folio at exactly `[pfn, pfn + 2^order)`, which must be free.
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

    /// Drops a reference; on the last one, releases the folio (see
    /// [`FrameAllocator::release`]). A count found at zero is
    /// [`FrameError::RefcountUnderflow`] (and stays zero).
    #[inline]
    pub fn put(&mut self, r: FolioRef<A>) -> Result<Option<Released<A>>, FrameError> {
        match r.put()? {
            None => Ok(None),
            Some(last) => self.release(last).map(Some),
        }
    }

    /// The owner hook: a closed `match` on the folio's [`Owner`].
    #[inline]
    pub fn release(&mut self, last: LastRef<A>) -> Result<Released<A>, FrameError> {
        let d = last.desc;
        match d.owner() {
            Owner::Buddy => {
                let (pfn, order) = (d.head(), d.order());
                self.free_folio_desc(d)?;
                Ok(Released::Freed { pfn, order })
            }
            owner @ (Owner::Balloon | Owner::Pool(_) | Owner::SharedMemory(_)) => {
                Ok(Released::ToOwner {
                    owner,
                    folio: FrozenFolio { desc: d, refs: 0 },
                })
            }
        }
    }

    /// Frees a frozen folio's frames to the buddy (an owner done with it).
    pub fn free_frozen_folio(&mut self, f: FrozenFolio<A>) -> Result<(), FrameError> {
        self.free_folio_desc(f.desc)
    }

    /// Frees the frames of the folio `d` (refcount 0) and its descriptor.
    #[inline]
    fn free_folio_desc(&mut self, d: &'static FolioDesc<A>) -> Result<(), FrameError> {
        let (pfn, order) = (d.head().0, d.order());
        let sec = *self
            .pa
            .section_of(pfn)
            .ok_or(FrameError::Corrupt { pfn: Pfn(pfn) })?;
        let idx = sec.index(pfn);
        let expect = desc_word(d);
        let head = self.pa.effective(self.pa.load_relaxed(idx));
        if head != expect {
            return Err(FrameError::NotAllocation { pfn: Pfn(pfn) });
        }
        let poisoned = d.flags() & FOLIO_HWPOISON != 0;
        let freed = self.give_back(&sec, idx, pfn, order, poisoned);
        self.by_type[FrameType::Folio.index()] -= freed;
        self.folios.free(d);
        Ok(())
    }

    // ---- frozen frames ------------------------------------------------------

    /// `2^order` frames with refcount frozen at 0, typed by `kind`.
    pub fn alloc_frozen(&mut self, order: u8, kind: FrozenKind) -> Result<Pfn, FrameError> {
        self.alloc_frozen_aligned(order, order, kind)
    }

    /// As [`FrameAllocator::alloc_frozen`], first PFN aligned to `2^align`.
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

    /// Frozen frames at exactly `[pfn, pfn + 2^order)`, which must be free.
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

    fn publish_frozen(&mut self, idx: usize, order: u8, head: Word, tail: Word) {
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
    pub fn alloc_page_table(&mut self) -> Result<PageTableFrame<A>, FrameError> {
        let pfn = self.alloc_frozen(0, FrozenKind::PageTable)?;
        self.pa.page_table(pfn)
    }

    /// Frees a translation table; fails while it has valid entries, and for
    /// a stale handle (the frame holds another table, or none, since).
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

    // ---- reserved ranges ----------------------------------------------------

    /// Takes `range` (all frames must be free) as `Reserved(kind)`.
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
            let sec = *self
                .pa
                .section_of(p)
                .ok_or(FrameError::NotManaged { pfn: Pfn(p) })?;
            let idx = sec.index(p);
            self.take_free_frame(&sec, idx, p)?;
            self.pa
                .store_release(idx, Word::misc(FrameType::Reserved, kind as u8, 0, 0));
            self.by_type[FrameType::Free.index()] -= 1;
            self.by_type[FrameType::Reserved.index()] += 1;
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
            let sec = *self
                .pa
                .section_of(p)
                .ok_or(FrameError::NotManaged { pfn: Pfn(p) })?;
            let idx = sec.index(p);
            self.pa.store_relaxed(idx, Word::FREE_TAIL);
            self.lists.free(self.pa, &sec, idx, p, 0);
            self.by_type[FrameType::Reserved.index()] -= 1;
            self.by_type[FrameType::Free.index()] += 1;
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
        check_order(order)?;
        if pfn.0 & ((1u64 << order) - 1) != 0 {
            return Err(FrameError::Misaligned { pfn, order });
        }
        let sec = *self
            .pa
            .section_of(pfn.0)
            .ok_or(FrameError::NotManaged { pfn })?;
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

    // ---- checking -------------------------------------------------------------

    /// Walks the whole page array and the free lists and checks every
    /// invariant: counts per type and order, list links, tails, folio
    /// coverage. O(frames); for tests and debug builds.
    pub fn check_consistency(&self) -> Result<(), ConsistencyError> {
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
        let mut cached = [0usize; HOT_MAX_ORDER as usize + 1];
        for i in 0..pa.len() {
            let w = pa.load(i);
            if w.is_free_cached() {
                let o = w.free_cached_order();
                if o > HOT_MAX_ORDER {
                    return Err(err(i, Inconsistency::CachedOrderTooHigh));
                }
                cached[o as usize] += 1;
            }
            let t = w.frame_type().ok_or(err(i, Inconsistency::UnknownTag))?;
            counts[t.index()] += 1;
            if t == FrameType::Folio {
                let d = desc_of::<A, FolioDesc<A>>(w).ok_or(err(i, Inconsistency::UnknownTag))?;
                let pfn = pa.pfn_of(i).ok_or(err(i, Inconsistency::BadIndex))?;
                if pfn.0 < d.head().0 || pfn.0 >= d.head().0 + (1u64 << d.order()) {
                    return Err(err(i, Inconsistency::FolioFrameOutsideDescriptor));
                }
            }
        }
        for o in 0..=HOT_MAX_ORDER {
            if cached[o as usize] != self.hot.len(o) {
                return Err(err(0, Inconsistency::HotCacheMismatch));
            }
            for &i in self.hot.entries(o) {
                let i = i as usize;
                let w = pa.load(i);
                if !w.is_free_cached() || w.free_cached_order() != o {
                    return Err(err(i, Inconsistency::HotCacheEntryNotCachedBlock));
                }
                check_free_block(i, o, true)?;
            }
        }
        if counts != self.by_type {
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
        if free_frames + self.hot.frames() != self.by_type[FrameType::Free.index()] {
            return Err(err(0, Inconsistency::FreeFrameCountMismatch));
        }
        Ok(())
    }
}
