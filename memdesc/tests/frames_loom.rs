//! Loom model of the speculative `pfn -> folio` lookup racing with a free of
//! that folio and a reuse of its descriptor for another frame.
//!
//! The shipping code is instantiated with loom atomics through [`Atomics`]:
//! page-array words and descriptor fields become loom cells, so every
//! interleaving (and every stale value a relaxed or acquire load may see) of
//! `get_folio` against `put` -> `release` -> `alloc_frozen` -> `alloc_folio`
//! -> `put` is explored.
#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use core::ptr::NonNull;
use loom::sync::atomic::Ordering;
use loom::sync::{Arc, Mutex};
use memdesc::frames::*;
use memdesc::Pfn;

macro_rules! loom_cell {
    ($name:ident, $atomic:ty, $int:ty) => {
        struct $name($atomic);
        impl AtomicCell<$int> for $name {
            fn new(v: $int) -> Self {
                Self(<$atomic>::new(v))
            }
            fn load(&self, o: Ordering) -> $int {
                self.0.load(o)
            }
            fn store(&self, v: $int, o: Ordering) {
                self.0.store(v, o)
            }
            fn compare_exchange(
                &self,
                c: $int,
                n: $int,
                s: Ordering,
                f: Ordering,
            ) -> Result<$int, $int> {
                self.0.compare_exchange(c, n, s, f)
            }
            fn fetch_add(&self, v: $int, o: Ordering) -> $int {
                self.0.fetch_add(v, o)
            }
            fn fetch_sub(&self, v: $int, o: Ordering) -> $int {
                self.0.fetch_sub(v, o)
            }
            fn fetch_or(&self, v: $int, o: Ordering) -> $int {
                self.0.fetch_or(v, o)
            }
            fn fetch_and(&self, v: $int, o: Ordering) -> $int {
                self.0.fetch_and(v, o)
            }
        }
    };
}
loom_cell!(LoomU32, loom::sync::atomic::AtomicU32, u32);
loom_cell!(LoomU64, loom::sync::atomic::AtomicU64, u64);

struct LoomAtomics;
impl Atomics for LoomAtomics {
    type U32 = LoomU32;
    type U64 = LoomU64;
    fn fence(order: Ordering) {
        loom::sync::atomic::fence(order)
    }
}

struct Leak;
// SAFETY: every chunk is a fresh, leaked, page-aligned box.
unsafe impl DescMemory for Leak {
    fn chunk(&mut self) -> Option<NonNull<u8>> {
        Some(NonNull::from(Box::leak(Box::new(DescChunk::ZERO))).cast())
    }
}

type Alloc = FrameAllocator<'static, Leak, LoomAtomics>;

/// Outcomes seen across all explored interleavings: reader kept the victim,
/// reader saw it frozen mid-free, free, or already a guard frame, and the
/// reader's retry path released a reused descriptor.
static SEEN: [std::sync::atomic::AtomicUsize; 5] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 5];

