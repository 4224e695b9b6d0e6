//! The defmt global logger: frames go out on the console PL011, timestamps
//! come from the generic timer (defmt 1.x `global_logger` contract).
//!
//! Single core, so a critical section is "mask interrupts": `acquire` saves
//! DAIF and masks everything, `release` restores it.

use aarch64_cpu::registers::{Readable, Writeable, DAIF};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

#[defmt::global_logger]
struct Logger;

struct State {
    encoder: UnsafeCell<defmt::Encoder>,
    saved_daif: UnsafeCell<u64>,
}

// SAFETY: the cells are touched only between acquire and release, which run
// with interrupts masked on the single core, and TAKEN rejects re-entry.
unsafe impl Sync for State {}

static STATE: State = State {
    encoder: UnsafeCell::new(defmt::Encoder::new()),
    saved_daif: UnsafeCell::new(0),
};
static TAKEN: AtomicBool = AtomicBool::new(false);

fn out(bytes: &[u8]) {
    crate::uart::CONSOLE.write_bytes(bytes);
}

// SAFETY: defmt's contract for these four functions is met: acquire/release
// bracket every frame, re-entrant acquire panics instead of corrupting the
// stream, and write/flush only run between them.
unsafe impl defmt::Logger for Logger {
    fn acquire() {
        let daif = DAIF.get();
        DAIF.set(daif | (0xf << 6));
        if TAKEN.swap(true, Ordering::Acquire) {
            // A log statement inside the logger (or an exception while
            // logging): drop the nested frame rather than interleave.
            DAIF.set(daif);
            return;
        }
        // SAFETY: we hold TAKEN with interrupts masked (see `State`).
        unsafe {
            *STATE.saved_daif.get() = daif;
            (*STATE.encoder.get()).start_frame(out);
        }
    }

    unsafe fn flush() {
        crate::uart::CONSOLE.flush();
    }

    unsafe fn release() {
        // SAFETY: called after acquire, with TAKEN held and interrupts masked.
        let daif = unsafe {
            (*STATE.encoder.get()).end_frame(out);
            *STATE.saved_daif.get()
        };
        TAKEN.store(false, Ordering::Release);
        DAIF.set(daif);
    }

    unsafe fn write(bytes: &[u8]) {
        // SAFETY: called between acquire and release (defmt's contract).
        unsafe { (*STATE.encoder.get()).write(bytes, out) }
    }
}

defmt::timestamp!("{=u64:us}", crate::timer::uptime_us());

#[defmt::panic_handler]
fn defmt_panic() -> ! {
    crate::power::exit(crate::exit::PANIC)
}
