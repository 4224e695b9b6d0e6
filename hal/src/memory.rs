//! The memory manager's hardware side, with every `unsafe` of it in one
//! place: the page array's `'static` home in RAM, the frame allocator global
//! ([`FRAMES`]), the stage-1 table memory (identity-mapped table frames from
//! the allocator, entries read and written in place), the checked MMU
//! switch-on, and the scratch window ([`SCRATCH_BASE`]) where callers map
//! memory they only touch through faulting-safe probes.
//!
//! The firmware decides what to map and where; this module holds the
//! invariants that make raw memory access sound.

use crate::dtb::Platform;
use crate::exception::CaughtFault;
use crate::global::WithError;
use crate::global::{Global, GlobalError};
use crate::mmu::{Probe, Tlb};
use crate::percpu::ThisCpu;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use memdesc::frames::{
    words_needed, CoreAtomics, FolioRef, FrameAllocator, FrameError, FrameStats, FrameType,
    FrozenKind, LastRef, LayoutError, LinearMap, Owner, PageArray, PcpStats, PfnRange, Released,
    ReservedKind, ReservedRange, SmpError, SmpFrameAllocator, MAX_RANGES,
};
use memdesc::layout::{find_hole, LayoutPlanError};
use memdesc::stage1::{
    Attributes, Stage1, Stage1Error, TableMemory, TableMemoryError, TlbiScope, TranslationHw,
    VaSize,
};
use memdesc::sync::{CpuContext, CpuId};
use memdesc::{Pfn, PhysAddr, VirtAddr, PAGE_SIZE};

/// The frame allocator as the firmware instantiates it: descriptors come
/// from its own frames through the identity linear map.
pub type Frames = FrameAllocator<'static, LinearMap>;

/// The frame allocator shared by every core ([`SmpFrames`] behind
/// [`SharedFrames`]): allocation and frees of small folios go through the
/// calling core's cache.
pub static FRAMES: SharedFrames = SharedFrames::new();
/// The stage-1 tables of the firmware's own address space (lock order:
/// taken before [`FRAMES`], which the engine takes for table frames).
pub static STAGE1: Global<Stage1<IdentityTables>> = Global::new();

/// Why the page array or the frame allocator could not be set up, or the
/// MMU not turned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryError {
    /// Set up twice.
    AlreadyInitialised,
    /// More RAM or reserved ranges than the fixed tables hold.
    TooManyRanges,
    /// RAM reaches into the scratch window (at or above [`SCRATCH_BASE`]).
    RamAboveScratchBase {
        /// The end of the offending range.
        end: u64,
    },
    /// The page array could not be laid out.
    Layout(LayoutError),
    /// No room for the page array.
    Plan(LayoutPlanError),
    /// The frame allocator refused.
    Frames(FrameError),
    /// A global was not usable.
    Global(GlobalError),
    /// The tree would not map something the code uses from the moment the
    /// MMU is on, as it is used (the address is given).
    NotMappedForUse {
        /// The first address found wrong.
        va: u64,
    },
}

impl From<GlobalError> for MemoryError {
    fn from(e: GlobalError) -> Self {
        Self::Global(e)
    }
}

/// What [`init_frames`] set up, for the log and for tests.
#[derive(Debug, Clone, Copy)]
pub struct FrameReport {
    /// Frames the page array describes.
    pub frames: u64,
    /// Where its storage went.
    pub storage: PhysAddr,
    /// Its size in bytes.
    pub storage_bytes: u64,
    /// Frames free after reservations.
    pub free: u64,
}

/// The page array needs a `'static` home before the allocator borrows it.
struct PageArrayHome(
    core::cell::UnsafeCell<Option<PageArray<'static>>>,
    AtomicBool,
);
// SAFETY: written once, by the caller that won the flag's swap, then only
// shared (`&'static PageArray` is Sync: its words are atomics).
unsafe impl Sync for PageArrayHome {}
static PAGE_ARRAY: PageArrayHome =
    PageArrayHome(core::cell::UnsafeCell::new(None), AtomicBool::new(false));
/// The page array's storage, `[start, end)` physical (0, 0 before init).
static PAGE_ARRAY_SPAN: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

fn span_range(s: crate::image::Span) -> PfnRange {
    PfnRange::covering_phys(PhysAddr(s.start), s.len())
}

