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
    let (pa, mut fa) = fresh(&[(0x1000, 0x1400)]);
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
    let (_, mut fa) = fresh(&[(0x10, 0x20)]);
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
    let (_, mut fa) = fresh(&[(0x1001, 0x1100)]);
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
    let (_, mut fa) = fresh(&[(0x0, 0x100)]);
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
    // Reserved frames are not frozen allocations; they are unreserved, by
    // kind, any number at a time.
    assert_eq!(
        fa.free_frozen(Pfn(0x41), 0),
        Err(FrameError::Reserved {
            pfn: Pfn(0x41),
            kind: ReservedKind::Mmio
        })
    );
    // SAFETY: the test reserved these frames itself and uses none of them
    // (the refused calls give nothing back).
    unsafe {
        assert_eq!(
            fa.unreserve(PfnRange::new(Pfn(0x41), Pfn(0x42)), ReservedKind::Image),
            Err(FrameError::Reserved {
                pfn: Pfn(0x41),
                kind: ReservedKind::Mmio
            })
        );
        assert_eq!(
            fa.unreserve(PfnRange::new(Pfn(0x46), Pfn(0x48)), ReservedKind::Mmio),
            Err(FrameError::WrongType {
                pfn: Pfn(0x47),
                found: FrameType::Free
            })
        );
        fa.unreserve(PfnRange::new(Pfn(0x41), Pfn(0x42)), ReservedKind::Mmio)
            .unwrap();
    }
    assert_eq!(fa.count(FrameType::Reserved), 5);
    fa.check_consistency().unwrap();
    let Ok(Some(Released::ToOwner { owner, folio })) = fa.put(f) else {
        panic!("pool-owned folio should go to its owner")
    };
    assert_eq!(owner, Owner::Pool(3));
    fa.free_frozen_folio(folio).unwrap();
    fa.check_consistency().unwrap();
}

#[test]
fn refcounts_freeze_unfreeze() {
    let (pa, mut fa) = fresh(&[(0x100, 0x110)]);
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
    // It was frozen at 2: unfreezing with another count is refused.
    let e = frozen.unfreeze(NonZeroU32::new(1).unwrap()).err().unwrap();
    assert_eq!(e.error, FrameError::RefcountMismatch { pfn: p, actual: 2 });
    let e = e.folio.unfreeze(NonZeroU32::new(3).unwrap()).err().unwrap();
    assert_eq!(e.error, FrameError::RefcountMismatch { pfn: p, actual: 2 });
    assert_eq!(e.folio.desc().refcount(), 0);
    let f = e.folio.unfreeze(NonZeroU32::new(2).unwrap()).ok().unwrap();
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
    let (pa, mut fa) = fresh(&[(0x100, 0x110)]);
    let t = fa.alloc_page_table().unwrap();
    assert_eq!(fa.count(FrameType::PageTable), 1);
    assert_eq!(t.inc_valid(), Ok(1));
    assert_eq!(t.inc_valid(), Ok(2));
    // The table engine finds it again by PFN.
    let tp = t.pfn();
    let again = pa.page_table(tp).unwrap();
    assert_eq!(again.valid(), 2);
    assert_eq!(again.dec_valid(), Ok(1));
    assert_eq!(
        fa.free_page_table(t),
        Err(FrameError::PageTableNotEmpty { pfn: tp, valid: 1 })
    );
    // A refused free consumed the handle; the engine finds the table again.
    let t = pa.page_table(tp).unwrap();
    t.dec_valid().unwrap();
    assert_eq!(t.dec_valid(), Err(FrameError::ValidCountOutOfRange));
    fa.free_page_table(t).unwrap();
    assert_eq!(fa.count(FrameType::PageTable), 0);
    assert!(pa.page_table(tp).is_err());
    // `again` is a handle to the freed table: stale, for good.
    assert_eq!(again.inc_valid(), Err(FrameError::StaleHandle { pfn: tp }));
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
    let (pa, _) = setup(&[(0x100, 0x110)]);
    let mut fa = FrameAllocator::new(pa, FakeLinear::default(), &[]).unwrap();
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
    let (_, mut fa) = fresh(&[(1 << 18, 3 << 18)]);
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
    assert_eq!(e.what, Inconsistency::FreeBlockBadTail);
}

