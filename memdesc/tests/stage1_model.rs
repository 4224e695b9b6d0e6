//! Property-based model test of the stage-1 engine (Arm ARM DDI 0487, D8):
//! random map / unmap / protect / wrprotect / young / hardware-touch /
//! refold sequences against a shadow map of 4 KiB pages, on every
//! combination of FEAT_HAFDBS, FEAT_TLBIRANGE and FEAT_BBM level 2, with
//! 48- and 39-bit input ranges.
//!
//! After every step: the linter finds nothing (not even a missed fold), the
//! fake's break-before-make checker found nothing and no TLB debt is left,
//! and the touched pages (plus their neighbours) translate exactly as the
//! shadow says. Access and dirty may only be over-reported (gathered over a
//! run or block), never lost.

// A panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use memdesc::stage1::fake::{Event, FakeFrame, FakePlatform};
use memdesc::stage1::{
    Attributes, Features, MemoryKind, Shareability, Stage1, Stage1Error, VaSize,
};
use memdesc::{PhysAddr, VirtAddr};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const PAGE: u64 = 4096;
/// 64 MiB window: room for two 32 MiB runs, 2 MiB blocks, tables that
/// fill, split and collapse.
const WINDOW_PAGES: u64 = 16384;
const VA_BASE: u64 = 0x4000_0000;
const PA_BASE: u64 = 0x1_0000_0000;
const STEPS: usize = 400;
const CASES: u32 = 64;

const ATTRS: [Attributes; 6] = [
    Attributes::DATA,
    Attributes::RODATA,
    Attributes::TEXT,
    Attributes::DEVICE,
    Attributes {
        kind: MemoryKind::NormalNonCacheable,
        shareability: Shareability::OuterShareable,
        ..Attributes::DATA
    },
    Attributes {
        global: false,
        ..Attributes::RODATA
    },
];
const WX: Attributes = Attributes {
    execute: true,
    ..Attributes::DATA
};

#[derive(Clone, Copy, Debug)]
struct Range {
    raw: u64,
    size: u8,
    align: u8,
}

impl Range {
    /// First page and page count inside the window.
    fn pages(self) -> (u64, u64) {
        let n = match self.size {
            0 => 1 + self.raw % 4,
            1 => 16,
            2 => 1 + self.raw % 40,
            3 => 512,
            4 => 16 * (1 + self.raw % 3),
            _ => 8192,
        };
        let align = [1u64, 16, 512][self.align as usize % 3];
        let p = (self.raw % WINDOW_PAGES) & !(align - 1);
        (p, n.min(WINDOW_PAGES - p))
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Map {
        r: Range,
        delta: u8,
        attrs: u8,
    },
    Unmap {
        r: Range,
    },
    Protect {
        r: Range,
        attrs: u8,
    },
    WrProtect {
        r: Range,
    },
    Young {
        page: u64,
    },
    /// The hardware accesses `page`; in a contiguous run it may record
    /// that in any entry of the run (D8.6.1): entry `via % 16`.
    Touch {
        page: u64,
        write: bool,
        via: u8,
    },
    Refold {
        r: Range,
    },
}

fn range() -> impl Strategy<Value = Range> {
    (any::<u64>(), 0u8..6, 0u8..3).prop_map(|(raw, size, align)| Range { raw, size, align })
}

/// The hardware accessing `page` while an operation runs (FEAT_HAFDBS):
/// through entry `via % 16` of its run, just before the engine's next
/// compare-and-swap on that entry, or just before the next TLBI.
#[derive(Clone, Copy, Debug)]
struct Race {
    page: u64,
    write: bool,
    via: u8,
    at_tlbi: bool,
}

/// One step: an operation, sometimes with table memory nearly exhausted,
/// sometimes with the hardware racing it.
#[derive(Clone, Copy, Debug)]
struct Step {
    op: Op,
    /// Allocations allowed during this step (`None`: unlimited).
    starve: Option<u8>,
    race: Option<Race>,
}

fn step() -> impl Strategy<Value = Step> {
    let race = (0..WINDOW_PAGES, any::<bool>(), any::<u8>(), any::<bool>()).prop_map(
        |(page, write, via, at_tlbi)| Race {
            page,
            write,
            via,
            at_tlbi,
        },
    );
    (
        op(),
        prop_oneof![7 => Just(None), 1 => (0u8..3).prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => race.prop_map(Some)],
    )
        .prop_map(|(op, starve, race)| Step { op, starve, race })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), 0u8..4, 0u8..7).prop_map(|(r, delta, attrs)| Op::Map { r, delta, attrs }),
        2 => range().prop_map(|r| Op::Unmap { r }),
        3 => (range(), 0u8..7).prop_map(|(r, attrs)| Op::Protect { r, attrs }),
        1 => range().prop_map(|r| Op::WrProtect { r }),
        1 => (0..WINDOW_PAGES).prop_map(|page| Op::Young { page }),
        2 => (0..WINDOW_PAGES, any::<bool>(), any::<u8>())
            .prop_map(|(page, write, via)| Op::Touch { page, write, via }),
        1 => range().prop_map(|r| Op::Refold { r }),
    ]
}

