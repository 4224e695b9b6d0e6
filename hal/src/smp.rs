//! Secondary cores: how they are started, the path they take to EL1 with
//! the boot core's MMU configuration, and the service loop they idle in.
//!
//! - With PSCI (the device tree's `/psci` conduit, present when the entry
//!   EL is below it): `CPU_ON` (Arm DEN 0022, PSCI 1.1, 5.6) for MPIDR
//!   affinity 0 = 1, 2, … until the firmware says `INVALID_PARAMETERS` (no
//!   such core). A core enters [`secondary entry`](hal_secondary_entry) at the
//!   entry EL with the MMU off.
//! - Entered at EL3 there is no PSCI: every core the model starts at the
//!   image entry (virt with `secure=on`, the Pis' ELF boot) waits in the
//!   holding pen of `boot.rs`, announcing itself in `HAL_PEN`; the boot core
//!   writes the entry address into the core's release slot and sends SEV.
//! - The Pis' raw `kernel8.img` boot (EL2, no PSCI): cores 1-3 wait in the
//!   boot stub's spin table (the board's release slots in the reserved
//!   first page); the entry address goes into the core's slot, cleaned to
//!   the point of coherency, then SEV.
//! - The ZCU102 entered at EL3 holds cores 1-3 in reset: the entry goes
//!   into the core's reset-address registers (RVBARADDRnL/H), then its
//!   reset bit in CRF RST_FPD_APU is cleared, and it starts there at EL3.
//!   The i.MX 8M Plus at EL3 has no way to start them (nobody arrives in
//!   the pen), which is logged.
//!
//! Each core runs at EL1 on its own stacks with guard pages (its slot of
//! `link/sections.ld`), with its own exception stack (SP_EL1), `TPIDR_EL1`
//! pointing at its [`crate::percpu::PerCpu`], and MAIR/TCR/TTBR0/SCTLR_EL1
//! exactly as the boot core programmed them. It then waits for jobs
//! ([`run_on`]) with WFE, or, after [`sleep_when_idle`], sleeps in WFI
//! once it can be woken by an interrupt ([`crate::irq::wake`]: an SGI, or
//! a mailbox bit on the Pi 3; set up by the core itself once the boot core
//! has brought the interrupt controller up). Every request ([`run_on`],
//! [`cpu_off`]) sends SEV and that interrupt, so neither sleep misses one.
//! Going idle, it first drains its frame cache to the buddy.
//!
//! [`cpu_off`] takes a secondary offline: it drains its frame cache, leaves
//! [`online`], and stops (PSCI CPU_OFF where PSCI started it, else parked
//! in WFE); [`cpu_on`] brings it back (CPU_ON through the entry above, or
//! released from the WFE loop) into the service loop.

use crate::board::Secondaries;
use crate::dtb::PsciConduit;
use crate::irq::wake;
use crate::percpu::MAX_CPUS;
use aarch64_cpu::registers::*;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

