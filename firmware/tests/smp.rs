//! SMP suite: the secondary cores come up (PSCI CPU_ON, or the holding pen
//! when entered at EL3) with their own stacks, guard pages, exception
//! stack, per-CPU data and the boot core's MMU setup; then stress on every
//! core for a bounded time: allocation and frees across cores with
//! lock-free speculative lookups racing them, and one core mapping and
//! unmapping pages the others read (a reader faults or sees the page's own
//! data, never a frame that was freed and reused). The allocator's
//! consistency check, exact frame accounting and the linter end each test.
//! The host runs it with `-smp 4` (multi-threaded TCG) on `-cpu max` and
//! `cortex-a53`, and on the board models.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

#[cfg(test)]
#[path = "support/pl031.rs"]
mod pl031;

#[cfg(test)]
#[embedded_test::tests(default_timeout = 60)]
mod tests {
    use super::pl031;
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use firmware::mm::{FRAMES, STAGE1};
    use hal::global::Global;
    use hal::memory::{folio_read_u64, folio_write_u64, scratch_read_u64, ScratchError};
    use hal::percpu::MAX_CPUS;
    use memdesc::frames::{FolioRef, FrameType, LastRef, Owner};
    use memdesc::stage1::Attributes;
    use memdesc::{Pfn, PhysAddr, VirtAddr};

    /// How long each stress phase runs on every core.
    const STRESS_US: u64 = 1_000_000;
    /// How far a phase may run past `STRESS_US` to reach its minimum work.
    const OVERTIME_US: u64 = 20_000_000;
    /// The fewest maps and unmaps the unmap-while-reading phase judges.
    const MIN_ROUNDS: u64 = 50;

    #[init]
    fn init() -> u32 {
        let platform = firmware::init();
        firmware::smp::start(&platform).online
    }

    /// Cores the machine should bring up: what the host started, except
    /// where the model holds the secondaries in reset at EL3 with no way
    /// to release them (i.MX 8M Plus), where only the boot core runs. The
    /// ZCU102 at EL3 starts them through its reset-address registers.
    fn expected_online() -> u32 {
        let smp = hal::semihost::arg_u64("smp").expect("host passes smp") as u32;
        let held = hal::boot::entry_el() == 3 && hal::board::CURRENT.name == "imx8mp-evk";
        if held {
            1
        } else {
            smp
        }
    }

    fn secondaries() -> impl Iterator<Item = usize> {
        let online = hal::smp::online();
        (1..MAX_CPUS).filter(move |&i| online & (1 << i) != 0)
    }

    /// Runs `job` on every online secondary and on this core, then waits.
    fn on_every_core(job: fn(usize)) {
        let mut tickets = [0u64; MAX_CPUS];
        for i in secondaries() {
            tickets[i] = hal::smp::run_on(i, job).expect("post job");
        }
        job(0);
        for i in secondaries() {
            assert!(
                hal::smp::wait(i, tickets[i], 20_000_000),
                "core {} did not finish",
                i
            );
        }
    }

    /// A small xorshift, one stream per core.
    struct Rng(u64);
    impl Rng {
        fn new(core: usize) -> Self {
            Self(0x9e37_79b9_7f4a_7c15 ^ ((core as u64 + 1) << 17))
        }
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    static DEADLINE_US: AtomicU64 = AtomicU64::new(0);
    fn running() -> bool {
        hal::timer::uptime_us() < DEADLINE_US.load(Ordering::Relaxed)
    }
    fn start_clock() {
        DEADLINE_US.store(hal::timer::uptime_us() + STRESS_US, Ordering::Relaxed);
    }
    /// Past the phase's time but short of `min` rounds of work: a host too
    /// loaded to run the vCPUs for most of the phase stretches it (up to
    /// `OVERTIME_US`) rather than judging a phase that barely ran.
    fn overtime(done: u64, min: u64) -> bool {
        done < min && hal::timer::uptime_us() < DEADLINE_US.load(Ordering::Relaxed) + OVERTIME_US
    }

    // ---- bring-up ---------------------------------------------------------

    /// What a secondary saw of itself: index, SP, SPSel, VBAR, translation
    /// regime, and whether a write to its own main-stack guard page faulted.
    static SEEN: [[AtomicU64; 9]; MAX_CPUS] =
        [const { [const { AtomicU64::new(0) }; 9] }; MAX_CPUS];

    fn report_self(core: usize) {
        let (sp, spsel) = hal::boot::stack_pointer_and_spsel();
        let s = &SEEN[core];
        s[0].store(hal::percpu::index() as u64, Ordering::Relaxed);
        s[1].store(sp, Ordering::Relaxed);
        s[2].store(spsel, Ordering::Relaxed);
        s[3].store(hal::exception::vbar(), Ordering::Relaxed);
        for (k, r) in hal::mmu::regime().iter().enumerate() {
            s[4 + k].store(*r, Ordering::Relaxed);
        }
        let [_, guard, _, _] = hal::image::cpu_stacks(core).expect("a slot");
        let faulted = hal::memory::probe_write_expecting_fault(guard.end - 8, 0)
            .is_ok_and(|f| f.far == guard.end - 8);
        s[8].store(faulted as u64, Ordering::Release);
    }