/// Builds the page array in a hole of the platform's RAM and the frame
/// allocator over it ([`FRAMES`]), reserving the image (hal knows where it
/// is), the DTB at `dtb_addr` (`p.total_size` bytes), the page array itself
/// and every reserved region. Runs with the MMU off or on (RAM is identity
/// mapped either way).
pub fn init_frames(p: &Platform<'_>, dtb_addr: u64) -> Result<FrameReport, MemoryError> {
    let mut ram = [PfnRange::new(Pfn(0), Pfn(0)); MAX_RANGES];
    let mut nram = 0;
    for r in p.memory.as_slice() {
        if r.end() > SCRATCH_BASE {
            return Err(MemoryError::RamAboveScratchBase { end: r.end() });
        }
        *ram.get_mut(nram).ok_or(MemoryError::TooManyRanges)? =
            PfnRange::from_phys(PhysAddr(r.base), r.size);
        nram += 1;
    }
    let ram = &ram[..nram];
    let image = span_range(crate::image::whole());
    let dtb = PfnRange::covering_phys(PhysAddr(dtb_addr), p.total_size as u64);

    let mut avoid = [PfnRange::new(Pfn(0), Pfn(0)); MAX_RANGES + 2];
    avoid[0] = image;
    avoid[1] = dtb;
    let mut navoid = 2;
    for r in p.reserved.as_slice() {
        *avoid.get_mut(navoid).ok_or(MemoryError::TooManyRanges)? =
            PfnRange::covering_phys(PhysAddr(r.base), r.size);
        navoid += 1;
    }
    let words = words_needed(ram).map_err(MemoryError::Layout)?;
    let bytes = words * 8;
    let pages = bytes.div_ceil(PAGE_SIZE);
    let at = find_hole(ram, &avoid[..navoid], pages, 1, image.end).map_err(MemoryError::Plan)?;

    // AcqRel: one RMW decides the one initialiser; it pairs with itself (a
    // second caller's Acquire sees the first's Release).
    if PAGE_ARRAY.1.swap(true, Ordering::AcqRel) {
        return Err(MemoryError::AlreadyInitialised);
    }
    // SAFETY: find_hole returned `pages` frames of RAM that overlap neither
    // the image, the DTB nor any reserved region, and nothing else uses RAM
    // yet (the allocator that will hand out RAM is built below); RAM is
    // identity mapped (or the MMU is off), `at` is page aligned (so 8-byte
    // aligned for AtomicU64), and the slice lives forever because the
    // allocator reserves these frames as `Reserved(PageArray)` below.
    let storage: &'static mut [AtomicU64] =
        unsafe { core::slice::from_raw_parts_mut(at.addr().0 as *mut AtomicU64, words as usize) };
    let array = PageArray::new(storage, ram).map_err(MemoryError::Layout)?;
    // SAFETY: guarded by the flag swapped above: this is the only write, and
    // the `&'static` below is the only borrow ever made of the slot.
    let array: &'static PageArray<'static> = unsafe {
        let slot = &mut *PAGE_ARRAY.0.get();
        slot.insert(array)
    };
    PAGE_ARRAY_SPAN[0].store(at.addr().0, Ordering::Relaxed);
    PAGE_ARRAY_SPAN[1].store(at.addr().0 + pages * PAGE_SIZE, Ordering::Relaxed);

    let mut reserved = [ReservedRange {
        range: image,
        kind: ReservedKind::Image,
    }; MAX_RANGES + 3];
    reserved[1] = ReservedRange {
        range: dtb,
        kind: ReservedKind::DeviceTree,
    };
    reserved[2] = ReservedRange {
        range: PfnRange::new(at, Pfn(at.0 + pages)),
        kind: ReservedKind::PageArray,
    };
    let mut nres = 3;
    for r in &avoid[2..navoid] {
        reserved[nres] = ReservedRange {
            range: *r,
            kind: ReservedKind::Other,
        };
        nres += 1;
    }
    // SAFETY: RAM is identity mapped read-write (before the MMU is on, all
    // accesses are physical; after, the linear map covers all RAM) and frames
    // handed to the descriptor caches are owned by the allocator.
    let map = unsafe { LinearMap::new(0) };
    let fa = FrameAllocator::new(array, map, &reserved[..nres]).map_err(MemoryError::Frames)?;
    let free = fa.count(FrameType::Free);
    FRAMES.set(fa)?;
    Ok(FrameReport {
        frames: array.len() as u64,
        storage: at.addr(),
        storage_bytes: bytes,
        free,
    })
}

/// Most 2 MiB chunks the page-table pool takes (each one pinned in the
/// engine, see [`Stage1::pin_small`]).
pub const TABLE_POOL_CHUNKS: usize = memdesc::stage1::engine::MAX_PINNED;
/// Frames of one pool chunk.
const CHUNK_FRAMES: usize = 512;
/// Tables beyond one level-3 table per 2 MiB of RAM the pool is sized
/// for: the upper levels, device windows, the scratch window.
const POOL_EXTRA_TABLES: u64 = 64;

