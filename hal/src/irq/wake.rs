//! Waking a secondary core that sleeps in WFI: one software-generated
//! interrupt per request, acknowledged by the sleeping core itself.
//!
//! A secondary idles in WFI only once it can be woken, which it sets up
//! itself ([`prepare`], on its own core: the GIC's banked and per-PE state
//! is only reachable from there). A request that needs it (an offline
//! request, a job) then raises [`WAKE_SGI`] at it ([`wake`]):
//!
//! - GICv2 (IHI 0048B, 4.3.15 GICD_SGIR): a write of the target's CPU
//!   interface bit, which the core read from its banked GICD_ITARGETSR0
//!   (4.3.12: ITARGETSR0-7 read as the reading core's own bit);
//! - GICv3 (IHI 0069, 12.2.22 ICC_SGI1R_EL1): the target's affinity;
//! - the Pi 3's BCM2836 local controller (no GIC; QA7 rev 3.4, 4.7 and
//!   4.11): bit [`WAKE_SGI`] of the target's mailbox 0, whose interrupt
//!   the core enabled.
//!
//! The sleeping core never takes the interrupt as an exception: its IRQs
//! stay masked (PSTATE.I), and a pending IRQ ends a WFI all the same (Arm
//! ARM DDI 0487, D1.7.2.1 "WFI wakeup events"). Back from WFI it
//! acknowledges and ends whatever is pending ([`acknowledge`]) before it
//! looks at its request flags, so a request whose interrupt arrived after
//! that look stays pending and ends the next WFI at once: no wake-up is
//! lost. The requester raises the interrupt only after its flag store has
//! completed (`DSB`).
//!
//! None of this touches the boot core's driver state (`super::gic`): a
//! secondary uses its own banked GICv2 registers, its own GICv3
//! redistributor and system registers, or its own local-controller
//! registers; the shared writes (GICD_SGIR, another core's mailbox set
//! register) are single write-only stores.

use super::devicetree::{GicDescription, GicRegisters};
use crate::percpu::MAX_CPUS;
use arm_gic::gicv3::{GicCpuInterface, SgiTarget, SgiTargetGroup};
use arm_gic::{IntId, InterruptGroup};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// The SGI that wakes a sleeping core. Never dispatched to a handler: only
/// secondaries enable it, and they acknowledge it themselves.
pub const WAKE_SGI: u32 = 15;

/// Priority of [`WAKE_SGI`] (above the open priority mask 0xff).
const PRIORITY: u8 = 0x80;

const KIND_NONE: u8 = 0;
const KIND_V2: u8 = 2;
const KIND_V3: u8 = 3;
const KIND_LOCAL: u8 = 4;

/// Which controller [`publish`] saw ([`KIND_NONE`] before).
static KIND: AtomicU8 = AtomicU8::new(KIND_NONE);
/// GICD (GICv2, GICv3) or the local block (BCM2836).
static BASE: AtomicU64 = AtomicU64::new(0);
/// GICC (GICv2) or the first redistributor (GICv3).
static BASE2: AtomicU64 = AtomicU64::new(0);
/// Size of the GICv3 redistributor window.
static SIZE2: AtomicU64 = AtomicU64::new(0);
/// Per core: how to reach it, 0 while it cannot be woken. Bit 63 set when
/// prepared; GICv2: bits 7:0 its CPU interface bit; GICv3 and the local
/// controller: bits 39:0 its MPIDR affinity.
static TARGET: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per core: its GICv3 system-register interface is enabled (it may send).
static SENDER: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

const PREPARED: u64 = 1 << 63;

/// Why a core cannot be woken (it then waits with WFE instead of WFI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum WakeError {
    /// No interrupt controller brought up yet ([`super::init`]).
    NoController,
    /// GICv2: GICD_ITARGETSR0 reads as zero on this core (a uniprocessor
    /// GIC has no CPU interface numbers).
    NoCpuInterface,
    /// GICv3: no redistributor in the window has this affinity.
    NoRedistributor(u64),
    /// GICv3: GICR_WAKER.ChildrenAsleep stayed set.
    RedistributorAsleep,
    /// The BCM2836 local controller serves cores 0-3; this is another.
    CoreOutOfRange(u64),
    /// The core has not prepared itself to be woken (it is not in WFI).
    NotPrepared(usize),
}