core::arch::global_asm!(
    r#"
.section .text.hal_secondary, "ax"
// A secondary core, MMU off, at EL3, EL2 or EL1. Its index is MPIDR Aff0
// (checked below MAX_CPUS by the caller that started it).
.global hal_secondary_entry
hal_secondary_entry:
    mrs     x19, mpidr_el1
    and     x19, x19, #0xff
    mrs     x20, CurrentEL
    ubfx    x20, x20, #2, #2
    // FP/SIMD untrapped before any Rust code, as on the boot core.
    cmp     x20, #3
    b.ne    1f
    msr     cptr_el3, xzr
    // The GICv3 system registers open to the lower ELs (ICC_SRE_EL3: SRE,
    // DFB, DIB, Enable), as on the boot core, when the PE has them.
    mrs     x1, id_aa64pfr0_el1
    ubfx    x1, x1, #24, #4
    cbz     x1, 8f
    mov     x1, #0xf
    msr     S3_6_C12_C12_5, x1
    isb
8:  // A GICv2 with Security Extensions that the boot core handed over:
    // this core's banked GICD_IGROUPR0 (its SGIs and PPIs) to Group 1 as
    // well, so its wake-up SGI can reach Non-secure EL1.
    // Its banked GICC_PMR too: a Non-secure write cannot open a mask that
    // resets to 0 (IHI 0048B, 4.4.2), so it is opened here, Secure.
    adrp    x2, HAL_SMP_GIC_SECURE
    add     x2, x2, :lo12:HAL_SMP_GIC_SECURE
    ldp     x3, x4, [x2]
    cbz     x3, 9f
    mov     w1, #-1
    str     w1, [x3, #0x80]         // GICD_IGROUPR0: all Group 1
    mov     w1, #0xff
    str     w1, [x4, #0x04]         // GICC_PMR
    dsb     sy
9:  b       2f
1:  cmp     x20, #2
    b.ne    2f
    mov     x1, #0x33ff
    msr     cptr_el2, x1
2:  mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    isb
    cmp     x20, #1
    b.eq    5f
    // EL2 (present at EL3 entry when implemented): EL1 is AArch64 and
    // reaches the physical counter and timer.
    cmp     x20, #2
    b.eq    3f
    mrs     x1, id_aa64pfr0_el1
    ubfx    x1, x1, #8, #4
    cbz     x1, 4f
3:  mov     x1, #(1 << 31)          // HCR_EL2.RW
    msr     hcr_el2, x1
    mov     x1, #3                  // CNTHCTL_EL2.EL1PCTEN | EL1PCEN
    msr     cnthctl_el2, x1
    msr     cntvoff_el2, xzr
    // ICC_SRE_EL2 likewise, so EL1 may use the GICv3 system registers.
    mrs     x1, id_aa64pfr0_el1
    ubfx    x1, x1, #24, #4
    cbz     x1, 4f
    mov     x1, #0xf
    msr     S3_4_C12_C9_5, x1
    isb
4:  movz    x1, #0x0800
    movk    x1, #0x30d0, lsl #16    // SCTLR_EL1 reset value, MMU off
    msr     sctlr_el1, x1
    adr     x2, 5f
    mov     x1, #0x3c5              // EL1h, DAIF masked
    cmp     x20, #3
    b.ne    6f
    mov     x3, #0x531              // SCR_EL3: NS, RES1 5:4, HCE, RW
    msr     scr_el3, x3
    msr     spsr_el3, x1
    msr     elr_el3, x2
    isb
    eret
6:  msr     spsr_el2, x1
    msr     elr_el2, x2
    isb
    eret
5:  // EL1. Stacks: slot (index - 1) of __secondary_stacks.
    adrp    x2, __secondary_stacks
    add     x2, x2, :lo12:__secondary_stacks
    sub     x3, x19, #1
    movz    x4, #{slot_lo}
    movk    x4, #{slot_hi}, lsl #16
    madd    x2, x3, x4, x2
    add     x5, x2, #{main_top}     // main stack top
    add     x6, x2, x4              // exception stack top (slot end)
    msr     spsel, #1
    mov     sp, x6
    msr     sp_el0, x5
    msr     spsel, #0
    adrp    x2, __vectors
    add     x2, x2, :lo12:__vectors
    msr     vbar_el1, x2
    // The boot core's translation regime (cleaned to the PoC before the
    // start, so these reads with the MMU off see it).
    adrp    x2, HAL_SMP_MMU
    add     x2, x2, :lo12:HAL_SMP_MMU
    ldp     x3, x4, [x2]
    ldp     x5, x6, [x2, #16]
    msr     mair_el1, x3
    msr     tcr_el1, x4
    msr     ttbr0_el1, x5
    isb
    tlbi    vmalle1
    dsb     nsh
    ic      iallu
    dsb     nsh
    isb
    msr     sctlr_el1, x6
    isb
    mov     x0, x19
    bl      hal_secondary_main
7:  wfi
    b       7b
"#,
    slot_lo = const (crate::image::CPU_STACK_SLOT & 0xffff),
    slot_hi = const (crate::image::CPU_STACK_SLOT >> 16),
    main_top = const (4096 + crate::image::CPU_MAIN_STACK),
);

extern "C" {
    fn hal_secondary_entry();
    /// The holding pen (`boot.rs`): `arrived[8]` then `release[8]`.
    static HAL_PEN: [AtomicU64; 2 * MAX_CPUS];
}

/// MAIR, TCR, TTBR0 and SCTLR_EL1 of the boot core, for secondaries.
#[no_mangle]
static HAL_SMP_MMU: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Distributor and CPU interface of a GICv2 with Security Extensions that
/// the boot core handed to the Non-secure world at EL3 (0: none), for
/// secondaries entered at EL3 to hand over their banked GICD_IGROUPR0 and
/// open their GICC_PMR.
#[no_mangle]
static HAL_SMP_GIC_SECURE: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

/// Records the GICv2 handed over at EL3 (`irq::secure`).
pub(crate) fn note_secure_gicv2(distributor: u64, cpu_interface: u64) {
    HAL_SMP_GIC_SECURE[0].store(distributor, Ordering::Relaxed);
    HAL_SMP_GIC_SECURE[1].store(cpu_interface, Ordering::Relaxed);
}

/// Cores that reached Rust code at EL1 (bit per index; the boot core's bit
/// is set from the start).
static ONLINE: AtomicU64 = AtomicU64::new(1);
/// Per core: the job to run (a `fn(usize)` as usize), 0 when none.
static JOBS: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
/// Per core: jobs finished.
static DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per core: jobs posted; a job's ticket is its position in this count.
/// Written only while holding `POSTING`, so tickets follow the order in
/// which jobs entered `JOBS`, which is the order the core runs them.
static POSTED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per core: a poster is between its claim of `JOBS` and its ticket.
static POSTING: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Idle cores sleep in WFI instead of waiting for jobs with WFE.
static SLEEP: AtomicBool = AtomicBool::new(false);
/// How the secondaries were started ([`StartMethod`] as `u8`), which is
/// how they go offline and come back: PSCI CPU_OFF / CPU_ON, else parked.
static METHOD: AtomicU8 = AtomicU8::new(StartMethod::None as u8);
/// The boot core's MPIDR affinity above Aff0 (secondaries differ in Aff0).
static BOOT_AFF: AtomicU64 = AtomicU64::new(0);
/// Per core: [`cpu_off`] asks it to go offline (it clears the flag).
static OFF_REQ: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Per core: parked offline (no PSCI), waiting in WFE until [`cpu_on`]
/// clears it.
static PARKED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Per core: the error code of a CPU_OFF that returned (0: none).
static OFF_ERR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Cores [`cpu_off`] took offline (bit per index), for [`cpu_on`].
static OFFLINE: AtomicU64 = AtomicU64::new(0);
/// Per core: times it went to sleep in WFI.
static WFI_SLEEPS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Cleans and invalidates the cache lines of `[start, start + len)` to the
/// point of coherency, for a core that reads them with its MMU off.
fn clean_to_poc(start: u64, len: u64) {
    let mut a = start & !63;
    while a < start + len {
        // SAFETY: DC CIVAC of a mapped address only writes back and drops a
        // cache line; it changes no memory contents.
        unsafe { core::arch::asm!("dc civac, {0}", in(reg) a, options(nostack, preserves_flags)) };
        a += 64;
    }
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
}

fn pen() -> &'static [AtomicU64; 2 * MAX_CPUS] {
    // SAFETY: HAL_PEN is 16 naturally aligned u64 in .data (boot.rs),
    // written by parked cores with plain stores and by us atomically; it
    // lives forever.
    unsafe { &HAL_PEN }
}

/// How one secondary fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum CoreStart {
    /// Not tried (index 0, or beyond the cores the machine has).
    Absent,
    /// Came up and runs the service loop.
    Online,
    /// PSCI refused CPU_ON with this error code.
    PsciError(i64),
    /// Started, but did not reach EL1 within the timeout.
    Timeout,
}

/// What [`start_secondaries`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub struct SmpReport {
    /// How the cores were started.
    pub method: StartMethod,
    /// Per core index.
    pub cores: [CoreStart; MAX_CPUS],
    /// Cores online, the boot core included.
    pub online: u32,
}

