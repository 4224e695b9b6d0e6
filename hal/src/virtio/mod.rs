//! virtio over MMIO (virtio 1.2, 4.2): finding a device among the
//! transports the device tree names, and the balloon device on top of the
//! `virtio-drivers` crate's `MmioTransport` and `VirtQueue`.
//!
//! QEMU `virt` names 32 transports; empty ones read device ID 0. The device
//! ID is read from the header here rather than through `virtio-drivers`'
//! `DeviceType`, which maps ID 5 (the traditional balloon) and 13 to the
//! same variant. Only modern
//! (version 2) transports are used: with `-global
//! virtio-mmio.force-legacy=false` QEMU presents them, and a legacy one is
//! reported as [`ProbeError::Legacy`].

pub mod balloon;
pub mod irq;
pub mod linear;

pub use virtio_drivers;

use crate::dtb::{Platform, VirtioMmio};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion, VirtIOHeader};

/// virtio device ID of the traditional memory balloon (virtio 1.2, 5).
pub const DEVICE_ID_BALLOON: u32 = 5;
/// "virt" little-endian (virtio 1.2, 4.2.2).
const MAGIC: u32 = 0x7472_6976;

/// Why no usable transport was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum ProbeError {
    /// No transport holds a device of the type asked for.
    NotFound,
    /// The device is there but behind a legacy (version 1) transport.
    Legacy {
        /// Its register window.
        base: u64,
    },
    /// A transport's header is unusable (bad magic, unknown version, window
    /// too small); the first such one.
    BadHeader {
        /// Its register window.
        base: u64,
    },
    /// The window is not mapped as Device memory at its own address.
    NotMapped {
        /// Its register window.
        base: u64,
    },
    /// The device's transport was claimed already.
    AlreadyClaimed {
        /// Its register window.
        base: u64,
    },
}

/// Transports handed out by [`claim`], by their position among the tree's
/// virtio-mmio nodes (a transport is used through one `MmioTransport`
/// only). One flag per node, so two claims of one device race on the same
/// flag and exactly one wins.
static CLAIMED: [AtomicBool; crate::dtb::MAX_VIRTIO] =
    [const { AtomicBool::new(false) }; crate::dtb::MAX_VIRTIO];

/// What `AT S1E1R` says about `va` (Arm ARM D8.2.13 "Address translation instructions", PAR_EL1): `Some(attr)`
/// (the MAIR-format attribute byte) when it translates to itself, `None`
/// when it faults or goes elsewhere.
fn identity_attr(va: u64) -> Option<u8> {
    let par: u64;
    // SAFETY: an address translation instruction reads the tables and
    // writes PAR_EL1 only; it accesses no memory at `va` and cannot fault.
    unsafe {
        core::arch::asm!(
            "at s1e1r, {va}",
            "isb",
            "mrs {par}, par_el1",
            va = in(reg) va,
            par = out(reg) par,
            options(nostack, preserves_flags),
        )
    };
    let pa = par & 0x0000_ffff_ffff_f000;
    (par & 1 == 0 && pa == va & !0xfff).then_some((par >> 56) as u8)
}

/// Whether `[base, base + size)` is mapped as Device memory (MAIR
/// attribute `0b0000_xx00`) at its own address, page by page.
pub fn is_identity_device(base: u64, size: u64) -> bool {
    let end = base.saturating_add(size.max(1));
    let mut va = base & !0xfff;
    while va < end {
        match identity_attr(va) {
            Some(attr) if attr & 0xf0 == 0 => {}
            _ => return false,
        }
        va += 0x1000;
    }
    true
}

/// Whether `va` does not translate at all (a read of it faults).
pub fn is_unmapped(va: u64) -> bool {
    let par: u64;
    // SAFETY: as in `identity_attr`.
    unsafe {
        core::arch::asm!(
            "at s1e1r, {va}",
            "isb",
            "mrs {par}, par_el1",
            va = in(reg) va,
            par = out(reg) par,
            options(nostack, preserves_flags),
        )
    };
    par & 1 == 1
}

/// Reads the 64-bit word at `va` after checking that `va` is unmapped, so
/// the read faults and the exception handler reports it and ends the run
/// (a self-test of the crash report). Returns what was read if it did not
/// fault, or `None` when `va` is mapped (nothing is read then).
pub fn read_unmapped_on_purpose(va: u64) -> Option<u64> {
    if !is_unmapped(va & !7) {
        return None;
    }
    // SAFETY: `va` has no translation (checked just above with IRQs
    // irrelevant: nothing maps it meanwhile on this core), so the read
    // cannot touch memory; it takes a data abort whose handler reports it
    // and exits.
    Some(unsafe { core::ptr::read_volatile((va & !7) as *const u64) })
}

