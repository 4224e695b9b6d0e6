//! Loom models of the lock-free frame paths racing the allocator.
//!
//! The shipping code is instantiated with loom atomics through [`Atomics`]:
//! page-array words and descriptor fields become loom cells, so every
//! interleaving (and every stale value a relaxed or acquire load may see) is
//! explored. Folio contents are a loom `UnsafeCell`, so a missing
//! happens-before between a holder's access and the next owner's (a
//! `Relaxed` where a `Release` belongs) is reported as a data race.
//!
//! - the speculative lookup racing a free and a descriptor reuse for
//!   another frame, with a Buddy or a Balloon owner in the retry path;
//! - the lookup racing a reuse of the descriptor *at the same frame* (the
//!   word reads the same before and after: only the refcount orders the
//!   reader after the new owner's writes);
//! - freeze/unfreeze racing a lookup; poison racing a lookup;
//! - two readers racing the owner's last `put`;
//! - a page-table descriptor reused for another frame racing a lock-free
//!   `page_table` lookup (the `publish_frozen` fence).
#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

mod common;

use common::leak::Leak;
use common::loom_atomics::LoomAtomics;
use common::page_array::leaked_page_array_at;
use common::seen::Seen;
use loom::sync::{Arc, Mutex};
use memdesc::frames::*;
use memdesc::Pfn;

type Alloc = FrameAllocator<'static, Leak, LoomAtomics>;
type Shared = Arc<Mutex<Alloc>>;

/// A loom model run: exhaustive unless `bound` limits preemptions.
fn model(bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = bound;
    builder.check(f);
}

/// A page array over `[0x10, 0x10 + frames)` and its allocator.
fn setup(frames: u64) -> (&'static PageArray<'static, LoomAtomics>, Alloc) {
    let pa = leaked_page_array_at(0x10, frames);
    (pa, FrameAllocator::new(pa, Leak, &[]).unwrap())
}

fn addr(d: &FolioDesc<LoomAtomics>) -> usize {
    d as *const FolioDesc<LoomAtomics> as usize
}

/// The contents of a folio's frames, as far as the models care: one cell
/// that holders read and that whoever gets the frames next writes.
#[derive(Clone)]
struct Contents(Arc<loom::cell::UnsafeCell<u32>>);

impl Contents {
    fn new() -> Self {
        Self(Arc::new(loom::cell::UnsafeCell::new(0)))
    }
    /// A holder of a reference reads.
    fn read(&self) -> u32 {
        // SAFETY: loom checks that no write races with this read; a race is
        // the failure the models look for, reported before any access.
        self.0.with(|p| unsafe { *p })
    }
    /// The exclusive owner (frozen, or after the last put) writes.
    fn write(&self, v: u32) {
        // SAFETY: as in `read`: loom reports a racing access instead.
        self.0.with_mut(|p| unsafe { *p = v })
    }
}

static LOOKUP_BUDDY: Seen<5> = Seen::new();
static LOOKUP_BALLOON: Seen<5> = Seen::new();

