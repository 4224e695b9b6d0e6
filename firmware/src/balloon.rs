//! The balloon service: finds the virtio-balloon device among the
//! virtio-mmio transports of the device tree, brings it up, and drives the
//! `memdesc` balloon policy against it in a polling loop (interrupts come
//! later). Ballooned frames are unmapped from the firmware's stage-1 map
//! while the host has them and mapped again on deflate.
//!
//! Each time the balloon settles it logs one line with the time it took,
//! the frame accounting (the allocator's consistency check, Offline frames
//! against the balloon's PFN arrays), the linter and the TLB footprint; the
//! host's system test reads that line.

use crate::mm::{Frames, BOOT_MAP, FRAMES, STAGE1};
use core::sync::atomic::{AtomicU64, Ordering};
use hal::dtb::Platform;
use hal::global::WithError;
use hal::virtio::balloon::VirtioBalloon;
use hal::virtio::linear::{FirmwareMemory, LinearDma, LinearEnv};
use memdesc::balloon::{Balloon, BalloonConfig, BalloonError, Op, Status};
use memdesc::frames::FrameType;
use memdesc::stage1::Attributes;
use memdesc::{Pfn, VirtAddr, PAGE_SIZE};

/// Free frames the balloon always leaves (16 MiB) on top of its table headroom.
pub const RESERVE_PAGES: u64 = 4096;
/// Poll interval when the balloon's interrupt could not be attached, and
/// the retry delay after an error.
const POLL_US: u64 = 2000;

/// The firmware's allocator and stage-1 map, for the hal's balloon memory.
pub struct FirmwareMem;

impl FirmwareMemory for FirmwareMem {
    fn with_frames<R>(f: impl FnOnce(&mut Frames) -> R) -> Result<R, BalloonError> {
        FRAMES.with(f).map_err(|_| BalloonError::FramesBusy)
    }

    fn unmap(pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        STAGE1
            .with(|s| s.unmap(VirtAddr(pfn.addr().0), pages * PAGE_SIZE))
            .map_err(|_| BalloonError::FramesBusy)?
            .map_err(BalloonError::Map)
    }

    fn map(pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        STAGE1
            .with(|s| {
                s.map(
                    VirtAddr(pfn.addr().0),
                    pfn.addr(),
                    pages * PAGE_SIZE,
                    Attributes::DATA,
                )
            })
            .map_err(|_| BalloonError::FramesBusy)?
            .map_err(BalloonError::Map)
    }

    fn refold(pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        STAGE1
            .with(|s| s.refold(VirtAddr(pfn.addr().0), pages * PAGE_SIZE))
            .map_err(|_| BalloonError::FramesBusy)?
            .map_err(BalloonError::Map)
    }
}

/// The policy's environment: the hal's identity-mapped balloon memory.
pub type FirmwareEnv = LinearEnv<FirmwareMem>;
/// Virtqueue memory.
pub type FirmwareDma = LinearDma<FirmwareMem>;

fn now_ns() -> u64 {
    hal::timer::ticks_to_ns(hal::timer::ticks())
}

fn idle_forever() -> ! {
    loop {
        hal::irq::wait_for_interrupt();
    }
}

/// What the settle check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettleReport {
    /// The allocator's consistency check passed and every Offline frame is
    /// in the balloon's arrays (and every Slab frame is the balloon's).
    pub frames_ok: bool,
    /// Offline frames.
    pub offline: u64,
    /// Linter violations.
    pub lint: usize,
    /// TLB entries the map needs now.
    pub tlb_entries: u64,
    /// The optimum: the boot map's, plus what the device windows mapped
    /// after boot (the GIC's) cost when the balloon started empty.
    pub boot_optimum: u64,
}

/// TLB entries of device windows mapped after the boot map (the GIC's),
/// measured when the balloon starts.
static LATER_DEVICE_ENTRIES: AtomicU64 = AtomicU64::new(0);

