//! Exception vectors and crash reports (Arm ARM DDI 0487M.a.a, D1.4.2 "Exception
//! entry", D1.4.1.6 "Exception vectors"; ESR_EL1, FAR_EL1, ELR_EL1, SPSR_EL1).
//!
//! The main thread runs on SP_EL0 and every exception is taken on SP_EL1, a
//! separate stack with its own guard page, so a main-stack overflow is still
//! reported. An unexpected synchronous exception prints a decoded report and
//! exits with [`crate::exit::CRASH`].
//!
//! Expected faults go through probe functions ([`probe_read_u64`],
//! [`probe_write_u64`], [`probe_call`], [`probe_brk`]): each is one
//! instruction registered in advance in an exception table (section
//! `.hal_extable`, entries of PC-relative offsets, like Linux's extable)
//! together with where to resume. The handler resumes only at a registered
//! instruction, hands the syndrome back in registers the probe reads, and
//! needs no global state, so a fault anywhere else is still a crash.

use crate::esr;
use aarch64_cpu::registers::Readable;
use core::sync::atomic::{AtomicU64, Ordering};

core::arch::global_asm!(
    r#"
.macro VENTRY kind
    .balign 0x80
    sub     sp, sp, #288
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       __exception_common
.endm

// IRQs at the current EL go to the interrupt dispatcher (irq/entry.rs).
.macro IRQ_VENTRY
    .balign 0x80
    b       __irq_entry
.endm

.section .text.vectors, "ax"
.balign 2048
.global __vectors
__vectors:
    // Current EL with SP_EL0 (the main thread).
    VENTRY 0
    IRQ_VENTRY
    VENTRY 2
    VENTRY 3
    // Current EL with SP_ELx (an exception inside the exception handler).
    VENTRY 4
    IRQ_VENTRY
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

/// A fault a probe function took.
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

/// Entry kinds of the exception table.
mod entry {
    /// A load or store: resume at the fixup when ELR is the instruction.
    pub const ACCESS: u32 = 0;
    /// A `blr`: resume at the fixup when the branch target's first fetch
    /// faulted (an instruction abort with ELR = FAR and x30 = blr + 4).
    pub const CALL: u32 = 1;
    /// Flag: log one line instead of the full report (memory probing).
    pub const QUIET: u32 = 0x100;
    /// Flag: log nothing (scratch accesses that race an unmap on purpose).
    pub const SILENT: u32 = 0x200;
}

/// One exception-table entry. Offsets are relative to the field's own
/// address, so the table needs no relocation (the image may run anywhere).
#[repr(C)]
struct ExtableEntry {
    insn: i32,
    fixup: i32,
    kind: u32,
}

extern "C" {
    static __extable_start: ExtableEntry;
    static __extable_end: ExtableEntry;
}

fn extable() -> &'static [ExtableEntry] {
    let start = &raw const __extable_start;
    let end = &raw const __extable_end;
    let len = (end as usize - start as usize) / core::mem::size_of::<ExtableEntry>();
    // SAFETY: the linker script puts every `.hal_extable` input section,
    // 4-byte aligned entries of this layout written by the probe functions
    // below, between the two symbols, in read-only data that lives forever.
    unsafe { core::slice::from_raw_parts(start, len) }
}

impl ExtableEntry {
    fn resolve(field: &i32) -> u64 {
        (field as *const i32 as u64).wrapping_add_signed(i64::from(*field))
    }
    fn insn(&self) -> u64 {
        Self::resolve(&self.insn)
    }
    fn fixup(&self) -> u64 {
        Self::resolve(&self.fixup)
    }
}

/// Registers the probe functions and the handler agree on: x20 is 0 going
/// in and 1 after a fault; x21, x22, x23 then hold ESR, FAR and ELR.
/// Callee-saved, so code that [`probe_call`] runs cannot clobber them.
const FLAG_REG: usize = 20;

/// Emits one probe: `$insn` at local label 1, resuming at label 2, with an
/// exception-table entry of kind `$kind`.
macro_rules! probe_asm {
    ($insn:literal, $kind:expr, $($operands:tt)*) => {
        core::arch::asm!(
            concat!("1: ", $insn),
            "2:",
            ".pushsection .hal_extable, \"a\"",
            ".balign 4",
            ".word 1b - .",
            ".word 2b - .",
            ".word {kind}",
            ".popsection",
            kind = const $kind,
            $($operands)*
        )
    };
}

