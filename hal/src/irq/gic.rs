//! The GIC itself, through the `arm-gic` crate: GICv2 (IHI 0048B, chapter 4
//! "Programmers' Model") and GICv3/v4 (IHI 0069, chapter 12), driven by
//! the boot core (secondaries only set up their wake-up SGI, `wake.rs`),
//! Non-secure EL1, every interrupt in the Non-secure group signalled as IRQ.
//!
//! What the crate leaves to us, and we do here: refusing a GIC whose
//! security extension is on (its interrupts reset to the Secure group, which
//! Non-secure EL1 can neither take nor regroup) unless we handed it over
//! ourselves at EL3 (`secure.rs`), checking the register
//! windows are large enough and the redistributor is ours, routing SPIs to
//! this PE (GICv3 GICD_IROUTER, GICv2 GICD_ITARGETSR), and the priority mask (GICv3 resets ICC_PMR_EL1 to 0,
//! which masks everything).

use super::bcm2836::{LocalError, LocalIntc};
use super::devicetree::{GicDescription, GicRegisters, Trigger};
use super::intid::{Intid, IntidClass};
use arm_gic::gicv2::GicV2;
use arm_gic::gicv3::{GicCpuInterface, GicV3, SgiTarget, SgiTargetGroup};
use arm_gic::{IntId, InterruptGroup, UniqueMmioPointer};
use core::ptr::NonNull;

/// Priority given to every interrupt we enable: one level, no preemption
/// (handlers run with IRQs masked anyway). Deliverable under a mask of 0xff
/// whatever number of priority bits the GIC implements.
const PRIORITY: u8 = 0x80;
/// Priority mask letting every priority but the lowest through.
const PRIORITY_MASK: u8 = 0xff;

/// Why the GIC cannot be used, or refused an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum GicError {
    /// A register window at address 0 or smaller than the registers.
    BadWindow {
        /// Base of the window.
        base: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// The GIC implements two security states (GICv2 Security Extensions,
    /// GICv3 GICD_CTLR.DS = 0): its interrupts are Secure at reset and only
    /// Secure software can give them to Non-secure EL1.
    SecurityEnabled,
    /// The first redistributor serves another PE (its GICR_TYPER affinity).
    ForeignRedistributor {
        /// Affinity the redistributor reports (MPIDR format).
        redistributor: u64,
        /// Our MPIDR_EL1 affinity.
        ours: u64,
    },
    /// The GICv3 redistributor frames have a layout the driver does not know.
    RedistributorLayout,
    /// An INTID this GIC cannot configure (an LPI, a special INTID, or an
    /// extended one on a GICv2).
    Unsupported(Intid),
    /// Setting the enable bit did not stick (the GIC implements fewer
    /// interrupts than the INTID needs).
    CannotEnable(Intid),
    /// The BCM2836 local controller serves cores 0-3; this core's MPIDR
    /// Aff0 is another.
    LocalCore(u64),
}

impl From<LocalError> for GicError {
    fn from(e: LocalError) -> Self {
        match e {
            LocalError::Core(c) => Self::LocalCore(c),
            LocalError::Unsupported(i) => Self::Unsupported(i),
        }
    }
}