/// Table memory and TLB maintenance ([`Tlb`]) for the firmware's own
/// identity-mapped address space.
///
/// Every table frame comes from a pool of aligned 2 MiB chunks taken from
/// [`FRAMES`] when the tree is created: held as one-frame Guard
/// allocations while unused, retyped to PageTable (valid count in its
/// descriptor) while a table. The caller pins the chunks in the engine
/// ([`IdentityTables::pool_chunks`], [`Stage1::pin_small`]), so they are
/// mapped by pages and 64 KiB runs only and no block or run that is ever
/// broken (a split, an unfold) holds a table: without FEAT_BBM level 2
/// the break of an entry never unmaps the table the make writes. Nothing
/// else is ever handed a pool frame, so nothing in the chunks changes
/// mapping either.
pub struct IdentityTables {
    tlb: Tlb,
    /// First frames of the pool's chunks.
    chunks: [Pfn; TABLE_POOL_CHUNKS],
    nchunks: usize,
    /// One bit per pool frame, set while it is free.
    free: [u64; TABLE_POOL_CHUNKS * CHUNK_FRAMES / 64],
    /// Where the last search for a free frame ended (a word of `free`).
    hint: usize,
}

impl IdentityTables {
    /// Maintenance as the probed CPU allows; a pool of one level-3
    /// table per 2 MiB of RAM plus [`POOL_EXTRA_TABLES`] (rounded up to
    /// chunks, at most [`TABLE_POOL_CHUNKS`]) from [`FRAMES`].
    ///
    /// # Errors
    ///
    /// [`MemoryError::Frames`] when not even one chunk can be had,
    /// [`MemoryError::Global`] when [`FRAMES`] is not usable.
    pub fn new(probe: &Probe) -> Result<Self, MemoryError> {
        let mut t = Self {
            tlb: Tlb::new(probe),
            chunks: [Pfn(0); TABLE_POOL_CHUNKS],
            nchunks: 0,
            free: [0; TABLE_POOL_CHUNKS * CHUNK_FRAMES / 64],
            hint: 0,
        };
        let frames = FRAMES.with(|fa| fa.page_array().len() as u64)?;
        let want = (frames / CHUNK_FRAMES as u64 + POOL_EXTRA_TABLES)
            .div_ceil(CHUNK_FRAMES as u64)
            .min(TABLE_POOL_CHUNKS as u64) as usize;
        for _ in 0..want {
            let got = FRAMES.with(|fa| {
                let pfn = fa.alloc_frozen_aligned(9, 9, FrozenKind::Guard)?;
                match fa.split_frozen(pfn, 9) {
                    Ok(()) => Ok(pfn),
                    Err(e) => {
                        let _ = fa.free_frozen(pfn, 9);
                        Err(e)
                    }
                }
            })?;
            match got {
                Ok(pfn) => {
                    let k = t.nchunks;
                    t.chunks[k] = pfn;
                    t.free[k * 8..k * 8 + 8].fill(u64::MAX);
                    t.nchunks += 1;
                }
                Err(e) if t.nchunks == 0 => return Err(MemoryError::Frames(e)),
                Err(_) => break,
            }
        }
        Ok(t)
    }

    /// Physical (= virtual) addresses of the pool's 2 MiB chunks.
    pub fn pool_chunks(&self) -> impl Iterator<Item = PhysAddr> + '_ {
        self.chunks[..self.nchunks].iter().map(|p| p.addr())
    }

    /// Pool frames not holding a table.
    pub fn pool_free(&self) -> u64 {
        self.free.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// The bit of `pfn` in `free`, if it is a pool frame.
    fn slot(&self, pfn: Pfn) -> Option<usize> {
        self.chunks[..self.nchunks]
            .iter()
            .enumerate()
            .find_map(|(k, c)| {
                (c.0..c.0 + CHUNK_FRAMES as u64)
                    .contains(&pfn.0)
                    .then(|| k * CHUNK_FRAMES + (pfn.0 - c.0) as usize)
            })
    }

    /// Takes a free pool frame's bit; returns its frame.
    fn take_free(&mut self) -> Option<Pfn> {
        let words = self.nchunks * CHUNK_FRAMES / 64;
        for n in 0..words {
            let w = (self.hint + n) % words;
            if self.free[w] != 0 {
                let bit = self.free[w].trailing_zeros() as usize;
                self.free[w] &= !(1 << bit);
                self.hint = w;
                let slot = w * 64 + bit;
                let chunk = self.chunks[slot / CHUNK_FRAMES];
                return Some(Pfn(chunk.0 + (slot % CHUNK_FRAMES) as u64));
            }
        }
        None
    }
}

fn entry_ptr(table: PhysAddr, index: usize) -> *mut u64 {
    (table.0 as *mut u64).wrapping_add(index)
}

/// The engine's view of a failed [`FRAMES`] access: re-entered (`Busy`) or
/// not set up.
fn frames_unavailable(e: GlobalError) -> TableMemoryError {
    match e {
        GlobalError::Busy => TableMemoryError::Busy,
        _ => TableMemoryError::Unavailable,
    }
}