/// The speculative lookup races a free of the folio and a reuse of its
/// descriptor for another frame: the frame becomes a guard frame and the
/// descriptor a folio of `reuse_owner` elsewhere, which is dropped at once.
/// If the reader's retry path drops the last reference of the reused folio,
/// it must release it like the firmware would, through the owner hook.
fn lookup_races_free_and_reuse(reuse_owner: Owner, seen: &'static Seen<5>) {
    // No preemption bound: the exploration is exhaustive.
    model(None, move || {
        let (pa, mut fa) = setup(4);
        let victim = fa.alloc_folio(0, Owner::Buddy).unwrap();
        let keeper = fa.alloc_folio(0, Owner::Buddy).unwrap();
        let target = victim.pfn();
        assert_eq!(target, Pfn(0x10));
        let victim_desc = addr(victim.desc());
        let fa: Shared = Arc::new(Mutex::new(fa));
        // Frozen folios handed to the balloon (by whoever dropped the last
        // reference of the reused folio).
        let balloon: Arc<Mutex<Vec<FrozenFolio<LoomAtomics>>>> = Arc::new(Mutex::new(Vec::new()));

        let (fa2, balloon2) = (fa.clone(), balloon.clone());
        let reader = loom::thread::spawn(move || {
            let r = pa.get_folio(target, |last| {
                seen.hit(4);
                match fa2.lock().unwrap().release(last).unwrap() {
                    Released::Freed { .. } => assert_eq!(reuse_owner, Owner::Buddy),
                    Released::ToOwner { owner, folio } => {
                        assert_eq!(owner, reuse_owner);
                        balloon2.lock().unwrap().push(folio);
                    }
                }
            });
            r.map(|f| {
                // A reference we keep must be to the folio at `target`.
                assert_eq!(f.pfn(), target);
                assert_eq!(f.owner(), Owner::Buddy);
                assert!(f.refcount() >= 1);
                addr(f.into_raw())
            })
        });

        {
            let mut g = fa.lock().unwrap();
            if let Some(rel) = g.put(victim).unwrap() {
                assert!(matches!(rel, Released::Freed { pfn, order: 0 } if pfn == target));
                assert_eq!(g.alloc_frozen(0, FrozenKind::Guard).unwrap(), target);
                let reuse = g.alloc_folio(0, reuse_owner).unwrap();
                assert_eq!(addr(reuse.desc()), victim_desc);
                assert_ne!(reuse.pfn(), target);
                drop(g);
                let again = reuse.try_clone().unwrap();
                let mut g = fa.lock().unwrap();
                for r in [again, reuse] {
                    if let Some(Released::ToOwner { owner, folio }) = g.put(r).unwrap() {
                        assert_eq!(owner, reuse_owner);
                        balloon.lock().unwrap().push(folio);
                    }
                }
            }
        }

        let got = reader.join().unwrap();
        let mut g = fa.lock().unwrap();
        match got {
            Ok(a) => {
                seen.hit(0);
                // The reader won: it holds the victim, which was never freed.
                assert_eq!(a, victim_desc);
                assert_eq!(g.count(FrameType::Guard), 0);
                // SAFETY: the reader gave up its counted reference with
                // `into_raw` and nobody else re-wraps it.
                let f = unsafe { FolioRef::from_raw(victim_desc_ref(&g, target)) };
                assert_eq!(f.refcount(), 1);
                assert!(matches!(g.put(f).unwrap(), Some(Released::Freed { .. })));
            }
            Err(FrameError::Frozen { pfn })
            | Err(FrameError::Free { pfn })
            | Err(FrameError::WrongType {
                pfn,
                found: FrameType::Guard,
            }) => {
                seen.hit(match got {
                    Err(FrameError::Frozen { .. }) => 1,
                    Err(FrameError::Free { .. }) => 2,
                    _ => 3,
                });
                assert_eq!(pfn, target);
                assert_eq!(g.count(FrameType::Guard), 1);
            }
            Err(e) => panic!("unexpected lookup result {e:?}"),
        }
        // Whoever dropped the last reference of the reused folio released
        // it: freed (Buddy) or handed, frozen, to the balloon exactly once.
        let mut handed = balloon.lock().unwrap();
        if reuse_owner == Owner::Buddy || g.count(FrameType::Guard) == 0 {
            assert!(handed.is_empty());
        } else {
            assert_eq!(handed.len(), 1);
            let folio = handed.pop().unwrap();
            assert_eq!(addr(folio.desc()), victim_desc);
            g.free_frozen_folio(folio).unwrap();
        }
        assert_eq!(g.count(FrameType::Folio), 1);
        assert_eq!(keeper.refcount(), 1);
        g.check_consistency().unwrap();
        let _ = g.put(keeper).unwrap();
        g.check_consistency().unwrap();
    });
}

#[test]
fn speculative_lookup_races_free_and_descriptor_reuse() {
    lookup_races_free_and_reuse(Owner::Buddy, &LOOKUP_BUDDY);
    LOOKUP_BUDDY.assert_all("kept, frozen, free, guard, retry-released");
}

#[test]
fn balloon_owner_in_the_retry_path() {
    lookup_races_free_and_reuse(Owner::Balloon, &LOOKUP_BALLOON);
    LOOKUP_BALLOON.assert_all("kept, frozen, free, guard, retry-released to balloon");
}

