//! Operand encodings of the stage-1 TLBI instructions, for the hal's
//! [`super::TranslationHw`] implementation (pure arithmetic, no hardware).
//!
//! Arm ARM DDI 0487M.a.a, C5.5 (TLB maintenance instructions: `TLBI VA(L)E1IS`
//! with FEAT_TTL, `TLBI RVA(L)E1IS` with FEAT_TLBIRANGE) and D8.17.5.2 (the
//! range: (NUM + 1) * 2^(5 * SCALE + 1) granules from BaseADDR). 4 KiB
//! granule only.

use super::hardware::TlbiScope;
use crate::addr::{VirtAddr, PAGE_SHIFT};

/// `TLBI VA(L)E1IS` operand: VA\[55:12\] in bits \[43:0\], `asid` in
/// \[63:48\], and with FEAT_TTL (`ttl`) the level hint in \[47:44\]
/// (0b01 = 4 KiB granule, then the level).
pub const fn va_operand(va: VirtAddr, asid: u16, scope: TlbiScope, ttl: bool) -> u64 {
    let mut op = ((va.0 >> PAGE_SHIFT) & ((1 << 44) - 1)) | (asid as u64) << 48;
    if ttl {
        if let Some(level) = scope.level {
            op |= (0b0100 | (level as u64 & 0b11)) << 44;
        }
    }
    op
}

/// One `TLBI RVA(L)E1IS` operand, or a single-page `TLBI VA(L)E1IS` operand
/// for the odd page a range cannot express.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbiOperand {
    /// Use `TLBI VA(L)E1IS` with this operand.
    Va(u64),
    /// Use `TLBI RVA(L)E1IS` with this operand.
    Range(u64),
}

/// Splits `[va, va + len)` into range-TLBI operands (TG = 4 KiB; TTL = the
/// scope's level 1-3, else 0 = no hint). At most one single-page operand
/// (an odd page) plus one range operand per SCALE value, so a span up to
/// 8 GiB takes at most five instructions; beyond that the iterator keeps
/// going in 8 GiB steps and the caller may prefer `TLBI VMALLE1IS`.
#[derive(Clone, Debug)]
pub struct RangeOperands {
    va: u64,
    pages: u64,
    asid: u16,
    scope: TlbiScope,
    scale: u32,
    ttl: bool,
}

impl RangeOperands {
    /// Operands for `[va, va + len)`; `va` and `len` are 4 KiB multiples.
    /// `ttl` says whether FEAT_TTL exists, for the single-page operand (a
    /// range operand's TTL field is defined by FEAT_TLBIRANGE itself).
    pub const fn new(va: VirtAddr, len: u64, asid: u16, scope: TlbiScope, ttl: bool) -> Self {
        Self {
            va: va.0,
            pages: len >> PAGE_SHIFT,
            asid,
            scope,
            scale: 0,
            ttl,
        }
    }
}

impl Iterator for RangeOperands {
    type Item = TlbiOperand;

