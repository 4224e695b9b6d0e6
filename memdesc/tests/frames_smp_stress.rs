//! Host stress of the shared frame allocator on real threads: each thread is
//! a CPU allocating mixed orders, freeing its own folios and folios handed
//! over by other threads, taking speculative references to random frames,
//! poisoning and offlining frames and draining caches (its own and other
//! CPUs'). A side table of per-frame owner tags, claimed with a
//! compare-exchange at every allocation, catches any frame handed out
//! twice. At the end: the consistency check and exact frame accounting.
#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use memdesc::frames::*;
use memdesc::sync::{CpuId, FixedCpu, LockAtomics};
use memdesc::Pfn;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

mod common;

use common::leak::Leak;
use common::page_array::leaked_page_array_at;

/// `core::sync::atomic` as shipped, except that a lock waiter yields to the
/// OS scheduler: host threads, unlike firmware CPUs, get preempted, and a
/// ticket lock's FIFO handover behind a preempted thread would spin away
/// whole time slices on a loaded machine.
struct HostAtomics;
impl Atomics for HostAtomics {
    type U32 = AtomicU32;
    type U64 = AtomicU64;
    fn fence(order: Ordering) {
        std::sync::atomic::fence(order)
    }
}
impl LockAtomics for HostAtomics {
    type U32 = AtomicU32;
    type U64 = AtomicU64;
    fn relax() {
        std::thread::yield_now()
    }
}

type FolioRef = memdesc::frames::FolioRef<HostAtomics>;
const CPUS: usize = 4;
type Smp = SmpFrameAllocator<'static, Leak, HostAtomics, CPUS>;

const BASE: u64 = 0x8_0000;
const FRAMES: u64 = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Which thread owns each frame (0: none).
struct Tags(Vec<AtomicU64>);
impl Tags {
    fn claim(&self, f: &FolioRef, tag: u64) {
        for p in f.pfn().0..f.pfn().0 + (1 << f.order()) {
            let t = &self.0[(p - BASE) as usize];
            if let Err(other) = t.compare_exchange(0, tag, Ordering::AcqRel, Ordering::Acquire) {
                panic!("frame {p:#x} handed to {tag} while {other} owns it");
            }
        }
    }
    fn release(&self, f: &FolioRef, tag: u64) {
        for p in f.pfn().0..f.pfn().0 + (1 << f.order()) {
            let t = &self.0[(p - BASE) as usize];
            assert_eq!(t.swap(0, Ordering::AcqRel), tag, "frame {p:#x}");
        }
    }
}

fn new_smp() -> Smp {
    let pa = leaked_page_array_at::<HostAtomics>(BASE, FRAMES);
    SmpFrameAllocator::new(FrameAllocator::new(pa, Leak, &[]).unwrap())
}

fn order(r: u64) -> u8 {
    match r % 100 {
        0..=59 => 0,
        60..=74 => 1,
        75..=84 => 2,
        85..=91 => 3,
        92..=97 => 4,
        _ => 6,
    }
}

/// Every thread's folio in flight to another thread (tag travels with it).
type Handoff = Mutex<Vec<(FolioRef, u64)>>;

