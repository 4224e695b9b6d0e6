//! Cache maintenance before the MMU and caches go on (Arm ARM DDI 0487M.a.a,
//! D7.5.9 "A64 Cache maintenance instructions"; CLIDR_EL1, CSSELR_EL1, CCSIDR_EL1, DC ISW,
//! IC IALLU).
//!
//! Everything before the MMU is on — BSS, the page array, the translation
//! tables — is written with the data cache off, straight to memory. A loader
//! that ran with caches on may have left lines for those addresses in the
//! caches; once the caches are on, a stale clean line would shadow our data
//! and a stale dirty one would later be written back over it. So every data
//! and unified cache level up to the Level of Coherence is invalidated by set
//! and way (nothing of ours is in any cache yet, so nothing is lost), and the
//! instruction cache is invalidated too.

#[cfg(hw)]
use aarch64_cpu::{asm::barrier, registers::*};

// The entry paths (hal::boot, hal::loader) call this with no stack, before
// any Rust code, when they were entered with the MMU or caches on.
#[cfg(hw)]
core::arch::global_asm!(
    r#"
.section .text.hal_dcache_all, "ax"
// Entered with the MMU or caches on (U-Boot's bootelf and go): clean and
// invalidate the data caches to the PoC by set/way while they are still
// on, then turn MMU and caches off (Arm ARM D7.5.9, D8.2.12.1). No store
// happens in between, so nothing can be left dirty behind. In: x20 = the
// current EL. Out: x21 = SCTLR_ELx as found. Uses x0-x11 and x23, no
// memory and no stack.
.global hal_entry_mmu_caches_off_asm
hal_entry_mmu_caches_off_asm:
    cmp     x20, #3
    b.ne    10f
    mrs     x21, sctlr_el3
    b       12f
10: cmp     x20, #2
    b.ne    11f
    mrs     x21, sctlr_el2
    b       12f
11: mrs     x21, sctlr_el1
12: mov     x1, #((1 << 0) | (1 << 2))  // SCTLR.M | SCTLR.C
    tst     x21, x1
    b.eq    20f
    mov     x23, x30
    bl      hal_clean_invalidate_dcache_all_asm
    mov     x30, x23
    mov     x1, #((1 << 0) | (1 << 2) | (1 << 12))  // M | C | I
    bic     x2, x21, x1
    cmp     x20, #3
    b.ne    13f
    msr     sctlr_el3, x2
    isb
    tlbi    alle3
    b       15f
13: cmp     x20, #2
    b.ne    14f
    msr     sctlr_el2, x2
    isb
    tlbi    alle2
    b       15f
14: msr     sctlr_el1, x2
    isb
    tlbi    vmalle1
15: ic      iallu
    dsb     sy
    isb
20: ret

// Clean and invalidate every data/unified cache level up to the LoC by
// set/way (DC CISW; CLIDR_EL1, CSSELR_EL1, CCSIDR_EL1 without FEAT_CCIDX).
// Uses x0-x11 only and no memory: the entry path calls it with no stack.
.global hal_clean_invalidate_dcache_all_asm
hal_clean_invalidate_dcache_all_asm:
    dsb     sy
    mrs     x0, clidr_el1
    ubfx    x3, x0, #24, #3         // LoC
    lsl     x3, x3, #1              // LoC * 2 (CSSELR level field)
    cbz     x3, 35f
    mov     x10, #0                 // level << 1
30: add     x2, x10, x10, lsr #1    // level * 3
    lsr     x1, x0, x2
    and     x1, x1, #7              // Ctype of this level
    cmp     x1, #2
    b.lt    34f                     // no data or unified cache
    msr     csselr_el1, x10
    isb
    mrs     x1, ccsidr_el1
    and     x2, x1, #7
    add     x2, x2, #4              // log2(line bytes)
    ubfx    x4, x1, #3, #10         // ways - 1
    clz     w5, w4                  // way field shift
    ubfx    x7, x1, #13, #15        // sets - 1
31: mov     x9, x4
32: lsl     x6, x9, x5
    orr     x11, x10, x6
    lsl     x6, x7, x2
    orr     x11, x11, x6
    dc      cisw, x11
    subs    x9, x9, #1
    b.ge    32b
    subs    x7, x7, #1
    b.ge    31b
34: add     x10, x10, #2
    cmp     x3, x10
    b.gt    30b
35: mov     x10, #0
    msr     csselr_el1, x10
    dsb     sy
    isb
    ret
"#
);