fn tlb_entries() -> u64 {
    STAGE1
        .with(|s| s.summary().tlb_entries())
        .unwrap_or(u64::MAX)
}

fn boot_optimum() -> u64 {
    BOOT_MAP
        .with(|m| m.optimum.tlb_entries())
        .unwrap_or(u64::MAX)
}

/// Checks the frame accounting, the linter and the footprint.
pub fn check(b: &Balloon) -> SettleReport {
    let dma = hal::virtio::linear::dma_frames();
    let (consistent, offline, slab) = FRAMES
        .with(|fa| {
            (
                fa.check_consistency().is_ok(),
                fa.count(FrameType::Offline),
                fa.count(FrameType::Slab),
            )
        })
        .unwrap_or((false, u64::MAX, u64::MAX));
    let frames_ok = consistent
        && offline == b.offline_frames() + b.reporting_frames()
        && slab == b.own_frames() + dma;
    let lint = crate::mm::lint().unwrap_or(usize::MAX);
    let tlb_entries = tlb_entries();
    let boot_optimum = boot_optimum().saturating_add(LATER_DEVICE_ENTRIES.load(Ordering::Relaxed));
    SettleReport {
        frames_ok,
        offline,
        lint,
        tlb_entries,
        boot_optimum,
    }
}

/// Writes every free frame ([`LinearEnv::touch_free_memory`]) and logs how
/// many and how long; `when` ends the log line's description.
fn touch_free(env: &mut FirmwareEnv, when: &str) {
    let t0 = now_ns();
    let n = env.touch_free_memory();
    defmt::info!(
        "balloon: touched {=u64} free frames ({=u64} MiB){=str} in {=u64} ms",
        n,
        (n * PAGE_SIZE) >> 20,
        when,
        (now_ns() - t0) / 1_000_000
    );
}

/// Finds the balloon, brings it up and serves it forever. Bootargs:
/// `balloon.touch` writes all free memory first (see
/// [`touch_free_memory`]), and `balloon.touch-after-deflate` again each
/// time a deflate has given everything back; `balloon.no-deflate-on-oom` declines
/// DEFLATE_ON_OOM even when offered; `selftest=balloon-touch` reads the
/// first ballooned frame once the balloon has settled with pages in it (the
/// crash report then says the frame is ballooned); `selftest=balloon-oom`
/// and `selftest=balloon-oom-tables` run the deflate-on-OOM self-tests
/// ([`oom_selftest`], [`table_oom_selftest`]).
pub fn run(platform: &Platform<'static>) -> ! {
    let mut env = match FirmwareEnv::new() {
        Ok(e) => e,
        Err(e) => {
            defmt::error!("balloon: no usable memory: {}", e);
            idle_forever()
        }
    };
    hal::exception::set_fault_note(hal::virtio::linear::fault_note);
    let args = platform.bootargs.unwrap_or("");
    let has = |w: &str| args.split_ascii_whitespace().any(|a| a == w);
    if has("balloon.touch") {
        touch_free(&mut env, "");
    }
    let selftest = if has("selftest=balloon-touch") {
        SelfTest::TouchBallooned
    } else if has("selftest=balloon-oom") {
        SelfTest::DeflateOnOom
    } else if has("selftest=balloon-oom-tables") {
        SelfTest::TableOom
    } else {
        SelfTest::None
    };
    let transport = match hal::virtio::claim(platform, hal::virtio::DEVICE_ID_BALLOON) {
        Ok(t) => t,
        Err(e) => {
            defmt::warn!("balloon: no device ({})", e);
            idle_forever()
        }
    };
    let node = transport.window();
    let refused = if has("balloon.no-deflate-on-oom") {
        memdesc::balloon::feature::DEFLATE_ON_OOM
    } else {
        0
    };
    let mut dev = match VirtioBalloon::<FirmwareDma>::new_refusing(transport, refused) {
        Ok(d) => d,
        Err(e) => {
            defmt::error!("balloon: bring-up failed: {}", defmt::Debug2Format(&e));
            idle_forever()
        }
    };
    // Chunks down to 4 KiB on every CPU: without FEAT_BBM level 2 a split
    // of the live linear map breaks the block first, but no table lies in
    // a block or run that is ever broken (the table pool is pinned to
    // small units, `hal::memory::IdentityTables`).
    let mut b = Balloon::new(BalloonConfig {
        reserve_pages: RESERVE_PAGES,
        min_chunk_order: 0,
        report_free: has("balloon.report"),
        ..BalloonConfig::DEFAULT
    });
    if let Err(e) = b.start(&mut dev, &mut env) {
        defmt::error!("balloon: start failed: {}", defmt::Debug2Format(&e));
    }
    defmt::info!(
        "balloon: virtio-mmio at {=u64:#x} (irq {}), features offered {=u64:#x}, negotiated {=u64:#x}",
        node.region.base,
        node.irq,
        dev.offered(),
        b.features()
    );
    let events = attach_interrupt(&dev, &node);
    // The map holds the boot map (at its optimum) and the GIC's windows.
    LATER_DEVICE_ENTRIES.store(
        tlb_entries().saturating_sub(boot_optimum()),
        Ordering::Relaxed,
    );
    if SERVICE.set(Service { b, dev, env }).is_err() {
        defmt::error!("balloon: started twice");
        idle_forever()
    }
    serve(selftest, has("balloon.touch-after-deflate"), events)
}