#[test]
fn threads_allocate_free_across_cpus_look_up_poison_and_offline() {
    let s = new_smp();
    let tags = Tags((0..FRAMES).map(|_| AtomicU64::new(0)).collect());
    let handoff: Handoff = Mutex::new(Vec::new());
    let poisoned = AtomicU64::new(0);
    let steps = 20_000;
    std::thread::scope(|sc| {
        for c in 0..CPUS {
            let (s, tags, handoff, poisoned) = (&s, &tags, &handoff, &poisoned);
            sc.spawn(move || {
                let cpu = FixedCpu::new(c as u32);
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((c as u64 + 1) * 0x1234_5678));
                let mut live: Vec<(FolioRef, u64)> = Vec::new();
                let mut offline: Vec<Pfn> = Vec::new();
                for step in 0..steps {
                    let r = rng.next();
                    let tag = ((c as u64) << 32) | (step as u64 + 1);
                    match (r >> 8) % 100 {
                        // Allocate.
                        0..=44 if live.len() < 64 => {
                            if let Ok(f) = s.alloc_folio(&cpu, order(r), Owner::Buddy) {
                                tags.claim(&f, tag);
                                live.push((f, tag));
                            }
                        }
                        // Hand a folio to whichever thread frees next.
                        45..=54 if !live.is_empty() => {
                            let i = (r >> 20) as usize % live.len();
                            handoff.lock().unwrap().push(live.swap_remove(i));
                        }
                        // Free one of ours, or one handed over.
                        55..=84 => {
                            let got = if r & 1 == 0 && !live.is_empty() {
                                let i = (r >> 20) as usize % live.len();
                                Some(live.swap_remove(i))
                            } else {
                                handoff.lock().unwrap().pop()
                            };
                            if let Some((f, t)) = got {
                                tags.release(&f, t);
                                s.put(&cpu, f).unwrap();
                            }
                        }
                        // Speculative reference to a random frame.
                        85..=93 => {
                            let pfn = Pfn(BASE + (r >> 20) % FRAMES);
                            let got = s.page_array().get_folio(pfn, |last| {
                                let _ = s.release(&cpu, last).unwrap();
                            });
                            if let Ok(f) = got {
                                assert!(f.pfn().0 <= pfn.0 && pfn.0 < f.pfn().0 + (1 << f.order()));
                                assert!(f.refcount() >= 1);
                                if let Some(Released::ToOwner { .. }) = s.put(&cpu, f).unwrap() {
                                    panic!("only Buddy folios exist");
                                }
                            }
                        }
                        // Offline a frame, or bring one back.
                        94..=96 => {
                            if let Some(p) = offline.pop() {
                                s.free_frozen(&cpu, p, 0).unwrap();
                            } else if let Ok(Ok(p)) = s.with_buddy(&cpu, |fa| fa.alloc_offline(0)) {
                                offline.push(p);
                            }
                        }
                        // Poison a random frame (free or in use).
                        97 => {
                            let pfn = Pfn(BASE + (r >> 20) % FRAMES);
                            if let Ok(Ok(_)) = s.with_exact(&cpu, |fa| fa.poison(pfn)) {
                                poisoned.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Go idle, or drain another CPU.
                        98 => s.drain_cpu(&cpu, cpu.id).unwrap(),
                        99 => s
                            .drain_cpu(&cpu, CpuId(((r >> 20) % CPUS as u64) as u32))
                            .unwrap(),
                        _ => {}
                    }
                }
                for (f, t) in live {
                    tags.release(&f, t);
                    s.put(&cpu, f).unwrap();
                }
                for p in offline {
                    s.free_frozen(&cpu, p, 0).unwrap();
                }
            });
        }
    });
    let cpu = FixedCpu::new(0);
    for (f, t) in handoff.into_inner().unwrap() {
        tags.release(&f, t);
        s.put(&cpu, f).unwrap();
    }
    s.check_consistency(&cpu).unwrap();
    let st = s.stats(&cpu).unwrap();
    let p = poisoned.load(Ordering::Relaxed);
    assert!(p > 0, "the workload poisoned nothing");
    assert_eq!(st.count(FrameType::HwPoison), p);
    assert_eq!(st.count(FrameType::Free) + p, FRAMES);
    assert_eq!(st.count(FrameType::Folio), 0);
    assert_eq!(st.count(FrameType::Offline), 0);
    assert_eq!(st.live_descs[0], 0);
    let mut fast = 0;
    for c in 0..CPUS {
        fast += s.cpu_stats(&cpu, CpuId(c as u32)).unwrap().fast_allocs;
    }
    assert!(fast > 0);
    eprintln!(
        "poisoned {p}, fast allocations {fast}, buddy lock {:?}",
        s.buddy_lock_stats()
    );
    let fa = s.into_inner();
    fa.check_consistency().unwrap();
    assert_eq!(fa.count(FrameType::Free) + p, FRAMES);
}

#[test]
fn a_frame_freed_on_every_other_cpu_comes_back_exactly_once() {
    // Ping-pong: each thread allocates order-0 folios and hands each one to
    // the next CPU, which frees it into its own cache.
    let s = new_smp();
    let tags = Tags((0..FRAMES).map(|_| AtomicU64::new(0)).collect());
    let queues: Vec<Mutex<Vec<(FolioRef, u64)>>> =
        (0..CPUS).map(|_| Mutex::new(Vec::new())).collect();
    std::thread::scope(|sc| {
        for c in 0..CPUS {
            let (s, tags, queues) = (&s, &tags, &queues);
            sc.spawn(move || {
                let cpu = FixedCpu::new(c as u32);
                for i in 0..5_000u64 {
                    let tag = ((c as u64) << 32) | (i + 1);
                    if let Ok(f) = s.alloc_folio(&cpu, 0, Owner::Buddy) {
                        tags.claim(&f, tag);
                        queues[(c + 1) % CPUS].lock().unwrap().push((f, tag));
                    }
                    let mine: Vec<_> = core::mem::take(&mut *queues[c].lock().unwrap());
                    for (f, t) in mine {
                        tags.release(&f, t);
                        s.put(&cpu, f).unwrap();
                    }
                }
            });
        }
    });
    let cpu = FixedCpu::new(0);
    for q in queues {
        for (f, t) in q.into_inner().unwrap() {
            tags.release(&f, t);
            s.put(&cpu, f).unwrap();
        }
    }
    s.check_consistency(&cpu).unwrap();
    let st = s.stats(&cpu).unwrap();
    assert_eq!(st.count(FrameType::Free), FRAMES);
    assert_eq!(st.live_descs[0], 0);
}
