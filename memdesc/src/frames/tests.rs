//! Unit tests of the allocator, folios, refcounts and frozen frames.

use super::testutil::*;
use super::*;
use core::num::NonZeroU32;

#[test]
fn new_with_holes_and_reserved() {
    let (pa, n) = setup(&[(0x40000, 0x40400), (0x80000, 0x80100)]);
    assert_eq!(n, 0x500);
    let fa = alloc(
        pa,
        &[
            ReservedRange {
                range: PfnRange::new(Pfn(0x40000), Pfn(0x40010)),
                kind: ReservedKind::DeviceTree,
            },
            ReservedRange {
                range: PfnRange::new(Pfn(0x400f0), Pfn(0x40101)),
                kind: ReservedKind::Image,
            },
            // Outside every range: ignored.
            ReservedRange {
                range: PfnRange::new(Pfn(0x9000), Pfn(0x9010)),
                kind: ReservedKind::Mmio,
            },
        ],
    );
    assert_eq!(fa.count(FrameType::Reserved), 0x10 + 0x11);
    assert_eq!(fa.count(FrameType::Free), 0x500 - 0x21);
    let w = pa.word(Pfn(0x40100)).unwrap();
    assert_eq!(ReservedKind::from_subtype(w.subtype()), ReservedKind::Image);
    fa.check_consistency().unwrap();
    let s = fa.stats();
    assert_eq!(s.frames, 0x500);
    assert_eq!(s.free_blocks[8], 1); // 0x80000..0x80100
    assert!(FrameAllocator::new(pa, desc_cache::tests::LeakMemory, &[]).is_err());
}

#[test]
fn folio_alloc_free_merges_back() {
    let (pa, _) = setup(&[(0x1000, 0x1400)]);
    let mut fa = alloc(pa, &[]);
    let before = fa.stats();
    let mut live = Vec::new();
    for order in [0u8, 3, 1, 5, 0, 2] {
        let f = fa.alloc_folio(order, Owner::Buddy).unwrap();
        assert_eq!(f.order(), order);
        assert_eq!(f.pfn().0 % (1 << order), 0);
        assert_eq!(f.refcount(), 1);
        for i in 0..1u64 << order {
            let w = pa.word(Pfn(f.pfn().0 + i)).unwrap();
            assert_eq!(w.frame_type(), Some(FrameType::Folio));
            assert_eq!(w.desc_addr(), f.desc() as *const _ as usize);
        }
        live.push(f);
    }
    fa.check_consistency().unwrap();
    assert_eq!(fa.count(FrameType::Folio), 1 + 8 + 2 + 32 + 1 + 4);
    for f in live {
        assert!(matches!(fa.put(f), Ok(Some(Released::Freed { .. }))));
    }
    fa.check_consistency().unwrap();
    assert!(fa.stats().cached_frames > 0);
    fa.drain_cache();
    fa.check_consistency().unwrap();
    let after = fa.stats();
    assert_eq!(after.by_type, before.by_type);
    assert_eq!(after.free_blocks, before.free_blocks);
    assert_eq!(after.live_descs[0], 0);
}

#[test]
fn exhaustion_and_bad_input_are_errors() {
    let (pa, _) = setup(&[(0x10, 0x20)]);
    let mut fa = alloc(pa, &[]);
    assert_eq!(
        fa.alloc_folio(5, Owner::Buddy).err(),
        Some(FrameError::OutOfMemory { order: 5 })
    );
    assert_eq!(
        fa.alloc_folio(MAX_ORDER + 1, Owner::Buddy).err(),
        Some(FrameError::InvalidOrder {
            order: MAX_ORDER + 1
        })
    );
    let f = fa.alloc_folio(4, Owner::Buddy).unwrap();
    assert_eq!(
        fa.alloc_frozen(0, FrozenKind::Guard),
        Err(FrameError::OutOfMemory { order: 0 })
    );
    assert_eq!(
        fa.free_frozen(Pfn(0x10), 0),
        Err(FrameError::WrongType {
            pfn: Pfn(0x10),
            found: FrameType::Folio
        })
    );
    assert_eq!(
        fa.free_frozen(Pfn(0x99), 0),
        Err(FrameError::NotManaged { pfn: Pfn(0x99) })
    );
    assert_eq!(
        fa.free_frozen(Pfn(0x11), 1),
        Err(FrameError::Misaligned {
            pfn: Pfn(0x11),
            order: 1
        })
    );
    assert!(fa.put(f).unwrap().is_some());
    assert_eq!(
        fa.free_frozen(Pfn(0x10), 0),
        Err(FrameError::Free { pfn: Pfn(0x10) })
    );
    fa.check_consistency().unwrap();
}

