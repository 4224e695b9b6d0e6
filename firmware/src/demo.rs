//! A short workload that shows the memory manager at work after boot (what
//! `cargo qemu run` displays), and that the MMU suite runs as an integration
//! test: folios of mixed orders, a speculative lookup, typed refusals, a live
//! stage-1 mapping built page by page then folded into a block, a partial
//! permission change that unfolds and refolds it, hwpoison, Offline frames,
//! and everything returned with the linter and the allocator's own
//! consistency check clean.

use crate::mm::{MmError, FRAMES, STAGE1};
use memdesc::frames::{FolioRef, FrameError, FrameType, Owner};
use memdesc::stage1::{Attributes, MappingUnit};
use memdesc::{Pfn, PhysAddr, VirtAddr};

/// Where the demo maps its 2 MiB folio (far above RAM).
pub const DEMO_VA: u64 = 0x80_0000_0000;
const BLOCK: u64 = 2 << 20;

/// What the demo observed, for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoReport {
    /// Free frames before.
    pub free_before: u64,
    /// Free frames after everything was returned.
    pub free_after: u64,
    /// Frames poisoned (kept out of the allocator for good).
    pub poisoned: u64,
    /// Refcount seen through the speculative lookup (2: ours plus the owner's).
    pub speculative_refcount: u32,
    /// The lookup of a free frame was refused with `FrameError::Free`.
    pub free_lookup_refused: bool,
    /// Unit after mapping page by page.
    pub unit_page_by_page: MappingUnit,
    /// Unit after `refold`.
    pub unit_refolded: MappingUnit,
    /// Unit next to a page whose permission changed.
    pub unit_after_partial_change: MappingUnit,
    /// Unit after the change was undone.
    pub unit_after_undo: MappingUnit,
    /// Offline frames at the peak.
    pub offline_peak: u64,
    /// Linter violations at the end.
    pub lint_errors: usize,
    /// Frames the descriptor caches grew by (kept for good: type-stable memory).
    pub descriptor_frames: u64,
}

fn frames<R>(
    f: impl FnOnce(&mut crate::mm::Frames) -> Result<R, FrameError>,
) -> Result<R, MmError> {
    Ok(FRAMES.try_with(f)?)
}

fn unit_at(va: u64) -> Result<MappingUnit, MmError> {
    Ok(STAGE1.try_with(|s| s.query(VirtAddr(va)))?.unit)
}

fn free_count() -> Result<u64, MmError> {
    Ok(FRAMES.with(|fa| {
        fa.drain_cache();
        fa.count(FrameType::Free)
    })?)
}

