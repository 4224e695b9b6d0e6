//! The defmt global logger: frames go out on the console PL011, timestamps
//! come from the generic timer (defmt 1.x `global_logger` contract).
//!
//! One core writes a frame at a time: `acquire` masks interrupts (saving
//! DAIF) and takes the logger for this core (a compare-exchange of
//! [`OWNER`] from "nobody" to this core's index, spinning while another
//! core holds it); `release` gives it back and restores DAIF. A synchronous
//! exception can still arrive on the owning core while a frame is open (a
//! fault in the middle of a log statement); if its handler logs, that
//! nested frame is dropped whole — `acquire`, `write` and `release` all see
//! the nesting depth — so the outer frame stays intact and the stream stays
//! decodable.

use aarch64_cpu::registers::{Readable, Writeable, DAIF};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

#[defmt::global_logger]
struct Logger;

struct State {
    encoder: UnsafeCell<defmt::Encoder>,
    saved_daif: UnsafeCell<u64>,
}

// SAFETY: the cells are touched only by the outermost acquire/write/release
// of the core that holds [`OWNER`], with interrupts masked there.
unsafe impl Sync for State {}

static STATE: State = State {
    encoder: UnsafeCell::new(defmt::Encoder::new()),
    saved_daif: UnsafeCell::new(0),
};
const NOBODY: u32 = u32::MAX;
/// The core whose frame is open, or [`NOBODY`]. Taken with Acquire, given
/// back with Release: the next owner sees the encoder state as left.
static OWNER: AtomicU32 = AtomicU32::new(NOBODY);
/// Owner only: 1 while its frame is written; more: nested (dropped).
static DEPTH: AtomicU8 = AtomicU8::new(0);

fn out(bytes: &[u8]) {
    crate::uart::CONSOLE.write_bytes(bytes);
}

// SAFETY: defmt's contract for these four functions is met: acquire/release
// bracket every frame, one core at a time, a re-entrant frame is dropped
// instead of corrupting the stream, and write/flush only run between them.
unsafe impl defmt::Logger for Logger {
    fn acquire() {
        let daif = DAIF.get();
        DAIF.set(daif | (0xf << 6));
        let me = crate::percpu::index() as u32;
        if OWNER.load(Ordering::Relaxed) == me {
            // Nested (a log statement in an exception taken mid-frame on
            // this core): this frame is dropped; DAIF stays as the outer
            // acquire saved it.
            DEPTH.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Acquire: pairs with the Release store of NOBODY in `release`, so
        // this core sees the encoder state the previous owner left.
        while OWNER
            .compare_exchange_weak(NOBODY, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        DEPTH.store(1, Ordering::Relaxed);
        // SAFETY: this core owns the logger, interrupts masked (see `State`).
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
            DEPTH.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        // SAFETY: the outermost frame of the owning core, interrupts masked.
        let daif = unsafe {
            (*STATE.encoder.get()).end_frame(out);
            *STATE.saved_daif.get()
        };
        DEPTH.store(0, Ordering::Relaxed);
        // Release: pairs with the Acquire CAS in `acquire`.
        OWNER.store(NOBODY, Ordering::Release);
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