#[test]
fn alignment_beyond_order() {
    let (pa, _) = setup(&[(0x1001, 0x1100)]);
    let mut fa = alloc(pa, &[]);
    let f = fa.alloc_folio_aligned(0, 6, Owner::Buddy).unwrap();
    assert_eq!(f.pfn().0 % 64, 0);
    let g = fa.alloc_frozen_aligned(1, 5, FrozenKind::Guard).unwrap();
    assert_eq!(g.0 % 32, 0);
    fa.free_frozen(g, 1).unwrap();
    let _ = fa.put(f).unwrap();
    fa.check_consistency().unwrap();
}

#[test]
fn alloc_at_and_reserve() {
    let (pa, _) = setup(&[(0x0, 0x100)]);
    let mut fa = alloc(pa, &[]);
    let f = fa.alloc_folio_at(Pfn(0x48), 3, Owner::Pool(3)).unwrap();
    assert_eq!((f.pfn(), f.owner()), (Pfn(0x48), Owner::Pool(3)));
    assert_eq!(
        fa.alloc_frozen_at(Pfn(0x4c), 0, FrozenKind::Guard),
        Err(FrameError::NotFree { pfn: Pfn(0x4c) })
    );
    fa.alloc_frozen_at(Pfn(0x50), 2, FrozenKind::Offline)
        .unwrap();
    assert_eq!(fa.count(FrameType::Offline), 4);
    assert_eq!(
        fa.reserve(PfnRange::new(Pfn(0x40), Pfn(0x49)), ReservedKind::Mmio),
        Err(FrameError::NotFree { pfn: Pfn(0x48) })
    );
    fa.reserve(PfnRange::new(Pfn(0x41), Pfn(0x47)), ReservedKind::Mmio)
        .unwrap();
    assert_eq!(fa.count(FrameType::Reserved), 6);
    fa.check_consistency().unwrap();
    // A reserved frame can be given back one at a time.
    fa.free_frozen(Pfn(0x41), 0).unwrap();
    let Ok(Some(Released::ToOwner { owner, folio })) = fa.put(f) else {
        panic!("pool-owned folio should go to its owner")
    };
    assert_eq!(owner, Owner::Pool(3));
    fa.free_frozen_folio(folio).unwrap();
    fa.check_consistency().unwrap();
}

