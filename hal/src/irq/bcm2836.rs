//! The BCM2836 ARM-local interrupt controller (Broadcom "BCM2836 ARM-local
//! peripherals", QA7 rev 3.4, sections 4.6 "Core timers interrupts", 4.7
//! "Mailbox interrupts", 4.10 "Core interrupt sources" and 4.11 "Mailboxes"),
//! the only interrupt controller a Raspberry Pi 3 core has (BCM2837: no
//! GIC), written with `tock-registers`.
//!
//! Each core has its own registers: timer interrupt control (which of its
//! four generic-timer outputs raise IRQ), mailbox interrupt control, an IRQ
//! source register, and four 32-bit mailboxes (write-set, read/write-clear).
//!
//! The dispatcher speaks GIC INTIDs, so this driver presents its sources
//! under the INTIDs a GIC would give them:
//!
//! - the timer outputs as the generic timer's usual PPIs (CNTPS 29, CNTPNS
//!   30, CNTHP 26, CNTV 27), level sensitive as they are;
//! - SGI n (0..=15) as bit n of this core's mailbox 0 (as Linux uses it for
//!   IPIs): sending writes the bit, acknowledging clears it, so an SGI is
//!   edge-like. A disabled SGI that arrives is held back in software and
//!   raised again when it is enabled, as a GIC keeps it pending.
//!
//! Nothing else (the GPU's interrupts, the PMU, the local timer) is routed.

use super::intid::{Intid, IntidClass};

/// Timer sources in QA7's bit order (timer interrupt control bits 3:0, IRQ
/// source bits 3:0), as the INTIDs they are presented under.
const TIMER_INTIDS: [u32; 4] = [
    29, // CNTPSIRQ: secure physical
    30, // CNTPNSIRQ: non-secure physical
    26, // CNTHPIRQ: hypervisor physical
    27, // CNTVIRQ: virtual
];

/// What an INTID stands for on this controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Timer source `n` (bit n of timer interrupt control and IRQ source).
    Timer(u32),
    /// Bit `n` of this core's mailbox 0.
    Mailbox0Bit(u32),
}

/// The source `intid` stands for, or `None` when it has none here.
pub(super) fn source_of(intid: Intid) -> Option<Source> {
    match intid.class() {
        IntidClass::Sgi(n) => Some(Source::Mailbox0Bit(u32::from(n))),
        IntidClass::Ppi(_) => TIMER_INTIDS
            .iter()
            .position(|&i| i == intid.raw())
            .map(|n| Source::Timer(n as u32)),
        _ => None,
    }
}

/// The INTID timer source bit `n` is presented under.
pub(super) fn timer_intid(n: u32) -> Option<Intid> {
    let raw = *TIMER_INTIDS.get(n as usize)?;
    Intid::from_raw(raw).ok()
}

#[cfg(hw)]
pub(super) use driver::LocalIntc;

#[cfg(hw)]
mod driver {
    use super::{source_of, timer_intid, Intid, Source};
    use tock_registers::{
        interfaces::{ReadWriteable, Readable, Writeable},
        register_bitfields, register_structs,
        registers::{ReadOnly, ReadWrite, WriteOnly},
    };

    register_bitfields! {u32,
        /// Core n timers interrupt control (QA7 4.6): bits 3:0 IRQ enable,
        /// bits 7:4 FIQ enable (FIQ wins over IRQ), per timer source.
        TIMER_CONTROL [
            IRQ OFFSET(0) NUMBITS(4) [],
            FIQ OFFSET(4) NUMBITS(4) [],
        ],
        /// Core n mailboxes interrupt control (QA7 4.7).
        MAILBOX_CONTROL [
            IRQ OFFSET(0) NUMBITS(4) [],
            FIQ OFFSET(4) NUMBITS(4) [],
        ],
        /// Core n IRQ source (QA7 4.10).
        IRQ_SOURCE [
            TIMERS OFFSET(0) NUMBITS(4) [],
            MAILBOX0 OFFSET(4) NUMBITS(1) [],
            MAILBOXES OFFSET(4) NUMBITS(4) [],
            GPU OFFSET(8) NUMBITS(1) [],
            PMU OFFSET(9) NUMBITS(1) [],
            LOCAL_TIMER OFFSET(11) NUMBITS(1) [],
        ],
    }

    register_structs! {
        /// The ARM-local block from its base (0x4000_0000 on the BCM2837).
        Registers {
            (0x00 => _global),
            (0x40 => timer_control: [ReadWrite<u32, TIMER_CONTROL::Register>; 4]),
            (0x50 => mailbox_control: [ReadWrite<u32, MAILBOX_CONTROL::Register>; 4]),
            (0x60 => irq_source: [ReadOnly<u32, IRQ_SOURCE::Register>; 4]),
            (0x70 => _fiq_source),
            /// Core c mailbox m write-set at 0x80 + 16c + 4m.
            (0x80 => mailbox_set: [WriteOnly<u32>; 16]),
            /// Core c mailbox m read / write-clear at 0xC0 + 16c + 4m.
            (0xc0 => mailbox_clear: [ReadWrite<u32>; 16]),
            (0x100 => @END),
        }
    }

    /// Why the controller cannot be used, or refused an operation.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
    pub enum LocalError {
        /// The core number (MPIDR Aff0) is above 3.
        Core(u64),
        /// An INTID with no source on this controller.
        Unsupported(Intid),
    }

    /// This core's view of the local controller.
    pub struct LocalIntc {
        regs: *const Registers,
        core: usize,
        /// SGIs (mailbox 0 bits) enabled.
        enabled_sgis: u32,
        /// SGIs that arrived while disabled, raised again on enable.
        held: u32,
    }

