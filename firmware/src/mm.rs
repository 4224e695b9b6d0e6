//! Memory manager bring-up on target: the page array over the RAM the device
//! tree describes, the buddy frame allocator, and the stage-1 tables — an
//! identity linear map of all RAM with the largest units, the image mapped
//! W^X, MMIO as Device-nGnRE execute-never, and unmapped guard pages under
//! both stacks — then the MMU and caches on.
//!
//! The firmware is single-core and runs with interrupts masked, so the global
//! state lives in [`Global`] cells: exclusive access is checked at run time
//! and a re-entrant use is a typed error, never aliasing.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use hal::dtb::Platform;
use hal::image::Span;
use hal::mmu::{Probe, Tlb};
use memdesc::frames::{
    words_needed, FrameAllocator, FrameError, LayoutError, LinearMap, PageArray, PfnRange,
    ReservedKind, ReservedRange,
};
use memdesc::layout::{find_hole, LayoutPlanError};
use memdesc::stage1::{
    Attributes, Features, MappingSummary, MappingUnit, Stage1, Stage1Error, TableMemory,
    TableMemoryError, TlbiScope, TranslationHw, VaSize, Violation,
};
use memdesc::{Pfn, PhysAddr, VirtAddr, PAGE_SIZE};

/// The frame allocator as the firmware instantiates it: descriptors come
/// from its own frames through the identity linear map.
pub type Frames = FrameAllocator<'static, LinearMap>;

/// Why memory-manager bring-up or an operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmError {
    /// Used before `init`.
    NotInitialised,
    /// Initialised twice.
    AlreadyInitialised,
    /// A global was re-entered (for example from an exception handler).
    Busy,
    /// More RAM or reserved ranges than the fixed tables hold.
    TooManyRanges,
    /// The page array could not be laid out.
    Layout(LayoutError),
    /// No room for the page array.
    Plan(LayoutPlanError),
    /// The frame allocator refused.
    Frames(FrameError),
    /// The table engine refused.
    Stage1(Stage1Error),
    /// The device tree describes memory or devices the bring-up cannot use.
    DeviceTree(hal::dtb::DtbError),
}

impl MmError {
    /// True when the device tree is to blame (the run ends with
    /// [`hal::exit::BAD_DTB`], not the crash status): its RAM cannot hold
    /// the page array, or what it describes cannot be used.
    pub fn blames_device_tree(&self) -> bool {
        matches!(self, Self::DeviceTree(_) | Self::Plan(_) | Self::Layout(_))
    }
}

impl From<FrameError> for MmError {
    fn from(e: FrameError) -> Self {
        Self::Frames(e)
    }
}
impl From<Stage1Error> for MmError {
    fn from(e: Stage1Error) -> Self {
        Self::Stage1(e)
    }
}

/// A global initialised once, then used exclusively through [`Global::with`].
///
/// Its empty state is all zero bytes, so it lives in BSS: a firmware entered
/// a second time without being reloaded (U-Boot `go` on an image already in
/// memory, the re-entry self-test) starts with every global empty again.
pub struct Global<T> {
    value: UnsafeCell<MaybeUninit<T>>,
    present: AtomicBool,
    busy: AtomicBool,
}

// SAFETY: access to `value` is serialised by `busy` (a failed swap means
// someone is inside and the caller gets `Busy`), so no two `&mut T` exist.
unsafe impl<T: Send> Sync for Global<T> {}

impl<T> Global<T> {
    /// An empty cell.
    pub const fn new() -> Self {
        Self {
            value: UnsafeCell::new(MaybeUninit::uninit()),
            present: AtomicBool::new(false),
            busy: AtomicBool::new(false),
        }
    }

    /// Stores the value; fails if one is there already.
    pub fn set(&self, v: T) -> Result<(), MmError> {
        self.exclusive(|value, present| {
            if *present {
                return Err(MmError::AlreadyInitialised);
            }
            value.write(v);
            *present = true;
            Ok(())
        })?
    }

