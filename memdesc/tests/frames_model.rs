//! Property-based model test of the frame allocator: random sequences of
//! alloc/free/get/put/freeze/unfreeze/poison/offline/online against a simple
//! per-frame model, checking after every step that each frame is in exactly
//! the state the model says, that all counts agree, and that the allocator's
//! own consistency walk (free lists, tails, folio coverage, fully merged)
//! passes. Half the cases take descriptor memory from the allocator's own
//! frames, so descriptor growth competes with the operation for frames;
//! every owner kind is used and the owner dispatch of the last `put` is
//! checked against the owner the model recorded.
#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use core::ptr::NonNull;
use memdesc::frames::*;
use memdesc::Pfn;
use proptest::prelude::*;
use std::collections::BTreeMap;

mod common;

use common::page_array::leaked_page_array;

/// Descriptor memory: leaked boxes, or (`from_frames`) frames the
/// allocator takes from itself, mapped to leaked boxes.
struct Mem {
    from_frames: bool,
}
fn leaked_chunk() -> NonNull<u8> {
    NonNull::from(Box::leak(Box::new(DescChunk::ZERO))).cast()
}
// SAFETY: every chunk is a fresh, leaked, page-aligned box.
unsafe impl DescMemory for Mem {
    fn chunk(&mut self) -> Option<NonNull<u8>> {
        (!self.from_frames).then(leaked_chunk)
    }
    fn map_frame(&mut self, _pfn: Pfn) -> Option<NonNull<u8>> {
        Some(leaked_chunk())
    }
}

const RANGES: [(u64, u64); 2] = [(0x1000, 0x1100), (0x2003, 0x2050)];
const RESERVED: (u64, u64) = (0x1000, 0x1004);
/// Owner-map value of the reserved range.
const IMAGE: u64 = u64::MAX;
/// Owner-map value of a frame the allocator took for descriptor memory.
const DESC: u64 = u64::MAX - 1;

enum Kind {
    Folio {
        refs: Vec<FolioRef>,
        frozen: Option<FrozenFolio>,
        owner: Owner,
    },
    Frozen(FrozenKind),
}

struct Alloc {
    pfn: u64,
    order: u8,
    kind: Kind,
}

struct Model {
    pa: &'static PageArray<'static>,
    fa: FrameAllocator<'static, Mem>,
    from_frames: bool,
    pfns: Vec<u64>,
    /// Allocation id owning each frame (by PFN); reserved frames map to u64::MAX.
    owner: BTreeMap<u64, u64>,
    poisoned: BTreeMap<u64, ()>,
    allocs: BTreeMap<u64, Alloc>,
    next_id: u64,
}

impl Model {
    fn new(from_frames: bool) -> Self {
        let ranges: Vec<PfnRange> = RANGES
            .iter()
            .map(|&(s, e)| PfnRange::new(Pfn(s), Pfn(e)))
            .collect();
        let pa: &'static PageArray = leaked_page_array(&ranges);
        let fa = FrameAllocator::new(
            pa,
            Mem { from_frames },
            &[ReservedRange {
                range: PfnRange::new(Pfn(RESERVED.0), Pfn(RESERVED.1)),
                kind: ReservedKind::Image,
            }],
        )
        .unwrap();
        let pfns = ranges.iter().flat_map(|r| r.start.0..r.end.0).collect();
        let mut owner = BTreeMap::new();
        for p in RESERVED.0..RESERVED.1 {
            owner.insert(p, IMAGE);
        }
        Self {
            pa,
            fa,
            from_frames,
            pfns,
            owner,
            poisoned: BTreeMap::new(),
            allocs: BTreeMap::new(),
            next_id: 0,
        }
    }

    fn expected_type(&self, p: u64) -> FrameType {
        if self.poisoned.contains_key(&p) {
            return FrameType::HwPoison;
        }
        match self.owner.get(&p) {
            None => FrameType::Free,
            Some(&IMAGE) | Some(&DESC) => FrameType::Reserved,
            Some(id) => match &self.allocs[id].kind {
                Kind::Folio { .. } => FrameType::Folio,
                Kind::Frozen(FrozenKind::PageTable) => FrameType::PageTable,
                Kind::Frozen(FrozenKind::Slab) => FrameType::Slab,
                Kind::Frozen(FrozenKind::Offline) => FrameType::Offline,
                Kind::Frozen(FrozenKind::Guard) => FrameType::Guard,
            },
        }
    }