/// Runs the workload, logging each step.
pub fn run() -> Result<DemoReport, MmError> {
    let free_before = free_count()?;
    let reserved_before = FRAMES.with(|fa| fa.count(FrameType::Reserved))?;
    defmt::info!("demo: {=u64} frames free", free_before);

    // Folios of mixed orders: one descriptor per allocation.
    let mut small: [Option<FolioRef>; 32] = [const { None }; 32];
    for slot in small.iter_mut() {
        *slot = Some(frames(|fa| fa.alloc_folio(0, Owner::Buddy))?);
    }
    let mut runs: [Option<FolioRef>; 8] = [const { None }; 8];
    for slot in runs.iter_mut() {
        *slot = Some(frames(|fa| fa.alloc_folio(4, Owner::Buddy))?);
    }
    let block = frames(|fa| fa.alloc_folio(9, Owner::Buddy))?;
    defmt::info!(
        "demo: allocated 32 x 4 KiB, 8 x 64 KiB, 1 x 2 MiB folios; {=u64} frames free",
        free_count()?
    );

    // Speculative lookup through a tail page of a 64 KiB folio.
    let head = runs[0]
        .as_ref()
        .map(|f| f.pfn())
        .ok_or(MmError::NotInitialised)?;
    let spec = FRAMES.try_with(|fa| fa.page_array().get_folio(Pfn(head.0 + 3), |_| ()))?;
    let speculative_refcount = spec.refcount();
    defmt::info!(
        "demo: speculative lookup of pfn {=u64:#x} (tail of a 64 KiB folio): refcount {=u32}",
        head.0 + 3,
        speculative_refcount
    );
    frames(|fa| fa.put(spec))?;

    // A freed frame can no longer be looked up: a typed error, not a reference.
    let first = small[0].take().ok_or(MmError::NotInitialised)?;
    let freed_pfn = first.pfn();
    frames(|fa| fa.put(first))?;
    FRAMES.with(|fa| fa.drain_cache())?;
    let refused = FRAMES.with(|fa| fa.page_array().get_folio(freed_pfn, |_| ()).map(drop))?;
    let free_lookup_refused = matches!(refused, Err(FrameError::Free { .. }));
    defmt::info!(
        "demo: lookup of freed pfn {=u64:#x}: {}",
        freed_pfn.0,
        defmt::Debug2Format(&refused)
    );

    // A live mapping of the 2 MiB folio, built page by page, then folded.
    let pa = block.pfn().addr().0;
    STAGE1.try_with(|s| {
        s.map_limited(
            VirtAddr(DEMO_VA),
            PhysAddr(pa),
            BLOCK,
            Attributes::DATA,
            MappingUnit::Page4K,
        )
    })?;
    let unit_page_by_page = unit_at(DEMO_VA)?;
    STAGE1.try_with(|s| s.refold(VirtAddr(DEMO_VA), BLOCK))?;
    let unit_refolded = unit_at(DEMO_VA)?;
    defmt::info!(
        "demo: 2 MiB mapped as {}, refolded into {}",
        defmt::Debug2Format(&unit_page_by_page),
        defmt::Debug2Format(&unit_refolded)
    );
    // DEMO_VA..+2 MiB (in the scratch window) maps our folio read-write.
    hal::memory::scratch_write_u64(DEMO_VA + 0x1234 * 8, 0xfeed).map_err(MmError::Scratch)?;

    // One read-only page in the middle: break-before-make unfold, then undo.
    let page = DEMO_VA + 37 * 4096;
    STAGE1.try_with(|s| s.protect(VirtAddr(page), 4096, Attributes::RODATA))?;
    let unit_after_partial_change = unit_at(page + 4096)?;
    STAGE1.try_with(|s| s.protect(VirtAddr(page), 4096, Attributes::DATA))?;
    let unit_after_undo = unit_at(DEMO_VA)?;
    defmt::info!(
        "demo: one page made read-only -> neighbour is a {}; undone -> {}",
        defmt::Debug2Format(&unit_after_partial_change),
        defmt::Debug2Format(&unit_after_undo)
    );
    // Still mapped read-write to our folio.
    let back = hal::memory::scratch_read_u64(DEMO_VA + 0x1234 * 8).map_err(MmError::Scratch)?;
    if back != 0xfeed {
        defmt::error!("demo: data changed across unfold/refold: {=u64:#x}", back);
    }
    STAGE1.try_with(|s| s.unmap(VirtAddr(DEMO_VA), BLOCK))?;

    // hwpoison one in-use frame: it never returns to the allocator.
    let victim = small[1].take().ok_or(MmError::NotInitialised)?;
    let victim_pfn = victim.pfn();
    frames(|fa| fa.poison(victim_pfn).map(drop))?;
    frames(|fa| fa.put(victim))?;
    let poisoned = FRAMES.with(|fa| fa.count(FrameType::HwPoison))?;
    defmt::info!(
        "demo: poisoned pfn {=u64:#x} in use; after its last put {=u64} frame(s) stay HwPoison",
        victim_pfn.0,
        poisoned
    );

    // Offline frames, as the balloon takes them: frozen at 0, no descriptor.
    let mut offline = [Pfn(0); 8];
    for slot in offline.iter_mut() {
        *slot = frames(|fa| fa.alloc_offline(0))?;
    }
    let offline_peak = FRAMES.with(|fa| fa.count(FrameType::Offline))?;
    let offline_lookup =
        FRAMES.with(|fa| fa.page_array().get_folio(offline[0], |_| ()).map(drop))?;
    defmt::info!(
        "demo: {=u64} Offline frames; lookup of one: {}",
        offline_peak,
        defmt::Debug2Format(&offline_lookup)
    );
    for pfn in offline {
        let f = frames(|fa| fa.online(pfn, 0, Owner::Buddy))?;
        frames(|fa| fa.put(f))?;
    }

    // Give everything back.
    for f in small.iter_mut().filter_map(Option::take) {
        frames(|fa| fa.put(f))?;
    }
    for f in runs.iter_mut().filter_map(Option::take) {
        frames(|fa| fa.put(f))?;
    }
    frames(|fa| fa.put(block))?;
    let free_after = free_count()?;
    let descriptor_frames = FRAMES.with(|fa| fa.count(FrameType::Reserved))? - reserved_before;
    let lint_errors = crate::mm::lint()?;
    let consistent = FRAMES.with(|fa| fa.check_consistency())?;
    defmt::info!(
        "demo: all returned: {=u64} frames free ({=u64} poisoned, {=u64} grew the descriptor caches), linter {=usize} violations, page array consistent: {=bool}",
        free_after,
        poisoned,
        descriptor_frames,
        lint_errors,
        consistent.is_ok()
    );
    Ok(DemoReport {
        free_before,
        free_after,
        poisoned,
        speculative_refcount,
        free_lookup_refused,
        unit_page_by_page,
        unit_refolded,
        unit_after_partial_change,
        unit_after_undo,
        offline_peak,
        lint_errors,
        descriptor_frames,
    })
}
