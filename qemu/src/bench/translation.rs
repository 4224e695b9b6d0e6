//! `cargo qemu bench translation`: the stage-1 engine of `memdesc` on the
//! host, against `aarch64-paging` where the two can be compared.
//!
//! Arm ARM DDI 0487, D8 (VMSAv8-64 translation) is what both sides build.
//! Both build tables in host memory with no TLB maintenance cost: ours runs
//! on the counting fake (no log, no checker), the peer is never activated,
//! so it issues no TLBI either. The peer has no Contiguous-bit handling, so
//! the page-for-page comparison maps with contiguous runs disabled on our
//! side too; the runs-enabled figures are reported separately.
//!
//! Records:
//! * (a) `map_1g_4k_{range,page_by_page}`: ns/page, peer `aarch64-paging`
//!   (`Constraints::NO_BLOCK_MAPPINGS`), plus our `_cont64k` variants;
//! * (b) `virt_map_*`: descriptor writes and TLB footprint for a QEMU virt
//!   memory map, against the computed optimum and the peer's footprint;
//! * (c) `one_page_in_64k_run_*`: writes, TLBIs, DSBs for one page's
//!   permission change inside a 64 KiB run, per feature set;
//! * (d) `flip_*`: one page flipped N times inside a run: ns/flip and
//!   writes/flip for N = 1k, 10k, 100k (must stay flat);
//! * (e) `balloon_churn_*`: rule 8 of docs/architecture.md (re-folding
//!   after churn) -- a 1 GiB block linear map loses
//!   random pages (balloon inflate, splits down to pages) and gets them
//!   back (deflate); the TLB footprint must return to one entry, with the
//!   linter and the break-before-make checker clean throughout.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Instant;

use aarch64_paging::descriptor::El1Attributes;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{Constraints, El1And0, MemoryRegion};
use memdesc::stage1::descriptor::level_shift;
use memdesc::stage1::fake::{Event, FakeFrame, FakePlatform};
use memdesc::stage1::{Attributes, Features, MappingSummary, MappingUnit, Stage1, VaSize};
use memdesc::{PhysAddr, VirtAddr};

use super::Record;

const BENCH: &str = "translation";
const PEER: &str = "aarch64-paging 0.12";
const K4: u64 = 4096;
const K64: u64 = 64 << 10;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const PAGES_1G: u64 = G1 / K4;
const REPEAT: usize = 5;

/// Runs the benchmark and returns its records.
pub fn run() -> Vec<Record> {
    let mut out = Vec::new();
    map_1g(&mut out);
    virt_map(&mut out);
    one_page_in_run(&mut out);
    flips(&mut out);
    balloon_churn(&mut out);
    out
}

fn ours<'a>(frames: &'a mut [FakeFrame]) -> Stage1<FakePlatform<'a>> {
    match Stage1::new(
        FakePlatform::counting(frames),
        VaSize::Bits48,
        Features::NONE,
    ) {
        Ok(s) => s,
        Err(e) => panic!("bench: cannot create the engine: {e}"),
    }
}

fn peer_attrs() -> El1Attributes {
    El1Attributes::VALID
        | El1Attributes::ATTRIBUTE_INDEX_0
        | El1Attributes::INNER_SHAREABLE
        | El1Attributes::ACCESSED
        | El1Attributes::UXN
        | El1Attributes::PXN
}

/// Our engine mapping 1 GiB of 4 KiB pages, in ns.
fn ours_1g(frames: &mut [FakeFrame], limit: MappingUnit, by_page: bool) -> u64 {
    let mut s = ours(frames);
    let t = Instant::now();
    if by_page {
        for p in 0..PAGES_1G {
            let a = G1 + p * K4;
            let r = s.map_limited(VirtAddr(a), PhysAddr(a), K4, Attributes::DATA, limit);
            assert!(r.is_ok(), "bench: map failed: {r:?}");
        }
    } else {
        let r = s.map_limited(VirtAddr(G1), PhysAddr(G1), G1, Attributes::DATA, limit);
        assert!(r.is_ok(), "bench: map failed: {r:?}");
    }
    let ns = t.elapsed().as_nanos() as u64;
    black_box(s.summary());
    ns
}

