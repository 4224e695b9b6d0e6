//! The firmware's init sequence and services, shared by the bootable binary
//! and the on-target test suites (which bring the machine up the same way).
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod selftest;

use hal::dtb::Platform;

/// Brings the machine up to the point where the memory manager can start:
/// console, boot facts, device tree (validated; a bad one ends the run with
/// [`hal::exit::BAD_DTB`] after printing the typed error).
pub fn init() -> Platform<'static> {
    defmt::info!(
        "firmware {=str} on {=str}: entered at EL{=u8}, running at EL{=u8}",
        env!("CARGO_PKG_VERSION"),
        hal::board::CURRENT.name,
        hal::boot::entry_el(),
        hal::boot::current_el()
    );
    let platform = match hal::boot_dtb() {
        Ok(p) => p,
        Err(e) => {
            defmt::error!("device tree unusable: {}", e);
            hal::power::exit(hal::exit::BAD_DTB)
        }
    };
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
    platform
}