// SAFETY: (the trait contract) tables are frames of the pool, retyped to
// page tables when handed out and zeroed here, identity mapped (VA == PA) before and after
// the MMU is on; entry accesses are aligned 64-bit volatile or atomic
// accesses of entry `index < 512` of that frame only; the valid count lives
// in the frame's page-table descriptor.
unsafe impl TableMemory for IdentityTables {
    fn alloc_table(&mut self) -> Result<PhysAddr, TableMemoryError> {
        let pfn = self.take_free().ok_or(TableMemoryError::OutOfMemory)?;
        let retyped = FRAMES
            .with_buddy(|fa| fa.retype_frozen(pfn, 0, FrozenKind::PageTable))
            .map_err(frames_unavailable)
            .and_then(|r| {
                r.map_err(|e| match e {
                    FrameError::OutOfMemory { .. } | FrameError::OutOfDescriptors { .. } => {
                        TableMemoryError::OutOfMemory
                    }
                    _ => TableMemoryError::Unavailable,
                })
            });
        if let Err(e) = retyped {
            if let Some(slot) = self.slot(pfn) {
                self.free[slot / 64] |= 1 << (slot % 64);
            }
            return Err(e);
        }
        let pa = pfn.addr();
        for i in 0..512 {
            // SAFETY: the frame was just made a table of ours (a pool frame
            // no one else is handed) and is identity mapped.
            unsafe { core::ptr::write_volatile(entry_ptr(pa, i), 0) };
        }
        Ok(pa)
    }

    unsafe fn free_table(&mut self, table: PhysAddr) -> Result<(), TableMemoryError> {
        let slot = self
            .slot(table.pfn())
            .ok_or(TableMemoryError::NotATable { table })?;
        FRAMES
            .with_buddy(|fa| {
                fa.page_array()
                    .page_table(table.pfn())
                    .map_err(|_| TableMemoryError::NotATable { table })?;
                // Back to a held Guard frame of the pool (refused while the
                // table has valid entries).
                fa.retype_frozen(table.pfn(), 0, FrozenKind::Guard)
                    .map_err(|_| TableMemoryError::FreeRefused { table })
            })
            .map_err(frames_unavailable)??;
        self.free[slot / 64] |= 1 << (slot % 64);
        Ok(())
    }

    unsafe fn read_entry(&self, table: PhysAddr, index: usize) -> u64 {
        // SAFETY: caller's contract: a live table frame and index < 512.
        unsafe { core::ptr::read_volatile(entry_ptr(table, index)) }
    }

    unsafe fn write_entry(&mut self, table: PhysAddr, index: usize, value: u64) {
        // SAFETY: caller's contract: a live table frame and index < 512.
        unsafe { core::ptr::write_volatile(entry_ptr(table, index), value) }
    }

