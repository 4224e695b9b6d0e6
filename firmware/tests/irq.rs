//! Interrupt suite: the interrupt controller from the device tree (else the
//! board description), the IRQ vector, dispatch by INTID, the generic
//! timer's interrupt waking WFI, SGIs, unhandled and spurious interrupts,
//! and the SIMD state an interrupt must not disturb. The host tool runs it
//! on GICv2 (`-M virt`) and GICv3 (`-M virt,gic-version=3`), entered at EL1,
//! EL2 and EL3 (where the GIC has two security states and the boot hands it
//! to the Non-secure world), and on every board model at each EL it enters
//! at: GIC-400 (Pi 4, ZCU102), GICv3 (i.MX 8M Plus), the BCM2836 local
//! controller (Pi 3, SGIs as mailbox bits). It passes `gic=0|2|3` (0: the
//! BCM2836) so the tests check what was found against the machine.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

#[cfg(test)]
#[path = "support/pl031.rs"]
mod pl031;

#[cfg(test)]
#[embedded_test::tests(default_timeout = 30)]
mod tests {
    use super::pl031;
    use core::sync::atomic::{AtomicU32, Ordering};
    use firmware::interrupts::{Interrupts, InterruptsError};
    use hal::irq::{self, GicVersion, Interrupt, Intid, IrqError};

    /// How often the test handlers ran, and the last INTID each saw.
    static TIMER_RUNS: AtomicU32 = AtomicU32::new(0);
    static TIMER_INTID: AtomicU32 = AtomicU32::new(u32::MAX);
    static SGI_RUNS: AtomicU32 = AtomicU32::new(0);
    static SGI_INTID: AtomicU32 = AtomicU32::new(u32::MAX);

    fn on_timer(intid: Intid) {
        // The timer's output is level: quiet it before the interrupt ends.
        hal::timer::stop_physical_timer();
        TIMER_INTID.store(intid.raw(), Ordering::Relaxed);
        TIMER_RUNS.fetch_add(1, Ordering::Relaxed);
    }

    fn on_sgi(intid: Intid) {
        SGI_INTID.store(intid.raw(), Ordering::Relaxed);
        SGI_RUNS.fetch_add(1, Ordering::Relaxed);
    }

    fn ticks_per_ms() -> u64 {
        hal::timer::frequency() / 1000
    }

    fn sgi(n: u32) -> Interrupt {
        Interrupt {
            intid: Intid::sgi(n).expect("SGI number"),
            trigger: None,
        }
    }

    /// What every test gets: the bring-up's result.
    type Setup = Result<Interrupts, InterruptsError>;

    #[init]
    fn init() -> Setup {
        let _ = firmware::init();
        firmware::interrupts::init()
    }

    fn up(setup: Setup) -> Interrupts {
        match setup {
            Ok(i) => i,
            Err(e) => {
                defmt::error!("interrupt bring-up failed: {}", e);
                panic!("interrupt bring-up failed")
            }
        }
    }

    /// The controller found is the one the host booted, and the EL1
    /// physical timer is PPI 14 (INTID 30), level. On virt both come from
    /// QEMU's tree; on a board model (QEMU makes no tree there) from the
    /// board description.
    #[test]
    fn controller_source_is_the_tree_on_virt_else_the_board(setup: Setup) {
        let i = up(setup);
        let virt = hal::board::CURRENT.name == "virt";
        let want = if virt {
            irq::ControllerSource::DeviceTree
        } else {
            irq::ControllerSource::Board
        };
        assert_eq!(i.source, want);
        if !virt {
            let board = hal::irq::describe(None, &hal::board::CURRENT).expect("board");
            assert_eq!(i.gic, board.gic);
            assert_eq!(i.timer, board.timer);
        }
    }

