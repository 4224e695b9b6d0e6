//! Everything that touches hardware, for AArch64 boards: boot and exception
//! levels, vectors and crash reports, system registers (`aarch64-cpu`), MMIO
//! (`tock-registers`), the console UARTs, the GIC and interrupt dispatch, the
//! generic timer, PSCI and semihosting, the defmt logger, TLB maintenance and
//! the MMU switch-on, the raw memory `memdesc` works on (the page array's
//! home, table entries, the frame allocator and stage-1 globals), secondary
//! cores, virtio-mmio, the resident loader's entry, and board descriptions.
//!
//! Modules that touch hardware exist only when building for the bare-metal
//! target (`cfg(hw)`, set by build.rs); the pure parts (device tree parsing,
//! syndrome decoding, board tables, exit codes) build and are tested on the host.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod board;
pub mod dtb;
pub mod esr;
pub mod exit;
pub mod irq;
pub mod loader_proto;
pub mod memprobe;
pub mod midr;

#[cfg(hw)]
pub mod boot;
pub mod cache;
#[cfg(hw)]
pub mod cadence_uart;
#[cfg(hw)]
pub mod console;
#[cfg(hw)]
pub mod discover;
#[cfg(hw)]
pub mod exception;
#[cfg(hw)]
pub mod global;
#[cfg(hw)]
pub mod image;
#[cfg(hw)]
pub mod imx_uart;
#[cfg(all(hw, feature = "loader"))]
pub mod loader;
#[cfg(hw)]
mod logger;
#[cfg(hw)]
pub mod mailbox;
#[cfg(hw)]
pub mod memory;
#[cfg(hw)]
pub mod mini_uart;
#[cfg(hw)]
pub mod mmio;
#[cfg(hw)]
pub mod mmu;
#[cfg(hw)]
pub mod percpu;
#[cfg(hw)]
pub mod power;
#[cfg(hw)]
pub mod semihost;
pub mod semihost_console;
#[cfg(hw)]
pub mod smp;
#[cfg(hw)]
pub mod timer;
#[cfg(hw)]
pub mod uart;
#[cfg(hw)]
pub mod virtio;

/// The platform the boot uses: see [`discover::discover`] for the order of
/// sources (DTB in x0, DTB at the start of RAM, the board's own source, the
/// board's default). A DTB is validated before any of it is trusted, and
/// what it says is checked against the board ([`dtb::parse_for_board`]).
#[cfg(hw)]
pub fn boot_dtb() -> Result<dtb::Platform<'static>, dtb::DtbError> {
    discover::discover().map(|d| d.platform)
}

/// The DTB blob at `addr` the way the boot reads it: its header's
/// `totalsize` (at most [`dtb::MAX_DTB_SIZE`], else
/// [`dtb::DtbError::Oversized`]) bytes, not yet validated.
///
/// # Safety
///
/// `addr` is non-zero, 8-byte aligned and readable for 8 bytes, and for as
/// many bytes as the header there claims (up to [`dtb::MAX_DTB_SIZE`]);
/// those bytes are never written afterwards (the result borrows them for
/// `'static`).
#[cfg(hw)]
pub unsafe fn dtb_blob_at(addr: u64) -> Result<&'static [u8], dtb::DtbError> {
    // SAFETY: the caller guarantees 8 readable bytes at `addr`.
    let header = unsafe { core::slice::from_raw_parts(addr as *const u8, 8) };
    let size = dtb::blob_size(header, dtb::MAX_DTB_SIZE)?;
    // SAFETY: the caller guarantees `size` readable bytes (bounded to
    // MAX_DTB_SIZE above) that are never written, so a shared 'static slice
    // is sound.
    Ok(unsafe { core::slice::from_raw_parts(addr as *const u8, size) })
}

/// [`dtb_blob_at`], then the validated, board-checked platform.
///
/// # Safety
///
/// As for [`dtb_blob_at`].
#[cfg(hw)]
pub unsafe fn dtb_at(addr: u64) -> Result<dtb::Platform<'static>, dtb::DtbError> {
    // SAFETY: forwarded from the caller.
    let blob = unsafe { dtb_blob_at(addr) }?;
    dtb::parse_for_board(blob, &board::CURRENT)
}

/// Defines the firmware's `main`, the symbol the boot path calls on the boot
/// core at EL1 once BSS, the stacks and the vectors are set up, as a call
/// of `$f: fn() -> !`. (The symbol export is the only unsafe attribute
/// a firmware binary needs; the macro keeps it out of crates that deny
/// unsafe code.)
#[macro_export]
macro_rules! entry {
    ($f:path) => {
        // The boot path (hal::boot) calls exactly one `main`, defined here.
        #[allow(unsafe_code)]
        #[export_name = "main"]
        extern "C" fn __hal_entry_main() -> ! {
            let f: fn() -> ! = $f;
            f()
        }
    };
}

/// [`dtb_blob_at`] for a blob already in memory as a slice: its header's
/// `totalsize` bytes (at most [`dtb::MAX_DTB_SIZE`], else
/// [`dtb::DtbError::Oversized`], decided from the header alone), not yet
/// validated.
pub fn dtb_in(blob: &[u8]) -> Result<&[u8], dtb::DtbError> {
    let size = dtb::blob_size(blob, dtb::MAX_DTB_SIZE)?;
    blob.get(..size).ok_or(dtb::DtbError::Truncated {
        have: blob.len(),
        need: size,
    })
}
