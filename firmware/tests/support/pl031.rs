//! QEMU virt's PL031 real-time clock (hw/arm/virt.c, VIRT_RTC) as a device
//! whose shared peripheral interrupt a test can raise: the alarm is set to
//! the current count, each wait bounded by the generic physical timer.
//! Shared by the `irq` and `smp` suites (`#[path]`-included, not a suite of
//! its own). virt only: the boards have no PL031.

use core::sync::atomic::{AtomicU32, Ordering};
use firmware::interrupts::Interrupts;
use hal::irq::{Interrupt, Intid};

/// The RTC's MMIO base on virt.
pub const BASE: u64 = 0x0901_0000;
/// PL031 registers (PrimeCell RTC TRM DDI 0224, 3.2): data, match,
/// interrupt mask set/clear, interrupt clear.
const RTCDR: u64 = 0x00;
const RTCMR: u64 = 0x04;
const RTCIMSC: u64 = 0x10;
const RTCICR: u64 = 0x1c;
/// Tries before giving up, each bounded by this many milliseconds.
const TRIES: u32 = 3;
const TRY_MS: u64 = 1500;

static RUNS: AtomicU32 = AtomicU32::new(0);
static INTID: AtomicU32 = AtomicU32::new(u32::MAX);
static TIMEOUTS: AtomicU32 = AtomicU32::new(0);

#[allow(unsafe_code)] // a test-only device poke; the GIC driver is hal's
fn write(reg: u64, value: u32) {
    // SAFETY: a PL031 register inside the page `attach` mapped as device
    // memory; writes to it only affect the RTC.
    unsafe { core::ptr::write_volatile((BASE + reg) as *mut u32, value) }
}

#[allow(unsafe_code)] // as `write`
fn read(reg: u64) -> u32 {
    // SAFETY: as in `write`; reads have no side effect.
    unsafe { core::ptr::read_volatile((BASE + reg) as *const u32) }
}

fn on_rtc(intid: Intid) {
    // The line is level: clear and mask it in the device first.
    write(RTCICR, 1);
    write(RTCIMSC, 0);
    INTID.store(intid.raw(), Ordering::Relaxed);
    RUNS.fetch_add(1, Ordering::Relaxed);
}

fn on_timeout(_: Intid) {
    hal::timer::stop_physical_timer();
    TIMEOUTS.fetch_add(1, Ordering::Relaxed);
}

/// The RTC's interrupt as the device tree gives it, with the RTC's page
/// mapped and both it and the physical timer (the waits' bound) attached.
pub fn attach(irqs: &Interrupts) -> Interrupt {
    let irq = irqs
        .device_interrupt("arm,pl031", BASE)
        .expect("RTC interrupt");
    firmware::mm::map_device(BASE, 0x1000).expect("map the RTC");
    hal::irq::attach(&irq, on_rtc).expect("attach the RTC");
    hal::irq::attach(&irqs.timer.physical, on_timeout).expect("attach timer");
    irq
}

/// Unmasks IRQs, raises the alarm and waits for its handler; returns how
/// often the handler ran, counted 2 ms after the wait so a repeated
/// delivery shows.
pub fn raise_and_wait() -> u32 {
    hal::irq::unmask_irqs();
    write(RTCIMSC, 1);
    // A match equal to the count raises the alarm at once; if the second
    // ticked over between the read and the write, try again.
    for round in 1..=TRIES {
        write(RTCMR, read(RTCDR));
        hal::timer::arm_physical_timer(TRY_MS * (hal::timer::frequency() / 1000));
        hal::irq::wait_until(|| {
            RUNS.load(Ordering::Relaxed) > 0 || TIMEOUTS.load(Ordering::Relaxed) >= round
        });
        hal::timer::stop_physical_timer();
        if RUNS.load(Ordering::Relaxed) > 0 {
            break;
        }
    }
    hal::timer::delay_us(2000);
    RUNS.load(Ordering::Relaxed)
}

/// The INTID the handler was dispatched with (`u32::MAX` before it ran).
pub fn dispatched_intid() -> u32 {
    INTID.load(Ordering::Relaxed)
}
