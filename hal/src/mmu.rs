//! Stage-1 MMU control at EL1: feature probe, TLB maintenance and barriers for
//! the table engine, and turning translation and caches on (Arm ARM DDI 0487M.a.a,
//! D8.2 "Translation process" (TCR_EL1, TTBR0_EL1), D8.6 "Memory region
//! attributes" (MAIR_EL1), D8.17.5 "TLB maintenance instructions", D8.17.1
//! "Using break-before-make when updating translation table entries"; C5.5 for the
//! TLBI operand encodings, including FEAT_TLBIRANGE's `RVA(L)E1IS`).

use aarch64_cpu::{asm::barrier, registers::*};
use memdesc::stage1::tlbi::{va_operand, RangeOperands, TlbiOperand};
use memdesc::stage1::{Features, TlbiScope, TranslationHw, VaSize, MAIR_VALUE};
use memdesc::VirtAddr;

/// What the CPU offers that changes how we maintain translations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub struct Probe {
    /// ID_AA64MMFR1_EL1.HAFDBS: 0 none, 1 access flag, 2 access flag and dirty state.
    pub hafdbs: u8,
    /// ID_AA64ISAR0_EL1.TLB: 2 means TLBI range (and outer-shareable) instructions.
    pub tlb: u8,
    /// ID_AA64MMFR2_EL1.BBM level.
    pub bbm: u8,
    /// ID_AA64MMFR2_EL1.TTL: TLBI by VA may carry a level hint.
    pub ttl: bool,
    /// ID_AA64MMFR0_EL1.PARange encoding (0 = 32 bits … 6 = 52 bits).
    pub pa_range: u8,
    /// MIDR_EL1: which implementation this is.
    pub midr: u64,
}

impl Probe {
    /// Reads the ID registers.
    pub fn read() -> Self {
        let mmfr1 = ID_AA64MMFR1_EL1.get();
        let isar0 = ID_AA64ISAR0_EL1.get();
        let mmfr2 = ID_AA64MMFR2_EL1.get();
        let mmfr0 = ID_AA64MMFR0_EL1.get();
        Self {
            hafdbs: (mmfr1 & 0xf) as u8,
            tlb: ((isar0 >> 56) & 0xf) as u8,
            bbm: ((mmfr2 >> 52) & 0xf) as u8,
            ttl: (mmfr2 >> 48) & 0xf != 0,
            pa_range: (mmfr0 & 0xf) as u8,
            midr: MIDR_EL1.get(),
        }
    }

    /// The engine's view: which maintenance paths it may take. BBM level 2
    /// only where no TLB conflict abort can happen (see [`crate::midr`]).
    pub fn features(&self) -> Features {
        Features {
            hafdbs: self.hafdbs >= 2,
            tlbi_range: self.tlb >= 2,
            bbm_level: crate::midr::usable_bbm_level(self.bbm, self.midr),
        }
    }

    /// Physical address size in bits.
    pub fn pa_bits(&self) -> u8 {
        match self.pa_range {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            5 => 48,
            _ => 52,
        }
    }
}

/// TLB maintenance for EL1&0 stage 1, Inner Shareable, ASID-less (all our
/// mappings are global).
pub struct Tlb {
    ttl: bool,
}

impl Tlb {
    /// Maintenance as the probed CPU allows (TTL hints only with FEAT_TTL).
    pub fn new(probe: &Probe) -> Self {
        Self { ttl: probe.ttl }
    }
}

/// Most pages one split range covers in at most five operations (8 GiB).
const MAX_RANGE_PAGES: u64 = (1 << 21) - 1;

/// `TLBI VALE1IS` (leaf only) or `TLBI VAE1IS` with a prepared operand.
fn tlbi_va_op(op: u64, last_level_only: bool) {
    // SAFETY: TLBI only drops cached translations; it has no memory effects
    // beyond that and cannot fault.
    unsafe {
        if last_level_only {
            core::arch::asm!("tlbi vale1is, {0}", in(reg) op, options(nostack, preserves_flags));
        } else {
            core::arch::asm!("tlbi vae1is, {0}", in(reg) op, options(nostack, preserves_flags));
        }
    }
}

/// `TLBI RVALE1IS` or `TLBI RVAE1IS` with a prepared operand.
fn tlbi_range_op(op: u64, last_level_only: bool) {
    // SAFETY: as for tlbi_va_op; only reached when the engine saw
    // FEAT_TLBIRANGE in the probe, so the instruction exists. Written as its
    // system-instruction encoding (RVALE1IS is `sys #0, c8, c2, #5`, RVAE1IS
    // `sys #0, c8, c2, #1`) so the assembler needs no +tlb-rmi feature.
    unsafe {
        if last_level_only {
            core::arch::asm!("sys #0, c8, c2, #5, {0}", in(reg) op, options(nostack, preserves_flags));
        } else {
            core::arch::asm!("sys #0, c8, c2, #1, {0}", in(reg) op, options(nostack, preserves_flags));
        }
    }
}