/// The interrupt controller, whichever the tree or the board named: a GIC
/// of either version, or the Pi 3's BCM2836 local controller (no GIC; see
/// `bcm2836.rs` for how its sources map onto INTIDs).
pub(super) enum Gic {
    /// With the distributor's base, for GICD_ITARGETSR, which the crate
    /// does not drive.
    V2(GicV2<'static>, u64),
    V3(GicV3<'static>),
    Local(LocalIntc),
}

fn window<T>(base: u64, size: u64) -> Result<NonNull<T>, GicError> {
    let bad = GicError::BadWindow { base, size };
    if size < core::mem::size_of::<T>() as u64 || !base.is_multiple_of(4096) {
        return Err(bad);
    }
    NonNull::new(base as *mut T).ok_or(bad)
}

fn our_affinity() -> u64 {
    use aarch64_cpu::registers::{Readable, MPIDR_EL1};
    // Aff0-Aff2 in bits 23:0, Aff3 in bits 39:32 (the layout core_mpidr uses).
    MPIDR_EL1.get() & 0xff_00ff_ffff
}

fn crate_intid(intid: Intid) -> Result<IntId, GicError> {
    IntId::try_from(intid.raw()).map_err(|_| GicError::Unsupported(intid))
}

impl Gic {
    /// Brings the distributor and this PE's interface up with every
    /// interrupt disabled and in the Non-secure group.
    ///
    /// # Safety
    ///
    /// `desc`'s register windows are the GIC's, mapped as Device memory at
    /// their physical addresses, and nothing else accesses them while the
    /// returned value lives.
    pub(super) unsafe fn new(desc: &GicDescription) -> Result<Self, GicError> {
        match desc.registers {
            GicRegisters::V2 {
                distributor,
                cpu_interface,
            } => {
                let gicd =
                    window::<arm_gic::gicv2::registers::Gicd>(distributor.base, distributor.size)?;
                let gicc = window::<arm_gic::gicv2::registers::Gicc>(
                    cpu_interface.base,
                    cpu_interface.size,
                )?;
                // SAFETY: the caller guarantees both windows are the GIC's,
                // mapped as Device memory and not aliased; both are non-null
                // and large enough for the register blocks.
                let mut gic = unsafe { GicV2::new(gicd.as_ptr(), gicc.as_ptr()) };
                if gic.typer().has_security_extension() && !super::secure::handed_over() {
                    return Err(GicError::SecurityEnabled);
                }
                gic.enable_all_interrupts(false);
                // Without Security Extensions: all interrupts Group 0,
                // signalled as IRQ (GICC_CTLR.FIQEn = 0), mask 0xff.
                gic.setup();
                gic.set_priority_mask(PRIORITY_MASK);
                Ok(Self::V2(gic, distributor.base))
            }
            GicRegisters::V3 {
                distributor,
                redistributors,
            } => {
                let gicd =
                    window::<arm_gic::gicv3::registers::Gicd>(distributor.base, distributor.size)?;
                let gicr = window::<arm_gic::gicv3::registers::GicrSgi>(
                    redistributors.base,
                    redistributors.size,
                )?;
                // SAFETY: as above; the distributor window holds a whole
                // GICD block.
                let gicd = unsafe { UniqueMmioPointer::new(gicd) };
                // SAFETY: the redistributor window holds at least one
                // GICR_SGI frame pair and nothing else aliases it; one PE.
                let mut gic = unsafe { GicV3::new(gicd, gicr, 1) }
                    .map_err(|_| GicError::RedistributorLayout)?;
                if gic.typer().has_security_extension() && !super::secure::handed_over() {
                    return Err(GicError::SecurityEnabled);
                }
                let redistributor = gic
                    .gicr_typer(0)
                    .map_err(|_| GicError::RedistributorLayout)?
                    .core_mpidr();
                let ours = our_affinity();
                if redistributor != ours {
                    return Err(GicError::ForeignRedistributor {
                        redistributor,
                        ours,
                    });
                }
                gic.enable_all_interrupts(false);
                // ICC_SRE_EL1.SRE, redistributor awake, ICC_CTLR_EL1 = 0
                // (EOI also deactivates), everything Group 1 Non-secure,
                // affinity routing and Group 1 on.
                gic.setup(0);
                GicCpuInterface::set_priority_mask(PRIORITY_MASK);
                Ok(Self::V3(gic))
            }
            GicRegisters::Bcm2836Local { local } => {
                // QA7 rev 3.4: the per-core registers end at 0x100.
                if local.base == 0 || local.size < 0x100 {
                    return Err(GicError::BadWindow {
                        base: local.base,
                        size: local.size,
                    });
                }
                // SAFETY: the caller guarantees the window is the local
                // block, mapped as Device memory and driven by us only.
                let intc = unsafe { LocalIntc::new(local.base, our_affinity() & 0xff) }?;
                Ok(Self::Local(intc))
            }
        }
    }

    fn check(&self, intid: Intid) -> Result<IntId, GicError> {
        if let Self::Local(_) = self {
            return match super::bcm2836::source_of(intid) {
                Some(_) => crate_intid(intid),
                None => Err(GicError::Unsupported(intid)),
            };
        }
        let ok = matches!(
            (self, intid.class()),
            (
                _,
                IntidClass::Sgi(_) | IntidClass::Ppi(_) | IntidClass::Spi(_)
            ) | (
                Self::V3(_),
                IntidClass::ExtendedPpi(_) | IntidClass::ExtendedSpi(_)
            )
        );
        if ok {
            crate_intid(intid)
        } else {
            Err(GicError::Unsupported(intid))
        }
    }

    /// Sets the trigger (when given), the priority and, for an SPI, the
    /// route to this PE (GICv3 GICD_IROUTER; GICv2 GICD_ITARGETSR, which
    /// resets to no CPU when the GIC has more than one interface: IHI 0048B,
    /// 4.3.12); then enables the interrupt.
    pub(super) fn enable(
        &mut self,
        intid: Intid,
        trigger: Option<Trigger>,
    ) -> Result<(), GicError> {
        let id = self.check(intid)?;
        let trigger = trigger.map(|t| match t {
            Trigger::Edge => arm_gic::Trigger::Edge,
            Trigger::Level => arm_gic::Trigger::Level,
        });
        match self {
            Self::V2(gic, gicd) => {
                if let IntidClass::Spi(_) = intid.class() {
                    // SAFETY: GICD_ITARGETSR0 (banked, read-only: this
                    // core's own CPU interface bit) and the SPI's byte of
                    // GICD_ITARGETSR, both byte-accessible registers of the
                    // distributor `new`'s caller gave us; the crate never
                    // touches GICD_ITARGETSR, so this write aliases none of
                    // its accesses. With one CPU interface they are RAZ/WI.
                    unsafe {
                        let me = core::ptr::read_volatile((*gicd + 0x800) as *const u8);
                        let target = (*gicd + 0x800 + u64::from(intid.raw())) as *mut u8;
                        core::ptr::write_volatile(target, me);
                    }
                }
                // SGIs have a fixed trigger (GICD_ICFGR0 is read-only).
                if let (Some(t), false) = (trigger, matches!(intid.class(), IntidClass::Sgi(_))) {
                    gic.set_trigger(id, t);
                }
                // arm-gic writes GICD_IPRIORITYR as a word, so the three
                // neighbours of `id` get priority 0: harmless with one
                // priority level and IRQs masked in handlers (all stay
                // deliverable), but it means priorities carry no meaning.
                gic.set_interrupt_priority(id, PRIORITY);
                gic.enable_interrupt(id, true)
                    .map_err(|_| GicError::CannotEnable(intid))
            }
            Self::V3(gic) => {
                let cpu = Some(0);
                let fail = |_| GicError::CannotEnable(intid);
                if let (Some(t), false) = (trigger, matches!(intid.class(), IntidClass::Sgi(_))) {
                    gic.set_trigger(id, cpu, t).map_err(fail)?;
                }
                gic.set_interrupt_priority(id, cpu, PRIORITY)
                    .map_err(fail)?;
                if !intid.is_private() {
                    gic.distributor()
                        .set_routing(id, Some(our_affinity()))
                        .map_err(fail)?;
                }
                gic.enable_interrupt(id, cpu, true).map_err(fail)
            }
            // Timer outputs are level, SGIs edge-like: nothing to configure.
            Self::Local(intc) => Ok(intc.enable(intid)?),
        }
    }

    /// Disables the interrupt (it stays pending if it was).
    pub(super) fn disable(&mut self, intid: Intid) -> Result<(), GicError> {
        let id = self.check(intid)?;
        match self {
            Self::V2(gic, _) => gic
                .enable_interrupt(id, false)
                .map_err(|_| GicError::CannotEnable(intid)),
            Self::V3(gic) => gic
                .enable_interrupt(id, Some(0), false)
                .map_err(|_| GicError::CannotEnable(intid)),
            Self::Local(intc) => Ok(intc.disable(intid)?),
        }
    }

    /// Sends SGI `intid` to this PE only.
    pub(super) fn send_sgi_to_self(&mut self, intid: Intid) -> Result<(), GicError> {
        if !matches!(intid.class(), IntidClass::Sgi(_)) {
            return Err(GicError::Unsupported(intid));
        }
        let id = crate_intid(intid)?;
        match self {
            Self::V2(gic, _) => {
                gic.send_sgi(
                    id,
                    arm_gic::gicv2::SgiTarget::List {
                        target_list_filter: arm_gic::gicv2::SgiTargetListFilter::ForwardSelfOnly,
                        target_list: 0,
                    },
                );
                Ok(())
            }
            Self::V3(_) => {
                let aff = our_affinity();
                let target = SgiTarget::List {
                    affinity3: (aff >> 32) as u8,
                    affinity2: (aff >> 16) as u8,
                    affinity1: (aff >> 8) as u8,
                    target_list: 1 << (aff & 0xf),
                };
                GicCpuInterface::send_sgi(id, target, SgiTargetGroup::CurrentGroup1)
                    .map_err(|_| GicError::Unsupported(intid))
            }
            Self::Local(intc) => Ok(intc.send_sgi_to_self(intid)?),
        }
    }
}

/// An acknowledged interrupt: what to dispatch on and what to write back.
#[derive(Debug, Clone, Copy)]
pub(super) struct Acknowledged {
    /// The interrupt; `None` for a value that names no interrupt (a
    /// reserved INTID), which is ended without dispatch.
    pub intid: Option<Intid>,
    /// The raw acknowledge value (GICv2 adds the source CPU of an SGI in
    /// bits 12:10), written back unchanged at the end; `None` on the
    /// BCM2836 local controller, which has no end of interrupt.
    raw: Option<IntId>,
}

impl Gic {
    /// Acknowledges the highest-priority pending interrupt (GICC_IAR or
    /// ICC_IAR1_EL1); `None` when the read returned 1023 (spurious: nothing
    /// pending, or it was withdrawn before the read).
    pub(super) fn acknowledge(&mut self) -> Option<Acknowledged> {
        let (raw, mask) = match self {
            Self::V2(g, _) => (
                g.get_and_acknowledge_interrupt(InterruptGroup::Group0)?,
                0x3ff,
            ),
            Self::V3(_) => (
                GicCpuInterface::get_and_acknowledge_interrupt(InterruptGroup::Group1)?,
                0xff_ffff,
            ),
            Self::Local(intc) => {
                return intc.acknowledge().map(|intid| Acknowledged {
                    intid: Some(intid),
                    raw: None,
                })
            }
        };
        let intid = Intid::from_raw(u32::from(raw) & mask)
            .ok()
            .filter(|i| !i.is_special());
        Some(Acknowledged {
            intid,
            raw: Some(raw),
        })
    }

    /// Ends an acknowledged interrupt: priority drop and deactivation
    /// (GICC_EOIR or ICC_EOIR1_EL1, EOImode 0).
    pub(super) fn end(&mut self, ack: Acknowledged) {
        match (self, ack.raw) {
            (Self::V2(g, _), Some(raw)) => g.end_interrupt(raw, InterruptGroup::Group0),
            (Self::V3(_), Some(raw)) => GicCpuInterface::end_interrupt(raw, InterruptGroup::Group1),
            // The local controller's timer sources are level (the handler
            // quieted the timer) and its mailbox bit was cleared on
            // acknowledge: nothing to end.
            _ => {}
        }
    }
}
