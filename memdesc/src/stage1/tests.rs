//! Unit tests of the stage-1 engine against the recording fake: one test
//! per operation with budgets (upper bounds) for descriptor writes, TLBIs
//! and barriers, and the break-before-make order (Arm ARM DDI 0487M.a.a, D8.7.1,
//! D8.17.1). Correctness (TLBI coverage, barriers, ordering) is checked by the
//! fake's checker on every store, so the counts only bound the cost.

// A panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

use super::fake::{Event, FakeFrame, FakePlatform};
use super::*;
use crate::addr::{PhysAddr, VirtAddr};
use crate::frames::testutil::keep;

const K4: u64 = 4 << 10;
const K64: u64 = 64 << 10;
const M2: u64 = 2 << 20;
const M32: u64 = 32 << 20;
const G1: u64 = 1 << 30;

const NO_BBM: Features = Features {
    hafdbs: false,
    tlbi_range: false,
    bbm_level: 0,
};
const RANGE: Features = Features {
    hafdbs: true,
    tlbi_range: true,
    bbm_level: 0,
};

struct Bufs {
    frames: Vec<FakeFrame>,
    log: Vec<Event>,
}

fn bufs(n: usize) -> Bufs {
    Bufs {
        frames: vec![FakeFrame::new(); n],
        log: vec![Event::Isb; 8192],
    }
}

fn engine(b: &mut Bufs, f: Features, va: VaSize) -> Stage1<FakePlatform<'_>> {
    let p = FakePlatform::new(&mut b.frames, &mut b.log, f, va.start_level());
    Stage1::new(p, va, f).expect("root")
}

/// The common fixture: an empty 48-bit tree on 16 table frames (leaked,
/// so the tree owns them).
fn tree(f: Features) -> Stage1<FakePlatform<'static>> {
    engine(keep(Box::new(bufs(16))), f, VaSize::Bits48)
}

/// [`tree`] holding one 64 KiB DATA run at VA = PA = 1 GiB.
fn run_at_1g(f: Features) -> Stage1<FakePlatform<'static>> {
    let mut s = tree(f);
    s.map(va(G1), pa(G1), K64, Attributes::DATA).unwrap();
    s
}

/// A bare fake (4 frames, no engine) with one table allocated, for
/// driving the checker by hand.
fn bare_fake() -> (FakePlatform<'static>, PhysAddr) {
    let frames = keep(vec![FakeFrame::new(); 4].into_boxed_slice());
    let log = keep(vec![Event::Isb; 64].into_boxed_slice());
    let mut p = FakePlatform::new(frames, log, NO_BBM, 3);
    let root = p.alloc_table().unwrap();
    (p, root)
}

/// A 32 MiB DATA run at 4 GiB + 32 MiB with the 2 MiB block below it, on
/// 64 frames: the root, level 1 and level 2 tables (frames 0..=2) lie in
/// that block, the next table frame at the run's first page. Returns the
/// run's address.
fn run_over_its_own_tables(b: &mut Bufs, f: Features) -> (Stage1<FakePlatform<'_>>, u64) {
    let mut s = engine(b, f, VaSize::Bits48);
    let run = 4 * G1 + M32;
    s.map(va(run - M2), pa(run - M2), M2, Attributes::DATA)
        .unwrap();
    s.map(va(run), pa(run), M32, Attributes::DATA).unwrap();
    (s, run)
}

/// The summary counts `units` (unit, count) exactly.
#[track_caller]
fn assert_units(s: &Stage1<FakePlatform<'_>>, units: &[(MappingUnit, u64)]) {
    let sum = s.summary();
    for &(unit, n) in units {
        assert_eq!(sum.count(unit), n, "{unit:?}");
    }
}

/// Arms the fake: the hardware marks the leaf entry of `v` dirty just
/// before the engine's next compare-and-swap on it (`at_tlbi`: just before
/// the next TLBI). Returns the entry as (table, index).
fn race_dirty(s: &mut Stage1<FakePlatform<'_>>, v: u64, at_tlbi: bool) -> (PhysAddr, usize) {
    let (t, i, _) = s.leaf_entry(va(v)).unwrap();
    if at_tlbi {
        s.platform_mut().race_next_tlbi(t, i, true);
    } else {
        s.platform_mut().race_next_swap(t, i, true);
    }
    (t, i)
}

/// [`run_at_1g`] with young cleared, then page 5 made read-only while the
/// hardware marks entry 12 dirty (see [`race_dirty`]); checked clean.
fn unfold_with_a_racing_write(f: Features, at_tlbi: bool) -> Stage1<FakePlatform<'static>> {
    let mut s = run_at_1g(f);
    assert!(s.test_and_clear_young(va(G1)).unwrap());
    race_dirty(&mut s, G1 + 12 * K4, at_tlbi);
    s.protect(va(G1 + 5 * K4), K4, Attributes::RODATA).unwrap();
    check(&mut s);
    s
}

/// Maps 2 MiB at VA = PA = `at` page by page (no runs, no block).
fn map_2m_of_pages(s: &mut Stage1<FakePlatform<'_>>, at: u64) {
    s.map_limited(va(at), pa(at), M2, Attributes::DATA, MappingUnit::Page4K)
        .unwrap();
}

/// Lint clean (no advisory either), checker clean, TLB debt paid.
fn check(s: &mut Stage1<FakePlatform<'_>>) {
    let mut found = Vec::new();
    s.lint(&mut |v| found.push(v));
    assert!(
        found.is_empty(),
        "lint ({}): {:?}",
        found.len(),
        &found[..found.len().min(6)]
    );
    let p = s.platform();
    assert_eq!(
        p.violation_count(),
        0,
        "bbm: {:?}",
        p.violations().collect::<Vec<_>>()
    );
    assert_eq!(p.unflushed(), 0, "stale TLB state left behind");
}

/// Fails when `what` cost more than `budget`.
#[track_caller]
fn within(what: &str, actual: u64, budget: u64) {
    assert!(
        actual <= budget,
        "{what}: {actual} over the budget of {budget}"
    );
}

/// Break-before-make order in `log`: every store before the first
/// `DSB ISH` clears an entry, a TLBI comes between, and every store after
/// it writes a valid entry into an invalid one.
fn assert_break_then_make(log: &[Event]) {
    let ish = log.iter().position(|e| *e == Event::DsbIsh).unwrap();
    let (before, after) = log.split_at(ish);
    assert!(before.iter().any(Event::is_tlbi), "{log:?}");
    let stores = |l: &[Event]| -> Vec<(u64, u64)> {
        l.iter()
            .filter_map(|e| match e {
                Event::Write { old, new, .. } => Some((*old, *new)),
                _ => None,
            })
            .collect()
    };
    assert!(stores(before).iter().all(|&(_, new)| new == 0), "{log:?}");
    let made = stores(after);
    assert!(!made.is_empty());
    assert!(
        made.iter().all(|&(old, new)| old == 0 && new != 0),
        "{log:?}"
    );
}

fn va(x: u64) -> VirtAddr {
    VirtAddr(x)
}
fn pa(x: u64) -> PhysAddr {
    PhysAddr(x)
}

#[test]
fn map_picks_largest_units() {
    for f in [NO_BBM, Features::ALL] {
        let mut b = bufs(64);
        let mut s = engine(&mut b, f, VaSize::Bits48);
        // 1 GiB block, 2 MiB block, 64 KiB run, 4 KiB page.
        s.map(va(G1), pa(2 * G1), G1, Attributes::DATA).unwrap();
        s.map(va(4 * G1), pa(G1), M2, Attributes::DATA).unwrap();
        s.map(va(5 * G1), pa(0x8000_0000), K64, Attributes::RODATA)
            .unwrap();
        s.map(va(6 * G1), pa(0x9000_0000), K4, Attributes::TEXT)
            .unwrap();
        check(&mut s);
        assert_units(
            &s,
            &[
                (MappingUnit::Block1G, 1),
                (MappingUnit::Block2M, 1),
                (MappingUnit::Cont64K, 1),
                (MappingUnit::Page4K, 1),
            ],
        );
        let t = s.query(va(G1 + 0x1234)).unwrap();
        assert_eq!(t.output, pa(2 * G1 + 0x1234));
        assert_eq!(t.unit, MappingUnit::Block1G);
        assert_eq!(t.attributes, Attributes::DATA);
        let t = s.query(va(5 * G1 + 0x3000)).unwrap();
        assert_eq!((t.unit, t.unit_va), (MappingUnit::Cont64K, va(5 * G1)));
        assert_eq!(t.attributes, Attributes::RODATA);
        assert_eq!(s.query(va(6 * G1)).unwrap().attributes, Attributes::TEXT);
    }
}