    fn add(&mut self, pfn: u64, order: u8, kind: Kind) {
        let id = self.next_id;
        self.next_id += 1;
        for p in pfn..pfn + (1 << order) {
            assert!(
                !self.poisoned.contains_key(&p),
                "handed out a poisoned frame"
            );
            assert!(
                self.owner.insert(p, id).is_none(),
                "handed out a frame twice"
            );
        }
        self.allocs.insert(id, Alloc { pfn, order, kind });
    }

    fn remove(&mut self, id: u64) -> Alloc {
        let a = self.allocs.remove(&id).unwrap();
        for p in a.pfn..a.pfn + (1 << a.order) {
            self.owner.remove(&p);
        }
        a
    }

    fn nth_alloc(&self, sel: u16, pred: impl Fn(&Alloc) -> bool) -> Option<u64> {
        let ids: Vec<u64> = self
            .allocs
            .iter()
            .filter(|(_, a)| pred(a))
            .map(|(&id, _)| id)
            .collect();
        (!ids.is_empty()).then(|| ids[sel as usize % ids.len()])
    }

    /// Descriptor growth may fail only when it has no frame to take.
    fn out_of_descriptors_ok(&self, free_left: u64) -> bool {
        self.from_frames && self.fa.count(FrameType::Free) <= free_left
    }

    /// Frames the allocator took for descriptor memory since the last step
    /// must have been free in the model.
    fn sync_descriptor_frames(&mut self) {
        for i in 0..self.pfns.len() {
            let p = self.pfns[i];
            let w = self.pa.word(Pfn(p)).unwrap();
            let desc = w.frame_type() == Some(FrameType::Reserved)
                && ReservedKind::from_subtype(w.subtype()) == ReservedKind::DescriptorCache;
            if desc && self.owner.get(&p) != Some(&DESC) {
                assert!(self.from_frames, "descriptor frame {p:#x} from nowhere");
                assert_eq!(
                    self.expected_type(p),
                    FrameType::Free,
                    "descriptor memory took frame {p:#x} from its owner"
                );
                self.owner.insert(p, DESC);
            }
        }
    }

    fn pick_owner(a: u16) -> Owner {
        match a % 8 {
            0 | 1 => Owner::Balloon,
            2 => Owner::Pool(a >> 3),
            3 => Owner::SharedMemory(a >> 3),
            _ => Owner::Buddy,
        }
    }