    fn next(&mut self) -> Option<TlbiOperand> {
        while self.pages > 0 {
            if self.pages & 1 == 1 {
                // A range covers an even number of pages: the odd one alone.
                let op = va_operand(VirtAddr(self.va), self.asid, self.scope, self.ttl);
                self.va += 1 << PAGE_SHIFT;
                self.pages -= 1;
                return Some(TlbiOperand::Va(op));
            }
            // Ascending SCALE: each clears the next five bits of the page
            // count; SCALE 3 then repeats in chunks of up to 32 * 2^16 pages.
            let shift = 5 * self.scale + 1;
            let scale = self.scale as u64;
            let chunk = if self.scale == 3 {
                (self.pages >> shift).min(32)
            } else {
                self.scale += 1;
                (self.pages >> shift) & 0x1f
            };
            if chunk == 0 {
                continue;
            }
            let ttl = match self.scope.level {
                Some(l @ 1..=3) => l as u64,
                _ => 0,
            };
            let op = (self.asid as u64) << 48
                | 0b01 << 46
                | scale << 44
                | (chunk - 1) << 39
                | ttl << 37
                | ((self.va >> PAGE_SHIFT) & ((1 << 37) - 1));
            let covered = chunk << shift;
            self.va += covered << PAGE_SHIFT;
            self.pages -= covered;
            return Some(TlbiOperand::Range(op));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEAF3: TlbiScope = TlbiScope {
        last_level_only: true,
        level: Some(3),
    };

    /// Decodes a range operand back to (first page, pages).
    fn decode(op: u64) -> (u64, u64) {
        let scale = (op >> 44) & 3;
        let num = (op >> 39) & 0x1f;
        (op & ((1 << 37) - 1), (num + 1) << (5 * scale + 1))
    }

    #[test]
    fn va_operand_fields() {
        let op = va_operand(VirtAddr(0x4000_5000), 7, LEAF3, true);
        assert_eq!(op & ((1 << 44) - 1), 0x40005);
        assert_eq!(op >> 48, 7);
        assert_eq!((op >> 44) & 0xf, 0b0111);
        assert_eq!(va_operand(VirtAddr(0x4000_5000), 0, LEAF3, false), 0x40005);
    }

    #[test]
    fn single_page_operand_has_ttl_only_with_feat_ttl() {
        let ops: Vec<_> =
            RangeOperands::new(VirtAddr(0x4000_0000), 4096, 0, LEAF3, false).collect();
        assert_eq!(ops, [TlbiOperand::Va(0x40000)]);
        let ops: Vec<_> = RangeOperands::new(VirtAddr(0x4000_0000), 4096, 0, LEAF3, true).collect();
        assert_eq!(ops, [TlbiOperand::Va(0x40000 | (0b0111 << 44))]);
    }

    #[test]
    fn a_64k_run_is_one_range_operand() {
        let ops: Vec<_> =
            RangeOperands::new(VirtAddr(0x4020_0000), 16 << PAGE_SHIFT, 0, LEAF3, true).collect();
        assert_eq!(ops.len(), 1);
        let TlbiOperand::Range(r) = ops[0] else {
            panic!("not a range")
        };
        assert_eq!(decode(r), (0x40200, 16));
    }

    #[test]
    fn every_count_up_to_3000_covers_exactly_in_at_most_5() {
        for pages in 1..3000u64 {
            let mut next = 1000u64;
            let mut n = 0;
            for op in RangeOperands::new(
                VirtAddr(1000 << PAGE_SHIFT),
                pages << PAGE_SHIFT,
                0,
                LEAF3,
                true,
            ) {
                n += 1;
                let (first, count) = match op {
                    TlbiOperand::Va(v) => (v & ((1 << 44) - 1), 1),
                    TlbiOperand::Range(r) => decode(r),
                };
                assert_eq!(first, next, "{pages} pages: gap or overlap");
                next += count;
            }
            assert_eq!(next, 1000 + pages);
            assert!(n <= 5, "{pages} pages took {n} operands");
        }
    }

    #[test]
    fn ranges_cover_exactly() {
        for pages in [1u64, 2, 16, 17, 63, 64, 65, 512, 1000, 262_144, 2_097_153] {
            let base = 0x4000_0000u64;
            let mut next = base >> PAGE_SHIFT;
            let mut n = 0;
            for op in RangeOperands::new(VirtAddr(base), pages << PAGE_SHIFT, 0, LEAF3, true) {
                n += 1;
                let (first, count) = match op {
                    TlbiOperand::Va(v) => (v & ((1 << 44) - 1), 1),
                    TlbiOperand::Range(r) => {
                        assert_eq!((r >> 46) & 3, 0b01, "TG = 4 KiB");
                        assert_eq!((r >> 37) & 3, 3, "TTL = level 3");
                        decode(r)
                    }
                };
                assert_eq!(first, next, "{pages} pages: gap or overlap");
                next += count;
            }
            assert_eq!(next, (base >> PAGE_SHIFT) + pages);
            if pages <= 1 << 21 {
                assert!(n <= 5, "{pages} pages took {n} operands");
            }
        }
    }
}
