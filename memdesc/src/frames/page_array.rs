//! The page array: one [`Word`] per physical frame of the RAM ranges the
//! firmware was given, with holes between ranges costing nothing.
//!
//! The storage (`size_of::<AtomicU64>() == 8` bytes per frame, see
//! [`bytes_needed`]) is handed in by the caller: on target the firmware carves
//! it out of RAM at boot, on the host tests leak a `Vec`. Ranges are stored
//! sorted, each with the index of its first word, so PFN -> word is a bounded
//! scan of at most [`MAX_RANGES`] entries plus one subtraction: O(1).

use super::atomics::{AtomicCell, Atomics, CoreAtomics};
use super::desc::PFN_LIMIT;
use super::error::{FrameError, LayoutError};
use super::word::{Word, MAX_FRAMES};
use crate::addr::{Pfn, PhysAddr, PAGE_SIZE};
use core::sync::atomic::{AtomicBool, Ordering};

/// Most RAM ranges one page array describes.
pub const MAX_RANGES: usize = 16;

/// A half-open range of frames `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PfnRange {
    /// First frame.
    pub start: Pfn,
    /// One past the last frame.
    pub end: Pfn,
}

impl PfnRange {
    /// `[start, end)`.
    pub const fn new(start: Pfn, end: Pfn) -> Self {
        Self { start, end }
    }

    /// The whole frames inside `[base, base + size)` (rounded inwards).
    pub const fn from_phys(base: PhysAddr, size: u64) -> Self {
        let start = base.as_u64().div_ceil(PAGE_SIZE);
        let end = base.as_u64().saturating_add(size) / PAGE_SIZE;
        let end = if end < start { start } else { end };
        Self {
            start: Pfn(start),
            end: Pfn(end),
        }
    }

    /// The frames touched by `[base, base + size)` (rounded outwards): what to
    /// reserve for an image or a DTB.
    pub const fn covering_phys(base: PhysAddr, size: u64) -> Self {
        let start = base.as_u64() / PAGE_SIZE;
        let end = base.as_u64().saturating_add(size).div_ceil(PAGE_SIZE);
        Self {
            start: Pfn(start),
            end: Pfn(end),
        }
    }

    /// Number of frames.
    pub const fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// True when the range holds no frame.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when `pfn` is inside.
    pub const fn contains(&self, pfn: Pfn) -> bool {
        self.start.0 <= pfn.0 && pfn.0 < self.end.0
    }
}

/// Words (= frames) the page array for `ranges` needs.
///
/// # Errors
///
/// A [`LayoutError`] for too many, inverted, overlapping or too high
/// ranges, or more frames than one array can link.
pub fn words_needed(ranges: &[PfnRange]) -> Result<u64, LayoutError> {
    Ok(sorted_sections(ranges)?.1)
}

/// Bytes of storage the page array for `ranges` needs (8 per frame).
///
/// # Errors
///
/// As [`words_needed`].
pub fn bytes_needed(ranges: &[PfnRange]) -> Result<u64, LayoutError> {
    Ok(words_needed(ranges)? * core::mem::size_of::<u64>() as u64)
}

/// One RAM range and the index of its first word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Section {
    /// First PFN.
    pub start: u64,
    /// One past the last PFN.
    pub end: u64,
    /// Page-array index of `start`.
    pub base: u64,
}

impl Section {
    /// Index of `pfn`, which must be inside.
    #[inline(always)]
    pub fn index(&self, pfn: u64) -> usize {
        (pfn - self.start + self.base) as usize
    }
    /// True when the whole block `[pfn, pfn + 2^order)` is inside.
    #[inline(always)]
    pub fn holds_block(&self, pfn: u64, order: u8) -> bool {
        pfn >= self.start && pfn + (1u64 << order) <= self.end
    }
}

fn sorted_sections(
    ranges: &[PfnRange],
) -> Result<([Section; MAX_RANGES], u64, usize), LayoutError> {
    let mut secs = [Section::default(); MAX_RANGES];
    let mut n = 0;
    for r in ranges {
        if r.end.0 < r.start.0 {
            return Err(LayoutError::BadRange {
                start: r.start,
                end: r.end,
            });
        }
        if r.is_empty() {
            continue;
        }
        if n == MAX_RANGES {
            return Err(LayoutError::TooManyRanges {
                given: ranges.len(),
            });
        }
        // Insertion sort by start: tiny n, no allocation.
        let mut i = n;
        while i > 0 && secs[i - 1].start > r.start.0 {
            secs[i] = secs[i - 1];
            i -= 1;
        }
        secs[i] = Section {
            start: r.start.0,
            end: r.end.0,
            base: 0,
        };
        n += 1;
    }
    // Adjacent ranges are one stretch of memory: merge them, so buddy
    // blocks (which never cross a section) can span the seam.
    let mut total = 0u64;
    let mut m = 0;
    for i in 0..n {
        let s = secs[i];
        if s.end > PFN_LIMIT {
            return Err(LayoutError::PfnTooHigh { end: Pfn(s.end) });
        }
        if m > 0 && s.start < secs[m - 1].end {
            return Err(LayoutError::Overlap { at: Pfn(s.start) });
        }
        total += s.end - s.start;
        if m > 0 && s.start == secs[m - 1].end {
            secs[m - 1].end = s.end;
        } else {
            secs[m] = Section {
                base: total - (s.end - s.start),
                ..s
            };
            m += 1;
        }
    }
    if total > MAX_FRAMES {
        return Err(LayoutError::TooManyFrames { frames: total });
    }
    Ok((secs, total, m))
}

