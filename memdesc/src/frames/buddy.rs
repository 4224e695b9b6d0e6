//! The buddy free lists, kept in the page array itself.
//!
//! A free block of order `k` is `2^k` frames, aligned to `2^k` in *PFN* space
//! (so blocks are physically aligned) and never crossing a RAM range. Its
//! first frame's word is a free head (order plus `next`/`prev` page-array
//! indexes of its per-order list); every other frame's word is
//! [`Word::FREE_TAIL`]. The only side state is one list head per order and a
//! block count per order. Freeing looks at the buddy's head word: a free head
//! of the same order is unlinked in O(1) thanks to `prev`, and the two merge.

use super::atomics::Atomics;
use super::error::FrameError;
use super::page_array::{PageArray, Section};
use super::word::{Word, NO_LINK};

/// Highest block order: 2^18 frames = 1 GiB.
pub const MAX_ORDER: u8 = 18;
/// Number of orders, `0..=MAX_ORDER`.
pub const ORDERS: usize = MAX_ORDER as usize + 1;

/// Per-order list heads and block counts.
pub(crate) struct FreeLists {
    heads: [u32; ORDERS],
    /// Free blocks per order.
    pub blocks: [u64; ORDERS],
}

impl FreeLists {
    pub const fn new() -> Self {
        Self {
            heads: [NO_LINK; ORDERS],
            blocks: [0; ORDERS],
        }
    }

    /// Frames in free blocks.
    #[cfg(test)]
    pub fn free_frames(&self) -> u64 {
        self.blocks.iter().enumerate().map(|(o, n)| n << o).sum()
    }

    /// First block of the `order` list (for consistency checks).
    pub fn head(&self, order: u8) -> u32 {
        self.heads[order as usize]
    }

    /// Pushes the block whose head is at `idx` onto the `order` list.
    /// Tails must already be [`Word::FREE_TAIL`].
    #[inline]
    pub fn push<A: Atomics>(&mut self, pa: &PageArray<'_, A>, idx: usize, order: u8) {
        let old = self.heads[order as usize];
        if old != NO_LINK {
            let w = pa.load_relaxed(old as usize);
            pa.store_relaxed(old as usize, w.with_free_prev(idx as u32));
        }
        pa.store_relaxed(idx, Word::free_head(order, old, NO_LINK));
        self.heads[order as usize] = idx as u32;
        self.blocks[order as usize] += 1;
    }

    /// Unlinks the free head at `idx` (word `w`, order `order`).
    #[inline]
    pub fn unlink<A: Atomics>(&mut self, pa: &PageArray<'_, A>, idx: usize, w: Word, order: u8) {
        debug_assert_eq!(pa.load_relaxed(idx), w);
        let (next, prev) = (w.free_next(), w.free_prev());
        if prev == NO_LINK {
            self.heads[order as usize] = next;
        } else {
            let p = pa.load_relaxed(prev as usize);
            pa.store_relaxed(prev as usize, p.with_free_next(next));
        }
        if next != NO_LINK {
            let n = pa.load_relaxed(next as usize);
            pa.store_relaxed(next as usize, n.with_free_prev(prev));
        }
        self.blocks[order as usize] -= 1;
    }

    /// Takes a block of `order` whose PFN is aligned to `2^align`; returns
    /// its index and PFN. Its words are left as they were (a stale head and
    /// free tails): the caller writes them all.
    #[inline]
    pub fn alloc<A: Atomics>(
        &mut self,
        pa: &PageArray<'_, A>,
        order: u8,
        align: u8,
    ) -> Result<(usize, u64), FrameError> {
        for o in order..=MAX_ORDER {
            let mut idx = self.heads[o as usize];
            if idx == NO_LINK {
                continue;
            }
            let mut w = pa.load_relaxed(idx as usize);
            let mut pfn;
            loop {
                pfn = pa.pfn_of(idx as usize).map_or(u64::MAX, |p| p.0);
                if o >= align || pfn & ((1u64 << align) - 1) == 0 {
                    break;
                }
                // Only reached when alignment exceeds the block order: walk
                // this list for an aligned block (rare; bounded by its length).
                idx = w.free_next();
                if idx == NO_LINK {
                    break;
                }
                w = pa.load_relaxed(idx as usize);
            }
            if idx == NO_LINK {
                continue;
            }
            let idx = idx as usize;
            self.unlink(pa, idx, w, o);
            let mut k = o;
            while k > order {
                k -= 1;
                // The upper half keeps its (tail) words; only its head changes.
                self.push(pa, idx + (1usize << k), k);
            }
            return Ok((idx, pfn));
        }
        Err(FrameError::OutOfMemory { order })
    }

