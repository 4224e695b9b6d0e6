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
use super::hot_cache::{HotCache, CACHE_MAX_ORDER, HOT_MAX_ORDER};
use super::owner::Owner;
use super::page_array::{PageArray, Section};
use super::placement::ReservedRange;
use super::refcount::{FolioRef, FrozenFolio, LastRef};
use super::word::{FrameType, ReservedKind, Word, MISC_FLAG_TAIL};
use crate::addr::Pfn;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

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

/// The buddy frame allocator over one [`PageArray`].
pub struct FrameAllocator<'a, M: DescMemory, A: Atomics = CoreAtomics> {
    pub(crate) pa: &'a PageArray<'a, A>,
    pub(crate) mem: M,
    pub(crate) lists: FreeLists,
    pub(super) hot: HotCache,
    pub(crate) by_type: [u64; FrameType::COUNT],
    pub(crate) folios: DescCache<FolioDesc<A>, A>,
    pub(crate) tables: DescCache<PageTableDesc<A>, A>,
    pub(crate) slabs: DescCache<SlabDesc<A>, A>,
    pub(crate) poison: DescCache<HwPoisonDesc<A>, A>,
    pub(super) chunks: u64,
}

/// Writes `w` to every frame of `[idx, idx + 2^order)` of `pa`.
#[inline(always)]
pub(super) fn fill<A: Atomics>(pa: &PageArray<'_, A>, idx: usize, order: u8, w: Word) {
    // One release fence instead of a release store per frame: a reader
    // that acquires any of these words sees the descriptor's contents.
    // Pairs with the Acquire load of the word in `PageArray::load`
    // (`get_folio`'s first load).
    A::fence(Ordering::Release);
    for c in pa.cells(idx, 1usize << order) {
        c.store(w.raw(), Ordering::Relaxed);
    }
}

/// Makes the taken block `[idx, idx + 2^order)` a folio of `owner` with the
/// free descriptor `d` (count checked 0): descriptor first, then the words.
/// Counting is the caller's.
#[inline(always)]
pub(super) fn publish_folio_words<A: Atomics>(
    pa: &PageArray<'_, A>,
    d: &'static FolioDesc<A>,
    idx: usize,
    pfn: u64,
    order: u8,
    owner: Owner,
) -> FolioRef<A> {
    d.init(Pfn(pfn), order, owner);
    // Cannot fail: the descriptor's count was checked 0 when it left its
    // cache, and no `try_get` raises a zero count.
    let _ = d.unfreeze(1);
    fill(pa, idx, order, desc_word(d));
    FolioRef::counted(d)
}

#[inline(always)]
pub(super) fn check_order(order: u8) -> Result<(), FrameError> {
    if order > MAX_ORDER {
        Err(FrameError::InvalidOrder { order })
    } else {
        Ok(())
    }
}

impl<'a, M: DescMemory, A: Atomics> FrameAllocator<'a, M, A> {
    /// Takes over `pa`: every frame becomes free except those in `reserved`,
    /// which become `Reserved(kind)`. Descriptor memory comes from `mem`.
    ///
    /// # Errors
    ///
    /// [`FrameError::ArrayInUse`] if another allocator already drives `pa`;
    /// [`FrameError::NotFree`] if the page array's free lists are damaged
    /// (a reserved frame that is Free but in no block).
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
                        s.recount(FrameType::Free, FrameType::Reserved, 1);
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