    unsafe fn compare_exchange_entry(
        &mut self,
        table: PhysAddr,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<(), u64> {
        // SAFETY: caller's contract: a live, 8-byte aligned entry; the
        // hardware walker updates AF/AP[2] with atomic accesses too, so an
        // AtomicU64 view of the entry is the right model.
        let atom = unsafe { AtomicU64::from_ptr(entry_ptr(table, index)) };
        // AcqRel on success, Acquire on failure: pairs with the other
        // CPUs' RMWs of this entry (their compare_exchange here and the
        // walker's AF/DBM updates), so a failed exchange returns the entry
        // as last written and a successful one orders the table writes
        // before it.
        atom.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
            .map(drop)
    }

    unsafe fn adjust_valid(
        &mut self,
        table: PhysAddr,
        delta: i32,
    ) -> Result<u32, TableMemoryError> {
        // The page array alone (lock-free): the table is the caller's (it
        // holds the tree), and the count is an atomic in its descriptor.
        FRAMES
            .page_array()
            .map(|pa| {
                let t = pa
                    .page_table(table.pfn())
                    .map_err(|_| TableMemoryError::NotATable { table })?;
                let count = match delta {
                    0 => Ok(t.valid()),
                    d if d > 0 => t.desc().add_valid(d as u32),
                    d => t.desc().sub_valid(d.unsigned_abs()),
                };
                count.map_err(|_| TableMemoryError::CountOutOfRange { table })
            })
            .map_err(frames_unavailable)?
    }
}

impl TranslationHw for IdentityTables {
    fn tlbi_va(&mut self, va: VirtAddr, scope: TlbiScope) {
        self.tlb.tlbi_va(va, scope)
    }
    fn tlbi_va_range(&mut self, va: VirtAddr, len: u64, scope: TlbiScope) {
        self.tlb.tlbi_va_range(va, len, scope)
    }
    fn tlbi_all(&mut self) {
        self.tlb.tlbi_all()
    }
    fn dsb_ishst(&mut self) {
        self.tlb.dsb_ishst()
    }
    fn dsb_ish(&mut self) {
        self.tlb.dsb_ish()
    }
    fn isb(&mut self) {
        self.tlb.isb()
    }
}

/// Checks that `va` is mapped at itself with `want`'s permissions.
fn check_identity(
    s1: &Stage1<IdentityTables>,
    va: u64,
    want: Attributes,
) -> Result<(), MemoryError> {
    let page = va & !(PAGE_SIZE - 1);
    match s1.query(VirtAddr(page)) {
        Ok(t) if t.output == PhysAddr(page) && t.attributes == want => Ok(()),
        _ => Err(MemoryError::NotMappedForUse { va: page }),
    }
}

fn check_span(
    s1: &Stage1<IdentityTables>,
    s: crate::image::Span,
    want: Attributes,
) -> Result<(), MemoryError> {
    if s.is_empty() {
        return Ok(());
    }
    check_identity(s1, s.start, want)?;
    check_identity(s1, s.end - 1, want)
}

/// Turns the MMU on with `s1`'s tree after checking that it maps, at their
/// own addresses and with the permissions they are used with, the image's
/// text, rodata and data, the stacks of the first `cpus` cores, the page
/// array and the console; then marks the tree live and records `cpus`
/// ([`crate::image::stack_slots`]: no other core is started). Must run
/// once, on the boot core, with the MMU still off.
pub fn enable_mmu(
    s1: &mut Stage1<IdentityTables>,
    probe: &Probe,
    cpus: usize,
) -> Result<(), MemoryError> {
    if crate::mmu::enabled() {
        return Err(MemoryError::AlreadyInitialised);
    }
    check_span(s1, crate::image::text(), Attributes::TEXT)?;
    check_span(s1, crate::image::rodata(), Attributes::RODATA)?;
    check_span(s1, crate::image::data(), Attributes::DATA)?;
    let cpus = cpus.min(crate::percpu::MAX_CPUS);
    for cpu in 0..cpus {
        if let Some([main, _, exception, _]) = crate::image::cpu_stacks(cpu) {
            check_span(s1, main, Attributes::DATA)?;
            check_span(s1, exception, Attributes::DATA)?;
        }
    }
    let pa = crate::image::Span {
        start: PAGE_ARRAY_SPAN[0].load(Ordering::Relaxed),
        end: PAGE_ARRAY_SPAN[1].load(Ordering::Relaxed),
    };
    check_span(s1, pa, Attributes::DATA)?;
    check_identity(s1, crate::board::CURRENT.uart_base, Attributes::DEVICE)?;
    let root = s1.root();
    let va_size: VaSize = s1.va_size();
    crate::image::set_stack_slots(cpus);
    s1.set_live();
    // SAFETY: checked above: the tree maps the running text executable,
    // rodata, data, both stacks, the page array and the console at their
    // physical addresses with the permissions the code needs; the rest of
    // RAM (table and descriptor frames) is the firmware's identity linear
    // map. We are on the boot path with the MMU off (checked above).
    unsafe { crate::mmu::enable(root.0, va_size, probe) };
    Ok(())
}

/// Start of the scratch window: virtual addresses at or above it (up to
/// 2^48) are never part of the identity map, since RAM must lie below it
/// ([`init_frames`] refuses RAM that does not). No Rust object lives there,
/// so whatever a caller maps there is memory it only touches through
/// [`scratch_read_u64`] and [`scratch_write_u64`].
pub const SCRATCH_BASE: u64 = 0x40_0000_0000;
const SCRATCH_END: u64 = 1 << 48;

/// Why a scratch access did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScratchError {
    /// The address is not an aligned word inside the scratch window.
    OutsideWindow {
        /// The address given.
        va: u64,
    },
    /// The access faulted (not mapped, or not writable).
    Fault(CaughtFault),
}

fn scratch_check(va: u64) -> Result<(), ScratchError> {
    if !(SCRATCH_BASE..SCRATCH_END).contains(&va) || !va.is_multiple_of(8) {
        return Err(ScratchError::OutsideWindow { va });
    }
    Ok(())
}

/// Reads the word at `va` in the scratch window, or returns the fault the
/// read took (logged in one line: expected, as when another core unmaps
/// the page meanwhile).
pub fn scratch_read_u64(va: u64) -> Result<u64, ScratchError> {
    scratch_check(va)?;
    // SAFETY: `va` is an aligned word of the scratch window, where no Rust
    // object lives (RAM is mapped only below SCRATCH_BASE), so the read
    // aliases no reference; a fault comes back as an error.
    unsafe { crate::exception::probe_read_u64_silent(va) }.map_err(ScratchError::Fault)
}

/// Writes the word at `va` in the scratch window, or returns the fault the
/// write took.
pub fn scratch_write_u64(va: u64, value: u64) -> Result<(), ScratchError> {
    scratch_check(va)?;
    // SAFETY: as in scratch_read_u64: no Rust object lives in the window,
    // so the write corrupts none; a fault comes back as an error.
    unsafe { crate::exception::probe_write_u64_silent(va, value) }.map_err(ScratchError::Fault)
}