    /// Every core the machine has comes up at EL1, runs on its own stacks
    /// (main on SP_EL0, guard page unmapped: a write there faults and is
    /// handled on that core's own exception stack), finds its own per-CPU
    /// slot through TPIDR_EL1, and has the boot core's vectors and
    /// MAIR/TCR/TTBR0/SCTLR.
    #[test]
    fn every_core_comes_up_with_its_own_stacks(online: u32) {
        assert_eq!(online, expected_online(), "cores online");
        assert_eq!(hal::smp::online().count_ones(), online);
        let boot = hal::mmu::regime();
        for i in secondaries() {
            let t = hal::smp::run_on(i, report_self).expect("post");
            assert!(hal::smp::wait(i, t, 5_000_000), "core {} ran no job", i);
            let s: [u64; 9] = core::array::from_fn(|k| SEEN[i][k].load(Ordering::Acquire));
            let [main, _, _, _] = hal::image::cpu_stacks(i).expect("slot");
            assert_eq!(s[0], i as u64, "per-CPU slot of core {}", i);
            assert!(
                main.start < s[1] && s[1] <= main.end,
                "core {} SP {:#x}",
                i,
                s[1]
            );
            assert_eq!(s[2], 0, "core {} runs on SP_EL0", i);
            assert_eq!(s[3], hal::exception::vbar());
            assert_eq!(&s[4..8], &boot, "core {} translation regime", i);
            assert_eq!(s[8], 1, "core {}: its guard page write did not fault", i);
            assert_eq!(hal::percpu::of(i).map(|p| p.mpidr() & 0xff), Some(i as u64));
        }
        assert_eq!(hal::percpu::index(), 0);
    }

    // ---- tickets ------------------------------------------------------------

    static HOLD: AtomicBool = AtomicBool::new(false);
    static HELD_RUNNING: AtomicBool = AtomicBool::new(false);
    static SECOND_RAN: AtomicU64 = AtomicU64::new(0);

    fn held_job(_core: usize) {
        HELD_RUNNING.store(true, Ordering::Release);
        while HOLD.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }

    fn second_job(_core: usize) {
        SECOND_RAN.fetch_add(1, Ordering::Release);
    }

    /// A job posted while the core still runs the previous one (its slot is
    /// already free) gets a ticket of its own: waiting for it does not
    /// return when the previous job ends.
    #[test]
    fn a_job_posted_while_the_last_runs_gets_its_own_ticket() {
        let Some(i) = secondaries().next() else {
            // One core only (the i.MX 8M Plus at EL3): nothing to post to.
            assert_eq!(expected_online(), 1);
            return;
        };
        HOLD.store(true, Ordering::Release);
        HELD_RUNNING.store(false, Ordering::Release);
        let before = SECOND_RAN.load(Ordering::Acquire);
        let first = hal::smp::run_on(i, held_job).expect("post the held job");
        let t0 = hal::timer::uptime_us();
        while !HELD_RUNNING.load(Ordering::Acquire) {
            assert!(
                hal::timer::uptime_us() - t0 < 5_000_000,
                "held job never started"
            );
            core::hint::spin_loop();
        }
        let second = hal::smp::run_on(i, second_job).expect("post while the first runs");
        assert_eq!(second, first + 1, "tickets {} then {}", first, second);
        HOLD.store(false, Ordering::Release);
        assert!(
            hal::smp::wait(i, second, 5_000_000),
            "second job never counted"
        );
        assert_eq!(
            SECOND_RAN.load(Ordering::Acquire),
            before + 1,
            "wait returned before the second job ran"
        );
    }

    // ---- one owner per device ------------------------------------------------

    /// Per core: 1 claimed, 2 refused as claimed, 3 not found, 4 other error.
    static CLAIM: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
    static CLAIM_GO: AtomicBool = AtomicBool::new(false);

    fn claim_balloon(core: usize) {
        while !CLAIM_GO.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        let r = hal::discover::discover()
            .map_err(|_| 4)
            .and_then(|d| {
                hal::virtio::claim(&d.platform, hal::virtio::DEVICE_ID_BALLOON).map_err(|e| match e
                {
                    hal::virtio::ProbeError::AlreadyClaimed { .. } => 2,
                    hal::virtio::ProbeError::NotFound => 3,
                    _ => 4,
                })
            })
            .map(|_| 1);
        CLAIM[core].store(r.unwrap_or_else(|e| e), Ordering::Release);
    }

