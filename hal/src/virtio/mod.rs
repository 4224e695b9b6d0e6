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

pub use virtio_drivers;

use crate::dtb::{Platform, VirtioMmio};
use core::ptr::NonNull;
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
    let mut first_err = ProbeError::NotFound;
    for v in platform.virtio_mmio() {
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