/// `aarch64-paging` mapping 1 GiB of 4 KiB pages, in ns (drop not timed).
fn peer_1g(by_page: bool) -> u64 {
    let mut m = IdMap::with_asid(1, 0, El1And0);
    let t = Instant::now();
    if by_page {
        for p in 0..PAGES_1G as usize {
            let a = G1 as usize + p * K4 as usize;
            let r = m.map_range_with_constraints(
                &MemoryRegion::new(a, a + K4 as usize),
                peer_attrs(),
                Constraints::NO_BLOCK_MAPPINGS,
            );
            assert!(r.is_ok(), "bench: peer map failed: {r:?}");
        }
    } else {
        let r = m.map_range_with_constraints(
            &MemoryRegion::new(G1 as usize, (2 * G1) as usize),
            peer_attrs(),
            Constraints::NO_BLOCK_MAPPINGS,
        );
        assert!(r.is_ok(), "bench: peer map failed: {r:?}");
    }
    let ns = t.elapsed().as_nanos() as u64;
    black_box(&m);
    drop(m);
    ns
}

fn map_1g(out: &mut Vec<Record>) {
    let mut frames = vec![FakeFrame::new(); 600];
    // Ours and the peer alternate, best of REPEAT each, so that load from
    // other processes hits both sides alike.
    let per_page = |ns: u64| ns as f64 / PAGES_1G as f64;
    let mut best = [u64::MAX; 6];
    for _ in 0..REPEAT {
        best[0] = best[0].min(ours_1g(&mut frames, MappingUnit::Page4K, false));
        best[1] = best[1].min(peer_1g(false));
        best[2] = best[2].min(ours_1g(&mut frames, MappingUnit::Page4K, true));
        best[3] = best[3].min(peer_1g(true));
        best[4] = best[4].min(ours_1g(&mut frames, MappingUnit::Cont64K, false));
        best[5] = best[5].min(ours_1g(&mut frames, MappingUnit::Cont64K, true));
    }
    let [our_range, peer_range, our_pages, peer_pages, cont_range, cont_pages] = best.map(per_page);
    let note = format!(
        "1 GiB identity map at VA 1 GiB, 4 KiB pages, 48-bit VA (root level 0) on both sides, host memory, \
         no TLBI; best of {REPEAT}, alternating; table frames: ours from a pre-allocated pool of the \
         counting fake (zeroed on allocation, valid counts kept by the fake), peer from the global \
         allocator (alloc_zeroed)"
    );
    out.push(
        Record::new(BENCH, "map_1g_4k_range", our_range, "ns/page")
            .with_peer(PEER, peer_range, true)
            .with_note(format!(
                "{note}; ours map_limited(Page4K), peer NO_BLOCK_MAPPINGS"
            )),
    );
    out.push(
        Record::new(BENCH, "map_1g_4k_page_by_page", our_pages, "ns/page")
            .with_peer(PEER, peer_pages, true)
            .with_note(format!("{note}; 262144 single-page calls")),
    );
    out.push(
        Record::new(BENCH, "map_1g_4k_range_cont64k", cont_range, "ns/page")
            .with_peer(PEER, peer_range, true)
            .with_note(
                "ours with 64 KiB contiguous runs (peer has no Contiguous-bit support, maps plain pages)",
            ),
    );
    out.push(
        Record::new(BENCH, "map_1g_4k_page_by_page_cont64k", cont_pages, "ns/page")
            .with_peer(PEER, peer_pages, true)
            .with_note(
                "ours re-checks the run after every page and folds it with break-before-make \
                 (16 clears, TLBI, DSB, 16 writes) when its 16th page arrives; peer maps plain pages",
            ),
    );
}

/// One region of the QEMU virt map: VA, PA, length, attributes.
type Region = (u64, u64, u64, Attributes);

