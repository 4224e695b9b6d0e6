//! The Arm generic timer's physical counter (Arm ARM DDI 0487M.a.a, D12 "The
//! Generic Timer in AArch64 state"; CNTPCT_EL0, CNTFRQ_EL0).

use aarch64_cpu::{asm::barrier, registers::*};

/// Counter ticks since reset. An ISB first so the read is not speculated
/// ahead of earlier instructions (D12.1.2).
pub fn ticks() -> u64 {
    barrier::isb(barrier::SY);
    CNTPCT_EL0.get()
}

/// Counter frequency in Hz (as the loader programmed CNTFRQ_EL0; the
/// board's nominal frequency when the loader left it 0).
pub fn frequency() -> u64 {
    match CNTFRQ_EL0.get() {
        0 => crate::board::CURRENT.timer_hz,
        f => f,
    }
}

/// Microseconds since reset; 0 if CNTFRQ_EL0 was never programmed.
pub fn uptime_us() -> u64 {
    let f = frequency();
    if f == 0 {
        return 0;
    }
    ((ticks() as u128 * 1_000_000) / f as u128) as u64
}

/// Converts a tick count to nanoseconds (0 if CNTFRQ_EL0 is unset).
pub fn ticks_to_ns(ticks: u64) -> u64 {
    match frequency() {
        0 => 0,
        f => ((ticks as u128 * 1_000_000_000) / f as u128) as u64,
    }
}

/// Busy-waits for at least `us` microseconds.
pub fn delay_us(us: u64) {
    let f = frequency();
    let start = ticks();
    let wait = (us as u128 * f as u128 / 1_000_000) as u64;
    while ticks().wrapping_sub(start) < wait {
        core::hint::spin_loop();
    }
}

/// Arms the EL1 physical timer (CNTP_CVAL_EL0, CNTP_CTL_EL0) to assert its
/// interrupt `ticks` counter ticks from now. The interrupt is level
/// sensitive: it stays asserted until [`stop_physical_timer`] (or a new
/// deadline), so its handler must call one of them.
pub fn arm_physical_timer(ticks: u64) {
    CNTP_CVAL_EL0.set(self::ticks().wrapping_add(ticks));
    CNTP_CTL_EL0.write(CNTP_CTL_EL0::ENABLE::SET + CNTP_CTL_EL0::IMASK::CLEAR);
    barrier::isb(barrier::SY);
}

/// Stops the EL1 physical timer; its interrupt is deasserted.
pub fn stop_physical_timer() {
    CNTP_CTL_EL0.write(CNTP_CTL_EL0::ENABLE::CLEAR);
    barrier::isb(barrier::SY);
}

/// True while the EL1 physical timer is enabled and its deadline has passed
/// (CNTP_CTL_EL0.ISTATUS), whether or not the interrupt was taken.
pub fn physical_timer_condition() -> bool {
    CNTP_CTL_EL0.matches_all(CNTP_CTL_EL0::ENABLE::SET + CNTP_CTL_EL0::ISTATUS::SET)
}
