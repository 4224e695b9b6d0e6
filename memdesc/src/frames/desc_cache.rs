//! Type-stable descriptor caches and where their memory comes from.
//!
//! Each descriptor type has its own cache: a LIFO free list threaded through
//! free descriptors. Memory enters a cache in page-sized chunks and never
//! leaves it, and a chunk only ever holds descriptors of one type. So a
//! pointer to a descriptor stays a pointer to a descriptor *of that type*
//! forever: a speculative reader that raced with a free dereferences valid
//! memory, sees a refcount of 0 (or a reused descriptor), and the word
//! re-check rejects it. That is what makes
//! [`PageArray::get_folio`](super::PageArray::get_folio) sound without locks.
//!
//! Chunks come from a [`DescMemory`]. It is a trait rather than a
//! `buddy_system_allocator` heap because the allocator can feed its own caches:
//! on target [`LinearMap`] turns a frame the allocator takes from itself
//! (typed `Reserved(DescriptorCache)`) into its linear-map address, so
//! descriptors cost nothing until used and no second heap has to be sized at
//! boot. [`ChunkPool`] serves a fixed static pool instead; host tests leak boxes.

use super::atomics::{AtomicCell, Atomics};
use super::desc::Desc;
use super::word::Word;
use crate::addr::{Pfn, PAGE_SIZE};
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

/// Size of one chunk of descriptor memory.
pub const CHUNK_SIZE: usize = PAGE_SIZE as usize;

/// A source of page-sized chunks for the descriptor caches.
///
/// # Safety
///
/// Every chunk an implementation returns (from either method) must be
/// [`CHUNK_SIZE`] bytes, aligned to [`CHUNK_SIZE`], writable, and used by
/// nothing else for the rest of the program (`'static`): the caches hand out
/// `&'static` references into it and never give it back.
pub unsafe trait DescMemory {
    /// A chunk from the implementation's own memory, or `None` to let the
    /// allocator take a frame from itself and call
    /// [`DescMemory::map_frame`].
    fn chunk(&mut self) -> Option<NonNull<u8>>;

    /// The writable address of frame `pfn`, which the allocator has just
    /// taken for descriptor memory, or `None` if frames cannot be mapped
    /// (the frame then goes back to the allocator).
    fn map_frame(&mut self, pfn: Pfn) -> Option<NonNull<u8>> {
        let _ = pfn;
        None
    }
}

/// Descriptor memory from the allocator's own frames through a linear map
/// (virtual = physical + offset): the on-target choice.
#[derive(Debug, Clone, Copy)]
pub struct LinearMap {
    offset: usize,
}

impl LinearMap {
    /// A linear map at `offset` (0 for an identity map).
    ///
    /// # Safety
    ///
    /// For every frame of the page array this allocator manages,
    /// `pfn.addr() + offset` must be mapped writable, normal cacheable memory
    /// for the rest of the program, and nothing but the allocator's current
    /// owner of that frame may use it.
    pub const unsafe fn new(offset: usize) -> Self {
        Self { offset }
    }
}

// SAFETY: the frames come from the allocator, which hands each frame to the
// caches once and types it Reserved(DescriptorCache) for good, so nobody else
// uses them; `new`'s contract makes their linear-map addresses valid, writable
// and 'static. Frames are page (= CHUNK_SIZE) aligned.
unsafe impl DescMemory for LinearMap {
    fn chunk(&mut self) -> Option<NonNull<u8>> {
        None
    }
    fn map_frame(&mut self, pfn: Pfn) -> Option<NonNull<u8>> {
        let addr = (pfn.addr().as_u64() as usize).checked_add(self.offset)?;
        NonNull::new(core::ptr::with_exposed_provenance_mut(addr))
    }
}

/// One page-aligned chunk of descriptor memory, for static pools.
#[repr(C, align(4096))]
pub struct DescChunk(pub [u8; CHUNK_SIZE]);

impl DescChunk {
    /// A zeroed chunk.
    pub const ZERO: DescChunk = DescChunk([0; CHUNK_SIZE]);
}

/// Descriptor memory from a fixed pool of chunks.
pub struct ChunkPool {
    next: *mut DescChunk,
    left: usize,
}

impl ChunkPool {
    /// A pool handing out the chunks of `chunks`, which it keeps forever.
    pub fn new(chunks: &'static mut [DescChunk]) -> Self {
        Self {
            next: chunks.as_mut_ptr(),
            left: chunks.len(),
        }
    }

    /// Chunks not handed out yet.
    pub fn remaining(&self) -> usize {
        self.left
    }
}