    /// Every core claims the balloon's transport at once: exactly one gets
    /// it, the others are refused, and so is a claim after them (boards
    /// without the device: every core finds none).
    #[test]
    fn one_core_wins_a_racing_claim_of_a_device() {
        CLAIM_GO.store(false, Ordering::Release);
        let mut tickets = [0u64; MAX_CPUS];
        for i in secondaries() {
            tickets[i] = hal::smp::run_on(i, claim_balloon).expect("post claim");
        }
        CLAIM_GO.store(true, Ordering::Release);
        claim_balloon(0);
        for i in secondaries() {
            assert!(
                hal::smp::wait(i, tickets[i], 5_000_000),
                "core {} did not claim",
                i
            );
        }
        let cores = || (0..MAX_CPUS).filter(|&i| i == 0 || hal::smp::online() & (1 << i) != 0);
        let outcome = |i: usize| CLAIM[i].load(Ordering::Acquire);
        if outcome(0) == 3 {
            assert!(
                cores().all(|i| outcome(i) == 3),
                "some core found a balloon"
            );
            return;
        }
        let won = cores().filter(|&i| outcome(i) == 1).count();
        let refused = cores().filter(|&i| outcome(i) == 2).count();
        assert_eq!(won, 1, "claims won");
        assert_eq!(won + refused, cores().count(), "every other claim refused");
        claim_balloon(0);
        assert_eq!(outcome(0), 2, "a claim after the race");
    }

    // ---- allocation across cores -----------------------------------------

    /// Folios handed from the core that allocated them to whichever core
    /// frees them.
    struct Handoff {
        slots: [Option<(FolioRef, usize)>; 64],
    }
    static HANDOFF: Global<Handoff> = Global::new();
    /// The PFN of a recently handed-off folio: other cores look it up
    /// speculatively (lock-free) while it may be freed and reused.
    static RECENT: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
    static ALLOCS: AtomicU64 = AtomicU64::new(0);
    static CROSS_FREES: AtomicU64 = AtomicU64::new(0);
    static SPEC_HITS: AtomicU64 = AtomicU64::new(0);
    static SPEC_REFUSED: AtomicU64 = AtomicU64::new(0);
    static ERRORS: AtomicU64 = AtomicU64::new(0);
    static FIRST_ERROR: AtomicU64 = AtomicU64::new(0);

    fn error(code: u64) {
        if ERRORS.fetch_add(1, Ordering::Relaxed) == 0 {
            FIRST_ERROR.store(code, Ordering::Relaxed);
        }
    }

    fn put(f: FolioRef) {
        if FRAMES.put(f).is_err() {
            error(1);
        }
    }

    fn release(last: Option<LastRef>) {
        if let Some(last) = last {
            if FRAMES.release(last).is_err() {
                error(2);
            }
        }
    }

    /// Folios each core hands to the next core in the paired phase.
    const PAIRED: usize = 4;
    /// The paired phase uses the slots below; the random phase the rest.
    const RANDOM_SLOTS: usize = MAX_CPUS * PAIRED;
    static CORES: AtomicU64 = AtomicU64::new(1);
    static ARRIVED: AtomicU64 = AtomicU64::new(0);

    /// Paired phase: core `c` (of `n`, dense since all come up in order)
    /// allocates `PAIRED` folios into its slots, and after every core has,
    /// frees the folios core `c + 1` allocated.
    fn paired_phase(core: usize) {
        let n = CORES.load(Ordering::Relaxed) as usize;
        for k in 0..PAIRED {
            match FRAMES.alloc_folio(0, Owner::Buddy) {
                Ok(f) => {
                    ALLOCS.fetch_add(1, Ordering::Relaxed);
                    if HANDOFF
                        .with(|h| h.slots[core * PAIRED + k] = Some((f, core)))
                        .is_err()
                    {
                        error(5);
                    }
                }
                Err(_) => error(6),
            }
        }
        ARRIVED.fetch_add(1, Ordering::AcqRel);
        let t0 = hal::timer::uptime_us();
        while ARRIVED.load(Ordering::Acquire) < n as u64 {
            if hal::timer::uptime_us() - t0 > 10_000_000 {
                error(7);
                return;
            }
            core::hint::spin_loop();
        }
        let next = (core + 1) % n;
        for k in 0..PAIRED {
            let taken = HANDOFF
                .with(|h| h.slots[next * PAIRED + k].take())
                .ok()
                .flatten();
            match taken {
                Some((f, from)) => {
                    if from != core {
                        CROSS_FREES.fetch_add(1, Ordering::Relaxed);
                    }
                    put(f);
                }
                None => error(8),
            }
        }
    }

