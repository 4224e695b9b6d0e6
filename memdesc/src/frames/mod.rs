//! Physical frames: the memdesc page array, its descriptors and refcounts,
//! and the buddy frame allocator (docs/architecture.md, "The page array").
//!
//! - [`PageArray`] ([`page_array`]): one 8-byte [`Word`] per
//!   frame of a set of RAM ranges; storage handed in by the caller
//!   ([`bytes_needed`]).
//! - [`FrameAllocator`]: a buddy allocator whose free lists live in the words
//!   ([`buddy`]), orders `0..=`[`MAX_ORDER`] (1 GiB); refcounted
//!   folios ([`FolioRef`], one [`FolioDesc`] per allocation) and frozen
//!   allocations ([`FrozenKind`]: page tables with a [`PageTableDesc`], slab,
//!   offline, guard).
//! - Descriptors come from type-stable caches fed by a [`DescMemory`]
//!   ([`desc_cache`]); the speculative
//!   [`PageArray::get_folio`] relies on that.
//! - Small blocks (orders `0..=`[`HOT_MAX_ORDER`]; in the shared allocator
//!   [`SmpFrameAllocator`], per CPU, `0..=`[`PCP_MAX_ORDER`]) are recycled through
//!   bounded hot caches ([`hot_cache`]) before touching the
//!   buddy lists; cached frames stay typed Free.
//! - [`FrameAllocator::poison`] and the Offline API for the balloon
//!   ([`offline`]).
//!
//! Building it (firmware): compute [`bytes_needed`] for the RAM ranges, carve
//! that storage out of RAM, build the [`PageArray`], then
//! [`FrameAllocator::new`] with the reserved ranges (image, DTB, the page
//! array itself, holes) and a [`DescMemory`] ([`LinearMap`] on target).
//!
//! Everything that races (words, descriptor fields) is generic over
//! [`Atomics`] so the loom test checks the shipping code.
//!
//! ```
//! use memdesc::frames::*;
//! use memdesc::{Pfn, PhysAddr};
//! # use core::sync::atomic::AtomicU64;
//! # use core::ptr::NonNull;
//! # struct Leak;
//! # // SAFETY: every chunk is a fresh leaked, page-aligned box.
//! # unsafe impl DescMemory for Leak {
//! #     fn chunk(&mut self) -> Option<NonNull<u8>> {
//! #         Some(NonNull::from(Box::leak(Box::new(DescChunk::ZERO))).cast())
//! #     }
//! # }
//! let ram = [PfnRange::from_phys(PhysAddr(0x4000_0000), 8 << 20)];
//! let words = words_needed(&ram).unwrap() as usize;
//! // On target: carved out of RAM at boot and typed Reserved(PageArray).
//! let storage: &'static mut [AtomicU64] =
//!     Box::leak((0..words).map(|_| AtomicU64::new(0)).collect());
//! let pa: &'static PageArray = Box::leak(Box::new(PageArray::new(storage, &ram).unwrap()));
//! let image = ReservedRange {
//!     range: PfnRange::covering_phys(PhysAddr(0x4008_0000), 0x2_1000),
//!     kind: ReservedKind::Image,
//! };
//! let mut fa = FrameAllocator::new(pa, Leak, &[image]).unwrap();
//! let table = fa.alloc_page_table().unwrap();
//! table.inc_valid().unwrap();
//! let folio = fa.alloc_folio(2, Owner::Buddy).unwrap();
//! let again = pa.get_folio(Pfn(folio.pfn().0 + 3), |_| ()).unwrap();
//! assert_eq!(again.refcount(), 2);
//! assert!(fa.put(again).unwrap().is_none());
//! assert!(matches!(fa.put(folio), Ok(Some(Released::Freed { order: 2, .. }))));
//! table.dec_valid().unwrap();
//! fa.free_page_table(table).unwrap();
//! ```

pub mod allocator;
pub mod atomics;
pub mod buddy;
pub mod consistency;
pub mod desc;
pub mod desc_cache;
pub mod error;
pub mod frozen;
pub mod hot_cache;
pub mod hwpoison;
pub mod offline;
pub mod owner;
pub mod page_array;
pub mod placement;
pub mod refcount;
pub mod smp;
pub mod word;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests;