#[derive(Clone, Copy, Debug)]
struct Shadow {
    pa: u64,
    attrs: Attributes,
    young: bool,
    dirty: bool,
}

/// First page and page count of a range operation.
fn op_range(op: Op) -> Option<(u64, u64)> {
    match op {
        Op::Map { r, .. }
        | Op::Unmap { r }
        | Op::Protect { r, .. }
        | Op::WrProtect { r }
        | Op::Refold { r } => Some(r.pages()),
        Op::Young { .. } | Op::Touch { .. } => None,
    }
}

fn attrs_of(i: u8) -> Attributes {
    ATTRS.get(i as usize).copied().unwrap_or(WX)
}

fn va(page: u64) -> VirtAddr {
    VirtAddr(VA_BASE + page * PAGE)
}

struct Model<'a> {
    s: Stage1<FakePlatform<'a>>,
    shadow: BTreeMap<u64, Shadow>,
    f: Features,
    starving: bool,
    oom: bool,
}

impl Model<'_> {
    fn first_mapped(&self, p: u64, n: u64) -> Option<u64> {
        self.shadow.range(p..p + n).next().map(|(k, _)| *k)
    }

    /// An operation that ran out of table memory while the model starves
    /// the engine is allowed to fail (it must leave the tree unchanged, which
    /// the next step's checks verify); note it and skip the comparison.
    fn starved(&mut self, got: Result<(), Stage1Error>) -> bool {
        if self.starving && got == Err(Stage1Error::OutOfTableMemory) {
            self.oom = true;
            return true;
        }
        false
    }

    fn first_hole(&self, p: u64, n: u64) -> Option<u64> {
        (p..p + n).find(|q| !self.shadow.contains_key(q))
    }

    /// The model of an operation on mapped pages only: the engine's
    /// `NotMapped` for the first hole in `[p, p + n)`, else `Ok` after
    /// `update(shadow, page)` for each page.
    fn each_mapped(
        &mut self,
        p: u64,
        n: u64,
        mut update: impl FnMut(&mut BTreeMap<u64, Shadow>, u64),
    ) -> Result<(), Stage1Error> {
        if let Some(h) = self.first_hole(p, n) {
            return Err(Stage1Error::NotMapped { va: va(h) });
        }
        for k in p..p + n {
            update(&mut self.shadow, k);
        }
        Ok(())
    }

    /// The end of every ranged operation on `[p, p + n)`: unless the engine
    /// ran out of table memory while starved (then `None`), `want` (the
    /// model's answer, updating the shadow when it expects success) must be
    /// what the engine returned. Returns whether the engine refused.
    fn judge(
        &mut self,
        op: Op,
        (p, n): (u64, u64),
        got: Result<(), Stage1Error>,
        want: impl FnOnce(&mut Self) -> Result<(), Stage1Error>,
        touched: &mut Vec<(u64, u64)>,
    ) -> Result<Option<bool>, TestCaseError> {
        if self.starved(got) {
            return Ok(None);
        }
        let want = want(self);
        prop_assert_eq!(got, want, "{:?}", op);
        touched.push((p, n));
        Ok(Some(want.is_err()))
    }

    /// The entry through which the hardware records an access to `page`:
    /// with `via`, any entry of its contiguous run.
    fn entry_for(&self, page: u64, via: u8) -> (PhysAddr, usize) {
        let q = self.s.query(va(page)).unwrap();
        let entry = if q.unit.entries() > 1 {
            let step = q.unit.size() / q.unit.entries();
            VirtAddr(q.unit_va.0 + (via as u64 % q.unit.entries()) * step)
        } else {
            va(page)
        };
        let (t, i, _) = self.s.leaf_entry(entry).unwrap();
        (t, i)
    }

    fn step(&mut self, st: Step) -> Result<(), TestCaseError> {
        // Most races hit a page near an end of the operation's range, where
        // runs and blocks are split or re-formed.
        let race = st.race.map(|mut r| {
            if let Some((p, n)) = op_range(st.op).filter(|_| r.page % 4 != 0) {
                let end = if r.page % 2 == 0 { p } else { p + n - 1 };
                r.page = (end + (r.page >> 2) % 5).saturating_sub(2) % WINDOW_PAGES;
            }
            r
        });
        // (Not while clearing the access flag: the model checks it is clear.)
        let race = race.filter(|r| {
            self.f.hafdbs && self.shadow.contains_key(&r.page) && !matches!(st.op, Op::Young { .. })
        });
        if let Some(r) = race {
            let (t, i) = self.entry_for(r.page, r.via);
            let p = self.s.platform_mut();
            if r.at_tlbi {
                p.race_next_tlbi(t, i, r.write);
            } else {
                p.race_next_swap(t, i, r.write);
            }
        }
        self.step_op(st)?;
        // What the racing access did must show at its page (unless the
        // operation unmapped it, or cleared its access flag on purpose).
        let fired = self.s.platform_mut().take_race_effect();
        if let (Some(r), Some((accessed, written))) = (race, fired) {
            if let Some(e) = self.shadow.get_mut(&r.page) {
                e.young |= accessed;
                e.dirty |= written;
                self.check(&[(r.page, 1)])?;
            }
        }
        Ok(())
    }

    fn step_op(&mut self, st: Step) -> Result<(), TestCaseError> {
        let Some(n) = st.starve else {
            return self.apply(st.op);
        };
        // Starved: the operation either succeeds as the model says, or fails
        // with OutOfTableMemory and leaves the tree as it was.
        let before = (self.s.summary(), self.s.platform().tables_in_use());
        self.s.platform_mut().set_alloc_limit(Some(n as u64));
        self.starving = true;
        let r = self.apply(st.op);
        self.starving = false;
        self.s.platform_mut().set_alloc_limit(None);
        r?;
        if std::mem::take(&mut self.oom) {
            let c = self.s.platform().counters();
            prop_assert_eq!(c.allocs, c.frees, "leaked tables on OOM in {:?}", st);
            let after = (self.s.summary(), self.s.platform().tables_in_use());
            prop_assert_eq!(after, before, "OOM changed the tree in {:?}", st);
            self.check(&[])?;
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        self.s.platform_mut().reset_counters();
        let mut touched = Vec::new();
        let mut refused = false;
        match op {
            Op::Map { r, delta, attrs } => {
                let (p, n) = r.pages();
                let a = attrs_of(attrs);
                let pa = PA_BASE + p * PAGE + [0, PAGE, 16 * PAGE, 512 * PAGE][delta as usize];
                let got = self.s.map(va(p), PhysAddr(pa), n * PAGE, a);
                let want = |m: &mut Self| {
                    if a.validate().is_err() {
                        Err(Stage1Error::WriteAndExecute)
                    } else if let Some(x) = m.first_mapped(p, n) {
                        Err(Stage1Error::AlreadyMapped { va: va(x) })
                    } else {
                        for k in 0..n {
                            let sh = Shadow {
                                pa: pa + k * PAGE,
                                attrs: a,
                                young: true,
                                dirty: !m.f.hafdbs && a.write,
                            };
                            m.shadow.insert(p + k, sh);
                        }
                        Ok(())
                    }
                };
                let Some(r) = self.judge(op, (p, n), got, want, &mut touched)? else {
                    return Ok(());
                };
                refused = r;
            }
            Op::Unmap { r } => {
                let (p, n) = r.pages();
                let got = self.s.unmap(va(p), n * PAGE);
                let want = |m: &mut Self| {
                    m.each_mapped(p, n, |shadow, k| {
                        shadow.remove(&k);
                    })
                };
                let Some(r) = self.judge(op, (p, n), got, want, &mut touched)? else {
                    return Ok(());
                };
                refused = r;
            }
            Op::Protect { r, attrs } => {
                let (p, n) = r.pages();
                let a = attrs_of(attrs);
                let got = self.s.protect(va(p), n * PAGE, a);
                let want = |m: &mut Self| {
                    if a.validate().is_err() {
                        return Err(Stage1Error::WriteAndExecute);
                    }
                    let dirty = !m.f.hafdbs && a.write;
                    m.each_mapped(p, n, |shadow, k| {
                        let e = shadow.get_mut(&k).unwrap();
                        e.attrs = a;
                        e.dirty |= dirty;
                    })
                };
                let Some(r) = self.judge(op, (p, n), got, want, &mut touched)? else {
                    return Ok(());
                };
                refused = r;
            }
            Op::WrProtect { r } => {
                let (p, n) = r.pages();
                let got = self.s.wrprotect(va(p), n * PAGE);
                let want = |m: &mut Self| {
                    m.each_mapped(p, n, |shadow, k| {
                        shadow.get_mut(&k).unwrap().attrs.write = false;
                    })
                };
                let Some(r) = self.judge(op, (p, n), got, want, &mut touched)? else {
                    return Ok(());
                };
                refused = r;
            }
            Op::Young { page } => {
                let got = self.s.test_and_clear_young(va(page));
                if !self.shadow.contains_key(&page) {
                    prop_assert_eq!(got, Err(Stage1Error::NotMapped { va: va(page) }));
                    refused = true;
                } else {
                    // The engine clears the whole unit; so does the model.
                    let q = self.s.query(va(page)).unwrap();
                    let first = (q.unit_va.0 - VA_BASE) / PAGE;
                    let units = q.unit.size() / PAGE;
                    let mut any = false;
                    for k in first..first + units {
                        if let Some(e) = self.shadow.get_mut(&k) {
                            any |= e.young;
                            e.young = false;
                        }
                    }
                    let got = got.unwrap();
                    prop_assert!(got || !any, "young lost at page {}", page);
                    prop_assert!(!q.young, "young not cleared over {:?}", q.unit);
                }
                touched.push((page, 1));
            }
            Op::Touch { page, write, via } => {
                // Hardware access/dirty only exists with FEAT_HAFDBS.
                if !self.f.hafdbs || !self.shadow.contains_key(&page) {
                    return Ok(());
                }
                let (t, i) = self.entry_for(page, via);
                self.s.platform_mut().hw_touch(t, i, write);
                let e = self.shadow.get_mut(&page).unwrap();
                e.young = true;
                e.dirty |= write && e.attrs.write;
                touched.push((page, 1));
            }
            Op::Refold { r } => {
                let (p, n) = r.pages();
                prop_assert_eq!(self.s.refold(va(p), n * PAGE), Ok(()));
                touched.push((p, n));
            }
        }
        if refused {
            let c = self.s.platform().counters();
            prop_assert_eq!(
                (c.writes, c.tlbi(), c.allocs),
                (0, 0, 0),
                "refused {:?} changed the tables",
                op
            );
        }
        self.check(&touched)
    }

    fn check(&mut self, touched: &[(u64, u64)]) -> Result<(), TestCaseError> {
        let mut found = Vec::new();
        self.s.lint(&mut |v| found.push(v));
        prop_assert!(found.is_empty(), "lint: {:?}", &found[..found.len().min(4)]);
        let p = self.s.platform();
        prop_assert_eq!(
            p.violation_count(),
            0,
            "bbm: {:?}",
            p.violations().collect::<Vec<_>>()
        );
        prop_assert_eq!(p.unflushed(), 0);
        for &(start, n) in touched {
            let step = (n / 8).max(1);
            let mut pages: Vec<u64> = (start..start + n).step_by(step as usize).collect();
            pages.extend([start + n - 1, start.wrapping_sub(1), start + n]);
            for page in pages {
                if page >= WINDOW_PAGES {
                    continue;
                }
                let q = self.s.query(va(page));
                match self.shadow.get(&page) {
                    None => prop_assert_eq!(q, Err(Stage1Error::NotMapped { va: va(page) })),
                    Some(e) => {
                        let q = q.unwrap();
                        prop_assert_eq!(q.output, PhysAddr(e.pa), "page {}", page);
                        prop_assert_eq!(q.attributes, e.attrs, "page {}", page);
                        prop_assert!(q.young || !e.young, "young lost at page {}", page);
                        prop_assert!(q.dirty || !e.dirty, "dirty lost at page {}", page);
                    }
                }
            }
        }
        Ok(())
    }
}