/// Records the controller [`super::init`] brought up, for secondaries.
/// Called on the core that brought it up (its own interface is set up).
pub(super) fn publish(desc: &GicDescription) {
    let kind = match desc.registers {
        GicRegisters::V2 {
            distributor,
            cpu_interface,
        } => {
            BASE.store(distributor.base, Ordering::Relaxed);
            BASE2.store(cpu_interface.base, Ordering::Relaxed);
            KIND_V2
        }
        GicRegisters::V3 {
            distributor,
            redistributors,
        } => {
            BASE.store(distributor.base, Ordering::Relaxed);
            BASE2.store(redistributors.base, Ordering::Relaxed);
            SIZE2.store(redistributors.size, Ordering::Relaxed);
            // `Gic::new` enabled this core's ICC_SRE_EL1.SRE.
            SENDER[crate::percpu::index()].store(true, Ordering::Relaxed);
            KIND_V3
        }
        GicRegisters::Bcm2836Local { local } => {
            BASE.store(local.base, Ordering::Relaxed);
            KIND_LOCAL
        }
    };
    // Release: pairs with the Acquire load of KIND in `prepare` and
    // `wake`, so the bases stored above are seen with the kind.
    KIND.store(kind, Ordering::Release);
    // Cores waiting with WFE for the controller look again.
    aarch64_cpu::asm::sev();
}

fn affinity() -> u64 {
    use aarch64_cpu::registers::{Readable, MPIDR_EL1};
    MPIDR_EL1.get() & 0xff_00ff_ffff
}

