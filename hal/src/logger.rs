//! The defmt global logger: frames go out on the console PL011, timestamps
//! come from the generic timer (defmt 1.x `global_logger` contract).
//!
//! Single core, so a critical section is "mask interrupts": `acquire` saves
//! DAIF and masks everything, `release` restores it. A synchronous exception
//! can still arrive while a frame is open (a fault in the middle of a log
//! statement); if its handler logs, that nested frame is dropped whole —
//! `acquire`, `write` and `release` all see the nesting depth — so the outer
//! frame stays intact and the stream stays decodable.

use aarch64_cpu::registers::{Readable, Writeable, DAIF};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, Ordering};

#[defmt::global_logger]
struct Logger;

struct State {
    encoder: UnsafeCell<defmt::Encoder>,
    saved_daif: UnsafeCell<u64>,
}

// SAFETY: the cells are touched only by the outermost acquire/write/release
// (DEPTH == 1), which run with interrupts masked on the single core.
unsafe impl Sync for State {}

static STATE: State = State {
    encoder: UnsafeCell::new(defmt::Encoder::new()),
    saved_daif: UnsafeCell::new(0),
};
/// 0: no frame open; 1: a frame is being written; more: nested (dropped).
static DEPTH: AtomicU8 = AtomicU8::new(0);

fn out(bytes: &[u8]) {
    crate::uart::CONSOLE.write_bytes(bytes);
}

// SAFETY: defmt's contract for these four functions is met: acquire/release
// bracket every frame, a re-entrant frame is dropped instead of corrupting
// the stream, and write/flush only run between them.
unsafe impl defmt::Logger for Logger {
    fn acquire() {
        let daif = DAIF.get();
        DAIF.set(daif | (0xf << 6));
        if DEPTH.fetch_add(1, Ordering::Acquire) != 0 {
            // Nested (a log statement in an exception taken mid-frame): this
            // frame is dropped; DAIF stays as the outer acquire saved it.
            return;
        }
        // SAFETY: DEPTH went 0 -> 1 with interrupts masked (see `State`).
        unsafe {
            *STATE.saved_daif.get() = daif;
            (*STATE.encoder.get()).start_frame(out);
        }
    }

    unsafe fn flush() {
        crate::uart::CONSOLE.flush();
    }

    unsafe fn release() {
        if DEPTH.load(Ordering::Relaxed) > 1 {
            DEPTH.fetch_sub(1, Ordering::Release);
            return;
        }
        // SAFETY: the outermost frame (DEPTH == 1), interrupts masked.
        let daif = unsafe {
            (*STATE.encoder.get()).end_frame(out);
            *STATE.saved_daif.get()
        };
        DEPTH.store(0, Ordering::Release);
        DAIF.set(daif);
    }

    unsafe fn write(bytes: &[u8]) {
        if DEPTH.load(Ordering::Relaxed) > 1 {
            return;
        }
        // SAFETY: called between the outermost acquire and release.
        unsafe { (*STATE.encoder.get()).write(bytes, out) }
    }
}

defmt::timestamp!("{=u64:us}", crate::timer::uptime_us());

#[defmt::panic_handler]
fn defmt_panic() -> ! {
    crate::power::exit(crate::exit::PANIC)
}
