//! Exception vectors and crash reports (Arm ARM DDI 0487, D1.10 "Exception
//! entry", D1.10.2 "Exception vectors"; ESR_EL1, FAR_EL1, ELR_EL1, SPSR_EL1).
//!
//! The main thread runs on SP_EL0 and every exception is taken on SP_EL1, a
//! separate stack with its own guard page, so a main-stack overflow is still
//! reported. An unexpected synchronous exception prints a decoded report and
//! exits with [`crate::exit::CRASH`]. A test can instead [`catch`] one
//! expected fault: the handler records it, prints the same report, and resumes
//! after the faulting access.

use crate::esr;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

core::arch::global_asm!(
    r#"
.macro VENTRY kind
    .balign 0x80
    sub     sp, sp, #288
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       __exception_common
.endm

.section .text.vectors, "ax"
.balign 2048
.global __vectors
__vectors:
    // Current EL with SP_EL0 (the main thread).
    VENTRY 0
    VENTRY 1
    VENTRY 2
    VENTRY 3
    // Current EL with SP_ELx (an exception inside the exception handler).
    VENTRY 4
    VENTRY 5
    VENTRY 6
    VENTRY 7
    // Lower EL, AArch64.
    VENTRY 8
    VENTRY 9
    VENTRY 10
    VENTRY 11
    // Lower EL, AArch32.
    VENTRY 12
    VENTRY 13
    VENTRY 14
    VENTRY 15

__exception_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x2, elr_el1
    stp     x30, x2, [sp, #240]
    mrs     x2, spsr_el1
    mrs     x3, esr_el1
    stp     x2, x3, [sp, #256]
    mrs     x2, far_el1
    str     x2, [sp, #272]
    mov     x1, sp
    bl      hal_exception
    // Returned: the fault was expected; ELR/x30 may have been edited.
    ldp     x30, x2, [sp, #240]
    msr     elr_el1, x2
    ldr     x2, [sp, #256]
    msr     spsr_el1, x2
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #288
    eret
"#
);

/// Registers saved on exception entry (layout fixed by the vector code above).
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    /// x0 to x30.
    pub x: [u64; 31],
    /// ELR_EL1: where the exception was taken.
    pub elr: u64,
    /// SPSR_EL1: the interrupted PSTATE.
    pub spsr: u64,
    /// ESR_EL1: the syndrome.
    pub esr: u64,
    /// FAR_EL1: the faulting address (valid for aborts).
    pub far: u64,
}

/// Which vector an exception came through.
const KIND_NAMES: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];

/// A fault recorded by [`catch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub struct CaughtFault {
    /// ESR_EL1 at the fault.
    pub esr: u64,
    /// FAR_EL1 at the fault.
    pub far: u64,
    /// ELR_EL1 at the fault.
    pub elr: u64,
}

impl CaughtFault {
    /// The exception class in words.
    pub fn class_name(&self) -> &'static str {
        esr::class_name(esr::exception_class(self.esr))
    }
    /// The decoded abort, if it was one.
    pub fn abort(&self) -> Option<esr::Abort> {
        esr::decode_abort(self.esr)
    }
}

static ARMED: AtomicBool = AtomicBool::new(false);
static CAUGHT: AtomicBool = AtomicBool::new(false);
static CAUGHT_ESR: AtomicU64 = AtomicU64::new(0);
static CAUGHT_FAR: AtomicU64 = AtomicU64::new(0);
static CAUGHT_ELR: AtomicU64 = AtomicU64::new(0);

/// Runs `f`, expecting it to take one synchronous exception at EL1 (a data
/// abort on a load/store, or an instruction abort from branching to a
/// non-executable address). Returns the fault, or `None` if `f` finished
/// without faulting.
///
/// After a data abort execution resumes at the next instruction; after an
/// instruction abort it resumes at the return address in x30, so `f` should
/// reach the bad address through a call (`blr`).
pub fn catch(f: impl FnOnce()) -> Option<CaughtFault> {
    CAUGHT.store(false, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    CAUGHT.load(Ordering::SeqCst).then(|| CaughtFault {
        esr: CAUGHT_ESR.load(Ordering::SeqCst),
        far: CAUGHT_FAR.load(Ordering::SeqCst),
        elr: CAUGHT_ELR.load(Ordering::SeqCst),
    })
}

/// What a fault annotator says about a faulting address, if anything.
pub type FaultNote = fn(far: u64) -> Option<&'static str>;

/// The annotator's address (0: none).
static ANNOTATOR: AtomicU64 = AtomicU64::new(0);

/// Installs `f` to add a line about the faulting address to every abort
/// report (the firmware says whether the frame is ballooned). `f` runs in
/// the exception handler: it must not take locks or fault.
pub fn set_fault_note(f: FaultNote) {
    ANNOTATOR.store(f as usize as u64, Ordering::SeqCst);
}

fn fault_note(far: u64) -> Option<&'static str> {
    let a = ANNOTATOR.load(Ordering::SeqCst);
    if a == 0 {
        return None;
    }
    // SAFETY: a non-zero value was stored by `set_fault_note` from a
    // `FaultNote` function pointer, and function pointers round-trip
    // through usize.
    let f: FaultNote = unsafe { core::mem::transmute::<usize, FaultNote>(a as usize) };
    f(far)
}

/// Prints the decoded report for an exception.
pub fn report(kind: u64, frame: &Frame) {
    let ec = esr::exception_class(frame.esr);
    let from_el = (frame.spsr >> 2) & 3;
    let stack = if frame.spsr & 1 == 1 {
        "SP_ELx"
    } else {
        "SP_EL0"
    };
    defmt::error!(
        "exception: {=str} ({=str}), taken from EL{=u64} on {=str}",
        esr::class_name(ec),
        KIND_NAMES[(kind & 3) as usize],
        from_el,
        stack
    );
    defmt::error!("  ESR_EL1 = {=u64:#018x}  EC = {=u8:#04x}", frame.esr, ec);
    defmt::error!(
        "  ELR_EL1 = {=u64:#018x}  FAR_EL1 = {=u64:#018x}",
        frame.elr,
        frame.far
    );
    if let Some(a) = esr::decode_abort(frame.esr) {
        let access = if a.instruction {
            "instruction fetch"
        } else if a.write {
            "write"
        } else {
            "read"
        };
        match a.kind.level() {
            Some(level) => defmt::error!(
                "  cause: {=str} at level {=u8} on {=str}",
                a.kind.name(),
                level,
                access
            ),
            None => defmt::error!("  cause: {=str} on {=str}", a.kind.name(), access),
        }
        if let Some(note) = fault_note(frame.far) {
            defmt::error!("  FAR frame: {=str}", note);
        }
    }
    defmt::error!(
        "  x29 (fp) = {=u64:#018x}  x30 (lr) = {=u64:#018x}",
        frame.x[29],
        frame.x[30]
    );
}

#[no_mangle]
extern "C" fn hal_exception(kind: u64, frame: &mut Frame) {
    let synchronous_here = kind == 0 || kind == 4;
    if synchronous_here && ARMED.swap(false, Ordering::SeqCst) {
        CAUGHT_ESR.store(frame.esr, Ordering::SeqCst);
        CAUGHT_FAR.store(frame.far, Ordering::SeqCst);
        CAUGHT_ELR.store(frame.elr, Ordering::SeqCst);
        CAUGHT.store(true, Ordering::SeqCst);
        defmt::warn!("expected fault caught; report follows");
        report(kind, frame);
        let ec = esr::exception_class(frame.esr);
        if !esr::is_data_abort(ec) && frame.elr == frame.far {
            // Branched to a non-executable address: return to the caller.
            frame.elr = frame.x[30];
        } else {
            frame.elr += 4;
        }
        return;
    }
    report(kind, frame);
    crate::power::exit(crate::exit::CRASH)
}
