//! Two Offline-frame operations the balloon needs on top of
//! [`crate::frames::offline`]: finding the allocation a ballooned frame
//! belongs to, and halving an Offline allocation so that part of it can be
//! deflated. Both only rewrite page-array words: Offline frames never gain a
//! descriptor or a refcount on the way.

use crate::addr::Pfn;
use crate::frames::word::{FrameType, Word, MISC_FLAG_TAIL};
use crate::frames::{Atomics, DescMemory, FrameAllocator, FrameError};

impl<M: DescMemory, A: Atomics> FrameAllocator<'_, M, A> {
    /// The Offline allocation `(head, order)` that frame `pfn` belongs to
    /// (the word of a poisoned frame is read through its kept original).
    ///
    /// # Errors
    ///
    /// [`FrameError::NotManaged`] when the page array does not describe
    /// `pfn`, [`FrameError::WrongType`] when the frame is not Offline, and
    /// [`FrameError::Corrupt`] when its word has no valid type.
    pub fn offline_allocation_of(&self, pfn: Pfn) -> Result<(Pfn, u8), FrameError> {
        let idx = self
            .pa
            .index_of(pfn)
            .ok_or(FrameError::NotManaged { pfn })?;
        let w = self.pa.effective(self.pa.load_relaxed(idx));
        match w.frame_type() {
            Some(FrameType::Offline) => {}
            Some(found) => return Err(FrameError::WrongType { pfn, found }),
            None => return Err(FrameError::Corrupt { pfn }),
        }
        let order = w.misc_order();
        let head = Pfn(pfn.0 & !((1u64 << order) - 1));
        Ok((head, order))
    }

    /// Splits the Offline allocation `[pfn, pfn + 2^order)` (order >= 1)
    /// into two Offline allocations of `order - 1`. Counts do not change.
    ///
    /// # Errors
    ///
    /// [`FrameError::InvalidOrder`] when `order` is 0 or above the largest
    /// order, [`FrameError::Misaligned`] when `pfn` is not aligned to it,
    /// [`FrameError::NotManaged`] when the page array does not describe
    /// `pfn`, [`FrameError::NotAllocation`] when `[pfn, pfn + 2^order)` is
    /// not one allocation of that order, [`FrameError::Free`] or
    /// [`FrameError::HwPoisoned`] when it is free or poisoned while free,
    /// [`FrameError::WrongType`] when it is allocated but not Offline, and
    /// [`FrameError::Corrupt`] when a word or descriptor is invalid.
    /// Nothing is rewritten on error.
    pub fn split_offline(&mut self, pfn: Pfn, order: u8) -> Result<(), FrameError> {
        if order == 0 {
            return Err(FrameError::InvalidOrder { order });
        }
        let (_, idx, head, _) = self.check_allocation(pfn, order)?;
        if head.frame_type() != Some(FrameType::Offline) {
            return Err(FrameError::WrongType {
                pfn,
                found: head.frame_type().unwrap_or(FrameType::Reserved),
            });
        }
        let half = order - 1;
        let h = Word::misc(FrameType::Offline, 0, half, 0);
        let t = Word::misc(FrameType::Offline, 0, half, MISC_FLAG_TAIL);
        self.rewrite(idx, half, h, t);
        self.rewrite(idx + (1usize << half), half, h, t);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use crate::frames::testutil::*;
    use crate::frames::*;

    #[test]
    fn split_and_free_halves() {
        let (_, mut fa) = fresh(&[(0x400, 0x600)]);
        let p = fa.alloc_offline(4).unwrap();
        assert_eq!(fa.offline_allocation_of(Pfn(p.0 + 5)).unwrap(), (p, 4));
        fa.split_offline(p, 4).unwrap();
        assert_eq!(fa.offline_allocation_of(Pfn(p.0 + 5)).unwrap(), (p, 3));
        assert_eq!(
            fa.offline_allocation_of(Pfn(p.0 + 9)).unwrap(),
            (Pfn(p.0 + 8), 3)
        );
        assert_eq!(fa.count(FrameType::Offline), 16);
        fa.check_consistency().unwrap();
        // The old order no longer describes one allocation.
        assert!(fa.free_frozen(p, 4).is_err());
        fa.free_frozen(Pfn(p.0 + 8), 3).unwrap();
        assert_eq!(fa.count(FrameType::Offline), 8);
        fa.check_consistency().unwrap();
        fa.free_frozen(p, 3).unwrap();
        assert_eq!(fa.count(FrameType::Offline), 0);
        assert_eq!(fa.count(FrameType::Free), 0x200);
        fa.check_consistency().unwrap();
    }

    #[test]
    fn split_refuses_other_types_and_order_zero() {
        let (_, mut fa) = fresh(&[(0x400, 0x600)]);
        let g = fa.alloc_frozen(2, FrozenKind::Guard).unwrap();
        assert!(matches!(
            fa.split_offline(g, 2),
            Err(FrameError::WrongType { .. })
        ));
        assert!(matches!(
            fa.offline_allocation_of(g),
            Err(FrameError::WrongType { .. })
        ));
        let p = fa.alloc_offline(0).unwrap();
        assert_eq!(
            fa.split_offline(p, 0),
            Err(FrameError::InvalidOrder { order: 0 })
        );
        fa.check_consistency().unwrap();
    }
}