    fn alloc_job(core: usize) {
        paired_phase(core);
        let mut rng = Rng::new(core);
        let pa = FRAMES.page_array().expect("frames");
        while running() {
            let r = rng.next();
            let order = [0u8, 0, 0, 1, 2, 3, 0, 5][(r & 7) as usize];
            if let Ok(f) = FRAMES.alloc_folio(order, Owner::Buddy) {
                {
                    ALLOCS.fetch_add(1, Ordering::Relaxed);
                    let base = f.pfn().addr().0;
                    let tag = base ^ ((core as u64) << 56) ^ 0xa5;
                    let ok = folio_write_u64(base, tag).is_ok() && folio_read_u64(base) == Ok(tag);
                    if !ok {
                        error(3);
                    }
                    RECENT[(r >> 8) as usize % 8].store(f.pfn().0, Ordering::Relaxed);
                    if r & 0x10 != 0 {
                        let left = HANDOFF.with(|h| {
                            match h.slots[RANDOM_SLOTS..].iter_mut().find(|s| s.is_none()) {
                                Some(slot) => {
                                    *slot = Some((f, core));
                                    None
                                }
                                None => Some(f),
                            }
                        });
                        match left {
                            Ok(Some(f)) => put(f),
                            Ok(None) => {}
                            Err(_) => error(4),
                        }
                    } else {
                        put(f);
                    }
                }
            }
            // Free one a core handed off (possibly another core's).
            let taken = HANDOFF
                .with(|h| {
                    let i = RANDOM_SLOTS + (r >> 20) as usize % (h.slots.len() - RANDOM_SLOTS);
                    h.slots[i].take()
                })
                .ok()
                .flatten();
            if let Some((f, from)) = taken {
                if from != core {
                    CROSS_FREES.fetch_add(1, Ordering::Relaxed);
                }
                put(f);
            }
            // A speculative lookup, without the lock, of a frame that some
            // core may be freeing or reusing right now.
            let pfn = Pfn(RECENT[(r >> 32) as usize % 8].load(Ordering::Relaxed));
            if pfn.0 != 0 {
                let mut last = None;
                match pa.get_folio(pfn, |l| last = Some(l)) {
                    Ok(f) => {
                        SPEC_HITS.fetch_add(1, Ordering::Relaxed);
                        put(f);
                    }
                    Err(_) => {
                        SPEC_REFUSED.fetch_add(1, Ordering::Relaxed);
                    }
                }
                release(last);
            }
        }
    }

    /// Frame accounting: (free, in folios, everything else the allocator
    /// took for itself: page tables and descriptor-cache chunks, which it
    /// keeps). Exact: a frame is in exactly one of the three or was never
    /// free (image, DTB, page array).
    fn accounting() -> (u64, u64, u64) {
        FRAMES
            .with(|fa| {
                fa.drain_cache();
                (
                    fa.count(FrameType::Free),
                    fa.count(FrameType::Folio),
                    fa.count(FrameType::PageTable) + fa.count(FrameType::Reserved),
                )
            })
            .expect("frames")
    }

    /// Every folio came back; whatever else left the free lists is page
    /// tables or descriptor chunks the allocator kept.
    fn assert_all_back(before: (u64, u64, u64)) {
        let after = accounting();
        assert_eq!(
            after.1, before.1,
            "folios outstanding: {:?} -> {:?}",
            before, after
        );
        assert_eq!(
            after.0 + after.2,
            before.0 + before.2,
            "frames lost: {:?} -> {:?}",
            before,
            after
        );
        FRAMES
            .try_with(|fa| fa.check_consistency())
            .expect("consistent");
    }

    /// Every core allocates mixed-order folios, writes and checks them,
    /// hands half to a shared list that any core frees from, and looks up
    /// recently handed-off frames speculatively without the lock. Afterwards
    /// every frame is back, and the allocator's consistency check is clean.
    #[test]
    fn alloc_and_free_across_cores(online: u32) {
        let before = accounting();
        CORES.store(hal::smp::online().count_ones() as u64, Ordering::Relaxed);
        HANDOFF
            .set(Handoff {
                slots: [const { None }; 64],
            })
            .expect("handoff list");
        start_clock();
        on_every_core(alloc_job);
        let left = HANDOFF.with(|h| {
            let mut n = [const { None }; 64];
            core::mem::swap(&mut n, &mut h.slots);
            n
        });
        for (f, _) in left.expect("handoff").into_iter().flatten() {
            put(f);
        }
        assert_eq!(
            ERRORS.load(Ordering::Relaxed),
            0,
            "first error {}",
            FIRST_ERROR.load(Ordering::Relaxed)
        );
        let (allocs, cross) = (
            ALLOCS.load(Ordering::Relaxed),
            CROSS_FREES.load(Ordering::Relaxed),
        );
        defmt::info!(
            "{=u32} cores: {=u64} allocations, {=u64} freed by another core, speculative lookups {=u64} hit / {=u64} refused, buddy lock waited {=u64} times",
            online,
            allocs,
            cross,
            SPEC_HITS.load(Ordering::Relaxed),
            SPEC_REFUSED.load(Ordering::Relaxed),
            FRAMES.contended()
        );
        assert!(allocs >= online as u64 * PAIRED as u64);
        if online > 1 {
            assert!(cross > 0, "no folio was freed by another core");
        }
        // Every core went through its own cache: allocations served from
        // it and frees into it, not only the buddy.
        for i in (0..MAX_CPUS).filter(|&i| hal::smp::online() & (1 << i) != 0) {
            let s = FRAMES.cpu_stats(i).expect("cpu stats");
            assert!(
                s.fast_allocs > 0 && s.fast_frees > 0,
                "core {} bypassed its cache: {:?}",
                i,
                defmt::Debug2Format(&s)
            );
        }
        assert_all_back(before);
    }