/// Maps `[base, base + size)`, rounded out to pages, at its physical address
/// as Device-nGnRE execute-never memory in [`STAGE1`] (device windows found
/// after boot, such as the GIC's).
pub fn map_device(base: u64, size: u64) -> Result<(), WithError<Stage1Error>> {
    let start = base & !(PAGE_SIZE - 1);
    let end = base
        .checked_add(size)
        .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
        .ok_or(WithError::Op(Stage1Error::PaOutOfRange {
            pa: memdesc::PhysAddr(base),
        }))?;
    STAGE1.try_with(|s1| {
        s1.map(
            VirtAddr(start),
            PhysAddr(start),
            end - start,
            Attributes::DEVICE,
        )
    })
}

/// Why [`init_interrupts`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GicInitError {
    /// A register window overlaps RAM the page array describes.
    WindowInRam {
        /// The window's base.
        base: u64,
    },
    /// Mapping a register window failed.
    Map(WithError<Stage1Error>),
    /// The GIC refused.
    Irq(crate::irq::IrqError),
}

/// Maps `desc`'s register windows Device-nGnRE at their physical addresses
/// and brings the GIC up ([`crate::irq::init`]). A window that overlaps RAM
/// is refused (a device tree that says so is wrong, and the writes would
/// land in memory the firmware uses).
pub fn init_interrupts(
    desc: &crate::irq::GicDescription,
) -> Result<crate::irq::GicVersion, GicInitError> {
    for r in desc.regions().into_iter().flatten() {
        let first = r.base / PAGE_SIZE;
        let last = r.base.saturating_add(r.size.max(1) - 1) / PAGE_SIZE;
        let in_ram = FRAMES
            .page_array()
            .map(|pa| (first..=last).any(|pfn| pa.contains(Pfn(pfn))))
            .map_err(|e| GicInitError::Map(WithError::Global(e)))?;
        if in_ram {
            return Err(GicInitError::WindowInRam { base: r.base });
        }
        map_device(r.base, r.size).map_err(GicInitError::Map)?;
    }
    // SAFETY: every window was just mapped Device-nGnRE at its physical
    // address and lies outside RAM; nothing but hal::irq touches the GIC
    // (a second init is refused by it with AlreadyInitialised).
    unsafe { crate::irq::init(desc) }.map_err(GicInitError::Irq)
}

/// Checks the RAM the device tree claims against the machine: each range's
/// top is read under a fault guard, and a range whose top does not answer
/// is cut to its backed prefix (or dropped); `report(range, backed)` is
/// called for each range cut. The tree is checked against the board first
/// (so no range covers a device window), and this runs before anything is
/// placed in RAM.
pub fn clamp_ram_to_backed(
    p: &mut Platform<'_>,
    mut report: impl FnMut(crate::dtb::Region, u64),
) -> Result<(), crate::dtb::DtbError> {
    p.check(&crate::board::CURRENT)?;
    let mut i = 0;
    while let Some(&r) = p.memory.as_slice().get(i) {
        let backed = crate::memprobe::backed_prefix(r, |addr| {
            // SAFETY: `addr` is an aligned word inside a RAM range of the
            // device tree, which the board check above proved clear of
            // every device window and virtio transport, so reading it has
            // no side effect. It is one load, done before any other core
            // runs: it cannot race a writer, and a word of the image, a
            // stack or the DTB is only looked at, never changed.
            unsafe { crate::exception::probe_read_u64_quiet(addr) }.is_ok()
        });
        if backed < r.size {
            report(r, backed);
            p.memory.shrink(i, backed);
            if backed == 0 {
                continue;
            }
        }
        i += 1;
    }
    Ok(())
}

/// Why a checked probe did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeRefused {
    /// The address is mapped with the permission the probe would use, so
    /// the access would not fault and could corrupt what lives there.
    WouldSucceed {
        /// The address given.
        va: u64,
    },
    /// The address is not 8-byte aligned.
    Unaligned {
        /// The address given.
        va: u64,
    },
    /// [`STAGE1`] was not usable.
    Global(GlobalError),
}

/// Writes `value` to `va` where [`STAGE1`] says no write can succeed (not
/// mapped, or mapped read-only), and returns the fault it took (logged
/// with the full report, marked as expected). The tree is held while the
/// write runs, so no core makes the page writable meanwhile.
pub fn probe_write_expecting_fault(va: u64, value: u64) -> Result<CaughtFault, ProbeRefused> {
    if !va.is_multiple_of(8) {
        return Err(ProbeRefused::Unaligned { va });
    }
    STAGE1
        .with(|s1| {
            if s1.query(VirtAddr(va)).is_ok_and(|t| t.attributes.write) {
                return Err(ProbeRefused::WouldSucceed { va });
            }
            // SAFETY: the page is unmapped or read-only and stays so while
            // we hold the tree, so the write faults and changes nothing.
            match unsafe { crate::exception::probe_write_u64(va, value) } {
                Err(f) => Ok(f),
                Ok(()) => Err(ProbeRefused::WouldSucceed { va }),
            }
        })
        .map_err(ProbeRefused::Global)?
}