    /// The GIC found in the tree is the version the host asked QEMU for,
    /// and the tree's EL1 physical timer is PPI 14 (INTID 30), level.
    #[test]
    fn gic_version_and_timer_intid_match_the_machine(setup: Setup) {
        let i = up(setup);
        let expected = match hal::semihost::arg_u64("gic").expect("host passes gic") {
            0 => GicVersion::Bcm2836Local,
            2 => GicVersion::V2,
            3 => GicVersion::V3,
            other => panic!("gic={} from the host", other),
        };
        assert_eq!(i.gic.version(), expected);
        assert_eq!(irq::version(), Some(expected));
        assert_eq!(i.timer.physical.intid.raw(), 30);
        assert_eq!(i.timer.physical.trigger, Some(irq::Trigger::Level));
        assert_eq!(i.timer.virtual_timer.intid.raw(), 27);
    }

    /// Armed 2 ms ahead, the timer's interrupt wakes the core from WFI; the
    /// handler runs exactly once, with the INTID the tree names, and not
    /// before the deadline.
    #[test]
    fn timer_interrupt_wakes_wfi_once(setup: Setup) {
        let i = up(setup);
        irq::attach(&i.timer.physical, on_timer).expect("attach timer");
        irq::unmask_irqs();
        let start = hal::timer::ticks();
        hal::timer::arm_physical_timer(2 * ticks_per_ms());
        irq::wait_until(|| TIMER_RUNS.load(Ordering::Relaxed) > 0);
        let elapsed = hal::timer::ticks() - start;
        assert_eq!(TIMER_RUNS.load(Ordering::Relaxed), 1);
        assert_eq!(
            TIMER_INTID.load(Ordering::Relaxed),
            i.timer.physical.intid.raw()
        );
        assert!(elapsed >= 2 * ticks_per_ms(), "woke before the deadline");
        // Stopped by the handler: no second interrupt.
        hal::timer::delay_us(5000);
        assert_eq!(TIMER_RUNS.load(Ordering::Relaxed), 1);
        // The first one was ended (EOI), so a new deadline fires again.
        hal::timer::arm_physical_timer(ticks_per_ms());
        irq::wait_until(|| TIMER_RUNS.load(Ordering::Relaxed) > 1);
        assert_eq!(TIMER_RUNS.load(Ordering::Relaxed), 2);
        let s = irq::stats();
        assert_eq!((s.handled, s.unhandled), (2, 0));
    }

    /// With IRQs masked the expired timer only pends: WFI still returns
    /// (a pending IRQ is a wake-up event whatever PSTATE.I says), the
    /// handler has not run, and it runs once as soon as IRQs are unmasked.
    #[test]
    fn masked_interrupt_pends_until_unmasked(setup: Setup) {
        let i = up(setup);
        irq::mask_irqs();
        irq::attach(&i.timer.physical, on_timer).expect("attach timer");
        hal::timer::arm_physical_timer(ticks_per_ms());
        irq::wait_for_interrupt();
        hal::timer::delay_us(2000);
        assert!(hal::timer::physical_timer_condition());
        assert_eq!(TIMER_RUNS.load(Ordering::Relaxed), 0);
        irq::unmask_irqs();
        assert_eq!(TIMER_RUNS.load(Ordering::Relaxed), 1);
        assert_eq!(TIMER_INTID.load(Ordering::Relaxed), 30);
    }

    /// A software-generated interrupt sent to ourselves is dispatched to
    /// its handler once, with its INTID.
    #[test]
    fn sgi_to_self_is_dispatched(setup: Setup) {
        up(setup);
        irq::attach(&sgi(3), on_sgi).expect("attach SGI 3");
        irq::unmask_irqs();
        irq::send_sgi_to_self(Intid::sgi(3).expect("SGI")).expect("send SGI");
        irq::wait_until(|| SGI_RUNS.load(Ordering::Relaxed) > 0);
        hal::timer::delay_us(1000);
        assert_eq!(SGI_RUNS.load(Ordering::Relaxed), 1);
        assert_eq!(SGI_INTID.load(Ordering::Relaxed), 3);
    }