    /// A folio the boot core allocated, for core 1 to free.
    static GIVEN: Global<Option<FolioRef>> = Global::new();
    /// What core 1 saw inside its job: [PFN it freed, PFN its next
    /// allocation got, frames in its cache after it freed that one too,
    /// fast frees counted].
    static CORE1_SAW: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

    fn free_given_job(core: usize) {
        let Ok(Some(f)) = GIVEN.with(Option::take) else {
            error(20);
            return;
        };
        let pfn = f.pfn().0;
        put(f);
        // The block is in this core's cache now: its next order-0 folio is
        // that same frame (the cache is a stack).
        match FRAMES.alloc_folio(0, Owner::Buddy) {
            Ok(g) => {
                CORE1_SAW[1].store(g.pfn().0, Ordering::Relaxed);
                put(g);
            }
            Err(_) => error(21),
        }
        let s = FRAMES.cpu_stats(core).expect("own stats");
        CORE1_SAW[0].store(pfn, Ordering::Relaxed);
        CORE1_SAW[2].store(s.cached_frames, Ordering::Relaxed);
        CORE1_SAW[3].store(s.fast_frees, Ordering::Release);
    }

    /// The per-CPU path on target: the boot core's allocation comes from
    /// its own cache; a folio it allocated and core 1 frees goes into core
    /// 1's cache (core 1's next allocation reuses it); once core 1 has no
    /// job and goes idle, its cache is drained to the buddy; and the frame
    /// accounting is exact throughout.
    #[test]
    fn a_free_on_another_core_lands_in_its_cache_and_idle_drains_it(online: u32) {
        let before = accounting();
        let boot0 = FRAMES.cpu_stats(0).expect("stats");
        let f = FRAMES.alloc_folio(0, Owner::Buddy).expect("a folio");
        let boot1 = FRAMES.cpu_stats(0).expect("stats");
        assert_eq!(
            boot1.fast_allocs,
            boot0.fast_allocs + 1,
            "not from core 0's cache"
        );
        assert!(boot1.cached_frames > 0, "core 0's cache was not refilled");
        if online < 2 {
            // One core only (the model holds the others in reset).
            put(f);
            assert_all_back(before);
            return;
        }
        let pfn = f.pfn().0;
        let c1_before = FRAMES.cpu_stats(1).expect("core 1 stats");
        GIVEN.set(Some(f)).expect("slot");
        let t = hal::smp::run_on(1, free_given_job).expect("post");
        assert!(hal::smp::wait(1, t, 5_000_000), "core 1 ran no job");
        assert_eq!(
            ERRORS.load(Ordering::Relaxed),
            0,
            "first error {}",
            FIRST_ERROR.load(Ordering::Relaxed)
        );
        let saw: [u64; 4] = core::array::from_fn(|k| CORE1_SAW[k].load(Ordering::Acquire));
        assert_eq!(saw[0], pfn);
        assert_eq!(saw[1], pfn, "core 1 did not reuse the frame it was given");
        assert!(saw[2] > 0, "core 1's cache held nothing after its frees");
        assert_eq!(
            saw[3],
            c1_before.fast_frees + 2,
            "frees did not go into core 1's cache"
        );
        // Idle now: the service loop drains core 1's cache before WFE.
        let t0 = hal::timer::uptime_us();
        let drained = loop {
            let s = FRAMES.cpu_stats(1).expect("core 1 stats");
            if s.cached_frames == 0 || hal::timer::uptime_us() - t0 > 2_000_000 {
                break s;
            }
            core::hint::spin_loop();
        };
        assert_eq!(drained.cached_frames, 0, "idle core 1 kept its cache");
        assert!(drained.drains > c1_before.drains);
        assert_all_back(before);
    }

    // ---- a core offline and back ------------------------------------------

    /// What the core going offline saw: [frames in its cache when it
    /// stopped allocating, its allocations served from the cache].
    static OFF_SAW: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

    /// Allocates and frees a few order-0 folios (the frees stay in this
    /// core's cache), then holds until the offline request arrives, so the
    /// core goes from this job straight to the offline path with its cache
    /// full (not through the idle drain).
    fn fill_cache_then_hold(core: usize) {
        let mut held: [Option<FolioRef>; 8] = [const { None }; 8];
        for h in held.iter_mut() {
            match FRAMES.alloc_folio(0, Owner::Buddy) {
                Ok(f) => *h = Some(f),
                Err(_) => error(30),
            }
        }
        for f in held.into_iter().flatten() {
            put(f);
        }
        let s = FRAMES.cpu_stats(core).expect("own stats");
        OFF_SAW[1].store(s.fast_allocs, Ordering::Relaxed);
        OFF_SAW[0].store(s.cached_frames, Ordering::Release);
        let t0 = hal::timer::uptime_us();
        while !hal::smp::off_requested(core) && hal::timer::uptime_us() - t0 < 10_000_000 {
            core::hint::spin_loop();
        }
    }