/// Opens the transport of the first modern virtio-mmio device whose
/// device ID is `device_id`, after checking that every window it reads is
/// mapped as Device memory at its own address; the returned transport's
/// window is claimed, so a second `claim` of it is refused.
pub fn claim(platform: &Platform<'_>, device_id: u32) -> Result<Claimed, ProbeError> {
    for v in platform.virtio_mmio() {
        if !is_identity_device(v.region.base, v.region.size.min(0x1000)) {
            return Err(ProbeError::NotMapped {
                base: v.region.base,
            });
        }
    }
    let nodes = platform.virtio_mmio();
    let flag = |base: u64| {
        nodes
            .iter()
            .position(|n| n.region.base == base)
            .and_then(|k| CLAIMED.get(k))
    };
    // Acquire: pairs with the AcqRel compare_exchange of CLAIMED below
    // (in an earlier `claim`).
    let claimed = |base: u64| flag(base).is_some_and(|c| c.load(Ordering::Acquire));
    // SAFETY: every window is mapped Device memory (checked above); the
    // windows already claimed are skipped below, and `find` only reads
    // the header registers of the others, which no transport owns.
    let (t, v) = unsafe { find_unclaimed(platform, device_id, &claimed) }?;
    // AcqRel on success, Acquire on failure: pairs with the Acquire loads
    // in `claimed` and the compare_exchange of a racing `claim` of the same
    // node (the loser sees the winner's flag and is refused).
    let won = flag(v.region.base).is_some_and(|c| {
        c.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    });
    if !won {
        return Err(ProbeError::AlreadyClaimed {
            base: v.region.base,
        });
    }
    Ok(Claimed {
        transport: t,
        window: v,
    })
}

/// A transport [`claim`] handed out: its window is used through it only.
pub struct Claimed {
    pub(crate) transport: MmioTransport<'static>,
    window: VirtioMmio,
}

impl Claimed {
    /// The transport's device-tree node (window, interrupt).
    pub fn window(&self) -> VirtioMmio {
        self.window
    }
}

/// Opens the transport of the first modern virtio-mmio device whose device
/// ID is `device_id`.
///
/// # Safety
///
/// Every transport window in `platform` must be mapped as Device memory
/// and not used by anything else while this runs; the window of the
/// returned transport must stay mapped and be used only through it (call
/// this once per device type).
pub unsafe fn find(
    platform: &Platform<'_>,
    device_id: u32,
) -> Result<(MmioTransport<'static>, VirtioMmio), ProbeError> {
    // SAFETY: the caller's contract.
    unsafe { find_unclaimed(platform, device_id, &|_| false) }
}

/// [`find`], skipping windows for which `skip` is true.
///
/// # Safety
///
/// As for [`find`], for the windows not skipped.
unsafe fn find_unclaimed(
    platform: &Platform<'_>,
    device_id: u32,
    skip: &dyn Fn(u64) -> bool,
) -> Result<(MmioTransport<'static>, VirtioMmio), ProbeError> {
    let mut first_err = ProbeError::NotFound;
    for v in platform.virtio_mmio() {
        if skip(v.region.base) {
            first_err = ProbeError::AlreadyClaimed {
                base: v.region.base,
            };
            continue;
        }
        let Some(header) = NonNull::new(v.region.base as *mut VirtIOHeader) else {
            continue;
        };
        if v.region.size < 0x100 {
            continue;
        }
        let reg = |off: usize| {
            // SAFETY: the caller guarantees the window is mapped Device
            // memory and ours alone; offsets 0..0x100 are the header
            // registers (checked size above), read as aligned 32-bit words.
            unsafe { core::ptr::read_volatile(header.cast::<u32>().as_ptr().add(off / 4)) }
        };
        let (magic, version, id) = (reg(0), reg(4), reg(8));
        if magic != MAGIC || !(1..=2).contains(&version) {
            if first_err == ProbeError::NotFound {
                first_err = ProbeError::BadHeader {
                    base: v.region.base,
                };
            }
            continue;
        }
        if id != device_id {
            continue;
        }
        // SAFETY: as above; `size` is the window's size from the device tree.
        match unsafe { MmioTransport::new(header, v.region.size as usize) } {
            Ok(t) if t.version() == MmioVersion::Modern => return Ok((t, *v)),
            Ok(_) => {
                first_err = ProbeError::Legacy {
                    base: v.region.base,
                }
            }
            Err(_) => {
                first_err = ProbeError::BadHeader {
                    base: v.region.base,
                }
            }
        }
    }
    Err(first_err)
}