/// The `DC ISW` operand for one (level, set, way): level - 1 in bits 3:1, the
/// set shifted by log2(line bytes), the way in the top log2(ways) bits.
pub const fn set_way_operand(
    level: u32,
    set: u32,
    way: u32,
    log2_line: u32,
    log2_ways: u32,
) -> u64 {
    let way_bits = if log2_ways == 0 {
        0
    } else {
        (way as u64) << (32 - log2_ways)
    };
    way_bits | ((set as u64) << log2_line) | (((level - 1) as u64) << 1)
}

/// Invalidates every data and unified cache level up to the LoC by set/way.
///
/// # Safety
///
/// Invalidation discards lines without writing them back, so the caller
/// guarantees that no cache holds a line it still needs: the data cache is
/// off (SCTLR_EL1.C = 0) and has been since our first store, so everything
/// we wrote is in memory, and no other observer (core, DMA) keeps dirty
/// data in these caches. In practice: only on the boot path, before the MMU
/// and caches are turned on.
#[cfg(hw)]
pub unsafe fn invalidate_dcache_all() {
    let clidr = CLIDR_EL1.get();
    let loc = ((clidr >> 24) & 7) as u32;
    let ccidx = (ID_AA64MMFR2_EL1.get() >> 20) & 0xf != 0;
    for level in 1..=loc {
        let ctype = (clidr >> (3 * (level - 1))) & 7;
        if ctype < 2 {
            continue; // no cache, or instruction only
        }
        CSSELR_EL1.set(((level - 1) as u64) << 1);
        barrier::isb(barrier::SY);
        let ccsidr = CCSIDR_EL1.get();
        let log2_line = (ccsidr & 7) as u32 + 4;
        let (ways, sets) = if ccidx {
            (
                ((ccsidr >> 3) & 0x1f_ffff) as u32 + 1,
                ((ccsidr >> 32) & 0xff_ffff) as u32 + 1,
            )
        } else {
            (
                ((ccsidr >> 3) & 0x3ff) as u32 + 1,
                ((ccsidr >> 13) & 0x7fff) as u32 + 1,
            )
        };
        let log2_ways = u32::BITS - (ways - 1).leading_zeros();
        for way in 0..ways {
            for set in 0..sets {
                let op = set_way_operand(level, set, way, log2_line, log2_ways);
                // SAFETY: invalidating by set/way discards cache lines only;
                // the data cache is off and holds nothing of ours (see the
                // module documentation).
                unsafe {
                    core::arch::asm!("dc isw, {0}", in(reg) op, options(nostack, preserves_flags))
                };
            }
        }
    }
    barrier::dsb(barrier::SY);
    // SAFETY: invalidates the instruction cache to PoU; no memory effects.
    unsafe { core::arch::asm!("ic iallu", options(nostack, preserves_flags)) };
    barrier::dsb(barrier::NSH);
    barrier::isb(barrier::SY);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_way_fields() {
        // Cortex-A53 L1D: 64-byte lines (log2 6), 4 ways (log2 2), 128 sets.
        assert_eq!(set_way_operand(1, 0, 0, 6, 2), 0);
        assert_eq!(set_way_operand(1, 127, 3, 6, 2), (3 << 30) | (127 << 6));
        // L2 (level 2): level field is 1 in bits 3:1; 16 ways (log2 4).
        assert_eq!(
            set_way_operand(2, 5, 15, 6, 4),
            (15 << 28) | (5 << 6) | (1 << 1)
        );
        // A direct-mapped cache has no way bits.
        assert_eq!(set_way_operand(1, 1, 0, 6, 0), 1 << 6);
    }
}
