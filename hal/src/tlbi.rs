//! TLBI operand encodings (Arm ARM DDI 0487, C5.5.x "TLBI VAE1IS, VALE1IS"
//! and "TLBI RVAE1IS, RVALE1IS"; D8.13.5 for the TTL hint). Pure functions,
//! host-tested; `mmu` issues the instructions.

/// TLBI by-VA operand: VA[55:12] in bits 43:0, TTL in bits 47:44 (4 KiB
/// granule: 0b01 then the level, only with FEAT_TTL), ASID 0.
pub const fn va_operand(va: u64, level: Option<u8>, ttl: bool) -> u64 {
    let mut op = (va >> 12) & ((1 << 44) - 1);
    if let (true, Some(l)) = (ttl, level) {
        if l >= 1 && l <= 3 {
            op |= (0b0100 | l as u64) << 44;
        }
    }
    op
}

/// One `TLBI RVA(L)E1IS` operand: BaseADDR (VA >> 12) in bits 36:0, TTL
/// (level, 0 = unknown) in 38:37, NUM in 43:39, SCALE in 45:44, TG = 0b01
/// (4 KiB) in 47:46. It covers `(NUM + 1) << (5 * SCALE + 1)` pages.
pub const fn range_operand(base_page: u64, num: u64, scale: u64, level: Option<u8>) -> u64 {
    let ttl = match level {
        Some(l) if l >= 1 && l <= 3 => l as u64,
        _ => 0,
    };
    (base_page & ((1 << 37) - 1))
        | (ttl << 37)
        | ((num & 0x1f) << 39)
        | ((scale & 3) << 44)
        | (0b01 << 46)
}

/// Most pages [`split_range`] covers; beyond it invalidate everything.
pub const MAX_RANGE_PAGES: u64 = (1 << 21) - 1;

/// One TLBI operation of a split range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOp {
    /// `TLBI RVA(L)E1IS` with this base page, NUM and SCALE.
    Range {
        base_page: u64,
        num: u64,
        scale: u64,
    },
    /// `TLBI VA(L)E1IS` of one page.
    Single { base_page: u64 },
}

impl RangeOp {
    /// Pages the operation covers.
    pub const fn pages(self) -> u64 {
        match self {
            Self::Range { num, scale, .. } => (num + 1) << (5 * scale + 1),
            Self::Single { .. } => 1,
        }
    }
}

/// Splits `pages` pages from `base_page` into range-TLBI operations: an odd
/// count takes one single-page TLBI first, then SCALE 0, 1, 2, 3 each take
/// the part of the count their NUM field expresses (bits 1-5, 6-10, 11-15,
/// 16-20). At most 5 operations, passed to `emit` in address order; returns
/// false (having emitted nothing) above [`MAX_RANGE_PAGES`].
pub fn split_range(mut base_page: u64, mut pages: u64, mut emit: impl FnMut(RangeOp)) -> bool {
    if pages > MAX_RANGE_PAGES {
        return false;
    }
    if pages % 2 == 1 {
        emit(RangeOp::Single { base_page });
        base_page += 1;
        pages -= 1;
    }
    for scale in 0..4u64 {
        let unit = 1u64 << (5 * scale + 1);
        let chunks = (pages / unit) & 0x1f;
        if chunks > 0 {
            emit(RangeOp::Range {
                base_page,
                num: chunks - 1,
                scale,
            });
            base_page += chunks * unit;
            pages -= chunks * unit;
        }
    }
    pages == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn va_operand_with_and_without_ttl() {
        assert_eq!(va_operand(0x4020_3000, None, true), 0x40203);
        assert_eq!(va_operand(0x4020_3000, Some(3), false), 0x40203);
        assert_eq!(
            va_operand(0x4020_3000, Some(3), true),
            0x40203 | (0b0111 << 44)
        );
        assert_eq!(va_operand(0x4000_0000, Some(2), true) >> 44, 0b0110);
    }

    #[test]
    fn range_operand_fields() {
        let op = range_operand(0x40200, 15, 1, Some(3));
        assert_eq!(op & ((1 << 37) - 1), 0x40200);
        assert_eq!((op >> 37) & 3, 3);
        assert_eq!((op >> 39) & 0x1f, 15);
        assert_eq!((op >> 44) & 3, 1);
        assert_eq!((op >> 46) & 3, 1);
    }

    #[test]
    fn split_covers_exactly_every_page() {
        for pages in (0..3000u64).chain([16, 512, 4096, 65535, 65536, 262_144, MAX_RANGE_PAGES]) {
            let mut covered = Vec::new();
            let mut ops = 0;
            let ok = split_range(1000, pages, |op| {
                ops += 1;
                let base = match op {
                    RangeOp::Range { base_page, .. } | RangeOp::Single { base_page } => base_page,
                };
                covered.push((base, op.pages()));
            });
            assert!(ok, "pages {pages}");
            assert!(ops <= 5, "pages {pages}: {ops} ops");
            let mut next = 1000;
            for (base, n) in covered {
                assert_eq!(base, next, "pages {pages}: gap or overlap");
                next += n;
            }
            assert_eq!(next, 1000 + pages);
        }
    }

    #[test]
    fn a_64k_run_is_one_operation() {
        let mut ops = Vec::new();
        assert!(split_range(0x40200, 16, |op| ops.push(op)));
        assert_eq!(
            ops,
            vec![RangeOp::Range {
                base_page: 0x40200,
                num: 7,
                scale: 0
            }]
        );
    }

    #[test]
    fn too_large_asks_for_invalidate_all() {
        let mut n = 0;
        assert!(!split_range(0, MAX_RANGE_PAGES + 1, |_| n += 1));
        assert_eq!(n, 0);
    }
}