    /// Runs `f` with exclusive access to the value.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, MmError> {
        self.exclusive(|value, present| {
            if !*present {
                return Err(MmError::NotInitialised);
            }
            // SAFETY: `present` is set only after `value` was written.
            Ok(f(unsafe { value.assume_init_mut() }))
        })?
    }

    fn exclusive<R>(
        &self,
        f: impl FnOnce(&mut MaybeUninit<T>, &mut bool) -> R,
    ) -> Result<R, MmError> {
        if self.busy.swap(true, Ordering::Acquire) {
            return Err(MmError::Busy);
        }
        let mut present = self.present.load(Ordering::Relaxed);
        // SAFETY: `busy` was false and is now ours: nobody else holds a
        // reference into `value` until we clear it below.
        let r = f(unsafe { &mut *self.value.get() }, &mut present);
        self.present.store(present, Ordering::Relaxed);
        self.busy.store(false, Ordering::Release);
        Ok(r)
    }
}

impl<T> Default for Global<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The page array needs a `'static` home before the allocator borrows it.
struct PageArrayHome(UnsafeCell<Option<PageArray<'static>>>, AtomicBool);
// SAFETY: written once, guarded by the flag, then only shared.
unsafe impl Sync for PageArrayHome {}
static PAGE_ARRAY: PageArrayHome = PageArrayHome(UnsafeCell::new(None), AtomicBool::new(false));

/// The frame allocator.
pub static FRAMES: Global<Frames> = Global::new();
/// The boot mapping's report (units used vs optimum), kept for tests.
pub static BOOT_MAP: Global<MapReport> = Global::new();
/// The stage-1 tables of the firmware's own address space.
pub static STAGE1: Global<Stage1<FirmwarePlatform>> = Global::new();

/// What `init_frames` set up, for the log and for tests.
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

/// Checks the RAM the device tree claims against the machine: each range's
/// top is read under a fault guard, and a range whose top does not answer
/// is cut to its backed prefix (or dropped), with a warning. Then the tree
/// is checked against the board again, since the reservations may now
/// cover all that is left. Runs before anything is placed in RAM.
pub fn discover_memory(p: &mut Platform<'_>) -> Result<(), MmError> {
    let mut i = 0;
    while let Some(&r) = p.memory.as_slice().get(i) {
        let backed = hal::memprobe::backed_prefix(r, |addr| {
            // SAFETY: `addr` is an aligned word inside a RAM range of the
            // device tree, which the board check proved clear of every
            // device window and virtio transport, so reading it has no side
            // effect. The read is one load on the only running core: it
            // cannot race a writer, and a word of the image, a stack or the
            // DTB is only looked at, never changed.
            unsafe { hal::exception::probe_read_u64_quiet(addr) }.is_ok()
        });
        if backed == 0 {
            defmt::warn!(
                "RAM {=u64:#x}..{=u64:#x} in the device tree is not there: 0 of {=u64} MiB answer; range ignored",
                r.base,
                r.end(),
                r.size >> 20
            );
        } else if backed < r.size {
            defmt::warn!(
                "RAM {=u64:#x}..{=u64:#x} in the device tree is not all there: {=u64} of {=u64} MiB answer; using {=u64:#x}..{=u64:#x}",
                r.base,
                r.end(),
                backed >> 20,
                r.size >> 20,
                r.base,
                r.base + backed
            );
        }
        if backed < r.size {
            p.memory.shrink(i, backed);
            if backed == 0 {
                continue;
            }
        }
        i += 1;
    }
    if p.memory.total() == 0 {
        return Err(MmError::DeviceTree(hal::dtb::DtbError::NoMemory));
    }
    p.check(&hal::board::CURRENT).map_err(MmError::DeviceTree)
}

const MAX_RANGES: usize = 16;

fn ram_ranges(p: &Platform<'_>) -> Result<([PfnRange; MAX_RANGES], usize), MmError> {
    let mut out = [PfnRange::new(Pfn(0), Pfn(0)); MAX_RANGES];
    let mut n = 0;
    for r in p.memory.as_slice() {
        let slot = out.get_mut(n).ok_or(MmError::TooManyRanges)?;
        *slot = PfnRange::from_phys(PhysAddr(r.base), r.size);
        n += 1;
    }
    Ok((out, n))
}

fn span_range(s: Span) -> PfnRange {
    PfnRange::covering_phys(PhysAddr(s.start), s.len())
}

/// Builds the page array and the frame allocator over the platform's RAM,
/// reserving the image, the DTB, the page array itself and every reserved
/// region. Runs with the MMU off or on (RAM is identity mapped either way).
pub fn init_frames(p: &Platform<'_>, dtb_addr: u64) -> Result<FrameReport, MmError> {
    let (ram, nram) = ram_ranges(p)?;
    let ram = &ram[..nram];
    let image = span_range(hal::image::whole());
    let dtb = PfnRange::covering_phys(PhysAddr(dtb_addr), p.total_size as u64);

    let mut avoid = [PfnRange::new(Pfn(0), Pfn(0)); MAX_RANGES + 2];
    avoid[0] = image;
    avoid[1] = dtb;
    let mut navoid = 2;
    for r in p.reserved.as_slice() {
        let slot = avoid.get_mut(navoid).ok_or(MmError::TooManyRanges)?;
        *slot = PfnRange::covering_phys(PhysAddr(r.base), r.size);
        navoid += 1;
    }
    let words = words_needed(ram).map_err(MmError::Layout)?;
    let bytes = words * 8;
    let pages = bytes.div_ceil(PAGE_SIZE);
    let at = find_hole(ram, &avoid[..navoid], pages, 1, image.end).map_err(MmError::Plan)?;

    if PAGE_ARRAY.1.swap(true, Ordering::AcqRel) {
        return Err(MmError::AlreadyInitialised);
    }
    // SAFETY: find_hole returned `pages` frames of RAM that overlap neither
    // the image, the DTB nor any reserved region, and nothing else uses RAM
    // yet; RAM is identity mapped (or the MMU is off), `at` is page aligned
    // (so 8-byte aligned for AtomicU64), and the slice lives forever because
    // the allocator reserves these frames as `Reserved(PageArray)` below.
    let storage: &'static mut [AtomicU64] =
        unsafe { core::slice::from_raw_parts_mut(at.addr().0 as *mut AtomicU64, words as usize) };
    let array = PageArray::new(storage, ram).map_err(MmError::Layout)?;
    // SAFETY: guarded by the flag swapped above: this is the only write, and
    // the `&'static` below is the only borrow ever made.
    let array: &'static PageArray<'static> = unsafe {
        let slot = &mut *PAGE_ARRAY.0.get();
        slot.insert(array)
    };

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
    let fa = FrameAllocator::new(array, map, &reserved[..nres])?;
    let free = fa.count(memdesc::frames::FrameType::Free);
    FRAMES.set(fa)?;
    Ok(FrameReport {
        frames: array.len() as u64,
        storage: at.addr(),
        storage_bytes: bytes,
        free,
    })
}

/// Table memory from the frame allocator (page-table frames, valid counts in
/// their descriptors) and TLB maintenance from the hal.
pub struct FirmwarePlatform {
    tlb: Tlb,
}

fn entry_ptr(table: PhysAddr, index: usize) -> *mut u64 {
    (table.0 as *mut u64).wrapping_add(index)
}

/// The engine's view of a failed [`FRAMES`] access: re-entered (`Busy`) or
/// not set up.
fn frames_unavailable(e: MmError) -> TableMemoryError {
    match e {
        MmError::Busy => TableMemoryError::Busy,
        _ => TableMemoryError::Unavailable,
    }
}

// SAFETY: (the trait contract) tables are fresh page-table frames from the buddy
// allocator, zeroed here, identity mapped (VA == PA) before and after the
// MMU is on; entry accesses are aligned 64-bit volatile or atomic accesses of
// entry `index < 512` of that frame only; the valid count lives in the
// frame's page-table descriptor.
unsafe impl TableMemory for FirmwarePlatform {
    fn alloc_table(&mut self) -> Result<PhysAddr, TableMemoryError> {
        let frame = FRAMES
            .with(|fa| fa.alloc_page_table())
            .map_err(frames_unavailable)?
            .map_err(|e| match e {
                FrameError::OutOfMemory { .. } | FrameError::OutOfDescriptors { .. } => {
                    TableMemoryError::OutOfMemory
                }
                _ => TableMemoryError::Unavailable,
            })?;
        let pa = frame.pfn().addr();
        for i in 0..512 {
            // SAFETY: the frame was just allocated to us and is identity mapped.
            unsafe { core::ptr::write_volatile(entry_ptr(pa, i), 0) };
        }
        Ok(pa)
    }

    unsafe fn free_table(&mut self, table: PhysAddr) -> Result<(), TableMemoryError> {
        FRAMES
            .with(|fa| {
                let t = fa
                    .page_array()
                    .page_table(table.pfn())
                    .map_err(|_| TableMemoryError::NotATable { table })?;
                fa.free_page_table(t)
                    .map_err(|_| TableMemoryError::FreeRefused { table })
            })
            .map_err(frames_unavailable)?
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
        atom.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
            .map(drop)
    }

    unsafe fn adjust_valid(
        &mut self,
        table: PhysAddr,
        delta: i32,
    ) -> Result<u32, TableMemoryError> {
        FRAMES
            .with(|fa| {
                let t = fa
                    .page_array()
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

impl TranslationHw for FirmwarePlatform {
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

/// What the boot mapping looks like, for the log and for tests.
#[derive(Debug, Clone, Copy)]
pub struct MapReport {
    /// Units actually used.
    pub summary: MappingSummary,
    /// The fewest units the same mappings could use.
    pub optimum: MappingSummary,
    /// The CPU features the engine was told about.
    pub features: Features,
}

/// Room for every region of the boot map: RAM on both sides of the image
/// for each range, the image's text, rodata and data, both stacks, and every
/// MMIO window.
const BOOT_MAP_REGIONS: usize = 2 * hal::dtb::MAX_RANGES + 5 + hal::dtb::MAX_MMIO_WINDOWS;

/// The identity-mapped regions of the boot map.
struct Regions {
    items: [(u64, u64, Attributes); BOOT_MAP_REGIONS],
    len: usize,
}

impl Regions {
    const fn new() -> Self {
        Self {
            items: [(0, 0, Attributes::DATA); BOOT_MAP_REGIONS],
            len: 0,
        }
    }

    fn push(&mut self, start: u64, end: u64, attrs: Attributes) -> Result<(), MmError> {
        if end > start {
            *self.items.get_mut(self.len).ok_or(MmError::TooManyRanges)? = (start, end, attrs);
            self.len += 1;
        }
        Ok(())
    }

    fn as_slice(&self) -> &[(u64, u64, Attributes)] {
        &self.items[..self.len]
    }

    /// The fewest TLB entries that can hold these mappings: adjacent regions
    /// with the same attributes are one mapping to the hardware (and the
    /// engine folds across them), so merge them before the greedy count.
    fn optimum(&self) -> MappingSummary {
        let mut sorted = self.items;
        let list = &mut sorted[..self.len];
        list.sort_unstable_by_key(|r| r.0);
        let mut out = MappingSummary::default();
        let mut i = 0;
        while i < list.len() {
            let (start, mut end, attrs) = list[i];
            i += 1;
            while i < list.len() && list[i].0 == end && list[i].2 == attrs {
                end = list[i].1;
                i += 1;
            }
            out.add_optimum(start, start, end - start, MappingUnit::LARGEST);
        }
        out
    }
}

/// Builds the boot address space and turns the MMU on.
pub fn init_stage1(p: &Platform<'_>, probe: &Probe) -> Result<MapReport, MmError> {
    let features = probe.features();
    // Built before TTBR0 and the MMU are set up: plain stores (data
    // accesses may be Device memory now), until `set_live` below.
    let mut s1 = Stage1::new_detached(
        FirmwarePlatform {
            tlb: Tlb::new(probe),
        },
        VaSize::Bits48,
        features,
    )?;

    // Everything the boot map holds, as identity-mapped [start, end) regions.
    let mut regions = Regions::new();
    let image = hal::image::whole();
    for r in p.memory.as_slice() {
        let (start, end) = (
            r.base.next_multiple_of(PAGE_SIZE),
            r.end() & !(PAGE_SIZE - 1),
        );
        // RAM around the image: the image gets its own W^X mapping below.
        regions.push(start, end.min(image.start).max(start), Attributes::DATA)?;
        regions.push(start.max(image.end).min(end), end, Attributes::DATA)?;
    }
    regions.push(
        hal::image::text().start,
        hal::image::text().end,
        Attributes::TEXT,
    )?;
    regions.push(
        hal::image::rodata().start,
        hal::image::rodata().end,
        Attributes::RODATA,
    )?;
    regions.push(
        hal::image::data().start,
        hal::image::data().end,
        Attributes::DATA,
    )?;
    let stack = hal::image::main_stack();
    regions.push(stack.start, stack.end, Attributes::DATA)?;
    let stack = hal::image::exception_stack();
    regions.push(stack.start, stack.end, Attributes::DATA)?;
    let windows = p
        .mmio_windows(&hal::board::CURRENT)
        .map_err(MmError::DeviceTree)?;
    for w in windows.as_slice() {
        regions.push(w.base, w.end(), Attributes::DEVICE)?;
    }
    for &(start, end, attrs) in regions.as_slice() {
        s1.map(VirtAddr(start), PhysAddr(start), end - start, attrs)?;
    }
    let optimum = regions.optimum();
    let root = s1.root();
    s1.set_live();
    // SAFETY: the tree maps all RAM (including the running image's text,
    // data, stacks and the page array) and the console at their physical
    // addresses, with the permissions the code needs from here on; the guard
    // pages are the only image pages left out and nothing runs on them.
    unsafe { hal::mmu::enable(root.0, s1.va_size(), probe) };
    let summary = s1.summary();
    STAGE1.set(s1)?;
    BOOT_MAP.set(MapReport {
        summary,
        optimum,
        features,
    })?;
    Ok(MapReport {
        summary,
        optimum,
        features,
    })
}

/// Runs the stage-1 linter over the live tables; returns the number of
/// rule violations (advisory findings are logged but not counted).
pub fn lint() -> Result<usize, MmError> {
    STAGE1.with(|s1| {
        s1.lint(&mut |v: Violation| {
            defmt::warn!("stage-1 lint: {}", defmt::Debug2Format(&v));
        })
    })
}

/// Logs a mapping report: units of each size, TLB footprint and optimum.
pub fn log_map_report(r: &MapReport) {
    let names = [
        "4K pages",
        "64K runs",
        "2M blocks",
        "32M runs",
        "1G blocks",
        "16G runs",
    ];
    for (i, unit) in MappingUnit::ALL.iter().enumerate() {
        let (n, best) = (r.summary.count(*unit), r.optimum.count(*unit));
        if n != 0 || best != 0 {
            defmt::info!("  {=str}: {=u64} (optimum {=u64})", names[i], n, best);
        }
    }
    defmt::info!(
        "stage-1 map: {=u64} TLB entries for the whole map (optimum {=u64}), {=u64} tables; HAFDBS {=bool}, range TLBI {=bool}, BBM level {=u8}",
        r.summary.tlb_entries(),
        r.optimum.tlb_entries(),
        r.summary.tables,
        r.features.hafdbs,
        r.features.tlbi_range,
        r.features.bbm_level
    );
}

/// Maps `[base, base + size)`, rounded out to pages, at its physical address
/// as Device-nGnRE execute-never memory in the live stage-1 tables (for
/// device windows found after boot, such as the GIC's).
pub fn map_device(base: u64, size: u64) -> Result<(), MmError> {
    let start = base & !(PAGE_SIZE - 1);
    let end = base
        .checked_add(size)
        .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
        .ok_or(MmError::Stage1(Stage1Error::PaOutOfRange {
            pa: PhysAddr(base),
        }))?;
    STAGE1.with(|s1| {
        s1.map(
            VirtAddr(start),
            PhysAddr(start),
            end - start,
            Attributes::DEVICE,
        )
    })??;
    Ok(())
}
