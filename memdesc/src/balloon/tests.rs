//! Host tests of the balloon policy against the recording fake device and
//! environment: every rule of the balloon that needs no hardware.

use super::device::feature::*;
use super::fake::*;
use super::reporting::{REPORT_ORDER, REPORT_PAGES};
use super::*;
use crate::frames::desc_cache::tests::LeakMemory;
use crate::frames::testutil::{alloc, setup};
use crate::frames::{FolioRef, FrameType, Owner};
use crate::stage1::fake::{Event, FakeFrame, FakePlatform};
use crate::stage1::{Attributes, Features, MappingSummary, MappingUnit, Stage1, VaSize};
use crate::{Pfn, PhysAddr, VirtAddr, PAGE_SIZE};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

const BASE: u64 = 0x40000; // 1 GiB, as on QEMU virt
const QEMU: u64 = VERSION_1 | STATS_VQ;

struct Rig {
    b: Balloon,
    dev: FakeDevice,
    env: FakeEnv,
    now: u64,
    /// Folios the "rest of the firmware" holds.
    held: Vec<FolioRef>,
    frames: u64,
}

fn rig_with(mib: u64, features: u64, cfg: BalloonConfig, prep: impl FnOnce(&mut FakeEnv)) -> Rig {
    let frames = mib * 256;
    let (pa, _) = setup(&[(BASE, BASE + frames)]);
    let world = Rc::new(RefCell::new(World::default()));
    let mut env = FakeEnv::new(alloc(pa, &[]), world.clone());
    prep(&mut env);
    let mut dev = FakeDevice::new(world, features);
    let mut b = Balloon::new(cfg);
    b.start(&mut dev, &mut env).unwrap();
    Rig {
        b,
        dev,
        env,
        now: 0,
        held: Vec::new(),
        frames,
    }
}

fn rig(mib: u64, features: u64) -> Rig {
    rig_with(mib, features, BalloonConfig::DEFAULT, |_| {})
}

impl Rig {
    fn step(&mut self) -> Result<Status, BalloonError> {
        self.now += 1_000_000_000;
        self.b.service(&mut self.dev, &mut self.env, self.now)
    }

    fn settle(&mut self) -> Status {
        if self.dev.auto_ack {
            self.dev.process(Queue::Inflate);
            self.dev.process(Queue::Deflate);
        }
        for _ in 0..1000 {
            let s = self.step().unwrap();
            self.check();
            if s.settled() {
                return s;
            }
        }
        panic!("did not settle: {:?}", self.b.status());
    }

    fn target(&mut self, pages: u32) {
        self.dev.set_num_pages(pages);
    }

    fn entries(&mut self) -> BTreeSet<u32> {
        (0..self.b.status().entries)
            .map(|i| self.b.entry(&mut self.env, i).unwrap())
            .collect()
    }

    /// Every frame accounted for; device rules kept.
    fn check(&mut self) {
        let fa = &self.env.fa;
        fa.check_consistency().unwrap();
        assert_eq!(
            fa.count(FrameType::Offline),
            self.b.offline_frames() + self.b.reporting_frames(),
            "offline frames"
        );
        assert_eq!(
            fa.count(FrameType::Slab),
            self.b.own_frames(),
            "balloon's own frames"
        );
        let held: u64 = self.held.iter().map(|f| 1u64 << f.order()).sum();
        assert_eq!(fa.count(FrameType::Folio), held, "folios");
        let s = fa.stats();
        assert_eq!(s.by_type.iter().sum::<u64>(), self.frames, "types add up");
        assert!(self.dev.violations.is_empty(), "{:?}", self.dev.violations);
        assert_eq!(self.dev.actual, self.b.status().actual);
        // Ballooned frames, and only those, are unmapped.
        let unmapped = self.env.world.borrow().unmapped.len() as u64;
        assert_eq!(unmapped, self.b.offline_frames(), "unmapped frames");
        if self.b.status().op == Op::Idle {
            let e = self.entries();
            assert_eq!(e.len() as u64, self.b.status().entries, "entries unique");
            let world = self.env.world.borrow();
            assert!(e.iter().all(|p| world.unmapped.contains(&(*p as u64))));
            drop(world);
            if self.b.counters().resets == 0 {
                assert_eq!(e, self.dev.host, "host and driver agree");
            }
        }
    }