#[test]
fn refcounts_freeze_unfreeze() {
    let (pa, _) = setup(&[(0x100, 0x110)]);
    let mut fa = alloc(pa, &[]);
    let f = fa.alloc_folio(1, Owner::Buddy).unwrap();
    let p = f.pfn();
    let g = f.try_clone().unwrap();
    assert_eq!(f.refcount(), 2);
    let err = match f.freeze(1) {
        Err(e) => e,
        Ok(_) => panic!("froze with a reference outstanding"),
    };
    assert_eq!(err.actual, 2);
    let f = err.folio;
    let raw = g.into_raw();
    let frozen = match f.freeze(2) {
        Ok(z) => z,
        Err(_) => panic!("freeze(2) must succeed"),
    };
    // try_get on a frozen folio: typed error, always.
    assert_eq!(
        pa.get_folio(p, |_| ()).err(),
        Some(FrameError::Frozen { pfn: p })
    );
    assert_eq!(
        pa.get_folio(Pfn(p.0 + 1), |_| ()).err(),
        Some(FrameError::Frozen { pfn: Pfn(p.0 + 1) })
    );
    let f = frozen.unfreeze(NonZeroU32::new(2).unwrap());
    // SAFETY: `raw` is the reference `g.into_raw()` gave up (counted in the
    // 2 that unfreeze restored), wrapped once.
    let g = unsafe { FolioRef::from_raw(raw) };
    assert!(fa.put(g).unwrap().is_none());
    assert!(fa.put(f).unwrap().is_some());
    // Free frame, offline, reserved, page table: typed errors.
    assert_eq!(
        pa.get_folio(p, |_| ()).err(),
        Some(FrameError::Free { pfn: p })
    );
    let t = fa.alloc_page_table().unwrap();
    assert_eq!(
        pa.get_folio(t.pfn(), |_| ()).err(),
        Some(FrameError::WrongType {
            pfn: t.pfn(),
            found: FrameType::PageTable
        })
    );
    assert_eq!(
        pa.get_folio(Pfn(0), |_| ()).err(),
        Some(FrameError::NotManaged { pfn: Pfn(0) })
    );
}

#[test]
fn page_table_valid_counts() {
    let (pa, _) = setup(&[(0x100, 0x110)]);
    let mut fa = alloc(pa, &[]);
    let t = fa.alloc_page_table().unwrap();
    assert_eq!(fa.count(FrameType::PageTable), 1);
    assert_eq!(t.inc_valid(), Ok(1));
    assert_eq!(t.inc_valid(), Ok(2));
    // The table engine finds it again by PFN.
    let again = pa.page_table(t.pfn()).unwrap();
    assert_eq!(again.valid(), 2);
    assert_eq!(again.dec_valid(), Ok(1));
    assert_eq!(
        fa.free_page_table(t),
        Err(FrameError::PageTableNotEmpty {
            pfn: t.pfn(),
            valid: 1
        })
    );
    t.dec_valid().unwrap();
    assert_eq!(t.dec_valid(), Err(FrameError::ValidCountOutOfRange));
    fa.free_page_table(t).unwrap();
    assert_eq!(fa.count(FrameType::PageTable), 0);
    assert!(pa.page_table(t.pfn()).is_err());
    // Slab descriptors.
    let s = fa.alloc_frozen(1, FrozenKind::Slab).unwrap();
    let d = pa.slab(Pfn(s.0 + 1)).unwrap();
    d.set_object_size(64);
    d.set_in_use(3);
    assert_eq!((d.object_size(), d.in_use()), (64, 3));
    // A part of the allocation is not the allocation.
    assert_eq!(
        fa.free_frozen(s, 0),
        Err(FrameError::NotAllocation { pfn: s })
    );
    assert_eq!(d.order(), 1);
    fa.free_frozen(s, 1).unwrap();
    let t2 = fa.alloc_frozen(2, FrozenKind::PageTable).unwrap();
    assert_eq!(
        fa.free_frozen(t2, 1),
        Err(FrameError::NotAllocation { pfn: t2 })
    );
    fa.free_frozen(t2, 2).unwrap();
    fa.check_consistency().unwrap();
}

#[test]
fn descriptors_from_own_frames() {
    /// Descriptor memory from the allocator's frames: map them to leaked
    /// host chunks (standing in for the linear map).
    struct FakeLinear(std::collections::HashMap<u64, usize>);
    // SAFETY: every mapping is a fresh leaked, page-aligned chunk.
    unsafe impl DescMemory for FakeLinear {
        fn chunk(&mut self) -> Option<core::ptr::NonNull<u8>> {
            None
        }
        fn map_frame(&mut self, pfn: Pfn) -> Option<core::ptr::NonNull<u8>> {
            let c = crate::frames::testutil::keep(Box::new(DescChunk::ZERO));
            self.0.insert(pfn.0, c as *mut DescChunk as usize);
            Some(core::ptr::NonNull::from(c).cast())
        }
    }
    let (pa, _) = setup(&[(0x100, 0x110)]);
    let mut fa = FrameAllocator::new(pa, FakeLinear(Default::default()), &[]).unwrap();
    let f = fa.alloc_folio(0, Owner::Buddy).unwrap();
    assert_eq!(fa.count(FrameType::Reserved), 1);
    assert_eq!(fa.stats().desc_bytes, CHUNK_SIZE as u64);
    let _ = fa.put(f).unwrap();
    // Exhaust: the last frame cannot hold both a chunk and the folio.
    let mut n = 0;
    while fa.alloc_frozen(0, FrozenKind::PageTable).is_ok() {
        n += 1;
    }
    assert_eq!(n, 14); // 16 frames - folio chunk - page-table chunk
    fa.check_consistency().unwrap();
}