/// How secondaries were started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
#[repr(u8)]
pub enum StartMethod {
    /// PSCI CPU_ON over HVC.
    PsciHvc,
    /// PSCI CPU_ON over SMC.
    PsciSmc,
    /// Released from the holding pen (entered at EL3, no PSCI).
    HoldingPen,
    /// Released from the boot stub's spin table (the Pis' raw
    /// `kernel8.img` boot at EL2).
    SpinTable,
    /// Started from reset at an address written to their reset-address
    /// registers (ZCU102 entered at EL3).
    ResetAddress,
    /// No way to start them here: they stay off (or parked).
    None,
}

const START_TIMEOUT_US: u64 = 1_000_000;

fn wait_online(index: usize) -> bool {
    let t0 = crate::timer::uptime_us();
    // Acquire: pairs with the Release fetch_or of ONLINE in
    // `hal_secondary_main` (first start) or at the end of `go_offline`
    // (released from the WFE loop), so the core's setup is visible.
    while ONLINE.load(Ordering::Acquire) & (1 << index) == 0 {
        if crate::timer::uptime_us() - t0 > START_TIMEOUT_US {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn psci_code(e: smccc::psci::Error) -> i64 {
    i64::from(e)
}

/// Starts every secondary core the machine has, by PSCI where the device
/// tree names a conduit, else from the holding pen when entered at EL3.
/// Call once, on the boot core, after the MMU is on. A core that fails
/// (PSCI error, timeout) is reported and the others carry on.
pub fn start_secondaries(psci: Option<PsciConduit>) -> SmpReport {
    let mut report = SmpReport {
        method: StartMethod::None,
        cores: [CoreStart::Absent; MAX_CPUS],
        online: 1,
    };
    // Acquire (both): pairs with the Release fetch_or of ONLINE in
    // `hal_secondary_main`; anything but 1 means cores were started already.
    if ONLINE.load(Ordering::Acquire) != 1 || crate::percpu::index() != 0 {
        report.online = ONLINE.load(Ordering::Acquire).count_ones();
        return report;
    }
    report.cores[0] = CoreStart::Online;
    HAL_SMP_MMU[0].store(MAIR_EL1.get(), Ordering::Relaxed);
    HAL_SMP_MMU[1].store(TCR_EL1.get(), Ordering::Relaxed);
    HAL_SMP_MMU[2].store(TTBR0_EL1.get(), Ordering::Relaxed);
    HAL_SMP_MMU[3].store(SCTLR_EL1.get(), Ordering::Relaxed);
    clean_to_poc(HAL_SMP_MMU.as_ptr() as u64, 32);
    clean_to_poc(HAL_SMP_GIC_SECURE.as_ptr() as u64, 16);
    let entry = hal_secondary_entry as *const () as u64;
    let boot_aff = MPIDR_EL1.get() & 0xff_00ff_ff00;
    let entry_el = crate::boot::entry_el();
    match (psci, entry_el) {
        (Some(conduit), el) if el < 3 => {
            report.method = match conduit {
                PsciConduit::Hvc => StartMethod::PsciHvc,
                PsciConduit::Smc => StartMethod::PsciSmc,
            };
            let slots = crate::image::stack_slots();
            for (i, slot) in report.cores.iter_mut().enumerate().take(slots).skip(1) {
                let mpidr = boot_aff | i as u64;
                let r = match conduit {
                    PsciConduit::Hvc => smccc::psci::cpu_on::<smccc::Hvc>(mpidr, entry, i as u64),
                    PsciConduit::Smc => smccc::psci::cpu_on::<smccc::Smc>(mpidr, entry, i as u64),
                };
                *slot = match r {
                    Ok(()) if wait_online(i) => CoreStart::Online,
                    Ok(()) => CoreStart::Timeout,
                    // No core with this MPIDR: the machine has no more.
                    Err(smccc::psci::Error::InvalidParameters) => break,
                    Err(e) => CoreStart::PsciError(psci_code(e)),
                };
            }
        }
        (_, 3) if reset_address().is_some() => {
            let (rvbar, apu_reset) = reset_address().unwrap_or_default();
            report.method = StartMethod::ResetAddress;
            let slots = crate::image::stack_slots().min(4);
            for (i, slot) in report.cores.iter_mut().enumerate().take(slots).skip(1) {
                *slot = start_from_reset(i, entry, rvbar, apu_reset);
            }
        }
        (None, 2) if spin_table().is_some() => {
            let release = spin_table().unwrap_or_default();
            report.method = StartMethod::SpinTable;
            let slots = crate::image::stack_slots();
            for (i, slot) in report.cores.iter_mut().enumerate().take(slots).skip(1) {
                let Some(&addr) = release.get(i - 1) else {
                    break;
                };
                *slot = release_from_spin_table(i, entry, addr);
            }
        }
        (_, 3) => {
            report.method = StartMethod::HoldingPen;
            let pen = pen();
            clean_to_poc(pen.as_ptr() as u64, 16 * 8);
            let slots = crate::image::stack_slots();
            for (i, slot) in report.cores.iter_mut().enumerate().take(slots).skip(1) {
                // Acquire pairs with no Rust store: the parked core wrote
                // its `arrived` slot with a plain store (MMU off, so a
                // Device access) followed by DSB SY in `hal_holding_pen`;
                // the clean-and-invalidate above is what makes it visible.
                if pen[i].load(Ordering::Acquire) == 0 {
                    continue;
                }
                // Release: orders the HAL_SMP_MMU stores above before the
                // entry address; the reader is the plain `ldr` of its
                // `release` slot in `hal_holding_pen` (MMU off), for which
                // the clean to PoC below and SEV do the publishing.
                pen[MAX_CPUS + i].store(entry, Ordering::Release);
                clean_to_poc(pen.as_ptr() as u64, 16 * 8);
                aarch64_cpu::asm::sev();
                *slot = if wait_online(i) {
                    CoreStart::Online
                } else {
                    CoreStart::Timeout
                };
            }
        }
        _ => {}
    }
    BOOT_AFF.store(boot_aff, Ordering::Relaxed);
    // Release: pairs with the Acquire load of METHOD in `conduit`.
    METHOD.store(report.method as u8, Ordering::Release);
    // Acquire: pairs with the Release fetch_or of ONLINE in
    // `hal_secondary_main`.
    report.online = ONLINE.load(Ordering::Acquire).count_ones();
    report
}

/// The board's spin-table slots, if it has one.
fn spin_table() -> Option<[u64; 3]> {
    match crate::board::CURRENT.secondaries {
        Secondaries::SpinTable { release } => Some(release),
        _ => None,
    }
}

/// The board's reset-address registers, if it has them.
fn reset_address() -> Option<(u64, u64)> {
    match crate::board::CURRENT.secondaries {
        Secondaries::PsciOrResetAddress { rvbar, apu_reset } => Some((rvbar, apu_reset)),
        _ => None,
    }
}

/// Releases core `index` waiting in the boot stub's spin table (`wfe`,
/// then a load of its slot at `addr` with the MMU off, until non-zero):
/// writes `entry` there, cleans it to the point of coherency and sends SEV.
fn release_from_spin_table(index: usize, entry: u64, addr: u64) -> CoreStart {
    // SAFETY: `addr` is the board's spin-table slot of this core, in the
    // first page of RAM, which the board reserves for the stub and the
    // table (no Rust object lives there); the probe turns a fault (the
    // page not mapped) into an error.
    if unsafe { crate::exception::probe_write_u64(addr, entry) }.is_err() {
        return CoreStart::Timeout;
    }
    clean_to_poc(addr, 8);
    aarch64_cpu::asm::sev();
    if wait_online(index) {
        CoreStart::Online
    } else {
        CoreStart::Timeout
    }
}

/// Starts core `index` (1..=3) held in reset: its reset address (RVBAR,
/// low word at `rvbar + 8 * index`, high at `+ 4`) becomes `entry`, then
/// its bit in `apu_reset` is cleared, and it starts there at EL3.
fn start_from_reset(index: usize, entry: u64, rvbar: u64, apu_reset: u64) -> CoreStart {
    let lo = rvbar + 8 * index as u64;
    let bit = 1u32 << index;
    // SAFETY: the board's APU and CRF register blocks (mapped Device at
    // their own addresses from the board's `mmio` list); 32-bit aligned
    // register accesses with no effect on memory. Only the boot core writes
    // them, once per core.
    unsafe {
        core::ptr::write_volatile(lo as *mut u32, entry as u32);
        core::ptr::write_volatile((lo + 4) as *mut u32, (entry >> 32) as u32);
        let r = apu_reset as *mut u32;
        aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
        let v = core::ptr::read_volatile(r);
        if v & bit == 0 {
            // Out of reset already: it is running something else.
            return CoreStart::Timeout;
        }
        core::ptr::write_volatile(r, v & !bit);
    }
    if wait_online(index) {
        CoreStart::Online
    } else {
        CoreStart::Timeout
    }
}

/// Cores online (bit per index).
pub fn online() -> u64 {
    // Acquire: pairs with the Release fetch_or of ONLINE in
    // `hal_secondary_main` and the Release fetch_and / fetch_or in
    // `go_offline`.
    ONLINE.load(Ordering::Acquire)
}

#[no_mangle]
extern "C" fn hal_secondary_main(index: u64) -> ! {
    let index = index as usize % MAX_CPUS;
    crate::percpu::install(index);
    // Pairs with the Acquire loads of ONLINE in wait_online / online /
    // start_secondaries.
    ONLINE.fetch_or(1 << index, Ordering::Release);
    service_loop(index)
}

fn service_loop(index: usize) -> ! {
    // Why this core cannot be woken from WFI, once `wake::prepare` said so.
    let mut cannot_wake = None;
    loop {
        // Acquire: pairs with the Release compare_exchange in `run_on`,
        // so what the poster wrote before posting is visible to the job.
        let job = JOBS[index].swap(0, Ordering::Acquire);
        if job != 0 {
            // SAFETY: JOBS only ever holds 0 or a `fn(usize)` stored by
            // `run_on`; function pointers round-trip through usize.
            let f: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(job) };
            f(index);
            // Pairs with the Acquire loads of DONE in `wait` and `run_on`.
            DONE[index].fetch_add(1, Ordering::Release);
            aarch64_cpu::asm::sev();
        } else if OFF_REQ[index].load(Ordering::Acquire) {
            // The Acquire load above pairs with the Release store of
            // OFF_REQ in `cpu_off`.
            go_offline(index);
        } else {
            // Going idle: this core's frame cache goes back to the buddy,
            // so no free memory sits with a sleeping core. Refused only if
            // this core holds the allocator's lock, which it cannot here.
            let _ = crate::memory::FRAMES.drain_this_cpu();
            match idle_wait(index, &mut cannot_wake) {
                Idle::Wfi => {
                    WFI_SLEEPS[index].fetch_add(1, Ordering::Relaxed);
                    aarch64_cpu::asm::wfi();
                    wake::acknowledge(index);
                }
                Idle::Recheck => {}
                Idle::Wfe => aarch64_cpu::asm::wfe(),
            }
        }
    }
}

/// How an idle core waits.
enum Idle {
    /// In WFI: it can be woken by an interrupt ([`wake::prepare`] done).
    Wfi,
    /// It just became wakeable: look at the requests once more before the
    /// first WFI (a request made before could have sent only SEV).
    Recheck,
    /// In WFE, where every request's SEV reaches it: before
    /// [`sleep_when_idle`], or while it cannot be woken from WFI (no
    /// interrupt controller yet, or `cannot_wake` says why not).
    Wfe,
}

fn idle_wait(index: usize, cannot_wake: &mut Option<wake::WakeError>) -> Idle {
    if !SLEEP.load(Ordering::Relaxed) || cannot_wake.is_some() {
        return Idle::Wfe;
    }
    if wake::prepared(index) {
        return Idle::Wfi;
    }
    match wake::prepare(index) {
        Ok(()) => {
            // SeqCst: pairs with the SeqCst fence in `kick` (store buffer:
            // either the requester sees this core prepared and raises the
            // interrupt, or this core's next look sees the request).
            core::sync::atomic::fence(Ordering::SeqCst);
            Idle::Recheck
        }
        // No controller yet: it may come (`irq::init` sends SEV).
        Err(wake::WakeError::NoController) => Idle::Wfe,
        Err(e) => {
            defmt::warn!(
                "core {=usize} cannot be woken from WFI ({}): it waits in WFE",
                index,
                e
            );
            *cannot_wake = Some(e);
            Idle::Wfe
        }
    }
}

/// Tells core `index` a request is posted: SEV for a core in WFE, the wake
/// interrupt for one that may sleep in WFI.
fn kick(index: usize) {
    aarch64_cpu::asm::sev();
    // SeqCst: pairs with the SeqCst fence in `idle_wait` (the request
    // stored before this is seen, or the core's prepared state is).
    core::sync::atomic::fence(Ordering::SeqCst);
    // Not prepared: it waits in WFE and has the SEV.
    let _ = wake::wake(index);
}

/// Core `index`, asked to go offline by [`cpu_off`]: its frame cache goes
/// back to the buddy first (no free frame may stay with a core that
/// stops), then it leaves [`online`] and stops: PSCI CPU_OFF where the
/// cores were started by PSCI (a later CPU_ON starts it afresh at
/// [`hal_secondary_entry`]), else a WFE loop until [`cpu_on`] releases it
/// back into the service loop. A CPU_OFF that returns is recorded for
/// [`cpu_off`] and the core rejoins.
fn go_offline(index: usize) {
    let bit = 1u64 << index;
    // Claimed, or withdrawn by a requester that gave up waiting. AcqRel:
    // pairs with the Release store of OFF_REQ in `cpu_off` and races the
    // withdrawing compare_exchange there (exactly one of the two wins).
    if OFF_REQ[index]
        .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    // Refused only if this core holds an allocator lock, which it cannot
    // between jobs. Before leaving `online`: whoever sees the core offline
    // sees its cache empty.
    let _ = crate::memory::FRAMES.drain_this_cpu();
    let psci = conduit();
    if psci.is_none() {
        PARKED[index].store(true, Ordering::Relaxed);
    }
    // No more wake interrupts for it; it prepares again when it is back.
    wake::acknowledge(index);
    wake::forget(index);
    // Release: the drain and the flags above happen before the requester's
    // Acquire load sees the core gone.
    ONLINE.fetch_and(!bit, Ordering::Release);
    aarch64_cpu::asm::sev();
    match psci {
        Some(conduit) => {
            let r = match conduit {
                PsciConduit::Hvc => smccc::psci::cpu_off::<smccc::Hvc>(),
                PsciConduit::Smc => smccc::psci::cpu_off::<smccc::Smc>(),
            };
            // Only a failed CPU_OFF returns: say so and rejoin.
            let code = match r {
                Err(e) => psci_code(e),
                Ok(()) => 0,
            };
            OFF_ERR[index].store(code as u64 | 1 << 63, Ordering::Relaxed);
        }
        None => {
            // Pairs with the Release store in `cpu_on`.
            while PARKED[index].load(Ordering::Acquire) {
                aarch64_cpu::asm::wfe();
            }
        }
    }
    // Release: pairs with the Acquire load of ONLINE in `wait_online`
    // (called by `cpu_on`) and in `online`.
    ONLINE.fetch_or(bit, Ordering::Release);
    aarch64_cpu::asm::sev();
}

/// Why a job could not be posted, or a core not taken offline or back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum SmpError {
    /// The core is not online (or is the caller).
    NotOnline(usize),
    /// The core still has a job pending.
    Busy(usize),
    /// The boot core stays online (it runs the firmware's main thread).
    BootCore,
    /// [`cpu_on`] of a core [`cpu_off`] did not take offline.
    NotOffline(usize),
    /// The core did not go offline or come back within the timeout.
    Timeout(usize),
    /// PSCI refused CPU_OFF (on the core) or CPU_ON with this error code.
    Psci(usize, i64),
}

/// True while core `index` is asked to go offline and has not yet: a job
/// may poll it to return promptly.
pub fn off_requested(index: usize) -> bool {
    OFF_REQ
        .get(index)
        // Acquire: pairs with the Release store of OFF_REQ in `cpu_off`.
        .is_some_and(|r| r.load(Ordering::Acquire))
}

/// Cores [`cpu_off`] took offline (bit per index).
pub fn offline() -> u64 {
    // Acquire: pairs with the AcqRel fetch_or of OFFLINE in `cpu_off` and
    // its fetch_and in `cpu_on`.
    OFFLINE.load(Ordering::Acquire)
}

fn conduit() -> Option<PsciConduit> {
    // Acquire: pairs with the Release store of METHOD at the end of
    // `start_secondaries`.
    match METHOD.load(Ordering::Acquire) {
        m if m == StartMethod::PsciHvc as u8 => Some(PsciConduit::Hvc),
        m if m == StartMethod::PsciSmc as u8 => Some(PsciConduit::Smc),
        _ => None,
    }
}

/// PSCI AFFINITY_INFO says core `index` is OFF.
fn psci_off(conduit: PsciConduit, index: usize) -> bool {
    let mpidr = BOOT_AFF.load(Ordering::Relaxed) | index as u64;
    let lvl = smccc::psci::LowestAffinityLevel::All;
    let r = match conduit {
        PsciConduit::Hvc => smccc::psci::affinity_info::<smccc::Hvc>(mpidr, lvl),
        PsciConduit::Smc => smccc::psci::affinity_info::<smccc::Smc>(mpidr, lvl),
    };
    r == Ok(smccc::psci::AffinityState::Off)
}

/// Takes secondary `index` offline: once it has finished its current job
/// it drains its frame cache to the buddy and stops (PSCI CPU_OFF, or
/// parked in WFE where the cores were not started by PSCI). Returns when
/// it is off. A core asleep in WFI ([`sleep_when_idle`]) is woken by the
/// wake interrupt ([`crate::irq::wake`]).
///
/// # Errors
///
/// [`SmpError::BootCore`] for core 0; [`SmpError::NotOnline`] for a core
/// that is not online or is the caller; [`SmpError::Busy`] while a job is
/// posted to it; [`SmpError::Timeout`] when it did not go within 1 s (the
/// request is withdrawn if it had not seen it); [`SmpError::Psci`] when
/// its CPU_OFF failed (it is online again then).
pub fn cpu_off(index: usize) -> Result<(), SmpError> {
    if index == 0 {
        return Err(SmpError::BootCore);
    }
    if index >= MAX_CPUS || index == crate::percpu::index() || online() & (1 << index) == 0 {
        return Err(SmpError::NotOnline(index));
    }
    // Acquire: pairs with the Release compare_exchange of JOBS in
    // `run_on` (a non-zero value is a job posted and not yet taken).
    if JOBS[index].load(Ordering::Acquire) != 0 {
        return Err(SmpError::Busy(index));
    }
    let bit = 1u64 << index;
    OFF_ERR[index].store(0, Ordering::Relaxed);
    // Release: pairs with the Acquire load of OFF_REQ in `service_loop`
    // and `off_requested` and the AcqRel compare_exchange in `go_offline`
    // (the OFF_ERR reset above is seen before the request).
    OFF_REQ[index].store(true, Ordering::Release);
    kick(index);
    let t0 = crate::timer::uptime_us();
    // Acquire: pairs with the Release fetch_and of ONLINE in `go_offline`,
    // so the core's drained frame cache and PARKED flag are visible.
    while ONLINE.load(Ordering::Acquire) & bit != 0 {
        // Past the timeout: withdrawn unless it took the request meanwhile
        // (then it gets the time to finish). AcqRel: races the claiming
        // compare_exchange of OFF_REQ in `go_offline` (one of the two wins).
        if crate::timer::uptime_us() - t0 > START_TIMEOUT_US
            && OFF_REQ[index]
                .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return Err(SmpError::Timeout(index));
        }
        if crate::timer::uptime_us() - t0 > 2 * START_TIMEOUT_US {
            return Err(SmpError::Timeout(index));
        }
        core::hint::spin_loop();
    }
    if let Some(c) = conduit() {
        // Out of `online` is not yet off: CPU_ON succeeds only once PSCI
        // has the core down.
        let t0 = crate::timer::uptime_us();
        while !psci_off(c, index) {
            let e = OFF_ERR[index].load(Ordering::Relaxed);
            if e != 0 {
                return Err(SmpError::Psci(index, (e & !(1 << 63)) as i64));
            }
            if crate::timer::uptime_us() - t0 > START_TIMEOUT_US {
                return Err(SmpError::Timeout(index));
            }
            core::hint::spin_loop();
        }
    }
    // AcqRel: the Release half pairs with the Acquire loads of OFFLINE
    // in `cpu_on` and `offline`; the Acquire half with `cpu_on`'s fetch_and.
    OFFLINE.fetch_or(bit, Ordering::AcqRel);
    Ok(())
}