impl TranslationHw for Tlb {
    fn tlbi_va(&mut self, va: VirtAddr, scope: TlbiScope) {
        tlbi_va_op(va_operand(va, 0, scope, self.ttl), scope.last_level_only);
    }

    fn tlbi_va_range(&mut self, va: VirtAddr, len: u64, scope: TlbiScope) {
        // Up to 8 GiB takes at most five operations; beyond, one broadcast
        // invalidate-all is cheaper than a stream of 8 GiB ranges.
        if len >> 12 > MAX_RANGE_PAGES {
            self.tlbi_all();
            return;
        }
        for op in RangeOperands::new(va, len, 0, scope, self.ttl) {
            match op {
                TlbiOperand::Va(op) => tlbi_va_op(op, scope.last_level_only),
                TlbiOperand::Range(op) => tlbi_range_op(op, scope.last_level_only),
            }
        }
    }

    fn tlbi_all(&mut self) {
        // SAFETY: invalidates all EL1&0 stage-1 entries; no memory effects.
        unsafe { core::arch::asm!("tlbi vmalle1is", options(nostack, preserves_flags)) }
    }

    fn dsb_ishst(&mut self) {
        barrier::dsb(barrier::ISHST);
    }

    fn dsb_ish(&mut self) {
        barrier::dsb(barrier::ISH);
    }

    fn isb(&mut self) {
        barrier::isb(barrier::SY);
    }
}

/// Programs MAIR/TCR/TTBR0 for the table at `root` and turns on the MMU, the
/// caches and WXN (a writable page is never executable, whatever its
/// descriptor says). `va_size` is the engine's own ([`memdesc::stage1::Stage1::va_size`]),
/// so TCR_EL1.T0SZ and the tree's start level cannot disagree.
///
/// # Safety
///
/// `root` must be a complete stage-1 table tree in which every address the
/// code touches from here on is mapped as it is used now: the running text
/// executable, stacks, data and the console MMIO readable and writable, at
/// the same virtual addresses (an identity map of the image). It is called
/// once, on the boot path, with the MMU and the data cache still off (the
/// caches are invalidated without write-back before they go on).
pub unsafe fn enable(root: u64, va_size: VaSize, probe: &Probe) {
    let t0sz = va_size.t0sz();
    let ips = probe.pa_range.min(5) as u64; // we never map above 48 bits
    MAIR_EL1.set(MAIR_VALUE);
    let mut tcr = TCR_EL1::T0SZ.val(t0sz)
        + TCR_EL1::TG0::KiB_4
        + TCR_EL1::SH0::Inner
        + TCR_EL1::ORGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL1::IRGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL1::EPD0::EnableTTBR0Walks
        + TCR_EL1::EPD1::DisableTTBR1Walks
        + TCR_EL1::IPS.val(ips);
    if probe.features().hafdbs {
        tcr += TCR_EL1::HA::Enable + TCR_EL1::HD::Enable;
    }
    TCR_EL1.write(tcr);
    TTBR0_EL1.set_baddr(root);
    barrier::dsb(barrier::ISH);
    // Tables, page array and BSS were written with the data cache off:
    // drop whatever stale lines a loader left before the walks go cacheable.
    // SAFETY: the caller's contract puts us on the boot path with the MMU
    // and data cache still off (they are turned on below), so every store
    // we made is in memory and no line we need is lost.
    unsafe { crate::cache::invalidate_dcache_all() };
    // SAFETY: drops every stale EL1 translation before the first walk.
    unsafe { core::arch::asm!("tlbi vmalle1", options(nostack, preserves_flags)) };
    barrier::dsb(barrier::NSH);
    barrier::isb(barrier::SY);
    SCTLR_EL1.modify(
        SCTLR_EL1::M::Enable
            + SCTLR_EL1::C::Cacheable
            + SCTLR_EL1::I::Cacheable
            + SCTLR_EL1::WXN::Enable,
    );
    barrier::isb(barrier::SY);
}

/// True once [`enable`] has run.
pub fn enabled() -> bool {
    SCTLR_EL1.matches_all(SCTLR_EL1::M::Enable)
}

/// Input address bits of TTBR0_EL1's region as programmed (64 - TCR_EL1.T0SZ).
pub fn input_bits() -> u32 {
    64 - TCR_EL1.read(TCR_EL1::T0SZ) as u32
}

/// This core's translation regime as programmed: MAIR_EL1, TCR_EL1,
/// TTBR0_EL1 and SCTLR_EL1 (every core runs with the boot core's).
pub fn regime() -> [u64; 4] {
    [
        MAIR_EL1.get(),
        TCR_EL1.get(),
        TTBR0_EL1.get(),
        SCTLR_EL1.get(),
    ]
}
