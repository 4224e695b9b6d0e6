//! Memory manager bring-up on target: the page array over the RAM the device
//! tree describes, the buddy frame allocator, and the stage-1 tables — an
//! identity linear map of all RAM with the largest units, the image mapped
//! W^X, MMIO as Device-nGnRE execute-never, and unmapped guard pages under
//! both stacks — then the MMU and caches on.
//!
//! The global state lives in [`hal::global::Global`] cells, shared by every
//! core under a ticket spinlock; a re-entrant use (an exception handler on a
//! core that holds or waits for the lock) is a typed error, never a deadlock
//! or aliasing. [`FRAMES`] is the shared per-CPU allocator
//! (`hal::memory::SharedFrames`): small folios come from and go to the
//! calling core's cache. Lock order: [`STAGE1`] before [`FRAMES`] (the
//! engine takes table frames while it holds the tree), never the other way
//! round.
//!
//! Every raw memory access (the page array's home, table entries, the MMU
//! switch-on) is in `hal::memory`; this module decides what goes where.

use hal::dtb::Platform;
use hal::global::{Global, GlobalError, WithError};
use hal::memory::{IdentityTables, MemoryError};
use hal::mmu::Probe;
use memdesc::frames::{FrameError, LayoutError};
use memdesc::layout::LayoutPlanError;
use memdesc::stage1::{
    Attributes, Features, MappingSummary, MappingUnit, Stage1, Stage1Error, VaSize, Violation,
};
use memdesc::{PhysAddr, VirtAddr, PAGE_SIZE};

pub use hal::memory::{FrameReport, Frames, SmpFrames, FRAMES, STAGE1};

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
    /// A scratch-window access faulted or was out of the window.
    Scratch(hal::memory::ScratchError),
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
impl From<GlobalError> for MmError {
    fn from(e: GlobalError) -> Self {
        match e {
            GlobalError::NotInitialised => Self::NotInitialised,
            GlobalError::AlreadyInitialised => Self::AlreadyInitialised,
            GlobalError::Busy => Self::Busy,
        }
    }
}
impl<E: Into<MmError>> From<WithError<E>> for MmError {
    fn from(e: WithError<E>) -> Self {
        match e {
            WithError::Global(g) => g.into(),
            WithError::Op(e) => e.into(),
        }
    }
}
impl From<MemoryError> for MmError {
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::AlreadyInitialised => Self::AlreadyInitialised,
            MemoryError::TooManyRanges => Self::TooManyRanges,
            MemoryError::RamAboveScratchBase { .. } => {
                Self::DeviceTree(hal::dtb::DtbError::NoMemory)
            }
            MemoryError::Layout(e) => Self::Layout(e),
            MemoryError::Plan(e) => Self::Plan(e),
            MemoryError::Frames(e) => Self::Frames(e),
            MemoryError::Global(e) => e.into(),
            MemoryError::NotMappedForUse { va } => {
                Self::Stage1(Stage1Error::NotMapped { va: VirtAddr(va) })
            }
        }
    }
}

/// The boot mapping's report (units used vs optimum), kept for tests.
pub static BOOT_MAP: Global<MapReport> = Global::new();