/// QEMU `virt`, 1 GiB RAM at 0x4000_0000: a linear map of all RAM at
/// 0x40_0000_0000 + PA, the firmware image identity-mapped W^X inside RAM
/// (the rest of RAM identity-mapped RW), and the MMIO windows as Device.
fn virt_regions() -> Vec<Region> {
    let ram = 0x4000_0000u64;
    let ram_len = G1;
    let img = 0x4020_0000u64;
    let (text, rodata, data) = (0x6_3000u64, 0x2_1000u64, 0x4_6000u64);
    let img_end = img + text + rodata + data;
    let lin = 0x40_0000_0000u64;
    vec![
        (lin + ram, ram, ram_len, Attributes::DATA),
        (ram, ram, img - ram, Attributes::DATA),
        (img, img, text, Attributes::TEXT),
        (img + text, img + text, rodata, Attributes::RODATA),
        (
            img + text + rodata,
            img + text + rodata,
            data,
            Attributes::DATA,
        ),
        (img_end, img_end, ram + ram_len - img_end, Attributes::DATA),
        // GIC distributor, redistributors; UART, RTC, fw_cfg; virtio-mmio; PCIe ECAM.
        (0x0800_0000, 0x0800_0000, 0x1_0000, Attributes::DEVICE),
        (0x080a_0000, 0x080a_0000, 0xf6_0000, Attributes::DEVICE),
        (0x0900_0000, 0x0900_0000, 0x1000, Attributes::DEVICE),
        (0x0901_0000, 0x0901_0000, 0x1000, Attributes::DEVICE),
        (0x0902_0000, 0x0902_0000, 0x1000, Attributes::DEVICE),
        (0x0a00_0000, 0x0a00_0000, 0x4000, Attributes::DEVICE),
        (
            0x40_1000_0000,
            0x40_1000_0000,
            0x1000_0000,
            Attributes::DEVICE,
        ),
    ]
}

/// The fewest units for `regions` and the descriptor writes they need
/// (leaf descriptors plus one table descriptor per table below the root).
fn optimum(regions: &[Region]) -> (MappingSummary, u64) {
    // Neighbouring regions with the same attributes and output offset are
    // one region for the hardware.
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.0);
    let mut merged: Vec<Region> = Vec::new();
    for r in sorted {
        match merged.last_mut() {
            Some(m) if m.0 + m.2 == r.0 && m.1 + m.2 == r.1 && m.3 == r.3 => m.2 += r.2,
            _ => merged.push(r),
        }
    }
    let mut sum = MappingSummary::default();
    let mut tables = BTreeSet::new();
    for &(va, pa, len, _) in &merged {
        let mut off = 0;
        while off < len {
            let (v, p) = (va + off, pa + off);
            let unit = MappingUnit::ALL
                .iter()
                .rev()
                .copied()
                .find(|u| (v | p) & (u.size() - 1) == 0 && u.size() <= len - off)
                .unwrap_or(MappingUnit::Page4K);
            sum.add(unit, 1);
            // Tables at levels 1..=unit level hold this unit (level 0 is the root).
            for level in 1..=unit.level() {
                tables.insert((level, v >> level_shift(level - 1)));
            }
            off += unit.size();
        }
    }
    let writes = sum.leaf_descriptors() + tables.len() as u64;
    (sum, writes)
}