/// The descriptor is reused for a folio *at the same frame* and with another
/// owner: the word is the same value before and after, so the reader's
/// re-check cannot tell, and only the refcount (the `unfreeze` release
/// against the `try_get` acquire) orders the reader after the descriptor's
/// re-initialisation. No fence of the word publication helps: the reader
/// may take every word from before the reuse. (A speculative reference
/// gives no right to the frames' contents, so only the descriptor is read.)
#[test]
fn descriptor_reuse_at_the_same_frame() {
    static SEEN: Seen<3> = Seen::new();
    model(None, || {
        let (pa, mut fa) = setup(2);
        let victim = fa.alloc_folio(0, Owner::Buddy).unwrap();
        let target = victim.pfn();
        let fa: Shared = Arc::new(Mutex::new(fa));

        let fa2 = fa.clone();
        let reader = loom::thread::spawn(move || {
            let r = pa.get_folio(target, |_| unreachable!("the word never changes"));
            match r {
                Ok(f) => {
                    // Either incarnation, but never a half-initialised
                    // descriptor (or its free-list link read as metadata).
                    assert_eq!((f.pfn(), f.order()), (target, 0));
                    let owner = f.owner();
                    assert!(matches!(owner, Owner::Buddy | Owner::Pool(7)), "{owner:?}");
                    if let Some(last) = f.put().unwrap() {
                        let _ = fa2.lock().unwrap().release(last).unwrap();
                    }
                    Some(owner)
                }
                Err(FrameError::Frozen { pfn } | FrameError::Free { pfn }) => {
                    assert_eq!(pfn, target);
                    None
                }
                Err(e) => panic!("unexpected lookup result {e:?}"),
            }
        });

        let reused = {
            let mut g = fa.lock().unwrap();
            match g.put(victim).unwrap() {
                Some(Released::Freed { .. }) => {
                    let reuse = g.alloc_folio(0, Owner::Pool(7)).unwrap();
                    assert_eq!(reuse.pfn(), target);
                    drop(g);
                    let shared = reuse.try_clone().unwrap();
                    Some((reuse, shared))
                }
                None => None,
                Some(Released::ToOwner { .. }) => unreachable!(),
            }
        };
        let seen_owner = reader.join().unwrap();
        SEEN.hit(match seen_owner {
            Some(Owner::Pool(7)) => 0,
            Some(_) => 1,
            None => 2,
        });
        let mut g = fa.lock().unwrap();
        if let Some((reuse, shared)) = reused {
            for r in [shared, reuse] {
                if let Some(Released::ToOwner { folio, .. }) = g.put(r).unwrap() {
                    g.free_frozen_folio(folio).unwrap();
                }
            }
        } else {
            // The reader held the victim across the owner's put: it dropped
            // the last reference and released it.
            assert_eq!(seen_owner, Some(Owner::Buddy));
        }
        assert_eq!(g.count(FrameType::Folio), 0);
        g.check_consistency().unwrap();
    });
    SEEN.assert_all("new incarnation, old incarnation, refused");
}

/// The owner freezes its folio (freeze(1): no other reference), writes it
/// while exclusive, and unfreezes; a lookup races. The reader either got in
/// before the freeze (which then fails), is refused as Frozen, or gets in
/// after the unfreeze and must see the write.
#[test]
fn freeze_and_unfreeze_race_a_lookup() {
    static SEEN: Seen<3> = Seen::new();
    model(None, || {
        let (pa, mut fa) = setup(2);
        let f = fa.alloc_folio(0, Owner::Buddy).unwrap();
        let target = f.pfn();
        let contents = Contents::new();

        let c2 = contents.clone();
        let reader = loom::thread::spawn(move || match pa.get_folio(target, |_| unreachable!()) {
            Ok(r) => {
                let v = c2.read();
                assert!(r.put().unwrap().is_none(), "the owner keeps a reference");
                Some(v)
            }
            Err(FrameError::Frozen { pfn }) => {
                assert_eq!(pfn, target);
                None
            }
            Err(e) => panic!("unexpected lookup result {e:?}"),
        });

        let f = match f.freeze(1) {
            Ok(z) => {
                contents.write(1);
                z.unfreeze(core::num::NonZeroU32::MIN).ok().unwrap()
            }
            Err(e) => {
                assert_eq!(e.actual, 2);
                SEEN.hit(2);
                e.folio
            }
        };
        match reader.join().unwrap() {
            Some(1) => SEEN.hit(0),
            Some(_) => {}
            None => SEEN.hit(1),
        }
        assert!(matches!(fa.put(f).unwrap(), Some(Released::Freed { .. })));
        fa.check_consistency().unwrap();
    });
    SEEN.assert_all("after unfreeze, frozen, freeze refused");
}

/// A frame of a folio is poisoned while a lookup of it races: the reader
/// gets the folio (before the poison) or HwPoisoned, nothing else; the frame
/// never comes back when the folio is freed.
#[test]
fn poison_races_a_lookup() {
    static SEEN: Seen<2> = Seen::new();
    model(None, || {
        let (pa, mut fa) = setup(2);
        let f = fa.alloc_folio(1, Owner::Buddy).unwrap();
        let target = Pfn(f.pfn().0 + 1);
        let fa: Shared = Arc::new(Mutex::new(fa));

        let fa2 = fa.clone();
        let reader = loom::thread::spawn(move || {
            // The word changes under the reader when the frame is poisoned;
            // its retry may then drop the folio's last reference.
            let retry = |last| {
                let rel = fa2.lock().unwrap().release(last).unwrap();
                assert!(matches!(rel, Released::Freed { .. }));
            };
            match pa.get_folio(target, retry) {
                Ok(r) => {
                    assert_eq!((r.pfn(), r.order()), (Pfn(0x10), 1));
                    SEEN.hit(0);
                    if let Some(last) = r.put().unwrap() {
                        let rel = fa2.lock().unwrap().release(last).unwrap();
                        assert!(matches!(rel, Released::Freed { .. }));
                    }
                }
                Err(FrameError::HwPoisoned { pfn }) => {
                    assert_eq!(pfn, target);
                    SEEN.hit(1);
                }
                // The owner's last put, before its release rewrote the words.
                Err(FrameError::Frozen { pfn }) => assert_eq!(pfn, target),
                Err(e) => panic!("unexpected lookup result {e:?}"),
            }
        });
        {
            let mut g = fa.lock().unwrap();
            assert_eq!(g.poison(target), Ok(Poisoned::InUse(FrameType::Folio)));
            let _ = g.put(f).unwrap();
        }
        reader.join().unwrap();
        let g = fa.lock().unwrap();
        assert_eq!(g.count(FrameType::Folio), 0);
        assert_eq!(g.count(FrameType::HwPoison), 1);
        assert_eq!(g.count(FrameType::Free), 1);
        assert_eq!(
            pa.get_folio(target, |_| ()).err(),
            Some(FrameError::HwPoisoned { pfn: target })
        );
        g.check_consistency().unwrap();
    });
    SEEN.assert_all("got it, poisoned");
}