    /// One order-0 allocation and free, from this core's cache.
    fn alloc_once(core: usize) {
        match FRAMES.alloc_folio(0, Owner::Buddy) {
            Ok(f) => put(f),
            Err(_) => error(31),
        }
        let s = FRAMES.cpu_stats(core).expect("own stats");
        OFF_SAW[1].store(s.fast_allocs, Ordering::Release);
    }

    /// A core holding cached free frames is taken offline (PSCI CPU_OFF,
    /// or parked where the cores were not started by PSCI): before it
    /// stops its cache is drained to the buddy, so the frame accounting is
    /// exact and the consistency check clean with it off; then it comes
    /// back (PSCI CPU_ON through the boot path, or released) and allocates
    /// from its cache again.
    #[test]
    fn a_core_taken_offline_drains_its_cache_and_comes_back(online: u32) {
        if online < 2 {
            // One core only (the model holds the others in reset).
            assert_eq!(
                firmware::smp::cpu_off(1),
                Err(hal::smp::SmpError::NotOnline(1))
            );
            return;
        }
        assert_eq!(firmware::smp::cpu_off(0), Err(hal::smp::SmpError::BootCore));
        let target = online as usize - 1;
        let before = accounting();
        let t = hal::smp::run_on(target, fill_cache_then_hold).expect("post");
        let t0 = hal::timer::uptime_us();
        while OFF_SAW[0].load(Ordering::Acquire) == 0 && hal::timer::uptime_us() - t0 < 5_000_000 {
            core::hint::spin_loop();
        }
        let cached = FRAMES.cpu_stats(target).expect("stats");
        assert!(
            cached.cached_frames > 0,
            "core {} holds no cached frames",
            target
        );
        firmware::smp::cpu_off(target).expect("offline");
        assert!(hal::smp::wait(target, t, 1_000_000), "job not finished");
        assert_eq!(hal::smp::online() & (1 << target), 0, "still online");
        assert_eq!(hal::smp::offline(), 1 << target);
        assert_eq!(
            hal::smp::run_on(target, alloc_once),
            Err(hal::smp::SmpError::NotOnline(target))
        );
        let off = FRAMES.cpu_stats(target).expect("stats");
        assert_eq!(off.cached_frames, 0, "offline core kept its cache");
        assert!(off.drains > cached.drains, "no drain on the way off");
        assert_all_back(before);
        // Back, and allocating from its cache again.
        firmware::smp::cpu_on(target).expect("online again");
        assert_ne!(hal::smp::online() & (1 << target), 0);
        assert_eq!(hal::smp::offline(), 0);
        assert_eq!(
            firmware::smp::cpu_on(target),
            Err(hal::smp::SmpError::NotOffline(target))
        );
        let allocs = OFF_SAW[1].load(Ordering::Acquire);
        let t = hal::smp::run_on(target, alloc_once).expect("post after return");
        assert!(hal::smp::wait(target, t, 5_000_000), "no job after return");
        assert_eq!(OFF_SAW[1].load(Ordering::Acquire), allocs + 1);
        assert_eq!(
            ERRORS.load(Ordering::Relaxed),
            0,
            "first error {}",
            FIRST_ERROR.load(Ordering::Relaxed)
        );
        // And it can go again.
        firmware::smp::cpu_off(target).expect("offline twice");
        firmware::smp::cpu_on(target).expect("online twice");
        assert_all_back(before);
    }

    // ---- waking a core asleep in WFI ----------------------------------------

    /// How long taking a WFI-idle core offline, bringing it back or running
    /// a job on it may take (the request's own timeout is 1 s).
    const WAKE_BOUND_US: u64 = 500_000;

    /// Waits until `core` has gone to sleep in WFI and stays asleep for
    /// 20 ms (a WFI that returned at once, on an interrupt nobody
    /// acknowledged, would count again).
    fn wait_until_asleep(core: usize, after: u64) {
        let t0 = hal::timer::uptime_us();
        while hal::smp::wfi_sleeps(core) <= after {
            assert!(
                hal::timer::uptime_us() - t0 < 5_000_000,
                "core {} never slept in WFI",
                core
            );
            core::hint::spin_loop();
        }
        let n = hal::smp::wfi_sleeps(core);
        let t1 = hal::timer::uptime_us();
        while hal::timer::uptime_us() - t1 < 20_000 {
            core::hint::spin_loop();
        }
        assert_eq!(
            hal::smp::wfi_sleeps(core),
            n,
            "core {} does not stay asleep in WFI",
            core
        );
    }

    /// The interrupt controller up (so a sleeping core can be woken), then
    /// every idle secondary sleeps in WFI, as in the shipped firmware.
    fn sleep_in_wfi() {
        firmware::interrupts::init().expect("interrupt bring-up");
        hal::smp::sleep_when_idle();
        for i in secondaries() {
            wait_until_asleep(i, 0);
        }
    }