/// One word per frame of a set of RAM ranges.
///
/// Shared (`&PageArray`) between the allocator, which changes words under its
/// own `&mut`, and lock-free readers such as [`PageArray::get_folio`].
pub struct PageArray<'a, A: Atomics = CoreAtomics> {
    words: &'a [A::U64],
    sections: [Section; MAX_RANGES],
    nsections: usize,
    claimed: AtomicBool,
}

impl<'a, A: Atomics> PageArray<'a, A> {
    /// Lays out a page array for `ranges` in `storage` (at least
    /// [`words_needed`] words) and marks every frame
    /// [`Reserved`](super::FrameType::Reserved). Ranges may come in any order
    /// and must not overlap; empty ones are ignored, adjacent ones merged.
    /// Every PFN must be below [`PFN_LIMIT`].
    ///
    /// # Errors
    ///
    /// As [`words_needed`], and [`LayoutError::StorageTooSmall`].
    pub fn new(storage: &'a mut [A::U64], ranges: &[PfnRange]) -> Result<Self, LayoutError> {
        let (sections, total, nsections) = sorted_sections(ranges)?;
        if (storage.len() as u64) < total {
            return Err(LayoutError::StorageTooSmall {
                needed: total,
                given: storage.len() as u64,
            });
        }
        let words: &'a [A::U64] = &storage[..total as usize];
        for w in words {
            w.store(Word::RESERVED.raw(), Ordering::Relaxed);
        }
        Ok(Self {
            words,
            sections,
            nsections,
            claimed: AtomicBool::new(false),
        })
    }

    /// Number of frames described.
    #[inline]
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// True when no frame is described.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The RAM ranges, sorted by start.
    pub fn ranges(&self) -> impl Iterator<Item = PfnRange> + '_ {
        self.sections[..self.nsections]
            .iter()
            .map(|s| PfnRange::new(Pfn(s.start), Pfn(s.end)))
    }

    #[inline(always)]
    pub(crate) fn sections(&self) -> &[Section] {
        &self.sections[..self.nsections]
    }

    /// The section holding `pfn`.
    #[inline(always)]
    pub(crate) fn section_of(&self, pfn: u64) -> Option<&Section> {
        self.sections()
            .iter()
            .find(|s| s.start <= pfn && pfn < s.end)
    }

    /// The section holding page-array index `idx`.
    #[inline(always)]
    pub(crate) fn section_of_index(&self, idx: usize) -> Option<&Section> {
        let idx = idx as u64;
        self.sections()
            .iter()
            .find(|s| s.base <= idx && idx < s.base + (s.end - s.start))
    }

    /// The section holding `pfn` and the page-array index of its word.
    ///
    /// # Errors
    ///
    /// [`FrameError::NotManaged`] when `pfn` is in no range.
    #[inline(always)]
    pub(crate) fn managed(&self, pfn: Pfn) -> Result<(Section, usize), FrameError> {
        let sec = *self
            .section_of(pfn.0)
            .ok_or(FrameError::NotManaged { pfn })?;
        Ok((sec, sec.index(pfn.0)))
    }

    /// Page-array index of `pfn`, `None` if it is in no range.
    #[inline]
    pub fn index_of(&self, pfn: Pfn) -> Option<usize> {
        self.section_of(pfn.0).map(|s| s.index(pfn.0))
    }

    /// PFN of page-array index `idx`.
    #[inline]
    pub fn pfn_of(&self, idx: usize) -> Option<Pfn> {
        self.section_of_index(idx)
            .map(|s| Pfn(idx as u64 - s.base + s.start))
    }

    /// True when `pfn` is described.
    #[inline]
    pub fn contains(&self, pfn: Pfn) -> bool {
        self.section_of(pfn.0).is_some()
    }

    /// The current word of `pfn` (acquire load).
    ///
    /// # Errors
    ///
    /// [`FrameError::NotManaged`] for a PFN outside the array.
    #[inline]
    pub fn word(&self, pfn: Pfn) -> Result<Word, FrameError> {
        let idx = self.index_of(pfn).ok_or(FrameError::NotManaged { pfn })?;
        Ok(self.load(idx))
    }

    /// The cells `[idx, idx + n)` (which must be inside the array).
    #[inline(always)]
    pub(crate) fn cells(&self, idx: usize, n: usize) -> &[A::U64] {
        &self.words[idx..idx + n]
    }

    /// Acquire load of the word at `idx`.
    #[inline(always)]
    pub(crate) fn load(&self, idx: usize) -> Word {
        // Acquire: pairs with `store_release` and with the Release fences
        // of `FrameAllocator::fill` and `publish_frozen`, so the descriptor
        // a word points to is seen initialised.
        Word::from_raw(self.words[idx].load(Ordering::Acquire))
    }

    /// Relaxed load of the word at `idx` (allocator-private state).
    #[inline(always)]
    pub(crate) fn load_relaxed(&self, idx: usize) -> Word {
        Word::from_raw(self.words[idx].load(Ordering::Relaxed))
    }

    /// Relaxed store (free-list bookkeeping nobody else interprets).
    #[inline(always)]
    pub(crate) fn store_relaxed(&self, idx: usize, w: Word) {
        self.words[idx].store(w.raw(), Ordering::Relaxed)
    }

    /// Release store (publishes a descriptor to speculative readers).
    #[inline(always)]
    pub(crate) fn store_release(&self, idx: usize, w: Word) {
        // Release: pairs with the Acquire of `load`.
        self.words[idx].store(w.raw(), Ordering::Release)
    }

    /// Marks the array as driven by one allocator; false if it already was.
    pub(crate) fn claim(&self) -> bool {
        // AcqRel: one RMW decides the one claimer; it pairs with itself (a
        // second claimer's Acquire sees the first's Release).
        !self.claimed.swap(true, Ordering::AcqRel)
    }
}