    /// An enabled interrupt with no handler is counted as unhandled and
    /// ended; no handler runs.
    #[test]
    fn interrupt_without_handler_is_counted(setup: Setup) {
        up(setup);
        irq::attach(&sgi(3), on_sgi).expect("attach SGI 3");
        irq::enable(&sgi(5)).expect("enable SGI 5");
        irq::unmask_irqs();
        irq::send_sgi_to_self(Intid::sgi(5).expect("SGI")).expect("send SGI");
        irq::wait_until(|| irq::stats().unhandled > 0);
        let s = irq::stats();
        assert_eq!((s.handled, s.unhandled), (0, 1));
        assert_eq!(SGI_RUNS.load(Ordering::Relaxed), 0);
        // The controller still works afterwards.
        irq::send_sgi_to_self(Intid::sgi(3).expect("SGI")).expect("send SGI");
        irq::wait_until(|| SGI_RUNS.load(Ordering::Relaxed) > 0);
        assert_eq!(irq::stats().handled, 1);
    }

    /// Acknowledging with nothing pending reads 1023: counted as spurious,
    /// no handler runs.
    #[test]
    fn acknowledge_with_nothing_pending_is_spurious(setup: Setup) {
        let i = up(setup);
        irq::mask_irqs();
        irq::attach(&i.timer.physical, on_timer).expect("attach timer");
        let before = irq::stats();
        assert_eq!(irq::handle_pending(), None);
        let after = irq::stats();
        assert_eq!(after.spurious, before.spurious + 1);
        assert_eq!(after.handled, before.handled);
        assert_eq!(TIMER_RUNS.load(Ordering::Relaxed), 0);
        // Polling with IRQs masked dispatches a pending interrupt.
        hal::timer::arm_physical_timer(0);
        hal::timer::delay_us(1000);
        assert_eq!(irq::handle_pending(), Some(i.timer.physical.intid));
        assert_eq!(TIMER_RUNS.load(Ordering::Relaxed), 1);
    }

    fn on_virtio(_: Intid) {}

    /// Every virtio-mmio transport's interrupt resolves, through the GIC
    /// node, to the SPI the platform parse recorded (QEMU: SPI 16 + n, rising
    /// edge), and enabling it (trigger, priority, GICv3 route) succeeds.
    #[test]
    fn virtio_transport_interrupts_resolve_to_spis(setup: Setup) {
        let i = up(setup);
        let platform = hal::boot_dtb().expect("boot tree");
        assert!(!platform.virtio_mmio().is_empty());
        for t in platform.virtio_mmio() {
            let irq = i
                .device_interrupt("virtio,mmio", t.region.base)
                .expect("transport interrupt");
            let spi = t.irq.expect("transport names an SPI");
            assert_eq!(irq.intid.class(), irq::IntidClass::Spi(spi as u16));
            assert_eq!(irq.trigger, Some(irq::Trigger::Edge));
        }
        let first = platform.virtio_mmio()[0];
        let irq = i
            .device_interrupt("virtio,mmio", first.region.base)
            .expect("transport interrupt");
        irq::attach(&irq, on_virtio).expect("attach the SPI");
        irq::detach(irq.intid).expect("detach");
        assert_eq!(
            irq::unregister(irq.intid),
            Err(IrqError::NotRegistered(irq.intid))
        );
    }

    /// A device's shared peripheral interrupt (the RTC's alarm, SPI 2 in
    /// the tree) is configured, routed to this PE, taken, dispatched once
    /// with its INTID and ended: the path a virtio-mmio transport's SPI takes.
    #[test]
    fn device_spi_is_routed_and_dispatched(setup: Setup) {
        let i = up(setup);
        let irq = pl031::attach(&i);
        assert_eq!(irq.intid.class(), irq::IntidClass::Spi(2));
        assert_eq!(irq.trigger, Some(irq::Trigger::Level));
        assert_eq!(pl031::raise_and_wait(), 1);
        assert_eq!(pl031::dispatched_intid(), irq.intid.raw());
        assert_eq!(irq.intid.raw(), 34);
    }

