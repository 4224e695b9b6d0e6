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
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use hal::dtb::Platform;
use hal::virtio::balloon::{IdentityDma, VirtioBalloon};
use hal::virtio::virtio_drivers::{BufferDirection, Hal, PhysAddr as DmaAddr};
use memdesc::balloon::{Balloon, BalloonConfig, BalloonEnv, BalloonError, Op, Status};
use memdesc::frames::{FrameType, FrozenKind, LinearMap, PageArray};
use memdesc::stage1::Attributes;
use memdesc::{Pfn, VirtAddr, PAGE_SIZE};

/// Free frames the balloon always leaves (16 MiB) on top of its table headroom.
pub const RESERVE_PAGES: u64 = 4096;
/// Poll interval while nothing moves.
const IDLE_POLL_US: u64 = 2000;

/// Frames the virtqueues use (Slab frames, like the balloon's own arrays).
static DMA_FRAMES: AtomicU64 = AtomicU64::new(0);

/// The page array, for the fault note (read without the allocator's lock:
/// a fault may happen while it is held).
static PAGE_ARRAY: AtomicPtr<PageArray<'static>> = AtomicPtr::new(core::ptr::null_mut());

/// The crash report's line about a faulting address: says when the frame
/// is ballooned (Offline: the host has it, the firmware unmapped it).
fn fault_note(far: u64) -> Option<&'static str> {
    let pa = PAGE_ARRAY.load(Ordering::Acquire);
    // SAFETY: set once from the allocator's `&'static PageArray`; the page
    // array is shared and its words are atomics, safe to read anywhere.
    let pa = unsafe { pa.as_ref() }?;
    match pa.word(Pfn(far / PAGE_SIZE)).ok()?.frame_type()? {
        FrameType::Offline => Some("ballooned (Offline: given to the host, unmapped)"),
        FrameType::Free => Some("free (owned by the frame allocator)"),
        _ => None,
    }
}

/// Writes every free frame once, so that QEMU's resident memory holds the
/// guest's RAM and a balloon inflate visibly gives it back (QEMU counts
/// only pages the guest wrote). Every free block is taken (as a transient
/// frozen allocation, largest first), filled, chained through its first
/// word, then all are freed again. Returns the frames touched.
pub fn touch_free_memory() -> u64 {
    const END: u64 = u64::MAX;
    let mut head = END;
    let mut touched = 0;
    for order in [9u8, 4, 0] {
        while let Ok(Ok(pfn)) = FRAMES.with(|fa| fa.alloc_frozen(order, FrozenKind::Guard)) {
            let pa = pfn.addr().0;
            // SAFETY: the frames were just allocated to us and are identity
            // mapped read-write; the first word links to the previous block.
            unsafe {
                core::ptr::write_bytes(pa as *mut u8, 0x5a, (PAGE_SIZE << order) as usize);
                core::ptr::write(pa as *mut u64, head);
            }
            head = (pfn.0 << 8) | order as u64;
            touched += 1u64 << order;
        }
    }
    while head != END {
        let (pfn, order) = (Pfn(head >> 8), (head & 0xff) as u8);
        // SAFETY: a block we allocated and linked above, still ours.
        let next = unsafe { core::ptr::read(pfn.addr().0 as *const u64) };
        let _ = FRAMES.with(|fa| fa.free_frozen(pfn, order));
        head = next;
    }
    touched
}

fn order_of(pages: usize) -> u8 {
    pages.max(1).next_power_of_two().trailing_zeros() as u8
}

/// Virtqueue memory from the frame allocator, identity mapped.
pub struct FirmwareDma;