    /// Frees the block at `idx`/`pfn` of `order` in section `sec`, merging
    /// with free buddies. Its non-head words must already be
    /// [`Word::FREE_TAIL`]; the head word is rewritten here.
    #[inline]
    pub fn free<A: Atomics>(
        &mut self,
        pa: &PageArray<'_, A>,
        sec: &Section,
        mut idx: usize,
        mut pfn: u64,
        mut order: u8,
    ) {
        while order < MAX_ORDER {
            let buddy = pfn ^ (1u64 << order);
            if !sec.holds_block(buddy, order) {
                break;
            }
            let bidx = sec.index(buddy);
            let bw = pa.load_relaxed(bidx);
            if !bw.is_free_head() || bw.free_order() != order {
                break;
            }
            self.unlink(pa, bidx, bw, order);
            if buddy < pfn {
                pa.store_relaxed(idx, Word::FREE_TAIL);
                idx = bidx;
                pfn = buddy;
            } else {
                pa.store_relaxed(bidx, Word::FREE_TAIL);
            }
            order += 1;
        }
        self.push(pa, idx, order);
    }

    /// Frees `[start, end)` of section `sec` (all words already
    /// [`Word::FREE_TAIL`]) as maximal aligned blocks.
    pub fn free_range<A: Atomics>(
        &mut self,
        pa: &PageArray<'_, A>,
        sec: &Section,
        start: u64,
        end: u64,
    ) {
        let mut pfn = start;
        while pfn < end {
            let mut order = MAX_ORDER.min(pfn.trailing_zeros().min(63) as u8);
            while pfn + (1u64 << order) > end {
                order -= 1;
            }
            self.free(pa, sec, sec.index(pfn), pfn, order);
            pfn += 1u64 << order;
        }
    }

    /// The free block containing `pfn` (index `idx`, in `sec`): its head
    /// index, head PFN, head word and order.
    pub fn find_block<A: Atomics>(
        &self,
        pa: &PageArray<'_, A>,
        sec: &Section,
        idx: usize,
        pfn: u64,
    ) -> Option<(usize, u64, Word, u8)> {
        for o in 0..=MAX_ORDER {
            let hp = pfn & !((1u64 << o) - 1);
            if hp < sec.start {
                return None;
            }
            let hidx = idx - (pfn - hp) as usize;
            let w = pa.load_relaxed(hidx);
            if w.is_free_head() {
                let k = w.free_order();
                // A free head below `pfn` that does not cover it means `pfn`
                // is in no free block (blocks are disjoint).
                return (hp + (1u64 << k) > pfn).then_some((hidx, hp, w, k));
            }
            if !w.is_free_tail() {
                return None;
            }
        }
        None
    }