    /// Bad requests are typed errors.
    #[test]
    fn bad_requests_are_typed_errors(setup: Setup) {
        let i = up(setup);
        let t = i.timer.physical.intid;
        irq::register(t, on_timer).expect("register");
        assert_eq!(
            irq::register(t, on_sgi),
            Err(IrqError::AlreadyRegistered(t))
        );
        let other = Intid::spi(100).expect("SPI");
        assert_eq!(irq::unregister(other), Err(IrqError::NotRegistered(other)));
        for n in 0..irq::MAX_HANDLERS as u32 - 1 {
            irq::register(Intid::spi(n).expect("SPI"), on_sgi).expect("room");
        }
        assert_eq!(irq::register(other, on_sgi), Err(IrqError::TableFull));
        irq::unregister(t).expect("unregister");
        irq::register(other, on_sgi).expect("slot freed");
        assert_eq!(
            irq::send_sgi_to_self(t),
            Err(IrqError::Gic(irq::GicError::Unsupported(t)))
        );
        let lpi = Intid::from_raw(8192).expect("LPI");
        assert_eq!(
            irq::enable(&Interrupt {
                intid: lpi,
                trigger: None
            }),
            Err(IrqError::Gic(irq::GicError::Unsupported(lpi)))
        );
        assert!(matches!(
            firmware::interrupts::init(),
            Err(InterruptsError::Irq(IrqError::AlreadyInitialised))
        ));
    }

    static CLOBBERS: AtomicU32 = AtomicU32::new(0);

    #[allow(unsafe_code)] // register clobbers are the point of the test
    fn clobbering_handler(_: Intid) {
        // SAFETY: only overwrites registers declared as clobbered.
        unsafe {
            core::arch::asm!(
                "movi v0.16b, #0xee",
                "movi v7.16b, #0xee",
                "movi v16.16b, #0xee",
                "movi v31.16b, #0xee",
                "mov x9, #0xee",
                "mov x18, #0xee",
                out("v0") _, out("v7") _, out("v16") _, out("v31") _,
                out("x9") _, out("x18") _,
            );
        }
        CLOBBERS.fetch_add(1, Ordering::Relaxed);
    }

    /// An interrupt taken between two instructions leaves the interrupted
    /// code's caller-saved SIMD and general registers as they were, even
    /// when the handler overwrites them.
    #[test]
    #[allow(unsafe_code)] // register contents across an IRQ are the point
    fn interrupt_preserves_interrupted_registers(setup: Setup) {
        up(setup);
        irq::mask_irqs();
        irq::attach(&sgi(7), clobbering_handler).expect("attach SGI 7");
        irq::send_sgi_to_self(Intid::sgi(7).expect("SGI")).expect("send SGI");
        let pattern: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
        let mut out = [[0u64; 2]; 4];
        let (x9, x18): (u64, u64);
        // SAFETY: loads and stores 16-byte values within `pattern` and
        // `out`; the registers it uses are declared; the IRQ taken at the
        // ISB runs the handler above and returns here.
        unsafe {
            core::arch::asm!(
                "ldr q0, [{p}]",
                "ldr q7, [{p}]",
                "ldr q16, [{p}]",
                "ldr q31, [{p}]",
                "mov x9, #0x99",
                "mov x18, #0x18",
                "msr daifclr, #2",
                "isb",
                "msr daifset, #2",
                "str q0, [{o}]",
                "str q7, [{o}, #16]",
                "str q16, [{o}, #32]",
                "str q31, [{o}, #48]",
                "mov {a}, x9",
                "mov {b}, x18",
                p = in(reg) pattern.as_ptr(),
                o = in(reg) out.as_mut_ptr(),
                a = out(reg) x9,
                b = out(reg) x18,
                out("v0") _, out("v7") _, out("v16") _, out("v31") _,
                out("x9") _, out("x18") _,
            );
        }
        assert_eq!(CLOBBERS.load(Ordering::Relaxed), 1, "the SGI was not taken");
        assert_eq!(out, [pattern; 4]);
        assert_eq!((x9, x18), (0x99, 0x18));
    }
}