    fn unmap_sizes(&self) -> Vec<u64> {
        self.env
            .events
            .iter()
            .filter_map(|e| match e {
                EnvEvent::Unmap(_, n) => Some(*n),
                _ => None,
            })
            .collect()
    }
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn inflate_and_deflate_round_trip() {
    let mut r = rig(64, QEMU);
    assert_eq!(r.b.own_frames(), 1, "the stats frame");
    r.target(8192);
    let s = r.settle();
    assert_eq!(s.actual, 8192);
    assert_eq!(r.env.fa.count(FrameType::Offline), 8192);
    assert_eq!(r.dev.host.len(), 8192);
    assert_eq!(r.b.counters().inflated, 8192);
    r.target(0);
    let s = r.settle();
    assert_eq!(s.actual, 0);
    assert!(r.dev.host.is_empty());
    assert_eq!(r.env.fa.count(FrameType::Offline), 0);
    assert_eq!(r.b.own_frames(), 1, "arrays freed");
    assert_eq!(r.env.fa.count(FrameType::Free), r.frames - 1);
    assert_eq!(r.b.counters().deflated, 8192);
    assert!(r.env.world.borrow().unmapped.is_empty());
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn chunks_prefer_2m_then_64k_then_4k() {
    let mut r = rig(64, QEMU);
    r.target(2 * 512 + 16 + 3);
    r.settle();
    assert_eq!(r.unmap_sizes(), vec![512, 512, 16, 1, 1, 1]);
    for e in &r.env.events {
        if let EnvEvent::Unmap(p, n) = *e {
            assert_eq!(p % n, 0, "chunk {p:#x} aligned to its size");
        }
    }
    // A partial deflate splits only the chunk the cut goes through.
    r.target(512 + 8);
    r.settle();
    let maps: Vec<u64> = r
        .env
        .events
        .iter()
        .filter_map(|e| match e {
            EnvEvent::Map(_, n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(maps, vec![1, 1, 1, 16, 256, 128, 64, 32, 16, 8]);
    assert!(r
        .env
        .events
        .iter()
        .any(|e| matches!(e, EnvEvent::Refold(..))));
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn minimum_chunk_order_moves_in_whole_2m_chunks() {
    let cfg = BalloonConfig {
        min_chunk_order: 9,
        ..BalloonConfig::DEFAULT
    };
    let mut r = rig_with(32, QEMU, cfg, |_| {});
    r.target(3 * 512 + 300);
    let s = r.settle();
    assert_eq!(s.actual, 3 * 512, "stops short of the odd remainder");
    assert!(s.floor_limited);
    assert_eq!(r.unmap_sizes(), vec![512, 512, 512]);
    // Deflating to an odd size is exact (mapping back never splits).
    r.target(700);
    assert_eq!(r.settle().actual, 700);
    r.target(0);
    assert_eq!(r.settle().actual, 0);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn fragmented_memory_falls_back_to_64k_chunks() {
    let mut r = rig(16, QEMU);
    // Pin one frame in every 2 MiB so that no free 2 MiB block is left.
    let mut pinned = Vec::new();
    let mut all = Vec::new();
    while let Ok(f) = r.env.fa.alloc_folio(4, Owner::Buddy) {
        all.push(f);
    }
    for f in all {
        if (f.pfn().0 / 16) % 32 == 0 {
            pinned.push(f);
        } else {
            let _ = r.env.fa.put(f).unwrap();
        }
    }
    r.held = pinned;
    r.target(64);
    r.settle();
    assert_eq!(r.unmap_sizes(), vec![16, 16, 16, 16]);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn descriptors_hold_at_most_256_pfns_and_batches_fill_the_queue() {
    let mut r = rig(256, QEMU);
    r.target(40_000);
    let s = r.settle();
    assert_eq!(s.actual, 40_000);
    let notifies: Vec<usize> = r
        .dev
        .events
        .iter()
        .filter_map(|e| match e {
            DevEvent::Notify(Queue::Inflate, n) => Some(*n),
            _ => None,
        })
        .collect();
    // 128 descriptors per batch: 127 * 256 = 32512 pages, then the rest.
    assert_eq!(notifies.len(), 2, "{notifies:?}");
    let adds: Vec<(usize, usize)> = r
        .dev
        .events
        .iter()
        .filter_map(|e| match e {
            DevEvent::Add(Queue::Inflate, d, p) => Some((*d, *p)),
            _ => None,
        })
        .collect();
    let descs: usize = adds.iter().map(|a| a.0).sum();
    assert_eq!(descs, 40_000usize.div_ceil(256));
    assert!(adds
        .iter()
        .all(|&(d, p)| d <= 8 && p <= 2048 && p <= d * 256));
    // Each chain starts at a multiple of 2048 entries, so an aligned 2 MiB
    // chunk (512 entries) never straddles two buffers.
    assert_eq!(adds[0].1, 2048);
    assert_eq!(r.b.counters().batches, 2);
    // Write `actual` once per batch (plus the one at start).
    let writes: Vec<u32> = r
        .dev
        .events
        .iter()
        .filter_map(|e| match e {
            DevEvent::WriteActual(v) => Some(*v),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![0, 32_512, 40_000]);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn must_tell_host_defers_reuse_until_the_ack() {
    for mth in [true, false] {
        let f = if mth { QEMU | MUST_TELL_HOST } else { QEMU };
        let mut r = rig(32, f);
        r.dev.auto_ack = false;
        r.target(1000);
        r.step().unwrap();
        assert_eq!(r.dev.pending(Queue::Inflate), 1);
        r.check();
        r.dev.process(Queue::Inflate);
        r.settle();
        r.target(0);
        r.step().unwrap();
        assert_eq!(r.dev.pending(Queue::Deflate), 1);
        let maps = r
            .env
            .events
            .iter()
            .filter(|e| matches!(e, EnvEvent::Map(..)))
            .count();
        if mth {
            assert_eq!(r.env.fa.count(FrameType::Offline), 1000, "kept until acked");
            assert_eq!(maps, 0);
        } else {
            assert_eq!(r.env.fa.count(FrameType::Offline), 0, "reusable at once");
            assert!(maps > 0);
        }
        r.check();
        r.dev.process(Queue::Deflate);
        let s = r.settle();
        assert_eq!(s.actual, 0);
        assert_eq!(r.env.fa.count(FrameType::Offline), 0);
    }
}

#[test]
fn actual_is_written_at_start_even_if_the_device_kept_one() {
    let (pa, _) = setup(&[(BASE, BASE + 4096)]);
    let world = Rc::new(RefCell::new(World::default()));
    let mut env = FakeEnv::new(alloc(pa, &[]), world.clone());
    let mut dev = FakeDevice::new(world, QEMU);
    dev.actual = 777; // left from before a reset
    dev.num_pages = 100;
    let mut b = Balloon::new(BalloonConfig::DEFAULT);
    b.start(&mut dev, &mut env).unwrap();
    assert_eq!(dev.actual, 0);
    assert_eq!(b.status().num_pages, 100);
    // Stats buffer first, then DRIVER_OK, then actual.
    assert!(dev.stats_before_driver_ok);
    let i_ok = dev
        .events
        .iter()
        .position(|e| *e == DevEvent::DriverOk)
        .unwrap();
    let i_act = dev
        .events
        .iter()
        .position(|e| *e == DevEvent::WriteActual(0))
        .unwrap();
    assert!(i_ok < i_act);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn floor_keeps_the_reserve_whatever_the_host_asks() {
    let cfg = BalloonConfig {
        reserve_pages: 512,
        ..BalloonConfig::DEFAULT
    };
    let mut r = rig_with(16, QEMU, cfg, |_| {});
    r.target(4096); // all of RAM
    let s = r.settle();
    assert!(s.floor_limited);
    let free = r.env.fa.count(FrameType::Free);
    assert!(free >= 512 + TABLE_HEADROOM, "free {free}");
    assert!(
        free < 512 + TABLE_HEADROOM + 16,
        "took what it could: free {free}"
    );
    assert!(s.actual > 3000);
    // More than RAM: a typed error, once, and the same floor.
    r.target(1 << 20);
    assert_eq!(
        r.step(),
        Err(BalloonError::TargetBeyondRam {
            num_pages: 1 << 20,
            ram_pages: 4096
        })
    );
    let s = r.settle();
    assert!(s.floor_limited);
    assert!(r.env.fa.count(FrameType::Free) >= 512 + TABLE_HEADROOM);
    r.target(0);
    r.settle();
    assert_eq!(r.env.fa.count(FrameType::Free), 4096 - 1);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn deflate_on_oom_gives_back_enough_and_holds() {
    let mut r = rig(16, QEMU | DEFLATE_ON_OOM);
    r.target(4096);
    r.settle();
    let before = r.b.status().actual;
    // The rest of the firmware allocates until the allocator runs dry.
    let mut reclaimed = 0;
    for _ in 0..2000 {
        let (f, got) =
            r.b.alloc_folio(&mut r.dev, &mut r.env, 2, Owner::Buddy)
                .unwrap();
        r.held.push(f);
        reclaimed += got;
        r.check();
        if reclaimed > 0 {
            break;
        }
    }
    assert!(reclaimed >= 4 + 256, "reclaimed {reclaimed}");
    assert_eq!(r.b.counters().oom_events, 1);
    assert_eq!(r.b.status().actual as u64, before as u64 - reclaimed);
    // The balloon does not take it straight back.
    let s = r.settle();
    assert_eq!(s.actual as u64, before as u64 - reclaimed);
    // A new target from the host is followed again.
    r.target(100);
    let s = r.settle();
    assert_eq!(s.actual, 100);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn without_deflate_on_oom_ballooned_pages_stay() {
    let mut r = rig(16, QEMU);
    r.target(4096);
    r.settle();
    let offline = r.env.fa.count(FrameType::Offline);
    let err = loop {
        match r.b.alloc_folio(&mut r.dev, &mut r.env, 0, Owner::Buddy) {
            Ok((f, got)) => {
                assert_eq!(got, 0);
                r.held.push(f);
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(
        err,
        BalloonError::Frames(crate::frames::FrameError::OutOfMemory { .. })
    ));
    assert_eq!(r.env.fa.count(FrameType::Offline), offline);
    assert_eq!(
        r.b.reclaim(&mut r.dev, &mut r.env, 10),
        Err(BalloonError::DeflateOnOomNotNegotiated)
    );
    r.check();
}

/// Holds every free frame as a folio of the "rest of the firmware".
fn hold_all_free(r: &mut Rig) {
    while let Ok(f) = r.env.fa.alloc_folio(0, Owner::Buddy) {
        r.held.push(f);
    }
    assert_eq!(r.env.fa.count(FrameType::Free), 0);
}

/// An allocation that needs a new descriptor first: with no free frame the
/// descriptor cache cannot grow (on target the cache takes its chunks from
/// the allocator; the fake's leaked chunks never run out, so this models it).
fn needs_descriptor(
    fa: &mut crate::frames::FrameAllocator<'static, LeakMemory>,
) -> Result<FolioRef, crate::frames::FrameError> {
    if fa.count(FrameType::Free) == 0 {
        return Err(crate::frames::FrameError::OutOfDescriptors {
            ty: FrameType::PageTable,
        });
    }
    fa.alloc_folio(0, Owner::Buddy)
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn descriptor_cache_oom_deflates_one_frame_and_the_margin() {
    let mut r = rig(16, QEMU | DEFLATE_ON_OOM);
    r.target(3000);
    r.settle();
    let before = r.b.status().actual as u64;
    hold_all_free(&mut r);
    let (f, got) =
        r.b.alloc_with(&mut r.dev, &mut r.env, 0, needs_descriptor)
            .unwrap();
    r.held.push(f);
    // One frame for the descriptor chunk, and the same margin as frames.
    assert_eq!(got, 1 + BalloonConfig::DEFAULT.oom_margin_pages);
    assert_eq!(r.b.counters().oom_events, 1);
    assert_eq!(r.b.counters().oom_pages, got);
    assert_eq!(r.b.status().actual as u64, before - got);
    r.check();
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn descriptor_cache_oom_without_the_feature_is_typed_and_keeps_the_balloon() {
    let mut r = rig(16, QEMU);
    r.target(3000);
    r.settle();
    let before = r.b.status().actual;
    let offline = r.env.fa.count(FrameType::Offline);
    hold_all_free(&mut r);
    let err =
        r.b.alloc_with(&mut r.dev, &mut r.env, 0, needs_descriptor)
            .map(|_| ())
            .unwrap_err();
    assert_eq!(
        err,
        BalloonError::Frames(crate::frames::FrameError::OutOfDescriptors {
            ty: FrameType::PageTable
        })
    );
    assert_eq!(r.b.status().actual, before);
    assert_eq!(r.env.fa.count(FrameType::Offline), offline);
    assert_eq!(r.b.counters().oom_events, 0);
    r.check();
}

#[test]
fn oom_shortfalls_count_what_is_missing() {
    use crate::frames::FrameError;
    use crate::stage1::Stage1Error;
    assert_eq!(
        oom_shortfall(&FrameError::OutOfMemory { order: 9 }, 9),
        Some(512)
    );
    assert_eq!(
        oom_shortfall(
            &FrameError::OutOfDescriptors {
                ty: FrameType::Folio
            },
            9
        ),
        Some(1)
    );
    assert_eq!(oom_shortfall(&FrameError::Corrupt { pfn: Pfn(1) }, 0), None);
    assert_eq!(table_oom_shortfall(&Stage1Error::OutOfTableMemory), Some(1));
    assert_eq!(table_oom_shortfall(&Stage1Error::EmptyRange), None);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn deflate_on_oom_with_must_tell_host_waits_for_the_ack() {
    let mut r = rig(16, QEMU | DEFLATE_ON_OOM | MUST_TELL_HOST);
    r.target(2000);
    r.settle();
    let got = r.b.reclaim(&mut r.dev, &mut r.env, 100).unwrap();
    assert_eq!(got, 356);
    assert_eq!(r.b.status().op, Op::Idle);
    assert_eq!(r.env.fa.count(FrameType::Offline), 2000 - 356);
    r.check();
}

fn resets(r: &Rig) -> usize {
    r.dev
        .events
        .iter()
        .filter(|e| **e == DevEvent::Reset)
        .count()
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn unknown_used_id_resets_and_loses_nothing() {
    for q in [Queue::Inflate, Queue::Deflate] {
        let mut r = rig(32, QEMU);
        r.target(3000);
        if q == Queue::Deflate {
            r.settle();
            r.target(1000);
        }
        r.dev.auto_ack = false;
        r.step().unwrap();
        r.dev.bad_next = Some(BadUsed::UnknownId);
        r.dev.process(q);
        let e = r.step().unwrap_err();
        assert!(
            matches!(e, BalloonError::UnknownUsedId { queue, .. } if queue == q),
            "{e:?}"
        );
        assert_eq!(resets(&r), 1);
        r.check();
        r.dev.auto_ack = true;
        let s = r.settle();
        assert_eq!(s.actual, if q == Queue::Deflate { 1000 } else { 3000 });
        assert_eq!(r.env.fa.count(FrameType::Offline), s.actual as u64);
        // The host saw the same frames, whatever the reset lost.
        let e = r.entries();
        assert!(r.dev.host.iter().all(|p| e.contains(p)) || q == Queue::Deflate);
    }
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn wrong_used_length_resets_and_loses_nothing() {
    let mut r = rig(32, QEMU | MUST_TELL_HOST);
    r.target(3000);
    r.settle();
    r.target(0);
    r.dev.auto_ack = false;
    r.step().unwrap();
    r.dev.bad_next = Some(BadUsed::WrongLength(4096));
    r.dev.process(Queue::Deflate);
    assert_eq!(
        r.step().unwrap_err(),
        BalloonError::WrongUsedLength {
            queue: Queue::Deflate,
            id: 0,
            len: 4096
        }
    );
    r.check();
    // With MUST_TELL_HOST the unacknowledged deflate stayed ballooned.
    assert_eq!(r.env.fa.count(FrameType::Offline), 3000);
    r.dev.auto_ack = true;
    assert_eq!(r.settle().actual, 0);
    assert_eq!(r.env.fa.count(FrameType::Offline), 0);
}

#[test]
fn bad_stats_used_is_caught() {
    let mut r = rig(16, QEMU);
    r.dev.bad_next = Some(BadUsed::UnknownId);
    r.dev.return_stats();
    assert!(matches!(
        r.step(),
        Err(BalloonError::UnknownUsedId {
            queue: Queue::Stats,
            ..
        })
    ));
    assert!(r.dev.stats_before_driver_ok, "stats re-posted on recovery");
    r.check();
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn device_needs_reset_is_honoured() {
    let mut r = rig(32, QEMU);
    r.target(3000);
    r.dev.auto_ack = false;
    r.step().unwrap();
    r.dev.needs_reset = true;
    assert_eq!(r.step().unwrap_err(), BalloonError::DeviceNeedsReset);
    assert_eq!(resets(&r), 1);
    r.check();
    // The reset lost the in-flight batch; it stays ballooned, actual says so.
    assert_eq!(r.dev.actual, 3000);
    // A reset that fails is reported and retried next time.
    r.dev.needs_reset = true;
    r.dev.reset_failures = 1;
    assert_eq!(
        r.step().unwrap_err(),
        BalloonError::ResetFailed(DeviceError::ResetTimeout)
    );
    r.dev.auto_ack = true;
    assert_eq!(r.step().unwrap_err(), BalloonError::DeviceNeedsReset);
    r.target(0);
    assert_eq!(r.settle().actual, 0);
    assert_eq!(r.env.fa.count(FrameType::Offline), 0);
    // The host was never told about the lost batch; deflating it is harmless.
    assert!(r.dev.repeats > 0);
}

#[test]
fn config_generation_changing_during_reads() {
    let mut r = rig(16, QEMU);
    r.target(100);
    r.dev.unstable_reads = 3; // a few racing changes: retried
    assert_eq!(r.step().unwrap().num_pages, 100);
    r.target(200);
    r.dev.unstable_reads = 1000; // never stable: typed error, old target kept
    assert_eq!(r.step().unwrap_err(), BalloonError::ConfigUnstable);
    assert_eq!(r.b.status().num_pages, 100);
    r.check();
    r.dev.unstable_reads = 0;
    assert_eq!(r.settle().actual, 200);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn flapping_target_is_reported_once_and_loses_nothing() {
    let mut r = rig(32, QEMU);
    let mut flaps = 0;
    for i in 0..40u32 {
        r.target(if i % 2 == 0 { 5000 } else { 10 + i });
        r.now += 1_000_000; // 1 ms apart
        match r.b.service(&mut r.dev, &mut r.env, r.now) {
            Ok(_) => {}
            Err(BalloonError::TargetFlapping { .. }) => flaps += 1,
            Err(e) => panic!("{e:?}"),
        }
        r.check();
    }
    assert_eq!(flaps, 1);
    r.target(700);
    assert_eq!(r.settle().actual, 700);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn unmap_failure_frees_the_chunk_and_keeps_the_rest() {
    let mut r = rig(32, QEMU);
    r.env.unmap_fail_after = Some(2);
    r.target(2000);
    let e = r.step().unwrap_err();
    assert_eq!(
        e,
        BalloonError::Map(crate::stage1::Stage1Error::OutOfTableMemory)
    );
    r.check();
    r.dev.process(Queue::Inflate);
    r.step().ok();
    r.check();
    assert_eq!(r.b.status().actual, 1024);
    r.env.unmap_fail_after = None;
    assert_eq!(r.settle().actual, 2000);
}

// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn map_failure_on_deflate_keeps_frames_ballooned() {
    let mut r = rig(32, QEMU | MUST_TELL_HOST);
    r.target(2000);
    r.settle();
    r.env.map_fail_after = Some(1);
    r.target(0);
    let mut err = None;
    for _ in 0..3 {
        if let Err(e) = r.step() {
            err = Some(e);
        }
        r.check();
    }
    assert_eq!(
        err,
        Some(BalloonError::Map(
            crate::stage1::Stage1Error::OutOfTableMemory
        ))
    );
    assert!(r.env.fa.count(FrameType::Offline) > 0);
    r.env.map_fail_after = None;
    assert_eq!(r.settle().actual, 0);
    assert_eq!(r.env.fa.count(FrameType::Offline), 0);
}

// Volume test: minutes under Miri; the small tests post and re-post stats there.
#[cfg_attr(miri, ignore)]
#[test]
fn stats_come_from_the_allocator_and_are_reposted() {
    let mut r = rig(16, QEMU);
    r.target(1000);
    r.settle();
    r.dev.return_stats();
    r.step().unwrap();
    assert_eq!(r.b.counters().stats_reposts, 1);
    let free = r.env.fa.count(FrameType::Free) * PAGE_SIZE;
    let tags: Vec<u16> = r.dev.last_stats.iter().map(|s| s.0).collect();
    assert_eq!(tags, (0..10).collect::<Vec<u16>>());
    let get = |t: u16| r.dev.last_stats.iter().find(|s| s.0 == t).unwrap().1;
    assert_eq!(get(stats::tag::MEMFREE), free);
    assert_eq!(get(stats::tag::MEMTOT), (4096 - 1000) * PAGE_SIZE);
    assert_eq!(get(stats::tag::AVAIL), free - 1024 * PAGE_SIZE);
}

#[test]
fn no_stats_queue_without_the_feature() {
    let mut r = rig(16, VERSION_1);
    assert_eq!(r.b.own_frames(), 0);
    r.target(100);
    assert_eq!(r.settle().actual, 100);
}

/// The real stage-1 engine: ballooned frames are unmapped (a query fails),
/// whole blocks and runs leave the map, and after a full deflate the map is
/// back at its optimum with the linter clean.
// Volume test: minutes under Miri; the small tests run the same unsafe code there.
#[cfg_attr(miri, ignore)]
#[test]
fn stage1_unmaps_ballooned_frames_and_refolds_after_deflate() {
    const MIB: u64 = 64;
    let feats = Features {
        hafdbs: true,
        tlbi_range: true,
        bbm_level: 0,
    };
    let frames: &'static mut [FakeFrame] =
        Box::leak(vec![FakeFrame::new(); 512].into_boxed_slice());
    let log: &'static mut [Event] = Box::leak(vec![Event::Isb; 1 << 16].into_boxed_slice());
    let mut r = rig_with(MIB, QEMU, BalloonConfig::DEFAULT, |env| {
        let p = FakePlatform::new(frames, log, feats, VaSize::Bits48.start_level());
        let mut s = Stage1::new(p, VaSize::Bits48, feats).unwrap();
        let base = BASE * PAGE_SIZE;
        s.map(VirtAddr(base), PhysAddr(base), MIB << 20, Attributes::DATA)
            .unwrap();
        env.stage1 = Some(s);
    });
    let lint = |r: &mut Rig| {
        let mut v = Vec::new();
        r.env.stage1.as_mut().unwrap().lint(&mut |x| v.push(x));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(
            r.env.stage1.as_ref().unwrap().platform().violation_count(),
            0
        );
    };
    let optimum = MappingSummary::optimum(BASE * PAGE_SIZE, BASE * PAGE_SIZE, MIB << 20);
    let s1 = |r: &Rig| r.env.stage1.as_ref().unwrap().summary();
    assert_eq!(s1(&r).tlb_entries(), optimum.tlb_entries());
    r.target(4 * 512 + 16 + 1);
    r.settle();
    lint(&mut r);
    let ballooned = Pfn(r.b.entry(&mut r.env, 0).unwrap() as u64);
    assert!(r
        .env
        .stage1
        .as_ref()
        .unwrap()
        .query(VirtAddr(ballooned.addr().0))
        .is_err());
    // Whole 2 MiB blocks left the map: no page-level shattering beyond the
    // 64 KiB and 4 KiB chunks' neighbourhood.
    let sum = s1(&r);
    assert!(sum.count(MappingUnit::Page4K) <= 15, "{sum:?}");
    r.target(0);
    r.settle();
    lint(&mut r);
    assert_eq!(s1(&r).tlb_entries(), optimum.tlb_entries(), "{:?}", s1(&r));
}

fn reporting_rig(mib: u64) -> Rig {
    let cfg = BalloonConfig {
        report_free: true,
        ..BalloonConfig::DEFAULT
    };
    rig_with(mib, QEMU | PAGE_REPORTING, cfg, |_| {})
}

/// Whole free 2 MiB blocks of the rig, by first PFN.
fn free_2m_blocks(r: &mut Rig) -> Vec<u64> {
    let mut out = Vec::new();
    let mut pfn = BASE;
    while pfn + REPORT_PAGES <= BASE + r.frames {
        if r.env
            .fa
            .alloc_frozen_at(Pfn(pfn), REPORT_ORDER, crate::frames::FrozenKind::Guard)
            .is_ok()
        {
            r.env.fa.free_frozen(Pfn(pfn), REPORT_ORDER).unwrap();
            out.push(pfn);
        }
        pfn += REPORT_PAGES;
    }
    out
}

#[test]
fn free_page_reporting_reports_each_free_2m_block_once_until_used() {
    let mut r = reporting_rig(64);
    r.dev.auto_ack = false;
    let free = free_2m_blocks(&mut r);
    assert!(free.len() >= 28, "{} free 2 MiB blocks", free.len());
    r.step().unwrap();
    let sent = r.dev.pending(Queue::Reporting);
    assert!(sent > 0 && sent <= 32, "{sent} reports in one notification");
    r.check();
    // In flight: Offline, so the allocator cannot hand them out.
    assert_eq!(r.b.reporting_frames(), sent as u64 * REPORT_PAGES);
    let first = Pfn(free[0]);
    assert!(r.b.reporter().is_in_flight(first));
    assert!(r
        .env
        .fa
        .alloc_frozen_at(first, 0, crate::frames::FrozenKind::Guard)
        .is_err());
    // Serving again before the ack reports nothing twice.
    r.step().unwrap();
    assert_eq!(r.dev.pending(Queue::Reporting), sent);
    // Acked: free again, marked.
    r.dev.process(Queue::Reporting);
    for _ in 0..8 {
        r.step().unwrap();
        r.check();
        r.dev.process(Queue::Reporting);
    }
    r.step().unwrap();
    r.check();
    let mut reports = r.dev.reports.clone();
    reports.sort_unstable();
    assert_eq!(reports, free, "every free block reported exactly once");
    assert_eq!(r.b.reporter().counters().reported, free.len() as u64);
    assert_eq!(r.b.reporting_frames(), 0);
    assert!(r.dev.violations.is_empty(), "{:?}", r.dev.violations);
    // Nothing is reported again while unused...
    for _ in 0..3 {
        r.step().unwrap();
        r.dev.process(Queue::Reporting);
    }
    assert_eq!(r.dev.reports.len(), free.len());
    // ...until it has been used: allocate across a reported block, let a
    // scan see it in use, give it back: it is reported once more.
    let f = r.env.fa.alloc_folio(9, Owner::Buddy).unwrap();
    let used = f.pfn().0;
    r.held.push(f);
    r.step().unwrap();
    r.check();
    assert!(!r.b.reporter().is_reported(Pfn(used)));
    let f = r.held.pop().unwrap();
    r.env.fa.put(f).unwrap();
    r.step().unwrap();
    r.dev.process(Queue::Reporting);
    r.step().unwrap();
    r.check();
    assert_eq!(r.dev.reports.len(), free.len() + 1);
    assert_eq!(r.dev.reports.last(), Some(&used));
}

#[test]
fn free_page_reporting_needs_the_feature_and_the_setting() {
    let mut r = rig(64, QEMU | PAGE_REPORTING);
    r.step().unwrap();
    assert!(r.dev.reports.is_empty());
    let cfg = BalloonConfig {
        report_free: true,
        ..BalloonConfig::DEFAULT
    };
    let mut r = rig_with(64, QEMU, cfg, |_| {});
    r.step().unwrap();
    assert!(r.dev.reports.is_empty());
}

#[test]
fn free_page_reporting_leaves_ballooned_frames_alone() {
    let mut r = reporting_rig(64);
    r.target(4096);
    r.settle();
    for _ in 0..10 {
        r.step().unwrap();
        r.check();
    }
    assert!(!r.dev.reports.is_empty());
    assert!(r.dev.violations.is_empty(), "{:?}", r.dev.violations);
    let ballooned = r.entries();
    for p in &r.dev.reports {
        assert!(!ballooned.contains(&(*p as u32)));
    }
}

#[test]
fn bad_report_ack_or_reset_voids_reports_and_loses_nothing() {
    let mut r = reporting_rig(64);
    r.dev.auto_ack = false;
    r.step().unwrap();
    assert!(r.b.reporting_frames() > 0);
    r.dev.bad_next = Some(BadUsed::UnknownId);
    r.dev.process(Queue::Reporting);
    let e = r.step().unwrap_err();
    assert!(
        matches!(
            e,
            BalloonError::UnknownUsedId {
                queue: Queue::Reporting,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(resets(&r), 1);
    r.check();
    assert!(r.b.reporter().counters().voided > 0);
    // And DEVICE_NEEDS_RESET with reports in flight.
    r.step().unwrap();
    assert!(r.b.reporting_frames() > 0);
    r.dev.needs_reset = true;
    assert_eq!(r.step().unwrap_err(), BalloonError::DeviceNeedsReset);
    r.check();
    // A too-long used length is a typed error too.
    r.dev.bad_next = Some(BadUsed::WrongLength(u32::MAX));
    r.dev.process(Queue::Reporting);
    let e = r.step().unwrap_err();
    assert!(matches!(e, BalloonError::WrongUsedLength { .. }), "{e:?}");
    r.check();
    // The balloon still works.
    r.dev.auto_ack = true;
    r.dev.process(Queue::Reporting);
    r.target(2048);
    assert_eq!(r.settle().actual, 2048);
}

/// A rig whose 2 MiB block `b` is half free, half ballooned in 64 KiB
/// chunks (224 frames), with 320 free frames elsewhere and no whole free 2 MiB block.
fn fragmented_rig(features: u64) -> (Rig, u64) {
    let cfg = BalloonConfig {
        reserve_pages: 0,
        ..BalloonConfig::DEFAULT
    };
    let mut r = rig_with(16, features, cfg, |_| {});
    while let Ok(f) = r.env.fa.alloc_folio(4, Owner::Buddy) {
        r.held.push(f);
    }
    while let Ok(f) = r.env.fa.alloc_folio(0, Owner::Buddy) {
        r.held.push(f);
    }
    r.held.sort_by_key(|f| f.pfn().0);
    let in_block = |f: &FolioRef, b: u64| f.order() == 4 && f.pfn().0 / 512 == b / 512;
    let b = (BASE..BASE + r.frames)
        .step_by(512)
        .find(|&b| r.held.iter().filter(|f| in_block(f, b)).count() == 32)
        .unwrap();
    let give_back = |r: &mut Rig, pick: &mut dyn FnMut(usize, &FolioRef) -> bool| {
        let mut k = 0;
        let mut i = 0;
        while i < r.held.len() {
            if pick(k, &r.held[i]) {
                let f = r.held.remove(i);
                r.env.fa.put(f).unwrap();
            } else {
                i += 1;
            }
            k += 1;
        }
    };
    // Two free frames outside the block for the PFN arrays.
    let i = r
        .held
        .iter()
        .rposition(|f| f.order() == 4 && !in_block(f, b))
        .unwrap();
    let f = r.held.remove(i);
    r.env.fa.put(f).unwrap();
    for _ in 0..14 {
        let f = r.env.fa.alloc_folio(0, Owner::Buddy).unwrap();
        r.held.push(f);
    }
    // Even 64 KiB pieces of the block free, then ballooned.
    give_back(&mut r, &mut |_, f| {
        in_block(f, b) && (f.pfn().0 / 16) % 2 == 0
    });
    // 14 chunks: the floor (table headroom, array frames) keeps the rest.
    r.target(224);
    assert_eq!(r.settle().actual, 224);
    assert!(r.entries().iter().all(|&p| p as u64 / 512 == b / 512));
    // The odd ones free too: only the balloon's chunks fragment the block.
    give_back(&mut r, &mut |_, f| in_block(f, b));
    // Room elsewhere, scattered (every other 64 KiB piece of other blocks).
    let mut outside = 0;
    give_back(&mut r, &mut |_, f| {
        let pick = outside < 20 && f.order() == 4 && (f.pfn().0 / 16) % 2 == 1;
        if pick {
            outside += 1;
        }
        pick
    });
    r.check();
    assert!(r
        .env
        .fa
        .alloc_frozen(9, crate::frames::FrozenKind::Guard)
        .is_err());
    (r, b)
}

#[test]
fn compaction_by_pfn_migrates_ballooned_chunks_out_of_a_free_block() {
    for features in [QEMU, QEMU | MUST_TELL_HOST] {
        let (mut r, b) = fragmented_rig(features);
        let descs = r.env.fa.stats().live_descs;
        let (f, deflated) =
            r.b.alloc_folio(&mut r.dev, &mut r.env, 9, Owner::Buddy)
                .unwrap();
        assert_eq!(f.pfn().0, b, "the folio is the compacted block");
        assert_eq!(deflated, 0, "compaction keeps the balloon's size");
        r.held.push(f);
        r.check();
        let c = r.b.counters();
        assert_eq!((c.compactions, c.migrated, c.oom_events), (1, 224, 0));
        assert_eq!(r.b.status().actual, 224);
        assert_eq!(r.dev.actual, 224);
        let e = r.entries();
        assert_eq!(e.len(), 224);
        assert!(e.iter().all(|&p| p as u64 / 512 != b / 512), "moved out");
        assert_eq!(e, r.dev.host, "the host has the new frames, not the old");
        // One new descriptor: the folio's. No Offline frame got one.
        let mut after = r.env.fa.stats().live_descs;
        after[0] -= 1;
        assert_eq!(after, descs, "{features:#x}");
        if features & MUST_TELL_HOST != 0 {
            // Inflate of the replacements before the deflate of the old.
            let first_deflate = r
                .dev
                .events
                .iter()
                .rposition(|e| matches!(e, DevEvent::Notify(Queue::Deflate, _)));
            let last_inflate = r
                .dev
                .events
                .iter()
                .rposition(|e| matches!(e, DevEvent::Notify(Queue::Inflate, _)));
            assert!(last_inflate < first_deflate);
        }
        // And it all deflates cleanly.
        r.target(0);
        assert_eq!(r.settle().actual, 0);
    }
}

#[test]
fn compaction_is_not_tried_when_memory_is_short() {
    let (mut r, _) = fragmented_rig(QEMU);
    // Ask for more than is free at all: no migration, a typed error.
    let e =
        r.b.alloc_folio(&mut r.dev, &mut r.env, 11, Owner::Buddy)
            .err();
    assert!(matches!(e, Some(BalloonError::Frames(_))), "{e:?}");
    assert_eq!(r.b.counters().compactions, 0);
    r.check();
    // A block with something else in it does not qualify either.
    let f = r.env.fa.alloc_folio(0, Owner::Buddy).unwrap();
    r.held.push(f);
    r.check();
}

mod property {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Target(u32),
        Service(u8),
        Alloc(u8),
        Free(usize),
        OomAlloc(u8),
        Manual(bool),
        Process(bool),
        BadUsed(bool),
        NeedsReset,
        Unstable(u32),
        ReturnStats,
        ProcessReports,
        Compact(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u32..5000).prop_map(Step::Target),
            6 => (1u8..4).prop_map(Step::Service),
            2 => (0u8..6).prop_map(Step::Alloc),
            2 => (0usize..64).prop_map(Step::Free),
            1 => (0u8..4).prop_map(Step::OomAlloc),
            1 => any::<bool>().prop_map(Step::Manual),
            2 => any::<bool>().prop_map(Step::Process),
            1 => any::<bool>().prop_map(Step::BadUsed),
            1 => Just(Step::NeedsReset),
            1 => (0u32..12).prop_map(Step::Unstable),
            1 => Just(Step::ReturnStats),
            1 => Just(Step::ProcessReports),
            1 => (4u8..11).prop_map(Step::Compact),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        // Model test: far too slow under Miri (as the frames and stage-1 models).
        #[cfg_attr(miri, ignore)]
        #[test]
        fn random_targets_and_allocations(
            features in prop::sample::select(vec![
                QEMU, QEMU | DEFLATE_ON_OOM, QEMU | MUST_TELL_HOST,
                QEMU | MUST_TELL_HOST | DEFLATE_ON_OOM, VERSION_1,
                QEMU | PAGE_REPORTING | DEFLATE_ON_OOM,
            ]),
            reserve in 0u64..600,
            report_free in any::<bool>(),
            steps in prop::collection::vec(step(), 1..80),
        ) {
            let cfg = BalloonConfig { reserve_pages: reserve, report_free, ..BalloonConfig::DEFAULT };
            let mut r = rig_with(16, features, cfg, |e| e.record = false);
            for s in steps {
                match s {
                    Step::Target(n) => r.target(n),
                    Step::Service(k) => {
                        for _ in 0..k {
                            let _ = r.step();
                        }
                    }
                    Step::Alloc(o) => {
                        if let Ok(f) = r.env.fa.alloc_folio(o, Owner::Buddy) {
                            r.held.push(f);
                        }
                    }
                    Step::Free(i) => {
                        if !r.held.is_empty() {
                            let f = r.held.swap_remove(i % r.held.len());
                            let _ = r.env.fa.put(f).unwrap();
                        }
                    }
                    Step::OomAlloc(o) => {
                        let offline = r.env.fa.count(FrameType::Offline);
                        match r.b.alloc_folio(&mut r.dev, &mut r.env, o, Owner::Buddy) {
                            Ok((f, _)) => r.held.push(f),
                            Err(_) => {
                                if features & DEFLATE_ON_OOM == 0 {
                                    prop_assert_eq!(r.env.fa.count(FrameType::Offline), offline);
                                }
                            }
                        }
                    }
                    Step::Manual(m) => r.dev.auto_ack = !m,
                    Step::Process(inflate) => {
                        r.dev.process(if inflate { Queue::Inflate } else { Queue::Deflate })
                    }
                    Step::BadUsed(id) => {
                        r.dev.bad_next = Some(if id { BadUsed::UnknownId } else { BadUsed::WrongLength(8) })
                    }
                    Step::NeedsReset => r.dev.needs_reset = true,
                    Step::Unstable(n) => r.dev.unstable_reads = n,
                    Step::ReturnStats => r.dev.return_stats(),
                    Step::ProcessReports => r.dev.process(Queue::Reporting),
                    Step::Compact(o) => {
                        let idle = r.b.status().op == Op::Idle;
                        let (actual, entries) = (r.b.status().actual, r.b.status().entries);
                        if let (true, Ok(Some(_))) = (idle, r.b.compact_for(&mut r.dev, &mut r.env, o)) {
                            // Migration keeps the balloon's size.
                            prop_assert_eq!(r.b.status().entries, entries);
                            prop_assert!(r.b.status().actual == actual || r.b.status().actual as u64 == entries);
                        }
                    }
                }
                r.check();
                // The balloon only ever takes frames above its floor (other
                // users may go below it).
                prop_assert!(r.env.min_free_at_unmap >= reserve + TABLE_HEADROOM,
                    "free {} at an inflate, floor {}", r.env.min_free_at_unmap, reserve + TABLE_HEADROOM);
            }
            // Whatever happened, the device can be brought to a clean state.
            r.dev.auto_ack = true;
            r.dev.bad_next = None;
            r.dev.needs_reset = false;
            r.dev.unstable_reads = 0;
            r.dev.process(Queue::Inflate);
            r.dev.process(Queue::Deflate);
            r.target(0);
            for _ in 0..50 {
                let _ = r.step();
            }
            r.check();
            prop_assert_eq!(r.b.status().actual, 0);
            prop_assert_eq!(r.env.fa.count(FrameType::Offline), r.b.reporting_frames());
        }
    }
}

/// The counters say how many chunks of each size inflating took (what the
/// on-target system test reads from the settle line).
#[test]
fn chunk_counters_count_each_size() {
    let mut r = rig(8, QEMU);
    r.target(512 + 2 * 16 + 3);
    r.settle();
    assert_eq!(r.b.counters().chunks, [1, 2, 3]);
}