#[test]
fn map_32m_and_16g_runs_and_misaligned_pa() {
    let mut b = bufs(64);
    let mut s = engine(&mut b, NO_BBM, VaSize::Bits48);
    s.map(va(M32), pa(3 * M32), M32, Attributes::DATA).unwrap();
    s.map(va(16 * G1), pa(32 * G1), 16 * G1, Attributes::DATA)
        .unwrap();
    // PA only 4 KiB aligned: pages only.
    s.map(va(G1), pa(0x4000_1000), K64, Attributes::DATA)
        .unwrap();
    check(&mut s);
    assert_units(
        &s,
        &[
            (MappingUnit::Cont32M, 1),
            (MappingUnit::Cont16G, 1),
            (MappingUnit::Page4K, 16),
        ],
    );
    assert_eq!(s.query(va(G1 + 0x5000)).unwrap().output, pa(0x4000_6000));
}

#[test]
fn bad_input_is_typed_and_changes_nothing() {
    let mut b = bufs(16);
    let mut s = engine(&mut b, NO_BBM, VaSize::Bits39);
    s.map(va(M2), pa(M2), M2, Attributes::DATA).unwrap();
    s.platform_mut().reset_counters();
    let e = |r: Result<(), Stage1Error>| r.unwrap_err();
    let wx = Attributes {
        execute: true,
        ..Attributes::DATA
    };
    let dx = Attributes {
        execute: true,
        write: false,
        ..Attributes::DEVICE
    };
    assert_eq!(e(s.map(va(0), pa(0), K4, wx)), Stage1Error::WriteAndExecute);
    assert_eq!(
        e(s.map(va(0), pa(0), K4, dx)),
        Stage1Error::ExecutableDevice
    );
    assert_eq!(
        e(s.map(va(0x800), pa(0), K4, Attributes::DATA)),
        Stage1Error::UnalignedVa { va: va(0x800) }
    );
    assert_eq!(
        e(s.map(va(0), pa(0x10), K4, Attributes::DATA)),
        Stage1Error::UnalignedPa { pa: pa(0x10) }
    );
    assert_eq!(
        e(s.map(va(0), pa(0), 0, Attributes::DATA)),
        Stage1Error::EmptyRange
    );
    assert_eq!(
        e(s.map(va(1 << 39), pa(0), K4, Attributes::DATA)),
        Stage1Error::VaOutOfRange { va: va(1 << 39) }
    );
    assert_eq!(
        e(s.map(va(0), pa((1 << 48) - K4), 2 * K4, Attributes::DATA)),
        Stage1Error::PaOutOfRange {
            pa: pa((1 << 48) - K4)
        }
    );
    assert_eq!(
        e(s.map(va(M2 - K4), pa(0), 2 * K4, Attributes::DATA)),
        Stage1Error::AlreadyMapped { va: va(M2) }
    );
    assert_eq!(
        e(s.unmap(va(M2), M2 + K4)),
        Stage1Error::NotMapped { va: va(2 * M2) }
    );
    assert_eq!(e(s.protect(va(M2), K4, wx)), Stage1Error::WriteAndExecute);
    assert_eq!(
        e(s.wrprotect(va(0), K4)),
        Stage1Error::NotMapped { va: va(0) }
    );
    assert_eq!(
        s.query(va(0)).unwrap_err(),
        Stage1Error::NotMapped { va: va(0) }
    );
    assert_eq!(
        s.test_and_clear_young(va(0)).unwrap_err(),
        Stage1Error::NotMapped { va: va(0) }
    );
    let c = s.platform().counters();
    assert_eq!((c.writes, c.tlbi(), c.dsb(), c.allocs), (0, 0, 0, 0));
    check(&mut s);
}

/// The headline case: one page inside a 64 KiB run changes permission.
#[test]
fn partial_change_unfolds_with_break_before_make() {
    for f in [NO_BBM, RANGE] {
        let mut s = run_at_1g(f);
        s.platform_mut().reset_counters();
        s.protect(va(G1 + 5 * K4), K4, Attributes::RODATA).unwrap();
        check(&mut s);
        let c = s.platform().counters();
        within("writes", c.writes, 32);
        let tlbis = if f.tlbi_range { 1 } else { 16 };
        within("TLBIs", c.tlbi(), tlbis);
        within("DSB ISH", c.dsb_ish, 1);
        // clear all 16 -> DSB ISHST -> TLBI pass -> DSB ISH -> 16 writes.
        let log = s.platform().log().to_vec();
        assert_break_then_make(&log);
        assert!(log
            .iter()
            .all(|e| !matches!(e, Event::Write { new, .. } if new & Descriptor::CONT != 0)));
        assert_eq!(s.summary().count(MappingUnit::Page4K), 16);
        assert_eq!(
            s.query(va(G1 + 5 * K4)).unwrap().attributes,
            Attributes::RODATA
        );
        assert_eq!(
            s.query(va(G1 + 6 * K4)).unwrap().attributes,
            Attributes::DATA
        );

        // Flip back: the run is eligible again and refolds in the same call.
        s.platform_mut().reset_counters();
        s.protect(va(G1 + 5 * K4), K4, Attributes::DATA).unwrap();
        check(&mut s);
        let c = s.platform().counters();
        within("refold writes", c.writes, 32);
        within("refold TLBIs", c.tlbi(), tlbis);
        within("refold DSB ISH", c.dsb_ish, 1);
        assert_eq!(s.summary().count(MappingUnit::Cont64K), 1);
    }
}

#[test]
fn bbm_level2_changes_size_in_place() {
    let mut s = run_at_1g(Features::ALL);
    s.platform_mut().reset_counters();
    s.protect(va(G1), K4, Attributes::RODATA).unwrap();
    check(&mut s);
    let c = s.platform().counters();
    within("writes", c.writes, 16);
    within("TLBIs", c.tlbi(), 1);
    within("DSB ISH", c.dsb_ish, 1);
    // In place: no entry is ever invalid.
    let log = s.platform().log();
    assert!(log
        .iter()
        .all(|e| !matches!(e, Event::Write { old, new, .. } if *old == 0 || *new == 0)));
    // A memory-type change still breaks, FEAT_BBM or not.
    s.platform_mut().reset_counters();
    let nc = Attributes {
        kind: MemoryKind::NormalNonCacheable,
        ..Attributes::DATA
    };
    s.protect(va(G1), K64, nc).unwrap();
    check(&mut s);
    assert!(matches!(s.platform().log()[0], Event::Write { new: 0, .. }));
    assert_eq!(s.summary().count(MappingUnit::Cont64K), 1);
}

#[test]
fn whole_run_downgrade_is_in_place() {
    for f in [NO_BBM, RANGE] {
        let mut s = run_at_1g(f);
        s.platform_mut().reset_counters();
        s.wrprotect(va(G1), K64).unwrap();
        check(&mut s);
        let c = s.platform().counters();
        within("writes", c.writes, 16);
        within("DSB ISH", c.dsb_ish, 1);
        within("TLBIs", c.tlbi(), if f.tlbi_range { 1 } else { 16 });
        let log = s.platform().log();
        assert!(log
            .iter()
            .all(|e| !matches!(e, Event::Write { new, .. } if new & Descriptor::CONT == 0)));
        let t = s.query(va(G1)).unwrap();
        assert_eq!((t.unit, t.attributes.write), (MappingUnit::Cont64K, false));
    }
}