// SAFETY: dma_alloc returns zeroed, page-aligned frames of our own that
// nothing else uses until dma_dealloc; RAM is identity mapped, so the
// pointer is valid at the physical address; share/unshare are identity and
// do nothing.
unsafe impl Hal for FirmwareDma {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (DmaAddr, NonNull<u8>) {
        let order = order_of(pages);
        match FRAMES.with(|fa| fa.alloc_frozen(order, FrozenKind::Slab)) {
            Ok(Ok(pfn)) => {
                let pa = pfn.addr().0;
                let bytes = (PAGE_SIZE << order) as usize;
                // SAFETY: the frames were just allocated to us and are
                // identity mapped read-write.
                unsafe { core::ptr::write_bytes(pa as *mut u8, 0, bytes) };
                DMA_FRAMES.fetch_add(1 << order, Ordering::Relaxed);
                (
                    pa,
                    NonNull::new(pa as *mut u8).unwrap_or(NonNull::dangling()),
                )
            }
            _ => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: DmaAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        let order = order_of(pages);
        match FRAMES.with(|fa| fa.free_frozen(Pfn(paddr / PAGE_SIZE), order)) {
            Ok(Ok(())) => {
                DMA_FRAMES.fetch_sub(1 << order, Ordering::Relaxed);
                0
            }
            _ => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: DmaAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> DmaAddr {
        buffer.as_ptr().cast::<u8>() as u64
    }

    unsafe fn unshare(_paddr: DmaAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

// SAFETY: `share` is the identity and `unshare` does nothing (above); the
// policy's buffers are its own Slab frames, identity mapped.
unsafe impl IdentityDma for FirmwareDma {}

/// The firmware side of the policy: the global allocator and stage-1 map.
pub struct FirmwareEnv;

// SAFETY: RAM is identity mapped, so a frame's running address is its
// physical address; Slab frames the policy allocated are its own; the
// allocator is always the global one.
unsafe impl BalloonEnv for FirmwareEnv {
    type Mem = LinearMap;

    fn with_frames<R>(&mut self, f: impl FnOnce(&mut Frames) -> R) -> Result<R, BalloonError> {
        FRAMES.with(f).map_err(|_| BalloonError::FramesBusy)
    }

    fn unmap(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        STAGE1
            .with(|s| s.unmap(VirtAddr(pfn.addr().0), pages * PAGE_SIZE))
            .map_err(|_| BalloonError::FramesBusy)?
            .map_err(BalloonError::Map)
    }

    fn map(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
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

    fn refold(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        STAGE1
            .with(|s| s.refold(VirtAddr(pfn.addr().0), pages * PAGE_SIZE))
            .map_err(|_| BalloonError::FramesBusy)?
            .map_err(BalloonError::Map)
    }

    fn frame(&mut self, pfn: Pfn) -> NonNull<u8> {
        NonNull::new(pfn.addr().0 as *mut u8).unwrap_or(NonNull::dangling())
    }
}

fn now_ns() -> u64 {
    hal::timer::ticks_to_ns(hal::timer::ticks())
}

fn idle_forever() -> ! {
    loop {
        // SAFETY: WFI has no memory effects; it only idles the core.
        unsafe { core::arch::asm!("wfi", options(nomem, nostack, preserves_flags)) }
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
    /// The boot map's optimum.
    pub boot_optimum: u64,
}

/// Checks the frame accounting, the linter and the footprint.
pub fn check(b: &Balloon) -> SettleReport {
    let dma = DMA_FRAMES.load(Ordering::Relaxed);
    let (consistent, offline, slab) = FRAMES
        .with(|fa| {
            (
                fa.check_consistency().is_ok(),
                fa.count(FrameType::Offline),
                fa.count(FrameType::Slab),
            )
        })
        .unwrap_or((false, u64::MAX, u64::MAX));
    let frames_ok = consistent && offline == b.offline_frames() && slab == b.own_frames() + dma;
    let lint = crate::mm::lint().unwrap_or(usize::MAX);
    let tlb_entries = STAGE1
        .with(|s| s.summary().tlb_entries())
        .unwrap_or(u64::MAX);
    let boot_optimum = BOOT_MAP
        .with(|m| m.optimum.tlb_entries())
        .unwrap_or(u64::MAX);
    SettleReport {
        frames_ok,
        offline,
        lint,
        tlb_entries,
        boot_optimum,
    }
}

/// Finds the balloon, brings it up and serves it forever. Bootargs:
/// `balloon.touch` writes all free memory first (see
/// [`touch_free_memory`]); `selftest=balloon-touch` reads the first
/// ballooned frame once the balloon has settled with pages in it (the
/// crash report then says the frame is ballooned).
pub fn run(platform: &Platform<'static>) -> ! {
    if let Ok(pa) = FRAMES.with(|fa| fa.page_array()) {
        PAGE_ARRAY.store(core::ptr::from_ref(pa).cast_mut(), Ordering::Release);
        hal::exception::set_fault_note(fault_note);
    }
    let args = platform.bootargs.unwrap_or("");
    let has = |w: &str| args.split_ascii_whitespace().any(|a| a == w);
    if has("balloon.touch") {
        let t0 = now_ns();
        let n = touch_free_memory();
        defmt::info!(
            "balloon: touched {=u64} free frames ({=u64} MiB) in {=u64} ms",
            n,
            (n * PAGE_SIZE) >> 20,
            (now_ns() - t0) / 1_000_000
        );
    }
    let selftest = if has("selftest=balloon-touch") {
        SelfTest::TouchBallooned
    } else if has("selftest=balloon-oom") {
        SelfTest::DeflateOnOom
    } else {
        SelfTest::None
    };
    // SAFETY: the boot map maps every virtio-mmio window Device-nGnRE and
    // nothing else touches them; this runs once.
    let (transport, node) =
        match unsafe { hal::virtio::find(platform, hal::virtio::DEVICE_ID_BALLOON) } {
            Ok(t) => t,
            Err(e) => {
                defmt::warn!("balloon: no device ({})", e);
                idle_forever()
            }
        };
    let mut dev = match VirtioBalloon::<FirmwareDma>::new(transport) {
        Ok(d) => d,
        Err(e) => {
            defmt::error!("balloon: bring-up failed: {}", defmt::Debug2Format(&e));
            idle_forever()
        }
    };
    let mut env = FirmwareEnv;
    // Without FEAT_BBM level 2 a block split of the live linear map breaks
    // the block first, and the engine may then write a table inside it:
    // move in whole 2 MiB chunks there (unmapping a block never splits).
    let bbm2 = BOOT_MAP
        .with(|m| m.features.bbm_level >= 2)
        .unwrap_or(false);
    let mut b = Balloon::new(BalloonConfig {
        reserve_pages: RESERVE_PAGES,
        min_chunk_order: if bbm2 { 0 } else { 9 },
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
    serve(&mut b, &mut dev, &mut env, selftest)
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
}

/// Folios of 2 MiB at most held by the deflate-on-OOM self-test.
const OOM_FOLIOS: usize = 64;

fn oom_selftest(b: &mut Balloon, dev: &mut VirtioBalloon<FirmwareDma>, env: &mut FirmwareEnv) {
    let mut held: [Option<memdesc::frames::FolioRef>; OOM_FOLIOS] = [const { None }; OOM_FOLIOS];
    let before = b.status().actual;
    let mut reclaimed = 0;
    let mut n = 0;
    let mut outcome: Result<(), BalloonError> = Ok(());
    while n < OOM_FOLIOS && reclaimed == 0 {
        match b.alloc_folio(dev, env, 9, memdesc::frames::Owner::Buddy) {
            Ok((f, got)) => {
                held[n] = Some(f);
                n += 1;
                reclaimed += got;
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let after = b.status().actual;
    for f in held.iter_mut().filter_map(Option::take) {
        let _ = FRAMES.with(|fa| fa.put(f).map(drop));
    }
    let r = check(b);
    defmt::info!(
        "balloon: deflate-on-OOM gave back {=u64} pages after {=usize} allocations of 2 MiB (actual {=u32} -> {=u32}, {=u64} OOM events); {}; frames {=str}; lint {=usize}",
        reclaimed,
        n,
        before,
        after,
        b.counters().oom_events,
        defmt::Debug2Format(&outcome),
        if r.frames_ok { "ok" } else { "LOST" },
        r.lint
    );
}

fn serve(
    b: &mut Balloon,
    dev: &mut VirtioBalloon<FirmwareDma>,
    env: &mut FirmwareEnv,
    mut selftest: SelfTest,
) -> ! {
    let mut last: Status = b.status();
    let mut moving_since: Option<u64> = None;
    let mut last_err: Option<BalloonError> = None;
    defmt::info!(
        "balloon: up, target {=u32} pages, actual {=u32}",
        last.num_pages,
        last.actual
    );
    loop {
        let _ = dev.ack_interrupt();
        let now = now_ns();
        match b.service(dev, env, now) {
            Ok(_) => last_err = None,
            Err(e) => {
                if last_err != Some(e) {
                    defmt::warn!("balloon: {}", defmt::Debug2Format(&e));
                }
                last_err = Some(e);
            }
        }
        let s = b.status();
        if s.num_pages != last.num_pages {
            defmt::info!(
                "balloon: target {=u32} pages ({=u64} MiB)",
                s.num_pages,
                (s.num_pages as u64 * PAGE_SIZE) >> 20
            );
            moving_since.get_or_insert(now);
        }
        if s.actual != last.actual {
            defmt::info!(
                "balloon: actual {=u32} / target {=u64} pages",
                s.actual,
                s.goal
            );
        }
        if s.settled() {
            if let Some(t0) = moving_since.take() {
                let r = check(b);
                let c = b.counters();
                defmt::info!(
                    "balloon settled: actual {=u32} pages in {=u64} ms; offline {=u64}; frames {=str}; lint {=usize}; TLB entries {=u64} (boot optimum {=u64}); {=u64} batches, {=u64} notifications, {=u64} descriptors",
                    s.actual,
                    (now_ns() - t0) / 1_000_000,
                    r.offline,
                    if r.frames_ok { "ok" } else { "LOST" },
                    r.lint,
                    r.tlb_entries,
                    r.boot_optimum,
                    c.batches,
                    c.notifications,
                    c.descriptors
                );
                if selftest == SelfTest::DeflateOnOom && s.actual > 0 {
                    selftest = SelfTest::None;
                    oom_selftest(b, dev, env);
                }
                if selftest == SelfTest::TouchBallooned && s.actual > 0 {
                    if let Ok(pfn) = b.entry(env, 0) {
                        let addr = pfn as u64 * PAGE_SIZE;
                        defmt::warn!(
                            "selftest: reading ballooned frame {=u64:#x} on purpose",
                            addr
                        );
                        // SAFETY: not sound on purpose: the frame is unmapped,
                        // the read faults and the handler ends the run.
                        let v = unsafe { core::ptr::read_volatile(addr as *const u64) };
                        defmt::error!("selftest: the read did not fault (got {=u64:#x})", v);
                    }
                }
            }
        }
        last = s;
        if s.op == Op::Idle {
            hal::timer::delay_us(IDLE_POLL_US);
        }
    }
}
