//! The IRQ exception entry (Arm ARM DDI 0487, D1.4.2 "Exception entry";
//! AAPCS64 6.1.1 for which registers a call may clobber).
//!
//! The vector table's two "current EL" IRQ slots (from the main thread on
//! SP_EL0, and from a handler on SP_ELx) branch here. An interrupt can land
//! anywhere, including in the middle of SIMD code (rustc uses q registers
//! for copies on this target), so everything a Rust call may clobber is
//! saved: x0-x18, x29, x30, q0-q7, q16-q31, FPCR and FPSR, plus ELR_EL1 and
//! SPSR_EL1 in case the handler takes a (probed) synchronous exception.
//! x19-x28 and d8-d15 are callee-saved and preserved by the handler itself.

core::arch::global_asm!(
    r#"
.section .text.irq_entry, "ax"
.global __irq_entry
.balign 4
__irq_entry:
    sub     sp, sp, #592
    stp     x0, x1, [sp, #0]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x29, [sp, #144]
    mrs     x0, elr_el1
    stp     x30, x0, [sp, #160]
    mrs     x0, spsr_el1
    mrs     x1, fpcr
    stp     x0, x1, [sp, #176]
    mrs     x0, fpsr
    str     x0, [sp, #192]
    stp     q0, q1, [sp, #208]
    stp     q2, q3, [sp, #240]
    stp     q4, q5, [sp, #272]
    stp     q6, q7, [sp, #304]
    stp     q16, q17, [sp, #336]
    stp     q18, q19, [sp, #368]
    stp     q20, q21, [sp, #400]
    stp     q22, q23, [sp, #432]
    stp     q24, q25, [sp, #464]
    stp     q26, q27, [sp, #496]
    stp     q28, q29, [sp, #528]
    stp     q30, q31, [sp, #560]
    bl      hal_irq_entry
    ldp     q30, q31, [sp, #560]
    ldp     q28, q29, [sp, #528]
    ldp     q26, q27, [sp, #496]
    ldp     q24, q25, [sp, #464]
    ldp     q22, q23, [sp, #432]
    ldp     q20, q21, [sp, #400]
    ldp     q18, q19, [sp, #368]
    ldp     q16, q17, [sp, #336]
    ldp     q6, q7, [sp, #304]
    ldp     q4, q5, [sp, #272]
    ldp     q2, q3, [sp, #240]
    ldp     q0, q1, [sp, #208]
    ldr     x0, [sp, #192]
    msr     fpsr, x0
    ldp     x0, x1, [sp, #176]
    msr     spsr_el1, x0
    msr     fpcr, x1
    ldp     x30, x0, [sp, #160]
    msr     elr_el1, x0
    ldp     x18, x29, [sp, #144]
    ldp     x16, x17, [sp, #128]
    ldp     x14, x15, [sp, #112]
    ldp     x12, x13, [sp, #96]
    ldp     x10, x11, [sp, #80]
    ldp     x8, x9, [sp, #64]
    ldp     x6, x7, [sp, #48]
    ldp     x4, x5, [sp, #32]
    ldp     x2, x3, [sp, #16]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #592
    eret
"#
);

/// Called by `__irq_entry` with IRQs masked (PSTATE.I is set on exception
/// entry), on the exception stack.
#[no_mangle]
extern "C" fn hal_irq_entry() {
    super::handle_pending();
}