#[test]
fn access_and_dirty_gathered_over_run_and_kept_by_wrprotect() {
    let mut s = run_at_1g(RANGE);
    let t = s.query(va(G1)).unwrap();
    assert!(
        t.young && !t.dirty,
        "fresh writable mapping is young and clean under HAFDBS"
    );
    assert!(s.test_and_clear_young(va(G1 + K4)).unwrap());
    assert!(!s.test_and_clear_young(va(G1)).unwrap());
    assert!(!s.query(va(G1)).unwrap().young);
    // Hardware writes through entry 9 only.
    let (t9, i9, _) = s.leaf_entry(va(G1 + 9 * K4)).unwrap();
    s.platform_mut().hw_touch(t9, i9, true);
    let q = s.query(va(G1)).unwrap();
    assert!(q.young && q.dirty, "gathered over the run: {q:?}");
    check(&mut s);
    s.wrprotect(va(G1), K64).unwrap();
    check(&mut s);
    let q = s.query(va(G1 + 15 * K4)).unwrap();
    assert!(q.dirty && !q.attributes.write && q.unit == MappingUnit::Cont64K);
    // Entry 9 keeps its own dirty state in the software bit; the others stay clean.
    let (t, i, _) = s.leaf_entry(va(G1 + 9 * K4)).unwrap();
    let d = Descriptor(unsafe_read(&s, t, i));
    assert!(d.has(Descriptor::SW_DIRTY) && d.has(Descriptor::AP_READ_ONLY));
    let d0 = Descriptor(unsafe_read(&s, t, i - 9));
    assert!(!d0.is_dirty());
    // Back to writable: dirty goes back to DBM form.
    s.protect(va(G1), K64, Attributes::DATA).unwrap();
    check(&mut s);
    let d = Descriptor(unsafe_read(&s, t, i));
    assert!(
        d.has(Descriptor::DBM) && !d.has(Descriptor::AP_READ_ONLY) && !d.has(Descriptor::SW_DIRTY)
    );
    // Without HAFDBS a writable page is conservatively dirty.
    let mut b2 = bufs(16);
    let mut s2 = engine(&mut b2, NO_BBM, VaSize::Bits48);
    s2.map(va(G1), pa(G1), K4, Attributes::DATA).unwrap();
    assert!(s2.query(va(G1)).unwrap().dirty);
    s2.wrprotect(va(G1), K4).unwrap();
    assert!(s2.query(va(G1)).unwrap().dirty);
    check(&mut s2);
}

fn unsafe_read(s: &Stage1<FakePlatform<'_>>, t: PhysAddr, i: usize) -> u64 {
    // SAFETY: `t` came from `leaf_entry` on a live tree, `i < 512`.
    unsafe { s.platform().read_entry(t, i) }
}

#[test]
fn split_block_and_free_tables_when_empty() {
    for f in [NO_BBM, Features::ALL] {
        let mut s = tree(f);
        s.map(va(G1), pa(G1), M2, Attributes::DATA).unwrap();
        let tables = s.platform().tables_in_use();
        s.unmap(va(G1 + 3 * K4), K4).unwrap();
        check(&mut s);
        assert_eq!(s.platform().tables_in_use(), tables + 1);
        assert_units(&s, &[(MappingUnit::Cont64K, 31), (MappingUnit::Page4K, 15)]);
        assert!(s.query(va(G1 + 3 * K4)).is_err());
        assert_eq!(s.query(va(G1 + 4 * K4)).unwrap().output, pa(G1 + 4 * K4));
        // Remap the hole: the table collapses back into the block.
        s.map(va(G1 + 3 * K4), pa(G1 + 3 * K4), K4, Attributes::DATA)
            .unwrap();
        check(&mut s);
        assert_eq!(s.summary().count(MappingUnit::Block2M), 1);
        assert_eq!(s.platform().tables_in_use(), tables);
        // Unmapping everything frees every table but the root.
        s.unmap(va(G1), M2).unwrap();
        check(&mut s);
        assert_eq!(s.platform().tables_in_use(), 1);
    }
}

#[test]
fn split_1g_block_down_to_a_page() {
    let mut b = bufs(16);
    let mut s = engine(&mut b, NO_BBM, VaSize::Bits39);
    s.map(va(G1), pa(G1), G1, Attributes::DATA).unwrap();
    s.protect(va(G1 + 7 * M2 + K4), K4, Attributes::RODATA)
        .unwrap();
    check(&mut s);
    assert_units(
        &s,
        &[
            (MappingUnit::Cont32M, 31),
            (MappingUnit::Block2M, 15),
            (MappingUnit::Cont64K, 31),
            (MappingUnit::Page4K, 16),
        ],
    );
    s.protect(va(G1 + 7 * M2 + K4), K4, Attributes::DATA)
        .unwrap();
    check(&mut s);
    assert_eq!(s.summary().count(MappingUnit::Block1G), 1);
    assert_eq!(s.platform().tables_in_use(), 1);
}

#[test]
fn page_by_page_map_ends_as_one_block() {
    for f in [NO_BBM, Features::ALL] {
        let mut s = tree(f);
        for p in 0..512 {
            s.map(va(M2 + p * K4), pa(M2 + p * K4), K4, Attributes::DATA)
                .unwrap();
            if p % 61 == 0 {
                check(&mut s);
            }
        }
        check(&mut s);
        assert_eq!(s.summary().count(MappingUnit::Block2M), 1);
        assert_eq!(s.platform().tables_in_use(), 3);
    }
}

#[test]
fn limit_then_explicit_refold() {
    let mut s = tree(NO_BBM);
    map_2m_of_pages(&mut s, M2);
    assert_eq!(s.summary().count(MappingUnit::Page4K), 512);
    let mut advisory = 0;
    assert_eq!(
        s.lint(&mut |v| advisory += v.rule.is_advisory() as usize),
        0
    );
    assert_eq!(advisory, 33, "32 missed folds + 1 missed collapse");
    s.refold(va(M2), K4).unwrap();
    check(&mut s);
    assert_eq!(s.summary().count(MappingUnit::Block2M), 1);
}

#[test]
fn out_of_table_memory_rolls_back() {
    let mut b = bufs(64);
    let mut s = engine(&mut b, NO_BBM, VaSize::Bits48);
    s.map(va(G1), pa(G1), M2, Attributes::DATA).unwrap();
    let before = s.summary();
    let tables = s.platform().tables_in_use();
    // 8 MiB of pages needs 4 level-3 tables; allow only 2.
    s.platform_mut().set_alloc_limit(Some(2));
    let r = s.map_limited(
        va(4 * G1),
        pa(0),
        4 * M2,
        Attributes::DATA,
        MappingUnit::Page4K,
    );
    assert_eq!(r, Err(Stage1Error::OutOfTableMemory));
    check(&mut s);
    assert_eq!(s.summary(), before);
    assert_eq!(s.platform().tables_in_use(), tables);
    // A split with no memory is refused before any write.
    s.platform_mut().set_alloc_limit(Some(0));
    s.platform_mut().reset_counters();
    assert_eq!(s.unmap(va(G1), K4), Err(Stage1Error::OutOfTableMemory));
    assert_eq!(s.platform().counters().writes, 0);
    s.platform_mut().set_alloc_limit(None);
    s.unmap(va(G1), K4).unwrap();
    check(&mut s);
}

#[test]
fn young_clear_covers_the_run_in_place() {
    for f in [NO_BBM, RANGE] {
        let mut s = run_at_1g(f);
        s.platform_mut().reset_counters();
        assert!(s.test_and_clear_young(va(G1 + 3 * K4)).unwrap());
        check(&mut s);
        let c = s.platform().counters();
        within("writes", c.writes, 16);
        within("DSB ISH", c.dsb_ish, 1);
        within("TLBIs", c.tlbi(), if f.tlbi_range { 1 } else { 16 });
        s.platform_mut().reset_counters();
        assert!(!s.test_and_clear_young(va(G1)).unwrap());
        assert_eq!(s.platform().counters().writes, 0);
    }
}

