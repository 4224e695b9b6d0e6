//! The hot caches: small LIFOs of recently freed blocks of orders
//! `0..=`[`HOT_MAX_ORDER`] kept out of the buddy lists (the idea of Linux's
//! per-CPU page lists, which also stop at order 3; here one set per
//! allocator).
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

/// Highest order with a hot cache.
pub const HOT_MAX_ORDER: u8 = 3;
/// Blocks each hot cache holds at most.
pub const HOT_CACHE_BLOCKS: usize = 128;

const N: usize = HOT_MAX_ORDER as usize + 1;

/// Bounded LIFOs of page-array indexes of cached free blocks, one per order.
pub(crate) struct HotCache {
    idx: [[u32; HOT_CACHE_BLOCKS]; N],
    len: [usize; N],
}

impl HotCache {
    pub const fn new() -> Self {
        Self {
            idx: [[NO_LINK; HOT_CACHE_BLOCKS]; N],
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
    /// above [`HOT_MAX_ORDER`].
    #[inline(always)]
    pub fn push(&mut self, order: u8, idx: usize) -> bool {
        let o = order as usize;
        if o >= N || self.len[o] == HOT_CACHE_BLOCKS {
            return false;
        }
        self.idx[o][self.len[o]] = idx as u32;
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
        Some(self.idx[o][self.len[o]] as usize)
    }

    /// The cached indexes of `order`.
    pub fn entries(&self, order: u8) -> &[u32] {
        match self.idx.get(order as usize) {
            Some(v) => &v[..self.len[order as usize]],
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
        assert!(!c.push(HOT_MAX_ORDER + 1, 0));
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
}