    fn step(&mut self, op: u8, a: u16, b: u8) {
        let order = [0u8, 0, 0, 1, 1, 2, 3, 5][b as usize % 8];
        match op % 13 {
            0 => {
                let owner = Self::pick_owner(a);
                match self.fa.alloc_folio(order, owner) {
                    Ok(f) => {
                        assert_eq!(f.refcount(), 1);
                        assert_eq!(f.owner(), owner);
                        let pfn = f.pfn().0;
                        self.add(
                            pfn,
                            order,
                            Kind::Folio {
                                refs: vec![f],
                                frozen: None,
                                owner,
                            },
                        );
                    }
                    Err(FrameError::OutOfMemory { order: o }) => {
                        assert_eq!(o, order);
                        for k in order..=MAX_ORDER {
                            assert_eq!(self.fa.free_blocks(k), 0);
                        }
                    }
                    Err(FrameError::OutOfDescriptors { .. }) if self.out_of_descriptors_ok(0) => {}
                    Err(e) => panic!("alloc_folio: {e:?}"),
                }
            }
            1 => {
                let kind = [
                    FrozenKind::PageTable,
                    FrozenKind::Slab,
                    FrozenKind::Offline,
                    FrozenKind::Guard,
                ][a as usize % 4];
                let order = if kind == FrozenKind::PageTable {
                    0
                } else {
                    order
                };
                match self.fa.alloc_frozen(order, kind) {
                    Ok(p) => self.add(p.0, order, Kind::Frozen(kind)),
                    Err(FrameError::OutOfMemory { .. }) => {
                        assert_eq!(self.fa.free_blocks(order), 0)
                    }
                    Err(FrameError::OutOfDescriptors { .. }) if self.out_of_descriptors_ok(0) => {}
                    Err(e) => panic!("alloc_frozen: {e:?}"),
                }
            }
            2 | 3 => {
                // get by PFN (speculative lookup), any frame
                let p = self.pfns[a as usize % self.pfns.len()];
                let got = self.pa.get_folio(Pfn(p), |_| panic!("no race here"));
                let ty = self.expected_type(p);
                match (ty, got) {
                    (FrameType::Folio, got) => {
                        let id = self.owner[&p];
                        let Kind::Folio { refs, frozen, .. } =
                            &mut self.allocs.get_mut(&id).unwrap().kind
                        else {
                            unreachable!()
                        };
                        if frozen.is_some() {
                            assert_eq!(got.err(), Some(FrameError::Frozen { pfn: Pfn(p) }));
                        } else {
                            let r = got.unwrap();
                            assert_eq!(r.refcount() as usize, refs.len() + 1);
                            refs.push(r);
                        }
                    }
                    (FrameType::Free, got) => {
                        assert_eq!(got.err(), Some(FrameError::Free { pfn: Pfn(p) }))
                    }
                    (FrameType::HwPoison, got) => {
                        assert_eq!(got.err(), Some(FrameError::HwPoisoned { pfn: Pfn(p) }))
                    }
                    (FrameType::Offline, got) => {
                        assert_eq!(got.err(), Some(FrameError::Offline { pfn: Pfn(p) }))
                    }
                    (t, got) => assert_eq!(
                        got.err(),
                        Some(FrameError::WrongType {
                            pfn: Pfn(p),
                            found: t
                        })
                    ),
                }
            }
            4 | 5 => {
                // put; the last one is dispatched on the recorded owner
                let Some(id) = self.nth_alloc(
                    a,
                    |x| matches!(&x.kind, Kind::Folio { refs, .. } if !refs.is_empty()),
                ) else {
                    return;
                };
                let al = self.allocs.get_mut(&id).unwrap();
                let Kind::Folio {
                    refs,
                    frozen,
                    owner: want,
                } = &mut al.kind
                else {
                    unreachable!()
                };
                let want = *want;
                let r = refs.swap_remove(b as usize % refs.len());
                let last = refs.is_empty();
                match self.fa.put(r).unwrap() {
                    None => assert!(!last),
                    Some(Released::Freed { pfn, order }) => {
                        assert!(last);
                        assert_eq!(want, Owner::Buddy, "an owned folio went to the buddy");
                        assert_eq!((pfn.0, order), (al.pfn, al.order));
                        self.remove(id);
                    }
                    Some(Released::ToOwner { owner, folio }) => {
                        assert!(last);
                        assert_ne!(want, Owner::Buddy, "a buddy folio went to an owner");
                        assert_eq!(owner, want);
                        assert_eq!(folio.frozen_refs(), 0);
                        assert_eq!((folio.pfn().0, folio.order()), (al.pfn, al.order));
                        *frozen = Some(folio);
                    }
                }
            }
            6 => {
                // freeze
                let Some(id) = self.nth_alloc(
                    a,
                    |x| matches!(&x.kind, Kind::Folio { refs, .. } if !refs.is_empty()),
                ) else {
                    return;
                };
                let Kind::Folio { refs, frozen, .. } = &mut self.allocs.get_mut(&id).unwrap().kind
                else {
                    unreachable!()
                };
                let n = refs.len() as u32;
                let r = refs.pop().unwrap();
                if n == 1 {
                    *frozen = Some(r.freeze(1).map_err(|_| ()).unwrap());
                } else {
                    let e = match r.freeze(1) {
                        Err(e) => e,
                        Ok(_) => panic!("froze with {n} references"),
                    };
                    assert_eq!(e.actual, n);
                    refs.push(e.folio);
                }
            }
            7 => {
                // unfreeze, or free/offline a frozen folio
                let Some(id) = self.nth_alloc(a, |x| {
                    matches!(
                        &x.kind,
                        Kind::Folio {
                            frozen: Some(_),
                            ..
                        }
                    )
                }) else {
                    return;
                };
                let al = self.allocs.get_mut(&id).unwrap();
                let Kind::Folio { refs, frozen, .. } = &mut al.kind else {
                    unreachable!()
                };
                let mut f = frozen.take().unwrap();
                match b % 3 {
                    0 => {
                        if f.frozen_refs() == 1 {
                            // Frozen at 1 by `freeze(1)`: 2 is the wrong count.
                            let e = f.unfreeze(core::num::NonZeroU32::new(2).unwrap());
                            let e = e.err().expect("unfreeze with the wrong count");
                            assert_eq!(
                                e.error,
                                FrameError::RefcountMismatch {
                                    pfn: Pfn(al.pfn),
                                    actual: 1
                                }
                            );
                            assert_eq!(e.folio.desc().refcount(), 0);
                            f = e.folio;
                        }
                        refs.push(f.unfreeze(core::num::NonZeroU32::MIN).ok().unwrap())
                    }
                    1 => {
                        self.fa.free_frozen_folio(f).unwrap();
                        self.remove(id);
                    }
                    _ => {
                        self.fa.offline_folio(f).unwrap();
                        al.kind = Kind::Frozen(FrozenKind::Offline);
                    }
                }
            }
            8 => {
                // poison any frame
                let p = self.pfns[a as usize % self.pfns.len()];
                let ty = self.expected_type(p);
                match self.fa.poison(Pfn(p)) {
                    Ok(Poisoned::WasFree) => assert_eq!(ty, FrameType::Free),
                    Ok(Poisoned::InUse(t)) => assert_eq!(t, ty),
                    Err(FrameError::AlreadyPoisoned { .. }) => assert_eq!(ty, FrameType::HwPoison),
                    Err(FrameError::OutOfDescriptors { .. })
                        if self.out_of_descriptors_ok((ty == FrameType::Free) as u64) =>
                    {
                        return
                    }
                    Err(e) => panic!("poison: {e:?}"),
                }
                self.poisoned.insert(p, ());
            }
            9 => {
                // free a frozen allocation
                let Some(id) = self.nth_alloc(a, |x| matches!(x.kind, Kind::Frozen(_))) else {
                    return;
                };
                let (pfn, order) = (self.allocs[&id].pfn, self.allocs[&id].order);
                self.fa.free_frozen(Pfn(pfn), order).unwrap();
                self.remove(id);
            }
            10 => {
                // offline a frozen allocation, or online an offline one
                let Some(id) = self.nth_alloc(a, |x| matches!(x.kind, Kind::Frozen(_))) else {
                    return;
                };
                let from_frames = self.from_frames;
                let free_now = self.fa.count(FrameType::Free);
                let al = self.allocs.get_mut(&id).unwrap();
                let (pfn, order) = (Pfn(al.pfn), al.order);
                if matches!(al.kind, Kind::Frozen(FrozenKind::Offline)) {
                    let owner = Self::pick_owner(b as u16);
                    match self.fa.online(pfn, order, owner) {
                        Ok(f) => {
                            assert_eq!(f.owner(), owner);
                            al.kind = Kind::Folio {
                                refs: vec![f],
                                frozen: None,
                                owner,
                            };
                        }
                        Err(FrameError::OutOfDescriptors { .. })
                            if from_frames && free_now == 0 => {}
                        Err(e) => panic!("online: {e:?}"),
                    }
                } else {
                    self.fa.offline(pfn, order).unwrap();
                    al.kind = Kind::Frozen(FrozenKind::Offline);
                }
            }
            11 => {
                // allocate at a given place: the model knows whether it is free
                // Half the time one of the frames descriptor growth takes
                // first (the lowest free blocks at start): the allocation
                // must not lose the race for its own frame.
                let p = if b & 0x80 != 0 {
                    [0x2003, 0x1004, 0x1005, 0x2004][a as usize % 4]
                } else {
                    self.pfns[a as usize % self.pfns.len()]
                };
                let kind = [None, Some(FrozenKind::PageTable), Some(FrozenKind::Guard)]
                    [b as usize / 8 % 3];
                let order = if kind == Some(FrozenKind::PageTable) {
                    0
                } else {
                    order
                };
                let p = p & !((1u64 << order) - 1);
                let want = match RANGES.iter().find(|&&(s, e)| (s..e).contains(&p)) {
                    None => Err(FrameError::NotManaged { pfn: Pfn(p) }),
                    Some(&(_, e)) if p + (1 << order) > e => {
                        Err(FrameError::NotManaged { pfn: Pfn(e) })
                    }
                    Some(_) => (p..p + (1 << order))
                        .find_map(|q| match self.expected_type(q) {
                            FrameType::Free => None,
                            FrameType::HwPoison => Some(FrameError::HwPoisoned { pfn: Pfn(q) }),
                            _ => Some(FrameError::NotFree { pfn: Pfn(q) }),
                        })
                        .map_or(Ok(()), Err),
                };
                let got = match kind {
                    None => {
                        let owner = Self::pick_owner(a);
                        self.fa.alloc_folio_at(Pfn(p), order, owner).map(|f| {
                            assert_eq!((f.pfn(), f.order(), f.owner()), (Pfn(p), order, owner));
                            Kind::Folio {
                                refs: vec![f],
                                frozen: None,
                                owner,
                            }
                        })
                    }
                    Some(k) => self
                        .fa
                        .alloc_frozen_at(Pfn(p), order, k)
                        .map(|()| Kind::Frozen(k)),
                };
                match (want, got) {
                    (Ok(()), Ok(kind)) => self.add(p, order, kind),
                    (Ok(()), Err(FrameError::OutOfDescriptors { .. }))
                        if self.out_of_descriptors_ok(1 << order) => {}
                    (want, got) => assert_eq!(want, got.map(drop), "alloc at {p:#x} order {order}"),
                }
            }
            _ => {
                // Reserved frames (the image, descriptor memory) are not
                // frozen allocations: free_frozen refuses them.
                let reserved: Vec<u64> = self
                    .owner
                    .iter()
                    .filter(|&(p, &id)| {
                        (id == IMAGE || id == DESC) && !self.poisoned.contains_key(p)
                    })
                    .map(|(&p, _)| p)
                    .collect();
                if reserved.is_empty() {
                    return;
                }
                let p = reserved[a as usize % reserved.len()];
                let kind = if self.owner[&p] == DESC {
                    ReservedKind::DescriptorCache
                } else {
                    ReservedKind::Image
                };
                assert_eq!(
                    self.fa.free_frozen(Pfn(p), 0),
                    Err(FrameError::Reserved { pfn: Pfn(p), kind })
                );
            }
        }
    }

