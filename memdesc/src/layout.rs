//! Boot-time placement: where in RAM the page array's own storage can go,
//! given the regions that must not be touched (firmware image, device tree,
//! reserved memory). Pure arithmetic over frame ranges, host-tested.

use crate::frames::PfnRange;
use crate::Pfn;

/// Why no placement was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutPlanError {
    /// No RAM range has `pages` contiguous frames free of the avoided ranges.
    NoHole {
        /// Frames asked for.
        pages: u64,
    },
    /// The alignment asked for is not a power of two (0 included).
    BadAlign {
        /// The alignment, in frames.
        align: u64,
    },
}

/// Finds the lowest run of `pages` frames, aligned to `align` frames (a power
/// of two), inside one of `ram` and overlapping none of `avoid`. Prefers
/// frames at or above `prefer_from` (so the storage sits right after the
/// image rather than under it), then falls back to the lowest fit anywhere.
///
/// # Errors
///
/// [`LayoutPlanError::NoHole`] when no RAM range holds `pages` aligned frames
/// clear of every avoided range (also when aligning a start would overflow);
/// [`LayoutPlanError::BadAlign`] when `align` is not a power of two.
pub fn find_hole(
    ram: &[PfnRange],
    avoid: &[PfnRange],
    pages: u64,
    align: u64,
    prefer_from: Pfn,
) -> Result<Pfn, LayoutPlanError> {
    if !align.is_power_of_two() {
        return Err(LayoutPlanError::BadAlign { align });
    }
    let search = |floor: u64| -> Option<Pfn> {
        let mut best: Option<u64> = None;
        for r in ram {
            let mut start = align_up(r.start.0.max(floor), align)?;
            // Each step jumps past one avoided range, so the loop ends after at
            // most avoid.len() + 1 rounds per RAM range.
            for _ in 0..=avoid.len() {
                let end = start.checked_add(pages)?;
                if end > r.end.0 {
                    break;
                }
                match avoid
                    .iter()
                    .filter(|a| !a.is_empty() && a.start.0 < end && start < a.end.0)
                    .map(|a| a.end.0)
                    .max()
                {
                    None => {
                        best = Some(best.map_or(start, |b| b.min(start)));
                        break;
                    }
                    Some(past) => start = align_up(past, align)?,
                }
            }
        }
        best.map(Pfn)
    };
    search(prefer_from.0)
        .or_else(|| search(0))
        .ok_or(LayoutPlanError::NoHole { pages })
}

fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> PfnRange {
        PfnRange::new(Pfn(a), Pfn(b))
    }

    #[test]
    fn an_alignment_that_is_not_a_power_of_two_is_a_typed_error() {
        let ram = [r(0x40000, 0x80000)];
        for align in [0, 3, 0x300] {
            assert_eq!(
                find_hole(&ram, &[], 16, align, Pfn(0)),
                Err(LayoutPlanError::BadAlign { align }),
                "align {align}"
            );
        }
    }

    #[test]
    fn right_after_the_image() {
        let ram = [r(0x40000, 0x80000)];
        let avoid = [r(0x40000, 0x40100), r(0x40200, 0x40300)];
        assert_eq!(
            find_hole(&ram, &avoid, 512, 1, Pfn(0x40300)),
            Ok(Pfn(0x40300))
        );
    }

    #[test]
    fn skips_overlaps_and_honours_alignment() {
        let ram = [r(0x40000, 0x80000)];
        let avoid = [r(0x40300, 0x40305), r(0x40400, 0x40500)];
        // 0x40305 aligned to 0x100 is 0x40400, which is avoided too: next is 0x40500.
        assert_eq!(
            find_hole(&ram, &avoid, 0x100, 0x100, Pfn(0x40300)),
            Ok(Pfn(0x40500))
        );
    }

    #[test]
    fn falls_back_below_the_preference_and_to_other_ranges() {
        let ram = [r(0x40000, 0x40800), r(0x100000, 0x200000)];
        let avoid = [r(0x40600, 0x40800)];
        assert_eq!(
            find_hole(&ram, &avoid, 0x400, 1, Pfn(0x40600)),
            Ok(Pfn(0x100000))
        );
        assert_eq!(
            find_hole(&ram, &avoid, 0x400, 1, Pfn(0x200000)),
            Ok(Pfn(0x40000))
        );
        assert_eq!(
            find_hole(&ram, &avoid, 0x200000, 1, Pfn(0)),
            Err(LayoutPlanError::NoHole { pages: 0x200000 })
        );
    }

    #[test]
    fn never_returns_an_overlap() {
        // Exhaustive over small layouts.
        let ram = [r(0, 64), r(100, 140)];
        for a in 0..64u64 {
            for len in 1..8u64 {
                let avoid = [r(a, a + len), r(110, 112)];
                for pages in 1..20 {
                    if let Ok(p) = find_hole(&ram, &avoid, pages, 1, Pfn(30)) {
                        let (s, e) = (p.0, p.0 + pages);
                        assert!(ram.iter().any(|x| x.start.0 <= s && e <= x.end.0));
                        assert!(avoid.iter().all(|x| e <= x.start.0 || x.end.0 <= s));
                    }
                }
            }
        }
    }
}