#[test]
fn device_and_image_layout() {
    let mut b = bufs(32);
    let mut s = engine(&mut b, NO_BBM, VaSize::Bits48);
    let base = 0x4008_0000;
    s.map(va(base), pa(base), 0x3_0000, Attributes::TEXT)
        .unwrap();
    s.map(
        va(base + 0x3_0000),
        pa(base + 0x3_0000),
        0x1_0000,
        Attributes::RODATA,
    )
    .unwrap();
    s.map(
        va(base + 0x4_0000),
        pa(base + 0x4_0000),
        0x4_0000,
        Attributes::DATA,
    )
    .unwrap();
    s.map(va(0x0900_0000), pa(0x0900_0000), K4, Attributes::DEVICE)
        .unwrap();
    check(&mut s);
    let q = s.query(va(0x0900_0000)).unwrap();
    assert_eq!(q.attributes.kind, MemoryKind::DeviceNgnre);
    assert_units(&s, &[(MappingUnit::Cont64K, 8), (MappingUnit::Page4K, 1)]);
}

/// The checker itself catches the mistakes it exists for.
#[test]
fn checker_catches_bbm_mistakes() {
    let (mut p, root) = bare_fake();
    let page = |oa: u64| Descriptor(0b11 | Descriptor::AF | oa).bits();
    let scope = TlbiScope {
        last_level_only: true,
        level: Some(3),
    };
    // SAFETY: `root` is allocated, indices < 512.
    unsafe {
        p.write_entry(root, 0, page(0x1000));
        // Live output-address change in place.
        p.write_entry(root, 0, page(0x2000));
        assert_eq!(p.violation_count(), 1);
        // Clear, then make without TLBI.
        p.write_entry(root, 0, 0);
        p.write_entry(root, 0, page(0x3000));
        assert_eq!(p.violation_count(), 2);
        // Clear, TLBI without DSB ISHST before it, and without DSB ISH after.
        p.write_entry(root, 1, page(0x1000));
        p.write_entry(root, 1, 0);
        p.tlbi_va(VirtAddr(K4), scope);
        assert_eq!(p.violation_count(), 3);
        p.write_entry(root, 1, page(0x5000));
        assert_eq!(p.violation_count(), 4);
        // Wrong level hint does not count as invalidation.
        p.write_entry(root, 2, page(0x1000));
        p.write_entry(root, 2, 0);
        p.dsb_ishst();
        p.tlbi_va(
            VirtAddr(2 * K4),
            TlbiScope {
                level: Some(2),
                ..scope
            },
        );
        p.dsb_ish();
        assert!(p.unflushed() > 0);
        // The right sequence is clean.
        p.tlbi_va(VirtAddr(2 * K4), scope);
        p.dsb_ish();
        p.write_entry(root, 2, page(0x6000));
        assert_eq!(p.violation_count(), 4);
    }
}

/// Budgets of the common operations, both TLBI paths.
#[test]
fn common_operations_stay_within_budget() {
    for f in [NO_BBM, RANGE] {
        let per_run = if f.tlbi_range { 1 } else { 16 };
        let mut s = tree(f);
        s.map(va(G1 + M2 - K4), pa(G1 + M2 - K4), K4, Attributes::DATA)
            .unwrap();
        // Fresh 64 KiB run into an existing table: 16 stores, no TLBI.
        s.platform_mut().reset_counters();
        s.map(va(G1), pa(G1), K64, Attributes::DATA).unwrap();
        check(&mut s);
        let c = s.platform().counters();
        within("fresh run writes", c.writes, 16);
        within("fresh run TLBIs", c.tlbi(), 0);
        within("fresh run DSB ISHST", c.dsb_ishst, 1);
        within("fresh run DSB ISH", c.dsb_ish, 0);
        within("fresh run ISB", c.isb, 1);
        // Unmapping the whole run: 16 clears, one TLBI pass, one DSB ISH.
        s.platform_mut().reset_counters();
        s.unmap(va(G1), K64).unwrap();
        check(&mut s);
        let c = s.platform().counters();
        within("unmap writes", c.writes, 16);
        within("unmap TLBIs", c.tlbi(), per_run);
        within("unmap DSB ISH", c.dsb_ish, 1);
        // A 2 MiB block: one store.
        s.platform_mut().reset_counters();
        s.map(va(G1 + 4 * M2), pa(2 * G1), M2, Attributes::DATA)
            .unwrap();
        let c = s.platform().counters();
        within("block writes", c.writes, 1);
        within("block tables", c.allocs, 0);
        // 2 MiB of plain pages, then refold: the table collapses straight
        // into a block (clear, TLBI, DSB, block), no run folding first.
        map_2m_of_pages(&mut s, 3 * G1);
        s.platform_mut().reset_counters();
        s.refold(va(3 * G1), M2).unwrap();
        check(&mut s);
        let c = s.platform().counters();
        within("collapse writes", c.writes, 2);
        within("collapse DSB ISH", c.dsb_ish, 1);
        // Range TLBI, or TLBI ALL for 512 pages.
        within("collapse TLBIs", c.tlbi(), 1);
        assert_eq!(c.frees, 1, "the collapsed table is freed");
        assert_eq!(s.summary().count(MappingUnit::Block2M), 2);
    }
}

/// FEAT_HAFDBS races: the hardware sets AF/dirty between the engine's read
/// and its compare-and-swap; nothing may be lost.
#[test]
fn hardware_updates_racing_with_the_engine_are_kept() {
    for f in [RANGE, Features::ALL] {
        // In-place write-protect of a whole run.
        let mut s = run_at_1g(f);
        let (t, i) = race_dirty(&mut s, G1 + 3 * K4, false);
        s.wrprotect(va(G1), K64).unwrap();
        check(&mut s);
        let d = Descriptor(unsafe_read(&s, t, i));
        assert!(d.has(Descriptor::SW_DIRTY) && !d.is_writable(), "{d:?}");
        assert!(s.query(va(G1)).unwrap().dirty);

        // Break-before-make of a run: the clear itself races.
        let mut s = run_at_1g(f);
        let (t, i) = race_dirty(&mut s, G1 + 7 * K4, false);
        s.protect(va(G1 + 2 * K4), K4, Attributes::RODATA).unwrap();
        check(&mut s);
        let d = Descriptor(unsafe_read(&s, t, i));
        assert!(d.is_dirty() && d.is_writable(), "{d:?}");

        // Splitting a block: the block's new dirty state reaches every page.
        let mut s = tree(f);
        s.map(va(G1), pa(G1), M2, Attributes::DATA).unwrap();
        race_dirty(&mut s, G1, false);
        s.unmap(va(G1 + 100 * K4), K4).unwrap();
        check(&mut s);
        for p in [0, 1, 99, 101, 511] {
            assert!(s.query(va(G1 + p * K4)).unwrap().dirty, "page {p}");
        }
    }
}

/// Every page still mapped in `[base, base + pages * K4)` reads `want`
/// (young and dirty), page by page.
fn assert_all_state(s: &Stage1<FakePlatform<'_>>, base: u64, pages: u64, step: u64, what: &str) {
    for p in 0..pages {
        if let Ok(q) = s.query(va(base + p * step)) {
            assert!(q.young && q.dirty, "{what}: page {p} lost its state: {q:?}");
        }
    }
}