/// The balloon, its device and its environment, in one place so that the
/// firmware's general allocation path ([`alloc_folio`], [`alloc_frozen`])
/// can deflate or compact on out-of-memory.
pub struct Service {
    b: Balloon,
    dev: VirtioBalloon<FirmwareDma>,
    env: FirmwareEnv,
}

static SERVICE: hal::global::Global<Service> = hal::global::Global::new();

/// What an allocation through the general path cost the balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomOutcome {
    /// Pages deflated for it (deflate-on-OOM).
    pub deflated: u64,
}

fn frames_then_balloon<T>(
    order: u8,
    direct: impl FnOnce() -> Result<T, WithError<memdesc::frames::FrameError>>,
    via_balloon: impl FnOnce(&mut Service) -> Result<(T, u64), BalloonError>,
) -> Result<(T, OomOutcome), BalloonError> {
    use memdesc::frames::FrameError;
    match direct() {
        Ok(v) => return Ok((v, OomOutcome { deflated: 0 })),
        // No block for it, or no frame for a descriptor cache to grow by.
        Err(WithError::Op(FrameError::OutOfMemory { .. }))
        | Err(WithError::Op(FrameError::OutOfDescriptors { .. })) => {}
        Err(WithError::Op(e)) => return Err(e.into()),
        Err(WithError::Global(_)) => return Err(BalloonError::FramesBusy),
    }
    // Out of memory: the balloon compacts (its chunks out of a block) or,
    // with DEFLATE_ON_OOM, deflates; busy or absent, it is a plain OOM.
    match SERVICE.with(via_balloon) {
        Ok(r) => r.map(|(v, deflated)| (v, OomOutcome { deflated })),
        Err(_) => Err(BalloonError::Frames(FrameError::OutOfMemory { order })),
    }
}

/// The firmware's general way to allocate a folio: straight from the
/// allocator, and on out-of-memory through the balloon (compaction by PFN,
/// then deflate-on-OOM when negotiated), then again.
pub fn alloc_folio(
    order: u8,
    owner: memdesc::frames::Owner,
) -> Result<(memdesc::frames::FolioRef, OomOutcome), BalloonError> {
    frames_then_balloon(
        order,
        || FRAMES.alloc_folio(order, owner),
        |sv| sv.b.alloc_folio(&mut sv.dev, &mut sv.env, order, owner),
    )
}