// SAFETY: the words are atomics (`A::U64: Sync`); everything else is plain data
// set at construction and only read afterwards.
unsafe impl<A: Atomics> Sync for PageArray<'_, A> {}
// SAFETY: as above; the array only holds a shared borrow of its storage.
unsafe impl<A: Atomics> Send for PageArray<'_, A> {}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use super::*;
    use crate::frames::FrameType;
    use core::sync::atomic::AtomicU64;

    fn storage(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(u64::MAX)).collect()
    }

    #[test]
    fn sizes_and_holes() {
        let ranges = [
            PfnRange::new(Pfn(0x80000), Pfn(0x80100)),
            PfnRange::new(Pfn(0x40000), Pfn(0x40010)),
        ];
        assert_eq!(words_needed(&ranges), Ok(0x110));
        assert_eq!(bytes_needed(&ranges), Ok(0x110 * 8));
        let mut s = storage(0x120);
        let pa: PageArray = PageArray::new(&mut s, &ranges).unwrap();
        assert_eq!(pa.len(), 0x110);
        assert_eq!(pa.index_of(Pfn(0x40000)), Some(0));
        assert_eq!(pa.index_of(Pfn(0x4000f)), Some(0xf));
        assert_eq!(pa.index_of(Pfn(0x40010)), None);
        assert_eq!(pa.index_of(Pfn(0x80000)), Some(0x10));
        assert_eq!(pa.pfn_of(0x10), Some(Pfn(0x80000)));
        assert_eq!(pa.pfn_of(0x110), None);
        assert_eq!(
            pa.word(Pfn(0x800ff)).unwrap().frame_type(),
            Some(FrameType::Reserved)
        );
        assert_eq!(
            pa.word(Pfn(0x7ffff)),
            Err(FrameError::NotManaged { pfn: Pfn(0x7ffff) })
        );
        let r: Vec<_> = pa.ranges().collect();
        assert_eq!(r[0].start, Pfn(0x40000));
    }

    #[test]
    fn layout_errors() {
        let mut s = storage(4);
        let r = [PfnRange::new(Pfn(0), Pfn(8))];
        assert!(matches!(
            PageArray::<CoreAtomics>::new(&mut s, &r),
            Err(LayoutError::StorageTooSmall {
                needed: 8,
                given: 4
            })
        ));
        let overlap = [PfnRange::new(Pfn(0), Pfn(8)), PfnRange::new(Pfn(4), Pfn(9))];
        assert_eq!(
            words_needed(&overlap),
            Err(LayoutError::Overlap { at: Pfn(4) })
        );
        let bad = [PfnRange::new(Pfn(9), Pfn(8))];
        assert!(matches!(
            words_needed(&bad),
            Err(LayoutError::BadRange { .. })
        ));
        let many = [PfnRange::new(Pfn(0), Pfn(1)); MAX_RANGES + 1];
        assert!(words_needed(&many).is_err());
        let huge = [PfnRange::new(Pfn(0), Pfn(MAX_FRAMES + 1))];
        assert!(matches!(
            words_needed(&huge),
            Err(LayoutError::TooManyFrames { .. })
        ));
    }

    #[test]
    fn phys_rounding() {
        let r = PfnRange::from_phys(PhysAddr(0x4000_0800), 0x3000);
        assert_eq!((r.start, r.end), (Pfn(0x40001), Pfn(0x40003)));
        let r = PfnRange::covering_phys(PhysAddr(0x4000_0800), 0x3000);
        assert_eq!((r.start, r.end), (Pfn(0x40000), Pfn(0x40004)));
        assert!(PfnRange::from_phys(PhysAddr(0x800), 0x100).is_empty());
    }
}
