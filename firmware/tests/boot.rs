//! Boot suite: exception levels, FP/SIMD, stacks, vectors, console, timer.
//! The host tool runs it entered at EL1, EL2 and EL3 and on `-cpu max` and
//! `-cpu cortex-a53`.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

#[cfg(test)]
#[embedded_test::tests(default_timeout = 60)]
mod tests {
    use core::hint::black_box;

    #[init]
    fn init() {
        let _ = firmware::init();
    }

    /// Whatever EL the loader entered at, we run at EL1.
    #[test]
    fn runs_at_el1() {
        assert_eq!(hal::boot::current_el(), 1);
    }

    /// The entry EL matches what the host tool asked QEMU for.
    #[test]
    fn entered_at_requested_el() {
        let expected = hal::semihost::arg_u64("entry_el").expect("host passes entry_el");
        assert_eq!(hal::boot::entry_el() as u64, expected);
    }

    /// FP/SIMD is usable (CPACR_EL1.FPEN and the EL2/EL3 traps cleared).
    #[test]
    fn fp_and_simd_work() {
        let a = black_box(1.5f64);
        let b = black_box(2.25f64);
        assert_eq!(a * b, 3.375);
        let v: [u8; 16] = black_box([3; 16]);
        let w: [u8; 16] = core::array::from_fn(|i| v[i].wrapping_mul(i as u8));
        assert_eq!(w[15], 45);
    }

    /// BSS was zeroed before Rust ran.
    #[test]
    fn bss_is_zeroed() {
        static ZERO: [core::sync::atomic::AtomicU64; 64] =
            [const { core::sync::atomic::AtomicU64::new(0) }; 64];
        assert!(ZERO
            .iter()
            .all(|w| w.load(core::sync::atomic::Ordering::Relaxed) == 0));
    }

    /// The main thread runs on SP_EL0, inside the main stack region.
    #[test]
    fn main_thread_on_sp_el0_stack() {
        extern "C" {
            static __main_stack_bottom: u8;
            static __main_stack_top: u8;
        }
        let (sp, spsel) = hal::boot::stack_pointer_and_spsel();
        let (lo, hi) = (
            &raw const __main_stack_bottom as u64,
            &raw const __main_stack_top as u64,
        );
        assert_eq!(spsel, 0);
        assert!(lo < sp && sp <= hi, "sp outside main stack");
    }

    /// VBAR_EL1 points at our vector table.
    #[test]
    fn vectors_installed() {
        extern "C" {
            static __vectors: u8;
        }
        let vbar = hal::exception::vbar();
        assert_eq!(vbar, &raw const __vectors as u64);
        assert_eq!(vbar % 2048, 0);
    }

    /// The generic timer runs forwards at the advertised frequency.
    #[test]
    fn timer_is_monotonic() {
        let f = hal::timer::frequency();
        assert!(f >= 1_000_000, "CNTFRQ_EL0 = {}", f);
        let mut last = hal::timer::ticks();
        for _ in 0..1000 {
            let now = hal::timer::ticks();
            assert!(now >= last);
            last = now;
        }
        let t0 = hal::timer::uptime_us();
        hal::timer::delay_us(2000);
        assert!(hal::timer::uptime_us() - t0 >= 2000);
    }

    /// A BRK is reported as such and resumed after.
    #[test]
    fn brk_is_decoded() {
        let fault = hal::exception::probe_brk::<0x42>().expect_err("BRK must trap");
        assert_eq!(fault.class_name(), "BRK instruction");
        assert_eq!(fault.esr & 0xffff, 0x42);
    }

    /// A deliberate data abort is caught with the right class, address and cause.
    #[test]
    fn data_abort_report() {
        let fault = hal::exception::probe_unmapped().expect_err("the read must fault");
        assert_eq!(fault.class_name(), "Data abort from the same EL");
        let abort = fault.abort().expect("an abort");
        assert!(!abort.write);
        assert_eq!(fault.far, firmware::selftest::UNMAPPED);
    }

    static mut PROBED: u64 = 0x1234_5678_9abc_def0;

    // The probes' own contract (raw access to our own RAM) is what is tested.
    #[allow(unsafe_code)]
    extern "C" fn bump_probed() {
        // SAFETY: single-threaded test; no reference to PROBED is live.
        unsafe { PROBED += 1 };
    }

    /// Probes that do not fault behave like the plain access: the read
    /// returns the value, the write lands, the call runs and returns.
    #[test]
    #[allow(unsafe_code)] // tests the unsafe probe primitives themselves
    fn probes_without_fault_are_plain_accesses() {
        let addr = &raw mut PROBED as u64;
        // SAFETY: PROBED is our own RAM; no reference to it is live.
        unsafe {
            assert_eq!(
                hal::exception::probe_read_u64(addr),
                Ok(0x1234_5678_9abc_def0)
            );
            assert_eq!(hal::exception::probe_write_u64(addr, 41), Ok(()));
            assert_eq!(
                hal::exception::probe_call(bump_probed as *const () as u64),
                Ok(())
            );
            assert_eq!(hal::exception::probe_read_u64_quiet(addr), Ok(42));
        }
    }

    /// A quiet probe of an address nothing answers at (the MMU is on, so
    /// it is unmapped) returns the fault, and the next access works.
    #[test]
    fn quiet_probe_returns_the_fault() {
        let fault = hal::exception::probe_unmapped_quiet().expect_err("must fault");
        assert_eq!(fault.far, firmware::selftest::UNMAPPED);
        assert!(fault.abort().is_some_and(|a| !a.write));
    }

    /// Console UART: bytes sent in loopback mode come back on the receive
    /// side. Only the mini-UART has no loopback, and says so.
    #[test]
    fn uart_loopback() {
        let uart = &hal::uart::CONSOLE;
        uart.flush();
        while uart.try_read_byte().is_some() {}
        if uart.set_loopback(true).is_err() {
            assert_eq!(hal::board::CURRENT.uart, hal::board::UartKind::MiniUart);
            return;
        }
        uart.write_bytes(b"PL011");
        uart.flush();
        let mut got = [0u8; 5];
        for slot in got.iter_mut() {
            let mut tries = 0;
            *slot = loop {
                if let Some(b) = uart.try_read_byte() {
                    break b;
                }
                tries += 1;
                assert!(tries < 1_000_000, "no byte came back");
            };
        }
        assert_eq!(uart.set_loopback(false), Ok(()));
        assert_eq!(&got, b"PL011");
    }

    /// `#[ignore]` is honoured: if the runner booted this, the suite would fail.
    #[test]
    #[ignore]
    fn ignored_tests_are_not_run() {
        panic!("an #[ignore]d test was run");
    }

    /// should_panic is honoured by the runner.
    #[test]
    #[should_panic]
    fn panics_are_reported() {
        let v: [u32; 0] = [];
        let _ = black_box(&v).first().expect("empty");
    }
}