fn virt_map(out: &mut Vec<Record>) {
    let regions = virt_regions();
    let mut frames = vec![FakeFrame::new(); 64];
    let mut s = ours(&mut frames);
    for &(va, pa, len, a) in &regions {
        let r = s.map(VirtAddr(va), PhysAddr(pa), len, a);
        assert!(r.is_ok(), "bench: virt map failed at {va:#x}: {r:?}");
    }
    let writes = s.platform().counters().writes as f64;
    let sum = s.summary();
    let (best, best_writes) = optimum(&regions);

    // The peer maps the same regions identity-mapped (the linear-map
    // alias has the same 1 GiB alignment, so the same units are possible).
    let mut m = IdMap::with_asid(1, 0, El1And0);
    for &(va, _, len, a) in &regions {
        let va = if va >= 0x40_0000_0000 && a == Attributes::DATA && len == G1 {
            va - 0x40_0000_0000 + 0x80_0000_0000
        } else {
            va
        };
        let mut f = peer_attrs();
        if a.write {
            f.remove(El1Attributes::READ_ONLY);
        } else {
            f |= El1Attributes::READ_ONLY;
        }
        if a.execute {
            f.remove(El1Attributes::PXN);
        }
        if a.kind.is_device() {
            f = (f - El1Attributes::ATTRIBUTE_INDEX_0) | El1Attributes::ATTRIBUTE_INDEX_2;
        }
        let r = m.map_range(&MemoryRegion::new(va as usize, (va + len) as usize), f);
        assert!(r.is_ok(), "bench: peer virt map failed at {va:#x}: {r:?}");
    }
    let mut peer_tlb = 0u64;
    let all = MemoryRegion::new(0, 1 << 40);
    let walked = m.walk_range(&all, &mut |_, d, level| {
        if d.is_valid() && (level == 3 || !d.is_table_or_page()) {
            peer_tlb += 1;
        }
        Ok(())
    });
    assert!(walked.is_ok(), "bench: peer walk failed: {walked:?}");
    let note = "QEMU virt: 1 GiB RAM linear map at 0x40_0000_0000+PA, image W^X (text 0x63000, rodata 0x21000, \
                data 0x46000 at 0x4020_0000) inside identity-mapped RAM, GIC/UART/RTC/fw_cfg/virtio/ECAM MMIO";
    out.push(
        Record::new(
            BENCH,
            "virt_map_tlb_entries",
            sum.tlb_entries() as f64,
            "tlb_entries",
        )
        .with_peer("optimum", best.tlb_entries() as f64, true)
        .with_note(format!(
            "{note}; units ours {:?} optimum {:?} (4K,64K,2M,32M,1G,16G)",
            sum.units, best.units
        )),
    );
    out.push(
        Record::new(
            BENCH,
            "virt_map_tlb_entries_vs_peer",
            sum.tlb_entries() as f64,
            "tlb_entries",
        )
        .with_peer(PEER, peer_tlb as f64, true)
        .with_note("peer: same regions, blocks allowed, no Contiguous bit"),
    );
    out.push(
        Record::new(BENCH, "virt_map_descriptor_writes", writes, "writes")
            .with_peer("optimum", best_writes as f64, true)
            .with_note(format!(
                "ours: every store while building, incl. table links; optimum: leaf descriptors + one link per table; \
                 tables ours {} (root incl.)",
                sum.tables
            )),
    );
}

fn one_page_in_run(out: &mut Vec<Record>) {
    let sets = [
        ("cortex_a53", Features::NONE),
        (
            "tlbi_range",
            Features {
                hafdbs: true,
                tlbi_range: true,
                bbm_level: 0,
            },
        ),
        ("cpu_max", Features::ALL),
    ];
    for (name, f) in sets {
        let mut frames = vec![FakeFrame::new(); 16];
        let mut log = vec![Event::Isb; 256];
        let p = FakePlatform::new(&mut frames, &mut log, f, 0);
        let Ok(mut s) = Stage1::new(p, VaSize::Bits48, f) else {
            panic!("bench: cannot create the engine");
        };
        let r = s.map(VirtAddr(G1), PhysAddr(G1), K64, Attributes::DATA);
        assert!(r.is_ok(), "bench: {r:?}");
        s.platform_mut().reset_counters();
        let r = s.protect(VirtAddr(G1 + 5 * K4), K4, Attributes::RODATA);
        assert!(r.is_ok(), "bench: {r:?}");
        let c = s.platform().counters();
        let log = s.platform().log();
        // TLBI passes: maximal runs of consecutive TLBIs.
        let passes = log
            .windows(2)
            .filter(|w| w[1].is_tlbi() && !w[0].is_tlbi())
            .count()
            + log.first().is_some_and(Event::is_tlbi) as usize;
        // DSBs between the last clear and the first rewrite.
        let first_make = log
            .iter()
            .position(|e| matches!(e, Event::Write { old: 0, new, .. } if *new != 0))
            .unwrap_or(log.len());
        let dsb_before = log[..first_make]
            .iter()
            .filter(|e| matches!(e, Event::DsbIsh))
            .count();
        let violations = s.platform().violation_count();
        let note = format!(
            "{f:?}; TLBI instructions {}, DSB ISH before rewrite {dsb_before}, DSB total {} (ISHST {} + ISH {}), \
             ISB {}, BBM checker violations {violations}",
            c.tlbi(),
            c.dsb(),
            c.dsb_ishst,
            c.dsb_ish,
            c.isb
        );
        let m = |what: &str| format!("one_page_in_64k_run_{what}_{name}");
        out.push(
            Record::new(BENCH, m("writes"), c.writes as f64, "writes").with_note(note.clone()),
        );
        out.push(
            Record::new(BENCH, m("tlbi_passes"), passes as f64, "passes").with_note(note.clone()),
        );
        out.push(Record::new(BENCH, m("tlbi"), c.tlbi() as f64, "tlbi").with_note(note.clone()));
        out.push(Record::new(BENCH, m("dsb"), c.dsb() as f64, "dsb").with_note(note));
    }
}