    impl LocalIntc {
        /// Takes this core's registers: every timer source and mailbox
        /// interrupt off (IRQ and FIQ), this core's mailbox 0 cleared.
        ///
        /// # Safety
        ///
        /// `base` is the BCM2836 local block, mapped as Device memory (or
        /// the MMU is off), and nothing else drives this core's registers
        /// while the value lives.
        pub unsafe fn new(base: u64, core: u64) -> Result<Self, LocalError> {
            if core > 3 {
                return Err(LocalError::Core(core));
            }
            let s = Self {
                regs: base as *const Registers,
                core: core as usize,
                enabled_sgis: 0,
                held: 0,
            };
            let r = s.regs();
            r.timer_control[s.core].set(0);
            r.mailbox_control[s.core].set(0);
            r.mailbox_clear[s.core * 4].set(u32::MAX);
            Ok(s)
        }

        fn regs(&self) -> &'static Registers {
            // SAFETY: `new`'s contract: `regs` points at the block, which
            // is MMIO and never goes away.
            unsafe { &*self.regs }
        }

        fn source(intid: Intid) -> Result<Source, LocalError> {
            source_of(intid).ok_or(LocalError::Unsupported(intid))
        }

        /// Routes the source to this core's IRQ.
        pub fn enable(&mut self, intid: Intid) -> Result<(), LocalError> {
            let core = self.core;
            match Self::source(intid)? {
                Source::Timer(n) => {
                    let r = self.regs();
                    let on = r.timer_control[core].read(TIMER_CONTROL::IRQ) | (1 << n);
                    r.timer_control[core].modify(TIMER_CONTROL::IRQ.val(on));
                }
                Source::Mailbox0Bit(n) => {
                    self.enabled_sgis |= 1 << n;
                    self.regs().mailbox_control[core].modify(MAILBOX_CONTROL::IRQ.val(1));
                    if self.held & (1 << n) != 0 {
                        self.held &= !(1 << n);
                        self.regs().mailbox_set[core * 4].set(1 << n);
                    }
                }
            }
            Ok(())
        }

        /// Stops the source raising this core's IRQ.
        pub fn disable(&mut self, intid: Intid) -> Result<(), LocalError> {
            let core = self.core;
            match Self::source(intid)? {
                Source::Timer(n) => {
                    let r = self.regs();
                    let on = r.timer_control[core].read(TIMER_CONTROL::IRQ) & !(1 << n);
                    r.timer_control[core].modify(TIMER_CONTROL::IRQ.val(on));
                }
                Source::Mailbox0Bit(n) => {
                    self.enabled_sgis &= !(1 << n);
                    if self.enabled_sgis == 0 {
                        self.regs().mailbox_control[core].modify(MAILBOX_CONTROL::IRQ.val(0));
                    }
                }
            }
            Ok(())
        }

        /// Sends SGI `intid` to this core (sets its bit in mailbox 0).
        pub fn send_sgi_to_self(&mut self, intid: Intid) -> Result<(), LocalError> {
            match Self::source(intid)? {
                Source::Mailbox0Bit(n) => {
                    self.regs().mailbox_set[self.core * 4].set(1 << n);
                    Ok(())
                }
                Source::Timer(_) => Err(LocalError::Unsupported(intid)),
            }
        }

        /// The pending, enabled source to dispatch, lowest first (timers
        /// before mailboxes), with a mailbox bit cleared as it is taken;
        /// `None` when nothing is pending (spurious).
        pub fn acknowledge(&mut self) -> Option<Intid> {
            let core = self.core;
            let r = self.regs();
            let pending = r.irq_source[core].read(IRQ_SOURCE::TIMERS)
                & r.timer_control[core].read(TIMER_CONTROL::IRQ);
            if pending != 0 {
                return timer_intid(pending.trailing_zeros());
            }
            if !r.irq_source[core].is_set(IRQ_SOURCE::MAILBOX0) {
                return None;
            }
            let bits = r.mailbox_clear[core * 4].get();
            // Bits above SGI 15 and SGIs not enabled are not deliverable:
            // clear them, keeping disabled SGIs for when they are enabled.
            let stray = bits & !self.enabled_sgis;
            if stray != 0 {
                self.held |= stray & 0xffff;
                r.mailbox_clear[core * 4].set(stray);
            }
            let take = bits & self.enabled_sgis;
            if take == 0 {
                return None;
            }
            let n = take.trailing_zeros();
            r.mailbox_clear[core * 4].set(1 << n);
            Intid::sgi(n).ok()
        }
    }
}

#[cfg(hw)]
pub use driver::LocalError;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_sources_are_the_generic_timer_ppis() {
        for (bit, intid) in [(0, 29), (1, 30), (2, 26), (3, 27)] {
            let i = Intid::from_raw(intid).unwrap();
            assert_eq!(source_of(i), Some(Source::Timer(bit)));
            assert_eq!(timer_intid(bit), Some(i));
        }
        assert_eq!(timer_intid(4), None);
        // Other PPIs, SPIs and LPIs have no source here.
        for raw in [16, 25, 28, 31, 32, 100, 8192] {
            assert_eq!(source_of(Intid::from_raw(raw).unwrap()), None, "{raw}");
        }
    }

    #[test]
    fn sgis_are_mailbox0_bits() {
        for n in 0..16 {
            assert_eq!(
                source_of(Intid::sgi(n).unwrap()),
                Some(Source::Mailbox0Bit(n))
            );
        }
    }
}