/// # Safety
///
/// `addr` is a 32-bit register of the published controller, mapped Device
/// memory at its own address, that this core may read.
unsafe fn read32(addr: u64) -> u32 {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// # Safety
///
/// As [`read32`], for a write that affects only this core's view of the
/// controller (banked or per-core registers) or raises a wake interrupt.
unsafe fn write32(addr: u64, v: u32) {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// # Safety
///
/// As [`write32`], for a byte-accessible register (GICD_IPRIORITYR,
/// GICR_IPRIORITYR).
unsafe fn write8(addr: u64, v: u8) {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

/// Sets this core (`index`, the caller) up to be woken from WFI by
/// [`wake`]: [`WAKE_SGI`] enabled at [`PRIORITY`] in its banked GICv2
/// registers / its GICv3 redistributor, its CPU interface on with the
/// priority mask open (or its local-controller mailbox 0 interrupt on).
/// Call with IRQs masked on the core itself; repeating it is harmless.
pub fn prepare(index: usize) -> Result<(), WakeError> {
    let slot = TARGET.get(index).ok_or(WakeError::NotPrepared(index))?;
    // Acquire: pairs with the Release store of KIND in `publish`.
    let kind = KIND.load(Ordering::Acquire);
    let base = BASE.load(Ordering::Relaxed);
    let base2 = BASE2.load(Ordering::Relaxed);
    let bit = 1u32 << WAKE_SGI;
    let target = match kind {
        KIND_V2 => {
            // SAFETY: the published GICv2's distributor and CPU interface,
            // mapped Device by `memory::init_interrupts` before `init`. The
            // registers written are banked per core (GICD_ISENABLER0,
            // GICD_IPRIORITYR0-7, GICC_*): this core's own copies, which
            // the boot core's driver never sees.
            unsafe {
                let me = u64::from(core::ptr::read_volatile((base + 0x800) as *const u8));
                if me == 0 {
                    return Err(WakeError::NoCpuInterface);
                }
                write8(base + 0x400 + u64::from(WAKE_SGI), PRIORITY);
                write32(base + 0x100, bit); // GICD_ISENABLER0
                write32(base2 + 0x04, 0xff); // GICC_PMR
                write32(base2, 1); // GICC_CTLR: this core's group enabled
                me
            }
        }
        KIND_V3 => {
            let aff = affinity();
            let rd = redistributor(base2, SIZE2.load(Ordering::Relaxed), aff)?;
            // SAFETY: `rd` is this core's own redistributor (its
            // GICR_TYPER affinity is ours), mapped Device with the window.
            unsafe {
                let waker = rd + 0x14;
                write32(waker, read32(waker) & !(1 << 1)); // ProcessorSleep
                let mut n = 0;
                while read32(waker) & (1 << 2) != 0 {
                    n += 1;
                    if n > 1_000_000 {
                        return Err(WakeError::RedistributorAsleep);
                    }
                    core::hint::spin_loop();
                }
                let sgi = rd + 0x1_0000;
                write32(sgi + 0x80, read32(sgi + 0x80) | bit); // GICR_IGROUPR0
                write8(sgi + 0x400 + u64::from(WAKE_SGI), PRIORITY);
                write32(sgi + 0x100, bit); // GICR_ISENABLER0
            }
            GicCpuInterface::enable_system_register_el1();
            // SAFETY: ICC_CTLR_EL1 = 0 (EOImode 0: an EOI also
            // deactivates), as the boot core's driver has it; this core's
            // CPU interface only, no memory touched.
            unsafe { core::arch::asm!("msr S3_0_C12_C12_4, xzr", "isb", options(nostack, nomem)) };
            GicCpuInterface::set_priority_mask(0xff);
            GicCpuInterface::enable_group1(true);
            SENDER[index].store(true, Ordering::Relaxed);
            aff
        }
        KIND_LOCAL => {
            let core = affinity() & 0xff;
            if core > 3 {
                return Err(WakeError::CoreOutOfRange(core));
            }
            // SAFETY: the published local block; this core's mailbox
            // interrupt control (0x50 + 4 core), which only this core
            // writes (the boot core's driver touches core 0's only).
            unsafe {
                let ctl = base + 0x50 + 4 * core;
                write32(ctl, read32(ctl) | 1); // mailbox 0 raises IRQ
            }
            affinity()
        }
        _ => return Err(WakeError::NoController),
    };
    // Release: pairs with the Acquire load of TARGET in `wake`, so a
    // waker sees this core's set-up done.
    slot.store(target | PREPARED, Ordering::Release);
    Ok(())
}

/// The redistributor (RD_base) in `[base, base + size)` whose GICR_TYPER
/// affinity is `aff` (MPIDR layout).
fn redistributor(base: u64, size: u64, aff: u64) -> Result<u64, WakeError> {
    let want = (aff >> 32) << 24 | (aff & 0xff_ffff);
    let mut rd = base;
    while rd + 0x2_0000 <= base + size {
        // SAFETY: GICR_TYPER (RD_base + 0x08, read as two words) of a frame
        // inside the published redistributor window; reading it has no
        // side effect.
        let (lo, hi) = unsafe { (read32(rd + 0x08), read32(rd + 0x0c)) };
        if u64::from(hi) == want {
            return Ok(rd);
        }
        if lo & (1 << 4) != 0 {
            break; // Last
        }
        // RD_base and SGI_base, plus two VLPI frames with GICv4 (VLPIS).
        rd += if lo & (1 << 1) != 0 {
            0x4_0000
        } else {
            0x2_0000
        };
    }
    Err(WakeError::NoRedistributor(aff))
}

/// Core `index` can no longer be woken (it is going offline): a later
/// [`wake`] does nothing until it prepares itself again.
pub fn forget(index: usize) {
    if let Some(t) = TARGET.get(index) {
        // Release: pairs with the Acquire load in `wake`.
        t.store(0, Ordering::Release);
    }
}

/// Whether core `index` has prepared itself to be woken.
pub fn prepared(index: usize) -> bool {
    // Acquire: pairs with the Release stores of TARGET in `prepare` and
    // `forget`.
    TARGET
        .get(index)
        .is_some_and(|t| t.load(Ordering::Acquire) & PREPARED != 0)
}

/// Raises [`WAKE_SGI`] at core `index` if it has prepared itself; the
/// caller's earlier memory writes complete before it is raised.
pub fn wake(index: usize) -> Result<(), WakeError> {
    // Acquire: pairs with the Release store in `prepare`.
    let t = TARGET.get(index).map_or(0, |t| t.load(Ordering::Acquire));
    if t & PREPARED == 0 {
        return Err(WakeError::NotPrepared(index));
    }
    // Acquire: pairs with the Release store of KIND in `publish`.
    let kind = KIND.load(Ordering::Acquire);
    let base = BASE.load(Ordering::Relaxed);
    // The request (a flag in memory) is visible before the interrupt.
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
    match kind {
        KIND_V2 => {
            // SAFETY: GICD_SGIR of the published GICv2, a write-only
            // register: TargetListFilter 0 (the list), CPUTargetList the
            // target's interface bit, NSATT 0 (ignored for our Non-secure
            // writes), SGIINTID the wake SGI.
            unsafe { write32(base + 0xf00, ((t as u32 & 0xff) << 16) | WAKE_SGI) };
        }
        KIND_V3 => {
            let me = crate::percpu::index();
            if !SENDER.get(me).is_some_and(|s| s.load(Ordering::Relaxed)) {
                // ICC_SGI1R_EL1 needs this core's system registers on.
                prepare(me)?;
            }
            let target = SgiTarget::List {
                affinity3: (t >> 32) as u8,
                affinity2: (t >> 16) as u8,
                affinity1: (t >> 8) as u8,
                target_list: 1 << (t & 0xf),
            };
            let id = IntId::sgi(WAKE_SGI);
            let _ = GicCpuInterface::send_sgi(id, target, SgiTargetGroup::CurrentGroup1);
        }
        KIND_LOCAL => {
            // SAFETY: the target core's mailbox 0 write-set register
            // (0x80 + 16 core) of the published local block: setting a bit
            // raises its mailbox interrupt and touches nothing else.
            unsafe { write32(base + 0x80 + 16 * (t & 0x3), 1 << WAKE_SGI) };
        }
        _ => return Err(WakeError::NoController),
    }
    Ok(())
}

/// Back from WFI on a prepared core: acknowledges and ends every pending
/// interrupt of this core (only [`WAKE_SGI`] is enabled on it), so the
/// next WFI sleeps; then the request flags the caller reads next are
/// ordered after it.
pub fn acknowledge(index: usize) {
    if !prepared(index) {
        return;
    }
    let kind = KIND.load(Ordering::Acquire);
    let base = BASE.load(Ordering::Relaxed);
    let base2 = BASE2.load(Ordering::Relaxed);
    match kind {
        KIND_V2 => {
            for _ in 0..64 {
                // SAFETY: this core's banked GICC_IAR / GICC_EOIR: the
                // read acknowledges its highest pending interrupt, the
                // write of the same value ends it.
                unsafe {
                    let iar = read32(base2 + 0x0c);
                    if iar & 0x3ff >= 1020 {
                        break;
                    }
                    write32(base2 + 0x10, iar);
                }
            }
        }
        KIND_V3 => {
            for _ in 0..64 {
                match GicCpuInterface::get_and_acknowledge_interrupt(InterruptGroup::Group1) {
                    Some(id) if u32::from(id) < 1020 => {
                        GicCpuInterface::end_interrupt(id, InterruptGroup::Group1)
                    }
                    _ => break,
                }
            }
        }
        KIND_LOCAL => {
            let core = affinity() & 0x3;
            // SAFETY: this core's mailbox 0 read / write-clear register:
            // every bit read is cleared (nothing but wake-ups is sent to a
            // secondary), which lowers its mailbox interrupt.
            unsafe {
                let clr = base + 0xc0 + 16 * core;
                let bits = read32(clr);
                if bits != 0 {
                    write32(clr, bits);
                }
            }
        }
        _ => {}
    }
    // The flag loads that follow see what a requester wrote before it
    // raised the interrupt just acknowledged.
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}