    /// A core asleep in WFI is taken offline and brought back within the
    /// bound (the request wakes it with an interrupt: an SGI on a GIC, a
    /// mailbox on the Pi 3's local controller), twice, and sleeps in WFI
    /// again in between; no frame is lost.
    #[test]
    fn a_core_asleep_in_wfi_is_woken_to_go_offline_and_back(online: u32) {
        if online < 2 {
            assert_eq!(expected_online(), 1);
            return;
        }
        let target = online as usize - 1;
        sleep_in_wfi();
        // After the interrupt bring-up, which maps the GIC (page tables).
        let before = accounting();
        for round in 0..2 {
            let t0 = hal::timer::ticks();
            firmware::smp::cpu_off(target).expect("offline from WFI");
            let t1 = hal::timer::ticks();
            // Offline: its count stands still until it sleeps again.
            let slept = hal::smp::wfi_sleeps(target);
            firmware::smp::cpu_on(target).expect("online again");
            let t2 = hal::timer::ticks();
            let (off, on) = (
                hal::timer::ticks_to_ns(t1 - t0),
                hal::timer::ticks_to_ns(t2 - t1),
            );
            defmt::info!(
                "round {=u32}: cpu_off of WFI-idle core {=usize} took {=u64} us, cpu_on {=u64} us",
                round,
                target,
                off / 1000,
                on / 1000
            );
            assert!(off < WAKE_BOUND_US * 1000, "cpu_off took {} ns", off);
            assert!(on < WAKE_BOUND_US * 1000, "cpu_on took {} ns", on);
            assert_eq!(hal::smp::offline(), 0);
            wait_until_asleep(target, slept);
        }
        assert_all_back(before);
    }

    static WOKEN_JOBS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

    fn count_woken(core: usize) {
        WOKEN_JOBS[core].fetch_add(1, Ordering::Release);
    }

    /// A job posted to a core asleep in WFI runs within the bound, on
    /// every secondary, twice.
    #[test]
    fn a_core_asleep_in_wfi_is_woken_for_a_job() {
        sleep_in_wfi();
        for round in 1..=2 {
            for i in secondaries() {
                let slept = hal::smp::wfi_sleeps(i);
                let t0 = hal::timer::uptime_us();
                let t = hal::smp::run_on(i, count_woken).expect("post");
                assert!(
                    hal::smp::wait(i, t, WAKE_BOUND_US),
                    "core {} asleep in WFI did not run its job",
                    i
                );
                let us = hal::timer::uptime_us() - t0;
                defmt::info!("job on WFI-idle core {=usize}: done in {=u64} us", i, us);
                assert_eq!(WOKEN_JOBS[i].load(Ordering::Acquire), round);
                wait_until_asleep(i, slept);
            }
        }
    }

    /// Without an interrupt controller to wake them, idle cores do not
    /// sleep in WFI even when asked to: they wait with WFE, where a
    /// request's SEV reaches them, so going offline and jobs still work.
    #[test]
    fn without_a_wake_interrupt_idle_cores_wait_in_wfe() {
        let Some(target) = secondaries().last() else {
            assert_eq!(expected_online(), 1);
            return;
        };
        hal::smp::sleep_when_idle();
        let t0 = hal::timer::uptime_us();
        while hal::timer::uptime_us() - t0 < 50_000 {
            core::hint::spin_loop();
        }
        for i in secondaries() {
            assert_eq!(hal::smp::wfi_sleeps(i), 0, "core {} sleeps in WFI", i);
        }
        let t = hal::smp::run_on(target, count_woken).expect("post");
        assert!(hal::smp::wait(target, t, WAKE_BOUND_US), "job not run");
        firmware::smp::cpu_off(target).expect("offline");
        firmware::smp::cpu_on(target).expect("online again");
        assert_eq!(hal::smp::wfi_sleeps(target), 0);
    }

    // ---- a device interrupt with every core up ------------------------------

    /// With every core up, the GIC has a CPU interface per core, and a
    /// device's SPI still reaches the boot core that enabled it (on a
    /// GICv2 its GICD_ITARGETSR must name this core: with more than one
    /// CPU interface it resets to none). The PL031 is virt's only.
    #[test]
    fn a_device_spi_reaches_the_boot_core_with_every_core_up(online: u32) {
        if hal::board::CURRENT.name != "virt" {
            return;
        }
        let irqs = firmware::interrupts::init().expect("interrupt bring-up");
        let irq = pl031::attach(&irqs);
        let runs = pl031::raise_and_wait();
        hal::irq::mask_irqs();
        assert_eq!(
            runs, 1,
            "the RTC's SPI did not arrive with {} cores up",
            online
        );
        assert_eq!(pl031::dispatched_intid(), irq.intid.raw());
    }

    // ---- mapping while others read -----------------------------------------