/// The hardware marks entry 9 of a 64 KiB run dirty (it may
/// use any entry of a run); a partial change must carry that state into
/// every entry it writes, on the break-before-make and the BBM level 2 path.
#[test]
fn splitting_a_run_keeps_its_access_and_dirty_state() {
    type Op = fn(&mut Stage1<FakePlatform<'_>>) -> Result<(), Stage1Error>;
    let ops: [(&str, Op); 3] = [
        ("protect page 5", |s| {
            s.protect(va(G1 + 5 * K4), K4, Attributes::RODATA)
        }),
        ("unmap page 9", |s| s.unmap(va(G1 + 9 * K4), K4)),
        ("wrprotect pages 2-4", |s| {
            s.wrprotect(va(G1 + 2 * K4), 3 * K4)
        }),
    ];
    for f in [RANGE, Features::ALL] {
        for (what, op) in ops {
            let mut s = run_at_1g(f);
            // Start from clean and old, so only the hardware's update counts.
            assert!(s.test_and_clear_young(va(G1)).unwrap());
            let (t, i, _) = s.leaf_entry(va(G1 + 9 * K4)).unwrap();
            s.platform_mut().hw_touch(t, i, true);
            op(&mut s).unwrap();
            check(&mut s);
            assert_eq!(s.summary().count(MappingUnit::Cont64K), 0, "{what}");
            assert_all_state(&s, G1, 16, K4, &format!("{what}, {f:?}"));
        }
    }
}

/// The same for a 32 MiB run of 2 MiB blocks: the block split by a partial
/// change gets the run's state in every page, the other blocks too.
#[test]
fn splitting_a_block_run_keeps_its_access_and_dirty_state() {
    for f in [RANGE, Features::ALL] {
        let mut s = tree(f);
        s.map(va(M32), pa(M32), M32, Attributes::DATA).unwrap();
        assert_eq!(s.summary().count(MappingUnit::Cont32M), 1);
        assert!(s.test_and_clear_young(va(M32)).unwrap());
        let (t, i, _) = s.leaf_entry(va(M32 + 9 * M2)).unwrap();
        s.platform_mut().hw_touch(t, i, true);
        s.unmap(va(M32 + 5 * M2 + 7 * K4), K4).unwrap();
        check(&mut s);
        assert_all_state(&s, M32, 16, M2, &format!("blocks, {f:?}"));
        assert_all_state(&s, M32 + 5 * M2, 512, K4, &format!("split block, {f:?}"));
    }
}

/// Item 1 with a race: the hardware marks entry 12 dirty while the engine
/// is rewriting the run (just before its compare-and-swap on entry 12, when
/// entries 0-11 may already hold their new values).
#[test]
fn state_set_while_a_run_is_rewritten_reaches_every_entry() {
    for f in [RANGE, Features::ALL] {
        let s = unfold_with_a_racing_write(f, false);
        assert_all_state(&s, G1, 16, K4, &format!("{f:?}"));
    }
}

/// The table entry at `level` on the walk of `va` (its table and index).
fn entry_at(s: &Stage1<FakePlatform<'_>>, v: u64, level: u8) -> (PhysAddr, usize) {
    let mut table = s.root();
    let mut l = s.va_size().start_level();
    loop {
        let index = ((v >> (12 + 9 * (3 - l as u32))) & 511) as usize;
        if l == level {
            return (table, index);
        }
        table = Descriptor(unsafe_read(s, table, index)).table_address();
        l += 1;
    }
}

/// A table collapsing into a block keeps a write the
/// hardware makes through one of its leaves after the engine scanned them:
/// just before the parent entry is swapped, or while the TLBI is running.
#[test]
fn collapse_keeps_writes_made_after_the_scan() {
    for f in [RANGE, Features::ALL] {
        for at_tlbi in [false, true] {
            for by_map in [false, true] {
                let mut s = tree(f);
                let limit = MappingUnit::Page4K;
                s.map_limited(va(M2), pa(M2), M2, Attributes::DATA, limit)
                    .unwrap();
                if by_map {
                    s.unmap(va(M2 + 7 * K4), K4).unwrap();
                }
                assert!(!s.query(va(M2)).unwrap().dirty);
                let (t, i, _) = s.leaf_entry(va(M2 + 100 * K4)).unwrap();
                if at_tlbi {
                    s.platform_mut().race_next_tlbi(t, i, true);
                } else {
                    let parent = entry_at(&s, M2, 2);
                    s.platform_mut()
                        .race_next_swap_touching(parent, (t, i), true);
                }
                if by_map {
                    s.map_limited(
                        va(M2 + 7 * K4),
                        pa(M2 + 7 * K4),
                        K4,
                        Attributes::DATA,
                        MappingUnit::LARGEST,
                    )
                    .unwrap();
                } else {
                    s.refold(va(M2), M2).unwrap();
                }
                check(&mut s);
                let q = s.query(va(M2)).unwrap();
                assert_eq!(q.unit, MappingUnit::Block2M);
                assert!(
                    q.dirty,
                    "{f:?} at_tlbi {at_tlbi} by_map {by_map}: write lost"
                );
            }
        }
    }
}

/// While no walker can use the tree (it is being built
/// before TTBR0 and the MMU are set up, when data accesses may be Device
/// memory), every descriptor is written with a plain store.
#[test]
fn a_detached_tree_is_written_without_compare_and_swap() {
    for f in [NO_BBM, Features::ALL] {
        let mut b = bufs(32);
        let p = FakePlatform::new(&mut b.frames, &mut b.log, f, 0);
        let mut s = Stage1::new_detached(p, VaSize::Bits48, f).unwrap();
        assert!(!s.is_live());
        s.map(va(G1), pa(G1), M2, Attributes::DATA).unwrap();
        s.map(va(2 * G1), pa(2 * G1), K64, Attributes::DATA)
            .unwrap();
        s.protect(va(G1 + 5 * K4), K4, Attributes::RODATA).unwrap();
        s.protect(va(2 * G1 + 5 * K4), K4, Attributes::RODATA)
            .unwrap();
        s.unmap(va(2 * G1 + 9 * K4), K4).unwrap();
        s.wrprotect(va(G1), K64).unwrap();
        assert!(s.test_and_clear_young(va(G1 + M2 - K4)).unwrap());
        s.protect(va(G1), M2, Attributes::DATA).unwrap();
        check(&mut s);
        assert_eq!(s.summary().count(MappingUnit::Block2M), 1);
        assert_eq!(s.platform().swaps(), 0, "{f:?}");
        // Live: rewrites of valid entries are compare-and-swaps again.
        s.set_live();
        assert!(s.is_live());
        s.protect(va(G1 + 5 * K4), K4, Attributes::RODATA).unwrap();
        check(&mut s);
        assert!(s.platform().swaps() > 0);
        // The default is the safe one.
        let mut b = bufs(4);
        let p = FakePlatform::new(&mut b.frames, &mut b.log, f, 0);
        assert!(Stage1::new(p, VaSize::Bits48, f).unwrap().is_live());
    }
}

/// Every descriptor of the tree, in walk order (to compare whole trees).
fn dump(s: &Stage1<FakePlatform<'_>>) -> Vec<(u8, usize, u64)> {
    fn walk(s: &Stage1<FakePlatform<'_>>, t: PhysAddr, level: u8, out: &mut Vec<(u8, usize, u64)>) {
        for i in 0..512 {
            let d = Descriptor(unsafe_read(s, t, i));
            if d.is_valid() {
                out.push((level, i, if d.is_table(level) { 3 } else { d.bits() }));
                if d.is_table(level) {
                    walk(s, d.table_address(), level + 1, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(s, s.root(), s.va_size().start_level(), &mut out);
    out
}

/// A 16 GiB run of 1 GiB blocks at 16 GiB and a 32 MiB run of 2 MiB blocks
/// at 32 GiB + 32 MiB.
fn two_runs(b: &mut Bufs, f: Features) -> Stage1<FakePlatform<'_>> {
    let mut s = engine(b, f, VaSize::Bits48);
    s.map(va(16 * G1), pa(16 * G1), 16 * G1, Attributes::DATA)
        .unwrap();
    s.map(va(32 * G1 + M32), pa(M32), M32, Attributes::DATA)
        .unwrap();
    s
}

/// An operation that must split partly covered blocks
/// (1 GiB, 2 MiB, at one or both ends, inside contiguous runs of blocks)
/// either gets every table it needs or fails with OutOfTableMemory and
/// changes nothing. For each case the tables the operation allocates with
/// unlimited memory are counted; one fewer must be refused cleanly.
#[test]
fn a_split_without_table_memory_fails_and_changes_nothing() {
    type Op = fn(&mut Stage1<FakePlatform<'_>>, u64, u64) -> Result<(), Stage1Error>;
    let ops: [Op; 3] = [
        |s, a, n| s.unmap(va(a), n),
        |s, a, n| s.protect(va(a), n, Attributes::RODATA),
        |s, a, n| s.wrprotect(va(a), n),
    ];
    // Start and length of the changed range, relative to the 16 GiB run at
    // 16 GiB (1 GiB blocks), then to the 32 MiB run at 32 GiB + 32 MiB.
    let cases = [
        (3 * G1 + 5 * M2 + 3 * K4, K4),
        (3 * G1 + 5 * M2, M2 + K4),
        (3 * G1 + 5 * M2 + K4, 2 * G1),
        (3 * G1 + K4, G1 - 2 * K4),
        (3 * G1 + M2, G1 - 2 * M2),
        (G1 - K4, 2 * K4),
        (G1 - M2, M2 + K4),
    ];
    let mut max_need = 0;
    for f in [NO_BBM, Features::ALL] {
        for (o, op) in ops.iter().enumerate() {
            for (c, &(off, len)) in cases.iter().enumerate() {
                for base in [16 * G1, 32 * G1 + M32] {
                    let (off, len) = if base == 16 * G1 {
                        (off, len)
                    } else {
                        (off % M32, len.min(M32 - off % M32))
                    };
                    let mut b = bufs(32);
                    let mut s = two_runs(&mut b, f);
                    let a0 = s.platform().counters().allocs;
                    op(&mut s, base + off, len).unwrap();
                    check(&mut s);
                    let need = s.platform().counters().allocs - a0;
                    assert!(
                        need >= (base == 16 * G1) as u64 && need <= 4,
                        "{need} for case {c}"
                    );
                    max_need = max_need.max(need);
                    for limit in 0..need {
                        let what =
                            format!("{f:?} op {o} case {c} base {base:#x} limit {limit}/{need}");
                        let mut b = bufs(32);
                        let mut s = two_runs(&mut b, f);
                        let before = dump(&s);
                        let tables = s.platform().tables_in_use();
                        s.platform_mut().set_alloc_limit(Some(limit));
                        s.platform_mut().reset_counters();
                        assert_eq!(
                            op(&mut s, base + off, len),
                            Err(Stage1Error::OutOfTableMemory),
                            "{what}"
                        );
                        assert_eq!(s.platform().counters().writes, 0, "{what}");
                        assert_eq!(dump(&s), before, "{what}");
                        assert_eq!(s.platform().tables_in_use(), tables, "{what}");
                        check(&mut s);
                    }
                }
            }
        }
    }
    assert_eq!(max_need, 4, "both ends split twice");
}

/// A table-memory provider that fails
/// (here: busy) is a typed error, never "out of memory" and never a made-up
/// count; a table whose count cannot be read is never freed or collapsed.
#[test]
fn table_memory_failures_are_reported_and_never_free_a_live_table() {
    for f in [NO_BBM, Features::ALL] {
        let busy = Err(Stage1Error::TableMemory(TableMemoryError::Busy));
        let mut s = tree(f);
        s.map(va(G1), pa(G1), 3 * K4, Attributes::DATA).unwrap();
        s.map(va(2 * G1), pa(2 * G1), M2, Attributes::DATA).unwrap();
        map_2m_of_pages(&mut s, 3 * G1);
        let tables = s.platform().tables_in_use();
        let before = dump(&s);
        s.platform_mut().set_busy(true);
        s.platform_mut().reset_counters();
        // Needs a new table, a split table, a count: refused before any write.
        assert_eq!(s.map(va(4 * G1), pa(0), K4, Attributes::DATA), busy);
        assert_eq!(s.map(va(4 * G1), pa(0), 8 * M2, Attributes::DATA), busy);
        assert_eq!(s.protect(va(2 * G1), K4, Attributes::RODATA), busy);
        assert_eq!(s.platform().counters().writes, 0);
        assert_eq!(dump(&s), before);
        // A count that cannot be read: runs may fold (that needs no count),
        // but the table is not collapsed.
        assert_eq!(s.refold(va(3 * G1), M2), busy);
        assert_eq!(s.query(va(3 * G1)).unwrap().unit, MappingUnit::Cont64K);
        // The page is unmapped, but the table and its other pages stay.
        assert_eq!(s.unmap(va(G1 + K4), K4), busy);
        s.platform_mut().set_busy(false);
        assert_eq!(s.platform().tables_in_use(), tables);
        assert_eq!(s.platform().counters().frees, 0);
        assert!(s.query(va(G1 + K4)).is_err());
        for p in [0, 2] {
            assert_eq!(s.query(va(G1 + p * K4)).unwrap().output, pa(G1 + p * K4));
        }
        // The linter shows the count the provider could not update.
        let mut found = Vec::new();
        s.lint(&mut |v| found.push(v.rule));
        found.retain(|r| !r.is_advisory());
        assert_eq!(
            found,
            [Rule::ValidCountMismatch {
                recorded: 3,
                actual: 2
            }]
        );
        // While busy the linter reports unreadable counts, not mismatches.
        s.platform_mut().set_busy(true);
        let mut found = Vec::new();
        s.lint(&mut |v| found.push(v.rule));
        assert!(
            found.iter().all(|r| *r == Rule::ValidCountUnreadable),
            "{found:?}"
        );
        assert!(!found.is_empty());
        s.platform_mut().set_busy(false);
        assert_eq!(s.refold(va(3 * G1), M2), Ok(()));
        assert_eq!(s.query(va(3 * G1)).unwrap().unit, MappingUnit::Block2M);
    }
}

/// Changing the memory type of part of a block splits it
/// with break-before-make even under FEAT_BBM level 2 (only a pure size
/// change may be done in place), and the checker sees a table whose leaves
/// translate differently from the block it replaced in place.
#[test]
fn memory_type_change_inside_a_block_breaks_even_with_bbm2() {
    let nc = Attributes {
        kind: MemoryKind::NormalNonCacheable,
        ..Attributes::DATA
    };
    for (l, size) in [(2, M2), (1, G1)] {
        for to in [nc, Attributes::DEVICE] {
            let mut s = tree(Features::ALL);
            s.map(va(G1), pa(G1), size, Attributes::DATA).unwrap();
            let (t, i) = entry_at(&s, G1, l);
            let block = unsafe_read(&s, t, i);
            s.platform_mut().reset_counters();
            s.protect(va(G1 + 3 * K4), K4, to).unwrap();
            check(&mut s);
            assert_eq!(s.query(va(G1 + 3 * K4)).unwrap().attributes, to);
            let cleared = s.platform().log().iter().any(|e| {
                matches!(e, Event::Write { table, index, old, new: 0 }
                    if *table == t && *index as usize == i && *old == block)
            });
            assert!(cleared, "level {l} block split in place for {to:?}");
        }
    }
    // The checker catches an in-place split that changes the type.
    let mut frames = vec![FakeFrame::new(); 4];
    let mut log = vec![Event::Isb; 64];
    let mut p = FakePlatform::new(&mut frames, &mut log, Features::ALL, 2);
    let root = p.alloc_table().unwrap();
    let split = p.alloc_table().unwrap();
    let block = Descriptor(0b01 | Descriptor::AF | M2);
    // SAFETY: both tables are allocated, indices < 512.
    unsafe {
        p.write_entry(root, 1, block.bits());
        for k in 0..512 {
            let page = Descriptor(0b11 | Descriptor::AF | (M2 + k * K4));
            let page = if k == 3 {
                page.with(1 << 2, true)
            } else {
                page
            };
            p.write_entry(split, k as usize, page.bits());
        }
        p.write_entry(root, 1, Descriptor::table(split).bits());
    }
    assert!(matches!(
        p.violations().next(),
        Some(fake::BbmViolation::LiveChangeNeedsBreak { .. })
    ));
}

/// The access flag the hardware sets between the engine's
/// read and its compare-and-swap is kept (not only the dirty state), for
/// in-place changes of a run and of a block.
#[test]
fn racing_access_flag_is_kept() {
    for f in [RANGE, Features::ALL] {
        for len in [K64, M2] {
            let mut s = tree(f);
            s.map(va(M2), pa(M2), len, Attributes::DATA).unwrap();
            assert!(s.test_and_clear_young(va(M2)).unwrap());
            let (t, i, _) = s.leaf_entry(va(M2 + 3 * K4)).unwrap();
            s.platform_mut().race_next_swap(t, i, false);
            s.wrprotect(va(M2), len).unwrap();
            check(&mut s);
            let q = s.query(va(M2)).unwrap();
            assert!(q.young && !q.attributes.write, "{f:?} {len:#x}: {q:?}");
        }
    }
}

/// One operation changing leaves of two levels in place
/// (a 2 MiB block and a 64 KiB run) must invalidate both: a TTL level hint
/// of 3 would leave the block's TLB entries in place.
#[test]
fn mixed_level_changes_invalidate_both_levels() {
    for f in [RANGE, Features::ALL] {
        let mut s = tree(f);
        s.map(va(M2), pa(M2), M2 + K64, Attributes::DATA).unwrap();
        let sum = s.summary();
        assert_eq!(
            (
                sum.count(MappingUnit::Block2M),
                sum.count(MappingUnit::Cont64K)
            ),
            (1, 1)
        );
        s.wrprotect(va(M2), M2 + K64).unwrap();
        // The checker: no TLB entry of either level is left behind.
        check(&mut s);
        assert!(!s.query(va(M2)).unwrap().attributes.write);
    }
}

/// Item 1 on the BBM level 2 path: until the TLBI completes, a walker may
/// still use the old run and record a write in any of its (now rewritten)
/// entries; the engine re-reads the run after the TLBI.
#[test]
fn state_set_before_the_tlbi_of_an_in_place_unfold_reaches_every_entry() {
    for f in [RANGE, Features::ALL] {
        let s = unfold_with_a_racing_write(f, true);
        if f.bbm_level >= 2 {
            assert_all_state(&s, G1, 16, K4, &format!("{f:?}"));
        }
    }
}

/// The checker: a cached copy of one entry of a contiguous run may
/// translate any page of the run, so a TLBI of that entry's page alone does
/// not remove it; TLBIs over all 16 pages do.
#[test]
fn checker_wants_the_whole_run_invalidated() {
    let (mut p, root) = bare_fake();
    let scope = TlbiScope {
        last_level_only: true,
        level: Some(3),
    };
    let run =
        |k: u64| (Descriptor(0b11 | Descriptor::AF | Descriptor::CONT | (K64 + k * K4))).bits();
    // SAFETY: `root` is allocated, indices < 512.
    unsafe {
        for k in 0..16 {
            p.write_entry(root, 16 + k as usize, run(k));
        }
        p.write_entry(root, 21, run(5) | Descriptor::AP_READ_ONLY);
    }
    p.dsb_ishst();
    p.tlbi_va(VirtAddr(K64 + 5 * K4), scope);
    p.dsb_ish();
    assert!(p.unflushed() > 0, "one page of the run is not enough");
    for k in 0..16 {
        p.tlbi_va(VirtAddr(K64 + k * K4), scope);
    }
    p.dsb_ish();
    assert_eq!(p.unflushed(), 0);
    assert_eq!(p.violation_count(), 0);
}

/// Item 1, found by the model test: the hardware records a write to page 2
/// of a run in entry 3 just before the engine unmaps pages 3-15; pages 0-2
/// keep that state (entry 3 itself is gone, so only the value the
/// compare-and-swap found still shows it).
#[test]
fn state_recorded_in_an_entry_being_unmapped_is_kept() {
    for f in [RANGE, Features::ALL] {
        let mut s = run_at_1g(f);
        assert!(s.test_and_clear_young(va(G1)).unwrap());
        race_dirty(&mut s, G1 + 3 * K4, false);
        s.unmap(va(G1 + 3 * K4), 13 * K4).unwrap();
        check(&mut s);
        assert_all_state(&s, G1, 3, K4, &format!("{f:?}"));
    }
}

/// Without FEAT_BBM level 2, splitting a block of a live 32 MiB run breaks
/// the whole run. When the run maps the engine's own table frames (as the
/// firmware's identity map of RAM does), nothing may touch a table inside
/// it between the break and the make: the new level-3 table must be built
/// and filled before the break, and the collapse back into a block must
/// re-read the old table only after the make.
#[test]
fn split_and_collapse_of_a_run_holding_its_own_tables() {
    let mut b = bufs(64);
    // Frame 3 (the split table) lies at the run's first page.
    let (mut s, run) = run_over_its_own_tables(&mut b, NO_BBM);
    assert_eq!(s.summary().count(MappingUnit::Cont32M), 1);
    assert_eq!(s.platform().tables_in_use(), 3);
    s.platform_mut().set_table_window(Some(va(run - 3 * K4)));
    let page = run + 5 * M2 + K64;
    s.unmap(va(page), K4).unwrap();
    check(&mut s);
    assert!(s.query(va(page)).is_err());
    assert_eq!(s.platform().tables_in_use(), 4);
    // The refold collapses the table at the run's first page back into
    // the block it maps and re-forms the run: both break the whole run.
    s.map(va(page), pa(page), K4, Attributes::DATA).unwrap();
    check(&mut s);
    assert_eq!(s.summary().count(MappingUnit::Cont32M), 1);
    assert_eq!(s.platform().tables_in_use(), 3);
    let t = s.query(va(page)).unwrap();
    assert_eq!((t.output, t.unit), (pa(page), MappingUnit::Cont32M));
    assert!(t.young && t.dirty);
}

/// As above with FEAT_HAFDBS: a write the hardware records in the block
/// just before the break reaches the new table's leaves (and, the run
/// being unfolded, every entry of the group) after the make, still without
/// touching a table inside the broken run.
#[test]
fn split_of_a_run_holding_its_own_tables_keeps_a_racing_write() {
    let mut b = bufs(64);
    let (mut s, run) = run_over_its_own_tables(&mut b, RANGE);
    s.platform_mut().set_table_window(Some(va(run - 3 * K4)));
    let block = run + 5 * M2;
    assert!(!s.query(va(block)).unwrap().dirty);
    let (t, i, level) = s.leaf_entry(va(block)).unwrap();
    assert_eq!(level, 2);
    s.platform_mut().race_next_swap(t, i, true);
    s.unmap(va(block + K64), K4).unwrap();
    assert_eq!(s.platform_mut().take_race_effect(), Some((true, true)));
    check(&mut s);
    assert!(s.query(va(block + M2 - K4)).unwrap().dirty);
    assert!(s.query(va(block)).unwrap().dirty);
    assert!(s.query(va(run)).unwrap().dirty);
}

/// A table frame goes back to the provider only after
/// the TLB maintenance that stops every walker using it: after the store
/// that unlinked it, a TLBI that also removes walk-cache entries (not
/// last-level only) and then a `DSB ISH` (which waits for the TLBI on every
/// core of the Inner Shareable domain). Checked on the log for frees at the
/// end of an operation, frees in the middle of one (more tables than a free
/// batch holds) and tables collapsed into a block, with and without range
/// TLBI and FEAT_BBM level 2.
#[test]
fn table_frames_are_freed_only_after_a_walk_tlbi_and_dsb() {
    /// Checks the order in `log`; returns how many linked tables were freed.
    fn freed_after_maintenance(log: &[Event]) -> usize {
        let mut checked = 0;
        for (at, e) in log.iter().enumerate() {
            let Event::Free(table) = *e else { continue };
            let linked = Descriptor::table(table);
            let Some(unlinked) = log[..at].iter().rposition(|e| {
                matches!(*e, Event::Write { old, new, .. } if old == linked.bits() && new != old)
            }) else {
                continue; // never linked: no walker can have used it
            };
            let after = &log[unlinked..at];
            let tlbi = after
                .iter()
                .position(|e| match e {
                    Event::TlbiAll => true,
                    Event::TlbiVa { scope, .. } | Event::TlbiRange { scope, .. } => {
                        !scope.last_level_only
                    }
                    _ => false,
                })
                .unwrap_or_else(|| panic!("{table:?} freed without a walk TLBI"));
            assert!(
                after[tlbi..].contains(&Event::DsbIsh),
                "{table:?} freed before DSB ISH completed its TLBI"
            );
            checked += 1;
        }
        checked
    }
    for f in [NO_BBM, RANGE, Features::ALL] {
        let mut b = Bufs {
            frames: vec![FakeFrame::new(); 64],
            log: vec![Event::Isb; 1 << 16],
        };
        let mut s = engine(&mut b, f, VaSize::Bits48);
        // 20 level-3 tables (more than one free batch), unmapped at once.
        let base = 4 * G1;
        s.map_limited(
            va(base),
            pa(base),
            20 * M2,
            Attributes::DATA,
            MappingUnit::Page4K,
        )
        .unwrap();
        s.platform_mut().reset_counters();
        s.unmap(va(base), 20 * M2).unwrap();
        check(&mut s);
        assert_eq!(s.platform().log_dropped(), 0);
        assert!(freed_after_maintenance(s.platform().log()) >= 20, "{f:?}");
        // A table collapsed into a block: split a block, then make the
        // page like the others again (the table folds back at once).
        s.map(va(base), pa(base), M2, Attributes::DATA).unwrap();
        s.protect(va(base), K4, Attributes::RODATA).unwrap();
        s.platform_mut().reset_counters();
        s.protect(va(base), K4, Attributes::DATA).unwrap();
        check(&mut s);
        assert_eq!(s.summary().count(MappingUnit::Block2M), 1, "{f:?}");
        assert_eq!(freed_after_maintenance(s.platform().log()), 1, "{f:?}");
    }
}

/// A tree that maps its own table frames (the firmware's identity
/// map of RAM) with the tables inside a block or run that their own
/// entries map cannot split it without FEAT_BBM level 2: the break unmaps
/// the table the make must write. With every table frame in a chunk
/// pinned to small units (`pin_small`; the fake's frames are that chunk),
/// no block or run that is ever broken holds a table: 64 KiB pieces come
/// out of every 2 MiB block (the 1 GiB block, the 32 MiB runs, the blocks
/// beside the pinned chunk) and go back, refolded, with no table access
/// through an unmapped VA.
#[test]
fn tables_in_a_pinned_chunk_survive_splits_without_bbm() {
    let mut b = bufs(600);
    let mut s = engine(&mut b, NO_BBM, VaSize::Bits48);
    let ram = G1;
    let pool = ram + 37 * M2;
    s.pin_small(va(pool), M2).unwrap();
    s.map(va(ram), pa(ram), G1, Attributes::DATA).unwrap();
    // Fake table frame n is reached at pool + n * 4 KiB from now on.
    s.platform_mut().set_table_window(Some(va(pool)));
    check(&mut s);
    assert_eq!(s.query(va(pool)).unwrap().unit, MappingUnit::Cont64K);
    assert_eq!(
        s.query(va(pool + M2 - K4)).unwrap().unit,
        MappingUnit::Cont64K
    );
    assert_eq!(s.summary().count(MappingUnit::Block1G), 0);
    assert_eq!(s.summary().count(MappingUnit::Cont32M), 31);
    assert_eq!(s.summary().count(MappingUnit::Block2M), 15);
    // 255 level-3 tables fit the pinned chunk's 512 frames.
    let blocks = (0..256u64).filter(|&k| ram + k * M2 != pool);
    for k in blocks.clone() {
        s.unmap(va(ram + k * M2 + K64), K64).unwrap();
    }
    check(&mut s);
    assert!(s.query(va(ram + 36 * M2 + K64)).is_err());
    for k in blocks {
        let at = ram + k * M2 + K64;
        s.map(va(at), pa(at), K64, Attributes::DATA).unwrap();
    }
    s.refold(va(ram), G1).unwrap();
    check(&mut s);
    // Back at the optimum the pin allows; the pinned chunk stays small.
    let sum = s.summary();
    assert_eq!(sum.count(MappingUnit::Cont32M), 31);
    assert_eq!(sum.count(MappingUnit::Block2M), 15);
    assert_eq!(sum.count(MappingUnit::Cont64K), 32);
    assert_eq!(s.platform().tables_in_use(), 4);
    assert_eq!(s.query(va(pool)).unwrap().unit, MappingUnit::Cont64K);
}

/// `pin_small` takes whole unmapped 2 MiB chunks only, and a bounded number.
#[test]
fn pin_small_refuses_bad_ranges() {
    let mut b = bufs(40);
    let mut s = engine(&mut b, NO_BBM, VaSize::Bits48);
    assert_eq!(
        s.pin_small(va(G1 + K64), M2),
        Err(Stage1Error::UnalignedVa { va: va(G1 + K64) })
    );
    assert_eq!(
        s.pin_small(va(G1), K64),
        Err(Stage1Error::UnalignedLength { len: K64 })
    );
    s.map(va(G1 + M2 + K4), pa(G1), K4, Attributes::DATA)
        .unwrap();
    assert_eq!(
        s.pin_small(va(G1), 2 * M2),
        Err(Stage1Error::AlreadyMapped {
            va: va(G1 + M2 + K4)
        })
    );
    s.pin_small(va(2 * G1), engine::MAX_PINNED as u64 * M2)
        .unwrap();
    // Pinning a pinned chunk again costs no room; a new one has none.
    s.pin_small(va(2 * G1), M2).unwrap();
    assert_eq!(s.pin_small(va(3 * G1), M2), Err(Stage1Error::TooManyPinned));
    // A map across the pinned chunks writes no block over them.
    s.map(va(2 * G1), pa(2 * G1), G1, Attributes::DATA).unwrap();
    check(&mut s);
    let last = 2 * G1 + engine::MAX_PINNED as u64 * M2;
    assert_eq!(s.query(va(last - K4)).unwrap().unit, MappingUnit::Cont64K);
    assert_eq!(s.query(va(last)).unwrap().unit, MappingUnit::Cont32M);
}

/// The linter names the rule a corrupted 64 KiB run breaks (rules 1 and 2):
/// an entry without the Contiguous bit, an output address out of sequence,
/// attributes that differ, a run whose output is not aligned, and an
/// eligible group left unfolded (advisory).
#[test]
fn linter_names_each_broken_run_rule() {
    type Corrupt = fn(usize, Descriptor) -> Descriptor;
    let cases: [(&str, Corrupt, &[Rule]); 5] = [
        (
            "one entry not contiguous",
            |k, d| d.with(Descriptor::CONT, k != 5),
            &[Rule::ContRunPartial],
        ),
        (
            "one output out of sequence",
            |k, d| {
                if k == 5 {
                    d.with_output(PhysAddr(d.output(3).0 + K64))
                } else {
                    d
                }
            },
            &[Rule::ContRunNotConsecutive],
        ),
        (
            "one entry read-only",
            |k, d| d.with(Descriptor::AP_READ_ONLY, k == 5),
            &[Rule::ContRunAttributesDiffer],
        ),
        (
            "outputs shifted by a page",
            |_, d| d.with_output(PhysAddr(d.output(3).0 + K4)),
            &[Rule::ContRunMisaligned],
        ),
        (
            "no entry contiguous",
            |_, d| d.with(Descriptor::CONT, false),
            &[Rule::MissedFold],
        ),
    ];
    for (what, corrupt, expected) in cases {
        let mut s = run_at_1g(NO_BBM);
        let (table, first, level) = s.leaf_entry(va(G1)).unwrap();
        assert_eq!((first % 16, level), (0, 3));
        for k in 0..16 {
            let old = Descriptor(unsafe_read(&s, table, first + k));
            assert!(old.is_contiguous(), "{what}: the fixture is a run");
            // SAFETY: `table` came from `leaf_entry`, `first + k < 512`.
            unsafe {
                s.platform_mut()
                    .write_entry(table, first + k, corrupt(k, old).bits())
            };
        }
        let mut found = Vec::new();
        s.lint(&mut |v| found.push(v));
        assert!(
            found.iter().all(|v| v.va == va(G1) && v.level == 3),
            "{what}: {found:?}"
        );
        let rules: Vec<Rule> = found.iter().map(|v| v.rule).collect();
        assert_eq!(rules, expected, "{what}");
    }
}