/// Brings back a core [`cpu_off`] took offline: PSCI CPU_ON at
/// [`hal_secondary_entry`] (the same path as at boot: its stacks, per-CPU
/// data and MMU setup), or released from its WFE loop; it rejoins the
/// service loop. Returns once it is online.
///
/// # Errors
///
/// [`SmpError::NotOffline`] for a core `cpu_off` did not take offline;
/// [`SmpError::Psci`] when CPU_ON failed; [`SmpError::Timeout`] when it
/// was not online within 1 s.
pub fn cpu_on(index: usize) -> Result<(), SmpError> {
    // Acquire: pairs with the AcqRel fetch_or of OFFLINE in `cpu_off`.
    if index >= MAX_CPUS || OFFLINE.load(Ordering::Acquire) & (1 << index) == 0 {
        return Err(SmpError::NotOffline(index));
    }
    match conduit() {
        Some(c) => {
            let mpidr = BOOT_AFF.load(Ordering::Relaxed) | index as u64;
            let entry = hal_secondary_entry as *const () as u64;
            let r = match c {
                PsciConduit::Hvc => smccc::psci::cpu_on::<smccc::Hvc>(mpidr, entry, index as u64),
                PsciConduit::Smc => smccc::psci::cpu_on::<smccc::Smc>(mpidr, entry, index as u64),
            };
            r.map_err(|e| SmpError::Psci(index, psci_code(e)))?;
        }
        None => {
            // Pairs with the Acquire load of PARKED in `go_offline`'s
            // parked loop.
            PARKED[index].store(false, Ordering::Release);
            aarch64_cpu::asm::sev();
        }
    }
    if !wait_online(index) {
        return Err(SmpError::Timeout(index));
    }
    // AcqRel: the Release half pairs with the Acquire loads of OFFLINE
    // in `offline` and a later `cpu_on`; the Acquire half with `cpu_off`'s
    // fetch_or.
    OFFLINE.fetch_and(!(1 << index), Ordering::AcqRel);
    Ok(())
}

