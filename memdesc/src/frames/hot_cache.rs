//! The hot caches: small LIFOs of recently freed blocks kept out of the
//! buddy lists (the idea of Linux's per-CPU page lists). The single-CPU
//! allocator keeps one set for orders `0..=`[`HOT_MAX_ORDER`] (where
//! Linux's lists also stop); the shared allocator's per-CPU caches use
//! every order up to [`CACHE_MAX_ORDER`] (Linux's lists also keep the 2 MiB
//! order 9), with fewer blocks the larger the order ([`capacity`]).
//!
//! Small allocations and frees are most of the traffic; through a cache they
//! cost a push/pop on a small array plus the block's own words, instead of a
//! buddy split/merge that touches the words of neighbours far apart in the
//! page array. Cached blocks stay typed Free in the page array: the head word
//! is [`Word::is_free_cached`](super::Word::is_free_cached) (no head bit, so the
//! buddy never merges with it), the rest [`Word::FREE_TAIL`](super::Word::FREE_TAIL).
//! They count as free. Anything that needs the exact buddy picture (an
//! allocation that would otherwise fail, `alloc_at`, reserving, poisoning a
//! free frame) drains the caches first.

use super::word::NO_LINK;

/// Highest order the single-CPU allocator's hot cache keeps.
pub const HOT_MAX_ORDER: u8 = 3;
/// Highest order a cache can hold (the shared allocator's per-CPU caches).
pub const CACHE_MAX_ORDER: u8 = 9;
/// Blocks a cache holds at most of each order up to [`HOT_MAX_ORDER`].
pub const HOT_CACHE_BLOCKS: usize = 128;
/// Above [`HOT_MAX_ORDER`], a cache holds at most this many frames (2 MiB)
/// of one order, and at least 2 blocks.
const LARGE_FRAMES: usize = 512;

const N: usize = CACHE_MAX_ORDER as usize + 1;

/// Blocks a cache holds at most at `order` (0 above [`CACHE_MAX_ORDER`]).
pub const fn capacity(order: u8) -> usize {
    if order <= HOT_MAX_ORDER {
        HOT_CACHE_BLOCKS
    } else if order <= CACHE_MAX_ORDER {
        let n = LARGE_FRAMES >> order;
        if n < 2 {
            2
        } else {
            n
        }
    } else {
        0
    }
}

/// Where each order's entries start in [`HotCache`]'s one array.
const START: [usize; N + 1] = {
    let mut s = [0; N + 1];
    let mut o = 0;
    while o < N {
        s[o + 1] = s[o] + capacity(o as u8);
        o += 1;
    }
    s
};

/// Bounded LIFOs of page-array indexes of cached free blocks, one per order,
/// packed in one array (order `o` at `START[o]..START[o + 1]`).
pub(crate) struct HotCache {
    idx: [u32; START[N]],
    len: [usize; N],
}

impl HotCache {
    pub const fn new() -> Self {
        Self {
            idx: [NO_LINK; START[N]],
            len: [0; N],
        }
    }

    /// Blocks cached at `order`.
    #[inline(always)]
    pub fn len(&self, order: u8) -> usize {
        self.len.get(order as usize).copied().unwrap_or(0)
    }

    /// Frames cached over all orders.
    pub fn frames(&self) -> u64 {
        self.len
            .iter()
            .enumerate()
            .map(|(o, &n)| (n as u64) << o)
            .sum()
    }

    /// True when no block is cached.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len.iter().all(|&n| n == 0)
    }

    /// Caches the block at `idx` of `order`; false when full or `order` is
    /// above [`CACHE_MAX_ORDER`].
    #[inline(always)]
    pub fn push(&mut self, order: u8, idx: usize) -> bool {
        let o = order as usize;
        if o >= N || self.len[o] == capacity(order) {
            return false;
        }
        self.idx[START[o] + self.len[o]] = idx as u32;
        self.len[o] += 1;
        true
    }

    /// The most recently cached block of `order`.
    #[inline(always)]
    pub fn pop(&mut self, order: u8) -> Option<usize> {
        let o = order as usize;
        if o >= N || self.len[o] == 0 {
            return None;
        }
        self.len[o] -= 1;
        Some(self.idx[START[o] + self.len[o]] as usize)
    }

    /// The cached indexes of `order`.
    pub fn entries(&self, order: u8) -> &[u32] {
        let o = order as usize;
        match self.len.get(o) {
            Some(&n) => &self.idx[START[o]..START[o] + n],
            None => &[],
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn lifo_and_bounded() {
        let mut c = HotCache::new();
        assert!(c.pop(0).is_none());
        assert!(!c.push(CACHE_MAX_ORDER + 1, 0));
        for i in 0..HOT_CACHE_BLOCKS {
            assert!(c.push(1, i));
        }
        assert!(!c.push(1, 9999));
        assert!(c.push(0, 7));
        assert_eq!(c.len(1), HOT_CACHE_BLOCKS);
        assert_eq!(c.frames(), 2 * HOT_CACHE_BLOCKS as u64 + 1);
        assert_eq!(c.pop(1), Some(HOT_CACHE_BLOCKS - 1));
        assert_eq!(c.entries(1).len(), HOT_CACHE_BLOCKS - 1);
        assert_eq!(c.pop(0), Some(7));
        while c.pop(1).is_some() {}
        assert!(c.is_empty());
    }

    /// Large orders hold fewer blocks, each order its own slots: filling
    /// every order to capacity keeps each order's entries its own.
    #[test]
    fn large_orders_hold_fewer_blocks_in_their_own_slots() {
        assert_eq!(capacity(4), 32);
        assert_eq!(capacity(9), 2);
        assert_eq!(capacity(CACHE_MAX_ORDER + 1), 0);
        let mut c = HotCache::new();
        for o in 0..=CACHE_MAX_ORDER {
            for i in 0..capacity(o) {
                assert!(c.push(o, 1000 * o as usize + i), "order {o} block {i}");
            }
            assert!(!c.push(o, 0), "order {o} over capacity");
        }
        for o in 0..=CACHE_MAX_ORDER {
            let want: Vec<u32> = (0..capacity(o) as u32)
                .map(|i| 1000 * o as u32 + i)
                .collect();
            assert_eq!(c.entries(o), &want[..], "order {o}");
        }
        assert_eq!(c.pop(9), Some(9001));
        assert_eq!(c.pop(4), Some(4031));
    }
}