    /// Pages in the scratch window that the mapper churns.
    const SLOTS: u64 = 64;
    const CHURN_VA: u64 = hal::memory::SCRATCH_BASE + (1 << 30);
    const POISON: u64 = 0xdead_dead_dead_dead;
    fn tag(va: u64) -> u64 {
        va ^ 0x5157_5157_0000_0000
    }
    static MAPPER_DONE: AtomicBool = AtomicBool::new(false);
    static READS_OK: AtomicU64 = AtomicU64::new(0);
    static READ_FAULTS: AtomicU64 = AtomicU64::new(0);
    static BAD_READS: AtomicU64 = AtomicU64::new(0);
    static BAD_VALUE: AtomicU64 = AtomicU64::new(0);

    fn reader_job(core: usize) {
        let mut rng = Rng::new(core);
        while !MAPPER_DONE.load(Ordering::Relaxed) {
            let r = rng.next();
            let va = CHURN_VA + (r % SLOTS) * 4096 + ((r >> 16) % 8) * 8;
            match scratch_read_u64(va) {
                Ok(v) if v == tag(va & !0xfff) => {
                    READS_OK.fetch_add(1, Ordering::Relaxed);
                }
                Ok(v) => {
                    BAD_READS.fetch_add(1, Ordering::Relaxed);
                    BAD_VALUE.store(v, Ordering::Relaxed);
                }
                Err(ScratchError::Fault(_)) => {
                    READ_FAULTS.fetch_add(1, Ordering::Relaxed);
                }
                Err(ScratchError::OutsideWindow { .. }) => {
                    BAD_READS.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The boot core maps and unmaps single pages in the scratch window:
    /// each fresh frame gets its page's tag before it is mapped, and POISON
    /// after it is unmapped and before it is freed (and then reused for
    /// another page with another tag). The other cores read random words
    /// of those pages all the while: each read must fault or return the
    /// page's own tag — never POISON or another page's tag, which only a
    /// stale translation to a freed frame could give. Then the linter is
    /// clean and every frame is back.
    #[test]
    fn unmap_while_other_cores_read(online: u32) {
        let before = accounting();
        let mut held: [Option<FolioRef>; SLOTS as usize] = [const { None }; SLOTS as usize];
        let mut readers = [0u64; MAX_CPUS];
        for i in secondaries() {
            readers[i] = hal::smp::run_on(i, reader_job).expect("post reader");
        }
        start_clock();
        let mut rng = Rng::new(0);
        let (mut maps, mut unmaps) = (0u64, 0u64);
        while running() || overtime(maps.min(unmaps), MIN_ROUNDS + 1) {
            let k = rng.next() % SLOTS;
            let va = CHURN_VA + k * 4096;
            match held[k as usize].take() {
                Some(f) => {
                    STAGE1
                        .try_with(|s| s.unmap(VirtAddr(va), 4096))
                        .expect("unmap");
                    let pa = f.pfn().addr().0;
                    for w in 0..8 {
                        folio_write_u64(pa + w * 8, POISON).expect("our folio");
                    }
                    put(f);
                    unmaps += 1;
                }
                None => {
                    let f = FRAMES.alloc_folio(0, Owner::Buddy).expect("a frame");
                    let pa = f.pfn().addr().0;
                    for w in 0..8 {
                        folio_write_u64(pa + w * 8, tag(va)).expect("our folio");
                    }
                    // The tag is visible before the entry that maps it.
                    core::sync::atomic::fence(Ordering::SeqCst);
                    STAGE1
                        .try_with(|s| s.map(VirtAddr(va), PhysAddr(pa), 4096, Attributes::DATA))
                        .expect("map");
                    held[k as usize] = Some(f);
                    maps += 1;
                }
            }
        }
        MAPPER_DONE.store(true, Ordering::Relaxed);
        for i in secondaries() {
            assert!(
                hal::smp::wait(i, readers[i], 20_000_000),
                "reader {} stuck",
                i
            );
        }
        for (k, f) in held.iter_mut().enumerate() {
            if let Some(f) = f.take() {
                STAGE1
                    .try_with(|s| s.unmap(VirtAddr(CHURN_VA + k as u64 * 4096), 4096))
                    .expect("unmap");
                put(f);
            }
        }
        let (ok, faults, bad) = (
            READS_OK.load(Ordering::Relaxed),
            READ_FAULTS.load(Ordering::Relaxed),
            BAD_READS.load(Ordering::Relaxed),
        );
        defmt::info!(
            "{=u32} cores: {=u64} maps, {=u64} unmaps; readers: {=u64} saw the page's data, {=u64} faulted, {=u64} saw another frame; STAGE1 lock waited {=u64} times",
            online,
            maps,
            unmaps,
            ok,
            faults,
            bad,
            STAGE1.contended()
        );
        assert_eq!(
            bad,
            0,
            "a reader saw {:#x}",
            BAD_VALUE.load(Ordering::Relaxed)
        );
        assert!(maps > MIN_ROUNDS && unmaps > MIN_ROUNDS);
        if online > 1 {
            assert!(
                ok > 0 && faults > 0,
                "readers saw both mapped and unmapped pages"
            );
        }
        assert_eq!(firmware::mm::lint().expect("stage-1"), 0);
        assert_all_back(before);
    }
}
