//! Everything that touches hardware, for AArch64 boards: boot and exception
//! levels, vectors and crash reports, system registers (`aarch64-cpu`), MMIO
//! (`tock-registers`), the console UART, the generic timer, PSCI and
//! semihosting, the defmt logger, and board descriptions.
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
pub mod memprobe;
pub mod midr;

#[cfg(hw)]
pub mod boot;
pub mod cache;
#[cfg(hw)]
pub mod exception;
#[cfg(hw)]
pub mod image;
#[cfg(hw)]
mod logger;
#[cfg(hw)]
pub mod mmu;
#[cfg(hw)]
pub mod power;
#[cfg(hw)]
pub mod semihost;
pub mod semihost_console;
#[cfg(hw)]
pub mod timer;
#[cfg(hw)]
pub mod uart;

/// Reads the device tree the loader left for us: the address in x0 if it holds
/// a DTB, else the board's fallback address. The blob is validated before any
/// of it is trusted, and what it says is checked against the board
/// ([`dtb::parse_for_board`]).
#[cfg(hw)]
pub fn boot_dtb() -> Result<dtb::Platform<'static>, dtb::DtbError> {
    // SAFETY: boot_dtb_address returns an 8-byte aligned address in RAM
    // (x0 when it holds a DTB header, else the board's fallback in RAM),
    // and the loader's blob there is never written.
    unsafe { dtb_at(boot_dtb_address()) }
}

/// Reads the DTB at `addr` the way the boot does: its header's `totalsize`
/// (at most [`dtb::MAX_DTB_SIZE`], else [`dtb::DtbError::Oversized`]), then
/// the validated, board-checked blob.
///
/// # Safety
///
/// `addr` is 8-byte aligned and readable for 8 bytes, and for as many bytes
/// as the header there claims (up to [`dtb::MAX_DTB_SIZE`]); those bytes
/// are never written afterwards (the result borrows them for `'static`).
#[cfg(hw)]
pub unsafe fn dtb_at(addr: u64) -> Result<dtb::Platform<'static>, dtb::DtbError> {
    // SAFETY: the caller guarantees 8 readable bytes at `addr`.
    let header = unsafe { core::slice::from_raw_parts(addr as *const u8, 8) };
    let size = dtb::blob_size(header, dtb::MAX_DTB_SIZE)?;
    // SAFETY: the caller guarantees `size` readable bytes (bounded to
    // MAX_DTB_SIZE above) that are never written, so a shared 'static slice
    // is sound.
    let blob = unsafe { core::slice::from_raw_parts(addr as *const u8, size) };
    dtb::parse_for_board(blob, &board::CURRENT)
}

/// Where the boot DTB is: the address in x0 if it holds a DTB header, else
/// the board's fallback address.
#[cfg(hw)]
pub fn boot_dtb_address() -> u64 {
    let hint = boot::dtb_hint();
    let looks_valid = |addr: u64| {
        // SAFETY: only addresses at or above the board's RAM base are read
        // (x0 from a loader points into RAM when it points at a DTB at all),
        // RAM is identity mapped or the MMU is off, and 8 bytes are read.
        addr >= board::CURRENT.ram_base
            && addr.is_multiple_of(8)
            && dtb::claimed_size(unsafe { core::slice::from_raw_parts(addr as *const u8, 8) })
                .is_ok()
    };
    if looks_valid(hint) {
        hint
    } else {
        board::CURRENT.dtb_fallback
    }
}