/// Posts `job` to secondary `index`: it runs `job(index)` once, from its
/// service loop. Returns the count [`wait`] waits for.
pub fn run_on(index: usize, job: fn(usize)) -> Result<u64, SmpError> {
    if index == crate::percpu::index() || online() & (1u64 << (index % 64)) == 0 {
        return Err(SmpError::NotOnline(index));
    }
    // The ticket is not DONE + 1: a job posted while the previous one still
    // runs (its slot already emptied) would get the previous job's ticket.
    // Posters to one core take turns, so the n-th job into JOBS gets n.
    // Acquire: pairs with the Release store of `false` below by the
    // previous poster, so its POSTED increment is seen.
    if POSTING[index]
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return Err(SmpError::Busy(index));
    }
    // Release on success: pairs with the Acquire swap of JOBS in
    // `service_loop` (and the Acquire load in `cpu_off`), so the job sees
    // what the caller wrote before posting it.
    let posted = JOBS[index]
        .compare_exchange(0, job as usize, Ordering::Release, Ordering::Relaxed)
        .map(|_| POSTED[index].fetch_add(1, Ordering::Relaxed) + 1);
    // Pairs with the Acquire compare_exchange above by the next poster.
    POSTING[index].store(false, Ordering::Release);
    let ticket = posted.map_err(|_| SmpError::Busy(index))?;
    kick(index);
    Ok(ticket)
}