/// As [`alloc_folio`], for frozen frames.
pub fn alloc_frozen(
    order: u8,
    kind: memdesc::frames::FrozenKind,
) -> Result<(Pfn, OomOutcome), BalloonError> {
    frames_then_balloon(
        order,
        || FRAMES.alloc_frozen(order, kind),
        |sv| sv.b.alloc_frozen(&mut sv.dev, &mut sv.env, order, kind),
    )
}

/// Deflate-on-OOM for the stage-1 engine's table memory, called by the
/// firmware's map wrappers ([`crate::mm::map`], [`crate::mm::unmap`],
/// [`crate::mm::map_device`]) after the engine let go of [`STAGE1`]: when
/// the table pool still has a frame (only a descriptor cache could not
/// grow) and DEFLATE_ON_OOM was negotiated, deflates `frames` plus the
/// same margin as the frame path, logs it and counts it in the balloon's
/// OOM counters. Returns the pages deflated: 0 without a balloon, with a
/// full pool (more free frames cannot help), or when the balloon is busy
/// (the wrapper then returns the engine's typed error).
///
/// # Errors
///
/// [`BalloonError::DeflateOnOomNotNegotiated`] without the feature (no
/// ballooned page is touched); whatever the deflate ran into.
pub fn deflate_for_tables(frames: u64) -> Result<u64, BalloonError> {
    let pool_free = STAGE1
        .with(|s| s.platform().pool_free())
        .map_err(|_| BalloonError::FramesBusy)?;
    if pool_free == 0 {
        defmt::warn!("balloon: the table pool is full; deflating cannot give the tables memory");
        return Ok(0);
    }
    let Ok(r) = SERVICE.with(|sv| {
        let r = sv.b.reclaim(&mut sv.dev, &mut sv.env, frames);
        (r, sv.b.counters().oom_events)
    }) else {
        return Ok(0);
    };
    match r {
        (Ok(n), events) => {
            defmt::info!(
                "balloon: deflate-on-OOM for table memory: {=u64} pages back ({=u64} OOM events)",
                n,
                events
            );
            Ok(n)
        }
        (Err(e), _) => {
            defmt::warn!(
                "balloon: out of table memory, no deflate ({})",
                defmt::Debug2Format(&e)
            );
            Err(e)
        }
    }
}

/// Brings the GIC up and attaches the balloon's interrupt (from the device
/// tree); `None` (the service loop then polls) if either fails.
fn attach_interrupt(
    dev: &VirtioBalloon<FirmwareDma>,
    node: &hal::dtb::VirtioMmio,
) -> Option<hal::virtio::irq::Events> {
    let irqs = match crate::interrupts::init() {
        Ok(i) => i,
        Err(e) => {
            defmt::warn!("balloon: no interrupts ({}), polling", e);
            return None;
        }
    };
    let irq = match irqs.device_interrupt("virtio,mmio", node.region.base) {
        Ok(i) => i,
        Err(e) => {
            defmt::warn!("balloon: no interrupt in the device tree ({}), polling", e);
            return None;
        }
    };
    match dev.attach_interrupt(&irq) {
        Ok(ev) => {
            hal::irq::unmask_irqs();
            defmt::info!(
                "balloon: interrupt-driven, INTID {=u32}; the service loop sleeps in WFI",
                irq.intid.raw()
            );
            Some(ev)
        }
        Err(e) => {
            defmt::warn!("balloon: interrupt not attached ({}), polling", e);
            None
        }
    }
}

/// What to do once the balloon has settled with pages in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SelfTest {
    None,
    /// Read a ballooned frame (must fault with the report).
    TouchBallooned,
    /// Allocate 2 MiB folios until the allocator runs out, through the
    /// balloon's deflate-on-OOM path, then give them back.
    DeflateOnOom,
    /// Hold every free frame, then map pages until the engine runs out
    /// of table memory: through [`crate::mm::map`], the balloon deflates
    /// (or, without DEFLATE_ON_OOM, the typed error comes back).
    TableOom,
}

