//! Handing the GIC to the Non-secure world, done once at EL3 before the drop
//! to Non-secure EL1 (GICv2 IHI 0048B, 4.1.4 "GIC Security Extensions";
//! GICv3 IHI 0069, 4.7 "Interrupt grouping and security", 12.9.4 GICD_CTLR.DS).
//!
//! A GIC with two security states resets every interrupt to the Secure
//! group, which Non-secure EL1 can neither take nor regroup. Entered at EL3
//! (`secure=on`, Raspberry Pi), we are the Secure firmware, so we give
//! everything away: on a GICv2 every interrupt goes to Group 1 (Non-secure)
//! with both groups enabled; on a GICv3 security is disabled outright
//! (GICD_CTLR.DS = 1), so the GIC has one security state, as under QEMU
//! without `secure=on`.

use super::devicetree::{GicRegisters, IrqDtError};
use core::sync::atomic::{AtomicBool, Ordering};

/// Set once the handover succeeded: the Non-secure driver then accepts a
/// GICv2 whose Security Extensions are on.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Whether [`hand_over_at_el3`] gave the interrupts to the Non-secure world.
pub(super) fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::Relaxed)
}

/// Why the handover did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum HandoverError {
    /// The boot device tree names no usable GIC.
    DeviceTree(IrqDtError),
    /// A register window is at address 0.
    BadWindow,
    /// The GICv3 redistributor layout is not one the driver knows.
    RedistributorLayout,
}

/// The boot DTB as bytes (x0 if it holds a header, else the board's
/// fallback address), not yet validated; works with the MMU off or on (RAM
/// identity mapped).
pub fn boot_blob() -> Result<&'static [u8], IrqDtError> {
    let b = &crate::board::CURRENT;
    let hint = crate::boot::dtb_hint();
    let header_ok = |addr: u64| {
        // SAFETY: only non-zero, 8-byte aligned addresses at or above the
        // board's RAM base are read (x0 from a loader points into RAM when
        // it points at a DTB at all); the MMU is off and 8 bytes are read.
        addr != 0
            && addr >= b.ram_base
            && addr.is_multiple_of(8)
            && crate::dtb::blob_size(
                unsafe { core::slice::from_raw_parts(addr as *const u8, 8) },
                crate::dtb::MAX_DTB_SIZE,
            )
            .is_ok()
    };
    // A DTB at physical address 0 (RAM at 0) cannot be a slice here; such
    // boards (the Pis) have no Secure GIC set-up to do from a tree.
    let addr = [hint, b.dtb_fallback]
        .into_iter()
        .find(|&a| header_ok(a))
        .ok_or(IrqDtError::NoController)?;
    // SAFETY: `addr` holds a DTB header in RAM that the loader placed and
    // nothing writes; `dtb_blob_at` reads at most MAX_DTB_SIZE bytes, and
    // the blob is validated before it is read.
    unsafe { crate::dtb_blob_at(addr) }.map_err(IrqDtError::Dtb)
}

/// Gives every interrupt of the GIC the boot device tree (else the board
/// description) names to the Non-secure world.
///
/// # Safety
///
/// Runs at EL3 with the MMU off (the GIC's windows are reachable at their
/// physical addresses), before anything else touches the GIC, on the one
/// running core.
pub unsafe fn hand_over_at_el3() -> Result<(), HandoverError> {
    // The tree's GIC, else the board's (a ZCU102 entered at EL3 has a
    // GIC-400 with Security Extensions and no tree that says so).
    let desc = super::source::describe(boot_blob().ok(), &crate::board::CURRENT)
        .map_err(HandoverError::DeviceTree)?
        .gic;
    match desc.registers {
        GicRegisters::V2 {
            distributor,
            cpu_interface,
        } => {
            if distributor.base == 0 || cpu_interface.base == 0 {
                return Err(HandoverError::BadWindow);
            }
            // SAFETY: the tree's GIC windows, reachable with the MMU off;
            // this instance is dropped before the Non-secure driver makes
            // its own, so the two never alias.
            let mut gic = unsafe {
                arm_gic::gicv2::GicV2::new(distributor.base as *mut _, cpu_interface.base as *mut _)
            };
            if gic.typer().has_security_extension() {
                // Secure view: every GICD_IGROUPR bit 1 (Group 1 =
                // Non-secure), GICD_CTLR.EnableGrp1 set, the Secure
                // priority mask open.
                gic.setup();
                // GICD_IGROUPR0 and GICC_PMR are banked: secondaries entered
                // at EL3 hand over their own (`smp.rs`).
                crate::smp::note_secure_gicv2(distributor.base, cpu_interface.base);
            }
        }
        GicRegisters::V3 {
            distributor,
            redistributors,
        } => {
            let gicd =
                core::ptr::NonNull::new(distributor.base as *mut arm_gic::gicv3::registers::Gicd)
                    .ok_or(HandoverError::BadWindow)?;
            let gicr = core::ptr::NonNull::new(
                redistributors.base as *mut arm_gic::gicv3::registers::GicrSgi,
            )
            .ok_or(HandoverError::BadWindow)?;
            // SAFETY: as above; the GICD window holds a whole distributor.
            let gicd = unsafe { arm_gic::UniqueMmioPointer::new(gicd) };
            // SAFETY: as above; one core, dropped before the drop to EL1.
            let mut gic = unsafe { arm_gic::gicv3::GicV3::new(gicd, gicr, 1) }
                .map_err(|_| HandoverError::RedistributorLayout)?;
            gic.gicd_set_control(arm_gic::gicv3::registers::GicdCtlr::DS);
            gic.gicd_barrier();
        }
        // The BCM2836 local controller has no security states: IRQ or FIQ
        // is chosen per source, and the Non-secure driver picks IRQ.
        GicRegisters::Bcm2836Local { .. } => return Ok(()),
    }
    HANDED_OVER.store(true, Ordering::Relaxed);
    Ok(())
}