fn probe_result(flag: u64, esr: u64, far: u64, elr: u64) -> Result<(), CaughtFault> {
    if flag == 0 {
        Ok(())
    } else {
        Err(CaughtFault { esr, far, elr })
    }
}

macro_rules! read_probe {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        ///
        /// The read happens if `addr` is mapped (or backed, with the MMU
        /// off): the caller guarantees that reading it has no side effect
        /// anything relies on (it is not a device register that acts on a
        /// read) and that no live `&mut` covers it. `addr` is 8-byte aligned.
        #[inline(never)]
        pub unsafe fn $name(addr: u64) -> Result<u64, CaughtFault> {
            let (value, flag, esr, far, elr): (u64, u64, u64, u64, u64);
            // SAFETY: the caller's contract covers the read; if it faults,
            // the handler resumes at label 2 with x20 = 1 (registered in the
            // exception table), so control always comes back here.
            unsafe {
                probe_asm!("ldr {v}, [{a}]", $kind,
                    a = in(reg) addr,
                    v = lateout(reg) value,
                    inout("x20") 0u64 => flag,
                    lateout("x21") esr,
                    lateout("x22") far,
                    lateout("x23") elr,
                    options(nostack, readonly, preserves_flags));
            }
            probe_result(flag, esr, far, elr).map(|()| value)
        }
    };
}

read_probe!(
    /// Reads the 64-bit word at `addr`, or returns the fault the read took
    /// (logged with the full crash report, marked as expected).
    probe_read_u64,
    entry::ACCESS
);
read_probe!(
    /// [`probe_read_u64`] for probing memory: a fault is logged in one line.
    probe_read_u64_quiet,
    entry::ACCESS | entry::QUIET
);
read_probe!(
    /// [`probe_read_u64`] that logs nothing when it faults.
    probe_read_u64_silent,
    entry::ACCESS | entry::SILENT
);

macro_rules! write_probe {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        ///
        /// If `addr` is writable the write happens: the caller guarantees it
        /// owns that memory (no Rust object or reference it would corrupt)
        /// or that it is a register it may write. `addr` is 8-byte aligned.
        #[inline(never)]
        pub unsafe fn $name(addr: u64, value: u64) -> Result<(), CaughtFault> {
            let (flag, esr, far, elr): (u64, u64, u64, u64);
            // SAFETY: the caller's contract covers the write; a fault
            // resumes at label 2 with x20 = 1 (registered in the exception
            // table).
            unsafe {
                probe_asm!("str {v}, [{a}]", $kind,
                    a = in(reg) addr,
                    v = in(reg) value,
                    inout("x20") 0u64 => flag,
                    lateout("x21") esr,
                    lateout("x22") far,
                    lateout("x23") elr,
                    options(nostack, preserves_flags));
            }
            probe_result(flag, esr, far, elr)
        }
    };
}

write_probe!(
    /// Writes `value` to the 64-bit word at `addr`, or returns the fault the
    /// write took (logged with the full crash report, marked as expected).
    probe_write_u64,
    entry::ACCESS
);
write_probe!(
    /// [`probe_write_u64`] that logs nothing when it faults.
    probe_write_u64_silent,
    entry::ACCESS | entry::SILENT
);

/// Calls the code at `addr` (AAPCS64, no arguments, no result), or returns
/// the instruction abort its first fetch took (an address that is not
/// executable), logged with the full crash report.
///
/// # Safety
///
/// If `addr` is executable its code runs: the caller guarantees it is a
/// function that may be called with no arguments and returns normally.
#[inline(never)]
pub unsafe fn probe_call(addr: u64) -> Result<(), CaughtFault> {
    let (flag, esr, far, elr): (u64, u64, u64, u64);
    // SAFETY: the caller's contract covers running the target; a fault on
    // its first fetch resumes at label 2 with x20 = 1 (a CALL entry). The
    // target may clobber every caller-saved register (clobber_abi).
    unsafe {
        probe_asm!("blr {t}", entry::CALL,
            t = in(reg) addr,
            inout("x20") 0u64 => flag,
            lateout("x21") esr,
            lateout("x22") far,
            lateout("x23") elr,
            clobber_abi("C"));
    }
    probe_result(flag, esr, far, elr)
}