/// Calls `va` where [`STAGE1`] says it is not executable, and returns the
/// instruction abort its first fetch took.
pub fn probe_call_expecting_fault(va: u64) -> Result<CaughtFault, ProbeRefused> {
    if !va.is_multiple_of(4) {
        return Err(ProbeRefused::Unaligned { va });
    }
    STAGE1
        .with(|s1| {
            if s1.query(VirtAddr(va)).is_ok_and(|t| t.attributes.execute) {
                return Err(ProbeRefused::WouldSucceed { va });
            }
            // SAFETY: the page is not executable (WXN on, execute-never or
            // unmapped) and stays so while we hold the tree, so the first
            // fetch faults and nothing runs.
            match unsafe { crate::exception::probe_call(va) } {
                Err(f) => Ok(f),
                Ok(()) => Err(ProbeRefused::WouldSucceed { va }),
            }
        })
        .map_err(ProbeRefused::Global)?
}

/// Why a folio access did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolioAccessError {
    /// The address is not an aligned word.
    Unaligned {
        /// The address given.
        pa: u64,
    },
    /// The page array does not say the frame is part of a folio.
    NotAFolio {
        /// The address given.
        pa: u64,
    },
    /// [`FRAMES`] was not usable.
    Global(GlobalError),
}

fn folio_check(pa: u64) -> Result<(), FolioAccessError> {
    if !pa.is_multiple_of(8) {
        return Err(FolioAccessError::Unaligned { pa });
    }
    let folio = FRAMES
        .page_array()
        .map(|array| {
            array
                .word(PhysAddr(pa).pfn())
                .is_ok_and(|w| w.frame_type() == Some(FrameType::Folio))
        })
        .map_err(FolioAccessError::Global)?;
    if folio {
        Ok(())
    } else {
        Err(FolioAccessError::NotAFolio { pa })
    }
}

/// Reads the word at physical `pa` through the identity map, if the page
/// array says its frame belongs to a folio: folios are data handed to
/// users, which no Rust reference ever points into.
pub fn folio_read_u64(pa: u64) -> Result<u64, FolioAccessError> {
    folio_check(pa)?;
    // SAFETY: an aligned word of a folio frame (checked above), identity
    // mapped read-write like all RAM; folio memory is only ever accessed
    // with volatile word accesses like this one, never through references.
    Ok(unsafe { core::ptr::read_volatile(pa as *const u64) })
}

/// Writes the word at physical `pa`, as [`folio_read_u64`] reads it.
pub fn folio_write_u64(pa: u64, value: u64) -> Result<(), FolioAccessError> {
    folio_check(pa)?;
    // SAFETY: as in folio_read_u64.
    unsafe { core::ptr::write_volatile(pa as *mut u64, value) };
    Ok(())
}

/// The allocator every core shares: [`Frames`] behind per-CPU caches of
/// orders 0-3 ([`memdesc::frames::SmpFrameAllocator`]), one slot per
/// [`crate::percpu::MAX_CPUS`], each core named by [`ThisCpu`].
pub type SmpFrames =
    SmpFrameAllocator<'static, LinearMap, CoreAtomics, { crate::percpu::MAX_CPUS }>;

/// The home of [`FRAMES`]: set once at boot, then shared by `&` (the
/// allocator locks inside: each core's cache lock, then the buddy lock).
pub struct SharedFrames {
    /// 0 empty, 1 being set, 2 ready.
    state: AtomicU8,
    value: core::cell::UnsafeCell<core::mem::MaybeUninit<SmpFrames>>,
}

// SAFETY: `value` is written once, by the caller that moved `state` from
// 0 to 1, and only read (as `&SmpFrames`, which is Sync: its own locks
// serialise every mutation) after the Release store of 2.
unsafe impl Sync for SharedFrames {}

const EMPTY: u8 = 0;
const SETTING: u8 = 1;
const READY: u8 = 2;

fn smp_error(e: SmpError) -> WithError<FrameError> {
    match e {
        SmpError::Frame(e) => WithError::Op(e),
        // A lock this core already holds or waits for (an exception handler
        // interrupting an allocation), or a core without a cache slot.
        SmpError::Lock(_) | SmpError::CpuOutOfRange { .. } => WithError::Global(GlobalError::Busy),
        SmpError::Inconsistent(_) => WithError::Op(FrameError::Corrupt { pfn: Pfn(u64::MAX) }),
    }
}

fn global_error(e: SmpError) -> GlobalError {
    match smp_error(e) {
        WithError::Global(g) => g,
        WithError::Op(_) => GlobalError::Busy,
    }
}

impl SharedFrames {
    /// Empty (all zero: lives in BSS like the [`Global`]s).
    pub const fn new() -> Self {
        Self {
            state: AtomicU8::new(EMPTY),
            value: core::cell::UnsafeCell::new(core::mem::MaybeUninit::uninit()),
        }
    }