// SAFETY: the pool owns a `&'static mut` slice of page-aligned, CHUNK_SIZE
// chunks and hands each one out once.
unsafe impl DescMemory for ChunkPool {
    fn chunk(&mut self) -> Option<NonNull<u8>> {
        if self.left == 0 {
            return None;
        }
        let c = self.next;
        // SAFETY: `left > 0`, so `next` is inside (or, after the add, one past
        // the end of) the slice the pool was built from.
        self.next = unsafe { self.next.add(1) };
        self.left -= 1;
        NonNull::new(c.cast())
    }
}

// SAFETY: the pool only holds a pointer into a 'static slice it exclusively owns.
unsafe impl Send for ChunkPool {}

/// A LIFO list of free descriptors of type `D`, threaded through their
/// [`Desc::link`] words: the global caches' free lists and the per-CPU
/// descriptor stashes of [`SmpFrameAllocator`](super::SmpFrameAllocator).
/// Costs two words however long it is.
pub(crate) struct DescList<D, A> {
    head: Option<NonNull<D>>,
    len: usize,
    _a: PhantomData<A>,
}

// SAFETY: the list only holds pointers to free descriptors in 'static,
// type-stable memory whose fields are all atomics (`Sync`); moving the list
// between threads moves the right to hand them out, nothing else.
unsafe impl<D, A> Send for DescList<D, A> {}

impl<A: Atomics, D: Desc<A>> DescList<D, A> {
    pub const fn new() -> Self {
        Self {
            head: None,
            len: 0,
            _a: PhantomData,
        }
    }

    /// Descriptors on the list.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// Puts `d`, a free descriptor nobody else holds a list entry for, on
    /// top.
    #[inline(always)]
    pub fn push(&mut self, d: &'static D) {
        let next = self.head.map_or(0, |p| p.as_ptr().expose_provenance());
        // Relaxed: the link is only read by whoever owns this list next,
        // which takes it over under a lock (or `&mut`), and that orders it.
        d.link().store(next as u64, Ordering::Relaxed);
        self.head = Some(NonNull::from(d));
        self.len += 1;
    }

    /// The descriptor on top, off the list.
    #[inline(always)]
    pub fn pop(&mut self) -> Option<&'static D> {
        let d = self.head?;
        // SAFETY: list entries are initialised descriptors in 'static,
        // type-stable cache memory (pushed as `&'static D`), only read
        // through shared references and atomics.
        let r: &'static D = unsafe { d.as_ref() };
        // Relaxed: as in `push`.
        let next = r.link().load(Ordering::Relaxed) as usize;
        self.head = NonNull::new(core::ptr::with_exposed_provenance_mut(next));
        self.len -= 1;
        Some(r)
    }
}

/// A type-stable cache of descriptors of type `D`.
pub(crate) struct DescCache<D, A> {
    free: DescList<D, A>,
    /// Descriptors ever created (live + free).
    pub total: u64,
}

impl<A: Atomics, D: Desc<A>> DescCache<D, A> {
    pub const fn new() -> Self {
        Self {
            free: DescList::new(),
            total: 0,
        }
    }

    /// Descriptors handed out and not yet returned.
    #[inline]
    pub fn live(&self) -> u64 {
        self.total - self.free.len() as u64
    }

    /// True when [`DescCache::alloc`] would need a new chunk.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }

    /// Carves `chunk` into descriptors and puts them on the free list.
    ///
    /// # Safety
    ///
    /// `chunk` satisfies the [`DescMemory`] contract: CHUNK_SIZE bytes,
    /// CHUNK_SIZE aligned, writable, exclusively ours forever.
    pub unsafe fn add_chunk(&mut self, chunk: NonNull<u8>) {
        let size = core::mem::size_of::<D>();
        let n = CHUNK_SIZE / size;
        // Push in reverse so the first descriptor of the chunk is handed out first.
        for i in (0..n).rev() {
            // SAFETY: `i * size + size <= CHUNK_SIZE`, so the slot is inside
            // the chunk; the chunk is CHUNK_SIZE aligned and `size` a multiple
            // of D's alignment (repr(align(16)) and 16-byte multiples), so the
            // slot is aligned for D.
            let slot = unsafe { chunk.add(i * size) }.cast::<D>();
            // SAFETY: the slot is valid for writes and ours (contract above);
            // it holds no live D yet, so nothing is overwritten without drop.
            unsafe { slot.write(D::new_free()) };
            // SAFETY: just initialised, in 'static memory that is ours for
            // good (contract above).
            self.free.push(unsafe { slot.as_ref() });
            self.total += 1;
        }
    }

