//! Hardware poisoning: taking a frame out of service for good.
//!
//! A poisoned frame's word becomes `HwPoison` pointing at a
//! [`HwPoisonDesc`](super::HwPoisonDesc) that keeps the word it had, so its
//! history stays inspectable ([`PageArray::poisoned_original`](super::PageArray::poisoned_original)).
//! A free frame is cut out of its buddy block (the rest goes back as smaller
//! blocks). A frame in use keeps belonging to its allocation, but speculative
//! lookups on it fail and, when the allocation is freed, it stays HwPoison
//! instead of returning to the allocator (a poisoned folio is flagged
//! [`FOLIO_HWPOISON`] so its free takes the slow path).

use super::allocator::FrameAllocator;
use super::atomics::Atomics;
use super::desc::{FolioDesc, FOLIO_HWPOISON};
use super::desc_cache::{desc_of, desc_word, DescMemory};
use super::error::FrameError;
use super::word::{FrameType, Word};
use crate::addr::Pfn;

/// What a frame was when it got poisoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poisoned {
    /// It was free: it left the buddy allocator.
    WasFree,
    /// It was in use as this type: it stays with its allocation until freed.
    InUse(FrameType),
}

impl<M: DescMemory, A: Atomics> FrameAllocator<'_, M, A> {
    /// Marks frame `pfn` as hardware-poisoned.
    ///
    /// # Errors
    ///
    /// [`FrameError::NotManaged`] outside the page array;
    /// [`FrameError::AlreadyPoisoned`]; [`FrameError::Corrupt`] for a word
    /// with an unknown tag or a free frame in no block;
    /// [`FrameError::OutOfDescriptors`] when no hwpoison descriptor can be had
    /// (the frame is left as it was).
    pub fn poison(&mut self, pfn: Pfn) -> Result<Poisoned, FrameError> {
        let pa = self.pa;
        let (sec, idx) = pa.managed(pfn)?;
        match pa.load_relaxed(idx).frame_type() {
            Some(FrameType::HwPoison) => return Err(FrameError::AlreadyPoisoned { pfn }),
            None => return Err(FrameError::Corrupt { pfn }),
            Some(_) => {}
        }
        if pa.load_relaxed(idx).frame_type() == Some(FrameType::Free) {
            // Cut the frame out of the buddy and park it *before* growing the
            // descriptor cache, which takes free frames: the poison
            // descriptor must never land on the frame it poisons.
            self.drain_cache();
            let original = pa.load_relaxed(idx);
            let block = self
                .lists
                .find_block(pa, &sec, idx, pfn.0)
                .ok_or(FrameError::Corrupt { pfn })?;
            self.lists.take_frame(pa, block, pfn.0);
            pa.store_relaxed(idx, Word::RESERVED);
            let d = match self.get_poison_desc() {
                Ok(d) => d,
                Err(e) => {
                    pa.store_relaxed(idx, Word::FREE_TAIL);
                    self.lists.free(pa, &sec, idx, pfn.0, 0);
                    return Err(e);
                }
            };
            d.init(original);
            pa.store_release(idx, desc_word(d));
            self.recount(FrameType::Free, FrameType::HwPoison, 1);
            return Ok(Poisoned::WasFree);
        }
        // In use: growth only takes free frames, so this one stays as it is.
        let d = self.get_poison_desc()?;
        let w = pa.load_relaxed(idx);
        let Some(ty) = w.frame_type() else {
            self.poison.free(d);
            return Err(FrameError::Corrupt { pfn });
        };
        if let Some(f) = desc_of::<A, FolioDesc<A>>(w) {
            f.set_flags(FOLIO_HWPOISON);
        }
        d.init(w);
        pa.store_release(idx, desc_word(d));
        self.recount(ty, FrameType::HwPoison, 1);
        Ok(Poisoned::InUse(ty))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use crate::frames::testutil::*;
    use crate::frames::*;

    #[test]
    fn poison_free_frame_splits_block() {
        let (pa, mut fa) = fresh(&[(0x1000, 0x1040)]);
        assert_eq!(fa.poison(Pfn(0x1011)), Ok(Poisoned::WasFree));
        assert_eq!(fa.count(FrameType::Free), 63);
        assert_eq!(fa.count(FrameType::HwPoison), 1);
        assert!(pa.poisoned_original(Pfn(0x1011)).unwrap().is_free_tail());
        assert_eq!(
            pa.get_folio(Pfn(0x1011), |_| ()).err(),
            Some(FrameError::HwPoisoned { pfn: Pfn(0x1011) })
        );
        assert_eq!(
            fa.poison(Pfn(0x1011)),
            Err(FrameError::AlreadyPoisoned { pfn: Pfn(0x1011) })
        );
        fa.check_consistency().unwrap();
        // The poisoned frame is never handed out.
        let mut got = Vec::new();
        while let Ok(p) = fa.alloc_frozen(0, FrozenKind::Guard) {
            assert_ne!(p, Pfn(0x1011));
            got.push(p);
        }
        assert_eq!(got.len(), 63);
    }

    #[test]
    fn poisoned_folio_frame_never_returns() {
        let (pa, mut fa) = fresh(&[(0x2000, 0x2010)]);
        let f = fa.alloc_folio(2, Owner::Buddy).unwrap();
        let head = f.pfn();
        let victim = Pfn(head.0 + 2);
        let orig = pa.word(victim).unwrap();
        assert_eq!(fa.poison(victim), Ok(Poisoned::InUse(FrameType::Folio)));
        assert_eq!(pa.poisoned_original(victim), Ok(orig));
        assert_ne!(f.desc().flags() & FOLIO_HWPOISON, 0);
        // Other frames of the folio still resolve.
        let g = pa.get_folio(Pfn(head.0 + 1), |_| ()).unwrap();
        assert_eq!(g.refcount(), 2);
        assert!(fa.put(g).unwrap().is_none());
        assert!(matches!(fa.put(f), Ok(Some(Released::Freed { .. }))));
        assert_counts(
            &fa,
            &[
                (FrameType::Free, 15),
                (FrameType::Folio, 0),
                (FrameType::HwPoison, 1),
            ],
        );
        fa.check_consistency().unwrap();
    }

    #[test]
    fn poisoned_page_table_and_offline() {
        let (_, mut fa) = fresh(&[(0x3000, 0x3010)]);
        let t = fa.alloc_page_table().unwrap();
        assert_eq!(
            fa.poison(t.pfn()),
            Ok(Poisoned::InUse(FrameType::PageTable))
        );
        fa.free_page_table(t).unwrap();
        assert_eq!(fa.count(FrameType::PageTable), 0);
        assert_eq!(fa.count(FrameType::HwPoison), 1);
        let o = fa.alloc_frozen(1, FrozenKind::Offline).unwrap();
        fa.poison(Pfn(o.0 + 1)).unwrap();
        fa.free_frozen(o, 1).unwrap();
        assert_eq!(fa.count(FrameType::HwPoison), 2);
        assert_eq!(fa.count(FrameType::Free), 14);
        fa.check_consistency().unwrap();
    }
}