pub use allocator::{FrameAllocator, FrameStats, Released};
pub use atomics::{AtomicCell, Atomics, CoreAtomics};
pub use buddy::{MAX_ORDER, ORDERS};
pub use consistency::{ConsistencyError, Inconsistency};
pub use desc::{
    FolioDesc, HwPoisonDesc, PageTableDesc, RefcountError, SlabDesc, FOLIO_FLAG_USER_SHIFT,
    FOLIO_HWPOISON, PFN_LIMIT, REFCOUNT_MAX, TABLE_ENTRIES,
};
pub use desc_cache::{ChunkPool, DescChunk, DescMemory, LinearMap, CHUNK_SIZE};
pub use error::{FrameError, LayoutError};
pub use frozen::FrozenKind;
pub use hot_cache::{CACHE_MAX_ORDER, HOT_CACHE_BLOCKS, HOT_MAX_ORDER};
pub use hwpoison::Poisoned;
pub use owner::Owner;
pub use page_array::{bytes_needed, words_needed, PageArray, PfnRange, MAX_RANGES};
pub use placement::ReservedRange;
pub use refcount::{FolioRef, FreezeError, FrozenFolio, LastRef, PageTableFrame, UnfreezeError};
pub use smp::{
    pcp_batch, pcp_high, PcpStats, SmpError, SmpFrameAllocator, PCP_BATCH, PCP_DESCS,
    PCP_DESCS_DRAIN, PCP_HIGH, PCP_LINE_ORDER, PCP_MAX_ORDER,
};
pub use word::{FrameType, ReservedKind, Word, MAX_FRAMES, NO_LINK};

pub use crate::addr::Pfn;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
pub(crate) mod testutil {
    use super::desc_cache::tests::LeakMemory;
    use super::*;
    use core::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    /// A pointer kept reachable from a static, so Miri's leak check knows the
    /// test memory handed out as `'static` is intentionally never freed.
    struct Kept(#[allow(dead_code)] *mut u8);
    // SAFETY: the pointer is only stored, never dereferenced through `Kept`.
    unsafe impl Send for Kept {}
    static KEPT: Mutex<Vec<Kept>> = Mutex::new(Vec::new());

    /// `Box::leak`, but kept reachable (see [`Kept`]).
    pub fn keep<T: ?Sized>(b: Box<T>) -> &'static mut T {
        let p = Box::into_raw(b);
        KEPT.lock().unwrap().push(Kept(p as *mut u8));
        // SAFETY: `p` comes from `Box::into_raw` and is never freed.
        unsafe { &mut *p }
    }

    /// A leaked page array over `(start, end)` PFN ranges.
    pub fn setup(ranges: &[(u64, u64)]) -> (&'static PageArray<'static>, usize) {
        let r: Vec<PfnRange> = ranges
            .iter()
            .map(|&(s, e)| PfnRange::new(Pfn(s), Pfn(e)))
            .collect();
        let n = words_needed(&r).unwrap() as usize;
        let s: &'static mut [AtomicU64] = keep(
            (0..n)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        (keep(Box::new(PageArray::new(s, &r).unwrap())), n)
    }

    /// Descriptor memory from the allocator's own frames: each frame handed
    /// to [`DescMemory::map_frame`] is mapped to a leaked host chunk
    /// (standing in for the linear map); `frames` records which.
    #[derive(Default)]
    pub struct FakeLinear {
        pub frames: std::collections::HashMap<u64, usize>,
    }
    // SAFETY: every mapping is a fresh leaked, page-aligned chunk.
    unsafe impl DescMemory for FakeLinear {
        fn chunk(&mut self) -> Option<core::ptr::NonNull<u8>> {
            None
        }
        fn map_frame(&mut self, pfn: Pfn) -> Option<core::ptr::NonNull<u8>> {
            let c = keep(Box::new(DescChunk::ZERO));
            self.frames.insert(pfn.0, c as *mut DescChunk as usize);
            Some(core::ptr::NonNull::from(c).cast())
        }
    }

    impl FakeLinear {
        /// The frame whose chunk holds address `addr`, if any.
        pub fn frame_holding(&self, addr: usize) -> Option<Pfn> {
            self.frames
                .iter()
                .find(|(_, &c)| (c..c + CHUNK_SIZE).contains(&addr))
                .map(|(&p, _)| Pfn(p))
        }
    }

    /// The usual fixture: [`setup`] over `ranges` and [`alloc`] over it,
    /// nothing reserved.
    pub fn fresh(
        ranges: &[(u64, u64)],
    ) -> (
        &'static PageArray<'static>,
        FrameAllocator<'static, LeakMemory>,
    ) {
        let (pa, _) = setup(ranges);
        (pa, alloc(pa, &[]))
    }

    /// `fa` counts each (frame type, frames) of `counts` exactly.
    #[track_caller]
    pub fn assert_counts<M: DescMemory>(fa: &FrameAllocator<'_, M>, counts: &[(FrameType, u64)]) {
        for &(t, n) in counts {
            assert_eq!(fa.count(t), n, "{t:?}");
        }
    }

    /// An allocator over `pa` with leaked-box descriptor memory.
    pub fn alloc(
        pa: &'static PageArray<'static>,
        reserved: &[ReservedRange],
    ) -> FrameAllocator<'static, LeakMemory> {
        FrameAllocator::new(pa, LeakMemory, reserved).unwrap()
    }
}
