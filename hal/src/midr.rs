//! MIDR_EL1 decoding and the break-before-make trust decision (Arm ARM DDI
//! 0487M.a.a, D24.2.137 "MIDR_EL1"; D8.17.2 "Support levels for changing table
//! or block size").
//!
//! FEAT_BBM level 2 lets software change a translation's size (the
//! Contiguous bit, block <-> table) without the break, but the architecture
//! still lets an implementation raise a TLB conflict abort when it sees both
//! sizes. The stage-1 engine rewrites live mappings of the firmware itself,
//! where such an abort would be recursive, so — like Linux's BBML2_NOABORT —
//! the level-2 path is used only where no conflict abort can happen: BBM
//! level 3 (which architects exactly that), implementations their designers
//! attest never abort (the list Linux keeps), and QEMU's TCG `max` model,
//! which never raises TLB conflict aborts at all.

/// The fields of a MIDR_EL1 value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Midr {
    /// Implementer code (0x41 Arm, 0xc0 Ampere, 0x00 reserved for software).
    pub implementer: u8,
    /// Major revision (rN).
    pub variant: u8,
    /// Primary part number.
    pub part: u16,
    /// Minor revision (pN).
    pub revision: u8,
}

impl Midr {
    /// Splits a MIDR_EL1 value.
    pub const fn decode(midr: u64) -> Self {
        Self {
            implementer: ((midr >> 24) & 0xff) as u8,
            variant: ((midr >> 20) & 0xf) as u8,
            part: ((midr >> 4) & 0xfff) as u16,
            revision: (midr & 0xf) as u8,
        }
    }
}

const ARM: u8 = 0x41;
const AMPERE: u8 = 0xc0;
const SOFTWARE: u8 = 0x00;

/// True when this implementation never raises a TLB conflict abort for a
/// BBM level 2 size change.
pub const fn bbml2_noabort(midr: u64) -> bool {
    let m = Midr::decode(midr);
    match (m.implementer, m.part) {
        // Cortex-X4 from r0p3, Neoverse-V3 from r0p2.
        (ARM, 0xd82) => m.variant > 0 || m.revision >= 3,
        (ARM, 0xd84) => m.variant > 0 || m.revision >= 2,
        // AmpereOne and AmpereOne A, all revisions.
        (AMPERE, 0xac3) | (AMPERE, 0xac4) => true,
        // QEMU TCG's `max` CPU (implementer 0, part 0x051).
        (SOFTWARE, 0x051) => true,
        _ => false,
    }
}

/// The BBM level the engine may rely on, from ID_AA64MMFR2_EL1.BBM and MIDR.
pub const fn usable_bbm_level(bbm: u8, midr: u64) -> u8 {
    if bbm >= 3 || (bbm == 2 && bbml2_noabort(midr)) {
        2
    } else {
        // Level 1 needs the nT-bit sequence, which the engine does not use:
        // it takes the full break-before-make path instead.
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_MAX: u64 = 0x000f_0510;
    const NEOVERSE_V1: u64 = 0x411f_d402;
    const CORTEX_A53: u64 = 0x410f_d034;

    #[test]
    fn decodes_fields() {
        assert_eq!(
            Midr::decode(NEOVERSE_V1),
            Midr {
                implementer: 0x41,
                variant: 1,
                part: 0xd40,
                revision: 2
            }
        );
        assert_eq!(Midr::decode(QEMU_MAX).implementer, 0);
    }

    #[test]
    fn level_2_only_where_no_conflict_abort() {
        assert_eq!(usable_bbm_level(2, QEMU_MAX), 2);
        assert_eq!(
            usable_bbm_level(2, NEOVERSE_V1),
            0,
            "advertises level 2 but may abort"
        );
        assert_eq!(usable_bbm_level(0, CORTEX_A53), 0);
        assert_eq!(usable_bbm_level(1, QEMU_MAX), 0);
        assert_eq!(
            usable_bbm_level(3, NEOVERSE_V1),
            2,
            "level 3 architects no-abort"
        );
        // Cortex-X4: r0p2 no, r0p3 yes, r1p0 yes.
        assert!(!bbml2_noabort(0x410f_d822));
        assert!(bbml2_noabort(0x410f_d823));
        assert!(bbml2_noabort(0x411f_d820));
        assert!(bbml2_noabort(0xc00f_ac30));
    }
}