fn flips(out: &mut Vec<Record>) {
    for (name, f) in [("cortex_a53", Features::NONE), ("cpu_max", Features::ALL)] {
        for n in [1_000u64, 10_000, 100_000] {
            let mut frames = vec![FakeFrame::new(); 16];
            let p = FakePlatform::counting(&mut frames);
            let Ok(mut s) = Stage1::new(p, VaSize::Bits48, f) else {
                panic!("bench: cannot create the engine");
            };
            // 1 MiB of data at a 2 MiB boundary: 16 runs in a half-full
            // level-3 table, which can never collapse into a block.
            let r = s.map(VirtAddr(G1), PhysAddr(G1), M2 / 2, Attributes::DATA);
            assert!(r.is_ok(), "bench: {r:?}");
            s.platform_mut().reset_counters();
            let page = VirtAddr(G1 + 3 * K64 + 5 * K4);
            // Timed in chunks of 1000 flips: the median chunk resists
            // interference from other processes, the mean shows the total.
            let mut chunks = Vec::new();
            let total = Instant::now();
            for c in 0..n / 1000 {
                let t = Instant::now();
                for i in c * 1000..(c + 1) * 1000 {
                    let a = if i % 2 == 0 {
                        Attributes::RODATA
                    } else {
                        Attributes::DATA
                    };
                    let r = s.protect(page, K4, a);
                    assert!(r.is_ok(), "bench: {r:?}");
                }
                chunks.push(t.elapsed().as_nanos() as f64 / 1000.0);
            }
            let mean = total.elapsed().as_nanos() as f64 / n as f64;
            chunks.sort_by(f64::total_cmp);
            let ns = chunks[chunks.len() / 2];
            let c = s.platform().counters();
            let note = format!(
                "{f:?}; median of {} chunks of 1000 flips, mean {mean:.0} ns/flip; per flip: {:.1} TLBI, \
                 {:.1} DSB; total {} writes",
                chunks.len(),
                c.tlbi() as f64 / n as f64,
                c.dsb() as f64 / n as f64,
                c.writes
            );
            out.push(
                Record::new(BENCH, format!("flip_{name}_n{n}_time"), ns, "ns/flip")
                    .with_note(note.clone()),
            );
            out.push(
                Record::new(
                    BENCH,
                    format!("flip_{name}_n{n}_writes"),
                    c.writes as f64 / n as f64,
                    "writes/flip",
                )
                .with_note(note),
            );
        }
    }
}