/// Two readers look the folio up and read it while the owner drops its
/// reference; whoever drops the last reference frees the folio and the
/// frames' next owner writes them. Every holder's read must happen before
/// that write: `put` must release and the last `put` acquire.
#[test]
fn two_readers_race_the_last_put() {
    static SEEN: Seen<3> = Seen::new();
    // Three threads: bounded, or the exploration takes minutes.
    model(Some(3), || {
        let (pa, mut fa) = setup(2);
        let f = fa.alloc_folio(0, Owner::Buddy).unwrap();
        let target = f.pfn();
        let contents = Contents::new();
        let fa: Shared = Arc::new(Mutex::new(fa));
        let last_put = |fa: &Shared, r: FolioRef<LoomAtomics>, c: &Contents| -> bool {
            match r.put().unwrap() {
                None => false,
                Some(last) => {
                    let rel = fa.lock().unwrap().release(last).unwrap();
                    assert!(matches!(rel, Released::Freed { .. }));
                    // The frames' next owner.
                    c.write(1);
                    true
                }
            }
        };
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (fa, c) = (fa.clone(), contents.clone());
                loom::thread::spawn(move || match pa.get_folio(target, |_| unreachable!()) {
                    Ok(r) => {
                        assert_eq!(c.read(), 0, "read after the next owner wrote");
                        last_put(&fa, r, &c)
                    }
                    // Too late: the last put went (Frozen: its release had
                    // not rewritten the word yet).
                    Err(FrameError::Free { .. } | FrameError::Frozen { .. }) => false,
                    Err(e) => panic!("unexpected lookup result {e:?}"),
                })
            })
            .collect();
        let mine = last_put(&fa, f, &contents);
        let theirs: Vec<bool> = readers.into_iter().map(|t| t.join().unwrap()).collect();
        let lasts = [mine, theirs[0], theirs[1]];
        assert_eq!(lasts.iter().filter(|&&l| l).count(), 1);
        SEEN.hit(lasts.iter().position(|&l| l).unwrap().min(2));
        let g = fa.lock().unwrap();
        assert_eq!(g.count(FrameType::Folio), 0);
        g.check_consistency().unwrap();
    });
    SEEN.assert_all("owner last, first reader last, second reader last");
}

/// A page-table descriptor freed with level 3 recorded is reused for a new
/// table in another frame while a lock-free reader looks that frame up: a
/// reader that sees the new word must see the new descriptor contents
/// (level 0, order 0, no valid entries). That is what the release fence of
/// the frozen-allocation publication is for.
#[test]
fn table_descriptor_reuse_races_a_lookup() {
    static SEEN: Seen<2> = Seen::new();
    model(None, || {
        let (pa, mut fa) = setup(4);
        let old = fa.alloc_page_table().unwrap();
        let x = old.pfn();
        old.desc().set_level(3);
        old.inc_valid().unwrap();
        old.dec_valid().unwrap();
        fa.free_page_table(old).unwrap();
        let y = Pfn(x.0 + 1);

        let reader = loom::thread::spawn(move || match pa.page_table(y) {
            Ok(t) => {
                let d = t.desc();
                assert_eq!((d.level(), d.order(), d.valid()), (0, 0, 0));
                SEEN.hit(0);
            }
            Err(FrameError::Free { .. }) => SEEN.hit(1),
            Err(e) => panic!("unexpected lookup result {e:?}"),
        });
        assert_eq!(fa.alloc_frozen(0, FrozenKind::Guard).unwrap(), x);
        let t = fa.alloc_page_table().unwrap();
        assert_eq!(t.pfn(), y);
        reader.join().unwrap();
        fa.free_page_table(t).unwrap();
        fa.check_consistency().unwrap();
    });
    SEEN.assert_all("new table, still free");
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
