//! The PE's side of interrupts: masking IRQs (PSTATE.I through DAIFSet /
//! DAIFClr) and sleeping until one is pending (Arm ARM DDI 0487, C5.2.3
//! "DAIF"; D1.7.2.1 "WFI wakeup events": a pending physical IRQ is a WFI
//! wake-up event even while PSTATE.I masks it).

use core::arch::asm;

/// PSTATE.I in DAIF (bit 7).
const DAIF_I: u64 = 1 << 7;

/// Masks IRQs; returns whether they were unmasked before, for
/// [`restore_irqs`].
#[inline]
pub fn mask_irqs() -> bool {
    let daif: u64;
    // SAFETY: reads DAIF and sets PSTATE.I; no memory is touched. The
    // compiler barrier (no `nomem`) keeps memory accesses of the critical
    // section from moving above the mask.
    unsafe {
        asm!("mrs {0}, daif", "msr daifset, #2", out(reg) daif, options(nostack, preserves_flags))
    };
    daif & DAIF_I == 0
}

/// Unmasks IRQs; a pending one is taken before the next instruction after
/// the ISB.
#[inline]
pub fn unmask_irqs() {
    // SAFETY: clears PSTATE.I; the ISB makes a pending interrupt be taken
    // here rather than later. Memory may change under us (handlers run), so
    // no `nomem`.
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack, preserves_flags)) };
}

/// Puts the IRQ mask back as [`mask_irqs`] found it.
#[inline]
pub fn restore_irqs(were_unmasked: bool) {
    if were_unmasked {
        unmask_irqs();
    }
}

/// Runs `f` with IRQs masked, then restores the mask.
pub fn without_irqs<R>(f: impl FnOnce() -> R) -> R {
    let was = mask_irqs();
    let r = f();
    restore_irqs(was);
    r
}

/// Sleeps until an interrupt is pending (or another wake-up event). The
/// `DSB SY` first makes every earlier memory access, such as a device
/// register write acknowledging an interrupt, complete before the core
/// stops. It returns with the interrupt still pending when IRQs are masked;
/// with IRQs unmasked the handler has run by the time it returns.
///
/// Called with IRQs unmasked, an interrupt arriving between the caller's
/// last check and the WFI is handled before the WFI, which then sleeps until
/// the next one: use [`wait_until`] to sleep on a condition without that race.
#[inline]
pub fn wait_for_interrupt() {
    // SAFETY: DSB and WFI have no effect on memory contents; interrupt
    // handlers may run afterwards, so no `nomem`.
    unsafe { asm!("dsb sy", "wfi", options(nostack, preserves_flags)) };
}

/// Sleeps in WFI until `ready()` is true. `ready` is checked with IRQs
/// masked, so an interrupt whose handler makes it true cannot slip in
/// between the check and the sleep; IRQs are unmasked after each wake-up to
/// run the handlers. Returns with the IRQ mask as it was on entry.
pub fn wait_until(mut ready: impl FnMut() -> bool) {
    let was = mask_irqs();
    while !ready() {
        wait_for_interrupt();
        unmask_irqs();
        mask_irqs();
    }
    restore_irqs(was);
}