    /// Shares `fa` between every core; fails if already set.
    pub fn set(&self, fa: Frames) -> Result<(), GlobalError> {
        // The claim (EMPTY -> SETTING) pairs with no earlier writer (EMPTY is
        // the initial value); the value is published by the Release store
        // of READY below.
        if self
            .state
            .compare_exchange(EMPTY, SETTING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(GlobalError::AlreadyInitialised);
        }
        // SAFETY: only the winner of the swap above gets here, once, and no
        // reader looks at `value` before `state` is READY.
        unsafe { (*self.value.get()).write(SmpFrameAllocator::new(fa)) };
        // Pairs with the Acquire load in `get`.
        self.state.store(READY, Ordering::Release);
        Ok(())
    }

    /// The shared allocator.
    pub fn get(&self) -> Result<&SmpFrames, GlobalError> {
        if self.state.load(Ordering::Acquire) != READY {
            return Err(GlobalError::NotInitialised);
        }
        // SAFETY: READY is stored (Release) only after `value` was written,
        // and it is never written again.
        Ok(unsafe { (*self.value.get()).assume_init_ref() })
    }

    /// The page array (lock-free speculative lookups, word reads).
    pub fn page_array(&self) -> Result<&'static PageArray<'static>, GlobalError> {
        Ok(self.get()?.page_array())
    }

    /// Runs `f` on the buddy with every core's cache drained into it and
    /// every lock held: the exact picture (counts, consistency, poisoning,
    /// offlining, placement), as the single allocator had.
    pub fn with<R>(&self, f: impl FnOnce(&mut Frames) -> R) -> Result<R, GlobalError> {
        self.get()?.with_exact(&ThisCpu, f).map_err(global_error)
    }

    /// [`SharedFrames::with`] for an operation that can fail: one `Result`.
    pub fn try_with<R, E>(
        &self,
        f: impl FnOnce(&mut Frames) -> Result<R, E>,
    ) -> Result<R, WithError<E>> {
        self.with(f)?.map_err(WithError::Op)
    }

    /// Runs `f` on the buddy under its lock only; the cores' caches keep
    /// what they hold (for operations that need no particular free frame).
    pub fn with_buddy<R>(&self, f: impl FnOnce(&mut Frames) -> R) -> Result<R, GlobalError> {
        self.get()?.with_buddy(&ThisCpu, f).map_err(global_error)
    }

    /// A folio from this core's cache (orders up to 3) or the buddy.
    pub fn alloc_folio(&self, order: u8, owner: Owner) -> Result<FolioRef, WithError<FrameError>> {
        self.get()?
            .alloc_folio(&ThisCpu, order, owner)
            .map_err(smp_error)
    }

    /// Drops a reference; the last one frees the folio into this core's
    /// cache, whichever core allocated it.
    pub fn put(&self, f: FolioRef) -> Result<Option<Released>, WithError<FrameError>> {
        self.get()?.put(&ThisCpu, f).map_err(smp_error)
    }

    /// The owner hook for a last reference taken elsewhere.
    pub fn release(&self, last: LastRef) -> Result<Released, WithError<FrameError>> {
        self.get()?.release(&ThisCpu, last).map_err(smp_error)
    }

    /// Frozen frames (on the buddy; every cache drained and retried on
    /// out-of-memory).
    pub fn alloc_frozen(&self, order: u8, kind: FrozenKind) -> Result<Pfn, WithError<FrameError>> {
        self.get()?
            .alloc_frozen(&ThisCpu, order, kind)
            .map_err(smp_error)
    }

    /// Frees frozen frames.
    pub fn free_frozen(&self, pfn: Pfn, order: u8) -> Result<(), WithError<FrameError>> {
        self.get()?
            .free_frozen(&ThisCpu, pfn, order)
            .map_err(smp_error)
    }

    /// Empties this core's cache into the buddy (the core goes idle or
    /// offline). Nothing to do before the allocator is set up.
    pub fn drain_this_cpu(&self) -> Result<(), GlobalError> {
        match self.get() {
            Ok(s) => s
                .drain_cpu(&ThisCpu, ThisCpu.cpu_id())
                .map_err(global_error),
            Err(GlobalError::NotInitialised) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Core `cpu`'s cache counters and what it holds now.
    pub fn cpu_stats(&self, cpu: usize) -> Result<PcpStats, GlobalError> {
        self.get()?
            .cpu_stats(&ThisCpu, CpuId(cpu as u32))
            .map_err(global_error)
    }

    /// Exact counters over the buddy and every cache.
    pub fn stats(&self) -> Result<FrameStats, GlobalError> {
        self.get()?.stats(&ThisCpu).map_err(global_error)
    }

    /// How many buddy-lock acquisitions had to wait for another core.
    pub fn contended(&self) -> u64 {
        self.get().map_or(0, |s| s.buddy_lock_stats().contended)
    }
}

impl Default for SharedFrames {
    fn default() -> Self {
        Self::new()
    }
}