/// The same for a block parked in a hot cache.
#[test]
fn consistency_check_catches_a_bad_cached_block_tail() {
    let (pa, mut fa) = fresh(&[(0x40000, 0x40400)]);
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
    assert_eq!(e.what, Inconsistency::CachedBlockBadTail);
}

// ---- scenarios found by an adversarial review ------------------------------

/// A `put` on a folio whose count is frozen at 0 must not wrap the count
/// (to u32::MAX, after which a lookup would hand out a frozen folio).
#[test]
fn put_on_a_frozen_folio_is_refused() {
    let (pa, mut fa) = fresh(&[(0x100, 0x110)]);
    let f = fa.alloc_folio(0, Owner::Buddy).unwrap();
    let p = f.pfn();
    let raw = f.try_clone().unwrap().into_raw();
    let Ok(frozen) = f.freeze(2) else {
        panic!("freeze(2) with two references must succeed")
    };
    // SAFETY: deliberately stale (freeze took the count `raw` stood for), to
    // show `put` refuses it; the descriptor stays valid (the folio is alive,
    // frozen) and nothing is read or written through the frames.
    let stale = unsafe { FolioRef::from_raw(raw) };
    assert_eq!(
        fa.put(stale).err(),
        Some(FrameError::RefcountUnderflow { pfn: p })
    );
    assert_eq!(frozen.desc().refcount(), 0);
    assert_eq!(
        pa.get_folio(p, |_| ()).err(),
        Some(FrameError::Frozen { pfn: p })
    );
}

/// A lookup or clone at the refcount ceiling is a typed error, never a wrap
/// to zero.
#[test]
fn refcount_ceiling_is_refused() {
    let (pa, mut fa) = fresh(&[(0x100, 0x110)]);
    let f = fa.alloc_folio(0, Owner::Balloon).unwrap();
    let p = f.pfn();
    let Ok(Some(Released::ToOwner { folio, .. })) = fa.put(f) else {
        panic!("a balloon folio goes to its owner")
    };
    assert_eq!(folio.frozen_refs(), 0);
    let f = folio
        .unfreeze(NonZeroU32::new(REFCOUNT_MAX).unwrap())
        .ok()
        .unwrap();
    let e = Some(FrameError::RefcountSaturated { pfn: p });
    assert_eq!(pa.get_folio(p, |_| ()).err(), e);
    assert_eq!(f.try_clone().err(), e);
    assert_eq!(f.refcount(), REFCOUNT_MAX);
    let Ok(z) = f.freeze(REFCOUNT_MAX) else {
        panic!("freeze at the ceiling")
    };
    fa.free_frozen_folio(z).unwrap();
    assert_eq!(fa.count(FrameType::Free), 16);
    fa.check_consistency().unwrap();
}