#[test]
fn out_of_descriptors_is_typed() {
    struct NoMemory;
    // SAFETY: never hands out memory.
    unsafe impl DescMemory for NoMemory {
        fn chunk(&mut self) -> Option<core::ptr::NonNull<u8>> {
            None
        }
    }
    let (pa, _) = setup(&[(0x100, 0x110)]);
    let mut fa = FrameAllocator::new(pa, NoMemory, &[]).unwrap();
    assert_eq!(
        fa.alloc_folio(0, Owner::Buddy).err(),
        Some(FrameError::OutOfDescriptors {
            ty: FrameType::Folio
        })
    );
    assert_eq!(fa.alloc_frozen(0, FrozenKind::Guard).map(|_| ()), Ok(()));
    assert_eq!(fa.count(FrameType::Free), 15);
    fa.check_consistency().unwrap();
}

#[test]
// 2^19 words: minutes under Miri, and the code path is the one the smaller
// tests already run there.
#[cfg_attr(miri, ignore)]
fn order_18_blocks() {
    let (pa, _) = setup(&[(1 << 18, 3 << 18)]);
    let mut fa = alloc(pa, &[]);
    assert_eq!(fa.free_blocks(18), 2);
    let a = fa.alloc_frozen(18, FrozenKind::Offline).unwrap();
    let b = fa.alloc_frozen(18, FrozenKind::Offline).unwrap();
    assert_eq!(
        fa.alloc_frozen(0, FrozenKind::Offline),
        Err(FrameError::OutOfMemory { order: 0 })
    );
    fa.free_frozen(a, 18).unwrap();
    fa.free_frozen(b, 18).unwrap();
    assert_eq!(fa.free_blocks(18), 2);
}

/// The consistency checker itself catches a broken free-list block: a tail
/// word that is a free head instead of a free tail (still typed Free, so
/// the per-type counts agree and only the block check can see it).
#[test]
fn consistency_check_catches_a_bad_free_block_tail() {
    let (pa, _) = setup(&[(0x40000, 0x40400)]);
    let fa = alloc(pa, &[]);
    fa.check_consistency().unwrap();
    pa.store_relaxed(5, Word::free_head(0, NO_LINK, NO_LINK));
    let e = fa.check_consistency().unwrap_err();
    assert_eq!(e.pfn, Pfn(0x40005));
    assert_eq!(e.what, "free block tail is not a free tail");
}

/// The same for a block parked in a hot cache.
#[test]
fn consistency_check_catches_a_bad_cached_block_tail() {
    let (pa, _) = setup(&[(0x40000, 0x40400)]);
    let mut fa = alloc(pa, &[]);
    let pfn = fa.alloc_frozen(3, FrozenKind::Slab).unwrap();
    fa.free_frozen(pfn, 3).unwrap();
    fa.check_consistency().unwrap();
    let idx = (pfn.0 - 0x40000) as usize;
    assert!(
        pa.load(idx).is_free_cached(),
        "an order-3 free goes to the hot cache"
    );
    pa.store_relaxed(idx + 2, Word::free_head(0, NO_LINK, NO_LINK));
    let e = fa.check_consistency().unwrap_err();
    assert_eq!(e.pfn, Pfn(pfn.0 + 2));
    assert_eq!(e.what, "cached block tail is not a free tail");
}