    fn check(&mut self) {
        self.sync_descriptor_frames();
        self.fa.check_consistency().unwrap();
        let mut counts = [0u64; FrameType::COUNT];
        for &p in &self.pfns {
            let want = self.expected_type(p);
            let got = self.pa.word(Pfn(p)).unwrap().frame_type();
            assert_eq!(got, Some(want), "frame {p:#x}");
            counts[want.index()] += 1;
        }
        for t in FrameType::ALL {
            assert_eq!(self.fa.count(t), counts[t.index()], "{t:?} count");
        }
        let live_folios = self
            .allocs
            .values()
            .filter(|a| matches!(a.kind, Kind::Folio { .. }))
            .count() as u64;
        assert_eq!(self.fa.stats().live_descs[0], live_folios);
        for a in self.allocs.values() {
            if let Kind::Folio {
                refs,
                frozen,
                owner,
            } = &a.kind
            {
                let n = if frozen.is_some() {
                    0
                } else {
                    refs.len() as u32
                };
                if let Some(r) = refs.first() {
                    assert_eq!(r.refcount(), n);
                    assert_eq!((r.pfn().0, r.order(), r.owner()), (a.pfn, a.order, *owner));
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn frames_match_the_model(
        from_frames in any::<bool>(),
        ops in proptest::collection::vec((any::<u8>(), any::<u16>(), any::<u8>()), 1..120),
    ) {
        let mut m = Model::new(from_frames);
        m.check();
        for (op, a, b) in ops {
            m.step(op, a, b);
            m.check();
        }
        // Drain: everything not poisoned or reserved comes back.
        let ids: Vec<u64> = m.allocs.keys().copied().collect();
        for id in ids {
            let a = m.remove(id);
            match a.kind {
                Kind::Folio { mut refs, frozen, .. } => {
                    if let Some(f) = frozen {
                        m.fa.free_frozen_folio(f).unwrap();
                    }
                    while let Some(r) = refs.pop() {
                        if let Some(Released::ToOwner { folio, .. }) = m.fa.put(r).unwrap() {
                            m.fa.free_frozen_folio(folio).unwrap()
                        }
                    }
                }
                Kind::Frozen(_) => m.fa.free_frozen(Pfn(a.pfn), a.order).unwrap(),
            }
        }
        m.check();
        let healthy = m
            .pfns
            .iter()
            .filter(|&&p| !m.poisoned.contains_key(&p) && !m.owner.contains_key(&p))
            .count() as u64;
        prop_assert_eq!(m.fa.count(FrameType::Free), healthy);
    }
}
