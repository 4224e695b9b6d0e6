//! How much of a RAM range the device tree claims is really there.
//!
//! A device tree can claim more RAM than the machine has (a memory node of
//! 64 GiB on a 1 GiB machine). Before the frame allocator trusts a range,
//! the bring-up reads the range's last word under a fault guard (on QEMU an
//! access to nothing is a synchronous external abort; on a real bus it is an
//! SError or a decode error), and when that faults it finds the backed
//! prefix by bisection. The search is pure: the probe is a closure, so it is
//! host-tested with fake machines.

use crate::dtb::Region;

/// Probing granule: backing is assumed to come in whole 4 KiB pages.
pub const PAGE: u64 = 4096;

/// The number of bytes of `r`, from its base, that are backed, assuming the
/// backing is a prefix of the range. `backed(addr)` reads the 8-byte aligned
/// word at `addr` and says whether it answered.
///
/// The last word is probed first, so a range that is all there costs one
/// probe. Otherwise the first page must answer (or nothing is backed) and
/// the last backed page is bisected: about log2(pages) probes. The result
/// is page-granular, relative to the page-aligned start.
pub fn backed_prefix(r: Region, mut backed: impl FnMut(u64) -> bool) -> u64 {
    let start = r.base.next_multiple_of(PAGE);
    let end = r.end() & !(PAGE - 1);
    if end <= start {
        return 0; // not one whole page: nothing usable
    }
    if backed(end - 8) {
        return r.size;
    }
    if !backed(start) {
        return 0;
    }
    // Page `good` answers and page `bad` (the last) does not.
    let (mut good, mut bad) = (0, (end - start) / PAGE - 1);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if backed(start + mid * PAGE) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    start + (good + 1) * PAGE - r.base
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A machine whose RAM is `[0x4000_0000, 0x4000_0000 + size)`; counts probes.
    fn machine(size: u64) -> (impl FnMut(u64) -> bool, std::rc::Rc<std::cell::Cell<u32>>) {
        let probes = std::rc::Rc::new(std::cell::Cell::new(0));
        let p = probes.clone();
        let f = move |addr: u64| {
            assert_eq!(addr % 8, 0, "probes are aligned words");
            p.set(p.get() + 1);
            (0x4000_0000..0x4000_0000 + size).contains(&addr)
        };
        (f, probes)
    }

    #[test]
    fn claim_of_64g_on_1g_is_clamped_to_1g() {
        let (f, probes) = machine(GIB);
        let claim = Region {
            base: 0x4000_0000,
            size: 64 * GIB,
        };
        assert_eq!(backed_prefix(claim, f), GIB);
        // log2(16 Mi pages) = 24 bisection steps, plus the two first probes.
        assert!(probes.get() <= 26, "{} probes", probes.get());
    }

    #[test]
    fn fully_backed_range_costs_one_probe() {
        let (f, probes) = machine(GIB);
        let r = Region {
            base: 0x4000_0000,
            size: GIB,
        };
        assert_eq!(backed_prefix(r, f), GIB);
        assert_eq!(probes.get(), 1);
    }

    #[test]
    fn range_with_nothing_behind_it_is_empty() {
        let (f, _) = machine(GIB);
        let r = Region {
            base: 0x8000_0000,
            size: 63 * GIB,
        };
        assert_eq!(backed_prefix(r, f), 0);
    }

    #[test]
    fn odd_sizes_and_unaligned_bases() {
        // Backed: 1 GiB + 3 pages; the claim starts mid-page.
        let (f, _) = machine(GIB + 3 * PAGE);
        let r = Region {
            base: 0x4000_0100,
            size: 2 * GIB,
        };
        assert_eq!(backed_prefix(r, f), GIB + 3 * PAGE - 0x100);
        // Less than a page: nothing usable, and nothing probed.
        let (f, probes) = machine(GIB);
        let r = Region {
            base: 0x4000_0000,
            size: PAGE - 8,
        };
        assert_eq!(backed_prefix(r, f), 0);
        assert_eq!(probes.get(), 0);
        // Exactly one backed page of a two-page claim.
        let (f, _) = machine(PAGE);
        let r = Region {
            base: 0x4000_0000,
            size: 2 * PAGE,
        };
        assert_eq!(backed_prefix(r, f), PAGE);
    }

    #[test]
    fn every_backed_size_is_found() {
        for pages in 1..=40u64 {
            let (f, _) = machine(pages * PAGE);
            let r = Region {
                base: 0x4000_0000,
                size: 40 * PAGE,
            };
            assert_eq!(backed_prefix(r, f), pages * PAGE, "{pages} pages backed");
        }
    }
}