/// Checks the RAM the device tree claims against the machine: each range's
/// top is read under a fault guard, and a range whose top does not answer
/// is cut to its backed prefix (or dropped), with a warning. Then the tree
/// is checked against the board again, since the reservations may now
/// cover all that is left. Runs before anything is placed in RAM.
pub fn discover_memory(p: &mut Platform<'_>) -> Result<(), MmError> {
    hal::memory::clamp_ram_to_backed(p, |r, backed| {
        if backed == 0 {
            defmt::warn!(
                "RAM {=u64:#x}..{=u64:#x} in the device tree is not there: 0 of {=u64} MiB answer; range ignored",
                r.base,
                r.end(),
                r.size >> 20
            );
        } else {
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
    })
    .map_err(MmError::DeviceTree)?;
    if p.memory.total() == 0 {
        return Err(MmError::DeviceTree(hal::dtb::DtbError::NoMemory));
    }
    p.check(&hal::board::CURRENT).map_err(MmError::DeviceTree)
}

/// Builds the page array and the frame allocator over the platform's RAM
/// (`hal::memory::init_frames`), reserving the image, the DTB, the page
/// array itself and every reserved region.
pub fn init_frames(p: &Platform<'_>, dtb_addr: u64) -> Result<FrameReport, MmError> {
    Ok(hal::memory::init_frames(p, dtb_addr)?)
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
const BOOT_MAP_REGIONS: usize = 2 * memdesc::frames::MAX_RANGES + 5 + hal::dtb::MAX_MMIO_WINDOWS;

/// Size of a table-pool chunk (pinned in the engine).
const POOL_CHUNK: u64 = 2 << 20;

/// The identity-mapped regions of the boot map.
struct BootRegions {
    items: [(u64, u64, Attributes); BOOT_MAP_REGIONS],
    len: usize,
}

impl BootRegions {
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
    /// The `pinned` 2 MiB chunks (the table pool) count at 64 KiB runs at
    /// most, and nothing folds across them.
    fn optimum(&self, pinned: &[u64]) -> MappingSummary {
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
            let mut at = start;
            while at < end {
                // The next pinned chunk in [at, end), if any.
                let chunk = pinned
                    .iter()
                    .copied()
                    .filter(|&c| c + POOL_CHUNK > at && c < end)
                    .min();
                let (upto, small) = match chunk {
                    Some(c) if c <= at => ((c + POOL_CHUNK).min(end), true),
                    Some(c) => (c, false),
                    None => (end, false),
                };
                let limit = if small {
                    MappingUnit::Cont64K
                } else {
                    MappingUnit::LARGEST
                };
                out.add_optimum(at, at, upto - at, limit);
                at = upto;
            }
        }
        out
    }
}

/// Builds the boot address space and turns the MMU on.
pub fn init_stage1(p: &Platform<'_>, probe: &Probe) -> Result<MapReport, MmError> {
    let features = probe.features();
    // Built before TTBR0 and the MMU are set up: plain stores (data
    // accesses may be Device memory now), until `set_live` below.
    let mut s1 = Stage1::new_detached(IdentityTables::new(probe)?, VaSize::Bits48, features)?;
    // Every table frame lives in the pool's chunks: pinned to pages and
    // 64 KiB runs, no block or run that a split breaks holds a table.
    let mut pinned = [0u64; hal::memory::TABLE_POOL_CHUNKS];
    let mut npinned = 0;
    for c in s1.platform().pool_chunks() {
        pinned[npinned] = c.0;
        npinned += 1;
    }
    for &c in &pinned[..npinned] {
        s1.pin_small(VirtAddr(c), POOL_CHUNK)?;
    }

    // Everything the boot map holds, as identity-mapped [start, end) regions.
    let mut regions = BootRegions::new();
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
    // The stacks of every other core the tree lists (of every slot when
    // it lists none); their guard pages stay unmapped.
    let cpus = p.cpu_slots(hal::percpu::MAX_CPUS);
    for cpu in 1..cpus {
        if let Some([main, _, exception, _]) = hal::image::cpu_stacks(cpu) {
            regions.push(main.start, main.end, Attributes::DATA)?;
            regions.push(exception.start, exception.end, Attributes::DATA)?;
        }
    }
    let windows = p
        .mmio_windows(&hal::board::CURRENT)
        .map_err(MmError::DeviceTree)?;
    for w in windows.as_slice() {
        regions.push(w.base, w.end(), Attributes::DEVICE)?;
    }
    for &(start, end, attrs) in regions.as_slice() {
        s1.map(VirtAddr(start), PhysAddr(start), end - start, attrs)?;
    }
    let optimum = regions.optimum(&pinned[..npinned]);
    // Checks that the tree maps what the code uses, then marks it live.
    hal::memory::enable_mmu(&mut s1, probe, cpus)?;
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
    Ok(STAGE1.with(|s1| {
        s1.lint(&mut |v: Violation| {
            defmt::warn!("stage-1 lint: {}", defmt::Debug2Format(&v));
        })
    })?)
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

/// What a change of the live map through [`map`], [`unmap`] or
/// [`map_device`] cost the balloon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapOutcome {
    /// Pages the balloon deflated so that the engine had table memory
    /// (deflate-on-OOM); 0 when the first try worked.
    pub deflated: u64,
}

/// Runs `op` on the live tables. When it fails for want of table memory
/// (a new table's descriptor cache could not grow: the engine's
/// [`Stage1Error::OutOfTableMemory`]), the balloon is asked to deflate
/// what is missing plus its OOM margin ([`crate::balloon::deflate_for_tables`],
/// which does so only when DEFLATE_ON_OOM was negotiated) and `op` is
/// tried once more. The engine cannot do this itself: it holds [`STAGE1`]
/// while it takes table memory, and a deflate maps frames back.
fn with_table_oom(
    mut op: impl FnMut() -> Result<(), WithError<Stage1Error>>,
) -> Result<MapOutcome, MmError> {
    let e = match op() {
        Ok(()) => return Ok(MapOutcome::default()),
        Err(WithError::Op(e)) => e,
        Err(e) => return Err(e.into()),
    };
    let Some(short) = memdesc::balloon::table_oom_shortfall(&e) else {
        return Err(e.into());
    };
    match crate::balloon::deflate_for_tables(short) {
        Ok(deflated) if deflated > 0 => {
            op()?;
            Ok(MapOutcome { deflated })
        }
        // Nothing deflated (no balloon, not negotiated, a full pool):
        // the engine's own typed error.
        _ => Err(e.into()),
    }
}

/// Maps `[va, va + len)` to `[pa, pa + len)` with `attrs` in the live
/// stage-1 tables, deflating the balloon once if the tables need memory
/// that is not there (see [`with_table_oom`]).
pub fn map(va: VirtAddr, pa: PhysAddr, len: u64, attrs: Attributes) -> Result<MapOutcome, MmError> {
    with_table_oom(|| STAGE1.try_with(|s1| s1.map(va, pa, len, attrs)))
}

/// Unmaps `[va, va + len)` from the live stage-1 tables (a block or run
/// cut in part needs a new table), as [`map`] does on out-of-memory.
pub fn unmap(va: VirtAddr, len: u64) -> Result<MapOutcome, MmError> {
    with_table_oom(|| STAGE1.try_with(|s1| s1.unmap(va, len)))
}

/// Maps `[base, base + size)`, rounded out to pages, at its physical address
/// as Device-nGnRE execute-never memory in the live stage-1 tables (for
/// device windows found after boot, such as the GIC's), as [`map`] does on
/// out-of-memory.
pub fn map_device(base: u64, size: u64) -> Result<MapOutcome, MmError> {
    with_table_oom(|| hal::memory::map_device(base, size))
}