/// A table handle kept past the table's free cannot touch the next table
/// that gets the same frame (and the same, reused, descriptor).
#[test]
fn stale_table_handle_cannot_touch_the_next_table() {
    let (pa, mut fa) = fresh(&[(0x100, 0x110)]);
    let t1 = fa.alloc_page_table().unwrap();
    let p = t1.pfn();
    let stale = pa.page_table(p).unwrap();
    fa.free_page_table(t1).unwrap();
    let t2 = fa.alloc_page_table().unwrap();
    assert_eq!(t2.pfn(), p);
    assert!(core::ptr::eq(t2.desc(), stale.desc()), "descriptor reused");
    assert_eq!(stale.inc_valid(), Err(FrameError::StaleHandle { pfn: p }));
    assert_eq!(stale.dec_valid(), Err(FrameError::StaleHandle { pfn: p }));
    assert_eq!(t2.valid(), 0);
    assert_eq!(
        fa.free_page_table(stale),
        Err(FrameError::StaleHandle { pfn: p })
    );
    assert_eq!(fa.count(FrameType::PageTable), 1);
    assert_eq!(t2.inc_valid(), Ok(1));
    // A handle to a table whose frame became something else is stale too.
    t2.dec_valid().unwrap();
    let stale = pa.page_table(p).unwrap();
    fa.offline(p, 0).unwrap();
    assert_eq!(stale.inc_valid(), Err(FrameError::StaleHandle { pfn: p }));
    assert_eq!(
        fa.free_page_table(stale),
        Err(FrameError::StaleHandle { pfn: p })
    );
    assert_eq!(fa.count(FrameType::Offline), 1);
    fa.check_consistency().unwrap();
}

/// `free_frozen(pfn, 0)` must not hand out the allocator's own memory: a
/// frame holding descriptor-cache chunks, or the page array.
#[test]
fn free_frozen_refuses_descriptor_and_page_array_frames() {
    let (pa, _) = setup(&[(0x100, 0x110)]);
    let mut fa = FrameAllocator::new(
        pa,
        FakeLinear::default(),
        &[ReservedRange {
            range: PfnRange::new(Pfn(0x10f), Pfn(0x110)),
            kind: ReservedKind::PageArray,
        }],
    )
    .unwrap();
    let f = fa.alloc_folio(0, Owner::Buddy).unwrap();
    let chunk = *fa.mem.frames.keys().next().unwrap();
    for (p, kind) in [
        (Pfn(chunk), ReservedKind::DescriptorCache),
        (Pfn(0x10f), ReservedKind::PageArray),
    ] {
        assert_eq!(
            fa.free_frozen(p, 0),
            Err(FrameError::Reserved { pfn: p, kind })
        );
        // SAFETY: refused, so nothing is given back.
        let r = unsafe { fa.unreserve(PfnRange::new(p, Pfn(p.0 + 1)), kind) };
        assert_eq!(r, Err(FrameError::Reserved { pfn: p, kind }));
        assert_eq!(pa.word(p).unwrap().frame_type(), Some(FrameType::Reserved));
    }
    assert_eq!(fa.count(FrameType::Reserved), 2);
    let _ = fa.put(f).unwrap();
    fa.check_consistency().unwrap();
}

/// Poisoning a free frame must not put the poison descriptor on that frame
/// (descriptor growth takes a frame from the hot cache first).
#[test]
fn poisoning_a_free_frame_never_puts_metadata_on_it() {
    let (pa, _) = setup(&[(0x100, 0x110)]);
    let mut fa = FrameAllocator::new(pa, FakeLinear::default(), &[]).unwrap();
    let victim = fa.alloc_frozen(0, FrozenKind::Guard).unwrap();
    fa.free_frozen(victim, 0).unwrap();
    assert!(pa.word(victim).unwrap().is_free_cached());
    assert_eq!(fa.poison(victim), Ok(Poisoned::WasFree));
    assert_eq!(
        pa.word(victim).unwrap().frame_type(),
        Some(FrameType::HwPoison)
    );
    assert!(pa.poisoned_original(victim).unwrap().frame_type() == Some(FrameType::Free));
    assert!(
        !fa.mem.frames.contains_key(&victim.0),
        "the poisoned frame became descriptor memory"
    );
    let d = pa.word(victim).unwrap().desc_addr();
    assert_ne!(fa.mem.frame_holding(d), Some(victim));
    assert_eq!(fa.count(FrameType::HwPoison), 1);
    assert_eq!(fa.count(FrameType::Reserved), 1);
    fa.check_consistency().unwrap();
}

