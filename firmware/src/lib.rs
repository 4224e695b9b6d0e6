//! The firmware's init sequence and services, shared by the bootable binary
//! and the on-target test suites (which bring the machine up the same way).
#![no_std]
// Every raw memory or register access lives in `hal` behind a safe API.
#![deny(unsafe_code)]

pub mod balloon;
pub mod demo;
pub mod interrupts;
pub mod mm;
pub mod selftest;
pub mod smp;

use hal::dtb::Platform;

/// Brings the machine up: console, boot facts, device tree (validated and
/// checked against the board), the RAM it claims (probed, clamped to what
/// answers), the page array and frame allocator, the stage-1 tables, MMU
/// and caches on. A device tree that is malformed or describes memory the
/// bring-up cannot use ends the run with [`hal::exit::BAD_DTB`] after
/// printing the typed error; any other memory-manager failure ends it with
/// [`hal::exit::CRASH`].
pub fn init() -> Platform<'static> {
    defmt::info!(
        "firmware {=str} on {=str}: entered at EL{=u8}, running at EL{=u8}",
        env!("CARGO_PKG_VERSION"),
        hal::board::CURRENT.name,
        hal::boot::entry_el(),
        hal::boot::current_el()
    );
    let found = match hal::discover::discover() {
        Ok(d) => d,
        Err(e) => {
            defmt::error!("device tree unusable: {}", e);
            hal::power::exit(hal::exit::BAD_DTB)
        }
    };
    match found.source {
        hal::discover::Source::DtbInX0 => {
            defmt::info!("memory from the DTB at {=u64:#x} (x0)", found.dtb_addr)
        }
        hal::discover::Source::DtbAtRamStart => defmt::info!(
            "memory from the DTB at {=u64:#x} (start of RAM)",
            found.dtb_addr
        ),
        hal::discover::Source::VideoCoreMailbox => {
            defmt::info!("memory from the VideoCore mailbox (no DTB)")
        }
        hal::discover::Source::BoardDefault => {
            defmt::info!("memory from the board default (no DTB)")
        }
    }
    let dtb_addr = found.dtb_addr;
    let mut platform = found.platform;
    if let Err(e) = mm::discover_memory(&mut platform) {
        fail(e)
    }
    hal::power::set_psci(platform.psci);
    for r in platform.memory.as_slice() {
        defmt::info!(
            "RAM      {=u64:#011x}..{=u64:#011x} ({=u64} MiB)",
            r.base,
            r.end(),
            r.size >> 20
        );
    }
    for r in platform.reserved.as_slice() {
        defmt::info!("reserved {=u64:#011x}..{=u64:#011x}", r.base, r.end());
    }
    defmt::info!(
        "device tree: {=usize} bytes, {=usize} virtio-mmio transports, PSCI {}",
        platform.total_size,
        platform.virtio_mmio().len(),
        platform.psci
    );
    if let Err(e) = init_memory(&platform, dtb_addr) {
        fail(e)
    }
    platform
}

/// Ends a failed bring-up: exit 71 when the device tree is to blame.
fn fail(e: mm::MmError) -> ! {
    if e.blames_device_tree() {
        defmt::error!(
            "device tree unusable: memory bring-up failed: {}",
            defmt::Debug2Format(&e)
        );
        hal::power::exit(hal::exit::BAD_DTB)
    }
    defmt::error!(
        "memory manager bring-up failed: {}",
        defmt::Debug2Format(&e)
    );
    hal::power::exit(hal::exit::CRASH)
}

fn init_memory(platform: &Platform<'static>, dtb_addr: u64) -> Result<(), mm::MmError> {
    // Spans are timed with no logging inside them: console output waits on
    // the host, so only log-free spans repeat exactly under -icount.
    let t0 = hal::timer::ticks();
    let frames = mm::init_frames(platform, dtb_addr)?;
    let t1 = hal::timer::ticks();
    defmt::info!(
        "page array: {=u64} frames, {=u64} KiB at {=u64:#x} (8 bytes/frame); {=u64} MiB free",
        frames.frames,
        frames.storage_bytes >> 10,
        frames.storage.0,
        (frames.free * memdesc::PAGE_SIZE) >> 20
    );
    let t2 = hal::timer::ticks();
    let probe = hal::mmu::Probe::read();
    defmt::info!(
        "CPU: MIDR {=u64:#010x}, HAFDBS {=u8}, TLBI {=u8}, BBM {=u8}, TTL {=bool}, {=u8}-bit PA",
        probe.midr,
        probe.hafdbs,
        probe.tlb,
        probe.bbm,
        probe.ttl,
        probe.pa_bits()
    );
    let report = mm::init_stage1(platform, &probe)?;
    let t3 = hal::timer::ticks();
    defmt::info!("MMU on: identity map of RAM, image W^X, stack guard pages unmapped");
    mm::log_map_report(&report);
    defmt::info!(
        "bring-up time: page array and allocator {=u64} ns, stage-1 map and MMU on {=u64} ns",
        hal::timer::ticks_to_ns(t1 - t0),
        hal::timer::ticks_to_ns(t3 - t2)
    );
    Ok(())
}