    /// Takes the single frame `pfn` out of the free block `(hidx, hp, w, k)`
    /// containing it, giving the rest back as smaller blocks. The frame's own
    /// word is left for the caller to write.
    pub fn take_frame<A: Atomics>(
        &mut self,
        pa: &PageArray<'_, A>,
        block: (usize, u64, Word, u8),
        pfn: u64,
    ) {
        let (mut hidx, mut hp, w, mut k) = block;
        self.unlink(pa, hidx, w, k);
        while k > 0 {
            k -= 1;
            let half = hp + (1u64 << k);
            let half_idx = hidx + (1usize << k);
            if pfn >= half {
                // Lower half stays free; its head word is rewritten by push.
                self.push(pa, hidx, k);
                hidx = half_idx;
                hp = half;
            } else {
                self.push(pa, half_idx, k);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use super::*;
    use crate::addr::Pfn;
    use crate::frames::atomics::CoreAtomics;
    use crate::frames::page_array::PfnRange;
    use core::sync::atomic::AtomicU64;

    fn array(ranges: &[PfnRange]) -> PageArray<'static, CoreAtomics> {
        let n = super::super::words_needed(ranges).unwrap() as usize;
        let s: &'static mut [AtomicU64] = crate::frames::testutil::keep(
            (0..n)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        PageArray::new(s, ranges).unwrap()
    }

    fn seed(pa: &PageArray<'_, CoreAtomics>, fl: &mut FreeLists) {
        let secs: Vec<Section> = pa.sections().to_vec();
        for s in &secs {
            for p in s.start..s.end {
                pa.store_relaxed(s.index(p), Word::FREE_TAIL);
            }
            fl.free_range(pa, s, s.start, s.end);
        }
    }

    #[test]
    fn seeding_makes_maximal_blocks() {
        // 0x103..0x200: 1+4+8+16+32+64+128 pattern after an unaligned start.
        let pa = array(&[PfnRange::new(Pfn(0x103), Pfn(0x200))]);
        let mut fl = FreeLists::new();
        seed(&pa, &mut fl);
        assert_eq!(fl.free_frames(), 0xfd);
        assert_eq!(fl.blocks[0], 1);
        assert_eq!(fl.blocks[2], 1);
        assert_eq!(fl.blocks[7], 1);
    }

    #[test]
    fn alloc_split_and_merge_back() {
        let pa = array(&[PfnRange::new(Pfn(0x400), Pfn(0x800))]);
        let mut fl = FreeLists::new();
        seed(&pa, &mut fl);
        assert_eq!(fl.blocks[10], 1);
        let (i0, p0) = fl.alloc(&pa, 0, 0).unwrap();
        assert_eq!((i0, p0), (0, 0x400));
        // Allocated words are always rewritten by the caller.
        pa.store_relaxed(i0, Word::RESERVED);
        assert_eq!(fl.free_frames(), 1023);
        for o in 0..10 {
            assert_eq!(fl.blocks[o], 1, "order {o}");
        }
        let (i3, p3) = fl.alloc(&pa, 3, 0).unwrap();
        assert_eq!(p3 % 8, 0);
        for i in 0..8 {
            pa.store_relaxed(i3 + i, Word::RESERVED);
        }
        let sec = *pa.section_of(p0).unwrap();
        fl.free(&pa, &sec, i0, p0, 0);
        for i in 1..8 {
            pa.store_relaxed(i3 + i, Word::FREE_TAIL);
        }
        fl.free(&pa, &sec, i3, p3, 3);
        assert_eq!(fl.blocks[10], 1);
        assert_eq!(fl.free_frames(), 1024);
    }

    #[test]
    fn aligned_alloc_and_exhaustion() {
        let pa = array(&[PfnRange::new(Pfn(0x401), Pfn(0x440))]);
        let mut fl = FreeLists::new();
        seed(&pa, &mut fl);
        let (i, p) = fl.alloc(&pa, 0, 4).unwrap();
        pa.store_relaxed(i, Word::RESERVED);
        assert_eq!(p % 16, 0);
        assert_eq!(
            fl.alloc(&pa, 6, 0),
            Err(FrameError::OutOfMemory { order: 6 })
        );
        assert!(fl.alloc(&pa, 0, 12).is_err());
    }

    #[test]
    fn take_frame_from_the_middle() {
        let pa = array(&[PfnRange::new(Pfn(0), Pfn(64))]);
        let mut fl = FreeLists::new();
        seed(&pa, &mut fl);
        let sec = *pa.section_of(0).unwrap();
        let b = fl.find_block(&pa, &sec, 37, 37).unwrap();
        assert_eq!((b.0, b.1, b.3), (0, 0, 6));
        fl.take_frame(&pa, b, 37);
        assert_eq!(fl.free_frames(), 63);
        assert!(fl.find_block(&pa, &sec, 37, 37).is_none());
        pa.store_relaxed(37, Word::FREE_TAIL);
        fl.free(&pa, &sec, 37, 37, 0);
        assert_eq!(fl.blocks[6], 1);
    }
}