/// `offline`/`retype_frozen` of a poisoned page table with valid entries
/// must still be refused.
#[test]
fn retyping_a_poisoned_non_empty_table_is_refused() {
    let (_, mut fa) = fresh(&[(0x100, 0x110)]);
    let t = fa.alloc_page_table().unwrap();
    let p = t.pfn();
    t.inc_valid().unwrap();
    assert_eq!(fa.poison(p), Ok(Poisoned::InUse(FrameType::PageTable)));
    assert_eq!(
        fa.offline(p, 0),
        Err(FrameError::PageTableNotEmpty { pfn: p, valid: 1 })
    );
    assert_eq!(
        fa.retype_frozen(p, 0, FrozenKind::Guard),
        Err(FrameError::PageTableNotEmpty { pfn: p, valid: 1 })
    );
    assert_eq!(
        fa.free_frozen(p, 0),
        Err(FrameError::PageTableNotEmpty { pfn: p, valid: 1 })
    );
    assert_eq!(fa.count(FrameType::HwPoison), 1);
    assert_eq!(fa.stats().live_descs[2], 1);
    fa.check_consistency().unwrap();
}

/// `alloc_*_at` must not fail (and lose the frame) when descriptor growth
/// would take the very frame asked for.
#[test]
fn alloc_at_survives_descriptor_growth_taking_that_frame() {
    for kind in [None, Some(FrozenKind::PageTable), Some(FrozenKind::Slab)] {
        let (pa, _) = setup(&[(0x100, 0x110)]);
        let mut fa = FrameAllocator::new(pa, FakeLinear::default(), &[]).unwrap();
        // A fresh array is one order-4 block: growth would split it and
        // take its first frame, 0x100.
        match kind {
            None => {
                let f = fa.alloc_folio_at(Pfn(0x100), 0, Owner::Buddy).unwrap();
                assert_eq!(f.pfn(), Pfn(0x100));
                let _ = fa.put(f).unwrap();
            }
            Some(k) => {
                fa.alloc_frozen_at(Pfn(0x100), 0, k).unwrap();
                assert_ne!(
                    pa.word(Pfn(0x100)).unwrap().frame_type(),
                    Some(FrameType::Reserved)
                );
                fa.free_frozen(Pfn(0x100), 0).unwrap();
            }
        }
        assert!(!fa.mem.frames.contains_key(&0x100), "{kind:?}");
        assert_eq!(fa.count(FrameType::Reserved), 1);
        assert_eq!(fa.count(FrameType::Free), 15);
        fa.check_consistency().unwrap();
    }
}

/// Head PFNs at or above 2^41 do not fit the folio descriptor: the page
/// array refuses such ranges; the highest PFN below still round-trips.
#[test]
fn pfns_above_the_descriptor_field_are_refused() {
    let top = 1u64 << 41;
    let bad = [PfnRange::new(Pfn(top - 4), Pfn(top + 4))];
    assert!(words_needed(&bad).is_err());
    let mut s: Vec<core::sync::atomic::AtomicU64> = (0..8)
        .map(|_| core::sync::atomic::AtomicU64::new(0))
        .collect();
    assert!(PageArray::<CoreAtomics>::new(&mut s, &bad).is_err());
    let (pa, mut fa) = fresh(&[(top - 4, top)]);
    let f = fa.alloc_folio_at(Pfn(top - 1), 0, Owner::Buddy).unwrap();
    assert_eq!(f.pfn(), Pfn(top - 1));
    let g = pa.get_folio(Pfn(top - 1), |_| ()).unwrap();
    assert_eq!(g.pfn(), Pfn(top - 1));
    assert!(fa.put(g).unwrap().is_none());
    assert!(matches!(
        fa.put(f),
        Ok(Some(Released::Freed { pfn, order: 0 })) if pfn == Pfn(top - 1)
    ));
}