    /// A free descriptor, `None` when the cache needs a chunk.
    #[inline(always)]
    pub fn alloc(&mut self) -> Option<&'static D> {
        self.free.pop()
    }

    /// Returns a descriptor taken from this cache.
    #[inline(always)]
    pub fn free(&mut self, d: &'static D) {
        self.free.push(d);
    }
}

/// The page-array word for descriptor `d`: tagged `D::TYPE`. Every
/// descriptor word is made here, so a word's tag always names the type of
/// the descriptor it points to, which is what [`desc_of`] relies on.
#[inline(always)]
pub(crate) fn desc_word<A: Atomics, D: Desc<A>>(d: &'static D) -> Word {
    Word::with_desc(D::TYPE, desc_addr(d))
}

/// The descriptor `w` points to, if `w`'s type tag is `D::TYPE` (the one
/// checked way from a word to its descriptor).
#[inline(always)]
pub(crate) fn desc_of<A: Atomics, D: Desc<A>>(w: Word) -> Option<&'static D> {
    if w.frame_type() != Some(D::TYPE) {
        return None;
    }
    // SAFETY: a word tagged `D::TYPE` is only ever made by `desc_word` from
    // a `&'static D` handed out by a `DescCache<D, A>` (descriptor words are
    // stored whole, never assembled from parts), so its address is such a D.
    Some(unsafe { desc_at(w.desc_addr()) })
}

/// Turns a descriptor address from a word back into a reference.
///
/// # Safety
///
/// `addr` must be the address of a `D` created by a [`DescCache<D, A>`]
/// (read from a word tagged `D::TYPE`, which only ever holds such addresses).
#[inline(always)]
unsafe fn desc_at<A: Atomics, D: Desc<A>>(addr: usize) -> &'static D {
    let p: *const D = core::ptr::with_exposed_provenance(addr);
    // SAFETY: by the contract `p` points to an initialised D in 'static,
    // type-stable memory (never freed, never reused for another type), whose
    // address was exposed when the cache linked or handed it out.
    unsafe { &*p }
}

/// The address to store in a word for descriptor `d` (exposing its provenance).
#[inline(always)]
pub(crate) fn desc_addr<D>(d: &'static D) -> usize {
    (d as *const D).expose_provenance()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
pub(crate) mod tests {
    use super::*;
    use crate::frames::atomics::CoreAtomics;
    use crate::frames::desc::{FolioDesc, HwPoisonDesc};

    /// Host descriptor memory: leaked boxes.
    pub struct LeakMemory;
    // SAFETY: each chunk is a fresh, leaked, page-aligned box.
    unsafe impl DescMemory for LeakMemory {
        fn chunk(&mut self) -> Option<NonNull<u8>> {
            let b: &'static mut DescChunk =
                crate::frames::testutil::keep(Box::new(DescChunk::ZERO));
            Some(NonNull::from(b).cast())
        }
    }

    #[test]
    fn cache_is_lifo_and_type_stable() {
        let mut c: DescCache<FolioDesc<CoreAtomics>, CoreAtomics> = DescCache::new();
        assert!(c.alloc().is_none());
        // SAFETY: LeakMemory chunks satisfy the DescMemory contract.
        unsafe { c.add_chunk(LeakMemory.chunk().unwrap()) };
        assert_eq!(c.total, 256);
        let a = c.alloc().unwrap();
        let b = c.alloc().unwrap();
        assert_eq!(desc_addr(b) - desc_addr(a), 16);
        assert_eq!(desc_addr(a) % 16, 0);
        c.free(a);
        let again = c.alloc().unwrap();
        assert!(core::ptr::eq(a, again));
        assert_eq!(c.live(), 2);
        // SAFETY: the address came from this folio cache.
        let back: &FolioDesc<CoreAtomics> = unsafe { desc_at(desc_addr(b)) };
        assert!(core::ptr::eq(back, b));
    }

    #[test]
    fn chunk_pool_runs_dry() {
        let chunks: &'static mut [DescChunk] = crate::frames::testutil::keep(
            vec![DescChunk::ZERO, DescChunk::ZERO].into_boxed_slice(),
        );
        let mut pool = ChunkPool::new(chunks);
        let mut c: DescCache<HwPoisonDesc<CoreAtomics>, CoreAtomics> = DescCache::new();
        while let Some(ch) = pool.chunk() {
            assert_eq!(ch.as_ptr() as usize % CHUNK_SIZE, 0);
            // SAFETY: pool chunks satisfy the DescMemory contract.
            unsafe { c.add_chunk(ch) };
        }
        assert_eq!(pool.remaining(), 0);
        assert_eq!(c.total, 512);
    }
}