fn seen(i: usize) {
    SEEN[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn speculative_lookup_races_free_and_descriptor_reuse() {
    // No preemption bound: the exploration is exhaustive (about 4 200
    // interleavings, a few seconds in the dev profile).
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = None;
    builder.check(|| {
        let ranges = [PfnRange::new(Pfn(0x10), Pfn(0x14))];
        let storage: &'static mut [LoomU64] = Box::leak((0..4).map(|_| LoomU64::new(0)).collect());
        let pa: &'static PageArray<'static, LoomAtomics> =
            Box::leak(Box::new(PageArray::new(storage, &ranges).unwrap()));
        let mut fa: Alloc = FrameAllocator::new(pa, Leak, &[]).unwrap();
        let victim = fa.alloc_folio(0, Owner::Buddy).unwrap();
        let keeper = fa.alloc_folio(0, Owner::Buddy).unwrap();
        let target = victim.pfn();
        assert_eq!(target, Pfn(0x10));
        let victim_desc = victim.desc() as *const FolioDesc<LoomAtomics> as usize;
        let fa = Arc::new(Mutex::new(fa));

        let fa2 = fa.clone();
        let reader = loom::thread::spawn(move || {
            let r = pa.get_folio(target, |last| {
                // The retry path dropped the last reference of a reused
                // descriptor: release it like the firmware would.
                seen(4);
                let rel = fa2.lock().unwrap().release(last).unwrap();
                assert!(matches!(rel, Released::Freed { .. }));
            });
            r.map(|f| {
                // A reference we keep must be to the folio at `target`.
                assert_eq!(f.pfn(), target);
                assert!(f.refcount() >= 1);
                f.into_raw() as *const FolioDesc<LoomAtomics> as usize
            })
        });

        // The owner drops the folio; if that was the last reference the
        // frame becomes a guard frame and the descriptor is reused at once
        // for a folio elsewhere, which is then dropped too.
        {
            let mut g = fa.lock().unwrap();
            if let Some(rel) = g.put(victim).unwrap() {
                assert!(matches!(rel, Released::Freed { pfn, order: 0 } if pfn == target));
                assert_eq!(g.alloc_frozen(0, FrozenKind::Guard).unwrap(), target);
                let reuse = g.alloc_folio(0, Owner::Buddy).unwrap();
                assert_eq!(reuse.desc() as *const _ as usize, victim_desc);
                assert_ne!(reuse.pfn(), target);
                drop(g);
                let again = reuse.try_clone().unwrap();
                let mut g = fa.lock().unwrap();
                let _ = g.put(again).unwrap();
                let _ = g.put(reuse).unwrap();
            }
        }

        let got = reader.join().unwrap();
        let mut g = fa.lock().unwrap();
        match got {
            Ok(addr) => {
                seen(0);
                // The reader won: it holds the victim, which was never freed.
                assert_eq!(addr, victim_desc);
                assert_eq!(g.count(FrameType::Guard), 0);
                // SAFETY-free re-wrap: `addr` is the reference the reader kept.
                let f = FolioRef::from_raw(victim_desc_ref(&g, target));
                assert_eq!(f.refcount(), 1);
                assert!(matches!(g.put(f).unwrap(), Some(Released::Freed { .. })));
            }
            Err(FrameError::Frozen { pfn })
            | Err(FrameError::Free { pfn })
            | Err(FrameError::WrongType {
                pfn,
                found: FrameType::Guard,
            }) => {
                seen(match got {
                    Err(FrameError::Frozen { .. }) => 1,
                    Err(FrameError::Free { .. }) => 2,
                    _ => 3,
                });
                assert_eq!(pfn, target);
                assert_eq!(g.count(FrameType::Guard), 1);
            }
            Err(e) => panic!("unexpected lookup result {e:?}"),
        }
        // Whoever dropped the last reference of the reused folio freed it.
        assert_eq!(g.count(FrameType::Folio), 1);
        assert_eq!(keeper.refcount(), 1);
        g.check_consistency().unwrap();
        let _ = g.put(keeper).unwrap();
        g.check_consistency().unwrap();
    });
    let seen: Vec<usize> = SEEN
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    eprintln!("loom outcomes [kept, frozen, free, guard, retry-released]: {seen:?}");
    // Every branch of the race must have been reached.
    assert!(seen.iter().all(|&n| n > 0), "unexplored outcome: {seen:?}");
}

/// The descriptor the word at `pfn` points to (the test still holds a
/// reference to it, so it is a live folio).
fn victim_desc_ref(g: &Alloc, pfn: Pfn) -> &'static FolioDesc<LoomAtomics> {
    let r = g.page_array().get_folio(pfn, |_| unreachable!()).unwrap();
    let d = r.desc();
    // Give back the extra reference taken just now.
    assert!(r.put().unwrap().is_none());
    d
}
