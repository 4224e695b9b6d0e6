//! Loom models of the shared frame allocator's per-CPU protocol
//! (`memdesc::frames::SmpFrameAllocator`), on the shipping code with loom
//! atomics (page-array words, descriptor fields and every lock).
//!
//! - A per-CPU refill and a drain of every cache race a free from another
//!   CPU: the frame freed on CPU 1 reaches CPU 0 only through CPU 1's cache
//!   and the buddy, and CPU 0's writes to it happen after CPU 1's last
//!   access (the frame's contents are a loom `UnsafeCell`, so a missing
//!   happens-before is a reported race).
//! - A speculative lookup on CPU 1 races CPU 0 draining its cache and
//!   reusing the frame: the reader gets a typed error or a reference to the
//!   live folio at that frame whose contents it may read.
//!
//! Both models are explored exhaustively (no preemption bound; about two
//! seconds) and end with the consistency check and exact frame accounting.
//! Making the lock's unlock `Relaxed` makes the first model report a race.
#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

mod common;

use common::leak::Leak;
use common::loom_atomics::LoomAtomics;
use common::page_array::leaked_page_array_at;
use common::seen::Seen;
use core::num::NonZeroU32;
use loom::sync::Arc;
use memdesc::frames::*;
use memdesc::sync::{CpuId, FixedCpu};
use memdesc::Pfn;

type Smp = SmpFrameAllocator<'static, Leak, LoomAtomics, 2>;

const BASE: u64 = 0x10;
const CPU0: FixedCpu = FixedCpu::new(0);
const CPU1: FixedCpu = FixedCpu::new(1);

/// Exhaustive: no preemption bound.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = None;
    // A descriptor refill is PCP_BATCH descriptor loads, each a branch.
    b.max_branches = 20_000;
    b.check(f);
}

fn setup(frames: u64) -> Arc<Smp> {
    let pa = leaked_page_array_at::<LoomAtomics>(BASE, frames);
    Arc::new(SmpFrameAllocator::new(
        FrameAllocator::new(pa, Leak, &[]).unwrap(),
    ))
}

/// The contents of each frame: whoever holds it reads or writes.
#[derive(Clone)]
struct Contents(Arc<Vec<loom::cell::UnsafeCell<u32>>>);
impl Contents {
    fn new(frames: u64) -> Self {
        Self(Arc::new(
            (0..frames)
                .map(|_| loom::cell::UnsafeCell::new(0))
                .collect(),
        ))
    }
    fn write(&self, pfn: Pfn, v: u32) {
        // SAFETY: loom reports an access racing this one instead.
        self.0[(pfn.0 - BASE) as usize].with_mut(|p| unsafe { *p = v })
    }
    fn read(&self, pfn: Pfn) -> u32 {
        // SAFETY: as in `write`.
        self.0[(pfn.0 - BASE) as usize].with(|p| unsafe { *p })
    }
}

/// At the end: everything returned, every frame free, check clean.
fn assert_all_free(s: &Smp, frames: u64) {
    s.check_consistency(&CPU0).unwrap();
    let st = s.stats(&CPU0).unwrap();
    assert_eq!(st.count(FrameType::Folio), 0);
    assert_eq!(
        st.count(FrameType::Free) + st.count(FrameType::Reserved),
        frames
    );
    assert_eq!(st.live_descs[0], 0);
}

static REFILL_VS_FREE: Seen<2> = Seen::new();

#[test]
fn refill_and_drain_race_a_free_from_another_cpu() {
    model(|| {
        let s = setup(2);
        let mem = Contents::new(2);
        // CPU 0 takes a frame (its refill takes both) and drains its cache:
        // one frame allocated, one free in the buddy, both caches empty.
        let f = s.alloc_folio(&CPU0, 0, Owner::Buddy).unwrap();
        mem.write(f.pfn(), 1);
        s.drain_cpu(&CPU0, CpuId(0)).unwrap();

        let (s1, mem1) = (s.clone(), mem.clone());
        let t = loom::thread::spawn(move || {
            // The holder's last access, then the free into CPU 1's cache.
            assert_eq!(mem1.read(f.pfn()), 1);
            let r = s1.put(&CPU1, f).unwrap();
            assert!(matches!(r, Some(Released::Freed { order: 0, .. })));
        });
        // Refill from the buddy: the one free frame.
        let a = s.alloc_folio(&CPU0, 0, Owner::Buddy).unwrap();
        mem.write(a.pfn(), 2);
        // Buddy empty: drains every cache, CPU 1's included, then fails or
        // gets the frame CPU 1 freed.
        match s.alloc_folio(&CPU0, 0, Owner::Buddy) {
            Ok(b) => {
                REFILL_VS_FREE.hit(0);
                mem.write(b.pfn(), 3);
                s.put(&CPU0, b).unwrap();
            }
            Err(SmpError::Frame(FrameError::OutOfMemory { .. })) => REFILL_VS_FREE.hit(1),
            Err(e) => panic!("{e:?}"),
        }
        s.put(&CPU0, a).unwrap();
        t.join().unwrap();
        assert_all_free(&s, 2);
    });
    REFILL_VS_FREE.assert_all("got the frame CPU 1 freed, out of memory");
}

static LOOKUP_VS_DRAIN: Seen<3> = Seen::new();

#[test]
fn speculative_lookup_races_a_drain_and_reuse() {
    model(|| {
        let s = setup(2);
        let mem = Contents::new(2);
        let f = s.alloc_folio(&CPU0, 0, Owner::Buddy).unwrap();
        let target = f.pfn();
        mem.write(target, 1);
        // Into CPU 0's cache.
        s.put(&CPU0, f).unwrap();

        let (s1, mem1) = (s.clone(), mem.clone());
        let t = loom::thread::spawn(move || {
            let r = s1.page_array().get_folio(target, |last| {
                // The retry path dropped the last reference of a folio
                // reused under it: release it from this CPU.
                let _ = s1.release(&CPU1, last).unwrap();
            });
            match r {
                Ok(f) => {
                    assert_eq!(f.pfn(), target);
                    // A holder reads; the owner writes only while it holds
                    // the folio alone (frozen).
                    let v = mem1.read(target);
                    assert!(v == 1 || v == 7, "{v}");
                    LOOKUP_VS_DRAIN.hit(0);
                    let _ = s1.put(&CPU1, f).unwrap();
                }
                Err(FrameError::Free { .. }) => LOOKUP_VS_DRAIN.hit(1),
                Err(FrameError::Frozen { .. }) => LOOKUP_VS_DRAIN.hit(2),
                Err(e) => panic!("{e:?}"),
            }
        });
        // CPU 0 goes idle: its cache drains; then the frame is reused.
        s.drain_cpu(&CPU0, CpuId(0)).unwrap();
        let mut got = Vec::new();
        while let Ok(g) = s.alloc_folio(&CPU0, 0, Owner::Buddy) {
            if g.pfn() != target {
                got.push(g);
                continue;
            }
            // Exclusive access: freeze the count at our one reference; a
            // reader holding a reference makes it fail, and we don't write.
            match g.freeze(1) {
                Ok(frozen) => {
                    mem.write(target, 7);
                    got.push(frozen.unfreeze(NonZeroU32::MIN).ok().unwrap());
                }
                Err(e) => got.push(e.folio),
            }
        }
        for g in got {
            let _ = s.put(&CPU0, g).unwrap();
        }
        t.join().unwrap();
        assert_all_free(&s, 2);
    });
    LOOKUP_VS_DRAIN.assert_all("reference, free, frozen");
}