/// Adjacent RAM ranges are one stretch of memory: an order-9 allocation
/// fits 512 contiguous free frames that two given ranges cover.
#[test]
fn adjacent_ranges_are_merged() {
    let (pa, mut fa) = fresh(&[(0x300, 0x400), (0x200, 0x300)]);
    assert_eq!(pa.ranges().count(), 1);
    let f = fa.alloc_folio(9, Owner::Buddy).unwrap();
    assert_eq!(f.pfn(), Pfn(0x200));
    let _ = fa.put(f).unwrap();
    fa.drain_cache();
    assert_eq!(fa.free_blocks(9), 1);
    fa.check_consistency().unwrap();
}

/// A frame poisoned while free is poisoned, not free, to every operation.
#[test]
fn a_frame_poisoned_while_free_reports_hwpoisoned() {
    let (pa, mut fa) = fresh(&[(0x100, 0x110)]);
    let p = Pfn(0x105);
    assert_eq!(fa.poison(p), Ok(Poisoned::WasFree));
    let e = Some(FrameError::HwPoisoned { pfn: p });
    assert_eq!(fa.free_frozen(p, 0).err(), e);
    assert_eq!(fa.offline(p, 0).err(), e);
    assert_eq!(fa.online(p, 0, Owner::Buddy).err(), e);
    assert_eq!(fa.alloc_frozen_at(p, 0, FrozenKind::Guard).err(), e);
    assert_eq!(fa.alloc_folio_at(p, 0, Owner::Buddy).err(), e);
    assert_eq!(
        fa.alloc_frozen_at(Pfn(0x104), 2, FrozenKind::Offline).err(),
        e
    );
    assert_eq!(
        fa.reserve(PfnRange::new(Pfn(0x104), Pfn(0x108)), ReservedKind::Other)
            .err(),
        e
    );
    assert_eq!(pa.get_folio(p, |_| ()).err(), e);
    assert_eq!(fa.count(FrameType::HwPoison), 1);
    fa.check_consistency().unwrap();
}

/// The hot cache must not serve a request aligned beyond its order.
#[test]
fn hot_cache_does_not_serve_aligned_requests() {
    let (pa, mut fa) = fresh(&[(0x1000, 0x1100)]);
    // Put an unaligned order-0 block on top of the hot cache.
    let a = fa.alloc_frozen(0, FrozenKind::Guard).unwrap();
    let b = fa.alloc_frozen(0, FrozenKind::Guard).unwrap();
    assert_eq!(b.0 % 64, 1);
    fa.free_frozen(b, 0).unwrap();
    assert!(pa.word(b).unwrap().is_free_cached());
    let f = fa.alloc_folio_aligned(0, 6, Owner::Buddy).unwrap();
    assert_eq!(f.pfn().0 % 64, 0, "{:?}", f.pfn());
    let g = fa.alloc_frozen_aligned(0, 5, FrozenKind::Guard).unwrap();
    assert_eq!(g.0 % 32, 0, "{g:?}");
    fa.free_frozen(g, 0).unwrap();
    fa.free_frozen(a, 0).unwrap();
    let _ = fa.put(f).unwrap();
    fa.check_consistency().unwrap();
}

/// An alignment above [`MAX_ORDER`] is an invalid order, like an order is.
#[test]
fn alignment_above_max_order_is_refused() {
    let (_, mut fa) = fresh(&[(0, 0x100)]);
    for align in [MAX_ORDER + 1, 40, 63, 64, 200] {
        let e = Some(FrameError::InvalidOrder { order: align });
        assert_eq!(fa.alloc_folio_aligned(0, align, Owner::Buddy).err(), e);
        assert_eq!(
            fa.alloc_frozen_aligned(0, align, FrozenKind::Guard).err(),
            e
        );
    }
    assert_eq!(fa.count(FrameType::Free), 0x100);
    fa.check_consistency().unwrap();
}