/// Folios of 2 MiB at most held by the deflate-on-OOM self-test.
const OOM_FOLIOS: usize = 64;

fn oom_selftest() {
    let mut held: [Option<memdesc::frames::FolioRef>; OOM_FOLIOS] = [const { None }; OOM_FOLIOS];
    let status = || SERVICE.with(|sv| sv.b.status()).ok();
    let before = status().map_or(0, |s| s.actual);
    let mut reclaimed = 0;
    let mut n = 0;
    let mut outcome: Result<(), BalloonError> = Ok(());
    while n < OOM_FOLIOS && reclaimed == 0 {
        // The firmware's general allocation path, not the balloon's own.
        match alloc_folio(9, memdesc::frames::Owner::Buddy) {
            Ok((f, got)) => {
                held[n] = Some(f);
                n += 1;
                reclaimed += got.deflated;
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let after = status().map_or(0, |s| s.actual);
    for f in held.iter_mut().filter_map(Option::take) {
        let _ = FRAMES.put(f);
    }
    let (r, events) = SERVICE
        .with(|sv| (check(&sv.b), sv.b.counters().oom_events))
        .unwrap_or((
            SettleReport {
                frames_ok: false,
                offline: 0,
                lint: usize::MAX,
                tlb_entries: 0,
                boot_optimum: 0,
            },
            0,
        ));
    defmt::info!(
        "balloon: deflate-on-OOM gave back {=u64} pages after {=usize} allocations of 2 MiB through the general path (actual {=u32} -> {=u32}, {=u64} OOM events); {}; frames {=str}; lint {=usize}",
        reclaimed,
        n,
        before,
        after,
        events,
        defmt::Debug2Format(&outcome),
        if r.frames_ok { "ok" } else { "LOST" },
        r.lint
    );
}

/// Free blocks the table-memory self-test holds at most.
const TABLE_OOM_HELD: usize = 1024;
/// Where the table-memory self-test maps its pages: 512 GiB, above the RAM
/// and devices of every board, one page per 2 MiB so that each needs a
/// level-3 table of its own.
const TABLE_OOM_VA: u64 = 0x80_0000_0000;
/// Maps the table-memory self-test tries at most (the page-table
/// descriptor cache grows by 256 descriptors a frame; the pool has more).
const TABLE_OOM_MAPS: u64 = 2048;

/// The deflate-on-OOM self-test of table memory: every free frame is held
/// (so no descriptor cache can grow), then pages are mapped through
/// [`crate::mm::map`], each needing a new table, until one map needs the
/// balloon. With DEFLATE_ON_OOM that map succeeds after a deflate; without
/// it the engine's typed error comes back and the balloon keeps its pages.
/// Everything is undone, then one line reports it.
pub fn table_oom_selftest() {
    use memdesc::frames::FrozenKind;
    let status = || {
        SERVICE
            .with(|sv| (sv.b.status().actual, sv.b.counters()))
            .ok()
    };
    let (before, c0) = status().map_or((0, Default::default()), |s| s);
    let _ = FRAMES.drain_this_cpu();
    let mut held = [(Pfn(0), 0u8); TABLE_OOM_HELD];
    let mut nheld = 0;
    let mut order = 9u8;
    while nheld < TABLE_OOM_HELD {
        match FRAMES.alloc_frozen(order, FrozenKind::Guard) {
            Ok(p) => {
                held[nheld] = (p, order);
                nheld += 1;
            }
            Err(_) if order > 0 => order -= 1,
            Err(_) => break,
        }
    }
    let free_left = FRAMES
        .with(|fa| fa.count(FrameType::Free))
        .unwrap_or(u64::MAX);
    // Any frame will do as the target: the new mappings are never touched.
    let pa = held[0].0.addr();
    let mut maps = 0u64;
    let mut last: Result<crate::mm::MapOutcome, crate::mm::MmError> =
        Ok(crate::mm::MapOutcome::default());
    while maps < TABLE_OOM_MAPS && nheld > 0 {
        let va = VirtAddr(TABLE_OOM_VA + maps * (2 << 20));
        last = crate::mm::map(va, pa, PAGE_SIZE, Attributes::DATA);
        match last {
            Ok(o) => {
                maps += 1;
                if o.deflated > 0 {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let mut undone = true;
    for i in 0..maps {
        let va = VirtAddr(TABLE_OOM_VA + i * (2 << 20));
        undone &= crate::mm::unmap(va, PAGE_SIZE).is_ok();
    }
    for &(pfn, order) in &held[..nheld] {
        undone &= FRAMES.free_frozen(pfn, order).is_ok();
    }
    let (after, c1) = status().map_or((0, Default::default()), |s| s);
    let r = SERVICE.with(|sv| check(&sv.b)).ok();
    let (frames_ok, lint) = r.map_or((false, usize::MAX), |r| (r.frames_ok, r.lint));
    defmt::info!(
        "balloon: table-memory OOM: {=usize} free blocks held ({=u64} frames left free), {=u64} maps; last map {}; deflated {=u64} pages; OOM events {=u64}; actual {=u32} -> {=u32}; undone {=bool}; frames {=str}; lint {=usize}",
        nheld,
        free_left,
        maps,
        defmt::Debug2Format(&last.map(|o: crate::mm::MapOutcome| o.deflated)),
        last.map_or(0, |o| o.deflated),
        c1.oom_events - c0.oom_events,
        before,
        after,
        undone,
        if frames_ok { "ok" } else { "LOST" },
        lint
    );
}

/// The service loop's own state between rounds.
struct LoopState {
    last: Status,
    moving_since: Option<u64>,
    last_err: Option<BalloonError>,
    last_reported: u64,
    selftest: SelfTest,
    irqs: u64,
    /// `balloon.touch-after-deflate`: after a full deflate, write the free memory again,
    /// so the host can see its resident memory come back on use.
    touch_after_deflate: bool,
    /// The last settle had pages in the balloon.
    was_inflated: bool,
}

fn serve(
    selftest: SelfTest,
    touch_after_deflate: bool,
    events: Option<hal::virtio::irq::Events>,
) -> ! {
    let Ok(last) = SERVICE.with(|sv| sv.b.status()) else {
        idle_forever()
    };
    let mut st = LoopState {
        last,
        moving_since: None,
        last_err: None,
        last_reported: 0,
        selftest,
        irqs: 0,
        touch_after_deflate,
        was_inflated: false,
    };
    defmt::info!(
        "balloon: up, target {=u32} pages, actual {=u32}",
        last.num_pages,
        last.actual
    );
    loop {
        st.irqs = events.as_ref().map_or(0, hal::virtio::irq::Events::count);
        let polling = events.is_none();
        let run = SERVICE
            .with(|sv| round(sv, &mut st, polling))
            .unwrap_or(SelfTest::None);
        match run {
            SelfTest::DeflateOnOom => oom_selftest(),
            SelfTest::TableOom => table_oom_selftest(),
            _ => {}
        }
        match (&events, st.last_err) {
            // Sleep in WFI until the device interrupts: a config change (new
            // target) or a used buffer (a batch or the stats buffer back).
            // The handler has acknowledged it already.
            (Some(ev), None) => {
                // Going idle: the boot core's frame cache back to the buddy.
                let _ = FRAMES.drain_this_cpu();
                hal::irq::wait_until(|| ev.pending());
                ev.take();
            }
            // An error may need another look without an interrupt (a config
            // that read unstable, a busy allocator): retry after a while.
            (Some(_), Some(_)) => hal::timer::delay_us(POLL_US),
            (None, _) => {
                if st.last.op == Op::Idle {
                    hal::timer::delay_us(POLL_US);
                }
            }
        }
    }
}

/// One round of service; the deflate-on-OOM self-test that is due now, if any.
fn round(sv: &mut Service, st: &mut LoopState, polling: bool) -> SelfTest {
    let Service { b, dev, env } = sv;
    let mut run_oom = SelfTest::None;
    {
        if polling {
            let _ = dev.ack_interrupt();
        }
        let now = now_ns();
        match b.service(dev, env, now) {
            Ok(_) => st.last_err = None,
            Err(e) => {
                if st.last_err != Some(e) {
                    defmt::warn!("balloon: {}", defmt::Debug2Format(&e));
                }
                st.last_err = Some(e);
            }
        }
        let s = b.status();
        let rc = b.reporter().counters();
        if rc.reported != st.last_reported && b.reporting_frames() == 0 {
            st.last_reported = rc.reported;
            defmt::info!(
                "balloon: reported {=u64} free 2 MiB blocks ({=u64} MiB) to the host; {=u64} skipped as unused since; frames {=str}",
                rc.reported,
                rc.reported * 2,
                rc.skipped_unused,
                if check(b).frames_ok { "ok" } else { "LOST" }
            );
        }
        if s.num_pages != st.last.num_pages {
            defmt::info!(
                "balloon: target {=u32} pages ({=u64} MiB)",
                s.num_pages,
                (s.num_pages as u64 * PAGE_SIZE) >> 20
            );
            st.moving_since.get_or_insert(now);
        }
        if s.actual != st.last.actual {
            defmt::info!(
                "balloon: actual {=u32} / target {=u64} pages",
                s.actual,
                s.goal
            );
        }
        if s.settled() {
            if let Some(t0) = st.moving_since.take() {
                let r = check(b);
                let c = b.counters();
                defmt::info!(
                    "balloon settled: actual {=u32} pages in {=u64} ms; offline {=u64}; frames {=str}; lint {=usize}; TLB entries {=u64} (boot optimum {=u64}); {=u64} batches, {=u64} notifications, {=u64} descriptors, {=u64} interrupts; chunks 2M {=u64} 64K {=u64} 4K {=u64}",
                    s.actual,
                    (now_ns() - t0) / 1_000_000,
                    r.offline,
                    if r.frames_ok { "ok" } else { "LOST" },
                    r.lint,
                    r.tlb_entries,
                    r.boot_optimum,
                    c.batches,
                    c.notifications,
                    c.descriptors,
                    st.irqs,
                    c.chunks[0],
                    c.chunks[1],
                    c.chunks[2]
                );
                if matches!(st.selftest, SelfTest::DeflateOnOom | SelfTest::TableOom)
                    && s.actual > 0
                {
                    run_oom = st.selftest;
                    st.selftest = SelfTest::None;
                }
                if st.touch_after_deflate && st.was_inflated && s.actual == 0 {
                    // Every ballooned frame is back: using them again must
                    // bring QEMU's resident memory back too.
                    touch_free(env, " after the deflate");
                }
                st.was_inflated = s.actual > 0;
                if st.selftest == SelfTest::TouchBallooned && s.actual > 0 {
                    if let Ok(pfn) = b.entry(env, 0) {
                        let addr = pfn as u64 * PAGE_SIZE;
                        defmt::warn!(
                            "selftest: reading ballooned frame {=u64:#x} on purpose",
                            addr
                        );
                        match hal::virtio::read_unmapped_on_purpose(addr) {
                            Some(v) => {
                                defmt::error!("selftest: the read did not fault (got {=u64:#x})", v)
                            }
                            None => defmt::error!("selftest: the ballooned frame is mapped"),
                        }
                    }
                }
            }
        }
        st.last = s;
    }
    run_oom
}