/// Waits until secondary `index` has finished `ticket` jobs ([`run_on`]'s
/// result), or `timeout_us` passed; true when it finished.
pub fn wait(index: usize, ticket: u64, timeout_us: u64) -> bool {
    let t0 = crate::timer::uptime_us();
    while DONE
        .get(index)
        // Acquire: pairs with the Release fetch_add of DONE in
        // `service_loop`, so the job's writes are visible once it counts.
        .is_some_and(|d| d.load(Ordering::Acquire) < ticket)
    {
        if crate::timer::uptime_us() - t0 > timeout_us {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Cores running [`halt_job`] (bit per index).
static HALTED: AtomicU64 = AtomicU64::new(0);

/// Stops the calling secondary for good: no wake interrupt reaches it any
/// more, and it sleeps in a WFI loop that touches no memory.
fn halt_job(index: usize) {
    wake::acknowledge(index);
    wake::forget(index);
    // Release: pairs with the Acquire load in `halt_secondaries`.
    HALTED.fetch_or(1 << index, Ordering::Release);
    loop {
        aarch64_cpu::asm::wfi();
    }
}

/// Stops every online secondary for good in a WFI loop that reads and
/// writes no memory, for the firmware to re-enter its own image (whose
/// code stays where it is while its data, stacks and tables are built
/// again): a core still serving requests would run on the old state.
/// Returns the cores that stopped within 1 s (bit per index).
pub fn halt_secondaries() -> u64 {
    let mut posted = 0u64;
    for i in 1..MAX_CPUS {
        if online() & (1 << i) != 0 && run_on(i, halt_job).is_ok() {
            posted |= 1 << i;
        }
    }
    let t0 = crate::timer::uptime_us();
    // Acquire: pairs with the Release fetch_or in `halt_job`.
    while HALTED.load(Ordering::Acquire) & posted != posted
        && crate::timer::uptime_us() - t0 < START_TIMEOUT_US
    {
        core::hint::spin_loop();
    }
    HALTED.load(Ordering::Acquire) & posted
}

/// How many times core `index` went to sleep in WFI in its service loop
/// (0 for a core that never did, or no such core).
pub fn wfi_sleeps(index: usize) -> u64 {
    WFI_SLEEPS
        .get(index)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

/// From now on idle secondaries sleep in WFI once they can be woken by an
/// interrupt ([`crate::irq::wake`], after the interrupt controller is up);
/// until then, or where they cannot be, they keep waiting in WFE. Jobs and
/// offline requests reach them either way.
pub fn sleep_when_idle() {
    SLEEP.store(true, Ordering::Relaxed);
    aarch64_cpu::asm::sev();
}