/// Merging stops exactly at [`MAX_ORDER`]: two order-18 buddies stay two
/// blocks, and two order-17 halves merge back into order 18.
#[test]
#[cfg_attr(miri, ignore)] // 2^19 words; the same paths run in smaller tests.
fn merges_stop_at_max_order() {
    let (_, mut fa) = fresh(&[(1 << 19, 1 << 20)]);
    assert_eq!(fa.free_blocks(MAX_ORDER), 2);
    let a = fa.alloc_frozen(MAX_ORDER - 1, FrozenKind::Offline).unwrap();
    let b = fa.alloc_frozen(MAX_ORDER - 1, FrozenKind::Offline).unwrap();
    assert_eq!(a.0 ^ b.0, 1 << (MAX_ORDER - 1));
    assert_eq!(fa.free_blocks(MAX_ORDER), 1);
    fa.free_frozen(b, MAX_ORDER - 1).unwrap();
    fa.free_frozen(a, MAX_ORDER - 1).unwrap();
    assert_eq!(fa.free_blocks(MAX_ORDER), 2);
    assert_eq!(fa.free_blocks(MAX_ORDER - 1), 0);
    let c = fa.alloc_frozen(0, FrozenKind::Guard).unwrap();
    fa.free_frozen(c, 0).unwrap();
    fa.drain_cache();
    assert_eq!(fa.free_blocks(MAX_ORDER), 2);
    fa.check_consistency().unwrap();
}

/// Freed blocks merge with both buddies, lower and upper, and the
/// consistency check says so when two free buddies are left unmerged.
#[test]
fn frees_merge_with_both_buddies() {
    let (_, mut fa) = fresh(&[(0x400, 0x800)]);
    // Order 4 is above the hot caches: frees go straight to the buddy.
    let blocks: Vec<Pfn> = (0..4)
        .map(|_| fa.alloc_frozen(4, FrozenKind::Guard).unwrap())
        .collect();
    // Free the upper buddies first, then the lower ones, and the reverse.
    for &i in &[1usize, 0, 2, 3] {
        fa.free_frozen(blocks[i], 4).unwrap();
        fa.check_consistency().unwrap();
    }
    assert_eq!(fa.free_blocks(10), 1);
    // An unmerged pair of free buddies is an inconsistency.
    let (pa, mut fa) = fresh(&[(0x400, 0x440)]);
    let x = fa.alloc_frozen(5, FrozenKind::Guard).unwrap();
    let y = fa.alloc_frozen(5, FrozenKind::Guard).unwrap();
    assert_eq!((x, y), (Pfn(0x400), Pfn(0x420)));
    fa.free_frozen(x, 5).unwrap();
    fa.free_frozen(y, 5).unwrap();
    fa.check_consistency().unwrap();
    // Split the order-6 block by hand into two free order-5 heads.
    let w = pa.load(0);
    fa.lists.unlink(pa, 0, w, 6);
    fa.lists.push(pa, 0x20, 5);
    fa.lists.push(pa, 0, 5);
    let e = fa.check_consistency().unwrap_err();
    assert_eq!(e.pfn, Pfn(0x400));
    assert_eq!(e.what, Inconsistency::NotMerged);
}

/// A free folio descriptor whose count is not 0 (raised through the raw
/// descriptor API after its folio was freed) is corrupt: the allocator
/// refuses it with a typed error and never hands it out.
#[test]
fn corrupt_free_descriptor_is_not_reused() {
    let (_, mut fa) = fresh(&[(0x100, 0x110)]);
    let f = fa.alloc_folio(0, Owner::Buddy).unwrap();
    let d = f.desc();
    assert!(fa.put(f).unwrap().is_some());
    assert_eq!(d.unfreeze(5), Ok(()));
    assert!(matches!(
        fa.alloc_folio(0, Owner::Buddy).err(),
        Some(FrameError::Corrupt { .. })
    ));
    let g = fa.alloc_folio(0, Owner::Buddy).unwrap();
    assert!(!core::ptr::eq(g.desc(), d));
    assert_eq!(g.refcount(), 1);
    let _ = fa.put(g).unwrap();
    fa.check_consistency().unwrap();
}