/// xorshift64*: a fixed-seed generator, so the churn is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One balloon round on a 1 GiB block: unmap `pages` one by one, remap
/// them. Returns (inflate ns/page, inflate writes/page, deflate ns/page,
/// deflate writes/page, footprint inflated, summary after, linter errors,
/// BBM violations).
fn churn_round(
    s: &mut Stage1<FakePlatform<'_>>,
    pages: &BTreeSet<u64>,
    lint: bool,
) -> (f64, f64, f64, f64, u64, MappingSummary, usize, u64) {
    let ram = 0x4000_0000u64;
    let r = s.map(VirtAddr(ram), PhysAddr(ram), G1, Attributes::DATA);
    assert!(r.is_ok(), "bench: {r:?}");
    let n = pages.len() as f64;
    let mut lint_errors = 0;
    s.platform_mut().reset_counters();
    let t = Instant::now();
    for &p in pages {
        let r = s.unmap(VirtAddr(ram + p * K4), K4);
        assert!(r.is_ok(), "bench: {r:?}");
    }
    let inflate_ns = t.elapsed().as_nanos() as f64 / n;
    let inflate_writes = s.platform().counters().writes as f64 / n;
    let inflated = s.summary().tlb_entries();
    if lint {
        lint_errors += s.lint(&mut |_| {});
    }
    s.platform_mut().reset_counters();
    let t = Instant::now();
    for &p in pages {
        let a = ram + p * K4;
        let r = s.map(VirtAddr(a), PhysAddr(a), K4, Attributes::DATA);
        assert!(r.is_ok(), "bench: {r:?}");
    }
    let deflate_ns = t.elapsed().as_nanos() as f64 / n;
    let deflate_writes = s.platform().counters().writes as f64 / n;
    if lint {
        lint_errors += s.lint(&mut |_| {});
    }
    let bbm = s.platform().violation_count();
    (
        inflate_ns,
        inflate_writes,
        deflate_ns,
        deflate_writes,
        inflated,
        s.summary(),
        lint_errors,
        bbm,
    )
}

fn balloon_churn(out: &mut Vec<Record>) {
    const PAGES: u64 = 20_000;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut pages = BTreeSet::new();
    while (pages.len() as u64) < PAGES {
        pages.insert(rng.next() % PAGES_1G);
    }
    for (name, f) in [("cortex_a53", Features::NONE), ("cpu_max", Features::ALL)] {
        // Checked pass: recording fake, break-before-make checker, linter.
        let mut frames = vec![FakeFrame::new(); 700];
        let mut log = vec![Event::Isb; 16];
        let p = FakePlatform::new(&mut frames, &mut log, f, 0);
        let Ok(mut s) = Stage1::new(p, VaSize::Bits48, f) else {
            panic!("bench: cannot create the engine");
        };
        let (.., lint_errors, bbm) = churn_round(&mut s, &pages, true);
        // Timed pass: counting fake.
        let mut frames = vec![FakeFrame::new(); 700];
        let Ok(mut s) = Stage1::new(FakePlatform::counting(&mut frames), VaSize::Bits48, f) else {
            panic!("bench: cannot create the engine");
        };
        let (ins, inw, dns, dnw, inflated, after, ..) = churn_round(&mut s, &pages, false);
        let note = format!(
            "{f:?}; 1 GiB block, {PAGES} random pages unmapped then remapped one by one; \
             checked pass: BBM checker violations {bbm}, linter errors {lint_errors}; TLB entries \
             inflated {inflated}, after deflate {} (units {:?}), tables after {}",
            after.tlb_entries(),
            after.units,
            after.tables
        );
        let m = |what: &str| format!("balloon_churn_{what}_{name}");
        out.push(Record::new(BENCH, m("inflate_time"), ins, "ns/page").with_note(note.clone()));
        out.push(
            Record::new(BENCH, m("inflate_writes"), inw, "writes/page").with_note(note.clone()),
        );
        out.push(Record::new(BENCH, m("deflate_time"), dns, "ns/page").with_note(note.clone()));
        out.push(
            Record::new(BENCH, m("deflate_writes"), dnw, "writes/page").with_note(note.clone()),
        );
        out.push(
            Record::new(
                BENCH,
                m("tlb_entries_after"),
                after.tlb_entries() as f64,
                "tlb_entries",
            )
            .with_peer("optimum", 1.0, true)
            .with_note(note),
        );
    }
}