    /// The descriptor memory this allocator was built with (it says how a
    /// frame is reached, e.g. [`LinearMap`](super::LinearMap)'s offset).
    #[inline]
    pub fn desc_memory(&self) -> &M {
        &self.mem
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
                self.folios.live(),
                self.slabs.live(),
                self.tables.live(),
                self.poison.live(),
            ],
            desc_bytes: self.chunks * super::desc_cache::CHUNK_SIZE as u64,
        }
    }

    /// Gives every block of the hot caches back to the buddy lists
    /// (merging them). Done automatically before an allocation would fail
    /// and before operations on specific free frames.
    pub fn drain_cache(&mut self) {
        for order in 0..=CACHE_MAX_ORDER {
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
    pub(super) fn take_block(&mut self, order: u8, align: u8) -> Result<(usize, u64), FrameError> {
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
    pub(super) fn take_free_frame(
        &mut self,
        sec: &Section,
        idx: usize,
        pfn: u64,
    ) -> Result<(), FrameError> {
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
                self.recount(FrameType::Free, FrameType::Reserved, 1);
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

    /// Gives a whole allocation back to the buddy. Frames that are HwPoison
    /// stay so when `poisoned` is set. Returns the frames freed.
    #[inline]
    pub(super) fn give_back(
        &mut self,
        sec: &Section,
        idx: usize,
        pfn: u64,
        order: u8,
        poisoned: bool,
    ) -> u64 {
        let n = 1usize << order;
        if !poisoned {
            for c in &self.pa.cells(idx, n)[1..] {
                c.store(Word::FREE_TAIL.raw(), Ordering::Relaxed);
            }
            if order <= HOT_MAX_ORDER && self.hot.push(order, idx) {
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
    /// The section of `pfn` when `order` is valid and `pfn` is aligned to
    /// it; whether the whole block fits the section is the caller's check.
    #[inline]
    pub(crate) fn aligned_section(&self, pfn: Pfn, order: u8) -> Result<Section, FrameError> {
        check_order(order)?;
        if pfn.0 & ((1u64 << order) - 1) != 0 {
            return Err(FrameError::Misaligned { pfn, order });
        }
        self.pa
            .section_of(pfn.0)
            .copied()
            .ok_or(FrameError::NotManaged { pfn })
    }

    #[inline]
    pub(crate) fn check_allocation(
        &self,
        pfn: Pfn,
        order: u8,
    ) -> Result<(Section, usize, Word, bool), FrameError> {
        let sec = self.aligned_section(pfn, order)?;
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

    // ---- folios -------------------------------------------------------------

    /// A folio of `2^order` frames, refcount 1, owned by `owner`.
    ///
    /// # Errors
    ///
    /// [`FrameError::InvalidOrder`] above [`MAX_ORDER`]; [`FrameError::OutOfMemory`]
    /// when no free block of the order exists (after draining the hot caches);
    /// [`FrameError::OutOfDescriptors`] / [`FrameError::Corrupt`] from the
    /// descriptor cache.
    #[inline]
    pub fn alloc_folio(&mut self, order: u8, owner: Owner) -> Result<FolioRef<A>, FrameError> {
        self.alloc_folio_aligned(order, order, owner)
    }

    /// A folio of `2^order` frames whose first PFN is aligned to `2^align`.
    ///
    /// # Errors
    ///
    /// As [`FrameAllocator::alloc_folio`], and [`FrameError::InvalidOrder`] for
    /// an `align` above [`MAX_ORDER`].
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

    /// Moves `n` frames from the count of `from` to that of `to`.
    #[inline(always)]
    pub(super) fn recount(&mut self, from: FrameType, to: FrameType, n: u64) {
        // Wrapping, as in `free_folio_desc`: a partial sum under the SMP
        // allocator's per-CPU deltas.
        self.by_type[from.index()] = self.by_type[from.index()].wrapping_sub(n);
        self.by_type[to.index()] = self.by_type[to.index()].wrapping_add(n);
    }

    #[inline(always)]
    pub(super) fn publish_folio(
        &mut self,
        d: &'static FolioDesc<A>,
        idx: usize,
        pfn: u64,
        order: u8,
        owner: Owner,
    ) -> FolioRef<A> {
        let r = publish_folio_words(self.pa, d, idx, pfn, order, owner);
        let n = 1u64 << order;
        self.recount(FrameType::Free, FrameType::Folio, n);
        r
    }

    /// Drops a reference; on the last one, releases the folio (see
    /// [`FrameAllocator::release`]). A count found at zero is
    /// [`FrameError::RefcountUnderflow`] (and stays zero).
    ///
    /// # Errors
    ///
    /// [`FrameError::RefcountUnderflow`] for a count found at zero; the errors
    /// of [`FrameAllocator::release`] on the last reference.
    // Forced: see `FrameAllocator::alloc_frozen_aligned` (the folio pair
    // was ~10 % slower without).
    #[inline(always)]
    pub fn put(&mut self, r: FolioRef<A>) -> Result<Option<Released<A>>, FrameError> {
        match r.put()? {
            None => Ok(None),
            Some(last) => self.release(last).map(Some),
        }
    }

    /// The owner hook: a closed `match` on the folio's [`Owner`].
    ///
    /// # Errors
    ///
    /// [`FrameError::Corrupt`] or [`FrameError::NotAllocation`] when the
    /// folio's frames no longer point at its descriptor (a corrupt page array);
    /// nothing is freed then.
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
    ///
    /// # Errors
    ///
    /// As [`FrameAllocator::release`].
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
        // Wrapping: under `SmpFrameAllocator` the buddy's Folio count is a
        // partial sum (the CPU caches hold signed deltas, folded in with
        // wrapping adds), so it may sit below a folio counted on another
        // CPU's cache; the exact total is buddy + deltas, which the
        // consistency check compares.
        self.by_type[FrameType::Folio.index()] =
            self.by_type[FrameType::Folio.index()].wrapping_sub(freed);
        self.folios.free(d);
        Ok(())
    }
}
