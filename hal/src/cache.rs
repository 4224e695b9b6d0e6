//! Cache maintenance before the MMU and caches go on (Arm ARM DDI 0487,
//! D7.5 "Cache maintenance"; CLIDR_EL1, CSSELR_EL1, CCSIDR_EL1, DC ISW,
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