/// Executes `BRK #IMM` and returns the exception it raises (always `Err`;
/// `Ok` would mean the instruction did not trap).
pub fn probe_brk<const IMM: u16>() -> Result<(), CaughtFault> {
    let (flag, esr, far, elr): (u64, u64, u64, u64);
    // SAFETY: BRK has no memory effect; the exception it raises resumes at
    // label 2 with x20 = 1 (registered in the exception table).
    unsafe {
        probe_asm!("brk #{imm}", entry::ACCESS,
            imm = const IMM,
            inout("x20") 0u64 => flag,
            lateout("x21") esr,
            lateout("x22") far,
            lateout("x23") elr,
            options(nomem, nostack, preserves_flags));
    }
    probe_result(flag, esr, far, elr)
}

/// The registered fixup for a synchronous exception described by `frame`,
/// and the entry's kind, if the faulting instruction is a probe.
fn fixup_for(frame: &Frame) -> Option<(u64, u32)> {
    let ec = esr::exception_class(frame.esr);
    extable().iter().find_map(|e| {
        let hit = if e.kind & 0xff == entry::CALL {
            // Instruction abort (EC 0x21) on the target's first fetch.
            ec == 0x21 && frame.elr == frame.far && frame.x[30] == e.insn().wrapping_add(4)
        } else {
            frame.elr == e.insn()
        };
        hit.then(|| (e.fixup(), e.kind))
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
    // Release: pairs with the Acquire load in `fault_note` (a function
    // pointer publishes no data, but the annotator may read statics its
    // installer set up before installing it).
    ANNOTATOR.store(f as usize as u64, Ordering::Release);
}

fn fault_note(far: u64) -> Option<&'static str> {
    // Acquire: pairs with the Release store in `set_fault_note`.
    let a = ANNOTATOR.load(Ordering::Acquire);
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
    // Semihosting without a debugger: an undefined HLT #0xF000, served over
    // the console (semihost_console.rs).
    if synchronous_here && crate::semihost_console::serve(frame) {
        return;
    }
    if let Some((fixup, flags)) = synchronous_here.then(|| fixup_for(frame)).flatten() {
        if flags & entry::SILENT != 0 {
            // Expected and counted by the caller; nothing to say.
        } else if flags & entry::QUIET != 0 {
            defmt::info!(
                "probe: {=str} at {=u64:#x} (FAR {=u64:#x})",
                esr::class_name(esr::exception_class(frame.esr)),
                frame.elr,
                frame.far
            );
        } else {
            defmt::warn!("expected fault caught; report follows");
            report(kind, frame);
        }
        frame.x[FLAG_REG] = 1;
        frame.x[FLAG_REG + 1] = frame.esr;
        frame.x[FLAG_REG + 2] = frame.far;
        frame.x[FLAG_REG + 3] = frame.elr;
        frame.elr = fixup;
        return;
    }
    report(kind, frame);
    crate::power::exit(crate::exit::CRASH)
}

/// An address no stage-1 regime maps and no physical address space reaches:
/// with the MMU off it is beyond every PARange, with it on it is outside
/// TTBR0's input range. Reading it always faults and has no effect.
pub const UNMAPPED: u64 = 0xffff_ffff_ffff_0000;

/// Reads [`UNMAPPED`] through a probe: always the fault (logged with the
/// full report, marked as expected).
pub fn probe_unmapped() -> Result<u64, CaughtFault> {
    // SAFETY: UNMAPPED is mapped nowhere and backed by nothing, so the read
    // has no effect and aliases nothing; its fault comes back as a value.
    unsafe { probe_read_u64(UNMAPPED) }
}

/// [`probe_unmapped`] with the fault logged in one line.
pub fn probe_unmapped_quiet() -> Result<u64, CaughtFault> {
    // SAFETY: as in probe_unmapped.
    unsafe { probe_read_u64_quiet(UNMAPPED) }
}

/// Reads [`UNMAPPED`] with a plain load, not a probe: the fault is an
/// unexpected exception, so the run ends with the crash report (the
/// `selftest=data-abort` path). Returns only if the read did not fault.
pub fn crash_on_unmapped_read() -> u64 {
    // SAFETY: UNMAPPED is backed by nothing: the read has no effect; it
    // faults and the vector handler ends the run with the crash report.
    unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) }
}

/// VBAR_EL1: where this core takes exceptions.
pub fn vbar() -> u64 {
    aarch64_cpu::registers::VBAR_EL1.get()
}
