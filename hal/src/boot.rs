//! Reset entry and the drop to EL1 (Arm ARM DDI 0487M.a.a, D1.1 "Exception levels",
//! D1.4.4 "Exception return"; registers SCR_EL3, HCR_EL2, SPSR_ELx, CPTR_ELx,
//! CPACR_EL1, CNTHCTL_EL2).
//!
//! Whatever EL the loader enters at (EL3 with `secure=on`, EL2 with
//! `virtualization=on`, EL1 by default), the core continues at EL1h with
//! FP/SIMD enabled, BSS zeroed, exceptions on their own stack (SP_EL1), the
//! main thread on SP_EL0, and VBAR_EL1 set. Secondary cores are parked.

use aarch64_cpu::{asm::barrier, registers::*};
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

core::arch::global_asm!(
    r#"
.section .text.boot, "ax"
.global _start
// The Linux arm64 Image header (Documentation/arch/arm64/booting.rst), so
// the raw image (kernel8.img) boots like a kernel: a loader honours
// text_offset 0 (the image at RAM base + 2 MiB, our link address) and
// starts at offset 0, which branches over the header.
_start:
    b       _start_code             // code0
    .long   0                       // code1
    .quad   0                       // text_offset
    .quad   __image_size            // image_size (with BSS and stacks)
    .quad   0xa                     // flags: little-endian, 4 KiB pages, anywhere
    .quad   0                       // res2
    .quad   0                       // res3
    .quad   0                       // res4
    .ascii  "ARM\x64"               // magic
    .long   0                       // res5 (no PE header)

_start_code:
    // x0 may carry the DTB address (Linux boot protocol); keep it, and x1
    // (0 from a loader; the re-entry self-test marks its second entry).
    mov     x19, x0
    mov     x22, x1
    // Park every core but the first (MPIDR Aff0..Aff2 all zero) before any
    // memory is touched: on raspi's ELF boot all four start here at once.
    mrs     x1, mpidr_el1
    and     x1, x1, #0xffffff
    cbnz    x1, hal_holding_pen
    mrs     x20, CurrentEL
    ubfx    x20, x20, #2, #2
    // Entered with the MMU or caches on (U-Boot's bootelf and go): clean
    // and invalidate the data caches to the PoC by set/way while they are
    // still on, then turn MMU and caches off (Arm ARM D7.5.9, D8.2.12.1).
    // No store happens in between, so nothing can be left dirty behind.
    bl      hal_entry_mmu_caches_off_asm
    // FP/SIMD must be untrapped before any Rust code runs: rustc emits SIMD
    // for aarch64-unknown-none. CPTR_EL3.TFP (bit 10) = 0; CPTR_EL2 with
    // E2H = 0: RES1 bits 13:12 and 9:0, TFP = 0.
    cmp     x20, #3
    b.ne    1f
    msr     cptr_el3, xzr
    b       2f
1:  cmp     x20, #2
    b.ne    2f
    mov     x1, #0x33ff
    msr     cptr_el2, x1
2:  mov     x1, #(3 << 20)          // CPACR_EL1.FPEN = 0b11
    msr     cpacr_el1, x1
    isb
    adrp    x1, __main_stack_top
    add     x1, x1, :lo12:__main_stack_top
    mov     sp, x1
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
3:  cmp     x1, x2
    b.hs    4f
    stp     xzr, xzr, [x1], #16
    b       3b
4:  mov     x0, x19
    mov     x1, x20
    mov     x2, x21
    mov     x3, x22
    bl      hal_drop_to_el1
9:  wfe
    b       9b

// A core other than the first, MMU off, at the entry EL: Aff0 below
// MAX_CPUS (8) with Aff1 = Aff2 = 0 announces itself in HAL_PEN.arrived
// and waits for an entry address in HAL_PEN.release (hal::smp), which it
// enters with x0 = its index. Plain loads and stores only: with the MMU
// off they are Device accesses, and the boot core cleans the lines it
// shares with us to the point of coherency.
hal_holding_pen:
    tst     x1, #0xffff00
    b.ne    8f
    cmp     x1, #8
    b.hs    8f
    adrp    x2, HAL_PEN
    add     x2, x2, :lo12:HAL_PEN
    mov     x3, #1
    str     x3, [x2, x1, lsl #3]
    add     x2, x2, #64
    dsb     sy
5:  wfe
    ldr     x3, [x2, x1, lsl #3]
    cbz     x3, 5b
    mov     x0, x1
    br      x3
8:  wfe
    b       8b

// Entered at EL1 (by eret or directly) with x0 = DTB hint, x1 = entry EL.
.global _start_el1
_start_el1:
    msr     spsel, #1
    adrp    x2, __exception_stack_top
    add     x2, x2, :lo12:__exception_stack_top
    mov     sp, x2
    adrp    x2, __main_stack_top
    add     x2, x2, :lo12:__main_stack_top
    msr     sp_el0, x2
    msr     spsel, #0
    adrp    x2, __vectors
    add     x2, x2, :lo12:__vectors
    msr     vbar_el1, x2
    isb
    bl      hal_el1_start
    b       9b

// The holding pen's slots (hal::smp): arrived[8], then release[8]. In .data,
// not .bss: parked cores write it before the boot core zeroes BSS.
.pushsection .data.hal_pen, "aw"
.balign 64
.global HAL_PEN
HAL_PEN:
    .zero   128
.popsection
"#
);

extern "C" {
    fn _start_el1(dtb: u64, entry_el: u64) -> !;
}

/// SPSR value for the eret: EL1h (M = 0b0101) with D, A, I and F masked.
const SPSR_EL1H_MASKED: u64 = 0x3c5;
/// SCTLR_EL1 with every RES1 bit of Armv8.0 set, MMU and caches off,
/// little-endian, alignment checks off.
const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

static ENTRY_EL: AtomicU8 = AtomicU8::new(0);
static DTB_HINT: AtomicU64 = AtomicU64::new(0);
static ENTRY_SCTLR: AtomicU64 = AtomicU64::new(0);
static ENTRY_X1: AtomicU64 = AtomicU64::new(0);
static RUST_ENTRY_SCTLR: AtomicU64 = AtomicU64::new(0);

/// SCTLR_ELx of the entry EL as the first Rust code saw it: the entry
/// path must have turned the MMU and caches off by then.
pub fn sctlr_at_rust_entry() -> u64 {
    RUST_ENTRY_SCTLR.load(Ordering::Relaxed)
}

/// SCTLR_ELx of the entry EL as the loader left it (before the entry
/// path turned the MMU and caches off).
pub fn entry_sctlr() -> u64 {
    ENTRY_SCTLR.load(Ordering::Relaxed)
}

/// True when the loader entered us with the MMU or the data cache on
/// (SCTLR_ELx.M or .C), which the entry path cleaned and turned off.
pub fn entered_with_mmu_or_caches_on() -> bool {
    entry_sctlr() & 0b101 != 0
}

/// x1 as the loader passed it (0 under the Linux boot protocol).
pub fn entry_x1() -> u64 {
    ENTRY_X1.load(Ordering::Relaxed)
}

/// The exception level the core was entered at (1, 2 or 3).
pub fn entry_el() -> u8 {
    ENTRY_EL.load(Ordering::Relaxed)
}

/// The DTB address the loader passed in x0 (0 if none).
pub fn dtb_hint() -> u64 {
    DTB_HINT.load(Ordering::Relaxed)
}

/// The exception level we run at now.
pub fn current_el() -> u8 {
    CurrentEL.read(CurrentEL::EL) as u8
}

fn el2_implemented() -> bool {
    // ID_AA64PFR0_EL1.EL2, bits 11:8 (aarch64-cpu names only some fields).
    (ID_AA64PFR0_EL1.get() >> 8) & 0xf != 0
}

/// ICC_SRE_ELx value: SRE (bit 0, system-register interface), DFB and DIB
/// (bits 2:1, FIQ/IRQ bypass off) and Enable (bit 3, lower ELs may use
/// ICC_SRE_EL1 without trapping) (GIC IHI 0069, 12.2.15/12.2.16).
const ICC_SRE_OPEN: u64 = 0xf;

/// True if the PE has a GICv3 CPU interface with system registers
/// (ID_AA64PFR0_EL1.GIC, bits 27:24); only then do ICC_SRE_ELx exist.
fn gic_system_registers() -> bool {
    (ID_AA64PFR0_EL1.get() >> 24) & 0xf != 0
}

/// Opens the GICv3 CPU interface's system registers to EL1 from EL3.
fn open_gic_system_registers_el3() {
    if gic_system_registers() {
        // SAFETY: ICC_SRE_EL3 exists (checked above) and we run at EL3;
        // setting SRE and Enable only allows lower-EL access.
        unsafe { core::arch::asm!("msr S3_6_C12_C12_5, {0}", "isb", in(reg) ICC_SRE_OPEN) };
    }
}

/// Prepares EL2 so that EL1 runs AArch64 with direct access to the physical
/// counter and timer.
fn configure_el2_for_el1() {
    HCR_EL2.write(HCR_EL2::RW::EL1IsAarch64);
    CNTHCTL_EL2.write(CNTHCTL_EL2::EL1PCEN::SET + CNTHCTL_EL2::EL1PCTEN::SET);
    CNTVOFF_EL2.set(0);
    if gic_system_registers() {
        // SAFETY: ICC_SRE_EL2 exists (checked above) and we run at EL2 or
        // EL3 (with ICC_SRE_EL3.Enable set first); it only allows EL1 access.
        unsafe { core::arch::asm!("msr S3_4_C12_C9_5, {0}", "isb", in(reg) ICC_SRE_OPEN) };
    }
}

#[no_mangle]
extern "C" fn hal_drop_to_el1(dtb: u64, entry_el: u64, sctlr: u64, x1: u64) -> ! {
    ENTRY_EL.store(entry_el as u8, Ordering::Relaxed);
    DTB_HINT.store(dtb, Ordering::Relaxed);
    ENTRY_SCTLR.store(sctlr, Ordering::Relaxed);
    ENTRY_X1.store(x1, Ordering::Relaxed);
    let now = match entry_el {
        3 => SCTLR_EL3.get(),
        2 => SCTLR_EL2.get(),
        _ => SCTLR_EL1.get(),
    };
    RUST_ENTRY_SCTLR.store(now, Ordering::Relaxed);
    SCTLR_EL1.set(SCTLR_EL1_RESET);
    let target = _start_el1 as *const () as u64;
    match entry_el {
        3 => {
            open_gic_system_registers_el3();
            // SAFETY: at EL3 with the MMU off, on the one running core,
            // before anything else touches the GIC. A failure leaves the
            // GIC Secure; the Non-secure bring-up then reports it.
            let _ = unsafe { crate::irq::secure::hand_over_at_el3() };
            if el2_implemented() {
                configure_el2_for_el1();
            }
            // NS = 1 (EL1 is Non-secure), RES1 bits 5:4, HCE = 1, RW = 1
            // (the next lower EL is AArch64).
            SCR_EL3.set((1 << 0) | (3 << 4) | (1 << 8) | (1 << 10));
            SPSR_EL3.set(SPSR_EL1H_MASKED);
            ELR_EL3.set(target);
        }
        2 => {
            configure_el2_for_el1();
            SPSR_EL2.set(SPSR_EL1H_MASKED);
            ELR_EL2.set(target);
        }
        _ => {
            // SAFETY: _start_el1 only needs x0/x1 and the linker symbols it
            // loads; we are at EL1 already with FP enabled and BSS zeroed.
            unsafe { _start_el1(dtb, entry_el) }
        }
    }
    barrier::isb(barrier::SY);
    // SAFETY: ELR_ELx and SPSR_ELx were set above to enter _start_el1 at EL1h
    // with interrupts masked; x0/x1 still hold the DTB hint and entry EL
    // because eret preserves general-purpose registers.
    unsafe { core::arch::asm!("eret", in("x0") dtb, in("x1") entry_el, options(noreturn)) }
}

extern "C" {
    /// Provided by the firmware binary or by embedded-test.
    fn main() -> !;
}

#[no_mangle]
extern "C" fn hal_el1_start(dtb: u64, entry_el: u64) -> ! {
    // On the EL1-entry path hal_drop_to_el1 already stored these; storing
    // again is harmless and covers the eret paths.
    ENTRY_EL.store(entry_el as u8, Ordering::Relaxed);
    DTB_HINT.store(dtb, Ordering::Relaxed);
    crate::percpu::install(0);
    crate::uart::init();
    // SAFETY: `main` is the single entry point the final binary defines
    // (firmware's main.rs or embedded-test's harness); it takes no arguments
    // and never returns.
    unsafe { main() }
}

/// Enters the image at its entry point again the way U-Boot's `go` and
/// `bootelf` do: at this EL, with the MMU and caches as they are, x0 = the
/// DTB hint and x1 = `mark` (a loader passes 0). The entry path cleans and
/// turns off the caches and MMU, zeroes BSS and boots from scratch; nothing
/// of this run survives.
pub fn reenter(mark: u64) -> ! {
    let entry = crate::image::whole().start;
    crate::uart::CONSOLE.flush();
    // SAFETY: not a return path: the entry code takes only x0/x1 and sets
    // everything else up from scratch; nothing of this run is used after.
    unsafe {
        core::arch::asm!(
            "br {e}",
            e = in(reg) entry,
            in("x0") dtb_hint(),
            in("x1") mark,
            options(noreturn)
        )
    }
}

/// The stack pointer in use and SPSel (0: SP_EL0, the main thread's stack;
/// 1: SP_ELx, the exception stack) where this is called.
#[inline(always)]
pub fn stack_pointer_and_spsel() -> (u64, u64) {
    let (sp, spsel): (u64, u64);
    // SAFETY: reads SP and SPSel; no side effects.
    unsafe {
        core::arch::asm!("mov {0}, sp", "mrs {1}, spsel", out(reg) sp, out(reg) spsel,
            options(nomem, nostack, preserves_flags))
    };
    (sp, spsel)
}