fn run(f: Features, va_size: VaSize, seed_cases: u32) {
    let mut runner = TestRunner::new(Config {
        cases: seed_cases,
        failure_persistence: None,
        ..Config::default()
    });
    let total = std::cell::Cell::new(0usize);
    runner
        .run(&prop::collection::vec(step(), STEPS), |ops| {
            let mut frames = vec![FakeFrame::new(); 160];
            let mut log = vec![Event::Isb; 64];
            let p = FakePlatform::new(&mut frames, &mut log, f, va_size.start_level());
            let mut m = Model {
                s: Stage1::new(p, va_size, f).unwrap(),
                shadow: BTreeMap::new(),
                f,
                starving: false,
                oom: false,
            };
            for (k, op) in ops.iter().enumerate() {
                m.step(*op).inspect_err(|_| {
                    // The failing step in context (the case is not shrunk
                    // below its length).
                    for (j, o) in ops.iter().enumerate().take(k + 1).skip(k.saturating_sub(3)) {
                        eprintln!("step {j}: {o:?}");
                    }
                })?;
                total.set(total.get() + 1);
            }
            // Tear down: everything unmapped frees every table but the root.
            let pages: Vec<u64> = m.shadow.keys().copied().collect();
            for p in pages {
                m.s.unmap(va(p), PAGE).unwrap();
            }
            m.check(&[])?;
            prop_assert_eq!(m.s.platform().tables_in_use(), 1);
            Ok(())
        })
        .unwrap();
    assert!(total.get() >= STEPS * seed_cases as usize);
}

// 4 configurations x 64 cases x 400 steps = 102 400 operations.

#[test]
fn model_no_features_48bit() {
    run(Features::NONE, VaSize::Bits48, CASES);
}

#[test]
fn model_all_features_48bit() {
    run(Features::ALL, VaSize::Bits48, CASES);
}

#[test]
fn model_hafdbs_range_no_bbm_39bit() {
    let f = Features {
        hafdbs: true,
        tlbi_range: true,
        bbm_level: 0,
    };
    run(f, VaSize::Bits39, CASES);
}

#[test]
fn model_bbm2_only_39bit() {
    let f = Features {
        hafdbs: false,
        tlbi_range: false,
        bbm_level: 2,
    };
    run(f, VaSize::Bits39, CASES);
}
